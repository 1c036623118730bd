//! Following `<prefix>/subnets/` (or one lease key of it): a snapshot, then
//! a watch from the next revision. The watcher gives up only on a problem
//! of configuration (certificates, credentials): a broken stream is
//! re-opened from the last revision seen, with bounded exponential backoff,
//! across whatever endpoints the client balances over; a watch that fell
//! behind compaction re-lists and hands the caller a fresh snapshot to diff
//! against.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use crate::flannel::lease::LeaseSubnets;
use etcd_client::{EventType, WatchOptions, WatchStream};

use super::{Entry, EtcdError, Registry, Snapshot};
use crate::subnet::{LeaseEvent, backoff::Backoff};

/// What changed under `<prefix>/subnets/` (or at the one key watched).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// Everything there is now (after a compaction or on request): diff
    /// against what you know.
    Reset(Snapshot),
    /// A key was created or changed.
    Put(Entry),
    /// A key was deleted or its etcd lease expired.
    Delete { key: String },
}

/// The same changes as the reconciler takes them.
pub fn lease_events(events: &[WatchEvent]) -> Vec<LeaseEvent> {
    events
        .iter()
        .map(|ev| match ev {
            WatchEvent::Reset(s) => LeaseEvent::Reset(s.records()),
            WatchEvent::Put(e) => LeaseEvent::Put(e.record()),
            WatchEvent::Delete { key } => LeaseEvent::Delete { key: key.clone() },
        })
        .collect()
}

/// What a [`LeaseWatcher`] follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    /// Every lease: the reconciler's view of the peers.
    Subnets,
    /// One lease key: the lease keeper's, which must not wake for every
    /// peer's event.
    Key(LeaseSubnets),
}

pub struct LeaseWatcher {
    reg: Registry,
    scope: Scope,
    /// The revision to (re)start the watch from.
    next_revision: i64,
    stream: Option<WatchStream>,
    backoff: Backoff,
    /// Whether the watch has failed since it last worked; shared, so the
    /// loop that owns the watcher's task can report it while `next` waits.
    failing: Arc<AtomicBool>,
}

impl LeaseWatcher {
    /// Watch from just after `snapshot_revision` (the revision of the list
    /// the caller started from).
    pub fn new(reg: Registry, snapshot_revision: i64) -> LeaseWatcher {
        LeaseWatcher::scoped(reg, Scope::Subnets, snapshot_revision)
    }

    /// Watch only `subnet`'s lease key, from just after `revision`; a
    /// [`WatchEvent::Reset`] after a compaction holds that key alone (or
    /// nothing, when it is gone).
    pub fn lease_key(
        reg: Registry,
        subnet: impl Into<LeaseSubnets>,
        revision: i64,
    ) -> LeaseWatcher {
        LeaseWatcher::scoped(reg, Scope::Key(subnet.into()), revision)
    }

    fn scoped(reg: Registry, scope: Scope, snapshot_revision: i64) -> LeaseWatcher {
        LeaseWatcher {
            reg,
            scope,
            next_revision: snapshot_revision + 1,
            stream: None,
            backoff: Backoff::default(),
            failing: Arc::default(),
        }
    }

    /// Whether the watch has failed since it last worked (etcd unreachable,
    /// or the stream broke and is being re-opened).
    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// The same as [`LeaseWatcher::is_failing`], readable from elsewhere
    /// while the watcher runs in a task of its own.
    pub fn failing_flag(&self) -> Arc<AtomicBool> {
        self.failing.clone()
    }

    /// The revision the watch resumes from.
    pub fn next_revision(&self) -> i64 {
        self.next_revision
    }

    /// Wait for the next changes. Transient trouble with etcd is logged and
    /// retried, and the caller simply sees no events meanwhile (so the
    /// datapath keeps its last state); only an error that retrying cannot
    /// fix ([`EtcdError::failure`]) is returned. Cancel-safe: dropping the
    /// future loses nothing that a later call would not redo.
    pub async fn next(&mut self) -> Result<Vec<WatchEvent>, EtcdError> {
        loop {
            if self.stream.is_none() {
                match self.open().await {
                    Ok(s) => self.stream = Some(s),
                    Err(e) if !e.is_transient() => return Err(e),
                    Err(e) => {
                        self.trouble(&format!("cannot open the watch: {e}"));
                        tokio::time::sleep(self.backoff.next_delay()).await;
                        continue;
                    }
                }
            }
            let stream = self.stream.as_mut().expect("opened above");
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    self.stream = None;
                    self.trouble("the watch stream ended");
                    tokio::time::sleep(self.backoff.next_delay()).await;
                    continue;
                }
                Err(error) => {
                    self.stream = None;
                    let e = EtcdError::Request {
                        op: "watch",
                        key: self.key(),
                        error,
                        hint: "",
                    };
                    if !e.is_transient() {
                        return Err(e);
                    }
                    self.trouble(&format!("the watch broke: {e}"));
                    tokio::time::sleep(self.backoff.next_delay()).await;
                    continue;
                }
            };
            if resp.compact_revision() > 0 {
                self.stream = None;
                log::warn!(
                    "etcd compacted past revision {} (compact revision {}): re-listing {}",
                    self.next_revision,
                    resp.compact_revision(),
                    self.key()
                );
                let listed = match self.scope {
                    Scope::Subnets => self.reg.list().await,
                    Scope::Key(subnet) => self.reg.lease_snapshot(subnet).await,
                };
                match listed {
                    Ok(snapshot) => {
                        self.next_revision = snapshot.revision + 1;
                        self.recovered();
                        return Ok(vec![WatchEvent::Reset(snapshot)]);
                    }
                    Err(e) if !e.is_transient() => return Err(e),
                    Err(e) => {
                        self.trouble(&format!("re-list after compaction failed: {e}"));
                        tokio::time::sleep(self.backoff.next_delay()).await;
                        continue;
                    }
                }
            }
            if resp.canceled() {
                self.stream = None;
                self.trouble(&format!(
                    "etcd cancelled the watch: {}",
                    resp.cancel_reason()
                ));
                tokio::time::sleep(self.backoff.next_delay()).await;
                continue;
            }
            self.recovered();
            let mut out = Vec::with_capacity(resp.events().len());
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                // Resume after the last event seen, not after the header's
                // revision: a catching-up watch delivers history in chunks.
                self.next_revision = self.next_revision.max(kv.mod_revision() + 1);
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                out.push(match ev.event_type() {
                    EventType::Put => WatchEvent::Put(Entry {
                        key,
                        value: kv.value().to_vec(),
                        lease_id: kv.lease(),
                        mod_revision: kv.mod_revision(),
                    }),
                    EventType::Delete => WatchEvent::Delete { key },
                });
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }

    /// The key watched, or the prefix of the keys.
    fn key(&self) -> String {
        match self.scope {
            Scope::Subnets => self.reg.subnets_prefix(),
            Scope::Key(subnet) => self.reg.lease_key(subnet),
        }
    }

    /// What the log lines call the watch.
    fn what(&self) -> String {
        match self.scope {
            Scope::Subnets => self.reg.subnets_prefix(),
            Scope::Key(subnet) => format!("our lease key {}", self.reg.lease_key(subnet)),
        }
    }

    async fn open(&self) -> Result<WatchStream, EtcdError> {
        let key = self.key();
        let opts = WatchOptions::new().with_start_revision(self.next_revision);
        let opts = match self.scope {
            Scope::Subnets => opts.with_prefix(),
            Scope::Key(_) => opts,
        };
        self.reg
            .call("watch", &key, |mut c| {
                let (key, opts) = (key.clone(), opts.clone());
                async move { c.watch(key, Some(opts)).await }
            })
            .await
    }

    fn trouble(&mut self, what: &str) {
        if self.is_failing() {
            log::debug!("etcd watch: {what}; retrying");
        } else {
            log::warn!(
                "etcd watch of {}: {what}; retrying with backoff, the datapath keeps its state",
                self.what()
            );
            self.failing.store(true, Ordering::Relaxed);
        }
    }

    fn recovered(&mut self) {
        if self.is_failing() {
            log::info!(
                "etcd watch of {} resumed at revision {}",
                self.what(),
                self.next_revision
            );
            self.failing.store(false, Ordering::Relaxed);
        }
        self.backoff.reset();
    }
}
