//! Files podwire publishes (subnet.env, the stats file): written whole under a temporary name
//! beside them, then renamed over them, so a reader sees the old file or the new one.
//!
//! The temporary file is created with `O_CREAT | O_EXCL | O_NOFOLLOW` and its final mode: a
//! symlink (or anything else) planted at the temporary name is never followed, so a writable
//! directory cannot make root write through it to another file. A stale temporary entry (from
//! a crash, or planted) is unlinked, which does not follow links either, and creation is tried
//! once more; if something is there again, the write fails. `rename` replaces a symlink at
//! the final name itself, never its target.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `tmp` afresh with `mode`, never through a symlink.
fn create_new(tmp: &Path, mode: u32) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(tmp)
}

/// Writes `contents` to `path` through the temporary file `tmp` (in the same directory), which
/// gets mode `mode` from its creation on, whatever the umask.
pub fn write(path: &Path, tmp: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let file = match create_new(tmp, mode) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(tmp)?;
            create_new(tmp, mode)?
        }
        other => other?,
    };
    let written = (|| {
        // The umask may have taken bits off at creation: set exactly `mode`, on the descriptor.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        (&file).write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn test_stale_temporary_files_and_links_are_replaced_not_followed() {
        let dir = std::env::temp_dir().join(format!("podwire-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (path, tmp) = (dir.join("out"), dir.join("out.tmp"));
        // A dangling link: following it would create the target.
        let nowhere = dir.join("would-be-created");
        std::os::unix::fs::symlink(&nowhere, &tmp).unwrap();
        write(&path, &tmp, b"one", 0o640).unwrap();
        assert!(!nowhere.exists());
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o640);
        // A stale regular file (a crash between create and rename).
        std::fs::write(&tmp, "stale").unwrap();
        write(&path, &tmp, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert!(!tmp.exists());
        // A symlink at the final name is replaced, its target untouched.
        let target = dir.join("target");
        std::fs::write(&target, "keep").unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        write(&path, &tmp, b"three", 0o644).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        // A directory in the way of the temporary name is an error, not a detour.
        std::fs::create_dir(&tmp).unwrap();
        assert!(write(&path, &tmp, b"four", 0o644).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"three");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
