//! The runtime image, as `cargo xtask image` builds it (debootstrap'd Debian
//! base and the release agent, no registry), for the tests that run the
//! agent the way a DaemonSet or an operator's `docker run` does.
//!
//! [`built`] runs `cargo xtask image` once per test process: it returns at
//! once when the image for the current recipe and release agent is cached
//! (`cargo xtask test` builds it in its own step before the tests), and
//! otherwise builds it (about a minute and a half, debootstrap included). A failure is
//! the test's failure, never a skip.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use anyhow::{Context, Result, bail};

/// The image's tag (`overlay-agent:<hash of recipe and agent>`) and the
/// tarball `docker save` wrote, which a test's own dockerd loads.
#[derive(Clone, Debug)]
pub struct Image {
    pub tag: String,
    pub tarball: PathBuf,
}

pub fn built() -> Result<Image> {
    static BUILT: OnceLock<Image> = OnceLock::new();
    if let Some(i) = BUILT.get() {
        return Ok(i.clone());
    }
    let image = build()?;
    Ok(BUILT.get_or_init(|| image).clone())
}

fn build() -> Result<Image> {
    // Test binaries live in `<target>/<profile>/deps`.
    let exe = std::env::current_exe()?;
    let target = exe
        .ancestors()
        .nth(3)
        .context("locating the target directory")?
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.args(["run", "--quiet", "--package", "xtask", "--manifest-path"])
        .arg(&manifest)
        .args(["--", "image"])
        // The release agent and the image in the target directory we run from.
        .env("CARGO_TARGET_DIR", &target);
    crate::binaries::scrub_cargo_env(&mut cmd);
    let t0 = std::time::Instant::now();
    let out = cmd.output().context("running `cargo xtask image`")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "`cargo xtask image` failed ({}); the container tests need the image:\n{stderr}",
            out.status
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let (tag, tarball) = last
        .split_once(' ')
        .with_context(|| format!("`cargo xtask image` printed {stdout:?}"))?;
    let image = Image {
        tag: tag.to_owned(),
        tarball: PathBuf::from(tarball),
    };
    eprintln!(
        "image {} ({}) ready in {:.1} s",
        image.tag,
        image.tarball.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(image)
}
