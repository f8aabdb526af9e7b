//! kube-proxy's nftables-mode ruleset for the lab's kernel baseline: the `ip kube-proxy` table
//! that kube-proxy's nftables proxier (kubernetes pkg/proxy/nftables/proxier.go, GA in 1.33)
//! writes on one node, rendered from the lab's service model as an `nft -f` script. IPv4 only.
//!
//! What the table holds, with kube-proxy's names (1.33's layout):
//! - base chains `filter-{prerouting,input,forward,output}` at priority -110 (dstnat - 10, so
//!   filtering sees the destination before DNAT), `filter-output-post-dnat` at -90,
//!   `nat-prerouting` / `nat-output` at -100 (dstnat) and `nat-postrouting` at 100 (srcnat);
//! - dispatch: `services` looks `ip daddr . meta l4proto . th dport` up in the verdict map
//!   `service-ips` and `meta l4proto . th dport` of local addresses in `service-nodeports`;
//! - per service port a policy chain, `service-<HASH>-<ns>/<name>/<proto>/<port>` (Cluster) or
//!   `local-<HASH>-...` (internalTrafficPolicy Local), picking an endpoint with
//!   `numgen random mod N vmap { i : goto endpoint-... }`; per endpoint `endpoint-<HASH>-...__<ip>/<port>`:
//!   hairpin traffic `jump mark-for-masquerade`, then `dnat to`;
//! - ClientIP affinity: per endpoint a dynamic set `affinity-<HASH>-...` (`flags dynamic,timeout`,
//!   the Service's timeout), checked first in the policy chain and updated in the endpoint chain;
//! - NodePorts, external IPs and load balancer IPs: an `external-<HASH>-...` chain behind
//!   `service-nodeports` and `service-ips`: externalTrafficPolicy Cluster masquerades, then
//!   goes to the Cluster chain; Local sends the node's own traffic there (masqueraded) and the
//!   rest to the `local-` chain of this node's endpoints, the client's address kept;
//! - no usable endpoints: `no-endpoint-services` / `no-endpoint-nodeports` verdict maps checked
//!   in the filter chains for new connections: `goto reject-chain` (ICMP port-unreachable) when
//!   there are none anywhere, `drop` when a Local policy finds none on this node;
//! - `cluster-ips` + `cluster-ips-check`: traffic to a ClusterIP on a port no Service uses is
//!   rejected; `mark-for-masquerade` (mark 0x4000) and `masquerading` (`masquerade fully-random`).
//!
//! HASH is kube-proxy's own: the first 8 characters of the base32 of the SHA-256 of the name,
//! so chain names are the ones kube-proxy would give the same Service.
//!
//! The script starts with `add table` + `delete table` and then creates the table, so one
//! `nft -f` replaces it atomically (conntrack entries, and so established NAT bindings,
//! survive). kube-proxy instead flushes and refills its chains and maps in place, which keeps
//! the affinity sets' entries; here a re-apply empties them.
//!
//! Left out, against kube-proxy: loadBalancerSourceRanges (`firewall-ips` and
//! `firewall-check` exist but stay empty), the health-check NodePorts of
//! externalTrafficPolicy Local (kube-proxy's Go server, not its rules), the node's own
//! traffic to a Local NodePort without endpoints here (dropped here; kube-proxy still sends it
//! to the Cluster chain), topology hints, IPv6, the masquerade rule for off-cluster sources
//! to ClusterIPs (kube-proxy writes it only when it knows the pod CIDR: it has no local-traffic
//! detector here, like the iptables baseline), the "drop unallocated ClusterIPs" rule (needs
//! the service CIDRs), stale-chain bookkeeping and conntrack cleanup (the caller's job).
//! NodePorts are accepted on every local address but 127.0.0.0/8 (`--nodeport-addresses`
//! matching all): kube-proxy 1.33's default, the node's primary IP alone, would need the
//! node's address, which this renderer is not given.
//!
//! No `ct state invalid drop`: kube-proxy's nftables mode does not install it (the Kubernetes
//! docs, "Migrating from iptables mode to nftables": no conntrack workaround; run with
//! `--conntrack-tcp-be-liberal`, which the lab's baseline does by setting
//! `nf_conntrack_tcp_be_liberal` on the node).

use super::service_catalogue::{Endpoint, Port, Service, Usable};
use sha2::{Digest, Sha256};

const TABLE: &str = "ip kube-proxy";
/// kube-proxy's default masquerade bit (14).
const MASQUERADE_MARK: &str = "0x4000";
/// kube-proxy's chainNameBaseLengthMax: nft's 256 less room for the longest prefix.
const NAME_BASE_MAX: usize = 240;

/// The base chains: name, type, hook, priority. Numbers, not `dstnat - 10`: nft 1.0.6 accepts
/// the named `dstnat` priority in prerouting only.
const BASE_CHAINS: [(&str, &str, &str, i32); 8] = [
    ("filter-prerouting", "filter", "prerouting", -110),
    ("filter-input", "filter", "input", -110),
    ("filter-forward", "filter", "forward", -110),
    ("filter-output", "filter", "output", -110),
    ("filter-output-post-dnat", "filter", "output", -90),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
];

/// Jumps from the base chains into the regular ones (from, condition, to), in kube-proxy's
/// order. The endpoint checks reject, which only input, forward and output may do (kernels
/// before 5.9), so they are not in prerouting.
const JUMPS: [(&str, &str, &str); 11] = [
    ("filter-input", "ct state new ", "nodeport-endpoints-check"),
    ("filter-input", "ct state new ", "service-endpoints-check"),
    ("filter-forward", "ct state new ", "service-endpoints-check"),
    ("filter-output", "ct state new ", "service-endpoints-check"),
    ("filter-prerouting", "ct state new ", "firewall-check"),
    ("filter-output", "ct state new ", "firewall-check"),
    ("nat-output", "", "services"),
    ("nat-prerouting", "", "services"),
    ("nat-postrouting", "", "masquerading"),
    ("filter-forward", "ct state new ", "cluster-ips-check"),
    (
        "filter-output-post-dnat",
        "ct state new ",
        "cluster-ips-check",
    ),
];

/// The verdict maps keyed by destination: name, comment.
const SERVICE_MAPS: [(&str, &str); 3] = [
    (
        "firewall-ips",
        "destinations that are subject to LoadBalancerSourceRanges",
    ),
    (
        "no-endpoint-services",
        "vmap to drop or reject packets to services with no endpoints",
    ),
    (
        "service-ips",
        "ClusterIP, ExternalIP and LoadBalancer IP traffic",
    ),
];

/// The verdict maps keyed by NodePort: name, comment.
const NODE_PORT_MAPS: [(&str, &str); 2] = [
    (
        "no-endpoint-nodeports",
        "vmap to drop or reject packets to service nodeports with no endpoints",
    ),
    ("service-nodeports", "NodePort traffic"),
];

/// The `nft -f` script that gives `node` kube-proxy's `ip kube-proxy` table for `services`.
pub fn kube_proxy_nft_rules(services: &[Service], node: u8) -> String {
    let mut script = Script::default();
    skeleton(&mut script);
    for svc in services {
        script.element("cluster-ips", &svc.vip.to_string());
        for port in &svc.ports {
            service_port(&mut script, svc, port, node);
        }
    }
    script.render()
}

/// The script in three parts: every chain, set and map is declared before any rule or element
/// names it, as nft resolves names while it reads the one transaction.
#[derive(Default)]
struct Script {
    objects: String,
    rules: String,
    elements: String,
}

impl Script {
    /// `add <kind> ip kube-proxy <spec>`: a chain, set or map, with its name and properties.
    fn object(&mut self, kind: &str, spec: &str) {
        self.objects
            .push_str(&format!("add {kind} {TABLE} {spec}\n"));
    }

    fn chain(&mut self, name: &str) {
        self.object("chain", name);
    }

    fn rule(&mut self, chain: &str, rule: &str) {
        self.rules
            .push_str(&format!("add rule {TABLE} {chain} {rule}\n"));
    }

    fn element(&mut self, container: &str, element: &str) {
        self.elements.push_str(&format!(
            "add element {TABLE} {container} {{ {element} }}\n"
        ));
    }

    /// Replaces the table whole: `add` first so that `delete` finds one on a fresh node.
    fn render(self) -> String {
        format!(
            "add table {TABLE}\ndelete table {TABLE}\n\
             add table {TABLE} {{ comment \"rules for kube-proxy\" ; }}\n{}{}{}",
            self.objects, self.rules, self.elements
        )
    }
}

/// The part of the table that does not depend on the services (kube-proxy's setupNFTables).
fn skeleton(script: &mut Script) {
    for (name, kind, hook, priority) in BASE_CHAINS {
        let spec = format!("{name} {{ type {kind} hook {hook} priority {priority} ; }}");
        script.object("chain", &spec);
    }
    for chain in [
        "nodeport-endpoints-check",
        "service-endpoints-check",
        "firewall-check",
        "services",
        "masquerading",
        "cluster-ips-check",
        "mark-for-masquerade",
    ] {
        script.chain(chain);
    }
    script.object(
        "chain",
        "reject-chain { comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }",
    );
    script.object(
        "set",
        "cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }",
    );
    for (name, comment) in SERVICE_MAPS {
        let key = "ipv4_addr . inet_proto . inet_service";
        let spec = format!("{name} {{ type {key} : verdict ; comment \"{comment}\" ; }}");
        script.object("map", &spec);
    }
    for (name, comment) in NODE_PORT_MAPS {
        let key = "inet_proto . inet_service";
        let spec = format!("{name} {{ type {key} : verdict ; comment \"{comment}\" ; }}");
        script.object("map", &spec);
    }
    for (from, condition, to) in JUMPS {
        script.rule(from, &format!("{condition}jump {to}"));
    }
    skeleton_rules(script);
}

/// The rules of the regular chains the skeleton declares.
fn skeleton_rules(script: &mut Script) {
    let by_destination = "ip daddr . meta l4proto . th dport";
    let not_localhost = "ip daddr != 127.0.0.0/8";
    script.rule(
        "mark-for-masquerade",
        &format!("mark set mark or {MASQUERADE_MARK}"),
    );
    // Marked packets are masqueraded once: the mark is cleared first.
    script.rule(
        "masquerading",
        &format!("mark and {MASQUERADE_MARK} == 0 return"),
    );
    script.rule(
        "masquerading",
        &format!("mark set mark xor {MASQUERADE_MARK}"),
    );
    script.rule("masquerading", "masquerade fully-random");
    // In an ip table nft lists this as bare `reject`, kube-proxy's rule.
    script.rule("reject-chain", "reject with icmp type port-unreachable");
    script.rule(
        "service-endpoints-check",
        &format!("{by_destination} vmap @no-endpoint-services"),
    );
    script.rule(
        "nodeport-endpoints-check",
        &format!("{not_localhost} meta l4proto . th dport vmap @no-endpoint-nodeports"),
    );
    script.rule(
        "firewall-check",
        &format!("{by_destination} vmap @firewall-ips"),
    );
    script.rule(
        "cluster-ips-check",
        "ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"",
    );
    script.rule("services", &format!("{by_destination} vmap @service-ips"));
    script.rule(
        "services",
        &format!(
            "fib daddr type local {not_localhost} meta l4proto . th dport vmap @service-nodeports"
        ),
    );
}

/// kube-proxy's names for one service port's chains.
struct PortNames {
    /// `ns/name/proto/port`, which the endpoints' names extend.
    plain: String,
    /// `HASH-ns/name/proto/port`.
    hashed: String,
    /// `ns/name:port` (`ns/name` for an unnamed port), the elements' comment.
    display: String,
}

impl PortNames {
    fn new(svc: &Service, port: &Port) -> Self {
        let (ns, name) = svc.name.split_once('/').unwrap_or(("default", &svc.name));
        let plain = format!("{ns}/{name}/{}/{}", port.proto.iptables(), port.name);
        let display = match port.name {
            "" => format!("{ns}/{name}"),
            port_name => format!("{ns}/{name}:{port_name}"),
        };
        PortNames {
            hashed: hash_and_truncate(&plain),
            plain,
            display,
        }
    }

    /// The chain of the Cluster policy's endpoints.
    fn cluster_chain(&self) -> String {
        format!("service-{}", self.hashed)
    }

    /// The chain of this node's endpoints (Local policy).
    fn local_chain(&self) -> String {
        format!("local-{}", self.hashed)
    }

    /// Where NodePort traffic goes first.
    fn external_chain(&self) -> String {
        format!("external-{}", self.hashed)
    }

    /// `HASH-ns/name/proto/port__ip/target`, the base of an endpoint's chain and affinity set.
    fn endpoint(&self, ep: &Endpoint, port: &Port) -> String {
        hash_and_truncate(&format!("{}__{}/{}", self.plain, ep.ip, port.target))
    }
}

/// kube-proxy's hashAndTruncate: `name` behind the first 8 characters of the base32 of its
/// SHA-256 (telling apart names that differ in a digit, and keeping truncated ones unique).
fn hash_and_truncate(name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    let mut hashed = format!("{}-{name}", base32_of_40_bits(&digest[..5]));
    if hashed.len() > NAME_BASE_MAX {
        hashed.truncate(NAME_BASE_MAX - 3);
        hashed.push_str("...");
    }
    hashed
}

/// RFC 4648 base32 of 5 bytes: 8 characters, as the first 8 of Go's base32.StdEncoding.
fn base32_of_40_bits(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let bits = bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    (0..8)
        .rev()
        .map(|i| char::from(ALPHABET[((bits >> (i * 5)) & 31) as usize]))
        .collect()
}

/// The endpoints the Cluster policy uses on `node` (none: empty), whatever the Service's
/// policies.
fn cluster_endpoints(svc: &Service, node: u8) -> Vec<Endpoint> {
    match svc.usable_by(node, false) {
        Usable::Endpoints(eps) => eps,
        Usable::NoneAnywhere | Usable::NoneHere => Vec::new(),
    }
}

/// One service port: its dispatch elements, policy chains and endpoint chains.
fn service_port(script: &mut Script, svc: &Service, port: &Port, node: u8) {
    let names = PortNames::new(svc, port);
    let key = format!("{} . {} . {}", svc.vip, port.proto.iptables(), port.port);
    // The policy chains to write, each with the endpoints it picks from.
    let mut policies: Vec<(String, Vec<Endpoint>)> = Vec::new();
    match svc.usable(node) {
        Usable::Endpoints(eps) => {
            let chain = if svc.internal_local {
                names.local_chain()
            } else {
                names.cluster_chain()
            };
            script.element("service-ips", &format!("{key} : goto {chain}"));
            policies.push((chain, eps));
        }
        Usable::NoneAnywhere => no_endpoints(
            script,
            "no-endpoint-services",
            &key,
            &names,
            "goto reject-chain",
        ),
        Usable::NoneHere => no_endpoints(script, "no-endpoint-services", &key, &names, "drop"),
    }
    outside_dispatch(script, svc, port, &names, node, &mut policies);
    for (chain, eps) in &policies {
        policy_chain(script, svc, port, &names, chain, eps);
    }
    let mut reachable: Vec<&Endpoint> = policies.iter().flat_map(|(_, eps)| eps).collect();
    reachable.sort_by_key(|ep| ep.ip);
    reachable.dedup_by_key(|ep| ep.ip);
    for ep in reachable {
        endpoint_chain(script, svc, port, &names.endpoint(ep, port), ep);
    }
}

/// Traffic from outside the cluster: the port's NodePort and its external and load balancer
/// IPs, if any, to the external chain, and from there to the Cluster policy's chain (added to
/// `policies` when ClusterIP traffic does not use it already); rejected when there are no
/// endpoints anywhere.
fn outside_dispatch(
    script: &mut Script,
    svc: &Service,
    port: &Port,
    names: &PortNames,
    node: u8,
    policies: &mut Vec<(String, Vec<Endpoint>)>,
) {
    let proto = port.proto.iptables();
    let node_port = port.node_port.map(|np| format!("{proto} . {np}"));
    let ips: Vec<String> = svc
        .outside_ips()
        .map(|ip| format!("{ip} . {proto} . {}", port.port))
        .collect();
    if node_port.is_none() && ips.is_empty() {
        return;
    }
    let cluster = cluster_endpoints(svc, node);
    let local = match svc.usable_by(node, true) {
        Usable::Endpoints(eps) if svc.external_local => Some(eps),
        _ if svc.external_local => Some(Vec::new()),
        _ => None,
    };
    // None anywhere: rejected; the Local policy with none here: dropped.
    let verdict = match &local {
        _ if cluster.is_empty() => Some("goto reject-chain"),
        Some(eps) if eps.is_empty() => Some("drop"),
        _ => None,
    };
    if let Some(verdict) = verdict {
        if let Some(key) = &node_port {
            no_endpoints(script, "no-endpoint-nodeports", key, names, verdict);
        }
        for key in &ips {
            no_endpoints(script, "no-endpoint-services", key, names, verdict);
        }
        return;
    }
    let external = external_chain(script, names, local.is_some());
    if let Some(key) = &node_port {
        script.element("service-nodeports", &format!("{key} : goto {external}"));
    }
    for key in &ips {
        script.element("service-ips", &format!("{key} : goto {external}"));
    }
    for (chain, eps) in [(names.cluster_chain(), cluster)]
        .into_iter()
        .chain(local.map(|eps| (names.local_chain(), eps)))
    {
        if !policies.iter().any(|(c, _)| *c == chain) {
            policies.push((chain, eps));
        }
    }
}

/// An element of a no-endpoint map, commented with the service port as kube-proxy does.
fn no_endpoints(script: &mut Script, map: &str, key: &str, names: &PortNames, verdict: &str) {
    let comment = &names.display;
    script.element(map, &format!("{key} comment \"{comment}\" : {verdict}"));
}

/// The chain of traffic from outside. externalTrafficPolicy Cluster: masqueraded, as it may
/// cross nodes, then the Cluster policy's endpoints. Local (`local`): the node's own traffic
/// as Cluster (kube-proxy's "short-circuit local traffic"), the rest to this node's endpoints
/// with its source kept. (kube-proxy also short-circuits pods' traffic when it knows the pod
/// CIDR; the lab's baseline has no such detector, as in the iptables one.) Returns its name.
fn external_chain(script: &mut Script, names: &PortNames, local: bool) -> String {
    let external = names.external_chain();
    let cluster = names.cluster_chain();
    script.chain(&external);
    if local {
        script.rule(&external, "fib saddr type local jump mark-for-masquerade");
        script.rule(&external, &format!("fib saddr type local goto {cluster}"));
        script.rule(&external, &format!("goto {}", names.local_chain()));
    } else {
        script.rule(&external, "jump mark-for-masquerade");
        script.rule(&external, &format!("goto {cluster}"));
    }
    external
}

/// A policy chain: a client with affinity goes back to its endpoint, others to a random one.
fn policy_chain(
    script: &mut Script,
    svc: &Service,
    port: &Port,
    names: &PortNames,
    chain: &str,
    eps: &[Endpoint],
) {
    script.chain(chain);
    if svc.affinity_secs.is_some() {
        for ep in eps {
            let base = names.endpoint(ep, port);
            script.rule(
                chain,
                &format!("ip saddr @affinity-{base} goto endpoint-{base}"),
            );
        }
    }
    let arms: Vec<String> = eps
        .iter()
        .enumerate()
        .map(|(i, ep)| format!("{i} : goto endpoint-{}", names.endpoint(ep, port)))
        .collect();
    script.rule(
        chain,
        &format!(
            "numgen random mod {} vmap {{ {} }}",
            eps.len(),
            arms.join(", ")
        ),
    );
}

/// An endpoint's chain (and affinity set): hairpin traffic is masqueraded so the reply comes
/// back through this node; the client is remembered; DNAT.
fn endpoint_chain(script: &mut Script, svc: &Service, port: &Port, base: &str, ep: &Endpoint) {
    let chain = format!("endpoint-{base}");
    script.chain(&chain);
    script.rule(
        &chain,
        &format!("ip saddr {} jump mark-for-masquerade", ep.ip),
    );
    if let Some(secs) = svc.affinity_secs {
        // `dynamic`: the packet path (`update`) adds to it. kube-proxy sets it explicitly as
        // some kernels add it anyway, and a later `add` with other flags would then fail.
        let spec = format!(
            "affinity-{base} {{ type ipv4_addr ; flags dynamic,timeout ; timeout {secs}s ; }}"
        );
        script.object("set", &spec);
        script.rule(&chain, &format!("update @affinity-{base} {{ ip saddr }}"));
    }
    script.rule(
        &chain,
        &format!(
            "meta l4proto {} dnat to {}:{}",
            port.proto.iptables(),
            ep.ip,
            port.target
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::super::service_catalogue::{Condition, Proto};
    use super::*;
    use std::net::Ipv4Addr;
    use std::process::Command;

    const NODE: u8 = 1;

    fn pod(node: u8, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, node, host)
    }

    fn port(name: &'static str, proto: Proto, port: u16, target: u16) -> Port {
        Port {
            name,
            proto,
            port,
            target,
            node_port: None,
        }
    }

    fn service(name: &'static str, vip: u8, ports: Vec<Port>, endpoints: Vec<Endpoint>) -> Service {
        Service {
            name: name.into(),
            vip: Ipv4Addr::new(10, 96, 0, vip),
            ports,
            endpoints,
            internal_local: false,
            affinity_secs: None,
            external_ips: Vec::new(),
            lb_ips: Vec::new(),
            external_local: false,
            health_check_node_port: None,
        }
    }

    /// Every case the brief names, seen from node 1.
    fn catalogue() -> Vec<Service> {
        let ready = |n, h| Endpoint::ready(pod(n, h), n);
        let mut sticky = service(
            "lab/sticky",
            10,
            vec![port("", Proto::Tcp, 80, 8080)],
            vec![ready(2, 2), ready(3, 2)],
        );
        sticky.affinity_secs = Some(30);
        let mut dns = service(
            "lab/dns",
            11,
            vec![port("", Proto::Udp, 53, 5353)],
            vec![ready(2, 3)],
        );
        dns.external_ips = vec![Ipv4Addr::new(192, 0, 2, 10)];
        dns.lb_ips = vec![Ipv4Addr::new(198, 51, 100, 10)];
        let mut http = port("http", Proto::Tcp, 80, 8080);
        http.node_port = Some(30080);
        let multi = service(
            "lab/multi",
            12,
            vec![http, port("dns", Proto::Udp, 53, 53)],
            vec![ready(1, 2), ready(3, 3)],
        );
        let mut empty_port = port("", Proto::Tcp, 80, 8080);
        empty_port.node_port = Some(30081);
        let mut empty = service("lab/empty", 13, vec![empty_port], vec![]);
        empty.external_ips = vec![Ipv4Addr::new(192, 0, 2, 13)];
        let mut elsewhere_port = port("", Proto::Tcp, 80, 8080);
        elsewhere_port.node_port = Some(30082);
        let mut elsewhere = service(
            "lab/local-elsewhere",
            14,
            vec![elsewhere_port],
            vec![ready(2, 4)],
        );
        elsewhere.internal_local = true;
        let draining_ep = Endpoint {
            ip: pod(3, 4),
            node: 3,
            condition: Condition::Terminating,
        };
        let draining = service(
            "lab/draining",
            15,
            vec![port("", Proto::Tcp, 80, 8080)],
            vec![draining_ep],
        );
        vec![sticky, dns, multi, empty, elsewhere, draining]
    }

    fn names(svc: &Service, i: usize) -> PortNames {
        PortNames::new(svc, &svc.ports[i])
    }

    fn endpoint_base(svc: &Service, i: usize, ip: Ipv4Addr) -> String {
        let ep = svc.endpoints.iter().find(|e| e.ip == ip).expect("endpoint");
        names(svc, i).endpoint(ep, &svc.ports[i])
    }

    fn has(script: &str, line: &str) {
        assert!(
            script.lines().any(|l| l == line),
            "missing line:\n{line}\nin:\n{script}"
        );
    }

    #[test]
    fn test_names_hash_as_kube_proxy_does() {
        // Names from kube-proxy's own TestOverallNFTablesRules.
        assert_eq!(
            hash_and_truncate("ns1/svc1/tcp/p80"),
            "ULMVA6XW-ns1/svc1/tcp/p80"
        );
        assert_eq!(
            hash_and_truncate("ns1/svc1/tcp/p80__10.180.0.1/80"),
            "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
        let long = "n".repeat(300);
        assert_eq!(hash_and_truncate(&long).len(), NAME_BASE_MAX);
        assert!(hash_and_truncate(&long).ends_with("..."));
    }

    #[test]
    fn test_the_script_replaces_the_table_and_holds_the_skeleton() {
        let script = kube_proxy_nft_rules(&[], NODE);
        let mut lines = script.lines();
        assert_eq!(lines.next(), Some("add table ip kube-proxy"));
        assert_eq!(lines.next(), Some("delete table ip kube-proxy"));
        has(
            &script,
            "add chain ip kube-proxy filter-forward { type filter hook forward priority -110 ; }",
        );
        has(
            &script,
            "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }",
        );
        has(
            &script,
            "add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }",
        );
        has(&script, "add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }");
        has(
            &script,
            "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips",
        );
        has(
            &script,
            "add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check",
        );
        has(&script, "add rule ip kube-proxy nat-output jump services");
        has(
            &script,
            "add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000",
        );
        has(
            &script,
            "add rule ip kube-proxy masquerading masquerade fully-random",
        );
        has(
            &script,
            "add rule ip kube-proxy nat-postrouting jump masquerading",
        );
        assert!(
            !script.contains("ct state invalid"),
            "kube-proxy's nftables mode has none"
        );
    }

    #[test]
    fn test_each_service_port_is_rendered_as_kube_proxy_does() {
        let services = catalogue();
        let script = kube_proxy_nft_rules(&services, NODE);
        let [sticky, dns, multi, empty, elsewhere, draining] = &services[..] else {
            unreachable!()
        };
        // Affinity: checked first, then random among both; the sets time out after 30 s.
        let chain = names(sticky, 0).cluster_chain();
        assert_eq!(
            chain,
            format!("service-{}", hash_and_truncate("lab/sticky/tcp/"))
        );
        let (e0, e1) = (
            endpoint_base(sticky, 0, pod(2, 2)),
            endpoint_base(sticky, 0, pod(3, 2)),
        );
        has(
            &script,
            &format!(
                "add element ip kube-proxy service-ips {{ 10.96.0.10 . tcp . 80 : goto {chain} }}"
            ),
        );
        has(
            &script,
            &format!("add rule ip kube-proxy {chain} ip saddr @affinity-{e0} goto endpoint-{e0}"),
        );
        has(&script, &format!("add rule ip kube-proxy {chain} numgen random mod 2 vmap {{ 0 : goto endpoint-{e0}, 1 : goto endpoint-{e1} }}"));
        has(&script, &format!("add set ip kube-proxy affinity-{e1} {{ type ipv4_addr ; flags dynamic,timeout ; timeout 30s ; }}"));
        has(
            &script,
            &format!(
                "add rule ip kube-proxy endpoint-{e1} ip saddr 10.244.3.2 jump mark-for-masquerade"
            ),
        );
        has(
            &script,
            &format!("add rule ip kube-proxy endpoint-{e1} update @affinity-{e1} {{ ip saddr }}"),
        );
        has(
            &script,
            &format!(
                "add rule ip kube-proxy endpoint-{e1} meta l4proto tcp dnat to 10.244.3.2:8080"
            ),
        );
        // UDP.
        let e = endpoint_base(dns, 0, pod(2, 3));
        has(
            &script,
            &format!(
                "add element ip kube-proxy service-ips {{ 10.96.0.11 . udp . 53 : goto {} }}",
                names(dns, 0).cluster_chain()
            ),
        );
        has(
            &script,
            &format!(
                "add rule ip kube-proxy endpoint-{e} meta l4proto udp dnat to 10.244.2.3:5353"
            ),
        );
        // Two ports, two protocols; the TCP one also as a NodePort.
        let (http, udp) = (names(multi, 0), names(multi, 1));
        assert!(
            http.cluster_chain().ends_with("-lab/multi/tcp/http")
                && udp.cluster_chain().ends_with("-lab/multi/udp/dns")
        );
        has(
            &script,
            &format!(
                "add element ip kube-proxy service-ips {{ 10.96.0.12 . tcp . 80 : goto {} }}",
                http.cluster_chain()
            ),
        );
        has(
            &script,
            &format!(
                "add element ip kube-proxy service-ips {{ 10.96.0.12 . udp . 53 : goto {} }}",
                udp.cluster_chain()
            ),
        );
        has(
            &script,
            &format!(
                "add element ip kube-proxy service-nodeports {{ tcp . 30080 : goto {} }}",
                http.external_chain()
            ),
        );
        has(
            &script,
            &format!(
                "add rule ip kube-proxy {} goto {}",
                http.external_chain(),
                http.cluster_chain()
            ),
        );
        // No endpoints anywhere: rejected, on the ClusterIP and the NodePort.
        has(&script, "add element ip kube-proxy no-endpoint-services { 10.96.0.13 . tcp . 80 comment \"lab/empty\" : goto reject-chain }");
        has(&script, "add element ip kube-proxy no-endpoint-nodeports { tcp . 30081 comment \"lab/empty\" : goto reject-chain }");
        assert!(!script.contains(&names(empty, 0).cluster_chain()));
        // Local policy, endpoints elsewhere: the ClusterIP drops; the NodePort (Cluster) serves.
        has(&script, "add element ip kube-proxy no-endpoint-services { 10.96.0.14 . tcp . 80 comment \"lab/local-elsewhere\" : drop }");
        let e = endpoint_base(elsewhere, 0, pod(2, 4));
        has(
            &script,
            &format!(
                "add rule ip kube-proxy {} numgen random mod 1 vmap {{ 0 : goto endpoint-{e} }}",
                names(elsewhere, 0).cluster_chain()
            ),
        );
        assert!(!script.contains(&names(elsewhere, 0).local_chain()));
        // Only terminating endpoints: they serve.
        let e = endpoint_base(draining, 0, pod(3, 4));
        has(
            &script,
            &format!(
                "add rule ip kube-proxy endpoint-{e} meta l4proto tcp dnat to 10.244.3.4:8080"
            ),
        );
        // Every ClusterIP is known, for the invalid-port check.
        has(
            &script,
            "add element ip kube-proxy cluster-ips { 10.96.0.13 }",
        );
    }

    #[test]
    fn test_the_local_policy_uses_this_nodes_endpoints_in_a_local_chain() {
        let mut svc = service(
            "lab/local",
            20,
            vec![port("", Proto::Tcp, 80, 8080)],
            vec![Endpoint::ready(pod(1, 2), 1), Endpoint::ready(pod(2, 2), 2)],
        );
        svc.internal_local = true;
        let script = kube_proxy_nft_rules(std::slice::from_ref(&svc), NODE);
        let local = names(&svc, 0).local_chain();
        let e = endpoint_base(&svc, 0, pod(1, 2));
        has(
            &script,
            &format!(
                "add element ip kube-proxy service-ips {{ 10.96.0.20 . tcp . 80 : goto {local} }}"
            ),
        );
        has(&script, &format!("add rule ip kube-proxy {local} numgen random mod 1 vmap {{ 0 : goto endpoint-{e} }}"));
        assert!(
            !script.contains("10.244.2.2"),
            "an endpoint on another node is used:\n{script}"
        );
    }

    /// externalTrafficPolicy Local: the NodePort's external chain sends the node's own traffic
    /// to the Cluster chain (masqueraded) and the rest to this node's endpoints unmasqueraded;
    /// with none here the NodePort is dropped, as kube-proxy writes it.
    #[test]
    fn test_the_external_local_policy_keeps_the_client_and_this_nodes_endpoints() {
        let mut np = port("", Proto::Tcp, 80, 8080);
        np.node_port = Some(30090);
        let mut svc = service(
            "lab/etp",
            30,
            vec![np],
            vec![Endpoint::ready(pod(1, 2), 1), Endpoint::ready(pod(2, 2), 2)],
        );
        svc.external_local = true;
        let script = kube_proxy_nft_rules(std::slice::from_ref(&svc), NODE);
        let n = names(&svc, 0);
        let (external, local, cluster) = (n.external_chain(), n.local_chain(), n.cluster_chain());
        has(
            &script,
            &format!(
                "add element ip kube-proxy service-nodeports {{ tcp . 30090 : goto {external} }}"
            ),
        );
        for rule in [
            "fib saddr type local jump mark-for-masquerade".to_string(),
            format!("fib saddr type local goto {cluster}"),
            format!("goto {local}"),
        ] {
            has(
                &script,
                &format!("add rule ip kube-proxy {external} {rule}"),
            );
        }
        let e = endpoint_base(&svc, 0, pod(1, 2));
        has(&script, &format!("add rule ip kube-proxy {local} numgen random mod 1 vmap {{ 0 : goto endpoint-{e} }}"));
        // Pods still reach both endpoints through the ClusterIP.
        let both = format!("add rule ip kube-proxy {cluster} numgen random mod 2 vmap");
        assert!(script.lines().any(|l| l.starts_with(&both)), "{script}");
        let mut elsewhere = svc.clone();
        elsewhere.endpoints = vec![Endpoint::ready(pod(2, 2), 2)];
        let script = kube_proxy_nft_rules(std::slice::from_ref(&elsewhere), NODE);
        has(&script, &format!("add element ip kube-proxy no-endpoint-nodeports {{ tcp . 30090 comment \"{}\" : drop }}", n.display));
        assert!(
            !script.contains("add element ip kube-proxy service-nodeports"),
            "{script}"
        );
    }

    /// The names a line refers to: after `jump`/`goto`, and `@set` lookups.
    fn references(line: &str) -> Vec<String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let mut refs = Vec::new();
        for (i, word) in words.iter().enumerate() {
            if let Some(set) = word.strip_prefix('@') {
                refs.push(set.to_string());
            }
            if (*word == "jump" || *word == "goto") && i + 1 < words.len() {
                refs.push(words[i + 1].trim_end_matches([',', '}']).to_string());
            }
        }
        refs
    }

    #[test]
    fn test_every_name_is_declared_before_it_is_used() {
        let script = kube_proxy_nft_rules(&catalogue(), NODE);
        let mut declared: Vec<String> = Vec::new();
        for line in script.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words[..] {
                ["add", "chain" | "set" | "map", "ip", "kube-proxy", name, ..] => {
                    declared.push(name.to_string())
                }
                ["add", "rule" | "element", "ip", "kube-proxy", container, ..] => {
                    for name in std::iter::once(container.to_string()).chain(references(line)) {
                        assert!(
                            declared.contains(&name),
                            "{name} is used before it is declared: {line}"
                        );
                    }
                }
                _ => {}
            }
        }
    }

    /// Root and nft, or the test is skipped (as `cargo test` runs unprivileged too).
    fn nft_usable() -> bool {
        let found = Command::new("nft")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !(found && nix::unistd::geteuid().is_root()) {
            eprintln!("skipped: needs root and nft");
            return false;
        }
        true
    }

    /// A script written to a temporary file, removed when the test ends, whatever its outcome.
    struct ScriptFile(std::path::PathBuf);

    impl ScriptFile {
        fn new(tag: &str, script: &str) -> Self {
            let name = format!("pwnft-{}-{tag}.nft", std::process::id());
            let path = std::env::temp_dir().join(name);
            std::fs::write(&path, script).expect("writing the script");
            ScriptFile(path)
        }

        fn path(&self) -> &str {
            self.0.to_str().expect("a UTF-8 temporary path")
        }
    }

    impl Drop for ScriptFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Runs `cmd`; fails with its stderr.
    fn run(cmd: &[&str]) -> String {
        let out = Command::new(cmd[0])
            .args(&cmd[1..])
            .output()
            .expect("running a command");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "`{}` failed:\n{said}", cmd.join(" "));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn test_nft_accepts_the_script() {
        if !nft_usable() {
            return;
        }
        let file = ScriptFile::new("check", &kube_proxy_nft_rules(&catalogue(), NODE));
        // Check mode: parsed and validated by the kernel, committed nowhere.
        run(&["nft", "-c", "-f", file.path()]);
    }

    /// A network namespace deleted when the test ends, whatever its outcome.
    struct ThrowawayNetns(String);

    impl ThrowawayNetns {
        fn new() -> Self {
            let name = format!("pwnft-test-{}", std::process::id());
            run(&["ip", "netns", "add", &name]);
            ThrowawayNetns(name)
        }

        fn nft(&self, args: &[&str]) -> String {
            run(&[&["ip", "netns", "exec", &self.0, "nft"][..], args].concat())
        }
    }

    impl Drop for ThrowawayNetns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        }
    }

    #[test]
    fn test_the_script_loads_and_replaces_the_table_in_a_netns() {
        if !nft_usable() {
            return;
        }
        let ns = ThrowawayNetns::new();
        let services = catalogue();
        let full = ScriptFile::new("full", &kube_proxy_nft_rules(&services, NODE));
        ns.nft(&["-f", full.path()]);
        let first = ns.nft(&["list", "table", "ip", "kube-proxy"]);
        ns.nft(&["-f", full.path()]);
        let again = ns.nft(&["list", "table", "ip", "kube-proxy"]);
        assert_eq!(first, again, "re-applying changed the table");
        assert!(first.contains("map service-ips"), "{first}");
        assert!(first.contains("flags dynamic,timeout"), "{first}");
        // Replacing with fewer services leaves nothing of the removed one.
        let fewer = ScriptFile::new("fewer", &kube_proxy_nft_rules(&services[1..], NODE));
        ns.nft(&["-f", fewer.path()]);
        let after = ns.nft(&["list", "table", "ip", "kube-proxy"]);
        assert!(
            after.contains("lab/dns") && !after.contains("lab/sticky"),
            "{after}"
        );
    }

    /// External and load balancer IPs go through the external chain (masquerade, then the
    /// Cluster policy), as NodePorts do; without endpoints they are rejected.
    #[test]
    fn test_external_and_load_balancer_ips_go_through_the_external_chain() {
        let services = catalogue();
        let script = kube_proxy_nft_rules(&services, NODE);
        let (dns, empty) = (&services[1], &services[3]);
        let external = names(dns, 0).external_chain();
        for ip in ["192.0.2.10", "198.51.100.10"] {
            has(
                &script,
                &format!(
                    "add element ip kube-proxy service-ips {{ {ip} . udp . 53 : goto {external} }}"
                ),
            );
        }
        has(
            &script,
            &format!("add rule ip kube-proxy {external} jump mark-for-masquerade"),
        );
        let cluster = names(dns, 0).cluster_chain();
        has(
            &script,
            &format!("add rule ip kube-proxy {external} goto {cluster}"),
        );
        let comment = &names(empty, 0).display;
        has(&script, &format!("add element ip kube-proxy no-endpoint-services {{ 192.0.2.13 . tcp . 80 comment \"{comment}\" : goto reject-chain }}"));
    }
}
