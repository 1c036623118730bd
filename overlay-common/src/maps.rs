//! Map keys and values. All `#[repr(C)]` with explicit padding so the kernel,
//! the agent and `bpftool` (through BTF) agree on every byte.
//!
//! IPv4 addresses are stored as `[u8; 4]` in network order (as on the wire), so
//! no side byte-swaps and `bpftool` prints them as four octets.

/// The layout of the pinned maps: what every map's key and value mean, byte
/// by byte. The agent records it with the pins (the `LAYOUT` map), and a
/// restarted agent reuses pinned maps only when it finds its own version
/// there; over an older version it creates a new set, over a newer one it
/// refuses to start (see the agent's `datapath::pins`).
///
/// Bump it (by one) with any change that makes a program of one build
/// misread a map written by another, above all the ones that keep the sizes
/// the agent also checks:
/// - a field of a map key or value (here, in `fastpath` and in `counters`)
///   reordered, renamed, retyped, added, removed, or given another meaning
///   (a `_pad` put to use);
/// - a [`crate::counters::Reason`] renumbered, or a `DIR_*` value changed;
/// - a map of the object given another key or value type, or another role.
///
/// Appending a `Reason` in the spare counter slots needs no bump: the
/// indices before it keep their meaning. `layout_is_pinned_to_its_version`
/// fails when a layout changed without a bump.
pub const MAP_LAYOUT_VERSION: u32 = 4;

/// Value of the remote-subnet LPM trie (key: IPv4 prefix in network order):
/// where to send packets for that subnet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoteVtep {
    /// The peer's `flannel.<VNI>` MAC (its lease's `VtepMAC`): the inner destination MAC.
    pub vtep_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// The peer's `PublicIP`: the outer destination address.
    pub public_ip: [u8; 4],
}

/// Value of the known-VTEP hash (key: a peer's public IPv4, network order).
/// Presence is what matters for ingress filtering.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KnownVtep {
    /// The peer's VTEP MAC (the inner source MAC it sends with).
    pub vtep_mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// The single entry of the node-settings array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// VXLAN network identifier (24 bits used).
    pub vni: u32,
    /// This node's public IPv4 (network order): outer source, ingress destination.
    pub local_ip: [u8; 4],
    /// ifindex of the underlay NIC (where encapsulated packets leave and arrive).
    pub underlay_ifindex: u32,
    /// ifindex of `flannel.<VNI>` (where decapsulated packets are delivered).
    pub vxlan_ifindex: u32,
    /// MTU of the underlay NIC, for the too-big check on egress.
    pub underlay_mtu: u32,
    /// This node's VTEP MAC (`flannel.<VNI>`'s address): the inner source MAC.
    pub vtep_mac: [u8; 6],
    /// UDP destination port, host order.
    pub port: u16,
    /// Non-zero once the agent has filled this entry in.
    pub configured: u32,
}

/// Value of REMOTE_SUBNETS6 (key: a dual-stack peer's IPv6 subnet, network
/// order): where its IPv6 pods are.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoteVtep6 {
    /// The peer's `flannel-v6.<VNI>` MAC (`BackendV6Data.VtepMAC`).
    pub vtep_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// The peer's `PublicIPv6`: the outer destination address.
    pub public_ip: [u8; 16],
    /// The peer's `PublicIP`: its PEER_STATS key, so one node's traffic
    /// is counted under one name whichever family carries it.
    pub peer: [u8; 4],
}

/// Value of KNOWN_VTEPS6 (key: a dual-stack peer's `PublicIPv6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KnownVtep6 {
    /// The peer's v6 VTEP MAC.
    pub vtep_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// The peer's `PublicIP` (its PEER_STATS key).
    pub peer: [u8; 4],
}

/// The single entry of NODE_CONFIG6: a dual-stack node's IPv6 side. The
/// VNI, the port and the underlay are NODE_CONFIG's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig6 {
    /// This node's `PublicIPv6`: outer source, ingress destination.
    pub local_ip: [u8; 16],
    /// ifindex of `flannel-v6.<VNI>`.
    pub vxlan_ifindex: u32,
    /// `flannel-v6.<VNI>`'s MAC: the inner source MAC.
    pub vtep_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// Non-zero on a dual-stack node once the agent has filled it in.
    pub configured: u32,
}

/// Value of the per-peer traffic map (key: the peer's public IPv4, network
/// order), one per CPU. The agent creates the entry when it learns the peer
/// and removes it when the peer leaves; the programs only add to it, so a
/// peer unknown to the agent is never counted here.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerTraffic {
    /// Packets and bytes `vxlan_egress` and `veth_from_pod` (the fast path)
    /// encapsulated to this peer (inner frame length, as the other counters).
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// VXLAN packets and bytes received from this peer and accepted: the
    /// ones decapsulated in XDP or TC (into `flannel.<VNI>` or, on the fast
    /// path, straight into a pod), and the GSO aggregates handed to the
    /// kernel device (`pass_gso_tunnel`). Outer frame length.
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

impl PeerTraffic {
    /// Sums per-CPU values (wrapping, like the kernel's counters).
    pub fn sum<'a>(values: impl IntoIterator<Item = &'a PeerTraffic>) -> PeerTraffic {
        values
            .into_iter()
            .fold(PeerTraffic::default(), |a, v| PeerTraffic {
                tx_packets: a.tx_packets.wrapping_add(v.tx_packets),
                tx_bytes: a.tx_bytes.wrapping_add(v.tx_bytes),
                rx_packets: a.rx_packets.wrapping_add(v.rx_packets),
                rx_bytes: a.rx_bytes.wrapping_add(v.rx_bytes),
            })
    }
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::PeerTraffic {}
    unsafe impl aya::Pod for super::RemoteVtep {}
    unsafe impl aya::Pod for super::KnownVtep {}
    unsafe impl aya::Pod for super::NodeConfig {}
    unsafe impl aya::Pod for super::RemoteVtep6 {}
    unsafe impl aya::Pod for super::KnownVtep6 {}
    unsafe impl aya::Pod for super::NodeConfig6 {}
    unsafe impl aya::Pod for crate::fastpath::FlowKey {}
    unsafe impl aya::Pod for crate::fastpath::FastFlow {}
    unsafe impl aya::Pod for crate::fastpath::FastPathConfig {}
    unsafe impl aya::Pod for crate::fastpath6::FlowKey6 {}
    unsafe impl aya::Pod for crate::fastpath6::FastFlow6 {}
    unsafe impl aya::Pod for crate::fastpath6::FastPathConfig6 {}
}

#[cfg(test)]
mod tests {
    extern crate std;

    use core::{
        any::type_name_of_val,
        fmt::Write as _,
        mem::{offset_of, size_of, size_of_val},
    };
    use std::string::String;

    use super::*;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<RemoteVtep>(), 12);
        assert_eq!(size_of::<KnownVtep>(), 8);
        assert_eq!(size_of::<NodeConfig>(), 32);
        assert_eq!(size_of::<PeerTraffic>(), 32);
        assert_eq!(size_of::<RemoteVtep6>(), 28);
        assert_eq!(size_of::<KnownVtep6>(), 12);
        assert_eq!(size_of::<NodeConfig6>(), 32);
    }

    /// One line per map key or value type: its size, then every field as
    /// `name@offset:size type`. The destructuring pattern lists every field,
    /// so a field added to a type without being added here does not compile.
    macro_rules! layout {
        ($out:ident, $t:ident { $($f:ident),* $(,)? }) => {{
            let v = $t::default();
            let $t { $($f: _),* } = v;
            let _ = write!($out, "{} {}:", stringify!($t), size_of::<$t>());
            $(
                let _ = write!(
                    $out,
                    " {}@{}:{} {}",
                    stringify!($f),
                    offset_of!($t, $f),
                    size_of_val(&v.$f),
                    type_name_of_val(&v.$f),
                );
            )*
            $out.push('\n');
        }};
    }

    /// The layout of every map key and value this crate defines, and the
    /// values stored in them that mean something (`DIR_*`).
    fn current_layout() -> String {
        use crate::{
            counters::Counter,
            fastpath::{DIR_FROM_POD, DIR_TO_POD, FastFlow, FastPathConfig, FlowKey},
            fastpath6::{FastFlow6, FastPathConfig6, FlowKey6},
        };
        let mut out = String::new();
        layout!(
            out,
            RemoteVtep {
                vtep_mac,
                _pad,
                public_ip
            }
        );
        layout!(out, KnownVtep { vtep_mac, _pad });
        layout!(
            out,
            NodeConfig {
                vni,
                local_ip,
                underlay_ifindex,
                vxlan_ifindex,
                underlay_mtu,
                vtep_mac,
                port,
                configured,
            }
        );
        layout!(
            out,
            RemoteVtep6 {
                vtep_mac,
                _pad,
                public_ip,
                peer
            }
        );
        layout!(
            out,
            KnownVtep6 {
                vtep_mac,
                _pad,
                peer
            }
        );
        layout!(
            out,
            NodeConfig6 {
                local_ip,
                vxlan_ifindex,
                vtep_mac,
                _pad,
                configured,
            }
        );
        layout!(
            out,
            PeerTraffic {
                tx_packets,
                tx_bytes,
                rx_packets,
                rx_bytes,
            }
        );
        layout!(out, Counter { packets, bytes });
        layout!(
            out,
            FlowKey {
                src,
                dst,
                sport,
                dport,
                proto,
                dir,
                _pad,
            }
        );
        layout!(
            out,
            FastFlow {
                approved_ns,
                ifindex,
                pod_mac,
                gw_mac,
                vtep,
                _pad,
            }
        );
        layout!(
            out,
            FastPathConfig {
                enabled,
                pod_subnet,
                pod_prefix_len,
                mark,
                gateway,
                _pad,
            }
        );
        layout!(
            out,
            FlowKey6 {
                src,
                dst,
                sport,
                dport,
                proto,
                dir,
                _pad,
            }
        );
        layout!(
            out,
            FastFlow6 {
                approved_ns,
                ifindex,
                pod_mac,
                gw_mac,
                vtep,
            }
        );
        layout!(
            out,
            FastPathConfig6 {
                enabled,
                pod_prefix_len,
                pod_subnet,
                gateway,
            }
        );
        let _ = writeln!(out, "DIR_TO_POD={DIR_TO_POD} DIR_FROM_POD={DIR_FROM_POD}");
        out
    }

    /// Every layout the pinned maps have had, by [`MAP_LAYOUT_VERSION`].
    /// Append a new entry for a new version; never edit a past one (a
    /// past entry is what that build's programs read).
    const LAYOUTS: &[(u32, &str)] = &[
        (
            1,
            "\
RemoteVtep 12: vtep_mac@0:6 [u8; 6] _pad@6:2 [u8; 2] public_ip@8:4 [u8; 4]
KnownVtep 8: vtep_mac@0:6 [u8; 6] _pad@6:2 [u8; 2]
NodeConfig 32: vni@0:4 u32 local_ip@4:4 [u8; 4] underlay_ifindex@8:4 u32 vxlan_ifindex@12:4 u32 underlay_mtu@16:4 u32 vtep_mac@20:6 [u8; 6] port@26:2 u16 configured@28:4 u32
PeerTraffic 32: tx_packets@0:8 u64 tx_bytes@8:8 u64 rx_packets@16:8 u64 rx_bytes@24:8 u64
Counter 16: packets@0:8 u64 bytes@8:8 u64
FlowKey 16: src@0:4 [u8; 4] dst@4:4 [u8; 4] sport@8:2 [u8; 2] dport@10:2 [u8; 2] proto@12:1 u8 dir@13:1 u8 _pad@14:2 [u8; 2]
FastFlow 24: approved_ns@0:8 u64 ifindex@8:4 u32 pod_mac@12:6 [u8; 6] gw_mac@18:6 [u8; 6]
FastPathConfig 16: enabled@0:4 u32 pod_subnet@4:4 [u8; 4] pod_prefix_len@8:4 u32 _pad@12:4 u32
DIR_TO_POD=1 DIR_FROM_POD=2
",
        ),
        // FastFlow names the VTEP of a flow toward a pod, FastPathConfig
        // carries the mark bit and the bridge's address, POD_VETHS' value
        // became the veth's MTU (it was 1), and POD_ADDRS is new.
        (
            2,
            "\
RemoteVtep 12: vtep_mac@0:6 [u8; 6] _pad@6:2 [u8; 2] public_ip@8:4 [u8; 4]
KnownVtep 8: vtep_mac@0:6 [u8; 6] _pad@6:2 [u8; 2]
NodeConfig 32: vni@0:4 u32 local_ip@4:4 [u8; 4] underlay_ifindex@8:4 u32 vxlan_ifindex@12:4 u32 underlay_mtu@16:4 u32 vtep_mac@20:6 [u8; 6] port@26:2 u16 configured@28:4 u32
PeerTraffic 32: tx_packets@0:8 u64 tx_bytes@8:8 u64 rx_packets@16:8 u64 rx_bytes@24:8 u64
Counter 16: packets@0:8 u64 bytes@8:8 u64
FlowKey 16: src@0:4 [u8; 4] dst@4:4 [u8; 4] sport@8:2 [u8; 2] dport@10:2 [u8; 2] proto@12:1 u8 dir@13:1 u8 _pad@14:2 [u8; 2]
FastFlow 32: approved_ns@0:8 u64 ifindex@8:4 u32 pod_mac@12:6 [u8; 6] gw_mac@18:6 [u8; 6] vtep@24:4 [u8; 4] _pad@28:4 u32
FastPathConfig 24: enabled@0:4 u32 pod_subnet@4:4 [u8; 4] pod_prefix_len@8:4 u32 mark@12:4 u32 gateway@16:4 [u8; 4] _pad@20:4 u32
DIR_TO_POD=1 DIR_FROM_POD=2
",
        ),
        // Dual stack: NODE_CONFIG6, REMOTE_SUBNETS6 and KNOWN_VTEPS6 are
        // new, and COUNTERS has 48 slots (it had 32).
        (
            3,
            "\
RemoteVtep 12: vtep_mac@0:6 [u8; 6] _pad@6:2 [u8; 2] public_ip@8:4 [u8; 4]
KnownVtep 8: vtep_mac@0:6 [u8; 6] _pad@6:2 [u8; 2]
NodeConfig 32: vni@0:4 u32 local_ip@4:4 [u8; 4] underlay_ifindex@8:4 u32 vxlan_ifindex@12:4 u32 underlay_mtu@16:4 u32 vtep_mac@20:6 [u8; 6] port@26:2 u16 configured@28:4 u32
RemoteVtep6 28: vtep_mac@0:6 [u8; 6] _pad@6:2 [u8; 2] public_ip@8:16 [u8; 16] peer@24:4 [u8; 4]
KnownVtep6 12: vtep_mac@0:6 [u8; 6] _pad@6:2 [u8; 2] peer@8:4 [u8; 4]
NodeConfig6 32: local_ip@0:16 [u8; 16] vxlan_ifindex@16:4 u32 vtep_mac@20:6 [u8; 6] _pad@26:2 [u8; 2] configured@28:4 u32
PeerTraffic 32: tx_packets@0:8 u64 tx_bytes@8:8 u64 rx_packets@16:8 u64 rx_bytes@24:8 u64
Counter 16: packets@0:8 u64 bytes@8:8 u64
FlowKey 16: src@0:4 [u8; 4] dst@4:4 [u8; 4] sport@8:2 [u8; 2] dport@10:2 [u8; 2] proto@12:1 u8 dir@13:1 u8 _pad@14:2 [u8; 2]
FastFlow 32: approved_ns@0:8 u64 ifindex@8:4 u32 pod_mac@12:6 [u8; 6] gw_mac@18:6 [u8; 6] vtep@24:4 [u8; 4] _pad@28:4 u32
FastPathConfig 24: enabled@0:4 u32 pod_subnet@4:4 [u8; 4] pod_prefix_len@8:4 u32 mark@12:4 u32 gateway@16:4 [u8; 4] _pad@20:4 u32
DIR_TO_POD=1 DIR_FROM_POD=2
",
        ),
        // The IPv6 fast path: FAST_CONFIG6, FAST_FLOWS6 and POD_ADDRS6 are
        // new.
        (
            4,
            "\
RemoteVtep 12: vtep_mac@0:6 [u8; 6] _pad@6:2 [u8; 2] public_ip@8:4 [u8; 4]
KnownVtep 8: vtep_mac@0:6 [u8; 6] _pad@6:2 [u8; 2]
NodeConfig 32: vni@0:4 u32 local_ip@4:4 [u8; 4] underlay_ifindex@8:4 u32 vxlan_ifindex@12:4 u32 underlay_mtu@16:4 u32 vtep_mac@20:6 [u8; 6] port@26:2 u16 configured@28:4 u32
RemoteVtep6 28: vtep_mac@0:6 [u8; 6] _pad@6:2 [u8; 2] public_ip@8:16 [u8; 16] peer@24:4 [u8; 4]
KnownVtep6 12: vtep_mac@0:6 [u8; 6] _pad@6:2 [u8; 2] peer@8:4 [u8; 4]
NodeConfig6 32: local_ip@0:16 [u8; 16] vxlan_ifindex@16:4 u32 vtep_mac@20:6 [u8; 6] _pad@26:2 [u8; 2] configured@28:4 u32
PeerTraffic 32: tx_packets@0:8 u64 tx_bytes@8:8 u64 rx_packets@16:8 u64 rx_bytes@24:8 u64
Counter 16: packets@0:8 u64 bytes@8:8 u64
FlowKey 16: src@0:4 [u8; 4] dst@4:4 [u8; 4] sport@8:2 [u8; 2] dport@10:2 [u8; 2] proto@12:1 u8 dir@13:1 u8 _pad@14:2 [u8; 2]
FastFlow 32: approved_ns@0:8 u64 ifindex@8:4 u32 pod_mac@12:6 [u8; 6] gw_mac@18:6 [u8; 6] vtep@24:4 [u8; 4] _pad@28:4 u32
FastPathConfig 24: enabled@0:4 u32 pod_subnet@4:4 [u8; 4] pod_prefix_len@8:4 u32 mark@12:4 u32 gateway@16:4 [u8; 4] _pad@20:4 u32
FlowKey6 40: src@0:16 [u8; 16] dst@16:16 [u8; 16] sport@32:2 [u8; 2] dport@34:2 [u8; 2] proto@36:1 u8 dir@37:1 u8 _pad@38:2 [u8; 2]
FastFlow6 40: approved_ns@0:8 u64 ifindex@8:4 u32 pod_mac@12:6 [u8; 6] gw_mac@18:6 [u8; 6] vtep@24:16 [u8; 16]
FastPathConfig6 40: enabled@0:4 u32 pod_prefix_len@4:4 u32 pod_subnet@8:16 [u8; 16] gateway@24:16 [u8; 16]
DIR_TO_POD=1 DIR_FROM_POD=2
",
        ),
    ];

    /// The `Reason` indices of the newest version (COUNTERS is indexed by
    /// them). Appending keeps a version's indices; renumbering needs a bump,
    /// and the list is then replaced by the new version's.
    const REASONS: &[(u32, &[&str])] = &[(
        4,
        &[
            "encapsulated",
            "decapsulated",
            "pass_not_ipv4",
            "pass_no_route",
            "pass_gso_tunnel",
            "pass_not_ours",
            "pass_too_big",
            "pass_outer_ip_unusual",
            "drop_unknown_vtep",
            "drop_wrong_vni",
            "drop_malformed",
            "drop_wrong_inner_mac",
            "pass_inner_not_ipv4",
            "drop_not_configured",
            "drop_adjust_failed",
            "drop_redirect_failed",
            "pass_not_configured",
            "pass_adjust_refused",
            "fast_egress",
            "fast_ingress",
            "fast_approval",
            "slow_to_pod",
            "pass_fast_unapproved",
            "pass_fast_tcp_control",
            "pass_fast_unusual",
            "pass_fast_not_remote",
            "drop_source_vtep_mismatch",
            "drop_fast_spoofed_source",
            "pass_fast_unbound",
            "encapsulated_ipv6",
            "decapsulated_ipv6",
            "pass_gso_ipv6",
            "pass_ipv6_unusual",
        ],
    )];

    #[test]
    fn layout_is_pinned_to_its_version() {
        let (newest, recorded) = *LAYOUTS.last().unwrap();
        let now = current_layout();
        assert!(
            now == recorded,
            "the layout of the pinned maps changed: bump MAP_LAYOUT_VERSION to {} and append \
             ({}, <the layout below>) to LAYOUTS, so that an upgrade creates new maps \
             instead of reusing ones its programs would misread.\nrecorded for version \
             {newest}:\n{recorded}\nnow:\n{now}",
            MAP_LAYOUT_VERSION + 1,
            MAP_LAYOUT_VERSION + 1,
        );
        assert_eq!(
            MAP_LAYOUT_VERSION, newest,
            "MAP_LAYOUT_VERSION is {MAP_LAYOUT_VERSION} but the newest layout in LAYOUTS is \
             version {newest}: bump MAP_LAYOUT_VERSION with a new entry in LAYOUTS"
        );
        assert!(
            LAYOUTS.windows(2).all(|w| w[0].0 < w[1].0),
            "LAYOUTS must be in version order"
        );
    }

    #[test]
    fn reasons_keep_their_indices_within_a_version() {
        use crate::counters::Reason;
        let (newest, names) = *REASONS.last().unwrap();
        assert_eq!(
            newest, MAP_LAYOUT_VERSION,
            "record the Reason indices of version {MAP_LAYOUT_VERSION} in REASONS"
        );
        for (i, name) in names.iter().enumerate() {
            let now = Reason::ALL.get(i).map(|r| r.name());
            assert!(
                now == Some(*name),
                "COUNTERS slot {i} is {name:?} in layout version {newest} but {now:?} now: \
                 a Reason was renumbered or removed; bump MAP_LAYOUT_VERSION (and record \
                 the new indices in REASONS)"
            );
        }
    }

    #[test]
    fn per_cpu_peer_traffic_is_summed() {
        let a = PeerTraffic {
            tx_packets: 1,
            tx_bytes: 100,
            rx_packets: 2,
            rx_bytes: 200,
        };
        let b = PeerTraffic {
            tx_packets: u64::MAX,
            tx_bytes: 1,
            rx_packets: 0,
            rx_bytes: 5,
        };
        let s = PeerTraffic::sum([&a, &b]);
        assert_eq!(
            (s.tx_packets, s.tx_bytes, s.rx_packets, s.rx_bytes),
            (0, 101, 2, 205)
        );
    }
}
