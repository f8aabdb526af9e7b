//! `podwire-lab lab --store kube`: the cluster joins through the Kubernetes API, as
//! `--kube-subnet-mgr` nodes do. No kube-apiserver can be installed here, so the API is
//! podwire's stand-in (apiserver-standin, the real protocol: lists, watches with 410 and
//! bookmarks, strategic merge patches, tokens), started by the lab in the underlay namespace on
//! br0's address 192.168.99.3, where a cluster's API server would sit on the node network.
//!
//! The lab writes what kube-controller-manager and flanneld would: every Node with its podCIDR
//! (10.244.i.0/24), and the kernel VXLAN nodes' annotations as flanneld writes them. podwire
//! nodes annotate their own Node. Then it checks what only a live API can show: the
//! annotations, the whole map, an API server restart under traffic, and a watch that expires.

use super::etcd_lab::{metric, ping_once, within};
use super::{pod_ip, underlay_ip, Check, LabOptions, Names, Resources};
use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Node, NodeSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use podwire::kube_store::{lease_annotations, AnnotationKeys, DEFAULT_ANNOTATION_PREFIX};
use podwire::lease::LeaseAttrs;
use podwire_apiserver_standin::kubeconfig::write_kubeconfig;
use podwire_apiserver_standin::{Config, Handle, Role, StandIn};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const API_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 3);
const API_PORT: u16 = 6443;
const TOKEN: &str = "podwire-lab-node";
/// A Node with no host behind it, added while the API server is down.
const GHOST_SUBNET: &str = "10.244.200.0/24";
const GHOST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 200);
const GHOST_MAC: &str = "0e:70:c0:a8:63:c8";

pub fn kubeconfig(names: &Names) -> PathBuf {
    names.dir.join("kubeconfig")
}

pub fn net_conf(names: &Names) -> PathBuf {
    names.dir.join("net-conf.json")
}

/// The annotations flanneld writes on node `i`'s Node, spelled out here as flanneld's
/// `AcquireLease` writes them (not derived from podwire's code, so the check below compares
/// podwire against flanneld): the backend's type and JSON (`null` for udp), the public IP.
fn flanneld_annotations(opts: &LabOptions, i: usize) -> BTreeMap<String, String> {
    let p = DEFAULT_ANNOTATION_PREFIX;
    let (kind, data) = if opts.vxlan() {
        let mac = super::vtep_mac(i);
        ("vxlan", format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#))
    } else {
        ("", "null".to_string())
    };
    BTreeMap::from([
        (format!("{p}/backend-type"), kind.to_string()),
        (format!("{p}/backend-data"), data),
        (format!("{p}/public-ip"), underlay_ip(i).to_string()),
        (format!("{p}/kube-subnet-manager"), "true".to_string()),
    ])
}

fn keys() -> AnnotationKeys {
    AnnotationKeys::new(DEFAULT_ANNOTATION_PREFIX).expect("flanneld's prefix")
}

fn node(name: &str, cidr: &str, annotations: BTreeMap<String, String>) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: Some(cidr.into()),
            pod_cidrs: Some(vec![cidr.into()]),
            ..Default::default()
        }),
        status: None,
    }
}

/// Starts the API server stand-in in the underlay namespace, writes the kubeconfig and
/// net-conf.json the nodes read, and the Nodes: podCIDRs for all, flanneld's annotations for
/// the kernel nodes.
pub fn start(res: &mut Resources, opts: &LabOptions) -> Result<()> {
    let listen = SocketAddr::from((API_IP, API_PORT));
    let handle = super::netns::run_in(&res.ns("u"), move || {
        let config = Config::default().with_token(TOKEN, Role::Admin);
        Ok(StandIn::start(listen, config)?)
    })
    .context("starting the API server stand-in")?;
    write_kubeconfig(&kubeconfig(&res.names), &handle.url(), TOKEN)?;
    let cluster = super::cluster_file(opts);
    std::fs::write(
        net_conf(&res.names),
        serde_json::to_vec_pretty(&cluster["config"])?,
    )?;
    for i in 1..=opts.nodes {
        let annotations = if opts.is_kernel_node(i) {
            flanneld_annotations(opts, i)
        } else {
            BTreeMap::new()
        };
        handle
            .apply_node(node(
                &format!("n{i}"),
                &format!("10.244.{i}.0/24"),
                annotations,
            ))
            .map_err(|e| anyhow::anyhow!("seeding Node n{i}: {e:?}"))?;
    }
    res.kube = Some(handle);
    Ok(())
}

fn api<T>(res: &Arc<Mutex<Resources>>, f: impl FnOnce(&Handle) -> T) -> Result<T> {
    let r = res.lock().expect("lab resources");
    Ok(f(r
        .kube
        .as_ref()
        .context("the API server stand-in is not running")?))
}

/// The stand-in listens again, binding in the underlay namespace (a listener belongs to the
/// namespace of the thread that makes it).
fn serve_again(res: &Arc<Mutex<Resources>>) -> Result<()> {
    let (ns, handle) = {
        let mut r = res.lock().expect("lab resources");
        (r.ns("u"), r.kube.take())
    };
    let handle = handle.context("the API server stand-in is not running")?;
    let handle = super::netns::run_in(&ns, move || {
        handle.serve_again()?;
        Ok(handle)
    })?;
    res.lock().expect("lab resources").kube = Some(handle);
    Ok(())
}

/// Every podwire node annotated its Node exactly as flanneld would, and set NetworkUnavailable
/// false.
pub fn annotations_check(res: &Arc<Mutex<Resources>>, opts: &LabOptions) -> Result<Check> {
    let mut wrong = Vec::new();
    for i in opts.podwire_nodes() {
        let want = flanneld_annotations(opts, i);
        let got = api(res, |h| h.node(&format!("n{i}")))?;
        let annotations = got
            .as_ref()
            .and_then(|n| n.metadata.annotations.clone())
            .unwrap_or_default();
        for (k, v) in &want {
            if annotations.get(k) != Some(v) {
                wrong.push(format!("n{i} {k}: {:?}, want {v:?}", annotations.get(k)));
            }
        }
        let available = got
            .and_then(|n| n.status)
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "NetworkUnavailable" && c.status == "False");
        if !available {
            wrong.push(format!("n{i}: no NetworkUnavailable=False condition"));
        }
    }
    Ok(Check {
        name: "each podwire node annotates its Node as flanneld does".into(),
        ok: wrong.is_empty(),
        detail: if wrong.is_empty() {
            format!(
                "{} nodes: backend-type, backend-data, public-ip, kube-subnet-manager; NetworkUnavailable False",
                opts.podwire_nodes().len()
            )
        } else {
            wrong.join("; ")
        },
    })
}

fn map_size(names: &Names, want: usize, limit: Duration) -> (bool, Option<f64>) {
    let mut seen = None;
    let ok = within(limit, || {
        seen = metric(names, 1, "podwire_subnet_map_leases");
        seen == Some(want as f64)
    });
    (ok, seen)
}

/// The API server goes away in the middle of a TCP transfer between pods 1 and `to`, a Node
/// joins while it is away, and it comes back: the transfer completes intact, node 1 reports the
/// outage, keeps forwarding, and once the server is back its map holds the new Node.
pub fn restart_check(
    res: &Arc<Mutex<Resources>>,
    names: &Names,
    opts: &LabOptions,
    to: usize,
) -> Result<Check> {
    let bytes = opts.transfer_mb.max(200) * 1_000_000;
    let transfer = super::lifecycle::Transfer::start(names, to, super::TCP_PORT + 2, bytes, 11)?;
    std::thread::sleep(Duration::from_millis(50));
    api(res, Handle::stop)??;
    let noticed = within(Duration::from_secs(10), || {
        metric(names, 1, "podwire_store_up") == Some(0.0)
    });
    let mut ghost = LeaseAttrs::udp(GHOST_IP);
    if opts.vxlan() {
        ghost.backend_type = Some("vxlan".into());
        ghost.backend_data = Some(serde_json::json!({"VNI": 1, "VtepMAC": GHOST_MAC}));
    }
    let ghost = lease_annotations(&keys(), &ghost);
    api(res, |h| h.apply_node(node("ghost", GHOST_SUBNET, ghost)))?
        .map_err(|e| anyhow::anyhow!("adding Node ghost: {e:?}"))?;
    let still = ping_once(names, 1, to);
    std::thread::sleep(Duration::from_secs(1));
    serve_again(res)?;
    let back = Instant::now();
    let (grown, seen) = map_size(names, opts.nodes + 1, Duration::from_secs(20));
    let took = back.elapsed();
    let up = metric(names, 1, "podwire_store_up") == Some(1.0);
    let outcome = transfer.finish();
    let intact = outcome.is_ok();
    Ok(Check {
        name: "API server restarted under a TCP transfer: it completes; a Node added meanwhile arrives".into(),
        ok: intact && noticed && still && grown && up,
        detail: format!(
            "{} MB 1->{to} intact {intact}; outage seen {noticed}; ping during outage {still}; map {seen:?} of {} leases {} ms after the restart; store up {up}{}",
            bytes / 1_000_000,
            opts.nodes + 1,
            took.as_millis(),
            outcome
                .err()
                .map(|e| format!("; transfer error: {e}"))
                .unwrap_or_default()
        ),
    })
}

/// The nodes' watch breaks and the history it would resume from is gone: the stand-in answers
/// 410 Expired, the nodes relist, and the Node deleted meanwhile leaves their maps; pod 1
/// still reaches pod `to`.
pub fn expired_watch_check(
    res: &Arc<Mutex<Resources>>,
    names: &Names,
    opts: &LabOptions,
    to: usize,
) -> Result<Check> {
    let expired_before = api(res, Handle::watches_expired)?;
    api(res, |h| {
        // The watches' first retries fail, so the history is gone before they resume.
        h.fail_next(2 * opts.nodes as u32, 503);
        h.break_watches();
        h.delete_node("ghost");
        h.compact();
    })?;
    let (shrunk, seen) = map_size(names, opts.nodes, Duration::from_secs(20));
    let expired = api(res, Handle::watches_expired)? - expired_before;
    let reach = within(Duration::from_secs(5), || ping_once(names, 1, to));
    Ok(Check {
        name: "an expired watch (410) is relisted: a Node deleted meanwhile leaves the map".into(),
        ok: shrunk && expired >= 1 && reach,
        detail: format!(
            "node 1's map {seen:?}, want {}; watches answered 410: {expired}; pod {} reachable {reach}",
            opts.nodes,
            pod_ip(to)
        ),
    })
}

/// The lab's services (see `services_lab`) as the API holds them: each Service and its
/// EndpointSlice (endpoint conditions, nodeName, labelled with the Service's name, as the
/// EndpointSlice controller writes it), applied over what is there.
pub fn put_services(handle: &Handle, services: &[super::service_catalogue::Service]) -> Result<()> {
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    for svc in services {
        let record = svc.api_record();
        let service: Service = serde_json::from_value(record["service"].clone())?;
        handle
            .apply_service(service)
            .map_err(|e| anyhow::anyhow!("Service {}: {e:?}", svc.name))?;
        for slice in record["endpointSlices"].as_array().into_iter().flatten() {
            let slice: EndpointSlice = serde_json::from_value(slice.clone())?;
            handle
                .apply_endpoint_slice(slice)
                .map_err(|e| anyhow::anyhow!("EndpointSlice of {}: {e:?}", svc.name))?;
        }
    }
    Ok(())
}
