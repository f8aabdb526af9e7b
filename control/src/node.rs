//! Node setup as owned parts: each piece of host state `podwire run` creates is a value that
//! undoes exactly what it did when it is dropped, so an error at any step of the setup (a `?`)
//! leaves nothing behind, and so does a normal stop.
//!
//! | part | made by | undone on drop |
//! |---|---|---|
//! | [`MasqTable`] | `--ip-masq` | the nftables table `podwire-masq` is deleted |
//! | [`ForwardRules`] | `--iptables-forward-rules` (default) | podwire's two accepts leave iptables' FORWARD chain |
//! | [`PodSteering`] | `--ip-masq --io xdp` | the policy rules and the steering table's routes go |
//! | [`HostRoute`] | the service range into the TUN | the route is deleted |
//! | [`netdev::DirectRoutes`] | VXLAN `DirectRouting` | every route it installed is deleted |
//! | `XdpProgram` (dataplane) | `--io xdp`, `--pod-ports` | the program is detached |
//! | `l2::VethPort` | `--l2-pods xdp` attach | the pair is deleted |
//! | TUN and TAP devices | the device's descriptors | the kernel deletes the device (and its addresses and routes) when the last one closes |
//!
//! Teardown runs after the capability drop ([`crate::privs`]): everything here needs only
//! `CAP_NET_ADMIN`, which every mode keeps.
//!
//! [`Steps`] is the failure-injection hook of the setup: with `--fault-injection` and
//! `PODWIRE_FAIL_SETUP_AFTER=N` in the environment, setup fails right after its N-th step
//! (the netns test `node_setup_leaves_nothing_behind` fails each step in turn and looks for
//! residue). Without `--fault-injection` the variable is ignored.

use crate::forward;
use crate::masq::{self, MasqError};
use crate::netdev::{self, NetdevError};
use podwire_dataplane::route::Ipv4Net;
use std::net::Ipv4Addr;

/// The environment variable [`Steps`] reads (with `--fault-injection` only).
pub const FAIL_AFTER_ENV: &str = "PODWIRE_FAIL_SETUP_AFTER";

/// Why node setup stopped.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The failure [`Steps`] was told to inject.
    #[error("injected failure after setup step {n} ({step}) ({FAIL_AFTER_ENV})")]
    Injected { n: usize, step: &'static str },
}

/// Counts node setup's steps, failing after the one `PODWIRE_FAIL_SETUP_AFTER` names.
#[derive(Debug, Default)]
pub struct Steps {
    done: usize,
    fail_after: Option<usize>,
}

impl Steps {
    /// Reads [`FAIL_AFTER_ENV`] when `fault_injection` is on; otherwise never fails.
    pub fn from_env(fault_injection: bool) -> Steps {
        let fail_after = fault_injection
            .then(|| std::env::var(FAIL_AFTER_ENV).ok()?.parse().ok())
            .flatten();
        Steps {
            done: 0,
            fail_after,
        }
    }

    /// Fails after the `n`-th step (counted from 1).
    pub fn failing_after(n: usize) -> Steps {
        Steps {
            done: 0,
            fail_after: Some(n),
        }
    }

    /// Records that `step` is done; the injected failure if it was the one to fail after.
    pub fn done(&mut self, step: &'static str) -> Result<(), SetupError> {
        self.done += 1;
        tracing::debug!(n = self.done, step, "node setup step done");
        if self.fail_after == Some(self.done) {
            return Err(SetupError::Injected { n: self.done, step });
        }
        Ok(())
    }

    /// How many steps are done.
    pub fn count(&self) -> usize {
        self.done
    }
}

/// podwire's nftables table of masquerade rules (`--ip-masq`); deleted on drop.
#[derive(Debug)]
pub struct MasqTable(());

impl MasqTable {
    /// Installs (or replaces) the table: see [`masq::rules`].
    pub fn install(
        network: Ipv4Net,
        pod: Ipv4Net,
        services: Option<Ipv4Net>,
        userspace: Option<&str>,
    ) -> Result<MasqTable, MasqError> {
        masq::install(network, pod, services, userspace)?;
        Ok(MasqTable(()))
    }
}

impl Drop for MasqTable {
    fn drop(&mut self) {
        if let Err(e) = masq::remove() {
            tracing::warn!(error = %e, "removing the masquerade rules");
        }
    }
}

/// podwire's FORWARD accept rules for the cluster network ([`forward`]); kept while the node
/// runs ([`ForwardRules::resync`]) and deleted on drop. Never fatal: where nftables refuses
/// (no nf_tables in the kernel, no permission), the node forwards as it would without them,
/// says so, and tries again at the next check.
#[derive(Debug)]
pub struct ForwardRules {
    network: Ipv4Net,
    /// What the last check found (`None`: it failed), to log changes only.
    last: Option<forward::Ensured>,
}

impl ForwardRules {
    /// Adds the rules, replacing any a crashed run left.
    pub fn install(network: Ipv4Net) -> ForwardRules {
        let last = match forward::ensure(network, true) {
            Ok(forward::Ensured::NoChain) => {
                tracing::info!(
                    "no iptables FORWARD chain (iptables-nft's ip filter) here: no FORWARD accept rules needed; checked again every {:?}",
                    forward::RESYNC
                );
                Some(forward::Ensured::NoChain)
            }
            Ok(found) => {
                tracing::info!(%network, comment = forward::comment(network), "pod network accepted in iptables' FORWARD chain");
                Some(found)
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not add the FORWARD accept rules (a FORWARD policy of DROP would drop pod traffic); trying again every {:?}", forward::RESYNC);
                None
            }
        };
        if forward::legacy_filter_in_use() {
            tracing::warn!(
                "iptables-legacy has a filter table here, which podwire cannot add to: if its FORWARD policy is DROP, accept {network} there (iptables-legacy -A FORWARD -s {network} -j ACCEPT, and -d)"
            );
        }
        ForwardRules { network, last }
    }

    /// Adds the rules again if they went missing (a flush, a firewall reload, a chain made
    /// since); logs what changed since the last check.
    pub fn resync(&mut self) {
        use forward::Ensured::{Added, NoChain};
        let now = forward::ensure(self.network, false);
        let network = self.network;
        match (&self.last, &now) {
            (Some(NoChain), Ok(Added)) => {
                tracing::info!(%network, "iptables' FORWARD chain appeared; pod network accepted in it")
            }
            (None, Ok(Added)) => tracing::info!(%network, "FORWARD accept rules added"),
            (_, Ok(Added)) => tracing::warn!(
                %network,
                "podwire's FORWARD accept rules were missing from iptables' FORWARD chain; added again"
            ),
            (Some(_), Err(e)) => tracing::warn!(error = %e, "checking the FORWARD accept rules"),
            _ => {}
        }
        self.last = now.ok();
    }
}

impl Drop for ForwardRules {
    fn drop(&mut self) {
        if let Err(e) = forward::remove(self.network) {
            tracing::warn!(error = %e, "removing the FORWARD accept rules");
        }
    }
}

/// The policy rules and routing table that steer pods' TCP and UDP into podwire
/// ([`masq::steer_pods`]); removed on drop.
#[derive(Debug)]
pub struct PodSteering(());

impl PodSteering {
    pub fn install(tun: &str, pod: Ipv4Net, keep: &[Ipv4Net]) -> Result<PodSteering, NetdevError> {
        // Owned from the first rule on: a failure half-way removes what was made.
        let steering = PodSteering(());
        masq::steer_pods(tun, pod, keep)?;
        Ok(steering)
    }
}

impl Drop for PodSteering {
    fn drop(&mut self) {
        masq::unsteer_pods();
    }
}

/// A route `dst dev DEV` podwire added; deleted on drop.
#[derive(Debug)]
pub struct HostRoute {
    dst: Ipv4Net,
    dev: String,
}

impl HostRoute {
    pub fn replace(dst: Ipv4Net, dev: &str) -> Result<HostRoute, NetdevError> {
        netdev::route_replace_dev(dst, dev)?;
        Ok(HostRoute {
            dst,
            dev: dev.to_string(),
        })
    }
}

impl Drop for HostRoute {
    fn drop(&mut self) {
        // Gone already when its device went first: nothing to undo then.
        let _ = netdev::route_del_dev(self.dst, &self.dev);
    }
}

/// The routes that bring the services' external IPs into podwire's device, one `/32` each,
/// following the live services; every one is deleted when this is dropped.
pub struct ExternalIpRoutes {
    dev: String,
    routes: std::collections::BTreeMap<Ipv4Addr, HostRoute>,
}

impl ExternalIpRoutes {
    pub fn new(dev: &str) -> ExternalIpRoutes {
        ExternalIpRoutes {
            dev: dev.to_string(),
            routes: Default::default(),
        }
    }

    /// Routes exactly `ips` into the device: the others' routes go, new ones are added. A
    /// route the kernel refuses is logged and tried again at the next change.
    pub fn sync(&mut self, ips: &[Ipv4Addr]) {
        self.routes.retain(|ip, _| ips.binary_search(ip).is_ok());
        for &ip in ips {
            if self.routes.contains_key(&ip) {
                continue;
            }
            let route = Ipv4Net::new(ip, 32)
                .map_err(|e| e.to_string())
                .and_then(|net| HostRoute::replace(net, &self.dev).map_err(|e| e.to_string()));
            match route {
                Ok(r) => {
                    self.routes.insert(ip, r);
                }
                Err(e) => {
                    tracing::error!(%ip, error = %e, "cannot route an external IP into podwire")
                }
            }
        }
    }
}

/// L2 mode's pods on veth pairs (`--l2-pods xdp`), shared with `podwire ctl attach`: every
/// pair still attached is deleted when this is dropped.
pub struct OwnedVeths(crate::l2::Veths);

impl OwnedVeths {
    pub fn new(veths: crate::l2::Veths) -> OwnedVeths {
        OwnedVeths(veths)
    }
}

impl Drop for OwnedVeths {
    fn drop(&mut self) {
        // Each pair's program comes off, then the pair goes.
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_steps_fail_after_the_nth_only() {
        let mut steps = Steps::failing_after(2);
        assert!(steps.done("one").is_ok());
        let err = steps.done("two").unwrap_err();
        assert!(matches!(err, SetupError::Injected { n: 2, step: "two" }));
        assert!(steps.done("three").is_ok());
        assert_eq!(steps.count(), 3);
        let mut never = Steps::default();
        assert!((0..50).all(|_| never.done("x").is_ok()));
    }
}
