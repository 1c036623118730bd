//! The lease watch in a task of its own, feeding the loop through a channel.
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

use crate::etcd::{
    EtcdError, Registry,
    watch::{LeaseWatcher, WatchEvent},
};

/// Watch responses waiting for the loop, at most.
const QUEUED: usize = 64;

pub struct LeaseFeed {
    rx: mpsc::Receiver<Vec<WatchEvent>>,
    task: Option<JoinHandle<Result<(), EtcdError>>>,
    failing: Arc<AtomicBool>,
}

impl LeaseFeed {
    /// Watches `<prefix>/subnets/` from just after `snapshot_revision`.
    pub fn spawn(reg: Registry, snapshot_revision: i64) -> LeaseFeed {
        let mut watcher = LeaseWatcher::new(reg, snapshot_revision);
        let failing = watcher.failing_flag();
        let (tx, rx) = mpsc::channel(QUEUED);
        let task = tokio::spawn(async move {
            loop {
                let events = watcher.next().await?;
                if tx.send(events).await.is_err() {
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

    /// The next changes: everything that has arrived, so a burst (a re-list,
    /// a herd of nodes joining) is applied as one batch and a single event
    /// at once. `None` once the watch stopped for good ([`LeaseFeed::stopped`]
    /// says why). Cancel-safe: nothing is taken from the channel unless it
    /// is returned.
    pub async fn next(&mut self) -> Option<Vec<WatchEvent>> {
        let mut events = self.rx.recv().await?;
        while let Ok(more) = self.rx.try_recv() {
            events.extend(more);
        }
        Some(events)
    }

    /// Whether etcd is failing the watch right now (it is being retried).
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
