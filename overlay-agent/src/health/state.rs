//! What the health endpoints report, updated by the agent's main loop.

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use ipnet::Ipv4Net;

use super::peers::PeerMaps;
use crate::datapath::{
    Mode,
    ebpf::{Counters, PeerCounters},
};

/// Where start-up is; the agent is ready only in [`Phase::Running`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    #[default]
    WaitingForConfig,
    AcquiringLease,
    ProgrammingDatapath,
    Running,
}

impl Phase {
    /// Why `/readyz` says no.
    pub fn not_ready_reason(self) -> Option<&'static str> {
        match self {
            Phase::WaitingForConfig => Some("waiting for the network config in etcd"),
            Phase::AcquiringLease => Some("acquiring a subnet lease"),
            Phase::ProgrammingDatapath => Some("programming the datapath"),
            Phase::Running => None,
        }
    }
}

/// One peer's line in the metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerTrafficMetric {
    pub subnet: Ipv4Net,
    /// The peer's traffic; `traffic.public_ip` is the peer's address.
    pub traffic: PeerCounters,
}

/// Upper bounds (seconds) of the reconcile-latency histogram.
pub const RECONCILE_BUCKETS: [f64; 8] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0];

/// A Prometheus histogram: cumulative counts per bound, then +Inf = count.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    pub buckets: [u64; RECONCILE_BUCKETS.len()],
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (bound, n) in RECONCILE_BUCKETS.iter().zip(self.buckets.iter_mut()) {
            if s <= *bound {
                *n += 1;
            }
        }
        self.count += 1;
        self.sum_seconds += s;
    }
}

impl HealthState {
    /// Why `/readyz` says no at Unix time `now`, or `None` when ready: the
    /// phase first; then, once running, our lease's expiry. An etcd outage
    /// alone keeps the node ready (the datapath forwards with its last
    /// state), but a lease whose expiry passed without a renewal may be
    /// handed to another node, so the subnet is no longer safely ours.
    pub fn not_ready_reason(&self, now: u64) -> Option<String> {
        if let Some(problem) = &self.config_problem {
            return Some(format!("invalid network config: {problem}"));
        }
        if let Some(why) = self.phase.not_ready_reason() {
            return Some(why.to_owned());
        }
        if let Some(conflict) = &self.lease_conflict {
            return Some(format!("lease conflict: {conflict}"));
        }
        match self.lease_expiry_unix {
            Some(t) if !self.reservation && t <= now => Some(format!(
                "our lease expired {} s ago without a renewal{}",
                now - t,
                if self.etcd_connected {
                    ""
                } else {
                    " (etcd unreachable)"
                }
            )),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct HealthState {
    pub phase: Phase,
    pub mode: Option<Mode>,
    /// Our lease's expiry as a Unix time; `None` with no lease or a reservation.
    pub lease_expiry_unix: Option<u64>,
    pub reservation: bool,
    /// Set while another node's lease holds our key (see `etcd::own::Keeper`).
    pub lease_conflict: Option<String>,
    /// Set while the network config in etcd is malformed (the agent waits).
    pub config_problem: Option<String>,
    /// The lease watch on etcd works (it has not failed since it last succeeded).
    pub etcd_connected: bool,
    pub peers_programmed: usize,
    /// Peers in etcd the datapath refused because a peer map is full.
    pub peers_rejected_map_full: usize,
    /// Peers left to the kernel's vxlan device because host policy covers
    /// them (eBPF datapath only).
    pub peers_host_policy: usize,
    /// Dual-stack peers whose IPv6 side is left to `flannel-v6.<VNI>`
    /// because host policy covers it (eBPF datapath only).
    pub peers_host_policy_ipv6: usize,
    /// eBPF datapath only.
    pub counters: Option<Counters>,
    /// With `--metrics-per-peer` on the eBPF datapath: where `/metrics`
    /// reads each peer's traffic when scraped.
    pub peer_maps: Option<Arc<PeerMaps>>,
    pub reconcile: Histogram,
    /// Leases in etcd that fail the checks of `lease_check`, by reason.
    pub leases_rejected: std::collections::BTreeMap<crate::subnet::lease_check::Rejection, usize>,
    /// The host firewall's known-VTEP drops (nft), read when `/metrics` is
    /// scraped; `None` when the table is not there or could not be read.
    pub vtep_guard: Option<crate::datapath::vtep_guard::GuardCounters>,
}

/// Shared between the main loop (writer) and the HTTP server (reader).
#[derive(Clone, Debug, Default)]
pub struct Health(Arc<Mutex<HealthState>>);

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    /// The state to read or change; a poisoned lock (a panic elsewhere) still
    /// yields the data, since every field is valid on its own.
    pub fn lock(&self) -> MutexGuard<'_, HealthState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_phase(&self, phase: Phase) {
        self.lock().phase = phase;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        h.observe(Duration::from_micros(800));
        h.observe(Duration::from_millis(7));
        h.observe(Duration::from_secs(2));
        assert_eq!(h.buckets, [1, 1, 1, 2, 2, 2, 2, 2]);
        assert_eq!(h.count, 3);
        assert!((h.sum_seconds - 2.0078).abs() < 1e-9);
    }

    #[test]
    fn only_running_is_ready() {
        assert_eq!(Phase::Running.not_ready_reason(), None);
        assert!(Phase::AcquiringLease.not_ready_reason().is_some());
    }

    #[test]
    fn an_expired_lease_is_not_ready_an_etcd_outage_alone_is() {
        let mut s = HealthState {
            phase: Phase::Running,
            lease_expiry_unix: Some(1_000),
            etcd_connected: false,
            ..HealthState::default()
        };
        assert_eq!(s.not_ready_reason(999), None);
        assert_eq!(
            s.not_ready_reason(1_042).as_deref(),
            Some("our lease expired 42 s ago without a renewal (etcd unreachable)")
        );
        s.etcd_connected = true;
        assert_eq!(
            s.not_ready_reason(1_000).as_deref(),
            Some("our lease expired 0 s ago without a renewal")
        );
        s.lease_expiry_unix = None;
        s.reservation = true;
        assert_eq!(s.not_ready_reason(u64::MAX), None);
        s.phase = Phase::WaitingForConfig;
        assert_eq!(
            s.not_ready_reason(0).as_deref(),
            Some("waiting for the network config in etcd")
        );
    }
}
