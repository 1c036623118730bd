//! The fast path's pieces for IPv6 flows (see `overlay_common::fastpath6`):
//! approvals recorded by `vxlan_egress6` and `veth_to_pod`, used by
//! `veth_from_pod` and the IPv6 half of `vxlan_ingress_tc`.

use aya_ebpf::{bindings::TC_ACT_SHOT, programs::TcContext};
use overlay_common::{
    consts::{ETH_HDR_LEN, ETH_P_IPV6, VXLAN6_ENCAP_LEN},
    counters::Reason,
    fastpath::{DIR_FROM_POD, DIR_TO_POD, FastPathConfig, approval_valid},
    fastpath6::{
        FLOW6_WINDOW_LEN, FastFlow6, FastPathConfig6, Flow6Window, FlowKey6, IPV6_HOP_LIMIT_OFFSET,
        MIN_FLOW6_LEN, parse_flow6,
    },
    ingress6::{INGRESS6_WINDOW_LEN, OUTER_SRC6_OFFSET},
};

use crate::{
    count::count,
    fast::{self, PodTarget},
    maps::{FAST_CONFIG6, FAST_FLOWS6, POD_VETHS, serving_vtep6},
    skb,
};

/// Both halves of the fast path's settings, if IPv6 flows may take it.
#[inline(always)]
pub fn config6() -> Option<(&'static FastPathConfig, &'static FastPathConfig6)> {
    let cfg = fast::config()?;
    let cfg6 = FAST_CONFIG6.get(0).filter(|c| c.enabled != 0)?;
    Some((cfg, cfg6))
}

/// The IPv6 header and transport peek from `offset` (zeros past a short
/// packet's end).
#[inline(always)]
pub fn load_flow6_window(ctx: &TcContext, offset: u32) -> Option<Flow6Window> {
    fast::load_window::<FLOW6_WINDOW_LEN, MIN_FLOW6_LEN>(ctx, offset)
}

#[inline(always)]
pub fn approve6(key: &FlowKey6, value: &FastFlow6, len: u32) {
    if FAST_FLOWS6.insert(key, value, 0).is_ok() {
        count(Reason::FastApproval, len);
    }
}

#[inline(always)]
pub fn approval6(key: &FlowKey6) -> Option<FastFlow6> {
    let flow = unsafe { FAST_FLOWS6.get(key) }.copied()?;
    approval_valid(flow.approved_ns, fast::now_ns()).then_some(flow)
}

#[inline(always)]
pub fn revoke6(key: &FlowKey6) {
    let _ = FAST_FLOWS6.remove(key);
}

/// `vxlan_egress6` handing an IPv6 packet toward a remote pod on (to the
/// underlay or to the kernel's device): a marked packet from a local pod
/// approves its flow for `veth_from_pod`. Not inlined (here and below):
/// LLVM would give the IPv6 windows stack slots of their own beside the
/// caller's, past BPF's 512 bytes.
#[inline(never)]
pub fn approve_from_pod6(ctx: &TcContext, len: u32) {
    let Some((cfg, cfg6)) = config6() else {
        return;
    };
    if !fast::take_mark(ctx, cfg) {
        return;
    }
    let value = FastFlow6 {
        approved_ns: fast::now_ns(),
        ..FastFlow6::default()
    };
    let Some(w) = load_flow6_window(ctx, ETH_HDR_LEN as u32) else {
        return;
    };
    let mut key = FlowKey6::default();
    let Ok(flow) = parse_flow6(&w, len - ETH_HDR_LEN as u32, &mut key) else {
        return;
    };
    if flow.tcp_control || !cfg6.is_local_pod(key.src) {
        return;
    }
    key.dir = DIR_FROM_POD;
    approve6(&key, &value, len);
}

/// [`fast::deliver_to_pod`] for VXLAN over IPv6 from a known VTEP whose
/// `PEER_STATS` key is `peer`: the same checks, keyed by IPv6 addresses.
#[inline(always)]
pub fn deliver_to_pod6(ctx: &TcContext, peer: [u8; 4], len: u32) -> Option<i32> {
    let (_, cfg6) = config6()?;
    let inner_ip = INGRESS6_WINDOW_LEN as u32;
    let mut key = FlowKey6::default();
    let parsed =
        load_flow6_window(ctx, inner_ip).map(|w| parse_flow6(&w, len - inner_ip, &mut key));
    let flow = match parsed {
        Some(Ok(flow)) if cfg6.is_local_pod(key.dst) => flow,
        _ => {
            count(Reason::PassFastUnusual, len);
            return None;
        }
    };
    if cfg6.in_pod_subnet(key.src) {
        count(Reason::DropFastSpoofedSource, len);
        return Some(TC_ACT_SHOT);
    }
    key.dir = DIR_TO_POD;
    if flow.tcp_control {
        revoke6(&key);
        count(Reason::PassFastTcpControl, len);
        return None;
    }
    let Some(pod) = approval6(&key) else {
        count(Reason::PassFastUnapproved, len);
        return None;
    };
    // Read again rather than passed in: the caller's window would have to
    // stay on its stack across this call.
    let sender = skb::load_at::<16>(ctx, OUTER_SRC6_OFFSET as u32)?;
    if sender != pod.vtep {
        if serving_vtep6(key.src) == Some(sender) {
            revoke6(&key);
            count(Reason::PassFastUnapproved, len);
            return None;
        }
        count(Reason::DropSourceVtepMismatch, len);
        return Some(TC_ACT_SHOT);
    }
    let Some(mtu) = POD_VETHS.get_ptr(pod.ifindex).map(|m| unsafe { *m }) else {
        revoke6(&key);
        count(Reason::PassFastUnusual, len);
        return None;
    };
    // As over IPv4; IPv6 is never fragmented on the way, so a longer packet
    // meets "packet too big" on the host's path.
    if len - inner_ip > mtu && !skb::is_gso(ctx) {
        count(Reason::PassFastUnusual, len);
        return None;
    }
    if !skb::strip_vxlan(ctx, VXLAN6_ENCAP_LEN) {
        return None;
    }
    let target = PodTarget {
        ifindex: pod.ifindex,
        pod_mac: pod.pod_mac,
        gw_mac: pod.gw_mac,
    };
    let forwarded = (ETH_HDR_LEN + IPV6_HOP_LIMIT_OFFSET, flow.next_hop_limit());
    Some(fast::into_pod(
        ctx, &target, ETH_P_IPV6, forwarded, peer, len,
    ))
}
