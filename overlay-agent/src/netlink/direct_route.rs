//! flannel's `Backend.DirectRouting`: a peer whose `PublicIP` the underlay
//! reaches without a gateway (the same L2 segment) gets a plain route
//! `<subnet> via <PublicIP> dev <underlay>` instead of the neighbour, FDB
//! entry and vxlan route of [`super::peer_entries`].

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::route::{
        RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
    },
};

use super::{Netlink, NetlinkError, peer_entries::Device};

/// What `ip route get <ip>` answers, as far as directness needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteHop {
    pub kind: RouteType,
    pub oif: Option<u32>,
    pub gateway: Option<Ipv4Addr>,
}

impl RouteHop {
    /// flannel's rule (one route, no gateway), and the route must leave
    /// through the underlay: a direct route names the underlay as its device,
    /// which the kernel refuses for a next hop it reaches elsewhere.
    pub fn is_direct(&self, underlay_ifindex: u32) -> bool {
        self.kind == RouteType::Unicast
            && self.gateway.is_none()
            && self.oif == Some(underlay_ifindex)
    }
}

fn hop(r: &RouteMessage) -> RouteHop {
    let mut hop = RouteHop {
        kind: r.header.kind,
        oif: None,
        gateway: None,
    };
    for a in &r.attributes {
        match a {
            RouteAttribute::Oif(i) => hop.oif = Some(*i),
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => hop.gateway = Some(*ip),
            _ => {}
        }
    }
    hop
}

impl Netlink {
    /// `ip route get <ip>` (one RTM_GETROUTE, no dump). `None` when the kernel
    /// has no route to it.
    pub async fn route_get(&self, ip: Ipv4Addr) -> Result<Option<RouteHop>, NetlinkError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(ip, 32)
            .build();
        let req = self.handle.route().get(msg);
        match Netlink::collect::<RouteMessage>(req.execute(), || format!("route get {ip}")).await {
            Ok(routes) => Ok(routes.first().map(hop)),
            // ENETUNREACH / EHOSTUNREACH: no route at all, so not direct.
            Err(e) if e.is_unreachable() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `ip route replace <subnet> via <via> dev <underlay>` (protocol `boot`,
    /// as flannel's netlink library sends it). It replaces a vxlan route for
    /// the same subnet in place, and the other way round.
    pub async fn replace_direct_route(
        &self,
        underlay: Device<'_>,
        subnet: Ipv4Net,
        via: Ipv4Addr,
    ) -> Result<(), NetlinkError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(subnet.network(), subnet.prefix_len())
            .gateway(via)
            .output_interface(underlay.ifindex)
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
                        "replace route {} via {via} dev {}",
                        subnet.trunc(),
                        underlay.name
                    ),
                    e,
                )
            })
    }

    /// `ip route del <subnet> via <via> dev <underlay>`; absent is fine. The
    /// gateway is named so that no other route of the underlay for the
    /// prefix is touched.
    pub async fn delete_direct_route(
        &self,
        underlay: Device<'_>,
        subnet: Ipv4Net,
        via: Ipv4Addr,
    ) -> Result<(), NetlinkError> {
        let mut msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(subnet.network(), subnet.prefix_len())
            .output_interface(underlay.ifindex)
            .protocol(RouteProtocol::Unspec)
            .scope(RouteScope::NoWhere)
            .build();
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(via)));
        let result = self.handle.route().del(msg).execute().await.map_err(|e| {
            NetlinkError::new(
                format!(
                    "delete route {} via {via} dev {}",
                    subnet.trunc(),
                    underlay.name
                ),
                e,
            )
        });
        match result {
            Err(e) if e.is_not_found() => Ok(()),
            other => other,
        }
    }
}

/// Whether `routes` (an underlay's `(subnet, gateway)` routes, as
/// [`Netlink::peer_routes`] lists them) hold the direct route for `subnet`.
pub fn has_direct_route(routes: &[(Ipv4Net, Ipv4Addr)], subnet: Ipv4Net, via: Ipv4Addr) -> bool {
    routes.iter().any(|&(s, g)| s == subnet && g == via)
}
