//! One interface, two datapaths.
//!
//! Both implementations create `flannel.<VNI>` exactly as flannel does so that
//! routing selects it; they differ in who moves the packets: the kernel's vxlan
//! driver ([`kernel::KernelDatapath`]) or our TC/XDP programs
//! ([`ebpf::EbpfDatapath`]). The reconciler (and the tests) drive either through
//! [`Datapath`] with the same calls.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// Another node's lease as the datapath needs it. It lives with the lease
/// (the bottom layer, which `netlink` uses too); re-exported here for the
/// datapaths' callers. Nothing below `datapath` may use this path.
pub use crate::flannel::lease::Peer;
use crate::{
    flannel::mac::MacAddr,
    netlink::{DeviceError, VxlanDeviceSpec},
};

pub mod ebpf;
pub mod fastpath;
pub mod host_policy;
pub mod kernel;
pub mod pins;
pub mod tc_attach;
pub mod vtep_guard;
pub mod vtep_users;

/// What a node needs to bring its side of the overlay up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    /// VXLAN network identifier (`Backend.VNI`).
    pub vni: u32,
    /// UDP destination port (`Backend.Port`, 8472 when 0).
    pub port: u16,
    /// The address peers send to (flannel's `PublicIP`: `--public-ip`, else
    /// the interface address); the stable VTEP MAC derives from it.
    pub public_ip: Ipv4Addr,
    /// The underlay interface's address (flannel's `IfaceAddr`): the device's
    /// `local` and the outer source of what the eBPF path sends. It differs
    /// from `public_ip` on a node behind NAT.
    pub local_ip: Ipv4Addr,
    /// The underlay interface that holds `local_ip`.
    pub underlay: String,
    /// This node's lease, e.g. 10.5.52.0/24.
    pub subnet: Ipv4Net,
    /// `Backend.MTU` when set; otherwise the underlay's MTU. The device gets this minus 50.
    pub mtu: Option<u32>,
    /// Use this VTEP MAC instead of the stable derived one (e.g. the MAC in an existing lease).
    pub vtep_mac: Option<MacAddr>,
    /// `Backend.DirectRouting`: a peer whose PublicIP the underlay reaches
    /// without a gateway gets `<subnet> via <PublicIP> dev <underlay>`
    /// instead of VXLAN.
    pub direct_routing: bool,
    /// Dual stack: `flannel-v6.<VNI>` beside `flannel.<VNI>`.
    pub ipv6: Option<NodeSpec6>,
}

/// What a dual-stack node needs for its IPv6 side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeSpec6 {
    /// `PublicIPv6`: what peers send IPv6 VXLAN to, and the v6 device's
    /// `local` (as flanneld since v0.27.4).
    pub public_ip: Ipv6Addr,
    /// Our IPv6 lease.
    pub subnet: Ipv6Net,
    /// The MAC our lease publishes for the v6 VTEP, if it has one.
    pub vtep_mac: Option<MacAddr>,
}

impl NodeSpec {
    /// What `flannel.<VNI>` must be, for [`crate::netlink`] (which knows
    /// nothing of the datapath): every field but `direct_routing`.
    pub fn vxlan_device(&self) -> VxlanDeviceSpec {
        let NodeSpec {
            vni,
            port,
            public_ip,
            local_ip,
            underlay,
            subnet,
            mtu,
            vtep_mac,
            direct_routing: _,
            ipv6: _,
        } = self;
        VxlanDeviceSpec {
            vni: *vni,
            port: *port,
            public_ip: *public_ip,
            local_ip: *local_ip,
            underlay: underlay.clone(),
            subnet: *subnet,
            mtu: *mtu,
            vtep_mac: *vtep_mac,
            // Read but not applied to the IPv4 device (see daemon::startup).
            learning: false,
            gbp: false,
        }
    }

    /// What `flannel-v6.<VNI>` must be, for a dual-stack node.
    pub fn vxlan_device6(&self) -> Option<VxlanDeviceSpec<Ipv6Addr>> {
        let v6 = self.ipv6?;
        Some(VxlanDeviceSpec {
            vni: self.vni,
            port: self.port,
            public_ip: v6.public_ip,
            local_ip: v6.public_ip,
            underlay: self.underlay.clone(),
            subnet: v6.subnet,
            mtu: self.mtu,
            vtep_mac: v6.vtep_mac,
            learning: false,
            gbp: false,
        })
    }
}

/// What `setup` created, for the lease and for subnet.env.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeState {
    /// `flannel.<VNI>`.
    pub device: String,
    pub ifindex: u32,
    /// The device's MAC, published as `VtepMAC`.
    pub vtep_mac: MacAddr,
    /// The device's MTU (FLANNEL_MTU).
    pub mtu: u32,
    /// `flannel-v6.<VNI>`'s name and MAC (published as
    /// `BackendV6Data.VtepMAC`), for a dual-stack node.
    pub ipv6: Option<(String, MacAddr)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Ebpf,
    Kernel,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Ebpf => "ebpf",
            Mode::Kernel => "kernel",
        })
    }
}

/// What went wrong, naming the failed step. The eBPF variants carry the reason
/// the agent reports when it falls back to the kernel datapath.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// An rtnetlink request failed (the message names the operation).
    #[error(transparent)]
    Netlink(#[from] crate::netlink::NetlinkError),
    #[error("interface {0} not found")]
    NoSuchInterface(String),
    #[error("invalid node spec: {0}")]
    InvalidSpec(String),
    #[error("the datapath is not set up (call setup first)")]
    NotSetUp,
    /// Loading, verifying or attaching the programs, or a map operation.
    #[error(transparent)]
    Ebpf(Box<ebpf::EbpfError>),
    /// A peer map (REMOTE_SUBNETS, KNOWN_VTEPS or PEER_STATS) is at its
    /// capacity: the peer was not added, and nothing of it is in the maps.
    #[error("map {map} is full ({capacity} entries)")]
    MapFull { map: &'static str, capacity: u32 },
    /// The host-firewall guard of the VXLAN port (nft table `inet overlay-vtep`).
    #[error(transparent)]
    Guard(#[from] vtep_guard::GuardError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// The device layer's errors keep their variant and their text.
impl From<DeviceError> for DatapathError {
    fn from(e: DeviceError) -> Self {
        match e {
            DeviceError::Netlink(e) => DatapathError::Netlink(e),
            DeviceError::NoSuchInterface(name) => DatapathError::NoSuchInterface(name),
            DeviceError::InvalidSpec(why) => DatapathError::InvalidSpec(why),
        }
    }
}

impl From<ebpf::EbpfError> for DatapathError {
    fn from(e: ebpf::EbpfError) -> Self {
        match e {
            ebpf::EbpfError::MapFull { map, capacity } => DatapathError::MapFull { map, capacity },
            // Boxed: the aya errors inside are large, and every Result carries them.
            e => DatapathError::Ebpf(Box::new(e)),
        }
    }
}

impl DatapathError {
    /// This error and its causes on one line (`a: b: c`), for logs and for the
    /// reason given when falling back to the kernel datapath. A verifier log is
    /// left out: its last line is already in [`ebpf::EbpfError::Verifier`].
    pub fn reason(&self) -> String {
        one_line(self)
    }

    /// Whether `--datapath auto` must not fall back to the kernel datapath
    /// after this error: the pin directory holds a newer build's maps, with
    /// its programs attached through them. The kernel datapath would first
    /// remove those pins (which detaches the newer build that nobody asked
    /// to remove), or else run under programs nobody maintains; the agent
    /// stops instead, and the operator chooses.
    pub fn forbids_fallback(&self) -> bool {
        matches!(self, DatapathError::Ebpf(e) if matches!(**e, ebpf::EbpfError::PinLayout(_)))
    }

    /// The eBPF failure class, when this is an eBPF error.
    pub fn ebpf_failure(&self) -> Option<ebpf::EbpfFailure> {
        match self {
            DatapathError::Ebpf(e) => Some(e.failure()),
            _ => None,
        }
    }
}

/// An error and its causes on one line (`a: b: c`), for logs and for
/// [`DatapathError::reason`]. A verifier log is left out: its last line is
/// already in [`ebpf::EbpfError::Verifier`]'s own text.
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let is_verifier = |e: &(dyn std::error::Error + 'static)| {
        let ebpf = match e.downcast_ref::<DatapathError>() {
            Some(DatapathError::Ebpf(inner)) => Some(&**inner),
            _ => e.downcast_ref::<ebpf::EbpfError>(),
        };
        matches!(ebpf, Some(ebpf::EbpfError::Verifier { .. }))
    };
    let mut parts = vec![e.to_string()];
    let mut cause = if is_verifier(e) { None } else { e.source() };
    while let Some(e) = cause {
        let text = e.to_string();
        // Transparent wrappers repeat their inner error's text.
        if parts.last().is_none_or(|last| !last.ends_with(&text)) {
            parts.push(text);
        }
        cause = if is_verifier(e) { None } else { e.source() };
    }
    parts.join(": ").replace('\n', " ")
}

/// The calls both datapaths answer. The reconciler drives them with the same
/// sequence: `setup`, then `add_peer`/`remove_peer` as leases come and go, and
/// `teardown` only when the operator asks for everything to be removed.
#[allow(async_fn_in_trait)]
pub trait Datapath {
    fn mode(&self) -> Mode;
    /// Create (or adopt) `flannel.<VNI>` and whatever the datapath needs.
    async fn setup(&mut self, node: &NodeSpec) -> Result<NodeState, DatapathError>;
    /// Program the route to a peer's subnet. Idempotent; replaces a changed peer.
    async fn add_peer(&mut self, peer: &Peer) -> Result<(), DatapathError>;
    /// Forget a peer. Idempotent.
    async fn remove_peer(&mut self, peer: &Peer) -> Result<(), DatapathError>;
    /// [`Datapath::add_peer`] for many peers (distinct subnets): one result
    /// per peer, in order. A datapath may program them together (pipelined
    /// netlink requests, batched map updates); a peer that fails is left
    /// as `add_peer` leaves a failed peer, and the others are programmed.
    async fn add_peers(&mut self, peers: &[Peer]) -> Vec<Result<(), DatapathError>> {
        let mut results = Vec::with_capacity(peers.len());
        for p in peers {
            results.push(self.add_peer(p).await);
        }
        results
    }
    /// [`Datapath::remove_peer`] for many peers (distinct subnets), as
    /// [`Datapath::add_peers`].
    async fn remove_peers(&mut self, peers: &[Peer]) -> Vec<Result<(), DatapathError>> {
        let mut results = Vec::with_capacity(peers.len());
        for p in peers {
            results.push(self.remove_peer(p).await);
        }
        results
    }
    /// The peers currently programmed (read back from the kernel or the maps).
    async fn peers(&mut self) -> Result<Vec<Peer>, DatapathError>;
    /// Remove everything `setup` and `add_peer` created.
    async fn teardown(&mut self) -> Result<(), DatapathError>;
    /// Follow the pods' veths after a link change: the fast path attaches to
    /// new ones and forgets those that left. Only the eBPF datapath with the
    /// fast path on has anything to do.
    async fn sync_pods(&mut self) -> Result<(), DatapathError> {
        Ok(())
    }
    /// Many peer changes follow (start-up, a re-list): side effects that
    /// cost a process per change (the VTEP set of [`vtep_guard`]) are
    /// collected until [`Datapath::end_batch`], which applies them at once.
    fn begin_batch(&mut self) {}
    /// Applies what was collected since [`Datapath::begin_batch`].
    async fn end_batch(&mut self) -> Result<(), DatapathError> {
        Ok(())
    }
}

/// Either datapath behind one type, chosen at run time (the agent's
/// `--datapath auto` decides only when eBPF has loaded or failed), so one
/// reconciler serves both.
#[derive(Debug)]
pub enum AnyDatapath {
    Ebpf(ebpf::EbpfDatapath),
    Kernel(kernel::KernelDatapath),
}

impl AnyDatapath {
    /// The eBPF datapath, when that is the one running.
    pub fn as_ebpf(&self) -> Option<&ebpf::EbpfDatapath> {
        match self {
            AnyDatapath::Ebpf(d) => Some(d),
            AnyDatapath::Kernel(_) => None,
        }
    }
}

impl Datapath for AnyDatapath {
    fn mode(&self) -> Mode {
        match self {
            AnyDatapath::Ebpf(d) => d.mode(),
            AnyDatapath::Kernel(d) => d.mode(),
        }
    }
    async fn setup(&mut self, node: &NodeSpec) -> Result<NodeState, DatapathError> {
        match self {
            AnyDatapath::Ebpf(d) => d.setup(node).await,
            AnyDatapath::Kernel(d) => d.setup(node).await,
        }
    }
    async fn add_peer(&mut self, peer: &Peer) -> Result<(), DatapathError> {
        match self {
            AnyDatapath::Ebpf(d) => d.add_peer(peer).await,
            AnyDatapath::Kernel(d) => d.add_peer(peer).await,
        }
    }
    async fn remove_peer(&mut self, peer: &Peer) -> Result<(), DatapathError> {
        match self {
            AnyDatapath::Ebpf(d) => d.remove_peer(peer).await,
            AnyDatapath::Kernel(d) => d.remove_peer(peer).await,
        }
    }
    async fn add_peers(&mut self, peers: &[Peer]) -> Vec<Result<(), DatapathError>> {
        match self {
            AnyDatapath::Ebpf(d) => d.add_peers(peers).await,
            AnyDatapath::Kernel(d) => d.add_peers(peers).await,
        }
    }
    async fn remove_peers(&mut self, peers: &[Peer]) -> Vec<Result<(), DatapathError>> {
        match self {
            AnyDatapath::Ebpf(d) => d.remove_peers(peers).await,
            AnyDatapath::Kernel(d) => d.remove_peers(peers).await,
        }
    }
    async fn peers(&mut self) -> Result<Vec<Peer>, DatapathError> {
        match self {
            AnyDatapath::Ebpf(d) => d.peers().await,
            AnyDatapath::Kernel(d) => d.peers().await,
        }
    }
    async fn teardown(&mut self) -> Result<(), DatapathError> {
        match self {
            AnyDatapath::Ebpf(d) => d.teardown().await,
            AnyDatapath::Kernel(d) => d.teardown().await,
        }
    }
    async fn sync_pods(&mut self) -> Result<(), DatapathError> {
        match self {
            AnyDatapath::Ebpf(d) => d.sync_pods().await,
            AnyDatapath::Kernel(d) => d.sync_pods().await,
        }
    }
    fn begin_batch(&mut self) {
        match self {
            AnyDatapath::Ebpf(d) => d.begin_batch(),
            AnyDatapath::Kernel(d) => d.begin_batch(),
        }
    }
    async fn end_batch(&mut self) -> Result<(), DatapathError> {
        match self {
            AnyDatapath::Ebpf(d) => d.end_batch().await,
            AnyDatapath::Kernel(d) => d.end_batch().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_errors_keep_their_variant_and_text() {
        let invalid = crate::netlink::vxlan_device::checked_device_name(1 << 24).unwrap_err();
        let text = invalid.reason();
        assert_eq!(
            text,
            "invalid node spec: VNI 16777216 does not fit in 24 bits"
        );
        let mapped = DatapathError::from(invalid);
        assert!(matches!(mapped, DatapathError::InvalidSpec(_)));
        assert_eq!(mapped.reason(), text);

        let missing = DatapathError::from(DeviceError::NoSuchInterface("eth9".into()));
        assert!(matches!(&missing, DatapathError::NoSuchInterface(n) if n == "eth9"));
        assert_eq!(missing.reason(), "interface eth9 not found");
    }

    #[test]
    fn the_device_spec_is_the_node_spec_without_direct_routing() {
        let node = NodeSpec {
            vni: 4096,
            port: 4789,
            public_ip: "203.0.113.7".parse().unwrap(),
            local_ip: "192.168.64.3".parse().unwrap(),
            underlay: "eth0".into(),
            subnet: "10.5.52.0/24".parse().unwrap(),
            mtu: Some(9000),
            vtep_mac: Some("c6:d2:32:6f:8f:44".parse().unwrap()),
            direct_routing: true,
            ipv6: None,
        };
        assert_eq!(
            node.vxlan_device(),
            VxlanDeviceSpec {
                vni: 4096,
                port: 4789,
                public_ip: node.public_ip,
                local_ip: node.local_ip,
                underlay: "eth0".into(),
                subnet: node.subnet,
                mtu: Some(9000),
                vtep_mac: node.vtep_mac,
                learning: false,
                gbp: false,
            }
        );
    }
}
