//! This node's own lease: acquire it as flannel does (but retry lost races
//! instead of failing), renew it at the margin, notice when it is gone.
//!
//! Reservations (keys without an etcd lease) stay reservations: they are
//! overwritten without a lease on acquisition and never given one on renewal
//! (flannel turns them into 24 h leases, its issue #1329).

use crate::printable::printable;
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use ipnet::{Ipv4Net, Ipv6Net};

use super::{Entry, EtcdError, Registry};
use crate::subnet::backoff::Backoff;
use crate::{
    flannel::config::NetworkConfig,
    flannel::lease::{self, Backend, LeaseSubnets},
    flannel::mac::MacAddr,
    subnet::alloc::{self, AllocError, Choice, Existing, Previous},
};

/// flannel's `subnetTTL`.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// flanneld's `--subnet-lease-renew-margin` default (60 minutes).
pub const DEFAULT_RENEW_MARGIN: Duration = Duration::from_secs(3600);
/// After this many lost creation races in a row, something else is wrong.
const MAX_RACES: usize = 64;
/// How long an acquirer that finds the space full while a race may still
/// give a subnet back (two leases sharing an IPv6 subnet, or a subnet we
/// lost a race for) waits before it reads the leases again.
const RACE_PAUSE: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTiming {
    pub ttl: Duration,
    /// Renew this long before expiry.
    pub renew_margin: Duration,
    /// The longest wait before retrying a failed renewal (flannel waits
    /// one minute every time; we back off from a second up to this).
    pub retry: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        LeaseTiming {
            ttl: DEFAULT_TTL,
            renew_margin: DEFAULT_RENEW_MARGIN,
            retry: Duration::from_secs(60),
        }
    }
}

/// What this node publishes in its lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    pub public_ip: Ipv4Addr,
    pub vni: u32,
    /// The MAC to publish when we have no lease to take one from.
    pub vtep_mac: MacAddr,
    /// For dual stack: the node's IPv6 and its v6 VTEP's MAC.
    pub ipv6: Option<NodeIpv6>,
}

/// What a dual-stack node publishes about its IPv6 side (`PublicIPv6` and
/// `BackendV6Data.VtepMAC`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeIpv6 {
    pub public_ip: Ipv6Addr,
    pub vtep_mac: MacAddr,
}

/// Our lease value as flanneld writes it.
fn encode(public_ip: Ipv4Addr, vni: u32, vtep_mac: MacAddr, ipv6: Option<NodeIpv6>) -> String {
    lease::encode_vxlan_dual(
        public_ip,
        vni,
        vtep_mac,
        ipv6.map(|v6| (v6.public_ip, v6.vtep_mac)),
    )
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnLease {
    pub subnet: Ipv4Net,
    /// The IPv6 subnet named by our key, for a dual-stack lease.
    pub ipv6_subnet: Option<Ipv6Net>,
    /// What we publish about our IPv6 side (its MAC taken over like
    /// `vtep_mac`); `None` when IPv6 is off.
    pub ipv6: Option<NodeIpv6>,
    pub public_ip: Ipv4Addr,
    pub vni: u32,
    /// Published; taken over from the lease we reused so that peers'
    /// neighbour/FDB entries stay valid across restarts.
    pub vtep_mac: MacAddr,
    /// The exact value in etcd.
    pub value: String,
    /// The etcd lease attached to the key; 0 for a reservation.
    pub lease_id: i64,
    /// The key's mod revision after our last write.
    pub mod_revision: i64,
    /// `None` for a reservation.
    pub expires: Option<Instant>,
    /// How the subnet was chosen.
    pub choice: Choice,
    /// Set while another node's lease holds our key: we keep the subnet for
    /// our pods and wait (see [`Keeper`]); the text says who holds it.
    pub conflict: Option<String>,
}

impl OwnLease {
    /// The subnets our key names.
    pub fn subnets(&self) -> LeaseSubnets {
        LeaseSubnets {
            v4: self.subnet,
            v6: self.ipv6_subnet,
        }
    }

    pub fn is_reservation(&self) -> bool {
        self.lease_id == 0
    }

    /// When to renew: `margin` before expiry (at once if that is past).
    /// A reservation is checked on the same schedule as a fresh lease.
    pub fn renew_at(&self, timing: &LeaseTiming) -> Instant {
        let expires = self.expires.unwrap_or_else(|| Instant::now() + timing.ttl);
        expires
            .checked_sub(timing.renew_margin)
            .unwrap_or_else(Instant::now)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error("lost {0} subnet creation races in a row; giving up")]
    TooManyRaces(usize),
    #[error("renewing lease {subnet}: {source}")]
    Renew {
        subnet: Ipv4Net,
        #[source]
        source: EtcdError,
    },
}

/// Acquire a subnet: reuse our PublicIP's lease if it fits, else the
/// subnet from the previous subnet.env, else a random free one; each
/// creation is `If(no key holds the IPv4 subnet) Then(Put(key, value,
/// lease))` ([`Registry::create`]), a dual-stack one is then checked for a
/// node that took the same IPv6 subnet at the same time, and a lost race is
/// retried with another subnet.
pub async fn acquire(
    reg: &Registry,
    config: &NetworkConfig,
    node: &NodeIdentity,
    previous: impl Into<Previous>,
    timing: &LeaseTiming,
) -> Result<OwnLease, AcquireError> {
    let previous = previous.into();
    let mut avoid: Vec<Ipv4Net> = Vec::new();
    let mut races = 0;
    loop {
        let snapshot = reg.list().await?;
        let existing: Vec<Existing> = snapshot
            .entries
            .iter()
            .filter_map(|e| {
                let subnets = e.subnets()?;
                let public_ip = lease::decode(&e.key, &e.value).ok().map(|l| l.public_ip);
                Some(Existing {
                    subnet: subnets.v4,
                    ipv6: subnets.v6,
                    public_ip,
                    reservation: e.is_reservation(),
                })
            })
            .collect();
        let planned = alloc::plan(
            config,
            &existing,
            node.public_ip,
            previous,
            &avoid,
            &mut rand::rng(),
        );
        let plan = match planned {
            // Two keys sharing an IPv6 half are a race in progress, and
            // one of them goes (see below); a subnet we lost a race for may
            // have been given up the same way: the space is not exhausted
            // yet.
            Err(AllocError::Exhausted { .. } | AllocError::ExhaustedV6 { .. })
                if (ipv6_shared(&existing) || !avoid.is_empty()) && races < MAX_RACES =>
            {
                races += 1;
                avoid.clear();
                tokio::time::sleep(RACE_PAUSE).await;
                continue;
            }
            plan => plan?,
        };
        let entry_for = |subnets: LeaseSubnets| {
            snapshot
                .entries
                .iter()
                .find(|e| e.subnets() == Some(subnets))
        };
        for stale in &plan.stale {
            if let Some(e) = entry_for(*stale) {
                log::info!(
                    "deleting our old lease {} (PublicIP {}): it no longer fits the network config",
                    e.key,
                    node.public_ip
                );
                reg.delete_if_unchanged(*stale, e.mod_revision).await?;
            }
        }

        let subnet = plan.choice.subnet();
        let subnets = plan.subnets();
        match plan.choice {
            Choice::Reuse { reservation, .. } => {
                let Some(e) = entry_for(subnets) else {
                    continue;
                };
                // Keep the MACs peers already know.
                let (vtep_mac, ipv6) = match lease::decode(&e.key, &e.value) {
                    Ok(
                        l @ lease::Lease {
                            backend: Backend::Vxlan { vtep_mac, .. },
                            ..
                        },
                    ) => (
                        vtep_mac,
                        node.ipv6.map(|v6| NodeIpv6 {
                            vtep_mac: l.vtep_mac_v6.unwrap_or(v6.vtep_mac),
                            ..v6
                        }),
                    ),
                    _ => (node.vtep_mac, node.ipv6),
                };
                let value = encode(node.public_ip, node.vni, vtep_mac, ipv6);
                let (lease_id, expires) = if reservation {
                    (0, None)
                } else {
                    let (id, ttl) = reg.grant(timing.ttl).await?;
                    (id, Some(Instant::now() + ttl))
                };
                if reg
                    .replace(subnets, e.mod_revision, &value, lease_id)
                    .await?
                {
                    let mod_revision = current_mod_revision(reg, subnets).await?;
                    log::info!(
                        "reusing {} lease {subnets} for PublicIP {}",
                        if reservation { "reserved" } else { "our" },
                        node.public_ip
                    );
                    return Ok(OwnLease {
                        subnet,
                        ipv6_subnet: subnets.v6,
                        ipv6,
                        public_ip: node.public_ip,
                        vni: node.vni,
                        vtep_mac,
                        value,
                        lease_id,
                        mod_revision,
                        expires,
                        choice: plan.choice,
                        conflict: None,
                    });
                }
                // Changed under us: read again.
                reg.revoke(lease_id).await;
            }
            Choice::Previous(_) | Choice::Random(_) => {
                let value = encode(node.public_ip, node.vni, node.vtep_mac, node.ipv6);
                let (lease_id, ttl) = reg.grant(timing.ttl).await?;
                let expires = Instant::now() + ttl;
                if reg.create(subnets, &value, lease_id).await? {
                    let mod_revision = current_mod_revision(reg, subnets).await?;
                    if let Some(v6) = subnets.v6
                        && ipv6_held_by_another(reg, subnets).await?
                    {
                        // Keys name both halves, so the create could not
                        // see a node that raced us for the IPv6 half: the
                        // one that finds the other yields (both may; each
                        // then picks again).
                        reg.delete_if_unchanged(subnets, mod_revision).await?;
                        reg.revoke(lease_id).await;
                        races += 1;
                        log::info!("another node holds {v6} too; trying another subnet");
                        if races >= MAX_RACES {
                            return Err(AcquireError::TooManyRaces(races));
                        }
                        continue;
                    }
                    log::info!(
                        "allocated lease {subnets} ({}) for PublicIP {}",
                        if matches!(plan.choice, Choice::Previous(_)) {
                            "the subnet we held before"
                        } else {
                            "picked at random"
                        },
                        node.public_ip
                    );
                    return Ok(OwnLease {
                        subnet,
                        ipv6_subnet: subnets.v6,
                        ipv6: node.ipv6,
                        public_ip: node.public_ip,
                        vni: node.vni,
                        vtep_mac: node.vtep_mac,
                        value,
                        lease_id,
                        mod_revision,
                        expires: Some(expires),
                        choice: plan.choice,
                        conflict: None,
                    });
                }
                reg.revoke(lease_id).await;
                races += 1;
                log::info!("another node took {subnet} first; trying another subnet");
                avoid.push(subnet);
                if races >= MAX_RACES {
                    return Err(AcquireError::TooManyRaces(races));
                }
            }
        }
    }
}

/// Whether two leases name one IPv6 subnet.
fn ipv6_shared(existing: &[Existing]) -> bool {
    let mut seen = std::collections::HashSet::new();
    existing
        .iter()
        .filter_map(|e| e.ipv6)
        .any(|v6| !seen.insert(v6))
}

/// Whether a key other than ours names our IPv6 subnet.
async fn ipv6_held_by_another(reg: &Registry, ours: LeaseSubnets) -> Result<bool, EtcdError> {
    Ok(reg.list().await?.entries.iter().any(|e| {
        e.subnets()
            .is_some_and(|s| s != ours && s.v6.is_some() && s.v6 == ours.v6)
    }))
}

async fn current_mod_revision(reg: &Registry, subnet: LeaseSubnets) -> Result<i64, EtcdError> {
    Ok(reg.get_lease(subnet).await?.map_or(0, |e| e.mod_revision))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Renewal {
    Renewed,
    /// The key is gone, or holds someone else's value now.
    Lost(String),
}

/// Renew our lease: a fresh etcd lease of `ttl` and a put guarded by the
/// key's mod revision (so we never overwrite a subnet someone else took
/// after ours was deleted). A reservation is only checked, never given a
/// lease.
pub async fn renew(
    reg: &Registry,
    own: &mut OwnLease,
    timing: &LeaseTiming,
) -> Result<Renewal, EtcdError> {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    for attempt in 0..8 {
        if attempt > 0 {
            tokio::time::sleep(backoff.next_delay()).await;
        }
        let Some(e) = reg.get_lease(own.subnets()).await? else {
            return Ok(Renewal::Lost(format!(
                "{} was deleted",
                reg.lease_key(own.subnets())
            )));
        };
        if e.value != own.value.as_bytes() {
            return Ok(Renewal::Lost(format!(
                "{} now holds {}",
                printable(&e.key),
                printable(&String::from_utf8_lossy(&e.value))
            )));
        }
        if e.is_reservation() {
            if !own.is_reservation() {
                log::info!("{} was made a reservation; keeping it one", e.key);
            }
            own.lease_id = 0;
            own.expires = None;
            own.mod_revision = e.mod_revision;
            return Ok(Renewal::Renewed);
        }
        let (id, ttl) = reg.grant(timing.ttl).await?;
        let expires = Instant::now() + ttl;
        if reg
            .replace(own.subnets(), e.mod_revision, &own.value, id)
            .await?
        {
            if e.lease_id != id {
                reg.revoke(e.lease_id).await;
            }
            own.lease_id = id;
            own.expires = Some(expires);
            own.mod_revision = current_mod_revision(reg, own.subnets()).await?;
            return Ok(Renewal::Renewed);
        }
        reg.revoke(id).await;
    }
    Err(EtcdError::Contention {
        key: reg.lease_key(own.subnets()),
    })
}

/// Publish new VTEP MACs in our lease (after the datapath reported other
/// ones than the lease holds: `vtep_mac_v6` is the v6 device's, for dual
/// stack), keeping lease or reservation.
pub async fn update_mac(
    reg: &Registry,
    own: &mut OwnLease,
    vtep_mac: MacAddr,
    vtep_mac_v6: Option<MacAddr>,
) -> Result<Renewal, EtcdError> {
    let ipv6 = own.ipv6.map(|v6| NodeIpv6 {
        vtep_mac: vtep_mac_v6.unwrap_or(v6.vtep_mac),
        ..v6
    });
    let value = encode(own.public_ip, own.vni, vtep_mac, ipv6);
    let Some(e) = reg.get_lease(own.subnets()).await? else {
        return Ok(Renewal::Lost(format!(
            "{} was deleted",
            reg.lease_key(own.subnets())
        )));
    };
    if e.value != own.value.as_bytes() {
        return Ok(Renewal::Lost(format!(
            "{} now holds {}",
            printable(&e.key),
            printable(&String::from_utf8_lossy(&e.value))
        )));
    }
    if !reg
        .replace(own.subnets(), e.mod_revision, &value, e.lease_id)
        .await?
    {
        return Ok(Renewal::Lost(format!(
            "{} changed while we updated it",
            e.key
        )));
    }
    own.value = value;
    own.vtep_mac = vtep_mac;
    own.ipv6 = ipv6;
    own.lease_id = e.lease_id;
    own.mod_revision = current_mod_revision(reg, own.subnets()).await?;
    Ok(Renewal::Renewed)
}

/// Whether a watched entry is our own key still holding our value.
pub fn is_ours(own: &OwnLease, entry: &Entry) -> bool {
    entry.subnets() == Some(own.subnets()) && entry.value == own.value.as_bytes()
}

/// What [`reclaim`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reclaim {
    /// Our key holds our value again.
    Reclaimed(OwnLease),
    /// Another node's well-formed lease holds our key.
    HeldBy(Ipv4Addr),
    /// The key changed while we wrote it: look again.
    Raced,
}

/// Puts our value back under our own key when it is gone, holds garbage, or
/// holds another value of our PublicIP; leaves a well-formed lease of
/// another PublicIP alone.
pub async fn reclaim(
    reg: &Registry,
    own: &OwnLease,
    timing: &LeaseTiming,
) -> Result<Reclaim, EtcdError> {
    let current = reg.get_lease(own.subnets()).await?;
    if let Some(e) = &current
        && let Ok(l) = lease::decode(&e.key, &e.value)
        && l.public_ip != own.public_ip
    {
        return Ok(Reclaim::HeldBy(l.public_ip));
    }
    let (id, ttl) = reg.grant(timing.ttl).await?;
    let placed = match &current {
        None => reg.create(own.subnets(), &own.value, id).await?,
        Some(e) => {
            reg.replace(own.subnets(), e.mod_revision, &own.value, id)
                .await?
        }
    };
    if !placed {
        reg.revoke(id).await;
        return Ok(Reclaim::Raced);
    }
    let mut own = own.clone();
    own.lease_id = id;
    own.expires = Some(Instant::now() + ttl);
    own.mod_revision = current_mod_revision(reg, own.subnets()).await?;
    own.conflict = None;
    Ok(Reclaim::Reclaimed(own))
}

/// Keeps our lease: renews it at the margin (retrying a renewal that failed
/// for a transient reason with backoff, up to `timing.retry` apart), and
/// when our key disappears or is taken over, logs it loudly and takes the
/// same subnet back ([`reclaim`]). It never moves to another subnet while
/// the node runs: our pods keep their addresses, and the subnet is never
/// routed away from them. If another node's well-formed lease holds our
/// key, that is a conflict: the lease is published with `conflict` set (the
/// agent reports not-ready) and the keeper waits until the key is freed or
/// changes, then takes it back. Every change is published on `tx`.
pub struct Keeper {
    pub reg: Registry,
    pub config: NetworkConfig,
    pub node: NodeIdentity,
    pub timing: LeaseTiming,
}

impl Keeper {
    /// Runs until every receiver of `tx` is gone, or until etcd answers with
    /// a problem of configuration (certificates, credentials) or
    /// re-acquisition fails for good (e.g. no subnet left).
    pub async fn run(
        &self,
        mut own: OwnLease,
        tx: tokio::sync::watch::Sender<OwnLease>,
    ) -> Result<(), AcquireError> {
        // Watch our key alone (a peer's event must not wake us), from just
        // after our own last write, so a deletion between acquisition and
        // this call is not missed.
        let start_rev = if own.mod_revision > 0 {
            own.mod_revision
        } else {
            self.reg
                .lease_snapshot(own.subnets())
                .await
                .map_or(0, |s| s.revision)
        };
        let mut watcher =
            super::watch::LeaseWatcher::lease_key(self.reg.clone(), own.subnets(), start_rev);
        let mut next_renewal = own.renew_at(&self.timing);
        let mut renew_backoff = Backoff::new(Duration::from_secs(1), self.timing.retry);
        loop {
            let lost = tokio::select! {
                _ = tx.closed() => return Ok(()),
                _ = tokio::time::sleep_until(next_renewal.into()) => {
                    match renew(&self.reg, &mut own, &self.timing).await {
                        Ok(Renewal::Renewed) => {
                            log::info!(
                                "renewed lease {} ({})",
                                own.subnet,
                                match own.expires {
                                    Some(e) => format!("expires in {:?}", e.saturating_duration_since(Instant::now())),
                                    None => "reservation, no expiry".into(),
                                }
                            );
                            next_renewal = own.renew_at(&self.timing);
                            renew_backoff.reset();
                            tx.send_replace(own.clone());
                            None
                        }
                        Ok(Renewal::Lost(why)) => Some(why),
                        Err(e) if e.is_transient() => {
                            let delay = renew_backoff.next_delay();
                            log::error!("renewing lease {} failed (retrying in {delay:?}): {e}", own.subnet);
                            next_renewal = Instant::now() + delay;
                            None
                        }
                        Err(source) => return Err(AcquireError::Renew { subnet: own.subnet, source }),
                    }
                }
                events = watcher.next() => own_key_lost(&self.reg, &own, &events?),
            };
            let Some(why) = lost else { continue };
            log::error!(
                "LOST OUR LEASE {}: {why}; taking the same subnet back (our pods keep their addresses)",
                own.subnet
            );
            let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
            own = loop {
                match reclaim(&self.reg, &own, &self.timing).await {
                    Ok(Reclaim::Reclaimed(l)) => break l,
                    Ok(Reclaim::Raced) => tokio::time::sleep(backoff.next_delay()).await,
                    Ok(Reclaim::HeldBy(holder)) => {
                        let conflict = format!(
                            "our subnet {}'s key in etcd holds PublicIP {holder}'s lease",
                            own.subnet
                        );
                        if own.conflict.as_deref() != Some(conflict.as_str()) {
                            log::error!(
                                "LEASE CONFLICT: {conflict}; keeping {} for our pods, never routing it to {holder}, not ready until the key is freed or ours again",
                                own.subnet
                            );
                            own.conflict = Some(conflict);
                            tx.send_replace(own.clone());
                        }
                        // Look again when our key changes.
                        tokio::select! {
                            _ = tx.closed() => return Ok(()),
                            events = watcher.next() => { events?; }
                        }
                    }
                    Err(e) if e.is_transient() => {
                        let delay = backoff.next_delay();
                        log::warn!("taking our lease back failed (retrying in {delay:?}): {e}");
                        tokio::time::sleep(delay).await;
                    }
                    Err(source) => {
                        return Err(AcquireError::Renew {
                            subnet: own.subnet,
                            source,
                        });
                    }
                }
            };
            log::warn!("took our lease {} back", own.subnet);
            next_renewal = own.renew_at(&self.timing);
            tx.send_replace(own.clone());
        }
    }
}

/// Whether a batch of watch events says our key is gone or not ours anymore.
fn own_key_lost(
    reg: &Registry,
    own: &OwnLease,
    events: &[super::watch::WatchEvent],
) -> Option<String> {
    use super::watch::WatchEvent;
    let key = reg.lease_key(own.subnets());
    let mut verdict = None;
    for ev in events {
        match ev {
            WatchEvent::Delete { key: k } if *k == key => {
                verdict = Some(format!("{key} was deleted (or its etcd lease expired)"));
            }
            WatchEvent::Put(e) if e.key == key => {
                verdict = (!is_ours(own, e))
                    .then(|| format!("{key} now holds {}", String::from_utf8_lossy(&e.value)));
            }
            WatchEvent::Reset(s) => {
                verdict = match s.entries.iter().find(|e| e.key == key) {
                    Some(e) if is_ours(own, e) => None,
                    Some(e) => Some(format!(
                        "{key} now holds {}",
                        String::from_utf8_lossy(&e.value)
                    )),
                    None => Some(format!("{key} is gone")),
                };
            }
            _ => {}
        }
    }
    verdict
}
