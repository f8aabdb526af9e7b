//! Secrets (the etcd password): kept out of `Debug` output and logs, read from a file.

use std::path::{Path, PathBuf};

/// A string that must not be shown: its `Debug` prints `<redacted>`, it has no `Display`,
/// and the value is reached only through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Reads a secret from `path`: the whole file, less a trailing newline (`\n` or `\r\n`),
    /// as `echo pw > file` or an editor leaves it. An empty one is refused.
    pub fn from_file(path: &Path) -> Result<Secret, SecretError> {
        let io = |source| SecretError::Read {
            path: path.to_path_buf(),
            source,
        };
        let bytes = std::fs::read(path).map_err(io)?;
        let text = String::from_utf8(bytes).map_err(|_| SecretError::NotUtf8 {
            path: path.to_path_buf(),
        })?;
        let value = text
            .strip_suffix('\n')
            .map(|t| t.strip_suffix('\r').unwrap_or(t))
            .unwrap_or(&text);
        if value.is_empty() {
            return Err(SecretError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Secret(value.to_string()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.to_string())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

/// For clap: `--etcd-password` parses straight into a `Secret`.
impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// Why a secret file could not be used. The messages name the file, never its contents.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("reading the secret file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the secret file {path} is not UTF-8 text")]
    NotUtf8 { path: PathBuf },
    #[error("the secret file {path} is empty")]
    Empty { path: PathBuf },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_debug_redacts() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(<redacted>)");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn test_from_file_trims_one_trailing_newline() {
        let dir = std::env::temp_dir().join(format!("podwire-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        for (content, want) in [
            ("hunter2\n", "hunter2"),
            ("hunter2\r\n", "hunter2"),
            ("hunter2", "hunter2"),
            (" spaced pw \n\n", " spaced pw \n"),
        ] {
            std::fs::write(&file, content).unwrap();
            assert_eq!(
                Secret::from_file(&file).unwrap().expose(),
                want,
                "{content:?}"
            );
        }
        std::fs::write(&file, "\n").unwrap();
        let e = Secret::from_file(&file).unwrap_err();
        assert!(matches!(e, SecretError::Empty { .. }), "{e}");
        std::fs::write(&file, [0xff, 0xfe, b'\n']).unwrap();
        let e = Secret::from_file(&file).unwrap_err();
        assert!(matches!(e, SecretError::NotUtf8 { .. }), "{e}");
        let missing = dir.join("missing");
        let e = Secret::from_file(&missing).unwrap_err().to_string();
        assert!(e.contains("missing") && e.contains("No such file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
