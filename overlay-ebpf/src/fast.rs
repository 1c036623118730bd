//! The fast path's pieces shared by the programs: approvals recorded on the
//! slow path, checked on the fast one (see `overlay_common::fastpath`).

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::generated::{bpf_ktime_get_ns, bpf_redirect_peer},
    programs::TcContext,
};
use overlay_common::{
    consts::{ETH_HDR_LEN, ETH_P_IP},
    counters::Reason,
    fastpath::{
        DIR_FROM_POD, DIR_TO_POD, FLOW_WINDOW_LEN, FastFlow, FastPathConfig, FlowKey, FlowWindow,
        IPV4_TTL_OFFSET, MIN_FLOW_LEN, approval_valid, decrement_ttl, parse_flow,
    },
    ingress::{DECAP_LEN, INGRESS_WINDOW_LEN, IngressWindow},
};

use crate::{
    count::{count, count_peer_rx},
    maps::{FAST_CONFIG, FAST_FLOWS, POD_VETHS, serving_vtep},
    skb,
};

/// The fast path's settings, if it is on.
#[inline(always)]
pub fn config() -> Option<&'static FastPathConfig> {
    FAST_CONFIG.get(0).filter(|c| c.enabled != 0)
}

/// Whether the host's mangle rule marked this packet's flow as accepted;
/// the mark bit is cleared so nothing after us sees it.
#[inline(always)]
pub fn take_mark(ctx: &TcContext, cfg: &FastPathConfig) -> bool {
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & cfg.mark == 0 {
        return false;
    }
    ctx.set_mark(mark & !cfg.mark);
    true
}

/// Copies the IPv4 header and transport peek that start at `offset`; a
/// packet too short for the whole peek (a small UDP datagram or ping) gets
/// the first [`MIN_FLOW_LEN`] bytes and zeros after them.
#[inline(always)]
pub fn load_flow_window(ctx: &TcContext, offset: u32) -> Option<FlowWindow> {
    load_window::<FLOW_WINDOW_LEN, MIN_FLOW_LEN>(ctx, offset)
}

/// [`load_flow_window`] for either family: `N` bytes from `offset`, or the
/// first `MIN` and zeros.
#[inline(always)]
pub fn load_window<const N: usize, const MIN: usize>(
    ctx: &TcContext,
    offset: u32,
) -> Option<[u8; N]> {
    let len = ctx.len();
    if len >= offset + N as u32 {
        return skb::load_at::<N>(ctx, offset);
    }
    if len < offset + MIN as u32 {
        return None;
    }
    let mut w = [0u8; N];
    skb::load::<MIN, N>(ctx, offset as usize, &mut w, 0).then_some(w)
}

#[inline(always)]
pub fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

/// Records (or renews) an approval.
#[inline(always)]
pub fn approve(key: &FlowKey, value: &FastFlow, len: u32) {
    if FAST_FLOWS.insert(key, value, 0).is_ok() {
        count(Reason::FastApproval, len);
    }
}

/// The flow's approval, if it is still valid.
#[inline(always)]
pub fn approval(key: &FlowKey) -> Option<FastFlow> {
    let flow = unsafe { FAST_FLOWS.get(key) }.copied()?;
    approval_valid(flow.approved_ns, now_ns()).then_some(flow)
}

/// Clears the approval bit of a packet that approves nothing here, so it
/// leaves the node (or reaches the kernel's vxlan device, whose route lookup
/// sees the mark) as the host's rules left it.
#[inline(always)]
pub fn clear_mark(ctx: &TcContext) {
    if let Some(cfg) = config() {
        take_mark(ctx, cfg);
    }
}

/// Ends the approval of a flow whose TCP state is changing.
#[inline(always)]
pub fn revoke(key: &FlowKey) {
    let _ = FAST_FLOWS.remove(key);
}

/// `vxlan_egress` about to encapsulate an IPv4 packet from `flannel.<VNI>`:
/// a marked packet from a local pod approves its flow for `veth_from_pod`.
#[inline(always)]
pub fn approve_from_pod(ctx: &TcContext, len: u32) {
    let Some(cfg) = config() else {
        return;
    };
    if !take_mark(ctx, cfg) {
        return;
    }
    let Some(w) = load_flow_window(ctx, ETH_HDR_LEN as u32) else {
        return;
    };
    let Ok(flow) = parse_flow(&w, len - ETH_HDR_LEN as u32) else {
        return;
    };
    if flow.tcp_control || !cfg.is_local_pod(flow.key.src) {
        return;
    }
    let value = FastFlow {
        approved_ns: now_ns(),
        ..FastFlow::default()
    };
    approve(&flow.with_dir(DIR_FROM_POD), &value, len);
}

/// `vxlan_ingress_tc`, for VXLAN from a known VTEP that is ours to
/// decapsulate (a GSO aggregate included): delivers an approved flow's
/// packet straight into its pod. `None` when the fast path does not take it
/// (nothing changed; the caller carries on as without a fast path).
///
/// The inner source is checked as the host's path would: one of this
/// node's addresses or of our own pod subnet (a martian or a spoof under
/// the host's path) is dropped; VXLAN on an approved flow from a VTEP other
/// than the one the approval names is dropped too, unless that VTEP serves
/// the source now (a peer that moved: the host's path decides and renews).
#[inline(always)]
pub fn deliver_to_pod(ctx: &TcContext, outer: &IngressWindow, len: u32) -> Option<i32> {
    let cfg = config()?;
    let inner_ip = INGRESS_WINDOW_LEN as u32;
    let flow = match load_flow_window(ctx, inner_ip).map(|w| parse_flow(&w, len - inner_ip)) {
        Some(Ok(flow)) if cfg.is_local_pod(flow.key.dst) => flow,
        _ => {
            count(Reason::PassFastUnusual, len);
            return None;
        }
    };
    if cfg.in_pod_subnet(flow.key.src) {
        count(Reason::DropFastSpoofedSource, len);
        return Some(TC_ACT_SHOT);
    }
    let key = flow.with_dir(DIR_TO_POD);
    if flow.tcp_control {
        revoke(&key);
        count(Reason::PassFastTcpControl, len);
        return None;
    }
    let Some(pod) = approval(&key) else {
        count(Reason::PassFastUnapproved, len);
        return None;
    };
    let sender = outer_source(outer);
    if sender != pod.vtep {
        if serving_vtep(flow.key.src) == Some(sender) {
            revoke(&key);
            count(Reason::PassFastUnapproved, len);
            return None;
        }
        count(Reason::DropSourceVtepMismatch, len);
        return Some(TC_ACT_SHOT);
    }
    let Some(mtu) = POD_VETHS.get_ptr(pod.ifindex).map(|m| unsafe { *m }) else {
        // Approved through a veth the agent no longer knows (the pod went).
        revoke(&key);
        count(Reason::PassFastUnusual, len);
        return None;
    };
    // Longer than the pod's MTU (a node with a larger one sent it): the
    // host's path treats it as without the fast path, fragmenting it or
    // answering "fragmentation needed". (An aggregate's segments are the
    // sender's MSS; the pod's stack takes it whole.)
    if len - inner_ip > mtu && !skb::is_gso(ctx) {
        count(Reason::PassFastUnusual, len);
        return None;
    }
    // An aggregate stays whole: nothing transmits it before the pod's socket
    // receives it.
    if !skb::strip_vxlan(ctx, DECAP_LEN) {
        return None;
    }
    let target = PodTarget {
        ifindex: pod.ifindex,
        pod_mac: pod.pod_mac,
        gw_mac: pod.gw_mac,
    };
    let forwarded = (ETH_HDR_LEN + IPV4_TTL_OFFSET, decrement_ttl(&flow));
    Some(into_pod(ctx, &target, ETH_P_IP, forwarded, sender, len))
}

/// The outer IPv4 source (the sending VTEP) in the ingress window.
#[inline(always)]
pub fn outer_source(w: &IngressWindow) -> [u8; 4] {
    [w[26], w[27], w[28], w[29]]
}

/// Where an approved flow toward a pod is delivered, and the MACs the pod
/// saw on the host's path.
pub struct PodTarget {
    pub ifindex: u32,
    pub pod_mac: [u8; 6],
    pub gw_mac: [u8; 6],
}

/// After decapsulation: the frame as the pod's gateway would have sent it
/// (its MACs, `ethertype`, and `forwarded`'s bytes, the TTL or hop limit one
/// lower, at its offset), then into the pod's namespace. `peer` is the
/// sender's PEER_STATS key.
#[inline(always)]
pub fn into_pod<T>(
    ctx: &TcContext,
    pod: &PodTarget,
    ethertype: u16,
    forwarded: (usize, T),
    peer: [u8; 4],
    len: u32,
) -> i32 {
    let mut eth = [0u8; ETH_HDR_LEN];
    eth[0..6].copy_from_slice(&pod.pod_mac);
    eth[6..12].copy_from_slice(&pod.gw_mac);
    eth[12..14].copy_from_slice(&ethertype.to_be_bytes());
    let (at, bytes) = forwarded;
    if ctx.store(0, &eth, 0).is_err() || ctx.store(at, &bytes, 0).is_err() {
        count(Reason::DropAdjustFailed, len);
        return TC_ACT_SHOT;
    }
    // The underlay's receive queue means nothing to the pod's veth, which
    // may have fewer queues. (strip_vxlan lowered the checksum level.)
    unsafe { (*ctx.skb.skb).queue_mapping = 0 };
    let ret = unsafe { bpf_redirect_peer(pod.ifindex, 0) };
    if ret != i64::from(TC_ACT_REDIRECT) {
        count(Reason::DropRedirectFailed, len);
        return TC_ACT_SHOT;
    }
    count(Reason::FastIngress, len);
    count_peer_rx(peer, len);
    TC_ACT_REDIRECT
}
