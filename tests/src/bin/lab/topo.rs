//! The lab's fixed layout: names, addresses, roles, and the namespaces that
//! carry them. Everything is fixed (not per process) so `status` and `down`,
//! run later from another terminal, find what `up` built.
//!
//! ```text
//!  [ovlab-c1]            [ovlab-c2]            [ovlab-c3]      containers, addressed
//!      | veth                | veth                | veth      from each host's lease
//!  [ovlab-h1] cni0       [ovlab-h2] cni0       [ovlab-h3] cni0
//!   eBPF agent            kernel agent          flanneld stand-in
//!   eth0 .205.10          eth0 .205.11          eth0 .205.12
//!      |                     |                     |
//!  [ovlab-sw] br0 ---------------------------------------- [ovlab-etcd] eth0 .205.2
//! ```
//!
//! The Kubernetes variant (`up --kube`) is the same underlay with the API
//! stand-in in `ovlab-api` (.205.2:6443) instead of etcd, Nodes node1..3,
//! and pods made by the CNI plugins in `ovlab-c1..3`.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use overlay_tests::{cmd, lab::namespaces_with_prefix, netns};

/// Every namespace of the lab starts with this (the tests use `ov<name>-<pid>-`
/// and `h3ctl...`, so a lab left up never collides with a test run).
pub const PREFIX: &str = "ovlab-";
/// Where `up` keeps what `status` and `down` need: pids, logs, subnet files, pin dirs.
pub const STATE_DIR: &str = "/run/overlay-lab";
pub const SWITCH_NS: &str = "ovlab-sw";
pub const ETCD_NS: &str = "ovlab-etcd";
pub const ETCD_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 205, 2);
pub const ETCD_URL: &str = "http://192.168.205.2:2379";
pub const ETCD_PEER_URL: &str = "http://192.168.205.2:2380";
pub const ETCD_PREFIX: &str = "/coreos.com/network";
/// Seed 001's network config, verbatim apart from whitespace.
pub const NETWORK_CONFIG: &str = r#"{"Network": "10.0.0.0/8", "SubnetLen": 20, "SubnetMin": "10.10.0.0", "SubnetMax": "10.99.0.0", "Backend": {"Type": "vxlan", "VNI": 100, "Port": 8472}}"#;
pub const VNI: u32 = 100;
pub const PORT: u16 = 8472;
/// The stand-in's lease: the one seed 001's first flanneld got.
pub const STAND_IN_SUBNET: &str = "10.15.64.0/20";
/// The Kubernetes variant's control plane: the API stand-in (inside `up`).
pub const API_NS: &str = "ovlab-api";
pub const API_PORT: u16 = 6443;
/// kube-flannel's default VNI (net-conf.json names none).
pub const KUBE_VNI: u32 = 1;
pub const UNDERLAY_DEV: &str = "eth0";
pub const BRIDGE_DEV: &str = "cni0";

/// Which lab runs: seed 001's etcd lab, or the Kubernetes one (`up --kube`).
/// `up` records it in the state directory for `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Etcd,
    Kube,
}

static VARIANT: std::sync::OnceLock<Variant> = std::sync::OnceLock::new();

fn variant_file() -> PathBuf {
    state_dir().join("variant")
}

/// Sets this process's variant (once): `up` from its flags, records it.
pub fn set_variant(v: Variant) {
    let _ = VARIANT.set(v);
}

pub fn record_variant() -> Result<()> {
    let text = match variant() {
        Variant::Etcd => "etcd",
        Variant::Kube => "kube",
    };
    std::fs::write(variant_file(), text).context("recording the lab's variant")
}

/// The variant set by `up`, or else the one the running lab recorded
/// (etcd when none is recorded).
pub fn variant() -> Variant {
    *VARIANT.get_or_init(|| match std::fs::read_to_string(variant_file()) {
        Ok(s) if s.trim() == "kube" => Variant::Kube,
        _ => Variant::Etcd,
    })
}

impl Variant {
    /// The namespace of the control plane (etcd or the API stand-in), at [`ETCD_IP`].
    pub fn control_ns(self) -> &'static str {
        match self {
            Variant::Etcd => ETCD_NS,
            Variant::Kube => API_NS,
        }
    }

    pub fn vni(self) -> u32 {
        match self {
            Variant::Etcd => VNI,
            Variant::Kube => KUBE_VNI,
        }
    }

    /// What the ping matrix calls a container.
    pub fn workload(self) -> &'static str {
        match self {
            Variant::Etcd => "c",
            Variant::Kube => "pod",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// overlay-agent --datapath ebpf
    Ebpf,
    /// overlay-agent --datapath kernel
    Kernel,
    /// flannel.100 made with iproute2, lease written with etcdctl
    FlanneldStandIn,
}

impl Role {
    pub fn describe(self) -> &'static str {
        match (variant(), self) {
            (Variant::Etcd, Role::Ebpf) => "overlay-agent --datapath ebpf",
            (Variant::Etcd, Role::Kernel) => "overlay-agent --datapath kernel",
            (Variant::Etcd, Role::FlanneldStandIn) => "flanneld stand-in (iproute2 + etcdctl)",
            (Variant::Kube, Role::Ebpf) => "overlay-agent --kube-subnet-mgr --datapath ebpf",
            (Variant::Kube, Role::Kernel) => "overlay-agent --kube-subnet-mgr --datapath kernel",
            (Variant::Kube, Role::FlanneldStandIn) => {
                "flanneld stand-in (iproute2 + Node annotations)"
            }
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Role::Ebpf => "ebpf",
            Role::Kernel => "kernel",
            Role::FlanneldStandIn => "flanneld",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Node {
    pub index: u8,
    pub role: Role,
}

pub const NODES: [Node; 3] = [
    Node {
        index: 1,
        role: Role::Ebpf,
    },
    Node {
        index: 2,
        role: Role::Kernel,
    },
    Node {
        index: 3,
        role: Role::FlanneldStandIn,
    },
];

impl Node {
    pub fn ns(&self) -> String {
        format!("{PREFIX}h{}", self.index)
    }
    pub fn container_ns(&self) -> String {
        format!("{PREFIX}c{}", self.index)
    }
    /// Seed 001's hosts are 192.168.205.10 and .11; the third follows.
    pub fn underlay_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 205, 9 + self.index)
    }
    pub fn dir(&self) -> PathBuf {
        state_dir().join(format!("h{}", self.index))
    }
    /// subnet.env; in the Kubernetes variant where the cluster keeps it
    /// (`kube/h<i>.env`, the CNI plugins' state in `kube/h<i>.env.cni`).
    pub fn subnet_file(&self) -> PathBuf {
        match variant() {
            Variant::Etcd => self.dir().join("subnet.env"),
            Variant::Kube => kube_dir().join(format!("h{}.env", self.index)),
        }
    }
    /// Node name in the Kubernetes variant.
    pub fn node_name(&self) -> String {
        format!("node{}", self.index)
    }
    /// The container's (or pod's) eth0 address, as it is now.
    pub fn workload_ip(&self) -> Option<Ipv4Addr> {
        let out = cmd::ip(
            &self.container_ns(),
            &["-4", "-o", "addr", "show", "dev", "eth0"],
        )
        .ok()?;
        out.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)?
            .split('/')
            .next()?
            .parse()
            .ok()
    }
    pub fn pin_dir(&self) -> PathBuf {
        self.dir().join("bpf")
    }
    pub fn log(&self) -> PathBuf {
        self.dir().join("agent.log")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.dir().join("agent.pid")
    }
}

pub fn state_dir() -> PathBuf {
    PathBuf::from(STATE_DIR)
}

/// The Kubernetes variant's cluster directory: the agents' kubeconfig,
/// net-conf.json, subnet files, the pins' bpffs, the API's certificates.
pub fn kube_dir() -> PathBuf {
    state_dir().join("kube")
}

/// The kubeconfig for the machine's kubectl (through `up`'s loopback port).
pub fn machine_kubeconfig() -> PathBuf {
    state_dir().join("kubeconfig")
}

/// Namespaces of the lab that exist right now.
pub fn existing_namespaces() -> Result<Vec<String>> {
    namespaces_with_prefix(PREFIX)
}

fn add_netns(name: &str) -> Result<()> {
    cmd::run(None, &["ip", "netns", "add", name])?;
    // No IPv6: no router solicitations or MLD noise on the overlay.
    netns::sysctl(
        name,
        &[
            ("net.ipv6.conf.all.disable_ipv6", "1"),
            ("net.ipv6.conf.default.disable_ipv6", "1"),
        ],
    )?;
    cmd::ip(name, &["link", "set", "lo", "up"])?;
    Ok(())
}

/// `eth0` in `ns` with `addr`/24, its peer `port` on the switch bridge.
fn plug(ns: &str, port: &str, addr: Ipv4Addr) -> Result<()> {
    cmd::ip(
        ns,
        &[
            "link",
            "add",
            UNDERLAY_DEV,
            "type",
            "veth",
            "peer",
            "name",
            port,
            "netns",
            SWITCH_NS,
        ],
    )?;
    cmd::ip(SWITCH_NS, &["link", "set", port, "master", "br0", "up"])?;
    cmd::ip(
        ns,
        &["addr", "add", &format!("{addr}/24"), "dev", UNDERLAY_DEV],
    )?;
    cmd::ip(ns, &["link", "set", UNDERLAY_DEV, "up"])?;
    Ok(())
}

/// The underlay: switch, the control plane's namespace (etcd's or the API
/// stand-in's), and the three hosts (no overlay, no containers yet: those
/// wait for the leases).
pub fn build_underlay() -> Result<()> {
    add_netns(SWITCH_NS)?;
    cmd::ip(SWITCH_NS, &["link", "add", "br0", "type", "bridge"])?;
    cmd::ip(SWITCH_NS, &["link", "set", "br0", "up"])?;
    let control = variant().control_ns();
    add_netns(control)?;
    plug(control, "ctl", ETCD_IP)?;
    for n in NODES {
        let ns = n.ns();
        add_netns(&ns)?;
        netns::sysctl(
            &ns,
            &[
                ("net.ipv4.ip_forward", "1"),
                // Strict reverse-path filtering, as on a hardened host: the
                // eBPF path must deliver decapsulated packets on flannel.100.
                ("net.ipv4.conf.all.rp_filter", "1"),
                ("net.ipv4.conf.default.rp_filter", "1"),
            ],
        )?;
        plug(&ns, &format!("h{}", n.index), n.underlay_ip())?;
    }
    Ok(())
}

/// What flannel's subnet.env says about one host.
#[derive(Clone, Debug)]
pub struct SubnetEnv {
    /// FLANNEL_SUBNET: the first address of the lease with its length (docker's --bip).
    pub gateway: ipnet::Ipv4Net,
    pub mtu: u32,
}

impl SubnetEnv {
    pub fn read(node: &Node) -> Result<SubnetEnv> {
        let path = node.subnet_file();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .with_context(|| format!("{} has no {name}", path.display()))
        };
        Ok(SubnetEnv {
            gateway: field("FLANNEL_SUBNET")?
                .parse()
                .with_context(|| format!("FLANNEL_SUBNET in {}", path.display()))?,
            mtu: field("FLANNEL_MTU")?
                .parse()
                .with_context(|| format!("FLANNEL_MTU in {}", path.display()))?,
        })
    }

    pub fn subnet(&self) -> ipnet::Ipv4Net {
        self.gateway.trunc()
    }

    /// The container takes the address after the bridge's, as docker's first one would.
    pub fn container_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.gateway.addr()) + 1)
    }
}

/// The host's bridge on the lease's first address and one container behind it,
/// with the MTU subnet.env gives (what `docker daemon --bip --mtu` does in seed 001).
pub fn add_container(node: &Node, env: &SubnetEnv) -> Result<()> {
    let (h, c) = (node.ns(), node.container_ns());
    let mtu = env.mtu.to_string();
    cmd::ip(&h, &["link", "add", BRIDGE_DEV, "type", "bridge"])?;
    cmd::ip(
        &h,
        &["addr", "add", &env.gateway.to_string(), "dev", BRIDGE_DEV],
    )?;
    cmd::ip(&h, &["link", "set", BRIDGE_DEV, "up"])?;
    add_netns(&c)?;
    cmd::ip(
        &c,
        &[
            "link", "add", "eth0", "mtu", &mtu, "type", "veth", "peer", "name", "vethc", "mtu",
            &mtu, "netns", &h,
        ],
    )?;
    cmd::ip(&h, &["link", "set", "vethc", "master", BRIDGE_DEV, "up"])?;
    let addr = format!("{}/{}", env.container_ip(), env.gateway.prefix_len());
    cmd::ip(&c, &["addr", "add", &addr, "dev", "eth0"])?;
    cmd::ip(&c, &["link", "set", "eth0", "up"])?;
    cmd::ip(
        &c,
        &[
            "route",
            "add",
            "default",
            "via",
            &env.gateway.addr().to_string(),
        ],
    )?;
    Ok(())
}

/// Whether `pid` runs (a zombie, killed but not yet reaped by its parent, does not).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // "pid (comm) state ...": comm may hold spaces, the state follows the last ')'.
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st != "Z"))
        })
        .unwrap_or(false)
}

/// Processes whose network namespace is `ns`.
fn pids_in(ns: &str) -> Vec<i32> {
    cmd::run(None, &["ip", "netns", "pids", ns])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|&p| p != std::process::id() as i32)
        .collect()
}

/// Everything the lab left, whoever left it: processes in its namespaces
/// (SIGTERM, then SIGKILL after `grace`), the namespaces, the state directory.
/// Works from nothing but the fixed names, so also after `up` crashed.
/// Returns what it removed, and fails if anything is still there afterwards.
pub fn remove_everything(grace: Duration) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let namespaces = existing_namespaces()?;
    let mut pids: Vec<i32> = namespaces.iter().flat_map(|ns| pids_in(ns)).collect();
    pids.sort_unstable();
    pids.dedup();
    for &pid in &pids {
        // SAFETY: kill(2) on a process living in one of the lab's namespaces.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = std::time::Instant::now() + grace;
    while pids.iter().any(|&p| alive(p)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for &pid in pids.iter().filter(|&&p| alive(p)) {
        // SAFETY: as above; it ignored SIGTERM for `grace`.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    if !pids.is_empty() {
        removed.push(format!("{} process(es) {pids:?}", pids.len()));
    }
    let mut failures = Vec::new();
    // Containers first (their veth peers live in the hosts), the switch last.
    let mut ordered = namespaces.clone();
    ordered.sort_by_key(|n| {
        (
            n == SWITCH_NS,
            !n.starts_with(&format!("{PREFIX}c")),
            n.clone(),
        )
    });
    for ns in &ordered {
        match cmd::run(None, &["ip", "netns", "del", ns]) {
            Ok(_) => removed.push(format!("namespace {ns}")),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    let dir = state_dir();
    // The Kubernetes variant's bpffs (pins), left mounted if `up` crashed.
    for m in mounts_under(&dir) {
        match cmd::run(None, &["umount", "-l", &m]) {
            Ok(_) => removed.push(format!("mount {m}")),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        removed.push(format!("{}", dir.display()));
    }
    let left = existing_namespaces()?;
    let stuck: Vec<i32> = pids.into_iter().filter(|&p| alive(p)).collect();
    anyhow::ensure!(
        left.is_empty() && stuck.is_empty() && failures.is_empty(),
        "left behind: namespaces {left:?}, processes {stuck:?}; errors: {}",
        failures.join("; ")
    );
    Ok(removed)
}

/// Mount points at or below `dir`, deepest first.
fn mounts_under(dir: &std::path::Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    let mut m: Vec<String> = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| *p == prefix || p.starts_with(&format!("{prefix}/")))
        .map(str::to_owned)
        .collect();
    m.sort_by_key(|p| std::cmp::Reverse(p.len()));
    m.dedup();
    m
}
