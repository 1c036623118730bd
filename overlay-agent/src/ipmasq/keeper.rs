//! The thread that keeps the agent's rules in place. Every iptables run
//! happens here, not on the runtime's workers: with the legacy backend a
//! run waits for the host-wide xtables lock, and while some other program
//! holds it the reconciler must still program peers.

use std::{
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::Duration,
};

use tokio::sync::oneshot;

use super::{Rule, ensure, remove};

/// A set of rules to keep, and who waits for its first application.
struct Keep {
    rules: Vec<Rule>,
    applied: oneshot::Sender<()>,
}

/// Handle of the keeper thread; the thread ends when this is dropped.
pub struct RuleKeeper {
    tx: mpsc::Sender<Keep>,
}

impl RuleKeeper {
    /// Starts the thread; it checks the rules every `resync` and repairs
    /// what is missing or out of order.
    pub fn start(resync: Duration) -> std::io::Result<RuleKeeper> {
        let (tx, rx) = mpsc::channel();
        thread::Builder::new()
            .name("iptables".into())
            .spawn(move || keep(&rx, resync))?;
        Ok(RuleKeeper { tx })
    }

    /// Keeps `rules` from now on instead of the previous set (the rules of a
    /// table the new set no longer has are removed). The receiver fires once
    /// they were applied, or the attempt failed (the log says why; the next
    /// resync tries again).
    pub fn keep(&self, rules: Vec<Rule>) -> oneshot::Receiver<()> {
        let (applied, rx) = oneshot::channel();
        // The thread only ends when this handle goes: the send cannot fail
        // while `self` exists, but a dropped receiver is fine either way.
        let _ = self.tx.send(Keep { rules, applied });
        rx
    }
}

fn keep(rx: &mpsc::Receiver<Keep>, resync: Duration) {
    let mut kept: Vec<Rule> = Vec::new();
    loop {
        match rx.recv_timeout(resync) {
            Ok(first) => {
                // Only the newest set matters; everyone waiting hears once it is in.
                let mut waiting = vec![first.applied];
                let mut rules = first.rules;
                while let Ok(next) = rx.try_recv() {
                    waiting.push(next.applied);
                    rules = next.rules;
                }
                let gone: Vec<Rule> = kept
                    .iter()
                    .filter(|old| !rules.iter().any(|r| r.table == old.table))
                    .cloned()
                    .collect();
                if !gone.is_empty() {
                    match remove(&gone) {
                        Ok(removed) => {
                            for r in removed {
                                log::info!("removed {r}");
                            }
                        }
                        Err(e) => log::error!("iptables: removing the rules no longer wanted: {e}"),
                    }
                }
                kept = rules;
                match ensure(&kept) {
                    Ok(changes) if !changes.is_empty() => {
                        log::info!("installed {}", changes.join(", "));
                    }
                    Ok(_) => {}
                    Err(e) => log::error!("iptables: {e} (retrying at the next resync)"),
                }
                for w in waiting {
                    let _ = w.send(());
                }
            }
            Err(RecvTimeoutError::Timeout) => match ensure(&kept) {
                Ok(changes) if !changes.is_empty() => log::warn!(
                    "iptables rules were missing or out of order; replaced {} (one \
                     iptables-restore per table)",
                    changes.join(", ")
                ),
                Ok(_) => {}
                Err(e) => log::error!("iptables: {e} (retrying at the next resync)"),
            },
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}
