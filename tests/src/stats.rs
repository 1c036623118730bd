//! What the kernel says about a host: a device's own packet statistics, and
//! which BPF programs are attached to which interface (XDP, TCX, legacy tc).

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use aya::programs::{SchedClassifier, TcAttachType};

use crate::{cmd, netns};

/// `/sys/class/net/<dev>/statistics/*` of one device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DevStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl DevStats {
    /// Counts added since `earlier`.
    pub fn since(&self, earlier: &DevStats) -> DevStats {
        DevStats {
            rx_packets: self.rx_packets - earlier.rx_packets,
            tx_packets: self.tx_packets - earlier.tx_packets,
            rx_bytes: self.rx_bytes - earlier.rx_bytes,
            tx_bytes: self.tx_bytes - earlier.tx_bytes,
        }
    }
}

/// Reads a device's statistics inside namespace `ns`. `ip netns exec` remounts
/// /sys for the namespace, which a setns() thread would not see.
pub fn dev_stats(ns: &str, dev: &str) -> Result<DevStats> {
    let files: Vec<String> = ["rx_packets", "tx_packets", "rx_bytes", "tx_bytes"]
        .iter()
        .map(|f| format!("/sys/class/net/{dev}/statistics/{f}"))
        .collect();
    let mut args = vec!["cat"];
    args.extend(files.iter().map(String::as_str));
    let out = cmd::run_in(ns, &args)?;
    let v: Vec<u64> = out
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing statistics of {dev}: {out:?}"))?;
    anyhow::ensure!(v.len() == 4, "statistics of {dev}: {out:?}");
    Ok(DevStats {
        rx_packets: v[0],
        tx_packets: v[1],
        rx_bytes: v[2],
        tx_bytes: v[3],
    })
}

/// A program as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachedProgram {
    pub id: u32,
    /// The kernel keeps at most 15 characters of a program's name.
    pub name: String,
}

impl AttachedProgram {
    /// Whether this is the program called `full_name` in the object (the
    /// kernel truncates names to 15 characters).
    pub fn is(&self, full_name: &str) -> bool {
        let n = full_name.len().min(15);
        self.name == full_name[..n]
    }
}

/// Which BPF programs are attached in a namespace, per interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attachments {
    /// Interface -> XDP program id (from `ip -j -d link`).
    pub xdp: BTreeMap<String, u64>,
    /// (interface, "ingress"/"egress") -> names of TCX programs (BPF_PROG_QUERY).
    pub tcx: BTreeMap<(String, &'static str), Vec<String>>,
    /// The same TCX programs with their ids.
    pub tcx_programs: BTreeMap<(String, &'static str), Vec<AttachedProgram>>,
    /// `bpftool -j net show` entries for classic tc (clsact) filters and XDP.
    pub bpftool_tc: Vec<serde_json::Value>,
    pub bpftool_xdp: Vec<serde_json::Value>,
}

impl Attachments {
    /// True when nothing at all is attached anywhere in the namespace.
    pub fn is_empty(&self) -> bool {
        self.xdp.is_empty()
            && self.tcx.values().all(Vec::is_empty)
            && self.bpftool_tc.is_empty()
            && self.bpftool_xdp.is_empty()
    }

    /// TCX programs on `dev` in `direction` ("ingress"/"egress").
    pub fn tcx_on(&self, dev: &str, direction: &str) -> Vec<AttachedProgram> {
        self.tcx_programs
            .iter()
            .filter(|((d, dir), _)| d == dev && *dir == direction)
            .flat_map(|(_, v)| v.iter().cloned())
            .collect()
    }
}

/// Everything attached in namespace `ns`, by three independent views: iproute2
/// (XDP), the kernel's TCX query (what `bpftool net` of this bpftool version
/// cannot show) and bpftool (classic tc and XDP).
pub fn attachments(ns: &str) -> Result<Attachments> {
    let links: serde_json::Value =
        serde_json::from_str(&cmd::ip(ns, &["-j", "-d", "link", "show"])?)
            .context("parsing `ip -j -d link show`")?;
    let mut out = Attachments::default();
    let mut names = Vec::new();
    for link in links.as_array().into_iter().flatten() {
        let Some(name) = link["ifname"].as_str() else {
            continue;
        };
        names.push(name.to_owned());
        let xdp = &link["xdp"];
        if !xdp.is_null() {
            let id = xdp["prog"]["id"]
                .as_u64()
                .or_else(|| xdp["attached"][0]["prog"]["id"].as_u64())
                .unwrap_or(0);
            out.xdp.insert(name.to_owned(), id);
        }
    }
    let tcx = netns::run_in(ns, move || {
        let mut tcx = BTreeMap::new();
        for name in names {
            for (dir, attach) in [
                ("ingress", TcAttachType::Ingress),
                ("egress", TcAttachType::Egress),
            ] {
                let (_, progs) = SchedClassifier::query_tcx(&name, attach)
                    .with_context(|| format!("TCX query on {name} {dir}"))?;
                let progs: Vec<AttachedProgram> = progs
                    .iter()
                    .map(|p| AttachedProgram {
                        id: p.id(),
                        name: p.name_as_str().unwrap_or("?").to_owned(),
                    })
                    .collect();
                tcx.insert((name.clone(), dir), progs);
            }
        }
        Ok(tcx)
    })?;
    out.tcx = tcx
        .iter()
        .map(|(k, progs)| (k.clone(), progs.iter().map(|p| p.name.clone()).collect()))
        .collect();
    out.tcx_programs = tcx;
    let net: serde_json::Value =
        serde_json::from_str(&cmd::run_in(ns, &["bpftool", "-j", "net", "show"])?)
            .context("parsing `bpftool -j net show`")?;
    for entry in net.as_array().into_iter().flatten() {
        out.bpftool_tc
            .extend(entry["tc"].as_array().into_iter().flatten().cloned());
        out.bpftool_xdp
            .extend(entry["xdp"].as_array().into_iter().flatten().cloned());
    }
    Ok(out)
}

/// Installs two FORWARD rules in namespace `ns` that count what the host
/// routes in from `dev` (`-i dev`) and out to it (`-o dev`): what a user's
/// iptables rules on `flannel.<VNI>` see. They only count (ACCEPT is the default).
pub fn count_forwarding(ns: &str, dev: &str) -> Result<()> {
    for dir in ["-i", "-o"] {
        cmd::run_in(
            ns,
            &["iptables", "-w", "-A", "FORWARD", dir, dev, "-j", "ACCEPT"],
        )?;
    }
    Ok(())
}

/// Packets counted by the rules of [`count_forwarding`]: (in from `dev`, out to `dev`).
pub fn forwarding_counts(ns: &str, dev: &str) -> Result<(u64, u64)> {
    let out = cmd::run_in(ns, &["iptables-save", "-c", "-t", "filter"])?;
    let count = |dir: &str| -> Result<u64> {
        let rule = format!("-A FORWARD {dir} {dev} -j ACCEPT");
        let line = out
            .lines()
            .find(|l| l.ends_with(&rule))
            .with_context(|| format!("no rule {rule:?} in iptables-save: {out}"))?;
        // "[packets:bytes] -A FORWARD ..."
        line.trim_start_matches('[')
            .split(':')
            .next()
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("parsing counters of {line:?}"))
    };
    Ok((count("-i")?, count("-o")?))
}
