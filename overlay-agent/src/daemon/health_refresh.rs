//! What `/metrics` and `/readyz` report, refreshed from the loop's state.

use std::collections::BTreeMap;

use super::{lease_feed::LeaseFeed, reconcile::Reconciler, startup::Held};
use crate::{
    datapath::{AnyDatapath, Datapath},
    health::{self, Health},
};

pub fn refresh_health(
    health: &Health,
    rec: &mut Reconciler<AnyDatapath>,
    held: &Held,
    feed: &LeaseFeed,
    metrics_per_peer: bool,
) {
    // Every second: nothing here grows with the number of peers (only with
    // the leases rejected, normally none); each peer's traffic is read when
    // /metrics is scraped, and only with --metrics-per-peer (health::peers).
    let programmed = rec.programmed().len();
    let mut rejected = BTreeMap::new();
    for (_, why) in rec.rejected().values() {
        *rejected.entry(*why).or_insert(0) += 1;
    }
    let refused = rec.refused().len();
    let dp = rec.datapath();
    let counters = dp.as_ebpf().and_then(|e| e.counters().ok());
    let lease = held.etcd_lease();
    let expiry = lease.and_then(|l| l.expires).map(|at| {
        let left = at.saturating_duration_since(std::time::Instant::now());
        (std::time::SystemTime::now() + left)
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    });
    let mut h = health.lock();
    h.leases_rejected = rejected;
    h.mode = Some(dp.mode());
    h.peers_programmed = programmed;
    h.peers_rejected_map_full = refused;
    h.peers_host_policy = dp.as_ebpf().map_or(0, |e| e.kernel_only_peers().len());
    h.peers_host_policy_ipv6 = dp.as_ebpf().map_or(0, |e| e.kernel_only_peers6().len());
    h.counters = counters;
    if metrics_per_peer {
        health::peers::follow(&mut h.peer_maps, dp.as_ebpf());
    }
    h.lease_expiry_unix = expiry;
    h.reservation = lease.is_some_and(|l| l.is_reservation());
    h.etcd_connected = !feed.is_failing();
}
