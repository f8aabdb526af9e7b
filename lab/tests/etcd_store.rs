//! The etcd store against a real etcd (Debian's etcd-server) on loopback, with etcdctl as an
//! independent client writing what flanneld writes. No root needed. Each test starts its own
//! server on free ports and stops it by pid at the end.
#![allow(clippy::tests_outside_test_module)]

use podwire::config::parse_net_conf;
use podwire::etcd::{EtcdOptions, EtcdStore};
use podwire::lease::LeaseAttrs;
use podwire::store::{LeaseRequest, Store, StoreError};
use podwire_dataplane::route::Ipv4Net;
use podwire_lab::etcd_server::EtcdServer;
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const PREFIX: &str = "/coreos.com/network";

fn etcd_available() -> bool {
    std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn server(name: &str) -> Option<EtcdServer> {
    if !etcd_available() {
        eprintln!("skipping: etcd (Debian etcd-server) is not installed");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("podwire-etcd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    Some(
        EtcdServer::start(None, Ipv4Addr::LOCALHOST, free_port(), free_port(), &dir)
            .expect("etcd starts"),
    )
}

fn store(etcd: &EtcdServer) -> EtcdStore {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("podwire=debug")
        .with_test_writer()
        .try_init();
    EtcdStore::new(EtcdOptions {
        endpoints: vec![etcd.endpoint()],
        timeout: Duration::from_secs(2),
        ..Default::default()
    })
    .unwrap()
}

fn request(cfg: &str, ip: &str, previous: Option<&str>) -> LeaseRequest {
    let public_ip: Ipv4Addr = ip.parse().unwrap();
    LeaseRequest {
        config: parse_net_conf(cfg).unwrap(),
        public_ip,
        attrs: LeaseAttrs::udp(public_ip),
        previous: previous.map(|p| p.parse().unwrap()),
    }
}

const UDP_CONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;

fn key(subnet: &Ipv4Net) -> String {
    format!("{PREFIX}/subnets/{}", podwire::subnet_key::of(subnet))
}

/// Calls `wait_changes` until `probe` holds on the lease set or 10 s pass.
fn until_leases(s: &mut EtcdStore, probe: impl Fn(&[podwire::store::Lease]) -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(true) = s.wait_changes(Duration::from_millis(200)) {
            if probe(&s.leases().unwrap()) {
                return true;
            }
        }
        if probe(&s.leases().unwrap()) {
            return true;
        }
    }
    false
}

#[test]
fn test_config_errors_are_named() {
    let Some(etcd) = server("config") else { return };
    let mut s = store(&etcd);
    match s.config() {
        Err(StoreError::NoConfig(k)) => assert_eq!(k, format!("{PREFIX}/config")),
        other => panic!("{other:?}"),
    }
    etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.244.0.0/16","SubnetLen":33}"#,
    )
    .unwrap();
    let e = s.config().unwrap_err();
    assert!(e.to_string().contains("SubnetLen"), "{e}");
    etcd.put(&format!("{PREFIX}/config"), UDP_CONF).unwrap();
    let cfg = s.config().unwrap();
    assert_eq!(cfg.subnet_len, 24);
    assert_eq!(cfg.subnet_min, Ipv4Addr::new(10, 244, 1, 0));
}

#[test]
fn test_acquire_writes_flanneld_lease_and_reuses_it() {
    let Some(etcd) = server("acquire") else {
        return;
    };
    etcd.put(&format!("{PREFIX}/config"), UDP_CONF).unwrap();
    let mut s = store(&etcd);
    let req = request(UDP_CONF, "192.168.0.1", None);
    let own = s.acquire(&req).unwrap();
    // Byte for byte what flanneld's udp backend writes.
    assert_eq!(
        etcd.get(&key(&own.subnet)).unwrap().as_deref(),
        Some(r#"{"PublicIP":"192.168.0.1","PublicIPv6":null}"#)
    );
    let ttl = etcd.ctl(&["get", &key(&own.subnet), "-w", "json"]).unwrap();
    assert!(
        !ttl.contains("\"lease\":0"),
        "lease attached to an etcd lease: {ttl}"
    );
    let left = own
        .expires
        .unwrap()
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(left > Duration::from_secs(86000), "{left:?}");
    // A second start with the same PublicIP gets the same subnet back.
    let again = store(&etcd).acquire(&req).unwrap();
    assert_eq!(again.subnet, own.subnet);
    assert_eq!(etcd.keys(&format!("{PREFIX}/subnets/")).unwrap().len(), 1);
    // Another node with its previous subnet.env subnet free gets that one. The first lease is
    // a random subnet: the previous one must not be it (1 run in ~255 failed on that).
    let previous = if own.subnet.to_string() == "10.244.77.0/24" {
        "10.244.78.0/24"
    } else {
        "10.244.77.0/24"
    };
    let other = store(&etcd)
        .acquire(&request(UDP_CONF, "192.168.0.2", Some(previous)))
        .unwrap();
    assert_eq!(other.subnet.to_string(), previous);
    // Renewal moves the expiry on and keeps the key.
    let renewed = s.renew(&req, &own).unwrap();
    assert!(renewed.expires.unwrap() >= own.expires.unwrap());
    assert!(etcd.get(&key(&own.subnet)).unwrap().is_some());
    // Our key deleted by someone else: renewal says so instead of writing it back blindly.
    etcd.delete(&key(&own.subnet)).unwrap();
    match s.renew(&req, &renewed) {
        Err(StoreError::LeaseLost(sn)) => assert_eq!(sn, own.subnet),
        other => panic!("{other:?}"),
    }
}

#[test]
fn test_reservation_stays_a_reservation() {
    let Some(etcd) = server("reserve") else {
        return;
    };
    etcd.put(&format!("{PREFIX}/config"), UDP_CONF).unwrap();
    etcd.put(
        &format!("{PREFIX}/subnets/10.244.42.0-24"),
        r#"{"PublicIP":"192.168.0.5","PublicIPv6":null}"#,
    )
    .unwrap();
    let own = store(&etcd)
        .acquire(&request(UDP_CONF, "192.168.0.5", None))
        .unwrap();
    assert_eq!(own.subnet.to_string(), "10.244.42.0/24");
    assert_eq!(own.expires, None);
    let json = etcd
        .ctl(&[
            "get",
            &format!("{PREFIX}/subnets/10.244.42.0-24"),
            "-w",
            "json",
        ])
        .unwrap();
    assert!(
        !json.contains("\"lease\""),
        "no etcd lease attached: {json}"
    );
}

#[test]
fn test_racing_nodes_end_with_distinct_subnets() {
    let Some(etcd) = server("race") else { return };
    // Both nodes remember the same previous subnet, so both try to create it at once; the loser
    // must choose again rather than abort (flanneld's bug) or share it.
    let cfg = r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.8.0"}"#;
    let mut lost = 0;
    for round in 0..8 {
        let prefix = format!("/race{round}");
        etcd.put(&format!("{prefix}/config"), cfg).unwrap();
        let handles: Vec<_> = (1..=4)
            .map(|n| {
                let endpoint = etcd.endpoint();
                let prefix = prefix.clone();
                std::thread::spawn(move || {
                    let mut s = EtcdStore::new(EtcdOptions {
                        endpoints: vec![endpoint],
                        prefix,
                        ..Default::default()
                    })
                    .unwrap();
                    let got = s
                        .acquire(&request(
                            cfg,
                            &format!("192.168.0.{n}"),
                            Some("10.244.3.0/24"),
                        ))
                        .unwrap()
                        .subnet;
                    (got, s.lost_races())
                })
            })
            .collect();
        let results: Vec<(Ipv4Net, u64)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        lost += results.iter().map(|r| r.1).sum::<u64>();
        let mut got: Vec<Ipv4Net> = results.iter().map(|r| r.0).collect();
        assert!(got.contains(&"10.244.3.0/24".parse().unwrap()));
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 4, "round {round}: {got:?}");
        assert_eq!(etcd.keys(&format!("{prefix}/subnets/")).unwrap().len(), 4);
    }
    eprintln!("creation races lost and retried: {lost}");
    assert!(lost > 0, "the test made nodes race");
}

#[test]
fn test_exhausted_range_is_an_error() {
    let Some(etcd) = server("full") else { return };
    let cfg = r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.2.0"}"#;
    etcd.put(&format!("{PREFIX}/config"), cfg).unwrap();
    for n in 1..=2 {
        store(&etcd)
            .acquire(&request(cfg, &format!("192.168.0.{n}"), None))
            .unwrap();
    }
    match store(&etcd).acquire(&request(cfg, "192.168.0.3", None)) {
        Err(StoreError::Exhausted) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn test_watch_sees_flanneld_leases_deletions_and_survives_outage() {
    let Some(mut etcd) = server("watch") else {
        return;
    };
    etcd.put(&format!("{PREFIX}/config"), UDP_CONF).unwrap();
    let mut s = store(&etcd);
    s.config().unwrap();
    // Our own lease where the leases written below cannot collide with it (a random pick
    // landed on 10.244.60.0/24 once, and the expiring lease then replaced ours).
    let own = s
        .acquire(&request(UDP_CONF, "192.168.0.1", Some("10.244.1.0/24")))
        .unwrap();
    assert_eq!(own.subnet.to_string(), "10.244.1.0/24");
    assert_eq!(s.leases().unwrap().len(), 1);
    let vxlan_key = format!("{PREFIX}/subnets/10.244.50.0-24");
    // Written exactly as flanneld's vxlan backend writes it, with a 24 h etcd lease.
    etcd.put_with_ttl(
        &vxlan_key,
        r#"{"PublicIP":"192.168.0.50","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#,
        Duration::from_secs(86400),
    )
    .unwrap();
    // And flanneld's udp form (no BackendType).
    etcd.put_with_ttl(
        &format!("{PREFIX}/subnets/10.244.51.0-24"),
        r#"{"PublicIP":"192.168.0.51","PublicIPv6":null}"#,
        Duration::from_secs(86400),
    )
    .unwrap();
    // Garbage next to them is ignored, not fatal.
    etcd.put(&format!("{PREFIX}/subnets/10.244.52.0-24"), "{not json")
        .unwrap();
    etcd.put(&format!("{PREFIX}/subnets/nonsense"), "{}")
        .unwrap();
    assert!(
        until_leases(&mut s, |l| l.len() == 3),
        "{:?}",
        s.leases().unwrap()
    );
    let l = s.leases().unwrap();
    let v = l
        .iter()
        .find(|l| l.subnet.to_string() == "10.244.50.0/24")
        .unwrap();
    assert_eq!(v.attrs.backend_type.as_deref(), Some("vxlan"));
    etcd.delete(&vxlan_key).unwrap();
    assert!(until_leases(&mut s, |l| l.len() == 2));
    // Expiry reaches us as a deletion. (TTL long enough that a loaded machine still sees the
    // lease before it goes.)
    etcd.put_with_ttl(
        &format!("{PREFIX}/subnets/10.244.60.0-24"),
        r#"{"PublicIP":"192.168.0.60","PublicIPv6":null}"#,
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(until_leases(&mut s, |l| l.len() == 3), "leased key seen");
    assert!(
        until_leases(&mut s, |l| l.len() == 2),
        "expired lease removed"
    );

    // etcd goes away: the store reports errors, keeps its leases, and resyncs when etcd is back.
    etcd.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut saw_error = false;
    while Instant::now() < deadline && !saw_error {
        saw_error = s.wait_changes(Duration::from_millis(200)).is_err();
    }
    assert!(saw_error, "outage reported");
    assert_eq!(s.leases().unwrap().len(), 2, "last lease set kept");
    etcd.restart().unwrap();
    etcd.put_with_ttl(
        &format!("{PREFIX}/subnets/10.244.70.0-24"),
        r#"{"PublicIP":"192.168.0.70","PublicIPv6":null}"#,
        Duration::from_secs(86400),
    )
    .unwrap();
    assert!(until_leases(&mut s, |l| l
        .iter()
        .any(|l| l.subnet.to_string() == "10.244.70.0/24")));
    assert!(s.reconnects() >= 1);
}

/// A CA, and a certificate it signs for `ip` (server) or a client, as PEM files in `dir`.
struct TestPki {
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl TestPki {
    fn new(name: &str) -> TestPki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} CA"));
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca = p.self_signed(&ca_key).unwrap();
        TestPki { ca, ca_key }
    }

    fn issue(&self, dir: &std::path::Path, name: &str, server: bool) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.subject_alt_names
            .push(rcgen::SanType::IpAddress(std::net::IpAddr::V4(
                Ipv4Addr::LOCALHOST,
            )));
        p.extended_key_usages = vec![if server {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        }];
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn write_ca(&self, path: &std::path::Path) {
        std::fs::write(path, self.ca.pem()).unwrap();
    }
}

#[test]
fn test_tls_with_client_certificates() {
    if !etcd_available() {
        eprintln!("skipping: etcd (Debian etcd-server) is not installed");
        return;
    }
    let dir = std::env::temp_dir().join(format!("podwire-etcd-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let pki = TestPki::new("cluster");
    let ca = dir.join("ca.pem");
    pki.write_ca(&ca);
    let (server_cert, server_key) = pki.issue(&dir, "etcd", true);
    let (client_cert, client_key) = pki.issue(&dir, "podwire", false);
    let stranger = TestPki::new("stranger");
    let (rogue_cert, rogue_key) = stranger.issue(&dir, "rogue", false);
    let etcd = EtcdServer::start_with(
        None,
        Ipv4Addr::LOCALHOST,
        free_port(),
        free_port(),
        &dir.join("etcd"),
        Some(podwire_lab::etcd_server::EtcdTls {
            ca: ca.clone(),
            server_cert,
            server_key,
            client_cert: client_cert.clone(),
            client_key: client_key.clone(),
        }),
    )
    .expect("etcd starts with TLS");
    assert!(etcd.endpoint().starts_with("https://"));
    etcd.put(&format!("{PREFIX}/config"), UDP_CONF).unwrap();
    let tls_store = |cert: Option<&PathBuf>, key: Option<&PathBuf>, ca: Option<&PathBuf>| {
        EtcdStore::new(EtcdOptions {
            endpoints: vec![etcd.endpoint()],
            ca_file: ca.cloned(),
            cert_file: cert.cloned(),
            key_file: key.cloned(),
            timeout: Duration::from_secs(2),
            ..Default::default()
        })
        .unwrap()
    };
    // With the cluster's CA and a client certificate it signed: a lease, as over plain HTTP.
    let mut good = tls_store(Some(&client_cert), Some(&client_key), Some(&ca));
    good.config().unwrap();
    let own = good
        .acquire(&request(UDP_CONF, "192.168.0.1", None))
        .unwrap();
    assert!(etcd.get(&key(&own.subnet)).unwrap().is_some());
    // No client certificate, one from another CA, or not trusting the server: refused.
    for (cert, key, trust) in [
        (None, None, Some(&ca)),
        (Some(&rogue_cert), Some(&rogue_key), Some(&ca)),
        (Some(&client_cert), Some(&client_key), None),
    ] {
        let e = tls_store(cert, key, trust).config().unwrap_err();
        assert!(
            matches!(e, StoreError::Etcd { .. } | StoreError::Timeout { .. }),
            "{e}"
        );
    }
    // A missing certificate file is named.
    let e = tls_store(Some(&dir.join("nope.pem")), Some(&client_key), Some(&ca))
        .config()
        .unwrap_err();
    assert!(e.to_string().contains("nope.pem"), "{e}");
    drop(etcd);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn test_username_and_password() {
    let Some(etcd) = server("auth") else { return };
    etcd.put(&format!("{PREFIX}/config"), UDP_CONF).unwrap();
    // etcd's RBAC: a root user (needed to enable auth) and a flannel user with a role on the
    // network prefix only.
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["user", "add", "flannel:flannelpw"],
        &["role", "add", "flannel"],
        &[
            "role",
            "grant-permission",
            "flannel",
            "--prefix=true",
            "readwrite",
            PREFIX,
        ],
        &["user", "grant-role", "flannel", "flannel"],
        &["auth", "enable"],
    ] {
        etcd.ctl(args).unwrap();
    }
    let with = |user: Option<(&str, &str)>| {
        EtcdStore::new(EtcdOptions {
            endpoints: vec![etcd.endpoint()],
            username: user.map(|u| u.0.to_string()),
            password: user.map(|u| u.1.into()),
            timeout: Duration::from_secs(2),
            ..Default::default()
        })
        .unwrap()
    };
    let mut good = with(Some(("flannel", "flannelpw")));
    good.config().unwrap();
    let own = good
        .acquire(&request(UDP_CONF, "192.168.0.1", None))
        .unwrap();
    assert_eq!(good.leases().unwrap().len(), 1);
    assert!(own.expires.is_some());
    for bad in [None, Some(("flannel", "wrong"))] {
        let e = with(bad).config().unwrap_err();
        assert!(matches!(e, StoreError::Etcd { .. }), "{e}");
    }
}

/// Calls `services` until it reports something or 10 s pass.
fn next_services(s: &mut EtcdStore) -> Option<Vec<(String, Vec<u8>)>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(items)) = s.services() {
            return Some(items);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn test_services_are_read_then_watched_under_the_prefix() {
    let Some(etcd) = server("services") else {
        return;
    };
    let mut s = store(&etcd);
    // First call: a full read (none yet), then the watch.
    assert_eq!(s.services().unwrap(), Some(vec![]));
    assert_eq!(s.services().unwrap(), None, "nothing changed");
    let web = format!("{PREFIX}/services/default/web");
    etcd.put(
        &web,
        r#"{"clusterIP":"10.96.0.10","port":80,"endpoints":[{"ip":"10.244.2.2","port":8080}]}"#,
    )
    .unwrap();
    let items = next_services(&mut s).expect("the put is seen");
    let specs = podwire::services::parse_etcd(&items).specs;
    assert_eq!(specs.len(), 1);
    assert_eq!(specs[0].name, "default/web");
    assert_eq!(specs[0].endpoints.len(), 1);
    // An endpoint added, then a second service, then one deleted: each seen.
    etcd.put(
        &web,
        r#"{"clusterIP":"10.96.0.10","port":80,"endpoints":[{"ip":"10.244.2.2","port":8080},{"ip":"10.244.3.2","port":8080}]}"#,
    )
    .unwrap();
    let specs = podwire::services::parse_etcd(&next_services(&mut s).unwrap()).specs;
    assert_eq!(specs[0].endpoints.len(), 2);
    etcd.put(
        &format!("{PREFIX}/services/kube-system/dns"),
        r#"{"clusterIP":"10.96.0.53","protocol":"UDP","port":53}"#,
    )
    .unwrap();
    assert_eq!(next_services(&mut s).unwrap().len(), 2);
    etcd.ctl(&["del", &web]).unwrap();
    let specs = podwire::services::parse_etcd(&next_services(&mut s).unwrap()).specs;
    assert_eq!(specs.len(), 1);
    assert_eq!(specs[0].name, "kube-system/dns");
    // Leases are not services: a lease write does not report services.
    etcd.put(
        &format!("{PREFIX}/subnets/10.244.9.0-24"),
        r#"{"PublicIP":"10.0.0.9"}"#,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.services().unwrap(), None);
}
