//! The thread that keeps the agent's rules in place. Every iptables and nft
//! run happens here, not on the runtime's workers: with the legacy backend a
//! run waits for the host-wide xtables lock, and while some other program
//! holds it the reconciler must still program peers.

use std::{
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::Duration,
};

use tokio::sync::oneshot;

use super::{
    Rule, ensure,
    nft::{self, NftRules},
    remove, remove_flanneld_s,
};

/// What the agent wants installed: iptables rules (flanneld's in iptables
/// mode, the fast path's in both) and, in nftables mode, flanneld's table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    pub iptables: Vec<Rule>,
    /// `Some` in nftables mode (`EnableNFTables`): then flanneld's iptables
    /// chains are removed; `None`: the nft table is.
    pub nft: Option<NftRules>,
}

/// A set of rules to keep, and who waits for its first application.
struct Keep {
    wanted: Wanted,
    applied: oneshot::Sender<()>,
}

/// Handle of the keeper thread; the thread ends when this is dropped.
pub struct RuleKeeper {
    tx: mpsc::Sender<Keep>,
}

impl RuleKeeper {
    /// Starts the thread; it checks the rules every `resync` and repairs
    /// what is missing, out of order or changed.
    pub fn start(resync: Duration) -> std::io::Result<RuleKeeper> {
        let (tx, rx) = mpsc::channel();
        thread::Builder::new()
            .name("iptables".into())
            .spawn(move || keep(&rx, resync))?;
        Ok(RuleKeeper { tx })
    }

    /// Keeps `wanted` from now on instead of the previous set (the rules of a
    /// table the new set no longer has are removed, and the other traffic
    /// manager's rules, as flanneld does at start-up). The receiver fires
    /// once they were applied, or the attempt failed (the log says why; the
    /// next resync tries again).
    pub fn keep(&self, wanted: Wanted) -> oneshot::Receiver<()> {
        let (applied, rx) = oneshot::channel();
        // The thread only ends when this handle goes: the send cannot fail
        // while `self` exists, but a dropped receiver is fine either way.
        let _ = self.tx.send(Keep { wanted, applied });
        rx
    }
}

fn keep(rx: &mpsc::Receiver<Keep>, resync: Duration) {
    let mut kept = Wanted::default();
    loop {
        match rx.recv_timeout(resync) {
            Ok(first) => {
                // Only the newest set matters; everyone waiting hears once it is in.
                let mut waiting = vec![first.applied];
                let mut wanted = first.wanted;
                while let Ok(next) = rx.try_recv() {
                    waiting.push(next.applied);
                    wanted = next.wanted;
                }
                let gone: Vec<Rule> = kept
                    .iptables
                    .iter()
                    .filter(|old| !wanted.iptables.iter().any(|r| r.table == old.table))
                    .cloned()
                    .collect();
                if !gone.is_empty() {
                    log_removed(remove(&gone), "the rules no longer wanted");
                }
                remove_other_manager(wanted.nft.is_some());
                kept = wanted;
                match ensure(&kept.iptables) {
                    Ok(changes) if !changes.is_empty() => {
                        log::info!("installed {}", changes.join(", "));
                    }
                    Ok(_) => {}
                    Err(e) => log::error!("iptables: {e} (retrying at the next resync)"),
                }
                if let Some(r) = &kept.nft
                    && load_nft(r)
                {
                    log::info!("installed nft table ip {}", nft::TABLE);
                }
                for w in waiting {
                    let _ = w.send(());
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                match ensure(&kept.iptables) {
                    Ok(changes) if !changes.is_empty() => log::warn!(
                        "iptables rules were missing or out of order; replaced {} (one \
                         iptables-restore per table)",
                        changes.join(", ")
                    ),
                    Ok(_) => {}
                    Err(e) => log::error!("iptables: {e} (retrying at the next resync)"),
                }
                if let Some(r) = &kept.nft {
                    match nft::current() {
                        // Compared with what nft prints for what we load, not
                        // with a listing taken after loading: a change made
                        // between our load and our listing would be taken
                        // for ours.
                        Ok(Some(now)) if now == nft::listed_text(r) => {}
                        Ok(_) => {
                            if load_nft(r) {
                                log::warn!(
                                    "nft table ip {} was missing or changed; loaded it again \
                                     (one nft transaction)",
                                    nft::TABLE
                                );
                            }
                        }
                        Err(e) => log::error!("nft: {e} (retrying at the next resync)"),
                    }
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Loads the table; whether that worked (why not is logged).
fn load_nft(r: &NftRules) -> bool {
    match nft::load(&nft::apply_script(r)) {
        Ok(()) => true,
        Err(e) => {
            log::error!("nft: {e} (retrying at the next resync)");
            false
        }
    }
}

/// flanneld removes the rules of the traffic manager it is not using.
fn remove_other_manager(nft_mode: bool) {
    if nft_mode {
        log_removed(
            remove_flanneld_s(),
            "flanneld's iptables rules (nftables mode)",
        );
        return;
    }
    match nft::remove() {
        Ok(true) => log::info!("removed nft table ip {} (iptables mode)", nft::TABLE),
        Ok(false) => {}
        Err(e) => log::error!("nft: removing table ip {}: {e}", nft::TABLE),
    }
}

fn log_removed(result: Result<Vec<String>, super::IptablesError>, what: &str) {
    match result {
        Ok(removed) => {
            for r in removed {
                log::info!("removed {r}");
            }
        }
        Err(e) => log::error!("iptables: removing {what}: {e}"),
    }
}
