//! flanneld's iptables rules, the same chains and rules in the same order:
//! `--ip-masq` adds nat `FLANNEL-POSTRTG` (jumped to from POSTROUTING), and
//! `--iptables-forward-rules` (on by default) adds filter `FLANNEL-FWD`
//! (jumped to from FORWARD); the fast path adds mangle `FLANNEL-FASTPATH`.
//! With an `IPv6Network` flanneld adds the same chains to ip6tables, for
//! the IPv6 network and subnet (a [`Rule`]'s [`Family`] says which).
//! With `EnableNFTables` flanneld's rules are nft tables instead
//! ([`nft`]); the fast path's mangle rule stays in iptables.
//!
//! As current flanneld does, a table whose rules are missing or out of order
//! is repaired with one `iptables-restore --noflush --wait` ([`restore`]), so
//! our chain's content is replaced in one kernel transaction: FORWARD never
//! lacks the ACCEPTs while a repair runs. [`RuleKeeper`] runs the agent's
//! checks and repairs on a thread of its own, so a held xtables lock does
//! not stall the reconciler. Every run has a deadline, including those the
//! datapath's set-up makes where it runs (the fast path's mangle rule).

pub(crate) mod exec;
mod keeper;
pub mod mark_users;
pub mod nft;
pub mod restore;

use std::sync::Mutex;

use std::fmt;

use ipnet::{Ipv4Net, Ipv6Net};
use overlay_common::fastpath::DEFAULT_FAST_PATH_MARK;

pub use exec::IptablesError;
pub use keeper::{RuleKeeper, Wanted};
use restore::{Restore, TableState};

pub const MASQ_CHAIN: &str = "FLANNEL-POSTRTG";
pub const FORWARD_CHAIN: &str = "FLANNEL-FWD";
/// mangle chain of the fast path's approvals (see `datapath::fastpath`).
pub const FAST_PATH_CHAIN: &str = "FLANNEL-FASTPATH";
/// kube-proxy's mark: such packets are not masqueraded (double NAT).
pub const KUBE_PROXY_MARK: &str = "0x4000/0x4000";

/// Which of the kernel's tables a rule lives in: iptables' or ip6tables'.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    /// The binary that changes this family's rules.
    pub fn iptables(self) -> &'static str {
        match self {
            Family::Ipv4 => "iptables",
            Family::Ipv6 => "ip6tables",
        }
    }

    fn save(self) -> &'static str {
        match self {
            Family::Ipv4 => "iptables-save",
            Family::Ipv6 => "ip6tables-save",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::Ipv4 => "iptables-restore",
            Family::Ipv6 => "ip6tables-restore",
        }
    }

    /// The multicast range flanneld does not masquerade to.
    pub fn multicast(self) -> &'static str {
        match self {
            Family::Ipv4 => "224.0.0.0/4",
            Family::Ipv6 => "ff00::/8",
        }
    }
}

/// A network of one family: flanneld's rules are the same for both but
/// for the addresses, the binaries and the multicast range.
pub trait Net: Copy + fmt::Display + fmt::Debug + Eq + Send + Sync + 'static {
    const FAMILY: Family;
    /// The whole address space (`0.0.0.0/0`, `::/0`).
    const ANY: Self;
}

impl Net for Ipv4Net {
    const FAMILY: Family = Family::Ipv4;
    const ANY: Self = Ipv4Net::new_assert(std::net::Ipv4Addr::UNSPECIFIED, 0);
}

impl Net for Ipv6Net {
    const FAMILY: Family = Family::Ipv6;
    const ANY: Self = Ipv6Net::new_assert(std::net::Ipv6Addr::UNSPECIFIED, 0);
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub family: Family,
    pub table: &'static str,
    pub chain: &'static str,
    pub spec: Vec<String>,
}

impl Rule {
    fn new(family: Family, table: &'static str, chain: &'static str, spec: Vec<String>) -> Rule {
        Rule {
            family,
            table,
            chain,
            spec,
        }
    }
}

/// flanneld's `masqRules` (`masqIP6Rules` for an IPv6 network): the jump,
/// then RETURN for kube-proxy-marked packets and for traffic inside the
/// overlay, MASQUERADE for the rest (but to multicast).
pub fn masq_rules<N: Net>(network: N, subnet: N, random_fully: bool) -> Vec<Rule> {
    let family = N::FAMILY;
    let cluster = network.to_string();
    let pod = subnet.to_string();
    let c = ["-m", "comment", "--comment", "flanneld masq"];
    let with = |head: &[&str], tail: &[&str]| -> Vec<String> {
        head.iter()
            .chain(c.iter())
            .chain(tail.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let masq: &[&str] = if random_fully {
        &["-j", "MASQUERADE", "--random-fully"]
    } else {
        &["-j", "MASQUERADE"]
    };
    vec![
        Rule::new(family, "nat", "POSTROUTING", with(&[], &["-j", MASQ_CHAIN])),
        Rule::new(
            family,
            "nat",
            MASQ_CHAIN,
            with(
                &["-m", "mark", "--mark", KUBE_PROXY_MARK],
                &["-j", "RETURN"],
            ),
        ),
        Rule::new(
            family,
            "nat",
            MASQ_CHAIN,
            with(&["-s", &pod, "-d", &cluster], &["-j", "RETURN"]),
        ),
        Rule::new(
            family,
            "nat",
            MASQ_CHAIN,
            with(&["-s", &cluster, "-d", &pod], &["-j", "RETURN"]),
        ),
        Rule::new(
            family,
            "nat",
            MASQ_CHAIN,
            with(&["!", "-s", &cluster, "-d", &pod], &["-j", "RETURN"]),
        ),
        Rule::new(
            family,
            "nat",
            MASQ_CHAIN,
            with(&["-s", &cluster, "!", "-d", family.multicast()], masq),
        ),
        Rule::new(
            family,
            "nat",
            MASQ_CHAIN,
            with(&["!", "-s", &cluster, "-d", &cluster], masq),
        ),
    ]
}

/// flanneld's `forwardRules` (the same for IPv6).
pub fn forward_rules<N: Net>(network: N) -> Vec<Rule> {
    let family = N::FAMILY;
    let n = network.to_string();
    let c = ["-m", "comment", "--comment", "flanneld forward"];
    let r = |head: &[&str], tail: &[&str]| -> Vec<String> {
        head.iter()
            .chain(c.iter())
            .chain(tail.iter())
            .map(|s| s.to_string())
            .collect()
    };
    vec![
        Rule {
            family,
            table: "filter",
            chain: "FORWARD",
            spec: r(&[], &["-j", FORWARD_CHAIN]),
        },
        Rule {
            family,
            table: "filter",
            chain: FORWARD_CHAIN,
            spec: r(&["-s", &n], &["-j", "ACCEPT"]),
        },
        Rule {
            family,
            table: "filter",
            chain: FORWARD_CHAIN,
            spec: r(&["-d", &n], &["-j", "ACCEPT"]),
        },
    ]
}

/// The fast path's approvals: mangle `FLANNEL-FASTPATH`, jumped to from
/// POSTROUTING (after the filter table's FORWARD and OUTPUT verdicts, before
/// NAT), first clears the `mark` bit (`--fast-path-mark`) whoever set it
/// before, then sets it on packets from and to our pods whose conntrack
/// entry is ESTABLISHED and not NATed. The programs turn such marked packets
/// into approvals and clear the bit. The same chain in ip6tables, for the
/// IPv6 pod subnet of a dual-stack node.
pub fn fast_path_rules<N: Net>(subnet: N, mark: u32) -> Vec<Rule> {
    let family = N::FAMILY;
    let pod = subnet.to_string();
    let set = format!("{mark:#x}/{mark:#x}");
    let clear = format!("0x0/{mark:#x}");
    let c = ["-m", "comment", "--comment", "flanneld fast path"];
    let approve = |dir: &str| -> Vec<String> {
        [dir, &pod]
            .into_iter()
            .chain([
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED",
                "-m",
                "conntrack",
                "!",
                "--ctstate",
                "SNAT,DNAT",
            ])
            .chain(c)
            .chain(["-j", "MARK", "--set-xmark", &set])
            .map(str::to_owned)
            .collect()
    };
    vec![
        Rule::new(
            family,
            "mangle",
            "POSTROUTING",
            c.iter()
                .copied()
                .chain(["-j", FAST_PATH_CHAIN])
                .map(str::to_owned)
                .collect(),
        ),
        Rule::new(
            family,
            "mangle",
            FAST_PATH_CHAIN,
            c.iter()
                .copied()
                .chain(["-j", "MARK", "--set-xmark", &clear])
                .map(str::to_owned)
                .collect(),
        ),
        Rule::new(family, "mangle", FAST_PATH_CHAIN, approve("-s")),
        Rule::new(family, "mangle", FAST_PATH_CHAIN, approve("-d")),
    ]
}

/// Whether `family`'s iptables supports `MASQUERADE --random-fully` (1.6.2
/// and later), asked of `iptables` or `ip6tables` as flanneld asks each.
pub fn supports_random_fully(family: Family) -> bool {
    exec::run(family.iptables(), &["-j", "MASQUERADE", "--help"], None)
        .is_ok_and(|help| help.contains("--random-fully"))
}

/// Makes every table of `rules` hold them: our chains exactly these rules in
/// this order, the jumps from the built-in chains present. A table that
/// does not is brought there with one `iptables-restore --noflush` (or
/// `ip6tables-restore` for IPv6 rules), which replaces our chain's content
/// in one transaction (see [`restore`]). Returns what was changed, empty
/// when everything was in place.
pub fn ensure(rules: &[Rule]) -> Result<Vec<String>, IptablesError> {
    per_table(rules, restore::repair)
}

/// Removes every copy of the jumps among `rules` and our chains they name
/// (whatever those chains hold), one transaction per table; what is not
/// there is fine. Returns what was removed.
pub fn remove(rules: &[Rule]) -> Result<Vec<String>, IptablesError> {
    per_table(rules, restore::removal)
}

/// Removes the jumps to our chains and the chains, whatever Network they
/// were made for (the jumps carry no address), in iptables and ip6tables,
/// and the nft tables of nftables mode. Returns what it removed.
pub fn remove_all() -> Result<Vec<String>, IptablesError> {
    let mut removed = remove_flanneld_s()?;
    // Whatever bit the chain marks: removal takes the jump and the chain.
    removed.extend(remove(&fast_path_rules(ANY, DEFAULT_FAST_PATH_MARK))?);
    removed.extend(remove(&fast_path_rules(
        Ipv6Net::ANY,
        DEFAULT_FAST_PATH_MARK,
    ))?);
    for family in [Family::Ipv4, Family::Ipv6] {
        if nft::remove(family)? {
            removed.push(nft::describe(family));
        }
    }
    Ok(removed)
}

/// Removes flanneld's iptables and ip6tables chains and the jumps to them
/// (not the fast path's), whatever Network they were made for. A host
/// without IPv6 (or without ip6tables) has no ip6tables chains.
pub fn remove_flanneld_s() -> Result<Vec<String>, IptablesError> {
    let mut removed = remove(&flanneld_s::<Ipv4Net>())?;
    if std::path::Path::new("/proc/sys/net/ipv6").exists() {
        match remove(&flanneld_s::<Ipv6Net>()) {
            Ok(r) => removed.extend(r),
            Err(IptablesError::Spawn { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// All of flanneld's rules of one family, for removal.
fn flanneld_s<N: Net>() -> Vec<Rule> {
    let mut rules = masq_rules(N::ANY, N::ANY, false);
    rules.extend(forward_rules(N::ANY));
    rules
}

/// Any network: what [`remove`] matches does not depend on it.
const ANY: Ipv4Net = <Ipv4Net as Net>::ANY;

/// Our own runs take turns: a check and the restore it leads to must not
/// interleave with another thread's (the agent's keeper and the datapath's
/// set-up both touch mangle).
static TURN: Mutex<()> = Mutex::new(());

/// For each table of `rules` in turn (a family's table, in order of first
/// appearance): reads it, asks `plan` what to restore, restores that.
fn per_table(
    rules: &[Rule],
    plan: fn(Family, &str, &[Rule], &TableState) -> Option<Restore>,
) -> Result<Vec<String>, IptablesError> {
    let mut tables: Vec<(Family, &str)> = Vec::new();
    for r in rules {
        if !tables.contains(&(r.family, r.table)) {
            tables.push((r.family, r.table));
        }
    }
    let _turn = TURN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut changes = Vec::new();
    for (family, table) in tables {
        let saved = exec::run(family.save(), &["-t", table], None)?;
        let Some(r) = plan(family, table, rules, &TableState::parse(&saved, table)) else {
            continue;
        };
        let wait = format!("--wait={}", exec::LOCK_WAIT.as_secs());
        exec::run(family.restore(), &["--noflush", &wait], Some(&r.input))?;
        changes.extend(r.changes);
    }
    Ok(changes)
}

fn is_ours(chain: &str) -> bool {
    chain == MASQ_CHAIN || chain == FORWARD_CHAIN || chain == FAST_PATH_CHAIN
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(r: &Rule) -> String {
        format!("-t {} -A {} {}", r.table, r.chain, r.spec.join(" "))
    }

    #[test]
    fn masq_rules_are_flanneld_s() {
        let rules = masq_rules::<Ipv4Net>(
            "10.0.0.0/16".parse().unwrap(),
            "10.0.13.0/24".parse().unwrap(),
            true,
        );
        let got: Vec<String> = rules.iter().map(line).collect();
        assert_eq!(
            got,
            vec![
                "-t nat -A POSTROUTING -m comment --comment flanneld masq -j FLANNEL-POSTRTG",
                "-t nat -A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment flanneld masq -j RETURN",
                "-t nat -A FLANNEL-POSTRTG -s 10.0.13.0/24 -d 10.0.0.0/16 -m comment --comment flanneld masq -j RETURN",
                "-t nat -A FLANNEL-POSTRTG -s 10.0.0.0/16 -d 10.0.13.0/24 -m comment --comment flanneld masq -j RETURN",
                "-t nat -A FLANNEL-POSTRTG ! -s 10.0.0.0/16 -d 10.0.13.0/24 -m comment --comment flanneld masq -j RETURN",
                "-t nat -A FLANNEL-POSTRTG -s 10.0.0.0/16 ! -d 224.0.0.0/4 -m comment --comment flanneld masq -j MASQUERADE --random-fully",
                "-t nat -A FLANNEL-POSTRTG ! -s 10.0.0.0/16 -d 10.0.0.0/16 -m comment --comment flanneld masq -j MASQUERADE --random-fully",
            ]
        );
        let plain = masq_rules::<Ipv4Net>(
            "10.0.0.0/16".parse().unwrap(),
            "10.0.13.0/24".parse().unwrap(),
            false,
        );
        assert!(
            plain
                .last()
                .unwrap()
                .spec
                .ends_with(&["MASQUERADE".to_owned()])
        );
    }

    #[test]
    fn fast_path_rules_clear_the_bit_then_mark_established_unnated_pod_traffic() {
        let got: Vec<String> = fast_path_rules::<Ipv4Net>("10.0.13.0/24".parse().unwrap(), 0x1000)
            .iter()
            .map(line)
            .collect();
        assert_eq!(
            got,
            vec![
                "-t mangle -A POSTROUTING -m comment --comment flanneld fast path -j FLANNEL-FASTPATH",
                "-t mangle -A FLANNEL-FASTPATH -m comment --comment flanneld fast path -j MARK --set-xmark 0x0/0x1000",
                "-t mangle -A FLANNEL-FASTPATH -s 10.0.13.0/24 -m conntrack --ctstate ESTABLISHED -m conntrack ! --ctstate SNAT,DNAT -m comment --comment flanneld fast path -j MARK --set-xmark 0x1000/0x1000",
                "-t mangle -A FLANNEL-FASTPATH -d 10.0.13.0/24 -m conntrack --ctstate ESTABLISHED -m conntrack ! --ctstate SNAT,DNAT -m comment --comment flanneld fast path -j MARK --set-xmark 0x1000/0x1000",
            ]
        );
    }

    #[test]
    fn the_ipv6_fast_path_rules_are_the_same_chain_in_ip6tables() {
        let v6 = fast_path_rules::<Ipv6Net>("fd10:0:0:5::/64".parse().unwrap(), 0x1000);
        assert!(v6.iter().all(|r| r.family == Family::Ipv6));
        let got: Vec<String> = v6.iter().map(line).collect();
        assert_eq!(
            got[3],
            "-t mangle -A FLANNEL-FASTPATH -d fd10:0:0:5::/64 -m conntrack --ctstate ESTABLISHED -m conntrack ! --ctstate SNAT,DNAT -m comment --comment flanneld fast path -j MARK --set-xmark 0x1000/0x1000"
        );
        let v4: Vec<String> = fast_path_rules::<Ipv4Net>("10.0.13.0/24".parse().unwrap(), 0x1000)
            .iter()
            .map(line)
            .collect();
        assert_eq!(got[..2], v4[..2]);
    }

    #[test]
    fn forward_rules_are_flanneld_s() {
        let got: Vec<String> = forward_rules::<Ipv4Net>("10.0.0.0/16".parse().unwrap())
            .iter()
            .map(line)
            .collect();
        assert_eq!(
            got,
            vec![
                "-t filter -A FORWARD -m comment --comment flanneld forward -j FLANNEL-FWD",
                "-t filter -A FLANNEL-FWD -s 10.0.0.0/16 -m comment --comment flanneld forward -j ACCEPT",
                "-t filter -A FLANNEL-FWD -d 10.0.0.0/16 -m comment --comment flanneld forward -j ACCEPT",
            ]
        );
    }

    const NET6: &str = "fd00:10::/48";
    const POD6: &str = "fd00:10:0:13::/64";

    /// B.5 (flanneld's `masqIP6Rules`, e2e golden) with N = [`NET6`] and
    /// S = [`POD6`], as `ip6tables -t nat -S` prints it.
    const MASQ6_GOLDEN: &str = "\
-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN
-A FLANNEL-POSTRTG -s fd00:10:0:13::/64 -d fd00:10::/48 -m comment --comment \"flanneld masq\" -j RETURN
-A FLANNEL-POSTRTG -s fd00:10::/48 -d fd00:10:0:13::/64 -m comment --comment \"flanneld masq\" -j RETURN
-A FLANNEL-POSTRTG ! -s fd00:10::/48 -d fd00:10:0:13::/64 -m comment --comment \"flanneld masq\" -j RETURN
-A FLANNEL-POSTRTG -s fd00:10::/48 ! -d ff00::/8 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s fd00:10::/48 -d fd00:10::/48 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully
";
    const FORWARD6_GOLDEN: &str = "\
-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD
-A FLANNEL-FWD -s fd00:10::/48 -m comment --comment \"flanneld forward\" -j ACCEPT
-A FLANNEL-FWD -d fd00:10::/48 -m comment --comment \"flanneld forward\" -j ACCEPT
";

    /// A rule as `ip(6)tables -S` prints it (the comment quoted).
    fn saved(r: &Rule) -> String {
        let spec: Vec<String> = r
            .spec
            .iter()
            .map(|w| {
                if w.contains(' ') {
                    format!("\"{w}\"")
                } else {
                    w.clone()
                }
            })
            .collect();
        format!("-A {} {}\n", r.chain, spec.join(" "))
    }

    #[test]
    fn ip6tables_rules_are_flanneld_s_golden_ones() {
        let masq = masq_rules::<Ipv6Net>(NET6.parse().unwrap(), POD6.parse().unwrap(), true);
        assert!(
            masq.iter()
                .all(|r| r.family == Family::Ipv6 && r.table == "nat")
        );
        assert_eq!(masq.iter().map(saved).collect::<String>(), MASQ6_GOLDEN);
        let fwd = forward_rules::<Ipv6Net>(NET6.parse().unwrap());
        assert!(
            fwd.iter()
                .all(|r| r.family == Family::Ipv6 && r.table == "filter")
        );
        assert_eq!(fwd.iter().map(saved).collect::<String>(), FORWARD6_GOLDEN);
        // Without --random-fully support: plain MASQUERADE, as flanneld.
        let plain = masq_rules::<Ipv6Net>(NET6.parse().unwrap(), POD6.parse().unwrap(), false);
        assert_eq!(
            plain.iter().map(saved).collect::<String>(),
            MASQ6_GOLDEN.replace(" --random-fully", "")
        );
    }

    #[test]
    fn the_v4_rules_keep_their_family_and_multicast_range() {
        let v4 = masq_rules::<Ipv4Net>(
            "10.0.0.0/16".parse().unwrap(),
            "10.0.13.0/24".parse().unwrap(),
            true,
        );
        assert!(v4.iter().all(|r| r.family == Family::Ipv4));
        assert!(v4[5].spec.contains(&"224.0.0.0/4".to_owned()));
        assert!(
            fast_path_rules::<Ipv4Net>("10.0.13.0/24".parse().unwrap(), 0x1000)
                .iter()
                .all(|r| r.family == Family::Ipv4)
        );
        assert_eq!(Family::Ipv6.iptables(), "ip6tables");
        assert_eq!(Family::Ipv6.save(), "ip6tables-save");
        assert_eq!(Family::Ipv6.restore(), "ip6tables-restore");
    }

    #[test]
    fn removal_covers_both_families_whatever_the_network() {
        let v6 = flanneld_s::<Ipv6Net>();
        assert_eq!(v6.len(), 10);
        assert!(v6.iter().all(|r| r.family == Family::Ipv6));
        // The jumps removal matches carry no address.
        let jumps: Vec<String> = v6.iter().filter(|r| !is_ours(r.chain)).map(saved).collect();
        assert_eq!(
            jumps,
            [
                "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n",
                "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n",
            ]
        );
    }
}
