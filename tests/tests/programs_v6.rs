//! Program tests for VXLAN over IPv6 (a dual-stack node): `vxlan_egress6`
//! and the IPv6 half of `vxlan_ingress_tc` run on crafted frames through
//! `BPF_PROG_TEST_RUN`; the exact bytes out, the outer UDP checksum, the
//! verdicts and the counters are checked.
//!
//! The expected frames are built by hand here, in the format
//! `flannel-v6.<VNI>` (the kernel vxlan device flannel creates over IPv6)
//! sends: outer IPv6 with hop limit 64, traffic class = the inner ECN bits
//! (CE sent as ECT(0)), UDP to 8472 from a port in [32768, 60999) with a
//! checksum over the whole datagram (flannel's kernel peers drop a zero
//! one), VXLAN I flag and VNI, inner Ethernet between the v6 VTEP MACs.
//! The checksum is verified by summing every byte out, independently of
//! how the program derives it from the headers.
//!
//! The IPv6 fast path (`veth_from_pod6`, `veth_encap6`, `veth_to_pod6` and
//! the fast half of `vxlan_ingress_tc6`, reached from the IPv4 programs by
//! tail calls as on a node): an approved flow leaves a pod encapsulated as
//! `vxlan_egress6` would send it, hop limit one lower; a marked delivery to
//! a pod approves its flow naming the serving VTEP; approved VXLAN is
//! delivered straight into the pod, as the bridge would have.

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, lpm_trie::Key},
    programs::SchedClassifier,
};
use overlay_common::{
    consts::{
        MAP_FAST_CONFIG, MAP_FAST_CONFIG6, MAP_FAST_FLOWS6, MAP_KNOWN_VTEPS6, MAP_NODE_CONFIG6,
        MAP_POD_ADDRS6, MAP_POD_VETHS, MAP_REMOTE_SUBNETS6, PROG_EGRESS6, PROG_INGRESS_TC,
        PROG_VETH_FROM_POD, PROG_VETH_TO_POD,
    },
    counters::Reason,
    fastpath::{DEFAULT_FAST_PATH_MARK, DIR_FROM_POD, DIR_TO_POD, FastPathConfig},
    fastpath6::{FastFlow6, FastPathConfig6, FlowKey6},
    maps::{KnownVtep6, NodeConfig6, RemoteVtep6},
};
use overlay_tests::frames::*;

const IPPROTO_ICMPV6: u8 = 58;
const VXLAN6_IFINDEX: u32 = 4;
const LOCAL_IP6: [u8; 16] = [0xfd, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const PEER_IP6: [u8; 16] = [0xfd, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];
const OTHER_IP6: [u8; 16] = [0xfd, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4];
const STRANGER_IP6: [u8; 16] = [0xfd, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x66];
const LOCAL_VTEP_MAC6: [u8; 6] = [0x0a, 0x58, 0x06, 0, 0, 0x02];
const PEER_VTEP_MAC6: [u8; 6] = [0x0a, 0x58, 0x06, 0, 0, 0x03];
/// Our pod, the peer's (fd10:0:0:7::/64) and a third node's (fd10:0:0:8::/64).
const LOCAL_POD6: [u8; 16] = [0xfd, 0x10, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 2];
const REMOTE_POD6: [u8; 16] = [0xfd, 0x10, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 2];
const OTHER_POD6: [u8; 16] = [0xfd, 0x10, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 2];

struct Programs {
    ebpf: Ebpf,
}

impl Loaded for Programs {
    fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }
}

impl Programs {
    /// The one-peer node of `programs.rs`, dual stack: its IPv6 side, the
    /// peer's (fd10:0:0:7::/64 via PEER_IP6) and a third node's
    /// (fd10:0:0:8::/64 via OTHER_IP6), as the agent fills them in.
    fn load() -> Self {
        let mut ebpf = load_object();
        configure_one_peer(&mut ebpf);
        let mut node: Array<_, NodeConfig6> =
            Array::try_from(ebpf.map_mut(MAP_NODE_CONFIG6).unwrap()).unwrap();
        let cfg6 = NodeConfig6 {
            local_ip: LOCAL_IP6,
            vxlan_ifindex: VXLAN6_IFINDEX,
            vtep_mac: LOCAL_VTEP_MAC6,
            _pad: [0; 2],
            configured: 1,
        };
        node.set(0, cfg6, 0).unwrap();
        let peers = [
            (REMOTE_POD6, PEER_IP6, PEER_IP),
            (OTHER_POD6, OTHER_IP6, [192, 168, 64, 4]),
        ];
        for (pod, public, peer) in peers {
            let mut subnets: LpmTrie<_, [u8; 16], RemoteVtep6> =
                LpmTrie::try_from(ebpf.map_mut(MAP_REMOTE_SUBNETS6).unwrap()).unwrap();
            let mut net = [0u8; 16];
            net[..8].copy_from_slice(&pod[..8]);
            let vtep = RemoteVtep6 {
                vtep_mac: PEER_VTEP_MAC6,
                _pad: [0; 2],
                public_ip: public,
                peer,
            };
            subnets.insert(&Key::new(64, net), vtep, 0).unwrap();
            let mut known: HashMap<_, [u8; 16], KnownVtep6> =
                HashMap::try_from(ebpf.map_mut(MAP_KNOWN_VTEPS6).unwrap()).unwrap();
            let k = KnownVtep6 {
                vtep_mac: PEER_VTEP_MAC6,
                _pad: [0; 2],
                peer,
            };
            known.insert(public, k, 0).unwrap();
        }
        for name in [
            PROG_EGRESS6,
            PROG_INGRESS_TC,
            PROG_VETH_FROM_POD,
            PROG_VETH_TO_POD,
        ] {
            load_classifier(&mut ebpf, name);
        }
        load_jumps(&mut ebpf);
        Self { ebpf }
    }

    /// [`Self::load`] with the fast path on for both families (our IPv6
    /// pods: fd10:0:0:5::/64, the bridge at ::1) and one pod veth.
    fn load_fast() -> Self {
        let mut p = Self::load();
        let mut fast: Array<_, FastPathConfig> =
            Array::try_from(p.ebpf.map_mut(MAP_FAST_CONFIG).unwrap()).unwrap();
        let cfg = FastPathConfig {
            enabled: 1,
            pod_subnet: [10, 244, 1, 0],
            pod_prefix_len: 24,
            mark: DEFAULT_FAST_PATH_MARK,
            gateway: [10, 244, 1, 1],
            _pad: 0,
        };
        fast.set(0, cfg, 0).unwrap();
        let mut fast6: Array<_, FastPathConfig6> =
            Array::try_from(p.ebpf.map_mut(MAP_FAST_CONFIG6).unwrap()).unwrap();
        let mut subnet = [0u8; 16];
        subnet[..8].copy_from_slice(&LOCAL_POD6[..8]);
        let mut gateway = subnet;
        gateway[15] = 1;
        let cfg6 = FastPathConfig6 {
            enabled: 1,
            pod_prefix_len: 64,
            pod_subnet: subnet,
            gateway,
        };
        fast6.set(0, cfg6, 0).unwrap();
        let mut veths: HashMap<_, u32, u32> =
            HashMap::try_from(p.ebpf.map_mut(MAP_POD_VETHS).unwrap()).unwrap();
        veths.insert(POD_VETH, 1450, 0).unwrap();
        p
    }

    /// One test-run with `skb->mark` and `skb->ifindex` set: the verdict,
    /// the frame out and the mark written back.
    fn run(&self, name: &str, frame: &[u8], mark: u32, ifindex: u32) -> (u32, Vec<u8>, u32) {
        let prog: &SchedClassifier = self.ebpf.program(name).unwrap().try_into().unwrap();
        let ctx = skb_ctx(mark, ifindex, None);
        let mut ctx_out = [0u8; SKB_CTX_LEN];
        let (verdict, out) = run_frame(prog, name, frame, Some(&ctx), Some(&mut ctx_out));
        let mark = u32::from_ne_bytes(ctx_out[SKB_MARK..SKB_MARK + 4].try_into().unwrap());
        (verdict, out, mark)
    }

    fn approve(&mut self, key: FlowKey6, value: FastFlow6) {
        let mut flows: HashMap<_, FlowKey6, FastFlow6> =
            HashMap::try_from(self.ebpf.map_mut(MAP_FAST_FLOWS6).unwrap()).unwrap();
        flows.insert(key, value, 0).unwrap();
    }

    fn flow(&self, key: &FlowKey6) -> Option<FastFlow6> {
        let flows: HashMap<_, FlowKey6, FastFlow6> =
            HashMap::try_from(self.ebpf.map(MAP_FAST_FLOWS6).unwrap()).unwrap();
        flows.get(key, 0).ok()
    }

    fn bind(&mut self, pod: [u8; 16], ifindex: u32) {
        let mut addrs: HashMap<_, [u8; 16], u32> =
            HashMap::try_from(self.ebpf.map_mut(MAP_POD_ADDRS6).unwrap()).unwrap();
        addrs.insert(pod, ifindex, 0).unwrap();
    }

    fn bound(&self, pod: [u8; 16]) -> Option<u32> {
        let addrs: HashMap<_, [u8; 16], u32> =
            HashMap::try_from(self.ebpf.map(MAP_POD_ADDRS6).unwrap()).unwrap();
        addrs.get(&pod, 0).ok()
    }

    fn tc(&self, name: &str, frame: &[u8], gso: Option<(u32, u32)>) -> (u32, Vec<u8>) {
        let prog: &SchedClassifier = self.ebpf.program(name).unwrap().try_into().unwrap();
        let ctx = skb_ctx(0, 0, gso);
        run_frame(prog, name, frame, gso.is_some().then_some(&ctx[..]), None)
    }

    fn egress(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.tc(PROG_EGRESS6, frame, None)
    }

    fn ingress(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.tc(PROG_INGRESS_TC, frame, None)
    }
}

/// The pod's MAC and its gateway's (the bridge's), as the fast path writes
/// them toward the pod.
const POD_MAC: [u8; 6] = [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x05];
const GW_MAC: [u8; 6] = [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x01];
/// The pod's host-side veth.
const POD_VETH: u32 = 4242;
/// `skb->ifindex` of a test-run on the loopback device (context ifindex 0).
const LO: u32 = 1;

/// The `FAST_FLOWS6` key of one of [`pod_packets`]' packets.
fn key6(packet: &[u8], dir: u8) -> FlowKey6 {
    let mut key = FlowKey6 {
        proto: packet[6],
        dir,
        ..FlowKey6::default()
    };
    key.src.copy_from_slice(&packet[8..24]);
    key.dst.copy_from_slice(&packet[24..40]);
    let l4 = &packet[40..];
    if packet[6] == IPPROTO_ICMPV6 {
        key.sport = [l4[4], l4[5]];
        key.dport = [l4[0], 0];
    } else {
        key.sport = [l4[0], l4[1]];
        key.dport = [l4[2], l4[3]];
    }
    key
}

/// The packet one hop later: its hop limit one lower.
fn forwarded6(packet: &[u8]) -> Vec<u8> {
    let mut p = packet.to_vec();
    p[7] -= 1;
    p
}

/// Inner packets a pod sends: TCP with data, UDP, an ICMPv6 echo request,
/// each with a correct checksum, and a traffic class to carry.
fn pod_packets(src: [u8; 16], dst: [u8; 16]) -> Vec<(&'static str, Vec<u8>)> {
    let mut tcp = vec![0u8; 20];
    tcp[0..4].copy_from_slice(&[0x9c, 0x40, 0x00, 0x50]);
    tcp[12] = 0x50;
    tcp[13] = TCP_PSH | TCP_ACK;
    tcp.extend_from_slice(&payload(1000));
    let mut udp = vec![0x30, 0x39, 0x1f, 0x90, 0, 0, 0, 0];
    udp.extend_from_slice(&payload(333));
    let len = udp.len() as u16;
    udp[4..6].copy_from_slice(&len.to_be_bytes());
    let mut echo = vec![128, 0, 0, 0, 0x12, 0x34, 0, 1];
    echo.extend_from_slice(&payload(56));
    vec![
        ("tcp", ipv6(IPPROTO_TCP, 0xb9, src, dst, &tcp, 16)),
        ("udp", ipv6(IPPROTO_UDP, 0x00, src, dst, &udp, 6)),
        ("icmpv6", ipv6(IPPROTO_ICMPV6, 0x03, src, dst, &echo, 2)),
    ]
}

/// The frame routing hands `flannel-v6.<VNI>` for a remote pod.
fn flannel6_frame(packet: &[u8]) -> Vec<u8> {
    eth(PEER_VTEP_MAC6, LOCAL_VTEP_MAC6, ETH_P_IPV6, packet)
}

/// VXLAN over IPv6 from `from` to us, as the underlay delivers it (UDP
/// checksum computed over the whole datagram).
fn from_underlay6(from: [u8; 16], vni: u32, inner_frame: &[u8]) -> Vec<u8> {
    let mut udp = vec![0xc3, 0xcb, 0x21, 0x18, 0, 0, 0, 0, 0x08, 0, 0, 0];
    udp.extend_from_slice(&(vni << 8).to_be_bytes());
    udp.extend_from_slice(inner_frame);
    let len = udp.len() as u16;
    udp[4..6].copy_from_slice(&len.to_be_bytes());
    let packet = ipv6(IPPROTO_UDP, 0, from, LOCAL_IP6, &udp, 6);
    eth(LOCAL_NIC_MAC, PEER_NIC_MAC, ETH_P_IPV6, &packet)
}

/// Whether the encapsulated frame's outer UDP checksum is right, summed over
/// every byte of the datagram as a receiver does.
fn outer_checksum_ok(frame: &[u8]) -> bool {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&frame[22..54]);
    let udp = &frame[54..];
    pseudo.extend_from_slice(&(udp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_UDP]);
    pseudo.extend_from_slice(udp);
    checksum(&pseudo) == 0
}

#[test]
#[ignore = "needs root and eBPF: run `cargo xtask test`"]
fn egress6_encapsulates_as_the_kernel_vxlan_device_over_ipv6() {
    let p = Programs::load();
    let mut tally = Tally::default();
    for (name, packet) in pod_packets(LOCAL_POD6, REMOTE_POD6) {
        let frame = flannel6_frame(&packet);
        let (verdict, out) = p.egress(&frame);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{name}");
        tally.add(Reason::Encapsulated6, &frame);
        assert_eq!(out.len(), frame.len() + 70, "{name}");
        // Outer Ethernet as it came (bpf_redirect_neigh writes it when it
        // sends), outer IPv6.
        assert_eq!(out[..12], frame[..12], "{name}");
        assert_eq!(out[12..14], ETH_P_IPV6.to_be_bytes(), "{name}");
        let tc = (out[14] << 4) | (out[15] >> 4);
        let inner_tc = (packet[0] << 4) | (packet[1] >> 4);
        let ecn = match inner_tc & 3 {
            3 => 2,
            e => e,
        };
        assert_eq!(
            (out[14] >> 4, tc),
            (6, ecn),
            "{name}: version, DSCP 0 + ECN"
        );
        let udp_len = (packet.len() + 8 + 8 + 14) as u16;
        assert_eq!(out[18..20], udp_len.to_be_bytes(), "{name}: payload length");
        assert_eq!(
            (out[20], out[21]),
            (IPPROTO_UDP, 64),
            "{name}: UDP, hop limit"
        );
        assert_eq!(out[22..38], LOCAL_IP6, "{name}");
        assert_eq!(out[38..54], PEER_IP6, "{name}");
        let sport = u16::from_be_bytes([out[54], out[55]]);
        assert!(
            (32768..60999).contains(&sport),
            "{name}: source port {sport}"
        );
        assert_eq!(out[56..58], PORT.to_be_bytes(), "{name}");
        assert_eq!(out[58..60], udp_len.to_be_bytes(), "{name}");
        assert_ne!(out[60..62], [0, 0], "{name}: a UDP checksum");
        assert!(outer_checksum_ok(&out), "{name}: the outer UDP checksum");
        assert_eq!(out[62..70], [0x08, 0, 0, 0, 0, 0, 1, 0], "{name}: VXLAN");
        assert_eq!(
            out[70..84],
            eth(PEER_VTEP_MAC6, LOCAL_VTEP_MAC6, ETH_P_IPV6, &[])[..],
            "{name}: inner Ethernet"
        );
        assert_eq!(out[84..], packet[..], "{name}: the inner packet, untouched");
    }
    tally.check(&p);
}

#[test]
#[ignore = "needs root and eBPF: run `cargo xtask test`"]
fn egress6_leaves_what_it_cannot_checksum_or_segment_to_the_kernel() {
    let p = Programs::load();
    let mut tally = Tally::default();
    let packets = pod_packets(LOCAL_POD6, REMOTE_POD6);
    let tcp = &packets[0].1;
    // A fragment header (44) first, an upper layer without a pseudo-header
    // checksum (ESP, 50), a UDP datagram without a checksum.
    let mut cases = Vec::new();
    for next in [44u8, 50] {
        let mut f = flannel6_frame(tcp);
        f[20] = next;
        cases.push((f, Reason::PassIpv6Unusual));
    }
    let mut udp0 = flannel6_frame(&packets[1].1);
    udp0[60..62].copy_from_slice(&[0, 0]);
    cases.push((udp0, Reason::PassIpv6Unusual));
    // Bytes behind the payload length.
    let mut padded = flannel6_frame(tcp);
    padded.extend_from_slice(&[0; 6]);
    cases.push((padded, Reason::PassIpv6Unusual));
    // To a subnet no peer serves; too big for the underlay.
    let mut unknown = flannel6_frame(tcp);
    unknown[45] = 0x99;
    cases.push((unknown, Reason::PassNoRoute));
    let mut tcp_big = vec![0u8; 20];
    tcp_big[12] = 0x50;
    tcp_big.extend_from_slice(&payload(1500 - 70 - 40 - 20 + 1));
    let big = flannel6_frame(&ipv6(IPPROTO_TCP, 0, LOCAL_POD6, REMOTE_POD6, &tcp_big, 16));
    cases.push((big, Reason::PassTooBig));
    for (i, (frame, reason)) in cases.iter().enumerate() {
        let (verdict, out) = p.egress(frame);
        assert_eq!((verdict, &out), (TCX_NEXT, frame), "case {i} ({reason:?})");
        tally.add(*reason, frame);
    }
    // One byte less fits exactly: 1500 bytes on the underlay.
    let fits = &ipv6(IPPROTO_TCP, 0, LOCAL_POD6, REMOTE_POD6, &tcp_big[1..], 16);
    let frame = flannel6_frame(fits);
    let (verdict, out) = p.egress(&frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out.len() - 14, 1500);
    tally.add(Reason::Encapsulated6, &frame);
    // A GSO aggregate: to the kernel device, which checksums every segment.
    let frame = flannel6_frame(tcp);
    let (verdict, out) = p.tc(PROG_EGRESS6, &frame, Some((500, 2)));
    assert_eq!((verdict, &out), (TCX_NEXT, &frame));
    tally.add(Reason::PassGso6, &frame);
    tally.check(&p);
}

#[test]
#[ignore = "needs root and eBPF: run `cargo xtask test`"]
fn egress6_never_encapsulates_truncated_or_garbage_frames() {
    let p = Programs::load();
    let good = flannel6_frame(&pod_packets(LOCAL_POD6, REMOTE_POD6)[0].1);
    // Shorter than the payload length says. (Test-run refuses IPv6 frames
    // cut inside the fixed header.)
    for len in [54, 61, 62, 100, good.len() - 1] {
        let frame = &good[..len];
        let (verdict, out) = p.egress(frame);
        assert_ne!(verdict, TC_ACT_REDIRECT, "cut at {len}");
        assert_eq!(out, frame, "cut at {len}");
    }
    let mut garbage = Garbage(0x5eed_0006);
    for i in 0..300 {
        let mut frame = garbage.some(54, 200);
        frame[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
        frame[14] = 0x60 | (frame[14] & 0x0f);
        if i % 2 == 0 {
            // Half to the peer's subnet, to get past the route.
            frame[38..46].copy_from_slice(&REMOTE_POD6[..8]);
        }
        let (verdict, out) = p.egress(&frame);
        assert_ne!(
            verdict, TC_ACT_REDIRECT,
            "garbage #{i} encapsulated: {frame:02x?}"
        );
        assert_eq!(out, frame, "garbage #{i} modified");
    }
    assert_eq!(p.counters().get("encapsulated_ipv6"), None);
}

#[test]
#[ignore = "needs root and eBPF: run `cargo xtask test`"]
fn ingress6_decapsulates_peer_traffic_into_flannel_v6() {
    let p = Programs::load();
    let mut tally = Tally::default();
    for (name, packet) in pod_packets(REMOTE_POD6, LOCAL_POD6) {
        let inner = eth(LOCAL_VTEP_MAC6, PEER_VTEP_MAC6, ETH_P_IPV6, &packet);
        let frame = from_underlay6(PEER_IP6, VNI, &inner);
        let (verdict, out) = p.ingress(&frame);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{name}");
        assert_eq!(out, inner, "{name}: exactly the inner frame");
        tally.add(Reason::Decapsulated6, &frame);
    }
    tally.check(&p);
}

#[test]
#[ignore = "needs root and eBPF: run `cargo xtask test`"]
fn ingress6_drops_strangers_impersonators_and_what_flannel_v6_would_drop() {
    let p = Programs::load();
    let mut tally = Tally::default();
    let packet = &pod_packets(REMOTE_POD6, LOCAL_POD6)[2].1;
    let inner = eth(LOCAL_VTEP_MAC6, PEER_VTEP_MAC6, ETH_P_IPV6, packet);
    let mut cases = vec![
        (
            from_underlay6(STRANGER_IP6, VNI, &inner),
            Reason::DropUnknownVtep,
        ),
        (
            from_underlay6(PEER_IP6, VNI + 1, &inner),
            Reason::DropWrongVni,
        ),
    ];
    let foreign_mac = eth([0x02, 0, 0, 0, 0, 0x99], PEER_VTEP_MAC6, ETH_P_IPV6, packet);
    cases.push((
        from_underlay6(PEER_IP6, VNI, &foreign_mac),
        Reason::DropWrongInnerMac,
    ));
    // The peer speaking for the third node's pods.
    let spoofed = pod_packets(OTHER_POD6, LOCAL_POD6).remove(2).1;
    let spoofed = eth(LOCAL_VTEP_MAC6, PEER_VTEP_MAC6, ETH_P_IPV6, &spoofed);
    cases.push((
        from_underlay6(PEER_IP6, VNI, &spoofed),
        Reason::DropSourceVtepMismatch,
    ));
    for (i, (frame, reason)) in cases.iter().enumerate() {
        let (verdict, out) = p.ingress(frame);
        assert_eq!(
            (verdict, &out),
            (TC_ACT_SHOT, frame),
            "case {i} ({reason:?})"
        );
        tally.add(*reason, frame);
    }
    // Not ours: another port, another destination; ARP-like inner frames and
    // GSO aggregates go to the kernel device.
    let mut other_port = from_underlay6(PEER_IP6, VNI, &inner);
    other_port[57] ^= 1;
    let mut elsewhere = from_underlay6(PEER_IP6, VNI, &inner);
    elsewhere[53] = 0x77;
    let arp = from_underlay6(
        PEER_IP6,
        VNI,
        &eth(LOCAL_VTEP_MAC6, PEER_VTEP_MAC6, ETH_P_ARP, &[0; 28]),
    );
    for (frame, reason) in [
        (&other_port, Reason::PassNotOurs),
        (&elsewhere, Reason::PassNotOurs),
        (&arp, Reason::PassInnerNotIpv4),
    ] {
        let (verdict, out) = p.ingress(frame);
        assert_eq!((verdict, &out), (TCX_NEXT, frame), "{reason:?}");
        tally.add(reason, frame);
    }
    let frame = from_underlay6(PEER_IP6, VNI, &inner);
    let (verdict, out) = p.tc(PROG_INGRESS_TC, &frame, Some((500, 2)));
    assert_eq!((verdict, &out), (TCX_NEXT, &frame));
    tally.add(Reason::PassGsoTunnel, &frame);
    tally.check(&p);
}

#[test]
#[ignore = "needs root and eBPF: run `cargo xtask test`"]
fn ingress6_never_delivers_truncated_or_garbage_frames() {
    let p = Programs::load();
    let packet = &pod_packets(REMOTE_POD6, LOCAL_POD6)[2].1;
    let inner = eth(LOCAL_VTEP_MAC6, PEER_VTEP_MAC6, ETH_P_IPV6, packet);
    let vx = from_underlay6(PEER_IP6, VNI, &inner);
    for len in 54..vx.len() {
        let frame = &vx[..len];
        let (verdict, out) = p.ingress(frame);
        // Before the UDP port is readable it is nobody's business; after, it
        // is ours and broken.
        let want = if len < 62 { TCX_NEXT } else { TC_ACT_SHOT };
        assert_eq!(verdict, want, "cut at {len}");
        assert_eq!(out, frame, "cut at {len}");
    }
    let counters = p.counters();
    assert_eq!(counters["pass_not_ours"].packets, 62 - 54);
    assert_eq!(counters["drop_malformed"].packets, (vx.len() - 62) as u64);
    assert_eq!(counters.len(), 2, "{counters:?}");

    let mut garbage = Garbage(0x5eed_0007);
    for i in 0..300 {
        let junk = garbage.some(0, 150);
        let mut frame = from_underlay6(PEER_IP6, VNI, &junk);
        if i % 2 == 1 {
            frame[62..70].copy_from_slice(&[0x08, 0, 0, 0, 0, 0, 1, 0]);
        }
        let (verdict, out) = p.ingress(&frame);
        assert_ne!(
            verdict, TC_ACT_REDIRECT,
            "garbage #{i} delivered: {frame:02x?}"
        );
        assert_eq!(out, frame, "garbage #{i} modified");
    }
    assert_eq!(p.counters().get("decapsulated_ipv6"), None);
}

#[test]
#[ignore = "needs root and eBPF: run `cargo xtask test`"]
fn fast6_veth_from_pod_encapsulates_approved_flows_with_the_hop_limit_lowered() {
    let mut p = Programs::load_fast();
    let mut tally = Tally::default();
    p.bind(LOCAL_POD6, LO);
    for (name, packet) in pod_packets(LOCAL_POD6, REMOTE_POD6) {
        let value = FastFlow6 {
            approved_ns: now_ns(),
            ..FastFlow6::default()
        };
        p.approve(key6(&packet, DIR_FROM_POD), value);
        let frame = eth(GW_MAC, POD_MAC, ETH_P_IPV6, &packet);
        let (verdict, out, _) = p.run(PROG_VETH_FROM_POD, &frame, 0, 0);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{name}");
        tally.add(Reason::FastEgress, &frame);
        // What vxlan_egress6 sends for the routed packet: the same outer
        // headers, the inner packet one hop later, a checksum over it all.
        assert_eq!(out.len(), frame.len() + 70, "{name}");
        assert_eq!((out[20], out[21]), (IPPROTO_UDP, 64), "{name}");
        assert_eq!(out[22..38], LOCAL_IP6, "{name}");
        assert_eq!(out[38..54], PEER_IP6, "{name}");
        assert_eq!(out[56..58], PORT.to_be_bytes(), "{name}");
        assert!(outer_checksum_ok(&out), "{name}: the outer UDP checksum");
        assert_eq!(out[62..70], [0x08, 0, 0, 0, 0, 0, 1, 0], "{name}: VXLAN");
        assert_eq!(
            out[70..84],
            eth(PEER_VTEP_MAC6, LOCAL_VTEP_MAC6, ETH_P_IPV6, &[])[..],
            "{name}: inner Ethernet"
        );
        assert_eq!(out[84..], forwarded6(&packet)[..], "{name}: inner packet");
        assert_eq!(out[84 + 7], 63, "{name}: hop limit");
    }
    tally.check(&p);
}

#[test]
#[ignore = "needs root and eBPF: run `cargo xtask test`"]
fn fast6_veth_from_pod_leaves_the_host_what_it_may_not_take() {
    let mut p = Programs::load_fast();
    let mut tally = Tally::default();
    let packets = pod_packets(LOCAL_POD6, REMOTE_POD6);
    let (_, packet) = &packets[0];
    let frame = eth(GW_MAC, POD_MAC, ETH_P_IPV6, packet);
    // No approval: the host's path (and its firewall) decides.
    let (verdict, out, _) = p.run(PROG_VETH_FROM_POD, &frame, 0, 0);
    assert_eq!((verdict, &out), (TCX_NEXT, &frame), "unapproved");
    tally.add(Reason::PassFastUnapproved, &frame);
    // Approved, but its source is bound to no veth: still the host's.
    let value = FastFlow6 {
        approved_ns: now_ns(),
        ..FastFlow6::default()
    };
    p.approve(key6(packet, DIR_FROM_POD), value);
    let (verdict, out, _) = p.run(PROG_VETH_FROM_POD, &frame, 0, 0);
    assert_eq!((verdict, &out), (TCX_NEXT, &frame), "unbound");
    tally.add(Reason::PassFastUnbound, &frame);
    // Bound to another live pod's veth: the bridge would not take it.
    p.bind(LOCAL_POD6, POD_VETH);
    let (verdict, _, _) = p.run(PROG_VETH_FROM_POD, &frame, 0, 0);
    assert_eq!(verdict, TC_ACT_SHOT, "another pod's address");
    tally.add(Reason::DropFastSpoofedSource, &frame);
    // The bridge's own address is never a pod's.
    let mut gateway = LOCAL_POD6;
    gateway[15] = 1;
    let (_, node) = &pod_packets(gateway, REMOTE_POD6)[0];
    let from_node = eth(GW_MAC, POD_MAC, ETH_P_IPV6, node);
    let (verdict, _, _) = p.run(PROG_VETH_FROM_POD, &from_node, 0, 0);
    assert_eq!(verdict, TC_ACT_SHOT, "the bridge's address");
    tally.add(Reason::DropFastSpoofedSource, &from_node);
    // Neighbour discovery is never a flow.
    let solicit = vec![135, 0, 0, 0, 0, 0, 0, 0];
    let ns = ipv6(IPPROTO_ICMPV6, 0, LOCAL_POD6, REMOTE_POD6, &solicit, 2);
    let nd = eth(GW_MAC, POD_MAC, ETH_P_IPV6, &ns);
    let (verdict, out, _) = p.run(PROG_VETH_FROM_POD, &nd, 0, 0);
    assert_eq!((verdict, &out), (TCX_NEXT, &nd), "neighbour solicitation");
    tally.add(Reason::PassFastUnusual, &nd);
    tally.check(&p);
}

#[test]
#[ignore = "needs root and eBPF: run `cargo xtask test`"]
fn fast6_veth_to_pod_approves_marked_deliveries_naming_the_vtep() {
    let p = Programs::load_fast();
    let mut tally = Tally::default();
    for (name, packet) in pod_packets(REMOTE_POD6, LOCAL_POD6) {
        let frame = eth(POD_MAC, GW_MAC, ETH_P_IPV6, &packet);
        let key = key6(&packet, DIR_TO_POD);
        // Unmarked: bound, not approved.
        let (verdict, out, _) = p.run(PROG_VETH_TO_POD, &frame, 0, 0);
        assert_eq!((verdict, &out), (TCX_NEXT, &frame), "{name}");
        tally.add(Reason::SlowToPod, &frame);
        assert_eq!(p.bound(LOCAL_POD6), Some(LO), "{name}: bound");
        assert_eq!(p.flow(&key), None, "{name}: unmarked");
        // Marked by the host's rule: approved, and the bit cleared.
        let mark = DEFAULT_FAST_PATH_MARK | 0x4;
        let (verdict, out, left) = p.run(PROG_VETH_TO_POD, &frame, mark, 0);
        assert_eq!((verdict, &out), (TCX_NEXT, &frame), "{name}");
        assert_eq!(left, 0x4, "{name}: the approval bit cleared, the rest kept");
        tally.add(Reason::SlowToPod, &frame);
        tally.add(Reason::FastApproval, &frame);
        let flow = p
            .flow(&key)
            .unwrap_or_else(|| panic!("{name}: no approval"));
        assert_eq!(
            (flow.ifindex, flow.pod_mac, flow.gw_mac, flow.vtep),
            (LO, POD_MAC, GW_MAC, PEER_IP6),
            "{name}"
        );
    }
    // A marked neighbour advertisement approves nothing.
    let advert = vec![136, 0, 0, 0, 0, 0, 0, 0];
    let na = ipv6(IPPROTO_ICMPV6, 0, REMOTE_POD6, LOCAL_POD6, &advert, 2);
    let frame = eth(POD_MAC, GW_MAC, ETH_P_IPV6, &na);
    p.run(PROG_VETH_TO_POD, &frame, DEFAULT_FAST_PATH_MARK, 0);
    tally.add(Reason::SlowToPod, &frame);
    tally.check(&p);
}

#[test]
#[ignore = "needs root and eBPF: run `cargo xtask test`"]
fn fast6_ingress_delivers_approved_flows_straight_to_the_pod() {
    let mut p = Programs::load_fast();
    let mut tally = Tally::default();
    for (name, packet) in pod_packets(REMOTE_POD6, LOCAL_POD6) {
        let value = FastFlow6 {
            approved_ns: now_ns(),
            ifindex: POD_VETH,
            pod_mac: POD_MAC,
            gw_mac: GW_MAC,
            vtep: PEER_IP6,
        };
        p.approve(key6(&packet, DIR_TO_POD), value);
        let inner = eth(LOCAL_VTEP_MAC6, PEER_VTEP_MAC6, ETH_P_IPV6, &packet);
        // From the VTEP the approval names: into the pod, as the bridge
        // would have delivered it one hop later.
        let frame = from_underlay6(PEER_IP6, VNI, &inner);
        let (verdict, out, _) = p.run(PROG_INGRESS_TC, &frame, 0, 0);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{name}");
        assert_eq!(
            out,
            eth(POD_MAC, GW_MAC, ETH_P_IPV6, &forwarded6(&packet)),
            "{name}"
        );
        tally.add(Reason::FastIngress, &frame);
        // From another known VTEP that does not serve the source: dropped.
        let frame = from_underlay6(OTHER_IP6, VNI, &inner);
        let (verdict, _, _) = p.run(PROG_INGRESS_TC, &frame, 0, 0);
        assert_eq!(verdict, TC_ACT_SHOT, "{name}: another VTEP");
        tally.add(Reason::DropSourceVtepMismatch, &frame);
    }
    tally.check(&p);
}
