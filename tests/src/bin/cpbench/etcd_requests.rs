//! How many gRPC requests etcd has served, from its `/metrics` on the client
//! URL (`grpc_server_started_total`: one per unary call, one per stream
//! opened; messages on an open watch stream are not requests).

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use anyhow::{Context, Result, ensure};

/// The total over every method; call from inside etcd's namespace.
pub fn started(client_url: &str) -> Result<f64> {
    let addr = client_url
        .strip_prefix("http://")
        .context("a plain http client URL")?;
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    ensure!(
        body.starts_with("HTTP/1.") && body.contains(" 200 "),
        "etcd /metrics: {}",
        body.lines().next().unwrap_or("")
    );
    let mut total = 0.0;
    for line in body
        .lines()
        .filter(|l| l.starts_with("grpc_server_started_total{"))
    {
        let v = line.rsplit_once(' ').context("a sample line")?.1;
        total += v
            .parse::<f64>()
            .with_context(|| format!("sample {line:?}"))?;
    }
    Ok(total)
}
