//! Per-peer kernel entries, in flannel's order:
//! 1. neighbour `<subnet .0> lladdr <VtepMAC> dev flannel.<VNI> nud permanent`
//! 2. FDB `<VtepMAC> dev flannel.<VNI> dst <PublicIP> self permanent`
//! 3. route `<subnet> via <subnet .0> dev flannel.<VNI> onlink`
//!
//! The route comes last because the kernel would otherwise ARP for the gateway.
//!
//! The same three, of the other family, for a dual-stack peer's IPv6 side
//! ([`Peer6`](crate::flannel::lease::Peer6)) on `flannel-v6.<VNI>`:
//! `ip -6 neigh replace <subnet>:: lladdr <v6 VtepMAC> dev flannel-v6.<VNI>
//! nud permanent`, `bridge fdb replace <v6 VtepMAC> dev flannel-v6.<VNI> dst
//! <PublicIPv6> self permanent`, `ip -6 route replace <subnet> via <subnet>::
//! dev flannel-v6.<VNI> onlink`. Every function here is generic over the
//! [`IpFamily`]: the family of the peer (or of the table) picks it.

use std::net::{IpAddr, Ipv4Addr};

use rtnetlink::packet_route::{
    AddressFamily,
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
    route::{RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType},
};

use super::{
    Netlink, NetlinkError,
    entry_table::EntryTable,
    family::{IpFamily, neighbour_address, route_address, route_message, route_to, with_gateway},
};
use crate::flannel::mac::MacAddr;

/// The next hop flannel routes a peer's subnet through: its network address,
/// which is also the address on the peer's `flannel.<VNI>` (`flannel-v6.<VNI>`).
pub fn peer_gateway<A: IpFamily>(subnet: A::Net) -> A {
    A::network(subnet)
}

/// A peer route found on the device, with whatever neighbour and FDB entry
/// back it. `vtep_mac`/`public_ip` are `None` when that entry is missing.
/// `ProgrammedPeer` is `flannel.<VNI>`'s, `ProgrammedPeer<Ipv6Addr>`
/// `flannel-v6.<VNI>`'s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgrammedPeer<A: IpFamily = Ipv4Addr> {
    pub subnet: A::Net,
    pub gateway: A,
    pub vtep_mac: Option<MacAddr>,
    pub public_ip: Option<A>,
}

impl<A: IpFamily> ProgrammedPeer<A> {
    /// The peer ([`Peer`](crate::flannel::lease::Peer) or
    /// [`Peer6`](crate::flannel::lease::Peer6)), if all three entries are
    /// there and the route is flannel's.
    pub fn peer(&self) -> Option<A::Peer> {
        if self.gateway != peer_gateway::<A>(self.subnet) {
            return None;
        }
        Some(A::make_peer(self.subnet, self.public_ip?, self.vtep_mac?))
    }
}

/// Joins routes (subnet via gateway) with the device's neighbours (IP ->
/// MAC) and FDB entries (MAC -> public IP) into peers, sorted by subnet.
pub fn join_entries<A: IpFamily>(
    routes: &[(A::Net, A)],
    entries: &EntryTable<A>,
) -> Vec<ProgrammedPeer<A>> {
    let mut peers: Vec<ProgrammedPeer<A>> = routes
        .iter()
        .map(|&(subnet, gateway)| {
            let vtep_mac = entries.neighbour(gateway);
            let public_ip = vtep_mac.and_then(|mac| entries.fdb_destination(mac));
            ProgrammedPeer {
                subnet,
                gateway,
                vtep_mac,
                public_ip,
            }
        })
        .collect();
    peers.sort_by_key(|p| (A::network(p.subnet), A::prefix_len(p.subnet)));
    peers
}

/// The device the entries live on.
#[derive(Clone, Copy, Debug)]
pub struct Device<'a> {
    pub ifindex: u32,
    pub name: &'a str,
}

impl Netlink {
    /// Programs (or updates) a peer: neighbour, FDB entry, route, all with
    /// replace semantics, then removes FDB entries the update made stale.
    /// When a step fails, the entries made by the earlier steps are removed
    /// again, as flannel does. `entries` is the device's table: it answers
    /// what the neighbour had before and what is stale (no dump), and
    /// records every change the kernel accepted. Three requests, plus one
    /// per stale entry: a batch of one ([`Netlink::replace_peers`]).
    pub async fn replace_peer<A: IpFamily>(
        &self,
        dev: Device<'_>,
        entries: &mut EntryTable<A>,
        peer: &A::Peer,
    ) -> Result<(), NetlinkError> {
        one(self
            .replace_peers(dev, entries, std::slice::from_ref(peer))
            .await)
    }

    /// Removes a peer's neighbour, FDB entry and route. Missing entries are not
    /// an error; every removal is attempted and the first failure is returned.
    /// The FDB entry is removed for the peer's MAC and for the MAC the kernel's
    /// neighbour actually held, unless another neighbour still uses it.
    pub async fn remove_peer<A: IpFamily>(
        &self,
        dev: Device<'_>,
        entries: &mut EntryTable<A>,
        peer: &A::Peer,
    ) -> Result<(), NetlinkError> {
        one(self
            .remove_peers(dev, entries, std::slice::from_ref(peer), true)
            .await)
    }

    /// The neighbour and FDB part of [`Netlink::remove_peer`], leaving the
    /// route: what is left of a peer whose vxlan route a direct route has
    /// replaced. Every removal is attempted; the result (one, the first
    /// failure) is returned in a list, as a batch of one. `entries` (the
    /// device's table) says which MAC the neighbour held and whether
    /// another neighbour uses it, and records what was removed.
    pub async fn remove_neighbour_and_fdb<A: IpFamily>(
        &self,
        dev: Device<'_>,
        entries: &mut EntryTable<A>,
        peer: &A::Peer,
    ) -> Vec<Result<(), NetlinkError>> {
        self.remove_peers(dev, entries, std::slice::from_ref(peer), false)
            .await
    }

    /// The device's neighbours and FDB entries, one dump each: the table
    /// peer events then keep up to date.
    pub async fn learn_entries<A: IpFamily>(
        &self,
        dev: Device<'_>,
    ) -> Result<EntryTable<A>, NetlinkError> {
        let neighbours = self.neighbours(dev).await?;
        let fdb = self.fdb_entries(dev).await?;
        Ok(EntryTable::from_dump(&neighbours, &fdb))
    }

    /// Peers as the kernel has them: every route through the device with a
    /// gateway, joined with the device's permanent neighbours and FDB
    /// entries; and the table those entries make (one dump of each).
    pub async fn programmed_peers<A: IpFamily>(
        &self,
        dev: Device<'_>,
    ) -> Result<(Vec<ProgrammedPeer<A>>, EntryTable<A>), NetlinkError> {
        let routes = self.peer_routes(dev).await?;
        let entries = self.learn_entries(dev).await?;
        Ok((join_entries(&routes, &entries), entries))
    }

    /// `ip neigh replace <ip> lladdr <mac> dev <dev> nud permanent`.
    pub async fn replace_neighbour<A: IpFamily>(
        &self,
        dev: Device<'_>,
        ip: A,
        mac: MacAddr,
    ) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add(dev.ifindex, ip.into())
            .kind(RouteType::Unicast)
            .state(NeighbourState::Permanent)
            .link_layer_address(&mac.0)
            .replace()
            .execute()
            .await
            .map_err(|e| {
                NetlinkError::new(
                    format!("replace neighbour {ip} lladdr {mac} dev {}", dev.name),
                    e,
                )
            })
    }

    /// `bridge fdb replace <mac> dev <dev> dst <ip> self permanent`. For a MAC
    /// already in the FDB, replace changes its destination (the vxlan driver
    /// replaces the entry's first remote).
    pub async fn replace_fdb<A: IpFamily>(
        &self,
        dev: Device<'_>,
        mac: MacAddr,
        dst: A,
    ) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add_bridge(dev.ifindex, &mac.0)
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .destination(dst.into())
            .replace()
            .execute()
            .await
            .map_err(|e| {
                NetlinkError::new(
                    format!("replace FDB entry {mac} dst {dst} dev {}", dev.name),
                    e,
                )
            })
    }

    /// `ip route replace <subnet> via <gateway> dev <dev> onlink` (protocol
    /// `boot`, as flannel's netlink library sends it).
    pub async fn replace_route<A: IpFamily>(
        &self,
        dev: Device<'_>,
        subnet: A::Net,
        gateway: A,
    ) -> Result<(), NetlinkError> {
        self.replace_gateway_route(dev, subnet, gateway, true).await
    }

    /// `ip route replace <subnet> via <gateway> dev <dev> [onlink]`, protocol
    /// `boot`: the vxlan route (onlink, via the peer's device address) and
    /// DirectRouting's route (via the peer's PublicIP on the underlay).
    pub(super) async fn replace_gateway_route<A: IpFamily>(
        &self,
        dev: Device<'_>,
        subnet: A::Net,
        gateway: A,
        onlink: bool,
    ) -> Result<(), NetlinkError> {
        let mut builder =
            with_gateway(route_to::<A>(subnet), gateway).output_interface(dev.ifindex);
        if onlink {
            builder = builder.onlink();
        }
        let msg = builder
            .protocol(RouteProtocol::Boot)
            .scope(RouteScope::Universe)
            .build();
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| {
                NetlinkError::new(
                    format!(
                        "replace route {}/{} via {gateway} dev {}{}",
                        A::network(subnet),
                        A::prefix_len(subnet),
                        dev.name,
                        if onlink { " onlink" } else { "" }
                    ),
                    e,
                )
            })
    }

    /// `ip neigh del <ip> dev <dev>`; absent is fine.
    pub async fn delete_neighbour<A: IpFamily>(
        &self,
        dev: Device<'_>,
        ip: A,
    ) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = A::FAMILY;
        msg.header.ifindex = dev.ifindex;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::from(
                Into::<IpAddr>::into(ip),
            )));
        ignore_not_found(
            self.handle
                .neighbours()
                .del(msg)
                .execute()
                .await
                .map_err(|e| {
                    NetlinkError::new(format!("delete neighbour {ip} dev {}", dev.name), e)
                }),
        )
    }

    /// `bridge fdb del <mac> dev <dev> [dst <ip>] self`; without `dst` the whole
    /// entry for the MAC goes. Absent is fine.
    pub async fn delete_fdb<A: IpFamily>(
        &self,
        dev: Device<'_>,
        mac: MacAddr,
        dst: Option<A>,
    ) -> Result<(), NetlinkError> {
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
        let shown = dst.map_or_else(String::new, |d| format!(" dst {d}"));
        ignore_not_found(
            self.handle
                .neighbours()
                .del(msg)
                .execute()
                .await
                .map_err(|e| {
                    NetlinkError::new(format!("delete FDB entry {mac}{shown} dev {}", dev.name), e)
                }),
        )
    }

    /// `ip route del <subnet> dev <dev>`; absent is fine.
    pub async fn delete_route<A: IpFamily>(
        &self,
        dev: Device<'_>,
        subnet: A::Net,
    ) -> Result<(), NetlinkError> {
        // Scope "nowhere" and protocol 0 match any route for the prefix on the device.
        let msg = route_to::<A>(subnet)
            .output_interface(dev.ifindex)
            .protocol(RouteProtocol::Unspec)
            .scope(RouteScope::NoWhere)
            .build();
        ignore_not_found(self.handle.route().del(msg).execute().await.map_err(|e| {
            NetlinkError::new(
                format!(
                    "delete route {}/{} dev {}",
                    A::network(subnet),
                    A::prefix_len(subnet),
                    dev.name
                ),
                e,
            )
        }))
    }

    /// Permanent neighbours of family `A` on the device.
    pub async fn neighbours<A: IpFamily>(
        &self,
        dev: Device<'_>,
    ) -> Result<Vec<(A, MacAddr)>, NetlinkError> {
        let req = self.handle.neighbours().get().set_address_family(A::FAMILY);
        let all: Vec<NeighbourMessage> =
            Netlink::collect(req.execute(), || format!("list neighbours of {}", dev.name)).await?;
        Ok(all
            .iter()
            .filter(|n| {
                n.header.ifindex == dev.ifindex && n.header.state == NeighbourState::Permanent
            })
            .filter_map(|n| Some((neighbour_ip(n)?, neighbour_mac(n)?)))
            .collect())
    }

    /// Unicast FDB entries with a destination of family `A` on the device
    /// (MAC -> dst).
    pub async fn fdb_entries<A: IpFamily>(
        &self,
        dev: Device<'_>,
    ) -> Result<Vec<(MacAddr, A)>, NetlinkError> {
        let req = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge);
        let all: Vec<NeighbourMessage> =
            Netlink::collect(req.execute(), || format!("list FDB of {}", dev.name)).await?;
        Ok(all
            .iter()
            .filter(|n| n.header.ifindex == dev.ifindex)
            .filter_map(|n| Some((neighbour_mac(n)?, neighbour_ip(n)?)))
            .filter(|(mac, _)| mac.0 != [0; 6] && mac.0[0] & 1 == 0)
            .collect())
    }

    /// Routes of family `A` in the main table leaving through the device via
    /// a gateway.
    pub async fn peer_routes<A: IpFamily>(
        &self,
        dev: Device<'_>,
    ) -> Result<Vec<(A::Net, A)>, NetlinkError> {
        let req = self.handle.route().get(route_message::<A>().build());
        let all: Vec<RouteMessage> =
            Netlink::collect(req.execute(), || format!("list routes of {}", dev.name)).await?;
        Ok(all
            .iter()
            .filter_map(|r| route_via(r, dev.ifindex))
            .collect())
    }
}

/// The result of a batch of one.
fn one(mut results: Vec<Result<(), NetlinkError>>) -> Result<(), NetlinkError> {
    results.pop().unwrap_or(Ok(()))
}

fn ignore_not_found(result: Result<(), NetlinkError>) -> Result<(), NetlinkError> {
    match result {
        Err(e) if e.is_not_found() => Ok(()),
        other => other,
    }
}

fn neighbour_ip<A: IpFamily>(n: &NeighbourMessage) -> Option<A> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(addr) => A::from_ip(neighbour_address(addr)?),
        _ => None,
    })
}

fn neighbour_mac(n: &NeighbourMessage) -> Option<MacAddr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(bytes) => {
            <[u8; 6]>::try_from(&bytes[..]).ok().map(MacAddr)
        }
        _ => None,
    })
}

fn route_via<A: IpFamily>(r: &RouteMessage, ifindex: u32) -> Option<(A::Net, A)> {
    let table = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table));
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) || r.header.kind != RouteType::Unicast {
        return None;
    }
    let mut oif = None;
    // No destination attribute: the default route.
    let mut dst = None;
    let mut gateway = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Destination(addr) => dst = route_address(addr).and_then(A::from_ip),
            RouteAttribute::Gateway(addr) => gateway = route_address(addr).and_then(A::from_ip),
            _ => {}
        }
    }
    if oif != Some(ifindex) {
        return None;
    }
    let subnet = A::net(
        dst.unwrap_or(A::UNSPECIFIED),
        r.header.destination_prefix_length,
    )?;
    Some((subnet, gateway?))
}

#[cfg(test)]
mod tests {
    use ipnet::Ipv4Net;

    use super::*;
    use crate::flannel::lease::Peer;

    fn mac(last: u8) -> MacAddr {
        MacAddr([0x02, 0, 0, 0, 0, last])
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn gateway_is_the_subnet_network_address() {
        assert_eq!(
            peer_gateway::<Ipv4Addr>(net("10.5.52.0/24")),
            ip("10.5.52.0")
        );
        assert_eq!(
            peer_gateway::<Ipv4Addr>(net("10.5.52.9/24")),
            ip("10.5.52.0")
        );
    }

    #[test]
    fn joins_complete_and_partial_peers() {
        let routes = [
            (net("10.5.53.0/24"), ip("10.5.53.0")),
            (net("10.5.52.0/24"), ip("10.5.52.0")),
            (net("10.5.54.0/24"), ip("10.5.54.0")),
            (net("10.5.55.0/24"), ip("10.5.55.0")),
        ];
        let neighbours = [
            (ip("10.5.52.0"), mac(2)),
            (ip("10.5.53.0"), mac(3)),
            (ip("10.5.54.0"), mac(4)),
        ];
        let fdb = [(mac(2), ip("192.168.1.2")), (mac(3), ip("192.168.1.3"))];
        let peers = join_entries(&routes, &EntryTable::from_dump(&neighbours, &fdb));
        let subnets: Vec<_> = peers.iter().map(|p| p.subnet).collect();
        assert_eq!(
            subnets,
            [
                net("10.5.52.0/24"),
                net("10.5.53.0/24"),
                net("10.5.54.0/24"),
                net("10.5.55.0/24")
            ]
        );
        assert_eq!(
            peers[0].peer(),
            Some(Peer {
                subnet: net("10.5.52.0/24"),
                public_ip: ip("192.168.1.2"),
                vtep_mac: mac(2),
                v6: None,
            })
        );
        assert!(peers[1].peer().is_some());
        // No FDB entry for the neighbour's MAC, no neighbour at all.
        assert_eq!(peers[2].vtep_mac, Some(mac(4)));
        assert_eq!(peers[2].public_ip, None);
        assert_eq!(peers[2].peer(), None);
        assert_eq!(peers[3].vtep_mac, None);
        assert_eq!(peers[3].peer(), None);
    }

    #[test]
    fn a_route_via_another_gateway_is_not_a_flannel_peer() {
        let p = ProgrammedPeer {
            subnet: net("10.5.52.0/24"),
            gateway: ip("10.5.52.1"),
            vtep_mac: Some(mac(2)),
            public_ip: Some(ip("192.168.1.2")),
        };
        assert_eq!(p.peer(), None);
    }
}
