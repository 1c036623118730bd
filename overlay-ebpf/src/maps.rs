//! The maps, named as `overlay_common::consts::MAP_*` (the static's name is the
//! map's name). BTF-defined so `bpftool map dump` shows fields.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{
        Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, ProgramArray,
        lpm_trie::Key,
    },
    macros::btf_map,
};
use overlay_common::{
    consts::{JUMP_SLOTS, MAX_FAST_FLOWS, MAX_PEERS, MAX_POD_ADDRS, MAX_POD_VETHS},
    counters::{Counter, Reason},
    encap6::Encap6Header,
    fastpath::{FastFlow, FastPathConfig, FlowKey},
    fastpath6::{FastFlow6, FastPathConfig6, FlowKey6},
    maps::{KnownVtep, KnownVtep6, NodeConfig, NodeConfig6, PeerTraffic, RemoteVtep, RemoteVtep6},
};

/// Remote pod subnet (IPv4 prefix, network order) -> the VTEP that serves it.
#[btf_map]
pub static REMOTE_SUBNETS: LpmTrie<[u8; 4], RemoteVtep, { MAX_PEERS as usize }> = LpmTrie::new();

/// Public IPv4 of every node holding a lease: the only accepted VXLAN sources.
#[btf_map]
pub static KNOWN_VTEPS: HashMap<[u8; 4], KnownVtep, { MAX_PEERS as usize }> = HashMap::new();

/// Remote pod IPv6 subnet -> the VTEP that serves it (dual stack).
#[btf_map]
pub static REMOTE_SUBNETS6: LpmTrie<[u8; 16], RemoteVtep6, { MAX_PEERS as usize }> = LpmTrie::new();

/// `PublicIPv6` of every dual-stack peer: the only accepted IPv6 VXLAN sources.
#[btf_map]
pub static KNOWN_VTEPS6: HashMap<[u8; 16], KnownVtep6, { MAX_PEERS as usize }> = HashMap::new();

/// Index 0: a dual-stack node's IPv6 side (all zero, off, on an IPv4-only node).
#[btf_map]
pub static NODE_CONFIG6: Array<NodeConfig6, 1> = Array::new();

/// Per CPU, `vxlan_egress6`'s scratch space for the 72 bytes of outer
/// headers it writes: on the stack they overflow the 512 bytes BPF allows.
/// Not pinned, never read by the agent.
#[btf_map]
pub static ENCAP6_SCRATCH: PerCpuArray<[u8; Encap6Header::LEN], 1> = PerCpuArray::new();

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

/// Index 0: the IPv6 side of the fast path (a dual-stack node); all zero
/// (off) unless the agent turns it on, and used only while FAST_CONFIG is on.
#[btf_map]
pub static FAST_CONFIG6: Array<FastPathConfig6, 1> = Array::new();

/// FAST_FLOWS for IPv6 flows.
#[btf_map]
pub static FAST_FLOWS6: LruHashMap<FlowKey6, FastFlow6, { MAX_FAST_FLOWS as usize }> =
    LruHashMap::new();

/// POD_ADDRS for IPv6 pod addresses (learnt from the host's neighbour
/// discovery and bridge decisions).
#[btf_map]
pub static POD_ADDRS6: LruHashMap<[u8; 16], u32, { MAX_POD_ADDRS as usize }> = LruHashMap::new();

/// `veth_from_pod6`'s frame window and flow key, off its stack, and what
/// it hands `veth_encap6`: the window (hop limit lowered) and the plan.
#[repr(C)]
pub struct FromPod6Scratch {
    pub window: overlay_common::fastpath6::Pod6Window,
    pub key: FlowKey6,
    pub plan: overlay_common::encap6::EncapPlan6,
}

/// Per CPU, one [`FromPod6Scratch`]. Not pinned, never read by the agent.
#[btf_map]
pub static FROM_POD6_SCRATCH: PerCpuArray<FromPod6Scratch, 1> = PerCpuArray::new();

/// The IPv6 programs the IPv4 ones tail-call (`JUMP_*` indices), filled by
/// the agent before it attaches anything.
#[btf_map]
pub static JUMPS: ProgramArray<{ JUMP_SLOTS as usize }> = ProgramArray::new();

/// The VTEP (public IPv4) serving a remote pod address, if a vxlan peer's
/// subnet holds it. Direct peers (DirectRouting) and peers left to the
/// kernel have no REMOTE_SUBNETS entry, so their sources answer `None`.
#[inline(always)]
pub fn serving_vtep(ip: [u8; 4]) -> Option<[u8; 4]> {
    REMOTE_SUBNETS.get(&Key::new(32, ip)).map(|r| r.public_ip)
}

/// The VTEP (`PublicIPv6`) serving a remote IPv6 pod address, if a dual-stack
/// peer's IPv6 subnet holds it.
#[inline(always)]
pub fn serving_vtep6(ip: [u8; 16]) -> Option<[u8; 16]> {
    REMOTE_SUBNETS6.get(&Key::new(128, ip)).map(|r| r.public_ip)
}
