//! The daemon's first three stages, each a type that only the stage before
//! can produce: [`Configured`] (etcd answers, the network config is valid,
//! the interface is chosen; nothing on the host is touched), [`Leased`] (our
//! subnet is ours in etcd), [`Programmed`] (the datapath carries our
//! subnet, subnet.env is written, the firewall rules are kept). A stage that
//! fails after the host or etcd were touched undoes what this run did.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result, anyhow};

use super::{
    datapath_start::start_datapath,
    retry::retry_etcd,
    rules::{fast_path_rules, first_rules, flanneld_rules, random_fully},
};
use crate::{
    alloc::Choice,
    cli::Cli,
    config::NetworkConfig,
    datapath::{AnyDatapath, NodeSpec, NodeState},
    etcd::{
        EtcdError, Registry,
        own::{self, LeaseTiming, NodeIdentity, OwnLease, Renewal},
    },
    health::{Health, Phase},
    iface::{self, ExternalInterface},
    ipmasq::RuleKeeper,
    mac::MacAddr,
    netlink::{Netlink, vxlan_device},
    subnet_env::{self, SubnetEnv},
};

/// Stage 1: etcd answers, the network config is valid and what the host
/// needs was checked. Nothing on the host is touched yet.
pub struct Configured {
    pub reg: Registry,
    pub config: NetworkConfig,
    pub nl: Netlink,
    pub ext: ExternalInterface,
}

/// Stage 2: our subnet lease is in etcd.
pub struct Leased {
    pub configured: Configured,
    pub node: NodeIdentity,
    pub lease: OwnLease,
    pub timing: LeaseTiming,
}

/// Stage 3: the datapath carries our subnet, subnet.env says so, and the
/// firewall rules are kept (by the thread `rules` owns).
pub struct Programmed {
    pub leased: Leased,
    pub dp: AnyDatapath,
    pub state: NodeState,
    pub rules: RuleKeeper,
}

pub async fn configure(cli: &Cli, health: &Health) -> Result<Configured> {
    let opts = cli.etcd_options();
    let reg = retry_etcd("connecting to etcd", || Registry::connect(&opts)).await?;
    let config = wait_config(&reg, health).await?;
    log::info!(
        "network config: Network {} SubnetLen {} [{} .. {}], VXLAN VNI {} port {} MTU {}",
        config.network,
        config.subnet_len,
        config.subnet_min,
        config.subnet_max,
        config.backend.vni,
        config.backend.dst_port(),
        config
            .backend
            .mtu
            .map_or("from the interface".to_owned(), |m| m.to_string())
    );
    if config.backend.gbp || config.backend.learning {
        log::warn!(
            "Backend GBP/Learning are read but not applied by this version \
             (GBP {}, Learning {})",
            config.backend.gbp,
            config.backend.learning
        );
    }

    let nl = Netlink::connect().context("opening a netlink socket")?;
    let ext = iface::find(&nl, &cli.iface_selector())
        .await
        .context("choosing the external interface")?;
    log::info!(
        "using interface {} ({}), PublicIP {}, MTU {}",
        ext.name,
        ext.ip,
        ext.public_ip,
        ext.mtu
    );

    // Everything the host will need, checked before a lease is taken: a
    // lease we cannot use would sit in etcd for its whole TTL.
    vxlan_device::device_mtu(config.backend.mtu, ext.mtu)
        .map_err(|e| anyhow!("the network config's Backend.MTU: {}", e.reason()))?;
    subnet_env::check_writable(&cli.subnet_file).with_context(|| {
        format!(
            "--subnet-file {}: cannot write there",
            cli.subnet_file.display()
        )
    })?;
    Ok(Configured {
        reg,
        config,
        nl,
        ext,
    })
}

/// Waits for a valid network config. A malformed one is reported once per
/// value (naming the key and field, and on `/readyz`) and read again every
/// few seconds, as flanneld retries its config: under a supervisor a typo
/// must not become a crash loop, and nothing on the host is touched
/// meanwhile. Problems of credentials or certificates still stop the agent.
async fn wait_config(reg: &Registry, health: &Health) -> Result<NetworkConfig> {
    const RECHECK: Duration = Duration::from_secs(3);
    let mut reported: Option<String> = None;
    loop {
        // A config that parses may still ask for what the kernel refuses.
        let checked = reg.wait_config(Duration::from_secs(1)).await.map(|config| {
            let vni = config.backend.vni;
            match vxlan_device::checked_device_name(vni) {
                Ok(_) => Ok(config),
                Err(e) => Err(format!(
                    "network config {}: Backend.VNI {vni}: {}",
                    reg.config_key(),
                    e.reason()
                )),
            }
        });
        let problem = match checked {
            Ok(Ok(config)) => {
                if reported.is_some() {
                    log::info!("the network config is valid now");
                }
                health.lock().config_problem = None;
                return Ok(config);
            }
            Ok(Err(unusable)) => unusable,
            Err(e @ EtcdError::Config { .. }) => e.to_string(),
            Err(e) => return Err(anyhow!(e)),
        };
        if reported.as_deref() != Some(problem.as_str()) {
            log::error!(
                "{problem}; nothing on this host was changed; reading it again every {RECHECK:?} until it is fixed"
            );
            health.lock().config_problem = Some(problem.clone());
            reported = Some(problem);
        }
        tokio::time::sleep(RECHECK).await;
    }
}

pub async fn take_lease(cli: &Cli, health: &Health, configured: Configured) -> Result<Leased> {
    health.set_phase(Phase::AcquiringLease);
    let Configured {
        reg, config, ext, ..
    } = &configured;
    let timing = cli.lease_timing();
    let previous = subnet_env::read_previous_subnet(&cli.subnet_file).filter(|p| {
        let fits = config.fits(*p);
        if !fits {
            log::warn!(
                "{} names the subnet {p}, which does not fit the network config (Network {}, SubnetLen {}, {} .. {}): ignored",
                cli.subnet_file.display(),
                config.network,
                config.subnet_len,
                config.subnet_min,
                config.subnet_max
            );
        }
        fits
    });
    let node = NodeIdentity {
        public_ip: ext.public_ip,
        vni: config.backend.vni,
        vtep_mac: MacAddr::stable_for(ext.public_ip, config.backend.vni),
    };
    let lease = retry_etcd("acquiring a subnet lease", || {
        own::acquire(reg, config, &node, previous, &timing)
    })
    .await?;
    Ok(Leased {
        configured,
        node,
        lease,
        timing,
    })
}

/// Programs the datapath for our lease. If that fails, the lease taken in
/// this run is released and a `flannel.<VNI>` this run created is removed.
pub async fn program(cli: &Cli, health: &Health, mut leased: Leased) -> Result<Programmed> {
    health.set_phase(Phase::ProgrammingDatapath);
    let Configured {
        reg,
        config,
        nl,
        ext,
    } = &leased.configured;
    let spec = node_spec(config, ext, &leased.lease);
    let device_name = vxlan_device::device_name(config.backend.vni);
    let device_existed = !matches!(nl.link_by_name(&device_name).await, Ok(None));
    let started = async {
        let (dp, state) = start_datapath(cli, &spec).await?;
        let lease = &mut leased.lease;
        if state.vtep_mac != lease.vtep_mac {
            log::info!(
                "{} has MAC {}; publishing it in lease {}",
                state.device,
                state.vtep_mac,
                lease.subnet
            );
            let mac = state.vtep_mac;
            let (renewal, updated) = retry_etcd("publishing the VTEP MAC", || {
                let mut lease = lease.clone();
                async move {
                    let r = own::update_mac(reg, &mut lease, mac).await?;
                    Ok::<_, EtcdError>((r, lease))
                }
            })
            .await?;
            *lease = updated;
            if let Renewal::Lost(why) = renewal {
                log::warn!("could not publish the MAC yet: {why}");
            }
        }
        write_subnet_env(&cli.subnet_file, config, lease, state.mtu, cli.ip_masq)?;
        anyhow::Ok((dp, state))
    }
    .await;
    let (dp, state) = match started {
        Ok(ok) => ok,
        Err(e) => {
            release_new_lease(reg, &leased.lease).await;
            // A device this run created serves nobody once we exit.
            if !device_existed {
                match nl.delete_link_by_name(&device_name).await {
                    Ok(true) => log::info!("removed {device_name}, created in this run"),
                    Ok(false) => {}
                    Err(e) => log::warn!("removing {device_name}: {e}"),
                }
            }
            return Err(e);
        }
    };
    let random_fully = random_fully(cli, config).await;
    let mut wanted = flanneld_rules(cli, config, leased.lease.subnet, random_fully);
    wanted.iptables.extend(fast_path_rules(&dp));
    let rules = RuleKeeper::start(Duration::from_secs(cli.iptables_resync))
        .context("starting the iptables thread")?;
    first_rules(rules.keep(wanted)).await;
    Ok(Programmed {
        leased,
        dp,
        state,
        rules,
    })
}

fn node_spec(config: &NetworkConfig, ext: &ExternalInterface, lease: &OwnLease) -> NodeSpec {
    NodeSpec {
        vni: config.backend.vni,
        port: config.backend.dst_port(),
        // As flanneld: --public-ip goes into the lease only; the device's
        // local address (and so the source of what we send) is the
        // interface's, which is what a NAT in front of the node translates.
        public_ip: ext.public_ip,
        local_ip: ext.ip,
        underlay: ext.name.clone(),
        subnet: lease.subnet,
        mtu: config.backend.mtu,
        vtep_mac: Some(lease.vtep_mac),
        direct_routing: config.backend.direct_routing,
    }
}

/// A start that failed after taking a lease: a lease created in this run
/// is deleted (no one uses it, and it would sit in etcd for its TTL); one
/// we held before (`Reuse`) stays ours, as flanneld keeps it.
async fn release_new_lease(reg: &Registry, lease: &OwnLease) {
    if matches!(lease.choice, Choice::Reuse { .. }) {
        return;
    }
    match reg
        .delete_if_unchanged(lease.subnet, lease.mod_revision)
        .await
    {
        Ok(true) => log::info!("released lease {} taken in this run", lease.subnet),
        Ok(false) => log::warn!("lease {} changed meanwhile: left as it is", lease.subnet),
        Err(e) => log::warn!("releasing lease {}: {e}", lease.subnet),
    }
}

fn write_subnet_env(
    path: &Path,
    config: &NetworkConfig,
    lease: &OwnLease,
    mtu: u32,
    ip_masq: bool,
) -> Result<()> {
    SubnetEnv {
        network: config.network,
        subnet: lease.subnet,
        mtu,
        ip_masq,
    }
    .write(path)
    .with_context(|| format!("writing {}", path.display()))?;
    log::info!("wrote {}", path.display());
    Ok(())
}
