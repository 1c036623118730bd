//! Builds the eBPF object with the pinned nightly and bpf-linker (installed by
//! `cargo xtask setup`) so that the agent binary embeds it and is self-contained.
//!
//! aya-build replays the inner cargo's whole output as `cargo:warning=`
//! lines, which cargo prints on every build that runs this script: twenty
//! lines of "warning: ... Compiling" that read as a broken build. So its
//! directives are captured: the build's output goes to this script's stderr,
//! which cargo shows when the build fails (and with `-vv`), and only the
//! `rerun-if` directives reach cargo. `OVERLAY_EBPF_BUILD_VERBOSE=1` keeps
//! the old warnings.

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom, Write},
    os::fd::AsRawFd,
    path::PathBuf,
};

use anyhow::{Context, Result};

/// The dated nightly whose LLVM (22) is the one bpf-linker is built against
/// (`cargo xtask setup` installs both: xtask/src/setup/toolchain.rs).
const EBPF_TOOLCHAIN: &str = "nightly-2026-07-20";
const VERBOSE: &str = "OVERLAY_EBPF_BUILD_VERBOSE";

fn main() -> Result<()> {
    println!("cargo:rerun-if-env-changed={VERBOSE}");
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root_dir = format!("{manifest_dir}/../overlay-ebpf");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let (result, directives) = with_stdout_captured(&out_dir.join("ebpf-build.log"), || {
        aya_build::build_ebpf(
            [aya_build::Package {
                name: "overlay-ebpf",
                root_dir: &root_dir,
                ..Default::default()
            }],
            aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
        )
    })?;
    let verbose = std::env::var_os(VERBOSE).is_some_and(|v| v == "1");
    let mut stderr = std::io::stderr().lock();
    for line in directives.lines() {
        match line.strip_prefix("cargo:warning=") {
            Some(output) if verbose => println!("cargo:warning={output}"),
            Some(output) => writeln!(stderr, "{output}")?,
            None => println!("{line}"),
        }
    }
    result
}

/// Runs `f` with this process's stdout (fd 1) sent to `log`; returns what
/// `f` returned and what it printed.
fn with_stdout_captured<T>(log: &std::path::Path, f: impl FnOnce() -> T) -> Result<(T, String)> {
    let mut file = File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(log)
        .with_context(|| format!("creating {}", log.display()))?;
    std::io::stdout().flush()?;
    // SAFETY: dup and dup2 on valid descriptors; fd 1 is restored below
    // before anything else is printed.
    let saved = unsafe { libc::dup(1) };
    anyhow::ensure!(saved >= 0, "dup(1): {}", std::io::Error::last_os_error());
    anyhow::ensure!(
        unsafe { libc::dup2(file.as_raw_fd(), 1) } >= 0,
        "dup2: {}",
        std::io::Error::last_os_error()
    );
    let out = f();
    std::io::stdout().flush()?;
    let restored = unsafe { libc::dup2(saved, 1) };
    unsafe { libc::close(saved) };
    anyhow::ensure!(
        restored >= 0,
        "restoring stdout: {}",
        std::io::Error::last_os_error()
    );
    let mut printed = String::new();
    file.seek(SeekFrom::Start(0))?;
    file.read_to_string(&mut printed)?;
    Ok((out, printed))
}
