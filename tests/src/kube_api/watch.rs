//! WATCH responses: a newline-delimited stream of `{"type","object"}` that
//! replays the history after the client's resourceVersion, then follows the
//! store until `timeoutSeconds`, with BOOKMARKs when idle.
//!
//! The stream is the response body itself (no task of its own), so closing
//! the connection, or [`super::KubeApi::stop`], ends it.

use std::{collections::VecDeque, convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::stream;
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{
    Shared,
    http::{Selector, table},
    status::ApiError,
    store::Resource,
};

pub(super) struct WatchRequest {
    pub resource: Resource,
    pub ns: Option<String>,
    pub selector: Selector,
    /// `None` for no or `0` resourceVersion: start with the current state.
    pub from: Option<u64>,
    pub timeout: Duration,
    pub bookmarks: bool,
    /// Send each object as a one-row Table (kubectl's human output).
    pub as_table: bool,
}

struct State {
    shared: Arc<Shared>,
    req: WatchRequest,
    rx: tokio::sync::watch::Receiver<u64>,
    /// Everything up to this resourceVersion was sent.
    pos: u64,
    pending: VecDeque<Bytes>,
    deadline: Instant,
    next_bookmark: Instant,
    finished: bool,
}

pub(super) fn body(shared: Arc<Shared>, req: WatchRequest) -> BoxBody<Bytes, Infallible> {
    let mut rx = shared.rv_tx.subscribe();
    rx.borrow_and_update();
    let now = Instant::now();
    let mut st = State {
        deadline: now + req.timeout,
        next_bookmark: now + shared.bookmark_interval,
        shared,
        req,
        rx,
        pos: 0,
        pending: VecDeque::new(),
        finished: false,
    };
    match st.req.from {
        Some(rv) => st.pos = rv,
        None => {
            // Synthetic ADDED events for what exists now, then what follows.
            let (items, rv) = st
                .shared
                .with_store(|s| s.list(st.req.resource, st.req.ns.as_deref()));
            for obj in &items {
                if st.req.selector.matches(obj) {
                    st.push("ADDED", obj);
                }
            }
            st.pos = rv;
        }
    }
    let s = stream::unfold(st, |mut st| async move {
        loop {
            if let Some(b) = st.pending.pop_front() {
                return Some((Ok(Frame::data(b)), st));
            }
            if st.finished {
                return None;
            }
            st.rx.borrow_and_update();
            st.collect();
            if !st.pending.is_empty() {
                st.next_bookmark = Instant::now() + st.shared.bookmark_interval;
                continue;
            }
            tokio::select! {
                changed = st.rx.changed() => if changed.is_err() { return None },
                _ = tokio::time::sleep_until(st.deadline) => return None,
                _ = tokio::time::sleep_until(st.next_bookmark), if st.req.bookmarks => {
                    let bookmark = json!({
                        "kind": st.req.resource.kind(),
                        "apiVersion": "v1",
                        "metadata": {"resourceVersion": st.pos.to_string(), "creationTimestamp": null},
                    });
                    st.pending.push_back(line("BOOKMARK", &bookmark));
                    st.next_bookmark = Instant::now() + st.shared.bookmark_interval;
                }
            }
        }
    });
    StreamBody::new(s).boxed()
}

impl State {
    /// Queues the events after `pos`, or the 410 ERROR that ends the watch.
    fn collect(&mut self) {
        let got = self
            .shared
            .with_store(|s| s.events_since(self.req.resource, self.req.ns.as_deref(), self.pos));
        match got {
            Ok((events, now)) => {
                for e in events {
                    if self.req.selector.matches(&e.object) {
                        self.push(e.kind.as_str(), &e.object);
                    }
                }
                self.pos = now;
            }
            Err(oldest) => {
                let status = ApiError::expired(self.pos, oldest).status();
                self.pending.push_back(line("ERROR", &status));
                self.finished = true;
            }
        }
    }

    fn push(&mut self, kind: &str, obj: &Value) {
        let obj = if self.req.as_table {
            table(self.req.resource, std::slice::from_ref(obj), None)
        } else {
            obj.clone()
        };
        self.pending.push_back(line(kind, &obj));
    }
}

fn line(kind: &str, obj: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": kind, "object": obj})).expect("JSON");
    v.push(b'\n');
    Bytes::from(v)
}
