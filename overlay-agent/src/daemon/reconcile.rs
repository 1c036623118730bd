//! One reconciler, for either datapath and either subnet manager: the
//! leases (etcd's keys or the Nodes' annotations, as [`LeaseEvent`]s) say
//! which peers should exist, the datapath says which do, and
//! [`Reconciler::converge`] issues the `add_peer`/`remove_peer` calls that
//! make the second match the first.
//!
//! On start it reads what is already programmed (`Datapath::peers`, from the
//! maps or the kernel's entries), so whatever the leases no longer hold (a
//! peer that left while we were down) is removed. Calls that fail leave the
//! "programmed" view unchanged, so the next `converge` retries them. A peer
//! the datapath has no room for ([`DatapathError::MapFull`]) is logged once,
//! when it is first refused, and listed in [`Reconciler::refused`] (the
//! `overlay_peers_rejected` metric) until it fits or leaves. Two records
//! that claim one subnet (two Nodes with one podCIDR) never both reach the
//! datapath: the older keeps it, the other is logged and waits.

use crate::printable::printable;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;

use crate::{
    datapath::{Datapath, DatapathError, Peer},
    flannel::lease::Backend,
    subnet::{
        Claim, LeaseEvent, Record,
        lease_check::{self, Rejection, Trust, Trust6},
    },
};

/// This node, whose own lease is never a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Own {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    pub vni: u32,
    /// The config's `Network`, which every peer's subnet must lie in.
    pub network: Ipv4Net,
    /// For a dual-stack node, what a peer lease's IPv6 half is checked
    /// against; `None`: peers are programmed on IPv4 only.
    pub ipv6: Option<Trust6>,
}

impl Own {
    /// What a peer's lease is checked against ([`lease_check`]); our
    /// subnet's length is the config's `SubnetLen` (in Kubernetes mode, the
    /// node CIDR mask size every node's podCIDR has).
    pub fn trust(&self) -> Trust {
        Trust {
            network: self.network,
            subnet_len: self.subnet.prefix_len(),
            own_public_ip: self.public_ip,
            vni: self.vni,
        }
    }
}

/// A record's sound VXLAN lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Claimant {
    peer: Peer,
    rank: i64,
}

pub struct Reconciler<D: Datapath> {
    dp: D,
    own: Own,
    /// Every record holding a sound VXLAN lease (ours included), by key.
    claims: BTreeMap<String, Claimant>,
    /// The keys claiming each subnet, by rank: the first one is the peer.
    by_subnet: BTreeMap<Ipv4Net, BTreeSet<(i64, String)>>,
    /// What the datapath holds, as far as we know.
    programmed: BTreeMap<Ipv4Net, Peer>,
    /// Keys already reported as malformed or rejected, with the value
    /// reported (no log spam on re-lists; a new value is reported anew).
    reported: BTreeMap<String, Vec<u8>>,
    /// Leases that parse but fail [`lease_check`], by key: never programmed
    /// and not retried until their value changes.
    rejected: BTreeMap<String, (Ipv4Net, Rejection)>,
    /// Desired peers the datapath refused for lack of room, as last refused.
    refused: BTreeMap<Ipv4Net, Refusal>,
    /// Subnets whose lease or datapath entry may differ since the last
    /// converge (changed by events, or a call that failed): `converge`
    /// looks at these only, so one event costs a bounded number of calls
    /// whatever the number of peers.
    dirty: BTreeSet<Ipv4Net>,
}

/// A peer the datapath had no room for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub peer: Peer,
    /// The map that was full, and its capacity.
    pub map: &'static str,
    pub capacity: u32,
}

impl<D: Datapath> Reconciler<D> {
    /// Read what the datapath already holds, take `initial` (the first
    /// list) as the desired state, and converge (errors in single calls are
    /// logged and retried by later `converge` calls; only failing to read
    /// the datapath's peers is an error).
    pub async fn start(mut dp: D, own: Own, initial: Vec<Record>) -> Result<Self, DatapathError> {
        let programmed = dp
            .peers()
            .await?
            .into_iter()
            .map(|p| (p.subnet, p))
            .collect::<BTreeMap<_, _>>();
        if !programmed.is_empty() {
            log::info!(
                "the {} datapath already holds {} peer(s); reconciling them with the leases",
                dp.mode(),
                programmed.len()
            );
        }
        let mut r = Reconciler {
            dp,
            own,
            claims: BTreeMap::new(),
            by_subnet: BTreeMap::new(),
            programmed,
            reported: BTreeMap::new(),
            rejected: BTreeMap::new(),
            refused: BTreeMap::new(),
            dirty: BTreeSet::new(),
        };
        r.apply(&[LeaseEvent::Reset(initial)]);
        r.converge().await;
        Ok(r)
    }

    pub fn datapath(&mut self) -> &mut D {
        &mut self.dp
    }

    pub fn into_datapath(self) -> D {
        self.dp
    }

    pub fn own(&self) -> Own {
        self.own
    }

    /// Our lease moved (re-acquired elsewhere): the old subnet may now be a
    /// peer's, the new one must not be programmed as a peer.
    pub fn set_own(&mut self, own: Own) {
        self.own = own;
        self.mark_all();
    }

    /// Every subnet known on either side may need a look.
    fn mark_all(&mut self) {
        self.dirty
            .extend(self.by_subnet.keys().chain(self.programmed.keys()));
    }

    /// The peer the leases say `subnet` should be, if any (never our own).
    fn desired_for(&self, subnet: Ipv4Net) -> Option<Peer> {
        let (_, key) = self.by_subnet.get(&subnet)?.first()?;
        let p = self.claims.get(key)?.peer;
        (subnet != self.own.subnet && p.public_ip != self.own.public_ip).then_some(p)
    }

    /// What we believe the datapath holds.
    pub fn programmed(&self) -> &BTreeMap<Ipv4Net, Peer> {
        &self.programmed
    }

    /// The leases that fail the checks, by key, with the reason.
    pub fn rejected(&self) -> &BTreeMap<String, (Ipv4Net, Rejection)> {
        &self.rejected
    }

    /// Desired peers the datapath has refused for lack of room (retried by
    /// every `converge`).
    pub fn refused(&self) -> &BTreeMap<Ipv4Net, Refusal> {
        &self.refused
    }

    /// Whether every change seen has been applied (O(1): the pending set).
    pub fn is_converged(&self) -> bool {
        self.dirty.is_empty()
    }

    /// Fold lease events into the desired state (no datapath calls).
    pub fn apply(&mut self, events: &[LeaseEvent]) {
        for ev in events {
            match ev {
                LeaseEvent::Put(rec) => self.put(rec),
                LeaseEvent::Delete { key } => {
                    self.set_claim(key, None);
                    self.reported.remove(key);
                    self.rejected.remove(key);
                }
                LeaseEvent::Reset(records) => {
                    let keys: BTreeSet<&str> = records.iter().map(|r| r.key.as_str()).collect();
                    self.rejected.retain(|k, _| keys.contains(k.as_str()));
                    self.reported.retain(|k, _| keys.contains(k.as_str()));
                    let gone: Vec<String> = self
                        .claims
                        .keys()
                        .filter(|k| !keys.contains(k.as_str()))
                        .cloned()
                        .collect();
                    for k in gone {
                        self.set_claim(&k, None);
                    }
                    // A malformed record keeps what it held before.
                    for rec in records {
                        self.put(rec);
                    }
                    // A re-list may change anything (and at start, what the
                    // datapath holds without a lease must go).
                    self.mark_all();
                }
            }
        }
    }

    fn put(&mut self, rec: &Record) {
        match self.decode(rec) {
            Decoded::Peer(peer) => self.set_claim(
                &rec.key,
                Some(Claimant {
                    peer,
                    rank: rec.rank,
                }),
            ),
            // No longer a VXLAN peer (or no longer a sound one).
            Decoded::Gone => self.set_claim(&rec.key, None),
            Decoded::Malformed => {}
        }
    }

    /// Replaces what `key` claims; the subnets it claimed and claims are
    /// looked at by the next `converge`.
    fn set_claim(&mut self, key: &str, claim: Option<Claimant>) {
        if let Some(old) = self.claims.get(key).copied() {
            if claim == Some(old) {
                return;
            }
            self.claims.remove(key);
            let subnet = old.peer.subnet;
            if let Some(set) = self.by_subnet.get_mut(&subnet) {
                set.remove(&(old.rank, key.to_owned()));
                if set.is_empty() {
                    self.by_subnet.remove(&subnet);
                }
            }
            self.dirty.insert(subnet);
        }
        let Some(c) = claim else { return };
        let subnet = c.peer.subnet;
        self.claims.insert(key.to_owned(), c);
        let set = self.by_subnet.entry(subnet).or_default();
        set.insert((c.rank, key.to_owned()));
        if let Some((_, holder)) = set.first()
            && holder != key
            && subnet != self.own.subnet
        {
            let (key, holder) = (printable(key), printable(holder));
            log::warn!(
                "{key} claims subnet {subnet}, which {holder} (older) holds: not programmed while {holder} holds it"
            );
        }
        self.dirty.insert(subnet);
    }

    fn decode(&mut self, rec: &Record) -> Decoded {
        match &rec.claim {
            Claim::Lease(l) => match l.backend {
                Backend::Vxlan { vni, vtep_mac } => {
                    // Our own lease is the lease keeper's to judge.
                    let ours = l.subnet == self.own.subnet;
                    // A dual-stack node programs a peer's IPv6 half too; a
                    // peer without one (an IPv4-only node) is served on
                    // IPv4. A broken IPv6 half rejects the whole lease, as
                    // flanneld skips it.
                    let v6 = self.own.ipv6.zip(l.peer6()).filter(|_| !ours);
                    let verdict = if ours {
                        Ok(())
                    } else {
                        lease_check::check(&self.own.trust(), l.subnet, l.public_ip, vtep_mac, vni)
                            .and_then(|()| match v6 {
                                Some((trust6, p6)) => lease_check::check6(&trust6, &p6),
                                None => Ok(()),
                            })
                    };
                    if let Err(why) = verdict {
                        if self.first_report(rec) {
                            log::warn!(
                                "rejecting lease {} (PublicIP {}, VtepMAC {vtep_mac}): {why}; it is not programmed until its value changes",
                                printable(&rec.key),
                                l.public_ip
                            );
                        }
                        self.rejected.insert(rec.key.clone(), (l.subnet, why));
                        return Decoded::Gone;
                    }
                    self.rejected.remove(&rec.key);
                    Decoded::Peer(Peer {
                        subnet: l.subnet,
                        public_ip: l.public_ip,
                        vtep_mac,
                        v6: v6.map(|(_, p6)| p6),
                    })
                }
                Backend::Other(ref t) => {
                    log::debug!(
                        "ignoring lease {} of backend type {t:?}",
                        printable(&rec.key)
                    );
                    self.rejected.remove(&rec.key);
                    Decoded::Gone
                }
            },
            Claim::None => {
                self.rejected.remove(&rec.key);
                Decoded::Gone
            }
            Claim::Malformed(err) => {
                if self.first_report(rec) {
                    log::warn!("skipping malformed lease: {err}");
                }
                Decoded::Malformed
            }
        }
    }

    /// Re-reads what the datapath really holds (the kernel's entries and,
    /// on the eBPF datapath, the maps) and converges from that, so entries
    /// someone else removed or changed are programmed again instead of
    /// being assumed in place. Returns how many peers had drifted.
    pub async fn recheck(&mut self) -> Result<usize, DatapathError> {
        let actual: BTreeMap<Ipv4Net, Peer> = self
            .dp
            .peers()
            .await?
            .into_iter()
            .map(|p| (p.subnet, p))
            .collect();
        let drifted = self
            .programmed
            .iter()
            .filter(|(s, p)| actual.get(s) != Some(p))
            .count()
            + actual
                .keys()
                .filter(|s| !self.programmed.contains_key(s))
                .count();
        if drifted > 0 {
            log::warn!(
                "{drifted} peer(s) in the {} datapath are not as programmed (changed from outside?): programming them again",
                self.dp.mode()
            );
            self.mark_all();
            self.programmed = actual;
            self.mark_all();
            self.converge().await;
        }
        Ok(drifted)
    }

    /// Whether `rec`'s value is reported for the first time under its key.
    fn first_report(&mut self, rec: &Record) -> bool {
        if self.reported.get(&rec.key) == Some(&rec.raw) {
            return false;
        }
        self.reported.insert(rec.key.clone(), rec.raw.clone());
        true
    }

    /// Make the datapath match etcd for the subnets that changed since the
    /// last call: removals first, then additions and changes (a changed
    /// peer is replaced in one `add_peer`, never removed first, so its
    /// subnet keeps a route throughout). A failed call leaves its subnet
    /// pending for the next call. Returns whether everything succeeded.
    pub async fn converge(&mut self) -> bool {
        let pending = std::mem::take(&mut self.dirty);
        // A start-up or a re-list among thousands of peers gets one summary
        // line; single events keep a line per peer.
        let level = if pending.len() > PER_PEER_LOG_LIMIT {
            log::Level::Debug
        } else {
            log::Level::Info
        };
        let (mut added, mut removed) = (0usize, 0usize);
        let mut ok = true;
        // Many changes: the datapath's per-change side effects (the nft set
        // of known VTEPs) are applied once, at the end.
        let batch = pending.len() > PER_PEER_LOG_LIMIT;
        if batch {
            self.dp.begin_batch();
        }
        let mut adds = Vec::new();
        let mut removes = Vec::new();
        for &subnet in &pending {
            let want = self.desired_for(subnet);
            if self
                .refused
                .get(&subnet)
                .is_some_and(|r| Some(r.peer) != want)
            {
                self.refused.remove(&subnet);
            }
            match (want, self.programmed.get(&subnet).copied()) {
                (None, Some(p)) => removes.push(p),
                (Some(want), have) if have != Some(want) => adds.push(want),
                _ => {}
            }
        }
        // All removals as one batch, then all additions as one: the
        // datapath pipelines them and answers for each peer.
        let results = self.dp.remove_peers(&removes).await;
        for (p, result) in removes.iter().zip(results) {
            match result {
                Ok(()) => {
                    log::log!(
                        level,
                        "removed peer {} (PublicIP {})",
                        p.subnet,
                        p.public_ip
                    );
                    self.programmed.remove(&p.subnet);
                    removed += 1;
                }
                Err(e) => {
                    ok = false;
                    self.dirty.insert(p.subnet);
                    log::error!("removing peer {} failed (will retry): {e}", p.subnet);
                }
            }
        }
        let results = self.dp.add_peers(&adds).await;
        for (&p, result) in adds.iter().zip(results) {
            let subnet = p.subnet;
            match result {
                Ok(()) => {
                    log::log!(
                        level,
                        "programmed peer {subnet} via {} (VtepMAC {})",
                        p.public_ip,
                        p.vtep_mac
                    );
                    self.programmed.insert(subnet, p);
                    self.refused.remove(&subnet);
                    added += 1;
                }
                Err(DatapathError::MapFull { map, capacity }) => {
                    ok = false;
                    self.dirty.insert(subnet);
                    let refusal = Refusal {
                        peer: p,
                        map,
                        capacity,
                    };
                    if self.refused.insert(subnet, refusal) != Some(refusal) {
                        log::error!(
                            "peer {subnet} via {} not programmed: the datapath's {map} map is full ({capacity} entries). Until a peer leaves, its VXLAN is dropped as from an unknown VTEP (drop_unknown_vtep); retrying without logging again",
                            p.public_ip
                        );
                    } else {
                        log::debug!("peer {subnet} still refused: {map} is full");
                    }
                }
                Err(e) => {
                    ok = false;
                    self.dirty.insert(subnet);
                    log::error!("programming peer {subnet} failed (will retry): {e}");
                }
            }
        }
        if batch && let Err(e) = self.dp.end_batch().await {
            // The datapath rebuilds its set at the next change or recheck.
            ok = false;
            log::error!("applying the batch of peer changes failed: {}", e.reason());
        }
        if level == log::Level::Debug {
            log::info!(
                "{} changed subnet(s): programmed {added} peer(s), removed {removed}; {} programmed in all",
                pending.len(),
                self.programmed.len()
            );
        }
        ok
    }
}

/// Changes in one batch above which the log gets a summary instead of a
/// line per peer (the lines are still there at debug level).
const PER_PEER_LOG_LIMIT: usize = 16;

enum Decoded {
    Peer(Peer),
    /// Not a sound VXLAN lease (another backend, no lease at all, or one
    /// that failed [`lease_check`]): whatever the key held goes.
    Gone,
    /// Cannot be decoded: what the key held stays.
    Malformed,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        datapath::{Mode, NodeSpec, NodeState},
        flannel::{
            lease::{self, encode_vxlan},
            mac::MacAddr,
        },
        subnet::etcd::{
            Entry, Snapshot,
            watch::{WatchEvent, lease_events},
        },
    };

    fn apply(r: &mut Reconciler<FakeDp>, events: &[WatchEvent]) {
        r.apply(&lease_events(events));
    }

    /// An in-memory datapath that records calls and can be told to fail.
    #[derive(Default)]
    struct FakeDp {
        peers: BTreeMap<Ipv4Net, Peer>,
        fail: BTreeSet<Ipv4Net>,
        /// add_peer refuses new peers beyond this many, as a full map does.
        capacity: Option<usize>,
        calls: Vec<String>,
    }

    impl Datapath for FakeDp {
        fn mode(&self) -> Mode {
            Mode::Kernel
        }
        async fn setup(&mut self, _: &NodeSpec) -> Result<NodeState, DatapathError> {
            unreachable!("the reconciler never sets up")
        }
        async fn add_peer(&mut self, p: &Peer) -> Result<(), DatapathError> {
            self.calls.push(format!("add {}", p.subnet));
            if self.fail.contains(&p.subnet) {
                return Err(DatapathError::InvalidSpec("injected".into()));
            }
            if let Some(capacity) = self.capacity
                && self.peers.len() >= capacity
                && !self.peers.contains_key(&p.subnet)
            {
                return Err(DatapathError::MapFull {
                    map: "KNOWN_VTEPS",
                    capacity: capacity as u32,
                });
            }
            self.peers.insert(p.subnet, *p);
            Ok(())
        }
        async fn remove_peer(&mut self, p: &Peer) -> Result<(), DatapathError> {
            self.calls.push(format!("remove {}", p.subnet));
            if self.fail.contains(&p.subnet) {
                return Err(DatapathError::InvalidSpec("injected".into()));
            }
            self.peers.remove(&p.subnet);
            Ok(())
        }
        async fn peers(&mut self) -> Result<Vec<Peer>, DatapathError> {
            Ok(self.peers.values().copied().collect())
        }
        async fn teardown(&mut self) -> Result<(), DatapathError> {
            self.peers.clear();
            Ok(())
        }
    }

    const P: &str = "/coreos.com/network";

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn mac(i: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, i])
    }
    fn peer(subnet: &str, i: u8) -> Peer {
        Peer {
            subnet: net(subnet),
            public_ip: Ipv4Addr::new(192, 168, 0, i),
            vtep_mac: mac(i),
            v6: None,
        }
    }
    fn entry(p: &Peer) -> Entry {
        Entry {
            key: lease::lease_key(P, p.subnet),
            value: encode_vxlan(p.public_ip, 1, p.vtep_mac).into_bytes(),
            lease_id: 7,
            mod_revision: 1,
        }
    }
    fn raw(subnet: &str, value: &str) -> Entry {
        Entry {
            key: lease::lease_key(P, net(subnet)),
            value: value.as_bytes().to_vec(),
            lease_id: 7,
            mod_revision: 1,
        }
    }
    fn own() -> Own {
        Own {
            subnet: net("10.0.1.0/24"),
            public_ip: Ipv4Addr::new(192, 168, 0, 1),
            vni: 1,
            network: net("10.0.0.0/16"),
            ipv6: None,
        }
    }
    fn snap(entries: Vec<Entry>) -> Snapshot {
        Snapshot {
            revision: 10,
            entries,
        }
    }
    fn held(r: &mut Reconciler<FakeDp>) -> Vec<Peer> {
        r.datapath().peers.values().copied().collect()
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn start_removes_what_etcd_no_longer_holds_and_adds_the_rest() {
        block_on(async {
            let mut dp = FakeDp::default();
            // Left over from before a restart: one still in etcd, one gone.
            dp.peers.insert(net("10.0.2.0/24"), peer("10.0.2.0/24", 2));
            dp.peers.insert(net("10.0.9.0/24"), peer("10.0.9.0/24", 9));
            let s = snap(vec![
                entry(&peer("10.0.1.0/24", 1)), // our own lease
                entry(&peer("10.0.2.0/24", 2)),
                entry(&peer("10.0.3.0/24", 3)),
            ]);
            let mut r = Reconciler::start(dp, own(), s.records()).await.unwrap();
            assert_eq!(
                held(&mut r),
                vec![peer("10.0.2.0/24", 2), peer("10.0.3.0/24", 3)]
            );
            // The unchanged peer was not touched; the own lease never programmed.
            assert_eq!(
                r.datapath().calls,
                vec!["remove 10.0.9.0/24", "add 10.0.3.0/24"]
            );
            assert!(r.is_converged());
        });
    }

    #[test]
    fn impossible_leases_never_reach_the_datapath_until_they_are_mended() {
        block_on(async {
            let good = peer("10.0.2.0/24", 2);
            let mut zero_ip = peer("10.0.3.0/24", 3);
            zero_ip.public_ip = Ipv4Addr::UNSPECIFIED;
            let mut multicast_mac = peer("10.0.4.0/24", 4);
            multicast_mac.vtep_mac = MacAddr([1, 0, 0x5e, 0, 0, 1]);
            let outside = peer("172.16.0.0/24", 5);
            let wrong_len = peer("10.0.6.0/25", 6);
            let s = snap(
                [good, zero_ip, multicast_mac, outside, wrong_len]
                    .iter()
                    .map(entry)
                    .collect(),
            );
            let mut r = Reconciler::start(FakeDp::default(), own(), s.records())
                .await
                .unwrap();
            assert_eq!(held(&mut r), vec![good]);
            assert!(r.is_converged());
            let reasons: Vec<Rejection> = r.rejected().values().map(|(_, why)| *why).collect();
            assert_eq!(
                reasons,
                vec![
                    Rejection::PublicIp,
                    Rejection::VtepMac,
                    Rejection::PrefixLen,
                    Rejection::OutsideNetwork
                ]
            );
            // A good peer turned impossible is removed; mended, it comes back.
            let mut broken = good;
            broken.vtep_mac = MacAddr([0; 6]);
            apply(&mut r, &[WatchEvent::Put(entry(&broken))]);
            assert!(r.converge().await);
            assert!(held(&mut r).is_empty());
            apply(
                &mut r,
                &[
                    WatchEvent::Put(entry(&good)),
                    WatchEvent::Delete {
                        key: entry(&zero_ip).key,
                    },
                ],
            );
            assert!(r.converge().await);
            assert_eq!(held(&mut r), vec![good]);
            assert_eq!(r.rejected().len(), 3);
            // A re-list that no longer holds them forgets them.
            apply(&mut r, &[WatchEvent::Reset(snap(vec![entry(&good)]))]);
            assert!(r.rejected().is_empty());
        });
    }

    #[test]
    fn recheck_programs_again_what_was_changed_from_outside() {
        block_on(async {
            let (a, b) = (peer("10.0.2.0/24", 2), peer("10.0.3.0/24", 3));
            let s = snap(vec![entry(&a), entry(&b)]);
            let mut r = Reconciler::start(FakeDp::default(), own(), s.records())
                .await
                .unwrap();
            assert_eq!(r.recheck().await.unwrap(), 0);
            // Someone removes one peer's entries and changes the other's MAC.
            r.datapath().peers.remove(&a.subnet);
            let mut changed = b;
            changed.vtep_mac = mac(33);
            r.datapath().peers.insert(b.subnet, changed);
            assert_eq!(r.recheck().await.unwrap(), 2);
            assert_eq!(held(&mut r), vec![a, b]);
            assert!(r.is_converged());
        });
    }

    #[test]
    fn one_event_costs_one_call_and_a_moved_subnet_is_replaced_not_removed() {
        block_on(async {
            let peers: Vec<Peer> = (2..102u8)
                .map(|i| Peer {
                    subnet: Ipv4Net::new(Ipv4Addr::new(10, 0, i, 0), 24).unwrap(),
                    public_ip: Ipv4Addr::new(192, 168, 1, i),
                    vtep_mac: mac(i),
                    v6: None,
                })
                .collect();
            let s = snap(peers.iter().map(entry).collect());
            let mut r = Reconciler::start(FakeDp::default(), own(), s.records())
                .await
                .unwrap();
            assert_eq!(held(&mut r).len(), 100);
            r.datapath().calls.clear();
            // One new peer among 100: one call.
            apply(
                &mut r,
                &[WatchEvent::Put(entry(&peer("10.0.200.0/24", 200)))],
            );
            assert!(r.converge().await);
            assert_eq!(r.datapath().calls, vec!["add 10.0.200.0/24"]);
            // A subnet that moves to another node within one batch (deleted,
            // then written with another PublicIP) is replaced in one call:
            // never a moment without its route.
            r.datapath().calls.clear();
            let mut moved = peers[0];
            moved.public_ip = Ipv4Addr::new(192, 168, 9, 9);
            apply(
                &mut r,
                &[
                    WatchEvent::Delete {
                        key: entry(&peers[0]).key,
                    },
                    WatchEvent::Put(entry(&moved)),
                ],
            );
            assert!(r.converge().await);
            assert_eq!(r.datapath().calls, vec!["add 10.0.2.0/24"]);
            assert_eq!(r.datapath().peers[&moved.subnet], moved);
            assert!(r.is_converged());
        });
    }

    #[test]
    fn put_and_delete_events() {
        block_on(async {
            let mut r = Reconciler::start(FakeDp::default(), own(), vec![])
                .await
                .unwrap();
            apply(&mut r, &[WatchEvent::Put(entry(&peer("10.0.4.0/24", 4)))]);
            assert!(r.converge().await);
            assert_eq!(held(&mut r), vec![peer("10.0.4.0/24", 4)]);
            // A changed VtepMAC replaces the peer.
            let mut changed = peer("10.0.4.0/24", 4);
            changed.vtep_mac = mac(44);
            apply(&mut r, &[WatchEvent::Put(entry(&changed))]);
            assert!(r.converge().await);
            assert_eq!(held(&mut r), vec![changed]);
            // A renewal (same value) costs no datapath call.
            let calls = r.datapath().calls.len();
            apply(&mut r, &[WatchEvent::Put(entry(&changed))]);
            assert!(r.converge().await);
            assert_eq!(r.datapath().calls.len(), calls);
            apply(
                &mut r,
                &[WatchEvent::Delete {
                    key: lease::lease_key(P, net("10.0.4.0/24")),
                }],
            );
            assert!(r.converge().await);
            assert!(held(&mut r).is_empty());
        });
    }

    #[test]
    fn ignores_other_backends_our_own_lease_and_skips_malformed() {
        block_on(async {
            let s = snap(vec![
                raw(
                    "10.0.5.0/24",
                    r#"{"PublicIP":"192.168.0.5","BackendType":"host-gw"}"#,
                ),
                raw(
                    "10.0.6.0/24",
                    r#"{"PublicIP":"192.168.0.6","BackendType":"vxlan"}"#,
                ),
                entry(&peer("10.0.7.0/24", 7)),
                // Ours, even if re-published with another MAC.
                raw(
                    "10.0.1.0/24",
                    &encode_vxlan(Ipv4Addr::new(192, 168, 0, 1), 1, mac(99)),
                ),
                Entry {
                    key: format!("{P}/subnets/not-a-subnet"),
                    value: b"{}".to_vec(),
                    lease_id: 0,
                    mod_revision: 1,
                },
            ]);
            let mut r = Reconciler::start(FakeDp::default(), own(), s.records())
                .await
                .unwrap();
            assert_eq!(held(&mut r), vec![peer("10.0.7.0/24", 7)]);

            // A peer whose lease turns malformed keeps working; one that
            // switches to another backend is removed.
            apply(
                &mut r,
                &[
                    WatchEvent::Put(raw("10.0.7.0/24", "{garbage")),
                    WatchEvent::Put(entry(&peer("10.0.8.0/24", 8))),
                ],
            );
            assert!(r.converge().await);
            assert_eq!(
                held(&mut r),
                vec![peer("10.0.7.0/24", 7), peer("10.0.8.0/24", 8)]
            );
            apply(
                &mut r,
                &[WatchEvent::Reset(snap(vec![
                    raw("10.0.7.0/24", "{garbage"),
                    raw(
                        "10.0.8.0/24",
                        r#"{"PublicIP":"192.168.0.8","BackendType":"udp"}"#,
                    ),
                ]))],
            );
            assert!(r.converge().await);
            assert_eq!(held(&mut r), vec![peer("10.0.7.0/24", 7)]);
        });
    }

    #[test]
    fn reset_diffs_against_known_state() {
        block_on(async {
            let s = snap(vec![
                entry(&peer("10.0.2.0/24", 2)),
                entry(&peer("10.0.3.0/24", 3)),
            ]);
            let mut r = Reconciler::start(FakeDp::default(), own(), s.records())
                .await
                .unwrap();
            r.datapath().calls.clear();
            // After a compaction: 10.0.2.0 left, 10.0.4.0 joined, 10.0.3.0 unchanged.
            apply(
                &mut r,
                &[WatchEvent::Reset(snap(vec![
                    entry(&peer("10.0.3.0/24", 3)),
                    entry(&peer("10.0.4.0/24", 4)),
                ]))],
            );
            assert!(r.converge().await);
            assert_eq!(
                r.datapath().calls,
                vec!["remove 10.0.2.0/24", "add 10.0.4.0/24"]
            );
        });
    }

    #[test]
    fn failed_calls_are_retried_by_the_next_converge() {
        block_on(async {
            let mut dp = FakeDp::default();
            dp.fail.insert(net("10.0.2.0/24"));
            let s = snap(vec![
                entry(&peer("10.0.2.0/24", 2)),
                entry(&peer("10.0.3.0/24", 3)),
            ]);
            let mut r = Reconciler::start(dp, own(), s.records()).await.unwrap();
            assert!(!r.is_converged());
            assert_eq!(held(&mut r), vec![peer("10.0.3.0/24", 3)]);
            assert!(!r.converge().await);
            r.datapath().fail.clear();
            assert!(r.converge().await);
            assert!(r.is_converged());
            assert_eq!(
                held(&mut r),
                vec![peer("10.0.2.0/24", 2), peer("10.0.3.0/24", 3)]
            );
        });
    }

    #[test]
    fn peers_the_datapath_has_no_room_for_are_listed_until_they_fit_or_leave() {
        block_on(async {
            let dp = FakeDp {
                capacity: Some(1),
                ..FakeDp::default()
            };
            let s = snap(vec![
                entry(&peer("10.0.2.0/24", 2)),
                entry(&peer("10.0.3.0/24", 3)),
                entry(&peer("10.0.4.0/24", 4)),
            ]);
            let mut r = Reconciler::start(dp, own(), s.records()).await.unwrap();
            let refused =
                |r: &Reconciler<FakeDp>| -> Vec<Ipv4Net> { r.refused().keys().copied().collect() };
            assert_eq!(held(&mut r), vec![peer("10.0.2.0/24", 2)]);
            assert_eq!(
                r.refused().get(&net("10.0.3.0/24")),
                Some(&Refusal {
                    peer: peer("10.0.3.0/24", 3),
                    map: "KNOWN_VTEPS",
                    capacity: 1
                })
            );
            assert_eq!(refused(&r), [net("10.0.3.0/24"), net("10.0.4.0/24")]);
            // Retried, still refused: listed once each.
            assert!(!r.converge().await);
            assert_eq!(refused(&r), [net("10.0.3.0/24"), net("10.0.4.0/24")]);
            // One leaves etcd: no longer listed. The programmed one leaves:
            // its room goes to the other.
            apply(
                &mut r,
                &[WatchEvent::Delete {
                    key: lease::lease_key(P, net("10.0.4.0/24")),
                }],
            );
            assert!(!r.converge().await);
            assert_eq!(refused(&r), [net("10.0.3.0/24")]);
            apply(
                &mut r,
                &[WatchEvent::Delete {
                    key: lease::lease_key(P, net("10.0.2.0/24")),
                }],
            );
            assert!(r.converge().await);
            assert!(refused(&r).is_empty());
            assert_eq!(held(&mut r), vec![peer("10.0.3.0/24", 3)]);
        });
    }

    #[test]
    fn moving_our_own_subnet() {
        block_on(async {
            let s = snap(vec![entry(&peer("10.0.2.0/24", 2))]);
            let mut r = Reconciler::start(FakeDp::default(), own(), s.records())
                .await
                .unwrap();
            // We lost 10.0.1.0/24 and re-acquired 10.0.5.0/24; another node
            // now holds 10.0.1.0/24.
            r.set_own(Own {
                subnet: net("10.0.5.0/24"),
                ..own()
            });
            apply(
                &mut r,
                &[
                    WatchEvent::Put(entry(&peer("10.0.1.0/24", 50))),
                    WatchEvent::Put(raw(
                        "10.0.5.0/24",
                        &encode_vxlan(Ipv4Addr::new(192, 168, 0, 1), 1, mac(1)),
                    )),
                ],
            );
            assert!(r.converge().await);
            assert_eq!(
                held(&mut r),
                vec![peer("10.0.1.0/24", 50), peer("10.0.2.0/24", 2)]
            );
        });
    }

    #[test]
    fn stale_lease_with_our_public_ip_is_not_a_peer() {
        block_on(async {
            // Our previous lease, not yet expired, on another subnet.
            let s = snap(vec![raw(
                "10.0.9.0/24",
                &encode_vxlan(Ipv4Addr::new(192, 168, 0, 1), 1, mac(1)),
            )]);
            let mut r = Reconciler::start(FakeDp::default(), own(), s.records())
                .await
                .unwrap();
            assert!(held(&mut r).is_empty());
        });
    }

    fn node_record(name: &str, p: &Peer, rank: i64) -> Record {
        Record {
            key: format!("node/{name}"),
            raw: format!("{p:?}").into_bytes(),
            claim: Claim::Lease(lease::Lease {
                subnet: p.subnet,
                ipv6_subnet: None,
                public_ip: p.public_ip,
                public_ipv6: None,
                backend: Backend::Vxlan {
                    vni: Some(1),
                    vtep_mac: p.vtep_mac,
                },
                vtep_mac_v6: None,
            }),
            rank,
        }
    }

    #[test]
    fn of_two_records_claiming_one_subnet_the_older_keeps_it() {
        block_on(async {
            let holder = peer("10.0.2.0/24", 2);
            let mut thief = peer("10.0.2.0/24", 3);
            thief.public_ip = Ipv4Addr::new(192, 168, 0, 33);
            let mut r = Reconciler::start(
                FakeDp::default(),
                own(),
                vec![node_record("b", &holder, 100)],
            )
            .await
            .unwrap();
            // A newer node with the same podCIDR changes nothing.
            r.apply(&[LeaseEvent::Put(node_record("a", &thief, 200))]);
            assert!(r.converge().await);
            assert_eq!(held(&mut r), vec![holder]);
            // Nor does a re-list that lists the newer one first.
            r.apply(&[LeaseEvent::Reset(vec![
                node_record("a", &thief, 200),
                node_record("b", &holder, 100),
            ])]);
            assert!(r.converge().await);
            assert_eq!(held(&mut r), vec![holder]);
            // The holder leaves: the claimant gets the subnet.
            r.apply(&[LeaseEvent::Delete {
                key: "node/b".into(),
            }]);
            assert!(r.converge().await);
            assert_eq!(held(&mut r), vec![thief]);
            // A node that stops being a lease (annotations removed) goes.
            let mut gone = node_record("a", &thief, 200);
            gone.claim = Claim::None;
            r.apply(&[LeaseEvent::Put(gone)]);
            assert!(r.converge().await);
            assert!(held(&mut r).is_empty());
        });
    }
}
