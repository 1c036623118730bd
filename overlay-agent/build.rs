//! Builds the eBPF object with the pinned nightly and bpf-linker (installed by
//! `cargo xtask setup`) so that the agent binary embeds it and is self-contained.

/// The dated nightly whose LLVM (22) is the one bpf-linker is built against
/// (`cargo xtask setup` installs both: xtask/src/setup/toolchain.rs).
const EBPF_TOOLCHAIN: &str = "nightly-2026-07-20";

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root_dir = format!("{manifest_dir}/../overlay-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "overlay-ebpf",
            root_dir: &root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}
