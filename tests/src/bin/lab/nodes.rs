//! What runs in the lab: etcd, the two agents, and the flanneld stand-in.
//! Processes are started in their own process group so a Ctrl-C in the
//! terminal reaches only the lab, which then tears them down in order.

use std::{
    fs,
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use overlay_agent::flannel::lease;
use overlay_tests::{cmd, etcd, lab::Host, reference::ReferencePeer};

use crate::topo::{self, Node, Role, SubnetEnv};

/// `etcdctl` (v3 API) against the lab's etcd, run inside etcd's namespace.
pub fn etcdctl(args: &[&str]) -> Result<String> {
    let endpoints = format!("--endpoints={}", topo::ETCD_URL);
    let mut full = vec![
        "env",
        "ETCDCTL_API=3",
        etcd::ETCDCTL,
        &endpoints,
        "--command-timeout=5s",
    ];
    full.extend_from_slice(args);
    cmd::run_in(topo::ETCD_NS, &full)
}

/// Every key under the prefix with its value, as `etcdctl get --prefix` lists them.
pub fn leases() -> Result<Vec<(String, String)>> {
    let out = etcdctl(&["get", "--prefix", topo::ETCD_PREFIX])?;
    let lines: Vec<&str> = out.lines().collect();
    Ok(lines
        .chunks(2)
        .filter(|kv| kv.len() == 2)
        .map(|kv| (kv[0].to_owned(), kv[1].to_owned()))
        .collect())
}

pub fn spawn_logged(mut cmd: Command, log: &Path) -> Result<Child> {
    let f = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .process_group(0)
        .spawn()
        .with_context(|| format!("spawning {:?}", cmd.get_program()))
}

fn tail(path: &Path, n: usize) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// etcd in its own namespace, listening on its underlay address; returns once it serves.
pub fn start_etcd() -> Result<Child> {
    let dir = topo::state_dir();
    let log = dir.join("etcd.log");
    let mut c = Command::new("ip");
    c.args(["netns", "exec", topo::ETCD_NS, etcd::ETCD]);
    c.args(["--name", "ovlab"])
        .arg("--data-dir")
        .arg(dir.join("etcd"))
        .args(["--listen-client-urls", topo::ETCD_URL])
        .args(["--advertise-client-urls", topo::ETCD_URL])
        .args(["--listen-peer-urls", topo::ETCD_PEER_URL])
        .args(["--initial-advertise-peer-urls", topo::ETCD_PEER_URL])
        .args([
            "--initial-cluster",
            &format!("ovlab={}", topo::ETCD_PEER_URL),
        ]);
    let mut child = spawn_logged(c, &log)?;
    fs::write(dir.join("etcd.pid"), child.id().to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if etcdctl(&["endpoint", "health"]).is_ok() {
            return Ok(child);
        }
        if let Some(st) = child.try_wait()? {
            bail!("etcd exited ({st}):\n{}", tail(&log, 20));
        }
        if Instant::now() > deadline {
            bail!("etcd not healthy after 30 s:\n{}", tail(&log, 20));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The agent on `node`, with its own subnet file and pin dir under the state
/// directory. `ip netns exec` gives it a private mount namespace, where the
/// pin dir is mounted as bpffs (it goes away with the agent).
pub fn start_agent(node: &Node, agent: &Path, ebpf_ingress: &str) -> Result<Child> {
    let datapath = match node.role {
        Role::Ebpf => "ebpf",
        Role::Kernel => "kernel",
        Role::FlanneldStandIn => bail!("host {} runs the flanneld stand-in", node.index),
    };
    fs::create_dir_all(node.pin_dir())?;
    let script = format!(
        "mount -t bpf bpf /sys/fs/bpf 2>/dev/null; mount -t bpf bpf {pin} && exec {agent} \"$@\"",
        pin = node.pin_dir().display(),
        agent = agent.display()
    );
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        &node.ns(),
        "sh",
        "-c",
        &script,
        "overlay-agent",
    ])
    .arg(format!("--etcd-endpoints={}", topo::ETCD_URL))
    .arg(format!("--iface={}", node.underlay_ip()))
    .arg(format!("--subnet-file={}", node.subnet_file().display()))
    .arg(format!("--datapath={datapath}"))
    .arg(format!("--bpf-pin-dir={}", node.pin_dir().display()))
    .env("RUST_LOG", "info");
    if node.role == Role::Ebpf {
        c.arg(format!("--ebpf-ingress={ebpf_ingress}"));
    }
    let child = spawn_logged(c, &node.log())?;
    fs::write(node.pid_file(), child.id().to_string())?;
    Ok(child)
}

/// Waits for the agent's subnet.env (written once it holds a lease and has
/// set up its datapath).
pub fn wait_for_lease(node: &Node, child: &mut Child) -> Result<SubnetEnv> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(env) = SubnetEnv::read(node) {
            return Ok(env);
        }
        if let Some(st) = child.try_wait()? {
            bail!(
                "the agent on {} exited ({st}) before writing {}:\n{}",
                node.ns(),
                node.subnet_file().display(),
                tail(&node.log(), 30)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the agent on {} wrote no {} within 30 s:\n{}",
                node.ns(),
                node.subnet_file().display(),
                tail(&node.log(), 30)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// flanneld as seed 001 shows it, without flanneld: `flannel.100` made and
/// addressed with iproute2 ([`ReferencePeer`]), a lease with flannel's 24 h
/// TTL written with etcdctl in the form of seed 001, and subnet.env as
/// flanneld writes it.
pub fn start_stand_in(node: &Node) -> Result<ReferencePeer> {
    let subnet: ipnet::Ipv4Net = topo::STAND_IN_SUBNET.parse()?;
    let gateway = nth(&subnet, 1);
    let host = Host {
        index: node.index,
        ns: node.ns(),
        container_ns: node.container_ns(),
        underlay_dev: topo::UNDERLAY_DEV.into(),
        underlay_ip: node.underlay_ip(),
        switch_port: format!("h{}", node.index),
        subnet,
        gateway,
        container_ip: nth(&subnet, 2),
    };
    let peer = ReferencePeer::setup(&host, topo::VNI, topo::PORT)?;
    let grant = etcdctl(&["lease", "grant", "86400"])?;
    // "lease 694d7c5f1d5c1b0a granted with TTL(86400s)"
    let id = grant
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("etcdctl lease grant said {grant:?}"))?
        .to_owned();
    let key = format!(
        "{}/subnets/{}-{}",
        topo::ETCD_PREFIX,
        subnet.network(),
        subnet.prefix_len()
    );
    let value = format!(
        r#"{{"PublicIP":"{}","BackendType":"vxlan","BackendData":{{"VtepMAC":"{}"}}}}"#,
        node.underlay_ip(),
        peer.vtep_mac
    );
    etcdctl(&["put", &format!("--lease={id}"), &key, &value])?;
    fs::create_dir_all(node.dir())?;
    fs::write(
        node.subnet_file(),
        format!(
            "FLANNEL_NETWORK=10.0.0.0/8\nFLANNEL_SUBNET={gateway}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ=false\n",
            subnet.prefix_len(),
            peer.mtu
        ),
    )?;
    Ok(peer)
}

/// The stand-in programs every other lease (neighbour, FDB, route), as
/// flanneld does for each lease it sees.
pub fn program_stand_in(peer: &ReferencePeer) -> Result<usize> {
    let mut n = 0;
    for (key, value) in leases()? {
        if !key.starts_with(&format!("{}/subnets/", topo::ETCD_PREFIX)) {
            continue;
        }
        let l = lease::decode(&key, value.as_bytes())?;
        let Some(p) = l.peer() else { continue };
        if p.subnet != peer.subnet {
            peer.add_peer(&p)?;
            n += 1;
        }
    }
    Ok(n)
}

/// The n-th address of a network.
fn nth(net: &ipnet::Ipv4Net, n: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(net.network()) + n)
}
