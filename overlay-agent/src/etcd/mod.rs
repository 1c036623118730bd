//! etcd as flanneld uses it: the network config at `<prefix>/config` and one
//! key per subnet lease under `<prefix>/subnets/`.
//!
//! [`Registry`] is a thin, typed wrapper around `etcd_client` (connection
//! with endpoints/TLS/auth, time-bounded requests, errors that name the key);
//! [`own`] acquires and renews this node's lease; [`watch`] follows everyone
//! else's.

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

use crate::{
    config::{ConfigError, NetworkConfig},
    lease,
};

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
    pub fn new(endpoints: Vec<String>, prefix: impl Into<String>) -> EtcdOptions {
        EtcdOptions {
            endpoints,
            prefix: prefix.into(),
            request_timeout: Duration::from_secs(5),
            ..EtcdOptions::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("cannot read {flag} {path}: {source}")]
    File {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Options(String),
    #[error("etcd at {endpoints}: {problem}")]
    Connect { endpoints: String, problem: String },
    #[error("etcd {op} {key}: {source}{hint}")]
    Request {
        op: &'static str,
        key: String,
        #[source]
        source: etcd_client::Error,
        /// Empty, or a likely cause the error itself does not name.
        hint: &'static str,
    },
    #[error("etcd {op} {key}: no answer within {after:?}")]
    Timeout {
        op: &'static str,
        key: String,
        after: Duration,
    },
    #[error("{key}: {source}")]
    Config {
        key: String,
        #[source]
        source: ConfigError,
    },
}

impl EtcdError {
    /// Errors that retrying cannot fix: bad credentials, a certificate the
    /// server rejects or that does not verify, a malformed config.
    pub fn is_permanent(&self) -> bool {
        match self {
            EtcdError::File { .. } | EtcdError::Options(_) | EtcdError::Config { .. } => true,
            EtcdError::Connect { problem, .. } => is_permanent_text(problem),
            EtcdError::Request { source, .. } => is_permanent_text(&error_chain(source)),
            EtcdError::Timeout { .. } => false,
        }
    }
}

fn is_permanent_text(s: &str) -> bool {
    let s = s.to_ascii_lowercase();
    [
        "authentication failed",
        "permission denied",
        "user name is empty",
        "certificate",
        "unknownissuer",
        "tls",
    ]
    .iter()
    .any(|p| s.contains(p))
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
        lease::parse_subnet_key(&self.key).ok().map(|(n, _)| n)
    }
    pub fn is_reservation(&self) -> bool {
        self.lease_id == 0
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
        let connect = Client::connect(opts.endpoints.clone(), Some(co));
        let client = match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(EtcdError::Connect {
                    endpoints,
                    problem: error_chain(&e),
                });
            }
            Err(_) => {
                return Err(EtcdError::Connect {
                    endpoints,
                    problem: format!("no answer within {timeout:?}"),
                });
            }
        };
        let reg = Registry {
            client,
            prefix: opts.prefix.trim_end_matches('/').to_owned(),
            endpoints,
            timeout,
            tls_without_identity,
        };
        Ok(reg)
    }

    /// Ask any member for its status: a cheap request that proves the
    /// connection, TLS and credentials work.
    pub async fn probe(&self) -> Result<(), EtcdError> {
        let mut c = self.client.clone();
        match tokio::time::timeout(self.timeout, async move { c.status().await }).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(EtcdError::Connect {
                endpoints: self.endpoints.clone(),
                problem: error_chain(&e),
            }),
            Err(_) => Err(EtcdError::Connect {
                endpoints: self.endpoints.clone(),
                problem: format!("no answer within {:?}", self.timeout),
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
    pub fn lease_key(&self, subnet: Ipv4Net) -> String {
        lease::lease_key(&self.prefix, subnet)
    }
    pub fn subnets_prefix(&self) -> String {
        lease::subnets_prefix(&self.prefix)
    }

    /// Run one request with the timeout, naming the op and key on failure.
    /// A request that could not even be sent because the endpoint it was
    /// balanced to refuses connections (a dead cluster member) is sent again,
    /// so that it lands on a live member; nothing else is retried here.
    async fn call<T, F, Fut>(&self, op: &'static str, key: &str, f: F) -> Result<T, EtcdError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match tokio::time::timeout_at(deadline, f(self.client.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(source)) if attempt < 8 && not_sent(&source) => {
                    log::debug!("etcd {op} {key}: {source}; sending it again");
                    tokio::time::sleep(std::time::Duration::from_millis(20 * u64::from(attempt)))
                        .await;
                }
                Ok(Err(source)) => {
                    let hint = if self.tls_without_identity && connection_dropped(&source) {
                        " (the server ended the TLS connection: does it require a client \
                         certificate? see --etcd-certfile and --etcd-keyfile)"
                    } else {
                        ""
                    };
                    return Err(EtcdError::Request {
                        op,
                        key: key.to_owned(),
                        source,
                        hint,
                    });
                }
                Err(_) => {
                    return Err(EtcdError::Timeout {
                        op,
                        key: key.to_owned(),
                        after: self.timeout,
                    });
                }
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
    /// is missing or etcd is unreachable. A malformed config or a permanent
    /// connection problem (credentials, certificates) is returned at once.
    pub async fn wait_config(&self, poll: Duration) -> Result<NetworkConfig, EtcdError> {
        let mut logged_missing = false;
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
                Err(e) if e.is_permanent() => return Err(e),
                Err(e) => log::warn!("cannot read the network config yet: {e}"),
            }
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
    pub async fn get_lease(&self, subnet: Ipv4Net) -> Result<Option<Entry>, EtcdError> {
        let key = self.lease_key(subnet);
        let resp = self
            .call("get", &key, |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(resp.kvs().first().map(|kv| Entry {
            key: key.clone(),
            value: kv.value().to_vec(),
            lease_id: kv.lease(),
            mod_revision: kv.mod_revision(),
        }))
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

    /// `If(Version(key) == 0) Then(Put(key, value, lease))`: true if we created it.
    pub async fn create(
        &self,
        subnet: Ipv4Net,
        value: &str,
        lease_id: i64,
    ) -> Result<bool, EtcdError> {
        let key = self.lease_key(subnet);
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
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
        subnet: Ipv4Net,
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
        subnet: Ipv4Net,
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

/// Whether the request never left this host: the connection to the member
/// it was balanced to was refused or could not be made.
fn not_sent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            // gRPC's UNAVAILABLE is 14 (etcd-client does not re-export tonic's Code).
            s.code() as i32 == 14 && s.message().contains("connect error")
        }
        etcd_client::Error::TransportError(_) => true,
        _ => false,
    }
}

fn connection_dropped(e: &etcd_client::Error) -> bool {
    let text = error_chain(e).to_ascii_lowercase();
    [
        "connection closed",
        "connection reset",
        "broken pipe",
        "stream closed",
        "fatal alert",
    ]
    .iter()
    .any(|p| text.contains(p))
}

fn put_options(lease_id: i64) -> Option<PutOptions> {
    (lease_id != 0).then(|| PutOptions::new().with_lease(lease_id))
}

fn read_file(flag: &'static str, path: &Path) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|source| EtcdError::File {
        flag,
        path: path.to_owned(),
        source,
    })
}

fn tls_options(opts: &EtcdOptions) -> Result<Option<TlsOptions>, EtcdError> {
    let any_https = opts.endpoints.iter().any(|e| e.starts_with("https://"));
    let identity = match (&opts.cert_file, &opts.key_file) {
        (Some(c), Some(k)) => Some(Identity::from_pem(
            read_file("--etcd-certfile", c)?,
            read_file("--etcd-keyfile", k)?,
        )),
        (None, None) => None,
        _ => {
            return Err(EtcdError::Options(
                "--etcd-certfile and --etcd-keyfile must be given together".into(),
            ));
        }
    };
    let ca = match &opts.ca_file {
        Some(p) => Some(Certificate::from_pem(read_file("--etcd-cafile", p)?)),
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
