//! Our TC programs share their hooks: what they do not take continues down
//! the chain (`TCX_NEXT`; `TC_ACT_OK` would end it), so a second TCX program
//! and a legacy clsact filter on the underlay's ingress and on
//! `flannel.<VNI>`'s egress still see it, with our programs on TCX links
//! (TC or XDP+TC ingress) and with them as legacy clsact filters (where the
//! other filter sits at a priority after ours, 50000).
//!
//! The legacy filter is `u32 match u32 0 0 action mirred egress mirror` to a
//! spare veth, whose transmit counter counts what the filter saw (this kernel
//! has no matchall). The second TCX program is our own `veth_to_pod` from a
//! separate load of the object, with its own maps: it counts every packet it
//! sees as `slow_to_pod` once its FAST_CONFIG is on, and passes it on.

use anyhow::{Context, Result, ensure};
use aya::{
    Ebpf,
    maps::{Array, PerCpuArray},
    programs::{SchedClassifier, TcAttachType},
};
use overlay_agent::datapath::{
    ebpf::{Counters, EBPF_OBJECT, EbpfOptions, IngressMode},
    tc_attach::TcAttachMode,
};
use overlay_common::{
    consts::{MAP_COUNTERS, MAP_FAST_CONFIG, PROG_VETH_TO_POD},
    counters::{Counter, Reason},
    fastpath::FastPathConfig,
};
use overlay_tests::{
    cmd,
    lab::{Lab, LabSpec},
    netns,
    overlay::{Kind, Member, Overlay, mesh},
    stats::dev_stats,
};

/// A second, independent load of our object with `veth_to_pod` attached
/// after ours on both hooks.
fn second_program(ns: &str, underlay: &str, vxlan: &str) -> Result<Ebpf> {
    let (underlay, vxlan) = (underlay.to_owned(), vxlan.to_owned());
    netns::run_in(ns, move || {
        let mut ebpf = Ebpf::load(EBPF_OBJECT).context("loading the object")?;
        let mut config: Array<_, FastPathConfig> =
            Array::try_from(ebpf.map_mut(MAP_FAST_CONFIG).context("FAST_CONFIG")?)?;
        config.set(
            0,
            FastPathConfig {
                enabled: 1,
                ..FastPathConfig::default()
            },
            0,
        )?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(PROG_VETH_TO_POD)
            .context("veth_to_pod")?
            .try_into()?;
        prog.load()?;
        prog.attach(&underlay, TcAttachType::Ingress)
            .context("attaching after ours on the underlay")?;
        prog.attach(&vxlan, TcAttachType::Egress)
            .context("attaching after ours on the vxlan device")?;
        Ok(ebpf)
    })
}

/// What the second program has seen so far.
fn seen_by_second(ebpf: &Ebpf) -> Result<u64> {
    let counters: PerCpuArray<_, Counter> =
        PerCpuArray::try_from(ebpf.map(MAP_COUNTERS).context("COUNTERS")?)?;
    let per_cpu = counters.get(&Reason::SlowToPod.index(), 0)?;
    Ok(per_cpu.iter().map(|c| c.packets).sum())
}

fn ours(m: &Member) -> Result<Counters> {
    m.counters()?.context("eBPF counters")
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn other_programs_and_tc_filters_still_see_what_is_not_ours() -> Result<()> {
    share_hooks("hooks", IngressMode::Tc, TcAttachMode::Tcx, "1")
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn with_xdp_ingress_the_rest_of_the_hooks_still_see_what_is_not_ours() -> Result<()> {
    share_hooks("hookx", IngressMode::XdpAndTc, TcAttachMode::Tcx, "1")
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn filters_after_our_legacy_filters_still_see_what_is_not_ours() -> Result<()> {
    share_hooks("hookl", IngressMode::Tc, TcAttachMode::Legacy, "50000")
}

/// Our programs with `ingress`, attached through `tc_attach`, the other
/// legacy filter at priority `prio`.
fn share_hooks(
    name: &str,
    ingress: IngressMode,
    tc_attach: TcAttachMode,
    prio: &str,
) -> Result<()> {
    let lab = Lab::build(&LabSpec::new(name, 2))?;
    let overlay = Overlay::default();
    let dev = overlay.device();
    let options = EbpfOptions {
        tc_attach,
        ..EbpfOptions::default()
    };
    let a = Member::join_with_options(lab.host(1), Kind::Ebpf(ingress), overlay, options)?;
    let b = Member::join(lab.host(2), Kind::Reference, overlay)?;
    mesh(&[&a, &b])?;
    let (h1, h2) = (&a.host, &b.host);
    let ns = h1.ns.as_str();

    // The legacy filters, each mirroring to a spare veth of its own.
    for (mirror, at, hook) in [
        ("mir0", h1.underlay_dev.as_str(), "ingress"),
        ("mir1", dev.as_str(), "egress"),
    ] {
        cmd::ip(
            ns,
            &[
                "link",
                "add",
                mirror,
                "type",
                "veth",
                "peer",
                "name",
                &format!("{mirror}p"),
            ],
        )?;
        cmd::ip(ns, &["link", "set", mirror, "up"])?;
        cmd::ip(ns, &["link", "set", &format!("{mirror}p"), "up"])?;
        // Our legacy filters came with the qdisc.
        if !cmd::run_in(ns, &["tc", "qdisc", "show", "dev", at])?.contains("clsact") {
            cmd::run_in(ns, &["tc", "qdisc", "add", "dev", at, "clsact"])?;
        }
        cmd::run_in(
            ns,
            &[
                "tc", "filter", "add", "dev", at, hook, "prio", prio, "protocol", "all", "u32",
                "match", "u32", "0", "0", "action", "mirred", "egress", "mirror", "dev", mirror,
            ],
        )?;
    }
    let second = second_program(ns, &h1.underlay_dev, &dev)?;

    // Underlay ingress: pings from host 2 to host 1's own address are not
    // VXLAN, so our program passes them on.
    let (mir0, by_second, before) = (dev_stats(ns, "mir0")?, seen_by_second(&second)?, ours(&a)?);
    let out = cmd::run_in(
        &h2.ns,
        &[
            "ping",
            "-q",
            "-c",
            "20",
            "-i",
            "0.05",
            "-W",
            "1",
            &h1.underlay_ip.to_string(),
        ],
    )?;
    ensure!(out.contains("20 received"), "{out}");
    let passed =
        ours(&a)?.get(Reason::PassNotOurs).packets - before.get(Reason::PassNotOurs).packets;
    let mirrored = dev_stats(ns, "mir0")?.since(&mir0).tx_packets;
    let second_saw = seen_by_second(&second)? - by_second;
    eprintln!(
        "underlay: ours passed {passed}, legacy filter {mirrored}, second program {second_saw}"
    );
    ensure!(
        passed >= 20,
        "our program passed only {passed} of the 20 pings"
    );
    ensure!(
        mirrored >= passed && second_saw >= passed,
        "what we passed on the underlay ({passed}) did not reach the rest of the hook: \
         legacy filter {mirrored}, second TCX program {second_saw}"
    );

    // flannel.<VNI> egress: a destination routed to the device but in no
    // lease is not ours to encapsulate.
    cmd::ip(ns, &["route", "add", "10.99.0.0/24", "dev", &dev])?;
    // A neighbour, so the kernel sends the pings themselves, not ARP probes.
    cmd::ip(
        ns,
        &[
            "neigh",
            "add",
            "10.99.0.1",
            "lladdr",
            "02:00:00:00:00:99",
            "dev",
            &dev,
            "nud",
            "permanent",
        ],
    )?;
    let (mir1, by_second, before) = (dev_stats(ns, "mir1")?, seen_by_second(&second)?, ours(&a)?);
    let _ = cmd::command(
        Some(ns),
        &[
            "ping",
            "-q",
            "-c",
            "10",
            "-i",
            "0.1",
            "-W",
            "1",
            "10.99.0.1",
        ],
    )
    .output();
    let after = ours(&a)?;
    let passed = [Reason::PassNoRoute, Reason::PassNotIpv4]
        .iter()
        .map(|r| after.get(*r).packets - before.get(*r).packets)
        .sum::<u64>();
    let mirrored = dev_stats(ns, "mir1")?.since(&mir1).tx_packets;
    let second_saw = seen_by_second(&second)? - by_second;
    eprintln!("{dev}: ours passed {passed}, legacy filter {mirrored}, second program {second_saw}");
    ensure!(
        passed >= 3,
        "our egress program passed only {passed} packets"
    );
    ensure!(
        mirrored >= passed && second_saw >= passed,
        "what we passed on {dev} ({passed}) did not reach the rest of the hook: \
         legacy filter {mirrored}, second TCX program {second_saw}"
    );

    // What is ours is still ours: pod to pod works, nothing after us needed.
    overlay_tests::traffic::ping(&h1.container_ns, h2.container_ip, 5)?;
    drop(second);
    drop((a, b));
    lab.destroy()
}
