//! `overlay-agent status`: what the eBPF datapath holds, read from its pins,
//! so it answers the same whether the agent runs or has stopped.

use std::{collections::HashMap, fmt::Write as _, net::Ipv4Addr, path::PathBuf};

use aya::maps::{Map, MapData};
use overlay_common::{
    consts::{
        MAP_COUNTERS, MAP_NODE_CONFIG, MAP_NODE_CONFIG6, MAP_PEER_STATS, MAP_REMOTE_SUBNETS,
        MAP_REMOTE_SUBNETS6, PROG_EGRESS, PROG_EGRESS6, PROG_INGRESS_TC, PROG_INGRESS_XDP,
        PROG_VETH_FROM_POD, PROG_VETH_TO_POD,
    },
    maps::{MAP_LAYOUT_VERSION, NodeConfig, NodeConfig6},
};

use crate::{
    datapath::{
        Peer,
        ebpf::{
            Counters, EbpfError, PeerCounters, read_counters, read_node_config, read_node_config6,
            read_peer_counters, read_remote_subnets, read_remote_subnets6,
        },
        pins::{LayoutError, LinkInfo, PinLayout, PinnedLayout, link_info, obj_get},
        vtep_guard::{self, GuardCounters},
    },
    flannel::mac::MacAddr,
};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("opening pinned map {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("reading pinned link {path}")]
    Link {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Read(Box<EbpfError>),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// Maps of a newer build: this build would misread them.
    #[error(
        "the pinned maps under {} have layout version {found}, newer than this build's {}: read them with the newer build's `status`",
        dir.display(),
        MAP_LAYOUT_VERSION
    )]
    NewerLayout { dir: PathBuf, found: u32 },
}

impl From<EbpfError> for InspectError {
    fn from(e: EbpfError) -> Self {
        InspectError::Read(Box::new(e))
    }
}

/// Everything the pins hold.
#[derive(Debug)]
pub struct PinnedState {
    /// The layout the maps record: read as this build's own layout even
    /// when it is an older one (their sizes matched when they were opened).
    pub layout: PinnedLayout,
    pub node: NodeConfig,
    /// A dual-stack node's IPv6 side and how many peers' IPv6 subnets the
    /// maps hold (`None` on an IPv4-only node, or pins from before them).
    pub node6: Option<(NodeConfig6, usize)>,
    /// (program, link) for each pinned link.
    /// The pinned links by pin name (a fast-path veth link's name ends in
    /// its veth's ifindex).
    pub links: Vec<(String, LinkInfo)>,
    pub peers: Vec<Peer>,
    /// PEER_STATS by public IP, read in one pass.
    pub traffic: HashMap<Ipv4Addr, PeerCounters>,
    pub counters: Counters,
}

/// Opens the pinned map `name` of `layout`.
pub fn open(layout: &PinLayout, name: &str) -> Result<Map, InspectError> {
    let path = layout.map(name);
    MapData::from_pin(&path)
        .and_then(Map::from_map_data)
        .map_err(|source| InspectError::Open {
            path,
            source: Box::new(source),
        })
}

/// Reads the pins; `None` when there are none (kernel datapath, or never run).
pub fn read(layout: &PinLayout) -> Result<Option<PinnedState>, InspectError> {
    if !layout.map(MAP_NODE_CONFIG).exists() {
        return Ok(None);
    }
    let pinned = layout.pinned_layout()?;
    if let PinnedLayout::Version(found) = pinned
        && found > MAP_LAYOUT_VERSION
    {
        return Err(InspectError::NewerLayout {
            dir: layout.root().to_owned(),
            found,
        });
    }
    let node = read_node_config(&open(layout, MAP_NODE_CONFIG)?)?;
    let node6 = match layout.map(MAP_NODE_CONFIG6).exists() {
        true => Some(read_node_config6(&open(layout, MAP_NODE_CONFIG6)?)?)
            .filter(|c| c.configured != 0)
            .map(|c| -> Result<_, InspectError> {
                let peers = read_remote_subnets6(&open(layout, MAP_REMOTE_SUBNETS6)?)?;
                Ok((c, peers.len()))
            })
            .transpose()?,
        false => None,
    };
    let mut names: Vec<String> = [PROG_EGRESS, PROG_EGRESS6, PROG_INGRESS_TC, PROG_INGRESS_XDP]
        .into_iter()
        .map(str::to_owned)
        .collect();
    // The fast path's, one pair per pod veth, in name order.
    let mut veths: Vec<String> = std::fs::read_dir(layout.links_dir())
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(PROG_VETH_FROM_POD) || n.starts_with(PROG_VETH_TO_POD))
        .collect();
    veths.sort();
    names.extend(veths);
    let mut links = Vec::new();
    for program in names {
        let path = layout.link(&program);
        if !path.exists() {
            continue;
        }
        let info = obj_get(&path)
            .and_then(|fd| link_info(&fd))
            .map_err(|source| InspectError::Link { path, source })?;
        links.push((program, info));
    }
    Ok(Some(PinnedState {
        layout: pinned,
        node,
        node6,
        links,
        peers: read_remote_subnets(&open(layout, MAP_REMOTE_SUBNETS)?)?,
        traffic: read_peer_counters(&open(layout, MAP_PEER_STATS)?)?,
        counters: read_counters(&open(layout, MAP_COUNTERS)?)?,
    }))
}

/// This node's lease as etcd holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseStatus {
    pub key: String,
    pub subnet: String,
    /// Seconds left; `None` for a reservation (no etcd lease).
    pub ttl_seconds: Option<i64>,
}

/// The report `overlay-agent status` prints.
pub fn render(
    layout: &PinLayout,
    state: Option<&PinnedState>,
    lease: Result<Option<LeaseStatus>, String>,
) -> String {
    let mut out = String::new();
    match &lease {
        Ok(Some(l)) => {
            let expiry = match (l.key.starts_with("node/"), l.ttl_seconds) {
                (true, _) => "the node's podCIDR (no expiry)".to_owned(),
                (false, Some(t)) => format!("expires in {t} s"),
                (false, None) => "reservation (no expiry)".to_owned(),
            };
            let _ = writeln!(out, "lease:     {} ({}), {expiry}", l.subnet, l.key);
        }
        Ok(None) => {
            let _ = writeln!(out, "lease:     none in etcd for this node");
        }
        Err(e) => {
            let _ = writeln!(out, "lease:     unknown ({e})");
        }
    }
    let Some(st) = state else {
        let _ = writeln!(
            out,
            "datapath:  no pinned eBPF state under {} (kernel datapath, or the agent never ran with eBPF here)",
            layout.root().display()
        );
        return out;
    };
    let n = &st.node;
    let _ = writeln!(
        out,
        "datapath:  ebpf (pins in {}), VNI {} port {}, local {} (ifindex {}), flannel ifindex {}, VTEP MAC {}",
        layout.root().display(),
        n.vni,
        n.port,
        Ipv4Addr::from(n.local_ip),
        n.underlay_ifindex,
        n.vxlan_ifindex,
        MacAddr(n.vtep_mac)
    );
    if let Some((n6, peers)) = &st.node6 {
        let _ = writeln!(
            out,
            "ipv6:      local {}, flannel-v6 ifindex {}, VTEP MAC {}, {peers} peers' IPv6 subnets",
            std::net::Ipv6Addr::from(n6.local_ip),
            n6.vxlan_ifindex,
            MacAddr(n6.vtep_mac)
        );
    }
    if st.layout != PinnedLayout::Version(MAP_LAYOUT_VERSION) {
        let _ = writeln!(
            out,
            "maps:      {}, read as this build's layout version {MAP_LAYOUT_VERSION} (an agent \
             of this build replaces them when it starts)",
            st.layout
        );
    }
    for (program, link) in &st.links {
        let attached = if link.ifindex == 0 {
            "DETACHED (device gone)".to_owned()
        } else {
            format!("ifindex {}", link.ifindex)
        };
        let _ = writeln!(
            out,
            "program:   {program:<18} prog id {:<6} link id {:<6} {attached}",
            link.prog_id, link.id
        );
    }
    let _ = writeln!(out, "\npeers ({}):", st.peers.len());
    let _ = writeln!(
        out,
        "  {:<18} {:<17} {:<15} {:>12} {:>14} {:>12} {:>14}",
        "subnet", "vtep mac", "public ip", "tx packets", "tx bytes", "rx packets", "rx bytes"
    );
    for p in &st.peers {
        let t = st.traffic.get(&p.public_ip);
        let (tp, tb, rp, rb) = t.map_or((0, 0, 0, 0), |t| {
            (t.tx.packets, t.tx.bytes, t.rx.packets, t.rx.bytes)
        });
        let _ = writeln!(
            out,
            "  {:<18} {:<17} {:<15} {tp:>12} {tb:>14} {rp:>12} {rb:>14}",
            p.subnet.to_string(),
            p.vtep_mac.to_string(),
            p.public_ip.to_string()
        );
    }
    let _ = writeln!(out, "\ncounters by reason (packets / bytes):");
    for (reason, c) in st.counters.iter() {
        let _ = writeln!(
            out,
            "  {:<22} {:>12} {:>16}",
            reason.name(),
            c.packets,
            c.bytes
        );
    }
    out
}

/// The host firewall's part of the known-VTEP check (nft table `inet
/// overlay-vtep`, both datapaths): its drop counters, for `status`.
pub fn render_guard(guard: Result<Option<GuardCounters>, String>) -> String {
    let table = format!("nft table {} {}", vtep_guard::FAMILY, vtep_guard::TABLE);
    match guard {
        Ok(Some(c)) => format!(
            "\nhost firewall ({table}): drop_unknown_vtep {} packets, drop_spoofed_source {} packets\n",
            c.unknown_vtep, c.spoofed_source
        ),
        Ok(None) => format!("\nhost firewall: no {table} (no agent has set it up here)\n"),
        Err(e) => format!("\nhost firewall ({table}): unknown ({e})\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_line_names_its_table_and_counters() {
        let c = GuardCounters {
            unknown_vtep: 7,
            spoofed_source: 2,
        };
        assert_eq!(
            render_guard(Ok(Some(c))),
            "\nhost firewall (nft table inet overlay-vtep): drop_unknown_vtep 7 packets, drop_spoofed_source 2 packets\n"
        );
        assert!(render_guard(Ok(None)).contains("no nft table inet overlay-vtep"));
    }

    #[test]
    fn without_pins_says_so_and_still_shows_the_lease() {
        let layout = PinLayout::new("/sys/fs/bpf/nowhere");
        let text = render(
            &layout,
            None,
            Ok(Some(LeaseStatus {
                key: "/coreos.com/network/subnets/10.5.52.0-24".into(),
                subnet: "10.5.52.0/24".into(),
                ttl_seconds: Some(86_000),
            })),
        );
        assert!(text.starts_with(
            "lease:     10.5.52.0/24 (/coreos.com/network/subnets/10.5.52.0-24), expires in 86000 s\n"
        ));
        assert!(text.contains("no pinned eBPF state under /sys/fs/bpf/nowhere"));
        let text = render(&layout, None, Err("etcd unreachable".into()));
        assert!(text.contains("lease:     unknown (etcd unreachable)"));
    }
}
