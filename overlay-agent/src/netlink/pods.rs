//! Where this node's pods are: the bridge that holds an address of our pod
//! subnet (`cni0` under flannel's CNI plugin, `docker0` with
//! `--bip=$FLANNEL_SUBNET`) and the host-side veths enslaved to it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use rtnetlink::packet_route::{
    address::AddressAttribute,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage, State},
};

use super::{Netlink, NetlinkError};

/// A pod's host-side veth.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodVeth {
    pub ifindex: u32,
    pub name: String,
    /// The veth's MTU: a longer packet takes the host's path, which treats
    /// it as without the fast path (fragments it or answers "fragmentation
    /// needed").
    pub mtu: u32,
}

/// The pods' bridge and its veths, as the kernel has them now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodNetwork {
    /// The bridge's name and ifindex; `None` while no bridge holds an address
    /// of the subnet (no pod has started yet).
    pub bridge: Option<(String, u32)>,
    /// The bridge's (lowest) address inside the subnet: the pods' gateway,
    /// the node's own address there.
    pub gateway: Option<Ipv4Addr>,
    /// The bridge's (lowest) address inside the IPv6 pod subnet of a
    /// dual-stack node.
    pub gateway6: Option<Ipv6Addr>,
    /// Sorted by ifindex.
    pub veths: Vec<PodVeth>,
}

/// The kind of a link (`veth`, `bridge`, ...), from its IFLA_LINKINFO.
fn kind(msg: &LinkMessage) -> Option<&InfoKind> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    })
}

fn controller(msg: &LinkMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(i) => Some(*i),
        _ => None,
    })
}

fn mtu(msg: &LinkMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(0)
}

/// Whether the veth's peer lives in another network namespace (the kernel
/// names that namespace in IFLA_LINK_NETNSID). A pair with both ends here
/// is no pod's: `bpf_redirect_peer` drops what it would send into it.
fn peer_elsewhere(msg: &LinkMessage) -> bool {
    msg.attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::LinkNetNsId(_)))
}

/// Whether the veth can carry traffic: with its peer down the host side has
/// no carrier, and `bpf_redirect_peer` would drop (after our program counted
/// a delivery) what it sends into it.
fn carrier(msg: &LinkMessage) -> bool {
    !msg.attributes.iter().any(|a| {
        matches!(
            a,
            LinkAttribute::OperState(
                State::Down | State::LowerLayerDown | State::NotPresent | State::Dormant
            )
        )
    })
}

fn name(msg: &LinkMessage) -> String {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// From a link dump and the (ifindex, address) pairs: the bridge with an
/// IPv4 address inside `subnet` and its veth ports, and its IPv6 address in
/// `subnet6` (dual stack).
pub fn pod_network(
    links: &[LinkMessage],
    addresses: &[(u32, IpAddr)],
    subnet: Ipv4Net,
    subnet6: Option<Ipv6Net>,
) -> PodNetwork {
    let v4 = |index: u32| {
        addresses.iter().filter_map(move |(i, ip)| match ip {
            IpAddr::V4(ip) if *i == index && subnet.contains(ip) => Some(*ip),
            _ => None,
        })
    };
    let bridge = links
        .iter()
        .find(|l| kind(l) == Some(&InfoKind::Bridge) && v4(l.header.index).next().is_some());
    let Some(bridge) = bridge else {
        return PodNetwork::default();
    };
    let index = bridge.header.index;
    let gateway = v4(index).min();
    let gateway6 = subnet6.and_then(|subnet6| {
        addresses
            .iter()
            .filter_map(|(i, ip)| match ip {
                IpAddr::V6(ip) if *i == index && subnet6.contains(ip) => Some(*ip),
                _ => None,
            })
            .min()
    });
    let mut veths: Vec<PodVeth> = links
        .iter()
        .filter(|l| {
            controller(l) == Some(index)
                && kind(l) == Some(&InfoKind::Veth)
                && peer_elsewhere(l)
                && carrier(l)
        })
        .map(|l| PodVeth {
            ifindex: l.header.index,
            name: name(l),
            mtu: mtu(l),
        })
        .collect();
    veths.sort();
    PodNetwork {
        bridge: Some((name(bridge), index)),
        gateway,
        gateway6,
        veths,
    }
}

impl Netlink {
    /// One link dump and one address dump: the pods' bridge and veths.
    pub async fn pod_network(
        &self,
        subnet: Ipv4Net,
        subnet6: Option<Ipv6Net>,
    ) -> Result<PodNetwork, NetlinkError> {
        let links =
            Self::collect(self.handle.link().get().execute(), || "list links".into()).await?;
        let msgs = Self::collect(self.handle.address().get().execute(), || {
            "list addresses".into()
        })
        .await?;
        let addresses: Vec<(u32, IpAddr)> = msgs
            .iter()
            .flat_map(|m| {
                m.attributes.iter().filter_map(move |a| match a {
                    AddressAttribute::Local(ip) | AddressAttribute::Address(ip) => {
                        Some((m.header.index, *ip))
                    }
                    _ => None,
                })
            })
            .collect();
        Ok(pod_network(&links, &addresses, subnet, subnet6))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, kind: InfoKind, master: Option<u32>) -> LinkMessage {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::IfName(name.into()));
        m.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(kind)]));
        if let Some(master) = master {
            m.attributes.push(LinkAttribute::Controller(master));
        }
        m.attributes.push(LinkAttribute::Mtu(1450));
        m
    }

    /// A veth whose peer is in another namespace, as a pod's is.
    fn pod_veth(index: u32, name: &str, master: u32) -> LinkMessage {
        let mut m = link(index, name, InfoKind::Veth, Some(master));
        m.attributes.push(LinkAttribute::LinkNetNsId(index as i32));
        m
    }

    #[test]
    fn finds_the_bridge_holding_the_gateway_and_its_veths() {
        let links = vec![
            link(2, "eth0", InfoKind::Veth, None),
            link(3, "docker0", InfoKind::Bridge, None),
            link(4, "cni0", InfoKind::Bridge, None),
            pod_veth(9, "vethb", 4),
            pod_veth(7, "vetha", 4),
            pod_veth(8, "vethd", 3),
            link(10, "dummy", InfoKind::Dummy, Some(4)),
            // Both ends in the host: no pod behind it.
            link(11, "vethhost", InfoKind::Veth, Some(4)),
            // Its pod's end is down.
            {
                let mut m = pod_veth(12, "vethdown", 4);
                m.attributes
                    .push(LinkAttribute::OperState(State::LowerLayerDown));
                m
            },
        ];
        let addresses: Vec<(u32, IpAddr)> = vec![
            (2, Ipv4Addr::new(192, 168, 64, 2).into()),
            (3, Ipv4Addr::new(172, 17, 0, 1).into()),
            (4, "fe80::1".parse().unwrap()),
            (4, "fd10:0:0:5::1".parse().unwrap()),
            (4, Ipv4Addr::new(10, 5, 1, 1).into()),
            (3, "fd10:0:0:5::7".parse().unwrap()),
        ];
        let subnet6 = Some("fd10:0:0:5::/64".parse().unwrap());
        let net = pod_network(&links, &addresses, "10.5.1.0/24".parse().unwrap(), subnet6);
        assert_eq!(net.bridge, Some(("cni0".into(), 4)));
        assert_eq!(net.gateway, Some(Ipv4Addr::new(10, 5, 1, 1)));
        // Only the bridge's own address in the IPv6 subnet (not its
        // link-local one, not another bridge's).
        assert_eq!(net.gateway6, Some("fd10:0:0:5::1".parse().unwrap()));
        let v4_only = pod_network(&links, &addresses, "10.5.1.0/24".parse().unwrap(), None);
        assert_eq!(v4_only.gateway6, None);
        assert_eq!(
            net.veths,
            vec![
                PodVeth {
                    ifindex: 7,
                    name: "vetha".into(),
                    mtu: 1450,
                },
                PodVeth {
                    ifindex: 9,
                    name: "vethb".into(),
                    mtu: 1450,
                },
            ]
        );
        // No bridge holds an address of the subnet yet: nothing to attach to.
        let none = pod_network(&links, &addresses, "10.5.2.0/24".parse().unwrap(), subnet6);
        assert_eq!(none, PodNetwork::default());
    }
}
