//! IPv6 egress classification: should a frame leaving `flannel-v6.<VNI>`
//! be encapsulated by the program, or continue to the kernel's vxlan device?

use crate::{
    consts::{
        ETH_HDR_LEN, ETH_P_IPV6, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, IPV6_HDR_LEN,
        UDP_HDR_LEN, VXLAN6_ENCAP_LEN,
    },
    counters::Reason,
    egress::{EgressPacket, EgressVerdict},
    encap6::EncapPlan6,
    maps::{NodeConfig, NodeConfig6, RemoteVtep6},
};

/// Bytes the program copies from the start of the frame: Ethernet, the
/// fixed IPv6 header and the first 8 bytes of the upper layer (a UDP
/// header, whose checksum must not be 0). Shorter frames are left to the
/// kernel.
pub const EGRESS6_WINDOW_LEN: usize = ETH_HDR_LEN + IPV6_HDR_LEN + UDP_HDR_LEN;
pub type Egress6Window = [u8; EGRESS6_WINDOW_LEN];

/// Classifies a frame leaving `flannel-v6.<VNI>`. `route` looks the inner
/// destination up in REMOTE_SUBNETS6.
pub fn classify_egress6(
    w: &Egress6Window,
    pkt: EgressPacket,
    cfg: &NodeConfig,
    cfg6: &NodeConfig6,
    route: impl FnOnce([u8; 16]) -> Option<RemoteVtep6>,
) -> EgressVerdict<EncapPlan6> {
    use EgressVerdict::{Drop, Encap, Pass};

    if cfg.configured == 0 || cfg6.configured == 0 {
        return Pass(Reason::PassNotConfigured);
    }
    if pkt.len < ETH_HDR_LEN as u32 {
        return Drop(Reason::DropMalformed);
    }
    if u16::from_be_bytes([w[12], w[13]]) != ETH_P_IPV6 {
        return Pass(Reason::PassIpv6Unusual);
    }
    let l3_len = pkt.len - ETH_HDR_LEN as u32;
    let payload = u32::from(u16::from_be_bytes([w[18], w[19]]));
    if l3_len < IPV6_HDR_LEN as u32 || w[14] >> 4 != 6 || IPV6_HDR_LEN as u32 + payload > l3_len {
        return Drop(Reason::DropMalformed);
    }
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&w[38..54]);
    let Some(remote) = route(dst) else {
        return Pass(Reason::PassNoRoute);
    };
    if pkt.gso {
        return Pass(Reason::PassGso6);
    }
    // The outer checksum is derived from the inner one (see `encap6`): only
    // an upper layer right behind the fixed header, whose checksum covers a
    // pseudo-header, and which fills the frame exactly.
    let upper = w[20];
    let checksummed = match upper {
        IPPROTO_TCP | IPPROTO_ICMPV6 => true,
        // A UDP checksum of 0 means "none" (refused over IPv6, RFC 8200,
        // but a sender may still send it; the kernel's path decides).
        IPPROTO_UDP => l3_len >= (IPV6_HDR_LEN + UDP_HDR_LEN) as u32 && (w[60] | w[61]) != 0,
        _ => false,
    };
    if !checksummed
        || IPV6_HDR_LEN as u32 + payload != l3_len
        || pkt.len < EGRESS6_WINDOW_LEN as u32
    {
        return Pass(Reason::PassIpv6Unusual);
    }
    // As over IPv4: what does not fit the underlay goes to the kernel
    // device (which fragments the outer packet) rather than being dropped.
    let outer_len = l3_len + VXLAN6_ENCAP_LEN;
    if outer_len > u32::from(u16::MAX) || (cfg.underlay_mtu != 0 && outer_len > cfg.underlay_mtu) {
        return Pass(Reason::PassTooBig);
    }
    Encap(EncapPlan6 { remote })
}

/// The inner IPv6 header in the window, which the outer headers are built from.
pub fn inner_header(w: &Egress6Window) -> &[u8; IPV6_HDR_LEN] {
    let (_, rest) = w.split_at(ETH_HDR_LEN);
    let (header, _) = rest.split_at(IPV6_HDR_LEN);
    // Constant lengths: the conversion cannot fail.
    header.try_into().unwrap_or(&[0; IPV6_HDR_LEN])
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: [u8; 16] = [0xfd, 0x10, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 2];

    fn nodes() -> (NodeConfig, NodeConfig6) {
        let cfg = NodeConfig {
            vni: 1,
            underlay_mtu: 1500,
            port: 8472,
            configured: 1,
            ..NodeConfig::default()
        };
        let cfg6 = NodeConfig6 {
            configured: 1,
            ..NodeConfig6::default()
        };
        (cfg, cfg6)
    }

    const PEER: RemoteVtep6 = RemoteVtep6 {
        vtep_mac: [2, 0, 0, 0, 0, 3],
        _pad: [0; 2],
        public_ip: [0xfd, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3],
        peer: [192, 168, 64, 3],
    };

    /// Routes fd10:0:0:7::/64 to PEER.
    fn route(dst: [u8; 16]) -> Option<RemoteVtep6> {
        (dst[..8] == POD[..8]).then_some(PEER)
    }

    /// A frame of `payload` upper-layer bytes of protocol `next`.
    fn frame(next: u8, payload: u16) -> (Egress6Window, EgressPacket) {
        let mut w = [0u8; EGRESS6_WINDOW_LEN];
        w[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
        w[14] = 0x60;
        w[18..20].copy_from_slice(&payload.to_be_bytes());
        w[20] = next;
        w[21] = 64;
        w[38..54].copy_from_slice(&POD);
        w[60] = 0x12; // a UDP checksum
        let len = 14 + 40 + u32::from(payload);
        (w, EgressPacket { len, gso: false })
    }

    fn classify(w: &Egress6Window, pkt: EgressPacket) -> EgressVerdict<EncapPlan6> {
        let (cfg, cfg6) = nodes();
        classify_egress6(w, pkt, &cfg, &cfg6, route)
    }

    #[test]
    fn encapsulates_tcp_udp_and_icmpv6_to_a_remote_subnet() {
        for next in [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6] {
            let (w, pkt) = frame(next, 64);
            let EgressVerdict::Encap(plan) = classify(&w, pkt) else {
                panic!("{next}: {:?}", classify(&w, pkt));
            };
            assert_eq!(plan.remote, PEER);
            assert_eq!(inner_header(&w)[..], w[14..54]);
        }
    }

    #[test]
    fn leaves_what_it_cannot_checksum_to_the_kernel() {
        // A hop-by-hop header (0), a fragment header (44), ESP (50).
        for next in [0, 44, 50] {
            let (w, pkt) = frame(next, 64);
            assert_eq!(
                classify(&w, pkt),
                EgressVerdict::Pass(Reason::PassIpv6Unusual)
            );
        }
        let (mut w, pkt) = frame(IPPROTO_UDP, 64);
        w[60] = 0;
        assert_eq!(
            classify(&w, pkt),
            EgressVerdict::Pass(Reason::PassIpv6Unusual)
        );
        // Trailing bytes behind the payload length.
        let (w, mut pkt) = frame(IPPROTO_TCP, 64);
        pkt.len += 2;
        assert_eq!(
            classify(&w, pkt),
            EgressVerdict::Pass(Reason::PassIpv6Unusual)
        );
    }

    #[test]
    fn gso_aggregates_and_big_packets_go_to_the_kernel_device() {
        let (w, mut pkt) = frame(IPPROTO_TCP, 30000);
        pkt.gso = true;
        assert_eq!(classify(&w, pkt), EgressVerdict::Pass(Reason::PassGso6));
        // 1430 bytes of IPv6 fit 1500 with 70 of overhead; 1431 do not.
        let (w, pkt) = frame(IPPROTO_TCP, 1390);
        assert!(matches!(classify(&w, pkt), EgressVerdict::Encap(_)));
        let (w, pkt) = frame(IPPROTO_TCP, 1391);
        assert_eq!(classify(&w, pkt), EgressVerdict::Pass(Reason::PassTooBig));
    }

    #[test]
    fn no_route_unconfigured_and_garbage() {
        let (mut w, pkt) = frame(IPPROTO_TCP, 64);
        w[53] ^= 0xff;
        assert!(
            matches!(classify(&w, pkt), EgressVerdict::Encap(_)),
            "same /64"
        );
        w[45] ^= 0xff;
        assert_eq!(classify(&w, pkt), EgressVerdict::Pass(Reason::PassNoRoute));
        let (w, pkt) = frame(IPPROTO_TCP, 64);
        let (cfg, _) = nodes();
        assert_eq!(
            classify_egress6(&w, pkt, &cfg, &NodeConfig6::default(), route),
            EgressVerdict::Pass(Reason::PassNotConfigured)
        );
        // The payload length claims more than the frame has.
        let (w, mut pkt) = frame(IPPROTO_TCP, 64);
        pkt.len -= 1;
        assert_eq!(
            classify(&w, pkt),
            EgressVerdict::Drop(Reason::DropMalformed)
        );
        let (mut w, pkt) = frame(IPPROTO_TCP, 64);
        w[14] = 0x45;
        assert_eq!(
            classify(&w, pkt),
            EgressVerdict::Drop(Reason::DropMalformed)
        );
        let (mut w, pkt) = frame(IPPROTO_TCP, 64);
        w[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(
            classify(&w, pkt),
            EgressVerdict::Pass(Reason::PassIpv6Unusual)
        );
    }
}
