//! One retry policy for the daemon's steps against the subnet manager (etcd
//! or the API server): jittered exponential backoff while the failure is
//! transient, logged once per distinct failure, and a stop on a problem of
//! configuration (`etcd::failure`, `KubeError::is_retryable`).

use std::{future::Future, time::Duration};

use anyhow::Result;

use crate::subnet::{
    backoff::Backoff,
    etcd::{EtcdError, own::AcquireError},
    kube::KubeError,
};

/// Retry an operation with backoff while it fails for a transient reason;
/// stop on a problem of configuration. A failure is logged when it first
/// happens (and when it changes), not on every retry.
pub async fn retry<T, E, F, Fut>(what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Into<RetryClass>,
{
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut last: Option<String> = None;
    loop {
        match f().await {
            Ok(v) => {
                if last.is_some() {
                    log::info!("{what}: succeeded");
                }
                return Ok(v);
            }
            Err(e) => match e.into() {
                RetryClass::Retry(msg) => {
                    let delay = backoff.next_delay();
                    if last.as_deref() == Some(msg.as_str()) {
                        log::debug!("{what}: {msg}; retrying in {delay:?}");
                    } else {
                        log::warn!("{what}: {msg}; retrying with backoff (up to 5s)");
                        last = Some(msg);
                    }
                    tokio::time::sleep(delay).await;
                }
                RetryClass::Fatal(e) => return Err(e.context(what.to_owned())),
            },
        }
    }
}

/// What a failed step deserves, decided by the error's type.
pub enum RetryClass {
    Retry(String),
    Fatal(anyhow::Error),
}

impl From<EtcdError> for RetryClass {
    fn from(e: EtcdError) -> Self {
        if e.is_transient() {
            RetryClass::Retry(e.to_string())
        } else {
            RetryClass::Fatal(e.into())
        }
    }
}

impl From<KubeError> for RetryClass {
    fn from(e: KubeError) -> Self {
        if e.is_retryable() {
            RetryClass::Retry(crate::subnet::etcd::error_chain(&e))
        } else {
            RetryClass::Fatal(e.into())
        }
    }
}

impl From<AcquireError> for RetryClass {
    fn from(e: AcquireError) -> Self {
        match e {
            AcquireError::Etcd(e) => e.into(),
            e => RetryClass::Fatal(e.into()),
        }
    }
}
