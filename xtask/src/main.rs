//! Project tasks. Built with the machine's stable Rust before anything else is
//! installed, so it depends on nothing of ours and on little else.

mod image;
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
    /// Set up if needed, build the release agent, and the runtime image with this machine's
    /// dockerd and no registry (debootstrap'd Debian base + the agent at /opt/bin/overlay-agent),
    /// saved as target/image/overlay-agent-<hash>.tar; cached while nothing changes.
    Image {
        /// Package this agent binary instead of building the release agent.
        #[arg(long)]
        agent: Option<std::path::PathBuf>,
    },
    /// Set up if needed; fmt, clippy (host and BPF), the image, and every test including the root-only ones.
    Test {
        /// Only run tests whose names contain one of these (passed to the test binaries).
        filters: Vec<String>,
    },
    /// Set up if needed, build the release agent, and run the agent on this host as root
    /// with the given flags (the test-VM workflow), e.g.
    /// `cargo xtask run -- --etcd-endpoints=http://10.0.0.1:2379 --iface=eth0`.
    Run {
        /// Flags for overlay-agent (see `cargo xtask run -- --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The lab: etcd (or the Kubernetes API stand-in: `up --kube`), two agents and a flanneld stand-in.
    ///
    /// `lab [up]` builds it, prints the leases and the ping matrix and stays up until
    /// Ctrl-C; `lab up --once` exits non-zero unless every pair pings; `lab status`
    /// and `lab down` work from another terminal (see `cargo xtask lab -- --help`).
    Lab {
        /// `up [--kube] [--once] [--ingress tc|xdp]`, `status` or `down` (default: up).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up if needed, build, and benchmark host network vs plain routing vs kernel vxlan vs eBPF.
    Bench {
        /// Arguments for the bench binary (see `cargo xtask bench -- --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up if needed, build, and benchmark the control plane: the agent against an etcd
    /// holding 1,000 to 10,000 leases (cold start, event latency, bursts, CPU, RSS).
    Cpbench {
        /// Arguments for the cpbench binary (see `cargo xtask cpbench -- --help`).
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
        Cmd::Image { agent } => {
            run::require_root("`cargo xtask image` (debootstrap, dockerd)")?;
            setup::ensure()?;
            let agent = match agent {
                Some(a) => a,
                None => {
                    build()?;
                    release_agent()
                }
            };
            image::build(&agent)
        }
        Cmd::Test { filters } => {
            run::require_root("`cargo xtask test` (the end-to-end tests)")?;
            setup::ensure()?;
            test::run(&filters)
        }
        Cmd::Run { args } => run_agent(&args),
        Cmd::Lab { args } => {
            // `status` and `down` use the agent `up` started; `down` must work
            // even when the sources do not build.
            let needs_agent = !matches!(
                args.first().map(String::as_str),
                Some("status" | "down" | "-h" | "--help")
            );
            exec_tool("lab", &args, needs_agent)
        }
        Cmd::Bench { args } => exec_tool("bench", &args, true),
        Cmd::Cpbench { args } => exec_tool("cpbench", &args, true),
    }
}

fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| run::workspace_root().join("target"))
}

fn release_agent() -> std::path::PathBuf {
    target_dir().join("release/overlay-agent")
}

/// Replaces xtask with the release agent, so signals (Ctrl-C, systemd's
/// SIGTERM) reach the agent itself and its exit status is ours.
fn run_agent(args: &[String]) -> Result<()> {
    run::require_root("`cargo xtask run` (the agent programs the host's network)")?;
    setup::ensure()?;
    build()?;
    let mut cmd = std::process::Command::new(release_agent());
    cmd.args(args);
    Err(run::exec(&mut cmd))
}

/// The release agent, quietly: cargo's own output shows only on errors and
/// warnings (the eBPF crate's build output only when it fails; see
/// overlay-agent/build.rs).
fn build() -> Result<()> {
    let bin = release_agent();
    let what = if bin.exists() {
        "build: the release agent (eBPF object embedded)".to_owned()
    } else {
        "build: the release agent (eBPF object embedded; a first build takes about 5 minutes on 2 cores)".to_owned()
    };
    run::stage(&what, || {
        run::status(run::cargo().args([
            "build",
            "--quiet",
            "--release",
            "--package",
            "overlay-agent",
        ]))
    })?;
    if let Ok(meta) = std::fs::metadata(&bin) {
        eprintln!(
            "xtask: built {} ({:.1} MiB)",
            bin.display(),
            meta.len() as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}

/// Replaces xtask with one of overlay-tests' binaries (release build, root), so
/// Ctrl-C and SIGTERM reach the tool (the lab tears down on them) and not a
/// parent that would exit and leave it running. `cargo run` execs the binary too.
fn exec_tool(bin: &str, args: &[String], build_agent: bool) -> Result<()> {
    run::require_root(&format!("`cargo xtask {bin}`"))?;
    setup::ensure()?;
    if build_agent {
        build()?;
    }
    // Built first, so the time it takes is reported and `cargo run` only
    // starts it.
    run::stage(&format!("build: the {bin} tool"), || {
        run::status(run::cargo().args([
            "build",
            "--quiet",
            "--release",
            "--package",
            "overlay-tests",
            "--bin",
            bin,
        ]))
    })?;
    let mut cmd = run::cargo();
    cmd.args([
        "run",
        "--quiet",
        "--release",
        "--package",
        "overlay-tests",
        "--bin",
        bin,
        "--",
    ])
    .args(args);
    Err(run::exec(&mut cmd))
}
