//! Kubernetes mode (`--kube-subnet-mgr`) end to end, on the API stand-in
//! (`overlay_tests::kube_api`, proven against kubectl and the Python
//! client in kube_standin.rs) and pods made by the CNI reference plugins
//! from kube-flannel's conflist (`overlay_tests::cni`):
//!
//! - three nodes, our eBPF agent, our kernel agent and a flanneld stand-in
//!   (flanneld's annotations byte for byte, `flannel.1` by iproute2): pods
//!   reach each other both ways, a TCP transfer's digests match, the bulk
//!   takes the fast path on the eBPF node, and our Nodes' annotations and
//!   `NetworkUnavailable` condition are flanneld's;
//! - Nodes added, deleted, a VTEP MAC changed; hostile Nodes (no
//!   annotations, garbage, another node's podCIDR, three podCIDRs) skipped
//!   without harm; the API server stopped and started with the same state
//!   (the datapath keeps forwarding, changes made meanwhile are caught up),
//!   and a watch that expired (410) answered by a re-list;
//! - `kill -9` of the agent under traffic with pins: nothing lost, and the
//!   annotations are not written again when unchanged;
//! - a node without a podCIDR: a clear error naming it; the API server
//!   down at start: waited for.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use overlay_agent::{datapath::pins::PinLayout, inspect};
use overlay_common::counters::Reason;
use overlay_tests::{
    agent::{Agent, sh, within},
    cni::{Pod, PodOpts},
    kube_cluster::{KubeCluster, PREFIX, flannel_annotations, node_with, wait_file},
    traffic,
};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(60);

/// flanneld's annotations for a Node, as the object's `annotations`.
fn annotations_json(mac: &str, ip: &str) -> Value {
    Value::Object(
        flannel_annotations(mac, ip)
            .into_iter()
            .map(|(k, v)| (k, json!(v)))
            .collect(),
    )
}

/// The route flannel programs for a peer's subnet, if host `i` has it.
fn route_to(c: &KubeCluster, i: usize, cidr: &str) -> Option<String> {
    c.ip(i, &["route", "show", cidr])
        .lines()
        .next()
        .map(str::to_owned)
}

/// flannel.1's MAC on host `i`.
fn device_mac(c: &KubeCluster, i: usize) -> Result<String> {
    let out = c.ip(i, &["-o", "link", "show", "flannel.1"]);
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(str::to_owned)
        .with_context(|| format!("no flannel.1 on host {i}: {out}"))
}

/// The neighbour entry for a peer's `.0` address on host `i`.
fn neigh(c: &KubeCluster, i: usize, addr: &str) -> String {
    c.ip(i, &["neigh", "show", addr, "dev", "flannel.1"])
}

/// The fast path's counters on host `i` (eBPF, pins under the cluster's bpffs).
fn counters(c: &KubeCluster, i: usize) -> Result<overlay_agent::datapath::ebpf::Counters> {
    let layout = PinLayout::chosen(Some(&c.bpffs.0.join(format!("h{i}"))));
    Ok(inspect::read(&layout)?
        .context("no pinned eBPF state")?
        .counters)
}

fn start_ready(c: &KubeCluster, i: usize, datapath: &str) -> Result<Agent> {
    let mut a = c.start_agent(i, datapath, &[])?;
    a.wait_for("running: lease", READY)?;
    Ok(a)
}

#[test]
#[ignore = "needs root, network namespaces, eBPF and the CNI plugins: run `cargo xtask test`"]
fn ebpf_kernel_and_flanneld_nodes_reach_each_other_with_flannels_annotations() -> Result<()> {
    let c = KubeCluster::start("kmix", 3)?;
    for i in 1..=3 {
        c.add_node(i)?;
    }
    let flanneld = c.flannel_node(3)?;
    let _a1 = start_ready(&c, 1, "ebpf")?;
    let _a2 = start_ready(&c, 2, "kernel")?;
    ensure!(
        flanneld.sync(&c.api)? == 2,
        "the flanneld stand-in sees both agents"
    );

    // Our Nodes say exactly what flanneld's would, beside kubelet's own
    // annotation, written with a strategic-merge PATCH of nodes/<n>/status.
    for i in 1..=2 {
        let mac = device_mac(&c, i)?;
        let want = flannel_annotations(&mac, &c.hosts.ip(i));
        let got = c.annotations(i);
        for (k, v) in &want {
            ensure!(
                got.get(k).and_then(Value::as_str) == v.as_deref(),
                "node{i} {k}: {:?}, flanneld writes {v:?}",
                got.get(k)
            );
        }
        ensure!(
            got.get("node.alpha.kubernetes.io/ttl").is_some(),
            "kubelet's annotation kept: {got:?}"
        );
        let cond = c.condition(i, "NetworkUnavailable").context("condition")?;
        ensure!(cond["status"] == "False" && cond["reason"] == "FlannelIsUp");
        ensure!(cond["message"] == "Flannel is running on this node");
        ensure!(c.condition(i, "Ready").is_some(), "kubelet's Ready kept");
    }
    let patches = c.api.patches();
    ensure!(!patches.is_empty());
    for p in &patches {
        ensure!(
            p.path.ends_with("/status")
                && p.content_type == "application/strategic-merge-patch+json",
            "{} {}",
            p.path,
            p.content_type
        );
    }

    // Pods as a node makes them, one on each host.
    let pods: Vec<Pod> = (1..=3)
        .map(|i| {
            wait_file(&c.subnet_env(i), READY)?;
            Pod::add(&c.hosts.ns(i), &c.subnet_env(i), "p", PodOpts::default())
        })
        .collect::<Result<_>>()?;
    for a in &pods {
        for b in &pods {
            if a.netns != b.netns {
                traffic::ping(&a.netns, b.ip, 3)
                    .with_context(|| format!("{} -> {}", a.ip, b.ip))?;
            }
        }
    }
    // A transfer in each direction between the eBPF node and each other
    // node: digests match, and on the eBPF node the bulk arrives by the
    // fast path.
    let before = counters(&c, 1)?.get(Reason::FastIngress);
    for (k, other) in [&pods[1], &pods[2]].into_iter().enumerate() {
        for (src, dst) in [(&pods[0], other), (other, &pods[0])] {
            let r =
                traffic::tcp_transfer(&src.netns, &dst.netns, dst.ip, 7000 + k as u16, 8 << 20)?;
            ensure!(
                r.sent_sha256 == r.received_sha256 && r.bytes_received == 8 << 20,
                "{} -> {}: {r:?}",
                src.ip,
                dst.ip
            );
        }
    }
    let fast = counters(&c, 1)?.get(Reason::FastIngress).bytes - before.bytes;
    ensure!(
        fast > 8 << 20,
        "only {fast} bytes took the fast path into pods"
    );
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn nodes_come_and_go_hostile_ones_are_skipped_and_the_api_server_may_fail() -> Result<()> {
    let mut c = KubeCluster::start("kdyn", 2)?;
    c.add_node(1)?;
    c.add_node(2)?;
    let mut agents = vec![start_ready(&c, 1, "ebpf")?, start_ready(&c, 2, "kernel")?];
    let on_both = |c: &KubeCluster, what: &str, f: &dyn Fn(&KubeCluster, usize) -> bool| {
        within(Duration::from_secs(20), what, || (1..=2).all(|i| f(c, i)))
    };
    // Each agent programs the other.
    on_both(&c, "the other node programmed", &|c, i| {
        route_to(c, i, &KubeCluster::pod_cidr(3 - i)).is_some()
    })?;

    // A node added, its MAC changed, then deleted.
    let node9 = |mac: &str| {
        node_with(
            "node9",
            &["10.244.9.0/24"],
            annotations_json(mac, "10.98.0.9"),
        )
    };
    c.api.put_node(node9("0a:00:00:00:00:09"))?;
    on_both(&c, "node9 programmed", &|c, i| {
        route_to(c, i, "10.244.9.0/24")
            .is_some_and(|r| r.contains("via 10.244.9.0 dev flannel.1 onlink"))
            && neigh(c, i, "10.244.9.0").contains("0a:00:00:00:00:09")
    })?;
    c.api.put_node(node9("0a:00:00:00:00:99"))?;
    on_both(&c, "node9's new MAC", &|c, i| {
        neigh(c, i, "10.244.9.0").contains("0a:00:00:00:00:99")
    })?;
    c.api.delete_node("node9")?;
    on_both(&c, "node9 removed", &|c, i| {
        route_to(c, i, "10.244.9.0/24").is_none()
    })?;

    // Hostile Nodes: no annotations at all (flanneld panics, #969), garbage
    // annotations, another node's podCIDR (node2's, newer: node2 keeps it),
    // three podCIDRs. None reaches the datapath; node2 keeps working.
    let good = annotations_json;
    c.api
        .put_node(node_with("bare", &["10.244.20.0/24"], json!(null)))?;
    let mut garbage = good("0a:00:00:00:00:21", "not-an-ip");
    garbage[format!("{PREFIX}/backend-data")] = json!("{\"VNI\":");
    c.api
        .put_node(node_with("garbage", &["10.244.21.0/24"], garbage))?;
    c.api.put_node(node_with(
        "thief",
        &["10.244.2.0/24"],
        good("0a:00:00:00:00:22", "10.98.0.22"),
    ))?;
    c.api.put_node(node_with(
        "three",
        &["10.244.23.0/24", "fd00::/64", "10.244.24.0/24"],
        good("0a:00:00:00:00:23", "10.98.0.23"),
    ))?;
    // A healthy node after them is still programmed: the agent went on.
    c.api.put_node(node_with(
        "late",
        &["10.244.25.0/24"],
        good("0a:00:00:00:00:25", "10.98.0.25"),
    ))?;
    on_both(&c, "the healthy late node programmed", &|c, i| {
        route_to(c, i, "10.244.25.0/24").is_some()
    })?;
    for i in 1..=2 {
        for cidr in [
            "10.244.20.0/24",
            "10.244.21.0/24",
            "10.244.23.0/24",
            "10.244.24.0/24",
        ] {
            ensure!(
                route_to(&c, i, cidr).is_none(),
                "host {i} programmed hostile {cidr}"
            );
        }
    }
    let node2_mac = device_mac(&c, 2)?;
    ensure!(
        neigh(&c, 1, "10.244.2.0").contains(&node2_mac),
        "node2 keeps its podCIDR against a newer claimant: {}",
        neigh(&c, 1, "10.244.2.0")
    );
    let log1 = agents[0].log();
    for needle in ["node/garbage", "node/three", "node/thief"] {
        ensure!(
            log1.contains(needle),
            "{needle} not named in the log:\n{log1}"
        );
    }
    ensure!(
        sh(&[
            "ip",
            "netns",
            "exec",
            &c.hosts.ns(1),
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            "10.244.2.0"
        ])
        .is_ok()
    );

    // The API server goes away: the datapath keeps forwarding; what changed
    // meanwhile is caught up when it is back.
    c.api.stop();
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        sh(&[
            "ip",
            "netns",
            "exec",
            &c.hosts.ns(1),
            "ping",
            "-c",
            "3",
            "-W",
            "2",
            "10.244.2.0"
        ])
        .is_ok(),
        "forwarding stopped with the API server"
    );
    c.api.delete_node("late")?;
    c.api.put_node(node_with(
        "during",
        &["10.244.26.0/24"],
        good("0a:00:00:00:00:26", "10.98.0.26"),
    ))?;
    c.api.start_again()?;
    on_both(&c, "changes made while the API server was down", &|c, i| {
        route_to(c, i, "10.244.26.0/24").is_some() && route_to(c, i, "10.244.25.0/24").is_none()
    })?;

    // A watch that expired: history compacted while the agents were cut
    // off, so their resourceVersion is gone (410 in the stream); the
    // re-list's removals are synthesised.
    let lists_before = c.api.requests("list", "nodes");
    c.api.stop();
    c.api.delete_node("during")?;
    c.api.compact();
    c.api.start_again()?;
    on_both(&c, "removal seen through a re-list", &|c, i| {
        route_to(c, i, "10.244.26.0/24").is_none()
    })?;
    ensure!(
        c.api.requests("list", "nodes") > lists_before,
        "no re-list after the watch expired"
    );
    for a in &mut agents {
        ensure!(a.exited().is_none(), "an agent exited:\n{}", a.log());
    }
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces, eBPF and the CNI plugins: run `cargo xtask test`"]
fn kill_9_under_traffic_loses_nothing_and_does_not_rewrite_annotations() -> Result<()> {
    let c = KubeCluster::start("kkill", 2)?;
    c.add_node(1)?;
    c.add_node(2)?;
    let mut a1 = start_ready(&c, 1, "ebpf")?;
    let _a2 = start_ready(&c, 2, "ebpf")?;
    let p1 = Pod::add(&c.hosts.ns(1), &c.subnet_env(1), "p", PodOpts::default())?;
    let p2 = Pod::add(&c.hosts.ns(2), &c.subnet_env(2), "p", PodOpts::default())?;
    traffic::ping(&p1.netns, p2.ip, 2)?;
    let annotation_patches = |c: &KubeCluster| {
        c.api
            .patches()
            .iter()
            .filter(|p| p.path.contains("/node1/") && p.body["metadata"]["annotations"].is_object())
            .count()
    };
    let before = annotation_patches(&c);
    ensure!(
        before == 1,
        "{before} annotation patches at the first start"
    );
    // 100 pings a second across the restart.
    let pinger = overlay_tests::cmd::Background::spawn(
        Some(&p1.netns),
        &[
            "ping",
            "-i",
            "0.01",
            "-c",
            "600",
            "-W",
            "1",
            &p2.ip.to_string(),
        ],
    )?;
    std::thread::sleep(Duration::from_secs(1));
    a1.kill9()?;
    let mut a1 = c.start_agent(1, "ebpf", &[])?;
    a1.wait_for("running: lease", READY)?;
    let out = pinger.wait_output(Duration::from_secs(30))?;
    ensure!(
        out.contains("600 packets transmitted, 600 received"),
        "pings lost across kill -9:\n{out}"
    );
    ensure!(
        annotation_patches(&c) == before,
        "annotations written again though unchanged"
    );
    Ok(())
}

#[test]
#[ignore = "needs root and network namespaces: run `cargo xtask test`"]
fn a_missing_podcidr_is_named_and_a_late_api_server_is_waited_for() -> Result<()> {
    let mut c = KubeCluster::start("kmiss", 1)?;
    c.api.put_node(node_with("node1", &[], json!({})))?;
    let mut a = c.start_agent(1, "kernel", &[])?;
    let code = {
        let mut code = None;
        within(Duration::from_secs(30), "the agent exits", || {
            code = a.exited();
            code.is_some()
        })?;
        code
    };
    let log = a.log();
    ensure!(code != Some(0), "exit {code:?}");
    ensure!(
        log.contains("node \"node1\"") && log.contains("spec.podCIDR is not assigned"),
        "{log}"
    );
    ensure!(
        !c.subnet_env(1).exists(),
        "subnet.env written without a lease"
    );

    // The API server down when the agent starts: retried, then it runs.
    c.add_node(1)?;
    c.api.stop();
    let mut a = c.start_agent(1, "kernel", &[])?;
    std::thread::sleep(Duration::from_secs(3));
    if let Some(code) = a.exited() {
        bail!("gave up on a late API server ({code}):\n{}", a.log());
    }
    let retries = a.log().matches("connecting to the Kubernetes API").count()
        + a.log().matches("reading our Node").count();
    ensure!(
        retries <= 2,
        "the failure is logged once, not per retry:\n{}",
        a.log()
    );
    c.api.start_again()?;
    a.wait_for("running: lease 10.244.1.0/24", READY)?;
    let _ = Ipv4Addr::LOCALHOST;
    Ok(())
}
