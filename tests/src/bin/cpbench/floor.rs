//! The kernel's floor for a cold start: the same N neighbours, FDB entries
//! and routes the agent programs, written by iproute2 in batch mode
//! (`ip -batch`, `bridge -batch`) into an equivalent `flannel.1` in a
//! namespace of its own, right after the agent's case, on the same machine
//! under the same load. What no agent can beat by programming the kernel
//! through netlink: each entry still costs the kernel its insert.

use std::{
    fmt::Write as _,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use overlay_tests::peers;

/// The floor, step by step, in seconds.
#[derive(Clone, Copy, Debug)]
pub struct Floor {
    pub neighbours_s: f64,
    pub fdb_s: f64,
    pub routes_s: f64,
}

impl Floor {
    pub fn total_s(&self) -> f64 {
        self.neighbours_s + self.fdb_s + self.routes_s
    }
}

/// The namespace, deleted (with everything in it) when dropped.
struct Namespace(String);

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Writes `lines` to a file and times `tool -n <ns> -batch <file>`.
fn timed_batch(tool: &str, ns: &str, lines: &str, dir: &std::path::Path) -> Result<Duration> {
    let file = dir.join(format!("{tool}.batch"));
    std::fs::write(&file, lines).with_context(|| format!("writing {}", file.display()))?;
    let path = file.to_string_lossy().into_owned();
    let t = Instant::now();
    run(&[tool, "-n", ns, "-batch", &path])?;
    Ok(t.elapsed())
}

/// Measures the floor for peers `0..n` (the leases the case wrote).
pub fn measure(n: usize) -> Result<Floor> {
    let name = format!("cpfloor-{}", std::process::id());
    // One left by an interrupted run (quietly: normally there is none).
    let _ = Command::new("ip").args(["netns", "del", &name]).output();
    run(&["ip", "netns", "add", &name])?;
    let ns = Namespace(name);
    let ns = ns.0.as_str();
    // The device as the agent makes it: VNI 1, port 8472, no learning, on
    // an underlay holding the local address, with our subnet's .0/32.
    // A veth as the underlay (this kernel has no dummy driver).
    run(&[
        "ip", "-n", ns, "link", "add", "u0", "type", "veth", "peer", "name", "u1",
    ])?;
    run(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        "100.127.255.1/10",
        "dev",
        "u0",
    ])?;
    run(&["ip", "-n", ns, "link", "set", "u0", "up"])?;
    run(&[
        "ip",
        "-n",
        ns,
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        "100.127.255.1",
        "dev",
        "u0",
        "dstport",
        "8472",
        "nolearning",
    ])?;
    run(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        "10.200.0.0/32",
        "dev",
        "flannel.1",
    ])?;
    run(&["ip", "-n", ns, "link", "set", "flannel.1", "up"])?;

    let (mut neigh, mut fdb, mut route) = (String::new(), String::new(), String::new());
    for i in 0..n {
        let subnet = peers::subnet(i);
        let gw = subnet.network();
        let mac = peers::vtep_mac(i);
        let _ = writeln!(
            neigh,
            "neigh replace {gw} lladdr {mac} dev flannel.1 nud permanent"
        );
        let _ = writeln!(
            fdb,
            "fdb replace {mac} dev flannel.1 dst {} self permanent",
            peers::public_ip(i)
        );
        let _ = writeln!(
            route,
            "route replace {subnet} via {gw} dev flannel.1 onlink proto boot"
        );
    }
    let dir = tempdir()?;
    let neighbours = timed_batch("ip", ns, &neigh, &dir)?;
    let fdb_t = timed_batch("bridge", ns, &fdb, &dir)?;
    let routes = timed_batch("ip", ns, &route, &dir)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Floor {
        neighbours_s: neighbours.as_secs_f64(),
        fdb_s: fdb_t.as_secs_f64(),
        routes_s: routes.as_secs_f64(),
    })
}

fn tempdir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("cpfloor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
