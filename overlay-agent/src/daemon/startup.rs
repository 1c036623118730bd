//! The daemon's first three stages, each a type that only the stage before
//! can produce: [`Configured`] (the subnet manager answers, the network
//! config is valid, the interface is chosen; nothing on the host is
//! touched), [`Leased`] (our subnet is ours: an etcd lease, or our Node's
//! podCIDR), [`Programmed`] (the datapath carries our subnet, what we
//! publish is published, subnet.env is written, the firewall rules are
//! kept). A stage that fails after the host or etcd were touched undoes
//! what this run did.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use ipnet::{Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::Node;

use super::{
    datapath_start::start_datapath,
    retry::retry,
    rules::{fast_path_rules, first_rules, flanneld_rules, random_fully},
};
use crate::{
    cli::Cli,
    datapath::{AnyDatapath, NodeSpec, NodeSpec6, NodeState},
    flannel::config::NetworkConfig,
    flannel::mac::MacAddr,
    flannel::subnet_env::{self, SubnetEnv},
    health::{Health, Phase},
    iface::{self, ExternalInterface},
    ipmasq::RuleKeeper,
    netlink::{Netlink, vxlan_device},
    subnet::alloc::{Choice, Previous},
    subnet::etcd::{
        EtcdError, Registry,
        own::{self, LeaseTiming, NodeIdentity, NodeIpv6, OwnLease, Renewal},
    },
    subnet::kube::{
        KubeManager,
        annotations::{self, stored_mac, stored_mac_v6},
        node_lease::{ipv4_pod_cidr, ipv6_pod_cidr},
    },
};

/// Where this node's lease and its peers' come from.
#[expect(
    clippy::large_enum_variant,
    reason = "made once per run and moved along the stages, never copied in a loop"
)]
pub enum Source {
    /// flanneld's default: leases and config in etcd.
    Etcd(Registry),
    /// `--kube-subnet-mgr`: our Node as read at start (its podCIDR, what it
    /// published before), the config from `--net-config-path`.
    Kube { mgr: KubeManager, node: Box<Node> },
}

/// Stage 1: the subnet manager answers, the network config is valid and
/// what the host needs was checked. Nothing on the host is touched yet.
pub struct Configured {
    pub source: Source,
    pub config: NetworkConfig,
    pub nl: Netlink,
    pub ext: ExternalInterface,
}

/// Our lease, as the subnet manager holds it.
// One per agent, moved rarely: boxing the etcd variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Held {
    Etcd {
        node: NodeIdentity,
        lease: OwnLease,
        timing: LeaseTiming,
    },
    /// Our Node's podCIDR; nothing to renew.
    Kube {
        subnet: Ipv4Net,
        public_ip: Ipv4Addr,
        vtep_mac: MacAddr,
        /// Dual stack: our Node's IPv6 podCIDR and what we publish for it.
        ipv6: Option<KubeIpv6>,
    },
}

/// The IPv6 side of our lease in Kubernetes mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KubeIpv6 {
    pub subnet: Ipv6Net,
    pub public_ip: Ipv6Addr,
    pub vtep_mac: MacAddr,
}

impl Held {
    pub fn subnet(&self) -> Ipv4Net {
        match self {
            Held::Etcd { lease, .. } => lease.subnet,
            Held::Kube { subnet, .. } => *subnet,
        }
    }

    pub fn public_ip(&self) -> Ipv4Addr {
        match self {
            Held::Etcd { lease, .. } => lease.public_ip,
            Held::Kube { public_ip, .. } => *public_ip,
        }
    }

    /// The VTEP MAC we publish.
    pub fn vtep_mac(&self) -> MacAddr {
        match self {
            Held::Etcd { lease, .. } => lease.vtep_mac,
            Held::Kube { vtep_mac, .. } => *vtep_mac,
        }
    }

    /// Our IPv6 subnet, for dual stack.
    pub fn ipv6_subnet(&self) -> Option<Ipv6Net> {
        match self {
            Held::Etcd { lease, .. } => lease.ipv6.and(lease.ipv6_subnet),
            Held::Kube { ipv6, .. } => ipv6.map(|v6| v6.subnet),
        }
    }

    /// Our PublicIPv6, for dual stack.
    pub fn public_ipv6(&self) -> Option<Ipv6Addr> {
        match self {
            Held::Etcd { lease, .. } => lease.ipv6_subnet.and(lease.ipv6).map(|v6| v6.public_ip),
            Held::Kube { ipv6, .. } => ipv6.map(|v6| v6.public_ip),
        }
    }

    /// The etcd lease, in etcd mode.
    pub fn etcd_lease(&self) -> Option<&OwnLease> {
        match self {
            Held::Etcd { lease, .. } => Some(lease),
            Held::Kube { .. } => None,
        }
    }
}

/// Stage 2: our subnet is ours.
pub struct Leased {
    pub configured: Configured,
    pub held: Held,
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
    let mut selector = cli.iface_selector();
    let (source, config) = if cli.kube_subnet_mgr {
        let opts = cli.kube_options();
        let mgr = retry("connecting to the Kubernetes API", || {
            KubeManager::connect(&opts)
        })
        .await?;
        log::info!("Kubernetes subnet manager: node {:?}", mgr.node_name);
        let config = wait_config_file(&opts.net_config_path, health).await?;
        let node = wait_node(&mgr).await?;
        // flanneld's GetStoredPublicIP: the operator's node-public-ip wins
        // over --public-ip, before the interface is chosen.
        if let Some(ip) = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(&mgr.names.node_public_ip))
            .filter(|v| !v.is_empty())
        {
            let ip: Ipv4Addr = ip.parse().with_context(|| {
                format!(
                    "node {}: annotation {} {ip:?} is not an IPv4 address",
                    mgr.node_name, mgr.names.node_public_ip
                )
            })?;
            log::info!(
                "using public IP {ip} from node annotation {}",
                mgr.names.node_public_ip
            );
            selector.public_ip = Some(ip);
        }
        // And node-public-ipv6 over --public-ipv6, for dual stack.
        if config.ipv6.is_some()
            && let Some(ip) = node
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(&mgr.names.node_public_ipv6))
                .filter(|v| !v.is_empty())
        {
            let ip: Ipv6Addr = ip.parse().with_context(|| {
                format!(
                    "node {}: annotation {} {ip:?} is not an IPv6 address",
                    mgr.node_name, mgr.names.node_public_ipv6
                )
            })?;
            log::info!(
                "using public IPv6 {ip} from node annotation {}",
                mgr.names.node_public_ipv6
            );
            selector.public_ipv6 = Some(ip);
        }
        (
            Source::Kube {
                mgr,
                node: Box::new(node),
            },
            config,
        )
    } else {
        let opts = cli.etcd_options();
        if let Some(warning) = opts.cleartext_credentials_warning() {
            log::warn!("{warning}");
        }
        let reg = retry("connecting to etcd", || Registry::connect(&opts)).await?;
        let config = wait_config(&reg, health).await?;
        (Source::Etcd(reg), config)
    };
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

    if config.ipv6.is_none()
        && let Some(ip) = selector.public_ipv6.take()
    {
        log::warn!(
            "--public-ipv6 {ip} has no effect here: the network config does not enable IPv6 \
             (EnableIPv6)"
        );
    }
    let nl = Netlink::connect().context("opening a netlink socket")?;
    let ext = iface::find(&nl, &selector)
        .await
        .context("choosing the external interface")?;
    if config.ipv6.is_some() && ext.public_ipv6.is_none() {
        bail!(
            "the network config enables IPv6 but interface {} has no global IPv6 address: \
             give it one, or --public-ipv6",
            ext.name
        );
    }
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
        source,
        config,
        nl,
        ext,
    })
}

/// Our Node, waited for while it does not exist yet (kubelet registers it;
/// a DaemonSet pod may start first). Other failures are retried as well.
async fn wait_node(mgr: &KubeManager) -> Result<Node> {
    let mut said = false;
    loop {
        match retry("reading our Node", || mgr.node()).await {
            Ok(n) => return Ok(n),
            Err(e)
                if e.downcast_ref::<crate::subnet::kube::KubeError>()
                    .is_some_and(|k| k.is_not_found()) =>
            {
                if !said {
                    log::warn!(
                        "node {:?} does not exist yet; waiting for it",
                        mgr.node_name
                    );
                    said = true;
                }
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The network config from `--net-config-path`. A missing or malformed file
/// is reported once per problem (on `/readyz` too) and read again every few
/// seconds without touching the host: a ConfigMap fixed meanwhile is picked
/// up (flanneld exits instead, and its pod restarts until it is fixed).
async fn wait_config_file(path: &Path, health: &Health) -> Result<NetworkConfig> {
    const RECHECK: Duration = Duration::from_secs(3);
    let mut reported: Option<String> = None;
    loop {
        let problem = match std::fs::read(path) {
            Err(e) => format!("--net-config-path {}: {e}", path.display()),
            Ok(text) => match NetworkConfig::parse_kube(&text) {
                Err(e) => format!("--net-config-path {}: {e}", path.display()),
                Ok(config) => match vxlan_device::checked_device_name(config.backend.vni) {
                    Err(e) => format!(
                        "--net-config-path {}: Backend.VNI {}: {}",
                        path.display(),
                        config.backend.vni,
                        e.reason()
                    ),
                    Ok(_) => {
                        if reported.is_some() {
                            log::info!("the network config is valid now");
                        }
                        health.lock().config_problem = None;
                        return Ok(config);
                    }
                },
            },
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
    let held = match &configured.source {
        Source::Etcd(reg) => etcd_lease(cli, reg, &configured).await?,
        Source::Kube { mgr, node } => kube_lease(mgr, node, &configured)?,
    };
    Ok(Leased { configured, held })
}

/// Our podCIDR as our lease (flanneld's kube `AcquireLease`): it must be
/// assigned and inside the config's Network. Without it there is nothing
/// to do: the error names the node, and a DaemonSet restarts us.
fn kube_lease(mgr: &KubeManager, node: &Node, configured: &Configured) -> Result<Held> {
    let Configured { config, ext, .. } = configured;
    let subnet = ipv4_pod_cidr(node).map_err(|e| {
        anyhow!(
            "node {:?}: {e}: the node's pod CIDR must be assigned (kube-controller-manager --allocate-node-cidrs) before the overlay can start",
            mgr.node_name
        )
    })?;
    if !config.network.contains(&subnet) || subnet.prefix_len() < config.network.prefix_len() {
        bail!(
            "subnet {:?} specified in the flannel net config doesn't contain {:?} PodCIDR of the {:?} node",
            config.network.to_string(),
            subnet.to_string(),
            mgr.node_name
        );
    }
    let empty = Default::default();
    let annotations = node.metadata.annotations.as_ref().unwrap_or(&empty);
    // The MAC our Node published before, so peers keep their entries for
    // us across restarts and a re-created device.
    let vtep_mac = stored_mac(annotations, &mgr.names)
        .unwrap_or_else(|| MacAddr::stable_for(ext.public_ip, config.backend.vni));
    // Dual stack: the IPv6 podCIDR must be assigned too and lie inside
    // IPv6Network (flanneld's AcquireLease; its vxlan backend fails later
    // with "IPv6 is enabled but the lease has no IPv6" where we stop here).
    let ipv6 = match (config.ipv6, ext.public_ipv6) {
        (None, _) => None,
        (Some(_), None) => bail!("the network config enables IPv6 but there is no public IPv6"),
        (Some(range), Some(public_ip)) => {
            let subnet = ipv6_pod_cidr(node).map_err(|e| {
                anyhow!(
                    "node {:?}: {e}: IPv6 is enabled (EnableIPv6) but the node has no IPv6 pod CIDR: \
                     assign one (kube-controller-manager --cluster-cidr with an IPv6 range) or disable IPv6",
                    mgr.node_name
                )
            })?;
            let net = range.network;
            if !net.contains(&subnet) || subnet.prefix_len() < net.prefix_len() {
                bail!(
                    "subnet {:?} specified in the flannel net config doesn't contain {:?} IPv6 PodCIDR of the {:?} node",
                    net.to_string(),
                    subnet.to_string(),
                    mgr.node_name
                );
            }
            let vtep_mac = stored_mac_v6(annotations, &mgr.names)
                .unwrap_or_else(|| MacAddr::stable_for_ipv6(public_ip, config.backend.vni));
            Some(KubeIpv6 {
                subnet,
                public_ip,
                vtep_mac,
            })
        }
    };
    match ipv6 {
        None => log::info!("lease: node {:?} podCIDR {subnet}", mgr.node_name),
        Some(v6) => log::info!(
            "lease: node {:?} podCIDRs {subnet} and {}",
            mgr.node_name,
            v6.subnet
        ),
    }
    Ok(Held::Kube {
        subnet,
        public_ip: ext.public_ip,
        vtep_mac,
        ipv6,
    })
}

async fn etcd_lease(cli: &Cli, reg: &Registry, configured: &Configured) -> Result<Held> {
    let Configured { config, ext, .. } = configured;
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
        ipv6: config.ipv6.and(ext.public_ipv6).map(|public_ip| NodeIpv6 {
            public_ip,
            vtep_mac: MacAddr::stable_for_ipv6(public_ip, config.backend.vni),
        }),
    };
    let previous = Previous {
        v4: previous,
        v6: config
            .ipv6
            .and_then(|_| subnet_env::read_previous_ipv6_subnet(&cli.subnet_file)),
    };
    let lease = retry("acquiring a subnet lease", || {
        own::acquire(reg, config, &node, previous, &timing)
    })
    .await?;
    Ok(Held::Etcd {
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
        source,
        config,
        nl,
        ext,
    } = &leased.configured;
    let spec = node_spec(config, ext, &leased.held);
    let device_name = vxlan_device::device_name(config.backend.vni);
    let device_existed = !matches!(nl.link_by_name(&device_name).await, Ok(None));
    let started = async {
        let (dp, state) = start_datapath(cli, &spec).await?;
        match (source, &mut leased.held) {
            (Source::Etcd(reg), Held::Etcd { lease, .. }) => {
                publish_etcd_mac(reg, lease, &state).await?;
            }
            (Source::Kube { mgr, node }, held @ Held::Kube { .. }) => {
                if let Held::Kube { vtep_mac, ipv6, .. } = held {
                    *vtep_mac = state.vtep_mac;
                    if let (Some(v6), Some((_, mac))) = (ipv6.as_mut(), &state.ipv6) {
                        v6.vtep_mac = *mac;
                    }
                }
                publish_annotations(mgr, node, config, held).await?;
            }
            _ => unreachable!("the lease comes from the configured source"),
        }
        write_subnet_env(
            &cli.subnet_file,
            config,
            leased.held.subnet(),
            leased.held.ipv6_subnet(),
            state.mtu,
            cli.ip_masq,
        )?;
        anyhow::Ok((dp, state))
    }
    .await;
    let (dp, state) = match started {
        Ok(ok) => ok,
        Err(e) => {
            if let (Source::Etcd(reg), Held::Etcd { lease, .. }) = (source, &leased.held) {
                release_new_lease(reg, lease).await;
            }
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
    // flanneld keys its IPv6 rules on IPv6Network (with our IPv6 subnet).
    let v6 = config
        .ipv6
        .map(|r| r.network)
        .zip(leased.held.ipv6_subnet());
    let mut wanted = flanneld_rules(cli, config, leased.held.subnet(), random_fully, v6);
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

/// The devices kept other MACs than the lease says (adopted): the lease
/// says the devices'.
async fn publish_etcd_mac(reg: &Registry, lease: &mut OwnLease, state: &NodeState) -> Result<()> {
    let mac = state.vtep_mac;
    let mac6 = state.ipv6.as_ref().map(|(_, m)| *m);
    if mac == lease.vtep_mac && mac6 == lease.ipv6.map(|v6| v6.vtep_mac) {
        return Ok(());
    }
    log::info!(
        "{} has MAC {mac}{}; publishing it in lease {}",
        state.device,
        state
            .ipv6
            .as_ref()
            .map_or(String::new(), |(d, m)| format!(", {d} {m}")),
        lease.subnets()
    );
    let (renewal, updated) = retry("publishing the VTEP MAC", || {
        let mut lease = lease.clone();
        async move {
            let r = own::update_mac(reg, &mut lease, mac, mac6).await?;
            Ok::<_, EtcdError>((r, lease))
        }
    })
    .await?;
    *lease = updated;
    if let Renewal::Lost(why) = renewal {
        log::warn!("could not publish the MAC yet: {why}");
    }
    Ok(())
}

/// Our Node's annotations say what flanneld's would (backend type and
/// data, public IP, subnet manager): written in one strategic-merge patch
/// of what differs, or not at all when nothing does.
async fn publish_annotations(
    mgr: &KubeManager,
    node: &Node,
    config: &NetworkConfig,
    held: &Held,
) -> Result<()> {
    let empty = Default::default();
    let current = node.metadata.annotations.as_ref().unwrap_or(&empty);
    let own = kube_own(config, held);
    if let Some(o) = current
        .get(&mgr.names.public_ip_overwrite)
        .filter(|o| !o.is_empty())
    {
        log::info!(
            "Overriding public ip with '{o}' from node annotation '{}'",
            mgr.names.public_ip_overwrite
        );
    }
    if own.ipv6.is_some()
        && let Some(o) = current
            .get(&mgr.names.public_ipv6_overwrite)
            .filter(|o| !o.is_empty())
    {
        log::info!(
            "Overriding public ipv6 with '{o}' from node annotation '{}'",
            mgr.names.public_ipv6_overwrite
        );
    }
    let changes = annotations::changes(current, &mgr.names, &own);
    if changes.is_empty() {
        log::info!(
            "node {:?} already publishes this node's lease: annotations left as they are",
            mgr.node_name
        );
        return Ok(());
    }
    retry("publishing our lease in the node's annotations", || {
        mgr.annotate(&changes)
    })
    .await?;
    let keys: Vec<&str> = changes.iter().map(|(k, _)| k.as_str()).collect();
    log::info!("node {:?}: wrote {}", mgr.node_name, keys.join(", "));
    Ok(())
}

/// What our Node publishes about us: the devices' MACs and our public
/// addresses, as our lease holds them.
pub fn kube_own(config: &NetworkConfig, held: &Held) -> annotations::Own {
    let ipv6 = match held {
        Held::Kube { ipv6, .. } => ipv6.map(|v6| annotations::Own6 {
            vtep_mac: v6.vtep_mac,
            public_ip: v6.public_ip,
        }),
        Held::Etcd { .. } => None,
    };
    annotations::Own {
        vni: config.backend.vni,
        vtep_mac: held.vtep_mac(),
        public_ip: held.public_ip(),
        ipv6,
    }
}

fn node_spec(config: &NetworkConfig, ext: &ExternalInterface, held: &Held) -> NodeSpec {
    NodeSpec {
        vni: config.backend.vni,
        port: config.backend.dst_port(),
        // As flanneld: --public-ip goes into the lease only; the device's
        // local address (and so the source of what we send) is the
        // interface's, which is what a NAT in front of the node translates.
        public_ip: ext.public_ip,
        local_ip: ext.ip,
        underlay: ext.name.clone(),
        subnet: held.subnet(),
        mtu: config.backend.mtu,
        vtep_mac: Some(held.vtep_mac()),
        direct_routing: config.backend.direct_routing,
        ipv6: match held {
            Held::Etcd { lease, .. } => {
                lease
                    .ipv6
                    .zip(lease.ipv6_subnet)
                    .map(|(v6, subnet)| NodeSpec6 {
                        public_ip: v6.public_ip,
                        subnet,
                        vtep_mac: Some(v6.vtep_mac),
                    })
            }
            Held::Kube { ipv6, .. } => ipv6.map(|v6| NodeSpec6 {
                public_ip: v6.public_ip,
                subnet: v6.subnet,
                vtep_mac: Some(v6.vtep_mac),
            }),
        },
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
        .delete_if_unchanged(lease.subnets(), lease.mod_revision)
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
    subnet: Ipv4Net,
    ipv6_subnet: Option<Ipv6Net>,
    mtu: u32,
    ip_masq: bool,
) -> Result<()> {
    SubnetEnv {
        network: config.network,
        subnet,
        mtu,
        ip_masq,
        ipv6: config.ipv6.map(|r| r.network).zip(ipv6_subnet),
    }
    .write(path)
    .with_context(|| format!("writing {}", path.display()))?;
    log::info!("wrote {}", path.display());
    Ok(())
}
