//! flanneld's iptables rules, the same chains and rules in the same order:
//! `--ip-masq` adds nat `FLANNEL-POSTRTG` (jumped to from POSTROUTING), and
//! `--iptables-forward-rules` (on by default) adds filter `FLANNEL-FWD`
//! (jumped to from FORWARD). They are checked every resync period and
//! rebuilt when anything is missing, as flanneld does.
//!
//! Like flanneld's go-iptables, this runs the `iptables` binary (`-w`, so it
//! waits for the xtables lock instead of failing).

use std::process::Command;

use ipnet::Ipv4Net;
use overlay_common::fastpath::FAST_PATH_MARK;

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

#[derive(Debug, thiserror::Error)]
#[error("iptables {args}: {problem}")]
pub struct IptablesError {
    pub args: String,
    pub problem: String,
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

fn iptables(args: &[&str]) -> Result<bool, IptablesError> {
    let out = Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .map_err(|e| IptablesError {
            args: args.join(" "),
            problem: format!("cannot run iptables: {e}"),
        })?;
    if out.status.success() {
        return Ok(true);
    }
    // `-C` fails when the rule, its chain or its target chain does not
    // exist; a real problem shows when the rule is then added.
    if args.first() == Some(&"-C") {
        return Ok(false);
    }
    Err(IptablesError {
        args: args.join(" "),
        problem: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

fn exists(r: &Rule) -> Result<bool, IptablesError> {
    let mut a = vec!["-C", r.chain, "-t", r.table];
    a.extend(r.spec.iter().map(String::as_str));
    iptables(&a)
}

/// The fast path's approvals: mangle `FLANNEL-FASTPATH`, jumped to from
/// POSTROUTING (after the filter table's FORWARD and OUTPUT verdicts, before
/// NAT), marks packets from and to our pods whose conntrack entry is
/// ESTABLISHED and not NATed. The programs turn such marked packets into
/// approvals; nothing else reads the bit.
pub fn fast_path_rules(subnet: Ipv4Net) -> Vec<Rule> {
    let pod = subnet.to_string();
    let mark = format!("{FAST_PATH_MARK:#x}/{FAST_PATH_MARK:#x}");
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
            .chain(["-j", "MARK", "--set-xmark", &mark])
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
        Rule::new("mangle", FAST_PATH_CHAIN, approve("-s")),
        Rule::new("mangle", FAST_PATH_CHAIN, approve("-d")),
    ]
}

/// Whether iptables supports `MASQUERADE --random-fully` (1.6.2 and later).
pub fn supports_random_fully() -> bool {
    Command::new("iptables")
        .args(["-j", "MASQUERADE", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("--random-fully"))
        .unwrap_or(false)
}

/// Make sure every rule exists, in order. When any is missing, flanneld's
/// way: flush our chain and add them all again (the jump from the built-in
/// chain is only added if missing). Returns whether anything was changed.
pub fn ensure(rules: &[Rule]) -> Result<bool, IptablesError> {
    let mut all_there = true;
    for r in rules {
        if !exists(r)? {
            all_there = false;
            break;
        }
    }
    if all_there {
        return Ok(false);
    }
    for r in rules {
        if is_ours(r.chain) {
            // -N fails when the chain exists; then flush it.
            if iptables(&["-t", r.table, "-N", r.chain]).is_err() {
                iptables(&["-t", r.table, "-F", r.chain])?;
            }
        }
    }
    for r in rules {
        if !is_ours(r.chain) && exists(r)? {
            continue;
        }
        let mut a = vec!["-A", r.chain, "-t", r.table];
        a.extend(r.spec.iter().map(String::as_str));
        iptables(&a)?;
    }
    Ok(true)
}

/// Delete rules (those in our chains and the jumps); missing ones are fine.
pub fn remove(rules: &[Rule]) -> Result<(), IptablesError> {
    for r in rules {
        if exists(r)? {
            let mut a = vec!["-D", r.chain, "-t", r.table];
            a.extend(r.spec.iter().map(String::as_str));
            iptables(&a)?;
        }
    }
    Ok(())
}

/// Removes every rule and chain flanneld's (and our) masquerading and
/// forwarding add, whatever Network they were made for: the jumps from
/// POSTROUTING and FORWARD, then our chains. Returns what it removed.
pub fn remove_all() -> Result<Vec<String>, IptablesError> {
    let any: Ipv4Net = "0.0.0.0/0".parse().expect("a valid prefix");
    let jumps = [
        masq_rules(any, any, false).remove(0),
        forward_rules(any).remove(0),
        fast_path_rules(any).remove(0),
    ];
    let mut removed = Vec::new();
    for jump in &jumps {
        // The jump carries no address, so one spec matches every copy.
        while exists(jump)? {
            let mut a = vec!["-D", jump.chain, "-t", jump.table];
            a.extend(jump.spec.iter().map(String::as_str));
            iptables(&a)?;
            removed.push(format!(
                "iptables -t {} {} jump to {}",
                jump.table,
                jump.chain,
                jump.spec.last().map_or("", String::as_str)
            ));
        }
    }
    for (table, chain) in [
        ("nat", MASQ_CHAIN),
        ("filter", FORWARD_CHAIN),
        ("mangle", FAST_PATH_CHAIN),
    ] {
        if delete_chain(table, chain)? {
            removed.push(format!("iptables -t {table} chain {chain}"));
        }
    }
    Ok(removed)
}

/// Flushes and deletes one of our chains (nothing may jump to it any more);
/// returns whether it existed.
pub fn delete_chain(table: &str, chain: &str) -> Result<bool, IptablesError> {
    if iptables(&["-t", table, "-F", chain]).is_err() {
        return Ok(false);
    }
    iptables(&["-t", table, "-X", chain])?;
    Ok(true)
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
    fn fast_path_rules_mark_established_unnated_pod_traffic() {
        let got: Vec<String> = fast_path_rules("10.0.13.0/24".parse().unwrap())
            .iter()
            .map(line)
            .collect();
        assert_eq!(
            got,
            vec![
                "-t mangle -A POSTROUTING -m comment --comment flanneld fast path -j FLANNEL-FASTPATH",
                "-t mangle -A FLANNEL-FASTPATH -s 10.0.13.0/24 -m conntrack --ctstate ESTABLISHED -m conntrack ! --ctstate SNAT,DNAT -m comment --comment flanneld fast path -j MARK --set-xmark 0x100000/0x100000",
                "-t mangle -A FLANNEL-FASTPATH -d 10.0.13.0/24 -m conntrack --ctstate ESTABLISHED -m conntrack ! --ctstate SNAT,DNAT -m comment --comment flanneld fast path -j MARK --set-xmark 0x100000/0x100000",
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
