//! Device offloads through the kernel's ethtool netlink family (generic netlink `ethtool`,
//! Linux 5.6+), in-process: what `ethtool -K DEV ...` sets. The messages are a handful of
//! attributes, written here by hand (rust-netlink's `ethtool` crate reads features but cannot
//! set them).

use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

/// Why an offload could not be set.
#[derive(Debug, thiserror::Error)]
pub enum EthtoolError {
    #[error("generic netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("the kernel has no ethtool netlink family (Linux 5.6+)")]
    NoFamily,
    #[error("{what}: {source}")]
    Kernel {
        what: String,
        source: std::io::Error,
    },
}

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const ETHTOOL_MSG_FEATURES_SET: u8 = 12;
const ETHTOOL_A_FEATURES_HEADER: u16 = 1;
const ETHTOOL_A_FEATURES_WANTED: u16 = 3;
const ETHTOOL_A_HEADER_DEV_NAME: u16 = 2;
const ETHTOOL_A_BITSET_BITS: u16 = 3;
const ETHTOOL_A_BITSET_BITS_BIT: u16 = 1;
const ETHTOOL_A_BITSET_BIT_NAME: u16 = 2;
const ETHTOOL_A_BITSET_BIT_VALUE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;

/// The features `ethtool -K DEV tx off` turns off: every transmit checksum offload.
pub const TX_CHECKSUMS: [&str; 5] = [
    "tx-checksum-ipv4",
    "tx-checksum-ip-generic",
    "tx-checksum-ipv6",
    "tx-checksum-fcoe-crc",
    "tx-checksum-sctp",
];
/// `gro`'s feature.
pub const GRO: &str = "rx-gro";

/// One netlink attribute, padded to 4 bytes.
fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = 4 + payload.len();
    let mut v = Vec::with_capacity(len.next_multiple_of(4));
    v.extend_from_slice(&(len as u16).to_ne_bytes());
    v.extend_from_slice(&kind.to_ne_bytes());
    v.extend_from_slice(payload);
    v.resize(len.next_multiple_of(4), 0);
    v
}

fn string(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// A generic netlink request: netlink header, genl header (`cmd`, version 1), attributes.
fn message(family: u16, flags: u16, seq: u32, cmd: u8, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&(len as u32).to_ne_bytes());
    v.extend_from_slice(&family.to_ne_bytes());
    v.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    v.extend_from_slice(&seq.to_ne_bytes());
    v.extend_from_slice(&0u32.to_ne_bytes());
    v.extend_from_slice(&[cmd, 1, 0, 0]);
    v.extend_from_slice(attrs);
    v
}

/// The features-set request turning each `(name, on)` of `features` on or off on `dev`,
/// leaving the others as they are.
fn features_set(family: u16, seq: u32, dev: &str, features: &[(&str, bool)]) -> Vec<u8> {
    let header = attr(
        ETHTOOL_A_FEATURES_HEADER | NLA_F_NESTED,
        &attr(ETHTOOL_A_HEADER_DEV_NAME, &string(dev)),
    );
    let bits: Vec<u8> = features
        .iter()
        .flat_map(|(name, on)| {
            let mut bit = attr(ETHTOOL_A_BITSET_BIT_NAME, &string(name));
            if *on {
                bit.extend(attr(ETHTOOL_A_BITSET_BIT_VALUE, &[]));
            }
            attr(ETHTOOL_A_BITSET_BITS_BIT | NLA_F_NESTED, &bit)
        })
        .collect();
    let wanted = attr(
        ETHTOOL_A_FEATURES_WANTED | NLA_F_NESTED,
        &attr(ETHTOOL_A_BITSET_BITS | NLA_F_NESTED, &bits),
    );
    message(
        family,
        NLM_F_ACK,
        seq,
        ETHTOOL_MSG_FEATURES_SET,
        &[header, wanted].concat(),
    )
}

/// The attributes of a netlink message at `data[0..]` past its genl header, as (type, payload).
fn attributes(msg: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = msg.get(20..).unwrap_or_default();
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes(rest.get(0..2)?.try_into().ok()?));
        let kind = u16::from_ne_bytes(rest.get(2..4)?.try_into().ok()?);
        let payload = rest.get(4..len)?;
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some((kind & !NLA_F_NESTED, payload))
    })
}

/// A generic netlink socket.
struct Genl {
    socket: Socket,
}

impl Genl {
    fn open() -> Result<Genl, EthtoolError> {
        let mut socket = Socket::new(NETLINK_GENERIC).map_err(EthtoolError::Socket)?;
        socket.bind_auto().map_err(EthtoolError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(EthtoolError::Socket)?;
        Ok(Genl { socket })
    }

    /// Sends `request` and returns the first answer: a message, or the error code of an ACK.
    fn ask(&self, request: &[u8], what: &str) -> Result<Vec<u8>, EthtoolError> {
        self.socket.send(request, 0).map_err(EthtoolError::Socket)?;
        let (data, _) = self.socket.recv_from_full().map_err(EthtoolError::Socket)?;
        let kind = data.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]));
        if kind == Some(NLMSG_ERROR) {
            let code = data
                .get(16..20)
                .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
            if code != 0 {
                return Err(EthtoolError::Kernel {
                    what: what.to_string(),
                    source: std::io::Error::from_raw_os_error(-code),
                });
            }
        }
        Ok(data)
    }

    /// The id of the `ethtool` family.
    fn family(&self) -> Result<u16, EthtoolError> {
        let req = message(
            GENL_ID_CTRL,
            0,
            1,
            CTRL_CMD_GETFAMILY,
            &attr(CTRL_ATTR_FAMILY_NAME, &string("ethtool")),
        );
        let answer = self
            .ask(&req, "looking up the ethtool family")
            .map_err(|_| EthtoolError::NoFamily)?;
        let id = attributes(&answer)
            .find(|(k, _)| *k == CTRL_ATTR_FAMILY_ID)
            .and_then(|(_, v)| Some(u16::from_ne_bytes(v.get(0..2)?.try_into().ok()?)));
        id.ok_or(EthtoolError::NoFamily)
    }
}

/// Turns each of `features` (by the kernel's names, as `ethtool -k` lists them) on or off on
/// device `dev`, as `ethtool -K` does; features the device cannot change stay as they are.
pub fn set_features(dev: &str, features: &[(&str, bool)]) -> Result<(), EthtoolError> {
    let genl = Genl::open()?;
    let family = genl.family()?;
    genl.ask(
        &features_set(family, 2, dev, features),
        &format!("setting offloads {features:?} on {dev}"),
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_features_set_nests_names_and_values() {
        let m = features_set(
            0x1c,
            7,
            "pwv0p",
            &[("rx-gro", true), ("tx-checksum-sctp", false)],
        );
        assert_eq!(
            u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize,
            m.len()
        );
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), 0x1c);
        assert_eq!(m[16], ETHTOOL_MSG_FEATURES_SET);
        let top: Vec<(u16, &[u8])> = attributes(&m).collect();
        assert_eq!(top.len(), 2);
        assert_eq!(top[0].0, ETHTOOL_A_FEATURES_HEADER);
        assert_eq!(&top[0].1[4..10], b"pwv0p\0");
        assert_eq!(top[1].0, ETHTOOL_A_FEATURES_WANTED);
        // The GRO bit carries a VALUE flag (on); the SCTP one none (off).
        let text = String::from_utf8_lossy(top[1].1);
        assert!(text.contains("rx-gro") && text.contains("tx-checksum-sctp"));
        assert_eq!(top[1].1.len() % 4, 0);
    }
}
