//! Elements added to and removed from nftables sets of addresses over
//! `NETLINK_NETFILTER`, as one nf_tables transaction: what `nft -f -` does
//! for `add element` / `delete element` lines, without starting a process.
//!
//! A peer event used to pay for an `nft` process (fork, exec, the library's
//! cache dump: 5 to 10 ms here) before its first entry was programmed; this
//! is one `sendmsg` and one ack per message. Whole tables (install, rebuild)
//! still go through `nft -f -`, which is what reads best there.
//!
//! The transaction is a netfilter batch: `NFNL_MSG_BATCH_BEGIN`, one
//! `NFT_MSG_NEWSETELEM` or `NFT_MSG_DELSETELEM` per set and verb (each with
//! `NLM_F_ACK`, so every one is answered), `NFNL_MSG_BATCH_END`; the kernel
//! applies all of it or none (`nfnetlink_rcv_batch`). A removal is sent as
//! an add and a delete of the same element, as the nft scripts do, so that
//! removing an element that is not there is not an error (kernels before
//! 6.3 have no `DESTROYSETELEM`).

use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

/// linux/netlink.h
const NETLINK_NETFILTER: libc::c_int = 12;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 0x2;
const NLA_F_NESTED: u16 = 0x8000;
/// linux/netfilter/nfnetlink.h
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
/// linux/netfilter/nf_tables.h
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;
/// linux/netfilter.h
pub const NFPROTO_INET: u8 = 1;

/// How long the kernel's answers are waited for: it answers a batch at once,
/// so running out of this means the socket lost them.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// More elements than this in one change go through `nft -f -` instead:
/// the whole batch has to fit one datagram of the socket's send buffer.
pub const MAX_ELEMENTS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ElementsError {
    #[error("netfilter netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("nf_tables refused {verb} element of set {set}: {source}")]
    Refused {
        verb: &'static str,
        set: String,
        #[source]
        source: io::Error,
    },
    #[error("nf_tables did not answer the set element change")]
    NoAnswer,
    #[error("{0} elements in one change: more than {MAX_ELEMENTS}")]
    TooMany(usize),
}

/// One set's changes: the elements to add and those to remove.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetChange<'a> {
    pub set: &'a str,
    pub add: Vec<IpAddr>,
    pub remove: Vec<IpAddr>,
}

/// One message of the batch: its type and flags, and the set and elements
/// it names (empty for BEGIN/END).
struct Message<'a> {
    kind: u16,
    flags: u16,
    family: u8,
    set: &'a str,
    elements: &'a [IpAddr],
    verb: &'static str,
}

/// Applies `changes` to the sets of `table` (family `family`) in one
/// transaction, in the calling thread's network namespace.
pub fn apply(family: u8, table: &str, changes: &[SetChange<'_>]) -> Result<(), ElementsError> {
    let total: usize = changes.iter().map(|c| c.add.len() + c.remove.len()).sum();
    if total > MAX_ELEMENTS {
        return Err(ElementsError::TooMany(total));
    }
    let mut messages = Vec::new();
    for c in changes {
        let elem = |kind, flags, elements, verb| Message {
            kind: (NFNL_SUBSYS_NFTABLES << 8) | kind,
            flags: NLM_F_REQUEST | NLM_F_ACK | flags,
            family,
            set: c.set,
            elements,
            verb,
        };
        if !c.add.is_empty() {
            messages.push(elem(NFT_MSG_NEWSETELEM, NLM_F_CREATE, &c.add[..], "add"));
        }
        if !c.remove.is_empty() {
            // Present first (a no-op if it is), then gone.
            messages.push(elem(NFT_MSG_NEWSETELEM, NLM_F_CREATE, &c.remove[..], "add"));
            messages.push(elem(NFT_MSG_DELSETELEM, 0, &c.remove[..], "delete"));
        }
    }
    if messages.is_empty() {
        return Ok(());
    }
    let seq0: u32 = rand::random();
    let buf = encode_batch(seq0, table, &messages);
    let sock = open()?;
    send(&sock, &buf)?;
    // Every element message (sequence numbers seq0 + 1 ..) is answered.
    let mut open_seqs: Vec<u32> = (1..=messages.len() as u32)
        .map(|i| seq0.wrapping_add(i))
        .collect();
    let mut first_error: Option<ElementsError> = None;
    let mut recv = vec![0u8; 64 << 10];
    while !open_seqs.is_empty() {
        let n = receive(&sock, &mut recv)?;
        for (seq, errno) in acks(&recv[..n]) {
            let Some(at) = open_seqs.iter().position(|s| *s == seq) else {
                continue;
            };
            open_seqs.swap_remove(at);
            if errno != 0 && first_error.is_none() {
                let m = &messages[seq.wrapping_sub(seq0) as usize - 1];
                first_error = Some(ElementsError::Refused {
                    verb: m.verb,
                    set: m.set.to_owned(),
                    source: io::Error::from_raw_os_error(errno),
                });
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// The batch as one datagram: BEGIN, the messages (sequence numbers from
/// `seq0 + 1`), END.
fn encode_batch(seq0: u32, table: &str, messages: &[Message<'_>]) -> Vec<u8> {
    let mut buf = Vec::new();
    let control = |kind| Message {
        kind,
        flags: NLM_F_REQUEST,
        family: 0,
        set: "",
        elements: &[],
        verb: "",
    };
    encode(&mut buf, seq0, table, &control(NFNL_MSG_BATCH_BEGIN));
    for (i, m) in messages.iter().enumerate() {
        encode(&mut buf, seq0.wrapping_add(i as u32 + 1), table, m);
    }
    let end = seq0.wrapping_add(messages.len() as u32 + 1);
    encode(&mut buf, end, table, &control(NFNL_MSG_BATCH_END));
    buf
}

fn encode(buf: &mut Vec<u8>, seq: u32, table: &str, m: &Message<'_>) {
    let start = buf.len();
    // struct nlmsghdr; the length is filled in at the end.
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&m.kind.to_ne_bytes());
    buf.extend_from_slice(&m.flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    // struct nfgenmsg: family, NFNETLINK_V0, res_id (big endian): the
    // subsystem for BEGIN/END, 0 for the others.
    let control = m.kind == NFNL_MSG_BATCH_BEGIN || m.kind == NFNL_MSG_BATCH_END;
    buf.push(m.family);
    buf.push(0);
    let res_id = if control { NFNL_SUBSYS_NFTABLES } else { 0 };
    buf.extend_from_slice(&res_id.to_be_bytes());
    if !control {
        attr(buf, NFTA_SET_ELEM_LIST_TABLE, &nul_terminated(table));
        attr(buf, NFTA_SET_ELEM_LIST_SET, &nul_terminated(m.set));
        let list = nest_start(buf, NFTA_SET_ELEM_LIST_ELEMENTS);
        for ip in m.elements {
            let elem = nest_start(buf, NFTA_LIST_ELEM);
            let key = nest_start(buf, NFTA_SET_ELEM_KEY);
            match ip {
                IpAddr::V4(ip) => attr(buf, NFTA_DATA_VALUE, &ip.octets()),
                IpAddr::V6(ip) => attr(buf, NFTA_DATA_VALUE, &ip.octets()),
            }
            nest_end(buf, key);
            nest_end(buf, elem);
        }
        nest_end(buf, list);
    }
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// struct nlattr and its payload, padded to 4 bytes.
fn attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = (4 + payload.len()) as u16;
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    pad(buf);
}

fn nest_start(buf: &mut Vec<u8>, kind: u16) -> usize {
    let at = buf.len();
    buf.extend_from_slice(&0u16.to_ne_bytes());
    buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    at
}

fn nest_end(buf: &mut [u8], at: usize) {
    let len = (buf.len() - at) as u16;
    buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

fn pad(buf: &mut Vec<u8>) {
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// The (sequence number, errno) of every `NLMSG_ERROR` in a datagram (errno
/// 0: an ack).
fn acks(mut data: &[u8]) -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    while data.len() >= 16 {
        let len = u32::from_ne_bytes(data[0..4].try_into().unwrap_or_default()) as usize;
        if len < 16 || len > data.len() {
            break;
        }
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        let seq = u32::from_ne_bytes(data[8..12].try_into().unwrap_or_default());
        if kind == NLMSG_ERROR && len >= 20 {
            let error = i32::from_ne_bytes(data[16..20].try_into().unwrap_or_default());
            out.push((seq, -error));
        }
        let next = (len + 3) & !3;
        data = &data[next.min(data.len())..];
    }
    out
}

fn open() -> Result<OwnedFd, ElementsError> {
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if raw < 0 {
        return Err(ElementsError::Socket(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let tv = libc::timeval {
        tv_sec: ANSWER_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: `tv` is valid for the length given.
    let set = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if set < 0 {
        return Err(ElementsError::Socket(io::Error::last_os_error()));
    }
    Ok(fd)
}

fn send(fd: &OwnedFd, buf: &[u8]) -> Result<(), ElementsError> {
    // SAFETY: a zeroed sockaddr_nl is the kernel's address (pid 0).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `buf` and `kernel` are valid for the lengths given.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            0,
            (&raw const kernel).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(ElementsError::Socket(io::Error::last_os_error()));
    }
    Ok(())
}

fn receive(fd: &OwnedFd, buf: &mut [u8]) -> Result<usize, ElementsError> {
    // SAFETY: `buf` is valid for its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ElementsError::NoAnswer,
            _ => ElementsError::Socket(e),
        });
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_begin_the_element_messages_and_end() {
        let ips: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap()];
        let m = Message {
            kind: (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM,
            flags: NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
            family: NFPROTO_INET,
            set: "vteps",
            elements: &ips,
            verb: "add",
        };
        let buf = encode_batch(100, "t", &[m]);
        // BEGIN: header and nfgenmsg only, res_id = the subsystem.
        assert_eq!(u32::from_ne_bytes(buf[0..4].try_into().unwrap()), 20);
        assert_eq!(u16::from_ne_bytes([buf[4], buf[5]]), NFNL_MSG_BATCH_BEGIN);
        assert_eq!(&buf[16..20], &[0, 0, 0, 10]);
        // The element message: table "t\0" (padded), set "vteps\0"
        // (padded), then the nested list with the address last.
        let m = &buf[20..];
        let len = u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize;
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), 0x0a0c);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 101);
        assert_eq!(&m[16..20], &[1, 0, 0, 0]);
        assert_eq!(&m[20..26], &[6, 0, 1, 0, b't', 0]);
        assert_eq!(&m[28..38], &[10, 0, 2, 0, b'v', b't', b'e', b'p', b's', 0]);
        assert_eq!(&m[len - 4..len], &[10, 0, 0, 1]);
        // Nested lengths: list 4 + elem 4 + key 4 + value 8 = 20.
        assert_eq!(u16::from_ne_bytes([m[40], m[41]]), 20);
        assert_eq!(u16::from_ne_bytes([m[42], m[43]]), 3 | NLA_F_NESTED);
        // END after it.
        let end = &buf[20 + len..];
        assert_eq!(end.len(), 20);
        assert_eq!(u16::from_ne_bytes([end[4], end[5]]), NFNL_MSG_BATCH_END);
        assert_eq!(u32::from_ne_bytes(end[8..12].try_into().unwrap()), 102);
    }

    #[test]
    fn acks_and_errors_are_read_by_sequence_number() {
        let mut d = Vec::new();
        for (seq, err) in [(7u32, 0i32), (8, -2)] {
            d.extend_from_slice(&36u32.to_ne_bytes());
            d.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            d.extend_from_slice(&0u16.to_ne_bytes());
            d.extend_from_slice(&seq.to_ne_bytes());
            d.extend_from_slice(&0u32.to_ne_bytes());
            d.extend_from_slice(&err.to_ne_bytes());
            d.extend_from_slice(&[0; 16]);
        }
        assert_eq!(acks(&d), vec![(7, 0), (8, 2)]);
        // A truncated tail is ignored, not misread.
        assert_eq!(acks(&d[..50]), vec![(7, 0)]);
    }
}
