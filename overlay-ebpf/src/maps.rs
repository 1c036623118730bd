//! The maps, named as `overlay_common::consts::MAP_*` (the static's name is the
//! map's name). BTF-defined so `bpftool map dump` shows fields.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
    macros::btf_map,
};
use overlay_common::{
    consts::{MAX_FAST_FLOWS, MAX_PEERS, MAX_POD_ADDRS, MAX_POD_VETHS},
    counters::{Counter, Reason},
    fastpath::{FastFlow, FastPathConfig, FlowKey},
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
///
/// Not preallocated: a preallocated per-CPU hash reserves max_entries × value
/// (32 B) × possible CPUs when it is created, 512 KiB per possible CPU at
/// `MAX_PEERS` = 16384: 32 MiB on a 64-CPU host, 128 MiB at 256, for a cluster
/// of any size. Without preallocation an entry's per-CPU values are allocated
/// when the agent inserts the peer, so the map costs 32 B × CPUs per peer it
/// holds. The programs only look entries up and add in place, which costs
/// the same either way.
#[btf_map]
pub static PEER_STATS: PerCpuHashMap<
    [u8; 4],
    PeerTraffic,
    { MAX_PEERS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = PerCpuHashMap::new();

/// Index 0: the fast path's settings; all zero (off) until the agent turns it on.
#[btf_map]
pub static FAST_CONFIG: Array<FastPathConfig, 1> = Array::new();

/// Flows the host approved for the fast path, per direction (see
/// `overlay_common::fastpath`). Written by the programs, purged by the agent
/// when a pod's veth goes.
#[btf_map]
pub static FAST_FLOWS: LruHashMap<FlowKey, FastFlow, { MAX_FAST_FLOWS as usize }> =
    LruHashMap::new();

/// ifindex of every pod veth the agent attached to -> its MTU.
/// `vxlan_ingress_tc` delivers only through these, so a veth that went never
/// gets traffic from an approval recorded before, and only what fits.
#[btf_map]
pub static POD_VETHS: HashMap<u32, u32, { MAX_POD_VETHS as usize }> = HashMap::new();

/// Index 0: the `MAP_LAYOUT_VERSION` of the build that created these maps,
/// written by the agent right after it creates them. No program reads it:
/// it is declared here so that it is created and pinned with the maps it
/// describes, and goes with them.
#[btf_map]
pub static LAYOUT: Array<u32, 1> = Array::new();

/// Pod address (network order) -> the veth the host's bridge last delivered
/// it to, learnt by `veth_to_pod` from the host's own deliveries (its ARP
/// and bridge decisions). `veth_from_pod` puts a packet on the fast path
/// only from the veth its source address is bound to, so one pod cannot
/// borrow another's approved flow.
#[btf_map]
pub static POD_ADDRS: LruHashMap<[u8; 4], u32, { MAX_POD_ADDRS as usize }> = LruHashMap::new();

/// The VTEP (public IPv4) serving a remote pod address, if a vxlan peer's
/// subnet holds it. Direct peers (DirectRouting) and peers left to the
/// kernel have no REMOTE_SUBNETS entry, so their sources answer `None`.
#[inline(always)]
pub fn serving_vtep(ip: [u8; 4]) -> Option<[u8; 4]> {
    REMOTE_SUBNETS.get(&Key::new(32, ip)).map(|r| r.public_ip)
}
