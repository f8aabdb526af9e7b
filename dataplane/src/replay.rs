//! Offline replay: a capture through the same pipeline the workers run, with pcap ports.

use crate::batch::Batch;
use crate::pipeline::{self, Direction, Flows, Tables};
use crate::port::pcap::{PcapSink, PcapSource, Side};
use crate::port::{PortError, RxPort, TxPort};
use crate::stats::{Counter, LocalStats};
use crate::verdict::{DropReason, Verdict};
use core::net::SocketAddrV4;
use std::path::Path;

/// What a replay did.
#[derive(Debug, Clone, Default)]
pub struct ReplayReport {
    /// Records read from the input.
    pub records: u64,
    /// Underlay records that were not IPv4/UDP to our socket (not handed to the pipeline).
    pub skipped: u64,
    /// Records written to the output.
    pub written: u64,
    /// Counters and drops by reason, as a worker would count them.
    pub stats: LocalStats,
}

impl ReplayReport {
    /// Drops by reason with a non-zero count, in `DropReason::ALL` order.
    pub fn drops(&self) -> Vec<(DropReason, u64)> {
        DropReason::ALL
            .iter()
            .map(|&r| (r, self.stats.drops(r)))
            .filter(|&(_, n)| n > 0)
            .collect()
    }
}

/// Runs the frames of `input`, captured on side `from`, through the pipeline and writes what
/// would leave the node (to the underlay or into the TUN) to `output`, in order.
pub fn replay(
    tables: &Tables,
    from: Direction,
    input: &Path,
    output: &Path,
) -> Result<ReplayReport, PortError> {
    replay_with(tables, None, Some(from), input, output)
}

/// As [`replay`], optionally with connection tracking and services (`flows`, timed by the
/// records' capture times), and with `from` None for a capture of both sides interleaved
/// (`Side::Both`), one record at a time.
pub fn replay_with(
    tables: &Tables,
    flows: Option<&Flows>,
    from: Option<Direction>,
    input: &Path,
    output: &Path,
) -> Result<ReplayReport, PortError> {
    let local_udp = SocketAddrV4::new(tables.local.public_ip, tables.peer_port);
    let side = match from {
        Some(Direction::FromTun) => Side::Tun,
        Some(Direction::FromUnderlay) => Side::Underlay { local: local_udp },
        None => Side::Both { local: local_udp },
    };
    let mut source = PcapSource::open(input, side)?;
    let mut sink = PcapSink::create(output, tables.local.public_ip)?;
    let mut batch = Batch::new(64, 65536 + crate::batch::HEADROOM);
    let mut stats = LocalStats::default();
    while source.rx_batch(&mut batch)? > 0 {
        let dir = from.unwrap_or(if source.last_from_underlay {
            Direction::FromUnderlay
        } else {
            Direction::FromTun
        });
        let rx_counter = match dir {
            Direction::FromTun => Counter::RxTun,
            Direction::FromUnderlay => Counter::RxUnderlay,
        };
        stats.add(rx_counter, batch.len() as u64);
        let now = source.last_time.as_millis() as u64;
        pipeline::process_with(tables, flows, now, dir, &mut batch);
        // One packet at a time so the output keeps the input's order across both sides.
        for i in 0..batch.len() {
            let idx = [i as u16];
            let outcome = match batch.meta(i).verdict {
                Verdict::ToUnderlay(_) => {
                    stats.add(Counter::TxUnderlay, 1);
                    sink.underlay(local_udp.port()).tx_batch(&batch, &idx)
                }
                Verdict::ToUnderlayIp(_) => {
                    stats.add(Counter::TxUnderlay, 1);
                    sink.as_is().tx_batch(&batch, &idx)
                }
                Verdict::ToWire(_) => {
                    stats.add(Counter::TxWire, 1);
                    sink.as_is().tx_batch(&batch, &idx)
                }
                Verdict::ToTun | Verdict::IcmpToTun => {
                    stats.add(Counter::TxTun, 1);
                    if batch.meta(i).verdict == Verdict::IcmpToTun {
                        stats.add(Counter::IcmpUnreachable, 1);
                    }
                    sink.as_is().tx_batch(&batch, &idx)
                }
                Verdict::Drop(r) => {
                    stats.drop(r);
                    continue;
                }
                // L2 mode's verdicts: the routed pipeline gives none.
                Verdict::ToPort(_) | Verdict::ToPeer(_) | Verdict::Flood | Verdict::Pending => {
                    continue
                }
            };
            for _ in 0..outcome.failed {
                stats.drop(DropReason::TxError);
            }
        }
    }
    let report = ReplayReport {
        records: source.records,
        skipped: source.skipped,
        written: sink.written,
        stats,
    };
    sink.finish()?;
    Ok(report)
}
