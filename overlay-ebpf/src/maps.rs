//! The maps, named as `overlay_common::consts::MAP_*` (the static's name is the
//! map's name). BTF-defined so `bpftool map dump` shows fields.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap},
    macros::btf_map,
};
use overlay_common::{
    consts::MAX_PEERS,
    counters::{Counter, Reason},
    maps::{KnownVtep, NodeConfig, PeerTraffic, RemoteVtep},
};

/// Remote pod subnet (IPv4 prefix, network order) -> the VTEP that serves it.
#[btf_map]
pub static REMOTE_SUBNETS: LpmTrie<[u8; 4], RemoteVtep, { MAX_PEERS as usize }> = LpmTrie::new();

/// Public IPv4 of every node holding a lease: the only accepted VXLAN sources.
#[btf_map]
pub static KNOWN_VTEPS: HashMap<[u8; 4], KnownVtep, { MAX_PEERS as usize }> = HashMap::new();

/// Index 0: this node's settings, written by the agent before it attaches.
#[btf_map]
pub static NODE_CONFIG: Array<NodeConfig, 1> = Array::new();

/// Packets and bytes per `Reason`, per CPU.
#[btf_map]
pub static COUNTERS: PerCpuArray<Counter, { Reason::SLOTS as usize }> = PerCpuArray::new();

/// Packets and bytes each way per peer (public IPv4, network order), per CPU.
/// Entries are created and removed by the agent with KNOWN_VTEPS.
#[btf_map]
pub static PEER_STATS: PerCpuHashMap<[u8; 4], PeerTraffic, { MAX_PEERS as usize }> =
    PerCpuHashMap::new();
