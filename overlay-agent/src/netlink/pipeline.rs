//! Many rtnetlink requests in flight on one socket: a window of requests
//! goes to the kernel in one `sendmsg`, each with its own sequence number and
//! `NLM_F_ACK`, and the answers are matched back to their request by
//! sequence number ([`Window`]), so that a failure names the request (and so
//! the peer) that caused it.
//!
//! The kernel handles the requests of one write in order and goes on after
//! one fails (`netlink_rcv_skb`), answering every one with an
//! `NLMSG_ERROR` (an ack, code 0, or the errno); a `GET` answers with its
//! data first. One write and a few reads replace a round trip per request,
//! which is what made programming thousands of peers one request at a time
//! cost a thread wake-up per entry.
//!
//! The socket is separate from rtnetlink's connection (whose requests are
//! matched by its own task, one stream per request) and, like it, bound to
//! the network namespace of the thread that opened it.

use std::{
    fmt,
    io::{self, IoSlice},
    num::NonZeroI32,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use rtnetlink::{
    packet_core::{
        ErrorMessage, NLM_F_ACK, NLM_F_REQUEST, NetlinkBuffer, NetlinkMessage, NetlinkPayload,
    },
    packet_route::RouteNetlinkMessage,
};
use tokio::io::unix::AsyncFd;

/// `NETLINK_CAP_ACK` (linux/netlink.h): an error answer carries the failed
/// request's header only, not the whole request.
const NETLINK_CAP_ACK: libc::c_int = 10;

/// Requests per write. Their answers queue on our socket while the kernel
/// handles the write, so the receive buffer must hold a window's answers
/// (an ack's skb is under 1 KiB, a route lookup's reply a few KiB).
pub const WINDOW: usize = 128;

/// The receive buffer asked for (root may exceed `rmem_max`).
const RCVBUF: libc::c_int = 4 << 20;

/// One request: the message and its `NLM_F_*` flags besides
/// `NLM_F_REQUEST | NLM_F_ACK`, which every request gets.
#[derive(Clone, Debug)]
pub struct Request {
    pub message: RouteNetlinkMessage,
    pub flags: u16,
}

impl Request {
    pub fn new(message: RouteNetlinkMessage, flags: u16) -> Self {
        Self { message, flags }
    }
}

/// The kernel's answer to one request: the messages it sent before its
/// final `NLMSG_ERROR` (a `GET`'s reply), and that error's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub replies: Vec<RouteNetlinkMessage>,
    pub outcome: Result<(), ErrorMessage>,
}

/// The answers awaited for a window of requests with consecutive sequence
/// numbers from `first`: which arrived, and what they said.
#[derive(Debug)]
pub struct Window {
    first: u32,
    replies: Vec<Vec<RouteNetlinkMessage>>,
    outcomes: Vec<Option<Result<(), ErrorMessage>>>,
    open: usize,
}

impl Window {
    pub fn new(first: u32, len: usize) -> Self {
        Self {
            first,
            replies: vec![Vec::new(); len],
            outcomes: vec![None; len],
            open: len,
        }
    }

    /// The request a sequence number belongs to, if it is one of ours.
    fn slot(&self, seq: u32) -> Option<usize> {
        let i = usize::try_from(seq.wrapping_sub(self.first)).ok()?;
        (i < self.outcomes.len()).then_some(i)
    }

    /// Takes one message from the socket. Messages of other sequence
    /// numbers (a window given up on earlier) and a second verdict for one
    /// request are ignored: what counts is the first verdict of each.
    pub fn take(&mut self, seq: u32, payload: NetlinkPayload<RouteNetlinkMessage>) {
        let Some(i) = self.slot(seq) else { return };
        if self.outcomes[i].is_some() {
            return;
        }
        match payload {
            NetlinkPayload::Error(e) if e.code.is_none() => {
                self.outcomes[i] = Some(Ok(()));
                self.open -= 1;
            }
            NetlinkPayload::Error(e) => {
                self.outcomes[i] = Some(Err(e));
                self.open -= 1;
            }
            NetlinkPayload::InnerMessage(m) => self.replies[i].push(m),
            _ => {}
        }
    }

    /// Whether every request has its verdict.
    pub fn done(&self) -> bool {
        self.open == 0
    }

    /// The answers in request order. A request still without a verdict
    /// (the socket failed) gets `lost` as its errno.
    pub fn answers(self, lost: i32) -> Vec<Answer> {
        self.outcomes
            .into_iter()
            .zip(self.replies)
            .map(|(outcome, replies)| Answer {
                replies,
                outcome: outcome.unwrap_or_else(|| Err(errno_message(lost))),
            })
            .collect()
    }
}

/// An `NLMSG_ERROR` carrying `errno`, for a request whose answer the socket
/// lost: the caller sees the errno of the socket's failure.
fn errno_message(errno: i32) -> ErrorMessage {
    let mut e = ErrorMessage::default();
    e.code = NonZeroI32::new(-errno.abs()).or(NonZeroI32::new(-libc::EIO));
    e
}

/// A NETLINK_ROUTE socket for pipelined requests.
pub struct Pipeline {
    fd: AsyncFd<OwnedFd>,
    next_seq: u32,
    send: Vec<u8>,
    recv: Vec<u8>,
}

impl fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("fd", &self.fd.get_ref().as_raw_fd())
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

impl Pipeline {
    /// Opens the socket in the calling thread's network namespace; within a
    /// tokio runtime (its reactor waits for the answers).
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        setsockopt(&fd, libc::SOL_NETLINK, NETLINK_CAP_ACK, one)?;
        if setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RCVBUF).is_err() {
            // Without CAP_NET_ADMIN: as much as rmem_max allows.
            setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, RCVBUF)?;
        }
        // SAFETY: a zeroed sockaddr_nl is valid (pid 0: the kernel picks).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `addr` is valid for the length given.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if bound < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is an OwnedFd: open, and the same descriptor for as
        // long as the AsyncFd owns it.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Self {
            fd,
            next_seq: rand::random(),
            send: Vec::new(),
            recv: vec![0; 64 << 10],
        })
    }

    /// Sends the requests, [`WINDOW`] per write, and returns the kernel's
    /// answer to each, in request order. A socket failure fails the
    /// requests of the window it hit (and those after it) with its errno;
    /// nothing is retried here.
    pub async fn run(&mut self, requests: Vec<Request>) -> Vec<Answer> {
        let mut answers = Vec::with_capacity(requests.len());
        let mut rest = requests.into_iter().peekable();
        while rest.peek().is_some() {
            let window: Vec<Request> = rest.by_ref().take(WINDOW).collect();
            let len = window.len();
            match self.exchange(window).await {
                Ok(got) => answers.extend(got),
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    answers.extend(Window::new(0, len).answers(errno));
                }
            }
        }
        answers
    }

    async fn exchange(&mut self, requests: Vec<Request>) -> io::Result<Vec<Answer>> {
        let first = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(requests.len() as u32);
        let mut window = Window::new(first, requests.len());
        self.send.clear();
        for (i, req) in requests.into_iter().enumerate() {
            let mut msg = NetlinkMessage::from(req.message);
            msg.header.flags = NLM_F_REQUEST | NLM_F_ACK | req.flags;
            msg.header.sequence_number = first.wrapping_add(i as u32);
            msg.finalize();
            let at = self.send.len();
            self.send.resize(at + msg.buffer_len(), 0);
            msg.serialize(&mut self.send[at..]);
        }
        self.write().await?;
        while !window.done() {
            let n = self.read().await?;
            self.parse(n, &mut window)?;
        }
        Ok(window.answers(libc::EIO))
    }

    async fn write(&mut self) -> io::Result<()> {
        // SAFETY: a zeroed sockaddr_nl is the kernel's address (pid 0).
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            let mut guard = self.fd.writable().await?;
            let buf = &self.send;
            let sent = guard.try_io(|fd| {
                let iov = [IoSlice::new(buf)];
                // SAFETY: a zeroed msghdr is valid; the pointers set below
                // outlive the call.
                let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
                hdr.msg_name = (&raw mut kernel).cast();
                hdr.msg_namelen = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
                hdr.msg_iov = iov.as_ptr().cast_mut().cast();
                hdr.msg_iovlen = 1;
                // SAFETY: `hdr` describes valid memory.
                let n = unsafe { libc::sendmsg(fd.get_ref().as_raw_fd(), &hdr, 0) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n)
                }
            });
            match sent {
                Ok(result) => return result.map(|_| ()),
                Err(_would_block) => continue,
            }
        }
    }

    async fn read(&mut self) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            let buf = &mut self.recv;
            let got = guard.try_io(|fd| {
                // SAFETY: `buf` is valid for its length.
                let n = unsafe {
                    libc::recv(
                        fd.get_ref().as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match got {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    fn parse(&self, n: usize, window: &mut Window) -> io::Result<()> {
        let mut at = 0;
        while at < n {
            let buf = NetlinkBuffer::new_checked(&self.recv[at..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = buf.length() as usize;
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.recv[at..at + len])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            window.take(msg.header.sequence_number, msg.payload);
            // Messages are 4-byte aligned in the datagram.
            at += (len + 3) & !3;
            if len == 0 {
                break;
            }
        }
        Ok(())
    }
}

fn setsockopt(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a c_int, valid for the length given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_route::route::RouteMessage;

    use super::*;

    fn ack() -> NetlinkPayload<RouteNetlinkMessage> {
        NetlinkPayload::Error(ErrorMessage::default())
    }

    fn nack(errno: i32) -> NetlinkPayload<RouteNetlinkMessage> {
        NetlinkPayload::Error(errno_message(errno))
    }

    fn reply() -> NetlinkPayload<RouteNetlinkMessage> {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(RouteMessage::default()))
    }

    #[test]
    fn answers_out_of_order_go_to_their_requests() {
        let mut w = Window::new(100, 3);
        w.take(102, nack(libc::EEXIST));
        assert!(!w.done());
        w.take(100, ack());
        w.take(101, reply());
        w.take(101, ack());
        assert!(w.done());
        let a = w.answers(libc::EIO);
        assert_eq!(a[0].outcome, Ok(()));
        assert_eq!(a[1].replies.len(), 1);
        assert_eq!(a[1].outcome, Ok(()));
        assert_eq!(
            a[2].outcome.as_ref().unwrap_err().to_io().raw_os_error(),
            Some(libc::EEXIST)
        );
    }

    #[test]
    fn foreign_and_repeated_answers_are_ignored() {
        let mut w = Window::new(7, 2);
        w.take(6, nack(libc::ENOENT));
        w.take(9, nack(libc::ENOENT));
        w.take(7, ack());
        w.take(7, nack(libc::EINVAL));
        assert!(!w.done());
        let a = w.answers(libc::ENOBUFS);
        assert_eq!(a[0].outcome, Ok(()));
        // Never answered: the socket's errno.
        assert_eq!(
            a[1].outcome.as_ref().unwrap_err().to_io().raw_os_error(),
            Some(libc::ENOBUFS)
        );
    }

    #[test]
    fn sequence_numbers_wrap() {
        let mut w = Window::new(u32::MAX, 2);
        w.take(0, ack());
        w.take(u32::MAX, nack(libc::ENODEV));
        assert!(w.done());
        let a = w.answers(libc::EIO);
        assert!(a[0].outcome.is_err());
        assert_eq!(a[1].outcome, Ok(()));
    }
}
