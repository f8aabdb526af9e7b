//! What the daemon leaves behind and how it comes back: a SIGKILL in the middle of a transfer
//! and a restart (same subnet, the transfer completes), and after SIGTERM no device, route,
//! nftables table or socket of podwire's left on any node.

use super::{netns, pod_ip, spawn_node, traffic, Check, LabOptions, Names, Resources};
use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::net::{SocketAddrV4, TcpListener};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// A TCP transfer from pod 1 to pod `to`, running in the background while a check disturbs
/// the cluster.
pub struct Transfer {
    bytes: u64,
    sink: std::thread::JoinHandle<Result<traffic::Received>>,
    source: std::thread::JoinHandle<Result<String>>,
}

impl Transfer {
    /// Starts sending `bytes` of a pattern seeded with `seed` to pod `to` on `port`.
    pub fn start(names: &Names, to: usize, port: u16, bytes: u64, seed: u64) -> Result<Transfer> {
        let (src_ns, dst_ns) = (names.ns("p1"), names.ns(&format!("p{to}")));
        let listener = netns::run_in(&dst_ns, move || Ok(TcpListener::bind((pod_ip(to), port))?))?;
        let sink = netns::spawn_in(&dst_ns, move || {
            traffic::tcp_sink(listener, Duration::from_secs(60))
        });
        let source = netns::spawn_in(&src_ns, move || {
            traffic::tcp_source(
                SocketAddrV4::new(pod_ip(to), port),
                bytes,
                seed,
                Duration::from_secs(60),
            )
        });
        Ok(Transfer {
            bytes,
            sink,
            source,
        })
    }

    /// Waits for the end: whether every byte arrived intact, or why not.
    pub fn finish(self) -> Result<(), String> {
        let sent = netns::join(self.source);
        let got = netns::join(self.sink);
        match (sent, got) {
            (Ok(s), Ok(g))
                if g.bytes == self.bytes && traffic::same_digest(&s, &g.sha256).is_ok() =>
            {
                Ok(())
            }
            (Ok(_), Ok(g)) => Err(format!("{} of {} bytes, or damaged", g.bytes, self.bytes)),
            (Err(e), _) | (_, Err(e)) => Err(format!("{e:#}")),
        }
    }
}

/// Where node `node`'s daemon is among the lab's children.
fn node_child(r: &Resources, node: usize) -> Result<usize> {
    let name = format!("n{node}");
    r.children
        .iter()
        .position(|(n, _)| *n == name)
        .context("node is not running")
}

fn subnet_of(names: &Names, node: usize) -> Option<String> {
    podwire::subnet_env::read_value(
        &names.dir.join(format!("n{node}/subnet.env")),
        "FLANNEL_SUBNET",
    )
}

/// Node `node`'s podwire is SIGKILLed while pod 1 sends it 300 MB over TCP, then started
/// again: it must come back on the same subnet, and the transfer must complete intact (TCP
/// retransmits across the gap; the new daemon picks the connection up mid-stream).
pub fn kill_restart_check(
    res: &Arc<Mutex<Resources>>,
    names: &Names,
    opts: &LabOptions,
    exe: &Path,
    node: usize,
) -> Result<Check> {
    let name = "SIGKILL under a TCP transfer, then a restart: same subnet, transfer intact";
    let before = subnet_of(names, node);
    let transfer = Transfer::start(names, node, super::TCP_PORT + 2, 300_000_000, 11)?;
    std::thread::sleep(Duration::from_millis(100));
    let killed_at = SystemTime::now();
    let t = Instant::now();
    {
        let mut r = res.lock().expect("lab resources");
        let pos = node_child(&r, node)?;
        let (_, mut child) = r.children.remove(pos);
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL)?;
        let _ = child.wait();
        spawn_node(&mut r, opts, exe, node)?;
    }
    // Ready again: the new daemon rewrote subnet.env.
    wait_rewritten(names, node, killed_at);
    let restart = t.elapsed();
    let outcome = transfer.finish();
    let intact = outcome.is_ok();
    let after = subnet_of(names, node);
    Ok(Check {
        name: name.into(),
        ok: intact && before.is_some() && before == after,
        detail: format!(
            "node {node}: back in {} ms on {} (was {}); 300 MB 1->{node} intact {intact}{}",
            restart.as_millis(),
            after.as_deref().unwrap_or("?"),
            before.as_deref().unwrap_or("?"),
            outcome.err().map(|e| format!(" ({e})")).unwrap_or_default()
        ),
    })
}

/// Node `node`'s worker 0 is made to panic (`ctl fault worker-panic`) while pod 1 sends it
/// 200 MB over TCP: the daemon must log the panic and exit non-zero by itself within seconds
/// (not run on half-dead), and once restarted, as its supervisor would, carry the transfer to
/// the end intact on the same subnet.
pub fn worker_panic_check(
    res: &Arc<Mutex<Resources>>,
    names: &Names,
    opts: &LabOptions,
    exe: &Path,
    node: usize,
) -> Result<Check> {
    let name = "a worker panics under a TCP transfer: the daemon exits non-zero, a restart resumes";
    let before = subnet_of(names, node);
    let log = names.dir.join(format!("n{node}/podwire.log"));
    let transfer = Transfer::start(names, node, super::TCP_PORT + 3, 200_000_000, 13)?;
    std::thread::sleep(Duration::from_millis(100));
    let sock = names.dir.join(format!("n{node}/ctl.sock"));
    let asked = podwire::ctl::request(
        &sock,
        &serde_json::json!({"cmd": "fault", "kind": "worker-panic", "worker": 0}),
    )?;
    let t = Instant::now();
    let exited = {
        let mut r = res.lock().expect("lab resources");
        let pos = node_child(&r, node)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            match r.children[pos].1.try_wait()? {
                Some(status) => break Some(status),
                None if Instant::now() > deadline => break None,
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let (_, mut child) = r.children.remove(pos);
        if status.is_none() {
            // Half-dead: the check fails, and the node is replaced all the same.
            kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL)?;
            let _ = child.wait();
        }
        let exited = status.map(|s| (s, t.elapsed()));
        let restarted_at = SystemTime::now();
        spawn_node(&mut r, opts, exe, node)?;
        exited.map(|e| (e, restarted_at))
    };
    if let Some((_, restarted_at)) = exited {
        wait_rewritten(names, node, restarted_at);
    }
    let outcome = transfer.finish();
    let intact = outcome.is_ok();
    let after = subnet_of(names, node);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let logged = text.contains("panic injected") && text.contains("worker 0 stopped");
    let nonzero = exited
        .as_ref()
        .is_some_and(|((s, _), _)| !s.success() && s.code().is_some());
    Ok(Check {
        name: name.into(),
        ok: asked["error"].is_null()
            && nonzero
            && logged
            && intact
            && before.is_some()
            && before == after,
        detail: format!(
            "node {node}: {}; panic and exit logged {logged}; back on {} (was {}); 200 MB 1->{node} intact {intact}{}",
            match &exited {
                Some(((s, after), _)) => format!("exited {s} {} ms after the fault", after.as_millis()),
                None => format!("still running 10 s after the fault ({asked})"),
            },
            after.as_deref().unwrap_or("?"),
            before.as_deref().unwrap_or("?"),
            outcome.err().map(|e| format!(" ({e})")).unwrap_or_default()
        ),
    })
}

/// Waits (up to 20 s) until node `node`'s new daemon has rewritten subnet.env: it is ready.
fn wait_rewritten(names: &Names, node: usize, since: SystemTime) {
    let env = names.dir.join(format!("n{node}/subnet.env"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&env)
        .and_then(|m| m.modified())
        .map_or(true, |m| m <= since)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// After every daemon stopped on SIGTERM: no TUN device, no route through it, no service
/// route, no policy rule, no nftables table and no ctl socket on any podwire node (the lease stays, as
/// flanneld leaves it).
pub fn residue_check(names: &Names, opts: &LabOptions) -> Result<Check> {
    let mut left = Vec::new();
    for i in opts.podwire_nodes() {
        let ns = names.ns(&format!("n{i}"));
        let (_, links) = netns::output_in(&ns, &["ip", "-o", "link", "show"])?;
        if links.contains("flannel") {
            left.push(format!("n{i}: a flannel device"));
        }
        let (_, routes) = netns::output_in(&ns, &["ip", "-o", "route", "show"])?;
        if routes.contains("flannel") || routes.contains("10.96.0.0/12") {
            left.push(format!(
                "n{i}: routes {}",
                routes.trim().replace('\n', "; ")
            ));
        }
        // `--ip-masq --io xdp`: the policy rules that steer pods' TCP and UDP into podwire.
        let (_, rules) = netns::output_in(&ns, &["ip", "rule", "show"])?;
        if rules.contains(podwire::masq::POD_TABLE) {
            left.push(format!(
                "n{i}: ip rules to table {}",
                podwire::masq::POD_TABLE
            ));
        }
        let (_, tables) = netns::output_in(&ns, &["nft", "list", "tables"])?;
        if tables.contains(podwire::masq::TABLE) {
            left.push(format!("n{i}: nftables table {}", podwire::masq::TABLE));
        }
        if names.dir.join(format!("n{i}/ctl.sock")).exists() {
            left.push(format!("n{i}: ctl socket"));
        }
        // `--io xdp`: the XDP program is detached (its link closes with the process).
        let (_, eth0) = netns::output_in(&ns, &["ip", "-d", "link", "show", "eth0"])?;
        if eth0.contains("prog/xdp") {
            left.push(format!("n{i}: an XDP program on eth0"));
        }
    }
    Ok(Check {
        name: "SIGTERM leaves no device, route, XDP program, policy rule, nftables table or socket behind"
            .into(),
        ok: left.is_empty(),
        detail: if left.is_empty() {
            format!("{} nodes clean", opts.podwire_nodes().len())
        } else {
            left.join("; ")
        },
    })
}

/// SIGHUP makes node 1 re-read its files at once and keep running; its log (`--log-format
/// json` on node 1) is one JSON object per line throughout.
pub fn hangup_check(res: &Arc<Mutex<Resources>>, names: &Names) -> Result<Check> {
    let log = names.dir.join("n1/podwire.log");
    let said = |text: &str| -> usize {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches(text)
            .count()
    };
    let before = said("SIGHUP: re-reading");
    let alive = {
        let mut r = res.lock().expect("lab resources");
        let (_, child) = r
            .children
            .iter_mut()
            .find(|(n, _)| n == "n1")
            .context("node 1 is not running")?;
        kill(Pid::from_raw(child.id() as i32), Signal::SIGHUP)?;
        let deadline = Instant::now() + Duration::from_secs(3);
        while said("SIGHUP: re-reading") == before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        matches!(child.try_wait(), Ok(None))
    };
    let reread = said("SIGHUP: re-reading") > before;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let json = lines.iter().all(|l| {
        serde_json::from_str::<serde_json::Value>(l)
            .is_ok_and(|v| v["level"].is_string() && v["message"].is_string())
    });
    Ok(Check {
        name: "SIGHUP re-reads the files without a restart; --log-format json logs JSON lines"
            .into(),
        ok: reread && alive && json && !lines.is_empty(),
        detail: format!(
            "re-read {reread}, still running {alive}, {} log lines all JSON {json}",
            lines.len()
        ),
    })
}
