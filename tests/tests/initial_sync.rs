//! 5,000 leases, and everything that can happen to them while an agent
//! makes its first sync: deletions, new leases, subnets moving to other
//! nodes, a malformed lease, and a compaction of etcd's history. The agent
//! must end with every valid lease programmed exactly once and nothing
//! else. Behaviour only: the time limits are timeouts, not measurements
//! (`cargo xtask cpbench` measures).

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use anyhow::{Result, ensure};
use overlay_tests::{
    agent::{Agent, Hosts, sh, within},
    etcd::Write,
};

const PREFIX: &str = "/coreos.com/network";
/// The agent allocates from 10.200.0.0 up; the peers sit below.
const CONFIG: &str = r#"{"Network": "10.0.0.0/8", "SubnetLen": 24, "SubnetMin": "10.200.0.0", "SubnetMax": "10.200.255.0", "Backend": {"Type": "vxlan"}}"#;
const PEERS: u32 = 5000;

/// Peer `i`'s subnet (10.1.0.0/24 and up), PublicIP and MAC; `node` tells
/// two owners of one subnet apart.
fn subnet(i: u32) -> String {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 0)) + (i << 8)).to_string()
}
fn key(i: u32) -> String {
    format!("{PREFIX}/subnets/{}-24", subnet(i))
}
fn lease(i: u32, node: u32) -> String {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + node * 65536 + i);
    let [_, _, a, b] = ip.octets();
    format!(
        r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"02:{:02x}:00:00:{a:02x}:{b:02x}"}}}}"#,
        node + 1
    )
}

fn lines_with(out: &str, what: &str) -> usize {
    out.lines().filter(|l| l.contains(what)).count()
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn five_thousand_leases_changing_during_the_first_sync_end_exactly_right() -> Result<()> {
    let bin = overlay_tests::binaries::agent()?;
    let hosts = Hosts::new("is", 2)?;
    let etcd = hosts.etcd(1)?;
    etcd.put(&format!("{PREFIX}/config"), CONFIG)?;
    let mut writes: Vec<Write> = (0..PEERS)
        .map(|i| Write::Put(key(i), lease(i, 0)))
        .collect();
    // One malformed lease among them: skipped, its key logged once.
    let bad_key = format!("{PREFIX}/subnets/10.250.0.0-24");
    writes.push(Write::Put(
        bad_key.clone(),
        r#"{"PublicIP": "100.99"#.into(),
    ));
    etcd.write_many(writes)?;

    let dir = etcd.dir().to_path_buf();
    let args = vec![
        format!("--etcd-endpoints={}", etcd.endpoints()),
        format!("--iface={}", hosts.ip(2)),
        format!("--subnet-file={}", dir.join("h2.env").display()),
        "--datapath=kernel".to_owned(),
    ];
    let mut agent = Agent::start(&dir, "h2", &hosts.ns(2), &bin, &args)?;
    // While it lists and programs: 200 leave, 200 move to another node,
    // 200 new ones join, the malformed one is written again unchanged, and
    // etcd compacts its history up to now.
    let mut churn: Vec<Write> = (0..200).map(|i| Write::Delete(key(i))).collect();
    churn.extend((200..400).map(|i| Write::Put(key(i), lease(i, 1))));
    churn.extend((PEERS..PEERS + 200).map(|i| Write::Put(key(i), lease(i, 0))));
    let revision = etcd.write_many(churn)?;
    etcd.write_many(vec![Write::Put(
        bad_key.clone(),
        r#"{"PublicIP": "100.99"#.into(),
    )])?;
    etcd.etcdctl(&["compact", &revision.to_string()])?;

    let want: BTreeSet<String> = (200..PEERS + 200)
        .map(|i| format!("{}/24 via {} onlink", subnet(i), subnet(i)))
        .collect();
    let ns = hosts.ns(2);
    let routes = || -> BTreeSet<String> {
        sh(&["ip", "-n", &ns, "route", "show", "dev", "flannel.1"])
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" via "))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    };
    within(Duration::from_secs(90), "every lease programmed", || {
        routes() == want
    })
    .map_err(|e| {
        let have = routes();
        let log = agent.log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        e.context(format!(
            "{} routes, {} missing, {} extra; the agent's log ends:\n{}",
            have.len(),
            want.difference(&have).count(),
            have.difference(&want).count(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ))
    })?;
    agent.wait_for("running: lease", Duration::from_secs(30))?;

    // Exactly once: one neighbour and one FDB entry per peer, each FDB entry
    // toward the node that holds the subnet now.
    let neigh = sh(&["ip", "-n", &ns, "neigh", "show", "dev", "flannel.1"])?;
    ensure!(
        lines_with(&neigh, "PERMANENT") == want.len(),
        "{} permanent neighbours for {} peers",
        lines_with(&neigh, "PERMANENT"),
        want.len()
    );
    let fdb = sh(&["bridge", "-n", &ns, "fdb", "show", "dev", "flannel.1"])?;
    let fdb_peers = fdb.lines().filter(|l| l.contains(" dst ")).count();
    ensure!(
        fdb_peers == want.len(),
        "{fdb_peers} FDB entries for {} peers",
        want.len()
    );
    for i in [200, 299, 399] {
        let moved = lease(i, 1);
        let ip = moved.split('"').nth(3).unwrap_or_default();
        ensure!(
            fdb.lines().any(|l| l.contains(&format!("dst {ip} "))),
            "moved peer {}: no FDB entry toward {ip}",
            subnet(i)
        );
    }
    for i in [0, 199] {
        let gone = lease(i, 0);
        let ip = gone.split('"').nth(3).unwrap_or_default();
        ensure!(
            !fdb.lines().any(|l| l.contains(&format!("dst {ip} "))),
            "departed peer {} still has an FDB entry toward {ip}",
            subnet(i)
        );
    }
    let log = agent.log();
    ensure!(
        lines_with(&log, "skipping malformed lease") == 1 && lines_with(&log, "10.250.0.0-24") >= 1,
        "the malformed lease is not logged exactly once with its key:\n{}",
        log.lines()
            .filter(|l| l.contains("malformed"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}
