//! `--ip-masq` end to end: a container reaching an address outside the
//! overlay (a namespace standing for the internet) leaves with its host's
//! address, while container-to-container traffic across the overlay keeps
//! the container's own address; a deleted masquerade rule comes back.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use overlay_tests::agent::{Agent, Cluster, Containers, Internet, add_container, sh, within};

const CONFIG: &str = r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "SubnetMin": "10.0.1.0","SubnetMax": "10.0.20.0", "Backend": {"Type": "vxlan"}}"#;
const HOST_WAN: &str = Internet::HOST_ADDR;
const INTERNET: &str = Internet::ADDR;

/// tcpdump in `ns` for the first `count` ICMP echo requests, killed on drop.
struct Capture(Option<Child>);

impl Capture {
    fn start(ns: &str, dev: &str, count: &str) -> Result<Capture> {
        let child = Command::new("ip")
            .args([
                "netns", "exec", ns, "tcpdump", "-l", "-n", "-i", dev, "-c", count,
            ])
            .args(["icmp[icmptype] == icmp-echo"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        // tcpdump needs a moment to open the socket.
        std::thread::sleep(Duration::from_millis(700));
        Ok(Capture(Some(child)))
    }

    fn output(mut self) -> Result<String> {
        let mut child = self.0.take().context("captured already")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while child.try_wait()?.is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let out = child.wait_with_output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn masquerades_to_the_internet_but_not_across_the_overlay() -> Result<()> {
    let cluster = Cluster::start("mq", 2, CONFIG)?;
    let args = |i: usize| cluster.args(i, &["--datapath=ebpf", "--ip-masq", "--iptables-resync=1"]);
    let Cluster { hosts, etcd, bin } = &cluster;
    let dir = etcd.dir().to_path_buf();
    let mut a1 = Agent::start(&dir, "h1", &hosts.ns(1), bin, &args(1))?;
    let mut a2 = Agent::start(&dir, "h2", &hosts.ns(2), bin, &args(2))?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    a2.wait_for("running: lease", Duration::from_secs(20))?;
    let (c1, ip1) = add_container(hosts, 1, &dir.join("h1.env"))?;
    let mut containers = Containers(vec![c1.clone()]);
    let (c2, ip2) = add_container(hosts, 2, &dir.join("h2.env"))?;
    containers.0.push(c2.clone());

    // The internet: a namespace behind host 1's second interface.
    let h1 = hosts.ns(1);
    let inet = Internet::behind(hosts, 1)?;

    within(Duration::from_secs(5), "c1 reaches c2", || {
        sh(&["ip", "netns", "exec", &c1, "ping", "-c1", "-W1", &ip2]).is_ok()
    })?;

    // To the internet: the source is host 1's address.
    let cap = Capture::start(&inet.ns, "eth0", "3")?;
    let ping = sh(&[
        "ip", "netns", "exec", &c1, "ping", "-c3", "-i0.2", "-W1", INTERNET,
    ])?;
    ensure!(
        ping.contains("3 received"),
        "c1 cannot reach the internet:\n{ping}"
    );
    let seen = cap.output()?;
    ensure!(
        seen.lines()
            .filter(|l| l.contains(&format!("IP {HOST_WAN} > {INTERNET}")))
            .count()
            == 3,
        "the internet did not see host 1's address as the source:\n{seen}"
    );
    ensure!(!seen.contains(&ip1), "the pod address leaked:\n{seen}");

    // Across the overlay: the container's own address arrives.
    let cap = Capture::start(&c2, "eth0", "3")?;
    let ping = sh(&[
        "ip", "netns", "exec", &c1, "ping", "-c3", "-i0.2", "-W1", &ip2,
    ])?;
    ensure!(ping.contains("3 received"), "{ping}");
    let seen = cap.output()?;
    ensure!(
        seen.lines()
            .filter(|l| l.contains(&format!("IP {ip1} > {ip2}")))
            .count()
            == 3,
        "container-to-container traffic was rewritten:\n{seen}"
    );

    // Someone flushes our chain: the agent restores it and masquerading works again.
    flush_and_wait_restored(&h1, "nat", "FLANNEL-POSTRTG", "-j MASQUERADE")?;
    let ping = sh(&["ip", "netns", "exec", &c1, "ping", "-c2", "-W1", INTERNET])?;
    ensure!(ping.contains("2 received"), "{ping}");
    // The fast path's mangle rule is repaired the same way.
    flush_and_wait_restored(
        &h1,
        "mangle",
        "FLANNEL-FASTPATH",
        "--set-xmark 0x100000/0x100000",
    )?;
    drop(containers);
    Ok(())
}

/// Flushes one of the agent's chains in `ns` and waits (the resync is 1 s)
/// until it holds a rule containing `needle` again.
fn flush_and_wait_restored(ns: &str, table: &str, chain: &str, needle: &str) -> Result<()> {
    sh(&[
        "ip", "netns", "exec", ns, "iptables", "-t", table, "-F", chain,
    ])?;
    within(Duration::from_secs(5), &format!("{chain} restored"), || {
        sh(&[
            "ip", "netns", "exec", ns, "iptables", "-t", table, "-S", chain,
        ])
        .is_ok_and(|r| r.contains(needle))
    })?;
    Ok(())
}
