//! The traffic every interoperability pair must carry, in both directions:
//! ping, a TCP transfer checked by SHA-256, and a paced UDP burst.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::{
    lab::Host,
    traffic::{self, UdpBurst},
};

pub const MIB: u64 = 1 << 20;

/// How much of each kind of traffic to send.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub pings: u32,
    pub tcp_bytes: u64,
    pub udp: UdpBurst,
}

impl Default for Workload {
    /// What issue 2 asks of every pair: TCP of at least 100 MB.
    fn default() -> Self {
        Workload {
            pings: 10,
            tcp_bytes: 100 * MIB,
            udp: UdpBurst::default(),
        }
    }
}

/// What one direction carried, for the test log.
#[derive(Clone, Debug)]
pub struct DirectionReport {
    pub from: u8,
    pub to: u8,
    pub tcp_elapsed: Duration,
    pub tcp_sha256: String,
    pub udp_received: u32,
    pub total: Duration,
}

impl std::fmt::Display for DirectionReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "c{} -> c{}: ping ok, tcp ok in {:.2?} (sha256 {}...), udp {} ok, {:.2?} in all",
            self.from,
            self.to,
            self.tcp_elapsed,
            &self.tcp_sha256[..12],
            self.udp_received,
            self.total
        )
    }
}

/// Runs `work` from `src`'s container to `dst`'s container.
pub fn one_way(src: &Host, dst: &Host, work: &Workload) -> Result<DirectionReport> {
    let started = Instant::now();
    let ctx = || format!("c{} -> c{}", src.index, dst.index);
    traffic::ping(&src.container_ns, dst.container_ip, work.pings).with_context(ctx)?;
    // Ports differ per direction so a lingering socket of one cannot serve the other.
    let base = 20000 + 100 * u16::from(src.index) + u16::from(dst.index);
    let tcp = traffic::tcp_transfer(
        &src.container_ns,
        &dst.container_ns,
        dst.container_ip,
        base,
        work.tcp_bytes,
    )
    .with_context(ctx)?;
    let udp = traffic::udp_burst(
        &src.container_ns,
        &dst.container_ns,
        dst.container_ip,
        base + 10000,
        work.udp,
    )
    .with_context(ctx)?;
    Ok(DirectionReport {
        from: src.index,
        to: dst.index,
        tcp_elapsed: tcp.elapsed,
        tcp_sha256: tcp.received_sha256,
        udp_received: udp.received,
        total: started.elapsed(),
    })
}

/// Runs `work` in both directions between `a` and `b`.
pub fn both_ways(a: &Host, b: &Host, work: &Workload) -> Result<[DirectionReport; 2]> {
    Ok([one_way(a, b, work)?, one_way(b, a, work)?])
}
