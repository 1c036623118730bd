//! Stage 4, the running agent: keep our lease, follow the peers, keep the
//! datapath converged, until told to stop.
//!
//! Everything that waits on etcd runs in a task of its own (the lease
//! keeper, the lease watch, the config watch), so the loop below only ever
//! waits on channels and timers: no branch of its `select!` can abandon a
//! half-done etcd exchange, and each branch's work runs to its end.

use std::{future::Future, time::Duration};

use anyhow::{Result, anyhow};
use tokio::task::JoinHandle;

use super::{
    config_watch::ConfigWatch, health_refresh::refresh_health, lease_feed::LeaseFeed,
    retry::retry_etcd, startup::Programmed,
};
use crate::{
    cli::Cli,
    datapath::Datapath,
    etcd::own::{AcquireError, Keeper, OwnLease},
    health::{Health, Phase},
    netlink::events,
    notify,
    reconcile::{Own, Reconciler},
};

/// How a run ended when it was told to stop.
#[derive(Debug)]
pub struct Stopped {
    /// Our lease as last seen (it stays in etcd, as with flanneld).
    pub lease: OwnLease,
    /// `flannel.<VNI>` (it stays in place).
    pub device: String,
    /// Peers programmed when the loop ended.
    pub peers: usize,
}

/// Tasks of this stage, aborted however the stage ends.
struct Tasks {
    keeper: JoinHandle<Result<(), AcquireError>>,
    config_watch: JoinHandle<()>,
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.keeper.abort();
        self.config_watch.abort();
    }
}

pub async fn run(
    cli: &Cli,
    health: &Health,
    programmed: Programmed,
    shutdown: impl Future<Output = ()>,
) -> Result<Stopped> {
    let Programmed {
        leased,
        dp,
        state,
        rules: _rules,
    } = programmed;
    let mut lease = leased.lease;
    let configured = leased.configured;
    let reg = configured.reg;
    let config = configured.config;

    let (tx, mut own_rx) = tokio::sync::watch::channel(lease.clone());
    let keeper = Keeper {
        reg: reg.clone(),
        config: config.clone(),
        node: leased.node,
        timing: leased.timing,
    };
    let first = lease.clone();
    let mut tasks = Tasks {
        keeper: tokio::spawn(async move { keeper.run(first, tx).await }),
        // Its own task: a slow etcd must never hold up the lease events.
        config_watch: tokio::spawn(ConfigWatch::run(reg.clone())),
    };

    let snapshot = retry_etcd("listing leases", || reg.list()).await?;
    let own = Own {
        subnet: lease.subnet,
        public_ip: lease.public_ip,
        vni: lease.vni,
        network: config.network,
    };
    let dp_mode = dp.mode();
    let mut rec = Reconciler::start(dp, own, &snapshot).await.map_err(|e| {
        anyhow!(
            "reading the peers the {dp_mode} datapath holds: {}",
            e.reason()
        )
    })?;
    let mut feed = LeaseFeed::spawn(reg.clone(), snapshot.revision);
    refresh_health(health, &mut rec, &lease, &feed, cli.metrics_per_peer);
    health.set_phase(Phase::Running);
    log::info!(
        "running: lease {} on {} ({} datapath), {} peer(s) programmed",
        lease.subnet,
        state.device,
        dp_mode,
        rec.programmed().len()
    );
    let status_line = format!(
        "lease {} on {} ({} datapath)",
        lease.subnet, state.device, dp_mode
    );
    match notify::ready(&status_line) {
        Ok(true) => log::info!("told systemd we are ready"),
        Ok(false) => {}
        Err(e) => log::warn!("{e}: {}", e.source),
    }

    // Pod veths come and go: the fast path follows them. Without the
    // subscription (it only fails if netlink does) it stays on the veths
    // that existed at start-up, which the log says.
    let mut link_changes = match events::link_changes() {
        Ok(rx) => Some(rx),
        Err(e) => {
            log::warn!(
                "cannot follow link changes ({e}): pods started from now on use the host's path"
            );
            None
        }
    };
    let mut retry = tokio::time::interval(Duration::from_secs(5));
    let mut health_tick = tokio::time::interval(Duration::from_secs(1));
    let mut recheck = tokio::time::interval(cli.recheck_interval.0);
    recheck.tick().await;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            events = feed.next() => {
                let Some(events) = events else {
                    let why = feed.stopped().await;
                    return Err(anyhow!(why).context("following the leases"));
                };
                let t0 = std::time::Instant::now();
                rec.apply(&events);
                rec.converge().await;
                health.lock().reconcile.observe(t0.elapsed());
            }
            _ = recheck.tick() => {
                if let Err(e) = rec.recheck().await {
                    log::warn!("re-reading the datapath's peers: {}", e.reason());
                }
            }
            _ = health_tick.tick() => {
                refresh_health(health, &mut rec, &lease, &feed, cli.metrics_per_peer);
            }
            changed = own_rx.changed() => {
                if changed.is_err() {
                    // The keeper stopped: its result says why.
                    return keeper_ended((&mut tasks.keeper).await);
                }
                let new = own_rx.borrow_and_update().clone();
                // The keeper never moves us to another subnet (our pods keep
                // their addresses); it reports a conflict over our key.
                if new.conflict != lease.conflict {
                    health.lock().lease_conflict.clone_from(&new.conflict);
                    if new.conflict.is_none() {
                        log::warn!("lease {}: the conflict is over", new.subnet);
                    }
                }
                lease = new;
            }
            Some(()) = async { link_changes.as_mut()?.recv().await }, if link_changes.is_some() => {
                // A pod's veth is created, then moved and renamed, then put
                // on the bridge: let a burst settle before reading the state.
                tokio::time::sleep(Duration::from_millis(50)).await;
                if let Err(e) = rec.datapath().sync_pods().await {
                    log::warn!("fast path: following the pod veths: {}", e.reason());
                }
            }
            _ = retry.tick(), if !rec.is_converged() => {
                rec.converge().await;
            }
            res = &mut tasks.keeper => return keeper_ended(res),
        }
    }
    log::info!(
        "stopping; lease {} and {} stay in place, as with flanneld",
        lease.subnet,
        state.device
    );
    Ok(Stopped {
        peers: rec.programmed().len(),
        lease,
        device: state.device,
    })
}

/// The keeper only returns on a problem it cannot retry away.
fn keeper_ended(res: Result<Result<(), AcquireError>, tokio::task::JoinError>) -> Result<Stopped> {
    match res {
        Ok(Ok(())) => Err(anyhow!("the lease keeper stopped")),
        Ok(Err(e)) => Err(anyhow!(e).context("keeping our lease")),
        Err(e) => Err(anyhow!("the lease keeper crashed: {e}")),
    }
}
