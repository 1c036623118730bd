//! The `overlay-agent` binary end to end: three hosts (network namespaces on
//! one bridge), etcd in the first, an agent on each (kernel datapath, `auto`
//! forced to fall back, eBPF), the full mesh pinging, peers added and removed
//! in etcd programmed everywhere within a second, and a malformed config that
//! is waited out (named once, on /readyz too) without touching the host.

use std::{
    fs,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use overlay_tests::{
    agent::{Agent, Bpffs, Cluster, Hosts, sh, subnet_of, within},
    etcd::{Etcd, EtcdSpec},
};

const PREFIX: &str = "/coreos.com/network";
/// Agents allocate from 10.0.1.0 to 10.0.16.0; the tests' peers take fixed
/// subnets above (10.0.17.0 and up), so a peer never lands on the key an
/// agent picked at random (that is a lease conflict, not a peer).
const CONFIG: &str = r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "SubnetMin": "10.0.1.0","SubnetMax": "10.0.16.0", "Backend": {"Type": "vxlan"}}"#;

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn three_agents_kernel_fallback_and_ebpf_full_mesh() -> Result<()> {
    let Cluster { hosts, etcd, bin } = Cluster::start("m", 4, CONFIG)?;
    let dir = etcd.dir().to_path_buf();
    let not_bpffs = dir.join("not-bpffs");
    let common = |i: usize| -> Vec<String> {
        vec![
            format!("--etcd-endpoints={}", etcd.endpoints()),
            format!("-iface={}", hosts.ip(i)),
            format!("--subnet-file={}", dir.join(format!("h{i}.env")).display()),
        ]
    };
    let mut a1 = common(1);
    a1.push("--datapath=kernel".into());
    a1.push("--ip-masq".into());
    a1.push("--iptables-resync=1".into());
    let mut a2 = common(2);
    a2.push("--datapath=auto".into());
    a2.push(format!("--bpf-pin-dir={}", not_bpffs.display()));
    let mut a3 = common(3);
    a3.push("--datapath=ebpf".into());
    // Pins where `overlay-agent status` can read them from outside.
    let bpf3 = Bpffs::mount(dir.join("bpf3"))?;
    let pins3 = bpf3.0.join("overlay");
    a3.push(format!("--bpf-pin-dir={}", pins3.display()));
    let mut agents = vec![
        Agent::start(&dir, "h1", &hosts.ns(1), &bin, &a1)?,
        Agent::start(&dir, "h2", &hosts.ns(2), &bin, &a2)?,
        Agent::start(&dir, "h3", &hosts.ns(3), &bin, &a3)?,
    ];
    for a in &mut agents {
        a.wait_for("running: lease", Duration::from_secs(20))?;
    }
    assert!(agents[0].log().contains("(kernel datapath)"));
    assert!(
        agents[2].log().contains("(ebpf datapath)"),
        "{}",
        agents[2].log()
    );
    // `auto` fell back, in one line naming the reason.
    let log2 = agents[1].log();
    let fallback: Vec<&str> = log2
        .lines()
        .filter(|l| l.contains("falling back to the kernel datapath"))
        .collect();
    assert_eq!(fallback.len(), 1, "{log2}");
    assert!(fallback[0].contains("not on bpffs"), "{}", fallback[0]);
    assert!(log2.contains("(kernel datapath)"));

    // subnet.env as flanneld writes it, distinct subnets.
    let subnets: Vec<String> = (1..=3)
        .map(|i| subnet_of(&dir.join(format!("h{i}.env"))))
        .collect::<Result<_>>()?;
    let env1 = fs::read_to_string(dir.join("h1.env"))?;
    assert!(
        env1.starts_with("FLANNEL_NETWORK=10.0.0.0/16\nFLANNEL_SUBNET=10.0."),
        "{env1}"
    );
    assert!(
        env1.ends_with("/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"),
        "{env1}"
    );
    assert_eq!(
        subnets
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        3
    );

    // flanneld's iptables rules: masquerading on h1 (--ip-masq), FORWARD
    // accepts everywhere (on by default); a deleted rule comes back.
    let nat = sh(&[
        "ip",
        "netns",
        "exec",
        &hosts.ns(1),
        "iptables",
        "-t",
        "nat",
        "-S",
    ])?;
    let pod = format!("{}/24", subnets[0]);
    for want in [
        "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG".to_owned(),
        "-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN".to_owned(),
        format!("-A FLANNEL-POSTRTG -s {pod} -d 10.0.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN"),
        format!("-A FLANNEL-POSTRTG ! -s 10.0.0.0/16 -d {pod} -m comment --comment \"flanneld masq\" -j RETURN"),
        "-A FLANNEL-POSTRTG -s 10.0.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully".to_owned(),
    ] {
        assert!(nat.contains(&want), "missing {want:?} in:\n{nat}");
    }
    assert_eq!(
        nat.lines()
            .filter(|l| l.starts_with("-A FLANNEL-POSTRTG "))
            .count(),
        6,
        "{nat}"
    );
    for i in 1..=3 {
        let filter = sh(&["ip", "netns", "exec", &hosts.ns(i), "iptables", "-S"])?;
        assert!(
            filter.contains(
                "-A FLANNEL-FWD -s 10.0.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT"
            ),
            "{filter}"
        );
        assert!(
            filter.contains("-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD"),
            "{filter}"
        );
    }
    for i in 2..=3 {
        let nat = sh(&[
            "ip",
            "netns",
            "exec",
            &hosts.ns(i),
            "iptables",
            "-t",
            "nat",
            "-S",
        ])?;
        assert!(
            !nat.contains("FLANNEL-POSTRTG"),
            "no --ip-masq on h{i}: {nat}"
        );
    }
    sh(&[
        "ip",
        "netns",
        "exec",
        &hosts.ns(1),
        "iptables",
        "-t",
        "nat",
        "-D",
        "FLANNEL-POSTRTG",
        "-m",
        "mark",
        "--mark",
        "0x4000/0x4000",
        "-m",
        "comment",
        "--comment",
        "flanneld masq",
        "-j",
        "RETURN",
    ])?;
    within(Duration::from_secs(3), "masquerade rule restored", || {
        sh(&[
            "ip",
            "netns",
            "exec",
            &hosts.ns(1),
            "iptables",
            "-t",
            "nat",
            "-S",
            "FLANNEL-POSTRTG",
        ])
        .is_ok_and(|t| t.contains("0x4000/0x4000"))
    })?;

    // Full mesh, both directions, host to host over the overlay.
    for i in 1..=3 {
        for (j, dst) in subnets.iter().enumerate() {
            if j + 1 == i {
                continue;
            }
            within(Duration::from_secs(5), &format!("h{i} -> {dst}"), || {
                hosts.ping(i, dst)
            })?;
        }
    }

    // A fourth node joins: from the moment its agent has written subnet.env
    // (lease taken, datapath up), every host reaches it within a second.
    let mut a4 = common(4);
    a4.push("--datapath=ebpf".into());
    let mut agent4 = Agent::start(&dir, "h4", &hosts.ns(4), &bin, &a4)?;
    let env4 = dir.join("h4.env");
    within(Duration::from_secs(20), "h4's subnet.env", || env4.exists())?;
    let subnet4 = subnet_of(&env4)?;
    for i in 1..=3 {
        let took = within(Duration::from_secs(1), &format!("h{i} reaches h4"), || {
            hosts.ping_once_fast(i, &subnet4)
        })?;
        eprintln!("h{i}: reached the new node {took:?} after its subnet.env");
    }
    assert!(hosts.ping(4, &subnets[0]) && hosts.ping(4, &subnets[2]));

    // It leaves: its agent dies and its lease is deleted; routes and the
    // eBPF host's map entries go everywhere within a second.
    let key = format!("{PREFIX}/subnets/{subnet4}-24");
    agent4.child.kill()?;
    agent4.child.wait()?;
    etcd.delete(&key)?;
    let status3 = || -> String {
        Command::new("ip")
            .args(["netns", "exec", &hosts.ns(3)])
            .arg(&bin)
            .arg(format!("--bpf-pin-dir={}", pins3.display()))
            .arg(format!("--etcd-endpoints={}", etcd.endpoints()))
            .arg("status")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    for i in 1..=3 {
        let took = within(
            Duration::from_secs(1),
            &format!("route gone on h{i}"),
            || !hosts.routes(i).contains(&format!("{subnet4}/24")),
        )?;
        eprintln!("h{i}: removed in {took:?}");
    }
    let in_maps = status3();
    assert!(in_maps.contains("peers (2)"), "{in_maps}");
    assert!(!in_maps.contains(&format!("{subnet4}/24")), "{in_maps}");
    // The mesh still works.
    assert!(hosts.ping(1, &subnets[2]));
    assert!(hosts.ping(3, &subnets[1]));
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn a_malformed_config_is_waited_out_without_touching_the_host() -> Result<()> {
    let bin = overlay_tests::binaries::agent()?;
    let hosts = Hosts::new("c", 1)?;
    let etcd = hosts.etcd(1)?;
    etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.0.0.0/16","SubnetLen":31,"Backend":{"Type":"vxlan"}}"#,
    )?;
    let dir = etcd.dir().to_path_buf();
    let env = dir.join("h1.env");
    const PORT: u16 = 9874;
    let args = vec![
        format!("--etcd-endpoints={}", etcd.endpoints()),
        format!("--iface={}", hosts.ip(1)),
        format!("--subnet-file={}", env.display()),
        format!("--healthz-ip={}", hosts.ip(1)),
        format!("--healthz-port={PORT}"),
        "--datapath=kernel".into(),
    ];
    let mut agent = Agent::start(&dir, "h1", &hosts.ns(1), &bin, &args)?;
    agent.wait_for("nothing on this host was changed", Duration::from_secs(10))?;
    // It waits (a supervisor would otherwise restart it in a loop), says
    // why on /readyz, and touches nothing.
    within(Duration::from_secs(3), "/readyz names the field", || {
        overlay_tests::http::get(&hosts.ns(1), &hosts.ip(1), PORT, "/readyz")
            .is_ok_and(|(code, body)| code == 503 && body.contains("SubnetLen"))
    })?;
    std::thread::sleep(Duration::from_secs(4));
    ensure!(
        agent.exited().is_none(),
        "the agent gave up:\n{}",
        agent.log()
    );
    let log = agent.log();
    ensure!(log.contains("/coreos.com/network/config"), "{log}");
    ensure!(
        log.matches("SubnetLen").count() == 1,
        "the same problem was logged more than once:\n{log}"
    );
    ensure!(!sh(&["ip", "-n", &hosts.ns(1), "link"])?.contains("flannel"));
    ensure!(
        etcd.etcdctl(&[
            "get",
            "--prefix",
            "--keys-only",
            &format!("{PREFIX}/subnets/")
        ])?
        .trim()
        .is_empty()
    );
    ensure!(!env.exists());
    // Fixed in etcd: the agent carries on by itself.
    etcd.put(&format!("{PREFIX}/config"), CONFIG)?;
    agent.wait_for("running: lease", Duration::from_secs(15))?;
    ensure!(env.exists());
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn etcd_down_for_30_s_loses_no_packet_and_the_agents_resume() -> Result<()> {
    let Cluster {
        hosts,
        mut etcd,
        bin,
    } = Cluster::start("o", 3, CONFIG)?;
    let dir = etcd.dir().to_path_buf();
    let args = |i: usize, dp: &str| -> Vec<String> {
        vec![
            format!("--etcd-endpoints={}", etcd.endpoints()),
            format!("--iface={}", hosts.ip(i)),
            format!("--subnet-file={}", dir.join(format!("h{i}.env")).display()),
            format!("--datapath={dp}"),
        ]
    };
    let mut agents = vec![
        Agent::start(&dir, "h2", &hosts.ns(2), &bin, &args(2, "kernel"))?,
        Agent::start(&dir, "h3", &hosts.ns(3), &bin, &args(3, "ebpf"))?,
    ];
    for a in &mut agents {
        a.wait_for("running: lease", Duration::from_secs(20))?;
    }
    let s2 = subnet_of(&dir.join("h2.env"))?;
    let s3 = subnet_of(&dir.join("h3.env"))?;
    within(Duration::from_secs(5), "h2 -> h3", || hosts.ping(2, &s3))?;

    // 40 s of pings (5 per second) both ways while etcd is away for 30 s.
    let ping = |from: usize, dst: &str| {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &hosts.ns(from),
                "ping",
                "-i",
                "0.2",
                "-c",
                "200",
                "-W",
                "1",
                dst,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    };
    let p23 = ping(2, &s3)?;
    let p32 = ping(3, &s2)?;
    std::thread::sleep(Duration::from_secs(3));
    etcd.stop()?;
    std::thread::sleep(Duration::from_secs(30));
    etcd.start_again()?;
    for (p, what) in [(p23, "h2 -> h3"), (p32, "h3 -> h2")] {
        let out = p.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let summary = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or("no summary")
            .to_owned();
        eprintln!("{what}: {summary}");
        assert!(
            summary.contains("200 packets transmitted, 200 received"),
            "{what} lost packets while etcd was down: {summary}"
        );
    }

    // Both agents saw the trouble and resumed watching the leases (the
    // lease keeper's watch of its own key logs its own line, naming it).
    let resumed = format!("etcd watch of {PREFIX}/subnets/ resumed at revision");
    for a in &mut agents {
        a.wait_for(&resumed, Duration::from_secs(10))?;
    }
    let key = format!("{PREFIX}/subnets/10.0.19.0-24");
    etcd.put(
        &key,
        r#"{"PublicIP":"10.98.0.4","BackendType":"vxlan","BackendData":{"VtepMAC":"02:00:00:00:00:04"}}"#,
    )?;
    // The lease watch is open again: the new peer arrives as one event.
    for i in 2..=3 {
        within(
            Duration::from_secs(3),
            &format!("new peer on h{i} after the outage"),
            || {
                hosts
                    .routes(i)
                    .contains("10.0.19.0/24 via 10.0.19.0 dev flannel.1 onlink")
            },
        )?;
    }
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn a_taken_over_lease_keeps_our_subnet_and_is_taken_back() -> Result<()> {
    let Cluster { hosts, etcd, bin } = Cluster::start("t", 3, CONFIG)?;
    let dir = etcd.dir().to_path_buf();
    let env2 = dir.join("h2.env");
    const PORT: u16 = 9873;
    let args = |i: usize, dp: &str| -> Vec<String> {
        vec![
            format!("--etcd-endpoints={}", etcd.endpoints()),
            format!("--iface={}", hosts.ip(i)),
            format!("--subnet-file={}", dir.join(format!("h{i}.env")).display()),
            format!("--datapath={dp}"),
            format!("--healthz-ip={}", hosts.ip(i)),
            format!("--healthz-port={PORT}"),
        ]
    };
    let mut a2 = Agent::start(&dir, "h2", &hosts.ns(2), &bin, &args(2, "ebpf"))?;
    let mut a3 = Agent::start(&dir, "h3", &hosts.ns(3), &bin, &args(3, "kernel"))?;
    a2.wait_for("running: lease", Duration::from_secs(20))?;
    a3.wait_for("running: lease", Duration::from_secs(20))?;
    let old = subnet_of(&env2)?;
    within(Duration::from_secs(5), "h3 -> h2", || hosts.ping(3, &old))?;
    let ready = || {
        overlay_tests::http::get(&hosts.ns(2), &hosts.ip(2), PORT, "/readyz").unwrap_or_default()
    };

    // Another node's lease is written over h2's key: h2 keeps its subnet
    // for its pods (subnet.env, flannel.1's address), never routes it to
    // the other node, says it is not ready and why.
    let key = format!("{PREFIX}/subnets/{old}-24");
    etcd.put(
        &key,
        r#"{"PublicIP":"10.98.0.9","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:09"}}"#,
    )?;
    a2.wait_for("LEASE CONFLICT", Duration::from_secs(5))?;
    within(Duration::from_secs(3), "/readyz says why", || {
        let (code, body) = ready();
        code == 503 && body.contains("lease conflict") && body.contains("10.98.0.9")
    })?;
    ensure!(subnet_of(&env2)? == old, "subnet.env changed");
    let addrs = sh(&["ip", "-n", &hosts.ns(2), "-4", "addr", "show", "flannel.1"])?;
    ensure!(addrs.contains(&format!("inet {old}/32")), "{addrs}");
    ensure!(
        !hosts.routes(2).contains(&format!("{old}/24 via")),
        "h2 routes its own subnet away:\n{}",
        hosts.routes(2)
    );
    ensure!(!a2.log().contains("moved from"), "{}", a2.log());

    // The other lease goes: h2 takes its key back, is ready again, and h3
    // reaches it at the same subnet.
    etcd.delete(&key)?;
    a2.wait_for("took our lease", Duration::from_secs(5))?;
    within(Duration::from_secs(3), "ready again", || ready().0 == 200)?;
    ensure!(etcd.get(&key)?.unwrap_or_default().contains(&hosts.ip(2)));
    within(
        Duration::from_secs(5),
        "h3 -> h2 at the same subnet",
        || hosts.ping(3, &old),
    )?;

    // Garbage in our key is taken back at once, with no conflict.
    etcd.put(&key, "not a lease")?;
    within(Duration::from_secs(5), "the key is ours again", || {
        etcd.get(&key)
            .is_ok_and(|v| v.unwrap_or_default().contains(&hosts.ip(2)))
    })?;
    ensure!(ready().0 == 200);
    ensure!(
        a2.log().matches("LEASE CONFLICT").count() == 1,
        "{}",
        a2.log()
    );
    ensure!(subnet_of(&env2)? == old);
    Ok(())
}

const PEER_X: &str = r#"{"PublicIP":"10.98.0.7","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:07"}}"#;
const PEER_Y: &str = r#"{"PublicIP":"10.98.0.8","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:08"}}"#;

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn compaction_while_cut_off_makes_the_agent_relist_and_converge() -> Result<()> {
    let Cluster { hosts, etcd, bin } = Cluster::start("k", 2, CONFIG)?;
    let dir = etcd.dir().to_path_buf();
    let args = vec![
        format!("--etcd-endpoints={}", etcd.endpoints()),
        format!("--iface={}", hosts.ip(2)),
        format!("--subnet-file={}", dir.join("h2.env").display()),
        "--datapath=kernel".to_owned(),
    ];
    let mut agent = Agent::start(&dir, "h2", &hosts.ns(2), &bin, &args)?;
    agent.wait_for("running: lease", Duration::from_secs(20))?;
    let x = format!("{PREFIX}/subnets/10.0.17.0-24");
    let y = format!("{PREFIX}/subnets/10.0.18.0-24");
    etcd.put(&x, PEER_X)?;
    within(Duration::from_secs(1), "peer X programmed", || {
        hosts.routes(2).contains("10.0.17.0/24")
    })?;

    // Cut h2 off from etcd long enough for its keepalives to give up.
    let port = etcd.endpoints().rsplit(':').next().unwrap().to_owned();
    let ns2 = hosts.ns(2);
    let rule = |op: &str, chain: &str, dir: &str| {
        sh(&[
            "ip", "netns", "exec", &ns2, "iptables", "-w", op, chain, "-p", "tcp", dir, &port,
            "-j", "DROP",
        ])
    };
    rule("-I", "OUTPUT", "--dport")?;
    rule("-I", "INPUT", "--sport")?;
    // Meanwhile X leaves, Y joins, and etcd compacts its history.
    etcd.delete(&x)?;
    etcd.put(&y, PEER_Y)?;
    let status = etcd.etcdctl(&["endpoint", "status", "--write-out=json"])?;
    let rev: i64 = status
        .split("\"revision\":")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .context("revision in endpoint status")?;
    etcd.etcdctl(&["compact", &rev.to_string()])?;
    std::thread::sleep(Duration::from_secs(12));
    assert!(
        hosts.routes(2).contains("10.0.17.0/24"),
        "state kept while cut off"
    );
    rule("-D", "OUTPUT", "--dport")?;
    rule("-D", "INPUT", "--sport")?;

    within(
        Duration::from_secs(15),
        "converged after the re-list",
        || {
            let r = hosts.routes(2);
            !r.contains("10.0.17.0/24")
                && r.contains("10.0.18.0/24 via 10.0.18.0 dev flannel.1 onlink")
        },
    )?;
    assert!(agent.log().contains("re-listing"), "{}", agent.log());
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn agent_carries_on_through_the_other_members_of_a_cluster() -> Result<()> {
    let bin = overlay_tests::binaries::agent()?;
    let hosts = Hosts::new("q", 2)?;
    let mut etcd = Etcd::start_with(EtcdSpec {
        members: 3,
        netns: Some(hosts.ns(1)),
        listen_ip: Some(hosts.ip(1)),
        ..EtcdSpec::default()
    })?;
    etcd.put(&format!("{PREFIX}/config"), CONFIG)?;
    let dir = etcd.dir().to_path_buf();
    let args = vec![
        format!("--etcd-endpoints={}", etcd.endpoints()),
        format!("--iface={}", hosts.ip(2)),
        format!("--subnet-file={}", dir.join("h2.env").display()),
        "--datapath=kernel".to_owned(),
    ];
    let mut agent = Agent::start(&dir, "h2", &hosts.ns(2), &bin, &args)?;
    agent.wait_for("running: lease", Duration::from_secs(20))?;
    for i in 0..3 {
        etcd.kill_member(i)?;
        let key = format!("{PREFIX}/subnets/10.0.{}.0-24", 17 + i);
        let started = Instant::now();
        let deadline = started + Duration::from_secs(10);
        while let Err(e) = etcd.put(&key, PEER_X) {
            if Instant::now() > deadline {
                bail!("cluster unusable with member {i} down: {e}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("member {i} down: put took {:?}", started.elapsed());
        let route = format!("10.0.{}.0/24 via", 17 + i);
        let took = within(
            Duration::from_secs(20),
            &format!("peer with member {i} down"),
            || hosts.routes(2).contains(&route),
        )
        .with_context(|| agent.log())?;
        eprintln!("member {i} down: programmed in {took:?}");
        let started = Instant::now();
        etcd.restart_member(i)?;
        eprintln!("member {i} back in {:?}", started.elapsed());
    }
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn agents_interoperate_with_a_flanneld_stand_in() -> Result<()> {
    use overlay_agent::flannel::lease;
    use overlay_tests::{lab::Host, reference::ReferencePeer};

    let Cluster { hosts, etcd, bin } = Cluster::start("f", 3, CONFIG)?;
    let dir = etcd.dir().to_path_buf();

    // h1 runs "flanneld": flannel.1 made with iproute2, its lease written in
    // the older form seed 001 shows (no VNI, no PublicIPv6).
    let stand_in_host = Host {
        index: 1,
        ns: hosts.ns(1),
        container_ns: String::new(),
        underlay_dev: "eth0".into(),
        underlay_ip: hosts.ip(1).parse()?,
        switch_port: "p1".into(),
        subnet: "10.0.5.0/24".parse()?,
        gateway: "10.0.5.1".parse()?,
        container_ip: "10.0.5.2".parse()?,
    };
    let flanneld = ReferencePeer::setup(&stand_in_host, 1, 8472)?;
    etcd.put(
        &format!("{PREFIX}/subnets/10.0.5.0-24"),
        &format!(
            r#"{{"PublicIP":"{}","BackendType":"vxlan","BackendData":{{"VtepMAC":"{}"}}}}"#,
            hosts.ip(1),
            flanneld.vtep_mac
        ),
    )?;

    let args = |i: usize, dp: &str| -> Vec<String> {
        vec![
            format!("--etcd-endpoints={}", etcd.endpoints()),
            format!("--iface={}", hosts.ip(i)),
            format!("--subnet-file={}", dir.join(format!("h{i}.env")).display()),
            format!("--datapath={dp}"),
        ]
    };
    let mut agents = vec![
        Agent::start(&dir, "h2", &hosts.ns(2), &bin, &args(2, "kernel"))?,
        Agent::start(&dir, "h3", &hosts.ns(3), &bin, &args(3, "ebpf"))?,
    ];
    for a in &mut agents {
        a.wait_for("running: lease", Duration::from_secs(20))?;
    }
    // "flanneld" programs the agents' leases as it would any node's.
    for i in 2..=3 {
        let subnet = subnet_of(&dir.join(format!("h{i}.env")))?;
        let key = format!("{PREFIX}/subnets/{subnet}-24");
        let value = etcd.get(&key)?.context("agent lease")?;
        let peer = lease::decode(&key, value.as_bytes())?
            .peer()
            .context("a vxlan lease")?;
        flanneld.add_peer(&peer)?;
    }
    for i in 2..=3 {
        let mine = subnet_of(&dir.join(format!("h{i}.env")))?;
        within(Duration::from_secs(5), &format!("h{i} -> flanneld"), || {
            hosts.ping(i, "10.0.5.0")
        })?;
        within(Duration::from_secs(5), &format!("flanneld -> h{i}"), || {
            hosts.ping(1, &mine)
        })?;
    }
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn restart_keeps_subnet_and_mac_and_prunes_peers_that_left() -> Result<()> {
    let Cluster { hosts, etcd, bin } = Cluster::start("r", 2, CONFIG)?;
    let dir = etcd.dir().to_path_buf();
    let env = dir.join("h2.env");
    let args = vec![
        format!("--etcd-endpoints={}", etcd.endpoints()),
        format!("--iface={}", hosts.ip(2)),
        format!("--subnet-file={}", env.display()),
        "--datapath=ebpf".to_owned(),
    ];
    let mac_of = || -> Result<String> {
        let link = sh(&["ip", "-n", &hosts.ns(2), "link", "show", "flannel.1"])?;
        Ok(link
            .split("link/ether ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .context("flannel.1 MAC")?
            .to_owned())
    };
    let x = format!("{PREFIX}/subnets/10.0.17.0-24");
    etcd.put(&x, PEER_X)?;
    let mut agent = Agent::start(&dir, "h2", &hosts.ns(2), &bin, &args)?;
    agent.wait_for("running: lease", Duration::from_secs(20))?;
    let subnet = subnet_of(&env)?;
    let mac = mac_of()?;
    let value = etcd
        .get(&format!("{PREFIX}/subnets/{subnet}-24"))?
        .context("our lease")?;
    assert!(
        value.contains(&mac),
        "lease {value} publishes flannel.1's MAC {mac}"
    );
    assert!(hosts.routes(2).contains("10.0.17.0/24"));

    // Stop the agent (as with flanneld, everything stays), let X leave.
    drop(agent);
    etcd.delete(&x)?;
    assert!(
        hosts.routes(2).contains("10.0.17.0/24"),
        "left in place while down"
    );

    let mut agent = Agent::start(&dir, "h2b", &hosts.ns(2), &bin, &args)?;
    agent.wait_for("running: lease", Duration::from_secs(20))?;
    let log = agent.log();
    assert!(
        log.contains(&format!("reusing our lease {subnet}/24")),
        "{log}"
    );
    assert!(log.contains("(Adopted)"), "{log}");
    assert_eq!(subnet_of(&env)?, subnet);
    assert_eq!(mac_of()?, mac, "VTEP MAC kept across the restart");
    within(Duration::from_secs(1), "departed peer pruned", || {
        !hosts.routes(2).contains("10.0.17.0/24")
    })?;
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn agent_with_tls_and_auth_flags_and_a_wrong_password() -> Result<()> {
    let bin = overlay_tests::binaries::agent()?;
    let hosts = Hosts::new("s", 2)?;
    let etcd = Etcd::start_with(EtcdSpec {
        tls: true,
        user: Some(("flannel".into(), "s3cret".into())),
        netns: Some(hosts.ns(1)),
        listen_ip: Some(hosts.ip(1)),
        ..EtcdSpec::default()
    })?;
    etcd.put(&format!("{PREFIX}/config"), CONFIG)?;
    let dir = etcd.dir().to_path_buf();
    let mut args = etcd.agent_flags();
    assert!(args[0].contains("https://"));
    args.push(format!("--iface={}", hosts.ip(2)));
    args.push(format!("--subnet-file={}", dir.join("h2.env").display()));
    args.push("--datapath=kernel".into());
    let mut agent = Agent::start(&dir, "h2", &hosts.ns(2), &bin, &args)?;
    agent.wait_for("running: lease", Duration::from_secs(20))?;
    drop(agent);

    let wrong: Vec<String> = args
        .iter()
        .map(|a| {
            if a.starts_with("--etcd-password=") {
                "--etcd-password=wrong".to_owned()
            } else {
                a.clone()
            }
        })
        .collect();
    let mut agent = Agent::start(&dir, "h2-wrong", &hosts.ns(2), &bin, &wrong)?;
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = agent.child.try_wait()? {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!(
                "agent with a wrong password still running:\n{}",
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let log = agent.log();
    assert!(log.contains("authentication failed"), "{log}");
    assert!(
        !log.contains("s3cret") && !log.contains("=wrong"),
        "no password in the log: {log}"
    );
    Ok(())
}
