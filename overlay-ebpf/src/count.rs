//! Every verdict is counted here, per reason.

use overlay_common::counters::Reason;

use crate::maps::{COUNTERS, PEER_STATS};

#[inline(always)]
pub fn count(reason: Reason, bytes: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(reason.index()) {
        // Per-CPU slot and programs do not migrate mid-run: plain adds suffice.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += u64::from(bytes);
        }
    }
}

/// Adds an encapsulated packet to the peer's entry, if the agent created one.
#[inline(always)]
pub fn count_peer_tx(public_ip: [u8; 4], bytes: u32) {
    if let Some(t) = PEER_STATS.get_ptr_mut(public_ip) {
        // Per-CPU value, as above.
        unsafe {
            (*t).tx_packets += 1;
            (*t).tx_bytes += u64::from(bytes);
        }
    }
}

/// Adds an accepted VXLAN packet from the peer to its entry.
#[inline(always)]
pub fn count_peer_rx(public_ip: [u8; 4], bytes: u32) {
    if let Some(t) = PEER_STATS.get_ptr_mut(public_ip) {
        unsafe {
            (*t).rx_packets += 1;
            (*t).rx_bytes += u64::from(bytes);
        }
    }
}
