//! The peers' leases in a task of its own, feeding the loop through a
//! channel, from either subnet manager: etcd's watch on `<prefix>/subnets/`
//! or the API server's Node watch.
//!
//! The loop can then wait on other things (signals, timers, our own lease)
//! without ever dropping a half-read watch response or a half-done re-list:
//! the watcher only stops when the feed goes. The channel is bounded, so a
//! reconciler that falls behind slows the watch down instead of queueing
//! without end.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tokio::{sync::mpsc, task::JoinHandle};

use crate::subnet::{
    LeaseEvent,
    etcd::{
        EtcdError, Registry,
        watch::{LeaseWatcher, lease_events},
    },
    kube::{self, KubeManager, annotations},
};

/// Watch responses waiting for the loop, at most.
const QUEUED: usize = 64;

pub struct LeaseFeed {
    rx: mpsc::Receiver<Vec<LeaseEvent>>,
    task: Option<JoinHandle<Result<(), EtcdError>>>,
    failing: Arc<AtomicBool>,
}

impl LeaseFeed {
    /// Watches `<prefix>/subnets/` from just after `snapshot_revision`.
    pub fn etcd(reg: Registry, snapshot_revision: i64) -> LeaseFeed {
        let mut watcher = LeaseWatcher::new(reg, snapshot_revision);
        let failing = watcher.failing_flag();
        let (tx, rx) = mpsc::channel(QUEUED);
        let task = tokio::spawn(async move {
            loop {
                let events = watcher.next().await?;
                if tx.send(lease_events(&events)).await.is_err() {
                    return Ok(());
                }
            }
        });
        LeaseFeed {
            rx,
            task: Some(task),
            failing,
        }
    }

    /// Lists and watches every Node; the first batch is the list (one
    /// [`LeaseEvent::Reset`]). `own` is what our Node must keep saying: it
    /// is written again if someone changes it.
    pub fn kube(mgr: KubeManager, own: annotations::Own) -> LeaseFeed {
        let failing = Arc::<AtomicBool>::default();
        let (tx, rx) = mpsc::channel(QUEUED);
        let flag = failing.clone();
        let task = tokio::spawn(async move {
            kube::feed::run(mgr, own, tx, flag).await;
            Ok(())
        });
        LeaseFeed {
            rx,
            task: Some(task),
            failing,
        }
    }

    /// The next changes: everything that has arrived, so a burst (a re-list,
    /// a herd of nodes joining) is applied as one batch and a single event
    /// at once. `None` once the watch stopped for good ([`LeaseFeed::stopped`]
    /// says why). Cancel-safe: nothing is taken from the channel unless it
    /// is returned.
    pub async fn next(&mut self) -> Option<Vec<LeaseEvent>> {
        let mut events = self.rx.recv().await?;
        while let Ok(more) = self.rx.try_recv() {
            events.extend(more);
        }
        Some(events)
    }

    /// Whether etcd or the API server is failing the watch right now (it is
    /// being retried).
    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// Why the watch stopped, after [`LeaseFeed::next`] returned `None`.
    pub async fn stopped(&mut self) -> FeedStopped {
        match self.task.take() {
            Some(task) => match task.await {
                Ok(Err(e)) => FeedStopped::Etcd(e),
                Ok(Ok(())) => FeedStopped::Ended,
                Err(e) => FeedStopped::Crashed(e),
            },
            None => FeedStopped::Ended,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FeedStopped {
    /// A problem retrying cannot fix (certificates, credentials).
    #[error(transparent)]
    Etcd(EtcdError),
    #[error("the lease watch task crashed: {0}")]
    Crashed(tokio::task::JoinError),
    #[error("the lease watch ended")]
    Ended,
}

impl Drop for LeaseFeed {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
