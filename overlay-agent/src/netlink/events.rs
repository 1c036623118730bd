//! Link and address changes in this network namespace, for the fast path's
//! pod veths: one notification per burst of rtnetlink events.

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
