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

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, lpm_trie::Key},
    programs::SchedClassifier,
};
use overlay_common::{
    consts::{
        MAP_KNOWN_VTEPS6, MAP_NODE_CONFIG6, MAP_REMOTE_SUBNETS6, PROG_EGRESS6, PROG_INGRESS_TC,
    },
    counters::Reason,
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
        for name in [PROG_EGRESS6, PROG_INGRESS_TC] {
            load_classifier(&mut ebpf, name);
        }
        Self { ebpf }
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
