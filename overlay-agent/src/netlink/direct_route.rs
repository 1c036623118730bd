//! flannel's `Backend.DirectRouting`: a peer whose `PublicIP` the underlay
//! reaches without a gateway (the same L2 segment) gets a plain route
//! `<subnet> via <PublicIP> dev <underlay>` instead of the neighbour, FDB
//! entry and vxlan route of [`super::peer_entries`].
//!
//! The same for a dual-stack peer's IPv6 side: `<v6 subnet> via
//! <PublicIPv6> dev <underlay>` when `ip -6 route get <PublicIPv6>` finds it
//! on-link. Every function is generic over the [`IpFamily`].

use std::{collections::HashSet, net::IpAddr};

use rtnetlink::packet_route::route::{
    RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};

use super::{
    Netlink, NetlinkError,
    family::{IpFamily, route_address, route_to, with_gateway},
    peer_entries::Device,
};

/// What `ip route get <ip>` answers, as far as directness needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteHop {
    pub kind: RouteType,
    pub oif: Option<u32>,
    pub gateway: Option<IpAddr>,
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
            RouteAttribute::Gateway(addr) => hop.gateway = route_address(addr),
            _ => {}
        }
    }
    hop
}

impl Netlink {
    /// `ip route get <ip>` (one RTM_GETROUTE, no dump). `None` when the kernel
    /// has no route to it.
    pub async fn route_get<A: IpFamily>(&self, ip: A) -> Result<Option<RouteHop>, NetlinkError> {
        let host = A::net(ip, A::HOST_PREFIX_LEN).expect("a host prefix fits its family");
        let msg = route_to::<A>(host).build();
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
    pub async fn replace_direct_route<A: IpFamily>(
        &self,
        underlay: Device<'_>,
        subnet: A::Net,
        via: A,
    ) -> Result<(), NetlinkError> {
        self.replace_gateway_route(underlay, subnet, via, false)
            .await
    }

    /// `ip route del <subnet> via <via> dev <underlay>`; absent is fine. The
    /// gateway is named so that no other route of the underlay for the
    /// prefix is touched.
    pub async fn delete_direct_route<A: IpFamily>(
        &self,
        underlay: Device<'_>,
        subnet: A::Net,
        via: A,
    ) -> Result<(), NetlinkError> {
        let msg = with_gateway(route_to::<A>(subnet), via)
            .output_interface(underlay.ifindex)
            .protocol(RouteProtocol::Unspec)
            .scope(RouteScope::NoWhere)
            .build();
        let result = self.handle.route().del(msg).execute().await.map_err(|e| {
            NetlinkError::new(
                format!(
                    "delete route {}/{} via {via} dev {}",
                    A::network(subnet),
                    A::prefix_len(subnet),
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
/// [`Netlink::peer_routes`] lists them, in a set so that checking every
/// direct peer is one pass) hold the direct route for `subnet`.
pub fn has_direct_route<A: IpFamily>(
    routes: &HashSet<(A::Net, A)>,
    subnet: A::Net,
    via: A,
) -> bool {
    routes.contains(&(subnet, via))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use ipnet::Ipv4Net;

    use super::*;

    fn hop(kind: RouteType, oif: Option<u32>, gateway: Option<&str>) -> RouteHop {
        RouteHop {
            kind,
            oif,
            gateway: gateway.map(|g| g.parse().unwrap()),
        }
    }

    #[test]
    fn a_peer_is_direct_only_through_the_underlay_without_a_gateway() {
        assert!(hop(RouteType::Unicast, Some(2), None).is_direct(2));
        // Behind a router.
        assert!(!hop(RouteType::Unicast, Some(2), Some("10.98.0.254")).is_direct(2));
        // Reached through another interface.
        assert!(!hop(RouteType::Unicast, Some(3), None).is_direct(2));
        // One of our own addresses, or a blackhole.
        assert!(!hop(RouteType::Local, Some(1), None).is_direct(1));
        assert!(!hop(RouteType::BlackHole, None, None).is_direct(2));
    }

    #[test]
    fn a_direct_route_is_found_by_subnet_and_next_hop() {
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let routes = HashSet::from([
            (net("10.0.14.0/24"), ip("10.98.0.2")),
            (net("0.0.0.0/0"), ip("10.98.0.254")),
        ]);
        assert!(has_direct_route(
            &routes,
            net("10.0.14.0/24"),
            ip("10.98.0.2")
        ));
        // The PublicIP changed: the route through the old one is not it.
        assert!(!has_direct_route(
            &routes,
            net("10.0.14.0/24"),
            ip("10.98.0.3")
        ));
        assert!(!has_direct_route(
            &routes,
            net("10.0.15.0/24"),
            ip("10.98.0.2")
        ));
    }
}
