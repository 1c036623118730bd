//! What the agent trusts in a peer's lease: the checks every lease passes,
//! whatever brought it (the first snapshot, a watch event, a re-list),
//! before it can reach the datapath. A lease that parses can still be
//! impossible: a subnet of another size or outside the network (flannel's
//! own allocator never writes one), a PublicIP nobody can send VXLAN to or
//! from (it would also enter the set of VTEPs our ingress trusts), or a
//! VtepMAC the kernel refuses as a neighbour or FDB entry.

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::flannel::{lease::Peer6, mac::MacAddr};

/// This node's side of the checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trust {
    /// The config's `Network`.
    pub network: Ipv4Net,
    /// The config's `SubnetLen`.
    pub subnet_len: u8,
    /// Our own `PublicIP`: no peer can share it.
    pub own_public_ip: Ipv4Addr,
    /// Our VNI: a lease that names another one belongs to another overlay.
    pub vni: u32,
}

/// This node's side of the checks on a dual-stack lease's IPv6 half.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trust6 {
    /// The config's `IPv6Network`.
    pub network: Ipv6Net,
    /// The config's `IPv6SubnetLen`.
    pub subnet_len: u8,
    /// Our own `PublicIPv6`.
    pub own_public_ip: Ipv6Addr,
}

/// Why a lease is not programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rejection {
    /// The subnet's prefix length is not the config's `SubnetLen`.
    PrefixLen,
    /// The subnet does not lie inside `Network` (or is all of it).
    OutsideNetwork,
    /// `PublicIP` is unspecified, broadcast, loopback, multicast, link-local
    /// or in 240.0.0.0/4: no VTEP has it.
    PublicIp,
    /// `PublicIP` is ours: another node cannot be reached there.
    OwnPublicIp,
    /// `VtepMAC` is zero, multicast or broadcast.
    VtepMac,
    /// The lease names a VNI other than ours.
    Vni,
}

impl Rejection {
    /// Every reason, for metrics that list each one.
    pub const ALL: [Rejection; 6] = [
        Rejection::PrefixLen,
        Rejection::OutsideNetwork,
        Rejection::PublicIp,
        Rejection::OwnPublicIp,
        Rejection::VtepMac,
        Rejection::Vni,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::PrefixLen => "prefix_len",
            Rejection::OutsideNetwork => "outside_network",
            Rejection::PublicIp => "public_ip",
            Rejection::OwnPublicIp => "own_public_ip",
            Rejection::VtepMac => "vtep_mac",
            Rejection::Vni => "vni",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rejection::PrefixLen => "its prefix length is not the network's SubnetLen",
            Rejection::OutsideNetwork => "its subnet is not inside the network",
            Rejection::PublicIp => "its PublicIP cannot be a VTEP (unspecified, broadcast, loopback, multicast, link-local or reserved)",
            Rejection::OwnPublicIp => "its PublicIP is this node's",
            Rejection::VtepMac => "its VtepMAC is zero, multicast or broadcast",
            Rejection::Vni => "it names another VNI",
        })
    }
}

/// Checks one peer lease against `trust`.
pub fn check(
    trust: &Trust,
    subnet: Ipv4Net,
    public_ip: Ipv4Addr,
    vtep_mac: MacAddr,
    vni: Option<u32>,
) -> Result<(), Rejection> {
    if subnet.prefix_len() != trust.subnet_len {
        return Err(Rejection::PrefixLen);
    }
    if !trust.network.contains(&subnet) || subnet.prefix_len() <= trust.network.prefix_len() {
        return Err(Rejection::OutsideNetwork);
    }
    if !is_vtep_address(public_ip) {
        return Err(Rejection::PublicIp);
    }
    if public_ip == trust.own_public_ip {
        return Err(Rejection::OwnPublicIp);
    }
    check_mac(vtep_mac)?;
    if vni.is_some_and(|v| v != trust.vni) {
        return Err(Rejection::Vni);
    }
    Ok(())
}

/// Checks the IPv6 half of a dual-stack lease against `trust` with the same
/// reasons as the IPv4 half: a subnet of `IPv6SubnetLen` inside
/// `IPv6Network`, a `PublicIPv6` that is global unicast (Go's
/// `IsGlobalUnicast`: ULAs included) and not ours, a unicast VTEP MAC.
pub fn check6(trust: &Trust6, peer: &Peer6) -> Result<(), Rejection> {
    let subnet = peer.subnet;
    if subnet.prefix_len() != trust.subnet_len {
        return Err(Rejection::PrefixLen);
    }
    if !trust.network.contains(&subnet) || subnet.prefix_len() <= trust.network.prefix_len() {
        return Err(Rejection::OutsideNetwork);
    }
    let ip = peer.public_ip;
    if ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || ip.is_unicast_link_local()
        || ip.to_ipv4_mapped().is_some()
    {
        return Err(Rejection::PublicIp);
    }
    if ip == trust.own_public_ip {
        return Err(Rejection::OwnPublicIp);
    }
    check_mac(peer.vtep_mac)
}

fn check_mac(vtep_mac: MacAddr) -> Result<(), Rejection> {
    let m = vtep_mac.0;
    if m == [0; 6] || m[0] & 1 == 1 {
        return Err(Rejection::VtepMac);
    }
    Ok(())
}

/// Whether a node can send and receive unicast VXLAN at `ip`.
fn is_vtep_address(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_loopback()
        || ip.is_multicast()
        || ip.is_link_local()
        || ip.octets()[0] >= 240)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trust() -> Trust {
        Trust {
            network: "10.0.0.0/8".parse().unwrap(),
            subnet_len: 20,
            own_public_ip: "192.168.0.1".parse().unwrap(),
            vni: 1,
        }
    }

    fn check_one(subnet: &str, ip: &str, mac: &str, vni: Option<u32>) -> Result<(), Rejection> {
        check(
            &trust(),
            subnet.parse().unwrap(),
            ip.parse().unwrap(),
            mac.parse().unwrap(),
            vni,
        )
    }

    const MAC: &str = "02:42:ac:11:00:02";

    #[test]
    fn a_flannel_lease_passes() {
        assert_eq!(check_one("10.15.64.0/20", "192.168.0.2", MAC, None), Ok(()));
        assert_eq!(
            check_one("10.15.64.0/20", "203.0.113.7", MAC, Some(1)),
            Ok(())
        );
    }

    #[test]
    fn impossible_leases_are_rejected_with_their_reason() {
        use Rejection::*;
        let cases = [
            ("10.13.48.0/24", "192.168.0.2", MAC, None, PrefixLen),
            ("172.16.0.0/20", "192.168.0.2", MAC, None, OutsideNetwork),
            ("10.0.0.0/8", "192.168.0.2", MAC, None, PrefixLen),
            ("10.15.64.0/20", "0.0.0.0", MAC, None, PublicIp),
            ("10.15.64.0/20", "255.255.255.255", MAC, None, PublicIp),
            ("10.15.64.0/20", "127.0.0.1", MAC, None, PublicIp),
            ("10.15.64.0/20", "224.0.0.1", MAC, None, PublicIp),
            ("10.15.64.0/20", "169.254.1.1", MAC, None, PublicIp),
            ("10.15.64.0/20", "240.0.0.1", MAC, None, PublicIp),
            ("10.15.64.0/20", "192.168.0.1", MAC, None, OwnPublicIp),
            (
                "10.15.64.0/20",
                "192.168.0.2",
                "01:00:5e:00:00:01",
                None,
                VtepMac,
            ),
            (
                "10.15.64.0/20",
                "192.168.0.2",
                "ff:ff:ff:ff:ff:ff",
                None,
                VtepMac,
            ),
            (
                "10.15.64.0/20",
                "192.168.0.2",
                "00:00:00:00:00:00",
                None,
                VtepMac,
            ),
            ("10.15.64.0/20", "192.168.0.2", MAC, Some(2), Vni),
        ];
        for (subnet, ip, mac, vni, want) in cases {
            assert_eq!(
                check_one(subnet, ip, mac, vni),
                Err(want),
                "{subnet} {ip} {mac} {vni:?}"
            );
        }
        // The whole network with the network's own length is not a subnet of it.
        let whole = Trust {
            subnet_len: 8,
            ..trust()
        };
        assert_eq!(
            check(
                &whole,
                "10.0.0.0/8".parse().unwrap(),
                "192.168.0.2".parse().unwrap(),
                MAC.parse().unwrap(),
                None
            ),
            Err(OutsideNetwork)
        );
    }

    #[test]
    fn ipv6_halves_are_checked_with_the_same_reasons() {
        use Rejection::*;
        let trust = Trust6 {
            network: "fc00::/48".parse().unwrap(),
            subnet_len: 64,
            own_public_ip: "fd01::1".parse().unwrap(),
        };
        let peer = |subnet: &str, ip: &str, mac: &str| Peer6 {
            subnet: subnet.parse().unwrap(),
            public_ip: ip.parse().unwrap(),
            vtep_mac: mac.parse().unwrap(),
        };
        assert_eq!(
            check6(&trust, &peer("fc00:0:0:7::/64", "fd01::2", MAC)),
            Ok(())
        );
        assert_eq!(
            check6(&trust, &peer("fc00:0:0:7::/64", "2001:db8::2", MAC)),
            Ok(())
        );
        for (subnet, ip, mac, want) in [
            ("fc00:0:0:7::/80", "fd01::2", MAC, PrefixLen),
            ("fc01:0:0:7::/64", "fd01::2", MAC, OutsideNetwork),
            ("fc00:0:0:7::/64", "::", MAC, PublicIp),
            ("fc00:0:0:7::/64", "::1", MAC, PublicIp),
            ("fc00:0:0:7::/64", "ff02::1", MAC, PublicIp),
            ("fc00:0:0:7::/64", "fe80::2", MAC, PublicIp),
            ("fc00:0:0:7::/64", "::ffff:192.168.0.2", MAC, PublicIp),
            ("fc00:0:0:7::/64", "fd01::1", MAC, OwnPublicIp),
            ("fc00:0:0:7::/64", "fd01::2", "33:33:00:00:00:01", VtepMac),
        ] {
            assert_eq!(
                check6(&trust, &peer(subnet, ip, mac)),
                Err(want),
                "{subnet} {ip} {mac}"
            );
        }
        let whole = Trust6 {
            subnet_len: 48,
            ..trust
        };
        assert_eq!(
            check6(&whole, &peer("fc00::/48", "fd01::2", MAC)),
            Err(OutsideNetwork)
        );
    }

    #[test]
    fn labels_are_distinct() {
        let labels: std::collections::BTreeSet<_> =
            Rejection::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), Rejection::ALL.len());
    }
}
