//! Dual stack in Kubernetes mode (`--kube-subnet-mgr` with `EnableIPv6`)
//! on the API stand-in and a dual-stack underlay:
//!
//! - two Nodes with dual-stack `spec.podCIDRs`; our agents (one `kernel`,
//!   one `auto`, which lands on the eBPF datapath, IPv6 through
//!   `flannel-v6.1`) write flanneld's
//!   annotations byte for byte, `backend-v6-data` with `flannel-v6.1`'s MAC
//!   and `public-ipv6` included; node2's `node-public-ipv6` wins over its
//!   interface's address (the device's `local`, the annotation, the peer's
//!   FDB entry all say it);
//! - subnet.env's IPv6 lines, flannel's ip6tables masquerade rule;
//! - pods made by the CNI chain from kube-flannel's conflist get both
//!   families and reach each other over IPv6 and IPv4, both ways;
//! - a dual-stack peer Node missing its IPv6 half is skipped whole, as
//!   flanneld skips it (no IPv4 route either);
//! - across a `kill -9` and a restart with `flannel-v6.1` deleted, the v6
//!   MAC comes back from our `backend-v6-data` annotation, nothing is
//!   written again, and the pods reach each other again.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use overlay_tests::{
    agent::{Agent, link_mac, sh, within},
    cni::{Pod, PodOpts},
    kube_cluster::{KubeCluster, PREFIX, flannel_annotations, node_with},
};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(60);

const NET_CONF: &str = r#"{
  "Network": "10.244.0.0/16",
  "EnableIPv6": true,
  "IPv6Network": "fd10:244::/56",
  "EnableNFTables": false,
  "Backend": {
    "Type": "vxlan"
  }
}"#;

fn pod_cidr6(i: usize) -> String {
    format!("fd10:244:0:{i}::/64")
}

/// Node `node<i>` as kubelet registers it in a dual-stack cluster.
fn dual_node(i: usize) -> Value {
    let mut n =
        overlay_tests::kube_api::simple_node(&KubeCluster::node_name(i), &KubeCluster::pod_cidr(i));
    n["spec"]["podCIDRs"] = json!([KubeCluster::pod_cidr(i), pod_cidr6(i)]);
    n
}

fn mac_of(c: &KubeCluster, i: usize, dev: &str) -> Result<String> {
    link_mac(&c.hosts.ns(i), dev)
}

fn ping(ns: &str, dst: &str, v6: bool) -> bool {
    let fam = if v6 { "-6" } else { "-4" };
    sh(&[
        "ip", "netns", "exec", ns, "ping", fam, "-c", "1", "-W", "1", dst,
    ])
    .is_ok()
}

fn start(c: &KubeCluster, i: usize, datapath: &str) -> Result<Agent> {
    let mut a = c.start_agent(i, datapath, &[])?;
    a.wait_for("running: lease", READY)?;
    Ok(a)
}

#[test]
#[ignore = "needs root, network namespaces and the CNI plugins: run `cargo xtask test`"]
fn dual_stack_nodes_publish_flannels_annotations_and_pods_reach_each_other_over_ipv6() -> Result<()>
{
    let c = KubeCluster::start("kds", 2)?;
    c.hosts.add_ipv6()?;
    // Node 2 publishes a second address of its interface, by annotation.
    sh(&[
        "ip",
        "-n",
        &c.hosts.ns(2),
        "addr",
        "add",
        "fd98::22/64",
        "dev",
        "eth0",
        "nodad",
    ])?;
    std::fs::write(&c.net_conf, NET_CONF)?;
    c.api.put_node(dual_node(1))?;
    let mut n2 = dual_node(2);
    n2["metadata"]["annotations"][format!("{PREFIX}/node-public-ipv6")] = json!("fd98::22");
    c.api.put_node(n2)?;
    let public6 = |i: usize| {
        if i == 2 {
            "fd98::22".to_owned()
        } else {
            c.hosts.ip6(i)
        }
    };

    let mut a1 = start(&c, 1, "kernel")?;
    let a2 = start(&c, 2, "auto")?;
    ensure!(
        a2.log()
            .contains("dual stack: vxlan_egress6 on flannel-v6.1"),
        "{}",
        a2.log()
    );

    // The annotations flanneld writes, byte for byte, from the devices'
    // real MACs; node2's public-ipv6 is its node-public-ipv6.
    for i in 1..=2 {
        let got = c.annotations(i);
        let mut want = flannel_annotations(&mac_of(&c, i, "flannel.1")?, &c.hosts.ip(i));
        want.insert(
            format!("{PREFIX}/backend-v6-data"),
            Some(format!(
                r#"{{"VNI":1,"VtepMAC":"{}"}}"#,
                mac_of(&c, i, "flannel-v6.1")?
            )),
        );
        want.insert(format!("{PREFIX}/public-ipv6"), Some(public6(i)));
        for (k, v) in &want {
            ensure!(
                got.get(k).and_then(Value::as_str) == v.as_deref(),
                "node{i} {k}: {:?}, flanneld writes {v:?}",
                got.get(k)
            );
        }
        let dev = c.ip(i, &["-d", "link", "show", "flannel-v6.1"]);
        ensure!(
            dev.contains(&format!("local {} ", public6(i))),
            "host {i}: {dev}"
        );
    }
    for p in c.api.patches() {
        ensure!(
            p.path.ends_with("/status")
                && p.content_type == "application/strategic-merge-patch+json",
            "{} {}",
            p.path,
            p.content_type
        );
    }

    // subnet.env: flanneld's lines and order, our podCIDRs.
    for i in 1..=2 {
        let text = std::fs::read_to_string(c.subnet_env(i))?;
        let want = format!(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.{i}.1/24\n\
             FLANNEL_IPV6_NETWORK=fd10:244::/56\nFLANNEL_IPV6_SUBNET=fd10:244:0:{i}::1/64\n"
        );
        ensure!(text.starts_with(&want), "host {i}:\n{text}");
        ensure!(text.contains("FLANNEL_IPMASQ=true\n"), "{text}");
    }
    // --ip-masq: flannel's ip6tables rule for IPv6Network and our podCIDR.
    let nat6 = sh(&[
        "ip",
        "netns",
        "exec",
        &c.hosts.ns(1),
        "ip6tables",
        "-t",
        "nat",
        "-S",
        "FLANNEL-POSTRTG",
    ])?;
    ensure!(
        nat6.contains(
            "-A FLANNEL-POSTRTG -s fd10:244:0:1::/64 -d fd10:244::/56 -m comment --comment \"flanneld masq\" -j RETURN"
        ),
        "{nat6}"
    );

    // Each programs the other's IPv6 side: route, neighbour, FDB to the
    // public IPv6 (node2's from its annotation).
    within(Duration::from_secs(10), "the IPv6 peers", || {
        (1..=2).all(|i| {
            let j = 3 - i;
            let route = c.ip(i, &["-6", "route", "show", &pod_cidr6(j)]);
            let fdb = sh(&[
                "bridge",
                "-n",
                &c.hosts.ns(i),
                "fdb",
                "show",
                "dev",
                "flannel-v6.1",
            ])
            .unwrap_or_default();
            route.contains(&format!("via fd10:244:0:{j}:: dev flannel-v6.1"))
                && route.contains("onlink")
                && fdb.contains(&format!("dst {} ", public6(j)))
        })
    })?;

    // Pods from kube-flannel's CNI chain, both families, both ways.
    let p1 = Pod::add(&c.hosts.ns(1), &c.subnet_env(1), "p", PodOpts::default())?;
    let p2 = Pod::add(&c.hosts.ns(2), &c.subnet_env(2), "p", PodOpts::default())?;
    let (v6_1, v6_2) = (
        p1.ipv6.context("pod 1 has no IPv6")?.to_string(),
        p2.ipv6.context("pod 2 has no IPv6")?.to_string(),
    );
    ensure!(v6_1.starts_with("fd10:244:0:1::") && v6_2.starts_with("fd10:244:0:2::"));
    within(Duration::from_secs(10), "pod1 -> pod2 over IPv6", || {
        ping(&p1.netns, &v6_2, true)
    })?;
    within(Duration::from_secs(5), "pod2 -> pod1 over IPv6", || {
        ping(&p2.netns, &v6_1, true)
    })?;
    within(Duration::from_secs(5), "pod1 -> pod2 over IPv4", || {
        ping(&p1.netns, &p2.ip.to_string(), false)
    })?;
    within(Duration::from_secs(5), "pod2 -> pod1 over IPv4", || {
        ping(&p2.netns, &p1.ip.to_string(), false)
    })?;

    // A dual-stack peer whose Node lacks its IPv6 half (no public-ipv6, no
    // backend-v6-data) is skipped whole, IPv4 included, as flanneld skips
    // it; a whole one after it is programmed on both families.
    let half = Value::Object(
        flannel_annotations("0a:00:00:00:00:09", "10.98.0.9")
            .into_iter()
            .map(|(k, v)| (k, json!(v)))
            .collect(),
    );
    c.api.put_node(node_with(
        "half",
        &["10.244.9.0/24", "fd10:244:0:9::/64"],
        half.clone(),
    ))?;
    let mut whole = half;
    whole[format!("{PREFIX}/public-ipv6")] = json!("fd98::10");
    whole[format!("{PREFIX}/backend-v6-data")] =
        json!(r#"{"VNI":1,"VtepMAC":"0a:00:00:00:00:16"}"#);
    c.api.put_node(node_with(
        "whole",
        &["10.244.10.0/24", "fd10:244:0:10::/64"],
        whole,
    ))?;
    within(Duration::from_secs(10), "the whole dual-stack node", || {
        (1..=2).all(|i| {
            !c.ip(i, &["route", "show", "10.244.10.0/24"]).is_empty()
                && c.ip(i, &["-6", "route", "show", "fd10:244:0:10::/64"])
                    .contains("dev flannel-v6.1")
        })
    })?;
    for i in 1..=2 {
        ensure!(
            c.ip(i, &["route", "show", "10.244.9.0/24"]).is_empty()
                && c.ip(i, &["-6", "route", "show", "fd10:244:0:9::/64"])
                    .is_empty(),
            "host {i} programmed the half node"
        );
    }
    ensure!(
        a1.log()
            .lines()
            .any(|l| l.contains("node/half")
                && l.contains(&format!("{PREFIX}/public-ipv6 is missing"))),
        "the half node's reason is logged:\n{}",
        a1.log()
    );
    c.api.delete_node("half")?;
    c.api.delete_node("whole")?;

    // kill -9, flannel-v6.1 gone, and backend-v6-data holding another MAC
    // than the one we would derive: the restart makes the device again with
    // the annotation's MAC (flanneld's GetStoredMacAddresses), so it has
    // nothing to write, and node2 follows the new MAC by the watch.
    a1.kill9()?;
    sh(&["ip", "-n", &c.hosts.ns(1), "link", "del", "flannel-v6.1"])?;
    let stored = "0a:bb:cc:dd:ee:06";
    c.api.patch_node_annotations(
        "node1",
        &[(
            format!("{PREFIX}/backend-v6-data"),
            Some(format!(r#"{{"VNI":1,"VtepMAC":"{stored}"}}"#)),
        )]
        .into(),
    )?;
    let node1_patches = |c: &KubeCluster| {
        c.api
            .patches()
            .iter()
            .filter(|p| p.path.contains("/node1/") && p.body["metadata"]["annotations"].is_object())
            .count()
    };
    let before = node1_patches(&c);
    let _a1 = start(&c, 1, "kernel")?;
    ensure!(
        mac_of(&c, 1, "flannel-v6.1")? == stored,
        "flannel-v6.1 came back with another MAC than backend-v6-data's {stored}"
    );
    ensure!(
        node1_patches(&c) == before,
        "annotations written again though unchanged"
    );
    within(
        Duration::from_secs(10),
        "pod2 -> pod1 over IPv6 again",
        || ping(&p2.netns, &v6_1, true),
    )?;
    within(
        Duration::from_secs(5),
        "pod1 -> pod2 over IPv6 again",
        || ping(&p1.netns, &v6_2, true),
    )?;
    drop((p1, p2));
    Ok(())
}
