//! The daemon as a library: what `overlay-agent` does when no subcommand is
//! given, as four stages that each produce the next one's input.
//!
//! 1. [`startup::configure`]: the subnet manager (etcd, or the API server
//!    with `--kube-subnet-mgr`) answers, the network config is valid, the
//!    interface is chosen and what the host needs is checked. Nothing on
//!    the host is touched, so a bad config leaves nothing half-configured.
//! 2. [`startup::take_lease`]: our subnet lease (in etcd, the previous one
//!    when it is still ours, as flanneld does; in Kubernetes, our Node's
//!    podCIDR).
//! 3. [`startup::program`]: the datapath, subnet.env, the firewall rules;
//!    a failure here releases a lease taken in this run.
//! 4. [`running::run`]: keep the lease, follow the peers, converge, until
//!    told to stop.
//!
//! [`run_until`] runs them in-process until a future completes, which is
//! how the tests drive it; `main.rs` parses the flags and calls [`run`].
//! This is the application's edge, so errors are `anyhow` with context.

mod config_watch;
mod datapath_start;
mod health_refresh;
pub mod lease_feed;
mod link_feed;
pub mod reconcile;
mod retry;
mod rules;
pub mod running;
pub mod startup;

use std::future::Future;

use anyhow::{Context, Result};

pub use running::Stopped;

use crate::{
    cli::{Cli, DatapathChoice},
    datapath::pins::PinLayout,
    health::{self, Health, Phase},
    instance_lock::{InstanceLock, LockError},
};

/// How a run ended when it was told to stop.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "returned once, when the daemon stops"
)]
pub enum Exit {
    /// Stopped before the running stage, in this phase. Waiting for the
    /// config or for a lease is abandoned at once; programming the datapath
    /// is finished first, so nothing is left half-attached.
    DuringStartup(Phase),
    /// Stopped while running.
    Stopped(Stopped),
}

/// The daemon until SIGTERM or SIGINT.
pub async fn run(cli: &Cli) -> Result<Exit> {
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let signalled = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm.recv() => {}
        }
    };
    let health = Health::new();
    if cli.healthz_port > 0 {
        spawn_healthz(cli, health.clone()).await?;
    }
    run_until(cli, &health, signalled).await
}

/// The daemon in this process (and in the network namespace of the calling
/// thread) until `shutdown` completes, reporting through `health`.
pub async fn run_until(
    cli: &Cli,
    health: &Health,
    shutdown: impl Future<Output = ()>,
) -> Result<Exit> {
    if cli.kube_subnet_mgr {
        log::info!(
            "overlay-agent {}: Kubernetes subnet manager, net-conf {}, datapath {:?}",
            env!("CARGO_PKG_VERSION"),
            cli.kube_options().net_config_path.display(),
            cli.datapath
        );
    } else {
        log::info!(
            "overlay-agent {}: etcd {} prefix {}, datapath {:?}",
            env!("CARGO_PKG_VERSION"),
            cli.etcd_endpoints.join(","),
            cli.etcd_prefix,
            cli.datapath
        );
    }
    // Held until this returns (or the process dies): a second agent on the
    // same pins or subnet file stops here, before it touches etcd or the host.
    let _locks = lock_instance(cli)?;
    tokio::pin!(shutdown);
    let waiting = async {
        let configured = startup::configure(cli, health).await?;
        startup::take_lease(cli, health, configured).await
    };
    let leased = tokio::select! {
        leased = waiting => leased?,
        () = &mut shutdown => return Ok(stopped_early(health)),
    };
    let programmed = startup::program(cli, health, leased).await?;
    if futures_ready(&mut shutdown).await {
        return Ok(stopped_early(health));
    }
    running::run(cli, health, programmed, shutdown)
        .await
        .map(Exit::Stopped)
}

/// The locks of [`crate::instance_lock`]: `<subnet-file>.lock` (its
/// directory created, as the subnet file's would be), and the pin directory
/// when there is one. It is created first unless the datapath is the
/// kernel's: that one only removes pins, so it needs the lock only where
/// pins may exist. A pin directory that cannot be created (no bpffs at the
/// default place) holds nothing to share: the agent runs unpinned.
fn lock_instance(cli: &Cli) -> Result<InstanceLock> {
    let mut locks = InstanceLock::default();
    let unwritable = || {
        format!(
            "--subnet-file {}: cannot write there",
            cli.subnet_file.display()
        )
    };
    if let Some(dir) = cli
        .subnet_file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir).with_context(unwritable)?;
    }
    match locks.lock_subnet_file(&cli.subnet_file) {
        Err(e @ LockError::Held { .. }) => return Err(e.into()),
        r => r.with_context(unwritable)?,
    }
    let pins = PinLayout::chosen(cli.bpf_pin_dir.as_deref());
    let dir = pins.root();
    if cli.datapath != DatapathChoice::Kernel {
        let _ = std::fs::create_dir_all(dir);
    }
    if dir.is_dir() {
        locks.lock_pin_dir(dir)?;
    } else {
        log::debug!("no pin directory {} to lock", dir.display());
    }
    Ok(locks)
}

fn stopped_early(health: &Health) -> Exit {
    let phase = health.lock().phase;
    log::info!("stopping during start-up ({phase:?})");
    Exit::DuringStartup(phase)
}

/// Whether `f` has completed already (polled once, without waiting).
async fn futures_ready(f: &mut (impl Future<Output = ()> + Unpin)) -> bool {
    tokio::select! {
        biased;
        () = f => true,
        () = std::future::ready(()) => false,
    }
}

/// `/healthz`, `/readyz` and `/metrics` (see [`crate::health`]).
async fn spawn_healthz(cli: &Cli, health: Health) -> Result<()> {
    let addr = (cli.healthz_ip, cli.healthz_port);
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!(
            "--healthz-ip/--healthz-port: cannot listen on {}:{}",
            addr.0, addr.1
        )
    })?;
    log::info!(
        "health on http://{}:{}/healthz, /readyz and /metrics",
        addr.0,
        addr.1
    );
    tokio::spawn(health::serve(listener, health));
    Ok(())
}
