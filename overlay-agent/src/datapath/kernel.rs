//! The kernel-vxlan datapath: `flannel.<VNI>` programmed exactly as flanneld
//! does, and the kernel's vxlan driver moves the packets. Nothing is attached.
//! With `Backend.DirectRouting`, a peer on the underlay's own segment gets a
//! plain route instead (see [`crate::netlink::direct_route`]).

use std::{
    collections::{BTreeMap, HashSet},
    net::Ipv6Addr,
};

use ipnet::{Ipv4Net, Ipv6Net};
use log::{info, warn};

use super::{
    Datapath, DatapathError, Mode, NodeSpec, NodeState, Peer,
    vtep_guard::{GuardError, VtepGuard},
};
use crate::{
    flannel::lease::Peer6,
    netlink::{
        EntryTable, IpFamily, Netlink, ProgrammedPeer, VxlanDevice, direct_route::has_direct_route,
        peer_entries::Device,
    },
};

/// How a peer was programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerKind {
    /// Neighbour, FDB entry and route on `flannel.<VNI>`.
    Vxlan,
    /// `<subnet> via <PublicIP> dev <underlay>` (DirectRouting).
    Direct,
}

/// flannel's VXLAN backend, through rtnetlink.
///
/// Create it anywhere; the netlink socket is opened by [`Datapath::setup`] in
/// the network namespace of the thread that runs it (inside a tokio runtime),
/// and every later call talks to that namespace.
#[derive(Debug, Default)]
pub struct KernelDatapath {
    state: Option<State>,
}

#[derive(Debug)]
struct State {
    netlink: Netlink,
    device: VxlanDevice,
    direct_routing: bool,
    /// The peers programmed with a direct route, by subnet: the route does
    /// not carry the VtepMAC, which [`Datapath::peers`] reports.
    direct: BTreeMap<Ipv4Net, Peer>,
    /// The device's neighbours and FDB entries: learned by one dump when
    /// set up and whenever the peers are read back, then kept in step with
    /// every change, so a peer event dumps nothing.
    entries: EntryTable,
    /// The VXLAN port, for the guard.
    port: u16,
    /// The nft set of known VTEPs guarding the kernel's VXLAN socket;
    /// `None` while it could not be installed (retried by [`Datapath::peers`]).
    guard: Option<VtepGuard>,
    /// `flannel-v6.<VNI>` of a dual-stack node.
    v6: Option<Side6>,
}

/// A dual-stack node's `flannel-v6.<VNI>` and what it holds. With
/// DirectRouting a peer's IPv6 side whose `PublicIPv6` the underlay reaches
/// without a gateway gets a plain route instead, as flanneld does it
/// (`<v6 subnet> via <PublicIPv6> dev <underlay>`), decided on its own
/// (`ip -6 route get`): the two families of one peer may differ.
#[derive(Debug)]
struct Side6 {
    device: VxlanDevice<Ipv6Addr>,
    entries: EntryTable<Ipv6Addr>,
    direct_routing: bool,
    /// The IPv6 sides programmed as direct routes, by the peer's IPv4
    /// subnet (not in `by_subnet`).
    direct: BTreeMap<Ipv4Net, Peer6>,
    /// The IPv6 side programmed for each peer, by the peer's IPv4 subnet:
    /// the kernel's entries do not say which lease they belong to.
    by_subnet: BTreeMap<Ipv4Net, Peer6>,
    /// The IPv6 sides whose three entries the device held at the last
    /// read-back, whichever lease they belong to. After a restart
    /// `by_subnet` is empty until the peers are programmed again; these
    /// keep the guard (and the eBPF maps) accepting their VXLAN meanwhile.
    held: Vec<Peer6>,
}

impl Side6 {
    /// Makes the device hold `peer`'s IPv6 side (or none), taking out the
    /// entries of the side it held before; with DirectRouting a side on the
    /// underlay's segment gets its direct route instead.
    async fn program(&mut self, netlink: &Netlink, peer: &Peer) -> Result<(), DatapathError> {
        let direct = match peer.v6 {
            Some(p6) if self.direct_routing => netlink
                .route_get(p6.public_ip)
                .await?
                .is_some_and(|hop| hop.is_direct(self.device.underlay_ifindex)),
            _ => false,
        };
        let was_direct = self.direct.get(&peer.subnet).copied();
        if let Some(p6) = peer.v6.filter(|_| direct) {
            let underlay = underlay_of(&self.device);
            // Replaces a vxlan route of the same prefix in place.
            netlink
                .replace_direct_route(underlay, p6.subnet, p6.public_ip)
                .await?;
            if let Some(old) = was_direct.filter(|o| *o != p6) {
                netlink
                    .delete_direct_route(underlay, old.subnet, old.public_ip)
                    .await?;
            }
            if let Some(old) = self.by_subnet.get(&peer.subnet).copied() {
                let dev = vxlan_of(&self.device);
                if old.subnet == p6.subnet {
                    for r in netlink
                        .remove_neighbour_and_fdb(dev, &mut self.entries, &old)
                        .await
                    {
                        r?;
                    }
                } else {
                    netlink.remove_peer(dev, &mut self.entries, &old).await?;
                }
                self.by_subnet.remove(&peer.subnet);
            }
            if was_direct != Some(p6) {
                info!(
                    "peer {}: its IPv6 side {} (PublicIPv6 {}) is on the underlay's segment: direct route",
                    peer.subnet, p6.subnet, p6.public_ip
                );
            }
            self.direct.insert(peer.subnet, p6);
            return Ok(());
        }
        let old = self.by_subnet.get(&peer.subnet).copied();
        if let Some(old) = old.filter(|o| Some(*o) != peer.v6) {
            netlink
                .remove_peer(vxlan_of(&self.device), &mut self.entries, &old)
                .await?;
            self.by_subnet.remove(&peer.subnet);
        }
        if let Some(p6) = peer.v6 {
            netlink
                .replace_peer(vxlan_of(&self.device), &mut self.entries, &p6)
                .await?;
            self.by_subnet.insert(peer.subnet, p6);
        }
        if let Some(old) = was_direct {
            // Normally gone already: a vxlan route of the same prefix
            // replaced it.
            netlink
                .delete_direct_route(underlay_of(&self.device), old.subnet, old.public_ip)
                .await?;
            self.direct.remove(&peer.subnet);
        }
        Ok(())
    }

    /// Takes out `peer`'s IPv6 side, whichever kind it is.
    async fn remove(&mut self, netlink: &Netlink, peer: &Peer) -> Result<(), DatapathError> {
        if let Some(old) = self.by_subnet.get(&peer.subnet).copied() {
            netlink
                .remove_peer(vxlan_of(&self.device), &mut self.entries, &old)
                .await?;
            self.by_subnet.remove(&peer.subnet);
        }
        if let Some(old) = self.direct.get(&peer.subnet).copied() {
            netlink
                .delete_direct_route(underlay_of(&self.device), old.subnet, old.public_ip)
                .await?;
            self.direct.remove(&peer.subnet);
        }
        Ok(())
    }
}

impl Side6 {
    /// [`Side6::program`] for the peers of a batch whose result so far is
    /// `Ok`: the sides they held and no longer hold go first, then their
    /// new sides, each step as one pipelined batch; a failure becomes that
    /// peer's result.
    async fn program_all(
        &mut self,
        netlink: &Netlink,
        peers: &[Peer],
        results: &mut [Result<(), DatapathError>],
    ) {
        let dev = vxlan_of(&self.device);
        let stale: Vec<(usize, Peer6)> = (0..peers.len())
            .filter(|&i| results[i].is_ok())
            .filter_map(|i| {
                let old = self.by_subnet.get(&peers[i].subnet).copied()?;
                (Some(old) != peers[i].v6).then_some((i, old))
            })
            .collect();
        let olds: Vec<Peer6> = stale.iter().map(|&(_, o)| o).collect();
        let removed = netlink
            .remove_peers(dev, &mut self.entries, &olds, true)
            .await;
        for (&(i, _), r) in stale.iter().zip(removed) {
            match r {
                Ok(()) => {
                    self.by_subnet.remove(&peers[i].subnet);
                }
                Err(e) => results[i] = Err(e.into()),
            }
        }
        let todo: Vec<(usize, Peer6)> = (0..peers.len())
            .filter(|&i| results[i].is_ok())
            .filter_map(|i| Some((i, peers[i].v6?)))
            .collect();
        let sides: Vec<Peer6> = todo.iter().map(|&(_, p6)| p6).collect();
        let replaced = netlink.replace_peers(dev, &mut self.entries, &sides).await;
        for (&(i, p6), r) in todo.iter().zip(replaced) {
            match r {
                Ok(()) => {
                    self.by_subnet.insert(peers[i].subnet, p6);
                }
                Err(e) => results[i] = Err(e.into()),
            }
        }
    }
}

impl KernelDatapath {
    pub fn new() -> Self {
        Self::default()
    }

    /// The device as set up (ifindex, MAC, MTU, underlay, how it was obtained).
    pub fn device(&self) -> Option<&VxlanDevice> {
        self.state.as_ref().map(|s| &s.device)
    }

    /// `flannel-v6.<VNI>` as set up, on a dual-stack node.
    pub fn device6(&self) -> Option<&VxlanDevice<Ipv6Addr>> {
        self.state.as_ref()?.v6.as_ref().map(|s| &s.device)
    }

    /// The IPv6 sides `flannel-v6.<VNI>` held whole at the last read-back
    /// ([`Datapath::peers`]), by lease or not.
    pub fn held6(&self) -> &[Peer6] {
        self.state
            .as_ref()
            .and_then(|s| s.v6.as_ref())
            .map_or(&[], |s| s.held.as_slice())
    }

    /// The netlink connection, once set up.
    pub fn netlink(&self) -> Option<&Netlink> {
        self.state.as_ref().map(|s| &s.netlink)
    }

    /// Every peer route on the device with the neighbour and FDB entry behind
    /// it, including incomplete ones (which [`Datapath::peers`] leaves out).
    pub async fn programmed_peers(&self) -> Result<Vec<ProgrammedPeer>, DatapathError> {
        let state = self.state()?;
        Ok(state.netlink.programmed_peers(state.dev()).await?.0)
    }

    /// The in-memory table of the device's neighbours and FDB entries.
    pub fn entries(&self) -> Option<&EntryTable> {
        self.state.as_ref().map(|s| &s.entries)
    }

    fn state(&self) -> Result<&State, DatapathError> {
        self.state.as_ref().ok_or(DatapathError::NotSetUp)
    }

    fn state_mut(&mut self) -> Result<&mut State, DatapathError> {
        self.state.as_mut().ok_or(DatapathError::NotSetUp)
    }

    /// Whether the nft guard of the VXLAN port is installed.
    pub fn guarded(&self) -> bool {
        self.state.as_ref().is_some_and(|s| s.guard.is_some())
    }

    /// Whether `subnet` is programmed as a direct peer.
    pub fn is_direct(&self, subnet: Ipv4Net) -> bool {
        self.state
            .as_ref()
            .is_some_and(|s| s.direct.contains_key(&subnet))
    }

    /// Whether the IPv6 side of the peer with IPv4 subnet `subnet` is
    /// programmed as a direct route (DirectRouting), not on `flannel-v6.<VNI>`.
    pub fn is_direct6(&self, subnet: Ipv4Net) -> bool {
        self.state
            .as_ref()
            .and_then(|s| s.v6.as_ref())
            .is_some_and(|s| s.direct.contains_key(&subnet))
    }

    /// Programs a peer and says which kind it got. With DirectRouting, one
    /// `ip route get <PublicIP>` decides; the new kind's route replaces the
    /// old kind's in place (same prefix, same table), so the subnet stays
    /// routed while a peer moves between the two, and what is left of the
    /// old kind goes after.
    ///
    /// The peer's PublicIP (and PublicIPv6) enters the guard's sets first, so its VXLAN is
    /// accepted by the time we send to it. A direct peer's too: DirectRouting
    /// is decided by each node for itself (`ip route get`), so the peer may
    /// well see us through a gateway and send us VXLAN; it holds a lease, so
    /// it is a VTEP like any other (the eBPF datapath's KNOWN_VTEPS agrees).
    pub async fn add_peer_kind(&mut self, peer: &Peer) -> Result<PeerKind, DatapathError> {
        let state = self.state_mut()?;
        if let Some(g) = state.guard.as_mut() {
            g.admit(peer)?;
        }
        let mut programmed = Self::program(state, peer).await;
        if programmed.is_ok()
            && let Some(side) = state.v6.as_mut()
            && let Err(e) = side.program(&state.netlink, peer).await
        {
            programmed = Err(e);
        }
        let state = self.state_mut()?;
        if let Some(g) = state.guard.as_mut() {
            match &programmed {
                Ok(_) => g.commit(peer)?,
                Err(_) => {
                    if let Err(e) = g.failed(peer) {
                        warn!("taking {} out of the VTEP set: {e}", peer.public_ip);
                    }
                }
            }
        }
        programmed
    }

    /// [`KernelDatapath::add_peer_kind`] for many peers: their entries go
    /// in as one batch of pipelined requests per step
    /// ([`Netlink::replace_peers`]), on `flannel.<VNI>` and then, for the
    /// IPv6 sides, on `flannel-v6.<VNI>`; each peer gets its own result and
    /// its own guard verdict. With DirectRouting (or direct peers left from
    /// it) each peer's kind is its own route lookup's answer, and the peers
    /// go one at a time as [`KernelDatapath::add_peer_kind`].
    pub async fn add_peers_kind(&mut self, peers: &[Peer]) -> Vec<Result<PeerKind, DatapathError>> {
        let state = match self.state_mut() {
            Ok(s) => s,
            Err(_) => return peers.iter().map(|_| Err(DatapathError::NotSetUp)).collect(),
        };
        if state.one_at_a_time() {
            let mut results = Vec::with_capacity(peers.len());
            for p in peers {
                results.push(self.add_peer_kind(p).await);
            }
            return results;
        }
        let mut results: Vec<Result<(), DatapathError>> = Vec::with_capacity(peers.len());
        for p in peers {
            let admitted = match state.guard.as_mut() {
                Some(g) => g.admit(p).map_err(DatapathError::from),
                None => Ok(()),
            };
            results.push(admitted);
        }
        let todo: Vec<usize> = (0..peers.len()).filter(|&i| results[i].is_ok()).collect();
        let batch: Vec<Peer> = todo.iter().map(|&i| peers[i]).collect();
        let (parts, entries) = state.split();
        let programmed = parts
            .netlink
            .replace_peers(parts.dev(), entries, &batch)
            .await;
        for (&i, r) in todo.iter().zip(programmed) {
            results[i] = r.map_err(DatapathError::from);
        }
        if let Some(side) = state.v6.as_mut() {
            side.program_all(&state.netlink, peers, &mut results).await;
        }
        if let Some(g) = state.guard.as_mut() {
            let programmed: Vec<Peer> = peers
                .iter()
                .zip(&results)
                .filter(|(_, r)| r.is_ok())
                .map(|(p, _)| *p)
                .collect();
            // Only the peers admitted above: a refused admit added nothing.
            let failed: Vec<Peer> = todo
                .iter()
                .filter(|&&i| results[i].is_err())
                .map(|&i| peers[i])
                .collect();
            if let Err(e) = g.settle(&programmed, &failed) {
                // The first programmed peer reports it (and is retried);
                // the others' entries are in place, and the set is rebuilt
                // from what is programmed at the next recheck.
                if let Some(r) = results.iter_mut().find(|r| r.is_ok()) {
                    *r = Err(e.into());
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.map(|()| PeerKind::Vxlan))
            .collect()
    }

    async fn program(state: &mut State, peer: &Peer) -> Result<PeerKind, DatapathError> {
        let direct = state.direct_routing
            && state
                .netlink
                .route_get(peer.public_ip)
                .await?
                .is_some_and(|hop| hop.is_direct(state.device.underlay_ifindex));
        let was = state.direct.get(&peer.subnet).copied();
        let (parts, entries) = state.split();
        if direct {
            parts
                .netlink
                .replace_direct_route(parts.underlay(), peer.subnet, peer.public_ip)
                .await?;
            if was.is_none() {
                // A vxlan peer before (or a restart): its route is replaced.
                for r in parts
                    .netlink
                    .remove_neighbour_and_fdb(parts.dev(), entries, peer)
                    .await
                {
                    r?;
                }
                info!(
                    "peer {} (PublicIP {}) is on the underlay's segment: direct route",
                    peer.subnet, peer.public_ip
                );
            }
            state.direct.insert(peer.subnet, *peer);
            Ok(PeerKind::Direct)
        } else {
            parts
                .netlink
                .replace_peer(parts.dev(), entries, peer)
                .await?;
            if let Some(old) = was {
                info!(
                    "peer {} (PublicIP {}) is no longer direct: VXLAN",
                    peer.subnet, peer.public_ip
                );
                // Normally gone already: the vxlan route replaced it.
                parts
                    .netlink
                    .delete_direct_route(parts.underlay(), old.subnet, old.public_ip)
                    .await?;
            }
            state.direct.remove(&peer.subnet);
            Ok(PeerKind::Vxlan)
        }
    }
}

/// The parts of [`State`] a peer change reads, borrowed beside its table,
/// which the change updates.
struct Parts<'a> {
    netlink: &'a Netlink,
    device: &'a VxlanDevice,
}

impl Parts<'_> {
    fn dev(&self) -> Device<'_> {
        vxlan_of(self.device)
    }

    fn underlay(&self) -> Device<'_> {
        underlay_of(self.device)
    }
}

/// `flannel.<VNI>` (or `flannel-v6.<VNI>`), for the netlink calls.
fn vxlan_of<A: IpFamily>(device: &VxlanDevice<A>) -> Device<'_> {
    Device {
        ifindex: device.ifindex,
        name: &device.name,
    }
}

/// The underlay NIC below it.
fn underlay_of<A: IpFamily>(device: &VxlanDevice<A>) -> Device<'_> {
    Device {
        ifindex: device.underlay_ifindex,
        name: &device.underlay,
    }
}

impl State {
    /// DirectRouting (or direct routes left from it): each peer's kind is
    /// its own route lookup's answer, so peers go one at a time.
    fn one_at_a_time(&self) -> bool {
        self.direct_routing
            || !self.direct.is_empty()
            || self.v6.as_ref().is_some_and(|s| !s.direct.is_empty())
    }

    fn split(&mut self) -> (Parts<'_>, &mut EntryTable) {
        (
            Parts {
                netlink: &self.netlink,
                device: &self.device,
            },
            &mut self.entries,
        )
    }

    fn dev(&self) -> Device<'_> {
        vxlan_of(&self.device)
    }

    fn underlay(&self) -> Device<'_> {
        underlay_of(&self.device)
    }
}

impl Datapath for KernelDatapath {
    fn mode(&self) -> Mode {
        Mode::Kernel
    }

    async fn setup(&mut self, node: &NodeSpec) -> Result<NodeState, DatapathError> {
        // A second setup keeps the socket and what it knows of direct peers
        // and of IPv6 sides.
        let (netlink, direct, (by_subnet, direct6)) = match self.state.take() {
            Some(state) => (
                state.netlink,
                state.direct,
                state
                    .v6
                    .map(|s| (s.by_subnet, s.direct))
                    .unwrap_or_default(),
            ),
            None => (
                Netlink::connect().map_err(|source| DatapathError::Io {
                    what: "opening an rtnetlink socket".into(),
                    source,
                })?,
                BTreeMap::new(),
                Default::default(),
            ),
        };
        let device = netlink.ensure_vxlan_device(&node.vxlan_device()).await?;
        // Adopted or re-created, the device has what it has: learn it.
        let entries = netlink.learn_entries(vxlan_of(&device)).await?;
        let v6 = match node.vxlan_device6() {
            None => None,
            Some(spec) => {
                let device = netlink.ensure_vxlan_device(&spec).await?;
                let entries = netlink.learn_entries(vxlan_of(&device)).await?;
                Some(Side6 {
                    device,
                    entries,
                    direct_routing: node.direct_routing,
                    direct: direct6,
                    by_subnet,
                    held: Vec::new(),
                })
            }
        };
        let node_state = NodeState {
            device: device.name.clone(),
            ifindex: device.ifindex,
            vtep_mac: device.mac,
            mtu: device.mtu,
            ipv6: v6.as_ref().map(|s| (s.device.name.clone(), s.device.mac)),
        };
        let port = device.port;
        self.state = Some(State {
            netlink,
            device,
            direct_routing: node.direct_routing,
            direct,
            entries,
            port,
            guard: install_guard(port, v6.is_some()),
            v6,
        });
        Ok(node_state)
    }

    async fn add_peer(&mut self, peer: &Peer) -> Result<(), DatapathError> {
        self.add_peer_kind(peer).await.map(|_| ())
    }

    async fn add_peers(&mut self, peers: &[Peer]) -> Vec<Result<(), DatapathError>> {
        self.add_peers_kind(peers)
            .await
            .into_iter()
            .map(|r| r.map(|_| ()))
            .collect()
    }

    /// [`Datapath::remove_peer`] for many: the vxlan entries (and the IPv6
    /// sides) as pipelined batches. With DirectRouting (or direct peers
    /// left from it) one at a time, as `remove_peer`.
    async fn remove_peers(&mut self, peers: &[Peer]) -> Vec<Result<(), DatapathError>> {
        let state = match self.state_mut() {
            Ok(s) => s,
            Err(_) => return peers.iter().map(|_| Err(DatapathError::NotSetUp)).collect(),
        };
        if state.one_at_a_time() {
            let mut results = Vec::with_capacity(peers.len());
            for p in peers {
                results.push(self.remove_peer(p).await);
            }
            return results;
        }
        let (parts, entries) = state.split();
        let mut results: Vec<Result<(), DatapathError>> = parts
            .netlink
            .remove_peers(parts.dev(), entries, peers, true)
            .await
            .into_iter()
            .map(|r| r.map_err(DatapathError::from))
            .collect();
        if let Some(side) = state.v6.as_mut() {
            let held: Vec<(usize, Peer6)> = (0..peers.len())
                .filter_map(|i| Some((i, side.by_subnet.get(&peers[i].subnet).copied()?)))
                .collect();
            let olds: Vec<Peer6> = held.iter().map(|&(_, o)| o).collect();
            let removed = state
                .netlink
                .remove_peers(vxlan_of(&side.device), &mut side.entries, &olds, true)
                .await;
            for (&(i, _), r) in held.iter().zip(removed) {
                match r {
                    Ok(()) => {
                        side.by_subnet.remove(&peers[i].subnet);
                    }
                    // The vxlan side's failure, if any, is reported first.
                    Err(e) => {
                        if results[i].is_ok() {
                            results[i] = Err(e.into());
                        }
                    }
                }
            }
        }
        if let Some(g) = state.guard.as_mut() {
            for (p, r) in peers.iter().zip(results.iter_mut()) {
                if r.is_ok()
                    && let Err(e) = g.release(p)
                {
                    *r = Err(e.into());
                }
            }
        }
        results
    }

    /// Removes both kinds: the vxlan entries, and the direct route through
    /// the peer's PublicIP (and the one this datapath remembers, if its
    /// PublicIP was another).
    async fn remove_peer(&mut self, peer: &Peer) -> Result<(), DatapathError> {
        let state = self.state_mut()?;
        let mut vias = vec![peer.public_ip];
        if let Some(old) = state.direct.get(&peer.subnet) {
            vias.push(old.public_ip);
            vias.dedup();
        }
        let remove_direct = state.direct_routing || state.direct.contains_key(&peer.subnet);
        let (parts, entries) = state.split();
        let vxlan = parts.netlink.remove_peer(parts.dev(), entries, peer).await;
        let mut direct = Ok(());
        if remove_direct {
            for via in vias {
                let r = parts
                    .netlink
                    .delete_direct_route(parts.underlay(), peer.subnet, via)
                    .await;
                direct = direct.and(r);
            }
        }
        let mut v6 = Ok(());
        if let Some(side) = state.v6.as_mut() {
            v6 = side.remove(&state.netlink, peer).await;
        }
        vxlan?;
        direct?;
        v6?;
        state.direct.remove(&peer.subnet);
        if let Some(g) = state.guard.as_mut() {
            g.release(peer)?;
        }
        Ok(())
    }

    /// The vxlan peers whose three entries are there, and the direct peers
    /// whose route is there.
    ///
    /// Reading the device back also relearns its table of neighbours and
    /// FDB entries, so an entry changed behind the agent's back is known by
    /// the next peer event.
    async fn peers(&mut self) -> Result<Vec<Peer>, DatapathError> {
        let state = self.state_mut()?;
        let (programmed, entries) = state.netlink.programmed_peers(state.dev()).await?;
        state.entries = entries;
        let mut peers: Vec<Peer> = programmed.iter().filter_map(ProgrammedPeer::peer).collect();
        // A peer's IPv6 side counts while all three of its entries are on
        // flannel-v6.<VNI>.
        let mut held6: HashSet<Peer6> = HashSet::new();
        if let Some(side) = state.v6.as_mut() {
            let (programmed6, entries6) = state
                .netlink
                .programmed_peers(vxlan_of(&side.device))
                .await?;
            side.entries = entries6;
            held6 = programmed6
                .iter()
                .filter_map(ProgrammedPeer::<Ipv6Addr>::peer)
                .collect();
            side.held = held6.iter().copied().collect();
        }
        if !state.direct.is_empty() {
            let routes: HashSet<_> = state
                .netlink
                .peer_routes(state.underlay())
                .await?
                .into_iter()
                .collect();
            peers.extend(
                state
                    .direct
                    .values()
                    .filter(|p| has_direct_route(&routes, p.subnet, p.public_ip))
                    .copied(),
            );
            peers.sort_by_key(|p| (p.subnet.network(), p.subnet.prefix_len()));
        }
        if let Some(side) = state.v6.as_ref() {
            let routes6: HashSet<(Ipv6Net, Ipv6Addr)> = if side.direct.is_empty() {
                HashSet::new()
            } else {
                state
                    .netlink
                    .peer_routes(underlay_of(&side.device))
                    .await?
                    .into_iter()
                    .collect()
            };
            for p in &mut peers {
                let vxlan = side
                    .by_subnet
                    .get(&p.subnet)
                    .filter(|p6| held6.contains(*p6));
                let direct = side
                    .direct
                    .get(&p.subnet)
                    .filter(|p6| has_direct_route(&routes6, p6.subnet, p6.public_ip));
                p.v6 = vxlan.or(direct).copied();
            }
        }
        // The guard follows what is really programmed: its table and set
        // are loaded again in one transaction (drift repair), and a guard
        // that could not be installed is tried again.
        if state.guard.is_none() {
            state.guard = install_guard(state.port, state.v6.is_some());
        }
        if let Some(g) = state.guard.as_mut() {
            let held: Vec<Ipv6Addr> = held6.iter().map(|p| p.public_ip).collect();
            g.rebuild(&peers, &held)?;
        }
        Ok(peers)
    }

    fn begin_batch(&mut self) {
        if let Some(g) = self.state.as_mut().and_then(|s| s.guard.as_mut()) {
            g.begin_batch();
        }
    }

    async fn end_batch(&mut self) -> Result<(), DatapathError> {
        if let Some(g) = self.state.as_mut().and_then(|s| s.guard.as_mut()) {
            g.end_batch()?;
        }
        Ok(())
    }

    /// Deletes `flannel.<VNI>`; the kernel removes its neighbours, FDB entries
    /// and routes with it. A no-op when not set up.
    async fn teardown(&mut self) -> Result<(), DatapathError> {
        let Some(state) = self.state.take() else {
            return Ok(());
        };
        let mut result = state.netlink.delete_link_by_name(&state.device.name).await;
        if let Some(side) = &state.v6
            && result.is_ok()
        {
            result = state.netlink.delete_link_by_name(&side.device.name).await;
        }
        if let Err(e) = result {
            self.state = Some(state);
            return Err(e.into());
        }
        super::vtep_guard::remove()?;
        Ok(())
    }
}

/// Installs the guard of the VXLAN port, or says why not and carries on:
/// without nft (or nf_tables) the overlay still works as flannel's does, and
/// the eBPF datapath still checks VXLAN arriving on the underlay.
fn install_guard(port: u16, v6: bool) -> Option<VtepGuard> {
    match VtepGuard::install(port, v6) {
        Ok(g) => Some(g),
        Err(e @ GuardError::NftMissing(_)) => {
            warn!(
                "{e}: VXLAN from unknown sources reaches the kernel's vxlan socket (as under flannel)"
            );
            None
        }
        Err(e) => {
            warn!(
                "{}: VXLAN from unknown sources reaches the kernel's vxlan socket until it can be installed",
                DatapathError::from(e).reason()
            );
            None
        }
    }
}
