//! The kernel's IPv4 neighbour table, as far as podwire needs it: which MAC answers for a
//! next hop on the underlay. An AF_XDP port writes whole Ethernet frames, so it must know the
//! peer's MAC the way the kernel's own stack would; it reads the kernel's table (an rtnetlink
//! dump, [`super::neigh_dump`]; the `/proc/net/arp` view of it where rtnetlink is refused)
//! rather than run ARP itself,
//! and asks the kernel to resolve a miss by sending it a datagram for that peer. A destination
//! off the device's subnets goes to its gateway, from the kernel's main routing table (the
//! `/proc/net/route` view of it), as the kernel's own packets would.

use super::neigh_dump::NeighDump;
use crate::wire::MacAddr;
use rustc_hash::FxHashMap;
use std::net::{Ipv4Addr, UdpSocket};
use std::time::{Duration, Instant};

/// `ATF_COM`: the entry is resolved.
const ATF_COM: u32 = 0x2;
/// Least time between two reads of the table on misses.
const REFRESH_ON_MISS: Duration = Duration::from_millis(100);
/// Re-read at least this often, so moves and expiries are noticed.
const REFRESH_ALWAYS: Duration = Duration::from_secs(1);
/// The port a resolution datagram goes to: discard, which nothing on a node serves.
const DISCARD_PORT: u16 = 9;

/// Resolved neighbours of one device.
pub struct Neighbours {
    device: String,
    table: FxHashMap<Ipv4Addr, MacAddr>,
    /// The device's routes, longest prefix first: (destination, mask, gateway or None).
    routes: Vec<Route>,
    read_at: Option<Instant>,
    /// Sends the datagram that makes the kernel resolve a missing neighbour.
    prompt: Option<UdpSocket>,
    /// Reads the table through rtnetlink (None: through `/proc/net/arp`).
    dump: Option<NeighDump>,
}

impl Neighbours {
    /// The neighbours of `device`, read on first use. `local` is the address resolution
    /// datagrams leave from.
    pub fn new(device: &str, local: Ipv4Addr) -> Neighbours {
        Neighbours {
            device: device.to_string(),
            table: FxHashMap::default(),
            routes: Vec::new(),
            read_at: None,
            prompt: UdpSocket::bind((local, 0)).ok(),
            dump: nix::net::if_::if_nametoindex(device)
                .ok()
                .and_then(|index| NeighDump::open(index).ok()),
        }
    }

    /// Called once per batch with the batch's time: re-reads the table if it is due (every
    /// second), so lookups themselves read no clock. Returns whether it did.
    pub fn tick(&mut self, now: Instant) -> bool {
        let due = self
            .read_at
            .is_none_or(|t| now.duration_since(t) >= REFRESH_ALWAYS);
        if due {
            self.refresh(now);
        }
        due
    }

    /// Whether a route of the device (not a default route, not via a gateway) reaches `ip`.
    pub fn on_link(&self, ip: Ipv4Addr) -> bool {
        let bits = ip.to_bits();
        self.routes
            .iter()
            .any(|r| r.mask != 0 && r.gateway.is_none() && bits & r.mask == r.dst)
    }

    /// Re-reads the table now (a caller that rate-limits its misses itself).
    pub fn reread(&mut self, now: Instant) {
        self.refresh(now);
    }

    /// The resolved neighbours, as last read.
    pub fn resolved(&self) -> impl Iterator<Item = (Ipv4Addr, MacAddr)> + '_ {
        self.table.iter().map(|(ip, mac)| (*ip, *mac))
    }

    /// The MAC of `ip`, if the kernel has it resolved. On a miss the table is re-read (at most
    /// every 100 ms after `now`'s [`Neighbours::tick`]) and the kernel is asked to resolve `ip`.
    pub fn lookup(&mut self, ip: Ipv4Addr, now: Instant) -> Option<MacAddr> {
        // Neighbours (the underlay's peers) are found at once; others through their gateway.
        if let Some(mac) = self.table.get(&ip) {
            return Some(*mac);
        }
        let hop = next_hop(&self.routes, ip);
        if let Some(mac) = self.table.get(&hop) {
            return Some(*mac);
        }
        if self
            .read_at
            .is_none_or(|t| now.duration_since(t) >= REFRESH_ON_MISS)
        {
            self.refresh(now);
            let hop = next_hop(&self.routes, ip);
            if let Some(mac) = self.table.get(&hop) {
                return Some(*mac);
            }
        }
        if let Some(s) = &self.prompt {
            // The kernel resolves the next hop to send this; the next hop drops it.
            let _ = s.send_to(&[], (next_hop(&self.routes, ip), DISCARD_PORT));
        }
        None
    }

    fn refresh(&mut self, now: Instant) {
        self.read_at = Some(now);
        match self.dump.as_mut().map(|d| d.read()) {
            Some(Ok(table)) => self.table = table,
            // thread-self: the namespace of this thread (a test may have entered one alone).
            _ => {
                if let Ok(text) = std::fs::read_to_string("/proc/thread-self/net/arp") {
                    self.table = parse_proc_arp(&text, &self.device);
                }
            }
        }
        if let Ok(text) = std::fs::read_to_string("/proc/thread-self/net/route") {
            self.routes = parse_proc_route(&text, &self.device);
        }
    }
}

/// A route of the device: destination, mask (host byte order) and gateway (None: on-link).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub dst: u32,
    pub mask: u32,
    pub gateway: Option<Ipv4Addr>,
}

/// The next hop towards `ip` by the longest matching route (`routes` is sorted so): its
/// gateway, or `ip` itself when it is on-link or no route matches.
pub fn next_hop(routes: &[Route], ip: Ipv4Addr) -> Ipv4Addr {
    let bits = ip.to_bits();
    routes
        .iter()
        .find(|r| bits & r.mask == r.dst)
        .and_then(|r| r.gateway)
        .unwrap_or(ip)
}

/// The routes of `device` in `/proc/net/route`'s format (the main table; addresses as the
/// kernel's network-order words printed in hex), longest prefix first:
/// `Iface Destination Gateway Flags RefCnt Use Metric Mask MTU Window IRTT`.
pub fn parse_proc_route(text: &str, device: &str) -> Vec<Route> {
    let word = |hex: &str| -> Option<u32> {
        let v = u32::from_str_radix(hex, 16).ok()?;
        Some(u32::from_be_bytes(v.to_ne_bytes()))
    };
    let mut out: Vec<Route> = text
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || f[0] != device {
                return None;
            }
            let (dst, gw, mask) = (word(f[1])?, word(f[2])?, word(f[7])?);
            Some(Route {
                dst: dst & mask,
                mask,
                gateway: (gw != 0).then(|| Ipv4Addr::from_bits(gw)),
            })
        })
        .collect();
    out.sort_by_key(|r| std::cmp::Reverse(r.mask.count_ones()));
    out
}

/// The resolved entries of `device` in `/proc/net/arp`'s format:
/// `IP address  HW type  Flags  HW address  Mask  Device`.
pub fn parse_proc_arp(text: &str, device: &str) -> FxHashMap<Ipv4Addr, MacAddr> {
    let mut out = FxHashMap::default();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [ip, _hw, flags, mac, _mask, dev] = f[..] else {
            continue;
        };
        let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).unwrap_or(0);
        if dev != device || flags & ATF_COM == 0 {
            continue;
        }
        if let (Ok(ip), Ok(mac)) = (ip.parse(), mac.parse::<MacAddr>()) {
            if mac != MacAddr::ZERO {
                out.insert(ip, mac);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_link_destinations_go_to_the_gateway() {
        // 192.168.99.0/24 on-link, default via 192.168.99.1, as a little-endian kernel prints.
        let native = |ip: [u8; 4]| format!("{:08X}", u32::from_ne_bytes(ip));
        let text = format!(
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
             eth0\t{}\t{}\t0003\t0\t0\t0\t{}\t0\t0\t0\n\
             eth0\t{}\t{}\t0001\t0\t0\t0\t{}\t0\t0\t0\n\
             eth1\t{}\t{}\t0001\t0\t0\t0\t{}\t0\t0\t0\n",
            native([0, 0, 0, 0]),
            native([192, 168, 99, 1]),
            native([0, 0, 0, 0]),
            native([192, 168, 99, 0]),
            native([0, 0, 0, 0]),
            native([255, 255, 255, 0]),
            native([10, 0, 0, 0]),
            native([0, 0, 0, 0]),
            native([255, 0, 0, 0]),
        );
        let routes = parse_proc_route(&text, "eth0");
        assert_eq!(routes.len(), 2);
        let gw = Ipv4Addr::new(192, 168, 99, 1);
        assert_eq!(
            next_hop(&routes, Ipv4Addr::new(192, 168, 99, 12)),
            Ipv4Addr::new(192, 168, 99, 12)
        );
        assert_eq!(next_hop(&routes, Ipv4Addr::new(8, 8, 8, 8)), gw);
        // Another device's route is not this device's.
        assert_eq!(next_hop(&routes, Ipv4Addr::new(10, 1, 2, 3)), gw);
        assert_eq!(
            next_hop(&[], Ipv4Addr::new(8, 8, 8, 8)),
            Ipv4Addr::new(8, 8, 8, 8)
        );
    }

    #[test]
    fn only_resolved_entries_of_the_device_count() {
        let text = "\
IP address       HW type     Flags       HW address            Mask     Device
10.99.0.2        0x1         0x2         02:00:00:00:0b:01     *        xa
10.99.0.3        0x1         0x0         00:00:00:00:00:00     *        xa
10.99.0.4        0x1         0x2         02:00:00:00:0b:04     *        eth1
10.99.0.5        0x1         0x6         02:00:00:00:0b:05     *        xa
garbage line
";
        let t = parse_proc_arp(text, "xa");
        assert_eq!(t.len(), 2);
        assert_eq!(
            t[&Ipv4Addr::new(10, 99, 0, 2)],
            "02:00:00:00:0b:01".parse().unwrap()
        );
        assert!(
            t.contains_key(&Ipv4Addr::new(10, 99, 0, 5)),
            "permanent entries too"
        );
    }
}
