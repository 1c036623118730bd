//! `overlay-agent cleanup` removes only what this agent created and refuses
//! to guess: with a second overlay's `flannel.42` next to ours and no way
//! to tell our VNI (kernel datapath, so no pins; no config in etcd) it names
//! both devices and removes nothing; while a process called flanneld runs
//! it removes nothing either; `--vni 1 --force` then removes flannel.1 and
//! the FLANNEL-* rules and nftables mode's table, and leaves flannel.42
//! alone.
//! (`restart.rs` covers the eBPF agent's pins, whose NODE_CONFIG names the
//! VNI.)

use std::{
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use overlay_tests::agent::{Agent, Cluster, sh, within};

const CONFIG: &str = r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "SubnetMin": "10.0.1.0","SubnetMax": "10.0.20.0", "Backend": {"Type": "vxlan"}}"#;

/// A process named `flanneld` (a copy of sleep), killed on drop.
struct FakeFlanneld(Child);

impl FakeFlanneld {
    fn start(dir: &Path) -> Result<FakeFlanneld> {
        let bin = dir.join("flanneld");
        std::fs::copy("/bin/sleep", &bin).context("copying sleep")?;
        let child = Command::new(&bin).arg("60").stdin(Stdio::null()).spawn()?;
        Ok(FakeFlanneld(child))
    }
}

impl Drop for FakeFlanneld {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rules(ns: &str) -> Result<String> {
    sh(&["ip", "netns", "exec", ns, "iptables-save"])
}

#[test]
#[ignore = "needs root, network namespaces and etcd: run `cargo xtask test`"]
fn cleanup_removes_only_ours_and_refuses_to_guess() -> Result<()> {
    let cluster = Cluster::start("cu", 1, CONFIG)?;
    let args = cluster.args(1, &["--datapath=kernel", "--ip-masq"]);
    let Cluster { hosts, etcd, bin } = &cluster;
    let dir = etcd.dir().to_path_buf();
    let h1 = hosts.ns(1);
    let mut agent = Agent::start(&dir, "h1", &h1, bin, &args)?;
    agent.wait_for("running: lease", Duration::from_secs(20))?;
    within(Duration::from_secs(5), "rules installed", || {
        rules(&h1).is_ok_and(|r| r.contains("-A FLANNEL-POSTRTG") && r.contains("-A FLANNEL-FWD"))
    })?;
    agent.kill9()?;
    // What nftables mode (ours or flanneld's) leaves behind.
    sh(&[
        "ip",
        "netns",
        "exec",
        &h1,
        "nft",
        "add",
        "table",
        "ip",
        "flannel-ipv4",
    ])?;
    let nft_tables = || sh(&["ip", "netns", "exec", &h1, "nft", "list", "tables", "ip"]);
    // Another overlay's device, and no network config to name ours.
    sh(&[
        "ip",
        "-n",
        &h1,
        "link",
        "add",
        "flannel.42",
        "type",
        "vxlan",
        "id",
        "42",
        "dstport",
        "8472",
        "dev",
        "eth0",
        "nolearning",
    ])?;
    etcd.delete("/coreos.com/network/config")?;

    let no_pins = dir.join("no-pins");
    std::fs::create_dir_all(&no_pins)?;
    let cleanup = |extra: &[&str]| -> Result<Output> {
        Ok(Command::new("ip")
            .args(["netns", "exec", &h1])
            .arg(bin)
            .arg(format!("--etcd-endpoints={}", etcd.endpoints()))
            .arg(format!("--bpf-pin-dir={}", no_pins.display()))
            .arg("cleanup")
            .args(extra)
            .stdin(Stdio::null())
            .output()?)
    };
    let untouched = |what: &str| -> Result<()> {
        let links = sh(&["ip", "-n", &h1, "link"])?;
        ensure!(
            links.contains("flannel.1:") && links.contains("flannel.42:"),
            "{what}: a device went:\n{links}"
        );
        let r = rules(&h1)?;
        ensure!(
            r.contains("-A FLANNEL-POSTRTG") && r.contains("-A FLANNEL-FWD"),
            "{what}: rules went:\n{r}"
        );
        let t = nft_tables()?;
        ensure!(
            t.contains("flannel-ipv4"),
            "{what}: the nft table went:\n{t}"
        );
        Ok(())
    };

    let out = cleanup(&[])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "cleanup guessed:\n{stderr}");
    ensure!(
        stderr.contains("flannel.1, flannel.42") && stderr.contains("cleanup --vni <VNI>"),
        "the refusal names neither the devices nor the way out:\n{stderr}"
    );
    untouched("without a VNI")?;

    let flanneld = FakeFlanneld::start(&dir)?;
    let pid = flanneld.0.id();
    let out = cleanup(&["--vni", "1"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "cleanup ran beside flanneld:\n{stderr}"
    );
    ensure!(
        stderr.contains("flanneld runs") && stderr.contains(&pid.to_string()),
        "the refusal does not say flanneld (pid {pid}) runs:\n{stderr}"
    );
    untouched("beside flanneld")?;

    let out = cleanup(&["--vni", "1", "--force"])?;
    drop(flanneld);
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "forced cleanup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(stdout.contains("removed device flannel.1 "), "{stdout}");
    let links = sh(&["ip", "-n", &h1, "link"])?;
    ensure!(!links.contains("flannel.1:"), "flannel.1 left:\n{links}");
    ensure!(
        links.contains("flannel.42:"),
        "the other overlay's device went:\n{links}"
    );
    let r = rules(&h1)?;
    ensure!(!r.contains("FLANNEL"), "rules left:\n{r}");
    ensure!(
        stdout.contains("removed nft table ip flannel-ipv4"),
        "{stdout}"
    );
    let t = nft_tables()?;
    ensure!(!t.contains("flannel-ipv4"), "nft table left:\n{t}");
    Ok(())
}
