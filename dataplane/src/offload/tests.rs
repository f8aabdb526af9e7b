//! Segmenting and coalescing against etherparse and each other: a superframe cut into segments
//! and merged back is the same bytes.

use super::coalesce::*;
use super::segment::*;
use crate::wire::checksum;
use crate::wire::vnet::*;
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

fn superframe(payload: usize, flags_fin_psh: bool) -> Vec<u8> {
    let data: Vec<u8> = (0..payload).map(|i| (i % 251) as u8).collect();
    let mut b = PacketBuilder::ipv4([10, 244, 1, 2], [10, 244, 2, 2], 64)
        .tcp(40000, 5201, 1_000_000, 64000)
        .ack(7);
    if flags_fin_psh {
        b = b.psh().fin();
    }
    let mut out = Vec::new();
    b.write(&mut out, &data).unwrap();
    // A superframe's header total length is whatever the stack put there; segments fix it.
    out
}

#[test]
fn test_udp_superframe_becomes_the_datagrams_the_sender_meant() {
    let data: Vec<u8> = (0..3000).map(|i| (i % 251) as u8).collect();
    let mut frame = Vec::new();
    PacketBuilder::ipv4([10, 244, 1, 2], [10, 244, 2, 2], 64)
        .udp(40000, 443)
        .write(&mut frame, &data)
        .unwrap();
    let hdr = VnetHeader {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_UDP_L4,
        hdr_len: 28,
        gso_size: 1200,
        csum_start: 20,
        csum_offset: 6,
    };
    assert_eq!(segment_count(&hdr, &frame), Ok(3));
    let mut got = Vec::new();
    for k in 0..3 {
        let mut out = vec![0u8; 2000];
        let n = segment(&hdr, &frame, k, &mut out).unwrap();
        let p = SlicedPacket::from_ip(&out[..n]).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
            panic!()
        };
        let h = ip.header().to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        assert_eq!(usize::from(h.total_len), n);
        let Some(TransportSlice::Udp(u)) = p.transport else {
            panic!()
        };
        assert_eq!(
            u.to_header().calc_checksum_ipv4(&h, u.payload()).unwrap(),
            u.checksum()
        );
        assert_eq!(usize::from(u.length()), 8 + u.payload().len());
        assert_eq!((u.source_port(), u.destination_port()), (40000, 443));
        got.extend_from_slice(u.payload());
    }
    assert_eq!(got, data);
    let mut out = vec![0u8; 2000];
    assert!(segment(&hdr, &frame, 3, &mut out).is_err());
    let other = VnetHeader {
        gso_type: 4, // TCPv6
        ..hdr
    };
    assert_eq!(
        segment_count(&other, &frame),
        Err(VnetError::Unsupported(4))
    );
}

#[test]
fn test_segments_are_valid_tcp_with_right_sequence_and_flags() {
    let frame = superframe(4000, true);
    let hdr = VnetHeader {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 40,
        gso_size: 1400,
        csum_start: 20,
        csum_offset: 16,
    };
    assert_eq!(segment_count(&hdr, &frame), Ok(3));
    let mut joined = Vec::new();
    for k in 0..3 {
        let mut out = [0u8; 2048];
        let n = tcp4_segment(&hdr, &frame, k, &mut out).unwrap();
        let p = SlicedPacket::from_ip(&out[..n]).unwrap();
        let ip = match p.net.unwrap() {
            etherparse::NetSlice::Ipv4(ip) => ip,
            _ => panic!(),
        };
        assert_eq!(usize::from(ip.header().total_len()), n);
        assert_eq!(
            ip.header().to_header().calc_header_checksum(),
            ip.header().header_checksum()
        );
        let TransportSlice::Tcp(tcp) = p.transport.unwrap() else {
            panic!()
        };
        assert_eq!(tcp.sequence_number(), 1_000_000 + 1400 * k as u32);
        assert_eq!(tcp.fin(), k == 2, "FIN only on the last");
        assert_eq!(tcp.psh(), k == 2, "PSH only on the last");
        let want = tcp
            .to_header()
            .calc_checksum_ipv4(&ip.header().to_header(), tcp.payload())
            .unwrap();
        assert_eq!(tcp.checksum(), want, "segment {k}");
        joined.extend_from_slice(tcp.payload());
    }
    assert_eq!(joined, superframe(4000, true)[40..].to_vec());
    // Past the end, or another kind of superframe: errors, never a panic.
    let mut out = [0u8; 2048];
    assert!(tcp4_segment(&hdr, &frame, 3, &mut out).is_err());
    assert!(tcp4_segment(&hdr, &frame[..30], 0, &mut out).is_err());
    // A UDP superframe header over a TCP frame does not parse as one.
    let udp = VnetHeader { gso_type: 5, ..hdr };
    assert_eq!(segment_count(&udp, &frame), Err(VnetError::BadHeaders));
    let tcp6 = VnetHeader { gso_type: 4, ..hdr };
    assert_eq!(segment_count(&tcp6, &frame), Err(VnetError::Unsupported(4)));
    assert!(tcp4_segment(&hdr, &frame, 0, &mut out[..100]).is_err());
}

#[test]
fn test_finish_partial_checksum() {
    let mut frame = superframe(300, false);
    let tcp_sum_ok = u16::from_be_bytes([frame[36], frame[37]]);
    // What the kernel hands over with CHECKSUM_PARTIAL: the pseudo-header sum, not inverted.
    let pseudo = checksum::fold(checksum::pseudo_header_v4(
        [10, 244, 1, 2].into(),
        [10, 244, 2, 2].into(),
        6,
        (frame.len() - 20) as u16,
    ));
    frame[36..38].copy_from_slice(&pseudo.to_be_bytes());
    finish_checksum(&mut frame, 20, 16).unwrap();
    assert_eq!(u16::from_be_bytes([frame[36], frame[37]]), tcp_sum_ok);
    assert_eq!(
        finish_checksum(&mut frame, 20, 400),
        Err(VnetError::BadChecksumPlace)
    );
}

/// Segments of `superframe(payload)` as the wire would carry them (DF set).
fn segments(payload: usize, mss: u16) -> Vec<Vec<u8>> {
    let mut frame = superframe(payload, false);
    frame[6] = 0x40; // DF
    let hdr = VnetHeader {
        gso_type: GSO_TCPV4,
        gso_size: mss,
        ..Default::default()
    };
    (0..segment_count(&hdr, &frame).unwrap())
        .map(|k| {
            let mut out = vec![0u8; 2048];
            let n = tcp4_segment(&hdr, &frame, k, &mut out).unwrap();
            out.truncate(n);
            out
        })
        .collect()
}

#[test]
fn test_coalesce_in_order_segments_then_resegment_to_the_same_bytes() {
    let segs = segments(6000, 1400);
    let mut c = TcpCoalescer::new();
    for s in &segs {
        assert!(c.push(s));
    }
    let (frame, count) = c.take().unwrap();
    assert_eq!(count, 5);
    let hdr = VnetHeader::parse(frame).unwrap();
    assert_eq!(
        (hdr.gso_type, hdr.gso_size, hdr.flags),
        (GSO_TCPV4, 1400, F_NEEDS_CSUM)
    );
    let mut sf = frame[HEADER_LEN..].to_vec();
    assert_eq!(u16::from_be_bytes([sf[2], sf[3]]) as usize, sf.len());
    // Cut again as the kernel would: the very same segments come out.
    finish_checksum(&mut sf, 20, 16).unwrap();
    for (k, want) in segs.iter().enumerate() {
        let mut out = vec![0u8; 2048];
        let n = tcp4_segment(&hdr, &sf, k, &mut out).unwrap();
        assert_eq!(&out[..n], &want[..], "segment {k}");
    }
    assert!(c.take().is_none());
}

#[test]
fn test_coalescer_refuses_what_linux_gro_would_not_merge() {
    let segs = segments(4200, 1400);
    let mut c = TcpCoalescer::new();
    assert!(c.push(&segs[0]));
    // Out of order.
    assert!(!c.push(&segs[2]));
    // A corrupted segment.
    let mut bad = segs[1].clone();
    bad[60] ^= 0xff;
    assert!(!c.push(&bad));
    // Another flow (port changed, checksum fixed up so only the port differs).
    let mut other = segs[1].clone();
    other[20] ^= 1;
    let fix = checksum::update16(
        u16::from_be_bytes([other[36], other[37]]),
        u16::from_be_bytes([segs[1][20], segs[1][21]]),
        u16::from_be_bytes([other[20], other[21]]),
    );
    other[36..38].copy_from_slice(&fix.to_be_bytes());
    assert!(!c.push(&other));
    assert!(c.push(&segs[1]));
    let (_, n) = c.take().unwrap();
    assert_eq!(n, 2);
    // A lone packet goes out unchanged behind a plain header.
    assert!(c.push(&segs[2]));
    let (frame, n) = c.take().unwrap();
    assert_eq!(
        (n, &frame[..HEADER_LEN], &frame[HEADER_LEN..]),
        (1, &PLAIN[..], &segs[2][..])
    );
    // Not TCP, a SYN, or garbage: never coalesced, never a panic.
    let mut syn = segs[0].clone();
    syn[33] = 0x02;
    assert!(!c.push(&syn));
    assert!(!c.push(&[0x45; 10]));
    assert!(!c.push(&[]));
}

/// Arbitrary bytes as header and frame, and arbitrary packets into the coalescer: errors
/// or refusals, never a panic or an out-of-bounds write.
#[test]
fn test_garbage_never_panics() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let good = superframe(3000, true);
    let mut c = TcpCoalescer::new();
    for round in 0..20_000 {
        let len = (next() % 1600) as usize;
        let mut frame: Vec<u8> = if round % 2 == 0 {
            // Mostly a real superframe with a few bytes changed: reaches deeper code.
            let mut f = good.clone();
            f.truncate(len.max(1).min(f.len()));
            for _ in 0..(next() % 4) {
                let i = (next() as usize) % f.len();
                f[i] = next() as u8;
            }
            f
        } else {
            (0..len).map(|_| next() as u8).collect()
        };
        let mut hb = [0u8; HEADER_LEN];
        hb.iter_mut().for_each(|b| *b = next() as u8);
        if round % 3 == 0 {
            hb[1] = GSO_TCPV4;
        }
        let hdr = VnetHeader::parse(&hb).unwrap();
        if let Ok(n) = segment_count(&hdr, &frame) {
            let mut out = [0u8; 2048];
            for k in 0..n.min(64) {
                let _ = tcp4_segment(&hdr, &frame, k, &mut out);
            }
        }
        let _ = finish_checksum(
            &mut frame,
            usize::from(hdr.csum_start),
            usize::from(hdr.csum_offset),
        );
        let _ = c.push(&frame);
        if round % 7 == 0 {
            let _ = c.take();
        }
    }
}
