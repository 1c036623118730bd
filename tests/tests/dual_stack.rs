//! Dual stack (flannel's `EnableIPv6`) end to end: two agents (kernel
//! datapath, and `--datapath auto`, which lands on the eBPF one) on a
//! dual-stack underlay take dual-stack leases (flannel's key and JSON),
//! write subnet.env's IPv6 lines, set up `flannel-v6.<VNI>`, and their
//! containers reach each other over IPv6 and IPv4 (ping6, and TCP with a
//! digest both ways between the eBPF node and each kernel node); on the
//! wire, the eBPF node's IPv6 VXLAN has hop limit 64, the v6 VTEPs' MACs and
//! an outer UDP checksum tshark verifies; a peer's lease
//! without an IPv6 half (an IPv4-only node) is served on IPv4; a killed and
//! restarted agent (each datapath) loses no ping6 of a stream through it; `--ip-masq`
//! keeps flannel's ip6tables rules; forged IPv6 VXLAN from an address that
//! holds no lease reaches the flanneld host's pod and neither of ours (the
//! guard's `ip6` rule drops and counts it). A third host is a flanneld stand-in:
//! its devices made with iproute2 as flanneld makes them, its lease written
//! as flanneld writes it, our leases programmed with flanneld's commands.

use std::{
    net::{Ipv6Addr, SocketAddr, UdpSocket},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use overlay_agent::{
    datapath::{pins::PinLayout, vtep_guard},
    inspect,
};
use overlay_common::counters::Reason;
use overlay_tests::{
    agent::{
        Agent, Bpffs, Cluster, Containers, Hosts, add_container, add_container_ipv6, env_var,
        link_mac, sh, within,
    },
    capture::{self, Capture},
    dual_stack::{agent_args, ping6},
    etcd::Etcd,
    frames, netns,
    traffic::{self, UdpListener},
};

const PREFIX: &str = "/coreos.com/network";
const CONFIG: &str = r#"{"EnableIPv6":true,"Network":"10.0.0.0/16","SubnetMin":"10.0.1.0","SubnetMax":"10.0.16.0","IPv6Network":"fd10:0:0::/48","IPv6SubnetMax":"fd10:0:0:10::","Backend":{"Type":"vxlan"}}"#;

/// Forged datagrams per victim.
const FORGED: usize = 20;
const ATTACK_PORT: u16 = 7777;

/// The nft guard's drops of VXLAN on namespace `ns`.
fn guard_drops(ns: &str) -> Result<u64> {
    let c = netns::run_in(ns, || Ok(vtep_guard::counters()?))?
        .with_context(|| format!("no nft table {} on {ns}", vtep_guard::TABLE))?;
    Ok(c.unknown_vtep + c.spoofed_source)
}

/// Sends [`FORGED`] VXLAN datagrams over a plain UDP socket from
/// `from` (namespace, source address) to `victim`:8472, each framed to the
/// victim's v6 VTEP MAC `mac` and carrying UDP to `pod` (in namespace `c`),
/// as if another node's pod had sent it; returns how many `pod` received.
fn forge_ipv6_vxlan(
    from: &(String, String),
    victim: &str,
    mac: &str,
    c: &str,
    pod: &str,
) -> Result<usize> {
    let pod_ip: Ipv6Addr = pod.parse()?;
    let mac: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()?;
    let mac: [u8; 6] = mac
        .try_into()
        .map_err(|_| anyhow::anyhow!("a MAC of 6 bytes"))?;
    let inner_src: Ipv6Addr = "fd10:0:0:ee::5".parse()?;
    let payloads: Vec<Vec<u8>> = (0..FORGED as u32)
        .map(|seq| {
            let ip = frames::ipv6_udp(
                inner_src.octets(),
                pod_ip.octets(),
                (5555, ATTACK_PORT),
                &seq.to_be_bytes(),
            );
            let mut p = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
            p.extend_from_slice(&frames::eth(mac, [0x02, 0, 0, 0, 0x66, 0x66], 0x86dd, &ip));
            p
        })
        .collect();
    let listener = UdpListener::start(c, pod_ip, ATTACK_PORT)?;
    let (ns, src) = (from.0.clone(), from.1.parse::<Ipv6Addr>()?);
    let dst = SocketAddr::new(victim.parse::<Ipv6Addr>()?.into(), 8472);
    netns::run_in(&ns, move || {
        let sock = UdpSocket::bind(SocketAddr::new(src.into(), 0))?;
        for p in payloads {
            sock.send_to(&p, dst)
                .with_context(|| format!("sending to {dst}"))?;
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    })?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(listener.finish()?.len())
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn two_dual_stack_agents_reach_each_other_over_both_families() -> Result<()> {
    // The agents' logs go with a failure: on a CI machine they are all
    // that tells a slow event from a failed one.
    Cluster::run("ds", 3, CONFIG, |c| {
        both_families(&c.hosts, &c.etcd, &c.bin)
    })
}

fn both_families(hosts: &Hosts, etcd: &Etcd, bin: &Path) -> Result<()> {
    hosts.add_ipv6()?;
    let dir = etcd.dir().to_path_buf();
    let bpffs = Bpffs::mount(dir.join("bpf"))?;
    let pins = |i: usize| bpffs.0.join(format!("h{i}"));
    let env = |i: usize| dir.join(format!("h{i}.env"));
    let args = |i: usize, dp: &str| {
        let mut a = agent_args(etcd, hosts, &bpffs.0, i, dp);
        a.push("--ip-masq".into());
        a
    };
    let mut a1 = Agent::start(&dir, "h1", &hosts.ns(1), bin, &args(1, "kernel"))?;
    let mut a2 = Agent::start(&dir, "h2", &hosts.ns(2), bin, &args(2, "auto"))?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    a2.wait_for("running: lease", Duration::from_secs(20))?;
    // auto: the eBPF datapath, its programs for IPv4, flannel-v6.1 for IPv6.
    ensure!(
        a2.log()
            .contains("dual stack: vxlan_egress6 on flannel-v6.1"),
        "{}",
        a2.log()
    );

    // subnet.env in flanneld's order, with the IPv6 lines.
    for i in 1..=2 {
        let text = std::fs::read_to_string(env(i))?;
        let keys: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .collect();
        ensure!(
            keys == [
                "FLANNEL_NETWORK",
                "FLANNEL_SUBNET",
                "FLANNEL_IPV6_NETWORK",
                "FLANNEL_IPV6_SUBNET",
                "FLANNEL_MTU",
                "FLANNEL_IPMASQ"
            ],
            "{text}"
        );
        ensure!(text.contains("FLANNEL_IPV6_NETWORK=fd10::/48\n"), "{text}");
    }

    // The lease: flannel's dual-stack key and value, byte for byte, with
    // the MACs the two devices really have.
    let subnet1 = env_var(&env(1), "FLANNEL_SUBNET")?.replace(".1/", ".0-");
    let subnet6 = env_var(&env(1), "FLANNEL_IPV6_SUBNET")?.replace("::1/", "::-");
    let key = format!("{PREFIX}/subnets/{subnet1}&{subnet6}");
    let value = etcd.get(&key)?.with_context(|| {
        format!(
            "no key {key}; keys: {}",
            etcd.etcdctl(&["get", "--prefix", "--keys-only", PREFIX])
                .unwrap_or_default()
        )
    })?;
    let mac_on = |i: usize, dev: &str| link_mac(&hosts.ns(i), dev);
    let mac = |dev: &str| mac_on(1, dev);
    let want = format!(
        r#"{{"PublicIP":"{}","PublicIPv6":"{}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
        hosts.ip(1),
        hosts.ip6(1),
        mac("flannel.1")?,
        mac("flannel-v6.1")?
    );
    ensure!(value == want, "lease value\n{value}\nexpected\n{want}");
    // `status` names both subnets of our lease.
    let shown = overlay_tests::agent::status(&hosts.ns(1), bin, &args(1, "kernel"))?;
    let both = format!(
        "{} and {}",
        subnet1.replace('-', "/"),
        subnet6.replace('-', "/")
    );
    ensure!(
        shown.contains(&both),
        "status does not show {both}:\n{shown}"
    );

    // flannel-v6.1 as flanneld makes it, and host 2 as its peer.
    let dev = sh(&[
        "ip",
        "-n",
        &hosts.ns(1),
        "-d",
        "link",
        "show",
        "flannel-v6.1",
    ])?;
    ensure!(
        dev.contains(&format!("local {}", hosts.ip6(1))) && dev.contains("dstport 8472"),
        "{dev}"
    );
    let subnet6_2 = env_var(&env(2), "FLANNEL_IPV6_SUBNET")?.replace("::1/", "::/");
    let gw6_2 = subnet6_2.split_once('/').context("subnet")?.0.to_owned();
    // Host 2's lease reaches host 1 by the watch.
    let peer_route = format!("{subnet6_2} via {gw6_2} dev flannel-v6.1");
    within(
        Duration::from_secs(5),
        "host 2's IPv6 route on host 1",
        || {
            sh(&["ip", "-n", &hosts.ns(1), "-6", "route", "show"]).is_ok_and(|r| {
                r.lines()
                    .any(|l| l.starts_with(&peer_route) && l.contains("onlink"))
            })
        },
    )?;

    // Containers on both sides, both families, both ways.
    let (c1, v4_1) = add_container(hosts, 1, &env(1))?;
    let (c2, v4_2) = add_container(hosts, 2, &env(2))?;
    let _containers = Containers(vec![c1.clone(), c2.clone()]);
    let v6_1 = add_container_ipv6(&hosts.ns(1), &c1, &env(1))?;
    let v6_2 = add_container_ipv6(&hosts.ns(2), &c2, &env(2))?;
    within(Duration::from_secs(5), "c1 -> c2 over IPv6", || {
        ping6(&c1, &v6_2)
    })?;
    within(Duration::from_secs(5), "c2 -> c1 over IPv6", || {
        ping6(&c2, &v6_1)
    })?;
    for (from, to) in [(&c1, &v4_2), (&c2, &v4_1)] {
        within(Duration::from_secs(5), "containers over IPv4", || {
            sh(&[
                "ip", "netns", "exec", from, "ping", "-c", "1", "-W", "1", to,
            ])
            .is_ok()
        })?;
    }
    // TCP with a digest over IPv6 between the eBPF node and the kernel
    // node, both ways, and on the wire (host 1's switch port) what host 2's
    // programs encapsulate: VXLAN over IPv6, hop limit 64, the v6 VTEPs'
    // MACs, a non-zero outer UDP checksum that tshark verifies. c2 checksums
    // in software (tx offload off), so the inner checksums are complete on
    // the veth and the outer one can be checked over the real bytes.
    sh(&[
        "ip", "netns", "exec", &c2, "ethtool", "-K", "eth0", "tx", "off",
    ])?;
    let pcap = dir.join("v6.pcap");
    let capture = Capture::start(&hosts.sw(), "p1", "ip6 and udp port 8472", &pcap)?;
    let v6 = |s: &str| s.parse::<Ipv6Addr>();
    traffic::tcp_transfer(&c2, &c1, v6(&v6_1)?, 5601, 2 << 20)?;
    traffic::tcp_transfer(&c1, &c2, v6(&v6_2)?, 5602, 2 << 20)?;
    within(
        Duration::from_secs(5),
        "c2 -> c1 over IPv6 (captured)",
        || ping6(&c2, &v6_1),
    )?;
    let pcap = capture.stop()?;
    let frames = capture::vxlan6_frames(&pcap, 8472)?;
    let from2: Vec<_> = frames
        .iter()
        .filter(|f| f.outer_src.to_string() == hosts.ip6(2))
        .collect();
    let (mac1, mac2) = (mac_on(1, "flannel-v6.1")?, mac_on(2, "flannel-v6.1")?);
    ensure!(!from2.is_empty(), "no IPv6 VXLAN from host 2 captured");
    for f in &from2 {
        ensure!(
            f.checksum_good
                && f.udp_checksum != 0
                && f.hop_limit == 64
                && f.udp_dst == 8472
                && f.vni == 1
                && f.inner_eth_src == mac2
                && f.inner_eth_dst == mac1,
            "host 2's IPv6 VXLAN on the wire: {f:?}"
        );
    }
    capture::assert_clean(&pcap, 8472)?;
    // Host 2's programs carried both families: IPv6 on vxlan_egress6 and
    // vxlan_ingress_tc6 until the flows were approved, then (with IPv4's)
    // on the fast path, which every IPv6 VXLAN frame it sent took if
    // vxlan_egress6 did not.
    let counters = inspect::read(&PinLayout::chosen(Some(&pins(2))))?
        .context("no pinned eBPF state on host 2")?
        .counters;
    let n = |r: Reason| counters.get(r).packets;
    ensure!(
        n(Reason::Encapsulated) + n(Reason::FastEgress) > 0
            && n(Reason::Decapsulated) + n(Reason::FastIngress) > 0
            && n(Reason::Encapsulated6) > 0
            && n(Reason::Encapsulated6) + n(Reason::FastEgress) >= from2.len() as u64
            && n(Reason::Decapsulated6) > 0,
        "host 2's counters ({} IPv6 VXLAN frames captured from it): {counters:?}",
        from2.len()
    );
    let shown = overlay_tests::agent::status(&hosts.ns(2), bin, &args(2, "auto"))?;
    ensure!(
        shown.contains(&format!(
            "ipv6:      local {}, flannel-v6 ifindex",
            hosts.ip6(2)
        )) && shown.contains("encapsulated_ipv6"),
        "host 2's status:\n{shown}"
    );

    // Host 3 is a flanneld node: devices, lease and entries as flanneld's.
    let h3 = hosts.ns(3);
    let ip3 = |args: &[&str]| -> Result<String> {
        let mut v = vec!["ip", "-n", h3.as_str()];
        v.extend_from_slice(args);
        sh(&v)
    };
    let (mac3, mac3_6) = ("02:f1:a0:00:00:03", "02:f1:a6:00:00:03");
    // flanneld asks for MTU - 50 when it creates each device; the kernel
    // gives the v6 one MTU - 70 (and refuses 1450 later).
    for (dev, local) in [("flannel.1", hosts.ip(3)), ("flannel-v6.1", hosts.ip6(3))] {
        ip3(&[
            "link",
            "add",
            dev,
            "mtu",
            "1450",
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            &local,
            "dev",
            "eth0",
            "dstport",
            "8472",
            "nolearning",
        ])?;
    }
    for (dev, mac, addr) in [
        ("flannel.1", mac3, "10.0.17.0/32"),
        ("flannel-v6.1", mac3_6, "fd10:0:0:11::/128"),
    ] {
        ip3(&["link", "set", dev, "address", mac])?;
        ip3(&["addr", "add", addr, "dev", dev, "nodad"])?;
        ip3(&["link", "set", dev, "up"])?;
    }
    etcd.put(
        &format!("{PREFIX}/subnets/10.0.17.0-24&fd10:0:0:11::-64"),
        &format!(
            r#"{{"PublicIP":"{}","PublicIPv6":"{}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac3}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac3_6}"}}}}"#,
            hosts.ip(3),
            hosts.ip6(3)
        ),
    )?;
    for i in 1..=2 {
        let sub4 = env_var(&env(i), "FLANNEL_SUBNET")?.replace(".1/", ".0/");
        let gw4 = sub4.split_once('/').context("subnet")?.0.to_owned();
        let sub6 = env_var(&env(i), "FLANNEL_IPV6_SUBNET")?.replace("::1/", "::/");
        let gw6 = sub6.split_once('/').context("subnet")?.0.to_owned();
        for (dev, gw, sub, mac, dst) in [
            (
                "flannel.1",
                &gw4,
                &sub4,
                mac_on(i, "flannel.1")?,
                hosts.ip(i),
            ),
            (
                "flannel-v6.1",
                &gw6,
                &sub6,
                mac_on(i, "flannel-v6.1")?,
                hosts.ip6(i),
            ),
        ] {
            ip3(&[
                "neigh",
                "replace",
                gw,
                "lladdr",
                &mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ])?;
            sh(&[
                "ip",
                "netns",
                "exec",
                &h3,
                "bridge",
                "fdb",
                "replace",
                &mac,
                "dev",
                dev,
                "dst",
                &dst,
                "self",
                "permanent",
            ])?;
            ip3(&["route", "replace", sub, "via", gw, "dev", dev, "onlink"])?;
        }
    }
    let env3 = dir.join("h3.env");
    std::fs::write(
        &env3,
        "FLANNEL_NETWORK=10.0.0.0/16\nFLANNEL_SUBNET=10.0.17.1/24\n\
         FLANNEL_IPV6_NETWORK=fd10::/48\nFLANNEL_IPV6_SUBNET=fd10:0:0:11::1/64\n\
         FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    )?;
    let (c3, _) = add_container(hosts, 3, &env3)?;
    let _c3 = Containers(vec![c3.clone()]);
    let v6_3 = add_container_ipv6(&h3, &c3, &env3)?;
    for (from, to) in [(&c3, &v6_1), (&c3, &v6_2), (&c1, &v6_3), (&c2, &v6_3)] {
        within(
            Duration::from_secs(5),
            &format!("{from} -> {to} (flanneld stand-in)"),
            || ping6(from, to),
        )?;
    }
    // The eBPF node and flanneld's kernel device, TCP both ways.
    traffic::tcp_transfer(&c2, &c3, v6(&v6_3)?, 5603, 2 << 20)?;
    traffic::tcp_transfer(&c3, &c2, v6(&v6_2)?, 5604, 2 << 20)?;

    // Forged IPv6 VXLAN from an underlay address that holds no lease
    // reaches the flanneld host's pod (the control: its device checks the
    // VNI only) and neither of ours: on host 1 the guard drops and counts
    // it, on host 2 the eBPF program already (`drop_unknown_vtep`).
    let drops = |i: usize| -> Result<u64> {
        let ebpf = match i {
            2 => {
                inspect::read(&PinLayout::chosen(Some(&pins(2))))?
                    .context("no pinned eBPF state on host 2")?
                    .counters
                    .get(Reason::DropUnknownVtep)
                    .packets
            }
            _ => 0,
        };
        Ok(ebpf + guard_drops(&hosts.ns(i))?)
    };
    let forger = |victim: usize| if victim == 3 { 1 } else { 3 };
    for i in 1..=3 {
        let src = format!("fd98::9{}", forger(i));
        sh(&[
            "ip",
            "-n",
            &hosts.ns(forger(i)),
            "addr",
            "replace",
            &format!("{src}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
    }
    let before = [drops(1)?, drops(2)?];
    let mut received = Vec::new();
    for (i, c, pod) in [(1, &c1, &v6_1), (2, &c2, &v6_2), (3, &c3, &v6_3)] {
        let from = (hosts.ns(forger(i)), format!("fd98::9{}", forger(i)));
        let mac = link_mac(&hosts.ns(i), "flannel-v6.1")?;
        received.push(forge_ipv6_vxlan(&from, &hosts.ip6(i), &mac, c, pod)?);
    }
    let after = [drops(1)?, drops(2)?];
    ensure!(
        received == [0, 0, FORGED]
            && after[0] >= before[0] + FORGED as u64
            && after[1] >= before[1] + FORGED as u64,
        "forged IPv6 VXLAN delivered to the pods of hosts 1-3: {received:?} (want 0, 0, {FORGED}); \
         the drops on hosts 1 and 2 went from {before:?} to {after:?}"
    );
    within(
        Duration::from_secs(5),
        "c3 -> c1 after the forgeries",
        || ping6(&c3, &v6_1),
    )?;
    // The forgers' addresses go: a restarted agent would otherwise find a
    // second global IPv6 on host 1's interface to choose from.
    for i in [1, 3] {
        sh(&[
            "ip",
            "-n",
            &hosts.ns(i),
            "addr",
            "del",
            &format!("fd98::9{i}/64"),
            "dev",
            "eth0",
        ])?;
    }

    // --ip-masq: flannel's ip6tables rules for IPv6Network and our subnet.
    let nat6 = sh(&[
        "ip",
        "netns",
        "exec",
        &hosts.ns(1),
        "ip6tables",
        "-t",
        "nat",
        "-S",
        "FLANNEL-POSTRTG",
    ])?;
    let s6 = env_var(&env(1), "FLANNEL_IPV6_SUBNET")?.replace("::1/", "::/");
    ensure!(
        nat6.contains(&format!(
            "-A FLANNEL-POSTRTG -s {s6} -d fd10::/48 -m comment --comment \"flanneld masq\" -j RETURN"
        )) && nat6.contains("! -d ff00::/8"),
        "{nat6}"
    );

    // A peer whose lease has no IPv6 half (an IPv4-only node) is served on
    // IPv4 only.
    etcd.put(
        &format!("{PREFIX}/subnets/10.0.19.0-24"),
        r#"{"PublicIP":"10.98.0.9","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:09"}}"#,
    )?;
    within(Duration::from_secs(3), "the IPv4-only peer's route", || {
        hosts
            .routes(1)
            .contains("10.0.19.0/24 via 10.0.19.0 dev flannel.1 onlink")
    })?;
    let fdb6 = sh(&[
        "ip",
        "netns",
        "exec",
        &hosts.ns(1),
        "bridge",
        "fdb",
        "show",
        "dev",
        "flannel-v6.1",
    ])?;
    ensure!(!fdb6.contains("02:00:00:00:00:09"), "{fdb6}");

    // kill -9 and a restart of each agent under a ping6 stream toward its
    // container: the devices, entries, pins and guard stay, the new agent
    // adopts them; not one ping6 is lost (on the eBPF node the IPv6 maps
    // keep what flannel-v6.1 holds until the leases are programmed again).
    let restarts = [(1, &c2, &v6_1, "kernel"), (2, &c1, &v6_2, "auto")];
    let mut agents = [Some(a1), Some(a2)];
    for (i, from, to, datapath) in restarts {
        let stream = Command::new("ip")
            .args([
                "netns", "exec", from, "ping", "-6", "-i", "0.05", "-c", "200", "-W", "1", to,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        std::thread::sleep(Duration::from_secs(2));
        if let Some(mut old) = agents[i - 1].take() {
            old.kill9()?;
        }
        let name = format!("h{i}-again");
        let mut again = Agent::start(&dir, &name, &hosts.ns(i), bin, &args(i, datapath))?;
        again.wait_for("running: lease", Duration::from_secs(20))?;
        let out = stream.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let summary = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or("no summary");
        ensure!(
            summary.contains("200 packets transmitted, 200 received"),
            "ping6 through host {i}'s restart ({datapath}): {summary}\n{}",
            again.log()
        );
        agents[i - 1] = Some(again);
    }
    ensure!(
        etcd.get(&key)?.as_deref() == Some(want.as_str()),
        "the lease changed on restart"
    );
    drop(agents);
    Ok(())
}

/// flanneld's DirectRouting for IPv6 (`vxlan_network.go`): a peer whose
/// `PublicIPv6` the underlay reaches without a gateway gets
/// `<v6 subnet> via <PublicIPv6> dev <underlay>` and no entries on
/// `flannel-v6.<VNI>`; its pods' IPv6 crosses the wire unencapsulated.
#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn direct_routing_serves_the_ipv6_sides_on_both_datapaths() -> Result<()> {
    const DIRECT: &str = r#"{"EnableIPv6":true,"Network":"10.0.0.0/16","SubnetMin":"10.0.1.0","SubnetMax":"10.0.16.0","IPv6Network":"fd10:0:0::/48","IPv6SubnetMax":"fd10:0:0:10::","Backend":{"Type":"vxlan","DirectRouting":true}}"#;
    Cluster::run("dsr", 2, DIRECT, |c| direct_both(&c.hosts, &c.etcd, &c.bin))
}

fn direct_both(hosts: &Hosts, etcd: &Etcd, bin: &Path) -> Result<()> {
    hosts.add_ipv6()?;
    let dir = etcd.dir().to_path_buf();
    let bpffs = Bpffs::mount(dir.join("bpf"))?;
    let env = |i: usize| dir.join(format!("h{i}.env"));
    let args = |i: usize, dp: &str| agent_args(etcd, hosts, &bpffs.0, i, dp);
    let mut a1 = Agent::start(&dir, "h1", &hosts.ns(1), bin, &args(1, "kernel"))?;
    let mut a2 = Agent::start(&dir, "h2", &hosts.ns(2), bin, &args(2, "auto"))?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    a2.wait_for("running: lease", Duration::from_secs(20))?;
    ensure!(
        a2.log().contains("dual stack: vxlan_egress6"),
        "auto is not eBPF"
    );
    let subnet6 = |i: usize| -> Result<String> {
        Ok(env_var(&env(i), "FLANNEL_IPV6_SUBNET")?.replace("::1/", "::/"))
    };
    // Each node routes the other's IPv6 subnet straight to its PublicIPv6.
    for (me, peer) in [(1, 2), (2, 1)] {
        let want = format!("{} via {} dev eth0", subnet6(peer)?, hosts.ip6(peer));
        within(
            Duration::from_secs(5),
            &format!("host {me}'s direct IPv6 route to host {peer}"),
            || {
                sh(&["ip", "-n", &hosts.ns(me), "-6", "route", "show"])
                    .is_ok_and(|r| r.lines().any(|l| l.starts_with(&want)))
            },
        )?;
        // Nothing of it on flannel-v6.1: no FDB entry toward the peer, no
        // neighbour, no route through the device.
        let fdb = sh(&[
            "bridge",
            "-n",
            &hosts.ns(me),
            "fdb",
            "show",
            "dev",
            "flannel-v6.1",
        ])?;
        ensure!(!fdb.contains(&hosts.ip6(peer)), "host {me}: {fdb}");
        let routes = sh(&[
            "ip",
            "-n",
            &hosts.ns(me),
            "-6",
            "route",
            "show",
            "dev",
            "flannel-v6.1",
        ])?;
        ensure!(
            !routes.contains(&subnet6(peer)?),
            "host {me}: a vxlan route too: {routes}"
        );
    }

    let (c1, _) = add_container(hosts, 1, &env(1))?;
    let (c2, _) = add_container(hosts, 2, &env(2))?;
    let _containers = Containers(vec![c1.clone(), c2.clone()]);
    let v6_1 = add_container_ipv6(&hosts.ns(1), &c1, &env(1))?;
    let v6_2 = add_container_ipv6(&hosts.ns(2), &c2, &env(2))?;
    let pcap = dir.join("direct6.pcap");
    let capture = Capture::start(&hosts.sw(), "p1", "ip6", &pcap)?;
    within(Duration::from_secs(5), "c1 -> c2 over IPv6", || {
        ping6(&c1, &v6_2)
    })?;
    within(Duration::from_secs(5), "c2 -> c1 over IPv6", || {
        ping6(&c2, &v6_1)
    })?;
    let pcap = capture.stop()?;
    let count = |filter: &str| -> Result<usize> {
        let mut a = vec!["tcpdump", "-nr", pcap.to_str().unwrap_or_default()];
        a.extend(filter.split_whitespace());
        Ok(sh(&a)?.lines().filter(|l| !l.trim().is_empty()).count())
    };
    let plain = count(&format!("icmp6 and host {v6_1} and host {v6_2}"))?;
    let vxlan = count("udp port 8472")?;
    ensure!(plain >= 4, "{plain} plain ICMPv6 frames between the pods");
    ensure!(vxlan == 0, "{vxlan} IPv6 VXLAN frames on the wire");
    drop((a1, a2));
    Ok(())
}
