//! The IPv6 halves of `veth_from_pod` and `veth_to_pod` (see `veth`): the
//! same decisions for a dual-stack node's IPv6 pod traffic, which leaves as
//! VXLAN over IPv6 exactly as `vxlan_egress6` would send it.

use aya_ebpf::{
    bindings::TC_ACT_SHOT, btf_maps::lpm_trie::Key, macros::classifier, programs::TcContext,
};
use overlay_common::{
    consts::{ETH_HDR_LEN, JUMP_VETH_ENCAP6},
    counters::Reason,
    egress::{EgressPacket, EgressVerdict},
    egress6::{Egress6Window, classify_egress6},
    fastpath::{DIR_FROM_POD, DIR_TO_POD},
    fastpath6::{
        FastFlow6, FastPathConfig6, Flow6Window, FlowKey6, IPV6_HOP_LIMIT_OFFSET, MIN_FLOW6_LEN,
        POD6_WINDOW_LEN, Pod6Window, parse_flow6,
    },
};

use crate::{
    count::count,
    egress6::encapsulate6_inline,
    fast, fast6,
    maps::{
        FROM_POD6_SCRATCH, FromPod6Scratch, JUMPS, NODE_CONFIG, NODE_CONFIG6, POD_ADDRS6,
        POD_VETHS, REMOTE_SUBNETS6, serving_vtep6,
    },
    skb::{self, TCX_NEXT},
};

/// The Ethernet, fixed IPv6 and UDP-sized headers at the window's start, as
/// the IPv6 egress classifier reads them.
#[inline(always)]
fn egress6_part(w: &Pod6Window) -> &Egress6Window {
    unsafe { &*w.as_ptr().cast::<Egress6Window>() }
}

/// The IPv6 header and transport peek after the Ethernet header.
#[inline(always)]
fn flow6_part(w: &Pod6Window) -> &Flow6Window {
    unsafe { &*w.as_ptr().add(ETH_HDR_LEN).cast::<Flow6Window>() }
}

/// The frame's first bytes, if it is long enough to be an IPv6 flow.
#[inline(always)]
fn pod6_window(ctx: &TcContext) -> Option<Pod6Window> {
    fast::load_window::<POD6_WINDOW_LEN, { ETH_HDR_LEN + MIN_FLOW6_LEN }>(ctx, 0)
}

/// [`pod6_window`] into `w` (zeros past a short frame's end); false if the
/// frame is too short to be an IPv6 flow.
#[inline(always)]
fn load_pod6_window(ctx: &TcContext, w: &mut Pod6Window) -> bool {
    const SHORT: usize = ETH_HDR_LEN + MIN_FLOW6_LEN;
    let len = ctx.len() as usize;
    if len >= POD6_WINDOW_LEN {
        return skb::load::<POD6_WINDOW_LEN, POD6_WINDOW_LEN>(ctx, 0, w, 0);
    }
    if len < SHORT {
        return false;
    }
    // Word stores: `fill` becomes a byte-by-byte memset loop on BPF.
    w[SHORT..SHORT + 4].copy_from_slice(&[0; 4]);
    w[SHORT + 4..].copy_from_slice(&[0; POD6_WINDOW_LEN - SHORT - 4]);
    skb::load::<SHORT, POD6_WINDOW_LEN>(ctx, 0, w, 0)
}

/// `veth_from_pod` for an IPv6 frame.
#[classifier]
pub fn veth_from_pod6(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let (Some((_, fast_cfg6)), Some(cfg), Some(cfg6)) =
        (fast6::config6(), NODE_CONFIG.get(0), NODE_CONFIG6.get(0))
    else {
        // No IPv6 fast path (an IPv4-only node): as before there was one.
        count(Reason::PassNotIpv4, len);
        return TCX_NEXT;
    };
    // The window and the key live in FROM_POD6_SCRATCH: with them on the
    // stack, this frame and encapsulate6's exceed BPF's 512 bytes.
    let Some(scratch) = FROM_POD6_SCRATCH.get_ptr_mut(0) else {
        return TCX_NEXT;
    };
    // Per CPU, and a TC program runs to its end on its CPU.
    let FromPod6Scratch {
        window: w,
        key,
        plan: plan_out,
    } = unsafe { &mut *scratch };
    if !load_pod6_window(&ctx, w) {
        count(Reason::PassFastUnusual, len);
        return TCX_NEXT;
    }
    *key = FlowKey6::default();
    let flow = match parse_flow6(flow6_part(w), len - ETH_HDR_LEN as u32, key) {
        Ok(flow) if fast_cfg6.in_pod_subnet(key.src) => flow,
        _ => {
            count(Reason::PassFastUnusual, len);
            return TCX_NEXT;
        }
    };
    if fast_cfg6.is_node_address(key.src) {
        count(Reason::DropFastSpoofedSource, len);
        return TC_ACT_SHOT;
    }
    let pkt = EgressPacket {
        len,
        gso: skb::is_gso(&ctx),
    };
    let plan = match classify_egress6(egress6_part(w), pkt, cfg, cfg6, |dst| {
        REMOTE_SUBNETS6.get(&Key::new(128, dst)).copied()
    }) {
        EgressVerdict::Encap(plan) => plan,
        EgressVerdict::Pass(Reason::PassNoRoute) => {
            count(Reason::PassFastNotRemote, len);
            return TCX_NEXT;
        }
        // An aggregate (PassGso6), too big, not configured, malformed: the
        // host's path decides.
        EgressVerdict::Pass(reason) | EgressVerdict::Drop(reason) => {
            count(reason, len);
            return TCX_NEXT;
        }
    };
    key.dir = DIR_FROM_POD;
    if let Some(verdict) = refuse_from_pod6(&ctx, key, flow.tcp_control, len) {
        return verdict;
    }
    // The outer checksum covers the inner header as it leaves (the packet's
    // own hop limit is written by encapsulate6).
    w[ETH_HDR_LEN + IPV6_HOP_LIMIT_OFFSET] = flow.next_hop_limit()[0];
    *plan_out = plan;
    // No return on success: veth_encap6 sends it, with a stack of its own.
    unsafe { JUMPS.tail_call(&ctx, JUMP_VETH_ENCAP6) };
    count(Reason::PassNotConfigured, len);
    TCX_NEXT
}

/// `veth_from_pod6`'s tail: the packet it decided to send, encapsulated
/// from the window and plan it left in FROM_POD6_SCRATCH.
#[classifier]
pub fn veth_encap6(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let Some(scratch) = FROM_POD6_SCRATCH.get_ptr(0) else {
        return TCX_NEXT;
    };
    let scratch = unsafe { &*scratch };
    encapsulate6_inline(
        &ctx,
        egress6_part(&scratch.window),
        &scratch.plan,
        len,
        Reason::FastEgress,
    )
}

/// Why a flow toward a remote pod does not take the fast path from this
/// veth (counted), if it does not: TCP control, no approval, or a source
/// bound to another veth.
#[inline(always)]
fn refuse_from_pod6(ctx: &TcContext, key: &FlowKey6, tcp_control: bool, len: u32) -> Option<i32> {
    if tcp_control {
        fast6::revoke6(key);
        count(Reason::PassFastTcpControl, len);
        return Some(TCX_NEXT);
    }
    if fast6::approval6(key).is_none() {
        count(Reason::PassFastUnapproved, len);
        return Some(TCX_NEXT);
    }
    let me = unsafe { (*ctx.skb.skb).ifindex };
    match bound_veth6(key.src) {
        Some(bound) if bound == me => None,
        Some(bound) if POD_VETHS.get_ptr(bound).is_some() => {
            count(Reason::DropFastSpoofedSource, len);
            Some(TC_ACT_SHOT)
        }
        _ => {
            count(Reason::PassFastUnbound, len);
            Some(TCX_NEXT)
        }
    }
}

/// `veth_to_pod` for an IPv6 frame the host delivers: binds its destination
/// to this veth and, if the host's rule marked it, approves its flow toward
/// the pod.
#[classifier]
pub fn veth_to_pod6(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let Some(fast_cfg) = fast::config() else {
        return TCX_NEXT;
    };
    count(Reason::SlowToPod, len);
    let marked = fast::take_mark(&ctx, fast_cfg);
    let Some((_, cfg6)) = fast6::config6() else {
        return TCX_NEXT;
    };
    let Some(w) = pod6_window(&ctx) else {
        return TCX_NEXT;
    };
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    bind_pod_address6(cfg6, &w, ifindex);
    if !marked {
        return TCX_NEXT;
    }
    let mut key = FlowKey6::default();
    let Ok(flow) = parse_flow6(flow6_part(&w), len - ETH_HDR_LEN as u32, &mut key) else {
        return TCX_NEXT;
    };
    if flow.tcp_control || !cfg6.is_local_pod(key.dst) {
        return TCX_NEXT;
    }
    let mut pod = FastFlow6 {
        approved_ns: fast::now_ns(),
        ifindex,
        ..FastFlow6::default()
    };
    let Some(vtep) = serving_vtep6(key.src) else {
        return TCX_NEXT;
    };
    pod.vtep = vtep;
    pod.pod_mac.copy_from_slice(&w[0..6]);
    pod.gw_mac.copy_from_slice(&w[6..12]);
    key.dir = DIR_TO_POD;
    fast6::approve6(&key, &pod, len);
    TCX_NEXT
}

/// Records that the host delivers the packet's destination to this veth
/// (its own neighbour discovery and bridge decisions).
#[inline(always)]
fn bind_pod_address6(cfg6: &FastPathConfig6, w: &Pod6Window, ifindex: u32) {
    let at = ETH_HDR_LEN + 24;
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&w[at..at + 16]);
    if !cfg6.is_local_pod(dst) {
        return;
    }
    if bound_veth6(dst) != Some(ifindex) {
        let _ = POD_ADDRS6.insert(dst, ifindex, 0);
    }
}

/// The veth `ip` is bound to in `POD_ADDRS6`.
#[inline(always)]
fn bound_veth6(ip: [u8; 16]) -> Option<u32> {
    POD_ADDRS6.get_ptr(ip).map(|p| unsafe { *p })
}
