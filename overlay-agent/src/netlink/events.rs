//! Link, address and TC (qdisc and filter) changes in this network
//! namespace, for the fast path's pod veths: one notification per burst of
//! rtnetlink events. TC changes matter because a shaped veth keeps its pod
//! on the host's path (`datapath::fastpath`).

use std::io;

use futures::StreamExt;
use rtnetlink::{
    constants::{RTMGRP_IPV4_IFADDR, RTMGRP_LINK},
    sys::{AsyncSocket, SocketAddr},
};
use tokio::sync::mpsc;

/// Subscribes to link and IPv4 address events in the calling thread's
/// network namespace (inside a tokio runtime). The receiver holds at most one
/// pending notification: events that arrive while one is pending fold into
/// it, so a consumer re-reads the whole state once per burst.
pub fn link_changes() -> io::Result<mpsc::Receiver<()>> {
    let (mut connection, _, mut messages) = rtnetlink::new_connection()?;
    connection
        .socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR))?;
    tokio::spawn(connection);
    let (tx, rx) = mpsc::channel(1);
    follow_tc(tx.clone());
    tokio::spawn(async move {
        while messages.next().await.is_some() {
            match tx.try_send(()) {
                Ok(()) | Err(mpsc::error::TrySendError::Full(())) => {}
                Err(mpsc::error::TrySendError::Closed(())) => break,
            }
        }
    });
    Ok(rx)
}

/// Also notifies on qdisc and filter changes (a pod being shaped or no
/// longer). Read raw on a thread of its own: these messages are not decoded
/// (rtnetlink's decoder logs an error for filter kinds it cannot parse), we
/// only need to know that something changed. The thread ends at the first
/// change after the receiver is gone. Without it, shaping added to a running
/// pod is only seen at the next link event; a warning says so.
fn follow_tc(tx: mpsc::Sender<()>) {
    let events = match super::tc::TcEvents::subscribe() {
        Ok(events) => events,
        Err(e) => {
            log::warn!(
                "cannot follow qdisc and filter changes ({e}): a pod shaped while it runs keeps the fast path until its next link change"
            );
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("tc-events".into())
        .spawn(move || {
            while events.wait().is_ok() {
                match tx.try_send(()) {
                    Ok(()) | Err(mpsc::error::TrySendError::Full(())) => {}
                    Err(mpsc::error::TrySendError::Closed(())) => break,
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot follow qdisc and filter changes ({e})");
    }
}
