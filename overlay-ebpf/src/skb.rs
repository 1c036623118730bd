//! Small helpers over the `__sk_buff` of TC programs.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{
        BPF_CSUM_LEVEL_DEC, BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_ADJ_ROOM_NO_CSUM_RESET,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::generated::{bpf_csum_level, bpf_skb_load_bytes},
    programs::TcContext,
};
#[allow(unused_imports)] // named in the docs
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

/// Removes the outer IP/UDP/VXLAN headers and the inner Ethernet header
/// (`decap_len` bytes: [`DECAP_LEN`] over IPv4, `VXLAN6_ENCAP_LEN` over
/// IPv6) behind the outer Ethernet header, which stays in front, and then
/// [`outer_udp_removed`]. FIXED_GSO: a GSO aggregate keeps its gso_size (the
/// inner MSS). NO_CSUM_RESET: left to itself the helper turns every
/// CHECKSUM_UNNECESSARY into CHECKSUM_NONE (Linux 5.8, commit 836e66c218f3
/// "bpf: Fix up bpf_skb_adjust_room helper's skb csum setting"), which would
/// also throw away a NIC's verdict on the inner checksum. False if the kernel
/// refused (nothing changed then).
#[inline(always)]
pub fn strip_vxlan(ctx: &TcContext, decap_len: u32) -> bool {
    let flags = BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_NO_CSUM_RESET;
    if ctx
        .adjust_room(-(decap_len as i32), BPF_ADJ_ROOM_MAC, flags as u64)
        .is_err()
    {
        return false;
    }
    outer_udp_removed(ctx);
    true
}

/// The outer UDP header is gone (here, or in XDP before the skb existed):
/// one CHECKSUM_UNNECESSARY level less, as the kernel's own UDP receive does
/// for a tunnel (`__skb_checksum_validate_needed` decrements the level it
/// consumed). A NIC reports level 0 when it checked the outer UDP checksum
/// only (or found it 0, which checks nothing), level 1 when it checked the
/// inner TCP/UDP checksum too; left at level 0, the stack would take an
/// inner checksum nobody verified as good. A no-op for CHECKSUM_NONE, for
/// CHECKSUM_COMPLETE (whose sum `bpf_skb_adjust_room` corrects itself) and
/// for CHECKSUM_PARTIAL (from a sender on this machine, its checksum still
/// to be filled in).
#[inline(always)]
pub fn outer_udp_removed(ctx: &TcContext) {
    unsafe { bpf_csum_level(ctx.skb.skb, BPF_CSUM_LEVEL_DEC as u64) };
}
