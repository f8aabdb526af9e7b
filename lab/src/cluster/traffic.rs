//! Traffic the lab sends between pods, generated in Rust inside the pods' namespaces: ICMP echo
//! over a raw socket, a TCP transfer checked by SHA-256, UDP request/response, and a forged
//! flannel-udp datagram from a host that is no cluster node.

use anyhow::{bail, Context, Result};
use podwire_dataplane::wire::{ethernet, icmpv4, ipv4, udp, vxlan, IpProtocol, MacAddr};
use sha2::{Digest, Sha256};
use socket2::{Domain, Protocol, Socket, Type};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

static NEXT_ICMP_ID: AtomicU16 = AtomicU16::new(1);

fn raw_icmp_socket(timeout: Duration) -> Result<UdpSocket> {
    let s =
        Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)).context("raw ICMP socket")?;
    s.set_read_timeout(Some(timeout))?;
    // A raw socket moves whole datagrams like a UDP socket; std's UdpSocket gives us send_to and
    // recv_from over it.
    Ok(s.into())
}

/// An ICMP echo request with `size` bytes in all (header included, at least 8).
fn echo_request(id: u16, seq: u16, size: usize) -> Vec<u8> {
    let mut buf = vec![0u8; size.max(icmpv4::HEADER_LEN)];
    for (i, b) in buf[8..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let mut p = icmpv4::Packet::new_unchecked(&mut buf[..]);
    p.set_kind(icmpv4::kind::ECHO_REQUEST);
    p.set_code(0);
    p.set_rest(id, seq);
    p.fill_checksum();
    buf
}

/// Reads one datagram from a raw ICMP socket; returns (source, type, code) if it is an ICMP
/// message that `wanted` accepts.
fn recv_icmp(
    sock: &UdpSocket,
    buf: &mut [u8],
    wanted: impl Fn(Ipv4Addr, &icmpv4::Packet<&[u8]>) -> bool,
) -> Option<(Ipv4Addr, u8, u8)> {
    let (n, _) = sock.recv_from(buf).ok()?;
    let ip = ipv4::Packet::new_checked(&buf[..n]).ok()?;
    let icmp = icmpv4::Packet::new_checked(ip.payload()).ok()?;
    wanted(ip.src(), &icmp).then(|| (ip.src(), icmp.kind(), icmp.code()))
}

/// Echo results.
#[derive(Debug, Clone, Copy, Default)]
pub struct PingStats {
    pub sent: u32,
    pub received: u32,
    pub avg_rtt: Duration,
}

/// Pings `dst` `count` times, one at a time, with IP packets of `ip_len` bytes (DF set: the
/// socket's default path-MTU discovery). Call inside the source netns.
pub fn ping(dst: Ipv4Addr, count: u16, ip_len: usize, timeout: Duration) -> Result<PingStats> {
    let sock = raw_icmp_socket(Duration::from_millis(50))?;
    let id = NEXT_ICMP_ID.fetch_add(1, Ordering::Relaxed) ^ (std::process::id() as u16);
    let mut stats = PingStats::default();
    let mut total_rtt = Duration::ZERO;
    let mut buf = [0u8; 65536];
    for seq in 0..count {
        let sent_at = Instant::now();
        sock.send_to(
            &echo_request(id, seq, ip_len.saturating_sub(ipv4::HEADER_LEN)),
            SocketAddrV4::new(dst, 0),
        )
        .with_context(|| format!("sending a {ip_len}-byte echo to {dst}"))?;
        stats.sent += 1;
        while sent_at.elapsed() < timeout {
            let matched = recv_icmp(&sock, &mut buf, |src, icmp| {
                src == dst
                    && icmp.kind() == icmpv4::kind::ECHO_REPLY
                    && icmp.echo_ident() == id
                    && icmp.echo_seq() == seq
            });
            if matched.is_some() {
                stats.received += 1;
                total_rtt += sent_at.elapsed();
                break;
            }
        }
    }
    if stats.received > 0 {
        stats.avg_rtt = total_rtt / stats.received;
    }
    Ok(stats)
}

/// Sends one echo request to `dst` and returns (source, type, code) of an ICMP error that quotes
/// it, if one arrives. Call inside the source netns.
pub fn probe_icmp_error(dst: Ipv4Addr, timeout: Duration) -> Result<Option<(Ipv4Addr, u8, u8)>> {
    let sock = raw_icmp_socket(Duration::from_millis(50))?;
    let id = NEXT_ICMP_ID.fetch_add(1, Ordering::Relaxed) ^ 0x5a5a;
    let start = Instant::now();
    sock.send_to(&echo_request(id, 1, 64), SocketAddrV4::new(dst, 0))?;
    let mut buf = [0u8; 2048];
    while start.elapsed() < timeout {
        let found = recv_icmp(&sock, &mut buf, |_, icmp| {
            let quoted = icmp.data();
            // The quote is our IP header (20 bytes) and the echo's first 8 bytes: id at 24.
            icmpv4::is_error(icmp.kind())
                && quoted.len() >= 28
                && quoted[16..20] == dst.octets()
                && u16::from_be_bytes([quoted[24], quoted[25]]) == id
        });
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

/// Sends one echo request of `ip_len` bytes with DF to `dst` and returns the next-hop MTU of a
/// "fragmentation needed" that quotes it, if one arrives. Call inside the source netns.
pub fn probe_frag_needed(dst: Ipv4Addr, ip_len: usize, timeout: Duration) -> Result<Option<u16>> {
    let sock = raw_icmp_socket(Duration::from_millis(50))?;
    let id = NEXT_ICMP_ID.fetch_add(1, Ordering::Relaxed) ^ 0x3c3c;
    let start = Instant::now();
    sock.send_to(
        &echo_request(id, 1, ip_len.saturating_sub(ipv4::HEADER_LEN)),
        SocketAddrV4::new(dst, 0),
    )?;
    let mut buf = [0u8; 2048];
    while start.elapsed() < timeout {
        let Ok((n, _)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let Ok(ip) = ipv4::Packet::new_checked(&buf[..n]) else {
            continue;
        };
        let icmp = ip.payload();
        let quoted = icmp.get(icmpv4::HEADER_LEN..).unwrap_or_default();
        if icmp.len() >= icmpv4::HEADER_LEN
            && icmp[0] == icmpv4::kind::DEST_UNREACHABLE
            && icmp[1] == icmpv4::unreachable::FRAG_NEEDED
            && quoted.len() >= 28
            && quoted[16..20] == dst.octets()
            && u16::from_be_bytes([quoted[24], quoted[25]]) == id
        {
            return Ok(Some(u16::from_be_bytes([icmp[6], icmp[7]])));
        }
    }
    Ok(None)
}

/// Deterministic pseudo-random bytes (xorshift64*), so a transfer's content is not all zeros.
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern(seed | 1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// What the receiving side of a transfer saw.
#[derive(Debug, Clone)]
pub struct Received {
    pub bytes: u64,
    pub sha256: String,
    pub elapsed: Duration,
}

/// Accepts one connection on `listener` and reads it to EOF, hashing. Call inside the server netns.
pub fn tcp_sink(listener: TcpListener, timeout: Duration) -> Result<Received> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let mut stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(e).context("accepting the transfer"),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(timeout))?;
    let start = Instant::now();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut bytes = 0u64;
    loop {
        let n = stream.read(&mut buf).context("reading the transfer")?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(Received {
        bytes,
        sha256: hex(&hasher.finalize()),
        elapsed: start.elapsed(),
    })
}

/// Connects to `dst` and sends `bytes` bytes of a seeded pattern; returns their SHA-256.
/// Call inside the client netns.
pub fn tcp_source(dst: SocketAddrV4, bytes: u64, seed: u64, timeout: Duration) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&dst.into(), timeout)
        .with_context(|| format!("connecting to {dst}"))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut pattern = Pattern::new(seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = buf.len().min(left as usize);
        pattern.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        stream
            .write_all(&buf[..n])
            .context("sending the transfer")?;
        left -= n as u64;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Echoes datagrams on `sock` until it has been idle for `idle`. Returns how many it echoed.
pub fn udp_echo(sock: UdpSocket, idle: Duration) -> Result<u32> {
    sock.set_read_timeout(Some(idle))?;
    let mut buf = [0u8; 2048];
    let mut n_echoed = 0;
    while let Ok((n, from)) = sock.recv_from(&mut buf) {
        sock.send_to(&buf[..n], from)?;
        n_echoed += 1;
    }
    Ok(n_echoed)
}

/// Unanswered datagrams, with none answered before, after which [`udp_ping`] stops: the path
/// is down, and waiting out every datagram's timeout would only delay the failed check by
/// minutes. Once one was answered, every datagram is sent: the checks count the loss.
const GIVE_UP_AFTER_MISSES: u32 = 10;

/// Sends `count` numbered datagrams to `dst`, one at a time, and counts the echoes that match
/// (stopping early when the first [`GIVE_UP_AFTER_MISSES`] are all unanswered).
pub fn udp_ping(dst: SocketAddrV4, count: u32, size: usize, timeout: Duration) -> Result<u32> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    sock.set_read_timeout(Some(timeout))?;
    let mut out = vec![0u8; size.max(4)];
    let mut inbuf = vec![0u8; 2048];
    let mut got = 0;
    let mut misses = 0;
    for seq in 0..count {
        out[..4].copy_from_slice(&seq.to_be_bytes());
        sock.send_to(&out, dst)?;
        let deadline = Instant::now() + timeout;
        let mut answered = false;
        while Instant::now() < deadline {
            match sock.recv_from(&mut inbuf) {
                Ok((n, _)) if n == out.len() && inbuf[..4] == seq.to_be_bytes() => {
                    answered = true;
                    break;
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        if answered {
            got += 1;
        } else {
            misses += 1;
            if got == 0 && misses == GIVE_UP_AFTER_MISSES {
                break;
            }
        }
    }
    Ok(got)
}

/// A VXLAN payload (header with VNI 1, inner Ethernet) around `inner`, as a datagram to port 8472.
pub fn vxlan_payload(dst_mac: MacAddr, src_mac: MacAddr, inner: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; vxlan::HEADER_LEN + ethernet::HEADER_LEN];
    vxlan::Repr {
        vni: vxlan::Vni::new(1).expect("VNI 1"),
    }
    .emit(&mut out);
    ethernet::Repr {
        dst: dst_mac,
        src: src_mac,
        ethertype: ethernet::ethertype::IPV4,
    }
    .emit(&mut ethernet::Packet::new_unchecked(
        &mut out[vxlan::HEADER_LEN..],
    ));
    out.extend_from_slice(inner);
    out
}

/// A flannel-udp datagram payload: an IPv4/UDP packet from `src` to `dst` carrying `payload`.
pub fn inner_udp_packet(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut pkt = vec![0u8; ipv4::HEADER_LEN + udp::HEADER_LEN + payload.len()];
    pkt[ipv4::HEADER_LEN + udp::HEADER_LEN..].copy_from_slice(payload);
    udp::Repr {
        src_port: src.port(),
        dst_port: dst.port(),
        payload_len: payload.len(),
    }
    .emit(&mut pkt[ipv4::HEADER_LEN..], *src.ip(), *dst.ip());
    ipv4::Repr {
        src: *src.ip(),
        dst: *dst.ip(),
        protocol: IpProtocol::Udp,
        payload_len: udp::HEADER_LEN + payload.len(),
        ttl: 64,
        dscp_ecn: 0,
        ident: 1,
        dont_frag: false,
    }
    .emit(&mut pkt);
    pkt
}

/// Waits on `sock` for up to `wait` and returns the payloads that arrived.
pub fn collect_datagrams(sock: &UdpSocket, wait: Duration) -> Result<Vec<Vec<u8>>> {
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            got.push(buf[..n].to_vec());
        }
    }
    Ok(got)
}

/// Fails unless `a == b`, describing both.
pub fn same_digest(a: &str, b: &str) -> Result<()> {
    if a != b {
        bail!("SHA-256 mismatch: sent {a}, received {b}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_pattern_is_deterministic_and_not_flat() {
        let (mut a, mut b) = (vec![0u8; 1000], vec![0u8; 1000]);
        Pattern::new(7).fill(&mut a);
        Pattern::new(7).fill(&mut b);
        assert_eq!(a, b);
        assert!(a.iter().filter(|&&x| x == 0).count() < 50);
    }

    #[test]
    fn test_inner_packet_is_valid() {
        let pkt = inner_udp_packet(
            SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 2), 1),
            SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 2), 2),
            b"x",
        );
        let ip = ipv4::Packet::new_checked(&pkt[..]).unwrap();
        assert!(ip.verify_checksum());
        assert!(udp::Packet::new_checked(ip.payload())
            .unwrap()
            .verify_checksum(ip.src(), ip.dst()));
    }
}

/// Bench source: `bytes` of a fixed pattern to `dst` as fast as TCP takes them (no hashing, so
/// the generator costs as little as the stack allows).
pub fn tcp_blast(dst: SocketAddrV4, bytes: u64, timeout: Duration) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&dst.into(), timeout)
        .with_context(|| format!("connecting to {dst}"))?;
    s.set_write_timeout(Some(timeout))?;
    let mut buf = vec![0u8; 256 * 1024];
    Pattern::new(1).fill(&mut buf);
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    Ok(())
}

/// Profile source: the fixed pattern to `dst` as fast as TCP takes it, for `run_for`; returns
/// the bytes sent.
pub fn tcp_blast_for(dst: SocketAddrV4, run_for: Duration, timeout: Duration) -> Result<u64> {
    let mut s = TcpStream::connect_timeout(&dst.into(), timeout)
        .with_context(|| format!("connecting to {dst}"))?;
    s.set_write_timeout(Some(timeout))?;
    let mut buf = vec![0u8; 256 * 1024];
    Pattern::new(1).fill(&mut buf);
    let (start, mut sent) = (std::time::Instant::now(), 0u64);
    while start.elapsed() < run_for {
        s.write_all(&buf)?;
        sent += buf.len() as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    Ok(sent)
}

/// Bench sink: accepts one connection and reads it to the end; returns the byte count.
pub fn tcp_discard(listener: TcpListener, timeout: Duration) -> Result<u64> {
    listener.set_nonblocking(false)?;
    let (mut s, _) = listener.accept()?;
    s.set_read_timeout(Some(timeout))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// Sends `datagram` from `sock` to `dst` for `duration`: unpaced (64 per `sendmmsg`, as fast
/// as the socket takes them) or at `pps`, in bursts of at most 64 as the clock makes them due.
/// Returns how many the socket took and how long the sending lasted.
pub fn blast_from(
    sock: &UdpSocket,
    datagram: &[u8],
    dst: SocketAddrV4,
    pps: Option<f64>,
    duration: Duration,
) -> (u64, Duration) {
    use podwire_dataplane::batch::Batch;
    use podwire_dataplane::port::MmsgScratch;
    use std::os::fd::AsFd;
    const BATCH: usize = 64;
    let mut batch = Batch::new(BATCH, 2048);
    for i in 0..BATCH {
        batch.rx_slot(i)[..datagram.len()].copy_from_slice(datagram);
        batch.commit_rx(i, datagram.len(), dst, false);
    }
    let indices: Vec<u16> = (0..BATCH as u16).collect();
    let mut scratch = MmsgScratch::new(BATCH);
    let start = Instant::now();
    let mut sent = 0u64;
    loop {
        let elapsed = start.elapsed();
        if elapsed >= duration {
            break;
        }
        let want = match pps {
            None => BATCH,
            Some(r) => {
                let due = (r * elapsed.as_secs_f64()) as u64;
                (due.saturating_sub(sent) as usize).min(BATCH)
            }
        };
        if want == 0 {
            std::hint::spin_loop();
            continue;
        }
        match scratch.send(sock.as_fd(), &batch, &indices[..want]) {
            Ok(n) => sent += n as u64,
            // A full socket buffer or a transient ICMP error: keep pushing.
            Err(_) => std::thread::yield_now(),
        }
    }
    (sent, start.elapsed())
}

/// Sends `total` datagrams of `len` bytes from `from` to `to` at `pps`, each starting with its
/// sequence number (8 bytes, big-endian), paced per millisecond. Returns how many left.
pub fn paced_seq_send(
    from: SocketAddrV4,
    to: SocketAddrV4,
    pps: u32,
    total: u64,
    len: usize,
) -> Result<u64> {
    let s = UdpSocket::bind(from)?;
    let mut buf = vec![0x5au8; len.max(8)];
    let started = Instant::now();
    let mut seq = 0u64;
    while seq < total {
        // What should have left by now, leaves now.
        let due = (started.elapsed().as_secs_f64() * f64::from(pps)) as u64;
        while seq < due.min(total) {
            buf[..8].copy_from_slice(&seq.to_be_bytes());
            if s.send_to(&buf, to).is_ok() {
                seq += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(seq)
}

/// What a sequence-numbered stream delivered: each number counted once.
#[derive(Debug, Clone, Copy, Default)]
pub struct SeqReceived {
    pub received: u64,
    pub duplicates: u64,
    pub reordered: u64,
}

/// Receives a [`paced_seq_send`] stream of `total` datagrams to `addr` in namespace `ns`, on a
/// thread of its own. The socket reads with recvmmsg into a 16 MB buffer, so a receiver that is
/// descheduled for a while on a shared machine loses nothing by itself.
pub fn spawn_seq_receiver(
    ns: &str,
    addr: SocketAddrV4,
    total: u64,
) -> Result<std::thread::JoinHandle<SeqReceived>> {
    use podwire_dataplane::port::udp::UdpPort;
    let sink = super::netns::run_in(ns, move || Ok(UdpPort::bind(addr, 64, 16 << 20)?))?;
    Ok(std::thread::spawn(move || {
        receive_seq(sink, total, Duration::from_secs(2))
    }))
}

/// Receives a [`paced_seq_send`] stream of `total` datagrams on `sink` (recvmmsg, so a
/// receiver descheduled for a while loses nothing by itself) until none came for `idle`.
pub fn receive_seq(
    mut sink: podwire_dataplane::port::udp::UdpPort,
    total: u64,
    idle: Duration,
) -> SeqReceived {
    use podwire_dataplane::batch::Batch;
    use podwire_dataplane::port::RxPort;
    let mut seen = vec![false; total as usize];
    let mut r = SeqReceived::default();
    let mut last = 0u64;
    let mut batch = Batch::new(64, 2048);
    let mut idle_since = Instant::now();
    while idle_since.elapsed() < idle {
        let n = sink.rx_batch(&mut batch).unwrap_or(0);
        if n == 0 {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        idle_since = Instant::now();
        for i in 0..n {
            let Some(seq) = batch
                .packet(i)
                .get(..8)
                .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
            else {
                continue;
            };
            match seen.get_mut(seq as usize) {
                Some(s) if *s => r.duplicates += 1,
                Some(s) => {
                    *s = true;
                    r.received += 1;
                    if seq < last {
                        r.reordered += 1;
                    }
                    last = seq;
                }
                None => r.duplicates += 1,
            }
        }
    }
    r
}

/// Bench sink: counts datagrams on `sock` until none came for `idle` (after the first) or
/// `limit` passed, reading 64 per recvmmsg call.
pub fn udp_count(sock: UdpSocket, idle: Duration, limit: Duration) -> Result<u64> {
    use podwire_dataplane::batch::Batch;
    use podwire_dataplane::port::MmsgScratch;
    use std::os::fd::AsFd;
    let mut batch = Batch::new(64, 2048);
    let mut scratch = MmsgScratch::new(64);
    let start = Instant::now();
    let (mut first, mut last) = (false, start);
    let mut received = 0u64;
    loop {
        batch.clear();
        let n = match scratch.recv(sock.as_fd(), &mut batch) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e.into()),
        };
        let now = Instant::now();
        if n > 0 {
            received += n as u64;
            first = true;
            last = now;
        } else {
            let quiet_since = if first { last } else { start };
            if now.duration_since(quiet_since) > idle || now.duration_since(start) > limit {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    Ok(received)
}
