//! The kernel's IPv4 neighbour table, as far as podwire needs it: which MAC answers for a
//! next hop on the underlay. An AF_XDP port writes whole Ethernet frames, so it must know the
//! peer's MAC the way the kernel's own stack would; it reads the kernel's table (the
//! `/proc/net/arp` view of it, for the calling thread's namespace) rather than run ARP itself,
//! and asks the kernel to resolve a miss by sending it a datagram for that peer.

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
    read_at: Option<Instant>,
    /// Sends the datagram that makes the kernel resolve a missing neighbour.
    prompt: Option<UdpSocket>,
}

impl Neighbours {
    /// The neighbours of `device`, read on first use. `local` is the address resolution
    /// datagrams leave from.
    pub fn new(device: &str, local: Ipv4Addr) -> Neighbours {
        Neighbours {
            device: device.to_string(),
            table: FxHashMap::default(),
            read_at: None,
            prompt: UdpSocket::bind((local, 0)).ok(),
        }
    }

    /// Called once per batch with the batch's time: re-reads the table if it is due (every
    /// second), so lookups themselves read no clock.
    pub fn tick(&mut self, now: Instant) {
        if self
            .read_at
            .is_none_or(|t| now.duration_since(t) >= REFRESH_ALWAYS)
        {
            self.refresh(now);
        }
    }

    /// The MAC of `ip`, if the kernel has it resolved. On a miss the table is re-read (at most
    /// every 100 ms after `now`'s [`Neighbours::tick`]) and the kernel is asked to resolve `ip`.
    pub fn lookup(&mut self, ip: Ipv4Addr, now: Instant) -> Option<MacAddr> {
        if let Some(mac) = self.table.get(&ip) {
            return Some(*mac);
        }
        if self
            .read_at
            .is_none_or(|t| now.duration_since(t) >= REFRESH_ON_MISS)
        {
            self.refresh(now);
            if let Some(mac) = self.table.get(&ip) {
                return Some(*mac);
            }
        }
        if let Some(s) = &self.prompt {
            // The kernel resolves the next hop to send this; the peer drops it.
            let _ = s.send_to(&[], (ip, DISCARD_PORT));
        }
        None
    }

    fn refresh(&mut self, now: Instant) {
        self.read_at = Some(now);
        // thread-self: the namespace of this thread (a test may have entered one alone).
        if let Ok(text) = std::fs::read_to_string("/proc/thread-self/net/arp") {
            self.table = parse_proc_arp(&text, &self.device);
        }
    }
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
