//! The thread that keeps the agent's rules in place. Every iptables and nft
//! run happens here, not on the runtime's workers: with the legacy backend a
//! run waits for the host-wide xtables lock, and while some other program
//! holds it the reconciler must still program peers.

use std::{
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::Duration,
};

use ipnet::{Ipv4Net, Ipv6Net};
use tokio::sync::oneshot;

use super::{
    Family, Net, Rule, ensure,
    nft::{self, NftRules},
    remove, remove_flanneld_s,
};

/// What the agent wants installed: iptables and ip6tables rules (flanneld's
/// in iptables mode, the fast path's in both) and, in nftables mode,
/// flanneld's tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    pub iptables: Vec<Rule>,
    /// `Some` in nftables mode (`EnableNFTables`): then flanneld's iptables
    /// and ip6tables chains are removed; `None`: the nft table is.
    pub nft: Option<NftRules<Ipv4Net>>,
    /// Table `ip6 flannel-ipv6`, in nftables mode with an `IPv6Network`;
    /// `None`: the table is removed.
    pub nft6: Option<NftRules<Ipv6Net>>,
}

impl Wanted {
    /// Whether flanneld's rules are nft tables (`EnableNFTables`).
    pub fn nft_mode(&self) -> bool {
        self.nft.is_some() || self.nft6.is_some()
    }

    fn has_nft(&self, family: Family) -> bool {
        match family {
            Family::Ipv4 => self.nft.is_some(),
            Family::Ipv6 => self.nft6.is_some(),
        }
    }
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
                    .filter(|old| {
                        !wanted
                            .iptables
                            .iter()
                            .any(|r| (r.family, r.table) == (old.family, old.table))
                    })
                    .cloned()
                    .collect();
                if !gone.is_empty() {
                    log_removed(remove(&gone), "the rules no longer wanted");
                }
                remove_unwanted(&wanted);
                kept = wanted;
                ensure_each_family(&kept.iptables, |changes| {
                    log::info!("installed {}", changes.join(", "));
                });
                if let Some(r) = &kept.nft
                    && load_nft(r)
                {
                    log::info!("installed {}", nft::describe(Family::Ipv4));
                }
                if let Some(r) = &kept.nft6
                    && load_nft(r)
                {
                    log::info!("installed {}", nft::describe(Family::Ipv6));
                }
                for w in waiting {
                    let _ = w.send(());
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                ensure_each_family(&kept.iptables, |changes| {
                    log::warn!(
                        "iptables rules were missing or out of order; replaced {} (one \
                         iptables-restore per table)",
                        changes.join(", ")
                    );
                });
                if let Some(r) = &kept.nft {
                    resync_nft(r);
                }
                if let Some(r) = &kept.nft6 {
                    resync_nft(r);
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// [`ensure`]s each family's rules on its own: a failing ip6tables does not
/// keep iptables' rules from being repaired. `changed` hears of what was.
fn ensure_each_family(rules: &[Rule], changed: impl Fn(&[String])) {
    for family in [Family::Ipv4, Family::Ipv6] {
        let of: Vec<Rule> = rules
            .iter()
            .filter(|r| r.family == family)
            .cloned()
            .collect();
        if of.is_empty() {
            continue;
        }
        match ensure(&of) {
            Ok(changes) if !changes.is_empty() => changed(&changes),
            Ok(_) => {}
            Err(e) => log::error!("{}: {e} (retrying at the next resync)", family.iptables()),
        }
    }
}

/// Loads the table again if it is missing or differs from `r`'s.
fn resync_nft<N: Net>(r: &NftRules<N>) {
    match nft::current(N::FAMILY) {
        // Compared with what nft prints for what we load, not with a
        // listing taken after loading: a change made between our load and
        // our listing would be taken for ours.
        Ok(Some(now)) if now == nft::listed_text(r) => {}
        Ok(_) => {
            if load_nft(r) {
                log::warn!(
                    "{} was missing or changed; loaded it again (one nft transaction)",
                    nft::describe(N::FAMILY)
                );
            }
        }
        Err(e) => log::error!("nft: {e} (retrying at the next resync)"),
    }
}

/// Loads the table; whether that worked (why not is logged).
fn load_nft<N: Net>(r: &NftRules<N>) -> bool {
    match nft::load(&nft::apply_script(r)) {
        Ok(()) => true,
        Err(e) => {
            log::error!("nft: {e} (retrying at the next resync)");
            false
        }
    }
}

/// flanneld removes the rules of the traffic manager it is not using: in
/// nftables mode its iptables and ip6tables chains, in iptables mode its nft
/// tables. And an nft table `wanted` no longer has (no `IPv6Network` now).
fn remove_unwanted(wanted: &Wanted) {
    if wanted.nft_mode() {
        log_removed(
            remove_flanneld_s(),
            "flanneld's iptables rules (nftables mode)",
        );
    }
    for family in [Family::Ipv4, Family::Ipv6] {
        if wanted.has_nft(family) {
            continue;
        }
        match nft::remove(family) {
            Ok(true) => log::info!("removed {}", nft::describe(family)),
            Ok(false) => {}
            Err(e) => log::error!("nft: removing {}: {e}", nft::describe(family)),
        }
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
