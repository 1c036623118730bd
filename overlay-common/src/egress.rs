//! Egress classification: should a frame leaving `flannel.<VNI>` be
//! encapsulated by the program, or continue to the kernel's vxlan device?

use crate::{
    consts::{ETH_HDR_LEN, ETH_P_IP, IPV4_HDR_LEN, VXLAN_ENCAP_LEN},
    counters::Reason,
    encap::EncapPlan,
    maps::{NodeConfig, RemoteVtep},
};

/// Bytes the program copies from the start of the frame: Ethernet + the fixed
/// IPv4 header. Shorter frames are copied as far as they go (the rest zero).
pub const EGRESS_WINDOW_LEN: usize = ETH_HDR_LEN + IPV4_HDR_LEN;
pub type EgressWindow = [u8; EGRESS_WINDOW_LEN];

/// What the program knows about the skb besides its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EgressPacket {
    /// `skb->len`: the whole frame, Ethernet header included.
    pub len: u32,
    /// `skb->gso_size != 0`: a TSO/GSO aggregate that is segmented after us
    /// (so its length is not what goes on the wire).
    pub gso: bool,
}

/// `P`: what encapsulation needs, [`EncapPlan`] for IPv4 and
/// [`crate::encap6::EncapPlan6`] for IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EgressVerdict<P = EncapPlan> {
    /// Encapsulate toward this VTEP and send out of the underlay.
    Encap(P),
    /// Leave the frame to the kernel (`TC_ACT_OK`): flannel's vxlan device sends it.
    Pass(Reason),
    /// Drop it (`TC_ACT_SHOT`).
    Drop(Reason),
}

/// Classifies a frame leaving `flannel.<VNI>`. `route` looks the inner
/// destination (network order) up in the remote-subnet map.
pub fn classify_egress(
    window: &EgressWindow,
    pkt: EgressPacket,
    cfg: &NodeConfig,
    route: impl FnOnce([u8; 4]) -> Option<RemoteVtep>,
) -> EgressVerdict {
    use EgressVerdict::{Drop, Encap, Pass};

    if cfg.configured == 0 {
        return Pass(Reason::PassNotConfigured);
    }
    if pkt.len < ETH_HDR_LEN as u32 {
        return Drop(Reason::DropMalformed);
    }
    if u16::from_be_bytes([window[12], window[13]]) != ETH_P_IP {
        return Pass(Reason::PassNotIpv4);
    }
    let l3_len = pkt.len - ETH_HDR_LEN as u32;
    let ver_ihl = window[14];
    let header_len = u32::from(ver_ihl & 0x0f) * 4;
    let total_len = u32::from(u16::from_be_bytes([window[16], window[17]]));
    if l3_len < IPV4_HDR_LEN as u32
        || ver_ihl >> 4 != 4
        || header_len < IPV4_HDR_LEN as u32
        || header_len > l3_len
        // An IPv4 BIG TCP aggregate says 0 and is caught as too big below.
        || (total_len > l3_len || (total_len < header_len && !(pkt.gso && total_len == 0)))
    {
        return Drop(Reason::DropMalformed);
    }

    let dst = [window[30], window[31], window[32], window[33]];
    let Some(remote) = route(dst) else {
        return Pass(Reason::PassNoRoute);
    };

    let outer_len = l3_len + VXLAN_ENCAP_LEN;
    // The kernel device sends what does not fit as outer IPv4 fragments (its
    // outer DF is clear whatever the inner DF) and lowers the inner route's
    // path MTU; a program cannot fragment, so such packets go its way.
    // Segments of a GSO aggregate were sized for flannel.<VNI>'s MTU.
    if outer_len > u32::from(u16::MAX)
        || (!pkt.gso && cfg.underlay_mtu != 0 && outer_len > cfg.underlay_mtu)
    {
        return Pass(Reason::PassTooBig);
    }

    Encap(EncapPlan {
        remote,
        inner_len: l3_len as u16,
        inner_tos: window[15],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeConfig {
        NodeConfig {
            vni: 1,
            local_ip: [10, 0, 0, 1],
            underlay_ifindex: 2,
            vxlan_ifindex: 5,
            underlay_mtu: 1500,
            vtep_mac: [0x0a, 0, 0, 0, 0, 1],
            port: 8472,
            configured: 1,
        }
    }

    const PEER: RemoteVtep = RemoteVtep {
        vtep_mac: [0x0a, 0, 0, 0, 0, 2],
        _pad: [0; 2],
        public_ip: [10, 0, 0, 2],
    };

    /// Routes 10.244.2.0/24 to PEER, like one remote lease.
    fn route(dst: [u8; 4]) -> Option<RemoteVtep> {
        (dst[..3] == [10, 244, 2]).then_some(PEER)
    }

    fn frame(ethertype: u16, total_len: u16, dst: [u8; 4]) -> EgressWindow {
        let mut w = [0u8; EGRESS_WINDOW_LEN];
        w[0..6].copy_from_slice(&PEER.vtep_mac);
        w[6..12].copy_from_slice(&[0x0a, 0, 0, 0, 0, 1]);
        w[12..14].copy_from_slice(&ethertype.to_be_bytes());
        w[14] = 0x45;
        w[15] = 0xb9;
        w[16..18].copy_from_slice(&total_len.to_be_bytes());
        w[20] = 0x40; // DF
        w[22] = 64;
        w[23] = 6;
        w[26..30].copy_from_slice(&[10, 244, 1, 5]);
        w[30..34].copy_from_slice(&dst);
        w
    }

    fn pkt(len: u32) -> EgressPacket {
        EgressPacket { len, gso: false }
    }

    #[test]
    fn encapsulates_ipv4_to_a_remote_subnet() {
        let w = frame(ETH_P_IP, 84, [10, 244, 2, 7]);
        assert_eq!(
            classify_egress(&w, pkt(98), &node(), route),
            EgressVerdict::Encap(EncapPlan {
                remote: PEER,
                inner_len: 84,
                inner_tos: 0xb9
            })
        );
    }

    #[test]
    fn passes_unrouted_and_non_ipv4() {
        let w = frame(ETH_P_IP, 84, [10, 244, 3, 7]);
        assert_eq!(
            classify_egress(&w, pkt(98), &node(), route),
            EgressVerdict::Pass(Reason::PassNoRoute)
        );
        for ethertype in [0x0806, 0x86dd, 0x8100] {
            let w = frame(ethertype, 84, [10, 244, 2, 7]);
            assert_eq!(
                classify_egress(&w, pkt(98), &node(), route),
                EgressVerdict::Pass(Reason::PassNotIpv4)
            );
        }
    }

    #[test]
    fn passes_everything_until_configured() {
        let mut cfg = node();
        cfg.configured = 0;
        let w = frame(ETH_P_IP, 84, [10, 244, 2, 7]);
        assert_eq!(
            classify_egress(&w, pkt(98), &cfg, route),
            EgressVerdict::Pass(Reason::PassNotConfigured)
        );
    }

    #[test]
    fn too_big_unless_gso() {
        // 1450 bytes of IPv4 make exactly 1500 on the underlay.
        let w = frame(ETH_P_IP, 1450, [10, 244, 2, 7]);
        assert!(matches!(
            classify_egress(&w, pkt(1464), &node(), route),
            EgressVerdict::Encap(_)
        ));
        let w = frame(ETH_P_IP, 1451, [10, 244, 2, 7]);
        assert_eq!(
            classify_egress(&w, pkt(1465), &node(), route),
            EgressVerdict::Pass(Reason::PassTooBig)
        );
        let gso = EgressPacket {
            len: 14 + 60000,
            gso: true,
        };
        let w = frame(ETH_P_IP, 60000, [10, 244, 2, 7]);
        assert!(matches!(
            classify_egress(&w, gso, &node(), route),
            EgressVerdict::Encap(EncapPlan {
                inner_len: 60000,
                ..
            })
        ));
        // Too long for the outer total-length field even as GSO (BIG TCP).
        let big = EgressPacket {
            len: 14 + 65500,
            gso: true,
        };
        let w = frame(ETH_P_IP, 0, [10, 244, 2, 7]);
        assert_eq!(
            classify_egress(&w, big, &node(), route),
            EgressVerdict::Pass(Reason::PassTooBig)
        );
    }

    #[test]
    fn drops_malformed_ipv4() {
        let good = frame(ETH_P_IP, 84, [10, 244, 2, 7]);
        let mut bad_version = good;
        bad_version[14] = 0x65;
        let mut short_ihl = good;
        short_ihl[14] = 0x44;
        let mut long_total = good;
        long_total[16..18].copy_from_slice(&85u16.to_be_bytes());
        let mut tiny_total = good;
        tiny_total[16..18].copy_from_slice(&19u16.to_be_bytes());
        for w in [bad_version, short_ihl, long_total, tiny_total] {
            assert_eq!(
                classify_egress(&w, pkt(98), &node(), route),
                EgressVerdict::Drop(Reason::DropMalformed)
            );
        }
        // Truncated before the end of the IPv4 header, or even the Ethernet one.
        for len in [0, 13, 14, 33] {
            let r = classify_egress(&good, pkt(len), &node(), route);
            assert_eq!(r, EgressVerdict::Drop(Reason::DropMalformed), "len {len}");
        }
    }

    #[test]
    fn options_and_padding_are_carried_along() {
        // IPv4 with options (ihl 6): the whole packet is encapsulated unchanged.
        let mut w = frame(ETH_P_IP, 88, [10, 244, 2, 7]);
        w[14] = 0x46;
        assert!(matches!(
            classify_egress(&w, pkt(102), &node(), route),
            EgressVerdict::Encap(EncapPlan { inner_len: 88, .. })
        ));
        // Trailing bytes after the IPv4 packet are carried too (the receiver trims).
        let w = frame(ETH_P_IP, 84, [10, 244, 2, 7]);
        assert!(matches!(
            classify_egress(&w, pkt(100), &node(), route),
            EgressVerdict::Encap(EncapPlan { inner_len: 86, .. })
        ));
    }
}
