//! The fast path follows pods with the real agent (netlink link events,
//! pinned links): a pod veth deleted in the middle of a flow leaves no
//! attachment, pin or map entry behind, an agent restarted after pods came
//! and went while it was down converges on the veths that exist, and one
//! restarted with `--fast-path=off` leaves nothing of the fast path behind.
//! A pod veth the fast path cannot attach to does not keep it from the
//! veths after it, and the periodic recheck tries it again.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result, ensure};
use overlay_tests::{
    agent::{Agent, Bpffs, Cluster, Containers, add_container, add_pod, sh, within},
    stats::attachments,
};

const CONFIG: &str = r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "SubnetMin": "10.0.1.0","SubnetMax": "10.0.20.0", "Backend": {"Type": "vxlan"}}"#;

/// `ip -o link show <dev>` in `ns`: the ifindex.
fn ifindex(ns: &str, dev: &str) -> Result<String> {
    let line = sh(&["ip", "-n", ns, "-o", "link", "show", dev])?;
    Ok(line.split(':').next().unwrap_or_default().trim().to_owned())
}

/// The pinned veth links' names under `pins`.
fn veth_pins(pins: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(pins.join("links"))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("veth_"))
        .collect();
    names.sort();
    Ok(names)
}

/// `bpftool map dump pinned` as JSON.
fn dump(pins: &Path, map: &str) -> Result<serde_json::Value> {
    let path = pins.join(map);
    let out = sh(&[
        "bpftool",
        "-j",
        "map",
        "dump",
        "pinned",
        path.to_str().context("pin path")?,
    ])?;
    Ok(serde_json::from_str(&out)?)
}

fn ping(from: &str, to: &str, count: &str) -> Result<String> {
    sh(&[
        "ip", "netns", "exec", from, "ping", "-q", "-c", count, "-i", "0.05", "-W", "1", to,
    ])
}

/// No fast-path program on any interface (the kernel's TCX query: this
/// bpftool cannot list TCX links).
fn no_veth_programs(ns: &str) -> Result<bool> {
    Ok(attachments(ns)?
        .tcx
        .values()
        .flatten()
        .all(|name| !name.starts_with("veth_")))
}

#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn the_agent_follows_pods_that_come_and_go_also_while_it_is_down() -> Result<()> {
    let cluster = Cluster::start("pl", 2, CONFIG)?;
    let Cluster { hosts, etcd, bin } = &cluster;
    let dir = etcd.dir().to_path_buf();
    let bpf1 = Bpffs::mount(dir.join("bpf1"))?;
    let bpf2 = Bpffs::mount(dir.join("bpf2"))?;
    let (pins1, pins2) = (bpf1.0.join("overlay"), bpf2.0.join("overlay"));
    let args = |i: usize, pins: &Path| {
        let pin_dir = format!("--bpf-pin-dir={}", pins.display());
        cluster.args(i, &["--datapath=ebpf", "--fast-path=on", &pin_dir])
    };
    let args1 = args(1, &pins1);
    let mut a1 = Agent::start(&dir, "h1", &hosts.ns(1), bin, &args1)?;
    let mut a2 = Agent::start(&dir, "h2", &hosts.ns(2), bin, &args(2, &pins2))?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    a2.wait_for("running: lease", Duration::from_secs(20))?;
    let env1 = dir.join("h1.env");
    let (c1, ip1) = add_container(hosts, 1, &env1)?;
    let mut containers = Containers(vec![c1.clone()]);
    let (c2, ip2) = add_container(hosts, 2, &dir.join("h2.env"))?;
    containers.0.push(c2.clone());
    within(Duration::from_secs(5), "c1 reaches c2", || {
        ping(&c1, &ip2, "1").is_ok()
    })?;
    let h1 = hosts.ns(1);
    let vc = ifindex(&h1, "vc")?;
    within(Duration::from_secs(5), "the fast path on vc", || {
        veth_pins(&pins1).is_ok_and(|p| p.len() == 2)
    })
    .with_context(|| format!("agent log:\n{}", a1.log()))?;
    ensure!(
        veth_pins(&pins1)? == [format!("veth_from_pod-{vc}"), format!("veth_to_pod-{vc}")],
        "{:?}",
        veth_pins(&pins1)?
    );

    // 1. The pod's veth is deleted while c2 pings it: its pins, its
    // POD_VETHS entry and every approval through it go.
    ping(&c2, &ip1, "20")?;
    let pinger = std::thread::spawn({
        let (c2, ip1) = (c2.clone(), ip1.clone());
        move || ping(&c2, &ip1, "60")
    });
    std::thread::sleep(Duration::from_millis(500));
    sh(&["ip", "-n", &h1, "link", "del", "vc"])?;
    within(Duration::from_secs(3), "vc's pins removed", || {
        veth_pins(&pins1).is_ok_and(|p| p.is_empty())
    })
    .with_context(|| format!("agent log:\n{}", a1.log()))?;
    let _ = pinger.join();
    let vc_index: u64 = vc.parse()?;
    let pod_veths = dump(&pins1, "POD_VETHS")?;
    ensure!(
        pod_veths.as_array().is_some_and(Vec::is_empty),
        "POD_VETHS still holds {pod_veths}"
    );
    let flows = dump(&pins1, "FAST_FLOWS")?;
    let through_vc = flows
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["formatted"]["value"]["ifindex"].as_u64() == Some(vc_index))
        .count();
    ensure!(through_vc == 0, "approvals through the deleted vc: {flows}");
    ensure!(
        no_veth_programs(&h1)?,
        "still attached: {:?}",
        attachments(&h1)?
    );

    // 2. The agent is down while a new pod comes: the restarted agent
    // attaches to it (and to nothing stale), and it is reached both ways.
    a1.kill9()?;
    let (pod, pod_ip) = add_pod(&h1, &env1, 3)?;
    containers.0.push(pod.clone());
    let mut a1 = Agent::start(&dir, "h1-restarted", &h1, bin, &args1)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    let v3 = ifindex(&h1, "v3")?;
    within(Duration::from_secs(5), "the fast path on v3", || {
        veth_pins(&pins1)
            .is_ok_and(|p| p == [format!("veth_from_pod-{v3}"), format!("veth_to_pod-{v3}")])
    })
    .with_context(|| format!("pins {:?}; agent log:\n{}", veth_pins(&pins1), a1.log()))?;
    let out = ping(&pod, &ip2, "10")?;
    ensure!(out.contains("10 received"), "{out}");
    let out = ping(&c2, &pod_ip, "10")?;
    ensure!(out.contains("10 received"), "{out}");
    let counters = sh(&[
        "ip",
        "netns",
        "exec",
        &h1,
        bin.to_str().context("agent path")?,
        &format!("--etcd-endpoints={}", etcd.endpoints()),
        &format!("-iface={}", hosts.ip(1)),
        &format!("--bpf-pin-dir={}", pins1.display()),
        "status",
    ])?;
    let fast = |reason: &str| -> Option<u64> {
        counters
            .lines()
            .find(|l| l.trim_start().starts_with(reason))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    ensure!(
        fast("fast_egress").is_some_and(|n| n > 0) && fast("fast_ingress").is_some_and(|n| n > 0),
        "the new pod's traffic never took the fast path:\n{counters}"
    );
    ensure!(
        fast("drop_redirect_failed") == Some(0),
        "deliveries failed:\n{counters}"
    );

    // 3. Restarted with --fast-path=off: nothing of the fast path stays (no
    // veth link, no mangle rule), and the pods still reach each other.
    a1.kill9()?;
    let off: Vec<String> = args1
        .iter()
        .map(|a| {
            if a == "--fast-path=on" {
                "--fast-path=off".to_owned()
            } else {
                a.clone()
            }
        })
        .collect();
    let mut a1 = Agent::start(&dir, "h1-fast-path-off", &h1, bin, &off)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    ensure!(
        veth_pins(&pins1)?.is_empty(),
        "veth links left with --fast-path=off: {:?}",
        veth_pins(&pins1)?
    );
    ensure!(
        no_veth_programs(&h1)?,
        "still attached: {:?}",
        attachments(&h1)?
    );
    let mangle = sh(&["ip", "netns", "exec", &h1, "iptables", "-t", "mangle", "-S"])?;
    ensure!(!mangle.contains("FLANNEL-FASTPATH"), "{mangle}");
    let out = ping(&pod, &ip2, "5")?;
    ensure!(out.contains("5 received"), "{out}");
    drop((a1, a2));
    drop(containers);
    Ok(())
}

/// A pod veth whose attach fails (its link's pin path is taken by a
/// directory, which `BPF_OBJ_GET` refuses) comes before another in the
/// sync's order: the other is attached all the same, the failure names the
/// veth, and once the path is free the periodic recheck attaches it, with no
/// link event to prompt it.
#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn a_pod_veth_that_cannot_be_attached_does_not_keep_the_fast_path_from_the_others() -> Result<()> {
    let cluster = Cluster::start("pa", 1, CONFIG)?;
    let Cluster { hosts, etcd, bin } = &cluster;
    let dir = etcd.dir().to_path_buf();
    let bpf1 = Bpffs::mount(dir.join("bpf1"))?;
    let pins1 = bpf1.0.join("overlay");
    let pin_dir = format!("--bpf-pin-dir={}", pins1.display());
    let args1 = cluster.args(
        1,
        &[
            "--datapath=ebpf",
            "--fast-path=auto",
            &pin_dir,
            "--recheck-interval=2s",
        ],
    );
    let mut a1 = Agent::start(&dir, "h1", &hosts.ns(1), bin, &args1)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    let env1 = dir.join("h1.env");
    let (c1, _) = add_container(hosts, 1, &env1)?;
    let mut containers = Containers(vec![c1]);
    let h1 = hosts.ns(1);
    let vc = ifindex(&h1, "vc")?;
    within(Duration::from_secs(5), "the fast path on vc", || {
        veth_pins(&pins1).is_ok_and(|p| p.len() == 2)
    })
    .with_context(|| format!("agent log:\n{}", a1.log()))?;

    // While the agent is down, two pods come; v3 (the lower ifindex, synced
    // first) cannot be attached.
    a1.kill9()?;
    let (p3, _) = add_pod(&h1, &env1, 3)?;
    containers.0.push(p3);
    let (p4, _) = add_pod(&h1, &env1, 4)?;
    containers.0.push(p4);
    let (v3, v4) = (ifindex(&h1, "v3")?, ifindex(&h1, "v4")?);
    ensure!(
        v3.parse::<u32>()? < v4.parse::<u32>()?,
        "v3 #{v3}, v4 #{v4}"
    );
    let blocker = pins1.join(format!("links/veth_from_pod-{v3}"));
    std::fs::create_dir(&blocker)?;
    let mut a1 = Agent::start(&dir, "h1-blocked", &h1, bin, &args1)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    let pair = |i: &str| [format!("veth_from_pod-{i}"), format!("veth_to_pod-{i}")];
    within(Duration::from_secs(5), "the fast path on vc and v4", || {
        veth_pins(&pins1).is_ok_and(|p| pair(&vc).iter().chain(&pair(&v4)).all(|n| p.contains(n)))
    })
    .with_context(|| format!("pins {:?}; agent log:\n{}", veth_pins(&pins1), a1.log()))?;
    let log = a1.log();
    ensure!(
        log.contains(&format!("pod veth v3 (#{v3})")),
        "no error naming v3:\n{log}"
    );
    ensure!(
        !veth_pins(&pins1)?.contains(&format!("veth_to_pod-{v3}")),
        "{:?}",
        veth_pins(&pins1)?
    );
    let att = attachments(&h1)?;
    ensure!(
        att.tcx_on("v4", "ingress")
            .iter()
            .any(|p| p.is("veth_from_pod"))
            && att
                .tcx_on("v4", "egress")
                .iter()
                .any(|p| p.is("veth_to_pod"))
            && att.tcx_on("v3", "ingress").is_empty()
            && att.tcx_on("v3", "egress").is_empty(),
        "{att:?}"
    );

    // The path is free again; no link changes, only the recheck.
    std::fs::remove_dir(&blocker)?;
    within(
        Duration::from_secs(10),
        "the recheck attaches to v3",
        || veth_pins(&pins1).is_ok_and(|p| pair(&v3).iter().all(|n| p.contains(n))),
    )
    .with_context(|| format!("pins {:?}; agent log:\n{}", veth_pins(&pins1), a1.log()))?;
    ensure!(
        a1.log()
            .contains(&format!("fast path: attached to v3 (#{v3})")),
        "{}",
        a1.log()
    );
    drop(a1);
    drop(containers);
    Ok(())
}
