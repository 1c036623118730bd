//! Why the eBPF datapath could not be set up or updated, and how a
//! verifier log is summed up for one log line.

use super::*;

/// The broad class of an eBPF failure, for the fallback decision and its log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EbpfFailure {
    /// The object could not be parsed, lacks a program or map, or a program
    /// could not be prepared for loading.
    Load,
    /// The kernel refused a program (`BPF_PROG_LOAD` failed; the verifier
    /// log is kept in the error).
    Verifier,
    /// Attaching a program to an interface failed.
    Attach,
    /// Reading or writing a map failed.
    Map,
    /// The host has policy (xfrm, policy routing) the programs would skip,
    /// or it could not be checked.
    HostPolicy,
    /// The pinned maps are of a newer layout (or one that cannot be read):
    /// nothing was touched, and nothing may be (see
    /// [`DatapathError::forbids_fallback`]).
    PinLayout,
}

/// Why the eBPF datapath could not be set up or updated. `Display` names the
/// failed step; the cause is the `source`. [`DatapathError::reason`] renders
/// both on one line, the reason the agent gives when it falls back to the
/// kernel datapath.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("eBPF: loading the object failed")]
    Object(#[source] aya::EbpfError),
    #[error("eBPF: the object has no program {0}")]
    MissingProgram(&'static str),
    #[error("eBPF: the object has no map {0}")]
    MissingMap(&'static str),
    /// The full verifier log is in `source` (`ProgramError::LoadError`);
    /// `summary` holds the errno and the log's last line.
    #[error("eBPF: the kernel rejected {program}: {summary}")]
    Verifier {
        program: &'static str,
        summary: String,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF: preparing {program} failed")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF: attaching {program} to {interface} ({hook}) failed")]
    Attach {
        program: &'static str,
        interface: String,
        hook: Hook,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF: removing our clsact filter {program} from {interface} failed")]
    Detach {
        program: &'static str,
        interface: String,
        #[source]
        source: crate::netlink::tc::TcNetlinkError,
    },
    #[error("eBPF: listing the clsact filters of {interface} failed")]
    ListFilters {
        interface: String,
        #[source]
        source: crate::netlink::tc::TcNetlinkError,
    },
    /// Another filter sits at our priority and handle: replacing it would
    /// destroy someone else's filter, so we leave it and fail instead.
    #[error(
        "eBPF: {program} cannot take its clsact place on {interface} (pref 8472 handle 1): another tool's {kind} filter{} holds it",
        name.as_ref().map(|n| format!(" {n}")).unwrap_or_default()
    )]
    LegacySlotTaken {
        program: &'static str,
        interface: String,
        kind: String,
        name: Option<String>,
    },
    #[error("eBPF: map {map}: {op} failed")]
    Map {
        map: &'static str,
        op: String,
        #[source]
        source: MapError,
    },
    #[error("eBPF: pin {path}: {op} failed")]
    Pin {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("eBPF: pinned link {path}: {op} failed")]
    Link {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: LinkError,
    },
    /// Per-CPU map values need the number of possible CPUs.
    #[error("eBPF: sizing per-CPU values from /sys/devices/system/cpu/possible failed")]
    Cpus(#[source] std::io::Error),
    #[error("eBPF: reading the object {path} failed")]
    ReadObject {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The running kernel lacks a helper feature the programs depend on at
    /// run time (the verifier would accept them and encapsulation fail).
    #[error(
        "eBPF: kernel {}.{} is older than {}.{}, the first whose bpf_skb_adjust_room can encapsulate an Ethernet frame (BPF_F_ADJ_ROOM_ENCAP_L2_ETH)",
        found.0, found.1, MIN_KERNEL.0, MIN_KERNEL.1
    )]
    KernelTooOld { found: (u32, u32) },
    /// `--fast-path=on` and the host's part could not be installed.
    #[error("eBPF: the fast path cannot be turned on: {0}")]
    FastPathHost(String),
    /// A peer map has no room for another entry (E2BIG from a hash map,
    /// ENOSPC from the LPM trie). Becomes [`DatapathError::MapFull`].
    #[error("eBPF: map {map} is full ({capacity} entries)")]
    MapFull { map: &'static str, capacity: u32 },
    /// The host applies policy to node-to-node traffic that the programs'
    /// outer packets would skip (see [`host_policy`]).
    #[error("eBPF: the host's policy for node traffic would be skipped")]
    HostPolicy(#[source] HostPolicyConflict),
    /// The host's xfrm policies or a peer's route could not be read: the
    /// eBPF datapath does not start on a guess.
    #[error("eBPF: checking the host's xfrm policies and routes failed")]
    HostPolicyCheck(#[source] HostPolicyError),
    /// Pod veths the fast path could not attach to or forget, each named
    /// with its error; the others were brought in line.
    #[error("eBPF: fast path")]
    PodVeths(#[from] fastpath::PodSyncError),
    /// The pin directory holds maps this build must not use (a downgrade).
    /// Returned before anything was changed.
    #[error("eBPF: refusing the pinned state")]
    PinLayout(#[source] LayoutError),
}

impl EbpfError {
    pub fn failure(&self) -> EbpfFailure {
        match self {
            EbpfError::Object(_)
            | EbpfError::MissingProgram(_)
            | EbpfError::MissingMap(_)
            | EbpfError::Program { .. }
            | EbpfError::ReadObject { .. }
            | EbpfError::KernelTooOld { .. } => EbpfFailure::Load,
            EbpfError::Verifier { .. } => EbpfFailure::Verifier,
            EbpfError::Attach { .. }
            | EbpfError::Detach { .. }
            | EbpfError::ListFilters { .. }
            | EbpfError::LegacySlotTaken { .. } => EbpfFailure::Attach,
            EbpfError::Map { .. }
            | EbpfError::MapFull { .. }
            | EbpfError::Pin { .. }
            | EbpfError::Link { .. }
            | EbpfError::Cpus(_) => EbpfFailure::Map,
            EbpfError::FastPathHost(_) | EbpfError::PodVeths(_) => EbpfFailure::Attach,
            EbpfError::HostPolicy(_) | EbpfError::HostPolicyCheck(_) => EbpfFailure::HostPolicy,
            EbpfError::PinLayout(_) => EbpfFailure::PinLayout,
        }
    }

    pub(in crate::datapath) fn map(
        map: &'static str,
        op: impl Into<String>,
        source: MapError,
    ) -> Self {
        EbpfError::Map {
            map,
            op: op.into(),
            source,
        }
    }

    pub(in crate::datapath) fn load(program: &'static str, source: ProgramError) -> Self {
        match &source {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => EbpfError::Verifier {
                program,
                summary: verifier_summary(io_error, &verifier_log.to_string()),
                source,
            },
            _ => EbpfError::Program { program, source },
        }
    }
}

/// The errno and the verifier's last words (its final non-empty log line
/// usually names the offending instruction or the limit hit).
pub(super) fn verifier_summary(io_error: &std::io::Error, log: &str) -> String {
    let last = log
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("processed "))
        .unwrap_or("no verifier log");
    format!("{io_error}; verifier: {last}")
}
