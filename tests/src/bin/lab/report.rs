//! What the lab shows: the leases in etcd (the Nodes in the Kubernetes
//! variant: `kube.rs`), each node, and the container-to-container (pod-to-
//! pod) ping matrix.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::Result;
use overlay_tests::{cmd, stats};

use crate::{
    nodes,
    topo::{self, NODES, Node, Role, SubnetEnv, Variant},
};

/// Pings per directed pair; a pair passes when every one is answered.
pub const PINGS: u32 = 3;

pub fn print_leases() -> Result<()> {
    println!("etcd {} (namespace {}):", topo::ETCD_URL, topo::ETCD_NS);
    println!("$ etcdctl get --prefix {}", topo::ETCD_PREFIX);
    for (k, v) in nodes::leases()? {
        println!("  {k}\n    {v}");
    }
    Ok(())
}

fn pid_of(node: &Node) -> Option<i32> {
    std::fs::read_to_string(node.pid_file())
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// One line per node (plus what is attached where eBPF runs).
pub fn print_nodes() -> Result<()> {
    let v = topo::variant();
    println!("hosts:");
    for n in NODES {
        let env = SubnetEnv::read(&n);
        let workload = match n.workload_ip() {
            Some(ip) => ip.to_string(),
            None => "none".into(),
        };
        let lease = match (&env, v) {
            (Ok(e), Variant::Etcd) => format!(
                "lease {}, cni0 {}, container {workload} (MTU {})",
                e.subnet(),
                e.gateway,
                e.mtu
            ),
            (Ok(e), Variant::Kube) => format!(
                "{} podCIDR {}, cni0 {}, pod {workload} (MTU {})",
                n.node_name(),
                e.subnet(),
                e.gateway,
                e.mtu
            ),
            (Err(e), _) => format!("no lease: {e:#}"),
        };
        let process = match (n.role, pid_of(&n)) {
            (Role::FlanneldStandIn, _) => String::new(),
            (_, Some(pid)) if topo::alive(pid) => format!(", agent pid {pid}"),
            (_, Some(pid)) => format!(", agent pid {pid} NOT RUNNING"),
            (_, None) => ", no agent pid".to_owned(),
        };
        println!(
            "  h{} {} ({}): {}, {lease}{process}",
            n.index,
            n.underlay_ip(),
            n.role.describe(),
            n.ns()
        );
        let att = stats::attachments(&n.ns())?;
        let tcx: Vec<String> = att
            .tcx
            .iter()
            .filter(|(_, p)| !p.is_empty())
            .map(|((dev, dir), p)| format!("{dev} {dir}: {}", p.join(",")))
            .collect();
        let xdp: Vec<String> = att
            .xdp
            .iter()
            .map(|(dev, id)| format!("{dev}: id {id}"))
            .collect();
        if att.is_empty() {
            println!(
                "      no BPF program attached (flannel.{} is a kernel vxlan device)",
                v.vni()
            );
        } else {
            println!("      TCX [{}] XDP [{}]", tcx.join("; "), xdp.join("; "));
        }
    }
    Ok(())
}

fn ping_ok(ns: &str, dst: Ipv4Addr) -> bool {
    let out = cmd::command(
        Some(ns),
        &[
            "ping",
            "-n",
            "-q",
            "-c",
            &PINGS.to_string(),
            "-i",
            "0.2",
            "-W",
            "1",
            "-w",
            "3",
            &dst.to_string(),
        ],
    )
    .output();
    let Ok(out) = out else { return false };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse::<u32>().ok())
        == Some(PINGS)
}

pub struct Matrix {
    /// (from, to, passed)
    pub cells: Vec<(Node, Node, bool)>,
}

impl Matrix {
    pub fn all_pass(&self) -> bool {
        !self.cells.is_empty() && self.cells.iter().all(|c| c.2)
    }

    pub fn failures(&self) -> usize {
        self.cells.iter().filter(|c| !c.2).count()
    }
}

/// Pings every container (pod) from every other one.
pub fn matrix() -> Matrix {
    let ips: Vec<(Node, Option<Ipv4Addr>)> = NODES.iter().map(|n| (*n, n.workload_ip())).collect();
    let mut cells = Vec::new();
    for (from, _) in &ips {
        for (to, ip) in &ips {
            if from.index == to.index {
                continue;
            }
            let ok = ip.is_some_and(|ip| ping_ok(&from.container_ns(), ip));
            cells.push((*from, *to, ok));
        }
    }
    Matrix { cells }
}

/// The matrix once every pair passes, or the last one after `limit` (the
/// agents program peers as their watches see the leases).
pub fn matrix_within(limit: Duration) -> Matrix {
    let t0 = Instant::now();
    loop {
        let m = matrix();
        if m.all_pass() || t0.elapsed() > limit {
            return m;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub fn print_matrix(m: &Matrix) {
    let v = topo::variant();
    let label = |n: &Node| {
        let ip = n
            .workload_ip()
            .map(|ip| ip.to_string())
            .unwrap_or_else(|| "?".into());
        format!("{}{} {} ({})", v.workload(), n.index, ip, n.role.short())
    };
    let what = match v {
        Variant::Etcd => "container to container",
        Variant::Kube => "pod to pod",
    };
    println!("ping matrix, {what} ({PINGS} pings each; pass = all answered):");
    print!("  {:<30}", "from \\ to");
    for n in NODES {
        print!("{:<30}", label(&n));
    }
    println!();
    for from in NODES {
        print!("  {:<30}", label(&from));
        for to in NODES {
            let cell = if from.index == to.index {
                "-"
            } else {
                match m
                    .cells
                    .iter()
                    .find(|c| c.0.index == from.index && c.1.index == to.index)
                {
                    Some((_, _, true)) => "pass",
                    _ => "FAIL",
                }
            };
            print!("{cell:<30}");
        }
        println!();
    }
    println!(
        "  {} of {} directed pairs pass",
        m.cells.len() - m.failures(),
        m.cells.len()
    );
}
