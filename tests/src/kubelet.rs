//! What a kubelet does with our DaemonSet, done with `docker run`: the pod
//! template of a manifest in `deploy/kubernetes/` translated field by field
//! (command and args with `$(VAR)` expanded, env from values, fields,
//! Secrets and ConfigMaps, privileged and capabilities, host network,
//! hostPath and ConfigMap volumes with their read-only and propagation
//! settings), so the tests run the manifest's own container spec and not a
//! copy written by hand. A field this translation does not know fails it:
//! nothing in the spec is silently dropped.
//!
//! Where a kubelet's defaults matter, the translation makes them explicit:
//! seccomp `Unconfined` (the kubelet's default without `--seccomp-default`;
//! docker's own default profile would refuse `bpf(2)` without SYS_ADMIN),
//! the container runtime's default capability set (docker's and
//! containerd's are the same list) plus `add`, minus `drop`. The host
//! network is that of the namespace the test's dockerd runs in
//! (`--network host`). Host paths are mapped by the [`Node`]: the host's own
//! where sharing is the point (the xtables lock, /lib/modules), a real bpffs
//! of the test's for /sys/fs/bpf, a per-test directory for the rest.

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail, ensure};
use serde_yaml::Value;

/// The documents of one manifest file.
pub struct Manifest {
    pub path: PathBuf,
    docs: Vec<Value>,
}

impl Manifest {
    /// `deploy/kubernetes/<name>`.
    pub fn deploy(name: &str) -> Result<Manifest> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/kubernetes")
            .join(name);
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut docs = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = <Value as serde::Deserialize>::deserialize(doc)?;
            if !v.is_null() {
                docs.push(v);
            }
        }
        Ok(Manifest { path, docs })
    }

    /// The first object of `kind` (named `name`, if given).
    pub fn object(&self, kind: &str, name: Option<&str>) -> Result<&Value> {
        self.docs
            .iter()
            .find(|d| d["kind"] == kind && name.is_none_or(|n| d["metadata"]["name"] == n))
            .with_context(|| format!("no {kind} {name:?} in {}", self.path.display()))
    }

    pub fn daemonset(&self) -> Result<&Value> {
        self.object("DaemonSet", None)
    }

    /// The DaemonSet's pod template spec.
    pub fn pod_spec(&self) -> Result<&Value> {
        Ok(&self.daemonset()?["spec"]["template"]["spec"])
    }

    /// A container (or init container) of the pod template, by name.
    pub fn container(&self, name: &str) -> Result<&Value> {
        let spec = self.pod_spec()?;
        ["containers", "initContainers"]
            .iter()
            .filter_map(|k| spec[*k].as_sequence())
            .flatten()
            .find(|c| c["name"] == name)
            .with_context(|| format!("no container {name} in {}", self.path.display()))
    }

    /// A key of a Secret (`stringData`, else base64 `data` is not supported:
    /// our manifests use stringData) or a ConfigMap (`data`).
    fn key_of(&self, kind: &str, name: &str, key: &str) -> Result<String> {
        let obj = self.object(kind, Some(name))?;
        let field = if kind == "Secret" {
            "stringData"
        } else {
            "data"
        };
        obj[field][key]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("{kind} {name} has no {field}.{key}"))
    }
}

/// The node a pod runs on, as the translation needs it.
pub struct Node {
    /// `spec.nodeName`.
    pub name: String,
    /// The node's address: `status.podIP` and `status.hostIP` of a
    /// host-network pod.
    pub ip: Ipv4Addr,
    /// Where this node's host paths live unless [`Node::host_paths`] says
    /// otherwise: `/run/flannel` is `<root>/run/flannel`.
    pub root: PathBuf,
    /// Host paths mapped elsewhere (e.g. `/sys/fs/bpf` to a bpffs of the
    /// test's, `/run/xtables.lock` to itself).
    pub host_paths: BTreeMap<String, PathBuf>,
    /// Secret keys as the operator set them before applying: `(secret, key)`
    /// to value; the manifest's own value otherwise.
    pub secrets: BTreeMap<(String, String), String>,
    /// Images as `kubectl set image` would set them: container name to image.
    pub images: BTreeMap<String, String>,
    /// Capabilities the container runtime cannot grant (docker 20.10 knows
    /// neither BPF nor PERFMON): left out of `--cap-add` and listed in
    /// [`Run::not_granted`], so a test can say what it did not run.
    pub runtime_lacks: Vec<String>,
    /// The API server a pod with a service account reaches (kube mode):
    /// the kubelet mounts the account's token and CA at
    /// `/var/run/secrets/kubernetes.io/serviceaccount` and sets
    /// `KUBERNETES_SERVICE_HOST`/`_PORT`, what in-cluster clients read.
    /// `None`: no token is mounted (the etcd-mode agent uses none).
    pub api: Option<ApiAccess>,
}

/// What a pod's in-cluster configuration is made of.
#[derive(Clone, Debug)]
pub struct ApiAccess {
    pub host: String,
    pub port: u16,
    pub token: String,
    pub ca: PathBuf,
}

impl Node {
    /// Where host path `p` is on this machine.
    pub fn host_path(&self, p: &str) -> PathBuf {
        match self.host_paths.get(p) {
            Some(mapped) => mapped.clone(),
            None => self.root.join(p.trim_start_matches('/')),
        }
    }

    /// The pod's name (`<daemonset>-<node>`, as a kubelet's pods are unique per node).
    pub fn pod_name(&self, manifest: &Manifest) -> Result<String> {
        let ds = manifest.daemonset()?;
        let n = ds["metadata"]["name"].as_str().context("DaemonSet name")?;
        Ok(format!("{n}-{}", self.name))
    }
}

/// One container of the pod, translated.
#[derive(Debug, Clone)]
pub struct Run {
    /// The docker container's name: `k8s_<container>_<pod>`, as dockershim named them.
    pub name: String,
    pub image: String,
    /// `docker run` arguments after `run` (without `-d`/`--rm`): options,
    /// the image, then the command's remaining words and the args.
    pub args: Vec<String>,
    /// The container's command and args with `$(VAR)` expanded (what
    /// `docker exec` of the same program should repeat).
    pub argv: Vec<String>,
    /// The capabilities it gets on top of the runtime's defaults.
    pub cap_add: Vec<String>,
    /// Capabilities the spec adds that the runtime cannot grant.
    pub not_granted: Vec<String>,
    pub privileged: bool,
    /// `http://<ip>:<port><path>` of its readiness and liveness probes.
    pub readiness: Option<String>,
    pub liveness: Option<String>,
}

impl Run {
    /// The `docker run` arguments with capability `cap` taken away: out of
    /// `--cap-add`, and dropped from the runtime's defaults too (`NET_RAW`
    /// is one of them).
    pub fn without_cap(&self, cap: &str) -> Vec<String> {
        let add = format!("--cap-add={cap}");
        let mut args: Vec<String> = self.args.iter().filter(|a| **a != add).cloned().collect();
        args.insert(0, format!("--cap-drop={cap}"));
        args
    }
}

/// Keys of a container this translation handles. `resources` requests only
/// schedule (a kubelet sets cgroup shares from them; nothing the agent sees).
const CONTAINER_KEYS: &[&str] = &[
    "name",
    "image",
    "command",
    "args",
    "env",
    "resources",
    "securityContext",
    "livenessProbe",
    "readinessProbe",
    "volumeMounts",
    "ports",
];
/// Keys of the pod spec: scheduling only, or handled.
const POD_KEYS: &[&str] = &[
    "affinity",
    "hostNetwork",
    "priorityClassName",
    "serviceAccountName",
    "terminationGracePeriodSeconds",
    "tolerations",
    "initContainers",
    "containers",
    "volumes",
];

/// Translates container `name` of the manifest's pod template for `node`.
/// Creates the host paths (`DirectoryOrCreate`, `FileOrCreate`, and the
/// directory of an untyped one, as the runtime does) and writes ConfigMap
/// volumes under the node's root.
pub fn translate(manifest: &Manifest, node: &Node, name: &str) -> Result<Run> {
    let pod = manifest.pod_spec()?;
    for k in pod.as_mapping().context("pod spec")?.keys() {
        let k = k.as_str().unwrap_or_default();
        ensure!(
            POD_KEYS.contains(&k),
            "pod spec field {k} is not translated"
        );
    }
    let c = manifest.container(name)?;
    for k in c.as_mapping().context("container")?.keys() {
        let k = k.as_str().unwrap_or_default();
        ensure!(
            CONTAINER_KEYS.contains(&k),
            "container {name}: field {k} is not translated"
        );
    }
    let pod_name = node.pod_name(manifest)?;
    let namespace = manifest.daemonset()?["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_owned();
    let image = node
        .images
        .get(name)
        .cloned()
        .or_else(|| c["image"].as_str().map(str::to_owned))
        .context("image")?;
    let docker_name = format!("k8s_{name}_{pod_name}");
    let mut args = vec![format!("--name={docker_name}")];
    if pod["hostNetwork"] == true {
        args.push("--network=host".into());
    }
    // The kubelet's seccomp default (Unconfined) made explicit.
    args.push("--security-opt=seccomp=unconfined".into());

    // Environment, in order, each value expanded against the ones before.
    let mut env: Vec<(String, String)> = Vec::new();
    for e in c["env"].as_sequence().into_iter().flatten() {
        let key = e["name"].as_str().context("env name")?.to_owned();
        let value = if let Some(v) = e["value"].as_str() {
            expand(v, &env)
        } else if let Some(f) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            match f {
                "metadata.name" => pod_name.clone(),
                "metadata.namespace" => namespace.clone(),
                "spec.nodeName" => node.name.clone(),
                "status.podIP" | "status.hostIP" => node.ip.to_string(),
                other => bail!("env {key}: fieldRef {other} is not translated"),
            }
        } else if let Some(r) = e["valueFrom"]["secretKeyRef"].as_mapping() {
            let (s, k) = (
                r.get("name")
                    .and_then(Value::as_str)
                    .context("secretKeyRef name")?,
                r.get("key")
                    .and_then(Value::as_str)
                    .context("secretKeyRef key")?,
            );
            match node.secrets.get(&(s.to_owned(), k.to_owned())) {
                Some(v) => v.clone(),
                None => manifest.key_of("Secret", s, k)?,
            }
        } else if let Some(r) = e["valueFrom"]["configMapKeyRef"].as_mapping() {
            let (m, k) = (
                r.get("name")
                    .and_then(Value::as_str)
                    .context("configMapKeyRef name")?,
                r.get("key")
                    .and_then(Value::as_str)
                    .context("configMapKeyRef key")?,
            );
            manifest.key_of("ConfigMap", m, k)?
        } else {
            bail!("env {key}: {e:?} is not translated");
        };
        env.push((key, value));
    }
    // The service account's token, as the kubelet projects it.
    if let (Some(sa), Some(api)) = (pod["serviceAccountName"].as_str(), &node.api) {
        let dir = node.root.join("serviceaccount").join(&pod_name);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("token"), &api.token)?;
        fs::copy(&api.ca, dir.join("ca.crt"))
            .with_context(|| format!("the API's CA {} (account {sa})", api.ca.display()))?;
        fs::write(dir.join("namespace"), &namespace)?;
        args.push(format!(
            "--mount=type=bind,source={},target=/var/run/secrets/kubernetes.io/serviceaccount,readonly",
            dir.display()
        ));
        env.insert(0, ("KUBERNETES_SERVICE_HOST".into(), api.host.clone()));
        env.insert(1, ("KUBERNETES_SERVICE_PORT".into(), api.port.to_string()));
    }
    for (k, v) in &env {
        args.push(format!("--env={k}={v}"));
    }

    // Privileges.
    let sc = &c["securityContext"];
    let privileged = sc["privileged"] == true;
    if privileged {
        args.extend(privileged_flags(&node.runtime_lacks)?);
    }
    let (cap_add, not_granted): (Vec<String>, Vec<String>) = strs(&sc["capabilities"]["add"])
        .into_iter()
        .partition(|c| !node.runtime_lacks.contains(c));
    for cap in &cap_add {
        args.push(format!("--cap-add={cap}"));
    }
    for cap in strs(&sc["capabilities"]["drop"]) {
        args.push(format!("--cap-drop={cap}"));
    }
    if let Some(m) = sc.as_mapping() {
        for k in m.keys() {
            let k = k.as_str().unwrap_or_default();
            ensure!(
                ["privileged", "capabilities"].contains(&k),
                "container {name}: securityContext.{k} is not translated"
            );
        }
    }

    // Volumes.
    let volumes: BTreeMap<String, &Value> = pod["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|v| Some((v["name"].as_str()?.to_owned(), v)))
        .collect();
    for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
        let vname = m["name"].as_str().context("volumeMount name")?;
        let target = m["mountPath"].as_str().context("mountPath")?;
        let vol = volumes
            .get(vname)
            .with_context(|| format!("volume {vname} is not in the pod spec"))?;
        let source = if let Some(hp) = vol["hostPath"].as_mapping() {
            let path = hp
                .get("path")
                .and_then(Value::as_str)
                .context("hostPath path")?;
            let ty = hp.get("type").and_then(Value::as_str).unwrap_or("");
            let source = node.host_path(path);
            match ty {
                "FileOrCreate" => {
                    if !source.exists() {
                        if let Some(parent) = source.parent() {
                            fs::create_dir_all(parent)?;
                        }
                        fs::write(&source, "")?;
                    }
                }
                "DirectoryOrCreate" | "" => {
                    if !source.exists() {
                        fs::create_dir_all(&source)?;
                    }
                }
                "Directory" | "File" => ensure!(source.exists(), "{} is missing", source.display()),
                other => bail!("hostPath type {other} is not translated"),
            }
            source
        } else if let Some(cm) = vol["configMap"]["name"].as_str() {
            // The kubelet writes the ConfigMap's keys as files, read-only.
            let dir = node.root.join("configmaps").join(&pod_name).join(vname);
            fs::create_dir_all(&dir)?;
            let data = manifest.object("ConfigMap", Some(cm))?["data"]
                .as_mapping()
                .context("ConfigMap data")?;
            for (k, v) in data {
                fs::write(
                    dir.join(k.as_str().context("key")?),
                    v.as_str().context("value")?,
                )?;
            }
            dir
        } else {
            bail!("volume {vname}: only hostPath and configMap are translated");
        };
        let mut mount = format!(
            "--mount=type=bind,source={},target={target}",
            source.display()
        );
        if m["readOnly"] == true || vol["configMap"].is_mapping() {
            mount.push_str(",readonly");
        }
        match m["mountPropagation"].as_str() {
            None | Some("None") => {}
            Some("HostToContainer") => mount.push_str(",bind-propagation=rslave"),
            Some("Bidirectional") => mount.push_str(",bind-propagation=rshared"),
            Some(other) => bail!("mountPropagation {other} is not translated"),
        }
        args.push(mount);
    }

    // Command and args: `command` replaces the entrypoint, `args` the CMD.
    let command: Vec<String> = strs(&c["command"])
        .iter()
        .map(|a| expand(a, &env))
        .collect();
    let cargs: Vec<String> = strs(&c["args"]).iter().map(|a| expand(a, &env)).collect();
    if let Some(first) = command.first() {
        args.push(format!("--entrypoint={first}"));
    }
    args.push(image.clone());
    args.extend(command.iter().skip(1).cloned());
    args.extend(cargs.iter().cloned());
    let mut argv = command;
    argv.extend(cargs);

    // A probe's port is a number or the name of one of the container's ports.
    let probe = |which: &str| -> Result<Option<String>> {
        let g = &c[which]["httpGet"];
        if g.is_null() {
            return Ok(None);
        }
        let port = match &g["port"] {
            Value::Number(n) => n.as_u64(),
            Value::String(name) => c["ports"]
                .as_sequence()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == name.as_str())
                .and_then(|p| p["containerPort"].as_u64()),
            _ => None,
        }
        .with_context(|| format!("{which}: port {:?}", g["port"]))?;
        let path = g["path"].as_str().unwrap_or("/");
        Ok(Some(format!("http://{}:{port}{path}", node.ip)))
    };
    Ok(Run {
        name: docker_name,
        image,
        args,
        argv,
        cap_add,
        not_granted,
        privileged,
        readiness: probe("readinessProbe")?,
        liveness: probe("livenessProbe")?,
    })
}

/// Capabilities by number, as docker names them (`CAP_` left off).
pub const CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// `privileged: true`: `--privileged`, unless this machine's own bounding
/// set lacks capabilities the kernel has (a sandboxed test machine may run
/// without SYS_RESOURCE), where runc fails to grant "all" of them. Then
/// what `--privileged` means to the container, made of its parts: every
/// capability we hold, `/proc/sys` and `/sys` writable and nothing masked
/// (`systempaths=unconfined`), no AppArmor profile.
fn privileged_flags(runtime_lacks: &[String]) -> Result<Vec<String>> {
    let status = fs::read_to_string("/proc/self/status")?;
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .context("CapBnd")?
        .trim();
    let bnd = u64::from_str_radix(bnd, 16)?;
    let last: usize = fs::read_to_string("/proc/sys/kernel/cap_last_cap")?
        .trim()
        .parse()?;
    let known = last.min(CAPS.len() - 1);
    let held: Vec<&str> = (0..=known)
        .filter(|i| bnd & (1 << i) != 0)
        .map(|i| CAPS[i])
        .filter(|c| !runtime_lacks.iter().any(|l| l == c))
        .collect();
    if held.len() == known + 1 {
        return Ok(vec!["--privileged".into()]);
    }
    let mut flags: Vec<String> = held.iter().map(|c| format!("--cap-add={c}")).collect();
    flags.push("--security-opt=systempaths=unconfined".into());
    flags.push("--security-opt=apparmor=unconfined".into());
    Ok(flags)
}

/// The names of the pod's init containers and containers, in order.
pub fn container_names(manifest: &Manifest, key: &str) -> Result<Vec<String>> {
    Ok(manifest.pod_spec()?[key]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect())
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

/// A kubelet's `$(VAR)` expansion: a variable defined before is replaced,
/// an unknown one is left as it is, `$$` is a literal `$`.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some((_, v)) = env.iter().rev().find(|(k, _)| *k == inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_as_a_kubelet_does() {
        let env = vec![("POD_IP".to_owned(), "10.0.0.5".to_owned())];
        assert_eq!(expand("--iface=$(POD_IP)", &env), "--iface=10.0.0.5");
        assert_eq!(expand("$$(POD_IP)", &env), "$(POD_IP)");
        assert_eq!(expand("$(NOPE) $x", &env), "$(NOPE) $x");
    }
}
