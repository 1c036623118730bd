//! `overlay-agent status`: the pinned state, our lease, and the leases in
//! etcd (or the Nodes, with `--kube-subnet-mgr`) we refuse to program.

use crate::printable::printable;
use std::net::Ipv4Addr;

use anyhow::{Context, Result};

use super::{briefly, connect_briefly};
use crate::{
    cli::Cli,
    datapath::pins::PinLayout,
    flannel::{config::NetworkConfig, lease},
    iface,
    inspect::{self, LeaseStatus, PinnedState},
    netlink::Netlink,
    subnet::{
        Claim,
        kube::{KubeManager, node_lease},
        lease_check,
    },
};

pub async fn status(cli: &Cli) -> Result<()> {
    let layout = PinLayout::chosen(cli.bpf_pin_dir.as_deref());
    let state = inspect::read(&layout).context("reading the pinned maps")?;
    let public_ip = node_public_ip(cli, state.as_ref()).await;
    if cli.kube_subnet_mgr {
        let lease = kube_lease(cli).await;
        print!("{}", inspect::render(&layout, state.as_ref(), lease));
        print!("{}", guard_report().await);
        match kube_rejected(cli).await {
            Ok(rejected) if rejected.is_empty() => {}
            Ok(rejected) => {
                println!("rejected leases (Nodes, not programmed):");
                for line in rejected {
                    println!("  {line}");
                }
            }
            Err(e) => println!("rejected leases: unknown ({e})"),
        }
        return Ok(());
    }
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
                // Both families of a dual-stack lease.
                subnet: lease::LeaseSubnets {
                    v4: l.subnet,
                    v6: l.ipv6_subnet,
                }
                .to_string(),
                ttl_seconds,
            }));
        }
        Ok(None)
    }
    .await;
    print!("{}", inspect::render(&layout, state.as_ref(), lease));
    print!("{}", guard_report().await);
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
            out.push(format!(
                "{}: {why} ({})",
                printable(&entry.key),
                why.label()
            ));
        }
    }
    Ok(out)
}

/// Our Node's podCIDR, as the API server holds it.
async fn kube_lease(cli: &Cli) -> Result<Option<LeaseStatus>, String> {
    let mgr = briefly(KubeManager::connect(&cli.kube_options())).await?;
    let node = briefly(mgr.node()).await?;
    let subnet = node_lease::ipv4_pod_cidr(&node).map_err(|e| e.to_string())?;
    // Dual stack: the IPv6 podCIDR too, when the network config enables it.
    let dual = std::fs::read(&cli.kube_options().net_config_path)
        .ok()
        .and_then(|t| NetworkConfig::parse_kube(&t).ok())
        .is_some_and(|c| c.ipv6.is_some());
    let v6 = dual
        .then(|| node_lease::ipv6_pod_cidr(&node).ok())
        .flatten();
    Ok(Some(LeaseStatus {
        key: node_lease::key(&mgr.node_name),
        subnet: lease::LeaseSubnets { v4: subnet, v6 }.to_string(),
        ttl_seconds: None,
    }))
}

/// The other Nodes that claim a lease the agent refuses: malformed
/// annotations or podCIDRs, or leases failing `lease_check`.
async fn kube_rejected(cli: &Cli) -> Result<Vec<String>, String> {
    let opts = cli.kube_options();
    let text = std::fs::read(&opts.net_config_path)
        .map_err(|e| format!("--net-config-path {}: {e}", opts.net_config_path.display()))?;
    let config = NetworkConfig::parse_kube(&text).map_err(|e| e.to_string())?;
    let mgr = briefly(KubeManager::connect(&opts)).await?;
    let own = briefly(mgr.node()).await?;
    let own_subnet = node_lease::ipv4_pod_cidr(&own).map_err(|e| e.to_string())?;
    let own_ip = own
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(&mgr.names.public_ip))
        .and_then(|ip| ip.parse().ok())
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(mgr.client());
    let list = briefly(nodes.list(&Default::default())).await?;
    let trust = lease_check::Trust {
        network: config.network,
        subnet_len: own_subnet.prefix_len(),
        own_public_ip: own_ip,
        vni: config.backend.vni,
    };
    // Dual stack: the IPv6 half checked as the agent checks it.
    let trust6 = config.ipv6.map(|range| lease_check::Trust6 {
        network: range.network,
        subnet_len: node_lease::ipv6_pod_cidr(&own).map_or(64, |s| s.prefix_len()),
        own_public_ip: own
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(&mgr.names.public_ipv6))
            .and_then(|ip| ip.parse().ok())
            .unwrap_or(std::net::Ipv6Addr::UNSPECIFIED),
    });
    let mut out = Vec::new();
    for node in &list.items {
        if node.metadata.name.as_deref() == Some(mgr.node_name.as_str()) {
            continue;
        }
        let rec = node_lease::record(node, &mgr.names, config.ipv6.is_some());
        match rec.claim {
            Claim::Malformed(e) => out.push(format!(
                "{}: malformed: {}",
                printable(&rec.key),
                printable(&e.reason)
            )),
            Claim::Lease(l) => {
                if let lease::Backend::Vxlan { vni, vtep_mac } = l.backend {
                    let v6 = trust6.zip(l.peer6());
                    if let Err(why) =
                        lease_check::check(&trust, l.subnet, l.public_ip, vtep_mac, vni)
                            .and_then(|()| v6.map_or(Ok(()), |(t, p)| lease_check::check6(&t, &p)))
                    {
                        out.push(format!("{}: {why} ({})", printable(&rec.key), why.label()));
                    }
                }
            }
            Claim::None => {}
        }
    }
    Ok(out)
}

/// The host firewall's drop counters (one `nft` run, off the runtime).
async fn guard_report() -> String {
    let guard = tokio::task::spawn_blocking(crate::datapath::vtep_guard::counters)
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    inspect::render_guard(guard)
}
