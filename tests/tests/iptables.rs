//! The agent's iptables rules are repaired without a gap and without
//! blocking: a repair replaces our chain's content in one
//! `iptables-restore --noflush` transaction, so traffic crossing a FORWARD
//! whose policy is DROP loses nothing while it runs; and a held xtables lock
//! (legacy iptables) delays only the repair, never the programming of peers.

use std::{
    fs,
    net::{SocketAddrV4, UdpSocket},
    os::unix::fs::symlink,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use overlay_tests::{
    agent::{Agent, Cluster, Containers, Internet, add_container, sh, within},
    netns,
};

/// Agents allocate from 10.0.1.0 to 10.0.16.0; the tests' peers take fixed
/// subnets above (10.0.17.0 and up), so a peer never lands on the key an
/// agent picked at random (that is a lease conflict, not a peer).
const CONFIG: &str = r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "SubnetMin": "10.0.1.0","SubnetMax": "10.0.16.0", "Backend": {"Type": "vxlan"}}"#;
const PREFIX: &str = "/coreos.com/network";
const PEER: &str = r#"{"PublicIP":"10.98.0.7","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:07"}}"#;
/// The FLANNEL-FWD rule the tests delete to force a repair: the traffic
/// they watch leaves the pods, so only the other rule (`-s`) accepts it.
const TO_NETWORK: [&str; 8] = [
    "-d",
    "10.0.0.0/16",
    "-m",
    "comment",
    "--comment",
    "flanneld forward",
    "-j",
    "ACCEPT",
];

fn in_ns<'a>(ns: &'a str, cmd: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(cmd);
    v
}

/// Deletes the `-d <Network>` ACCEPT from FLANNEL-FWD with `iptables`
/// (the binary of one backend or the other).
fn delete_to_network_rule(ns: &str, iptables: &str) -> Result<()> {
    let mut cmd = vec![iptables, "-w", "-D", "FLANNEL-FWD"];
    cmd.extend_from_slice(&TO_NETWORK);
    sh(&in_ns(ns, &cmd))?;
    Ok(())
}

/// FLANNEL-FWD's rules, read with `<iptables>-save`, which (unlike
/// `iptables -S`) does not wait for the xtables lock.
fn fwd_chain(ns: &str, iptables: &str) -> String {
    let save = format!("{iptables}-save");
    sh(&in_ns(ns, &[&save, "-t", "filter"]))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("-A FLANNEL-FWD "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The number after `policy DROP` in `iptables -L FORWARD -v -x`.
fn forward_policy_drops(ns: &str) -> Result<u64> {
    let out = sh(&in_ns(ns, &["iptables", "-L", "FORWARD", "-v", "-x", "-n"]))?;
    let head = out.lines().next().unwrap_or_default();
    head.split("policy DROP ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no policy DROP counter in {head:?}"))
}

/// A child process killed (and reaped) on drop.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "needs root, network namespaces and etcd: run `cargo xtask test`"]
fn a_repair_leaves_no_moment_where_forward_drops() -> Result<()> {
    let cluster = Cluster::start("ig", 1, CONFIG)?;
    let args = cluster.args(1, &["--datapath=kernel", "--iptables-resync=1"]);
    let Cluster { hosts, etcd, bin } = &cluster;
    let dir = etcd.dir().to_path_buf();
    let h1 = hosts.ns(1);
    let mut agent = Agent::start(&dir, "h1", &h1, bin, &args)?;
    agent.wait_for("running: lease", Duration::from_secs(20))?;
    within(Duration::from_secs(5), "FLANNEL-FWD installed", || {
        fwd_chain(&h1, "iptables").contains("-d 10.0.0.0/16")
    })?;
    let (c1, _) = add_container(hosts, 1, &dir.join("h1.env"))?;
    let _containers = Containers(vec![c1.clone()]);
    let inet = Internet::behind(hosts, 1)?;
    // The internet counts (and drops, so it sends no ICMP back) the
    // datagrams that reach it: the stream is one way, pod to internet.
    sh(&in_ns(
        &inet.ns,
        &[
            "iptables", "-A", "INPUT", "-p", "udp", "--dport", "9", "-j", "DROP",
        ],
    ))?;
    // Only our ACCEPTs let the pods' traffic through h1.
    sh(&in_ns(&h1, &["iptables", "-P", "FORWARD", "DROP"]))?;
    // h1 resolves the internet's MAC before the stream starts.
    sh(&in_ns(&h1, &["ping", "-c1", "-W1", Internet::ADDR]))?;

    // A datagram every 200 us from the pod while the test forces repairs.
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        netns::spawn_in(&c1, move || -> Result<u64> {
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            let dst: SocketAddrV4 = format!("{}:9", Internet::ADDR).parse()?;
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                sock.send_to(&sent.to_be_bytes(), dst)?;
                sent += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            Ok(sent)
        })?
    };
    let repairs = (|| -> Result<()> {
        std::thread::sleep(Duration::from_millis(300));
        for i in 0..5 {
            delete_to_network_rule(&h1, "iptables")?;
            within(Duration::from_secs(5), &format!("repair {i}"), || {
                fwd_chain(&h1, "iptables").contains("-d 10.0.0.0/16")
            })?;
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let sent = netns::join(sender)?;
    repairs?;
    // The last datagrams are on their way.
    std::thread::sleep(Duration::from_millis(200));
    let arrived: u64 = sh(&in_ns(
        &inet.ns,
        &["iptables", "-L", "INPUT", "-v", "-x", "-n"],
    ))?
    .lines()
    .find(|l| l.contains("dpt:9"))
    .and_then(|l| l.split_whitespace().next())
    .and_then(|n| n.parse().ok())
    .context("the internet's counter")?;
    let dropped = forward_policy_drops(&h1)?;
    eprintln!("{sent} sent, {arrived} arrived, {dropped} dropped by FORWARD's policy");
    ensure!(sent > 5000, "the stream was too thin to tell: {sent} sent");
    ensure!(
        dropped == 0,
        "{dropped} of {sent} datagrams met FORWARD without our ACCEPT (a repair opened a gap); \
         {arrived} arrived"
    );
    ensure!(
        arrived == sent,
        "{arrived} of {sent} arrived, though FORWARD's policy dropped none"
    );
    let log = agent.log();
    ensure!(
        log.matches("missing or out of order").count() >= 5,
        "the agent logged fewer repairs than the test made:\n{log}"
    );
    Ok(())
}

/// Holds `/run/xtables.lock` (as legacy iptables takes it) until dropped.
/// The lock is host-wide (every network namespace shares /run), so the hold
/// is bounded even if the test dies without dropping it.
struct XtablesLock(Background);

impl XtablesLock {
    const PATH: &str = "/run/xtables.lock";

    fn hold(limit: Duration) -> Result<XtablesLock> {
        let secs = limit.as_secs().to_string();
        let child = Command::new("flock")
            .args([Self::PATH, "sleep", &secs])
            .stdin(Stdio::null())
            .spawn()
            .context("flock")?;
        let lock = XtablesLock(Background(child));
        within(Duration::from_secs(2), "the xtables lock taken", || {
            Command::new("flock")
                .args(["-n", Self::PATH, "true"])
                .status()
                .is_ok_and(|s| !s.success())
        })?;
        Ok(lock)
    }

    fn still_held(&mut self) -> Result<bool> {
        Ok(self.0.0.try_wait()?.is_none())
    }
}

#[test]
#[ignore = "needs root, network namespaces and etcd: run `cargo xtask test`"]
fn a_held_xtables_lock_delays_the_repair_but_not_the_peers() -> Result<()> {
    let cluster = Cluster::start("il", 1, CONFIG)?;
    let args = cluster.args(1, &["--datapath=kernel", "--iptables-resync=1"]);
    let Cluster { hosts, etcd, bin } = &cluster;
    let dir = etcd.dir().to_path_buf();
    let h1 = hosts.ns(1);
    // The agent gets legacy iptables, the backend that takes the lock
    // (nf_tables' iptables ignores it).
    let legacy = dir.join("legacy-iptables");
    fs::create_dir_all(&legacy)?;
    for name in ["iptables", "iptables-save", "iptables-restore"] {
        symlink("/usr/sbin/xtables-legacy-multi", legacy.join(name))?;
    }
    let path = format!(
        "{}:{}",
        legacy.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut agent = Agent::start_with_env(&dir, "h1", &h1, bin, &args, &[("PATH", &path)])?;
    agent.wait_for("running: lease", Duration::from_secs(20))?;
    // flanneld's rules, as legacy iptables prints them.
    within(Duration::from_secs(5), "FLANNEL-FWD installed", || {
        fwd_chain(&h1, "iptables-legacy")
            == "-A FLANNEL-FWD -s 10.0.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
                -A FLANNEL-FWD -d 10.0.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n"
    })?;
    let forward = sh(&in_ns(&h1, &["iptables-legacy-save", "-t", "filter"]))?;
    ensure!(
        forward.contains("-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD"),
        "{forward}"
    );

    // A rule goes missing, and someone holds the lock before the agent's
    // next resync can repair it (if the agent was quicker, again).
    let mut lock = None;
    for _ in 0..3 {
        delete_to_network_rule(&h1, "iptables-legacy")?;
        let held = XtablesLock::hold(Duration::from_secs(6))?;
        if !fwd_chain(&h1, "iptables-legacy").contains("-d 10.0.0.0/16") {
            lock = Some(held);
            break;
        }
    }
    let mut lock =
        lock.context("the agent repaired the rule before the lock was taken, 3 times")?;
    // At least one resync has started and waits for the lock.
    std::thread::sleep(Duration::from_millis(1500));
    ensure!(
        !fwd_chain(&h1, "iptables-legacy").contains("-d 10.0.0.0/16"),
        "repaired while the lock was held: the test holds the wrong lock"
    );

    // A peer joins meanwhile: the reconciler programs it at once.
    etcd.put(&format!("{PREFIX}/subnets/10.0.17.0-24"), PEER)?;
    let took = within(
        Duration::from_secs(1),
        "peer programmed while the lock is held",
        || {
            hosts
                .routes(1)
                .contains("10.0.17.0/24 via 10.0.17.0 dev flannel.1 onlink")
        },
    )?;
    ensure!(
        lock.still_held()?,
        "the lock was released before the peer was programmed"
    );
    eprintln!("peer programmed in {took:?} while the xtables lock was held");

    // Once the lock is free, the repair goes through.
    drop(lock);
    within(
        Duration::from_secs(5),
        "repaired once the lock is free",
        || fwd_chain(&h1, "iptables-legacy").contains("-d 10.0.0.0/16"),
    )?;
    Ok(())
}

/// `ipmasq::ensure` and `remove_all` against the real iptables (nf_tables)
/// in a fresh namespace: flanneld's rules as `iptables -S` prints them,
/// nothing to do on the second run (what iptables-save prints reads back as
/// what we asked for, `--random-fully` and conntrack's `!` included), a
/// reordered chain put back in order, and nothing of ours left after removal.
#[test]
#[ignore = "needs root and network namespaces: run `cargo xtask test`"]
fn ensure_reads_back_what_it_wrote_and_restores_the_order() -> Result<()> {
    use overlay_agent::ipmasq;
    let hosts = overlay_tests::agent::Hosts::new("ir", 1)?;
    let h1 = hosts.ns(1);
    let rules = || {
        let net: ipnet::Ipv4Net = "10.0.0.0/16".parse().unwrap();
        let pod: ipnet::Ipv4Net = "10.0.13.0/24".parse().unwrap();
        let mut r = ipmasq::masq_rules(net, pod, true);
        r.extend(ipmasq::forward_rules(net));
        r.extend(ipmasq::fast_path_rules(
            pod,
            overlay_common::fastpath::DEFAULT_FAST_PATH_MARK,
        ));
        r
    };
    let first = netns::run_in(&h1, move || Ok(ipmasq::ensure(&rules())?))?;
    ensure!(
        first
            == [
                "iptables -t nat chain FLANNEL-POSTRTG (6 rules)",
                "iptables -t nat POSTROUTING jump to FLANNEL-POSTRTG",
                "iptables -t filter chain FLANNEL-FWD (2 rules)",
                "iptables -t filter FORWARD jump to FLANNEL-FWD",
                "iptables -t mangle chain FLANNEL-FASTPATH (3 rules)",
                "iptables -t mangle POSTROUTING jump to FLANNEL-FASTPATH",
            ],
        "{first:?}"
    );
    let nat = sh(&in_ns(&h1, &["iptables", "-t", "nat", "-S"]))?;
    for want in [
        "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n",
        "-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A FLANNEL-POSTRTG -s 10.0.13.0/24 -d 10.0.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A FLANNEL-POSTRTG -s 10.0.0.0/16 -d 10.0.13.0/24 -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A FLANNEL-POSTRTG ! -s 10.0.0.0/16 -d 10.0.13.0/24 -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A FLANNEL-POSTRTG -s 10.0.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully\n\
         -A FLANNEL-POSTRTG ! -s 10.0.0.0/16 -d 10.0.0.0/16 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully\n",
    ] {
        ensure!(nat.contains(want), "missing {want:?} in:\n{nat}");
    }
    let second = netns::run_in(&h1, move || Ok(ipmasq::ensure(&rules())?))?;
    ensure!(second.is_empty(), "a second run changed {second:?}");

    // Someone moves our first ACCEPT to the end and adds a rule of theirs.
    sh(&in_ns(&h1, &["iptables", "-D", "FLANNEL-FWD", "1"]))?;
    sh(&in_ns(
        &h1,
        &[
            "iptables",
            "-A",
            "FLANNEL-FWD",
            "-s",
            "10.0.0.0/16",
            "-m",
            "comment",
            "--comment",
            "flanneld forward",
            "-j",
            "ACCEPT",
        ],
    ))?;
    sh(&in_ns(
        &h1,
        &["iptables", "-A", "FLANNEL-FWD", "-j", "RETURN"],
    ))?;
    let third = netns::run_in(&h1, move || Ok(ipmasq::ensure(&rules())?))?;
    ensure!(
        third == ["iptables -t filter chain FLANNEL-FWD (2 rules)"],
        "{third:?}"
    );
    ensure!(
        fwd_chain(&h1, "iptables")
            == "-A FLANNEL-FWD -s 10.0.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
                -A FLANNEL-FWD -d 10.0.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n",
        "{}",
        fwd_chain(&h1, "iptables")
    );

    let removed = netns::run_in(&h1, || Ok(ipmasq::remove_all()?))?;
    ensure!(removed.len() == 6, "{removed:?}");
    let all = sh(&in_ns(&h1, &["iptables-save"]))?;
    ensure!(!all.contains("FLANNEL"), "left:\n{all}");
    let again = netns::run_in(&h1, || Ok(ipmasq::remove_all()?))?;
    ensure!(again.is_empty(), "{again:?}");
    Ok(())
}
