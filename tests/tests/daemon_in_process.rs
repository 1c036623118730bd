//! The daemon as a library: `overlay_agent::daemon::run_until` driven in this
//! process, on a thread inside a lab namespace, against a real etcd and the
//! kernel datapath. It walks its stages (visible through `Health`), follows
//! a peer through its watch task, and stops when asked, leaving the lease
//! and the device in place as flanneld does; a stage that fails before the
//! host is touched takes no lease.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use overlay_agent::{
    cli::Cli,
    daemon::{self, Exit, Stopped},
    health::{Health, Phase},
};
use overlay_tests::{
    agent::{Hosts, sh, subnet_of, within},
    etcd::Etcd,
    netns,
};
use tokio::sync::oneshot;

const PREFIX: &str = "/coreos.com/network";
/// Agents allocate up to 10.0.16.0; the peer below sits above that.
const CONFIG: &str = r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "SubnetMin": "10.0.1.0","SubnetMax": "10.0.16.0", "Backend": {"Type": "vxlan"}}"#;
const PEER_X: &str = r#"{"PublicIP":"10.98.0.7","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:07"}}"#;

/// The daemon on its own thread in `ns`; asked to stop when dropped, so a
/// failing test does not leave it running.
struct InProcess {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<Exit>>>,
}

impl InProcess {
    fn start(ns: &str, args: &[String], health: &Health) -> Result<InProcess> {
        let argv = std::iter::once("overlay-agent".to_owned()).chain(args.iter().cloned());
        let cli = Cli::parse_from_go(argv).context("parsing the flags")?;
        let (stop, stopped) = oneshot::channel::<()>();
        let health = health.clone();
        let thread = netns::spawn_in(ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(daemon::run_until(&cli, &health, async {
                let _ = stopped.await;
            }))
        })?;
        Ok(InProcess {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Asks the daemon to stop and waits, at most `limit`, for its result.
    fn stop_within(mut self, limit: Duration) -> Result<Exit> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.join(limit)
    }

    /// Stops a daemon that reached the running stage.
    fn stop(self) -> Result<Stopped> {
        match self.stop_within(Duration::from_secs(20))? {
            Exit::Stopped(s) => Ok(s),
            other => bail!("stopped during start-up: {other:?}"),
        }
    }

    /// Waits (bounded) for the daemon to end on its own.
    fn join(&mut self, limit: Duration) -> Result<Exit> {
        let thread = self.thread.take().context("already joined")?;
        within(limit, "the daemon thread ends", || thread.is_finished())?;
        netns::join(thread)
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = within(Duration::from_secs(20), "the daemon thread ends", || {
                t.is_finished()
            });
        }
    }
}

fn args(etcd: &Etcd, hosts: &Hosts, subnet_file: &std::path::Path) -> Vec<String> {
    vec![
        format!("--etcd-endpoints={}", etcd.endpoints()),
        format!("--iface={}", hosts.ip(2)),
        format!("--subnet-file={}", subnet_file.display()),
        "--datapath=kernel".to_owned(),
    ]
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn the_daemon_runs_in_process_through_its_stages_and_stops_when_asked() -> Result<()> {
    let hosts = Hosts::new("ip", 2)?;
    let etcd = hosts.etcd(1)?;
    etcd.put(&format!("{PREFIX}/config"), CONFIG)?;
    let env = etcd.dir().join("h2.env");
    let health = Health::new();
    let daemon = InProcess::start(&hosts.ns(2), &args(&etcd, &hosts, &env), &health)?;

    within(Duration::from_secs(20), "phase Running", || {
        health.lock().phase == Phase::Running
    })?;
    let own = subnet_of(&env)?;
    let own_key = format!("{PREFIX}/subnets/{own}-24");
    ensure!(etcd.get(&own_key)?.is_some(), "no lease at {own_key}");

    // A peer arrives through the lease watch's task and the reconciler.
    etcd.put(&format!("{PREFIX}/subnets/10.0.17.0-24"), PEER_X)?;
    within(Duration::from_secs(5), "peer programmed", || {
        hosts
            .routes(2)
            .contains("10.0.17.0/24 via 10.0.17.0 dev flannel.1 onlink")
    })?;
    within(Duration::from_secs(5), "health counts the peer", || {
        health.lock().peers_programmed == 1
    })?;
    ensure!(health.lock().etcd_connected, "health says etcd is lost");

    let stopped = daemon.stop()?;
    ensure!(
        stopped.lease.subnet().to_string() == format!("{own}/24"),
        "stopped with lease {}, subnet.env says {own}",
        stopped.lease.subnet()
    );
    ensure!(stopped.peers == 1, "{} peers at the end", stopped.peers);
    ensure!(stopped.device == "flannel.1", "device {}", stopped.device);
    // As with flanneld, the lease and the device outlive the agent.
    ensure!(
        etcd.get(&own_key)?.is_some(),
        "the lease went with the agent"
    );
    sh(&["ip", "-n", &hosts.ns(2), "link", "show", "flannel.1"])?;
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn a_stage_that_fails_before_the_lease_takes_none() -> Result<()> {
    let hosts = Hosts::new("iq", 2)?;
    let etcd = hosts.etcd(1)?;
    etcd.put(&format!("{PREFIX}/config"), CONFIG)?;
    // A subnet file under a regular file: never writable.
    let blocker = etcd.dir().join("not-a-dir");
    std::fs::write(&blocker, "")?;
    let env = blocker.join("h2.env");
    let health = Health::new();
    let mut daemon = InProcess::start(&hosts.ns(2), &args(&etcd, &hosts, &env), &health)?;
    let err = match daemon.join(Duration::from_secs(20)) {
        Ok(exit) => bail!("the daemon ran with an unwritable subnet file: {exit:?}"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(err.contains("--subnet-file"), "error names no flag: {err}");
    let phase = health.lock().phase;
    ensure!(
        phase != Phase::Running && phase != Phase::ProgrammingDatapath,
        "phase {phase:?} after a failed configure stage"
    );
    let leases = etcd.etcdctl(&[
        "get",
        "--prefix",
        "--keys-only",
        &format!("{PREFIX}/subnets/"),
    ])?;
    ensure!(leases.trim().is_empty(), "leases taken: {leases}");
    let links = sh(&["ip", "-n", &hosts.ns(2), "link", "show"])?;
    ensure!(!links.contains("flannel.1"), "flannel.1 created: {links}");
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn a_config_that_appears_late_is_waited_for_and_a_stop_meanwhile_is_prompt() -> Result<()> {
    let hosts = Hosts::new("ir", 2)?;
    let etcd = hosts.etcd(1)?;
    let env = etcd.dir().join("h2.env");

    // No config yet: the daemon waits, touching nothing; a stop ends it.
    let health = Health::new();
    let daemon = InProcess::start(&hosts.ns(2), &args(&etcd, &hosts, &env), &health)?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        health.lock().phase == Phase::WaitingForConfig,
        "phase {:?} without a config",
        health.lock().phase
    );
    match daemon.stop_within(Duration::from_secs(3))? {
        Exit::DuringStartup(Phase::WaitingForConfig) => {}
        other => bail!("stopped as {other:?}"),
    }
    ensure!(!env.exists(), "subnet.env written without a config");

    // Again, and the config appears a while later: the daemon runs.
    let health = Health::new();
    let daemon = InProcess::start(&hosts.ns(2), &args(&etcd, &hosts, &env), &health)?;
    std::thread::sleep(Duration::from_secs(2));
    etcd.put(&format!("{PREFIX}/config"), CONFIG)?;
    within(Duration::from_secs(20), "phase Running", || {
        health.lock().phase == Phase::Running
    })?;
    subnet_of(&env)?;
    daemon.stop()?;
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn it_takes_its_lease_back_resumes_a_cut_watch_and_stops_promptly_with_etcd_down() -> Result<()> {
    let hosts = Hosts::new("is", 2)?;
    let mut etcd = hosts.etcd(1)?;
    etcd.put(&format!("{PREFIX}/config"), CONFIG)?;
    let env = etcd.dir().join("h2.env");
    let health = Health::new();
    let daemon = InProcess::start(&hosts.ns(2), &args(&etcd, &hosts, &env), &health)?;
    within(Duration::from_secs(20), "phase Running", || {
        health.lock().phase == Phase::Running
    })?;
    let own = subnet_of(&env)?;
    let own_key = format!("{PREFIX}/subnets/{own}-24");

    // Our key deleted under us: the keeper writes it back, same subnet.
    etcd.delete(&own_key)?;
    within(Duration::from_secs(10), "our lease back in etcd", || {
        etcd.get(&own_key)
            .ok()
            .flatten()
            .is_some_and(|v| v.contains(&format!("\"PublicIP\":\"{}\"", hosts.ip(2))))
    })?;
    ensure!(
        subnet_of(&env)? == own,
        "subnet.env moved to another subnet"
    );

    // etcd goes away: health says so; it comes back: the watch resumes and
    // a peer written after it is programmed.
    etcd.kill_member(0)?;
    within(Duration::from_secs(15), "health: etcd lost", || {
        !health.lock().etcd_connected
    })?;
    etcd.restart_member(0)?;
    etcd.put(&format!("{PREFIX}/subnets/10.0.17.0-24"), PEER_X)?;
    within(
        Duration::from_secs(15),
        "peer programmed after the cut",
        || {
            hosts
                .routes(2)
                .contains("10.0.17.0/24 via 10.0.17.0 dev flannel.1")
        },
    )?;
    within(Duration::from_secs(5), "health: etcd back", || {
        health.lock().etcd_connected
    })?;

    // With etcd down (the watch and keeper retrying), a stop is prompt.
    etcd.kill_member(0)?;
    std::thread::sleep(Duration::from_secs(1));
    let t0 = std::time::Instant::now();
    match daemon.stop_within(Duration::from_secs(3))? {
        Exit::Stopped(s) => ensure!(s.peers == 1, "{} peers at the end", s.peers),
        other => bail!("stopped as {other:?}"),
    }
    eprintln!("stopped {:?} after the request, etcd down", t0.elapsed());
    Ok(())
}
