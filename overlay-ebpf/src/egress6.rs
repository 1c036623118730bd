//! `vxlan_egress6`: TC egress on `flannel-v6.<VNI>` of a dual-stack node.
//! Encapsulates IPv6 toward a remote IPv6 subnet in outer IPv6 (with the
//! outer UDP checksum IPv6 requires, see `overlay_common::encap6`) and sends
//! it straight out of the underlay NIC; everything else continues down the
//! hook to the kernel's vxlan device, GSO aggregates included (see
//! `Reason::PassGso6`).

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    btf_maps::lpm_trie::Key,
    helpers::generated::bpf_get_hash_recalc,
    macros::classifier,
    programs::TcContext,
};
use overlay_common::{
    consts::{ETH_HDR_LEN, VXLAN6_ENCAP_LEN},
    counters::Reason,
    egress::{EgressPacket, EgressVerdict},
    egress6::{EGRESS6_WINDOW_LEN, Egress6Window, classify_egress6, inner_header},
    encap6::{Encap6Header, EncapPlan6, outer_flow_label, write_encap6_header},
    fastpath6::IPV6_HOP_LIMIT_OFFSET,
    flow::vxlan_src_port,
};

use crate::{
    count::count,
    egress::{adj_room_encap_l2, send_out},
    fast, fast6,
    maps::{ENCAP6_SCRATCH, NODE_CONFIG, NODE_CONFIG6, REMOTE_SUBNETS6},
    skb::{self, TCX_NEXT},
};

const ENCAP6_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 as u64
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
    | adj_room_encap_l2(ETH_HDR_LEN as u64);

#[classifier]
pub fn vxlan_egress6(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let (Some(cfg), Some(cfg6)) = (NODE_CONFIG.get(0), NODE_CONFIG6.get(0)) else {
        count(Reason::PassNotConfigured, len);
        return TCX_NEXT;
    };
    if (len as usize) < EGRESS6_WINDOW_LEN {
        // Less than a fixed IPv6 header and 8 bytes: nothing we encapsulate
        // (the smallest is an ICMPv6 echo); the kernel judges it.
        count(Reason::PassIpv6Unusual, len);
        return TCX_NEXT;
    }
    let Some(window) = skb::load_head::<EGRESS6_WINDOW_LEN>(&ctx) else {
        count(Reason::DropMalformed, len);
        return TC_ACT_SHOT;
    };
    let pkt = EgressPacket {
        len,
        gso: skb::is_gso(&ctx),
    };
    let verdict = classify_egress6(&window, pkt, cfg, cfg6, |dst| {
        REMOTE_SUBNETS6.get(&Key::new(128, dst)).copied()
    });
    match verdict {
        EgressVerdict::Pass(reason) => {
            if reason == Reason::PassGso6 {
                // Toward a remote pod all the same: the kernel's device
                // carries it, and the approval serves the flow's packets
                // that are not aggregates.
                fast6::approve_from_pod6(&ctx, len);
            }
            fast::clear_mark(&ctx);
            count(reason, len);
            TCX_NEXT
        }
        EgressVerdict::Drop(reason) => {
            count(reason, len);
            TC_ACT_SHOT
        }
        EgressVerdict::Encap(plan) => {
            fast6::approve_from_pod6(&ctx, len);
            encapsulate6(&ctx, &window, &plan, len, Reason::Encapsulated6)
        }
    }
}

/// The skb's flow hash, as the kernel device takes it (`skb_get_hash`),
/// so a flow keeps its source port and flow label across datapaths.
#[inline(always)]
fn flow_hash(ctx: &TcContext) -> u32 {
    unsafe { bpf_get_hash_recalc(ctx.skb.skb) }
}

/// Builds the outer headers (in ENCAP6_SCRATCH), makes room, writes them
/// and sends the frame out, counting `success`. For the fast path
/// (`Reason::FastEgress`: the packet skipped the host's forwarding) the
/// window's hop limit, which the caller lowered, is written into the inner
/// header too; the outer checksum is summed over the window's. A function
/// of its own (a BPF-to-BPF call, at most five arguments), so that the
/// classifier's window is not on the stack beside it.
#[inline(never)]
pub fn encapsulate6(
    ctx: &TcContext,
    window: &Egress6Window,
    plan: &EncapPlan6,
    len: u32,
    success: Reason,
) -> i32 {
    encapsulate6_inline(ctx, window, plan, len, success)
}

/// [`encapsulate6`] inlined, for a program whose own frame leaves room for it.
#[inline(always)]
pub fn encapsulate6_inline(
    ctx: &TcContext,
    window: &Egress6Window,
    plan: &EncapPlan6,
    len: u32,
    success: Reason,
) -> i32 {
    let forwarded = success == Reason::FastEgress;
    let (Some(cfg), Some(cfg6), Some(header)) = (
        NODE_CONFIG.get(0),
        NODE_CONFIG6.get(0),
        ENCAP6_SCRATCH.get_ptr_mut(0),
    ) else {
        count(Reason::PassNotConfigured, len);
        return TCX_NEXT;
    };
    // Per CPU, and a TC program runs to its end on its CPU: nobody else
    // writes this buffer meanwhile.
    let header = unsafe { &mut *header };
    let hash = flow_hash(ctx);
    write_encap6_header(
        header,
        cfg,
        cfg6,
        &plan.remote,
        inner_header(window),
        (vxlan_src_port(hash), outer_flow_label(hash)),
    );
    if ctx
        .adjust_room(VXLAN6_ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, ENCAP6_FLAGS)
        .is_err()
    {
        count(Reason::PassAdjustRefused, len);
        return TCX_NEXT;
    }
    if ctx.store(Encap6Header::OFFSET, header, 0).is_err() {
        count(Reason::DropAdjustFailed, len);
        return TC_ACT_SHOT;
    }
    if forwarded {
        let hop = ETH_HDR_LEN + IPV6_HOP_LIMIT_OFFSET;
        if ctx
            .store(hop + VXLAN6_ENCAP_LEN as usize, &[window[hop]], 0)
            .is_err()
        {
            count(Reason::DropAdjustFailed, len);
            return TC_ACT_SHOT;
        }
    }
    send_out(cfg, len, success, plan.remote.peer)
}
