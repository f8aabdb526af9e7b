//! `--ip-masq` in TUN mode: pod traffic leaving the cluster network is masqueraded by the
//! kernel, with flannel's own rule set (`pkg/trafficmngr/iptables` masqRules, in the same
//! order), written for nftables in a table of podwire's own that it replaces atomically at
//! start (removing what a crashed run left) and deletes on exit. The table goes to the kernel
//! through nftables' netlink interface ([`crate::nft`]), in-process.

use crate::nft::{Action, Field, Match, Rule};
use podwire_dataplane::route::Ipv4Net;

/// The table podwire owns.
pub const TABLE: &str = "podwire-masq";
/// Its one chain.
pub const CHAIN: &str = "postrouting";
/// kube-proxy's masquerade mark: traffic kube-proxy will masquerade itself is left alone.
const KUBE_PROXY_MARK: u32 = 0x4000;

pub use crate::nft::NftError as MasqError;

fn ip(field: Field, net: Ipv4Net, not: bool) -> Match {
    Match::Ip { field, net, not }
}

/// flannel's masquerade rules for a node holding `pod` in cluster `network`, in order. One
/// rule comes first that flannel does not have: traffic to the service range (`services`) is
/// left alone, because podwire translates it to pods after the kernel's POSTROUTING, where
/// kube-proxy's DNAT happens before it.
///
/// With `userspace` (the TUN device's name), podwire masquerades pods' TCP and UDP itself
/// ([`steer_pods`]): those, routed into the TUN, are left alone too (a rule for each).
pub fn rules(
    network: Ipv4Net,
    pod: Ipv4Net,
    services: Option<Ipv4Net>,
    userspace: Option<&str>,
) -> Vec<Rule> {
    use Field::{Daddr, Saddr};
    let rule = |matches, action, comment: &'static str| Rule {
        matches,
        action,
        comment: comment.into(),
    };
    let mut rules = Vec::new();
    if let Some(s) = services {
        rules.push(rule(
            vec![ip(Daddr, s, false)],
            Action::Return,
            "to services: podwire DNATs them to pods",
        ));
    }
    if let Some(tun) = userspace {
        for proto in [6, 17] {
            rules.push(rule(
                vec![
                    ip(Saddr, pod, false),
                    Match::OifName(tun.to_string()),
                    Match::L4Proto(proto),
                ],
                Action::Return,
                "podwire masquerades these",
            ));
        }
    }
    let multicast = Ipv4Net::containing(std::net::Ipv4Addr::new(224, 0, 0, 0), 4);
    rules.extend([
        rule(
            vec![Match::Mark {
                mask: KUBE_PROXY_MARK,
                value: KUBE_PROXY_MARK,
            }],
            Action::Return,
            "kube-proxy masquerades these",
        ),
        rule(
            vec![ip(Saddr, pod, false), ip(Daddr, network, false)],
            Action::Return,
            "pod to cluster",
        ),
        rule(
            vec![ip(Saddr, network, false), ip(Daddr, pod, false)],
            Action::Return,
            "cluster to pod",
        ),
        rule(
            vec![ip(Saddr, network, true), ip(Daddr, pod, false)],
            Action::Return,
            "outside to a pod of this node",
        ),
        rule(
            vec![ip(Saddr, network, false), ip(Daddr, multicast, true)],
            Action::MasqueradeFullyRandom,
            "pod to outside",
        ),
        rule(
            vec![ip(Saddr, network, true), ip(Daddr, network, false)],
            Action::MasqueradeFullyRandom,
            "host to cluster",
        ),
    ]);
    rules
}

/// Installs (or replaces) the rules: one transaction that also clears a crashed run's table.
pub fn install(
    network: Ipv4Net,
    pod: Ipv4Net,
    services: Option<Ipv4Net>,
    userspace: Option<&str>,
) -> Result<(), MasqError> {
    crate::nft::replace_nat_table(TABLE, CHAIN, &rules(network, pod, services, userspace))
}

/// Removes the table (nothing if it is not there).
pub fn remove() -> Result<(), MasqError> {
    crate::nft::remove_table(TABLE)
}

/// The routing table that steers pods' TCP and UDP into podwire when podwire masquerades them
/// itself (`--ip-masq` with `--io xdp`), and the priority of its rules (before `main`).
pub const POD_ROUTING_TABLE: u32 = 28791;
pub const POD_RULE_PRIORITY_NUM: u32 = 100;
/// [`POD_ROUTING_TABLE`] and [`POD_RULE_PRIORITY_NUM`] as `ip rule` shows them.
pub const POD_TABLE: &str = "28791";
pub const POD_RULE_PRIORITY: &str = "100";

/// `--ip-masq` with `--io xdp`: podwire owns the node's address on the wire and masquerades
/// pods' TCP and UDP itself. The kernel would send that traffic out of the node's interface
/// (and masquerade it with the rules above), past podwire; policy routing sends it into
/// `tun` instead: TCP and UDP from `pod` to anywhere but `keep` (the cluster network, the
/// service range, multicast, which the main table routes as before). Other protocols (ICMP)
/// stay with the kernel and its masquerade. Replies come in from `tun` with sources that the
/// main table routes elsewhere, so its reverse-path filter is made loose.
pub fn steer_pods(
    tun: &str,
    pod: Ipv4Net,
    keep: &[Ipv4Net],
) -> Result<(), crate::netdev::NetdevError> {
    use crate::rtnl::{Route, Rtnl};
    use netlink_packet_route::route::{RouteScope, RouteType};
    unsteer_pods();
    let mut rtnl = Rtnl::open()?;
    let dev = rtnl.index_of(tun)?;
    rtnl.route_replace(&Route {
        table: POD_ROUTING_TABLE,
        ..Route::dev(Ipv4Net::containing(std::net::Ipv4Addr::UNSPECIFIED, 0), dev)
    })?;
    let multicast = Ipv4Net::containing(std::net::Ipv4Addr::new(224, 0, 0, 0), 4);
    for net in keep.iter().chain([&multicast]) {
        rtnl.route_replace(&Route {
            dev: None,
            table: POD_ROUTING_TABLE,
            scope: RouteScope::Universe,
            kind: RouteType::Throw,
            ..Route::dev(*net, dev)
        })?;
    }
    for proto in [
        netlink_packet_route::IpProtocol::Tcp,
        netlink_packet_route::IpProtocol::Udp,
    ] {
        rtnl.rule_add(POD_RULE_PRIORITY_NUM, pod, proto, POD_ROUTING_TABLE)?;
    }
    let rp = format!("/proc/sys/net/ipv4/conf/{tun}/rp_filter");
    std::fs::write(&rp, "2")
        .map_err(|source| crate::netdev::NetdevError::Sysctl { path: rp, source })?;
    Ok(())
}

/// Removes the rules and the table's routes (also a crashed run's); nothing if absent.
pub fn unsteer_pods() {
    let mut rtnl = match crate::rtnl::Rtnl::open() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot remove the pod steering rules");
            return;
        }
    };
    // One rule per call; there are two, or a few more if runs crashed in between.
    for _ in 0..16 {
        if rtnl
            .rule_del(POD_RULE_PRIORITY_NUM, POD_ROUTING_TABLE)
            .is_err()
        {
            break;
        }
    }
    for route in rtnl.routes(POD_ROUTING_TABLE).unwrap_or_default() {
        if let Err(e) = rtnl.route_del(&route) {
            tracing::warn!(error = %e, "removing a pod steering route");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_steering_constants_agree() {
        assert_eq!(POD_TABLE, POD_ROUTING_TABLE.to_string());
        assert_eq!(POD_RULE_PRIORITY, POD_RULE_PRIORITY_NUM.to_string());
    }

    #[test]
    fn test_rules_are_flannels_in_order() {
        use Field::{Daddr, Saddr};
        let net: Ipv4Net = "10.244.0.0/16".parse().unwrap();
        let pod: Ipv4Net = "10.244.1.0/24".parse().unwrap();
        let r = rules(net, pod, None, None);
        let shape: Vec<(Vec<Match>, Action)> =
            r.iter().map(|r| (r.matches.clone(), r.action)).collect();
        let multicast: Ipv4Net = "224.0.0.0/4".parse().unwrap();
        assert_eq!(
            shape,
            vec![
                (
                    vec![Match::Mark {
                        mask: 0x4000,
                        value: 0x4000
                    }],
                    Action::Return
                ),
                (
                    vec![ip(Saddr, pod, false), ip(Daddr, net, false)],
                    Action::Return
                ),
                (
                    vec![ip(Saddr, net, false), ip(Daddr, pod, false)],
                    Action::Return
                ),
                (
                    vec![ip(Saddr, net, true), ip(Daddr, pod, false)],
                    Action::Return
                ),
                (
                    vec![ip(Saddr, net, false), ip(Daddr, multicast, true)],
                    Action::MasqueradeFullyRandom
                ),
                (
                    vec![ip(Saddr, net, true), ip(Daddr, net, false)],
                    Action::MasqueradeFullyRandom
                ),
            ]
        );
        let services: Ipv4Net = "10.96.0.0/12".parse().unwrap();
        let with_services = rules(net, pod, Some(services), None);
        assert_eq!(with_services.len(), 7);
        assert_eq!(with_services[0].matches, [ip(Daddr, services, false)]);
        let userspace = rules(net, pod, None, Some("flannel.1"));
        assert_eq!(userspace.len(), 8);
        for (rule, proto) in userspace.iter().zip([6, 17]) {
            assert_eq!(
                rule.matches,
                [
                    ip(Saddr, pod, false),
                    Match::OifName("flannel.1".into()),
                    Match::L4Proto(proto)
                ]
            );
            assert_eq!(rule.action, Action::Return);
        }
    }
}
