//! The Nodes as a stream of lease events: kube-runtime's watcher (a paged
//! LIST, then a WATCH from its resourceVersion with bookmarks, resumed
//! where it stopped; a watch that expired, 410 Gone, lists again) turned
//! into [`LeaseEvent`]s. Each list becomes one [`LeaseEvent::Reset`], so
//! the reconciler removes the nodes that left while we were not watching.
//! The watcher retries with a jittered exponential backoff; while it fails
//! the datapath keeps what it has and the loop is told (`failing`).

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::mpsc;

use super::{
    KubeManager,
    annotations::{self, Own},
    node_lease,
};
use crate::subnet::{LeaseEvent, Record};

/// Follows every Node until `tx` is closed.
pub async fn run(
    mgr: KubeManager,
    own: Own,
    tx: mpsc::Sender<Vec<LeaseEvent>>,
    failing: Arc<AtomicBool>,
) {
    let api: Api<Node> = Api::all(mgr.client());
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    let mut listing: Option<Vec<Record>> = None;
    let mut last_error: Option<String> = None;
    while let Some(item) = stream.next().await {
        let ev = match item {
            Ok(ev) => ev,
            Err(e) => {
                failing.store(true, Ordering::Relaxed);
                let msg = e.to_string();
                if last_error.as_deref() != Some(msg.as_str()) {
                    log::warn!(
                        "watching the Nodes: {msg}; retrying with backoff (the datapath keeps its peers)"
                    );
                    last_error = Some(msg);
                }
                continue;
            }
        };
        if failing.swap(false, Ordering::Relaxed) {
            log::info!("the Node watch works again");
            last_error = None;
        }
        let batch = match ev {
            watcher::Event::Init => {
                listing = Some(Vec::new());
                continue;
            }
            watcher::Event::InitApply(node) => {
                republish_if_changed(&mgr, &own, &node);
                listing
                    .get_or_insert_with(Vec::new)
                    .push(node_lease::record(&node, &mgr.names, own.ipv6.is_some()));
                continue;
            }
            watcher::Event::InitDone => LeaseEvent::Reset(listing.take().unwrap_or_default()),
            watcher::Event::Apply(node) => {
                republish_if_changed(&mgr, &own, &node);
                LeaseEvent::Put(node_lease::record(&node, &mgr.names, own.ipv6.is_some()))
            }
            watcher::Event::Delete(node) => LeaseEvent::Delete {
                key: node_lease::key(node.metadata.name.as_deref().unwrap_or_default()),
            },
        };
        if tx.send(vec![batch]).await.is_err() {
            return;
        }
    }
}

/// Our own Node, changed by someone else so that it no longer says what we
/// publish (an annotation removed or edited): written back, in a task of
/// its own so that the watch goes on. Nothing is written while it says
/// what we published, so our own patches cause no second write.
fn republish_if_changed(mgr: &KubeManager, own: &Own, node: &Node) {
    if node.metadata.name.as_deref() != Some(mgr.node_name.as_str()) {
        return;
    }
    let empty = Default::default();
    let current = node.metadata.annotations.as_ref().unwrap_or(&empty);
    let changes = annotations::changes(current, &mgr.names, own);
    if changes.is_empty() {
        return;
    }
    let keys: Vec<&str> = changes.iter().map(|(k, _)| k.as_str()).collect();
    log::warn!(
        "node {}: annotations {} no longer say what this node publishes: writing them again",
        mgr.node_name,
        keys.join(", ")
    );
    let mgr = mgr.clone();
    tokio::spawn(async move {
        if let Err(e) = mgr.annotate(&changes).await {
            log::warn!("{e}");
        }
    });
}
