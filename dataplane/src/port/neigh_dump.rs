//! The kernel's IPv4 neighbour table of one device through rtnetlink: an `RTM_GETNEIGH` dump
//! on a `NETLINK_ROUTE` socket, as `ip neigh show dev DEV` makes. The socket belongs to the
//! network namespace it was opened in, whichever thread reads it later.

use crate::wire::MacAddr;
use nix::sys::socket::{
    bind, recv, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;
use rustc_hash::FxHashMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

const NLMSG_HDR: usize = 16;
const NDMSG: usize = 12;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
/// States whose MAC the kernel itself would send to: reachable, stale, delay, probe, noarp,
/// permanent (not incomplete, failed or none).
const NUD_USABLE: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80;
const AF_INET: u8 = 2;
/// A dump's parts arrive in reads of at most this (the kernel's page-sized skbs fit).
const RECV_BUFFER: usize = 64 * 1024;

/// Why the table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NeighDumpError {
    #[error("rtnetlink: {0}")]
    Socket(#[from] nix::Error),
    #[error("rtnetlink refused the neighbour dump: errno {0}")]
    Refused(i32),
    #[error("rtnetlink dump ended early")]
    Truncated,
}

/// A rtnetlink socket for dumping one device's neighbours.
pub struct NeighDump {
    socket: OwnedFd,
    ifindex: u32,
    seq: u32,
    buffer: Vec<u8>,
}

impl NeighDump {
    /// Opens the socket in the calling thread's namespace for the device with `ifindex`.
    pub fn open(ifindex: u32) -> Result<NeighDump, NeighDumpError> {
        let socket = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        bind(socket.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        // A dump is answered at once; a kernel that does not answer must not hang a worker.
        setsockopt(&socket, sockopt::ReceiveTimeout, &TimeVal::new(0, 200_000))?;
        Ok(NeighDump {
            socket,
            ifindex,
            seq: 0,
            buffer: vec![0; RECV_BUFFER],
        })
    }

    /// The device's usable IPv4 neighbours, now.
    pub fn read(&mut self) -> Result<FxHashMap<Ipv4Addr, MacAddr>, NeighDumpError> {
        self.seq = self.seq.wrapping_add(1);
        send(
            self.socket.as_raw_fd(),
            &request(self.seq, self.ifindex),
            MsgFlags::empty(),
        )?;
        let mut table = FxHashMap::default();
        loop {
            let n = recv(self.socket.as_raw_fd(), &mut self.buffer, MsgFlags::empty())?;
            if n == 0 {
                return Err(NeighDumpError::Truncated);
            }
            if parse(&self.buffer[..n], self.seq, self.ifindex, &mut table)? {
                return Ok(table);
            }
        }
    }
}

/// An `RTM_GETNEIGH` dump request for IPv4 neighbours of `ifindex`.
pub fn request(seq: u32, ifindex: u32) -> [u8; NLMSG_HDR + NDMSG] {
    let mut m = [0u8; NLMSG_HDR + NDMSG];
    m[0..4].copy_from_slice(&((NLMSG_HDR + NDMSG) as u32).to_ne_bytes());
    m[4..6].copy_from_slice(&RTM_GETNEIGH.to_ne_bytes());
    m[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    m[NLMSG_HDR] = AF_INET;
    m[NLMSG_HDR + 4..NLMSG_HDR + 8].copy_from_slice(&ifindex.to_ne_bytes());
    m
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Adds the usable IPv4 neighbours of `ifindex` in one read of dump `seq` to `table`; true
/// when the dump is done. Messages of other dumps are skipped; anything cut short is an error.
pub fn parse(
    buf: &[u8],
    seq: u32,
    ifindex: u32,
    table: &mut FxHashMap<Ipv4Addr, MacAddr>,
) -> Result<bool, NeighDumpError> {
    let mut at = 0;
    while at + NLMSG_HDR <= buf.len() {
        let len = u32_at(buf, at) as usize;
        if len < NLMSG_HDR || at + len > buf.len() {
            return Err(NeighDumpError::Truncated);
        }
        let kind = u16_at(buf, at + 4);
        let msg = &buf[at..at + len];
        at += len.next_multiple_of(4);
        if u32_at(msg, 8) != seq {
            continue;
        }
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = msg
                    .get(NLMSG_HDR..NLMSG_HDR + 4)
                    .map_or(0, |e| i32::from_ne_bytes([e[0], e[1], e[2], e[3]]));
                return Err(NeighDumpError::Refused(-errno));
            }
            RTM_NEWNEIGH => {
                if let Some((ip, mac)) = neighbour(msg, ifindex) {
                    table.insert(ip, mac);
                }
            }
            _ => {}
        }
    }
    Ok(false)
}

/// The address and MAC of one `RTM_NEWNEIGH` message, if IPv4, of `ifindex` and usable.
fn neighbour(msg: &[u8], ifindex: u32) -> Option<(Ipv4Addr, MacAddr)> {
    let nd = msg.get(NLMSG_HDR..NLMSG_HDR + NDMSG)?;
    let state = u16_at(nd, 8);
    if nd[0] != AF_INET || u32_at(nd, 4) != ifindex || state & NUD_USABLE == 0 {
        return None;
    }
    let (mut ip, mut mac) = (None, None);
    let mut at = NLMSG_HDR + NDMSG;
    while at + 4 <= msg.len() {
        let len = usize::from(u16_at(msg, at));
        if len < 4 || at + len > msg.len() {
            return None;
        }
        let data = &msg[at + 4..at + len];
        match (u16_at(msg, at + 2), data.len()) {
            (NDA_DST, 4) => ip = Some(Ipv4Addr::new(data[0], data[1], data[2], data[3])),
            (NDA_LLADDR, 6) => mac = Some(MacAddr(data.try_into().ok()?)),
            _ => {}
        }
        at += len.next_multiple_of(4);
    }
    let mac = mac.filter(|m| *m != MacAddr::ZERO)?;
    Some((ip?, mac))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut a = ((4 + data.len()) as u16).to_ne_bytes().to_vec();
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(data);
        a.resize(a.len().next_multiple_of(4), 0);
        a
    }

    fn message(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut m = ((NLMSG_HDR + body.len()) as u32).to_ne_bytes().to_vec();
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0x2u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m
    }

    fn neigh(seq: u32, ifindex: u32, state: u16, ip: [u8; 4], mac: [u8; 6]) -> Vec<u8> {
        let mut body = vec![AF_INET, 0, 0, 0];
        body.extend_from_slice(&ifindex.to_ne_bytes());
        body.extend_from_slice(&state.to_ne_bytes());
        body.extend_from_slice(&[0, 1]);
        body.extend(attr(NDA_DST, &ip));
        body.extend(attr(NDA_LLADDR, &mac));
        body.extend(attr(8, &[0; 16])); // NDA_CACHEINFO, skipped
        message(RTM_NEWNEIGH, seq, &body)
    }

    #[test]
    fn usable_neighbours_of_the_device_are_read_and_the_rest_skipped() {
        let mac = [2, 0, 0, 0, 0, 2];
        let mut buf = neigh(7, 3, 0x02, [10, 0, 0, 2], mac); // reachable
        buf.extend(neigh(7, 3, 0x04, [10, 0, 0, 3], [2, 0, 0, 0, 0, 3])); // stale: usable
        buf.extend(neigh(7, 3, 0x01, [10, 0, 0, 4], [0; 6])); // incomplete
        buf.extend(neigh(7, 3, 0x20, [10, 0, 0, 5], [2, 0, 0, 0, 0, 5])); // failed
        buf.extend(neigh(7, 4, 0x02, [10, 0, 0, 6], [2, 0, 0, 0, 0, 6])); // another device
        buf.extend(neigh(6, 3, 0x02, [10, 0, 0, 7], [2, 0, 0, 0, 0, 7])); // another dump
        let mut table = FxHashMap::default();
        assert!(!parse(&buf, 7, 3, &mut table).unwrap(), "not done yet");
        let done = message(NLMSG_DONE, 7, &[0; 4]);
        assert!(parse(&done, 7, 3, &mut table).unwrap());
        let mut got: Vec<_> = table.into_iter().collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                (Ipv4Addr::new(10, 0, 0, 2), MacAddr(mac)),
                (Ipv4Addr::new(10, 0, 0, 3), MacAddr([2, 0, 0, 0, 0, 3])),
            ]
        );
    }

    #[test]
    fn errors_and_cut_messages_are_errors_not_panics() {
        let mut table = FxHashMap::default();
        let err = message(NLMSG_ERROR, 1, &(-22i32).to_ne_bytes());
        assert!(matches!(
            parse(&err, 1, 3, &mut table),
            Err(NeighDumpError::Refused(22))
        ));
        let good = neigh(1, 3, 0x02, [10, 0, 0, 2], [2, 0, 0, 0, 0, 2]);
        for cut in 1..good.len() {
            // Cut anywhere: an error or nothing, never a panic or a wrong entry.
            let mut t = FxHashMap::default();
            let r = parse(&good[..cut], 1, 3, &mut t);
            assert!(
                r.is_err() || t.is_empty() || cut >= good.len(),
                "cut at {cut}"
            );
        }
        let mut lying = good.clone();
        lying[NLMSG_HDR + NDMSG] = 200; // an attribute longer than the message
        parse(&lying, 1, 3, &mut table).unwrap();
        assert!(table.is_empty());
    }

    #[test]
    fn the_request_is_a_dump_of_ipv4_neighbours_of_the_device() {
        let r = request(5, 9);
        assert_eq!(u32_at(&r, 0) as usize, r.len());
        assert_eq!(u16_at(&r, 4), RTM_GETNEIGH);
        assert_eq!(u16_at(&r, 6), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(u32_at(&r, 8), 5);
        assert_eq!((r[NLMSG_HDR], u32_at(&r, NLMSG_HDR + 4)), (AF_INET, 9));
    }

    #[test]
    fn the_loopback_table_reads_through_the_kernel() {
        // Any namespace has lo (index 1); its table is empty but the dump must complete.
        let mut d = NeighDump::open(1).expect("rtnetlink socket");
        assert!(d.read().is_ok());
        assert!(d.read().is_ok(), "a second dump on the same socket");
    }
}
