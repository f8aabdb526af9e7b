//! `--kube-subnet-mgr`'s store against the Kubernetes API server stand-in (the real protocol,
//! served by apiserver-standin; no kube-apiserver can be installed here): the own Node's podCIDR
//! taken and annotated as flanneld annotates it, peers from every annotated Node (flanneld's
//! included), bad Nodes left out and counted, and the map kept through a watch that expires
//! (410, relist) and a server that restarts.
#![allow(clippy::tests_outside_test_module)]

use k8s_openapi::api::core::v1::{Node, NodeSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use podwire::config::parse_net_conf;
use podwire::kube_store::{KubeOptions, KubeStore, DEFAULT_ANNOTATION_PREFIX};
use podwire::lease::LeaseAttrs;
use podwire::store::{LeaseRequest, Store, StoreError};
use podwire_apiserver_standin::kubeconfig::write_kubeconfig;
use podwire_apiserver_standin::verb::Verb;
use podwire_apiserver_standin::{Config, Handle, Role, StandIn};
use serde_json::json;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const TOKEN: &str = "podwire-node";
const NET_CONF: &str = r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#;

fn key(name: &str) -> String {
    format!("{DEFAULT_ANNOTATION_PREFIX}/{name}")
}

/// A Node with a podCIDR and annotations (keys without the prefix).
fn node(name: &str, cidr: &str, annotations: &[(&str, &str)]) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| (key(k), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: (!cidr.is_empty()).then(|| cidr.into()),
            ..Default::default()
        }),
        status: None,
    }
}

/// What flanneld's vxlan backend writes on its Node.
fn flanneld_vxlan(public_ip: &str, mac: &str) -> Vec<(&'static str, String)> {
    vec![
        ("backend-type", "vxlan".into()),
        ("backend-data", format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#)),
        ("kube-subnet-manager", "true".into()),
        ("public-ip", public_ip.into()),
    ]
}

fn annotated(name: &str, cidr: &str, a: &[(&'static str, String)]) -> Node {
    let pairs: Vec<(&str, &str)> = a.iter().map(|(k, v)| (*k, v.as_str())).collect();
    node(name, cidr, &pairs)
}

struct Cluster {
    standin: Handle,
    dir: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn cluster(test: &str) -> Cluster {
    let config = Config::default().with_token(TOKEN, Role::Admin);
    let standin = StandIn::start("127.0.0.1:0".parse().unwrap(), config).unwrap();
    let dir = std::env::temp_dir().join(format!("podwire-kube-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_kubeconfig(&dir.join("kubeconfig"), &standin.url(), TOKEN).unwrap();
    std::fs::write(dir.join("net-conf.json"), NET_CONF).unwrap();
    Cluster { standin, dir }
}

fn store(c: &Cluster, node_name: &str) -> KubeStore {
    KubeStore::new(KubeOptions {
        api_url: None,
        kubeconfig: Some(c.dir.join("kubeconfig")),
        annotation_prefix: DEFAULT_ANNOTATION_PREFIX.into(),
        node_name: node_name.into(),
        net_conf: c.dir.join("net-conf.json"),
    })
    .unwrap()
}

fn request(public_ip: Ipv4Addr) -> LeaseRequest {
    LeaseRequest {
        config: parse_net_conf(NET_CONF).unwrap(),
        public_ip,
        attrs: LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: Some("vxlan".into()),
            backend_data: Some(json!({"VNI": 1, "VtepMAC": "0a:58:0a:f4:01:00"})),
            backend_v6_data: None,
        },
        previous: None,
    }
}

/// The subnets of the store's leases once they equal `want`, waiting on its changes for up to
/// 10 s; panics with what it last saw otherwise.
fn converge(s: &mut KubeStore, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|w| w.to_string()).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = BTreeSet::new();
    while Instant::now() < deadline {
        let _ = s.wait_changes(Duration::from_millis(100));
        seen = s
            .leases()
            .unwrap()
            .iter()
            .map(|l| l.subnet.to_string())
            .collect();
        if seen == want {
            return;
        }
    }
    panic!("leases {seen:?}, want {want:?}");
}

#[test]
fn test_own_node_is_annotated_as_flanneld_and_peers_come_from_annotations() {
    let c = cluster("annotate");
    c.standin
        .apply_node(node("n1", "10.244.1.0/24", &[]))
        .unwrap();
    let flanneld = flanneld_vxlan("192.168.50.12", "0a:58:0a:f4:02:00");
    c.standin
        .apply_node(annotated("n2", "10.244.2.0/24", &flanneld))
        .unwrap();
    // Managed but broken: left out and counted. Unmanaged: left out, not counted.
    let mut broken = flanneld_vxlan("192.168.50.13", "x");
    broken[1].1 = "{not json".into();
    c.standin
        .apply_node(annotated("n3", "10.244.3.0/24", &broken))
        .unwrap();
    c.standin
        .apply_node(node("n4", "10.244.4.0/24", &[]))
        .unwrap();

    let mut s = store(&c, "n1");
    let cfg = s.config().unwrap();
    assert_eq!(cfg.network.to_string(), "10.244.0.0/16");
    let own = s
        .acquire(&request(Ipv4Addr::new(192, 168, 50, 11)))
        .unwrap();
    assert_eq!(own.subnet.to_string(), "10.244.1.0/24");
    assert_eq!(own.expires, None);

    // Exactly flanneld's annotations, the same strings flanneld's vxlan backend writes.
    let n1 = c.standin.node("n1").unwrap();
    let a = n1.metadata.annotations.unwrap();
    for (k, v) in flanneld_vxlan("192.168.50.11", "0a:58:0a:f4:01:00") {
        assert_eq!(a.get(&key(k)), Some(&v), "{k}");
    }
    let conditions = n1.status.and_then(|s| s.conditions).unwrap_or_default();
    let unavailable = conditions
        .iter()
        .find(|c| c.type_ == "NetworkUnavailable")
        .expect("NetworkUnavailable condition");
    assert_eq!(unavailable.status, "False");

    converge(&mut s, &["10.244.1.0/24", "10.244.2.0/24"]);
    assert_eq!(s.rejected_leases(), 1, "n3's broken backend-data");
    let peer = s
        .leases()
        .unwrap()
        .into_iter()
        .find(|l| l.subnet.to_string() == "10.244.2.0/24")
        .unwrap();
    assert_eq!(peer.attrs.public_ip, Ipv4Addr::new(192, 168, 50, 12));

    // A second acquire finds the annotations in place and writes nothing.
    let patches = || {
        let counts = c.standin.request_counts();
        counts
            .iter()
            .filter(|((verb, _), _)| *verb == Verb::Patch)
            .map(|(_, n)| n)
            .sum::<u64>()
    };
    let before = patches();
    s.acquire(&request(Ipv4Addr::new(192, 168, 50, 11)))
        .unwrap();
    assert_eq!(
        patches(),
        before + 1,
        "only the NetworkUnavailable condition again"
    );

    c.standin.delete_node("n2");
    converge(&mut s, &["10.244.1.0/24"]);
}

#[test]
fn test_bad_own_nodes_are_clear_errors() {
    let c = cluster("bad-own");
    c.standin.apply_node(node("no-cidr", "", &[])).unwrap();
    c.standin
        .apply_node(node("outside", "10.99.1.0/24", &[]))
        .unwrap();
    let req = request(Ipv4Addr::new(192, 168, 50, 11));
    let e = store(&c, "no-cidr").acquire(&req).unwrap_err();
    assert!(
        matches!(&e, StoreError::Kube(m) if m.contains("no podCIDR")),
        "{e}"
    );
    let e = store(&c, "outside").acquire(&req).unwrap_err();
    assert!(
        matches!(&e, StoreError::Invalid { .. }) && e.to_string().contains("10.99.1.0/24"),
        "{e}"
    );
    let e = store(&c, "missing").acquire(&req).unwrap_err();
    assert!(
        matches!(&e, StoreError::Kube(m) if m.contains("missing")),
        "{e}"
    );
    // A wrong token is refused by the server: a clear error, not a panic.
    write_kubeconfig(&c.dir.join("kubeconfig"), &c.standin.url(), "wrong").unwrap();
    let e = store(&c, "outside").acquire(&req).unwrap_err();
    assert!(
        e.to_string().contains("401") || e.to_string().contains("Unauthorized"),
        "{e}"
    );
}

#[test]
fn test_map_survives_an_expired_watch_and_a_restarted_server() {
    let c = cluster("restart");
    c.standin
        .apply_node(node("n1", "10.244.1.0/24", &[]))
        .unwrap();
    let mut s = store(&c, "n1");
    s.config().unwrap();
    s.acquire(&request(Ipv4Addr::new(192, 168, 50, 11)))
        .unwrap();
    converge(&mut s, &["10.244.1.0/24"]);

    // The server goes away: the last good map stays, and the store says it is unreachable.
    c.standin.stop().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut unreachable = false;
    while Instant::now() < deadline && !unreachable {
        unreachable = s.wait_changes(Duration::from_millis(100)).is_err();
    }
    assert!(unreachable, "a stopped API server is reported");
    assert_eq!(s.leases().unwrap().len(), 1, "the last good map is kept");

    // Changes made while it was down arrive once it is back.
    let flanneld = flanneld_vxlan("192.168.50.12", "0a:58:0a:f4:02:00");
    c.standin
        .apply_node(annotated("n2", "10.244.2.0/24", &flanneld))
        .unwrap();
    c.standin.serve_again().unwrap();
    converge(&mut s, &["10.244.1.0/24", "10.244.2.0/24"]);
    assert!(s.reconnects() >= 1);

    // The history the watch would resume from is gone: 410, relist, the map converges.
    let expired_before = c.standin.watches_expired();
    // The watch's first retries fail, so the history is gone before it resumes.
    c.standin.fail_next(2, 503);
    c.standin.break_watches();
    c.standin.delete_node("n2");
    let third = flanneld_vxlan("192.168.50.13", "0a:58:0a:f4:03:00");
    c.standin
        .apply_node(annotated("n3", "10.244.3.0/24", &third))
        .unwrap();
    c.standin.compact();
    converge(&mut s, &["10.244.1.0/24", "10.244.3.0/24"]);
    assert!(
        c.standin.watches_expired() > expired_before,
        "the resumed watch was answered 410 and relisted"
    );
}

/// The service records once `services()` hands out ones whose keys are `want`, waiting up to
/// 10 s.
fn services_until(s: &mut KubeStore, want: &[&str]) -> Vec<(String, serde_json::Value)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = Vec::new();
    while Instant::now() < deadline {
        if let Ok(Some(items)) = s.services() {
            last = items
                .into_iter()
                .map(|(k, v)| (k, serde_json::from_slice(&v).unwrap()))
                .collect::<Vec<_>>();
            let keys: Vec<&str> = last.iter().map(|(k, _)| k.as_str()).collect();
            if keys == want {
                return last;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("services {last:?}, want keys {want:?}");
}

#[test]
fn test_services_come_from_services_and_endpoint_slices_as_kube_proxy_reads_them() {
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let c = cluster("services");
    let service = |name: &str, labels: serde_json::Value| -> Service {
        serde_json::from_value(json!({
            "metadata": {"namespace": "default", "name": name, "labels": labels},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}
        }))
        .unwrap()
    };
    let slice = |ips: &[&str]| -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"namespace": "default", "name": "web-abc",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": ips.iter().map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}})).collect::<Vec<_>>()
        }))
        .unwrap()
    };
    c.standin.apply_service(service("web", json!({}))).unwrap();
    c.standin
        .apply_service(service(
            "other-proxy",
            json!({"service.kubernetes.io/service-proxy-name": "someone-else"}),
        ))
        .unwrap();
    c.standin
        .apply_endpoint_slice(slice(&["10.244.2.2", "10.244.3.2"]))
        .unwrap();
    let mut s = store(&c, "n1");
    // One API record per Service; the service ports come out of podwire's parser.
    let got = services_until(&mut s, &["kube/services/default/web"]);
    let ports = |items: Vec<(String, serde_json::Value)>| {
        let raw: Vec<(String, Vec<u8>)> = items
            .into_iter()
            .map(|(k, v)| (k, v.to_string().into_bytes()))
            .collect();
        podwire::services::parse_etcd(&raw)
    };
    let parsed = ports(got);
    assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
    let web = &parsed.specs[0];
    assert_eq!(web.name, "default/web:http");
    assert_eq!(
        (web.cluster_ip.to_string(), web.port),
        ("10.96.0.10".to_string(), 80)
    );
    let addrs = |v: &[std::net::SocketAddrV4]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    assert_eq!(
        addrs(&web.endpoints),
        ["10.244.2.2:8080", "10.244.3.2:8080"]
    );
    assert!(matches!(s.services(), Ok(None)), "unchanged: nothing new");
    // An endpoint removed: the record follows.
    c.standin
        .apply_endpoint_slice(slice(&["10.244.3.2"]))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut eps = Vec::new();
    while Instant::now() < deadline {
        if let Ok(Some(items)) = s.services() {
            let parsed = podwire::services::parse_etcd(&items);
            eps = addrs(&parsed.specs[0].endpoints);
            if eps == ["10.244.3.2:8080"] {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(eps, ["10.244.3.2:8080"]);
}
