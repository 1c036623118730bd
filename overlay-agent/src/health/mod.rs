//! The health endpoints on `--healthz-ip:--healthz-port`: `/healthz` as
//! flanneld answers it (alive), `/readyz` (lease held and datapath
//! programmed) and `/metrics` (Prometheus text format). A small HTTP/1.1
//! responder: one request per connection, GET only.
//!
//! On hostNetwork every pod of the node can reach it, so it is bounded: at
//! most [`MAX_CONNECTIONS`] at once, request headers up to [`MAX_REQUEST`]
//! bytes (431 beyond), [`READ_TIMEOUT`] to send them and [`WRITE_TIMEOUT`]
//! to take the answer. When the cap is reached a new connection evicts the
//! oldest one that has not sent its request yet: a probe sends its request
//! at once, so idle connections (a slowloris) cannot keep it out. The
//! per-peer metrics walk pinned maps, so `/metrics` is rendered on the
//! blocking pool and never holds up the agent's runtime.

pub mod metrics;
pub mod peers;
pub mod state;

use std::{
    collections::VecDeque,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::AbortHandle,
};

pub use state::{Health, HealthState, PeerTrafficMetric, Phase};

/// A client that has not sent its request headers by then is dropped.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A client that does not take the answer by then is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Enough for a request line and the headers of any scraper or probe.
pub const MAX_REQUEST: usize = 8192;
/// Connections served at once; more than probes and scrapers ever need,
/// few enough for the default 1024 file descriptors.
pub const MAX_CONNECTIONS: usize = 64;

const TEXT: &str = "text/plain; charset=utf-8";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The path of a GET request line, without its query.
fn path_of(request: &str) -> &str {
    let path = request
        .strip_prefix("GET ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("");
    path.split('?').next().unwrap_or(path)
}

/// Status line, content type and body for a request line. `/metrics` with
/// per-peer series reads pinned maps: call it off the async runtime.
pub fn respond(request: &str, health: &Health) -> (&'static str, &'static str, String) {
    match path_of(request) {
        "/healthz" => ("200 OK", TEXT, "flanneld is running".to_owned()),
        "/readyz" => match health.lock().not_ready_reason(unix_now()) {
            None => ("200 OK", TEXT, "ready".to_owned()),
            Some(why) => ("503 Service Unavailable", TEXT, format!("not ready: {why}")),
        },
        "/metrics" => {
            let mut state = health.lock().clone();
            // One `nft` run per scrape, off the runtime like the rest.
            state.vtep_guard = crate::datapath::vtep_guard::counters()
                .map_err(|e| log::debug!("/metrics: reading the nft drop counters: {e}"))
                .ok()
                .flatten();
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

/// The connections still waiting for their request, oldest first: the ones
/// a new connection may evict when the cap is reached.
#[derive(Clone, Default)]
struct Waiting(Arc<Mutex<VecDeque<(u64, AbortHandle)>>>);

impl Waiting {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, AbortHandle)>> {
        // Nothing can leave the queue half-changed: a panic elsewhere does
        // not make it unusable.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spawns `f` and queues it as waiting, under the queue's lock so that
    /// its own [`Waiting::remove`] comes after.
    fn spawn(&self, id: u64, f: impl Future<Output = ()> + Send + 'static) {
        let mut q = self.queue();
        let task = tokio::spawn(f);
        q.push_back((id, task.abort_handle()));
    }

    fn remove(&self, id: u64) {
        self.queue().retain(|(i, _)| *i != id);
    }

    /// Aborts the oldest still running; false when none waits.
    fn evict_oldest(&self) -> bool {
        let mut q = self.queue();
        while let Some((_, task)) = q.pop_front() {
            if !task.is_finished() {
                task.abort();
                return true;
            }
        }
        false
    }
}

/// The server's bounds; [`Limits::default`] is what the agent uses.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub max_request: usize,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            max_request: MAX_REQUEST,
            read_timeout: READ_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
        }
    }
}

/// Serves until the runtime stops.
pub async fn serve(listener: TcpListener, health: Health) {
    serve_with(listener, health, Limits::default()).await;
}

/// [`serve`] within other bounds.
pub async fn serve_with(listener: TcpListener, health: Health, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let waiting = Waiting::default();
    let mut next_id = 0u64;
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
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if waiting.evict_oldest() {
                    log::debug!(
                        "health: {} connections open; dropped the oldest idle one",
                        limits.max_connections
                    );
                }
                // An aborted task frees its slot when it is dropped; with
                // none idle, the busy ones end within their timeouts.
                match slots.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                }
            }
        };
        next_id += 1;
        let id = next_id;
        let health = health.clone();
        let w = waiting.clone();
        waiting.spawn(id, async move {
            let _permit = permit;
            answer(s, &health, &limits, || w.remove(id)).await;
            w.remove(id);
        });
    }
}

/// Why a request was not read.
enum Unread {
    TooLarge,
    Closed,
}

/// The request up to the end of its headers (it may arrive in several
/// segments), at most `max` bytes.
async fn read_request(s: &mut TcpStream, max: usize) -> Result<String, Unread> {
    let mut req = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if req.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(String::from_utf8_lossy(&req).into_owned());
        }
        if req.len() >= max {
            return Err(Unread::TooLarge);
        }
        let room = (max - req.len()).min(chunk.len());
        match s.read(&mut chunk[..room]).await {
            // A client that half-closes after its request line (no blank
            // line) is still answered.
            Ok(0) if !req.is_empty() => return Ok(String::from_utf8_lossy(&req).into_owned()),
            Ok(0) | Err(_) => return Err(Unread::Closed),
            Ok(n) => req.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads the request (within the read timeout), calls `read` (the
/// connection is no longer idle), answers it (within the write timeout),
/// closes.
async fn answer(mut s: TcpStream, health: &Health, limits: &Limits, read: impl FnOnce()) {
    let reading = read_request(&mut s, limits.max_request);
    let req = match tokio::time::timeout(limits.read_timeout, reading).await {
        Err(_) => {
            log::debug!(
                "health: dropped a client silent for {:?}",
                limits.read_timeout
            );
            return;
        }
        Ok(r) => r,
    };
    read();
    let (status, content_type, body) = match req {
        Err(Unread::Closed) => return,
        Err(Unread::TooLarge) => (
            "431 Request Header Fields Too Large",
            TEXT,
            format!("request headers over {} bytes", limits.max_request),
        ),
        Ok(req) if path_of(&req) == "/metrics" => {
            let health = health.clone();
            match tokio::task::spawn_blocking(move || respond(&req, &health)).await {
                Ok(r) => r,
                Err(e) => {
                    log::warn!("/metrics: rendering failed: {e}");
                    (
                        "500 Internal Server Error",
                        TEXT,
                        "internal error".to_owned(),
                    )
                }
            }
        }
        Ok(req) => respond(&req, health),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let write = async {
        s.write_all(resp.as_bytes()).await?;
        s.shutdown().await
    };
    if tokio::time::timeout(limits.write_timeout, write)
        .await
        .is_err()
    {
        log::debug!(
            "health: dropped a client that took no answer for {:?}",
            limits.write_timeout
        );
    }
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_beyond_the_cap_leave_healthz_answering() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l, Health::new()));
        let mut idle = Vec::new();
        for _ in 0..500 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let t0 = std::time::Instant::now();
        let ok = tokio::time::timeout(Duration::from_secs(1), get(addr, "/healthz"))
            .await
            .expect("/healthz within 1 s among 500 idle connections");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(t0.elapsed() < Duration::from_secs(1));
        // The server holds at most the cap: the oldest idle ones were closed.
        let mut closed = 0;
        for s in &mut idle[..100] {
            let mut b = [0u8; 1];
            if matches!(
                tokio::time::timeout(Duration::from_millis(20), s.read(&mut b)).await,
                Ok(Ok(0) | Err(_))
            ) {
                closed += 1;
            }
        }
        assert_eq!(closed, 100, "the oldest idle connections stay open");
    }

    #[tokio::test]
    async fn idle_clients_are_dropped_after_the_read_timeout() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let limits = Limits {
            read_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        tokio::spawn(serve_with(l, Health::new(), limits));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap(); // never ends
        let t0 = std::time::Instant::now();
        let mut out = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out))
            .await
            .expect("closed within the timeout");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?} {out:?}");
        assert!(t0.elapsed() >= Duration::from_millis(150));
    }

    #[tokio::test]
    async fn oversized_headers_get_431_or_a_closed_connection() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l, Health::new()));
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let writer = tokio::spawn(async move {
            let mut req = b"GET /healthz HTTP/1.1\r\nX-Big: ".to_vec();
            req.resize(req.len() + (1 << 20), b'a');
            // The server stops reading at 8 KiB: this fails with a reset.
            let _ = w.write_all(&req).await;
            let _ = w.write_all(b"\r\n\r\n").await;
        });
        let mut out = Vec::new();
        let got = tokio::time::timeout(Duration::from_secs(2), r.read_to_end(&mut out))
            .await
            .expect("answered or closed at once");
        let text = String::from_utf8_lossy(&out);
        assert!(
            got.is_err() || text.is_empty() || text.starts_with("HTTP/1.1 431 "),
            "{got:?} {text}"
        );
        assert!(!text.contains("flanneld is running"), "{text}");
        writer.await.unwrap();
        // Headers at the limit's edge are still fine.
        let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
        let pad = "a".repeat(MAX_REQUEST - 100);
        ok.write_all(format!("GET /healthz HTTP/1.1\r\nX-Pad: {pad}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        ok.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    }
}
