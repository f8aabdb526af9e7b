use super::*;
use crate::conntrack::PROTO_TCP;
use std::collections::BTreeSet;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn local() -> Ipv4Net {
    "10.244.1.0/24".parse().unwrap()
}

fn ep(last: u8, node: u8) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 244, node, last), 8080)
}

fn spec(endpoints: Vec<SocketAddrV4>, affinity: Option<u32>) -> ServiceSpec {
    ServiceSpec {
        name: "default/web".into(),
        cluster_ip: VIP,
        port: 80,
        proto: PROTO_TCP,
        endpoints,
        affinity_timeout: affinity,
        node_port: None,
        ..Default::default()
    }
}

/// A node that SNATs outside clients (no steering of its pods' answers), at `cluster_ip`.
fn cluster(cluster_ip: Ipv4Addr) -> External {
    External {
        cluster_ip,
        clients_kept: false,
        network: network(),
    }
}

fn network() -> Ipv4Net {
    "10.244.0.0/16".parse().unwrap()
}

fn options() -> ServiceOptions {
    ServiceOptions::new(DEFAULT_SERVICE_CIDR.parse().unwrap())
}

fn conn(client_last: u8, sport: u16) -> Tuple {
    Tuple::new(
        Ipv4Addr::new(10, 244, 1, client_last),
        sport,
        VIP,
        80,
        PROTO_TCP,
    )
}

#[test]
fn test_hairpin_address_is_the_last_usable_of_the_cidr() {
    assert_eq!(options().hairpin_ip, Ipv4Addr::new(10, 111, 255, 254));
}

#[test]
fn test_plan_spreads_over_endpoints_and_snats_local_ones() {
    let eps = vec![ep(2, 2), ep(3, 2), ep(2, 1)];
    let s = Services::build(options(), vec![spec(eps.clone(), None)]).unwrap();
    let aff = Affinity::default();
    let mut count = std::collections::HashMap::new();
    for sport in 1024..4024u16 {
        let p = s.plan(&conn(2, sport), local(), &aff, 0).unwrap();
        let (ip, port) = p.dnat.unwrap();
        *count.entry(ip).or_insert(0) += 1;
        assert_eq!(port, 8080);
        assert_eq!(p.snat.is_some(), ip == Ipv4Addr::new(10, 244, 1, 2));
        if let Some(snat) = p.snat {
            assert_eq!(snat, s.options().hairpin_ip);
        }
        // The same connection always gets the same backend (Maglev, no state).
        assert_eq!(
            s.plan(&conn(2, sport), local(), &aff, 9).unwrap().dnat,
            p.dnat
        );
    }
    assert_eq!(count.len(), 3);
    for (_, n) in count {
        assert!((850..1150).contains(&n), "{n} of 3000");
    }
    assert!(aff.is_empty(0));
}

/// Two nodes that hold the same endpoints in any order choose the same backend for every
/// connection: Maglev's table does not depend on the order endpoints arrive in.
#[test]
fn test_maglev_choice_does_not_depend_on_endpoint_order() {
    let eps = vec![ep(2, 2), ep(3, 2), ep(2, 1), ep(9, 3), ep(4, 3)];
    let choices = |eps: Vec<SocketAddrV4>| -> Vec<Option<(Ipv4Addr, u16)>> {
        let s = Services::build(options(), vec![spec(eps, None)]).unwrap();
        let aff = Affinity::default();
        (1024..3024u16)
            .map(|sport| s.plan(&conn(2, sport), local(), &aff, 0).unwrap().dnat)
            .collect()
    };
    let first = choices(eps.clone());
    let mut reordered = eps.clone();
    reordered.reverse();
    assert_eq!(choices(reordered), first, "reversed");
    let mut rotated = eps;
    rotated.rotate_left(2);
    assert_eq!(choices(rotated), first, "rotated");
}

#[test]
fn test_unknown_service_and_service_without_endpoints() {
    let s = Services::build(options(), vec![spec(vec![], None)]).unwrap();
    let aff = Affinity::default();
    assert_eq!(
        s.plan(&conn(2, 1), local(), &aff, 0),
        Err(NoBackend::NoEndpoints)
    );
    let other = Tuple::new(Ipv4Addr::new(10, 244, 1, 2), 1, VIP, 81, PROTO_TCP);
    assert_eq!(s.plan(&other, local(), &aff, 0), Err(NoBackend::NoService));
}

#[test]
fn test_client_ip_affinity_sticks_until_timeout() {
    let eps = vec![ep(2, 2), ep(3, 2), ep(2, 3)];
    let s = Services::build(options(), vec![spec(eps, Some(10))]).unwrap();
    let aff = Affinity::default();
    let first = s.plan(&conn(2, 1000), local(), &aff, 0).unwrap().dnat;
    for sport in 1001..1200 {
        // Every new connection within the timeout renews it and sticks.
        let now = u64::from(sport - 1000) * 40;
        assert_eq!(
            s.plan(&conn(2, sport), local(), &aff, now).unwrap().dnat,
            first
        );
    }
    // After 10 s of silence the client is free again: over many clients the choice spreads.
    let mut seen = std::collections::HashSet::new();
    for client in 3..60 {
        seen.insert(
            s.plan(&conn(client, 7), local(), &aff, 100_000)
                .unwrap()
                .dnat,
        );
    }
    assert_eq!(seen.len(), 3);
    assert_eq!(aff.len(100_000), 57);
    assert_eq!(aff.len(200_000), 0);
}

#[test]
fn test_affinity_moves_off_a_removed_backend() {
    let eps = vec![ep(2, 2), ep(3, 2)];
    let s = Services::build(options(), vec![spec(eps.clone(), Some(100))]).unwrap();
    let aff = Affinity::default();
    let (ip, port) = s.plan(&conn(2, 1), local(), &aff, 0).unwrap().dnat.unwrap();
    let rest: Vec<_> = eps.into_iter().filter(|e| *e.ip() != ip).collect();
    let s2 = Services::build(options(), vec![spec(rest.clone(), Some(100))]).unwrap();
    let p = s2.plan(&conn(2, 2), local(), &aff, 1).unwrap();
    assert_eq!(p.dnat, Some((*rest[0].ip(), rest[0].port())));
    // And the old binding is reported dead.
    let old = ServiceBinding {
        vip: VIP,
        port: 80,
        proto: PROTO_TCP,
        backend: ip,
        backend_port: port,
    };
    assert!(s.binding_alive(&old));
    assert!(!s2.binding_alive(&old));
    assert!(s2.binding_alive(&p.service.unwrap()));
}

#[test]
fn test_random_algorithm_spreads_too() {
    let mut o = options();
    o.algorithm = Algorithm::Random;
    let s = Services::build(o, vec![spec(vec![ep(2, 2), ep(3, 2)], None)]).unwrap();
    let aff = Affinity::default();
    let picks: std::collections::HashSet<_> = (0..200u64)
        .map(|i| s.plan(&conn(2, 5), local(), &aff, i).unwrap().dnat)
        .collect();
    assert_eq!(picks.len(), 2);
}

#[test]
fn test_build_rejects_bad_services() {
    let mut outside = spec(vec![], None);
    outside.cluster_ip = Ipv4Addr::new(10, 244, 0, 1);
    assert!(matches!(
        Services::build(options(), vec![outside]),
        Err(ServiceError::OutsideCidr { .. })
    ));
    let dup = vec![spec(vec![], None), spec(vec![ep(2, 2)], None)];
    assert!(matches!(
        Services::build(options(), dup),
        Err(ServiceError::Duplicate { .. })
    ));
    let mut sctp = spec(vec![], None);
    sctp.proto = 132;
    assert!(matches!(
        Services::build(options(), vec![sctp]),
        Err(ServiceError::Protocol { .. })
    ));
    assert!(matches!(
        Services::build(options(), vec![spec(vec![], Some(86_401))]),
        Err(ServiceError::AffinityTimeout { .. })
    ));
    let mut port_zero = spec(vec![], None);
    port_zero.port = 0;
    assert!(matches!(
        Services::build(options(), vec![port_zero]),
        Err(ServiceError::PortZero { .. })
    ));
    let mut hairpin = spec(vec![], None);
    hairpin.cluster_ip = options().hairpin_ip;
    assert!(matches!(
        Services::build(options(), vec![hairpin]),
        Err(ServiceError::HairpinAddress { .. })
    ));
}

fn named(name: &str, last: u8, endpoints: Vec<SocketAddrV4>) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, last),
        ..spec(endpoints, None)
    }
}

#[test]
fn test_one_bad_service_among_good_ones_applies_the_good_ones() {
    let mut outside = named("default/bad", 12, vec![ep(2, 2)]);
    outside.cluster_ip = Ipv4Addr::new(10, 244, 0, 1);
    let specs = vec![
        named("default/a", 10, vec![ep(2, 2)]),
        outside,
        named("default/c", 11, vec![ep(3, 2)]),
    ];
    let (s, report) = Services::admit(options(), &Admission::default(), specs);
    assert_eq!(s.len(), 2, "{report:?}");
    assert!(matches!(
        &report.rejected[..],
        [ServiceError::OutsideCidr { name, .. }] if name == "default/bad"
    ));
    let aff = Affinity::default();
    let to = |last: u8| {
        Tuple::new(
            Ipv4Addr::new(10, 244, 1, 2),
            5,
            Ipv4Addr::new(10, 96, 0, last),
            80,
            PROTO_TCP,
        )
    };
    assert_eq!(
        s.plan(&to(10), local(), &aff, 0).unwrap().dnat,
        Some((Ipv4Addr::new(10, 244, 2, 2), 8080))
    );
    assert_eq!(
        s.plan(&to(11), local(), &aff, 0).unwrap().dnat,
        Some((Ipv4Addr::new(10, 244, 2, 3), 8080))
    );
}

#[test]
fn test_duplicates_go_to_the_first_by_name_whatever_the_order() {
    let a = named("a/web", 10, vec![ep(2, 2)]);
    let z = named("z/web", 10, vec![ep(3, 2)]);
    for specs in [vec![a.clone(), z.clone()], vec![z.clone(), a.clone()]] {
        let (s, report) = Services::admit(options(), &Admission::default(), specs);
        assert_eq!(s.len(), 1);
        assert_eq!(s.specs().next().unwrap().name, "a/web");
        assert!(matches!(
            &report.rejected[..],
            [ServiceError::Duplicate { a, b, .. }] if a == "a/web" && b == "z/web"
        ));
    }
    // Two services on one NodePort: the second by name keeps its ClusterIP, not the NodePort.
    let mut x = named("a/x", 10, vec![ep(2, 2)]);
    x.node_port = Some(30_080);
    let mut y = named("b/y", 11, vec![ep(3, 2)]);
    y.node_port = Some(30_080);
    let (s, report) = Services::admit(options(), &Admission::default(), vec![y, x]);
    assert_eq!(s.len(), 2);
    assert!(matches!(
        &report.node_ports_refused[..],
        [ServiceError::DuplicateNodePort { a, b, port: 30_080 }] if a == "a/x" && b == "b/y"
    ));
    let aff = Affinity::default();
    let t = Tuple::new(
        Ipv4Addr::new(192, 0, 2, 1),
        5,
        Ipv4Addr::new(192, 168, 0, 1),
        30_080,
        PROTO_TCP,
    );
    let p = s
        .plan_node_port(&t, local(), cluster(local().addr()), &aff, 0)
        .unwrap();
    assert_eq!(p.service.unwrap().vip, Ipv4Addr::new(10, 96, 0, 10));
}

/// The node of these tests: PublicIP 192.168.0.1, lease 10.244.1.0/24 of 10.244.0.0/16.
fn node_admission() -> Admission {
    Admission {
        node_addrs: vec![
            Ipv4Addr::new(192, 168, 0, 1),
            Ipv4Addr::new(10, 244, 1, 0),
            Ipv4Addr::new(10, 244, 1, 1),
        ],
        pod_network: Some(("10.244.0.0/16".parse().unwrap(), 24)),
        ..Admission::default()
    }
}

#[test]
fn test_endpoints_refused_as_kube_apiserver_and_the_node_refuse_them() {
    let at = |a: u8, b: u8, c: u8, d: u8| SocketAddrV4::new(Ipv4Addr::new(a, b, c, d), 8080);
    let bad = [
        (at(0, 0, 0, 0), BadAddress::Unspecified),
        (at(0, 1, 2, 3), BadAddress::Unspecified),
        (at(127, 0, 0, 1), BadAddress::Loopback),
        (at(127, 9, 9, 9), BadAddress::Loopback),
        (at(169, 254, 169, 254), BadAddress::LinkLocal),
        (at(224, 0, 0, 5), BadAddress::Multicast),
        (at(239, 1, 2, 3), BadAddress::Multicast),
        (at(255, 255, 255, 255), BadAddress::Reserved),
        (at(240, 0, 0, 1), BadAddress::Reserved),
        (at(10, 244, 2, 255), BadAddress::Broadcast),
        (at(192, 168, 0, 1), BadAddress::Node),
        (at(10, 244, 1, 0), BadAddress::Node),
        (at(10, 244, 1, 1), BadAddress::Node),
        (at(10, 96, 0, 99), BadAddress::ServiceRange),
        (at(10, 111, 255, 254), BadAddress::ServiceRange),
    ];
    let good = vec![ep(2, 2), ep(3, 1), at(192, 168, 0, 2)];
    let mut eps: Vec<SocketAddrV4> = bad.iter().map(|(e, _)| *e).collect();
    eps.extend(&good);
    eps.push(SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 9), 0));
    let (s, report) = Services::admit(options(), &node_admission(), vec![spec(eps, None)]);
    assert_eq!(s.len(), 1);
    assert!(report.rejected.is_empty());
    let mut kept = good.clone();
    kept.sort_unstable(); // endpoints are kept sorted, for Maglev
    assert_eq!(s.specs().next().unwrap().endpoints, kept);
    assert_eq!(report.endpoints_removed.len(), bad.len() + 1, "{report:?}");
    for ((e, why), got) in bad.iter().zip(&report.endpoints_removed) {
        assert_eq!(
            got,
            &ServiceError::EndpointAddress {
                name: "default/web".into(),
                endpoint: *e,
                why: *why
            }
        );
    }
    assert!(matches!(
        report.endpoints_removed.last(),
        Some(ServiceError::EndpointPortZero { .. })
    ));
    // A removed endpoint is no backend of the service.
    let loopback = ServiceBinding {
        vip: VIP,
        port: 80,
        proto: PROTO_TCP,
        backend: Ipv4Addr::LOCALHOST,
        backend_port: 8080,
    };
    assert!(!s.binding_alive(&loopback));
}

#[test]
fn test_a_service_left_without_endpoints_refuses_connections() {
    let eps = vec![SocketAddrV4::new(Ipv4Addr::LOCALHOST, 22)];
    let (s, report) = Services::admit(options(), &node_admission(), vec![spec(eps, None)]);
    assert_eq!((s.len(), report.endpoints_removed.len()), (1, 1));
    assert_eq!(
        s.plan(&conn(2, 1), local(), &Affinity::default(), 0),
        Err(NoBackend::NoEndpoints)
    );
}

#[test]
fn test_node_ports_outside_the_range_or_on_podwires_own_ports_are_refused() {
    let with_port = |name: &str, last: u8, port: u16| ServiceSpec {
        node_port: Some(port),
        ..named(name, last, vec![ep(2, 2)])
    };
    let specs = vec![
        with_port("default/ssh", 10, 22),
        with_port("default/etcd", 11, 2379),
        with_port("default/kubelet", 12, 10_250),
        with_port("default/zero", 13, 0),
        with_port("default/web", 14, 30_080),
    ];
    let (s, report) = Services::admit(options(), &node_admission(), specs.clone());
    // Every service keeps its ClusterIP; only default/web has a NodePort.
    assert_eq!(s.len(), 5);
    assert_eq!(
        s.node_ports().collect::<Vec<_>>(),
        vec![(PROTO_TCP, 30_080)]
    );
    let refused: Vec<_> = report
        .node_ports_refused
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert_eq!(refused.len(), 4, "{refused:?}");
    assert!(
        refused[0].contains("NodePort 2379 is outside the NodePort range 30000-32767"),
        "{refused:?}"
    );
    assert!(matches!(
        report.node_ports_refused[1],
        ServiceError::NodePortRange { port: 10_250, .. }
    ));
    assert!(matches!(
        report.node_ports_refused[2],
        ServiceError::NodePortRange { port: 22, .. }
    ));
    assert!(matches!(
        report.node_ports_refused[3],
        ServiceError::NodePortZero { .. }
    ));
    let aff = Affinity::default();
    let ssh_vip = Tuple::new(
        Ipv4Addr::new(10, 244, 1, 2),
        5,
        Ipv4Addr::new(10, 96, 0, 10),
        80,
        PROTO_TCP,
    );
    assert!(s.plan(&ssh_vip, local(), &aff, 0).is_ok());
    let ssh = Tuple::new(
        Ipv4Addr::new(192, 0, 2, 1),
        5,
        Ipv4Addr::new(192, 168, 0, 1),
        22,
        PROTO_TCP,
    );
    assert_eq!(
        s.plan_node_port(&ssh, local(), cluster(local().addr()), &aff, 0),
        Err(NoBackend::NoService)
    );

    // A wider range lets the operator's choice through, never podwire's own ports.
    let wide = Admission {
        node_port_range: PortRange::new(1, 65_535).unwrap(),
        own_ports: vec![
            (PortRange::one(8472).unwrap(), OwnPort::Backend),
            (PortRange::one(9100).unwrap(), OwnPort::Healthz),
            (PortRange::new(61_000, 65_535).unwrap(), OwnPort::Masquerade),
        ],
        ..node_admission()
    };
    let specs = vec![
        with_port("default/a", 10, 8472),
        with_port("default/b", 11, 9100),
        with_port("default/c", 12, 62_000),
        with_port("default/d", 13, 2379),
    ];
    let (s, report) = Services::admit(options(), &wide, specs);
    assert_eq!(s.len(), 4);
    assert_eq!(s.node_ports().collect::<Vec<_>>(), vec![(PROTO_TCP, 2379)]);
    let own: Vec<_> = report
        .node_ports_refused
        .iter()
        .map(|e| match e {
            ServiceError::NodePortOwn { port, what, .. } => (*port, *what),
            other => panic!("{other}"),
        })
        .collect();
    assert_eq!(
        own,
        vec![
            (8472, OwnPort::Backend),
            (9100, OwnPort::Healthz),
            (62_000, OwnPort::Masquerade)
        ]
    );
}

#[test]
fn test_strict_build_fails_on_any_problem_admit_reports() {
    let eps = vec![ep(2, 2), SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080)];
    assert!(matches!(
        Services::build(options(), vec![spec(eps, None)]),
        Err(ServiceError::EndpointAddress {
            why: BadAddress::Loopback,
            ..
        })
    ));
    let mut ssh = spec(vec![ep(2, 2)], None);
    ssh.node_port = Some(22);
    assert!(matches!(
        Services::build(options(), vec![ssh]),
        Err(ServiceError::NodePortRange { port: 22, .. })
    ));
}

#[test]
fn test_port_range_parses_as_kube_apiserver_writes_it() {
    assert_eq!(
        "30000-32767".parse::<PortRange>().unwrap(),
        DEFAULT_NODE_PORT_RANGE
    );
    assert_eq!(DEFAULT_NODE_PORT_RANGE.to_string(), "30000-32767");
    assert_eq!(
        "1-65535".parse::<PortRange>().unwrap(),
        PortRange::new(1, 65_535).unwrap()
    );
    assert_eq!(
        "32767-30000".parse::<PortRange>(),
        Err(PortRangeError::Reversed {
            first: 32_767,
            last: 30_000
        })
    );
    assert_eq!("0-100".parse::<PortRange>(), Err(PortRangeError::Zero));
    for bad in ["30000", "1-65536", "a-b", "-5", ""] {
        assert!(
            matches!(bad.parse::<PortRange>(), Err(PortRangeError::Syntax(_))),
            "{bad}"
        );
    }
    let r = PortRange::new(30_000, 30_002).unwrap();
    assert!(r.contains(30_000) && r.contains(30_002) && !r.contains(30_003) && !r.contains(29_999));
}

fn binding_of(p: &NatPlan) -> ServiceBinding {
    p.service.expect("a service connection")
}

/// kube-proxy's `CategorizeEndpoints`: serving-terminating endpoints take new connections only
/// when no ready endpoint exists; connections bound to one carry on while it terminates.
#[test]
fn test_terminating_endpoints_are_a_fallback_and_keep_their_connections() {
    let ready = ep(2, 2);
    let leaving = ep(3, 2);
    let aff = Affinity::default();
    // Both ready: connections land on both.
    let s = Services::build(options(), vec![spec(vec![ready, leaving], None)]).unwrap();
    let on_leaving: Vec<NatPlan> = (1024..1124)
        .map(|sport| s.plan(&conn(2, sport), local(), &aff, 0).unwrap())
        .filter(|p| p.dnat == Some((*leaving.ip(), leaving.port())))
        .collect();
    assert!(!on_leaving.is_empty());
    // `leaving` starts terminating: no new connection goes to it, old ones stay alive.
    let terminating = ServiceSpec {
        terminating: vec![leaving],
        ..spec(vec![ready], None)
    };
    let s = Services::build(options(), vec![terminating.clone()]).unwrap();
    for sport in 2000..2300 {
        let p = s.plan(&conn(2, sport), local(), &aff, 0).unwrap();
        assert_eq!(p.dnat, Some((*ready.ip(), ready.port())));
    }
    assert!(on_leaving.iter().all(|p| s.binding_alive(&binding_of(p))));
    // The ready endpoint goes too: the terminating one takes new connections.
    let s = Services::build(
        options(),
        vec![ServiceSpec {
            endpoints: vec![],
            ..terminating
        }],
    )
    .unwrap();
    let p = s.plan(&conn(2, 3000), local(), &aff, 0).unwrap();
    assert_eq!(p.dnat, Some((*leaving.ip(), leaving.port())));
    // Gone from the slice altogether: its connections are not alive any more.
    let s = Services::build(options(), vec![spec(vec![ready], None)]).unwrap();
    assert!(!s.binding_alive(&binding_of(&on_leaving[0])));
}

/// A sticky client whose backend starts terminating moves to a ready one.
#[test]
fn test_affinity_does_not_keep_a_terminating_backend_while_ready_ones_exist() {
    let (a, b) = (ep(2, 2), ep(3, 2));
    let aff = Affinity::default();
    let s = Services::build(options(), vec![spec(vec![a, b], Some(100))]).unwrap();
    let (ip, port) = s.plan(&conn(2, 1), local(), &aff, 0).unwrap().dnat.unwrap();
    let stuck = SocketAddrV4::new(ip, port);
    let other = if stuck == a { b } else { a };
    let s = Services::build(
        options(),
        vec![ServiceSpec {
            terminating: vec![stuck],
            ..spec(vec![other], Some(100))
        }],
    )
    .unwrap();
    for sport in 2..20 {
        let p = s.plan(&conn(2, sport), local(), &aff, 1).unwrap();
        assert_eq!(p.dnat, Some((*other.ip(), other.port())));
    }
}

/// `internalTrafficPolicy: Local`: only this node's endpoints (ready, else terminating); with
/// none here but some elsewhere the connection is dropped, with none anywhere rejected.
#[test]
fn test_internal_traffic_policy_local() {
    let here = Admission {
        local_subnet: Some(local()),
        ..Admission::default()
    };
    let local_spec = |endpoints, terminating| ServiceSpec {
        internal_local: true,
        terminating,
        ..spec(endpoints, None)
    };
    let aff = Affinity::default();
    let build = |s: ServiceSpec| {
        let (services, report) = Services::admit(options(), &here, vec![s]);
        assert!(report.is_empty(), "{report:?}");
        services
    };
    // Endpoints here and elsewhere: always the one here.
    let s = build(local_spec(vec![ep(2, 2), ep(3, 2), ep(5, 1)], vec![]));
    for sport in 1024..1324 {
        let p = s.plan(&conn(2, sport), local(), &aff, 0).unwrap();
        assert_eq!(p.dnat, Some((Ipv4Addr::new(10, 244, 1, 5), 8080)));
    }
    // Here only a terminating one, elsewhere ready ones: the local terminating one.
    let s = build(local_spec(vec![ep(2, 2)], vec![ep(5, 1)]));
    let p = s.plan(&conn(2, 1), local(), &aff, 0).unwrap();
    assert_eq!(p.dnat, Some((Ipv4Addr::new(10, 244, 1, 5), 8080)));
    // None here: dropped; none anywhere: rejected.
    let s = build(local_spec(vec![ep(2, 2)], vec![]));
    assert_eq!(
        s.plan(&conn(2, 1), local(), &aff, 0),
        Err(NoBackend::NoLocalEndpoints)
    );
    let s = build(local_spec(vec![], vec![]));
    assert_eq!(
        s.plan(&conn(2, 1), local(), &aff, 0),
        Err(NoBackend::NoEndpoints)
    );
    // NodePort traffic follows the external policy (Cluster): remote endpoints too.
    let s = build(ServiceSpec {
        node_port: Some(30080),
        ..local_spec(vec![ep(2, 2)], vec![])
    });
    let outside = Tuple::new(
        Ipv4Addr::new(192, 168, 0, 9),
        5,
        local().addr(),
        30080,
        PROTO_TCP,
    );
    assert!(s
        .plan_node_port(&outside, local(), cluster(local().addr()), &aff, 0)
        .is_ok());
}

/// `externalTrafficPolicy: Local`: an outside client's connection goes to this node's endpoints
/// only, seen from the client itself where the node steers its pods' answers into podwire
/// (else from the hairpin address), and is dropped with none here; pods' traffic to the
/// ClusterIP still reaches every endpoint. The health check counts the local endpoints.
#[test]
fn test_external_traffic_policy_local() {
    let here = Admission {
        local_subnet: Some(local()),
        ..Admission::default()
    };
    let aff = Affinity::default();
    let etp_local = |endpoints| ServiceSpec {
        node_port: Some(30080),
        external_local: true,
        health_check_node_port: Some(30081),
        ..spec(endpoints, None)
    };
    let build = |s: ServiceSpec| {
        let (services, report) = Services::admit(options(), &here, vec![s]);
        assert!(report.is_empty(), "{report:?}");
        services
    };
    let client = Ipv4Addr::new(192, 168, 0, 9);
    let outside = |sport| Tuple::new(client, sport, local().addr(), 30080, PROTO_TCP);
    let kept = External {
        cluster_ip: local().addr(),
        clients_kept: true,
        network: network(),
    };
    let s = build(etp_local(vec![ep(2, 2), ep(3, 2), ep(5, 1)]));
    for sport in 1024..1324 {
        let p = s
            .plan_node_port(&outside(sport), local(), kept, &aff, 0)
            .unwrap();
        assert_eq!(p.dnat, Some((Ipv4Addr::new(10, 244, 1, 5), 8080)));
        assert_eq!(p.snat, None, "the client's address is kept");
        let p = s
            .plan_node_port(&outside(sport), local(), cluster(local().addr()), &aff, 0)
            .unwrap();
        assert_eq!(p.dnat, Some((Ipv4Addr::new(10, 244, 1, 5), 8080)));
        assert_eq!(
            p.snat,
            Some(options().hairpin_ip),
            "no steering: hairpin SNAT"
        );
    }
    let pods: BTreeSet<_> = (1024..1324)
        .map(|sport| s.plan(&conn(2, sport), local(), &aff, 0).unwrap().dnat)
        .collect();
    assert_eq!(pods.len(), 3, "pods use every endpoint: {pods:?}");
    assert_eq!(
        s.health_checks(),
        &[HealthCheck {
            port: 30081,
            service: "default/web".into(),
            local_endpoints: 1
        }]
    );
    let s = build(etp_local(vec![ep(2, 2), ep(3, 2)]));
    assert_eq!(
        s.plan_node_port(&outside(1), local(), kept, &aff, 0),
        Err(NoBackend::NoLocalEndpoints)
    );
    assert_eq!(s.health_checks()[0].local_endpoints, 0);
    // A pod of the cluster network reaching the NodePort over the wire (a DirectRouting
    // node's) follows the Cluster policy, as kube-proxy short-circuits pod traffic.
    let pod = Tuple::new(
        Ipv4Addr::new(10, 244, 7, 2),
        1,
        local().addr(),
        30080,
        PROTO_TCP,
    );
    let p = s.plan_node_port(&pod, local(), kept, &aff, 0).unwrap();
    assert_eq!(p.snat, Some(local().addr()));
    // A terminating endpoint here serves (none is ready here) but does not count: the node
    // fails its health check, so the load balancer drains it.
    let s = build(ServiceSpec {
        terminating: vec![ep(5, 1)],
        ..etp_local(vec![ep(2, 2)])
    });
    let p = s
        .plan_node_port(&outside(1), local(), kept, &aff, 0)
        .unwrap();
    assert_eq!(p.dnat, Some((Ipv4Addr::new(10, 244, 1, 5), 8080)));
    assert_eq!(s.health_checks()[0].local_endpoints, 0);
    // Cluster policy: remote endpoints too, SNATed to the node's cluster address; and no
    // health check (kube-apiserver clears it).
    let s = build(ServiceSpec {
        external_local: false,
        ..etp_local(vec![ep(2, 2)])
    });
    let p = s
        .plan_node_port(&outside(1), local(), kept, &aff, 0)
        .unwrap();
    assert_eq!(p.snat, Some(local().addr()));
    assert!(s.health_checks().is_empty());
}

/// Health-check ports are checked as NodePorts are, and shared only by one Service's ports.
#[test]
fn test_health_check_ports_are_admitted_like_node_ports() {
    let with = |name: &str, port: u16, node_port: Option<u16>, hc: u16| ServiceSpec {
        name: name.into(),
        port,
        node_port,
        external_local: true,
        health_check_node_port: Some(hc),
        ..spec(vec![ep(5, 1)], None)
    };
    let here = Admission {
        local_subnet: Some(local()),
        ..Admission::default()
    };
    let (s, report) = Services::admit(
        options(),
        &here,
        vec![
            with("default/a:http", 80, None, 30500),
            ServiceSpec {
                endpoints: vec![ep(5, 1), ep(6, 1), ep(7, 2)],
                ..with("default/a:https", 443, None, 30500)
            },
            with("default/b", 81, None, 30500),
            with("default/c", 82, Some(30600), 30700),
            with("default/d", 83, None, 30600),
            with("default/e", 84, None, 80),
        ],
    );
    let ports: Vec<(u16, &str)> = s
        .health_checks()
        .iter()
        .map(|h| (h.port, h.service.as_str()))
        .collect();
    assert_eq!(ports, [(30500, "default/a"), (30700, "default/c")]);
    // 10.244.1.5 behind both ports, 10.244.1.6 behind one: two addresses here.
    assert_eq!(s.health_checks()[0].local_endpoints, 2);
    let refused: Vec<String> = report
        .node_ports_refused
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert_eq!(refused.len(), 3, "{refused:?}");
    assert!(refused[0].contains("NodePort 80 is outside"), "{refused:?}");
    assert!(
        refused[1].contains("default/b: health check port 30500 is taken by default/a"),
        "{refused:?}"
    );
    assert!(
        refused[2].contains("default/d: health check port 30600 is taken by default/c"),
        "{refused:?}"
    );
}

/// An update rebuilds the Maglev tables of the services whose endpoints changed only, and
/// what it reuses decides exactly as a fresh build would.
#[test]
fn test_an_update_reuses_the_tables_of_unchanged_services_only() {
    let first = vec![
        named("a/one", 1, vec![ep(2, 2), ep(3, 2)]),
        named("a/two", 2, vec![ep(4, 2), ep(5, 3)]),
    ];
    let (before, _) = Services::admit(options(), &node_admission(), first.clone());
    let mut second = first;
    second[1].endpoints.push(ep(6, 3));
    let (after, _) =
        Services::admit_after(Some(&before), options(), &node_admission(), second.clone());
    let (fresh, _) = Services::admit(options(), &node_admission(), second);
    let pick = |s: &Services, i: usize| Arc::clone(&s.services[i].cluster);
    assert!(Arc::ptr_eq(&pick(&before, 0), &pick(&after, 0)));
    assert!(!Arc::ptr_eq(&pick(&before, 1), &pick(&after, 1)));
    let aff = Affinity::default();
    for (i, last) in [(0usize, 1u8), (1, 2)] {
        let vip = Ipv4Addr::new(10, 96, 0, last);
        for sport in 1024..2024u16 {
            let t = Tuple::new(Ipv4Addr::new(10, 244, 1, 9), sport, vip, 80, PROTO_TCP);
            let planned = |s: &Services| s.plan(&t, local(), &aff, 0).unwrap().dnat;
            assert_eq!(
                planned(&after),
                planned(&fresh),
                "service {i}, port {sport}"
            );
        }
    }
    // Built for another node's lease (what is local differs), nothing is reused.
    let other = Admission {
        local_subnet: Some("10.244.9.0/24".parse().unwrap()),
        ..node_admission()
    };
    let (elsewhere, _) = Services::admit_after(
        Some(&before),
        options(),
        &other,
        vec![named("a/one", 1, vec![ep(2, 2), ep(3, 2)])],
    );
    assert!(!Arc::ptr_eq(&pick(&before, 0), &pick(&elsewhere, 0)));
}

/// An external IP (externalIPs, a load balancer's ingress IP) serves the port as the
/// ClusterIP does: from pods as the ClusterIP (no SNAT to a remote backend), from outside the
/// cluster network SNATed to the node's cluster address so that the answer comes back here.
#[test]
fn test_external_ips_serve_the_port_from_pods_and_from_outside() {
    let ext = Ipv4Addr::new(192, 0, 2, 10);
    let lb = Ipv4Addr::new(198, 51, 100, 10);
    let network: Ipv4Net = "10.244.0.0/16".parse().unwrap();
    let node_cluster_ip = Ipv4Addr::new(10, 244, 1, 0);
    let mut web = spec(vec![ep(2, 2)], None);
    web.external_ips = vec![lb, ext, ext];
    let s = Services::build(options(), vec![web]).unwrap();
    assert_eq!(s.external_ips(), [ext, lb]);
    assert!(s.is_frontend(ext) && s.is_frontend(lb) && s.is_frontend(VIP));
    assert!(!s.is_frontend(Ipv4Addr::new(192, 0, 2, 11)));
    let aff = Affinity::default();
    let plan = |src: Ipv4Addr, dst: Ipv4Addr, port: u16| {
        let t = Tuple::new(src, 40000, dst, port, PROTO_TCP);
        s.plan_frontend(&t, local(), network, cluster(node_cluster_ip), &aff, 0)
    };
    let backend = Some((Ipv4Addr::new(10, 244, 2, 2), 8080));
    for to in [ext, lb] {
        let from_pod = plan(Ipv4Addr::new(10, 244, 1, 5), to, 80).unwrap();
        assert_eq!((from_pod.dnat, from_pod.snat), (backend, None));
        let from_outside = plan(Ipv4Addr::new(192, 168, 99, 200), to, 80).unwrap();
        assert_eq!(
            (from_outside.dnat, from_outside.snat),
            (backend, Some(node_cluster_ip))
        );
        // The binding is the service's, so the connection lives and dies with its backend.
        assert_eq!(from_outside.service.unwrap().vip, VIP);
        assert_eq!(
            plan(Ipv4Addr::new(192, 168, 99, 200), to, 81),
            Err(NoBackend::NoService)
        );
    }
    // The ClusterIP from outside the cluster network stays the ClusterIP's (no SNAT).
    let to_vip = plan(Ipv4Addr::new(192, 168, 99, 200), VIP, 80).unwrap();
    assert_eq!(to_vip.snat, None);
}

/// An external IP that could take someone else's traffic is refused, and the service kept.
#[test]
fn test_external_ips_that_are_no_outside_address_or_taken_are_refused() {
    let node = Ipv4Addr::new(192, 168, 99, 11);
    let admission = Admission {
        node_addrs: vec![node],
        pod_network: Some(("10.244.0.0/16".parse().unwrap(), 24)),
        ..Admission::default()
    };
    let good = Ipv4Addr::new(192, 0, 2, 10);
    let mut a = spec(vec![ep(2, 2)], None);
    a.name = "default/a".into();
    a.external_ips = vec![
        good,
        node,
        Ipv4Addr::new(10, 244, 3, 7),
        Ipv4Addr::new(10, 96, 0, 99),
        Ipv4Addr::LOCALHOST,
        Ipv4Addr::new(224, 0, 0, 5),
    ];
    let mut b = spec(vec![ep(3, 2)], None);
    b.name = "default/b".into();
    b.cluster_ip = Ipv4Addr::new(10, 96, 0, 11);
    b.external_ips = vec![good];
    let (s, report) = Services::admit(options(), &admission, vec![b, a]);
    assert_eq!(s.len(), 2);
    assert_eq!(s.external_ips(), [good]);
    let why: Vec<String> = report
        .external_ips_refused
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        why,
        [
            "service default/a: external IP 10.96.0.99: in the service range",
            "service default/a: external IP 10.244.3.7: in the pod network",
            "service default/a: external IP 127.0.0.1: loopback (127.0.0.0/8)",
            "service default/a: external IP 192.168.99.11: this node's own address",
            "service default/a: external IP 224.0.0.5: multicast (224.0.0.0/4)",
            "services default/a and default/b both claim 192.0.2.10:80",
        ]
    );
}

/// A spec admission leaves as it is is kept as the caller gave it (an update at 10000
/// services copies none of them); one it changes (an endpoint removed, endpoints sorted) is a
/// copy, and the caller's is untouched.
#[test]
fn test_admission_shares_the_specs_it_does_not_change() {
    let ep = |last: u8| SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, last), 8080);
    let kept = Arc::new(spec(vec![ep(2), ep(3)], None));
    let unsorted = Arc::new(ServiceSpec {
        name: "default/unsorted".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, 11),
        ..spec(vec![ep(3), ep(2)], None)
    });
    let loopback = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 22);
    let bad = Arc::new(ServiceSpec {
        name: "default/bad".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, 12),
        ..spec(vec![ep(2), loopback], None)
    });
    let options = ServiceOptions::new(DEFAULT_SERVICE_CIDR.parse().unwrap());
    let given = vec![kept.clone(), unsorted.clone(), bad.clone()];
    let (s, report) = Services::admit(options, &Admission::default(), given);
    assert_eq!(report.endpoints_removed.len(), 1);
    let admitted = |name: &str| s.specs().find(|x| x.name == name).unwrap();
    assert!(std::ptr::eq(admitted("default/web"), &*kept), "shared");
    assert!(!std::ptr::eq(admitted("default/unsorted"), &*unsorted));
    assert_eq!(admitted("default/unsorted").endpoints, [ep(2), ep(3)]);
    assert_eq!(
        unsorted.endpoints,
        [ep(3), ep(2)],
        "the caller's is untouched"
    );
    assert_eq!(admitted("default/bad").endpoints, [ep(2)]);
    assert_eq!(bad.endpoints, [ep(2), loopback]);
}
