//! The headers written in front of an inner IPv6 packet, byte for byte what
//! `flannel-v6.<VNI>` (the kernel vxlan device flannel creates over IPv6)
//! sends, outer UDP checksum included.
//!
//! Egress makes room with `bpf_skb_adjust_room(+70, BPF_ADJ_ROOM_MAC, ...)`;
//! [`Encap6Header`] covers the outer EtherType and those 70 bytes, written in
//! one store at [`Encap6Header::OFFSET`].
//!
//! The outer UDP checksum cannot be left 0 over IPv6: flannel creates the
//! device without `udp6zerocsumrx`, so kernel peers drop such datagrams. It
//! covers the whole inner frame, which the program does not read. It does
//! not need to: an inner TCP, UDP or ICMPv6 packet whose own checksum is
//! right (or will be filled in by the NIC or the stack before the frame
//! leaves: CHECKSUM_PARTIAL, whose start and offset encapsulation keeps)
//! sums to the complement of its pseudo-header, so the outer checksum
//! follows from the headers alone. This is the kernel's local checksum
//! offload (`lco_csum`, Documentation/networking/checksum-offloads.rst);
//! the egress classifier sends every other inner packet to the kernel.

use crate::{
    checksum::{fold, ipv6_pseudo_sum, sum_words, sum_words_in},
    consts::{
        ETH_HDR_LEN, ETH_P_IPV6, IPPROTO_UDP, IPV6_HDR_LEN, OUTER_TTL, UDP_HDR_LEN, VXLAN_FLAG_I,
        VXLAN_HDR_LEN, VXLAN6_ENCAP_LEN,
    },
    encap::outer_tos,
    maps::{NodeConfig, NodeConfig6, RemoteVtep6},
};

/// The outer EtherType followed by outer IPv6 + UDP + VXLAN + inner Ethernet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Encap6Header {
    pub bytes: [u8; Self::LEN],
}

impl Encap6Header {
    /// Where [`Self::bytes`] go in the encapsulated frame: at the outer EtherType.
    pub const OFFSET: usize = ETH_HDR_LEN - 2;
    pub const LEN: usize = 2 + VXLAN6_ENCAP_LEN as usize;

    /// Offsets inside [`Self::bytes`].
    pub const IP: usize = 2;
    pub const UDP: usize = Self::IP + IPV6_HDR_LEN;
    pub const VXLAN: usize = Self::UDP + UDP_HDR_LEN;
    pub const INNER_ETH: usize = Self::VXLAN + VXLAN_HDR_LEN;
}

/// What the IPv6 egress classifier decided to encapsulate: toward which
/// VTEP. The inner IPv6 header the outer one depends on stays in the
/// program's window ([`crate::egress6::inner_header`]): on a 512-byte BPF
/// stack, a copy of it is a copy too many.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncapPlan6 {
    pub remote: RemoteVtep6,
}

/// The outer flow label for a packet whose flow hash is `hash`: what the
/// kernel device puts there with `auto_flowlabels` on (the default),
/// `ip6_make_flowlabel`'s `rol32(hash, 16)` cut to 20 bits, so a flow keeps
/// one label (the kernel hashes the outer flow; any stable per-flow value
/// serves the underlay's ECMP alike).
pub const fn outer_flow_label(hash: u32) -> u32 {
    hash.rotate_left(16) & 0x000f_ffff
}

/// Builds the outer headers for the inner IPv6 packet whose header is
/// `inner` (its payload length says how long the packet is). The caller
/// guarantees that the inner packet is TCP, UDP with a checksum, or ICMPv6,
/// without extension headers, and that `40 + payload length + 70` fits 16
/// bits.
///
/// The outer UDP checksum is summed from the values as they are written
/// (no second pass over the bytes): the pseudo-header, the UDP header, the
/// VXLAN header, the inner Ethernet and IPv6 headers, and the complement of
/// the inner pseudo-header for the inner upper layer (see the module's
/// comment).
pub fn build_encap6_header(
    cfg: &NodeConfig,
    cfg6: &NodeConfig6,
    remote: &RemoteVtep6,
    inner: &[u8; IPV6_HDR_LEN],
    src_port: u16,
    flow_label: u32,
) -> Encap6Header {
    let mut header = Encap6Header {
        bytes: [0; Encap6Header::LEN],
    };
    write_encap6_header(
        &mut header.bytes,
        cfg,
        cfg6,
        remote,
        inner,
        (src_port, flow_label),
    );
    header
}

/// [`build_encap6_header`] into `b`, which the program keeps off its
/// 512-byte stack (every byte is written). `flow` is the UDP source port
/// and the flow label.
#[inline(always)]
pub fn write_encap6_header(
    b: &mut [u8; Encap6Header::LEN],
    cfg: &NodeConfig,
    cfg6: &NodeConfig6,
    remote: &RemoteVtep6,
    inner: &[u8; IPV6_HDR_LEN],
    flow: (u16, u32),
) {
    let (src_port, flow_label) = flow;
    // Every byte is written below in word-sized pieces (see
    // `build_encap_header`: no byte-wise memset on BPF).
    let inner_payload = u16::from_be_bytes([inner[4], inner[5]]);
    let inner_len = (IPV6_HDR_LEN as u16).wrapping_add(inner_payload);
    let udp_len = inner_len.wrapping_add((VXLAN6_ENCAP_LEN as usize - IPV6_HDR_LEN) as u16);
    let vni = cfg.vni & 0x00ff_ffff;

    b[0..2].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    let ip = Encap6Header::IP;
    let inner_tc = (inner[0] << 4) | (inner[1] >> 4);
    b[ip..ip + 4].copy_from_slice(
        &(6 << 28 | u32::from(outer_tos(inner_tc)) << 20 | (flow_label & 0x000f_ffff))
            .to_be_bytes(),
    );
    b[ip + 4..ip + 8].copy_from_slice(
        &(u32::from(udp_len) << 16 | u32::from(IPPROTO_UDP) << 8 | u32::from(OUTER_TTL))
            .to_be_bytes(),
    );
    b[ip + 8..ip + 24].copy_from_slice(&cfg6.local_ip);
    b[ip + 24..ip + 40].copy_from_slice(&remote.public_ip);
    let mut sum = ipv6_pseudo_sum(
        0,
        &cfg6.local_ip,
        &remote.public_ip,
        u32::from(udp_len),
        IPPROTO_UDP,
    );

    let udp = Encap6Header::UDP;
    b[udp..udp + 4]
        .copy_from_slice(&(u32::from(src_port) << 16 | u32::from(cfg.port)).to_be_bytes());
    sum += u32::from(src_port) + u32::from(cfg.port) + u32::from(udp_len);

    let vx = Encap6Header::VXLAN;
    b[vx..vx + 8]
        .copy_from_slice(&(u64::from(VXLAN_FLAG_I) << 56 | u64::from(vni) << 8).to_be_bytes());
    sum += (u32::from(VXLAN_FLAG_I) << 8) + (vni >> 8) + ((vni & 0xff) << 8);

    let eth = Encap6Header::INNER_ETH;
    b[eth..eth + 6].copy_from_slice(&remote.vtep_mac);
    b[eth + 6..eth + 12].copy_from_slice(&cfg6.vtep_mac);
    b[eth + 12..eth + 14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    sum = sum_words(sum_words(sum, &remote.vtep_mac), &cfg6.vtep_mac) + u32::from(ETH_P_IPV6);

    // The inner header as it is, then the complement of its pseudo-header
    // for what follows it.
    sum = sum_words(sum, inner);
    let inner_pseudo = fold(
        sum_words_in(0, inner, 8, IPV6_HDR_LEN) + u32::from(inner_payload) + u32::from(inner[6]),
    );
    sum += u32::from(!inner_pseudo);
    let check = match !fold(sum) {
        // Over IPv6 a computed 0 is sent as all ones (RFC 8200 section 8.1).
        0 => 0xffff,
        c => c,
    };
    b[udp + 4..udp + 8]
        .copy_from_slice(&(u32::from(udp_len) << 16 | u32::from(check)).to_be_bytes());
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;
    use crate::consts::{IPPROTO_ICMPV6, IPPROTO_TCP};

    fn node() -> (NodeConfig, NodeConfig6) {
        let cfg = NodeConfig {
            vni: 1,
            port: 8472,
            configured: 1,
            ..NodeConfig::default()
        };
        let cfg6 = NodeConfig6 {
            local_ip: [0xfd, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            vxlan_ifindex: 6,
            vtep_mac: [0x0a, 0x58, 0, 0, 0, 2],
            _pad: [0; 2],
            configured: 1,
        };
        (cfg, cfg6)
    }

    fn remote() -> RemoteVtep6 {
        RemoteVtep6 {
            vtep_mac: [0x7a, 0x01, 0x9e, 0x55, 0x20, 0x0b],
            _pad: [0; 2],
            public_ip: [0xfd, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3],
            peer: [192, 168, 64, 3],
        }
    }

    /// One's-complement sum of `data` as big-endian words (odd length padded).
    fn sum(data: &[u8]) -> u32 {
        data.chunks(2)
            .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
            .sum()
    }

    fn fold_all(mut s: u32) -> u16 {
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    /// An inner IPv6 packet with `proto` and a correct upper-layer checksum
    /// at `check_at` (offset in the upper layer), computed here the slow way.
    fn inner_packet(proto: u8, tc: u8, l4: &[u8], check_at: usize) -> Vec<u8> {
        let src = [0xfd, 0x10, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 2];
        let dst = [0xfd, 0x10, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 2];
        let mut l4 = l4.to_vec();
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src);
        pseudo.extend_from_slice(&dst);
        pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, proto]);
        pseudo.extend_from_slice(&l4);
        let c = !fold_all(sum(&pseudo));
        l4[check_at..check_at + 2].copy_from_slice(&c.to_be_bytes());
        let mut p = vec![0x60 | tc >> 4, tc << 4, 0x12, 0x34];
        p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        p.extend_from_slice(&[proto, 64]);
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&l4);
        p
    }

    /// The encapsulated datagram's UDP checksum, verified over all of it as a
    /// receiver does.
    fn receiver_accepts(h: &Encap6Header, inner: &[u8]) -> bool {
        let ip = Encap6Header::IP;
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&h.bytes[ip + 8..ip + 40]);
        let udp_len = u16::from_be_bytes([h.bytes[ip + 4], h.bytes[ip + 5]]);
        pseudo.extend_from_slice(&u32::from(udp_len).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_UDP]);
        pseudo.extend_from_slice(&h.bytes[Encap6Header::UDP..]);
        pseudo.extend_from_slice(inner);
        assert_eq!(
            usize::from(udp_len),
            h.bytes.len() - Encap6Header::UDP + inner.len()
        );
        fold_all(sum(&pseudo)) == 0xffff
    }

    fn encapsulate(inner: &[u8]) -> Encap6Header {
        let (cfg, cfg6) = node();
        let mut hdr = [0u8; IPV6_HDR_LEN];
        hdr.copy_from_slice(&inner[..IPV6_HDR_LEN]);
        build_encap6_header(&cfg, &cfg6, &remote(), &hdr, 40000, 0xabcde)
    }

    #[test]
    fn builds_the_exact_bytes() {
        let inner = inner_packet(IPPROTO_ICMPV6, 0, &[128, 0, 0, 0, 0, 1, 0, 1], 2);
        let h = encapsulate(&inner);
        let udp_len = 8 + 8 + 14 + 48u8;
        let check = u16::from_be_bytes([
            h.bytes[Encap6Header::UDP + 6],
            h.bytes[Encap6Header::UDP + 7],
        ]);
        #[rustfmt::skip]
        let expected: [u8; 72] = [
            0x86, 0xdd,
            // version 6, traffic class 0, flow label 0xabcde
            0x60, 0x0a, 0xbc, 0xde,
            // payload length, next header UDP, hop limit 64
            0x00, udp_len, 17, 64,
            0xfd, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2,
            0xfd, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3,
            // UDP 40000 -> 8472, length, checksum
            0x9c, 0x40, 0x21, 0x18, 0x00, udp_len, (check >> 8) as u8, check as u8,
            // VXLAN: I flag, VNI 1
            0x08, 0, 0, 0, 0, 0, 1, 0,
            // inner Ethernet: remote v6 VTEP MAC <- ours, IPv6
            0x7a, 0x01, 0x9e, 0x55, 0x20, 0x0b, 0x0a, 0x58, 0, 0, 0, 2, 0x86, 0xdd,
        ];
        assert_eq!(h.bytes, expected);
        assert_ne!(check, 0);
        assert!(receiver_accepts(&h, &inner));
    }

    #[test]
    fn the_checksum_is_right_for_every_upper_layer_we_encapsulate() {
        let mut tcp = [0u8; 20 + 1000];
        tcp[12] = 0x50;
        tcp[13] = 0x18;
        for (i, b) in tcp[20..].iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let mut udp = [0u8; 8 + 333];
        udp[4..6].copy_from_slice(&341u16.to_be_bytes());
        udp[8..].fill(0xff);
        let cases = [
            inner_packet(IPPROTO_TCP, 0xb9, &tcp, 16),
            inner_packet(IPPROTO_UDP, 0x00, &udp, 6),
            inner_packet(IPPROTO_ICMPV6, 0x03, &[129, 0, 0, 0, 0xff, 0xff, 0, 9], 2),
        ];
        for inner in &cases {
            let h = encapsulate(inner);
            assert!(receiver_accepts(&h, inner), "{:02x?}", &inner[..48]);
        }
    }

    #[test]
    fn the_traffic_class_keeps_ecn_and_drops_dscp() {
        let inner = inner_packet(IPPROTO_ICMPV6, 0xb9, &[128, 0, 0, 0, 0, 1, 0, 1], 2);
        let h = encapsulate(&inner);
        // EF with ECT(1) inside: DSCP 0 and ECT(1) outside.
        let tc = (h.bytes[Encap6Header::IP] << 4) | (h.bytes[Encap6Header::IP + 1] >> 4);
        assert_eq!(tc, 0x01);
        let inner = inner_packet(IPPROTO_ICMPV6, 0x03, &[128, 0, 0, 0, 0, 1, 0, 1], 2);
        let h = encapsulate(&inner);
        let tc = (h.bytes[Encap6Header::IP] << 4) | (h.bytes[Encap6Header::IP + 1] >> 4);
        assert_eq!(tc, 0x02, "CE is sent as ECT(0)");
        assert!(receiver_accepts(&h, &inner));
    }

    #[test]
    fn a_zero_checksum_is_sent_as_all_ones() {
        // Search flow labels for a header whose checksum computes to 0.
        let inner = inner_packet(IPPROTO_ICMPV6, 0, &[128, 0, 0, 0, 0, 1, 0, 1], 2);
        let (cfg, cfg6) = node();
        let mut hdr = [0u8; IPV6_HDR_LEN];
        hdr.copy_from_slice(&inner[..IPV6_HDR_LEN]);
        let found = (0..=0xffffu16).find_map(|port| {
            let h = build_encap6_header(&cfg, &cfg6, &remote(), &hdr, port, 0);
            let c = u16::from_be_bytes([
                h.bytes[Encap6Header::UDP + 6],
                h.bytes[Encap6Header::UDP + 7],
            ]);
            (c == 0xffff).then_some(h)
        });
        let h = found.expect("some source port sums to 0");
        assert!(receiver_accepts(&h, &inner));
    }

    #[test]
    fn the_flow_label_is_the_kernels_rotation_cut_to_20_bits() {
        assert_eq!(outer_flow_label(0x1234_5678), 0x5678_1234 & 0xfffff);
        assert_eq!(outer_flow_label(0), 0);
    }
}
