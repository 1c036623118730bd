//! What the program tests (`tests/programs.rs`, `tests/programs_fast.rs`)
//! share: the node they configure, frames built by hand, and loading and
//! counting the embedded object.
//!
//! The frames are built here byte by byte, independently of
//! `overlay_common`'s builder, so that a mistake there cannot hide behind the
//! same mistake in what a test expects. Both files are meant to glob-import
//! this module; what only one of them needs (its verdicts, flows and packet
//! sets) stays in that file.

use std::collections::BTreeMap;

use aya::{
    Ebpf, TestRun, TestRunOptions, TestRunResult,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::SchedClassifier,
};
use overlay_agent::datapath::ebpf::EBPF_OBJECT;
use overlay_common::{
    consts::{MAP_COUNTERS, MAP_KNOWN_VTEPS, MAP_NODE_CONFIG, MAP_REMOTE_SUBNETS},
    counters::{Counter, Reason},
    maps::{KnownVtep, NodeConfig, RemoteVtep},
};

/// `TCX_NEXT` (-1) as test-run reports it: every TC program says "not
/// ours" with it, so programs after it on the hook still see the packet.
pub const TCX_NEXT: u32 = u32::MAX;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

// ---------------------------------------------------------------------------
// The node under test and its one peer, as flannel addresses them.

pub const VNI: u32 = 1;
pub const PORT: u16 = 8472;
pub const LOCAL_IP: [u8; 4] = [192, 168, 64, 2];
pub const PEER_IP: [u8; 4] = [192, 168, 64, 3];
pub const LOCAL_VTEP_MAC: [u8; 6] = [0x0a, 0x58, 0xc0, 0xa8, 0x40, 0x02];
pub const PEER_VTEP_MAC: [u8; 6] = [0x0a, 0x58, 0xc0, 0xa8, 0x40, 0x03];
pub const LOCAL_NIC_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
pub const PEER_NIC_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x03];
pub const LOCAL_POD: [u8; 4] = [10, 244, 1, 5];
pub const REMOTE_POD: [u8; 4] = [10, 244, 2, 7];
/// The peer's lease: 10.244.2.0/24.
pub const REMOTE_SUBNET: ([u8; 4], u32) = ([10, 244, 2, 0], 24);
pub const UNDERLAY_MTU: u32 = 1500;
pub const UNDERLAY_IFINDEX: u32 = 2;
pub const VXLAN_IFINDEX: u32 = 3;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// Offsets in the kernel's `struct __sk_buff` (checked against this kernel's
/// BTF: `bpftool btf dump file /sys/kernel/btf/vmlinux format c`).
pub const SKB_CTX_LEN: usize = 192;
pub const SKB_MARK: usize = 8;
pub const SKB_IFINDEX: usize = 40;
pub const SKB_GSO_SEGS: usize = 164;
pub const SKB_GSO_SIZE: usize = 176;

/// A `struct __sk_buff` for test-run's `ctx_in`: the fields the kernel takes
/// from it, the rest zero (it refuses a context with others set).
pub fn skb_ctx(mark: u32, ifindex: u32, gso: Option<(u32, u32)>) -> [u8; SKB_CTX_LEN] {
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_MARK..SKB_MARK + 4].copy_from_slice(&mark.to_ne_bytes());
    ctx[SKB_IFINDEX..SKB_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
    if let Some((size, segs)) = gso {
        ctx[SKB_GSO_SIZE..SKB_GSO_SIZE + 4].copy_from_slice(&size.to_ne_bytes());
        ctx[SKB_GSO_SEGS..SKB_GSO_SEGS + 4].copy_from_slice(&segs.to_ne_bytes());
    }
    ctx
}

/// One `BPF_PROG_TEST_RUN` of `prog` (called `name` in a failure) on
/// `frame`: the verdict and the frame out. The output buffer has 256 bytes of
/// room beyond the input, for what encapsulation adds: with too little the
/// kernel fails the run (`ENOSPC`) instead of cutting the frame.
pub fn run_frame<P>(
    prog: &P,
    name: &str,
    frame: &[u8],
    ctx_in: Option<&[u8]>,
    ctx_out: Option<&mut [u8]>,
) -> (u32, Vec<u8>)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; frame.len() + 256];
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in,
            ctx_out,
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("test-run {name}: {e:?}"));
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

// ---------------------------------------------------------------------------
// The object the agent embeds.

pub fn load_object() -> Ebpf {
    Ebpf::load(EBPF_OBJECT).expect("load the embedded eBPF object")
}

/// Fills the maps as the agent does for a node with one peer: the one node
/// both files test, so that the slow path's expectations hold for the fast
/// path's tests too.
pub fn configure_one_peer(ebpf: &mut Ebpf) {
    let cfg = NodeConfig {
        vni: VNI,
        local_ip: LOCAL_IP,
        underlay_ifindex: UNDERLAY_IFINDEX,
        vxlan_ifindex: VXLAN_IFINDEX,
        underlay_mtu: UNDERLAY_MTU,
        vtep_mac: LOCAL_VTEP_MAC,
        port: PORT,
        configured: 1,
    };
    let mut node: Array<_, NodeConfig> =
        Array::try_from(ebpf.map_mut(MAP_NODE_CONFIG).unwrap()).unwrap();
    node.set(0, cfg, 0).unwrap();
    let mut subnets: LpmTrie<_, [u8; 4], RemoteVtep> =
        LpmTrie::try_from(ebpf.map_mut(MAP_REMOTE_SUBNETS).unwrap()).unwrap();
    let peer = RemoteVtep {
        vtep_mac: PEER_VTEP_MAC,
        _pad: [0; 2],
        public_ip: PEER_IP,
    };
    subnets
        .insert(&Key::new(REMOTE_SUBNET.1, REMOTE_SUBNET.0), peer, 0)
        .unwrap();
    let mut vteps: HashMap<_, [u8; 4], KnownVtep> =
        HashMap::try_from(ebpf.map_mut(MAP_KNOWN_VTEPS).unwrap()).unwrap();
    let known = KnownVtep {
        vtep_mac: PEER_VTEP_MAC,
        _pad: [0; 2],
    };
    vteps.insert(PEER_IP, known, 0).unwrap();
}

/// Loads (but does not attach: test-run needs no device) a TC program.
pub fn load_classifier(ebpf: &mut Ebpf, name: &str) {
    let prog: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
    prog.load().unwrap_or_else(|e| panic!("load {name}: {e:?}"));
}

/// Loads every tail-called program and enters it in `JUMPS`, as the agent
/// does before it attaches anything: the IPv4 programs hand IPv6 frames on
/// through it.
pub fn load_jumps(ebpf: &mut Ebpf) {
    use aya::maps::ProgramArray;
    use overlay_common::consts::{JUMP_PROGRAMS, MAP_JUMPS};
    for (index, name) in JUMP_PROGRAMS {
        load_classifier(ebpf, name);
        let prog: &SchedClassifier = ebpf.program(name).unwrap().try_into().unwrap();
        let fd = prog.fd().unwrap().try_clone().unwrap();
        let mut jumps: ProgramArray<_> =
            ProgramArray::try_from(ebpf.map_mut(MAP_JUMPS).unwrap()).unwrap();
        jumps
            .set(index, &fd, 0)
            .unwrap_or_else(|e| panic!("JUMPS[{index}] = {name}: {e:?}"));
    }
}

/// A test file's loaded object, whatever else it wraps with it: what
/// [`Tally::check`] reads the counters of.
pub trait Loaded {
    fn ebpf(&self) -> &Ebpf;

    /// Non-zero counters, summed over CPUs (a test-run may land on any).
    fn counters(&self) -> BTreeMap<&'static str, Counter> {
        let counters: PerCpuArray<_, Counter> =
            PerCpuArray::try_from(self.ebpf().map(MAP_COUNTERS).unwrap()).unwrap();
        let mut totals = BTreeMap::new();
        for reason in Reason::ALL {
            let per_cpu = counters.get(&reason.index(), 0).unwrap();
            let total = per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            });
            if total != Counter::default() {
                totals.insert(reason.name(), total);
            }
        }
        totals
    }
}

/// Expected counters, built up frame by frame.
#[derive(Default)]
pub struct Tally(pub BTreeMap<&'static str, Counter>);

impl Tally {
    pub fn add(&mut self, reason: Reason, frame: &[u8]) {
        let c = self.0.entry(reason.name()).or_default();
        c.packets += 1;
        c.bytes += frame.len() as u64;
    }

    /// Exactly these counters: a frame counted twice, or under another
    /// reason, fails as surely as one not counted.
    pub fn check(&self, p: &impl Loaded) {
        assert_eq!(p.counters(), self.0);
    }
}

// ---------------------------------------------------------------------------
// Frames, built by hand.

/// RFC 1071 checksum.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[derive(Clone)]
pub struct Ip {
    pub tos: u8,
    pub id: u16,
    /// Flags + fragment offset.
    pub frag: u16,
    pub ttl: u8,
    pub proto: u8,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub options: Vec<u8>,
}

impl Ip {
    pub fn new(proto: u8, src: [u8; 4], dst: [u8; 4]) -> Self {
        Ip {
            tos: 0,
            id: 0x4d2,
            frag: 0x4000, // DF, as Linux sends TCP
            ttl: 64,
            proto,
            src,
            dst,
            options: Vec::new(),
        }
    }

    /// From the local pod to the remote one, the direction most tests send.
    pub fn inner(proto: u8) -> Self {
        Self::new(proto, LOCAL_POD, REMOTE_POD)
    }

    pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
        let header_len = 20 + self.options.len();
        let mut h = vec![0x40 | (header_len / 4) as u8, self.tos];
        h.extend_from_slice(&((header_len + payload.len()) as u16).to_be_bytes());
        h.extend_from_slice(&self.id.to_be_bytes());
        h.extend_from_slice(&self.frag.to_be_bytes());
        h.extend_from_slice(&[self.ttl, self.proto, 0, 0]);
        h.extend_from_slice(&self.src);
        h.extend_from_slice(&self.dst);
        h.extend_from_slice(&self.options);
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(payload);
        h
    }
}

/// The TCP or UDP checksum over the pseudo-header, written at `check_at`.
fn with_l4_checksum(
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
    mut seg: Vec<u8>,
    check_at: usize,
) -> Vec<u8> {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&seg);
    let c = checksum(&pseudo);
    seg[check_at..check_at + 2].copy_from_slice(&c.to_be_bytes());
    seg
}

pub fn tcp(src: [u8; 4], dst: [u8; 4], ports: (u16, u16), flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut seg = Vec::new();
    seg.extend_from_slice(&ports.0.to_be_bytes());
    seg.extend_from_slice(&ports.1.to_be_bytes());
    seg.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // seq
    seg.extend_from_slice(&0x9abc_def0u32.to_be_bytes()); // ack
    seg.extend_from_slice(&[0x50, flags]); // 5 words
    seg.extend_from_slice(&64240u16.to_be_bytes()); // window
    seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
    seg.extend_from_slice(payload);
    with_l4_checksum(IPPROTO_TCP, src, dst, seg, 16)
}

pub fn udp(src: [u8; 4], dst: [u8; 4], ports: (u16, u16), payload: &[u8]) -> Vec<u8> {
    let mut seg = Vec::new();
    seg.extend_from_slice(&ports.0.to_be_bytes());
    seg.extend_from_slice(&ports.1.to_be_bytes());
    seg.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    seg.extend_from_slice(&[0, 0]);
    seg.extend_from_slice(payload);
    with_l4_checksum(IPPROTO_UDP, src, dst, seg, 6)
}

/// A whole IPv6 packet (no extension headers, hop limit 64, traffic class
/// `tc`) of protocol `proto` from `src` to `dst`, whose upper layer `l4`
/// gets its checksum at `check_at` over the IPv6 pseudo-header (RFC 8200
/// section 8.1: TCP, UDP and ICMPv6 alike).
pub fn ipv6(
    proto: u8,
    tc: u8,
    src: [u8; 16],
    dst: [u8; 16],
    l4: &[u8],
    check_at: usize,
) -> Vec<u8> {
    let len = l4.len() as u16;
    let mut seg = l4.to_vec();
    seg[check_at..check_at + 2].copy_from_slice(&[0, 0]);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&u32::from(len).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, proto]);
    pseudo.extend_from_slice(&seg);
    let c = match checksum(&pseudo) {
        0 if proto == IPPROTO_UDP => 0xffff,
        c => c,
    };
    seg[check_at..check_at + 2].copy_from_slice(&c.to_be_bytes());
    let mut p = vec![0x60 | tc >> 4, tc << 4, 0, 0];
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[proto, 64]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&seg);
    p
}

/// An IPv6 UDP packet (see [`ipv6`]).
pub fn ipv6_udp(src: [u8; 16], dst: [u8; 16], ports: (u16, u16), payload: &[u8]) -> Vec<u8> {
    let mut seg = Vec::new();
    seg.extend_from_slice(&ports.0.to_be_bytes());
    seg.extend_from_slice(&ports.1.to_be_bytes());
    seg.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    seg.extend_from_slice(&[0, 0]);
    seg.extend_from_slice(payload);
    ipv6(IPPROTO_UDP, 0, src, dst, &seg, 6)
}

/// ICMP of type `ty` (8 echo request, 0 echo reply) with an echo header.
pub fn icmp(ty: u8, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(payload);
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

pub fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

/// An ARP request (Ethernet, IPv4) from `sender` asking for `target`.
pub fn arp_request(sender_mac: [u8; 6], sender_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&sender_mac);
    arp.extend_from_slice(&sender_ip);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&target_ip);
    arp
}

pub fn ipv6_packet() -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
    p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    p.extend_from_slice(&[0x12, 0x34, 0x21, 0x18, 0, 8, 0, 0]);
    p
}

/// The frame routing hands to `flannel.<VNI>` for a remote pod: from our VTEP
/// MAC to the peer's (flannel's permanent neighbour entry).
pub fn flannel_frame(ip_packet: &[u8]) -> Vec<u8> {
    eth(PEER_VTEP_MAC, LOCAL_VTEP_MAC, ETH_P_IP, ip_packet)
}

/// What the peer's pod sends us, as the peer's VTEP frames it.
pub fn inner_frame_to_us(ip_packet: &[u8]) -> Vec<u8> {
    eth(LOCAL_VTEP_MAC, PEER_VTEP_MAC, ETH_P_IP, ip_packet)
}

/// Outer IPv4 + UDP + VXLAN in front of `inner_frame`, as the kernel vxlan
/// device sends it, but for the UDP checksum: 0 (see `programs.rs`).
pub fn vxlan(
    outer_src: [u8; 4],
    outer_dst: [u8; 4],
    sport: u16,
    ip_id: u16,
    outer_tos: u8,
    vni: u32,
    inner_frame: &[u8],
) -> Vec<u8> {
    let mut udp = Vec::new();
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&PORT.to_be_bytes());
    udp.extend_from_slice(&((8 + 8 + inner_frame.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&[0x08, 0, 0, 0]);
    udp.extend_from_slice(&(vni << 8).to_be_bytes());
    udp.extend_from_slice(inner_frame);
    Ip {
        tos: outer_tos,
        id: ip_id,
        frag: 0,
        ..Ip::new(IPPROTO_UDP, outer_src, outer_dst)
    }
    .packet(&udp)
}

/// A VXLAN frame as the underlay delivers it to us from `from`.
pub fn from_underlay(from: [u8; 4], vni: u32, inner_frame: &[u8]) -> Vec<u8> {
    eth(
        LOCAL_NIC_MAC,
        PEER_NIC_MAC,
        ETH_P_IP,
        &vxlan(from, LOCAL_IP, 50123, 0x1111, 0, vni, inner_frame),
    )
}

pub fn sport_of(encapsulated: &[u8]) -> u16 {
    u16::from_be_bytes([encapsulated[34], encapsulated[35]])
}

pub fn ip_id_of(encapsulated: &[u8]) -> u16 {
    u16::from_be_bytes([encapsulated[18], encapsulated[19]])
}

/// Deterministic pseudo-random bytes (xorshift64*): a failing garbage frame
/// comes back on the next run.
pub struct Garbage(pub u64);

impl Garbage {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// `min` to `min + spread - 1` random bytes. A frame whose EtherType
    /// says IPv4 or IPv6 is made long enough for that header: test-run refuses
    /// shorter ones (EINVAL), though a wire could carry them.
    pub fn some(&mut self, min: usize, spread: u64) -> Vec<u8> {
        let len = min + (self.next() % spread) as usize;
        let mut frame = self.bytes(len);
        let floor = match frame.get(12..14) {
            Some([0x08, 0x00]) => 14 + 20,
            Some([0x86, 0xdd]) => 14 + 40,
            _ => 0,
        };
        if frame.len() < floor {
            let more = self.bytes(floor - frame.len());
            frame.extend_from_slice(&more);
        }
        frame
    }
}

/// `CLOCK_MONOTONIC` in ns: the clock of `bpf_ktime_get_ns()`.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
