//! TC filters and qdiscs, read and removed over a plain rtnetlink socket.
//!
//! Why not aya's helper (`tc::qdisc_detach_program`) or netlink-packet-route:
//! both decode every filter of a hook by its attributes, so another tool's
//! filter can make the whole listing fail. aya 0.14 reads attribute 7 of
//! *every* filter's `TCA_OPTIONS` as `TCA_BPF_NAME`; for a `u32` filter with
//! actions that attribute is `TCA_U32_ACT` (nested, so its second byte is a
//! NUL) and the listing fails with "interior nul byte at byte position 1"
//! (see docs/aya-tc-filter-defect.md). Here only three things are read from
//! a filter: its kind, its priority/protocol/handle/chain, and, only when
//! the kind is `bpf`, the name. Anything else in a message is skipped, and
//! a message we cannot make sense of is someone else's filter, never an
//! error: coexisting means another tool's filter can never stop us.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::atomic::{AtomicU32, Ordering},
};

/// `TC_H_CLSACT`/`TC_H_INGRESS` (the same value): the parent of the clsact
/// and ingress qdiscs.
pub const TC_H_INGRESS: u32 = 0xffff_fff1;
/// `TC_H_ROOT`: the parent of a device's root qdisc.
pub const TC_H_ROOT: u32 = 0xffff_ffff;
const TC_H_MIN_INGRESS: u32 = 0xfff2;
const TC_H_MIN_EGRESS: u32 = 0xfff3;

const RTM_NEWQDISC: u16 = 36;
const RTM_GETQDISC: u16 = 38;
const RTM_NEWTFILTER: u16 = 44;
const RTM_DELTFILTER: u16 = 45;
const RTM_GETTFILTER: u16 = 46;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_MULTI: u16 = 0x2;
/// `RTMGRP_TC`: qdisc, class and filter changes.
const RTMGRP_TC: u32 = 0x8;

const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_CHAIN: u16 = 11;
const TCA_BPF_NAME: u16 = 7;
const NLA_TYPE_MASK: u16 = 0x3fff;

const NLMSG_HDR_LEN: usize = 16;
const TCMSG_LEN: usize = 20;

/// A clsact (or ingress qdisc) hook of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcHook {
    Ingress,
    Egress,
}

impl TcHook {
    /// The filter parent `tc filter ... ingress|egress` uses; it also names
    /// the filters of an `ingress` qdisc (`parent ffff:`) for `Ingress`.
    fn parent(self) -> u32 {
        0xffff_0000
            | match self {
                TcHook::Ingress => TC_H_MIN_INGRESS,
                TcHook::Egress => TC_H_MIN_EGRESS,
            }
    }
}

/// One filter of a hook, as much of it as we need to tell ours from others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcFilter {
    /// `bpf`, `u32`, `flower`, `matchall`, ...; empty when the kernel sent none.
    pub kind: String,
    pub priority: u16,
    /// In network byte order, as the kernel has it (echoed on removal).
    pub protocol: u16,
    pub handle: u32,
    pub chain: u32,
    /// `TCA_BPF_NAME`, read only for kind `bpf` (the attribute number means
    /// something else in every other kind).
    pub bpf_name: Option<String>,
}

/// One qdisc of a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qdisc {
    pub kind: String,
    pub handle: u32,
    pub parent: u32,
}

/// A netlink request about TC that failed; `op` names it (e.g. "list the
/// ingress filters of #4").
#[derive(Debug, thiserror::Error)]
#[error("netlink: {op}")]
pub struct TcNetlinkError {
    pub op: String,
    #[source]
    pub source: io::Error,
}

impl TcNetlinkError {
    /// The positive errno the kernel (or the socket) answered with.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }

    /// The device, its qdisc or the filter is not there.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ENODEV | libc::ENOENT | libc::EINVAL)
        )
    }
}

/// The filters on `hook` of the device `ifindex`; empty when it has no
/// clsact or ingress qdisc. The kernel sends a header (handle 0, no
/// options) before each priority's filters: those are left out, since they
/// are no filters of their own.
pub fn filters(ifindex: u32, hook: TcHook) -> Result<Vec<TcFilter>, TcNetlinkError> {
    let op = || format!("list the {hook:?} filters of #{ifindex}");
    let req = request(
        RTM_GETTFILTER,
        NLM_F_REQUEST | NLM_F_DUMP,
        ifindex,
        0,
        hook.parent(),
        0,
        &[],
    );
    let mut out = Vec::new();
    exchange(&req, |ty, body| {
        if ty == RTM_NEWTFILTER
            && let Some(f) = parse_filter(body)
            && f.handle != 0
        {
            out.push(f);
        }
    })
    .map_err(|source| TcNetlinkError { op: op(), source })?;
    Ok(out)
}

/// Removes `filter` (as listed by [`filters`]) from `hook` of `ifindex`.
/// The request names the kind too, so the kernel refuses rather than
/// removing a different filter that took the same place meanwhile.
/// `Ok(false)` when it was already gone.
pub fn delete_filter(
    ifindex: u32,
    hook: TcHook,
    filter: &TcFilter,
) -> Result<bool, TcNetlinkError> {
    let mut attrs = Vec::new();
    push_attr(&mut attrs, TCA_KIND, &nul_terminated(&filter.kind));
    if filter.chain != 0 {
        push_attr(&mut attrs, TCA_CHAIN, &filter.chain.to_ne_bytes());
    }
    let req = request(
        RTM_DELTFILTER,
        NLM_F_REQUEST | NLM_F_ACK,
        ifindex,
        filter.handle,
        hook.parent(),
        (u32::from(filter.priority) << 16) | u32::from(filter.protocol),
        &attrs,
    );
    match exchange(&req, |_, _| {}) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV)) => Ok(false),
        Err(source) => Err(TcNetlinkError {
            op: format!(
                "remove the {} filter pref {} handle {:#x} from {hook:?} of #{ifindex}",
                filter.kind, filter.priority, filter.handle
            ),
            source,
        }),
    }
}

/// The qdiscs of the device `ifindex` (root, children, ingress/clsact).
pub fn qdiscs(ifindex: u32) -> Result<Vec<Qdisc>, TcNetlinkError> {
    let req = request(
        RTM_GETQDISC,
        NLM_F_REQUEST | NLM_F_DUMP,
        ifindex,
        0,
        0,
        0,
        &[],
    );
    let mut out = Vec::new();
    exchange(&req, |ty, body| {
        if ty != RTM_NEWQDISC {
            return;
        }
        // Older kernels dump every device's qdiscs whatever tcm_ifindex says.
        if let Some((index, handle, parent, _)) = tcmsg(body)
            && index == ifindex
        {
            let kind = attrs(&body[TCMSG_LEN..])
                .find(|(t, _)| *t == TCA_KIND)
                .map(|(_, v)| c_string(v))
                .unwrap_or_default();
            out.push(Qdisc {
                kind,
                handle,
                parent,
            });
        }
    })
    .map_err(|source| TcNetlinkError {
        op: format!("list the qdiscs of #{ifindex}"),
        source,
    })?;
    Ok(out)
}

/// A socket that receives every qdisc, class and filter change of the
/// calling thread's network namespace. [`TcEvents::wait`] blocks until the
/// next one (or a burst: whatever is queued is read at once).
pub struct TcEvents(OwnedFd);

impl TcEvents {
    pub fn subscribe() -> io::Result<TcEvents> {
        let fd = socket()?;
        bind(&fd, RTMGRP_TC)?;
        Ok(TcEvents(fd))
    }

    /// Blocks until at least one change arrived. A receive buffer overrun
    /// (ENOBUFS) also means changes happened, just more than were kept.
    pub fn wait(&self) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf is valid for its length; the fd is ours.
            let n = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::ENOBUFS) => return Ok(()),
                _ => return Err(e),
            }
        }
    }
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before being owned.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bind(fd: &OwnedFd, groups: u32) -> io::Result<()> {
    // SAFETY: sockaddr_nl is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = groups;
    // SAFETY: addr is a valid sockaddr_nl of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

static SEQ: AtomicU32 = AtomicU32::new(1);

/// An nlmsghdr + tcmsg + `attrs` request.
fn request(
    ty: u16,
    flags: u16,
    ifindex: u32,
    handle: u32,
    parent: u32,
    info: u32,
    attrs: &[u8],
) -> Vec<u8> {
    let len = NLMSG_HDR_LEN + TCMSG_LEN + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&SEQ.fetch_add(1, Ordering::Relaxed).to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // tcmsg: family, two pad bytes, ifindex, handle, parent, info.
    m.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    m.extend_from_slice(&ifindex.to_ne_bytes());
    m.extend_from_slice(&handle.to_ne_bytes());
    m.extend_from_slice(&parent.to_ne_bytes());
    m.extend_from_slice(&info.to_ne_bytes());
    m.extend_from_slice(attrs);
    m
}

fn push_attr(buf: &mut Vec<u8>, ty: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Sends `req` on a fresh socket and hands every reply message (type,
/// body after the nlmsghdr) to `each` until the dump ends or the kernel
/// acknowledges; a negative acknowledgement is the error.
fn exchange(req: &[u8], mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
    let fd = socket()?;
    bind(&fd, 0)?;
    let seq = u32::from_ne_bytes(req[8..12].try_into().expect("4 bytes"));
    // SAFETY: req is valid for its length; the fd is ours.
    let sent = unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: buf is valid for its length; the fd is ours.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        let n = n as usize;
        if n > buf.len() {
            // A datagram larger than our buffer lost its tail: we cannot
            // know what we missed, so the answer is incomplete.
            return Err(io::Error::other(format!(
                "a netlink reply of {n} bytes did not fit in {} bytes",
                buf.len()
            )));
        }
        let mut rest = &buf[..n];
        let mut multi = false;
        while rest.len() >= NLMSG_HDR_LEN {
            let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
            let ty = u16::from_ne_bytes(rest[4..6].try_into().expect("2 bytes"));
            let flags = u16::from_ne_bytes(rest[6..8].try_into().expect("2 bytes"));
            let msg_seq = u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
            if len < NLMSG_HDR_LEN || len > rest.len() {
                return Err(io::Error::other("a malformed netlink reply header"));
            }
            let body = &rest[NLMSG_HDR_LEN..len];
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
            if msg_seq != seq {
                continue;
            }
            multi |= flags & NLM_F_MULTI != 0;
            match ty {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let code = body
                        .get(0..4)
                        .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
                    return if code == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-code))
                    };
                }
                _ => each(ty, body),
            }
        }
        if !multi {
            // A single reply without NLM_F_MULTI and no ACK asked for.
            return Ok(());
        }
    }
}

/// `(ifindex, handle, parent, info)` of a tcmsg.
fn tcmsg(body: &[u8]) -> Option<(u32, u32, u32, u32)> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(body.get(at..at + 4)?.try_into().ok()?))
    };
    Some((word(4)?, word(8)?, word(12)?, word(16)?))
}

/// The attributes in `buf`, as `(type, value)`, stopping at the first one
/// that does not fit (the rest of such a message is not ours to judge).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            buf = &[];
            return None;
        }
        let value = &buf[4..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((ty, value))
    })
}

/// A NUL-terminated string attribute, read up to its first NUL (or its
/// end), never rejected.
fn c_string(value: &[u8]) -> String {
    let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).into_owned()
}

/// A filter from an RTM_NEWTFILTER body; `None` only when the body is too
/// short to hold a tcmsg.
fn parse_filter(body: &[u8]) -> Option<TcFilter> {
    let (_, handle, _, info) = tcmsg(body)?;
    let mut kind = String::new();
    let mut options: &[u8] = &[];
    let mut chain = 0;
    for (ty, value) in attrs(&body[TCMSG_LEN..]) {
        match ty {
            TCA_KIND => kind = c_string(value),
            TCA_OPTIONS => options = value,
            TCA_CHAIN => {
                if let Ok(b) = value.try_into() {
                    chain = u32::from_ne_bytes(b);
                }
            }
            _ => {}
        }
    }
    // TCA_OPTIONS' contents are the kind's own attribute space: attribute
    // 7 is the program name only in cls_bpf's.
    let bpf_name = (kind == "bpf")
        .then(|| {
            attrs(options)
                .find(|(t, _)| *t == TCA_BPF_NAME)
                .map(|(_, v)| c_string(v))
        })
        .flatten();
    Some(TcFilter {
        kind,
        priority: (info >> 16) as u16,
        protocol: (info & 0xffff) as u16,
        handle,
        chain,
        bpf_name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(kind: &str, options: &[u8], prio: u16, handle: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&[0, 0, 0, 0]);
        b.extend_from_slice(&3u32.to_ne_bytes());
        b.extend_from_slice(&handle.to_ne_bytes());
        b.extend_from_slice(&TcHook::Ingress.parent().to_ne_bytes());
        b.extend_from_slice(&((u32::from(prio) << 16) | 0x0300).to_ne_bytes());
        push_attr(&mut b, TCA_KIND, &nul_terminated(kind));
        push_attr(&mut b, TCA_OPTIONS, options);
        b
    }

    #[test]
    fn a_u32_filter_with_actions_is_someone_elses_not_an_error() {
        // TCA_U32_ACT (7, the number of TCA_BPF_NAME) nests attributes:
        // its second byte is a NUL, which is what aya 0.14 chokes on.
        let mut act = Vec::new();
        push_attr(&mut act, 1, &nul_terminated("mirred"));
        let mut options = Vec::new();
        push_attr(&mut options, 7 | 0x8000, &act);
        let f = parse_filter(&body("u32", &options, 1, 0x800)).unwrap();
        assert_eq!(f.kind, "u32");
        assert_eq!((f.priority, f.handle), (1, 0x800));
        assert_eq!(f.bpf_name, None);
    }

    #[test]
    fn a_bpf_filter_has_its_name_read() {
        let mut options = Vec::new();
        push_attr(
            &mut options,
            TCA_BPF_NAME,
            &nul_terminated("vxlan_ingress_tc"),
        );
        let f = parse_filter(&body("bpf", &options, 8472, 1)).unwrap();
        assert_eq!(f.bpf_name.as_deref(), Some("vxlan_ingress_tc"));
        assert_eq!((f.priority, f.handle, f.protocol), (8472, 1, 0x0300));
        // A name without its NUL, or with junk after it, is still read.
        let mut options = Vec::new();
        push_attr(&mut options, TCA_BPF_NAME, b"prog\0\0x");
        let f = parse_filter(&body("bpf", &options, 1, 1)).unwrap();
        assert_eq!(f.bpf_name.as_deref(), Some("prog"));
    }

    #[test]
    fn truncated_attributes_end_the_message_instead_of_failing() {
        let mut b = body("flower", &[], 2, 1);
        b.extend_from_slice(&[200, 0, 2, 0, 1]);
        let f = parse_filter(&b).unwrap();
        assert_eq!(f.kind, "flower");
        assert!(parse_filter(&[0; 8]).is_none());
    }
}
