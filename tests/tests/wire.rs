//! On the wire: a capture on the underlay (the eBPF host's switch port) while
//! traffic flows both ways between an eBPF host and the iproute2 reference
//! peer. tshark decodes every frame as VXLAN on the configured port with the
//! configured VNI, the inner Ethernet goes from the sending VTEP's MAC to the
//! receiving VTEP's MAC, outer MACs and addresses are the hosts' underlay ones,
//! nothing is malformed, and the eBPF sender's headers agree with the kernel
//! sender's field by field (flags, VNI, ports, TTL, DF).

use std::{collections::BTreeSet, net::Ipv4Addr};

use anyhow::{Context, ensure};
use overlay_agent::datapath::ebpf::IngressMode;
use overlay_tests::{
    capture::{self, Capture, VxlanFrame},
    cmd,
    lab::{Host, Lab, LabSpec},
    overlay::{Kind, Member, Overlay, mesh},
    scenario::{MIB, Workload, both_ways},
    traffic::UdpBurst,
};

fn mac_of(host: &Host) -> anyhow::Result<String> {
    let out = cmd::ip(&host.ns, &["-j", "link", "show", &host.underlay_dev])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v[0]["address"].as_str().context("no address")?.to_owned())
}

/// What one sender put on the wire, reduced to the fields that must be constant.
#[derive(Debug, PartialEq, Eq)]
struct HeaderProfile {
    flags: BTreeSet<u16>,
    vni: BTreeSet<u32>,
    udp_dst: BTreeSet<u16>,
    ttl: BTreeSet<u8>,
    df: BTreeSet<bool>,
}

fn profile(frames: &[&VxlanFrame]) -> HeaderProfile {
    HeaderProfile {
        flags: frames.iter().map(|f| f.vxlan_flags).collect(),
        vni: frames.iter().map(|f| f.vni).collect(),
        udp_dst: frames.iter().map(|f| f.udp_dst).collect(),
        ttl: frames.iter().map(|f| f.outer_ttl).collect(),
        df: frames.iter().map(|f| f.outer_df).collect(),
    }
}

/// Checks every frame `from` sent to `to` and returns them.
fn check_sender<'a>(
    frames: &'a [VxlanFrame],
    from: &Member,
    to: &Member,
    overlay: Overlay,
) -> anyhow::Result<Vec<&'a VxlanFrame>> {
    let (from_mac, to_mac) = (mac_of(&from.host)?, mac_of(&to.host)?);
    let sent: Vec<&VxlanFrame> = frames
        .iter()
        .filter(|f| f.outer_src == from.host.underlay_ip)
        .collect();
    let who = format!("{} ({})", from.host.underlay_ip, from.kind);
    ensure!(!sent.is_empty(), "{who} sent no VXLAN frame");
    for f in &sent {
        let ctx = || format!("{who}, frame {}: {f:?}", f.number);
        ensure!(
            f.outer_dst == to.host.underlay_ip,
            "outer destination: {}",
            ctx()
        );
        ensure!(
            f.outer_eth_src == from_mac && f.outer_eth_dst == to_mac,
            "outer MACs (expected {from_mac} -> {to_mac}): {}",
            ctx()
        );
        ensure!(f.udp_dst == overlay.port, "UDP destination port: {}", ctx());
        ensure!(
            (32768..61000).contains(&f.udp_src),
            "UDP source port outside the kernel's [32768, 61000): {}",
            ctx()
        );
        ensure!(
            f.vxlan_flags == 0x0800,
            "VXLAN flags (expected only I): {}",
            ctx()
        );
        ensure!(f.vni == overlay.vni, "VNI: {}", ctx());
        ensure!(
            f.inner_eth_src == from.vtep_mac().to_string()
                && f.inner_eth_dst == to.vtep_mac().to_string(),
            "inner MACs (expected {} -> {}): {}",
            from.vtep_mac(),
            to.vtep_mac(),
            ctx()
        );
        let inner_ok = |ip: Option<Ipv4Addr>, h: &Host| ip.is_some_and(|ip| h.subnet.contains(&ip));
        ensure!(
            inner_ok(f.inner_src, &from.host) && inner_ok(f.inner_dst, &to.host),
            "inner IPv4 addresses not from {} to {}: {}",
            from.host.subnet,
            to.host.subnet,
            ctx()
        );
    }
    for proto in [":icmp", ":tcp", ":udp"] {
        let inner = format!("vxlan:eth:ethertype:ip{proto}");
        ensure!(
            sent.iter().any(|f| f.protocols.contains(&inner)),
            "{who} sent no {inner} frame"
        );
    }
    let ports: BTreeSet<u16> = sent.iter().map(|f| f.udp_src).collect();
    let checksums: BTreeSet<u16> = sent.iter().map(|f| f.udp_checksum).take(5).collect();
    eprintln!(
        "{who}: {} frames, {} distinct UDP source ports, profile {:?}, first UDP checksums {checksums:x?}",
        sent.len(),
        ports.len(),
        profile(&sent)
    );
    Ok(sent)
}

fn wire(name: &str, ingress: IngressMode, overlay: Overlay) -> anyhow::Result<()> {
    let lab = Lab::build(&LabSpec::new(name, 2))?;
    let ours = Member::join(lab.host(1), Kind::Ebpf(ingress), overlay)?;
    let peer = Member::join(lab.host(2), Kind::Reference, overlay)?;
    mesh(&[&ours, &peer])?;
    let pcap = std::env::temp_dir().join(format!("{}wire.pcap", lab.prefix()));
    let capture = Capture::start(
        lab.switch_ns(),
        &ours.host.switch_port,
        &format!("udp port {}", overlay.port),
        &pcap,
    )?;
    let work = Workload {
        pings: 10,
        tcp_bytes: 4 * MIB,
        udp: UdpBurst {
            count: 300,
            ..UdpBurst::default()
        },
    };
    both_ways(&ours.host, &peer.host, &work)?;
    let pcap = capture.stop()?;
    let result = (|| {
        capture::assert_clean(&pcap, overlay.port)?;
        let frames = capture::vxlan_frames(&pcap, overlay.port)?;
        let ebpf_sent = check_sender(&frames, &ours, &peer, overlay)?;
        let kernel_sent = check_sender(&frames, &peer, &ours, overlay)?;
        ensure!(
            frames.len() == ebpf_sent.len() + kernel_sent.len(),
            "{} VXLAN frames from neither host",
            frames.len() - ebpf_sent.len() - kernel_sent.len()
        );
        let (a, b) = (profile(&ebpf_sent), profile(&kernel_sent));
        ensure!(
            a == b,
            "eBPF and kernel senders differ: eBPF {a:?}, kernel {b:?}"
        );
        Ok(())
    })();
    match &result {
        Ok(()) => {
            let _ = std::fs::remove_file(&pcap);
        }
        Err(_) => eprintln!("capture kept for inspection: {}", pcap.display()),
    }
    result?;
    drop((ours, peer));
    lab.destroy()
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn ebpf_tc_and_kernel_vxlan_agree_on_the_wire() -> anyhow::Result<()> {
    wire("wtc", IngressMode::Tc, Overlay::default())
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn ebpf_xdp_and_kernel_vxlan_agree_on_the_wire_with_iana_port_and_vni_42() -> anyhow::Result<()> {
    wire(
        "wxdp",
        IngressMode::XdpAndTc,
        Overlay {
            vni: 42,
            port: 4789,
        },
    )
}
