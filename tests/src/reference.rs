//! The reference peer: a host programmed exactly as flanneld's VXLAN backend
//! programs it, with iproute2/bridge commands and nothing of ours.
//!
//! The commands follow `flannel-reference.md` ("What the VXLAN backend programs
//! in the kernel"): device `flannel.<VNI>` (vxlan, `nolearning`, local public IP,
//! dev = external interface, dstport), a random locally administered MAC, MTU =
//! external MTU - 50, address `<subnet .0>/32`; per remote lease a permanent
//! neighbour, a permanent FDB entry and an onlink route, in that order.
//! Interoperating with this peer is what "drop-in replacement for flannel" means.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use overlay_agent::{datapath::Peer, flannel::mac::MacAddr};

use crate::{cmd, lab::Host};

/// A host programmed by [`ReferencePeer::setup`].
#[derive(Clone, Debug)]
pub struct ReferencePeer {
    pub ns: String,
    pub device: String,
    pub vni: u32,
    pub port: u16,
    pub public_ip: Ipv4Addr,
    pub subnet: ipnet::Ipv4Net,
    pub vtep_mac: MacAddr,
    pub mtu: u32,
}

/// A random locally administered unicast MAC, like the one the kernel (and so
/// flannel) gives a new vxlan device.
pub fn random_mac() -> Result<MacAddr> {
    let mut b = [0u8; 6];
    let mut f = std::fs::File::open("/dev/urandom").context("opening /dev/urandom")?;
    std::io::Read::read_exact(&mut f, &mut b)?;
    b[0] = (b[0] & 0xfc) | 0x02;
    Ok(MacAddr(b))
}

impl ReferencePeer {
    /// Creates and configures `flannel.<vni>` on `host` the way flanneld does.
    pub fn setup(host: &Host, vni: u32, port: u16) -> Result<ReferencePeer> {
        let ns = host.ns.as_str();
        let device = format!("flannel.{vni}");
        let underlay_mtu: u32 = cmd::run(
            None,
            &[
                "ip",
                "netns",
                "exec",
                ns,
                "cat",
                &format!("/sys/class/net/{}/mtu", host.underlay_dev),
            ],
        )?
        .trim()
        .parse()
        .context("parsing the underlay MTU")?;
        let mtu = underlay_mtu - 50;
        let vtep_mac = random_mac()?;
        cmd::ip(
            ns,
            &[
                "link",
                "add",
                &device,
                "type",
                "vxlan",
                "id",
                &vni.to_string(),
                "local",
                &host.underlay_ip.to_string(),
                "dev",
                &host.underlay_dev,
                "dstport",
                &port.to_string(),
                "nolearning",
            ],
        )?;
        cmd::ip(
            ns,
            &["link", "set", &device, "address", &vtep_mac.to_string()],
        )?;
        cmd::ip(ns, &["link", "set", &device, "mtu", &mtu.to_string()])?;
        cmd::ip(
            ns,
            &[
                "addr",
                "add",
                &format!("{}/32", host.subnet.network()),
                "dev",
                &device,
            ],
        )?;
        cmd::ip(ns, &["link", "set", &device, "up"])?;
        Ok(ReferencePeer {
            ns: ns.to_owned(),
            device,
            vni,
            port,
            public_ip: host.underlay_ip,
            subnet: host.subnet,
            vtep_mac,
            mtu,
        })
    }

    /// This host's lease, as other nodes see it.
    pub fn as_peer(&self) -> Peer {
        Peer {
            subnet: self.subnet,
            public_ip: self.public_ip,
            vtep_mac: self.vtep_mac,
            v6: None,
        }
    }

    /// Programs a remote lease: neighbour, FDB, route (flannel's order).
    pub fn add_peer(&self, peer: &Peer) -> Result<()> {
        let ns = self.ns.as_str();
        let dev = self.device.as_str();
        let gw = peer.subnet.network().to_string();
        let mac = peer.vtep_mac.to_string();
        cmd::ip(
            ns,
            &[
                "neigh",
                "replace",
                &gw,
                "lladdr",
                &mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ],
        )?;
        cmd::run(
            None,
            &[
                "bridge",
                "-n",
                ns,
                "fdb",
                "replace",
                &mac,
                "dev",
                dev,
                "dst",
                &peer.public_ip.to_string(),
                "self",
                "permanent",
            ],
        )?;
        cmd::ip(
            ns,
            &[
                "route",
                "replace",
                &peer.subnet.to_string(),
                "via",
                &gw,
                "dev",
                dev,
                "onlink",
            ],
        )?;
        Ok(())
    }

    /// Forgets a remote lease: route, FDB, neighbour.
    pub fn remove_peer(&self, peer: &Peer) -> Result<()> {
        let ns = self.ns.as_str();
        let dev = self.device.as_str();
        let gw = peer.subnet.network().to_string();
        let mac = peer.vtep_mac.to_string();
        cmd::ip(
            ns,
            &[
                "route",
                "del",
                &peer.subnet.to_string(),
                "via",
                &gw,
                "dev",
                dev,
                "onlink",
            ],
        )?;
        cmd::run(
            None,
            &[
                "bridge",
                "-n",
                ns,
                "fdb",
                "del",
                &mac,
                "dev",
                dev,
                "dst",
                &peer.public_ip.to_string(),
                "self",
            ],
        )?;
        cmd::ip(ns, &["neigh", "del", &gw, "dev", dev])?;
        Ok(())
    }
}
