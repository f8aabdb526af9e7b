use super::tcp::flag::*;
use super::*;

const C: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const S: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const HAIRPIN: Ipv4Addr = Ipv4Addr::new(10, 111, 255, 254);

fn seg(flags: u8, seq: u32, ack: u32) -> L4 {
    L4::Tcp(Segment {
        flags,
        seq,
        ack,
        window: 65535,
        len: 0,
        wscale: None,
    })
}

fn no_nat(_: &Tuple) -> Result<NatPlan, ()> {
    Ok(NatPlan::default())
}

fn fwd() -> Tuple {
    Tuple::new(C, 40000, S, 80, PROTO_TCP)
}

fn rev() -> Tuple {
    Tuple::new(S, 80, C, 40000, PROTO_TCP)
}

fn state(ct: &Conntrack, now: u64) -> (TcpState, bool, u64) {
    let e = &ct.entries(now)[0];
    (e.tcp_state.unwrap(), e.assured, e.expires_in)
}

/// A handshake at t=0: SYN, SYN-ACK, ACK.
fn handshake(ct: &Conntrack) {
    ct.track(&fwd(), &seg(SYN, 100, 0), 60, 0, no_nat).unwrap();
    ct.track(&rev(), &seg(SYN | ACK, 500, 101), 60, 0, no_nat)
        .unwrap();
    ct.track(&fwd(), &seg(ACK, 101, 501), 52, 0, no_nat)
        .unwrap();
}

#[test]
fn test_tcp_handshake_states_timeouts_and_assured() {
    let ct = Conntrack::new(Config::default());
    let t = ct.track(&fwd(), &seg(SYN, 100, 0), 60, 0, no_nat).unwrap();
    assert!(t.new && t.dir == Dir::Original && t.to == fwd());
    assert_eq!(state(&ct, 0), (TcpState::SynSent, false, 120));
    let t = ct
        .track(&rev(), &seg(SYN | ACK, 500, 101), 60, 0, no_nat)
        .unwrap();
    assert!(!t.new && t.dir == Dir::Reply && t.to == rev());
    assert_eq!(state(&ct, 0), (TcpState::SynRecv, false, 60));
    let t = ct
        .track(&fwd(), &seg(ACK, 101, 501), 52, 0, no_nat)
        .unwrap();
    assert!(t.assured);
    assert_eq!(state(&ct, 0), (TcpState::Established, true, 432_000));
    ct.track(&fwd(), &seg(FIN | ACK, 101, 501), 52, 0, no_nat)
        .unwrap();
    assert_eq!(state(&ct, 0).0, TcpState::FinWait);
    ct.track(&rev(), &seg(FIN | ACK, 501, 102), 52, 0, no_nat)
        .unwrap();
    assert_eq!(state(&ct, 0), (TcpState::LastAck, true, 30));
    ct.track(&fwd(), &seg(ACK, 102, 502), 52, 0, no_nat)
        .unwrap();
    assert_eq!(state(&ct, 0), (TcpState::TimeWait, true, 120));
    assert_eq!(ct.counters().entries, 1);
}

#[test]
fn test_expiry_is_checked_on_lookup_with_an_injected_clock() {
    let ct = Conntrack::new(Config::default());
    ct.track(&fwd(), &seg(SYN, 100, 0), 60, 0, no_nat).unwrap();
    // 119.999 s later the SYN_SENT entry still answers the SYN-ACK ...
    assert!(ct
        .track(&rev(), &seg(SYN | ACK, 500, 101), 60, 119_999, no_nat)
        .is_ok());
    // ... and SYN_RECV lasts 60 s from there.
    let later = 119_999 + 60_000;
    // The reply-direction ACK then has no connection, and the table says it is invalid.
    assert_eq!(
        ct.track(&rev(), &seg(ACK, 501, 101), 52, later, no_nat),
        Ok(Tracked {
            dir: Dir::Original,
            new: true,
            to: rev(),
            service: None,
            assured: false,
            retired: false,
            steady: false
        }),
        "an ACK with no entry is picked up mid-stream as a new connection"
    );
    assert_eq!(ct.counters().expired, 1);
}

#[test]
fn test_udp_unreplied_then_stream_timeouts() {
    let ct = Conntrack::new(Config::default());
    let o = Tuple::new(C, 5000, S, 53, PROTO_UDP);
    let r = o.invert().unwrap();
    ct.track(&o, &L4::Udp, 40, 0, no_nat).unwrap();
    assert_eq!(ct.entries(0)[0].expires_in, 30);
    let t = ct.track(&r, &L4::Udp, 40, 1000, no_nat).unwrap();
    assert_eq!((t.dir, t.assured), (Dir::Reply, false));
    assert_eq!(ct.entries(1000)[0].expires_in, 30);
    // Past udp_stream_after (2 s): 120 s and assured.
    let t = ct.track(&o, &L4::Udp, 40, 2500, no_nat).unwrap();
    assert!(t.assured);
    assert_eq!(ct.entries(2500)[0].expires_in, 120);
    // Unreplied flows die after 30 s.
    let lone = Tuple::new(C, 5001, S, 53, PROTO_UDP);
    ct.track(&lone, &L4::Udp, 40, 0, no_nat).unwrap();
    assert!(ct.find(&lone, 29_999).is_some());
    assert!(ct.find(&lone, 30_000).is_none());
}

#[test]
fn test_icmp_echo_creates_and_reply_matches_but_a_lone_reply_is_invalid() {
    let ct = Conntrack::new(Config::default());
    let req = Tuple::new(C, 77, S, 8 << 8, PROTO_ICMP);
    let rep = Tuple::new(S, 77, C, 0, PROTO_ICMP);
    assert_eq!(req.invert(), Some(rep));
    ct.track(&req, &L4::IcmpQuery, 84, 0, no_nat).unwrap();
    let t = ct.track(&rep, &L4::IcmpQuery, 84, 10, no_nat).unwrap();
    assert_eq!(t.dir, Dir::Reply);
    assert_eq!(ct.entries(10)[0].expires_in, 30);
    let stray = Tuple::new(S, 78, C, 0, PROTO_ICMP);
    assert_eq!(
        ct.track(&stray, &L4::IcmpQuery, 84, 10, no_nat),
        Err(CtError::Invalid)
    );
}

#[test]
fn test_invalid_flags_and_transitions_are_refused() {
    let ct = Conntrack::new(Config::default());
    // SYN+FIN, no flags, FIN without ACK: invalid before any lookup.
    for flags in [SYN | FIN, 0, FIN, SYN | RST] {
        assert_eq!(
            ct.track(&fwd(), &seg(flags, 1, 0), 40, 0, no_nat),
            Err(CtError::Invalid)
        );
    }
    // A SYN-ACK or an RST or a FIN creates nothing.
    for flags in [SYN | ACK, RST, FIN | ACK] {
        assert_eq!(
            ct.track(&fwd(), &seg(flags, 1, 0), 40, 0, no_nat),
            Err(CtError::Invalid)
        );
    }
    assert_eq!(ct.counters().entries, 0);
    // ACK before the SYN-ACK: invalid, entry kept.
    ct.track(&fwd(), &seg(SYN, 100, 0), 60, 0, no_nat).unwrap();
    assert_eq!(
        ct.track(&fwd(), &seg(ACK, 101, 1), 52, 0, no_nat),
        Err(CtError::Invalid)
    );
    assert_eq!(state(&ct, 0).0, TcpState::SynSent);
    assert!(ct.counters().invalid >= 8);
}

#[test]
fn test_out_of_window_rst_is_invalid_and_keeps_the_connection() {
    let ct = Conntrack::new(Config::default());
    handshake(&ct);
    let far = L4::Tcp(Segment {
        flags: RST,
        seq: 501 + 50_000_000,
        ack: 0,
        window: 0,
        len: 0,
        wscale: None,
    });
    assert_eq!(ct.track(&rev(), &far, 40, 1, no_nat), Err(CtError::Invalid));
    assert_eq!(state(&ct, 1).0, TcpState::Established);
    ct.track(&rev(), &seg(RST | ACK, 501, 101), 40, 2, no_nat)
        .unwrap();
    assert_eq!(state(&ct, 2), (TcpState::Close, true, 10));
}

#[test]
fn test_an_rst_answering_a_challenge_ack_in_syn_sent_passes() {
    let ct = Conntrack::new(Config::default());
    ct.track(&fwd(), &seg(SYN, 100, 0), 60, 0, no_nat).unwrap();
    // The server still holds an older connection on this tuple: it answers the SYN with an ACK
    // in that connection's sequence space (RFC 5961's challenge ACK), which is let through.
    ct.track(&rev(), &seg(ACK, 7_000_000, 3_000_000), 40, 0, no_nat)
        .unwrap();
    assert_eq!(state(&ct, 0).0, TcpState::SynSent);
    // An RST that far from the SYN is invalid ...
    assert_eq!(
        ct.track(&fwd(), &seg(RST, 3_000_001, 0), 40, 0, no_nat),
        Err(CtError::Invalid)
    );
    // ... unless it is the client's answer to that ACK (RFC 793: its sequence number is the
    // ACK's acknowledgment), which must reach the server to clear the stale connection.
    ct.track(&fwd(), &seg(RST, 3_000_000, 0), 40, 0, no_nat)
        .unwrap();
    assert_eq!(state(&ct, 0).0, TcpState::Close);
    // The client's next SYN reopens the entry.
    ct.track(&fwd(), &seg(SYN, 100, 0), 60, 1000, no_nat)
        .unwrap();
    assert_eq!(state(&ct, 1000).0, TcpState::SynSent);
}

#[test]
fn test_a_retired_connection_keeps_its_tuples_refuses_its_packets_and_expires() {
    let ct = Conntrack::new(Config::default());
    let to_s = |_: &Tuple| {
        Ok(NatPlan {
            dnat: Some((S, 80)),
            ..Default::default()
        })
    };
    let via = Tuple::new(C, 40000, VIP, 80, PROTO_TCP);
    ct.track(&via, &seg(SYN, 100, 0), 60, 0, to_s).unwrap();
    ct.track(&rev(), &seg(SYN | ACK, 500, 101), 60, 0, no_nat)
        .unwrap();
    ct.track(&via, &seg(ACK, 101, 501), 52, 0, no_nat).unwrap();
    assert!(ct.retire(&rev(), 1000), "either direction names it");
    for (t, l4) in [(via, seg(ACK, 101, 501)), (rev(), seg(FIN | ACK, 501, 101))] {
        let got = ct.track(&t, &l4, 52, 2000, no_nat).unwrap();
        assert!(got.retired && !got.new && !got.steady, "{got:?}");
    }
    let e = &ct.entries(2000)[0];
    assert!(
        e.retired && e.tcp_state == Some(TcpState::Established),
        "frozen"
    );
    // Another ClusterIP, from the same client port to the same backend: the tombstone's reply
    // tuple is taken, so the new connection is remapped instead of meeting the old one.
    let other = Tuple::new(C, 40000, Ipv4Addr::new(10, 96, 0, 11), 80, PROTO_TCP);
    let got = ct
        .track(&other, &seg(SYN, 9000, 0), 60, 2000, to_s)
        .unwrap();
    assert!(got.new && !got.retired && got.to.dst == S && got.to.sport != 40000);
    // The tombstone lasts TIME_WAIT's 120 s from its retirement.
    assert_eq!(ct.entries(120_999).len(), 2);
    let left = ct.entries(121_000);
    assert_eq!((left.len(), left[0].original), (1, other));
}

#[test]
fn test_dnat_translates_both_directions() {
    let ct = Conntrack::new(Config::default());
    let o = Tuple::new(C, 40000, VIP, 80, PROTO_TCP);
    let binding = ServiceBinding {
        vip: VIP,
        port: 80,
        proto: PROTO_TCP,
        backend: S,
        backend_port: 8080,
    };
    let t = ct
        .track(&o, &seg(SYN, 1, 0), 60, 0, |_| {
            Ok(NatPlan {
                dnat: Some((S, 8080)),
                snat: None,
                snat_ports: None,
                service: Some(binding),
            })
        })
        .unwrap();
    assert_eq!(t.to, Tuple::new(C, 40000, S, 8080, PROTO_TCP));
    assert_eq!(t.service, Some(binding));
    let reply = Tuple::new(S, 8080, C, 40000, PROTO_TCP);
    let t = ct
        .track(&reply, &seg(SYN | ACK, 9, 2), 60, 0, |_| panic!("no new"))
        .unwrap();
    assert_eq!(t.dir, Dir::Reply);
    assert_eq!(t.to, Tuple::new(VIP, 80, C, 40000, PROTO_TCP));
    // The un-NATed reverse tuple is no connection of ours.
    assert!(ct
        .find(&Tuple::new(VIP, 80, C, 40000, PROTO_TCP), 0)
        .is_none());
}

#[test]
fn test_a_reply_tuple_clash_remaps_the_source_port_as_netfilter() {
    // The client reuses port 40000 toward a second ClusterIP whose choice is the same backend:
    // both connections' replies would be S:8080 -> C:40000.
    let ct = Conntrack::new(Config::default());
    let dnat = |_: &Tuple| {
        Ok(NatPlan {
            dnat: Some((S, 8080)),
            ..NatPlan::default()
        })
    };
    let first = Tuple::new(C, 40000, VIP, 80, PROTO_TCP);
    ct.track(&first, &seg(SYN, 1, 0), 60, 0, dnat).unwrap();
    let vip2 = Ipv4Addr::new(10, 96, 0, 20);
    let second = Tuple::new(C, 40000, vip2, 80, PROTO_TCP);
    let t = ct.track(&second, &seg(SYN, 7, 0), 60, 0, dnat).unwrap();
    assert_eq!((t.to.src, t.to.dst, t.to.dport), (C, S, 8080));
    assert_ne!(t.to.sport, 40000, "the source port is remapped");
    // Each backend answer goes back to its own connection, from its own ClusterIP.
    let back = |port| Tuple::new(S, 8080, C, port, PROTO_TCP);
    let r = ct
        .track(&back(40000), &seg(SYN | ACK, 9, 2), 60, 0, |_| {
            panic!("no new")
        })
        .unwrap();
    assert_eq!(r.to, Tuple::new(VIP, 80, C, 40000, PROTO_TCP));
    let r = ct
        .track(&back(t.to.sport), &seg(SYN | ACK, 9, 8), 60, 0, |_| {
            panic!("no new")
        })
        .unwrap();
    assert_eq!(r.to, Tuple::new(vip2, 80, C, 40000, PROTO_TCP));
    // The client's next packet on the second connection keeps the remapped port.
    let again = ct
        .track(&second, &seg(ACK, 8, 10), 52, 0, |_| panic!("no new"))
        .unwrap();
    assert_eq!(again.to, t.to);
}

#[test]
fn test_snat_picks_a_port_in_the_same_shard_and_never_clashes() {
    let ct = Conntrack::new(Config::default());
    let mut ports = std::collections::HashSet::new();
    for sport in 40000..40200u16 {
        let o = Tuple::new(S, sport, VIP, 80, PROTO_TCP);
        let t = ct
            .track(&o, &seg(SYN, 1, 0), 60, 0, |_| {
                Ok(NatPlan {
                    dnat: Some((S, 8080)),
                    snat: Some(HAIRPIN),
                    snat_ports: None,
                    service: None,
                })
            })
            .unwrap();
        assert_eq!((t.to.src, t.to.dst, t.to.dport), (HAIRPIN, S, 8080));
        assert!(ports.insert(t.to.sport), "port {} reused", t.to.sport);
        assert!(t.to.sport >= 1024);
        // The backend's answer finds the entry and goes back to the client from the VIP.
        let back = Tuple::new(S, 8080, HAIRPIN, t.to.sport, PROTO_TCP);
        let r = ct
            .track(&back, &seg(SYN | ACK, 9, 2), 60, 0, |_| panic!("no new"))
            .unwrap();
        assert_eq!(r.to, Tuple::new(VIP, 80, S, sport, PROTO_TCP));
    }
}

#[test]
fn test_snat_in_a_port_range_uses_only_it_and_says_when_it_is_spent() {
    let ct = Conntrack::new(Config::default());
    let node = Ipv4Addr::new(192, 168, 99, 11);
    let outside = Ipv4Addr::new(192, 168, 99, 200);
    let (lo, hi) = (61000u16, 61063u16);
    let plan = |_: &Tuple| {
        Ok(NatPlan {
            dnat: None,
            snat: Some(node),
            snat_ports: Some((lo, hi)),
            service: None,
        })
    };
    let mut ports = std::collections::HashSet::new();
    let mut spent = 0;
    for sport in 40000..40200u16 {
        let o = Tuple::new(C, sport, outside, 443, PROTO_TCP);
        match ct.track(&o, &seg(SYN, 1, 0), 60, 0, plan) {
            Ok(t) => {
                assert_eq!((t.to.src, t.to.dst), (node, outside));
                assert!((lo..=hi).contains(&t.to.sport), "port {}", t.to.sport);
                assert!(ports.insert(t.to.sport), "port {} twice", t.to.sport);
            }
            Err(e) => {
                assert_eq!(e, CtError::NoPort);
                spent += 1;
            }
        }
    }
    // Every port of the range that maps to a connection's shard can be had; no more.
    assert!(
        ports.len() <= 64 && ports.len() >= 64 / SHARDS,
        "{}",
        ports.len()
    );
    assert_eq!(spent, 200 - ports.len());
    // Another destination has the whole range again: the same connections all fit.
    let other = Ipv4Addr::new(192, 168, 99, 201);
    let fit = (40000..40200u16)
        .filter(|&sport| {
            let o = Tuple::new(C, sport, other, 443, PROTO_TCP);
            ct.track(&o, &seg(SYN, 1, 0), 60, 0, plan).is_ok()
        })
        .count();
    assert_eq!(fit, ports.len());
}

#[test]
fn test_full_table_early_drops_unassured_and_keeps_established() {
    let ct = Conntrack::new(Config {
        max_entries: SHARDS * 8,
        ..Config::default()
    });
    handshake(&ct);
    // A SYN flood from many sources.
    let mut full = 0;
    for i in 0..20_000u32 {
        let src = Ipv4Addr::from_bits(0x0a00_0000 + i);
        let t = Tuple::new(src, 1000 + (i % 50_000) as u16, S, 80, PROTO_TCP);
        if ct.track(&t, &seg(SYN, i, 0), 60, 5, no_nat) == Err(CtError::TableFull) {
            full += 1;
        }
    }
    let c = ct.counters();
    assert!(c.entries <= ct.capacity() as u64);
    assert!(c.early_drops > 10_000, "{c:?}");
    assert_eq!(full, c.table_full as usize);
    // The established connection survived the flood.
    let t = ct
        .track(&fwd(), &seg(ACK, 101, 501), 52, 6, no_nat)
        .unwrap();
    assert!(!t.new && t.assured);
}

#[test]
fn test_table_full_of_assured_entries_drops_the_new_packet() {
    let ct = Conntrack::new(Config {
        max_entries: SHARDS,
        ..Config::default()
    });
    let mut refused = 0;
    for i in 0..2000u32 {
        let src = Ipv4Addr::from_bits(0x0a00_0000 + i);
        let o = Tuple::new(src, 5000, S, 53, PROTO_UDP);
        if ct.track(&o, &L4::Udp, 40, 0, no_nat).is_err() {
            refused += 1;
            continue;
        }
        ct.track(&o.invert().unwrap(), &L4::Udp, 40, 3000, no_nat)
            .unwrap();
        ct.track(&o, &L4::Udp, 40, 3000, no_nat).unwrap();
    }
    let c = ct.counters();
    assert_eq!(c.entries, ct.capacity() as u64);
    assert_eq!(refused as u64, c.table_full);
    assert!(refused > 1000);
}

#[test]
fn test_gc_reaps_expired_entries_incrementally() {
    let ct = Conntrack::new(Config::default());
    for i in 0..1000u32 {
        let o = Tuple::new(Ipv4Addr::from_bits(0x0a00_0000 + i), 5000, S, 53, PROTO_UDP);
        ct.track(&o, &L4::Udp, 40, 0, no_nat).unwrap();
    }
    assert_eq!(ct.gc_step(29_000, 1_000_000), 0);
    let mut removed = 0;
    for _ in 0..SHARDS {
        removed += ct.gc_step(31_000, 1_000_000);
    }
    assert_eq!(removed, 1000);
    assert_eq!(ct.counters().entries, 0);
}

#[test]
fn test_concurrent_workers_share_the_table() {
    let ct = std::sync::Arc::new(Conntrack::new(Config::default()));
    let hs: Vec<_> = (0..4u16)
        .map(|w| {
            let ct = ct.clone();
            std::thread::spawn(move || {
                for i in 0..2000u16 {
                    let o = Tuple::new(C, 1024 + w * 2000 + i, S, 80, PROTO_UDP);
                    ct.track(&o, &L4::Udp, 40, 0, no_nat).unwrap();
                    ct.track(&o.invert().unwrap(), &L4::Udp, 40, 0, no_nat)
                        .unwrap();
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    assert_eq!(ct.counters().entries, 8000);
    assert!(ct.entries(0).iter().all(|e| e.seen_reply));
}

#[test]
fn test_entry_is_compact() {
    // netfilter's nf_conn is about 300 bytes.
    assert!(
        Conntrack::bytes_per_entry() < 300,
        "{}",
        Conntrack::bytes_per_entry()
    );
}
