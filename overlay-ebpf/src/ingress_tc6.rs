//! `vxlan_ingress_tc6`, the IPv6 half of `vxlan_ingress_tc` (which
//! tail-calls it for every IPv6 frame): VXLAN over IPv6 from a dual-stack
//! peer, decapsulated into `flannel-v6.<VNI>` (XDP leaves IPv6 alone), or
//! straight into a pod on the fast path.
//!
//! The outer UDP checksum is not verified here: what it protects is the
//! inner frame, whose own TCP, UDP or ICMPv6 checksum the stack still
//! verifies (decapsulation lowers the checksum level, as over IPv4, so a
//! NIC's verdict on the outer datagram is never taken for the inner one).

use aya_ebpf::{bindings::TC_ACT_SHOT, macros::classifier, programs::TcContext};
use overlay_common::{
    consts::{ETH_HDR_LEN, IPV6_HDR_LEN, UDP_HDR_LEN, VXLAN6_ENCAP_LEN},
    counters::Reason,
    ingress::{IngressPacket, IngressVerdict},
    ingress6::{
        INGRESS6_WINDOW_LEN, Ingress6Window, UDP6_OFFSET, classify_ingress6, outer_source6,
    },
    maps::KnownVtep6,
};

use crate::{
    count::{count, count_peer_rx},
    fast6,
    ingress_tc::{DECAP_GSO, deliver},
    maps::{KNOWN_VTEPS6, NODE_CONFIG, NODE_CONFIG6, serving_vtep6},
    skb::{self, TCX_NEXT},
};

#[classifier]
pub fn vxlan_ingress_tc6(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let (Some(cfg), Some(cfg6)) = (NODE_CONFIG.get(0), NODE_CONFIG6.get(0)) else {
        count(Reason::PassNotConfigured, len);
        return TCX_NEXT;
    };
    let Some(window) = load_window6(&ctx, len) else {
        count(Reason::DropMalformed, len);
        return TC_ACT_SHOT;
    };
    let pkt = IngressPacket {
        len,
        gso: skb::is_gso(&ctx),
    };
    let mut sender: Option<KnownVtep6> = None;
    let verdict = classify_ingress6(&window, pkt, cfg, cfg6, DECAP_GSO, |ip| {
        // A copy: the agent replaces entries whole, and only `peer` (a
        // counter's key) is read from it.
        sender = KNOWN_VTEPS6.get_ptr(ip).map(|v| unsafe { *v });
        sender.is_some()
    });
    match verdict {
        IngressVerdict::Pass(reason) => {
            if let (Reason::PassGsoTunnel, Some(s)) = (reason, sender)
                && let Some(verdict) = fast6::deliver_to_pod6(&ctx, s.peer, len)
            {
                return verdict;
            }
            if reason == Reason::PassGsoTunnel && impersonates_another_node6(&ctx, &window) {
                count(Reason::DropSourceVtepMismatch, len);
                return TC_ACT_SHOT;
            }
            count(reason, len);
            if let (Reason::PassGsoTunnel, Some(s)) = (reason, sender) {
                count_peer_rx(s.peer, len);
            }
            TCX_NEXT
        }
        IngressVerdict::Drop(reason) => {
            count(reason, len);
            TC_ACT_SHOT
        }
        IngressVerdict::Decap { inner_eth } => {
            if let Some(s) = sender
                && let Some(verdict) = fast6::deliver_to_pod6(&ctx, s.peer, len)
            {
                return verdict;
            }
            if impersonates_another_node6(&ctx, &window) {
                count(Reason::DropSourceVtepMismatch, len);
                return TC_ACT_SHOT;
            }
            if !skb::strip_vxlan(&ctx, VXLAN6_ENCAP_LEN) {
                count(Reason::PassAdjustRefused, len);
                return TCX_NEXT;
            }
            if ctx.store(0, &inner_eth, 0).is_err() {
                count(Reason::DropAdjustFailed, len);
                return TC_ACT_SHOT;
            }
            let verdict = deliver(cfg6.vxlan_ifindex, len, Some(Reason::Decapsulated6));
            if let Some(s) = sender.filter(|_| verdict != TC_ACT_SHOT) {
                count_peer_rx(s.peer, len);
            }
            verdict
        }
    }
}

/// Whether VXLAN from a known IPv6 VTEP carries an inner IPv6 source that
/// REMOTE_SUBNETS6 says another VTEP serves (see `ingress_tc`'s IPv4 check).
#[inline(always)]
fn impersonates_another_node6(ctx: &TcContext, outer: &Ingress6Window) -> bool {
    // The inner IPv6 source, 8 bytes into the inner IPv6 header.
    let Some(src) = skb::load_at::<16>(ctx, INGRESS6_WINDOW_LEN as u32 + 8) else {
        return false;
    };
    matches!(serving_vtep6(src), Some(vtep) if vtep != outer_source6(outer))
}

/// Copies the classification window; a frame shorter than the window gets
/// what it has of the outer headers and zeros (the classifier checks the
/// length first). `None` only if the kernel refused a copy within `len`.
#[inline(always)]
fn load_window6(ctx: &TcContext, len: u32) -> Option<Ingress6Window> {
    let len = len as usize;
    if len >= INGRESS6_WINDOW_LEN {
        return skb::load_head::<INGRESS6_WINDOW_LEN>(ctx);
    }
    let mut w = [0u8; INGRESS6_WINDOW_LEN];
    let loaded = if len >= UDP6_OFFSET + UDP_HDR_LEN {
        skb::load::<{ UDP6_OFFSET + UDP_HDR_LEN }, INGRESS6_WINDOW_LEN>(ctx, 0, &mut w, 0)
    } else if len >= ETH_HDR_LEN + IPV6_HDR_LEN {
        skb::load::<{ ETH_HDR_LEN + IPV6_HDR_LEN }, INGRESS6_WINDOW_LEN>(ctx, 0, &mut w, 0)
    } else {
        true
    };
    loaded.then_some(w)
}
