//! Every verdict is counted here, per reason.

use overlay_common::counters::Reason;

use crate::maps::COUNTERS;

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
