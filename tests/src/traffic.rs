//! Traffic between containers that checks behaviour, not speed: every ping
//! answered, every TCP byte delivered with the same SHA-256 on both ends, every
//! UDP datagram of a paced burst received exactly once and intact.
//!
//! Senders and receivers are threads `setns()`-ed into the container
//! namespaces; every socket operation has a timeout so a broken datapath fails
//! the test instead of hanging it.

use std::{
    collections::BTreeSet,
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};

use crate::{cmd, netns};

/// Pings `dst` (IPv4 or IPv6) from namespace `ns` `count` times; fails
/// unless every reply arrives.
pub fn ping(ns: &str, dst: impl Into<IpAddr>, count: u32) -> Result<()> {
    let dst: IpAddr = dst.into();
    let deadline = (count / 5 + 5).to_string();
    let out = cmd::command(
        Some(ns),
        &[
            "ping",
            "-n",
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            "0.05",
            "-W",
            "2",
            "-w",
            &deadline,
            &dst.to_string(),
        ],
    )
    .output()
    .context("spawning ping")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or("(no summary)")
        .to_owned();
    let received = parse_ping_received(&summary);
    ensure!(
        received == Some(count),
        "[{ns}] ping {dst}: expected {count}/{count} replies, got: {summary} {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// "5 packets transmitted, 5 received, 0% packet loss, time 804ms" -> Some(5).
fn parse_ping_received(summary: &str) -> Option<u32> {
    summary
        .split(',')
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// ping's closing summary in `out` ("2400 packets transmitted, 2400
/// received, ...") as (transmitted, received).
pub fn ping_summary(out: &str) -> Result<(u64, u64)> {
    let line = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .with_context(|| format!("no ping summary:\n{out}"))?;
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(2)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("ping summary {line:?}"))?;
    match nums[..] {
        [sent, received] => Ok((sent, received)),
        _ => bail!("ping summary {line:?}"),
    }
}

/// A deterministic pseudo-random byte stream (xorshift64*), so the payload is
/// not compressible or trivially repetitive and both ends can be checked.
pub struct PayloadStream {
    state: u64,
}

impl PayloadStream {
    pub fn new(seed: u64) -> PayloadStream {
        PayloadStream { state: seed | 1 }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let v = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// What a TCP transfer delivered.
#[derive(Clone, Debug)]
pub struct TcpReport {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub sent_sha256: String,
    pub received_sha256: String,
    pub elapsed: Duration,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How long one socket operation may stall before the transfer is declared broken.
const STALL: Duration = Duration::from_secs(20);

/// Sends `bytes` pseudo-random bytes over TCP from namespace `src_ns` to
/// `dst:port`, listening in `dst_ns`; both ends hash what they handle. Fails
/// unless the receiver got exactly `bytes` bytes with the sender's SHA-256.
pub fn tcp_transfer(
    src_ns: &str,
    dst_ns: &str,
    dst: impl Into<IpAddr>,
    port: u16,
    bytes: u64,
) -> Result<TcpReport> {
    let at = SocketAddr::new(dst.into(), port);
    tcp_transfer_via(src_ns, dst_ns, at, at, bytes)
}

/// [`tcp_transfer`] to a receiver listening on `listen` in `dst_ns`, with
/// the sender connecting to `connect` (e.g. a service address that the
/// host's NAT maps to `listen`).
pub fn tcp_transfer_via(
    src_ns: &str,
    dst_ns: &str,
    listen: impl Into<SocketAddr>,
    connect: impl Into<SocketAddr>,
    bytes: u64,
) -> Result<TcpReport> {
    let (listen, connect): (SocketAddr, SocketAddr) = (listen.into(), connect.into());
    let (dst, port) = (listen.ip(), listen.port());
    let started = Instant::now();
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let receiver = netns::spawn_in(dst_ns, move || {
        let listener =
            TcpListener::bind(listen).with_context(|| format!("binding {dst}:{port}"))?;
        listener.set_nonblocking(true)?;
        let _ = ready_tx.send(());
        let deadline = Instant::now() + STALL;
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        bail!("no TCP connection to {dst}:{port} within {STALL:?}");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e).context("accept"),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(STALL))?;
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = stream
                .read(&mut buf)
                .with_context(|| format!("receiving after {total} bytes"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n as u64;
        }
        Ok((total, hex(&hasher.finalize())))
    })?;
    if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
        // The receiver failed before listening: report its error.
        netns::join(receiver)?;
        bail!("TCP receiver never became ready");
    }
    let sender = netns::spawn_in(src_ns, move || {
        let target = connect;
        let mut stream = TcpStream::connect_timeout(&target, STALL)
            .with_context(|| format!("connecting to {target}"))?;
        stream.set_write_timeout(Some(STALL))?;
        let mut payload = PayloadStream::new(0x5eed_0000 ^ bytes);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            payload.fill(&mut buf[..n]);
            stream
                .write_all(&buf[..n])
                .with_context(|| format!("sending after {} bytes", bytes - left))?;
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        stream.shutdown(std::net::Shutdown::Write)?;
        Ok(hex(&hasher.finalize()))
    })?;
    let sent = netns::join(sender);
    let received = netns::join(receiver);
    let sent_sha256 = sent.context("TCP sender")?;
    let (bytes_received, received_sha256) = received.context("TCP receiver")?;
    let report = TcpReport {
        bytes_sent: bytes,
        bytes_received,
        sent_sha256,
        received_sha256,
        elapsed: started.elapsed(),
    };
    ensure!(
        report.bytes_received == report.bytes_sent && report.received_sha256 == report.sent_sha256,
        "TCP {src_ns} -> {dst}:{port}: sent {} bytes sha256 {}, received {} bytes sha256 {}",
        report.bytes_sent,
        report.sent_sha256,
        report.bytes_received,
        report.received_sha256
    );
    Ok(report)
}

/// A paced burst of sequence-numbered UDP datagrams.
#[derive(Clone, Copy, Debug)]
pub struct UdpBurst {
    pub count: u32,
    /// Datagrams per second (kept modest: the point is correctness, not rate).
    pub rate: u32,
    /// Payload sizes cycle from 16 up to this (at most 1450 - 28 for the overlay MTU).
    pub max_size: usize,
}

impl Default for UdpBurst {
    fn default() -> Self {
        UdpBurst {
            count: 2000,
            rate: 5000,
            max_size: 1400,
        }
    }
}

/// What a UDP burst delivered.
#[derive(Clone, Debug)]
pub struct UdpReport {
    pub sent: u32,
    pub received: u32,
    pub duplicates: u32,
    pub corrupt: u32,
    pub missing: Vec<u32>,
}

/// The sequence number warm-up datagrams carry; never part of a burst.
const WARMUP_SEQ: u32 = u32::MAX;

fn datagram_size(seq: u32, max_size: usize) -> usize {
    16 + (seq as usize * 37) % (max_size - 15)
}

/// Datagram layout: seq (u32 BE), length (u32 BE), then pseudo-random bytes
/// seeded by the sequence number.
fn datagram(seq: u32, size: usize) -> Vec<u8> {
    let mut d = vec![0u8; size];
    d[..4].copy_from_slice(&seq.to_be_bytes());
    d[4..8].copy_from_slice(&(size as u32).to_be_bytes());
    PayloadStream::new(u64::from(seq) << 16 | 0xab).fill(&mut d[8..]);
    d
}

fn check_datagram(d: &[u8]) -> Option<u32> {
    if d.len() < 8 {
        return None;
    }
    let seq = u32::from_be_bytes(d[..4].try_into().ok()?);
    let len = u32::from_be_bytes(d[4..8].try_into().ok()?) as usize;
    (len == d.len() && datagram(seq, len) == d).then_some(seq)
}

/// Raises a socket's receive buffer past `rmem_max` (root only), so a receiver
/// thread that the busy 2-core machine deschedules for a while loses nothing.
fn force_rcvbuf(sock: &UdpSocket, bytes: i32) -> Result<()> {
    // SAFETY: setsockopt on an open socket with a properly sized int.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const bytes).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    ensure!(
        rc == 0,
        "SO_RCVBUFFORCE: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Sends `burst` from namespace `src_ns` to `dst:port`, received in `dst_ns`.
/// A warm-up datagram is repeated until the receiver has seen one (so ARP and
/// neighbour resolution are done), then the burst is paced at `burst.rate`.
/// Fails unless every datagram arrived exactly once, byte for byte.
pub fn udp_burst(
    src_ns: &str,
    dst_ns: &str,
    dst: Ipv4Addr,
    port: u16,
    burst: UdpBurst,
) -> Result<UdpReport> {
    ensure!(
        (16..=1422).contains(&burst.max_size),
        "max_size must fit the 1450 overlay MTU"
    );
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let (warm_tx, warm_rx) = mpsc::channel::<()>();
    let count = burst.count;
    let receiver = netns::spawn_in(dst_ns, move || {
        let sock = UdpSocket::bind(SocketAddrV4::new(dst, port))
            .with_context(|| format!("binding {dst}:{port}"))?;
        force_rcvbuf(&sock, 8 << 20)?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let _ = ready_tx.send(());
        let mut buf = vec![0u8; 65536];
        let mut seen = BTreeSet::new();
        let (mut duplicates, mut corrupt) = (0u32, 0u32);
        let mut warmed = false;
        let start = Instant::now();
        let mut last = Instant::now();
        // Stop when all arrived, or 3 s after the last datagram once the burst
        // has begun, or 15 s overall.
        while (seen.len() as u32) < count
            && start.elapsed() < Duration::from_secs(15)
            && !(warmed && last.elapsed() > Duration::from_secs(3))
        {
            let n = match sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue;
                }
                Err(e) => return Err(e).context("recv"),
            };
            last = Instant::now();
            match check_datagram(&buf[..n]) {
                Some(WARMUP_SEQ) => {
                    if !warmed {
                        warmed = true;
                        let _ = warm_tx.send(());
                    }
                }
                Some(seq) if seq < count => {
                    if !seen.insert(seq) {
                        duplicates += 1;
                    }
                }
                _ => corrupt += 1,
            }
        }
        Ok((seen, duplicates, corrupt))
    })?;
    if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
        netns::join(receiver)?;
        bail!("UDP receiver never became ready");
    }
    let sender = netns::spawn_in(src_ns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.connect(SocketAddrV4::new(dst, port))?;
        let warm = datagram(WARMUP_SEQ, 64);
        let mut warmed = false;
        for _ in 0..50 {
            sock.send(&warm)?;
            if warm_rx.recv_timeout(Duration::from_millis(100)).is_ok() {
                warmed = true;
                break;
            }
        }
        ensure!(warmed, "no warm-up datagram reached {dst}:{port} in 5 s");
        let gap = Duration::from_secs(1) / burst.rate.max(1);
        let start = Instant::now();
        for seq in 0..count {
            // Pace against the schedule, not per packet, so sleeps that overshoot
            // on a busy machine do not slow the burst down cumulatively.
            let due = start + gap * seq;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let d = datagram(seq, datagram_size(seq, burst.max_size));
            match sock.send(&d) {
                Ok(_) => {}
                // A local ENOBUFS is the sender's own queue, not the datapath: retry.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    std::thread::sleep(Duration::from_millis(1));
                    sock.send(&d)?;
                }
                Err(e) => return Err(e).with_context(|| format!("sending datagram {seq}")),
            }
        }
        Ok(())
    })?;
    let sent = netns::join(sender);
    let received = netns::join(receiver);
    sent.context("UDP sender")?;
    let (seen, duplicates, corrupt) = received.context("UDP receiver")?;
    let missing: Vec<u32> = (0..count).filter(|s| !seen.contains(s)).collect();
    let report = UdpReport {
        sent: count,
        received: seen.len() as u32,
        duplicates,
        corrupt,
        missing,
    };
    ensure!(
        report.missing.is_empty() && report.duplicates == 0 && report.corrupt == 0,
        "UDP {src_ns} -> {dst}:{port}: {} of {} received, {} duplicates, {} corrupt, missing (first 20) {:?}",
        report.received,
        report.sent,
        report.duplicates,
        report.corrupt,
        &report.missing[..report.missing.len().min(20)]
    );
    Ok(report)
}

/// A UDP socket in a namespace counting whatever arrives, until [`finish`](UdpListener::finish).
pub struct UdpListener {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<Vec<SocketAddr>>>>,
}

impl UdpListener {
    /// Binds `ip:port` in namespace `ns` and starts counting.
    pub fn start(ns: &str, ip: impl Into<IpAddr>, port: u16) -> Result<UdpListener> {
        let ip: IpAddr = ip.into();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready_rx) = mpsc::channel::<()>();
        let thread = netns::spawn_in(ns, move || {
            let sock = UdpSocket::bind(SocketAddr::new(ip, port))
                .with_context(|| format!("binding {ip}:{port}"))?;
            sock.set_read_timeout(Some(Duration::from_millis(50)))?;
            let _ = ready_tx.send(());
            let mut from = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                match sock.recv_from(&mut buf) {
                    Ok((_, addr)) => from.push(addr),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => return Err(e).context("recv_from"),
                }
            }
            Ok(from)
        })?;
        if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
            netns::join(thread)?;
            bail!("UDP listener on {ip}:{port} never became ready");
        }
        Ok(UdpListener {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops listening and returns the source of every datagram received.
    pub fn finish(mut self) -> Result<Vec<SocketAddr>> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        netns::join(self.thread.take().context("listener already finished")?)
    }
}

impl Drop for UdpListener {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `count` small datagrams from namespace `ns` to `dst:port`, one every
/// `gap`, from source address `src` when given (it must be assigned there).
pub fn udp_send(
    ns: &str,
    src: Option<Ipv4Addr>,
    dst: Ipv4Addr,
    port: u16,
    count: u32,
    gap: Duration,
) -> Result<()> {
    netns::run_in(ns, move || {
        let bind = SocketAddrV4::new(src.unwrap_or(Ipv4Addr::UNSPECIFIED), 0);
        let sock = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
        for seq in 0..count {
            sock.send_to(&datagram(seq, 64), SocketAddrV4::new(dst, port))
                .with_context(|| format!("sending datagram {seq} to {dst}:{port}"))?;
            std::thread::sleep(gap);
        }
        Ok(())
    })
}

/// `UDP_SEGMENT` from linux/udp.h (not exported by libc for glibc targets).
const UDP_SEGMENT: libc::c_int = 103;

/// UDP GSO sends: `sends` buffers of `segments` datagrams of `segment_size`
/// bytes each, numbered from `first_seq`.
#[derive(Clone, Copy, Debug)]
pub struct GsoSends {
    pub first_seq: u32,
    pub sends: u32,
    pub segments: u32,
    pub segment_size: u16,
}

/// Like [`udp_send`], but each send is one UDP GSO buffer (`UDP_SEGMENT`):
/// the kernel keeps it as a single aggregate as far as the devices allow, so
/// a receiver's ingress sees GSO super-packets.
pub fn udp_send_gso(
    ns: &str,
    src: Option<Ipv4Addr>,
    dst: Ipv4Addr,
    port: u16,
    gso: GsoSends,
) -> Result<()> {
    let GsoSends {
        first_seq,
        sends,
        segments,
        segment_size,
    } = gso;
    netns::run_in(ns, move || {
        let bind = SocketAddrV4::new(src.unwrap_or(Ipv4Addr::UNSPECIFIED), 0);
        let sock = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
        sock.connect(SocketAddrV4::new(dst, port))?;
        let size = libc::c_int::from(segment_size);
        // SAFETY: setsockopt on an open socket with a properly sized int.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_UDP,
                UDP_SEGMENT,
                (&raw const size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        ensure!(rc == 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
        let mut seq = first_seq;
        for _ in 0..sends {
            let mut buf = Vec::with_capacity(segments as usize * usize::from(segment_size));
            for _ in 0..segments {
                buf.extend_from_slice(&datagram(seq, usize::from(segment_size)));
                seq += 1;
            }
            let n = sock
                .send(&buf)
                .with_context(|| format!("sending a {} byte GSO buffer", buf.len()))?;
            ensure!(n == buf.len(), "short GSO send: {n} of {}", buf.len());
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_round_trip_and_detect_corruption() {
        for seq in [0, 1, 999, 1999] {
            let mut d = datagram(seq, datagram_size(seq, 1400));
            assert!(d.len() <= 1400);
            assert_eq!(check_datagram(&d), Some(seq));
            let last = d.len() - 1;
            d[last] ^= 1;
            assert_eq!(check_datagram(&d), None);
        }
        assert_eq!(check_datagram(&[1, 2, 3]), None);
    }

    #[test]
    fn ping_summary_parses() {
        assert_eq!(
            parse_ping_received("5 packets transmitted, 5 received, 0% packet loss, time 804ms"),
            Some(5)
        );
        assert_eq!(
            parse_ping_received("5 packets transmitted, 3 received, +2 errors, 40% packet loss"),
            Some(3)
        );
        assert_eq!(parse_ping_received("(no summary)"), None);
    }

    #[test]
    fn payload_stream_is_deterministic() {
        let (mut a, mut b) = (PayloadStream::new(7), PayloadStream::new(7));
        let (mut x, mut y) = ([0u8; 100], [0u8; 100]);
        a.fill(&mut x);
        b.fill(&mut y);
        assert_eq!(x, y);
        assert_ne!(x, [0u8; 100]);
    }
}
