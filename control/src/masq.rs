//! `--ip-masq` in TUN mode: pod traffic leaving the cluster network is masqueraded by the
//! kernel, with flannel's own rule set (`pkg/trafficmngr/iptables` masqRules, in the same
//! order), written for nftables in a table of podwire's own that it replaces atomically at
//! start (removing what a crashed run left) and deletes on exit.

use podwire_dataplane::route::Ipv4Net;
use std::io::Write;
use std::process::{Command, Stdio};

/// The table podwire owns.
pub const TABLE: &str = "podwire-masq";
/// kube-proxy's masquerade mark: traffic kube-proxy will masquerade itself is left alone.
const KUBE_PROXY_MARK: u32 = 0x4000;

#[derive(Debug, thiserror::Error)]
pub enum MasqError {
    #[error("running nft: {0} (install Debian's nftables)")]
    Spawn(std::io::Error),
    #[error("nft refused the {what}: {stderr}")]
    Nft { what: &'static str, stderr: String },
}

/// flannel's masquerade rules for a node holding `pod` in cluster `network`, as an nft script
/// that (re)creates the table in one transaction. One rule comes first that flannel does not
/// have: traffic to the service range (`services`) is left alone, because podwire translates
/// it to pods after the kernel's POSTROUTING, where kube-proxy's DNAT happens before it.
///
/// With `userspace` (the TUN device's name), podwire masquerades pods' TCP and UDP itself
/// ([`steer_pods`]): those, routed into the TUN, are left alone too.
pub fn ruleset(
    network: Ipv4Net,
    pod: Ipv4Net,
    services: Option<Ipv4Net>,
    userspace: Option<&str>,
) -> String {
    let mut services = services
        .map(|s| {
            format!("\t\tip daddr {s} return comment \"to services: podwire DNATs them to pods\"\n")
        })
        .unwrap_or_default();
    if let Some(tun) = userspace {
        services += &format!(
            "\t\tip saddr {pod} oifname \"{tun}\" meta l4proto {{ tcp, udp }} return comment \"podwire masquerades these\"\n"
        );
    }
    format!(
        "table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         {services}\
         \t\tmeta mark & {KUBE_PROXY_MARK:#x} == {KUBE_PROXY_MARK:#x} return comment \"kube-proxy masquerades these\"\n\
         \t\tip saddr {pod} ip daddr {network} return comment \"pod to cluster\"\n\
         \t\tip saddr {network} ip daddr {pod} return comment \"cluster to pod\"\n\
         \t\tip saddr != {network} ip daddr {pod} return comment \"outside to a pod of this node\"\n\
         \t\tip saddr {network} ip daddr != 224.0.0.0/4 masquerade fully-random comment \"pod to outside\"\n\
         \t\tip saddr != {network} ip daddr {network} masquerade fully-random comment \"host to cluster\"\n\
         \t}}\n\
         }}\n"
    )
}

fn nft(script: &str, what: &'static str) -> Result<(), MasqError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(MasqError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(MasqError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(MasqError::Spawn)?;
    if !out.status.success() {
        return Err(MasqError::Nft {
            what,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Installs (or replaces) the rules.
pub fn install(
    network: Ipv4Net,
    pod: Ipv4Net,
    services: Option<Ipv4Net>,
    userspace: Option<&str>,
) -> Result<(), MasqError> {
    nft(
        &ruleset(network, pod, services, userspace),
        "masquerade rules",
    )
}

/// Removes the table (nothing if it is not there).
pub fn remove() -> Result<(), MasqError> {
    nft(
        &format!("table ip {TABLE}\ndelete table ip {TABLE}\n"),
        "table removal",
    )
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
        let r = ruleset(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
            None,
            None,
        );
        let rules: Vec<&str> = r
            .lines()
            .map(str::trim)
            .filter(|l| l.contains("return") || l.contains("masquerade"))
            .collect();
        assert_eq!(rules.len(), 6, "{r}");
        assert!(rules[0].starts_with("meta mark & 0x4000 == 0x4000 return"));
        assert!(rules[1].starts_with("ip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return"));
        assert!(rules[2].starts_with("ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return"));
        assert!(rules[3].starts_with("ip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 return"));
        assert!(rules[4]
            .starts_with("ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random"));
        assert!(rules[5].starts_with(
            "ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random"
        ));
        // Re-creating is one transaction that also clears a crashed run's table.
        assert!(r.starts_with("table ip podwire-masq\ndelete table ip podwire-masq\n"));
        let with_services = ruleset(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
            Some("10.96.0.0/12".parse().unwrap()),
            None,
        );
        let first = with_services
            .lines()
            .map(str::trim)
            .find(|l| l.contains("return"))
            .unwrap();
        assert!(
            first.starts_with("ip daddr 10.96.0.0/12 return"),
            "{with_services}"
        );
        let userspace = ruleset(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
            None,
            Some("flannel.1"),
        );
        let first = userspace
            .lines()
            .map(str::trim)
            .find(|l| l.contains("return"))
            .unwrap();
        assert!(
            first.starts_with(
                "ip saddr 10.244.1.0/24 oifname \"flannel.1\" meta l4proto { tcp, udp } return"
            ),
            "{userspace}"
        );
    }
}
