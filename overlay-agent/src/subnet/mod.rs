//! Where leases come from: flannel's two subnet managers behind one shape
//! (flannel's `pkg/subnet/{etcd,kube}`). Each gives this node its subnet
//! and a stream of the other nodes' leases as [`LeaseEvent`]s, which one
//! reconciler applies to either datapath; checking a peer's lease
//! ([`lease_check`]), protecting our own subnet and batching events are
//! shared, whatever the source.
//!
//! - [`etcd`]: leases at `<prefix>/subnets/` with TTLs, the config at
//!   `<prefix>/config` (flanneld without `--kube-subnet-mgr`);
//! - [`kube`]: the node's `spec.podCIDR` is our subnet, the other Nodes'
//!   annotations are the peers' leases, the config is a file
//!   (`--kube-subnet-mgr`).

pub mod alloc;
pub mod backoff;
pub mod etcd;
pub mod kube;
pub mod lease_check;

use crate::flannel::lease::{Lease, LeaseError};

/// One lease as its source holds it, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Where it lives: the etcd key, or `node/<name>`.
    pub key: String,
    /// What the source holds (the etcd value, a Node's annotations and
    /// podCIDRs), so that each bad value is reported once.
    pub raw: Vec<u8>,
    pub claim: Claim,
    /// Of two records claiming one subnet, the lower rank keeps it (a
    /// Node's creation time: an older node is never displaced by a newer
    /// one). etcd's keys are their subnets, so there it never matters.
    pub rank: i64,
}

/// What a record says about a subnet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    Lease(Lease),
    /// Not a lease at all (a Node that does not run flannel's subnet
    /// manager): whatever it held before is gone.
    None,
    /// Cannot be decoded: logged once and skipped; what it held before
    /// stays.
    Malformed(LeaseError),
}

/// What changed among the leases.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseEvent {
    /// Everything there is now (the first list, a re-list after a
    /// compaction or an expired watch): what is missing is gone.
    Reset(Vec<Record>),
    /// A record was created or changed.
    Put(Record),
    /// A record was deleted (or its etcd lease expired).
    Delete { key: String },
}
