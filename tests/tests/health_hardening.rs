//! The health server under abuse, against the real agent in a host
//! namespace: 500 idle TCP connections leave `/healthz` answering within
//! 1 s; a 1 MiB header gets a 431 or a closed connection and no memory
//! growth; idle connections are closed after the read timeout (5 s).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use overlay_tests::{
    agent::{Agent, Cluster, within},
    http::get,
    netns,
};

const CONFIG: &str = r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "Backend": {"Type": "vxlan"}}"#;
const PORT: u16 = 9873;

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

/// Whether the server closed `s` (EOF or reset) within `wait`.
fn closed(mut s: &TcpStream, wait: Duration) -> bool {
    let _ = s.set_read_timeout(Some(wait));
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
#[ignore = "needs root, network namespaces and etcd: run `cargo xtask test`"]
fn idle_floods_and_huge_headers_leave_healthz_answering() -> Result<()> {
    let cluster = Cluster::start("hh", 1, CONFIG)?;
    let ip = cluster.hosts.ip(1);
    let health = [
        "--datapath=kernel".to_owned(),
        format!("--healthz-ip={ip}"),
        format!("--healthz-port={PORT}"),
    ];
    let args = cluster.args(1, &health.iter().map(String::as_str).collect::<Vec<_>>());
    let Cluster { hosts, etcd, bin } = &cluster;
    let ns = hosts.ns(1);
    let mut agent = Agent::start(etcd.dir(), "h1", &ns, bin, &args)?;
    agent.wait_for("running: lease", Duration::from_secs(20))?;
    let pid = agent.child.id();
    let addr: SocketAddr = format!("{ip}:{PORT}").parse()?;
    ensure!(get(&ns, &ip, PORT, "/healthz")?.0 == 200);
    let rss_before = rss_kib(pid)?;

    // 500 idle connections (sockets stay in the namespace they were made in).
    let idle = netns::run_in(&ns, move || {
        (0..500)
            .map(|_| Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(2))?))
            .collect::<Result<Vec<_>>>()
    })?;
    let t0 = Instant::now();
    let (code, body) = get(&ns, &ip, PORT, "/healthz")?;
    let took = t0.elapsed();
    ensure!(
        code == 200 && body == "flanneld is running",
        "/healthz among 500 idle connections: {code} {body}"
    );
    ensure!(
        took < Duration::from_secs(1),
        "/healthz took {took:?} among 500 idle connections"
    );

    // A 1 MiB header: 431 or a closed connection, not a 1 MiB buffer.
    let answer = netns::run_in(&ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut req = b"GET /healthz HTTP/1.1\r\nX-Big: ".to_vec();
        req.resize(req.len() + (1 << 20), b'a');
        let wrote = s.write_all(&req).and_then(|()| s.write_all(b"\r\n\r\n"));
        let mut out = Vec::new();
        let read = s.read_to_end(&mut out);
        Ok(format!(
            "wrote {wrote:?}, read {read:?}: {}",
            String::from_utf8_lossy(&out)
        ))
    })?;
    ensure!(
        !answer.contains("flanneld is running")
            && (answer.contains("HTTP/1.1 431 ") || answer.contains("Err(")),
        "1 MiB header: {answer}"
    );
    let rss_after = rss_kib(pid)?;
    ensure!(
        rss_after < rss_before + 4096,
        "the agent grew from {rss_before} KiB to {rss_after} KiB"
    );

    // The idle ones: the oldest were evicted, the rest go after 5 s.
    std::thread::sleep(Duration::from_secs(6));
    let still_open = idle
        .iter()
        .filter(|s| !closed(s, Duration::from_millis(50)))
        .count();
    ensure!(
        still_open == 0,
        "{still_open} of 500 idle connections still open after 6 s"
    );
    within(Duration::from_secs(2), "/healthz after the flood", || {
        get(&ns, &ip, PORT, "/healthz").is_ok_and(|(c, _)| c == 200)
    })?;
    ensure!(agent.exited().is_none(), "the agent died:\n{}", agent.log());
    Ok(())
}
