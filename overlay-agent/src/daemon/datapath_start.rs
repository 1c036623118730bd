//! Choosing and starting the datapath: eBPF as asked (or tried first under
//! `--datapath auto`), the kernel's vxlan device otherwise, and no eBPF
//! state of ours left behind whenever the kernel datapath runs.

use std::path::Path;

use anyhow::{Result, anyhow};

use crate::{
    cli::{Cli, DatapathChoice, FastPathChoice, IngressChoice, TcAttachChoice},
    datapath::{
        AnyDatapath, Datapath, NodeSpec, NodeState,
        ebpf::{self, EbpfDatapath, EbpfOptions, IngressMode},
        fastpath::{self, FastPathMode},
        kernel::KernelDatapath,
        pins::{DEFAULT_PIN_DIR, PinLayout},
        tc_attach::TcAttachMode,
    },
};

/// Why the eBPF datapath did not start.
struct Unavailable {
    why: String,
    /// False when the kernel datapath must not take over either (see
    /// [`crate::datapath::DatapathError::forbids_fallback`]).
    may_fall_back: bool,
}

impl From<String> for Unavailable {
    fn from(why: String) -> Self {
        Unavailable {
            why,
            may_fall_back: true,
        }
    }
}

pub async fn start_datapath(cli: &Cli, spec: &NodeSpec) -> Result<(AnyDatapath, NodeState)> {
    let options = ebpf_options(cli);
    let try_ebpf = || async {
        let mut options = options.clone();
        options.pins = match &cli.bpf_pin_dir {
            Some(dir) => {
                check_pin_dir(dir)?;
                Some(PinLayout::new(dir))
            }
            None => match check_pin_dir(Path::new(DEFAULT_PIN_DIR)) {
                Ok(()) => Some(PinLayout::new(DEFAULT_PIN_DIR)),
                Err(why) => {
                    log::warn!(
                        "{why}: running unpinned, so the programs detach when the agent stops \
                         (restarts are not hitless); mount bpffs or pass --bpf-pin-dir"
                    );
                    None
                }
            },
        };
        if let Some(pins) = &options.pins {
            log::info!("eBPF state pinned under {}", pins.root().display());
        }
        let mut dp = EbpfDatapath::new(options);
        match dp.setup(spec).await {
            Ok(state) => Ok((AnyDatapath::Ebpf(dp), state)),
            Err(e) => Err(Unavailable {
                why: e.reason(),
                may_fall_back: !e.forbids_fallback(),
            }),
        }
    };
    match cli.datapath {
        DatapathChoice::Ebpf => try_ebpf()
            .await
            .map_err(|e| anyhow!("eBPF datapath (--datapath ebpf): {}", e.why)),
        DatapathChoice::Kernel => kernel_datapath(cli, spec).await,
        DatapathChoice::Auto => match try_ebpf().await {
            Ok(v) => Ok(v),
            Err(Unavailable {
                why,
                may_fall_back: false,
            }) => Err(anyhow!(
                "eBPF datapath (--datapath auto, not falling back to the kernel datapath): {why}"
            )),
            Err(Unavailable { why, .. }) => {
                log::warn!("eBPF datapath unavailable, falling back to the kernel datapath: {why}");
                kernel_datapath(cli, spec).await
            }
        },
    }
}

fn ebpf_options(cli: &Cli) -> EbpfOptions {
    EbpfOptions {
        ingress: match cli.ebpf_ingress {
            IngressChoice::Tc => IngressMode::Tc,
            IngressChoice::XdpTc => IngressMode::XdpAndTc,
        },
        fast_path: match cli.fast_path {
            FastPathChoice::Auto => FastPathMode::Auto,
            FastPathChoice::On => FastPathMode::On,
            FastPathChoice::Off => FastPathMode::Off,
        },
        fast_path_mark: cli.fast_path_mark,
        tc_attach: match cli.tc_attach {
            TcAttachChoice::Auto => TcAttachMode::Auto,
            TcAttachChoice::Tcx => TcAttachMode::Tcx,
            TcAttachChoice::Legacy => TcAttachMode::Legacy,
        },
        object: cli.bpf_object.clone(),
        ..EbpfOptions::default()
    }
}

async fn kernel_datapath(cli: &Cli, spec: &NodeSpec) -> Result<(AnyDatapath, NodeState)> {
    remove_ebpf_leftovers(cli, spec);
    let mut dp = KernelDatapath::new();
    let state = dp
        .setup(spec)
        .await
        .map_err(|e| anyhow!("kernel datapath: {}", e.reason()))?;
    Ok((AnyDatapath::Kernel(dp), state))
}

/// The kernel datapath maintains no eBPF state: programs a previous eBPF run
/// (or a half-done attach just now) left pinned or as legacy clsact filters
/// would keep filtering with maps nobody updates, so their pins and filters
/// go (detaching them), and so does the fast path's mangle rule. The lease
/// and `flannel.<VNI>` stay.
fn remove_ebpf_leftovers(cli: &Cli, spec: &NodeSpec) {
    let layout = PinLayout::chosen(cli.bpf_pin_dir.as_deref());
    match ebpf::remove_attachments(Some(&layout)) {
        Ok(removed) if !removed.is_empty() => log::info!(
            "kernel datapath: removed {} eBPF attachment(s) and pin(s) (under {}): {removed:?}",
            removed.len(),
            layout.root().display()
        ),
        Ok(_) => {}
        Err(e) => log::warn!(
            "kernel datapath: removing the eBPF pins under {}: {e}",
            layout.root().display()
        ),
    }
    fastpath::release_host(spec.subnet, Some(&layout));
}

/// bpffs's `statfs` magic.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The pin directory must be on bpffs (created if missing).
fn check_pin_dir(dir: &Path) -> Result<(), String> {
    if let Err(e) = std::fs::create_dir_all(dir) {
        return Err(format!(
            "cannot create pin directory {}: {e}",
            dir.display()
        ));
    }
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("pin directory {} has a NUL byte", dir.display()))?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statfs.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(format!(
            "cannot statfs pin directory {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    #[allow(clippy::unnecessary_cast)]
    if st.f_type as i64 != BPF_FS_MAGIC {
        return Err(format!(
            "pin directory {} is not on bpffs (mount -t bpf bpf /sys/fs/bpf)",
            dir.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_dir_must_be_on_bpffs() {
        let dir = std::env::temp_dir().join(format!("overlay-agent-pin-{}", std::process::id()));
        let e = check_pin_dir(&dir).unwrap_err();
        assert!(e.contains("not on bpffs"), "{e}");
        let _ = std::fs::remove_dir(&dir);
    }
}
