//! Map keys and values. All `#[repr(C)]` with explicit padding so the kernel,
//! the agent and `bpftool` (through BTF) agree on every byte.
//!
//! IPv4 addresses are stored as `[u8; 4]` in network order (as on the wire), so
//! no side byte-swaps and `bpftool` prints them as four octets.

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
    unsafe impl aya::Pod for crate::fastpath::FlowKey {}
    unsafe impl aya::Pod for crate::fastpath::FastFlow {}
    unsafe impl aya::Pod for crate::fastpath::FastPathConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<RemoteVtep>(), 12);
        assert_eq!(size_of::<KnownVtep>(), 8);
        assert_eq!(size_of::<NodeConfig>(), 32);
        assert_eq!(size_of::<PeerTraffic>(), 32);
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
