//! The measuring tools, run inside the container (or host) namespaces: iperf3
//! for TCP throughput and 64-byte UDP packet rate (its JSON, receiver side) and
//! for the paced loads whose CPU cost is measured (system-wide, /proc/stat),
//! sockperf ping-pong for single-flow round trips, and an in-process TCP
//! request/response generator with many concurrent flows.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use overlay_tests::cmd::{self, Background};
use overlay_tests::netns;

use crate::modes::Endpoints;
use crate::pin::{Pinning, pin_thread};

pub const IPERF_PORT: u16 = 5201;
pub const SOCKPERF_PORT: u16 = 11111;
/// The request/response server's port (started per measurement, in process).
pub const RR_PORT: u16 = 12866;
/// Request and response size of the request/response figure.
pub const RR_MESSAGE: usize = 64;
/// The UDP payload size of the packet-rate test.
pub const UDP_PAYLOAD: u32 = 64;

/// The servers of one lab, running in the receiving container until dropped.
pub struct Servers {
    _iperf: Background,
    /// None for IPv6: sockperf 3.7 takes no IPv6 address ("Invalid address").
    _sockperf: Option<Background>,
}

/// Whether the RTT figure (sockperf) can be measured toward `ip`.
pub fn rtt_supported(ip: IpAddr) -> bool {
    ip.is_ipv4()
}

impl Servers {
    /// Started on the server's CPU of `pin`.
    pub fn start(ns: &str, ip: IpAddr, pin: Pinning) -> Result<Servers> {
        let taskset = Pinning::prefix(pin.server);
        let pinned = |args: &[&str]| -> Vec<String> {
            taskset
                .iter()
                .cloned()
                .chain(args.iter().map(|a| (*a).to_owned()))
                .collect()
        };
        // The server's reports go nowhere: nobody reads its stdout pipe, which
        // would fill up over a long run (five iperf3 tests per mode and round)
        // and block the server.
        let addr = ip;
        let (iperf_port, sockperf_port, ip) = (
            IPERF_PORT.to_string(),
            SOCKPERF_PORT.to_string(),
            ip.to_string(),
        );
        let iperf = pinned(&[
            "iperf3",
            "--server",
            "--port",
            &iperf_port,
            "--logfile",
            "/dev/null",
        ]);
        let iperf = Background::spawn(Some(ns), &strs(&iperf))?;
        wait_listening(ns, "-lnt", IPERF_PORT)?;
        let sockperf = if rtt_supported(addr) {
            let sockperf = pinned(&["sockperf", "server", "-i", &ip, "-p", &sockperf_port]);
            let sockperf = Background::spawn(Some(ns), &strs(&sockperf))?;
            wait_listening(ns, "-lnu", SOCKPERF_PORT)?;
            Some(sockperf)
        } else {
            None
        };
        Ok(Servers {
            _iperf: iperf,
            _sockperf: sockperf,
        })
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Polls `ss` in `ns` until something listens on `port`.
fn wait_listening(ns: &str, kind: &str, port: u16) -> Result<()> {
    let filter = format!("sport = :{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = cmd::run_in(ns, &["ss", "-H", kind, &filter])?;
        if !out.trim().is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("[{ns}] nothing listens on port {port} ({kind}) after 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// TCP goodput in Gbit/s seen by the receiver, with `streams` parallel streams.
pub fn tcp_gbps(
    client_ns: &str,
    server: IpAddr,
    streams: u32,
    secs: u32,
    pin: Pinning,
) -> Result<f64> {
    let json = iperf_client(
        client_ns,
        server,
        &["-P", &streams.to_string(), "-t", &secs.to_string()],
        pin,
    )?;
    parse_tcp_gbps(&json)
}

/// 64-byte UDP datagrams per second that reached the receiving socket, with
/// the sender unthrottled (`-b 0`): what the datapath delivers under overload.
/// Returns (received, sent) per second.
pub fn udp_pps(client_ns: &str, server: IpAddr, secs: u32, pin: Pinning) -> Result<(f64, f64)> {
    let json = iperf_client(
        client_ns,
        server,
        &[
            "-u",
            "-l",
            &UDP_PAYLOAD.to_string(),
            "-b",
            "0",
            "-t",
            &secs.to_string(),
        ],
        pin,
    )?;
    Ok((parse_udp_pps(&json)?, parse_udp_sent_pps(&json)?))
}

fn iperf_client(
    ns: &str,
    server: IpAddr,
    extra: &[&str],
    pin: Pinning,
) -> Result<serde_json::Value> {
    let server = server.to_string();
    let port = IPERF_PORT.to_string();
    let taskset = Pinning::prefix(pin.client);
    let mut args = strs(&taskset);
    args.extend(["iperf3", "-c", &server, "-p", &port, "-J"]);
    args.extend_from_slice(extra);
    // iperf3 -J prints its error inside the JSON and exits 1; read it either way.
    let out = cmd::command(Some(ns), &args)
        .output()
        .context("spawning iperf3")?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 {}: no JSON; stderr: {}",
            extra.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    if let Some(err) = json.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3 {}: {err}", extra.join(" "));
    }
    ensure!(
        out.status.success(),
        "iperf3 {} exited {}",
        extra.join(" "),
        out.status
    );
    Ok(json)
}

pub fn parse_tcp_gbps(json: &serde_json::Value) -> Result<f64> {
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON has no end.sum_received.bits_per_second")?;
    Ok(bps / 1e9)
}

pub fn parse_udp_sent_pps(json: &serde_json::Value) -> Result<f64> {
    let s = &json["end"]["sum_sent"];
    let packets = s["packets"].as_f64().context("no end.sum_sent.packets")?;
    let secs = s["seconds"].as_f64().context("no end.sum_sent.seconds")?;
    ensure!(secs > 0.0, "iperf3 sent for {secs} s");
    Ok(packets / secs)
}

pub fn parse_udp_pps(json: &serde_json::Value) -> Result<f64> {
    let r = &json["end"]["sum_received"];
    let packets = r["packets"]
        .as_f64()
        .context("no end.sum_received.packets")?;
    let lost = r["lost_packets"]
        .as_f64()
        .context("no end.sum_received.lost_packets")?;
    let secs = r["seconds"]
        .as_f64()
        .context("no end.sum_received.seconds")?;
    ensure!(secs > 0.0, "iperf3 measured for {secs} s");
    Ok((packets - lost).max(0.0) / secs)
}

/// Runs `cmd` to completion, but kills it (it is `ip netns exec`, which execs
/// the tool, so the pid is the tool's) if it is still running after `limit`.
fn output_within(mut cmd: std::process::Command, limit: Duration) -> Result<std::process::Output> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning")?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => Ok(out?),
        Err(_) => {
            // SAFETY: kill(2) on our own child, which has not been reaped yet
            // (its waiting thread has not returned).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            let _ = rx.recv_timeout(Duration::from_secs(5));
            bail!("still running after {} s, killed", limit.as_secs())
        }
    }
}

/// Time the CPUs were *not* busy, from /proc/stat: idle + iowait + steal of
/// the aggregate `cpu` line, in USER_HZ ticks, and how many CPUs it lists.
/// Busy time is derived from it and the wall clock (see [`busy_secs`]): with
/// NOHZ the idle time is accounted exactly at each idle entry and exit, while
/// the busy fields (user, system, softirq, ...) are sampled at the timer tick
/// and would be too coarse for a light load over a few seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuIdle {
    pub idle: u64,
    pub cpus: u32,
}

pub fn parse_proc_stat(text: &str) -> Result<CpuIdle> {
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no aggregate cpu line")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {line:?}"))?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    ensure!(v.len() >= 8, "short cpu line {line:?}");
    let cpus = text
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count() as u32;
    ensure!(cpus > 0, "/proc/stat lists no cpuN lines");
    Ok(CpuIdle {
        idle: v[3] + v[4] + v[7],
        cpus,
    })
}

pub fn cpu_idle() -> Result<CpuIdle> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?)
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// CPU seconds all CPUs were busy between samples `a` and `b`, `wall` s apart.
pub fn busy_secs(a: &CpuIdle, b: &CpuIdle, wall: f64, hz: f64) -> f64 {
    let idle = b.idle.saturating_sub(a.idle) as f64 / hz;
    (f64::from(b.cpus) * wall - idle).max(0.0)
}

/// The fraction of all CPUs busy over `secs` with no load offered: the rest of
/// the machine, subtracted from the CPU figures measured right after it.
pub fn background_busy(secs: u32) -> Result<f64> {
    let (a, t0) = (cpu_idle()?, Instant::now());
    std::thread::sleep(Duration::from_secs(u64::from(secs)));
    let (b, t1) = (cpu_idle()?, Instant::now());
    let wall = (t1 - t0).as_secs_f64();
    Ok(busy_secs(&a, &b, wall, ticks_per_sec()) / (f64::from(b.cpus) * wall))
}

/// Received packets and bytes of `dev` in namespace `ns`, from
/// /proc/thread-self/net/dev of a thread in that namespace (cheap: no process
/// is started, so sampling it costs next to no CPU in the measured window).
pub fn rx_counters(ns: &str, dev: &str) -> Result<(u64, u64)> {
    let dev = dev.to_owned();
    netns::run_in(ns, move || {
        let text = std::fs::read_to_string("/proc/thread-self/net/dev")
            .context("reading /proc/thread-self/net/dev")?;
        parse_net_dev(&text, &dev)
    })
}

/// `(rx_packets, rx_bytes)` of `dev` in /proc/net/dev's format.
pub fn parse_net_dev(text: &str, dev: &str) -> Result<(u64, u64)> {
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() != dev {
            continue;
        }
        let v: Vec<u64> = rest
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("parsing {line:?}"))?;
        ensure!(v.len() >= 2, "short line {line:?}");
        return Ok((v[1], v[0]));
    }
    bail!("no device {dev} in /proc/net/dev")
}

/// What a paced load cost: CPU time of all CPUs over the window, and what the
/// receiving interface counted in it.
#[derive(Clone, Copy, Debug)]
pub struct CpuLoad {
    pub window_secs: f64,
    /// CPU seconds of all CPUs in the window, less the background.
    pub cpu_secs: f64,
    /// All CPUs' busy time over the time they had (all cores, window),
    /// background included.
    pub busy_fraction: f64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

impl CpuLoad {
    pub fn rx_pps(&self) -> f64 {
        self.rx_packets as f64 / self.window_secs
    }

    pub fn rx_gbps(&self) -> f64 {
        self.rx_bytes as f64 * 8.0 / self.window_secs / 1e9
    }

    /// CPU seconds per million packets received (= CPU µs per packet).
    pub fn cpu_per_mpkt(&self) -> f64 {
        self.cpu_secs / (self.rx_packets.max(1) as f64 / 1e6)
    }

    /// CPU seconds per GB (10^9 bytes) received at the interface.
    pub fn cpu_per_gb(&self) -> f64 {
        self.cpu_secs / (self.rx_bytes.max(1) as f64 / 1e9)
    }
}

/// Seconds of load before the CPU window opens (connections, slow start,
/// neighbour entries, the tool's own start-up are all outside the window).
pub const WARMUP: Duration = Duration::from_secs(1);

/// Runs an iperf3 client with `extra` (its own pacing) for `secs` + 2 s and
/// measures system-wide CPU time and the receiver's interface counters over
/// the `secs` in the middle; `background` (a fraction of all CPUs, see
/// [`background_busy`]) is subtracted. Fails if iperf3 reports an error.
fn cpu_under_iperf(
    ends: &Endpoints,
    extra: &[String],
    secs: u32,
    background: f64,
    pin: Pinning,
) -> Result<CpuLoad> {
    let server = ends.server_ip.to_string();
    let port = IPERF_PORT.to_string();
    let t = (secs + 2).to_string();
    let taskset = Pinning::prefix(pin.client);
    let mut args = strs(&taskset);
    args.extend(["iperf3", "-c", &server, "-p", &port, "-J", "-t", &t]);
    args.extend(extra.iter().map(String::as_str));
    let what = args.join(" ");
    let cmd = cmd::command(Some(&ends.client_ns), &args);
    let (tx, rx) = mpsc::channel();
    let limit = Duration::from_secs(u64::from(secs) + 20);
    let runner = std::thread::spawn(move || {
        let _ = tx.send(output_within(cmd, limit));
    });
    let started = Instant::now();
    std::thread::sleep(WARMUP);
    // Counters first, CPU last at the start; the other way round at the end:
    // the sampling threads run outside the CPU window.
    let window = (|| -> Result<CpuLoad> {
        let (p0, b0) = rx_counters(&ends.server_ns, &ends.server_dev)?;
        let (c0, t0) = (cpu_idle()?, Instant::now());
        std::thread::sleep(Duration::from_secs(u64::from(secs)));
        let (c1, t1) = (cpu_idle()?, Instant::now());
        let (p1, b1) = rx_counters(&ends.server_ns, &ends.server_dev)?;
        let wall = (t1 - t0).as_secs_f64();
        let busy = busy_secs(&c0, &c1, wall, ticks_per_sec());
        let capacity = f64::from(c1.cpus) * wall;
        Ok(CpuLoad {
            window_secs: wall,
            cpu_secs: (busy - background * capacity).max(0.0),
            busy_fraction: busy / capacity,
            rx_packets: p1.saturating_sub(p0),
            rx_bytes: b1.saturating_sub(b0),
        })
    })();
    let out = rx
        .recv_timeout(limit + Duration::from_secs(10))
        .map_err(|_| anyhow::anyhow!("{what}: no result"))?
        .with_context(|| what.clone())?;
    let _ = runner.join();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "{what}: no JSON; stderr: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    if let Some(err) = json.get("error").and_then(|e| e.as_str()) {
        bail!("{what}: {err}");
    }
    ensure!(out.status.success(), "{what} exited {}", out.status);
    let load = window?;
    ensure!(
        started.elapsed() > WARMUP + Duration::from_secs(u64::from(secs)),
        "{what} ended before the window closed"
    );
    Ok(load)
}

/// 64-byte UDP at `pps` datagrams per second (`iperf3 -u -l 64 -b <bits>`,
/// the rate counts payload bits).
pub fn udp_cpu(
    ends: &Endpoints,
    pps: u32,
    secs: u32,
    background: f64,
    pin: Pinning,
) -> Result<CpuLoad> {
    let bits = u64::from(pps) * u64::from(UDP_PAYLOAD) * 8;
    cpu_under_iperf(
        ends,
        &[
            "-u".into(),
            "-l".into(),
            UDP_PAYLOAD.to_string(),
            "-b".into(),
            bits.to_string(),
        ],
        secs,
        background,
        pin,
    )
}

/// One TCP stream paced by iperf3 to `mbps` Mbit/s of goodput.
pub fn tcp_cpu(
    ends: &Endpoints,
    mbps: u32,
    secs: u32,
    background: f64,
    pin: Pinning,
) -> Result<CpuLoad> {
    cpu_under_iperf(
        ends,
        &["-b".into(), format!("{mbps}M")],
        secs,
        background,
        pin,
    )
}

/// Transactions per second of 64-byte TCP request/response over `flows`
/// concurrent connections, each with one request outstanding (closed loop:
/// a flow sends its next request when the response arrives). One client
/// thread and one server thread multiplex all flows with poll(2), so with
/// enough flows both are always busy and the rate is bound by the CPU cost of
/// a transaction (two small packets through the whole path plus the socket
/// calls), not by how quickly a sleeping thread is woken.
pub fn rr_tps(ends: &Endpoints, flows: usize, secs: u32, pin: Pinning) -> Result<f64> {
    ensure!(flows > 0, "no flows");
    let addr = SocketAddr::new(ends.server_ip, RR_PORT);
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    // The server gives up on its own after this, whatever the client does.
    let server_limit = Duration::from_secs(u64::from(secs) + 20);
    let server = netns::spawn_in(&ends.server_ns, move || {
        pin_thread(pin.server)?;
        let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        listener.set_nonblocking(true)?;
        let _ = ready_tx.send(());
        let deadline = Instant::now() + server_limit;
        let mut conns = Vec::with_capacity(flows);
        while conns.len() < flows {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false)?;
                    s.set_nodelay(true)?;
                    s.set_write_timeout(Some(Duration::from_secs(2)))?;
                    conns.push(s);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    ensure!(
                        Instant::now() < deadline,
                        "only {} of {flows} flows connected",
                        conns.len()
                    );
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(e).context("accept"),
            }
        }
        let mut open: Vec<(TcpStream, usize)> = conns.into_iter().map(|s| (s, 0)).collect();
        let response = [0x5au8; RR_MESSAGE];
        let mut buf = [0u8; 4096];
        while !open.is_empty() && Instant::now() < deadline {
            for i in poll_readable(open.iter().map(|(s, _)| s), 200)?
                .into_iter()
                .rev()
            {
                let (s, pending) = &mut open[i];
                let n = match s.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::ConnectionReset => 0,
                    Err(e) => return Err(e).context("server read"),
                };
                if n == 0 {
                    open.swap_remove(i);
                    continue;
                }
                *pending += n;
                while *pending >= RR_MESSAGE {
                    s.write_all(&response).context("server write")?;
                    *pending -= RR_MESSAGE;
                }
            }
        }
        Ok(())
    })?;
    if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
        netns::join(server)?;
        bail!("request/response server never became ready");
    }
    let client = netns::spawn_in(&ends.client_ns, move || {
        pin_thread(pin.client)?;
        let mut conns = Vec::with_capacity(flows);
        for _ in 0..flows {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .with_context(|| format!("connecting to {addr}"))?;
            s.set_nodelay(true)?;
            s.set_write_timeout(Some(Duration::from_secs(2)))?;
            conns.push((s, 0usize));
        }
        let request = [0xa5u8; RR_MESSAGE];
        for (s, _) in &mut conns {
            s.write_all(&request).context("client write")?;
        }
        let mut buf = [0u8; 4096];
        let mut done: u64 = 0;
        let start = Instant::now();
        let (open_at, close_at) = (
            start + WARMUP / 2,
            start + WARMUP / 2 + Duration::from_secs(u64::from(secs)),
        );
        let mut window_start: Option<(Instant, u64)> = None;
        let mut last_progress = Instant::now();
        loop {
            let now = Instant::now();
            if window_start.is_none() && now >= open_at {
                window_start = Some((now, done));
            }
            if now >= close_at {
                let (t0, d0) = window_start.context("the window never opened")?;
                return Ok((done - d0) as f64 / (now - t0).as_secs_f64());
            }
            let ready = poll_readable(conns.iter().map(|(s, _)| s), 100)?;
            if ready.is_empty() {
                ensure!(
                    last_progress.elapsed() < Duration::from_secs(2),
                    "no response for 2 s ({done} transactions done)"
                );
                continue;
            }
            last_progress = now;
            for i in ready {
                let (s, pending) = &mut conns[i];
                let n = s.read(&mut buf).context("client read")?;
                ensure!(n > 0, "the server closed a flow");
                *pending += n;
                while *pending >= RR_MESSAGE {
                    *pending -= RR_MESSAGE;
                    done += 1;
                    s.write_all(&request).context("client write")?;
                }
            }
        }
        // Dropping the streams closes them; the server then sees EOF on all.
    });
    let tps = match client {
        Ok(handle) => netns::join(handle),
        Err(e) => Err(e),
    };
    let served = netns::join(server);
    let tps = tps.context("request/response client")?;
    served.context("request/response server")?;
    Ok(tps)
}

/// Indices of the streams poll(2) finds readable (or closed) within `timeout_ms`.
fn poll_readable<'a>(
    streams: impl Iterator<Item = &'a TcpStream>,
    timeout_ms: i32,
) -> Result<Vec<usize>> {
    let mut fds: Vec<libc::pollfd> = streams
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: poll(2) on a properly sized array of pollfd for open sockets.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == ErrorKind::Interrupted {
            return Ok(Vec::new());
        }
        return Err(e).context("poll");
    }
    Ok(fds
        .iter()
        .enumerate()
        .filter(|(_, p)| p.revents != 0)
        .map(|(i, _)| i)
        .collect())
}

/// Round-trip times of 64-byte UDP request/response (sockperf ping-pong), in µs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rtt {
    pub p50_us: f64,
    pub p99_us: f64,
}

pub fn rtt(client_ns: &str, server: IpAddr, secs: u32, pin: Pinning) -> Result<Rtt> {
    let (server, port, secs) = (
        server.to_string(),
        SOCKPERF_PORT.to_string(),
        secs.to_string(),
    );
    let taskset = Pinning::prefix(pin.client);
    let mut args = strs(&taskset);
    args.extend([
        "sockperf",
        "ping-pong",
        "-i",
        &server,
        "-p",
        &port,
        "-m",
        "64",
        "-t",
        &secs,
        "--full-rtt",
    ]);
    let out = cmd::run_in(client_ns, &args)?;
    parse_sockperf(&out)
}

/// Reads `---> percentile 50.000 =   19.658` lines (sockperf colours some
/// lines with ANSI escapes, which are ignored).
pub fn parse_sockperf(out: &str) -> Result<Rtt> {
    let percentile = |p: &str| -> Result<f64> {
        let key = format!("percentile {p} =");
        let line = out
            .lines()
            .find(|l| l.contains(&key))
            .with_context(|| format!("sockperf printed no {key:?}: {out}"))?;
        let value = line.split('=').nth(1).unwrap_or("").trim();
        let value: String = value
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        value
            .parse()
            .with_context(|| format!("parsing sockperf line {line:?}"))
    };
    Ok(Rtt {
        p50_us: percentile("50.000")?,
        p99_us: percentile("99.000")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_iperf_receiver_side() {
        let tcp = serde_json::json!({"end": {"sum_received": {"bits_per_second": 12.5e9}}});
        assert_eq!(parse_tcp_gbps(&tcp).unwrap(), 12.5);
        let udp = serde_json::json!({"end": {
            "sum_received": {"seconds": 2.0, "packets": 280160, "lost_packets": 18040},
            "sum_sent": {"seconds": 1.0, "packets": 280160}}});
        assert_eq!(parse_udp_pps(&udp).unwrap(), 131060.0);
        assert_eq!(parse_udp_sent_pps(&udp).unwrap(), 280160.0);
        assert!(parse_tcp_gbps(&serde_json::json!({"end": {}})).is_err());
    }

    #[test]
    fn reads_proc_stat_and_net_dev() {
        let stat = "cpu  100 5 50 1000 20 3 7 9 0 0\ncpu0 50 2 25 500 10 1 3 4 0 0\n\
                    cpu1 50 3 25 500 10 2 4 5 0 0\nintr 1 2\n";
        let a = parse_proc_stat(stat).unwrap();
        assert_eq!(
            a,
            CpuIdle {
                idle: 1029,
                cpus: 2
            }
        );
        assert!(parse_proc_stat("intr 1 2 3\n").is_err());
        // 2 CPUs for 1.5 s, 1.0 s of it idle: 2.0 CPU s busy.
        let b = CpuIdle {
            idle: 1129,
            cpus: 2,
        };
        assert!((busy_secs(&a, &b, 1.5, 100.0) - 2.0).abs() < 1e-9);
        assert_eq!(busy_secs(&b, &b, 0.0, 100.0), 0.0);
        let dev = "Inter-|   Receive                                                |  Transmit\n \
                   face |bytes    packets errs drop fifo frame compressed multicast|bytes\n    \
                   lo:       0       0    0    0    0     0          0         0        0\n  \
                   eth0: 1234567    8901    0    0    0     0          0         0     4321\n";
        assert_eq!(parse_net_dev(dev, "eth0").unwrap(), (8901, 1234567));
        assert!(parse_net_dev(dev, "eth1").is_err());
        let load = CpuLoad {
            window_secs: 2.0,
            cpu_secs: 0.5,
            busy_fraction: 0.125,
            rx_packets: 100_000,
            rx_bytes: 250_000_000,
        };
        assert_eq!(load.rx_pps(), 50_000.0);
        assert_eq!(load.cpu_per_mpkt(), 5.0);
        assert_eq!(load.cpu_per_gb(), 2.0);
        assert_eq!(load.rx_gbps(), 1.0);
    }

    #[test]
    fn reads_sockperf_percentiles() {
        let out = "sockperf: \x1b[2;35m====> avg-rtt=25.369 (std-dev=31.078)\x1b[0m\n\
                   sockperf: ---> percentile 99.000 =   96.518\n\
                   sockperf: ---> percentile 90.000 =   24.889\n\
                   sockperf: ---> percentile 50.000 =   19.658\n";
        assert_eq!(
            parse_sockperf(out).unwrap(),
            Rtt {
                p50_us: 19.658,
                p99_us: 96.518
            }
        );
        assert!(parse_sockperf("sockperf: Test ended\n").is_err());
    }
}
