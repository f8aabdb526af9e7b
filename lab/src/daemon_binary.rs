//! Which `podwire` daemon binary the lab runs: the one given with `--podwire PATH`, else the one
//! beside the running `podwire-lab` (cargo builds both into the same `target/<profile>/`).

use std::path::{Path, PathBuf};
use thiserror::Error;

/// The daemon binary's file name.
pub const NAME: &str = "podwire";

#[derive(Debug, Error)]
pub enum DaemonBinaryError {
    #[error("cannot tell where podwire-lab runs from ({0}); give the daemon with --podwire PATH")]
    OwnPath(std::io::Error),
    #[error(
        "no podwire daemon binary at {}: build it beside podwire-lab (cargo build --release -p podwire -p podwire-lab, or ./dev lab) or give it with --podwire PATH",
        .0.display()
    )]
    Missing(PathBuf),
    #[error("{} is not an executable file: give the podwire daemon binary with --podwire PATH", .0.display())]
    NotExecutable(PathBuf),
}

/// The daemon binary: `given`, else `podwire` in the directory of this process's executable.
/// It must be an executable file.
pub fn resolve(given: Option<&Path>) -> Result<PathBuf, DaemonBinaryError> {
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => beside(&std::env::current_exe().map_err(DaemonBinaryError::OwnPath)?),
    };
    check(&path)?;
    Ok(path)
}

/// `podwire` in the directory of `exe`.
pub fn beside(exe: &Path) -> PathBuf {
    exe.with_file_name(NAME)
}

fn check(path: &Path) -> Result<(), DaemonBinaryError> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(path).map_err(|_| DaemonBinaryError::Missing(path.to_path_buf()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(DaemonBinaryError::NotExecutable(path.to_path_buf()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_the_daemon_is_found_beside_the_lab_or_where_given() {
        let dir =
            std::env::temp_dir().join(format!("podwire-daemon-binary-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lab = dir.join("podwire-lab");
        assert_eq!(beside(&lab), dir.join("podwire"));
        let daemon = dir.join("podwire");
        assert!(matches!(
            resolve(Some(&daemon)),
            Err(DaemonBinaryError::Missing(_))
        ));
        std::fs::write(&daemon, "#!/bin/sh\n").unwrap();
        assert!(matches!(
            resolve(Some(&daemon)),
            Err(DaemonBinaryError::NotExecutable(_))
        ));
        std::fs::set_permissions(&daemon, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        assert_eq!(resolve(Some(&daemon)).unwrap(), daemon);
        assert!(matches!(
            resolve(Some(&dir)),
            Err(DaemonBinaryError::NotExecutable(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
