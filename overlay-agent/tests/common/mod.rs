//! A two-host lab for the datapath tests: namespaces `h2-<tag><n>-<pid>` joined
//! by a veth pair (`ua` 192.168.77.1/24 <-> `ub` 192.168.77.2/24), each with a
//! container namespace behind a veth (10.77.<n>.2/24, gateway 10.77.<n>.1 on the
//! host), as docker sits behind flannel. Everything is deleted on drop.

#![allow(dead_code)]

use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use overlay_agent::{
    datapath::{NodeSpec, Peer},
    flannel::mac::MacAddr,
    netns::NetnsWorker,
};

pub type Node<S> = NetnsWorker<S>;

pub struct LabNode {
    pub ns: String,
    pub container: String,
    pub public_ip: &'static str,
    pub underlay: &'static str,
    pub subnet: &'static str,
}

impl LabNode {
    pub fn spec(&self) -> NodeSpec {
        NodeSpec {
            vni: 1,
            port: 0,
            public_ip: self.public_ip.parse().unwrap(),
            local_ip: self.public_ip.parse().unwrap(),
            underlay: self.underlay.into(),
            subnet: self.subnet.parse().unwrap(),
            mtu: None,
            vtep_mac: None,
            direct_routing: false,
            ipv6: None,
        }
    }

    pub fn peer(&self, vtep_mac: MacAddr) -> Result<Peer> {
        Ok(Peer {
            subnet: self.subnet.parse()?,
            public_ip: self.public_ip.parse()?,
            vtep_mac,
            v6: None,
        })
    }

    pub fn worker<S: 'static>(&self, init: impl FnOnce() -> S + Send + 'static) -> Result<Node<S>> {
        NetnsWorker::spawn(&self.ns, init).with_context(|| format!("worker in {}", self.ns))
    }
}

pub struct Lab {
    pub nodes: Vec<LabNode>,
    created: Vec<String>,
}

impl Lab {
    pub fn new(tag: &str) -> Result<Self> {
        let pid = std::process::id();
        let mut lab = Lab {
            nodes: Vec::new(),
            created: Vec::new(),
        };
        for (n, public_ip, underlay, subnet) in [
            (1, "192.168.77.1", "ua", "10.77.1.0/24"),
            (2, "192.168.77.2", "ub", "10.77.2.0/24"),
        ] {
            let node = LabNode {
                ns: format!("h2-{tag}{n}-{pid}"),
                container: format!("h2-{tag}c{n}-{pid}"),
                public_ip,
                underlay,
                subnet,
            };
            for ns in [&node.ns, &node.container] {
                cmd(&format!("ip netns add {ns}"))?;
                lab.created.push(ns.clone());
                cmd(&format!("ip -n {ns} link set lo up"))?;
            }
            lab.nodes.push(node);
        }
        let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
        cmd(&format!(
            "ip link add ua netns {} type veth peer name ub netns {}",
            a.ns, b.ns
        ))?;
        for (n, node) in lab.nodes.iter().enumerate() {
            let n = n + 1;
            cmd(&format!(
                "ip -n {} addr add {}/24 dev {}",
                node.ns, node.public_ip, node.underlay
            ))?;
            cmd(&format!("ip -n {} link set {} up", node.ns, node.underlay))?;
            cmd(&format!(
                "ip link add veth0 netns {} type veth peer name eth0 netns {}",
                node.ns, node.container
            ))?;
            cmd(&format!(
                "ip -n {} addr add 10.77.{n}.1/24 dev veth0",
                node.ns
            ))?;
            cmd(&format!("ip -n {} link set veth0 up", node.ns))?;
            cmd(&format!(
                "ip -n {} addr add 10.77.{n}.2/24 dev eth0",
                node.container
            ))?;
            cmd(&format!("ip -n {} link set eth0 up", node.container))?;
            cmd(&format!(
                "ip -n {} route add default via 10.77.{n}.1",
                node.container
            ))?;
            cmd(&format!(
                "ip netns exec {} sysctl -qw net.ipv4.ip_forward=1",
                node.ns
            ))?;
        }
        Ok(lab)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            if let Err(e) = cmd(&format!("ip netns del {ns}")) {
                eprintln!("cleanup: {e:#}");
            }
        }
    }
}

/// Runs a command (split on whitespace) and returns its stdout; fails with its stderr.
pub fn cmd(line: &str) -> Result<String> {
    let mut words = line.split_whitespace();
    let program = words.next().context("empty command")?;
    let out = Command::new(program)
        .args(words)
        .output()
        .with_context(|| format!("running `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command that must fail.
pub fn cmd_fails(line: &str) -> Result<()> {
    match cmd(line) {
        Ok(out) => bail!("`{line}` succeeded but should have failed:\n{out}"),
        Err(_) => Ok(()),
    }
}

/// Three pings from namespace `ns` to `dst`, all answered.
pub fn ping(ns: &str, dst: &str) -> Result<()> {
    let out = cmd(&format!("ip netns exec {ns} ping -c 3 -i 0.2 -W 2 {dst}"))?;
    let summary = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_default();
    eprintln!("[{ns}] ping {dst}: {summary}");
    if !summary.contains(" 0% packet loss") {
        bail!("ping {dst} from {ns} lost packets:\n{out}");
    }
    Ok(())
}

/// The three entries flannel programs for `peer`, as iproute2 shows them.
pub fn expect_peer_entries(node: &LabNode, peer: &Peer) -> Result<()> {
    let gw = peer.subnet.network();
    let neigh = cmd(&format!("ip -n {} neigh show dev flannel.1", node.ns))?;
    let fdb = cmd(&format!("bridge -n {} fdb show dev flannel.1", node.ns))?;
    let routes = cmd(&format!("ip -n {} route", node.ns))?;
    eprintln!(
        "[{}] ip neigh show dev flannel.1\n{neigh}[{0}] bridge fdb show dev flannel.1\n{fdb}[{0}] ip route\n{routes}",
        node.ns
    );
    let want_neigh = format!("{gw} lladdr {} PERMANENT", peer.vtep_mac);
    let want_fdb = format!("{} dst {} self permanent", peer.vtep_mac, peer.public_ip);
    let want_route = format!("{} via {gw} dev flannel.1 onlink", peer.subnet);
    ensure!(
        neigh.lines().any(|l| l.trim() == want_neigh),
        "`{want_neigh}` missing:\n{neigh}"
    );
    ensure!(
        fdb.lines().any(|l| l.trim() == want_fdb),
        "`{want_fdb}` missing:\n{fdb}"
    );
    ensure!(
        routes.lines().any(|l| l.trim() == want_route),
        "`{want_route}` missing:\n{routes}"
    );
    ensure!(
        fdb.lines().filter(|l| l.contains(" dst ")).count() == 1,
        "exactly one unicast FDB entry expected:\n{fdb}"
    );
    Ok(())
}
