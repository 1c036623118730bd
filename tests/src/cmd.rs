//! Running external tools (iproute2, bridge, tcpdump, tshark, bpftool), either
//! in the caller's namespace or inside a named network namespace.
//!
//! Every failure names the full command line, its exit status and its stderr,
//! so a failing lab step says exactly what the kernel refused.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Builds `ip netns exec <ns> <args...>` (or just `<args...>` when `ns` is `None`).
pub fn command(ns: Option<&str>, args: &[&str]) -> Command {
    let mut cmd;
    match ns {
        Some(ns) => {
            cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]);
            cmd.args(args);
        }
        None => {
            cmd = Command::new(args[0]);
            cmd.args(&args[1..]);
        }
    }
    cmd
}

fn describe(ns: Option<&str>, args: &[&str]) -> String {
    match ns {
        Some(ns) => format!("[{ns}] {}", args.join(" ")),
        None => args.join(" "),
    }
}

/// Runs a command to completion and returns its stdout; a non-zero exit is an error.
pub fn run(ns: Option<&str>, args: &[&str]) -> Result<String> {
    let out = command(ns, args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning `{}`", describe(ns, args)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            describe(ns, args),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command inside namespace `ns`.
pub fn run_in(ns: &str, args: &[&str]) -> Result<String> {
    run(Some(ns), args)
}

/// `ip -n <ns> <args...>`: iproute2 switches namespace itself, which is cheaper
/// than `ip netns exec` (no remount of /sys).
pub fn ip(ns: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["ip", "-n", ns];
    full.extend_from_slice(args);
    run(None, &full)
}

/// A process running in the background, killed (SIGKILL) and reaped when dropped,
/// so a panicking test leaves no capture or traffic generator behind.
pub struct Background {
    what: String,
    child: Option<Child>,
}

impl Background {
    /// Starts `args` inside `ns` (via `ip netns exec`, which execs the tool, so the
    /// child pid is the tool's own).
    pub fn spawn(ns: Option<&str>, args: &[&str]) -> Result<Background> {
        let what = describe(ns, args);
        let child = command(ns, args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning `{what}`"))?;
        Ok(Background {
            what,
            child: Some(child),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits until a line of the child's stderr contains `needle` (e.g. tcpdump's
    /// "listening on"), failing if the child exits or `timeout` passes first.
    /// The rest of stderr keeps being drained in a thread so the child never blocks.
    pub fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let child = self.child.as_mut().context("process already stopped")?;
        let stderr = child.stderr.take().context("stderr already taken")?;
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    // Nobody listens any more: keep draining so the child never blocks.
                    continue;
                }
            }
        });
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(()),
                Ok(line) => seen.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!(
                        "`{}`: no {needle:?} on stderr within {timeout:?}; saw: {}",
                        self.what,
                        seen.join(" | ")
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().ok();
                    bail!(
                        "`{}` exited ({status:?}) before printing {needle:?}: {}",
                        self.what,
                        seen.join(" | ")
                    )
                }
            }
        }
    }

    /// Waits for the process to end by itself (killing it after `limit`)
    /// and returns what it printed on stdout (which must fit the pipe: for
    /// tools with short summaries such as `ping -q` or `iperf3 -J`).
    pub fn wait_output(mut self, limit: Duration) -> Result<String> {
        use std::io::Read;
        let mut child = self.child.take().context("process already stopped")?;
        let deadline = Instant::now() + limit;
        while child.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("`{}` still running after {limit:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut out = String::new();
        if let Some(mut stdout) = child.stdout.take() {
            stdout.read_to_string(&mut out)?;
        }
        Ok(out)
    }

    /// Asks the process to finish (SIGTERM, so e.g. tcpdump flushes its file) and
    /// waits for it, killing it if it has not finished within `timeout`.
    pub fn stop(mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("process already stopped")?;
        // SAFETY: plain kill(2) on the pid of a child we have not reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let status = child.wait()?;
                bail!(
                    "`{}` did not stop within {timeout:?} after SIGTERM ({status})",
                    self.what
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
