//! The host-firewall half of "VXLAN only from known VTEPs": nftables table
//! `inet overlay-vtep`, kept by the datapath layer on both datapaths.
//!
//! Why a firewall rule at all: `flannel.<VNI>`'s UDP socket is the kernel's,
//! bound to `0.0.0.0:<port>`, and `vxlan_rcv` checks the VNI only. The eBPF
//! ingress program sees the underlay NIC only, so VXLAN sent to this node
//! from a pod (through `cni0`), through a second NIC, or by anyone on the
//! kernel datapath reaches that socket unchecked. The table's chain runs on
//! the `input` hook, i.e. for every datagram about to be delivered to a local
//! socket, whatever its destination address (any local address, broadcast,
//! multicast) and whatever the interface it came in on:
//!
//! ```text
//! table inet overlay-vtep {
//!     counter unknown_vtep { }     # VXLAN from a source that holds no lease
//!     counter spoofed_source { }   # from a known VTEP's address, on the wrong interface
//!     set vteps { type ipv4_addr; }  # one element per peer PublicIP
//!     set vteps6 { type ipv6_addr; } # dual stack: one per peer PublicIPv6
//!     chain input {
//!         type filter hook input priority raw; policy accept;
//!         udp dport 8472 ip saddr != @vteps counter name "unknown_vtep" drop
//!         udp dport 8472 ip6 saddr != @vteps6 counter name "unknown_vtep" drop
//!         udp dport 8472 fib saddr . iif oif missing counter name "spoofed_source" drop
//!     }
//! }
//! ```
//!
//! The `ip6` rule is there on a dual-stack node only (`flannel-v6.<VNI>`'s
//! socket listens on IPv6; on an IPv4-only node nothing of ours does). Its
//! set holds the peers' `PublicIPv6`; a peer whose lease has no IPv6 half
//! has no element there, and sends us no IPv6 VXLAN.
//!
//! The second rule is a reverse-path check for our port only: a pod (which
//! has CAP_NET_RAW by default) or a host on another segment can put a known
//! VTEP's address in the source; the route back to that address is not
//! through the interface the datagram came in on, so it is dropped.
//!
//! The set holds one element per VTEP public IP (counted by [`VtepUsers`]:
//! added with its first peer subnet, deleted with its last), so a lookup is
//! one hash probe however many peers there are. A change of up to
//! [`nft_elements::MAX_ELEMENTS`] elements goes over netfilter netlink as one
//! transaction ([`nft_elements`]: no process per peer event); larger ones,
//! the table itself, and a change netlink failed go through `nft -f -` (one
//! transaction per run). A batch of peer changes (start-up, a re-list) is
//! one change whatever its size, see [`VtepGuard::begin_batch`].

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    net::{IpAddr, Ipv6Addr},
};

use super::{Peer, vtep_users::VtepUsers};
use crate::{
    ipmasq::exec::{self, IptablesError},
    netlink::nft_elements::{self, ElementsError, SetChange},
};

/// `inet`: the table is independent of iptables (legacy or nft flavour) and of
/// flanneld's `ip flannel-ipv4`.
pub const FAMILY: &str = "inet";
pub const TABLE: &str = "overlay-vtep";
pub const SET: &str = "vteps";
/// The peers' `PublicIPv6`, on a dual-stack node.
pub const SET6: &str = "vteps6";
pub const CHAIN: &str = "input";
/// Named counters, one per drop rule.
pub const COUNTER_UNKNOWN: &str = "unknown_vtep";
pub const COUNTER_SPOOFED: &str = "spoofed_source";
/// Elements per `add element` line when the whole set is loaded.
const ELEMENTS_PER_LINE: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// `nft` is not installed: nothing guards the kernel's VXLAN socket.
    #[error("nft is not installed: cannot install table {FAMILY} {TABLE}")]
    NftMissing(#[source] IptablesError),
    #[error("nft table {FAMILY} {TABLE}: {what}")]
    Nft {
        what: &'static str,
        #[source]
        source: IptablesError,
    },
}

fn nft_err(what: &'static str) -> impl FnOnce(IptablesError) -> GuardError {
    move |source| match &source {
        IptablesError::Spawn { source: io, .. } if io.kind() == std::io::ErrorKind::NotFound => {
            GuardError::NftMissing(source)
        }
        _ => GuardError::Nft { what, source },
    }
}

/// The table's definition minus the set's elements, as `add` commands: an
/// existing set keeps its elements (a restarting agent does not open a
/// window in which its peers' VXLAN is dropped), the chain is rewritten.
/// `v6`: a dual-stack node, whose IPv6 VXLAN is checked against [`SET6`].
pub fn setup_script(port: u16, v6: bool) -> String {
    let t = format!("{FAMILY} {TABLE}");
    let mut s = format!(
        "add table {t} {{ comment \"overlay agent: VXLAN to port {port} only from known VTEPs\"; }}\n\
         add counter {t} {COUNTER_UNKNOWN}\n\
         add counter {t} {COUNTER_SPOOFED}\n\
         add set {t} {SET} {{ type ipv4_addr; comment \"PublicIPs of the peers (one per VTEP)\"; }}\n\
         add chain {t} {CHAIN} {{ type filter hook input priority raw; policy accept; }}\n\
         flush chain {t} {CHAIN}\n\
         add rule {t} {CHAIN} udp dport {port} ip saddr != @{SET} counter name \"{COUNTER_UNKNOWN}\" drop\n"
    );
    if v6 {
        let _ = write!(
            s,
            "add set {t} {SET6} {{ type ipv6_addr; comment \"PublicIPv6s of the peers (one per VTEP)\"; }}\n\
             add rule {t} {CHAIN} udp dport {port} ip6 saddr != @{SET6} counter name \"{COUNTER_UNKNOWN}\" drop\n"
        );
    }
    let _ = writeln!(
        s,
        "add rule {t} {CHAIN} udp dport {port} fib saddr . iif oif missing counter name \"{COUNTER_SPOOFED}\" drop"
    );
    s
}

/// Removes the table, there or not.
pub fn removal_script() -> String {
    format!("table {FAMILY} {TABLE} {{}}\ndelete table {FAMILY} {TABLE}\n")
}

/// Puts `ips` into the set or takes them out. A deletion is preceded by an
/// add of the same element: nft refuses to delete what is not there, and
/// both run in one transaction, so the result is "absent" either way.
/// Each address goes to its family's set.
pub fn change_script(changes: &BTreeMap<IpAddr, bool>) -> String {
    let mut s = String::new();
    let (adds, dels): (Vec<_>, Vec<_>) = changes.iter().partition(|(_, present)| **present);
    let adds: Vec<IpAddr> = adds.into_iter().map(|(ip, _)| *ip).collect();
    let dels: Vec<IpAddr> = dels.into_iter().map(|(ip, _)| *ip).collect();
    push_elements(&mut s, "add", &adds);
    push_elements(&mut s, "add", &dels);
    push_elements(&mut s, "delete", &dels);
    s
}

/// The whole table with exactly `ips` in the sets, in one transaction: the
/// drift repair (also re-creates a table or chain someone deleted).
pub fn rebuild_script(port: u16, v6: bool, ips: &[IpAddr]) -> String {
    let mut s = setup_script(port, v6);
    let _ = writeln!(s, "flush set {FAMILY} {TABLE} {SET}");
    if v6 {
        let _ = writeln!(s, "flush set {FAMILY} {TABLE} {SET6}");
    }
    push_elements(&mut s, "add", ips);
    s
}

/// `ips`' elements, IPv4 into [`SET`] and IPv6 into [`SET6`].
fn push_elements(s: &mut String, verb: &str, ips: &[IpAddr]) {
    let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = ips.iter().partition(|ip| ip.is_ipv4());
    for (set, ips) in [(SET, v4), (SET6, v6)] {
        for chunk in ips.chunks(ELEMENTS_PER_LINE) {
            let list = chunk
                .iter()
                .map(IpAddr::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(s, "{verb} element {FAMILY} {TABLE} {set} {{ {list} }}");
        }
    }
}

/// Runs `script` as one nft transaction.
fn load(script: &str, what: &'static str) -> Result<(), GuardError> {
    exec::run("nft", &["-f", "-"], Some(script))
        .map(drop)
        .map_err(nft_err(what))
}

/// Removes the table; whether it was there (a host without nft has none).
pub fn remove() -> Result<bool, GuardError> {
    match exec::run("nft", &["list", "tables", FAMILY], None) {
        Ok(tables) => {
            let name = format!("table {FAMILY} {TABLE}");
            if !tables.lines().any(|l| l.trim() == name) {
                return Ok(false);
            }
        }
        Err(e) => {
            return match nft_err("list tables")(e) {
                GuardError::NftMissing(_) => Ok(false),
                e => Err(e),
            };
        }
    }
    load(&removal_script(), "remove")?;
    Ok(true)
}

/// The drop counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardCounters {
    /// VXLAN for our port from a source that holds no lease.
    pub unknown_vtep: u64,
    /// From a known VTEP's address, arriving where the route back to it
    /// does not go (a spoofed source).
    pub spoofed_source: u64,
}

/// Reads the counters (packets); `None` when the table is not there.
pub fn counters() -> Result<Option<GuardCounters>, GuardError> {
    let listed = match exec::run("nft", &["list", "counters", "table", FAMILY, TABLE], None) {
        Ok(s) => s,
        // nft says "No such file or directory" for a missing table; check
        // for the table rather than reading its message.
        Err(e) => {
            return match table_exists()? {
                false => Ok(None),
                true => Err(nft_err("list counters")(e)),
            };
        }
    };
    let packets = parse_counters(&listed);
    Ok(Some(GuardCounters {
        unknown_vtep: packets.get(COUNTER_UNKNOWN).copied().unwrap_or(0),
        spoofed_source: packets.get(COUNTER_SPOOFED).copied().unwrap_or(0),
    }))
}

/// Whether the table exists.
fn table_exists() -> Result<bool, GuardError> {
    let tables =
        exec::run("nft", &["list", "tables", FAMILY], None).map_err(nft_err("list tables"))?;
    let name = format!("table {FAMILY} {TABLE}");
    Ok(tables.lines().any(|l| l.trim() == name))
}

/// `counter <name> { packets N bytes M }` blocks, as nft lists them: packets
/// by counter name.
pub fn parse_counters(listed: &str) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    let mut current: Option<String> = None;
    for line in listed.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("counter ")
            && let Some(name) = rest.strip_suffix('{')
        {
            current = Some(name.trim().trim_matches('"').to_owned());
        } else if let (Some(name), Some(rest)) = (&current, line.strip_prefix("packets ")) {
            if let Some(n) = rest.split_whitespace().next().and_then(|n| n.parse().ok()) {
                out.insert(name.clone(), n);
            }
            current = None;
        }
    }
    out
}

/// What is waiting for the end of a batch: each IP's final state.
#[derive(Debug, Default)]
struct Batch {
    changes: BTreeMap<IpAddr, bool>,
}

/// The set's keeper: which peer subnets use each VTEP IP, and the set in
/// step with it.
#[derive(Debug)]
pub struct VtepGuard {
    port: u16,
    /// A dual-stack node: [`SET6`] and its rule are there, and the peers'
    /// `PublicIPv6` go in.
    v6: bool,
    users: VtepUsers,
    users6: VtepUsers<Ipv6Addr>,
    batch: Option<Batch>,
    /// A change failed to load: the next change rebuilds the whole set
    /// instead of trusting it (the drift repair would too).
    stale: bool,
    /// How to run a script (nft; tests record instead).
    runner: fn(&str) -> Result<(), GuardError>,
    /// How a change of a few elements is made without a script (netlink;
    /// tests record or refuse instead). When it fails, the change goes
    /// through `runner` as a script.
    elements: fn(&BTreeMap<IpAddr, bool>) -> Result<(), ElementsError>,
    /// `elements` failed before: its failures are said once, at info.
    elements_failed: bool,
}

/// A change as set elements over netlink ([`nft_elements`]): one process
/// less per peer event.
fn netlink_elements(changes: &BTreeMap<IpAddr, bool>) -> Result<(), ElementsError> {
    let mut v4 = SetChange {
        set: SET,
        ..SetChange::default()
    };
    let mut v6 = SetChange {
        set: SET6,
        ..SetChange::default()
    };
    for (&ip, &present) in changes {
        let c = if ip.is_ipv4() { &mut v4 } else { &mut v6 };
        if present {
            c.add.push(ip);
        } else {
            c.remove.push(ip);
        }
    }
    nft_elements::apply(nft_elements::NFPROTO_INET, TABLE, &[v4, v6])
}

fn run_nft(script: &str) -> Result<(), GuardError> {
    load(script, "update")
}

impl VtepGuard {
    /// Installs the table (keeping the set's elements if it was there).
    /// `v6`: a dual-stack node (see [`setup_script`]).
    pub fn install(port: u16, v6: bool) -> Result<Self, GuardError> {
        load(&setup_script(port, v6), "install").or_else(|e| match e {
            // A table of ours with another layout (another version, a set of
            // another type): start again from nothing, in one transaction.
            GuardError::Nft { .. } => load(
                &format!("{}{}", removal_script(), setup_script(port, v6)),
                "re-create",
            ),
            e => Err(e),
        })?;
        let mut g = Self::with_runner(port, v6, run_nft);
        g.elements = netlink_elements;
        Ok(g)
    }

    /// A guard whose changes all go through `runner` as scripts.
    fn with_runner(port: u16, v6: bool, runner: fn(&str) -> Result<(), GuardError>) -> Self {
        VtepGuard {
            port,
            v6,
            users: VtepUsers::default(),
            users6: VtepUsers::default(),
            batch: None,
            stale: false,
            runner,
            elements: |_| Err(ElementsError::NoAnswer),
            elements_failed: true,
        }
    }

    pub fn users(&self) -> &VtepUsers {
        &self.users
    }

    /// Until [`VtepGuard::end_batch`], changes to the set are collected and
    /// then loaded in one nft run (start-up with 10,000 peers: one run).
    pub fn begin_batch(&mut self) {
        self.batch.get_or_insert_with(Batch::default);
    }

    /// Loads what the batch collected.
    pub fn end_batch(&mut self) -> Result<(), GuardError> {
        match self.batch.take() {
            Some(b) if !b.changes.is_empty() || self.stale => self.apply(b.changes),
            _ => Ok(()),
        }
    }

    /// The public IPs `peer` sends VXLAN from: its `PublicIP` and, on a
    /// dual-stack node, its `PublicIPv6` when its lease has an IPv6 half.
    fn ips_of(&self, peer: &Peer) -> Vec<IpAddr> {
        let v6 = peer.v6.filter(|_| self.v6).map(|p| IpAddr::V6(p.public_ip));
        std::iter::once(IpAddr::V4(peer.public_ip))
            .chain(v6)
            .collect()
    }

    fn in_use(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(ip) => self.users.in_use(ip),
            IpAddr::V6(ip) => self.users6.in_use(ip),
        }
    }

    /// Before `peer` is programmed: VXLAN from its addresses is accepted by
    /// the time we send to it.
    pub fn admit(&mut self, peer: &Peer) -> Result<(), GuardError> {
        for ip in self.ips_of(peer) {
            if !self.in_use(ip) {
                self.change(ip, true)?;
            }
        }
        Ok(())
    }

    /// `peer` is programmed: counted under its addresses; an address it
    /// used before (or its IPv6 one, when its lease lost the IPv6 half)
    /// leaves the set if no peer uses it any more.
    pub fn commit(&mut self, peer: &Peer) -> Result<(), GuardError> {
        self.settle(std::slice::from_ref(peer), &[])
    }

    /// Programming `peer` failed after [`VtepGuard::admit`]: its addresses
    /// go out again unless a programmed peer uses them.
    pub fn failed(&mut self, peer: &Peer) -> Result<(), GuardError> {
        self.settle(&[], std::slice::from_ref(peer))
    }

    /// [`VtepGuard::commit`] and [`VtepGuard::failed`] for a batch of peers
    /// admitted together: every programmed peer is counted first, and only
    /// then do the addresses no peer uses any more leave the sets, so that
    /// one peer's old or failed address that another peer of the batch now
    /// uses stays in.
    pub fn settle(&mut self, programmed: &[Peer], failed: &[Peer]) -> Result<(), GuardError> {
        let mut out: Vec<IpAddr> = Vec::new();
        for p in programmed {
            out.extend(self.users.set(p.subnet, p.public_ip).map(IpAddr::V4));
            if self.v6 {
                let old6 = match p.v6 {
                    Some(p6) => self.users6.set(p.subnet, p6.public_ip),
                    None => self.users6.remove(p.subnet),
                };
                out.extend(old6.map(IpAddr::V6));
            }
        }
        for p in failed {
            out.extend(self.ips_of(p));
        }
        out.sort_unstable();
        out.dedup();
        for ip in out {
            if !self.in_use(ip) {
                self.change(ip, false)?;
            }
        }
        Ok(())
    }

    /// `peer` is gone: its addresses leave the sets with their last user
    /// (also ones the table never counted, e.g. left by an earlier failure).
    pub fn release(&mut self, peer: &Peer) -> Result<(), GuardError> {
        let unused = self.users.remove(peer.subnet);
        let own = Some(peer.public_ip).filter(|ip| !self.users.in_use(*ip) && unused != Some(*ip));
        let unused6 = self.users6.remove(peer.subnet);
        let own6 = peer
            .v6
            .filter(|_| self.v6)
            .map(|p| p.public_ip)
            .filter(|ip| !self.users6.in_use(*ip) && unused6 != Some(*ip));
        let gone: Vec<IpAddr> = (unused.into_iter().chain(own).map(IpAddr::V4))
            .chain(unused6.into_iter().chain(own6).map(IpAddr::V6))
            .collect();
        for ip in gone {
            self.change(ip, false)?;
        }
        Ok(())
    }

    /// The peers really programmed: the table and the sets are rebuilt from
    /// them in one transaction (start-up, and every recheck: drift repair).
    /// `held6`: the `PublicIPv6`s `flannel-v6.<VNI>` holds entries for,
    /// also those no peer is known to own yet (after a restart, until the
    /// leases are programmed again), which stay accepted meanwhile.
    pub fn rebuild(&mut self, peers: &[Peer], held6: &[Ipv6Addr]) -> Result<(), GuardError> {
        let mut users = VtepUsers::default();
        let mut users6 = VtepUsers::default();
        for p in peers {
            users.set(p.subnet, p.public_ip);
            if let Some(p6) = p.v6.filter(|_| self.v6) {
                users6.set(p.subnet, p6.public_ip);
            }
        }
        self.users = users;
        self.users6 = users6;
        let held6 = held6.iter().filter(|_| self.v6).map(|ip| IpAddr::V6(*ip));
        let mut ips: Vec<IpAddr> = peers
            .iter()
            .flat_map(|p| self.ips_of(p))
            .chain(held6)
            .collect();
        ips.sort_unstable();
        ips.dedup();
        if let Some(b) = self.batch.as_mut() {
            b.changes.clear();
        }
        let r = (self.runner)(&rebuild_script(self.port, self.v6, &ips));
        self.stale = r.is_err();
        r
    }

    fn change(&mut self, ip: IpAddr, present: bool) -> Result<(), GuardError> {
        if let Some(b) = self.batch.as_mut() {
            b.changes.insert(ip, present);
            return Ok(());
        }
        self.apply(BTreeMap::from([(ip, present)]))
    }

    fn apply(&mut self, changes: BTreeMap<IpAddr, bool>) -> Result<(), GuardError> {
        let script = if self.stale {
            // The sets' content is unknown: load all of it. The users tables
            // are already up to date except for admitted, not yet committed IPs.
            let mut ips: Vec<IpAddr> = changes
                .iter()
                .filter(|(_, present)| **present)
                .map(|(ip, _)| *ip)
                .chain(self.users.ips().map(IpAddr::V4))
                .chain(self.users6.ips().map(IpAddr::V6))
                .collect();
            ips.sort_unstable();
            ips.dedup();
            rebuild_script(self.port, self.v6, &ips)
        } else if changes.len() > nft_elements::MAX_ELEMENTS {
            // A start-up's worth: one nft run loads it as fast.
            change_script(&changes)
        } else {
            match (self.elements)(&changes) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    if !self.elements_failed {
                        self.elements_failed = true;
                        log::info!(
                            "{FAMILY} {TABLE}: {e}; the change goes through nft -f - (said once)"
                        );
                    }
                    change_script(&changes)
                }
            }
        };
        let r = (self.runner)(&script);
        self.stale = r.is_err();
        r
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, net::Ipv4Addr};

    use ipnet::Ipv4Net;

    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    fn peer(subnet: &str, public_ip: &str) -> Peer {
        Peer {
            subnet: net(subnet),
            public_ip: ip(public_ip),
            vtep_mac: crate::flannel::mac::MacAddr([2, 0, 0, 0, 0, 1]),
            v6: None,
        }
    }

    /// `p` admitted and programmed, as the kernel datapath does it.
    fn programmed(g: &mut VtepGuard, p: &Peer) {
        g.admit(p).unwrap();
        g.commit(p).unwrap();
    }

    // The runner is a plain fn: scripts go to a per-thread log.
    thread_local! {
        static SCRIPTS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    }
    fn record(script: &str) -> Result<(), GuardError> {
        SCRIPTS.with(|s| s.borrow_mut().push(script.to_owned()));
        Ok(())
    }
    fn take() -> Vec<String> {
        SCRIPTS.with(|s| std::mem::take(&mut *s.borrow_mut()))
    }
    fn add(ip: &str) -> String {
        format!("add element inet overlay-vtep vteps {{ {ip} }}\n")
    }
    fn del(ip: &str) -> String {
        format!(
            "{}delete element inet overlay-vtep vteps {{ {ip} }}\n",
            add(ip)
        )
    }

    thread_local! {
        static ELEMENTS: RefCell<Vec<BTreeMap<IpAddr, bool>>> = const { RefCell::new(Vec::new()) };
    }
    fn elements_ok(changes: &BTreeMap<IpAddr, bool>) -> Result<(), ElementsError> {
        ELEMENTS.with(|e| e.borrow_mut().push(changes.clone()));
        Ok(())
    }

    #[test]
    fn a_small_change_goes_as_elements_and_a_failed_one_as_a_script() {
        let mut g = VtepGuard::with_runner(8472, true, record);
        g.elements = elements_ok;
        let mut p = peer("10.5.1.0/24", "192.168.1.1");
        p.v6 = Some(crate::flannel::lease::Peer6 {
            subnet: "fd10:0:0:1::/64".parse().unwrap(),
            public_ip: "fd98::1".parse().unwrap(),
            vtep_mac: p.vtep_mac,
        });
        programmed(&mut g, &p);
        g.release(&p).unwrap();
        assert_eq!(take(), Vec::<String>::new(), "no nft process");
        let v4: IpAddr = "192.168.1.1".parse().unwrap();
        let v6: IpAddr = "fd98::1".parse().unwrap();
        assert_eq!(
            ELEMENTS.with(|e| std::mem::take(&mut *e.borrow_mut())),
            vec![
                BTreeMap::from([(v4, true)]),
                BTreeMap::from([(v6, true)]),
                BTreeMap::from([(v4, false)]),
                BTreeMap::from([(v6, false)]),
            ]
        );
        // Refused over netlink: the same change as a script.
        g.elements = |_| Err(ElementsError::NoAnswer);
        programmed(&mut g, &peer("10.5.1.0/24", "192.168.1.1"));
        assert_eq!(take(), vec![add("192.168.1.1")]);
    }

    #[test]
    fn an_ip_enters_with_its_first_user_and_leaves_with_its_last() {
        let mut g = VtepGuard::with_runner(8472, false, record);
        // Two subnets of one node (or a vxlan and a direct peer) on one IP.
        programmed(&mut g, &peer("10.5.1.0/24", "192.168.1.1"));
        assert_eq!(take(), vec![add("192.168.1.1")]);
        programmed(&mut g, &peer("10.5.2.0/24", "192.168.1.1"));
        assert_eq!(
            take(),
            Vec::<String>::new(),
            "a second user changes nothing"
        );
        g.release(&peer("10.5.1.0/24", "192.168.1.1")).unwrap();
        assert_eq!(take(), Vec::<String>::new(), "one user is left");
        g.release(&peer("10.5.2.0/24", "192.168.1.1")).unwrap();
        assert_eq!(take(), vec![del("192.168.1.1")]);
        assert!(g.users().is_empty());
    }

    #[test]
    fn a_moved_peer_takes_its_old_ip_out_and_a_failed_one_leaves_nothing() {
        let mut g = VtepGuard::with_runner(8472, false, record);
        programmed(&mut g, &peer("10.5.1.0/24", "192.168.1.1"));
        take();
        // The node behind 10.5.1.0/24 now has another PublicIP.
        programmed(&mut g, &peer("10.5.1.0/24", "192.168.1.9"));
        assert_eq!(take(), vec![add("192.168.1.9"), del("192.168.1.1")]);
        // Programming a new peer failed after its IP was admitted.
        let failing = peer("10.5.7.0/24", "192.168.1.7");
        g.admit(&failing).unwrap();
        g.failed(&failing).unwrap();
        assert_eq!(take(), vec![add("192.168.1.7"), del("192.168.1.7")]);
        // A failure for an IP in use keeps it.
        g.failed(&peer("10.5.8.0/24", "192.168.1.9")).unwrap();
        assert_eq!(take(), Vec::<String>::new());
    }

    #[test]
    fn a_batch_is_one_run_whatever_its_size() {
        let mut g = VtepGuard::with_runner(8472, false, record);
        g.begin_batch();
        for i in 0..10_000u32 {
            let public = Ipv4Addr::from(0x0a40_0000 + i);
            let subnet = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24).unwrap();
            let p = Peer {
                subnet,
                public_ip: public,
                ..peer("10.0.0.0/24", "10.0.0.1")
            };
            programmed(&mut g, &p);
        }
        // Added and gone again within the batch: only the final state.
        let failing = peer("10.9.9.0/24", "192.168.9.9");
        g.admit(&failing).unwrap();
        g.failed(&failing).unwrap();
        assert!(take().is_empty(), "nothing runs before the batch ends");
        g.end_batch().unwrap();
        let scripts = take();
        assert_eq!(scripts.len(), 1);
        let lines: Vec<&str> = scripts[0].lines().collect();
        assert_eq!(lines.len(), 10 + 2, "10 lines of 1000 adds, one add+delete");
        assert!(scripts[0].contains("delete element inet overlay-vtep vteps { 192.168.9.9 }"));
        g.end_batch().unwrap();
        assert!(take().is_empty(), "an empty batch runs nothing");
    }

    #[test]
    fn a_rebuild_loads_the_table_and_exactly_the_programmed_ips() {
        let mut g = VtepGuard::with_runner(4789, false, record);
        g.rebuild(
            &[
                peer("10.5.1.0/24", "192.168.1.2"),
                peer("10.5.2.0/24", "192.168.1.1"),
                peer("10.5.3.0/24", "192.168.1.1"),
            ],
            &[],
        )
        .unwrap();
        let s = take().pop().unwrap();
        assert!(s.starts_with(&setup_script(4789, false)), "{s}");
        assert!(s.ends_with(
            "flush set inet overlay-vtep vteps\n\
             add element inet overlay-vtep vteps { 192.168.1.1, 192.168.1.2 }\n"
        ));
        assert!(g.users().in_use(ip("192.168.1.1")));
        g.release(&peer("10.5.2.0/24", "192.168.1.1")).unwrap();
        assert!(take().is_empty());
    }

    #[test]
    fn the_rules_match_our_port_only() {
        let s = setup_script(4789, false);
        assert!(s.contains(
            "add rule inet overlay-vtep input udp dport 4789 ip saddr != @vteps counter name \"unknown_vtep\" drop\n"
        ));
        assert!(s.contains("udp dport 4789 fib saddr . iif oif missing"));
        assert!(s.contains("flush chain inet overlay-vtep input\n"));
        assert!(!s.contains("flush set"), "set-up keeps the elements");
    }

    fn dual(subnet: &str, public_ip: &str, public_ipv6: &str) -> Peer {
        Peer {
            v6: Some(crate::flannel::lease::Peer6 {
                subnet: "fd10:0:0:5::/64".parse().unwrap(),
                public_ip: public_ipv6.parse().unwrap(),
                vtep_mac: crate::flannel::mac::MacAddr([2, 0, 0, 0, 0, 6]),
            }),
            ..peer(subnet, public_ip)
        }
    }

    #[test]
    fn a_dual_stack_node_checks_ipv6_senders_against_their_own_set() {
        let s = setup_script(8472, true);
        assert!(s.contains(
            "add set inet overlay-vtep vteps6 { type ipv6_addr; comment \"PublicIPv6s of the peers (one per VTEP)\"; }\n"
        ));
        assert!(s.contains(
            "add rule inet overlay-vtep input udp dport 8472 ip6 saddr != @vteps6 counter name \"unknown_vtep\" drop\n"
        ));
        // The reverse-path rule stays last, after both families' checks.
        assert!(s.ends_with("fib saddr . iif oif missing counter name \"spoofed_source\" drop\n"));
        assert!(!setup_script(8472, false).contains("vteps6"));

        let mut g = VtepGuard::with_runner(8472, true, record);
        programmed(&mut g, &dual("10.5.1.0/24", "192.168.1.1", "2001:db8::1"));
        assert_eq!(
            take(),
            vec![
                add("192.168.1.1"),
                "add element inet overlay-vtep vteps6 { 2001:db8::1 }\n".to_owned()
            ]
        );
        // The lease lost its IPv6 half (the node went IPv4-only).
        programmed(&mut g, &peer("10.5.1.0/24", "192.168.1.1"));
        assert_eq!(
            take(),
            vec![
                "add element inet overlay-vtep vteps6 { 2001:db8::1 }\n\
                 delete element inet overlay-vtep vteps6 { 2001:db8::1 }\n"
                    .to_owned()
            ]
        );
        programmed(&mut g, &dual("10.5.1.0/24", "192.168.1.1", "2001:db8::2"));
        take();
        g.release(&dual("10.5.1.0/24", "192.168.1.1", "2001:db8::2"))
            .unwrap();
        let gone = take().concat();
        assert!(gone.contains("delete element inet overlay-vtep vteps { 192.168.1.1 }"));
        assert!(gone.contains("delete element inet overlay-vtep vteps6 { 2001:db8::2 }"));

        // After a restart: the device still holds 2001:db8::3's entries,
        // whose lease is not programmed again yet; it stays accepted.
        g.rebuild(
            &[
                dual("10.5.1.0/24", "192.168.1.1", "2001:db8::1"),
                peer("10.5.2.0/24", "192.168.1.2"),
            ],
            &[
                "2001:db8::1".parse().unwrap(),
                "2001:db8::3".parse().unwrap(),
            ],
        )
        .unwrap();
        let s = take().pop().unwrap();
        assert!(
            s.ends_with(
                "flush set inet overlay-vtep vteps\n\
             flush set inet overlay-vtep vteps6\n\
             add element inet overlay-vtep vteps { 192.168.1.1, 192.168.1.2 }\n\
             add element inet overlay-vtep vteps6 { 2001:db8::1, 2001:db8::3 }\n"
            ),
            "{s}"
        );
    }

    #[test]
    fn an_ipv4_only_guard_ignores_the_peers_ipv6_side() {
        let mut g = VtepGuard::with_runner(8472, false, record);
        programmed(&mut g, &dual("10.5.1.0/24", "192.168.1.1", "2001:db8::1"));
        assert_eq!(take(), vec![add("192.168.1.1")]);
    }

    #[test]
    fn counters_are_read_from_nft_s_listing() {
        let listed = "table inet overlay-vtep {\n\tcounter unknown_vtep {\n\t\tpackets 12 bytes 1200\n\t}\n\n\
                      \tcounter spoofed_source {\n\t\tpackets 3 bytes 300\n\t}\n}\n";
        let c = parse_counters(listed);
        assert_eq!(c.get("unknown_vtep"), Some(&12));
        assert_eq!(c.get("spoofed_source"), Some(&3));
    }
}
