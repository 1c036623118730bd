//! Forged VXLAN that does not come in on the underlay addressed to the
//! node's own address (security review H1, issue 17 item 1).
//!
//! `flannel.<VNI>`'s UDP socket is bound to `0.0.0.0:<port>`, so forged VXLAN
//! (inner source: another node's pod, inner destination: the victim's pod)
//! can reach it by other ways than the underlay address the eBPF filter used
//! to guard:
//!
//! - a pod sends it over a plain UDP socket to its node's address, or to its
//!   `cni0` gateway, also with a known VTEP's address as its source;
//! - a host on the underlay sends it to a secondary address of the node, to
//!   the subnet broadcast, to the limited broadcast, or to 224.0.0.1;
//! - a host on a second NIC of the node sends it to the node's address, also
//!   with a known VTEP's address as its source.
//!
//! Each path is tried against a flannel host (the iproute2 reference: the
//! control, every forged datagram must reach its pod) and against both of
//! our datapaths, which must deliver none of them and count the drops, in
//! the eBPF program's `drop_unknown_vtep` or in the counters of nft table
//! `inet overlay-vtep`. Legitimate peers (the reference peer and one of our
//! datapaths) keep working throughout, and a DirectRouting peer's VXLAN is
//! still accepted.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use overlay_agent::datapath::{
    NodeSpec,
    ebpf::{EbpfOptions, IngressMode},
    vtep_guard::{self, GuardCounters},
};
use overlay_common::counters::Reason;
use overlay_tests::{
    cmd, frames,
    lab::{Lab, LabSpec},
    netns,
    node::{Flavor, Node},
    overlay::{Kind, Member, Overlay, mesh},
    reference::ReferencePeer,
    traffic::{self, UdpBurst, UdpListener},
};

const ATTACK_PORT: u16 = 7777;
/// Forged datagrams per path.
const PER_PATH: u32 = 20;
/// A secondary address of the victim's underlay NIC.
const SECONDARY: Ipv4Addr = Ipv4Addr::new(192, 168, 64, 200);
const SUBNET_BROADCAST: Ipv4Addr = Ipv4Addr::new(192, 168, 64, 255);
const ALL_HOSTS: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 1);
/// The second NIC's link: victim .1, the host behind it .2.
const NIC2_VICTIM: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);
const NIC2_PEER: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 2);

/// The VXLAN payload (header + inner frame) a forger sends over a plain UDP
/// socket: inner source `from` (another node's pod), inner destination the
/// victim's pod, framed to the victim's VTEP MAC (public: L10).
fn forged(overlay: Overlay, victim: &Member, from: Ipv4Addr, seq: u32) -> Vec<u8> {
    let to = victim.host.container_ip.octets();
    let mut body = b"forged ".to_vec();
    body.extend_from_slice(&seq.to_be_bytes());
    let seg = frames::udp(from.octets(), to, (5555, ATTACK_PORT), &body);
    let ip = frames::Ip::new(17, from.octets(), to).packet(&seg);
    let inner = frames::eth(
        victim.vtep_mac().0,
        [0x02, 0, 0, 0, 0x66, 0x66],
        0x0800,
        &ip,
    );
    let mut p = vec![0x08, 0, 0, 0];
    p.extend_from_slice(&(overlay.vni << 8).to_be_bytes());
    p.extend_from_slice(&inner);
    p
}

/// One way in.
struct Way {
    name: &'static str,
    /// The namespace the forger sends from.
    ns: String,
    /// The source address to bind (assigned there), or any.
    src: Option<Ipv4Addr>,
    dst: Ipv4Addr,
}

fn send(way: &Way, payloads: Vec<Vec<u8>>, port: u16) -> Result<()> {
    let (src, dst) = (way.src, way.dst);
    netns::run_in(&way.ns, move || {
        let bind = SocketAddrV4::new(src.unwrap_or(Ipv4Addr::UNSPECIFIED), 0);
        let sock = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
        sock.set_broadcast(true)?;
        for p in payloads {
            sock.send_to(&p, SocketAddrV4::new(dst, port))
                .with_context(|| format!("sending to {dst}:{port}"))?;
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    })
}

fn guard_counters(ns: &str) -> Result<Option<GuardCounters>> {
    netns::run_in(ns, || Ok(vtep_guard::counters()?))
}

/// All the drops a victim counted: the program's and the firewall's.
fn drops(victim: &Member) -> Result<u64> {
    let ebpf = victim
        .counters()?
        .map_or(0, |c| c.get(Reason::DropUnknownVtep).packets);
    let nft = guard_counters(&victim.host.ns)?.unwrap_or_default();
    Ok(ebpf + nft.unknown_vtep + nft.spoofed_source)
}

/// Turns reverse-path filtering off on every interface of `ns`. The lab's
/// hosts filter strictly (RHEL's default), which already drops a datagram
/// whose source routes out of another interface; many distributions filter
/// loosely or not at all (the source is routable, so it passes), and then
/// only the guard's own reverse-path rule stands in the way.
fn no_rp_filter(ns: &str) -> Result<()> {
    cmd::run(
        Some(ns),
        &[
            "sh",
            "-c",
            "for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done",
        ],
    )
    .map(drop)
}

/// A namespace of this test's own (the host behind the victim's second
/// NIC), removed when dropped.
struct OwnNs(String);

impl Drop for OwnNs {
    fn drop(&mut self) {
        let _ = cmd::run(None, &["ip", "netns", "del", &self.0]);
    }
}

struct Outcome {
    name: &'static str,
    received: usize,
    drops: u64,
}

/// Builds a 3-host lab (victim of `kind` on host 1, the reference peer on
/// host 2, `other` on host 3) with an outsider and a host behind a second
/// NIC of the victim, sends `PER_PATH` forged datagrams each way, and checks
/// that the legitimate peers still reach the victim's pod.
fn attack(name: &str, kind: Kind, other: Kind) -> Result<Vec<Outcome>> {
    let lab = Lab::build(&LabSpec::new(name, 3).with_outsider())?;
    let overlay = Overlay::default();
    let victim = Member::join(lab.host(1), kind, overlay)?;
    let legit = Member::join(lab.host(2), Kind::Reference, overlay)?;
    let ours = Member::join(lab.host(3), other, overlay)?;
    mesh(&[&victim, &legit, &ours])?;
    let x = lab.outsider().context("lab has no outsider")?.clone();
    let vns = victim.host.ns.clone();
    let pod = victim.host.container_ns.clone();

    cmd::ip(
        &vns,
        &["addr", "add", &format!("{SECONDARY}/24"), "dev", "eth0"],
    )?;
    // The outsider reaches groups and the limited broadcast through eth0.
    cmd::ip(
        &x.ns,
        &["route", "add", "224.0.0.0/4", "dev", &x.underlay_dev],
    )?;
    cmd::ip(
        &x.ns,
        &["route", "add", "255.255.255.255/32", "dev", &x.underlay_dev],
    )?;
    // A host behind a second NIC of the victim; it also holds the
    // reference peer's address (a known VTEP), on that link only.
    let nic2 = OwnNs(format!("{}n2", lab.prefix()));
    cmd::run(None, &["ip", "netns", "add", &nic2.0])?;
    cmd::ip(
        &vns,
        &[
            "link", "add", "nic2", "type", "veth", "peer", "name", "nic2p", "netns", &nic2.0,
        ],
    )?;
    cmd::ip(
        &vns,
        &["addr", "add", &format!("{NIC2_VICTIM}/24"), "dev", "nic2"],
    )?;
    cmd::ip(&vns, &["link", "set", "nic2", "up"])?;
    cmd::ip(
        &nic2.0,
        &["addr", "add", &format!("{NIC2_PEER}/24"), "dev", "nic2p"],
    )?;
    let vtep = legit.host.underlay_ip;
    cmd::ip(
        &nic2.0,
        &["addr", "add", &format!("{vtep}/32"), "dev", "nic2p"],
    )?;
    cmd::ip(&nic2.0, &["link", "set", "nic2p", "up"])?;
    cmd::ip(&nic2.0, &["link", "set", "lo", "up"])?;
    let victim_ip = victim.host.underlay_ip;
    cmd::ip(
        &nic2.0,
        &[
            "route",
            "add",
            &format!("{victim_ip}/32"),
            "via",
            &NIC2_VICTIM.to_string(),
        ],
    )?;

    no_rp_filter(&vns)?;
    traffic::ping(&legit.host.container_ns, victim.host.container_ip, 3)?;
    traffic::ping(&ours.host.container_ns, victim.host.container_ip, 3)?;

    let ways = [
        Way {
            name: "pod to its node's address",
            ns: pod.clone(),
            src: None,
            dst: victim_ip,
        },
        Way {
            name: "pod to its cni0 gateway",
            ns: pod.clone(),
            src: None,
            dst: victim.host.gateway,
        },
        Way {
            name: "pod with a known VTEP's source",
            ns: pod.clone(),
            src: Some(vtep),
            dst: victim.host.gateway,
        },
        Way {
            name: "underlay to a secondary address",
            ns: x.ns.clone(),
            src: None,
            dst: SECONDARY,
        },
        Way {
            name: "underlay to the subnet broadcast",
            ns: x.ns.clone(),
            src: None,
            dst: SUBNET_BROADCAST,
        },
        Way {
            name: "underlay to the limited broadcast",
            ns: x.ns.clone(),
            src: None,
            dst: Ipv4Addr::BROADCAST,
        },
        Way {
            name: "underlay to 224.0.0.1",
            ns: x.ns.clone(),
            src: None,
            dst: ALL_HOSTS,
        },
        Way {
            name: "second NIC to the node's address",
            ns: nic2.0.clone(),
            src: Some(NIC2_PEER),
            dst: victim_ip,
        },
        Way {
            name: "second NIC with a known VTEP's source",
            ns: nic2.0.clone(),
            src: Some(vtep),
            dst: victim_ip,
        },
    ];
    let mut outcomes = Vec::new();
    for way in &ways {
        // The pod holds the VTEP's address only while it forges with it.
        let spoof_in_pod = way.ns == pod && way.src.is_some();
        if spoof_in_pod {
            cmd::ip(&pod, &["addr", "add", &format!("{vtep}/32"), "dev", "eth0"])?;
        }
        let before = drops(&victim)?;
        let listener = UdpListener::start(&pod, victim.host.container_ip, ATTACK_PORT)?;
        let payloads = (0..PER_PATH)
            .map(|seq| forged(overlay, &victim, legit.host.container_ip, seq))
            .collect();
        send(way, payloads, overlay.port).with_context(|| way.name)?;
        std::thread::sleep(Duration::from_millis(300));
        let received = listener.finish()?.len();
        let drops = drops(&victim)? - before;
        if spoof_in_pod {
            cmd::ip(&pod, &["addr", "del", &format!("{vtep}/32"), "dev", "eth0"])?;
        }
        eprintln!(
            "victim {kind}, {}: {received}/{PER_PATH} reached the pod, {drops} drops counted",
            way.name
        );
        outcomes.push(Outcome {
            name: way.name,
            received,
            drops,
        });
    }

    // The legitimate peers still reach the pod, both ways.
    for peer in [&legit, &ours] {
        traffic::udp_burst(
            &peer.host.container_ns,
            &victim.host.container_ns,
            victim.host.container_ip,
            7778,
            UdpBurst {
                count: 200,
                rate: 1000,
                ..UdpBurst::default()
            },
        )
        .with_context(|| format!("legitimate UDP from {} after the attacks", peer.kind))?;
        traffic::ping(&victim.host.container_ns, peer.host.container_ip, 3)
            .with_context(|| format!("ping to {} after the attacks", peer.kind))?;
    }
    drop((victim, legit, ours));
    drop(nic2);
    lab.destroy()?;
    Ok(outcomes)
}

fn all_dropped(name: &str, kind: Kind, other: Kind) -> Result<()> {
    let outcomes = attack(name, kind, other)?;
    for o in &outcomes {
        ensure!(
            o.received == 0,
            "{}: {} forged datagrams reached the pod",
            o.name,
            o.received
        );
        ensure!(
            o.drops >= u64::from(PER_PATH),
            "{}: {} drops counted for {PER_PATH} forged datagrams",
            o.name,
            o.drops
        );
    }
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces and nftables: run `cargo xtask test`"]
fn forged_vxlan_reaches_a_flannel_host_every_way() -> Result<()> {
    // The control: the kernel's socket takes every one of these ways.
    let outcomes = attack("vxref", Kind::Reference, Kind::Kernel)?;
    for o in &outcomes {
        ensure!(
            o.received == PER_PATH as usize,
            "{}: only {}/{PER_PATH} reached a flannel host's pod: the attack setup is broken",
            o.name,
            o.received
        );
    }
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces and nftables: run `cargo xtask test`"]
fn forged_vxlan_is_dropped_every_way_on_the_kernel_datapath() -> Result<()> {
    all_dropped("vxker", Kind::Kernel, Kind::Ebpf(IngressMode::Tc))
}

#[test]
#[ignore = "needs root, network namespaces, eBPF and nftables: run `cargo xtask test`"]
fn forged_vxlan_is_dropped_every_way_on_the_ebpf_datapath() -> Result<()> {
    all_dropped("vxebpf", Kind::Ebpf(IngressMode::Tc), Kind::Kernel)
}

/// A peer the victim routes to directly (DirectRouting) may still send it
/// VXLAN (it decides for itself, and the reference peer never routes
/// directly): its VXLAN is accepted, and it leaves the set with its lease.
fn direct_peer_stays_trusted(name: &str, flavor: Flavor) -> Result<()> {
    let lab = Lab::build(&LabSpec::new(name, 2))?;
    let overlay = Overlay::default();
    let (h1, h2) = (lab.host(1), lab.host(2));
    let node = Node::start(&h1.ns, flavor)?;
    let state = node.setup(&NodeSpec {
        vni: overlay.vni,
        port: overlay.port,
        public_ip: h1.underlay_ip,
        local_ip: h1.underlay_ip,
        underlay: h1.underlay_dev.clone(),
        subnet: h1.subnet,
        mtu: None,
        vtep_mac: None,
        direct_routing: true,
        ipv6: None,
    })?;
    let reference = ReferencePeer::setup(h2, overlay.vni, overlay.port)?;
    node.add_peer(&reference.as_peer())?;
    let route = cmd::ip(&h1.ns, &["route", "show", &h2.subnet.to_string()])?;
    ensure!(
        route.contains(&format!("via {}", h2.underlay_ip)),
        "not a direct route: {route}"
    );
    // Asymmetric on purpose: the plain packets the reference peer gets from
    // us arrive on eth0 with a source its route sends into flannel.1, and
    // its VXLAN answers arrive here on flannel.1 with a source we route via
    // eth0, which strict reverse-path filtering drops on both sides.
    no_rp_filter(&h1.ns)?;
    no_rp_filter(&h2.ns)?;
    let h1_node_peer = overlay_agent::datapath::Peer {
        subnet: h1.subnet,
        public_ip: h1.underlay_ip,
        vtep_mac: state.vtep_mac,
        v6: None,
    };
    reference.add_peer(&h1_node_peer)?;
    let set = |ns: &str| {
        cmd::run(
            Some(ns),
            &["nft", "list", "set", "inet", "overlay-vtep", "vteps"],
        )
    };
    ensure!(
        set(&h1.ns)?.contains(&h2.underlay_ip.to_string()),
        "direct peer not in the set"
    );
    let before = guard_counters(&h1.ns)?.unwrap_or_default();
    traffic::ping(&h1.container_ns, h2.container_ip, 5)
        .context("ping over the direct route, answered over VXLAN")?;
    traffic::ping(&h2.container_ns, h1.container_ip, 5)
        .context("ping over VXLAN from the direct peer")?;
    let after = guard_counters(&h1.ns)?.unwrap_or_default();
    ensure!(
        after == before,
        "the direct peer's VXLAN was dropped: {before:?} -> {after:?}"
    );
    node.remove_peer(&reference.as_peer())?;
    ensure!(
        !set(&h1.ns)?.contains(&h2.underlay_ip.to_string()),
        "the direct peer stayed in the set"
    );
    node.teardown()?;
    let tables = cmd::run(Some(&h1.ns), &["nft", "list", "tables"])?;
    ensure!(
        !tables.contains("overlay-vtep"),
        "teardown left the table: {tables}"
    );
    drop(node);
    lab.destroy()?;
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces and nftables: run `cargo xtask test`"]
fn a_direct_peer_stays_trusted_on_the_kernel_datapath() -> Result<()> {
    direct_peer_stays_trusted("vxdrk", Flavor::Kernel)
}

#[test]
#[ignore = "needs root, network namespaces, eBPF and nftables: run `cargo xtask test`"]
fn a_direct_peer_stays_trusted_on_the_ebpf_datapath() -> Result<()> {
    direct_peer_stays_trusted("vxdre", Flavor::Ebpf(EbpfOptions::default()))
}
