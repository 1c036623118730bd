//! Peers' entries programmed and removed many at a time, through the
//! pipelined socket ([`super::pipeline`]): one write per step for a whole
//! batch of peers instead of a round trip per entry, with each failure
//! mapped back to the peer whose request it answered.
//!
//! A batch keeps flannel's order per peer ([`super::peer_entries`]): every
//! peer's neighbour first, then the FDB entries of the peers whose
//! neighbour went in, then the routes of those whose FDB entry went in. A
//! peer that fails a step gets no later step, and what its earlier steps
//! made is removed again, exactly as one peer alone; the other peers of the
//! batch are not touched by its failure. The IPv4 and IPv6 devices share
//! this code through [`IpFamily`].
//!
//! Two peers of one batch never share a gateway (one would overwrite the
//! other's neighbour, and the table's "what did it have before" would be
//! wrong for the second): such a peer waits for a second round.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
};

use log::{info, warn};
use rtnetlink::{
    packet_core::{ErrorMessage, NLM_F_CREATE, NLM_F_REPLACE},
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
        },
        route::{RouteProtocol, RouteScope, RouteType},
    },
};

use super::{
    Netlink, NetlinkError,
    entry_table::EntryTable,
    family::{IpFamily, route_to, with_gateway},
    peer_entries::{Device, peer_gateway},
    pipeline::{Answer, Request},
};
use crate::flannel::mac::MacAddr;

/// One peer of a batch, taken apart.
#[derive(Clone, Copy)]
struct Parts<A: IpFamily> {
    subnet: A::Net,
    public_ip: A,
    vtep_mac: MacAddr,
    gateway: A,
}

impl<A: IpFamily> Parts<A> {
    fn of(peer: &A::Peer) -> Self {
        let (subnet, public_ip, vtep_mac) = A::peer_parts(peer);
        Self {
            subnet,
            public_ip,
            vtep_mac,
            gateway: peer_gateway::<A>(subnet),
        }
    }
}

/// A result per peer of a batch, filled in as the steps answer.
struct Results(Vec<Option<Result<(), NetlinkError>>>);

impl Results {
    fn new(n: usize) -> Self {
        Self((0..n).map(|_| None).collect())
    }

    /// The peer's first failure is what it reports.
    fn fail(&mut self, i: usize, e: NetlinkError) {
        if !matches!(self.0[i], Some(Err(_))) {
            self.0[i] = Some(Err(e));
        }
    }

    fn succeed(&mut self, i: usize) {
        self.0[i].get_or_insert(Ok(()));
    }

    fn into_vec(self) -> Vec<Result<(), NetlinkError>> {
        self.0.into_iter().map(|r| r.unwrap_or(Ok(()))).collect()
    }
}

/// The peers' indexes in rounds in which no gateway repeats, in order.
fn rounds<A: IpFamily>(parts: &[Parts<A>]) -> Vec<Vec<usize>> {
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    let mut seen: Vec<HashSet<A>> = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        // The first round after the last one this gateway is in: order
        // between the peers of one gateway is kept.
        let r = seen
            .iter()
            .rposition(|s| s.contains(&p.gateway))
            .map_or(0, |r| r + 1);
        if r == rounds.len() {
            rounds.push(Vec::new());
            seen.push(HashSet::new());
        }
        rounds[r].push(i);
        seen[r].insert(p.gateway);
    }
    rounds
}

impl Netlink {
    /// [`Netlink::replace_peer`] for many peers at once: one result per
    /// peer, in order. A peer whose step fails has its earlier steps undone
    /// and reports that step's error; the others are programmed all the
    /// same. Three writes (and one per round of repeated gateways), plus
    /// one for undoing failures and one for stale FDB entries.
    pub async fn replace_peers<A: IpFamily>(
        &self,
        dev: Device<'_>,
        entries: &mut EntryTable<A>,
        peers: &[A::Peer],
    ) -> Vec<Result<(), NetlinkError>> {
        let parts: Vec<Parts<A>> = peers.iter().map(Parts::of).collect();
        let mut results = Results::new(peers.len());
        for round in rounds(&parts) {
            self.replace_round(dev, entries, peers, &parts, &round, &mut results)
                .await;
        }
        results.into_vec()
    }

    async fn replace_round<A: IpFamily>(
        &self,
        dev: Device<'_>,
        entries: &mut EntryTable<A>,
        peers: &[A::Peer],
        parts: &[Parts<A>],
        round: &[usize],
        results: &mut Results,
    ) {
        let old_macs: Vec<Option<MacAddr>> = round
            .iter()
            .map(|&i| entries.neighbour(parts[i].gateway))
            .collect();

        // 1. Neighbours.
        let reqs = round
            .iter()
            .map(|&i| replace_neighbour_request(dev, parts[i].gateway, parts[i].vtep_mac))
            .collect();
        let mut fdb_todo = Vec::new();
        for (&i, answer) in round.iter().zip(self.pipelined(reqs).await) {
            let p = parts[i];
            match answer.outcome {
                Ok(()) => {
                    entries.set_neighbour(p.gateway, p.vtep_mac);
                    fdb_todo.push(i);
                }
                Err(e) => results.fail(
                    i,
                    error(
                        format!(
                            "replace neighbour {} lladdr {} dev {}",
                            p.gateway, p.vtep_mac, dev.name
                        ),
                        e,
                    ),
                ),
            }
        }

        // 2. FDB entries.
        let reqs = fdb_todo
            .iter()
            .map(|&i| replace_fdb_request(dev, parts[i].vtep_mac, parts[i].public_ip))
            .collect();
        let mut route_todo = Vec::new();
        let mut undo_neighbours = Vec::new();
        for (&i, answer) in fdb_todo.iter().zip(self.pipelined(reqs).await) {
            let p = parts[i];
            match answer.outcome {
                Ok(()) => {
                    entries.replace_fdb(p.vtep_mac, p.public_ip);
                    route_todo.push(i);
                }
                Err(e) => {
                    results.fail(
                        i,
                        error(
                            format!(
                                "replace FDB entry {} dst {} dev {}",
                                p.vtep_mac, p.public_ip, dev.name
                            ),
                            e,
                        ),
                    );
                    undo_neighbours.push(i);
                }
            }
        }

        // 3. Routes.
        let reqs = route_todo
            .iter()
            .map(|&i| replace_route_request(dev, parts[i].subnet, parts[i].gateway))
            .collect();
        let mut done = Vec::new();
        let mut undo_fdb = Vec::new();
        for (&i, answer) in route_todo.iter().zip(self.pipelined(reqs).await) {
            let p = parts[i];
            match answer.outcome {
                Ok(()) => done.push(i),
                Err(e) => {
                    results.fail(
                        i,
                        error(
                            format!(
                                "replace route {}/{} via {} dev {} onlink",
                                A::network(p.subnet),
                                A::prefix_len(p.subnet),
                                p.gateway,
                                dev.name
                            ),
                            e,
                        ),
                    );
                    undo_neighbours.push(i);
                    undo_fdb.push(i);
                }
            }
        }

        // What the failed peers' earlier steps made goes again.
        if !undo_neighbours.is_empty() {
            self.undo(dev, entries, parts, &undo_neighbours, &undo_fdb)
                .await;
        }

        // 4. FDB entries the updates left stale: each is charged to the
        // first peer whose update left it (its entries are in place, but it
        // reports the failure and is retried, as one peer alone).
        let by_index: BTreeMap<usize, Option<MacAddr>> =
            round.iter().copied().zip(old_macs).collect();
        let mut stale: BTreeMap<MacAddr, usize> = BTreeMap::new();
        for &i in &done {
            for mac in entries.stale_fdb_macs(&peers[i], by_index[&i]) {
                if let std::collections::btree_map::Entry::Vacant(slot) = stale.entry(mac) {
                    info!(
                        "{}: removing stale FDB entry {mac} (peer {} now uses {})",
                        dev.name, parts[i].subnet, parts[i].vtep_mac
                    );
                    slot.insert(i);
                }
            }
        }
        let stale: Vec<(MacAddr, usize)> = stale.into_iter().collect();
        let reqs = stale
            .iter()
            .map(|&(mac, _)| delete_fdb_request::<A>(dev, mac, None))
            .collect();
        for (&(mac, owner), answer) in stale.iter().zip(self.pipelined(reqs).await) {
            match deleted(answer, || {
                format!("delete FDB entry {mac} dev {}", dev.name)
            }) {
                Ok(()) => entries.remove_fdb(mac, None),
                Err(e) => results.fail(owner, e),
            }
        }
        for i in done {
            results.succeed(i);
        }
    }

    /// Removes the neighbours of `neighbours` and, unless another neighbour
    /// uses the MAC, the FDB remote of `fdb` that a failed replace left.
    /// Failures are logged: the peer already reports its own error.
    async fn undo<A: IpFamily>(
        &self,
        dev: Device<'_>,
        entries: &mut EntryTable<A>,
        parts: &[Parts<A>],
        neighbours: &[usize],
        fdb: &[usize],
    ) {
        let reqs = neighbours
            .iter()
            .map(|&i| delete_neighbour_request(dev, parts[i].gateway))
            .collect();
        for (&i, answer) in neighbours.iter().zip(self.pipelined(reqs).await) {
            let gw = parts[i].gateway;
            match deleted(answer, || format!("delete neighbour {gw} dev {}", dev.name)) {
                Ok(()) => entries.remove_neighbour(gw),
                Err(e) => warn!("cleanup after a failed peer update: {e}"),
            }
        }
        // Another peer's neighbour may share the MAC: its entry stays.
        let undo: Vec<usize> = fdb
            .iter()
            .copied()
            .filter(|&i| !entries.used_by_other(parts[i].vtep_mac, parts[i].gateway))
            .collect();
        let reqs = undo
            .iter()
            .map(|&i| delete_fdb_request(dev, parts[i].vtep_mac, Some(parts[i].public_ip)))
            .collect();
        for (&i, answer) in undo.iter().zip(self.pipelined(reqs).await) {
            let p = parts[i];
            let op = || {
                format!(
                    "delete FDB entry {} dst {} dev {}",
                    p.vtep_mac, p.public_ip, dev.name
                )
            };
            match deleted(answer, op) {
                Ok(()) => entries.remove_fdb(p.vtep_mac, Some(p.public_ip)),
                Err(e) => warn!("cleanup after a failed peer update: {e}"),
            }
        }
    }

    /// [`Netlink::remove_peer`] (with `route`) or
    /// [`Netlink::remove_neighbour_and_fdb`] (without) for many peers at
    /// once: every removal is attempted, and each peer reports the first of
    /// its removals that failed. Neighbours go first, so that a MAC two
    /// removed peers shared is seen unused by the second and its FDB entry
    /// goes, as when they are removed one after the other.
    pub async fn remove_peers<A: IpFamily>(
        &self,
        dev: Device<'_>,
        entries: &mut EntryTable<A>,
        peers: &[A::Peer],
        route: bool,
    ) -> Vec<Result<(), NetlinkError>> {
        let parts: Vec<Parts<A>> = peers.iter().map(Parts::of).collect();
        let mut results = Results::new(peers.len());
        for round in rounds(&parts) {
            // The MAC each neighbour held, before it goes.
            let held: Vec<Option<MacAddr>> = round
                .iter()
                .map(|&i| entries.neighbour(parts[i].gateway))
                .collect();
            let reqs = round
                .iter()
                .map(|&i| delete_neighbour_request(dev, parts[i].gateway))
                .collect();
            for (&i, answer) in round.iter().zip(self.pipelined(reqs).await) {
                let gw = parts[i].gateway;
                match deleted(answer, || format!("delete neighbour {gw} dev {}", dev.name)) {
                    Ok(()) => entries.remove_neighbour(gw),
                    Err(e) => results.fail(i, e),
                }
            }
            // Each MAC once, charged to the first peer that names it.
            let mut macs: BTreeMap<MacAddr, usize> = BTreeMap::new();
            for (&i, kernel_mac) in round.iter().zip(held) {
                let p = parts[i];
                for mac in [Some(p.vtep_mac), kernel_mac].into_iter().flatten() {
                    if !entries.used_by_other(mac, p.gateway) {
                        macs.entry(mac).or_insert(i);
                    }
                }
            }
            let macs: Vec<(MacAddr, usize)> = macs.into_iter().collect();
            let reqs = macs
                .iter()
                .map(|&(mac, _)| delete_fdb_request::<A>(dev, mac, None))
                .collect();
            for (&(mac, owner), answer) in macs.iter().zip(self.pipelined(reqs).await) {
                match deleted(answer, || {
                    format!("delete FDB entry {mac} dev {}", dev.name)
                }) {
                    Ok(()) => entries.remove_fdb(mac, None),
                    Err(e) => results.fail(owner, e),
                }
            }
            if route {
                let reqs = round
                    .iter()
                    .map(|&i| delete_route_request::<A>(dev, parts[i].subnet))
                    .collect();
                for (&i, answer) in round.iter().zip(self.pipelined(reqs).await) {
                    let s = parts[i].subnet;
                    let op = || {
                        format!(
                            "delete route {}/{} dev {}",
                            A::network(s),
                            A::prefix_len(s),
                            dev.name
                        )
                    };
                    if let Err(e) = deleted(answer, op) {
                        results.fail(i, e);
                    }
                }
            }
            for &i in &round {
                results.succeed(i);
            }
        }
        results.into_vec()
    }
}

fn error(op: String, e: ErrorMessage) -> NetlinkError {
    NetlinkError::new(op, rtnetlink::Error::NetlinkError(e))
}

/// A deletion's answer: absent is fine (deletions are idempotent).
fn deleted(answer: Answer, op: impl FnOnce() -> String) -> Result<(), NetlinkError> {
    match answer.outcome {
        Ok(()) => Ok(()),
        Err(e) => {
            let err = error(op(), e);
            if err.is_not_found() { Ok(()) } else { Err(err) }
        }
    }
}

/// `ip neigh replace <ip> lladdr <mac> dev <dev> nud permanent`.
pub(super) fn replace_neighbour_request<A: IpFamily>(
    dev: Device<'_>,
    ip: A,
    mac: MacAddr,
) -> Request {
    let mut msg = NeighbourMessage::default();
    msg.header.family = A::FAMILY;
    msg.header.ifindex = dev.ifindex;
    msg.header.state = NeighbourState::Permanent;
    msg.header.kind = RouteType::Unicast;
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::from(
            Into::<IpAddr>::into(ip),
        )));
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    Request::new(
        RouteNetlinkMessage::NewNeighbour(msg),
        NLM_F_REPLACE | NLM_F_CREATE,
    )
}

/// `bridge fdb replace <mac> dev <dev> dst <ip> self permanent`.
pub(super) fn replace_fdb_request<A: IpFamily>(dev: Device<'_>, mac: MacAddr, dst: A) -> Request {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = dev.ifindex;
    msg.header.state = NeighbourState::Permanent;
    msg.header.kind = RouteType::Unspec;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::from(
            Into::<IpAddr>::into(dst),
        )));
    Request::new(
        RouteNetlinkMessage::NewNeighbour(msg),
        NLM_F_REPLACE | NLM_F_CREATE,
    )
}

/// `ip route replace <subnet> via <gateway> dev <dev> onlink`, protocol
/// `boot` (as [`Netlink::replace_route`]).
pub(super) fn replace_route_request<A: IpFamily>(
    dev: Device<'_>,
    subnet: A::Net,
    gateway: A,
) -> Request {
    let msg = with_gateway(route_to::<A>(subnet), gateway)
        .output_interface(dev.ifindex)
        .onlink()
        .protocol(RouteProtocol::Boot)
        .scope(RouteScope::Universe)
        .build();
    Request::new(
        RouteNetlinkMessage::NewRoute(msg),
        NLM_F_REPLACE | NLM_F_CREATE,
    )
}

/// `ip neigh del <ip> dev <dev>`.
pub(super) fn delete_neighbour_request<A: IpFamily>(dev: Device<'_>, ip: A) -> Request {
    let mut msg = NeighbourMessage::default();
    msg.header.family = A::FAMILY;
    msg.header.ifindex = dev.ifindex;
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::from(
            Into::<IpAddr>::into(ip),
        )));
    Request::new(RouteNetlinkMessage::DelNeighbour(msg), 0)
}

/// `bridge fdb del <mac> dev <dev> [dst <ip>] self`.
pub(super) fn delete_fdb_request<A: IpFamily>(
    dev: Device<'_>,
    mac: MacAddr,
    dst: Option<A>,
) -> Request {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = dev.ifindex;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    if let Some(dst) = dst {
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::from(
                Into::<IpAddr>::into(dst),
            )));
    }
    Request::new(RouteNetlinkMessage::DelNeighbour(msg), 0)
}

/// `ip route del <subnet> dev <dev>`: scope "nowhere" and protocol 0 match
/// any route for the prefix on the device.
pub(super) fn delete_route_request<A: IpFamily>(dev: Device<'_>, subnet: A::Net) -> Request {
    let msg = route_to::<A>(subnet)
        .output_interface(dev.ifindex)
        .protocol(RouteProtocol::Unspec)
        .scope(RouteScope::NoWhere)
        .build();
    Request::new(RouteNetlinkMessage::DelRoute(msg), 0)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn parts(gw: [u8; 4]) -> Parts<Ipv4Addr> {
        let gateway = Ipv4Addr::from(gw);
        Parts {
            subnet: ipnet::Ipv4Net::new(gateway, 24).unwrap(),
            public_ip: Ipv4Addr::new(192, 168, 1, gw[2]),
            vtep_mac: MacAddr([2, 0, 0, 0, 0, gw[2]]),
            gateway,
        }
    }

    #[test]
    fn distinct_gateways_make_one_round() {
        let p = [
            parts([10, 5, 1, 0]),
            parts([10, 5, 2, 0]),
            parts([10, 5, 3, 0]),
        ];
        assert_eq!(rounds(&p), vec![vec![0, 1, 2]]);
        assert!(rounds::<Ipv4Addr>(&[]).is_empty());
    }

    #[test]
    fn a_repeated_gateway_waits_for_the_next_round_in_order() {
        let p = [
            parts([10, 5, 1, 0]),
            parts([10, 5, 2, 0]),
            parts([10, 5, 1, 0]),
            parts([10, 5, 3, 0]),
            parts([10, 5, 1, 0]),
        ];
        assert_eq!(rounds(&p), vec![vec![0, 1, 3], vec![2], vec![4]]);
    }

    #[test]
    fn a_peer_reports_its_first_failure() {
        let mut r = Results::new(3);
        let e = |op: &str| error(op.into(), ErrorMessage::default());
        r.fail(0, e("first"));
        r.fail(0, e("second"));
        r.succeed(0);
        r.succeed(1);
        let v = r.into_vec();
        assert_eq!(v[0].as_ref().unwrap_err().op, "first");
        assert!(v[1].is_ok());
        assert!(v[2].is_ok());
    }
}
