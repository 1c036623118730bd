//! The measuring tools, run inside the container namespaces: iperf3 for TCP
//! throughput and 64-byte UDP packet rate (its JSON, receiver side), sockperf
//! ping-pong for request/response round trips.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use overlay_tests::cmd::{self, Background};

pub const IPERF_PORT: u16 = 5201;
pub const SOCKPERF_PORT: u16 = 11111;
/// The UDP payload size of the packet-rate test.
pub const UDP_PAYLOAD: u32 = 64;

/// The servers of one lab, running in the receiving container until dropped.
pub struct Servers {
    _iperf: Background,
    _sockperf: Background,
}

impl Servers {
    pub fn start(ns: &str, ip: Ipv4Addr) -> Result<Servers> {
        let iperf = Background::spawn(
            Some(ns),
            &["iperf3", "--server", "--port", &IPERF_PORT.to_string()],
        )?;
        let sockperf = Background::spawn(
            Some(ns),
            &[
                "sockperf",
                "server",
                "-i",
                &ip.to_string(),
                "-p",
                &SOCKPERF_PORT.to_string(),
            ],
        )?;
        wait_listening(ns, "-lnt", IPERF_PORT)?;
        wait_listening(ns, "-lnu", SOCKPERF_PORT)?;
        Ok(Servers {
            _iperf: iperf,
            _sockperf: sockperf,
        })
    }
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
pub fn tcp_gbps(client_ns: &str, server: Ipv4Addr, streams: u32, secs: u32) -> Result<f64> {
    let json = iperf_client(
        client_ns,
        server,
        &["-P", &streams.to_string(), "-t", &secs.to_string()],
    )?;
    parse_tcp_gbps(&json)
}

/// 64-byte UDP datagrams per second that reached the receiving socket, with
/// the sender unthrottled (`-b 0`): what the datapath delivers under overload.
/// Returns (received, sent) per second.
pub fn udp_pps(client_ns: &str, server: Ipv4Addr, secs: u32) -> Result<(f64, f64)> {
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
    )?;
    Ok((parse_udp_pps(&json)?, parse_udp_sent_pps(&json)?))
}

fn iperf_client(ns: &str, server: Ipv4Addr, extra: &[&str]) -> Result<serde_json::Value> {
    let server = server.to_string();
    let port = IPERF_PORT.to_string();
    let mut args = vec!["iperf3", "-c", &server, "-p", &port, "-J"];
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

/// Round-trip times of 64-byte UDP request/response (sockperf ping-pong), in µs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rtt {
    pub p50_us: f64,
    pub p99_us: f64,
}

pub fn rtt(client_ns: &str, server: Ipv4Addr, secs: u32) -> Result<Rtt> {
    let out = cmd::run_in(
        client_ns,
        &[
            "sockperf",
            "ping-pong",
            "-i",
            &server.to_string(),
            "-p",
            &SOCKPERF_PORT.to_string(),
            "-m",
            "64",
            "-t",
            &secs.to_string(),
            "--full-rtt",
        ],
    )?;
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
