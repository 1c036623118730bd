//! Checks of a host that programs thousands of `peers` (the scale tests of
//! both subnet managers): its routes converge to exactly the expected set,
//! bounded by progress rather than speed, then every other per-peer entry
//! (FDB, neighbour, and on eBPF the REMOTE_SUBNETS and KNOWN_VTEPS maps)
//! exists exactly once.

use std::{
    collections::BTreeSet,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    agent::{Agent, sh},
    peers,
    route_watch::RouteWatch,
};

/// No new route for this long means the agent is stuck.
const STALL: Duration = Duration::from_secs(30);

/// Waits until the routes are `expected` (by the watch, then by `ip
/// route`), then checks every other per-peer entry once.
pub fn converge(
    ns: &str,
    watch: &RouteWatch,
    agent: &mut Agent,
    expected: &BTreeSet<usize>,
    datapath: &str,
    pins: &Path,
    limit_all: Duration,
) -> Result<()> {
    let t0 = Instant::now();
    let want: BTreeSet<String> = expected
        .iter()
        .map(|&i| peers::subnet(i).to_string())
        .collect();
    let mut progress = (watch.count(), Instant::now());
    loop {
        if let Some(code) = agent.exited() {
            bail!("the agent exited ({code}):\n{}", tail(&agent.log()));
        }
        let count_ok = watch.count() == want.len()
            && expected.iter().all(|&i| watch.contains(peers::subnet(i)));
        if count_ok && routes(ns)? == want {
            break;
        }
        if watch.count() != progress.0 {
            progress = (watch.count(), Instant::now());
        }
        if t0.elapsed() > limit_all || progress.1.elapsed() > STALL {
            let got = routes(ns)?;
            bail!(
                "routes not converged (no change for {:?}, {:?} in all): {} present, {} expected; missing {:?}, extra {:?}\n{}",
                progress.1.elapsed(),
                t0.elapsed(),
                got.len(),
                want.len(),
                want.difference(&got).take(5).collect::<Vec<_>>(),
                got.difference(&want).take(5).collect::<Vec<_>>(),
                tail(&agent.log())
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Routes, once each, came first; the rest may follow in the same pass.
    let limit = Duration::from_secs(10);
    let public_ips: BTreeSet<String> = expected
        .iter()
        .map(|&i| peers::public_ip(i).to_string())
        .collect();
    eventually(limit, "one FDB entry per peer", || {
        let fdb = sh(&["bridge", "-n", ns, "fdb", "show", "dev", "flannel.1"])?;
        let dsts: Vec<String> = fdb
            .lines()
            .filter_map(|l| {
                l.split_once(" dst ")?
                    .1
                    .split_whitespace()
                    .next()
                    .map(str::to_owned)
            })
            .collect();
        let unique: BTreeSet<String> = dsts.iter().cloned().collect();
        Ok((
            dsts.len() == unique.len() && unique == public_ips,
            format!("{} entries, {} distinct", dsts.len(), unique.len()),
        ))
    })?;
    let macs: BTreeSet<String> = expected.iter().map(|&i| peers::vtep_mac(i)).collect();
    eventually(limit, "one neighbour per peer", || {
        let neigh = sh(&["ip", "-n", ns, "neigh", "show", "dev", "flannel.1"])?;
        let found: Vec<String> = neigh
            .lines()
            .filter_map(|l| {
                l.split_once(" lladdr ")?
                    .1
                    .split_whitespace()
                    .next()
                    .map(str::to_owned)
            })
            .collect();
        let unique: BTreeSet<String> = found.iter().cloned().collect();
        Ok((
            found.len() == expected.len() && unique == macs,
            format!("{} entries, {} distinct MACs", found.len(), unique.len()),
        ))
    })?;
    if datapath == "ebpf" {
        for (map, n) in [
            ("REMOTE_SUBNETS", expected.len()),
            ("KNOWN_VTEPS", public_ips.len()),
        ] {
            eventually(limit, &format!("{n} {map} entries"), || {
                let got = map_entries(&pins.join(map))?;
                Ok((got == n, format!("{got} entries")))
            })?;
        }
    }
    Ok(())
}

/// The destinations of the routes on `flannel.1`.
pub fn routes(ns: &str) -> Result<BTreeSet<String>> {
    let out = sh(&["ip", "-n", ns, "route", "show", "dev", "flannel.1"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|d| d.contains('/'))
        .map(str::to_owned)
        .collect())
}

pub fn map_entries(pin: &Path) -> Result<usize> {
    let out = sh(&[
        "bpftool",
        "-j",
        "map",
        "dump",
        "pinned",
        pin.to_str().context("pin path")?,
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v.as_array().context("a JSON array")?.len())
}

/// Retries `check` (true when done, and what it saw) until `limit`.
pub fn eventually(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<(bool, String)>,
) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let (ok, seen) = check()?;
        if ok {
            return Ok(());
        }
        if t0.elapsed() > limit {
            bail!("{what}: not within {limit:?} ({seen})");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
