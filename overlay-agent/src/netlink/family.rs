//! The two address families flannel runs a vxlan device for: IPv4
//! (`flannel.<VNI>`, [`Peer`]) and IPv6 (`flannel-v6.<VNI>`, [`Peer6`]).
//!
//! The device, the per-peer entries, their read-back and DirectRouting are
//! written once, generic over [`IpFamily`]; this trait holds the little that
//! differs between the families (names, prefix types, host prefix length,
//! the smallest MTU, which addresses stay on the device, the default MAC).

use std::{
    fmt::{Debug, Display},
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{Ipv4Net, Ipv6Net};
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        neighbour::NeighbourAddress,
        route::{RouteAddress, RouteAttribute},
    },
};

use crate::flannel::{
    lease::{Peer, Peer6},
    mac::MacAddr,
};

/// An address family of flannel's VXLAN backend, implemented by its address
/// type ([`Ipv4Addr`], [`Ipv6Addr`]).
pub trait IpFamily:
    Copy + Eq + Ord + Hash + Debug + Display + Send + Sync + Into<IpAddr> + 'static
{
    /// A prefix of the family ([`Ipv4Net`], [`Ipv6Net`]).
    type Net: Copy + Eq + Hash + Debug + Display + Send + Sync + 'static;
    /// A peer's lease, as far as this family's device needs it.
    type Peer: Copy + Eq + Debug + Send + Sync + 'static;

    /// The rtnetlink family of its neighbours, routes and addresses.
    const FAMILY: AddressFamily;
    /// flannel's device name, less the VNI: `flannel.` or `flannel-v6.`.
    const DEVICE_PREFIX: &'static str;
    /// The prefix length of the device's own address (`/32`, `/128`).
    const HOST_PREFIX_LEN: u8;
    /// The smallest MTU the family works with (RFC 791: 68; RFC 8200: 1280,
    /// below which the kernel turns IPv6 off on the interface).
    const MIN_MTU: u32;
    /// The headroom the kernel's vxlan driver keeps below the underlay's
    /// MTU (`VXLAN_HEADROOM` 50, `VXLAN6_HEADROOM` 70): the largest MTU a
    /// device with a `dev` can have is the underlay's minus this.
    const VXLAN_HEADROOM: u32;
    /// "IPv4" / "IPv6", for messages.
    const NAME: &'static str;
    /// `0.0.0.0` / `::`: the destination of a default route.
    const UNSPECIFIED: Self;

    fn network(net: Self::Net) -> Self;
    fn prefix_len(net: Self::Net) -> u8;
    /// `addr/prefix_len`, if the length fits the family.
    fn net(addr: Self, prefix_len: u8) -> Option<Self::Net>;
    /// The address, if it is of this family.
    fn from_ip(ip: IpAddr) -> Option<Self>;

    /// An address the device keeps beside its own (flannel's
    /// `EnsureV6AddressOnLink` keeps the link-local ones); every other
    /// address of the family is removed.
    fn kept_on_device(addr: Self) -> bool;

    /// The MAC a device gets when the spec names none: for IPv4 the stable
    /// one derived from the PublicIP and VNI ([`MacAddr::stable_for`]); for
    /// IPv6, as flannel, a random locally administered unicast MAC (the
    /// lease's `BackendV6Data.VtepMAC` restores it through the spec).
    fn default_mac(public_ip: Self, vni: u32) -> MacAddr;

    /// `(subnet, public IP, VTEP MAC)` of a peer.
    fn peer_parts(peer: &Self::Peer) -> (Self::Net, Self, MacAddr);
    fn make_peer(subnet: Self::Net, public_ip: Self, vtep_mac: MacAddr) -> Self::Peer;
}

impl IpFamily for Ipv4Addr {
    type Net = Ipv4Net;
    type Peer = Peer;

    const FAMILY: AddressFamily = AddressFamily::Inet;
    const DEVICE_PREFIX: &'static str = "flannel.";
    const HOST_PREFIX_LEN: u8 = 32;
    const MIN_MTU: u32 = 68;
    const VXLAN_HEADROOM: u32 = 50;
    const NAME: &'static str = "IPv4";
    const UNSPECIFIED: Self = Ipv4Addr::UNSPECIFIED;

    fn network(net: Ipv4Net) -> Self {
        net.network()
    }
    fn prefix_len(net: Ipv4Net) -> u8 {
        net.prefix_len()
    }
    fn net(addr: Self, prefix_len: u8) -> Option<Ipv4Net> {
        Ipv4Net::new(addr, prefix_len).ok()
    }
    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        }
    }
    fn kept_on_device(_: Self) -> bool {
        false
    }
    fn default_mac(public_ip: Self, vni: u32) -> MacAddr {
        MacAddr::stable_for(public_ip, vni)
    }
    fn peer_parts(peer: &Peer) -> (Ipv4Net, Self, MacAddr) {
        (peer.subnet, peer.public_ip, peer.vtep_mac)
    }
    fn make_peer(subnet: Ipv4Net, public_ip: Self, vtep_mac: MacAddr) -> Peer {
        Peer {
            subnet,
            public_ip,
            vtep_mac,
            v6: None,
        }
    }
}

impl IpFamily for Ipv6Addr {
    type Net = Ipv6Net;
    type Peer = Peer6;

    const FAMILY: AddressFamily = AddressFamily::Inet6;
    const DEVICE_PREFIX: &'static str = "flannel-v6.";
    const HOST_PREFIX_LEN: u8 = 128;
    const MIN_MTU: u32 = 1280;
    const VXLAN_HEADROOM: u32 = 70;
    const NAME: &'static str = "IPv6";
    const UNSPECIFIED: Self = Ipv6Addr::UNSPECIFIED;

    fn network(net: Ipv6Net) -> Self {
        net.network()
    }
    fn prefix_len(net: Ipv6Net) -> u8 {
        net.prefix_len()
    }
    fn net(addr: Self, prefix_len: u8) -> Option<Ipv6Net> {
        Ipv6Net::new(addr, prefix_len).ok()
    }
    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(ip) => Some(ip),
            IpAddr::V4(_) => None,
        }
    }
    fn kept_on_device(addr: Self) -> bool {
        addr.is_unicast_link_local()
    }
    fn default_mac(_: Self, _: u32) -> MacAddr {
        random_mac()
    }
    fn peer_parts(peer: &Peer6) -> (Ipv6Net, Self, MacAddr) {
        (peer.subnet, peer.public_ip, peer.vtep_mac)
    }
    fn make_peer(subnet: Ipv6Net, public_ip: Self, vtep_mac: MacAddr) -> Peer6 {
        Peer6 {
            subnet,
            public_ip,
            vtep_mac,
        }
    }
}

/// flannel's `mac.NewHardwareAddr`: six random bytes, the locally
/// administered bit set and the multicast bit cleared.
pub fn random_mac() -> MacAddr {
    let mut b: [u8; 6] = rand::random();
    b[0] = (b[0] & 0xfe) | 0x02;
    MacAddr(b)
}

/// The address in a neighbour or FDB message's destination: neighbours
/// report it typed, the FDB (AF_BRIDGE) as raw bytes.
pub(crate) fn neighbour_address(addr: &NeighbourAddress) -> Option<IpAddr> {
    match addr {
        NeighbourAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        NeighbourAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        NeighbourAddress::Other(bytes) => match bytes.len() {
            4 => <[u8; 4]>::try_from(&bytes[..]).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(&bytes[..]).ok().map(IpAddr::from),
            _ => None,
        },
        _ => None,
    }
}

/// The address of a route attribute (destination, gateway).
pub(crate) fn route_address(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

/// A route message of family `A` (main table, unicast), to build on.
pub(crate) fn route_message<A: IpFamily>() -> RouteMessageBuilder<IpAddr> {
    let mut builder = RouteMessageBuilder::<IpAddr>::new();
    builder.get_mut().header.address_family = A::FAMILY;
    builder
}

/// A route message of family `A` for the prefix `dst`.
pub(crate) fn route_to<A: IpFamily>(dst: A::Net) -> RouteMessageBuilder<IpAddr> {
    let mut builder = route_message::<A>();
    let msg = builder.get_mut();
    msg.header.destination_prefix_length = A::prefix_len(dst);
    let network: IpAddr = A::network(dst).into();
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(network)));
    builder
}

/// `via <gateway>` on a route message of the gateway's family.
pub(crate) fn with_gateway<A: IpFamily>(
    mut builder: RouteMessageBuilder<IpAddr>,
    gateway: A,
) -> RouteMessageBuilder<IpAddr> {
    builder
        .get_mut()
        .attributes
        .push(RouteAttribute::Gateway(RouteAddress::from(
            Into::<IpAddr>::into(gateway),
        )));
    builder
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_macs_are_local_unicast_and_differ() {
        let a = random_mac();
        assert_eq!(a.0[0] & 0x03, 0x02);
        assert_ne!(a, random_mac());
    }

    #[test]
    fn families_differ_where_flannel_does() {
        assert_eq!(Ipv4Addr::HOST_PREFIX_LEN, 32);
        assert_eq!(Ipv6Addr::HOST_PREFIX_LEN, 128);
        assert!(Ipv6Addr::kept_on_device("fe80::1".parse().unwrap()));
        assert!(!Ipv6Addr::kept_on_device("fc00::1".parse().unwrap()));
        assert!(!Ipv4Addr::kept_on_device("169.254.0.1".parse().unwrap()));
        let net: Ipv6Net = "fc00:0:0:7::5/64".parse().unwrap();
        assert_eq!(
            Ipv6Addr::network(net),
            "fc00:0:0:7::".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(Ipv6Addr::net("fc00::".parse().unwrap(), 129), None);
    }

    #[test]
    fn fdb_destinations_are_read_from_raw_bytes_of_either_family() {
        let v4 = NeighbourAddress::Other(vec![192, 168, 1, 2]);
        assert_eq!(neighbour_address(&v4), Some("192.168.1.2".parse().unwrap()));
        let v6: Ipv6Addr = "fd00:77::2".parse().unwrap();
        let raw = NeighbourAddress::Other(v6.octets().to_vec());
        assert_eq!(neighbour_address(&raw), Some(IpAddr::V6(v6)));
        assert_eq!(
            neighbour_address(&NeighbourAddress::Other(vec![1, 2])),
            None
        );
    }
}
