//! netfilter's TCP connection tracking: its states, its transition table
//! (`tcp_conntracks[dir][flags][state]` in `nf_conntrack_proto_tcp.c`, transcribed as data), its
//! flag validity rules and the part of its window tracking that decides whether an RST is in
//! window.
//!
//! Data segments are judged as with `nf_conntrack_tcp_be_liberal=1`: only an out-of-window RST is
//! invalid. That is the setting Kubernetes recommends against spurious RSTs from INVALID
//! packets, and it keeps TSO/GRO superframes and mid-stream pickups from ever being dropped on a
//! window guess.

use super::Dir;

/// A TCP connection's state as netfilter names it (`/proc/net/nf_conntrack` spelling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TcpState {
    None = 0,
    SynSent = 1,
    SynRecv = 2,
    Established = 3,
    FinWait = 4,
    CloseWait = 5,
    LastAck = 6,
    TimeWait = 7,
    Close = 8,
    SynSent2 = 9,
}

impl TcpState {
    pub const ALL: [TcpState; 10] = [
        TcpState::None,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::Established,
        TcpState::FinWait,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::SynSent2,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TcpState::None => "NONE",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::Established => "ESTABLISHED",
            TcpState::FinWait => "FIN_WAIT",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::SynSent2 => "SYN_SENT2",
        }
    }

    /// States the garbage collector may reap early when the table is nearly full
    /// (netfilter's `tcp_can_early_drop`).
    pub fn is_closing(self) -> bool {
        matches!(
            self,
            TcpState::FinWait
                | TcpState::LastAck
                | TcpState::TimeWait
                | TcpState::Close
                | TcpState::CloseWait
        )
    }
}

/// What a packet does to a connection, from the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    To(TcpState),
    /// `sIV`: the packet is invalid.
    Invalid,
    /// `sIG`: the packet may be valid or not; let it through without changing state.
    Ignore,
}

/// Which of netfilter's six flag classes a segment falls in (`get_conntrack_index`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagClass {
    Syn = 0,
    SynAck = 1,
    Fin = 2,
    Ack = 3,
    Rst = 4,
    None = 5,
}

pub use crate::wire::tcp::flags as flag;

impl FlagClass {
    pub fn of(flags: u8) -> FlagClass {
        if flags & flag::RST != 0 {
            FlagClass::Rst
        } else if flags & flag::SYN != 0 {
            if flags & flag::ACK != 0 {
                FlagClass::SynAck
            } else {
                FlagClass::Syn
            }
        } else if flags & flag::FIN != 0 {
            FlagClass::Fin
        } else if flags & flag::ACK != 0 {
            FlagClass::Ack
        } else {
            FlagClass::None
        }
    }
}

/// netfilter's `tcp_valid_flags`: the combinations of FIN/SYN/RST/ACK/URG (PSH, ECE and CWR
/// ignored) a segment may carry; anything else (SYN|FIN, no flags, FIN without ACK, ...) is
/// invalid before any state is consulted.
pub fn valid_flags(flags: u8) -> bool {
    use flag::*;
    let f = flags & !(ECE | CWR | PSH);
    [
        SYN,
        SYN | URG,
        SYN | ACK,
        RST,
        RST | ACK,
        FIN | ACK,
        FIN | ACK | URG,
        ACK,
        ACK | URG,
    ]
    .contains(&f)
}

use TcpState as S;
use Transition::{Ignore as IG, Invalid as IV};
const SS: Transition = Transition::To(S::SynSent);
const SR: Transition = Transition::To(S::SynRecv);
const ES: Transition = Transition::To(S::Established);
const FW: Transition = Transition::To(S::FinWait);
const CW: Transition = Transition::To(S::CloseWait);
const LA: Transition = Transition::To(S::LastAck);
const TW: Transition = Transition::To(S::TimeWait);
const CL: Transition = Transition::To(S::Close);
const S2: Transition = Transition::To(S::SynSent2);

/// `tcp_conntracks[dir][class][state]`; columns in `TcpState` order:
/// sNO, sSS, sSR, sES, sFW, sCW, sLA, sTW, sCL, sS2.
#[rustfmt::skip]
const TABLE: [[[Transition; 10]; 6]; 2] = [
    [ // ORIGINAL
        /* syn    */ [SS, SS, IG, IG, IG, IG, IG, SS, SS, S2],
        /* synack */ [IV, IV, IG, IG, IG, IG, IG, IG, IG, SR],
        /* fin    */ [IV, IV, FW, FW, LA, LA, LA, TW, CL, IV],
        /* ack    */ [ES, IV, ES, ES, CW, CW, TW, TW, CL, IV],
        /* rst    */ [IV, CL, CL, CL, CL, CL, CL, CL, CL, CL],
        /* none   */ [IV, IV, IV, IV, IV, IV, IV, IV, IV, IV],
    ],
    [ // REPLY
        /* syn    */ [IV, S2, IV, IV, IV, IV, IV, IV, IV, S2],
        /* synack */ [IV, SR, IG, IG, IG, IG, IG, IG, IG, SR],
        /* fin    */ [IV, IV, FW, FW, LA, LA, LA, TW, CL, IV],
        /* ack    */ [IV, IG, SR, ES, CW, CW, TW, TW, CL, IG],
        /* rst    */ [IV, CL, CL, CL, CL, CL, CL, CL, CL, CL],
        /* none   */ [IV, IV, IV, IV, IV, IV, IV, IV, IV, IV],
    ],
];

/// The table's verdict for a segment of class `class` travelling in `dir` in state `state`.
pub fn transition(dir: Dir, class: FlagClass, state: TcpState) -> Transition {
    TABLE[dir as usize][class as usize][state as usize]
}

/// What one direction has sent, for the RST window check (netfilter's `ip_ct_tcp_state`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    /// Highest sequence number sent plus length (`td_end`).
    pub end: u32,
    /// Highest ack + window the other side announced (`td_maxend`).
    pub max_end: u32,
    /// Largest window this side announced, scaled (`td_maxwin`); 0: nothing seen yet.
    pub max_win: u32,
    /// Window scale this side announced (0..=14).
    pub scale: u8,
    /// This side sent the window scale option on its SYN.
    pub scale_ok: bool,
}

/// The fields of a segment the tracker reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub window: u16,
    /// Payload length.
    pub len: u32,
    /// Window scale option, if the segment carries one (SYN and SYN-ACK only count).
    pub wscale: Option<u8>,
}

impl Segment {
    /// Sequence number after this segment (SYN and FIN take one each).
    fn end(&self) -> u32 {
        let mut end = self.seq.wrapping_add(self.len);
        if self.flags & flag::SYN != 0 {
            end = end.wrapping_add(1);
        }
        if self.flags & flag::FIN != 0 {
            end = end.wrapping_add(1);
        }
        end
    }
}

fn after(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) < 0
}

fn before(a: u32, b: u32) -> bool {
    after(b, a)
}

/// Bookkeeping of both directions' windows (netfilter's `tcp_in_window` without its verdict
/// on data); returns whether the segment is in window by netfilter's bounds I and II, which is
/// what decides an RST.
pub fn track_window(windows: &mut [Window; 2], dir: Dir, seg: &Segment) -> bool {
    let (s, r) = (dir as usize, 1 - dir as usize);
    let end = seg.end();
    let win = u32::from(seg.window);
    let syn = seg.flags & flag::SYN != 0;
    let ack = if seg.flags & flag::ACK != 0 {
        seg.ack
    } else {
        windows[r].end
    };
    if windows[s].max_win == 0 {
        // First segment from this side: learn it.
        let sender = &mut windows[s];
        sender.end = end;
        if syn {
            sender.max_end = end;
            sender.max_win = win.max(1);
            if let Some(ws) = seg.wscale {
                sender.scale = ws.min(14);
                sender.scale_ok = true;
            }
            if sender.scale_ok && windows[r].scale_ok && windows[r].max_win != 0 {
                // Both sides sent the option (RFC 7323): scaling is on.
            } else if windows[r].max_win != 0 {
                windows[s].scale = 0;
                windows[r].scale = 0;
            }
        } else {
            let swin = (win << sender.scale).max(1);
            sender.max_win = swin;
            sender.max_end = end.wrapping_add(swin);
            if windows[r].max_win == 0 {
                windows[r].end = ack;
                windows[r].max_end = ack;
            }
        }
        return true;
    }
    let (sender, receiver) = (windows[s], windows[r]);
    // I: seq <= sender.td_maxend; II: seq + len >= sender.td_end - receiver.td_maxwin.
    let in_window = !after(seg.seq, sender.max_end)
        && !before(end, sender.end.wrapping_sub(receiver.max_win.max(1)));
    if in_window {
        let swin = if syn {
            win
        } else {
            win << sender.scale.min(14)
        };
        let w = &mut windows[s];
        if after(end, w.end) {
            w.end = end;
        }
        if seg.flags & flag::ACK != 0 {
            let new_max = ack.wrapping_add(swin.max(1));
            let rw = &mut windows[r];
            if after(new_max, rw.max_end) {
                rw.max_end = new_max;
            }
        }
        let w = &mut windows[s];
        if swin > w.max_win {
            w.max_win = swin;
        }
    }
    in_window
}

#[cfg(test)]
mod tests {
    use super::*;
    use flag::*;

    #[test]
    fn test_table_follows_netfilter_on_a_normal_connection() {
        let mut st = TcpState::None;
        let steps = [
            (Dir::Original, SYN, TcpState::SynSent),
            (Dir::Reply, SYN | ACK, TcpState::SynRecv),
            (Dir::Original, ACK, TcpState::Established),
            (Dir::Original, FIN | ACK, TcpState::FinWait),
            (Dir::Reply, ACK, TcpState::CloseWait),
            (Dir::Reply, FIN | ACK, TcpState::LastAck),
            (Dir::Original, ACK, TcpState::TimeWait),
            (Dir::Original, SYN, TcpState::SynSent), // reopened (RFC 1122)
        ];
        for (dir, flags, want) in steps {
            match transition(dir, FlagClass::of(flags), st) {
                Transition::To(s) => st = s,
                other => panic!("{dir:?} {flags:#x} in {st:?}: {other:?}"),
            }
            assert_eq!(st, want);
        }
    }

    #[test]
    fn test_table_spot_checks() {
        use Dir::*;
        use FlagClass as F;
        // Too late, nothing seen: invalid.
        assert_eq!(
            transition(Original, F::SynAck, S::None),
            Transition::Invalid
        );
        // Mid-stream pickup.
        assert_eq!(transition(Original, F::Ack, S::None), ES);
        // Client can't ACK before a SYN-ACK.
        assert_eq!(transition(Original, F::Ack, S::SynSent), IV);
        // Simultaneous open.
        assert_eq!(transition(Reply, F::Syn, S::SynSent), S2);
        assert_eq!(transition(Reply, F::SynAck, S::SynSent2), SR);
        // SYN on an established connection: ignored, the receiver answers it.
        assert_eq!(transition(Original, F::Syn, S::Established), IG);
        // Retransmitted SYN-ACK.
        assert_eq!(transition(Reply, F::SynAck, S::SynRecv), IG);
        // RST closes from any state but NONE.
        for s in &TcpState::ALL[1..] {
            assert_eq!(transition(Original, F::Rst, *s), CL);
            assert_eq!(transition(Reply, F::Rst, *s), CL);
        }
        // No flags at all: always invalid.
        for s in TcpState::ALL {
            assert_eq!(transition(Original, F::None, s), IV);
        }
    }

    #[test]
    fn test_valid_flags_is_netfilters_list() {
        for f in [
            SYN,
            SYN | ACK,
            SYN | URG,
            RST,
            RST | ACK,
            RST | ACK | PSH,
            FIN | ACK,
            FIN | ACK | PSH,
            ACK,
            ACK | PSH,
            ACK | URG | PSH | ECE | CWR,
            SYN | ECE | CWR,
        ] {
            assert!(valid_flags(f), "{f:#x}");
        }
        for f in [
            0,
            SYN | FIN,
            SYN | RST,
            FIN,
            FIN | PSH | URG, // xmas without ACK
            0x3f,
            PSH,
            SYN | ACK | FIN,
            RST | FIN,
            RST | SYN | ACK,
        ] {
            assert!(!valid_flags(f), "{f:#x}");
        }
    }

    fn seg(flags: u8, seq: u32, ack: u32, window: u16, len: u32) -> Segment {
        Segment {
            flags,
            seq,
            ack,
            window,
            len,
            wscale: None,
        }
    }

    #[test]
    fn test_rst_in_and_out_of_window() {
        let mut w = [Window::default(); 2];
        assert!(track_window(
            &mut w,
            Dir::Original,
            &seg(SYN, 1000, 0, 64000, 0)
        ));
        assert!(track_window(
            &mut w,
            Dir::Reply,
            &seg(SYN | ACK, 5000, 1001, 64000, 0)
        ));
        assert!(track_window(
            &mut w,
            Dir::Original,
            &seg(ACK, 1001, 5001, 64000, 100)
        ));
        // An RST at the expected sequence number is in window.
        let mut w2 = w;
        assert!(track_window(
            &mut w2,
            Dir::Reply,
            &seg(RST | ACK, 5001, 1101, 0, 0)
        ));
        // One far ahead of anything the receiver allowed is not.
        assert!(!track_window(
            &mut w,
            Dir::Reply,
            &seg(RST, 5001 + 10_000_000, 0, 0, 0)
        ));
        // Nor one far behind.
        assert!(!track_window(
            &mut w,
            Dir::Reply,
            &seg(RST, 5001u32.wrapping_sub(10_000_000), 0, 0, 0)
        ));
    }

    #[test]
    fn test_window_tracking_follows_sequence_wraparound() {
        let mut w = [Window::default(); 2];
        let isn = u32::MAX - 100;
        track_window(&mut w, Dir::Original, &seg(SYN, isn, 0, 1000, 0));
        track_window(
            &mut w,
            Dir::Reply,
            &seg(SYN | ACK, 7, isn.wrapping_add(1), 1000, 0),
        );
        let mut seq = isn.wrapping_add(1);
        for _ in 0..10 {
            assert!(track_window(
                &mut w,
                Dir::Original,
                &seg(ACK, seq, 8, 1000, 500)
            ));
            seq = seq.wrapping_add(500);
            assert!(track_window(&mut w, Dir::Reply, &seg(ACK, 8, seq, 1000, 0)));
        }
        assert!(track_window(&mut w, Dir::Reply, &seg(RST, 8, 0, 0, 0)));
    }
}
