//! Running the tools xtask orchestrates: every command is echoed before it
//! runs so a CI log shows exactly what happened, and a failure names the command.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};

/// A command line as it is shown in logs and errors.
pub fn display(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        // PATH is only ever extended with $CARGO_HOME/bin; printing it is noise.
        if let Some(v) = v.filter(|_| k != "PATH") {
            s.push_str(&format!("{}={} ", k.to_string_lossy(), v.to_string_lossy()));
        }
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs one stage of a command between two lines of its own: what it
/// does, then how long it took (or that it failed, and after how long).
pub fn stage<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let t0 = std::time::Instant::now();
    eprintln!("xtask: {what} ...");
    let out = f();
    let secs = t0.elapsed().as_secs_f64();
    match &out {
        Ok(_) => eprintln!("xtask: {what}: done in {secs:.1} s"),
        Err(_) => eprintln!("xtask: {what}: failed after {secs:.1} s"),
    }
    out
}

/// Runs a command with inherited stdio and fails unless it exits 0.
pub fn status(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    eprintln!("$ {line}");
    let st = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !st.success() {
        bail!("`{line}` failed ({st})");
    }
    Ok(())
}

/// Replaces this process with `cmd` (echoed first); returns only if that fails.
pub fn exec(cmd: &mut Command) -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    let line = display(cmd);
    eprintln!("$ {line}");
    let err = cmd.exec();
    anyhow::Error::new(err).context(format!("cannot exec `{line}`"))
}

/// Runs a probe quietly and returns its output; `None` when the program is absent.
/// Probes are cheap checks whose exit status the caller interprets.
pub fn probe<I, S>(program: &str, args: I) -> Option<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
}

/// The cargo that started xtask (the same toolchain the user asked for).
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd.env("PATH", path_with_cargo_bin());
    cmd
}

/// `rustup run <toolchain> <program>`, with the variables that would pin the
/// outer (stable) toolchain removed so the inner one is really used.
pub fn rustup_run(toolchain: &str, program: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", toolchain, program]);
    cmd.current_dir(workspace_root());
    cmd.env("PATH", path_with_cargo_bin());
    for key in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
    ] {
        cmd.env_remove(key);
    }
    cmd
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// `$CARGO_HOME/bin`, where `cargo install` puts bpf-linker.
pub fn cargo_bin_dir() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        });
    home.join("bin")
}

/// PATH with `$CARGO_HOME/bin` first, so a bpf-linker installed by this very run
/// is found by rustc even if the caller's PATH lacks that directory.
pub fn path_with_cargo_bin() -> std::ffi::OsString {
    let bin = cargo_bin_dir();
    let current = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&current).any(|p| p == bin) {
        return current;
    }
    let mut paths = vec![bin];
    paths.extend(std::env::split_paths(&current));
    std::env::join_paths(paths).unwrap_or(current)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} needs root (network namespaces, eBPF, apt-get); run it as root");
    }
    Ok(())
}
