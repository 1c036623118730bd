//! What `flannel.<VNI>` holds of the peers' neighbours and FDB entries, kept
//! in memory so that adding or removing a peer needs no dump of the device.
//!
//! It is learned from one dump of each ([`EntryTable::from_dump`]) whenever
//! the datapath reads the device back (setup, adoption, the reconciler's
//! recheck), and then changed only after the kernel accepted a change, so it
//! never records what did not happen. Every question a peer event asks of it
//! (the MAC a gateway has, whether another neighbour still uses a MAC, which
//! FDB entries an update left stale) costs O(1) in the number of peers.

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
};

use super::family::IpFamily;
use crate::flannel::mac::MacAddr;

/// The permanent neighbours (gateway -> MAC) and unicast FDB entries
/// (MAC -> destinations) of one device, of family `A` (`flannel.<VNI>`'s
/// are IPv4, `flannel-v6.<VNI>`'s IPv6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryTable<A: IpFamily = Ipv4Addr> {
    neighbours: HashMap<A, MacAddr>,
    /// How many neighbours have each MAC (no zero counts).
    mac_users: HashMap<MacAddr, u32>,
    /// Each FDB entry's remotes in the kernel's order: `replace` changes the
    /// first, `del ... dst` removes one, `del` without `dst` all of them.
    fdb: HashMap<MacAddr, Vec<A>>,
    /// The FDB entries no neighbour uses, by destination: the candidates for
    /// removal once a peer's MAC moves, found without scanning the FDB.
    unused_by_dst: HashMap<A, BTreeSet<MacAddr>>,
}

impl<A: IpFamily> Default for EntryTable<A> {
    fn default() -> Self {
        Self {
            neighbours: HashMap::new(),
            mac_users: HashMap::new(),
            fdb: HashMap::new(),
            unused_by_dst: HashMap::new(),
        }
    }
}

impl<A: IpFamily> EntryTable<A> {
    /// The table for a device whose dump listed these entries.
    pub fn from_dump(neighbours: &[(A, MacAddr)], fdb: &[(MacAddr, A)]) -> Self {
        let mut table = Self::default();
        for &(mac, dst) in fdb {
            table.change_fdb(mac, |remotes| {
                if !remotes.contains(&dst) {
                    remotes.push(dst);
                }
            });
        }
        for &(ip, mac) in neighbours {
            table.set_neighbour(ip, mac);
        }
        table
    }

    /// How many neighbours the table holds.
    pub fn neighbour_count(&self) -> usize {
        self.neighbours.len()
    }

    /// How many FDB entries (MACs) the table holds.
    pub fn fdb_count(&self) -> usize {
        self.fdb.len()
    }

    /// The MAC of the neighbour `ip`.
    pub fn neighbour(&self, ip: A) -> Option<MacAddr> {
        self.neighbours.get(&ip).copied()
    }

    /// The destinations of `mac`'s FDB entry, first remote first (empty when
    /// there is none).
    pub fn fdb_destinations(&self, mac: MacAddr) -> &[A] {
        self.fdb.get(&mac).map_or(&[], Vec::as_slice)
    }

    /// The first destination of `mac`'s FDB entry: where the vxlan driver
    /// sends a frame for it.
    pub fn fdb_destination(&self, mac: MacAddr) -> Option<A> {
        self.fdb_destinations(mac).first().copied()
    }

    /// Whether a neighbour other than `ip` has `mac`.
    pub fn used_by_other(&self, mac: MacAddr, ip: A) -> bool {
        let users = self.mac_users.get(&mac).copied().unwrap_or(0);
        let own = u32::from(self.neighbour(ip) == Some(mac));
        users > own
    }

    /// The neighbour `ip` now has `mac` (`ip neigh replace` succeeded).
    pub fn set_neighbour(&mut self, ip: A, mac: MacAddr) {
        let old = self.neighbours.insert(ip, mac);
        if old == Some(mac) {
            return;
        }
        if let Some(old) = old {
            self.change_users(old, |n| *n -= 1);
        }
        self.change_users(mac, |n| *n += 1);
    }

    /// The neighbour `ip` is gone (deleted, or found missing).
    pub fn remove_neighbour(&mut self, ip: A) {
        if let Some(old) = self.neighbours.remove(&ip) {
            self.change_users(old, |n| *n -= 1);
        }
    }

    /// `bridge fdb replace <mac> dst <dst>` succeeded: as the vxlan driver
    /// does it, an entry that already has a remote for `dst` is left alone,
    /// otherwise its first remote becomes `dst` (the entry is created when
    /// there was none).
    pub fn replace_fdb(&mut self, mac: MacAddr, dst: A) {
        self.change_fdb(mac, |remotes| {
            if remotes.contains(&dst) {
                return;
            }
            match remotes.first_mut() {
                Some(first) => *first = dst,
                None => remotes.push(dst),
            }
        });
    }

    /// `bridge fdb del <mac> [dst <dst>]` succeeded (or found nothing):
    /// without `dst` the whole entry is gone, with it that one remote.
    pub fn remove_fdb(&mut self, mac: MacAddr, dst: Option<A>) {
        self.change_fdb(mac, |remotes| match dst {
            Some(dst) => remotes.retain(|d| *d != dst),
            None => remotes.clear(),
        });
    }

    /// The FDB entries that programming `peer` (its neighbour already set to
    /// `peer.vtep_mac`) left stale: the one for the MAC the neighbour had
    /// before (`old_mac`) and those pointing at the peer's public IP, unless
    /// the entry is for the peer's MAC or some neighbour still uses it.
    /// flannel leaves them (a known source of stale entries when a peer's
    /// MAC changes); we remove them.
    pub fn stale_fdb_macs(&self, peer: &A::Peer, old_mac: Option<MacAddr>) -> BTreeSet<MacAddr> {
        let (_, public_ip, vtep_mac) = A::peer_parts(peer);
        let by_dst = self.unused_by_dst.get(&public_ip).into_iter().flatten();
        let old = old_mac.filter(|mac| self.unused(*mac));
        by_dst
            .copied()
            .chain(old)
            .filter(|mac| *mac != vtep_mac)
            .collect()
    }

    /// An FDB entry no neighbour uses.
    fn unused(&self, mac: MacAddr) -> bool {
        self.fdb.contains_key(&mac) && !self.mac_users.contains_key(&mac)
    }

    fn change_users(&mut self, mac: MacAddr, f: impl FnOnce(&mut u32)) {
        self.reindexed(mac, |t| {
            let n = t.mac_users.entry(mac).or_insert(0);
            f(n);
            if *n == 0 {
                t.mac_users.remove(&mac);
            }
        });
    }

    fn change_fdb(&mut self, mac: MacAddr, f: impl FnOnce(&mut Vec<A>)) {
        self.reindexed(mac, |t| {
            let remotes = t.fdb.entry(mac).or_default();
            f(remotes);
            if remotes.is_empty() {
                t.fdb.remove(&mac);
            }
        });
    }

    /// Runs a change that concerns `mac` and keeps `unused_by_dst` in step
    /// with it: the cost is the number of the entry's remotes, not the
    /// table's size.
    fn reindexed(&mut self, mac: MacAddr, change: impl FnOnce(&mut Self)) {
        let before = self.unused_destinations(mac);
        change(self);
        let after = self.unused_destinations(mac);
        if before == after {
            return;
        }
        for dst in before {
            if let Some(set) = self.unused_by_dst.get_mut(&dst) {
                set.remove(&mac);
                if set.is_empty() {
                    self.unused_by_dst.remove(&dst);
                }
            }
        }
        for dst in after {
            self.unused_by_dst.entry(dst).or_default().insert(mac);
        }
    }

    fn unused_destinations(&self, mac: MacAddr) -> Vec<A> {
        if self.unused(mac) {
            self.fdb_destinations(mac).to_vec()
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flannel::lease::Peer;

    fn mac(last: u8) -> MacAddr {
        MacAddr([0x02, 0, 0, 0, 0, last])
    }
    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 5, last, 0)
    }
    fn dst(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 1, last)
    }
    fn peer(gw: u8, m: u8, d: u8) -> Peer {
        Peer {
            subnet: ipnet::Ipv4Net::new(ip(gw), 24).unwrap(),
            public_ip: dst(d),
            vtep_mac: mac(m),
            v6: None,
        }
    }

    /// What the table must answer, computed the slow way from its contents.
    fn brute_stale(t: &EntryTable, peer: &Peer, old_mac: Option<MacAddr>) -> BTreeSet<MacAddr> {
        t.fdb
            .iter()
            .filter(|(m, dsts)| Some(**m) == old_mac || dsts.contains(&peer.public_ip))
            .map(|(m, _)| *m)
            .filter(|m| *m != peer.vtep_mac)
            .filter(|m| !t.neighbours.values().any(|n| n == m))
            .collect()
    }

    /// The indexes agree with the entries they index.
    fn check(t: &EntryTable) {
        let mut users: HashMap<MacAddr, u32> = HashMap::new();
        for m in t.neighbours.values() {
            *users.entry(*m).or_default() += 1;
        }
        assert_eq!(t.mac_users, users);
        let mut unused: HashMap<Ipv4Addr, BTreeSet<MacAddr>> = HashMap::new();
        for (m, dsts) in &t.fdb {
            assert!(!dsts.is_empty());
            if !users.contains_key(m) {
                for d in dsts {
                    unused.entry(*d).or_default().insert(*m);
                }
            }
        }
        assert_eq!(t.unused_by_dst, unused);
    }

    #[test]
    fn learns_a_dump() {
        let t = EntryTable::from_dump(
            &[(ip(2), mac(2)), (ip(3), mac(3)), (ip(4), mac(3))],
            &[(mac(2), dst(2)), (mac(3), dst(3)), (mac(7), dst(2))],
        );
        check(&t);
        assert_eq!(t.neighbour_count(), 3);
        assert_eq!(t.fdb_count(), 3);
        assert_eq!(t.neighbour(ip(3)), Some(mac(3)));
        assert_eq!(t.neighbour(ip(9)), None);
        assert_eq!(t.fdb_destination(mac(2)), Some(dst(2)));
        // mac(3) is shared by two neighbours.
        assert!(t.used_by_other(mac(3), ip(3)));
        assert!(t.used_by_other(mac(3), ip(4)));
        assert!(!t.used_by_other(mac(2), ip(2)));
        assert!(t.used_by_other(mac(2), ip(9)));
        // mac(7) points at peer 2's public IP and nobody uses it.
        assert_eq!(
            t.stale_fdb_macs(&peer(2, 2, 2), Some(mac(2)))
                .into_iter()
                .collect::<Vec<_>>(),
            [mac(7)]
        );
    }

    #[test]
    fn a_mac_change_leaves_the_old_entry_stale() {
        let mut t = EntryTable::from_dump(
            &[(ip(2), mac(2)), (ip(3), mac(3))],
            &[(mac(2), dst(2)), (mac(3), dst(3))],
        );
        let moved = peer(2, 9, 2);
        let old = t.neighbour(ip(2));
        t.set_neighbour(ip(2), mac(9));
        t.replace_fdb(mac(9), dst(2));
        check(&t);
        let stale = t.stale_fdb_macs(&moved, old);
        assert_eq!(stale.iter().copied().collect::<Vec<_>>(), [mac(2)]);
        assert_eq!(stale, brute_stale(&t, &moved, old));
        t.remove_fdb(mac(2), None);
        check(&t);
        assert!(t.stale_fdb_macs(&moved, old).is_empty());
        assert_eq!(t.fdb_count(), 2);
    }

    #[test]
    fn a_shared_mac_is_not_stale() {
        // Peers 2 and 3 share mac(3) (one node's two leases, or a copied MAC).
        let mut t = EntryTable::from_dump(&[(ip(2), mac(3)), (ip(3), mac(3))], &[(mac(3), dst(3))]);
        t.set_neighbour(ip(2), mac(9));
        t.replace_fdb(mac(9), dst(3));
        check(&t);
        assert!(t.stale_fdb_macs(&peer(2, 9, 3), Some(mac(3))).is_empty());
        // Removing peer 3 as well leaves mac(3) unused.
        assert!(!t.used_by_other(mac(3), ip(3)));
        t.remove_neighbour(ip(3));
        check(&t);
        assert_eq!(
            t.stale_fdb_macs(&peer(2, 9, 3), None)
                .into_iter()
                .collect::<Vec<_>>(),
            [mac(3)]
        );
    }

    #[test]
    fn fdb_remotes_follow_replace_and_delete() {
        let mut t = EntryTable::from_dump(&[], &[(mac(2), dst(2)), (mac(2), dst(5))]);
        check(&t);
        assert_eq!(t.fdb_destinations(mac(2)), [dst(2), dst(5)]);
        t.replace_fdb(mac(2), dst(6));
        assert_eq!(t.fdb_destinations(mac(2)), [dst(6), dst(5)]);
        // A destination the entry already has: the kernel changes nothing.
        t.replace_fdb(mac(2), dst(5));
        assert_eq!(t.fdb_destinations(mac(2)), [dst(6), dst(5)]);
        check(&t);
        t.remove_fdb(mac(2), Some(dst(9)));
        assert_eq!(t.fdb_destinations(mac(2)), [dst(6), dst(5)]);
        t.remove_fdb(mac(2), Some(dst(6)));
        assert_eq!(t.fdb_destinations(mac(2)), [dst(5)]);
        t.remove_fdb(mac(2), Some(dst(5)));
        assert_eq!(t.fdb_count(), 0);
        check(&t);
        // Deleting what is not there changes nothing.
        t.remove_fdb(mac(4), None);
        t.remove_neighbour(ip(4));
        assert_eq!(t, EntryTable::default());
    }

    #[test]
    fn every_change_keeps_the_indexes_true() {
        // A deterministic walk over small spaces of gateways, MACs and
        // destinations, so that sharing and collisions are frequent.
        let mut t = EntryTable::default();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            u8::try_from(x % n).unwrap()
        };
        for _ in 0..20_000 {
            let (g, m, d) = (next(6), next(5), next(4));
            match next(6) {
                0 => t.set_neighbour(ip(g), mac(m)),
                1 => t.remove_neighbour(ip(g)),
                2 => t.replace_fdb(mac(m), dst(d)),
                3 => t.remove_fdb(mac(m), None),
                4 => t.remove_fdb(mac(m), Some(dst(d))),
                _ => {
                    let p = peer(g, m, d);
                    let old = t.neighbour(ip(g));
                    assert_eq!(t.stale_fdb_macs(&p, old), brute_stale(&t, &p, old));
                }
            }
            check(&t);
        }
    }
}
