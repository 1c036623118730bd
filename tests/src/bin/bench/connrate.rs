//! TCP connection rate: many clients, each in a loop of connect, one 64-byte
//! request, its 64-byte response, close (netperf's TCP_CRR, with many
//! concurrent clients). Every connection pays the handshake, the teardown and
//! conntrack's new entry on both hosts; on the fast path it is also where
//! approvals are made and revoked, so this is the figure where they could
//! cost more than they save.
//!
//! One client thread and one server thread (tokio, one thread each, pinned
//! like the other tools) multiplex all connections, so with enough clients
//! both are always busy and the rate is bound by what a connection costs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use overlay_tests::netns;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::modes::Endpoints;
use crate::pin::{Pinning, pin_thread};
use crate::tools::{RR_MESSAGE, WARMUP};

/// The connection-rate server's port (started per measurement, in process).
pub const CRR_PORT: u16 = 12867;

/// A stalled step of one connection (a lost SYN waits 1 s for its
/// retransmission; more than this is a broken path).
const STEP_LIMIT: Duration = Duration::from_secs(5);

/// Sysctls of the client's namespace that let it open connections this fast:
/// the client closes first, so its side keeps each connection in TIME_WAIT
/// for 60 s, and at thousands a second the default ephemeral range (28,232
/// ports) would run out. `tcp_tw_reuse` lets connect() take a port whose
/// TIME_WAIT is older than a second (safe with TCP timestamps, on by default).
pub const CLIENT_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv4.tcp_tw_reuse", "1"),
    ("net.ipv4.ip_local_port_range", "1024 65535"),
];

/// What a measurement saw.
#[derive(Clone, Copy, Debug)]
pub struct ConnRate {
    /// Completed connections per second in the window.
    pub per_sec: f64,
    /// Connections that failed (refused, reset, timed out) over the whole run.
    pub failed: u64,
}

/// Connections per second with `clients` concurrent clients, over `secs`
/// after half a second of warm-up.
pub fn conn_rate(ends: &Endpoints, clients: usize, secs: u32, pin: Pinning) -> Result<ConnRate> {
    ensure!(clients > 0, "no clients");
    let addr = SocketAddr::new(ends.server_ip, CRR_PORT);
    // The server stops only after the client has finished: connections
    // still in flight when the window closes are answered.
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    // The server gives up on its own after this, whatever the client does.
    let server_limit = Duration::from_secs(u64::from(secs)) + 4 * STEP_LIMIT;
    let server_stop = stop.clone();
    let server = netns::spawn_in(&ends.server_ns, move || {
        pin_thread(pin.server)?;
        runtime()?.block_on(serve(addr, server_stop, server_limit, ready_tx))
    })?;
    if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
        stop.store(true, Ordering::Relaxed);
        netns::join(server)?;
        bail!("connection-rate server never became ready");
    }
    let client = netns::spawn_in(&ends.client_ns, move || {
        pin_thread(pin.client)?;
        runtime()?.block_on(run_clients(addr, clients, secs))
    });
    let rate = match client {
        Ok(handle) => netns::join(handle),
        Err(e) => Err(e),
    };
    stop.store(true, Ordering::Relaxed);
    let served = netns::join(server);
    let rate = rate.context("connection-rate client")?;
    served.context("connection-rate server")?;
    Ok(rate)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building a tokio runtime")
}

async fn serve(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    limit: Duration,
    ready: std::sync::mpsc::Sender<()>,
) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let _ = ready.send(());
    let deadline = Instant::now() + limit;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let Ok(accepted) =
            tokio::time::timeout(Duration::from_millis(100), listener.accept()).await
        else {
            continue;
        };
        let (mut s, _) = accepted.context("accept")?;
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let mut buf = [0u8; RR_MESSAGE];
            let answered = async {
                s.read_exact(&mut buf).await?;
                s.write_all(&[0x5au8; RR_MESSAGE]).await?;
                // Until the client's FIN: the client closes first, as a
                // browser or RPC client ending its request does.
                let mut rest = [0u8; 64];
                while s.read(&mut rest).await? > 0 {}
                Ok::<_, std::io::Error>(())
            };
            let _ = tokio::time::timeout(STEP_LIMIT, answered).await;
        });
    }
    Ok(())
}

async fn run_clients(addr: SocketAddr, clients: usize, secs: u32) -> Result<ConnRate> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (done, failed, stop) = (done.clone(), failed.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(STEP_LIMIT, one_connection(addr)).await {
                    Ok(Ok(())) => done.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(WARMUP / 2).await;
    let (d0, t0) = (done.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(u64::from(secs))).await;
    let (d1, t1) = (done.load(Ordering::Relaxed), Instant::now());
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let completed = d1 - d0;
    let failed = failed.load(Ordering::Relaxed);
    ensure!(
        completed > 0,
        "no connection completed ({failed} failed) to {addr}"
    );
    Ok(ConnRate {
        per_sec: completed as f64 / (t1 - t0).as_secs_f64(),
        failed,
    })
}

/// Connect, one request and its response, close.
async fn one_connection(addr: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(&[0xa5u8; RR_MESSAGE]).await?;
    let mut buf = [0u8; RR_MESSAGE];
    s.read_exact(&mut buf).await?;
    Ok(())
}
