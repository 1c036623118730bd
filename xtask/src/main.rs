//! Project tasks. Built with the machine's stable Rust before anything else is
//! installed, so it depends on nothing of ours and on little else.

mod run;
mod setup;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Set up, build, test, demo and benchmark the overlay"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks (Debian packages, pinned nightly, bpf-linker, bpffs). Idempotent.
    Setup,
    /// Set up if needed, then build the release agent (the eBPF object is embedded in it).
    Build,
    /// Set up if needed; fmt, clippy (host and BPF), and every test including the root-only ones.
    Test {
        /// Only run tests whose names contain one of these (passed to the test binaries).
        filters: Vec<String>,
    },
    /// Set up if needed, build, and run the lab: two hosts over the eBPF datapath, pinged across.
    Lab {
        /// Arguments for the lab binary (see `cargo xtask lab -- --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up if needed, build, and benchmark plain routing vs kernel vxlan vs eBPF.
    Bench {
        /// Arguments for the bench binary (see `cargo xtask bench -- --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() {
    // Errors are reported in one line (with their causes), not with the
    // backtrace anyhow would add under RUST_BACKTRACE: the failing command's
    // own output above it is what matters.
    if let Err(e) = dispatch(Cli::parse().cmd) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Setup => setup::ensure(),
        Cmd::Build => {
            setup::ensure()?;
            build()
        }
        Cmd::Test { filters } => {
            run::require_root("`cargo xtask test` (the end-to-end tests)")?;
            setup::ensure()?;
            test::run(&filters)
        }
        Cmd::Lab { args } => run_tool("lab", &args),
        Cmd::Bench { args } => run_tool("bench", &args),
    }
}

fn build() -> Result<()> {
    run::status(run::cargo().args(["build", "--release", "--package", "overlay-agent"]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| run::workspace_root().join("target"));
    let bin = target.join("release/overlay-agent");
    if let Ok(meta) = std::fs::metadata(&bin) {
        eprintln!(
            "built {} ({:.1} MiB)",
            bin.display(),
            meta.len() as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}

/// Runs one of overlay-tests' binaries (release build, root).
fn run_tool(bin: &str, args: &[String]) -> Result<()> {
    run::require_root(&format!("`cargo xtask {bin}`"))?;
    setup::ensure()?;
    build()?;
    run::status(
        run::cargo()
            .args([
                "run",
                "--quiet",
                "--release",
                "--package",
                "overlay-tests",
                "--bin",
                bin,
                "--",
            ])
            .args(args),
    )
}
