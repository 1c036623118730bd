//! `overlay-agent status`: the pinned state, our lease, and the leases in
//! etcd we refuse to program.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};

use super::{briefly, connect_briefly};
use crate::{
    cli::Cli,
    datapath::pins::PinLayout,
    iface,
    inspect::{self, LeaseStatus, PinnedState},
    lease, lease_check,
    netlink::Netlink,
};

pub async fn status(cli: &Cli) -> Result<()> {
    let layout = PinLayout::chosen(cli.bpf_pin_dir.as_deref());
    let state = inspect::read(&layout).context("reading the pinned maps")?;
    let public_ip = node_public_ip(cli, state.as_ref()).await;
    let lease = async {
        let reg = connect_briefly(cli).await?;
        let Some(ip) = public_ip else {
            return Err("cannot tell this node's public IP".to_owned());
        };
        let snapshot = briefly(reg.list()).await?;
        for entry in snapshot.entries {
            let Ok(l) = lease::decode(&entry.key, &entry.value) else {
                continue;
            };
            if l.public_ip != ip {
                continue;
            }
            let ttl_seconds = if entry.lease_id == 0 {
                None
            } else {
                let mut client = reg.client();
                let ttl = briefly(client.lease_time_to_live(entry.lease_id, None)).await?;
                Some(ttl.ttl())
            };
            return Ok(Some(LeaseStatus {
                key: entry.key,
                subnet: l.subnet.to_string(),
                ttl_seconds,
            }));
        }
        Ok(None)
    }
    .await;
    print!("{}", inspect::render(&layout, state.as_ref(), lease));
    match rejected_leases(cli, public_ip).await {
        Ok(rejected) if rejected.is_empty() => {}
        Ok(rejected) => {
            println!("rejected leases (in etcd, not programmed):");
            for line in rejected {
                println!("  {line}");
            }
        }
        Err(e) => println!("rejected leases: unknown ({e})"),
    }
    Ok(())
}

/// The node's public IP: `--public-ip`, else the pinned NODE_CONFIG's local
/// address (the interface address, which is the public IP without
/// `--public-ip`), else the interface flags'.
async fn node_public_ip(cli: &Cli, state: Option<&PinnedState>) -> Option<Ipv4Addr> {
    if let Some(ip) = cli.public_ip {
        return Some(ip);
    }
    if let Some(st) = state {
        return Some(Ipv4Addr::from(st.node.local_ip));
    }
    let nl = Netlink::connect().ok()?;
    iface::find(&nl, &cli.iface_selector())
        .await
        .ok()
        .map(|e| e.public_ip)
}

/// The other nodes' leases in etcd that fail `lease_check`, one line each.
async fn rejected_leases(
    cli: &Cli,
    own_public_ip: Option<Ipv4Addr>,
) -> Result<Vec<String>, String> {
    let reg = connect_briefly(cli).await?;
    let config = briefly(reg.get_config())
        .await?
        .ok_or("no network config in etcd")?;
    let snapshot = briefly(reg.list()).await?;
    let mut out = Vec::new();
    for entry in snapshot.entries {
        let Ok(l) = lease::decode(&entry.key, &entry.value) else {
            continue;
        };
        let lease::Backend::Vxlan { vni, vtep_mac } = l.backend else {
            continue;
        };
        if Some(l.public_ip) == own_public_ip {
            continue;
        }
        let trust = lease_check::Trust {
            network: config.network,
            subnet_len: config.subnet_len,
            own_public_ip: own_public_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            vni: config.backend.vni,
        };
        if let Err(why) = lease_check::check(&trust, l.subnet, l.public_ip, vtep_mac, vni) {
            out.push(format!("{}: {why} ({})", entry.key, why.label()));
        }
    }
    Ok(out)
}
