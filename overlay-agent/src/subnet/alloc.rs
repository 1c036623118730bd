//! Choosing this node's subnet, in flannel's order: the lease that already
//! carries our PublicIP (if it still fits the config), else the subnet
//! remembered in the previous subnet.env (if free and fitting), else a random
//! free subnet in [SubnetMin, SubnetMax].
//!
//! Pure: the etcd side lists the leases, calls [`plan`], and creates the key
//! with a transaction; when it loses a race it calls [`plan`] again with the
//! lost subnet in `avoid`.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use rand::Rng;

use crate::flannel::{
    config::{Ipv6Range, NetworkConfig},
    lease::LeaseSubnets,
};

/// A key found under `<prefix>/subnets/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Existing {
    pub subnet: Ipv4Net,
    /// The IPv6 subnet of a dual-stack key.
    pub ipv6: Option<Ipv6Net>,
    /// `None` when the value could not be decoded: the subnet is still taken.
    pub public_ip: Option<Ipv4Addr>,
    /// The key has no etcd lease attached: an operator's permanent reservation.
    pub reservation: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Our PublicIP already holds this subnet: overwrite the value in place
    /// (a reservation stays a reservation). The key's IPv6 subnet, if it
    /// has one, is [`Plan::ipv6`].
    Reuse { subnet: Ipv4Net, reservation: bool },
    /// Create the subnet named in the previous subnet.env.
    Previous(Ipv4Net),
    /// Create a free subnet picked at random.
    Random(Ipv4Net),
}

impl Choice {
    pub fn subnet(&self) -> Ipv4Net {
        match *self {
            Choice::Reuse { subnet, .. } | Choice::Previous(subnet) | Choice::Random(subnet) => {
                subnet
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub choice: Choice,
    /// The IPv6 subnet: the reused key's, or one chosen beside a new IPv4
    /// subnet when the config enables IPv6.
    pub ipv6: Option<Ipv6Net>,
    /// Leases (not reservations) with our PublicIP that no longer fit the
    /// config: flannel deletes them before allocating, and so do we.
    pub stale: Vec<LeaseSubnets>,
}

impl Plan {
    /// The key's subnets.
    pub fn subnets(&self) -> LeaseSubnets {
        LeaseSubnets {
            v4: self.choice.subnet(),
            v6: self.ipv6,
        }
    }
}

/// The subnets remembered in the previous subnet.env.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Previous {
    pub v4: Option<Ipv4Net>,
    pub v6: Option<Ipv6Net>,
}

impl From<Option<Ipv4Net>> for Previous {
    fn from(v4: Option<Ipv4Net>) -> Self {
        Previous { v4, v6: None }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllocError {
    #[error(
        "no free subnet: all {total} /{len} subnets in [{min}, {max}] are leased, reserved or \
         were lost to other nodes"
    )]
    Exhausted {
        min: Ipv4Addr,
        max: Ipv4Addr,
        len: u8,
        total: u64,
    },
    #[error(
        "no free IPv6 subnet: all {total} /{len} subnets in [{min}, {max}] are leased, reserved \
         or were lost to other nodes"
    )]
    ExhaustedV6 {
        min: Ipv6Addr,
        max: Ipv6Addr,
        len: u8,
        total: u64,
    },
    #[error(
        "the reservation {subnet} for this node's PublicIP {public_ip} does not fit the network \
         config (/{len} in [{min}, {max}]); fix or delete the reservation"
    )]
    ReservationDoesNotFit {
        subnet: Ipv4Net,
        public_ip: Ipv4Addr,
        len: u8,
        min: Ipv4Addr,
        max: Ipv4Addr,
    },
}

/// Decide which subnet to hold. `avoid` lists subnets that were lost to
/// another node since `existing` was read.
pub fn plan(
    config: &NetworkConfig,
    existing: &[Existing],
    public_ip: Ipv4Addr,
    previous: Previous,
    avoid: &[Ipv4Net],
    rng: &mut impl Rng,
) -> Result<Plan, AllocError> {
    let mut stale = Vec::new();
    for e in existing.iter().filter(|e| e.public_ip == Some(public_ip)) {
        // flannel's isIPv6SubnetConfigCompat: with IPv6 on, the lease must
        // hold a fitting IPv6 subnet too (a v4-only lease is replaced).
        let ipv6_fits = match (&config.ipv6, e.ipv6) {
            (None, _) => true,
            (Some(range), Some(v6)) => range.fits(v6),
            (Some(_), None) => false,
        };
        if config.fits(e.subnet) && ipv6_fits {
            return Ok(Plan {
                choice: Choice::Reuse {
                    subnet: e.subnet,
                    reservation: e.reservation,
                },
                ipv6: e.ipv6,
                stale,
            });
        }
        if e.reservation {
            // An operator's reservation is never deleted behind their back.
            return Err(AllocError::ReservationDoesNotFit {
                subnet: e.subnet,
                public_ip,
                len: config.subnet_len,
                min: config.subnet_min,
                max: config.subnet_max,
            });
        }
        stale.push(LeaseSubnets {
            v4: e.subnet,
            v6: e.ipv6,
        });
    }

    // Leases being deleted as stale are free again.
    let live = || {
        existing
            .iter()
            .filter(|e| !stale.iter().any(|s| s.v4 == e.subnet && s.v6 == e.ipv6))
    };
    let taken: Vec<Ipv4Net> = live()
        .map(|e| e.subnet)
        .chain(avoid.iter().copied())
        .collect();
    let ipv6 = match &config.ipv6 {
        None => None,
        Some(range) => {
            let taken6: Vec<Ipv6Net> = live().filter_map(|e| e.ipv6).collect();
            Some(plan_ipv6(range, &taken6, previous.v6, rng)?)
        }
    };

    if let Some(prev) = previous.v4
        && config.fits(prev)
        && !taken.iter().any(|t| overlaps(*t, prev))
    {
        return Ok(Plan {
            choice: Choice::Previous(prev),
            ipv6,
            stale,
        });
    }

    let subnet = pick_free(config, &taken, rng).ok_or(AllocError::Exhausted {
        min: config.subnet_min,
        max: config.subnet_max,
        len: config.subnet_len,
        total: config.subnet_count(),
    })?;
    Ok(Plan {
        choice: Choice::Random(subnet),
        ipv6,
        stale,
    })
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The IPv6 half of a dual-stack lease, chosen on its own as flannel's
/// `allocateSubnet` does: the one remembered in subnet.env
/// (FLANNEL_IPV6_SUBNET) if it fits and is free, else a random free one.
/// `taken` holds the IPv6 subnets of the other leases.
pub fn plan_ipv6(
    range: &Ipv6Range,
    taken: &[Ipv6Net],
    previous: Option<Ipv6Net>,
    rng: &mut impl Rng,
) -> Result<Ipv6Net, AllocError> {
    if let Some(prev) = previous
        && range.fits(prev)
        && !taken
            .iter()
            .any(|t| t.contains(&prev.network()) || prev.contains(&t.network()))
    {
        return Ok(prev);
    }
    let host_bits = 128 - u32::from(range.subnet_len);
    let min = u128::from(range.subnet_min);
    let count = ((u128::from(range.subnet_max) - min) >> host_bits) + 1;
    let blocked = taken
        .iter()
        .map(|t| (u128::from(t.network()), u128::from(t.broadcast())));
    let addr =
        pick_free_index(min, host_bits, count, blocked, rng).ok_or(AllocError::ExhaustedV6 {
            min: range.subnet_min,
            max: range.subnet_max,
            len: range.subnet_len,
            total: range.subnet_count(),
        })?;
    Ok(Ipv6Net::new(Ipv6Addr::from(addr), range.subnet_len).expect("valid prefix length"))
}

/// A uniformly random subnet in [SubnetMin, SubnetMax] that overlaps nothing
/// in `taken`.
fn pick_free(config: &NetworkConfig, taken: &[Ipv4Net], rng: &mut impl Rng) -> Option<Ipv4Net> {
    let blocked = taken.iter().map(|t| {
        (
            u128::from(u32::from(t.network())),
            u128::from(u32::from(t.broadcast())),
        )
    });
    let addr = pick_free_index(
        u128::from(u32::from(config.subnet_min)),
        32 - u32::from(config.subnet_len),
        u128::from(config.subnet_count()),
        blocked,
        rng,
    )?;
    // Inside [SubnetMin, SubnetMax], so inside the 32-bit space.
    Some(Ipv4Net::new(Ipv4Addr::from(addr as u32), config.subnet_len).expect("valid prefix length"))
}

/// The start of a uniformly random subnet among `count` subnets of
/// `2^host_bits` addresses from `min` that touches no `(first, last)`
/// address range in `blocked`. Works on index ranges, so a /8 cut into /30s
/// (or an IPv6 /32 into /64s) costs no more than a /16 cut into /24s.
fn pick_free_index(
    min: u128,
    host_bits: u32,
    count: u128,
    blocked: impl Iterator<Item = (u128, u128)>,
    rng: &mut impl Rng,
) -> Option<u128> {
    let last = min + ((count << host_bits) - 1);
    // Subnet indexes [lo, hi] that each taken range touches.
    let mut blocked: Vec<(u128, u128)> = blocked
        .filter_map(|(start, end)| {
            if end < min || start > last {
                return None;
            }
            let lo = start.saturating_sub(min) >> host_bits;
            let hi = ((end - min) >> host_bits).min(count - 1);
            Some((lo, hi))
        })
        .collect();
    blocked.sort_unstable();

    // Free index ranges between the (merged) blocked ones.
    let mut free: Vec<(u128, u128)> = Vec::new();
    let mut next = 0u128;
    for (lo, hi) in blocked {
        if lo > next {
            free.push((next, lo - 1));
        }
        next = next.max(hi + 1);
    }
    if next < count {
        free.push((next, count - 1));
    }
    let total: u128 = free.iter().map(|(lo, hi)| hi - lo + 1).sum();
    if total == 0 {
        return None;
    }
    let mut k = rng.random_range(0..total);
    for (lo, hi) in free {
        let n = hi - lo + 1;
        if k < n {
            return Some(min + ((lo + k) << host_bits));
        }
        k -= n;
    }
    unreachable!("k < total")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::StdRng};

    fn cfg(s: &str) -> NetworkConfig {
        NetworkConfig::parse(s.as_bytes()).unwrap()
    }
    fn dual(ipv6_fields: &str) -> NetworkConfig {
        let mut c = NetworkConfig::parse_with_ipv6_for_tests(ipv6_fields);
        c.subnet_min = ip("10.0.1.0");
        c.subnet_max = ip("10.0.20.0");
        c
    }
    fn seed004() -> NetworkConfig {
        cfg(
            r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "SubnetMin": "10.0.1.0","SubnetMax": "10.0.20.0", "Backend": {"Type": "vxlan"}}"#,
        )
    }
    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    fn lease(subnet: &str, public_ip: &str) -> Existing {
        Existing {
            subnet: net(subnet),
            ipv6: None,
            public_ip: Some(ip(public_ip)),
            reservation: false,
        }
    }
    fn prev(s: &str) -> Previous {
        Previous {
            v4: Some(net(s)),
            v6: None,
        }
    }
    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    #[test]
    fn reuses_own_lease_when_it_fits() {
        let c = seed004();
        let existing = [
            lease("10.0.14.0/24", "10.211.55.11"),
            lease("10.0.13.0/24", "10.211.55.10"),
        ];
        let p = plan(
            &c,
            &existing,
            ip("10.211.55.10"),
            prev("10.0.5.0/24"),
            &[],
            &mut rng(),
        )
        .unwrap();
        assert_eq!(
            p.choice,
            Choice::Reuse {
                subnet: net("10.0.13.0/24"),
                reservation: false
            }
        );
        assert!(p.stale.is_empty());
    }

    #[test]
    fn reservation_is_reused_as_reservation() {
        let c = seed004();
        let mut r = lease("10.0.7.0/24", "10.211.55.10");
        r.reservation = true;
        let p = plan(
            &c,
            &[r],
            ip("10.211.55.10"),
            Previous::default(),
            &[],
            &mut rng(),
        )
        .unwrap();
        assert_eq!(
            p.choice,
            Choice::Reuse {
                subnet: net("10.0.7.0/24"),
                reservation: true
            }
        );
    }

    #[test]
    fn own_lease_outside_config_is_stale_and_freed() {
        let c = seed004();
        // 10.0.30.0/24 is above SubnetMax; 10.0.2.0/25 has the wrong length.
        let existing = [
            lease("10.0.30.0/24", "10.211.55.10"),
            lease("10.0.2.0/25", "10.211.55.10"),
        ];
        let p = plan(
            &c,
            &existing,
            ip("10.211.55.10"),
            prev("10.0.2.0/24"),
            &[],
            &mut rng(),
        )
        .unwrap();
        assert_eq!(
            p.stale,
            vec![net("10.0.30.0/24").into(), net("10.0.2.0/25").into()]
        );
        // The stale /25 no longer blocks the remembered /24.
        assert_eq!(p.choice, Choice::Previous(net("10.0.2.0/24")));
    }

    #[test]
    fn reservation_outside_config_is_an_error_not_deleted() {
        let c = seed004();
        let mut r = lease("10.0.30.0/24", "10.211.55.10");
        r.reservation = true;
        let e = plan(
            &c,
            &[r],
            ip("10.211.55.10"),
            Previous::default(),
            &[],
            &mut rng(),
        )
        .unwrap_err();
        assert!(matches!(e, AllocError::ReservationDoesNotFit { .. }));
    }

    #[test]
    fn previous_subnet_used_only_if_free_and_fitting() {
        let c = seed004();
        let other = [lease("10.0.13.0/24", "10.211.55.99")];
        let me = ip("10.211.55.10");
        let p = plan(&c, &[], me, prev("10.0.13.0/24"), &[], &mut rng()).unwrap();
        assert_eq!(p.choice, Choice::Previous(net("10.0.13.0/24")));
        // Held by someone else: random instead, and not that one.
        let p = plan(&c, &other, me, prev("10.0.13.0/24"), &[], &mut rng()).unwrap();
        assert!(matches!(p.choice, Choice::Random(s) if s != net("10.0.13.0/24")));
        // Lost in a race: avoided.
        let p = plan(
            &c,
            &[],
            me,
            prev("10.0.13.0/24"),
            &[net("10.0.13.0/24")],
            &mut rng(),
        )
        .unwrap();
        assert!(matches!(p.choice, Choice::Random(s) if s != net("10.0.13.0/24")));
        // Outside [SubnetMin, SubnetMax]: ignored.
        let p = plan(&c, &[], me, prev("10.0.0.0/24"), &[], &mut rng()).unwrap();
        assert!(matches!(p.choice, Choice::Random(_)));
        // Malformed lease value still occupies its subnet.
        let bad = Existing {
            subnet: net("10.0.13.0/24"),
            ipv6: None,
            public_ip: None,
            reservation: false,
        };
        let p = plan(&c, &[bad], me, prev("10.0.13.0/24"), &[], &mut rng()).unwrap();
        assert!(matches!(p.choice, Choice::Random(s) if s != net("10.0.13.0/24")));
    }

    #[test]
    fn random_covers_every_free_subnet_and_nothing_else() {
        let c = seed004();
        // Take everything but 10.0.4.0 and 10.0.17.0, partly through a wider lease.
        let mut existing: Vec<Existing> = (1..=20)
            .filter(|i| ![4, 17, 8, 9, 10, 11].contains(i))
            .map(|i| lease(&format!("10.0.{i}.0/24"), "192.0.2.1"))
            .collect();
        existing.push(lease("10.0.8.0/22", "192.0.2.2"));
        let mut seen = std::collections::BTreeSet::new();
        let mut r = rng();
        for _ in 0..200 {
            let p = plan(
                &c,
                &existing,
                ip("10.211.55.10"),
                Previous::default(),
                &[],
                &mut r,
            )
            .unwrap();
            seen.insert(p.choice.subnet());
        }
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            vec![net("10.0.4.0/24"), net("10.0.17.0/24")]
        );
    }

    #[test]
    fn exhausted_is_a_clear_error() {
        let c = seed004();
        let existing: Vec<Existing> = (1..=20)
            .map(|i| lease(&format!("10.0.{i}.0/24"), "192.0.2.1"))
            .collect();
        let e = plan(
            &c,
            &existing,
            ip("10.211.55.10"),
            Previous::default(),
            &[],
            &mut rng(),
        )
        .unwrap_err();
        assert_eq!(
            e,
            AllocError::Exhausted {
                min: ip("10.0.1.0"),
                max: ip("10.0.20.0"),
                len: 24,
                total: 20
            }
        );
        assert!(e.to_string().contains("all 20 /24 subnets"));
        // A covering lease (e.g. the whole network) also exhausts it.
        let e = plan(
            &c,
            &[lease("10.0.0.0/16", "192.0.2.1")],
            ip("10.211.55.10"),
            Previous::default(),
            &[],
            &mut rng(),
        );
        assert!(e.is_err());
    }

    #[test]
    fn large_spaces_are_cheap() {
        let c = cfg(r#"{"Network":"10.0.0.0/8","SubnetLen":30,"Backend":{"Type":"vxlan"}}"#);
        assert_eq!(c.subnet_count(), (1 << 22) - 1);
        let p = plan(
            &c,
            &[],
            ip("192.0.2.1"),
            Previous::default(),
            &[],
            &mut rng(),
        )
        .unwrap();
        let s = p.choice.subnet();
        assert!(c.fits(s), "{s}");
        // The edges are reachable and the first subnet never is.
        let all_but_last: Vec<Existing> = vec![
            lease("10.0.0.0/9", "192.0.2.9"),
            lease("10.128.0.0/10", "192.0.2.9"),
            lease("10.192.0.0/11", "192.0.2.9"),
            lease("10.224.0.0/12", "192.0.2.9"),
            lease("10.240.0.0/13", "192.0.2.9"),
            lease("10.248.0.0/14", "192.0.2.9"),
            lease("10.252.0.0/15", "192.0.2.9"),
            lease("10.254.0.0/16", "192.0.2.9"),
            lease("10.255.0.0/17", "192.0.2.9"),
            lease("10.255.128.0/18", "192.0.2.9"),
            lease("10.255.192.0/19", "192.0.2.9"),
            lease("10.255.224.0/20", "192.0.2.9"),
            lease("10.255.240.0/21", "192.0.2.9"),
            lease("10.255.248.0/22", "192.0.2.9"),
            lease("10.255.252.0/23", "192.0.2.9"),
            lease("10.255.254.0/24", "192.0.2.9"),
            lease("10.255.255.0/25", "192.0.2.9"),
            lease("10.255.255.128/26", "192.0.2.9"),
            lease("10.255.255.192/27", "192.0.2.9"),
            lease("10.255.255.224/28", "192.0.2.9"),
            lease("10.255.255.240/29", "192.0.2.9"),
            lease("10.255.255.248/30", "192.0.2.9"),
        ];
        let p = plan(
            &c,
            &all_but_last,
            ip("192.0.2.1"),
            Previous::default(),
            &[],
            &mut rng(),
        )
        .unwrap();
        assert_eq!(p.choice, Choice::Random(net("10.255.255.252/30")));
    }

    fn range6(s: &str) -> Ipv6Range {
        NetworkConfig::parse_with_ipv6_for_tests(s).ipv6.unwrap()
    }

    fn net6(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_previous_then_random_free() {
        let r = range6(r#""IPv6Network":"fc00::/48","IPv6SubnetMax":"fc00:0:0:4::""#);
        // Remembered and free: kept.
        let prev = net6("fc00:0:0:3::/64");
        assert_eq!(plan_ipv6(&r, &[], Some(prev), &mut rng()).unwrap(), prev);
        // Taken by another lease, or not fitting: a random free one instead.
        let taken = [net6("fc00:0:0:3::/64"), net6("fc00:0:0:1::/64")];
        let mut seen = std::collections::BTreeSet::new();
        let mut g = rng();
        for _ in 0..100 {
            seen.insert(plan_ipv6(&r, &taken, Some(prev), &mut g).unwrap());
        }
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            vec![net6("fc00:0:0:2::/64"), net6("fc00:0:0:4::/64")]
        );
        assert_ne!(
            plan_ipv6(&r, &[], Some(net6("fc00:0:0:3::/80")), &mut rng()).unwrap(),
            net6("fc00:0:0:3::/80")
        );
        // All four taken (one through a covering /62): a clear error.
        let e = plan_ipv6(
            &r,
            &[net6("fc00::/62"), net6("fc00:0:0:4::/64")],
            None,
            &mut rng(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("all 4 /64"), "{e}");
    }

    #[test]
    fn dual_stack_leases_are_reused_only_whole() {
        let c = dual(r#""IPv6Network":"fc00::/48""#);
        let me = ip("10.211.55.10");
        let mut own = lease("10.0.13.0/24", "10.211.55.10");
        // A v4-only lease of ours (IPv6 just turned on) is replaced, as
        // flannel does: a new pair, the old key deleted.
        let p = plan(&c, &[own], me, prev("10.0.13.0/24"), &[], &mut rng()).unwrap();
        assert_eq!(p.stale, vec![net("10.0.13.0/24").into()]);
        assert_eq!(p.choice, Choice::Previous(net("10.0.13.0/24")));
        assert!(c.ipv6.unwrap().fits(p.ipv6.unwrap()));
        // A fitting dual-stack lease is reused whole.
        own.ipv6 = Some(net6("fc00:0:0:9::/64"));
        let p = plan(&c, &[own], me, Previous::default(), &[], &mut rng()).unwrap();
        assert_eq!(
            p.subnets(),
            LeaseSubnets {
                v4: net("10.0.13.0/24"),
                v6: Some(net6("fc00:0:0:9::/64"))
            }
        );
        assert!(p.stale.is_empty());
        // Its IPv6 half outside the range: stale.
        own.ipv6 = Some(net6("fc01:0:0:9::/64"));
        let p = plan(&c, &[own], me, Previous::default(), &[], &mut rng()).unwrap();
        assert_eq!(p.stale.len(), 1);
        // Other nodes' IPv6 subnets are not handed out again; the
        // remembered one is kept when free.
        let mut other = lease("10.0.14.0/24", "10.211.55.11");
        other.ipv6 = Some(net6("fc00:0:0:5::/64"));
        let previous = Previous {
            v4: None,
            v6: Some(net6("fc00:0:0:5::/64")),
        };
        let p = plan(&c, &[other], me, previous, &[], &mut rng()).unwrap();
        assert_ne!(p.ipv6, Some(net6("fc00:0:0:5::/64")));
        let previous = Previous {
            v4: None,
            v6: Some(net6("fc00:0:0:6::/64")),
        };
        let p = plan(&c, &[other], me, previous, &[], &mut rng()).unwrap();
        assert_eq!(p.ipv6, Some(net6("fc00:0:0:6::/64")));
        // Without IPv6 in the config a dual-stack key of ours is reused as it
        // is (the key cannot change), and nothing IPv6 is chosen.
        own.ipv6 = Some(net6("fc00:0:0:9::/64"));
        let p = plan(&seed004(), &[own], me, Previous::default(), &[], &mut rng()).unwrap();
        assert_eq!(p.ipv6, Some(net6("fc00:0:0:9::/64")));
        let p = plan(&seed004(), &[], me, Previous::default(), &[], &mut rng()).unwrap();
        assert_eq!(p.ipv6, None);
    }

    #[test]
    fn ipv6_large_spaces_are_cheap() {
        // 2^64 - 1 /64s in a /0-sized index space would overflow u64.
        let r = range6(r#""IPv6Network":"fc00::/8","IPv6SubnetLen":72"#);
        let s = plan_ipv6(&r, &[net6("fc00::/9")], None, &mut rng()).unwrap();
        assert!(r.fits(s) && !net6("fc00::/9").contains(&s.network()), "{s}");
    }
}
