//! The agent's side of the fast path (see `overlay_common::fastpath` for the
//! packet side): the switch, the host's part of the approval mechanism, and
//! the programs on every pod veth.
//!
//! The host's part: the mangle rule that marks packets of flows conntrack
//! has accepted ([`crate::ipmasq::fast_path_rules`]), and
//! `nf_conntrack_tcp_be_liberal=1`, because conntrack no longer sees every
//! segment of a TCP flow on the fast path, and without liberal window
//! tracking the segment that renews an approval (and the FIN at the end)
//! would be out of its window and INVALID.
//!
//! The sysctl is per network namespace but covers every TCP flow in it, so
//! the value it had before the fast path set it is recorded next to the
//! pins ([`BeLiberal`]), once: a hitless restart finds the record and does
//! not take the fast path's own 1 for the previous value. Turning the fast
//! path off (`--fast-path=off`, the kernel datapath, a failed start) and
//! `overlay-agent cleanup` put the recorded value back.
//!
//! Pod veths are those enslaved to the bridge that holds an address of our
//! subnet. Each gets `veth_from_pod` (TCX ingress) and `veth_to_pod` (TCX
//! egress), pinned as `links/veth_from_pod-<ifindex>` and
//! `links/veth_to_pod-<ifindex>` so they survive the agent like the others.
//!
//! On a dual-stack node IPv6 pod traffic takes the fast path too
//! (`overlay_common::fastpath6`): the same mangle chain in ip6tables for the
//! IPv6 pod subnet, and `FAST_CONFIG6` holding that subnet and the bridge's
//! IPv6 address.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
    programs::TcAttachType,
};
use ipnet::{Ipv4Net, Ipv6Net};
use log::{info, warn};
use overlay_common::{
    consts::{
        MAP_FAST_CONFIG, MAP_FAST_CONFIG6, MAP_FAST_FLOWS, MAP_FAST_FLOWS6, MAP_POD_VETHS,
        PROG_VETH_FROM_POD, PROG_VETH_TO_POD,
    },
    fastpath::{DEFAULT_FAST_PATH_MARK, DIR_TO_POD, FastFlow, FastPathConfig, FlowKey},
    fastpath6::{FastFlow6, FastPathConfig6, FlowKey6},
};

use super::{
    ebpf::{EbpfError, classifier},
    pins::PinLayout,
    tc_attach::{self, TcApi, TcLink},
};
use crate::{
    ipmasq,
    netlink::{
        pods::{PodNetwork, PodVeth},
        tc::{self, TC_H_ROOT, TcHook},
    },
};

/// `--fast-path`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FastPathMode {
    /// Every packet takes the host's path, as before the fast path existed.
    Off,
    /// On where the kernel and the host allow it; otherwise off, with one
    /// log line saying why.
    #[default]
    Auto,
    /// On, or the eBPF datapath fails to start.
    On,
}

impl fmt::Display for FastPathMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FastPathMode::Off => "off",
            FastPathMode::Auto => "auto",
            FastPathMode::On => "on",
        })
    }
}

impl FromStr for FastPathMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(FastPathMode::Off),
            "auto" => Ok(FastPathMode::Auto),
            "on" => Ok(FastPathMode::On),
            _ => Err(format!("{s:?} is not one of auto, on, off")),
        }
    }
}

/// The sysctl the fast path needs (per network namespace).
const BE_LIBERAL: &str = "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal";

/// Where the value `nf_conntrack_tcp_be_liberal` had before the fast path
/// set it is kept: a directory `nf_conntrack_tcp_be_liberal-was-<value>`
/// in the pin directory. bpffs holds no regular files (only pins and
/// directories), and a directory name is enough for one small number; it
/// lives and goes with the pins, per network namespace as the sysctl.
#[derive(Clone, Debug)]
pub struct BeLiberal {
    root: std::path::PathBuf,
}

const RECORD_PREFIX: &str = "nf_conntrack_tcp_be_liberal-was-";

impl BeLiberal {
    pub fn new(pins: &PinLayout) -> Self {
        Self {
            root: pins.root().to_owned(),
        }
    }

    /// The recorded previous value, if any.
    pub fn recorded(&self) -> Option<String> {
        std::fs::read_dir(&self.root)
            .ok()?
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .find_map(|n| n.strip_prefix(RECORD_PREFIX).map(str::to_owned))
    }

    /// Records `value` unless a record exists (the first run's value wins).
    fn record(&self, value: &str) -> std::io::Result<()> {
        if self.recorded().is_some() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.root)?;
        std::fs::create_dir(self.root.join(format!("{RECORD_PREFIX}{value}")))
    }

    /// Puts the recorded value back and removes the record (and the pin
    /// directory, if that leaves it empty). Returns the value restored.
    pub fn restore(&self) -> std::io::Result<Option<String>> {
        let Some(value) = self.recorded() else {
            return Ok(None);
        };
        std::fs::write(BE_LIBERAL, &value)?;
        std::fs::remove_dir(self.root.join(format!("{RECORD_PREFIX}{value}")))?;
        // Empty now unless pins remain (which keep it for the datapath).
        let _ = std::fs::remove_dir(&self.root);
        Ok(Some(value))
    }
}

/// Installs the host's part (mangle rule, liberal TCP window tracking) for
/// `subnet` and, on a dual-stack node, `subnet6` (the ip6tables chain);
/// with `pins`, first records the sysctl's value unless a record exists
/// (see [`BeLiberal`]; one sysctl serves both families). The error says
/// what failed, for the `auto` log line.
pub fn prepare_host(
    subnet: Ipv4Net,
    subnet6: Option<Ipv6Net>,
    mark: u32,
    pins: Option<&PinLayout>,
) -> Result<(), String> {
    let current =
        std::fs::read_to_string(BE_LIBERAL).map_err(|e| format!("reading {BE_LIBERAL}: {e}"))?;
    let current = current.trim();
    match pins {
        Some(pins) => BeLiberal::new(pins).record(current).map_err(|e| {
            format!(
                "recording {BE_LIBERAL}'s value under {}: {e}",
                pins.root().display()
            )
        })?,
        // Unpinned, nothing outlives the agent to restore it from.
        None if current != "1" => warn!(
            "fast path: running unpinned, so {BE_LIBERAL}'s previous value {current} is not recorded and will not be restored"
        ),
        None => {}
    }
    if current != "1" {
        std::fs::write(BE_LIBERAL, "1").map_err(|e| format!("setting {BE_LIBERAL}: {e}"))?;
        info!(
            "fast path: set {BE_LIBERAL} = 1 (was {current}; conntrack does not see every TCP segment)"
        );
    }
    ipmasq::ensure(&ipmasq::fast_path_rules(subnet, mark))
        .map_err(|e| format!("installing the mangle rule: {e}"))?;
    if let Some(subnet6) = subnet6 {
        ipmasq::ensure(&ipmasq::fast_path_rules(subnet6, mark))
            .map_err(|e| format!("installing the ip6tables mangle rule: {e}"))?;
    }
    for rule in ipmasq::mark_users::find(mark) {
        warn!(
            "fast path: another rule can set the approval bit {mark:#x} ({rule}); our chain clears the bit before it decides, but a rule after it in mangle POSTROUTING would approve flows the firewall never saw established: pick a free bit with --fast-path-mark"
        );
    }
    Ok(())
}

/// Removes the mangle rule and its chain (in ip6tables too, whether or not
/// the node is dual-stack now), and with `pins` puts back the
/// value `nf_conntrack_tcp_be_liberal` had before the fast path set it
/// (nothing when no record exists: then the fast path did not change it,
/// or another run's record is elsewhere).
pub fn release_host(subnet: Ipv4Net, pins: Option<&PinLayout>) {
    // Removal takes the jump and the whole chain, whatever bit it marks.
    if let Err(e) = ipmasq::remove(&ipmasq::fast_path_rules(subnet, DEFAULT_FAST_PATH_MARK)) {
        warn!("fast path: removing the mangle rule: {e}");
    }
    let any6 = <Ipv6Net as ipmasq::Net>::ANY;
    if let Err(e) = ipmasq::remove(&ipmasq::fast_path_rules(any6, DEFAULT_FAST_PATH_MARK)) {
        warn!("fast path: removing the ip6tables mangle rule: {e}");
    }
    if let Some(pins) = pins {
        restore_be_liberal(pins);
    }
}

/// [`BeLiberal::restore`], logged.
pub fn restore_be_liberal(pins: &PinLayout) -> Option<String> {
    match BeLiberal::new(pins).restore() {
        Ok(Some(v)) => {
            info!("fast path off: restored {BE_LIBERAL} = {v}");
            Some(v)
        }
        Ok(None) => None,
        Err(e) => {
            warn!("fast path off: restoring {BE_LIBERAL}: {e}");
            None
        }
    }
}

/// What the programs need to know of the fast path while it is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastSettings {
    /// Our pod subnet.
    pub subnet: Ipv4Net,
    /// The approval bit (`--fast-path-mark`).
    pub mark: u32,
    /// The pod bridge's address in the subnet, once a bridge holds one.
    pub gateway: Option<Ipv4Addr>,
    /// A dual-stack node's IPv6 pod subnet: IPv6 flows take the fast path.
    pub subnet6: Option<Ipv6Net>,
    /// The pod bridge's IPv6 address in `subnet6`, once it holds one.
    pub gateway6: Option<Ipv6Addr>,
}

/// Turns the programs' side on (with `settings`) or off.
pub fn configure(ebpf: &mut Ebpf, settings: Option<FastSettings>) -> Result<(), EbpfError> {
    // The programs read FAST_CONFIG6 only while FAST_CONFIG is on: it goes
    // on last and off first.
    if settings.is_some() {
        configure6(ebpf, settings)?;
    }
    let map = ebpf
        .map_mut(MAP_FAST_CONFIG)
        .ok_or(EbpfError::MissingMap(MAP_FAST_CONFIG))?;
    let mut config: Array<&mut MapData, FastPathConfig> =
        Array::try_from(map).map_err(|e| EbpfError::map(MAP_FAST_CONFIG, "open", e))?;
    let value = match settings {
        Some(s) => FastPathConfig {
            enabled: 1,
            pod_subnet: s.subnet.network().octets(),
            pod_prefix_len: u32::from(s.subnet.prefix_len()),
            mark: s.mark,
            gateway: s.gateway.map_or([0; 4], |g| g.octets()),
            _pad: 0,
        },
        None => FastPathConfig::default(),
    };
    config
        .set(0, value, 0)
        .map_err(|e| EbpfError::map(MAP_FAST_CONFIG, "set entry 0", e))?;
    if settings.is_none() {
        configure6(ebpf, None)?;
    }
    Ok(())
}

/// FAST_CONFIG6: on with the IPv6 pod subnet of a dual-stack node.
fn configure6(ebpf: &mut Ebpf, settings: Option<FastSettings>) -> Result<(), EbpfError> {
    let map = ebpf
        .map_mut(MAP_FAST_CONFIG6)
        .ok_or(EbpfError::MissingMap(MAP_FAST_CONFIG6))?;
    let mut config: Array<&mut MapData, FastPathConfig6> =
        Array::try_from(map).map_err(|e| EbpfError::map(MAP_FAST_CONFIG6, "open", e))?;
    let value = match settings.and_then(|s| Some((s.subnet6?, s.gateway6))) {
        Some((subnet6, gateway6)) => FastPathConfig6 {
            enabled: 1,
            pod_prefix_len: u32::from(subnet6.prefix_len()),
            pod_subnet: subnet6.network().octets(),
            gateway: gateway6.map_or([0; 16], |g| g.octets()),
        },
        None => FastPathConfig6::default(),
    };
    config
        .set(0, value, 0)
        .map_err(|e| EbpfError::map(MAP_FAST_CONFIG6, "set entry 0", e))
}

/// What failed for one pod veth in a [`PodAttachments::sync`].
#[derive(Debug, thiserror::Error)]
#[error("pod veth {}", VethName(name.as_deref(), *ifindex))]
pub struct VethError {
    /// `None` for a veth known only by the ifindex in its pins' names.
    pub name: Option<String>,
    pub ifindex: u32,
    #[source]
    pub source: EbpfError,
}

/// `vethX (#7)`, or `#7` without a name.
struct VethName<'a>(Option<&'a str>, u32);

impl fmt::Display for VethName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(name) => write!(f, "{name} (#{})", self.1),
            None => write!(f, "#{}", self.1),
        }
    }
}

/// The pod veths a [`PodAttachments::sync`] could not bring in line, each
/// with its own error; the sync carried on with the others. A later sync
/// tries them again.
#[derive(Debug)]
pub struct PodSyncError {
    pub veths: Vec<VethError>,
}

impl fmt::Display for PodSyncError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} pod veth(s) not in line: ", self.veths.len())?;
        for (i, veth) in self.veths.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            // No single source to follow: each veth's causes are spelled out.
            f.write_str(&super::one_line(veth))?;
        }
        Ok(())
    }
}

impl std::error::Error for PodSyncError {}

/// Collects the errors of one sync, per veth.
#[derive(Default)]
struct Failures(Vec<VethError>);

impl Failures {
    /// Records `result`'s error against the veth; true when it succeeded.
    fn check(&mut self, name: Option<&str>, ifindex: u32, result: Result<(), EbpfError>) -> bool {
        match result {
            Ok(()) => true,
            Err(source) => {
                self.0.push(VethError {
                    name: name.map(str::to_owned),
                    ifindex,
                    source,
                });
                false
            }
        }
    }

    /// [`Failures::check`] for a result with a value: the value, if any.
    fn check_value<T>(
        &mut self,
        name: Option<&str>,
        ifindex: u32,
        result: Result<T, EbpfError>,
    ) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                self.check(name, ifindex, Err(e));
                None
            }
        }
    }

    fn into_result(self) -> Result<(), PodSyncError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(PodSyncError { veths: self.0 })
        }
    }
}

/// The two links of one pod veth.
#[derive(Debug)]
struct PodLinks {
    name: String,
    /// What POD_VETHS holds for it.
    mtu: u32,
    /// Dropped (and, when pinned, unpinned) to detach.
    _links: [TcLink; 2],
}

/// The veths the programs are attached to.
#[derive(Debug, Default)]
pub struct PodAttachments {
    bridge: Option<String>,
    attached: BTreeMap<u32, PodLinks>,
    /// Veths left to the host's path because something shapes them (see
    /// [`shaping`]), to log only the changes.
    shaped: BTreeSet<u32>,
}

impl PodAttachments {
    /// Brings the attachments in line with `net`: detaches from veths that
    /// left (and forgets what was learnt through them), attaches to new
    /// ones. With `pins`, also removes pins of veths that left while no agent
    /// ran. A veth that fails does not stop the others (a new pod's veth
    /// usually has the highest ifindex, so it would always come after a
    /// failing one): every veth is tried, and the failures come back
    /// together, each naming its veth. Those not attached stay out of
    /// `self.attached`, so the next sync tries them again.
    pub fn sync(
        &mut self,
        ebpf: &mut Ebpf,
        api: TcApi,
        net: &PodNetwork,
        pins: Option<&PinLayout>,
    ) -> Result<(), PodSyncError> {
        let mut failures = Failures::default();
        let bridge = net.bridge.as_ref().map(|(n, _)| n.clone());
        if bridge != self.bridge {
            match &bridge {
                Some(b) => info!("fast path: pods are behind {b}"),
                None => info!("fast path: no bridge holds an address of our subnet (yet)"),
            }
            self.bridge = bridge;
        }
        // A shaped pod stays on the host's path both ways: no program on its
        // veth, no POD_VETHS entry (so nothing is delivered into it with
        // redirect_peer), no approvals through it.
        let mut shaped = BTreeMap::new();
        for veth in &net.veths {
            if let Some(why) = shaping(veth) {
                shaped.insert(veth.ifindex, why);
            }
        }
        for (ifindex, why) in &shaped {
            if !self.shaped.contains(ifindex) {
                let name = net.veths.iter().find(|v| v.ifindex == *ifindex);
                info!(
                    "fast path: {} (#{ifindex}) is shaped ({why}): its pod takes the host's path, where the shaping applies",
                    name.map_or("?", |v| v.name.as_str())
                );
            }
        }
        for ifindex in &self.shaped {
            if !shaped.contains_key(ifindex)
                && let Some(v) = net.veths.iter().find(|v| v.ifindex == *ifindex)
            {
                info!("fast path: {} (#{ifindex}) is no longer shaped", v.name);
            }
        }
        let newly_shaped: Vec<&PodVeth> = net
            .veths
            .iter()
            .filter(|v| shaped.contains_key(&v.ifindex) && !self.shaped.contains(&v.ifindex))
            .collect();
        self.shaped = shaped.keys().copied().collect();
        let wanted: BTreeMap<u32, &PodVeth> = net
            .veths
            .iter()
            .filter(|v| !shaped.contains_key(&v.ifindex))
            .map(|v| (v.ifindex, v))
            .collect();
        let gone: Vec<u32> = self
            .attached
            .keys()
            .filter(|i| !wanted.contains_key(i))
            .copied()
            .collect();
        for ifindex in gone {
            let mut name = None;
            if let Some(links) = self.attached.remove(&ifindex) {
                info!("fast path: {} (#{ifindex}) left", links.name);
                // A pinned legacy filter stays until removed; on a veth
                // that was deleted it went with the veth.
                if api == TcApi::Legacy && pins.is_some() {
                    let detached = detach_legacy_filters(&links.name);
                    failures.check(Some(&links.name), ifindex, detached);
                }
                name = Some(links.name);
            }
            // Forgotten even when the filters could not be removed: no
            // delivery through a veth that left.
            let forgotten = forget_veth(ebpf, ifindex, pins);
            failures.check(name.as_deref(), ifindex, forgotten);
        }
        // What an earlier run left on a veth that is shaped now (a legacy
        // filter is no pin, and its POD_VETHS entry and approvals live in
        // pinned maps) would still deliver into the pod past its shaping.
        for veth in newly_shaped {
            let detached = detach_legacy_filters(&veth.name);
            failures.check(Some(&veth.name), veth.ifindex, detached);
            let forgotten = forget_veth(ebpf, veth.ifindex, pins);
            failures.check(Some(&veth.name), veth.ifindex, forgotten);
        }
        if let Some(pins) = pins {
            for ifindex in stale_pinned_veths(pins) {
                if !wanted.contains_key(&ifindex) && !shaped.contains_key(&ifindex) {
                    info!("fast path: the pod veth #{ifindex} is gone: removing its pins");
                    let forgotten = forget_veth(ebpf, ifindex, Some(pins));
                    failures.check(None, ifindex, forgotten);
                }
            }
        }
        for veth in wanted.values() {
            if let Some(links) = self.attached.get_mut(&veth.ifindex) {
                // The programs compare a packet's length with it.
                if links.mtu != veth.mtu {
                    let updated = pod_veths(ebpf).and_then(|mut m| {
                        m.insert(veth.ifindex, veth.mtu, 0).map_err(|e| {
                            EbpfError::map(MAP_POD_VETHS, format!("update {}", veth.ifindex), e)
                        })
                    });
                    if failures.check(Some(&veth.name), veth.ifindex, updated) {
                        links.mtu = veth.mtu;
                    }
                }
                continue;
            }
            let attached = attach_both(ebpf, api, veth, pins);
            let name = Some(veth.name.as_str());
            if let Some(links) = failures.check_value(name, veth.ifindex, attached) {
                info!("fast path: attached to {} (#{})", veth.name, veth.ifindex);
                self.attached.insert(
                    veth.ifindex,
                    PodLinks {
                        name: veth.name.clone(),
                        mtu: veth.mtu,
                        _links: links,
                    },
                );
            }
        }
        failures.into_result()
    }
}

/// Both programs on `veth`, then its POD_VETHS entry (only then may
/// `vxlan_ingress_tc` deliver through it).
fn attach_both(
    ebpf: &mut Ebpf,
    api: TcApi,
    veth: &PodVeth,
    pins: Option<&PinLayout>,
) -> Result<[TcLink; 2], EbpfError> {
    let from = attach(
        ebpf,
        api,
        PROG_VETH_FROM_POD,
        veth,
        TcAttachType::Ingress,
        pins,
    )?;
    let to = attach(
        ebpf,
        api,
        PROG_VETH_TO_POD,
        veth,
        TcAttachType::Egress,
        pins,
    )?;
    pod_veths(ebpf)?
        .insert(veth.ifindex, veth.mtu, 0)
        .map_err(|e| EbpfError::map(MAP_POD_VETHS, format!("insert {}", veth.ifindex), e))?;
    Ok([from, to])
}

/// The fast path is off: detaches from every pod veth a previous run pinned
/// (their programs would only pass everything on) and removes the mangle
/// rule, so nothing of it is left on the host.
pub fn remove_leftovers(
    ebpf: &mut Ebpf,
    subnet: Ipv4Net,
    pins: Option<&PinLayout>,
) -> Result<(), EbpfError> {
    // No veth is wanted: every pinned one is forgotten.
    PodAttachments::default().sync(ebpf, TcApi::Tcx, &PodNetwork::default(), pins)?;
    // Legacy filters are not pinned: find them by name on every interface.
    let removed = tc_attach::detach_legacy_everywhere(&VETH_PROGRAMS)?;
    if !removed.is_empty() {
        info!("fast path: removed legacy clsact filters {removed:?}");
    }
    release_host(subnet, pins);
    Ok(())
}

/// `<program>-<ifindex>`: bpffs refuses names with a dot (it keeps those
/// for its own files).
fn pin_name(program: &str, ifindex: u32) -> String {
    format!("{program}-{ifindex}")
}

/// ifindexes named by pinned veth links (`<program>-<ifindex>`).
fn stale_pinned_veths(pins: &PinLayout) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(pins.links_dir()) else {
        return Vec::new();
    };
    let mut out: Vec<u32> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let (program, index) = name.rsplit_once('-')?;
            [PROG_VETH_FROM_POD, PROG_VETH_TO_POD]
                .contains(&program)
                .then(|| index.parse().ok())?
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The veth programs with their hooks, as [`tc_attach`] finds their legacy
/// filters by name.
const VETH_PROGRAMS: [(&str, TcAttachType); 2] = [
    (PROG_VETH_FROM_POD, TcAttachType::Ingress),
    (PROG_VETH_TO_POD, TcAttachType::Egress),
];

/// Attaches `program` to the veth through `api`, replacing our earlier
/// attachment there in place; pinned as `<program>-<ifindex>` when `pins`.
fn attach(
    ebpf: &mut Ebpf,
    api: TcApi,
    program: &'static str,
    veth: &PodVeth,
    hook: TcAttachType,
    pins: Option<&PinLayout>,
) -> Result<TcLink, EbpfError> {
    let pin = pins.map(|p| p.link(&pin_name(program, veth.ifindex)));
    tc_attach::attach(
        classifier(ebpf, program)?,
        api,
        &tc_attach::Target {
            program,
            interface: &veth.name,
            ifindex: veth.ifindex,
            hook,
            pin: pin.as_deref(),
        },
    )
}

/// Why the pod behind `veth` must stay on the host's path, if it must:
/// something shapes or filters its traffic on the veth, which the fast path
/// would skip. `bpf_redirect_peer` into the pod never transmits on the
/// veth, so its root qdisc (the CNI bandwidth plugin's `tbf`) never sees
/// that traffic; `veth_from_pod` runs on TCX ingress before any clsact or
/// ingress-qdisc filter (the plugin's `mirred` to an `ifb` with a `tbf`).
/// So: a root qdisc other than the default `noqueue`, or any filter on the
/// veth's ingress or egress hook that is not one of ours. A veth whose
/// state cannot be read is treated as shaped: the host's path is always
/// correct, only slower.
fn shaping(veth: &PodVeth) -> Option<String> {
    match tc::qdiscs(veth.ifindex) {
        Ok(qdiscs) => {
            if let Some(q) = qdiscs
                .iter()
                .find(|q| q.parent == TC_H_ROOT && q.kind != "noqueue")
            {
                return Some(format!("root qdisc {}", q.kind));
            }
        }
        // The veth went: the next sync sees it gone.
        Err(e) if e.is_not_found() => return None,
        Err(e) => return Some(format!("its qdiscs cannot be read: {e}")),
    }
    for hook in [TcHook::Ingress, TcHook::Egress] {
        match tc::filters(veth.ifindex, hook) {
            Ok(filters) => {
                if let Some(f) = filters.iter().find(|f| {
                    !tc_attach::is_any_of_ours(f, &[PROG_VETH_FROM_POD, PROG_VETH_TO_POD])
                }) {
                    return Some(format!(
                        "a {} filter at pref {} on its {hook:?} hook",
                        f.kind, f.priority
                    ));
                }
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Some(format!("its filters cannot be read: {e}")),
        }
    }
    None
}

/// Removes our legacy filters from the veth `name`, if it is still there.
fn detach_legacy_filters(name: &str) -> Result<(), EbpfError> {
    for (program, hook) in VETH_PROGRAMS {
        tc_attach::detach_legacy(name, hook, program)?;
    }
    Ok(())
}

/// A veth that left: its pins, its POD_VETHS entry and every approval that
/// would deliver through it.
fn forget_veth(ebpf: &mut Ebpf, ifindex: u32, pins: Option<&PinLayout>) -> Result<(), EbpfError> {
    if let Some(pins) = pins {
        for program in [PROG_VETH_FROM_POD, PROG_VETH_TO_POD] {
            let path = pins.link(&pin_name(program, ifindex));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(EbpfError::Pin {
                        path,
                        op: "remove",
                        source,
                    });
                }
            }
        }
    }
    let _ = pod_veths(ebpf)?.remove(&ifindex);
    let map = ebpf
        .map_mut(MAP_FAST_FLOWS)
        .ok_or(EbpfError::MissingMap(MAP_FAST_FLOWS))?;
    let mut flows: HashMap<&mut MapData, FlowKey, FastFlow> =
        HashMap::try_from(map).map_err(|e| EbpfError::map(MAP_FAST_FLOWS, "open", e))?;
    let through: Vec<FlowKey> = flows
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| k.dir == DIR_TO_POD && v.ifindex == ifindex)
        .map(|(k, _)| k)
        .collect();
    for key in &through {
        let _ = flows.remove(key);
    }
    let map = ebpf
        .map_mut(MAP_FAST_FLOWS6)
        .ok_or(EbpfError::MissingMap(MAP_FAST_FLOWS6))?;
    let mut flows6: HashMap<&mut MapData, FlowKey6, FastFlow6> =
        HashMap::try_from(map).map_err(|e| EbpfError::map(MAP_FAST_FLOWS6, "open", e))?;
    let through6: Vec<FlowKey6> = flows6
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| k.dir == DIR_TO_POD && v.ifindex == ifindex)
        .map(|(k, _)| k)
        .collect();
    for key in &through6 {
        let _ = flows6.remove(key);
    }
    Ok(())
}

fn pod_veths(ebpf: &mut Ebpf) -> Result<HashMap<&mut MapData, u32, u32>, EbpfError> {
    let map = ebpf
        .map_mut(MAP_POD_VETHS)
        .ok_or(EbpfError::MissingMap(MAP_POD_VETHS))?;
    HashMap::try_from(map).map_err(|e| EbpfError::map(MAP_POD_VETHS, "open", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::DatapathError;

    #[test]
    fn a_sync_collects_every_veth_error_and_names_each_veth() {
        let mut failures = Failures::default();
        assert!(failures.check(Some("v2"), 7, Ok(())));
        assert!(!failures.check(
            Some("v3"),
            8,
            Err(EbpfError::MissingProgram(PROG_VETH_FROM_POD))
        ));
        // A veth known only from its pins' names.
        let denied = std::io::Error::from_raw_os_error(libc::EACCES);
        let gone = EbpfError::Pin {
            path: "/sys/fs/bpf/overlay/links/veth_to_pod-9".into(),
            op: "remove",
            source: denied,
        };
        assert_eq!(failures.check_value::<()>(None, 9, Err(gone)), None);
        assert_eq!(failures.check_value(Some("v4"), 10, Ok(4)), Some(4));
        let err = failures.into_result().unwrap_err();
        let named: Vec<(Option<&str>, u32)> = err
            .veths
            .iter()
            .map(|v| (v.name.as_deref(), v.ifindex))
            .collect();
        assert_eq!(named, [(Some("v3"), 8), (None, 9)]);
        let reason = DatapathError::from(EbpfError::from(err)).reason();
        assert_eq!(
            reason,
            "eBPF: fast path: 2 pod veth(s) not in line: \
             pod veth v3 (#8): eBPF: the object has no program veth_from_pod; \
             pod veth #9: eBPF: pin /sys/fs/bpf/overlay/links/veth_to_pod-9: remove failed: \
             Permission denied (os error 13)"
        );
        assert!(Failures::default().into_result().is_ok());
    }

    #[test]
    fn a_veths_verifier_error_is_one_line_without_the_log() {
        let source = aya::programs::ProgramError::LoadError {
            io_error: std::io::Error::from_raw_os_error(libc::EACCES),
            verifier_log: aya_obj::VerifierLog::new(
                "0: (bf) r6 = r1\ninvalid access to packet\n".into(),
            ),
        };
        let e = EbpfError::load(PROG_VETH_TO_POD, source);
        let err = PodSyncError {
            veths: vec![VethError {
                name: Some("v5".into()),
                ifindex: 5,
                source: e,
            }],
        };
        let text = err.to_string();
        assert!(!text.contains("0: (bf)"), "{text}");
        assert!(
            text.ends_with("verifier: invalid access to packet"),
            "{text}"
        );
    }
}
