//! flanneld's nftables mode (`EnableNFTables: true`): table `ip
//! flannel-ipv4` with chain `postrtg` (nat, postrouting, srcnat) holding the
//! masquerade rules of `--ip-masq` and chain `forward` (filter, forward,
//! filter) holding the accepts of `--iptables-forward-rules`, the same rules
//! in the same order as flanneld's `pkg/trafficmngr/nftables`.
//!
//! Every change is one `nft -f -` run, which nft commits as one kernel
//! transaction: the table is declared (so the delete cannot fail), deleted
//! and defined again, so no packet sees it half-built.

use ipnet::Ipv4Net;

use super::exec::{self, IptablesError};

/// flanneld's IPv4 table; the agent serves IPv4 only, so no `flannel-ipv6`.
pub const TABLE: &str = "flannel-ipv4";
/// The chains, as flanneld names them.
pub const MASQ_CHAIN: &str = "postrtg";
pub const FORWARD_CHAIN: &str = "forward";
/// kube-proxy's mark as flanneld's nftables rule matches it (the whole
/// mark, not only the bit as the iptables rule does).
pub const KUBE_PROXY_MARK: &str = "0x4000";

/// What the table holds; a table with no chain is still flanneld's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftRules {
    pub network: Ipv4Net,
    pub subnet: Ipv4Net,
    /// `--ip-masq`: chain `postrtg`.
    pub masq: bool,
    pub random_fully: bool,
    /// `--iptables-forward-rules`: chain `forward`.
    pub forward: bool,
}

/// The table's definition, as [`apply_script`] loads it. `nft list table`
/// prints it the same way but for the mark (`0x00004000`).
pub fn table_text(r: &NftRules) -> String {
    let net = r.network.to_string();
    let pod = r.subnet.to_string();
    let masq = if r.random_fully {
        "masquerade fully-random"
    } else {
        "masquerade"
    };
    let mut chains = Vec::new();
    if r.masq {
        chains.push(chain(
            MASQ_CHAIN,
            "chain to manage traffic masquerading by flannel",
            "type nat hook postrouting priority srcnat; policy accept;",
            &[
                // kube-proxy's marked packets: no double NAT.
                format!("meta mark {KUBE_PROXY_MARK} return"),
                // Nothing inside the overlay is rewritten.
                format!("ip saddr {pod} ip daddr {net} return"),
                format!("ip saddr {net} ip daddr {pod} return"),
                format!("ip saddr != {pod} ip daddr {net} return"),
                format!("ip saddr {net} ip daddr != 224.0.0.0/4 {masq}"),
                format!("ip saddr != {net} ip daddr {net} {masq}"),
            ],
        ));
    }
    if r.forward {
        chains.push(chain(
            FORWARD_CHAIN,
            "chain to accept flannel traffic",
            "type filter hook forward priority filter; policy accept;",
            &[
                format!("ip saddr {net} accept"),
                format!("ip daddr {net} accept"),
            ],
        ));
    }
    format!(
        "table ip {TABLE} {{\n\tcomment \"rules for {TABLE}\"\n{}}}\n",
        chains.join("\n")
    )
}

fn chain(name: &str, comment: &str, hook: &str, rules: &[String]) -> String {
    let mut s = format!("\tchain {name} {{\n\t\tcomment \"{comment}\"\n\t\t{hook}\n");
    for r in rules {
        s.push_str("\t\t");
        s.push_str(r);
        s.push('\n');
    }
    s.push_str("\t}\n");
    s
}

/// The table as `nft list table` (nft 1.0) prints it once [`apply_script`]
/// loaded it: as [`table_text`], but nft writes the mark in full.
pub fn listed_text(r: &NftRules) -> String {
    let mark =
        u32::from_str_radix(KUBE_PROXY_MARK.trim_start_matches("0x"), 16).expect("a hex mark");
    table_text(r).replace(
        &format!("meta mark {KUBE_PROXY_MARK} "),
        &format!("meta mark {mark:#010x} "),
    )
}

/// The `nft -f` input that replaces the table with `r`'s in one transaction.
pub fn apply_script(r: &NftRules) -> String {
    format!("{}{}", removal_script(), table_text(r))
}

/// The `nft -f` input that removes the table, there or not.
pub fn removal_script() -> String {
    format!("table ip {TABLE} {{}}\ndelete table ip {TABLE}\n")
}

/// Loads `script` as one transaction.
pub fn load(script: &str) -> Result<(), IptablesError> {
    exec::run("nft", &["-f", "-"], Some(script)).map(drop)
}

/// The table as nft lists it, `None` when it is not there.
pub fn current() -> Result<Option<String>, IptablesError> {
    let tables = exec::run("nft", &["list", "tables", "ip"], None)?;
    let name = format!("table ip {TABLE}");
    if !tables.lines().any(|l| l.trim() == name) {
        return Ok(None);
    }
    exec::run("nft", &["list", "table", "ip", TABLE], None).map(Some)
}

/// Removes the table; whether it was there. A host without nft has none.
pub fn remove() -> Result<bool, IptablesError> {
    let there = match current() {
        Ok(listed) => listed.is_some(),
        Err(IptablesError::Spawn { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            false
        }
        Err(e) => return Err(e),
    };
    if there {
        load(&removal_script())?;
    }
    Ok(there)
}

/// Whether the kernel takes `masquerade fully-random` (checked with `nft
/// -c`, which commits nothing), as flanneld checks it.
pub fn supports_random_fully() -> bool {
    let probe = "table ip flannel-random-fully-probe {\n\tchain probe {\n\t\t\
                 type nat hook postrouting priority srcnat;\n\t\t\
                 ip saddr != 127.0.0.1 masquerade fully-random\n\t}\n}\n";
    exec::run("nft", &["-c", "-f", "-"], Some(probe)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(masq: bool, random_fully: bool, forward: bool) -> NftRules {
        NftRules {
            network: "10.0.0.0/16".parse().unwrap(),
            subnet: "10.0.13.0/24".parse().unwrap(),
            masq,
            random_fully,
            forward,
        }
    }

    #[test]
    fn the_table_holds_flanneld_s_chains_and_rules_in_order() {
        assert_eq!(
            table_text(&rules(true, true, true)),
            "table ip flannel-ipv4 {\n\
             \tcomment \"rules for flannel-ipv4\"\n\
             \tchain postrtg {\n\
             \t\tcomment \"chain to manage traffic masquerading by flannel\"\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tmeta mark 0x4000 return\n\
             \t\tip saddr 10.0.13.0/24 ip daddr 10.0.0.0/16 return\n\
             \t\tip saddr 10.0.0.0/16 ip daddr 10.0.13.0/24 return\n\
             \t\tip saddr != 10.0.13.0/24 ip daddr 10.0.0.0/16 return\n\
             \t\tip saddr 10.0.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random\n\
             \t\tip saddr != 10.0.0.0/16 ip daddr 10.0.0.0/16 masquerade fully-random\n\
             \t}\n\
             \n\
             \tchain forward {\n\
             \t\tcomment \"chain to accept flannel traffic\"\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tip saddr 10.0.0.0/16 accept\n\
             \t\tip daddr 10.0.0.0/16 accept\n\
             \t}\n\
             }\n"
        );
    }

    #[test]
    fn flags_choose_the_chains_and_the_masquerade() {
        let plain = table_text(&rules(true, false, false));
        assert!(
            plain.contains("ip daddr 10.0.0.0/16 masquerade\n"),
            "{plain}"
        );
        assert!(!plain.contains("fully-random"));
        assert!(!plain.contains("chain forward"));
        let fwd = table_text(&rules(false, true, true));
        assert!(!fwd.contains("chain postrtg"));
        assert!(fwd.contains("chain forward"));
        assert_eq!(
            table_text(&rules(false, true, false)),
            "table ip flannel-ipv4 {\n\tcomment \"rules for flannel-ipv4\"\n}\n"
        );
    }

    #[test]
    fn the_listing_spells_the_mark_as_nft_prints_it() {
        let r = rules(true, true, true);
        let listed = listed_text(&r);
        assert!(
            listed.contains("\t\tmeta mark 0x00004000 return\n"),
            "{listed}"
        );
        assert_eq!(listed.replace("0x00004000", "0x4000"), table_text(&r));
    }

    #[test]
    fn the_apply_script_replaces_the_table_in_one_file() {
        let r = rules(true, true, true);
        let s = apply_script(&r);
        assert!(s.starts_with(
            "table ip flannel-ipv4 {}\ndelete table ip flannel-ipv4\ntable ip flannel-ipv4 {\n"
        ));
        assert!(s.ends_with(&table_text(&r)));
        assert_eq!(
            removal_script(),
            "table ip flannel-ipv4 {}\ndelete table ip flannel-ipv4\n"
        );
    }
}
