//! `podwire-lab lab --soak SECS`: a fixed-rate UDP stream from pod 1 to pod 2, well under
//! capacity, for SECS seconds, while the node daemons' memory and descriptors are sampled.
//!
//! Every datagram carries a sequence number; the receiver counts each one once, so loss,
//! duplicates and reordering are exact. The figures: rate, duration, loss, RSS of each podwire
//! daemon at the start (after a 5 s warm-up) and at the end, and open descriptors at both ends.

use super::{netns, pod_ip, traffic, Check, Names};
use anyhow::{Context, Result};
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

const PORT: u16 = 5206;
const PAYLOAD: usize = 512;
/// Samples before this are the warm-up (allocations that happen once).
const WARM_UP: Duration = Duration::from_secs(5);

/// What a soak measured.
#[derive(Debug, Clone, Default)]
pub struct Soak {
    pub seconds: f64,
    pub pps: u32,
    pub sent: u64,
    pub received: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Per daemon: (node, RSS kB after warm-up, RSS kB at the end, max RSS kB, fds after
    /// warm-up, fds at the end).
    pub daemons: Vec<(usize, u64, u64, u64, usize, usize)>,
    /// Where the kernel counted drops meanwhile, if anywhere.
    pub kernel_drops: Vec<(String, u64)>,
}

/// The daemon's resident memory in kB (VmRSS of /proc/PID/status): a reading that cannot be
/// taken is an error, never 0 (a 0 would make any growth look flat).
fn rss_kb(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let s = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    vm_rss_kb(&s).with_context(|| format!("no VmRSS in {path}"))
}

fn vm_rss_kb(status: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The daemon's open descriptors (entries of /proc/PID/fd): an error if they cannot be listed.
fn fds(pid: u32) -> Result<usize> {
    let path = format!("/proc/{pid}/fd");
    let dir = std::fs::read_dir(&path).with_context(|| format!("listing {path}"))?;
    Ok(dir.count())
}

/// The fewest descriptors of three readings 20 ms apart: the daemon holds one for a moment
/// each second (its stats file is written to a temporary file, then renamed), which a single
/// reading can catch; a leaked descriptor stays in all three.
fn settled_fds(pid: u32) -> Result<usize> {
    let mut fewest = fds(pid)?;
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(20));
        fewest = fewest.min(fds(pid)?);
    }
    Ok(fewest)
}

/// One reading of every daemon: (RSS kB, descriptors).
fn sample(daemons: &[(usize, u32)]) -> Result<Vec<(u64, usize)>> {
    daemons
        .iter()
        .map(|&(node, pid)| {
            let read = || Ok::<_, anyhow::Error>((rss_kb(pid)?, settled_fds(pid)?));
            read().with_context(|| format!("soak: node {node}'s podwire (pid {pid})"))
        })
        .collect()
}

/// UDP receive-buffer drops in namespace `ns` (`RcvbufErrors` of /proc/net/snmp).
fn rcvbuf_errors(ns: &str) -> u64 {
    let Ok((_, text)) = netns::output_in(ns, &["cat", "/proc/net/snmp"]) else {
        return 0;
    };
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// TX drops of `dev` in namespace `ns` (a TUN whose reader fell behind drops here).
fn tx_dropped(ns: &str, dev: &str) -> u64 {
    let Ok((_, text)) = netns::output_in(ns, &["ip", "-j", "-s", "link", "show", dev]) else {
        return 0;
    };
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v[0]["stats64"]["tx"]["dropped"].as_u64())
        .unwrap_or(0)
}

/// Where the kernel dropped datagrams during the soak: (where, count) for each place looked at.
fn kernel_drops(r: &Names) -> Vec<(String, u64)> {
    let mut v = vec![
        ("pod 2 socket".to_string(), rcvbuf_errors(&r.ns("p2"))),
        ("node 2 sockets".to_string(), rcvbuf_errors(&r.ns("n2"))),
        ("node 1 sockets".to_string(), rcvbuf_errors(&r.ns("n1"))),
    ];
    for dev in ["flannel.1", "flannel0"] {
        v.push((format!("node 1 {dev} queue"), tx_dropped(&r.ns("n1"), dev)));
    }
    v
}

/// Runs the soak; `daemons` are (node, pid) of the podwire daemons to watch.
pub fn run(r: &Names, daemons: &[(usize, u32)], seconds: u64, pps: u32) -> Result<Soak> {
    let duration = Duration::from_secs(seconds);
    let drops_before = kernel_drops(r);
    let total = u64::from(pps) * seconds;
    let receiver =
        traffic::spawn_seq_receiver(&r.ns("p2"), SocketAddrV4::new(pod_ip(2), PORT), total)?;
    let sender = netns::spawn_in(&r.ns("p1"), move || {
        traffic::paced_seq_send(
            SocketAddrV4::new(pod_ip(1), 0),
            SocketAddrV4::new(pod_ip(2), PORT),
            pps,
            total,
            PAYLOAD,
        )
    });
    let started = Instant::now();
    let mut samples: Vec<Vec<(u64, usize)>> = vec![Vec::new(); daemons.len()];
    let mut baseline: Option<Vec<(u64, usize)>> = None;
    while started.elapsed() < duration {
        std::thread::sleep(Duration::from_secs(1));
        // The sender and receiver end by themselves (their count and deadline are bounded).
        let now = sample(daemons)?;
        if baseline.is_none() && started.elapsed() >= WARM_UP {
            baseline = Some(now.clone());
        }
        for (s, n) in samples.iter_mut().zip(now) {
            s.push(n);
        }
    }
    let sent = netns::join(sender)?;
    let traffic::SeqReceived {
        received,
        duplicates,
        reordered,
    } = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("soak receiver panicked"))?;
    let base = baseline.unwrap_or_else(|| samples.iter().map(|s| s[0]).collect());
    let daemons = daemons
        .iter()
        .zip(&samples)
        .zip(base)
        .map(|((&(node, _), s), (rss0, fd0))| {
            let (rss1, fd1) = *s.last().unwrap_or(&(0, 0));
            let max = s.iter().map(|x| x.0).max().unwrap_or(0);
            (node, rss0, rss1, max, fd0, fd1)
        })
        .collect();
    let kernel_drops = kernel_drops(r)
        .into_iter()
        .zip(drops_before)
        .map(|((w, after), (_, before))| (w, after.saturating_sub(before)))
        .filter(|(_, n)| *n > 0)
        .collect();
    Ok(Soak {
        kernel_drops,
        seconds: started.elapsed().as_secs_f64(),
        pps,
        sent,
        received,
        duplicates,
        reordered,
        daemons,
    })
}

/// The soak's checks: nothing lost, duplicated or reordered; memory flat (within 2 MB after
/// the warm-up); no descriptor leaked.
pub fn checks(s: &Soak) -> Vec<Check> {
    let flat = s
        .daemons
        .iter()
        .all(|d| d.2 <= d.1 + 2048 && d.3 <= d.1 + 4096);
    vec![
        Check {
            name: "soak: a fixed-rate UDP stream loses, duplicates and reorders nothing".into(),
            ok: s.sent > 0 && s.received == s.sent && s.duplicates == 0 && s.reordered == 0,
            detail: format!(
                "{} of {} datagrams at {} pps over {:.0} s; {} duplicates, {} reordered; kernel drops: {:?}",
                s.received, s.sent, s.pps, s.seconds, s.duplicates, s.reordered, s.kernel_drops
            ),
        },
        Check {
            name: "soak: daemon memory flat and no descriptor leaked".into(),
            ok: flat && s.daemons.iter().all(|d| d.5 <= d.4),
            detail: s
                .daemons
                .iter()
                .map(|(n, r0, r1, m, f0, f1)| {
                    format!("n{n}: RSS {r0} -> {r1} kB (max {m}), fds {f0} -> {f1}")
                })
                .collect::<Vec<_>>()
                .join("; "),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_readings_that_cannot_be_taken_are_errors() {
        let me = std::process::id();
        assert!(rss_kb(me).unwrap() > 0);
        assert!(fds(me).unwrap() > 0);
        // No such process (pid_max is at most 2^22): an error, not 0.
        let gone = u32::MAX;
        assert!(rss_kb(gone).is_err());
        assert!(fds(gone).is_err() && settled_fds(gone).is_err());
        let err = sample(&[(2, gone)]).unwrap_err();
        assert!(format!("{err:#}").contains("node 2"), "{err:#}");
        // A status without VmRSS (a kernel thread's) has no reading.
        assert_eq!(vm_rss_kb("Name:\tkthreadd\nState:\tS\n"), None);
        assert_eq!(vm_rss_kb("VmRSS:\t  1234 kB\n"), Some(1234));
    }
}
