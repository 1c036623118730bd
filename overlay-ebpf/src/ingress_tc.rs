//! `vxlan_ingress_tc`: TC ingress on the underlay NIC. Delivers what
//! `vxlan_ingress_xdp` decapsulated into `flannel.<VNI>`, and classifies and
//! decapsulates by itself everything XDP left alone (no XDP attached, frames
//! XDP does not look at, GSO aggregates built after XDP). IPv6 frames go to
//! `vxlan_ingress_tc6` (`ingress_tc6`: VXLAN over IPv6 for
//! `flannel-v6.<VNI>`), as a tail call.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::generated::bpf_redirect,
    macros::classifier,
    programs::TcContext,
};
use overlay_common::{
    consts::{
        ETH_HDR_LEN, ETH_P_IPV6, JUMP_INGRESS_TC6, UDP_HDR_LEN, XDP_META_DECAPSULATED, XDP_META_LEN,
    },
    counters::Reason,
    ingress::{
        DECAP_LEN, INGRESS_TAIL_OFFSET, INGRESS_WINDOW_LEN, IngressPacket, IngressVerdict,
        IngressWindow, UDP_OFFSET, classify_ingress, outer_l4_offset,
    },
};

use crate::{
    count::{count, count_peer_rx},
    fast::{self, outer_source},
    maps::{JUMPS, KNOWN_VTEPS, NODE_CONFIG, serving_vtep},
    skb::{self, TCX_NEXT},
};

/// GSO UDP-tunnel aggregates (a peer's TSO packet that crossed a veth whole,
/// or what GRO merged) go to the kernel's vxlan device. Measured on 6.18:
/// `bpf_skb_adjust_room(-50, MAC, FIXED_GSO)` decapsulates them correctly
/// (byte-exact TCP streams), but no 6.18 helper clears `skb->encapsulation`
/// (the `BPF_F_ADJ_ROOM_DECAP_L4_*` flags came later), so the stack still
/// treats the inner aggregate as tunnelled: a bridge (no tunnel offloads in
/// `hw_enc_features`) segments it in software, and pods behind `cni0` received
/// 1.46 kB packets at 3-4.5 Gbit/s instead of 54 kB aggregates at 12-18 Gbit/s
/// through the vxlan device (which clears the flag and re-aggregates).
pub const DECAP_GSO: bool = false;

#[classifier]
pub fn vxlan_ingress_tc(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let Some(cfg) = NODE_CONFIG.get(0) else {
        count(Reason::PassNotConfigured, len);
        return TCX_NEXT;
    };
    if ctx.skb.protocol() == u32::from(ETH_P_IPV6.to_be()) {
        // No return on success: vxlan_ingress_tc6 runs in our place.
        unsafe { JUMPS.tail_call(&ctx, JUMP_INGRESS_TC6) };
        // The agent has not filled JUMPS (yet): the kernel's path.
        count(Reason::PassNotConfigured, len);
        return TCX_NEXT;
    }
    if decapsulated_by_xdp(&ctx) {
        // XDP has no skb to correct. The one that reaches us (built by the
        // driver after XDP, or the one generic and veth XDP ran on) carries the
        // checksum verdict on the frame as received, the outer one: mlx5, with
        // an XDP program attached, reports CHECKSUM_UNNECESSARY from the
        // completion's L3/L4 OK bits (mlx5e_handle_csum). Consumed here, as
        // strip_vxlan does on the TC path. A driver that still reports CHECKSUM_COMPLETE for a frame XDP
        // changed hands the stack a sum over bytes that are gone; the stack
        // then finds it wrong and verifies in software (netdev_rx_csum_fault),
        // which is why mlx5 turns CHECKSUM_COMPLETE off under XDP.
        skb::outer_udp_removed(&ctx);
        // XDP counted it as decapsulated; only a failure is left to count.
        return deliver(cfg.vxlan_ifindex, len, None);
    }

    let Some(window) = load_window(&ctx, len) else {
        count(Reason::DropMalformed, len);
        return TC_ACT_SHOT;
    };
    let pkt = IngressPacket {
        len,
        gso: skb::is_gso(&ctx),
    };
    let verdict = classify_ingress(&window, pkt, cfg, DECAP_GSO, |ip| {
        KNOWN_VTEPS.get_ptr(ip).is_some()
    });
    match verdict {
        IngressVerdict::Pass(reason) => {
            if reason == Reason::PassGsoTunnel {
                if let Some(verdict) = fast::deliver_to_pod(&ctx, &window, len) {
                    return verdict;
                }
                if impersonates_another_node(&ctx, &window) {
                    count(Reason::DropSourceVtepMismatch, len);
                    return TC_ACT_SHOT;
                }
            }
            count(reason, len);
            if reason == Reason::PassGsoTunnel {
                // From a known VTEP (checked first): the kernel device
                // decapsulates it, but it is still this peer's traffic.
                count_peer_rx(outer_source(&window), len);
            }
            TCX_NEXT
        }
        IngressVerdict::Drop(reason) => {
            count(reason, len);
            TC_ACT_SHOT
        }
        IngressVerdict::Decap { inner_eth } => {
            if let Some(verdict) = fast::deliver_to_pod(&ctx, &window, len) {
                return verdict;
            }
            if impersonates_another_node(&ctx, &window) {
                count(Reason::DropSourceVtepMismatch, len);
                return TC_ACT_SHOT;
            }
            if !skb::strip_vxlan(&ctx, DECAP_LEN) {
                count(Reason::PassAdjustRefused, len);
                return TCX_NEXT;
            }
            // The outer Ethernet header stayed in front: make it the inner one,
            // so flannel.<VNI> sees a frame addressed to its own MAC.
            if ctx.store(0, &inner_eth, 0).is_err() {
                count(Reason::DropAdjustFailed, len);
                return TC_ACT_SHOT;
            }
            let verdict = deliver(cfg.vxlan_ifindex, len, Some(Reason::Decapsulated));
            if verdict == TC_ACT_REDIRECT {
                count_peer_rx(outer_source(&window), len);
            }
            verdict
        }
    }
}

/// Hands the (decapsulated) frame to the receive path of `flannel.<VNI>`
/// (or `flannel-v6.<VNI>`: `ifindex`), so the stack sees it arriving there:
/// rp_filter, conntrack and `iptables -i flannel.<VNI>` behave as under
/// flannel.
#[inline(always)]
pub fn deliver(ifindex: u32, len: u32, success: Option<Reason>) -> i32 {
    let ret = if ifindex == 0 {
        i64::from(TC_ACT_SHOT)
    } else {
        unsafe { bpf_redirect(ifindex, BPF_F_INGRESS as u64) }
    };
    if ret != i64::from(TC_ACT_REDIRECT) {
        count(Reason::DropRedirectFailed, len);
        return TC_ACT_SHOT;
    }
    if let Some(reason) = success {
        count(reason, len);
    }
    TC_ACT_REDIRECT
}

/// Whether VXLAN from a known VTEP carries an inner IPv4 source that
/// REMOTE_SUBNETS says another VTEP serves. flannel's device delivers such a
/// packet (`rp_filter` on `flannel.<VNI>` accepts any overlay source), so
/// one node could speak as any other node's pods; we drop it. Sources no
/// vxlan peer serves (a DirectRouting peer's pods, addresses outside the
/// overlay) are left to the host, as under flannel.
#[inline(always)]
fn impersonates_another_node(ctx: &TcContext, outer: &IngressWindow) -> bool {
    // The inner frame's EtherType was checked (IPv4) by the classifier.
    let Some(src) = skb::load_at::<4>(ctx, INGRESS_WINDOW_LEN as u32 + 12) else {
        return false;
    };
    matches!(serving_vtep(src), Some(vtep) if vtep != outer_source(outer))
}

/// True if `vxlan_ingress_xdp` left its mark in the XDP metadata.
#[inline(always)]
fn decapsulated_by_xdp(ctx: &TcContext) -> bool {
    let meta = unsafe { (*ctx.skb.skb).data_meta } as usize;
    let data = ctx.data();
    if meta + XDP_META_LEN > data {
        return false;
    }
    let mark = unsafe { core::ptr::read_unaligned(meta as *const u32) };
    mark == XDP_META_DECAPSULATED
}

/// Copies the classification window: Ethernet and the fixed IPv4 header from
/// the start, UDP/VXLAN/inner Ethernet from where the IPv4 header really ends.
/// Bytes a short frame does not have are zero (the classifier checks lengths
/// first). `None` only if the kernel refused a copy within `len`.
#[inline(always)]
fn load_window(ctx: &TcContext, len: u32) -> Option<IngressWindow> {
    let len = len as usize;
    let mut w = if len >= INGRESS_WINDOW_LEN {
        skb::load_head::<INGRESS_WINDOW_LEN>(ctx)?
    } else {
        let mut w = [0u8; INGRESS_WINDOW_LEN];
        if len >= INGRESS_TAIL_OFFSET {
            if !skb::load::<INGRESS_TAIL_OFFSET, INGRESS_WINDOW_LEN>(ctx, 0, &mut w, 0) {
                return None;
            }
        } else {
            if len >= ETH_HDR_LEN
                && !skb::load::<ETH_HDR_LEN, INGRESS_WINDOW_LEN>(ctx, 0, &mut w, 0)
            {
                return None;
            }
            return Some(w);
        }
        w
    };
    let l4 = outer_l4_offset(w[14]);
    // With IPv4 options only the UDP header matters (to drop strangers): such
    // frames are never decapsulated here.
    let tail_missing = l4 != INGRESS_TAIL_OFFSET || len < INGRESS_WINDOW_LEN;
    if tail_missing
        && l4 + UDP_HDR_LEN <= len
        && !skb::load::<UDP_HDR_LEN, INGRESS_WINDOW_LEN>(ctx, l4, &mut w, UDP_OFFSET)
    {
        return None;
    }
    Some(w)
}
