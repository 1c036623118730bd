//! Attaching the programs: TC (TCX or legacy, pinned links swapped in
//! place) and XDP (the full program, or the filter where the kernel
//! refuses XDP metadata).

use super::*;

pub(super) fn pin_err(path: PathBuf, op: &'static str) -> impl FnOnce(std::io::Error) -> EbpfError {
    move |source| EbpfError::Pin { path, op, source }
}

pub(super) fn link_err(path: PathBuf, op: &'static str) -> impl FnOnce(LinkError) -> EbpfError {
    move |source| EbpfError::Link { path, op, source }
}

/// Every TC program with its hook: legacy filters are found by these names.
pub const TC_PROGRAMS: [(&str, TcAttachType); 5] = [
    (PROG_INGRESS_TC, TcAttachType::Ingress),
    (PROG_EGRESS, TcAttachType::Egress),
    (PROG_EGRESS6, TcAttachType::Egress),
    (PROG_VETH_FROM_POD, TcAttachType::Ingress),
    (PROG_VETH_TO_POD, TcAttachType::Egress),
];

/// Removes every attachment of ours in this network namespace, for when no
/// eBPF datapath maintains the maps: the pins (which detaches the pinned
/// links, XDP included, and drops the maps) and every legacy clsact filter
/// of our programs. Returns what it removed, one entry each.
pub fn remove_attachments(pins: Option<&PinLayout>) -> Result<Vec<String>, EbpfError> {
    let mut removed = Vec::new();
    if let Some(pins) = pins {
        let paths = pins
            .remove_all()
            .map_err(pin_err(pins.root().to_owned(), "remove"))?;
        removed.extend(paths.into_iter().map(|p| p.display().to_string()));
    }
    for (interface, program) in tc_attach::detach_legacy_everywhere(&TC_PROGRAMS)? {
        removed.push(format!("clsact filter {program} on {interface}"));
    }
    Ok(removed)
}

/// Attaches a TC program through `api` (see [`tc_attach::attach`]), keeps
/// its link in `links`, and returns the program id.
pub(super) fn attach_tc(
    ebpf: &mut Ebpf,
    api: TcApi,
    target: &tc_attach::Target<'_>,
    links: &mut Vec<TcLink>,
) -> Result<u32, EbpfError> {
    let prog = classifier(ebpf, target.program)?;
    links.push(tc_attach::attach(prog, api, target)?);
    program_id(prog.info(), target.program)
}

/// Loads the XDP program that decapsulates and marks for TC; where the
/// kernel refuses it (some kernels do not let XDP programs call
/// `bpf_xdp_adjust_meta`, which the mark needs), the one that only drops
/// strangers and leaves decapsulation to TC, with one line saying why.
/// Returns the name of the program loaded.
pub(super) fn load_xdp(ebpf: &mut Ebpf) -> Result<&'static str, EbpfError> {
    let first = match xdp(ebpf, PROG_INGRESS_XDP)?.load() {
        Ok(()) => return Ok(PROG_INGRESS_XDP),
        Err(e) => EbpfError::load(PROG_INGRESS_XDP, e),
    };
    xdp(ebpf, PROG_INGRESS_XDP_FILTER)?
        .load()
        .map_err(|e| EbpfError::load(PROG_INGRESS_XDP_FILTER, e))?;
    warn!(
        "{first}; using {PROG_INGRESS_XDP_FILTER} instead: XDP drops VXLAN from strangers and TC decapsulates"
    );
    Ok(PROG_INGRESS_XDP_FILTER)
}

/// Attaches the XDP program `name` to the underlay. Without pins, aya keeps
/// the link (it goes with this process). With pins: swaps the program into
/// the pinned link still attached to the underlay (atomic), or attaches a
/// new link and pins it. Returns the program id.
pub(super) fn attach_xdp(
    ebpf: &mut Ebpf,
    name: &'static str,
    device: &VxlanDevice,
    mode: XdpMode,
    pins: Option<&PinLayout>,
) -> Result<u32, EbpfError> {
    let prog = xdp(ebpf, name)?;
    let attach_err = |source| EbpfError::Attach {
        program: name,
        interface: device.underlay.clone(),
        hook: Hook::Xdp,
        source,
    };
    let ifindex = device.underlay_ifindex;
    match pins {
        None => {
            prog.attach_to_if_index(ifindex, mode).map_err(attach_err)?;
        }
        Some(pins) => {
            let path = pins.link(PROG_INGRESS_XDP);
            match pins
                .live_link(PROG_INGRESS_XDP, ifindex)
                .map_err(pin_err(path.clone(), "inspect"))?
            {
                Some(live) => {
                    let pinned =
                        PinnedLink::from_pin(&live).map_err(link_err(live.clone(), "open"))?;
                    let link = XdpLink::try_from(FdLink::from(pinned))
                        .map_err(link_err(live.clone(), "open as an XDP link"))?;
                    prog.attach_to_link(link).map_err(attach_err)?;
                    info!("{name}: swapped into the pinned link {}", live.display());
                }
                None => {
                    let id = prog.attach_to_if_index(ifindex, mode).map_err(attach_err)?;
                    let link = prog.take_link(id).map_err(attach_err)?;
                    let fd_link =
                        FdLink::try_from(link).map_err(link_err(path.clone(), "convert"))?;
                    fd_link.pin(&path).map_err(|e| EbpfError::Pin {
                        path: path.clone(),
                        op: "pin",
                        source: std::io::Error::other(e),
                    })?;
                }
            }
        }
    }
    program_id(prog.info(), name)
}

/// Loads the tail-called programs at `slots` of `JUMP_PROGRAMS` and enters
/// each in JUMPS, so the programs that jump to them find them before they
/// are attached (and, over reused pins, the attached ones from now on).
pub(in crate::datapath) fn load_jumps(ebpf: &mut Ebpf, slots: &[u32]) -> Result<(), EbpfError> {
    for &(index, name) in JUMP_PROGRAMS.iter().filter(|(i, _)| slots.contains(i)) {
        let prog = classifier(ebpf, name)?;
        prog.load().map_err(|e| EbpfError::load(name, e))?;
        let fd = prog
            .fd()
            .map_err(|source| EbpfError::Program {
                program: name,
                source,
            })?
            .try_clone()
            .map_err(|e| EbpfError::Program {
                program: name,
                source: ProgramError::IOError(e),
            })?;
        let map = ebpf
            .map_mut(MAP_JUMPS)
            .ok_or(EbpfError::MissingMap(MAP_JUMPS))?;
        let mut jumps: ProgramArray<&mut MapData> =
            ProgramArray::try_from(map).map_err(|e| EbpfError::map(MAP_JUMPS, "open", e))?;
        jumps
            .set(index, &fd, 0)
            .map_err(|e| EbpfError::map(MAP_JUMPS, format!("set {index} ({name})"), e))?;
    }
    Ok(())
}

pub(in crate::datapath) fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, EbpfError> {
    ebpf.program_mut(name)
        .ok_or(EbpfError::MissingProgram(name))?
        .try_into()
        .map_err(|source| EbpfError::Program {
            program: name,
            source,
        })
}

pub(super) fn xdp<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, EbpfError> {
    ebpf.program_mut(name)
        .ok_or(EbpfError::MissingProgram(name))?
        .try_into()
        .map_err(|source| EbpfError::Program {
            program: name,
            source,
        })
}

pub(super) fn program_id(
    info: Result<aya::programs::ProgramInfo, ProgramError>,
    program: &'static str,
) -> Result<u32, EbpfError> {
    info.map(|i| i.id())
        .map_err(|source| EbpfError::Program { program, source })
}
