//! `cargo xtask image`: the runtime image, built on this machine with the
//! real dockerd and no registry.
//!
//! 1. The base: `debootstrap --variant=minbase` of the Debian release and
//!    mirror this machine's apt already uses, with the tools the agent
//!    drives ([`PACKAGES`]), stripped of documentation, locales and apt's
//!    lists, as a tarball (`target/image/base-<hash>.tar`, kept while the
//!    recipe stays the same: debootstrap is the slow part).
//! 2. The image: a dockerd of its own (in a network namespace of its own,
//!    so nothing of it touches the host's network) imports the base
//!    (`docker import`), `docker build` adds the release agent as
//!    `/opt/bin/overlay-agent`, the entrypoint, and `docker save` writes
//!    `target/image/overlay-agent-<hash>.tar`, which the tests `docker load`.
//!
//! The hash covers the recipe and the agent binary: a second run with
//! nothing changed finds the tarball and does nothing; a rebuilt agent makes
//! a new image. The last line on stdout is `<tag> <tarball>`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::run;

/// The repository part of the image's tags.
pub const REPO: &str = "overlay-agent";
/// What the agent runs (`ip`, `iptables-save`/`-restore` in the host's
/// backend, `nft`), what the etcd-mode DaemonSet's init container runs
/// (`etcdctl`), and the CA roots for an etcd with TLS. The agent itself
/// runs no `conntrack` (its fast path reads conntrack through the kernel).
pub const PACKAGES: &[&str] = &[
    "iproute2",
    "iptables",
    "nftables",
    "etcd-client",
    "ca-certificates",
];
/// Purged from the rootfs after debootstrap (`dpkg --purge
/// --force-remove-essential`, which still refuses anything another package
/// depends on): apt and its crypto, and what only an interactive system uses.
/// The image is never upgraded in place; it is rebuilt.
const PURGE: &[&str] = &[
    "apt",
    "libapt-pkg6.0",
    "gpgv",
    "libgnutls30",
    "libp11-kit0",
    "libtasn1-6",
    "libunistring2",
    "libidn2-0",
    "libnettle8",
    "libhogweed6",
    "libffi8",
    "tzdata",
    "e2fsprogs",
    "adduser",
    "passwd",
    "login",
];
/// Purged although packages still name them (`--force-depends`): debconf
/// and the Perl it runs are needed only by maintainer scripts, at install
/// time, and they weigh 10 MB, which the 100 MB budget does not have.
const PURGE_FORCED: &[&str] = &["debconf", "perl-base"];
/// Removed from the rootfs after debootstrap: nothing at run time reads them.
const STRIP: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/i18n",
    "usr/share/lintian",
    "usr/share/common-licenses",
    "var/lib/apt/lists",
    "var/cache/apt",
    "var/cache/debconf",
    "var/log",
    "usr/lib/x86_64-linux-gnu/gconv",
];
/// The agent's layer: the binary where the manifests run it, as entrypoint.
/// (deploy/Dockerfile's runtime stage makes the same layout.)
const AGENT_DOCKERFILE: &str = "FROM {base}
COPY overlay-agent /opt/bin/overlay-agent
ENTRYPOINT [\"/opt/bin/overlay-agent\"]
LABEL org.opencontainers.image.title=\"overlay-agent\" io.overlay.recipe=\"{hash}\"
";
/// Debian's dockerd and CLI, as in the tests.
const DOCKERD: &str = "/usr/sbin/dockerd";
const DOCKER: &str = "/usr/bin/docker";
const DAEMON_TIMEOUT: Duration = Duration::from_secs(60);

/// Builds the image unless the tarball for this recipe and agent exists;
/// prints `<tag> <tarball>` on stdout.
pub fn build(agent: &Path) -> Result<()> {
    let out_dir = crate::target_dir().join("image");
    fs::create_dir_all(&out_dir)?;
    let (suite, mirror) = apt_source()?;
    let base_hash = sha256_hex(base_recipe(&suite, &mirror).as_bytes());
    let base_hash = &base_hash[..16];
    let agent_hash = sha256_file(agent)?;
    let hash = sha256_hex(format!("{base_hash}\n{agent_hash}\n{AGENT_DOCKERFILE}").as_bytes());
    let hash = &hash[..16];
    let tag = format!("{REPO}:{hash}");
    let tarball = out_dir.join(format!("{REPO}-{hash}.tar"));
    if tarball.exists() {
        eprintln!(
            "xtask: image {tag} is up to date ({}, {:.1} MiB)",
            tarball.display(),
            mib(fs::metadata(&tarball)?.len())
        );
        println!("{tag} {}", tarball.display());
        return Ok(());
    }

    let base_tar = out_dir.join(format!("base-{base_hash}.tar"));
    if !base_tar.exists() {
        run::stage(
            &format!(
                "image: base rootfs (debootstrap --variant=minbase {suite} from {mirror}; about a minute)"
            ),
            || debootstrap(&suite, &mirror, &base_tar),
        )?;
    }
    remove_others(&out_dir, "base-", &base_tar)?;

    run::stage(
        &format!("image: {tag} (docker import, build, save)"),
        || {
            let docker = Dockerd::start(&out_dir.join(format!("dockerd-{}", std::process::id())))?;
            let base = format!("{REPO}-base:{base_hash}");
            docker.import(&base_tar, &base)?;
            let ctx = docker.dir.join("context");
            fs::create_dir_all(&ctx)?;
            // Without its symbol table, as `install -s` in deploy/Dockerfile:
            // 6 MB the image cannot afford.
            quiet(
                Command::new("strip")
                    .arg("-o")
                    .arg(ctx.join("overlay-agent"))
                    .arg(agent),
            )
            .context("stripping the agent (strip, from binutils)")?;
            fs::write(
                ctx.join("Dockerfile"),
                AGENT_DOCKERFILE
                    .replace("{base}", &base)
                    .replace("{hash}", hash),
            )?;
            docker.run(
                &[
                    "build",
                    "--quiet",
                    "-t",
                    &tag,
                    "-t",
                    &format!("{REPO}:latest"),
                ],
                Some(&ctx),
            )?;
            let size: u64 = docker
                .output(&["image", "inspect", "-f", "{{.Size}}", &tag])?
                .trim()
                .parse()
                .context("docker image inspect's size")?;
            eprintln!(
                "xtask: image {tag}: {:.1} MB ({:.1} MiB) as docker counts it",
                size as f64 / 1e6,
                mib(size),
            );
            // Checked before it is saved, so an image over budget is never cached.
            ensure!(
                size < 100_000_000,
                "the image weighs {:.1} MB, over the 100 MB it must stay under",
                size as f64 / 1e6
            );
            let tmp = tarball.with_extension("tar.tmp");
            docker.run(&["save", "-o", &tmp.to_string_lossy(), &tag], None)?;
            fs::rename(&tmp, &tarball)?;
            Ok(())
        },
    )?;
    remove_others(&out_dir, &format!("{REPO}-"), &tarball)?;
    eprintln!("xtask: image {tag} saved to {}", tarball.display());
    println!("{tag} {}", tarball.display());
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Everything the base depends on: a change makes a new base.
fn base_recipe(suite: &str, mirror: &str) -> String {
    format!(
        "debootstrap --variant=minbase {suite} {mirror}\ninclude {}\npurge {}\nforced {}\nstrip {}\n",
        PACKAGES.join(","),
        PURGE.join(","),
        PURGE_FORCED.join(","),
        STRIP.join(",")
    )
}

/// The Debian suite and mirror of this machine's apt sources (the deb822
/// `debian.sources` or the one-line `sources.list`), the first main archive.
fn apt_source() -> Result<(String, String)> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let Ok(text) = fs::read_to_string(&f) else {
            continue;
        };
        if let Some(found) = debian_source(&text) {
            return Ok(found);
        }
    }
    bail!("no Debian archive (a `debian` URI with a main suite) in /etc/apt/sources.list*")
}

/// The first Debian archive in one sources file (either format): its first
/// suite and its URI. Security, updates and backports suites are skipped.
pub fn debian_source(text: &str) -> Option<(String, String)> {
    let is_archive = |uri: &str| uri.trim_end_matches('/').ends_with("/debian");
    let is_main_suite = |s: &str| !s.contains('-') && !s.contains('/');
    // One-line format: `deb [options] uri suite components...`.
    for line in text.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let mut words = rest.split_whitespace().peekable();
        if words.peek().is_some_and(|w| w.starts_with('[')) {
            for w in words.by_ref() {
                if w.ends_with(']') {
                    break;
                }
            }
        }
        if let (Some(uri), Some(suite)) = (words.next(), words.next())
            && is_archive(uri)
            && is_main_suite(suite)
        {
            return Some((suite.to_owned(), uri.to_owned()));
        }
    }
    // deb822: stanzas separated by blank lines.
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == name).then(|| v.trim().to_owned())
            })
        };
        let (Some(types), Some(uris), Some(suites)) =
            (field("Types"), field("URIs"), field("Suites"))
        else {
            continue;
        };
        if !types.split_whitespace().any(|t| t == "deb") {
            continue;
        }
        let Some(uri) = uris.split_whitespace().find(|u| is_archive(u)) else {
            continue;
        };
        if let Some(suite) = suites.split_whitespace().find(|s| is_main_suite(s)) {
            return Some((suite.to_owned(), uri.to_owned()));
        }
    }
    None
}

/// debootstrap into a scratch directory, strip it, tar it to `out`.
fn debootstrap(suite: &str, mirror: &str, out: &Path) -> Result<()> {
    ensure!(
        Path::new("/usr/sbin/debootstrap").exists(),
        "debootstrap is missing: run `cargo xtask setup`"
    );
    let rootfs = out.with_extension("rootfs");
    if rootfs.exists() {
        fs::remove_dir_all(&rootfs)?;
    }
    let log = out.with_extension("debootstrap.log");
    let mut cmd = Command::new("debootstrap");
    cmd.arg("--variant=minbase")
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg(suite)
        .arg(&rootfs)
        .arg(mirror);
    let line = run::display(&cmd);
    eprintln!("$ {line} > {}", log.display());
    let st = cmd
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log)?)
        .stderr(fs::File::options().append(true).open(&log)?)
        .status()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !st.success() {
        let text = fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("`{line}` failed ({st}):\n{}", tail.join("\n"));
    }
    let mut purge = Command::new("chroot");
    purge
        .arg(&rootfs)
        .args(["dpkg", "--purge", "--force-remove-essential"])
        .args(PURGE)
        .env("DEBIAN_FRONTEND", "noninteractive");
    quiet(&mut purge)?;
    let mut forced = Command::new("chroot");
    forced
        .arg(&rootfs)
        .args([
            "dpkg",
            "--purge",
            "--force-remove-essential",
            "--force-depends",
        ])
        .args(PURGE_FORCED)
        .env("DEBIAN_FRONTEND", "noninteractive");
    quiet(&mut forced)?;
    let audit = Command::new("chroot")
        .arg(&rootfs)
        .args(["dpkg", "--audit"])
        .output()?;
    ensure!(
        audit.status.success() && audit.stdout.is_empty(),
        "dpkg --audit after the purge: {}",
        String::from_utf8_lossy(&audit.stdout)
    );
    for s in STRIP {
        let p = rootfs.join(s);
        if p.is_dir() {
            fs::remove_dir_all(&p)?;
            fs::create_dir_all(&p)?;
        } else if p.exists() {
            fs::remove_file(&p)?;
        }
    }
    let tmp = out.with_extension("tar.tmp");
    run::status(
        Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .args(["--numeric-owner", "-cf"])
            .arg(&tmp)
            .arg("."),
    )?;
    fs::rename(&tmp, out)?;
    fs::remove_dir_all(&rootfs)?;
    let _ = fs::remove_file(&log);
    Ok(())
}

/// Runs a command (echoed) with its output shown only if it fails: dpkg
/// warns about every essential package it is forced to remove.
fn quiet(cmd: &mut Command) -> Result<()> {
    let line = run::display(cmd);
    eprintln!("$ {line}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{line}`"))?;
    ensure!(
        out.status.success(),
        "`{line}` failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Removes the other files in `dir` named `<prefix>...tar` (older builds).
fn remove_others(dir: &Path, prefix: &str, keep: &Path) -> Result<()> {
    for e in fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) && name.ends_with(".tar") && e.path() != keep {
            fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

fn sha256_hex(data: &[u8]) -> String {
    let tmp = std::env::temp_dir().join(format!("xtask-hash-{}", std::process::id()));
    let r = fs::write(&tmp, data)
        .map_err(anyhow::Error::from)
        .and_then(|()| sha256_file(&tmp));
    let _ = fs::remove_file(&tmp);
    r.unwrap_or_else(|e| panic!("sha256sum: {e:#}"))
}

fn sha256_file(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .context("running sha256sum")?;
    ensure!(out.status.success(), "sha256sum {} failed", path.display());
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// A dockerd of our own for one build: its state in `dir`, its network
/// namespace its own (`unshare --net`: no bridge, no iptables rules, no
/// sysctls on the host), stopped and removed on drop.
struct Dockerd {
    dir: PathBuf,
    child: Child,
}

impl Dockerd {
    fn start(dir: &Path) -> Result<Dockerd> {
        ensure!(
            Path::new(DOCKERD).exists() && Path::new(DOCKER).exists(),
            "{DOCKERD} or {DOCKER} is missing: run `cargo xtask setup` (docker.io)"
        );
        if dir.exists() {
            fs::remove_dir_all(dir)?;
        }
        fs::create_dir_all(dir)?;
        let d = dir.display();
        fs::write(
            dir.join("daemon.json"),
            format!("{{\"deprecated-key-path\": \"{d}/key.json\"}}\n"),
        )?;
        let log = fs::File::create(dir.join("dockerd.log"))?;
        let child = Command::new("unshare")
            .arg("--net")
            .arg(DOCKERD)
            .arg(format!("--config-file={d}/daemon.json"))
            .arg(format!("--data-root={d}/data"))
            .arg(format!("--exec-root={d}/exec"))
            .arg(format!("--pidfile={d}/dockerd.pid"))
            .arg(format!("--host=unix://{d}/docker.sock"))
            .args([
                "--bridge=none",
                "--iptables=false",
                "--ip-forward=false",
                "--ip-masq=false",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dockerd")?;
        let mut docker = Dockerd {
            dir: dir.to_owned(),
            child,
        };
        let t0 = Instant::now();
        while docker.output(&["version"]).is_err() {
            if let Some(st) = docker.child.try_wait()? {
                bail!("dockerd exited ({st}):\n{}", docker.log_tail());
            }
            if t0.elapsed() > DAEMON_TIMEOUT {
                bail!(
                    "dockerd did not answer within {DAEMON_TIMEOUT:?}:\n{}",
                    docker.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(docker)
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn cli(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(DOCKER);
        cmd.args(["-H", &format!("unix://{}/docker.sock", self.dir.display())])
            .args(args)
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .env("DOCKER_BUILDKIT", "0");
        cmd
    }

    fn output(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args).stdin(Stdio::null()).output()?;
        ensure!(
            out.status.success(),
            "`docker {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `docker <args> [ctx]`, echoed, its output shown only if it fails.
    fn run(&self, args: &[&str], ctx: Option<&Path>) -> Result<()> {
        let mut cmd = self.cli(args);
        if let Some(ctx) = ctx {
            cmd.arg(ctx);
        }
        quiet(&mut cmd)
    }

    /// `docker import <tar> <tag>` (the tarball is read by the CLI).
    fn import(&self, tar: &Path, tag: &str) -> Result<()> {
        quiet(self.cli(&["import"]).arg(tar).arg(tag))
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our child (unshare exec'd dockerd), not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let t0 = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) {
            if t0.elapsed() > DAEMON_TIMEOUT {
                eprintln!("xtask: dockerd did not stop within {DAEMON_TIMEOUT:?}; killing it");
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // dockerd unmounts its layers when it stops; anything left is unmounted here.
        let prefix = format!("{}/", self.dir.display());
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mounts: Vec<&str> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("xtask: removing {}: {e}", self.dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_debian_archive_in_either_format() {
        let deb822 = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                      Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            debian_source(deb822),
            Some(("bookworm".into(), "http://deb.debian.org/debian".into()))
        );
        let one_line = "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n\
                        deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ trixie main\n";
        assert_eq!(
            debian_source(one_line),
            Some(("trixie".into(), "http://mirror.example/debian/".into()))
        );
        assert_eq!(
            debian_source("deb https://deb.nodesource.com/node_20.x nodistro main"),
            None
        );
    }
}
