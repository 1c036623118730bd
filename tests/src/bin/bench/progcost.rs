//! What each of a lab's eBPF programs costs per run, from the kernel's own
//! accounting (`BPF_ENABLE_STATS`, the same counters `kernel.bpf_stats_enabled`
//! turns on): run_time_ns / run_cnt over a fixed load.
//!
//! The accounting reads the clock twice per run, which costs more than some
//! of our programs do, so it is on only while this step runs (the file
//! descriptor that turned it on is closed when the step ends, also on an
//! error or a panic). The time covers the program and the helpers it calls,
//! not what the kernel does after it returns (the redirect itself, the
//! encapsulated packet's transmission).

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use aya::programs::{SchedClassifier, TcAttachType};
use overlay_tests::{cmd, netns};

/// One program's runs and run time over a load.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgCost {
    /// The host (1 or 2) whose attachment ran it.
    pub host: usize,
    pub name: String,
    pub runs: u64,
    pub run_time_ns: u64,
}

impl ProgCost {
    pub fn ns_per_run(&self) -> Option<f64> {
        (self.runs > 0).then(|| self.run_time_ns as f64 / self.runs as f64)
    }
}

/// The ids of the programs attached in namespace `ns`: only this lab's
/// programs, not those of other labs (or other users) with the same names.
/// TCX attachments are asked of the kernel per interface (`BPF_PROG_QUERY`;
/// this machine's bpftool does not list TCX), XDP and classic TC ones of
/// `bpftool net show -j`.
pub fn attached_ids(ns: &str) -> Result<Vec<u32>> {
    let out = cmd::run_in(ns, &["bpftool", "net", "show", "-j"])?;
    let json: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("bpftool net show -j: {out}"))?;
    let mut ids = Vec::new();
    collect_ids(&json, &mut ids);
    ids.extend(netns::run_in(ns, tcx_ids)?);
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Programs attached with TCX to any interface of the calling thread's
/// namespace, either direction.
fn tcx_ids() -> Result<Vec<u32>> {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev")
        .context("reading /proc/thread-self/net/dev")?;
    let mut ids = Vec::new();
    for name in text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(n, _)| n.trim())
    {
        for dir in [TcAttachType::Ingress, TcAttachType::Egress] {
            // An interface without TCX programs answers an empty list (or
            // an error on a kernel without TCX): nothing to add either way.
            if let Ok((_, progs)) = SchedClassifier::query_tcx(name, dir) {
                ids.extend(progs.iter().map(|p| p.id()));
            }
        }
    }
    Ok(ids)
}

/// Program ids anywhere in bpftool's net JSON: `prog_id` of TC entries, `id`
/// of XDP ones.
fn collect_ids(v: &serde_json::Value, ids: &mut Vec<u32>) {
    match v {
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_ids(x, ids)),
        serde_json::Value::Object(o) => {
            for (k, x) in o {
                match (k.as_str(), x.as_u64()) {
                    ("prog_id" | "id", Some(id)) => ids.push(id as u32),
                    _ => collect_ids(x, ids),
                }
            }
        }
        _ => {}
    }
}

/// `(name, run_cnt, run_time_ns)` of each program in `ids`.
pub fn snapshot(ids: &[u32]) -> BTreeMap<u32, (String, u64, u64)> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| ids.contains(&p.id()))
        .map(|p| {
            (
                p.id(),
                (
                    p.name_as_str().unwrap_or("?").to_owned(),
                    p.run_count(),
                    p.run_time().as_nanos() as u64,
                ),
            )
        })
        .collect()
}

/// Runs and time between two snapshots, per program of `host`.
pub fn delta(
    host: usize,
    before: &BTreeMap<u32, (String, u64, u64)>,
    after: &BTreeMap<u32, (String, u64, u64)>,
) -> Vec<ProgCost> {
    after
        .iter()
        .filter_map(|(id, (name, runs, ns))| {
            let (_, runs0, ns0) = before.get(id)?;
            Some(ProgCost {
                host,
                name: name.clone(),
                runs: runs.saturating_sub(*runs0),
                run_time_ns: ns.saturating_sub(*ns0),
            })
        })
        .collect()
}

/// Turns the kernel's run-time accounting on until dropped.
pub struct StatsOn(#[allow(dead_code)] std::os::fd::OwnedFd);

impl StatsOn {
    pub fn enable() -> Result<StatsOn> {
        aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map(StatsOn)
            .context("BPF_ENABLE_STATS(BPF_STATS_RUN_TIME)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tcx_and_xdp_program_ids() {
        let json = serde_json::json!([{
            "xdp": [{"devname": "eth0", "ifindex": 2, "mode": "driver", "id": 41}],
            "tc": [
                {"devname": "eth0", "ifindex": 2, "kind": "tcx/ingress", "name": "vxlan_ingress_tc", "prog_id": 42},
                {"devname": "veth1", "ifindex": 7, "kind": "tcx/ingress", "name": "veth_from_pod", "prog_id": 43},
                {"devname": "veth2", "ifindex": 8, "kind": "tcx/ingress", "name": "veth_from_pod", "prog_id": 43}
            ],
            "flow_dissector": []
        }]);
        let mut ids = Vec::new();
        collect_ids(&json, &mut ids);
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids, [41, 42, 43]);
    }

    #[test]
    fn deltas_per_program() {
        let mut a = BTreeMap::new();
        a.insert(7, ("veth_from_pod".to_owned(), 100, 5_000));
        let mut b = a.clone();
        b.insert(7, ("veth_from_pod".to_owned(), 300, 25_000));
        b.insert(8, ("new".to_owned(), 1, 1));
        let d = delta(1, &a, &b);
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].runs, d[0].run_time_ns), (200, 20_000));
        assert_eq!(d[0].ns_per_run(), Some(100.0));
    }
}
