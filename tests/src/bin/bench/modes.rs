//! The same two-host lab in each mode the benchmark compares: host network
//! (host to host over the underlay, no containers: the ceiling no pod path can
//! beat), plain routing (containers, no overlay), our kernel-vxlan datapath
//! (what flannel users have), and our eBPF datapath: with the fast path (the
//! default), and on the host's path (`--fast-path=off`) with TC-only or
//! XDP+TC ingress.
//!
//! Each mode can also be built dual stack for the IPv6 rows ([`Family`]):
//! the same lab with IPv6 beside IPv4, traffic between the IPv6 addresses.
//! The IPv4 rows keep their IPv4-only labs.

use std::net::IpAddr;

use anyhow::{Result, bail};
use overlay_agent::datapath::{ebpf::IngressMode, fastpath::FastPathMode};
use overlay_tests::{cmd, netns};
use overlay_tests::{
    lab::{Host6, Lab, LabSpec},
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
    fn lab_name(self, family: Family) -> &'static str {
        match (self, family) {
            (Mode::Host, Family::Ipv4) => "bhost",
            (Mode::Plain, Family::Ipv4) => "bplain",
            (Mode::Kernel, Family::Ipv4) => "bkernel",
            (Mode::EbpfFast, Family::Ipv4) => "bebpffp",
            (Mode::EbpfTc, Family::Ipv4) => "bebpftc",
            (Mode::EbpfXdp, Family::Ipv4) => "bebpfxdp",
            (Mode::Host, Family::Ipv6) => "bhost6",
            (Mode::Plain, Family::Ipv6) => "bplain6",
            (Mode::Kernel, Family::Ipv6) => "bkernel6",
            (Mode::EbpfFast, Family::Ipv6) => "bebpffp6",
            (Mode::EbpfTc, Family::Ipv6) => "bebpftc6",
            (Mode::EbpfXdp, Family::Ipv6) => "bebpfxd6",
        }
    }

    /// Whether the mode has rows in `family`: IPv6 has the host network,
    /// plain routing, kernel vxlan (`flannel-v6.<VNI>`) and the eBPF
    /// datapath with its fast path (the eBPF host-path modes are IPv4 only).
    pub fn has_family(self, family: Family) -> bool {
        match family {
            Family::Ipv4 => true,
            Family::Ipv6 => matches!(
                self,
                Mode::Host | Mode::Plain | Mode::Kernel | Mode::EbpfFast
            ),
        }
    }
}

/// Which address family a lab's traffic uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// IPv4-only labs: the report's main rows.
    Ipv4,
    /// Dual-stack labs, traffic between the IPv6 addresses: the IPv6 rows.
    Ipv6,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }

    /// `--family`: ipv4, ipv6 or both.
    pub fn parse_list(s: &str) -> Result<Vec<Family>> {
        Ok(match s {
            "ipv4" => vec![Family::Ipv4],
            "ipv6" => vec![Family::Ipv6],
            "both" => vec![Family::Ipv4, Family::Ipv6],
            _ => bail!("unknown family {s:?} (ipv4, ipv6, both)"),
        })
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
fn track_connections(ns: &str, family: Family) -> Result<()> {
    // Conntrack is turned on per family: IPv6 gets the same rule, with the
    // documentation prefix.
    let mut rules = vec![("iptables", "192.0.2.0/24")];
    if family == Family::Ipv6 {
        rules.insert(0, ("ip6tables", "2001:db8::/32"));
    }
    for (tool, never) in rules {
        cmd::run_in(
            ns,
            &[
                tool,
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-d",
                never,
                "-m",
                "comment",
                "--comment",
                "bench: conntrack on in every mode",
                "-j",
                "MASQUERADE",
            ],
        )?;
    }
    Ok(())
}

/// Where a mode's traffic goes: from `client_ns` to `server_ip` in `server_ns`,
/// whose interface `server_dev` counts what arrives.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub client_ns: String,
    pub server_ns: String,
    pub server_ip: IpAddr,
    pub server_dev: String,
}

/// A lab brought up in one mode, with the servers running in host 2's
/// container (host 2 itself for the host-network mode).
/// Fields drop in order: servers, then the datapaths, then the namespaces.
pub struct ModeLab {
    pub mode: Mode,
    pub family: Family,
    servers: Option<Servers>,
    members: Vec<Member>,
    pub lab: Lab,
}

impl ModeLab {
    pub fn build(mode: Mode, family: Family, pin: Pinning) -> Result<ModeLab> {
        if !mode.has_family(family) {
            bail!("{} has no {} rows", mode.name(), family.name());
        }
        let spec = LabSpec::new(mode.lab_name(family), 2);
        let spec = match family {
            Family::Ipv4 => spec,
            Family::Ipv6 => spec.with_ipv6(),
        };
        let lab = Lab::build(&spec)?;
        let mut ml = ModeLab {
            mode,
            family,
            servers: None,
            members: Vec::new(),
            lab,
        };
        let (h1, h2) = (ml.lab.host(1).clone(), ml.lab.host(2).clone());
        for h in [&h1, &h2] {
            track_connections(&h.ns, family)?;
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
                    let member = match ml.lab.host6(h.index) {
                        None => Member::join_with(h, kind, Overlay::default(), fast_path)?,
                        Some(h6) => {
                            Member::join_dual_stack(h, &h6, kind, Overlay::default(), fast_path)?
                        }
                    };
                    ml.members.push(member);
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

    /// Container to container, or host to host for the host-network mode;
    /// their IPv6 addresses in a dual-stack lab.
    pub fn endpoints(&self) -> Endpoints {
        let (h1, h2) = (self.lab.host(1), self.lab.host(2));
        let v6 = self
            .lab
            .host6(2)
            .map(|h: Host6| (IpAddr::from(h.underlay_ip), IpAddr::from(h.container_ip)));
        if self.mode == Mode::Host {
            Endpoints {
                client_ns: h1.ns.clone(),
                server_ns: h2.ns.clone(),
                server_ip: v6.map_or(h2.underlay_ip.into(), |(underlay, _)| underlay),
                server_dev: h2.underlay_dev.clone(),
            }
        } else {
            Endpoints {
                client_ns: h1.container_ns.clone(),
                server_ns: h2.container_ns.clone(),
                server_ip: v6.map_or(h2.container_ip.into(), |(_, container)| container),
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
