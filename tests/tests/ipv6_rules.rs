//! flanneld's IPv6 masquerade and forward rules (doc B.5), kept by the agent
//! with the real ip6tables and nft in a fresh namespace: what
//! `ip6tables -S`/`ip6tables-save` and `nft list chain` print is flanneld's
//! golden text (flannel's e2e/rules.go form), a deleted or reordered rule and
//! a deleted or flushed nft chain are put back, switching traffic manager
//! removes the other one's rules, and removal leaves nothing of ours (IPv4
//! beside it as before).

use std::time::Duration;

use anyhow::{Result, ensure};
use ipnet::{Ipv4Net, Ipv6Net};
use overlay_agent::ipmasq::{
    self, Family, RuleKeeper, Wanted,
    nft::{self, NftRules},
};
use overlay_tests::{
    agent::{Hosts, sh, within},
    netns,
};

const NET4: &str = "10.0.0.0/16";
const POD4: &str = "10.0.13.0/24";
/// N and S of doc B.5.
const NET6: &str = "fd00:10::/48";
const POD6: &str = "fd00:10:0:13::/64";

/// flanneld's `masqIP6Rules` as `ip6tables -t nat -S POSTROUTING` (our
/// line) and `-S FLANNEL-POSTRTG` print them (B.5, e2e form).
const POSTRTG6_GOLDEN: &str = "\
-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG
-N FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN
-A FLANNEL-POSTRTG -s fd00:10:0:13::/64 -d fd00:10::/48 -m comment --comment \"flanneld masq\" -j RETURN
-A FLANNEL-POSTRTG -s fd00:10::/48 -d fd00:10:0:13::/64 -m comment --comment \"flanneld masq\" -j RETURN
-A FLANNEL-POSTRTG ! -s fd00:10::/48 -d fd00:10:0:13::/64 -m comment --comment \"flanneld masq\" -j RETURN
-A FLANNEL-POSTRTG -s fd00:10::/48 ! -d ff00::/8 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s fd00:10::/48 -d fd00:10::/48 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully
";
/// The forward rules as `ip6tables -t filter -S FORWARD` (our line) and
/// `-S FLANNEL-FWD` print them.
const FWD6_GOLDEN: &str = "\
-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD
-N FLANNEL-FWD
-A FLANNEL-FWD -s fd00:10::/48 -m comment --comment \"flanneld forward\" -j ACCEPT
-A FLANNEL-FWD -d fd00:10::/48 -m comment --comment \"flanneld forward\" -j ACCEPT
";
/// `nft list chain ip6 flannel-ipv6 postrtg` (B.5; rule 4 is nft's own).
const NFT_POSTRTG6_GOLDEN: &str = "table ip6 flannel-ipv6 {
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
}
";
/// `nft list chain ip6 flannel-ipv6 forward`.
const NFT_FWD6_GOLDEN: &str = "table ip6 flannel-ipv6 {
\tchain forward {
\t\tcomment \"chain to accept flannel traffic\"
\t\ttype filter hook forward priority filter; policy accept;
\t\tip6 saddr fd00:10::/48 accept
\t\tip6 daddr fd00:10::/48 accept
\t}
}
";

fn net4() -> (Ipv4Net, Ipv4Net) {
    (NET4.parse().unwrap(), POD4.parse().unwrap())
}

fn net6() -> (Ipv6Net, Ipv6Net) {
    (NET6.parse().unwrap(), POD6.parse().unwrap())
}

/// flanneld's iptables-mode rules for both families, IPv4's first.
fn dual_rules() -> Vec<ipmasq::Rule> {
    let ((n4, s4), (n6, s6)) = (net4(), net6());
    let mut r = ipmasq::masq_rules(n4, s4, true);
    r.extend(ipmasq::forward_rules(n4));
    r.extend(ipmasq::masq_rules(n6, s6, true));
    r.extend(ipmasq::forward_rules(n6));
    r
}

fn nft6() -> NftRules<Ipv6Net> {
    let (network, subnet) = net6();
    NftRules {
        network,
        subnet,
        masq: true,
        random_fully: true,
        forward: true,
    }
}

fn nft4() -> NftRules<Ipv4Net> {
    let (network, subnet) = net4();
    NftRules {
        network,
        subnet,
        masq: true,
        random_fully: true,
        forward: true,
    }
}

fn in_ns<'a>(ns: &'a str, cmd: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(cmd);
    v
}

/// Our lines of `<iptables> -t <table> -S <builtin>` then all of
/// `-S <chain>`, as flannel's e2e reads them; empty on an error (a chain
/// that is not there).
fn listed(ns: &str, iptables: &str, table: &str, builtin: &str, chain: &str) -> String {
    let s = |c: &str| sh(&in_ns(ns, &[iptables, "-t", table, "-S", c])).unwrap_or_default();
    let mut out: String = s(builtin)
        .lines()
        .filter(|l| l.contains("FLANNEL"))
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str(&s(chain));
    out
}

fn postrtg6(ns: &str) -> String {
    listed(ns, "ip6tables", "nat", "POSTROUTING", "FLANNEL-POSTRTG")
}

fn fwd6(ns: &str) -> String {
    listed(ns, "ip6tables", "filter", "FORWARD", "FLANNEL-FWD")
}

/// The `-A` lines of ours in `ip6tables-save -t <table>`.
fn saved6(ns: &str, table: &str) -> Result<String> {
    Ok(sh(&in_ns(ns, &["ip6tables-save", "-t", table]))?
        .lines()
        .filter(|l| l.starts_with("-A") && l.contains("FLANNEL"))
        .map(|l| format!("{l}\n"))
        .collect())
}

/// The golden text without its `-N` line: what `ip6tables-save` has.
fn without_n(golden: &str) -> String {
    golden
        .lines()
        .filter(|l| !l.starts_with("-N"))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn nft_chain(ns: &str, chain: &str) -> String {
    sh(&in_ns(
        ns,
        &["nft", "list", "chain", "ip6", "flannel-ipv6", chain],
    ))
    .unwrap_or_default()
}

/// Nothing of flanneld's or ours in either family's iptables, and no
/// flannel nft table.
fn nothing_left(ns: &str) -> Result<()> {
    for save in ["iptables-save", "ip6tables-save"] {
        let all = sh(&in_ns(ns, &[save]))?;
        ensure!(!all.contains("FLANNEL"), "{save} left:\n{all}");
    }
    let ruleset = sh(&in_ns(ns, &["nft", "list", "ruleset"]))?;
    ensure!(!ruleset.contains("flannel"), "nft left:\n{ruleset}");
    Ok(())
}

const WAIT: Duration = Duration::from_secs(5);

/// `ipmasq::ensure` with both families: the ip6tables rules are flanneld's
/// golden ones beside the IPv4 ones, a second run changes nothing, a deleted
/// masquerade rule, a deleted jump and a reordered forward chain are put
/// back in one `ip6tables-restore` per table (IPv4 untouched), and
/// `remove_all` leaves nothing.
#[test]
#[ignore = "needs root and network namespaces: run `cargo xtask test`"]
fn ip6tables_rules_are_flanneld_s_and_are_repaired_and_removed() -> Result<()> {
    let hosts = Hosts::new("i6", 1)?;
    let h1 = hosts.ns(1);
    let first = netns::run_in(&h1, || Ok(ipmasq::ensure(&dual_rules())?))?;
    ensure!(
        first
            == [
                "iptables -t nat chain FLANNEL-POSTRTG (6 rules)",
                "iptables -t nat POSTROUTING jump to FLANNEL-POSTRTG",
                "iptables -t filter chain FLANNEL-FWD (2 rules)",
                "iptables -t filter FORWARD jump to FLANNEL-FWD",
                "ip6tables -t nat chain FLANNEL-POSTRTG (6 rules)",
                "ip6tables -t nat POSTROUTING jump to FLANNEL-POSTRTG",
                "ip6tables -t filter chain FLANNEL-FWD (2 rules)",
                "ip6tables -t filter FORWARD jump to FLANNEL-FWD",
            ],
        "{first:?}"
    );
    ensure!(
        postrtg6(&h1) == POSTRTG6_GOLDEN,
        "ip6tables nat:\n{}\nwanted:\n{POSTRTG6_GOLDEN}",
        postrtg6(&h1)
    );
    ensure!(fwd6(&h1) == FWD6_GOLDEN, "ip6tables filter:\n{}", fwd6(&h1));
    ensure!(saved6(&h1, "nat")? == without_n(POSTRTG6_GOLDEN));
    ensure!(saved6(&h1, "filter")? == without_n(FWD6_GOLDEN));
    // IPv4's chain holds IPv4's rules (the families do not mix).
    let nat4 = listed(&h1, "iptables", "nat", "POSTROUTING", "FLANNEL-POSTRTG");
    ensure!(
        nat4.contains("-s 10.0.0.0/16 ! -d 224.0.0.0/4") && !nat4.contains("fd00"),
        "{nat4}"
    );
    let second = netns::run_in(&h1, || Ok(ipmasq::ensure(&dual_rules())?))?;
    ensure!(second.is_empty(), "a second run changed {second:?}");

    // A masquerade rule and the FORWARD jump deleted, FLANNEL-FWD reordered
    // with a foreign rule appended.
    for cmd in [
        &["ip6tables", "-t", "nat", "-D", "FLANNEL-POSTRTG", "3"][..],
        &[
            "ip6tables",
            "-D",
            "FORWARD",
            "-m",
            "comment",
            "--comment",
            "flanneld forward",
            "-j",
            "FLANNEL-FWD",
        ][..],
        &["ip6tables", "-D", "FLANNEL-FWD", "1"][..],
        &[
            "ip6tables",
            "-A",
            "FLANNEL-FWD",
            "-s",
            NET6,
            "-m",
            "comment",
            "--comment",
            "flanneld forward",
            "-j",
            "ACCEPT",
        ][..],
        &["ip6tables", "-A", "FLANNEL-FWD", "-j", "RETURN"][..],
    ] {
        sh(&in_ns(&h1, cmd))?;
    }
    ensure!(postrtg6(&h1) != POSTRTG6_GOLDEN && fwd6(&h1) != FWD6_GOLDEN);
    let third = netns::run_in(&h1, || Ok(ipmasq::ensure(&dual_rules())?))?;
    ensure!(
        third
            == [
                "ip6tables -t nat chain FLANNEL-POSTRTG (6 rules)",
                "ip6tables -t filter chain FLANNEL-FWD (2 rules)",
                "ip6tables -t filter FORWARD jump to FLANNEL-FWD",
            ],
        "{third:?}"
    );
    ensure!(postrtg6(&h1) == POSTRTG6_GOLDEN, "{}", postrtg6(&h1));
    ensure!(fwd6(&h1) == FWD6_GOLDEN, "{}", fwd6(&h1));

    let removed = netns::run_in(&h1, || Ok(ipmasq::remove_all()?))?;
    for want in [
        "iptables -t nat chain FLANNEL-POSTRTG",
        "ip6tables -t nat POSTROUTING jump to FLANNEL-POSTRTG",
        "ip6tables -t nat chain FLANNEL-POSTRTG",
        "ip6tables -t filter FORWARD jump to FLANNEL-FWD",
        "ip6tables -t filter chain FLANNEL-FWD",
    ] {
        ensure!(removed.iter().any(|r| r == want), "{want}: {removed:?}");
    }
    ensure!(removed.len() == 8, "{removed:?}");
    nothing_left(&h1)?;
    let again = netns::run_in(&h1, || Ok(ipmasq::remove_all()?))?;
    ensure!(again.is_empty(), "{again:?}");
    Ok(())
}

/// The keeper with both families: in iptables mode it installs and resyncs
/// the ip6tables rules; switched to nftables mode it removes them and loads
/// `ip6 flannel-ipv6` as flanneld's golden chains, puts a flushed chain and
/// a deleted table back, drops the table when IPv6 is no longer wanted; and
/// `remove_all` (cleanup) takes both tables.
#[test]
#[ignore = "needs root and network namespaces: run `cargo xtask test`"]
fn the_keeper_keeps_ipv6_rules_in_both_modes() -> Result<()> {
    let hosts = Hosts::new("k6", 1)?;
    let h1 = hosts.ns(1);
    // Started inside the namespace: its thread lives there.
    let keeper = netns::run_in(&h1, || Ok(RuleKeeper::start(Duration::from_millis(200))?))?;
    let keep = |w: Wanted| -> Result<()> {
        keeper.keep(w).blocking_recv()?;
        Ok(())
    };

    // iptables mode.
    keep(Wanted {
        iptables: dual_rules(),
        nft: None,
        nft6: None,
    })?;
    ensure!(postrtg6(&h1) == POSTRTG6_GOLDEN, "{}", postrtg6(&h1));
    ensure!(fwd6(&h1) == FWD6_GOLDEN, "{}", fwd6(&h1));
    sh(&in_ns(
        &h1,
        &["ip6tables", "-t", "nat", "-D", "FLANNEL-POSTRTG", "2"],
    ))?;
    sh(&in_ns(&h1, &["ip6tables", "-D", "FLANNEL-FWD", "1"]))?;
    within(WAIT, "ip6tables rules resynced", || {
        postrtg6(&h1) == POSTRTG6_GOLDEN && fwd6(&h1) == FWD6_GOLDEN
    })?;

    // nftables mode: flanneld's iptables chains go, in both families.
    keep(Wanted {
        iptables: Vec::new(),
        nft: Some(nft4()),
        nft6: Some(nft6()),
    })?;
    for save in ["iptables-save", "ip6tables-save"] {
        let all = sh(&in_ns(&h1, &[save]))?;
        ensure!(!all.contains("FLANNEL"), "{save} in nftables mode:\n{all}");
    }
    ensure!(
        nft_chain(&h1, "postrtg") == NFT_POSTRTG6_GOLDEN,
        "nft list chain ip6 flannel-ipv6 postrtg:\n{}\nwanted:\n{NFT_POSTRTG6_GOLDEN}",
        nft_chain(&h1, "postrtg")
    );
    ensure!(
        nft_chain(&h1, "forward") == NFT_FWD6_GOLDEN,
        "{}",
        nft_chain(&h1, "forward")
    );
    let table = sh(&in_ns(
        &h1,
        &["nft", "list", "table", "ip6", "flannel-ipv6"],
    ))?;
    ensure!(table == nft::listed_text(&nft6()), "{table}");
    ensure!(table.contains("\tcomment \"rules for flannel-ipv6\"\n"));
    let v4 = sh(&in_ns(&h1, &["nft", "list", "table", "ip", "flannel-ipv4"]))?;
    ensure!(v4 == nft::listed_text(&nft4()), "{v4}");
    for break_it in [
        &["nft", "flush", "chain", "ip6", "flannel-ipv6", "postrtg"][..],
        &["nft", "delete", "table", "ip6", "flannel-ipv6"][..],
    ] {
        sh(&in_ns(&h1, break_it))?;
        within(WAIT, "ip6 flannel-ipv6 loaded again", || {
            nft_chain(&h1, "postrtg") == NFT_POSTRTG6_GOLDEN
                && nft_chain(&h1, "forward") == NFT_FWD6_GOLDEN
        })?;
    }
    ensure!(
        netns::run_in(&h1, || Ok(nft::current(Family::Ipv6)?))? == Some(nft::listed_text(&nft6()))
    );

    // No IPv6Network any more: the v6 table goes, the v4 one stays.
    keep(Wanted {
        iptables: Vec::new(),
        nft: Some(nft4()),
        nft6: None,
    })?;
    let tables = sh(&in_ns(&h1, &["nft", "list", "tables"]))?;
    ensure!(
        tables.contains("table ip flannel-ipv4") && !tables.contains("flannel-ipv6"),
        "{tables}"
    );

    // Back to both, then cleanup's removal takes both tables.
    keep(Wanted {
        iptables: Vec::new(),
        nft: Some(nft4()),
        nft6: Some(nft6()),
    })?;
    drop(keeper);
    // A resync under way when the handle went finishes before the thread
    // sees it gone.
    std::thread::sleep(Duration::from_secs(1));
    let removed = netns::run_in(&h1, || Ok(ipmasq::remove_all()?))?;
    ensure!(
        removed == ["nft table ip flannel-ipv4", "nft table ip6 flannel-ipv6"],
        "{removed:?}"
    );
    nothing_left(&h1)?;
    Ok(())
}
