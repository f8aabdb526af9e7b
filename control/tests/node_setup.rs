//! Node setup leaves nothing behind. `podwire run` is made to fail right after each of its
//! setup steps in turn (`--fault-injection` with `PODWIRE_FAIL_SETUP_AFTER=N`), in a network
//! namespace of its own, and after each failure the namespace must hold exactly the links,
//! addresses, routes, policy rules and nftables tables it held before. Past the last step the
//! daemon runs (the test checks that the state it made is there), and stopped with SIGTERM it
//! leaves nothing either. Each namespace's iptables FORWARD policy is DROP, as Docker sets it,
//! so the FORWARD accept rules podwire adds there are part of that state. Needs root; skipped
//! otherwise.

#![allow(clippy::tests_outside_test_module)] // integration tests live outside test modules by design

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn root_slot() -> Option<std::sync::MutexGuard<'static, ()>> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return None;
    }
    // The namespaces' FORWARD policy is set with iptables-nft, whose chain podwire adds to.
    let iptables = Command::new("iptables").arg("-V").output();
    if !iptables.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("nf_tables")) {
        eprintln!("skipped: needs iptables-nft (Debian's iptables package)");
        return None;
    }
    Some(ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner()))
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace with an underlay `eth0` (192.168.77.1/24, a veth whose peer `eth1`
/// stays beside it) and an iptables FORWARD policy of DROP, deleted on drop with everything
/// in it.
struct Netns {
    name: String,
    dir: PathBuf,
}

impl Netns {
    fn new(case: &str) -> Netns {
        let name = format!("pwsetup-{}-{case}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name, dir };
        ns.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
        ]);
        ns.ip(&["addr", "add", "192.168.77.1/24", "dev", "eth0"]);
        for dev in ["lo", "eth0", "eth1"] {
            ns.ip(&["link", "set", "dev", dev, "up"]);
        }
        ns.iptables(&["-P", "FORWARD", "DROP"]);
        ns
    }

    fn iptables(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name, "iptables"];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// What the namespace holds: links (and whether an XDP program is on them), IPv4
    /// addresses, routes of every table, policy rules and nftables tables, one line each.
    fn state(&self) -> Vec<String> {
        let links: serde_json::Value =
            serde_json::from_str(&self.ip(&["-j", "-d", "link", "show"])).unwrap();
        let mut lines: Vec<String> = links
            .as_array()
            .unwrap()
            .iter()
            .map(|l| format!("link {} xdp={}", l["ifname"], !l["xdp"].is_null()))
            .collect();
        for (what, args) in [
            ("addr", &["-4", "-o", "addr", "show"][..]),
            ("route", &["-4", "route", "show", "table", "all"][..]),
            ("rule", &["-4", "rule", "show"][..]),
        ] {
            lines.extend(
                self.ip(args)
                    .lines()
                    .map(|l| format!("{what} {}", l.trim())),
            );
        }
        let tables = run(
            "ip",
            &["netns", "exec", &self.name, "nft", "list", "tables"],
        );
        lines.extend(tables.lines().map(|l| format!("nft {l}")));
        let forward = self.iptables(&["-S", "FORWARD"]);
        lines.extend(forward.lines().map(|l| format!("iptables {l}")));
        lines.sort();
        lines
    }

    /// `podwire run ARGS` in the namespace, failing after setup step `fail_after`.
    fn podwire(&self, args: &[&str], fail_after: usize) -> Child {
        self.podwire_with_env(args, fail_after, &[])
    }

    /// [`Netns::podwire`] with `env` set for the daemon.
    fn podwire_with_env(&self, args: &[&str], fail_after: usize, env: &[(&str, &str)]) -> Child {
        let _ = std::fs::remove_file(self.dir.join("subnet.env"));
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(env!("CARGO_BIN_EXE_podwire"))
            .arg("run")
            .args(args)
            .args(["--iface", "eth0", "--fault-injection", "--workers", "1"])
            .args(["--no-pin", "--exit-with-parent"])
            .arg("--subnet-file")
            .arg(self.dir.join("subnet.env"))
            .arg("--ctl-socket")
            .arg(self.dir.join("ctl.sock"))
            .env("PODWIRE_FAIL_SETUP_AFTER", fail_after.to_string())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Waits for `child` to exit (Some) or to be forwarding, with subnet.env written and still
/// running half a second later (None).
fn exited_or_running(child: &mut Child, subnet_env: &Path) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ready_since = None;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if subnet_env.exists() {
            let since = *ready_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_millis(500) {
                return None;
            }
        }
        assert!(
            Instant::now() < deadline,
            "podwire neither failed nor started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Fails setup after step 1, 2, ... until podwire starts; after each failure the namespace is
/// as it was. Then checks `running` against the started daemon's state, stops it and checks
/// again. Returns how many steps failed.
fn fail_each_step(ns: &Netns, args: &[&str], running: &[&str]) -> usize {
    let before = ns.state();
    for n in 1..=40 {
        let mut child = ns.podwire(args, n);
        let status = exited_or_running(&mut child, &ns.dir.join("subnet.env"));
        if status.is_none() {
            let during = ns.state().join("\n");
            for want in running {
                assert!(
                    during.contains(want),
                    "running podwire made no {want:?}:\n{during}"
                );
            }
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap();
        }
        let out = child.wait_with_output().unwrap();
        let log = text(&out);
        let after = ns.state();
        assert_eq!(
            before,
            after,
            "residue after {} {n}:\n{log}",
            if status.is_some() {
                "a failure after setup step"
            } else {
                "a stop past the last step"
            }
        );
        if status.is_none() {
            assert!(
                out.status.success(),
                "podwire stopped with {}:\n{log}",
                out.status
            );
            return n - 1;
        }
        assert!(
            log.contains(&format!("injected failure after setup step {n} ")),
            "step {n}: podwire failed otherwise:\n{log}"
        );
    }
    panic!("podwire did not start within 40 setup steps");
}

/// podwire's FORWARD accept rules for the cluster network, as `iptables -S` shows them.
const FORWARD_FROM: &str =
    "-A FORWARD -s 10.244.0.0/16 -m comment --comment \"podwire forward 10.244.0.0/16\" -j ACCEPT";
const FORWARD_TO: &str =
    "-A FORWARD -d 10.244.0.0/16 -m comment --comment \"podwire forward 10.244.0.0/16\" -j ACCEPT";

fn write_cluster(ns: &Netns, direct_routing: bool) -> String {
    let lease = |ip: &str, mac: &str| {
        serde_json::json!({"PublicIP": ip, "PublicIPv6": null, "BackendType": "vxlan",
                           "BackendData": {"VNI": 1, "VtepMAC": mac}})
    };
    let cluster = serde_json::json!({
        "config": {"Network": "10.244.0.0/16", "SubnetLen": 24,
                   "Backend": {"Type": "vxlan", "DirectRouting": direct_routing}},
        "subnets": {
            "10.244.1.0-24": lease("192.168.77.1", "0e:70:c0:a8:4d:01"),
            "10.244.2.0-24": lease("192.168.77.2", "0e:70:c0:a8:4d:02"),
        },
    });
    let path = ns.dir.join("cluster.json");
    std::fs::write(&path, cluster.to_string()).unwrap();
    format!("file:{}", path.display())
}

#[test]
fn node_setup_leaves_nothing_behind_routed() {
    let Some(_slot) = root_slot() else { return };
    let ns = Netns::new("routed");
    let store = write_cluster(&ns, true);
    let services = ns.dir.join("services.json");
    let svc = serde_json::json!({"services": [
        {"name": "default/web", "clusterIP": "10.96.0.10", "protocol": "TCP", "port": 80,
         "endpoints": [{"ip": "10.244.2.5", "port": 8080}]}]});
    std::fs::write(&services, svc.to_string()).unwrap();
    let services = format!("file:{}", services.display());
    let args = [
        "--store",
        &store,
        "--ip-masq",
        "--io",
        "xdp",
        "--services",
        &services,
    ];
    let steps = fail_each_step(
        &ns,
        &args,
        &[
            "link \"flannel.1\"",
            "inet 10.244.1.0/32",
            "xdp=true",
            "nft table ip podwire-masq",
            "lookup 28791",
            "route 10.244.2.0/24 via 192.168.77.2 dev eth0 proto 112",
            "route 10.96.0.0/12 dev flannel.1",
            FORWARD_FROM,
            FORWARD_TO,
        ],
    );
    // TUN, its configuration, steering, masquerade, FORWARD rules, service route, XDP, worker
    // ports, direct routes, capabilities, workers, ctl socket, subnet.env.
    assert_eq!(steps, 13);
}

#[test]
fn node_setup_leaves_nothing_behind_bridged() {
    let Some(_slot) = root_slot() else { return };
    let ns = Netns::new("l2");
    let store = write_cluster(&ns, false);
    let args = ["--store", &store, "--mode", "l2", "--io", "xdp"];
    let steps = fail_each_step(
        &ns,
        &args,
        &[
            "link \"podwire0\"",
            "xdp=true",
            "inet 10.244.1.1/16",
            FORWARD_FROM,
            FORWARD_TO,
        ],
    );
    // Host port, FORWARD rules, XDP, capabilities, bridge worker, ctl socket, subnet.env.
    assert_eq!(steps, 7);
}

/// A second `podwire run` for the same device and port in one namespace stops at once, naming
/// the first one's pid, and leaves the first one running with its ctl socket and subnet.env.
#[test]
fn a_second_daemon_is_refused_and_leaves_the_first_alone() {
    let Some(_slot) = root_slot() else { return };
    let ns = Netns::new("lock");
    let store = write_cluster(&ns, false);
    let args = ["--store", store.as_str()];
    // Never failing: no step has number 0.
    let mut first = ns.podwire(&args, 0);
    let subnet_env = ns.dir.join("subnet.env");
    if exited_or_running(&mut first, &subnet_env).is_some() {
        let out = first.wait_with_output().unwrap();
        panic!("the first daemon did not start:\n{}", text(&out));
    }
    let mut second = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(env!("CARGO_BIN_EXE_podwire"))
        .arg("run")
        .args(args)
        .args(["--iface", "eth0", "--workers", "1", "--no-pin"])
        .arg("--subnet-file")
        .arg(ns.dir.join("second-subnet.env"))
        .arg("--ctl-socket")
        .arg(ns.dir.join("ctl.sock"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while second.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let still_running = second.try_wait().unwrap().is_none();
    if still_running {
        let _ = second.kill();
    }
    let second = second.wait_with_output().unwrap();
    let log = text(&second);
    assert!(
        !still_running,
        "the second daemon still runs after 10 s:\n{log}"
    );
    assert_eq!(second.status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "podwire is already running for device flannel.1 in this network namespace (pid {})",
            first.id()
        )),
        "{log}"
    );
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first daemon stopped"
    );
    assert!(
        ns.dir.join("ctl.sock").exists(),
        "the first daemon's ctl socket is gone"
    );
    assert!(subnet_env.exists());
    assert!(!ns.dir.join("second-subnet.env").exists());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = first.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

/// Waits up to `limit` for `cond`.
fn wait_for(mut cond: impl FnMut() -> bool, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cond()
}

/// The FORWARD accept rules are kept while the daemon runs: flushed by someone else, they are
/// back within the 5 s check; a FORWARD chain made after the daemon started gets them too;
/// `-iptables-forward-rules=false` (flanneld's spelling) adds none.
#[test]
fn forward_rules_are_kept_while_running_and_only_when_asked() {
    let Some(_slot) = root_slot() else { return };
    let ns = Netns::new("fwd");
    let store = write_cluster(&ns, false);
    let subnet_env = ns.dir.join("subnet.env");
    let ours = |ns: &Netns| {
        let rules = ns.iptables(&["-S", "FORWARD"]);
        rules.contains(FORWARD_FROM) && rules.contains(FORWARD_TO)
    };
    let stop = |child: Child| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        text(&out)
    };

    let mut daemon = ns.podwire(&["--store", &store], 0);
    assert!(exited_or_running(&mut daemon, &subnet_env).is_none());
    assert!(ours(&ns), "{}", ns.iptables(&["-S", "FORWARD"]));
    ns.iptables(&["-F", "FORWARD"]);
    assert!(!ours(&ns));
    let back = wait_for(|| ours(&ns), Duration::from_secs(8));
    let log = stop(daemon);
    assert!(back, "flushed rules not added again within 8 s:\n{log}");
    assert!(
        log.contains("were missing from iptables' FORWARD chain; added again"),
        "{log}"
    );
    assert_eq!(ns.iptables(&["-S", "FORWARD"]).trim(), "-P FORWARD DROP");

    // No filter table at start: the chain made later gets the rules.
    run(
        "ip",
        &[
            "netns", "exec", &ns.name, "nft", "delete", "table", "ip", "filter",
        ],
    );
    let mut daemon = ns.podwire(&["--store", &store], 0);
    assert!(exited_or_running(&mut daemon, &subnet_env).is_none());
    ns.iptables(&["-P", "FORWARD", "DROP"]);
    let added = wait_for(|| ours(&ns), Duration::from_secs(8));
    let log = stop(daemon);
    assert!(
        added,
        "a FORWARD chain made after start got no rules:\n{log}"
    );

    let mut daemon = ns.podwire(&["--store", &store, "-iptables-forward-rules=false"], 0);
    assert!(exited_or_running(&mut daemon, &subnet_env).is_none());
    let rules = ns.iptables(&["-S", "FORWARD"]);
    stop(daemon);
    assert_eq!(rules.trim(), "-P FORWARD DROP");

    // flanneld's variables set but empty are no setting: the default (on) holds.
    let empty = [
        ("FLANNELD_IPTABLES_FORWARD_RULES", ""),
        ("FLANNELD_IP_MASQ", ""),
    ];
    let mut daemon = ns.podwire_with_env(&["--store", &store], 0, &empty);
    if let Some(status) = exited_or_running(&mut daemon, &subnet_env) {
        let out = daemon.wait_with_output().unwrap();
        panic!(
            "empty FLANNELD_* variables stopped podwire ({status}):\n{}",
            text(&out)
        );
    }
    let present = ours(&ns);
    stop(daemon);
    assert!(
        present,
        "an empty FLANNELD_IPTABLES_FORWARD_RULES turned the rules off"
    );
}
