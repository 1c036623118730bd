//! The fast path: established pod traffic moves between a pod's host-side
//! veth and the underlay NIC without the host's bridge, routing or
//! `flannel.<VNI>`.
//!
//! Only flows the host's firewall has already let through take it. The host
//! records its decision itself: a mangle POSTROUTING rule of the agent's
//! (`FLANNEL-FASTPATH`) first clears the fast path's mark bit
//! ([`FastPathConfig::mark`], [`DEFAULT_FAST_PATH_MARK`] unless
//! `--fast-path-mark` says otherwise), then sets it on packets of
//! ESTABLISHED, non-NATed conntrack entries; the programs on the slow
//! path's last hop (`veth_to_pod` on a pod's veth, `vxlan_egress` on
//! `flannel.<VNI>`) turn a marked packet into an approval of its flow, valid
//! for [`APPROVAL_TTL_NS`]. While it is valid the flow's packets skip the
//! host; then one packet goes the host's way again and, if the firewall still
//! accepts it, renews the approval. TCP SYN, FIN and RST (and segments
//! without ACK) never take the fast path (and end an approval), so conntrack
//! sees every state change.
//!
//! An approval is bound to who may use it, as the host's path would bind
//! the packets: toward a pod it names the VTEP serving the flow's source
//! (the REMOTE_SUBNETS entry when it was approved), and the fast path takes
//! VXLAN on it only from that VTEP; from a pod, the source address must be
//! one the host delivers to that same veth (`POD_ADDRS`, learnt by
//! `veth_to_pod` from the host's own deliveries). The node's own addresses
//! in the pod subnet are never pods.

use crate::consts::{ETH_HDR_LEN, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPV4_HDR_LEN};

/// The default `skb->mark` bit of the fast path's approvals
/// (`--fast-path-mark` picks another). Outside the bits others claim:
/// Calico's default mark mask 0xffff0000, kube-proxy's 0x4000 and 0x8000,
/// Cilium's identity (upper 16 bits), magic (0x0f00) and cluster id (0x00ff)
/// bits, and Istio's 0x539 and 0x200-0x240.
pub const DEFAULT_FAST_PATH_MARK: u32 = 0x0000_1000;

/// How long one slow-path approval lets a flow's packets skip the host. It
/// bounds how long a firewall rule added later takes to apply to a flow
/// already on the fast path, and it refreshes conntrack's timeout (UDP's is
/// 30 s unreplied, 120 s for streams) through the packet that renews it.
pub const APPROVAL_TTL_NS: u64 = 1_000_000_000;

/// `FlowKey::dir`: toward a local pod (approved by `veth_to_pod`, used by
/// `vxlan_ingress_tc`).
pub const DIR_TO_POD: u8 = 1;
/// `FlowKey::dir`: from a local pod (approved by `vxlan_egress`, used by
/// `veth_from_pod`).
pub const DIR_FROM_POD: u8 = 2;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;

pub(crate) const TCP_FIN: u8 = 0x01;
pub(crate) const TCP_SYN: u8 = 0x02;
pub(crate) const TCP_RST: u8 = 0x04;
pub(crate) const TCP_ACK: u8 = 0x10;

/// Bytes of the transport header the programs look at: TCP up to its flags
/// (offset 13), UDP's ports, ICMP's type, code, checksum and echo id.
pub const L4_PEEK_LEN: usize = 14;
/// What UDP and ICMP echo need of it (their headers are 8 bytes): a packet
/// this short is still a flow, the rest of the window is then zero.
pub const L4_MIN_PEEK_LEN: usize = 8;
/// The shortest IPv4 packet [`parse_flow`] can take.
pub const MIN_FLOW_LEN: usize = IPV4_HDR_LEN + L4_MIN_PEEK_LEN;
/// The IPv4 header and the start of the transport header.
pub const FLOW_WINDOW_LEN: usize = IPV4_HDR_LEN + L4_PEEK_LEN;
pub type FlowWindow = [u8; FLOW_WINDOW_LEN];
/// Ethernet, IPv4 and the transport peek: what the veth programs copy.
pub const POD_WINDOW_LEN: usize = ETH_HDR_LEN + FLOW_WINDOW_LEN;
pub type PodWindow = [u8; POD_WINDOW_LEN];

/// Key of `FAST_FLOWS`: one direction of one flow, as its packets carry it.
/// Ports in network order; ICMP echo uses the identifier as `sport` and the
/// type as `dport`'s first byte, so a reply's approval never admits a
/// request (conntrack tracks a request toward a pod as a new flow).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    /// [`DIR_TO_POD`] or [`DIR_FROM_POD`].
    pub dir: u8,
    pub _pad: [u8; 2],
}

/// Value of `FAST_FLOWS`: when the host last approved the flow and, toward a
/// pod, where the host delivered it and which VTEP may send it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastFlow {
    /// `bpf_ktime_get_ns()` of the approving packet.
    pub approved_ns: u64,
    /// Toward a pod: the host-side veth the bridge sent it to (the fast path
    /// delivers with `bpf_redirect_peer` on it). 0 from a pod.
    pub ifindex: u32,
    /// Toward a pod: the destination and source MACs the pod saw on the slow
    /// path (its own and its gateway's).
    pub pod_mac: [u8; 6],
    pub gw_mac: [u8; 6],
    /// Toward a pod: the public IPv4 (network order) of the VTEP serving the
    /// flow's source when it was approved; VXLAN on the flow from any other
    /// outer source does not take the fast path. Zero from a pod.
    pub vtep: [u8; 4],
    pub _pad: u32,
}

/// The single entry of `FAST_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastPathConfig {
    /// Non-zero when the fast path is on; the programs take nothing while 0.
    pub enabled: u32,
    /// This node's pod subnet (network order) and prefix length: only its
    /// addresses are pods behind our veths.
    pub pod_subnet: [u8; 4],
    pub pod_prefix_len: u32,
    /// The single `skb->mark` bit of approvals (`--fast-path-mark`).
    pub mark: u32,
    /// The pod bridge's address in the subnet (network order; zero while no
    /// bridge holds one): the node's, never a pod's.
    pub gateway: [u8; 4],
    pub _pad: u32,
}

impl FastPathConfig {
    /// Whether `ip` (network order) is in this node's pod subnet.
    pub fn in_pod_subnet(&self, ip: [u8; 4]) -> bool {
        let bits = self.pod_prefix_len.min(32);
        if bits == 0 {
            return true;
        }
        let mask = u32::MAX << (32 - bits);
        u32::from_be_bytes(ip) & mask == u32::from_be_bytes(self.pod_subnet) & mask
    }

    /// Whether `ip` is the node's own in the pod subnet: the subnet's network
    /// address (`flannel.<VNI>`'s), its broadcast address, or the bridge's.
    pub fn is_node_address(&self, ip: [u8; 4]) -> bool {
        let bits = self.pod_prefix_len.min(32);
        let host_mask = if bits == 0 {
            u32::MAX
        } else {
            u32::MAX >> bits
        };
        let host = u32::from_be_bytes(ip) & host_mask;
        host == 0 || host == host_mask || (self.gateway != [0; 4] && ip == self.gateway)
    }

    /// Whether `ip` (network order) may be a pod behind one of our veths:
    /// in the pod subnet and not one of the node's addresses there.
    pub fn is_local_pod(&self, ip: [u8; 4]) -> bool {
        self.in_pod_subnet(ip) && !self.is_node_address(ip)
    }
}

/// Whether an approval stamped at `approved_ns` still holds at `now_ns`.
pub const fn approval_valid(approved_ns: u64, now_ns: u64) -> bool {
    now_ns.wrapping_sub(approved_ns) < APPROVAL_TTL_NS
}

/// One direction of a flow the fast path could take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// Key of the flow with `dir` left 0: the caller sets its direction.
    pub key: FlowKey,
    /// TCP with SYN, FIN or RST, or without ACK (conntrack would call the
    /// last INVALID): conntrack must see it.
    pub tcp_control: bool,
    /// The IPv4 TTL, for [`decrement_ttl`].
    pub ttl: u8,
    /// The IPv4 header checksum as stored.
    pub check: u16,
}

impl Flow {
    pub const fn with_dir(&self, dir: u8) -> FlowKey {
        let mut key = self.key;
        key.dir = dir;
        key
    }
}

/// Why a packet is not one the fast path handles (it takes the host's path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotAFlow {
    /// Options, a fragment, a bad header, TTL too low to forward, or a
    /// protocol (or ICMP type) the fast path does not carry.
    Unusual,
}

/// Reads the flow of an IPv4 packet whose header starts `w` and whose length
/// from there on is `l3_len`. Only option-less, unfragmented TCP, UDP and
/// ICMP echo with a TTL above 1 and a consistent length qualify. Bytes of
/// `w` beyond the packet (shorter than the window) must be zero.
pub fn parse_flow(w: &FlowWindow, l3_len: u32) -> Result<Flow, NotAFlow> {
    if w[0] != 0x45 {
        return Err(NotAFlow::Unusual);
    }
    let total = u32::from(u16::from_be_bytes([w[2], w[3]]));
    let needed = if w[9] == IPPROTO_TCP {
        FLOW_WINDOW_LEN
    } else {
        MIN_FLOW_LEN
    };
    // An IPv4 BIG TCP aggregate says 0 and is refused with the garbage.
    if total < needed as u32 || total > l3_len {
        return Err(NotAFlow::Unusual);
    }
    // More fragments or a fragment offset; DF is fine.
    if u16::from_be_bytes([w[6], w[7]]) & 0x3fff != 0 {
        return Err(NotAFlow::Unusual);
    }
    let ttl = w[8];
    if ttl <= 1 {
        // Routing would answer "time exceeded": let it.
        return Err(NotAFlow::Unusual);
    }
    let proto = w[9];
    let l4 = IPV4_HDR_LEN;
    let (sport, dport, tcp_control) = match proto {
        IPPROTO_TCP => (
            [w[l4], w[l4 + 1]],
            [w[l4 + 2], w[l4 + 3]],
            w[l4 + 13] & (TCP_SYN | TCP_FIN | TCP_RST) != 0 || w[l4 + 13] & TCP_ACK == 0,
        ),
        IPPROTO_UDP => ([w[l4], w[l4 + 1]], [w[l4 + 2], w[l4 + 3]], false),
        IPPROTO_ICMP if w[l4] == ICMP_ECHO_REQUEST || w[l4] == ICMP_ECHO_REPLY => {
            ([w[l4 + 4], w[l4 + 5]], [w[l4], 0], false)
        }
        _ => return Err(NotAFlow::Unusual),
    };
    Ok(Flow {
        key: FlowKey {
            src: [w[12], w[13], w[14], w[15]],
            dst: [w[16], w[17], w[18], w[19]],
            sport,
            dport,
            proto,
            dir: 0,
            _pad: [0; 2],
        },
        tcp_control,
        ttl,
        check: u16::from_be_bytes([w[10], w[11]]),
    })
}

/// Offset of the TTL inside an IPv4 header: [`decrement_ttl`]'s four bytes
/// (TTL, protocol, checksum) go there.
pub const IPV4_TTL_OFFSET: usize = 8;

/// TTL, protocol and header checksum after forwarding one hop: the TTL one
/// lower and the checksum updated incrementally (RFC 1624, eqn. 3), as
/// `ip_decrease_ttl()` does.
pub fn decrement_ttl(flow: &Flow) -> [u8; 4] {
    let old = u16::from_be_bytes([flow.ttl, flow.key.proto]);
    let new = u16::from_be_bytes([flow.ttl - 1, flow.key.proto]);
    // HC' = ~(~HC + ~m + m')
    let mut sum = u32::from(!flow.check) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let check = !(sum as u16);
    let c = check.to_be_bytes();
    [flow.ttl - 1, flow.key.proto, c[0], c[1]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::{ipv4_header_checksum, ipv4_header_checksum_ok};

    fn packet(proto: u8, l4: [u8; L4_PEEK_LEN]) -> FlowWindow {
        let mut w = [0u8; FLOW_WINDOW_LEN];
        w[0] = 0x45;
        w[2..4].copy_from_slice(&100u16.to_be_bytes());
        w[6] = 0x40; // DF
        w[8] = 64;
        w[9] = proto;
        w[12..16].copy_from_slice(&[10, 244, 2, 7]);
        w[16..20].copy_from_slice(&[10, 244, 1, 5]);
        let mut hdr = [0u8; 20];
        hdr.copy_from_slice(&w[..20]);
        w[10..12].copy_from_slice(&ipv4_header_checksum(&hdr).to_be_bytes());
        w[20..].copy_from_slice(&l4);
        w
    }

    fn tcp(flags: u8) -> FlowWindow {
        let mut l4 = [0u8; L4_PEEK_LEN];
        l4[0..2].copy_from_slice(&5201u16.to_be_bytes());
        l4[2..4].copy_from_slice(&40000u16.to_be_bytes());
        l4[13] = flags;
        packet(IPPROTO_TCP, l4)
    }

    #[test]
    fn reads_tcp_udp_and_icmp_echo_flows() {
        let f = parse_flow(&tcp(0x10), 100).unwrap();
        assert_eq!(f.key.src, [10, 244, 2, 7]);
        assert_eq!(f.key.dst, [10, 244, 1, 5]);
        assert_eq!(f.key.sport, 5201u16.to_be_bytes());
        assert_eq!(f.key.dport, 40000u16.to_be_bytes());
        assert_eq!((f.key.proto, f.key.dir, f.tcp_control), (6, 0, false));
        assert_eq!(f.with_dir(DIR_TO_POD).dir, DIR_TO_POD);

        let mut l4 = [0u8; L4_PEEK_LEN];
        l4[0..4].copy_from_slice(&[0x13, 0x88, 0x9c, 0x40]);
        let f = parse_flow(&packet(IPPROTO_UDP, l4), 100).unwrap();
        assert_eq!((f.key.sport, f.key.dport), ([0x13, 0x88], [0x9c, 0x40]));
        // A datagram with 4 bytes of payload (32 bytes of IPv4) is a flow too.
        let mut small = packet(IPPROTO_UDP, l4);
        small[2..4].copy_from_slice(&32u16.to_be_bytes());
        small[28..].fill(0);
        assert!(parse_flow(&small, 32).is_ok());

        for ty in [0, 8] {
            let mut l4 = [0u8; L4_PEEK_LEN];
            l4[0] = ty;
            l4[4..6].copy_from_slice(&[0x12, 0x34]);
            let f = parse_flow(&packet(IPPROTO_ICMP, l4), 100).unwrap();
            // A reply's approval must not admit requests: the type is keyed.
            assert_eq!((f.key.sport, f.key.dport), ([0x12, 0x34], [ty, 0]));
        }
    }

    #[test]
    fn tcp_syn_fin_rst_and_segments_without_ack_are_control() {
        // SYN, FIN, RST with or without ACK; no flags, PSH or URG alone.
        for flags in [0x02, 0x12, 0x01, 0x11, 0x04, 0x14, 0x00, 0x08, 0x20] {
            assert!(
                parse_flow(&tcp(flags), 100).unwrap().tcp_control,
                "{flags:#x}"
            );
        }
        for flags in [0x10, 0x18, 0x30] {
            assert!(
                !parse_flow(&tcp(flags), 100).unwrap().tcp_control,
                "{flags:#x}"
            );
        }
    }

    #[test]
    fn unusual_packets_are_not_flows() {
        let good = tcp(0x10);
        let mut options = good;
        options[0] = 0x46;
        let mut not_v4 = good;
        not_v4[0] = 0x65;
        let mut fragment = good;
        fragment[6] = 0x20; // MF
        let mut later_fragment = good;
        later_fragment[7] = 1;
        let mut ttl1 = good;
        ttl1[8] = 1;
        let mut gre = good;
        gre[9] = 47;
        let mut icmp_unreachable = packet(IPPROTO_ICMP, [3; L4_PEEK_LEN]);
        icmp_unreachable[20] = 3;
        let mut long = good;
        long[2..4].copy_from_slice(&101u16.to_be_bytes());
        let mut tiny = good;
        tiny[2..4].copy_from_slice(&20u16.to_be_bytes());
        // TCP needs its flags: 33 bytes are not enough.
        let mut short_tcp = good;
        short_tcp[2..4].copy_from_slice(&33u16.to_be_bytes());
        let mut short_udp = packet(IPPROTO_UDP, [0; L4_PEEK_LEN]);
        short_udp[2..4].copy_from_slice(&27u16.to_be_bytes());
        for w in [
            options,
            not_v4,
            fragment,
            later_fragment,
            ttl1,
            gre,
            icmp_unreachable,
            long,
            tiny,
            short_tcp,
            short_udp,
        ] {
            assert_eq!(parse_flow(&w, 100), Err(NotAFlow::Unusual));
        }
    }

    #[test]
    fn ttl_decrement_keeps_the_checksum_valid() {
        for ttl in [2u8, 63, 64, 255] {
            let mut w = tcp(0x10);
            w[8] = ttl;
            let mut hdr = [0u8; 20];
            hdr.copy_from_slice(&w[..20]);
            w[10..12].copy_from_slice(&ipv4_header_checksum(&hdr).to_be_bytes());
            let f = parse_flow(&w, 100).unwrap();
            let four = decrement_ttl(&f);
            w[IPV4_TTL_OFFSET..IPV4_TTL_OFFSET + 4].copy_from_slice(&four);
            hdr.copy_from_slice(&w[..20]);
            assert_eq!(hdr[8], ttl - 1);
            assert!(ipv4_header_checksum_ok(&hdr), "ttl {ttl}");
        }
    }

    #[test]
    fn local_pods_and_approval_age() {
        let mut cfg = FastPathConfig {
            enabled: 1,
            pod_subnet: [10, 244, 1, 0],
            pod_prefix_len: 24,
            mark: DEFAULT_FAST_PATH_MARK,
            gateway: [0; 4],
            _pad: 0,
        };
        assert!(cfg.is_local_pod([10, 244, 1, 5]));
        assert!(cfg.is_local_pod([10, 244, 1, 1]));
        assert!(!cfg.is_local_pod([10, 244, 2, 5]));
        // flannel.<VNI>'s address and the broadcast address are the node's.
        for node in [[10, 244, 1, 0], [10, 244, 1, 255]] {
            assert!(cfg.in_pod_subnet(node) && !cfg.is_local_pod(node));
        }
        cfg.gateway = [10, 244, 1, 1];
        assert!(cfg.is_node_address([10, 244, 1, 1]));
        assert!(!cfg.is_local_pod([10, 244, 1, 1]));
        assert!(cfg.is_local_pod([10, 244, 1, 2]));
        assert!(approval_valid(10, 10 + APPROVAL_TTL_NS - 1));
        assert!(!approval_valid(10, 10 + APPROVAL_TTL_NS));
        // A stamp later than now (never with one monotonic clock) is not valid.
        assert!(!approval_valid(20, 10));
    }

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<FlowKey>(), 16);
        assert_eq!(core::mem::size_of::<FastFlow>(), 32);
        assert_eq!(core::mem::size_of::<FastPathConfig>(), 24);
    }
}
