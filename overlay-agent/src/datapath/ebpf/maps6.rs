//! A dual-stack node's IPv6 maps: NODE_CONFIG6, and per peer its IPv6 side
//! in REMOTE_SUBNETS6 (where its IPv6 pods are) and KNOWN_VTEPS6 (its
//! `PublicIPv6`, the only accepted source of IPv6 VXLAN). A peer's IPv6 side
//! is mapped whatever its IPv4 side is: host policy is judged for each side
//! on its own ([`map_side6`]); its traffic counts under its IPv4 `PublicIP`
//! in PEER_STATS.

use std::net::Ipv6Addr;

use ipnet::Ipv6Net;
use overlay_common::{
    consts::{MAP_KNOWN_VTEPS6, MAP_NODE_CONFIG6, MAP_REMOTE_SUBNETS6},
    maps::{KnownVtep6, NodeConfig6, RemoteVtep6},
};

use super::*;
use crate::flannel::lease::Peer6;

/// The IPv6 sides the maps hold, by the peer's IPv4 subnet (the name the
/// reconciler gives a peer), and how many peers use each `PublicIPv6`.
#[derive(Debug, Default)]
pub(super) struct Sides6 {
    pub(super) by_subnet: BTreeMap<Ipv4Net, Peer6>,
    pub(super) users: VtepUsers<Ipv6Addr>,
    /// IPv6 sides `flannel-v6.<VNI>` held at start-up whose lease was not
    /// known yet (see [`keep_held6`]): spared by [`prune_maps6`].
    held: BTreeSet<Ipv6Net>,
    held_ips: BTreeSet<Ipv6Addr>,
}

/// The NODE_CONFIG6 entry for `flannel-v6.<VNI>`.
pub fn node_config6(device: &VxlanDevice<Ipv6Addr>) -> NodeConfig6 {
    NodeConfig6 {
        local_ip: device.local.octets(),
        vxlan_ifindex: device.ifindex,
        vtep_mac: device.mac.0,
        _pad: [0; 2],
        configured: 1,
    }
}

/// Writes NODE_CONFIG6: `device`'s on a dual-stack node, zeros (the
/// programs leave IPv6 alone) otherwise.
pub(super) fn write_node_config6(
    ebpf: &mut Ebpf,
    device: Option<&VxlanDevice<Ipv6Addr>>,
) -> Result<(), EbpfError> {
    let map = ebpf
        .map_mut(MAP_NODE_CONFIG6)
        .ok_or(EbpfError::MissingMap(MAP_NODE_CONFIG6))?;
    let mut config: Array<&mut MapData, NodeConfig6> =
        Array::try_from(map).map_err(|e| EbpfError::map(MAP_NODE_CONFIG6, "open", e))?;
    config
        .set(0, device.map(node_config6).unwrap_or_default(), 0)
        .map_err(|e| EbpfError::map(MAP_NODE_CONFIG6, "set entry 0", e))
}

/// Reads NODE_CONFIG6's entry (an open map).
pub fn read_node_config6(map: &aya::maps::Map) -> Result<NodeConfig6, EbpfError> {
    let config: Array<&MapData, NodeConfig6> =
        Array::try_from(map).map_err(|e| EbpfError::map(MAP_NODE_CONFIG6, "open", e))?;
    config
        .get(&0, 0)
        .map_err(|e| EbpfError::map(MAP_NODE_CONFIG6, "read entry 0", e))
}

/// The REMOTE_SUBNETS6 key for an IPv6 subnet.
pub fn subnet_key6(subnet: Ipv6Net) -> Key<[u8; 16]> {
    Key::new(u32::from(subnet.prefix_len()), subnet.network().octets())
}

pub fn remote_vtep6(peer: &Peer, p6: &Peer6) -> RemoteVtep6 {
    RemoteVtep6 {
        vtep_mac: p6.vtep_mac.0,
        _pad: [0; 2],
        public_ip: p6.public_ip.octets(),
        peer: peer.public_ip.octets(),
    }
}

fn remote_subnets6(
    ebpf: &mut Ebpf,
) -> Result<LpmTrie<&mut MapData, [u8; 16], RemoteVtep6>, EbpfError> {
    let map = ebpf
        .map_mut(MAP_REMOTE_SUBNETS6)
        .ok_or(EbpfError::MissingMap(MAP_REMOTE_SUBNETS6))?;
    LpmTrie::try_from(map).map_err(|e| EbpfError::map(MAP_REMOTE_SUBNETS6, "open", e))
}

fn known_vteps6_mut(
    ebpf: &mut Ebpf,
) -> Result<HashMap<&mut MapData, [u8; 16], KnownVtep6>, EbpfError> {
    let map = ebpf
        .map_mut(MAP_KNOWN_VTEPS6)
        .ok_or(EbpfError::MissingMap(MAP_KNOWN_VTEPS6))?;
    HashMap::try_from(map).map_err(|e| EbpfError::map(MAP_KNOWN_VTEPS6, "open", e))
}

/// Makes the maps hold `peer`'s IPv6 side, or none when it has none:
/// KNOWN_VTEPS6 first, then REMOTE_SUBNETS6 (ingress accepts the peer by the
/// time egress sends to it), then what the side it had before used and
/// nothing uses now goes. All or nothing, as [`insert_peer`]: a refused
/// insert takes out what this call added.
pub(super) fn set_peer6(
    ebpf: &mut Ebpf,
    sides: &mut Sides6,
    peer: &Peer,
    capacity: u32,
) -> Result<(), EbpfError> {
    set_side6(ebpf, sides, peer, capacity, true)
}

/// `peer`'s IPv6 side as its host-policy verdict (`conflict`, see
/// [`host_policy`]) allows, as the eBPF datapath's [`Datapath::add_peer`]
/// does with the IPv4 side: no conflict, both entries ([`set_peer6`]); an
/// xfrm policy, neither (its clear VXLAN is dropped at TC ingress, only
/// what the kernel decrypts gets in); a route conflict, KNOWN_VTEPS6 only.
/// Without a REMOTE_SUBNETS6 entry `vxlan_egress6` passes its packets to
/// `flannel-v6.<VNI>`, whose kernel entries stay: the kernel encapsulates
/// them through xfrm and the routing rules, as flannel does.
pub(super) fn map_side6(
    ebpf: &mut Ebpf,
    sides: &mut Sides6,
    peer: &Peer,
    conflict: Option<&HostPolicyConflict>,
    capacity: u32,
) -> Result<(), EbpfError> {
    match conflict {
        None => set_peer6(ebpf, sides, peer, capacity),
        Some(HostPolicyConflict::Xfrm(_)) => {
            remove_peer6(ebpf, sides, peer)?;
            forget_held6(ebpf, sides, peer, true)
        }
        Some(HostPolicyConflict::Route { .. }) => {
            set_side6(ebpf, sides, peer, capacity, false)?;
            forget_held6(ebpf, sides, peer, false)
        }
    }
}

/// Takes out what [`keep_held6`] put in for `peer`'s IPv6 side after a
/// restart (its REMOTE_SUBNETS6 entry and, with `vtep`, its KNOWN_VTEPS6
/// one unless a peer uses it): a side host policy covers must not keep
/// being encapsulated to under no peer's name.
fn forget_held6(
    ebpf: &mut Ebpf,
    sides: &mut Sides6,
    peer: &Peer,
    vtep: bool,
) -> Result<(), EbpfError> {
    let Some(p6) = peer.v6 else {
        return Ok(());
    };
    if sides.held.remove(&p6.subnet) {
        remove_remote_subnet6(ebpf, p6.subnet)?;
    }
    // Also when it was never held: an entry an earlier failure left (as
    // `remove_peer_entries` does for IPv4).
    if vtep {
        sides.held_ips.remove(&p6.public_ip);
        if !sides.users.in_use(p6.public_ip) {
            forget_vtep6(ebpf, p6.public_ip.octets())?;
        }
    }
    Ok(())
}

/// [`set_peer6`], with (`encapsulate`) or without the REMOTE_SUBNETS6
/// entry: without, the side's KNOWN_VTEPS6 entry alone, and a
/// REMOTE_SUBNETS6 entry it had goes.
fn set_side6(
    ebpf: &mut Ebpf,
    sides: &mut Sides6,
    peer: &Peer,
    capacity: u32,
    encapsulate: bool,
) -> Result<(), EbpfError> {
    let Some(p6) = peer.v6 else {
        return remove_peer6(ebpf, sides, peer);
    };
    let ip = p6.public_ip.octets();
    let inserted = (|| -> Result<(), EbpfError> {
        let known = KnownVtep6 {
            vtep_mac: p6.vtep_mac.0,
            _pad: [0; 2],
            peer: peer.public_ip.octets(),
        };
        known_vteps6_mut(ebpf)?
            .insert(ip, known, 0)
            .map_err(|e| insert_err(MAP_KNOWN_VTEPS6, p6.public_ip, capacity, e))?;
        if !encapsulate {
            return Ok(());
        }
        remote_subnets6(ebpf)?
            .insert(&subnet_key6(p6.subnet), remote_vtep6(peer, &p6), 0)
            .map_err(|e| insert_err(MAP_REMOTE_SUBNETS6, p6.subnet, capacity, e))
    })();
    if let Err(e) = inserted {
        if !sides.users.in_use(p6.public_ip)
            && let Err(undo) = forget_vtep6(ebpf, ip)
        {
            warn!(
                "undoing the half-inserted IPv6 side of {} failed: {}",
                peer.subnet,
                DatapathError::from(undo).reason()
            );
        }
        return Err(e);
    }
    if encapsulate {
        if let Some(old) = sides.by_subnet.insert(peer.subnet, p6)
            && old.subnet != p6.subnet
        {
            remove_remote_subnet6(ebpf, old.subnet)?;
        }
    } else if let Some(old) = sides.by_subnet.remove(&peer.subnet) {
        remove_remote_subnet6(ebpf, old.subnet)?;
    }
    if let Some(unused) = sides.users.set(peer.subnet, p6.public_ip) {
        forget_vtep6(ebpf, unused.octets())?;
    }
    Ok(())
}

/// The IPv6 sides `flannel-v6.<VNI>` holds (`held`, read back from the
/// kernel) that no peer in `sides` owns: after a restart the kernel's
/// entries do not say which lease they belong to until the peers are
/// programmed again. They go into the maps meanwhile, counted under no
/// peer, so that their VXLAN keeps flowing (a restart, or a migration to
/// new maps, stays hitless for IPv6 too); programming the peer replaces
/// the entries. One that is full is left out (the kernel device still
/// carries its traffic out, and the peer's programming retries).
pub(super) fn keep_held6(
    ebpf: &mut Ebpf,
    sides: &mut Sides6,
    held: &[Peer6],
    capacity: u32,
) -> Result<(), EbpfError> {
    let owned: BTreeSet<Ipv6Net> = sides.by_subnet.values().map(|p| p.subnet).collect();
    for p6 in held.iter().filter(|p| !owned.contains(&p.subnet)) {
        let known = KnownVtep6 {
            vtep_mac: p6.vtep_mac.0,
            _pad: [0; 2],
            peer: [0; 4],
        };
        let remote = RemoteVtep6 {
            vtep_mac: p6.vtep_mac.0,
            _pad: [0; 2],
            public_ip: p6.public_ip.octets(),
            peer: [0; 4],
        };
        let inserted = known_vteps6_mut(ebpf)?
            .insert(p6.public_ip.octets(), known, 0)
            .map_err(|e| insert_err(MAP_KNOWN_VTEPS6, p6.public_ip, capacity, e))
            .and_then(|()| {
                remote_subnets6(ebpf)?
                    .insert(&subnet_key6(p6.subnet), remote, 0)
                    .map_err(|e| insert_err(MAP_REMOTE_SUBNETS6, p6.subnet, capacity, e))
            });
        match inserted {
            Ok(()) => {
                sides.held.insert(p6.subnet);
                sides.held_ips.insert(p6.public_ip);
            }
            Err(e @ EbpfError::MapFull { .. }) => {
                debug!("IPv6 side {} left out: {e}", p6.subnet);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Takes `peer`'s IPv6 side (the one the maps hold for its subnet) out.
pub(super) fn remove_peer6(
    ebpf: &mut Ebpf,
    sides: &mut Sides6,
    peer: &Peer,
) -> Result<(), EbpfError> {
    if let Some(old) = sides.by_subnet.remove(&peer.subnet) {
        remove_remote_subnet6(ebpf, old.subnet)?;
    }
    if let Some(unused) = sides.users.remove(peer.subnet) {
        forget_vtep6(ebpf, unused.octets())?;
    }
    Ok(())
}

fn remove_remote_subnet6(ebpf: &mut Ebpf, subnet: Ipv6Net) -> Result<(), EbpfError> {
    match remote_subnets6(ebpf)?.remove(&subnet_key6(subnet)) {
        Err(e) if !is_missing(&e) => Err(EbpfError::map(
            MAP_REMOTE_SUBNETS6,
            format!("remove {subnet}"),
            e,
        )),
        _ => Ok(()),
    }
}

fn forget_vtep6(ebpf: &mut Ebpf, ip: [u8; 16]) -> Result<(), EbpfError> {
    match known_vteps6_mut(ebpf)?.remove(&ip) {
        Err(e) if !is_missing(&e) => {
            let op = format!("remove {}", Ipv6Addr::from(ip));
            Err(EbpfError::map(MAP_KNOWN_VTEPS6, op, e))
        }
        _ => Ok(()),
    }
}

/// Removes what reopened maps hold beyond `sides` (left while no agent
/// ran): one pass over each map.
pub(super) fn prune_maps6(ebpf: &mut Ebpf, sides: &Sides6) -> Result<(), EbpfError> {
    let held: BTreeSet<Ipv6Net> = sides
        .by_subnet
        .values()
        .map(|p| p.subnet)
        .chain(sides.held.iter().copied())
        .collect();
    let stale: Vec<Ipv6Net> = read_subnets6(&remote_subnets6(ebpf)?)?
        .into_iter()
        .map(|(net, _)| net)
        .filter(|net| !held.contains(net))
        .collect();
    for net in stale {
        info!("pinned maps: removing {net}, no longer programmed");
        remove_remote_subnet6(ebpf, net)?;
    }
    let unused: Vec<[u8; 16]> = known_vteps6_mut(ebpf)?
        .keys()
        .filter_map(Result::ok)
        .filter(|ip| {
            let ip = Ipv6Addr::from(*ip);
            !sides.users.in_use(ip) && !sides.held_ips.contains(&ip)
        })
        .collect();
    for ip in unused {
        forget_vtep6(ebpf, ip)?;
    }
    Ok(())
}

/// REMOTE_SUBNETS6's entries.
fn read_subnets6<T: std::borrow::Borrow<MapData>>(
    trie: &LpmTrie<T, [u8; 16], RemoteVtep6>,
) -> Result<Vec<(Ipv6Net, RemoteVtep6)>, EbpfError> {
    let mut out = Vec::new();
    for entry in trie.iter() {
        let (key, value) = entry.map_err(|e| EbpfError::map(MAP_REMOTE_SUBNETS6, "iterate", e))?;
        let Ok(prefix) = u8::try_from(key.prefix_len()) else {
            continue;
        };
        if let Ok(net) = Ipv6Net::new(Ipv6Addr::from(key.data()), prefix) {
            out.push((net, value));
        }
    }
    Ok(out)
}

/// Reads REMOTE_SUBNETS6 (an open map) as each peer's IPv6 side, by the
/// peer's IPv4 `PublicIP`; sorted by subnet.
pub fn read_remote_subnets6(map: &aya::maps::Map) -> Result<Vec<(Ipv4Addr, Peer6)>, EbpfError> {
    let trie: LpmTrie<&MapData, [u8; 16], RemoteVtep6> =
        LpmTrie::try_from(map).map_err(|e| EbpfError::map(MAP_REMOTE_SUBNETS6, "open", e))?;
    let mut out: Vec<(Ipv4Addr, Peer6)> = read_subnets6(&trie)?
        .into_iter()
        .map(|(subnet, v)| {
            let p6 = Peer6 {
                subnet,
                public_ip: Ipv6Addr::from(v.public_ip),
                vtep_mac: MacAddr(v.vtep_mac),
            };
            (Ipv4Addr::from(v.peer), p6)
        })
        .collect();
    out.sort_by_key(|(_, p)| p.subnet);
    Ok(out)
}

/// The `PublicIPv6`s KNOWN_VTEPS6 holds (an open map), read in one pass.
pub fn known_vteps6(
    map: &aya::maps::Map,
) -> Result<std::collections::HashSet<Ipv6Addr>, EbpfError> {
    let vteps: HashMap<&MapData, [u8; 16], KnownVtep6> =
        HashMap::try_from(map).map_err(|e| EbpfError::map(MAP_KNOWN_VTEPS6, "open", e))?;
    let mut out = std::collections::HashSet::new();
    for key in vteps.keys() {
        let key = key.map_err(|e| EbpfError::map(MAP_KNOWN_VTEPS6, "iterate", e))?;
        out.insert(Ipv6Addr::from(key));
    }
    Ok(out)
}
