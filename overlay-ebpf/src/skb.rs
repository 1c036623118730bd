//! Small helpers over the `__sk_buff` of TC programs.

use core::mem::MaybeUninit;

use aya_ebpf::{helpers::generated::bpf_skb_load_bytes, programs::TcContext};

/// Copies the frame's first `N` bytes; the caller checked that it has them.
/// Not zeroing first matters: LLVM lowers `[0; N]` on BPF to a call to a
/// byte-by-byte `memset`, one loop iteration per byte and packet.
#[inline(always)]
pub fn load_head<const N: usize>(ctx: &TcContext) -> Option<[u8; N]> {
    let mut window = MaybeUninit::<[u8; N]>::uninit();
    let ret =
        unsafe { bpf_skb_load_bytes(ctx.skb.skb.cast(), 0, window.as_mut_ptr().cast(), N as u32) };
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
