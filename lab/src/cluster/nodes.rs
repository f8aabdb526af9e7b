//! The podwire daemons of the lab's nodes: starting them, waiting for them, noticing one died.

use super::*;

/// Starts `podwire run` on node `i` (file store or the lab's etcd).
pub(super) fn spawn_node(
    res: &mut Resources,
    opts: &LabOptions,
    exe: &Path,
    i: usize,
) -> Result<()> {
    let dir = res.names.dir.clone();
    let node_dir = dir.join(format!("n{i}"));
    std::fs::create_dir_all(&node_dir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(node_dir.join("podwire.log"))?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &res.ns(&format!("n{i}"))])
        .arg(exe)
        .arg("run");
    if opts.etcd || opts.kube {
        cmd.args(["--healthz-ip", &underlay_ip(i).to_string()])
            .args(["--healthz-port", &etcd_lab::HEALTHZ_PORT.to_string()]);
    }
    if opts.etcd {
        cmd.args(["--etcd-endpoints", &etcd_lab::endpoint()]);
    } else if opts.kube {
        cmd.arg("--kube-subnet-mgr")
            .args(["--node-name", &format!("n{i}")])
            .arg("--kubeconfig-file")
            .arg(kube_lab::kubeconfig(&res.names))
            .arg("--net-config-path")
            .arg(kube_lab::net_conf(&res.names));
    } else {
        cmd.args([
            "--store",
            &format!("file:{}", dir.join("cluster.json").display()),
        ]);
    }
    if opts.ip_masq {
        cmd.arg("--ip-masq");
    }
    cmd.args([
        "--ctl-socket",
        &node_dir.join("ctl.sock").display().to_string(),
    ]);
    // The lab is a test cluster: its checks make a worker panic.
    cmd.arg("--fault-injection");
    if i == 1 {
        // Node 1 logs JSON (checked by the lifecycle checks); the others plain text.
        cmd.args(["--log-format", "json"]);
    }
    if !opts.conntrack {
        cmd.args(["--conntrack", "off"]);
    }
    if opts.l2 {
        cmd.args(["--mode", "l2"]);
    }
    if !opts.udp_gro {
        cmd.args(["--udp-gro", "off"]);
    }
    if !opts.peer_queues {
        cmd.args(["--peer-queues", "off"]);
    }
    if opts.io_xdp {
        cmd.args(["--io", "xdp"]);
    }
    if opts.pod_xdp && opts.l2 {
        cmd.args(["--l2-pods", "xdp"]);
    } else if opts.pod_xdp {
        // The pod's port is held to the pod's address (its others go through the kernel).
        cmd.args(["--pod-ports", &format!("vpod={}", pod_ip(i))]);
    }
    if opts.services && !opts.etcd && !opts.kube {
        cmd.args([
            "--services",
            &format!("file:{}", services_lab::file(&dir).display()),
        ]);
    }
    cmd.args(["--iface", "eth0", "--vxlan-tx", &opts.vxlan_tx.to_string()])
        .args([
            "--subnet-file",
            &node_dir.join("subnet.env").display().to_string(),
        ])
        .args([
            "--stats-file",
            &node_dir.join("stats.json").display().to_string(),
        ])
        .args([
            "--workers",
            &opts.workers.to_string(),
            "--no-pin",
            "--exit-with-parent",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let child = cmd.spawn().context("starting podwire")?;
    res.children.push((format!("n{i}"), child));
    Ok(())
}

/// Waits until node `i` is ready (subnet.env written; with etcd or kube, /readyz answering 200), then
/// gives its pod interface FLANNEL_MTU, as the flannel CNI plugin does.
pub(super) fn wait_node_ready(res: &mut Resources, opts: &LabOptions, i: usize) -> Result<()> {
    let dir = res.names.dir.clone();
    let env = dir.join(format!("n{i}/subnet.env"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let names = res.names.clone();
    loop {
        let ready = if opts.etcd || opts.kube {
            etcd_lab::ready(&names, i)
        } else {
            env.exists()
        };
        if ready {
            break;
        }
        let name = format!("n{i}");
        if let Some((_, child)) = res.children.iter_mut().find(|(n, _)| *n == name) {
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "podwire on node {i} exited ({status}):\n{}",
                    log_tail(&dir, i)
                );
            }
        }
        if Instant::now() > deadline {
            bail!(
                "podwire on node {i} was not ready in 20 s:\n{}",
                log_tail(&dir, i)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if opts.l2 {
        return Ok(());
    }
    let mtu = subnet_env::read_value(&env, "FLANNEL_MTU")
        .context("FLANNEL_MTU missing from subnet.env")?;
    netns::ip_in(
        &res.ns(&format!("p{i}")),
        &["link", "set", "eth0", "mtu", &mtu],
    )?;
    netns::ip_in(
        &res.ns(&format!("n{i}")),
        &["link", "set", "vpod", "mtu", &mtu],
    )?;
    Ok(())
}

/// Starts podwire on every podwire node. With etcd the last one joins only once the others are
/// ready, so the traffic checks show a late joiner reachable without restarting anyone.
pub(super) fn start_nodes(res: &mut Resources, opts: &LabOptions, exe: &Path) -> Result<()> {
    let nodes = opts.podwire_nodes();
    if opts.etcd {
        for &i in &nodes {
            etcd_lab::seed_subnet_env(&res.names, opts, i)?;
        }
        let (late, first) = nodes.split_last().expect("at least one podwire node");
        let first = if first.is_empty() { &nodes[..] } else { first };
        for &i in first {
            spawn_node(res, opts, exe, i)?;
        }
        for &i in first {
            wait_node_ready(res, opts, i)?;
        }
        if !first.contains(late) {
            spawn_node(res, opts, exe, *late)?;
            wait_node_ready(res, opts, *late)?;
        }
        return Ok(());
    }
    let cluster = res.names.dir.join("cluster.json");
    std::fs::write(&cluster, serde_json::to_vec_pretty(&cluster_file(opts))?)?;
    for &i in &nodes {
        spawn_node(res, opts, exe, i)?;
    }
    for &i in &nodes {
        wait_node_ready(res, opts, i)?;
    }
    Ok(())
}

/// The node a child called `nI` runs podwire on (other children: tshark).
pub(super) fn daemon_node(name: &str) -> Option<usize> {
    name.strip_prefix('n')?.parse().ok()
}

/// What is wrong with daemon `name` having ended with `status` (`when`: e.g. "on the lab's
/// SIGTERM"), if anything: a status other than 0 (or any, unless `zero_ok`: the lab did not
/// ask it to stop), or a signal. None for other children.
pub(super) fn daemon_failure(
    dir: &Path,
    name: &str,
    status: std::process::ExitStatus,
    when: &str,
    zero_ok: bool,
) -> Option<String> {
    use std::os::unix::process::ExitStatusExt;
    let node = daemon_node(name)?;
    let how = match (status.code(), status.signal()) {
        (Some(0), _) if zero_ok => return None,
        (Some(0), _) => "exited with status 0, unasked,".to_string(),
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!(
            "was killed by signal {sig} ({}), which the lab did not send,",
            Signal::try_from(sig).map_or("unknown", |s| s.as_str())
        ),
        (None, None) => format!("ended ({status})"),
    };
    Some(format!(
        "podwire on node {node} {how} {when}; its log ends:\n{}",
        log_tail(dir, node)
    ))
}

/// Fails the lab if a daemon has died while it ran (see [`Resources::reap_dead`]).
pub(super) fn daemons_alive(res: &Arc<Mutex<Resources>>) -> Result<()> {
    let dead = res.lock().expect("lab resources").reap_dead();
    if !dead.is_empty() {
        bail!("{}", dead.join("\n"));
    }
    Ok(())
}

pub(super) fn log_tail(dir: &Path, node: usize) -> String {
    let text =
        std::fs::read_to_string(dir.join(format!("n{node}/podwire.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
