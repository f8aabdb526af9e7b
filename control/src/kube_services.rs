//! Services from the Kubernetes API, as kube-proxy reads them: Services and
//! `discovery.k8s.io/v1` EndpointSlices turned into the service records podwire's NAT reads
//! (the objects of [`crate::services`], one per Service port).
//!
//! What kube-proxy skips is skipped: Services labelled `service.kubernetes.io/service-proxy-name`
//! (another proxy's) or `service.kubernetes.io/headless`, headless Services (`clusterIP: None`),
//! ExternalName Services, and Services without an IPv4 ClusterIP. Endpoints come from the
//! IPv4 slices labelled `kubernetes.io/service-name` with the Service's name in its namespace;
//! an endpoint is used when `ready` is not false (nil counts as ready, as the API says), with
//! the slice port of the same name and protocol as the Service port. SCTP ports are left out.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// The label that ties a slice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label selector kube-proxy lists Services and EndpointSlices with.
pub const PROXY_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

fn ns_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or_default()
    )
}

/// The endpoints of one Service port: (address, port) of every ready endpoint of the IPv4
/// slices, the slice port matched by name and protocol.
fn endpoints(slices: &[&EndpointSlice], port_name: &str, protocol: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for slice in slices.iter().filter(|s| s.address_type == "IPv4") {
        let port = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or_default() == port_name
                && p.protocol.as_deref().unwrap_or("TCP") == protocol
        });
        let Some(port) = port.and_then(|p| p.port) else {
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready) != Some(false);
            if !ready {
                continue;
            }
            for address in &ep.addresses {
                out.push(json!({"ip": address, "port": port}));
            }
        }
    }
    out
}

/// The service records of `services` with the endpoints of `slices`, one per Service port,
/// keyed as kube-proxy names service ports (`namespace/name`, with `:port-name` if named).
pub fn records(
    services: &BTreeMap<String, Service>,
    slices: &BTreeMap<String, EndpointSlice>,
) -> Vec<(String, Vec<u8>)> {
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
    let mut out = Vec::new();
    for svc in services.values() {
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
        let Some(cluster_ip) = spec
            .cluster_ip
            .as_deref()
            .filter(|ip| ip.parse::<std::net::Ipv4Addr>().is_ok())
        else {
            continue; // headless ("None"), IPv6-only, or none yet
        };
        if kind == "ExternalName" {
            continue;
        }
        let name = ns_name(&svc.metadata);
        let slices = by_service.get(&name).map(Vec::as_slice).unwrap_or_default();
        for port in spec.ports.iter().flatten() {
            let protocol = port.protocol.as_deref().unwrap_or("TCP");
            if protocol != "TCP" && protocol != "UDP" {
                continue;
            }
            let port_name = port.name.as_deref().unwrap_or_default();
            let mut record = json!({
                "clusterIP": cluster_ip,
                "protocol": protocol,
                "port": port.port,
                "endpoints": endpoints(slices, port_name, protocol),
            });
            if spec.session_affinity.as_deref() == Some("ClientIP") {
                record["sessionAffinity"] = json!("ClientIP");
                if let Some(t) = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds)
                {
                    record["sessionAffinityTimeoutSeconds"] = json!(t);
                }
            }
            if kind != "ClusterIP" {
                if let Some(np) = port.node_port {
                    record["nodePort"] = json!(np);
                }
            }
            // kube-proxy's name for a service port: `namespace/name`, `:port-name` if named.
            let key = if port_name.is_empty() {
                name.clone()
            } else {
                format!("{name}:{port_name}")
            };
            out.push((key, record.to_string().into_bytes()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::parse_etcd;

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
    fn test_service_ports_become_records_podwire_parses() {
        let (services, slices) = cluster();
        let recs = records(&services, &slices);
        let keys: Vec<&str> = recs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["default/web:http", "default/web:dns"],
            "headless and ExternalName skipped"
        );
        let http: Value = serde_json::from_slice(&recs[0].1).unwrap();
        assert_eq!(
            http,
            json!({"clusterIP": "10.96.0.10", "protocol": "TCP", "port": 80,
                   "endpoints": [{"ip": "10.244.2.2", "port": 8080}, {"ip": "10.244.3.2", "port": 8080}],
                   "sessionAffinity": "ClientIP", "sessionAffinityTimeoutSeconds": 60,
                   "nodePort": 30080})
        );
        let dns: Value = serde_json::from_slice(&recs[1].1).unwrap();
        assert_eq!(
            dns["endpoints"][0],
            json!({"ip": "10.244.2.2", "port": 5353})
        );
        // The records are what the NAT's parser takes, as etcd's are.
        let keyed: Vec<(String, Vec<u8>)> = recs
            .into_iter()
            .map(|(k, v)| (format!("/x/services/{k}"), v))
            .collect();
        let parsed = parse_etcd(&keyed);
        assert_eq!((parsed.specs.len(), parsed.rejected.len()), (2, 0));
    }

    #[test]
    fn test_a_service_without_slices_has_no_endpoints() {
        let (services, _) = cluster();
        let recs = records(&services, &BTreeMap::new());
        let http: Value = serde_json::from_slice(&recs[0].1).unwrap();
        assert_eq!(http["endpoints"], json!([]));
    }
}
