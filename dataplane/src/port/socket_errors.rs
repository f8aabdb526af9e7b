//! Errors a receive reports that are not about that receive: ICMP errors about datagrams sent
//! earlier. The kernel queues a hard ICMP error (port, protocol or host unreachable,
//! fragmentation needed, parameter problem) on the connected UDP socket its quote names, and
//! the next receive returns it, whoever sent the ICMP: any host that can reach the node and
//! knows a peer's address can do that. Such errors are counted by kind and never stop a worker;
//! only errors that say the call itself was wrong (a bad descriptor or buffer) are fatal.

use core::net::Ipv4Addr;

/// What an asynchronous socket error reported, from its errno (the kernel's
/// `icmp_err_convert` table and `ICMP_PARAMETERPROB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketErrorKind {
    /// ENETUNREACH: network unknown or unreachable, prohibited for the network.
    NetUnreachable,
    /// EHOSTUNREACH, EHOSTDOWN, ENONET: host unreachable, unknown, isolated, prohibited,
    /// filtered.
    HostUnreachable,
    /// ENOPROTOOPT: protocol unreachable.
    ProtocolUnreachable,
    /// ECONNREFUSED: port unreachable.
    PortUnreachable,
    /// EMSGSIZE: fragmentation needed (the kernel has lowered the path MTU).
    FragNeeded,
    /// EPROTO: parameter problem.
    ParameterProblem,
    /// Anything else that is not about the call itself (ENOBUFS, ENOMEM, EOPNOTSUPP from a
    /// failed source route, ...).
    Other,
}

impl SocketErrorKind {
    pub const COUNT: usize = 7;
    pub const ALL: [SocketErrorKind; SocketErrorKind::COUNT] = [
        SocketErrorKind::NetUnreachable,
        SocketErrorKind::HostUnreachable,
        SocketErrorKind::ProtocolUnreachable,
        SocketErrorKind::PortUnreachable,
        SocketErrorKind::FragNeeded,
        SocketErrorKind::ParameterProblem,
        SocketErrorKind::Other,
    ];

    /// The kind of a receive's errno, or `None` when the error is about the call (EBADF,
    /// EFAULT, EINVAL, ENOTSOCK): a bug, which stops the worker.
    pub fn from_errno(errno: i32) -> Option<SocketErrorKind> {
        Some(match errno {
            libc::EBADF | libc::EFAULT | libc::EINVAL | libc::ENOTSOCK => return None,
            libc::ENETUNREACH => SocketErrorKind::NetUnreachable,
            libc::EHOSTUNREACH | libc::EHOSTDOWN | libc::ENONET => SocketErrorKind::HostUnreachable,
            libc::ENOPROTOOPT => SocketErrorKind::ProtocolUnreachable,
            libc::ECONNREFUSED => SocketErrorKind::PortUnreachable,
            libc::EMSGSIZE => SocketErrorKind::FragNeeded,
            libc::EPROTO => SocketErrorKind::ParameterProblem,
            _ => SocketErrorKind::Other,
        })
    }
}

/// Path MTUs reported by the kernel that a worker has not taken yet: bounded, so a flood of
/// forged errors cannot grow it (later reports for a full list are dropped; the next error
/// about that peer reports again).
const MAX_PENDING_MTUS: usize = 64;

/// Asynchronous errors a port saw since the worker last took them.
#[derive(Debug, Default)]
pub struct SocketErrors {
    counts: [u64; SocketErrorKind::COUNT],
    path_mtus: Vec<(Ipv4Addr, u32)>,
}

impl SocketErrors {
    pub fn count(&mut self, kind: SocketErrorKind) {
        self.counts[kind as usize] += 1;
    }

    /// "Fragmentation needed" errors counted and not taken yet.
    pub fn frag_needed(&self) -> u64 {
        self.counts[SocketErrorKind::FragNeeded as usize]
    }

    /// The kernel's path MTU toward `peer` after a "fragmentation needed".
    pub fn path_mtu(&mut self, peer: Ipv4Addr, mtu: u32) {
        if let Some(e) = self.path_mtus.iter_mut().find(|(p, _)| *p == peer) {
            e.1 = mtu;
        } else if self.path_mtus.len() < MAX_PENDING_MTUS {
            self.path_mtus.push((peer, mtu));
        }
    }

    /// The counts by kind since the last call, zeroed.
    pub fn take_counts(&mut self) -> [u64; SocketErrorKind::COUNT] {
        core::mem::take(&mut self.counts)
    }

    /// The path MTUs reported since the last call.
    pub fn drain_path_mtus(&mut self) -> impl Iterator<Item = (Ipv4Addr, u32)> + '_ {
        self.path_mtus.drain(..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every errno a hard ICMP error becomes is counted, not fatal; call errors are fatal.
    #[test]
    fn test_icmp_errnos_are_kinds_and_call_errors_are_fatal() {
        for (errno, kind) in [
            (libc::ECONNREFUSED, SocketErrorKind::PortUnreachable),
            (libc::ENOPROTOOPT, SocketErrorKind::ProtocolUnreachable),
            (libc::EMSGSIZE, SocketErrorKind::FragNeeded),
            (libc::EPROTO, SocketErrorKind::ParameterProblem),
            (libc::ENONET, SocketErrorKind::HostUnreachable),
            (libc::EHOSTDOWN, SocketErrorKind::HostUnreachable),
            (libc::ENETUNREACH, SocketErrorKind::NetUnreachable),
            (libc::EOPNOTSUPP, SocketErrorKind::Other),
        ] {
            assert_eq!(
                SocketErrorKind::from_errno(errno),
                Some(kind),
                "errno {errno}"
            );
        }
        for errno in [libc::EBADF, libc::EFAULT, libc::EINVAL, libc::ENOTSOCK] {
            assert_eq!(SocketErrorKind::from_errno(errno), None, "errno {errno}");
        }
    }

    #[test]
    fn test_pending_path_mtus_are_bounded_and_kept_per_peer() {
        let mut e = SocketErrors::default();
        for i in 0..200u32 {
            e.path_mtu(Ipv4Addr::from(0x0a00_0000 + i), 1400);
        }
        e.path_mtu(Ipv4Addr::from(0x0a00_0000), 1300);
        let got: Vec<_> = e.drain_path_mtus().collect();
        assert_eq!(got.len(), MAX_PENDING_MTUS);
        assert_eq!(got[0], (Ipv4Addr::from(0x0a00_0000), 1300));
        assert_eq!(e.drain_path_mtus().count(), 0);
    }
}
