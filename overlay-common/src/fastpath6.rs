//! The fast path for IPv6 pod traffic on a dual-stack node: the same
//! approvals, bindings and rules as [`crate::fastpath`] (read it first),
//! keyed by IPv6 addresses and carried as VXLAN over IPv6.
//!
//! What differs from IPv4: the host's approvals come from the ip6tables (or
//! nft) mangle rule for the IPv6 pod subnet; the hop limit is decremented
//! with no header checksum to fix; ICMPv6 other than echo (neighbour
//! discovery above all) and any extension header always take the host's
//! path; and the node's own addresses in the pod subnet are the subnet's
//! first address (`flannel-v6.<VNI>`'s, and the subnet-router anycast
//! address) and the bridge's, as IPv6 has no broadcast address.

use crate::{
    consts::{ETH_HDR_LEN, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, IPV6_HDR_LEN},
    fastpath::{L4_MIN_PEEK_LEN, L4_PEEK_LEN, NotAFlow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// The shortest IPv6 packet [`parse_flow6`] can take.
pub const MIN_FLOW6_LEN: usize = IPV6_HDR_LEN + L4_MIN_PEEK_LEN;
/// The fixed IPv6 header and the start of the transport header.
pub const FLOW6_WINDOW_LEN: usize = IPV6_HDR_LEN + L4_PEEK_LEN;
pub type Flow6Window = [u8; FLOW6_WINDOW_LEN];
/// Ethernet, IPv6 and the transport peek: what the veth programs copy.
pub const POD6_WINDOW_LEN: usize = ETH_HDR_LEN + FLOW6_WINDOW_LEN;
pub type Pod6Window = [u8; POD6_WINDOW_LEN];

/// Offset of the hop limit inside an IPv6 header.
pub const IPV6_HOP_LIMIT_OFFSET: usize = 7;

/// Key of `FAST_FLOWS6`: [`crate::fastpath::FlowKey`] with IPv6 addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey6 {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    /// `DIR_TO_POD` or `DIR_FROM_POD`.
    pub dir: u8,
    pub _pad: [u8; 2],
}

/// Value of `FAST_FLOWS6`: [`crate::fastpath::FastFlow`] with the serving
/// VTEP's `PublicIPv6` (the outer source its VXLAN must come from).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastFlow6 {
    pub approved_ns: u64,
    pub ifindex: u32,
    pub pod_mac: [u8; 6],
    pub gw_mac: [u8; 6],
    /// Toward a pod: the `PublicIPv6` of the VTEP serving the flow's source
    /// when it was approved. Zero from a pod.
    pub vtep: [u8; 16],
}

/// The single entry of `FAST_CONFIG6`: the IPv6 side of the fast path. The
/// approval bit is `FAST_CONFIG`'s, and nothing here is used unless
/// `FAST_CONFIG` is on too.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastPathConfig6 {
    /// Non-zero when IPv6 flows may take the fast path.
    pub enabled: u32,
    pub pod_prefix_len: u32,
    /// This node's IPv6 pod subnet.
    pub pod_subnet: [u8; 16],
    /// The pod bridge's IPv6 address in the subnet (zero while no bridge
    /// holds one): the node's, never a pod's.
    pub gateway: [u8; 16],
}

impl FastPathConfig6 {
    /// Whether `ip` is in this node's IPv6 pod subnet.
    pub fn in_pod_subnet(&self, ip: [u8; 16]) -> bool {
        let (hi, lo) = prefix_masks(self.pod_prefix_len);
        let (ip_hi, ip_lo) = halves(ip);
        let (net_hi, net_lo) = halves(self.pod_subnet);
        ip_hi & hi == net_hi & hi && ip_lo & lo == net_lo & lo
    }

    /// Whether `ip` is the node's own in the pod subnet: the subnet's first
    /// address (`flannel-v6.<VNI>`'s) or the bridge's.
    pub fn is_node_address(&self, ip: [u8; 16]) -> bool {
        let (hi, lo) = prefix_masks(self.pod_prefix_len);
        let (ip_hi, ip_lo) = halves(ip);
        (ip_hi & !hi == 0 && ip_lo & !lo == 0) || (self.gateway != [0; 16] && ip == self.gateway)
    }

    /// Whether `ip` may be a pod behind one of our veths.
    pub fn is_local_pod(&self, ip: [u8; 16]) -> bool {
        self.in_pod_subnet(ip) && !self.is_node_address(ip)
    }
}

/// The address as two 64-bit halves (BPF has no 128-bit shifts).
fn halves(ip: [u8; 16]) -> (u64, u64) {
    let mut hi = [0u8; 8];
    let mut lo = [0u8; 8];
    hi.copy_from_slice(&ip[..8]);
    lo.copy_from_slice(&ip[8..]);
    (u64::from_be_bytes(hi), u64::from_be_bytes(lo))
}

/// The network mask of a prefix length as two 64-bit halves.
fn prefix_masks(prefix_len: u32) -> (u64, u64) {
    let mask = |bits: u32| match bits {
        0 => 0,
        b if b >= 64 => u64::MAX,
        b => u64::MAX << (64 - b),
    };
    let bits = prefix_len.min(128);
    (mask(bits), mask(bits.saturating_sub(64)))
}

/// One direction of an IPv6 flow the fast path could take; its key is
/// written where the caller says (see [`parse_flow6`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow6 {
    /// TCP with SYN, FIN or RST, or without ACK.
    pub tcp_control: bool,
    pub hop_limit: u8,
}

impl Flow6 {
    /// The hop limit after forwarding one hop (the parse refused 0 and 1).
    pub const fn next_hop_limit(&self) -> [u8; 1] {
        [self.hop_limit - 1]
    }
}

/// Reads the flow of an IPv6 packet whose header starts `w` and whose length
/// from there on is `l3_len`. Only TCP, UDP and ICMPv6 echo right behind the
/// fixed header (no extension header: fragments, routing headers and
/// hop-by-hop options stay the host's), with a hop limit above 1 and a
/// payload length that fits, qualify. Bytes of `w` beyond the packet must
/// be zero.
///
/// The flow's key goes into `key` (all but `dir`, which the caller sets),
/// not into the result: returned by value, LLVM splits it into 40 bytes
/// held in registers and spills each to its own 8-byte stack slot across
/// the programs' helper calls, past BPF's 512 bytes of stack.
pub fn parse_flow6(w: &Flow6Window, l3_len: u32, key: &mut FlowKey6) -> Result<Flow6, NotAFlow> {
    if w[0] >> 4 != 6 {
        return Err(NotAFlow::Unusual);
    }
    let payload = u32::from(u16::from_be_bytes([w[4], w[5]]));
    let proto = w[6];
    let needed = if proto == IPPROTO_TCP {
        L4_PEEK_LEN
    } else {
        L4_MIN_PEEK_LEN
    };
    // A jumbogram (BIG TCP) says 0 and is refused with the garbage.
    if payload < needed as u32 || IPV6_HDR_LEN as u32 + payload > l3_len {
        return Err(NotAFlow::Unusual);
    }
    let hop_limit = w[7];
    if hop_limit <= 1 {
        // Forwarding would answer "time exceeded": let it.
        return Err(NotAFlow::Unusual);
    }
    // `parse_flow`'s reading of the transport header, with ICMPv6's echo
    // types. Written out twice on purpose: a helper shared by both made
    // LLVM give `vxlan_ingress_tc` more than BPF's 512 bytes of stack.
    let l4 = IPV6_HDR_LEN;
    let (sport, dport, tcp_control) = match proto {
        IPPROTO_TCP => (
            [w[l4], w[l4 + 1]],
            [w[l4 + 2], w[l4 + 3]],
            w[l4 + 13] & (TCP_SYN | TCP_FIN | TCP_RST) != 0 || w[l4 + 13] & TCP_ACK == 0,
        ),
        IPPROTO_UDP => ([w[l4], w[l4 + 1]], [w[l4 + 2], w[l4 + 3]], false),
        IPPROTO_ICMPV6 if w[l4] == ICMPV6_ECHO_REQUEST || w[l4] == ICMPV6_ECHO_REPLY => {
            ([w[l4 + 4], w[l4 + 5]], [w[l4], 0], false)
        }
        _ => return Err(NotAFlow::Unusual),
    };
    key.src.copy_from_slice(&w[8..24]);
    key.dst.copy_from_slice(&w[24..40]);
    key.sport = sport;
    key.dport = dport;
    key.proto = proto;
    Ok(Flow6 {
        tcp_control,
        hop_limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(w: &Flow6Window, l3_len: u32) -> Result<(FlowKey6, Flow6), NotAFlow> {
        let mut key = FlowKey6::default();
        parse_flow6(w, l3_len, &mut key).map(|f| (key, f))
    }

    const SRC: [u8; 16] = [0xfd, 0x10, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 7];
    const DST: [u8; 16] = [0xfd, 0x10, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 5];

    fn packet(proto: u8, l4: [u8; L4_PEEK_LEN]) -> Flow6Window {
        let mut w = [0u8; FLOW6_WINDOW_LEN];
        w[0] = 0x60;
        w[4..6].copy_from_slice(&60u16.to_be_bytes());
        w[6] = proto;
        w[7] = 64;
        w[8..24].copy_from_slice(&SRC);
        w[24..40].copy_from_slice(&DST);
        w[40..].copy_from_slice(&l4);
        w
    }

    fn tcp(flags: u8) -> Flow6Window {
        let mut l4 = [0u8; L4_PEEK_LEN];
        l4[0..2].copy_from_slice(&5201u16.to_be_bytes());
        l4[2..4].copy_from_slice(&40000u16.to_be_bytes());
        l4[13] = flags;
        packet(IPPROTO_TCP, l4)
    }

    #[test]
    fn reads_tcp_udp_and_icmpv6_echo_flows() {
        let (k, f) = parse(&tcp(0x10), 100).unwrap();
        assert_eq!((k.src, k.dst), (SRC, DST));
        assert_eq!(k.sport, 5201u16.to_be_bytes());
        assert_eq!(k.dport, 40000u16.to_be_bytes());
        assert_eq!((k.proto, k.dir, f.tcp_control), (6, 0, false));
        assert_eq!(f.next_hop_limit(), [63]);

        let mut l4 = [0u8; L4_PEEK_LEN];
        l4[0..4].copy_from_slice(&[0x13, 0x88, 0x9c, 0x40]);
        let (k, _) = parse(&packet(IPPROTO_UDP, l4), 100).unwrap();
        assert_eq!((k.sport, k.dport), ([0x13, 0x88], [0x9c, 0x40]));
        // A datagram with no payload (48 bytes of IPv6) is a flow too.
        let mut small = packet(IPPROTO_UDP, l4);
        small[4..6].copy_from_slice(&8u16.to_be_bytes());
        small[48..].fill(0);
        assert!(parse(&small, 48).is_ok());

        for ty in [128, 129] {
            let mut l4 = [0u8; L4_PEEK_LEN];
            l4[0] = ty;
            l4[4..6].copy_from_slice(&[0x12, 0x34]);
            let (k, _) = parse(&packet(IPPROTO_ICMPV6, l4), 100).unwrap();
            assert_eq!((k.sport, k.dport), ([0x12, 0x34], [ty, 0]));
        }
    }

    #[test]
    fn tcp_control_is_read_as_over_ipv4() {
        for flags in [0x02, 0x12, 0x01, 0x11, 0x04, 0x14, 0x00, 0x08] {
            assert!(parse(&tcp(flags), 100).unwrap().1.tcp_control);
        }
        for flags in [0x10, 0x18] {
            assert!(!parse(&tcp(flags), 100).unwrap().1.tcp_control);
        }
    }

    #[test]
    fn neighbour_discovery_extension_headers_and_garbage_are_not_flows() {
        let good = tcp(0x10);
        let mut not_v6 = good;
        not_v6[0] = 0x45;
        let mut hop1 = good;
        hop1[7] = 1;
        let mut hop_by_hop = good;
        hop_by_hop[6] = 0;
        let mut fragment = good;
        fragment[6] = 44;
        let mut routing = good;
        routing[6] = 43;
        let mut jumbo = good;
        jumbo[4..6].fill(0);
        let mut long = good;
        long[4..6].copy_from_slice(&61u16.to_be_bytes());
        let mut short_tcp = good;
        short_tcp[4..6].copy_from_slice(&13u16.to_be_bytes());
        for w in [
            not_v6, hop1, hop_by_hop, fragment, routing, jumbo, long, short_tcp,
        ] {
            assert_eq!(parse(&w, 100), Err(NotAFlow::Unusual));
        }
        // Router/neighbour solicitation and advertisement, redirect,
        // unreachable, packet too big: the host's, always.
        for ty in [133, 134, 135, 136, 137, 1, 2] {
            let w = packet(IPPROTO_ICMPV6, [ty; L4_PEEK_LEN]);
            assert_eq!(parse(&w, 100), Err(NotAFlow::Unusual), "type {ty}");
        }
    }

    #[test]
    fn local_pods_and_node_addresses() {
        let mut subnet = [0u8; 16];
        subnet[..8].copy_from_slice(&DST[..8]);
        let mut cfg = FastPathConfig6 {
            enabled: 1,
            pod_prefix_len: 64,
            pod_subnet: subnet,
            gateway: [0; 16],
        };
        assert!(cfg.is_local_pod(DST));
        assert!(!cfg.in_pod_subnet(SRC));
        // flannel-v6.<VNI>'s address (the subnet's first) is the node's.
        assert!(cfg.in_pod_subnet(subnet) && !cfg.is_local_pod(subnet));
        let mut gw = subnet;
        gw[15] = 1;
        assert!(cfg.is_local_pod(gw));
        cfg.gateway = gw;
        assert!(cfg.is_node_address(gw) && !cfg.is_local_pod(gw));
        assert!(cfg.is_local_pod(DST));
    }

    #[test]
    fn prefixes_of_every_length_split_across_the_halves() {
        let mut ip = [0u8; 16];
        ip[0] = 0xfd;
        ip[15] = 9;
        for prefix_len in [0, 1, 48, 63, 64, 65, 80, 127, 128] {
            let cfg = FastPathConfig6 {
                enabled: 1,
                pod_prefix_len: prefix_len,
                pod_subnet: ip,
                gateway: [0; 16],
            };
            assert!(cfg.in_pod_subnet(ip), "/{prefix_len}");
            // The last bit of the prefix flipped is outside (if there is one).
            if prefix_len > 0 {
                let mut other = ip;
                let bit = prefix_len as usize - 1;
                other[bit / 8] ^= 0x80 >> (bit % 8);
                assert!(!cfg.in_pod_subnet(other), "/{prefix_len}");
            }
            // The first host bit flipped is inside (if there is one).
            if prefix_len < 128 {
                let mut other = ip;
                let bit = prefix_len as usize;
                other[bit / 8] ^= 0x80 >> (bit % 8);
                assert!(cfg.in_pod_subnet(other), "/{prefix_len}");
            }
        }
    }

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<FlowKey6>(), 40);
        assert_eq!(core::mem::size_of::<FastFlow6>(), 40);
        assert_eq!(core::mem::size_of::<FastPathConfig6>(), 40);
    }
}
