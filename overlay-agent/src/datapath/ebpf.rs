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
    net::Ipv4Addr,
    path::PathBuf,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues, lpm_trie::Key,
        lpm_trie::LpmTrie,
    },
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        xdp::XdpLink,
    },
};
use ipnet::Ipv4Net;
use log::{debug, info, warn};
use overlay_common::{
    consts::{
        MAP_COUNTERS, MAP_KNOWN_VTEPS, MAP_NODE_CONFIG, MAP_PEER_STATS, MAP_REMOTE_SUBNETS,
        MAX_PEERS, PROG_EGRESS, PROG_INGRESS_TC, PROG_INGRESS_XDP, PROG_INGRESS_XDP_FILTER,
        PROG_VETH_FROM_POD, PROG_VETH_TO_POD,
    },
    counters::{Counter, Reason},
    maps::{KnownVtep, NodeConfig, PeerTraffic, RemoteVtep},
};

use super::{
    Datapath, DatapathError, Mode, NodeSpec, NodeState, Peer,
    fastpath::{self, FastPathMode, PodAttachments},
    host_policy::{self, HostPolicyConflict, HostPolicyError},
    kernel::{KernelDatapath, PeerKind},
    pins::{MAPS, PinLayout, declared_shapes},
    tc_attach::{self, TcApi, TcAttachMode, TcLink},
    vtep_users::VtepUsers,
};
use crate::{flannel::mac::MacAddr, netlink::VxlanDevice};

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
    /// `--tc-attach`: TCX links or legacy clsact filters.
    pub tc_attach: TcAttachMode,
    /// How many peers the maps hold: the `max_entries` the loader gives
    /// REMOTE_SUBNETS, KNOWN_VTEPS and PEER_STATS (default [`MAX_PEERS`], what
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
            tc_attach: TcAttachMode::default(),
            peer_capacity: MAX_PEERS,
        }
    }
}

impl EbpfOptions {
    /// The loader's `max_entries` overrides.
    fn capacities(&self) -> [(&'static str, u32); 3] {
        [MAP_REMOTE_SUBNETS, MAP_KNOWN_VTEPS, MAP_PEER_STATS].map(|m| (m, self.peer_capacity))
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

/// The broad class of an eBPF failure, for the fallback decision and its log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EbpfFailure {
    /// The object could not be parsed, lacks a program or map, or a program
    /// could not be prepared for loading.
    Load,
    /// The kernel refused a program (`BPF_PROG_LOAD` failed; the verifier
    /// log is kept in the error).
    Verifier,
    /// Attaching a program to an interface failed.
    Attach,
    /// Reading or writing a map failed.
    Map,
    /// The host has policy (xfrm, policy routing) the programs would skip,
    /// or it could not be checked.
    HostPolicy,
}

/// Why the eBPF datapath could not be set up or updated. `Display` names the
/// failed step; the cause is the `source`. [`DatapathError::reason`] renders
/// both on one line, the reason the agent gives when it falls back to the
/// kernel datapath.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("eBPF: loading the object failed")]
    Object(#[source] aya::EbpfError),
    #[error("eBPF: the object has no program {0}")]
    MissingProgram(&'static str),
    #[error("eBPF: the object has no map {0}")]
    MissingMap(&'static str),
    /// The full verifier log is in `source` (`ProgramError::LoadError`);
    /// `summary` holds the errno and the log's last line.
    #[error("eBPF: the kernel rejected {program}: {summary}")]
    Verifier {
        program: &'static str,
        summary: String,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF: preparing {program} failed")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF: attaching {program} to {interface} ({hook}) failed")]
    Attach {
        program: &'static str,
        interface: String,
        hook: Hook,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF: removing our clsact filter {program} from {interface} failed")]
    Detach {
        program: &'static str,
        interface: String,
        #[source]
        source: crate::netlink::tc::TcNetlinkError,
    },
    #[error("eBPF: listing the clsact filters of {interface} failed")]
    ListFilters {
        interface: String,
        #[source]
        source: crate::netlink::tc::TcNetlinkError,
    },
    /// Another filter sits at our priority and handle: replacing it would
    /// destroy someone else's filter, so we leave it and fail instead.
    #[error(
        "eBPF: {program} cannot take its clsact place on {interface} (pref 8472 handle 1): another tool's {kind} filter{} holds it",
        name.as_ref().map(|n| format!(" {n}")).unwrap_or_default()
    )]
    LegacySlotTaken {
        program: &'static str,
        interface: String,
        kind: String,
        name: Option<String>,
    },
    #[error("eBPF: map {map}: {op} failed")]
    Map {
        map: &'static str,
        op: String,
        #[source]
        source: MapError,
    },
    #[error("eBPF: pin {path}: {op} failed")]
    Pin {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("eBPF: pinned link {path}: {op} failed")]
    Link {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: LinkError,
    },
    /// Per-CPU map values need the number of possible CPUs.
    #[error("eBPF: sizing per-CPU values from /sys/devices/system/cpu/possible failed")]
    Cpus(#[source] std::io::Error),
    #[error("eBPF: reading the object {path} failed")]
    ReadObject {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The running kernel lacks a helper feature the programs depend on at
    /// run time (the verifier would accept them and encapsulation fail).
    #[error(
        "eBPF: kernel {}.{} is older than {}.{}, the first whose bpf_skb_adjust_room can encapsulate an Ethernet frame (BPF_F_ADJ_ROOM_ENCAP_L2_ETH)",
        found.0, found.1, MIN_KERNEL.0, MIN_KERNEL.1
    )]
    KernelTooOld { found: (u32, u32) },
    /// `--fast-path=on` and the host's part could not be installed.
    #[error("eBPF: the fast path cannot be turned on: {0}")]
    FastPathHost(String),
    /// A peer map has no room for another entry (E2BIG from a hash map,
    /// ENOSPC from the LPM trie). Becomes [`DatapathError::MapFull`].
    #[error("eBPF: map {map} is full ({capacity} entries)")]
    MapFull { map: &'static str, capacity: u32 },
    /// The host applies policy to node-to-node traffic that the programs'
    /// outer packets would skip (see [`host_policy`]).
    #[error("eBPF: the host's policy for node traffic would be skipped")]
    HostPolicy(#[source] HostPolicyConflict),
    /// The host's xfrm policies or a peer's route could not be read: the
    /// eBPF datapath does not start on a guess.
    #[error("eBPF: checking the host's xfrm policies and routes failed")]
    HostPolicyCheck(#[source] HostPolicyError),
}

impl EbpfError {
    pub fn failure(&self) -> EbpfFailure {
        match self {
            EbpfError::Object(_)
            | EbpfError::MissingProgram(_)
            | EbpfError::MissingMap(_)
            | EbpfError::Program { .. }
            | EbpfError::ReadObject { .. }
            | EbpfError::KernelTooOld { .. } => EbpfFailure::Load,
            EbpfError::Verifier { .. } => EbpfFailure::Verifier,
            EbpfError::Attach { .. }
            | EbpfError::Detach { .. }
            | EbpfError::ListFilters { .. }
            | EbpfError::LegacySlotTaken { .. } => EbpfFailure::Attach,
            EbpfError::Map { .. }
            | EbpfError::MapFull { .. }
            | EbpfError::Pin { .. }
            | EbpfError::Link { .. }
            | EbpfError::Cpus(_) => EbpfFailure::Map,
            EbpfError::FastPathHost(_) => EbpfFailure::Attach,
            EbpfError::HostPolicy(_) | EbpfError::HostPolicyCheck(_) => EbpfFailure::HostPolicy,
        }
    }

    pub(super) fn map(map: &'static str, op: impl Into<String>, source: MapError) -> Self {
        EbpfError::Map {
            map,
            op: op.into(),
            source,
        }
    }

    fn load(program: &'static str, source: ProgramError) -> Self {
        match &source {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => EbpfError::Verifier {
                program,
                summary: verifier_summary(io_error, &verifier_log.to_string()),
                source,
            },
            _ => EbpfError::Program { program, source },
        }
    }
}

/// The errno and the verifier's last words (its final non-empty log line
/// usually names the offending instruction or the limit hit).
fn verifier_summary(io_error: &std::io::Error, log: &str) -> String {
    let last = log
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("processed "))
        .unwrap_or("no verifier log");
    format!("{io_error}; verifier: {last}")
}

/// Program ids, for `bpftool prog show id <id>` and for tests that check what
/// is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramIds {
    pub egress: u32,
    pub ingress_tc: u32,
    pub ingress_xdp: Option<u32>,
}

/// Counter totals over all CPUs, per [`Reason`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    totals: Vec<(Reason, Counter)>,
}

impl Counters {
    /// Counters with these totals (reasons not listed count zero).
    pub fn from_totals(totals: Vec<(Reason, Counter)>) -> Self {
        Counters { totals }
    }

    pub fn get(&self, reason: Reason) -> Counter {
        self.totals
            .iter()
            .find(|(r, _)| *r == reason)
            .map(|(_, c)| *c)
            .unwrap_or_default()
    }

    pub fn iter(&self) -> impl Iterator<Item = (Reason, Counter)> + '_ {
        self.totals.iter().copied()
    }

    /// The reasons that counted anything, for logs and failure messages.
    pub fn nonzero(&self) -> Vec<(Reason, Counter)> {
        self.iter().filter(|(_, c)| c.packets != 0).collect()
    }
}

impl fmt::Display for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .nonzero()
            .iter()
            .map(|(r, c)| format!("{}={}p/{}B", r.name(), c.packets, c.bytes))
            .collect();
        if parts.is_empty() {
            f.write_str("(all zero)")
        } else {
            f.write_str(&parts.join(" "))
        }
    }
}

/// Sums one reason's per-CPU values.
pub fn sum_per_cpu(values: &[Counter]) -> Counter {
    values.iter().fold(Counter::default(), |acc, c| Counter {
        packets: acc.packets.wrapping_add(c.packets),
        bytes: acc.bytes.wrapping_add(c.bytes),
    })
}

/// The NODE_CONFIG entry for a device (all fields, `configured = 1`).
pub fn node_config(device: &VxlanDevice) -> NodeConfig {
    NodeConfig {
        vni: device.vni,
        local_ip: device.local.octets(),
        underlay_ifindex: device.underlay_ifindex,
        vxlan_ifindex: device.ifindex,
        underlay_mtu: device.underlay_mtu,
        vtep_mac: device.mac.0,
        port: device.port,
        configured: 1,
    }
}

/// The REMOTE_SUBNETS key for a subnet: its prefix, network order.
pub fn subnet_key(subnet: Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(subnet.prefix_len()), subnet.network().octets())
}

pub fn remote_vtep(peer: &Peer) -> RemoteVtep {
    RemoteVtep {
        vtep_mac: peer.vtep_mac.0,
        _pad: [0; 2],
        public_ip: peer.public_ip.octets(),
    }
}

pub fn known_vtep(peer: &Peer) -> KnownVtep {
    KnownVtep {
        vtep_mac: peer.vtep_mac.0,
        _pad: [0; 2],
    }
}

fn peer_from_entry(key: &Key<[u8; 4]>, value: &RemoteVtep) -> Option<Peer> {
    let prefix = u8::try_from(key.prefix_len()).ok()?;
    Some(Peer {
        subnet: Ipv4Net::new(Ipv4Addr::from(key.data()), prefix).ok()?,
        public_ip: Ipv4Addr::from(value.public_ip),
        vtep_mac: MacAddr(value.vtep_mac),
    })
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
}

#[derive(Debug)]
struct Loaded {
    ebpf: Ebpf,
    /// The peers the maps hold, counted by public IP: whether a removal
    /// leaves a VTEP unused is a lookup, not a scan of REMOTE_SUBNETS.
    users: VtepUsers,
    ids: ProgramIds,
    /// What the TC programs attach through.
    api: TcApi,
    /// The TC links of the underlay and `flannel.<VNI>`, held so they stay.
    _links: Vec<TcLink>,
    /// Set while the fast path is on: our subnet and the pod veths.
    fast: Option<FastState>,
}

#[derive(Debug)]
struct FastState {
    subnet: Ipv4Net,
    pods: PodAttachments,
}

impl EbpfDatapath {
    pub fn new(options: EbpfOptions) -> Self {
        Self {
            options,
            kernel: KernelDatapath::new(),
            loaded: None,
            kernel_only: BTreeMap::new(),
        }
    }

    /// Peers left to the kernel's vxlan device because host policy covers
    /// them, with what covers them.
    pub fn kernel_only_peers(&self) -> &BTreeMap<Ipv4Net, HostPolicyConflict> {
        &self.kernel_only
    }

    pub fn options(&self) -> &EbpfOptions {
        &self.options
    }

    /// The device as set up.
    pub fn device(&self) -> Option<&VxlanDevice> {
        self.kernel.device()
    }

    /// The pod subnet the fast path serves, while it is on.
    pub fn fast_path_subnet(&self) -> Option<Ipv4Net> {
        self.loaded.as_ref()?.fast.as_ref().map(|f| f.subnet)
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

    fn loaded(&self) -> Result<&Loaded, DatapathError> {
        self.loaded.as_deref().ok_or(DatapathError::NotSetUp)
    }

    fn loaded_mut(&mut self) -> Result<&mut Loaded, DatapathError> {
        self.loaded.as_deref_mut().ok_or(DatapathError::NotSetUp)
    }
}

/// One peer's traffic, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCounters {
    pub public_ip: Ipv4Addr,
    pub tx: Counter,
    pub rx: Counter,
}

/// Reads COUNTERS (an open map: ours, or one reopened from its pin).
pub fn read_counters(map: &aya::maps::Map) -> Result<Counters, EbpfError> {
    let counters: PerCpuArray<&MapData, Counter> =
        PerCpuArray::try_from(map).map_err(|e| EbpfError::map(MAP_COUNTERS, "open", e))?;
    let mut totals = Vec::with_capacity(Reason::ALL.len());
    for reason in Reason::ALL {
        let values = counters
            .get(&reason.index(), 0)
            .map_err(|e| EbpfError::map(MAP_COUNTERS, format!("read {}", reason.name()), e))?;
        totals.push((reason, sum_per_cpu(&values)));
    }
    Ok(Counters { totals })
}

/// Reads REMOTE_SUBNETS as peers, sorted by subnet.
pub fn read_remote_subnets(map: &aya::maps::Map) -> Result<Vec<Peer>, EbpfError> {
    let trie: LpmTrie<&MapData, [u8; 4], RemoteVtep> =
        LpmTrie::try_from(map).map_err(|e| EbpfError::map(MAP_REMOTE_SUBNETS, "open", e))?;
    let mut peers = Vec::new();
    for entry in trie.iter() {
        let (key, value) = entry.map_err(|e| EbpfError::map(MAP_REMOTE_SUBNETS, "iterate", e))?;
        peers.extend(peer_from_entry(&key, &value));
    }
    peers.sort_by_key(|p| (p.subnet.network(), p.subnet.prefix_len()));
    Ok(peers)
}

/// Reads NODE_CONFIG's entry.
pub fn read_node_config(map: &aya::maps::Map) -> Result<NodeConfig, EbpfError> {
    let config: Array<&MapData, NodeConfig> =
        Array::try_from(map).map_err(|e| EbpfError::map(MAP_NODE_CONFIG, "open", e))?;
    config
        .get(&0, 0)
        .map_err(|e| EbpfError::map(MAP_NODE_CONFIG, "read entry 0", e))
}

/// Reads PEER_STATS (an open map: ours, or one reopened from its pin) in
/// one pass, keyed by public IP for the callers' lookups per peer.
pub fn read_peer_counters(
    map: &aya::maps::Map,
) -> Result<std::collections::HashMap<Ipv4Addr, PeerCounters>, EbpfError> {
    let stats: PerCpuHashMap<&MapData, [u8; 4], PeerTraffic> =
        PerCpuHashMap::try_from(map).map_err(|e| EbpfError::map(MAP_PEER_STATS, "open", e))?;
    let mut out = std::collections::HashMap::new();
    for entry in stats.iter() {
        let (ip, values) = entry.map_err(|e| EbpfError::map(MAP_PEER_STATS, "iterate", e))?;
        let t = PeerTraffic::sum(values.iter());
        let counters = PeerCounters {
            public_ip: Ipv4Addr::from(ip),
            tx: Counter {
                packets: t.tx_packets,
                bytes: t.tx_bytes,
            },
            rx: Counter {
                packets: t.rx_packets,
                bytes: t.rx_bytes,
            },
        };
        out.insert(counters.public_ip, counters);
    }
    Ok(out)
}

fn pin_err(path: PathBuf, op: &'static str) -> impl FnOnce(std::io::Error) -> EbpfError {
    move |source| EbpfError::Pin { path, op, source }
}

fn link_err(path: PathBuf, op: &'static str) -> impl FnOnce(LinkError) -> EbpfError {
    move |source| EbpfError::Link { path, op, source }
}

impl Loaded {
    /// Parses the object (reopening pinned maps), fills the maps with the
    /// vxlan `peers` and the `direct` ones (DirectRouting), removes what
    /// else reopened maps hold, loads every program, and only then attaches
    /// them (ingress first), so a verifier rejection attaches nothing and
    /// leaves pinned links on the old programs.
    fn start(
        options: &EbpfOptions,
        device: &VxlanDevice,
        subnet: Ipv4Net,
        peers: &[Peer],
        direct: &[Peer],
    ) -> Result<Self, EbpfError> {
        let kernel = tc_attach::kernel_version();
        if kernel < MIN_KERNEL {
            return Err(EbpfError::KernelTooOld { found: kernel });
        }
        let owned_object;
        let object: &[u8] = match &options.object {
            Some(path) => {
                owned_object = std::fs::read(path).map_err(|source| EbpfError::ReadObject {
                    path: path.clone(),
                    source,
                })?;
                &owned_object
            }
            None => EBPF_OBJECT,
        };
        let mut loader = EbpfLoader::new();
        let capacities = options.capacities();
        for (name, max) in capacities {
            loader.map_max_entries(name, max);
        }
        let pins = options.pins.as_ref();
        let mut pin_paths = Vec::new();
        if let Some(pins) = pins {
            let declared =
                declared_shapes(object, &capacities).map_err(|e| EbpfError::Object(e.into()))?;
            let replaced = pins
                .prepare(&declared)
                .map_err(pin_err(pins.root().to_owned(), "prepare"))?;
            if !replaced.is_empty() {
                info!("pinned maps {replaced:?} had another layout: created anew");
            }
            for name in MAPS {
                pin_paths.push((name, pins.map(name)));
            }
        }
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(object).map_err(EbpfError::Object)?;
        {
            let map = ebpf
                .map_mut(MAP_NODE_CONFIG)
                .ok_or(EbpfError::MissingMap(MAP_NODE_CONFIG))?;
            let mut config: Array<&mut MapData, NodeConfig> =
                Array::try_from(map).map_err(|e| EbpfError::map(MAP_NODE_CONFIG, "open", e))?;
            config
                .set(0, node_config(device), 0)
                .map_err(|e| EbpfError::map(MAP_NODE_CONFIG, "set entry 0", e))?;
        }
        let mut users = VtepUsers::default();
        let vxlan = peers.iter().map(|p| (p, PeerKind::Vxlan));
        for (peer, kind) in vxlan.chain(direct.iter().map(|p| (p, PeerKind::Direct))) {
            let inserted = match kind {
                PeerKind::Vxlan => insert_peer(&mut ebpf, &mut users, peer, options.peer_capacity),
                PeerKind::Direct => {
                    insert_direct_peer(&mut ebpf, &mut users, peer, options.peer_capacity)
                }
            };
            match inserted {
                // The reconciler finds it missing from the maps, retries and
                // reports it.
                Err(EbpfError::MapFull { map, .. }) => {
                    debug!("peer {} left out of the maps: {map} is full", peer.subnet);
                }
                other => other?,
            }
        }
        // Reopened maps may hold peers that left while no agent ran.
        prune_maps(&mut ebpf, &users)?;

        classifier(&mut ebpf, PROG_EGRESS)?
            .load()
            .map_err(|e| EbpfError::load(PROG_EGRESS, e))?;
        classifier(&mut ebpf, PROG_INGRESS_TC)?
            .load()
            .map_err(|e| EbpfError::load(PROG_INGRESS_TC, e))?;
        let xdp_program = if options.ingress == IngressMode::XdpAndTc {
            Some(load_xdp(&mut ebpf)?)
        } else {
            None
        };
        let api = options.tc_attach.resolve(kernel);
        let fast = start_fast_path(&mut ebpf, options.fast_path, subnet, pins)?;
        if options.ingress == IngressMode::Tc
            && let Some(pins) = pins
        {
            // A previous run with xdp+tc: its XDP program would keep
            // decapsulating into a TC program that no longer expects it.
            let xdp = pins.link(PROG_INGRESS_XDP);
            match std::fs::remove_file(&xdp) {
                Ok(()) => info!("ingress is tc now: detached the pinned {PROG_INGRESS_XDP}"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(pin_err(xdp, "remove")(e)),
            }
        }

        let mut links = Vec::new();
        let ingress_tc = attach_tc(
            &mut ebpf,
            api,
            &tc_attach::Target {
                program: PROG_INGRESS_TC,
                interface: &device.underlay,
                ifindex: device.underlay_ifindex,
                hook: TcAttachType::Ingress,
                pin: pins.map(|p| p.link(PROG_INGRESS_TC)).as_deref(),
            },
            &mut links,
        )?;
        let ingress_xdp = if options.ingress == IngressMode::XdpAndTc {
            Some(attach_xdp(
                &mut ebpf,
                xdp_program.unwrap_or(PROG_INGRESS_XDP),
                device,
                options.xdp_mode,
                pins,
            )?)
        } else {
            None
        };
        let egress = attach_tc(
            &mut ebpf,
            api,
            &tc_attach::Target {
                program: PROG_EGRESS,
                interface: &device.name,
                ifindex: device.ifindex,
                hook: TcAttachType::Egress,
                pin: pins.map(|p| p.link(PROG_EGRESS)).as_deref(),
            },
            &mut links,
        )?;

        Ok(Self {
            ebpf,
            users,
            ids: ProgramIds {
                egress,
                ingress_tc,
                ingress_xdp,
            },
            api,
            _links: links,
            fast,
        })
    }
}

/// Loads the veth programs and installs the host's part of the fast path,
/// then turns it on in FAST_CONFIG; with `auto`, anything that fails turns
/// it off instead, with one log line naming why.
fn start_fast_path(
    ebpf: &mut Ebpf,
    mode: FastPathMode,
    subnet: Ipv4Net,
    pins: Option<&PinLayout>,
) -> Result<Option<FastState>, EbpfError> {
    if mode == FastPathMode::Off {
        fastpath::configure(ebpf, None)?;
        fastpath::remove_leftovers(ebpf, subnet, pins)?;
        info!("fast path: off (--fast-path=off)");
        return Ok(None);
    }
    let attempt = (|| -> Result<(), EbpfError> {
        for program in [PROG_VETH_FROM_POD, PROG_VETH_TO_POD] {
            classifier(ebpf, program)?
                .load()
                .map_err(|e| EbpfError::load(program, e))?;
        }
        fastpath::prepare_host(subnet, pins).map_err(EbpfError::FastPathHost)
    })();
    match attempt {
        Ok(()) => {
            fastpath::configure(ebpf, Some(subnet))?;
            Ok(Some(FastState {
                subnet,
                pods: PodAttachments::default(),
            }))
        }
        Err(e) if mode == FastPathMode::Auto => {
            warn!(
                "fast path: off, every packet takes the host's path: {}",
                DatapathError::from(e).reason()
            );
            fastpath::configure(ebpf, None)?;
            fastpath::remove_leftovers(ebpf, subnet, pins)?;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Every TC program with its hook: legacy filters are found by these names.
pub const TC_PROGRAMS: [(&str, TcAttachType); 4] = [
    (PROG_INGRESS_TC, TcAttachType::Ingress),
    (PROG_EGRESS, TcAttachType::Egress),
    (PROG_VETH_FROM_POD, TcAttachType::Ingress),
    (PROG_VETH_TO_POD, TcAttachType::Egress),
];

/// Removes every attachment of ours in this network namespace, for when no
/// eBPF datapath maintains the maps: the pins (which detaches the pinned
/// links, XDP included, and drops the maps) and every legacy clsact filter
/// of our programs. Returns what it removed, one entry each.
pub fn remove_attachments(pins: Option<&PinLayout>) -> Result<Vec<String>, EbpfError> {
    let mut removed = Vec::new();
    if let Some(pins) = pins {
        let paths = pins
            .remove_all()
            .map_err(pin_err(pins.root().to_owned(), "remove"))?;
        removed.extend(paths.into_iter().map(|p| p.display().to_string()));
    }
    for (interface, program) in tc_attach::detach_legacy_everywhere(&TC_PROGRAMS)? {
        removed.push(format!("clsact filter {program} on {interface}"));
    }
    Ok(removed)
}

/// Attaches a TC program through `api` (see [`tc_attach::attach`]), keeps
/// its link in `links`, and returns the program id.
fn attach_tc(
    ebpf: &mut Ebpf,
    api: TcApi,
    target: &tc_attach::Target<'_>,
    links: &mut Vec<TcLink>,
) -> Result<u32, EbpfError> {
    let prog = classifier(ebpf, target.program)?;
    links.push(tc_attach::attach(prog, api, target)?);
    program_id(prog.info(), target.program)
}

/// Loads the XDP program that decapsulates and marks for TC; where the
/// kernel refuses it (some kernels do not let XDP programs call
/// `bpf_xdp_adjust_meta`, which the mark needs), the one that only drops
/// strangers and leaves decapsulation to TC, with one line saying why.
/// Returns the name of the program loaded.
fn load_xdp(ebpf: &mut Ebpf) -> Result<&'static str, EbpfError> {
    let first = match xdp(ebpf, PROG_INGRESS_XDP)?.load() {
        Ok(()) => return Ok(PROG_INGRESS_XDP),
        Err(e) => EbpfError::load(PROG_INGRESS_XDP, e),
    };
    xdp(ebpf, PROG_INGRESS_XDP_FILTER)?
        .load()
        .map_err(|e| EbpfError::load(PROG_INGRESS_XDP_FILTER, e))?;
    warn!(
        "{first}; using {PROG_INGRESS_XDP_FILTER} instead: XDP drops VXLAN from strangers and TC decapsulates"
    );
    Ok(PROG_INGRESS_XDP_FILTER)
}

/// Attaches the XDP program `name` to the underlay. Without pins, aya keeps
/// the link (it goes with this process). With pins: swaps the program into
/// the pinned link still attached to the underlay (atomic), or attaches a
/// new link and pins it. Returns the program id.
fn attach_xdp(
    ebpf: &mut Ebpf,
    name: &'static str,
    device: &VxlanDevice,
    mode: XdpMode,
    pins: Option<&PinLayout>,
) -> Result<u32, EbpfError> {
    let prog = xdp(ebpf, name)?;
    let attach_err = |source| EbpfError::Attach {
        program: name,
        interface: device.underlay.clone(),
        hook: Hook::Xdp,
        source,
    };
    let ifindex = device.underlay_ifindex;
    match pins {
        None => {
            prog.attach_to_if_index(ifindex, mode).map_err(attach_err)?;
        }
        Some(pins) => {
            let path = pins.link(PROG_INGRESS_XDP);
            match pins
                .live_link(PROG_INGRESS_XDP, ifindex)
                .map_err(pin_err(path.clone(), "inspect"))?
            {
                Some(live) => {
                    let pinned =
                        PinnedLink::from_pin(&live).map_err(link_err(live.clone(), "open"))?;
                    let link = XdpLink::try_from(FdLink::from(pinned))
                        .map_err(link_err(live.clone(), "open as an XDP link"))?;
                    prog.attach_to_link(link).map_err(attach_err)?;
                    info!("{name}: swapped into the pinned link {}", live.display());
                }
                None => {
                    let id = prog.attach_to_if_index(ifindex, mode).map_err(attach_err)?;
                    let link = prog.take_link(id).map_err(attach_err)?;
                    let fd_link =
                        FdLink::try_from(link).map_err(link_err(path.clone(), "convert"))?;
                    fd_link.pin(&path).map_err(|e| EbpfError::Pin {
                        path: path.clone(),
                        op: "pin",
                        source: std::io::Error::other(e),
                    })?;
                }
            }
        }
    }
    program_id(prog.info(), name)
}

pub(super) fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, EbpfError> {
    ebpf.program_mut(name)
        .ok_or(EbpfError::MissingProgram(name))?
        .try_into()
        .map_err(|source| EbpfError::Program {
            program: name,
            source,
        })
}

fn xdp<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, EbpfError> {
    ebpf.program_mut(name)
        .ok_or(EbpfError::MissingProgram(name))?
        .try_into()
        .map_err(|source| EbpfError::Program {
            program: name,
            source,
        })
}

fn program_id(
    info: Result<aya::programs::ProgramInfo, ProgramError>,
    program: &'static str,
) -> Result<u32, EbpfError> {
    info.map(|i| i.id())
        .map_err(|source| EbpfError::Program { program, source })
}

fn remote_subnets(
    ebpf: &mut Ebpf,
) -> Result<LpmTrie<&mut MapData, [u8; 4], RemoteVtep>, EbpfError> {
    let map = ebpf
        .map_mut(MAP_REMOTE_SUBNETS)
        .ok_or(EbpfError::MissingMap(MAP_REMOTE_SUBNETS))?;
    LpmTrie::try_from(map).map_err(|e| EbpfError::map(MAP_REMOTE_SUBNETS, "open", e))
}

fn known_vteps(ebpf: &mut Ebpf) -> Result<HashMap<&mut MapData, [u8; 4], KnownVtep>, EbpfError> {
    let map = ebpf
        .map_mut(MAP_KNOWN_VTEPS)
        .ok_or(EbpfError::MissingMap(MAP_KNOWN_VTEPS))?;
    HashMap::try_from(map).map_err(|e| EbpfError::map(MAP_KNOWN_VTEPS, "open", e))
}

/// Inserts (or updates) a peer: KNOWN_VTEPS, then its PEER_STATS entry,
/// then REMOTE_SUBNETS, so ingress accepts the peer by the time egress sends
/// to it; a public IP the update leaves unused is dropped from KNOWN_VTEPS.
/// All or nothing: when a map refuses (full at `capacity` entries,
/// [`EbpfError::MapFull`], or any other error), what this call added to the
/// first two is removed again, so the maps never hold half a peer. `users`
/// counts the peer under its public IP once the maps hold it.
fn insert_peer(
    ebpf: &mut Ebpf,
    users: &mut VtepUsers,
    peer: &Peer,
    capacity: u32,
) -> Result<(), EbpfError> {
    let key = subnet_key(peer.subnet);
    let ip = peer.public_ip.octets();
    let inserted = (|| -> Result<(), EbpfError> {
        known_vteps(ebpf)?
            .insert(ip, known_vtep(peer), 0)
            .map_err(|e| insert_err(MAP_KNOWN_VTEPS, peer.public_ip, capacity, e))?;
        start_peer_stats(ebpf, ip, capacity)?;
        remote_subnets(ebpf)?
            .insert(&key, remote_vtep(peer), 0)
            .map_err(|e| insert_err(MAP_REMOTE_SUBNETS, peer.subnet, capacity, e))
    })();
    if let Err(e) = inserted {
        // Kept if a peer in the maps (this subnet's previous entry, or
        // another subnet's) still uses it.
        if !users.in_use(peer.public_ip)
            && let Err(undo) = forget_vtep(ebpf, ip)
        {
            warn!(
                "undoing the half-inserted peer {} failed: {}",
                peer.subnet,
                DatapathError::from(undo).reason()
            );
        }
        return Err(e);
    }
    if let Some(unused) = users.set(peer.subnet, peer.public_ip) {
        forget_vtep(ebpf, unused.octets())?;
    }
    Ok(())
}

/// Inserts (or updates) a direct peer: its subnet leaves REMOTE_SUBNETS
/// first (so nothing encapsulates toward it any more), then KNOWN_VTEPS and
/// PEER_STATS get its public IP; a public IP the subnet used before and no
/// peer uses now is dropped. `users` counts it under its public IP like a
/// vxlan peer: ingress still needs its KNOWN_VTEPS entry.
fn insert_direct_peer(
    ebpf: &mut Ebpf,
    users: &mut VtepUsers,
    peer: &Peer,
    capacity: u32,
) -> Result<(), EbpfError> {
    let ip = peer.public_ip.octets();
    remove_remote_subnet(ebpf, peer.subnet)?;
    let inserted = (|| -> Result<(), EbpfError> {
        known_vteps(ebpf)?
            .insert(ip, known_vtep(peer), 0)
            .map_err(|e| insert_err(MAP_KNOWN_VTEPS, peer.public_ip, capacity, e))?;
        start_peer_stats(ebpf, ip, capacity)
    })();
    if let Err(e) = inserted {
        // The subnet is out of the maps now: so is whatever only it used.
        let unused = users.remove(peer.subnet);
        let ours = Some(peer.public_ip).filter(|ip| !users.in_use(*ip));
        for unused in unused.into_iter().chain(ours) {
            if let Err(undo) = forget_vtep(ebpf, unused.octets()) {
                warn!(
                    "undoing the half-inserted direct peer {} failed: {}",
                    peer.subnet,
                    DatapathError::from(undo).reason()
                );
            }
        }
        return Err(e);
    }
    if let Some(unused) = users.set(peer.subnet, peer.public_ip) {
        forget_vtep(ebpf, unused.octets())?;
    }
    Ok(())
}

/// A failed insert into a peer map: [`EbpfError::MapFull`] when the map had
/// no room (a hash map says E2BIG, the LPM trie ENOSPC).
fn insert_err(map: &'static str, what: impl fmt::Display, capacity: u32, e: MapError) -> EbpfError {
    match &e {
        MapError::SyscallError(s)
            if matches!(s.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)) =>
        {
            EbpfError::MapFull { map, capacity }
        }
        _ => EbpfError::map(map, format!("insert {what}"), e),
    }
}

/// Removes `subnet`'s REMOTE_SUBNETS entry; absent is fine.
fn remove_remote_subnet(ebpf: &mut Ebpf, subnet: Ipv4Net) -> Result<(), EbpfError> {
    match remote_subnets(ebpf)?.remove(&subnet_key(subnet)) {
        Err(e) if !is_missing(&e) => {
            let op = format!("remove {subnet}");
            Err(EbpfError::map(MAP_REMOTE_SUBNETS, op, e))
        }
        _ => Ok(()),
    }
}

/// Removes a peer (vxlan or direct) from the maps: its REMOTE_SUBNETS
/// entry, then the KNOWN_VTEPS and PEER_STATS entries of a public IP no
/// other peer uses (the peer's own, and the one `users` had for its subnet
/// if that was another). A bounded number of map operations.
fn remove_peer_entries(
    ebpf: &mut Ebpf,
    users: &mut VtepUsers,
    peer: &Peer,
) -> Result<(), EbpfError> {
    remove_remote_subnet(ebpf, peer.subnet)?;
    let unused = users.remove(peer.subnet);
    // Also when `users` never counted it: an entry an earlier failure left.
    let own = Some(peer.public_ip).filter(|ip| !users.in_use(*ip) && unused != Some(*ip));
    for ip in unused.into_iter().chain(own) {
        forget_vtep(ebpf, ip.octets())?;
    }
    Ok(())
}

/// Removes `ip`'s KNOWN_VTEPS and PEER_STATS entries (absent is fine). Only
/// for a public IP no peer in the maps uses.
fn forget_vtep(ebpf: &mut Ebpf, ip: [u8; 4]) -> Result<(), EbpfError> {
    match known_vteps(ebpf)?.remove(&ip) {
        Err(e) if !is_missing(&e) => {
            let op = format!("remove {}", Ipv4Addr::from(ip));
            return Err(EbpfError::map(MAP_KNOWN_VTEPS, op, e));
        }
        _ => {}
    }
    match peer_stats(ebpf)?.remove(&ip) {
        Err(e) if !is_missing(&e) => {
            let op = format!("remove {}", Ipv4Addr::from(ip));
            Err(EbpfError::map(MAP_PEER_STATS, op, e))
        }
        _ => Ok(()),
    }
}

fn peer_stats(
    ebpf: &mut Ebpf,
) -> Result<PerCpuHashMap<&mut MapData, [u8; 4], PeerTraffic>, EbpfError> {
    let map = ebpf
        .map_mut(MAP_PEER_STATS)
        .ok_or(EbpfError::MissingMap(MAP_PEER_STATS))?;
    PerCpuHashMap::try_from(map).map_err(|e| EbpfError::map(MAP_PEER_STATS, "open", e))
}

/// The number of possible CPUs, which sizes per-CPU values: read from
/// sysfs once, not on every peer added (it does not change while we run).
fn possible_cpus() -> Result<usize, EbpfError> {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    if let Some(n) = CPUS.get() {
        return Ok(*n);
    }
    let n = aya::util::nr_cpus().map_err(|(_, e)| EbpfError::Cpus(e))?;
    Ok(*CPUS.get_or_init(|| n))
}

/// Creates a zeroed PEER_STATS entry unless one exists (a restart keeps the
/// counts the pinned map holds).
fn start_peer_stats(ebpf: &mut Ebpf, ip: [u8; 4], capacity: u32) -> Result<(), EbpfError> {
    const BPF_NOEXIST: u64 = 1;
    let cpus = possible_cpus()?;
    let zeros =
        PerCpuValues::try_from(vec![PeerTraffic::default(); cpus]).map_err(EbpfError::Cpus)?;
    match peer_stats(ebpf)?.insert(ip, zeros, BPF_NOEXIST) {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(insert_err(MAP_PEER_STATS, Ipv4Addr::from(ip), capacity, e)),
        Ok(()) => Ok(()),
    }
}

/// Removes the map entries `users` does not count (left while no agent ran,
/// or by a peer that is no longer programmed): one pass over each map.
fn prune_maps(ebpf: &mut Ebpf, users: &VtepUsers) -> Result<(), EbpfError> {
    let stale: Vec<Peer> = {
        let trie = remote_subnets(ebpf)?;
        let mut stale = Vec::new();
        for entry in trie.iter() {
            let (key, value) =
                entry.map_err(|e| EbpfError::map(MAP_REMOTE_SUBNETS, "iterate", e))?;
            if let Some(p) = peer_from_entry(&key, &value)
                && users.public_ip(p.subnet) != Some(p.public_ip)
            {
                stale.push(p);
            }
        }
        stale
    };
    for p in &stale {
        info!(
            "pinned maps: removing {} ({}), no longer programmed",
            p.subnet, p.public_ip
        );
        remove_remote_subnet(ebpf, p.subnet)?;
    }
    let vteps: Vec<[u8; 4]> = known_vteps(ebpf)?.keys().filter_map(Result::ok).collect();
    let stats: Vec<[u8; 4]> = peer_stats(ebpf)?.keys().filter_map(Result::ok).collect();
    let unused: BTreeSet<[u8; 4]> = vteps
        .into_iter()
        .chain(stats)
        .filter(|ip| !users.in_use(Ipv4Addr::from(*ip)))
        .collect();
    for ip in unused {
        forget_vtep(ebpf, ip)?;
    }
    Ok(())
}

/// aya reports a missing key as `KeyNotFound` on lookups but as a plain
/// syscall error (ENOENT) on deletes.
fn is_missing(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
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
        let checked = host_policy::check_start(
            nl,
            device.local,
            device.port,
            device.underlay_ifindex,
            &peer_ips,
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
        let device = self.kernel.device().ok_or(DatapathError::NotSetUp)?;
        let started = Loaded::start(&self.options, device, node.subnet, &peers, &direct);
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
        self.loaded = Some(Box::new(loaded));
        // A pod veth that cannot be attached keeps the host's path; only
        // `--fast-path=on` makes that fatal. The next link event retries.
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
        let Some(subnet) = self.loaded()?.fast.as_ref().map(|f| f.subnet) else {
            return Ok(());
        };
        let nl = self.kernel.netlink().ok_or(DatapathError::NotSetUp)?;
        let net = nl.pod_network(subnet).await?;
        let pins = self.options.pins.clone();
        let loaded = self.loaded_mut()?;
        if let Some(fast) = loaded.fast.as_mut() {
            fast.pods
                .sync(&mut loaded.ebpf, loaded.api, &net, pins.as_ref())?;
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
    /// peer does. The decision is taken when the peer is added: a policy
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
        let capacity = self.options.peer_capacity;
        let Loaded { ebpf, users, .. } =
            self.loaded.as_deref_mut().ok_or(DatapathError::NotSetUp)?;
        match (kind, &conflict) {
            (PeerKind::Vxlan, None) => insert_peer(ebpf, users, peer, capacity)?,
            (PeerKind::Vxlan, Some(HostPolicyConflict::Xfrm(_))) => {
                remove_peer_entries(ebpf, users, peer)?;
            }
            (PeerKind::Vxlan, Some(HostPolicyConflict::Route { .. })) | (PeerKind::Direct, _) => {
                insert_direct_peer(ebpf, users, peer, capacity)?;
            }
        }
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
        Ok(())
    }

    /// Removes the peer from the maps first (so egress stops encapsulating to
    /// it), then its kernel entries.
    async fn remove_peer(&mut self, peer: &Peer) -> Result<(), DatapathError> {
        let Loaded { ebpf, users, .. } =
            self.loaded.as_deref_mut().ok_or(DatapathError::NotSetUp)?;
        remove_peer_entries(ebpf, users, peer)?;
        self.kernel_only.remove(&peer.subnet);
        self.kernel.remove_peer(peer).await
    }

    /// Peers whose kernel entries are complete and whose map entries agree.
    async fn peers(&mut self) -> Result<Vec<Peer>, DatapathError> {
        let in_maps: std::collections::HashSet<Peer> = self.map_peers()?.into_iter().collect();
        let in_kernel = self.kernel.peers().await?;
        let mut agreed = Vec::with_capacity(in_kernel.len());
        let in_trie: std::collections::HashSet<Ipv4Net> =
            in_maps.iter().map(|p| p.subnet).collect();
        for peer in in_kernel {
            let kernel_only = self.kernel_only.get(&peer.subnet);
            let mapped = if self.kernel.is_direct(peer.subnet) || kernel_only.is_some() {
                !in_trie.contains(&peer.subnet)
            } else {
                in_maps.contains(&peer)
            };
            // A peer left to the kernel under xfrm has no KNOWN_VTEPS entry.
            let vtep_ok = matches!(kernel_only, Some(HostPolicyConflict::Xfrm(_)))
                || self.knows_vtep(peer.public_ip)?;
            if mapped && vtep_ok {
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
            fastpath::release_host(fast.subnet, self.options.pins.as_ref());
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
