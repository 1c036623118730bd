//! `--tc-attach=legacy`: the TC programs as cls_bpf filters on the clsact
//! qdisc, as on kernels before 6.6, forced on this one. The agent
//! interoperates with a kernel-vxlan node, `tc filter show` and `bpftool net
//! show` list its filters, a `kill -9` restart and an upgrade replace them in
//! place under traffic without losing a packet, switching to TCX and back
//! leaves one attachment of each program, the kernel datapath afterwards
//! leaves none, and a start that fails half-way through attaching leaves
//! nothing of ours attached either.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use overlay_tests::{
    agent::{Agent, Bpffs, Cluster, Containers, add_container, sh, within},
    cmd::Background,
    stats::{Attachments, attachments},
};

const CONFIG: &str = r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "SubnetMin": "10.0.1.0","SubnetMax": "10.0.20.0", "Backend": {"Type": "vxlan"}}"#;

/// Our filters' priority (the agent's `LEGACY_PRIORITY`).
const PREF: &str = "pref 8472";

/// `tc filter show dev <dev> <dir>` in `ns`.
fn filters(ns: &str, dev: &str, dir: &str) -> Result<String> {
    sh(&["tc", "-n", ns, "filter", "show", "dev", dev, dir])
}

/// The program id of our filter named `program` on `dev`/`dir`, checking
/// it is the only filter of ours there and that it is direct-action at our
/// priority.
fn our_filter(ns: &str, dev: &str, dir: &str, program: &str) -> Result<u64> {
    let text = filters(ns, dev, dir)?;
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w == program))
        .collect();
    ensure!(
        ours.len() == 1,
        "expected one filter {program} on {dev} {dir}:\n{text}"
    );
    let line = ours[0];
    ensure!(line.contains("direct-action"), "not direct-action: {line}");
    ensure!(
        text.lines()
            .any(|l| l.contains(PREF) && l.contains("bpf") && l.contains("handle 0x1")),
        "not at our priority and handle on {dev} {dir}:\n{text}"
    );
    let id = line
        .split_whitespace()
        .skip_while(|w| *w != "id")
        .nth(1)
        .context("no program id")?;
    Ok(id.parse()?)
}

fn no_filter_of_ours(ns: &str, dev: &str, dir: &str) -> Result<()> {
    let text = filters(ns, dev, dir).unwrap_or_default();
    for program in [
        "vxlan_ingress_tc",
        "vxlan_egress",
        "veth_from_pod",
        "veth_to_pod",
    ] {
        ensure!(
            !text.contains(program),
            "{program} still filters {dev} {dir}:\n{text}"
        );
    }
    Ok(())
}

fn tcx_names(att: &Attachments) -> Vec<String> {
    att.tcx.values().flatten().cloned().collect()
}

fn link_pins(pins: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(pins.join("links"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn legacy_filters_interoperate_restart_upgrade_switch_and_leave_nothing() -> Result<()> {
    let cluster = Cluster::start("lg", 2, CONFIG)?;
    let Cluster { hosts, etcd, bin } = &cluster;
    let dir = etcd.dir().to_path_buf();
    let bpf = Bpffs::mount(dir.join("bpf1"))?;
    let pins = bpf.0.join("overlay");
    let pin_dir = format!("--bpf-pin-dir={}", pins.display());
    let h1 = hosts.ns(1);
    let args1 = |extra: &[&str]| {
        let mut a = vec!["--datapath=ebpf", pin_dir.as_str()];
        a.extend_from_slice(extra);
        cluster.args(1, &a)
    };
    let legacy = args1(&["--tc-attach=legacy"]);
    // Host 2: the kernel's vxlan driver, programmed as flannel programs it.
    let mut a2 = Agent::start(
        &dir,
        "h2",
        &hosts.ns(2),
        bin,
        &cluster.args(2, &["--datapath=kernel"]),
    )?;
    let mut a1 = Agent::start(&dir, "h1", &h1, bin, &legacy)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    a2.wait_for("running: lease", Duration::from_secs(20))?;
    ensure!(
        a1.log().contains("TC via legacy clsact"),
        "the agent did not say what it attaches through:\n{}",
        a1.log()
    );
    let (c1, _) = add_container(hosts, 1, &dir.join("h1.env"))?;
    let mut containers = Containers(vec![c1.clone()]);
    let (c2, ip2) = add_container(hosts, 2, &dir.join("h2.env"))?;
    containers.0.push(c2.clone());
    within(Duration::from_secs(5), "c1 reaches c2", || {
        sh(&["ip", "netns", "exec", &c1, "ping", "-c1", "-W1", &ip2]).is_ok()
    })
    .with_context(|| a1.log())?;

    // What the operator sees: our filters in tc and bpftool, no TCX link.
    let ingress = our_filter(&h1, "eth0", "ingress", "vxlan_ingress_tc")?;
    let egress = our_filter(&h1, "flannel.1", "egress", "vxlan_egress")?;
    within(Duration::from_secs(5), "the fast path on vc", || {
        our_filter(&h1, "vc", "ingress", "veth_from_pod").is_ok()
            && our_filter(&h1, "vc", "egress", "veth_to_pod").is_ok()
    })
    .with_context(|| {
        format!(
            "{}\n{}",
            filters(&h1, "vc", "ingress").unwrap_or_default(),
            a1.log()
        )
    })?;
    let veth = our_filter(&h1, "vc", "ingress", "veth_from_pod")?;
    let att = attachments(&h1)?;
    ensure!(tcx_names(&att).is_empty(), "TCX links attached: {att:?}");
    let bpftool = serde_json::to_string(&att.bpftool_tc)?;
    for program in ["vxlan_ingress_tc", "vxlan_egress", "veth_from_pod"] {
        ensure!(
            bpftool.contains(program),
            "bpftool net show lacks {program}: {bpftool}"
        );
    }
    ensure!(
        link_pins(&pins).is_empty(),
        "legacy filters need no link pins: {:?}",
        link_pins(&pins)
    );

    // kill -9, restart, upgrade: replaced in place under 100 pings/s.
    let ping = Background::spawn(
        Some(&c1),
        &["ping", "-q", "-i", "0.01", "-c", "1200", "-W", "2", &ip2],
    )?;
    std::thread::sleep(Duration::from_secs(2));
    a1.kill9()?;
    std::thread::sleep(Duration::from_secs(1));
    let mut a1 = Agent::start(&dir, "h1-restarted", &h1, bin, &legacy)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    ensure!(
        a1.log()
            .contains("vxlan_egress: replaced our clsact filter on flannel.1 in place"),
        "the restart did not replace the filter in place:\n{}",
        a1.log()
    );
    let after_restart = (
        our_filter(&h1, "eth0", "ingress", "vxlan_ingress_tc")?,
        our_filter(&h1, "flannel.1", "egress", "vxlan_egress")?,
        our_filter(&h1, "vc", "ingress", "veth_from_pod")?,
    );
    ensure!(
        after_restart.0 != ingress && after_restart.1 != egress && after_restart.2 != veth,
        "the filters still run the old programs: {:?} -> {after_restart:?}",
        (ingress, egress, veth)
    );
    std::thread::sleep(Duration::from_secs(2));
    a1.kill9()?;
    let mut upgrade = legacy.clone();
    upgrade.push(format!(
        "--bpf-object={}",
        overlay_tests::binaries::ebpf_object()?.display()
    ));
    let mut a1 = Agent::start(&dir, "h1-upgraded", &h1, bin, &upgrade)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    let after_upgrade = our_filter(&h1, "flannel.1", "egress", "vxlan_egress")?;
    ensure!(
        after_upgrade != after_restart.1,
        "the upgrade did not swap the program"
    );
    let (sent, received) =
        overlay_tests::traffic::ping_summary(&ping.wait_output(Duration::from_secs(30))?)?;
    ensure!(
        sent == 1200 && received == 1200,
        "pings lost across the restarts: {received} of {sent}"
    );

    // To TCX and back: one attachment of each program at every step.
    a1.kill9()?;
    let mut a1 = Agent::start(&dir, "h1-tcx", &h1, bin, &args1(&["--tc-attach=tcx"]))?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    within(Duration::from_secs(5), "TCX on vc", || {
        attachments(&h1).is_ok_and(|a| a.tcx_on("vc", "ingress").len() == 1)
    })?;
    let att = attachments(&h1)?;
    for (dev, dir_) in [
        ("eth0", "ingress"),
        ("flannel.1", "egress"),
        ("vc", "ingress"),
    ] {
        no_filter_of_ours(&h1, dev, dir_)?;
        ensure!(
            att.tcx_on(dev, dir_).len() == 1,
            "expected one TCX program on {dev} {dir_}: {att:?}"
        );
    }
    ensure!(
        a1.log()
            .contains("moved from a legacy clsact filter to TCX"),
        "{}",
        a1.log()
    );
    a1.kill9()?;
    let mut a1 = Agent::start(&dir, "h1-legacy-again", &h1, bin, &legacy)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    within(Duration::from_secs(5), "legacy on vc", || {
        our_filter(&h1, "vc", "ingress", "veth_from_pod").is_ok()
    })?;
    our_filter(&h1, "eth0", "ingress", "vxlan_ingress_tc")?;
    our_filter(&h1, "flannel.1", "egress", "vxlan_egress")?;
    let att = attachments(&h1)?;
    ensure!(
        tcx_names(&att).is_empty(),
        "TCX links left after moving back to legacy: {att:?}"
    );
    ensure!(link_pins(&pins).is_empty(), "{:?}", link_pins(&pins));
    sh(&[
        "ip", "netns", "exec", &c1, "ping", "-c3", "-i0.2", "-W1", &ip2,
    ])
    .context("c1 -> c2 after the switches")?;

    // The kernel datapath maintains no map: none of our filters stays.
    a1.kill9()?;
    let mut a1 = Agent::start(
        &dir,
        "h1-kernel",
        &h1,
        bin,
        &cluster.args(1, &["--datapath=kernel", &pin_dir]),
    )?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    for (dev, dir_) in [
        ("eth0", "ingress"),
        ("flannel.1", "egress"),
        ("vc", "ingress"),
        ("vc", "egress"),
    ] {
        no_filter_of_ours(&h1, dev, dir_)?;
    }
    let att = attachments(&h1)?;
    ensure!(
        att.is_empty(),
        "attached under the kernel datapath: {att:?}"
    );
    sh(&[
        "ip", "netns", "exec", &c1, "ping", "-c3", "-i0.2", "-W1", &ip2,
    ])
    .context("c1 -> c2 on the kernel datapath")?;
    drop(a1);
    drop(a2);
    drop(containers);
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn a_start_that_fails_half_way_through_attaching_leaves_nothing_of_ours() -> Result<()> {
    let cluster = Cluster::start("lh", 2, CONFIG)?;
    let Cluster { hosts, etcd, bin } = &cluster;
    let dir = etcd.dir().to_path_buf();
    let bpf = Bpffs::mount(dir.join("bpf1"))?;
    let pins = bpf.0.join("overlay");
    let pin_dir = format!("--bpf-pin-dir={}", pins.display());
    let h1 = hosts.ns(1);
    let mut a2 = Agent::start(
        &dir,
        "h2",
        &hosts.ns(2),
        bin,
        &cluster.args(2, &["--datapath=kernel"]),
    )?;
    let ebpf =
        |datapath: &str| cluster.args(1, &[datapath, pin_dir.as_str(), "--tc-attach=legacy"]);
    let mut a1 = Agent::start(&dir, "h1", &h1, bin, &ebpf("--datapath=ebpf"))?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    a2.wait_for("running: lease", Duration::from_secs(20))?;
    our_filter(&h1, "eth0", "ingress", "vxlan_ingress_tc")?;
    a1.kill9()?;
    // Another tool's u32 filter at our priority on flannel.1 egress (in
    // place of ours, which stayed after the kill): our bpf filter cannot go
    // there, so the start fails after the underlay's ingress filter was
    // replaced.
    let tc = |args: &str| {
        let mut v = vec!["tc", "-n", h1.as_str()];
        v.extend(args.split_whitespace());
        sh(&v)
    };
    tc("filter del dev flannel.1 egress pref 8472")?;
    tc("filter add dev flannel.1 egress pref 8472 protocol all u32 match u32 0 0 classid 1:1")?;
    let mut a1 = Agent::start(&dir, "h1-failing", &h1, bin, &ebpf("--datapath=ebpf"))?;
    let failed = within(Duration::from_secs(20), "the agent exits", || {
        a1.exited().is_some()
    });
    failed.with_context(|| a1.log())?;
    ensure!(
        a1.exited() != Some(0),
        "the agent succeeded although attaching failed:\n{}",
        a1.log()
    );
    ensure!(
        a1.log()
            .contains("attaching vxlan_egress to flannel.1 (clsact egress) failed"),
        "{}",
        a1.log()
    );
    for (dev, dir_) in [("eth0", "ingress"), ("flannel.1", "egress")] {
        no_filter_of_ours(&h1, dev, dir_)?;
    }
    ensure!(
        filters(&h1, "flannel.1", "egress")?.contains("u32"),
        "the other tool's filter went too"
    );
    ensure!(!pins.join("REMOTE_SUBNETS").exists() && link_pins(&pins).is_empty());
    ensure!(attachments(&h1)?.tcx.values().all(Vec::is_empty));

    // --datapath=auto falls back to the kernel's driver, which then serves
    // traffic with nothing of ours in the way.
    let mut a1 = Agent::start(&dir, "h1-auto", &h1, bin, &ebpf("--datapath=auto"))?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    ensure!(a1.log().contains("kernel"), "{}", a1.log());
    for (dev, dir_) in [("eth0", "ingress"), ("flannel.1", "egress")] {
        no_filter_of_ours(&h1, dev, dir_)?;
    }
    let (c1, _) = add_container(hosts, 1, &dir.join("h1.env"))?;
    let mut containers = Containers(vec![c1.clone()]);
    let (c2, ip2) = add_container(hosts, 2, &dir.join("h2.env"))?;
    containers.0.push(c2);
    within(
        Duration::from_secs(5),
        "c1 reaches c2 on the fallback",
        || sh(&["ip", "netns", "exec", &c1, "ping", "-c1", "-W1", &ip2]).is_ok(),
    )
    .with_context(|| a1.log())?;
    drop(a1);
    drop(a2);
    drop(containers);
    Ok(())
}
