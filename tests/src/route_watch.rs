//! The vxlan routes of one namespace as the kernel announces them: a
//! netlink socket subscribed to IPv4 route changes, read on its own thread,
//! keeps the set of `10.0.0.0/8` /24 routes whose gateway is their own
//! network address (how flanneld and our agent route a peer's subnet over
//! `flannel.<VNI>`), with the time each one last appeared or went.
//!
//! Watching instead of polling `ip route` keeps the measurement from
//! costing more than what it measures at 10,000 routes, and each change is
//! timestamped when the kernel reports it, not at the next poll. When the
//! socket's buffer overflows (ENOBUFS) the set is read again with a dump.
//! IPv4 sends no notification for the routes a deleted device takes with
//! it, so the set is only right while `flannel.<VNI>` stays.

use std::{
    collections::{HashMap, HashSet},
    mem,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTA_DST: u16 = 1;
const RTA_GATEWAY: u16 = 5;
const RTA_TABLE: u16 = 15;
const RT_TABLE_MAIN: u32 = 254;
const NLMSG_HDR: usize = 16;
const RTMSG: usize = 12;
/// Room for a burst of thousands of notifications before ENOBUFS.
const RCVBUF: libc::c_int = 64 << 20;

#[derive(Default)]
struct State {
    /// Route destinations (host order) present now.
    present: HashSet<u32>,
    /// When each destination last appeared or went.
    changed: HashMap<u32, Instant>,
    /// When the set last changed.
    last: Option<Instant>,
    /// How many times the socket overflowed and the set was dumped again.
    resyncs: u64,
    error: Option<String>,
}

/// Watches one namespace's vxlan routes until dropped.
pub struct RouteWatch {
    state: Arc<(Mutex<State>, Condvar)>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl RouteWatch {
    /// Subscribes inside namespace `ns`, then dumps what is there already.
    pub fn start(ns: &str) -> Result<RouteWatch> {
        let state = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (st, sp, name) = (state.clone(), stop.clone(), ns.to_owned());
        let thread = thread::Builder::new()
            .name(format!("routes:{ns}"))
            .spawn(move || {
                let setup = crate::netns::enter(&name).and_then(|_| {
                    let events = open(RTMGRP_IPV4_ROUTE)?;
                    let present = dump()?;
                    Ok((events, present))
                });
                let events = match setup {
                    Ok((events, present)) => {
                        let mut s = st.0.lock().unwrap();
                        s.present = present;
                        drop(s);
                        let _ = ready_tx.send(Ok(()));
                        events
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if let Err(e) = follow(&events, &st, &sp) {
                    st.0.lock().unwrap().error = Some(format!("{e:#}"));
                    st.1.notify_all();
                }
            })?;
        ready_rx.recv()??;
        Ok(RouteWatch {
            state,
            stop,
            thread: Some(thread),
        })
    }

    pub fn count(&self) -> usize {
        self.state.0.lock().unwrap().present.len()
    }

    pub fn contains(&self, subnet: ipnet::Ipv4Net) -> bool {
        let dst = u32::from(subnet.network());
        self.state.0.lock().unwrap().present.contains(&dst)
    }

    /// Times the socket overflowed (each followed by a dump).
    pub fn resyncs(&self) -> u64 {
        self.state.0.lock().unwrap().resyncs
    }

    /// Waits until exactly `n` routes are present; when the last change
    /// that made it so was seen.
    pub fn wait_count(&self, n: usize, limit: Duration) -> Result<Instant> {
        self.wait(limit, &format!("{n} routes"), |s| {
            (s.present.len() == n).then(|| s.last.unwrap_or_else(Instant::now))
        })
    }

    /// Waits until `subnet`'s route is present (`true`) or gone; when it
    /// appeared or went.
    pub fn wait_route(
        &self,
        subnet: ipnet::Ipv4Net,
        present: bool,
        limit: Duration,
    ) -> Result<Instant> {
        let dst = u32::from(subnet.network());
        let what = format!("{subnet} {}", if present { "appears" } else { "goes" });
        self.wait(limit, &what, |s| {
            (s.present.contains(&dst) == present)
                .then(|| s.changed.get(&dst).copied().unwrap_or_else(Instant::now))
        })
    }

    fn wait(
        &self,
        limit: Duration,
        what: &str,
        mut done: impl FnMut(&State) -> Option<Instant>,
    ) -> Result<Instant> {
        let deadline = Instant::now() + limit;
        let (lock, cvar) = &*self.state;
        let mut s = lock.lock().unwrap();
        loop {
            if let Some(e) = &s.error {
                bail!("watching routes: {e}");
            }
            if let Some(t) = done(&s) {
                return Ok(t);
            }
            let now = Instant::now();
            if now >= deadline {
                bail!("{what}: not within {limit:?} ({} routes)", s.present.len());
            }
            s = cvar.wait_timeout(s, deadline - now).unwrap().0;
        }
    }
}

impl Drop for RouteWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn open(groups: u32) -> Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned from here on.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        bail!("netlink socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_opt(&fd, libc::SO_RCVBUFFORCE, RCVBUF)?;
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: setsockopt with a timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            mem::size_of::<libc::timeval>() as u32,
        )
    };
    if rc != 0 {
        bail!("SO_RCVTIMEO: {}", std::io::Error::last_os_error());
    }
    // SAFETY: sockaddr_nl is plain data; zeroed is a valid start.
    let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = groups;
    // SAFETY: bind with a sockaddr_nl of the size given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_nl).cast(),
            mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc != 0 {
        bail!(
            "binding a netlink socket: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(fd)
}

fn set_opt(fd: &OwnedFd, opt: libc::c_int, value: libc::c_int) -> Result<()> {
    // SAFETY: setsockopt with an int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&value as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as u32,
        )
    };
    if rc != 0 {
        bail!("setsockopt {opt}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// One recv; `Ok(None)` on the receive timeout.
fn recv(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
    // SAFETY: recv(2) into a buffer of the length given.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN | libc::EINTR) => Ok(None),
        _ => Err(e),
    }
}

/// The vxlan routes present now, by a dump on a socket of its own.
fn dump() -> Result<HashSet<u32>> {
    let fd = open(0)?;
    let mut req = [0u8; NLMSG_HDR + RTMSG];
    req[0..4].copy_from_slice(&((NLMSG_HDR + RTMSG) as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETROUTE.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[NLMSG_HDR] = libc::AF_INET as u8;
    // SAFETY: send(2) of a buffer of the length given.
    let n = unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if n != req.len() as isize {
        bail!(
            "sending a route dump request: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut present = HashSet::new();
    let mut buf = vec![0u8; 1 << 20];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if Instant::now() > deadline {
            bail!("the route dump did not finish within 10 s");
        }
        let Some(len) = recv(&fd, &mut buf)? else {
            continue;
        };
        let mut done = false;
        for_each_message(&buf[..len], |kind, body| match kind {
            NLMSG_DONE => done = true,
            NLMSG_ERROR => done = true,
            RTM_NEWROUTE => {
                if let Some(dst) = vxlan_route(body) {
                    present.insert(dst);
                }
            }
            _ => {}
        });
        if done {
            return Ok(present);
        }
    }
}

fn follow(fd: &OwnedFd, state: &(Mutex<State>, Condvar), stop: &AtomicBool) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    while !stop.load(Ordering::SeqCst) {
        let len = match recv(fd, &mut buf) {
            Ok(Some(len)) => len,
            Ok(None) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                let present = dump()?;
                let mut s = state.0.lock().unwrap();
                s.present = present;
                s.last = Some(Instant::now());
                s.resyncs += 1;
                state.1.notify_all();
                continue;
            }
            Err(e) => bail!("reading route notifications: {e}"),
        };
        let now = Instant::now();
        let mut s = state.0.lock().unwrap();
        let mut changed = false;
        for_each_message(&buf[..len], |kind, body| {
            let Some(dst) = vxlan_route(body) else {
                return;
            };
            let flipped = match kind {
                RTM_NEWROUTE => s.present.insert(dst),
                RTM_DELROUTE => s.present.remove(&dst),
                _ => false,
            };
            if flipped {
                s.changed.insert(dst, now);
                changed = true;
            }
        });
        if changed {
            s.last = Some(now);
            state.1.notify_all();
        }
    }
    Ok(())
}

fn for_each_message(mut buf: &[u8], mut f: impl FnMut(u16, &[u8])) {
    while buf.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize;
        if len < NLMSG_HDR || len > buf.len() {
            return;
        }
        let kind = u16::from_ne_bytes(buf[4..6].try_into().unwrap());
        f(kind, &buf[NLMSG_HDR..len]);
        buf = &buf[align(len).min(buf.len())..];
    }
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// The destination of a main-table IPv4 /24 in 10.0.0.0/8 whose gateway is
/// its own network address, if `body` (an rtmsg and its attributes) is one.
fn vxlan_route(body: &[u8]) -> Option<u32> {
    if body.len() < RTMSG || body[0] != libc::AF_INET as u8 || body[1] != 24 {
        return None;
    }
    let (mut dst, mut gateway, mut table) = (None, None, u32::from(body[4]));
    let mut attrs = &body[RTMSG..];
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            break;
        }
        let data = &attrs[4..len];
        let addr = || data.try_into().ok().map(u32::from_be_bytes);
        match kind {
            RTA_DST => dst = addr(),
            RTA_GATEWAY => gateway = addr(),
            RTA_TABLE => {
                if let Ok(b) = data.try_into() {
                    table = u32::from_ne_bytes(b);
                }
            }
            _ => {}
        }
        attrs = &attrs[align(len).min(attrs.len())..];
    }
    let dst = dst?;
    (table == RT_TABLE_MAIN && gateway == Some(dst) && dst >> 24 == 10).then_some(dst)
}
