//! One measurement: an etcd holding `n` leases of other nodes, the release
//! agent started on one host with one datapath, and what it takes to
//! program them, follow single events and bursts, and sit idle.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use etcd_client::Client;
use overlay_tests::{
    agent::{Agent, Cluster},
    netns, peers,
    route_watch::RouteWatch,
};

use crate::{etcd_requests, interrupted, proc_stats, report::Row};

/// Leases added in one burst (a few transactions), then deleted in one.
pub const BURST: usize = 1000;
/// How long the idle agent is watched.
pub const IDLE: Duration = Duration::from_secs(5);
/// Between two single events, so each is applied on its own.
pub const EVENT_GAP: Duration = Duration::from_millis(30);

/// Where the agent's peers come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Manager {
    /// Leases in etcd (flannel's default).
    Etcd,
    /// Nodes of a Kubernetes API server (`--kube-subnet-mgr`).
    Kube,
}

impl Manager {
    pub fn parse(s: &str) -> Result<Manager> {
        Ok(match s {
            "etcd" => Manager::Etcd,
            "kube" => Manager::Kube,
            _ => bail!("unknown subnet manager {s:?} (etcd, kube)"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Manager::Etcd => "etcd",
            Manager::Kube => "kube",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datapath {
    Ebpf,
    Kernel,
}

impl Datapath {
    pub fn parse(s: &str) -> Result<Datapath> {
        Ok(match s {
            "ebpf" => Datapath::Ebpf,
            "kernel" => Datapath::Kernel,
            _ => bail!("unknown datapath {s:?} (ebpf, kernel)"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Datapath::Ebpf => "eBPF",
            Datapath::Kernel => "kernel",
        }
    }

    pub fn flag(self) -> &'static str {
        match self {
            Datapath::Ebpf => "--datapath=ebpf",
            Datapath::Kernel => "--datapath=kernel",
        }
    }
}

/// Runs one case; everything it started is gone when it returns.
pub fn run(n: usize, datapath: Datapath, events: usize) -> Result<Row> {
    let cluster = Cluster::start("cp", 1, &peers::config())?;
    let ns = cluster.hosts.ns(1);
    let url = cluster.etcd.client_urls()[0].clone();
    let args = cluster.args(1, &[datapath.flag()]);
    let dir = cluster.etcd.dir().to_path_buf();
    let bin = cluster.bin.clone();
    let ns_in = ns.clone();
    // The etcd client, the route watch's socket and /metrics all live in
    // the host's namespace: the whole case runs on a thread there.
    let row = netns::run_in(&ns, move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let mut client = rt.block_on(Client::connect([url.as_str()], None))?;
        let lease = rt.block_on(peers::grant(&mut client))?;
        let t = Instant::now();
        rt.block_on(peers::put(&mut client, 0..n, lease))?;
        eprintln!("  {n} leases written in {:.2} s", t.elapsed().as_secs_f64());
        let watch = RouteWatch::start(&ns_in)?;
        let requests_before = etcd_requests::started(&url)?;
        let spawned = Instant::now();
        let mut agent = Agent::start(&dir, "agent", &ns_in, &bin, &args)?;
        let pid = agent.child.id();
        let done = wait(&mut agent, cold_limit(n), |limit| {
            watch.wait_count(n, limit)
        })?;
        let cold = done.duration_since(spawned);
        let cold_cpu = agent_cpu(pid)?;
        let start_requests = etcd_requests::started(&url)? - requests_before;
        eprintln!(
            "  cold start {:.2} s, {cold_cpu:.2} CPU s",
            cold.as_secs_f64()
        );

        // Whatever the agent still does once all is programmed settles first.
        std::thread::sleep(Duration::from_secs(1));
        let idle_from = agent_cpu(pid)?;
        let idle_requests_from = etcd_requests::started(&url)?;
        sleep_unless_interrupted(IDLE)?;
        let idle_cpu = agent_cpu(pid)? - idle_from;
        let idle_requests = etcd_requests::started(&url)? - idle_requests_from;

        let requests_before = etcd_requests::started(&url)?;
        let mut adds = Vec::new();
        let mut deletes = Vec::new();
        let singles: Vec<usize> = (n..n + events).collect();
        for &i in &singles {
            let t = Instant::now();
            rt.block_on(client.put(
                peers::key(i),
                peers::value(i),
                Some(etcd_client::PutOptions::new().with_lease(lease)),
            ))?;
            let seen = wait(&mut agent, Duration::from_secs(10), |limit| {
                watch.wait_route(peers::subnet(i), true, limit)
            })?;
            adds.push(seen.saturating_duration_since(t));
            std::thread::sleep(EVENT_GAP);
        }
        for &i in &singles {
            let t = Instant::now();
            rt.block_on(client.delete(peers::key(i), None))?;
            let seen = wait(&mut agent, Duration::from_secs(10), |limit| {
                watch.wait_route(peers::subnet(i), false, limit)
            })?;
            deletes.push(seen.saturating_duration_since(t));
            std::thread::sleep(EVENT_GAP);
        }
        // Our own puts and deletes are one request each.
        let own = (2 * events) as f64;
        let per_event = (etcd_requests::started(&url)? - requests_before - own) / own;

        let burst: Vec<usize> = (n + events..n + events + BURST).collect();
        let t = Instant::now();
        rt.block_on(peers::put(&mut client, burst.iter().copied(), lease))?;
        let seen = wait(&mut agent, Duration::from_secs(120), |limit| {
            watch.wait_count(n + BURST, limit)
        })?;
        let burst_add = seen.saturating_duration_since(t);
        let t = Instant::now();
        rt.block_on(peers::delete(&mut client, burst.iter().copied()))?;
        let seen = wait(&mut agent, Duration::from_secs(120), |limit| {
            watch.wait_count(n, limit)
        })?;
        let burst_delete = seen.saturating_duration_since(t);

        let rss = proc_stats::peak_rss_mib(pid)?;
        let resyncs = watch.resyncs();
        drop(agent);
        Ok(Row {
            n,
            datapath: datapath.name(),
            manager: Manager::Etcd.name(),
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
            request_kinds: String::new(),
            phases: String::new(),
            resyncs,
            floor: None,
        })
    });
    drop(cluster);
    let mut row = row?;
    // Right after the case, under the same load: the kernel's floor for
    // the same N entries of each kind.
    let floor = crate::floor::measure(n).context("measuring the kernel's floor")?;
    eprintln!(
        "  kernel floor {:.2} s (neighbours {:.2}, FDB {:.2}, routes {:.2}): cold start {:.2}x",
        floor.total_s(),
        floor.neighbours_s,
        floor.fdb_s,
        floor.routes_s,
        row.cold_s / floor.total_s()
    );
    row.floor = Some(floor);
    Ok(row)
}

/// A bound for the cold start only a hang exceeds (the current main needs
/// about 20 s for 5,000 peers).
pub fn cold_limit(n: usize) -> Duration {
    Duration::from_secs(60) + Duration::from_millis(30 * n as u64)
}

/// The agent's CPU seconds, once `ip netns exec` and `sh` have exec'd it.
pub fn agent_cpu(pid: u32) -> Result<f64> {
    let comm = proc_stats::comm(pid);
    if comm != "overlay-agent" {
        bail!("pid {pid} is {comm:?}, not the agent");
    }
    proc_stats::cpu_secs(pid)
}

/// Runs `step` in short slices until it succeeds, `limit` passes, the agent
/// exits or Ctrl-C arrives.
pub fn wait(
    agent: &mut Agent,
    limit: Duration,
    mut step: impl FnMut(Duration) -> Result<Instant>,
) -> Result<Instant> {
    let t0 = Instant::now();
    loop {
        match step(Duration::from_millis(250)) {
            Ok(t) => return Ok(t),
            Err(e) => {
                if interrupted() {
                    bail!("interrupted");
                }
                if agent.exited().is_some() {
                    bail!("the agent exited:\n{}", tail(&agent.log(), 30));
                }
                if t0.elapsed() > limit {
                    return Err(e)
                        .with_context(|| format!("agent log:\n{}", tail(&agent.log(), 30)));
                }
            }
        }
    }
}

pub fn sleep_unless_interrupted(d: Duration) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < d {
        if interrupted() {
            bail!("interrupted");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// (p50, p99) in milliseconds, nearest rank.
pub fn percentiles(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let rank = |p: f64| {
        let i = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1e3
    };
    if samples.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    (rank(0.50), rank(0.99))
}
