//! `podwire bench`: the end-to-end benchmark. The same 2-node netns cluster as the lab, once per
//! mode, the same workloads through each, side by side in one run:
//!
//! - modes: `kernel-vxlan` (the kernel's VXLAN as flanneld configures it: the reference),
//!   `podwire-vxlan` (UDP sockets with GSO, the default), `podwire-vxlan-flow-ports` (a raw
//!   socket with a source port per flow, no GSO), `podwire-udp` (flannel's udp encapsulation),
//!   `host-gw` (plain kernel routes between the nodes, no encapsulation: the ceiling); on
//!   request `podwire-vxlan-no-conntrack` (the default mode without connection tracking) and
//!   `podwire-vxlan-no-gro` (the default mode receiving without UDP GRO) and
//!   `podwire-vxlan-shared-queue` (the default mode without per-peer receive queues) and
//!   `podwire-vxlan-xdp` (the underlay through AF_XDP, `--io xdp`) and `podwire-vxlan-xdp-pods`
//!   (the pods through AF_XDP too, `--pod-ports`) and `podwire-udp-xdp` (flannel's udp
//!   encapsulation with the underlay through AF_XDP);
//! - workloads: one TCP stream, four TCP streams, a 64-byte UDP packet rate (sendmmsg and
//!   recvmmsg, 64 per call, so the generator does not cap the rate), and CPU time per gigabit
//!   of the single stream (all CPUs, from /proc/stat: the generators' share is the same in every
//!   mode).
//!
//! Rounds go over all modes in turn (round 1: every mode, round 2: every mode, ...), so noise
//! on this shared machine spreads over the modes rather than landing on one. Each figure is the
//! median of the rounds, and its ratio to kernel VXLAN. Results go to a JSON file and an SVG
//! chart; nothing here asserts a speed.

use super::{netns, pod_ip, set_up, traffic, with_lab, LabOptions, KERNEL_VXLAN};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::fmt::Write as _;
use std::net::{SocketAddrV4, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What `podwire bench` is told.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub rounds: usize,
    /// Megabytes per TCP stream (the four-stream run sends a quarter of it on each).
    pub tcp_mb: u64,
    pub udp_seconds: f64,
    pub workers: usize,
    pub modes: Vec<String>,
    pub out: PathBuf,
    pub svg: PathBuf,
}

/// The modes, reference first.
pub const MODES: [&str; 5] = [
    "kernel-vxlan",
    "podwire-vxlan",
    "podwire-vxlan-flow-ports",
    "podwire-udp",
    "host-gw",
];

/// Modes run only when asked for (`--modes`): podwire without connection tracking, to see what
/// tracking every packet costs.
pub const EXTRA_MODES: [&str; 6] = [
    "podwire-vxlan-no-conntrack",
    "podwire-vxlan-no-gro",
    "podwire-vxlan-shared-queue",
    "podwire-vxlan-xdp",
    "podwire-vxlan-xdp-pods",
    "podwire-udp-xdp",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    Tcp1,
    Tcp4,
    Udp64,
    CpuPerGbit,
}

impl Workload {
    const ALL: [Workload; 4] = [
        Workload::Tcp1,
        Workload::Tcp4,
        Workload::Udp64,
        Workload::CpuPerGbit,
    ];
    fn name(self) -> &'static str {
        match self {
            Workload::Tcp1 => "tcp_1_stream",
            Workload::Tcp4 => "tcp_4_streams",
            Workload::Udp64 => "udp_64b_rate",
            Workload::CpuPerGbit => "cpu_per_gbit",
        }
    }
    fn unit(self) -> &'static str {
        match self {
            Workload::Tcp1 | Workload::Tcp4 => "Mbit/s",
            Workload::Udp64 => "kpps",
            Workload::CpuPerGbit => "cpu_s/Gbit",
        }
    }
    /// True where a larger value is better.
    fn higher_is_better(self) -> bool {
        self != Workload::CpuPerGbit
    }
}

fn lab_options(mode: &str, workers: usize) -> Result<LabOptions> {
    let (backend, direct_routing, vxlan_tx) = match mode {
        "kernel-vxlan" => (KERNEL_VXLAN, false, "flow-ports"),
        "podwire-vxlan"
        | "podwire-vxlan-no-conntrack"
        | "podwire-vxlan-no-gro"
        | "podwire-vxlan-shared-queue" => ("vxlan", false, "socket"),
        "podwire-vxlan-flow-ports" => ("vxlan", false, "flow-ports"),
        // Outer headers written by the pipeline, as for the raw socket.
        "podwire-vxlan-xdp" | "podwire-vxlan-xdp-pods" => ("vxlan", false, "flow-ports"),
        "podwire-udp" | "podwire-udp-xdp" => ("udp", false, "flow-ports"),
        // flanneld's host-gw is kernel routes via the peer's node address; the lab's kernel
        // nodes with DirectRouting on one L2 segment are exactly that.
        "host-gw" => (KERNEL_VXLAN, true, "flow-ports"),
        other => bail!("unknown mode {other:?}: want one of {MODES:?} or {EXTRA_MODES:?}"),
    };
    Ok(LabOptions {
        nodes: 2,
        backend: backend.to_string(),
        peer_kernel: false,
        direct_routing,
        transfer_mb: 0,
        workers,
        ping_count: 1,
        udp_count: 1,
        json: None,
        capture: None,
        keep_logs: false,
        etcd: false,
        extra_leases: 0,
        vxlan_tx: vxlan_tx.to_string(),
        services: false,
        ip_masq: false,
        conntrack: mode != "podwire-vxlan-no-conntrack",
        udp_gro: mode != "podwire-vxlan-no-gro",
        peer_queues: mode != "podwire-vxlan-shared-queue",
        io_xdp: mode.contains("-xdp"),
        pod_xdp: mode == "podwire-vxlan-xdp-pods",
        soak_seconds: 0,
        soak_pps: 0,
        l2: false,
    })
}

/// Busy CPU time of the whole machine so far (user, nice, system, irq, softirq, steal).
fn busy_cpu() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    if f.len() < 8 {
        bail!("unexpected /proc/stat: {line}");
    }
    let jiffies = f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
    // USER_HZ is 100 on Linux.
    Ok(Duration::from_millis(jiffies * 10))
}

/// `streams` TCP streams from pod 1 to pod 2, `bytes` each: (Mbit/s, CPU s per Gbit).
fn tcp(names: &super::Names, streams: usize, bytes: u64) -> Result<(f64, f64)> {
    let (src, dst) = (names.ns("p1"), names.ns("p2"));
    let timeout = Duration::from_secs(60);
    let mut sinks = Vec::new();
    for k in 0..streams {
        let port = 5301 + k as u16;
        let l = netns::run_in(&dst, move || Ok(TcpListener::bind((pod_ip(2), port))?))?;
        sinks.push(netns::spawn_in(&dst, move || {
            traffic::tcp_discard(l, timeout)
        }));
    }
    let cpu0 = busy_cpu()?;
    let t0 = Instant::now();
    let sources: Vec<_> = (0..streams)
        .map(|k| {
            let to = SocketAddrV4::new(pod_ip(2), 5301 + k as u16);
            netns::spawn_in(&src, move || traffic::tcp_blast(to, bytes, timeout))
        })
        .collect();
    for s in sources {
        netns::join(s)?;
    }
    let mut total = 0;
    for s in sinks {
        total += netns::join(s)?;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = (busy_cpu()? - cpu0).as_secs_f64();
    if total != bytes * streams as u64 {
        bail!("{total} of {} bytes arrived", bytes * streams as u64);
    }
    let bits = total as f64 * 8.0;
    Ok((bits / elapsed / 1e6, cpu / (bits / 1e9)))
}

/// 64-byte datagrams from pod 1 to pod 2 for `secs`: delivered thousands per second.
fn udp_rate(names: &super::Names, secs: f64) -> Result<f64> {
    let (src, dst) = (names.ns("p1"), names.ns("p2"));
    let to = SocketAddrV4::new(pod_ip(2), 5401);
    let sock = netns::run_in(&dst, move || {
        let s = UdpSocket::bind(to)?;
        s.set_nonblocking(true)?;
        Ok(s)
    })?;
    let duration = Duration::from_secs_f64(secs);
    let sink = netns::spawn_in(&dst, move || {
        traffic::udp_count(sock, Duration::from_millis(500), duration * 3)
    });
    netns::run_in(&src, move || traffic::udp_blast(to, 64, duration))?;
    let got = netns::join(sink)?;
    if got.received == 0 {
        bail!("no datagram arrived");
    }
    Ok(got.received as f64 / got.elapsed.as_secs_f64().max(1e-3) / 1e3)
}

/// One round of every workload through one mode.
fn measure(names: &super::Names, opts: &BenchOptions) -> Result<Vec<(Workload, f64)>> {
    let bytes = opts.tcp_mb * 1_000_000;
    let (tcp1, cpu) = tcp(names, 1, bytes)?;
    let (tcp4, _) = tcp(names, 4, bytes / 4)?;
    let udp = udp_rate(names, opts.udp_seconds)?;
    Ok(vec![
        (Workload::Tcp1, tcp1),
        (Workload::Tcp4, tcp4),
        (Workload::Udp64, udp),
        (Workload::CpuPerGbit, cpu),
    ])
}

/// `--io xdp`: frames per wakeup (frames received and sent over the kernel wakeups they
/// took: fill-ring wakeups and send kicks) and frames per receive, from both nodes' counters
/// summed over their workers, for everything the lab carried.
fn xdp_activity(names: &super::Names) -> Result<(f64, f64)> {
    let keys = [
        "xdp_rx_frames",
        "xdp_rx_batches",
        "xdp_tx_frames",
        "xdp_wakeups",
    ];
    let mut sum = [0u64; 4];
    for n in [1, 2] {
        let sock = names.dir.join(format!("n{n}/ctl.sock"));
        let stats = podwire::ctl::request(&sock, &json!({"cmd": "stats"}))
            .with_context(|| format!("node {n}'s counters"))?;
        for w in stats["workers"].as_array().into_iter().flatten() {
            for (i, k) in keys.iter().enumerate() {
                sum[i] += w["counters"][k].as_u64().unwrap_or(0);
            }
        }
    }
    let [rx, batches, tx, wakeups] = sum;
    Ok((
        (rx + tx) as f64 / wakeups.max(1) as f64,
        rx as f64 / batches.max(1) as f64,
    ))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs the bench, prints the table, writes the JSON and the SVG.
pub fn run(opts: BenchOptions) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("podwire bench needs root (network namespaces, TUN devices)");
    }
    if !opts.modes.iter().any(|m| m == "kernel-vxlan") {
        bail!("--modes must include kernel-vxlan: every figure is a ratio to it");
    }
    let labs: Vec<(String, LabOptions)> = opts
        .modes
        .iter()
        .map(|m| Ok((m.clone(), lab_options(m, opts.workers)?)))
        .collect::<Result<_>>()?;
    let started = Instant::now();
    // samples[mode][workload] = one value per round
    let mut samples: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); Workload::ALL.len()]; labs.len()];
    // `--io xdp` modes: (frames per wakeup, frames per receive), one per round.
    let mut xdp: Vec<Vec<(f64, f64)>> = vec![Vec::new(); labs.len()];
    for round in 1..=opts.rounds {
        for (m, (mode, lab)) in labs.iter().enumerate() {
            let (got, activity) = with_lab(
                lab,
                |o| o.is_err(),
                |res, lab, exe| {
                    let names = set_up(res, lab, exe, &mut serde_json::Map::new())?;
                    let got = measure(&names, &opts)?;
                    let activity = lab.io_xdp.then(|| xdp_activity(&names)).transpose()?;
                    Ok((got, activity))
                },
            )
            .with_context(|| format!("round {round}, {mode}"))?;
            xdp[m].extend(activity);
            for (w, v) in got {
                let wi = Workload::ALL.iter().position(|x| *x == w).expect("listed");
                samples[m][wi].push(v);
            }
            eprintln!(
                "bench: round {round}/{} {mode:<14} tcp1 {:>6.0} Mbit/s  tcp4 {:>6.0} Mbit/s  udp64 {:>6.0} kpps  {:.2} cpu_s/Gbit",
                opts.rounds,
                samples[m][0].last().copied().unwrap_or(0.0),
                samples[m][1].last().copied().unwrap_or(0.0),
                samples[m][2].last().copied().unwrap_or(0.0),
                samples[m][3].last().copied().unwrap_or(0.0),
            );
        }
    }
    let reference = labs
        .iter()
        .position(|(m, _)| m == "kernel-vxlan")
        .expect("checked above");
    let medians: Vec<Vec<f64>> = samples
        .iter()
        .map(|per_w| per_w.iter().map(|s| median(&mut s.clone())).collect())
        .collect();
    let mut results = Vec::new();
    for (m, (mode, _)) in labs.iter().enumerate() {
        for (wi, w) in Workload::ALL.iter().enumerate() {
            let value = medians[m][wi];
            let base = medians[reference][wi];
            results.push(json!({
                "mode": mode,
                "workload": w.name(),
                "value": (value * 1000.0).round() / 1000.0,
                "unit": w.unit(),
                "ratio_to_kernel_vxlan": if base > 0.0 { ((value / base) * 1000.0).round() / 1000.0 } else { 0.0 },
                "samples": samples[m][wi],
                "higher_is_better": w.higher_is_better(),
            }));
        }
    }
    let mut xdp_figures = serde_json::Map::new();
    for (m, (mode, _)) in labs.iter().enumerate().filter(|(m, _)| !xdp[*m].is_empty()) {
        let per_wakeup = median(&mut xdp[m].iter().map(|a| a.0).collect::<Vec<_>>());
        let per_receive = median(&mut xdp[m].iter().map(|a| a.1).collect::<Vec<_>>());
        xdp_figures.insert(
            mode.clone(),
            json!({"frames_per_wakeup": (per_wakeup * 100.0).round() / 100.0,
                   "frames_per_receive": (per_receive * 100.0).round() / 100.0}),
        );
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let doc = json!({
        "kernel": kernel,
        "cores": cores,
        "rounds": opts.rounds,
        "tcp_mb_per_run": opts.tcp_mb,
        "udp_seconds": opts.udp_seconds,
        "workers_per_podwire_node": opts.workers,
        "took_seconds": started.elapsed().as_secs(),
        "results": results,
        "af_xdp": xdp_figures,
    });
    std::fs::write(&opts.out, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("writing {}", opts.out.display()))?;
    std::fs::write(&opts.svg, svg(&labs, &medians, reference))
        .with_context(|| format!("writing {}", opts.svg.display()))?;
    print_table(&labs, &medians, reference, &opts, &kernel, cores);
    for (mode, f) in &xdp_figures {
        println!(
            "{mode}: {} frames per wakeup (fill-ring wakeups and send kicks), {} frames per receive",
            f["frames_per_wakeup"], f["frames_per_receive"]
        );
    }
    println!(
        "\nwrote {} and {} in {:.0} s",
        opts.out.display(),
        opts.svg.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn print_table(
    labs: &[(String, LabOptions)],
    medians: &[Vec<f64>],
    reference: usize,
    opts: &BenchOptions,
    kernel: &str,
    cores: usize,
) {
    println!(
        "\npodwire bench: 2 nodes, kernel {kernel}, {cores} cores, median of {} rounds, {} worker(s) per podwire node",
        opts.rounds, opts.workers
    );
    print!("{:<16} {:<11}", "workload", "unit");
    for (m, _) in labs {
        print!(" {:>20}", m);
    }
    println!();
    for (wi, w) in Workload::ALL.iter().enumerate() {
        print!("{:<16} {:<11}", w.name(), w.unit());
        for m in 0..labs.len() {
            let base = medians[reference][wi];
            let ratio = if base > 0.0 {
                medians[m][wi] / base
            } else {
                0.0
            };
            let cell = format!("{:.2} ({ratio:.2}x)", medians[m][wi]);
            print!(" {cell:>20}");
        }
        println!();
    }
    println!("(ratios are to kernel-vxlan; for cpu_per_gbit lower is better)");
}

/// A grouped bar chart of the ratios to kernel VXLAN, one group per workload.
fn svg(labs: &[(String, LabOptions)], medians: &[Vec<f64>], reference: usize) -> String {
    const COLOURS: [&str; 6] = [
        "#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756", "#72b7b2",
    ];
    let (w, h, left, top, bottom) = (900.0, 420.0, 60.0, 40.0, 80.0);
    let plot_h = h - top - bottom;
    let ratios: Vec<Vec<f64>> = (0..labs.len())
        .map(|m| {
            (0..Workload::ALL.len())
                .map(|wi| {
                    let (v, base) = (medians[m][wi], medians[reference][wi]);
                    // Every bar reads "higher is better": CPU cost is drawn inverted.
                    match (Workload::ALL[wi].higher_is_better(), base > 0.0, v > 0.0) {
                        (true, true, _) => v / base,
                        (false, _, true) => base / v,
                        _ => 0.0,
                    }
                })
                .collect()
        })
        .collect();
    let max = ratios
        .iter()
        .flatten()
        .copied()
        .fold(1.0f64, f64::max)
        .ceil();
    let group_w = (w - left - 20.0) / Workload::ALL.len() as f64;
    let bar_w = group_w * 0.8 / labs.len() as f64;
    let y = |r: f64| top + plot_h * (1.0 - r / max);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="20" font-size="14">podwire end-to-end bench: ratio to kernel VXLAN, higher is better (median of rounds; CPU per Gbit drawn inverted)</text>"#
    );
    let mut r = 0.0;
    while r <= max + 1e-9 {
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{y0:.1}" y2="{y0:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{r:.1}x</text>"##,
            w - 20.0,
            left - 6.0,
            y(r) + 4.0,
            y0 = y(r)
        );
        r += if max > 4.0 { 1.0 } else { 0.5 };
    }
    let _ = writeln!(
        s,
        r#"<line x1="{left}" x2="{}" y1="{y1:.1}" y2="{y1:.1}" stroke="black" stroke-dasharray="4 3"/>"#,
        w - 20.0,
        y1 = y(1.0)
    );
    for (wi, wl) in Workload::ALL.iter().enumerate() {
        let gx = left + wi as f64 * group_w + group_w * 0.1;
        for (m, _) in labs.iter().enumerate() {
            let v = ratios[m][wi];
            let x = gx + m as f64 * bar_w;
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{:.2}x</title></rect><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{v:.2}</text>"#,
                y(v),
                bar_w - 2.0,
                (top + plot_h - y(v)).max(0.0),
                COLOURS[m % COLOURS.len()],
                v,
                x + bar_w / 2.0 - 1.0,
                y(v) - 3.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            gx + group_w * 0.4,
            top + plot_h + 18.0,
            if wl.higher_is_better() {
                wl.name().to_string()
            } else {
                format!("1 / {}", wl.name())
            }
        );
    }
    for (m, (mode, _)) in labs.iter().enumerate() {
        let x = left + m as f64 * 170.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{:.1}">{mode}</text>"#,
            h - 30.0,
            COLOURS[m % COLOURS.len()],
            x + 16.0,
            h - 20.0
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_median_and_modes() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        for m in MODES {
            assert!(lab_options(m, 1).is_ok());
        }
        assert!(lab_options("nope", 1).is_err());
        assert!(lab_options("host-gw", 1).unwrap().direct_routing);
        assert!(lab_options("podwire-vxlan", 1).unwrap().conntrack);
        assert!(!lab_options(EXTRA_MODES[0], 1).unwrap().conntrack);
    }

    #[test]
    fn test_svg_is_well_formed_enough() {
        let labs: Vec<(String, LabOptions)> = ["kernel-vxlan", "podwire-udp"]
            .iter()
            .map(|m| (m.to_string(), lab_options(m, 1).unwrap()))
            .collect();
        let medians = vec![
            vec![1000.0, 2000.0, 300.0, 1.0],
            vec![500.0, 900.0, 450.0, 2.0],
        ];
        let s = svg(&labs, &medians, 0);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<rect").count(), 2 * 4 + 2);
        assert!(s.contains(">0.50<") && s.contains(">1.50<"));
        // CPU cost drawn inverted: twice the CPU per Gbit is a 0.5 bar.
        assert_eq!(s.matches(">0.50<").count(), 2, "{s}");
    }
}
