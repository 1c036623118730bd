//! Host policy the eBPF datapath would skip, detected.
//!
//! The eBPF programs send outer VXLAN packets with `bpf_redirect_neigh` on
//! the underlay and take incoming ones at TC ingress, so the outer packets
//! never meet the host's xfrm (IPsec) policies, and the egress side never
//! meets policy routing or a route through another interface. Where flannel
//! would send ESP, the eBPF datapath would send clear VXLAN, silently. So:
//!
//! - **xfrm**: any policy in the `in` or `out` direction whose selector could
//!   match an outer VXLAN packet between our underlay address and another
//!   address (see [`XfrmPolicy::covers`]) keeps the eBPF datapath off. The
//!   policies come from a `XFRM_MSG_GETPOLICY` dump on a NETLINK_XFRM socket
//!   (raw, through libc: no xfrm crate is needed for one dump).
//! - **routing**: a peer's PublicIP whose route (`ip route get <peer> from
//!   <underlay address>`, which goes through the `ip rule`s) comes from a
//!   table other than `main`, leaves through another interface than the
//!   underlay, or is not a unicast route, is [`RouteConflict`]. The lookup
//!   uses mark 0, so `fwmark` rules are not seen.
//!
//! Both checks are written once for either family ([`IpFamily`]): a
//! dual-stack peer's IPv6 side (its `PublicIPv6`, from our IPv6 VTEP
//! address, `ip -6 route get`) is judged on its own, since `vxlan_egress6`
//! skips the host's IPv6 policy just as `vxlan_egress` skips the IPv4 one.
//!
//! At start-up the xfrm check and the route of every peer (and IPv6 side)
//! already on the devices stop the eBPF datapath
//! ([`super::ebpf::EbpfError::HostPolicy`]); a peer added later is checked
//! in `add_peer`, each of its sides for itself (see there).

use std::{
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use rtnetlink::packet_route::{
    RouteNetlinkMessage,
    route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteType},
};

use crate::netlink::{IpFamily, Netlink, NetlinkError, family::route_to, pipeline::Request};

/// What of the host's policy the eBPF datapath would skip.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostPolicyConflict {
    #[error(
        "xfrm (IPsec) policy {0} covers VXLAN between the nodes, and the eBPF datapath's outer packets skip xfrm (they would leave in clear)"
    )]
    Xfrm(XfrmPolicy),
    #[error(
        "peer {peer}: its {} {why}, and the eBPF datapath sends straight out of the underlay",
        public_ip_name(*peer)
    )]
    Route { peer: IpAddr, why: RouteConflict },
}

/// Why a peer's route is not one the eBPF datapath follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteConflict {
    /// An `ip rule` chose another table than `main`.
    Table(u32),
    /// The route leaves through another interface.
    Interface(u32),
    /// A blackhole, unreachable or prohibit route (or another non-unicast type).
    Kind(RouteType),
}

/// The lease field a peer's address is: `PublicIP`, or a dual-stack
/// peer's `PublicIPv6`.
fn public_ip_name(peer: IpAddr) -> &'static str {
    if peer.is_ipv4() {
        "PublicIP"
    } else {
        "PublicIPv6"
    }
}

/// Said of the peer's address ("its PublicIP ...").
impl fmt::Display for RouteConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteConflict::Table(t) => {
                write!(f, "is routed by policy rules (table {t}, not main)")
            }
            RouteConflict::Interface(i) => {
                write!(f, "is routed through interface #{i}, not the underlay")
            }
            RouteConflict::Kind(k) => write!(f, "has a {k:?} route"),
        }
    }
}

/// Failures of the checks themselves.
#[derive(Debug, thiserror::Error)]
pub enum HostPolicyError {
    #[error("dumping the xfrm policies (NETLINK_XFRM)")]
    Xfrm(#[source] io::Error),
    #[error(transparent)]
    Route(#[from] NetlinkError),
}

/// `XFRM_POLICY_IN` / `_OUT` / `_FWD`.
const DIR_IN: u8 = 0;
const DIR_OUT: u8 = 1;

/// One xfrm policy, as far as the checks need it (`struct xfrm_userpolicy_info`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XfrmPolicy {
    /// `AF_INET`, `AF_INET6`, or 0 (any).
    pub family: u16,
    /// IPv6 in an `AF_INET6` selector, IPv4 otherwise.
    pub src: IpAddr,
    pub src_len: u8,
    pub dst: IpAddr,
    pub dst_len: u8,
    /// IP protocol, 0 for any.
    pub proto: u8,
    /// Destination port and mask, host order.
    pub dport: u16,
    pub dport_mask: u16,
    pub dir: u8,
    pub index: u32,
}

impl fmt::Display for XfrmPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = match self.dir {
            DIR_IN => "in",
            DIR_OUT => "out",
            _ => "fwd",
        };
        write!(
            f,
            "src {}/{} dst {}/{} dir {dir}",
            self.src, self.src_len, self.dst, self.dst_len
        )?;
        if self.proto != 0 {
            write!(f, " proto {}", self.proto)?;
        }
        if self.dport_mask != 0 {
            write!(f, " dport {}", self.dport)?;
        }
        write!(f, " (index {})", self.index)
    }
}

fn contains(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    if len == 0 {
        return true;
    }
    match (net, ip) {
        (IpAddr::V4(net), IpAddr::V4(ip)) => {
            let mask = u32::MAX << (32 - u32::from(len.min(32)));
            u32::from(net) & mask == u32::from(ip) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(ip)) => {
            let mask = u128::MAX << (128 - u32::from(len.min(128)));
            u128::from(net) & mask == u128::from(ip) & mask
        }
        _ => false,
    }
}

impl XfrmPolicy {
    /// Whether this policy could match an outer VXLAN packet (UDP to `port`)
    /// between `local` and `peer`, or, without a peer, between `local` and
    /// any other address: deliberately broad, since a policy we miss means
    /// clear text where ESP was meant. `local` says the family (IPv6: the
    /// outer packets of `flannel-v6.<VNI>`'s peers); a selector of the
    /// other family and `fwd` policies cannot match our outer packets;
    /// source ports are not looked at (ours vary per flow).
    pub fn covers(&self, local: IpAddr, port: u16, peer: Option<IpAddr>) -> bool {
        let family = if local.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        if self.family != family as u16 && self.family != 0 {
            return false;
        }
        if self.proto != 0 && self.proto != libc::IPPROTO_UDP as u8 {
            return false;
        }
        if self.dport_mask != 0 && self.dport & self.dport_mask != port & self.dport_mask {
            return false;
        }
        let (ours, ours_len, theirs, theirs_len) = match self.dir {
            DIR_OUT => (self.src, self.src_len, self.dst, self.dst_len),
            DIR_IN => (self.dst, self.dst_len, self.src, self.src_len),
            _ => return false,
        };
        if !contains(ours, ours_len, local) {
            return false;
        }
        match peer {
            Some(peer) => contains(theirs, theirs_len, peer),
            // Anything but exactly ourselves.
            None => {
                let host_len = if local.is_ipv4() { 32 } else { 128 };
                !(theirs_len >= host_len && theirs == local)
            }
        }
    }
}

/// The first policy that [`XfrmPolicy::covers`] the traffic, if any.
pub fn xfrm_conflict(
    policies: &[XfrmPolicy],
    local: IpAddr,
    port: u16,
    peer: Option<IpAddr>,
) -> Option<HostPolicyConflict> {
    policies
        .iter()
        .find(|p| p.covers(local, port, peer))
        .map(|p| HostPolicyConflict::Xfrm(*p))
}

const NETLINK_XFRM: libc::c_int = 6;
const XFRM_MSG_NEWPOLICY: u16 = 0x13;
const XFRM_MSG_GETPOLICY: u16 = 0x15;
/// `sizeof(struct xfrm_userpolicy_info)` on every 64-bit and 32-bit ABI we
/// build for (the struct ends 8-aligned).
const USERPOLICY_INFO_LEN: usize = 168;
const NLMSG_HDR_LEN: usize = 16;

/// Parses one `struct xfrm_userpolicy_info` (the selector at offset 0, `dir`
/// at 160).
fn parse_policy(b: &[u8]) -> Option<XfrmPolicy> {
    if b.len() < USERPOLICY_INFO_LEN {
        return None;
    }
    let family = u16::from_ne_bytes([b[40], b[41]]);
    // `xfrm_address_t`: 16 bytes, of which IPv4 uses the first 4.
    let ip = |o: usize| -> IpAddr {
        if family == libc::AF_INET6 as u16 {
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[o..o + 16]);
            Ipv6Addr::from(a).into()
        } else {
            Ipv4Addr::new(b[o], b[o + 1], b[o + 2], b[o + 3]).into()
        }
    };
    let be16 = |o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
    Some(XfrmPolicy {
        dst: ip(0),
        src: ip(16),
        dport: be16(32),
        dport_mask: be16(34),
        family,
        dst_len: b[42],
        src_len: b[43],
        proto: b[44],
        index: u32::from_ne_bytes([b[156], b[157], b[158], b[159]]),
        dir: b[160],
    })
}

/// `ip xfrm policy list`, over NETLINK_XFRM: every policy of this network
/// namespace.
pub fn xfrm_policies() -> io::Result<Vec<XfrmPolicy>> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_XFRM,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    use std::os::fd::AsRawFd;
    let raw = fd.as_raw_fd();
    // nlmsghdr + a zeroed 4-byte family header (the kernel's policy dump
    // reads no request payload).
    let mut req = [0u8; NLMSG_HDR_LEN + 4];
    let req_len = req.len() as u32;
    req[0..4].copy_from_slice(&req_len.to_ne_bytes());
    req[4..6].copy_from_slice(&XFRM_MSG_GETPOLICY.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: `req` and `kernel` are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            raw,
            req.as_ptr().cast(),
            req.len(),
            0,
            (&raw const kernel).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut msgs = &buf[..n as usize];
        while msgs.len() >= NLMSG_HDR_LEN {
            let len = u32::from_ne_bytes([msgs[0], msgs[1], msgs[2], msgs[3]]) as usize;
            let kind = u16::from_ne_bytes([msgs[4], msgs[5]]);
            if len < NLMSG_HDR_LEN || len > msgs.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated netlink message",
                ));
            }
            let payload = &msgs[NLMSG_HDR_LEN..len];
            match kind {
                k if k == libc::NLMSG_DONE as u16 => return Ok(out),
                k if k == libc::NLMSG_ERROR as u16 => {
                    let code = payload
                        .get(0..4)
                        .map_or(0, |c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]));
                    if code == 0 {
                        return Ok(out);
                    }
                    return Err(io::Error::from_raw_os_error(-code));
                }
                XFRM_MSG_NEWPOLICY => out.extend(parse_policy(payload)),
                _ => {}
            }
            let aligned = (len + 3) & !3;
            msgs = &msgs[aligned.min(msgs.len())..];
        }
    }
}

/// Whether the route to `peer` from `local` (either family) is one the
/// eBPF datapath follows: from table `main`, through the underlay, unicast.
/// `None` also when there is no route at all (the kernel datapath would
/// fail as well).
pub async fn route_conflict<A: IpFamily>(
    nl: &Netlink,
    local: A,
    peer: A,
    underlay_ifindex: u32,
) -> Result<Option<RouteConflict>, NetlinkError> {
    let req = nl.handle().route().get(route_query(local, peer));
    let routes = match Netlink::collect::<RouteMessage>(req.execute(), || {
        format!("route get {peer} from {local}")
    })
    .await
    {
        Ok(routes) => routes,
        Err(e) if e.is_unreachable() => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(routes
        .first()
        .and_then(|r| judge_route(r, underlay_ifindex)))
}

/// `ip route get <peer> from <local>` (`ip -6 ...` for IPv6) as a message.
fn route_query<A: IpFamily>(local: A, peer: A) -> RouteMessage {
    let host = |ip: A| A::net(ip, A::HOST_PREFIX_LEN).expect("a host prefix fits its family");
    let mut msg = route_to::<A>(host(peer)).build();
    msg.header.source_prefix_length = A::HOST_PREFIX_LEN;
    msg.attributes
        .push(RouteAttribute::Source(RouteAddress::from(local.into())));
    // Without it the kernel reports every lookup as from `main`.
    msg.header.flags |= RouteFlags::LookupTable;
    msg
}

/// [`check_peer`] for many peers (or IPv6 sides) being added at once: one
/// xfrm dump for all, and their route lookups pipelined
/// ([`Netlink::pipelined`]). One verdict per peer, in order; a lookup that
/// failed fails that peer alone.
pub async fn check_peers<A: IpFamily>(
    nl: &Netlink,
    local: A,
    port: u16,
    underlay_ifindex: u32,
    peers: &[A],
) -> Vec<Result<Option<HostPolicyConflict>, HostPolicyError>> {
    if peers.is_empty() {
        return Vec::new();
    }
    let policies = match xfrm_policies() {
        Ok(p) => p,
        Err(e) => {
            // One dump failed for all; each peer gets the error (io::Error
            // is not Clone: the errno and text are kept).
            return peers
                .iter()
                .map(|_| {
                    Err(HostPolicyError::Xfrm(io::Error::new(
                        e.kind(),
                        e.to_string(),
                    )))
                })
                .collect();
        }
    };
    let requests = peers
        .iter()
        .map(|&peer| Request::new(RouteNetlinkMessage::GetRoute(route_query(local, peer)), 0))
        .collect();
    let answers = nl.pipelined(requests).await;
    peers
        .iter()
        .zip(answers)
        .map(|(&peer, answer)| {
            if let Some(c) = xfrm_conflict(&policies, local.into(), port, Some(peer.into())) {
                return Ok(Some(c));
            }
            let route = match answer.outcome {
                Ok(()) => answer.replies.iter().find_map(|m| match m {
                    RouteNetlinkMessage::NewRoute(r) => Some(r),
                    _ => None,
                }),
                Err(e) => {
                    let err = NetlinkError::new(
                        format!("route get {peer} from {local}"),
                        rtnetlink::Error::NetlinkError(e),
                    );
                    if err.is_unreachable() {
                        None
                    } else {
                        return Err(err.into());
                    }
                }
            };
            Ok(route
                .and_then(|r| judge_route(r, underlay_ifindex))
                .map(|why| HostPolicyConflict::Route {
                    peer: peer.into(),
                    why,
                }))
        })
        .collect()
}

/// `RT_TABLE_MAIN`.
const TABLE_MAIN: u32 = 254;

fn judge_route(r: &RouteMessage, underlay_ifindex: u32) -> Option<RouteConflict> {
    let mut table = u32::from(r.header.table);
    let mut oif = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    if r.header.kind != RouteType::Unicast {
        return Some(RouteConflict::Kind(r.header.kind));
    }
    if table != TABLE_MAIN {
        return Some(RouteConflict::Table(table));
    }
    match oif {
        Some(i) if i != underlay_ifindex => Some(RouteConflict::Interface(i)),
        _ => None,
    }
}

/// The start-up check: xfrm policies between `local` (and, on a
/// dual-stack node, `local6`) and anyone, then the route of each of
/// `peers` and (from `local6`) of each of `peers6`, the IPv6 sides
/// `flannel-v6.<VNI>` holds. The first conflict found, if any.
pub async fn check_start(
    nl: &Netlink,
    local: Ipv4Addr,
    local6: Option<Ipv6Addr>,
    port: u16,
    underlay_ifindex: u32,
    peers: &[Ipv4Addr],
    peers6: &[Ipv6Addr],
) -> Result<Option<HostPolicyConflict>, HostPolicyError> {
    let policies = xfrm_policies().map_err(HostPolicyError::Xfrm)?;
    let locals = std::iter::once(IpAddr::V4(local)).chain(local6.map(IpAddr::V6));
    for local in locals {
        if let Some(c) = xfrm_conflict(&policies, local, port, None) {
            return Ok(Some(c));
        }
    }
    for &peer in peers {
        if let Some(why) = route_conflict(nl, local, peer, underlay_ifindex).await? {
            let peer = peer.into();
            return Ok(Some(HostPolicyConflict::Route { peer, why }));
        }
    }
    if let Some(local6) = local6 {
        for &peer in peers6 {
            if let Some(why) = route_conflict(nl, local6, peer, underlay_ifindex).await? {
                let peer = peer.into();
                return Ok(Some(HostPolicyConflict::Route { peer, why }));
            }
        }
    }
    Ok(None)
}

/// The check for one peer (or IPv6 side) being added: xfrm policies
/// between `local` and it, then its route.
pub async fn check_peer<A: IpFamily>(
    nl: &Netlink,
    local: A,
    port: u16,
    underlay_ifindex: u32,
    peer: A,
) -> Result<Option<HostPolicyConflict>, HostPolicyError> {
    let policies = xfrm_policies().map_err(HostPolicyError::Xfrm)?;
    if let Some(c) = xfrm_conflict(&policies, local.into(), port, Some(peer.into())) {
        return Ok(Some(c));
    }
    Ok(route_conflict(nl, local, peer, underlay_ifindex)
        .await?
        .map(|why| HostPolicyConflict::Route {
            peer: peer.into(),
            why,
        }))
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_route::AddressFamily;

    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(192, 168, 64, 2);
    const B: Ipv4Addr = Ipv4Addr::new(192, 168, 64, 3);

    fn policy(src: Ipv4Addr, src_len: u8, dst: Ipv4Addr, dst_len: u8, dir: u8) -> XfrmPolicy {
        XfrmPolicy {
            family: libc::AF_INET as u16,
            src: src.into(),
            src_len,
            dst: dst.into(),
            dst_len,
            proto: 0,
            dport: 0,
            dport_mask: 0,
            dir,
            index: 1,
        }
    }

    #[test]
    fn node_to_node_policies_count_both_ways() {
        let out = policy(A, 32, B, 32, DIR_OUT);
        assert!(out.covers(A.into(), 8472, None));
        assert!(out.covers(A.into(), 8472, Some(B.into())));
        assert!(!out.covers(A.into(), 8472, Some(Ipv4Addr::new(192, 168, 64, 9).into())));
        let inbound = policy(B, 32, A, 32, DIR_IN);
        assert!(inbound.covers(A.into(), 8472, None));
        assert!(inbound.covers(A.into(), 8472, Some(B.into())));
        // Another node's pair, and fwd policies, are not ours.
        assert!(!policy(B, 32, A, 32, DIR_OUT).covers(A.into(), 8472, None));
        assert!(!policy(A, 32, B, 32, 2).covers(A.into(), 8472, None));
        // A whole-subnet or match-all policy covers us.
        assert!(policy(A, 24, A, 24, DIR_OUT).covers(A.into(), 8472, Some(B.into())));
        let any = XfrmPolicy {
            family: 0,
            ..policy(Ipv4Addr::UNSPECIFIED, 0, Ipv4Addr::UNSPECIFIED, 0, DIR_OUT)
        };
        assert!(any.covers(A.into(), 8472, None));
        // Only ourselves: loopback-ish, no node traffic.
        assert!(!policy(A, 32, A, 32, DIR_OUT).covers(A.into(), 8472, None));
    }

    #[test]
    fn protocol_and_port_selectors_are_honoured() {
        let mut p = policy(A, 32, B, 32, DIR_OUT);
        p.proto = libc::IPPROTO_UDP as u8;
        p.dport = 8472;
        p.dport_mask = 0xffff;
        assert!(p.covers(A.into(), 8472, None));
        assert!(!p.covers(A.into(), 4789, None));
        p.dport = 500; // an IKE bypass
        assert!(!p.covers(A.into(), 8472, None));
        p.proto = libc::IPPROTO_TCP as u8;
        p.dport_mask = 0;
        assert!(!p.covers(A.into(), 8472, None));
        let v6 = XfrmPolicy {
            family: libc::AF_INET6 as u16,
            ..policy(Ipv4Addr::UNSPECIFIED, 0, Ipv4Addr::UNSPECIFIED, 0, DIR_OUT)
        };
        assert!(!v6.covers(A.into(), 8472, None));
    }

    #[test]
    fn ipv6_selectors_cover_the_ipv6_outer_packets() {
        let a6: Ipv6Addr = "fd98::2".parse().unwrap();
        let b6: Ipv6Addr = "fd98::3".parse().unwrap();
        let v6 = |src: Ipv6Addr, src_len, dst: Ipv6Addr, dst_len, dir| XfrmPolicy {
            family: libc::AF_INET6 as u16,
            src: src.into(),
            src_len,
            dst: dst.into(),
            dst_len,
            ..policy(A, 0, A, 0, dir)
        };
        let out = v6(a6, 128, b6, 128, DIR_OUT);
        assert!(out.covers(a6.into(), 8472, None));
        assert!(out.covers(a6.into(), 8472, Some(b6.into())));
        assert!(!out.covers(a6.into(), 8472, Some("fd98::9".parse().unwrap())));
        // Not the IPv4 node's traffic, and not another node's pair.
        assert!(!out.covers(A.into(), 8472, None));
        assert!(!v6(b6, 128, a6, 128, DIR_OUT).covers(a6.into(), 8472, None));
        assert!(v6(a6, 64, a6, 64, DIR_OUT).covers(a6.into(), 8472, None));
        assert!(!v6(a6, 128, a6, 128, DIR_OUT).covers(a6.into(), 8472, None));
        // An IPv4 selector does not cover IPv6 packets.
        assert!(!policy(A, 0, A, 0, DIR_OUT).covers(a6.into(), 8472, None));
        // Parsed from the kernel's layout: all 16 bytes.
        let mut b = vec![0u8; USERPOLICY_INFO_LEN];
        b[0..16].copy_from_slice(&b6.octets());
        b[16..32].copy_from_slice(&a6.octets());
        b[40..42].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        b[42] = 128;
        b[43] = 128;
        b[160] = DIR_OUT;
        let p = parse_policy(&b).unwrap();
        assert_eq!((p.src, p.dst), (a6.into(), b6.into()));
        let text = HostPolicyConflict::Xfrm(p).to_string();
        assert!(text.contains("src fd98::2/128 dst fd98::3/128"), "{text}");
    }

    #[test]
    fn route_queries_ask_each_family_from_our_address() {
        let q = route_query(A, B);
        assert_eq!(q.header.address_family, AddressFamily::Inet);
        assert_eq!(
            (
                q.header.destination_prefix_length,
                q.header.source_prefix_length
            ),
            (32, 32)
        );
        assert!(q.header.flags.contains(RouteFlags::LookupTable));
        let a6: Ipv6Addr = "fd98::1".parse().unwrap();
        let b6: Ipv6Addr = "fd98::2".parse().unwrap();
        let q = route_query(a6, b6);
        assert_eq!(q.header.address_family, AddressFamily::Inet6);
        assert_eq!(
            (
                q.header.destination_prefix_length,
                q.header.source_prefix_length
            ),
            (128, 128)
        );
        assert!(q.header.flags.contains(RouteFlags::LookupTable));
        let attrs = &q.attributes;
        assert!(attrs.contains(&RouteAttribute::Destination(RouteAddress::Inet6(b6))));
        assert!(attrs.contains(&RouteAttribute::Source(RouteAddress::Inet6(a6))));
    }

    #[test]
    fn route_conflicts_name_the_lease_field_of_their_family() {
        let v4 = HostPolicyConflict::Route {
            peer: B.into(),
            why: RouteConflict::Table(100),
        };
        assert_eq!(
            v4.to_string(),
            "peer 192.168.64.3: its PublicIP is routed by policy rules (table 100, not main), and the eBPF datapath sends straight out of the underlay"
        );
        let v6 = HostPolicyConflict::Route {
            peer: "fd98::3".parse::<Ipv6Addr>().unwrap().into(),
            why: RouteConflict::Kind(RouteType::BlackHole),
        };
        assert!(
            v6.to_string()
                .starts_with("peer fd98::3: its PublicIPv6 has a BlackHole route"),
            "{v6}"
        );
    }

    #[test]
    fn userpolicy_info_is_parsed_at_the_kernel_offsets() {
        let mut b = vec![0u8; USERPOLICY_INFO_LEN];
        b[0..4].copy_from_slice(&B.octets());
        b[16..20].copy_from_slice(&A.octets());
        b[32..34].copy_from_slice(&8472u16.to_be_bytes());
        b[34..36].copy_from_slice(&0xffffu16.to_be_bytes());
        b[40..42].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        b[42] = 32;
        b[43] = 24;
        b[44] = 17;
        b[156..160].copy_from_slice(&7u32.to_ne_bytes());
        b[160] = DIR_OUT;
        let p = parse_policy(&b).unwrap();
        assert_eq!(
            (p.src, p.src_len, p.dst, p.dst_len),
            (A.into(), 24, B.into(), 32)
        );
        assert_eq!((p.proto, p.dport, p.dport_mask), (17, 8472, 0xffff));
        assert_eq!((p.dir, p.index), (DIR_OUT, 7));
        assert!(parse_policy(&b[..100]).is_none());
        let text = HostPolicyConflict::Xfrm(p).to_string();
        assert!(text.contains("xfrm") && text.contains("dir out"), "{text}");
    }
}
