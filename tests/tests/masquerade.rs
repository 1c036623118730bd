//! `--ip-masq` end to end, in both of flanneld's modes (iptables, and
//! nftables with `EnableNFTables: true`): the rules are flanneld's golden
//! ones, a container reaching an address outside the overlay (a namespace
//! standing for the internet) leaves with its host's address, while
//! container-to-container traffic across the overlay keeps the container's
//! own address; deleted rules come back, and restarting in the other mode
//! removes this mode's rules.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use overlay_tests::agent::{
    Agent, Cluster, Containers, Internet, add_container, sh, subnet_of, within,
};

const NETWORK: &str = "10.0.0.0/16";
const HOST_WAN: &str = Internet::HOST_ADDR;
const INTERNET: &str = Internet::ADDR;

/// flanneld's traffic managers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Iptables,
    Nftables,
}

impl Mode {
    fn config(self) -> String {
        let nft = match self {
            Mode::Iptables => "",
            Mode::Nftables => r#", "EnableNFTables": true"#,
        };
        format!(
            r#"{{"Network": "{NETWORK}", "SubnetLen": 24, "SubnetMin": "10.0.1.0","SubnetMax": "10.0.20.0", "Backend": {{"Type": "vxlan"}}{nft}}}"#
        )
    }

    fn other(self) -> Mode {
        match self {
            Mode::Iptables => Mode::Nftables,
            Mode::Nftables => Mode::Iptables,
        }
    }
}

/// tcpdump in `ns` for the first `count` ICMP echo requests, killed on drop.
struct Capture(Option<Child>);

impl Capture {
    fn start(ns: &str, dev: &str, count: &str) -> Result<Capture> {
        let child = Command::new("ip")
            .args([
                "netns", "exec", ns, "tcpdump", "-l", "-n", "-i", dev, "-c", count,
            ])
            .args(["icmp[icmptype] == icmp-echo"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        // tcpdump needs a moment to open the socket.
        std::thread::sleep(Duration::from_millis(700));
        Ok(Capture(Some(child)))
    }

    fn output(mut self) -> Result<String> {
        let mut child = self.0.take().context("captured already")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while child.try_wait()?.is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let out = child.wait_with_output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn iptables_mode_masquerades_to_the_internet_but_not_across_the_overlay() -> Result<()> {
    masquerading(Mode::Iptables)
}

#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn nftables_mode_masquerades_to_the_internet_but_not_across_the_overlay() -> Result<()> {
    masquerading(Mode::Nftables)
}

fn masquerading(mode: Mode) -> Result<()> {
    let tag = match mode {
        Mode::Iptables => "mq",
        Mode::Nftables => "mqn",
    };
    let cluster = Cluster::start(tag, 2, &mode.config())?;
    let args = |i: usize| cluster.args(i, &["--datapath=ebpf", "--ip-masq", "--iptables-resync=1"]);
    let Cluster { hosts, etcd, bin } = &cluster;
    let dir = etcd.dir().to_path_buf();
    let mut a1 = Agent::start(&dir, "h1", &hosts.ns(1), bin, &args(1))?;
    let mut a2 = Agent::start(&dir, "h2", &hosts.ns(2), bin, &args(2))?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    a2.wait_for("running: lease", Duration::from_secs(20))?;
    let (c1, ip1) = add_container(hosts, 1, &dir.join("h1.env"))?;
    let mut containers = Containers(vec![c1.clone()]);
    let (c2, ip2) = add_container(hosts, 2, &dir.join("h2.env"))?;
    containers.0.push(c2.clone());
    let h1 = hosts.ns(1);
    let pod1 = format!("{}/24", subnet_of(&dir.join("h1.env"))?);

    // The internet: a namespace behind host 1's second interface.
    let inet = Internet::behind(hosts, 1)?;

    within(Duration::from_secs(5), "c1 reaches c2", || {
        sh(&["ip", "netns", "exec", &c1, "ping", "-c1", "-W1", &ip2]).is_ok()
    })?;
    check_rules(&h1, mode, &pod1)?;

    // To the internet: the source is host 1's address.
    let cap = Capture::start(&inet.ns, "eth0", "3")?;
    let ping = sh(&[
        "ip", "netns", "exec", &c1, "ping", "-c3", "-i0.2", "-W1", INTERNET,
    ])?;
    ensure!(
        ping.contains("3 received"),
        "c1 cannot reach the internet:\n{ping}"
    );
    let seen = cap.output()?;
    ensure!(
        seen.lines()
            .filter(|l| l.contains(&format!("IP {HOST_WAN} > {INTERNET}")))
            .count()
            == 3,
        "the internet did not see host 1's address as the source:\n{seen}"
    );
    ensure!(!seen.contains(&ip1), "the pod address leaked:\n{seen}");

    // Across the overlay: the container's own address arrives.
    let cap = Capture::start(&c2, "eth0", "3")?;
    let ping = sh(&[
        "ip", "netns", "exec", &c1, "ping", "-c3", "-i0.2", "-W1", &ip2,
    ])?;
    ensure!(ping.contains("3 received"), "{ping}");
    let seen = cap.output()?;
    ensure!(
        seen.lines()
            .filter(|l| l.contains(&format!("IP {ip1} > {ip2}")))
            .count()
            == 3,
        "container-to-container traffic was rewritten:\n{seen}"
    );

    match mode {
        Mode::Iptables => {
            // Someone flushes our chain: the agent restores it.
            flush_and_wait_restored(&h1, "nat", "FLANNEL-POSTRTG", "-j MASQUERADE")?;
        }
        Mode::Nftables => {
            // Someone deletes our table, or empties a chain: the resync (1 s)
            // loads it again, exactly as it was.
            let golden = nft_golden(&pod1);
            for drift in [
                &["delete", "table", "ip", "flannel-ipv4"][..],
                &["flush", "chain", "ip", "flannel-ipv4", "postrtg"][..],
            ] {
                let mut cmd = vec!["ip", "netns", "exec", &h1, "nft"];
                cmd.extend(drift);
                sh(&cmd)?;
                within(Duration::from_secs(5), "nft table restored", || {
                    nft_table(&h1).is_ok_and(|t| t == golden)
                })
                .with_context(|| format!("after nft {drift:?}; agent log:\n{}", a1.log()))?;
            }
        }
    }
    let ping = sh(&["ip", "netns", "exec", &c1, "ping", "-c2", "-W1", INTERNET])?;
    ensure!(ping.contains("2 received"), "{ping}");
    // The fast path's mangle rule (iptables in both modes) is repaired too.
    flush_and_wait_restored(
        &h1,
        "mangle",
        "FLANNEL-FASTPATH",
        "--set-xmark 0x1000/0x1000",
    )?;

    // Restarted in the other mode, the agent removes this mode's rules and
    // installs the other's; masquerading still works.
    drop(a1);
    etcd.put("/coreos.com/network/config", &mode.other().config())?;
    let mut a1 = Agent::start(&dir, "h1b", &h1, bin, &args(1))?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    if within(Duration::from_secs(5), "the other mode's rules", || {
        check_rules(&h1, mode.other(), &pod1).is_ok()
    })
    .is_err()
    {
        // Its error says what differs.
        check_rules(&h1, mode.other(), &pod1)?;
    }
    let cap = Capture::start(&inet.ns, "eth0", "2")?;
    let ping = sh(&[
        "ip", "netns", "exec", &c1, "ping", "-c2", "-i0.2", "-W1", INTERNET,
    ])?;
    ensure!(ping.contains("2 received"), "{ping}");
    let seen = cap.output()?;
    ensure!(
        !seen.contains(&ip1) && seen.contains(&format!("IP {HOST_WAN} > {INTERNET}")),
        "not masqueraded after the switch:\n{seen}"
    );
    drop(containers);
    Ok(())
}

/// flanneld's golden iptables rules (flannel's `e2e/rules.go`) for host
/// `pod` in [`NETWORK`], as `iptables -S` prints them.
fn iptables_golden(pod: &str) -> [(&'static str, &'static str, String); 4] {
    let n = NETWORK;
    let masq = r#"-m comment --comment "flanneld masq""#;
    let fwd = r#"-m comment --comment "flanneld forward""#;
    [
        (
            "nat",
            "POSTROUTING",
            format!("-A POSTROUTING {masq} -j FLANNEL-POSTRTG\n"),
        ),
        (
            "nat",
            "FLANNEL-POSTRTG",
            format!(
                "-N FLANNEL-POSTRTG\n\
                 -A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {masq} -j RETURN\n\
                 -A FLANNEL-POSTRTG -s {pod} -d {n} {masq} -j RETURN\n\
                 -A FLANNEL-POSTRTG -s {n} -d {pod} {masq} -j RETURN\n\
                 -A FLANNEL-POSTRTG ! -s {n} -d {pod} {masq} -j RETURN\n\
                 -A FLANNEL-POSTRTG -s {n} ! -d 224.0.0.0/4 {masq} -j MASQUERADE --random-fully\n\
                 -A FLANNEL-POSTRTG ! -s {n} -d {n} {masq} -j MASQUERADE --random-fully\n"
            ),
        ),
        (
            "filter",
            "FORWARD",
            format!("-A FORWARD {fwd} -j FLANNEL-FWD\n"),
        ),
        (
            "filter",
            "FLANNEL-FWD",
            format!(
                "-N FLANNEL-FWD\n\
                 -A FLANNEL-FWD -s {n} {fwd} -j ACCEPT\n\
                 -A FLANNEL-FWD -d {n} {fwd} -j ACCEPT\n"
            ),
        ),
    ]
}

/// flanneld's nftables table (its `pkg/trafficmngr/nftables`) for host
/// `pod` in [`NETWORK`], as `nft list table` prints it.
fn nft_golden(pod: &str) -> String {
    let n = NETWORK;
    format!(
        "table ip flannel-ipv4 {{\n\
         \tcomment \"rules for flannel-ipv4\"\n\
         \tchain postrtg {{\n\
         \t\tcomment \"chain to manage traffic masquerading by flannel\"\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tmeta mark 0x00004000 return\n\
         \t\tip saddr {pod} ip daddr {n} return\n\
         \t\tip saddr {n} ip daddr {pod} return\n\
         \t\tip saddr != {pod} ip daddr {n} return\n\
         \t\tip saddr {n} ip daddr != 224.0.0.0/4 masquerade fully-random\n\
         \t\tip saddr != {n} ip daddr {n} masquerade fully-random\n\
         \t}}\n\
         \n\
         \tchain forward {{\n\
         \t\tcomment \"chain to accept flannel traffic\"\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tip saddr {n} accept\n\
         \t\tip daddr {n} accept\n\
         \t}}\n\
         }}\n"
    )
}

fn nft_table(ns: &str) -> Result<String> {
    sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "nft",
        "list",
        "table",
        "ip",
        "flannel-ipv4",
    ])
}

/// Host `ns` holds exactly `mode`'s rules of flanneld's and none of the
/// other mode's; the fast path's mangle chain is there in both.
fn check_rules(ns: &str, mode: Mode, pod: &str) -> Result<()> {
    let tables = sh(&["ip", "netns", "exec", ns, "nft", "list", "tables", "ip"])?;
    let has_table = tables.lines().any(|l| l.trim() == "table ip flannel-ipv4");
    let iptables = |table: &str, chain: Option<&str>| -> Result<String> {
        let mut cmd = vec!["ip", "netns", "exec", ns, "iptables", "-t", table, "-S"];
        cmd.extend(chain);
        sh(&cmd)
    };
    match mode {
        Mode::Iptables => {
            for (table, chain, want) in iptables_golden(pod) {
                let got: String = iptables(table, Some(chain))?
                    .lines()
                    .filter(|l| l.contains("FLANNEL"))
                    .map(|l| format!("{l}\n"))
                    .collect();
                ensure!(
                    got == want,
                    "iptables -t {table} -S {chain}:\n{got}\nwanted:\n{want}"
                );
            }
            ensure!(!has_table, "iptables mode left the nft table:\n{tables}");
        }
        Mode::Nftables => {
            let got = nft_table(ns)?;
            let want = nft_golden(pod);
            ensure!(got == want, "nft list table:\n{got}\nwanted:\n{want}");
            let nat = iptables("nat", None)?;
            let filter = iptables("filter", None)?;
            ensure!(
                !nat.contains("FLANNEL-") && !filter.contains("FLANNEL-"),
                "nftables mode left flanneld's iptables chains:\n{nat}\n{filter}"
            );
        }
    }
    let mangle = iptables("mangle", Some("FLANNEL-FASTPATH"))?;
    ensure!(
        mangle.contains("--set-xmark 0x1000/0x1000"),
        "the fast path's rule is missing:\n{mangle}"
    );
    Ok(())
}

/// Flushes one of the agent's chains in `ns` and waits (the resync is 1 s)
/// until it holds a rule containing `needle` again.
fn flush_and_wait_restored(ns: &str, table: &str, chain: &str, needle: &str) -> Result<()> {
    sh(&[
        "ip", "netns", "exec", ns, "iptables", "-t", table, "-F", chain,
    ])?;
    within(Duration::from_secs(5), &format!("{chain} restored"), || {
        sh(&[
            "ip", "netns", "exec", ns, "iptables", "-t", table, "-S", chain,
        ])
        .is_ok_and(|r| r.contains(needle))
    })?;
    Ok(())
}
