//! The Kubernetes variant (`up --kube`): the API stand-in (TLS, a bearer
//! token) in `ovlab-api`, Nodes node1..3 with podCIDRs from kube-flannel's
//! net-conf (`10.244.0.0/16`, a /24 each), the release agent with
//! `--kube-subnet-mgr` on hosts 1 (eBPF) and 2 (kernel), a flanneld stand-in
//! on host 3, and a pod per host made by the CNI plugins from kube-flannel's
//! conflist. Built from `overlay_tests::kube_cluster` and `overlay_tests::cni`.
//!
//! The stand-in lives inside `up`, listening in `ovlab-api` where the agents
//! reach it. The machine's kubectl (and `status`) reach it through a
//! loopback port `up` forwards into that namespace, with the kubeconfig
//! `/run/overlay-lab/kubeconfig`.

use std::{
    io::Read,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use overlay_tests::{
    agent::Hosts,
    cni::{Pod, PodOpts},
    kube_api::{KubeApiSpec, simple_node},
    kube_cluster::{FlannelNode, KubeCluster, KubeClusterSpec, PREFIX},
    netns,
};
use serde_json::{Value, json};

use crate::{
    nodes,
    topo::{self, NODES, Node, Role},
};

/// What `up --kube` holds until teardown; dropped in field order: pods
/// first (CNI DEL while the hosts still exist), then the flanneld node,
/// then the cluster (the API stand-in, the pins' bpffs).
pub struct KubeLab {
    pub pods: Vec<Pod>,
    pub flanneld: Option<FlannelNode>,
    pub cluster: KubeCluster,
}

impl KubeLab {
    /// The stand-in, its kubeconfigs, the Nodes. No agents, no pods yet.
    pub fn start(agent: &Path) -> Result<KubeLab> {
        let cluster = KubeCluster::start_with(KubeClusterSpec {
            hosts: Hosts::adopt("ovlab", NODES.len(), NODES[0].underlay_ip()),
            api: KubeApiSpec {
                netns: Some(topo::API_NS.into()),
                ip: Some(topo::ETCD_IP.to_string()),
                port: Some(topo::API_PORT),
                tls: true,
                token: Some(token()?),
                ..KubeApiSpec::default()
            },
            bin: agent.to_owned(),
            dir: Some(topo::kube_dir()),
        })?;
        for n in NODES {
            cluster
                .api
                .put_node(simple_node(&n.node_name(), &pod_cidr(&n)))?;
        }
        Ok(KubeLab {
            pods: Vec::new(),
            flanneld: None,
            cluster,
        })
    }

    /// `overlay-agent --kube-subnet-mgr` on `node` as kube-overlay's
    /// DaemonSet runs it (kube_cluster's flags, NODE_NAME), in its own
    /// process group like the etcd variant's agents.
    pub fn start_agent(&self, node: &Node, ebpf_ingress: &str) -> Result<Child> {
        let i = node.index as usize;
        let (datapath, extra) = match node.role {
            Role::Ebpf => ("ebpf", vec![format!("--ebpf-ingress={ebpf_ingress}")]),
            Role::Kernel => ("kernel", vec![]),
            Role::FlanneldStandIn => bail!("host {i} runs the flanneld stand-in"),
        };
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        std::fs::create_dir_all(node.dir())?;
        let script = format!(
            "mount -t bpf bpf /sys/fs/bpf 2>/dev/null; exec {} \"$@\"",
            self.cluster.bin.display()
        );
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &node.ns(), "sh", "-c", &script])
            .arg("overlay-agent")
            .args(self.cluster.agent_args(i, datapath, &extra))
            .env("NODE_NAME", node.node_name())
            .env("RUST_LOG", "info");
        let child = nodes::spawn_logged(c, &node.log())?;
        std::fs::write(node.pid_file(), child.id().to_string())?;
        Ok(child)
    }

    /// Host 3 as a flanneld node (kube_cluster's: flannel.1 by iproute2,
    /// flanneld's annotations, subnet.env), plus the NetworkUnavailable
    /// condition flanneld sets, PATCHed over HTTPS as flanneld does.
    pub fn start_flanneld(&mut self, node: &Node) -> Result<&FlannelNode> {
        let f = self.cluster.flannel_node(node.index as usize)?;
        let now = rfc3339_now();
        let patch = json!({"status": {"conditions": [{
            "type": "NetworkUnavailable",
            "status": "False",
            "reason": "FlannelIsUp",
            "message": "Flannel is running on this node",
            "lastTransitionTime": now,
            "lastHeartbeatTime": now,
        }]}});
        api_request(
            "PATCH",
            &format!("/api/v1/nodes/{}/status", node.node_name()),
            Some(("application/strategic-merge-patch+json", &patch.to_string())),
        )
        .context("setting node3's NetworkUnavailable as flanneld does")?;
        Ok(self.flanneld.insert(f))
    }

    /// The flanneld stand-in programs every other Node's lease from its
    /// annotations (as its watch would); how many.
    pub fn sync_flanneld(&self) -> Result<usize> {
        match &self.flanneld {
            Some(f) => f.sync(&self.cluster.api),
            None => Ok(0),
        }
    }

    /// The pod on `node`, made by the CNI plugins once its subnet.env exists.
    pub fn add_pod(&mut self, node: &Node) -> Result<&Pod> {
        let env = node.subnet_file();
        overlay_tests::kube_cluster::wait_file(&env, Duration::from_secs(30))?;
        let pod = Pod::add(
            &node.ns(),
            &env,
            &format!("pod{}", node.index),
            PodOpts {
                netns: Some(node.container_ns()),
                ..PodOpts::default()
            },
        )?;
        self.pods.push(pod);
        Ok(self.pods.last().expect("just pushed"))
    }

    /// Forwards a loopback port of this machine to the stand-in and writes
    /// the machine's kubeconfig for it; returns the port.
    pub fn expose(&self) -> Result<u16> {
        let port = forward(topo::API_NS, self.cluster.api.addr())?;
        let inside = std::fs::read_to_string(&self.cluster.kubeconfig)?;
        let outside = inside.replace(
            &self.cluster.api.url(),
            &format!("https://127.0.0.1:{port}"),
        );
        ensure!(outside != inside, "the kubeconfig names no server");
        std::fs::write(topo::machine_kubeconfig(), outside)?;
        Ok(port)
    }
}

fn pod_cidr(n: &Node) -> String {
    KubeCluster::pod_cidr(n.index as usize)
}

/// A fresh bearer token (the kubeconfigs are root's, in /run).
fn token() -> Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn rfc3339_now() -> String {
    // `date` keeps this free of a time crate.
    overlay_tests::cmd::run(None, &["date", "-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Accepts on 127.0.0.1 (a free port) in this namespace and splices each
/// connection to `target`, connected from inside `ns`. TLS stays end to
/// end: the stand-in's certificate also names 127.0.0.1.
fn forward(ns: &str, target: SocketAddr) -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the kubectl port")?;
    let port = listener.local_addr()?.port();
    let ns = ns.to_owned();
    std::thread::Builder::new()
        .name("kubectl-forward".into())
        .spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let ns = ns.clone();
                std::thread::spawn(move || {
                    let upstream = netns::run_in(&ns, move || {
                        Ok(TcpStream::connect_timeout(&target, Duration::from_secs(5))?)
                    });
                    if let Ok(upstream) = upstream {
                        splice(client, upstream);
                    }
                });
            }
        })?;
    Ok(port)
}

fn splice(a: TcpStream, b: TcpStream) {
    let (Ok(mut a2), Ok(mut b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let t = std::thread::spawn(move || {
        let _ = std::io::copy(&mut a2, &mut b2);
        let _ = b2.shutdown(Shutdown::Write);
    });
    let (mut a, mut b) = (a, b);
    let _ = std::io::copy(&mut b, &mut a);
    let _ = a.shutdown(Shutdown::Write);
    let _ = t.join();
}

/// What the machine's kubeconfig says: server, CA file, token.
struct Access {
    server: String,
    ca: PathBuf,
    token: String,
}

fn access() -> Result<Access> {
    let path = topo::machine_kubeconfig();
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (is `up --kube` running?)", path.display()))?;
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{k}: ")))
            .map(str::to_owned)
            .with_context(|| format!("{} has no {k}", path.display()))
    };
    Ok(Access {
        server: field("server")?,
        ca: field("certificate-authority")?.into(),
        token: field("token")?,
    })
}

/// One request to the stand-in over HTTPS with the machine's kubeconfig
/// (curl, as kubectl would send it); the JSON answer.
pub fn api_request(method: &str, path: &str, body: Option<(&str, &str)>) -> Result<Value> {
    let a = access()?;
    let mut c = Command::new("curl");
    c.args(["-sS", "--fail-with-body", "--max-time", "5", "-X", method])
        .arg("--cacert")
        .arg(&a.ca)
        .arg("-H")
        .arg(format!("Authorization: Bearer {}", a.token))
        .arg("-H")
        .arg("Accept: application/json");
    if let Some((ctype, data)) = body {
        c.arg("-H")
            .arg(format!("Content-Type: {ctype}"))
            .arg("--data-binary")
            .arg(data);
    }
    let out = c
        .arg(format!("{}{path}", a.server))
        .output()
        .context("running curl")?;
    ensure!(
        out.status.success(),
        "{method} {}{path}: {}{}",
        a.server,
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    serde_json::from_slice(&out.stdout).with_context(|| format!("{method} {path}: not JSON"))
}

/// The Nodes as the API serves them now, the columns `kubectl get nodes`
/// would show with flannel's annotations as custom columns.
pub fn print_nodes() -> Result<()> {
    let list = api_request("GET", "/api/v1/nodes", None)?;
    let kubeconfig = topo::machine_kubeconfig();
    println!(
        "Kubernetes API stand-in https://{}:{} (namespace {}), from this machine via {}",
        topo::ETCD_IP,
        topo::API_PORT,
        topo::API_NS,
        access()?.server
    );
    println!(
        "$ kubectl --kubeconfig {} get nodes -o wide   # flannel's annotations as columns:",
        kubeconfig.display()
    );
    let rows: Vec<[String; 6]> = list["items"]
        .as_array()
        .context("a NodeList without items")?
        .iter()
        .map(|n| {
            let a = &n["metadata"]["annotations"];
            let ann = |k: &str| {
                a[format!("{PREFIX}/{k}")]
                    .as_str()
                    .unwrap_or("<none>")
                    .to_owned()
            };
            let mac = serde_json::from_str::<Value>(&ann("backend-data"))
                .ok()
                .and_then(|d| d["VtepMAC"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "<none>".into());
            let unavailable = n["status"]["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == "NetworkUnavailable"))
                .map(|c| {
                    format!(
                        "{} ({})",
                        c["status"].as_str().unwrap_or("?"),
                        c["reason"].as_str().unwrap_or("")
                    )
                })
                .unwrap_or_else(|| "<none>".into());
            [
                n["metadata"]["name"].as_str().unwrap_or("?").to_owned(),
                n["spec"]["podCIDR"].as_str().unwrap_or("<none>").to_owned(),
                ann("public-ip"),
                ann("backend-type"),
                mac,
                unavailable,
            ]
        })
        .collect();
    let header = [
        "NAME",
        "POD-CIDR",
        "PUBLIC-IP",
        "BACKEND",
        "VTEP-MAC",
        "NETWORK-UNAVAILABLE",
    ];
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::from(" ");
        for (c, w) in cells.iter().zip(widths) {
            s.push_str(&format!(" {c:<w$}"));
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
    Ok(())
}

/// How to reach the lab with the machine's kubectl.
pub fn print_kubectl_hint() {
    println!(
        "kubeconfig: {k}\n  kubectl --kubeconfig {k} get nodes -o wide",
        k = topo::machine_kubeconfig().display()
    );
}

/// Waits until the flanneld stand-in sees both agents' Nodes (their
/// annotations are written once they hold their lease).
pub fn sync_until(lab: &KubeLab, want: usize, limit: Duration) -> Result<usize> {
    let t0 = Instant::now();
    loop {
        let n = lab.sync_flanneld()?;
        if n >= want || t0.elapsed() > limit {
            return Ok(n);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
