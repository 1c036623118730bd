//! Wire and configuration constants.

/// IANA's VXLAN port is 4789, but the Linux kernel (and so flannel) defaults to 8472.
pub const DEFAULT_VXLAN_PORT: u16 = 8472;
/// flannel's default VNI.
pub const DEFAULT_VNI: u32 = 1;
/// Outer Ethernet (14) is reused; what is added in front of the inner frame:
/// outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const VXLAN_ENCAP_LEN: u32 = 20 + 8 + 8 + 14;
/// The same over IPv6 (`flannel-v6.<VNI>`): outer IPv6 (40) + UDP (8) +
/// VXLAN (8) + inner Ethernet (14).
pub const VXLAN6_ENCAP_LEN: u32 = 40 + 8 + 8 + 14;
/// What flannel subtracts from the underlay MTU for the `flannel.<VNI>` device.
pub const VXLAN_MTU_OVERHEAD: u32 = 50;

pub const ETH_HDR_LEN: usize = 14;
pub const IPV4_HDR_LEN: usize = 20;
pub const IPV6_HDR_LEN: usize = 40;
pub const UDP_HDR_LEN: usize = 8;
pub const VXLAN_HDR_LEN: usize = 8;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
/// VXLAN flags byte with only the I (valid VNI) bit set.
pub const VXLAN_FLAG_I: u8 = 0x08;

/// Map names as the eBPF object defines them; userspace opens them by these names
/// and they are the file names under the pin directory.
pub const MAP_REMOTE_SUBNETS: &str = "REMOTE_SUBNETS";
pub const MAP_KNOWN_VTEPS: &str = "KNOWN_VTEPS";
pub const MAP_NODE_CONFIG: &str = "NODE_CONFIG";
pub const MAP_COUNTERS: &str = "COUNTERS";
pub const MAP_PEER_STATS: &str = "PEER_STATS";
pub const MAP_FAST_CONFIG: &str = "FAST_CONFIG";
pub const MAP_FAST_FLOWS: &str = "FAST_FLOWS";
pub const MAP_POD_VETHS: &str = "POD_VETHS";
pub const MAP_POD_ADDRS: &str = "POD_ADDRS";
/// A dual-stack node's IPv6 side: its settings, the peers' IPv6 subnets and
/// their `PublicIPv6`s.
pub const MAP_NODE_CONFIG6: &str = "NODE_CONFIG6";
pub const MAP_REMOTE_SUBNETS6: &str = "REMOTE_SUBNETS6";
pub const MAP_KNOWN_VTEPS6: &str = "KNOWN_VTEPS6";
/// The IPv6 side of the fast path (a dual-stack node).
pub const MAP_FAST_CONFIG6: &str = "FAST_CONFIG6";
pub const MAP_FAST_FLOWS6: &str = "FAST_FLOWS6";
pub const MAP_POD_ADDRS6: &str = "POD_ADDRS6";
/// Index 0: the [`crate::maps::MAP_LAYOUT_VERSION`] of the build that created
/// the pinned maps. Only the agent reads and writes it.
pub const MAP_LAYOUT: &str = "LAYOUT";

/// Program names as the eBPF object defines them.
pub const PROG_EGRESS: &str = "vxlan_egress";
/// TC egress of `flannel-v6.<VNI>` on a dual-stack node.
pub const PROG_EGRESS6: &str = "vxlan_egress6";
pub const PROG_INGRESS_XDP: &str = "vxlan_ingress_xdp";
/// The XDP program for kernels that refuse `bpf_xdp_adjust_meta` to XDP
/// programs: it drops VXLAN from strangers and leaves the rest, whole, to
/// `vxlan_ingress_tc`. It attaches in `vxlan_ingress_xdp`'s place (same
/// pinned link).
pub const PROG_INGRESS_XDP_FILTER: &str = "vxlan_ingress_xdp_filter";
pub const PROG_INGRESS_TC: &str = "vxlan_ingress_tc";
/// The fast path's programs on a pod's host-side veth: TCX ingress (what
/// the pod sends) and TCX egress (what the host delivers to it).
pub const PROG_VETH_FROM_POD: &str = "veth_from_pod";
pub const PROG_VETH_TO_POD: &str = "veth_to_pod";
/// The IPv6 halves of `vxlan_ingress_tc`, `veth_from_pod` and
/// `veth_to_pod`: never attached, they run as tail calls from those
/// programs (through `JUMPS`), each with a stack of its own. One program
/// holding both families' paths needs more than BPF's 512 bytes.
pub const PROG_INGRESS_TC6: &str = "vxlan_ingress_tc6";
pub const PROG_VETH_FROM_POD6: &str = "veth_from_pod6";
pub const PROG_VETH_TO_POD6: &str = "veth_to_pod6";
/// `veth_from_pod6`'s second half: encapsulates what it decided to send
/// (the outer checksum's arithmetic alone needs most of a frame).
pub const PROG_VETH_ENCAP6: &str = "veth_encap6";
/// The tail-call table, and each program's index in it.
pub const MAP_JUMPS: &str = "JUMPS";
pub const JUMP_INGRESS_TC6: u32 = 0;
pub const JUMP_VETH_FROM_POD6: u32 = 1;
pub const JUMP_VETH_TO_POD6: u32 = 2;
pub const JUMP_VETH_ENCAP6: u32 = 3;
/// Slots in `JUMPS`.
pub const JUMP_SLOTS: u32 = 4;
/// Every tail-called program, by its index in `JUMPS`.
pub const JUMP_PROGRAMS: [(u32, &str); 4] = [
    (JUMP_INGRESS_TC6, PROG_INGRESS_TC6),
    (JUMP_VETH_FROM_POD6, PROG_VETH_FROM_POD6),
    (JUMP_VETH_TO_POD6, PROG_VETH_TO_POD6),
    (JUMP_VETH_ENCAP6, PROG_VETH_ENCAP6),
];

/// Capacity of the remote-subnet and known-VTEP maps (flannel clusters of a few
/// thousand nodes fit comfortably).
pub const MAX_PEERS: u32 = 16384;

/// Capacity of the fast path's flow table (an LRU: the least recently used
/// approval goes first when it is full, and that flow takes the slow path
/// once to be approved again).
pub const MAX_FAST_FLOWS: u32 = 65536;
/// Capacity of the pod-veth set (pods on one node).
pub const MAX_POD_VETHS: u32 = 4096;
/// Entries of `POD_ADDRS` (pod address -> veth): several addresses per pod
/// veth, and least recently used ones go first.
pub const MAX_POD_ADDRS: u32 = 16384;

/// Outer TTL: the kernel vxlan device flannel creates has no `ttl` set and so
/// uses the route's hop limit, which is the default 64.
pub const OUTER_TTL: u8 = 64;

/// The UDP source port range of the kernel vxlan device when no `srcport` is
/// configured (flannel configures none): the netns' default
/// `ip_local_port_range` (32768 60999), used as the half-open `[min, max)`
/// by `udp_flow_src_port`, so the largest port ever chosen is 60998.
pub const VXLAN_SRC_PORT_MIN: u16 = 32768;
pub const VXLAN_SRC_PORT_MAX: u16 = 60999;

/// XDP metadata word (native endian) that `vxlan_ingress_xdp` writes in front of
/// a frame it has decapsulated, so that `vxlan_ingress_tc` on the same device
/// only has to redirect it into `flannel.<VNI>`. Only XDP can write metadata,
/// so a peer cannot forge it.
pub const XDP_META_DECAPSULATED: u32 = 0x7678_6c6e;
/// Length of the XDP metadata area `vxlan_ingress_xdp` reserves.
pub const XDP_META_LEN: usize = 4;
