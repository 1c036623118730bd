//! The overlay's TC and XDP programs. Each entry point copies a fixed header
//! window out of the packet, lets `overlay_common` decide, applies the
//! decision and counts it; see `overlay_common::{egress, egress6, ingress, ingress6, encap, encap6,
//! fastpath, fastpath6}`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod count;
#[cfg(target_arch = "bpf")]
mod egress;
#[cfg(target_arch = "bpf")]
mod egress6;
#[cfg(target_arch = "bpf")]
mod fast;
#[cfg(target_arch = "bpf")]
mod fast6;
#[cfg(target_arch = "bpf")]
mod ingress_tc;
#[cfg(target_arch = "bpf")]
mod ingress_tc6;
#[cfg(target_arch = "bpf")]
mod ingress_xdp;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod skb;
#[cfg(target_arch = "bpf")]
mod veth;
#[cfg(target_arch = "bpf")]
mod veth6;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
