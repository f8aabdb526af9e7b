use super::*;

const A: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa];
const B: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb];
const C: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc];
const BCAST: [u8; 6] = [0xff; 6];
const VTEP1: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 11);
const VTEP2: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 12);

fn frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.resize(60, 0);
    f
}

fn bridge_with(ports: usize, config: Config) -> (Bridge, Vec<PortId>) {
    let mut b = Bridge::new(config, 16);
    let ids = (0..ports)
        .map(|_| b.add_port(PortOptions::default()).unwrap())
        .collect();
    (b, ids)
}

fn flood_set(b: &Bridge, from: Station) -> Vec<PortId> {
    b.flood_ports(from, &BCAST).collect()
}

#[test]
fn test_unknown_unicast_floods_then_learned_station_gets_it_alone() {
    let (mut b, p) = bridge_with(3, Config::default());
    // A (on p0) talks to unknown B: flooded to p1 and p2, and A is learned.
    assert_eq!(
        b.input(Station::Port(p[0]), &frame(B, A), 0),
        Decision::Flood
    );
    assert_eq!(flood_set(&b, Station::Port(p[0])), vec![p[1], p[2]]);
    assert_eq!(b.lookup(&A, 0), Some(Station::Port(p[0])));
    // B answers from p1: unicast to p0 only; B learned.
    assert_eq!(
        b.input(Station::Port(p[1]), &frame(A, B), 1),
        Decision::Port(p[0])
    );
    assert_eq!(
        b.input(Station::Port(p[0]), &frame(B, A), 2),
        Decision::Port(p[1])
    );
    let c = b.take_counts();
    assert_eq!((c.learned, c.flooded, c.moved), (2, 1, 0));
}

#[test]
fn test_broadcast_and_multicast_flood_to_all_but_ingress_and_to_every_vtep() {
    let (mut b, p) = bridge_with(3, Config::default());
    b.set_vteps(&[VTEP2, VTEP1, VTEP1]);
    assert_eq!(b.vteps(), &[VTEP1, VTEP2]);
    let mcast = [0x01, 0x00, 0x5e, 0, 0, 1];
    for dst in [BCAST, mcast] {
        assert_eq!(
            b.input(Station::Port(p[1]), &frame(dst, A), 0),
            Decision::Flood
        );
    }
    assert_eq!(flood_set(&b, Station::Port(p[1])), vec![p[0], p[2]]);
    assert!(Bridge::floods_to_tunnel(Station::Port(p[1])));
    // From the tunnel: every local port, never back into the tunnel.
    assert_eq!(
        b.input(Station::Remote(VTEP1), &frame(BCAST, B), 0),
        Decision::Flood
    );
    assert_eq!(flood_set(&b, Station::Remote(VTEP1)), p);
    assert!(!Bridge::floods_to_tunnel(Station::Remote(VTEP1)));
}

#[test]
fn test_remote_stations_are_learned_per_vtep_and_not_sent_back_into_the_tunnel() {
    let (mut b, p) = bridge_with(2, Config::default());
    b.set_vteps(&[VTEP1, VTEP2]);
    b.input(Station::Remote(VTEP1), &frame(BCAST, B), 0);
    assert_eq!(b.lookup(&B, 0), Some(Station::Remote(VTEP1)));
    assert_eq!(
        b.input(Station::Port(p[0]), &frame(B, A), 1),
        Decision::Remote(VTEP1)
    );
    // A frame from VTEP2 for B (behind VTEP1) would go back into the tunnel: dropped.
    assert_eq!(
        b.input(Station::Remote(VTEP2), &frame(B, C), 2),
        Decision::Drop(DropReason::Hairpin)
    );
    // B moves to VTEP2.
    b.input(Station::Remote(VTEP2), &frame(A, B), 3);
    assert_eq!(b.lookup(&B, 3), Some(Station::Remote(VTEP2)));
    assert_eq!(b.take_counts().moved, 1);
    // VTEP2 leaves the cluster: its stations go with it.
    b.set_vteps(&[VTEP1]);
    assert_eq!(b.lookup(&B, 3), None);
}

#[test]
fn test_tunnel_learning_can_be_off() {
    let config = Config {
        tunnel_learning: false,
        ..Config::default()
    };
    let (mut b, p) = bridge_with(1, config);
    b.set_vteps(&[VTEP1]);
    b.input(Station::Remote(VTEP1), &frame(BCAST, B), 0);
    assert_eq!(b.lookup(&B, 0), None);
    b.add_static(MacAddr(B), Station::Remote(VTEP1)).unwrap();
    assert_eq!(
        b.input(Station::Port(p[0]), &frame(B, A), 0),
        Decision::Remote(VTEP1)
    );
}

#[test]
fn test_a_station_moving_ports_moves_its_entry() {
    let (mut b, p) = bridge_with(3, Config::default());
    b.input(Station::Port(p[0]), &frame(BCAST, A), 0);
    b.input(Station::Port(p[2]), &frame(BCAST, A), 5);
    assert_eq!(b.lookup(&A, 5), Some(Station::Port(p[2])));
    assert_eq!(
        b.input(Station::Port(p[1]), &frame(A, B), 6),
        Decision::Port(p[2])
    );
    assert_eq!(b.take_counts().moved, 1);
    assert_eq!(b.learned(), 2);
}

#[test]
fn test_static_entries_neither_move_nor_age() {
    let (mut b, p) = bridge_with(2, Config::default());
    b.add_static(MacAddr(A), Station::Port(p[0])).unwrap();
    b.input(Station::Port(p[1]), &frame(BCAST, A), 0);
    assert_eq!(b.lookup(&A, 0), Some(Station::Port(p[0])));
    let later = 10 * Config::default().ageing_ms;
    assert_eq!(b.age(later, 1000), 0);
    assert_eq!(b.lookup(&A, later), Some(Station::Port(p[0])));
    assert!(b.remove_static(MacAddr(A)));
    assert!(!b.remove_static(MacAddr(A)));
    assert!(b.add_static(MacAddr(BCAST), Station::Port(p[0])).is_err());
    assert!(b.add_static(MacAddr(B), Station::Port(PortId(99))).is_err());
}

#[test]
fn test_ageing_with_an_injected_clock() {
    let config = Config {
        ageing_ms: 1000,
        ..Config::default()
    };
    let (mut b, p) = bridge_with(2, config);
    b.input(Station::Port(p[0]), &frame(BCAST, A), 0);
    b.input(Station::Port(p[1]), &frame(BCAST, B), 0);
    // A is seen again at 600, B is not.
    b.input(Station::Port(p[0]), &frame(BCAST, A), 600);
    assert_eq!(b.lookup(&B, 999), Some(Station::Port(p[1])));
    assert_eq!(b.lookup(&B, 1000), None, "expired on lookup");
    // Forwarding to an expired station floods again and reclaims the entry.
    assert_eq!(
        b.input(Station::Port(p[0]), &frame(B, A), 1000),
        Decision::Flood
    );
    assert_eq!(b.learned(), 1);
    // That frame refreshed A (seen at 1000); the collector reclaims it once it ages out.
    assert_eq!(b.age(1999, usize::MAX), 0);
    assert_eq!(b.age(2000, usize::MAX), 1);
    assert!(b.is_empty());
    assert_eq!(b.take_counts().aged, 2);
}

#[test]
fn test_incremental_ageing_visits_every_slot() {
    let config = Config {
        ageing_ms: 10,
        max_learned: 100,
        ..Config::default()
    };
    let (mut b, p) = bridge_with(1, config);
    for i in 0..100u8 {
        b.input(Station::Port(p[0]), &frame(BCAST, [2, 0, 0, 0, 1, i]), 0);
    }
    assert_eq!(b.learned(), 100);
    let mut removed = 0;
    for _ in 0..20 {
        removed += b.age(50, 7);
    }
    assert_eq!(removed, 100);
    assert!(b.is_empty());
}

#[test]
fn test_a_mac_flood_neither_grows_the_table_nor_evicts_static_or_known_stations() {
    let config = Config {
        max_learned: 1000,
        ..Config::default()
    };
    let (mut b, p) = bridge_with(3, config);
    b.add_static(MacAddr(C), Station::Port(p[2])).unwrap();
    b.input(Station::Port(p[1]), &frame(BCAST, B), 0);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..20_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut src = seed.to_be_bytes()[..6].try_into().unwrap();
        let src: &mut [u8; 6] = &mut src;
        src[0] &= 0xfe; // unicast
        src[0] |= 0x02;
        let d = b.input(Station::Port(p[0]), &frame(A, *src), 1);
        assert_eq!(d, Decision::Flood);
    }
    assert_eq!(b.learned(), 1000);
    assert_eq!(b.len(), 1001);
    assert!(b.take_counts().learn_refused >= 20_000 - 1000);
    assert_eq!(
        b.input(Station::Port(p[0]), &frame(C, A), 2),
        Decision::Port(p[2])
    );
    assert_eq!(
        b.input(Station::Port(p[0]), &frame(B, A), 2),
        Decision::Port(p[1])
    );
}

#[test]
fn test_hairpin_is_off_by_default_and_can_be_switched_on() {
    let mut b = Bridge::new(Config::default(), 0);
    let p0 = b.add_port(PortOptions::default()).unwrap();
    let hp = b
        .add_port(PortOptions {
            hairpin: true,
            ..PortOptions::default()
        })
        .unwrap();
    b.input(Station::Port(p0), &frame(BCAST, A), 0);
    b.input(Station::Port(p0), &frame(BCAST, B), 0);
    assert_eq!(
        b.input(Station::Port(p0), &frame(B, A), 0),
        Decision::Drop(DropReason::Hairpin)
    );
    b.input(Station::Port(hp), &frame(BCAST, C), 0);
    assert_eq!(flood_set(&b, Station::Port(hp)), vec![p0, hp]);
    b.input(Station::Port(hp), &frame(BCAST, A), 0);
    assert_eq!(
        b.input(Station::Port(hp), &frame(C, A), 0),
        Decision::Port(hp)
    );
}

#[test]
fn test_invalid_sources_short_frames_and_link_local_groups() {
    let mut b = Bridge::new(Config::default(), 0);
    let pod = b.add_port(PortOptions::default()).unwrap();
    let host = b
        .add_port(PortOptions {
            host: true,
            ..PortOptions::default()
        })
        .unwrap();
    let lldp = [0x01, 0x80, 0xc2, 0, 0, 0x0e];
    let stp = [0x01, 0x80, 0xc2, 0, 0, 0];
    assert_eq!(
        b.input(Station::Port(pod), &frame(B, BCAST), 0),
        Decision::Drop(DropReason::InvalidSourceMac)
    );
    assert_eq!(
        b.input(Station::Port(pod), &frame(B, [0; 6]), 0),
        Decision::Drop(DropReason::InvalidSourceMac)
    );
    assert_eq!(
        b.input(Station::Port(pod), &frame(B, A)[..13], 0),
        Decision::Drop(DropReason::Truncated)
    );
    assert_eq!(
        b.input(Station::Port(pod), &frame(lldp, A), 0),
        Decision::Drop(DropReason::LinkLocal)
    );
    // With no STP running, BPDUs are flooded like any multicast.
    assert_eq!(
        b.input(Station::Port(pod), &frame(stp, A), 0),
        Decision::Flood
    );
    assert_eq!(
        b.flood_ports(Station::Port(pod), &stp).collect::<Vec<_>>(),
        vec![host]
    );
    // The host port gets broadcasts but not floods of unknown unicast.
    assert_eq!(
        b.input(Station::Port(pod), &frame(C, A), 0),
        Decision::Flood
    );
    assert_eq!(b.flood_ports(Station::Port(pod), &C).count(), 0);
    // 01:80:c2:00:00:10 is outside the reserved block: an ordinary multicast.
    let not_reserved = [0x01, 0x80, 0xc2, 0, 0, 0x10];
    assert_eq!(
        b.input(Station::Port(pod), &frame(not_reserved, A), 0),
        Decision::Flood
    );
    assert!(b.is_empty() || b.lookup(&A, 0).is_some());
}

/// An Ethernet frame from `src` with `ethertype` and `payload`.
fn frame_of(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f.resize(f.len().max(60), 0);
    f
}

/// An ARP request from `sha`/`spa` for `tpa`.
fn arp(sha: [u8; 6], spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&sha);
    a.extend_from_slice(&spa.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&tpa.octets());
    frame_of(BCAST, sha, 0x0806, &a)
}

/// A UDP/IPv4 frame from `mac`/`src` to `dst`.
fn ipv4(dst_mac: [u8; 6], mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut p = Vec::new();
    etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
        .udp(1000, 2000)
        .write(&mut p, b"x")
        .unwrap();
    frame_of(dst_mac, mac, 0x0800, &p)
}

#[test]
fn test_a_bound_pod_port_accepts_only_its_pods_mac_and_address() {
    let me = Ipv4Addr::new(10, 244, 1, 10);
    let neighbour = Ipv4Addr::new(10, 244, 1, 11);
    let gw = Ipv4Addr::new(10, 244, 1, 1);
    let mut b = Bridge::new(Config::default(), 4);
    let pod = b
        .add_port(PortOptions {
            pod: Some(PodBinding {
                mac: MacAddr(A),
                ip: Some(me),
            }),
            ..PortOptions::default()
        })
        .unwrap();
    let other = b.add_port(PortOptions::default()).unwrap();
    let spoofed = Decision::Drop(DropReason::SpoofedSource);
    let from_pod = |b: &mut Bridge, f: &[u8]| b.input(Station::Port(pod), f, 0);
    // Its own MAC and address pass: ARP (and an ARP probe from 0.0.0.0), IPv4, and IPv6
    // (which carries no IPv4 source to check).
    assert_eq!(from_pod(&mut b, &arp(A, me, gw)), Decision::Flood);
    assert_eq!(
        from_pod(&mut b, &arp(A, Ipv4Addr::UNSPECIFIED, me)),
        Decision::Flood
    );
    assert_eq!(from_pod(&mut b, &ipv4(B, A, me, gw)), Decision::Flood);
    assert_eq!(
        from_pod(&mut b, &frame_of(B, A, 0x86dd, &[0x60; 40])),
        Decision::Flood
    );
    // Another MAC, in any frame; an ARP sender or IPv4 source other than its own; a sender
    // MAC in the ARP body other than the frame's; a VLAN tag hiding what is inside.
    assert_eq!(from_pod(&mut b, &frame(BCAST, C)), spoofed);
    assert_eq!(from_pod(&mut b, &ipv4(B, C, me, gw)), spoofed);
    assert_eq!(from_pod(&mut b, &arp(A, neighbour, gw)), spoofed);
    assert_eq!(from_pod(&mut b, &ipv4(B, A, neighbour, gw)), spoofed);
    assert_eq!(
        from_pod(&mut b, &ipv4(B, A, Ipv4Addr::new(8, 8, 8, 8), gw)),
        spoofed
    );
    let mut forged_sha = arp(A, me, gw);
    forged_sha[22..28].copy_from_slice(&C);
    assert_eq!(from_pod(&mut b, &forged_sha), spoofed);
    let mut tagged = vec![0, 5, 8, 0];
    tagged.extend_from_slice(&ipv4(B, A, neighbour, gw)[14..]);
    assert_eq!(from_pod(&mut b, &frame_of(B, A, 0x8100, &tagged)), spoofed);
    // Cut short where an address would be: dropped as truncated, not passed unchecked.
    assert_eq!(
        from_pod(&mut b, &ipv4(B, A, me, gw)[..20]),
        Decision::Drop(DropReason::Truncated)
    );
    // Nothing spoofed was learned: C is unknown, and so still flooded to.
    assert_eq!(b.lookup(&C, 0), None);
    // A port without a binding (the host's, or one attached before) checks nothing more.
    assert_eq!(
        b.input(Station::Port(other), &ipv4(B, C, neighbour, gw), 0),
        Decision::Flood
    );
}

#[test]
fn test_removing_a_port_flushes_its_entries_and_frees_its_id() {
    let (mut b, p) = bridge_with(3, Config::default());
    b.input(Station::Port(p[1]), &frame(BCAST, A), 0);
    b.add_static(MacAddr(B), Station::Port(p[1])).unwrap();
    b.remove_port(p[1]).unwrap();
    assert_eq!(b.lookup(&A, 0), None);
    assert_eq!(b.lookup(&B, 0), None);
    assert_eq!(flood_set(&b, Station::Port(p[0])), vec![p[2]]);
    assert_eq!(b.remove_port(p[1]), Err(BridgeError::NoSuchPort(p[1].0)));
    assert_eq!(b.remove_port(TUNNEL), Err(BridgeError::NoSuchPort(0)));
    assert_eq!(b.add_port(PortOptions::default()).unwrap(), p[1]);
    // A frame from a port that no longer exists is not forwarded.
    b.remove_port(p[2]).unwrap();
    assert_eq!(
        b.input(Station::Port(p[2]), &frame(BCAST, C), 0),
        Decision::Drop(DropReason::NoRoute)
    );
}

#[test]
fn test_entries_view_lists_dynamic_and_static_with_idle_time() {
    let (mut b, p) = bridge_with(1, Config::default());
    b.set_vteps(&[VTEP1]);
    b.input(Station::Port(p[0]), &frame(BCAST, A), 100);
    b.add_static(MacAddr(B), Station::Remote(VTEP1)).unwrap();
    let v = b.entries(400);
    assert_eq!(v.len(), 2);
    assert_eq!(v[0].mac, MacAddr(A));
    assert_eq!((v[0].kind, v[0].idle_ms), (EntryKind::Dynamic, 300));
    assert_eq!(v[1].station, Station::Remote(VTEP1));
    assert_eq!(v[1].kind, EntryKind::Static);
    assert_eq!(v[1].vni, 1);
}

#[test]
fn test_ports_are_bounded() {
    let mut b = Bridge::new(Config::default(), 0);
    for _ in 0..MAX_PORTS {
        b.add_port(PortOptions::default()).unwrap();
    }
    assert_eq!(
        b.add_port(PortOptions::default()),
        Err(BridgeError::TooManyPorts)
    );
}

#[test]
fn test_control_plane_entries_never_replace_a_ports_own() {
    let (mut b, p) = bridge_with(2, Config::default());
    b.set_vteps(&[VTEP1]);
    b.add_static(MacAddr(A), Station::Port(p[0])).unwrap();
    // A lease whose VtepMAC is a local pod's MAC: refused, counted, the pod keeps its traffic.
    assert_eq!(
        b.add_static(MacAddr(A), Station::Remote(VTEP1)),
        Err(BridgeError::LocalStation(MacAddr(A)))
    );
    assert_eq!(b.lookup(&A, 0), Some(Station::Port(p[0])));
    assert_eq!(
        b.input(Station::Port(p[1]), &frame(A, B), 0),
        Decision::Port(p[0])
    );
    assert_eq!(b.take_counts().remote_refused, 1);
    // A pod attached with a MAC the control plane had put behind a VTEP takes it over, and the
    // control plane withdrawing its entry leaves the pod's alone.
    b.add_static(MacAddr(C), Station::Remote(VTEP1)).unwrap();
    b.add_static(MacAddr(C), Station::Port(p[1])).unwrap();
    assert!(!b.remove_remote_static(MacAddr(C)));
    assert_eq!(b.lookup(&C, 0), Some(Station::Port(p[1])));
    // A control-plane entry is withdrawn as before; a learned station is no static one.
    let d = MacAddr([0x02, 0, 0, 0, 0, 0xd]);
    b.add_static(d, Station::Remote(VTEP1)).unwrap();
    assert!(b.remove_remote_static(d));
    assert_eq!(b.lookup(&d.0, 0), None);
    b.input(Station::Remote(VTEP1), &frame(BCAST, B), 0);
    assert!(!b.remove_remote_static(MacAddr(B)));
}
