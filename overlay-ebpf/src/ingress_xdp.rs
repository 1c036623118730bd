//! `vxlan_ingress_xdp`: XDP on the underlay NIC. Drops VXLAN from strangers
//! and decapsulates ours before an skb exists; marks what it decapsulated so
//! that `vxlan_ingress_tc` delivers it into `flannel.<VNI>`.
//!
//! `vxlan_ingress_xdp_filter` is the same without decapsulating, for kernels
//! that refuse `bpf_xdp_adjust_meta` to XDP programs (so no mark could tell
//! TC what was decapsulated): it drops strangers, and TC decapsulates ours.
//!
//! Frames it passes unmarked are classified again by `vxlan_ingress_tc`, which
//! counts them; counting them here too would count every frame twice.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_meta},
    macros::xdp,
    programs::XdpContext,
};
use overlay_common::{
    consts::{XDP_META_DECAPSULATED, XDP_META_LEN},
    counters::Reason,
    ingress::{
        DECAP_LEN, INGRESS_TAIL_OFFSET, INGRESS_WINDOW_LEN, IngressPacket, IngressVerdict,
        IngressWindow, classify_ingress, outer_l4_offset,
    },
};

use crate::{
    count::{count, count_peer_rx},
    maps::{KNOWN_VTEPS, NODE_CONFIG},
};

#[xdp]
pub fn vxlan_ingress_xdp(ctx: XdpContext) -> u32 {
    ingress(&ctx, true)
}

#[xdp]
pub fn vxlan_ingress_xdp_filter(ctx: XdpContext) -> u32 {
    ingress(&ctx, false)
}

#[inline(always)]
fn ingress(ctx: &XdpContext, decap: bool) -> u32 {
    let data = ctx.data();
    let data_end = ctx.data_end();
    let Some(cfg) = NODE_CONFIG.get(0) else {
        return XDP_PASS;
    };
    // Short frames and IPv4 options are left to TC, which reads at any offset.
    if data + INGRESS_WINDOW_LEN > data_end {
        return XDP_PASS;
    }
    // Classified in place: the bounds check above lets the verifier accept
    // constant-offset reads straight from the packet, so nothing is copied.
    let window: &IngressWindow = unsafe { &*(data as *const IngressWindow) };
    if outer_l4_offset(window[14]) != INGRESS_TAIL_OFFSET {
        return XDP_PASS;
    }
    let len = (data_end - data) as u32;
    // An XDP buffer is one frame as received: never a GSO aggregate.
    let pkt = IngressPacket { len, gso: false };
    let verdict = classify_ingress(window, pkt, cfg, true, |ip| {
        KNOWN_VTEPS.get_ptr(ip).is_some()
    });
    match verdict {
        IngressVerdict::Pass(_) => XDP_PASS,
        IngressVerdict::Drop(reason) => {
            count(reason, len);
            XDP_DROP
        }
        // Left whole to TC, which decapsulates and counts it.
        IngressVerdict::Decap { .. } if !decap => XDP_PASS,
        IngressVerdict::Decap { .. } => {
            // Read before the head moves: the outer header is gone after.
            let source = [window[26], window[27], window[28], window[29]];
            decapsulate(ctx, len, source)
        }
    }
}

#[inline(always)]
fn decapsulate(ctx: &XdpContext, len: u32, source: [u8; 4]) -> u32 {
    // Reserve the mark's room first: if the driver has no metadata support,
    // nothing has changed and TC decapsulates the frame itself.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(XDP_META_LEN as i32)) } != 0 {
        return XDP_PASS;
    }
    if !write_mark(ctx, 0) {
        return XDP_PASS;
    }
    // The inner Ethernet header becomes the frame's (the metadata moves along).
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, DECAP_LEN as i32) } != 0 {
        return XDP_PASS;
    }
    if !write_mark(ctx, XDP_META_DECAPSULATED) {
        // Decapsulated but unmarked would reach the stack as if it came from
        // the underlay: never let that happen.
        count(Reason::DropAdjustFailed, len);
        return XDP_DROP;
    }
    count(Reason::Decapsulated, len);
    count_peer_rx(source, len);
    XDP_PASS
}

/// Writes the metadata word; false if the metadata area is not there.
#[inline(always)]
fn write_mark(ctx: &XdpContext, mark: u32) -> bool {
    let meta = ctx.metadata();
    if meta + XDP_META_LEN > ctx.data() {
        return false;
    }
    unsafe { core::ptr::write_unaligned(meta as *mut u32, mark) };
    true
}
