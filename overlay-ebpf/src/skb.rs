//! Small helpers over the `__sk_buff` of TC programs.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::generated::bpf_skb_load_bytes,
    programs::TcContext,
};
use overlay_common::ingress::DECAP_LEN;

/// `TCX_NEXT` (`TC_ACT_UNSPEC` under legacy clsact): not ours, let the next
/// program on the hook (and the legacy tc filters after them, then the
/// kernel) have it. `TC_ACT_OK` would end the hook's chain there.
pub const TCX_NEXT: i32 = -1;

/// Copies the frame's first `N` bytes; the caller checked that it has them.
/// Not zeroing first matters: LLVM lowers `[0; N]` on BPF to a call to a
/// byte-by-byte `memset`, one loop iteration per byte and packet.
#[inline(always)]
pub fn load_head<const N: usize>(ctx: &TcContext) -> Option<[u8; N]> {
    load_at::<N>(ctx, 0)
}

/// Copies `N` bytes from `offset`; the caller checked that the frame has
/// them. Uninitialised first for the same reason as [`load_head`].
#[inline(always)]
pub fn load_at<const N: usize>(ctx: &TcContext, offset: u32) -> Option<[u8; N]> {
    let mut window = MaybeUninit::<[u8; N]>::uninit();
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            offset,
            window.as_mut_ptr().cast(),
            N as u32,
        )
    };
    // On success the helper wrote all N bytes.
    (ret == 0).then(|| unsafe { window.assume_init() })
}

/// Copies `N` bytes from `offset` into `dst[at..at + N]`. The size is a
/// constant, which is what the verifier wants for `bpf_skb_load_bytes`.
#[inline(always)]
pub fn load<const N: usize, const W: usize>(
    ctx: &TcContext,
    offset: usize,
    dst: &mut [u8; W],
    at: usize,
) -> bool {
    if at + N > W {
        return false;
    }
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            offset as u32,
            dst.as_mut_ptr().add(at).cast(),
            N as u32,
        )
    };
    ret == 0
}

/// `skb->gso_size != 0`: a GSO aggregate.
#[inline(always)]
pub fn is_gso(ctx: &TcContext) -> bool {
    unsafe { (*ctx.skb.skb).gso_size != 0 }
}

/// Removes the outer IPv4/UDP/VXLAN headers and the inner Ethernet header
/// behind the outer Ethernet header, which stays in front. FIXED_GSO: a GSO
/// aggregate keeps its gso_size (the inner MSS). False if the kernel refused
/// (nothing changed then).
#[inline(always)]
pub fn strip_vxlan(ctx: &TcContext) -> bool {
    ctx.adjust_room(
        -(DECAP_LEN as i32),
        BPF_ADJ_ROOM_MAC,
        BPF_F_ADJ_ROOM_FIXED_GSO as u64,
    )
    .is_ok()
}
