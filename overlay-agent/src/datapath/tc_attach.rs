//! How the TC programs attach: TCX links where the kernel has them (6.6 and
//! later), legacy clsact/cls_bpf filters elsewhere or on request
//! (`--tc-attach`).
//!
//! Either way a program hands on what it does not take (`TCX_NEXT`, which is
//! `TC_ACT_UNSPEC`: under TCX the next program runs, under cls_bpf in
//! direct-action mode the next filter does), so other programs and filters
//! on the same hook keep seeing that traffic.
//!
//! A legacy filter is `bpf direct-action` at priority [`LEGACY_PRIORITY`],
//! handle [`LEGACY_HANDLE`], named after its program (`tc filter show`
//! prints the name). It is not a bpffs object: with pins it simply stays in
//! the kernel when the agent exits, as a pinned TCX link does, and the next
//! agent replaces it in place (`RTM_NEWTFILTER` on the same priority and
//! handle, which cls_bpf swaps atomically), so an upgrade has no gap either.
//! Without pins the agent removes it when it drops the link. Switching
//! between the two kinds attaches the new one first and then removes the old
//! one of the same program, so a hook is never empty and a packet never
//! meets two of our programs that would both act on it.

use std::{fmt, mem::ManuallyDrop, path::Path, str::FromStr};

use aya::programs::{
    ProgramError, SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
};
use log::info;

use super::ebpf::{EbpfError, Hook};
use crate::netlink::tc::{self as netlink_tc, TcFilter, TcHook};

/// `--tc-attach`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcAttachMode {
    /// TCX on kernels that have it (6.6 and later), legacy clsact before.
    #[default]
    Auto,
    Tcx,
    Legacy,
}

impl fmt::Display for TcAttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TcAttachMode::Auto => "auto",
            TcAttachMode::Tcx => "tcx",
            TcAttachMode::Legacy => "legacy",
        })
    }
}

impl FromStr for TcAttachMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(TcAttachMode::Auto),
            "tcx" => Ok(TcAttachMode::Tcx),
            "legacy" => Ok(TcAttachMode::Legacy),
            _ => Err(format!("{s:?}: expected auto, tcx or legacy")),
        }
    }
}

/// The kernel interface a TC program attaches through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcApi {
    /// `BPF_LINK_CREATE` with `BPF_TCX_INGRESS`/`BPF_TCX_EGRESS` (6.6+).
    Tcx,
    /// A cls_bpf filter on the clsact qdisc, via netlink (4.5+).
    Legacy,
}

impl fmt::Display for TcApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TcApi::Tcx => "tcx",
            TcApi::Legacy => "legacy clsact",
        })
    }
}

/// The first kernel with TCX (`BPF_TCX_INGRESS`, Linux 6.6).
pub const TCX_KERNEL: (u32, u32) = (6, 6);

impl TcAttachMode {
    /// What to attach through on a kernel of this `(major, minor)` version.
    pub fn resolve(self, kernel: (u32, u32)) -> TcApi {
        match self {
            TcAttachMode::Tcx => TcApi::Tcx,
            TcAttachMode::Legacy => TcApi::Legacy,
            TcAttachMode::Auto if kernel >= TCX_KERNEL => TcApi::Tcx,
            TcAttachMode::Auto => TcApi::Legacy,
        }
    }
}

/// The running kernel's `(major, minor)`, from uname's release; `(0, 0)` if
/// it cannot be read, which `auto` takes as "no TCX".
pub fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    parse_release(&release)
}

fn parse_release(release: &str) -> (u32, u32) {
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Our filters' priority under clsact: distinctive (8472, the VXLAN port)
/// so that `tc filter show` makes them easy to spot and no other tool is
/// likely to use it, and below tc's default of 49152 so that filters added
/// without a priority run after ours.
pub const LEGACY_PRIORITY: u16 = 8472;
/// One program per hook and interface, so one handle suffices.
pub const LEGACY_HANDLE: TcHandle = TcHandle::new(0, 1);

/// A TC attachment this agent made, kept as long as it should stay.
#[derive(Debug)]
pub enum TcLink {
    /// Dropping it detaches, unless it is pinned.
    Tcx(FdLink),
    /// `Some`: removed when dropped. `None`: left in the kernel for the next
    /// agent (the pinned case).
    Legacy(Option<SchedClassifierLink>),
}

/// Where an attachment is pinned when the datapath pins its state: the
/// TCX link's pin path. A legacy filter keeps its place in the kernel
/// instead, and its program's TCX pin of an earlier run is removed.
pub struct Target<'a> {
    pub program: &'static str,
    pub interface: &'a str,
    pub ifindex: u32,
    pub hook: TcAttachType,
    /// The pinned TCX link path, when pinning.
    pub pin: Option<&'a Path>,
}

/// Attaches `prog` at `target` through `api`, replacing our earlier
/// attachment there in place (atomically) when there is one; returns the
/// link to keep.
pub fn attach(
    prog: &mut SchedClassifier,
    api: TcApi,
    target: &Target<'_>,
) -> Result<TcLink, EbpfError> {
    let attach_err = |source| EbpfError::Attach {
        program: target.program,
        interface: target.interface.to_owned(),
        hook: Hook::tc(api, target.hook),
        source,
    };
    match api {
        TcApi::Tcx => {
            let link = attach_tcx(prog, target, attach_err)?;
            // A legacy filter of an earlier run would run after us and see
            // what we pass: remove it now that TCX holds the hook.
            if detach_legacy(target.interface, target.hook, target.program)? {
                info!(
                    "{}: moved from a legacy clsact filter to TCX on {}",
                    target.program, target.interface
                );
            }
            Ok(TcLink::Tcx(link))
        }
        TcApi::Legacy => {
            let link = attach_legacy(prog, target)?;
            if let Some(pin) = target.pin {
                match std::fs::remove_file(pin) {
                    Ok(()) => info!(
                        "{}: moved from TCX to a legacy clsact filter on {}",
                        target.program, target.interface
                    ),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(EbpfError::Pin {
                            path: pin.to_owned(),
                            op: "remove",
                            source,
                        });
                    }
                }
            }
            Ok(TcLink::Legacy(if target.pin.is_some() {
                // Pinned: the filter outlives us like a pinned link; dropping
                // aya's link would delete it.
                let _ = ManuallyDrop::new(link);
                None
            } else {
                Some(link)
            }))
        }
    }
}

/// Swaps into the pinned link still attached to `ifindex` (`BPF_LINK_UPDATE`)
/// or attaches anew (and pins).
fn attach_tcx(
    prog: &mut SchedClassifier,
    target: &Target<'_>,
    attach_err: impl Fn(ProgramError) -> EbpfError,
) -> Result<FdLink, EbpfError> {
    let link_err = |path: &Path, op: &'static str| {
        let path = path.to_owned();
        move |source| EbpfError::Link { path, op, source }
    };
    if let Some(pin) = target.pin
        && let Some(live) =
            super::pins::live_link_at(pin, target.ifindex).map_err(|source| EbpfError::Pin {
                path: pin.to_owned(),
                op: "inspect",
                source,
            })?
    {
        let pinned = PinnedLink::from_pin(&live).map_err(link_err(&live, "open"))?;
        let link = SchedClassifierLink::try_from(FdLink::from(pinned))
            .map_err(link_err(&live, "open as a TCX link"))?;
        let id = prog.attach_to_link(link).map_err(&attach_err)?;
        let link = prog.take_link(id).map_err(&attach_err)?;
        info!(
            "{}: swapped into the pinned link {}",
            target.program,
            live.display()
        );
        return FdLink::try_from(link).map_err(link_err(&live, "convert"));
    }
    let id = prog
        .attach_with_options(
            target.interface,
            target.hook,
            TcAttachOptions::TcxOrder(Default::default()),
        )
        .map_err(&attach_err)?;
    let link = prog.take_link(id).map_err(&attach_err)?;
    let path = target.pin.map(Path::to_owned).unwrap_or_default();
    let fd_link = FdLink::try_from(link).map_err(link_err(&path, "convert"))?;
    let Some(pin) = target.pin else {
        return Ok(fd_link);
    };
    let pinned = fd_link.pin(pin).map_err(|e| EbpfError::Pin {
        path: pin.to_owned(),
        op: "pin",
        source: std::io::Error::other(e),
    })?;
    Ok(FdLink::from(pinned))
}

/// Adds the clsact qdisc if missing, then replaces our filter in place, or
/// adds it.
fn attach_legacy(
    prog: &mut SchedClassifier,
    target: &Target<'_>,
) -> Result<SchedClassifierLink, EbpfError> {
    let attach_err = |source: ProgramError| EbpfError::Attach {
        program: target.program,
        interface: target.interface.to_owned(),
        hook: Hook::tc(TcApi::Legacy, target.hook),
        source,
    };
    match tc::qdisc_add_clsact(target.interface) {
        Ok(()) => {}
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(attach_err(e.into())),
    }
    // What holds our place (priority and handle), read with our own
    // listing, which no other tool's filter can make fail.
    let hook = tc_hook(target.hook);
    let held = netlink_tc::filters(target.ifindex, hook)
        .map_err(|source| EbpfError::ListFilters {
            interface: target.interface.to_owned(),
            source,
        })?
        .into_iter()
        .find(|f| f.chain == 0 && f.priority == LEGACY_PRIORITY && f.handle == LEGACY_HANDLE_RAW);
    let id = match held {
        Some(f) if is_ours(&f, target.program) => {
            let existing = SchedClassifierLink::attached(
                target.interface,
                target.hook,
                LEGACY_PRIORITY,
                LEGACY_HANDLE,
                None,
            )
            .map_err(|e| attach_err(TcError::IoError(e).into()))?;
            // Without NLM_F_CREATE the kernel only changes an existing filter.
            let id = prog.attach_to_link(existing).map_err(attach_err)?;
            info!(
                "{}: replaced our clsact filter on {} in place",
                target.program, target.interface
            );
            id
        }
        Some(f) => {
            return Err(EbpfError::LegacySlotTaken {
                program: target.program,
                interface: target.interface.to_owned(),
                kind: f.kind,
                name: f.bpf_name,
            });
        }
        None => prog
            .attach_with_options(
                target.interface,
                target.hook,
                TcAttachOptions::Netlink(NlOptions {
                    priority: LEGACY_PRIORITY,
                    handle: LEGACY_HANDLE,
                    classid: None,
                }),
            )
            .map_err(attach_err)?,
    };
    prog.take_link(id).map_err(attach_err)
}

/// Our legacy filter's handle as the kernel reports it.
const LEGACY_HANDLE_RAW: u32 = 1;

fn tc_hook(hook: TcAttachType) -> TcHook {
    match hook {
        TcAttachType::Egress => TcHook::Egress,
        // Custom parents are not used by us; ingress is the other hook.
        TcAttachType::Ingress | TcAttachType::Custom(_) => TcHook::Ingress,
    }
}

/// A filter is ours when all of it says so: kind `bpf`, our priority and
/// handle in chain 0, and the program's name. Another tool's `bpf` filter
/// with the same program name at another place, or anything else at our
/// place, is not.
pub fn is_ours(filter: &TcFilter, program: &str) -> bool {
    filter.kind == "bpf"
        && filter.chain == 0
        && filter.priority == LEGACY_PRIORITY
        && filter.handle == LEGACY_HANDLE_RAW
        && filter.bpf_name.as_deref() == Some(program)
}

/// Whether `filter` is one of the filters our `programs` would be.
pub fn is_any_of_ours(filter: &TcFilter, programs: &[&str]) -> bool {
    programs.iter().any(|p| is_ours(filter, p))
}

/// Removes our legacy filter of `program` from `hook` of `interface` (see
/// [`is_ours`]); every other filter there stays where it is. `Ok(false)`
/// when there was none, the interface has no clsact qdisc, or the interface
/// is gone.
pub fn detach_legacy(
    interface: &str,
    hook: TcAttachType,
    program: &'static str,
) -> Result<bool, EbpfError> {
    let detach_err = |source| EbpfError::Detach {
        program,
        interface: interface.to_owned(),
        source,
    };
    let Some(ifindex) = ifindex(interface) else {
        return Ok(false);
    };
    let hook = tc_hook(hook);
    let listed = match netlink_tc::filters(ifindex, hook) {
        Ok(listed) => listed,
        Err(e) if e.is_not_found() => return Ok(false),
        Err(e) => return Err(detach_err(e)),
    };
    let mut removed = false;
    for filter in listed.iter().filter(|f| is_ours(f, program)) {
        match netlink_tc::delete_filter(ifindex, hook, filter) {
            Ok(gone) => removed |= gone,
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(detach_err(e)),
        }
    }
    Ok(removed)
}

/// The ifindex of `interface` in the calling thread's namespace, `None`
/// when there is no such interface.
fn ifindex(interface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(interface).ok()?;
    // SAFETY: name is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Removes every legacy filter of ours (`programs`: each program with its
/// hook) from every interface of this network namespace, for when no eBPF
/// datapath runs. Returns `(interface, program)` of each one removed.
pub fn detach_legacy_everywhere(
    programs: &[(&'static str, TcAttachType)],
) -> Result<Vec<(String, &'static str)>, EbpfError> {
    let mut removed = Vec::new();
    for interface in interfaces() {
        for (program, hook) in programs {
            if detach_legacy(&interface, *hook, program)? {
                removed.push((interface.clone(), *program));
            }
        }
    }
    Ok(removed)
}

/// The interfaces of the calling thread's network namespace (glibc's
/// `if_nameindex` asks netlink, unlike `/sys/class/net`, which shows the
/// namespace sysfs was mounted in).
fn interfaces() -> Vec<String> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry
    // (or NULL on failure), freed below with if_freenameindex.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            out.push(
                std::ffi::CStr::from_ptr((*p).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_tcx_from_6_6() {
        assert_eq!(TcAttachMode::Auto.resolve((6, 6)), TcApi::Tcx);
        assert_eq!(TcAttachMode::Auto.resolve((6, 12)), TcApi::Tcx);
        assert_eq!(TcAttachMode::Auto.resolve((7, 0)), TcApi::Tcx);
        assert_eq!(TcAttachMode::Auto.resolve((6, 1)), TcApi::Legacy);
        assert_eq!(TcAttachMode::Auto.resolve((5, 15)), TcApi::Legacy);
        assert_eq!(TcAttachMode::Auto.resolve((0, 0)), TcApi::Legacy);
        assert_eq!(TcAttachMode::Legacy.resolve((6, 12)), TcApi::Legacy);
        assert_eq!(TcAttachMode::Tcx.resolve((5, 15)), TcApi::Tcx);
    }

    #[test]
    fn releases_parse_to_major_minor() {
        assert_eq!(parse_release("6.12.57+deb13-amd64\n"), (6, 12));
        assert_eq!(parse_release("5.14.0-427.13.1.el9_4.x86_64"), (5, 14));
        assert_eq!(parse_release("6.1.0-18-cloud-amd64"), (6, 1));
        assert_eq!(parse_release(""), (0, 0));
    }

    #[test]
    fn the_mode_round_trips() {
        for m in [TcAttachMode::Auto, TcAttachMode::Tcx, TcAttachMode::Legacy] {
            assert_eq!(m.to_string().parse::<TcAttachMode>(), Ok(m));
        }
        assert!("clsact".parse::<TcAttachMode>().is_err());
    }
}
