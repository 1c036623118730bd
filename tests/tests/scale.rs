//! The control plane at 5,000 peers, asserting what ends up programmed, not
//! how fast: an agent starts against an etcd holding 5,000 leases of other
//! nodes and one malformed lease; while it syncs, 20 leases are deleted,
//! 10 of them re-added and 10 new ones added, and etcd is compacted past
//! the revision its first list saw. Every lease must end up programmed
//! exactly once (route, neighbour and FDB entry; on eBPF also one
//! REMOTE_SUBNETS and KNOWN_VTEPS entry each), the malformed one skipped
//! with its key logged; then one delete and one add are applied. On eBPF
//! the agent is then killed (`kill -9`), etcd changed while it is down, and
//! a new agent on the same pins converges to exactly the leases without a
//! duplicate or a leftover.
//!
//! Runs both datapaths, one test each. The bounds are on progress (no
//! change for 30 s), not on speed.

use std::{collections::BTreeSet, time::Duration};

use anyhow::{Result, ensure};
use etcd_client::{Client, PutOptions};
use overlay_tests::{
    agent::{Agent, Bpffs, Cluster},
    netns, peer_check, peers,
    route_watch::RouteWatch,
};

const N: usize = 5000;
/// Convergence fails when no route came or went for 30 s (the unoptimized
/// agent of the test profile at issue 10's start took minutes for 5,000
/// peers, steadily: a bound on progress, not on speed; see `peer_check`)...
/// or after this long in all.
const LIMIT: Duration = Duration::from_secs(600);
/// Below 10.200.0.0 (the agent's range) and above every peer index used.
const MALFORMED_KEY: &str = "/coreos.com/network/subnets/10.199.255.0-24";

#[test]
#[ignore = "needs root, network namespaces and etcd: run `cargo xtask test`"]
fn five_thousand_leases_on_the_kernel_datapath() -> Result<()> {
    scale("kernel")
}

#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn five_thousand_leases_on_the_ebpf_datapath_and_a_restart_on_its_pins() -> Result<()> {
    scale("ebpf")
}

/// The etcd writes of one step, run on a client in the host's namespace.
enum Step {
    Put(Vec<usize>),
    Delete(Vec<usize>),
    Malformed,
    /// Compact to the current revision.
    Compact,
}

fn apply(ns: &str, url: &str, steps: Vec<Step>) -> Result<()> {
    let url = url.to_owned();
    netns::run_async_in(ns, move || async move {
        let mut client = Client::connect([url.as_str()], None).await?;
        let lease = peers::grant(&mut client).await?;
        for step in steps {
            match step {
                Step::Put(v) => {
                    peers::put(&mut client, v, lease).await?;
                }
                Step::Delete(v) => {
                    peers::delete(&mut client, v).await?;
                }
                Step::Malformed => {
                    let opts = PutOptions::new().with_lease(lease);
                    client.put(MALFORMED_KEY, "not json", Some(opts)).await?;
                }
                Step::Compact => peers::compact(&mut client).await?,
            }
        }
        anyhow::Ok(())
    })
}

fn scale(datapath: &str) -> Result<()> {
    let tag = if datapath == "ebpf" { "sce" } else { "sck" };
    let cluster = Cluster::start(tag, 1, &peers::config())?;
    let Cluster { hosts, etcd, bin } = &cluster;
    let ns = hosts.ns(1);
    let url = etcd.client_urls()[0].clone();
    let dir = etcd.dir().to_path_buf();
    let bpf = Bpffs::mount(dir.join("bpf"))?;
    let pins = bpf.0.join("overlay");
    let args = cluster.args(
        1,
        &[
            &format!("--datapath={datapath}"),
            &format!("--bpf-pin-dir={}", pins.display()),
        ],
    );
    apply(
        &ns,
        &url,
        vec![Step::Put((0..N).collect()), Step::Malformed],
    )?;
    let watch = RouteWatch::start(&ns)?;
    let mut agent = Agent::start(&dir, "agent", &ns, bin, &args)?;

    // Changes that race the agent's first list and sync.
    apply(
        &ns,
        &url,
        vec![
            Step::Delete((0..20).collect()),
            Step::Put((0..10).collect()),
            Step::Put((N..N + 10).collect()),
            Step::Compact,
        ],
    )?;
    let mut expected: BTreeSet<usize> = (0..10).chain(20..N + 10).collect();
    peer_check::converge(&ns, &watch, &mut agent, &expected, datapath, &pins, LIMIT)?;
    let log = agent.log();
    ensure!(
        log.lines()
            .any(|l| l.contains("skipping malformed lease") && l.contains(MALFORMED_KEY)),
        "the malformed lease was not logged with its key"
    );

    // One delete, one add.
    apply(
        &ns,
        &url,
        vec![Step::Delete(vec![30]), Step::Put(vec![N + 10])],
    )?;
    expected.remove(&30);
    expected.insert(N + 10);
    peer_check::converge(&ns, &watch, &mut agent, &expected, datapath, &pins, LIMIT)?;

    if datapath == "ebpf" {
        agent.kill9()?;
        // While no agent runs: the next one must both remove and add.
        apply(
            &ns,
            &url,
            vec![Step::Delete(vec![40]), Step::Put(vec![N + 11])],
        )?;
        expected.remove(&40);
        expected.insert(N + 11);
        let mut agent = Agent::start(&dir, "agent-restarted", &ns, bin, &args)?;
        agent.wait_for("running: lease", LIMIT)?;
        ensure!(
            agent.log().contains("swapped into the pinned link"),
            "the restarted agent did not take over the pins:\n{}",
            peer_check::tail(&agent.log())
        );
        peer_check::converge(&ns, &watch, &mut agent, &expected, datapath, &pins, LIMIT)?;
    }
    drop(watch);
    drop(agent);
    drop(bpf);
    Ok(())
}
