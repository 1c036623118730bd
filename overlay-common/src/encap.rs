//! The headers written in front of an inner IPv4 packet, byte for byte what the
//! kernel vxlan device flannel creates would send.
//!
//! Egress makes room with `bpf_skb_adjust_room(+50, BPF_ADJ_ROOM_MAC, ...)`, which
//! keeps the frame's Ethernet header in front (it becomes the outer one) and
//! opens 50 bytes after it. [`EncapHeader`] covers the outer EtherType and those
//! 50 bytes, so one store at [`EncapHeader::OFFSET`] writes everything.

use crate::{
    checksum::ipv4_header_checksum,
    consts::{
        ETH_HDR_LEN, ETH_P_IP, IPPROTO_UDP, IPV4_HDR_LEN, OUTER_TTL, UDP_HDR_LEN, VXLAN_ENCAP_LEN,
        VXLAN_FLAG_I, VXLAN_HDR_LEN,
    },
    maps::{NodeConfig, RemoteVtep},
};

/// ECN codepoints (RFC 3168).
const ECN_MASK: u8 = 0b11;
const ECN_ECT_0: u8 = 0b10;
const ECN_CE: u8 = 0b11;

/// The outer TOS the kernel vxlan device sets when no `tos` is configured (as
/// under flannel): DSCP 0 and the inner ECN bits, with CE sent as ECT(0)
/// (`INET_ECN_encapsulate()`, RFC 6040 compatibility mode).
pub const fn outer_tos(inner_tos: u8) -> u8 {
    let ecn = inner_tos & ECN_MASK;
    if ecn == ECN_CE { ECN_ECT_0 } else { ecn }
}

/// The outer EtherType followed by outer IPv4 + UDP + VXLAN + inner Ethernet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncapHeader {
    pub bytes: [u8; Self::LEN],
}

impl EncapHeader {
    /// Where [`Self::bytes`] go in the encapsulated frame: at the outer EtherType.
    pub const OFFSET: usize = ETH_HDR_LEN - 2;
    pub const LEN: usize = 2 + VXLAN_ENCAP_LEN as usize;

    /// Offsets inside [`Self::bytes`].
    pub const IP: usize = 2;
    pub const UDP: usize = Self::IP + IPV4_HDR_LEN;
    pub const VXLAN: usize = Self::UDP + UDP_HDR_LEN;
    pub const INNER_ETH: usize = Self::VXLAN + VXLAN_HDR_LEN;

    /// The outer IPv4 header.
    pub fn outer_ipv4(&self) -> [u8; IPV4_HDR_LEN] {
        let mut ip = [0u8; IPV4_HDR_LEN];
        ip.copy_from_slice(&self.bytes[Self::IP..Self::UDP]);
        ip
    }
}

/// What the egress classifier decided to encapsulate, and the values it read
/// from the inner packet that the outer headers depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncapPlan {
    pub remote: RemoteVtep,
    /// Length of the inner IPv4 packet (everything after the inner Ethernet
    /// header, as the skb holds it; for a GSO packet the whole aggregate).
    pub inner_len: u16,
    /// The inner IPv4 TOS byte (DSCP + ECN).
    pub inner_tos: u8,
}

impl EncapPlan {
    /// Builds the header for this packet. `src_port` comes from
    /// [`crate::flow::vxlan_src_port`]; `ip_id` is the outer IPv4 identification
    /// (the kernel uses a per-destination pseudo-random sequence; any value that
    /// varies between packets serves, as DF is clear).
    pub fn header(&self, cfg: &NodeConfig, src_port: u16, ip_id: u16) -> EncapHeader {
        build_encap_header(
            cfg,
            &self.remote,
            self.inner_len,
            self.inner_tos,
            src_port,
            ip_id,
        )
    }
}

/// Builds the outer EtherType, IPv4, UDP, VXLAN and inner Ethernet headers for
/// an inner IPv4 packet of `inner_len` bytes. The caller guarantees
/// `inner_len + 50 <= 65535` (the egress classifier passes bigger packets to
/// the kernel); larger values wrap.
pub fn build_encap_header(
    cfg: &NodeConfig,
    remote: &RemoteVtep,
    inner_len: u16,
    inner_tos: u8,
    src_port: u16,
    ip_id: u16,
) -> EncapHeader {
    // Every byte is written below, zeros included, in word-sized pieces: the
    // initial zeroing is then dead code, and no run of single zero bytes is
    // left for LLVM to turn into a `memset` call (byte-wise on BPF).
    let mut b = [0u8; EncapHeader::LEN];
    let ip_total = inner_len.wrapping_add(VXLAN_ENCAP_LEN as u16);
    let udp_len = ip_total.wrapping_sub(IPV4_HDR_LEN as u16);

    b[0..2].copy_from_slice(&ETH_P_IP.to_be_bytes());

    let ip = EncapHeader::IP;
    // Version 4 with 5 words (no options), TOS, total length.
    b[ip..ip + 4].copy_from_slice(
        &(0x4500_0000 | u32::from(outer_tos(inner_tos)) << 16 | u32::from(ip_total)).to_be_bytes(),
    );
    // Identification; flags and fragment offset 0: no DF, as the kernel device
    // (df unset) sends, so an underlay with a smaller MTU fragments rather than drops.
    b[ip + 4..ip + 8].copy_from_slice(&(u32::from(ip_id) << 16).to_be_bytes());
    // TTL, protocol, checksum (filled in below).
    b[ip + 8..ip + 12].copy_from_slice(
        &(u32::from(OUTER_TTL) << 24 | u32::from(IPPROTO_UDP) << 16).to_be_bytes(),
    );
    b[ip + 12..ip + 16].copy_from_slice(&cfg.local_ip);
    b[ip + 16..ip + 20].copy_from_slice(&remote.public_ip);
    let mut ip_hdr = [0u8; IPV4_HDR_LEN];
    ip_hdr.copy_from_slice(&b[ip..ip + IPV4_HDR_LEN]);
    b[ip + 10..ip + 12].copy_from_slice(&ipv4_header_checksum(&ip_hdr).to_be_bytes());

    let udp = EncapHeader::UDP;
    b[udp..udp + 4]
        .copy_from_slice(&(u32::from(src_port) << 16 | u32::from(cfg.port)).to_be_bytes());
    // Checksum 0, as RFC 7348 recommends over IPv4 and every VXLAN receiver
    // (Linux's included) accepts. The kernel device flannel creates fills one
    // in (`udpcsum` is the kernel's default); doing that here would mean
    // summing the whole inner frame, which carries its own checksums.
    b[udp + 4..udp + 8].copy_from_slice(&(u32::from(udp_len) << 16).to_be_bytes());

    // Flags (I), 24 reserved bits, VNI, 8 reserved bits.
    let vx = EncapHeader::VXLAN;
    b[vx..vx + 8].copy_from_slice(
        &(u64::from(VXLAN_FLAG_I) << 56 | u64::from(cfg.vni & 0x00ff_ffff) << 8).to_be_bytes(),
    );

    let eth = EncapHeader::INNER_ETH;
    b[eth..eth + 6].copy_from_slice(&remote.vtep_mac);
    b[eth + 6..eth + 12].copy_from_slice(&cfg.vtep_mac);
    b[eth + 12..eth + 14].copy_from_slice(&ETH_P_IP.to_be_bytes());

    EncapHeader { bytes: b }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::ipv4_header_checksum_ok;

    pub(crate) fn node() -> NodeConfig {
        NodeConfig {
            vni: 0x00ab_cdef,
            local_ip: [192, 168, 64, 2],
            underlay_ifindex: 2,
            vxlan_ifindex: 5,
            underlay_mtu: 1500,
            vtep_mac: [0x0a, 0x58, 0x00, 0x00, 0x00, 0x02],
            port: 8472,
            configured: 1,
        }
    }

    fn remote() -> RemoteVtep {
        RemoteVtep {
            vtep_mac: [0xc6, 0xd2, 0x32, 0x6f, 0x8f, 0x44],
            _pad: [0; 2],
            public_ip: [192, 168, 64, 3],
        }
    }

    #[test]
    fn builds_the_exact_bytes() {
        let h = build_encap_header(&node(), &remote(), 84, 0x00, 40000, 0x1234);
        let ip_check = ipv4_header_checksum(&h.outer_ipv4());
        #[rustfmt::skip]
        let expected: [u8; 52] = [
            0x08, 0x00,
            // IPv4: 45, tos 0, total 84+50=134, id 0x1234, no flags, ttl 64, udp
            0x45, 0x00, 0x00, 134, 0x12, 0x34, 0x00, 0x00, 64, 17,
            (ip_check >> 8) as u8, ip_check as u8,
            192, 168, 64, 2, 192, 168, 64, 3,
            // UDP: 40000 -> 8472, length 134-20=114, checksum 0
            0x9c, 0x40, 0x21, 0x18, 0x00, 114, 0x00, 0x00,
            // VXLAN: I flag, VNI 0xabcdef
            0x08, 0, 0, 0, 0xab, 0xcd, 0xef, 0,
            // inner Ethernet: remote VTEP MAC <- local VTEP MAC, IPv4
            0xc6, 0xd2, 0x32, 0x6f, 0x8f, 0x44, 0x0a, 0x58, 0, 0, 0, 2, 0x08, 0x00,
        ];
        assert_eq!(h.bytes, expected);
        assert!(ipv4_header_checksum_ok(&h.outer_ipv4()));
    }

    #[test]
    fn checksum_matches_an_independent_sum() {
        let h = build_encap_header(&node(), &remote(), 1400, 0x02, 61000, 0xfffe);
        let ip = h.outer_ipv4();
        let mut sum = 0u32;
        for pair in ip.chunks(2) {
            sum += u32::from(pair[0]) << 8 | u32::from(pair[1]);
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff, "a valid header sums to all ones");
    }

    #[test]
    fn lengths_follow_the_inner_packet() {
        let h = build_encap_header(&node(), &remote(), 65485, 0, 1, 1);
        let ip = EncapHeader::IP;
        let udp = EncapHeader::UDP;
        assert_eq!(
            u16::from_be_bytes([h.bytes[ip + 2], h.bytes[ip + 3]]),
            65535
        );
        assert_eq!(
            u16::from_be_bytes([h.bytes[udp + 4], h.bytes[udp + 5]]),
            65515
        );
    }

    #[test]
    fn ecn_is_copied_and_dscp_is_not() {
        assert_eq!(outer_tos(0xb8), 0x00); // EF, Not-ECT
        assert_eq!(outer_tos(0xb9), 0x01); // EF, ECT(1)
        assert_eq!(outer_tos(0x02), 0x02); // ECT(0)
        assert_eq!(outer_tos(0x03), 0x02); // CE is not propagated outward
        let h = build_encap_header(&node(), &remote(), 84, 0x29, 1, 1);
        assert_eq!(h.bytes[EncapHeader::IP + 1], 0x01);
        assert!(ipv4_header_checksum_ok(&h.outer_ipv4()));
    }

    #[test]
    fn vni_uses_24_bits() {
        let mut cfg = node();
        cfg.vni = 1;
        let h = build_encap_header(&cfg, &remote(), 84, 0, 1, 1);
        let vx = EncapHeader::VXLAN;
        assert_eq!(h.bytes[vx..vx + 8], [0x08, 0, 0, 0, 0, 0, 1, 0]);
    }
}
