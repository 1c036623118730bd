//! The Kubernetes API stand-in (`overlay_tests::kube_api`) driven by real
//! clients nobody here wrote: the machine's kubectl (client-go) and Debian's
//! python3-kubernetes. Each test starts its own stand-in with TLS and a
//! bearer token on 127.0.0.1 (the namespace test, which needs root, in a
//! lab host), and checks what the clients see against the store.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use overlay_tests::{
    agent::Hosts,
    kube_api::{KubeApi, KubeApiSpec, simple_node},
};
use serde_json::{Value, json};

const KUBECTL: &str = "/usr/bin/kubectl";
const PYTHON: &str = "/usr/bin/python3";
const TOKEN: &str = "standin-token-1234";

fn standin() -> KubeApi {
    KubeApi::start(KubeApiSpec {
        tls: true,
        token: Some(TOKEN.into()),
        ..KubeApiSpec::default()
    })
    .expect("starting the stand-in")
}

/// The stand-in with nodes n1..n3 and flannel's pod on n1, and a kubeconfig.
fn cluster() -> (KubeApi, PathBuf) {
    let api = standin();
    for i in 1..=3 {
        api.put_simple_node(&format!("n{i}"), &format!("10.244.{i}.0/24"))
            .unwrap();
    }
    api.put_pod("kube-flannel", "flannel-abc", "n1").unwrap();
    let cfg = api.kubeconfig(&api.dir().join("kubeconfig")).unwrap();
    (api, cfg)
}

fn require(tool: &str, how: &str) {
    assert!(
        Path::new(tool).exists(),
        "{tool} is missing: {how}. These tests prove the stand-in against it and cannot run without it."
    );
}

/// `timeout <secs> kubectl --kubeconfig <cfg>`, with its discovery cache
/// next to the kubeconfig (not in ~/.kube).
fn kubectl_command(cfg: &Path, secs: u32) -> Command {
    require(
        KUBECTL,
        "it comes with the machine image (v1.32), not from apt",
    );
    let mut cmd = Command::new("timeout");
    cmd.arg(secs.to_string())
        .arg(KUBECTL)
        .arg("--kubeconfig")
        .arg(cfg)
        .env("KUBECACHEDIR", cfg.with_file_name("kube-cache"));
    cmd
}

/// Runs kubectl (killed after 30 s); `Ok(stdout)` or `Err` with stderr.
fn kubectl(cfg: &Path, args: &[&str]) -> Result<String> {
    let out = kubectl_command(cfg, 30)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running kubectl")?;
    if !out.status.success() {
        bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn kubectl_json(cfg: &Path, args: &[&str]) -> Value {
    serde_json::from_str(&kubectl(cfg, args).unwrap()).unwrap()
}

/// A child process whose stdout lines arrive on a channel; killed on drop.
struct Streaming {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Streaming {
    fn start(mut cmd: Command) -> Streaming {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Streaming { child, lines }
    }

    /// Lines until one satisfies `done` (all of them, that one included).
    fn until(&self, what: &str, timeout: Duration, done: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = done(&l);
                    seen.push(l);
                    if hit {
                        return seen;
                    }
                }
                Err(_) => panic!("no line with {what} within {timeout:?}; saw {seen:#?}"),
            }
        }
    }

    /// Whether the process ended within `timeout`.
    fn exits_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn kubectl_lists_and_gets_what_the_store_holds() {
    let (api, cfg) = cluster();
    let list = kubectl_json(&cfg, &["get", "nodes", "-o", "json"]);
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["n1", "n2", "n3"]);
    for item in list["items"].as_array().unwrap() {
        let stored = api
            .node(item["metadata"]["name"].as_str().unwrap())
            .unwrap();
        assert_eq!(item, &stored, "kubectl shows the stored node as is");
    }

    let cidr = kubectl(
        &cfg,
        &["get", "node", "n2", "-o", "jsonpath={.spec.podCIDR}"],
    )
    .unwrap();
    assert_eq!(cidr, "10.244.2.0/24");
    let rv = kubectl(
        &cfg,
        &[
            "get",
            "node",
            "n2",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ],
    )
    .unwrap();
    assert_eq!(
        json!(rv),
        api.node("n2").unwrap()["metadata"]["resourceVersion"]
    );
    let pod = kubectl(
        &cfg,
        &[
            "get",
            "pod",
            "-n",
            "kube-flannel",
            "flannel-abc",
            "-o",
            "jsonpath={.spec.nodeName}",
        ],
    )
    .unwrap();
    assert_eq!(pod, "n1");

    // The human output is the server's Table.
    let table = kubectl(&cfg, &["get", "nodes"]).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("STATUS"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("n1") && lines[1].contains("Ready"),
        "{table}"
    );
    assert_eq!(lines.len(), 4, "{table}");

    let err = kubectl(&cfg, &["get", "node", "nope"])
        .unwrap_err()
        .to_string();
    assert!(err.contains(r#"nodes "nope" not found"#), "{err}");

    let bad = api
        .kubeconfig_with_token(&api.dir().join("bad"), Some("wrong"))
        .unwrap();
    let err = kubectl(&bad, &["get", "nodes"]).unwrap_err().to_string();
    assert!(
        err.contains("Unauthorized") || err.contains("must be logged in"),
        "{err}"
    );

    // A selector kubectl sends for `get node X -w` and `-l`.
    let sel = kubectl(
        &cfg,
        &[
            "get",
            "nodes",
            "--field-selector",
            "metadata.name=n3",
            "-o",
            "name",
        ],
    )
    .unwrap();
    assert_eq!(sel.trim(), "node/n3");
    assert!(api.requests("list", "nodes") >= 3);
    assert!(api.requests("get", "nodes/{name}") >= 2);
    assert_eq!(api.requests("get", "namespaces/{ns}/pods/{name}"), 1);
}

#[test]
fn kubectl_annotates_and_patches() {
    let (api, cfg) = cluster();
    kubectl(&cfg, &["annotate", "node", "n1", "example.com/k=v1"]).unwrap();
    assert_eq!(
        api.node("n1").unwrap()["metadata"]["annotations"]["example.com/k"],
        "v1"
    );
    let err = kubectl(&cfg, &["annotate", "node", "n1", "example.com/k=v2"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("already has a value"), "{err}");
    kubectl(
        &cfg,
        &["annotate", "node", "n1", "--overwrite", "example.com/k=v2"],
    )
    .unwrap();
    let n1 = api.node("n1").unwrap();
    assert_eq!(n1["metadata"]["annotations"]["example.com/k"], "v2");
    assert_eq!(
        n1["metadata"]["annotations"]["node.alpha.kubernetes.io/ttl"],
        "0"
    );
    kubectl(&cfg, &["annotate", "node", "n1", "example.com/k-"]).unwrap();
    assert!(
        api.node("n1").unwrap()["metadata"]["annotations"]
            .get("example.com/k")
            .is_none()
    );

    // flannel's NetworkUnavailable condition, merged by type: Ready survives,
    // and /status leaves spec alone.
    let before = api.node("n2").unwrap();
    let patch = r#"{"status":{"conditions":[{"type":"NetworkUnavailable","status":"False","reason":"FlannelIsUp","message":"Flannel is running on this node"}]},"spec":{"podCIDR":"10.9.9.0/24"}}"#;
    kubectl(
        &cfg,
        &[
            "patch",
            "node",
            "n2",
            "--subresource=status",
            "--type=strategic",
            "-p",
            patch,
        ],
    )
    .unwrap();
    let n2 = api.node("n2").unwrap();
    let types: Vec<&str> = n2["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["Ready", "NetworkUnavailable"]);
    assert_eq!(n2["spec"], before["spec"]);
    assert_ne!(
        n2["metadata"]["resourceVersion"],
        before["metadata"]["resourceVersion"]
    );

    // A merge patch on the main resource changes spec but never status.
    kubectl(
        &cfg,
        &[
            "patch",
            "node",
            "n3",
            "--type=merge",
            "-p",
            r#"{"spec":{"unschedulable":true},"status":{"conditions":[]}}"#,
        ],
    )
    .unwrap();
    let n3 = api.node("n3").unwrap();
    assert_eq!(n3["spec"]["unschedulable"], true);
    assert_eq!(n3["status"]["conditions"].as_array().unwrap().len(), 1);
    kubectl(
        &cfg,
        &[
            "patch",
            "node",
            "n3",
            "--type=json",
            "-p",
            r#"[{"op":"add","path":"/metadata/labels/j","value":"x"}]"#,
        ],
    )
    .unwrap();
    assert_eq!(api.node("n3").unwrap()["metadata"]["labels"]["j"], "x");
    kubectl(&cfg, &["label", "node", "n3", "role=edge"]).unwrap();
    assert_eq!(
        api.node("n3").unwrap()["metadata"]["labels"]["role"],
        "edge"
    );

    // What the clients sent, as the agent's tests will check it.
    let patches = api.patches();
    let status = patches
        .iter()
        .find(|p| p.path == "/api/v1/nodes/n2/status")
        .unwrap();
    assert_eq!(
        status.content_type,
        "application/strategic-merge-patch+json"
    );
    assert_eq!(status.code, 200);
    assert!(
        patches
            .iter()
            .any(|p| p.content_type == "application/merge-patch+json")
    );
    assert!(
        patches
            .iter()
            .any(|p| p.content_type == "application/json-patch+json")
    );
    assert_eq!(api.requests("patch", "nodes/{name}/status"), 1);
    for p in &patches {
        eprintln!("{} {} {}", p.path, p.content_type, p.body);
    }

    // A stale resourceVersion is a conflict; a missing node is 404.
    let stale = format!(
        r#"{{"metadata":{{"resourceVersion":"{}","labels":{{"z":"1"}}}}}}"#,
        before["metadata"]["resourceVersion"].as_str().unwrap()
    );
    let err = kubectl(&cfg, &["patch", "node", "n2", "--type=merge", "-p", &stale])
        .unwrap_err()
        .to_string();
    assert!(err.contains("the object has been modified"), "{err}");
    let err = kubectl(&cfg, &["patch", "node", "nope", "--type=merge", "-p", "{}"])
        .unwrap_err()
        .to_string();
    assert!(err.contains(r#"nodes "nope" not found"#), "{err}");

    kubectl(&cfg, &["delete", "node", "n3"]).unwrap();
    assert!(api.node("n3").is_none());
    let out = kubectl(&cfg, &["get", "nodes", "-o", "name"]).unwrap();
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["node/n1", "node/n2"]
    );
}

#[test]
fn kubectl_watches_changes_as_they_happen() {
    let (api, cfg) = cluster();
    let mut cmd = kubectl_command(&cfg, 60);
    cmd.args(["get", "nodes", "-w"]);
    let w = Streaming::start(cmd);
    // The initial list first (header and three rows)...
    w.until("n3's row", Duration::from_secs(20), |l| {
        l.starts_with("n3 ")
    });
    // ... then rows for what changes: a new node, a node turning NotReady.
    api.put_simple_node("n4", "10.244.4.0/24").unwrap();
    w.until("the new node n4", Duration::from_secs(10), |l| {
        l.starts_with("n4 ") && l.contains("Ready")
    });
    let mut n2 = api.node("n2").unwrap();
    n2["status"]["conditions"][0]["status"] = json!("False");
    api.put_node(n2).unwrap();
    w.until("n2 NotReady", Duration::from_secs(10), |l| {
        l.starts_with("n2 ") && l.contains("NotReady")
    });

    // The events themselves, with --output-watch-events and JSON.
    let mut cmd = kubectl_command(&cfg, 60);
    cmd.args([
        "get",
        "nodes",
        "-w",
        "--watch-only",
        "--output-watch-events",
        "-o",
        "json",
    ]);
    let w = Streaming::start(cmd);
    // kubectl prints nothing until an event; give it time to open the watch.
    let deadline = Instant::now() + Duration::from_secs(20);
    while api.requests("watch", "nodes") < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    api.patch_node_annotations("n1", &[("a/b".to_owned(), Some("c".to_owned()))].into())
        .unwrap();
    api.delete_node("n4").unwrap();
    let lines = w.until("the DELETED event", Duration::from_secs(10), |l| {
        l.contains("\"DELETED\"")
    });
    let text = lines.join("\n");
    assert!(
        text.contains("\"MODIFIED\"") && text.contains(r#""a/b":"c""#),
        "{text}"
    );
    assert!(api.requests("watch", "nodes") >= 2);
}

#[test]
fn kubectl_raw_watch_gets_410_after_compaction() {
    let (api, cfg) = cluster();
    let old = api.resource_version();
    api.put_simple_node("n4", "10.244.4.0/24").unwrap();
    // Before compaction: exactly the events after `old`, then the stream
    // ends at timeoutSeconds.
    let path = format!("/api/v1/nodes?watch=true&resourceVersion={old}&timeoutSeconds=1");
    let out = kubectl(&cfg, &["get", "--raw", &path]).unwrap();
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 1, "{out}");
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[0]["object"]["metadata"]["name"], "n4");

    api.compact();
    let start = Instant::now();
    let path = format!("/api/v1/nodes?watch=true&resourceVersion={old}");
    let out = kubectl(&cfg, &["get", "--raw", &path]).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "the stream closes after the error"
    );
    let ev: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(ev["type"], "ERROR", "{out}");
    assert_eq!(ev["object"]["kind"], "Status");
    assert_eq!(ev["object"]["code"], 410);
    assert_eq!(ev["object"]["reason"], "Expired");
    let msg = ev["object"]["message"].as_str().unwrap();
    assert_eq!(
        msg,
        format!(
            "too old resource version: {old} ({})",
            api.resource_version()
        )
    );

    // From the current version it is accepted (and ends at its timeout).
    let path = format!(
        "/api/v1/nodes?watch=true&resourceVersion={}&timeoutSeconds=1",
        api.resource_version()
    );
    assert_eq!(kubectl(&cfg, &["get", "--raw", &path]).unwrap(), "");
}

#[test]
fn python_client_lists_reads_patches_and_watches() {
    require(PYTHON, "install it with `apt-get install -y python3`");
    let has_client = Command::new(PYTHON)
        .args(["-c", "import kubernetes"])
        .status()
        .unwrap()
        .success();
    assert!(
        has_client,
        "python3-kubernetes is missing: `cargo xtask setup` installs it (apt-get install -y python3-kubernetes)"
    );
    let (api, cfg) = cluster();
    let bad = api
        .kubeconfig_with_token(&api.dir().join("bad"), Some("wrong"))
        .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/standin_client.py");
    let run = |args: &[&str]| -> Vec<Value> {
        let out = Command::new("timeout")
            .args(["60", PYTHON])
            .arg(&script)
            .args(args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "python failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{stdout}");
        stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let checks = run(&["main", cfg.to_str().unwrap(), bad.to_str().unwrap()]);
    let names: Vec<&str> = checks
        .iter()
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "list_node",
            "read_node",
            "read_namespaced_pod",
            "read_node_404",
            "patch_node_status",
            "watch",
            "watch_from_now",
            "wrong_token"
        ]
    );

    // The python client sent a strategic merge patch to /status.
    let p = api
        .patches()
        .into_iter()
        .find(|p| p.path == "/api/v1/nodes/n1/status")
        .unwrap();
    assert_eq!(p.content_type, "application/strategic-merge-patch+json");
    let n1 = api.node("n1").unwrap();
    assert_eq!(n1["status"]["conditions"].as_array().unwrap().len(), 2);
    assert_eq!(
        n1["metadata"]["annotations"]["flannel.alpha.coreos.com/public-ip"],
        "10.98.0.1"
    );
    assert!(api.node("py-node").is_none());

    let old = api.resource_version();
    api.put_simple_node("n9", "10.244.9.0/24").unwrap();
    api.compact();
    let checks = run(&["expired", cfg.to_str().unwrap(), &old.to_string()]);
    assert_eq!(checks[0]["status"], 410);
    assert!(
        checks[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("Expired: too old resource version"),
        "{}",
        checks[0]
    );
}

#[test]
fn stop_closes_watches_and_start_again_keeps_the_state() {
    let (mut api, cfg) = cluster();
    let mut cmd = kubectl_command(&cfg, 60);
    cmd.args(["get", "--raw", "/api/v1/nodes?watch=true&resourceVersion=0"]);
    let mut w = Streaming::start(cmd);
    w.until("n3's ADDED", Duration::from_secs(20), |l| {
        l.contains("\"n3\"")
    });
    let rv = api.resource_version();
    api.stop();
    assert!(
        w.exits_within(Duration::from_secs(10)),
        "the open watch was closed"
    );
    let err = kubectl(&cfg, &["get", "nodes", "--request-timeout=3s"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("connection refused"), "{err}");
    // Changed while down, seen after the restart with versions continuing.
    api.put_simple_node("n4", "10.244.4.0/24").unwrap();
    api.start_again().unwrap();
    // Raw: `get -o json` rewraps the items in a `List` without the version.
    let list = kubectl_json(&cfg, &["get", "--raw", "/api/v1/nodes"]);
    assert_eq!(list["items"].as_array().unwrap().len(), 4);
    assert_eq!(list["metadata"]["resourceVersion"], (rv + 1).to_string());
    let path = format!("/api/v1/nodes?watch=true&resourceVersion={rv}&timeoutSeconds=1");
    let out = kubectl(&cfg, &["get", "--raw", &path]).unwrap();
    assert!(out.contains("\"ADDED\"") && out.contains("\"n4\""), "{out}");
}

#[test]
fn faults_and_ten_thousand_nodes_in_pages() {
    let (api, cfg) = cluster();
    api.fail_next(1, 500);
    let err = kubectl(&cfg, &["get", "node", "n1", "-o", "name"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("injected fault"), "{err}");
    assert_eq!(
        kubectl(&cfg, &["get", "node", "n1", "-o", "name"])
            .unwrap()
            .trim(),
        "node/n1"
    );

    let nodes: Vec<Value> = (0..10_000)
        .map(|i| {
            simple_node(
                &format!("bulk-{i:05}"),
                &format!("10.{}.{}.0/24", 100 + i / 256, i % 256),
            )
        })
        .collect();
    let start = Instant::now();
    api.put_nodes_bulk(nodes).unwrap();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "{took:?}");
    api.reset_stats();
    // kubectl lists in pages of 500 and follows `continue`.
    let out = kubectl(&cfg, &["get", "nodes", "-o", "name"]).unwrap();
    assert_eq!(out.lines().count(), 10_003);
    assert_eq!(api.requests("list", "nodes"), 21);
}

#[test]
#[ignore = "needs root (network namespaces): run `cargo xtask test`"]
fn served_inside_a_lab_host() {
    let hosts = Hosts::new("kapi", 2).unwrap();
    let api = KubeApi::start(KubeApiSpec {
        netns: Some(hosts.ns(1)),
        ip: Some(hosts.ip(1)),
        tls: true,
        token: Some(TOKEN.into()),
        ..KubeApiSpec::default()
    })
    .unwrap();
    api.put_simple_node("n1", "10.244.1.0/24").unwrap();
    let cfg = api.kubeconfig(&api.dir().join("kubeconfig")).unwrap();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &hosts.ns(2),
            "timeout",
            "30",
            KUBECTL,
            "--kubeconfig",
        ])
        .arg(&cfg)
        .args(["get", "nodes", "-o", "name"])
        .env("KUBECACHEDIR", api.dir().join("kube-cache"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "node/n1");
    assert_eq!(api.requests("list", "nodes"), 1);
}
