//! The Internet checksum (RFC 1071) as the outer IPv4 header and the outer
//! UDP header over IPv6 need it.

use crate::consts::IPV4_HDR_LEN;

/// Offset of the checksum field inside an IPv4 header.
const IPV4_CHECK_OFFSET: usize = 10;

/// The checksum to store in an option-less IPv4 header. The checksum field's
/// current content is ignored, so a header can be checksummed before or after
/// the field is filled in.
pub fn ipv4_header_checksum(header: &[u8; IPV4_HDR_LEN]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    // A fixed trip count over a fixed-size array: unrolled by LLVM, no bounds
    // checks left for the verifier.
    while i < IPV4_HDR_LEN {
        if i != IPV4_CHECK_OFFSET {
            sum += u32::from(u16::from_be_bytes([header[i], header[i + 1]]));
        }
        i += 2;
    }
    !fold(sum)
}

/// True if the header's checksum field is correct.
pub fn ipv4_header_checksum_ok(header: &[u8; IPV4_HDR_LEN]) -> bool {
    let stored = u16::from_be_bytes([header[IPV4_CHECK_OFFSET], header[IPV4_CHECK_OFFSET + 1]]);
    ipv4_header_checksum(header) == stored
}

/// Adds `bytes` (an even number) to the one's-complement sum `sum` as
/// big-endian 16-bit words. Unfolded: the caller adds fewer than 65536
/// words before [`fold`].
#[inline(always)]
pub fn sum_words<const N: usize>(mut sum: u32, bytes: &[u8; N]) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// [`sum_words`] over `bytes[from..to]` (both even, `to <= N`).
#[inline(always)]
pub fn sum_words_in<const N: usize>(mut sum: u32, bytes: &[u8; N], from: usize, to: usize) -> u32 {
    let mut i = from;
    while i + 1 < to && i + 1 < N {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// The IPv6 pseudo-header (RFC 8200 section 8.1) of an upper-layer packet
/// of `len` bytes and protocol `next_header` between `src` and `dst`, added
/// to `sum`.
#[inline(always)]
pub fn ipv6_pseudo_sum(sum: u32, src: &[u8; 16], dst: &[u8; 16], len: u32, next_header: u8) -> u32 {
    sum_words(sum_words(sum, src), dst) + (len >> 16) + (len & 0xffff) + u32::from(next_header)
}

/// Folds a 32-bit one's-complement sum into 16 bits (twice is enough for
/// up to 65536 added 16-bit words).
pub const fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header from a real capture, with its checksum (0xb861) as sent.
    const CAPTURED: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];

    #[test]
    fn matches_a_captured_header() {
        assert_eq!(ipv4_header_checksum(&CAPTURED), 0xb861);
        assert!(ipv4_header_checksum_ok(&CAPTURED));
    }

    #[test]
    fn ignores_the_stored_checksum() {
        let mut zeroed = CAPTURED;
        zeroed[10] = 0;
        zeroed[11] = 0;
        assert_eq!(ipv4_header_checksum(&zeroed), 0xb861);
        assert!(!ipv4_header_checksum_ok(&zeroed));
    }

    #[test]
    fn detects_a_flipped_bit() {
        let mut corrupted = CAPTURED;
        corrupted[15] ^= 0x01;
        assert!(!ipv4_header_checksum_ok(&corrupted));
    }

    #[test]
    fn carries_are_folded_back_in() {
        // Every word 0xffff except the checksum: the sum overflows 16 bits
        // nine times; the correct one's-complement result is 0.
        let mut header = [0xffu8; 20];
        header[10] = 0;
        header[11] = 0;
        assert_eq!(ipv4_header_checksum(&header), 0x0000);
    }
}
