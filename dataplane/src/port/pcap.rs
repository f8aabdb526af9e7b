//! Capture files as ports, so the pipeline runs offline on recorded traffic.
//!
//! Files use link type RAW (101): every record is an IPv4 packet. On the TUN side a record is
//! the packet itself. On the underlay side a record is the whole outer IPv4/UDP datagram: the
//! source strips it (keeping only datagrams addressed to our socket, as the kernel would) and the
//! sink synthesises it for what we send, the way the kernel's UDP stack would for our socket:
//! TTL 64, DF set, IP ID 0, UDP checksum filled.

use super::{PortError, RxPort, TxOutcome, TxPort};
use crate::batch::Batch;
use crate::wire::{ipv4, udp, IpProtocol};
use core::net::{Ipv4Addr, SocketAddrV4};
use core::time::Duration;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapReader, PcapWriter};
use pcap_file::DataLink;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter};
use std::path::Path;

/// Which side of the node a capture was taken on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Raw inner IPv4 packets, as read from or written to the TUN device.
    Tun,
    /// Whole link-layer frames, as read from a bridge port (L2 mode): nothing stripped.
    Frames,
    /// Outer IPv4/UDP datagrams to or from this socket address.
    Underlay { local: SocketAddrV4 },
    /// Both, interleaved in time order: a record that is an IPv4/UDP datagram to `local` came
    /// from the underlay, any other from the TUN. Batches hold one record each, so a stateful
    /// replay sees them in order ([`PcapSource::last_from_underlay`]).
    Both { local: SocketAddrV4 },
}

/// Outer TTL of datagrams the kernel sends for our socket (the default hop limit).
pub const OUTER_TTL: u8 = 64;

/// A pcapng file's first bytes (its Section Header Block's type), the same in either byte order.
const PCAPNG_MAGIC: [u8; 4] = [0x0a, 0x0d, 0x0d, 0x0a];

fn pcap_err(e: impl std::fmt::Display) -> PortError {
    PortError::Pcap(e.to_string())
}

/// Reads a capture file as a receive port.
pub struct PcapSource {
    reader: PcapReader<BufReader<File>>,
    side: Side,
    strip: usize,
    /// Records skipped because they were not IPv4/UDP to our socket (underlay side only).
    pub skipped: u64,
    /// Records read.
    pub records: u64,
    /// Whether the last record read came from the underlay (`Side::Both`).
    pub last_from_underlay: bool,
    /// Capture time of the last record read.
    pub last_time: Duration,
}

impl PcapSource {
    pub fn open(path: &Path, side: Side) -> Result<PcapSource, PortError> {
        let file = File::open(path).map_err(|source| PortError::Open {
            what: path.display().to_string(),
            source,
        })?;
        let mut file = BufReader::new(file);
        let named = |e: String| PortError::Pcap(format!("{}: {e}", path.display()));
        if file
            .fill_buf()
            .map_err(|e| named(e.to_string()))?
            .starts_with(&PCAPNG_MAGIC)
        {
            return Err(named(
                "a pcapng file (tshark's and dumpcap's default); podwire reads pcap: convert it \
                 with `editcap -F pcap IN OUT`, or capture with `tshark -F pcap -w FILE`"
                    .into(),
            ));
        }
        let reader = PcapReader::new(file).map_err(|e| named(e.to_string()))?;
        let strip = match reader.header().datalink {
            _ if side == Side::Frames => 0,
            DataLink::RAW | DataLink::IPV4 => 0,
            DataLink::ETHERNET => crate::wire::ethernet::HEADER_LEN,
            other => {
                return Err(named(format!(
                    "unsupported link type {other:?} (want RAW or ETHERNET)"
                )))
            }
        };
        Ok(PcapSource {
            reader,
            side,
            strip,
            skipped: 0,
            records: 0,
            last_from_underlay: false,
            last_time: Duration::ZERO,
        })
    }

    /// The next record's bytes after the link header, or None at the end of the file.
    fn next_record(&mut self) -> Option<Result<Vec<u8>, PortError>> {
        let pkt = match self.reader.next_packet()? {
            Ok(p) => p,
            Err(e) => return Some(Err(pcap_err(e))),
        };
        self.records += 1;
        self.last_time = pkt.timestamp;
        Some(Ok(pkt.data.get(self.strip..).unwrap_or_default().to_vec()))
    }
}

/// The UDP payload and source of `outer` if it is an IPv4/UDP datagram to `local`.
fn strip_outer(outer: &[u8], local: SocketAddrV4) -> Option<(&[u8], SocketAddrV4)> {
    let ip = ipv4::Packet::new_checked(outer).ok()?;
    if ip.protocol() != IpProtocol::Udp || ip.dst() != *local.ip() || ip.is_non_first_fragment() {
        return None;
    }
    let src = ip.src();
    let dgram = udp::Packet::new_checked(ip.payload()).ok()?;
    if dgram.dst_port() != local.port() {
        return None;
    }
    let payload_at = ip.header_len() + udp::HEADER_LEN;
    let payload_len = dgram.payload().len();
    Some((
        &outer[payload_at..payload_at + payload_len],
        SocketAddrV4::new(src, dgram.src_port()),
    ))
}

impl RxPort for PcapSource {
    fn rx_batch(&mut self, batch: &mut Batch) -> Result<usize, PortError> {
        batch.clear();
        let mut i = 0;
        let one_each = matches!(self.side, Side::Both { .. });
        while i < batch.capacity() && !(one_each && i == 1) {
            let record = match self.next_record() {
                None => break,
                Some(r) => r?,
            };
            let (data, peer) = match self.side {
                Side::Tun | Side::Frames => {
                    (&record[..], SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))
                }
                Side::Underlay { local } => match strip_outer(&record, local) {
                    Some(x) => x,
                    None => {
                        self.skipped += 1;
                        continue;
                    }
                },
                Side::Both { local } => {
                    let outer = strip_outer(&record, local);
                    self.last_from_underlay = outer.is_some();
                    outer.unwrap_or((&record[..], SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)))
                }
            };
            let slot = batch.rx_slot(i);
            let n = data.len().min(slot.len());
            slot[..n].copy_from_slice(&data[..n]);
            batch.commit_rx(i, data.len(), peer, data.len() > n);
            i += 1;
        }
        Ok(batch.len())
    }
}

/// Writes what would leave the node into one capture file.
pub struct PcapSink {
    writer: PcapWriter<BufWriter<File>>,
    local: Ipv4Addr,
    pub written: u64,
}

impl PcapSink {
    /// Creates `path`; underlay datagrams get `local` as their outer source.
    pub fn create(path: &Path, local: Ipv4Addr) -> Result<PcapSink, PortError> {
        PcapSink::create_as(path, local, DataLink::RAW)
    }

    /// Creates `path` for whole Ethernet frames (what leaves by a bridge port, L2 mode), written
    /// as they are ([`PcapSink::as_is`]).
    pub fn create_frames(path: &Path) -> Result<PcapSink, PortError> {
        PcapSink::create_as(path, Ipv4Addr::UNSPECIFIED, DataLink::ETHERNET)
    }

    fn create_as(path: &Path, local: Ipv4Addr, datalink: DataLink) -> Result<PcapSink, PortError> {
        let file = File::create(path).map_err(|source| PortError::Open {
            what: path.display().to_string(),
            source,
        })?;
        let header = PcapHeader {
            datalink,
            ..PcapHeader::default()
        };
        let writer = PcapWriter::with_header(BufWriter::new(file), header).map_err(pcap_err)?;
        Ok(PcapSink {
            writer,
            local,
            written: 0,
        })
    }

    fn write(&mut self, data: &[u8]) -> bool {
        let ok = self
            .writer
            .write_packet(&PcapPacket::new(Duration::ZERO, data.len() as u32, data))
            .is_ok();
        self.written += u64::from(ok);
        ok
    }

    /// A transmit port writing packets as they are: inner packets for the TUN, or outer packets
    /// whose headers the pipeline wrote (VXLAN).
    pub fn as_is(&mut self) -> PcapTx<'_> {
        PcapTx {
            sink: self,
            underlay: None,
        }
    }

    /// A transmit port writing outer IPv4/UDP datagrams from `local_port` to each packet's peer.
    pub fn underlay(&mut self, local_port: u16) -> PcapTx<'_> {
        PcapTx {
            sink: self,
            underlay: Some(local_port),
        }
    }

    pub fn finish(self) -> Result<(), PortError> {
        let mut inner = self.writer.into_writer();
        std::io::Write::flush(&mut inner).map_err(pcap_err)
    }
}

/// One side of a `PcapSink` as a transmit port.
pub struct PcapTx<'a> {
    sink: &'a mut PcapSink,
    /// `Some(local UDP port)` for the underlay side.
    underlay: Option<u16>,
}

impl TxPort for PcapTx<'_> {
    fn tx_batch(&mut self, batch: &Batch, indices: &[u16]) -> TxOutcome {
        let mut out = TxOutcome::default();
        for &i in indices {
            let i = usize::from(i);
            let pkt = batch.packet(i);
            let ok = if let Some(local_port) = self.underlay {
                let frame = outer_datagram(self.sink.local, local_port, batch.meta(i).peer, pkt);
                self.sink.write(&frame)
            } else {
                self.sink.write(pkt)
            };
            if ok {
                out.sent += 1;
            } else {
                out.failed += 1;
            }
        }
        out
    }
}

/// The IPv4/UDP datagram the kernel would emit for `payload` sent from `src:src_port` to `dst`.
pub fn outer_datagram(src: Ipv4Addr, src_port: u16, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let udp_len = udp::HEADER_LEN + payload.len();
    let mut frame = vec![0u8; ipv4::HEADER_LEN + udp_len];
    frame[ipv4::HEADER_LEN + udp::HEADER_LEN..].copy_from_slice(payload);
    udp::Repr {
        src_port,
        dst_port: dst.port(),
        payload_len: payload.len(),
    }
    .emit(&mut frame[ipv4::HEADER_LEN..], src, *dst.ip());
    ipv4::Repr {
        src,
        dst: *dst.ip(),
        protocol: IpProtocol::Udp,
        payload_len: udp_len,
        ttl: OUTER_TTL,
        dscp_ecn: 0,
        ident: 0,
        dont_frag: true,
    }
    .emit(&mut frame);
    frame
}

#[cfg(test)]
mod tests {

    /// A file that is not pcap is named in the error; pcapng gets the conversion hint.
    #[test]
    fn test_a_file_that_is_not_pcap_is_named_with_a_hint() {
        let dir = std::env::temp_dir().join(format!("podwire-pcap-magic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ng = dir.join("capture.pcapng");
        std::fs::write(
            &ng,
            [
                0x0a, 0x0d, 0x0d, 0x0a, 0x1c, 0, 0, 0, 0x4d, 0x3c, 0x2b, 0x1a,
            ],
        )
        .unwrap();
        let err = PcapSource::open(&ng, Side::Tun).err().unwrap().to_string();
        assert!(err.contains("capture.pcapng"), "{err}");
        assert!(err.contains("editcap -F pcap"), "{err}");
        let junk = dir.join("notes.txt");
        std::fs::write(&junk, b"hello, not a capture at all").unwrap();
        let err = PcapSource::open(&junk, Side::Tun)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("notes.txt"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    use super::*;

    #[test]
    fn test_outer_datagram_matches_etherparse() {
        let src = Ipv4Addr::new(192, 168, 100, 1);
        let dst = SocketAddrV4::new(Ipv4Addr::new(192, 168, 100, 2), 8285);
        let ours = outer_datagram(src, 8285, dst, b"inner");
        let mut theirs = Vec::new();
        let mut ip = etherparse::Ipv4Header::new(
            0,
            OUTER_TTL,
            etherparse::IpNumber::UDP,
            src.octets(),
            dst.ip().octets(),
        )
        .unwrap();
        ip.dont_fragment = true;
        etherparse::PacketBuilder::ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
            .udp(8285, 8285)
            .write(&mut theirs, b"inner")
            .unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn test_strip_outer_keeps_only_ours() {
        let local = SocketAddrV4::new(Ipv4Addr::new(192, 168, 100, 2), 8285);
        let from = SocketAddrV4::new(Ipv4Addr::new(192, 168, 100, 1), 8285);
        let frame = outer_datagram(*from.ip(), 8285, local, b"abc");
        assert_eq!(strip_outer(&frame, local), Some((&b"abc"[..], from)));
        let other = SocketAddrV4::new(*local.ip(), 9999);
        assert_eq!(strip_outer(&frame, other), None);
        assert_eq!(strip_outer(&frame[..20], local), None);
    }
}
