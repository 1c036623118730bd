//! IPv6 ingress classification: VXLAN over IPv6 arriving on the underlay of
//! a dual-stack node, for `flannel-v6.<VNI>`.

use crate::{
    consts::{ETH_HDR_LEN, ETH_P_IPV6, IPPROTO_UDP, IPV6_HDR_LEN, UDP_HDR_LEN, VXLAN_HDR_LEN},
    counters::Reason,
    ingress::{IngressPacket, IngressVerdict, Inner, classify_vxlan},
    maps::{NodeConfig, NodeConfig6},
};

/// Outer Ethernet + IPv6 + UDP + VXLAN + inner Ethernet.
pub const INGRESS6_WINDOW_LEN: usize =
    ETH_HDR_LEN + IPV6_HDR_LEN + UDP_HDR_LEN + VXLAN_HDR_LEN + ETH_HDR_LEN;
pub type Ingress6Window = [u8; INGRESS6_WINDOW_LEN];

/// Offsets inside the window.
pub const UDP6_OFFSET: usize = ETH_HDR_LEN + IPV6_HDR_LEN;
pub const VXLAN6_OFFSET: usize = UDP6_OFFSET + UDP_HDR_LEN;
pub const INNER_ETH6_OFFSET: usize = VXLAN6_OFFSET + VXLAN_HDR_LEN;
/// Where the outer source address is.
pub const OUTER_SRC6_OFFSET: usize = ETH_HDR_LEN + 8;

/// The smallest frame that can be decapsulated: the outer headers, the inner
/// Ethernet header and a fixed inner IPv6 header.
pub const MIN_DECAP6_FRAME_LEN: u32 = (INGRESS6_WINDOW_LEN + IPV6_HDR_LEN) as u32;

/// The outer source address (a peer's `PublicIPv6`).
pub fn outer_source6(w: &Ingress6Window) -> [u8; 16] {
    let mut src = [0u8; 16];
    src.copy_from_slice(&w[OUTER_SRC6_OFFSET..OUTER_SRC6_OFFSET + 16]);
    src
}

/// Classifies an IPv6 frame arriving on the underlay, as
/// [`crate::ingress::classify_ingress`] does IPv4 (same reasons).
/// `known_vtep` answers whether a `PublicIPv6` holds a lease. Outer IPv6
/// with extension headers is left to the kernel.
pub fn classify_ingress6(
    w: &Ingress6Window,
    pkt: IngressPacket,
    cfg: &NodeConfig,
    cfg6: &NodeConfig6,
    decap_gso: bool,
    known_vtep: impl FnOnce([u8; 16]) -> bool,
) -> IngressVerdict {
    use IngressVerdict::{Drop, Pass};

    if cfg.configured == 0 {
        return Pass(Reason::PassNotConfigured);
    }
    if cfg6.configured == 0 {
        // An IPv4-only node: no IPv6 VXLAN is ours (and the kernel has no
        // device for it).
        return Pass(Reason::PassNotOurs);
    }
    if pkt.len < (UDP6_OFFSET + UDP_HDR_LEN) as u32
        || u16::from_be_bytes([w[12], w[13]]) != ETH_P_IPV6
        || w[14] >> 4 != 6
    {
        return Pass(Reason::PassNotOurs);
    }
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&w[38..54]);
    // As over IPv4: VXLAN to a multicast group reaches the kernel's socket
    // too, so its sender is checked; other destinations are not ours to
    // judge here (the host firewall's guard checks every local address).
    let to_us = dst == cfg6.local_ip;
    if !to_us && dst[0] != 0xff {
        return Pass(Reason::PassNotOurs);
    }
    if w[20] != IPPROTO_UDP {
        // Not UDP, or UDP behind extension headers, which the program does
        // not walk: the kernel's device takes ours among them.
        return Pass(if to_us {
            Reason::PassIpv6Unusual
        } else {
            Reason::PassNotOurs
        });
    }
    if u16::from_be_bytes([w[UDP6_OFFSET + 2], w[UDP6_OFFSET + 3]]) != cfg.port {
        return Pass(Reason::PassNotOurs);
    }
    if !known_vtep(outer_source6(w)) {
        return Drop(Reason::DropUnknownVtep);
    }
    if !to_us {
        return Pass(Reason::PassNotOurs);
    }
    let payload = u32::from(u16::from_be_bytes([w[18], w[19]]));
    let udp_len = u32::from(u16::from_be_bytes([w[UDP6_OFFSET + 4], w[UDP6_OFFSET + 5]]));
    // Room for the inner Ethernet header at least (an inner frame of
    // another family goes to the kernel whatever its length) ...
    if pkt.len < INGRESS6_WINDOW_LEN as u32
        || payload + UDP6_OFFSET as u32 > pkt.len
        || payload < (INGRESS6_WINDOW_LEN - UDP6_OFFSET) as u32
        || udp_len != payload
    {
        return Drop(Reason::DropMalformed);
    }
    let verdict = classify_vxlan(
        w,
        VXLAN6_OFFSET,
        Inner {
            vni: cfg.vni,
            ethertype: ETH_P_IPV6,
            vtep_mac: cfg6.vtep_mac,
        },
        pkt.gso && !decap_gso,
    );
    // ... and for IPv6, a whole fixed IPv6 header behind it.
    match verdict {
        IngressVerdict::Decap { .. } if payload < MIN_DECAP6_FRAME_LEN - UDP6_OFFSET as u32 => {
            Drop(Reason::DropMalformed)
        }
        v => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: [u8; 16] = [0xfd, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const PEER: [u8; 16] = [0xfd, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];
    const MAC6: [u8; 6] = [0x0a, 0x58, 0, 0, 0x06, 2];

    fn nodes() -> (NodeConfig, NodeConfig6) {
        let cfg = NodeConfig {
            vni: 1,
            port: 8472,
            configured: 1,
            ..NodeConfig::default()
        };
        let cfg6 = NodeConfig6 {
            local_ip: LOCAL,
            vxlan_ifindex: 9,
            vtep_mac: MAC6,
            _pad: [0; 2],
            configured: 1,
        };
        (cfg, cfg6)
    }

    /// VXLAN from PEER to LOCAL carrying an inner IPv6 packet of `inner` bytes.
    fn frame(inner: u16) -> (Ingress6Window, IngressPacket) {
        let mut w = [0u8; INGRESS6_WINDOW_LEN];
        w[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
        w[14] = 0x60;
        let payload = 8 + 8 + 14 + inner;
        w[18..20].copy_from_slice(&payload.to_be_bytes());
        w[20] = IPPROTO_UDP;
        w[21] = 64;
        w[22..38].copy_from_slice(&PEER);
        w[38..54].copy_from_slice(&LOCAL);
        w[54..56].copy_from_slice(&40000u16.to_be_bytes());
        w[56..58].copy_from_slice(&8472u16.to_be_bytes());
        w[58..60].copy_from_slice(&payload.to_be_bytes());
        w[60..62].copy_from_slice(&0x1234u16.to_be_bytes());
        w[62] = 0x08;
        w[68] = 1; // VNI 1
        w[70..76].copy_from_slice(&MAC6);
        w[76..82].copy_from_slice(&[2, 0, 0, 0, 6, 3]);
        w[82..84].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
        let len = 14 + 40 + u32::from(payload);
        (w, IngressPacket { len, gso: false })
    }

    fn classify(w: &Ingress6Window, pkt: IngressPacket) -> IngressVerdict {
        let (cfg, cfg6) = nodes();
        classify_ingress6(w, pkt, &cfg, &cfg6, false, |ip| ip == PEER)
    }

    #[test]
    fn decapsulates_vxlan_from_a_known_vtep() {
        let (w, pkt) = frame(104);
        let IngressVerdict::Decap { inner_eth } = classify(&w, pkt) else {
            panic!("{:?}", classify(&w, pkt));
        };
        assert_eq!(inner_eth[..], w[70..84]);
        assert_eq!(outer_source6(&w), PEER);
    }

    #[test]
    fn drops_strangers_and_what_the_kernel_device_would_drop() {
        let (mut w, pkt) = frame(104);
        w[37] = 9;
        assert_eq!(
            classify(&w, pkt),
            IngressVerdict::Drop(Reason::DropUnknownVtep)
        );
        let (mut w, pkt) = frame(104);
        w[68] = 2;
        assert_eq!(
            classify(&w, pkt),
            IngressVerdict::Drop(Reason::DropWrongVni)
        );
        let (mut w, pkt) = frame(104);
        w[75] ^= 1;
        assert_eq!(
            classify(&w, pkt),
            IngressVerdict::Drop(Reason::DropWrongInnerMac)
        );
        let (mut w, pkt) = frame(104);
        w[63] = 1; // a reserved bit
        assert_eq!(
            classify(&w, pkt),
            IngressVerdict::Drop(Reason::DropMalformed)
        );
        // Lengths that disagree, or too short for an inner IPv6 header.
        let (mut w, pkt) = frame(104);
        w[59] ^= 1;
        assert_eq!(
            classify(&w, pkt),
            IngressVerdict::Drop(Reason::DropMalformed)
        );
        let (w, mut pkt) = frame(104);
        pkt.len -= 1;
        assert_eq!(
            classify(&w, pkt),
            IngressVerdict::Drop(Reason::DropMalformed)
        );
        let (w, pkt) = frame(39);
        assert_eq!(
            classify(&w, pkt),
            IngressVerdict::Drop(Reason::DropMalformed)
        );
    }

    #[test]
    fn leaves_the_rest_alone() {
        // Another destination, another port, IPv4, extension headers.
        let (mut w, pkt) = frame(104);
        w[53] = 7;
        assert_eq!(classify(&w, pkt), IngressVerdict::Pass(Reason::PassNotOurs));
        let (mut w, pkt) = frame(104);
        w[57] = 1;
        assert_eq!(classify(&w, pkt), IngressVerdict::Pass(Reason::PassNotOurs));
        let (mut w, pkt) = frame(104);
        w[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        assert_eq!(classify(&w, pkt), IngressVerdict::Pass(Reason::PassNotOurs));
        let (mut w, pkt) = frame(104);
        w[20] = 0; // hop-by-hop options first
        assert_eq!(
            classify(&w, pkt),
            IngressVerdict::Pass(Reason::PassIpv6Unusual)
        );
        // ARP-like inner frames and GSO aggregates go to the kernel device.
        let (mut w, pkt) = frame(104);
        w[82..84].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(
            classify(&w, pkt),
            IngressVerdict::Pass(Reason::PassInnerNotIpv4)
        );
        // An ARP-sized inner frame is not too short for what it is.
        let (mut w, pkt) = frame(28);
        w[82..84].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(
            classify(&w, pkt),
            IngressVerdict::Pass(Reason::PassInnerNotIpv4)
        );
        let (w, mut pkt) = frame(104);
        pkt.gso = true;
        assert_eq!(
            classify(&w, pkt),
            IngressVerdict::Pass(Reason::PassGsoTunnel)
        );
        // A multicast destination from a stranger is dropped, from a peer passed.
        let (mut w, pkt) = frame(104);
        w[38] = 0xff;
        assert_eq!(classify(&w, pkt), IngressVerdict::Pass(Reason::PassNotOurs));
        w[37] = 9;
        assert_eq!(
            classify(&w, pkt),
            IngressVerdict::Drop(Reason::DropUnknownVtep)
        );
        let (w, pkt) = frame(104);
        let (cfg, _) = nodes();
        assert_eq!(
            classify_ingress6(&w, pkt, &cfg, &NodeConfig6::default(), false, |_| true),
            IngressVerdict::Pass(Reason::PassNotOurs)
        );
    }
}
