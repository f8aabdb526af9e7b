//! Netns integration: the real `podwire-lab lab` (real TUN devices, sockets, netns and traffic)
//! running the real `podwire` daemon, with 2 and 4 nodes, and teardown on Ctrl-C. Needs root;
//! skipped otherwise. The labs run one at a time (the machine has 2 cores) and each test checks
//! that nothing was left behind.
//!
//! The daemon is the `podwire` binary beside `podwire-lab` in cargo's target directory, which
//! `cargo test --workspace` (`./dev test`) builds with every binary of the workspace. A missing
//! or stale one fails the tests: build it with `cargo build --release -p podwire`.

#![allow(clippy::tests_outside_test_module)] // integration tests live outside test modules by design

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The right to run a lab now: labs run one at a time (2 cores). None, and the test is skipped,
/// without root. Panics without an up-to-date daemon binary.
fn lab_slot() -> Option<std::sync::MutexGuard<'static, ()>> {
    // A missing daemon fails the test even where the lab would be skipped.
    lab_binary();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return None;
    }
    Some(ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The `podwire-lab` binary, once the `podwire` daemon beside it (the one it runs) is known to
/// be there and built after every source it is made from: a test never passes, nor skips, on a
/// missing or stale daemon.
fn lab_binary() -> &'static str {
    static CHECKED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let lab = env!("CARGO_BIN_EXE_podwire-lab");
    CHECKED.get_or_init(|| {
        let daemon = podwire_lab::daemon_binary::beside(std::path::Path::new(lab));
        let built = std::fs::metadata(&daemon)
            .and_then(|m| m.modified())
            .unwrap_or_else(|e| {
                panic!(
                    "the podwire daemon binary {} is missing ({e}): `cargo test --workspace` \
                     builds it; alone, run `cargo build --release -p podwire` first",
                    daemon.display()
                )
            });
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let newer = ["control/src", "dataplane/src", "ebpf", "Cargo.lock"]
            .iter()
            .flat_map(|d| newest_files(&root.join(d)))
            .find(|(_, modified)| *modified > built);
        if let Some((source, _)) = newer {
            panic!(
                "the podwire daemon binary {} is older than {}: rebuild it \
                 (`cargo build --release -p podwire`, or `cargo test --workspace`)",
                daemon.display(),
                source.display()
            );
        }
    });
    lab
}

/// Every file under `path` (or `path` itself) with its modification time.
fn newest_files(path: &std::path::Path) -> Vec<(PathBuf, std::time::SystemTime)> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Vec::new();
    };
    if meta.is_file() {
        return meta
            .modified()
            .map(|m| vec![(path.to_path_buf(), m)])
            .unwrap_or_default();
    }
    std::fs::read_dir(path)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .flat_map(|e| newest_files(&e.path()))
                .collect()
        })
        .unwrap_or_default()
}

fn leftovers(lab_pid: u32) -> (Vec<String>, Vec<String>) {
    let prefix = format!("pw{lab_pid}-");
    let ns: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    let lab_dir = format!("podwire-lab-{lab_pid}");
    let procs: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let cmd = std::fs::read(e.ok()?.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(&lab_dir).then_some(cmd)
        })
        .collect();
    (ns, procs)
}

/// Runs the podwire-lab binary with `args` to the end; asserts that it succeeded and left no
/// namespace or process behind; returns what it printed.
fn run_podwire_lab(args: &[&str]) -> String {
    let child = Command::new(lab_binary())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (ns, procs) = leftovers(pid);
    assert!(
        ns.is_empty() && procs.is_empty(),
        "podwire-lab {} left behind netns {ns:?} processes {procs:?}\n{text}",
        args[0]
    );
    assert!(
        out.status.success(),
        "podwire-lab {} failed:\n{text}",
        args[0]
    );
    text
}

fn run_lab(args: &[&str]) -> (serde_json::Value, String) {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let json = std::env::temp_dir().join(format!(
        "podwire-lab-test-{}-{run}.json",
        std::process::id()
    ));
    let mut full = vec!["lab"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--json", json.to_str().unwrap()]);
    let text = run_podwire_lab(&full);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    (v, text)
}

fn check<'a>(report: &'a serde_json::Value, starts_with: &str) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str().unwrap().starts_with(starts_with))
        .unwrap_or_else(|| panic!("no check {starts_with:?} in {report:#}"))
}

#[test]
fn two_podwire_nodes_carry_real_traffic() {
    let Some(_slot) = lab_slot() else { return };
    let (report, text) = run_lab(&["--nodes", "2", "--transfer-mb", "50"]);
    assert_eq!(report["ok"], true, "{text}");
    let pairs = report["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 2, "both directions");
    for p in pairs {
        assert_eq!(p["ping_received"], p["ping_sent"], "{p}");
        assert_eq!(p["tcp_bytes"], 50_000_000u64, "{p}");
        assert_eq!(p["tcp_sha256_ok"], true, "{p}");
        assert!(p["tcp_mbps"].as_f64().unwrap() > 0.0);
    }
    for name in [
        "ping between every pair",
        "TCP 50 MB with intact SHA-256",
        "UDP request/response",
        "ICMP net-unreachable for an address in no lease",
        "datagrams from a non-node are dropped",
        "forged datagrams counted as unknown_peer",
        "subnet map swapped live",
        "every daemon exited cleanly",
    ] {
        assert_eq!(check(&report, name)["ok"], true, "{name}: {text}");
    }
    assert!(check(&report, "ICMP net-unreachable")["detail"]
        .as_str()
        .unwrap()
        .contains("type 3 code 0 from 10.244.1.0"));
    // The forged datagrams were counted on node 1 and nothing reached a pod from the stranger.
    assert!(
        report["node_stats"][0]["stats"]["drops"]["unknown_peer"]
            .as_u64()
            .unwrap()
            >= 5
    );
    assert_eq!(report["node_stats"][1]["stats"]["drops"]["unknown_peer"], 0);
}

#[test]
fn four_podwire_nodes_join_through_etcd() {
    let Some(_slot) = lab_slot() else { return };
    // A real etcd started by the lab; two workers per node (multi-queue TUN and SO_REUSEPORT
    // sockets, so a connection's two directions may meet different workers); node 4 joins
    // once 1-3 are ready and must be reachable without restarting anyone. Services come from
    // etcd's services/ prefix, a backend's removal too.
    let (report, text) = run_lab(&[
        "--store",
        "etcd",
        "--nodes",
        "4",
        "--workers",
        "2",
        "--transfer-mb",
        "10",
        "--udp-count",
        "50",
        "--services",
    ]);
    assert_eq!(report["ok"], true, "{text}");
    assert_eq!(report["store"], "etcd");
    assert_eq!(report["pairs"].as_array().unwrap().len(), 12);
    for p in report["pairs"].as_array().unwrap() {
        assert_eq!(p["tcp_sha256_ok"], true, "{p}");
    }
    assert_eq!(report["node_stats"].as_array().unwrap().len(), 4);
    for name in [
        "node 1's /metrics: every lease in the live map",
        "a deleted lease is taken again by its live node",
        "etcd killed under a TCP transfer",
        "a stopped node keeps its lease; deleting it removes the route everywhere",
        "the node rejoins with its old subnet",
        "every daemon exited cleanly",
    ]
    .into_iter()
    .chain(SERVICE_CHECKS)
    {
        assert_eq!(check(&report, name)["ok"], true, "{name}: {text}");
    }
    let f = &report["figures"];
    assert_eq!(f["put_to_live_samples"], 60, "{f}");
    assert!(f["put_to_live_p50_ms"].as_f64().unwrap() > 0.0, "{f}");
}

#[test]
fn podwire_and_kernel_vxlan_nodes_share_one_etcd() {
    let Some(_slot) = lab_slot() else { return };
    // The kernel nodes' leases are written in flanneld's vxlan form; podwire must route to them
    // and they to podwire, whose own lease it writes itself.
    let (report, text) = run_lab(&[
        "--store",
        "etcd",
        "--backend",
        "vxlan",
        "--peer",
        "kernel",
        "--nodes",
        "3",
        "--transfer-mb",
        "10",
    ]);
    assert_eq!(report["ok"], true, "{text}");
    assert_eq!(report["pairs"].as_array().unwrap().len(), 6);
    assert_eq!(
        check(&report, "node 1's /metrics")["detail"],
        "podwire_subnet_map_leases Some(3.0), want 3"
    );
}

#[test]
fn podwire_nodes_join_through_the_kubernetes_api_beside_a_flanneld_node() {
    let Some(_slot) = lab_slot() else { return };
    // --kube-subnet-mgr against the API server stand-in: node 1 podwire, nodes 2 and 3 the
    // kernel's flannel.1 with their Nodes annotated as flanneld annotates them.
    let (report, text) = run_lab(&[
        "--store",
        "kube",
        "--backend",
        "vxlan",
        "--peer",
        "kernel",
        "--nodes",
        "3",
        "--transfer-mb",
        "10",
    ]);
    assert_all_checks_pass(&report, &text);
    assert_eq!(report["store"], "kube");
    assert_eq!(report["pairs"].as_array().unwrap().len(), 6);
    for name in [
        "each podwire node annotates its Node as flanneld does",
        "API server restarted under a TCP transfer",
        "an expired watch (410) is relisted",
    ] {
        assert_eq!(check(&report, name)["ok"], true, "{name}: {text}");
    }
}

#[test]
fn three_podwire_nodes_join_through_the_kubernetes_api() {
    let Some(_slot) = lab_slot() else { return };
    // Every node podwire (flannel's udp wire): each takes its Node's podCIDR and finds the
    // others through their annotations; services come from Services and EndpointSlices.
    let (report, text) = run_lab(&[
        "--store",
        "kube",
        "--backend",
        "udp",
        "--nodes",
        "3",
        "--services",
        "--transfer-mb",
        "10",
    ]);
    assert_all_checks_pass(&report, &text);
    assert_eq!(
        check(&report, "a backend removed mid-run")["ok"],
        true,
        "an EndpointSlice update reaches the service NAT: {text}"
    );
    assert_eq!(
        check(&report, "each podwire node annotates")["detail"],
        "3 nodes: backend-type, backend-data, public-ip, kube-subnet-manager; NetworkUnavailable False"
    );
}

fn wait_for(mut cond: impl FnMut() -> bool, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn ctrl_c_tears_the_lab_down() {
    let Some(_slot) = lab_slot() else { return };
    let mut child: Child = Command::new(lab_binary())
        .args(["lab", "--nodes", "2", "--transfer-mb", "20000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let started = wait_for(|| leftovers(pid).1.len() >= 2, Duration::from_secs(20));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    // Promptly: well before the 20 GB transfers in flight could finish.
    let exited = wait_for(
        || matches!(child.try_wait(), Ok(Some(_))),
        Duration::from_secs(10),
    );
    if !exited {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    assert!(started, "the lab's podwire daemons never started");
    assert!(exited, "the lab did not exit on SIGINT");
    assert!(!status.success());
    let (ns, procs) = leftovers(pid);
    assert!(
        ns.is_empty() && procs.is_empty(),
        "left behind netns {ns:?} processes {procs:?}"
    );
    assert!(
        !PathBuf::from(format!("/tmp/podwire-lab-{pid}")).exists(),
        "lab directory left behind"
    );
}

/// The pid of the `podwire run` whose ctl socket is in lab `lab_pid`'s directory for `node`.
fn daemon_pid(lab_pid: u32, node: usize) -> Option<i32> {
    let socket = format!("/tmp/podwire-lab-{lab_pid}/n{node}/ctl.sock");
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let e = e.ok()?;
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        (cmd.contains(" run ") && cmd.contains(&socket)).then_some(pid)
    })
}

#[test]
fn a_daemon_killed_mid_run_fails_the_lab() {
    let Some(_slot) = lab_slot() else { return };
    // Someone else SIGKILLs node 2's daemon while the lab's traffic runs: the lab must fail,
    // naming the node and the signal, and still leave nothing behind.
    let out_path = std::env::temp_dir().join(format!("podwire-killed-{}.txt", std::process::id()));
    let out = std::fs::File::create(&out_path).unwrap();
    let mut child: Child = Command::new(lab_binary())
        .args([
            "lab",
            "--nodes",
            "2",
            "--transfer-mb",
            "20",
            "--ping-count",
            "2",
        ])
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let pid = child.id();
    let env = PathBuf::from(format!("/tmp/podwire-lab-{pid}/n2/subnet.env"));
    let mut victim = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    // Once node 2 is ready: the lab is then about to send, or sending, its pings, and asks
    // after them whether its daemons live (before the TCP transfer, which a dead node would
    // hold up to its timeout).
    while Instant::now() < deadline && !env.exists() {
        victim = victim.or_else(|| daemon_pid(pid, 2));
        std::thread::sleep(Duration::from_millis(2));
    }
    let ready = env.exists();
    if let Some(p) = victim.filter(|_| ready) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    let exited = wait_for(
        || matches!(child.try_wait(), Ok(Some(_))),
        Duration::from_secs(40),
    );
    if !exited {
        // SIGTERM: the lab tears down.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    assert!(ready && victim.is_some(), "node 2 never ran:\n{text}");
    assert!(
        exited,
        "the lab went on for 40 s after node 2 was killed:\n{text}"
    );
    assert!(
        !status.success(),
        "the lab passed with node 2 killed:\n{text}"
    );
    assert!(
        text.contains(
            "podwire on node 2 was killed by signal 9 (SIGKILL), which the lab did not send"
        ),
        "{text}"
    );
    let (ns, procs) = leftovers(pid);
    assert!(
        ns.is_empty() && procs.is_empty(),
        "left behind netns {ns:?} processes {procs:?}"
    );
}

fn assert_all_checks_pass(report: &serde_json::Value, text: &str) {
    assert_eq!(report["ok"], true, "{text}");
    for c in report["checks"].as_array().unwrap() {
        assert_eq!(c["ok"], true, "{c}: {text}");
    }
    for p in report["pairs"].as_array().unwrap() {
        assert_eq!(p["tcp_sha256_ok"], true, "{p}");
        assert_eq!(p["udp_received"], p["udp_sent"], "{p}");
    }
}

#[test]
fn vxlan_podwire_interoperates_with_a_kernel_flannel_node() {
    let Some(_slot) = lab_slot() else { return };
    // Node 1 podwire, node 2 the kernel's flannel.1 as flanneld sets it up: both directions.
    // Both nodes' FORWARD policy is DROP (as Docker sets it): podwire's FORWARD accept rules
    // and flanneld's get the pods' traffic past it.
    let (report, text) = run_lab(&[
        "--nodes",
        "2",
        "--backend",
        "vxlan",
        "--peer",
        "kernel",
        "--transfer-mb",
        "50",
        "--forward-drop",
    ]);
    assert_all_checks_pass(&report, &text);
    assert_eq!(report["pairs"].as_array().unwrap().len(), 2);
    assert_eq!(
        check(&report, "full-size ping (1450-byte")["ok"],
        true,
        "MTU-boundary ping with DF"
    );
    assert_eq!(report["pairs"][0]["tcp_bytes"], 50_000_000u64);
}

/// externalTrafficPolicy Local on node 1's NodePorts, from the outside host.
const ETP_LOCAL_CHECKS: [&str; 3] = [
    "externalTrafficPolicy Local: 20 connections from outside to NodePort 30090 reach node 1's endpoint only, which sees 192.168.99.200",
    "externalTrafficPolicy Local without an endpoint on node 1: NodePort 30092 drops the connection",
    "the health check node ports answer 200 with 1 local endpoint, 503 with none",
];

#[test]
fn vxlan_over_af_xdp_with_a_kernel_flannel_node() {
    let Some(_slot) = lab_slot() else { return };
    // Node 1 podwire with `--io xdp`, nodes 2 and 3 the kernel's flannel.1: ping, TCP with
    // SHA-256 both ways, node 1's host still reachable on the XDP interface, NodePorts on node
    // 1 from an outside host with backends on the kernel nodes, podwire's masquerade of pod 1,
    // and no program or rule left after SIGTERM. (The restart checks need a second podwire
    // node: the test below.)
    let (report, text) = run_lab(&[
        "--nodes",
        "3",
        "--backend",
        "vxlan",
        "--peer",
        "kernel",
        "--io",
        "xdp",
        "--services",
        "--ip-masq",
        "--transfer-mb",
        "50",
    ]);
    assert_all_checks_pass(&report, &text);
    for name in [
        "with XDP on node 1's interface",
        "60 TCP connections from outside to node 1's NodePort",
        "a NodePort (30081) whose backend is on node 1 itself",
        "UDP from outside to NodePort",
        "--ip-masq: a pod sends 2 MB to a host outside the cluster as its node (by podwire",
    ]
    .iter()
    .chain(&ETP_LOCAL_CHECKS)
    {
        assert_eq!(check(&report, name)["ok"], true, "{name}");
    }
    assert_eq!(report["pairs"][0]["tcp_bytes"], 50_000_000u64);
}

#[test]
fn vxlan_two_podwire_nodes_over_af_xdp() {
    let Some(_slot) = lab_slot() else { return };
    // Every node `--io xdp --pods xdp`: pods on AF_XDP too, so neither direction of pod
    // traffic touches the kernel's stack on a node; every lab check, the SIGKILL restart and
    // the worker panic among them (the next start attaches again: nothing stale was left);
    // NodePorts with backends on podwire nodes, and podwire's masquerade.
    let (report, text) = run_lab(&[
        "--nodes",
        "3",
        "--backend",
        "vxlan",
        "--io",
        "xdp",
        "--pods",
        "xdp",
        "--services",
        "--ip-masq",
        "--transfer-mb",
        "50",
    ]);
    assert_all_checks_pass(&report, &text);
    for name in [
        "pods reach podwire through AF_XDP on their veths, not the TUN",
        "SIGTERM leaves no device, route, XDP program",
        "60 TCP connections from outside to node 1's NodePort",
        "--ip-masq: a pod sends 2 MB to a host outside the cluster as its node (by podwire",
        "SIGKILL under a TCP transfer",
    ]
    .iter()
    .chain(&ETP_LOCAL_CHECKS)
    {
        assert_eq!(check(&report, name)["ok"], true, "{name}");
    }
}

#[test]
fn udp_backend_over_af_xdp() {
    let Some(_slot) = lab_slot() else { return };
    let pcap = std::env::temp_dir().join(format!("podwire-udp-xdp-{}.pcap", std::process::id()));
    // flannel's udp backend with the underlay through AF_XDP on both nodes: every lab check
    // (the restarts among them), and the datagrams podwire writes itself decoded by tshark.
    let (report, text) = run_lab(&[
        "--backend",
        "udp",
        "--io",
        "xdp",
        "--transfer-mb",
        "20",
        "--capture",
        pcap.to_str().unwrap(),
    ]);
    assert_all_checks_pass(&report, &text);
    for name in [
        "the underlay passes through AF_XDP on every podwire node",
        "TCP 20 MB with intact SHA-256",
        "SIGTERM leaves no device, route, XDP program",
    ] {
        assert_eq!(check(&report, name)["ok"], true, "{name}");
    }
    // Node 1's datagrams: from port 8285, with a UDP checksum tshark verifies, around the
    // pods' own IPv4 packets (TCP and ICMP among them).
    let frames = decode_first(
        &pcap,
        Some(20_000),
        "udp.port == 8285 && ip.src == 192.168.99.11",
        &["udp.srcport", "udp.checksum.status", "ip.proto", "ip.src"],
    );
    let _ = std::fs::remove_file(&pcap);
    assert!(frames.len() > 100, "{} datagrams from node 1", frames.len());
    // Layered fields hold the outer value first.
    let outer = |f: &Frame, field: &str| f[field].split(',').next().unwrap_or("").to_string();
    for f in &frames {
        assert_eq!(outer(f, "udp.srcport"), "8285", "{f:?}");
        assert_eq!(
            outer(f, "udp.checksum.status"),
            "1",
            "a good checksum: {f:?}"
        );
        assert!(f["ip.src"].starts_with("192.168.99.11,10.244.1."), "{f:?}");
    }
    for proto in ["17,6", "17,1"] {
        assert!(
            frames.iter().any(|f| f["ip.proto"] == proto),
            "no inner protocol {proto}: {frames:?}"
        );
    }
}

#[test]
fn vxlan_direct_routing_skips_the_tunnel_between_on_link_nodes() {
    let Some(_slot) = lab_slot() else { return };
    // Node 1 podwire, node 2 kernel, both with DirectRouting on one L2 subnet.
    let (report, text) = run_lab(&[
        "--nodes",
        "2",
        "--backend",
        "vxlan",
        "--peer",
        "kernel",
        "--direct-routing",
        "--transfer-mb",
        "20",
    ]);
    assert_all_checks_pass(&report, &text);
    assert_eq!(
        check(&report, "DirectRouting: pod traffic bypasses the tunnel")["ok"],
        true,
        "{text}"
    );
    assert_eq!(
        check(&report, "DirectRouting: a crashed run's route")["ok"],
        true,
        "{text}"
    );
}

#[test]
fn vxlan_two_podwire_nodes() {
    let Some(_slot) = lab_slot() else { return };
    // With a 60 s soak: a fixed-rate stream with nothing lost, memory and descriptors flat.
    let (report, text) = run_lab(&[
        "--nodes",
        "2",
        "--backend",
        "vxlan",
        "--transfer-mb",
        "50",
        "--soak",
        "60",
    ]);
    for name in ["soak: a fixed-rate UDP stream", "soak: daemon memory flat"] {
        assert_eq!(check(&report, name)["ok"], true, "{name}: {text}");
    }
    assert_all_checks_pass(&report, &text);
    assert!(
        report["node_stats"][0]["stats"]["drops"]["unknown_peer"]
            .as_u64()
            .unwrap()
            >= 5
    );
}

/// One decoded frame: tshark's fields by name; layered fields hold "outer,inner".
type Frame = std::collections::HashMap<String, String>;

fn decode(pcap: &std::path::Path, filter: &str, fields: &[&str]) -> Vec<Frame> {
    decode_first(pcap, None, filter, fields)
}

/// [`decode`] of the capture's first `frames` frames only (a lab's capture holds its bulk
/// transfers too).
fn decode_first(
    pcap: &std::path::Path,
    frames: Option<usize>,
    filter: &str,
    fields: &[&str],
) -> Vec<Frame> {
    let mut cmd = Command::new("tshark");
    cmd.arg("-r").arg(pcap);
    if let Some(n) = frames {
        cmd.args(["-c", &n.to_string()]);
    }
    cmd.args([
        "-d",
        "udp.port==8472,vxlan",
        "-d",
        "udp.port==8285,ip",
        "-o",
        "udp.check_checksum:TRUE",
        "-Y",
        filter,
    ]);
    cmd.args(["-T", "fields", "-E", "separator=|"]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let out = cmd.output().expect("running tshark");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            fields
                .iter()
                .map(|f| f.to_string())
                .zip(l.split('|').map(str::to_string))
                .collect()
        })
        .collect()
}

#[test]
fn vxlan_frames_on_the_wire_match_the_kernels_flow_ports() {
    // `--vxlan-tx flow-ports`: podwire writes the outer IP/UDP headers itself and sends them
    // through a raw socket.
    wire_frames_match_the_kernels("flow-ports");
}

#[test]
fn vxlan_frames_on_the_wire_match_the_kernels_socket() {
    // `--vxlan-tx socket`, the default: podwire writes VXLAN and the inner Ethernet, and its UDP
    // sockets (with GSO) have the kernel write the outer IP/UDP headers. The source port is
    // one of the worker's sockets' ephemeral ports, chosen by flow hash.
    wire_frames_match_the_kernels("socket");
}

/// Node 1 podwire (with `run --vxlan-tx <vxlan_tx>`), nodes 2 and 3 kernel: pod 1 and pod 3
/// both ping pod 2, so node 2 receives the same inner packets encapsulated once by podwire and
/// once by the kernel; tshark decodes both field by field.
fn wire_frames_match_the_kernels(vxlan_tx: &str) {
    if Command::new("tshark")
        .arg("--version")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        eprintln!("skipped: needs tshark");
        return;
    }
    let Some(_slot) = lab_slot() else { return };
    let pcap = std::env::temp_dir().join(format!(
        "podwire-wire-{vxlan_tx}-{}.pcap",
        std::process::id()
    ));
    let (report, text) = run_lab(&[
        "--vxlan-tx",
        vxlan_tx,
        "--nodes",
        "3",
        "--backend",
        "vxlan",
        "--peer",
        "kernel",
        "--transfer-mb",
        "2",
        "--udp-count",
        "10",
        "--capture",
        pcap.to_str().unwrap(),
    ]);
    assert_all_checks_pass(&report, &text);
    let fields = [
        "ip.src",
        "ip.ttl",
        "ip.flags.df",
        "ip.dsfield",
        "ip.len",
        "ip.proto",
        "udp.srcport",
        "udp.dstport",
        "udp.checksum",
        "udp.checksum.status",
        "vxlan.flags",
        "vxlan.vni",
        "eth.dst",
        "eth.src",
        "eth.type",
        "icmp.type",
        "icmp.checksum.status",
    ];
    let echoes = decode(&pcap, "icmp.type == 8 && ip.dst == 10.244.2.2", &fields);
    let from = |node: &str| -> Vec<&Frame> {
        echoes
            .iter()
            .filter(|f| f["ip.src"].starts_with(node))
            .collect()
    };
    let (ours, kernels) = (from("192.168.99.11,"), from("192.168.99.13,"));
    assert!(
        !ours.is_empty() && !kernels.is_empty(),
        "no echo requests captured: {echoes:?}"
    );
    for len in ["114,64", "1500,1450"] {
        let ours = ours
            .iter()
            .find(|f| f["ip.len"] == len)
            .unwrap_or_else(|| panic!("{vxlan_tx}: podwire sent no {len} frame"));
        let kernel = kernels
            .iter()
            .find(|f| f["ip.len"] == len)
            .unwrap_or_else(|| panic!("kernel sent no {len} frame"));
        for field in [
            "ip.ttl",
            "ip.dsfield",
            "ip.len",
            "ip.proto",
            "udp.dstport",
            "vxlan.flags",
            "vxlan.vni",
            "eth.dst",
            "eth.type",
            "icmp.type",
            "icmp.checksum.status",
        ] {
            assert_eq!(
                ours[field], kernel[field],
                "{vxlan_tx}: {field} for {len}-byte frames: podwire {ours:?} kernel {kernel:?}"
            );
        }
        // DF: the inner packet's as it came. The outer one is clear, as the kernel's VXLAN
        // device sends it, with `flow-ports`; the default `socket` path leaves the outer header
        // to its UDP sockets, whose path MTU discovery sets DF: the one outer field in which it
        // differs from the kernel (README, "VXLAN").
        let (ours_df, kernel_df) = (&ours["ip.flags.df"], &kernel["ip.flags.df"]);
        assert_eq!(
            ours_df.split_once(',').map(|d| d.1),
            kernel_df.split_once(',').map(|d| d.1),
            "{vxlan_tx}: inner DF for {len}-byte frames: podwire {ours:?} kernel {kernel:?}"
        );
        assert!(kernel_df.starts_with("0,"), "{kernel:?}");
        let outer_df = if vxlan_tx == "socket" { "1," } else { "0," };
        assert!(
            ours_df.starts_with(outer_df),
            "{vxlan_tx}: outer DF for {len}-byte frames: podwire {ours:?} kernel {kernel:?}"
        );
        // The inner source MAC is each sender's VtepMAC (the outer one is its NIC's).
        assert!(
            ours["eth.src"].ends_with(",0e:70:c0:a8:63:0b"),
            "{vxlan_tx}: {ours:?}"
        );
        assert!(
            kernel["eth.src"].ends_with(",0e:70:c0:a8:63:0d"),
            "{kernel:?}"
        );
        // The outer UDP checksum is filled. With `flow-ports` podwire computes it and tshark
        // verifies it. The kernel's (its VXLAN device's, and its UDP socket's on the `socket`
        // path) reads as bad here: over veth it leaves it for a NIC to finish, which a physical
        // wire would not show.
        assert_ne!(ours["udp.checksum"], "0x0000");
        if vxlan_tx == "socket" {
            assert_eq!(
                ours["udp.checksum.status"], kernel["udp.checksum.status"],
                "{vxlan_tx}: {ours:?} kernel {kernel:?}"
            );
        } else {
            assert_eq!(ours["udp.checksum.status"], "1", "{vxlan_tx}: {ours:?}");
        }
        let port: u16 = ours["udp.srcport"].parse().unwrap();
        assert!(
            (32768..=60999).contains(&port),
            "{vxlan_tx}: source port {port} outside the kernel's range"
        );
    }
    // One flow, one source port (so ECMP and RSS keep it on one path).
    let ports: std::collections::HashSet<&str> =
        ours.iter().map(|f| f["udp.srcport"].as_str()).collect();
    assert_eq!(ports.len(), 1, "{vxlan_tx}: {ports:?}");
    let _ = std::fs::remove_file(&pcap);
}

#[test]
fn e2e_bench_writes_results_and_cleans_up() {
    let Some(_slot) = lab_slot() else { return };
    let dir = std::env::temp_dir().join(format!("podwire-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, svg) = (dir.join("r.json"), dir.join("r.svg"));
    run_podwire_lab(&[
        "bench",
        "--rounds",
        "1",
        "--tcp-mb",
        // Enough for /proc/stat's 10 ms ticks to resolve the CPU cost (20 MB once read 0;
        // 200 MB once read 90 ms on kernel-vxlan, under the 100 ms the bench requires).
        "600",
        "--udp-seconds",
        "0.3",
        "--modes",
        "kernel-vxlan,podwire-udp",
        "--out",
        json.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let results = v["results"].as_array().unwrap();
    // 7 workloads in each of 2 modes, and the generator's ceiling's 4 packet-rate figures.
    assert_eq!(results.len(), 2 * 7 + 4, "{v:#}");
    for r in results {
        for key in [
            "mode", "workload", "median", "min", "max", "unit", "samples",
        ] {
            assert!(!r[key].is_null(), "{key} missing in {r}");
        }
        assert_eq!(r["samples"].as_array().unwrap().len(), 1, "{r}");
        let median = r["median"].as_f64().unwrap();
        // A loss may be 0; every rate, time and cost was measured.
        if r["workload"] == "udp_64b_loss" {
            assert!((0.0..=100.0).contains(&median), "{r}");
            assert!(r["ratio_to_kernel_vxlan"].is_null(), "{r}");
        } else {
            assert!(median > 0.0, "{r}");
        }
        if r["mode"] == "kernel-vxlan" && r["workload"] == "tcp_1_stream" {
            assert_eq!(r["ratio_to_kernel_vxlan"], 1.0, "{r}");
        }
    }
    // Every packet-rate trial is kept, with what was offered and what arrived.
    for mode in ["kernel-vxlan", "podwire-udp", "generator-ceiling"] {
        let unpaced = &v["packet_rate"][mode][0]["max_offered"];
        assert!(unpaced["sent"].as_u64().unwrap() > 0, "{mode}: {unpaced}");
        assert!(
            unpaced["received"].as_u64().unwrap() > 0,
            "{mode}: {unpaced}"
        );
    }
    // Where it came from: the commit, the date, the command line, the machine.
    assert_eq!(v["commit"].as_str().unwrap().len(), 40, "{v:#}");
    assert!(v["date"].as_str().unwrap().starts_with("20"));
    assert!(v["command"].as_str().unwrap().contains("--rounds 1"));
    assert!(v["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(v["machine"]["kernel"]
        .as_str()
        .is_some_and(|k| !k.is_empty()));
    assert_eq!(v["pod_mtu"], 1450);
    // The bench leaves no namespace behind, the generator's ceiling's pair included.
    let pid_prefix = "pw";
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(pid_prefix) && (n.ends_with("-ga") || n.ends_with("-gb")))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn vxlan_through_a_raw_socket_with_flow_ports_interoperates_with_kernel_nodes() {
    let Some(_slot) = lab_slot() else { return };
    // `--vxlan-tx flow-ports` (the default is `socket`): podwire writes the outer headers and
    // sends through a raw socket; kernel nodes must take it like any VTEP's.
    let (report, text) = run_lab(&[
        "--backend",
        "vxlan",
        "--peer",
        "kernel",
        "--vxlan-tx",
        "flow-ports",
        "--nodes",
        "3",
        "--transfer-mb",
        "20",
    ]);
    assert_eq!(report["ok"], true, "{text}");
    for p in report["pairs"].as_array().unwrap() {
        assert_eq!(p["tcp_sha256_ok"], true, "{p}");
    }
}

/// The service checks every services lab must show, by name prefix.
const SERVICE_CHECKS: [&str; 7] = [
    "300 TCP connections to a ClusterIP",
    "connections spread over the 3 backends on 2 nodes",
    "UDP request/response through a ClusterIP",
    "a pod calling a Service it backs",
    "a service without endpoints refuses",
    "a backend removed mid-run loses only its own",
    "clients' segments to removed endpoints answered with resets",
];

/// The Kubernetes e2e behaviours (`service_behaviours`), which podwire and both of
/// kube-proxy's modes must show alike.
const BEHAVIOUR_CHECKS: [&str; 8] = [
    "a ClusterIP without endpoints rejects UDP",
    "terminating endpoints serve only when no ready one is left",
    "internalTrafficPolicy Local: this node's endpoint only",
    "sessionAffinity ClientIP: 15 connections in a row",
    "a Service with a TCP and a UDP port serves both",
    "a UDP client that keeps sending reaches its server's replacement pod",
    "an out-of-window segment from the backend never reaches the client untranslated",
    "an external IP and a load balancer IP serve the port, from a pod and from outside",
];

#[test]
fn services_through_podwire_behave_as_kube_proxy_iptables_and_nftables() {
    let Some(_slot) = lab_slot() else { return };
    // Node 1's pod calls ClusterIPs backed by pods on nodes 2 and 3 and by itself: once through
    // podwire (udp backend), once through kube-proxy's iptables rules and once through its
    // nftables table on the kernel (no podwire), built by the lab from the same services.
    // podwire's nodes also masquerade (--ip-masq): pods keep their addresses to each other
    // (the backends see the client) and reach outside hosts as their node.
    let (pw, pw_text) = run_lab(&[
        "--nodes",
        "3",
        "--services",
        "--ip-masq",
        "--transfer-mb",
        "5",
    ]);
    let (kp, kp_text) = run_lab(&[
        "--nodes",
        "3",
        "--backend",
        "kernel-vxlan",
        "--services",
        "--transfer-mb",
        "5",
    ]);
    let (nft, nft_text) = run_lab(&[
        "--nodes",
        "3",
        "--backend",
        "kernel-vxlan",
        "--services",
        "--kube-proxy",
        "nftables",
        "--transfer-mb",
        "1",
    ]);
    assert_all_checks_pass(&pw, &pw_text);
    assert_all_checks_pass(&kp, &kp_text);
    assert_all_checks_pass(&nft, &nft_text);
    // NodePorts from outside on the nftables baseline, externalTrafficPolicy Local among them
    // (its health check server is kube-proxy's process, not its rules: podwire's labs only).
    for name in [
        "60 TCP connections from outside to node 1's NodePort",
        "a NodePort (30081) whose backend is on node 1 itself",
        "UDP from outside to NodePort",
    ]
    .iter()
    .chain(&ETP_LOCAL_CHECKS[..2])
    {
        assert_eq!(check(&nft, name)["ok"], true, "{name}: {nft_text}");
    }
    for (report, text) in [(&pw, &pw_text), (&kp, &kp_text), (&nft, &nft_text)] {
        for name in BEHAVIOUR_CHECKS.iter().chain(&SERVICE_CHECKS[..5]) {
            assert_eq!(check(report, name)["ok"], true, "{name}: {text}");
        }
    }
    // The out-of-window segment: dropped by iptables mode's INVALID rule; translated by
    // podwire and by nftables mode (both liberal), so it arrives from the ClusterIP.
    let invalid = BEHAVIOUR_CHECKS[6];
    assert!(check(&kp, invalid)["detail"]
        .as_str()
        .unwrap()
        .contains("never reached the client"));
    for report in [&pw, &nft] {
        let detail = check(report, invalid)["detail"].as_str().unwrap();
        assert!(
            detail.contains("reached the client from 10.96.0.26:80"),
            "{detail}"
        );
    }
    for name in SERVICE_CHECKS
        .iter()
        .chain(&["--ip-masq: a pod sends 2 MB to a host outside"])
    {
        assert_eq!(check(&pw, name)["ok"], true, "{name}: {pw_text}");
    }
    // The same observable behaviour: peers (the client connects to the ClusterIP, backends see
    // the client), replies translated (UDP answers from the ClusterIP, the same count),
    // spreading over all three backends, hairpin answered, no endpoints refused.
    for name in &SERVICE_CHECKS[..5] {
        assert_eq!(check(&kp, name)["ok"], true, "{name}: {kp_text}");
    }
    let udp = "UDP request/response through a ClusterIP";
    assert_eq!(check(&pw, udp)["detail"], check(&kp, udp)["detail"]);
    for report in [&pw, &kp] {
        let spread = report["figures"]["service_spread"].as_object().unwrap();
        assert_eq!(spread.len(), 3, "{spread:?}");
        let total: u64 = spread.values().map(|v| v.as_u64().unwrap()).sum();
        assert_eq!(total, 300);
        let hairpin = check(report, "a pod calling a Service it backs")["detail"]
            .as_str()
            .unwrap();
        assert!(
            hairpin.starts_with("served by 10.244.1.2, which saw "),
            "{hairpin}"
        );
        assert!(!hairpin.contains("saw 10.244.1.2:"), "{hairpin}");
    }
    // Where they differ by design: an endpoint's removal. kube-proxy keeps established TCP
    // connections to it; podwire resets them (counted) so that clients fail over.
    let kept = check(&kp, "a backend removed mid-run: kube-proxy keeps");
    assert_eq!(kept["ok"], true, "{kp_text}");
}

#[test]
fn services_with_backends_behind_kernel_vxlan_nodes() {
    let Some(_slot) = lab_slot() else { return };
    // Node 1 podwire (the client's node translates), nodes 2-3 the kernel's flannel.1: replies
    // come back through kernel VXLAN and are reverse-translated by podwire.
    let (report, text) = run_lab(&[
        "--nodes",
        "3",
        "--backend",
        "vxlan",
        "--peer",
        "kernel",
        "--services",
        "--transfer-mb",
        "5",
    ]);
    assert_all_checks_pass(&report, &text);
    for name in SERVICE_CHECKS.iter().chain(&BEHAVIOUR_CHECKS) {
        assert_eq!(check(&report, name)["ok"], true, "{name}: {text}");
    }
}

/// The checks every L2 lab must show, by name prefix.
const L2_CHECKS: &[&str] = &[
    "every pod attached to its node's bridge",
    "ping between every pair of pods",
    "ARP resolves every pod's own MAC",
    "TCP 10 MB with intact SHA-256, same node and across nodes",
    "podwire ctl fdb: local pods on their ports, remote pods behind their VTEP",
    "a pod moved to another node is reachable after its first packet",
    "the moved pod takes TCP on its new node",
    "forged VXLAN from outside the cluster counted as unknown_peer",
    "the bridges learned and flooded",
    "stopped daemons leave no bridge port or pod interface behind",
];

/// Runs the L2 lab with pods on AF_XDP (`--pods xdp`) and `args`; every L2 check and
/// `checks` must pass.
fn l2_lab_with_af_xdp_pods(args: &[&str], checks: &[&str]) {
    let mut all = vec!["--mode", "l2", "--backend", "vxlan", "--pods", "xdp"];
    all.extend_from_slice(&["--transfer-mb", "10"]);
    all.extend_from_slice(args);
    let (report, text) = run_lab(&all);
    assert_all_checks_pass(&report, &text);
    let pods = [
        "every pod's bridge port is its veth's host end through AF_XDP",
        "the pods' frames reached the bridges through AF_XDP",
    ];
    for name in L2_CHECKS.iter().chain(&pods).chain(checks) {
        assert_eq!(check(&report, name)["ok"], true, "{name}: {text}");
    }
}

#[test]
fn l2_mode_over_af_xdp_with_pods_on_veth_pairs() {
    let Some(_slot) = lab_slot() else { return };
    // The underlay and every pod's bridge port through AF_XDP: ARP, pings, TCP within and
    // across nodes, a pod moved to another node (detached, its veth pair gone, attached
    // again there), forged VXLAN, and nothing left behind (no veth pair, no XDP program).
    l2_lab_with_af_xdp_pods(
        &["--nodes", "3", "--io", "xdp"],
        &["the underlay passes through AF_XDP on every podwire node"],
    );
}

#[test]
fn l2_mode_with_pods_on_af_xdp_over_the_udp_socket() {
    let Some(_slot) = lab_slot() else { return };
    // AF_XDP pods make the bridge run without offload, so the tunnel carries one frame per
    // datagram through the kernel's UDP socket (with GRO): every datagram must be read, also
    // when a receive splits into fewer than a batch while more wait in the socket.
    l2_lab_with_af_xdp_pods(&["--nodes", "2"], &[]);
}

#[test]
fn l2_mode_bridges_pods_within_and_across_nodes() {
    let Some(_slot) = lab_slot() else { return };
    let pcap = std::env::temp_dir().join(format!("podwire-l2-{}.pcap", std::process::id()));
    // Three pods on node 1, two on node 2, one on node 3, all on podwire's bridges.
    let (report, text) = run_lab(&[
        "--mode",
        "l2",
        "--backend",
        "vxlan",
        "--nodes",
        "3",
        "--transfer-mb",
        "10",
        "--capture",
        pcap.to_str().unwrap(),
    ]);
    assert_all_checks_pass(&report, &text);
    for name in L2_CHECKS {
        assert_eq!(check(&report, name)["ok"], true, "{name}: {text}");
    }
    let f = &report["figures"];
    assert!(
        f["same_node_tcp_ratio_to_linux_bridge"].as_f64().unwrap() > 0.0,
        "{f}"
    );
    // tshark decodes what crossed the underlay: VXLAN with VNI 1 around the pods' own
    // Ethernet frames, ARP requests replicated to every VTEP and answered by unicast.
    let frames = decode(
        &pcap,
        "vxlan && arp",
        &[
            "ip.src",
            "ip.dst",
            "vxlan.vni",
            "eth.src",
            "eth.dst",
            "arp.opcode",
        ],
    );
    let pod_1a = "02:00:0a:f4:01:0a";
    let requests: Vec<&Frame> = frames
        .iter()
        .filter(|f| f["arp.opcode"] == "1" && f["eth.src"].ends_with(pod_1a))
        .collect();
    let replicated_to: std::collections::HashSet<&str> =
        requests.iter().map(|f| f["ip.dst"].as_str()).collect();
    assert!(
        replicated_to.contains("192.168.99.12") && replicated_to.contains("192.168.99.13"),
        "pod 1a's ARP requests reached {replicated_to:?}: {frames:?}"
    );
    assert!(requests
        .iter()
        .all(|f| f["vxlan.vni"] == "1" && f["eth.dst"].ends_with("ff:ff:ff:ff:ff:ff")));
    assert!(
        frames
            .iter()
            .any(|f| f["arp.opcode"] == "2" && f["eth.dst"].ends_with(pod_1a)),
        "no ARP reply to pod 1a crossed the tunnel: {frames:?}"
    );
    let _ = std::fs::remove_file(&pcap);
}
