//! Offline replay: a capture through the same pipeline the workers run, with pcap ports, in
//! routed mode ([`replay`], [`replay_with`]) or L2 mode ([`replay_bridged`]).

use crate::batch::Batch;
use crate::bridge::{self, Bridge, BridgeError, PortId, PortOptions, Station};
use crate::pipeline::{self, BridgeIngress, Direction, Flows, Tables};
use crate::port::pcap::{PcapSink, PcapSource, Side};
use crate::port::{PortError, RxPort, TxPort};
use crate::stats::{Counter, LocalStats};
use crate::verdict::{DropReason, Verdict};
use crate::wire::{vxlan, MacAddr};
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
                Verdict::ToTun | Verdict::IcmpToTun | Verdict::ResetToTun => {
                    stats.add(Counter::TxTun, 1);
                    match batch.meta(i).verdict {
                        Verdict::IcmpToTun => stats.add(Counter::IcmpUnreachable, 1),
                        Verdict::ResetToTun => stats.add(Counter::TcpResets, 1),
                        _ => {}
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

/// Why an L2 replay failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Port(#[from] PortError),
    #[error("bridge port {index}: {source}")]
    Bridge { index: usize, source: BridgeError },
}

/// A local port of the bridge an L2 replay runs: its station's MAC (installed as a static
/// entry) and whether it is the host's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BridgePort {
    pub mac: MacAddr,
    pub host: bool,
}

/// The bridge an L2 replay runs: `ports` attached in order, each with its station as a static
/// entry, and the VTEPs and peers' entries of `tables` (as the L2 worker syncs them).
fn bridge_of(
    tables: &Tables,
    ports: &[BridgePort],
) -> Result<(Bridge, Option<vxlan::Vni>, Vec<PortId>), ReplayError> {
    let mut installed = Vec::new();
    let mut bridge = Bridge::new(bridge::Config::default(), ports.len() + tables.map.len());
    let vni = pipeline::sync_peers(&mut bridge, tables, &mut installed);
    let mut ids = Vec::with_capacity(ports.len());
    for (index, p) in ports.iter().enumerate() {
        let options = PortOptions {
            host: p.host,
            ..PortOptions::default()
        };
        let added = bridge
            .add_port(options)
            .and_then(|id| bridge.add_static(p.mac, Station::Port(id)).map(|()| id));
        ids.push(added.map_err(|source| ReplayError::Bridge { index, source })?);
    }
    Ok((bridge, vni, ids))
}

/// L2 mode: runs the records of `input` through the bridge's decisions, as the L2 worker does,
/// with a bridge of `ports` (attached in order: ids 1, 2, ...) and the VTEPs and peers' static
/// entries of `tables`. `from` says where every record comes from: frames from a port (link
/// type ETHERNET), or VXLAN datagrams from the underlay (outer IPv4/UDP to our VXLAN port).
/// Writes what leaves into `out_dir`: `underlay.pcap` (the datagrams our VXLAN socket sends,
/// each flood copy once per VTEP) and `port<N>.pcap` (the frames out of port N).
pub fn replay_bridged(
    tables: &Tables,
    ports: &[BridgePort],
    from: BridgeIngress,
    input: &Path,
    out_dir: &Path,
) -> Result<ReplayReport, ReplayError> {
    let (mut bridge, vni, ids) = bridge_of(tables, ports)?;
    let local_udp = SocketAddrV4::new(tables.local.public_ip, tables.peer_port);
    let side = match from {
        BridgeIngress::Port(_) => Side::Frames,
        BridgeIngress::Underlay => Side::Underlay { local: local_udp },
    };
    let mut source = PcapSource::open(input, side)?;
    let mut tunnel = PcapSink::create(&out_dir.join("underlay.pcap"), tables.local.public_ip)?;
    let mut sinks = ids
        .iter()
        .map(|id| PcapSink::create_frames(&out_dir.join(format!("port{}.pcap", id.0))))
        .collect::<Result<Vec<_>, _>>()?;
    let mut batch = Batch::new(64, 65536 + crate::batch::HEADROOM);
    let mut stats = LocalStats::default();
    while source.rx_batch(&mut batch)? > 0 {
        let rx = match from {
            BridgeIngress::Port(_) => Counter::RxTap,
            BridgeIngress::Underlay => Counter::RxUnderlay,
        };
        stats.add(rx, batch.len() as u64);
        let now = source.last_time.as_millis() as u64;
        pipeline::process_bridged(&mut bridge, vni, from, &mut batch, now);
        for i in 0..batch.len() {
            let (out_ports, vteps): (Vec<PortId>, Vec<_>) = match batch.meta(i).verdict {
                Verdict::ToPort(p) => (vec![p], vec![]),
                Verdict::ToPeer(ip) => (vec![], vec![ip]),
                Verdict::Flood => {
                    let ingress = match from {
                        BridgeIngress::Port(p) => Station::Port(p),
                        BridgeIngress::Underlay => Station::Remote(*batch.meta(i).peer.ip()),
                    };
                    let to_tunnel = Bridge::floods_to_tunnel(ingress);
                    (
                        bridge.flood_ports(ingress, batch.packet(i)).collect(),
                        if to_tunnel {
                            bridge.vteps().to_vec()
                        } else {
                            vec![]
                        },
                    )
                }
                Verdict::Drop(r) => {
                    stats.drop(r);
                    continue;
                }
                // Routed mode's verdicts: the bridge gives none.
                _ => continue,
            };
            let idx = [i as u16];
            let mut failed = 0;
            for p in out_ports {
                if let Some(k) = ids.iter().position(|&id| id == p) {
                    let out = sinks[k].as_is().tx_batch(&batch, &idx);
                    stats.add(Counter::TxTap, out.sent as u64);
                    failed += out.failed;
                }
            }
            if let (Some(vni), false) = (vni, vteps.is_empty()) {
                // Into the tunnel, as the worker sends it: a VXLAN header in front of the frame.
                let (slot, meta) = batch.slot_mut(i);
                meta.start -= vxlan::HEADER_LEN;
                meta.len += vxlan::HEADER_LEN;
                vxlan::Repr { vni }.emit(&mut slot[meta.start..]);
                for ip in vteps {
                    batch.slot_mut(i).1.peer = SocketAddrV4::new(ip, tables.peer_port);
                    let out = tunnel.underlay(local_udp.port()).tx_batch(&batch, &idx);
                    stats.add(Counter::TxUnderlay, out.sent as u64);
                    failed += out.failed;
                }
            }
            for _ in 0..failed {
                stats.drop(DropReason::TxError);
            }
        }
    }
    let written = tunnel.written + sinks.iter().map(|s| s.written).sum::<u64>();
    let report = ReplayReport {
        records: source.records,
        skipped: source.skipped,
        written,
        stats,
    };
    tunnel.finish()?;
    for s in sinks {
        s.finish()?;
    }
    Ok(report)
}
