//! The fast path's programs on a pod's host-side veth.
//!
//! `veth_from_pod` (TCX ingress: what the pod sends) encapsulates an
//! approved flow's packet to a remote pod and sends it straight out of the
//! underlay, skipping `cni0`, routing and `flannel.<VNI>`; only from the veth
//! the host delivers the packet's source address to. `veth_to_pod` (TCX
//! egress: what the host's bridge delivers) records which veth each pod
//! address is delivered to, and turns packets the host's mangle rule marked
//! into approvals for `vxlan_ingress_tc`, naming the VTEP that serves the
//! flow's source. Everything else continues down the hook's chain untouched,
//! except a packet from a pod with a source the host would refuse (a node
//! address, or another pod's address on an approved flow): it is dropped
//! and counted. IPv6 frames are `veth6`'s programs', as tail calls.

use aya_ebpf::{
    bindings::TC_ACT_SHOT, btf_maps::lpm_trie::Key, macros::classifier, programs::TcContext,
};
use overlay_common::{
    consts::{ETH_HDR_LEN, ETH_P_IP, ETH_P_IPV6, JUMP_VETH_FROM_POD6, JUMP_VETH_TO_POD6},
    counters::Reason,
    egress::{EgressPacket, EgressVerdict, EgressWindow, classify_egress},
    fastpath::{
        DIR_FROM_POD, DIR_TO_POD, FastFlow, FastPathConfig, FlowWindow, MIN_FLOW_LEN,
        POD_WINDOW_LEN, PodWindow, decrement_ttl, parse_flow,
    },
};

use crate::{
    count::count,
    egress::encapsulate,
    fast,
    maps::{JUMPS, NODE_CONFIG, POD_ADDRS, POD_VETHS, REMOTE_SUBNETS, serving_vtep},
    skb::{self, TCX_NEXT},
};

/// The shortest frame that can carry a flow: Ethernet, IPv4 and 8 bytes of
/// UDP or ICMP.
const SHORT_POD_WINDOW_LEN: usize = ETH_HDR_LEN + MIN_FLOW_LEN;

/// The Ethernet and fixed IPv4 headers at the window's start, as the egress
/// classifier reads them.
#[inline(always)]
fn egress_part(w: &PodWindow) -> &EgressWindow {
    unsafe { &*w.as_ptr().cast::<EgressWindow>() }
}

/// The IPv4 header and transport peek after the Ethernet header.
#[inline(always)]
fn flow_part(w: &PodWindow) -> &FlowWindow {
    unsafe { &*w.as_ptr().add(ETH_HDR_LEN).cast::<FlowWindow>() }
}

/// The frame's first bytes if it is IPv4 long enough to be a flow; counts
/// why not otherwise.
#[inline(always)]
fn ipv4_window(ctx: &TcContext, len: u32, counted: bool) -> Option<PodWindow> {
    let ipv4 = |ethertype: &[u8]| u16::from_be_bytes([ethertype[0], ethertype[1]]) == ETH_P_IP;
    let window = if len as usize >= POD_WINDOW_LEN {
        skb::load_head::<POD_WINDOW_LEN>(ctx)
    } else if len as usize >= SHORT_POD_WINDOW_LEN {
        // A small UDP datagram or ping: the rest of the window stays zero,
        // as parse_flow expects (an unpadded 42-byte ARP lands here too).
        let mut w = [0u8; POD_WINDOW_LEN];
        skb::load::<SHORT_POD_WINDOW_LEN, POD_WINDOW_LEN>(ctx, 0, &mut w, 0).then_some(w)
    } else {
        None
    };
    let reason = match window {
        Some(w) if ipv4(&w[12..14]) => return Some(w),
        Some(_) => Reason::PassNotIpv4,
        // Too short for any flow: only the EtherType decides the reason.
        None => match skb::load_head::<ETH_HDR_LEN>(ctx) {
            Some(eth) if !ipv4(&eth[12..14]) => Reason::PassNotIpv4,
            _ => Reason::PassFastUnusual,
        },
    };
    if counted {
        count(reason, len);
    }
    None
}

#[classifier]
pub fn veth_from_pod(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let (Some(cfg), Some(fast_cfg)) = (NODE_CONFIG.get(0), fast::config()) else {
        return TCX_NEXT;
    };
    if is_ipv6(&ctx) {
        // No return on success: veth_from_pod6 runs in our place.
        unsafe { JUMPS.tail_call(&ctx, JUMP_VETH_FROM_POD6) };
        count(Reason::PassNotIpv4, len);
        return TCX_NEXT;
    }
    let Some(w) = ipv4_window(&ctx, len, true) else {
        return TCX_NEXT;
    };
    let flow = match parse_flow(flow_part(&w), len - ETH_HDR_LEN as u32) {
        Ok(flow) if fast_cfg.in_pod_subnet(flow.key.src) => flow,
        _ => {
            count(Reason::PassFastUnusual, len);
            return TCX_NEXT;
        }
    };
    if fast_cfg.is_node_address(flow.key.src) {
        // A pod sending as the node (flannel.<VNI>'s or the bridge's
        // address): the host's path drops it as a martian.
        count(Reason::DropFastSpoofedSource, len);
        return TC_ACT_SHOT;
    }
    let pkt = EgressPacket {
        len,
        gso: skb::is_gso(&ctx),
    };
    let plan = match classify_egress(egress_part(&w), pkt, cfg, |dst| {
        REMOTE_SUBNETS.get(&Key::new(32, dst)).copied()
    }) {
        EgressVerdict::Encap(plan) => plan,
        EgressVerdict::Pass(Reason::PassNoRoute) => {
            count(Reason::PassFastNotRemote, len);
            return TCX_NEXT;
        }
        // Too big, not configured, malformed: the host's path decides.
        EgressVerdict::Pass(reason) | EgressVerdict::Drop(reason) => {
            count(reason, len);
            return TCX_NEXT;
        }
    };
    let key = flow.with_dir(DIR_FROM_POD);
    if flow.tcp_control {
        fast::revoke(&key);
        count(Reason::PassFastTcpControl, len);
        return TCX_NEXT;
    }
    if fast::approval(&key).is_none() {
        count(Reason::PassFastUnapproved, len);
        return TCX_NEXT;
    }
    let me = unsafe { (*ctx.skb.skb).ifindex };
    match bound_veth(flow.key.src) {
        Some(bound) if bound == me => {}
        Some(bound) if POD_VETHS.get_ptr(bound).is_some() => {
            // Another live pod's address: on the host's path this would
            // meet the bridge's and the firewall's anti-spoofing.
            count(Reason::DropFastSpoofedSource, len);
            return TC_ACT_SHOT;
        }
        _ => {
            count(Reason::PassFastUnbound, len);
            return TCX_NEXT;
        }
    }
    encapsulate(
        &ctx,
        cfg,
        &plan,
        len,
        Some(decrement_ttl(&flow)),
        Reason::FastEgress,
        TCX_NEXT,
    )
}

#[classifier]
pub fn veth_to_pod(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let Some(fast_cfg) = fast::config() else {
        return TCX_NEXT;
    };
    if is_ipv6(&ctx) {
        // veth_to_pod6 counts and takes the mark itself.
        unsafe { JUMPS.tail_call(&ctx, JUMP_VETH_TO_POD6) };
    }
    count(Reason::SlowToPod, len);
    let marked = fast::take_mark(&ctx, fast_cfg);
    let Some(w) = ipv4_window(&ctx, len, false) else {
        return TCX_NEXT;
    };
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    bind_pod_address(fast_cfg, &w, ifindex);
    if !marked {
        return TCX_NEXT;
    }
    let Ok(flow) = parse_flow(flow_part(&w), len - ETH_HDR_LEN as u32) else {
        return TCX_NEXT;
    };
    if flow.tcp_control || !fast_cfg.is_local_pod(flow.key.dst) {
        return TCX_NEXT;
    }
    // Only overlay flows: the fast path takes VXLAN on this flow from the
    // VTEP serving its source, and nothing else (a flow from the host or a
    // local pod never arrives as VXLAN).
    let Some(vtep) = serving_vtep(flow.key.src) else {
        return TCX_NEXT;
    };
    let mut pod = FastFlow {
        approved_ns: fast::now_ns(),
        ifindex,
        vtep,
        ..FastFlow::default()
    };
    pod.pod_mac.copy_from_slice(&w[0..6]);
    pod.gw_mac.copy_from_slice(&w[6..12]);
    fast::approve(&flow.with_dir(DIR_TO_POD), &pod, len);
    TCX_NEXT
}

/// Whether the frame is IPv6 (for `veth6`).
#[inline(always)]
fn is_ipv6(ctx: &TcContext) -> bool {
    ctx.skb.protocol() == u32::from(ETH_P_IPV6.to_be())
}

/// Records that the host delivers the packet's destination address to this
/// veth (its own ARP and bridge decisions), written only when it changes.
#[inline(always)]
fn bind_pod_address(cfg: &FastPathConfig, w: &PodWindow, ifindex: u32) {
    let at = ETH_HDR_LEN + 16;
    let dst = [w[at], w[at + 1], w[at + 2], w[at + 3]];
    if !cfg.is_local_pod(dst) {
        return;
    }
    if bound_veth(dst) != Some(ifindex) {
        let _ = POD_ADDRS.insert(dst, ifindex, 0);
    }
}

/// The veth `ip` is bound to in `POD_ADDRS`.
#[inline(always)]
fn bound_veth(ip: [u8; 4]) -> Option<u32> {
    POD_ADDRS.get_ptr(ip).map(|p| unsafe { *p })
}
