//! flanneld's FORWARD accept rules (`-iptables-forward-rules`, on by default): on a host whose
//! FORWARD policy is DROP (Docker sets it), the kernel would drop the pod traffic it routes
//! between the pods' veths and podwire's device. Two rules accept it, from and to the cluster
//! network, as flanneld's `FLANNEL-FWD` chain does.
//!
//! An accept in a table of podwire's own would not do: every base chain on the forward hook
//! sees the packet and a drop in any of them wins. So the rules go where the DROP policy is,
//! the `FORWARD` chain of iptables-nft's `ip filter` table, appended (as flanneld appends its
//! jump), marked by their comment, re-added when they go missing (`iptables -F`, a firewall
//! reload) and deleted on exit. A host without that chain has no iptables FORWARD policy to
//! get past. iptables-legacy's tables are out of reach of nftables; a host using them is told
//! so once.

use crate::nft::{self, Action, Field, Listed, Match, NftError, Rule};
use podwire_dataplane::route::Ipv4Net;
use std::time::Duration;

/// iptables-nft's table and chain.
pub const TABLE: &str = "filter";
pub const CHAIN: &str = "FORWARD";
/// The comment that marks podwire's rules (`iptables -S FORWARD` shows it).
pub const COMMENT: &str = "podwire forward";
/// How often the rules are checked and re-added: flanneld's `-iptables-resync` default.
pub const RESYNC: Duration = Duration::from_secs(5);

/// The two accept rules for `network`.
pub fn rules(network: Ipv4Net) -> [Rule; 2] {
    [Field::Saddr, Field::Daddr].map(|field| Rule {
        matches: vec![Match::Ip {
            field,
            net: network,
            not: false,
        }],
        action: Action::Accept,
        comment: COMMENT,
    })
}

/// What [`ensure`] found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    /// Both rules were there.
    Present,
    /// They were added (with any partial set of ours deleted first).
    Added,
    /// There is no iptables-nft FORWARD chain: nothing to get past.
    NoChain,
}

fn ours(listed: &[Listed]) -> Vec<u64> {
    listed
        .iter()
        .filter(|r| r.comment.as_deref() == Some(COMMENT))
        .map(|r| r.handle)
        .collect()
}

/// Makes the chain hold podwire's two rules for `network`. With `replace`, ours are replaced
/// whatever is there (at start: a crashed run's, maybe for another network); otherwise they
/// are left alone when both are there.
pub fn ensure(network: Ipv4Net, replace: bool) -> Result<Ensured, NftError> {
    let mine = ours(&nft::list_rules(TABLE, CHAIN)?);
    if !replace && mine.len() == 2 {
        return Ok(Ensured::Present);
    }
    match nft::replace_rules(TABLE, CHAIN, &mine, &rules(network)) {
        Ok(()) => Ok(Ensured::Added),
        Err(e) if e.is_not_found() => Ok(Ensured::NoChain),
        Err(e) => Err(e),
    }
}

/// Deletes podwire's rules from the chain; how many there were.
pub fn remove() -> Result<usize, NftError> {
    let mine = ours(&nft::list_rules(TABLE, CHAIN)?);
    if mine.is_empty() {
        return Ok(0);
    }
    match nft::replace_rules(TABLE, CHAIN, &mine, &[]) {
        Err(e) if e.is_not_found() => Ok(0),
        other => other.map(|()| mine.len()),
    }
}

/// Whether iptables-legacy holds a filter table in this network namespace (its rules are not
/// nftables', so podwire cannot add to them).
pub fn legacy_filter_in_use() -> bool {
    std::fs::read_to_string("/proc/net/ip_tables_names")
        .is_ok_and(|names| names.lines().any(|n| n == "filter"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_rules_accept_from_and_to_the_network() {
        let net: Ipv4Net = "10.244.0.0/16".parse().unwrap();
        let [from, to] = rules(net);
        assert_eq!(from.action, Action::Accept);
        assert_eq!(
            from.matches,
            [Match::Ip {
                field: Field::Saddr,
                net,
                not: false
            }]
        );
        assert_eq!(
            to.matches,
            [Match::Ip {
                field: Field::Daddr,
                net,
                not: false
            }]
        );
    }

    #[test]
    fn test_only_rules_with_our_comment_are_ours() {
        let listed = [
            Listed {
                handle: 3,
                comment: Some("docker".into()),
            },
            Listed {
                handle: 4,
                comment: Some(COMMENT.into()),
            },
            Listed {
                handle: 5,
                comment: None,
            },
            Listed {
                handle: 9,
                comment: Some(COMMENT.into()),
            },
        ];
        assert_eq!(ours(&listed), [4, 9]);
    }
}
