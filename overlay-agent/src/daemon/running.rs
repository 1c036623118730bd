//! Stage 4, the running agent: keep our lease, follow the peers, keep the
//! datapath converged, until told to stop.
//!
//! Everything that waits on the subnet manager runs in a task of its own
//! (etcd: the lease keeper, the lease watch, the config watch; Kubernetes:
//! the Node watch and setting `NetworkUnavailable=False`), so the loop below
//! only ever waits on channels and timers: no branch of its `select!` can
//! abandon a half-done exchange, and each branch's work runs to its end.

use std::{future::Future, time::Duration};

use anyhow::{Result, anyhow};
use tokio::task::JoinHandle;

use super::{
    config_watch::ConfigWatch,
    health_refresh::refresh_health,
    lease_feed::LeaseFeed,
    link_feed::{LinkFeed, RESUBSCRIBE},
    reconcile::{Own, Reconciler},
    retry::retry,
    startup::{Held, Programmed, Source, kube_own},
};
use crate::{
    cli::Cli,
    datapath::Datapath,
    health::{Health, Phase},
    netlink::events,
    notify,
    subnet::{
        Claim, LeaseEvent,
        etcd::own::{AcquireError, Keeper},
        kube::{KubeManager, node_lease},
        lease_check::Trust6,
    },
};

/// How a run ended when it was told to stop.
#[derive(Debug)]
pub struct Stopped {
    /// Our lease as last seen (it stays in etcd, or on our Node, as with
    /// flanneld).
    pub lease: Held,
    /// `flannel.<VNI>` (it stays in place).
    pub device: String,
    /// Peers programmed when the loop ended.
    pub peers: usize,
}

/// Tasks of this stage, aborted however the stage ends.
struct Tasks {
    /// Keeps our etcd lease; in Kubernetes mode there is nothing to renew
    /// and it waits forever.
    keeper: JoinHandle<Result<(), AcquireError>>,
    /// etcd's config watch, or setting our Node's condition.
    side: JoinHandle<()>,
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.keeper.abort();
        self.side.abort();
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
    let mut held = leased.held;
    let configured = leased.configured;
    let config = configured.config;

    // etcd: renew our lease, and follow the config (a change is reported,
    // applied at the next start). Kubernetes: nothing to renew; tell the
    // scheduler our network is up.
    let (tx, mut own_rx) = tokio::sync::watch::channel(held.clone());
    let (tasks, snapshot, mut feed) = match &configured.source {
        Source::Etcd(reg) => {
            let Held::Etcd {
                node,
                lease,
                timing,
            } = &held
            else {
                unreachable!("an etcd source holds an etcd lease")
            };
            let keeper = Keeper {
                reg: reg.clone(),
                config: config.clone(),
                node: *node,
                timing: *timing,
            };
            let first = lease.clone();
            let (ktx, krx) = tokio::sync::watch::channel(first.clone());
            let relay = relay_etcd_lease(krx, tx, held.clone());
            let tasks = Tasks {
                keeper: tokio::spawn(async move {
                    tokio::spawn(relay);
                    keeper.run(first, ktx).await
                }),
                // Its own task: a slow etcd must never hold up the lease events.
                side: tokio::spawn(ConfigWatch::run(reg.clone())),
            };
            let snapshot = retry("listing leases", || reg.list()).await?;
            let feed = LeaseFeed::etcd(reg.clone(), snapshot.revision);
            (tasks, snapshot.records(), feed)
        }
        Source::Kube { mgr, .. } => {
            let tasks = Tasks {
                keeper: tokio::spawn(async move {
                    let _tx = tx;
                    std::future::pending().await
                }),
                side: tokio::spawn(set_network_available(
                    mgr.clone(),
                    cli.kube_options().set_node_network_unavailable,
                )),
            };
            let own = kube_own(&config, &held);
            let mut feed = LeaseFeed::kube(mgr.clone(), own);
            let first = match feed.next().await {
                Some(events) => first_list(events),
                None => {
                    let why = feed.stopped().await;
                    return Err(anyhow!(why).context("listing the Nodes"));
                }
            };
            (tasks, first, feed)
        }
    };
    let mut tasks = tasks;
    let own_key = match &configured.source {
        Source::Kube { mgr, .. } => Some(node_lease::key(&mgr.node_name)),
        Source::Etcd(_) => None,
    };
    let own = Own {
        subnet: held.subnet(),
        public_ip: held.public_ip(),
        vni: config.backend.vni,
        network: config.network,
        // Dual stack (either subnet manager): a peer's IPv6 half is checked
        // against IPv6Network and our IPv6 subnet's length (IPv6SubnetLen;
        // in Kubernetes mode the node CIDR mask size, as for IPv4).
        ipv6: config
            .ipv6
            .zip(held.ipv6_subnet().zip(held.public_ipv6()))
            .map(|(range, (subnet, public_ip))| Trust6 {
                network: range.network,
                subnet_len: match &held {
                    Held::Etcd { .. } => range.subnet_len,
                    Held::Kube { .. } => subnet.prefix_len(),
                },
                own_public_ip: public_ip,
            }),
    };
    let dp_mode = dp.mode();
    let mut rec = Reconciler::start(dp, own, snapshot).await.map_err(|e| {
        anyhow!(
            "reading the peers the {dp_mode} datapath holds: {}",
            e.reason()
        )
    })?;
    refresh_health(health, &mut rec, &held, &feed, cli.metrics_per_peer);
    health.set_phase(Phase::Running);
    log::info!(
        "running: lease {} on {} ({} datapath), {} peer(s) programmed",
        held.subnet(),
        state.device,
        dp_mode,
        rec.programmed().len()
    );
    let status_line = format!(
        "lease {} on {} ({} datapath)",
        held.subnet(),
        state.device,
        dp_mode
    );
    match notify::ready(&status_line) {
        Ok(true) => log::info!("told systemd we are ready"),
        Ok(false) => {}
        Err(e) => log::warn!("{e}: {}", e.source),
    }

    // Pod veths come and go: the fast path follows them by link events,
    // and at every recheck (which also retries veths a sync failed on).
    let mut link_feed = LinkFeed::start(events::link_changes, &RESUBSCRIBE);
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
                if let Some(key) = &own_key {
                    own_node_moved(&events, key, held.subnet())?;
                }
                let t0 = std::time::Instant::now();
                rec.apply(&events);
                rec.converge().await;
                health.lock().reconcile.observe(t0.elapsed());
            }
            _ = recheck.tick() => {
                if let Err(e) = rec.recheck().await {
                    log::warn!("re-reading the datapath's peers: {}", e.reason());
                }
                if let Err(e) = rec.datapath().sync_pods().await {
                    log::warn!("fast path: following the pod veths: {}", e.reason());
                }
            }
            _ = health_tick.tick() => {
                refresh_health(health, &mut rec, &held, &feed, cli.metrics_per_peer);
            }
            changed = own_rx.changed() => {
                if changed.is_err() {
                    // The keeper stopped: its result says why.
                    return keeper_ended((&mut tasks.keeper).await);
                }
                let new = own_rx.borrow_and_update().clone();
                // The keeper never moves us to another subnet (our pods keep
                // their addresses); it reports a conflict over our key.
                if let (Some(n), Some(old)) = (new.etcd_lease(), held.etcd_lease())
                    && n.conflict != old.conflict
                {
                    health.lock().lease_conflict.clone_from(&n.conflict);
                    if n.conflict.is_none() {
                        log::warn!("lease {}: the conflict is over", n.subnet);
                    }
                }
                held = new;
            }
            () = link_feed.changed() => {
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
        held.subnet(),
        state.device
    );
    Ok(Stopped {
        peers: rec.programmed().len(),
        lease: held,
        device: state.device,
    })
}

/// The etcd keeper's lease, as the loop's [`Held`].
async fn relay_etcd_lease(
    mut from: tokio::sync::watch::Receiver<crate::subnet::etcd::own::OwnLease>,
    to: tokio::sync::watch::Sender<Held>,
    mut held: Held,
) {
    while from.changed().await.is_ok() {
        if let Held::Etcd { lease, .. } = &mut held {
            *lease = from.borrow_and_update().clone();
        }
        if to.send(held.clone()).is_err() {
            return;
        }
    }
}

/// The first batch of the Node watch is its list.
fn first_list(events: Vec<LeaseEvent>) -> Vec<crate::subnet::Record> {
    let mut records = Vec::new();
    for ev in events {
        match ev {
            LeaseEvent::Reset(r) => records = r,
            LeaseEvent::Put(r) => records.push(r),
            LeaseEvent::Delete { key } => records.retain(|r| r.key != key),
        }
    }
    records
}

/// Our own Node now has another podCIDR (deleted and created again with a
/// new one): our pods' addresses and subnet.env are wrong, so stop with an
/// error; the DaemonSet starts us again on the new podCIDR.
fn own_node_moved(events: &[LeaseEvent], key: &str, subnet: ipnet::Ipv4Net) -> Result<()> {
    for ev in events {
        let records: &[crate::subnet::Record] = match ev {
            LeaseEvent::Put(r) => std::slice::from_ref(r),
            LeaseEvent::Reset(rs) => rs,
            LeaseEvent::Delete { .. } => &[],
        };
        for r in records.iter().filter(|r| r.key == key) {
            if let Claim::Lease(l) = &r.claim
                && l.subnet != subnet
            {
                return Err(anyhow!(
                    "{key}: the podCIDR changed from {subnet} to {}: restarting on the new one is needed (subnet.env and the pods' addresses follow the podCIDR)",
                    l.subnet
                ));
            }
        }
    }
    Ok(())
}

/// `NetworkUnavailable=False` on our Node once we run (flanneld's
/// `CompleteLease`), retried until the API server takes it (flanneld tries
/// once and only logs a failure).
async fn set_network_available(mgr: KubeManager, enabled: bool) {
    if !enabled {
        return;
    }
    match retry("setting NetworkUnavailable=False on our Node", || {
        mgr.set_network_available()
    })
    .await
    {
        Ok(()) => log::info!(
            "node {:?}: NetworkUnavailable=False (FlannelIsUp)",
            mgr.node_name
        ),
        Err(e) => log::warn!("{e:#}"),
    }
}

/// The keeper only returns on a problem it cannot retry away.
fn keeper_ended(res: Result<Result<(), AcquireError>, tokio::task::JoinError>) -> Result<Stopped> {
    match res {
        Ok(Ok(())) => Err(anyhow!("the lease keeper stopped")),
        Ok(Err(e)) => Err(anyhow!(e).context("keeping our lease")),
        Err(e) => Err(anyhow!("the lease keeper crashed: {e}")),
    }
}
