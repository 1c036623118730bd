//! Proof of path: which code moved the packets.
//!
//! eBPF mode: the programs are attached where the design says, their encap and
//! decap counters rise with the traffic, no drop reason counts, and the kernel
//! vxlan device's own tx/rx statistics stay flat (the packets went around it).
//! Kernel fallback: nothing at all is attached in the host, and the vxlan
//! device's statistics rise. After teardown nothing stays attached.
//! In every mode, strict rp_filter is on for the device and iptables rules
//! matching `-i flannel.<VNI>` / `-o flannel.<VNI>` see the traffic, as under
//! flannel.

use anyhow::ensure;
use overlay_agent::datapath::ebpf::IngressMode;
use overlay_common::consts::{PROG_EGRESS, PROG_INGRESS_TC};
use overlay_common::counters::Reason;
use overlay_tests::{
    lab::{Lab, LabSpec},
    netns::sysctl_get,
    overlay::{Kind, Member, Overlay, mesh},
    scenario::{MIB, Workload, both_ways},
    stats::{attachments, count_forwarding, dev_stats, forwarding_counts},
    traffic::UdpBurst,
};

/// Enough traffic for clear deltas, small enough to be quick.
fn workload() -> Workload {
    Workload {
        pings: 20,
        tcp_bytes: 8 * MIB,
        udp: UdpBurst {
            count: 500,
            ..UdpBurst::default()
        },
    }
}

const DROPS: [Reason; 7] = [
    Reason::DropUnknownVtep,
    Reason::DropWrongVni,
    Reason::DropMalformed,
    Reason::DropWrongInnerMac,
    Reason::DropNotConfigured,
    Reason::DropAdjustFailed,
    Reason::DropRedirectFailed,
];

/// The host is as strict as the lab promises, also for the device the
/// datapath created, and counts what it forwards from and to that device.
fn prepare_host(ns: &str, dev: &str) -> anyhow::Result<()> {
    for key in [
        format!("net/ipv4/conf/{dev}/rp_filter"),
        "net/ipv4/conf/all/rp_filter".to_owned(),
        format!("net/ipv6/conf/{dev}/disable_ipv6"),
    ] {
        ensure!(sysctl_get(ns, &key)? == "1", "{key} is not 1 in {ns}");
    }
    count_forwarding(ns, dev)
}

/// Both iptables rules on the device (`-i`, `-o`) saw at least `min` packets.
fn check_forwarding(ns: &str, dev: &str, min: u64) -> anyhow::Result<()> {
    let (inbound, outbound) = forwarding_counts(ns, dev)?;
    eprintln!("iptables FORWARD -i {dev}: {inbound} packets, -o {dev}: {outbound} packets");
    ensure!(
        inbound >= min && outbound >= min,
        "iptables rules on {dev} counted {inbound} in / {outbound} out, expected at least {min} each"
    );
    Ok(())
}

fn ingress_mode_has_xdp(mode: IngressMode) -> bool {
    mode == IngressMode::XdpAndTc
}

fn ebpf_path(name: &str, ingress_mode: IngressMode) -> anyhow::Result<()> {
    let lab = Lab::build(&LabSpec::new(name, 2))?;
    let overlay = Overlay::default();
    let dev = overlay.device();
    let ours = Member::join(lab.host(1), Kind::Ebpf(ingress_mode), overlay)?;
    let peer = Member::join(lab.host(2), Kind::Reference, overlay)?;
    mesh(&[&ours, &peer])?;
    let h1 = &ours.host;

    let ids = ours
        .node()
        .unwrap()
        .program_ids()?
        .expect("eBPF node has program ids");
    let att = attachments(&h1.ns)?;
    let egress = att.tcx_on(&dev, "egress");
    ensure!(
        matches!(egress.as_slice(), [p] if p.is(PROG_EGRESS) && p.id == ids.egress),
        "TCX egress of {dev}: expected {PROG_EGRESS} (id {}), found {egress:?}",
        ids.egress
    );
    let ingress = att.tcx_on(&h1.underlay_dev, "ingress");
    ensure!(
        matches!(ingress.as_slice(), [p] if p.is(PROG_INGRESS_TC) && p.id == ids.ingress_tc),
        "TCX ingress of {}: expected {PROG_INGRESS_TC} (id {}), found {ingress:?}",
        h1.underlay_dev,
        ids.ingress_tc
    );
    let others: Vec<_> = att
        .tcx
        .iter()
        .filter(|((d, dir), progs)| {
            let expected =
                (d == &dev && *dir == "egress") || (d == &h1.underlay_dev && *dir == "ingress");
            !expected && !progs.is_empty()
        })
        .collect();
    ensure!(others.is_empty(), "unexpected TCX attachments: {others:?}");
    ensure!(
        att.bpftool_tc.is_empty(),
        "classic tc BPF filters attached: {:?}",
        att.bpftool_tc
    );
    let xdp_expected = ingress_mode_has_xdp(ingress_mode);
    let expected_xdp: std::collections::BTreeMap<String, u64> = ids
        .ingress_xdp
        .filter(|_| xdp_expected)
        .map(|id| (h1.underlay_dev.clone(), u64::from(id)))
        .into_iter()
        .collect();
    ensure!(
        xdp_expected == ids.ingress_xdp.is_some() && att.xdp == expected_xdp,
        "XDP attachments {:?}, expected {expected_xdp:?} (datapath reports {:?})",
        att.xdp,
        ids.ingress_xdp
    );

    prepare_host(&h1.ns, &dev)?;
    let work = workload();
    let before_dev = dev_stats(&h1.ns, &dev)?;
    let before_nic = dev_stats(&h1.ns, &h1.underlay_dev)?;
    let before = ours.counters()?.expect("eBPF counters");
    both_ways(&ours.host, &peer.host, &work)?;
    let after = ours.counters()?.expect("eBPF counters");
    let dev_delta = dev_stats(&h1.ns, &dev)?.since(&before_dev);
    let nic_delta = dev_stats(&h1.ns, &h1.underlay_dev)?.since(&before_nic);
    let delta = |r: Reason| after.get(r).packets - before.get(r).packets;
    eprintln!("counters after: {after}");
    eprintln!(
        "{dev} delta {dev_delta:?}, {} delta {nic_delta:?}",
        h1.underlay_dev
    );

    // Each direction sends at least `pings` echo packets and every UDP datagram
    // one way, plus the TCP segments (GSO may merge them, so not counted here).
    let min_each_way = u64::from(work.pings + work.udp.count);
    ensure!(
        delta(Reason::Encapsulated) >= min_each_way,
        "encapsulated rose by {} (< {min_each_way}); counters: {after}",
        delta(Reason::Encapsulated)
    );
    ensure!(
        delta(Reason::Decapsulated) >= min_each_way,
        "decapsulated rose by {} (< {min_each_way}); counters: {after}",
        delta(Reason::Decapsulated)
    );
    for r in DROPS {
        ensure!(
            delta(r) == 0,
            "{} rose by {} during legitimate traffic",
            r.name(),
            delta(r)
        );
    }
    ensure!(
        dev_delta.tx_packets == 0 && dev_delta.rx_packets == 0,
        "{dev} statistics moved ({dev_delta:?}): packets went through the kernel's vxlan driver"
    );
    ensure!(
        nic_delta.tx_packets >= min_each_way && nic_delta.rx_packets >= min_each_way,
        "{} statistics {nic_delta:?}: the traffic did not cross the underlay",
        h1.underlay_dev
    );

    check_forwarding(&h1.ns, &dev, min_each_way)?;
    // All of the workload is container to container: every packet the programs
    // decapsulated must have been forwarded as arriving on the device (so strict
    // rp_filter let it through), and every one they encapsulated was routed to it.
    let (inbound, outbound) = forwarding_counts(&h1.ns, &dev)?;
    ensure!(
        inbound == delta(Reason::Decapsulated) && outbound == delta(Reason::Encapsulated),
        "iptables saw {inbound} in / {outbound} out on {dev}, the programs decapsulated {} and encapsulated {}",
        delta(Reason::Decapsulated),
        delta(Reason::Encapsulated)
    );

    ours.node().unwrap().teardown()?;
    let att = attachments(&h1.ns)?;
    ensure!(att.is_empty(), "still attached after teardown: {att:?}");
    drop((ours, peer));
    lab.destroy()
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn ebpf_tc_moves_packets_around_the_vxlan_device() -> anyhow::Result<()> {
    ebpf_path("ptc", IngressMode::Tc)
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn ebpf_xdp_moves_packets_around_the_vxlan_device() -> anyhow::Result<()> {
    ebpf_path("pxdp", IngressMode::XdpAndTc)
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn kernel_fallback_attaches_nothing_and_uses_the_vxlan_device() -> anyhow::Result<()> {
    let lab = Lab::build(&LabSpec::new("pkern", 2))?;
    let overlay = Overlay::default();
    let dev = overlay.device();
    let ours = Member::join(lab.host(1), Kind::Kernel, overlay)?;
    let peer = Member::join(lab.host(2), Kind::Reference, overlay)?;
    mesh(&[&ours, &peer])?;
    let h1 = &ours.host;

    let att = attachments(&h1.ns)?;
    ensure!(
        att.is_empty(),
        "kernel fallback host has BPF attached: {att:?}"
    );
    ensure!(
        ours.counters()?.is_none(),
        "kernel fallback reports eBPF counters"
    );

    prepare_host(&h1.ns, &dev)?;
    let work = workload();
    let before = dev_stats(&h1.ns, &dev)?;
    both_ways(&ours.host, &peer.host, &work)?;
    let delta = dev_stats(&h1.ns, &dev)?.since(&before);
    eprintln!("{dev} delta {delta:?}");
    let min_each_way = u64::from(work.pings + work.udp.count);
    ensure!(
        delta.tx_packets >= min_each_way && delta.rx_packets >= min_each_way,
        "{dev} statistics {delta:?}: expected at least {min_each_way} each way through the vxlan driver"
    );
    check_forwarding(&h1.ns, &dev, min_each_way)?;
    drop((ours, peer));
    lab.destroy()
}
