//! A real `dockerd` (Debian's `docker.io`) in a lab host's network namespace,
//! with a busybox image made on the spot, removed with everything it made.
//!
//! dockerd is started with `nsenter --net=/run/netns/<ns>`, not `ip netns
//! exec`: the latter remounts `/sys`, which hides the cgroup hierarchy from
//! it. Its state (data root, exec root, pidfile, socket, daemon.json, the
//! trust key) lives under one directory of its own and its containers'
//! cgroups under a cgroup parent of its own, so [`Dockerd::stop`] can remove
//! every trace and check that none is left. No registry is reachable: the
//! image is `tar -C rootfs -c . | docker import - <tag>` of a directory
//! holding the static busybox and links to its applets.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

/// Debian's daemon and CLI by path: another `docker` earlier on PATH (a
/// newer static CLI, say) must not be what the test talks to the daemon with.
pub const DOCKERD: &str = "/usr/sbin/dockerd";
pub const DOCKER: &str = "/usr/bin/docker";
/// The static busybox of `busybox-static`: the image's only binary.
pub const BUSYBOX: &str = "/bin/busybox";
/// What the image's `/bin` links to busybox.
const APPLETS: &[&str] = &[
    "sh",
    "sleep",
    "cat",
    "head",
    "nc",
    "netstat",
    "pidof",
    "ping",
    "sha256sum",
    "timeout",
    "ip",
];
/// Longest a docker CLI call may take (it is killed by `timeout` after that).
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// How long dockerd gets to answer its socket after starting, and to exit
/// after SIGTERM.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(60);

/// Directories outside its own that dockerd and its containerd create on the
/// host whatever the flags (`/run/docker/plugins`, the shims' sockets in
/// `/run/containerd/s`), deepest first; `/etc/docker` would hold the trust
/// key if daemon.json did not move it.
const HOST_DIRS: &[&str] = &[
    "/run/docker/plugins",
    "/run/docker",
    "/run/containerd/s",
    "/run/containerd",
    "/etc/docker",
];

/// Notes which of [`HOST_DIRS`] are absent before the daemons start and
/// removes those again (only while empty, so nobody else's files go).
/// Drop it after every [`Dockerd`].
pub struct HostDirs(Vec<&'static str>);

impl HostDirs {
    pub fn note() -> HostDirs {
        HostDirs(
            HOST_DIRS
                .iter()
                .copied()
                .filter(|d| !Path::new(d).exists())
                .collect(),
        )
    }

    /// Removes them and fails naming any that stays.
    pub fn remove(&self) -> Result<()> {
        for d in &self.0 {
            let _ = fs::remove_dir(d);
        }
        let left: Vec<&str> = self
            .0
            .iter()
            .copied()
            .filter(|d| Path::new(d).exists())
            .collect();
        ensure!(left.is_empty(), "dockerd left {left:?} behind");
        Ok(())
    }
}

impl Drop for HostDirs {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("docker cleanup: {e:#}");
        }
    }
}

/// One dockerd in a network namespace. Dropping it stops it and removes
/// everything it made; [`Dockerd::stop`] does the same and says what failed.
pub struct Dockerd {
    pub ns: String,
    /// Holds all of its state; removed on stop.
    pub dir: PathBuf,
    /// The containers' cgroups are `/sys/fs/cgroup/<controller>/<this>/<id>`.
    cgroup_parent: String,
    child: Option<Child>,
}

impl Dockerd {
    /// `dockerd` in `ns` with `options` (e.g. `$DOCKER_OPTS` split on
    /// whitespace, as systemd expands it), answering on its socket.
    pub fn start(ns: &str, dir: &Path, options: &[String]) -> Result<Dockerd> {
        ensure!(
            Path::new(DOCKERD).exists() && Path::new(DOCKER).exists(),
            "{DOCKERD} or {DOCKER} is missing: install docker.io (cargo xtask setup)"
        );
        ensure!(!dir.exists(), "{} exists already", dir.display());
        fs::create_dir_all(dir)?;
        // dockerd 20.10 keeps its trust key in /etc/docker/key.json unless told otherwise.
        fs::write(
            dir.join("daemon.json"),
            format!(
                "{{\"deprecated-key-path\": \"{}/key.json\"}}\n",
                dir.display()
            ),
        )?;
        let cgroup_parent = format!("/{}", dir.file_name().unwrap().to_string_lossy());
        let log = fs::File::create(dir.join("dockerd.log"))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}"))
            .arg(DOCKERD)
            .args(Self::own_flags(dir, &cgroup_parent))
            .args(options)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("spawning nsenter dockerd")?;
        // From here on, Drop cleans up whatever happens.
        let mut d = Dockerd {
            ns: ns.to_owned(),
            dir: dir.to_owned(),
            cgroup_parent,
            child: Some(child),
        };
        let t0 = Instant::now();
        loop {
            if let Some(st) = d.child.as_mut().unwrap().try_wait()? {
                bail!(
                    "dockerd in {ns} exited ({st}) while starting:\n{}",
                    d.log_tail(40)
                );
            }
            if d.docker(&["version", "--format", "{{.Server.Version}}"])
                .is_ok()
            {
                return Ok(d);
            }
            if t0.elapsed() > DAEMON_TIMEOUT {
                bail!(
                    "dockerd in {ns} did not answer within {DAEMON_TIMEOUT:?}:\n{}",
                    d.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The flags that keep this daemon's state apart from any other's.
    pub fn own_flags(dir: &Path, cgroup_parent: &str) -> Vec<String> {
        let d = dir.display();
        vec![
            format!("--config-file={d}/daemon.json"),
            format!("--data-root={d}/data"),
            format!("--exec-root={d}/exec"),
            format!("--pidfile={d}/dockerd.pid"),
            format!("--host=unix://{d}/docker.sock"),
            format!("--cgroup-parent={cgroup_parent}"),
        ]
    }

    pub fn socket(&self) -> String {
        format!("unix://{}/docker.sock", self.dir.display())
    }

    /// `docker -H <socket> <args>`, killed after [`CLI_TIMEOUT`]; its stdout.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        let out = self
            .cli(args)
            .stdin(Stdio::null())
            .output()
            .context("spawning docker")?;
        if !out.status.success() {
            bail!(
                "`docker {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn cli(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("timeout");
        cmd.arg(CLI_TIMEOUT.as_secs().to_string())
            .arg(DOCKER)
            .args(["-H", &self.socket()])
            .args(args)
            // The CLI's own config stays in our directory, not in ~/.docker.
            .env("DOCKER_CONFIG", self.dir.join("cli"));
        cmd
    }

    /// `tar -C rootfs -c . | docker import - <tag>` of a rootfs holding
    /// [`BUSYBOX`] as `/bin/busybox` with links named after its applets.
    pub fn import_busybox(&self, tag: &str) -> Result<()> {
        let rootfs = self.dir.join("rootfs");
        fs::create_dir_all(rootfs.join("bin"))?;
        fs::create_dir_all(rootfs.join("tmp"))?;
        fs::copy(BUSYBOX, rootfs.join("bin/busybox"))
            .with_context(|| format!("copying {BUSYBOX}: install busybox-static"))?;
        for a in APPLETS {
            symlink("busybox", rootfs.join("bin").join(a))?;
        }
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .context("spawning tar")?;
        let out = self
            .cli(&["import", "-", tag])
            .stdin(tar.stdout.take().context("tar's stdout")?)
            .output()
            .context("spawning docker import")?;
        let tar_status = tar.wait()?;
        ensure!(
            tar_status.success(),
            "tar of {} failed: {tar_status}",
            rootfs.display()
        );
        ensure!(
            out.status.success(),
            "docker import failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// `docker logs <container>`: what it wrote to stdout and stderr.
    pub fn logs(&self, container: &str) -> String {
        match self.cli(&["logs", container]).stdin(Stdio::null()).output() {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("(docker logs {container}: {e})"),
        }
    }

    /// `docker load` of a tarball `docker save` wrote (the runtime image).
    pub fn load(&self, tarball: &Path) -> Result<()> {
        self.docker(&["load", "--quiet", "--input", &tarball.to_string_lossy()])
            .map(drop)
    }

    /// The last `n` lines of dockerd's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Removes the containers, stops dockerd (SIGTERM, SIGKILL after
    /// [`DAEMON_TIMEOUT`]), kills whatever of its processes and containers
    /// survived, removes its cgroups, unmounts what it mounted under its
    /// directory, removes that, and fails naming anything left.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let mut failures = Vec::new();
        if child.try_wait()?.is_none() {
            match self.docker(&["ps", "-aq"]) {
                Ok(ids) => {
                    let ids: Vec<&str> = ids.split_whitespace().collect();
                    if !ids.is_empty() {
                        let mut args = vec!["rm", "-f"];
                        args.extend(ids);
                        if let Err(e) = self.docker(&args) {
                            failures.push(format!("{e:#}"));
                        }
                    }
                }
                Err(e) => failures.push(format!("{e:#}")),
            }
            // SAFETY: kill(2) on our child (nsenter exec'd dockerd), not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let t0 = Instant::now();
            while child.try_wait()?.is_none() {
                if t0.elapsed() > DAEMON_TIMEOUT {
                    failures.push(format!(
                        "dockerd did not exit within {DAEMON_TIMEOUT:?} of SIGTERM"
                    ));
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // containerd and its shims name our directory on their command line;
        // container processes are in our cgroups.
        let dir = self.dir.to_string_lossy().into_owned();
        for _ in 0..50 {
            let pids: Vec<u32> = processes_naming(&dir)
                .into_iter()
                .chain(self.cgroup_tasks())
                .collect();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                // SAFETY: kill(2) on a process of this daemon's (found above).
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Err(e) = self.remove_cgroups() {
            failures.push(format!("{e:#}"));
        }
        for m in mounts_under(&self.dir) {
            if let Err(e) = crate::agent::sh(&["umount", "-l", &m]) {
                failures.push(format!("{e:#}"));
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            failures.push(format!("removing {dir}: {e}"));
        }
        let left_procs = processes_naming(&dir);
        if !left_procs.is_empty() {
            failures.push(format!("processes of dockerd left: {left_procs:?}"));
        }
        let left_mounts = mounts_under(&self.dir);
        if !left_mounts.is_empty() {
            failures.push(format!("mounts left: {left_mounts:?}"));
        }
        if !self.cgroup_dirs().is_empty() {
            failures.push(format!("cgroups left: {:?}", self.cgroup_dirs()));
        }
        if self.dir.exists() {
            failures.push(format!("{dir} is still there"));
        }
        ensure!(
            failures.is_empty(),
            "stopping dockerd in {}: {}",
            self.ns,
            failures.join("; ")
        );
        Ok(())
    }

    /// `<hierarchy>/<cgroup parent>` in every mounted hierarchy that has it
    /// (one per controller on cgroup v1, one on v2).
    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let parent = self.cgroup_parent.trim_start_matches('/');
        let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
        if let Ok(rd) = fs::read_dir("/sys/fs/cgroup") {
            roots.extend(rd.flatten().map(|e| e.path()));
        }
        roots
            .into_iter()
            .map(|r| r.join(parent))
            .filter(|p| p.is_dir())
            .collect()
    }

    fn cgroup_tasks(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        for d in self.cgroup_dirs() {
            for sub in subdirs_deepest_first(&d) {
                if let Ok(t) = fs::read_to_string(sub.join("cgroup.procs")) {
                    pids.extend(t.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
                }
            }
        }
        pids
    }

    fn remove_cgroups(&self) -> Result<()> {
        for d in self.cgroup_dirs() {
            for sub in subdirs_deepest_first(&d) {
                // A cgroup goes once its last task has been reaped: retry a little.
                let mut tries = 0;
                while let Err(e) = fs::remove_dir(&sub) {
                    tries += 1;
                    if tries > 50 {
                        bail!("removing cgroup {}: {e}", sub.display());
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        Ok(())
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("docker cleanup: {e:#}");
        }
    }
}

/// `dir` and every directory below it, children before their parents.
fn subdirs_deepest_first(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(subdirs_deepest_first(&e.path()));
            }
        }
    }
    out.push(dir.to_owned());
    out
}

/// Mount points at or below `dir` in our mount namespace, deepest first.
fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| *m == prefix || m.starts_with(&format!("{prefix}/")))
        .map(str::to_owned)
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    mounts.dedup();
    mounts
}

/// Processes (other than this one) whose command line contains `needle`.
fn processes_naming(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

/// The options of a docker env file's `key` (e.g. `DOCKER_OPTS`) as
/// systemd passes `$key` to dockerd: unquoted, split on whitespace.
pub fn options_from_env_file(path: &Path, key: &str) -> Result<Vec<String>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let vars = overlay_agent::flannel::subnet_env::parse_env(&text);
    let value = vars
        .get(key)
        .with_context(|| format!("{} has no {key}:\n{text}", path.display()))?;
    Ok(value.split_whitespace().map(str::to_owned).collect())
}
