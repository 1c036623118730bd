//! `overlay-agent cleanup`: removes everything the agent created on this
//! host, which stopping it deliberately does not (as flanneld leaves its
//! routes): the pinned links (detaching the programs) and maps, the
//! `flannel.<VNI>` device (its address, routes, neighbour and FDB entries go
//! with it) and the masquerading and forwarding rules. The lease in etcd and
//! subnet.env stay, so the node keeps its subnet if the agent comes back.

use crate::{
    datapath::{ebpf::read_node_config, pins::PinLayout},
    inspect, ipmasq,
    netlink::{Netlink, NetlinkError},
};

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
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
}

/// Which `flannel.<VNI>` to delete: the VNI the pinned NODE_CONFIG names,
/// else `vni` (from the network config), else every `flannel.<number>`.
pub fn devices_to_delete(
    pinned_vni: Option<u32>,
    vni: Option<u32>,
    names: &[String],
) -> Vec<String> {
    match pinned_vni.or(vni) {
        Some(v) => vec![format!("flannel.{v}")],
        None => names
            .iter()
            .filter(|n| {
                n.strip_prefix("flannel.")
                    .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            })
            .cloned()
            .collect(),
    }
}

/// Removes it all; returns one line per thing removed. Must run in a tokio
/// runtime, in the node's network namespace.
pub async fn run(pins: &PinLayout, vni: Option<u32>) -> Result<Vec<String>, CleanupError> {
    let mut removed = Vec::new();
    let pinned_vni = inspect::open(pins, overlay_common::consts::MAP_NODE_CONFIG)
        .ok()
        .and_then(|m| read_node_config(&m).ok())
        .filter(|c| c.configured != 0)
        .map(|c| c.vni);
    for p in pins.remove_all().map_err(|source| CleanupError::Pins {
        dir: pins.root().display().to_string(),
        source,
    })? {
        removed.push(format!("pin {}", p.display()));
    }
    let nl = Netlink::connect().map_err(CleanupError::Connect)?;
    let names: Vec<String> = nl.links().await?.into_iter().map(|l| l.name).collect();
    for name in devices_to_delete(pinned_vni, vni, &names) {
        if nl.delete_link_by_name(&name).await? {
            removed.push(format!(
                "device {name} (with its routes, neighbour and FDB entries)"
            ));
        }
    }
    removed.extend(ipmasq::remove_all()?);
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vni_decides_which_device_goes() {
        let names: Vec<String> = [
            "lo",
            "eth0",
            "flannel.1",
            "flannel.42",
            "flannel.x",
            "flannel.",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(devices_to_delete(Some(7), Some(1), &names), ["flannel.7"]);
        assert_eq!(devices_to_delete(None, Some(1), &names), ["flannel.1"]);
        assert_eq!(
            devices_to_delete(None, None, &names),
            ["flannel.1", "flannel.42"]
        );
    }
}
