//! `capture` on the daemon's side: a thread of its own (one capture at a time) waits for the
//! packets while the ctl thread goes on answering, then sends a JSON line ([`Captured`])
//! followed by that many bytes of pcap.

use super::protocol::{CapturePort, CaptureRequest, Captured, Refusal, Response};
use super::server::{reply, CtlState};
use super::MAX_CAPTURE;
use podwire_dataplane::capture::CapturePoint;
use podwire_dataplane::port::pcap::outer_datagram;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Starts a capture on a thread of its own, which answers on `conn` when it is done; the
/// connection comes back with the reason when it cannot start.
pub(super) fn start_capture(
    conn: UnixStream,
    req: &CaptureRequest,
    state: &Arc<CtlState>,
) -> Result<(), (UnixStream, Refusal)> {
    let point = match req.port {
        CapturePort::Tun => CapturePoint::Tun,
        CapturePort::Underlay => CapturePoint::Underlay,
    };
    let count = req.count.clamp(1, MAX_CAPTURE);
    let timeout = Duration::from_millis(req.timeout_ms.min(600_000));
    if state.capturing.swap(true, Ordering::AcqRel) {
        return Err((conn, Refusal::CaptureRunning));
    }
    // A second descriptor of the connection, to answer on if the thread cannot start.
    let spare = match conn.try_clone() {
        Ok(c) => c,
        Err(e) => {
            state.capturing.store(false, Ordering::Release);
            return Err((conn, Refusal::CaptureStart(e.to_string())));
        }
    };
    let st = Arc::clone(state);
    let spawned = std::thread::Builder::new()
        .name("podwire-capture".into())
        .spawn(move || {
            let _ = run_capture(&conn, &st, point, count, timeout);
            st.capturing.store(false, Ordering::Release);
        });
    match spawned {
        Ok(_) => Ok(()),
        Err(e) => {
            state.capturing.store(false, Ordering::Release);
            Err((spare, Refusal::CaptureStart(e.to_string())))
        }
    }
}

/// Arms the capture, waits for `count` packets (or `timeout`), and sends them on `conn` as a
/// JSON line and a pcap (link type RAW; underlay datagrams with the outer IPv4/UDP headers they
/// arrived in).
fn run_capture(
    conn: &UnixStream,
    state: &CtlState,
    point: CapturePoint,
    count: usize,
    timeout: Duration,
) -> std::io::Result<()> {
    state.capture.arm(point, count);
    let deadline = Instant::now() + timeout;
    while state.capture.remaining() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let frames = state.capture.take();
    let t = state.tables.load();
    let local = std::net::SocketAddrV4::new(t.local.public_ip, t.peer_port);
    match pcap_bytes(&frames, point, local) {
        Ok(pcap) => {
            let head = Response::Captured(Captured {
                captured: frames.len(),
                wanted: count,
                pcap_bytes: pcap.len(),
                path: None,
            });
            reply(conn, Ok(&head))?;
            let mut w = conn;
            w.write_all(&pcap)
        }
        Err(e) => reply(conn, Err(&Refusal::Pcap(e))),
    }
}

/// The frames as a pcap file's bytes.
fn pcap_bytes(
    frames: &[podwire_dataplane::capture::Frame],
    point: CapturePoint,
    local: std::net::SocketAddrV4,
) -> Result<Vec<u8>, String> {
    let header = pcap_file::pcap::PcapHeader {
        datalink: pcap_file::DataLink::RAW,
        ..Default::default()
    };
    let mut w =
        pcap_file::pcap::PcapWriter::with_header(Vec::new(), header).map_err(|e| e.to_string())?;
    for f in frames {
        let data = match point {
            CapturePoint::Tun => f.data.clone(),
            CapturePoint::Underlay => outer_datagram(*f.peer.ip(), f.peer.port(), local, &f.data),
        };
        let ts = f
            .time
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        w.write_packet(&pcap_file::pcap::PcapPacket::new(
            ts,
            data.len() as u32,
            &data,
        ))
        .map_err(|e| e.to_string())?;
    }
    Ok(w.into_writer())
}
