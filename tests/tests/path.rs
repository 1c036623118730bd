//! Proof of path: which code moved the packets.
//!
//! eBPF mode: the programs are attached where the design says, their encap and
//! decap counters rise with the traffic, no drop reason counts, and the kernel
//! vxlan device's own tx/rx statistics stay flat (the packets went around it);
//! the one exception is by design and accounted for: with TC-only ingress, a
//! peer's GSO aggregates (bulk TCP) go to the vxlan driver, and its rx count
//! must equal the programs' `pass_gso_tunnel` count exactly.
//! Kernel fallback: nothing at all is attached in the host, and the vxlan
//! device's statistics rise. After teardown nothing stays attached.
//! These run with `--fast-path=off`; fast_path.rs proves the fast path's.
//! In every mode, strict rp_filter is on for the device and iptables rules
//! matching `-i flannel.<VNI>` / `-o flannel.<VNI>` see the traffic, as under
//! flannel.

use anyhow::ensure;
use overlay_agent::datapath::{
    ebpf::{Counters, IngressMode},
    fastpath::FastPathMode,
};
use overlay_common::consts::{PROG_EGRESS, PROG_INGRESS_TC};
use overlay_common::counters::Reason;
use overlay_tests::{
    lab::{Lab, LabSpec},
    netns::sysctl_get,
    overlay::{Kind, Member, Overlay, mesh},
    scenario::{MIB, Workload, both_ways},
    stats::{DevStats, attachments, count_forwarding, dev_stats, forwarding_counts},
    traffic::{self, UdpBurst},
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

/// What the host and the programs counted at one moment.
struct Snapshot {
    counters: Counters,
    dev: DevStats,
    nic: DevStats,
    /// iptables FORWARD packets (-i dev, -o dev).
    forwarded: (u64, u64),
}

/// The difference between two snapshots.
struct Delta {
    counters: Vec<(Reason, u64)>,
    dev: DevStats,
    nic: DevStats,
    forwarded: (u64, u64),
}

impl Snapshot {
    fn since(&self, before: &Snapshot) -> Delta {
        Delta {
            counters: Reason::ALL
                .iter()
                .map(|&r| {
                    (
                        r,
                        self.counters.get(r).packets - before.counters.get(r).packets,
                    )
                })
                .collect(),
            dev: self.dev.since(&before.dev),
            nic: self.nic.since(&before.nic),
            forwarded: (
                self.forwarded.0 - before.forwarded.0,
                self.forwarded.1 - before.forwarded.1,
            ),
        }
    }
}

impl Delta {
    fn of(&self, reason: Reason) -> u64 {
        self.counters
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }
}

impl std::fmt::Display for Delta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let counters: Vec<String> = self
            .counters
            .iter()
            .filter(|(_, n)| *n != 0)
            .map(|(r, n)| format!("{}+{n}", r.name()))
            .collect();
        write!(
            f,
            "counters [{}], vxlan device rx+{} tx+{}, underlay rx+{} tx+{}, iptables in+{} out+{}",
            counters.join(" "),
            self.dev.rx_packets,
            self.dev.tx_packets,
            self.nic.rx_packets,
            self.nic.tx_packets,
            self.forwarded.0,
            self.forwarded.1
        )
    }
}

fn ingress_mode_has_xdp(mode: IngressMode) -> bool {
    mode == IngressMode::XdpAndTc
}

fn ebpf_path(name: &str, ingress_mode: IngressMode) -> anyhow::Result<()> {
    let lab = Lab::build(&LabSpec::new(name, 2))?;
    let overlay = Overlay::default();
    let dev = overlay.device();
    // The accounting below is the host path's: with the fast path on (see
    // fast_path.rs) the pod traffic does not cross flannel.<VNI> at all.
    let ours = Member::join_with(
        lab.host(1),
        Kind::Ebpf(ingress_mode),
        overlay,
        FastPathMode::Off,
    )?;
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
    let observe = || -> anyhow::Result<Snapshot> {
        Ok(Snapshot {
            counters: ours.counters()?.expect("eBPF counters"),
            dev: dev_stats(&h1.ns, &dev)?,
            nic: dev_stats(&h1.ns, &h1.underlay_dev)?,
            forwarded: forwarding_counts(&h1.ns, &dev)?,
        })
    };

    // Phase 1, packets that no one aggregates (ping, UDP): everything goes
    // through the programs and nothing through the vxlan driver.
    let start = observe()?;
    for (src, dst) in [(&ours.host, &peer.host), (&peer.host, &ours.host)] {
        let port = 31000 + u16::from(src.index);
        traffic::ping(&src.container_ns, dst.container_ip, work.pings)?;
        traffic::udp_burst(
            &src.container_ns,
            &dst.container_ns,
            dst.container_ip,
            port,
            work.udp,
        )?;
    }
    let mid = observe()?;
    let d = mid.since(&start);
    eprintln!("ping+UDP: {d}");
    let min_each_way = u64::from(work.pings + work.udp.count);
    ensure!(
        d.of(Reason::Encapsulated) >= min_each_way && d.of(Reason::Decapsulated) >= min_each_way,
        "ping+UDP: encap/decap counters rose by less than {min_each_way}: {d}"
    );
    ensure!(
        d.dev.tx_packets == 0 && d.dev.rx_packets == 0,
        "ping+UDP: {dev} statistics moved, packets went through the kernel's vxlan driver: {d}"
    );
    ensure!(
        d.nic.tx_packets >= min_each_way && d.nic.rx_packets >= min_each_way,
        "ping+UDP: the traffic did not cross {}: {d}",
        h1.underlay_dev
    );
    // Container to container only: every packet the programs decapsulated was
    // forwarded as arriving on the device (so strict rp_filter let it through),
    // and every one they encapsulated had been routed to it.
    ensure!(
        d.forwarded == (d.of(Reason::Decapsulated), d.of(Reason::Encapsulated)),
        "ping+UDP: iptables -i/-o {dev} counted {:?}, the programs decapsulated/encapsulated {:?}",
        d.forwarded,
        (d.of(Reason::Decapsulated), d.of(Reason::Encapsulated))
    );

    // Phase 2, bulk TCP: the peer's TSO aggregates cross the veth whole. XDP
    // sees them segmented (XDP on a veth turns GSO off on its peer) and
    // decapsulates all; TC-only ingress hands aggregates to the vxlan driver on
    // purpose (see DECAP_GSO in overlay-ebpf), each counted pass_gso_tunnel.
    // Either way, egress never uses the driver, and every packet the driver
    // received is one the programs counted as handed to it.
    for (src, dst) in [(&ours.host, &peer.host), (&peer.host, &ours.host)] {
        let port = 32000 + u16::from(src.index);
        traffic::tcp_transfer(
            &src.container_ns,
            &dst.container_ns,
            dst.container_ip,
            port,
            work.tcp_bytes,
        )?;
    }
    let end = observe()?;
    let d = end.since(&mid);
    eprintln!("TCP: {d}");
    ensure!(
        d.of(Reason::Encapsulated) > 0 && d.of(Reason::Decapsulated) > 0,
        "TCP: the programs moved nothing: {d}"
    );
    ensure!(
        d.dev.tx_packets == 0,
        "TCP: the vxlan driver transmitted: {d}"
    );
    ensure!(
        d.dev.rx_packets == d.of(Reason::PassGsoTunnel),
        "TCP: the vxlan driver received {} packets, the programs handed it {} (pass_gso_tunnel): {d}",
        d.dev.rx_packets,
        d.of(Reason::PassGsoTunnel)
    );
    if ingress_mode_has_xdp(ingress_mode) {
        ensure!(
            d.dev.rx_packets == 0,
            "TCP with XDP: aggregates reached the vxlan driver: {d}"
        );
    }
    ensure!(
        d.forwarded.0 == d.of(Reason::Decapsulated) + d.of(Reason::PassGsoTunnel)
            && d.forwarded.1 == d.of(Reason::Encapsulated),
        "TCP: iptables -i/-o {dev} counted {:?}: {d}",
        d.forwarded
    );
    let total = end.since(&start);
    for r in DROPS {
        ensure!(
            total.of(r) == 0,
            "{} rose by {} during legitimate traffic: {total}",
            r.name(),
            total.of(r)
        );
    }

    ours.node().unwrap().teardown()?;
    let att = attachments(&h1.ns)?;
    ensure!(att.is_empty(), "still attached after teardown: {att:?}");
    drop((ours, peer));
    lab.destroy()
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn ebpf_tc_bypasses_the_vxlan_device_except_counted_gso_aggregates() -> anyhow::Result<()> {
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
