//! Overlay members: a lab host running one of our datapaths or the iproute2
//! reference peer, behind one small interface, so a test (or the lab and bench
//! binaries) can build any mix and connect it as a full mesh.

use std::fmt;

use anyhow::Result;
use overlay_agent::{
    datapath::{
        NodeSpec, NodeSpec6, Peer,
        ebpf::{Counters, EbpfOptions, IngressMode},
        fastpath::FastPathMode,
    },
    flannel::{lease::Peer6, mac::MacAddr},
};
use overlay_common::consts::{DEFAULT_VNI, DEFAULT_VXLAN_PORT};

use crate::{
    lab::{Host, Host6},
    node::{Flavor, Node},
    reference::ReferencePeer,
};

/// The overlay's settings (flannel's `Backend.VNI` and `Backend.Port`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlay {
    pub vni: u32,
    pub port: u16,
}

impl Default for Overlay {
    fn default() -> Self {
        Overlay {
            vni: DEFAULT_VNI,
            port: DEFAULT_VXLAN_PORT,
        }
    }
}

impl Overlay {
    /// `flannel.<VNI>`.
    pub fn device(&self) -> String {
        format!("flannel.{}", self.vni)
    }
}

/// What moves a member's packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Our eBPF datapath with the given ingress mode.
    Ebpf(IngressMode),
    /// Our kernel-vxlan fallback (rtnetlink, nothing attached).
    Kernel,
    /// flannel's behaviour replayed with iproute2 (no code of ours).
    Reference,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Ebpf(mode) => write!(f, "ebpf({mode})"),
            Kind::Kernel => f.write_str("kernel-fallback"),
            Kind::Reference => f.write_str("iproute2-reference"),
        }
    }
}

enum Backend {
    Node(Node),
    Reference(ReferencePeer),
}

/// A host that has joined the overlay.
pub struct Member {
    pub host: Host,
    pub kind: Kind,
    pub overlay: Overlay,
    /// This member's lease as its peers program it (subnet, public IP, VTEP MAC).
    pub lease: Peer,
    /// `flannel.<VNI>`.
    pub device: String,
    backend: Backend,
}

impl Member {
    /// Sets `host` up as a member of `overlay` with the given kind (an eBPF
    /// member with the fast path as `--fast-path=auto` has it).
    pub fn join(host: &Host, kind: Kind, overlay: Overlay) -> Result<Member> {
        Self::join_with(host, kind, overlay, FastPathMode::Auto)
    }

    /// [`Member::join`] with the eBPF datapath's fast path set to `fast_path`.
    pub fn join_with(
        host: &Host,
        kind: Kind,
        overlay: Overlay,
        fast_path: FastPathMode,
    ) -> Result<Member> {
        Self::join_with_options(host, kind, overlay, with_fast_path(fast_path))
    }

    /// [`Member::join`] with these eBPF options (the ingress mode comes from
    /// `kind`).
    pub fn join_with_options(
        host: &Host,
        kind: Kind,
        overlay: Overlay,
        options: EbpfOptions,
    ) -> Result<Member> {
        Self::join_family(host, None, kind, overlay, options)
    }

    /// [`Member::join_with`] on a dual-stack host (a lab built with
    /// [`crate::lab::LabSpec::with_ipv6`]): our datapath also brings up
    /// `flannel-v6.<VNI>` for `host6`, and the lease carries its IPv6 side
    /// ([`overlay_agent::flannel::lease::Peer6`]), so [`mesh`] programs
    /// both families. The reference peer stays IPv4 only.
    pub fn join_dual_stack(
        host: &Host,
        host6: &Host6,
        kind: Kind,
        overlay: Overlay,
        fast_path: FastPathMode,
    ) -> Result<Member> {
        Self::join_family(host, Some(host6), kind, overlay, with_fast_path(fast_path))
    }

    fn join_family(
        host: &Host,
        host6: Option<&Host6>,
        kind: Kind,
        overlay: Overlay,
        options: EbpfOptions,
    ) -> Result<Member> {
        let (backend, lease, device) = match kind {
            Kind::Reference => {
                let r = ReferencePeer::setup(host, overlay.vni, overlay.port)?;
                let lease = r.as_peer();
                let device = r.device.clone();
                (Backend::Reference(r), lease, device)
            }
            Kind::Ebpf(_) | Kind::Kernel => {
                let flavor = match kind {
                    Kind::Ebpf(ingress) => Flavor::Ebpf(EbpfOptions { ingress, ..options }),
                    _ => Flavor::Kernel,
                };
                let node = Node::start(&host.ns, flavor)?;
                let state = node.setup(&NodeSpec {
                    vni: overlay.vni,
                    port: overlay.port,
                    public_ip: host.underlay_ip,
                    local_ip: host.underlay_ip,
                    underlay: host.underlay_dev.clone(),
                    subnet: host.subnet,
                    mtu: None,
                    vtep_mac: None,
                    direct_routing: false,
                    ipv6: host6.map(|h6| NodeSpec6 {
                        public_ip: h6.underlay_ip,
                        subnet: h6.subnet,
                        vtep_mac: None,
                    }),
                })?;
                let v6 = match (host6, &state.ipv6) {
                    (Some(h6), Some((_, vtep_mac))) => Some(Peer6 {
                        subnet: h6.subnet,
                        public_ip: h6.underlay_ip,
                        vtep_mac: *vtep_mac,
                    }),
                    (Some(_), None) => {
                        anyhow::bail!("[{}] dual-stack setup brought no IPv6 device up", host.ns)
                    }
                    (None, _) => None,
                };
                let lease = Peer {
                    subnet: host.subnet,
                    public_ip: host.underlay_ip,
                    vtep_mac: state.vtep_mac,
                    v6,
                };
                (Backend::Node(node), lease, state.device)
            }
        };
        Ok(Member {
            host: host.clone(),
            kind,
            overlay,
            lease,
            device,
            backend,
        })
    }

    pub fn vtep_mac(&self) -> MacAddr {
        self.lease.vtep_mac
    }

    /// The datapath handle (None for the reference peer).
    pub fn node(&self) -> Option<&Node> {
        match &self.backend {
            Backend::Node(n) => Some(n),
            Backend::Reference(_) => None,
        }
    }

    pub fn add_peer(&self, peer: &Peer) -> Result<()> {
        match &self.backend {
            Backend::Node(n) => n.add_peer(peer),
            Backend::Reference(r) => r.add_peer(peer),
        }
    }

    pub fn remove_peer(&self, peer: &Peer) -> Result<()> {
        match &self.backend {
            Backend::Node(n) => n.remove_peer(peer),
            Backend::Reference(r) => r.remove_peer(peer),
        }
    }

    /// eBPF counters (None unless this member runs the eBPF datapath).
    pub fn counters(&self) -> Result<Option<Counters>> {
        match &self.backend {
            Backend::Node(n) => n.counters(),
            Backend::Reference(_) => Ok(None),
        }
    }
}

/// Programs every member with every other member's lease.
pub fn mesh(members: &[&Member]) -> Result<()> {
    for m in members {
        for other in members.iter().filter(|o| o.host.index != m.host.index) {
            m.add_peer(&other.lease)?;
        }
    }
    Ok(())
}

/// The default eBPF options with the fast path set to `fast_path`.
fn with_fast_path(fast_path: FastPathMode) -> EbpfOptions {
    EbpfOptions {
        fast_path,
        ..EbpfOptions::default()
    }
}
