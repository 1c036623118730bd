//! Choosing this node's subnet, in flannel's order: the lease that already
//! carries our PublicIP (if it still fits the config), else the subnet
//! remembered in the previous subnet.env (if free and fitting), else a random
//! free subnet in [SubnetMin, SubnetMax].
//!
//! Pure: the etcd side lists the leases, calls [`plan`], and creates the key
//! with a transaction; when it loses a race it calls [`plan`] again with the
//! lost subnet in `avoid`.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use rand::Rng;

use crate::flannel::config::NetworkConfig;

/// A key found under `<prefix>/subnets/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Existing {
    pub subnet: Ipv4Net,
    /// `None` when the value could not be decoded: the subnet is still taken.
    pub public_ip: Option<Ipv4Addr>,
    /// The key has no etcd lease attached: an operator's permanent reservation.
    pub reservation: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Our PublicIP already holds this subnet: overwrite the value in place
    /// (a reservation stays a reservation).
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
    /// Leases (not reservations) with our PublicIP that no longer fit the
    /// config: flannel deletes them before allocating, and so do we.
    pub stale: Vec<Ipv4Net>,
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
    previous: Option<Ipv4Net>,
    avoid: &[Ipv4Net],
    rng: &mut impl Rng,
) -> Result<Plan, AllocError> {
    let mut stale = Vec::new();
    for e in existing.iter().filter(|e| e.public_ip == Some(public_ip)) {
        if config.fits(e.subnet) {
            return Ok(Plan {
                choice: Choice::Reuse {
                    subnet: e.subnet,
                    reservation: e.reservation,
                },
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
        stale.push(e.subnet);
    }

    // Leases being deleted as stale are free again.
    let taken: Vec<Ipv4Net> = existing
        .iter()
        .map(|e| e.subnet)
        .filter(|s| !stale.contains(s))
        .chain(avoid.iter().copied())
        .collect();

    if let Some(prev) = previous
        && config.fits(prev)
        && !taken.iter().any(|t| overlaps(*t, prev))
    {
        return Ok(Plan {
            choice: Choice::Previous(prev),
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
        stale,
    })
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// A uniformly random subnet in [SubnetMin, SubnetMax] that overlaps nothing
/// in `taken`. Works on index ranges, so a /8 cut into /30s costs no more
/// than a /16 cut into /24s.
fn pick_free(config: &NetworkConfig, taken: &[Ipv4Net], rng: &mut impl Rng) -> Option<Ipv4Net> {
    let min = u64::from(u32::from(config.subnet_min));
    let size = u64::from(config.subnet_size());
    let count = config.subnet_count();

    // Subnet indexes [lo, hi] that each taken range touches.
    let mut blocked: Vec<(u64, u64)> = taken
        .iter()
        .filter_map(|t| {
            let start = u64::from(u32::from(t.network()));
            let end = u64::from(u32::from(t.broadcast()));
            let last = min + count * size - 1;
            if end < min || start > last {
                return None;
            }
            let lo = start.saturating_sub(min) / size;
            let hi = ((end - min) / size).min(count - 1);
            Some((lo, hi))
        })
        .collect();
    blocked.sort_unstable();

    // Free index ranges between the (merged) blocked ones.
    let mut free: Vec<(u64, u64)> = Vec::new();
    let mut next = 0u64;
    for (lo, hi) in blocked {
        if lo > next {
            free.push((next, lo - 1));
        }
        next = next.max(hi + 1);
    }
    if next < count {
        free.push((next, count - 1));
    }
    let total: u64 = free.iter().map(|(lo, hi)| hi - lo + 1).sum();
    if total == 0 {
        return None;
    }
    let mut k = rng.random_range(0..total);
    for (lo, hi) in free {
        let n = hi - lo + 1;
        if k < n {
            let addr = Ipv4Addr::from((min + (lo + k) * size) as u32);
            return Some(Ipv4Net::new(addr, config.subnet_len).expect("valid prefix length"));
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
            public_ip: Some(ip(public_ip)),
            reservation: false,
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
            Some(net("10.0.5.0/24")),
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
        let p = plan(&c, &[r], ip("10.211.55.10"), None, &[], &mut rng()).unwrap();
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
            Some(net("10.0.2.0/24")),
            &[],
            &mut rng(),
        )
        .unwrap();
        assert_eq!(p.stale, vec![net("10.0.30.0/24"), net("10.0.2.0/25")]);
        // The stale /25 no longer blocks the remembered /24.
        assert_eq!(p.choice, Choice::Previous(net("10.0.2.0/24")));
    }

    #[test]
    fn reservation_outside_config_is_an_error_not_deleted() {
        let c = seed004();
        let mut r = lease("10.0.30.0/24", "10.211.55.10");
        r.reservation = true;
        let e = plan(&c, &[r], ip("10.211.55.10"), None, &[], &mut rng()).unwrap_err();
        assert!(matches!(e, AllocError::ReservationDoesNotFit { .. }));
    }

    #[test]
    fn previous_subnet_used_only_if_free_and_fitting() {
        let c = seed004();
        let other = [lease("10.0.13.0/24", "10.211.55.99")];
        let me = ip("10.211.55.10");
        let p = plan(&c, &[], me, Some(net("10.0.13.0/24")), &[], &mut rng()).unwrap();
        assert_eq!(p.choice, Choice::Previous(net("10.0.13.0/24")));
        // Held by someone else: random instead, and not that one.
        let p = plan(&c, &other, me, Some(net("10.0.13.0/24")), &[], &mut rng()).unwrap();
        assert!(matches!(p.choice, Choice::Random(s) if s != net("10.0.13.0/24")));
        // Lost in a race: avoided.
        let p = plan(
            &c,
            &[],
            me,
            Some(net("10.0.13.0/24")),
            &[net("10.0.13.0/24")],
            &mut rng(),
        )
        .unwrap();
        assert!(matches!(p.choice, Choice::Random(s) if s != net("10.0.13.0/24")));
        // Outside [SubnetMin, SubnetMax]: ignored.
        let p = plan(&c, &[], me, Some(net("10.0.0.0/24")), &[], &mut rng()).unwrap();
        assert!(matches!(p.choice, Choice::Random(_)));
        // Malformed lease value still occupies its subnet.
        let bad = Existing {
            subnet: net("10.0.13.0/24"),
            public_ip: None,
            reservation: false,
        };
        let p = plan(&c, &[bad], me, Some(net("10.0.13.0/24")), &[], &mut rng()).unwrap();
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
            let p = plan(&c, &existing, ip("10.211.55.10"), None, &[], &mut r).unwrap();
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
        let e = plan(&c, &existing, ip("10.211.55.10"), None, &[], &mut rng()).unwrap_err();
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
            None,
            &[],
            &mut rng(),
        );
        assert!(e.is_err());
    }

    #[test]
    fn large_spaces_are_cheap() {
        let c = cfg(r#"{"Network":"10.0.0.0/8","SubnetLen":30,"Backend":{"Type":"vxlan"}}"#);
        assert_eq!(c.subnet_count(), (1 << 22) - 1);
        let p = plan(&c, &[], ip("192.0.2.1"), None, &[], &mut rng()).unwrap();
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
        let p = plan(&c, &all_but_last, ip("192.0.2.1"), None, &[], &mut rng()).unwrap();
        assert_eq!(p.choice, Choice::Random(net("10.255.255.252/30")));
    }
}
