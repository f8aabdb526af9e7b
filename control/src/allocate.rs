//! Which subnet a node takes, decided exactly as flanneld's `tryAcquireLease` decides it.
//!
//! Pure: the store lists the leases, [`choose`] picks, the store then writes (a conditional
//! create for a new subnet, so two nodes choosing the same one cannot both win; the loser
//! lists again and chooses again).

use crate::config::NetworkConfig;
use crate::lease::LeaseAttrs;
use podwire_dataplane::route::Ipv4Net;
use rand::Rng;
use rustc_hash::FxHashSet;
use std::net::Ipv4Addr;

/// flanneld considers at most this many free subnets and takes one of them at random.
pub const MAX_CANDIDATES: usize = 100;

/// What to do to hold a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// A lease with our PublicIP exists and fits the config: rewrite it (renewing it).
    Reuse(Ipv4Net),
    /// Create this free subnet (our previous one from subnet.env, or a random free one).
    Create(Ipv4Net),
    /// No free subnet between SubnetMin and SubnetMax.
    Exhausted,
}

/// The decision plus the leases with our PublicIP that no longer fit the config (flanneld
/// deletes them before it takes another subnet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub choice: Choice,
    pub delete: Vec<Ipv4Net>,
}

/// True if `subnet` is one flanneld would hand out under `cfg` (`isSubnetConfigCompat`).
pub fn compatible(cfg: &NetworkConfig, subnet: &Ipv4Net) -> bool {
    subnet.prefix() == cfg.subnet_len
        && cfg.network.covers(subnet)
        && subnet.addr() >= cfg.subnet_min
        && subnet.addr() <= cfg.subnet_max
}

/// Chooses our subnet given every lease in the store (`(subnet, attrs)`), our PublicIP and the
/// subnet of the previous run's subnet.env.
pub fn choose<'a>(
    cfg: &NetworkConfig,
    leases: impl IntoIterator<Item = (Ipv4Net, &'a LeaseAttrs)> + Clone,
    public_ip: Ipv4Addr,
    previous: Option<Ipv4Net>,
    rng: &mut impl Rng,
) -> Decision {
    let mut delete = Vec::new();
    for (subnet, attrs) in leases.clone() {
        if attrs.public_ip != public_ip {
            continue;
        }
        if compatible(cfg, &subnet) {
            return Decision {
                choice: Choice::Reuse(subnet),
                delete,
            };
        }
        delete.push(subnet);
    }
    // Subnets are aligned and all of one length once compatible, so "taken" is a set of network
    // addresses; incompatible leases (other lengths) are checked for overlap separately.
    let mut taken = FxHashSet::default();
    let mut odd = Vec::new();
    for (subnet, _) in leases {
        if delete.contains(&subnet) {
            continue;
        }
        if subnet.prefix() == cfg.subnet_len {
            taken.insert(subnet.addr());
        } else {
            odd.push(subnet);
        }
    }
    let free =
        |s: &Ipv4Net| !taken.contains(&s.addr()) && !odd.iter().any(|o| o.covers(s) || s.covers(o));
    if let Some(prev) = previous {
        if compatible(cfg, &prev) && free(&prev) {
            return Decision {
                choice: Choice::Create(prev),
                delete,
            };
        }
    }
    let step = 1u64 << (32 - u32::from(cfg.subnet_len));
    let mut candidates = Vec::with_capacity(MAX_CANDIDATES);
    let mut at = u64::from(cfg.subnet_min.to_bits());
    let max = u64::from(cfg.subnet_max.to_bits());
    while at <= max && candidates.len() < MAX_CANDIDATES {
        let subnet = Ipv4Net::containing(Ipv4Addr::from_bits(at as u32), cfg.subnet_len);
        if free(&subnet) {
            candidates.push(subnet);
        }
        at += step;
    }
    let choice = if candidates.is_empty() {
        Choice::Exhausted
    } else {
        Choice::Create(candidates[rng.random_range(0..candidates.len())])
    };
    Decision { choice, delete }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_net_conf;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn cfg(text: &str) -> NetworkConfig {
        parse_net_conf(text).unwrap()
    }
    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn test_reuses_the_lease_with_our_public_ip() {
        let c = cfg(r#"{"Network":"10.244.0.0/16"}"#);
        let a = LeaseAttrs::udp(ip("192.168.0.1"));
        let b = LeaseAttrs::udp(ip("192.168.0.2"));
        let leases = [(net("10.244.7.0/24"), &a), (net("10.244.9.0/24"), &b)];
        let d = choose(
            &c,
            leases,
            ip("192.168.0.2"),
            Some(net("10.244.3.0/24")),
            &mut StdRng::seed_from_u64(1),
        );
        assert_eq!(d.choice, Choice::Reuse(net("10.244.9.0/24")));
        assert!(d.delete.is_empty());
    }

    #[test]
    fn test_incompatible_own_lease_is_deleted_then_previous_subnet_is_taken() {
        let c = cfg(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.10.0"}"#);
        let a = LeaseAttrs::udp(ip("192.168.0.1"));
        let leases = [(net("10.244.3.0/24"), &a)];
        let d = choose(
            &c,
            leases,
            ip("192.168.0.1"),
            Some(net("10.244.20.0/24")),
            &mut StdRng::seed_from_u64(1),
        );
        assert_eq!(d.choice, Choice::Create(net("10.244.20.0/24")));
        assert_eq!(d.delete, vec![net("10.244.3.0/24")]);
    }

    #[test]
    fn test_previous_subnet_skipped_when_taken_or_incompatible() {
        let c = cfg(r#"{"Network":"10.244.0.0/16"}"#);
        let other = LeaseAttrs::udp(ip("192.168.0.9"));
        let leases = [(net("10.244.5.0/24"), &other)];
        for prev in ["10.244.5.0/24", "10.244.0.0/24", "10.244.5.0/25"] {
            let d = choose(
                &c,
                leases,
                ip("192.168.0.1"),
                Some(net(prev)),
                &mut StdRng::seed_from_u64(2),
            );
            match d.choice {
                Choice::Create(s) => {
                    assert_ne!(s, net(prev));
                    assert!(compatible(&c, &s));
                    assert_ne!(s, net("10.244.5.0/24"));
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn test_random_choice_among_first_hundred_free() {
        let c = cfg(r#"{"Network":"10.0.0.0/8","SubnetLen":24}"#);
        let mut seen = FxHashSet::default();
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..500 {
            let d = choose(&c, [], ip("192.168.0.1"), None, &mut rng);
            let Choice::Create(s) = d.choice else {
                panic!()
            };
            // The first subnet is skipped (SubnetMin default); candidates are 10.0.1.0..10.0.100.0.
            let third = s.addr().octets()[2];
            assert!(
                s.addr().octets()[1] == 0 && (1..=100).contains(&third),
                "{s}"
            );
            seen.insert(s);
        }
        assert!(seen.len() > 50, "choice is random: {}", seen.len());
    }

    #[test]
    fn test_exhausted_and_overlap_with_odd_lengths() {
        let c = cfg(r#"{"Network":"10.244.0.0/22","SubnetLen":24}"#);
        let a = LeaseAttrs::udp(ip("192.168.0.8"));
        // SubnetMin .1.0, SubnetMax .3.0: three subnets; a stray /23 covers two of them.
        let leases = [(net("10.244.2.0/23"), &a), (net("10.244.1.0/24"), &a)];
        let d = choose(
            &c,
            leases,
            ip("192.168.0.1"),
            None,
            &mut StdRng::seed_from_u64(4),
        );
        assert_eq!(d.choice, Choice::Exhausted);
        let leases = [(net("10.244.2.0/23"), &a)];
        let d = choose(
            &c,
            leases,
            ip("192.168.0.1"),
            None,
            &mut StdRng::seed_from_u64(4),
        );
        assert_eq!(d.choice, Choice::Create(net("10.244.1.0/24")));
    }
}
