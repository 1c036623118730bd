//! The binaries the end-to-end tests run as separate processes.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use anyhow::{Context, Result, bail};

/// The `overlay-agent` binary of this build profile, built on demand (once
/// per test process): a test crate does not get another package's binaries
/// built for it.
pub fn agent() -> Result<PathBuf> {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    if let Some(bin) = BUILT.get() {
        return Ok(bin.clone());
    }
    let bin = build_agent()?;
    Ok(BUILT.get_or_init(|| bin).clone())
}

fn build_agent() -> Result<PathBuf> {
    // Test binaries live in `<profile>/deps`, the tools (`cpbench`) in `<profile>`.
    let exe = std::env::current_exe()?;
    let mut target = exe
        .parent()
        .context("locating the target directory")?
        .to_path_buf();
    if target.ends_with("deps") {
        target.pop();
    }
    let bin = target.join("overlay-agent");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "-p",
        "overlay-agent",
        "--bin",
        "overlay-agent",
        "--manifest-path",
    ])
    .arg(&manifest)
    // Into the target directory we run from, whatever CARGO_TARGET_DIR says
    // (a tool started by hand without it would build a second tree).
    .arg("--target-dir")
    .arg(target.parent().context("the target directory")?);
    if target.ends_with("release") {
        cmd.arg("--release");
    }
    scrub_cargo_env(&mut cmd);
    // Quiet unless it fails: cargo replays the eBPF build script's warnings
    // on every call, which buried the test failures in CI's output.
    let out = cmd.output().context("building overlay-agent")?;
    if !out.status.success() {
        bail!(
            "building overlay-agent failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(bin)
}

/// Removes the variables `cargo test` gives a test that a cargo started
/// from it must not see: the test crate's CARGO_PKG_* and CARGO_MANIFEST_*,
/// which ring's build script declares it depends on: passed on, they make
/// this build and the next `cargo test` rebuild ring and everything above
/// it, in turn.
pub fn scrub_cargo_env(cmd: &mut Command) {
    for (name, _) in std::env::vars_os() {
        let n = name.to_string_lossy();
        if n.starts_with("CARGO_PKG_")
            || n.starts_with("CARGO_MANIFEST_")
            || n == "CARGO_CRATE_NAME"
            || n == "CARGO_PRIMARY_PACKAGE"
        {
            cmd.env_remove(&name);
        }
    }
}

/// The eBPF object the agent embeds, as built for this profile: the
/// "rebuilt program" an upgrade test swaps in (loaded anew, so it gets new
/// program ids).
pub fn ebpf_object() -> Result<PathBuf> {
    let target = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .context("target directory")?
        .to_path_buf();
    let mut found = Vec::new();
    for entry in std::fs::read_dir(target.join("build"))? {
        let p = entry?.path().join("out/overlay");
        let is_ours = p
            .parent()
            .and_then(Path::parent)
            .and_then(Path::file_name)
            .is_some_and(|n| n.to_string_lossy().starts_with("overlay-agent-"));
        if is_ours && p.is_file() {
            found.push((std::fs::metadata(&p)?.modified()?, p));
        }
    }
    found.sort();
    found
        .pop()
        .map(|(_, p)| p)
        .context("no overlay-agent build output with the eBPF object")
}
