//! Host policy the eBPF datapath would skip, detected (issue 17 item 6):
//! xfrm policies between the nodes and policy routing to a peer keep the
//! eBPF datapath off (`--datapath auto` falls back with one line naming
//! why, `--datapath ebpf` refuses to start); and the fast path puts back
//! the `nf_conntrack_tcp_be_liberal` it found, on `--fast-path=off` and on
//! `cleanup`. A dual-stack peer's IPv6 side that an IPv6 xfrm policy or
//! policy routing covers is left to `flannel-v6.<VNI>` on its own, while
//! its IPv4 side and the other peers stay on the eBPF programs.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use ipnet::Ipv6Net;
use overlay_agent::{
    datapath::{
        ebpf::{known_vteps6, read_remote_subnets6},
        pins::PinLayout,
    },
    inspect,
};
use overlay_common::{
    consts::{MAP_KNOWN_VTEPS6, MAP_REMOTE_SUBNETS6},
    counters::Reason,
};
use overlay_tests::{
    agent::{
        Agent, Bpffs, Cluster, Containers, add_container, add_container_ipv6, env_var, sh, within,
    },
    capture::Capture,
    http,
    netns::{sysctl, sysctl_get},
};

const CONFIG: &str = r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "SubnetMin": "10.0.1.0","SubnetMax": "10.0.20.0", "Backend": {"Type": "vxlan"}}"#;

const FELL_BACK: &str = "falling back to the kernel datapath";
const EBPF_ON: &str = "eBPF datapath on";

/// Waits for the agent to exit; its exit code.
fn exit_code(agent: &mut Agent) -> Result<i32> {
    let mut code = None;
    within(Duration::from_secs(20), "the agent exits", || {
        code = agent.exited();
        code.is_some()
    })?;
    Ok(code.unwrap_or(0))
}

/// Host 1's agent with `--datapath ebpf` exits, naming xfrm.
fn ebpf_refuses_naming_xfrm(cluster: &Cluster, h1: &str, pin_dir: &str) -> Result<()> {
    let ebpf = cluster.args(1, &["--datapath=ebpf", pin_dir]);
    let dir = cluster.etcd.dir();
    let mut refused = Agent::start(dir, "h1-ebpf", h1, &cluster.bin, &ebpf)?;
    let code = exit_code(&mut refused)?;
    let log = refused.log();
    ensure!(
        code != 0 && log.contains("--datapath ebpf") && log.contains("xfrm"),
        "--datapath ebpf did not refuse naming xfrm (exit {code}):\n{log}"
    );
    Ok(())
}

/// Host 1's agent with `auto` (flags `auto`), the policies gone: eBPF.
fn auto_is_ebpf_again(cluster: &Cluster, h1: &str, auto: &[String]) -> Result<Agent> {
    let dir = cluster.etcd.dir();
    let mut a1 = Agent::start(dir, "h1-clear", h1, &cluster.bin, auto)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    ensure!(
        a1.log().contains(EBPF_ON) && !a1.log().contains(FELL_BACK),
        "without the policies auto is not eBPF:\n{}",
        a1.log()
    );
    Ok(a1)
}

/// Frames in `pcap` that tcpdump's `filter` selects.
fn count(pcap: &Path, filter: &str) -> Result<usize> {
    let mut args = vec!["tcpdump", "-nr", pcap.to_str().unwrap_or_default()];
    args.extend(filter.split_whitespace());
    Ok(sh(&args)?.lines().filter(|l| !l.trim().is_empty()).count())
}

/// Static transport-mode ESP between `a` and `b` on host `ns` (`out` is
/// the direction from `a`). Returns false when this kernel has no ESP
/// (CONFIG_INET_ESP unset): the policies are still installed, and then no
/// outer VXLAN between the nodes leaves at all on the kernel's path.
fn ipsec(ns: &str, a: &str, b: &str) -> Result<bool> {
    let mut esp = true;
    for (src, dst) in [(a, b), (b, a)] {
        // The same SPI for one direction on both hosts.
        let spi = if src < dst { "0x1001" } else { "0x1002" };
        esp &= sh(&[
            "ip",
            "-n",
            ns,
            "xfrm",
            "state",
            "add",
            "src",
            src,
            "dst",
            dst,
            "proto",
            "esp",
            "spi",
            spi,
            "reqid",
            "1",
            "mode",
            "transport",
            "enc",
            "cbc(aes)",
            "0x0102030405060708090a0b0c0d0e0f10",
            "auth",
            "hmac(sha256)",
            "0x0102030405060708090a0b0c0d0e0f100102030405060708090a0b0c0d0e0f10",
        ])
        .is_ok();
    }
    // UDP to the VXLAN port only: etcd (TCP, on host 1) stays reachable
    // whether or not the kernel can do ESP.
    for (src, dst, dir) in [(a, b, "out"), (b, a, "in")] {
        vxlan_policy(ns, src, dst, dir)?;
    }
    Ok(esp)
}

/// A transport-mode ESP policy on host `ns` for UDP to the VXLAN port
/// from `src` to `dst` (either family), direction `dir`.
fn vxlan_policy(ns: &str, src: &str, dst: &str, dir: &str) -> Result<()> {
    sh(&[
        "ip",
        "-n",
        ns,
        "xfrm",
        "policy",
        "add",
        "src",
        src,
        "dst",
        dst,
        "proto",
        "udp",
        "dport",
        "8472",
        "dir",
        dir,
        "tmpl",
        "src",
        src,
        "dst",
        dst,
        "proto",
        "esp",
        "reqid",
        "1",
        "mode",
        "transport",
    ])?;
    Ok(())
}

fn flush_ipsec(ns: &str) -> Result<()> {
    sh(&["ip", "-n", ns, "xfrm", "policy", "flush"])?;
    sh(&["ip", "-n", ns, "xfrm", "state", "flush"])?;
    Ok(())
}

fn ping(c: &str, ip: &str, n: u32) -> bool {
    let n = n.to_string();
    sh(&[
        "ip", "netns", "exec", c, "ping", "-c", &n, "-i", "0.2", "-W", "1", ip,
    ])
    .is_ok_and(|out| out.contains(&format!("{n} received")))
}

#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn xfrm_policies_between_the_nodes_keep_the_ebpf_datapath_off() -> Result<()> {
    let cluster = Cluster::start("hpx", 2, CONFIG)?;
    let Cluster { hosts, etcd, bin } = &cluster;
    let dir = etcd.dir().to_path_buf();
    let bpf1 = Bpffs::mount(dir.join("bpf1"))?;
    let pin_dir = format!("--bpf-pin-dir={}", bpf1.0.join("overlay").display());
    let (h1, h2) = (hosts.ns(1), hosts.ns(2));
    let (ip1, ip2) = (hosts.ip(1), hosts.ip(2));
    let esp = ipsec(&h1, &ip1, &ip2)? & ipsec(&h2, &ip2, &ip1)?;
    if !esp {
        eprintln!(
            "this kernel has no ESP: checking that nothing leaves in clear instead of ESP on the wire"
        );
    }

    let mut a2 = Agent::start(
        &dir,
        "h2",
        &h2,
        bin,
        &cluster.args(2, &["--datapath=kernel"]),
    )?;
    a2.wait_for("running: lease", Duration::from_secs(20))?;
    let auto = cluster.args(1, &["--datapath=auto", &pin_dir]);
    let mut a1 = Agent::start(&dir, "h1-auto", &h1, bin, &auto)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    let log = a1.log();
    let line = log.lines().find(|l| l.contains(FELL_BACK));
    ensure!(
        line.is_some_and(|l| l.contains("xfrm")) && !log.contains(EBPF_ON),
        "auto did not fall back naming xfrm:\n{log}"
    );

    let (c1, _) = add_container(hosts, 1, &dir.join("h1.env"))?;
    let mut containers = Containers(vec![c1.clone()]);
    let (c2, cip2) = add_container(hosts, 2, &dir.join("h2.env"))?;
    containers.0.push(c2);
    let pcap = dir.join("xfrm.pcap");
    let capture = Capture::start(&hosts.sw(), "p1", "esp or udp port 8472", &pcap)?;
    let reached = ping(&c1, &cip2, 5);
    let pcap = capture.stop()?;
    let (esp_frames, clear) = (count(&pcap, "esp")?, count(&pcap, "udp port 8472")?);
    ensure!(clear == 0, "{clear} clear VXLAN frames on the wire");
    if esp {
        ensure!(reached, "the pods do not reach each other over ESP");
        ensure!(esp_frames > 0, "no ESP on the wire");
    } else {
        ensure!(
            !reached,
            "the pods reach each other, yet no ESP was possible"
        );
    }
    a1.kill9()?;

    ebpf_refuses_naming_xfrm(&cluster, &h1, &pin_dir)?;

    flush_ipsec(&h1)?;
    flush_ipsec(&h2)?;
    let a1 = auto_is_ebpf_again(&cluster, &h1, &auto)?;
    within(Duration::from_secs(10), "c1 reaches c2", || {
        ping(&c1, &cip2, 1)
    })?;
    drop((a1, a2));
    drop(containers);
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn an_ipv6_xfrm_policy_keeps_a_dual_stack_node_off_ebpf() -> Result<()> {
    // The eBPF datapath encapsulates IPv6 too (vxlan_egress6), and its
    // outer IPv6 packets would skip an IPv6 policy just as IPv4 ones skip
    // an IPv4 policy: the IPv4 side alone must not let it start.
    const DUAL: &str = r#"{"EnableIPv6":true,"Network":"10.0.0.0/16","SubnetMin":"10.0.1.0","SubnetMax":"10.0.16.0","IPv6Network":"fd10:0:0::/48","IPv6SubnetMax":"fd10:0:0:10::","Backend":{"Type":"vxlan"}}"#;
    let cluster = Cluster::start("hp6", 2, DUAL)?;
    let Cluster { hosts, etcd, bin } = &cluster;
    hosts.add_ipv6()?;
    let dir = etcd.dir().to_path_buf();
    let bpf1 = Bpffs::mount(dir.join("bpf1"))?;
    let pin_dir = format!("--bpf-pin-dir={}", bpf1.0.join("overlay").display());
    let h1 = hosts.ns(1);
    let (ip6_1, ip6_2) = (hosts.ip6(1), hosts.ip6(2));
    // UDP to the VXLAN port between the nodes' IPv6 addresses, as an
    // operator encrypting the overlay would write it (no SA needed: only
    // the agent's decision is looked at here).
    vxlan_policy(&h1, &ip6_1, &ip6_2, "out")?;
    let auto = cluster.args(1, &["--datapath=auto", &pin_dir]);
    let mut a1 = Agent::start(&dir, "h1-auto", &h1, bin, &auto)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    let log = a1.log();
    let line = log.lines().find(|l| l.contains(FELL_BACK));
    ensure!(
        line.is_some_and(|l| l.contains("xfrm") && l.contains(&ip6_2)) && !log.contains(EBPF_ON),
        "auto did not fall back naming the IPv6 xfrm policy:\n{log}"
    );
    a1.kill9()?;

    ebpf_refuses_naming_xfrm(&cluster, &h1, &pin_dir)?;

    // Without it, the same node runs eBPF.
    flush_ipsec(&h1)?;
    auto_is_ebpf_again(&cluster, &h1, &auto)?;
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn a_peer_routed_by_policy_rules_keeps_the_ebpf_datapath_off() -> Result<()> {
    let cluster = Cluster::start("hpr", 2, CONFIG)?;
    let Cluster { hosts, etcd, bin } = &cluster;
    let dir = etcd.dir().to_path_buf();
    let bpf1 = Bpffs::mount(dir.join("bpf1"))?;
    let pin_dir = format!("--bpf-pin-dir={}", bpf1.0.join("overlay").display());
    let (h1, h2) = (hosts.ns(1), hosts.ns(2));
    let ip2 = hosts.ip(2);
    // Host 2 through table 100 (still out of eth0, so the node works).
    sh(&[
        "ip", "-n", &h1, "route", "add", &ip2, "dev", "eth0", "table", "100",
    ])?;
    sh(&[
        "ip", "-n", &h1, "rule", "add", "to", &ip2, "lookup", "100", "pref", "100",
    ])?;

    let mut a2 = Agent::start(
        &dir,
        "h2",
        &h2,
        bin,
        &cluster.args(2, &["--datapath=kernel"]),
    )?;
    a2.wait_for("running: lease", Duration::from_secs(20))?;
    // 1. A fresh start knows no peer yet: eBPF comes up, and host 2, added
    // then, is left to the kernel's device with one error line.
    let auto = cluster.args(1, &["--datapath=auto", &pin_dir]);
    let mut a1 = Agent::start(&dir, "h1-fresh", &h1, bin, &auto)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    a1.wait_for("takes the kernel's vxlan device", Duration::from_secs(10))?;
    let log = a1.log();
    ensure!(
        log.contains(EBPF_ON) && log.contains("table 100"),
        "the peer was not left to the kernel naming table 100:\n{log}"
    );
    let (c1, _) = add_container(hosts, 1, &dir.join("h1.env"))?;
    let mut containers = Containers(vec![c1.clone()]);
    let (c2, cip2) = add_container(hosts, 2, &dir.join("h2.env"))?;
    containers.0.push(c2);
    within(Duration::from_secs(10), "c1 reaches c2", || {
        ping(&c1, &cip2, 1)
    })?;
    a1.kill9()?;

    // 2. Restarted, the adopted device holds host 2: auto falls back.
    let mut a1 = Agent::start(&dir, "h1-restart", &h1, bin, &auto)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    let log = a1.log();
    let line = log.lines().find(|l| l.contains(FELL_BACK));
    ensure!(
        line.is_some_and(|l| l.contains("table 100") && l.contains(&ip2)),
        "auto did not fall back naming the policy route:\n{log}"
    );
    ensure!(
        ping(&c1, &cip2, 3),
        "c1 does not reach c2 on the kernel datapath"
    );
    a1.kill9()?;
    let ebpf = cluster.args(1, &["--datapath=ebpf", &pin_dir]);
    let mut refused = Agent::start(&dir, "h1-ebpf", &h1, bin, &ebpf)?;
    let code = exit_code(&mut refused)?;
    let log = refused.log();
    ensure!(
        code != 0 && log.contains("--datapath ebpf") && log.contains("table 100"),
        "--datapath ebpf did not refuse naming the policy route (exit {code}):\n{log}"
    );

    // 3. Without the rule, a restart is eBPF again.
    sh(&["ip", "-n", &h1, "rule", "del", "pref", "100"])?;
    let mut a1 = Agent::start(&dir, "h1-norule", &h1, bin, &auto)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    ensure!(a1.log().contains(EBPF_ON), "{}", a1.log());
    within(Duration::from_secs(10), "c1 reaches c2", || {
        ping(&c1, &cip2, 1)
    })?;
    drop((a1, a2));
    drop(containers);
    Ok(())
}

const BE_LIBERAL: &str = "net.netfilter.nf_conntrack_tcp_be_liberal";

#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn the_fast_path_puts_be_liberal_back() -> Result<()> {
    let cluster = Cluster::start("hpl", 1, CONFIG)?;
    let Cluster { hosts, etcd, bin } = &cluster;
    let dir = etcd.dir().to_path_buf();
    let bpf1 = Bpffs::mount(dir.join("bpf1"))?;
    let pins = bpf1.0.join("overlay");
    let pin_dir = format!("--bpf-pin-dir={}", pins.display());
    let h1 = hosts.ns(1);
    let record = pins.join("nf_conntrack_tcp_be_liberal-was-0");
    sysctl(&h1, &[(BE_LIBERAL, "0")])?;

    let on = cluster.args(1, &["--datapath=ebpf", "--fast-path=on", &pin_dir]);
    let mut a1 = Agent::start(&dir, "h1-on", &h1, bin, &on)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    ensure!(sysctl_get(&h1, BE_LIBERAL)? == "1", "{}", a1.log());
    ensure!(record.is_dir(), "no record at {}", record.display());
    a1.kill9()?;
    // A hitless restart finds 1, and keeps the record of 0.
    let mut a1 = Agent::start(&dir, "h1-on-again", &h1, bin, &on)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    ensure!(sysctl_get(&h1, BE_LIBERAL)? == "1", "{}", a1.log());
    ensure!(
        record.is_dir() && !pins.join("nf_conntrack_tcp_be_liberal-was-1").exists(),
        "the restart recorded its own 1"
    );
    a1.kill9()?;

    let off = cluster.args(1, &["--datapath=ebpf", "--fast-path=off", &pin_dir]);
    let mut a1 = Agent::start(&dir, "h1-off", &h1, bin, &off)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    ensure!(
        sysctl_get(&h1, BE_LIBERAL)? == "0",
        "not restored by --fast-path=off:\n{}",
        a1.log()
    );
    ensure!(!record.exists(), "the record stayed");
    a1.kill9()?;

    // cleanup puts it back too.
    let mut a1 = Agent::start(&dir, "h1-on-3", &h1, bin, &on)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    ensure!(sysctl_get(&h1, BE_LIBERAL)? == "1", "{}", a1.log());
    a1.kill9()?;
    let out = Command::new("ip")
        .args(["netns", "exec", &h1])
        .arg(bin)
        .arg(format!("--etcd-endpoints={}", etcd.endpoints()))
        .arg(&pin_dir)
        .arg("cleanup")
        .stdin(Stdio::null())
        .output()?;
    ensure!(
        out.status.success(),
        "cleanup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    ensure!(
        sysctl_get(&h1, BE_LIBERAL)? == "0" && said.contains("restored to 0"),
        "cleanup did not restore it:\n{said}"
    );
    ensure!(
        !pins.exists(),
        "the pin directory stayed: {}",
        pins.display()
    );
    Ok(())
}

/// A dual-stack network: two agents' IPv6 subnets are /64s of fd10::/48.
const DUAL: &str = r#"{"EnableIPv6":true,"Network":"10.0.0.0/16","SubnetMin":"10.0.1.0","SubnetMax":"10.0.16.0","IPv6Network":"fd10:0:0::/48","IPv6SubnetMax":"fd10:0:0:10::","Backend":{"Type":"vxlan"}}"#;

/// What host 1's log says of an IPv6 side it leaves to the kernel.
const KERNEL_ONLY6: &str = "its IPv6 traffic takes the kernel's flannel-v6 device";

/// Host `i`'s IPv6 pod subnet, from its subnet file.
fn subnet6(dir: &Path, i: usize) -> Result<Ipv6Net> {
    let gw = env_var(&dir.join(format!("h{i}.env")), "FLANNEL_IPV6_SUBNET")?;
    Ok(gw.parse::<Ipv6Net>()?.trunc())
}

/// Host `i`'s IPv4 pod subnet, from its subnet file.
fn subnet4(dir: &Path, i: usize) -> Result<ipnet::Ipv4Net> {
    let gw = env_var(&dir.join(format!("h{i}.env")), "FLANNEL_SUBNET")?;
    Ok(gw.parse::<ipnet::Ipv4Net>()?.trunc())
}

/// The pinned IPv6 peer maps of the agent whose pins are in `pins`: the
/// IPv6 subnets REMOTE_SUBNETS6 holds and the `PublicIPv6`s of KNOWN_VTEPS6.
fn maps6(pins: &Path) -> Result<(HashSet<Ipv6Net>, HashSet<Ipv6Addr>)> {
    let layout = PinLayout::chosen(Some(pins));
    let remote = read_remote_subnets6(&inspect::open(&layout, MAP_REMOTE_SUBNETS6)?)?
        .into_iter()
        .map(|(_, p6)| p6.subnet)
        .collect();
    let known = known_vteps6(&inspect::open(&layout, MAP_KNOWN_VTEPS6)?)?;
    Ok((remote, known))
}

/// The pinned maps' IPv4 peers (REMOTE_SUBNETS) of the agent at `pins`.
fn maps4(pins: &Path) -> Result<Vec<(ipnet::Ipv4Net, Ipv4Addr)>> {
    let state = inspect::read(&PinLayout::chosen(Some(pins)))?.context("no pinned state")?;
    Ok(state
        .peers
        .iter()
        .map(|p| (p.subnet, p.public_ip))
        .collect())
}

/// The programs' IPv6 encapsulations and `vxlan_egress6`'s passes for want
/// of a REMOTE_SUBNETS6 entry, from the pinned counters at `pins`.
fn egress6(pins: &Path) -> Result<(u64, u64)> {
    let state = inspect::read(&PinLayout::chosen(Some(pins)))?.context("no pinned state")?;
    let n = |r: Reason| state.counters.get(r).packets;
    // Encapsulated by the programs: by vxlan_egress6, or (once conntrack
    // saw the flow established) by the fast path from the pod's veth. Only
    // IPv6 flows while these are read.
    Ok((
        n(Reason::Encapsulated6) + n(Reason::FastEgress),
        n(Reason::PassNoRoute),
    ))
}

fn ping6(c: &str, ip: &str, n: u32) -> bool {
    let n = n.to_string();
    sh(&[
        "ip", "netns", "exec", c, "ping", "-6", "-c", &n, "-i", "0.2", "-W", "1", ip,
    ])
    .is_ok_and(|out| out.contains(&format!("{n} received")))
}

/// A container on each host with an IPv4 and an IPv6 address; their
/// names and IPv6 addresses.
fn dual_containers(cluster: &Cluster, n: usize) -> Result<(Containers, Vec<(String, String)>)> {
    let dir = cluster.etcd.dir();
    let mut containers = Containers(Vec::new());
    let mut pods = Vec::new();
    for i in 1..=n {
        let env = dir.join(format!("h{i}.env"));
        let (c, _) = add_container(&cluster.hosts, i, &env)?;
        containers.0.push(c.clone());
        let ip6 = add_container_ipv6(&cluster.hosts.ns(i), &c, &env)?;
        pods.push((c, ip6));
    }
    Ok((containers, pods))
}

/// Host 1's pin directory flag and path.
fn pins1(dir: &Path) -> Result<(Bpffs, String, PathBuf)> {
    let bpf1 = Bpffs::mount(dir.join("bpf1"))?;
    let pins = bpf1.0.join("overlay");
    let flag = format!("--bpf-pin-dir={}", pins.display());
    Ok((bpf1, flag, pins))
}

#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn an_ipv6_policy_route_to_one_peer_leaves_its_ipv6_side_to_the_kernel() -> Result<()> {
    Cluster::run("hp6r", 3, DUAL, policy_route6)
}

fn policy_route6(cluster: &Cluster) -> Result<()> {
    let Cluster { hosts, etcd, bin } = cluster;
    hosts.add_ipv6()?;
    let dir = etcd.dir().to_path_buf();
    let (_bpf1, pin_dir, pins) = pins1(&dir)?;
    let h1 = hosts.ns(1);
    let (ip6_2, ip6_3) = (hosts.ip6(2), hosts.ip6(3));
    // Host 2's IPv6 address through table 100 (still out of eth0, so the
    // kernel's path works); host 3's and host 2's IPv4 one untouched.
    sh(&[
        "ip", "-n", &h1, "-6", "route", "add", &ip6_2, "dev", "eth0", "table", "100",
    ])?;
    sh(&[
        "ip", "-n", &h1, "-6", "rule", "add", "to", &ip6_2, "lookup", "100", "pref", "100",
    ])?;
    let mut agents = Vec::new();
    for i in 2..=3 {
        let args = cluster.args(i, &["--datapath=kernel"]);
        let mut a = Agent::start(&dir, &format!("h{i}"), &hosts.ns(i), bin, &args)?;
        a.wait_for("running: lease", Duration::from_secs(20))?;
        agents.push(a);
    }
    // A fresh start holds no peer: eBPF comes up, and the peers, added
    // then (as one batch), are judged side by side.
    const PORT: u16 = 9876;
    let ip1 = hosts.ip(1);
    let healthz = [
        format!("--healthz-ip={ip1}"),
        format!("--healthz-port={PORT}"),
    ];
    let mut auto = cluster.args(1, &["--datapath=auto", &pin_dir]);
    auto.extend(healthz.iter().cloned());
    let mut a1 = Agent::start(&dir, "h1", &h1, bin, &auto)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    a1.wait_for(KERNEL_ONLY6, Duration::from_secs(10))?;
    let log = a1.log();
    let line = log
        .lines()
        .find(|l| l.contains(KERNEL_ONLY6))
        .unwrap_or_default();
    ensure!(
        log.contains(EBPF_ON)
            && line.contains("table 100")
            && line.contains(&ip6_2)
            && !log
                .lines()
                .any(|l| l.contains(KERNEL_ONLY6) && l.contains(&ip6_3)),
        "host 2's IPv6 side was not left to the kernel naming table 100:\n{log}"
    );
    ensure!(
        !log.lines()
            .any(|l| l.contains("takes the kernel's vxlan device")),
        "an IPv4 side was left to the kernel too:\n{log}"
    );

    // The maps: no REMOTE_SUBNETS6 entry for host 2 (its KNOWN_VTEPS6
    // one stays, as a route conflict keeps KNOWN_VTEPS); host 3's IPv6
    // side and both IPv4 sides on the programs.
    let (s6_2, s6_3) = (subnet6(&dir, 2)?, subnet6(&dir, 3)?);
    within(
        Duration::from_secs(10),
        "host 3's IPv6 side in the maps",
        || maps6(&pins).is_ok_and(|(remote, _)| remote.contains(&s6_3)),
    )?;
    let (remote6, known6) = maps6(&pins)?;
    ensure!(
        !remote6.contains(&s6_2)
            && known6.contains(&ip6_2.parse()?)
            && known6.contains(&ip6_3.parse()?),
        "REMOTE_SUBNETS6 {remote6:?}, KNOWN_VTEPS6 {known6:?}"
    );
    let peers4 = maps4(&pins)?;
    for i in 2..=3 {
        let s4 = subnet4(&dir, i)?;
        ensure!(
            peers4.iter().any(|(s, _)| *s == s4),
            "host {i}'s IPv4 side is not in REMOTE_SUBNETS: {peers4:?}"
        );
    }
    // `status` counts the IPv6 subnets the maps hold: host 3's alone;
    // /metrics counts host 2's IPv6 side, and no IPv4 side.
    let shown = overlay_tests::agent::status(&h1, bin, &cluster.args(1, &[&pin_dir]))?;
    ensure!(shown.contains("1 peers' IPv6 subnets"), "{shown}");
    let gauges = || -> Result<(f64, f64)> {
        let m = http::scrape(&h1, &ip1, PORT)?;
        Ok((
            http::sample(&m, "overlay_peers_host_policy")?,
            http::sample(&m, "overlay_peers_host_policy_ipv6")?,
        ))
    };
    within(
        Duration::from_secs(15),
        "/metrics counts host 2's IPv6 side",
        || gauges().is_ok_and(|g| g == (0.0, 1.0)),
    )?;

    // Pods over IPv6: to host 2 through flannel-v6.1 (vxlan_egress6 passes
    // them, the kernel encapsulates along table 100), to host 3 through
    // vxlan_egress6.
    let (containers, pods) = dual_containers(cluster, 3)?;
    let (c1, pod2, pod3) = (&pods[0].0, &pods[1].1, &pods[2].1);
    let before = egress6(&pins)?;
    within(Duration::from_secs(10), "c1 reaches c2 over IPv6", || {
        ping6(c1, pod2, 1)
    })?;
    ensure!(ping6(c1, pod2, 5), "c1 does not reach c2 over IPv6");
    let after = egress6(&pins)?;
    ensure!(
        after.0 == before.0 && after.1 >= before.1 + 5,
        "to host 2, vxlan_egress6 (encapsulated, passed) went from {before:?} to {after:?}"
    );
    ensure!(ping6(c1, pod3, 5), "c1 does not reach c3 over IPv6");
    let last = egress6(&pins)?;
    ensure!(
        last.0 >= after.0 + 5,
        "to host 3, vxlan_egress6 (encapsulated, passed) went from {after:?} to {last:?}"
    );

    // Host 2 leaving (its lease gone) takes its record and its
    // KNOWN_VTEPS6 entry along.
    agents[0].kill9()?;
    let key = format!(
        "/coreos.com/network/subnets/{}&{}",
        subnet4(&dir, 2)?.to_string().replace('/', "-"),
        s6_2.to_string().replace('/', "-")
    );
    etcd.delete(&key)?;
    let forgotten =
        || maps6(&pins).is_ok_and(|(_, known)| !known.iter().any(|ip| ip.to_string() == ip6_2));
    within(
        Duration::from_secs(15),
        "host 2's IPv6 side forgotten",
        || gauges().is_ok_and(|g| g == (0.0, 0.0)) && forgotten(),
    )?;

    // Host 2 back (one peer added while the node runs): left to the
    // kernel again.
    let args2 = cluster.args(2, &["--datapath=kernel"]);
    agents[0] = Agent::start(&dir, "h2-again", &hosts.ns(2), bin, &args2)?;
    agents[0].wait_for("running: lease", Duration::from_secs(20))?;
    within(
        Duration::from_secs(15),
        "host 2's IPv6 side judged again",
        || a1.log().matches(KERNEL_ONLY6).count() >= 2 && gauges().is_ok_and(|g| g == (0.0, 1.0)),
    )?;
    let (remote6, _) = maps6(&pins)?;
    ensure!(
        !remote6.contains(&subnet6(&dir, 2)?),
        "REMOTE_SUBNETS6 {remote6:?}"
    );

    // Restarted, the adopted flannel-v6.1 holds host 2's IPv6 side: auto
    // falls back, naming its PublicIPv6 and table 100.
    a1.kill9()?;
    let mut again = Agent::start(&dir, "h1-restart", &h1, bin, &auto)?;
    again.wait_for("running: lease", Duration::from_secs(20))?;
    let log = again.log();
    let line = log.lines().find(|l| l.contains(FELL_BACK));
    ensure!(
        line.is_some_and(|l| l.contains("table 100") && l.contains(&ip6_2)),
        "auto did not fall back naming host 2's IPv6 route:\n{log}"
    );
    ensure!(
        ping6(c1, pod3, 3),
        "c1 does not reach c3 on the kernel datapath"
    );
    drop((again, a1));
    drop(agents);
    drop(containers);
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn an_ipv6_xfrm_policy_toward_a_joining_peer_leaves_its_ipv6_side_to_the_kernel() -> Result<()> {
    Cluster::run("hp6x", 3, DUAL, xfrm_joining6)
}

fn xfrm_joining6(cluster: &Cluster) -> Result<()> {
    let Cluster { hosts, etcd, bin } = cluster;
    hosts.add_ipv6()?;
    let dir = etcd.dir().to_path_buf();
    let (_bpf1, pin_dir, pins) = pins1(&dir)?;
    let (h1, h2) = (hosts.ns(1), hosts.ns(2));
    let (ip6_1, ip6_2, ip6_3) = (hosts.ip6(1), hosts.ip6(2), hosts.ip6(3));

    let args3 = cluster.args(3, &["--datapath=kernel"]);
    let mut a3 = Agent::start(&dir, "h3", &hosts.ns(3), bin, &args3)?;
    a3.wait_for("running: lease", Duration::from_secs(20))?;
    let auto = cluster.args(1, &["--datapath=auto", &pin_dir]);
    let mut a1 = Agent::start(&dir, "h1", &h1, bin, &auto)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    ensure!(a1.log().contains(EBPF_ON), "{}", a1.log());
    let s6_3 = subnet6(&dir, 3)?;
    within(
        Duration::from_secs(10),
        "host 3's IPv6 side in the maps",
        || maps6(&pins).is_ok_and(|(remote, _)| remote.contains(&s6_3)),
    )?;

    // While host 1 runs eBPF, ESP for IPv6 VXLAN between hosts 1 and 2
    // (the policies alone where this kernel has no ESP); then host 2 joins.
    let esp = ipsec(&h1, &ip6_1, &ip6_2)? & ipsec(&h2, &ip6_2, &ip6_1)?;
    if !esp {
        eprintln!("this kernel has no ESP: checking that nothing leaves in clear instead");
    }
    let args2 = cluster.args(2, &["--datapath=kernel"]);
    let mut a2 = Agent::start(&dir, "h2", &h2, bin, &args2)?;
    a2.wait_for("running: lease", Duration::from_secs(20))?;
    a1.wait_for(KERNEL_ONLY6, Duration::from_secs(10))?;
    let log = a1.log();
    let line = log
        .lines()
        .find(|l| l.contains(KERNEL_ONLY6))
        .unwrap_or_default();
    ensure!(
        line.contains("xfrm") && line.contains(&ip6_2) && !log.contains(FELL_BACK),
        "host 2's IPv6 side was not left to the kernel naming xfrm:\n{log}"
    );

    // Neither IPv6 map holds host 2 (clear VXLAN from it is dropped); its
    // IPv4 side, which no policy covers, is on the programs.
    let (remote6, known6) = maps6(&pins)?;
    ensure!(
        !remote6.contains(&subnet6(&dir, 2)?)
            && !known6.contains(&ip6_2.parse()?)
            && remote6.contains(&s6_3)
            && known6.contains(&ip6_3.parse()?),
        "REMOTE_SUBNETS6 {remote6:?}, KNOWN_VTEPS6 {known6:?}"
    );
    let s4_2 = subnet4(&dir, 2)?;
    within(
        Duration::from_secs(10),
        "host 2's IPv4 side in REMOTE_SUBNETS",
        || maps4(&pins).is_ok_and(|p| p.iter().any(|(s, _)| *s == s4_2)),
    )?;

    // On the wire: nothing in clear between the IPv6 VTEPs of hosts 1 and
    // 2, ESP where the kernel has it; host 3 still gets eBPF's VXLAN.
    let (containers, pods) = dual_containers(cluster, 3)?;
    let (c1, pod2, pod3) = (&pods[0].0, &pods[1].1, &pods[2].1);
    let pcap = dir.join("xfrm6.pcap");
    let capture = Capture::start(&hosts.sw(), "p1", "ip6 and (esp or udp port 8472)", &pcap)?;
    let before = egress6(&pins)?;
    let reached = ping6(c1, pod2, 5);
    let after = egress6(&pins)?;
    let reached3 = ping6(c1, pod3, 3);
    let last = egress6(&pins)?;
    let pcap = capture.stop()?;
    let clear = count(
        &pcap,
        &format!("udp port 8472 and host {ip6_1} and host {ip6_2}"),
    )?;
    ensure!(
        clear == 0,
        "{clear} clear IPv6 VXLAN frames between hosts 1 and 2"
    );
    ensure!(
        after.0 == before.0,
        "vxlan_egress6 encapsulated toward host 2: {before:?} -> {after:?}"
    );
    if esp {
        ensure!(reached, "the pods do not reach each other over ESP");
        ensure!(count(&pcap, "esp")? > 0, "no ESP on the wire");
    } else {
        ensure!(!reached, "c1 reaches c2, yet no ESP was possible");
    }
    ensure!(
        reached3 && last.0 >= after.0 + 3,
        "c1 -> c3 over IPv6 (reached: {reached3}), vxlan_egress6: {after:?} -> {last:?}"
    );
    ensure!(
        count(
            &pcap,
            &format!("udp port 8472 and src host {ip6_1} and dst host {ip6_3}")
        )? > 0,
        "no IPv6 VXLAN from host 1 to host 3 on the wire"
    );
    drop((a1, a2, a3));
    drop(containers);
    Ok(())
}
