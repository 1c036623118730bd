//! The Rust side: components of the toolchain running xtask, the pinned
//! nightly that builds the eBPF crate, and bpf-linker built against LLVM 22.

use std::process::Command;

use anyhow::Result;

use crate::run;

/// The dated nightly whose LLVM (22) matches bpf-linker's. Must equal
/// `EBPF_TOOLCHAIN` in overlay-agent/build.rs (a test checks it).
pub const NIGHTLY: &str = "nightly-2026-07-20";
/// rust-src for `-Z build-std=core`; clippy to lint the eBPF crate for its real target.
pub const NIGHTLY_COMPONENTS: &[&str] = &["rust-src", "clippy"];
/// What `cargo xtask test` runs on the ordinary toolchain.
pub const STABLE_COMPONENTS: &[&str] = &["rustfmt", "clippy"];
pub const BPF_LINKER_VERSION: &str = "0.13.0";
pub const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// The soname bpf-linker must load; a different LLVM cannot read the nightly's bitcode.
const LLVM_SONAME: &str = "libLLVM.so.22";

/// What is missing from the Rust side.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Missing {
    pub stable_components: Vec<String>,
    pub nightly: bool,
    pub nightly_components: Vec<String>,
    /// Why bpf-linker needs (re)installing, if it does.
    pub bpf_linker: Option<String>,
}

impl Missing {
    pub fn is_empty(&self) -> bool {
        self.stable_components.is_empty()
            && !self.nightly
            && self.nightly_components.is_empty()
            && self.bpf_linker.is_none()
    }
}

pub fn inspect() -> Missing {
    let stable_components = missing_components(None, STABLE_COMPONENTS);
    let nightly = !run::probe("rustup", ["toolchain", "list"])
        .is_some_and(|o| has_toolchain(&String::from_utf8_lossy(&o.stdout), NIGHTLY));
    let nightly_components = if nightly {
        Vec::new()
    } else {
        missing_components(Some(NIGHTLY), NIGHTLY_COMPONENTS)
    };
    Missing {
        stable_components,
        nightly,
        nightly_components,
        bpf_linker: bpf_linker_problem(),
    }
}

/// Components of `toolchain` (the active one when `None`) that are not installed.
fn missing_components(toolchain: Option<&str>, wanted: &[&str]) -> Vec<String> {
    let mut args = vec!["component", "list", "--installed"];
    if let Some(t) = toolchain {
        args.extend(["--toolchain", t]);
    }
    let installed = run::probe("rustup", &args)
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    wanted
        .iter()
        .filter(|c| !has_component(&installed, c))
        .map(|c| (*c).to_owned())
        .collect()
}

/// Whether `rustup toolchain list` output names `toolchain` (listed with its host triple).
pub fn has_toolchain(list: &str, toolchain: &str) -> bool {
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .any(|name| name == toolchain || with_host_triple(name, toolchain))
}

/// Whether `rustup component list --installed` output has `component`
/// (listed bare like `rust-src` or with the host triple like `clippy-x86_64-...`).
pub fn has_component(list: &str, component: &str) -> bool {
    list.lines()
        .map(str::trim)
        .any(|name| name == component || with_host_triple(name, component))
}

/// `name` is `base-<triple>` for a triple of this machine's architecture, so
/// `nightly` does not match `nightly-2026-07-20-x86_64-...`, nor `rust` `rust-std-x86_64-...`.
fn with_host_triple(name: &str, base: &str) -> bool {
    name.strip_prefix(base)
        .and_then(|rest| rest.strip_prefix('-'))
        .and_then(|triple| triple.strip_prefix(std::env::consts::ARCH))
        .is_some_and(|rest| rest.starts_with('-'))
}

/// `None` when the bpf-linker on PATH is the pinned version and loads LLVM 22.
fn bpf_linker_problem() -> Option<String> {
    let path = run::path_with_cargo_bin();
    let found = std::env::split_paths(&path)
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file());
    let Some(exe) = found else {
        return Some("not installed".into());
    };
    let version = run::probe(
        exe.as_os_str().to_str().unwrap_or("bpf-linker"),
        ["--version"],
    );
    let version = version
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    match version {
        None => return Some(format!("{} does not run", exe.display())),
        Some(v) if !is_pinned_version(&v) => {
            return Some(format!(
                "{} is `{v}`, want {BPF_LINKER_VERSION}",
                exe.display()
            ));
        }
        Some(_) => {}
    }
    let ldd = run::probe("ldd", [exe.as_os_str()])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    llvm_link_problem(&ldd).map(|p| format!("{}: {p}", exe.display()))
}

pub fn is_pinned_version(version_output: &str) -> bool {
    version_output.split_whitespace().nth(1) == Some(BPF_LINKER_VERSION)
}

/// Checks `ldd bpf-linker` output: it must resolve LLVM 22's shared library.
pub fn llvm_link_problem(ldd: &str) -> Option<String> {
    let llvm: Vec<&str> = ldd.lines().filter(|l| l.contains("libLLVM")).collect();
    match llvm.as_slice() {
        [] => Some("not linked against libLLVM (built without the llvm-22 feature?)".into()),
        [line] if line.contains("not found") => Some(format!("cannot load {}", line.trim())),
        [line] if line.trim_start().starts_with(LLVM_SONAME) => None,
        other => Some(format!("links the wrong LLVM: {}", other.join("; ").trim())),
    }
}

pub fn install(missing: &Missing) -> Result<()> {
    if !missing.stable_components.is_empty() {
        let mut cmd = Command::new("rustup");
        cmd.args(["component", "add"])
            .args(&missing.stable_components);
        run::status(&mut cmd)?;
    }
    if missing.nightly {
        let mut cmd = Command::new("rustup");
        cmd.args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]);
        for c in NIGHTLY_COMPONENTS {
            cmd.args(["--component", c]);
        }
        run::status(&mut cmd)?;
    } else if !missing.nightly_components.is_empty() {
        let mut cmd = Command::new("rustup");
        cmd.args(["component", "add", "--toolchain", NIGHTLY])
            .args(&missing.nightly_components);
        run::status(&mut cmd)?;
    }
    if missing.bpf_linker.is_some() {
        // --force: a same-version bpf-linker built without llvm-22 would otherwise be kept.
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.env("LLVM_PREFIX", LLVM_PREFIX).args([
            "install",
            "--force",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ]);
        run::status(&mut cmd)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toolchain_listed_with_host_triple() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-x86_64-unknown-linux-gnu\n\
                    nightly-2026-07-20-x86_64-unknown-linux-gnu\n";
        assert!(has_toolchain(list, NIGHTLY));
        assert!(!has_toolchain(list, "nightly-2026-07-21"));
        assert!(!has_toolchain("no installed toolchains\n", NIGHTLY));
        // The moving nightly must not satisfy the pinned one, nor the reverse.
        assert!(!has_toolchain(
            "nightly-x86_64-unknown-linux-gnu\n",
            NIGHTLY
        ));
        assert!(!has_toolchain(
            "nightly-2026-07-20-x86_64-unknown-linux-gnu\n",
            "nightly"
        ));
    }

    #[test]
    fn components_bare_or_with_triple() {
        let list = "cargo-x86_64-unknown-linux-gnu\nrust-src\n\
                    rust-std-x86_64-unknown-linux-gnu\nclippy-x86_64-unknown-linux-gnu\n";
        assert!(has_component(list, "rust-src"));
        assert!(has_component(list, "clippy"));
        assert!(!has_component(list, "rustfmt"));
        assert!(!has_component(list, "rust"));
    }

    #[test]
    fn bpf_linker_version() {
        assert!(is_pinned_version("bpf-linker 0.13.0\n"));
        assert!(!is_pinned_version("bpf-linker 0.9.15"));
        assert!(!is_pinned_version(""));
    }

    #[test]
    fn bpf_linker_must_load_llvm_22() {
        let good = "\tlibLLVM.so.22.1 => /usr/lib/llvm-22/lib/libLLVM.so.22.1 (0x7f58)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f00)\n";
        assert_eq!(llvm_link_problem(good), None);
        let gone = "\tlibLLVM.so.22.1 => not found\n";
        assert!(llvm_link_problem(gone).unwrap().contains("cannot load"));
        let old = "\tlibLLVM-19.so.1 => /usr/lib/llvm-19/lib/libLLVM.so.1 (0x7f58)\n";
        assert!(llvm_link_problem(old).unwrap().contains("wrong LLVM"));
        assert!(llvm_link_problem("\tlibc.so.6 => /lib/libc.so.6\n").is_some());
    }

    #[test]
    fn nightly_matches_the_agent_build_script() {
        let build_rs =
            std::fs::read_to_string(run::workspace_root().join("overlay-agent/build.rs"))
                .expect("overlay-agent/build.rs");
        assert!(
            build_rs.contains(&format!("\"{NIGHTLY}\"")),
            "overlay-agent/build.rs must build the eBPF crate with {NIGHTLY}, the toolchain setup installs"
        );
    }

    #[test]
    fn nothing_missing_is_empty() {
        assert!(Missing::default().is_empty());
        let m = Missing {
            nightly: true,
            ..Default::default()
        };
        assert!(!m.is_empty());
    }
}
