//! One table as `iptables-save -t <table>` prints it, and the
//! `iptables-restore --noflush` input that brings it to what we want.
//!
//! Under `--noflush` a `:CHAIN - [0:0]` line for a user-defined chain creates
//! it or empties it, and the whole input of one table is committed in one
//! kernel transaction (one table replace with the legacy backend, one
//! nf_tables batch with the nft one). So a repair that declares our chain and
//! appends its rules replaces the chain's content without a moment where a
//! packet sees it empty, and nothing outside our chains is flushed.

use std::collections::BTreeSet;

use super::{Family, Rule, is_ours};

/// The chains and rules of one table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableState {
    chains: BTreeSet<String>,
    /// `-A <chain> <spec>`, in the kernel's order.
    rules: Vec<(String, Vec<String>)>,
}

impl TableState {
    /// Reads the `*<table>` section of `iptables-save` output.
    pub fn parse(save: &str, table: &str) -> TableState {
        let mut state = TableState::default();
        let mut inside = false;
        for line in save.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('*') {
                inside = name == table;
            } else if !inside || line.starts_with('#') {
                continue;
            } else if line == "COMMIT" {
                inside = false;
            } else if let Some(decl) = line.strip_prefix(':') {
                if let Some(chain) = decl.split_whitespace().next() {
                    state.chains.insert(chain.to_owned());
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let mut words = split_words(rest);
                if !words.is_empty() {
                    let chain = words.remove(0);
                    state.rules.push((chain, words));
                }
            }
        }
        state
    }

    fn has_chain(&self, chain: &str) -> bool {
        self.chains.contains(chain)
    }

    fn rules_of<'a>(&'a self, chain: &'a str) -> impl Iterator<Item = &'a Vec<String>> + 'a {
        self.rules
            .iter()
            .filter(move |(c, _)| c == chain)
            .map(|(_, spec)| spec)
    }

    fn copies_of(&self, rule: &Rule) -> usize {
        self.rules_of(rule.chain)
            .filter(|s| **s == rule.spec)
            .count()
    }
}

/// What to feed `iptables-restore --noflush` for one table, and one line per
/// change it makes (for the log and for `cleanup`'s report).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restore {
    pub input: String,
    pub changes: Vec<String>,
}

/// The input that makes `family`'s `table` hold `rules` (those whose family
/// and table it is):
/// each of our chains exactly these rules in this order (declared, which
/// empties it, then appended), each jump from a built-in chain present
/// (appended only if missing). `None` when the table already holds them.
pub fn repair(
    family: Family,
    table: &str,
    rules: &[Rule],
    current: &TableState,
) -> Option<Restore> {
    let rules = of_table(family, table, rules);
    let mut lines = Vec::new();
    let mut changes = Vec::new();
    for chain in our_chains(&rules) {
        let want: Vec<&Vec<String>> = rules
            .iter()
            .filter(|r| r.chain == chain)
            .map(|r| &r.spec)
            .collect();
        let have: Vec<&Vec<String>> = current.rules_of(chain).collect();
        if current.has_chain(chain) && have == want {
            continue;
        }
        lines.push(format!(":{chain} - [0:0]"));
        lines.extend(want.iter().map(|spec| append(chain, spec)));
        changes.push(format!(
            "{} -t {table} chain {chain} ({} rules)",
            family.iptables(),
            want.len()
        ));
    }
    for jump in rules.iter().filter(|r| !is_ours(r.chain)) {
        if current.copies_of(jump) == 0 {
            lines.push(append(jump.chain, &jump.spec));
            changes.push(describe_jump(jump));
        }
    }
    transaction(table, lines, changes)
}

/// The input that removes from `family`'s `table` every copy of the jumps among
/// `rules`, then our chains they name (emptied, then deleted); `None` when
/// none of it is there.
pub fn removal(
    family: Family,
    table: &str,
    rules: &[Rule],
    current: &TableState,
) -> Option<Restore> {
    let rules = of_table(family, table, rules);
    let mut lines = Vec::new();
    let mut changes = Vec::new();
    for jump in rules.iter().filter(|r| !is_ours(r.chain)) {
        for _ in 0..current.copies_of(jump) {
            lines.push(format!("-D {} {}", jump.chain, join_words(&jump.spec)));
            changes.push(describe_jump(jump));
        }
    }
    for chain in our_chains(&rules) {
        if current.has_chain(chain) {
            lines.push(format!(":{chain} - [0:0]"));
            lines.push(format!("-X {chain}"));
            changes.push(format!("{} -t {table} chain {chain}", family.iptables()));
        }
    }
    transaction(table, lines, changes)
}

fn of_table<'a>(family: Family, table: &str, rules: &'a [Rule]) -> Vec<&'a Rule> {
    rules
        .iter()
        .filter(|r| r.family == family && r.table == table)
        .collect()
}

fn transaction(table: &str, lines: Vec<String>, changes: Vec<String>) -> Option<Restore> {
    if lines.is_empty() {
        return None;
    }
    let mut input = format!("*{table}\n");
    for l in lines {
        input.push_str(&l);
        input.push('\n');
    }
    input.push_str("COMMIT\n");
    Some(Restore { input, changes })
}

/// Our chains among `rules`, in order of first appearance.
fn our_chains<'a>(rules: &[&'a Rule]) -> Vec<&'a str> {
    let mut chains: Vec<&str> = Vec::new();
    for r in rules {
        if is_ours(r.chain) && !chains.contains(&r.chain) {
            chains.push(r.chain);
        }
    }
    chains
}

fn append(chain: &str, spec: &[String]) -> String {
    format!("-A {chain} {}", join_words(spec))
}

fn describe_jump(jump: &Rule) -> String {
    format!(
        "{} -t {} {} jump to {}",
        jump.family.iptables(),
        jump.table,
        jump.chain,
        jump.spec.last().map_or("", String::as_str)
    )
}

/// The words of a rule as iptables-save writes them: whitespace separates,
/// double quotes group (a comment with spaces), a backslash in quotes
/// escapes the next character.
fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '\\' if quoted => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// The reverse of [`split_words`]: words with spaces, quotes or backslashes
/// (or none at all) are quoted.
fn join_words(words: &[String]) -> String {
    let quote = |w: &String| -> String {
        if !w.is_empty()
            && !w
                .chars()
                .any(|c| c.is_whitespace() || c == '"' || c == '\\')
        {
            return w.clone();
        }
        let mut q = String::from("\"");
        for c in w.chars() {
            if c == '"' || c == '\\' {
                q.push('\\');
            }
            q.push(c);
        }
        q.push('"');
        q
    };
    words.iter().map(quote).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipmasq::{forward_rules, masq_rules};

    const NET: &str = "10.0.0.0/16";
    const V4: Family = Family::Ipv4;

    fn fwd() -> Vec<Rule> {
        forward_rules::<ipnet::Ipv4Net>(NET.parse().unwrap())
    }

    /// What iptables-save prints once `rules` are in place (built by hand,
    /// in its format).
    fn saved_filter(extra_forward: &[&str], fwd_chain: &[&str]) -> String {
        let mut s = String::from(
            "# Generated by iptables-nft-save v1.8.9 (nf_tables)\n*filter\n\
             :INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n",
        );
        if !fwd_chain.is_empty() {
            s.push_str(":FLANNEL-FWD - [0:0]\n");
        }
        for l in extra_forward {
            s.push_str(&format!("-A FORWARD {l}\n"));
        }
        for l in fwd_chain {
            s.push_str(&format!("-A FLANNEL-FWD {l}\n"));
        }
        s.push_str("COMMIT\n# Completed\n");
        s
    }

    const JUMP: &str = r#"-m comment --comment "flanneld forward" -j FLANNEL-FWD"#;
    const FROM: &str = r#"-s 10.0.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT"#;
    const TO: &str = r#"-d 10.0.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT"#;

    #[test]
    fn a_fresh_table_gets_the_chain_its_rules_and_the_jump_in_one_transaction() {
        let current = TableState::parse(&saved_filter(&[], &[]), "filter");
        let r = repair(V4, "filter", &fwd(), &current).expect("a repair");
        assert_eq!(
            r.input,
            "*filter\n\
             :FLANNEL-FWD - [0:0]\n\
             -A FLANNEL-FWD -s 10.0.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
             -A FLANNEL-FWD -d 10.0.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
             -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
             COMMIT\n"
        );
        assert_eq!(
            r.changes,
            [
                "iptables -t filter chain FLANNEL-FWD (2 rules)",
                "iptables -t filter FORWARD jump to FLANNEL-FWD"
            ]
        );
    }

    #[test]
    fn a_table_that_holds_the_rules_needs_nothing() {
        let saved = saved_filter(&["-j DOCKER-USER", JUMP], &[FROM, TO]);
        let current = TableState::parse(&saved, "filter");
        assert_eq!(repair(V4, "filter", &fwd(), &current), None);
        // Rules of other tables are not this table's business.
        assert_eq!(
            repair(
                V4,
                "filter",
                &masq_rules::<ipnet::Ipv4Net>(
                    NET.parse().unwrap(),
                    "10.0.3.0/24".parse().unwrap(),
                    true
                ),
                &current
            ),
            None
        );
    }

    #[test]
    fn a_missing_reordered_or_foreign_rule_replaces_only_our_chain() {
        for chain in [
            &[FROM][..],
            &[TO, FROM][..],
            &[FROM, TO, "-j DROP"][..],
            &[FROM, FROM, TO][..],
        ] {
            let current = TableState::parse(&saved_filter(&[JUMP], chain), "filter");
            let r = repair(V4, "filter", &fwd(), &current).expect("a repair");
            // The jump is there: it is not added again, and FORWARD is not
            // touched at all (no flush, no delete).
            assert_eq!(
                r.input,
                "*filter\n\
                 :FLANNEL-FWD - [0:0]\n\
                 -A FLANNEL-FWD -s 10.0.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
                 -A FLANNEL-FWD -d 10.0.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
                 COMMIT\n",
                "{chain:?}"
            );
        }
    }

    #[test]
    fn each_family_restores_only_its_own_rules() {
        let mut rules = fwd();
        rules.extend(forward_rules::<ipnet::Ipv6Net>(
            "fd00:10::/48".parse().unwrap(),
        ));
        // The IPv4 table holds the IPv4 rules: the IPv6 ones are not its.
        let v4 = TableState::parse(&saved_filter(&[JUMP], &[FROM, TO]), "filter");
        assert_eq!(repair(V4, "filter", &rules, &v4), None);
        let empty = TableState::parse(&saved_filter(&[], &[]), "filter");
        let r = repair(Family::Ipv6, "filter", &rules, &empty).expect("a repair");
        assert_eq!(
            r.input,
            "*filter\n\
             :FLANNEL-FWD - [0:0]\n\
             -A FLANNEL-FWD -s fd00:10::/48 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
             -A FLANNEL-FWD -d fd00:10::/48 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
             -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
             COMMIT\n"
        );
        assert_eq!(
            r.changes,
            [
                "ip6tables -t filter chain FLANNEL-FWD (2 rules)",
                "ip6tables -t filter FORWARD jump to FLANNEL-FWD"
            ]
        );
        let r = removal(Family::Ipv6, "filter", &rules, &v4).expect("a removal");
        assert_eq!(
            r.changes,
            [
                "ip6tables -t filter FORWARD jump to FLANNEL-FWD",
                "ip6tables -t filter chain FLANNEL-FWD"
            ]
        );
    }

    #[test]
    fn only_a_missing_jump_is_appended() {
        let current = TableState::parse(&saved_filter(&["-j DOCKER-USER"], &[FROM, TO]), "filter");
        let r = repair(V4, "filter", &fwd(), &current).expect("a repair");
        assert_eq!(
            r.input,
            "*filter\n-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\nCOMMIT\n"
        );
    }

    #[test]
    fn removal_deletes_every_copy_of_the_jump_then_our_chain() {
        let current = TableState::parse(&saved_filter(&[JUMP, JUMP], &[FROM, TO]), "filter");
        let r = removal(V4, "filter", &fwd(), &current).expect("a removal");
        assert_eq!(
            r.input,
            "*filter\n\
             -D FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
             -D FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
             :FLANNEL-FWD - [0:0]\n\
             -X FLANNEL-FWD\n\
             COMMIT\n"
        );
        assert_eq!(
            r.changes,
            [
                "iptables -t filter FORWARD jump to FLANNEL-FWD",
                "iptables -t filter FORWARD jump to FLANNEL-FWD",
                "iptables -t filter chain FLANNEL-FWD"
            ]
        );
        let clean = TableState::parse(&saved_filter(&["-j DOCKER-USER"], &[]), "filter");
        assert_eq!(removal(V4, "filter", &fwd(), &clean), None);
    }

    #[test]
    fn only_the_named_table_is_read() {
        let save = "*nat\n:POSTROUTING ACCEPT [0:0]\n:FLANNEL-FWD - [0:0]\n-A FLANNEL-FWD -j X\nCOMMIT\n\
                    *filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n";
        let filter = TableState::parse(save, "filter");
        assert!(!filter.has_chain("FLANNEL-FWD"));
        assert_eq!(filter.rules, []);
        assert!(TableState::parse(save, "nat").has_chain("FLANNEL-FWD"));
    }

    #[test]
    fn words_round_trip_through_iptables_save_quoting() {
        let line =
            r#"FLANNEL-FWD -s 10.0.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT"#;
        let words = split_words(line);
        assert_eq!(
            words,
            [
                "FLANNEL-FWD",
                "-s",
                "10.0.0.0/16",
                "-m",
                "comment",
                "--comment",
                "flanneld forward",
                "-j",
                "ACCEPT"
            ]
        );
        assert_eq!(join_words(&words), line);
        let odd = vec![String::new(), "a\"b".to_owned(), "back\\slash".to_owned()];
        assert_eq!(join_words(&odd), r#""" "a\"b" "back\\slash""#);
        assert_eq!(split_words(&join_words(&odd)), odd);
    }
}
