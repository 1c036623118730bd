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
    /// Egress: a non-GSO packet with DF set that would exceed the underlay MTU once
    /// encapsulated; the kernel path answers it with ICMP "fragmentation needed".
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
    /// Ingress: the inner frame is not IPv4 (e.g. ARP); the kernel's vxlan device gets it as under flannel.
    PassInnerNotIpv4 = 12,
    /// The node settings map is not filled in yet.
    DropNotConfigured = 13,
    /// A helper that resizes or rewrites the packet failed.
    DropAdjustFailed = 14,
    /// The redirect to the underlay NIC or to `flannel.<VNI>` failed.
    DropRedirectFailed = 15,
}

impl Reason {
    /// Number of slots in the counter array (room left to append reasons).
    pub const SLOTS: u32 = 32;

    pub const ALL: [Reason; 16] = [
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
        }
    }

    pub const fn index(self) -> u32 {
        self as u32
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
