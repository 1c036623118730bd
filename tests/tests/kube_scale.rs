//! Kubernetes mode at 2,000 Nodes, asserting what ends up programmed, not
//! how fast (kube_mode.rs's counterpart of scale.rs): an agent with
//! `--kube-subnet-mgr` starts against the API stand-in holding its own
//! Node, 2,000 Nodes of other flanneld nodes and one with a malformed
//! `public-ip`. While its paged LIST is under way (the stand-in answers
//! slowly, so it takes several pages' time), 20 Nodes are deleted (12 of
//! them in the page already answered), 10 of them added again and 10 new
//! ones added: the agent must apply them from the watch that follows the
//! list. Every Node must end up
//! programmed exactly once (route, neighbour and FDB entry; on eBPF also
//! one REMOTE_SUBNETS and KNOWN_VTEPS entry each), the malformed one
//! skipped with its name logged, and the agent must list once and then
//! watch; then one delete and one add are applied.
//!
//! Runs both datapaths, one test each. The bounds are on progress (no
//! change for 30 s), not on speed.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use anyhow::{Result, bail, ensure};
use overlay_tests::{
    kube_api::simple_node,
    kube_cluster::{KubeCluster, SCALE_NET_CONF, SCALE_OWN_CIDR, node_with, peer_name, peer_node},
    peer_check,
    route_watch::RouteWatch,
};
use serde_json::{Value, json};

const N: usize = 2000;
/// Convergence fails when no route came or went for 30 s (`peer_check`),
/// or after this long in all.
const LIMIT: Duration = Duration::from_secs(300);
/// How long the stand-in waits before answering each request while the
/// first list runs: kube-runtime lists in pages of 500, so the 2,000 Nodes
/// take four pages, over a second.
const SLOW: Duration = Duration::from_millis(300);

#[test]
#[ignore = "needs root and network namespaces: run `cargo xtask test`"]
fn two_thousand_nodes_on_the_kernel_datapath() -> Result<()> {
    scale("kernel")
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn two_thousand_nodes_on_the_ebpf_datapath() -> Result<()> {
    scale("ebpf")
}

/// A Node with flannel's annotations whose public-ip is garbage.
fn malformed() -> Value {
    node_with(
        "malformed",
        &["10.199.255.0/24"],
        json!({
            "flannel.alpha.coreos.com/backend-data": r#"{"VNI":1,"VtepMAC":"0a:ff:00:00:00:01"}"#,
            "flannel.alpha.coreos.com/backend-type": "vxlan",
            "flannel.alpha.coreos.com/kube-subnet-manager": "true",
            "flannel.alpha.coreos.com/public-ip": "not-an-ip",
        }),
    )
}

fn scale(datapath: &str) -> Result<()> {
    let tag = if datapath == "ebpf" { "kse" } else { "ksk" };
    let c = KubeCluster::start(tag, 1)?;
    std::fs::write(&c.net_conf, SCALE_NET_CONF)?;
    let ns = c.hosts.ns(1);
    let pins = c.bpffs.0.join("h1");
    c.api
        .put_node(simple_node(&KubeCluster::node_name(1), SCALE_OWN_CIDR))?;
    let mut nodes: Vec<Value> = (0..N).map(peer_node).collect();
    nodes.push(malformed());
    c.api.put_nodes_bulk(nodes)?;
    let watch = RouteWatch::start(&ns)?;
    c.api.reset_stats();
    c.api.set_delay(SLOW);
    let mut agent = c.start_agent(1, datapath, &[])?;

    // Changes made once the first page of the list was answered and the
    // second asked for, before the list is done (no watch yet): peer0,
    // peer1 and peer10..peer19 were in the first page (names sort as
    // strings), peer2..peer9 are in later ones.
    let t0 = Instant::now();
    while c.api.requests("list", "nodes") < 2 {
        if let Some(code) = agent.exited() {
            bail!(
                "the agent exited ({code}):\n{}",
                peer_check::tail(&agent.log())
            );
        }
        ensure!(t0.elapsed() < LIMIT, "the agent never listed the Nodes");
        std::thread::sleep(Duration::from_millis(2));
    }
    for i in 0..20 {
        c.api.delete_node(&peer_name(i))?;
    }
    for i in (0..10).chain(N..N + 10) {
        c.api.put_node(peer_node(i))?;
    }
    ensure!(
        c.api.requests("watch", "nodes") == 0,
        "the list was over before the changes were made: nothing raced it"
    );
    c.api.set_delay(Duration::ZERO);

    eprintln!("changes made during the list at {:?}", t0.elapsed());
    let mut expected: BTreeSet<usize> = (0..10).chain(20..N + 10).collect();
    peer_check::converge(&ns, &watch, &mut agent, &expected, datapath, &pins, LIMIT)?;
    eprintln!("converged at {:?}", t0.elapsed());
    let log = agent.log();
    ensure!(
        log.lines()
            .any(|l| l.contains("skipping malformed lease") && l.contains("node/malformed")),
        "the malformed Node was not logged with its name:\n{}",
        peer_check::tail(&log)
    );
    // One paged list, then a watch: the changes came from the watch.
    let lists = c.api.requests("list", "nodes");
    let watches = c.api.requests("watch", "nodes");
    ensure!(
        (1..=(N + 10).div_ceil(500) as u64 + 1).contains(&lists) && watches >= 1,
        "expected one paged LIST then a WATCH, got {:?}",
        c.api.request_counts()
    );

    // One delete, one add, on the watch.
    c.api.delete_node(&peer_name(30))?;
    c.api.put_node(peer_node(N + 10))?;
    expected.remove(&30);
    expected.insert(N + 10);
    peer_check::converge(&ns, &watch, &mut agent, &expected, datapath, &pins, LIMIT)?;
    eprintln!("one delete and one add applied at {:?}", t0.elapsed());
    ensure!(
        c.api.requests("list", "nodes") == lists,
        "the agent listed again for single events: {:?}",
        c.api.request_counts()
    );
    drop(watch);
    drop(agent);
    Ok(())
}
