//! What `/metrics` and `/readyz` report, refreshed from the loop's state.

use std::collections::{BTreeMap, HashMap};

use super::lease_feed::LeaseFeed;
use crate::{
    datapath::{AnyDatapath, Datapath, ebpf::PeerCounters},
    etcd::own::OwnLease,
    health::{Health, PeerTrafficMetric},
    reconcile::Reconciler,
};

pub fn refresh_health(
    health: &Health,
    rec: &mut Reconciler<AnyDatapath>,
    lease: &OwnLease,
    feed: &LeaseFeed,
) {
    let programmed: Vec<_> = rec.programmed().values().copied().collect();
    let mut rejected = BTreeMap::new();
    for (_, why) in rec.rejected().values() {
        *rejected.entry(*why).or_insert(0) += 1;
    }
    let refused = rec.refused().len();
    let dp = rec.datapath();
    let (counters, traffic) = match dp.as_ebpf() {
        Some(e) => (e.counters().ok(), e.peer_counters().unwrap_or_default()),
        None => (None, Vec::new()),
    };
    // One pass over the counters, then a lookup per peer: this runs every
    // second, so it must stay linear in the number of peers.
    let traffic: HashMap<std::net::Ipv4Addr, _> =
        traffic.into_iter().map(|t| (t.public_ip, t)).collect();
    let peers = programmed
        .iter()
        .map(|p| PeerTrafficMetric {
            subnet: p.subnet,
            traffic: traffic.get(&p.public_ip).copied().unwrap_or(PeerCounters {
                public_ip: p.public_ip,
                tx: Default::default(),
                rx: Default::default(),
            }),
        })
        .collect();
    let expiry = lease.expires.map(|at| {
        let left = at.saturating_duration_since(std::time::Instant::now());
        (std::time::SystemTime::now() + left)
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    });
    let mut h = health.lock();
    h.leases_rejected = rejected;
    h.mode = Some(dp.mode());
    h.peers_programmed = programmed.len();
    h.peers_rejected_map_full = refused;
    h.counters = counters;
    h.peers = peers;
    h.lease_expiry_unix = expiry;
    h.reservation = lease.is_reservation();
    h.etcd_connected = !feed.is_failing();
}
