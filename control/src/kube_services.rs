//! Services as the Kubernetes API shapes them, read as kube-proxy reads them: a Service and its
//! `discovery.k8s.io/v1` EndpointSlices become the service ports podwire's NAT serves
//! ([`ServiceSpec`], one per Service port). The same objects come from the API
//! (`--kube-subnet-mgr`), from etcd and from the services file (an API record, see
//! [`crate::services`]), and go through [`specs`] alike.
//!
//! What kube-proxy skips is skipped: Services labelled `service.kubernetes.io/service-proxy-name`
//! (another proxy's) or `service.kubernetes.io/headless`, headless Services (`clusterIP: None`),
//! ExternalName Services, and Services without an IPv4 ClusterIP. Endpoints come from the
//! IPv4 slices, the slice port of the same name and protocol as the Service port; by their
//! conditions (kube-proxy's `CategorizeEndpoints`): `ready` (nil counts as ready, as the API
//! says) endpoints serve; ones `serving` and `terminating` but not ready serve only when no
//! ready one is there; the rest not at all. SCTP ports are left out. Which endpoints are this
//! node's (for `internalTrafficPolicy: Local`) is decided by address, within the node's lease:
//! what `nodeName` says for a pod's address.

use crate::services::{self, ServicesError};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use podwire_dataplane::nat::ServiceSpec;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

/// The label that ties a slice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label selector kube-proxy lists Services and EndpointSlices with.
pub const PROXY_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
/// Labels that make kube-proxy leave a Service alone (the selector above, for records that
/// did not come through it).
const SKIP_LABELS: [&str; 2] = [
    "service.kubernetes.io/service-proxy-name",
    "service.kubernetes.io/headless",
];

fn ns_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or_default()
    )
}

/// The endpoints of one Service port, (ready, serving-terminating): every IPv4 address of the
/// IPv4 slices, the slice port matched by name and protocol. An address that does not parse is
/// left out (the API server would have refused it).
fn endpoints(
    slices: &[&EndpointSlice],
    port_name: &str,
    protocol: &str,
) -> (Vec<SocketAddrV4>, Vec<SocketAddrV4>) {
    let (mut ready, mut terminating) = (Vec::new(), Vec::new());
    for slice in slices.iter().filter(|s| s.address_type == "IPv4") {
        let port = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or_default() == port_name
                && p.protocol.as_deref().unwrap_or("TCP") == protocol
        });
        let Some(port) = port
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            let c = ep.conditions.as_ref();
            let is_ready = c.and_then(|c| c.ready) != Some(false);
            let serving = c.and_then(|c| c.serving).unwrap_or(is_ready);
            let is_terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            let list = if is_ready {
                &mut ready
            } else if serving && is_terminating {
                &mut terminating
            } else {
                continue;
            };
            for address in &ep.addresses {
                if let Ok(ip) = address.parse::<Ipv4Addr>() {
                    list.push(SocketAddrV4::new(ip, port));
                }
            }
        }
    }
    (ready, terminating)
}

/// The service ports of `svc` with the endpoints of `slices` (those of this Service), named as
/// kube-proxy names service ports (`namespace/name`, with `:port-name` if named). A Service
/// kube-proxy skips gives none; one whose fields podwire cannot serve is an error.
pub fn specs(svc: &Service, slices: &[&EndpointSlice]) -> Result<Vec<ServiceSpec>, ServicesError> {
    let name = ns_name(&svc.metadata);
    let invalid = |why: String| ServicesError::Invalid {
        name: name.clone(),
        why,
    };
    let labels = svc.metadata.labels.as_ref();
    if SKIP_LABELS
        .iter()
        .any(|l| labels.is_some_and(|m| m.contains_key(*l)))
    {
        return Ok(Vec::new());
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(Vec::new());
    };
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    let Some(cluster_ip) = spec
        .cluster_ip
        .as_deref()
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
    else {
        return Ok(Vec::new()); // headless ("None"), IPv6-only, or none yet
    };
    if kind == "ExternalName" {
        return Ok(Vec::new());
    }
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        .map(u32::try_from)
        .transpose()
        .map_err(|_| invalid("sessionAffinity timeoutSeconds below 0".into()))?;
    let affinity_timeout =
        services::session_affinity(spec.session_affinity.as_deref(), timeout).map_err(invalid)?;
    let internal_local = match spec.internal_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            return Err(invalid(format!(
                "internalTrafficPolicy {other:?}: Cluster or Local"
            )))
        }
    };
    let external_ips = external_ips(svc, kind).map_err(invalid)?;
    let external_local = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            return Err(invalid(format!(
                "externalTrafficPolicy {other:?}: Cluster or Local"
            )))
        }
    };
    let health_check_node_port = match spec.health_check_node_port.filter(|_| external_local) {
        None => None,
        Some(p) => Some(
            u16::try_from(p)
                .map_err(|_| invalid(format!("healthCheckNodePort {p}: not 0-65535")))?,
        ),
    };
    let mut out = Vec::new();
    for port in spec.ports.iter().flatten() {
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        let Some(proto) = services::protocol(protocol) else {
            continue; // SCTP
        };
        let port_name = port.name.as_deref().unwrap_or_default();
        let number = u16::try_from(port.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid(format!("port {}: not 1-65535", port.port)))?;
        let node_port = match (kind, port.node_port) {
            ("ClusterIP", _) | (_, None) => None,
            (_, Some(np)) => Some(
                u16::try_from(np).map_err(|_| invalid(format!("nodePort {np}: not 0-65535")))?,
            ),
        };
        let (ready, terminating) = endpoints(slices, port_name, protocol);
        out.push(ServiceSpec {
            // kube-proxy's name for a service port: `namespace/name`, `:port-name` if named.
            name: if port_name.is_empty() {
                name.clone()
            } else {
                format!("{name}:{port_name}")
            },
            cluster_ip,
            port: number,
            proto,
            endpoints: ready,
            terminating,
            affinity_timeout,
            node_port,
            internal_local,
            external_ips: external_ips.clone(),
            external_local,
            health_check_node_port,
        });
    }
    Ok(out)
}

/// The addresses outside the cluster a Service is served on, as kube-proxy reads them: its
/// `externalIPs`, and for type LoadBalancer the ingress IPs of its status whose `ipMode` is
/// VIP (or unset; `Proxy` means the load balancer delivers to the node itself). IPv6 ones
/// belong to the other family's proxier and are skipped; anything else that is no address is
/// an error.
fn external_ips(svc: &Service, kind: &str) -> Result<Vec<Ipv4Addr>, String> {
    let listed = svc
        .spec
        .iter()
        .flat_map(|s| s.external_ips.iter().flatten());
    let ingress = svc
        .status
        .iter()
        .filter(|_| kind == "LoadBalancer")
        .filter_map(|s| s.load_balancer.as_ref())
        .flat_map(|lb| lb.ingress.iter().flatten())
        .filter(|i| i.ip_mode.as_deref().is_none_or(|m| m == "VIP"))
        .filter_map(|i| i.ip.as_deref().filter(|ip| !ip.is_empty()));
    let mut out = Vec::new();
    for (what, text) in listed
        .map(|t| ("externalIPs", t.as_str()))
        .chain(ingress.map(|t| ("load balancer ingress", t)))
    {
        match text.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(ip)) => out.push(ip),
            Ok(std::net::IpAddr::V6(_)) => {}
            Err(_) => return Err(format!("{what} {text:?} is no IP address")),
        }
    }
    Ok(out)
}

/// The slices of each Service (by `namespace/name`), by their service-name label.
fn slices_by_service(
    slices: &BTreeMap<String, EndpointSlice>,
) -> BTreeMap<String, Vec<&EndpointSlice>> {
    let mut by_service: BTreeMap<String, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices.values() {
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let ns = slice.metadata.namespace.as_deref().unwrap_or("default");
        by_service
            .entry(format!("{ns}/{service}"))
            .or_default()
            .push(slice);
    }
    by_service
}

/// One API record per Service (`{"service": ..., "endpointSlices": [...]}`, what
/// [`crate::services`] parses) keyed `namespace/name`: the objects as the API holds them.
pub fn records(
    services: &BTreeMap<String, Service>,
    slices: &BTreeMap<String, EndpointSlice>,
) -> Vec<(String, Vec<u8>)> {
    let by_service = slices_by_service(slices);
    services
        .values()
        .map(|svc| {
            let name = ns_name(&svc.metadata);
            let slices = by_service.get(&name).map(Vec::as_slice).unwrap_or_default();
            let record = json!({"service": svc, "endpointSlices": slices});
            (name, record.to_string().into_bytes())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::parse_etcd;
    use podwire_dataplane::conntrack::{PROTO_TCP, PROTO_UDP};
    use serde_json::Value;

    fn service(v: Value) -> Service {
        serde_json::from_value(v).unwrap()
    }
    fn slice(v: Value) -> EndpointSlice {
        serde_json::from_value(v).unwrap()
    }

    fn cluster() -> (BTreeMap<String, Service>, BTreeMap<String, EndpointSlice>) {
        let services = [
            service(json!({"metadata": {"namespace": "default", "name": "web"},
                "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "sessionAffinity": "ClientIP",
                         "internalTrafficPolicy": "Local",
                         "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                         "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080},
                                   {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}]}})),
            service(
                json!({"metadata": {"namespace": "default", "name": "headless"},
                "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}),
            ),
            service(json!({"metadata": {"namespace": "default", "name": "ext"},
                "spec": {"type": "ExternalName", "externalName": "example.com"}})),
        ];
        let slices = [slice(json!({
        "metadata": {"namespace": "default", "name": "web-1",
                     "labels": {SERVICE_NAME_LABEL: "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                  {"name": "dns", "port": 5353, "protocol": "UDP"}],
        "endpoints": [
            {"addresses": ["10.244.2.2"], "conditions": {"ready": true}},
            {"addresses": ["10.244.3.2"]},
            {"addresses": ["10.244.4.2"], "conditions": {"ready": false, "serving": true, "terminating": true}}
        ]}))];
        (
            services
                .into_iter()
                .map(|s| (ns_name(&s.metadata), s))
                .collect(),
            slices
                .into_iter()
                .map(|s| (ns_name(&s.metadata), s))
                .collect(),
        )
    }

    #[test]
    fn test_service_ports_become_specs_through_the_records() {
        let (services, slices) = cluster();
        let recs = records(&services, &slices);
        let keys: Vec<&str> = recs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["default/ext", "default/headless", "default/web"]);
        // The records are what the NAT's parser takes, as etcd's are.
        let keyed: Vec<(String, Vec<u8>)> = recs
            .into_iter()
            .map(|(k, v)| (format!("/x/services/{k}"), v))
            .collect();
        let parsed = parse_etcd(&keyed);
        assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
        let names: Vec<&str> = parsed.specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["default/web:http", "default/web:dns"],
            "headless and ExternalName skipped"
        );
        let ep = |last: u8, port: u16| SocketAddrV4::new(Ipv4Addr::new(10, 244, last, 2), port);
        let http = &parsed.specs[0];
        assert_eq!(
            (http.cluster_ip, http.port, http.proto),
            (Ipv4Addr::new(10, 96, 0, 10), 80, PROTO_TCP)
        );
        assert_eq!(http.endpoints, [ep(2, 8080), ep(3, 8080)]);
        assert_eq!(
            http.terminating,
            [ep(4, 8080)],
            "ready false, serving, terminating"
        );
        assert_eq!(http.affinity_timeout, Some(60));
        assert_eq!(http.node_port, Some(30080));
        assert!(http.internal_local);
        let dns = &parsed.specs[1];
        assert_eq!((dns.proto, dns.node_port), (PROTO_UDP, Some(30053)));
        assert_eq!(dns.endpoints[0], ep(2, 5353));
    }

    /// externalIPs and a LoadBalancer's VIP-mode ingress IPs are served; a Proxy-mode
    /// ingress, an IPv6 address (the other family's) and a ClusterIP Service's stale status
    /// are not; something that is no address is an error naming it.
    #[test]
    fn test_external_and_load_balancer_ips_are_read_as_kube_proxy_reads_them() {
        let lb = |kind: &str, external: Value| {
            service(json!({"metadata": {"namespace": "default", "name": "lb"},
                "spec": {"type": kind, "clusterIP": "10.96.0.20", "ports": [{"port": 80}],
                         "externalIPs": external},
                "status": {"loadBalancer": {"ingress": [
                    {"ip": "198.51.100.10"},
                    {"ip": "198.51.100.11", "ipMode": "VIP"},
                    {"ip": "198.51.100.12", "ipMode": "Proxy"},
                    {"ip": "2001:db8::1"},
                    {"hostname": "lb.example.com"}]}}}))
        };
        let ips =
            |kind, external| specs(&lb(kind, external), &[]).map(|s| s[0].external_ips.clone());
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            ips("LoadBalancer", json!(["192.0.2.10", "2001:db8::2"])).unwrap(),
            [ip("192.0.2.10"), ip("198.51.100.10"), ip("198.51.100.11")]
        );
        assert_eq!(
            ips("ClusterIP", json!(["192.0.2.10"])).unwrap(),
            [ip("192.0.2.10")]
        );
        let err = ips("LoadBalancer", json!(["192.0.2.300"])).unwrap_err();
        assert!(
            err.to_string().contains("\"192.0.2.300\" is no IP address"),
            "{err}"
        );
    }

    #[test]
    fn test_a_service_without_slices_has_no_endpoints() {
        let (services, _) = cluster();
        let web = &services["default/web"];
        let specs = specs(web, &[]).unwrap();
        assert!(specs
            .iter()
            .all(|s| s.endpoints.is_empty() && s.terminating.is_empty()));
    }

    #[test]
    fn test_endpoints_neither_ready_nor_serving_terminating_are_left_out() {
        let (services, _) = cluster();
        let s = slice(json!({
        "metadata": {"namespace": "default", "name": "web-2"},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [
            {"addresses": ["10.244.5.2"], "conditions": {"ready": false}},
            {"addresses": ["10.244.6.2"], "conditions": {"ready": false, "serving": true}},
            {"addresses": ["10.244.7.2"], "conditions": {"ready": false, "serving": false, "terminating": true}},
            {"addresses": ["not-an-address"]}
        ]}));
        let specs = specs(&services["default/web"], &[&s]).unwrap();
        assert!(specs[0].endpoints.is_empty() && specs[0].terminating.is_empty());
    }

    #[test]
    fn test_fields_podwire_cannot_serve_are_errors_and_skipped_services_give_none() {
        let bad = [
            json!({"metadata": {"name": "a"}, "spec": {"clusterIP": "10.96.0.1",
                "internalTrafficPolicy": "Nearby", "ports": [{"port": 80}]}}),
            json!({"metadata": {"name": "b"}, "spec": {"clusterIP": "10.96.0.1",
                "sessionAffinity": "Cookie", "ports": [{"port": 80}]}}),
            json!({"metadata": {"name": "c"}, "spec": {"clusterIP": "10.96.0.1",
                "ports": [{"port": 70000}]}}),
        ];
        for b in bad {
            let e = specs(&service(b.clone()), &[]).unwrap_err().to_string();
            assert!(e.contains("default/"), "{e}");
        }
        let other_proxy = service(json!({"metadata": {"name": "d",
            "labels": {"service.kubernetes.io/service-proxy-name": "other"}},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}}));
        assert!(specs(&other_proxy, &[]).unwrap().is_empty());
    }
}
