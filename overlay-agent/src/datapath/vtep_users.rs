//! Which peer subnets use each VTEP public IP, so that the eBPF datapath
//! knows in O(1) when a removal or a move leaves a VTEP unused and its
//! KNOWN_VTEPS and PEER_STATS entries can go, instead of scanning
//! REMOTE_SUBNETS.
//!
//! Every peer the maps hold counts once under its public IP: a vxlan peer
//! (its REMOTE_SUBNETS entry) and a direct peer (DirectRouting: no
//! REMOTE_SUBNETS entry, but ingress must still accept its VXLAN, so its
//! KNOWN_VTEPS entry must stay while it is there). The table is built while
//! the maps are filled at start-up and changed only after the maps accepted
//! a change.

use std::{collections::HashMap, hash::Hash, net::Ipv4Addr};

use ipnet::Ipv4Net;

/// `A` is the public IP's type: the IPv4 VTEP, or (the nft guard of a
/// dual-stack node) the IPv6 one. Peers are keyed by their IPv4 subnet
/// either way, as the reconciler names them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VtepUsers<A: Eq + Hash = Ipv4Addr> {
    /// Each peer subnet in the maps (by its network address) and its public IP.
    by_subnet: HashMap<Ipv4Net, A>,
    /// How many of those subnets use each public IP (no zero counts).
    count: HashMap<A, u32>,
}

impl<A: Eq + Hash> Default for VtepUsers<A> {
    fn default() -> Self {
        VtepUsers {
            by_subnet: HashMap::new(),
            count: HashMap::new(),
        }
    }
}

impl<A: Copy + Eq + Hash> VtepUsers<A> {
    /// The public IP `subnet`'s peer uses in the maps.
    pub fn public_ip(&self, subnet: Ipv4Net) -> Option<A> {
        self.by_subnet.get(&subnet.trunc()).copied()
    }

    /// Whether some peer in the maps uses `ip`.
    pub fn in_use(&self, ip: A) -> bool {
        self.count.contains_key(&ip)
    }

    /// The public IPs in use, each once.
    pub fn ips(&self) -> impl Iterator<Item = A> + '_ {
        self.count.keys().copied()
    }

    /// How many peer subnets the table holds.
    pub fn len(&self) -> usize {
        self.by_subnet.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_subnet.is_empty()
    }

    /// `subnet`'s peer now uses `ip`. Returns the public IP it used before
    /// when no peer uses that one any more.
    pub fn set(&mut self, subnet: Ipv4Net, ip: A) -> Option<A> {
        let old = self.by_subnet.insert(subnet.trunc(), ip);
        if old == Some(ip) {
            return None;
        }
        *self.count.entry(ip).or_insert(0) += 1;
        old.filter(|old| self.release(*old))
    }

    /// `subnet`'s peer left the maps. Returns its public IP when no peer
    /// uses it any more.
    pub fn remove(&mut self, subnet: Ipv4Net) -> Option<A> {
        let old = self.by_subnet.remove(&subnet.trunc())?;
        self.release(old).then_some(old)
    }

    /// Drops one use of `ip`; whether that was the last.
    fn release(&mut self, ip: A) -> bool {
        match self.count.get_mut(&ip) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.count.remove(&ip);
                true
            }
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn a_vtep_is_unused_when_its_last_subnet_goes() {
        let mut u = VtepUsers::<Ipv4Addr>::default();
        // One node with two leases (or a vxlan and a direct peer) on one IP.
        assert_eq!(u.set(net("10.5.1.0/24"), ip("192.168.1.1")), None);
        assert_eq!(u.set(net("10.5.2.0/24"), ip("192.168.1.1")), None);
        assert_eq!(u.set(net("10.5.3.0/24"), ip("192.168.1.3")), None);
        assert_eq!(u.len(), 3);
        assert!(u.in_use(ip("192.168.1.1")));
        assert_eq!(u.remove(net("10.5.1.0/24")), None);
        assert!(u.in_use(ip("192.168.1.1")));
        assert_eq!(u.remove(net("10.5.2.0/24")), Some(ip("192.168.1.1")));
        assert!(!u.in_use(ip("192.168.1.1")));
        // Removing what is not there releases nothing.
        assert_eq!(u.remove(net("10.5.2.0/24")), None);
        assert_eq!(u.public_ip(net("10.5.3.0/24")), Some(ip("192.168.1.3")));
    }

    #[test]
    fn a_move_releases_the_old_ip_only_when_unused() {
        let mut u = VtepUsers::<Ipv4Addr>::default();
        u.set(net("10.5.1.0/24"), ip("192.168.1.1"));
        u.set(net("10.5.2.0/24"), ip("192.168.1.1"));
        // Re-adding the same is no change.
        assert_eq!(u.set(net("10.5.1.0/24"), ip("192.168.1.1")), None);
        assert_eq!(u.set(net("10.5.1.0/24"), ip("192.168.1.9")), None);
        assert_eq!(
            u.set(net("10.5.2.0/24"), ip("192.168.1.9")),
            Some(ip("192.168.1.1"))
        );
        assert!(u.in_use(ip("192.168.1.9")));
        assert!(!u.in_use(ip("192.168.1.1")));
        assert_eq!(u.remove(net("10.5.1.0/24")), None);
        assert_eq!(u.remove(net("10.5.2.0/24")), Some(ip("192.168.1.9")));
        assert!(u.is_empty());
        assert_eq!(u, VtepUsers::<Ipv4Addr>::default());
    }

    #[test]
    fn subnets_are_keyed_by_their_network() {
        let mut u = VtepUsers::<Ipv4Addr>::default();
        u.set(net("10.5.1.7/24"), ip("192.168.1.1"));
        assert_eq!(u.public_ip(net("10.5.1.0/24")), Some(ip("192.168.1.1")));
        assert_eq!(u.remove(net("10.5.1.0/24")), Some(ip("192.168.1.1")));
    }
}
