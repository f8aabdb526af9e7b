//! Services: ClusterIP:port/protocol -> endpoints, kube-proxy's job done in the pipeline.
//!
//! A [`Services`] snapshot is built by the control plane and swapped in whole, like the subnet
//! map. The first packet of a connection to a ClusterIP asks [`Services::plan`] for a backend
//! (one hash lookup for the service, Maglev or random for the endpoint, the client's sticky
//! backend with sessionAffinity ClientIP) and the conntrack entry remembers the binding; every
//! later packet and every reply is translated through that entry ([`rewrite`]). Cost per new
//! connection does not depend on the number of services (iptables' does, linearly).
//!
//! A backend on this node answers its client through the kernel directly, past podwire, unless
//! the connection is also SNATed to an address that routes back into podwire: `hairpin_ip`, an
//! address of the service CIDR (whose route points at podwire's device). kube-proxy only
//! masquerades the pod-calls-itself case because netfilter sees every reply anyway; podwire
//! sees only what is routed to it, so it SNATs every connection to a local backend, but one:
//! an outside client under `externalTrafficPolicy: Local` where policy routing steers the
//! pods' answers to outside into podwire ([`External::clients_kept`]).

pub mod maglev;
pub mod rewrite;

use crate::conntrack::{NatPlan, ServiceBinding, Tuple, PROTO_TCP, PROTO_UDP};
use crate::route::Ipv4Net;
use core::net::{Ipv4Addr, SocketAddrV4};
use maglev::Maglev;
use std::sync::{Arc, Mutex};

/// How a service picks an endpoint for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Maglev consistent hashing of the connection's 5-tuple.
    Maglev,
    /// Uniformly random per connection (kube-proxy's iptables `statistic --mode random`).
    Random,
}

/// One service port as the control plane describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// `namespace/name`.
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// Ready endpoints.
    pub endpoints: Vec<SocketAddrV4>,
    /// Endpoints that are terminating but still serving (EndpointSlice conditions ready false,
    /// serving true, terminating true): new connections go to them only when no ready endpoint
    /// is there to take them (kube-proxy's `CategorizeEndpoints`); connections already bound to
    /// them carry on.
    pub terminating: Vec<SocketAddrV4>,
    /// sessionAffinity ClientIP with this timeout in seconds; None for sessionAffinity None.
    pub affinity_timeout: Option<u32>,
    /// Served on the node's own address when podwire owns the NIC (`--io xdp`).
    pub node_port: Option<u16>,
    /// `internalTrafficPolicy: Local`: connections from pods to the ClusterIP go only to
    /// endpoints on this node; with none here (but some elsewhere) they are dropped.
    pub internal_local: bool,
    /// Addresses outside the cluster at which the port is served too: the Service's
    /// `externalIPs` and its load balancer's ingress IPs (`status.loadBalancer.ingress`),
    /// which kube-proxy treats alike. Routed into podwire; traffic to them from outside the
    /// cluster network follows `externalTrafficPolicy`, from pods the ClusterIP's.
    pub external_ips: Vec<Ipv4Addr>,
    /// `externalTrafficPolicy: Local`: connections from outside the cluster (to the NodePort,
    /// external IPs, load balancer IPs) go only to endpoints on this node, keeping the client's
    /// address where the node's answers come back through podwire ([`External::clients_kept`]);
    /// with none here they are dropped.
    pub external_local: bool,
    /// `healthCheckNodePort` (with `external_local`): where the node answers load balancers'
    /// health checks with its count of local endpoints.
    pub health_check_node_port: Option<u16>,
}

impl Default for ServiceSpec {
    /// A TCP service with no name, address, port or endpoints, policies Cluster.
    fn default() -> Self {
        ServiceSpec {
            name: String::new(),
            cluster_ip: Ipv4Addr::UNSPECIFIED,
            port: 0,
            proto: PROTO_TCP,
            endpoints: Vec::new(),
            terminating: Vec::new(),
            affinity_timeout: None,
            node_port: None,
            internal_local: false,
            external_ips: Vec::new(),
            external_local: false,
            health_check_node_port: None,
        }
    }
}

/// Defaults Kubernetes uses.
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/12";
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
pub const MAX_AFFINITY_TIMEOUT: u32 = 86_400;

/// Snapshot options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceOptions {
    /// Traffic to this range is steered into podwire.
    pub cidr: Ipv4Net,
    /// Source address of connections to local backends (in `cidr`).
    pub hairpin_ip: Ipv4Addr,
    pub algorithm: Algorithm,
    /// Largest Maglev table (a prime of `maglev::PRIMES`).
    pub maglev_max: usize,
}

impl ServiceOptions {
    /// `cidr` with the hairpin address at its last usable address (`.254` of a /12's end).
    pub fn new(cidr: Ipv4Net) -> ServiceOptions {
        ServiceOptions {
            cidr,
            hairpin_ip: hairpin_ip_for(cidr),
            algorithm: Algorithm::Maglev,
            maglev_max: maglev::DEFAULT_MAX_SIZE,
        }
    }
}

/// The address of `cidr` that podwire uses as the source of hairpin connections: the last one
/// below the broadcast address.
pub fn hairpin_ip_for(cidr: Ipv4Net) -> Ipv4Addr {
    let size = cidr.size().min(u64::from(u32::MAX)) as u32;
    cidr.nth(size.saturating_sub(2))
}

/// Ports, both ends included (kube-apiserver's `--service-node-port-range` is one: `A-B`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    first: u16,
    last: u16,
}

/// kube-apiserver's default `--service-node-port-range`.
pub const DEFAULT_NODE_PORT_RANGE: PortRange = PortRange {
    first: 30_000,
    last: 32_767,
};

/// Why a port range is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortRangeError {
    #[error("{0:?} is not a port range (want A-B, e.g. 30000-32767)")]
    Syntax(String),
    #[error("port 0 is not a port (a range is within 1-65535)")]
    Zero,
    #[error("{first}-{last}: the first port is above the last")]
    Reversed { first: u16, last: u16 },
}

impl PortRange {
    /// `first..=last`; both in 1..=65535, `first <= last`.
    pub fn new(first: u16, last: u16) -> Result<PortRange, PortRangeError> {
        if first == 0 || last == 0 {
            return Err(PortRangeError::Zero);
        }
        if first > last {
            return Err(PortRangeError::Reversed { first, last });
        }
        Ok(PortRange { first, last })
    }

    /// One port.
    pub fn one(port: u16) -> Result<PortRange, PortRangeError> {
        PortRange::new(port, port)
    }

    pub fn first(&self) -> u16 {
        self.first
    }

    pub fn last(&self) -> u16 {
        self.last
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl core::fmt::Display for PortRange {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl core::str::FromStr for PortRange {
    type Err = PortRangeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || PortRangeError::Syntax(s.to_string());
        let (a, b) = s.split_once('-').ok_or_else(syntax)?;
        let port = |t: &str| t.trim().parse::<u16>().map_err(|_| syntax());
        PortRange::new(port(a)?, port(b)?)
    }
}

/// A port podwire itself uses on the node's address, which no NodePort may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnPort {
    /// The backend's UDP port (8285, 8472 or the network config's `Port`).
    Backend,
    /// The /healthz, /readyz and /metrics endpoint.
    Healthz,
    /// The masquerade source ports (`pipeline::MASQ_PORTS`).
    Masquerade,
}

impl core::fmt::Display for OwnPort {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            OwnPort::Backend => "the backend's UDP port",
            OwnPort::Healthz => "the healthz port",
            OwnPort::Masquerade => "the masquerade port range",
        })
    }
}

/// Why an address cannot be an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadAddress {
    /// 0.0.0.0/8: "this network", never a destination (kube-apiserver: unspecified).
    Unspecified,
    /// 127.0.0.0/8.
    Loopback,
    /// 169.254.0.0/16.
    LinkLocal,
    /// 224.0.0.0/4 (kube-apiserver refuses link-local multicast, 224.0.0.0/24).
    Multicast,
    /// 240.0.0.0/4, the limited broadcast 255.255.255.255 among them.
    Reserved,
    /// The broadcast address of a lease of the pod network.
    Broadcast,
    /// One of this node's own addresses.
    Node,
    /// In the service range: a ClusterIP or podwire's hairpin address.
    ServiceRange,
    /// In the pod network (an external IP there would take pods' own traffic).
    PodNetwork,
}

impl core::fmt::Display for BadAddress {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            BadAddress::Unspecified => "unspecified (0.0.0.0/8)",
            BadAddress::Loopback => "loopback (127.0.0.0/8)",
            BadAddress::LinkLocal => "link-local (169.254.0.0/16)",
            BadAddress::Multicast => "multicast (224.0.0.0/4)",
            BadAddress::Reserved => "reserved or broadcast (240.0.0.0/4)",
            BadAddress::Broadcast => "a pod subnet's broadcast address",
            BadAddress::Node => "this node's own address",
            BadAddress::ServiceRange => "in the service range",
            BadAddress::PodNetwork => "in the pod network",
        })
    }
}

/// What services are checked against beyond [`ServiceOptions`]: which addresses may be
/// endpoints and which ports NodePorts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// This node's own addresses (its PublicIP, the interface's, its lease's `.0` and `.1`):
    /// never an endpoint.
    pub node_addrs: Vec<Ipv4Addr>,
    /// The pod network and its lease length: the leases' broadcast addresses are never an
    /// endpoint.
    pub pod_network: Option<(Ipv4Net, u8)>,
    /// Where NodePorts may be (kube-apiserver's `--service-node-port-range`).
    pub node_port_range: PortRange,
    /// Ports podwire uses on the node's address: never a NodePort.
    pub own_ports: Vec<(PortRange, OwnPort)>,
    /// This node's lease: its endpoints are the local ones of `internalTrafficPolicy: Local`.
    /// None: no endpoint is local.
    pub local_subnet: Option<Ipv4Net>,
}

impl Default for Admission {
    /// Kubernetes' NodePort range; no node addresses or own ports known.
    fn default() -> Self {
        Admission {
            node_addrs: Vec::new(),
            pod_network: None,
            node_port_range: DEFAULT_NODE_PORT_RANGE,
            own_ports: Vec::new(),
            local_subnet: None,
        }
    }
}

/// What [`Services::admit`] left out of a snapshot, each with its reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Services left out whole.
    pub rejected: Vec<ServiceError>,
    /// Endpoints removed from services that were kept.
    pub endpoints_removed: Vec<ServiceError>,
    /// NodePorts refused; their services were kept, ClusterIP only.
    pub node_ports_refused: Vec<ServiceError>,
    /// External IPs refused; their services were kept without them.
    pub external_ips_refused: Vec<ServiceError>,
}

impl Report {
    pub fn is_empty(&self) -> bool {
        self.rejected.is_empty()
            && self.endpoints_removed.is_empty()
            && self.node_ports_refused.is_empty()
            && self.external_ips_refused.is_empty()
    }

    /// Every problem: rejected services, then removed endpoints, then refused NodePorts and
    /// external IPs.
    pub fn problems(&self) -> impl Iterator<Item = &ServiceError> {
        self.rejected
            .iter()
            .chain(&self.endpoints_removed)
            .chain(&self.node_ports_refused)
            .chain(&self.external_ips_refused)
    }
}

/// Why a service, one of its endpoints or its NodePort was left out of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("service {name}: ClusterIP {ip} is outside the service CIDR {cidr}")]
    OutsideCidr {
        name: String,
        ip: Ipv4Addr,
        cidr: Ipv4Net,
    },
    #[error("service {name}: ClusterIP {ip} is podwire's hairpin address")]
    HairpinAddress { name: String, ip: Ipv4Addr },
    #[error("service {name}: protocol {proto} is not TCP or UDP")]
    Protocol { name: String, proto: u8 },
    #[error("services {a} and {b} both claim {ip}:{port}")]
    Duplicate {
        a: String,
        b: String,
        ip: Ipv4Addr,
        port: u16,
    },
    #[error("service {name}: {n} endpoints, at most 65535")]
    TooManyEndpoints { name: String, n: usize },
    #[error("service {name}: sessionAffinity timeout {secs} s outside 1..=86400")]
    AffinityTimeout { name: String, secs: u32 },
    #[error("services {a} and {b} both claim NodePort {port}")]
    DuplicateNodePort { a: String, b: String, port: u16 },
    #[error("service {b}: health check port {port} is taken by {a}")]
    HealthCheckPortTaken { a: String, b: String, port: u16 },
    #[error("service {name}: NodePort 0")]
    NodePortZero { name: String },
    #[error("service {name}: port 0")]
    PortZero { name: String },
    #[error("service {name}: endpoint {endpoint}: {why}")]
    EndpointAddress {
        name: String,
        endpoint: SocketAddrV4,
        why: BadAddress,
    },
    #[error("service {name}: endpoint {ip}:0: port 0")]
    EndpointPortZero { name: String, ip: Ipv4Addr },
    #[error("service {name}: NodePort {port} is outside the NodePort range {range}")]
    NodePortRange {
        name: String,
        port: u16,
        range: PortRange,
    },
    #[error("service {name}: NodePort {port} is {what} of podwire")]
    NodePortOwn {
        name: String,
        port: u16,
        what: OwnPort,
    },
    #[error("service {name}: external IP {ip}: {why}")]
    ExternalIpAddress {
        name: String,
        ip: Ipv4Addr,
        why: BadAddress,
    },
}

/// Removes (and reports) the endpoints of `spec` that may not be one, and sorts the rest; a
/// spec with nothing to remove and its endpoints in order is left as it is.
fn admit_endpoints(
    options: &ServiceOptions,
    admission: &Admission,
    spec: &mut Arc<ServiceSpec>,
    report: &mut Report,
) {
    let all = || spec.endpoints.iter().chain(&spec.terminating);
    let mut refused = 0;
    for ep in all() {
        let Err(why) = check_endpoint(options, admission, ep) else {
            continue;
        };
        refused += 1;
        let name = spec.name.clone();
        report.endpoints_removed.push(match why {
            None => ServiceError::EndpointPortZero { name, ip: *ep.ip() },
            Some(why) => ServiceError::EndpointAddress {
                name,
                endpoint: *ep,
                why,
            },
        });
    }
    let sorted = spec.endpoints.is_sorted() && spec.terminating.is_sorted();
    if refused == 0 && sorted {
        return;
    }
    let spec = Arc::make_mut(spec);
    let keep = |ep: &SocketAddrV4| check_endpoint(options, admission, ep).is_ok();
    spec.endpoints.retain(keep);
    spec.terminating.retain(keep);
    spec.endpoints.sort_unstable();
    spec.terminating.sort_unstable();
}

/// Clears the health check port of a spec whose external policy is not Local (kube-apiserver
/// clears it too), and refuses (reports and clears) one outside the NodePort rules.
fn admit_health_check_port(
    admission: &Admission,
    spec: &mut Arc<ServiceSpec>,
    report: &mut Report,
) {
    let Some(port) = spec.health_check_node_port else {
        return;
    };
    if !spec.external_local {
        Arc::make_mut(spec).health_check_node_port = None;
        return;
    }
    if let Err(e) = check_node_port(admission, &spec.name, port) {
        report.node_ports_refused.push(e);
        Arc::make_mut(spec).health_check_node_port = None;
    }
}

/// (ClusterIP, port, protocol) packed for one hash lookup.
fn key(ip: Ipv4Addr, port: u16, proto: u8) -> u64 {
    u64::from(ip.to_bits()) << 24 | u64::from(port) << 8 | u64::from(proto)
}

/// The endpoints one class of traffic may get, and their Maglev table.
#[derive(Debug, Default)]
struct Pick {
    /// Sorted (Maglev fills its table in this order; affinity looks up by binary search).
    endpoints: Vec<SocketAddrV4>,
    maglev: Option<Maglev>,
}

impl Pick {
    /// `ready` if there are any, else `terminating` (kube-proxy's fallback), each filtered by
    /// `keep`.
    fn new(
        ready: &[SocketAddrV4],
        terminating: &[SocketAddrV4],
        keep: impl Fn(&SocketAddrV4) -> bool,
        options: &ServiceOptions,
    ) -> Pick {
        let mut endpoints: Vec<SocketAddrV4> = ready.iter().copied().filter(&keep).collect();
        if endpoints.is_empty() {
            endpoints = terminating.iter().copied().filter(&keep).collect();
        }
        // Every node that holds the same endpoints, in whatever order they arrived, fills the
        // same table and so makes the same choices.
        endpoints.sort_unstable();
        endpoints.dedup();
        let maglev = (options.algorithm == Algorithm::Maglev && !endpoints.is_empty()).then(|| {
            let m = maglev::table_size(endpoints.len(), options.maglev_max);
            Maglev::new(&endpoints, m)
        });
        Pick { endpoints, maglev }
    }

    fn contains(&self, ep: &SocketAddrV4) -> bool {
        self.endpoints.binary_search(ep).is_ok()
    }
}

#[derive(Debug)]
struct Service {
    /// As admitted; shared with the caller's spec where admission changed nothing.
    spec: Arc<ServiceSpec>,
    /// Ready endpoints anywhere, else terminating ones: what `Cluster` policies use. Empty:
    /// the service has no endpoints at all, and its connections are rejected.
    cluster: Arc<Pick>,
    /// This node's endpoints (ready, else terminating), for the `Local` traffic policies.
    local: Option<Arc<Pick>>,
}

impl Service {
    /// The picks of `spec` (endpoints filtered and sorted): those of `previous` when it had
    /// the same endpoints under the same options, so an update rebuilds the Maglev tables of
    /// the services it changed only.
    fn new(
        spec: Arc<ServiceSpec>,
        options: &ServiceOptions,
        local_subnet: Option<Ipv4Net>,
        previous: Option<&Service>,
    ) -> Service {
        let same = previous.filter(|p| {
            Arc::ptr_eq(&p.spec, &spec)
                || (p.spec.endpoints == spec.endpoints && p.spec.terminating == spec.terminating)
        });
        let cluster = match same {
            Some(p) => Arc::clone(&p.cluster),
            None => Arc::new(Pick::new(
                &spec.endpoints,
                &spec.terminating,
                |_| true,
                options,
            )),
        };
        let local = (spec.internal_local || spec.external_local).then(|| {
            if let Some(pick) = same.and_then(|p| p.local.as_ref()) {
                return Arc::clone(pick);
            }
            let here = |ep: &SocketAddrV4| local_subnet.is_some_and(|net| net.contains(*ep.ip()));
            Arc::new(Pick::new(&spec.endpoints, &spec.terminating, here, options))
        });
        Service {
            spec,
            cluster,
            local,
        }
    }
}

/// All services, read-only: built by the control plane, swapped whole.
#[derive(Debug)]
pub struct Services {
    options: ServiceOptions,
    /// The lease whose endpoints are local (the admission's), which the local picks depend on.
    local_subnet: Option<Ipv4Net>,
    by_key: rustc_hash::FxHashMap<u64, u32>,
    services: Vec<Service>,
    /// (service key, backend) pairs that exist, so a connection's binding can be checked.
    alive: rustc_hash::FxHashSet<(u64, SocketAddrV4)>,
    /// NodePort (protocol << 16 | port) -> service index.
    by_node_port: rustc_hash::FxHashMap<u32, u32>,
    /// External IPs served (in `by_key` with their ports), sorted: the routes into podwire.
    external_ips: Vec<Ipv4Addr>,
    /// The same, for one hash lookup per packet.
    is_external: rustc_hash::FxHashSet<Ipv4Addr>,
    /// The health checks the node answers, by port.
    health_checks: Vec<HealthCheck>,
}

/// A `healthCheckNodePort` the node answers (kube-proxy's service health server): 200 while
/// the Service has endpoints on this node, 503 without, so a load balancer sends its
/// `externalTrafficPolicy: Local` traffic only to nodes that can serve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    /// The Service's `namespace/name` (its ports' records share it).
    pub service: String,
    /// Its ready endpoints on this node, distinct addresses over all its ports (kube-proxy's
    /// count: terminating ones are left out even while they serve).
    pub local_endpoints: usize,
}

/// Why a new connection to a service got no backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoBackend {
    /// No service has this ClusterIP:port/protocol.
    NoService,
    /// The service has no endpoints (kube-proxy rejects with ICMP port unreachable).
    NoEndpoints,
    /// The traffic policy is Local and no endpoint is on this node, though some are elsewhere
    /// (kube-proxy drops: "has no local endpoints").
    NoLocalEndpoints,
}

impl Default for Services {
    /// No services, Kubernetes' default service CIDR.
    fn default() -> Self {
        let cidr = DEFAULT_SERVICE_CIDR.parse().expect("a valid default CIDR");
        Services::empty(ServiceOptions::new(cidr))
    }
}

impl Services {
    /// No services.
    pub fn empty(options: ServiceOptions) -> Services {
        Services {
            options,
            local_subnet: None,
            by_key: Default::default(),
            services: Vec::new(),
            alive: Default::default(),
            by_node_port: Default::default(),
            external_ips: Vec::new(),
            is_external: Default::default(),
            health_checks: Vec::new(),
        }
    }

    /// Every service of `specs` that passes the checks, all or nothing: the first problem
    /// [`Services::admit`] reports is the error (for tools and tests; the daemon admits).
    pub fn build<S: Into<Arc<ServiceSpec>>>(
        options: ServiceOptions,
        specs: Vec<S>,
    ) -> Result<Services, ServiceError> {
        let (s, report) = Services::admit(options, &Admission::default(), specs);
        let first = report.problems().next().cloned();
        match first {
            Some(e) => Err(e),
            None => Ok(s),
        }
    }

    /// The services of `specs` that pass the checks, one by one, and what was left out:
    /// - a service with a ClusterIP outside the range (or the hairpin address), a protocol
    ///   other than TCP or UDP, port 0, a bad affinity timeout or too many endpoints is
    ///   rejected whole;
    /// - so is a second claim of a ClusterIP:port/protocol: services are taken in name order
    ///   (the input's order among equal names), so the first by name wins on every node;
    /// - an endpoint kube-apiserver would refuse (unspecified, loopback, link-local,
    ///   multicast), a reserved or broadcast address, one of the node's own, one in the
    ///   service range, or port 0 is removed; a service left with none stays, refusing
    ///   connections as any service without endpoints;
    /// - a NodePort outside `admission.node_port_range`, on one of podwire's own ports, 0,
    ///   or already taken (by the first by name) is refused; the service stays, ClusterIP only;
    /// - an external IP that could not be an endpoint (see [`bad_endpoint_address`]), one in
    ///   the pod network, or one whose port another service claims is refused; the service
    ///   stays without it.
    pub fn admit<S: Into<Arc<ServiceSpec>>>(
        options: ServiceOptions,
        admission: &Admission,
        specs: Vec<S>,
    ) -> (Services, Report) {
        Services::admit_after(None, options, admission, specs)
    }

    /// [`Services::admit`], reusing what `previous` built for services whose endpoints did
    /// not change (their Maglev tables), so that an update costs in proportion to what it
    /// changed rather than to the number of services. A spec the checks leave as it is is
    /// kept as given (shared with the caller), not copied.
    pub fn admit_after<S: Into<Arc<ServiceSpec>>>(
        previous: Option<&Services>,
        options: ServiceOptions,
        admission: &Admission,
        specs: Vec<S>,
    ) -> (Services, Report) {
        let mut specs: Vec<Arc<ServiceSpec>> = specs.into_iter().map(Into::into).collect();
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        let mut s = Services::empty(options);
        s.local_subnet = admission.local_subnet;
        s.by_key.reserve(specs.len());
        s.alive.reserve(2 * specs.len());
        s.services.reserve(specs.len());
        // Built under other options, or another idea of what is local, nothing is reused.
        let previous =
            previous.filter(|p| p.options == options && p.local_subnet == s.local_subnet);
        let mut report = Report::default();
        for mut spec in specs {
            if let Err(e) = check_service(&options, &spec) {
                report.rejected.push(e);
                continue;
            }
            let k = key(spec.cluster_ip, spec.port, spec.proto);
            if let Some(&other) = s.by_key.get(&k) {
                report.rejected.push(ServiceError::Duplicate {
                    a: s.services[other as usize].spec.name.clone(),
                    b: spec.name.clone(),
                    ip: spec.cluster_ip,
                    port: spec.port,
                });
                continue;
            }
            admit_endpoints(&options, admission, &mut spec, &mut report);
            s.admit_node_port(admission, &mut spec, &mut report);
            s.admit_external_ips(&mut spec, admission, &mut report);
            admit_health_check_port(admission, &mut spec, &mut report);
            for ep in spec.endpoints.iter().chain(&spec.terminating) {
                s.alive.insert((k, *ep));
            }
            let before = previous.and_then(|p| {
                let &i = p.by_key.get(&k)?;
                Some(&p.services[i as usize])
            });
            s.by_key.insert(k, s.services.len() as u32);
            s.services
                .push(Service::new(spec, &options, s.local_subnet, before));
        }
        s.external_ips.sort_unstable();
        s.external_ips.dedup();
        s.is_external = s.external_ips.iter().copied().collect();
        s.health_checks = s.collect_health_checks(&mut report);
        (s, report)
    }

    /// Keeps the NodePort of `spec` (to be the next service) if it may be served; else
    /// reports it and clears it (the service stays, ClusterIP only).
    fn admit_node_port(
        &mut self,
        admission: &Admission,
        spec: &mut Arc<ServiceSpec>,
        report: &mut Report,
    ) {
        let Some(port) = spec.node_port else {
            return;
        };
        let np = node_port_key(spec.proto, port);
        let refused = match check_node_port(admission, &spec.name, port) {
            Err(e) => Some(e),
            Ok(()) => self
                .by_node_port
                .get(&np)
                .map(|&other| ServiceError::DuplicateNodePort {
                    a: self.services[other as usize].spec.name.clone(),
                    b: spec.name.clone(),
                    port,
                }),
        };
        match refused {
            Some(e) => {
                report.node_ports_refused.push(e);
                Arc::make_mut(spec).node_port = None;
            }
            None => {
                self.by_node_port.insert(np, self.services.len() as u32);
            }
        }
    }

    /// The health checks of the admitted services, one per port: a Service's ports share
    /// theirs; a port a TCP NodePort or an earlier Service (by name) has is refused, once per
    /// Service. The count is kube-proxy's: distinct ready endpoint addresses on this node, over
    /// all the Service's ports. Terminating ones do not count even when they serve, so that a
    /// node whose pods are all going away fails its check and the load balancer drains it.
    fn collect_health_checks(&self, report: &mut Report) -> Vec<HealthCheck> {
        use std::collections::{BTreeMap, BTreeSet};
        let here = |ip: &Ipv4Addr| self.local_subnet.is_some_and(|net| net.contains(*ip));
        let mut by_port = BTreeMap::<u16, (&str, BTreeSet<Ipv4Addr>)>::new();
        let mut refused = BTreeSet::<(&str, u16)>::new();
        for svc in &self.services {
            let Some(port) = svc.spec.health_check_node_port else {
                continue;
            };
            let service = service_of_port(&svc.spec.name);
            let ready_here = svc.spec.endpoints.iter().map(|ep| *ep.ip()).filter(here);
            let taken = match (
                self.by_node_port.get(&node_port_key(PROTO_TCP, port)),
                by_port.get_mut(&port),
            ) {
                (Some(&other), _) => Some(self.services[other as usize].spec.name.clone()),
                (None, Some((owner, ips))) if *owner == service => {
                    ips.extend(ready_here);
                    None
                }
                (None, Some((owner, _))) => Some(owner.to_string()),
                (None, None) => {
                    by_port.insert(port, (service, ready_here.collect()));
                    None
                }
            };
            if let Some(a) = taken.filter(|_| refused.insert((service, port))) {
                report
                    .node_ports_refused
                    .push(ServiceError::HealthCheckPortTaken {
                        a,
                        b: service.to_string(),
                        port,
                    });
            }
        }
        by_port
            .into_iter()
            .map(|(port, (service, ips))| HealthCheck {
                port,
                service: service.to_string(),
                local_endpoints: ips.len(),
            })
            .collect()
    }

    /// The health checks this node answers (`healthCheckNodePort`s), by port.
    pub fn health_checks(&self) -> &[HealthCheck] {
        &self.health_checks
    }

    /// Keeps the external IPs of `spec` (to be the next service) that may be served, each
    /// in `by_key` with the service's port; reports the others.
    fn admit_external_ips(
        &mut self,
        spec: &mut Arc<ServiceSpec>,
        admission: &Admission,
        report: &mut Report,
    ) {
        if spec.external_ips.is_empty() {
            return;
        }
        let idx = self.services.len() as u32;
        let mut ips = spec.external_ips.clone();
        ips.sort_unstable();
        ips.dedup();
        let mut kept = Vec::with_capacity(ips.len());
        for ip in ips {
            let k = key(ip, spec.port, spec.proto);
            let bad = bad_endpoint_address(&self.options, admission, ip).or_else(|| {
                admission
                    .pod_network
                    .is_some_and(|(network, _)| network.contains(ip))
                    .then_some(BadAddress::PodNetwork)
            });
            let refused = match (bad, self.by_key.get(&k)) {
                (Some(why), _) => Some(ServiceError::ExternalIpAddress {
                    name: spec.name.clone(),
                    ip,
                    why,
                }),
                (None, Some(&other)) => Some(ServiceError::Duplicate {
                    // Its own external IPs are deduplicated first and its ClusterIP is keyed
                    // after them (and never one of them): `other` is an earlier service.
                    a: (self.services.get(other as usize))
                        .map(|s| s.spec.name.clone())
                        .unwrap_or_default(),
                    b: spec.name.clone(),
                    ip,
                    port: spec.port,
                }),
                (None, None) => None,
            };
            match refused {
                Some(e) => report.external_ips_refused.push(e),
                None => {
                    self.by_key.insert(k, idx);
                    self.external_ips.push(ip);
                    kept.push(ip);
                }
            }
        }
        if kept != spec.external_ips {
            Arc::make_mut(spec).external_ips = kept;
        }
    }

    pub fn options(&self) -> &ServiceOptions {
        &self.options
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    pub fn specs(&self) -> impl Iterator<Item = &ServiceSpec> {
        self.services.iter().map(|s| &*s.spec)
    }

    /// The NodePorts served, as (protocol, port).
    pub fn node_ports(&self) -> impl Iterator<Item = (u8, u16)> + '_ {
        self.by_node_port
            .keys()
            .map(|&k| ((k >> 16) as u8, k as u16))
    }

    /// Whether a destination is in the service range (and so must be a service).
    #[inline]
    pub fn in_cidr(&self, dst: Ipv4Addr) -> bool {
        self.options.cidr.contains(dst)
    }

    /// The external IPs served (sorted): each is routed into podwire.
    pub fn external_ips(&self) -> &[Ipv4Addr] {
        &self.external_ips
    }

    /// Whether a destination is a service's address: in the service range, or an external IP.
    #[inline]
    pub fn is_frontend(&self, dst: Ipv4Addr) -> bool {
        self.in_cidr(dst) || (!self.external_ips.is_empty() && self.is_external_ip(dst))
    }

    /// Whether `dst` is an external IP served.
    #[inline]
    fn is_external_ip(&self, dst: Ipv4Addr) -> bool {
        self.is_external.contains(&dst)
    }

    /// Whether the backend a connection was bound to still backs its service.
    #[inline]
    pub fn binding_alive(&self, b: &ServiceBinding) -> bool {
        self.alive.contains(&(
            key(b.vip, b.port, b.proto),
            SocketAddrV4::new(b.backend, b.backend_port),
        ))
    }

    /// The NAT of a new connection `t` to a ClusterIP: its backend, and SNAT to the hairpin
    /// address when the backend is on this node (`local`).
    pub fn plan(
        &self,
        t: &Tuple,
        local: Ipv4Net,
        affinity: &Affinity,
        now: u64,
    ) -> Result<NatPlan, NoBackend> {
        let &idx = self
            .by_key
            .get(&key(t.dst, t.dport, t.proto))
            .ok_or(NoBackend::NoService)?;
        self.bind(idx, t, local, Traffic::Internal, affinity, now)
    }

    /// The NAT of a new connection `t` to a service address (a ClusterIP or an external IP,
    /// [`Services::is_frontend`]). From `network` (the cluster network: pods, and the node
    /// itself through its cluster address) it is [`Services::plan`]'s; from outside it, to an
    /// external IP, the service's `externalTrafficPolicy` ([`External`]).
    pub fn plan_frontend(
        &self,
        t: &Tuple,
        local: Ipv4Net,
        network: Ipv4Net,
        outside: External,
        affinity: &Affinity,
        now: u64,
    ) -> Result<NatPlan, NoBackend> {
        if self.in_cidr(t.dst) || network.contains(t.src) {
            return self.plan(t, local, affinity, now);
        }
        let found = self.by_key.get(&key(t.dst, t.dport, t.proto));
        self.bind_external(found, t, local, outside, affinity, now)
    }

    /// The NAT of a new connection `t` from outside the cluster to a NodePort on this node's
    /// address: its backend by the service's `externalTrafficPolicy` ([`External`]).
    pub fn plan_node_port(
        &self,
        t: &Tuple,
        local: Ipv4Net,
        outside: External,
        affinity: &Affinity,
        now: u64,
    ) -> Result<NatPlan, NoBackend> {
        let found = self.by_node_port.get(&node_port_key(t.proto, t.dport));
        self.bind_external(found, t, local, outside, affinity, now)
    }

    /// [`Services::bind`] for a connection from outside the cluster to the service `found` (if
    /// any).
    fn bind_external(
        &self,
        found: Option<&u32>,
        t: &Tuple,
        local: Ipv4Net,
        outside: External,
        affinity: &Affinity,
        now: u64,
    ) -> Result<NatPlan, NoBackend> {
        let &idx = found.ok_or(NoBackend::NoService)?;
        self.bind(idx, t, local, Traffic::External(outside), affinity, now)
    }

    /// A backend of service `idx` for the new connection `t`, by the traffic policy of its
    /// class, and the source it is seen from ([`Services::snat_for`]).
    fn bind(
        &self,
        idx: u32,
        t: &Tuple,
        local: Ipv4Net,
        class: Traffic,
        affinity: &Affinity,
        now: u64,
    ) -> Result<NatPlan, NoBackend> {
        let svc = &self.services[idx as usize];
        let k = key(svc.spec.cluster_ip, svc.spec.port, svc.spec.proto);
        if svc.cluster.endpoints.is_empty() {
            return Err(NoBackend::NoEndpoints);
        }
        let local_policy = match class {
            Traffic::Internal => svc.spec.internal_local,
            Traffic::External(o) => svc.spec.external_local && !o.network.contains(t.src),
        };
        let pick = match (&svc.local, local_policy) {
            (Some(local_pick), true) => local_pick,
            _ => &svc.cluster,
        };
        let eps = &pick.endpoints;
        if eps.is_empty() {
            return Err(NoBackend::NoLocalEndpoints);
        }
        let choose = || -> SocketAddrV4 {
            let h = flow_hash(t);
            match &pick.maglev {
                Some(m) => eps[m.pick(h)],
                None => eps[(maglev::mix64(h ^ now ^ affinity.seed) % eps.len() as u64) as usize],
            }
        };
        let backend = match svc.spec.affinity_timeout {
            // A sticky backend no longer among those this traffic may get (removed, or
            // terminating while ready ones exist) is not kept.
            Some(secs) => affinity.pick(
                k,
                t.src,
                now,
                u64::from(secs) * 1000,
                |b| pick.contains(&b),
                choose,
            ),
            None => choose(),
        };
        Ok(NatPlan {
            dnat: Some((*backend.ip(), backend.port())),
            snat: self.snat_for(class, local_policy, local.contains(*backend.ip())),
            snat_ports: None,
            service: Some(ServiceBinding {
                vip: svc.spec.cluster_ip,
                port: svc.spec.port,
                proto: svc.spec.proto,
                backend: *backend.ip(),
                backend_port: backend.port(),
            }),
        })
    }

    /// What a backend sees a new connection come from, so that its answers come back through
    /// this node: the client itself for a pod's connection to a remote backend, and for an
    /// outside client under `externalTrafficPolicy: Local` (`local_policy`) where the node
    /// steers its pods' answers to outside into podwire; else the hairpin address for a
    /// backend on this node (`backend_here`), the node's cluster address for an outside client
    /// of a remote backend.
    fn snat_for(&self, class: Traffic, local_policy: bool, backend_here: bool) -> Option<Ipv4Addr> {
        match class {
            Traffic::External(o) if local_policy && o.clients_kept => None,
            _ if backend_here => Some(self.options.hairpin_ip),
            Traffic::Internal => None,
            Traffic::External(o) => Some(o.cluster_ip),
        }
    }
}

/// How a node serves connections from outside the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct External {
    /// The node's address in the cluster network, which other nodes route to it: an outside
    /// client of a remote backend is SNATed to it (`externalTrafficPolicy: Cluster`).
    pub cluster_ip: Ipv4Addr,
    /// The node's pods' answers to outside addresses come back through podwire (policy routing
    /// steers them into it: `--io xdp --ip-masq`), so a connection to a local backend needs no
    /// SNAT to return, and `externalTrafficPolicy: Local` keeps the client's address. Without
    /// it the kernel would send such an answer past podwire, untranslated: the hairpin SNAT
    /// stays, and Local means local endpoints only.
    pub clients_kept: bool,
    /// The cluster network: a client in it (a pod of a DirectRouting node, reaching a NodePort
    /// over the wire) follows the Cluster policy whatever the Service's, as kube-proxy
    /// short-circuits pods' traffic to external destinations.
    pub network: Ipv4Net,
}

/// Which traffic policy a new connection follows.
#[derive(Debug, Clone, Copy)]
enum Traffic {
    /// From a pod to a ClusterIP: `internalTrafficPolicy`.
    Internal,
    /// From outside the cluster to a NodePort or an external IP: `externalTrafficPolicy`.
    External(External),
}

/// Why a service cannot be served at all.
fn check_service(options: &ServiceOptions, spec: &ServiceSpec) -> Result<(), ServiceError> {
    let name = || spec.name.clone();
    if !options.cidr.contains(spec.cluster_ip) {
        return Err(ServiceError::OutsideCidr {
            name: name(),
            ip: spec.cluster_ip,
            cidr: options.cidr,
        });
    }
    if spec.cluster_ip == options.hairpin_ip {
        return Err(ServiceError::HairpinAddress {
            name: name(),
            ip: spec.cluster_ip,
        });
    }
    if spec.proto != PROTO_TCP && spec.proto != PROTO_UDP {
        return Err(ServiceError::Protocol {
            name: name(),
            proto: spec.proto,
        });
    }
    if spec.port == 0 {
        return Err(ServiceError::PortZero { name: name() });
    }
    let n = spec.endpoints.len() + spec.terminating.len();
    if n > usize::from(u16::MAX) {
        return Err(ServiceError::TooManyEndpoints { name: name(), n });
    }
    if let Some(secs) = spec.affinity_timeout {
        if secs == 0 || secs > MAX_AFFINITY_TIMEOUT {
            return Err(ServiceError::AffinityTimeout { name: name(), secs });
        }
    }
    Ok(())
}

/// Why `ip` cannot be an endpoint, if it cannot: kube-apiserver's checks of an endpoint
/// address (`ValidateEndpointIP`: not unspecified, loopback, link-local or link-local
/// multicast), widened to every multicast and reserved address, and podwire's own: the
/// pod network's broadcast addresses, the node's addresses, the service range.
pub fn bad_endpoint_address(
    options: &ServiceOptions,
    admission: &Admission,
    ip: Ipv4Addr,
) -> Option<BadAddress> {
    let o = ip.octets();
    let why = if o[0] == 0 {
        BadAddress::Unspecified
    } else if ip.is_loopback() {
        BadAddress::Loopback
    } else if ip.is_link_local() {
        BadAddress::LinkLocal
    } else if ip.is_multicast() {
        BadAddress::Multicast
    } else if o[0] >= 240 {
        BadAddress::Reserved
    } else if admission.node_addrs.contains(&ip) {
        BadAddress::Node
    } else if options.cidr.contains(ip) {
        BadAddress::ServiceRange
    } else if admission
        .pod_network
        .is_some_and(|(network, len)| is_lease_broadcast(network, len, ip))
    {
        BadAddress::Broadcast
    } else {
        return None;
    };
    Some(why)
}

/// Whether `ip` is the broadcast address of a `/len` lease of `network`.
fn is_lease_broadcast(network: Ipv4Net, len: u8, ip: Ipv4Addr) -> bool {
    // A /31 or /32 lease has no broadcast address.
    if !network.contains(ip) || len > 30 {
        return false;
    }
    let host = u32::MAX >> len;
    ip.to_bits() & host == host
}

/// Why an endpoint is removed: `Some(address problem)`, or `None` for port 0.
fn check_endpoint(
    options: &ServiceOptions,
    admission: &Admission,
    ep: &SocketAddrV4,
) -> Result<(), Option<BadAddress>> {
    if let Some(why) = bad_endpoint_address(options, admission, *ep.ip()) {
        return Err(Some(why));
    }
    if ep.port() == 0 {
        return Err(None);
    }
    Ok(())
}

/// Why a NodePort is refused (a taken one aside).
fn check_node_port(admission: &Admission, name: &str, port: u16) -> Result<(), ServiceError> {
    if port == 0 {
        return Err(ServiceError::NodePortZero { name: name.into() });
    }
    if let Some(&(_, what)) = admission.own_ports.iter().find(|(r, _)| r.contains(port)) {
        return Err(ServiceError::NodePortOwn {
            name: name.into(),
            port,
            what,
        });
    }
    if !admission.node_port_range.contains(port) {
        return Err(ServiceError::NodePortRange {
            name: name.into(),
            port,
            range: admission.node_port_range,
        });
    }
    Ok(())
}

/// The Service a service port's record belongs to: its name without the `:port` kube-proxy
/// appends for a named port (namespaces and names hold no colon).
fn service_of_port(name: &str) -> &str {
    name.split_once(':').map_or(name, |(service, _)| service)
}

/// NodePort lookup key.
fn node_port_key(proto: u8, port: u16) -> u32 {
    u32::from(proto) << 16 | u32::from(port)
}

/// A fixed hash of a 5-tuple, the same on every node (so Maglev is consistent cluster-wide).
#[inline]
pub fn flow_hash(t: &Tuple) -> u64 {
    let a = u64::from(t.src.to_bits()) << 32 | u64::from(t.dst.to_bits());
    let b = u64::from(t.sport) << 32 | u64::from(t.dport) << 16 | u64::from(t.proto);
    maglev::mix64(a ^ maglev::mix64(b))
}

const AFFINITY_SHARDS: usize = 16;

/// (service key, client address) -> (backend, expiry in ms).
type StickyMap = rustc_hash::FxHashMap<(u64, Ipv4Addr), (SocketAddrV4, u64)>;

/// sessionAffinity ClientIP: the backend each (service, client address) used last, kept for the
/// service's timeout after the client's last new connection (`recent --rcheck --seconds T
/// --reap` then `--set`, as kube-proxy's rules). Shared by the workers; touched only by the
/// first packet of a connection.
pub struct Affinity {
    shards: Box<[Mutex<StickyMap>]>,
    seed: u64,
    /// Most entries per shard; beyond it expired ones are swept, then new clients go unsticky.
    max_per_shard: usize,
}

impl Default for Affinity {
    fn default() -> Self {
        Affinity::new(65_536)
    }
}

impl Affinity {
    pub fn new(max_entries: usize) -> Affinity {
        use std::hash::BuildHasher;
        Affinity {
            shards: (0..AFFINITY_SHARDS).map(|_| Mutex::default()).collect(),
            seed: std::collections::hash_map::RandomState::new().hash_one(1u8),
            max_per_shard: max_entries.div_ceil(AFFINITY_SHARDS).max(1),
        }
    }

    fn pick(
        &self,
        service: u64,
        client: Ipv4Addr,
        now: u64,
        timeout_ms: u64,
        alive: impl Fn(SocketAddrV4) -> bool,
        choose: impl FnOnce() -> SocketAddrV4,
    ) -> SocketAddrV4 {
        let i = (maglev::mix64(u64::from(client.to_bits()) ^ service) as usize) % AFFINITY_SHARDS;
        let mut m = self.shards[i]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let sticky = m
            .get(&(service, client))
            .filter(|(b, expires)| *expires > now && alive(*b))
            .map(|(b, _)| *b);
        let backend = sticky.unwrap_or_else(choose);
        if m.len() >= self.max_per_shard && !m.contains_key(&(service, client)) {
            m.retain(|_, (_, expires)| *expires > now);
        }
        if m.len() < self.max_per_shard || m.contains_key(&(service, client)) {
            m.insert((service, client), (backend, now + timeout_ms));
        }
        backend
    }

    /// Live entries (for inspection).
    pub fn len(&self, now: u64) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .filter(|(_, e)| *e > now)
                    .count()
            })
            .sum()
    }

    pub fn is_empty(&self, now: u64) -> bool {
        self.len(now) == 0
    }
}

#[cfg(test)]
mod tests;
