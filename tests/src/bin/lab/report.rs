//! What the lab shows: the leases in etcd, each node, and the container-to-
//! container ping matrix.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::Result;
use overlay_tests::{cmd, stats};

use crate::{
    nodes,
    topo::{self, NODES, Node, Role, SubnetEnv},
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
    println!("nodes:");
    for n in NODES {
        let env = SubnetEnv::read(&n);
        let lease = match &env {
            Ok(e) => format!(
                "lease {}, cni0 {}, container {} (MTU {})",
                e.subnet(),
                e.gateway,
                e.container_ip(),
                e.mtu
            ),
            Err(e) => format!("no lease: {e:#}"),
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
            println!("      no BPF program attached (flannel.100 is a kernel vxlan device)");
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

/// Pings every container from every other one.
pub fn matrix() -> Matrix {
    let ips: Vec<(Node, Option<Ipv4Addr>)> = NODES
        .iter()
        .map(|n| (*n, SubnetEnv::read(n).ok().map(|e| e.container_ip())))
        .collect();
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
    let label = |n: &Node| {
        let ip = SubnetEnv::read(n)
            .map(|e| e.container_ip().to_string())
            .unwrap_or_else(|_| "?".into());
        format!("c{} {} ({})", n.index, ip, n.role.short())
    };
    println!("ping matrix, container to container ({PINGS} pings each; pass = all answered):");
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
