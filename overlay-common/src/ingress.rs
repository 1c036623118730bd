//! Ingress classification: is a frame arriving on the underlay VXLAN for this
//! node that the program may decapsulate, something to drop, or none of our
//! business?

use crate::{
    consts::{
        ETH_HDR_LEN, ETH_P_IP, IPPROTO_UDP, IPV4_HDR_LEN, UDP_HDR_LEN, VXLAN_ENCAP_LEN,
        VXLAN_FLAG_I, VXLAN_HDR_LEN,
    },
    counters::Reason,
    maps::NodeConfig,
};

/// Outer Ethernet + IPv4 + UDP + VXLAN + inner Ethernet, when the outer IPv4
/// header has no options.
pub const INGRESS_WINDOW_LEN: usize =
    ETH_HDR_LEN + IPV4_HDR_LEN + UDP_HDR_LEN + VXLAN_HDR_LEN + ETH_HDR_LEN;
pub type IngressWindow = [u8; INGRESS_WINDOW_LEN];

/// Where the UDP header starts in the window. The program copies the first
/// [`INGRESS_TAIL_OFFSET`] bytes (Ethernet and the fixed IPv4 header) from the
/// start of the frame and the rest from [`outer_l4_offset`], so that the window
/// always shows UDP, VXLAN and the inner Ethernet header at fixed offsets,
/// even behind IPv4 options.
pub const INGRESS_TAIL_OFFSET: usize = ETH_HDR_LEN + IPV4_HDR_LEN;
/// Length of the part copied from [`outer_l4_offset`].
pub const INGRESS_TAIL_LEN: usize = INGRESS_WINDOW_LEN - INGRESS_TAIL_OFFSET;

/// Offsets of the fields the programs use, inside the window.
pub const UDP_OFFSET: usize = INGRESS_TAIL_OFFSET;
pub const VXLAN_OFFSET: usize = UDP_OFFSET + UDP_HDR_LEN;
pub const INNER_ETH_OFFSET: usize = VXLAN_OFFSET + VXLAN_HDR_LEN;

/// The smallest frame that can be decapsulated: the outer headers, the inner
/// Ethernet header and a minimal inner IPv4 header.
pub const MIN_DECAP_FRAME_LEN: u32 = (INGRESS_WINDOW_LEN + IPV4_HDR_LEN) as u32;

/// Offset in the frame of the outer UDP header, from the IPv4 version/IHL byte
/// (`window[14]`). Garbage IHL values give garbage offsets that the classifier
/// rejects; the result is at most 14 + 60.
pub const fn outer_l4_offset(ver_ihl: u8) -> usize {
    ETH_HDR_LEN + (ver_ihl & 0x0f) as usize * 4
}

/// What the program knows about the frame besides the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IngressPacket {
    /// The frame's length, outer Ethernet header included (`skb->len`, or
    /// `data_end - data` in XDP).
    pub len: u32,
    /// A GSO aggregate (`skb->gso_size != 0`): GRO merged several VXLAN
    /// packets, or a local sender's TSO packet arrived unsegmented over a veth.
    pub gso: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngressVerdict {
    /// Remove the outer headers (50 bytes, 70 over IPv6) and deliver on
    /// `flannel.<VNI>` (`flannel-v6.<VNI>`). The inner
    /// Ethernet header is given so that TC (which keeps the outer Ethernet
    /// header's position) can write it in front of the inner packet.
    Decap { inner_eth: [u8; ETH_HDR_LEN] },
    /// Leave the frame to the kernel unchanged.
    Pass(Reason),
    /// Drop it.
    Drop(Reason),
}

/// Classifies a frame arriving on the underlay. `known_vtep` answers whether a
/// public IPv4 (network order) holds a lease. `decap_gso` says whether the
/// caller can decapsulate GSO aggregates (TC can on kernels where
/// `bpf_skb_adjust_room` keeps them consistent); if not they are passed to
/// the kernel's vxlan device once the sender has been checked.
pub fn classify_ingress(
    w: &IngressWindow,
    pkt: IngressPacket,
    cfg: &NodeConfig,
    decap_gso: bool,
    known_vtep: impl FnOnce([u8; 4]) -> bool,
) -> IngressVerdict {
    use IngressVerdict::{Drop, Pass};

    if cfg.configured == 0 {
        return Pass(Reason::PassNotConfigured);
    }
    // Not UDP over IPv4: untouched, whatever it is (the kernel drops what is
    // malformed).
    if pkt.len < INGRESS_TAIL_OFFSET as u32
        || u16::from_be_bytes([w[12], w[13]]) != ETH_P_IP
        || w[14] >> 4 != 4
        || w[23] != IPPROTO_UDP
    {
        return Pass(Reason::PassNotOurs);
    }
    let dst = [w[30], w[31], w[32], w[33]];
    let to_us = dst == cfg.local_ip;
    // The kernel's vxlan socket listens on every address, so VXLAN sent to
    // a multicast group or the limited broadcast reaches it too: the sender
    // is checked for those as well. Other destinations are either another
    // local address (which the program cannot tell from transit traffic;
    // the host firewall's input chain checks those, see the agent's
    // `vtep_guard`) or not for this node at all, and are left alone.
    if !to_us && !is_multicast_or_broadcast(dst) {
        return Pass(Reason::PassNotOurs);
    }
    let header_len = u32::from(w[14] & 0x0f) * 4;
    let frag = u16::from_be_bytes([w[20], w[21]]);
    let more_fragments = frag & 0x2000 != 0;
    let frag_offset = frag & 0x1fff;
    if frag_offset != 0 {
        // A later fragment has no UDP header to look at. Without the first
        // fragment (checked below) the kernel cannot reassemble it.
        return Pass(if to_us {
            Reason::PassOuterIpUnusual
        } else {
            Reason::PassNotOurs
        });
    }
    if header_len < IPV4_HDR_LEN as u32
        || pkt.len < ETH_HDR_LEN as u32 + header_len + UDP_HDR_LEN as u32
        || u16::from_be_bytes([w[UDP_OFFSET + 2], w[UDP_OFFSET + 3]]) != cfg.port
    {
        return Pass(Reason::PassNotOurs);
    }

    // Our port from here on. flannel's kernel device accepts VXLAN from anyone;
    // we accept it only from nodes that hold a lease.
    if !known_vtep([w[26], w[27], w[28], w[29]]) {
        return Drop(Reason::DropUnknownVtep);
    }
    if !to_us {
        // A peer's VXLAN to a group or broadcast (flannel never sends any):
        // the kernel device handles it as it would under flannel.
        return Pass(Reason::PassNotOurs);
    }
    if header_len != IPV4_HDR_LEN as u32 || more_fragments {
        // From a peer, but not at the offsets we decapsulate: the kernel's
        // vxlan device (which reassembles and skips options) takes it.
        return Pass(Reason::PassOuterIpUnusual);
    }

    let total_len = u32::from(u16::from_be_bytes([w[16], w[17]]));
    let udp_len = u32::from(u16::from_be_bytes([w[UDP_OFFSET + 4], w[UDP_OFFSET + 5]]));
    if pkt.len < MIN_DECAP_FRAME_LEN
        || total_len + ETH_HDR_LEN as u32 > pkt.len
        || total_len < MIN_DECAP_FRAME_LEN - ETH_HDR_LEN as u32
        || udp_len != total_len - IPV4_HDR_LEN as u32
    {
        return Drop(Reason::DropMalformed);
    }

    classify_vxlan(
        w,
        VXLAN_OFFSET,
        Inner {
            vni: cfg.vni,
            ethertype: ETH_P_IP,
            vtep_mac: cfg.vtep_mac,
        },
        pkt.gso && !decap_gso,
    )
}

/// What the inner frame of our VXLAN must be: our VNI, the family the
/// device carries, framed to the device's MAC.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Inner {
    pub vni: u32,
    pub ethertype: u16,
    pub vtep_mac: [u8; 6],
}

/// The VXLAN header at `vx` in `w` and the inner Ethernet header right
/// behind it, from a known VTEP to our address and port (both families).
/// `gso_to_kernel`: a GSO aggregate the caller leaves to the kernel device.
#[inline(always)]
pub(crate) fn classify_vxlan<const N: usize>(
    w: &[u8; N],
    vx: usize,
    inner: Inner,
    gso_to_kernel: bool,
) -> IngressVerdict {
    use IngressVerdict::{Decap, Drop, Pass};

    if vx + VXLAN_HDR_LEN + ETH_HDR_LEN > N {
        return Drop(Reason::DropMalformed);
    }
    if w[vx] & VXLAN_FLAG_I == 0 {
        return Drop(Reason::DropWrongVni);
    }
    // Any other flag or reserved bit set is an extension (GBP, GPE, ...)
    // flannel never enables; the kernel device drops those too.
    if w[vx] != VXLAN_FLAG_I || w[vx + 1] != 0 || w[vx + 2] != 0 || w[vx + 3] != 0 || w[vx + 7] != 0
    {
        return Drop(Reason::DropMalformed);
    }
    let vni = u32::from_be_bytes([0, w[vx + 4], w[vx + 5], w[vx + 6]]);
    if vni != inner.vni {
        return Drop(Reason::DropWrongVni);
    }

    let ie = vx + VXLAN_HDR_LEN;
    if u16::from_be_bytes([w[ie + 12], w[ie + 13]]) != inner.ethertype {
        // ARP and the like: the kernel device handles them as under flannel.
        return Pass(Reason::PassInnerNotIpv4);
    }
    if [w[ie], w[ie + 1], w[ie + 2], w[ie + 3], w[ie + 4], w[ie + 5]] != inner.vtep_mac {
        // The kernel device would deliver it as PACKET_OTHERHOST and IP would
        // drop it; do the same, visibly.
        return Drop(Reason::DropWrongInnerMac);
    }
    if gso_to_kernel {
        return Pass(Reason::PassGsoTunnel);
    }

    let mut inner_eth = [0u8; ETH_HDR_LEN];
    inner_eth.copy_from_slice(&w[ie..ie + ETH_HDR_LEN]);
    Decap { inner_eth }
}

/// 224.0.0.0/4 and 255.255.255.255, whose datagrams the kernel delivers to a
/// socket bound to the wildcard address.
const fn is_multicast_or_broadcast(ip: [u8; 4]) -> bool {
    ip[0] & 0xf0 == 0xe0 || (ip[0] == 0xff && ip[1] == 0xff && ip[2] == 0xff && ip[3] == 0xff)
}

/// What decapsulation removes: everything between the outer and the inner
/// Ethernet headers' payloads.
pub const DECAP_LEN: u32 = VXLAN_ENCAP_LEN;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encap::build_encap_header, maps::RemoteVtep};

    const LOCAL_IP: [u8; 4] = [192, 168, 64, 2];
    const PEER_IP: [u8; 4] = [192, 168, 64, 3];
    const LOCAL_MAC: [u8; 6] = [0x0a, 0x58, 0, 0, 0, 2];
    const PEER_MAC: [u8; 6] = [0x0a, 0x58, 0, 0, 0, 3];

    fn node() -> NodeConfig {
        NodeConfig {
            vni: 1,
            local_ip: LOCAL_IP,
            underlay_ifindex: 2,
            vxlan_ifindex: 5,
            underlay_mtu: 1500,
            vtep_mac: LOCAL_MAC,
            port: 8472,
            configured: 1,
        }
    }

    /// A VXLAN frame as the peer (whose config is `node()` mirrored) sends it,
    /// built with the egress builder: the two sides must agree.
    fn from_peer(inner_len: u16) -> (IngressWindow, IngressPacket) {
        let peer = NodeConfig {
            local_ip: PEER_IP,
            vtep_mac: PEER_MAC,
            ..node()
        };
        let us = RemoteVtep {
            vtep_mac: LOCAL_MAC,
            _pad: [0; 2],
            public_ip: LOCAL_IP,
        };
        let h = build_encap_header(&peer, &us, inner_len, 0, 45000, 7);
        let mut w = [0u8; INGRESS_WINDOW_LEN];
        w[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0xaa]); // underlay MACs
        w[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0xbb]);
        w[12..].copy_from_slice(&h.bytes);
        let pkt = IngressPacket {
            len: u32::from(inner_len) + 64,
            gso: false,
        };
        (w, pkt)
    }

    fn known(ip: [u8; 4]) -> bool {
        ip == PEER_IP
    }

    fn classify(w: &IngressWindow, pkt: IngressPacket) -> IngressVerdict {
        classify_ingress(w, pkt, &node(), false, known)
    }

    #[test]
    fn decapsulates_what_a_peer_encapsulated() {
        let (w, pkt) = from_peer(84);
        let mut inner_eth = [0u8; 14];
        inner_eth[0..6].copy_from_slice(&LOCAL_MAC);
        inner_eth[6..12].copy_from_slice(&PEER_MAC);
        inner_eth[12..14].copy_from_slice(&[0x08, 0x00]);
        assert_eq!(classify(&w, pkt), IngressVerdict::Decap { inner_eth });
    }

    #[test]
    fn drops_unknown_sources_before_looking_further() {
        let (mut w, pkt) = from_peer(84);
        w[26..30].copy_from_slice(&[192, 168, 64, 66]);
        assert_eq!(
            classify(&w, pkt),
            IngressVerdict::Drop(Reason::DropUnknownVtep)
        );
        // Even when the rest is garbage or unusual.
        w[46] = 0xff;
        assert_eq!(
            classify(&w, pkt),
            IngressVerdict::Drop(Reason::DropUnknownVtep)
        );
        let mut first_fragment = w;
        first_fragment[20] = 0x20;
        assert_eq!(
            classify(&first_fragment, pkt),
            IngressVerdict::Drop(Reason::DropUnknownVtep)
        );
        let mut with_options = w;
        with_options[14] = 0x46;
        let r = classify(
            &with_options,
            IngressPacket {
                len: pkt.len + 4,
                ..pkt
            },
        );
        assert_eq!(r, IngressVerdict::Drop(Reason::DropUnknownVtep));
    }

    #[test]
    fn drops_wrong_vni_and_missing_i_flag() {
        let (mut w, pkt) = from_peer(84);
        w[VXLAN_OFFSET + 6] = 2;
        assert_eq!(
            classify(&w, pkt),
            IngressVerdict::Drop(Reason::DropWrongVni)
        );
        let (mut w, pkt) = from_peer(84);
        w[VXLAN_OFFSET] = 0;
        assert_eq!(
            classify(&w, pkt),
            IngressVerdict::Drop(Reason::DropWrongVni)
        );
    }

    #[test]
    fn drops_extension_bits() {
        for (offset, value) in [(0, 0x88), (1, 0x01), (3, 0x01), (7, 0x01)] {
            let (mut w, pkt) = from_peer(84);
            w[VXLAN_OFFSET + offset] |= value;
            assert_eq!(
                classify(&w, pkt),
                IngressVerdict::Drop(Reason::DropMalformed),
                "byte {offset}"
            );
        }
    }

    #[test]
    fn passes_what_is_not_ours() {
        let (w, pkt) = from_peer(84);
        let mut other_port = w;
        other_port[UDP_OFFSET + 2..UDP_OFFSET + 4].copy_from_slice(&4789u16.to_be_bytes());
        let mut other_dst = w;
        other_dst[33] = 9;
        let mut tcp = w;
        tcp[23] = 6;
        let mut arp = w;
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let mut ipv6 = w;
        ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
        let mut not_v4 = w;
        not_v4[14] = 0x65;
        let mut bad_ihl = w;
        bad_ihl[14] = 0x44;
        for (name, w) in [
            ("port", other_port),
            ("dst", other_dst),
            ("tcp", tcp),
            ("arp", arp),
            ("ipv6", ipv6),
            ("version", not_v4),
            ("ihl", bad_ihl),
        ] {
            assert_eq!(
                classify(&w, pkt),
                IngressVerdict::Pass(Reason::PassNotOurs),
                "{name}"
            );
        }
    }

    #[test]
    fn strangers_are_dropped_also_when_sending_to_a_group_or_broadcast() {
        let (w, pkt) = from_peer(84);
        for (name, dst) in [
            ("us", LOCAL_IP),
            ("all-hosts", [224, 0, 0, 1]),
            ("a group", [239, 1, 2, 3]),
            ("broadcast", [255, 255, 255, 255]),
        ] {
            let mut w = w;
            w[30..34].copy_from_slice(&dst);
            assert_eq!(
                classify_ingress(&w, pkt, &node(), false, |_| false),
                IngressVerdict::Drop(Reason::DropUnknownVtep),
                "{name}"
            );
            if dst != LOCAL_IP {
                // A peer's goes to the kernel, undecapsulated.
                assert_eq!(
                    classify(&w, pkt),
                    IngressVerdict::Pass(Reason::PassNotOurs),
                    "{name}"
                );
                // As does a later fragment, which has no port to check.
                let mut later = w;
                later[20..22].copy_from_slice(&0x00b9u16.to_be_bytes());
                assert_eq!(
                    classify_ingress(&later, pkt, &node(), false, |_| false),
                    IngressVerdict::Pass(Reason::PassNotOurs),
                    "{name}"
                );
            }
        }
        // Another unicast address: transit, or a local one the host firewall checks.
        let mut other = w;
        other[30..34].copy_from_slice(&[192, 168, 64, 200]);
        assert_eq!(
            classify_ingress(&other, pkt, &node(), false, |_| false),
            IngressVerdict::Pass(Reason::PassNotOurs)
        );
    }

    #[test]
    fn passes_inner_non_ipv4_from_peers() {
        let (mut w, pkt) = from_peer(28);
        w[INNER_ETH_OFFSET + 12..INNER_ETH_OFFSET + 14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(
            classify(&w, pkt),
            IngressVerdict::Pass(Reason::PassInnerNotIpv4)
        );
    }

    #[test]
    fn drops_inner_frames_for_another_mac() {
        let (mut w, pkt) = from_peer(84);
        w[INNER_ETH_OFFSET..INNER_ETH_OFFSET + 6].copy_from_slice(&[0xff; 6]);
        assert_eq!(
            classify(&w, pkt),
            IngressVerdict::Drop(Reason::DropWrongInnerMac)
        );
    }

    #[test]
    fn fragments_and_options_from_peers_go_to_the_kernel() {
        let (w, pkt) = from_peer(84);
        let mut first = w;
        first[20] = 0x20;
        assert_eq!(
            classify(&first, pkt),
            IngressVerdict::Pass(Reason::PassOuterIpUnusual)
        );
        let mut later = w;
        later[20..22].copy_from_slice(&0x00b9u16.to_be_bytes());
        later[26] = 1; // even from a stranger: there is no port to look at
        assert_eq!(
            classify(&later, pkt),
            IngressVerdict::Pass(Reason::PassOuterIpUnusual)
        );
        let mut options = w;
        options[14] = 0x46;
        let r = classify(
            &options,
            IngressPacket {
                len: pkt.len + 4,
                ..pkt
            },
        );
        assert_eq!(r, IngressVerdict::Pass(Reason::PassOuterIpUnusual));
    }

    #[test]
    fn truncated_and_inconsistent_frames() {
        let (w, pkt) = from_peer(84);
        // Cut inside the outer headers: the UDP port may still be readable.
        for len in [0, 14, 33] {
            let r = classify(&w, IngressPacket { len, ..pkt });
            assert_eq!(r, IngressVerdict::Pass(Reason::PassNotOurs), "len {len}");
        }
        for len in [42, 50, 63, 64, 83, pkt.len - 1] {
            let r = classify(&w, IngressPacket { len, ..pkt });
            assert_eq!(r, IngressVerdict::Drop(Reason::DropMalformed), "len {len}");
        }
        // Trailing bytes beyond the IPv4 total length are tolerated.
        assert!(matches!(
            classify(
                &w,
                IngressPacket {
                    len: pkt.len + 6,
                    ..pkt
                }
            ),
            IngressVerdict::Decap { .. }
        ));
        let mut udp_len = w;
        udp_len[UDP_OFFSET + 5] ^= 1;
        assert_eq!(
            classify(&udp_len, pkt),
            IngressVerdict::Drop(Reason::DropMalformed)
        );
    }

    #[test]
    fn gso_aggregates_follow_the_callers_ability() {
        let (w, pkt) = from_peer(20000);
        let gso = IngressPacket { gso: true, ..pkt };
        assert_eq!(
            classify_ingress(&w, gso, &node(), false, known),
            IngressVerdict::Pass(Reason::PassGsoTunnel)
        );
        assert!(matches!(
            classify_ingress(&w, gso, &node(), true, known),
            IngressVerdict::Decap { .. }
        ));
        // The sender is still checked first.
        assert_eq!(
            classify_ingress(&w, gso, &node(), false, |_| false),
            IngressVerdict::Drop(Reason::DropUnknownVtep)
        );
    }

    #[test]
    fn passes_everything_until_configured() {
        let (w, pkt) = from_peer(84);
        let cfg = NodeConfig {
            configured: 0,
            ..node()
        };
        assert_eq!(
            classify_ingress(&w, pkt, &cfg, false, known),
            IngressVerdict::Pass(Reason::PassNotConfigured)
        );
    }

    #[test]
    fn l4_offset_follows_ihl() {
        assert_eq!(outer_l4_offset(0x45), 34);
        assert_eq!(outer_l4_offset(0x4f), 74);
    }
}
