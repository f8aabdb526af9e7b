//! A learning Ethernet bridge, sans I/O: the forwarding database (FDB) and the decision of
//! which ports a frame leaves by. It does what the Linux bridge does with a VXLAN device as one
//! of its ports (reference: `br_fdb.c`, `br_forward.c`, `vxlan_core.c`):
//!
//! - **Learning**: a frame's source MAC is recorded against the port it came in on (per VNI).
//!   A station seen on another port moves there. Static entries never move and never age. A
//!   multicast or all-zero source is invalid and the frame is dropped, as `br_handle_frame` does.
//! - **Forwarding**: a known unicast destination leaves by its port only; an unknown one, a
//!   broadcast or a multicast is flooded to every port but the one it came in on. A frame is
//!   never sent back out its ingress port unless that port is in hairpin mode (off by default).
//!   The host port, like the Linux bridge's own device, receives broadcasts and multicasts but
//!   not floods of unknown unicast (it is not promiscuous). Link-local group addresses
//!   (01:80:c2:00:00:01 to :0f: pause, LACP, 802.1X, LLDP) are never forwarded; the STP group
//!   (:00) is flooded like any multicast, as a bridge with STP off does (`br_handle_frame`).
//! - **VXLAN**: all remote VTEPs sit behind one tunnel port, as behind a kernel `vxlan` device
//!   enslaved to the bridge. A remote MAC's entry names the VTEP (learned from the outer source
//!   of a decapsulated frame, or installed by the control plane), and flooding from a local port
//!   replicates the frame to every VTEP (head-end replication, the `00:00:00:00:00:00` entries of
//!   a kernel VXLAN FDB). A frame that came from the tunnel is never sent back into it.
//! - **Ageing**: dynamic entries expire `ageing` after they were last seen (default 300 s, the
//!   kernel's `BR_DEFAULT_AGEING_TIME`); expiry is checked on lookup, and [`Bridge::age`] reclaims
//!   expired entries a few slots at a time between batches.
//! - **Bounds**: at most `max_learned` dynamic entries (the kernel's `fdb_max_learned`). A full
//!   table learns nothing new (counted) and evicts nothing: static entries and stations already
//!   known keep working under a flood of random source MACs.
//!
//! - **Pods held to their addresses**: a port attached for a pod (`podwire ctl attach`) carries
//!   a [`PodBinding`]: frames from another source MAC, ARP from another sender MAC or address,
//!   IPv4 from another source and VLAN-tagged frames are dropped (`spoofed_source`) before
//!   anything is learned from them.
//!
//! Every table is allocated when the bridge is built, so a decision never allocates.

use crate::verdict::DropReason;
use crate::wire::ethernet;
use crate::wire::MacAddr;
use core::net::Ipv4Addr;
use hashbrown::HashMap;
use rustc_hash::FxBuildHasher;

// A verdict names a port by id: the type is the verdict module's, a leaf.
pub use crate::verdict::PortId;

/// The tunnel port: frames for remote stations leave by it, encapsulated to their VTEP.
pub const TUNNEL: PortId = PortId(0);

/// Most local ports a bridge has (the tunnel port not counted).
pub const MAX_PORTS: usize = 1023;

/// Where a station sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Station {
    /// Behind a local port.
    Port(PortId),
    /// Behind the tunnel, at this VTEP.
    Remote(Ipv4Addr),
}

impl Station {
    fn port(self) -> PortId {
        match self {
            Station::Port(p) => p,
            Station::Remote(_) => TUNNEL,
        }
    }
}

/// How an entry came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// Learned from traffic; ages and moves.
    Dynamic,
    /// Installed by configuration or the control plane; never ages or moves.
    Static,
}

/// What the bridge decided for one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Out of this local port only.
    Port(PortId),
    /// Into the tunnel, to this VTEP only.
    Remote(Ipv4Addr),
    /// Out of every port but the ingress one (and to every VTEP, unless it came from the
    /// tunnel): see [`Bridge::flood_ports`].
    Flood,
    /// Not forwarded.
    Drop(DropReason),
}

/// Bridge settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The VXLAN network identifier the bridge carries: its broadcast domain.
    pub vni: u32,
    /// How long a dynamic entry lives after it was last seen, in milliseconds.
    pub ageing_ms: u64,
    /// Most dynamic entries.
    pub max_learned: usize,
    /// Learn remote stations from decapsulated frames (a kernel VXLAN device's default; off
    /// is `nolearning`, leaving only what the control plane installs).
    pub tunnel_learning: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            vni: 1,
            ageing_ms: 300_000,
            max_learned: 65_536,
            tunnel_learning: true,
        }
    }
}

/// Per-port switches, with the Linux bridge's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortOptions {
    /// Record source MACs seen on this port (BR_LEARNING, on).
    pub learning: bool,
    /// Receive floods (BR_FLOOD, BR_BCAST_FLOOD, BR_MCAST_FLOOD, on).
    pub flood: bool,
    /// Frames may leave by the port they came in on (BR_HAIRPIN_MODE, off).
    pub hairpin: bool,
    /// The host's port: like the Linux bridge's own device, it is left out of floods of
    /// unknown unicast (broadcasts and multicasts still reach it).
    pub host: bool,
    /// The pod behind the port (`podwire ctl attach`): its frames must come from its own MAC
    /// and, for ARP and IPv4, its own address.
    pub pod: Option<PodBinding>,
}

/// The addresses a pod's port accepts as sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodBinding {
    /// The only source MAC (and ARP sender MAC) the port accepts.
    pub mac: MacAddr,
    /// The only IPv4 source and ARP sender address (besides 0.0.0.0 in an ARP probe); `None`
    /// checks MACs only.
    pub ip: Option<Ipv4Addr>,
}

impl Default for PortOptions {
    fn default() -> Self {
        PortOptions {
            learning: true,
            flood: true,
            hairpin: false,
            host: false,
            pod: None,
        }
    }
}

impl PodBinding {
    /// Whether `frame` (Ethernet, at least its header) may come from this pod: its source MAC;
    /// for ARP, the sender MAC and address; for IPv4, the source address. A VLAN tag would hide
    /// what it carries from these checks: a pod has no VLANs here, so tagged frames are refused.
    /// Other ethertypes (IPv6) are checked by MAC only.
    fn check(&self, frame: &[u8]) -> Result<(), DropReason> {
        if frame[6..12] != self.mac.0 {
            return Err(DropReason::SpoofedSource);
        }
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        let l3 = &frame[ethernet::HEADER_LEN..];
        match ethertype {
            ethernet::ethertype::ARP => {
                // htype(2) ptype(2) hlen(1) plen(1) op(2) sha(6) spa(4).
                let Some(sender) = l3.get(8..18) else {
                    return Err(DropReason::Truncated);
                };
                let spa = Ipv4Addr::new(sender[6], sender[7], sender[8], sender[9]);
                let ip_ok = match self.ip {
                    Some(ip) => spa == ip || spa.is_unspecified(),
                    None => true,
                };
                if sender[..6] != self.mac.0 || !ip_ok {
                    return Err(DropReason::SpoofedSource);
                }
            }
            ethernet::ethertype::IPV4 => {
                let Some(src) = l3.get(12..16) else {
                    return Err(DropReason::Truncated);
                };
                if self
                    .ip
                    .is_some_and(|ip| ip.octets() != [src[0], src[1], src[2], src[3]])
                {
                    return Err(DropReason::SpoofedSource);
                }
            }
            ETHERTYPE_VLAN | ETHERTYPE_QINQ => return Err(DropReason::SpoofedSource),
            _ => {}
        }
        Ok(())
    }
}

/// 802.1Q and 802.1ad tags.
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;

/// Events counted since the last [`Bridge::take_counts`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// New dynamic entries.
    pub learned: u64,
    /// Dynamic entries whose station moved to another port or VTEP.
    pub moved: u64,
    /// Dynamic entries removed by ageing (on lookup or by the collector).
    pub aged: u64,
    /// Source MACs not learned because the table was full.
    pub learn_refused: u64,
    /// Frames flooded (unknown unicast, broadcast, multicast).
    pub flooded: u64,
    /// Remote static entries refused because a local port's own static entry holds the MAC.
    pub remote_refused: u64,
}

/// One FDB entry, as `podwire ctl fdb` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryView {
    pub mac: MacAddr,
    pub vni: u32,
    pub station: Station,
    pub kind: EntryKind,
    /// Milliseconds since the station was last seen (0 for static entries).
    pub idle_ms: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    key: u64,
    station: Station,
    kind: EntryKind,
    seen_ms: u64,
}

/// The bridge: ports, FDB and the VTEPs behind the tunnel.
pub struct Bridge {
    config: Config,
    /// Local ports by index (index 0, the tunnel, is never a local port).
    ports: Vec<Option<PortOptions>>,
    /// Local ports in service, for flooding.
    active: Vec<PortId>,
    vteps: Vec<Ipv4Addr>,
    index: HashMap<u64, u32, FxBuildHasher>,
    slots: Vec<Option<Entry>>,
    free: Vec<u32>,
    dynamic: usize,
    cursor: usize,
    counts: Counts,
}

/// The FDB key: the 48 MAC bits. A bridge carries one VNI (one broadcast domain), so its
/// entries are that VNI's; another VNI is another bridge.
fn key(mac: &[u8; 6]) -> u64 {
    let mut b = [0u8; 8];
    b[2..].copy_from_slice(mac);
    u64::from_be_bytes(b)
}

fn mac_of(key: u64) -> MacAddr {
    let b = key.to_be_bytes();
    MacAddr([b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// 01:80:c2:00:00:01 to 01:80:c2:00:00:0f: IEEE 802.1D reserved, never forwarded by a bridge.
/// (:00, the STP group, is forwarded by a bridge that runs no STP.)
fn is_link_local(dst: &[u8]) -> bool {
    dst[..5] == [0x01, 0x80, 0xc2, 0x00, 0x00] && dst[5] & 0xf0 == 0 && dst[5] != 0
}

/// Ways a management request can fail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BridgeError {
    #[error("the bridge has no room for another port ({MAX_PORTS} at most)")]
    TooManyPorts,
    #[error("no such port {0}")]
    NoSuchPort(u16),
    #[error("{0} is not a unicast station address")]
    BadMac(MacAddr),
    #[error("the port's offload (virtio-net headers) differs from the bridge's other ports")]
    PortMismatch,
    #[error("{0} is a local port's own station; a remote entry cannot replace it")]
    LocalStation(MacAddr),
}

impl Bridge {
    /// Builds a bridge with room for `config.max_learned` dynamic entries and `statics` more.
    pub fn new(config: Config, statics: usize) -> Bridge {
        let room = config.max_learned + statics;
        let mut b = Bridge {
            ports: vec![None],
            active: Vec::with_capacity(16),
            vteps: Vec::new(),
            index: HashMap::with_capacity_and_hasher(room, FxBuildHasher),
            slots: Vec::with_capacity(room),
            free: Vec::with_capacity(room),
            dynamic: 0,
            cursor: 0,
            counts: Counts::default(),
            config,
        };
        b.slots.resize(room, None);
        b.free.extend((0..room as u32).rev());
        b
    }

    /// Adds a local port; returns its id (the lowest free one).
    pub fn add_port(&mut self, opts: PortOptions) -> Result<PortId, BridgeError> {
        let id = match self.ports.iter().skip(1).position(Option::is_none) {
            Some(i) => i + 1,
            None if self.ports.len() <= MAX_PORTS => {
                self.ports.push(None);
                self.ports.len() - 1
            }
            None => return Err(BridgeError::TooManyPorts),
        };
        self.ports[id] = Some(opts);
        let id = PortId(id as u16);
        self.active.push(id);
        Ok(id)
    }

    /// Removes a local port and every entry behind it, static ones included (as deleting a
    /// Linux bridge port flushes its FDB entries).
    pub fn remove_port(&mut self, id: PortId) -> Result<(), BridgeError> {
        match self.ports.get_mut(usize::from(id.0)) {
            Some(p @ Some(_)) if id != TUNNEL => *p = None,
            _ => return Err(BridgeError::NoSuchPort(id.0)),
        }
        self.active.retain(|&p| p != id);
        self.remove_where(|e| e.station == Station::Port(id));
        Ok(())
    }

    pub fn port_options(&self, id: PortId) -> Option<PortOptions> {
        self.ports.get(usize::from(id.0)).copied().flatten()
    }

    /// Sets the VTEPs behind the tunnel (every other node). Entries at a VTEP no longer listed
    /// are removed.
    pub fn set_vteps(&mut self, vteps: &[Ipv4Addr]) {
        self.vteps.clear();
        self.vteps.extend_from_slice(vteps);
        self.vteps.sort_unstable();
        self.vteps.dedup();
        let keep = self.vteps.clone();
        self.remove_where(|e| matches!(e.station, Station::Remote(ip) if !keep.contains(&ip)));
    }

    /// The VTEPs a flood from a local port is replicated to.
    pub fn vteps(&self) -> &[Ipv4Addr] {
        &self.vteps
    }

    /// Installs (or replaces) a static entry. A remote one (the control plane's: another
    /// node's host port behind its VTEP) never replaces a local port's own static entry: a
    /// lease in the store cannot take a local pod's traffic (refused, counted).
    pub fn add_static(&mut self, mac: MacAddr, station: Station) -> Result<(), BridgeError> {
        if mac.is_multicast() || mac == MacAddr::ZERO {
            return Err(BridgeError::BadMac(mac));
        }
        if let Station::Port(p) = station {
            if self.port_options(p).is_none() {
                return Err(BridgeError::NoSuchPort(p.0));
            }
        }
        let k = key(&mac.0);
        if let Some(&slot) = self.index.get(&k) {
            let e = self.slots[slot as usize]
                .as_mut()
                .expect("indexed slot is live");
            if matches!(station, Station::Remote(_))
                && e.kind == EntryKind::Static
                && matches!(e.station, Station::Port(_))
            {
                self.counts.remote_refused += 1;
                return Err(BridgeError::LocalStation(mac));
            }
            if e.kind == EntryKind::Dynamic {
                self.dynamic -= 1;
            }
            e.kind = EntryKind::Static;
            e.station = station;
            return Ok(());
        }
        self.insert(k, station, EntryKind::Static, 0);
        Ok(())
    }

    /// Removes a static entry (dynamic entries are left to ageing). True if there was one.
    pub fn remove_static(&mut self, mac: MacAddr) -> bool {
        let k = key(&mac.0);
        match self.index.get(&k) {
            Some(&slot)
                if self.slots[slot as usize].is_some_and(|e| e.kind == EntryKind::Static) =>
            {
                self.remove_slot(slot);
                true
            }
            _ => false,
        }
    }

    /// Removes a static entry behind the tunnel (the control plane's withdrawing a node's
    /// host port). A local port's entry for the same MAC, learned or static, is left alone.
    /// True if there was one.
    pub fn remove_remote_static(&mut self, mac: MacAddr) -> bool {
        let k = key(&mac.0);
        match self.index.get(&k) {
            Some(&slot)
                if self.slots[slot as usize].is_some_and(|e| {
                    e.kind == EntryKind::Static && matches!(e.station, Station::Remote(_))
                }) =>
            {
                self.remove_slot(slot);
                true
            }
            _ => false,
        }
    }

    /// Where `mac` sits, if known and not expired at `now_ms`.
    pub fn lookup(&self, mac: &[u8; 6], now_ms: u64) -> Option<Station> {
        let slot = *self.index.get(&key(mac))?;
        let e = self.slots[slot as usize]?;
        (!self.expired(&e, now_ms)).then_some(e.station)
    }

    fn expired(&self, e: &Entry, now_ms: u64) -> bool {
        e.kind == EntryKind::Dynamic && now_ms.saturating_sub(e.seen_ms) >= self.config.ageing_ms
    }

    /// Learns the frame's source and decides where the frame goes. `from` is the ingress:
    /// `Station::Port(p)` for a local port, `Station::Remote(vtep)` for a frame decapsulated
    /// from that VTEP.
    pub fn input(&mut self, from: Station, frame: &[u8], now_ms: u64) -> Decision {
        if frame.len() < ethernet::HEADER_LEN {
            return Decision::Drop(DropReason::Truncated);
        }
        let dst: &[u8; 6] = frame[0..6].try_into().expect("six bytes");
        let src: &[u8; 6] = frame[6..12].try_into().expect("six bytes");
        if src[0] & 1 != 0 || *src == [0; 6] {
            return Decision::Drop(DropReason::InvalidSourceMac);
        }
        let ingress = from.port();
        let learning = match from {
            Station::Port(p) => match self.port_options(p) {
                Some(o) => {
                    if let Some(pod) = o.pod {
                        if let Err(r) = pod.check(frame) {
                            return Decision::Drop(r);
                        }
                    }
                    o.learning
                }
                None => return Decision::Drop(DropReason::NoRoute),
            },
            Station::Remote(_) => self.config.tunnel_learning,
        };
        if learning {
            self.learn(src, from, now_ms);
        }
        if dst[0] & 1 != 0 {
            if is_link_local(dst) {
                return Decision::Drop(DropReason::LinkLocal);
            }
            self.counts.flooded += 1;
            return Decision::Flood;
        }
        match self.lookup_refresh(dst, now_ms) {
            None => {
                self.counts.flooded += 1;
                Decision::Flood
            }
            Some(to) if to.port() == ingress => {
                let hairpin = self.port_options(ingress).is_some_and(|o| o.hairpin);
                match to {
                    Station::Port(p) if hairpin => Decision::Port(p),
                    _ => Decision::Drop(DropReason::Hairpin),
                }
            }
            Some(Station::Port(p)) => Decision::Port(p),
            Some(Station::Remote(ip)) => Decision::Remote(ip),
        }
    }

    /// The local ports a flood of `frame` that came in by `from` leaves by (the VTEPs, for a
    /// flood from a local port, are [`Bridge::vteps`]).
    pub fn flood_ports<'a>(
        &'a self,
        from: Station,
        frame: &[u8],
    ) -> impl Iterator<Item = PortId> + 'a {
        let ingress = from.port();
        let unknown_unicast = frame.first().is_some_and(|b| b & 1 == 0);
        self.active.iter().copied().filter(move |&p| {
            self.port_options(p).is_some_and(|o| {
                o.flood && (p != ingress || o.hairpin) && !(unknown_unicast && o.host)
            })
        })
    }

    /// True if a flood that came in by `from` is replicated to the VTEPs.
    pub fn floods_to_tunnel(from: Station) -> bool {
        matches!(from, Station::Port(_))
    }

    fn lookup_refresh(&mut self, mac: &[u8; 6], now_ms: u64) -> Option<Station> {
        let slot = *self.index.get(&key(mac))?;
        let e = self.slots[slot as usize]?;
        if self.expired(&e, now_ms) {
            self.remove_slot(slot);
            self.counts.aged += 1;
            return None;
        }
        Some(e.station)
    }

    fn learn(&mut self, src: &[u8; 6], from: Station, now_ms: u64) {
        let k = key(src);
        if let Some(&slot) = self.index.get(&k) {
            let e = self.slots[slot as usize]
                .as_mut()
                .expect("indexed slot is live");
            if e.kind == EntryKind::Dynamic {
                if e.station != from {
                    e.station = from;
                    self.counts.moved += 1;
                }
                e.seen_ms = now_ms;
            }
            return;
        }
        if self.dynamic >= self.config.max_learned {
            self.counts.learn_refused += 1;
            return;
        }
        self.insert(k, from, EntryKind::Dynamic, now_ms);
        self.counts.learned += 1;
    }

    fn insert(&mut self, k: u64, station: Station, kind: EntryKind, now_ms: u64) {
        let Some(slot) = self.free.pop() else {
            // Only statics beyond the room reserved for them get here.
            self.slots.push(None);
            return self.insert_at((self.slots.len() - 1) as u32, k, station, kind, now_ms);
        };
        self.insert_at(slot, k, station, kind, now_ms);
    }

    fn insert_at(&mut self, slot: u32, k: u64, station: Station, kind: EntryKind, now_ms: u64) {
        self.slots[slot as usize] = Some(Entry {
            key: k,
            station,
            kind,
            seen_ms: now_ms,
        });
        self.index.insert(k, slot);
        if kind == EntryKind::Dynamic {
            self.dynamic += 1;
        }
    }

    fn remove_slot(&mut self, slot: u32) {
        if let Some(e) = self.slots[slot as usize].take() {
            self.index.remove(&e.key);
            if e.kind == EntryKind::Dynamic {
                self.dynamic -= 1;
            }
            self.free.push(slot);
        }
    }

    fn remove_where(&mut self, mut pred: impl FnMut(&Entry) -> bool) {
        for slot in 0..self.slots.len() {
            if self.slots[slot].as_ref().is_some_and(&mut pred) {
                self.remove_slot(slot as u32);
            }
        }
    }

    /// Examines up to `budget` slots from where the last call stopped and removes expired
    /// dynamic entries; returns how many it removed.
    pub fn age(&mut self, now_ms: u64, budget: usize) -> usize {
        let n = self.slots.len();
        let mut removed = 0;
        for _ in 0..budget.min(n) {
            self.cursor = (self.cursor + 1) % n;
            if let Some(e) = self.slots[self.cursor] {
                if self.expired(&e, now_ms) {
                    self.remove_slot(self.cursor as u32);
                    removed += 1;
                }
            }
        }
        self.counts.aged += removed as u64;
        removed
    }

    /// Live entries (dynamic and static).
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Dynamic entries.
    pub fn learned(&self) -> usize {
        self.dynamic
    }

    /// Returns the counts since the last call and resets them.
    pub fn take_counts(&mut self) -> Counts {
        core::mem::take(&mut self.counts)
    }

    /// Every entry that has not expired at `now_ms`, sorted by MAC.
    pub fn entries(&self, now_ms: u64) -> Vec<EntryView> {
        let mut v: Vec<EntryView> = self
            .slots
            .iter()
            .flatten()
            .filter(|e| !self.expired(e, now_ms))
            .map(|e| EntryView {
                mac: mac_of(e.key),
                vni: self.config.vni,
                station: e.station,
                kind: e.kind,
                idle_ms: match e.kind {
                    EntryKind::Dynamic => now_ms.saturating_sub(e.seen_ms),
                    EntryKind::Static => 0,
                },
            })
            .collect();
        v.sort_by_key(|e| (e.mac, e.vni));
        v
    }
}

#[cfg(test)]
mod tests;
