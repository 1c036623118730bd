//! The Kubernetes-mode DaemonSet, `deploy/kubernetes/kube-flannel-overlay.yml`,
//! against flannel's own kube-flannel.yml (v0.28.9, kept verbatim in
//! `tests/fixtures/`): the same namespace, ServiceAccount, RBAC rules,
//! ConfigMap, DaemonSet identity, scheduling, arguments, environment,
//! probes and volumes, plus what eBPF needs, kept as the etcd-mode manifest
//! (`kube-overlay.yml`, checked in `deploy.rs`) has it. Also: the arguments
//! and net-conf.json go through the agent's own parsers, the conflist is the
//! one `overlay_tests::cni` builds pods from, the install-cni script is run,
//! and the whole file is validated against Kubernetes 1.32's schemas.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Context, Result, ensure};
use serde_yaml::Value;

const OURS: &str = "deploy/kubernetes/kube-flannel-overlay.yml";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn docs(path: &str) -> Result<Vec<Value>> {
    let p = root().join(path);
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = <Value as serde::Deserialize>::deserialize(doc)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

fn ours() -> Result<Vec<Value>> {
    docs(OURS)
}

fn flannels() -> Result<Vec<Value>> {
    docs("tests/fixtures/kube-flannel-v0.28.9.yml")
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Result<&'a Value> {
    let mut it = docs.iter().filter(|d| d["kind"] == kind);
    let one = it.next().with_context(|| format!("no {kind}"))?;
    ensure!(it.next().is_none(), "more than one {kind}");
    Ok(one)
}

fn named<'a>(list: &'a Value, name: &str) -> Result<&'a Value> {
    list.as_sequence()
        .and_then(|s| s.iter().find(|c| c["name"] == name))
        .with_context(|| format!("no {name:?} in {list:?}"))
}

fn strs(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn pod_spec(docs: &[Value]) -> Result<&Value> {
    Ok(&kind(docs, "DaemonSet")?["spec"]["template"]["spec"])
}

/// The agent's container: flannel's name, so `kubectl logs -c kube-flannel`
/// and the like keep working.
fn agent(docs: &[Value]) -> Result<&Value> {
    named(&pod_spec(docs)?["containers"], "kube-flannel")
}

/// Every entry of flannel's list is in ours, unchanged.
fn contains_all(ours: &Value, flannels: &Value, what: &str) -> Result<()> {
    let ours = ours
        .as_sequence()
        .with_context(|| format!("{what}: none"))?;
    for f in flannels.as_sequence().context(what.to_owned())? {
        ensure!(
            ours.contains(f),
            "{what}: flannel's {f:?} is missing or differs"
        );
    }
    Ok(())
}

#[test]
fn namespace_account_rbac_and_configmap_are_flannels() -> Result<()> {
    let (ours, theirs) = (ours()?, flannels()?);
    for k in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
    ] {
        ensure!(
            kind(&ours, k)? == kind(&theirs, k)?,
            "{k} differs from kube-flannel.yml's:\n{:?}",
            kind(&ours, k)?
        );
    }
    // Spelled out as well, so a change to the fixture cannot widen them
    // unnoticed: pods get; nodes get/list/watch; nodes/status patch.
    let rules: Vec<(Vec<String>, Vec<String>, Vec<String>)> = kind(&ours, "ClusterRole")?["rules"]
        .as_sequence()
        .context("rules")?
        .iter()
        .map(|r| {
            (
                strs(&r["apiGroups"]),
                strs(&r["resources"]),
                strs(&r["verbs"]),
            )
        })
        .collect();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    ensure!(
        rules
            == vec![
                (s(&[""]), s(&["pods"]), s(&["get"])),
                (s(&[""]), s(&["nodes"]), s(&["get", "list", "watch"])),
                (s(&[""]), s(&["nodes/status"]), s(&["patch"])),
            ],
        "{rules:?}"
    );
    let crb = kind(&ours, "ClusterRoleBinding")?;
    ensure!(crb["roleRef"]["name"] == "flannel");
    ensure!(
        crb["subjects"][0]["name"] == "flannel"
            && crb["subjects"][0]["namespace"] == "kube-flannel"
    );
    ensure!(pod_spec(&ours)?["serviceAccountName"] == "flannel");
    Ok(())
}

#[test]
fn configmap_parses_with_the_agent_and_is_the_conflist_pods_are_made_from() -> Result<()> {
    let docs = ours()?;
    let cm = kind(&docs, "ConfigMap")?;
    let net = cm["data"]["net-conf.json"]
        .as_str()
        .context("net-conf.json")?;
    let config = overlay_agent::flannel::config::NetworkConfig::parse_kube(net.as_bytes())
        .map_err(|e| anyhow::anyhow!("net-conf.json: {e}"))?;
    ensure!(config.network.to_string() == "10.244.0.0/16");
    ensure!(
        config.backend == overlay_agent::flannel::config::VxlanConfig::default(),
        "{:?}",
        config.backend
    );
    ensure!(!config.enable_nftables);
    let cni: serde_json::Value = serde_json::from_str(
        cm["data"]["cni-conf.json"]
            .as_str()
            .context("cni-conf.json")?,
    )?;
    let pods: serde_json::Value = serde_json::from_str(overlay_tests::cni::KUBE_FLANNEL_CNI_CONF)?;
    ensure!(
        cni == pods,
        "cni-conf.json is not the conflist tests make pods from:\n{cni}"
    );
    Ok(())
}

#[test]
fn daemonset_keeps_flannels_identity_scheduling_args_env_probes_and_volumes() -> Result<()> {
    let (ours, theirs) = (ours()?, flannels()?);
    let (ds, fds) = (kind(&ours, "DaemonSet")?, kind(&theirs, "DaemonSet")?);
    ensure!(ds["metadata"] == fds["metadata"], "{:?}", ds["metadata"]);
    ensure!(ds["spec"]["selector"] == fds["spec"]["selector"]);
    ensure!(ds["spec"]["template"]["metadata"] == fds["spec"]["template"]["metadata"]);
    let (pod, fpod) = (pod_spec(&ours)?, pod_spec(&theirs)?);
    for k in [
        "affinity",
        "hostNetwork",
        "priorityClassName",
        "tolerations",
        "serviceAccountName",
    ] {
        ensure!(
            pod[k] == fpod[k],
            "{k}: {:?} vs flannel's {:?}",
            pod[k],
            fpod[k]
        );
    }
    // flannel's CNI plugin, installed exactly as flannel installs it.
    ensure!(
        named(&pod["initContainers"], "install-cni-plugin")?
            == named(&fpod["initContainers"], "install-cni-plugin")?
    );
    let (c, fc) = (agent(&ours)?, agent(&theirs)?);
    ensure!(strs(&c["command"]) == ["/opt/bin/overlay-agent"]);
    for k in [
        "args",
        "ports",
        "livenessProbe",
        "readinessProbe",
        "resources",
    ] {
        ensure!(c[k] == fc[k], "{k}: {:?} vs flannel's {:?}", c[k], fc[k]);
    }
    contains_all(&c["env"], &fc["env"], "env")?;
    contains_all(&c["volumeMounts"], &fc["volumeMounts"], "volumeMounts")?;
    contains_all(&pod["volumes"], &fpod["volumes"], "volumes")?;
    // The image is the agent's, the one the etcd-mode manifest runs.
    let etcd = docs("deploy/kubernetes/kube-overlay.yml")?;
    let etcd_agent = named(&pod_spec(&etcd)?["containers"], "overlay-agent")?;
    ensure!(c["image"] == etcd_agent["image"], "{:?}", c["image"]);
    Ok(())
}

#[test]
fn daemonset_has_what_ebpf_needs_as_the_etcd_manifest_has_it() -> Result<()> {
    let ours = ours()?;
    let etcd = docs("deploy/kubernetes/kube-overlay.yml")?;
    let pod = pod_spec(&ours)?;
    let c = agent(&ours)?;
    let etcd_agent = named(&pod_spec(&etcd)?["containers"], "overlay-agent")?;
    // The same least privilege: not privileged, the same added capabilities.
    ensure!(c["securityContext"]["privileged"] == false);
    let mut caps = strs(&c["securityContext"]["capabilities"]["add"]);
    let mut etcd_caps = strs(&etcd_agent["securityContext"]["capabilities"]["add"]);
    caps.sort();
    etcd_caps.sort();
    ensure!(
        caps == etcd_caps,
        "{caps:?} vs the etcd manifest's {etcd_caps:?}"
    );
    for cap in ["NET_ADMIN", "BPF", "PERFMON", "SYS_ADMIN"] {
        ensure!(caps.iter().any(|c| c == cap), "{cap} missing: {caps:?}");
    }
    // The fast path's sysctl, set by the same privileged init container.
    ensure!(
        named(&pod["initContainers"], "conntrack-liberal")?
            == named(&pod_spec(&etcd)?["initContainers"], "conntrack-liberal")?
    );

    // Each mount resolves to the host path (or ConfigMap) it must be.
    let volumes: BTreeMap<String, &Value> = pod["volumes"]
        .as_sequence()
        .context("volumes")?
        .iter()
        .map(|v| (v["name"].as_str().unwrap_or("").to_owned(), v))
        .collect();
    let mount = |container: &Value, path: &str| -> Result<(Value, Value)> {
        let m = container["volumeMounts"]
            .as_sequence()
            .and_then(|ms| ms.iter().find(|m| m["mountPath"] == path))
            .with_context(|| format!("nothing mounted at {path}"))?;
        let v = volumes
            .get(m["name"].as_str().context("mount name")?)
            .with_context(|| format!("no volume for {path}"))?;
        Ok((m.clone(), (*v).clone()))
    };
    for (path, host, ty) in [
        ("/run/flannel", "/run/flannel", None),
        (
            "/run/xtables.lock",
            "/run/xtables.lock",
            Some("FileOrCreate"),
        ),
        ("/sys/fs/bpf", "/sys/fs/bpf", Some("DirectoryOrCreate")),
        ("/lib/modules", "/lib/modules", None),
    ] {
        let (_, v) = mount(c, path)?;
        ensure!(v["hostPath"]["path"] == host, "{path}: {v:?}");
        ensure!(
            v["hostPath"]["type"].as_str() == ty,
            "{path}: type {:?}",
            v["hostPath"]["type"]
        );
    }
    let (bpf, _) = mount(c, "/sys/fs/bpf")?;
    ensure!(bpf["mountPropagation"] == "HostToContainer", "{bpf:?}");
    let (modules, _) = mount(c, "/lib/modules")?;
    ensure!(modules["readOnly"] == true, "{modules:?}");
    let (_, cfg) = mount(c, "/etc/kube-flannel/")?;
    ensure!(cfg["configMap"]["name"] == "kube-flannel-cfg", "{cfg:?}");
    // The etcd manifest's eBPF mounts are all here, at the same host paths.
    for (path, _) in [("/sys/fs/bpf", ()), ("/lib/modules", ())] {
        let theirs = etcd_agent["volumeMounts"]
            .as_sequence()
            .and_then(|ms| ms.iter().find(|m| m["mountPath"] == path))
            .with_context(|| format!("the etcd manifest mounts no {path}"))?;
        let (m, _) = mount(c, path)?;
        ensure!(
            m["readOnly"] == theirs["readOnly"]
                && m["mountPropagation"] == theirs["mountPropagation"],
            "{path}: {m:?} vs {theirs:?}"
        );
    }
    let install = named(&pod["initContainers"], "install-cni")?;
    let (_, netd) = mount(install, "/etc/cni/net.d")?;
    ensure!(netd["hostPath"]["path"] == "/etc/cni/net.d");
    let (_, src) = mount(install, "/etc/kube-flannel/")?;
    ensure!(src["configMap"]["name"] == "kube-flannel-cfg");
    let plugin = named(&pod["initContainers"], "install-cni-plugin")?;
    let (_, bin) = mount(plugin, "/opt/cni/bin")?;
    ensure!(bin["hostPath"]["path"] == "/opt/cni/bin");
    // Pins must live on the host's bpffs for hitless pod replacement: no
    // --bpf-pin-dir elsewhere, so the agent's default, under the mount.
    let args = strs(&c["args"]);
    ensure!(!args.iter().any(|a| a.contains("bpf-pin-dir")), "{args:?}");
    ensure!(
        overlay_agent::datapath::pins::DEFAULT_PIN_DIR.starts_with("/sys/fs/bpf/"),
        "the agent's default pin dir moved off the mounted bpffs"
    );
    Ok(())
}

/// flanneld's flags (v0.28.9 `main.go`, doc flannel-reference.md), without
/// the dashes.
const FLANNELD_FLAGS: &[&str] = &[
    "etcd-endpoints",
    "etcd-prefix",
    "etcd-keyfile",
    "etcd-certfile",
    "etcd-cafile",
    "etcd-username",
    "etcd-password",
    "kube-subnet-mgr",
    "kube-api-url",
    "kubeconfig-file",
    "kube-annotation-prefix",
    "net-config-path",
    "set-node-network-unavailable",
    "iface",
    "iface-regex",
    "iface-can-reach",
    "public-ip",
    "public-ipv6",
    "ip-masq",
    "ip-masq-fully-random-disable",
    "iptables-resync",
    "iptables-forward-rules",
    "ip-blackhole-route",
    "subnet-file",
    "subnet-lease-renew-margin",
    "healthz-ip",
    "healthz-port",
    "version",
];

#[test]
fn args_are_flanneld_flags_the_agent_parses_and_the_probes_hit_its_port() -> Result<()> {
    let docs = ours()?;
    let c = agent(&docs)?;
    let args = strs(&c["args"]);
    for a in &args {
        let flag = a
            .trim_start_matches('-')
            .split('=')
            .next()
            .unwrap_or_default();
        ensure!(FLANNELD_FLAGS.contains(&flag), "{a} is no flanneld flag");
    }
    let mut argv = vec!["overlay-agent".to_owned()];
    argv.extend(args.iter().cloned());
    let cli = overlay_agent::cli::Cli::parse_from_go(&argv).map_err(|e| anyhow::anyhow!("{e}"))?;
    cli.validate()
        .map_err(|e| anyhow::anyhow!("the agent refuses {args:?}: {e}"))?;
    ensure!(cli.kube_subnet_mgr, "--kube-subnet-mgr");
    ensure!(cli.ip_masq, "--ip-masq");
    // Health on all addresses (the default, as flanneld's), on the port the
    // probes use through the named container port.
    ensure!(cli.healthz_ip.is_unspecified());
    let port = c["ports"]
        .as_sequence()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "healthz"))
        .context("no healthz port")?;
    ensure!(port["containerPort"].as_u64() == Some(u64::from(cli.healthz_port)));
    ensure!(cli.healthz_port == 8081);
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        ensure!(c[probe]["httpGet"]["path"] == path, "{probe}");
        ensure!(c[probe]["httpGet"]["port"] == "healthz", "{probe}");
    }
    // The environment flanneld reads in kube mode: the node name through
    // the Pod, the queue depth, the cache behaviour. Only FLANNELD_* (and
    // RUST_LOG) besides.
    let env: BTreeMap<String, Value> = c["env"]
        .as_sequence()
        .context("env")?
        .iter()
        .map(|e| (e["name"].as_str().unwrap_or("").to_owned(), e.clone()))
        .collect();
    ensure!(env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name");
    ensure!(env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace");
    ensure!(env["EVENT_QUEUE_DEPTH"]["value"] == "5000");
    ensure!(env["CONT_WHEN_CACHE_NOT_READY"]["value"] == "false");
    for name in env.keys() {
        ensure!(
            [
                "POD_NAME",
                "POD_NAMESPACE",
                "EVENT_QUEUE_DEPTH",
                "CONT_WHEN_CACHE_NOT_READY",
                "RUST_LOG"
            ]
            .contains(&name.as_str())
                || name.starts_with("FLANNELD_"),
            "unexpected env {name}"
        );
    }
    Ok(())
}

/// The install-cni init container's script, run for real (paths moved into
/// a scratch directory): the conflist lands complete under its final name,
/// over an older one too, with no temporary file left.
#[test]
fn install_cni_script_installs_the_conflist_atomically() -> Result<()> {
    let docs = ours()?;
    let pod = pod_spec(&docs)?;
    let init = named(&pod["initContainers"], "install-cni")?;
    let command = strs(&init["command"]);
    ensure!(command[..2] == ["sh", "-c"], "{command:?}");
    let script = command.last().context("script")?;
    ensure!(script.contains(".10-flannel.conflist.tmp") && script.contains("mv "));
    let cm = kind(&docs, "ConfigMap")?;
    let conf = cm["data"]["cni-conf.json"].as_str().context("cni-conf")?;

    let dir = std::env::temp_dir().join(format!("overlay-install-cni-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (cfg, netd) = (dir.join("kube-flannel"), dir.join("net.d"));
    std::fs::create_dir_all(&cfg)?;
    std::fs::create_dir_all(&netd)?;
    let result = (|| -> Result<()> {
        std::fs::write(cfg.join("cni-conf.json"), conf)?;
        let script = script
            .replace("/etc/kube-flannel/", &format!("{}/", cfg.display()))
            .replace("/etc/cni/net.d/", &format!("{}/", netd.display()));
        let target = netd.join("10-flannel.conflist");
        for previous in [None, Some("{\"old\": true}")] {
            if let Some(p) = previous {
                std::fs::write(&target, p)?;
            }
            let out = std::process::Command::new("sh")
                .args(["-c", &script])
                .output()?;
            ensure!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            ensure!(std::fs::read_to_string(&target)? == conf);
            let names: Vec<String> = std::fs::read_dir(&netd)?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<Result<_, _>>()?;
            ensure!(names == ["10-flannel.conflist"], "{names:?}");
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Schema validation against Kubernetes 1.32 (the machine's kubectl), offline.
/// kubectl itself cannot: `kubectl apply|create --dry-run=client` needs the
/// API server's discovery and `/openapi/v2` (or v3) to validate, and
/// `kubectl annotate --local` reads the file without any schema (it accepts
/// `kind: Bogus` and `hostNetwork: "yes"`). `kubernetes-validate` (PyPI)
/// ships the API's JSON schemas per release; `--strict` also rejects
/// unknown fields.
#[test]
#[ignore = "needs kubernetes-validate (installed by cargo xtask setup): run `cargo xtask test`"]
fn kubernetes_validate_accepts_the_manifest_against_the_1_32_schemas() -> Result<()> {
    let file = root().join(OURS);
    // Debian's Python, where `cargo xtask setup` installs it (a pyenv first
    // on PATH would not have it).
    let out = std::process::Command::new("/usr/bin/python3")
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--kubernetes-version",
            "1.32.0",
        ])
        .arg(&file)
        .output()
        .context("running kubernetes-validate (cargo xtask setup installs it)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "{stdout}{stderr}");
    // One "passed" per object: none was skipped for want of a schema.
    let passed = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| l.contains(" passed for resource "))
        .count();
    ensure!(passed == ours()?.len(), "{stdout}{stderr}");
    Ok(())
}
