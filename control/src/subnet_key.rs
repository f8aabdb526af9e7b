//! flannel's form of a subnet inside store keys (`10.244.1.0-24`, the `/` of a prefix being the
//! etcd path separator), as its etcd registry and subnet file write them. The dataplane knows
//! prefixes; only the control side knows how flannel names them.

use podwire_dataplane::route::{Ipv4Net, NetError};
use std::net::Ipv4Addr;

/// Why a key is not a flannel subnet key.
#[derive(Debug, thiserror::Error)]
pub enum SubnetKeyError {
    #[error("{0:?} is not a flannel subnet key (want a.b.c.d-len)")]
    Syntax(String),
    #[error("subnet key {key:?}: {source}")]
    Prefix { key: String, source: NetError },
}

/// Parses flannel's subnet key form `10.244.1.0-24`.
pub fn parse(key: &str) -> Result<Ipv4Net, SubnetKeyError> {
    let syntax = || SubnetKeyError::Syntax(key.to_string());
    let (addr, len) = key.split_once('-').ok_or_else(syntax)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
    let prefix: u8 = len.parse().map_err(|_| syntax())?;
    Ipv4Net::new(addr, prefix).map_err(|source| SubnetKeyError::Prefix {
        key: key.to_string(),
        source,
    })
}

/// flannel's subnet key form of `net`: `10.244.1.0-24`.
pub fn of(net: &Ipv4Net) -> String {
    format!("{}-{}", net.addr(), net.prefix())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_keys_round_trip_and_bad_ones_are_refused() {
        let n = parse("10.244.1.0-24").unwrap();
        assert_eq!(n.to_string(), "10.244.1.0/24");
        assert_eq!(of(&n), "10.244.1.0-24");
        assert_eq!(of(&"10.244.0.0/16".parse().unwrap()), "10.244.0.0-16");
        for bad in [
            "10.244.1.0/24",
            "10.244.1.0",
            "10.244.1-24",
            "10.244.1.0-x",
            "",
        ] {
            assert!(
                matches!(parse(bad), Err(SubnetKeyError::Syntax(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse("10.244.1.1-24"),
            Err(SubnetKeyError::Prefix {
                source: NetError::HostBits(_),
                ..
            })
        ));
        assert!(matches!(
            parse("10.244.1.0-33"),
            Err(SubnetKeyError::Prefix {
                source: NetError::PrefixLen(33),
                ..
            })
        ));
    }
}
