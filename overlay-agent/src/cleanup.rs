//! `overlay-agent cleanup`: removes what this agent created on the host,
//! which stopping it deliberately does not (as flanneld leaves its routes):
//! the pinned links (detaching the programs), our legacy clsact filters and
//! the maps, the `flannel.<VNI>`
//! device of its VNI (its address, routes, neighbour and FDB entries go
//! with it) and the FLANNEL-* chains with the jumps to them. The value
//! `nf_conntrack_tcp_be_liberal` had before the fast path set it, recorded
//! next to the pins, is put back. The lease in
//! etcd and subnet.env stay, so the node keeps its subnet if the agent
//! comes back.
//!
//! flanneld's device and chains have the same names as ours, so cleanup
//! decides first and refuses rather than guess: while a flanneld runs on the
//! host (unless `--force`), and when `flannel.<N>` devices exist but neither
//! the pins, `--vni` nor etcd's network config says which VNI is ours. A
//! refusal removes nothing.

use std::path::Path;

use crate::{
    datapath::{
        ebpf::{TC_PROGRAMS, read_node_config},
        pins::PinLayout,
        tc_attach, vtep_guard,
    },
    inspect,
    instance_lock::{self, Holder},
    ipmasq,
    netlink::{Netlink, NetlinkError},
};

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("removing our legacy clsact filters")]
    Filters(#[source] Box<crate::datapath::ebpf::EbpfError>),
    #[error("refusing: {0}")]
    Refused(#[from] Refusal),
    #[error("removing the pins under {dir}")]
    Pins {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("opening a netlink socket")]
    Connect(#[source] std::io::Error),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Iptables(#[from] ipmasq::IptablesError),
    #[error(transparent)]
    Guard(#[from] vtep_guard::GuardError),
    #[error("the iptables thread died")]
    IptablesThread(#[source] tokio::task::JoinError),
}

/// Why cleanup removes nothing.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "flanneld runs on this host (pid {}); its flannel.<VNI> and FLANNEL-* chains are named \
         like ours, so nothing was removed (stop it first, or pass --force to remove ours anyway)",
        list(.pids)
    )]
    FlanneldRuns { pids: Vec<u32> },
    #[error(
        "an overlay-agent ({holder}) runs with pin directory {dir}; nothing was removed \
         (stop it first, or pass --force to remove its state while it runs)"
    )]
    AgentRuns { dir: String, holder: Holder },
    #[error("the pinned state says VNI {pinned} but --vni says {flag}; nothing was removed")]
    VniDisagrees { pinned: u32, flag: u32 },
    #[error(
        "this host has {} but nothing says which is ours (no pinned state, no --vni, no network \
         config in etcd); nothing was removed: name it with `overlay-agent cleanup --vni <VNI>`",
        list(.found)
    )]
    UnknownVni { found: Vec<String> },
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What cleanup knows before it touches anything.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// The VNI the pinned NODE_CONFIG names (what the agent programmed).
    pub pinned_vni: Option<u32>,
    /// `--vni`.
    pub flag_vni: Option<u32>,
    /// The network config's, from etcd.
    pub config_vni: Option<u32>,
    /// The host's links.
    pub links: Vec<String>,
    /// flanneld processes running.
    pub flanneld: Vec<u32>,
    /// The agent holding the pin directory's lock, if one runs.
    pub agent: Option<Holder>,
    /// The pin directory.
    pub pin_dir: String,
    /// `--force`.
    pub force: bool,
}

/// The device to delete (if it exists), or why nothing may be removed. The
/// pins name the VNI the agent programmed; `--vni` may only confirm it;
/// without pins `--vni` wins over etcd's config.
pub fn decide(f: &Facts) -> Result<Option<String>, Refusal> {
    if let Some(holder) = f.agent
        && !f.force
    {
        return Err(Refusal::AgentRuns {
            dir: f.pin_dir.clone(),
            holder,
        });
    }
    if !f.flanneld.is_empty() && !f.force {
        return Err(Refusal::FlanneldRuns {
            pids: f.flanneld.clone(),
        });
    }
    let vni = match (f.pinned_vni, f.flag_vni) {
        (Some(pinned), Some(flag)) if pinned != flag => {
            return Err(Refusal::VniDisagrees { pinned, flag });
        }
        (Some(v), _) | (None, Some(v)) => Some(v),
        (None, None) => f.config_vni,
    };
    let Some(vni) = vni else {
        let found: Vec<String> = f
            .links
            .iter()
            .filter(|n| is_vxlan_name(n))
            .cloned()
            .collect();
        if found.is_empty() {
            return Ok(None);
        }
        return Err(Refusal::UnknownVni { found });
    };
    let ours = format!("flannel.{vni}");
    Ok(f.links.contains(&ours).then_some(ours))
}

/// `flannel.<number>`, the name flanneld and we give the VXLAN device.
fn is_vxlan_name(name: &str) -> bool {
    name.strip_prefix("flannel.")
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// The pids whose `comm` is `flanneld`, from `proc` (`/proc`).
pub fn flanneld_pids(proc: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(proc) else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(proc.join(pid.to_string()).join("comm"))
                .is_ok_and(|c| c.trim_end() == "flanneld")
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// `cleanup`'s flags and what etcd said.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// `--vni`.
    pub vni: Option<u32>,
    /// The network config's VNI, if etcd answered.
    pub config_vni: Option<u32>,
    /// `--force`.
    pub force: bool,
}

/// Decides, then removes; returns one line per thing removed. Must run in a
/// tokio runtime, in the node's network namespace.
pub async fn run(pins: &PinLayout, opts: &Options) -> Result<Vec<String>, CleanupError> {
    let pinned_vni = inspect::open(pins, overlay_common::consts::MAP_NODE_CONFIG)
        .ok()
        .and_then(|m| read_node_config(&m).ok())
        .filter(|c| c.configured != 0)
        .map(|c| c.vni);
    let nl = Netlink::connect().map_err(CleanupError::Connect)?;
    let links: Vec<String> = nl.links().await?.into_iter().map(|l| l.name).collect();
    let facts = Facts {
        pinned_vni,
        flag_vni: opts.vni,
        config_vni: opts.config_vni,
        links,
        flanneld: flanneld_pids(Path::new("/proc")),
        // Probed, not held: cleanup never keeps an agent from starting.
        agent: instance_lock::pin_dir_holder(pins.root()),
        pin_dir: pins.root().display().to_string(),
        force: opts.force,
    };
    let device = decide(&facts)?;
    if let Some(holder) = facts.agent {
        log::warn!(
            "--force: removing the state of the overlay-agent that runs ({holder}) under {}",
            facts.pin_dir
        );
    }
    if !facts.flanneld.is_empty() {
        log::warn!(
            "--force: removing ours although flanneld runs (pid {})",
            list(&facts.flanneld)
        );
    }

    let mut removed = Vec::new();
    // Before the pins go: the record lives in their directory.
    if let Some(v) = crate::datapath::fastpath::restore_be_liberal(pins) {
        removed.push(format!(
            "the fast path's nf_conntrack_tcp_be_liberal = 1 (restored to {v})"
        ));
    }
    for p in pins.remove_all().map_err(|source| CleanupError::Pins {
        dir: pins.root().display().to_string(),
        source,
    })? {
        removed.push(format!("pin {}", p.display()));
    }
    // Legacy clsact filters are not pinned: found by our programs' names.
    for (interface, program) in tc_attach::detach_legacy_everywhere(&TC_PROGRAMS)
        .map_err(|e| CleanupError::Filters(Box::new(e)))?
    {
        removed.push(format!("clsact filter {program} on {interface}"));
    }
    // A dual-stack node's IPv6 twin goes with it.
    let twin = device
        .as_deref()
        .and_then(|d| d.strip_prefix("flannel."))
        .map(|vni| format!("flannel-v6.{vni}"));
    for name in device.into_iter().chain(twin) {
        if nl.delete_link_by_name(&name).await? {
            removed.push(format!(
                "device {name} (with its routes, neighbour and FDB entries)"
            ));
        }
    }
    let rules = tokio::task::spawn_blocking(ipmasq::remove_all)
        .await
        .map_err(CleanupError::IptablesThread)??;
    removed.extend(rules);
    if tokio::task::spawn_blocking(vtep_guard::remove)
        .await
        .map_err(CleanupError::IptablesThread)??
    {
        removed.push(format!(
            "nft table {} {} (the VXLAN port's guard)",
            vtep_guard::FAMILY,
            vtep_guard::TABLE
        ));
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links() -> Vec<String> {
        [
            "lo",
            "eth0",
            "flannel.1",
            "flannel.42",
            "flannel.x",
            "flannel.",
        ]
        .into_iter()
        .map(String::from)
        .collect()
    }

    #[test]
    fn the_pins_then_the_flag_then_the_config_name_the_device() {
        let f = |pinned_vni, flag_vni, config_vni| Facts {
            pinned_vni,
            flag_vni,
            config_vni,
            links: links(),
            ..Facts::default()
        };
        assert_eq!(
            decide(&f(Some(42), None, Some(1))),
            Ok(Some("flannel.42".into()))
        );
        assert_eq!(
            decide(&f(Some(42), Some(42), None)),
            Ok(Some("flannel.42".into()))
        );
        assert_eq!(
            decide(&f(None, Some(42), Some(1))),
            Ok(Some("flannel.42".into()))
        );
        assert_eq!(
            decide(&f(None, None, Some(1))),
            Ok(Some("flannel.1".into()))
        );
        // Ours is gone already: nothing to delete, nothing else touched.
        assert_eq!(decide(&f(None, Some(7), None)), Ok(None));
        assert_eq!(
            decide(&f(Some(42), Some(1), None)),
            Err(Refusal::VniDisagrees {
                pinned: 42,
                flag: 1
            })
        );
    }

    #[test]
    fn an_unknown_vni_with_vxlan_devices_about_is_a_refusal_naming_them() {
        let f = Facts {
            links: links(),
            ..Facts::default()
        };
        let refusal = decide(&f).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::UnknownVni {
                found: vec!["flannel.1".into(), "flannel.42".into()]
            }
        );
        let msg = refusal.to_string();
        assert!(msg.contains("flannel.1, flannel.42"), "{msg}");
        assert!(msg.contains("cleanup --vni <VNI>"), "{msg}");
        // No such device at all: nothing to guess about.
        let bare = Facts {
            links: vec!["lo".into(), "eth0".into()],
            ..Facts::default()
        };
        assert_eq!(decide(&bare), Ok(None));
    }

    #[test]
    fn a_running_flanneld_is_a_refusal_unless_forced() {
        let mut f = Facts {
            pinned_vni: Some(1),
            links: links(),
            flanneld: vec![812, 4711],
            ..Facts::default()
        };
        let refusal = decide(&f).unwrap_err();
        assert!(refusal.to_string().contains("pid 812, 4711"), "{refusal}");
        assert!(refusal.to_string().contains("--force"), "{refusal}");
        f.force = true;
        assert_eq!(decide(&f), Ok(Some("flannel.1".into())));
        // --force does not make a guess.
        f.pinned_vni = None;
        assert!(matches!(decide(&f), Err(Refusal::UnknownVni { .. })));
    }

    #[test]
    fn a_running_agent_is_a_refusal_naming_its_pid_unless_forced() {
        let mut f = Facts {
            pinned_vni: Some(1),
            links: links(),
            agent: Some(Holder(Some(4242))),
            pin_dir: "/sys/fs/bpf/overlay".into(),
            ..Facts::default()
        };
        let refusal = decide(&f).unwrap_err();
        let msg = refusal.to_string();
        assert!(
            msg.contains("an overlay-agent (pid 4242) runs with pin directory /sys/fs/bpf/overlay"),
            "{msg}"
        );
        assert!(msg.contains("--force"), "{msg}");
        f.force = true;
        assert_eq!(decide(&f), Ok(Some("flannel.1".into())));
    }

    #[test]
    fn flanneld_is_found_by_its_comm() {
        let proc =
            std::env::temp_dir().join(format!("overlay-cleanup-proc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&proc);
        for (pid, comm) in [
            ("1", "systemd\n"),
            ("812", "flanneld\n"),
            ("900", "flanneld-x\n"),
        ] {
            std::fs::create_dir_all(proc.join(pid)).unwrap();
            std::fs::write(proc.join(pid).join("comm"), comm).unwrap();
        }
        std::fs::create_dir_all(proc.join("self")).unwrap();
        std::fs::create_dir_all(proc.join("4711")).unwrap(); // exited: no comm
        let found = flanneld_pids(&proc);
        std::fs::remove_dir_all(&proc).unwrap();
        assert_eq!(found, [812]);
    }
}
