//! A stand-in for a NIC's receive checksum offload, which a veth lacks: a
//! TCX program on a sender's egress that marks every packet
//! CHECKSUM_UNNECESSARY with a chosen number of verified checksums
//! (`bpf_csum_level(BPF_CSUM_LEVEL_INC)` once per level: the first call turns
//! CHECKSUM_NONE into CHECKSUM_UNNECESSARY, each further one adds a level).
//! The veths and the switch's bridge leave the verdict alone, so the
//! receiving host gets what a NIC that had verified that many checksums
//! reports, with none of them verified: exactly what a receiver may and may
//! not trust shows.
//!
//! The program is five instructions long, loaded with `BPF_PROG_LOAD` and
//! attached with `BPF_LINK_CREATE`; the link lives as long as this value.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result, ensure};

use crate::netns;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_EGRESS: u32 = 47;
const BPF_FUNC_CSUM_LEVEL: i32 = 135;
const BPF_CSUM_LEVEL_INC: i32 = 1;
/// TCX_PASS (TC_ACT_OK): on to the device.
const TCX_PASS: i32 = 0;

/// A sender that claims `levels` checksums of everything it sends were verified.
pub struct ClaimedChecksums {
    _link: OwnedFd,
}

impl ClaimedChecksums {
    /// Attaches to the TCX egress of `dev` in namespace `ns`.
    pub fn attach(ns: &str, dev: &str, levels: u8) -> Result<ClaimedChecksums> {
        ensure!(levels >= 1, "at least one level");
        let dev = dev.to_owned();
        let link = netns::run_in(ns, move || {
            let prog = load(levels)?;
            let name = std::ffi::CString::new(dev.as_str())?;
            // SAFETY: a NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            ensure!(ifindex != 0, "no device {dev}");
            // union bpf_attr for BPF_LINK_CREATE: prog_fd, target_ifindex,
            // attach_type, flags, then the tcx member (all zero: append).
            let mut attr = [0u32; 16];
            attr[0] = prog.as_raw_fd() as u32;
            attr[1] = ifindex;
            attr[2] = BPF_TCX_EGRESS;
            bpf(BPF_LINK_CREATE, &mut attr).with_context(|| format!("TCX egress on {dev}"))
        })?;
        Ok(ClaimedChecksums { _link: link })
    }
}

/// Loads the program: r6 = ctx; `levels` times bpf_csum_level(r6, INC);
/// return TCX_PASS.
fn load(levels: u8) -> Result<OwnedFd> {
    // struct bpf_insn: code, dst_reg:4 | src_reg:4, off (i16), imm (i32).
    let insn = |code: u8, dst: u8, src: u8, imm: i32| -> u64 {
        u64::from(code) | u64::from(dst | src << 4) << 8 | u64::from(imm as u32) << 32
    };
    const MOV64_REG: u8 = 0xbf;
    const MOV64_IMM: u8 = 0xb7;
    const CALL: u8 = 0x85;
    const EXIT: u8 = 0x95;
    let mut prog = vec![insn(MOV64_REG, 6, 1, 0)];
    for _ in 0..levels {
        prog.push(insn(MOV64_REG, 1, 6, 0));
        prog.push(insn(MOV64_IMM, 2, 0, BPF_CSUM_LEVEL_INC));
        prog.push(insn(CALL, 0, 0, BPF_FUNC_CSUM_LEVEL));
    }
    prog.push(insn(MOV64_IMM, 0, 0, TCX_PASS));
    prog.push(insn(EXIT, 0, 0, 0));
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    // union bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt, insns, license,
    // log_level, log_size, log_buf, ...
    let mut attr = [0u32; 32];
    attr[0] = BPF_PROG_TYPE_SCHED_CLS;
    attr[1] = prog.len() as u32;
    let insns = prog.as_ptr() as u64;
    (attr[2], attr[3]) = (insns as u32, (insns >> 32) as u32);
    let lic = license.as_ptr() as u64;
    (attr[4], attr[5]) = (lic as u32, (lic >> 32) as u32);
    attr[6] = 1;
    attr[7] = log.len() as u32;
    let buf = log.as_mut_ptr() as u64;
    (attr[8], attr[9]) = (buf as u32, (buf >> 32) as u32);
    bpf(BPF_PROG_LOAD, &mut attr).with_context(|| {
        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
        format!("verifier: {}", String::from_utf8_lossy(&log[..end]))
    })
}

/// The bpf(2) syscall with `attr` as its `union bpf_attr`; the new fd.
fn bpf<const N: usize>(cmd: libc::c_long, attr: &mut [u32; N]) -> Result<OwnedFd> {
    // SAFETY: attr is a zero-padded bpf_attr of the size given; the pointers
    // in it stay valid for the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of_val(attr)) };
    ensure!(fd >= 0, "bpf({cmd}): {}", std::io::Error::last_os_error());
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
