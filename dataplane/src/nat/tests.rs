use super::*;
use crate::conntrack::PROTO_TCP;

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
    }
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
    let mut hairpin = spec(vec![], None);
    hairpin.cluster_ip = options().hairpin_ip;
    assert!(matches!(
        Services::build(options(), vec![hairpin]),
        Err(ServiceError::HairpinAddress { .. })
    ));
}
