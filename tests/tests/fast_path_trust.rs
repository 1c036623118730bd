//! Who may use the fast path, with real packets between eBPF hosts (and the
//! iproute2 reference peer as a third, known VTEP).
//!
//! - The mark: `--fast-path-mark` moves the approval bit (our chain clears
//!   it, then sets it), and a foreign rule setting that bit on every
//!   forwarded packet approves nothing: neither a flow that is only NEW nor a
//!   DNAT'ed one takes the fast path. The start-up scan names the rule.
//! - A second pod on the node cannot use the first pod's approved flow (its
//!   packets are dropped and counted, as the host's anti-spoofing rule drops
//!   them on the slow path), nor send as the node's gateway address.
//! - A known VTEP cannot speak for another node's pods: VXLAN from the
//!   reference peer carrying a second eBPF host's pod address as its inner
//!   source, on that pod's approved flow, is dropped and counted, and never
//!   reaches the pod.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use overlay_agent::{
    datapath::ebpf::{Counters, EbpfOptions, IngressMode},
    ipmasq::mark_users,
};
use overlay_common::counters::Reason;
use overlay_tests::{
    cmd,
    lab::{BRIDGE_DEV, Host, Lab, LabSpec},
    netns,
    overlay::{Kind, Member, Overlay, mesh},
    scenario::MIB,
    traffic,
};

const KIND: Kind = Kind::Ebpf(IngressMode::Tc);
/// What forged datagrams carry, so receivers can tell them apart.
const FORGED: &[u8] = b"FORGED";

fn counters(m: &Member) -> Result<Counters> {
    m.counters()?.context("eBPF member without counters")
}

fn gained(before: &Counters, after: &Counters, r: Reason) -> u64 {
    after.get(r).packets - before.get(r).packets
}

/// Every reason that moved, for failure messages.
fn moved(before: &Counters, after: &Counters) -> String {
    Reason::ALL
        .iter()
        .filter(|r| gained(before, after, **r) > 0)
        .map(|r| format!("{} +{}", r.name(), gained(before, after, *r)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn iptables(h: &Host, args: &[&str]) -> Result<String> {
    let mut full = vec!["ip", "netns", "exec", &h.ns, "iptables", "-w"];
    full.extend_from_slice(args);
    cmd::run(None, &full)
}

/// A UDP echo server in a namespace: answers every datagram except forged
/// ones, which it counts.
struct Echo {
    forged: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn start(ns: &str, at: SocketAddrV4) -> Result<Echo> {
        let socket = netns::run_in(ns, move || UdpSocket::bind(at).context("binding the echo"))?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let forged = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (forged, stop) = (forged.clone(), stop.clone());
            move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        if buf[..n].starts_with(FORGED) {
                            forged.fetch_add(1, Ordering::Relaxed);
                        } else {
                            let _ = socket.send_to(&buf[..n], from);
                        }
                    }
                }
            }
        });
        Ok(Echo {
            forged,
            stop,
            thread: Some(thread),
        })
    }

    fn forged(&self) -> u32 {
        self.forged.load(Ordering::Relaxed)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A client socket in `ns` connected to `to`.
fn client(ns: &str, to: SocketAddrV4) -> Result<UdpSocket> {
    let s = netns::run_in(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").context("binding the client")?;
        s.connect(to).context("connecting the client")?;
        Ok(s)
    })?;
    s.set_read_timeout(Some(Duration::from_millis(300)))?;
    Ok(s)
}

/// One request and its answer; false if none came back. Forged datagrams
/// the client receives are counted in `forged`.
fn exchange(c: &UdpSocket, i: u32, forged: &mut u32) -> Result<bool> {
    c.send(&i.to_be_bytes())?;
    let mut buf = [0u8; 64];
    loop {
        match c.recv(&mut buf) {
            Ok(n) if buf[..n].starts_with(FORGED) => *forged += 1,
            Ok(n) => return Ok(buf[..n] == i.to_be_bytes()),
            Err(_) => return Ok(false),
        }
    }
}

/// Sends one forged datagram from `src` (an address of namespace `ns`).
fn send_forged(ns: &str, src: SocketAddrV4, dst: SocketAddrV4) -> Result<()> {
    netns::run_in(ns, move || {
        let s = UdpSocket::bind(src).with_context(|| format!("binding {src}"))?;
        s.send_to(FORGED, dst)
            .with_context(|| format!("sending to {dst}"))?;
        Ok(())
    })
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn a_foreign_mark_approves_nothing_and_the_flag_moves_the_bit() -> Result<()> {
    let lab = Lab::build(&LabSpec::new("fmark", 2))?;
    let overlay = Overlay::default();
    let bit = 0x2000u32;
    let options = EbpfOptions {
        fast_path_mark: bit,
        ..EbpfOptions::default()
    };
    let a = Member::join_with_options(lab.host(1), KIND, overlay, options)?;
    let b = Member::join(lab.host(2), KIND, overlay)?;
    mesh(&[&a, &b])?;
    let (ha, hb) = (a.host.clone(), b.host.clone());
    traffic::ping(&ha.container_ns, hb.container_ip, 3)?;

    // The chain clears the flag's bit, then sets it on what it approves.
    let chain = iptables(&ha, &["-t", "mangle", "-S", "FLANNEL-FASTPATH"])?;
    ensure!(
        chain.contains("--set-xmark 0x0/0x2000") && chain.contains("--set-xmark 0x2000/0x2000"),
        "{chain}"
    );
    // And the programs take that bit: established TCP takes the fast path.
    let before = counters(&a)?;
    traffic::tcp_transfer(
        &ha.container_ns,
        &hb.container_ns,
        hb.container_ip,
        5500,
        4 * MIB,
    )?;
    let after = counters(&a)?;
    ensure!(
        gained(&before, &after, Reason::FastEgress) > 0,
        "established TCP never took the fast path with bit {bit:#x}"
    );

    // Another tool marks every forwarded packet with our bit, NEW included.
    iptables(
        &ha,
        &[
            "-t",
            "mangle",
            "-I",
            "FORWARD",
            "-j",
            "MARK",
            "--set-xmark",
            "0x2000/0x2000",
        ],
    )?;
    let found = netns::run_in(&ha.ns, move || Ok(mark_users::find(bit)))?;
    ensure!(
        found.iter().any(|r| r.contains("-A FORWARD -j MARK")),
        "the start-up scan missed the rule: {found:?}"
    );
    let other = netns::run_in(&ha.ns, || Ok(mark_users::find(0x1000)))?;
    ensure!(other.is_empty(), "{other:?}");

    // (1) A flow that is only ever NEW: one-way UDP.
    let before = counters(&a)?;
    let sink = traffic::UdpListener::start(&hb.container_ns, hb.container_ip, 7000)?;
    traffic::udp_send(
        &ha.container_ns,
        None,
        hb.container_ip,
        7000,
        60,
        Duration::from_millis(20),
    )?;
    std::thread::sleep(Duration::from_millis(200));
    let got = sink.finish()?.len();
    ensure!(got >= 55, "one-way UDP: {got} of 60 arrived");
    let after = counters(&a)?;
    for r in [Reason::FastApproval, Reason::FastEgress] {
        let n = gained(&before, &after, r);
        ensure!(
            n == 0,
            "one-way (NEW) UDP under the foreign mark: {} +{n}",
            r.name()
        );
    }

    // (2) A DNAT'ed request/response flow through a service address.
    let dnat = [
        "PREROUTING",
        "-d",
        "10.96.0.10",
        "-p",
        "udp",
        "--dport",
        "53",
        "-j",
        "DNAT",
        "--to-destination",
    ];
    let to = format!("{}:5353", hb.container_ip);
    let mut add = vec!["-t", "nat", "-A"];
    add.extend_from_slice(&dnat);
    add.push(&to);
    iptables(&ha, &add)?;
    let echo = Echo::start(&hb.container_ns, SocketAddrV4::new(hb.container_ip, 5353))?;
    let c = client(
        &ha.container_ns,
        SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 53),
    )?;
    let before = counters(&a)?;
    let mut answered = 0;
    let mut forged = 0;
    for i in 0..60 {
        answered += u32::from(exchange(&c, i, &mut forged)?);
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(answered >= 55, "DNAT'ed UDP: {answered} of 60 answered");
    let after = counters(&a)?;
    for r in [Reason::FastApproval, Reason::FastEgress] {
        let n = gained(&before, &after, r);
        ensure!(
            n == 0,
            "DNAT'ed UDP under the foreign mark: {} +{n}",
            r.name()
        );
    }
    drop((echo, a, b));
    lab.destroy()
}

/// A second pod on `h`: `10.5.<i>.20` behind veth `vethb` on the bridge.
fn second_pod(h: &Host) -> Result<(String, Ipv4Addr)> {
    let pod = format!("{}b", h.container_ns);
    let ip = Ipv4Addr::new(10, 5, h.index, 20);
    cmd::run(None, &["ip", "netns", "add", &pod])?;
    cmd::ip(
        &pod,
        &[
            "link", "add", "eth0", "mtu", "1450", "type", "veth", "peer", "name", "vethb", "mtu",
            "1450", "netns", &h.ns,
        ],
    )?;
    cmd::ip(&h.ns, &["link", "set", "vethb", "master", BRIDGE_DEV])?;
    cmd::ip(&h.ns, &["link", "set", "vethb", "up"])?;
    cmd::ip(&pod, &["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    cmd::ip(&pod, &["link", "set", "eth0", "up"])?;
    cmd::ip(&pod, &["link", "set", "lo", "up"])?;
    cmd::ip(
        &pod,
        &["route", "add", "default", "via", &h.gateway.to_string()],
    )?;
    // Addresses it borrows must not be answered for in ARP (the host would
    // then deliver them to this pod, as a stolen MAC does on any path), nor
    // asked from (the host ignores ARP from its own addresses).
    netns::sysctl(
        &pod,
        &[
            ("net.ipv4.conf.all.arp_ignore", "8"),
            ("net.ipv4.conf.eth0.arp_ignore", "8"),
            ("net.ipv4.conf.all.arp_announce", "2"),
            ("net.ipv4.conf.eth0.arp_announce", "2"),
        ],
    )?;
    traffic::ping(&pod, h.gateway, 1)?;
    Ok((pod, ip))
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn a_pod_cannot_borrow_another_pods_flow_nor_send_as_the_node() -> Result<()> {
    let lab = Lab::build(&LabSpec::new("fborrow", 2))?;
    let overlay = Overlay::default();
    let a = Member::join(lab.host(1), KIND, overlay)?;
    let b = Member::join(lab.host(2), KIND, overlay)?;
    mesh(&[&a, &b])?;
    let (ha, hb) = (a.host.clone(), b.host.clone());
    traffic::ping(&ha.container_ns, hb.container_ip, 3)?;
    let (pod_b, ip_b) = second_pod(&ha)?;
    let result = (|| -> Result<()> {
        a.node().context("eBPF node")?.sync_pods()?;
        // The operator's anti-spoofing on the host's path: a pod's veth
        // carries only its own source.
        let nft = |args: &[&str]| -> Result<String> {
            let mut full = vec!["ip", "netns", "exec", &ha.ns, "nft"];
            full.extend_from_slice(args);
            cmd::run(None, &full)
        };
        nft(&["add", "table", "bridge", "antispoof"])?;
        nft(&[
            "add",
            "chain",
            "bridge",
            "antispoof",
            "pre",
            "{ type filter hook prerouting priority 0; }",
        ])?;
        let own = ip_b.to_string();
        nft(&[
            "add",
            "rule",
            "bridge",
            "antispoof",
            "pre",
            "iifname",
            "vethb",
            "ether",
            "type",
            "ip",
            "ip",
            "saddr",
            "!=",
            &own,
            "counter",
            "drop",
        ])?;

        let r = SocketAddrV4::new(hb.container_ip, 5800);
        let echo = Echo::start(&hb.container_ns, r)?;
        let c = client(&ha.container_ns, r)?;
        let port = c.local_addr()?.port();
        let mut forged_back = 0;
        for i in 0..10 {
            ensure!(exchange(&c, i, &mut forged_back)?, "the flow is not up");
        }

        // As the node: flannel.<VNI>'s address (10.5.1.0), the source of the
        // host's own flows to remote pods. (The gateway's address would
        // break the pod's default route through it; programs_fast.rs covers
        // it.)
        let node = ha.subnet_addr();
        let before = counters(&a)?;
        cmd::ip(
            &pod_b,
            &["addr", "add", &format!("{node}/32"), "dev", "eth0"],
        )?;
        for _ in 0..5 {
            send_forged(&pod_b, SocketAddrV4::new(node, port), r)?;
        }
        let after = counters(&a)?;
        let dropped = gained(&before, &after, Reason::DropFastSpoofedSource);
        ensure!(
            dropped >= 5,
            "the node's address as a pod's source: {dropped} dropped of 5 ({})",
            moved(&before, &after)
        );
        cmd::ip(
            &pod_b,
            &["addr", "del", &format!("{node}/32"), "dev", "eth0"],
        )?;

        // As the first pod, on its approved flow (same addresses and ports),
        // while that flow runs.
        cmd::ip(
            &pod_b,
            &[
                "addr",
                "add",
                &format!("{}/32", ha.container_ip),
                "dev",
                "eth0",
            ],
        )?;
        let before = counters(&a)?;
        let mut answered = 0;
        for i in 10..50 {
            answered += u32::from(exchange(&c, i, &mut forged_back)?);
            send_forged(&pod_b, SocketAddrV4::new(ha.container_ip, port), r)?;
            std::thread::sleep(Duration::from_millis(25));
        }
        let after = counters(&a)?;
        ensure!(
            answered >= 36,
            "the first pod's flow: {answered} of 40 answered"
        );
        let dropped = gained(&before, &after, Reason::DropFastSpoofedSource);
        ensure!(
            dropped >= 1,
            "no borrowed packet met the fast path's check (fast egress +{})",
            gained(&before, &after, Reason::FastEgress)
        );
        ensure!(
            gained(&before, &after, Reason::FastEgress) > 0,
            "the first pod's own flow left the fast path"
        );
        std::thread::sleep(Duration::from_millis(200));
        ensure!(
            echo.forged() == 0,
            "{} forged datagrams reached the remote pod",
            echo.forged()
        );
        Ok(())
    })();
    let _ = cmd::run(None, &["ip", "netns", "del", &pod_b]);
    result?;
    drop((a, b));
    lab.destroy()
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn a_known_vtep_cannot_speak_for_another_nodes_pods() -> Result<()> {
    let lab = Lab::build(&LabSpec::new("fvtep", 3))?;
    let overlay = Overlay::default();
    let a = Member::join(lab.host(1), KIND, overlay)?;
    let b = Member::join(lab.host(2), KIND, overlay)?;
    let r = Member::join(lab.host(3), Kind::Reference, overlay)?;
    mesh(&[&a, &b, &r])?;
    let (ha, hb, hr) = (a.host.clone(), b.host.clone(), r.host.clone());
    for h in [&hb, &hr] {
        traffic::ping(&ha.container_ns, h.container_ip, 3)?;
    }
    // A flow from a's pod to b's pod, approved both ways.
    let server = SocketAddrV4::new(hb.container_ip, 5800);
    let _echo = Echo::start(&hb.container_ns, server)?;
    let c = client(&ha.container_ns, server)?;
    let port = c.local_addr()?.port();
    let mut forged = 0;
    for i in 0..10 {
        ensure!(exchange(&c, i, &mut forged)?, "the flow is not up");
    }

    // The reference host (a known VTEP) sends as b's pod, from the flow's
    // own address and port, through its kernel vxlan device to a.
    cmd::ip(
        &hr.ns,
        &[
            "addr",
            "add",
            &format!("{}/32", hb.container_ip),
            "dev",
            "lo",
        ],
    )?;
    let before = counters(&a)?;
    let mut answered = 0;
    let sent = 30;
    for i in 10..10 + sent {
        answered += u32::from(exchange(&c, i, &mut forged)?);
        send_forged(&hr.ns, server, SocketAddrV4::new(ha.container_ip, port))?;
        std::thread::sleep(Duration::from_millis(25));
    }
    // Whatever got through would be waiting in the client's socket.
    let mut buf = [0u8; 64];
    while let Ok(n) = c.recv(&mut buf) {
        if buf[..n].starts_with(FORGED) {
            forged += 1;
        }
    }
    let after = counters(&a)?;
    ensure!(
        answered >= sent - 3,
        "the real flow: {answered} of {sent} answered"
    );
    ensure!(forged == 0, "{forged} forged datagrams reached a's pod");
    let dropped = gained(&before, &after, Reason::DropSourceVtepMismatch);
    ensure!(
        dropped >= u64::from(sent),
        "{dropped} of {sent} forged datagrams counted as drop_source_vtep_mismatch"
    );
    drop((a, b, r));
    lab.destroy()
}
