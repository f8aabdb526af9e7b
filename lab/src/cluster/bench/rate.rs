//! The packet-rate workload, measured the way RFC 2544 and FD.io CSIT do: a trial offers
//! 64-byte datagrams (IP length) at a set rate for a set time and counts what arrives, so every
//! figure is an offered rate, a delivered rate and a loss. Two results per mode and round:
//!
//! - **max offered**: the generator unpaced (64 datagrams per `sendmmsg`, as fast as its socket
//!   takes them): what it can offer through this path, and what of it arrived;
//! - **no-drop rate (NDR)**: the highest offered rate whose loss is at most 0.1%, found by a
//!   search over paced trials between 0 and the max offered rate.
//!
//! The generator, the receiver and both nodes share the machine's cores, so the same workload is
//! also run pod to pod over one veth with no forwarding at all: the generator's and receiver's
//! own ceiling in the same run. A mode near that ceiling is limited by them, not by its path.
//!
//! Offered is what the generator's socket accepted (a blocking `sendmmsg`); delivered is what
//! the receiving socket read, counted until the path has been quiet for 300 ms.

use super::super::{netns, traffic};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Duration;

/// IP length of every datagram: RFC 2544's smallest frame less the Ethernet header and FCS
/// (64 - 14 - 4 = 46 would be the frame's; 64 bytes of IP is what the bench has always sent).
pub const IP_LEN: usize = 64;
/// The loss a trial may show and still pass the no-drop-rate search.
pub const NDR_LOSS: f64 = 0.001;
/// Trials of the search after the first; the search stops early once the bounds are 2% apart.
const SEARCH_TRIALS: usize = 7;
/// The receive buffer of the counting socket: large enough that the receiver's own bursts are
/// not what drops (the same in every mode and in the generator's ceiling).
const RCVBUF: usize = 8 << 20;

/// One trial: what was offered, what arrived.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Trial {
    /// The rate asked of the generator, packets per second; `None` for an unpaced trial.
    pub target_pps: Option<f64>,
    pub offered_pps: f64,
    pub delivered_pps: f64,
    pub sent: u64,
    pub received: u64,
    pub seconds: f64,
}

impl Trial {
    /// The fraction of what was offered that did not arrive (0 when nothing was offered).
    pub fn loss(&self) -> f64 {
        if self.sent == 0 {
            0.0
        } else {
            self.sent.saturating_sub(self.received) as f64 / self.sent as f64
        }
    }

    fn passes(&self) -> bool {
        self.sent > 0 && self.loss() <= NDR_LOSS
    }
}

/// The packet-rate results of one mode in one round.
#[derive(Debug, Clone, Serialize)]
pub struct RateResult {
    pub max_offered: Trial,
    /// The passing trial with the highest offered rate; `None` when no trial passed.
    pub ndr: Option<Trial>,
    /// Every trial of the search, in the order run.
    pub search: Vec<Trial>,
}

/// Where a trial's datagrams go and where they are counted.
pub struct Path {
    /// Namespace of the generator.
    pub src_ns: String,
    /// Namespace of the receiver.
    pub dst_ns: String,
    /// The receiver's address.
    pub dst: Ipv4Addr,
}

/// Max offered rate for `secs`, then the no-drop-rate search with trials of `trial_secs`.
pub fn measure(path: &Path, secs: f64, trial_secs: f64, first_port: u16) -> Result<RateResult> {
    let mut port = first_port;
    search(|target| {
        port = port.wrapping_add(1).max(1024);
        match target {
            None => trial(path, None, secs, port).context("unpaced trial"),
            Some(pps) => trial(path, Some(pps), trial_secs, port)
                .with_context(|| format!("trial at {pps:.0} pps")),
        }
    })
}

/// The unpaced trial, then the search: `run(None)` runs the unpaced trial, `run(Some(pps))`
/// a trial paced at `pps`.
fn search(mut run: impl FnMut(Option<f64>) -> Result<Trial>) -> Result<RateResult> {
    let mut run = move |target| run(target).and_then(refuse_duplicates);
    let max_offered = run(None)?;
    if max_offered.received == 0 {
        bail!(
            "no datagram arrived of {} offered at the generator's full rate",
            max_offered.sent
        );
    }
    let mut search = Vec::new();
    // Nothing was lost at the generator's full rate: that rate is the no-drop rate, and the
    // generator (with the path's work it does itself), not a queue on the path, is the limit.
    if max_offered.passes() {
        return Ok(RateResult {
            max_offered,
            ndr: Some(max_offered),
            search,
        });
    }
    // Start just below what arrived at full rate, then halve the interval each trial.
    let (mut lo, mut hi) = (0.0f64, max_offered.offered_pps);
    let mut target = (max_offered.delivered_pps * 0.95).min(hi);
    for _ in 0..=SEARCH_TRIALS {
        let t = run(Some(target))?;
        search.push(t);
        if t.passes() {
            lo = lo.max(target);
        } else {
            hi = hi.min(target);
        }
        if hi - lo <= 0.02 * hi {
            break;
        }
        target = (lo + hi) / 2.0;
    }
    let ndr = search
        .iter()
        .filter(|t| t.passes())
        .max_by(|a, b| a.offered_pps.total_cmp(&b.offered_pps))
        .copied();
    Ok(RateResult {
        max_offered,
        ndr,
        search,
    })
}

/// A trial that delivered more than it offered shows a path that duplicates datagrams: no
/// rate of it can be quoted (delivered would count the copies), so the bench stops there.
fn refuse_duplicates(t: Trial) -> Result<Trial> {
    if t.received > t.sent {
        bail!(
            "{} datagrams arrived of {} sent ({:.0} pps delivered of {:.0} offered): the path duplicates datagrams",
            t.received,
            t.sent,
            t.delivered_pps,
            t.offered_pps
        );
    }
    Ok(t)
}

/// One trial: datagrams to a fresh port (nothing of an earlier trial can be counted), at
/// `target_pps` or unpaced, for `secs`.
fn trial(path: &Path, target_pps: Option<f64>, secs: f64, port: u16) -> Result<Trial> {
    let to = SocketAddrV4::new(path.dst, port);
    let sock = netns::run_in(&path.dst_ns, move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
        // Forced (root): rmem_max does not cap it, so every mode gets the same buffer.
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBufForce, &RCVBUF)?;
        s.bind(&to.into())?;
        s.set_nonblocking(true)?;
        Ok(UdpSocket::from(s))
    })?;
    let duration = Duration::from_secs_f64(secs);
    let sink = netns::spawn_in(&path.dst_ns, move || {
        traffic::udp_count(
            sock,
            Duration::from_millis(300),
            duration * 3 + Duration::from_secs(2),
        )
    });
    let (sent, took) = netns::run_in(&path.src_ns, move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        Ok(traffic::blast_from(
            &s,
            &[0x5a; IP_LEN - 28],
            to,
            target_pps,
            duration,
        ))
    })?;
    let got = netns::join(sink)?;
    let seconds = took.as_secs_f64().max(1e-3);
    Ok(Trial {
        target_pps,
        offered_pps: sent as f64 / seconds,
        // Over the sending time, so a lossless trial delivers what it offered.
        delivered_pps: got as f64 / seconds,
        sent,
        received: got,
        seconds,
    })
}

/// Two namespaces joined by one veth, no forwarding between them: where the generator's and the
/// receiver's own ceiling is measured. Removed on drop.
pub struct DirectPair {
    pub path: Path,
}

impl DirectPair {
    /// Creates `<prefix>-ga` and `<prefix>-gb` with a veth between them, MTU `mtu`.
    pub fn create(prefix: &str, mtu: u32) -> Result<DirectPair> {
        let (a, b) = (format!("{prefix}-ga"), format!("{prefix}-gb"));
        let pair = DirectPair {
            path: Path {
                src_ns: a.clone(),
                dst_ns: b.clone(),
                dst: Ipv4Addr::new(192, 168, 77, 2),
            },
        };
        let mtu = mtu.to_string();
        netns::ip(&["netns", "add", &a])?;
        netns::ip(&["netns", "add", &b])?;
        netns::ip_in(
            &a,
            &[
                "link", "add", "eth0", "mtu", &mtu, "type", "veth", "peer", "name", "eth0",
                "netns", &b, "mtu", &mtu,
            ],
        )?;
        for (ns, addr) in [(&a, "192.168.77.1/24"), (&b, "192.168.77.2/24")] {
            netns::ip_in(ns, &["addr", "add", addr, "dev", "eth0"])?;
            netns::ip_in(ns, &["link", "set", "eth0", "up"])?;
            netns::ip_in(ns, &["link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }
}

impl Drop for DirectPair {
    fn drop(&mut self) {
        netns::delete(&self.path.src_ns);
        netns::delete(&self.path.dst_ns);
    }
}

#[cfg(test)]
impl Trial {
    /// An unpaced one-second trial that sent `sent` datagrams and got `received` of them.
    pub fn one_second(sent: u64, received: u64) -> Trial {
        Trial {
            target_pps: None,
            offered_pps: sent as f64,
            delivered_pps: received as f64,
            sent,
            received,
            seconds: 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path that carries up to `capacity` pps and loses what is above it; the generator
    /// reaches `generator` pps at most.
    fn path(capacity: f64, generator: f64) -> impl FnMut(Option<f64>) -> Result<Trial> {
        move |target| {
            let offered = target.unwrap_or(generator).min(generator);
            let delivered = offered.min(capacity);
            Ok(Trial {
                target_pps: target,
                offered_pps: offered,
                delivered_pps: delivered,
                sent: offered as u64,
                received: delivered as u64,
                seconds: 1.0,
            })
        }
    }

    #[test]
    fn test_search_finds_the_no_drop_rate() {
        let r = search(path(80_000.0, 200_000.0)).unwrap();
        assert_eq!(r.max_offered.offered_pps, 200_000.0);
        assert!((r.max_offered.loss() - 0.6).abs() < 1e-9);
        let ndr = r.ndr.expect("a trial passed");
        // Within the search's 2% resolution below the path's capacity, never above it.
        assert!(
            ndr.offered_pps <= 80_000.0 && ndr.offered_pps >= 78_400.0,
            "{ndr:?}"
        );
        assert!(r.search.len() <= SEARCH_TRIALS + 1);
        assert!(r.search.iter().any(|t| !t.passes()), "the search saw loss");
    }

    #[test]
    fn test_no_loss_at_full_rate_is_the_generators_limit() {
        let r = search(path(1e9, 50_000.0)).unwrap();
        assert!(r.search.is_empty());
        assert_eq!(r.ndr.unwrap().offered_pps, 50_000.0);
    }

    #[test]
    fn test_nothing_through_is_an_error_and_all_loss_no_ndr() {
        assert!(search(path(0.0, 50_000.0)).is_err());
        // A path that loses a little at any rate: no trial passes, no no-drop rate.
        let lossy = |target: Option<f64>| {
            let offered = target.unwrap_or(50_000.0);
            Ok(Trial {
                target_pps: target,
                offered_pps: offered,
                delivered_pps: offered * 0.99,
                sent: offered as u64,
                received: (offered * 0.99) as u64,
                seconds: 1.0,
            })
        };
        let r = search(lossy).unwrap();
        assert!(r.ndr.is_none() && !r.search.is_empty());
    }

    #[test]
    fn test_loss_and_pass() {
        assert_eq!(Trial::one_second(0, 0).loss(), 0.0);
        assert!(
            !Trial::one_second(0, 0).passes(),
            "a trial that offered nothing proves nothing"
        );
        assert!(Trial::one_second(100_000, 99_900).passes());
        assert!(!Trial::one_second(100_000, 99_899).passes());
        assert_eq!(Trial::one_second(1000, 500).loss(), 0.5);
        // More arriving than sent (a duplicate) is no loss, not a negative one.
        assert_eq!(Trial::one_second(10, 12).loss(), 0.0);
    }

    /// A path that duplicates datagrams delivers more than was offered: the bench refuses
    /// to quote it, whether at full rate or in the search.
    #[test]
    fn test_a_trial_that_delivers_more_than_it_offered_stops_the_bench() {
        let err = search(|_| Ok(Trial::one_second(402_000, 448_000))).unwrap_err();
        assert!(err.to_string().contains("duplicates"), "{err}");
        let mut trials = 0;
        let later = search(|target| {
            trials += 1;
            Ok(match target {
                None => Trial::one_second(100_000, 50_000),
                Some(pps) => Trial::one_second(pps as u64, pps as u64 + 1),
            })
        });
        assert!(later.is_err() && trials == 2);
    }
}
