//! The lab's network: namespaces, veths and the underlay bridge, the kernel VXLAN nodes
//! flanneld would set up, and the packet capture.

use super::*;

/// Namespaces, the underlay bridge with every node and the rogue host on it, what earlier
/// runs left on node 1, and (but in L2 mode) each node's pod.
pub(super) fn build_topology(res: &mut Resources, opts: &LabOptions) -> Result<()> {
    let u = add_namespaces(res, opts)?;
    for i in 1..=opts.nodes {
        attach(
            &u,
            &format!("n{i}"),
            &res.ns(&format!("n{i}")),
            underlay_ip(i),
        )?;
        if opts.io_xdp {
            // AF_XDP sees frames as they are on the wire, with no skb to say a checksum was
            // left to offload: make every node's port finish its checksums, as a physical
            // wire carries them (veth leaves them partial otherwise).
            netns::exec_in(
                &res.ns(&format!("n{i}")),
                &["ethtool", "-K", "eth0", "tx", "off"],
            )?;
        }
    }
    if opts.forward_drop {
        for i in 1..=opts.nodes {
            forward_policy_drop(res, opts, i)?;
        }
    }
    plant_leftovers(res, opts)?;
    attach(&u, "x", &res.ns("x"), ROGUE_IP)?;
    if opts.io_xdp {
        // It is the outside client of node 1's NodePorts: its frames reach AF_XDP whole too.
        netns::exec_in(&res.ns("x"), &["ethtool", "-K", "eth0", "tx", "off"])?;
    }
    // In L2 mode the pods are made by `l2_lab`, attached by podwire itself.
    for i in (1..=opts.nodes).filter(|_| !opts.l2) {
        add_pod(res, opts, i)?;
    }
    Ok(())
}

/// Node `i`'s iptables FORWARD policy set to DROP; on a kernel node, the accept rules flanneld
/// adds for the pod network (its `-iptables-forward-rules`), as a flannel node has them.
fn forward_policy_drop(res: &Resources, opts: &LabOptions, i: usize) -> Result<()> {
    let host = res.ns(&format!("n{i}"));
    netns::exec_in(&host, &["iptables", "-P", "FORWARD", "DROP"])?;
    if opts.is_kernel_node(i) {
        for side in ["-s", "-d"] {
            netns::exec_in(
                &host,
                &[
                    "iptables",
                    "-A",
                    "FORWARD",
                    side,
                    network(opts),
                    "-m",
                    "comment",
                    "--comment",
                    "flanneld forward",
                    "-j",
                    "ACCEPT",
                ],
            )?;
        }
    }
    Ok(())
}

/// Node `i`'s pod: its namespace's veth to the host's `vpod`, addresses and default route.
fn add_pod(res: &Resources, opts: &LabOptions, i: usize) -> Result<()> {
    let (host, pod) = (res.ns(&format!("n{i}")), res.ns(&format!("p{i}")));
    netns::ip_in(
        &host,
        &[
            "link", "add", "vpod", "type", "veth", "peer", "name", "eth0", "netns", &pod,
        ],
    )?;
    netns::ip_in(
        &host,
        &[
            "addr",
            "add",
            &format!("{}/24", gateway_ip(i)),
            "dev",
            "vpod",
        ],
    )?;
    netns::ip_in(&host, &["link", "set", "vpod", "up"])?;
    netns::ip_in(
        &pod,
        &["addr", "add", &format!("{}/24", pod_ip(i)), "dev", "eth0"],
    )?;
    netns::ip_in(&pod, &["link", "set", "eth0", "up"])?;
    if opts.pod_xdp && !opts.is_kernel_node(i) {
        // AF_XDP on vpod sees the pod's frames as sent: with full checksums (no skb to say
        // one was left to offload), and with GRO, which native XDP on veth wants of the
        // sender for its frames to be redirected.
        netns::exec_in(&pod, &["ethtool", "-K", "eth0", "tx", "off", "gro", "on"])?;
    }
    netns::ip_in(
        &pod,
        &["route", "add", "default", "via", &gateway_ip(i).to_string()],
    )?;
    netns::exec_in(&host, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])
}

/// Every namespace of the lab, up, and the underlay's bridge; returns the underlay's name.
fn add_namespaces(res: &mut Resources, opts: &LabOptions) -> Result<String> {
    let u = res.ns("u");
    let mut names = vec![u.clone()];
    for i in 1..=opts.nodes {
        names.push(res.ns(&format!("n{i}")));
        if !opts.l2 {
            names.push(res.ns(&format!("p{i}")));
        }
    }
    names.push(res.ns("x"));
    for name in names {
        netns::ip(&["netns", "add", &name])?;
        res.namespaces.push(name.clone());
        netns::ip_in(&name, &["link", "set", "lo", "up"])?;
    }
    netns::ip_in(&u, &["link", "add", "br0", "type", "bridge"])?;
    netns::ip_in(&u, &["link", "set", "br0", "up"])?;
    let server = if opts.etcd {
        Some(etcd_lab::ETCD_IP)
    } else if opts.kube {
        Some(kube_lab::API_IP)
    } else {
        None
    };
    if let Some(ip) = server {
        netns::ip_in(&u, &["addr", "add", &format!("{ip}/24"), "dev", "br0"])?;
    }
    Ok(u)
}

/// Plugs `host_ns`'s eth0, at `ip`, into the underlay bridge as port `port`.
fn attach(u: &str, port: &str, host_ns: &str, ip: Ipv4Addr) -> Result<()> {
    netns::ip_in(
        u,
        &[
            "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host_ns,
        ],
    )?;
    netns::ip_in(u, &["link", "set", port, "master", "br0", "up"])?;
    netns::ip_in(
        host_ns,
        &["addr", "add", &format!("{ip}/24"), "dev", "eth0"],
    )?;
    netns::ip_in(host_ns, &["link", "set", "eth0", "up"])
}

/// What earlier runs left on node 1 for its podwire to deal with: flanneld's VXLAN device,
/// a stale XDP program, stale routes.
fn plant_leftovers(res: &Resources, opts: &LabOptions) -> Result<()> {
    if opts.vxlan() && !opts.l2 && !opts.is_kernel_node(1) {
        // Node 1 was a flanneld vxlan node: its flannel.1 is still there, up, holding the name
        // and port 8472. podwire must take its place.
        let n1 = res.ns("n1");
        netns::ip_in(
            &n1,
            &[
                "link",
                "add",
                FLANNELD_DEVICE,
                "type",
                "vxlan",
                "id",
                "1",
                "dstport",
                "8472",
                "dev",
                "eth0",
            ],
        )?;
        netns::ip_in(&n1, &["link", "set", FLANNELD_DEVICE, "up"])?;
    }
    if opts.io_xdp && !opts.is_kernel_node(1) {
        // What a podwire killed on a kernel before 5.9 leaves: its program attached through
        // netlink, which outlives the process. Node 1's podwire must take it off.
        let object = res.names.dir.join("podwire_xdp.o");
        std::fs::write(&object, podwire_dataplane::port::xdp::object())?;
        let path = object.display().to_string();
        netns::ip_in(
            &res.ns("n1"),
            &[
                "link",
                "set",
                "dev",
                "eth0",
                "xdpgeneric",
                "obj",
                &path,
                "sec",
                "xdp",
            ],
        )
        .context("attaching a stale XDP program to node 1 (ip link ... xdpgeneric obj)")?;
    }
    if opts.direct_routing && !opts.is_kernel_node(1) {
        // What a SIGKILLed podwire leaves when the peer's lease vanishes before the restart,
        // and somebody else's route beside it: the first must go, the second stay.
        let n1 = res.ns("n1");
        for (net, via, proto) in STALE_ROUTES {
            netns::ip_in(
                &n1,
                &[
                    "route", "add", net, "via", via, "dev", "eth0", "proto", proto,
                ],
            )?;
        }
    }
    Ok(())
}

pub(super) fn cluster_file(opts: &LabOptions) -> serde_json::Value {
    let subnets: serde_json::Map<String, serde_json::Value> = (1..=opts.nodes)
        .map(|i| {
            let mut attrs = podwire::lease::LeaseAttrs::udp(underlay_ip(i));
            if opts.vxlan() {
                attrs.backend_type = Some("vxlan".into());
                attrs.backend_data = Some(json!({"VNI": 1, "VtepMAC": vtep_mac(i).to_string()}));
            }
            (
                format!("10.244.{i}.0-24"),
                serde_json::to_value(attrs).expect("lease serialises"),
            )
        })
        .collect();
    json!({
        "config": {"Network": network(opts), "SubnetLen": 24,
                   "Backend": if opts.vxlan() {
                       json!({"Type": "vxlan", "DirectRouting": opts.direct_routing})
                   } else {
                       json!({"Type": "udp"})
                   }},
        "subnets": subnets,
    })
}

/// Node `i`'s VTEP MAC: the one podwire derives from the PublicIP (0e:70:c0:a8:63:0b for node
/// 1), so the kernel nodes, set up before any lease is written, already know podwire's.
pub(super) fn vtep_mac(i: usize) -> MacAddr {
    podwire::tables::derived_vtep_mac(underlay_ip(i))
}

/// Configures every node's `flannel.1` exactly as flanneld's vxlan backend does: a VXLAN device
/// with nolearning on port 8472, MTU - 50, the lease's .0/32, and per remote lease a permanent
/// neighbour entry, a permanent FDB entry and an onlink route (reference/flannel-compat.md §3).
pub(super) fn start_kernel_vxlan(res: &mut Resources, opts: &LabOptions) -> Result<()> {
    let mixed = !opts.podwire_nodes().is_empty();
    for i in (1..=opts.nodes).filter(|&i| opts.is_kernel_node(i)) {
        let host = res.ns(&format!("n{i}"));
        if mixed {
            // A veth "wire" carries the kernel's VXLAN TSO superframes as they are; a physical
            // NIC (or the stack, for the usual NIC without VXLAN TSO) segments them first. Make
            // the kernel peer's port behave like such a NIC: podwire's UDP socket would get one
            // datagram holding several MTU-sized segments otherwise (see docs/architecture.md).
            netns::exec_in(
                &host,
                &[
                    "ethtool",
                    "-K",
                    "eth0",
                    "tx-udp_tnl-segmentation",
                    "off",
                    "tx-udp_tnl-csum-segmentation",
                    "off",
                ],
            )?;
        }
        add_kernel_vxlan_device(&host, i)?;
        for j in (1..=opts.nodes).filter(|&j| j != i) {
            add_kernel_vxlan_peer(&host, opts, j)?;
        }
        netns::ip_in(
            &res.ns(&format!("p{i}")),
            &["link", "set", "eth0", "mtu", "1450"],
        )?;
        netns::ip_in(&host, &["link", "set", "vpod", "mtu", "1450"])?;
    }
    Ok(())
}

/// Node `i`'s `flannel.1`, as flanneld's vxlan backend creates it, in `host`.
fn add_kernel_vxlan_device(host: &str, i: usize) -> Result<()> {
    let local = underlay_ip(i).to_string();
    netns::ip_in(
        host,
        &[
            "link",
            "add",
            "flannel.1",
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            &local,
            "dev",
            "eth0",
            "dstport",
            "8472",
            "nolearning",
        ],
    )?;
    netns::ip_in(
        host,
        &[
            "link",
            "set",
            "flannel.1",
            "address",
            &vtep_mac(i).to_string(),
            "mtu",
            "1450",
            "up",
        ],
    )?;
    netns::ip_in(
        host,
        &[
            "addr",
            "add",
            &format!("10.244.{i}.0/32"),
            "dev",
            "flannel.1",
        ],
    )
}

/// What flanneld's vxlan backend adds in `host` for the lease of node `j`.
fn add_kernel_vxlan_peer(host: &str, opts: &LabOptions, j: usize) -> Result<()> {
    if opts.direct_routing {
        // flanneld's DirectRouting for a peer on the same subnet: a plain route, no VXLAN.
        let (subnet, via) = (format!("10.244.{j}.0/24"), underlay_ip(j).to_string());
        return netns::ip_in(host, &["route", "add", &subnet, "via", &via, "dev", "eth0"]);
    }
    let gw = format!("10.244.{j}.0");
    netns::ip_in(
        host,
        &[
            "neigh",
            "add",
            &gw,
            "lladdr",
            &vtep_mac(j).to_string(),
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ],
    )?;
    netns::exec_in(
        host,
        &[
            "bridge",
            "fdb",
            "append",
            &vtep_mac(j).to_string(),
            "dev",
            "flannel.1",
            "dst",
            &underlay_ip(j).to_string(),
            "self",
            "permanent",
        ],
    )?;
    netns::ip_in(
        host,
        &[
            "route",
            "add",
            &format!("10.244.{j}.0/24"),
            "via",
            &gw,
            "dev",
            "flannel.1",
            "onlink",
        ],
    )
}

/// Starts tshark on the underlay bridge, writing encapsulated traffic (UDP 8285 and 8472) to
/// `path`, and waits until it is capturing. It is stopped with the daemons (SIGTERM, which makes
/// tshark finish the file).
pub(super) fn start_capture(res: &mut Resources, path: &Path) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &res.ns("u"),
            "tshark",
            "-q",
            "-i",
            "br0",
            "-F",
            "pcap",
        ])
        .args(["-f", "udp port 8285 or udp port 8472", "-w"])
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting tshark for --capture (is tshark installed?)")?;
    res.children.push(("capture".into(), child));
    let deadline = Instant::now() + Duration::from_secs(15);
    // tshark writes the 24-byte pcap file header once it is capturing.
    while std::fs::metadata(path)
        .map(|m| m.len() < 24)
        .unwrap_or(true)
    {
        if Instant::now() > deadline {
            bail!("tshark did not start capturing on the underlay within 15 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
