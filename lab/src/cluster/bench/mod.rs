//! `podwire-lab bench`: the end-to-end benchmark. The same 2-node netns cluster as the lab, once per
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
//! - workloads: one TCP stream, four TCP streams, CPU time per gigabit of the single stream
//!   (all CPUs, from /proc/stat: the generators' share is the same in every mode), and the
//!   64-byte packet rate as RFC 2544 measures it (`rate`): offered, delivered, loss, and the
//!   no-drop rate. The generator's own ceiling (pod to pod over one veth, no forwarding) is
//!   measured in every round beside the modes.
//!
//! Every mode runs with the same pod MTU (`POD_MTU`). Rounds go over all modes in turn (round
//! 1: every mode, round 2: every mode, ...), so noise on this shared machine spreads over the
//! modes rather than landing on one. Each figure is the median of the rounds, with its min and
//! max, and its ratio to kernel VXLAN. The run file (JSON) keeps every sample and every trial
//! with the commit, date, command line and machine: the README's figures are rendered from a
//! committed one (`podwire-lab figures`). Nothing here asserts a speed.

mod chart;
pub mod profile;
pub mod rate;
pub mod services_bench;

use super::{netns, pod_ip, set_up, traffic, value_name, with_lab, Backend, LabOptions, VxlanTx};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::net::{SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What `podwire-lab bench` is told.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub rounds: usize,
    /// Megabytes per TCP stream (the four-stream run sends a quarter of it on each).
    pub tcp_mb: u64,
    /// Seconds of the unpaced packet-rate trial.
    pub udp_seconds: f64,
    /// Seconds of each trial of the no-drop-rate search.
    pub trial_seconds: f64,
    pub workers: usize,
    pub modes: Vec<BenchMode>,
    pub out: PathBuf,
    pub svg: PathBuf,
    /// The daemon binary the podwire modes run.
    pub podwire: PathBuf,
}

/// What one bench lab runs (`--modes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchMode {
    /// The kernel's VXLAN as flanneld configures it: the reference.
    #[value(name = "kernel-vxlan")]
    KernelVxlan,
    /// podwire VXLAN, UDP sockets with GSO (the default).
    #[value(name = "podwire-vxlan")]
    PodwireVxlan,
    /// podwire VXLAN through a raw socket, a source port per flow, no GSO.
    #[value(name = "podwire-vxlan-flow-ports")]
    PodwireVxlanFlowPorts,
    /// podwire with flannel's udp encapsulation.
    #[value(name = "podwire-udp")]
    PodwireUdp,
    /// Kernel routes between the nodes, no encapsulation: the ceiling.
    #[value(name = "host-gw")]
    HostGw,
    /// podwire-vxlan without connection tracking.
    #[value(name = "podwire-vxlan-no-conntrack")]
    PodwireVxlanNoConntrack,
    /// podwire-vxlan receiving without UDP GRO.
    #[value(name = "podwire-vxlan-no-gro")]
    PodwireVxlanNoGro,
    /// podwire-vxlan without per-peer receive queues.
    #[value(name = "podwire-vxlan-shared-queue")]
    PodwireVxlanSharedQueue,
    /// podwire VXLAN with the underlay through AF_XDP.
    #[value(name = "podwire-vxlan-xdp")]
    PodwireVxlanXdp,
    /// podwire-vxlan-xdp with the pods through AF_XDP too.
    #[value(name = "podwire-vxlan-xdp-pods")]
    PodwireVxlanXdpPods,
    /// flannel's udp encapsulation with the underlay through AF_XDP.
    #[value(name = "podwire-udp-xdp")]
    PodwireUdpXdp,
}

impl std::fmt::Display for BenchMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&value_name(self))
    }
}

/// The modes, reference first.
pub const MODES: [BenchMode; 5] = [
    BenchMode::KernelVxlan,
    BenchMode::PodwireVxlan,
    BenchMode::PodwireVxlanFlowPorts,
    BenchMode::PodwireUdp,
    BenchMode::HostGw,
];

/// Modes run only when asked for (`--modes`): podwire without one of its features, or with
/// AF_XDP, to see what each costs or brings.
pub const EXTRA_MODES: [BenchMode; 6] = [
    BenchMode::PodwireVxlanNoConntrack,
    BenchMode::PodwireVxlanNoGro,
    BenchMode::PodwireVxlanSharedQueue,
    BenchMode::PodwireVxlanXdp,
    BenchMode::PodwireVxlanXdpPods,
    BenchMode::PodwireUdpXdp,
];

/// A figure measured in every mode and round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Tcp1,
    Tcp4,
    /// The generator unpaced: what it offered, what arrived, the loss.
    UdpOffered,
    UdpDelivered,
    UdpLoss,
    /// The highest offered rate with at most 0.1% loss.
    UdpNdr,
    CpuPerGbit,
}

impl Workload {
    pub const ALL: [Workload; 7] = [
        Workload::Tcp1,
        Workload::Tcp4,
        Workload::UdpOffered,
        Workload::UdpDelivered,
        Workload::UdpLoss,
        Workload::UdpNdr,
        Workload::CpuPerGbit,
    ];
    /// The packet-rate figures, which the generator's ceiling has too.
    pub const RATE: [Workload; 4] = [
        Workload::UdpOffered,
        Workload::UdpDelivered,
        Workload::UdpLoss,
        Workload::UdpNdr,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Workload::Tcp1 => "tcp_1_stream",
            Workload::Tcp4 => "tcp_4_streams",
            Workload::UdpOffered => "udp_64b_max_offered",
            Workload::UdpDelivered => "udp_64b_delivered",
            Workload::UdpLoss => "udp_64b_loss",
            Workload::UdpNdr => "udp_64b_ndr",
            Workload::CpuPerGbit => "cpu_per_gbit",
        }
    }
    pub fn unit(self) -> &'static str {
        match self {
            Workload::Tcp1 | Workload::Tcp4 => "Mbit/s",
            Workload::UdpOffered | Workload::UdpDelivered | Workload::UdpNdr => "kpps",
            Workload::UdpLoss => "%",
            Workload::CpuPerGbit => "cpu_s/Gbit",
        }
    }
    /// True where a larger value is better.
    pub fn higher_is_better(self) -> bool {
        !matches!(self, Workload::CpuPerGbit | Workload::UdpLoss)
    }
    /// Whether a ratio to kernel VXLAN means something (not for the generator's offered rate
    /// or a loss).
    pub fn has_ratio(self) -> bool {
        !matches!(self, Workload::UdpOffered | Workload::UdpLoss)
    }
    /// What a reader sees as the row's name.
    pub fn label(self) -> &'static str {
        match self {
            Workload::Tcp1 => "1 TCP stream, Mbit/s",
            Workload::Tcp4 => "4 TCP streams, Mbit/s",
            Workload::UdpOffered => "64-byte UDP offered (generator unpaced), kpps",
            Workload::UdpDelivered => "64-byte UDP delivered of it, kpps",
            Workload::UdpLoss => "64-byte UDP loss at that rate, %",
            Workload::UdpNdr => "64-byte UDP no-drop rate (loss <= 0.1%), kpps",
            Workload::CpuPerGbit => "CPU s per Gbit (1 TCP stream)",
        }
    }
}

/// The pod MTU of every mode, so the TCP workloads move the same segments: FLANNEL_MTU of the
/// vxlan backend, the smallest of the modes (flannel's udp backend gives 1472, host-gw 1500).
pub const POD_MTU: u32 = 1450;

fn lab_options(mode: BenchMode, workers: usize, podwire: &Path) -> LabOptions {
    use BenchMode as M;
    let (backend, direct_routing, vxlan_tx) = match mode {
        M::KernelVxlan => (Backend::KernelVxlan, false, VxlanTx::FlowPorts),
        M::PodwireVxlan
        | M::PodwireVxlanNoConntrack
        | M::PodwireVxlanNoGro
        | M::PodwireVxlanSharedQueue => (Backend::Vxlan, false, VxlanTx::Socket),
        M::PodwireVxlanFlowPorts => (Backend::Vxlan, false, VxlanTx::FlowPorts),
        // Outer headers written by the pipeline, as for the raw socket.
        M::PodwireVxlanXdp | M::PodwireVxlanXdpPods => (Backend::Vxlan, false, VxlanTx::FlowPorts),
        M::PodwireUdp | M::PodwireUdpXdp => (Backend::Udp, false, VxlanTx::FlowPorts),
        // flanneld's host-gw is kernel routes via the peer's node address; the lab's kernel
        // nodes with DirectRouting on one L2 segment are exactly that.
        M::HostGw => (Backend::KernelVxlan, true, VxlanTx::FlowPorts),
    };
    LabOptions {
        podwire: podwire.to_path_buf(),
        nodes: 2,
        backend,
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
        kube: false,
        extra_leases: 0,
        vxlan_tx,
        services: false,
        ip_masq: false,
        kube_proxy: super::KubeProxyMode::Iptables,
        conntrack: mode != M::PodwireVxlanNoConntrack,
        udp_gro: mode != M::PodwireVxlanNoGro,
        peer_queues: mode != M::PodwireVxlanSharedQueue,
        io_xdp: matches!(
            mode,
            M::PodwireVxlanXdp | M::PodwireVxlanXdpPods | M::PodwireUdpXdp
        ),
        pod_xdp: mode == M::PodwireVxlanXdpPods,
        soak_seconds: 0,
        soak_pps: 0,
        l2: false,
        forward_drop: false,
    }
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

/// `streams` TCP streams from pod 1 to pod 2, `bytes` each: (Mbit/s, the machine's busy CPU
/// time meanwhile, Gbit carried).
fn tcp(names: &super::Names, streams: usize, bytes: u64) -> Result<(f64, Duration, f64)> {
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
    let cpu = busy_cpu()? - cpu0;
    if total != bytes * streams as u64 {
        bail!("{total} of {} bytes arrived", bytes * streams as u64);
    }
    let bits = total as f64 * 8.0;
    Ok((bits / elapsed / 1e6, cpu, bits / 1e9))
}

/// CPU seconds per Gbit, refused when the transfer took too little CPU for /proc/stat's
/// 10 ms ticks to resolve it to 10% (a short transfer can read 0 ticks: a cost of 0, not a
/// measurement).
fn cpu_per_gbit(cpu: Duration, gbit: f64) -> Result<f64> {
    if cpu < MIN_CPU_READING {
        bail!(
            "the 1-stream transfer took {} ms of CPU, under the {} ms /proc/stat resolves \
             to 10%: raise --tcp-mb",
            cpu.as_millis(),
            MIN_CPU_READING.as_millis()
        );
    }
    Ok(cpu.as_secs_f64() / gbit)
}

/// Ten of /proc/stat's 10 ms ticks.
const MIN_CPU_READING: Duration = Duration::from_millis(100);

/// Pod 1 to pod 2: the packet-rate trials of `rate`.
fn pod_path(names: &super::Names) -> rate::Path {
    rate::Path {
        src_ns: names.ns("p1"),
        dst_ns: names.ns("p2"),
        dst: pod_ip(2),
    }
}

/// Gives both pods (and their host ends) the bench's one pod MTU.
fn same_pod_mtu(names: &super::Names) -> Result<()> {
    let mtu = POD_MTU.to_string();
    for i in [1, 2] {
        netns::ip_in(
            &names.ns(&format!("p{i}")),
            &["link", "set", "eth0", "mtu", &mtu],
        )?;
        netns::ip_in(
            &names.ns(&format!("n{i}")),
            &["link", "set", "vpod", "mtu", &mtu],
        )?;
    }
    Ok(())
}

/// One round of every workload through one mode.
fn measure(
    names: &super::Names,
    opts: &BenchOptions,
) -> Result<(Vec<(Workload, f64)>, rate::RateResult)> {
    let bytes = opts.tcp_mb * 1_000_000;
    let (tcp1, cpu, gbit) = tcp(names, 1, bytes)?;
    let cpu = cpu_per_gbit(cpu, gbit)?;
    let (tcp4, _, _) = tcp(names, 4, bytes / 4)?;
    let rates = rate::measure(&pod_path(names), opts.udp_seconds, opts.trial_seconds, 5400)?;
    let mut got = vec![
        (Workload::Tcp1, tcp1),
        (Workload::Tcp4, tcp4),
        (Workload::CpuPerGbit, cpu),
    ];
    got.extend(rate_figures(&rates));
    Ok((got, rates))
}

/// The packet-rate figures of one round. A round without a passing trial has a no-drop rate
/// of 0: nothing it offered got through at 0.1% loss or less.
fn rate_figures(r: &rate::RateResult) -> Vec<(Workload, f64)> {
    vec![
        (Workload::UdpOffered, r.max_offered.offered_pps / 1e3),
        (Workload::UdpDelivered, r.max_offered.delivered_pps / 1e3),
        (Workload::UdpLoss, r.max_offered.loss() * 100.0),
        (Workload::UdpNdr, r.ndr.map_or(0.0, |t| t.offered_pps / 1e3)),
    ]
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

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Every sample of one mode, per workload, per round.
struct ModeSamples {
    mode: String,
    /// `values[workload index]`: one value per round.
    values: Vec<Vec<f64>>,
    rates: Vec<rate::RateResult>,
    /// `--io xdp` modes: (frames per wakeup, frames per receive), one per round.
    xdp: Vec<(f64, f64)>,
}

impl ModeSamples {
    fn new(mode: &str) -> ModeSamples {
        ModeSamples {
            mode: mode.to_string(),
            values: vec![Vec::new(); Workload::ALL.len()],
            rates: Vec::new(),
            xdp: Vec::new(),
        }
    }

    fn push(&mut self, got: &[(Workload, f64)]) {
        for (w, v) in got {
            let wi = Workload::ALL.iter().position(|x| x == w).expect("listed");
            self.values[wi].push(*v);
        }
    }

    fn last(&self, w: Workload) -> f64 {
        let wi = Workload::ALL.iter().position(|x| *x == w).expect("listed");
        self.values[wi].last().copied().unwrap_or(f64::NAN)
    }

    /// The latest round's 64-byte UDP rates, for the progress lines.
    fn last_udp_rates(&self) -> String {
        format!(
            "udp64 offered {:>5.0} kpps, delivered {:>5.0}, loss {:.2}%, ndr {:>5.0} kpps",
            self.last(Workload::UdpOffered),
            self.last(Workload::UdpDelivered),
            self.last(Workload::UdpLoss),
            self.last(Workload::UdpNdr),
        )
    }

    fn medians(&self) -> Vec<f64> {
        self.values.iter().map(|s| median(&mut s.clone())).collect()
    }
}

/// The mode name of the generator's ceiling in the run file.
pub const CEILING: &str = "generator-ceiling";

/// The generator's and receiver's ceiling: the packet-rate trials pod to pod over one veth.
fn ceiling_round(opts: &BenchOptions) -> Result<rate::RateResult> {
    let pair = rate::DirectPair::create(&format!("pw{}", std::process::id()), POD_MTU)?;
    rate::measure(&pair.path, opts.udp_seconds, opts.trial_seconds, 7400)
}

/// Runs the bench, prints the tables, writes the run file and the chart.
pub fn run(opts: BenchOptions) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("podwire-lab bench needs root (network namespaces, TUN devices)");
    }
    if !opts.modes.contains(&BenchMode::KernelVxlan) {
        bail!("--modes must include kernel-vxlan: every figure is a ratio to it");
    }
    let labs: Vec<(String, LabOptions)> = opts
        .modes
        .iter()
        .map(|&m| (m.to_string(), lab_options(m, opts.workers, &opts.podwire)))
        .collect();
    let provenance = crate::run_record::Provenance::collect();
    let started = Instant::now();
    let mut modes: Vec<ModeSamples> = labs.iter().map(|(m, _)| ModeSamples::new(m)).collect();
    let mut ceiling = ModeSamples::new(CEILING);
    for round in 1..=opts.rounds {
        let r = ceiling_round(&opts).with_context(|| format!("round {round}, {CEILING}"))?;
        ceiling.push(&rate_figures(&r));
        ceiling.rates.push(r);
        eprintln!(
            "bench: round {round}/{} {CEILING:<26} {}",
            opts.rounds,
            ceiling.last_udp_rates(),
        );
        for (m, (mode, lab)) in labs.iter().enumerate() {
            let (got, rates, activity) = with_lab(
                lab,
                |o| o.is_err(),
                |res, lab, exe| {
                    let names = set_up(res, lab, exe, &mut serde_json::Map::new())?;
                    same_pod_mtu(&names)?;
                    let (got, rates) = measure(&names, &opts)?;
                    let activity = lab.io_xdp.then(|| xdp_activity(&names)).transpose()?;
                    Ok((got, rates, activity))
                },
            )
            .with_context(|| format!("round {round}, {mode}"))?;
            let s = &mut modes[m];
            s.push(&got);
            s.rates.push(rates);
            s.xdp.extend(activity);
            eprintln!(
                "bench: round {round}/{} {mode:<26} tcp1 {:>6.0} Mbit/s  tcp4 {:>6.0} Mbit/s  {}  {:.2} cpu_s/Gbit",
                opts.rounds,
                s.last(Workload::Tcp1),
                s.last(Workload::Tcp4),
                s.last_udp_rates(),
                s.last(Workload::CpuPerGbit),
            );
        }
    }
    let doc = run_file(&opts, &provenance, &modes, &ceiling, started.elapsed());
    std::fs::write(&opts.out, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("writing {}", opts.out.display()))?;
    let reference = &modes[labs
        .iter()
        .position(|(m, _)| m == "kernel-vxlan")
        .expect("checked above")];
    let medians: Vec<Vec<f64>> = modes.iter().map(ModeSamples::medians).collect();
    std::fs::write(
        &opts.svg,
        chart::svg(
            &modes.iter().map(|m| m.mode.as_str()).collect::<Vec<_>>(),
            &medians,
            &reference.medians(),
        ),
    )
    .with_context(|| format!("writing {}", opts.svg.display()))?;
    println!(
        "\n{}",
        crate::figures::e2e_text(&doc).context("rendering the run file")?
    );
    println!(
        "wrote {} and {} in {:.0} s",
        opts.out.display(),
        opts.svg.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// One result line of the run file: every sample, min, median, max, and the median's ratio to
/// kernel VXLAN's.
fn result_entry(mode: &str, w: Workload, samples: &[f64], reference: Option<f64>) -> Value {
    let mut sorted = samples.to_vec();
    let med = median(&mut sorted);
    let ratio = match reference {
        Some(base) if w.has_ratio() && base > 0.0 => json!(round3(med / base)),
        _ => Value::Null,
    };
    json!({
        "mode": mode,
        "workload": w.name(),
        "unit": w.unit(),
        "samples": samples.iter().map(|v| round3(*v)).collect::<Vec<_>>(),
        "min": round3(sorted.first().copied().unwrap_or(0.0)),
        "median": round3(med),
        "max": round3(sorted.last().copied().unwrap_or(0.0)),
        "ratio_to_kernel_vxlan": ratio,
    })
}

/// The run file: where and how it was measured, every sample, every trial.
fn run_file(
    opts: &BenchOptions,
    provenance: &crate::run_record::Provenance,
    modes: &[ModeSamples],
    ceiling: &ModeSamples,
    took: Duration,
) -> Value {
    let reference = modes
        .iter()
        .find(|m| m.mode == "kernel-vxlan")
        .map(ModeSamples::medians);
    let mut results = Vec::new();
    for m in modes {
        for (wi, w) in Workload::ALL.iter().enumerate() {
            let base = reference.as_ref().map(|r| r[wi]);
            results.push(result_entry(&m.mode, *w, &m.values[wi], base));
        }
    }
    for w in Workload::RATE {
        let wi = Workload::ALL.iter().position(|x| *x == w).expect("listed");
        let base = reference.as_ref().map(|r| r[wi]);
        results.push(result_entry(CEILING, w, &ceiling.values[wi], base));
    }
    let mut packet_rate = serde_json::Map::new();
    for m in modes.iter().chain([ceiling]) {
        packet_rate.insert(m.mode.clone(), json!(m.rates));
    }
    let mut af_xdp = serde_json::Map::new();
    for m in modes.iter().filter(|m| !m.xdp.is_empty()) {
        let per_wakeup = median(&mut m.xdp.iter().map(|a| a.0).collect::<Vec<_>>());
        let per_receive = median(&mut m.xdp.iter().map(|a| a.1).collect::<Vec<_>>());
        af_xdp.insert(
            m.mode.clone(),
            json!({"frames_per_wakeup": (per_wakeup * 100.0).round() / 100.0,
                   "frames_per_receive": (per_receive * 100.0).round() / 100.0,
                   "samples": m.xdp}),
        );
    }
    let workloads: Vec<Value> = Workload::ALL
        .iter()
        .map(|w| {
            json!({"name": w.name(), "label": w.label(), "unit": w.unit(),
                   "higher_is_better": w.higher_is_better(), "has_ratio": w.has_ratio()})
        })
        .collect();
    json!({
        "kind": "e2e",
        "commit": provenance.commit,
        "dirty": provenance.dirty,
        "date": provenance.date,
        "command": provenance.command,
        "machine": provenance.machine,
        "rounds": opts.rounds,
        "tcp_mb_per_run": opts.tcp_mb,
        "udp_seconds": opts.udp_seconds,
        "trial_seconds": opts.trial_seconds,
        "ndr_loss": rate::NDR_LOSS,
        "pod_mtu": POD_MTU,
        "workers_per_podwire_node": opts.workers,
        "took_seconds": took.as_secs(),
        "modes": modes.iter().map(|m| m.mode.as_str()).collect::<Vec<_>>(),
        "workloads": workloads,
        "results": results,
        "packet_rate": packet_rate,
        "af_xdp": af_xdp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_a_cpu_reading_below_the_ticks_resolution_is_refused() {
        assert!(cpu_per_gbit(Duration::ZERO, 0.16).is_err());
        assert!(cpu_per_gbit(Duration::from_millis(90), 0.16).is_err());
        let got = cpu_per_gbit(Duration::from_millis(400), 0.2).unwrap();
        assert!((got - 2.0).abs() < 1e-9, "{got}");
    }

    #[test]
    fn test_median_and_modes() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        let lab = |m| lab_options(m, 1, Path::new("podwire"));
        assert!(lab(BenchMode::HostGw).direct_routing);
        assert!(lab(BenchMode::PodwireVxlan).conntrack);
        assert!(!lab(EXTRA_MODES[0]).conntrack);
        for m in MODES.into_iter().chain(EXTRA_MODES) {
            assert_eq!(lab(m).validate(), Ok(()), "{m}");
        }
    }

    /// Every mode by the name users type: the reference first, the extras after, and the
    /// options each name promises (`-xdp`: the underlay through AF_XDP, `-no-X`: without X).
    #[test]
    fn test_modes_are_named_as_typed_and_run_what_their_names_say() {
        use clap::ValueEnum;
        let all: Vec<BenchMode> = MODES.into_iter().chain(EXTRA_MODES).collect();
        assert_eq!(
            all,
            BenchMode::value_variants(),
            "every mode is listed once"
        );
        let names: Vec<String> = all.iter().map(BenchMode::to_string).collect();
        assert_eq!(
            names,
            [
                "kernel-vxlan",
                "podwire-vxlan",
                "podwire-vxlan-flow-ports",
                "podwire-udp",
                "host-gw",
                "podwire-vxlan-no-conntrack",
                "podwire-vxlan-no-gro",
                "podwire-vxlan-shared-queue",
                "podwire-vxlan-xdp",
                "podwire-vxlan-xdp-pods",
                "podwire-udp-xdp",
            ]
        );
        for (m, name) in all.into_iter().zip(&names) {
            let o = lab_options(m, 1, Path::new("podwire"));
            assert_eq!(o.io_xdp, name.contains("-xdp"), "{name}");
            assert_eq!(o.pod_xdp, name.ends_with("-xdp-pods"), "{name}");
            assert_eq!(o.conntrack, !name.ends_with("-no-conntrack"), "{name}");
            assert_eq!(o.udp_gro, !name.ends_with("-no-gro"), "{name}");
            assert_eq!(o.peer_queues, !name.ends_with("-shared-queue"), "{name}");
            let backend = if name.starts_with("podwire-udp") {
                Backend::Udp
            } else if name.starts_with("podwire-vxlan") {
                Backend::Vxlan
            } else {
                Backend::KernelVxlan
            };
            assert_eq!(o.backend, backend, "{name}");
        }
    }

    #[test]
    fn test_run_file_has_every_sample_and_its_source() {
        let opts = BenchOptions {
            rounds: 2,
            tcp_mb: 4,
            udp_seconds: 1.0,
            trial_seconds: 0.5,
            workers: 1,
            modes: vec![BenchMode::KernelVxlan, BenchMode::PodwireVxlan],
            out: PathBuf::new(),
            svg: PathBuf::new(),
            podwire: PathBuf::new(),
        };
        let trial = rate::Trial::one_second;
        let rates = rate::RateResult {
            max_offered: trial(200_000, 100_000),
            ndr: Some(trial(90_000, 90_000)),
            search: vec![trial(90_000, 90_000)],
        };
        let mut kernel = ModeSamples::new("kernel-vxlan");
        let mut podwire = ModeSamples::new("podwire-vxlan");
        for round in 0..2 {
            let f = round as f64;
            kernel.push(&[(Workload::Tcp1, 1000.0 + f), (Workload::CpuPerGbit, 1.0)]);
            kernel.push(&rate_figures(&rates));
            podwire.push(&[(Workload::Tcp1, 500.0 + f), (Workload::CpuPerGbit, 2.0)]);
            podwire.push(&rate_figures(&rates));
        }
        let mut ceiling = ModeSamples::new(CEILING);
        ceiling.push(&rate_figures(&rates));
        ceiling.rates.push(rates);
        let provenance = crate::run_record::Provenance::collect();
        let doc = run_file(
            &opts,
            &provenance,
            &[kernel, podwire],
            &ceiling,
            Duration::ZERO,
        );
        let find = |mode: &str, w: &str| {
            doc["results"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["mode"] == mode && r["workload"] == w)
                .unwrap_or_else(|| panic!("{mode} {w} missing"))
                .clone()
        };
        let tcp = find("podwire-vxlan", "tcp_1_stream");
        assert_eq!(tcp["samples"], json!([500.0, 501.0]));
        assert_eq!(
            (tcp["min"].as_f64(), tcp["max"].as_f64()),
            (Some(500.0), Some(501.0))
        );
        assert_eq!(tcp["median"], json!(500.5));
        assert_eq!(tcp["ratio_to_kernel_vxlan"], json!(0.5));
        let loss = find("podwire-vxlan", "udp_64b_loss");
        assert_eq!(loss["median"], json!(50.0));
        assert!(
            loss["ratio_to_kernel_vxlan"].is_null(),
            "a loss has no ratio"
        );
        assert_eq!(find(CEILING, "udp_64b_ndr")["median"], json!(90.0));
        assert_eq!(
            doc["packet_rate"][CEILING][0]["search"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        for key in ["commit", "date", "command", "machine"] {
            assert!(!doc[key].is_null(), "{key} missing");
        }
        assert_eq!(doc["pod_mtu"], json!(POD_MTU));
        let text = crate::figures::e2e_text(&doc).expect("the run file renders");
        assert!(text.contains("1000 (1.00x) [1000-1001]"), "{text}");
        // The ceiling's row, and the mode's loss at full rate naming the path as the limit.
        assert!(
            text.contains("generator's ceiling") && text.contains("path (loss)"),
            "{text}"
        );
    }
}
