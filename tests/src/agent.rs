//! Agents as separate processes on hosts made of network namespaces: the
//! fixture of the tests that run the `overlay-agent` binary (control plane,
//! restarts, health, deployments).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::etcd::{Etcd, EtcdSpec};

/// Runs a command to completion; its stdout, or an error with its stderr.
pub fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Hosts `<tag>-h<i>` with `eth0` = 10.98.0.<i>/24 on a bridge in `<tag>-sw`.
pub struct Hosts {
    tag: String,
    n: usize,
    /// Host 1's underlay address; host `i` has this plus `i - 1`.
    first_ip: std::net::Ipv4Addr,
    /// Whether these namespaces are ours to delete on drop.
    owned: bool,
}

impl Hosts {
    /// `test` tells the namespaces of tests running in parallel apart.
    pub fn new(test: &str, n: usize) -> Result<Hosts> {
        let tag = format!("h3ctl{test}{}", std::process::id() % 100_000);
        let h = Hosts {
            tag,
            n,
            first_ip: std::net::Ipv4Addr::new(10, 98, 0, 1),
            owned: true,
        };
        let sw = h.sw();
        sh(&["ip", "netns", "add", &sw])?;
        sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        for i in 1..=n {
            let ns = h.ns(i);
            sh(&["ip", "netns", "add", &ns])?;
            let port = format!("p{i}");
            sh(&[
                "ip", "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ])?;
            sh(&["ip", "-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", h.ip(i)),
                "dev",
                "eth0",
            ])?;
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(h)
    }
    /// Hosts someone else built and removes (the `lab` binary's fixed
    /// `ovlab-h<i>`): namespaces `<tag>-h<i>` and `<tag>-sw`, host `i` at
    /// `first_ip` plus `i - 1`. Nothing is deleted on drop.
    pub fn adopt(tag: &str, n: usize, first_ip: std::net::Ipv4Addr) -> Hosts {
        Hosts {
            tag: tag.to_owned(),
            n,
            first_ip,
            owned: false,
        }
    }
    /// Host `i`'s IPv6 underlay address, once [`Hosts::add_ipv6`] gave it.
    pub fn ip6(&self, i: usize) -> String {
        format!("fd98::{i}")
    }
    /// Makes the underlay dual stack: every host gets its [`Hosts::ip6`]
    /// (no DAD, so it is usable at once) and forwards IPv6.
    pub fn add_ipv6(&self) -> Result<()> {
        for i in 1..=self.n {
            let ns = self.ns(i);
            let addr = format!("{}/64", self.ip6(i));
            sh(&[
                "ip", "-n", &ns, "addr", "add", &addr, "dev", "eth0", "nodad",
            ])?;
            sh(&[
                "ip",
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.forwarding=1",
            ])?;
        }
        Ok(())
    }
    pub fn sw(&self) -> String {
        format!("{}-sw", self.tag)
    }
    pub fn ns(&self, i: usize) -> String {
        format!("{}-h{i}", self.tag)
    }
    pub fn ip(&self, i: usize) -> String {
        std::net::Ipv4Addr::from(u32::from(self.first_ip) + i as u32 - 1).to_string()
    }
    /// A one-member etcd inside host `i`, listening on its address.
    pub fn etcd(&self, i: usize) -> Result<Etcd> {
        Etcd::start_with(EtcdSpec {
            netns: Some(self.ns(i)),
            listen_ip: Some(self.ip(i)),
            ..EtcdSpec::default()
        })
    }

    pub fn routes(&self, i: usize) -> String {
        sh(&["ip", "-n", &self.ns(i), "route"]).unwrap_or_default()
    }
    /// One ping with a 200 ms wait, for measuring how soon a peer answers.
    pub fn ping_once_fast(&self, i: usize, dst: &str) -> bool {
        self.ping_within(i, dst, "0.2")
    }

    pub fn ping(&self, i: usize, dst: &str) -> bool {
        self.ping_within(i, dst, "1")
    }

    /// One ping from host `i`, waiting `wait` seconds for the answer.
    fn ping_within(&self, i: usize, dst: &str, wait: &str) -> bool {
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.ns(i),
            "ping",
            "-c",
            "1",
            "-W",
            wait,
            dst,
        ])
        .is_ok()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        for i in 1..=self.n {
            let _ = sh(&["ip", "netns", "del", &self.ns(i)]);
        }
        let _ = sh(&["ip", "netns", "del", &self.sw()]);
    }
}

pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
}

impl Agent {
    /// Start the agent in `ns` (with bpffs mounted in its mount namespace).
    pub fn start(dir: &Path, name: &str, ns: &str, bin: &Path, args: &[String]) -> Result<Agent> {
        Self::start_with_env(dir, name, ns, bin, args, &[])
    }

    /// [`Agent::start`] with extra environment variables.
    pub fn start_with_env(
        dir: &Path,
        name: &str,
        ns: &str,
        bin: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<Agent> {
        let log = dir.join(format!("{name}.log"));
        let f = fs::File::create(&log)?;
        let script = format!(
            "mount -t bpf bpf /sys/fs/bpf 2>/dev/null; exec {} \"$@\"",
            bin.display()
        );
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "sh", "-c", &script, "agent"])
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()?;
        Ok(Agent { child, log })
    }
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit code once the agent has exited (`-1` when a signal ended it).
    pub fn exited(&mut self) -> Option<i32> {
        let st = self.child.try_wait().ok()??;
        Some(st.code().unwrap_or(-1))
    }

    /// `kill -9`, as a crash or an OOM kill would: nothing of the agent's
    /// own shutdown runs.
    pub fn kill9(&mut self) -> Result<()> {
        // SAFETY: kill(2) on our child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        self.child.wait()?;
        Ok(())
    }
    pub fn wait_for(&mut self, needle: &str, limit: Duration) -> Result<()> {
        let t0 = Instant::now();
        loop {
            if self.log().contains(needle) {
                return Ok(());
            }
            if let Some(st) = self.child.try_wait()? {
                bail!("agent exited ({st}) before {needle:?}:\n{}", self.log());
            }
            if t0.elapsed() > limit {
                bail!("no {needle:?} after {limit:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every agent log (`*.log` but etcd's `m*.log`) in `dir`, each under its
/// name: the context a failed test's error needs.
pub fn agent_logs(dir: &Path) -> String {
    let mut names: Vec<PathBuf> = fs::read_dir(dir)
        .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    names.retain(|p| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        name.ends_with(".log") && !name.starts_with('m')
    });
    names.sort();
    names
        .iter()
        .map(|p| {
            let text = fs::read_to_string(p).unwrap_or_default();
            format!("--- {} ---\n{text}", p.display())
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Wait until `f` holds, or fail after `limit` with `what`.
pub fn within(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        if f() {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn subnet_of(env: &Path) -> Result<String> {
    let text = fs::read_to_string(env)?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))
        .context("no FLANNEL_SUBNET")?;
    // 10.0.13.1/24 -> 10.0.13.0
    let ip = line.split('/').next().unwrap();
    let mut parts: Vec<&str> = ip.split('.').collect();
    parts[3] = "0";
    Ok(parts.join("."))
}

/// A bpffs mounted in the root mount namespace, so an agent's pins outlive its
/// own mount namespace (`ip netns exec` makes one per process) and other
/// processes (`overlay-agent status`, bpftool) can read them. Unmounted on drop.
pub struct Bpffs(pub PathBuf);

impl Bpffs {
    pub fn mount(dir: PathBuf) -> Result<Bpffs> {
        fs::create_dir_all(&dir)?;
        sh(&["mount", "-t", "bpf", "bpf", &dir.to_string_lossy()])?;
        Ok(Bpffs(dir))
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = sh(&["umount", "-l", &self.0.to_string_lossy()]);
        let _ = fs::remove_dir(&self.0);
    }
}

/// The usual set-up of the agent tests: `n` hosts on one bridge, a real etcd
/// listening on host 1's address (in its namespace), the network config put
/// under the default prefix, and the agent binary. Destructure it: the
/// bindings drop in reverse order, so etcd stops before the hosts go.
pub struct Cluster {
    pub hosts: Hosts,
    pub etcd: Etcd,
    pub bin: PathBuf,
}

impl Cluster {
    pub fn start(tag: &str, n: usize, config: &str) -> Result<Cluster> {
        let c = Self::without_config(tag, n)?;
        c.etcd.put("/coreos.com/network/config", config)?;
        Ok(c)
    }

    /// [`Cluster::start`], then `body` on it; a failure carries every
    /// agent's log ([`agent_logs`]). The cluster goes when `body` returns.
    pub fn run(
        tag: &str,
        n: usize,
        config: &str,
        body: impl FnOnce(&Cluster) -> Result<()>,
    ) -> Result<()> {
        let cluster = Self::start(tag, n, config)?;
        let dir = cluster.etcd.dir().to_path_buf();
        let result = body(&cluster).map_err(|e| e.context(agent_logs(&dir)));
        // etcd stops before the hosts go (see the type's comment).
        let Cluster { hosts, etcd, bin } = cluster;
        drop((bin, etcd));
        drop(hosts);
        result
    }

    /// The flags every agent here gets (etcd, host `i`'s address as
    /// `-iface`, its subnet file `h<i>.env` next to etcd's data), then `extra`.
    pub fn args(&self, i: usize, extra: &[&str]) -> Vec<String> {
        let mut args = vec![
            format!("--etcd-endpoints={}", self.etcd.endpoints()),
            format!("-iface={}", self.hosts.ip(i)),
            format!(
                "--subnet-file={}",
                self.etcd.dir().join(format!("h{i}.env")).display()
            ),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    }

    /// Hosts and etcd, with no network config in etcd yet.
    pub fn without_config(tag: &str, n: usize) -> Result<Cluster> {
        let bin = crate::binaries::agent()?;
        let hosts = Hosts::new(tag, n)?;
        let etcd = Etcd::start_with(EtcdSpec {
            netns: Some(hosts.ns(1)),
            listen_ip: Some(hosts.ip(1)),
            ..EtcdSpec::default()
        })?;
        Ok(Cluster { hosts, etcd, bin })
    }
}

/// Container `c<i>` behind `cni0` on host `i`, addressed from its lease.
pub fn add_container(hosts: &Hosts, i: usize, env: &Path) -> Result<(String, String)> {
    let text = fs::read_to_string(env)?;
    let gw = text
        .lines()
        .find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))
        .context("no FLANNEL_SUBNET")?
        .to_owned(); // 10.0.X.1/24
    let mtu = text
        .lines()
        .find_map(|l| l.strip_prefix("FLANNEL_MTU="))
        .context("no FLANNEL_MTU")?
        .to_owned();
    let (gw_ip, len) = gw.split_once('/').context("FLANNEL_SUBNET")?;
    let mut octets: Vec<&str> = gw_ip.split('.').collect();
    octets[3] = "2";
    let ip = octets.join(".");
    let host = hosts.ns(i);
    let c = format!("{host}-c");
    sh(&["ip", "netns", "add", &c])?;
    sh(&["ip", "-n", &host, "link", "add", "cni0", "type", "bridge"])?;
    sh(&["ip", "-n", &host, "addr", "add", &gw, "dev", "cni0"])?;
    sh(&["ip", "-n", &host, "link", "set", "cni0", "up"])?;
    sh(&[
        "ip", "-n", &host, "link", "add", "vc", "mtu", &mtu, "type", "veth", "peer", "name",
        "eth0", "netns", &c,
    ])?;
    sh(&[
        "ip", "-n", &host, "link", "set", "vc", "master", "cni0", "up",
    ])?;
    sh(&[
        "ip",
        "-n",
        &c,
        "addr",
        "add",
        &format!("{ip}/{len}"),
        "dev",
        "eth0",
    ])?;
    sh(&["ip", "-n", &c, "link", "set", "eth0", "mtu", &mtu, "up"])?;
    sh(&["ip", "-n", &c, "link", "set", "lo", "up"])?;
    sh(&["ip", "-n", &c, "route", "add", "default", "via", gw_ip])?;
    sh(&[
        "ip",
        "netns",
        "exec",
        &host,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ])?;
    Ok((c, ip))
}

/// A value of `env`'s file.
pub fn env_var(env: &Path, key: &str) -> Result<String> {
    let text = std::fs::read_to_string(env)?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
        .with_context(|| format!("{key} not in {}:\n{text}", env.display()))
}

/// Gives container `c` (behind `cni0` on `host`) the IPv6 address `::2` of
/// the host's IPv6 subnet, with `cni0` at `::1` as its gateway, as flannel's
/// CNI plugin would from FLANNEL_IPV6_SUBNET.
pub fn add_container_ipv6(host: &str, c: &str, env: &Path) -> Result<String> {
    let gw = env_var(env, "FLANNEL_IPV6_SUBNET")?; // fd10:0:0:X::1/64
    let (gw_ip, len) = gw.split_once('/').context("FLANNEL_IPV6_SUBNET")?;
    let ip = format!("{}2", gw_ip.trim_end_matches('1'));
    sh(&["ip", "-n", host, "addr", "add", &gw, "dev", "cni0", "nodad"])?;
    sh(&[
        "ip",
        "-n",
        c,
        "addr",
        "add",
        &format!("{ip}/{len}"),
        "dev",
        "eth0",
        "nodad",
    ])?;
    sh(&["ip", "-n", c, "-6", "route", "add", "default", "via", gw_ip])?;
    Ok(ip)
}

/// Another container on host `host`'s bridge, for tests that need more than
/// one per host: `<host>-c<n>` with veth `v<n>`, address `.n` of the
/// host's subnet (from `env`), MTU 1450, default route via `.1`.
pub fn add_pod(host: &str, env: &Path, n: u8) -> Result<(String, String)> {
    let subnet = subnet_of(env)?;
    let prefix = subnet.rsplit_once('.').context("subnet")?.0.to_owned();
    let (ip, gw) = (format!("{prefix}.{n}"), format!("{prefix}.1"));
    let pod = format!("{host}-c{n}");
    let veth = format!("v{n}");
    sh(&["ip", "netns", "add", &pod])?;
    sh(&[
        "ip", "-n", host, "link", "add", &veth, "mtu", "1450", "type", "veth", "peer", "name",
        "eth0", "netns", &pod,
    ])?;
    sh(&[
        "ip", "-n", host, "link", "set", &veth, "master", "cni0", "up",
    ])?;
    sh(&[
        "ip",
        "-n",
        &pod,
        "addr",
        "add",
        &format!("{ip}/24"),
        "dev",
        "eth0",
    ])?;
    sh(&["ip", "-n", &pod, "link", "set", "eth0", "mtu", "1450", "up"])?;
    sh(&["ip", "-n", &pod, "link", "set", "lo", "up"])?;
    sh(&["ip", "-n", &pod, "route", "add", "default", "via", &gw])?;
    Ok((pod, ip))
}

/// Each `(from, to)`: container `from` reaches address `to` within 15 s,
/// then 5 pings 0.2 s apart all come back.
pub fn pings_both_ways(pairs: &[(&str, &str)]) -> Result<()> {
    for (from, to) in pairs {
        within(
            Duration::from_secs(15),
            &format!("{from} reaches {to}"),
            || sh(&["ip", "netns", "exec", from, "ping", "-c1", "-W1", to]).is_ok(),
        )?;
        let out = sh(&[
            "ip", "netns", "exec", from, "ping", "-c5", "-i0.2", "-W2", to,
        ])?;
        ensure!(out.contains(" 0% packet loss"), "{from} -> {to}:\n{out}");
    }
    Ok(())
}

/// The MAC address of `dev` in namespace `ns`.
pub fn link_mac(ns: &str, dev: &str) -> Result<String> {
    let out = sh(&["ip", "-n", ns, "-o", "link", "show", dev])?;
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(str::to_owned)
        .with_context(|| format!("no MAC for {dev} in {ns}: {out}"))
}

/// Container namespaces, deleted on drop.
pub struct Containers(pub Vec<String>);

impl Drop for Containers {
    fn drop(&mut self) {
        for c in &self.0 {
            let _ = sh(&["ip", "netns", "del", c]);
        }
    }
}

/// A namespace standing for the internet behind host `i`'s second
/// interface (`wan` in the host, `eth0` in it, 203.0.113.0/24). It knows no
/// route to the pods: only masqueraded replies come back. Deleted on drop.
pub struct Internet {
    pub ns: String,
}

impl Internet {
    /// The host's address on `wan`.
    pub const HOST_ADDR: &str = "203.0.113.1";
    /// The internet's address.
    pub const ADDR: &str = "203.0.113.2";

    pub fn behind(hosts: &Hosts, i: usize) -> Result<Internet> {
        let host = hosts.ns(i);
        let inet = Internet {
            ns: format!("{host}-inet"),
        };
        sh(&["ip", "netns", "add", &inet.ns])?;
        sh(&[
            "ip", "-n", &host, "link", "add", "wan", "type", "veth", "peer", "name", "eth0",
            "netns", &inet.ns,
        ])?;
        let host_addr = format!("{}/24", Self::HOST_ADDR);
        sh(&["ip", "-n", &host, "addr", "add", &host_addr, "dev", "wan"])?;
        sh(&["ip", "-n", &host, "link", "set", "wan", "up"])?;
        let addr = format!("{}/24", Self::ADDR);
        sh(&["ip", "-n", &inet.ns, "addr", "add", &addr, "dev", "eth0"])?;
        sh(&["ip", "-n", &inet.ns, "link", "set", "eth0", "up"])?;
        Ok(inet)
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.ns]);
    }
}

/// `overlay-agent <args> status` in namespace `ns`: what it printed, or an
/// error with what it said on stderr.
pub fn status(ns: &str, bin: &Path, args: &[String]) -> Result<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(bin)
        .args(args)
        .arg("status")
        .output()
        .context("running overlay-agent status")?;
    ensure!(
        out.status.success(),
        "overlay-agent status failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
