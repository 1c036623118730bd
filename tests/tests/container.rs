//! The runtime image (`cargo xtask image`) run as the etcd-mode DaemonSet
//! (`deploy/kubernetes/kube-overlay.yml`) runs it: the pod template is
//! translated to `docker run` by the harness (`overlay_tests::kubelet`), and
//! each lab host gets a real dockerd in its network namespace, so
//! `hostNetwork` is `--network host` of that host. The manifest's
//! init containers that use our image run first (install-cni,
//! put-network-config against the test's etcd, the privileged
//! conntrack-liberal); flannel's CNI plugin image is not ours and is not
//! reachable, and the pods here are made without CNI.
//!
//! - `daemonset_container_carries_pods_through_restart_and_upgrade`: on two
//!   hosts, the containers take their leases from the real etcd, program
//!   the datapath (pins on each host's bpffs, `flannel.1`), pass their
//!   readiness probe, pods reach each other both ways, `overlay-agent
//!   status` works through `docker exec`; then, under a 100 pps ping
//!   between the pods, `docker restart` of one agent and `docker rm -f` +
//!   `docker run` of a newer image (the same spec, the image set as
//!   `kubectl set image` would) lose no packet.
//! - `daemonset_capabilities_are_each_needed`: the manifest's capabilities
//!   are enough (the agent becomes ready with its eBPF datapath), and
//!   without any one of those this docker can grant it does not (it exits,
//!   or falls back to the kernel datapath); NET_RAW, a runtime default that
//!   kube-flannel adds, can go too. Docker 20.10 knows neither BPF nor
//!   PERFMON: it cannot grant them, so they are not tested by dropping
//!   (SYS_ADMIN stands in for both on the kernel's side).
//! - `kube_mode_daemonset_container_annotates_its_node_and_carries_pods`:
//!   the Kubernetes-mode manifest (`kube-flannel-overlay.yml`) against the
//!   API stand-in, with the in-cluster configuration a kubelet gives the
//!   pod: the agent finds its Node through its Pod, annotates it, and pods
//!   on two hosts reach each other.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use overlay_tests::{
    agent::{Containers, Hosts, add_container, pings_both_ways, sh},
    docker::{Dockerd, HostDirs},
    etcd::Etcd,
    image::{self, Image},
    kube_api::{KubeApi, KubeApiSpec},
    kubelet::{self, ApiAccess, Manifest, Node, Run},
    traffic::ping_summary,
};

const MANIFEST: &str = "kube-overlay.yml";
const AGENT: &str = "overlay-agent";
const PREFIX: &str = "/coreos.com/network";
/// How long an agent gets to take its lease and become ready.
const READY: Duration = Duration::from_secs(30);
/// What the agent logs once it runs with the eBPF datapath (with
/// `--datapath=auto` it falls back to the kernel's vxlan device, and logs
/// why, when it cannot load or attach its programs).
const EBPF_RUNNING: &str = "(ebpf datapath)";

/// One lab host as a Kubernetes node: its dockerd (image loaded, tagged as
/// the manifest names it), a bpffs of its own for `/sys/fs/bpf`, and the
/// directory its other host paths live in. Drops in field order: dockerd
/// (containers removed), then the bpffs.
struct KubeNode {
    docker: Dockerd,
    bpffs: SharedBpffs,
    node: Node,
    ns: String,
}

/// A bpffs mounted as a shared mount (a systemd host's mounts are shared;
/// `mountPropagation: HostToContainer` needs it), unmounted on drop.
struct SharedBpffs(PathBuf);

impl SharedBpffs {
    fn mount(dir: PathBuf) -> Result<SharedBpffs> {
        fs::create_dir_all(&dir)?;
        let d = dir.to_string_lossy().into_owned();
        sh(&["mount", "-t", "bpf", "bpf", &d])?;
        let b = SharedBpffs(dir);
        sh(&["mount", "--make-shared", &d])?;
        Ok(b)
    }
}

impl Drop for SharedBpffs {
    fn drop(&mut self) {
        let _ = sh(&["umount", "-l", &self.0.to_string_lossy()]);
        let _ = fs::remove_dir(&self.0);
    }
}

impl KubeNode {
    /// Node `i` of the etcd-mode manifest: the Secret's endpoints are `etcd`'s.
    fn start(
        hosts: &Hosts,
        i: usize,
        dir: &Path,
        etcd: &Etcd,
        manifest: &Manifest,
        image: &Image,
    ) -> Result<KubeNode> {
        let mut secrets = BTreeMap::new();
        secrets.insert(
            ("overlay-etcd".to_owned(), "endpoints".to_owned()),
            etcd.endpoints(),
        );
        Self::start_with(hosts, i, dir, secrets, None, manifest, image)
    }

    #[allow(clippy::too_many_arguments)]
    fn start_with(
        hosts: &Hosts,
        i: usize,
        dir: &Path,
        secrets: BTreeMap<(String, String), String>,
        api: Option<ApiAccess>,
        manifest: &Manifest,
        image: &Image,
    ) -> Result<KubeNode> {
        let root = dir.join(format!("h{i}"));
        let bpffs = SharedBpffs::mount(root.join("bpffs"))?;
        let mut host_paths = BTreeMap::new();
        host_paths.insert("/sys/fs/bpf".to_owned(), bpffs.0.clone());
        // Shared with every iptables user of this machine, as on a node.
        host_paths.insert("/run/xtables.lock".to_owned(), "/run/xtables.lock".into());
        host_paths.insert("/lib/modules".to_owned(), "/lib/modules".into());
        let node = Node {
            name: format!("node{i}"),
            ip: hosts.ip(i).parse()?,
            root: root.clone(),
            host_paths,
            secrets,
            images: BTreeMap::new(),
            runtime_lacks: Vec::new(),
            api,
        };
        // A short path: dockerd's socket lives in it.
        let docker_dir = std::env::temp_dir().join(format!("ovct{}h{i}", std::process::id()));
        // hostNetwork pods need no bridge, and a kubelet's runtime leaves
        // the host's iptables alone.
        let docker = Dockerd::start(
            &hosts.ns(i),
            &docker_dir,
            &["--bridge=none".to_owned(), "--iptables=false".to_owned()],
        )?;
        let t0 = Instant::now();
        docker.load(&image.tarball)?;
        let mut node = node;
        let wanted = kubelet::translate(manifest, &node, &main_container(manifest)?)?.image;
        docker.docker(&["tag", &image.tag, &wanted])?;
        // What this runtime cannot grant, asked of it (docker 20.10 refuses
        // names it does not know, e.g. "unknown capability: CAP_PERFMON").
        // All of them at once, each refused one left out of the next try.
        loop {
            let mut args = vec![
                "create".to_owned(),
                "--network=none".to_owned(),
                "--entrypoint=/bin/true".to_owned(),
            ];
            args.extend(
                kubelet::CAPS
                    .iter()
                    .filter(|c| !node.runtime_lacks.iter().any(|l| l == *c))
                    .map(|c| format!("--cap-add={c}")),
            );
            args.push(wanted.clone());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            match docker.docker(&args) {
                Ok(id) => {
                    docker.docker(&["rm", id.trim()])?;
                    break;
                }
                Err(e) => {
                    let e = format!("{e:#}");
                    let cap = e
                        .split_once("unknown capability: \"CAP_")
                        .and_then(|(_, rest)| rest.split_once('"'))
                        .map(|(cap, _)| cap.to_owned())
                        .with_context(|| format!("docker create with every capability: {e}"))?;
                    ensure!(!node.runtime_lacks.contains(&cap), "{e}");
                    node.runtime_lacks.push(cap);
                }
            }
        }
        if !node.runtime_lacks.is_empty() {
            eprintln!("h{i}: this docker cannot grant {:?}", node.runtime_lacks);
        }
        eprintln!(
            "h{i}: dockerd up, {} loaded as {wanted} in {:.1} s",
            image.tag,
            t0.elapsed().as_secs_f64()
        );
        Ok(KubeNode {
            docker,
            bpffs,
            node,
            ns: hosts.ns(i),
        })
    }

    /// The init containers that use our image, in order, each to completion.
    fn run_init_containers(&self, manifest: &Manifest) -> Result<()> {
        let ours = kubelet::translate(manifest, &self.node, &main_container(manifest)?)?.image;
        for name in kubelet::container_names(manifest, "initContainers")? {
            let run = kubelet::translate(manifest, &self.node, &name)?;
            if run.image != ours {
                eprintln!(
                    "{}: init container {name} skipped: its image {} is not ours (no registry)",
                    self.node.name, run.image
                );
                continue;
            }
            let mut args = vec!["run", "--rm"];
            args.extend(run.args.iter().map(String::as_str));
            let out = self
                .docker
                .docker(&args)
                .with_context(|| format!("init container {name}"))?;
            eprintln!(
                "{}: init container {name}: done {}",
                self.node.name,
                out.trim()
            );
        }
        Ok(())
    }

    /// `docker run -d` of `args`; the container's name.
    fn run_detached(&self, args: &[String]) -> Result<()> {
        let mut full = vec!["run", "-d"];
        full.extend(args.iter().map(String::as_str));
        self.docker.docker(&full)?;
        Ok(())
    }

    /// Waits until the container's log holds `needle` `n` times and its
    /// readiness probe answers 200.
    fn wait_ready(&self, run: &Run, needle: &str, n: usize) -> Result<Duration> {
        let t0 = Instant::now();
        loop {
            let log = self.docker.logs(&run.name);
            if log.matches(needle).count() >= n && self.probe(run.readiness.as_deref()) {
                return Ok(t0.elapsed());
            }
            let state = self
                .docker
                .docker(&[
                    "inspect",
                    "-f",
                    "{{.State.Status}} {{.State.ExitCode}}",
                    &run.name,
                ])
                .unwrap_or_default();
            if state.starts_with("exited") || state.starts_with("dead") {
                bail!("{} {}: {state}\n{log}", self.node.name, run.name);
            }
            if t0.elapsed() > READY {
                bail!(
                    "{} {}: not ready ({needle:?} x{n}) within {READY:?}:\n{log}",
                    self.node.name,
                    run.name
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The probe, from the host's namespace, as the kubelet's prober would.
    fn probe(&self, url: Option<&str>) -> bool {
        let Some(url) = url else { return true };
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.ns,
            "curl",
            "-sf",
            "--max-time",
            "2",
            "-o",
            "/dev/null",
            url,
        ])
        .is_ok()
    }

    fn subnet_env(&self) -> PathBuf {
        self.node.host_path("/run/flannel").join("subnet.env")
    }

    /// `overlay-agent <the container's args> status` through `docker exec`.
    fn status(&self, run: &Run) -> Result<String> {
        let mut args = vec!["exec", run.name.as_str()];
        args.extend(run.argv.iter().map(String::as_str));
        args.push("status");
        self.docker.docker(&args)
    }
}

/// The pod's (only) container.
fn main_container(manifest: &Manifest) -> Result<String> {
    let names = kubelet::container_names(manifest, "containers")?;
    ensure!(names.len() == 1, "containers {names:?}");
    Ok(names[0].clone())
}

/// Hosts, etcd in host 1 and the image, the bindings dropping in reverse.
fn lab(tag: &str, n: usize) -> Result<(Hosts, Etcd, Image, PathBuf)> {
    // First: a missing image fails here, loudly, before anything is made.
    let image = image::built()?;
    let hosts = Hosts::new(tag, n)?;
    let etcd = hosts.etcd(1)?;
    let dir = etcd.dir().to_path_buf();
    Ok((hosts, etcd, image, dir))
}

#[test]
#[ignore = "needs root, network namespaces, etcd, eBPF, docker.io and the image: run `cargo xtask test`"]
fn daemonset_container_carries_pods_through_restart_and_upgrade() -> Result<()> {
    let manifest = Manifest::deploy(MANIFEST)?;
    let (hosts, etcd, image, dir) = lab("ct", 2)?;
    let host_dirs = HostDirs::note();
    let mut nodes = Vec::new();
    for i in 1..=2 {
        nodes.push(KubeNode::start(&hosts, i, &dir, &etcd, &manifest, &image)?);
    }
    let mut runs = Vec::new();
    for n in &nodes {
        n.run_init_containers(&manifest)?;
        let run = kubelet::translate(&manifest, &n.node, AGENT)?;
        eprintln!("{}: docker run -d {}", n.node.name, run.args.join(" "));
        n.run_detached(&run.args)?;
        runs.push(run);
    }
    // put-network-config put the ConfigMap's net-conf.json.
    let config = etcd
        .get(&format!("{PREFIX}/config"))?
        .context("no network config in etcd")?;
    ensure!(config.contains("10.244.0.0/16"), "{config}");
    for (n, run) in nodes.iter().zip(&runs) {
        let took = n.wait_ready(run, EBPF_RUNNING, 1)?;
        eprintln!("{}: ready in {:.1} s", n.node.name, took.as_secs_f64());
        let liveness = run.liveness.as_deref();
        ensure!(n.probe(liveness), "{}: liveness {liveness:?}", n.node.name);
        // The install-cni init container wrote the CNI config on the host.
        let conflist = n
            .node
            .host_path("/etc/cni/net.d")
            .join("10-flannel.conflist");
        ensure!(
            fs::read_to_string(&conflist)?.contains("\"type\": \"flannel\""),
            "{}",
            conflist.display()
        );
        // The datapath: flannel.1 in the host, the programs pinned on its bpffs.
        sh(&["ip", "-n", &n.ns, "link", "show", "flannel.1"])?;
        let pin = n.bpffs.0.join("overlay/links/vxlan_egress");
        ensure!(pin.exists(), "{} is missing", pin.display());
    }
    // Both leases in etcd, each with its node's address.
    let leases = etcd.etcdctl(&["get", "--prefix", &format!("{PREFIX}/subnets/")])?;
    for i in 1..=2 {
        ensure!(
            leases.contains(&format!("\"PublicIP\":\"{}\"", hosts.ip(i))),
            "no lease of host {i}:\n{leases}"
        );
    }

    // Pods (namespaces behind cni0), addressed from each node's subnet.env.
    let (c1, ip1) = add_container(&hosts, 1, &nodes[0].subnet_env())?;
    let mut pods = Containers(vec![c1.clone()]);
    let (c2, ip2) = add_container(&hosts, 2, &nodes[1].subnet_env())?;
    pods.0.push(c2.clone());
    pings_both_ways(&[(&c1, &ip2), (&c2, &ip1)].map(|(a, b)| (a.as_str(), b.as_str())))?;

    let status = nodes[0].status(&runs[0])?;
    eprintln!("overlay-agent status through docker exec on node1:\n{status}");
    let subnet1 = overlay_tests::agent::subnet_of(&nodes[0].subnet_env())?;
    let subnet2 = overlay_tests::agent::subnet_of(&nodes[1].subnet_env())?;
    ensure!(
        status.contains(&subnet1) && status.contains(&subnet2),
        "status names neither our lease {subnet1} nor the peer {subnet2}:\n{status}"
    );

    // A newer image, as a release would be: built on the loaded one, with a label.
    let n1 = &nodes[0];
    let newer = format!("{}-next", runs[0].image);
    let ctx = n1.node.root.join("newer-image");
    fs::create_dir_all(&ctx)?;
    fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {}\nLABEL io.overlay.test.release=\"next\"\n",
            runs[0].image
        ),
    )?;
    n1.docker
        .docker(&["build", "--quiet", "-t", &newer, &ctx.to_string_lossy()])?;

    // 100 pings/s from c1 to c2 across a restart and an upgrade of node1's agent.
    let pin = n1.bpffs.0.join("overlay/links/vxlan_egress");
    let prog_before = prog_of_link(&pin)?;
    let ping = Command::new("ip")
        .args([
            "netns", "exec", &c1, "ping", "-q", "-i", "0.01", "-W", "2", &ip2,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let ping = KillOnDrop(Some(ping));
    std::thread::sleep(Duration::from_secs(2));

    let t0 = Instant::now();
    n1.docker
        .docker(&["restart", "--time", "10", &runs[0].name])?;
    let took = n1.wait_ready(&runs[0], EBPF_RUNNING, 2)?;
    let log = n1.docker.logs(&runs[0].name);
    ensure!(
        log.contains("vxlan_egress: swapped into the pinned link"),
        "the restarted agent did not take over the pinned links:\n{log}"
    );
    let prog_restarted = prog_of_link(&pin)?;
    ensure!(
        prog_restarted != prog_before,
        "the pinned link still runs program {prog_before}"
    );
    eprintln!(
        "docker restart: ready again {:.1} s after the restart began",
        (t0.elapsed()).as_secs_f64().max(took.as_secs_f64())
    );
    std::thread::sleep(Duration::from_secs(2));

    let t1 = Instant::now();
    n1.docker.docker(&["rm", "-f", &runs[0].name])?;
    let mut upgraded_node = Node {
        name: n1.node.name.clone(),
        ip: n1.node.ip,
        root: n1.node.root.clone(),
        host_paths: n1.node.host_paths.clone(),
        secrets: n1.node.secrets.clone(),
        images: BTreeMap::new(),
        runtime_lacks: n1.node.runtime_lacks.clone(),
        api: None,
    };
    upgraded_node.images.insert(AGENT.to_owned(), newer.clone());
    let upgraded = kubelet::translate(&manifest, &upgraded_node, AGENT)?;
    n1.run_detached(&upgraded.args)?;
    n1.wait_ready(&upgraded, EBPF_RUNNING, 1)?;
    eprintln!(
        "docker rm -f + run of {newer}: ready in {:.1} s",
        t1.elapsed().as_secs_f64()
    );
    let label = n1.docker.docker(&[
        "inspect",
        "-f",
        "{{.Config.Image}} {{index .Config.Labels \"io.overlay.test.release\"}}",
        &upgraded.name,
    ])?;
    ensure!(label.trim() == format!("{newer} next"), "{label}");
    let log = n1.docker.logs(&upgraded.name);
    ensure!(
        log.contains("vxlan_egress: swapped into the pinned link"),
        "the upgraded agent did not take over the pinned links:\n{log}"
    );
    ensure!(prog_of_link(&pin)? != prog_restarted);
    std::thread::sleep(Duration::from_secs(2));

    let out = ping.interrupt()?;
    let (sent, received) = ping_summary(&out)?;
    eprintln!("ping -i 0.01 c1 -> c2 across restart and upgrade: {sent} sent, {received} received");
    ensure!(sent >= 300, "too few pings to mean anything:\n{out}");
    ensure!(
        received == sent,
        "{} of {sent} pings lost across docker restart and upgrade:\n{out}",
        sent - received
    );
    sh(&["ip", "netns", "exec", &c2, "ping", "-c3", "-W2", &ip1])?;

    drop(pods);
    for mut n in nodes {
        n.docker.stop()?;
    }
    host_dirs.remove()?;
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces, etcd, eBPF, docker.io and the image: run `cargo xtask test`"]
fn daemonset_capabilities_are_each_needed() -> Result<()> {
    let manifest = Manifest::deploy(MANIFEST)?;
    let (hosts, etcd, image, dir) = lab("cc", 1)?;
    let host_dirs = HostDirs::note();
    let mut n = KubeNode::start(&hosts, 1, &dir, &etcd, &manifest, &image)?;
    n.run_init_containers(&manifest)?;
    let run = kubelet::translate(&manifest, &n.node, AGENT)?;
    ensure!(!run.privileged, "the agent container is privileged");
    ensure!(!run.cap_add.is_empty(), "no capabilities added");
    let cleanup = |n: &KubeNode| -> Result<()> {
        n.docker.docker(&["rm", "-f", &run.name])?;
        // `overlay-agent cleanup` with the same spec, so each try starts
        // from a bare host.
        let mut args = vec!["run".to_owned(), "--rm".to_owned()];
        args.extend(
            run.args
                .iter()
                .map(|a| a.replace(&format!("--name={}", run.name), "--name=cleanup")),
        );
        args.push("cleanup".into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        n.docker.docker(&args).context("overlay-agent cleanup")?;
        Ok(())
    };

    // The manifest's set (what of it this runtime can grant) is enough.
    n.run_detached(&run.args)?;
    n.wait_ready(&run, EBPF_RUNNING, 1)?;
    eprintln!(
        "with {:?}: ready, eBPF datapath (not granted by this docker: {:?})",
        run.cap_add, run.not_granted
    );
    cleanup(&n)?;

    // Each one taken away: the agent does not get its eBPF datapath, either
    // exiting or falling back to the kernel's vxlan device.
    let mut works_without = Vec::new();
    for cap in &run.cap_add {
        n.run_detached(&run.without_cap(cap))?;
        let outcome = n.wait_ready(&run, "running: lease", 1);
        let log = n.docker.logs(&run.name);
        let lines: Vec<&str> = log.lines().collect();
        let why = lines
            .iter()
            .find(|l| l.contains("ERROR"))
            .or_else(|| {
                lines
                    .iter()
                    .find(|l| l.contains("falling back to the kernel datapath"))
            })
            .copied()
            .unwrap_or("(no error line)")
            .to_owned();
        match outcome {
            Ok(_) if log.contains(EBPF_RUNNING) => works_without.push(cap.clone()),
            Ok(_) => eprintln!("without {cap}: ready on the kernel datapath only: {why}"),
            Err(_) => eprintln!("without {cap}: not ready: {why}"),
        }
        cleanup(&n)?;
    }
    // NET_RAW, which kube-flannel adds and the runtimes grant by default,
    // taken away as well: not needed (the image's iptables is nft).
    let mut no_raw = run.args.clone();
    no_raw.insert(0, "--cap-drop=NET_RAW".into());
    n.run_detached(&no_raw)?;
    n.wait_ready(&run, EBPF_RUNNING, 1)
        .context("without NET_RAW, which the manifest does not add")?;
    eprintln!("without NET_RAW (a runtime default): ready, eBPF datapath");
    cleanup(&n)?;
    ensure!(
        works_without.is_empty(),
        "the agent is ready without {works_without:?}: the manifest asks for more than it needs"
    );
    n.docker.stop()?;
    drop(n);
    host_dirs.remove()?;
    Ok(())
}

/// The Kubernetes-mode manifest (`kube-flannel-overlay.yml`, flannel's
/// names) on two hosts against the API stand-in (TLS, a bearer token, on
/// host 1): each container gets the in-cluster configuration a kubelet
/// gives it (the service account's token and CA mounted, the API's address
/// in `KUBERNETES_SERVICE_HOST`/`_PORT`), finds its Node through its own
/// Pod (`POD_NAME`, `POD_NAMESPACE`), runs the eBPF datapath, publishes its
/// lease in the Node's annotations, and pods on the two hosts reach each
/// other.
#[test]
#[ignore = "needs root, network namespaces, eBPF, docker.io and the image: run `cargo xtask test`"]
fn kube_mode_daemonset_container_annotates_its_node_and_carries_pods() -> Result<()> {
    let manifest = Manifest::deploy("kube-flannel-overlay.yml")?;
    let image = image::built()?;
    let hosts = Hosts::new("ck", 2)?;
    // As on a node: a default route, which the manifest's agent (no
    // --iface) takes its interface from, as flanneld does.
    for i in 1..=2 {
        sh(&[
            "ip",
            "-n",
            &hosts.ns(i),
            "route",
            "add",
            "default",
            "dev",
            "eth0",
        ])?;
    }
    let api = KubeApi::start(KubeApiSpec {
        netns: Some(hosts.ns(1)),
        ip: Some(hosts.ip(1)),
        tls: true,
        token: Some(format!("token-{}", std::process::id())),
        ..KubeApiSpec::default()
    })?;
    let access = ApiAccess {
        host: api.addr().ip().to_string(),
        port: api.addr().port(),
        token: api.token().context("token")?.to_owned(),
        ca: api.ca_path().context("CA")?.to_owned(),
    };
    let dir = api.dir().join("nodes");
    let ds = manifest.daemonset()?;
    let namespace = ds["metadata"]["namespace"].as_str().context("namespace")?;
    let container = main_container(&manifest)?;
    let host_dirs = HostDirs::note();
    let mut nodes = Vec::new();
    let mut runs = Vec::new();
    for i in 1..=2 {
        let name = format!("node{i}");
        api.put_simple_node(&name, &format!("10.244.{i}.0/24"))?;
        let n = KubeNode::start_with(
            &hosts,
            i,
            &dir,
            BTreeMap::new(),
            Some(access.clone()),
            &manifest,
            &image,
        )?;
        // The DaemonSet controller's Pod on this node, which the agent reads.
        api.put_pod(namespace, &n.node.pod_name(&manifest)?, &name)?;
        n.run_init_containers(&manifest)?;
        let run = kubelet::translate(&manifest, &n.node, &container)?;
        n.run_detached(&run.args)?;
        nodes.push(n);
        runs.push(run);
    }
    for (i, (n, run)) in nodes.iter().zip(&runs).enumerate() {
        let took = n.wait_ready(run, EBPF_RUNNING, 1)?;
        eprintln!("{}: ready in {:.1} s", n.node.name, took.as_secs_f64());
        let node = api.node(&n.node.name).context("Node")?;
        let public_ip = &node["metadata"]["annotations"]["flannel.alpha.coreos.com/public-ip"];
        ensure!(
            public_ip == hosts.ip(i + 1).as_str(),
            "{}: public-ip annotation {public_ip:?}:\n{}",
            n.node.name,
            n.docker.logs(&run.name)
        );
    }
    let (c1, ip1) = add_container(&hosts, 1, &nodes[0].subnet_env())?;
    let mut pods = Containers(vec![c1.clone()]);
    let (c2, ip2) = add_container(&hosts, 2, &nodes[1].subnet_env())?;
    pods.0.push(c2.clone());
    ensure!(
        ip1.starts_with("10.244.1.") && ip2.starts_with("10.244.2."),
        "{ip1} {ip2}"
    );
    pings_both_ways(&[(&c1, &ip2), (&c2, &ip1)].map(|(a, b)| (a.as_str(), b.as_str())))?;
    let status = nodes[1].status(&runs[1])?;
    ensure!(
        status.contains("10.244.2.0/24") && status.contains("10.244.1.0/24"),
        "{status}"
    );
    drop(pods);
    for mut n in nodes {
        n.docker.stop()?;
    }
    host_dirs.remove()?;
    Ok(())
}

/// The program id a pinned link runs (bpftool).
fn prog_of_link(pin: &Path) -> Result<u64> {
    let out = sh(&[
        "bpftool",
        "-j",
        "link",
        "show",
        "pinned",
        &pin.to_string_lossy(),
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v["prog_id"]
        .as_u64()
        .with_context(|| format!("no prog_id in {out}"))
}

/// A background ping: SIGINT makes it print its summary; killed on drop.
struct KillOnDrop(Option<std::process::Child>);

impl KillOnDrop {
    fn interrupt(mut self) -> Result<String> {
        let child = self.0.take().context("ping already taken")?;
        // SAFETY: kill(2) on our child (ip netns exec execs ping), not yet reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        let out = child.wait_with_output()?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
