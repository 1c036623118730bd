//! flanneld's nftables mode (`EnableNFTables: true`): table `ip
//! flannel-ipv4` with chain `postrtg` (nat, postrouting, srcnat) holding the
//! masquerade rules of `--ip-masq` and chain `forward` (filter, forward,
//! filter) holding the accepts of `--iptables-forward-rules`, the same rules
//! in the same order as flanneld's `pkg/trafficmngr/nftables`; with an
//! `IPv6Network`, table `ip6 flannel-ipv6` with the same chains for the IPv6
//! network and subnet.
//!
//! Every change is one `nft -f -` run, which nft commits as one kernel
//! transaction: the table is declared (so the delete cannot fail), deleted
//! and defined again, so no packet sees it half-built.

use ipnet::Ipv4Net;

use super::{
    Family, Net,
    exec::{self, IptablesError},
};

/// flanneld's IPv4 table.
pub const TABLE: &str = "flannel-ipv4";
/// flanneld's IPv6 table.
pub const TABLE6: &str = "flannel-ipv6";
/// The chains, as flanneld names them.
pub const MASQ_CHAIN: &str = "postrtg";
pub const FORWARD_CHAIN: &str = "forward";
/// kube-proxy's mark as flanneld's nftables rule matches it (the whole
/// mark, not only the bit as the iptables rule does).
pub const KUBE_PROXY_MARK: &str = "0x4000";

/// flanneld's table of `family`.
pub fn table(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => TABLE,
        Family::Ipv6 => TABLE6,
    }
}

/// nft's name of `family` (`ip`, `ip6`): of the table and of its matches.
pub fn nft_family(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "ip",
        Family::Ipv6 => "ip6",
    }
}

/// `nft table ip flannel-ipv4`: how the log and `cleanup` name the table.
pub fn describe(family: Family) -> String {
    format!("nft table {} {}", nft_family(family), table(family))
}

/// What the table of `N`'s family holds; a table with no chain is still
/// flanneld's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftRules<N: Net = Ipv4Net> {
    pub network: N,
    pub subnet: N,
    /// `--ip-masq`: chain `postrtg`.
    pub masq: bool,
    pub random_fully: bool,
    /// `--iptables-forward-rules`: chain `forward`.
    pub forward: bool,
}

/// The table's definition, as [`apply_script`] loads it. `nft list table`
/// prints it the same way but for the mark (`0x00004000`).
pub fn table_text<N: Net>(r: &NftRules<N>) -> String {
    let family = N::FAMILY;
    let ip = nft_family(family);
    let name = table(family);
    let net = r.network.to_string();
    let pod = r.subnet.to_string();
    let multicast = family.multicast();
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
                // Nothing inside the overlay is rewritten. The third rule is
                // flanneld's nft one (`!= subnet`, `network`), not its
                // iptables one (`! -s network -d subnet`).
                format!("{ip} saddr {pod} {ip} daddr {net} return"),
                format!("{ip} saddr {net} {ip} daddr {pod} return"),
                format!("{ip} saddr != {pod} {ip} daddr {net} return"),
                format!("{ip} saddr {net} {ip} daddr != {multicast} {masq}"),
                format!("{ip} saddr != {net} {ip} daddr {net} {masq}"),
            ],
        ));
    }
    if r.forward {
        chains.push(chain(
            FORWARD_CHAIN,
            "chain to accept flannel traffic",
            "type filter hook forward priority filter; policy accept;",
            &[
                format!("{ip} saddr {net} accept"),
                format!("{ip} daddr {net} accept"),
            ],
        ));
    }
    format!(
        "table {ip} {name} {{\n\tcomment \"rules for {name}\"\n{}}}\n",
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
pub fn listed_text<N: Net>(r: &NftRules<N>) -> String {
    let mark =
        u32::from_str_radix(KUBE_PROXY_MARK.trim_start_matches("0x"), 16).expect("a hex mark");
    table_text(r).replace(
        &format!("meta mark {KUBE_PROXY_MARK} "),
        &format!("meta mark {mark:#010x} "),
    )
}

/// The `nft -f` input that replaces the table with `r`'s in one transaction.
pub fn apply_script<N: Net>(r: &NftRules<N>) -> String {
    format!("{}{}", removal_script(N::FAMILY), table_text(r))
}

/// The `nft -f` input that removes `family`'s table, there or not.
pub fn removal_script(family: Family) -> String {
    let (ip, name) = (nft_family(family), table(family));
    format!("table {ip} {name} {{}}\ndelete table {ip} {name}\n")
}

/// Loads `script` as one transaction.
pub fn load(script: &str) -> Result<(), IptablesError> {
    exec::run("nft", &["-f", "-"], Some(script)).map(drop)
}

/// `family`'s table as nft lists it, `None` when it is not there.
pub fn current(family: Family) -> Result<Option<String>, IptablesError> {
    let (ip, name) = (nft_family(family), table(family));
    let tables = exec::run("nft", &["list", "tables", ip], None)?;
    let line = format!("table {ip} {name}");
    if !tables.lines().any(|l| l.trim() == line) {
        return Ok(None);
    }
    exec::run("nft", &["list", "table", ip, name], None).map(Some)
}

/// Removes `family`'s table; whether it was there. A host without nft has
/// none.
pub fn remove(family: Family) -> Result<bool, IptablesError> {
    let there = match current(family) {
        Ok(listed) => listed.is_some(),
        Err(IptablesError::Spawn { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            false
        }
        Err(e) => return Err(e),
    };
    if there {
        load(&removal_script(family))?;
    }
    Ok(there)
}

/// Whether the kernel takes `masquerade fully-random` (checked with `nft
/// -c`, which commits nothing), as flanneld checks it: once, in an `ip`
/// table, for both families.
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
            removal_script(Family::Ipv4),
            "table ip flannel-ipv4 {}\ndelete table ip flannel-ipv4\n"
        );
    }

    fn rules6(random_fully: bool) -> NftRules<ipnet::Ipv6Net> {
        NftRules {
            network: "fd00:10::/48".parse().unwrap(),
            subnet: "fd00:10:0:13::/64".parse().unwrap(),
            masq: true,
            random_fully,
            forward: true,
        }
    }

    /// B.5's golden `nft list chain ip6 flannel-ipv6 postrtg` and `forward`
    /// (flannel's e2e/rules.go form) with N = fd00:10::/48 and S =
    /// fd00:10:0:13::/64. Rule 4 is nft's (`!= S`, `N`), not iptables'.
    pub(crate) const POSTRTG6_GOLDEN: &str = "table ip6 flannel-ipv6 {
\tchain postrtg {
\t\tcomment \"chain to manage traffic masquerading by flannel\"
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tmeta mark 0x00004000 return
\t\tip6 saddr fd00:10:0:13::/64 ip6 daddr fd00:10::/48 return
\t\tip6 saddr fd00:10::/48 ip6 daddr fd00:10:0:13::/64 return
\t\tip6 saddr != fd00:10:0:13::/64 ip6 daddr fd00:10::/48 return
\t\tip6 saddr fd00:10::/48 ip6 daddr != ff00::/8 masquerade fully-random
\t\tip6 saddr != fd00:10::/48 ip6 daddr fd00:10::/48 masquerade fully-random
\t}
}";
    pub(crate) const FORWARD6_GOLDEN: &str = "table ip6 flannel-ipv6 {
\tchain forward {
\t\tcomment \"chain to accept flannel traffic\"
\t\ttype filter hook forward priority filter; policy accept;
\t\tip6 saddr fd00:10::/48 accept
\t\tip6 daddr fd00:10::/48 accept
\t}
}";

    /// What `nft list chain <family> <table> <chain>` prints of the table
    /// `listed` (as `nft list table` prints it): the table line, the chain,
    /// the closing brace, without the table's comment or other chains.
    fn chain_of(listed: &str, name: &str) -> String {
        let mut lines = listed.lines();
        let head = lines.next().unwrap().to_owned();
        let start = format!("\tchain {name} {{");
        let body: Vec<&str> = lines
            .skip_while(|l| *l != start)
            .take_while(|l| *l != "\t}")
            .collect();
        format!("{head}\n{}\n\t}}\n}}", body.join("\n"))
    }

    #[test]
    fn the_ipv6_table_is_flanneld_s_golden_one() {
        let listed = listed_text(&rules6(true));
        assert_eq!(chain_of(&listed, MASQ_CHAIN), POSTRTG6_GOLDEN);
        assert_eq!(chain_of(&listed, FORWARD_CHAIN), FORWARD6_GOLDEN);
        assert!(
            listed.starts_with("table ip6 flannel-ipv6 {\n\tcomment \"rules for flannel-ipv6\"\n"),
            "{listed}"
        );
        // What is loaded says the mark as flanneld writes it.
        assert!(table_text(&rules6(true)).contains("\t\tmeta mark 0x4000 return\n"),);
        let plain = listed_text(&rules6(false));
        assert_eq!(
            chain_of(&plain, MASQ_CHAIN),
            POSTRTG6_GOLDEN.replace(" fully-random", "")
        );
    }

    #[test]
    fn the_ipv4_listing_still_matches_flanneld_s_e2e_golden() {
        let listed = listed_text(&rules(true, true, true));
        assert_eq!(
            chain_of(&listed, MASQ_CHAIN),
            "table ip flannel-ipv4 {\n\tchain postrtg {\n\
             \t\tcomment \"chain to manage traffic masquerading by flannel\"\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tmeta mark 0x00004000 return\n\
             \t\tip saddr 10.0.13.0/24 ip daddr 10.0.0.0/16 return\n\
             \t\tip saddr 10.0.0.0/16 ip daddr 10.0.13.0/24 return\n\
             \t\tip saddr != 10.0.13.0/24 ip daddr 10.0.0.0/16 return\n\
             \t\tip saddr 10.0.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random\n\
             \t\tip saddr != 10.0.0.0/16 ip daddr 10.0.0.0/16 masquerade fully-random\n\
             \t}\n}"
        );
    }

    #[test]
    fn the_ipv6_scripts_name_the_ip6_table() {
        let s = apply_script(&rules6(true));
        assert!(s.starts_with(
            "table ip6 flannel-ipv6 {}\ndelete table ip6 flannel-ipv6\ntable ip6 flannel-ipv6 {\n"
        ));
        assert_eq!(
            removal_script(Family::Ipv6),
            "table ip6 flannel-ipv6 {}\ndelete table ip6 flannel-ipv6\n"
        );
        assert_eq!(describe(Family::Ipv6), "nft table ip6 flannel-ipv6");
        assert_eq!(describe(Family::Ipv4), "nft table ip flannel-ipv4");
    }
}
