//! The herd figure: many agents on one etcd holding many leases. etcd is
//! killed and restarted under them (their watches resume), then restarted
//! while they cannot reach it and compacted past their revision before
//! they can (every watch must re-list): how long until every agent has
//! applied a change made once etcd is back, and etcd's request rate
//! meanwhile, which shows the agents' jittered backoff.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use etcd_client::Client;
use overlay_tests::{
    agent::{Agent, Hosts, sh},
    binaries,
    etcd::{Etcd, EtcdSpec},
    netns, peers,
    route_watch::RouteWatch,
};

use crate::{case::Datapath, etcd_requests, interrupted};

/// Leases deleted while the agents cannot see etcd, before the compaction.
const DELETED: usize = 100;
/// How long etcd's request rate is sampled after it is back.
const RATE_WINDOW: Duration = Duration::from_secs(10);

pub struct HerdRow {
    pub agents: usize,
    pub peers: usize,
    pub datapath: &'static str,
    /// From starting the agents to every one having every peer.
    pub start_s: f64,
    /// From etcd ready again to every agent routing the lease written then.
    pub restart_s: f64,
    /// etcd's requests in each second of the 10 s after it was ready again
    /// (the benchmark's own write is one).
    pub restart_rate: Vec<f64>,
    /// From the agents reaching the compacted etcd to every one converged.
    pub compact_s: f64,
    pub compact_rate: Vec<f64>,
}

pub fn run(agents: usize, n: usize, datapath: Datapath) -> Result<HerdRow> {
    let bin = binaries::agent()?;
    // Host 1 runs etcd only, so a firewall rule on its eth0 can cut every agent off.
    let hosts = Hosts::new("hd", agents + 1)?;
    let mut etcd = Etcd::start_with(EtcdSpec {
        netns: Some(hosts.ns(1)),
        listen_ip: Some(hosts.ip(1)),
        ..EtcdSpec::default()
    })?;
    etcd.put(&format!("{}/config", peers::PREFIX), &peers::config())?;
    let etcd_ns = hosts.ns(1);
    let url = etcd.client_urls()[0].clone();
    let port = url.rsplit_once(':').context("etcd URL")?.1.to_owned();
    let dir = etcd.dir().to_path_buf();
    let lease = write(&etcd_ns, &url, Write::Put(0..n, None))?;
    eprintln!("  {n} leases written");

    let ids: Vec<usize> = (2..=agents + 1).collect();
    let watches: Vec<RouteWatch> = ids
        .iter()
        .map(|&i| RouteWatch::start(&hosts.ns(i)))
        .collect::<Result<_>>()?;
    let flag = match datapath {
        Datapath::Ebpf => "--datapath=ebpf",
        Datapath::Kernel => "--datapath=kernel",
    };
    let t0 = Instant::now();
    let mut running: Vec<Agent> = Vec::new();
    for &i in &ids {
        let args = vec![
            format!("--etcd-endpoints={url}"),
            format!("-iface={}", hosts.ip(i)),
            format!("--subnet-file={}", dir.join(format!("h{i}.env")).display()),
            flag.to_owned(),
        ];
        running.push(Agent::start(
            &dir,
            &format!("a{i}"),
            &hosts.ns(i),
            &bin,
            &args,
        )?);
    }
    // Every agent sees the n leases and the other agents'.
    let mut expected = n + agents - 1;
    let limit = Duration::from_secs(120) + Duration::from_millis((n * agents) as u64 * 10);
    let start = all(&watches, &mut running, limit, |w| {
        w.wait_count(expected, Duration::from_millis(200))
    })?;
    let start_s = start.duration_since(t0).as_secs_f64();
    eprintln!("  {agents} agents converged {start_s:.1} s after they were started");

    // 1. etcd restarts (kill -9, same data): the watches resume.
    etcd.restart_member(0)?;
    let back = Instant::now();
    let sampler = sample_rate(&etcd_ns, &url)?;
    let marker = n;
    write(&etcd_ns, &url, Write::Put(marker..marker + 1, None))?;
    expected += 1;
    let seen = all(&watches, &mut running, Duration::from_secs(120), |w| {
        w.wait_route(peers::subnet(marker), true, Duration::from_millis(200))
    })?;
    let restart_s = seen.saturating_duration_since(back).as_secs_f64();
    let restart_rate = netns::join(sampler)?;
    eprintln!("  after an etcd restart, all converged in {restart_s:.2} s");

    // 2. etcd restarts while the agents cannot reach it, moves on and is
    // compacted past every agent's revision; then they can.
    let rule = [
        "INPUT", "-i", "eth0", "-p", "tcp", "--dport", &port, "-j", "DROP",
    ];
    iptables(&etcd_ns, "-I", &rule)?;
    etcd.restart_member(0)?;
    let marker2 = n + 1;
    write(&etcd_ns, &url, Write::Delete(0..DELETED))?;
    write(
        &etcd_ns,
        &url,
        Write::Put(marker2..marker2 + 1, Some(lease)),
    )?;
    write(&etcd_ns, &url, Write::Compact)?;
    expected = expected + 1 - DELETED;
    iptables(&etcd_ns, "-D", &rule)?;
    let open = Instant::now();
    let sampler = sample_rate(&etcd_ns, &url)?;
    let seen = all(&watches, &mut running, Duration::from_secs(120), |w| {
        w.wait_count(expected, Duration::from_millis(200))?;
        w.wait_route(peers::subnet(marker2), true, Duration::from_millis(200))
    })?;
    let compact_s = seen.saturating_duration_since(open).as_secs_f64();
    let compact_rate = netns::join(sampler)?;
    eprintln!("  after a compaction past their revision, all converged in {compact_s:.2} s");
    drop(running);
    drop(watches);
    drop(etcd);
    drop(hosts);
    Ok(HerdRow {
        agents,
        peers: n,
        datapath: datapath.name(),
        start_s,
        restart_s,
        restart_rate,
        compact_s,
        compact_rate,
    })
}

enum Write {
    /// With this etcd lease, or a new one.
    Put(std::ops::Range<usize>, Option<i64>),
    Delete(std::ops::Range<usize>),
    Compact,
}

/// One write from inside etcd's namespace; the etcd lease the puts used.
fn write(ns: &str, url: &str, w: Write) -> Result<i64> {
    let url = url.to_owned();
    netns::run_async_in(ns, move || async move {
        let mut client = Client::connect([url.as_str()], None).await?;
        match w {
            Write::Put(range, lease) => {
                let lease = match lease {
                    Some(l) => l,
                    None => peers::grant(&mut client).await?,
                };
                peers::put(&mut client, range, lease).await?;
                Ok(lease)
            }
            Write::Delete(range) => {
                peers::delete(&mut client, range).await?;
                Ok(0)
            }
            Write::Compact => {
                peers::compact(&mut client).await?;
                Ok(0)
            }
        }
    })
}

fn iptables(ns: &str, op: &str, rule: &[&str]) -> Result<()> {
    let mut args = vec!["ip", "netns", "exec", ns, "iptables", "-w", op];
    args.extend_from_slice(rule);
    sh(&args).map(|_| ())
}

/// Waits until `done` holds for every watch; the latest time it became so.
fn all(
    watches: &[RouteWatch],
    agents: &mut [Agent],
    limit: Duration,
    mut done: impl FnMut(&RouteWatch) -> Result<Instant>,
) -> Result<Instant> {
    let t0 = Instant::now();
    let mut latest = None::<Instant>;
    for (w, a) in watches.iter().zip(agents.iter_mut()) {
        loop {
            match done(w) {
                Ok(t) => {
                    latest = Some(latest.map_or(t, |l| l.max(t)));
                    break;
                }
                Err(e) => {
                    if interrupted() {
                        bail!("interrupted");
                    }
                    if let Some(code) = a.exited() {
                        bail!("an agent exited ({code}):\n{}", a.log());
                    }
                    if t0.elapsed() > limit {
                        return Err(e.context(format!("a herd agent, not within {limit:?}")));
                    }
                }
            }
        }
    }
    latest.context("no agents")
}

/// etcd's requests in each second of the [`RATE_WINDOW`] from now, counted
/// on a thread in etcd's namespace while the agents reconnect.
fn sample_rate(ns: &str, url: &str) -> Result<std::thread::JoinHandle<Result<Vec<f64>>>> {
    let url = url.to_owned();
    netns::spawn_in(ns, move || {
        let t0 = Instant::now();
        let mut last = etcd_requests::started(&url)?;
        let mut rate = Vec::new();
        for s in 1..=RATE_WINDOW.as_secs() {
            let next = t0 + Duration::from_secs(s);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            let now = etcd_requests::started(&url)?;
            rate.push(now - last);
            last = now;
        }
        Ok(rate)
    })
}
