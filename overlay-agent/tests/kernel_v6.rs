//! `flannel-v6.<VNI>` and the per-peer IPv6 entries, programmed by our
//! netlink functions on node A, against node B configured with iproute2
//! exactly as flannel configures a dual-stack node (doc B.3): the lab of
//! `common` (two hosts joined by a veth pair, a container behind each) with
//! an IPv6 underlay and IPv6 pods added. Traffic both ways through the
//! tunnel, checked on the wire; adoption, re-creation, removal,
//! DirectRouting, and IPv4's `flannel.1` working beside it.

mod common;

use std::{
    io::{BufRead, BufReader},
    net::Ipv6Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use common::{Lab, LabNode, Node, cmd, cmd_fails, ping};
use ipnet::Ipv6Net;
use overlay_agent::{
    datapath::{Datapath, Peer, kernel::KernelDatapath},
    flannel::{lease::Peer6, mac::MacAddr},
    netlink::{
        DeviceError, EntryTable, Netlink, ProgrammedPeer, VxlanDevice, VxlanDeviceSpec,
        direct_route::has_direct_route, peer_entries::Device, vxlan_device::DeviceOrigin,
    },
};

const DEV6: &str = "flannel-v6.1";
/// B's VTEP MACs, as its flanneld would have published them.
const B_MAC4: &str = "02:42:00:00:04:02";
const B_MAC6: &str = "02:42:00:00:06:02";

/// The IPv6 side of lab node `n` (1 or 2).
struct V6 {
    public: Ipv6Addr,
    subnet: Ipv6Net,
}

fn v6(n: u8) -> V6 {
    V6 {
        public: format!("fd00:77::{n}").parse().unwrap(),
        subnet: format!("fd00:10:77:{n}::/64").parse().unwrap(),
    }
}

/// Dual stack for the lab: IPv6 on the underlay veths and the pods' veths
/// (`nodad`, so nothing waits for DAD), forwarding on the hosts, checksums
/// computed in software on the underlay so that a capture sees the bytes
/// that would go on a real wire.
fn add_ipv6(lab: &Lab) -> Result<()> {
    for (i, node) in lab.nodes.iter().enumerate() {
        let n = u8::try_from(i + 1)?;
        let V6 { public, subnet } = v6(n);
        let gw = subnet.network();
        let ns = &node.ns;
        cmd(&format!(
            "ip -n {ns} -6 addr add {public}/64 dev {} nodad",
            node.underlay
        ))?;
        cmd(&format!(
            "ip netns exec {ns} ethtool -K {} tx off",
            node.underlay
        ))?;
        cmd(&format!("ip -n {ns} -6 addr add {gw}1/64 dev veth0 nodad"))?;
        cmd(&format!(
            "ip netns exec {ns} sysctl -qw net.ipv6.conf.all.forwarding=1"
        ))?;
        let c = &node.container;
        cmd(&format!("ip -n {c} -6 addr add {gw}2/64 dev eth0 nodad"))?;
        cmd(&format!("ip -n {c} -6 route add default via {gw}1"))?;
    }
    Ok(())
}

/// Node B, as flanneld configures a dual-stack node with peer A: both
/// devices, then A's neighbour, FDB entry and route on each (doc B.3).
fn flannel_node_b(b: &LabNode, a_mac4: MacAddr, a_mac6: MacAddr) -> Result<()> {
    let ns = &b.ns;
    let (a6, b6) = (v6(1), v6(2));
    cmd(&format!(
        "ip -n {ns} link add flannel.1 address {B_MAC4} mtu 1450 type vxlan id 1 local {} dev {} dstport 8472 nolearning",
        b.public_ip, b.underlay
    ))?;
    cmd(&format!(
        "ip -n {ns} link add {DEV6} address {B_MAC6} mtu 1450 type vxlan id 1 local {} dev {} dstport 8472 nolearning noudp6zerocsumtx noudp6zerocsumrx",
        b6.public, b.underlay
    ))?;
    cmd(&format!(
        "ip netns exec {ns} sysctl -qw net/ipv6/conf/{DEV6}/accept_ra=0"
    ))?;
    cmd(&format!("ip -n {ns} addr add 10.77.2.0/32 dev flannel.1"))?;
    cmd(&format!(
        "ip -n {ns} -6 addr add {}/128 dev {DEV6}",
        b6.subnet.network()
    ))?;
    cmd(&format!("ip -n {ns} link set flannel.1 up"))?;
    cmd(&format!("ip -n {ns} link set {DEV6} up"))?;
    // IPv4 peer A.
    cmd(&format!(
        "ip -n {ns} neigh replace 10.77.1.0 lladdr {a_mac4} dev flannel.1 nud permanent"
    ))?;
    cmd(&format!(
        "bridge -n {ns} fdb replace {a_mac4} dev flannel.1 dst 192.168.77.1 self permanent"
    ))?;
    cmd(&format!(
        "ip -n {ns} route replace 10.77.1.0/24 via 10.77.1.0 dev flannel.1 onlink"
    ))?;
    // IPv6 peer A.
    let gw = a6.subnet.network();
    cmd(&format!(
        "ip -n {ns} -6 neigh replace {gw} lladdr {a_mac6} dev {DEV6} nud permanent"
    ))?;
    cmd(&format!(
        "bridge -n {ns} fdb replace {a_mac6} dev {DEV6} dst {} self permanent",
        a6.public
    ))?;
    cmd(&format!(
        "ip -n {ns} -6 route replace {} via {gw} dev {DEV6} onlink",
        a6.subnet
    ))?;
    Ok(())
}

/// What node A's worker holds: the IPv4 kernel datapath (`flannel.1`), and
/// `flannel-v6.1` driven through the netlink functions directly.
struct NodeA {
    dp: KernelDatapath,
    nl: Netlink,
    v6: Option<(VxlanDevice<Ipv6Addr>, EntryTable<Ipv6Addr>)>,
}

fn node_a(a: &LabNode) -> Result<Node<NodeA>> {
    a.worker(|| NodeA {
        dp: KernelDatapath::new(),
        nl: Netlink::connect().expect("rtnetlink socket"),
        v6: None,
    })
}

fn spec6(a: &LabNode) -> VxlanDeviceSpec<Ipv6Addr> {
    let V6 { public, subnet } = v6(1);
    VxlanDeviceSpec {
        vni: 1,
        port: 0,
        public_ip: public,
        local_ip: public,
        underlay: a.underlay.into(),
        subnet,
        mtu: None,
        vtep_mac: None,
        learning: false,
        gbp: false,
    }
}

fn dev6(d: &VxlanDevice<Ipv6Addr>) -> Device<'_> {
    Device {
        ifindex: d.ifindex,
        name: &d.name,
    }
}

fn underlay6(d: &VxlanDevice<Ipv6Addr>) -> Device<'_> {
    Device {
        ifindex: d.underlay_ifindex,
        name: &d.underlay,
    }
}

/// `ensure_vxlan_device` for IPv6, then the device's table learned.
fn setup6(
    w: &Node<NodeA>,
    spec: VxlanDeviceSpec<Ipv6Addr>,
) -> Result<VxlanDevice<Ipv6Addr>, DeviceError> {
    w.run(move |s, rt| {
        rt.block_on(async {
            let dev = s.nl.ensure_vxlan_device(&spec).await?;
            let entries = s.nl.learn_entries(dev6(&dev)).await?;
            s.v6 = Some((dev.clone(), entries));
            Ok(dev)
        })
    })
}

fn add6(w: &Node<NodeA>, peer: Peer6) -> Result<()> {
    w.run(move |s, rt| {
        let (dev, entries) = s.v6.as_mut().context("v6 not set up")?;
        Ok(rt.block_on(s.nl.replace_peer(dev6(dev), entries, &peer))?)
    })
}

fn remove6(w: &Node<NodeA>, peer: Peer6) -> Result<()> {
    w.run(move |s, rt| {
        let (dev, entries) = s.v6.as_mut().context("v6 not set up")?;
        Ok(rt.block_on(s.nl.remove_peer(dev6(dev), entries, &peer))?)
    })
}

/// What is programmed on `flannel-v6.1`, read back (the table relearned).
fn programmed6(w: &Node<NodeA>) -> Result<Vec<ProgrammedPeer<Ipv6Addr>>> {
    w.run(move |s, rt| {
        let (dev, entries) = s.v6.as_mut().context("v6 not set up")?;
        let (peers, table) = rt.block_on(s.nl.programmed_peers(dev6(dev)))?;
        *entries = table;
        Ok(peers)
    })
}

fn peers6(w: &Node<NodeA>) -> Result<Vec<Peer6>> {
    Ok(programmed6(w)?
        .iter()
        .filter_map(ProgrammedPeer::peer)
        .collect())
}

fn teardown(w: &Node<NodeA>) -> Result<()> {
    w.run(|s, rt| {
        rt.block_on(async {
            s.nl.delete_link_by_name(DEV6).await?;
            s.dp.teardown().await?;
            anyhow::Ok(())
        })
    })
}

/// Waits until no address of `dev` in `ns` is tentative (DAD done).
fn wait_dad(ns: &str, dev: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = cmd(&format!("ip -n {ns} -6 addr show dev {dev}"))?;
        if !out.contains("tentative") {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "DAD still running:\n{out}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The three entries flannel programs for a v6 peer, as iproute2 shows them.
fn expect_v6_entries(ns: &str, peer: &Peer6) -> Result<()> {
    let gw = peer.subnet.network();
    let neigh = cmd(&format!("ip -n {ns} -6 neigh show dev {DEV6}"))?;
    let fdb = cmd(&format!("bridge -n {ns} fdb show dev {DEV6}"))?;
    let routes = cmd(&format!("ip -n {ns} -6 route show dev {DEV6}"))?;
    eprintln!(
        "[{ns}] ip -6 neigh show dev {DEV6}\n{neigh}[{ns}] bridge fdb show dev {DEV6}\n{fdb}[{ns}] ip -6 route show dev {DEV6}\n{routes}"
    );
    let want_neigh = format!("{gw} lladdr {} PERMANENT", peer.vtep_mac);
    let want_fdb = format!("{} dst {} self permanent", peer.vtep_mac, peer.public_ip);
    let want_route = format!("{} via {gw} ", peer.subnet);
    ensure!(
        neigh.lines().any(|l| l.trim() == want_neigh),
        "`{want_neigh}` missing:\n{neigh}"
    );
    ensure!(
        fdb.lines().any(|l| l.trim() == want_fdb),
        "`{want_fdb}` missing:\n{fdb}"
    );
    ensure!(
        routes
            .lines()
            .any(|l| l.starts_with(&want_route) && l.contains(" onlink")),
        "`{want_route}... onlink` missing:\n{routes}"
    );
    ensure!(
        fdb.lines().filter(|l| l.contains(" dst ")).count() == 1,
        "exactly one unicast FDB entry expected:\n{fdb}"
    );
    Ok(())
}

/// No neighbour or FDB entry of `peer` left on `flannel-v6.1`, and no
/// route to its subnet unless `route_stays` (a direct route).
fn expect_no_v6_entries(ns: &str, peer: &Peer6, route_stays: bool) -> Result<()> {
    let neigh = cmd(&format!("ip -n {ns} -6 neigh show dev {DEV6}"))?;
    let fdb = cmd(&format!("bridge -n {ns} fdb show dev {DEV6}"))?;
    let routes = cmd(&format!("ip -n {ns} -6 route"))?;
    ensure!(
        !neigh.contains(&peer.subnet.network().to_string()),
        "{neigh}"
    );
    ensure!(!fdb.contains(&peer.vtep_mac.to_string()), "{fdb}");
    ensure!(!fdb.contains(" dst "), "{fdb}");
    ensure!(
        routes.contains(&peer.subnet.to_string()) == route_stays,
        "{routes}"
    );
    Ok(())
}

fn peer6_b() -> Result<Peer6> {
    let V6 { public, subnet } = v6(2);
    Ok(Peer6 {
        subnet,
        public_ip: public,
        vtep_mac: B_MAC6.parse()?,
    })
}

fn link_ifindex(ns: &str, dev: &str) -> Result<u32> {
    let out = cmd(&format!("ip -n {ns} -o link show {dev}"))?;
    Ok(out.split(':').next().context("ifindex")?.trim().parse()?)
}

/// A tcpdump in a namespace, killed (and the lab's namespaces with it)
/// whatever happens; bounded by `timeout`.
struct Capture {
    child: Child,
    path: PathBuf,
}

impl Capture {
    fn start(ns: &str, iface: &str, path: &Path) -> Result<Capture> {
        let _ = std::fs::remove_file(path);
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "timeout", "60", "tcpdump", "-i", iface])
            .args([
                "-n",
                "--immediate-mode",
                "-U",
                "-s",
                "0",
                "-Z",
                "root",
                "-w",
            ])
            .arg(path)
            .args(["udp", "port", "8472"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("tcpdump")?;
        let stderr = child.stderr.take().context("tcpdump stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let capture = Capture {
            child,
            path: path.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("listening on") => return Ok(capture),
                Ok(_) => {}
                Err(e) => bail!("tcpdump did not start: {e}"),
            }
        }
    }

    /// Stops tcpdump (it flushes on SIGTERM) and returns the file.
    fn stop(mut self) -> Result<PathBuf> {
        std::thread::sleep(Duration::from_millis(300));
        let pid = i32::try_from(self.child.id())?;
        // `ip netns exec` execs timeout, which forwards SIGTERM to tcpdump.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        self.child.wait()?;
        Ok(self.path.clone())
    }
}

impl Drop for Capture {
    /// SIGTERM, which `timeout` passes on to tcpdump (a SIGKILL would
    /// leave tcpdump running until the lab's veth goes).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                // SAFETY: kill(2) on our own child's pid.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let _ = self.child.wait();
        }
    }
}

/// One VXLAN-over-IPv6 frame as tshark decodes it.
#[derive(Debug)]
struct Frame6 {
    outer_src: String,
    outer_dst: String,
    dst_port: String,
    checksum: String,
    /// tshark's verdict on the UDP checksum: 1 good, 0 bad, 2 unverified.
    checksum_status: String,
    vni: String,
    /// Outer and inner Ethernet sources and destinations.
    eth_src: Vec<String>,
    eth_dst: Vec<String>,
    protocols: String,
}

fn tshark(pcap: &Path, extra: &[&str]) -> Result<String> {
    let out = Command::new("tshark")
        .args(["-n", "-r"])
        .arg(pcap)
        .args([
            "-d",
            "udp.port==8472,vxlan",
            "-o",
            "udp.check_checksum:TRUE",
        ])
        .args(extra)
        .output()
        .context("tshark")?;
    ensure!(
        out.status.success(),
        "tshark: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn frames6(pcap: &Path) -> Result<Vec<Frame6>> {
    let mut args = vec![
        "-T",
        "fields",
        "-E",
        "separator=/t",
        "-E",
        "occurrence=a",
        "-E",
        "aggregator=|",
    ];
    for f in [
        "ipv6.src",
        "ipv6.dst",
        "udp.dstport",
        "udp.checksum",
        "udp.checksum.status",
        "vxlan.vni",
        "eth.src",
        "eth.dst",
        "frame.protocols",
    ] {
        args.extend(["-e", f]);
    }
    let out = tshark(pcap, &args)?;
    let mut frames = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let c: Vec<&str> = line.split('\t').collect();
        ensure!(c.len() == 9, "unexpected tshark line {line:?}");
        let first = |s: &str| s.split('|').next().unwrap_or("").to_owned();
        frames.push(Frame6 {
            outer_src: first(c[0]),
            outer_dst: first(c[1]),
            dst_port: first(c[2]),
            checksum: first(c[3]),
            checksum_status: first(c[4]),
            vni: c[5].to_owned(),
            eth_src: c[6].split('|').map(str::to_owned).collect(),
            eth_dst: c[7].split('|').map(str::to_owned).collect(),
            protocols: c[8].to_owned(),
        });
    }
    Ok(frames)
}

/// Frames tshark finds malformed or with an expert warning or worse.
fn problems(pcap: &Path) -> Result<Vec<String>> {
    let out = tshark(
        pcap,
        &[
            "-Y",
            "_ws.malformed || _ws.expert.severity >= 0x00600000",
            "-T",
            "fields",
            "-e",
            "frame.number",
            "-e",
            "_ws.expert.message",
        ],
    )?;
    Ok(out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect())
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn v6_device_and_peers_interoperate_with_flannel_configured_by_iproute2() -> Result<()> {
    let lab = Lab::new("v6")?;
    add_ipv6(&lab)?;
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let wa = node_a(a)?;

    // A: IPv4 through the kernel datapath, IPv6 through the new functions.
    let state4 = wa.run({
        let spec = a.spec();
        move |s, rt| rt.block_on(s.dp.setup(&spec))
    })?;
    let dev = setup6(&wa, spec6(a))?;
    ensure!(dev.origin == DeviceOrigin::Created, "{:?}", dev.origin);
    // flannel asks for 1500 - 50; the kernel gives IPv6 VXLAN 1500 - 70.
    ensure!(dev.name == DEV6 && dev.mtu == 1430, "{dev:?}");
    ensure!(
        dev.mac.0[0] & 0x03 == 0x02,
        "random locally administered unicast MAC: {}",
        dev.mac
    );
    ensure!(dev.mac != state4.vtep_mac, "a MAC of its own");
    flannel_node_b(b, state4.vtep_mac, dev.mac)?;

    let link = cmd(&format!("ip -n {} -d link show {DEV6}", a.ns))?;
    eprintln!("[{}] ip -d link show {DEV6}\n{link}", a.ns);
    for want in [
        "mtu 1430",
        "UP",
        &format!("link/ether {}", dev.mac),
        "vxlan id 1 local fd00:77::1 dev ua",
        "dstport 8472",
        "nolearning",
        "noudp6zerocsumtx",
        "noudp6zerocsumrx",
    ] {
        ensure!(link.contains(want), "`{want}` missing from:\n{link}");
    }
    ensure!(!link.contains(" gbp"), "{link}");
    // flanneld's own device (`mtu 1450` asked) is no different.
    let link_b = cmd(&format!("ip -n {} -d link show {DEV6}", b.ns))?;
    ensure!(link_b.contains("mtu 1430"), "{link_b}");
    let addr = cmd(&format!("ip -n {} -6 addr show dev {DEV6}", a.ns))?;
    eprintln!("[{}] ip -6 addr show dev {DEV6}\n{addr}", a.ns);
    ensure!(addr.contains("inet6 fd00:10:77:1::/128"), "{addr}");
    ensure!(addr.contains("inet6 fe80::"), "link-local kept: {addr}");
    let ra = cmd(&format!(
        "ip netns exec {} sysctl -n net/ipv6/conf/{DEV6}/accept_ra",
        a.ns
    ))?;
    ensure!(ra.trim() == "0", "accept_ra {ra}");

    // Peers both ways.
    let peer4_b = Peer {
        subnet: b.subnet.parse()?,
        public_ip: b.public_ip.parse()?,
        vtep_mac: B_MAC4.parse()?,
        v6: None,
    };
    wa.run(move |s, rt| rt.block_on(s.dp.add_peer(&peer4_b)))?;
    let peer_b = peer6_b()?;
    add6(&wa, peer_b)?;
    expect_v6_entries(&a.ns, &peer_b)?;
    let read = programmed6(&wa)?;
    ensure!(
        read == vec![ProgrammedPeer {
            subnet: peer_b.subnet,
            gateway: peer_b.subnet.network(),
            vtep_mac: Some(peer_b.vtep_mac),
            public_ip: Some(peer_b.public_ip),
        }],
        "read back: {read:?}"
    );
    ensure!(peers6(&wa)? == vec![peer_b]);
    // Re-adding is idempotent.
    add6(&wa, peer_b)?;
    expect_v6_entries(&a.ns, &peer_b)?;

    // Traffic both ways, captured on B's underlay port.
    wait_dad(&a.ns, DEV6)?;
    wait_dad(&b.ns, DEV6)?;
    let pcap = std::env::temp_dir().join(format!("kernel_v6-{}.pcap", std::process::id()));
    let capture = Capture::start(&b.ns, b.underlay, &pcap)?;
    ping(&a.container, "fd00:10:77:2::2")?;
    ping(&b.container, "fd00:10:77:1::2")?;
    // The devices' own /128s answer too.
    ping(&a.container, "fd00:10:77:2::")?;
    ping(&b.container, "fd00:10:77:1::")?;
    // IPv4 beside it, through flannel.1.
    ping(&a.container, "10.77.2.2")?;
    ping(&b.container, "10.77.1.2")?;
    let pcap = capture.stop()?;

    let frames = frames6(&pcap)?;
    let problems = problems(&pcap)?;
    let _ = std::fs::remove_file(&pcap);
    let (a6, b6) = (v6(1).public.to_string(), v6(2).public.to_string());
    let v6_frames: Vec<&Frame6> = frames.iter().filter(|f| !f.outer_src.is_empty()).collect();
    eprintln!(
        "{} VXLAN frames captured on {}, {} over IPv6; e.g. {:?}",
        frames.len(),
        b.underlay,
        v6_frames.len(),
        v6_frames.first()
    );
    ensure!(problems.is_empty(), "tshark finds problems: {problems:?}");
    let from_a = v6_frames
        .iter()
        .filter(|f| f.outer_src == a6 && f.outer_dst == b6)
        .count();
    let from_b = v6_frames
        .iter()
        .filter(|f| f.outer_src == b6 && f.outer_dst == a6)
        .count();
    // 4 x 3 echo requests one way and 4 x 3 replies the other.
    ensure!(
        from_a >= 12 && from_b >= 12,
        "A->B {from_a}, B->A {from_b} frames: {v6_frames:#?}"
    );
    for f in &v6_frames {
        ensure!(f.dst_port == "8472", "{f:?}");
        ensure!(f.vni == "1", "{f:?}");
        ensure!(
            f.checksum != "0x0000" && f.checksum_status == "1",
            "outer UDP checksum must be valid and non-zero: {f:?}"
        );
        let (inner_src, inner_dst) = (&f.eth_src[1], &f.eth_dst[1]);
        let macs = [dev.mac.to_string(), B_MAC6.to_string()];
        ensure!(
            macs.contains(inner_src) && macs.contains(inner_dst) && inner_src != inner_dst,
            "inner MACs are the v6 VTEPs': {f:?}"
        );
        ensure!(
            f.protocols
                .starts_with("eth:ethertype:ipv6:udp:vxlan:eth:ethertype:ipv6:icmpv6"),
            "{f:?}"
        );
    }
    // The IPv4 pings went over IPv4 VXLAN, not this device.
    ensure!(
        frames.len() >= v6_frames.len() + 12,
        "IPv4 VXLAN frames missing: {} of {}",
        frames.len() - v6_frames.len(),
        frames.len()
    );

    // Removal: all three entries go, traffic over v6 stops, v4 goes on.
    remove6(&wa, peer_b)?;
    expect_no_v6_entries(&a.ns, &peer_b, false)?;
    ensure!(programmed6(&wa)?.is_empty());
    cmd_fails(&format!(
        "ip netns exec {} ping -c 1 -W 1 fd00:10:77:2::2",
        a.container
    ))?;
    ping(&a.container, "10.77.2.2")?;
    remove6(&wa, peer_b)?; // idempotent
    // And back.
    add6(&wa, peer_b)?;
    ping(&a.container, "fd00:10:77:2::2")?;

    teardown(&wa)?;
    cmd_fails(&format!("ip -n {} link show {DEV6}", a.ns))?;
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn v6_device_adopts_flannels_and_recreates_an_incompatible_one() -> Result<()> {
    let lab = Lab::new("v6a")?;
    add_ipv6(&lab)?;
    let a = &lab.nodes[0];
    let ns = &a.ns;
    // What flanneld leaves behind: its device with a random MAC, a peer, and
    // an address that is no longer its lease's.
    let flanneld_mac = "0e:1f:2a:3b:4c:5d";
    cmd(&format!(
        "ip -n {ns} link add {DEV6} address {flanneld_mac} mtu 1450 type vxlan id 1 local fd00:77::1 dev ua dstport 8472 nolearning noudp6zerocsumtx noudp6zerocsumrx"
    ))?;
    cmd(&format!(
        "ip -n {ns} -6 addr add fd00:10:77:9::/128 dev {DEV6} nodad"
    ))?;
    cmd(&format!("ip -n {ns} link set {DEV6} up"))?;
    let peer_b = peer6_b()?;
    cmd(&format!(
        "ip -n {ns} -6 neigh add fd00:10:77:2:: lladdr {B_MAC6} dev {DEV6} nud permanent"
    ))?;
    cmd(&format!(
        "bridge -n {ns} fdb add {B_MAC6} dev {DEV6} dst fd00:77::2 self permanent"
    ))?;
    cmd(&format!(
        "ip -n {ns} -6 route add fd00:10:77:2::/64 via fd00:10:77:2:: dev {DEV6} onlink"
    ))?;
    let ifindex = link_ifindex(ns, DEV6)?;

    let wa = node_a(a)?;
    let dev = setup6(&wa, spec6(a))?;
    ensure!(dev.origin == DeviceOrigin::Adopted, "{:?}", dev.origin);
    ensure!(dev.ifindex == ifindex);
    ensure!(
        dev.mac.to_string() == flanneld_mac,
        "the lease's MAC survives: {dev:?}"
    );
    let addr = cmd(&format!("ip -n {ns} -6 addr show dev {DEV6}"))?;
    eprintln!("[{ns}] after adoption: ip -6 addr show dev {DEV6}\n{addr}");
    ensure!(addr.contains("inet6 fd00:10:77:1::/128"), "{addr}");
    ensure!(!addr.contains("fd00:10:77:9::"), "old address left: {addr}");
    ensure!(addr.contains("inet6 fe80::"), "link-local kept: {addr}");
    ensure!(peers6(&wa)? == vec![peer_b], "{:?}", peers6(&wa)?);
    expect_v6_entries(ns, &peer_b)?;

    // The lease's MAC (BackendV6Data.VtepMAC) demanded: applied in place,
    // the neighbours the kernel flushes with a MAC change put back.
    let demanded: MacAddr = "02:42:00:00:06:aa".parse()?;
    let dev = setup6(
        &wa,
        VxlanDeviceSpec {
            vtep_mac: Some(demanded),
            ..spec6(a)
        },
    )?;
    ensure!(dev.origin == DeviceOrigin::Adopted && dev.ifindex == ifindex);
    ensure!(dev.mac == demanded, "{dev:?}");
    let link = cmd(&format!("ip -n {ns} link show {DEV6}"))?;
    ensure!(link.contains(&format!("link/ether {demanded}")), "{link}");
    expect_v6_entries(ns, &peer_b)?;

    // Incompatible: another port, then GBP configured, then a device local
    // to another address, then one sending zero checksums: each re-created.
    let cases: Vec<(VxlanDeviceSpec<Ipv6Addr>, Option<&str>, &str)> = vec![
        (
            VxlanDeviceSpec {
                port: 4789,
                ..spec6(a)
            },
            None,
            "port: 8472 vs 4789",
        ),
        (
            VxlanDeviceSpec {
                gbp: true,
                ..spec6(a)
            },
            None,
            "port: 4789 vs 8472",
        ),
        (spec6(a), None, "gbp: true vs false"),
        (
            spec6(a),
            Some("local fd00:77::9 dev ua dstport 8472 nolearning"),
            "vtep (external) IP: fd00:77::9 vs fd00:77::1",
        ),
        (
            spec6(a),
            Some("local fd00:77::1 dev ua dstport 8472 nolearning udp6zerocsumtx"),
            "udp6zerocsumtx: true vs false",
        ),
        (
            spec6(a),
            Some("local 192.168.77.1 dev ua dstport 8472 nolearning"),
            "vtep (external) IP: 192.168.77.1 vs fd00:77::1",
        ),
    ];
    cmd(&format!(
        "ip -n {ns} -6 addr add fd00:77::9/64 dev ua nodad"
    ))?;
    let mut last = ifindex;
    for (spec, existing, reason) in cases {
        if let Some(args) = existing {
            cmd(&format!("ip -n {ns} link del {DEV6}"))?;
            cmd(&format!(
                "ip -n {ns} link add {DEV6} type vxlan id 1 {args}"
            ))?;
        }
        let gbp = spec.gbp;
        let dev = setup6(&wa, spec)?;
        ensure!(
            dev.origin
                == DeviceOrigin::Recreated {
                    reason: reason.into()
                },
            "want {reason}: {:?}",
            dev.origin
        );
        ensure!(dev.ifindex != last, "a new device");
        last = dev.ifindex;
        let link = cmd(&format!("ip -n {ns} -d link show {DEV6}"))?;
        ensure!(
            link.contains("vxlan id 1 local fd00:77::1 dev ua")
                && link.contains("noudp6zerocsumtx")
                && link.contains(" gbp") == gbp,
            "{link}"
        );
        ensure!(peers6(&wa)?.is_empty(), "a new device has no entries");
    }

    // Specs the kernel or IPv6 cannot honour are refused before anything is touched.
    for (spec, want) in [
        (
            VxlanDeviceSpec {
                mtu: Some(1329),
                ..spec6(a)
            },
            "less than 1280",
        ),
        (
            VxlanDeviceSpec {
                vni: 10_000,
                ..spec6(a)
            },
            "longer than 15",
        ),
    ] {
        let err = setup6(&wa, spec).unwrap_err();
        ensure!(err.to_string().contains(want), "{err}");
    }
    ensure!(link_ifindex(ns, DEV6)? == last, "untouched");
    teardown(&wa)?;
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn v6_direct_routing_routes_a_peer_on_the_segment_via_its_public_ipv6() -> Result<()> {
    let lab = Lab::new("v6d")?;
    add_ipv6(&lab)?;
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let (a6, b6) = (v6(1), v6(2));
    // B routes A's pods directly, as flannel with DirectRouting.
    cmd(&format!(
        "ip -n {} -6 route replace {} via {} dev {}",
        b.ns, a6.subnet, a6.public, b.underlay
    ))?;
    // A reaches fd00:99::/64 only through a router: not direct.
    cmd(&format!(
        "ip -n {} -6 route add fd00:99::/64 via fd00:77::2 dev {}",
        a.ns, a.underlay
    ))?;
    let wa = node_a(a)?;
    let dev = setup6(&wa, spec6(a))?;
    let peer_b = peer6_b()?;

    // First a VXLAN peer (B has no device: the route is what matters here).
    add6(&wa, peer_b)?;
    let (direct, behind_router, unreachable) = wa.run(move |s, rt| {
        rt.block_on(async {
            let (dev, _) = s.v6.as_ref().context("v6")?;
            let underlay = dev.underlay_ifindex;
            let direct = s.nl.route_get(b6.public).await?;
            let routed = s.nl.route_get("fd00:99::5".parse::<Ipv6Addr>()?).await?;
            let none = s.nl.route_get("2001:db8::1".parse::<Ipv6Addr>()?).await?;
            anyhow::Ok((
                direct.is_some_and(|h| h.is_direct(underlay)),
                routed.is_some_and(|h| h.is_direct(underlay)),
                none,
            ))
        })
    })?;
    ensure!(direct, "the peer's PublicIPv6 is on the segment");
    ensure!(!behind_router, "a next hop behind a router is not direct");
    ensure!(unreachable.is_none(), "no route: {unreachable:?}");

    // Direct: its route replaces the VXLAN one in place, the neighbour and
    // FDB entry go, traffic flows without the tunnel.
    wa.run(move |s, rt| {
        rt.block_on(async {
            let (dev, entries) = s.v6.as_mut().context("v6")?;
            s.nl.replace_direct_route(underlay6(dev), peer_b.subnet, peer_b.public_ip)
                .await?;
            for r in
                s.nl.remove_neighbour_and_fdb(dev6(dev), entries, &peer_b)
                    .await
            {
                r?;
            }
            anyhow::Ok(())
        })
    })?;
    let routes = cmd(&format!("ip -n {} -6 route show {}", a.ns, peer_b.subnet))?;
    eprintln!("[{}] ip -6 route show {}\n{routes}", a.ns, peer_b.subnet);
    let lines: Vec<&str> = routes.lines().collect();
    ensure!(
        lines.len() == 1
            && lines[0].starts_with(&format!(
                "{} via {} dev ua",
                peer_b.subnet, peer_b.public_ip
            )),
        "one direct route expected:\n{routes}"
    );
    expect_no_v6_entries(&a.ns, &peer_b, true)?;
    let found = wa.run(move |s, rt| {
        rt.block_on(async {
            let (dev, _) = s.v6.as_ref().context("v6")?;
            let routes: std::collections::HashSet<_> =
                s.nl.peer_routes::<Ipv6Addr>(underlay6(dev))
                    .await?
                    .into_iter()
                    .collect();
            anyhow::Ok(has_direct_route(&routes, peer_b.subnet, peer_b.public_ip))
        })
    })?;
    ensure!(found, "the direct route is read back");
    ensure!(programmed6(&wa)?.is_empty(), "no VXLAN peer left");
    ping(&a.container, "fd00:10:77:2::2")?;
    ping(&b.container, "fd00:10:77:1::2")?;

    // Removal.
    wa.run(move |s, rt| {
        rt.block_on(async {
            let (dev, _) = s.v6.as_ref().context("v6")?;
            s.nl.delete_direct_route(underlay6(dev), peer_b.subnet, peer_b.public_ip)
                .await?;
            // Idempotent.
            s.nl.delete_direct_route(underlay6(dev), peer_b.subnet, peer_b.public_ip)
                .await?;
            anyhow::Ok(())
        })
    })?;
    let routes = cmd(&format!("ip -n {} -6 route", a.ns))?;
    ensure!(!routes.contains(&peer_b.subnet.to_string()), "{routes}");
    cmd_fails(&format!(
        "ip netns exec {} ping -c 1 -W 1 fd00:10:77:2::2",
        a.container
    ))?;
    drop(dev);
    teardown(&wa)?;
    Ok(())
}
