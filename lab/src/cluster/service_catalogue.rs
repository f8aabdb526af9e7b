//! The lab's services as one model, rendered for each side that serves them: API records (a
//! Service and its EndpointSlice, `{"service": ..., "endpointSlices": [...]}`) for podwire,
//! whether from the services file, etcd or the Kubernetes API; kube-proxy's iptables rules
//! for the kernel baseline (`kube_proxy_rules`).
//!
//! The baseline reads endpoint conditions and traffic policies by itself (`Usable`), from
//! kube-proxy's rules as documented (pkg/proxy/topology.go), not through podwire's code: the
//! lab compares two implementations, not one with itself.

use serde_json::{json, Value};
use std::net::Ipv4Addr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn api(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }

    pub fn iptables(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One port of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// The port's name ("" for a Service's single unnamed port).
    pub name: &'static str,
    pub proto: Proto,
    pub port: u16,
    /// The endpoints' port.
    pub target: u16,
    pub node_port: Option<u16>,
}

/// An endpoint's conditions as an EndpointSlice states them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// ready, serving, not terminating.
    Ready,
    /// Not ready, still serving, terminating: a pod being deleted that still answers.
    Terminating,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    /// The node the pod runs on (its `nodeName` is `n<node>`).
    pub node: u8,
    pub condition: Condition,
}

impl Endpoint {
    pub fn ready(ip: Ipv4Addr, node: u8) -> Self {
        Endpoint {
            ip,
            node,
            condition: Condition::Ready,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// `namespace/name`.
    pub name: String,
    pub vip: Ipv4Addr,
    pub ports: Vec<Port>,
    pub endpoints: Vec<Endpoint>,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `sessionAffinity: ClientIP` with this timeout.
    pub affinity_secs: Option<u32>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<Ipv4Addr>,
    /// A LoadBalancer's ingress IPs (`status.loadBalancer.ingress`, ipMode VIP); with any,
    /// the Service is of type LoadBalancer.
    pub lb_ips: Vec<Ipv4Addr>,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// `healthCheckNodePort` (kube-apiserver gives one to a LoadBalancer with the Local
    /// policy): with it, the Service is of type LoadBalancer.
    pub health_check_node_port: Option<u16>,
}

impl Service {
    /// A Service with one unnamed port and ready endpoints.
    pub fn simple(
        name: impl Into<String>,
        vip: Ipv4Addr,
        proto: Proto,
        port: u16,
        target: u16,
        ready: &[(Ipv4Addr, u8)],
    ) -> Self {
        Service {
            name: name.into(),
            vip,
            ports: vec![Port {
                name: "",
                proto,
                port,
                target,
                node_port: None,
            }],
            endpoints: ready
                .iter()
                .map(|&(ip, n)| Endpoint::ready(ip, n))
                .collect(),
            internal_local: false,
            affinity_secs: None,
            external_ips: Vec::new(),
            lb_ips: Vec::new(),
            external_local: false,
            health_check_node_port: None,
        }
    }

    /// Where traffic from outside the cluster may reach the Service besides its NodePorts:
    /// its external IPs and load balancer IPs, which kube-proxy treats alike.
    pub fn outside_ips(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.external_ips.iter().chain(&self.lb_ips).copied()
    }

    fn split_name(&self) -> (&str, &str) {
        self.name.split_once('/').unwrap_or(("default", &self.name))
    }

    /// The Service and its EndpointSlice as the API holds them.
    pub fn api_record(&self) -> Value {
        let (ns, name) = self.split_name();
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| {
                let mut v =
                    json!({"port": p.port, "protocol": p.proto.api(), "targetPort": p.target});
                if !p.name.is_empty() {
                    v["name"] = json!(p.name);
                }
                if let Some(np) = p.node_port {
                    v["nodePort"] = json!(np);
                }
                v
            })
            .collect();
        let node_port = self.ports.iter().any(|p| p.node_port.is_some());
        let kind = if !self.lb_ips.is_empty() || self.health_check_node_port.is_some() {
            "LoadBalancer"
        } else if node_port {
            "NodePort"
        } else {
            "ClusterIP"
        };
        let mut spec = json!({
            "type": kind,
            "clusterIP": self.vip.to_string(),
            "ports": ports,
            "internalTrafficPolicy": if self.internal_local { "Local" } else { "Cluster" },
        });
        if let Some(t) = self.affinity_secs {
            spec["sessionAffinity"] = json!("ClientIP");
            spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": t}});
        }
        if !self.external_ips.is_empty() {
            spec["externalIPs"] = json!(self.external_ips);
        }
        if kind == "LoadBalancer" {
            // Without NodePorts, as `allocateLoadBalancerNodePorts: false` makes it.
            spec["allocateLoadBalancerNodePorts"] = json!(node_port);
        }
        if kind != "ClusterIP" || !self.external_ips.is_empty() {
            spec["externalTrafficPolicy"] = json!(if self.external_local {
                "Local"
            } else {
                "Cluster"
            });
        }
        if let Some(port) = self.health_check_node_port {
            spec["healthCheckNodePort"] = json!(port);
        }
        let slice_ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| {
                let mut v = json!({"port": p.target, "protocol": p.proto.api()});
                if !p.name.is_empty() {
                    v["name"] = json!(p.name);
                }
                v
            })
            .collect();
        let endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .map(|e| {
                let ready = e.condition == Condition::Ready;
                json!({
                    "addresses": [e.ip.to_string()],
                    "conditions": {"ready": ready, "serving": true, "terminating": !ready},
                    "nodeName": format!("n{}", e.node),
                })
            })
            .collect();
        let ingress: Vec<Value> = self
            .lb_ips
            .iter()
            .map(|ip| json!({"ip": ip, "ipMode": "VIP"}))
            .collect();
        let mut service = json!({"metadata": {"namespace": ns, "name": name}, "spec": spec});
        if !ingress.is_empty() {
            service["status"] = json!({"loadBalancer": {"ingress": ingress}});
        }
        json!({
            "service": service,
            "endpointSlices": [{
                "metadata": {"namespace": ns, "name": format!("{name}-lab"),
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "ports": slice_ports,
                "endpoints": endpoints,
            }],
        })
    }
}

/// The services file: every Service as an API record.
pub fn file_json(services: &[Service]) -> Value {
    json!({"services": services.iter().map(Service::api_record).collect::<Vec<_>>()})
}

/// Which endpoints a node's kube-proxy uses for a Service's traffic from pods, as kube-proxy
/// documents it: ready endpoints, or, when none is ready anywhere, the serving terminating ones;
/// with `internalTrafficPolicy: Local` the same choice among this node's endpoints alone.
#[derive(Debug, PartialEq, Eq)]
pub enum Usable {
    /// These endpoints.
    Endpoints(Vec<Endpoint>),
    /// None anywhere: the traffic is rejected.
    NoneAnywhere,
    /// None on this node, some elsewhere (Local policy): the traffic is dropped.
    NoneHere,
}

impl Service {
    /// The endpoints of traffic from pods (`internalTrafficPolicy`).
    pub fn usable(&self, node: u8) -> Usable {
        self.usable_by(node, self.internal_local)
    }

    /// The endpoints of traffic under a policy that is Local (`local`) or Cluster.
    pub fn usable_by(&self, node: u8, local: bool) -> Usable {
        let choose = |on_node: bool| -> Vec<Endpoint> {
            let here = |e: &&Endpoint| !on_node || e.node == node;
            let ready: Vec<Endpoint> = self
                .endpoints
                .iter()
                .filter(here)
                .filter(|e| e.condition == Condition::Ready)
                .cloned()
                .collect();
            if !ready.is_empty() {
                return ready;
            }
            self.endpoints
                .iter()
                .filter(here)
                .filter(|e| e.condition == Condition::Terminating)
                .cloned()
                .collect()
        };
        let anywhere = choose(false);
        if anywhere.is_empty() {
            return Usable::NoneAnywhere;
        }
        if !local {
            return Usable::Endpoints(anywhere);
        }
        match choose(true) {
            here if here.is_empty() => Usable::NoneHere,
            here => Usable::Endpoints(here),
        }
    }
}

/// kube-proxy's iptables-mode rules on `node` for `services` (pkg/proxy/iptables/proxier.go):
/// nat KUBE-SERVICES -> KUBE-SVC-* (ClientIP affinity: `recent --rcheck` per endpoint first;
/// then endpoint i of n with probability 1/(n-i), the last unconditional) -> KUBE-SEP-*
/// (hairpin marked for masquerade; `recent --set` with affinity; DNAT), KUBE-POSTROUTING
/// masquerading marked packets; in filter, a service port without endpoints REJECTed, one with
/// none on this node under the Local policy DROPped, and conntrack's INVALID dropped in
/// FORWARD (KUBE-FORWARD).
pub fn kube_proxy_rules(services: &[Service], node: u8) -> String {
    let mut nat = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n\
         -A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -j KUBE-SERVICES\n-A POSTROUTING -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -j MASQUERADE --random-fully\n",
    );
    let mut filter = String::from(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n\
         -A FORWARD -j KUBE-FORWARD\n\
         -A FORWARD -m conntrack --ctstate NEW -j KUBE-SERVICES\n\
         -A OUTPUT -m conntrack --ctstate NEW -j KUBE-SERVICES\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
    );
    let mut chains = String::new();
    let mut rules = String::new();
    for (s, svc) in services.iter().enumerate() {
        for (p, port) in svc.ports.iter().enumerate() {
            let vip = svc.vip;
            let proto = port.proto.iptables();
            let to =
                |ip: Ipv4Addr| format!("-d {ip}/32 -p {proto} -m {proto} --dport {}", port.port);
            let matches = to(vip);
            let eps = match svc.usable(node) {
                Usable::NoneAnywhere => {
                    for ip in std::iter::once(vip).chain(svc.outside_ips()) {
                        filter.push_str(&format!(
                            "-A KUBE-SERVICES {} -j REJECT --reject-with icmp-port-unreachable\n",
                            to(ip)
                        ));
                    }
                    continue;
                }
                Usable::NoneHere => {
                    filter.push_str(&format!("-A KUBE-SERVICES {matches} -j DROP\n"));
                    continue;
                }
                Usable::Endpoints(eps) => eps,
            };
            let svc_chain = format!("KUBE-SVC-{s}-{p}");
            chains.push_str(&format!(":{svc_chain} - [0:0]\n"));
            rules.push_str(&format!("-A KUBE-SERVICES {matches} -j {svc_chain}\n"));
            // External and load balancer IPs: externalTrafficPolicy Cluster, masqueraded
            // (it may come from outside and cross nodes), then the service's endpoints. (The
            // model gives them only to Services whose internal policy is Cluster too.)
            if svc.outside_ips().next().is_some() {
                let ext_chain = format!("KUBE-EXT-{s}-{p}");
                chains.push_str(&format!(":{ext_chain} - [0:0]\n"));
                for ip in svc.outside_ips() {
                    rules.push_str(&format!("-A KUBE-SERVICES {} -j {ext_chain}\n", to(ip)));
                }
                rules.push_str(&format!(
                    "-A {ext_chain} -j KUBE-MARK-MASQ\n-A {ext_chain} -j {svc_chain}\n"
                ));
            }
            let sep = |i: usize| format!("KUBE-SEP-{s}-{p}-{i}");
            if let Some(secs) = svc.affinity_secs {
                for i in 0..eps.len() {
                    rules.push_str(&format!(
                        "-A {svc_chain} -m recent --name {} --rcheck --seconds {secs} --reap -j {}\n",
                        sep(i),
                        sep(i)
                    ));
                }
            }
            let n = eps.len();
            for (i, ep) in eps.iter().enumerate() {
                chains.push_str(&format!(":{} - [0:0]\n", sep(i)));
                if i + 1 < n {
                    rules.push_str(&format!(
                        "-A {svc_chain} -m statistic --mode random --probability {:.10} -j {}\n",
                        1.0 / (n - i) as f64,
                        sep(i)
                    ));
                } else {
                    rules.push_str(&format!("-A {svc_chain} -j {}\n", sep(i)));
                }
                let recent = if svc.affinity_secs.is_some() {
                    format!(" -m recent --name {} --set", sep(i))
                } else {
                    String::new()
                };
                rules.push_str(&format!(
                    "-A {sep} -s {ip}/32 -j KUBE-MARK-MASQ\n-A {sep}{recent} -p {proto} -m {proto} -j DNAT --to-destination {ip}:{target}\n",
                    sep = sep(i),
                    ip = ep.ip,
                    target = port.target,
                ));
            }
        }
    }
    nat.push_str(&chains);
    nat.push_str(&rules);
    nat.push_str("COMMIT\n");
    filter.push_str("COMMIT\n");
    nat + &filter
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, n, 2)
    }

    fn svc(endpoints: Vec<Endpoint>, internal_local: bool) -> Service {
        Service {
            endpoints,
            internal_local,
            ..Service::simple(
                "default/t",
                Ipv4Addr::new(10, 96, 0, 1),
                Proto::Tcp,
                80,
                8080,
                &[],
            )
        }
    }

    fn terminating(ip: Ipv4Addr, node: u8) -> Endpoint {
        Endpoint {
            ip,
            node,
            condition: Condition::Terminating,
        }
    }

    #[test]
    fn test_the_baseline_categorises_as_kube_proxy_documents() {
        let (r1, r2, t2) = (
            Endpoint::ready(ip(1), 1),
            Endpoint::ready(ip(2), 2),
            terminating(ip(3), 2),
        );
        // Ready ones win; terminating ones only when no ready one exists.
        let s = svc(vec![r2.clone(), t2.clone()], false);
        assert_eq!(s.usable(1), Usable::Endpoints(vec![r2.clone()]));
        let s = svc(vec![t2.clone()], false);
        assert_eq!(s.usable(1), Usable::Endpoints(vec![t2.clone()]));
        assert_eq!(svc(vec![], false).usable(1), Usable::NoneAnywhere);
        // Local: this node's only; none here but some elsewhere is a drop.
        let s = svc(vec![r1.clone(), r2.clone()], true);
        assert_eq!(s.usable(1), Usable::Endpoints(vec![r1]));
        assert_eq!(svc(vec![r2, t2], true).usable(1), Usable::NoneHere);
        assert_eq!(svc(vec![], true).usable(1), Usable::NoneAnywhere);
    }

    #[test]
    fn test_the_rules_hold_each_behaviour() {
        let mut s = svc(
            vec![Endpoint::ready(ip(2), 2), Endpoint::ready(ip(3), 3)],
            false,
        );
        s.affinity_secs = Some(2);
        let rules = kube_proxy_rules(
            &[
                s,
                svc(vec![], false),
                svc(vec![Endpoint::ready(ip(2), 2)], true),
            ],
            1,
        );
        assert!(rules.contains("-A KUBE-SVC-0-0 -m recent --name KUBE-SEP-0-0-0 --rcheck --seconds 2 --reap -j KUBE-SEP-0-0-0\n"));
        assert!(rules.contains("-A KUBE-SEP-0-0-1 -m recent --name KUBE-SEP-0-0-1 --set -p tcp -m tcp -j DNAT --to-destination 10.244.3.2:8080\n"));
        assert!(
            rules.contains("-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j REJECT")
        );
        assert!(
            rules.contains("-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j DROP\n")
        );
        assert!(rules.contains("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n"));
    }

    /// External and load balancer IPs: KUBE-EXT (masquerade, then the service's chain); no
    /// endpoints: rejected at each of them too.
    #[test]
    fn test_external_and_load_balancer_ips_in_the_iptables_rules() {
        let mut s = svc(vec![Endpoint::ready(ip(2), 2)], false);
        s.external_ips = vec![Ipv4Addr::new(192, 0, 2, 10)];
        s.lb_ips = vec![Ipv4Addr::new(198, 51, 100, 10)];
        let mut none = svc(vec![], false);
        none.external_ips = vec![Ipv4Addr::new(192, 0, 2, 13)];
        let rules = kube_proxy_rules(&[s, none], 1);
        for ip in ["192.0.2.10", "198.51.100.10"] {
            assert!(rules.contains(&format!(
                "-A KUBE-SERVICES -d {ip}/32 -p tcp -m tcp --dport 80 -j KUBE-EXT-0-0\n"
            )));
        }
        assert!(
            rules.contains("-A KUBE-EXT-0-0 -j KUBE-MARK-MASQ\n-A KUBE-EXT-0-0 -j KUBE-SVC-0-0\n")
        );
        assert!(
            rules.contains("-A KUBE-SERVICES -d 192.0.2.13/32 -p tcp -m tcp --dport 80 -j REJECT")
        );
    }
}
