//! The README's first command, `cargo xtask lab`, as an operator runs it: the
//! `lab` binary with the agent built for this profile. `up --once` must bring
//! up etcd, the eBPF agent, the kernel agent and the flanneld stand-in, show
//! three leases and a passing 3x3 ping matrix, and tear everything down; `up`
//! must stay up until `down` from another process, with `status` in between.
//! The same for the Kubernetes variant, `up --kube`: three Nodes with
//! flannel's annotations, pods made by the CNI plugins pinging each other,
//! and the machine's kubectl reaching the lab with the kubeconfig it prints.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};

const LAB: &str = env!("CARGO_BIN_EXE_lab");
const STATE_DIR: &str = "/run/overlay-lab";
const KUBECONFIG: &str = "/run/overlay-lab/kubeconfig";
const KUBECTL: &str = "/usr/bin/kubectl";

fn lab(args: &[&str]) -> Result<Output> {
    let out = Command::new(LAB)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running lab {args:?}"))?;
    Ok(out)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn lab_namespaces() -> Result<Vec<String>> {
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("ovlab-"))
        .map(str::to_owned)
        .collect())
}

/// Runs `lab down` when a test ends, passed or not, so a failure does not
/// leave the lab's namespaces and processes behind.
struct Down;

impl Drop for Down {
    fn drop(&mut self) {
        let _ = lab(&["down"]);
    }
}

fn assert_gone() -> Result<()> {
    let left = lab_namespaces()?;
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    ensure!(!Path::new(STATE_DIR).exists(), "{STATE_DIR} left behind");
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    ensure!(
        !mounts.contains(STATE_DIR),
        "a mount under {STATE_DIR} left behind:\n{mounts}"
    );
    let procs = Command::new("pgrep")
        .args(["-f", "overlay-lab/"])
        .output()?;
    ensure!(
        procs.stdout.is_empty(),
        "processes of the lab left: {}",
        String::from_utf8_lossy(&procs.stdout)
    );
    Ok(())
}

/// The three leases and the matrix as `up` and `status` print them.
fn assert_lab_report(out: &str) -> Result<()> {
    let leases = out
        .lines()
        .filter(|l| l.trim_start().starts_with("/coreos.com/network/subnets/"))
        .count();
    ensure!(
        leases == 3,
        "expected 3 leases in the report, saw {leases}:\n{out}"
    );
    for role in [
        "overlay-agent --datapath ebpf",
        "overlay-agent --datapath kernel",
        "flanneld stand-in",
    ] {
        ensure!(out.contains(role), "no node {role:?} in:\n{out}");
    }
    ensure!(
        out.contains("TCX [eth0 ingress: vxlan_ingress_t"),
        "the eBPF host shows no ingress program:\n{out}"
    );
    ensure!(
        out.contains("6 of 6 directed pairs pass"),
        "the ping matrix does not pass:\n{out}"
    );
    ensure!(!out.contains("FAIL"), "a pair failed:\n{out}");
    Ok(())
}

fn preflight() -> Result<std::path::PathBuf> {
    if !lab_namespaces()?.is_empty() || Path::new(STATE_DIR).exists() {
        bail!("a lab is up on this machine (ovlab-* or {STATE_DIR}); `cargo xtask lab down` first");
    }
    overlay_tests::binaries::agent()
}

/// `lab up <args>` in the background, once it printed that it is up
/// (within 120 s); what it printed so far.
fn spawn_up(args: &[&str]) -> Result<(Child, String)> {
    let mut up: Child = Command::new(LAB)
        .arg("up")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting lab up")?;
    let stdout = up.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Reads to the end even once nobody listens: `up` still prints
        // while it tears down, and a closed pipe would kill it.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !seen.contains("the lab is up") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
            }
            Err(_) => {
                let _ = up.kill();
                let _ = up.wait();
                bail!("lab up did not report it was up within 120 s:\n{seen}");
            }
        }
    }
    ensure!(
        up.try_wait()?.is_none(),
        "lab up exited instead of staying up"
    );
    Ok((up, seen))
}

/// The Kubernetes variant's report, from `up --kube` or `status`: the three
/// Nodes with their podCIDRs and flannel's annotations, the hosts, a
/// passing pod-to-pod matrix and the kubectl command.
fn assert_kube_report(out: &str) -> Result<()> {
    for i in 1..=3 {
        let row = out
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("node{i} ")))
            .with_context(|| format!("no row for node{i} in:\n{out}"))?;
        for want in [
            format!("10.244.{i}.0/24"),
            format!("192.168.205.{}", 9 + i),
            "vxlan".into(),
            "False (FlannelIsUp)".into(),
        ] {
            ensure!(row.contains(&want), "node{i}'s row lacks {want:?}: {row}");
        }
        ensure!(
            row.split_whitespace()
                .any(|w| w.len() == 17 && w.matches(':').count() == 5),
            "node{i}'s row shows no VtepMAC: {row}"
        );
    }
    for role in [
        "overlay-agent --kube-subnet-mgr --datapath ebpf",
        "overlay-agent --kube-subnet-mgr --datapath kernel",
        "flanneld stand-in (iproute2 + Node annotations)",
    ] {
        ensure!(out.contains(role), "no host {role:?} in:\n{out}");
    }
    ensure!(
        out.contains("TCX [eth0 ingress: vxlan_ingress_t"),
        "the eBPF host shows no ingress program:\n{out}"
    );
    ensure!(
        out.contains("ping matrix, pod to pod") && out.contains("6 of 6 directed pairs pass"),
        "the pod-to-pod matrix does not pass:\n{out}"
    );
    ensure!(!out.contains("FAIL"), "a pair failed:\n{out}");
    ensure!(
        out.contains(&format!(
            "kubectl --kubeconfig {KUBECONFIG} get nodes -o wide"
        )),
        "no kubectl command in:\n{out}"
    );
    Ok(())
}

/// The machine's kubectl with the lab's kubeconfig (killed after 30 s),
/// its discovery cache in a scratch directory rather than ~/.kube.
fn kubectl(args: &[&str]) -> Result<String> {
    ensure!(
        Path::new(KUBECTL).exists(),
        "{KUBECTL} is missing (it comes with the machine image, not from apt)"
    );
    let cache = std::env::temp_dir().join(format!("lab-command-kubecache-{}", std::process::id()));
    let out = Command::new("timeout")
        .arg("30")
        .arg(KUBECTL)
        .args(["--kubeconfig", KUBECONFIG])
        .args(args)
        .env("KUBECACHEDIR", &cache)
        .stdin(Stdio::null())
        .output()?;
    let _ = std::fs::remove_dir_all(&cache);
    ensure!(
        out.status.success(),
        "kubectl {args:?} failed:\n{}",
        text(&out)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
#[ignore = "needs root, etcd, network namespaces and eBPF: run `cargo xtask test`"]
fn lab_up_once_shows_three_hosts_pinging_and_leaves_nothing() -> Result<()> {
    let agent = preflight()?;
    let _down = Down;
    let out = lab(&["up", "--once", "--agent", agent.to_str().unwrap()])?;
    let all = text(&out);
    ensure!(out.status.success(), "lab up --once failed:\n{all}");
    assert_lab_report(&all)?;
    ensure!(
        all.contains("10.15.64.0-20"),
        "the stand-in's lease (seed 001's 10.15.64.0/20) is missing:\n{all}"
    );
    assert_gone()
}

#[test]
#[ignore = "needs root, etcd, network namespaces and eBPF: run `cargo xtask test`"]
fn lab_stays_up_reports_status_and_goes_down_on_request() -> Result<()> {
    let agent = preflight()?;
    let _down = Down;
    let (mut up, seen) = spawn_up(&["--agent", agent.to_str().unwrap()])?;
    assert_lab_report(&seen)?;

    let status = lab(&["status"])?;
    let status_text = text(&status);
    ensure!(status.status.success(), "lab status failed:\n{status_text}");
    ensure!(
        status_text.contains(&format!("lab up (process {})", up.id())),
        "status does not name the running lab:\n{status_text}"
    );
    assert_lab_report(&status_text)?;

    let down = lab(&["down"])?;
    ensure!(down.status.success(), "lab down failed:\n{}", text(&down));
    let exit = up.wait()?;
    ensure!(exit.success(), "lab up exited with {exit} after down");
    assert_gone()?;
    let after = text(&lab(&["status"])?);
    ensure!(
        after.contains("no lab is up"),
        "status after down:\n{after}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces, eBPF and the CNI plugins: run `cargo xtask test`"]
fn lab_kube_up_once_shows_nodes_and_pods_pinging_and_leaves_nothing() -> Result<()> {
    let agent = preflight()?;
    let _down = Down;
    let out = lab(&["up", "--kube", "--once", "--agent", agent.to_str().unwrap()])?;
    let all = text(&out);
    ensure!(out.status.success(), "lab up --kube --once failed:\n{all}");
    assert_kube_report(&all)?;
    ensure!(
        all.contains("3 pod(s) deleted with the CNI plugins (DEL)"),
        "the pods were not DEL'd:\n{all}"
    );
    assert_gone()
}

#[test]
#[ignore = "needs root, network namespaces, eBPF, the CNI plugins and kubectl: run `cargo xtask test`"]
fn lab_kube_stays_up_serves_kubectl_reports_status_and_goes_down() -> Result<()> {
    let agent = preflight()?;
    let _down = Down;
    let (mut up, seen) = spawn_up(&["--kube", "--agent", agent.to_str().unwrap()])?;
    assert_kube_report(&seen)?;

    // The command the lab prints, from this machine's namespace.
    let wide = kubectl(&["get", "nodes", "-o", "wide"])?;
    for i in 1..=3 {
        ensure!(
            wide.lines()
                .any(|l| l.starts_with(&format!("node{i} ")) && l.contains("Ready")),
            "kubectl get nodes -o wide shows no Ready node{i}:\n{wide}"
        );
    }
    let cidrs = kubectl(&[
        "get",
        "nodes",
        "-o",
        r#"jsonpath={range .items[*]}{.metadata.name} {.spec.podCIDR} {.metadata.annotations.flannel\.alpha\.coreos\.com/public-ip}{"\n"}{end}"#,
    ])?;
    for i in 1..=3 {
        let want = format!("node{i} 10.244.{i}.0/24 192.168.205.{}", 9 + i);
        ensure!(cidrs.contains(&want), "kubectl: no {want:?} in:\n{cidrs}");
    }

    let status = lab(&["status"])?;
    let status_text = text(&status);
    ensure!(status.status.success(), "lab status failed:\n{status_text}");
    ensure!(
        status_text.contains(&format!("lab up (process {})", up.id())),
        "status does not name the running lab:\n{status_text}"
    );
    assert_kube_report(&status_text)?;

    let down = lab(&["down"])?;
    ensure!(down.status.success(), "lab down failed:\n{}", text(&down));
    let exit = up.wait()?;
    ensure!(
        exit.success(),
        "lab up --kube exited with {exit} after down"
    );
    assert_gone()?;
    let after = text(&lab(&["status"])?);
    ensure!(
        after.contains("no lab is up"),
        "status after down:\n{after}"
    );
    Ok(())
}
