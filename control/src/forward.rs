//! flanneld's FORWARD accept rules (`-iptables-forward-rules`, on by default): on a host whose
//! FORWARD policy is DROP (Docker sets it), the kernel would drop the pod traffic it routes
//! between the pods' veths and podwire's device. Two rules accept it, from and to the cluster
//! network, as flanneld's `FLANNEL-FWD` chain does.
//!
//! An accept in a table of podwire's own would not do: every base chain on the forward hook
//! sees the packet and a drop in any of them wins. So the rules go where the DROP policy is,
//! the `FORWARD` chain of iptables-nft's `ip filter` table, appended (as flanneld appends its
//! jump), marked by their comment (which names the network, so two daemons of two networks in
//! one namespace keep to their own), re-added when they go missing (`iptables -F`, a firewall
//! reload) and deleted on exit. A host without that chain has no iptables FORWARD policy to
//! get past. iptables-legacy's tables are out of reach of nftables; a host using them is told
//! so once. None of this stops the node: forwarding does not depend on it where no DROP
//! policy is, so an error is logged and the next check tries again.

use crate::nft::{self, Action, Field, Listed, Match, NftError, Rule};
use podwire_dataplane::route::Ipv4Net;
use std::time::Duration;

/// iptables-nft's table and chain.
pub const TABLE: &str = "filter";
pub const CHAIN: &str = "FORWARD";
/// The comment that marks podwire's rules (`iptables -S FORWARD` shows it), before the network.
pub const COMMENT: &str = "podwire forward";
/// How often the rules are checked and re-added: flanneld's `-iptables-resync` default.
pub const RESYNC: Duration = Duration::from_secs(5);

/// The comment of the rules for `network`, e.g. `podwire forward 10.244.0.0/16`.
pub fn comment(network: Ipv4Net) -> String {
    format!("{COMMENT} {network}")
}

/// The two accept rules for `network`.
pub fn rules(network: Ipv4Net) -> [Rule; 2] {
    [Field::Saddr, Field::Daddr].map(|field| Rule {
        matches: vec![Match::Ip {
            field,
            net: network,
            not: false,
        }],
        action: Action::Accept,
        comment: comment(network).into(),
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

/// The handles of the rules for `network` (each once).
fn ours(listed: &[Listed], network: Ipv4Net) -> Vec<u64> {
    let comment = comment(network);
    let mut handles: Vec<u64> = listed
        .iter()
        .filter(|r| r.comment.as_deref() == Some(comment.as_str()))
        .map(|r| r.handle)
        .collect();
    handles.sort_unstable();
    handles.dedup();
    handles
}

/// Listings and changes tried before giving up on a chain that keeps changing under us (a
/// rule deleted between the listing and the change fails the change as a missing chain does).
const ATTEMPTS: usize = 3;

/// Runs `attempt` on the handles of our rules as listed now, listing again (up to
/// [`ATTEMPTS`] times) when the listing was interrupted or the chain changed before the change
/// it made (a deleted rule fails a change as a missing chain does).
fn on_fresh_listing<T>(
    network: Ipv4Net,
    mut attempt: impl FnMut(Vec<u64>) -> Result<T, NftError>,
) -> Result<T, NftError> {
    let mut tries = 1;
    loop {
        let result =
            nft::list_rules(TABLE, CHAIN).and_then(|listed| attempt(ours(&listed, network)));
        match result {
            Err(e)
                if tries < ATTEMPTS && (e.is_not_found() || matches!(e, NftError::Interrupted)) =>
            {
                tries += 1;
            }
            other => return other,
        }
    }
}

/// Makes the chain hold podwire's two rules for `network`. With `replace`, ours are replaced
/// whatever is there (at start: a crashed run's); otherwise they are left alone when both are
/// there.
pub fn ensure(network: Ipv4Net, replace: bool) -> Result<Ensured, NftError> {
    on_fresh_listing(network, |mine| {
        if !replace && mine.len() == 2 {
            return Ok(Ensured::Present);
        }
        match nft::replace_rules(TABLE, CHAIN, &mine, &rules(network)) {
            Ok(()) => Ok(Ensured::Added),
            // With nothing to delete, only the chain can be missing.
            Err(e) if e.is_not_found() && mine.is_empty() => Ok(Ensured::NoChain),
            Err(e) => Err(e),
        }
    })
}

/// Deletes podwire's rules for `network` from the chain; how many there were.
pub fn remove(network: Ipv4Net) -> Result<usize, NftError> {
    on_fresh_listing(network, |mine| {
        if mine.is_empty() {
            return Ok(0);
        }
        nft::replace_rules(TABLE, CHAIN, &mine, &[]).map(|()| mine.len())
    })
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
        let net: Ipv4Net = "10.244.0.0/16".parse().unwrap();
        let other: Ipv4Net = "10.245.0.0/16".parse().unwrap();
        let listed = [
            Listed {
                handle: 3,
                comment: Some("docker".into()),
            },
            Listed {
                handle: 4,
                comment: Some(comment(net)),
            },
            Listed {
                handle: 6,
                comment: Some(comment(other)),
            },
            Listed {
                handle: 5,
                comment: None,
            },
            Listed {
                handle: 9,
                comment: Some(comment(net)),
            },
            Listed {
                handle: 4,
                comment: Some(comment(net)),
            },
        ];
        assert_eq!(ours(&listed, net), [4, 9]);
        assert_eq!(ours(&listed, other), [6]);
        assert_eq!(comment(net), "podwire forward 10.244.0.0/16");
    }
}
