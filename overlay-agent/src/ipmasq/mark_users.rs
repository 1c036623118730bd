//! Other rules that may set the fast path's mark bit. Our chain clears the
//! bit before it decides, so a writer earlier in the packet's path (mangle
//! PREROUTING or FORWARD, raw, a tc `skbedit`, `SO_MARK`) approves nothing;
//! a writer after our jump (later in mangle POSTROUTING) would. The agent
//! cannot order itself against every other tool's rules, so at start-up it
//! names each rule that can set the bit, and the operator picks another bit
//! with `--fast-path-mark`.

use super::{FAST_PATH_CHAIN, exec};

/// The rules of `iptables-save` output (mangle and raw tables) and of
/// `nft list ruleset` output that can set `bit` in a packet's mark, outside
/// our own chain; each as its line.
pub fn in_iptables_save(save: &str, bit: u32) -> Vec<String> {
    let mut table = "";
    let mut found = Vec::new();
    for line in save.lines() {
        let line = line.trim();
        if let Some(t) = line.strip_prefix('*') {
            table = t;
            continue;
        }
        let Some(rule) = line.strip_prefix("-A ") else {
            continue;
        };
        if !matches!(table, "mangle" | "raw") {
            continue;
        }
        if rule.split_whitespace().next() == Some(FAST_PATH_CHAIN) {
            continue;
        }
        if iptables_rule_sets(rule, bit) {
            found.push(format!("iptables -t {table} -A {rule}"));
        }
    }
    found
}

/// Whether one iptables rule (as `iptables-save` prints it) can set `bit`.
fn iptables_rule_sets(rule: &str, bit: u32) -> bool {
    let words: Vec<&str> = rule.split_whitespace().collect();
    let target = words
        .windows(2)
        .find(|w| w[0] == "-j")
        .map(|w| w[1])
        .unwrap_or("");
    let arg = |opt: &str| {
        words
            .windows(2)
            .find(|w| w[0] == opt)
            .map(|w| w[1].to_owned())
    };
    match target {
        "MARK" => ["--set-xmark", "--set-mark", "--or-mark", "--xor-mark"]
            .iter()
            .filter_map(|o| arg(o))
            .any(|v| value_of(&v) & bit != 0),
        "CONNMARK" if words.contains(&"--restore-mark") => {
            // The conntrack entry's mark is copied under the mask: whatever
            // set it there (a --save-mark, a ct mark rule) sets it here.
            let mask = arg("--nfmask").or_else(|| arg("--mask"));
            mask.map_or(u32::MAX, |m| parse_number(&m).unwrap_or(u32::MAX)) & bit != 0
        }
        "TPROXY" => arg("--tproxy-mark").is_some_and(|v| value_of(&v) & bit != 0),
        _ => false,
    }
}

/// The value of `V` or `V/M`.
fn value_of(v: &str) -> u32 {
    parse_number(v.split('/').next().unwrap_or("")).unwrap_or(0)
}

fn parse_number(s: &str) -> Option<u32> {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// The same for `nft list ruleset` output: rules of native nft tables that
/// set the packet mark (`meta mark set ...`) to an expression that can hold
/// `bit`: a number with the bit, or the conntrack mark. Tables of
/// iptables-nft (`ip mangle`, `ip raw`, ...) are read from `iptables-save`.
pub fn in_nft_ruleset(ruleset: &str, bit: u32) -> Vec<String> {
    let mut table = String::new();
    let mut found = Vec::new();
    for line in ruleset.lines() {
        let line = line.trim();
        if let Some(t) = line.strip_prefix("table ") {
            table = t.trim_end_matches('{').trim().to_owned();
            continue;
        }
        if matches!(
            table.as_str(),
            "ip mangle" | "ip raw" | "ip filter" | "ip nat" | "ip6 mangle" | "ip6 raw"
        ) {
            continue;
        }
        let Some((_, set)) = line.split_once("meta mark set ") else {
            continue;
        };
        let sets_bit = set.starts_with("ct mark")
            || set
                .split(|c: char| c.is_whitespace() || c == ',')
                .filter_map(parse_number)
                .any(|v| v & bit != 0);
        if sets_bit {
            found.push(format!("nft table {table}: {line}"));
        }
    }
    found
}

/// Runs `iptables-save` and `nft list ruleset` (either may be missing) and
/// returns the rules that can set `bit`.
pub fn find(bit: u32) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(save) = exec::run("iptables-save", &[], None) {
        found.extend(in_iptables_save(&save, bit));
    }
    if let Ok(ruleset) = exec::run("nft", &["list", "ruleset"], None) {
        found.extend(in_nft_ruleset(&ruleset, bit));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:FLANNEL-FASTPATH - [0:0]
-A POSTROUTING -m comment --comment \"flanneld fast path\" -j FLANNEL-FASTPATH
-A FLANNEL-FASTPATH -m comment --comment \"flanneld fast path\" -j MARK --set-xmark 0x0/0x1000
-A FLANNEL-FASTPATH -s 10.0.13.0/24 -j MARK --set-xmark 0x1000/0x1000
-A FORWARD -s 10.0.13.5/32 -j MARK --set-xmark 0x1000/0x1000
-A FORWARD -j MARK --set-xmark 0x4000/0x4000
-A PREROUTING -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A PREROUTING -j CONNMARK --restore-mark --nfmask 0xff0000 --ctmask 0xff0000
-A PREROUTING -j MARK --and-mark 0xffffefff
COMMIT
*filter
-A FORWARD -j MARK --set-xmark 0x1000/0x1000
COMMIT
*raw
-A PREROUTING -p udp -j MARK --or-mark 0x3000
COMMIT
";

    #[test]
    fn finds_iptables_writers_of_the_bit_outside_our_chain() {
        let found = in_iptables_save(SAVE, 0x1000);
        assert_eq!(
            found,
            vec![
                "iptables -t mangle -A FORWARD -s 10.0.13.5/32 -j MARK --set-xmark 0x1000/0x1000",
                "iptables -t mangle -A PREROUTING -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
                "iptables -t raw -A PREROUTING -p udp -j MARK --or-mark 0x3000",
            ]
        );
        // Another bit: only the full-mask restore can set it.
        assert_eq!(in_iptables_save(SAVE, 0x0002).len(), 1);
    }

    #[test]
    fn finds_native_nft_writers_of_the_bit() {
        let ruleset = "\
table ip mangle {
\tchain FORWARD {
\t\tmeta mark set mark or 0x1000 counter
\t}
}
table inet calico {
\tchain x {
\t\tmeta mark set mark or 0x00001000 accept
\t\tmeta mark set 0x00004000
\t\tmeta mark set ct mark
\t}
}
";
        assert_eq!(
            in_nft_ruleset(ruleset, 0x1000),
            vec![
                "nft table inet calico: meta mark set mark or 0x00001000 accept",
                "nft table inet calico: meta mark set ct mark",
            ]
        );
    }
}
