//! Program tests of the fast path: `veth_from_pod`, `veth_to_pod` and the
//! fast-path parts of `vxlan_ingress_tc` and `vxlan_egress`, run on crafted
//! frames through `BPF_PROG_TEST_RUN`. The exact bytes out, the verdicts, the
//! counters and the approvals in `FAST_FLOWS` are checked.
//!
//! The expected frames are built by hand, with the helpers `programs.rs`
//! uses too (`overlay_tests::frames`): the fast path must put on the
//! wire what the slow path (`vxlan_egress` after the host's routing) does,
//! except for the inner TTL, which the skipped routing step would have
//! lowered by one (with the header checksum following it). Toward a pod it
//! must deliver what the host's bridge would have: the inner IPv4 packet
//! (TTL one lower) from the pod's gateway MAC to the pod's MAC.
//!
//! Under test-run nothing is sent: a redirect shows as `TC_ACT_REDIRECT`, and
//! the outer MACs, which `bpf_redirect_neigh` writes when it sends, are still
//! the input's. The programs say "not ours" with `TCX_NEXT` (-1), which
//! test-run reports as `0xffff_ffff`.
//!
//! `skb->mark` and `skb->ifindex` are set through a `struct __sk_buff` context.
//! The kernel (`bpf_prog_test_run_skb`) accepts both fields; an ifindex above
//! 1 makes it look the device up in the caller's network namespace and run
//! the program on it (`-ENODEV` if there is none), 0 or 1 leave it on the
//! loopback device. So the tests that need a pod veth's ifindex run inside a
//! namespace of their own with a veth of a known index.

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, PerCpuHashMap, PerCpuValues,
        lpm_trie::{Key, LpmTrie},
    },
    programs::SchedClassifier,
    util::nr_cpus,
};
use overlay_common::{
    consts::{
        MAP_FAST_CONFIG, MAP_FAST_FLOWS, MAP_KNOWN_VTEPS, MAP_PEER_STATS, MAP_POD_ADDRS,
        MAP_POD_VETHS, MAP_REMOTE_SUBNETS, PROG_EGRESS, PROG_INGRESS_TC, PROG_VETH_FROM_POD,
        PROG_VETH_TO_POD,
    },
    counters::Reason,
    fastpath::{
        APPROVAL_TTL_NS, DEFAULT_FAST_PATH_MARK, DIR_FROM_POD, DIR_TO_POD, FastFlow,
        FastPathConfig, FlowKey,
    },
    maps::{KnownVtep, PeerTraffic, RemoteVtep},
};
use overlay_tests::frames::*;

/// The pod's own MAC (its eth0) and its gateway's (`cni0`).
const POD_MAC: [u8; 6] = [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x05];
const GW_MAC: [u8; 6] = [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x01];
/// This node's pod subnet: 10.244.1.0/24.
const POD_SUBNET: ([u8; 4], u32) = ([10, 244, 1, 0], 24);
/// The ifindex of the pod's host-side veth in `POD_VETHS` (the ingress tests
/// never run on it: `bpf_redirect_peer` only records its target under
/// test-run).
const POD_VETH: u32 = 4242;

const IPPROTO_GRE: u8 = 47;

/// The approval bit the agent configures by default.
const FAST_PATH_MARK: u32 = DEFAULT_FAST_PATH_MARK;
/// The pod bridge's address (the pods' gateway): the node's.
const GATEWAY: [u8; 4] = [10, 244, 1, 1];
/// The pods' MTU (the underlay's less VXLAN's 50 bytes).
const POD_MTU: u32 = 1450;
/// `skb->ifindex` of a test-run on the loopback device (context ifindex 0).
const LO: u32 = 1;

// ---------------------------------------------------------------------------
// The programs, loaded from the object the agent embeds.

struct Programs {
    ebpf: Ebpf,
}

/// One test-run: the verdict, the frame out and the context fields written
/// back.
#[derive(Debug)]
struct Run {
    verdict: u32,
    out: Vec<u8>,
    mark: u32,
    ifindex: u32,
}

fn fast_on() -> FastPathConfig {
    FastPathConfig {
        enabled: 1,
        pod_subnet: POD_SUBNET.0,
        pod_prefix_len: POD_SUBNET.1,
        mark: FAST_PATH_MARK,
        gateway: GATEWAY,
        _pad: 0,
    }
}

impl Loaded for Programs {
    fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }
}

impl Programs {
    /// A node with one peer and the fast path on.
    fn load() -> Self {
        Self::load_with(Some(fast_on()))
    }

    /// `fast`: what the agent wrote into `FAST_CONFIG` (`None`: nothing).
    fn load_with(fast: Option<FastPathConfig>) -> Self {
        let mut ebpf = load_object();
        configure_one_peer(&mut ebpf);
        let mut stats: PerCpuHashMap<_, [u8; 4], PeerTraffic> =
            PerCpuHashMap::try_from(ebpf.map_mut(MAP_PEER_STATS).unwrap()).unwrap();
        let zero = vec![PeerTraffic::default(); nr_cpus().unwrap()];
        stats
            .insert(PEER_IP, PerCpuValues::try_from(zero).unwrap(), 0)
            .unwrap();
        if let Some(fast) = fast {
            let mut config: Array<_, FastPathConfig> =
                Array::try_from(ebpf.map_mut(MAP_FAST_CONFIG).unwrap()).unwrap();
            config.set(0, fast, 0).unwrap();
        }
        for name in [
            PROG_EGRESS,
            PROG_INGRESS_TC,
            PROG_VETH_FROM_POD,
            PROG_VETH_TO_POD,
        ] {
            load_classifier(&mut ebpf, name);
        }
        load_jumps(&mut ebpf);
        Self { ebpf }
    }

    /// Runs a TC program with `skb->mark` and `skb->ifindex` set as given
    /// (ifindex 0: the loopback device test-run uses by default).
    fn run(&self, name: &str, frame: &[u8], mark: u32, ifindex: u32) -> Run {
        self.run_ctx(name, frame, mark, ifindex, None)
    }

    fn run_ctx(
        &self,
        name: &str,
        frame: &[u8],
        mark: u32,
        ifindex: u32,
        gso: Option<(u32, u32)>,
    ) -> Run {
        let prog: &SchedClassifier = self.ebpf.program(name).unwrap().try_into().unwrap();
        let ctx = skb_ctx(mark, ifindex, gso);
        let mut ctx_out = [0u8; SKB_CTX_LEN];
        let (verdict, out) = run_frame(prog, name, frame, Some(&ctx), Some(&mut ctx_out));
        let field = |at: usize| u32::from_ne_bytes(ctx_out[at..at + 4].try_into().unwrap());
        Run {
            verdict,
            out,
            mark: field(SKB_MARK),
            ifindex: field(SKB_IFINDEX),
        }
    }

    fn veth_from_pod(&self, frame: &[u8]) -> Run {
        self.run(PROG_VETH_FROM_POD, frame, 0, 0)
    }

    /// `veth_from_pod` on the host-side veth `ifindex`.
    fn veth_from_pod_on(&self, frame: &[u8], ifindex: u32) -> Run {
        self.run(PROG_VETH_FROM_POD, frame, 0, ifindex)
    }

    fn veth_to_pod(&self, frame: &[u8], mark: u32, ifindex: u32) -> Run {
        self.run(PROG_VETH_TO_POD, frame, mark, ifindex)
    }

    fn egress(&self, frame: &[u8], mark: u32) -> Run {
        self.run(PROG_EGRESS, frame, mark, 0)
    }

    fn ingress_tc(&self, frame: &[u8]) -> Run {
        self.run(PROG_INGRESS_TC, frame, 0, 0)
    }

    fn approve(&mut self, key: FlowKey, value: FastFlow) {
        let mut flows: HashMap<_, FlowKey, FastFlow> =
            HashMap::try_from(self.ebpf.map_mut(MAP_FAST_FLOWS).unwrap()).unwrap();
        flows.insert(key, value, 0).unwrap();
    }

    /// An approval from a pod, as `vxlan_egress` records it, stamped `ns`,
    /// and its source bound to the loopback device test-runs use (as
    /// `veth_to_pod` learns it from the host's deliveries).
    fn approve_from_pod(&mut self, packet: &[u8], ns: u64) {
        let value = FastFlow {
            approved_ns: ns,
            ..FastFlow::default()
        };
        self.approve(key_of(packet, DIR_FROM_POD), value);
        self.bind(packet[12..16].try_into().unwrap(), LO);
    }

    /// Binds a pod address to a veth in `POD_ADDRS`.
    fn bind(&mut self, ip: [u8; 4], ifindex: u32) {
        let mut addrs: HashMap<_, [u8; 4], u32> =
            HashMap::try_from(self.ebpf.map_mut(MAP_POD_ADDRS).unwrap()).unwrap();
        addrs.insert(ip, ifindex, 0).unwrap();
    }

    /// The veth `ip` is bound to in `POD_ADDRS`.
    fn bound(&self, ip: [u8; 4]) -> Option<u32> {
        let addrs: HashMap<_, [u8; 4], u32> =
            HashMap::try_from(self.ebpf.map(MAP_POD_ADDRS).unwrap()).unwrap();
        addrs.get(&ip, 0).ok()
    }

    /// An approval toward a pod, as `veth_to_pod` records it, stamped `ns`.
    fn approve_to_pod(&mut self, packet: &[u8], ns: u64) {
        self.approve(key_of(packet, DIR_TO_POD), to_pod_approval(ns));
    }

    /// Lists a pod veth as the agent does, with the lab's pod MTU.
    fn add_pod_veth(&mut self, ifindex: u32) {
        self.add_pod_veth_mtu(ifindex, POD_MTU);
    }

    fn add_pod_veth_mtu(&mut self, ifindex: u32, mtu: u32) {
        let mut veths: HashMap<_, u32, u32> =
            HashMap::try_from(self.ebpf.map_mut(MAP_POD_VETHS).unwrap()).unwrap();
        veths.insert(ifindex, mtu, 0).unwrap();
    }

    fn flow(&self, key: &FlowKey) -> Option<FastFlow> {
        let flows: HashMap<_, FlowKey, FastFlow> =
            HashMap::try_from(self.ebpf.map(MAP_FAST_FLOWS).unwrap()).unwrap();
        flows.get(key, 0).ok()
    }

    /// Every entry of `FAST_FLOWS`.
    fn flows(&self) -> Vec<(FlowKey, FastFlow)> {
        let flows: HashMap<_, FlowKey, FastFlow> =
            HashMap::try_from(self.ebpf.map(MAP_FAST_FLOWS).unwrap()).unwrap();
        flows.iter().map(Result::unwrap).collect()
    }

    /// The peer's traffic, summed over CPUs.
    fn peer_traffic(&self) -> PeerTraffic {
        let stats: PerCpuHashMap<_, [u8; 4], PeerTraffic> =
            PerCpuHashMap::try_from(self.ebpf.map(MAP_PEER_STATS).unwrap()).unwrap();
        PeerTraffic::sum(stats.get(&PEER_IP, 0).unwrap().iter())
    }
}

/// A stamp that was valid once but no longer is.
fn expired_ns() -> u64 {
    now_ns().saturating_sub(APPROVAL_TTL_NS + 1_000_000)
}

fn to_pod_approval(ns: u64) -> FastFlow {
    FastFlow {
        approved_ns: ns,
        ifindex: POD_VETH,
        pod_mac: POD_MAC,
        gw_mac: GW_MAC,
        vtep: PEER_IP,
        _pad: 0,
    }
}

/// A network namespace with a veth pair standing in for a pod's (the pod's
/// end stays in the same namespace), removed on drop.
struct VethNs {
    ns: String,
}

impl VethNs {
    /// The host-side veth's ifindex.
    const IFINDEX: u32 = 4243;

    fn new(tag: &str) -> Self {
        let ns = format!("fastprog-{tag}-{}", std::process::id());
        let _ = overlay_tests::cmd::run(None, &["ip", "netns", "del", &ns]);
        overlay_tests::cmd::run(None, &["ip", "netns", "add", &ns]).expect("ip netns add");
        let this = Self { ns };
        let index = Self::IFINDEX.to_string();
        overlay_tests::cmd::ip(
            &this.ns,
            &[
                "link", "add", "veth-pod", "index", &index, "type", "veth", "peer", "name",
                "eth0-pod",
            ],
        )
        .expect("add the pod's veth pair");
        overlay_tests::cmd::ip(&this.ns, &["link", "set", "veth-pod", "up"]).expect("set it up");
        this
    }

    /// Runs `f` on a thread inside the namespace (test-run looks the
    /// context's ifindex up in the caller's namespace).
    fn run<F: FnOnce() + Send + 'static>(&self, f: F) {
        overlay_tests::netns::run_in(&self.ns, move || {
            f();
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
    }
}

impl Drop for VethNs {
    fn drop(&mut self) {
        let _ = overlay_tests::cmd::run(None, &["ip", "netns", "del", &self.ns]);
    }
}

// ---------------------------------------------------------------------------
// Frames: what only these tests send.

/// A TCP segment between two addresses, IPv4 header included.
fn tcp_packet(src: [u8; 4], dst: [u8; 4], ports: (u16, u16), flags: u8) -> Vec<u8> {
    Ip::new(IPPROTO_TCP, src, dst).packet(&tcp(src, dst, ports, flags, &payload(100)))
}

/// An established TCP flow's segment (ACK only) from the local pod.
fn tcp_from_pod(flags: u8) -> Vec<u8> {
    tcp_packet(LOCAL_POD, REMOTE_POD, (43210, 80), flags)
}

/// The same flow's segment coming back toward the local pod.
fn tcp_to_pod(flags: u8) -> Vec<u8> {
    tcp_packet(REMOTE_POD, LOCAL_POD, (80, 43210), flags)
}

/// IPv4 packets from the local pod to the remote one that the fast path
/// carries: TCP (ACK only), UDP, ICMP echo request and reply.
fn packets_from_pod() -> Vec<(&'static str, Vec<u8>)> {
    let (s, d) = (LOCAL_POD, REMOTE_POD);
    vec![
        ("tcp", tcp_from_pod(TCP_ACK)),
        (
            "udp",
            Ip {
                frag: 0,
                ..Ip::new(IPPROTO_UDP, s, d)
            }
            .packet(&udp(s, d, (5353, 53), &payload(37))),
        ),
        (
            "icmp echo request",
            Ip::new(IPPROTO_ICMP, s, d).packet(&icmp(8, 0x77, 1, &payload(56))),
        ),
        (
            "icmp echo reply",
            Ip::new(IPPROTO_ICMP, s, d).packet(&icmp(0, 0x78, 2, &payload(56))),
        ),
    ]
}

/// The answers: from the remote pod to the local one.
fn packets_to_pod() -> Vec<(&'static str, Vec<u8>)> {
    let (s, d) = (REMOTE_POD, LOCAL_POD);
    vec![
        ("tcp", tcp_to_pod(TCP_PSH | TCP_ACK)),
        (
            "udp",
            Ip::new(IPPROTO_UDP, s, d).packet(&udp(s, d, (53, 5353), &payload(12))),
        ),
        (
            "icmp echo reply",
            Ip::new(IPPROTO_ICMP, s, d).packet(&icmp(0, 0x77, 1, &payload(56))),
        ),
    ]
}

/// The flow key of an IPv4 packet, as the programs should derive it: ports in
/// network order, ICMP echo's identifier as the source port and its type as
/// the destination port's first byte.
fn key_of(packet: &[u8], dir: u8) -> FlowKey {
    let l4 = usize::from(packet[0] & 0x0f) * 4;
    let proto = packet[9];
    let (sport, dport) = if proto == IPPROTO_ICMP {
        ([packet[l4 + 4], packet[l4 + 5]], [packet[l4], 0])
    } else {
        (
            [packet[l4], packet[l4 + 1]],
            [packet[l4 + 2], packet[l4 + 3]],
        )
    };
    FlowKey {
        src: packet[12..16].try_into().unwrap(),
        dst: packet[16..20].try_into().unwrap(),
        sport,
        dport,
        proto,
        dir,
        _pad: [0; 2],
    }
}

/// The packet after one routing hop: TTL one lower, header checksum
/// recomputed from scratch.
fn forwarded(packet: &[u8]) -> Vec<u8> {
    let mut p = packet.to_vec();
    let header_len = usize::from(p[0] & 0x0f) * 4;
    p[8] -= 1;
    p[10..12].fill(0);
    let c = checksum(&p[..header_len]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p
}

/// What a pod sends toward its gateway.
fn pod_frame(ip_packet: &[u8]) -> Vec<u8> {
    eth(GW_MAC, POD_MAC, ETH_P_IP, ip_packet)
}

/// What the host's bridge delivers to the pod (and what the fast path must
/// deliver too).
fn frame_to_pod(ip_packet: &[u8]) -> Vec<u8> {
    eth(POD_MAC, GW_MAC, ETH_P_IP, ip_packet)
}

/// `frame_in` (whose IPv4 packet is `inner_packet` as it should travel)
/// encapsulated toward the peer. The outer source port and IPv4
/// identification are taken from `out` (checked for range separately); the
/// outer MACs are still the input's under test-run.
fn expected_encapsulation(frame_in: &[u8], inner_packet: &[u8], out: &[u8]) -> Vec<u8> {
    let inner = flannel_frame(inner_packet);
    let mut expected = frame_in[0..12].to_vec();
    expected.extend_from_slice(&ETH_P_IP.to_be_bytes());
    expected.extend_from_slice(&vxlan(
        LOCAL_IP,
        PEER_IP,
        sport_of(out),
        ip_id_of(out),
        0,
        VNI,
        &inner,
    ));
    expected
}

/// Checks an encapsulated frame: the exact bytes, the source port's range and
/// both IPv4 header checksums.
fn assert_encapsulated(name: &str, frame_in: &[u8], inner_packet: &[u8], out: &[u8]) {
    assert_eq!(out.len(), frame_in.len() + 50, "{name}: length");
    let sport = sport_of(out);
    assert!(
        (32768..60999).contains(&sport),
        "{name}: source port {sport} outside the kernel's range"
    );
    assert_eq!(
        out,
        expected_encapsulation(frame_in, inner_packet, out),
        "{name}: encapsulated frame"
    );
    assert_eq!(checksum(&out[14..34]), 0, "{name}: outer IPv4 checksum");
    assert_eq!(checksum(&out[64..84]), 0, "{name}: inner IPv4 checksum");
}

/// An encapsulated frame without what differs per packet and so between the
/// paths: the outer MACs (the neighbour's, written when sent), the outer
/// IPv4 identification and with it the outer header checksum.
fn same_but_per_packet(encapsulated: &[u8]) -> Vec<u8> {
    let mut f = encapsulated[12..].to_vec();
    for at in [18, 19, 24, 25] {
        f[at - 12] = 0;
    }
    f
}

/// A VXLAN frame as the underlay delivers it to us from the peer.
fn from_peer(inner_frame: &[u8]) -> Vec<u8> {
    from_underlay(PEER_IP, VNI, inner_frame)
}

/// The pod asking for its gateway.
fn arp_request() -> Vec<u8> {
    overlay_tests::frames::arp_request(POD_MAC, LOCAL_POD, [10, 244, 1, 1])
}

// ---------------------------------------------------------------------------
// veth_from_pod.

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn veth_from_pod_encapsulates_approved_flows_with_the_inner_ttl_lowered() {
    let mut p = Programs::load();
    let mut tally = Tally::default();
    let mut approvals = Vec::new();
    for (_, packet) in packets_from_pod() {
        let ns = now_ns();
        p.approve_from_pod(&packet, ns);
        approvals.push((key_of(&packet, DIR_FROM_POD), ns));
    }
    for (name, packet) in packets_from_pod() {
        let frame = pod_frame(&packet);
        let run = p.veth_from_pod(&frame);
        assert_eq!(run.verdict, TC_ACT_REDIRECT, "{name}: verdict");
        // Exactly what vxlan_egress sends for the routed packet: the same
        // outer headers and inner MACs (our VTEP's to the peer's), the inner
        // packet as the host's routing would have forwarded it.
        assert_encapsulated(name, &frame, &forwarded(&packet), &run.out);
        assert_eq!(run.out[64 + 8], 63, "{name}: inner TTL");
        tally.add(Reason::FastEgress, &frame);
    }
    tally.check(&p);
    // The fast path uses approvals, it does not renew them.
    for (key, ns) in approvals {
        assert_eq!(p.flow(&key).map(|f| f.approved_ns), Some(ns), "{key:?}");
    }
    let sent: u64 = packets_from_pod()
        .iter()
        .map(|(_, p)| 14 + p.len() as u64)
        .sum();
    let peer = p.peer_traffic();
    assert_eq!((peer.tx_packets, peer.tx_bytes), (4, sent), "peer tx");
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn veth_from_pod_keeps_the_slow_paths_source_port() {
    // A flow moving to the fast path must keep its outer UDP source port
    // (the peer's NIC spreads flows over queues by it): both paths hash the
    // same packet headers.
    let mut p = Programs::load();
    for i in 0..8u16 {
        let packet = tcp_packet(LOCAL_POD, REMOTE_POD, (40000 + i, 443), TCP_ACK);
        p.approve_from_pod(&packet, now_ns());
        let slow = p.egress(&flannel_frame(&forwarded(&packet)), 0);
        let fast = p.veth_from_pod(&pod_frame(&packet));
        assert_eq!(slow.verdict, TC_ACT_REDIRECT);
        assert_eq!(fast.verdict, TC_ACT_REDIRECT);
        assert_eq!(sport_of(&fast.out), sport_of(&slow.out), "flow {i}");
        assert_eq!(
            same_but_per_packet(&fast.out),
            same_but_per_packet(&slow.out),
            "flow {i}"
        );
    }
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn veth_from_pod_leaves_unapproved_flows_to_the_host() {
    let mut p = Programs::load();
    let packets = packets_from_pod();
    let [(_, tcp), (_, udp), (_, echo), _] = &packets[..] else {
        unreachable!()
    };
    let mut tally = Tally::default();
    let mut check = |p: &Programs, name: &str, packet: &[u8], reason: Reason| {
        let frame = pod_frame(packet);
        let run = p.veth_from_pod(&frame);
        assert_eq!(run.verdict, TCX_NEXT, "{name}: verdict");
        assert_eq!(run.out, frame, "{name}: the host gets it unchanged");
        tally.add(reason, &frame);
    };
    // Nothing approved.
    for (name, packet) in packets_from_pod() {
        check(&p, name, &packet, Reason::PassFastUnapproved);
    }
    // Expired approvals.
    p.approve_from_pod(tcp, expired_ns());
    p.approve_from_pod(udp, now_ns() - APPROVAL_TTL_NS);
    check(&p, "tcp, expired", tcp, Reason::PassFastUnapproved);
    check(&p, "udp, just expired", udp, Reason::PassFastUnapproved);
    // An approval of the other direction, or of another flow of the pair.
    p.approve(key_of(echo, DIR_TO_POD), to_pod_approval(now_ns()));
    check(
        &p,
        "echo approved toward the pod",
        echo,
        Reason::PassFastUnapproved,
    );
    let other_port = tcp_packet(LOCAL_POD, REMOTE_POD, (43211, 80), TCP_ACK);
    p.approve_from_pod(&other_port, now_ns());
    check(
        &p,
        "tcp, other port approved",
        tcp,
        Reason::PassFastUnapproved,
    );
    tally.check(&p);
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn veth_from_pod_tcp_syn_fin_rst_go_to_the_host_and_end_the_approval() {
    let mut p = Programs::load();
    let mut tally = Tally::default();
    let flags = [
        ("syn", TCP_SYN),
        ("syn-ack", TCP_SYN | TCP_ACK),
        ("fin", TCP_FIN | TCP_ACK),
        ("psh-fin", TCP_FIN | TCP_PSH | TCP_ACK),
        ("rst", TCP_RST),
        ("rst-ack", TCP_RST | TCP_ACK),
    ];
    let key = key_of(&tcp_from_pod(TCP_ACK), DIR_FROM_POD);
    for (name, flags) in flags {
        p.approve_from_pod(&tcp_from_pod(TCP_ACK), now_ns());
        let frame = pod_frame(&tcp_from_pod(flags));
        let run = p.veth_from_pod(&frame);
        assert_eq!(run.verdict, TCX_NEXT, "{name}: verdict");
        assert_eq!(run.out, frame, "{name}: unchanged");
        assert_eq!(p.flow(&key), None, "{name}: the approval ends");
        tally.add(Reason::PassFastTcpControl, &frame);
    }
    // Without an approval: to the host all the same.
    let frame = pod_frame(&tcp_from_pod(TCP_SYN));
    assert_eq!(p.veth_from_pod(&frame).verdict, TCX_NEXT);
    tally.add(Reason::PassFastTcpControl, &frame);
    // The flow's next ACK takes the host's path until approved again.
    let ack = pod_frame(&tcp_from_pod(TCP_ACK));
    let run = p.veth_from_pod(&ack);
    assert_eq!((run.verdict, run.out == ack), (TCX_NEXT, true));
    tally.add(Reason::PassFastUnapproved, &ack);
    tally.check(&p);
    assert!(p.flows().is_empty());
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn veth_from_pod_leaves_other_destinations_and_unusual_packets_to_the_host() {
    let mut p = Programs::load();
    let ack = |ip: Ip| {
        let (s, d) = (ip.src, ip.dst);
        ip.packet(&tcp(s, d, (43210, 80), TCP_ACK, &payload(100)))
    };
    let base = Ip::new(IPPROTO_TCP, LOCAL_POD, REMOTE_POD);
    let to = |dst: [u8; 4]| {
        ack(Ip {
            dst,
            ..base.clone()
        })
    };
    let from = |src: [u8; 4]| {
        ack(Ip {
            src,
            ..base.clone()
        })
    };
    let too_big = Ip::new(IPPROTO_UDP, LOCAL_POD, REMOTE_POD).packet(&udp(
        LOCAL_POD,
        REMOTE_POD,
        (1, 2),
        &payload(1451 - 28),
    ));
    let cases: Vec<(&str, Vec<u8>, Reason)> = vec![
        // Not a remote pod: routing (and kube-proxy's DNAT) must see it.
        (
            "unleased subnet",
            to([10, 244, 3, 7]),
            Reason::PassFastNotRemote,
        ),
        (
            "service address",
            to([10, 96, 0, 10]),
            Reason::PassFastNotRemote,
        ),
        ("local pod", to([10, 244, 1, 9]), Reason::PassFastNotRemote),
        ("the internet", to([8, 8, 8, 8]), Reason::PassFastNotRemote),
        ("the node", to(LOCAL_IP), Reason::PassFastNotRemote),
        // Not from a pod behind our veths (spoofed or routed).
        (
            "foreign pod source",
            from([10, 244, 9, 5]),
            Reason::PassFastUnusual,
        ),
        ("node source", from(LOCAL_IP), Reason::PassFastUnusual),
        (
            "ip options",
            ack(Ip {
                options: vec![1, 1, 1, 0],
                ..base.clone()
            }),
            Reason::PassFastUnusual,
        ),
        (
            "first fragment",
            ack(Ip {
                frag: 0x2000,
                ..base.clone()
            }),
            Reason::PassFastUnusual,
        ),
        (
            "later fragment",
            ack(Ip {
                frag: 0x0010,
                ..base.clone()
            }),
            Reason::PassFastUnusual,
        ),
        (
            "ttl 1",
            ack(Ip {
                ttl: 1,
                ..base.clone()
            }),
            Reason::PassFastUnusual,
        ),
        (
            "ttl 0",
            ack(Ip {
                ttl: 0,
                ..base.clone()
            }),
            Reason::PassFastUnusual,
        ),
        (
            "gre",
            Ip::new(IPPROTO_GRE, LOCAL_POD, REMOTE_POD).packet(&payload(40)),
            Reason::PassFastUnusual,
        ),
        (
            "icmp unreachable",
            Ip::new(IPPROTO_ICMP, LOCAL_POD, REMOTE_POD).packet(&icmp(3, 0x77, 1, &payload(28))),
            Reason::PassFastUnusual,
        ),
        // TCP cut before its flags: not a flow (by design).
        (
            "tcp without its flags",
            Ip::new(IPPROTO_TCP, LOCAL_POD, REMOTE_POD)
                .packet(&tcp(LOCAL_POD, REMOTE_POD, (1, 2), TCP_ACK, &[])[..12]),
            Reason::PassFastUnusual,
        ),
        // The host's vxlan device fragments it or answers with ICMP.
        ("too big", too_big, Reason::PassTooBig),
    ];
    let mut tally = Tally::default();
    for (name, packet, reason) in &cases {
        // Approved where a key can be made: only the checked property decides.
        p.approve_from_pod(packet, now_ns());
        let frame = pod_frame(packet);
        let run = p.veth_from_pod(&frame);
        assert_eq!(run.verdict, TCX_NEXT, "{name}: verdict");
        assert_eq!(run.out, frame, "{name}: unchanged");
        tally.add(*reason, &frame);
    }
    let others = [
        (
            "arp, padded",
            eth(
                [0xff; 6],
                POD_MAC,
                ETH_P_ARP,
                &[arp_request(), vec![0; 18]].concat(),
            ),
        ),
        ("ipv6", eth(GW_MAC, POD_MAC, ETH_P_IPV6, &ipv6_packet())),
    ];
    for (name, frame) in others {
        let run = p.veth_from_pod(&frame);
        assert_eq!(run.verdict, TCX_NEXT, "{name}: verdict");
        assert_eq!(run.out, frame, "{name}: unchanged");
        tally.add(Reason::PassNotIpv4, &frame);
    }
    tally.check(&p);
}

/// A real ARP frame is 42 bytes on a veth (nothing pads it), shorter than
/// the 48-byte window `veth_from_pod` copies: it must still be counted as
/// `pass_not_ipv4`, not as an unusual IPv4 packet.
#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn veth_from_pod_counts_a_real_arp_request_as_not_ipv4() {
    let p = Programs::load();
    let frame = eth([0xff; 6], POD_MAC, ETH_P_ARP, &arp_request());
    assert_eq!(frame.len(), 42);
    let run = p.veth_from_pod(&frame);
    assert_eq!(run.verdict, TCX_NEXT);
    assert_eq!(run.out, frame);
    let mut tally = Tally::default();
    tally.add(Reason::PassNotIpv4, &frame);
    tally.check(&p);
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn veth_from_pod_never_redirects_truncated_or_garbage_frames() {
    let mut p = Programs::load();
    let packet = tcp_from_pod(TCP_ACK);
    p.approve_from_pod(&packet, now_ns());
    let good = pod_frame(&packet);
    let mut tally = Tally::default();
    // Shorter than its IPv4 total length says (test-run refuses IPv4 frames
    // cut inside the IPv4 header).
    for len in 34..good.len() {
        let frame = &good[..len];
        let run = p.veth_from_pod(frame);
        assert_eq!(run.verdict, TCX_NEXT, "cut at {len}");
        assert_eq!(run.out, frame, "cut at {len}");
        tally.add(Reason::PassFastUnusual, frame);
    }
    tally.check(&p);
    let before: u64 = p.counters().values().map(|c| c.packets).sum();
    let mut garbage = Garbage(0x5eed_00f1);
    for i in 0..300 {
        let frame = match i % 3 {
            0 => garbage.some(14, 200),
            1 => {
                let mut f = garbage.some(34, 200);
                f[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
                f
            }
            _ => {
                // A plausible header in front of the junk.
                let mut f = good.clone();
                let junk = garbage.bytes(20 + (i % 50));
                f[14 + 2..].iter_mut().zip(junk).for_each(|(b, j)| *b ^= j);
                f
            }
        };
        let run = p.veth_from_pod(&frame);
        assert_eq!(
            run.verdict, TCX_NEXT,
            "garbage #{i} not left to the host: {frame:02x?}"
        );
        assert_eq!(run.out, frame, "garbage #{i} modified");
    }
    let counters = p.counters();
    assert_eq!(counters.get("fast_egress"), None);
    let counted: u64 = counters.values().map(|c| c.packets).sum();
    assert_eq!(counted - before, 300, "every frame counted once");
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn fast_path_off_changes_nothing() {
    let disabled = FastPathConfig {
        enabled: 0,
        ..fast_on()
    };
    for fast in [None, Some(disabled)] {
        let mut p = Programs::load_with(fast);
        p.add_pod_veth(POD_VETH);
        let out = tcp_from_pod(TCP_ACK);
        let back = tcp_to_pod(TCP_ACK);
        p.approve_from_pod(&out, now_ns());
        p.approve_to_pod(&back, now_ns());
        let approvals = p.flows();

        let frame = pod_frame(&out);
        let run = p.veth_from_pod(&frame);
        assert_eq!(
            (run.verdict, run.out == frame),
            (TCX_NEXT, true),
            "{fast:?}"
        );

        let frame = frame_to_pod(&back);
        let run = p.veth_to_pod(&frame, FAST_PATH_MARK, 0);
        assert_eq!(
            (run.verdict, run.out == frame),
            (TCX_NEXT, true),
            "{fast:?}"
        );
        assert_eq!(run.mark, FAST_PATH_MARK, "{fast:?}: the mark is not ours");

        // The slow path as without a fast path.
        let inner = inner_frame_to_us(&back);
        let vx = from_peer(&inner);
        let run = p.ingress_tc(&vx);
        assert_eq!(
            (run.verdict, &run.out),
            (TC_ACT_REDIRECT, &inner),
            "{fast:?}"
        );
        let frame = flannel_frame(&out);
        let run = p.egress(&frame, FAST_PATH_MARK);
        assert_eq!(run.verdict, TC_ACT_REDIRECT, "{fast:?}");
        assert_encapsulated("egress", &frame, &out, &run.out);
        assert_eq!(run.mark, FAST_PATH_MARK, "{fast:?}");

        assert_eq!(p.flows(), approvals, "{fast:?}: no approval added or ended");
        let mut tally = Tally::default();
        tally.add(Reason::Decapsulated, &vx);
        tally.add(Reason::Encapsulated, &frame);
        tally.check(&p);
    }
}

// ---------------------------------------------------------------------------
// veth_to_pod.

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn veth_to_pod_turns_marked_packets_into_approvals() {
    let ns = VethNs::new("approve");
    ns.run(|| {
        let p = Programs::load();
        let mut tally = Tally::default();
        // kube-proxy's masquerade bit stays; only ours is cleared.
        let mark = FAST_PATH_MARK | 0x4000;
        for (name, packet) in packets_to_pod() {
            let frame = frame_to_pod(&packet);
            let before = now_ns();
            let run = p.veth_to_pod(&frame, mark, VethNs::IFINDEX);
            let after = now_ns();
            assert_eq!(run.verdict, TCX_NEXT, "{name}: verdict");
            assert_eq!(run.out, frame, "{name}: unchanged");
            assert_eq!(run.mark, 0x4000, "{name}: our mark bit is cleared");
            // Test-run ran the program on the device the context named.
            assert_eq!(run.ifindex, VethNs::IFINDEX, "{name}: skb ifindex");
            let flow = p
                .flow(&key_of(&packet, DIR_TO_POD))
                .unwrap_or_else(|| panic!("{name}: no approval in {:?}", p.flows()));
            assert!(
                (before..=after).contains(&flow.approved_ns),
                "{name}: stamped {} outside [{before}, {after}]",
                flow.approved_ns
            );
            assert_eq!(
                flow,
                FastFlow {
                    approved_ns: flow.approved_ns,
                    ifindex: VethNs::IFINDEX,
                    pod_mac: POD_MAC,
                    gw_mac: GW_MAC,
                    // The VTEP serving the flow's source.
                    vtep: PEER_IP,
                    _pad: 0,
                },
                "{name}"
            );
            // The host delivers the pod's address to this veth.
            assert_eq!(p.bound(LOCAL_POD), Some(VethNs::IFINDEX), "{name}");
            tally.add(Reason::SlowToPod, &frame);
            tally.add(Reason::FastApproval, &frame);
        }
        assert_eq!(p.flows().len(), 3);
        tally.check(&p);
    });
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn veth_to_pod_renews_an_approval() {
    let ns = VethNs::new("renew");
    ns.run(|| {
        let mut p = Programs::load();
        let packet = tcp_to_pod(TCP_ACK);
        let key = key_of(&packet, DIR_TO_POD);
        let old = FastFlow {
            approved_ns: expired_ns(),
            ifindex: 77,
            pod_mac: [2, 0, 0, 0, 0, 0x77],
            gw_mac: [2, 0, 0, 0, 0, 0x78],
            vtep: [192, 168, 99, 9],
            _pad: 0,
        };
        p.approve(key, old);
        let frame = frame_to_pod(&packet);
        let before = now_ns();
        let run = p.veth_to_pod(&frame, FAST_PATH_MARK, VethNs::IFINDEX);
        assert_eq!(run.verdict, TCX_NEXT);
        let flow = p.flow(&key).expect("renewed");
        assert!(flow.approved_ns >= before);
        // Where the host delivered it last is what counts.
        assert_eq!(
            (flow.ifindex, flow.pod_mac, flow.gw_mac, flow.vtep),
            (VethNs::IFINDEX, POD_MAC, GW_MAC, PEER_IP)
        );
        let mut tally = Tally::default();
        tally.add(Reason::SlowToPod, &frame);
        tally.add(Reason::FastApproval, &frame);
        tally.check(&p);
    });
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn veth_to_pod_approves_only_marked_packets_of_usual_flows() {
    let ns = VethNs::new("noapprove");
    ns.run(|| {
        let p = Programs::load();
        let ack = tcp_to_pod(TCP_ACK);
        let to_other = |dst: [u8; 4]| tcp_packet(REMOTE_POD, dst, (80, 43210), TCP_ACK);
        let ttl1 = Ip {
            ttl: 1,
            ..Ip::new(IPPROTO_TCP, REMOTE_POD, LOCAL_POD)
        }
        .packet(&tcp(REMOTE_POD, LOCAL_POD, (80, 43210), TCP_ACK, &[]));
        let cases: Vec<(&str, Vec<u8>, u32)> = vec![
            ("unmarked", frame_to_pod(&ack), 0),
            ("other mark bits", frame_to_pod(&ack), !FAST_PATH_MARK),
            ("syn", frame_to_pod(&tcp_to_pod(TCP_SYN)), FAST_PATH_MARK),
            (
                "syn-ack",
                frame_to_pod(&tcp_to_pod(TCP_SYN | TCP_ACK)),
                FAST_PATH_MARK,
            ),
            (
                "fin",
                frame_to_pod(&tcp_to_pod(TCP_FIN | TCP_ACK)),
                FAST_PATH_MARK,
            ),
            ("rst", frame_to_pod(&tcp_to_pod(TCP_RST)), FAST_PATH_MARK),
            // Not to a pod of ours (e.g. the bridge's own address space).
            (
                "not a local pod",
                frame_to_pod(&to_other([10, 244, 3, 5])),
                FAST_PATH_MARK,
            ),
            ("ttl 1", frame_to_pod(&ttl1), FAST_PATH_MARK),
            // Not an overlay flow: no VTEP serves the source, so no VXLAN
            // may ever carry it (the host, a local pod, the internet).
            (
                "from the host",
                frame_to_pod(&tcp_packet(GATEWAY, LOCAL_POD, (80, 43210), TCP_ACK)),
                FAST_PATH_MARK,
            ),
            (
                "from a local pod",
                frame_to_pod(&tcp_packet(
                    [10, 244, 1, 9],
                    LOCAL_POD,
                    (80, 43210),
                    TCP_ACK,
                )),
                FAST_PATH_MARK,
            ),
            (
                "from outside the overlay",
                frame_to_pod(&tcp_packet([192, 0, 2, 7], LOCAL_POD, (80, 43210), TCP_ACK)),
                FAST_PATH_MARK,
            ),
            (
                "to the gateway",
                frame_to_pod(&to_other(GATEWAY)),
                FAST_PATH_MARK,
            ),
            // A segment without ACK: conntrack would call it INVALID.
            (
                "psh only",
                frame_to_pod(&tcp_to_pod(TCP_PSH)),
                FAST_PATH_MARK,
            ),
            (
                "arp",
                eth([0xff; 6], GW_MAC, ETH_P_ARP, &arp_request()),
                FAST_PATH_MARK,
            ),
            (
                "ipv6",
                eth(POD_MAC, GW_MAC, ETH_P_IPV6, &ipv6_packet()),
                FAST_PATH_MARK,
            ),
        ];
        let mut tally = Tally::default();
        for (name, frame, mark) in &cases {
            let run = p.veth_to_pod(frame, *mark, VethNs::IFINDEX);
            assert_eq!(run.verdict, TCX_NEXT, "{name}: verdict");
            assert_eq!(&run.out, frame, "{name}: unchanged");
            assert_eq!(run.mark, mark & !FAST_PATH_MARK, "{name}: mark out");
            assert_eq!(p.flows(), vec![], "{name}: nothing approved");
            tally.add(Reason::SlowToPod, frame);
        }
        tally.check(&p);
    });
}

// ---------------------------------------------------------------------------
// vxlan_ingress_tc: delivery straight to the pod.

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn tc_ingress_delivers_approved_flows_straight_to_the_pod() {
    let mut p = Programs::load();
    p.add_pod_veth(POD_VETH);
    let mut tally = Tally::default();
    let mut received = 0;
    for (_, packet) in packets_to_pod() {
        p.approve_to_pod(&packet, now_ns());
    }
    for (name, packet) in packets_to_pod() {
        let frame = from_peer(&inner_frame_to_us(&packet));
        let run = p.ingress_tc(&frame);
        assert_eq!(run.verdict, TC_ACT_REDIRECT, "{name}: verdict");
        // What the bridge would have delivered after routing: the gateway's
        // MAC to the pod's, TTL one lower.
        assert_eq!(run.out, frame_to_pod(&forwarded(&packet)), "{name}: frame");
        assert_eq!(run.out[14 + 8], 63, "{name}: TTL");
        assert_eq!(checksum(&run.out[14..34]), 0, "{name}: IPv4 checksum");
        tally.add(Reason::FastIngress, &frame);
        received += frame.len() as u64;
    }
    tally.check(&p);
    let peer = p.peer_traffic();
    assert_eq!((peer.rx_packets, peer.rx_bytes), (3, received), "peer rx");
    assert_eq!(p.flows().len(), 3, "approvals kept");
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn tc_ingress_without_the_pods_veth_falls_back_and_ends_the_approval() {
    let mut p = Programs::load();
    // An approval through a veth the agent no longer knows (none in
    // POD_VETHS, or another one).
    p.add_pod_veth(POD_VETH + 1);
    let mut tally = Tally::default();
    for (name, packet) in packets_to_pod() {
        p.approve_to_pod(&packet, now_ns());
        let inner = inner_frame_to_us(&packet);
        let frame = from_peer(&inner);
        let run = p.ingress_tc(&frame);
        assert_eq!(run.verdict, TC_ACT_REDIRECT, "{name}: verdict");
        assert_eq!(
            run.out, inner,
            "{name}: decapsulated into flannel as before"
        );
        assert_eq!(
            p.flow(&key_of(&packet, DIR_TO_POD)),
            None,
            "{name}: revoked"
        );
        tally.add(Reason::PassFastUnusual, &frame);
        tally.add(Reason::Decapsulated, &frame);
    }
    tally.check(&p);
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn tc_ingress_without_a_valid_approval_decapsulates_into_flannel() {
    let mut p = Programs::load();
    p.add_pod_veth(POD_VETH);
    let packet = tcp_to_pod(TCP_ACK);
    let inner = inner_frame_to_us(&packet);
    let frame = from_peer(&inner);
    let mut tally = Tally::default();
    let mut check = |p: &Programs, name: &str| {
        let run = p.ingress_tc(&frame);
        assert_eq!(run.verdict, TC_ACT_REDIRECT, "{name}: verdict");
        assert_eq!(run.out, inner, "{name}: decapsulated into flannel");
        tally.add(Reason::PassFastUnapproved, &frame);
        tally.add(Reason::Decapsulated, &frame);
    };
    check(&p, "no approval");
    p.approve_to_pod(&packet, expired_ns());
    check(&p, "expired");
    p.approve(key_of(&packet, DIR_FROM_POD), to_pod_approval(now_ns()));
    p.approve(key_of(&packet, DIR_TO_POD), to_pod_approval(expired_ns()));
    check(&p, "approved the other way only");
    tally.check(&p);
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn tc_ingress_tcp_syn_fin_rst_go_through_the_host_and_end_the_approval() {
    let mut p = Programs::load();
    p.add_pod_veth(POD_VETH);
    let key = key_of(&tcp_to_pod(TCP_ACK), DIR_TO_POD);
    let mut tally = Tally::default();
    for (name, flags) in [
        ("syn", TCP_SYN),
        ("syn-ack", TCP_SYN | TCP_ACK),
        ("fin", TCP_FIN | TCP_ACK),
        ("rst", TCP_RST),
    ] {
        p.approve_to_pod(&tcp_to_pod(TCP_ACK), now_ns());
        let inner = inner_frame_to_us(&tcp_to_pod(flags));
        let frame = from_peer(&inner);
        let run = p.ingress_tc(&frame);
        assert_eq!(run.verdict, TC_ACT_REDIRECT, "{name}: verdict");
        assert_eq!(run.out, inner, "{name}: decapsulated into flannel");
        assert_eq!(p.flow(&key), None, "{name}: the approval ends");
        tally.add(Reason::PassFastTcpControl, &frame);
        tally.add(Reason::Decapsulated, &frame);
    }
    tally.check(&p);
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn tc_ingress_unusual_inner_packets_go_through_the_host() {
    let mut p = Programs::load();
    p.add_pod_veth(POD_VETH);
    let base = Ip::new(IPPROTO_TCP, REMOTE_POD, LOCAL_POD);
    let ack = |ip: Ip| {
        let (s, d) = (ip.src, ip.dst);
        ip.packet(&tcp(s, d, (80, 43210), TCP_ACK, &payload(100)))
    };
    let cases = [
        // Not one of our pods.
        (
            "to another subnet",
            ack(Ip {
                dst: [10, 244, 3, 5],
                ..base.clone()
            }),
        ),
        (
            "ttl 1",
            ack(Ip {
                ttl: 1,
                ..base.clone()
            }),
        ),
        (
            "ip options",
            ack(Ip {
                options: vec![1, 1, 1, 0],
                ..base.clone()
            }),
        ),
        (
            "fragment",
            ack(Ip {
                frag: 0x2000,
                ..base.clone()
            }),
        ),
        (
            "gre",
            Ip::new(IPPROTO_GRE, REMOTE_POD, LOCAL_POD).packet(&payload(40)),
        ),
    ];
    let mut tally = Tally::default();
    for (name, packet) in &cases {
        // Approved (and to a known veth) where a key can be made.
        p.approve_to_pod(packet, now_ns());
        let inner = inner_frame_to_us(packet);
        let frame = from_peer(&inner);
        let run = p.ingress_tc(&frame);
        assert_eq!(run.verdict, TC_ACT_REDIRECT, "{name}: verdict");
        assert_eq!(run.out, inner, "{name}: decapsulated into flannel");
        tally.add(Reason::PassFastUnusual, &frame);
        tally.add(Reason::Decapsulated, &frame);
    }
    tally.check(&p);
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn tc_ingress_gso_aggregate_of_an_approved_flow_is_left_whole_when_refused() {
    // A test-run skb cannot be given a GSO type, and bpf_skb_adjust_room
    // refuses a GSO skb that is not TCP: the fast path must then leave the
    // aggregate untouched to the kernel's vxlan device, as without it.
    let mut p = Programs::load();
    p.add_pod_veth(POD_VETH);
    let packet = tcp_to_pod(TCP_ACK);
    p.approve_to_pod(&packet, now_ns());
    let frame = from_peer(&inner_frame_to_us(&packet));
    let run = p.run_ctx(PROG_INGRESS_TC, &frame, 0, 0, Some((500, 2)));
    assert_eq!(run.verdict, TCX_NEXT);
    assert_eq!(run.out, frame);
    let mut tally = Tally::default();
    tally.add(Reason::PassGsoTunnel, &frame);
    tally.check(&p);
    assert!(p.flow(&key_of(&packet, DIR_TO_POD)).is_some());
}

// ---------------------------------------------------------------------------
// vxlan_egress: approvals from pods.

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn egress_marked_packets_approve_their_flow() {
    let p = Programs::load();
    let mut tally = Tally::default();
    for (name, packet) in packets_from_pod() {
        let frame = flannel_frame(&packet);
        let before = now_ns();
        let run = p.egress(&frame, FAST_PATH_MARK | 0x8000);
        let after = now_ns();
        assert_eq!(run.verdict, TC_ACT_REDIRECT, "{name}: verdict");
        // Encapsulated as before: the routed packet untouched.
        assert_encapsulated(name, &frame, &packet, &run.out);
        assert_eq!(run.mark, 0x8000, "{name}: our mark bit is cleared");
        let flow = p
            .flow(&key_of(&packet, DIR_FROM_POD))
            .unwrap_or_else(|| panic!("{name}: no approval in {:?}", p.flows()));
        assert!(
            (before..=after).contains(&flow.approved_ns),
            "{name}: stamp"
        );
        assert_eq!(
            flow,
            FastFlow {
                approved_ns: flow.approved_ns,
                ..FastFlow::default()
            },
            "{name}"
        );
        tally.add(Reason::FastApproval, &frame);
        tally.add(Reason::Encapsulated, &frame);
    }
    assert_eq!(p.flows().len(), 4);
    tally.check(&p);
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn egress_approves_only_marked_packets_of_usual_pod_flows() {
    let p = Programs::load();
    let ttl_high = |ip: Ip| {
        let (s, d) = (ip.src, ip.dst);
        ip.packet(&tcp(s, d, (43210, 80), TCP_ACK, &payload(10)))
    };
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        ("unmarked", tcp_from_pod(TCP_ACK), 0),
        ("syn", tcp_from_pod(TCP_SYN), FAST_PATH_MARK),
        ("fin", tcp_from_pod(TCP_FIN | TCP_ACK), FAST_PATH_MARK),
        ("rst", tcp_from_pod(TCP_RST), FAST_PATH_MARK),
        // The host's own traffic (from the node's address) is not a pod's.
        (
            "from the node",
            ttl_high(Ip::new(IPPROTO_TCP, LOCAL_IP, REMOTE_POD)),
            FAST_PATH_MARK,
        ),
        (
            "from a foreign subnet",
            ttl_high(Ip::new(IPPROTO_TCP, [10, 244, 9, 5], REMOTE_POD)),
            FAST_PATH_MARK,
        ),
        (
            "fragment",
            ttl_high(Ip {
                frag: 0x2000,
                ..Ip::new(IPPROTO_TCP, LOCAL_POD, REMOTE_POD)
            }),
            FAST_PATH_MARK,
        ),
    ];
    let mut tally = Tally::default();
    for (name, packet, mark) in &cases {
        let frame = flannel_frame(packet);
        let run = p.egress(&frame, *mark);
        assert_eq!(run.verdict, TC_ACT_REDIRECT, "{name}: verdict");
        assert_encapsulated(name, &frame, packet, &run.out);
        assert_eq!(p.flows(), vec![], "{name}: nothing approved");
        tally.add(Reason::Encapsulated, &frame);
    }
    tally.check(&p);
}

// ---------------------------------------------------------------------------
// The slow path opening the fast one, both ways.

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn slow_path_approvals_open_the_fast_path_both_ways() {
    let ns = VethNs::new("roundtrip");
    ns.run(|| {
        let mut p = Programs::load();
        let mut tally = Tally::default();
        let out = tcp_from_pod(TCP_ACK);
        let back = tcp_to_pod(TCP_ACK);

        // First packets: the host's way, and marked by its mangle rule.
        let frame = pod_frame(&out);
        assert_eq!(
            p.veth_from_pod_on(&frame, VethNs::IFINDEX).verdict,
            TCX_NEXT
        );
        tally.add(Reason::PassFastUnapproved, &frame);
        let routed = flannel_frame(&forwarded(&out));
        let slow = p.egress(&routed, FAST_PATH_MARK);
        assert_eq!(slow.verdict, TC_ACT_REDIRECT);
        tally.add(Reason::FastApproval, &routed);
        tally.add(Reason::Encapsulated, &routed);

        let vx = from_peer(&inner_frame_to_us(&back));
        let decap = p.ingress_tc(&vx);
        assert_eq!(decap.verdict, TC_ACT_REDIRECT);
        tally.add(Reason::PassFastUnapproved, &vx);
        tally.add(Reason::Decapsulated, &vx);
        let bridged = frame_to_pod(&forwarded(&back));
        assert_eq!(
            p.veth_to_pod(&bridged, FAST_PATH_MARK, VethNs::IFINDEX)
                .verdict,
            TCX_NEXT
        );
        tally.add(Reason::SlowToPod, &bridged);
        tally.add(Reason::FastApproval, &bridged);
        // The agent lists the pod's veth.
        p.add_pod_veth(VethNs::IFINDEX);

        // Next packets: the fast path, with the bytes the slow path sent.
        let run = p.veth_from_pod_on(&frame, VethNs::IFINDEX);
        assert_eq!(run.verdict, TC_ACT_REDIRECT);
        assert_encapsulated("from the pod", &frame, &forwarded(&out), &run.out);
        assert_eq!(
            same_but_per_packet(&run.out),
            same_but_per_packet(&slow.out),
            "the same bytes as the slow path"
        );
        tally.add(Reason::FastEgress, &frame);

        let run = p.ingress_tc(&vx);
        assert_eq!(run.verdict, TC_ACT_REDIRECT);
        assert_eq!(run.out, bridged, "what the bridge delivered");
        tally.add(Reason::FastIngress, &vx);
        tally.check(&p);
    });
}

// ---------------------------------------------------------------------------
// Who may use an approval (the trust boundary).

/// Another node: a known VTEP that serves 10.244.3.0/24.
const OTHER_VTEP: [u8; 4] = [192, 168, 64, 4];

impl Programs {
    /// Makes [`OTHER_VTEP`] a known VTEP; with `serves`, REMOTE_SUBNETS then
    /// says it serves `serves`/24.
    fn add_other_vtep(&mut self, serves: Option<[u8; 4]>) {
        let mut vteps: HashMap<_, [u8; 4], KnownVtep> =
            HashMap::try_from(self.ebpf.map_mut(MAP_KNOWN_VTEPS).unwrap()).unwrap();
        let known = KnownVtep {
            vtep_mac: PEER_VTEP_MAC,
            _pad: [0; 2],
        };
        vteps.insert(OTHER_VTEP, known, 0).unwrap();
        if let Some(subnet) = serves {
            let mut subnets: LpmTrie<_, [u8; 4], RemoteVtep> =
                LpmTrie::try_from(self.ebpf.map_mut(MAP_REMOTE_SUBNETS).unwrap()).unwrap();
            let vtep = RemoteVtep {
                vtep_mac: PEER_VTEP_MAC,
                _pad: [0; 2],
                public_ip: OTHER_VTEP,
            };
            subnets.insert(&Key::new(24, subnet), vtep, 0).unwrap();
        }
    }
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn tc_ingress_takes_an_approved_flow_only_from_the_vtep_serving_its_source() {
    let mut p = Programs::load();
    p.add_pod_veth(POD_VETH);
    p.add_other_vtep(None);
    let packet = tcp_to_pod(TCP_PSH | TCP_ACK);
    let key = key_of(&packet, DIR_TO_POD);
    p.approve_to_pod(&packet, now_ns());
    let inner = inner_frame_to_us(&packet);
    let mut tally = Tally::default();

    // Another node (or anyone spoofing its underlay address) injecting
    // into the flow with the remote pod's source: dropped, counted, and the
    // approval stays for the VTEP it names.
    let forged = from_underlay(OTHER_VTEP, VNI, &inner);
    let run = p.ingress_tc(&forged);
    assert_eq!(run.verdict, TC_ACT_SHOT, "another VTEP on the flow");
    tally.add(Reason::DropSourceVtepMismatch, &forged);
    assert!(p.flow(&key).is_some(), "the approval stays");

    // The flow's own VTEP still gets through the fast path.
    let good = from_peer(&inner);
    assert_eq!(p.ingress_tc(&good).verdict, TC_ACT_REDIRECT);
    tally.add(Reason::FastIngress, &good);

    // The source's subnet moved to the other VTEP (a peer with a new
    // PublicIP): the host's path decides, and the approval is renewed there.
    {
        let mut subnets: LpmTrie<_, [u8; 4], RemoteVtep> =
            LpmTrie::try_from(p.ebpf.map_mut(MAP_REMOTE_SUBNETS).unwrap()).unwrap();
        let moved = RemoteVtep {
            vtep_mac: PEER_VTEP_MAC,
            _pad: [0; 2],
            public_ip: OTHER_VTEP,
        };
        subnets
            .insert(&Key::new(REMOTE_SUBNET.1, REMOTE_SUBNET.0), moved, 0)
            .unwrap();
    }
    let run = p.ingress_tc(&forged);
    assert_eq!(run.verdict, TC_ACT_REDIRECT, "a moved peer");
    assert_eq!(run.out, inner, "decapsulated into flannel");
    tally.add(Reason::PassFastUnapproved, &forged);
    tally.add(Reason::Decapsulated, &forged);
    assert_eq!(p.flow(&key), None, "the old VTEP's approval ended");
    tally.check(&p);
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn tc_ingress_drops_inner_sources_of_our_own_subnet() {
    let mut p = Programs::load();
    p.add_pod_veth(POD_VETH);
    let mut tally = Tally::default();
    // A local pod's address, the gateway's, flannel.<VNI>'s: from a remote
    // VTEP each is a spoof (the host's path would call it a martian).
    for src in [[10, 244, 1, 9], GATEWAY, [10, 244, 1, 0]] {
        let packet = tcp_packet(src, LOCAL_POD, (80, 43210), TCP_ACK);
        // Even with an approval for it (which veth_to_pod never records).
        p.approve_to_pod(&packet, now_ns());
        let frame = from_peer(&inner_frame_to_us(&packet));
        let run = p.ingress_tc(&frame);
        assert_eq!(run.verdict, TC_ACT_SHOT, "{src:?}");
        tally.add(Reason::DropFastSpoofedSource, &frame);
    }
    tally.check(&p);
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn an_echo_reply_approval_does_not_admit_echo_requests() {
    let mut p = Programs::load();
    p.add_pod_veth(POD_VETH);
    let (s, d) = (REMOTE_POD, LOCAL_POD);
    let reply = Ip::new(IPPROTO_ICMP, s, d).packet(&icmp(0, 0x77, 1, &payload(56)));
    let request = Ip::new(IPPROTO_ICMP, s, d).packet(&icmp(8, 0x77, 2, &payload(56)));
    p.approve_to_pod(&reply, now_ns());
    let mut tally = Tally::default();
    let frame = from_peer(&inner_frame_to_us(&request));
    let run = p.ingress_tc(&frame);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(
        run.out,
        inner_frame_to_us(&request),
        "into flannel, not the pod"
    );
    tally.add(Reason::PassFastUnapproved, &frame);
    tally.add(Reason::Decapsulated, &frame);
    let frame = from_peer(&inner_frame_to_us(&reply));
    assert_eq!(p.ingress_tc(&frame).verdict, TC_ACT_REDIRECT);
    tally.add(Reason::FastIngress, &frame);
    tally.check(&p);
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn veth_from_pod_takes_a_flow_only_from_the_veth_its_source_is_bound_to() {
    let mut p = Programs::load();
    let packet = tcp_from_pod(TCP_ACK);
    let frame = pod_frame(&packet);
    let mut tally = Tally::default();

    // Bound to this veth (the loopback device under test-run): fast.
    p.approve_from_pod(&packet, now_ns());
    assert_eq!(p.veth_from_pod(&frame).verdict, TC_ACT_REDIRECT);
    tally.add(Reason::FastEgress, &frame);

    // The host delivers the address to another live pod's veth: a second
    // pod borrowing the first one's approved flow. Dropped.
    p.add_pod_veth(POD_VETH);
    p.bind(LOCAL_POD, POD_VETH);
    let run = p.veth_from_pod(&frame);
    assert_eq!(run.verdict, TC_ACT_SHOT, "another pod's address");
    assert_eq!(run.out, frame);
    tally.add(Reason::DropFastSpoofedSource, &frame);

    // Bound to a veth that went (a new pod on a reused address): the
    // host's path decides.
    p.bind(LOCAL_POD, 9999);
    assert_eq!(p.veth_from_pod(&frame).verdict, TCX_NEXT, "stale binding");
    tally.add(Reason::PassFastUnbound, &frame);
    tally.check(&p);
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn veth_from_pod_drops_the_nodes_addresses_as_sources() {
    let mut p = Programs::load();
    let mut tally = Tally::default();
    for src in [GATEWAY, [10, 244, 1, 0], [10, 244, 1, 255]] {
        let packet = tcp_packet(src, REMOTE_POD, (43210, 80), TCP_ACK);
        // Even approved (a host flow to a remote pod, which vxlan_egress no
        // longer approves) and bound.
        p.approve_from_pod(&packet, now_ns());
        let frame = pod_frame(&packet);
        let run = p.veth_from_pod(&frame);
        assert_eq!(run.verdict, TC_ACT_SHOT, "{src:?}");
        tally.add(Reason::DropFastSpoofedSource, &frame);

        // And vxlan_egress does not approve the host's own flows.
        let routed = flannel_frame(&forwarded(&packet));
        let before = p.flows().len();
        assert_eq!(p.egress(&routed, FAST_PATH_MARK).verdict, TC_ACT_REDIRECT);
        tally.add(Reason::Encapsulated, &routed);
        assert_eq!(p.flows().len(), before, "{src:?}: nothing approved");
    }
    tally.check(&p);
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn only_the_configured_mark_bit_approves_and_it_is_always_cleared() {
    let ns = VethNs::new("markbit");
    ns.run(|| {
        let other_bit = 0x0000_2000;
        let p = Programs::load_with(Some(FastPathConfig {
            mark: other_bit,
            ..fast_on()
        }));
        let packet = tcp_to_pod(TCP_ACK);
        let frame = frame_to_pod(&packet);
        // The default bit means nothing now, and is left alone.
        let run = p.veth_to_pod(&frame, FAST_PATH_MARK, VethNs::IFINDEX);
        assert_eq!(run.mark, FAST_PATH_MARK);
        assert_eq!(p.flows(), vec![]);
        let run = p.veth_to_pod(&frame, other_bit | 0x4000, VethNs::IFINDEX);
        assert_eq!(run.mark, 0x4000, "our bit cleared, kube-proxy's kept");
        assert!(p.flow(&key_of(&packet, DIR_TO_POD)).is_some());

        // vxlan_egress clears the bit of what it passes to the kernel too
        // (the vxlan device's route lookup sees the mark).
        let local = flannel_frame(&tcp_packet(LOCAL_POD, [10, 244, 9, 9], (1, 2), TCP_ACK));
        let run = p.egress(&local, other_bit | 0x4000);
        assert_eq!(run.verdict, TCX_NEXT, "no route: the kernel's");
        assert_eq!(run.mark, 0x4000);
    });
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn tc_ingress_drops_a_node_speaking_for_another_nodes_pods_on_the_host_path_too() {
    // Fast path off: what flannel's device would deliver (rp_filter on
    // flannel.<VNI> accepts any overlay source) is dropped here.
    let mut p = Programs::load_with(None);
    p.add_other_vtep(Some([10, 244, 3, 0]));
    let mut tally = Tally::default();
    let packet = tcp_to_pod(TCP_SYN);
    let inner = inner_frame_to_us(&packet);
    let forged = from_underlay(OTHER_VTEP, VNI, &inner);
    assert_eq!(p.ingress_tc(&forged).verdict, TC_ACT_SHOT, "impersonation");
    tally.add(Reason::DropSourceVtepMismatch, &forged);

    // The other VTEP's own pods, the serving VTEP, and sources no vxlan
    // peer serves (a DirectRouting peer's pods, the internet) get in.
    let own = tcp_packet([10, 244, 3, 8], LOCAL_POD, (80, 43210), TCP_SYN);
    let outside = tcp_packet([192, 0, 2, 7], LOCAL_POD, (80, 43210), TCP_SYN);
    for (name, frame, want) in [
        (
            "its own pod",
            from_underlay(OTHER_VTEP, VNI, &inner_frame_to_us(&own)),
            inner_frame_to_us(&own),
        ),
        ("the serving VTEP", from_peer(&inner), inner.clone()),
        (
            "outside the overlay",
            from_underlay(OTHER_VTEP, VNI, &inner_frame_to_us(&outside)),
            inner_frame_to_us(&outside),
        ),
    ] {
        let run = p.ingress_tc(&frame);
        assert_eq!(run.verdict, TC_ACT_REDIRECT, "{name}");
        assert_eq!(run.out, want, "{name}: decapsulated into flannel");
        tally.add(Reason::Decapsulated, &frame);
    }
    tally.check(&p);
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn tc_ingress_leaves_a_packet_longer_than_the_pods_mtu_to_the_host() {
    let mut p = Programs::load();
    let packet = tcp_to_pod(TCP_PSH | TCP_ACK);
    p.approve_to_pod(&packet, now_ns());
    let frame = from_peer(&inner_frame_to_us(&packet));
    let mut tally = Tally::default();
    // The pod's veth takes one byte less than the packet: the host's path.
    p.add_pod_veth_mtu(POD_VETH, packet.len() as u32 - 1);
    let run = p.ingress_tc(&frame);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(
        run.out,
        inner_frame_to_us(&packet),
        "into flannel, not the pod"
    );
    tally.add(Reason::PassFastUnusual, &frame);
    tally.add(Reason::Decapsulated, &frame);
    // Exactly its MTU: straight to the pod.
    p.add_pod_veth_mtu(POD_VETH, packet.len() as u32);
    let run = p.ingress_tc(&frame);
    assert_eq!(run.out, frame_to_pod(&forwarded(&packet)), "delivered");
    tally.add(Reason::FastIngress, &frame);
    tally.check(&p);
}
