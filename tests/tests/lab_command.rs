//! The README's first command, `cargo xtask lab`, as an operator runs it: the
//! `lab` binary with the agent built for this profile. `up --once` must bring
//! up etcd, the eBPF agent, the kernel agent and the flanneld stand-in, show
//! three leases and a passing 3x3 ping matrix, and tear everything down; `up`
//! must stay up until `down` from another process, with `status` in between.

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
    let mut up: Child = Command::new(LAB)
        .args(["up", "--agent", agent.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting lab up")?;
    let stdout = up.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
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
    assert_lab_report(&seen)?;
    ensure!(
        up.try_wait()?.is_none(),
        "lab up exited instead of staying up"
    );

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
