//! The fast path for IPv6, end to end between two dual-stack eBPF agents
//! (their default `--fast-path=auto`), pods on `cni0` with flannel's
//! addresses in both families.
//!
//! Proof of path: an ICMPv6 echo stream between the pods takes the fast
//! path on both nodes once conntrack saw it established (`fast_egress` on
//! the sender, `fast_ingress` on the receiver), and bulk TCP toward a pod
//! leaves the receiver's `flannel-v6.1` flat. Neighbour discovery stays the
//! host's (the pods keep resolving each other's gateway).
//!
//! Policy kept, with ip6tables: a FORWARD DROP for one port on either node
//! refuses new connections to it while another port works; short
//! connections leave no ESTABLISHED conntrack entry; a long echo flow keeps
//! its conntrack entry past a (shortened) timeout; a DROP added while an
//! echo stream is on the fast path stops it within a second; a connection
//! to a DNAT'ed IPv6 service address works and never takes the fast path on
//! the node that translates it.

use std::{
    net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use overlay_agent::{datapath::ebpf::Counters, datapath::pins::PinLayout, inspect};
use overlay_common::counters::Reason;
use overlay_tests::{
    agent::{
        Agent, Bpffs, Cluster, Containers, Hosts, add_container, add_container_ipv6, sh, within,
    },
    dual_stack::{agent_args, ping6},
    etcd::Etcd,
    netns,
    stats::dev_stats,
    traffic,
};

const CONFIG: &str = r#"{"EnableIPv6":true,"Network":"10.0.0.0/16","SubnetMin":"10.0.1.0","SubnetMax":"10.0.16.0","IPv6Network":"fd10:0:0::/48","IPv6SubnetMax":"fd10:0:0:10::","Backend":{"Type":"vxlan"}}"#;

/// What the test needs of a node: its namespace and its pinned maps.
struct Node {
    ns: String,
    pins: PathBuf,
}

impl Node {
    fn counters(&self) -> Result<Counters> {
        Ok(inspect::read(&PinLayout::chosen(Some(&self.pins)))?
            .with_context(|| format!("no pinned eBPF state on {}", self.ns))?
            .counters)
    }

    /// `conntrack -L -f ipv6` lines that mention `ip` and contain `word`.
    fn conntrack(&self, ip: &str, word: &str) -> Result<Vec<String>> {
        let out = sh(&[
            "ip",
            "netns",
            "exec",
            &self.ns,
            "conntrack",
            "-L",
            "-f",
            "ipv6",
        ])?;
        Ok(out
            .lines()
            .filter(|l| l.contains(ip) && l.contains(word))
            .map(str::to_owned)
            .collect())
    }

    fn ip6tables(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["ip", "netns", "exec", &self.ns, "ip6tables", "-w"];
        a.extend_from_slice(args);
        sh(&a)
    }
}

/// Packets a reason gained between two readings.
fn gained(before: &Counters, after: &Counters, r: Reason) -> u64 {
    after.get(r).packets - before.get(r).packets
}

/// A ping6 stream from `ns`: `count` requests `gap` apart; (sent, received,
/// the output with `-D` timestamps).
fn ping6_stream(ns: &str, dst: &str, count: u32, gap: &str) -> Result<(u64, u64, String)> {
    let count = count.to_string();
    let out = sh(&[
        "ip", "netns", "exec", ns, "ping", "-6", "-D", "-n", "-i", gap, "-c", &count, "-W", "1",
        dst,
    ])
    .or_else(|e| {
        // ping exits 1 when replies were lost; its output is still what we read.
        e.chain()
            .find_map(|c| {
                c.to_string()
                    .contains("packets transmitted")
                    .then(|| c.to_string())
            })
            .context("ping6 stream")
    })?;
    let (sent, received) = traffic::ping_summary(&out)?;
    Ok((sent, received, out))
}

/// The `-D` timestamp (seconds since the epoch) of ping's last reply line.
fn last_reply_at(out: &str) -> Option<f64> {
    out.lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .next_back()
}

fn now_epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A TCP listener in namespace `ns` (the socket stays there).
fn listen(ns: &str, ip: &str, port: u16) -> Result<TcpListener> {
    let at = SocketAddr::new(ip.parse::<Ipv6Addr>()?.into(), port);
    netns::run_in(ns, move || Ok(TcpListener::bind(at)?))
}

/// Whether a TCP connection from `ns` to `dst` is accepted within 2 s.
fn connects(ns: &str, dst: SocketAddr) -> Result<bool> {
    netns::run_in(ns, move || {
        Ok(TcpStream::connect_timeout(&dst, Duration::from_secs(2)).is_ok())
    })
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn ipv6_pod_traffic_takes_the_fast_path_as_the_firewall_allows() -> Result<()> {
    Cluster::run("fp6", 2, CONFIG, |c| fast_path6(&c.hosts, &c.etcd, &c.bin))
}

fn fast_path6(hosts: &Hosts, etcd: &Etcd, bin: &Path) -> Result<()> {
    hosts.add_ipv6()?;
    let dir = etcd.dir().to_path_buf();
    let bpffs = Bpffs::mount(dir.join("bpf"))?;
    let env = |i: usize| dir.join(format!("h{i}.env"));
    let args = |i: usize| agent_args(etcd, hosts, &bpffs.0, i, "ebpf");
    let mut a1 = Agent::start(&dir, "h1", &hosts.ns(1), bin, &args(1))?;
    let mut a2 = Agent::start(&dir, "h2", &hosts.ns(2), bin, &args(2))?;
    for a in [&mut a1, &mut a2] {
        a.wait_for("running: lease", Duration::from_secs(20))?;
        ensure!(
            a.log().contains("fast path for IPv6 on"),
            "no IPv6 fast path:\n{}",
            a.log()
        );
    }
    let node = |i: usize| Node {
        ns: hosts.ns(i),
        pins: bpffs.0.join(format!("h{i}")),
    };
    let (n1, n2) = (node(1), node(2));
    let (c1, _) = add_container(hosts, 1, &env(1))?;
    let (c2, _) = add_container(hosts, 2, &env(2))?;
    let _containers = Containers(vec![c1.clone(), c2.clone()]);
    let v6_1 = add_container_ipv6(&hosts.ns(1), &c1, &env(1))?;
    let v6_2 = add_container_ipv6(&hosts.ns(2), &c2, &env(2))?;
    within(Duration::from_secs(5), "c1 -> c2 over IPv6", || {
        ping6(&c1, &v6_2)
    })?;
    within(Duration::from_secs(5), "c2 -> c1 over IPv6", || {
        ping6(&c2, &v6_1)
    })?;
    // The agents attach to the pods' veths when they appear; a ping that
    // lands before, and the approvals it leaves, are not what we measure.
    std::thread::sleep(Duration::from_millis(500));

    // An echo stream: after the first exchange conntrack calls it
    // established, the host's rule marks it, and both directions go fast.
    let (b1, b2) = (n1.counters()?, n2.counters()?);
    let (sent, received, out) = ping6_stream(&c1, &v6_2, 300, "0.01")?;
    let (a1c, a2c) = (n1.counters()?, n2.counters()?);
    ensure!(sent == 300 && received == 300, "ping6 stream: {out}");
    for (who, before, after) in [("node 1", &b1, &a1c), ("node 2", &b2, &a2c)] {
        let (egress, ingress) = (
            gained(before, after, Reason::FastEgress),
            gained(before, after, Reason::FastIngress),
        );
        // Requests leave node 1 and reach node 2 fast, replies the other
        // way; one packet a second per direction renews the approval.
        ensure!(
            egress >= 280 && ingress >= 280,
            "{who}: {egress} fast_egress, {ingress} fast_ingress for 300 echo exchanges: {after:?}"
        );
        for r in [
            Reason::DropFastSpoofedSource,
            Reason::DropSourceVtepMismatch,
            Reason::DropRedirectFailed,
            Reason::DropAdjustFailed,
        ] {
            ensure!(
                gained(before, after, r) == 0,
                "{who}: {r:?} grew: {after:?}"
            );
        }
    }

    // Bulk TCP toward c2: node 2 delivers it into the pod without
    // flannel-v6.1 (whose receive counter would carry every byte on the
    // host's path). What c1 sends in aggregates takes node 1's host path.
    let v6 = |s: &str| -> Result<Ipv6Addr> { Ok(s.parse()?) };
    let bytes: u64 = 32 << 20;
    let before = dev_stats(&n2.ns, "flannel-v6.1")?;
    traffic::tcp_transfer(&c1, &c2, v6(&v6_2)?, 5701, bytes)?;
    let after = dev_stats(&n2.ns, "flannel-v6.1")?;
    let through = after.rx_bytes - before.rx_bytes;
    ensure!(
        through < bytes / 100,
        "{through} of {bytes} bytes went through node 2's flannel-v6.1"
    );

    // A FORWARD DROP for one port on either node refuses new connections
    // to it; another port still works (new connections are always the
    // host's).
    let _listeners = [listen(&c2, &v6_2, 5702)?, listen(&c2, &v6_2, 5703)?];
    let to = |port| -> Result<SocketAddr> { Ok(SocketAddr::new(v6(&v6_2)?.into(), port)) };
    let drop_5702 = ["FORWARD", "-p", "tcp", "--dport", "5702", "-j", "DROP"];
    for n in [&n1, &n2] {
        n.ip6tables(&[&["-I"], &drop_5702[..]].concat())?;
        ensure!(
            !connects(&c1, to(5702)?)?,
            "a connection through {}'s DROP went through",
            n.ns
        );
        ensure!(connects(&c1, to(5703)?)?, "no connection to the open port");
        n.ip6tables(&[&["-D"], &drop_5702[..]].concat())?;
    }
    ensure!(
        connects(&c1, to(5702)?)?,
        "no connection once the DROPs went"
    );

    // Short connections: conntrack saw every FIN, none stays ESTABLISHED.
    for i in 0..50u16 {
        traffic::tcp_transfer(&c1, &c2, v6(&v6_2)?, 6000 + i, 2048)?;
    }
    for n in [&n1, &n2] {
        let established = n.conntrack(&v6_2, "ESTABLISHED")?;
        ensure!(
            established.is_empty(),
            "{}: conntrack still has ESTABLISHED entries: {established:#?}",
            n.ns
        );
    }

    // A long echo flow on the fast path keeps its conntrack entry: with the
    // ICMPv6 timeout at 2 s, 6 s of pings would lose it if the fast path hid
    // the flow from conntrack; the renewals keep it.
    for n in [&n1, &n2] {
        netns::sysctl(&n.ns, &[("net.netfilter.nf_conntrack_icmpv6_timeout", "2")])?;
    }
    let before = n2.counters()?;
    let entries = std::thread::scope(|s| -> Result<Vec<usize>> {
        let stream = s.spawn(|| ping6_stream(&c1, &v6_2, 120, "0.05"));
        std::thread::sleep(Duration::from_secs(4));
        let seen = [&n1, &n2]
            .iter()
            .map(|n| Ok(n.conntrack(&v6_2, "icmpv6")?.len()))
            .collect::<Result<Vec<usize>>>()?;
        let (sent, received, out) = stream
            .join()
            .map_err(|_| anyhow::anyhow!("ping6 thread"))??;
        ensure!(sent == received, "long echo flow: {out}");
        Ok(seen)
    })?;
    ensure!(
        entries.iter().all(|&n| n > 0),
        "the long echo flow's conntrack entry expired while it ran: {entries:?}"
    );
    let fast = gained(&before, &n2.counters()?, Reason::FastIngress);
    ensure!(
        fast >= 100,
        "the long echo flow hardly took the fast path: {fast}"
    );

    // A DROP added while an echo stream is on the fast path stops it within
    // a second: the next renewal meets the rule, nothing approves again.
    let drop_rule = [
        "FORWARD",
        "-p",
        "ipv6-icmp",
        "--icmpv6-type",
        "echo-request",
        "-s",
        &v6_1,
        "-j",
        "DROP",
    ];
    let (ruled_at, (sent, received, out)) = std::thread::scope(|s| -> Result<_> {
        let stream = s.spawn(|| ping6_stream(&c1, &v6_2, 400, "0.01"));
        std::thread::sleep(Duration::from_millis(1500));
        let mut insert = vec!["-I"];
        insert.extend_from_slice(&drop_rule);
        n2.ip6tables(&insert)?;
        let at = now_epoch();
        let result = stream
            .join()
            .map_err(|_| anyhow::anyhow!("ping6 thread"))??;
        Ok((at, result))
    })?;
    let mut delete = vec!["-D"];
    delete.extend_from_slice(&drop_rule);
    n2.ip6tables(&delete)?;
    let last = last_reply_at(&out).context("no reply at all")?;
    ensure!(
        received < sent && last - ruled_at < 1.2,
        "replies went on {:.2} s after the DROP ({received} of {sent}):\n{out}",
        last - ruled_at
    );

    // A service address on node 1, DNAT'ed to c2: the connection works,
    // and node 1 (which translates it) never takes the fast path for it.
    let service = "fd00:5::10";
    let dnat = [
        "PREROUTING",
        "-d",
        service,
        "-p",
        "tcp",
        "--dport",
        "80",
        "-j",
        "DNAT",
        "--to-destination",
    ];
    let to = format!("[{v6_2}]:5704");
    let mut add = vec!["-t", "nat", "-I"];
    add.extend_from_slice(&dnat);
    add.push(&to);
    n1.ip6tables(&add)?;
    let before = n1.counters()?;
    let t0 = Instant::now();
    traffic::tcp_transfer_via(
        &c1,
        &c2,
        SocketAddr::new(v6(&v6_2)?.into(), 5704),
        SocketAddr::new(v6(service)?.into(), 80),
        4 << 20,
    )?;
    let after = n1.counters()?;
    let mut del = vec!["-t", "nat", "-D"];
    del.extend_from_slice(&dnat);
    del.push(&to);
    n1.ip6tables(&del)?;
    for r in [Reason::FastEgress, Reason::FastIngress] {
        ensure!(
            gained(&before, &after, r) == 0,
            "node 1 took the fast path ({r:?}) for a DNAT'ed connection ({:?}): {after:?}",
            t0.elapsed()
        );
    }
    drop((a1, a2));
    Ok(())
}
