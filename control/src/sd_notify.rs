//! systemd's readiness protocol (`sd_notify(3)`), client side, for `Type=notify` units.
//!
//! The service manager passes a datagram socket's address in `$NOTIFY_SOCKET`: a path, or an
//! abstract name when it starts with `@`. A message is one datagram of newline-separated
//! `KEY=VALUE` lines. Without `$NOTIFY_SOCKET` (not started by systemd, or not `Type=notify`)
//! every call here does nothing. A failure to notify is never fatal: callers log it.

use std::ffi::OsString;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable systemd sets.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Why a notification was not sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("$NOTIFY_SOCKET is not valid UTF-8: {0:?}")]
    NotUtf8(OsString),
    #[error("$NOTIFY_SOCKET {0:?}: not a socket path or @abstract name")]
    BadAddress(String),
    #[error("notifying {socket}: {source}")]
    Send {
        socket: String,
        source: std::io::Error,
    },
}

/// `READY=1` with a status line: start-up is complete.
pub fn ready(status: &str) -> Result<(), NotifyError> {
    notify(&ready_message(status))
}

/// `STOPPING=1`: shutdown has begun.
pub fn stopping() -> Result<(), NotifyError> {
    notify("STOPPING=1\n")
}

/// The datagram [`ready`] sends. Newlines in `status` would start another assignment, so
/// they become spaces.
pub fn ready_message(status: &str) -> String {
    format!("READY=1\nSTATUS={}\n", status.replace('\n', " "))
}

/// Sends `message` to `$NOTIFY_SOCKET`, if it is set.
pub fn notify(message: &str) -> Result<(), NotifyError> {
    match std::env::var_os(NOTIFY_SOCKET) {
        None => Ok(()),
        Some(v) if v.is_empty() => Ok(()),
        Some(v) => {
            let socket = v.into_string().map_err(NotifyError::NotUtf8)?;
            notify_to(&socket, message)
        }
    }
}

/// Sends `message` to the socket `socket` names (`/path` or `@abstract`).
pub fn notify_to(socket: &str, message: &str) -> Result<(), NotifyError> {
    let addr = address(socket)?;
    let send_err = |source| NotifyError::Send {
        socket: socket.to_string(),
        source,
    };
    let sock = UnixDatagram::unbound().map_err(send_err)?;
    sock.send_to_addr(message.as_bytes(), &addr)
        .map_err(send_err)?;
    Ok(())
}

fn address(socket: &str) -> Result<SocketAddr, NotifyError> {
    let bad = || NotifyError::BadAddress(socket.to_string());
    if let Some(name) = socket.strip_prefix('@') {
        SocketAddr::from_abstract_name(name.as_bytes()).map_err(|_| bad())
    } else if socket.starts_with('/') {
        SocketAddr::from_pathname(socket).map_err(|_| bad())
    } else {
        Err(bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::Duration;

    /// A fresh directory under the system's temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!(
                "podwire-sd-notify-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn receive(listener: &UnixDatagram) -> String {
        listener
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = listener.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn ready_to_a_path_socket_sends_the_exact_datagram() {
        let dir = TempDir::new("path");
        let path = dir.0.join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        notify_to(
            path.to_str().unwrap(),
            &ready_message("forwarding on flannel.1"),
        )
        .unwrap();
        assert_eq!(
            receive(&listener),
            "READY=1\nSTATUS=forwarding on flannel.1\n"
        );
    }

    #[test]
    fn stopping_to_an_abstract_socket() {
        let name = format!("podwire-sd-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(&format!("@{name}"), "STOPPING=1\n").unwrap();
        assert_eq!(receive(&listener), "STOPPING=1\n");
    }

    #[test]
    fn a_newline_in_the_status_does_not_start_another_assignment() {
        assert_eq!(
            ready_message("a\nWATCHDOG=1"),
            "READY=1\nSTATUS=a WATCHDOG=1\n"
        );
    }

    #[test]
    fn no_listener_and_bad_addresses_are_errors() {
        let dir = TempDir::new("gone");
        let gone = dir.0.join("nobody.sock");
        assert!(matches!(
            notify_to(gone.to_str().unwrap(), "READY=1\n"),
            Err(NotifyError::Send { .. })
        ));
        assert!(matches!(
            notify_to("relative.sock", "READY=1\n"),
            Err(NotifyError::BadAddress(_))
        ));
    }
}
