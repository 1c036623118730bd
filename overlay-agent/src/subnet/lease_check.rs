//! What the agent trusts in a peer's lease: the checks every lease passes,
//! whatever brought it (the first snapshot, a watch event, a re-list),
//! before it can reach the datapath. A lease that parses can still be
//! impossible: a subnet of another size or outside the network (flannel's
//! own allocator never writes one), a PublicIP nobody can send VXLAN to or
//! from (it would also enter the set of VTEPs our ingress trusts), or a
//! VtepMAC the kernel refuses as a neighbour or FDB entry.

use std::{fmt, net::Ipv4Addr};

use ipnet::Ipv4Net;

use crate::flannel::mac::MacAddr;

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
    let m = vtep_mac.0;
    if m == [0; 6] || m[0] & 1 == 1 {
        return Err(Rejection::VtepMac);
    }
    if vni.is_some_and(|v| v != trust.vni) {
        return Err(Rejection::Vni);
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
    fn labels_are_distinct() {
        let labels: std::collections::BTreeSet<_> =
            Rejection::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), Rejection::ALL.len());
    }
}
