//! The fast path, end to end between two eBPF hosts (`--fast-path=auto`).
//!
//! Proof of path: bulk TCP between the containers leaves `flannel.<VNI>`,
//! the receiving host's `cni0` and its pod veth's transmit counters flat
//! (well under 1 % of the bytes), `pass_gso_tunnel` near zero, and the
//! fast-path counters carrying the bytes. (path.rs proves the host path's
//! accounting with `--fast-path=off`.)
//!
//! Policy kept: a FORWARD DROP rule on either host blocks new connections to
//! one port while another works; a DNAT'ed service connection works both
//! ways and never takes the fast path on the NAT host; short connections
//! leave no ESTABLISHED conntrack entry; a long UDP request/response flow and
//! a long ping flow keep their conntrack entries past (shortened) timeouts; a
//! DROP rule added while a flow is on the fast path stops it within a
//! second; tcpdump inside the receiving pod sees the packets.
//!
//! Lifecycle: a pod replaced by a new one with the same address behind a new
//! veth is reached at once, and nothing is delivered through the old veth.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use overlay_agent::datapath::ebpf::{Counters, IngressMode};
use overlay_common::{
    consts::{PROG_VETH_FROM_POD, PROG_VETH_TO_POD},
    counters::Reason,
};
use overlay_tests::{
    capture::Capture,
    cmd,
    lab::{BRIDGE_DEV, CONTAINER_VETH, Host, Lab, LabSpec},
    netns,
    overlay::{Kind, Member, Overlay, mesh},
    scenario::MIB,
    stats::{DevStats, attachments, dev_stats},
    traffic::{self, UdpBurst},
};

const KIND: Kind = Kind::Ebpf(IngressMode::Tc);

/// Two eBPF hosts with the fast path as the agent's default has it.
fn two_hosts(name: &str) -> Result<(Lab, Member, Member)> {
    let lab = Lab::build(&LabSpec::new(name, 2))?;
    let overlay = Overlay::default();
    let a = Member::join(lab.host(1), KIND, overlay)?;
    let b = Member::join(lab.host(2), KIND, overlay)?;
    mesh(&[&a, &b])?;
    // ARP and the first approvals: the slow path's work before measuring.
    traffic::ping(&a.host.container_ns, b.host.container_ip, 3)?;
    Ok((lab, a, b))
}

fn counters(m: &Member) -> Result<Counters> {
    m.counters()?.context("eBPF member without counters")
}

/// (packets, bytes) a reason gained between two readings.
fn gained(before: &Counters, after: &Counters, r: Reason) -> (u64, u64) {
    let (b, a) = (before.get(r), after.get(r));
    (a.packets - b.packets, a.bytes - b.bytes)
}

const DROPS: [Reason; 6] = [
    Reason::DropUnknownVtep,
    Reason::DropWrongVni,
    Reason::DropMalformed,
    Reason::DropWrongInnerMac,
    Reason::DropAdjustFailed,
    Reason::DropRedirectFailed,
];

fn no_drops(who: &str, before: &Counters, after: &Counters) -> Result<()> {
    for r in DROPS {
        let (n, _) = gained(before, after, r);
        ensure!(n == 0, "{who}: {} rose by {n}", r.name());
    }
    Ok(())
}

fn host_stats(h: &Host, devs: &[&str]) -> Result<Vec<DevStats>> {
    devs.iter().map(|d| dev_stats(&h.ns, d)).collect()
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn bulk_tcp_skips_bridge_routing_and_flannel_device() -> Result<()> {
    let (lab, a, b) = two_hosts("fpath")?;
    let dev = Overlay::default().device();
    for m in [&a, &b] {
        let att = attachments(&m.host.ns)?;
        let ingress = att.tcx_on(CONTAINER_VETH, "ingress");
        let egress = att.tcx_on(CONTAINER_VETH, "egress");
        ensure!(
            matches!(ingress.as_slice(), [p] if p.is(PROG_VETH_FROM_POD))
                && matches!(egress.as_slice(), [p] if p.is(PROG_VETH_TO_POD)),
            "host {}: {CONTAINER_VETH} has ingress {ingress:?} and egress {egress:?}",
            m.host.index
        );
    }

    let devs = [dev.as_str(), BRIDGE_DEV, CONTAINER_VETH];
    let (ca0, cb0) = (counters(&a)?, counters(&b)?);
    let (sa0, sb0) = (host_stats(&a.host, &devs)?, host_stats(&b.host, &devs)?);
    let bytes = 64 * MIB;
    let report = traffic::tcp_transfer(
        &a.host.container_ns,
        &b.host.container_ns,
        b.host.container_ip,
        5300,
        bytes,
    )?;
    let (ca1, cb1) = (counters(&a)?, counters(&b)?);
    let (sa1, sb1) = (host_stats(&a.host, &devs)?, host_stats(&b.host, &devs)?);
    let da: Vec<DevStats> = sa1.iter().zip(&sa0).map(|(n, o)| n.since(o)).collect();
    let db: Vec<DevStats> = sb1.iter().zip(&sb0).map(|(n, o)| n.since(o)).collect();
    eprintln!(
        "{} MiB in {:?}; sender {dev} {:?}, receiver {dev} {:?} {BRIDGE_DEV} {:?} {CONTAINER_VETH} {:?}",
        bytes / MIB,
        report.elapsed,
        da[0],
        db[0],
        db[1],
        db[2]
    );
    let fast_egress = gained(&ca0, &ca1, Reason::FastEgress);
    let fast_ingress = gained(&cb0, &cb1, Reason::FastIngress);
    let gso = gained(&cb0, &cb1, Reason::PassGsoTunnel);
    eprintln!(
        "sender fast_egress {fast_egress:?}, receiver fast_ingress {fast_ingress:?} pass_gso_tunnel {gso:?}, \
         sender encapsulated {:?}, receiver decapsulated {:?}",
        gained(&ca0, &ca1, Reason::Encapsulated),
        gained(&cb0, &cb1, Reason::Decapsulated)
    );
    let one_percent = bytes / 100;
    for (who, d) in [("sender", &da[0]), ("receiver", &db[0])] {
        ensure!(
            d.rx_bytes + d.tx_bytes < one_percent,
            "{who}'s {dev} carried {} B of a {bytes} B transfer",
            d.rx_bytes + d.tx_bytes
        );
    }
    ensure!(
        db[1].tx_bytes < one_percent && db[2].tx_bytes < one_percent,
        "the receiver's {BRIDGE_DEV} sent {} B and {CONTAINER_VETH} {} B of {bytes} B",
        db[1].tx_bytes,
        db[2].tx_bytes
    );
    ensure!(
        gso.1 < one_percent,
        "pass_gso_tunnel carried {} B of {bytes} B",
        gso.1
    );
    // The counters count whole frames (headers too), so the payload is a
    // lower bound for what they carried.
    ensure!(
        fast_egress.1 * 100 >= bytes * 95 && fast_ingress.1 * 100 >= bytes * 95,
        "the fast path carried {} B out and {} B in of {bytes} B",
        fast_egress.1,
        fast_ingress.1
    );
    // GSO aggregates reach the pod whole: segmented on the way (a transmit
    // through a device without tunnel offloads, skb_segment) they would
    // average at most one MTU.
    ensure!(
        fast_ingress.0 > 0 && fast_ingress.1 / fast_ingress.0 > 16 * 1024,
        "the fast path delivered {} packets of {} B on average: aggregates were split",
        fast_ingress.0,
        fast_ingress.1 / fast_ingress.0.max(1)
    );
    no_drops("sender", &ca0, &ca1)?;
    no_drops("receiver", &cb0, &cb1)?;

    // Ping and UDP both ways still arrive, exactly once and intact.
    for (src, dst) in [(&a.host, &b.host), (&b.host, &a.host)] {
        traffic::ping(&src.container_ns, dst.container_ip, 10)?;
        traffic::udp_burst(
            &src.container_ns,
            &dst.container_ns,
            dst.container_ip,
            5400 + u16::from(src.index),
            UdpBurst {
                count: 300,
                ..UdpBurst::default()
            },
        )?;
    }
    drop((a, b));
    lab.destroy()
}

/// Whether a TCP connection from `src_ns` to `dst:port` (listened on in
/// `dst_ns`) is established within `wait`.
fn tcp_connects(
    src_ns: &str,
    dst_ns: &str,
    dst: Ipv4Addr,
    port: u16,
    wait: Duration,
) -> Result<bool> {
    let listener = netns::run_in(dst_ns, move || {
        TcpListener::bind(SocketAddrV4::new(dst, port)).context("binding the listener")
    })?;
    let target = SocketAddr::V4(SocketAddrV4::new(dst, port));
    let connected = netns::run_in(src_ns, move || {
        Ok(TcpStream::connect_timeout(&target, wait).is_ok())
    })?;
    drop(listener);
    Ok(connected)
}

fn iptables(h: &Host, args: &[&str]) -> Result<String> {
    let mut full = vec!["iptables", "-w"];
    full.extend_from_slice(args);
    cmd::run_in(&h.ns, &full)
}

/// `conntrack -L` lines in `ns` that mention `ip` and contain `word`.
fn conntrack_entries(ns: &str, ip: Ipv4Addr, word: &str) -> Result<Vec<String>> {
    let out = cmd::command(Some(ns), &["conntrack", "-L"])
        .output()
        .context("running conntrack -L")?;
    ensure!(out.status.success(), "conntrack -L failed in {ns}");
    let ip = ip.to_string();
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&ip) && l.contains(word))
        .map(str::to_owned)
        .collect())
}

/// One UDP request/response flow (fixed ports both ends) between two
/// namespaces: the server echoes every datagram until dropped.
struct UdpEcho {
    client: UdpSocket,
    stop: Arc<AtomicBool>,
    server: Option<std::thread::JoinHandle<()>>,
}

impl UdpEcho {
    fn start(client_ns: &str, server_ns: &str, server: Ipv4Addr, port: u16) -> Result<UdpEcho> {
        let at = SocketAddrV4::new(server, port);
        let socket = netns::run_in(server_ns, move || {
            UdpSocket::bind(at).context("binding the echo server")
        })?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let client = netns::run_in(client_ns, move || {
            let s = UdpSocket::bind("0.0.0.0:0").context("binding the client")?;
            s.connect(at).context("connecting the client")?;
            Ok(s)
        })?;
        client.set_read_timeout(Some(Duration::from_millis(500)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let server = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(&buf[..n], from);
                    }
                }
            }
        });
        Ok(UdpEcho {
            client,
            stop,
            server: Some(server),
        })
    }

    /// Sends `count` requests `gap` apart; how many came back.
    fn exchange(&self, count: u32, gap: Duration) -> Result<u32> {
        let mut answered = 0;
        let mut buf = [0u8; 64];
        for i in 0..count {
            self.client.send(&i.to_be_bytes())?;
            if let Ok(n) = self.client.recv(&mut buf)
                && buf[..n] == i.to_be_bytes()
            {
                answered += 1;
            }
            std::thread::sleep(gap);
        }
        Ok(answered)
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.server.take() {
            let _ = t.join();
        }
    }
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn firewall_nat_and_conntrack_still_decide() -> Result<()> {
    let (lab, a, b) = two_hosts("fpolicy")?;
    let (ha, hb) = (&a.host, &b.host);
    let dst = hb.container_ip;
    let wait = Duration::from_secs(2);

    // Established traffic first, so approvals exist when the rules arrive.
    traffic::tcp_transfer(&ha.container_ns, &hb.container_ns, dst, 5500, 4 * MIB)?;

    // A FORWARD DROP for one port, on the receiving host and then on the
    // sending host: new connections to it fail, another port works.
    for (host, port) in [(hb, "5501"), (ha, "5502")] {
        let rule = [
            "FORWARD",
            "-d",
            &dst.to_string(),
            "-p",
            "tcp",
            "--dport",
            port,
            "-j",
            "DROP",
        ];
        let mut insert = vec!["-I"];
        insert.extend_from_slice(&rule);
        iptables(host, &insert)?;
        let blocked_port: u16 = port.parse()?;
        ensure!(
            !tcp_connects(&ha.container_ns, &hb.container_ns, dst, blocked_port, wait)?,
            "host {}'s FORWARD DROP for port {port} did not stop a new connection",
            host.index
        );
        traffic::tcp_transfer(&ha.container_ns, &hb.container_ns, dst, 5510, 2 * MIB)?;
        let mut delete = vec!["-D"];
        delete.extend_from_slice(&rule);
        iptables(host, &delete)?;
    }

    // kube-proxy-style DNAT of a service address to the remote pod, on each
    // side: the connection works, and the NAT host never gives it the fast
    // path (its conntrack entry is DNAT'ed).
    let service = Ipv4Addr::new(10, 96, 0, 10);
    for (client, server, port) in [(&a, &b, 5600u16), (&b, &a, 5601u16)] {
        let (hc, hs) = (&client.host, &server.host);
        let to = format!("{}:{port}", hs.container_ip);
        let dnat = [
            "PREROUTING",
            "-d",
            "10.96.0.10",
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            &to,
        ];
        let mut add = vec!["-t", "nat", "-A"];
        add.extend_from_slice(&dnat);
        iptables(hc, &add)?;
        let before = counters(client)?;
        traffic::tcp_transfer_via(
            &hc.container_ns,
            &hs.container_ns,
            SocketAddrV4::new(hs.container_ip, port),
            SocketAddrV4::new(service, 80),
            4 * MIB,
        )?;
        let after = counters(client)?;
        let fast = gained(&before, &after, Reason::FastEgress);
        let encap = gained(&before, &after, Reason::Encapsulated);
        ensure!(
            fast.0 == 0 && encap.0 > 0,
            "host {}: the DNAT'ed connection took the fast path ({fast:?}; host path {encap:?})",
            hc.index
        );
        let mut del = vec!["-t", "nat", "-D"];
        del.extend_from_slice(&dnat);
        iptables(hc, &del)?;
    }

    // 200 short connections: conntrack saw every FIN, none stays ESTABLISHED.
    for i in 0..200u16 {
        traffic::tcp_transfer(&ha.container_ns, &hb.container_ns, dst, 6000 + i, 2048)?;
    }
    for h in [ha, hb] {
        let established = conntrack_entries(&h.ns, dst, "ESTABLISHED")?;
        ensure!(
            established.is_empty(),
            "host {}: conntrack still has ESTABLISHED entries: {established:#?}",
            h.index
        );
    }

    // A long flow on the fast path keeps its conntrack entry: with the UDP
    // and ICMP timeouts at 2 s, 6 s of traffic would lose it if the fast
    // path hid the flow from conntrack; renewals (one slow-path packet a
    // second) keep it.
    for h in [ha, hb] {
        netns::sysctl(
            &h.ns,
            &[
                ("net.netfilter.nf_conntrack_icmp_timeout", "2"),
                ("net.netfilter.nf_conntrack_udp_timeout", "2"),
                ("net.netfilter.nf_conntrack_udp_timeout_stream", "2"),
            ],
        )?;
    }
    let echo = UdpEcho::start(&ha.container_ns, &hb.container_ns, dst, 5800)?;
    let before = counters(&b)?;
    let answered = echo.exchange(120, Duration::from_millis(50))?;
    ensure!(
        answered == 120,
        "UDP request/response: {answered} of 120 answered"
    );
    for h in [ha, hb] {
        let udp = conntrack_entries(&h.ns, dst, "dport=5800")?;
        ensure!(
            !udp.is_empty(),
            "host {}: the 6 s UDP flow's conntrack entry expired while it ran",
            h.index
        );
    }
    let fast = gained(&before, &counters(&b)?, Reason::FastIngress);
    ensure!(
        fast.0 >= 100,
        "the UDP flow hardly took the fast path: {fast:?}"
    );

    // A rule added later applies to a flow already on the fast path within
    // a second (the approval's lifetime): the flow's next renewal meets it.
    let drop_udp = [
        "FORWARD",
        "-d",
        &dst.to_string(),
        "-p",
        "udp",
        "--dport",
        "5800",
        "-j",
        "DROP",
    ];
    let mut insert = vec!["-I"];
    insert.extend_from_slice(&drop_udp);
    iptables(hb, &insert)?;
    std::thread::sleep(Duration::from_millis(1500));
    let through = echo.exchange(20, Duration::from_millis(50))?;
    let mut delete = vec!["-D"];
    delete.extend_from_slice(&drop_udp);
    iptables(hb, &delete)?;
    ensure!(
        through == 0,
        "{through} of 20 UDP requests got through a DROP rule added 1.5 s before"
    );
    drop(echo);
    let before = counters(&b)?;
    let pinger = std::thread::spawn({
        let ns = ha.container_ns.clone();
        move || traffic::ping(&ns, dst, 120)
    });
    std::thread::sleep(Duration::from_secs(4));
    for h in [ha, hb] {
        let icmp = conntrack_entries(&h.ns, dst, "icmp")?;
        ensure!(
            !icmp.is_empty(),
            "host {}: the ping flow's conntrack entry expired while it ran",
            h.index
        );
    }
    pinger
        .join()
        .map_err(|_| anyhow::anyhow!("the pinger panicked"))??;
    let fast = gained(&before, &counters(&b)?, Reason::FastIngress);
    ensure!(fast.0 > 0, "the ping flow never took the fast path");

    // tcpdump inside the receiving pod sees what the fast path delivered.
    let pcap = std::env::temp_dir().join(format!("fast-path-pod-{}.pcap", std::process::id()));
    let capture = Capture::start(&hb.container_ns, "eth0", "tcp port 5700", &pcap)?;
    let before = counters(&b)?;
    // 1 MiB: the whole capture (aggregates of up to 64 KiB, taken whole)
    // fits the capture socket's buffer, so tcpdump cannot miss any.
    traffic::tcp_transfer(&ha.container_ns, &hb.container_ns, dst, 5700, MIB)?;
    let fast = gained(&before, &counters(&b)?, Reason::FastIngress);
    let file = capture.stop()?;
    let seen = cmd::run(
        None,
        &["tcpdump", "-n", "-r", file.to_str().unwrap_or_default()],
    )?;
    let _ = std::fs::remove_file(&file);
    let packets = seen.lines().filter(|l| l.contains(".5700")).count() as u64;
    ensure!(
        fast.0 > 0 && packets >= fast.0,
        "tcpdump in the pod saw {packets} packets, the fast path delivered {} into it",
        fast.0
    );
    drop((a, b));
    lab.destroy()
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn a_replaced_pod_gets_its_traffic_through_its_new_veth() -> Result<()> {
    let (lab, a, b) = two_hosts("fpod")?;
    let hb = b.host.clone();
    let dst = hb.container_ip;
    traffic::ping(&a.host.container_ns, dst, 10)?;

    // The pod goes: its veth pair with it (the lab deletes its namespace).
    cmd::ip(&hb.container_ns, &["link", "del", "eth0"])?;
    b.node().context("eBPF node")?.sync_pods()?;
    let att = attachments(&hb.ns)?;
    ensure!(
        att.tcx
            .iter()
            .all(|((d, _), p)| d != CONTAINER_VETH || p.is_empty()),
        "programs still listed on the deleted veth: {att:?}"
    );

    // A new pod with the same address behind a new veth.
    let pod = format!("{}n", hb.container_ns);
    cmd::run(None, &["ip", "netns", "add", &pod])?;
    let result = (|| -> Result<()> {
        cmd::ip(
            &pod,
            &[
                "link", "add", "eth0", "mtu", "1450", "type", "veth", "peer", "name", "vethn",
                "mtu", "1450", "netns", &hb.ns,
            ],
        )?;
        cmd::ip(&hb.ns, &["link", "set", "vethn", "master", BRIDGE_DEV])?;
        cmd::ip(&hb.ns, &["link", "set", "vethn", "up"])?;
        cmd::ip(&pod, &["addr", "add", &format!("{dst}/24"), "dev", "eth0"])?;
        cmd::ip(&pod, &["link", "set", "eth0", "up"])?;
        cmd::ip(
            &pod,
            &["route", "add", "default", "via", &hb.gateway.to_string()],
        )?;
        b.node().context("eBPF node")?.sync_pods()?;
        let att = attachments(&hb.ns)?;
        ensure!(
            matches!(att.tcx_on("vethn", "ingress").as_slice(), [p] if p.is(PROG_VETH_FROM_POD)),
            "the new veth has no fast path: {att:?}"
        );
        let before = counters(&b)?;
        traffic::ping(&a.host.container_ns, dst, 10)?;
        traffic::ping(&pod, a.host.container_ip, 10)?;
        let after = counters(&b)?;
        no_drops("the new pod's host", &before, &after)?;
        let fast = gained(&before, &after, Reason::FastIngress);
        ensure!(fast.0 > 0, "the new pod never got fast-path traffic");
        Ok(())
    })();
    let _ = cmd::run(None, &["ip", "netns", "del", &pod]);
    result?;
    drop((a, b));
    lab.destroy()
}
