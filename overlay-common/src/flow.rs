//! The UDP source port of an encapsulated packet, chosen like the kernel's
//! `udp_flow_src_port()` so that our packets and the kernel vxlan device's
//! spread over receive queues in the same way.

use crate::consts::{VXLAN_SRC_PORT_MAX, VXLAN_SRC_PORT_MIN};

/// Maps a flow hash into `[min, max)` exactly like the kernel's
/// `udp_flow_src_port()` (include/net/udp.h): the low half of the hash is
/// folded into the high half (only the high bits survive the scaling) and the
/// result is scaled, not reduced modulo, into the range.
pub const fn udp_flow_src_port(hash: u32, min: u16, max: u16) -> u16 {
    let hash = hash ^ (hash << 16);
    let span = max.saturating_sub(min) as u64;
    (((hash as u64 * span) >> 32) as u16) + min
}

/// The source port the kernel vxlan device of a flannel node would choose for
/// a packet whose skb hash is `hash` (`skb_get_hash()`, which `bpf_get_hash_recalc`
/// returns, so the same flow gets the same port on either datapath).
pub const fn vxlan_src_port(hash: u32) -> u16 {
    udp_flow_src_port(hash, VXLAN_SRC_PORT_MIN, VXLAN_SRC_PORT_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // Hand-computed from the kernel formula with min 32768, max 60999.
        assert_eq!(vxlan_src_port(0), 32768);
        // 0xffffffff ^ 0xffff0000 = 0x0000ffff: tiny after scaling.
        assert_eq!(vxlan_src_port(0xffff_ffff), 32768);
        // 0x0000ffff ^ 0xffff0000 = 0xffffffff: (0xffffffff * 28231) >> 32 = 28230.
        assert_eq!(vxlan_src_port(0x0000_ffff), 60998);
        // 0x00008000 ^ 0x80000000 = 0x80008000: (0x80008000 * 28231) >> 32 = 14115.
        assert_eq!(vxlan_src_port(0x0000_8000), 32768 + 14115);
    }

    #[test]
    fn both_halves_of_the_hash_matter() {
        assert_ne!(vxlan_src_port(0x1234_0000), vxlan_src_port(0));
        assert_ne!(vxlan_src_port(0x0000_1234), vxlan_src_port(0));
    }

    #[test]
    fn stays_in_range_over_many_hashes() {
        let mut hash = 0x9e37_79b9u32;
        let (mut lo, mut hi) = (u16::MAX, 0);
        for _ in 0..100_000 {
            hash = hash.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let port = vxlan_src_port(hash);
            assert!((VXLAN_SRC_PORT_MIN..VXLAN_SRC_PORT_MAX).contains(&port));
            lo = lo.min(port);
            hi = hi.max(port);
        }
        // The whole range is used, not a slice of it.
        assert!(lo < VXLAN_SRC_PORT_MIN + 100);
        assert!(hi > VXLAN_SRC_PORT_MAX - 100);
    }

    #[test]
    fn empty_range_gives_min() {
        assert_eq!(udp_flow_src_port(0xdead_beef, 4789, 4789), 4789);
    }
}
