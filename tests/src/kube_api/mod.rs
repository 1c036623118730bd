//! A Kubernetes API server stand-in, in process: the nodes and pods a
//! `--kube-subnet-mgr` agent reads, watches and patches, served over HTTP/1.1
//! (optionally TLS with a bearer token) from a socket that can live in a lab
//! host's network namespace.
//!
//! What it serves (see `docs/kube-and-ipv6.md` A.8 for what flannel and
//! kube-rs send):
//! - `GET /api/v1/nodes` (LIST, `limit`/`continue`; `fieldSelector` and
//!   `labelSelector` with `=`, `==`, `!=` and bare/`!` label keys),
//!   `?watch=true` (WATCH: `resourceVersion`, `allowWatchBookmarks`,
//!   `timeoutSeconds`; 410 `Expired` in the stream for a compacted version;
//!   no or `0` resourceVersion starts with synthetic ADDED events of every
//!   object, as a real server does), `POST`;
//! - `GET`/`PUT`/`PATCH`/`DELETE /api/v1/nodes/{name}` and `GET`/`PUT`/`PATCH`
//!   on `.../status` (strategic merge, JSON merge and JSON patch; `/status`
//!   never changes `spec`, the main resource never changes `status`);
//! - the same for pods under `/api/v1/namespaces/{ns}/pods` (and a LIST or
//!   WATCH of `/api/v1/pods`);
//! - discovery for kubectl: `/version`, `/api`, `/api/v1`, `/apis`; and the
//!   `Table` form of lists and watches that `kubectl get` asks for;
//! - `Status` bodies for every error, as a real server writes them.
//!
//! What it does not: other resources, RBAC (one token, all or nothing),
//! server-side apply, protobuf, HTTP/2, `sendInitialEvents`, snapshots for
//! `continue` (later pages come from the current state) and
//! "too large resourceVersion" waits (a LIST is always served from now).
//!
//! The test drives the store directly (`put_node`, `delete_node`,
//! `compact`...) and reads back what clients did (`requests`, `patches`).

mod http;
mod merge;
mod serve;
mod status;
mod store;
mod watch;

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Map, Value, json};

pub use merge::{json_patch, merge_patch, strategic_merge};
pub use status::ApiError;
pub use store::{Event, EventType, Part, Resource, Store};

use crate::{etcd, netns};

/// How to start a stand-in.
#[derive(Clone, Debug)]
pub struct KubeApiSpec {
    /// Listen inside this network namespace (`ip netns` name).
    pub netns: Option<String>,
    /// Address to listen on (127.0.0.1 when `None`).
    pub ip: Option<String>,
    /// Port (a free one below the ephemeral range when `None`, so that
    /// [`KubeApi::start_again`] finds it free).
    pub port: Option<u16>,
    /// Serve HTTPS with a certificate for `ip` signed by a CA made at start.
    pub tls: bool,
    /// Require `Authorization: Bearer <token>` (401 otherwise).
    pub token: Option<String>,
    /// How long a watch stays idle before a BOOKMARK (if the client allowed
    /// bookmarks).
    pub bookmark_interval: Duration,
    /// A watch's length when the client sends no `timeoutSeconds` (a real
    /// server picks 30 to 60 minutes).
    pub default_watch_timeout: Duration,
    /// How many events are kept for watches; a watch from an older
    /// resourceVersion gets 410 Expired.
    pub history: usize,
    /// The scratch directory (certificates; removed on drop); a fresh one
    /// under the temporary directory when `None`.
    pub dir: Option<PathBuf>,
}

impl Default for KubeApiSpec {
    fn default() -> KubeApiSpec {
        KubeApiSpec {
            netns: None,
            ip: None,
            port: None,
            tls: false,
            token: None,
            bookmark_interval: Duration::from_secs(60),
            default_watch_timeout: Duration::from_secs(1800),
            history: 100_000,
            dir: None,
        }
    }
}

/// One PATCH a client sent, as received.
#[derive(Clone, Debug)]
pub struct PatchRecord {
    /// The path without the query, e.g. `/api/v1/nodes/n1/status`.
    pub path: String,
    pub content_type: String,
    /// The body (`Value::Null` if it was not JSON).
    pub body: Value,
    /// The HTTP status answered.
    pub code: u16,
}

#[derive(Default)]
pub(crate) struct Stats {
    /// `(verb, pattern)` → count; verbs as Kubernetes names them (`list`,
    /// `watch`, `get`, `create`, `update`, `patch`, `delete`), patterns like
    /// `nodes/{name}/status`.
    counts: BTreeMap<(String, String), u64>,
    patches: Vec<PatchRecord>,
}

#[derive(Default)]
pub(crate) struct Faults {
    /// Answer this many next requests on nodes or pods (not discovery,
    /// which clients cache or skip) with `fail_code`.
    fail_next: u32,
    fail_code: u16,
    /// Wait this long before answering each request.
    delay: Duration,
}

/// State shared by the server tasks and the test.
pub(crate) struct Shared {
    store: Mutex<Store>,
    /// The current resourceVersion, for watches to wait on.
    rv_tx: tokio::sync::watch::Sender<u64>,
    token: Option<String>,
    bookmark_interval: Duration,
    default_watch_timeout: Duration,
    stats: Mutex<Stats>,
    faults: Mutex<Faults>,
    /// `ip:port`, for discovery's serverAddressByClientCIDRs.
    addr: String,
}

impl Shared {
    /// Runs `f` on the store and wakes the watches if the version moved.
    pub(crate) fn with_store<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let mut store = self.store.lock().expect("store lock");
        let before = store.resource_version();
        let out = f(&mut store);
        let after = store.resource_version();
        drop(store);
        if after != before {
            self.rv_tx.send_replace(after);
        }
        out
    }

    fn count(&self, verb: &str, pattern: &str) {
        let mut s = self.stats.lock().expect("stats lock");
        *s.counts
            .entry((verb.to_owned(), pattern.to_owned()))
            .or_default() += 1;
    }

    fn record_patch(&self, p: PatchRecord) {
        self.stats.lock().expect("stats lock").patches.push(p);
    }

    /// The fault to inject into the next request, if any, and the delay.
    fn next_fault(&self, resource: bool) -> (Option<u16>, Duration) {
        let mut f = self.faults.lock().expect("faults lock");
        let code = (resource && f.fail_next > 0).then(|| {
            f.fail_next -= 1;
            f.fail_code
        });
        (code, f.delay)
    }
}

/// A running (or stopped) stand-in. Stopped and cleaned up on drop.
pub struct KubeApi {
    spec: KubeApiSpec,
    shared: Arc<Shared>,
    rt: Option<tokio::runtime::Runtime>,
    server: Option<tokio::task::JoinHandle<()>>,
    addr: SocketAddr,
    dir: PathBuf,
    tls: Option<etcd::TlsFiles>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl KubeApi {
    pub fn start(spec: KubeApiSpec) -> Result<KubeApi> {
        let ip = spec.ip.clone().unwrap_or_else(|| "127.0.0.1".into());
        let port = match spec.port {
            Some(p) => p,
            // Probed here; inside a fresh namespace the port is free anyway.
            None => etcd::free_port(if spec.netns.is_some() {
                "127.0.0.1"
            } else {
                &ip
            })?,
        };
        let addr: SocketAddr = format!("{ip}:{port}")
            .parse()
            .with_context(|| format!("bad listen address {ip}:{port}"))?;
        let dir = spec.dir.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!(
                "overlay-tests-kube-api-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ))
        });
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let tls = if spec.tls {
            Some(etcd::make_tls(&dir, &ip)?)
        } else {
            None
        };
        let store = Store::new(spec.history);
        let (rv_tx, _) = tokio::sync::watch::channel(store.resource_version());
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            rv_tx,
            token: spec.token.clone(),
            bookmark_interval: spec.bookmark_interval,
            default_watch_timeout: spec.default_watch_timeout,
            stats: Mutex::new(Stats::default()),
            faults: Mutex::new(Faults::default()),
            addr: addr.to_string(),
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kube-api")
            .enable_all()
            .build()
            .context("building the stand-in's runtime")?;
        let mut api = KubeApi {
            spec,
            shared,
            rt: Some(rt),
            server: None,
            addr,
            dir,
            tls,
        };
        api.listen()?;
        Ok(api)
    }

    /// Binds (in the namespace) and spawns the accept loop.
    fn listen(&mut self) -> Result<()> {
        let addr = self.addr;
        let bind = move || -> Result<std::net::TcpListener> {
            let l = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        // A socket stays in the namespace it was created in, whichever
        // thread later accepts on it.
        let listener = match &self.spec.netns {
            Some(ns) => netns::run_in(ns, bind)?,
            None => bind()?,
        };
        let tls = match &self.tls {
            Some(t) => Some(serve::acceptor(&t.server_cert, &t.server_key)?),
            None => None,
        };
        let rt = self.rt.as_ref().expect("runtime lives until drop");
        let _guard = rt.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        self.server = Some(rt.spawn(serve::accept_loop(listener, tls, self.shared.clone())));
        Ok(())
    }

    /// `http(s)://ip:port`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA that signed the server's certificate (TLS only).
    pub fn ca_path(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.ca.as_path())
    }

    pub fn token(&self) -> Option<&str> {
        self.spec.token.as_deref()
    }

    /// Writes a kubeconfig (server, CA, token) for kubectl, client-go,
    /// the python client and kube-rs; returns `path`.
    pub fn kubeconfig(&self, path: &Path) -> Result<PathBuf> {
        self.kubeconfig_with_token(path, self.token())
    }

    /// The same with another token (or none), for testing refusals.
    pub fn kubeconfig_with_token(&self, path: &Path, token: Option<&str>) -> Result<PathBuf> {
        let ca = match self.ca_path() {
            Some(ca) => format!("    certificate-authority: {}\n", ca.display()),
            None => String::new(),
        };
        let user = match token {
            Some(t) => format!("    token: {t}\n"),
            None => "    {}\n".into(),
        };
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: {}\n{ca}users:\n- name: standin\n  user:\n{user}contexts:\n- name: standin\n  context:\n    cluster: standin\n    user: standin\ncurrent-context: standin\n",
            self.url()
        );
        fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path.to_owned())
    }

    /// A scratch directory removed with the stand-in (kubeconfigs, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Closes the listener and every open connection and watch at once, as
    /// if the server was killed. The store is kept.
    pub fn stop(&mut self) {
        if let Some(task) = self.server.take() {
            task.abort();
            // Aborting drops the listener and the connection set on the
            // runtime's threads: wait until it happened, so the port is free
            // and clients see the connections closed when we return.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !task.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    /// Listens again on the same address with the same store: versions
    /// continue where they were.
    pub fn start_again(&mut self) -> Result<()> {
        if self.server.is_some() {
            bail!("the stand-in is already running");
        }
        self.listen()
    }

    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    // ---- the store, from the test ----

    /// Creates or replaces a node (ADDED or MODIFIED; nothing if unchanged).
    /// Missing `kind`, `apiVersion`, `uid`, `creationTimestamp` and
    /// `annotations` are filled in. Returns the stored node.
    pub fn put_node(&self, node: Value) -> Result<Value> {
        self.put(Resource::Node, "", node)
    }

    /// A node with a podCIDR (and `podCIDRs`) and kubelet's Ready condition.
    pub fn put_simple_node(&self, name: &str, pod_cidr: &str) -> Result<Value> {
        self.put_node(simple_node(name, pod_cidr))
    }

    /// A running pod on `node_name` (what flannel reads: `spec.nodeName`).
    pub fn put_pod(&self, ns: &str, name: &str, node_name: &str) -> Result<Value> {
        self.put(
            Resource::Pod,
            ns,
            // `containers` is required: the python client refuses a pod spec without it.
            json!({
                "metadata": {"name": name, "namespace": ns},
                "spec": {
                    "nodeName": node_name,
                    "containers": [{"name": "main", "image": "ghcr.io/flannel-io/flannel:v0.28.9"}]
                },
                "status": {"phase": "Running"}
            }),
        )
    }

    fn put(&self, res: Resource, ns: &str, obj: Value) -> Result<Value> {
        let name = store::name_of(&obj).ok_or_else(|| anyhow!("object without metadata.name"))?;
        self.shared.with_store(|s| {
            s.put(res, ns, obj).map_err(|e| anyhow!(e.message))?;
            Ok(s.get(res, ns, &name)
                .map(|v| (*v).clone())
                .expect("just written"))
        })
    }

    /// Many nodes under one lock (10,000 in well under a second).
    pub fn put_nodes_bulk(&self, nodes: Vec<Value>) -> Result<()> {
        self.shared.with_store(|s| {
            for n in nodes {
                s.put(Resource::Node, "", n)
                    .map_err(|e| anyhow!(e.message))?;
            }
            Ok(())
        })
    }

    /// Sets (`Some`) or removes (`None`) annotations of a node.
    pub fn patch_node_annotations(
        &self,
        name: &str,
        annotations: &BTreeMap<String, Option<String>>,
    ) -> Result<Value> {
        let patch: Map<String, Value> = annotations
            .iter()
            .map(|(k, v)| (k.clone(), v.as_ref().map_or(Value::Null, |v| json!(v))))
            .collect();
        let patch = json!({"metadata": {"annotations": patch}});
        self.shared.with_store(|s| {
            s.update(Resource::Node, "", name, Part::All, |n| {
                merge_patch(n, &patch);
                Ok(())
            })
            .map(|v| (*v).clone())
            .map_err(|e| anyhow!(e.message))
        })
    }

    /// Deletes a node (DELETED with its last state).
    pub fn delete_node(&self, name: &str) -> Result<Value> {
        self.shared.with_store(|s| {
            s.delete(Resource::Node, "", name)
                .map(|v| (*v).clone())
                .map_err(|e| anyhow!(e.message))
        })
    }

    /// Deletes many nodes under one lock (DELETED events in that order).
    pub fn delete_nodes_bulk<S: AsRef<str>>(&self, names: &[S]) -> Result<()> {
        self.shared.with_store(|s| {
            for n in names {
                s.delete(Resource::Node, "", n.as_ref())
                    .map_err(|e| anyhow!(e.message))?;
            }
            Ok(())
        })
    }

    pub fn node(&self, name: &str) -> Option<Value> {
        self.shared
            .with_store(|s| s.get(Resource::Node, "", name).map(|v| (*v).clone()))
    }

    pub fn nodes(&self) -> Vec<Value> {
        self.shared.with_store(|s| {
            s.list(Resource::Node, None)
                .0
                .iter()
                .map(|v| (**v).clone())
                .collect()
        })
    }

    pub fn pod(&self, ns: &str, name: &str) -> Option<Value> {
        self.shared
            .with_store(|s| s.get(Resource::Pod, ns, name).map(|v| (*v).clone()))
    }

    /// Forgets the event history: every watch from an older version gets 410.
    pub fn compact(&self) {
        self.shared.with_store(Store::compact)
    }

    pub fn resource_version(&self) -> u64 {
        self.shared.with_store(|s| s.resource_version())
    }

    // ---- what clients did ----

    /// How many requests of `verb` (`list`, `watch`, `get`, `create`,
    /// `update`, `patch`, `delete`) on `pattern` (`nodes`, `nodes/{name}`,
    /// `nodes/{name}/status`, `namespaces/{ns}/pods/{name}`, `discovery`...)
    /// arrived, refused ones included.
    pub fn requests(&self, verb: &str, pattern: &str) -> u64 {
        let s = self.shared.stats.lock().expect("stats lock");
        s.counts
            .get(&(verb.to_owned(), pattern.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Every `(verb, pattern)` seen, with its count.
    pub fn request_counts(&self) -> BTreeMap<(String, String), u64> {
        self.shared.stats.lock().expect("stats lock").counts.clone()
    }

    /// Every PATCH received, in order.
    pub fn patches(&self) -> Vec<PatchRecord> {
        self.shared
            .stats
            .lock()
            .expect("stats lock")
            .patches
            .clone()
    }

    pub fn reset_stats(&self) {
        *self.shared.stats.lock().expect("stats lock") = Stats::default();
    }

    // ---- faults ----

    /// Answers the next `n` requests on nodes or pods with `code` (500:
    /// InternalError, others ServiceUnavailable; a Status body either way).
    /// Discovery is never failed: kubectl hides discovery errors.
    pub fn fail_next(&self, n: u32, code: u16) {
        let mut f = self.shared.faults.lock().expect("faults lock");
        f.fail_next = n;
        f.fail_code = code;
    }

    /// Waits `delay` before answering every request (zero: no delay).
    pub fn set_delay(&self, delay: Duration) {
        self.shared.faults.lock().expect("faults lock").delay = delay;
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop();
        if let Some(rt) = self.rt.take() {
            // Dropping a runtime blocks, which panics inside async code.
            rt.shutdown_background();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A node as kubelet and the node IPAM controller leave it: podCIDR(s),
/// an InternalIP and a Ready condition.
pub fn simple_node(name: &str, pod_cidr: &str) -> Value {
    json!({
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"},
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"}
        },
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
        "status": {
            "conditions": [{
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "kubelet is posting ready status",
                "lastHeartbeatTime": status::now_rfc3339(),
                "lastTransitionTime": status::now_rfc3339()
            }],
            // Every field the API marks required: the python client refuses
            // a NodeSystemInfo without them.
            "nodeInfo": {
                "machineID": format!("{:032x}", name.len()),
                "systemUUID": status::new_uid(0),
                "bootID": status::new_uid(1),
                "kernelVersion": "6.1.0",
                "osImage": "stand-in",
                "containerRuntimeVersion": "containerd://2.0.0",
                "kubeletVersion": "v1.33.0",
                "kubeProxyVersion": "v1.33.0",
                "operatingSystem": "linux",
                "architecture": "amd64"
            }
        }
    })
}
