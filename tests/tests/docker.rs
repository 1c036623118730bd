//! The seeds' docker workflow end to end, with a real dockerd: on each of two
//! hosts, `overlay-agent mk-docker-opts` turns subnet.env into
//! docker_opts.env (byte for byte as flannel's mk-docker-opts.sh, seed 004),
//! dockerd runs with its `$DOCKER_OPTS` (docker0 takes FLANNEL_SUBNET and
//! FLANNEL_MTU, as with seed 001's `--bip=${FLANNEL_SUBNET}
//! --mtu=${FLANNEL_MTU}`), and containers made from a busybox image imported
//! on the spot reach each other: ping and a TCP transfer whose SHA-256
//! matches, both ways. Host 1 runs our eBPF agent with `--ip-masq` (seed
//! 004's flanneld flags, so docker gets `--ip-masq=false`); host 2 is a
//! flanneld stand-in without `--ip-masq` (seed 001: its lease written to
//! etcd in flannel's format, `flannel.1` made with iproute2, flanneld's
//! FORWARD accept rules, so docker masquerades itself with
//! `--ip-masq=true`). dockerd sets the FORWARD policy to DROP on both hosts;
//! the FLANNEL-FWD rules (ours on host 1) are what let the overlay's traffic
//! through.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use ipnet::Ipv4Net;
use overlay_tests::{
    agent::{Agent, Cluster, Hosts, sh, within},
    docker::{Dockerd, HostDirs, options_from_env_file},
    etcd::Etcd,
    lab::Host,
    reference::ReferencePeer,
};

/// Seed 004's network config (VNI 1 and port 8472 by default).
const CONFIG: &str = r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "SubnetMin": "10.0.1.0","SubnetMax": "10.0.20.0", "Backend": {"Type": "vxlan"}}"#;
const NETWORK: &str = "10.0.0.0/16";
const PREFIX: &str = "/coreos.com/network";
/// The stand-in's lease: seed 004's node 2.
const STAND_IN_SUBNET: &str = "10.0.14.0/24";
const VNI: u32 = 1;
const VXLAN_PORT: u16 = 8472;
const IMAGE: &str = "bb:1";
const TCP_PORT: u16 = 5001;
const PAYLOAD_BYTES: u32 = 8 << 20;
/// What `sha256sum` prints for nothing: a transfer that carried no bytes.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

#[test]
#[ignore = "needs root, network namespaces, etcd, eBPF and docker.io: run `cargo xtask test`"]
fn docker_containers_across_an_ebpf_agent_and_a_flanneld_stand_in() -> Result<()> {
    let cluster = Cluster::start("dk", 2, CONFIG)?;
    let Cluster { hosts, etcd, bin } = &cluster;
    let dir = etcd.dir().to_path_buf();
    let env = |i: usize| dir.join(format!("h{i}.env"));

    // The stand-in takes its lease first, so the agent's is another.
    let stand_in = start_stand_in(hosts, etcd, &env(2))?;
    let mut agent = Agent::start(
        &dir,
        "h1",
        &hosts.ns(1),
        bin,
        &cluster.args(1, &["--datapath=ebpf", "--ip-masq"]),
    )?;
    agent.wait_for("running: lease", Duration::from_secs(20))?;
    ensure!(agent.log().contains("(ebpf datapath)"), "{}", agent.log());
    program_stand_in(etcd, &stand_in)?;
    within(
        Duration::from_secs(10),
        "host 1 reaches the stand-in's flannel.1",
        || hosts.ping(1, &stand_in.subnet.network().to_string()),
    )?;

    // mk-docker-opts on each host, as the agent's unit runs it (ExecStartPost).
    let opts = |i: usize| dir.join(format!("h{i}-docker_opts.env"));
    for (i, docker_masq) in [(1, "false"), (2, "true")] {
        let got = mk_docker_opts(bin, &hosts.ns(i), &env(i), &opts(i))?;
        let subnet = var(&env(i), "FLANNEL_SUBNET")?;
        let mtu = var(&env(i), "FLANNEL_MTU")?;
        ensure!(mtu == "1450", "h{i}: FLANNEL_MTU={mtu}");
        let want = format!(
            "DOCKER_OPT_BIP=\"--bip={subnet}\"\nDOCKER_OPT_IPMASQ=\"--ip-masq={docker_masq}\"\n\
             DOCKER_OPT_MTU=\"--mtu={mtu}\"\nDOCKER_OPTS=\" --bip={subnet} --ip-masq={docker_masq} --mtu={mtu}\"\n"
        );
        ensure!(got == want, "h{i}: docker_opts.env is\n{got}\nnot\n{want}");
    }

    // dockerd with those options on both hosts (fails loudly if it cannot start).
    let host_dirs = HostDirs::note();
    let docker_dir = |i: usize| -> PathBuf {
        std::env::temp_dir().join(format!("ovdk{}h{i}", std::process::id()))
    };
    let mut d1 = Dockerd::start(
        &hosts.ns(1),
        &docker_dir(1),
        &options_from_env_file(&opts(1), "DOCKER_OPTS")?,
    )?;
    let mut d2 = Dockerd::start(
        &hosts.ns(2),
        &docker_dir(2),
        &options_from_env_file(&opts(2), "DOCKER_OPTS")?,
    )?;
    let mut containers = Vec::new();
    for (i, d) in [(1, &d1), (2, &d2)] {
        let subnet = var(&env(i), "FLANNEL_SUBNET")?;
        let addr = sh(&["ip", "-n", &hosts.ns(i), "-4", "addr", "show", "docker0"])?;
        ensure!(
            addr.contains(&format!("inet {subnet} ")),
            "h{i}: docker0 lacks {subnet}:\n{addr}"
        );
        let forward = iptables(hosts, i, &["-S", "FORWARD"])?;
        ensure!(
            forward.lines().next() == Some("-P FORWARD DROP"),
            "h{i}: dockerd did not set FORWARD's policy to DROP (what this test is about):\n{forward}"
        );
        ensure!(
            forward.contains("-j FLANNEL-FWD"),
            "h{i}: FLANNEL-FWD is no longer jumped to from FORWARD:\n{forward}"
        );

        d.import_busybox(IMAGE)?;
        let name = format!("c{i}");
        d.docker(&["run", "-d", "--name", &name, IMAGE, "/bin/sleep", "3600"])?;
        let ip: Ipv4Addr = d
            .docker(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", &name])?
            .trim()
            .parse()
            .with_context(|| format!("the address docker gave {name}"))?;
        let pods: Ipv4Net = subnet.parse::<Ipv4Net>()?.trunc();
        ensure!(
            pods.contains(&ip),
            "{name}'s {ip} is not in FLANNEL_SUBNET {pods}"
        );
        let mtu = d.docker(&["exec", &name, "cat", "/sys/class/net/eth0/mtu"])?;
        ensure!(mtu.trim() == "1450", "{name}: eth0 MTU {mtu}");
        containers.push((d, name, ip));
    }
    // The agent finds docker0 as the pods' bridge and puts the fast path on c1's veth.
    within(
        Duration::from_secs(10),
        "fast path on docker0's veth",
        || {
            let log = agent.log();
            log.contains("fast path: pods are behind docker0")
                && log.contains("fast path: attached to veth")
        },
    )
    .with_context(|| agent.log())?;

    let (c1, c2) = (&containers[0], &containers[1]);
    for (from, to) in [(c1, c2), (c2, c1)] {
        ping(from.0, &from.1, to.2)?;
        transfer(from.0, &from.1, to.0, &to.1, to.2)?;
    }
    drop(containers);

    d2.stop()?;
    d1.stop()?;
    host_dirs.remove()?;
    Ok(())
}

/// flanneld without `--ip-masq` on host 2, built from the seeds: `flannel.1`
/// with iproute2, a lease with flannel's 24 h TTL in the form of seed 001,
/// flanneld's FORWARD accept rules (`--iptables-forward-rules`, on by
/// default) and subnet.env as flanneld writes it.
fn start_stand_in(hosts: &Hosts, etcd: &Etcd, env: &Path) -> Result<ReferencePeer> {
    let subnet: Ipv4Net = STAND_IN_SUBNET.parse()?;
    let nth = |n: u32| Ipv4Addr::from(u32::from(subnet.network()) + n);
    let host = Host {
        index: 2,
        ns: hosts.ns(2),
        container_ns: String::new(),
        underlay_dev: "eth0".into(),
        underlay_ip: hosts.ip(2).parse()?,
        switch_port: "p2".into(),
        subnet,
        gateway: nth(1),
        container_ip: nth(2),
    };
    let peer = ReferencePeer::setup(&host, VNI, VXLAN_PORT)?;
    let grant = etcd.etcdctl(&["lease", "grant", "86400"])?;
    // "lease 694d7c5f1d5c1b0a granted with TTL(86400s)"
    let id = grant
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("etcdctl lease grant said {grant:?}"))?;
    let key = format!(
        "{PREFIX}/subnets/{}-{}",
        subnet.network(),
        subnet.prefix_len()
    );
    let value = format!(
        r#"{{"PublicIP":"{}","BackendType":"vxlan","BackendData":{{"VtepMAC":"{}"}}}}"#,
        host.underlay_ip, peer.vtep_mac
    );
    etcd.etcdctl(&["put", &format!("--lease={id}"), &key, &value])?;
    let comment = ["-m", "comment", "--comment", "flanneld forward"];
    iptables(hosts, 2, &["-N", "FLANNEL-FWD"])?;
    for dir in ["-s", "-d"] {
        let mut rule = vec!["-A", "FLANNEL-FWD", dir, NETWORK];
        rule.extend(comment);
        rule.extend(["-j", "ACCEPT"]);
        iptables(hosts, 2, &rule)?;
    }
    let mut jump = vec!["-A", "FORWARD"];
    jump.extend(comment);
    jump.extend(["-j", "FLANNEL-FWD"]);
    iptables(hosts, 2, &jump)?;
    fs::write(
        env,
        format!(
            "FLANNEL_NETWORK={NETWORK}\nFLANNEL_SUBNET={}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ=false\n",
            host.gateway,
            subnet.prefix_len(),
            peer.mtu
        ),
    )?;
    Ok(peer)
}

/// The stand-in programs every other lease in etcd, as flanneld does.
fn program_stand_in(etcd: &Etcd, peer: &ReferencePeer) -> Result<()> {
    let out = etcd.etcdctl(&["get", "--prefix", &format!("{PREFIX}/subnets/")])?;
    let lines: Vec<&str> = out.lines().collect();
    let mut n = 0;
    for kv in lines.chunks(2) {
        let [key, value] = kv else {
            bail!("etcdctl get printed an odd number of lines:\n{out}")
        };
        let lease = overlay_agent::flannel::lease::decode(key, value.as_bytes())?;
        let Some(p) = lease.peer() else { continue };
        if p.subnet != peer.subnet {
            peer.add_peer(&p)?;
            n += 1;
        }
    }
    ensure!(n == 1, "the stand-in saw {n} other leases:\n{out}");
    Ok(())
}

/// `overlay-agent mk-docker-opts -f <env> -d <out>` on the host, with an
/// environment holding nothing the script would read; the file it wrote.
fn mk_docker_opts(bin: &Path, ns: &str, env: &Path, out: &Path) -> Result<String> {
    let o = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(bin)
        .args(["mk-docker-opts", "-f"])
        .arg(env)
        .arg("-d")
        .arg(out)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .output()?;
    ensure!(
        o.status.success(),
        "mk-docker-opts in {ns} failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(fs::read_to_string(out)?)
}

fn var(env: &Path, name: &str) -> Result<String> {
    let text = fs::read_to_string(env)?;
    overlay_agent::flannel::subnet_env::parse_env(&text)
        .remove(name)
        .with_context(|| format!("{} has no {name}:\n{text}", env.display()))
}

fn iptables(hosts: &Hosts, i: usize, args: &[&str]) -> Result<String> {
    let mut full = vec!["ip", "netns", "exec"];
    let ns = hosts.ns(i);
    full.push(&ns);
    full.push("iptables");
    full.extend_from_slice(args);
    sh(&full)
}

/// Pings from container `from` on `d` until one answers (the first crosses
/// ARP and the overlay), then five that must all be answered.
fn ping(d: &Dockerd, from: &str, to: Ipv4Addr) -> Result<()> {
    let to = to.to_string();
    within(
        Duration::from_secs(15),
        &format!("{from} pings {to}"),
        || {
            d.docker(&["exec", from, "ping", "-c", "1", "-W", "1", &to])
                .is_ok()
        },
    )?;
    let out = d.docker(&["exec", from, "ping", "-c", "5", "-W", "2", &to])?;
    ensure!(out.contains(" 0% packet loss"), "{from} -> {to}:\n{out}");
    Ok(())
}

/// `PAYLOAD_BYTES` of random data from container `from` to `to` (listening
/// with busybox nc) over TCP; the SHA-256 on both ends must match.
fn transfer(from_d: &Dockerd, from: &str, to_d: &Dockerd, to: &str, to_ip: Ipv4Addr) -> Result<()> {
    let port = TCP_PORT.to_string();
    to_d.docker(&[
        "exec",
        "-d",
        to,
        "sh",
        "-c",
        // busybox nc shuts its sending half at the end of its stdin, and the
        // sender quits on that: a stdin that stays open keeps it receiving.
        &format!("sleep 120 | nc -l -p {port} > /tmp/recv"),
    ])?;
    within(
        Duration::from_secs(10),
        &format!("{to} listens on {port}"),
        || {
            to_d.docker(&["exec", to, "netstat", "-ltn"])
                .is_ok_and(|o| o.contains(&format!(":{port} ")))
        },
    )?;
    let sent = from_d.docker(&[
        "exec",
        from,
        "sh",
        "-c",
        &format!(
            "head -c {PAYLOAD_BYTES} /dev/urandom > /tmp/payload && \
             timeout 60 nc {to_ip} {port} < /tmp/payload && sha256sum /tmp/payload && rm /tmp/payload"
        ),
    ])?;
    let got = to_d.docker(&[
        "exec",
        to,
        "timeout",
        "60",
        "sh",
        "-c",
        "while pidof nc > /dev/null; do sleep 0.1; done; sha256sum /tmp/recv && rm /tmp/recv",
    ])?;
    let digest = |s: &str| s.split_whitespace().next().unwrap_or_default().to_owned();
    let (sent, got) = (digest(&sent), digest(&got));
    ensure!(
        sent != EMPTY_SHA256 && sent.len() == 64,
        "{from} sent {sent:?}"
    );
    ensure!(
        sent == got,
        "{from} -> {to} ({to_ip}): sent SHA-256 {sent}, received {got}"
    );
    eprintln!("{from} -> {to} ({to_ip}): {PAYLOAD_BYTES} bytes, SHA-256 {sent} on both ends");
    Ok(())
}
