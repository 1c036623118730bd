//! `cargo xtask setup`: make this machine able to build and test the project.
//!
//! Every piece is checked cheaply first (dpkg-query, rustup's lists,
//! `bpf-linker --version` and its LLVM, /proc/self/mounts) and only what is
//! missing is installed, so a second run does nothing and says so quickly.
//! Order matters: LLVM 22 (apt) before bpf-linker, which links against it.

mod apt;
mod bpffs;
mod pip;
mod toolchain;

use std::time::Instant;

use anyhow::{Result, bail};

pub use toolchain::NIGHTLY;

use crate::run;

/// Everything this machine lacks.
#[derive(Debug)]
struct Plan {
    packages: Vec<String>,
    python: Vec<String>,
    rust: toolchain::Missing,
    mount_bpffs: bool,
}

impl Plan {
    /// A rough time for installing the plan on this machine kind (2 cores),
    /// from fresh-machine runs: apt's fetch and unpack, pip, rustup's
    /// downloads, and bpf-linker's build against LLVM, which dominates.
    fn estimate_secs(&self) -> u64 {
        let mut secs = 0;
        if !self.packages.is_empty() {
            secs += 60 + 4 * self.packages.len() as u64;
        }
        if !self.python.is_empty() {
            secs += 30;
        }
        if self.rust.nightly {
            secs += 60;
        }
        secs +=
            20 * (self.rust.stable_components.len() + self.rust.nightly_components.len()) as u64;
        if self.rust.bpf_linker.is_some() {
            secs += 360;
        }
        secs
    }

    fn inspect() -> Result<Self> {
        let wanted: Vec<&str> = apt::PACKAGES.iter().map(|(name, _)| *name).collect();
        Ok(Self {
            packages: apt::missing(&wanted)?,
            python: pip::missing(),
            rust: toolchain::inspect(),
            mount_bpffs: !bpffs::is_mounted(),
        })
    }

    fn is_empty(&self) -> bool {
        self.packages.is_empty()
            && self.python.is_empty()
            && self.rust.is_empty()
            && !self.mount_bpffs
    }

    fn describe(&self) -> Vec<String> {
        let Self {
            packages,
            python,
            rust,
            mount_bpffs,
        } = self;
        let mut todo = Vec::new();
        if !packages.is_empty() {
            todo.push(format!("Debian packages: {}", packages.join(" ")));
        }
        if !python.is_empty() {
            todo.push(format!(
                "Python packages for {}: {}",
                pip::PYTHON,
                python.join(" ")
            ));
        }
        if !rust.stable_components.is_empty() {
            todo.push(format!(
                "rustup components: {}",
                rust.stable_components.join(" ")
            ));
        }
        if rust.nightly {
            todo.push(format!(
                "toolchain {NIGHTLY} (+{})",
                toolchain::NIGHTLY_COMPONENTS.join(", ")
            ));
        }
        if !rust.nightly_components.is_empty() {
            todo.push(format!(
                "{NIGHTLY} components: {}",
                rust.nightly_components.join(" ")
            ));
        }
        if let Some(why) = &rust.bpf_linker {
            todo.push(format!(
                "bpf-linker {} for LLVM 22 ({why})",
                toolchain::BPF_LINKER_VERSION
            ));
        }
        if *mount_bpffs {
            todo.push(format!("mount bpffs on {}", bpffs::MOUNT_POINT));
        }
        todo
    }
}

/// Installs whatever is missing; prints one line when nothing is.
pub fn ensure() -> Result<()> {
    let started = Instant::now();
    let plan = Plan::inspect()?;
    if plan.is_empty() {
        eprintln!(
            "setup: nothing to do: {} Debian packages, {} Python packages, {NIGHTLY} with {}, bpf-linker {} on LLVM 22, bpffs all present (checked in {} ms)",
            apt::PACKAGES.len(),
            pip::PACKAGES.len(),
            toolchain::NIGHTLY_COMPONENTS.join("+"),
            toolchain::BPF_LINKER_VERSION,
            started.elapsed().as_millis()
        );
        return Ok(());
    }
    let todo = plan.describe();
    eprintln!("setup: missing:");
    for t in &todo {
        eprintln!("  - {t}");
    }
    eprintln!(
        "setup: installing it takes about {} minutes on 2 cores (estimated; the times are reported as they go)",
        plan.estimate_secs().div_ceil(60).max(1)
    );
    if !run::is_root() {
        bail!("setup must run as root to install the above (apt-get, mount)");
    }
    if !plan.packages.is_empty() {
        apt::install(&plan.packages)?;
    }
    // After apt: python3-pip is among the Debian packages.
    if !plan.python.is_empty() {
        pip::install(&plan.python)?;
    }
    toolchain::install(&plan.rust)?;
    if plan.mount_bpffs {
        bpffs::mount()?;
    }

    let after = Plan::inspect()?;
    if !after.is_empty() {
        bail!(
            "setup installed things but these are still missing: {}",
            after.describe().join("; ")
        );
    }
    eprintln!("setup: done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
