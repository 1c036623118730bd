//! Other tools' TC filters never stop the eBPF datapath (issue 17, item 3).
//!
//! On every hook we share (the underlay's ingress and egress, `flannel.1`'s,
//! and the pod veth's) another tool has put filters of every kind this
//! kernel has: a `u32` with a `mirred` action (what made aya 0.14's listing
//! fail: its nested `TCA_U32_ACT` is attribute 7, read as a program name), a
//! classic-BPF `bpf` filter without a name, and an eBPF `bpf` filter named
//! `veth_to_pod` like one of ours, at another priority and handle (a second
//! load of our object, whose disabled fast path passes everything on).
//! `flower` and `matchall` are added too where the kernel has them (this
//! test kernel has neither; the test says so and goes on). Some are there
//! before the agent starts, more are added while it runs.
//!
//! With `--tc-attach=legacy` and `tcx`: the eBPF datapath starts (no
//! fallback) and carries traffic (the pod whose veth has foreign filters is
//! left to the host's path, as any pod whose veth may be shaped is), a `kill -9` and a new start replace ours,
//! `cleanup` removes ours, and every foreign filter keeps its priority,
//! handle and kind throughout, and its traffic: the mirror devices' transmit
//! counters grow.
//!
//! The filters in front of ours (priorities 1 to 4) end with `continue`, so
//! that under legacy clsact our filter at 8472 still runs after them; a
//! filter whose action ends the chain there (the default `pipe` of a
//! mirror) would, as tc always does, keep ours from seeing the packet.

use std::{collections::BTreeSet, time::Duration};

use anyhow::{Context, Result, ensure};
use aya::{
    Ebpf,
    programs::{
        SchedClassifier, TcAttachType,
        tc::{NlOptions, TcAttachOptions, TcHandle},
    },
};
use overlay_agent::datapath::ebpf::EBPF_OBJECT;
use overlay_common::consts::PROG_VETH_TO_POD;
use overlay_tests::{
    agent::{Agent, Bpffs, Cluster, Containers, add_container, sh, within},
    netns,
    stats::{attachments, dev_stats},
};

const CONFIG: &str = r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "SubnetMin": "10.0.1.0","SubnetMax": "10.0.20.0", "Backend": {"Type": "vxlan"}}"#;

/// The hooks we share with the other tool: (device, direction, our program
/// there, the mirror device counting what the other tool's filters saw).
const SITES: [(&str, &str, Option<&str>, &str); 6] = [
    ("eth0", "ingress", Some("vxlan_ingress_tc"), "mi0"),
    ("eth0", "egress", None, "mi1"),
    ("flannel.1", "ingress", None, "mi2"),
    ("flannel.1", "egress", Some("vxlan_egress"), "mi3"),
    ("vc", "ingress", Some("veth_from_pod"), "mi4"),
    ("vc", "egress", Some("veth_to_pod"), "mi5"),
];

/// `tc filter show dev <dev> <dir>` in `ns`.
fn filters(ns: &str, dev: &str, dir: &str) -> Result<String> {
    sh(&["tc", "-n", ns, "filter", "show", "dev", dev, dir])
}

/// The foreign filters of a hook, as `pref P kind handle H` lines: what
/// must not change while the agent comes and goes. A filter's first line
/// names its priority and kind; lines with a handle name an element.
fn foreign(ns: &str, dev: &str, dir: &str) -> Result<BTreeSet<String>> {
    let text = filters(ns, dev, dir)?;
    Ok(text
        .lines()
        // u32 names its elements `fh`, the others `handle`.
        .filter(|l| l.starts_with("filter") && (l.contains(" handle ") || l.contains(" fh ")))
        .filter(|l| !l.contains("pref 8472"))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let after = |key: &str| {
                words
                    .iter()
                    .position(|w| *w == key)
                    .and_then(|i| words.get(i + 1))
                    .copied()
                    .unwrap_or("?")
            };
            let kind = words
                .iter()
                .find(|w| ["u32", "bpf", "flower", "matchall"].contains(w))
                .copied()
                .unwrap_or("?");
            let handle = if words.contains(&"fh") {
                after("fh")
            } else {
                after("handle")
            };
            format!("pref {} {kind} handle {handle}", after("pref"))
        })
        .collect())
}

/// Our legacy filter of `program` on the hook: `bpf` at pref 8472, handle
/// 0x1, named after it.
fn ours_present(ns: &str, dev: &str, dir: &str, program: &str) -> Result<bool> {
    let text = filters(ns, dev, dir)?;
    Ok(text
        .lines()
        .any(|l| l.contains("pref 8472") && l.contains("handle 0x1") && l.contains(program)))
}

/// Adds the other tool's filters in front of ours on every site, at
/// priorities 1 (u32 + mirred), 2 (classic BPF + mirred), 4 and 5 (flower
/// and matchall + mirred, when the kernel has them). Returns the kinds the
/// kernel refused as unknown.
fn add_front_filters(ns: &str) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for (dev, dir, _, mirror) in SITES {
        let base = ["tc", "-n", ns, "filter", "add", "dev", dev, dir];
        let mirror_continue = [
            "action", "mirred", "egress", "mirror", "dev", mirror, "continue",
        ];
        let mut u32_ = base.to_vec();
        u32_.extend([
            "protocol", "all", "pref", "1", "u32", "match", "u32", "0", "0",
        ]);
        u32_.extend(mirror_continue);
        sh(&u32_)?;
        // Classic BPF returning "match" for every packet.
        let mut cbpf = base.to_vec();
        cbpf.extend([
            "protocol",
            "all",
            "pref",
            "2",
            "bpf",
            "bytecode",
            "1,6 0 0 4294967295,",
        ]);
        cbpf.extend(mirror_continue);
        sh(&cbpf)?;
        for (pref, kind) in [("4", "flower"), ("5", "matchall")] {
            let mut f = base.to_vec();
            f.extend(["protocol", "all", "pref", pref, kind]);
            f.extend(mirror_continue);
            if let Err(e) = sh(&f) {
                // This kernel is built without cls_flower and cls_matchall.
                if !missing.contains(&kind.to_owned()) {
                    eprintln!("the kernel refused a {kind} filter, skipping that kind: {e}");
                    missing.push(kind.to_owned());
                }
            }
        }
    }
    Ok(missing)
}

/// The other tool's eBPF filter: `veth_to_pod` from a separate load of our
/// object (its fast path is off, so it passes every packet on), at pref 3
/// handle 7 of every site.
fn add_foreign_ebpf(ns: &str) -> Result<Ebpf> {
    netns::run_in(ns, move || {
        let mut ebpf = Ebpf::load(EBPF_OBJECT).context("loading the object")?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(PROG_VETH_TO_POD)
            .context("veth_to_pod")?
            .try_into()?;
        prog.load()?;
        for (dev, dir, _, _) in SITES {
            let hook = if dir == "ingress" {
                TcAttachType::Ingress
            } else {
                TcAttachType::Egress
            };
            prog.attach_with_options(
                dev,
                hook,
                TcAttachOptions::Netlink(NlOptions {
                    priority: 3,
                    handle: TcHandle::new(0, 7),
                    classid: None,
                }),
            )
            .with_context(|| format!("the foreign eBPF filter on {dev} {dir}"))?;
        }
        Ok(ebpf)
    })
}

/// Filters after ours (no priority given: 49152 and up), added while the
/// agent runs: a u32 mirror with the default action (`pipe`, which ends the
/// chain: nothing runs after it anyway).
fn add_later_filters(ns: &str) -> Result<()> {
    for (dev, dir, _, mirror) in SITES {
        sh(&[
            "tc", "-n", ns, "filter", "add", "dev", dev, dir, "protocol", "ip", "u32", "match",
            "u32", "0", "0", "action", "mirred", "egress", "mirror", "dev", mirror,
        ])?;
    }
    Ok(())
}

/// The foreign filters of every site.
fn all_foreign(ns: &str) -> Result<Vec<BTreeSet<String>>> {
    SITES
        .iter()
        .map(|(dev, dir, _, _)| foreign(ns, dev, dir))
        .collect()
}

/// The transmit counters of the mirror devices.
fn mirrored(ns: &str) -> Result<Vec<u64>> {
    SITES
        .iter()
        .map(|(_, _, _, m)| Ok(dev_stats(ns, m)?.tx_packets))
        .collect()
}

/// A counter of `overlay-agent status`.
fn counter(status: &str, reason: &str) -> u64 {
    status
        .lines()
        .find(|l| l.trim_start().starts_with(reason))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Traffic every site's foreign filters should see: host to host on the
/// underlay, pod to its gateway (local, so not ours on the veth) and pod to
/// the remote pod (over `flannel.1`).
fn traffic(h1: &str, c1: &str, gw1: &str, ip2: &str, peer_ip: &str) -> Result<()> {
    sh(&[
        "ip", "netns", "exec", h1, "ping", "-q", "-c5", "-i0.05", "-W1", peer_ip,
    ])
    .context("host to host")?;
    sh(&[
        "ip", "netns", "exec", c1, "ping", "-q", "-c5", "-i0.05", "-W1", gw1,
    ])
    .context("pod to its gateway")?;
    sh(&[
        "ip", "netns", "exec", c1, "ping", "-q", "-c20", "-i0.05", "-W1", ip2,
    ])
    .context("pod to the remote pod")?;
    Ok(())
}

fn foreign_filters_of_every_kind_coexist(tag: &str, mode: &str) -> Result<()> {
    let cluster = Cluster::start(tag, 2, CONFIG)?;
    let Cluster { hosts, etcd, bin } = &cluster;
    let dir = etcd.dir().to_path_buf();
    let bpf = Bpffs::mount(dir.join("bpf1"))?;
    let pins = bpf.0.join("overlay");
    let pin_dir = format!("--bpf-pin-dir={}", pins.display());
    let tc_attach = format!("--tc-attach={mode}");
    let (h1, h2) = (hosts.ns(1), hosts.ns(2));
    // `auto` must not fall back to the kernel's datapath because of them.
    let args1 = cluster.args(
        1,
        &["--datapath=auto", "--fast-path=on", &pin_dir, &tc_attach],
    );
    let mut a2 = Agent::start(&dir, "h2", &h2, bin, &cluster.args(2, &["--datapath=ebpf"]))?;
    let mut a1 = Agent::start(&dir, "h1", &h1, bin, &args1)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    a2.wait_for("running: lease", Duration::from_secs(20))?;
    let (c1, _) = add_container(hosts, 1, &dir.join("h1.env"))?;
    let mut containers = Containers(vec![c1.clone()]);
    let (c2, ip2) = add_container(hosts, 2, &dir.join("h2.env"))?;
    containers.0.push(c2.clone());
    let gw1 = {
        let text = std::fs::read_to_string(dir.join("h1.env"))?;
        text.lines()
            .find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))
            .and_then(|s| s.split('/').next())
            .context("FLANNEL_SUBNET")?
            .to_owned()
    };
    within(Duration::from_secs(5), "c1 reaches c2", || {
        sh(&["ip", "netns", "exec", &c1, "ping", "-c1", "-W1", &ip2]).is_ok()
    })
    .with_context(|| a1.log())?;

    // The other tool arrives while our agent is down: mirror devices, the
    // clsact qdiscs where missing, its filters in front of ours.
    a1.kill9()?;
    for (dev, _, _, mirror) in SITES {
        // A spare veth (this kernel has no dummy devices): its transmit
        // counter counts what was mirrored to it.
        let peer = format!("{mirror}p");
        sh(&[
            "ip", "-n", &h1, "link", "add", mirror, "type", "veth", "peer", "name", &peer,
        ])?;
        sh(&["ip", "-n", &h1, "link", "set", &peer, "up"])?;
        sh(&["ip", "-n", &h1, "link", "set", mirror, "up"])?;
        // Legacy runs left a clsact qdisc; TCX runs did not.
        let _ = sh(&["tc", "-n", &h1, "qdisc", "add", "dev", dev, "clsact"]);
    }
    let missing = add_front_filters(&h1)?;
    let _foreign_ebpf = add_foreign_ebpf(&h1)?;
    let before = all_foreign(&h1)?;
    for (site, set) in SITES.iter().zip(&before) {
        let want = 3 + 2 - missing.len();
        ensure!(
            set.len() >= want,
            "expected {want} foreign filters on {} {}: {set:?}",
            site.0,
            site.1
        );
    }

    // 1. Start with them present: the eBPF datapath, attached everywhere.
    let check_running = |a: &mut Agent, what: &str| -> Result<()> {
        a.wait_for("running: lease", Duration::from_secs(20))
            .with_context(|| what.to_owned())?;
        let log = a.log();
        ensure!(
            log.contains("eBPF datapath on") && !log.contains("falling back"),
            "{what}: not on the eBPF datapath:\n{log}"
        );
        // Any filter not ours on a pod veth might shape or police its pod:
        // that pod stays on the host's path (see pod_shaping.rs), and the
        // datapath runs everywhere else.
        ensure!(
            log.contains("vc (#") && log.contains("is shaped"),
            "{what}: the pod with foreign filters was not left to the host's path:\n{log}"
        );
        within(Duration::from_secs(5), "nothing of ours on vc", || {
            attachments(&h1).is_ok_and(|a| {
                a.tcx_on("vc", "ingress").is_empty() && a.tcx_on("vc", "egress").is_empty()
            }) && !ours_present(&h1, "vc", "ingress", "veth_from_pod").unwrap_or(true)
                && !ours_present(&h1, "vc", "egress", "veth_to_pod").unwrap_or(true)
        })
        .with_context(|| format!("{what}: {:?}", attachments(&h1)))?;
        if mode == "legacy" {
            for (dev, dir_, program, _) in SITES {
                if dev == "vc" {
                    continue;
                }
                if let Some(program) = program {
                    within(Duration::from_secs(5), "our filter", || {
                        ours_present(&h1, dev, dir_, program).unwrap_or(false)
                    })
                    .with_context(|| {
                        format!(
                            "{what}: {program} not at its place on {dev} {dir_}:\n{}",
                            filters(&h1, dev, dir_).unwrap_or_default()
                        )
                    })?;
                }
            }
        } else {
            within(Duration::from_secs(5), "TCX on eth0 and flannel.1", || {
                attachments(&h1).is_ok_and(|a| {
                    a.tcx_on("eth0", "ingress").len() == 1
                        && a.tcx_on("flannel.1", "egress").len() == 1
                })
            })
            .with_context(|| format!("{what}: {:?}", attachments(&h1)))?;
        }
        Ok(())
    };
    let mut a1 = Agent::start(&dir, "h1-with-foreign", &h1, bin, &args1)?;
    check_running(&mut a1, "start with foreign filters")?;
    ensure!(
        all_foreign(&h1)? == before,
        "the start moved foreign filters: {before:?} -> {:?}",
        all_foreign(&h1)?
    );

    // 2. Their traffic still reaches them, and ours takes the eBPF path.
    let m0 = mirrored(&h1)?;
    traffic(&h1, &c1, &gw1, &ip2, &hosts.ip(2))?;
    let m1 = mirrored(&h1)?;
    for (i, (dev, dir_, _, _)) in SITES.iter().enumerate() {
        // Under TCX our egress program takes every packet for a peer before
        // any clsact filter of flannel.1's egress runs.
        if mode == "tcx" && *dev == "flannel.1" && *dir_ == "egress" {
            continue;
        }
        ensure!(
            m1[i] > m0[i],
            "the foreign filters on {dev} {dir_} saw nothing: {m0:?} -> {m1:?}"
        );
    }
    let status = || -> Result<String> {
        sh(&[
            "ip",
            "netns",
            "exec",
            &h1,
            bin.to_str().context("agent path")?,
            &format!("--etcd-endpoints={}", etcd.endpoints()),
            &format!("-iface={}", hosts.ip(1)),
            &pin_dir,
            "status",
        ])
    };
    let s = status()?;
    ensure!(
        counter(&s, "encapsulated") + counter(&s, "fast_egress") > 0
            && counter(&s, "decapsulated") + counter(&s, "fast_ingress") > 0,
        "the pods' traffic did not take our programs:\n{s}"
    );

    // 3. More foreign filters while it runs, then a pod event (a new veth
    // makes the agent re-read the pods) and a kill -9 and a new start.
    add_later_filters(&h1)?;
    sh(&[
        "ip", "-n", &h1, "link", "add", "vx", "type", "veth", "peer", "name", "vy",
    ])?;
    sh(&["ip", "-n", &h1, "link", "set", "vx", "master", "cni0", "up"])?;
    std::thread::sleep(Duration::from_millis(500));
    ensure!(a1.exited().is_none(), "the agent exited:\n{}", a1.log());
    let with_later = all_foreign(&h1)?;
    a1.kill9()?;
    let mut a1 = Agent::start(&dir, "h1-restarted", &h1, bin, &args1)?;
    check_running(&mut a1, "restart with foreign filters")?;
    ensure!(
        all_foreign(&h1)? == with_later,
        "the restart moved foreign filters: {with_later:?} -> {:?}",
        all_foreign(&h1)?
    );
    let m2 = mirrored(&h1)?;
    traffic(&h1, &c1, &gw1, &ip2, &hosts.ip(2))?;
    let m3 = mirrored(&h1)?;
    for (i, (dev, dir_, _, _)) in SITES.iter().enumerate() {
        if mode == "tcx" && *dev == "flannel.1" && *dir_ == "egress" {
            continue;
        }
        ensure!(
            m3[i] > m2[i],
            "after the restart the foreign filters on {dev} {dir_} saw nothing: {m2:?} -> {m3:?}"
        );
    }

    // 4. cleanup: ours go, theirs stay (flannel.1 goes with its filters).
    a1.kill9()?;
    let out = sh(&[
        "ip",
        "netns",
        "exec",
        &h1,
        bin.to_str().context("agent path")?,
        &format!("--etcd-endpoints={}", etcd.endpoints()),
        &pin_dir,
        "cleanup",
    ])?;
    for (i, (dev, dir_, program, _)) in SITES.iter().enumerate() {
        if *dev == "flannel.1" {
            continue;
        }
        ensure!(
            foreign(&h1, dev, dir_)? == with_later[i],
            "cleanup touched foreign filters on {dev} {dir_}:\n{out}\n{}",
            filters(&h1, dev, dir_)?
        );
        if let Some(program) = program {
            ensure!(
                !ours_present(&h1, dev, dir_, program)?,
                "cleanup left {program} on {dev} {dir_}:\n{out}"
            );
        }
    }
    let att = attachments(&h1)?;
    ensure!(
        att.tcx
            .values()
            .flatten()
            .all(|n| !n.starts_with("vxlan_") && !n.starts_with("veth_from")),
        "cleanup left TCX links of ours: {att:?}"
    );
    drop(a2);
    drop(containers);
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn foreign_filters_coexist_with_legacy_filters() -> Result<()> {
    foreign_filters_of_every_kind_coexist("ffl", "legacy")
}

#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn foreign_filters_coexist_with_tcx_links() -> Result<()> {
    foreign_filters_of_every_kind_coexist("fft", "tcx")
}
