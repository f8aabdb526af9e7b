//! `podwire-lab profile`: a whole-system profile while one mode carries one TCP stream, split by
//! where the time went (see `perf_split`), written as a run file.
//!
//! The cluster is the bench's for that mode. A stream runs for twice the profile's length plus
//! a second either side: first `perf stat -a` counts the machine's system calls by family
//! (`perf_syscalls`), then `perf record -a -g` (Debian's linux-perf) samples every CPU, and
//! `perf script` turns the samples into call chains to split. The two windows are apart so
//! that perf record's own writes are not counted.

use super::{lab_options, pod_ip, same_pod_mtu, set_up, traffic, with_lab, BenchMode};
use crate::cluster::netns;
use crate::perf_split::{self, Split};
use crate::perf_syscalls;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::{SocketAddrV4, TcpListener};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// What to profile.
#[derive(Debug, Clone)]
pub struct ProfileOptions {
    pub mode: BenchMode,
    /// Seconds recorded.
    pub seconds: u32,
    pub workers: usize,
    pub podwire: PathBuf,
    /// The run file (JSON); the raw perf data goes beside it (`.perf.data`).
    pub out: PathBuf,
}

/// Sampling rate: enough samples in a few seconds, little overhead.
const PERF_HZ: &str = "999";

pub fn run(opts: ProfileOptions) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("podwire-lab profile needs root (network namespaces, perf -a)");
    }
    if opts.seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    let perf_ok = Command::new("perf").arg("--version").output();
    if !perf_ok.is_ok_and(|o| o.status.success()) {
        bail!("perf is not installed (Debian: apt-get install linux-perf)");
    }
    let provenance = crate::run_record::Provenance::collect();
    let data = opts.out.with_extension("perf.data");
    let lab = lab_options(opts.mode, opts.workers, &opts.podwire);
    let (split, syscalls, mbps) = with_lab(
        &lab,
        |o| o.is_err(),
        |res, lab, exe| {
            let names = set_up(res, lab, exe, &mut serde_json::Map::new())?;
            same_pod_mtu(&names)?;
            profile_stream(&names, opts.seconds, &data)
        },
    )
    .with_context(|| format!("profiling {}", opts.mode))?;
    let doc = json!({
        "kind": "profile",
        "commit": provenance.commit,
        "dirty": provenance.dirty,
        "date": provenance.date,
        "command": provenance.command,
        "machine": provenance.machine,
        "mode": opts.mode.to_string(),
        "seconds": opts.seconds,
        "perf_hz": PERF_HZ,
        "workers_per_podwire_node": opts.workers,
        "tcp_mbps": mbps,
        "split": split,
        "syscalls": syscalls,
    });
    std::fs::write(&opts.out, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("writing {}", opts.out.display()))?;
    print!("{}", report(&opts, &split, mbps));
    print!("{}", syscall_report(&syscalls, opts.seconds, mbps));
    println!(
        "wrote {} (perf data: {})",
        opts.out.display(),
        data.display()
    );
    Ok(())
}

/// One TCP stream from pod 1 to pod 2 while perf counts the machine's system calls, then
/// records it: the system calls by family, the split of the samples, and the stream's rate.
fn profile_stream(
    names: &crate::cluster::Names,
    seconds: u32,
    data: &PathBuf,
) -> Result<(Split, BTreeMap<String, u64>, f64)> {
    let (src, dst) = (names.ns("p1"), names.ns("p2"));
    let timeout = Duration::from_secs(u64::from(seconds) + 30);
    let port = 5301;
    let l = netns::run_in(&dst, move || Ok(TcpListener::bind((pod_ip(2), port))?))?;
    let sink = netns::spawn_in(&dst, move || traffic::tcp_discard(l, timeout));
    let run_for = Duration::from_secs(2 * u64::from(seconds) + 2);
    let to = SocketAddrV4::new(pod_ip(2), port);
    let t0 = Instant::now();
    let source = netns::spawn_in(&src, move || traffic::tcp_blast_for(to, run_for, timeout));
    std::thread::sleep(Duration::from_secs(1));
    let syscalls = count_syscalls(seconds);
    let recorded = Command::new("perf")
        .args(["record", "-a", "-g", "-F", PERF_HZ, "-q", "-o"])
        .arg(data)
        .args(["--", "sleep", &seconds.to_string()])
        .status()
        .context("running perf record")?;
    netns::join(source)?;
    let bytes = netns::join(sink)?;
    let mbps = bytes as f64 * 8.0 / t0.elapsed().as_secs_f64() / 1e6;
    if !recorded.success() {
        bail!("perf record failed ({recorded})");
    }
    let syscalls = syscalls?;
    let script = Command::new("perf")
        .args(["script", "-F", "comm,tid,ip,sym,dso", "-i"])
        .arg(data)
        .output()
        .context("running perf script")?;
    if !script.status.success() {
        bail!(
            "perf script failed: {}",
            String::from_utf8_lossy(&script.stderr)
        );
    }
    let split = perf_split::split(&String::from_utf8_lossy(&script.stdout));
    if split.samples == 0 {
        bail!("perf recorded no samples");
    }
    Ok((split, syscalls, mbps))
}

/// System calls on the whole machine by family over `seconds` (`perf stat -a`).
fn count_syscalls(seconds: u32) -> Result<BTreeMap<String, u64>> {
    let out = Command::new("perf")
        .args(["stat", "-a", "-x,", "-e", &perf_syscalls::event_list()])
        .args(["--", "sleep", &seconds.to_string()])
        .output()
        .context("running perf stat")?;
    // perf stat prints its counts on stderr.
    let text = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("perf stat failed ({}): {text}", out.status);
    }
    Ok(perf_syscalls::parse(&text)?)
}

/// The system calls as text: per second, and per megabyte the stream moved.
fn syscall_report(counts: &BTreeMap<String, u64>, seconds: u32, mbps: f64) -> String {
    use std::fmt::Write as _;
    let mut out = String::from("\nsystem calls on the whole machine (per second, per MB moved):\n");
    let mb_per_s = mbps / 8.0;
    let mut rows: Vec<_> = counts.iter().filter(|(_, n)| **n > 0).collect();
    rows.sort_by(|a, b| b.1.cmp(a.1));
    for (family, n) in rows {
        let per_s = *n as f64 / f64::from(seconds);
        let _ = writeln!(
            out,
            "  {per_s:>10.0}/s  {:>8.1}/MB  {family}",
            per_s / mb_per_s
        );
    }
    out
}

/// The split as text: threads' shares of the machine, the workers' time by where it entered
/// the kernel, their top userspace symbols.
fn report(opts: &ProfileOptions, s: &Split, mbps: f64) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} for {} s, one TCP stream at {mbps:.0} Mbit/s, {} samples",
        opts.mode, opts.seconds, s.samples
    );
    let _ = writeln!(out, "\nshare of all samples, by thread:");
    for (k, pct) in perf_split::shares(&s.threads, s.samples).iter().take(12) {
        let _ = writeln!(out, "  {pct:5.1}%  {k}");
    }
    let worker_total: u64 = s.workers.values().sum();
    let _ = writeln!(
        out,
        "\npodwire workers' samples, by where they entered the kernel:"
    );
    for (k, pct) in perf_split::shares(&s.workers, worker_total) {
        let _ = writeln!(out, "  {pct:5.1}%  {k}");
    }
    let _ = writeln!(
        out,
        "\ntop userspace symbols (share of the workers' samples):"
    );
    for (k, pct) in perf_split::shares(&s.worker_symbols, worker_total)
        .iter()
        .take(15)
    {
        let _ = writeln!(out, "  {pct:5.1}%  {k}");
    }
    out
}
