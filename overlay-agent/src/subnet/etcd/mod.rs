//! etcd as flanneld uses it: the network config at `<prefix>/config` and one
//! key per subnet lease under `<prefix>/subnets/`.
//!
//! [`Registry`] is a thin, typed wrapper around `etcd_client` (connection
//! with endpoints/TLS/auth, time-bounded requests, errors that name the key);
//! [`own`] acquires and renews this node's lease; [`watch`] follows everyone
//! else's. Every error says whether retrying can help ([`failure`]), and
//! every retry waits with [`backoff`].

use std::{
    fmt,
    future::Future,
    path::{Path, PathBuf},
    time::Duration,
};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    TlsOptions, Txn, TxnOp,
};
use ipnet::Ipv4Net;

use self::failure::Failure;
use crate::subnet::backoff::Backoff;
use crate::subnet::{Claim, Record};
use crate::{
    flannel::config::{ConfigError, NetworkConfig},
    flannel::lease::{self, LeaseSubnets},
};

pub mod failure;
pub mod own;
pub mod watch;

pub use etcd_client;

/// How to reach etcd: flanneld's `--etcd-*` flags.
#[derive(Clone, Default)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Bound on each unary request (and on connecting).
    pub request_timeout: Duration,
}

impl fmt::Debug for EtcdOptions {
    // Never print the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl EtcdOptions {
    /// The warning to log when the username and password would travel in
    /// clear: credentials given and an `http://` endpoint (or one without a
    /// scheme, which etcd-client dials as plain http).
    pub fn cleartext_credentials_warning(&self) -> Option<String> {
        let credentials = self.username.as_ref().is_some_and(|u| !u.is_empty())
            || self.password.as_ref().is_some_and(|p| !p.is_empty());
        let plain: Vec<&str> = self
            .endpoints
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.starts_with("https://"))
            .collect();
        (credentials && !plain.is_empty()).then(|| {
            format!(
                "--etcd-username/--etcd-password are sent in clear to {} (not https://): \
                 anyone on the path can read them",
                plain.join(", ")
            )
        })
    }

    pub fn new(endpoints: Vec<String>, prefix: impl Into<String>) -> EtcdOptions {
        EtcdOptions {
            endpoints,
            prefix: prefix.into(),
            request_timeout: Duration::from_secs(5),
            ..EtcdOptions::default()
        }
    }
}

/// The message of each says what happened in full (the `error` fields are
/// not `source()`, so that `{:#}` does not repeat them: `etcd_client`'s own
/// message prints tonic's whole chain with `Debug`).
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("cannot read {flag} {path}: {error}")]
    File {
        flag: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{flag} {path} holds no PEM {what}: {error}")]
    Pem {
        flag: &'static str,
        path: PathBuf,
        what: &'static str,
        error: rustls::pki_types::pem::Error,
    },
    #[error("{0}")]
    Options(String),
    #[error("etcd at {endpoints}: {}{hint}", failure::describe(.error))]
    Connect {
        endpoints: String,
        error: etcd_client::Error,
        /// Empty, or a likely cause the error itself does not name.
        hint: &'static str,
    },
    #[error("etcd {op} {key}: {}{hint}", failure::describe(.error))]
    Request {
        op: &'static str,
        key: String,
        error: etcd_client::Error,
        /// Empty, or a likely cause the error itself does not name.
        hint: &'static str,
    },
    #[error("etcd {op} {key}: no answer within {after:?}")]
    Timeout {
        op: &'static str,
        key: String,
        after: Duration,
    },
    /// Other writers changed the key every time we tried to write it.
    #[error("{key} kept changing while we wrote it")]
    Contention { key: String },
    #[error("{key}: {source}")]
    Config {
        key: String,
        #[source]
        source: ConfigError,
    },
}

impl EtcdError {
    /// Whether retrying can fix it: a missing file, bad flags, a malformed
    /// network config, and what [`failure::classify`] calls configuration
    /// (certificates, credentials, permissions) cannot.
    pub fn failure(&self) -> Failure {
        match self {
            EtcdError::File { .. }
            | EtcdError::Pem { .. }
            | EtcdError::Options(_)
            | EtcdError::Config { .. } => Failure::Config,
            EtcdError::Connect { error, .. } | EtcdError::Request { error, .. } => {
                failure::classify(error)
            }
            EtcdError::Timeout { .. } | EtcdError::Contention { .. } => Failure::Transient,
        }
    }

    pub fn is_transient(&self) -> bool {
        self.failure() == Failure::Transient
    }
}

/// An error with all its sources, so a TLS failure deep inside tonic is named.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = s.source();
    }
    out
}

/// What a TLS failure likely means, for the flags to look at.
fn tls_hint(e: &etcd_client::Error, tls_without_identity: bool) -> &'static str {
    use rustls::{CertificateError, Error as Tls};
    match failure::tls_error(e) {
        Some(Tls::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            " (the server's certificate does not verify with the CA of --etcd-cafile)"
        }
        Some(Tls::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => " (the server's certificate does not name the host of --etcd-endpoints)",
        Some(Tls::InvalidCertificate(_)) => " (the server's certificate does not verify)",
        _ if tls_without_identity && failure::connection_dropped(e) => {
            " (the server ended the TLS connection: does it require a client \
             certificate? see --etcd-certfile and --etcd-keyfile)"
        }
        _ => "",
    }
}

/// A key under `<prefix>/subnets/` as read from etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    /// 0 for a key without an etcd lease (a reservation).
    pub lease_id: i64,
    pub mod_revision: i64,
}

impl Entry {
    pub fn subnet(&self) -> Option<Ipv4Net> {
        self.subnets().map(|s| s.v4)
    }
    /// Both subnets of the key (the IPv6 one for a dual-stack lease).
    pub fn subnets(&self) -> Option<LeaseSubnets> {
        lease::parse_subnet_key(&self.key)
            .ok()
            .map(|(v4, v6)| LeaseSubnets { v4, v6 })
    }
    pub fn is_reservation(&self) -> bool {
        self.lease_id == 0
    }

    /// The lease as the reconciler sees it. The key is the subnet, so no
    /// two entries claim one subnet and the rank never matters.
    pub fn record(&self) -> Record {
        let claim = match lease::decode(&self.key, &self.value) {
            Ok(l) => Claim::Lease(l),
            Err(e) => Claim::Malformed(e),
        };
        Record {
            key: self.key.clone(),
            raw: self.value.clone(),
            claim,
            rank: 0,
        }
    }
}

impl Snapshot {
    pub fn records(&self) -> Vec<Record> {
        self.entries.iter().map(Entry::record).collect()
    }
}

/// All leases at one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub revision: i64,
    pub entries: Vec<Entry>,
}

/// A connected client bound to one prefix.
#[derive(Clone)]
pub struct Registry {
    client: Client,
    prefix: String,
    endpoints: String,
    timeout: Duration,
    /// TLS without a client certificate: a server that wants one just
    /// drops the connection, which deserves a hint.
    tls_without_identity: bool,
    /// A user was given: a refused request is worth one fresh login (etcd
    /// refuses tokens from before a change of its users or roles).
    has_credentials: bool,
}

impl Registry {
    /// Connect and check that etcd answers (so bad TLS material or a wrong
    /// password fails here, with the reason, instead of on first use).
    pub async fn connect(opts: &EtcdOptions) -> Result<Registry, EtcdError> {
        let endpoints = opts.endpoints.join(",");
        if opts.endpoints.is_empty() {
            return Err(EtcdError::Options("--etcd-endpoints is empty".into()));
        }
        let timeout = if opts.request_timeout.is_zero() {
            Duration::from_secs(5)
        } else {
            opts.request_timeout
        };
        let mut co = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true)
            // A watch on a member cut off from the quorum must fail over.
            .with_require_leader(true);
        match (&opts.username, &opts.password) {
            (Some(u), p) if !u.is_empty() => {
                // etcd's simple tokens expire (5 minutes idle by default);
                // a long-running agent must log in again rather than fail.
                co = co
                    .with_user(u.clone(), p.clone().unwrap_or_default())
                    .with_auto_token_refresh(true);
            }
            (_, Some(p)) if !p.is_empty() => {
                return Err(EtcdError::Options(
                    "--etcd-password is set but --etcd-username is not".into(),
                ));
            }
            _ => {}
        }
        let tls = tls_options(opts)?;
        let tls_without_identity = tls.is_some() && opts.cert_file.is_none();
        if let Some(tls) = tls {
            co = co.with_tls(tls);
        }
        let has_credentials = opts.username.as_ref().is_some_and(|u| !u.is_empty());
        let connect = Client::connect(opts.endpoints.clone(), Some(co));
        let client = match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(error)) => {
                return Err(EtcdError::Connect {
                    endpoints,
                    hint: tls_hint(&error, tls_without_identity),
                    error,
                });
            }
            Err(_) => {
                return Err(EtcdError::Timeout {
                    op: "connect to",
                    key: endpoints,
                    after: timeout,
                });
            }
        };
        let reg = Registry {
            client,
            prefix: opts.prefix.trim_end_matches('/').to_owned(),
            endpoints,
            timeout,
            tls_without_identity,
            has_credentials,
        };
        Ok(reg)
    }

    /// Ask any member for its status: a cheap request that proves the
    /// connection, TLS and credentials work.
    pub async fn probe(&self) -> Result<(), EtcdError> {
        let mut c = self.client.clone();
        match tokio::time::timeout(self.timeout, async move { c.status().await }).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(EtcdError::Connect {
                endpoints: self.endpoints.clone(),
                hint: tls_hint(&error, self.tls_without_identity),
                error,
            }),
            Err(_) => Err(EtcdError::Timeout {
                op: "status of",
                key: self.endpoints.clone(),
                after: self.timeout,
            }),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }
    /// The underlying client, for what this wrapper does not cover.
    pub fn client(&self) -> Client {
        self.client.clone()
    }
    pub fn config_key(&self) -> String {
        lease::config_key(&self.prefix)
    }
    pub fn lease_key(&self, subnets: impl Into<LeaseSubnets>) -> String {
        lease::lease_key(&self.prefix, subnets)
    }
    pub fn subnets_prefix(&self) -> String {
        lease::subnets_prefix(&self.prefix)
    }

    /// Run one request with the timeout, naming the op and key on failure.
    /// Two failures are answered here, within the timeout: a request that
    /// could not even be sent because the endpoint it was balanced to
    /// refuses connections (a dead cluster member) is sent again, so that it
    /// lands on a live member; and a request etcd refused for our
    /// credentials is sent once more after a fresh login. Everything else is
    /// the caller's to retry or not, by [`EtcdError::failure`].
    async fn call<T, F, Fut>(&self, op: &'static str, key: &str, f: F) -> Result<T, EtcdError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(200));
        let mut attempt = 0u32;
        let mut logged_in_again = false;
        let request = |error: etcd_client::Error| EtcdError::Request {
            op,
            key: key.to_owned(),
            hint: tls_hint(&error, self.tls_without_identity),
            error,
        };
        let timed_out = || EtcdError::Timeout {
            op,
            key: key.to_owned(),
            after: self.timeout,
        };
        loop {
            attempt += 1;
            match tokio::time::timeout_at(deadline, f(self.client.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(source)) if attempt < 8 && failure::not_sent(&source) => {
                    log::debug!(
                        "etcd {op} {key}: {}; sending it again",
                        failure::describe(&source)
                    );
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Ok(Err(source))
                    if self.has_credentials
                        && !logged_in_again
                        && failure::refused_by_server(&source) =>
                {
                    logged_in_again = true;
                    log::info!(
                        "etcd {op} {key}: {}; logging in again",
                        failure::describe(&source)
                    );
                    match tokio::time::timeout_at(deadline, self.client.refresh_token()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(request(e)),
                        Err(_) => return Err(timed_out()),
                    }
                }
                Ok(Err(source)) => return Err(request(source)),
                Err(_) => return Err(timed_out()),
            }
        }
    }

    /// The raw value of `<prefix>/config`, if the key exists.
    pub async fn get_config_raw(&self) -> Result<Option<Vec<u8>>, EtcdError> {
        let key = self.config_key();
        let resp = self
            .call("get", &key, |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// The parsed network config, `None` while the key does not exist.
    pub async fn get_config(&self) -> Result<Option<NetworkConfig>, EtcdError> {
        match self.get_config_raw().await? {
            None => Ok(None),
            Some(v) => NetworkConfig::parse(&v)
                .map(Some)
                .map_err(|source| EtcdError::Config {
                    key: self.config_key(),
                    source,
                }),
        }
    }

    /// Wait until `<prefix>/config` exists, as flanneld does, logging while it
    /// is missing (polling every `poll`) or etcd is unreachable (retrying
    /// with backoff). A malformed config or a problem of configuration
    /// (credentials, certificates) is returned at once.
    pub async fn wait_config(&self, poll: Duration) -> Result<NetworkConfig, EtcdError> {
        let mut logged_missing = false;
        let mut backoff = Backoff::new(poll, Duration::from_secs(10));
        loop {
            match self.get_config().await {
                Ok(Some(c)) => return Ok(c),
                Ok(None) => {
                    if !logged_missing {
                        log::warn!(
                            "waiting for the network config: {} does not exist yet in etcd at {}",
                            self.config_key(),
                            self.endpoints
                        );
                        logged_missing = true;
                    }
                }
                Err(e) if !e.is_transient() => return Err(e),
                Err(e) => {
                    let delay = backoff.next_delay();
                    log::warn!("cannot read the network config yet (retrying in {delay:?}): {e}");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            }
            backoff.reset();
            tokio::time::sleep(poll).await;
        }
    }

    /// Every key under `<prefix>/subnets/` and the revision they were read at.
    pub async fn list(&self) -> Result<Snapshot, EtcdError> {
        let prefix = self.subnets_prefix();
        let resp = self
            .call("list", &prefix, |mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let entries = resp
            .kvs()
            .iter()
            .map(|kv| Entry {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: kv.value().to_vec(),
                lease_id: kv.lease(),
                mod_revision: kv.mod_revision(),
            })
            .collect();
        Ok(Snapshot { revision, entries })
    }

    /// One lease key, if it exists.
    pub async fn get_lease(
        &self,
        subnet: impl Into<LeaseSubnets>,
    ) -> Result<Option<Entry>, EtcdError> {
        Ok(self.lease_snapshot(subnet).await?.entries.pop())
    }

    /// One lease key as a snapshot: etcd's revision, and the key's entry
    /// unless it is gone.
    pub async fn lease_snapshot(
        &self,
        subnet: impl Into<LeaseSubnets>,
    ) -> Result<Snapshot, EtcdError> {
        let key = self.lease_key(subnet);
        let resp = self
            .call("get", &key, |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let entries = resp
            .kvs()
            .first()
            .map(|kv| Entry {
                key: key.clone(),
                value: kv.value().to_vec(),
                lease_id: kv.lease(),
                mod_revision: kv.mod_revision(),
            })
            .into_iter()
            .collect();
        Ok(Snapshot { revision, entries })
    }

    /// Grant an etcd lease of `ttl` (rounded up to whole seconds).
    pub async fn grant(&self, ttl: Duration) -> Result<(i64, Duration), EtcdError> {
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let secs = i64::try_from(secs.max(1)).unwrap_or(i64::MAX);
        let resp = self
            .call("grant lease for", &format!("{secs}s"), |mut c| async move {
                c.lease_grant(secs, None).await
            })
            .await?;
        Ok((resp.id(), Duration::from_secs(resp.ttl().max(0) as u64)))
    }

    /// Best effort: a lease nobody uses expires on its own anyway.
    pub async fn revoke(&self, id: i64) {
        if id == 0 {
            return;
        }
        if let Err(e) = self
            .call("revoke lease", &format!("{id:x}"), |mut c| async move {
                c.lease_revoke(id).await
            })
            .await
        {
            log::debug!("{e}");
        }
    }

    /// `If(no key holds the IPv4 subnet) Then(Put(key, value, lease))`: true
    /// if we created it. The IPv4 subnet's keys are its v4-only key and
    /// every dual-stack key that starts with it (`<v4>&...`): two nodes
    /// racing for one IPv4 subnet with different IPv6 halves write two
    /// different keys, and comparing the key alone (as flanneld does) would
    /// let both win.
    pub async fn create(
        &self,
        subnet: impl Into<LeaseSubnets>,
        value: &str,
        lease_id: i64,
    ) -> Result<bool, EtcdError> {
        let subnets = subnet.into();
        let key = self.lease_key(subnets);
        let v4_key = self.lease_key(subnets.v4);
        // `&` + 1 is `'`: the range holds exactly the keys `<v4>&...`.
        let dual = (format!("{v4_key}&"), format!("{v4_key}'"));
        let txn = Txn::new()
            .when([
                Compare::version(key.clone(), CompareOp::Equal, 0),
                Compare::version(v4_key, CompareOp::Equal, 0),
                Compare::version(dual.0, CompareOp::Equal, 0).with_range(dual.1),
            ])
            .and_then([TxnOp::put(key.clone(), value, put_options(lease_id))]);
        let resp = self
            .call("create", &key, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(resp.succeeded())
    }

    /// `If(ModRevision(key) == seen) Then(Put(key, value, lease))`: overwrite a
    /// key only if nobody changed it since we read it. `lease_id` 0 writes
    /// it without a lease (a reservation stays one).
    pub async fn replace(
        &self,
        subnet: impl Into<LeaseSubnets>,
        seen_mod_revision: i64,
        value: &str,
        lease_id: i64,
    ) -> Result<bool, EtcdError> {
        let key = self.lease_key(subnet);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                seen_mod_revision,
            )])
            .and_then([TxnOp::put(key.clone(), value, put_options(lease_id))]);
        let resp = self
            .call("replace", &key, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(resp.succeeded())
    }

    /// Delete a key only if nobody changed it since we read it.
    pub async fn delete_if_unchanged(
        &self,
        subnet: impl Into<LeaseSubnets>,
        seen_mod_revision: i64,
    ) -> Result<bool, EtcdError> {
        let key = self.lease_key(subnet);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                seen_mod_revision,
            )])
            .and_then([TxnOp::delete(key.clone(), None)]);
        let resp = self
            .call("delete", &key, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(resp.succeeded())
    }
}

fn put_options(lease_id: i64) -> Option<PutOptions> {
    (lease_id != 0).then(|| PutOptions::new().with_lease(lease_id))
}

fn read_file(flag: &'static str, path: &Path) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|error| EtcdError::File {
        flag,
        path: path.to_owned(),
        error,
    })
}

/// Read a PEM file and check that it holds what the flag says, so that a
/// wrong file fails at start-up, naming the flag, not at the first
/// handshake.
fn read_pem(flag: &'static str, path: &Path, key: bool) -> Result<Vec<u8>, EtcdError> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let pem = read_file(flag, path)?;
    let checked = if key {
        PrivateKeyDer::from_pem_slice(&pem).map(drop)
    } else {
        CertificateDer::from_pem_slice(&pem).map(drop)
    };
    checked.map_err(|error| EtcdError::Pem {
        flag,
        path: path.to_owned(),
        what: if key { "private key" } else { "certificate" },
        error,
    })?;
    Ok(pem)
}

/// The TLS settings of the flags. Every file is read (and checked) here,
/// before any connection is attempted.
fn tls_options(opts: &EtcdOptions) -> Result<Option<TlsOptions>, EtcdError> {
    let any_https = opts.endpoints.iter().any(|e| e.starts_with("https://"));
    let identity = match (&opts.cert_file, &opts.key_file) {
        (Some(c), Some(k)) => Some(Identity::from_pem(
            read_pem("--etcd-certfile", c, false)?,
            read_pem("--etcd-keyfile", k, true)?,
        )),
        (None, None) => None,
        _ => {
            return Err(EtcdError::Options(
                "--etcd-certfile and --etcd-keyfile must be given together".into(),
            ));
        }
    };
    let ca = match &opts.ca_file {
        Some(p) => Some(Certificate::from_pem(read_pem("--etcd-cafile", p, false)?)),
        None => None,
    };
    if identity.is_none() && ca.is_none() && !any_https {
        return Ok(None);
    }
    if !any_https {
        return Err(EtcdError::Options(
            "TLS files were given but no --etcd-endpoints URL starts with https://".into(),
        ));
    }
    if let Some(plain) = opts.endpoints.iter().find(|e| e.starts_with("http://")) {
        return Err(EtcdError::Options(format!(
            "--etcd-endpoints mixes https:// and http:// ({plain})"
        )));
    }
    let mut tls = TlsOptions::new();
    if let Some(ca) = ca {
        tls = tls.ca_certificate(ca);
    }
    if let Some(id) = identity {
        tls = tls.identity(id);
    }
    Ok(Some(tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(endpoints: &[&str], user: Option<&str>, password: Option<&str>) -> EtcdOptions {
        let mut o = EtcdOptions::new(endpoints.iter().map(|e| e.to_string()).collect(), "/p");
        o.username = user.map(String::from);
        o.password = password.map(String::from);
        o
    }

    #[test]
    fn debug_never_shows_the_password() {
        let o = opts(&["https://e:2379"], Some("root"), Some("hunter2"));
        let d = format!("{o:?} {o:#?}");
        assert!(!d.contains("hunter2"), "{d}");
        assert!(d.contains("<redacted>") && d.contains("root"), "{d}");
    }

    #[test]
    fn credentials_over_plain_http_are_warned_about() {
        let w = opts(
            &["https://a:2379", "http://b:2379"],
            Some("root"),
            Some("hunter2"),
        )
        .cleartext_credentials_warning()
        .expect("a warning");
        assert!(w.contains("sent in clear to http://b:2379"), "{w}");
        assert!(!w.contains("hunter2") && !w.contains("https://a"), "{w}");
        // No scheme: etcd-client dials plain http.
        assert!(
            opts(&["b:2379"], Some("u"), None)
                .cleartext_credentials_warning()
                .is_some()
        );
        assert_eq!(
            opts(&["https://a:2379"], Some("u"), Some("p")).cleartext_credentials_warning(),
            None
        );
        assert_eq!(
            opts(&["http://a:2379"], None, None).cleartext_credentials_warning(),
            None
        );
        assert_eq!(
            opts(&["http://a:2379"], Some(""), Some("")).cleartext_credentials_warning(),
            None
        );
    }
}
