//! The datapath's maps: reading them (counters, peers, node config,
//! per-peer traffic) and writing a peer's entries in REMOTE_SUBNETS,
//! KNOWN_VTEPS and PEER_STATS, with map-full and missing-entry handling.

use super::*;

/// Program ids, for `bpftool prog show id <id>` and for tests that check what
/// is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramIds {
    pub egress: u32,
    /// `vxlan_egress6` on `flannel-v6.<VNI>`, on a dual-stack node.
    pub egress6: Option<u32>,
    pub ingress_tc: u32,
    pub ingress_xdp: Option<u32>,
}

/// Counter totals over all CPUs, per [`Reason`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub(super) totals: Vec<(Reason, Counter)>,
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

/// Records this build's [`MAP_LAYOUT_VERSION`] in LAYOUT (see
/// [`LayoutPlan`]).
pub(super) fn record_layout(ebpf: &mut Ebpf) -> Result<(), EbpfError> {
    let map = ebpf
        .map_mut(MAP_LAYOUT)
        .ok_or(EbpfError::MissingMap(MAP_LAYOUT))?;
    let mut record: Array<&mut MapData, u32> =
        Array::try_from(map).map_err(|e| EbpfError::map(MAP_LAYOUT, "open", e))?;
    record
        .set(0, MAP_LAYOUT_VERSION, 0)
        .map_err(|e| EbpfError::map(MAP_LAYOUT, "set entry 0", e))
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

pub(super) fn peer_from_entry(key: &Key<[u8; 4]>, value: &RemoteVtep) -> Option<Peer> {
    let prefix = u8::try_from(key.prefix_len()).ok()?;
    Some(Peer {
        subnet: Ipv4Net::new(Ipv4Addr::from(key.data()), prefix).ok()?,
        public_ip: Ipv4Addr::from(value.public_ip),
        vtep_mac: MacAddr(value.vtep_mac),
        v6: None,
    })
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

pub(super) fn remote_subnets(
    ebpf: &mut Ebpf,
) -> Result<LpmTrie<&mut MapData, [u8; 4], RemoteVtep>, EbpfError> {
    let map = ebpf
        .map_mut(MAP_REMOTE_SUBNETS)
        .ok_or(EbpfError::MissingMap(MAP_REMOTE_SUBNETS))?;
    LpmTrie::try_from(map).map_err(|e| EbpfError::map(MAP_REMOTE_SUBNETS, "open", e))
}

pub(super) fn known_vteps(
    ebpf: &mut Ebpf,
) -> Result<HashMap<&mut MapData, [u8; 4], KnownVtep>, EbpfError> {
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
pub(super) fn insert_peer(
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
pub(super) fn insert_direct_peer(
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
pub(super) fn insert_err(
    map: &'static str,
    what: impl fmt::Display,
    capacity: u32,
    e: MapError,
) -> EbpfError {
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
pub(super) fn remove_remote_subnet(ebpf: &mut Ebpf, subnet: Ipv4Net) -> Result<(), EbpfError> {
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
pub(super) fn remove_peer_entries(
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
pub(super) fn forget_vtep(ebpf: &mut Ebpf, ip: [u8; 4]) -> Result<(), EbpfError> {
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

pub(super) fn peer_stats(
    ebpf: &mut Ebpf,
) -> Result<PerCpuHashMap<&mut MapData, [u8; 4], PeerTraffic>, EbpfError> {
    let map = ebpf
        .map_mut(MAP_PEER_STATS)
        .ok_or(EbpfError::MissingMap(MAP_PEER_STATS))?;
    PerCpuHashMap::try_from(map).map_err(|e| EbpfError::map(MAP_PEER_STATS, "open", e))
}

/// The number of possible CPUs, which sizes per-CPU values: read from
/// sysfs once, not on every peer added (it does not change while we run).
pub(super) fn possible_cpus() -> Result<usize, EbpfError> {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    if let Some(n) = CPUS.get() {
        return Ok(*n);
    }
    let n = aya::util::nr_cpus().map_err(|(_, e)| EbpfError::Cpus(e))?;
    Ok(*CPUS.get_or_init(|| n))
}

/// Creates a zeroed PEER_STATS entry unless one exists (a restart keeps the
/// counts the pinned map holds).
pub(super) fn start_peer_stats(
    ebpf: &mut Ebpf,
    ip: [u8; 4],
    capacity: u32,
) -> Result<(), EbpfError> {
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
pub(super) fn prune_maps(ebpf: &mut Ebpf, users: &VtepUsers) -> Result<(), EbpfError> {
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
pub(super) fn is_missing(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}
