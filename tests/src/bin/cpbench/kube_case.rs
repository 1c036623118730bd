//! The measurement of [`crate::case`] with the Kubernetes subnet manager:
//! the API stand-in (TLS, a bearer token) on the host holding our own Node
//! (podCIDR 10.200.0.0/24) and `n` Nodes of other flanneld nodes (flannel's
//! annotations, the podCIDRs, PublicIPs and VtepMACs of
//! `overlay_tests::peers`), the release agent started as the DaemonSet
//! starts it (`--kube-subnet-mgr`, a kubeconfig, `NODE_NAME`). Nodes are
//! added and deleted in the stand-in's store directly; what the agent asks
//! of the API is counted by the stand-in.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;
use overlay_tests::{
    agent::Agent,
    kube_api::{KubeApi, simple_node},
    kube_cluster::{KubeCluster, SCALE_NET_CONF, SCALE_OWN_CIDR, peer_name, peer_node},
    peers,
    route_watch::RouteWatch,
};

use crate::{
    case::{
        BURST, Datapath, EVENT_GAP, IDLE, Manager, agent_cpu, cold_limit, percentiles,
        sleep_unless_interrupted, wait,
    },
    proc_stats,
    report::Row,
};

/// Every request the stand-in has answered since its last reset.
fn total(api: &KubeApi) -> f64 {
    api.request_counts().values().sum::<u64>() as f64
}

/// The requests by kind, e.g. `list nodes 20, watch nodes 1`.
fn kinds(counts: &BTreeMap<(String, String), u64>) -> String {
    let mut v: Vec<_> = counts.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    v.iter()
        .map(|((verb, pattern), n)| format!("{verb} {pattern} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs one case; everything it started is gone when it returns.
pub fn run(n: usize, datapath: Datapath, events: usize) -> Result<Row> {
    let cluster = KubeCluster::start("cpk", 1)?;
    std::fs::write(&cluster.net_conf, SCALE_NET_CONF)?;
    let api = &cluster.api;
    let ns = cluster.hosts.ns(1);
    let own = KubeCluster::node_name(1);
    api.put_node(simple_node(&own, SCALE_OWN_CIDR))?;
    let t = Instant::now();
    api.put_nodes_bulk((0..n).map(peer_node).collect())?;
    eprintln!("  {n} Nodes stored in {:.2} s", t.elapsed().as_secs_f64());
    // What the DaemonSet passes, less `--ip-masq` (the etcd case runs
    // without it too): the same agent, only the subnet manager differs.
    let args = vec![
        "--kube-subnet-mgr".to_owned(),
        format!("--kubeconfig-file={}", cluster.kubeconfig.display()),
        format!("--net-config-path={}", cluster.net_conf.display()),
        format!("--iface={}", cluster.hosts.ip(1)),
        format!("--subnet-file={}", cluster.subnet_env(1).display()),
        datapath.flag().to_owned(),
    ];
    let watch = RouteWatch::start(&ns)?;
    api.reset_stats();
    let spawned = Instant::now();
    let mut agent = Agent::start_with_env(
        &cluster.dir,
        "agent",
        &ns,
        &cluster.bin,
        &args,
        &[("NODE_NAME", own.as_str())],
    )?;
    let pid = agent.child.id();
    let log = agent.log.clone();
    let (done, phases) = with_phases(api, &log, &watch, spawned, || {
        wait(&mut agent, cold_limit(n), |limit| {
            watch.wait_count(n, limit)
        })
    });
    let cold = done?.duration_since(spawned);
    let phases = format!("{phases}, N-th route {:.2} s", cold.as_secs_f64());
    let cold_cpu = agent_cpu(pid)?;
    let start_requests = total(api);
    let request_kinds = kinds(&api.request_counts());
    eprintln!(
        "  cold start {:.2} s, {cold_cpu:.2} CPU s; {phases}; requests: {request_kinds}",
        cold.as_secs_f64()
    );

    std::thread::sleep(Duration::from_secs(1));
    let idle_from = agent_cpu(pid)?;
    let idle_requests_from = total(api);
    sleep_unless_interrupted(IDLE)?;
    let idle_cpu = agent_cpu(pid)? - idle_from;
    let idle_requests = total(api) - idle_requests_from;

    let requests_before = total(api);
    let mut adds = Vec::new();
    let mut deletes = Vec::new();
    let singles: Vec<usize> = (n..n + events).collect();
    for &i in &singles {
        let node = peer_node(i);
        let t = Instant::now();
        api.put_node(node)?;
        let seen = wait(&mut agent, Duration::from_secs(10), |limit| {
            watch.wait_route(peers::subnet(i), true, limit)
        })?;
        adds.push(seen.saturating_duration_since(t));
        std::thread::sleep(EVENT_GAP);
    }
    for &i in &singles {
        let t = Instant::now();
        api.delete_node(&peer_name(i))?;
        let seen = wait(&mut agent, Duration::from_secs(10), |limit| {
            watch.wait_route(peers::subnet(i), false, limit)
        })?;
        deletes.push(seen.saturating_duration_since(t));
        std::thread::sleep(EVENT_GAP);
    }
    // The benchmark's own changes go to the store, not through the API.
    let per_event = (total(api) - requests_before) / (2 * events) as f64;

    let burst: Vec<usize> = (n + events..n + events + BURST).collect();
    let nodes = burst.iter().map(|&i| peer_node(i)).collect();
    let t = Instant::now();
    api.put_nodes_bulk(nodes)?;
    let seen = wait(&mut agent, Duration::from_secs(120), |limit| {
        watch.wait_count(n + BURST, limit)
    })?;
    let burst_add = seen.saturating_duration_since(t);
    let names: Vec<String> = burst.iter().map(|&i| peer_name(i)).collect();
    let t = Instant::now();
    api.delete_nodes_bulk(&names)?;
    let seen = wait(&mut agent, Duration::from_secs(120), |limit| {
        watch.wait_count(n, limit)
    })?;
    let burst_delete = seen.saturating_duration_since(t);

    let rss = proc_stats::peak_rss_mib(pid)?;
    let resyncs = watch.resyncs();
    drop(agent);
    drop(watch);
    drop(cluster);
    Ok(Row {
        n,
        datapath: datapath.name(),
        manager: Manager::Kube.name(),
        cold_s: cold.as_secs_f64(),
        cold_cpu_s: cold_cpu,
        add_ms: percentiles(&mut adds),
        delete_ms: percentiles(&mut deletes),
        burst_add_s: burst_add.as_secs_f64(),
        burst_delete_s: burst_delete.as_secs_f64(),
        idle_cpu_s: idle_cpu,
        rss_mib: rss,
        start_requests,
        requests_per_event: per_event,
        idle_requests,
        request_kinds,
        phases,
        resyncs,
        floor: None,
    })
}

/// The steps of the cold start, in the order they happen.
const STEPS: [&str; 6] = [
    "connected",
    "own Node read",
    "first LIST",
    "WATCH opened (list done)",
    "first route",
    "\"running\" logged",
];

/// Runs `cold` (the wait for the N-th route) while sampling, every 10 ms,
/// when each of [`STEPS`] was first seen: in the agent's log (its own
/// timestamps are whole seconds), the stand-in's request counters and the
/// route watch. The steps as `step 0.12 s, ...` from `t0`.
fn with_phases<T>(
    api: &KubeApi,
    log: &Path,
    watch: &RouteWatch,
    t0: Instant,
    cold: impl FnOnce() -> T,
) -> (T, String) {
    let stop = AtomicBool::new(false);
    let mut seen: Vec<(&str, Duration)> = Vec::new();
    let out = thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut seen = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let now = t0.elapsed();
                let found = [
                    text.contains("Kubernetes subnet manager: node"),
                    text.contains("lease: node"),
                    api.requests("list", "nodes") > 0,
                    api.requests("watch", "nodes") > 0,
                    watch.count() > 0,
                    text.contains("running: lease"),
                ];
                for (step, ok) in STEPS.iter().zip(found) {
                    if ok && !seen.iter().any(|(k, _)| k == step) {
                        seen.push((*step, now));
                    }
                }
                thread::sleep(Duration::from_millis(10));
            }
            seen
        });
        let out = cold();
        stop.store(true, Ordering::SeqCst);
        seen = sampler.join().unwrap_or_default();
        out
    });
    seen.sort_by_key(|(_, t)| *t);
    let text = seen
        .iter()
        .map(|(step, t)| format!("{step} {:.2} s", t.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ");
    (out, text)
}
