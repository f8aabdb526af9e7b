//! Connection tracking with netfilter's semantics: entries keyed by both directions' tuples,
//! TCP/UDP/ICMP state and timeouts, expiry checked on lookup plus an incremental collector, a
//! bounded table with early drop of unassured entries, and NAT bindings (an entry whose REPLY
//! tuple is not the inverse of its ORIGINAL one).
//!
//! **Sharding.** Every worker may see either direction of a flow (a TUN queue is picked by the
//! kernel's hash of the packet before NAT, an underlay socket by the outer 4-tuple), so the
//! table is shared, split into `SHARDS` independently locked shards. An entry lives in the shard
//! of its *client endpoint*: the ORIGINAL source (address, port) — for ICMP (address, id) —
//! which is also the REPLY tuple's destination unless the entry is SNATed, and SNAT picks its
//! port so that it is (the trick VPP's NAT uses to keep a flow on one thread). A packet is
//! looked up in the shard of its source endpoint (an ORIGINAL packet) and then of its
//! destination endpoint (a REPLY packet): one or two uncontended locks, no allocation.
//!
//! Time is a number of milliseconds from any origin (`now`), passed in once per batch; nothing
//! here reads a clock.

pub mod tcp;

use core::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use tcp::{FlagClass, Segment, TcpState, Transition, Window};

/// Direction of a packet relative to the connection's first packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Dir {
    Original = 0,
    Reply = 1,
}

impl Dir {
    pub fn other(self) -> Dir {
        match self {
            Dir::Original => Dir::Reply,
            Dir::Reply => Dir::Original,
        }
    }
}

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// One direction of a connection, as netfilter's `nf_conntrack_tuple` (IPv4). For TCP and UDP
/// `sport`/`dport` are ports; for ICMP queries `sport` is the identifier and `dport` the type
/// and code (`type << 8 | code`); for other protocols both are 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Conntrack zone; 0 is the default zone.
    pub zone: u16,
}

impl Tuple {
    pub fn new(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, proto: u8) -> Tuple {
        Tuple {
            src,
            dst,
            sport,
            dport,
            proto,
            zone: 0,
        }
    }

    /// The tuple of the answer to this packet: endpoints swapped; for ICMP the query type mapped
    /// to its reply type (netfilter's `invmap`) and the identifier kept. None for an ICMP type
    /// that has no reply, which therefore creates no connection.
    pub fn invert(&self) -> Option<Tuple> {
        let (sport, dport) = if self.proto == PROTO_ICMP {
            let ty = (self.dport >> 8) as u8;
            (
                self.sport,
                u16::from(icmp_inverse(ty)?) << 8 | (self.dport & 0xff),
            )
        } else {
            (self.dport, self.sport)
        };
        Some(Tuple {
            src: self.dst,
            dst: self.src,
            sport,
            dport,
            proto: self.proto,
            zone: self.zone,
        })
    }

    /// The endpoint an entry is sharded by, seen from a packet with this tuple travelling in
    /// `dir`: the ORIGINAL source, which a REPLY packet carries as its destination.
    fn client_endpoint(&self, dir: Dir) -> (Ipv4Addr, u16) {
        match (dir, self.proto) {
            (Dir::Original, _) => (self.src, self.sport),
            (Dir::Reply, PROTO_ICMP) => (self.dst, self.sport),
            (Dir::Reply, _) => (self.dst, self.dport),
        }
    }
}

/// netfilter's ICMP `invmap`: echo, timestamp, info and address-mask requests and replies.
fn icmp_inverse(ty: u8) -> Option<u8> {
    Some(match ty {
        8 => 0,
        0 => 8,
        13 => 14,
        14 => 13,
        15 => 16,
        16 => 15,
        17 => 18,
        18 => 17,
        _ => return None,
    })
}

/// Whether an ICMP type may create a connection (a request).
pub fn icmp_is_request(ty: u8) -> bool {
    matches!(ty, 8 | 13 | 15 | 17)
}

/// Timeouts in seconds, defaults as netfilter's `nf_conntrack_*_timeout*` sysctls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// Per TCP state, indexed by `TcpState as usize`.
    pub tcp: [u32; 10],
    /// TCP connections whose other side has not answered yet (`tcp_timeout_unacknowledged`).
    pub tcp_unacknowledged: u32,
    pub udp_unreplied: u32,
    /// UDP after a reply, once the flow is older than `udp_stream_after`.
    pub udp_stream: u32,
    pub udp_stream_after: u32,
    pub icmp: u32,
    pub generic: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        let mut tcp = [0; 10];
        for (s, t) in [
            (TcpState::None, 120),
            (TcpState::SynSent, 120),
            (TcpState::SynRecv, 60),
            (TcpState::Established, 432_000),
            (TcpState::FinWait, 120),
            (TcpState::CloseWait, 60),
            (TcpState::LastAck, 30),
            (TcpState::TimeWait, 120),
            (TcpState::Close, 10),
            (TcpState::SynSent2, 120),
        ] {
            tcp[s as usize] = t;
        }
        Timeouts {
            tcp,
            tcp_unacknowledged: 300,
            udp_unreplied: 30,
            udp_stream: 120,
            udp_stream_after: 2,
            icmp: 30,
            generic: 600,
        }
    }
}

/// Table configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Most entries (kube-proxy's floor for `nf_conntrack_max` by default).
    pub max_entries: usize,
    pub timeouts: Timeouts,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_entries: 131_072,
            timeouts: Timeouts::default(),
        }
    }
}

/// Number of independently locked shards (a power of two).
pub const SHARDS: usize = 64;
/// Slots early drop examines for a victim (netfilter scans 8 buckets of about 2 entries).
const EVICTION_SCAN: usize = 16;
/// SNAT port candidates tried before giving up (netfilter tries at most 248).
const SNAT_TRIES: u32 = 4096;

const SEEN_REPLY: u8 = 1;
const ASSURED: u8 = 2;
const LIVE: u8 = 4;
/// A tombstone ([`Conntrack::retire`]): its tuples stay taken, its packets are refused.
const RETIRED: u8 = 8;

/// What a service entry remembers: which service and which backend it was bound to, so that
/// packets of a flow whose backend has gone can be dropped rather than black-holed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServiceBinding {
    /// The service's ClusterIP, port and protocol.
    pub vip: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    /// The backend chosen on the first packet.
    pub backend: Ipv4Addr,
    pub backend_port: u16,
}

/// The NAT decision for a new connection: where its ORIGINAL packets go and where they seem
/// to come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NatPlan {
    /// DNAT: the new destination address and port.
    pub dnat: Option<(Ipv4Addr, u16)>,
    /// SNAT: the new source address; the table chooses the port.
    pub snat: Option<Ipv4Addr>,
    /// SNAT: the range the port must come from (masquerade to the node's address, whose
    /// other ports the kernel owns); None keeps the original port if it is free.
    pub snat_ports: Option<(u16, u16)>,
    pub service: Option<ServiceBinding>,
}

/// A tracked packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracked {
    pub dir: Dir,
    /// The connection was created by this packet.
    pub new: bool,
    /// What this packet's tuple must become (equal to its tuple when no NAT applies).
    pub to: Tuple,
    pub service: Option<ServiceBinding>,
    /// The connection has seen traffic both ways and is past its handshake.
    pub assured: bool,
    /// The connection was retired ([`Conntrack::retire`]): the packet belongs to no live
    /// connection and must not be forwarded (`to` still says what it would have become: the
    /// addresses an RST ending it at either end is sent from).
    pub retired: bool,
    /// An assured UDP flow, or an assured TCP connection in ESTABLISHED: a UDP datagram or a
    /// plain ACK segment (no SYN, FIN or RST) leaves its state as it is, so a run of them may
    /// be credited at once (`credit`).
    pub steady: bool,
}

/// Why a packet was refused by the tracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtError {
    /// netfilter would mark it INVALID: bad flag combination, a transition the table forbids,
    /// an out-of-window RST, a reply to nothing.
    Invalid,
    /// No room, and no entry that early drop may take.
    TableFull,
    /// SNAT found no free port.
    NoPort,
    /// The NAT decision refused the connection (the caller's reason).
    Refused,
}

/// The L4 facts a packet brings to the tracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp(Segment),
    Udp,
    /// An ICMP query or its reply (echo, timestamp, info, address mask).
    IcmpQuery,
    /// Any other protocol.
    Other,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    tuples: [Tuple; 2],
    /// Milliseconds.
    expires: u64,
    created: u64,
    status: u8,
    tcp_state: TcpState,
    windows: [Window; 2],
    service: Option<ServiceBinding>,
    packets: [u64; 2],
    bytes: [u64; 2],
    /// In SYN_SENT, the acknowledgment number of a REPLY ACK let through unexamined (the
    /// server's challenge ACK when it still holds an older connection on this tuple): the
    /// client's RST answering it carries this sequence number (netfilter's `last_ack`).
    challenge_ack: Option<u32>,
}

impl Entry {
    fn assured(&self) -> bool {
        self.status & ASSURED != 0
    }
    fn evictable(&self) -> bool {
        !self.assured()
            || self.status & RETIRED != 0
            || (self.tuples[0].proto == PROTO_TCP && self.tcp_state.is_closing())
    }
}

/// A snapshot of one entry, for `ctl conntrack` and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryView {
    pub original: Tuple,
    pub reply: Tuple,
    pub tcp_state: Option<TcpState>,
    pub seen_reply: bool,
    pub assured: bool,
    /// Seconds left.
    pub expires_in: u64,
    pub service: Option<ServiceBinding>,
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    /// A tombstone ([`Conntrack::retire`]).
    pub retired: bool,
}

/// Counts the tracker keeps (summed over shards by `Conntrack::counters`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub entries: u64,
    pub inserted: u64,
    pub expired: u64,
    pub early_drops: u64,
    pub table_full: u64,
    pub invalid: u64,
}

type Index = hashbrown::HashMap<Tuple, u32>;

struct Shard {
    /// Both tuples of every live entry -> `slot << 1 | dir`.
    index: Index,
    entries: Vec<Entry>,
    free: Vec<u32>,
    cap: usize,
    live: usize,
    gc_cursor: usize,
    counters: Counters,
}

impl Shard {
    fn new(cap: usize) -> Shard {
        Shard {
            index: Index::with_capacity(cap * 2),
            entries: Vec::with_capacity(cap),
            free: Vec::with_capacity(cap),
            cap,
            live: 0,
            gc_cursor: 0,
            counters: Counters::default(),
        }
    }

    fn get(&mut self, t: &Tuple, now: u64) -> Option<(usize, Dir)> {
        let v = *self.index.get(t)?;
        let slot = (v >> 1) as usize;
        if self.entries[slot].expires <= now {
            self.remove(slot);
            self.counters.expired += 1;
            return None;
        }
        let dir = if v & 1 == 0 {
            Dir::Original
        } else {
            Dir::Reply
        };
        Some((slot, dir))
    }

    fn remove(&mut self, slot: usize) {
        let e = &mut self.entries[slot];
        if e.status & LIVE == 0 {
            return;
        }
        e.status = 0;
        let [o, r] = e.tuples;
        self.index.remove(&o);
        self.index.remove(&r);
        self.free.push(slot as u32);
        self.live -= 1;
    }

    /// A free slot, reaping or early-dropping one if the shard is full.
    fn alloc(&mut self, hint: usize, now: u64) -> Option<usize> {
        if self.live >= self.cap {
            let n = self.entries.len();
            let victim = (0..EVICTION_SCAN.min(n))
                .map(|k| (hint + k) % n)
                .find(|&s| {
                    let e = &self.entries[s];
                    e.status & LIVE != 0 && (e.expires <= now || e.evictable())
                })?;
            if self.entries[victim].expires <= now {
                self.counters.expired += 1;
            } else {
                self.counters.early_drops += 1;
            }
            self.remove(victim);
        }
        if let Some(s) = self.free.pop() {
            return Some(s as usize);
        }
        if self.entries.len() < self.cap {
            self.entries.push(Entry {
                tuples: [Tuple::new(Ipv4Addr::UNSPECIFIED, 0, Ipv4Addr::UNSPECIFIED, 0, 0); 2],
                expires: 0,
                created: 0,
                status: 0,
                tcp_state: TcpState::None,
                windows: [Window::default(); 2],
                service: None,
                packets: [0; 2],
                bytes: [0; 2],
                challenge_ack: None,
            });
            return Some(self.entries.len() - 1);
        }
        None
    }
}

/// The connection table, shared by all workers.
pub struct Conntrack {
    shards: Box<[Mutex<Shard>]>,
    timeouts: Timeouts,
    seed: u64,
    gc_shard: AtomicUsize,
}

fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

impl Conntrack {
    pub fn new(config: Config) -> Conntrack {
        let per_shard = config.max_entries.div_ceil(SHARDS).max(1);
        let seed = std::collections::hash_map::RandomState::new();
        let seed = {
            use std::hash::BuildHasher;
            seed.hash_one(0x9e37_79b9_u64)
        };
        Conntrack {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Shard::new(per_shard)))
                .collect(),
            timeouts: config.timeouts,
            seed,
            gc_shard: AtomicUsize::new(0),
        }
    }

    /// Most entries the table holds.
    pub fn capacity(&self) -> usize {
        self.shards.len() * self.lock(0).cap
    }

    fn shard_of(&self, (addr, port): (Ipv4Addr, u16)) -> usize {
        let h = mix(self.seed ^ (u64::from(addr.to_bits()) << 16 | u64::from(port)));
        (h as usize) & (SHARDS - 1)
    }

    fn lock(&self, i: usize) -> std::sync::MutexGuard<'_, Shard> {
        // A worker that panicked while holding a shard leaves consistent data behind (every
        // mutation is completed before anything can panic), so poisoning is ignored.
        self.shards[i]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Tracks one packet whose tuple is `t` and whose L4 facts are `l4`, `len` bytes long.
    /// For a packet that starts a connection, `plan` decides its NAT (called under the shard's
    /// lock, at most once); `Err(())` from it refuses the connection.
    pub fn track(
        &self,
        t: &Tuple,
        l4: &L4,
        len: usize,
        now: u64,
        plan: impl FnOnce(&Tuple) -> Result<NatPlan, ()>,
    ) -> Result<Tracked, CtError> {
        let a = self.shard_of(t.client_endpoint(Dir::Original));
        let b = self.shard_of(t.client_endpoint(Dir::Reply));
        if let L4::Tcp(seg) = l4 {
            if !tcp::valid_flags(seg.flags) {
                self.lock(a).counters.invalid += 1;
                return Err(CtError::Invalid);
            }
        }
        let hit = |s: &mut Shard| {
            let (slot, dir) = s.get(t, now)?;
            Some(self.update(s, slot, dir, l4, len, now))
        };
        if let Some(r) = hit(&mut self.lock(a)) {
            return r;
        }
        if b != a {
            if let Some(r) = hit(&mut self.lock(b)) {
                return r;
            }
        }
        // Again under the lock the entry would be created under: another worker may have
        // created it meanwhile.
        let mut s = self.lock(a);
        if let Some(r) = hit(&mut s) {
            return r;
        }
        self.create(&mut s, a, t, l4, len, now, plan)
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &self,
        s: &mut Shard,
        shard: usize,
        t: &Tuple,
        l4: &L4,
        len: usize,
        now: u64,
        plan: impl FnOnce(&Tuple) -> Result<NatPlan, ()>,
    ) -> Result<Tracked, CtError> {
        let state = match l4 {
            L4::Tcp(seg) => {
                match tcp::transition(Dir::Original, FlagClass::of(seg.flags), TcpState::None) {
                    Transition::To(st) => st,
                    _ => {
                        s.counters.invalid += 1;
                        return Err(CtError::Invalid);
                    }
                }
            }
            _ => TcpState::None,
        };
        let Some(mut reply) = t.invert() else {
            s.counters.invalid += 1;
            return Err(CtError::Invalid);
        };
        if t.proto == PROTO_ICMP && !icmp_is_request((t.dport >> 8) as u8) {
            // An echo reply (or the like) to nothing.
            s.counters.invalid += 1;
            return Err(CtError::Invalid);
        }
        let nat = plan(t).map_err(|()| CtError::Refused)?;
        if let Some((addr, port)) = nat.dnat {
            reply.src = addr;
            reply.sport = port;
        }
        if let Some(addr) = nat.snat {
            reply.dst = addr;
            reply.dport = self.snat_port(s, shard, &reply, nat.snat_ports)?;
        }
        if nat.snat.is_none()
            && matches!(t.proto, PROTO_TCP | PROTO_UDP)
            && s.index.contains_key(&reply)
        {
            // The reply tuple is another connection's: the client reused a source port toward
            // another ClusterIP that chose the same backend, or went straight to a backend it
            // also reaches through a service. netfilter's null binding remaps the source port
            // then (`get_unique_tuple`); so does this, rather than dropping every SYN.
            reply.dport = self.snat_port(s, shard, &reply, None)?;
        }
        if s.index.contains_key(&reply) {
            // Still another connection's (no port left to remap to): refuse.
            s.counters.invalid += 1;
            return Err(CtError::Invalid);
        }
        let hint = (mix(self.seed ^ u64::from(t.src.to_bits())) as usize) ^ usize::from(t.sport);
        let Some(slot) = s.alloc(hint, now) else {
            s.counters.table_full += 1;
            return Err(CtError::TableFull);
        };
        let mut windows = [Window::default(); 2];
        if let L4::Tcp(seg) = l4 {
            tcp::track_window(&mut windows, Dir::Original, seg);
        }
        s.entries[slot] = Entry {
            tuples: [*t, reply],
            expires: 0,
            created: now,
            status: LIVE,
            tcp_state: state,
            windows,
            service: nat.service,
            packets: [1, 0],
            bytes: [len as u64, 0],
            challenge_ack: None,
        };
        s.entries[slot].expires = now + 1000 * u64::from(self.timeout(&s.entries[slot], now));
        s.index.insert(*t, (slot as u32) << 1);
        s.index.insert(reply, (slot as u32) << 1 | 1);
        s.live += 1;
        s.counters.inserted += 1;
        let to = reply.invert().unwrap_or(*t);
        Ok(Tracked {
            dir: Dir::Original,
            new: true,
            to: Tuple { zone: t.zone, ..to },
            service: nat.service,
            assured: false,
            retired: false,
            steady: false,
        })
    }

    /// A source port for the SNATed reply tuple `reply` (whose `dport` is the original source
    /// port) that is free and keeps the entry in this shard. Without a `range`: first the
    /// original port, then ports from a hash-derived start in the same range class as
    /// netfilter (1-511, 600-1023, 1024-65535). With one: only ports of `range`.
    fn snat_port(
        &self,
        s: &Shard,
        shard: usize,
        reply: &Tuple,
        range: Option<(u16, u16)>,
    ) -> Result<u16, CtError> {
        let orig = reply.dport;
        let (lo, hi) = match (range, orig) {
            (Some((lo, hi)), _) if lo <= hi => (u32::from(lo), u32::from(hi)),
            (Some(_), _) => return Err(CtError::NoPort),
            (None, 0..=511) => (1u32, 511u32),
            (None, 512..=1023) => (600, 1023),
            (None, _) => (1024, 65535),
        };
        let span = hi - lo + 1;
        let start =
            (mix(self.seed ^ u64::from(reply.src.to_bits()) ^ u64::from(orig)) as u32) % span;
        let keep = (lo..=hi).contains(&u32::from(orig)).then_some(orig);
        let candidates = keep
            .into_iter()
            .chain((0..SNAT_TRIES.min(span)).map(|k| (lo + (start + k) % span) as u16));
        for port in candidates {
            let t = Tuple {
                dport: port,
                ..*reply
            };
            if self.shard_of(t.client_endpoint(Dir::Reply)) == shard && !s.index.contains_key(&t) {
                return Ok(port);
            }
        }
        Err(CtError::NoPort)
    }

    /// A UDP flow that has been answered and is older than `udp_stream_after` (netfilter's
    /// `stream_ts`): it gets the long timeout and is assured.
    fn udp_is_stream(&self, e: &Entry, now: u64) -> bool {
        e.status & SEEN_REPLY != 0
            && now >= e.created + 1000 * u64::from(self.timeouts.udp_stream_after)
    }

    fn timeout(&self, e: &Entry, now: u64) -> u32 {
        let to = &self.timeouts;
        match e.tuples[0].proto {
            PROTO_TCP => {
                let t = to.tcp[e.tcp_state as usize];
                if e.status & SEEN_REPLY == 0 {
                    t.min(to.tcp_unacknowledged)
                } else {
                    t
                }
            }
            PROTO_UDP => {
                if self.udp_is_stream(e, now) {
                    to.udp_stream
                } else {
                    to.udp_unreplied
                }
            }
            PROTO_ICMP => to.icmp,
            _ => to.generic,
        }
    }

    fn update(
        &self,
        s: &mut Shard,
        slot: usize,
        dir: Dir,
        l4: &L4,
        len: usize,
        now: u64,
    ) -> Result<Tracked, CtError> {
        let mut e = s.entries[slot];
        let d = dir as usize;
        // What the packet would become: the other direction's tuple, inverted.
        let to = Tuple {
            zone: e.tuples[d].zone,
            ..e.tuples[1 - d].invert().unwrap_or(e.tuples[d])
        };
        if e.status & RETIRED != 0 {
            // Neither its state nor its expiry moves: the tombstone lasts as long as it was given.
            // Its translation is not applied; it names the address a reset comes from.
            return Ok(Tracked {
                dir,
                new: false,
                to,
                service: e.service,
                assured: false,
                retired: true,
                steady: false,
            });
        }
        if let L4::Tcp(seg) = l4 {
            let class = FlagClass::of(seg.flags);
            let old = e.tcp_state;
            match tcp::transition(dir, class, old) {
                Transition::Invalid => {
                    s.counters.invalid += 1;
                    return Err(CtError::Invalid);
                }
                Transition::Ignore => {
                    if old == TcpState::SynSent && dir == Dir::Reply && class == FlagClass::Ack {
                        e.challenge_ack = Some(seg.ack);
                    }
                }
                Transition::To(new) => {
                    let reopen = dir == Dir::Original
                        && class == FlagClass::Syn
                        && matches!(old, TcpState::TimeWait | TcpState::Close);
                    if reopen {
                        // RFC 1122 reopen: a new connection on the old tuple and NAT binding.
                        e.windows = [Window::default(); 2];
                        e.status &= !(SEEN_REPLY | ASSURED);
                        e.created = now;
                    }
                    // The client's RST answering the challenge ACK is in the old connection's
                    // sequence space, not this one's: it is let through so that the server
                    // drops its stale connection and the client's next SYN is answered.
                    let answers_challenge = old == TcpState::SynSent
                        && dir == Dir::Original
                        && class == FlagClass::Rst
                        && e.challenge_ack == Some(seg.seq);
                    e.challenge_ack = None;
                    let in_window = tcp::track_window(&mut e.windows, dir, seg);
                    if class == FlagClass::Rst && !in_window && !answers_challenge {
                        s.counters.invalid += 1;
                        return Err(CtError::Invalid);
                    }
                    if dir == Dir::Reply {
                        e.status |= SEEN_REPLY;
                    }
                    if new == TcpState::Established
                        && matches!(old, TcpState::SynRecv | TcpState::Established)
                        && e.status & SEEN_REPLY != 0
                    {
                        e.status |= ASSURED;
                    }
                    e.tcp_state = new;
                }
            }
        } else if dir == Dir::Reply {
            e.status |= SEEN_REPLY;
        }
        if e.tuples[0].proto == PROTO_UDP && self.udp_is_stream(&e, now) {
            e.status |= ASSURED;
        }
        e.packets[d] += 1;
        e.bytes[d] += len as u64;
        e.expires = now + 1000 * u64::from(self.timeout(&e, now));
        s.entries[slot] = e;
        Ok(Tracked {
            dir,
            new: false,
            to,
            service: e.service,
            assured: e.assured(),
            retired: false,
            steady: e.assured()
                && match e.tuples[0].proto {
                    PROTO_TCP => e.tcp_state == TcpState::Established,
                    PROTO_UDP => true,
                    _ => false,
                },
        })
    }

    /// Accounts `packets` more packets (`bytes` in all; for TCP, plain ACK segments, `last` the
    /// latest) of the steady connection `t` whose first packet of the run went through
    /// `track`: their counters, the window they moved, and the expiry. What `track` would have
    /// done to each, with one lock instead of one per packet. Nothing if the connection is gone.
    pub fn credit(&self, t: &Tuple, packets: u64, bytes: u64, last: Option<&Segment>, now: u64) {
        self.with_entry(t, now, |s, slot, dir| {
            let e = &mut s.entries[slot];
            let d = dir as usize;
            e.packets[d] += packets;
            e.bytes[d] += bytes;
            if let Some(seg) = last {
                tcp::track_window(&mut e.windows, dir, seg);
            }
            let secs = self.timeout(e, now);
            e.expires = now + 1000 * u64::from(secs);
        });
    }

    /// Runs `f` on the live entry that `t` names in either direction (probing the shard of
    /// each direction's client endpoint), under its shard's lock.
    fn with_entry<R>(
        &self,
        t: &Tuple,
        now: u64,
        mut f: impl FnMut(&mut Shard, usize, Dir) -> R,
    ) -> Option<R> {
        for probe in [Dir::Original, Dir::Reply] {
            let mut s = self.lock(self.shard_of(t.client_endpoint(probe)));
            if let Some((slot, dir)) = s.get(t, now) {
                return Some(f(&mut s, slot, dir));
            }
        }
        None
    }

    /// The connection a packet with tuple `t` belongs to, without touching its state: for ICMP
    /// errors, which are matched through the packet they quote. Returns `t`'s direction's tuple
    /// and the other direction's.
    pub fn find(&self, t: &Tuple, now: u64) -> Option<(Tuple, Tuple)> {
        self.with_entry(t, now, |s, slot, d| {
            let e = &s.entries[slot];
            (e.tuples[d as usize], e.tuples[1 - d as usize])
        })
    }

    /// Turns the connection a tuple of either direction names into a tombstone: a TCP
    /// connection whose service endpoint left, while its ends may still hold it. Its tuples
    /// stay taken, so a new connection that would answer from the same backend endpoint to the
    /// same client endpoint is remapped rather than meeting the old connection there; its
    /// packets are refused (`Tracked::retired`) and its state frozen. It expires after
    /// TIME_WAIT's timeout, or sooner if it was due sooner.
    pub fn retire(&self, t: &Tuple, now: u64) -> bool {
        let linger = 1000 * u64::from(self.timeouts.tcp[TcpState::TimeWait as usize]);
        self.with_entry(t, now, |s, slot, _| {
            let e = &mut s.entries[slot];
            if e.status & RETIRED == 0 {
                e.status |= RETIRED;
                e.expires = e.expires.min(now + linger);
            }
        })
        .is_some()
    }

    /// Deletes the connection a tuple of either direction names.
    pub fn remove(&self, t: &Tuple) -> bool {
        // At time 0 nothing counts as expired: the entry is removed, not reaped.
        self.with_entry(t, 0, |s, slot, _| s.remove(slot)).is_some()
    }

    /// Reaps up to `budget` slots of the next shard: expired entries always, and when the
    /// shard is at least 95 % full also unassured entries and closing TCP connections (as
    /// netfilter's collector does). Call it between batches; returns how many it removed.
    pub fn gc_step(&self, now: u64, budget: usize) -> usize {
        let i = self.gc_shard.fetch_add(1, Ordering::Relaxed) % SHARDS;
        let mut s = self.lock(i);
        let n = s.entries.len();
        if n == 0 {
            return 0;
        }
        let pressure = s.live * 100 >= s.cap * 95;
        let mut removed = 0;
        for _ in 0..budget.min(n) {
            let slot = s.gc_cursor % n;
            s.gc_cursor = (slot + 1) % n;
            let e = &s.entries[slot];
            if e.status & LIVE == 0 {
                continue;
            }
            if e.expires <= now {
                s.remove(slot);
                s.counters.expired += 1;
                removed += 1;
            } else if pressure && e.evictable() {
                s.remove(slot);
                s.counters.early_drops += 1;
                removed += 1;
            }
        }
        removed
    }

    /// Counters summed over the shards.
    pub fn counters(&self) -> Counters {
        let mut c = Counters::default();
        for i in 0..SHARDS {
            let s = self.lock(i);
            c.entries += s.live as u64;
            c.inserted += s.counters.inserted;
            c.expired += s.counters.expired;
            c.early_drops += s.counters.early_drops;
            c.table_full += s.counters.table_full;
            c.invalid += s.counters.invalid;
        }
        c
    }

    /// Every live entry (a copy; for inspection, not the hot path).
    pub fn entries(&self, now: u64) -> Vec<EntryView> {
        let mut out = Vec::new();
        for i in 0..SHARDS {
            let s = self.lock(i);
            for e in s
                .entries
                .iter()
                .filter(|e| e.status & LIVE != 0 && e.expires > now)
            {
                out.push(EntryView {
                    original: e.tuples[0],
                    reply: e.tuples[1],
                    tcp_state: (e.tuples[0].proto == PROTO_TCP).then_some(e.tcp_state),
                    seen_reply: e.status & SEEN_REPLY != 0,
                    assured: e.assured(),
                    expires_in: (e.expires - now) / 1000,
                    service: e.service,
                    packets: e.packets,
                    bytes: e.bytes,
                    retired: e.status & RETIRED != 0,
                });
            }
        }
        out
    }

    /// Memory one entry costs: the entry itself plus its two index slots at hashbrown's
    /// maximum load factor (7/8).
    pub fn bytes_per_entry() -> usize {
        let index_slot = core::mem::size_of::<(Tuple, u32)>() + 1;
        core::mem::size_of::<Entry>() + 2 * index_slot * 8 / 7 + core::mem::size_of::<u32>()
    }
}

#[cfg(test)]
mod tests;
