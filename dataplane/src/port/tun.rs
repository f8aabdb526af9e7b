//! TUN device queues (IFF_TUN | IFF_NO_PI, multi-queue): one queue per worker.
//!
//! A TUN fd moves one frame per read(2)/write(2); a batch is filled by reading until EAGAIN or
//! the batch is full. The device disappears when its last queue is closed, taking its addresses
//! and routes with it, so dropping the queues is the cleanup.
//!
//! **Offload** (`IFF_VNET_HDR` + `TUNSETOFFLOAD` CSUM|TSO4|TSO_ECN, and USO4 where the kernel
//! has it): every frame carries a virtio-net header, and the kernel may hand over TCP and UDP
//! superframes of up to 64 KiB and packets with partial checksums, as it would to a NIC with
//! TSO and USO. One read then brings up to ~45 MTU
//! packets' worth, which the port segments into the batch itself ([`crate::wire::vnet`]), so
//! the pods' TCP sends big frames and the TUN costs one syscall per superframe instead of per
//! packet. Writes carry a plain header. If the kernel refuses the offload, the device is
//! opened without it.

use super::{PortError, RxPort, TxOutcome, TxPort};
use crate::batch::Batch;
use crate::offload::{coalesce, segment};
use crate::sys;
use crate::wire::vnet::{self, VnetHeader};
use core::net::{Ipv4Addr, SocketAddrV4};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// One queue of a TUN device.
#[derive(Debug)]
pub struct TunQueue {
    fd: OwnedFd,
    offload: Option<Box<OffloadState>>,
}

/// A superframe read buffer, and a frame read but not yet segmented (it did not fit the batch).
#[derive(Debug)]
struct OffloadState {
    frame: Vec<u8>,
    pending: Option<usize>,
    coalescer: coalesce::TcpCoalescer,
}

const FRAME_MAX: usize = vnet::HEADER_LEN + 65_535;

/// Opens `queues` queues of the TUN device `name` (created if needed); returns them, the
/// device's actual name, and whether offload is on (asked for and granted by the kernel).
pub fn open(
    name: &str,
    queues: usize,
    offload: bool,
) -> Result<(Vec<TunQueue>, String, bool), PortError> {
    if offload {
        match open_with(name, queues, true) {
            Ok(r) => return Ok((r.0, r.1, true)),
            Err(PortError::Open { .. }) => {} // kernel without TUN offload: plain queues
            Err(e) => return Err(e),
        }
    }
    open_with(name, queues, false).map(|(q, n)| (q, n, false))
}

fn open_with(
    name: &str,
    queues: usize,
    offload: bool,
) -> Result<(Vec<TunQueue>, String), PortError> {
    let mut out = Vec::with_capacity(queues);
    let mut actual = name.to_string();
    for _ in 0..queues.max(1) {
        let err = |source| PortError::Open {
            what: format!("TUN device {name}"),
            source,
        };
        let (fd, n) =
            sys::tun::open_queue(&actual, sys::tun::Kind::Tun, true, offload).map_err(err)?;
        let state = if offload {
            use sys::tun::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO_ECN, TUN_F_USO4, TUN_F_USO6};
            let tso = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN;
            // USO where the kernel has it (6.2+), TSO alone where it does not.
            if sys::tun::set_offload(&fd, tso | TUN_F_USO4 | TUN_F_USO6).is_err() {
                sys::tun::set_offload(&fd, tso).map_err(err)?;
            }
            Some(Box::new(OffloadState {
                frame: vec![0; FRAME_MAX],
                pending: None,
                coalescer: coalesce::TcpCoalescer::new(),
            }))
        } else {
            None
        };
        actual = n;
        out.push(TunQueue { fd, offload: state });
    }
    Ok((out, actual))
}

impl TunQueue {
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// True if frames carry virtio-net headers and superframes may arrive.
    pub fn offload(&self) -> bool {
        self.offload.is_some()
    }
}

impl AsFd for TunQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

const NO_PEER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);

fn read_error(e: io::Error) -> Result<(), PortError> {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(()),
        _ => Err(PortError::Io {
            what: "TUN read",
            source: e,
        }),
    }
}

/// Reads superframes and segments them into `batch` until EAGAIN or the batch is full. A frame
/// that cannot be handed on (a kind we do not segment, headers that lie) takes one slot marked
/// oversized, so the pipeline counts it as a drop.
fn rx_offload(
    fd: BorrowedFd<'_>,
    st: &mut OffloadState,
    batch: &mut Batch,
) -> Result<(), PortError> {
    while batch.len() < batch.capacity() {
        let n = match st.pending.take() {
            Some(n) => n,
            None => match sys::fdio::read(fd, &mut st.frame) {
                Ok(n) => n,
                Err(e) => return read_error(e),
            },
        };
        let i = batch.len();
        let parsed = VnetHeader::parse(&st.frame[..n]).and_then(|h| {
            let frame = &st.frame[vnet::HEADER_LEN..n];
            Ok((h, segment::segment_count(&h, frame)?))
        });
        let (hdr, count) = match parsed {
            Ok(v) => v,
            Err(_) => {
                batch.rx_slot(i);
                batch.commit_rx(i, 0, NO_PEER, true);
                continue;
            }
        };
        if count > batch.capacity() - i {
            if i == 0 {
                // More segments than a whole batch holds (a tiny MSS): cannot be forwarded.
                batch.rx_slot(i);
                batch.commit_rx(i, 0, NO_PEER, true);
                continue;
            }
            st.pending = Some(n);
            return Ok(());
        }
        let frame = &mut st.frame[vnet::HEADER_LEN..n];
        if !hdr.is_gso() {
            if hdr.flags & vnet::F_NEEDS_CSUM != 0
                && segment::finish_checksum(
                    frame,
                    usize::from(hdr.csum_start),
                    usize::from(hdr.csum_offset),
                )
                .is_err()
            {
                batch.rx_slot(i);
                batch.commit_rx(i, 0, NO_PEER, true);
                continue;
            }
            let slot = batch.rx_slot(i);
            let len = frame.len().min(slot.len());
            slot[..len].copy_from_slice(&frame[..len]);
            batch.commit_rx(i, len, NO_PEER, frame.len() > len);
            continue;
        }
        for k in 0..count {
            let slot = batch.rx_slot(i + k);
            match segment::segment(&hdr, frame, k, slot) {
                Ok(len) => batch.commit_rx(i + k, len, NO_PEER, false),
                Err(_) => batch.commit_rx(i + k, 0, NO_PEER, true),
            }
        }
    }
    Ok(())
}

impl RxPort for TunQueue {
    fn rx_batch(&mut self, batch: &mut Batch) -> Result<usize, PortError> {
        batch.clear();
        if let Some(st) = self.offload.as_deref_mut() {
            rx_offload(self.fd.as_fd(), st, batch)?;
            return Ok(batch.len());
        }
        rx_plain(self.fd.as_fd(), batch, "TUN read")
    }
}

/// Reads one frame per read(2) into `batch` (cleared first) until EAGAIN or the batch is full.
pub(super) fn rx_plain(
    fd: BorrowedFd<'_>,
    batch: &mut Batch,
    what: &'static str,
) -> Result<usize, PortError> {
    batch.clear();
    for i in 0..batch.capacity() {
        let slot = batch.rx_slot(i);
        let cap = slot.len();
        match sys::fdio::read(fd, slot) {
            Ok(n) => batch.commit_rx(i, n, NO_PEER, n >= cap),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                break
            }
            Err(source) => return Err(PortError::Io { what, source }),
        }
    }
    Ok(batch.len())
}

/// Writes the packets at `indices`, one write(2) each.
pub(super) fn tx_plain(fd: BorrowedFd<'_>, batch: &Batch, indices: &[u16]) -> TxOutcome {
    let mut out = TxOutcome::default();
    for &i in indices {
        count_write(
            &mut out,
            sys::fdio::write(fd, batch.packet(usize::from(i))),
            1,
        );
    }
    out
}

fn count_write(out: &mut TxOutcome, r: io::Result<usize>, packets: usize) {
    match r {
        Ok(_) => out.sent += packets,
        Err(_) => out.failed += packets,
    }
}

/// Writes the packets at `indices`, coalescing runs of one TCP flow into superframes.
fn tx_offload(
    fd: BorrowedFd<'_>,
    co: &mut coalesce::TcpCoalescer,
    batch: &Batch,
    indices: &[u16],
) -> TxOutcome {
    let mut out = TxOutcome::default();
    for &i in indices {
        let pkt = batch.packet(usize::from(i));
        if co.push(pkt) {
            continue;
        }
        if let Some((frame, n)) = co.take() {
            count_write(&mut out, sys::fdio::write(fd, frame), n);
        }
        if !co.push(pkt) {
            count_write(
                &mut out,
                sys::fdio::write_prefixed(fd, &vnet::PLAIN, pkt),
                1,
            );
        }
    }
    if let Some((frame, n)) = co.take() {
        count_write(&mut out, sys::fdio::write(fd, frame), n);
    }
    out
}

impl TxPort for TunQueue {
    fn tx_batch(&mut self, batch: &Batch, indices: &[u16]) -> TxOutcome {
        if let Some(st) = self.offload.as_deref_mut() {
            return tx_offload(self.fd.as_fd(), &mut st.coalescer, batch, indices);
        }
        tx_plain(self.fd.as_fd(), batch, indices)
    }
}
