//! One agent per pin directory and per subnet file: a second agent on the
//! same subnet file, or on the same pins, exits at start naming the first
//! one's pid, before it touches etcd or the host; `status` still reads the
//! pins and `cleanup` refuses (unless `--force`) while the agent runs; after
//! `kill -9` the lock is gone with the process and a new agent starts.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Result, bail, ensure};
use overlay_tests::agent::{Agent, Bpffs, Cluster, within};

const CONFIG: &str = r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "Backend": {"Type": "vxlan"}}"#;

/// Waits for `agent` to exit; its exit code and log.
fn exits(agent: &mut Agent) -> Result<(i32, String)> {
    let mut code = None;
    within(Duration::from_secs(15), "the second agent exits", || {
        code = agent.exited();
        code.is_some()
    })
    .map_err(|e| anyhow::anyhow!("{e}:\n{}", agent.log()))?;
    Ok((code.unwrap_or(-1), agent.log()))
}

#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn a_second_agent_on_the_same_pins_or_subnet_file_exits_and_kill_9_frees_them() -> Result<()> {
    let cluster = Cluster::start("si", 1, CONFIG)?;
    let dir = cluster.etcd.dir().to_path_buf();
    let bpf = Bpffs::mount(dir.join("bpf"))?;
    let pins = bpf.0.join("overlay");
    let pin_flag = format!("--bpf-pin-dir={}", pins.display());
    let args = cluster.args(1, &["--datapath=ebpf", &pin_flag]);
    let Cluster { hosts, etcd, bin } = &cluster;
    let ns = hosts.ns(1);
    let env = dir.join("h1.env");

    let mut first = Agent::start(&dir, "first", &ns, bin, &args)?;
    first.wait_for("running: lease", Duration::from_secs(20))?;
    // `ip netns exec` and `sh -c "...; exec"` keep the pid.
    let pid = first.child.id();

    // The same flags: the subnet file is locked first.
    let mut same = Agent::start(&dir, "same", &ns, bin, &args)?;
    let (code, log) = exits(&mut same)?;
    ensure!(code != 0, "the second agent exited {code}:\n{log}");
    let want = format!(
        "another overlay-agent (pid {pid}) already runs with subnet file {}",
        env.display()
    );
    ensure!(log.contains(&want), "no {want:?} in:\n{log}");
    ensure!(
        !log.contains("network config") && !log.contains("lease"),
        "the second agent went on before refusing:\n{log}"
    );

    // Another subnet file, the same pins.
    let other_env = format!("--subnet-file={}", dir.join("other.env").display());
    let pins_only: Vec<String> = args
        .iter()
        .map(|a| {
            if a.starts_with("--subnet-file=") {
                other_env.clone()
            } else {
                a.clone()
            }
        })
        .collect();
    let mut second = Agent::start(&dir, "pins", &ns, bin, &pins_only)?;
    let (code, log) = exits(&mut second)?;
    let want = format!(
        "another overlay-agent (pid {pid}) already runs with pin directory {}",
        pins.display()
    );
    ensure!(
        code != 0 && log.contains(&want),
        "exit {code}, no {want:?} in:\n{log}"
    );
    ensure!(
        !dir.join("other.env").exists(),
        "the refused agent wrote its subnet file"
    );

    // status reads the pins without the lock; cleanup refuses.
    let tool = |sub: &[&str]| -> Result<std::process::Output> {
        Ok(Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(bin)
            .arg(format!("--etcd-endpoints={}", etcd.endpoints()))
            .arg(&pin_flag)
            .args(sub)
            .output()?)
    };
    let status = tool(&["status"])?;
    ensure!(
        status.status.success(),
        "status while the agent runs: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let cleanup = tool(&["cleanup"])?;
    let said = String::from_utf8_lossy(&cleanup.stderr).into_owned()
        + &String::from_utf8_lossy(&cleanup.stdout);
    let want = format!(
        "an overlay-agent (pid {pid}) runs with pin directory {}",
        pins.display()
    );
    ensure!(
        !cleanup.status.success() && said.contains(&want),
        "cleanup while the agent runs: {}, {said}",
        cleanup.status
    );
    ensure!(
        pins.join("links/vxlan_egress").exists(),
        "the refused cleanup removed pins"
    );
    ensure!(
        first.exited().is_none(),
        "the first agent died:\n{}",
        first.log()
    );

    // kill -9: the kernel drops the locks with the process.
    first.kill9()?;
    let mut again = Agent::start(&dir, "again", &ns, bin, &args)?;
    again.wait_for("running: lease", Duration::from_secs(20))?;
    if again.log().contains("already runs") {
        bail!("refused after kill -9:\n{}", again.log());
    }
    let lock_file = Path::new(&format!("{}.lock", env.display())).to_path_buf();
    let written = std::fs::read_to_string(&lock_file)?;
    ensure!(
        written.trim() == again.child.id().to_string(),
        "{} says {written:?}",
        lock_file.display()
    );
    drop(again);
    drop(bpf);
    Ok(())
}
