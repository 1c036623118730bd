//! The eBPF datapath: TC egress encapsulation, XDP/TC ingress decapsulation.
//!
//! It keeps everything the kernel datapath programs (`flannel.<VNI>`, its
//! address, and per peer the neighbour, FDB entry and route: routing must still
//! select the device, and what the programs pass to the kernel must still
//! work), then fills the maps and attaches the programs:
//! `vxlan_egress` on TCX egress of `flannel.<VNI>`, `vxlan_ingress_tc` on TCX
//! ingress of the underlay and, in [`IngressMode::XdpAndTc`],
//! `vxlan_ingress_xdp` on the underlay. With the fast path on
//! ([`EbpfOptions::fast_path`], see [`super::fastpath`]) `veth_from_pod` and
//! `veth_to_pod` go on every pod veth, followed by [`Datapath::sync_pods`].
//!
//! Without a pin directory the links live as long as this value: dropping it
//! detaches the programs. With one ([`EbpfOptions::pins`], see [`super::pins`])
//! maps and links are pinned and outlive the agent; a later `setup` reopens
//! them and swaps new programs in atomically; [`Datapath::teardown`] removes
//! the pins and so detaches.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues, ProgramArray,
        lpm_trie::Key, lpm_trie::LpmTrie,
    },
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        xdp::XdpLink,
    },
};
use ipnet::{Ipv4Net, Ipv6Net};
use log::{debug, info, warn};
use overlay_common::{
    consts::{
        JUMP_INGRESS_TC6, JUMP_PROGRAMS, JUMP_VETH_ENCAP6, JUMP_VETH_FROM_POD6, JUMP_VETH_TO_POD6,
        MAP_COUNTERS, MAP_JUMPS, MAP_KNOWN_VTEPS, MAP_KNOWN_VTEPS6, MAP_LAYOUT, MAP_NODE_CONFIG,
        MAP_PEER_STATS, MAP_REMOTE_SUBNETS, MAP_REMOTE_SUBNETS6, MAX_PEERS, PROG_EGRESS,
        PROG_EGRESS6, PROG_INGRESS_TC, PROG_INGRESS_XDP, PROG_INGRESS_XDP_FILTER,
        PROG_VETH_FROM_POD, PROG_VETH_TO_POD,
    },
    counters::{Counter, Reason},
    fastpath::DEFAULT_FAST_PATH_MARK,
    maps::{KnownVtep, MAP_LAYOUT_VERSION, NodeConfig, PeerTraffic, RemoteVtep},
};

use super::{
    Datapath, DatapathError, Mode, NodeSpec, NodeState, Peer,
    fastpath::{self, FastPathMode, FastSettings, PodAttachments},
    host_policy::{self, HostPolicyConflict, HostPolicyError},
    kernel::{KernelDatapath, PeerKind},
    pins::{LayoutError, LayoutPlan, MAPS, PinLayout, declared_shapes},
    tc_attach::{self, TcApi, TcAttachMode, TcLink},
    vtep_users::VtepUsers,
};
use crate::{flannel::mac::MacAddr, netlink::VxlanDevice};

mod attach;
mod batch;
mod error;
mod loader;
mod maps;
mod maps6;

pub use attach::*;
pub use error::*;
use loader::*;
pub use maps::*;
use maps6::{
    Sides6, keep_held6, map_side6, prune_maps6, remove_peer6, set_peer6, write_node_config6,
};
pub use maps6::{
    known_vteps6, node_config6, read_node_config6, read_remote_subnets6, remote_vtep6, subnet_key6,
};

/// The eBPF object built by `build.rs` from `overlay-ebpf`, embedded so the
/// agent binary is self-contained.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/overlay"));

/// The oldest kernel the eBPF datapath runs on: encapsulation needs
/// `BPF_F_ADJ_ROOM_ENCAP_L2_ETH` (5.13), which an older kernel refuses only
/// at run time, packet by packet; the other helpers are older
/// (`bpf_csum_level` 5.7, `bpf_redirect_neigh` and `bpf_redirect_peer` 5.10).
pub const MIN_KERNEL: (u32, u32) = (5, 13);

/// Where ingress decapsulation happens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IngressMode {
    /// `vxlan_ingress_tc` alone on TCX ingress of the underlay.
    #[default]
    Tc,
    /// `vxlan_ingress_xdp` on the underlay decapsulates and marks, and
    /// `vxlan_ingress_tc` redirects the marked frames into `flannel.<VNI>`.
    /// On a veth, XDP disables GSO on its peer.
    XdpAndTc,
}

impl fmt::Display for IngressMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IngressMode::Tc => "tc",
            IngressMode::XdpAndTc => "xdp+tc",
        })
    }
}

/// How to run the eBPF datapath.
#[derive(Clone, Debug)]
pub struct EbpfOptions {
    pub ingress: IngressMode,
    /// XDP attach mode for [`IngressMode::XdpAndTc`]; the default lets the
    /// kernel use the driver's native XDP when it has one.
    pub xdp_mode: XdpMode,
    /// Pin maps and links here so they outlive this process (hitless
    /// restarts); `None` ties them to this value's lifetime.
    pub pins: Option<PinLayout>,
    /// Load this eBPF object instead of the embedded one (an upgrade test, or
    /// an operator trying a rebuilt program without rebuilding the agent).
    pub object: Option<PathBuf>,
    /// `--fast-path`: whether established pod traffic may skip the host.
    pub fast_path: FastPathMode,
    /// `--fast-path-mark`: the single mark bit of the fast path's approvals.
    pub fast_path_mark: u32,
    /// `--tc-attach`: TCX links or legacy clsact filters.
    pub tc_attach: TcAttachMode,
    /// How many peers the maps hold: the `max_entries` the loader gives
    /// REMOTE_SUBNETS, KNOWN_VTEPS, PEER_STATS and the IPv6 ones (default [`MAX_PEERS`], what
    /// the object declares). A peer beyond it is refused with
    /// [`DatapathError::MapFull`] and nothing of it enters the maps. Tests
    /// set it small to fill the maps.
    pub peer_capacity: u32,
}

impl Default for EbpfOptions {
    fn default() -> Self {
        EbpfOptions {
            ingress: IngressMode::default(),
            xdp_mode: XdpMode::default(),
            pins: None,
            object: None,
            fast_path: FastPathMode::default(),
            fast_path_mark: DEFAULT_FAST_PATH_MARK,
            tc_attach: TcAttachMode::default(),
            peer_capacity: MAX_PEERS,
        }
    }
}

impl EbpfOptions {
    /// The loader's `max_entries` overrides.
    fn capacities(&self) -> [(&'static str, u32); 5] {
        [
            MAP_REMOTE_SUBNETS,
            MAP_KNOWN_VTEPS,
            MAP_PEER_STATS,
            MAP_REMOTE_SUBNETS6,
            MAP_KNOWN_VTEPS6,
        ]
        .map(|m| (m, self.peer_capacity))
    }
}

/// The attach point of a program, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    TcxEgress,
    TcxIngress,
    ClsactEgress,
    ClsactIngress,
    Xdp,
}

impl Hook {
    /// The hook of a TC attach type under `api`.
    pub fn tc(api: TcApi, attach: TcAttachType) -> Hook {
        match (api, attach == TcAttachType::Egress) {
            (TcApi::Tcx, true) => Hook::TcxEgress,
            (TcApi::Tcx, false) => Hook::TcxIngress,
            (TcApi::Legacy, true) => Hook::ClsactEgress,
            (TcApi::Legacy, false) => Hook::ClsactIngress,
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hook::TcxEgress => "TCX egress",
            Hook::TcxIngress => "TCX ingress",
            Hook::ClsactEgress => "clsact egress",
            Hook::ClsactIngress => "clsact ingress",
            Hook::Xdp => "XDP",
        })
    }
}

/// The eBPF datapath. Like [`KernelDatapath`], create it anywhere and call
/// [`Datapath::setup`] on a thread inside the node's network namespace, within
/// a tokio runtime; keep it alive as long as the programs should stay attached.
#[derive(Debug)]
pub struct EbpfDatapath {
    options: EbpfOptions,
    kernel: KernelDatapath,
    /// Boxed: the aya object and the fast path's state are large.
    loaded: Option<Box<Loaded>>,
    /// Peers added while host policy (xfrm, policy routing) covers them:
    /// kernel entries only, no REMOTE_SUBNETS entry, so their traffic takes
    /// the kernel's vxlan device (see `add_peer`).
    kernel_only: BTreeMap<Ipv4Net, HostPolicyConflict>,
    /// Dual-stack peers whose IPv6 side host policy covers, by the peer's
    /// IPv4 subnet: judged apart from the IPv4 side, and left to
    /// `flannel-v6.<VNI>` the same way (see `add_peer`).
    kernel_only6: BTreeMap<Ipv4Net, HostPolicyConflict>,
}

impl EbpfDatapath {
    pub fn new(options: EbpfOptions) -> Self {
        Self {
            options,
            kernel: KernelDatapath::new(),
            loaded: None,
            kernel_only: BTreeMap::new(),
            kernel_only6: BTreeMap::new(),
        }
    }

    /// Peers left to the kernel's vxlan device because host policy covers
    /// them, with what covers them.
    pub fn kernel_only_peers(&self) -> &BTreeMap<Ipv4Net, HostPolicyConflict> {
        &self.kernel_only
    }

    /// Dual-stack peers (by IPv4 subnet) whose IPv6 side is left to
    /// `flannel-v6.<VNI>` because host policy covers it, with what covers it.
    pub fn kernel_only_peers6(&self) -> &BTreeMap<Ipv4Net, HostPolicyConflict> {
        &self.kernel_only6
    }

    pub fn options(&self) -> &EbpfOptions {
        &self.options
    }

    /// The device as set up.
    pub fn device(&self) -> Option<&VxlanDevice> {
        self.kernel.device()
    }

    /// The fast path's settings while it is on.
    pub fn fast_path_settings(&self) -> Option<FastSettings> {
        self.loaded.as_ref()?.fast.as_ref().map(|f| f.settings)
    }

    /// Ids of the loaded and attached programs.
    pub fn program_ids(&self) -> Option<ProgramIds> {
        self.loaded.as_ref().map(|l| l.ids)
    }

    /// COUNTERS summed over all CPUs, for every [`Reason`].
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        let loaded = self.loaded()?;
        let map = loaded
            .ebpf
            .map(MAP_COUNTERS)
            .ok_or(EbpfError::MissingMap(MAP_COUNTERS))?;
        Ok(read_counters(map)?)
    }

    /// PEER_STATS summed over all CPUs, by public IP.
    pub fn peer_counters(
        &self,
    ) -> Result<std::collections::HashMap<Ipv4Addr, PeerCounters>, DatapathError> {
        let loaded = self.loaded()?;
        let map = loaded
            .ebpf
            .map(MAP_PEER_STATS)
            .ok_or(EbpfError::MissingMap(MAP_PEER_STATS))?;
        Ok(read_peer_counters(map)?)
    }

    /// Our map `name`, for a reader that takes its own handle on it
    /// (`health::peers`: `/metrics` reads the peer maps when scraped).
    pub fn map(&self, name: &'static str) -> Result<&aya::maps::Map, DatapathError> {
        let loaded = self.loaded()?;
        Ok(loaded.ebpf.map(name).ok_or(EbpfError::MissingMap(name))?)
    }

    /// The peers in REMOTE_SUBNETS, sorted by subnet.
    pub fn map_peers(&self) -> Result<Vec<Peer>, DatapathError> {
        let loaded = self.loaded()?;
        let map = loaded
            .ebpf
            .map(MAP_REMOTE_SUBNETS)
            .ok_or(EbpfError::MissingMap(MAP_REMOTE_SUBNETS))?;
        Ok(read_remote_subnets(map)?)
    }

    /// The public IPs KNOWN_VTEPS holds.
    pub fn known_vteps(&self) -> Result<std::collections::HashSet<Ipv4Addr>, DatapathError> {
        let loaded = self.loaded()?;
        let map = loaded
            .ebpf
            .map(MAP_KNOWN_VTEPS)
            .ok_or(EbpfError::MissingMap(MAP_KNOWN_VTEPS))?;
        let vteps: HashMap<&MapData, [u8; 4], KnownVtep> =
            HashMap::try_from(map).map_err(|e| EbpfError::map(MAP_KNOWN_VTEPS, "open", e))?;
        let mut out = std::collections::HashSet::new();
        for key in vteps.keys() {
            let key = key.map_err(|e| EbpfError::map(MAP_KNOWN_VTEPS, "iterate", e))?;
            out.insert(Ipv4Addr::from(key));
        }
        Ok(out)
    }

    /// Whether KNOWN_VTEPS holds `ip`.
    pub fn knows_vtep(&self, ip: Ipv4Addr) -> Result<bool, DatapathError> {
        let loaded = self.loaded()?;
        let map = loaded
            .ebpf
            .map(MAP_KNOWN_VTEPS)
            .ok_or(EbpfError::MissingMap(MAP_KNOWN_VTEPS))?;
        let vteps: HashMap<&MapData, [u8; 4], KnownVtep> =
            HashMap::try_from(map).map_err(|e| EbpfError::map(MAP_KNOWN_VTEPS, "open", e))?;
        match vteps.get(&ip.octets(), 0) {
            Ok(_) => Ok(true),
            Err(e) if is_missing(&e) => Ok(false),
            Err(e) => Err(EbpfError::map(MAP_KNOWN_VTEPS, format!("look up {ip}"), e).into()),
        }
    }

    /// A start failed: what this attempt attached (or an earlier run pinned)
    /// would keep filtering with maps nobody maintains once we give up, so it
    /// goes; the kernel's vxlan driver then serves the device as it is.
    fn give_up(&mut self, subnet: Ipv4Net) {
        self.loaded = None;
        if let Err(undo) = remove_attachments(self.options.pins.as_ref()) {
            warn!(
                "after a failed start: {}",
                DatapathError::from(undo).reason()
            );
        }
        fastpath::release_host(subnet, self.options.pins.as_ref());
    }

    /// A peer's map entries once its kernel entries are in and its host
    /// policy is known (see [`Datapath::add_peer`]).
    fn map_peer(
        &mut self,
        peer: &Peer,
        kind: PeerKind,
        conflict: Option<HostPolicyConflict>,
        conflict6: Option<HostPolicyConflict>,
    ) -> Result<(), DatapathError> {
        let capacity = self.options.peer_capacity;
        let Loaded {
            ebpf,
            users,
            sides6,
            ..
        } = self.loaded.as_deref_mut().ok_or(DatapathError::NotSetUp)?;
        match (kind, &conflict) {
            (PeerKind::Vxlan, None) => insert_peer(ebpf, users, peer, capacity)?,
            (PeerKind::Vxlan, Some(HostPolicyConflict::Xfrm(_))) => {
                remove_peer_entries(ebpf, users, peer)?;
            }
            (PeerKind::Vxlan, Some(HostPolicyConflict::Route { .. })) | (PeerKind::Direct, _) => {
                insert_direct_peer(ebpf, users, peer, capacity)?;
            }
        }
        // The IPv6 side has its own verdict: the IPv4 one says nothing of
        // the host's IPv6 policy.
        map_side6(ebpf, sides6, peer, conflict6.as_ref(), capacity)?;
        self.note_conflict(peer, conflict);
        self.note_conflict6(peer, conflict6);
        Ok(())
    }

    /// [`Self::note_conflict`] for the peer's IPv6 side
    /// ([`Self::kernel_only_peers6`]).
    fn note_conflict6(&mut self, peer: &Peer, conflict: Option<HostPolicyConflict>) {
        match (conflict, peer.v6) {
            (Some(c), Some(p6)) => {
                if self.kernel_only6.get(&peer.subnet) != Some(&c) {
                    log::error!(
                        "peer {}: its IPv6 side {} via {}: {c}: its IPv6 traffic takes the kernel's flannel-v6 device (through xfrm and the routing rules), not the eBPF programs",
                        peer.subnet,
                        p6.subnet,
                        p6.public_ip
                    );
                }
                self.kernel_only6.insert(peer.subnet, c);
            }
            _ => {
                if self.kernel_only6.remove(&peer.subnet).is_some() {
                    info!(
                        "peer {}: no host policy covers its IPv6 side any more: back on the eBPF programs",
                        peer.subnet
                    );
                }
            }
        }
    }

    /// The host-policy verdict on `peer`'s IPv6 side: xfrm policies between
    /// our IPv6 VTEP address and its `PublicIPv6`, then `ip -6 route get
    /// <PublicIPv6> from <ours>`. None without an IPv6 side, and for a
    /// direct one (DirectRouting: its packets take the underlay's route,
    /// not `flannel-v6.<VNI>`), as a direct IPv4 side is not checked.
    async fn check_side6(&self, peer: &Peer) -> Result<Option<HostPolicyConflict>, DatapathError> {
        let (Some(p6), Some(device)) = (peer.v6, self.kernel.device6()) else {
            return Ok(None);
        };
        if self.kernel.is_direct6(peer.subnet) {
            return Ok(None);
        }
        let nl = self.kernel.netlink().ok_or(DatapathError::NotSetUp)?;
        Ok(host_policy::check_peer(
            nl,
            device.local,
            device.port,
            device.underlay_ifindex,
            p6.public_ip,
        )
        .await
        .map_err(EbpfError::HostPolicyCheck)?)
    }

    /// [`Self::check_side6`] for many peers: one xfrm dump, pipelined route
    /// lookups ([`host_policy::check_peers`]). One verdict per peer; those
    /// whose kernel entries failed (`programmed`) are not looked at.
    async fn check_sides6(
        &self,
        peers: &[Peer],
        programmed: &[Result<PeerKind, DatapathError>],
    ) -> Vec<Result<Option<HostPolicyConflict>, DatapathError>> {
        let mut out: Vec<Result<Option<HostPolicyConflict>, DatapathError>> =
            peers.iter().map(|_| Ok(None)).collect();
        let Some(device) = self.kernel.device6() else {
            return out;
        };
        let sides: Vec<(usize, Ipv6Addr)> = peers
            .iter()
            .zip(programmed)
            .enumerate()
            .filter(|(_, (p, k))| k.is_ok() && !self.kernel.is_direct6(p.subnet))
            .filter_map(|(i, (p, _))| Some((i, p.v6?.public_ip)))
            .collect();
        if sides.is_empty() {
            return out;
        }
        let Some(nl) = self.kernel.netlink() else {
            return peers.iter().map(|_| Err(DatapathError::NotSetUp)).collect();
        };
        let ips: Vec<Ipv6Addr> = sides.iter().map(|&(_, ip)| ip).collect();
        let verdicts =
            host_policy::check_peers(nl, device.local, device.port, device.underlay_ifindex, &ips)
                .await;
        for (&(i, _), v) in sides.iter().zip(verdicts) {
            out[i] = v.map_err(|e| EbpfError::HostPolicyCheck(e).into());
        }
        out
    }

    /// Keeps [`Self::kernel_only_peers`] in step with a peer's host-policy
    /// verdict, logging a change.
    fn note_conflict(&mut self, peer: &Peer, conflict: Option<HostPolicyConflict>) {
        match conflict {
            Some(c) => {
                if self.kernel_only.get(&peer.subnet) != Some(&c) {
                    log::error!(
                        "peer {} via {}: {c}: its traffic takes the kernel's vxlan device (through xfrm and the routing rules), not the eBPF programs",
                        peer.subnet,
                        peer.public_ip
                    );
                }
                self.kernel_only.insert(peer.subnet, c);
            }
            None => {
                if self.kernel_only.remove(&peer.subnet).is_some() {
                    info!(
                        "peer {} via {}: no host policy covers it any more: back on the eBPF programs",
                        peer.subnet, peer.public_ip
                    );
                }
            }
        }
    }

    fn loaded(&self) -> Result<&Loaded, DatapathError> {
        self.loaded.as_deref().ok_or(DatapathError::NotSetUp)
    }

    fn loaded_mut(&mut self) -> Result<&mut Loaded, DatapathError> {
        self.loaded.as_deref_mut().ok_or(DatapathError::NotSetUp)
    }
}

impl Datapath for EbpfDatapath {
    fn mode(&self) -> Mode {
        Mode::Ebpf
    }

    /// Sets up the device as the kernel datapath does, then loads the object,
    /// fills NODE_CONFIG and the peer maps from the peers already programmed in
    /// the kernel (an adopted device keeps its peers), and attaches. On error
    /// the device and its entries remain for the kernel datapath to adopt,
    /// and nothing of ours stays attached: whatever failed (the maps, the
    /// verifier, an attach half-way, or with `--fast-path=on` a pod veth),
    /// every pin and legacy filter of ours is removed (see
    /// [`remove_attachments`]), since no program may keep filtering with maps
    /// nobody maintains.
    async fn setup(&mut self, node: &NodeSpec) -> Result<NodeState, DatapathError> {
        // Before anything is touched, the device included: pins of a newer
        // layout (a downgrade) stop the start here and stay as they are,
        // with the programs attached through them (no `give_up`).
        let plan = match &self.options.pins {
            Some(pins) => pins
                .layout_plan(MAP_LAYOUT_VERSION)
                .map_err(EbpfError::PinLayout)?,
            None => LayoutPlan::Fresh,
        };
        // Detach a previous instance before the device may be re-created.
        self.loaded = None;
        let state = self.kernel.setup(node).await?;
        // Direct peers (known from an earlier setup of this datapath) get
        // no REMOTE_SUBNETS entry, only their KNOWN_VTEPS one.
        let (direct, peers): (Vec<Peer>, Vec<Peer>) = self
            .kernel
            .peers()
            .await?
            .into_iter()
            .partition(|p| self.kernel.is_direct(p.subnet));
        // Host policy the programs would skip keeps them off altogether: the
        // xfrm policies, and the routes of the peers an adopted device holds
        // (later peers are checked as they come, in add_peer).
        let device = self.kernel.device().ok_or(DatapathError::NotSetUp)?;
        let nl = self.kernel.netlink().ok_or(DatapathError::NotSetUp)?;
        let peer_ips: Vec<Ipv4Addr> = peers.iter().map(|p| p.public_ip).collect();
        let local6 = self.kernel.device6().map(|d| d.local);
        // The IPv6 sides flannel-v6.<VNI> holds, whoever's they are
        // (keep_held6 maps them all).
        let peer_ips6: Vec<Ipv6Addr> = self.kernel.held6().iter().map(|p| p.public_ip).collect();
        let checked = host_policy::check_start(
            nl,
            device.local,
            local6,
            device.port,
            device.underlay_ifindex,
            &peer_ips,
            &peer_ips6,
        )
        .await;
        let refusal = match checked {
            Ok(None) => None,
            Ok(Some(conflict)) => Some(EbpfError::HostPolicy(conflict)),
            Err(e) => Some(EbpfError::HostPolicyCheck(e)),
        };
        if let Some(e) = refusal {
            self.give_up(node.subnet);
            return Err(e.into());
        }
        self.kernel_only.clear();
        self.kernel_only6.clear();
        let device = self.kernel.device().ok_or(DatapathError::NotSetUp)?;
        let started = Loaded::start(
            &self.options,
            plan,
            Devices {
                v4: device,
                v6: self.kernel.device6(),
                held6: self.kernel.held6(),
                subnet6: node.ipv6.map(|n| n.subnet),
            },
            node.subnet,
            &peers,
            &direct,
        );
        let loaded = match started {
            Ok(loaded) => loaded,
            Err(e) => {
                self.give_up(node.subnet);
                return Err(e.into());
            }
        };
        info!(
            "eBPF datapath on {} (ingress {} on {}, TC via {}, fast path {}): programs {:?}, {} peers in the maps",
            device.name,
            self.options.ingress,
            device.underlay,
            loaded.api,
            if loaded.fast.is_some() { "on" } else { "off" },
            loaded.ids,
            peers.len()
        );
        if let Some((v6_device, _)) = &state.ipv6 {
            info!(
                "dual stack: {PROG_EGRESS6} on {v6_device}, IPv6 VXLAN decapsulated by {PROG_INGRESS_TC} (GSO aggregates and IPv6 the programs do not parse take {v6_device}'s kernel path); fast path for IPv6 {}",
                if loaded.fast.is_some() { "on" } else { "off" }
            );
        }
        self.loaded = Some(Box::new(loaded));
        // A pod veth that cannot be attached keeps the host's path; only
        // `--fast-path=on` makes that fatal. The next link event or
        // periodic recheck retries.
        if let Err(e) = self.sync_pods().await {
            if self.options.fast_path == FastPathMode::On {
                self.give_up(node.subnet);
                return Err(e);
            }
            warn!("fast path: attaching to the pod veths: {}", e.reason());
        }
        Ok(state)
    }

    /// Attaches the fast path to the pod veths that appeared and detaches it
    /// from those that left (a no-op while the fast path is off).
    async fn sync_pods(&mut self) -> Result<(), DatapathError> {
        let Some(settings) = self.fast_path_settings() else {
            return Ok(());
        };
        let nl = self.kernel.netlink().ok_or(DatapathError::NotSetUp)?;
        let net = nl.pod_network(settings.subnet, settings.subnet6).await?;
        let pins = self.options.pins.clone();
        let loaded = self.loaded_mut()?;
        if let Some(fast) = loaded.fast.as_mut() {
            // The bridge's address is the node's, never a pod's: the
            // programs learn it when a bridge holds it (or another address).
            if (fast.settings.gateway, fast.settings.gateway6) != (net.gateway, net.gateway6) {
                fast.settings.gateway = net.gateway;
                fast.settings.gateway6 = net.gateway6;
                fastpath::configure(&mut loaded.ebpf, Some(fast.settings))?;
            }
            fast.pods
                .sync(&mut loaded.ebpf, loaded.api, &net, pins.as_ref())
                .map_err(EbpfError::from)?;
        }
        Ok(())
    }

    /// The kernel entries first, then the maps. A peer the maps have no
    /// room for ([`DatapathError::MapFull`]) keeps its kernel entries, so its
    /// subnet still routes into `flannel.<VNI>` (the kernel device
    /// encapsulates what the programs pass), but none of its map entries: its
    /// VXLAN is dropped as from an unknown VTEP until a retry finds room.
    ///
    /// A direct peer (DirectRouting) gets its kernel route and a KNOWN_VTEPS
    /// entry (it may still send us VXLAN, when it does not see us as direct)
    /// but no REMOTE_SUBNETS entry, so neither egress nor the fast path
    /// encapsulates toward it: its packets take the kernel's route.
    ///
    /// A vxlan peer that host policy covers (an xfrm policy toward its
    /// PublicIP, or a route to it from another table or through another
    /// interface: see [`host_policy`]) is left to the kernel: its kernel
    /// entries, no REMOTE_SUBNETS entry, so `vxlan_egress` and the fast path
    /// pass its packets to the kernel's device, which encapsulates them and
    /// sends them through xfrm and the routing rules, as flannel does. It is
    /// logged, counted ([`Self::kernel_only_peers`]) and reported as
    /// programmed: refusing it instead would leave its subnet without a
    /// route, and its pods' packets would follow the default route
    /// unencapsulated. Under xfrm it gets no KNOWN_VTEPS entry either, so
    /// clear VXLAN from it is dropped at TC ingress and only what the kernel
    /// decrypts gets in; a route conflict keeps KNOWN_VTEPS, as a direct
    /// peer does. A dual-stack peer's IPv6 side is judged apart
    /// ([`Self::check_side6`]) and, when covered, left to
    /// `flannel-v6.<VNI>` the same way (see `map_side6`), whatever its IPv4
    /// side got. The decision is taken when the peer is added: a policy
    /// that appears or goes later takes effect at the next restart.
    async fn add_peer(&mut self, peer: &Peer) -> Result<(), DatapathError> {
        self.loaded()?;
        let kind = self.kernel.add_peer_kind(peer).await?;
        let conflict = match kind {
            PeerKind::Vxlan => {
                let device = self.kernel.device().ok_or(DatapathError::NotSetUp)?;
                let nl = self.kernel.netlink().ok_or(DatapathError::NotSetUp)?;
                host_policy::check_peer(
                    nl,
                    device.local,
                    device.port,
                    device.underlay_ifindex,
                    peer.public_ip,
                )
                .await
                .map_err(EbpfError::HostPolicyCheck)?
            }
            PeerKind::Direct => None,
        };
        let conflict6 = self.check_side6(peer).await?;
        self.map_peer(peer, kind, conflict, conflict6)
    }

    /// [`Datapath::add_peer`] for many peers: their kernel entries as
    /// pipelined batches ([`KernelDatapath::add_peers_kind`]), the host
    /// policy of the VXLAN ones checked with one xfrm dump and pipelined
    /// route lookups ([`host_policy::check_peers`]), then each peer's map
    /// entries as `add_peer` writes them. One result per peer.
    async fn add_peers(&mut self, peers: &[Peer]) -> Vec<Result<(), DatapathError>> {
        if self.loaded().is_err() {
            return peers.iter().map(|_| Err(DatapathError::NotSetUp)).collect();
        }
        let kinds = self.kernel.add_peers_kind(peers).await;
        let vxlan: Vec<usize> = (0..peers.len())
            .filter(|&i| matches!(kinds[i], Ok(PeerKind::Vxlan)))
            .collect();
        let mut checks: Vec<Option<Result<Option<HostPolicyConflict>, DatapathError>>> =
            (0..peers.len()).map(|_| None).collect();
        if !vxlan.is_empty() {
            let (Some(device), Some(nl)) = (self.kernel.device(), self.kernel.netlink()) else {
                return peers.iter().map(|_| Err(DatapathError::NotSetUp)).collect();
            };
            let ips: Vec<Ipv4Addr> = vxlan.iter().map(|&i| peers[i].public_ip).collect();
            let verdicts = host_policy::check_peers(
                nl,
                device.local,
                device.port,
                device.underlay_ifindex,
                &ips,
            )
            .await;
            for (&i, v) in vxlan.iter().zip(verdicts) {
                checks[i] = Some(v.map_err(|e| EbpfError::HostPolicyCheck(e).into()));
            }
        }
        let checks6 = self.check_sides6(peers, &kinds).await;
        let mut results: Vec<Result<(), DatapathError>> = Vec::with_capacity(peers.len());
        // The VXLAN peers no host policy covers (all of them, normally) go
        // into the maps as one batch per map; the others one at a time.
        // Either way each IPv6 side goes as its own verdict says.
        let mut plain = Vec::new();
        let mut plain6 = Vec::new();
        let each = peers.iter().zip(kinds).zip(checks).zip(checks6);
        for (i, (((peer, kind), check), check6)) in each.enumerate() {
            let result = match (kind, check, check6) {
                (Err(e), _, _) | (Ok(_), Some(Err(e)), _) | (Ok(_), _, Err(e)) => Err(e),
                (Ok(PeerKind::Vxlan), Some(Ok(None)), Ok(conflict6)) => {
                    plain.push(i);
                    plain6.push(conflict6);
                    Ok(())
                }
                (Ok(kind), Some(Ok(conflict)), Ok(conflict6)) => {
                    self.map_peer(peer, kind, conflict, conflict6)
                }
                (Ok(kind), None, Ok(conflict6)) => self.map_peer(peer, kind, None, conflict6),
            };
            results.push(result);
        }
        let batch: Vec<Peer> = plain.iter().map(|&i| peers[i]).collect();
        let capacity = self.options.peer_capacity;
        let Some(Loaded {
            ebpf,
            users,
            sides6,
            ..
        }) = self.loaded.as_deref_mut()
        else {
            return peers.iter().map(|_| Err(DatapathError::NotSetUp)).collect();
        };
        let inserted = batch::insert_peers(ebpf, users, &batch, capacity);
        // Each IPv6 side as its own verdict says (see map_peer).
        let inserted: Vec<Result<(), EbpfError>> = plain
            .iter()
            .zip(inserted)
            .zip(&plain6)
            .map(|((&i, r), c6)| {
                r.and_then(|()| map_side6(ebpf, sides6, &peers[i], c6.as_ref(), capacity))
            })
            .collect();
        for ((&i, r), c6) in plain.iter().zip(inserted).zip(plain6) {
            if r.is_ok() {
                self.note_conflict(&peers[i], None);
                self.note_conflict6(&peers[i], c6);
            }
            results[i] = r.map_err(DatapathError::from);
        }
        results
    }

    /// Removes the peer from the maps first (so egress stops encapsulating to
    /// it), then its kernel entries.
    async fn remove_peer(&mut self, peer: &Peer) -> Result<(), DatapathError> {
        let Loaded {
            ebpf,
            users,
            sides6,
            ..
        } = self.loaded.as_deref_mut().ok_or(DatapathError::NotSetUp)?;
        remove_peer_entries(ebpf, users, peer)?;
        remove_peer6(ebpf, sides6, peer)?;
        self.kernel_only.remove(&peer.subnet);
        self.kernel_only6.remove(&peer.subnet);
        self.kernel.remove_peer(peer).await
    }

    /// [`Datapath::remove_peer`] for many: each peer's map entries first,
    /// then the kernel entries of those whose map entries went, as
    /// pipelined batches ([`Datapath::remove_peers`] of the kernel datapath).
    async fn remove_peers(&mut self, peers: &[Peer]) -> Vec<Result<(), DatapathError>> {
        let Some(loaded) = self.loaded.as_deref_mut() else {
            return peers.iter().map(|_| Err(DatapathError::NotSetUp)).collect();
        };
        let mut results: Vec<Result<(), DatapathError>> = Vec::with_capacity(peers.len());
        for peer in peers {
            let r = remove_peer_entries(&mut loaded.ebpf, &mut loaded.users, peer)
                .and_then(|()| remove_peer6(&mut loaded.ebpf, &mut loaded.sides6, peer));
            if r.is_ok() {
                self.kernel_only.remove(&peer.subnet);
                self.kernel_only6.remove(&peer.subnet);
            }
            results.push(r.map_err(DatapathError::from));
        }
        let todo: Vec<usize> = (0..peers.len()).filter(|&i| results[i].is_ok()).collect();
        let batch: Vec<Peer> = todo.iter().map(|&i| peers[i]).collect();
        let removed = self.kernel.remove_peers(&batch).await;
        for (&i, r) in todo.iter().zip(removed) {
            results[i] = r;
        }
        results
    }

    /// Peers whose kernel entries are complete and whose map entries agree
    /// (their IPv6 side's too).
    async fn peers(&mut self) -> Result<Vec<Peer>, DatapathError> {
        let in_maps: std::collections::HashSet<Peer> = self.map_peers()?.into_iter().collect();
        let in_maps6: std::collections::HashSet<(Ipv4Addr, crate::flannel::lease::Peer6)> =
            match self.kernel.device6() {
                Some(_) => read_remote_subnets6(self.map(MAP_REMOTE_SUBNETS6)?)?
                    .into_iter()
                    .collect(),
                None => Default::default(),
            };
        let in_kernel = self.kernel.peers().await?;
        // KNOWN_VTEPS (and KNOWN_VTEPS6) read once, not looked up per peer.
        let known = self.known_vteps()?;
        let known6 = match self.kernel.device6() {
            Some(_) => known_vteps6(self.map(MAP_KNOWN_VTEPS6)?)?,
            None => Default::default(),
        };
        let mut agreed = Vec::with_capacity(in_kernel.len());
        let in_trie: std::collections::HashSet<Ipv4Net> =
            in_maps.iter().map(|p| p.subnet).collect();
        let in_trie6: std::collections::HashSet<ipnet::Ipv6Net> =
            in_maps6.iter().map(|(_, p6)| p6.subnet).collect();
        for peer in in_kernel {
            let kernel_only = self.kernel_only.get(&peer.subnet);
            let mapped = if self.kernel.is_direct(peer.subnet) || kernel_only.is_some() {
                !in_trie.contains(&peer.subnet)
            } else {
                // The maps hold the IPv4 side; the kernel's entries alone
                // carry the IPv6 one (checked by the kernel datapath).
                in_maps.contains(&Peer { v6: None, ..peer })
            };
            // A peer left to the kernel under xfrm has no KNOWN_VTEPS entry.
            let vtep_ok = matches!(kernel_only, Some(HostPolicyConflict::Xfrm(_)))
                || known.contains(&peer.public_ip);
            // The IPv6 side likewise, by its own verdict.
            let v6_ok = match (peer.v6, self.kernel_only6.get(&peer.subnet)) {
                (Some(p6), None) => {
                    in_maps6.contains(&(peer.public_ip, p6)) && known6.contains(&p6.public_ip)
                }
                (Some(p6), Some(c)) => {
                    !in_trie6.contains(&p6.subnet)
                        && (matches!(c, HostPolicyConflict::Xfrm(_))
                            || known6.contains(&p6.public_ip))
                }
                (None, _) => true,
            };
            if mapped && vtep_ok && v6_ok {
                agreed.push(peer);
            } else {
                warn!(
                    "peer {} is in the kernel but not (or differently) in the maps",
                    peer.subnet
                );
            }
        }
        Ok(agreed)
    }

    fn begin_batch(&mut self) {
        self.kernel.begin_batch();
    }

    async fn end_batch(&mut self) -> Result<(), DatapathError> {
        self.kernel.end_batch().await
    }

    /// Detaches the programs (dropping their links, removing their pins and
    /// legacy filters), removes the pinned maps, then deletes the device.
    async fn teardown(&mut self) -> Result<(), DatapathError> {
        if let Some(fast) = self.loaded.take().and_then(|l| l.fast) {
            fastpath::release_host(fast.settings.subnet, self.options.pins.as_ref());
        }
        remove_attachments(self.options.pins.as_ref())?;
        self.kernel.teardown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::vxlan_device::DeviceOrigin;

    fn device() -> VxlanDevice {
        VxlanDevice {
            name: "flannel.1".into(),
            ifindex: 7,
            mac: "02:11:22:33:44:55".parse().unwrap(),
            mtu: 1450,
            vni: 1,
            port: 8472,
            local: "192.168.64.3".parse().unwrap(),
            address: "10.5.52.0".parse().unwrap(),
            underlay: "eth0".into(),
            underlay_ifindex: 2,
            underlay_mtu: 1500,
            origin: DeviceOrigin::Created,
        }
    }

    fn peer() -> Peer {
        Peer {
            subnet: "10.5.53.0/24".parse().unwrap(),
            public_ip: "192.168.64.4".parse().unwrap(),
            vtep_mac: "c6:d2:32:6f:8f:44".parse().unwrap(),
            v6: None,
        }
    }

    #[test]
    fn node_config_has_every_field() {
        assert_eq!(
            node_config(&device()),
            NodeConfig {
                vni: 1,
                local_ip: [192, 168, 64, 3],
                underlay_ifindex: 2,
                vxlan_ifindex: 7,
                underlay_mtu: 1500,
                vtep_mac: [0x02, 0x11, 0x22, 0x33, 0x44, 0x55],
                port: 8472,
                configured: 1,
            }
        );
    }

    #[test]
    fn peer_map_entries_are_in_network_order() {
        let key = subnet_key("10.5.53.9/24".parse().unwrap());
        assert_eq!(key.prefix_len(), 24);
        assert_eq!(key.data(), [10, 5, 53, 0]);
        let v = remote_vtep(&peer());
        assert_eq!(v.public_ip, [192, 168, 64, 4]);
        assert_eq!(v.vtep_mac, [0xc6, 0xd2, 0x32, 0x6f, 0x8f, 0x44]);
        assert_eq!(known_vtep(&peer()).vtep_mac, v.vtep_mac);
        assert_eq!(
            peer_from_entry(&subnet_key(peer().subnet), &v),
            Some(peer())
        );
    }

    #[test]
    fn per_cpu_counters_are_summed() {
        let per_cpu = [
            Counter {
                packets: 3,
                bytes: 300,
            },
            Counter {
                packets: 0,
                bytes: 0,
            },
            Counter {
                packets: 4,
                bytes: 1000,
            },
        ];
        assert_eq!(
            sum_per_cpu(&per_cpu),
            Counter {
                packets: 7,
                bytes: 1300
            }
        );
        let counters = Counters {
            totals: vec![
                (Reason::Encapsulated, sum_per_cpu(&per_cpu)),
                (Reason::Decapsulated, Counter::default()),
            ],
        };
        assert_eq!(counters.get(Reason::Encapsulated).packets, 7);
        assert_eq!(counters.get(Reason::DropWrongVni), Counter::default());
        assert_eq!(counters.to_string(), "encapsulated=7p/1300B");
    }

    #[test]
    fn verifier_summary_is_one_line_with_the_last_words() {
        let err = std::io::Error::from_raw_os_error(libc::EACCES);
        let log = "0: (bf) r6 = r1\n1: (61) r2 = *(u32 *)(r6 +76)\ninvalid access to packet, off=0 size=4\nprocessed 12 insns (limit 1000000)\n\n";
        let s = verifier_summary(&err, log);
        assert!(!s.contains('\n'));
        assert!(
            s.ends_with("verifier: invalid access to packet, off=0 size=4"),
            "{s}"
        );
        assert!(verifier_summary(&err, "").ends_with("no verifier log"));
    }

    #[test]
    fn errors_are_classified_and_one_line() {
        let missing = EbpfError::MissingProgram(PROG_EGRESS);
        assert_eq!(missing.failure(), EbpfFailure::Load);
        assert_eq!(
            missing.to_string(),
            "eBPF: the object has no program vxlan_egress"
        );
        let attach = EbpfError::Attach {
            program: PROG_INGRESS_XDP,
            interface: "eth0".into(),
            hook: Hook::Xdp,
            source: ProgramError::UnknownInterface {
                name: "eth0".into(),
            },
        };
        assert_eq!(attach.failure(), EbpfFailure::Attach);
        assert_eq!(
            attach.to_string(),
            "eBPF: attaching vxlan_ingress_xdp to eth0 (XDP) failed"
        );
        let as_datapath: DatapathError = attach.into();
        assert_eq!(as_datapath.ebpf_failure(), Some(EbpfFailure::Attach));
        assert_eq!(
            as_datapath.reason(),
            "eBPF: attaching vxlan_ingress_xdp to eth0 (XDP) failed: unknown network interface eth0"
        );
        let not_ebpf = DatapathError::NoSuchInterface("eth9".into());
        assert_eq!(not_ebpf.ebpf_failure(), None);
        assert_eq!(not_ebpf.reason(), "interface eth9 not found");
    }

    #[test]
    fn the_datapath_can_move_between_threads() {
        fn assert_send<T: Send>() {}
        assert_send::<EbpfDatapath>();
        assert_send::<KernelDatapath>();
    }
}
