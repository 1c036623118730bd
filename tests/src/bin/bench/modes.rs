//! The same two-host lab in each mode the benchmark compares: host network
//! (host to host over the underlay, no containers: the ceiling no pod path can
//! beat), plain routing (containers, no overlay), our kernel-vxlan datapath
//! (what flannel users have), and our eBPF datapath: with the fast path (the
//! default), and on the host's path (`--fast-path=off`) with TC-only or
//! XDP+TC ingress.

use std::net::Ipv4Addr;

use anyhow::{Result, bail};
use overlay_agent::datapath::{ebpf::IngressMode, fastpath::FastPathMode};
use overlay_tests::{cmd, netns};
use overlay_tests::{
    lab::{Lab, LabSpec},
    overlay::{self, Kind, Member, Overlay},
    traffic,
};

use crate::connrate;
use crate::pin::Pinning;
use crate::tools::Servers;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    Host,
    Plain,
    Kernel,
    EbpfFast,
    EbpfTc,
    EbpfXdp,
}

impl Mode {
    pub const ALL: [Mode; 6] = [
        Mode::Host,
        Mode::Plain,
        Mode::Kernel,
        Mode::EbpfFast,
        Mode::EbpfTc,
        Mode::EbpfXdp,
    ];

    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Host => "host",
            Mode::Plain => "plain",
            Mode::Kernel => "kernel",
            Mode::EbpfFast => "ebpf-fast",
            Mode::EbpfTc => "ebpf-tc",
            Mode::EbpfXdp => "ebpf-xdp",
        }
    }

    /// The column heading in the report.
    pub fn label(self) -> &'static str {
        match self {
            Mode::Host => "host network",
            Mode::Plain => "plain routing",
            Mode::Kernel => "kernel vxlan",
            Mode::EbpfFast => "eBPF fast path (default)",
            Mode::EbpfTc => "eBPF host path (TC)",
            Mode::EbpfXdp => "eBPF host path (XDP+TC, experimental)",
        }
    }

    /// What a run measures unless `--modes` says otherwise: every mode but
    /// the experimental XDP ingress, whose TCP figures are a veth artefact
    /// (XDP on a veth strips GSO from its peer) and which would add a sixth
    /// of the run's time.
    pub const DEFAULT: [Mode; 5] = [
        Mode::Host,
        Mode::Plain,
        Mode::Kernel,
        Mode::EbpfFast,
        Mode::EbpfTc,
    ];

    pub fn is_ebpf(self) -> bool {
        matches!(self, Mode::EbpfFast | Mode::EbpfTc | Mode::EbpfXdp)
    }

    pub fn parse(s: &str) -> Result<Mode> {
        match s {
            "ebpf" => bail!("say ebpf-fast, ebpf-tc or ebpf-xdp"),
            _ => Mode::ALL
                .into_iter()
                .find(|m| m.name() == s)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "unknown mode {s:?} (host, plain, kernel, ebpf-fast, ebpf-tc, ebpf-xdp)"
                    )
                }),
        }
    }

    /// Lab names are part of namespace names: at most 8 letters/digits.
    fn lab_name(self) -> &'static str {
        match self {
            Mode::Host => "bhost",
            Mode::Plain => "bplain",
            Mode::Kernel => "bkernel",
            Mode::EbpfFast => "bebpffp",
            Mode::EbpfTc => "bebpftc",
            Mode::EbpfXdp => "bebpfxdp",
        }
    }
}

/// A NAT rule that matches no lab traffic (TEST-NET-1 is never an address
/// here), so that the host tracks connections as a Kubernetes node does in
/// every mode: NAT needs conntrack, and a node always has NAT rules
/// (kube-proxy's, flanneld's `--ip-masq`, the default of kube-flannel's
/// manifest). Without it only the eBPF fast path, whose mangle rule matches
/// on conntrack state, would turn conntrack on in its namespaces and pay for
/// it alone: about a third of what the fast path's connections cost more
/// than the host path's in `perf` (nf_conntrack_in, __nf_conntrack_find_get,
/// nf_conntrack_tcp_packet, nft_do_chain).
fn track_connections(ns: &str) -> Result<()> {
    cmd::run_in(
        ns,
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-d",
            "192.0.2.0/24",
            "-m",
            "comment",
            "--comment",
            "bench: conntrack on in every mode",
            "-j",
            "MASQUERADE",
        ],
    )?;
    Ok(())
}

/// Where a mode's traffic goes: from `client_ns` to `server_ip` in `server_ns`,
/// whose interface `server_dev` counts what arrives.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub client_ns: String,
    pub server_ns: String,
    pub server_ip: Ipv4Addr,
    pub server_dev: String,
}

/// A lab brought up in one mode, with the servers running in host 2's
/// container (host 2 itself for the host-network mode).
/// Fields drop in order: servers, then the datapaths, then the namespaces.
pub struct ModeLab {
    pub mode: Mode,
    servers: Option<Servers>,
    members: Vec<Member>,
    pub lab: Lab,
}

impl ModeLab {
    pub fn build(mode: Mode, pin: Pinning) -> Result<ModeLab> {
        let lab = Lab::build(&LabSpec::new(mode.lab_name(), 2))?;
        let mut ml = ModeLab {
            mode,
            servers: None,
            members: Vec::new(),
            lab,
        };
        let (h1, h2) = (ml.lab.host(1).clone(), ml.lab.host(2).clone());
        for h in [&h1, &h2] {
            track_connections(&h.ns)?;
        }
        let kind = match mode {
            Mode::Host | Mode::Plain => None,
            Mode::Kernel => Some((Kind::Kernel, FastPathMode::Off)),
            Mode::EbpfFast => Some((Kind::Ebpf(IngressMode::Tc), FastPathMode::On)),
            Mode::EbpfTc => Some((Kind::Ebpf(IngressMode::Tc), FastPathMode::Off)),
            Mode::EbpfXdp => Some((Kind::Ebpf(IngressMode::XdpAndTc), FastPathMode::Off)),
        };
        match kind {
            // Host to host needs nothing but the underlay the lab already has.
            None if mode == Mode::Host => {}
            None => ml.lab.route_plain()?,
            Some((kind, fast_path)) => {
                for h in [&h1, &h2] {
                    ml.members
                        .push(Member::join_with(h, kind, Overlay::default(), fast_path)?);
                }
                overlay::mesh(&ml.members.iter().collect::<Vec<_>>())?;
            }
        }
        let ends = ml.endpoints();
        // Resolves neighbours and proves the path before anything is timed.
        traffic::ping(&ends.client_ns, ends.server_ip, 3)?;
        netns::sysctl(&ends.client_ns, connrate::CLIENT_SYSCTLS)?;
        ml.servers = Some(Servers::start(&ends.server_ns, ends.server_ip, pin)?);
        Ok(ml)
    }

    /// Container to container, or host to host for the host-network mode.
    pub fn endpoints(&self) -> Endpoints {
        let (h1, h2) = (self.lab.host(1), self.lab.host(2));
        if self.mode == Mode::Host {
            Endpoints {
                client_ns: h1.ns.clone(),
                server_ns: h2.ns.clone(),
                server_ip: h2.underlay_ip,
                server_dev: h2.underlay_dev.clone(),
            }
        } else {
            Endpoints {
                client_ns: h1.container_ns.clone(),
                server_ns: h2.container_ns.clone(),
                server_ip: h2.container_ip,
                // The container's end of its veth.
                server_dev: "eth0".to_owned(),
            }
        }
    }

    /// The hosts' namespaces, with their index (1, 2).
    pub fn host_namespaces(&self) -> Vec<(usize, String)> {
        [1, 2]
            .into_iter()
            .map(|i: u8| (usize::from(i), self.lab.host(i).ns.clone()))
            .collect()
    }

    /// The eBPF counters per host (nothing for the other modes).
    pub fn reports(&self) -> Vec<String> {
        self.members
            .iter()
            .filter_map(|m| match m.counters() {
                Ok(Some(c)) => Some(format!("host {}: {c}", m.host.index)),
                Ok(None) => None,
                Err(e) => Some(format!("host {}: no counters: {e:#}", m.host.index)),
            })
            .collect()
    }

    pub fn destroy(mut self) -> Result<()> {
        self.servers = None;
        // Dropping a member tears its datapath down on its own thread.
        self.members.clear();
        self.lab
            .destroy()
            .map_err(|e| e.context(format!("tearing down the {} lab", self.mode.name())))
    }
}
