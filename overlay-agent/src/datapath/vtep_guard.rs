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
//!     chain input {
//!         type filter hook input priority raw; policy accept;
//!         udp dport 8472 ip saddr != @vteps counter name "unknown_vtep" drop
//!         udp dport 8472 fib saddr . iif oif missing counter name "spoofed_source" drop
//!     }
//! }
//! ```
//!
//! The second rule is a reverse-path check for our port only: a pod (which
//! has CAP_NET_RAW by default) or a host on another segment can put a known
//! VTEP's address in the source; the route back to that address is not
//! through the interface the datagram came in on, so it is dropped.
//!
//! The set holds one element per VTEP public IP (counted by [`VtepUsers`]:
//! added with its first peer subnet, deleted with its last), so a lookup is
//! one hash probe however many peers there are. Changes go through `nft -f -`
//! (one kernel transaction per run); a batch of peer changes (start-up, a
//! re-list) is one run whatever its size, see [`VtepGuard::begin_batch`].

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;

use super::{Peer, vtep_users::VtepUsers};
use crate::ipmasq::exec::{self, IptablesError};

/// `inet`: the table is independent of iptables (legacy or nft flavour) and of
/// flanneld's `ip flannel-ipv4`.
pub const FAMILY: &str = "inet";
pub const TABLE: &str = "overlay-vtep";
pub const SET: &str = "vteps";
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
pub fn setup_script(port: u16) -> String {
    let t = format!("{FAMILY} {TABLE}");
    format!(
        "add table {t} {{ comment \"overlay agent: VXLAN to port {port} only from known VTEPs\"; }}\n\
         add counter {t} {COUNTER_UNKNOWN}\n\
         add counter {t} {COUNTER_SPOOFED}\n\
         add set {t} {SET} {{ type ipv4_addr; comment \"PublicIPs of the peers (one per VTEP)\"; }}\n\
         add chain {t} {CHAIN} {{ type filter hook input priority raw; policy accept; }}\n\
         flush chain {t} {CHAIN}\n\
         add rule {t} {CHAIN} udp dport {port} ip saddr != @{SET} counter name \"{COUNTER_UNKNOWN}\" drop\n\
         add rule {t} {CHAIN} udp dport {port} fib saddr . iif oif missing counter name \"{COUNTER_SPOOFED}\" drop\n"
    )
}

/// Removes the table, there or not.
pub fn removal_script() -> String {
    format!("table {FAMILY} {TABLE} {{}}\ndelete table {FAMILY} {TABLE}\n")
}

/// Puts `ips` into the set or takes them out. A deletion is preceded by an
/// add of the same element: nft refuses to delete what is not there, and
/// both run in one transaction, so the result is "absent" either way.
pub fn change_script(changes: &BTreeMap<Ipv4Addr, bool>) -> String {
    let mut s = String::new();
    let (adds, dels): (Vec<_>, Vec<_>) = changes.iter().partition(|(_, present)| **present);
    let adds: Vec<Ipv4Addr> = adds.into_iter().map(|(ip, _)| *ip).collect();
    let dels: Vec<Ipv4Addr> = dels.into_iter().map(|(ip, _)| *ip).collect();
    push_elements(&mut s, "add", &adds);
    push_elements(&mut s, "add", &dels);
    push_elements(&mut s, "delete", &dels);
    s
}

/// The whole table with exactly `ips` in the set, in one transaction: the
/// drift repair (also re-creates a table or chain someone deleted).
pub fn rebuild_script(port: u16, ips: &[Ipv4Addr]) -> String {
    let mut s = setup_script(port);
    let _ = writeln!(s, "flush set {FAMILY} {TABLE} {SET}");
    push_elements(&mut s, "add", ips);
    s
}

fn push_elements(s: &mut String, verb: &str, ips: &[Ipv4Addr]) {
    for chunk in ips.chunks(ELEMENTS_PER_LINE) {
        let list = chunk
            .iter()
            .map(Ipv4Addr::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(s, "{verb} element {FAMILY} {TABLE} {SET} {{ {list} }}");
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
    changes: BTreeMap<Ipv4Addr, bool>,
}

/// The set's keeper: which peer subnets use each VTEP IP, and the set in
/// step with it.
#[derive(Debug)]
pub struct VtepGuard {
    port: u16,
    users: VtepUsers,
    batch: Option<Batch>,
    /// A change failed to load: the next change rebuilds the whole set
    /// instead of trusting it (the drift repair would too).
    stale: bool,
    /// How to run a script (nft; tests record instead).
    runner: fn(&str) -> Result<(), GuardError>,
}

fn run_nft(script: &str) -> Result<(), GuardError> {
    load(script, "update")
}

impl VtepGuard {
    /// Installs the table (keeping the set's elements if it was there).
    pub fn install(port: u16) -> Result<Self, GuardError> {
        load(&setup_script(port), "install").or_else(|e| match e {
            // A table of ours with another layout (another version, a set of
            // another type): start again from nothing, in one transaction.
            GuardError::Nft { .. } => load(
                &format!("{}{}", removal_script(), setup_script(port)),
                "re-create",
            ),
            e => Err(e),
        })?;
        Ok(Self::with_runner(port, run_nft))
    }

    fn with_runner(port: u16, runner: fn(&str) -> Result<(), GuardError>) -> Self {
        VtepGuard {
            port,
            users: VtepUsers::default(),
            batch: None,
            stale: false,
            runner,
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

    /// Before `ip` is programmed for a peer: VXLAN from it is accepted by
    /// the time we send to it.
    pub fn admit(&mut self, ip: Ipv4Addr) -> Result<(), GuardError> {
        if self.users.in_use(ip) {
            return Ok(());
        }
        self.change(ip, true)
    }

    /// `subnet`'s peer is programmed with `ip`: counted; the IP it used
    /// before leaves the set if no peer uses it any more.
    pub fn commit(&mut self, subnet: Ipv4Net, ip: Ipv4Addr) -> Result<(), GuardError> {
        match self.users.set(subnet, ip) {
            Some(unused) => self.change(unused, false),
            None => Ok(()),
        }
    }

    /// Programming a peer with `ip` failed after [`VtepGuard::admit`]:
    /// out again unless a programmed peer uses it.
    pub fn failed(&mut self, ip: Ipv4Addr) -> Result<(), GuardError> {
        if self.users.in_use(ip) {
            return Ok(());
        }
        self.change(ip, false)
    }

    /// [`VtepGuard::commit`] and [`VtepGuard::failed`] for a batch of peers
    /// admitted together: every programmed peer is counted first, and only
    /// then do the IPs no peer uses any more leave the set, so that one
    /// peer's old or failed IP that another peer of the batch now uses
    /// stays in.
    pub fn settle(
        &mut self,
        programmed: &[(Ipv4Net, Ipv4Addr)],
        failed: &[Ipv4Addr],
    ) -> Result<(), GuardError> {
        let mut out: Vec<Ipv4Addr> = programmed
            .iter()
            .filter_map(|&(subnet, ip)| self.users.set(subnet, ip))
            .collect();
        out.extend_from_slice(failed);
        out.sort_unstable();
        out.dedup();
        for ip in out {
            if !self.users.in_use(ip) {
                self.change(ip, false)?;
            }
        }
        Ok(())
    }

    /// `peer` is gone: its IP leaves the set with its last user (also one
    /// the table never counted, e.g. left by an earlier failure).
    pub fn release(&mut self, peer: &Peer) -> Result<(), GuardError> {
        let unused = self.users.remove(peer.subnet);
        let own = Some(peer.public_ip).filter(|ip| !self.users.in_use(*ip) && unused != Some(*ip));
        for ip in unused.into_iter().chain(own) {
            self.change(ip, false)?;
        }
        Ok(())
    }

    /// The peers really programmed: the table and the set are rebuilt from
    /// them in one transaction (start-up, and every recheck: drift repair).
    pub fn rebuild(&mut self, peers: &[Peer]) -> Result<(), GuardError> {
        let mut users = VtepUsers::default();
        for p in peers {
            users.set(p.subnet, p.public_ip);
        }
        self.users = users;
        let mut ips: Vec<Ipv4Addr> = peers.iter().map(|p| p.public_ip).collect();
        ips.sort_unstable();
        ips.dedup();
        if let Some(b) = self.batch.as_mut() {
            b.changes.clear();
        }
        let r = (self.runner)(&rebuild_script(self.port, &ips));
        self.stale = r.is_err();
        r
    }

    fn change(&mut self, ip: Ipv4Addr, present: bool) -> Result<(), GuardError> {
        if let Some(b) = self.batch.as_mut() {
            b.changes.insert(ip, present);
            return Ok(());
        }
        self.apply(BTreeMap::from([(ip, present)]))
    }

    fn apply(&mut self, changes: BTreeMap<Ipv4Addr, bool>) -> Result<(), GuardError> {
        let script = if self.stale {
            // The set's content is unknown: load all of it. The users table
            // is already up to date except for admitted, not yet committed IPs.
            let mut ips: Vec<Ipv4Addr> = changes
                .iter()
                .filter(|(_, present)| **present)
                .map(|(ip, _)| *ip)
                .chain(self.users.ips())
                .collect();
            ips.sort_unstable();
            ips.dedup();
            rebuild_script(self.port, &ips)
        } else {
            change_script(&changes)
        };
        let r = (self.runner)(&script);
        self.stale = r.is_err();
        r
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

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

    #[test]
    fn an_ip_enters_with_its_first_user_and_leaves_with_its_last() {
        let mut g = VtepGuard::with_runner(8472, record);
        // Two subnets of one node (or a vxlan and a direct peer) on one IP.
        g.admit(ip("192.168.1.1")).unwrap();
        g.commit(net("10.5.1.0/24"), ip("192.168.1.1")).unwrap();
        assert_eq!(take(), vec![add("192.168.1.1")]);
        g.admit(ip("192.168.1.1")).unwrap();
        g.commit(net("10.5.2.0/24"), ip("192.168.1.1")).unwrap();
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
        let mut g = VtepGuard::with_runner(8472, record);
        g.admit(ip("192.168.1.1")).unwrap();
        g.commit(net("10.5.1.0/24"), ip("192.168.1.1")).unwrap();
        take();
        // The node behind 10.5.1.0/24 now has another PublicIP.
        g.admit(ip("192.168.1.9")).unwrap();
        g.commit(net("10.5.1.0/24"), ip("192.168.1.9")).unwrap();
        assert_eq!(take(), vec![add("192.168.1.9"), del("192.168.1.1")]);
        // Programming a new peer failed after its IP was admitted.
        g.admit(ip("192.168.1.7")).unwrap();
        g.failed(ip("192.168.1.7")).unwrap();
        assert_eq!(take(), vec![add("192.168.1.7"), del("192.168.1.7")]);
        // A failure for an IP in use keeps it.
        g.failed(ip("192.168.1.9")).unwrap();
        assert_eq!(take(), Vec::<String>::new());
    }

    #[test]
    fn a_batch_is_one_run_whatever_its_size() {
        let mut g = VtepGuard::with_runner(8472, record);
        g.begin_batch();
        for i in 0..10_000u32 {
            let public = Ipv4Addr::from(0x0a40_0000 + i);
            let subnet = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24).unwrap();
            g.admit(public).unwrap();
            g.commit(subnet, public).unwrap();
        }
        // Added and gone again within the batch: only the final state.
        g.admit(ip("192.168.9.9")).unwrap();
        g.failed(ip("192.168.9.9")).unwrap();
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
        let mut g = VtepGuard::with_runner(4789, record);
        g.rebuild(&[
            peer("10.5.1.0/24", "192.168.1.2"),
            peer("10.5.2.0/24", "192.168.1.1"),
            peer("10.5.3.0/24", "192.168.1.1"),
        ])
        .unwrap();
        let s = take().pop().unwrap();
        assert!(s.starts_with(&setup_script(4789)), "{s}");
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
        let s = setup_script(4789);
        assert!(s.contains(
            "add rule inet overlay-vtep input udp dport 4789 ip saddr != @vteps counter name \"unknown_vtep\" drop\n"
        ));
        assert!(s.contains("udp dport 4789 fib saddr . iif oif missing"));
        assert!(s.contains("flush chain inet overlay-vtep input\n"));
        assert!(!s.contains("flush set"), "set-up keeps the elements");
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
