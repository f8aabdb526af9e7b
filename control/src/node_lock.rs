//! One daemon per device and per underlay port in a network namespace.
//!
//! Two daemons on one node would share the TUN device's queues and, through SO_REUSEPORT, the
//! underlay port, each taking a share of the other's packets; the second would also delete the
//! first one's ctl socket when it exits. Each daemon binds an abstract Unix socket per thing it
//! owns (`podwire/dev/NAME`, `podwire/port/N`). Abstract names belong to the network namespace
//! (so the lab's nodes, each in its own, do not collide) and go away with the process that bound
//! them, so a crash leaves no stale lock. The second daemon's bind fails; it connects instead
//! and reads the holder's pid from the connection's peer credentials (SO_PEERCRED gives the
//! pid of the process that called listen). No thread serves the lock (one made before the
//! capability drop would keep its privileges): the control loop closes the askers'
//! connections.

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum NodeLockError {
    #[error("podwire is already running for {what} in this network namespace (pid {pid})")]
    Held { what: String, pid: i32 },
    #[error(
        "podwire is already running for {what} in this network namespace (pid unknown: {source})"
    )]
    HeldByUnknown { what: String, source: io::Error },
    #[error("cannot take the lock for {what}: {source}")]
    Io { what: String, source: io::Error },
}

/// What a daemon holds while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owned<'a> {
    /// The TUN device (routed mode) or the bridge's host port (L2 mode).
    Device(&'a str),
    /// The underlay's UDP port.
    Port(u16),
}

impl Owned<'_> {
    fn name(&self) -> String {
        match self {
            Owned::Device(d) => format!("podwire/dev/{d}"),
            Owned::Port(p) => format!("podwire/port/{p}"),
        }
    }

    fn describe(&self) -> String {
        match self {
            Owned::Device(d) => format!("device {d}"),
            Owned::Port(p) => format!("UDP port {p}"),
        }
    }
}

/// A lock held: the bound socket (closed, and the name freed, on drop or exit).
#[derive(Debug)]
pub struct NodeLock {
    listener: UnixListener,
}

impl NodeLock {
    /// Takes the lock on `what`, or names who holds it.
    pub fn take(what: &Owned) -> Result<NodeLock, NodeLockError> {
        let describe = || what.describe();
        let io_err = |source| NodeLockError::Io {
            what: describe(),
            source,
        };
        let addr = SocketAddr::from_abstract_name(what.name().as_bytes()).map_err(io_err)?;
        match UnixListener::bind_addr(&addr) {
            Ok(listener) => {
                listener.set_nonblocking(true).map_err(io_err)?;
                Ok(NodeLock { listener })
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(holder(&addr, describe())),
            Err(e) => Err(io_err(e)),
        }
    }

    /// Closes the connections of daemons that came to ask who holds the lock, so the queue
    /// of askers never fills (the daemon's control loop calls it every tick).
    pub fn answer(&self) {
        while self.listener.accept().is_ok() {}
    }
}

/// Who holds the lock at `addr`. The connect does not wait for the holder to accept: it
/// lands in the listener's queue, and the credentials are the listener's from the start.
fn holder(addr: &SocketAddr, what: String) -> NodeLockError {
    let peer = UnixStream::connect_addr(addr)
        .and_then(|s| getsockopt(&s, PeerCredentials).map_err(io::Error::from));
    match peer {
        Ok(cred) => NodeLockError::Held {
            what,
            pid: cred.pid(),
        },
        Err(source) => NodeLockError::HeldByUnknown { what, source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The second take in a namespace names the holder's pid (here, this very process); a
    /// different device or port is free.
    #[test]
    fn test_a_second_take_names_the_holder() {
        let dev = format!("test-{}", std::process::id());
        let held = NodeLock::take(&Owned::Device(&dev)).unwrap();
        for _ in 0..3 {
            match NodeLock::take(&Owned::Device(&dev)) {
                Err(NodeLockError::Held { what, pid }) => {
                    assert_eq!(pid, std::process::id() as i32);
                    assert_eq!(what, format!("device {dev}"));
                }
                other => panic!("{other:?}"),
            }
            held.answer();
        }
        let _other = NodeLock::take(&Owned::Device(&format!("{dev}-other"))).unwrap();
        let port = 40000 + (std::process::id() % 20000) as u16;
        let _port = NodeLock::take(&Owned::Port(port)).unwrap();
        let err = NodeLock::take(&Owned::Port(port)).unwrap_err().to_string();
        assert!(err.contains(&format!("UDP port {port}")), "{err}");
        assert!(err.contains("already running"), "{err}");
        // Released on drop: the name is free again.
        drop(held);
        NodeLock::take(&Owned::Device(&dev)).unwrap();
    }
}
