//! flanneld's iptables rules, the same chains and rules in the same order:
//! `--ip-masq` adds nat `FLANNEL-POSTRTG` (jumped to from POSTROUTING), and
//! `--iptables-forward-rules` (on by default) adds filter `FLANNEL-FWD`
//! (jumped to from FORWARD); the fast path adds mangle `FLANNEL-FASTPATH`.
//! With `EnableNFTables` flanneld's rules are an nft table instead
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

use ipnet::Ipv4Net;
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

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub table: &'static str,
    pub chain: &'static str,
    pub spec: Vec<String>,
}

impl Rule {
    fn new(table: &'static str, chain: &'static str, spec: Vec<String>) -> Rule {
        Rule { table, chain, spec }
    }
}

/// flanneld's `masqRules`: the jump, then RETURN for kube-proxy-marked
/// packets and for traffic inside the overlay, MASQUERADE for the rest.
pub fn masq_rules(network: Ipv4Net, subnet: Ipv4Net, random_fully: bool) -> Vec<Rule> {
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
        Rule::new("nat", "POSTROUTING", with(&[], &["-j", MASQ_CHAIN])),
        Rule::new(
            "nat",
            MASQ_CHAIN,
            with(
                &["-m", "mark", "--mark", KUBE_PROXY_MARK],
                &["-j", "RETURN"],
            ),
        ),
        Rule::new(
            "nat",
            MASQ_CHAIN,
            with(&["-s", &pod, "-d", &cluster], &["-j", "RETURN"]),
        ),
        Rule::new(
            "nat",
            MASQ_CHAIN,
            with(&["-s", &cluster, "-d", &pod], &["-j", "RETURN"]),
        ),
        Rule::new(
            "nat",
            MASQ_CHAIN,
            with(&["!", "-s", &cluster, "-d", &pod], &["-j", "RETURN"]),
        ),
        Rule::new(
            "nat",
            MASQ_CHAIN,
            with(&["-s", &cluster, "!", "-d", "224.0.0.0/4"], masq),
        ),
        Rule::new(
            "nat",
            MASQ_CHAIN,
            with(&["!", "-s", &cluster, "-d", &cluster], masq),
        ),
    ]
}

/// flanneld's `forwardRules`.
pub fn forward_rules(network: Ipv4Net) -> Vec<Rule> {
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
            table: "filter",
            chain: "FORWARD",
            spec: r(&[], &["-j", FORWARD_CHAIN]),
        },
        Rule {
            table: "filter",
            chain: FORWARD_CHAIN,
            spec: r(&["-s", &n], &["-j", "ACCEPT"]),
        },
        Rule {
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
/// into approvals and clear the bit.
pub fn fast_path_rules(subnet: Ipv4Net, mark: u32) -> Vec<Rule> {
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
            "mangle",
            "POSTROUTING",
            c.iter()
                .copied()
                .chain(["-j", FAST_PATH_CHAIN])
                .map(str::to_owned)
                .collect(),
        ),
        Rule::new(
            "mangle",
            FAST_PATH_CHAIN,
            c.iter()
                .copied()
                .chain(["-j", "MARK", "--set-xmark", &clear])
                .map(str::to_owned)
                .collect(),
        ),
        Rule::new("mangle", FAST_PATH_CHAIN, approve("-s")),
        Rule::new("mangle", FAST_PATH_CHAIN, approve("-d")),
    ]
}

/// Whether iptables supports `MASQUERADE --random-fully` (1.6.2 and later).
pub fn supports_random_fully() -> bool {
    exec::run("iptables", &["-j", "MASQUERADE", "--help"], None)
        .is_ok_and(|help| help.contains("--random-fully"))
}

/// Makes every table of `rules` hold them: our chains exactly these rules in
/// this order, the jumps from the built-in chains present. A table that
/// does not is brought there with one `iptables-restore --noflush`, which
/// replaces our chain's content in one transaction (see [`restore`]).
/// Returns what was changed, empty when everything was in place.
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
/// were made for (the jumps carry no address), and the nft table of
/// nftables mode. Returns what it removed.
pub fn remove_all() -> Result<Vec<String>, IptablesError> {
    let mut removed = remove_flanneld_s()?;
    // Whatever bit the chain marks: removal takes the jump and the chain.
    removed.extend(remove(&fast_path_rules(ANY, DEFAULT_FAST_PATH_MARK))?);
    if nft::remove()? {
        removed.push(format!("nft table ip {}", nft::TABLE));
    }
    Ok(removed)
}

/// Removes flanneld's iptables chains and the jumps to them (not the fast
/// path's), whatever Network they were made for.
pub fn remove_flanneld_s() -> Result<Vec<String>, IptablesError> {
    let mut rules = masq_rules(ANY, ANY, false);
    rules.extend(forward_rules(ANY));
    remove(&rules)
}

/// Any network: what [`remove`] matches does not depend on it.
const ANY: Ipv4Net = Ipv4Net::new_assert(std::net::Ipv4Addr::UNSPECIFIED, 0);

/// Our own runs take turns: a check and the restore it leads to must not
/// interleave with another thread's (the agent's keeper and the datapath's
/// set-up both touch mangle).
static TURN: Mutex<()> = Mutex::new(());

/// For each table of `rules` in turn: reads it, asks `plan` what to
/// restore, restores that.
fn per_table(
    rules: &[Rule],
    plan: fn(&str, &[Rule], &TableState) -> Option<Restore>,
) -> Result<Vec<String>, IptablesError> {
    let mut tables: Vec<&str> = Vec::new();
    for r in rules {
        if !tables.contains(&r.table) {
            tables.push(r.table);
        }
    }
    let _turn = TURN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut changes = Vec::new();
    for table in tables {
        let saved = exec::run("iptables-save", &["-t", table], None)?;
        let Some(r) = plan(table, rules, &TableState::parse(&saved, table)) else {
            continue;
        };
        let wait = format!("--wait={}", exec::LOCK_WAIT.as_secs());
        exec::run("iptables-restore", &["--noflush", &wait], Some(&r.input))?;
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
        let rules = masq_rules(
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
        let plain = masq_rules(
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
        let got: Vec<String> = fast_path_rules("10.0.13.0/24".parse().unwrap(), 0x1000)
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
    fn forward_rules_are_flanneld_s() {
        let got: Vec<String> = forward_rules("10.0.0.0/16".parse().unwrap())
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
}
