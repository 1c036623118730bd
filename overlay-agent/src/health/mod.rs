//! The health endpoints on `--healthz-ip:--healthz-port`: `/healthz` as
//! flanneld answers it (alive), `/readyz` (lease held and datapath
//! programmed) and `/metrics` (Prometheus text format). A small HTTP/1.1
//! responder: one request per connection, GET only.

pub mod metrics;
pub mod peers;
pub mod state;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

pub use state::{Health, HealthState, PeerTrafficMetric, Phase};

/// A client that has not sent its request headers by then is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Enough for a request line and the headers of any scraper or probe.
const MAX_REQUEST: usize = 8192;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Status line, content type and body for a request line.
pub fn respond(request: &str, health: &Health) -> (&'static str, &'static str, String) {
    let path = request
        .strip_prefix("GET ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("");
    let path = path.split('?').next().unwrap_or(path);
    const TEXT: &str = "text/plain; charset=utf-8";
    match path {
        "/healthz" => ("200 OK", TEXT, "flanneld is running".to_owned()),
        "/readyz" => match health.lock().not_ready_reason(unix_now()) {
            None => ("200 OK", TEXT, "ready".to_owned()),
            Some(why) => ("503 Service Unavailable", TEXT, format!("not ready: {why}")),
        },
        "/metrics" => {
            let state = health.lock().clone();
            // Read outside the lock: however many peers there are, the
            // main loop's refresh never waits for a scrape.
            let peers = state.peer_maps.as_ref().and_then(|m| {
                m.read()
                    .map_err(|e| {
                        log::warn!(
                            "/metrics: reading the peer maps: {}; leaving the per-peer series out",
                            crate::datapath::DatapathError::from(e).reason()
                        );
                    })
                    .ok()
            });
            (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                metrics::render(
                    &state,
                    peers.as_deref(),
                    env!("CARGO_PKG_VERSION"),
                    unix_now(),
                ),
            )
        }
        _ => ("404 Not Found", TEXT, "not found".to_owned()),
    }
}

/// Serves until the runtime stops.
pub async fn serve(listener: TcpListener, health: Health) {
    loop {
        let (s, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // E.g. out of file descriptors: retry without spinning.
                log::debug!("health: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let health = health.clone();
        tokio::spawn(async move {
            if tokio::time::timeout(REQUEST_TIMEOUT, answer(s, &health))
                .await
                .is_err()
            {
                log::debug!("health: dropped a client silent for {REQUEST_TIMEOUT:?}");
            }
        });
    }
}

/// Reads the request up to the end of its headers (a request may arrive in
/// several segments), answers it, closes.
async fn answer(mut s: TcpStream, health: &Health) {
    let mut req = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < MAX_REQUEST {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => req.extend_from_slice(&chunk[..n]),
        }
    }
    let (status, content_type, body) = respond(&String::from_utf8_lossy(&req), health);
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes()).await;
    let _ = s.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn routes_like_flanneld_plus_readiness_and_metrics() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let health = Health::new();
        tokio::spawn(serve(l, health.clone()));
        let ok = get(addr, "/healthz").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nflanneld is running"), "{ok}");
        let not_ready = get(addr, "/readyz").await;
        assert!(not_ready.starts_with("HTTP/1.1 503 "), "{not_ready}");
        assert!(
            not_ready.ends_with("not ready: waiting for the network config in etcd"),
            "{not_ready}"
        );
        health.set_phase(Phase::Running);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200 OK"));
        let m = get(addr, "/metrics").await;
        assert!(m.contains("Content-Type: text/plain; version=0.0.4"), "{m}");
        assert!(m.contains("\r\n\r\n# HELP overlay_build_info"), "{m}");
        assert!(m.contains("\noverlay_ready 1\n"), "{m}");
        assert!(get(addr, "/other").await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, "/metrics?x=1").await.contains("overlay_ready 1"));

        // A request split across segments is still read whole.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /hea").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        s.write_all(b"lthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");

        // Running, but the lease expired unrenewed: not ready any more.
        health.lock().lease_expiry_unix = Some(1);
        let r = get(addr, "/readyz").await;
        assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
        assert!(r.contains("not ready: our lease expired "), "{r}");
        assert!(get(addr, "/metrics").await.contains("\noverlay_ready 0\n"));
    }
}
