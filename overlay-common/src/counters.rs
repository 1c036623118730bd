//! Why a packet was encapsulated, decapsulated, passed to the kernel or dropped.
//!
//! The eBPF programs count every verdict in a per-CPU array indexed by
//! [`Reason`]; the agent and `bpftool` read the same indices.

/// One counter slot per reason. The discriminants are the array indices and are
/// part of the on-disk (pinned map) format: append, never renumber.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Egress: encapsulated and sent out of the underlay NIC.
    Encapsulated = 0,
    /// Ingress: decapsulated and delivered on `flannel.<VNI>`.
    Decapsulated = 1,
    /// Egress: not IPv4 (ARP, IPv6, ...); left to the kernel.
    PassNotIpv4 = 2,
    /// Egress: destination not in the remote-subnet map; left to the kernel.
    PassNoRoute = 3,
    /// Ingress: already a GSO UDP-tunnel aggregate; the kernel's vxlan device decapsulates it.
    PassGsoTunnel = 4,
    /// Ingress: not VXLAN for our address and port; untouched.
    PassNotOurs = 5,
    /// Egress: encapsulated, the packet would exceed the underlay MTU (a
    /// non-GSO packet, DF set or not: the program does not look) or the
    /// 64 KiB an IPv4 header can describe; left to the kernel's vxlan device,
    /// which lowers the inner route's path MTU and sends it as outer IPv4
    /// fragments (flannel's device leaves the outer DF clear).
    PassTooBig = 6,
    /// Ingress: the outer IPv4 header is a fragment or carries options; left to the kernel.
    PassOuterIpUnusual = 7,
    /// Ingress: VXLAN for our port from a source that holds no lease.
    DropUnknownVtep = 8,
    /// Ingress: VXLAN for our port with another VNI (or without the I flag).
    DropWrongVni = 9,
    /// A header was shorter than it claims or inconsistent.
    DropMalformed = 10,
    /// Ingress: the inner frame is not addressed to our VTEP MAC.
    DropWrongInnerMac = 11,
    /// Ingress: the inner frame is not of the device's family (IPv4 in
    /// VXLAN over IPv4, IPv6 over IPv6: e.g. ARP); the kernel's vxlan device
    /// gets it as under flannel.
    PassInnerNotIpv4 = 12,
    /// Reserved: the programs pass (see [`Reason::PassNotConfigured`]) rather than
    /// drop while unconfigured. Kept so that the indices after it stay stable.
    DropNotConfigured = 13,
    /// A helper that rewrites the packet failed after it had been changed, so
    /// neither the kernel nor the peer could make sense of it any more.
    DropAdjustFailed = 14,
    /// The redirect to the underlay NIC or to `flannel.<VNI>` failed.
    DropRedirectFailed = 15,
    /// The node settings map is not filled in yet, so nothing can be classified
    /// as ours: the packet continues on the kernel path untouched (dropping would
    /// cut the underlay off while the agent starts).
    PassNotConfigured = 16,
    /// `bpf_skb_adjust_room` refused the packet before changing it (e.g. egress
    /// of a packet a pod already encapsulated itself); the kernel's vxlan
    /// device handles it.
    PassAdjustRefused = 17,
    /// Fast path, from a pod (`veth_from_pod`): an approved flow's packet
    /// encapsulated at the pod's veth and sent out of the underlay NIC.
    FastEgress = 18,
    /// Fast path, toward a pod (`vxlan_ingress_tc`): decapsulated and
    /// delivered into the pod's namespace with `bpf_redirect_peer`.
    FastIngress = 19,
    /// Not a packet verdict: a slow-path packet the host's mangle rule had
    /// marked approved its flow for the fast path (`veth_to_pod`,
    /// `vxlan_egress`). Counts approvals and renewals.
    FastApproval = 20,
    /// Toward a pod on the slow path: the host's bridge sent it to the pod's
    /// veth (`veth_to_pod` counts every packet it sees).
    SlowToPod = 21,
    /// A fast-path hook left the packet to the host's path: its flow has no
    /// valid approval (new, expired, or the firewall has not accepted it).
    PassFastUnapproved = 22,
    /// A fast-path hook left the packet to the host's path: TCP SYN, FIN or
    /// RST, which conntrack must see; the flow's approval ends.
    PassFastTcpControl = 23,
    /// A fast-path hook left the packet to the host's path: IP options, a
    /// fragment, TTL 1, a protocol other than TCP, UDP and ICMP echo, a
    /// pod that is not behind one of our veths, or a packet longer than its
    /// veth's MTU.
    PassFastUnusual = 24,
    /// `veth_from_pod`: the destination is not a remote pod subnet (a
    /// service address before DNAT, the host, the internet, a local pod).
    PassFastNotRemote = 25,
    /// Ingress (TC): VXLAN from a known VTEP whose inner source lies in a
    /// subnet another VTEP serves: one node (or anyone spoofing its underlay
    /// address) impersonating another node's pods. On the fast path also an
    /// approved flow's packet from a VTEP other than the one the approval
    /// names.
    DropSourceVtepMismatch = 26,
    /// Fast path: an inner source the host's path would refuse as a martian
    /// or a spoof: toward a pod, an address of this node (its pod subnet's
    /// network, gateway or broadcast address) or of our own pod subnet from
    /// a remote VTEP; from a pod, a node address or an address the host
    /// delivers to another pod's veth.
    DropFastSpoofedSource = 27,
    /// `veth_from_pod`: an approved flow whose source address the host has
    /// not yet delivered anything to through this veth (a new pod on a
    /// reused address): the host's path decides, and binds it.
    PassFastUnbound = 28,
    /// Egress (`vxlan_egress6` on `flannel-v6.<VNI>`): an IPv6 packet
    /// encapsulated in outer IPv6 and sent out of the underlay NIC.
    Encapsulated6 = 29,
    /// Ingress: IPv6 VXLAN decapsulated and delivered on `flannel-v6.<VNI>`.
    Decapsulated6 = 30,
    /// Egress, IPv6: a GSO aggregate, left to `flannel-v6.<VNI>`'s kernel
    /// device. Every segment needs its own outer UDP checksum over IPv6, and
    /// the tunnel GSO type `bpf_skb_adjust_room` sets has no checksum
    /// variant, so segments built from our header would all carry the
    /// first one's.
    PassGso6 = 31,
    /// IPv6 the programs do not handle at fixed offsets, left to the kernel:
    /// egress, an inner packet with extension headers, an upper layer
    /// without a pseudo-header checksum (the outer checksum is derived from
    /// the inner one), a zero UDP checksum, or a length that disagrees with
    /// the frame's; ingress, an outer IPv6 header followed by extension
    /// headers.
    PassIpv6Unusual = 32,
}

impl Reason {
    /// Number of slots in the counter array (room left to append reasons).
    pub const SLOTS: u32 = 48;

    pub const ALL: [Reason; 33] = [
        Reason::Encapsulated,
        Reason::Decapsulated,
        Reason::PassNotIpv4,
        Reason::PassNoRoute,
        Reason::PassGsoTunnel,
        Reason::PassNotOurs,
        Reason::PassTooBig,
        Reason::PassOuterIpUnusual,
        Reason::DropUnknownVtep,
        Reason::DropWrongVni,
        Reason::DropMalformed,
        Reason::DropWrongInnerMac,
        Reason::PassInnerNotIpv4,
        Reason::DropNotConfigured,
        Reason::DropAdjustFailed,
        Reason::DropRedirectFailed,
        Reason::PassNotConfigured,
        Reason::PassAdjustRefused,
        Reason::FastEgress,
        Reason::FastIngress,
        Reason::FastApproval,
        Reason::SlowToPod,
        Reason::PassFastUnapproved,
        Reason::PassFastTcpControl,
        Reason::PassFastUnusual,
        Reason::PassFastNotRemote,
        Reason::DropSourceVtepMismatch,
        Reason::DropFastSpoofedSource,
        Reason::PassFastUnbound,
        Reason::Encapsulated6,
        Reason::Decapsulated6,
        Reason::PassGso6,
        Reason::PassIpv6Unusual,
    ];

    /// Stable snake_case name used in logs, `status` output and metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Encapsulated => "encapsulated",
            Reason::Decapsulated => "decapsulated",
            Reason::PassNotIpv4 => "pass_not_ipv4",
            Reason::PassNoRoute => "pass_no_route",
            Reason::PassGsoTunnel => "pass_gso_tunnel",
            Reason::PassNotOurs => "pass_not_ours",
            Reason::PassTooBig => "pass_too_big",
            Reason::PassOuterIpUnusual => "pass_outer_ip_unusual",
            Reason::DropUnknownVtep => "drop_unknown_vtep",
            Reason::DropWrongVni => "drop_wrong_vni",
            Reason::DropMalformed => "drop_malformed",
            Reason::DropWrongInnerMac => "drop_wrong_inner_mac",
            Reason::PassInnerNotIpv4 => "pass_inner_not_ipv4",
            Reason::DropNotConfigured => "drop_not_configured",
            Reason::DropAdjustFailed => "drop_adjust_failed",
            Reason::DropRedirectFailed => "drop_redirect_failed",
            Reason::PassNotConfigured => "pass_not_configured",
            Reason::PassAdjustRefused => "pass_adjust_refused",
            Reason::FastEgress => "fast_egress",
            Reason::FastIngress => "fast_ingress",
            Reason::FastApproval => "fast_approval",
            Reason::SlowToPod => "slow_to_pod",
            Reason::PassFastUnapproved => "pass_fast_unapproved",
            Reason::PassFastTcpControl => "pass_fast_tcp_control",
            Reason::PassFastUnusual => "pass_fast_unusual",
            Reason::PassFastNotRemote => "pass_fast_not_remote",
            Reason::DropSourceVtepMismatch => "drop_source_vtep_mismatch",
            Reason::DropFastSpoofedSource => "drop_fast_spoofed_source",
            Reason::PassFastUnbound => "pass_fast_unbound",
            Reason::Encapsulated6 => "encapsulated_ipv6",
            Reason::Decapsulated6 => "decapsulated_ipv6",
            Reason::PassGso6 => "pass_gso_ipv6",
            Reason::PassIpv6Unusual => "pass_ipv6_unusual",
        }
    }

    pub const fn index(self) -> u32 {
        self as u32
    }

    /// True for the reasons under which a program drops the packet.
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Reason::DropUnknownVtep
                | Reason::DropWrongVni
                | Reason::DropMalformed
                | Reason::DropWrongInnerMac
                | Reason::DropNotConfigured
                | Reason::DropAdjustFailed
                | Reason::DropRedirectFailed
                | Reason::DropSourceVtepMismatch
                | Reason::DropFastSpoofedSource
        )
    }
}

/// Per-CPU counter value: packets and bytes for one reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for Counter {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_slot_in_index_order() {
        for (i, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(reason.index() as usize, i);
        }
        assert!(Reason::ALL.len() as u32 <= Reason::SLOTS);
    }

    #[test]
    fn names_are_unique_and_prefixed_by_the_verdict() {
        for (i, a) in Reason::ALL.iter().enumerate() {
            for b in &Reason::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
            let name = a.name();
            if a.is_drop() {
                assert!(name.starts_with("drop_"), "{name}");
            } else {
                assert!(!name.starts_with("drop_"), "{name}");
            }
        }
    }
}
