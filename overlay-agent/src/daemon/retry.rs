//! One retry policy for the daemon's etcd steps: jittered exponential
//! backoff while the failure is transient, a stop on a problem of
//! configuration (`etcd::failure`).

use std::{future::Future, time::Duration};

use anyhow::Result;

use crate::etcd::{EtcdError, backoff::Backoff, own::AcquireError};

/// Retry an etcd operation with backoff while it fails for a transient
/// reason; stop on a problem of configuration.
pub async fn retry_etcd<T, E, F, Fut>(what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Into<RetryClass>,
{
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) => match e.into() {
                RetryClass::Retry(msg) => {
                    let delay = backoff.next_delay();
                    log::warn!("{what}: {msg}; retrying in {delay:?}");
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

impl From<AcquireError> for RetryClass {
    fn from(e: AcquireError) -> Self {
        match e {
            AcquireError::Etcd(e) => e.into(),
            e => RetryClass::Fatal(e.into()),
        }
    }
}
