//! `vxlan_egress`: TC egress on `flannel.<VNI>`. Encapsulates IPv4 toward a
//! remote subnet and sends it straight out of the underlay NIC; everything
//! else continues down the hook (other programs, legacy tc filters) to the
//! kernel's vxlan device.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_REDIRECT, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    btf_maps::lpm_trie::Key,
    helpers::generated::{bpf_get_hash_recalc, bpf_get_prandom_u32, bpf_redirect_neigh},
    macros::classifier,
    programs::TcContext,
};
use overlay_common::{
    consts::{ETH_HDR_LEN, VXLAN_ENCAP_LEN},
    counters::Reason,
    egress::{EGRESS_WINDOW_LEN, EgressPacket, EgressVerdict, classify_egress},
    encap::{EncapHeader, EncapPlan},
    fastpath::IPV4_TTL_OFFSET,
    flow::vxlan_src_port,
    maps::NodeConfig,
};

use crate::{
    count::{count, count_peer_tx},
    fast,
    maps::{NODE_CONFIG, REMOTE_SUBNETS},
    skb::{self, TCX_NEXT},
};

/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`, a C macro without a binding.
pub const fn adj_room_encap_l2(len: u64) -> u64 {
    (len & 0xff) << 56
}

const ENCAP_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
    | adj_room_encap_l2(ETH_HDR_LEN as u64);

#[classifier]
pub fn vxlan_egress(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let Some(cfg) = NODE_CONFIG.get(0) else {
        count(Reason::PassNotConfigured, len);
        return TCX_NEXT;
    };

    let window = if len as usize >= EGRESS_WINDOW_LEN {
        skb::load_head::<EGRESS_WINDOW_LEN>(&ctx)
    } else {
        // Too short for the window: classified on what it has (the classifier
        // looks at the length before any field).
        let mut window = [0u8; EGRESS_WINDOW_LEN];
        let loaded = (len as usize) < ETH_HDR_LEN
            || skb::load::<ETH_HDR_LEN, EGRESS_WINDOW_LEN>(&ctx, 0, &mut window, 0);
        loaded.then_some(window)
    };
    let Some(window) = window else {
        count(Reason::DropMalformed, len);
        return TC_ACT_SHOT;
    };
    let pkt = EgressPacket {
        len,
        gso: skb::is_gso(&ctx),
    };
    let verdict = classify_egress(&window, pkt, cfg, |dst| {
        REMOTE_SUBNETS.get(&Key::new(32, dst)).copied()
    });
    match verdict {
        EgressVerdict::Pass(reason) => {
            fast::clear_mark(&ctx);
            count(reason, len);
            TCX_NEXT
        }
        EgressVerdict::Drop(reason) => {
            count(reason, len);
            TC_ACT_SHOT
        }
        EgressVerdict::Encap(plan) => {
            fast::approve_from_pod(&ctx, len);
            encapsulate(&ctx, cfg, &plan, len, None, Reason::Encapsulated, TCX_NEXT)
        }
    }
}

/// Encapsulates toward `plan`'s VTEP and redirects out of the underlay,
/// counting `success`. `inner_ttl` (TTL, protocol and checksum) replaces the
/// inner header's when the packet skipped the host's routing. `pass` is the
/// verdict when the kernel refuses the room (nothing has changed then).
#[inline(always)]
pub fn encapsulate(
    ctx: &TcContext,
    cfg: &NodeConfig,
    plan: &EncapPlan,
    len: u32,
    inner_ttl: Option<[u8; 4]>,
    success: Reason,
    pass: i32,
) -> i32 {
    // The kernel vxlan device hashes the same skb the same way
    // (skb_get_hash), so a flow keeps its source port across datapaths.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let ip_id = unsafe { bpf_get_prandom_u32() } as u16;
    let header = plan.header(cfg, vxlan_src_port(hash), ip_id);

    if ctx
        .adjust_room(VXLAN_ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, ENCAP_FLAGS)
        .is_err()
    {
        // Nothing changed yet (e.g. -EALREADY: a pod's own tunnel packet).
        count(Reason::PassAdjustRefused, len);
        return pass;
    }
    if ctx.store(EncapHeader::OFFSET, &header.bytes, 0).is_err() {
        count(Reason::DropAdjustFailed, len);
        return TC_ACT_SHOT;
    }
    if let Some(ttl) = inner_ttl {
        let at = ETH_HDR_LEN + VXLAN_ENCAP_LEN as usize + IPV4_TTL_OFFSET;
        if ctx.store(at, &ttl, 0).is_err() {
            count(Reason::DropAdjustFailed, len);
            return TC_ACT_SHOT;
        }
    }
    send_out(cfg, len, success, plan.remote.public_ip)
}

/// Sends an encapsulated frame out of the underlay, counting `success`
/// and the bytes to `peer` (its PEER_STATS key).
#[inline(always)]
pub fn send_out(cfg: &NodeConfig, len: u32, success: Reason, peer: [u8; 4]) -> i32 {
    // The kernel resolves the next hop on the underlay and writes the outer
    // MACs (resolving ARP or IPv6 neighbours if needed), which
    // bpf_fib_lookup would leave to us.
    let ret = unsafe { bpf_redirect_neigh(cfg.underlay_ifindex, core::ptr::null_mut(), 0, 0) };
    if ret != i64::from(TC_ACT_REDIRECT) {
        count(Reason::DropRedirectFailed, len);
        return TC_ACT_SHOT;
    }
    count(success, len);
    count_peer_tx(peer, len);
    TC_ACT_REDIRECT
}
