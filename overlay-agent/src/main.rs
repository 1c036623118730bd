//! `overlay-agent`: a drop-in for `flanneld` with the VXLAN backend and the
//! etcd subnet manager.
//!
//! Order matters: everything that can fail without touching the host (flags,
//! etcd, the network config, the interface) is checked first, so a bad
//! config leaves nothing half-configured. Then: lease, datapath, subnet.env,
//! and the loop that keeps the lease and follows the peers.

use std::{path::Path, process::ExitCode, time::Duration};

use anyhow::{Context, Result, anyhow};
use overlay_agent::{
    cli::{
        CleanupArgs, Cli, Command, DatapathChoice, FastPathChoice, IngressChoice, TcAttachChoice,
    },
    config::NetworkConfig,
    datapath::{
        AnyDatapath, Datapath, NodeSpec, NodeState,
        ebpf::{EbpfDatapath, EbpfOptions, IngressMode},
        fastpath::FastPathMode,
        kernel::KernelDatapath,
        pins::{DEFAULT_PIN_DIR, PinLayout},
        tc_attach::TcAttachMode,
    },
    etcd::{
        EtcdError, Registry,
        backoff::Backoff,
        own::{self, AcquireError, Keeper, NodeIdentity, OwnLease, Renewal},
        watch::LeaseWatcher,
    },
    health::{self, Health, Phase},
    iface::{self, ExternalInterface},
    ipmasq::{self, Rule},
    mac::MacAddr,
    netlink::Netlink,
    reconcile::{Own, Reconciler},
    subnet_env::{self, SubnetEnv},
};

fn main() -> ExitCode {
    let cli = match Cli::parse_from_go(std::env::args()) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // RUST_LOG wins over klog's -v, which wins over the default; an empty
    // RUST_LOG (an env file's `RUST_LOG=`) counts as unset.
    let level = cli.compat.log_filter().unwrap_or("info");
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level));
    if std::env::var_os("RUST_LOG").is_some_and(|v| v.is_empty()) {
        logger.parse_filters(level);
    }
    logger.init();
    for warning in cli.compat.warnings() {
        log::warn!("{warning}");
    }
    if let Err(e) = cli.validate() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Some(Command::Status) => rt.block_on(status(cli)),
        Some(Command::Cleanup(ref args)) => rt.block_on(cleanup(&cli, args)),
        Some(Command::MkDockerOpts(ref args)) => {
            overlay_agent::docker_opts::run(args, &cli.subnet_file).map_err(Into::into)
        }
        None => rt.block_on(run(cli)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    log::info!(
        "overlay-agent {}: etcd {} prefix {}, datapath {:?}",
        env!("CARGO_PKG_VERSION"),
        cli.etcd_endpoints.join(","),
        cli.etcd_prefix,
        cli.datapath
    );
    let health = Health::new();
    if cli.healthz_port > 0 {
        spawn_healthz(&cli, health.clone()).await?;
    }

    // 1. etcd and the network config: nothing on the host is touched yet.
    let reg = connect(&cli).await?;
    let config = wait_config(&reg, &health).await?;
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
    overlay_agent::netlink::vxlan_device::device_mtu(config.backend.mtu, ext.mtu)
        .map_err(|e| anyhow!("the network config's Backend.MTU: {}", e.reason()))?;
    subnet_env::check_writable(&cli.subnet_file).with_context(|| {
        format!(
            "--subnet-file {}: cannot write there",
            cli.subnet_file.display()
        )
    })?;

    // 2. Our lease.
    health.set_phase(Phase::AcquiringLease);
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
    let mut lease = retry_etcd("acquiring a subnet lease", || {
        own::acquire(&reg, &config, &node, previous, &timing)
    })
    .await?;

    // 3. The datapath.
    health.set_phase(Phase::ProgrammingDatapath);
    let spec = node_spec(&config, &ext, &lease);
    let device_name = overlay_agent::netlink::vxlan_device::device_name(config.backend.vni);
    let device_existed = !matches!(nl.link_by_name(&device_name).await, Ok(None));
    let started = async {
        let (dp, state) = start_datapath(&cli, &spec).await?;
        if state.vtep_mac != lease.vtep_mac {
            log::info!(
                "{} has MAC {}; publishing it in lease {}",
                state.device,
                state.vtep_mac,
                lease.subnet
            );
            let mac = state.vtep_mac;
            let (renewal, updated) = retry_etcd("publishing the VTEP MAC", || {
                let (reg, mut lease) = (&reg, lease.clone());
                async move {
                    let r = own::update_mac(reg, &mut lease, mac).await?;
                    Ok::<_, EtcdError>((r, lease))
                }
            })
            .await?;
            lease = updated;
            if let Renewal::Lost(why) = renewal {
                log::warn!("could not publish the MAC yet: {why}");
            }
        }
        write_subnet_env(&cli.subnet_file, &config, &lease, state.mtu, cli.ip_masq)?;
        anyhow::Ok((dp, state))
    }
    .await;
    let (dp, state) = match started {
        Ok(ok) => ok,
        Err(e) => {
            release_new_lease(&reg, &lease).await;
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
    let nft_mode = config.enable_nftables;
    let random_fully = !cli.ip_masq_fully_random_disable
        && tokio::task::spawn_blocking(move || {
            if nft_mode {
                ipmasq::nft::supports_random_fully()
            } else {
                ipmasq::supports_random_fully()
            }
        })
        .await
        .unwrap_or(false);
    let mut wanted = flanneld_rules(&cli, &config, lease.subnet, random_fully);
    wanted.iptables.extend(fast_path_rules(&dp));
    let iptables = ipmasq::RuleKeeper::start(Duration::from_secs(cli.iptables_resync))
        .context("starting the iptables thread")?;
    first_rules(iptables.keep(wanted)).await;

    // 4. Keep the lease, follow the peers.
    let (tx, mut own_rx) = tokio::sync::watch::channel(lease.clone());
    let keeper = Keeper {
        reg: reg.clone(),
        config: config.clone(),
        node,
        timing,
    };
    let first = lease.clone();
    let mut keeper_task = tokio::spawn(async move { keeper.run(first, tx).await });

    let snapshot = retry_etcd("listing leases", || reg.list()).await?;
    let own_of = |l: &OwnLease| Own {
        subnet: l.subnet,
        public_ip: l.public_ip,
        vni: l.vni,
        network: config.network,
    };
    let dp_mode = dp.mode();
    let mut rec = Reconciler::start(dp, own_of(&lease), &snapshot)
        .await
        .map_err(|e| {
            anyhow!(
                "reading the peers the {dp_mode} datapath holds: {}",
                e.reason()
            )
        })?;
    let mut watcher = LeaseWatcher::new(reg.clone(), snapshot.revision);
    refresh_health(&health, &mut rec, &lease, &watcher, cli.metrics_per_peer);
    health.set_phase(Phase::Running);
    log::info!(
        "running: lease {} on {} ({} datapath), {} peer(s) programmed",
        lease.subnet,
        state.device,
        dp_mode,
        rec.programmed().len()
    );
    let status_line = format!(
        "lease {} on {} ({} datapath)",
        lease.subnet, state.device, dp_mode
    );
    match overlay_agent::notify::ready(&status_line) {
        Ok(true) => log::info!("told systemd we are ready"),
        Ok(false) => {}
        Err(e) => log::warn!("{e}: {}", e.source),
    }

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    // Pod veths come and go: the fast path follows them. Without the
    // subscription (it only fails if netlink does) it stays on the veths
    // that existed at start-up, which the log says.
    let mut link_changes = match overlay_agent::netlink::events::link_changes() {
        Ok(rx) => Some(rx),
        Err(e) => {
            log::warn!(
                "cannot follow link changes ({e}): pods started from now on use the host's path"
            );
            None
        }
    };
    let mut retry = tokio::time::interval(Duration::from_secs(5));
    let mut health_tick = tokio::time::interval(Duration::from_secs(1));
    let mut recheck = tokio::time::interval(cli.recheck_interval.0);
    recheck.tick().await;
    // Its own task: a slow etcd must never hold up the lease events.
    let config_watch = tokio::spawn(ConfigWatch::run(reg.clone()));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            events = watcher.next() => {
                let events = events.context("following the leases")?;
                let t0 = std::time::Instant::now();
                rec.apply(&events);
                rec.converge().await;
                health.lock().reconcile.observe(t0.elapsed());
            }
            _ = recheck.tick() => {
                if let Err(e) = rec.recheck().await {
                    log::warn!("re-reading the datapath's peers: {}", e.reason());
                }
            }
            _ = health_tick.tick() => {
                refresh_health(&health, &mut rec, &lease, &watcher, cli.metrics_per_peer);
            }
            changed = own_rx.changed() => {
                if changed.is_err() {
                    // The keeper stopped: its result says why.
                    break;
                }
                let new = own_rx.borrow_and_update().clone();
                // The keeper never moves us to another subnet (our pods keep
                // their addresses); it reports a conflict over our key.
                if new.conflict != lease.conflict {
                    health.lock().lease_conflict.clone_from(&new.conflict);
                    if new.conflict.is_none() {
                        log::warn!("lease {}: the conflict is over", new.subnet);
                    }
                }
                lease = new;
            }
            Some(()) = async { link_changes.as_mut()?.recv().await }, if link_changes.is_some() => {
                // A pod's veth is created, then moved and renamed, then put
                // on the bridge: let a burst settle before reading the state.
                tokio::time::sleep(Duration::from_millis(50)).await;
                if let Err(e) = rec.datapath().sync_pods().await {
                    log::warn!("fast path: following the pod veths: {}", e.reason());
                }
            }
            _ = retry.tick(), if !rec.is_converged() => {
                rec.converge().await;
            }
            res = &mut keeper_task => {
                return match res {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(anyhow!("keeping our lease: {e}")),
                    Err(e) => Err(anyhow!("the lease keeper crashed: {e}")),
                };
            }
        }
    }
    log::info!(
        "stopping; lease {} and {} stay in place, as with flanneld",
        lease.subnet,
        state.device
    );
    keeper_task.abort();
    config_watch.abort();
    Ok(())
}

/// Notices a network config changed or deleted in etcd while the agent runs:
/// the agent keeps the one it started with (as flanneld does) and says so
/// once per new value, and that a restart applies it.
struct ConfigWatch {
    seen: Option<Vec<u8>>,
}

impl ConfigWatch {
    /// Reads the config every 10 s (one small get) until aborted.
    async fn run(reg: Registry) {
        let mut watch = ConfigWatch {
            seen: reg.get_config_raw().await.ok().flatten(),
        };
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        tick.tick().await;
        loop {
            tick.tick().await;
            watch.check(&reg).await;
        }
    }

    async fn check(&mut self, reg: &Registry) {
        let Ok(now) = reg.get_config_raw().await else {
            return;
        };
        if now == self.seen {
            return;
        }
        match &now {
            None => log::warn!(
                "the network config was deleted from etcd ({}); this agent keeps running with the one it started with",
                reg.config_key()
            ),
            Some(raw) => match NetworkConfig::parse(raw) {
                Ok(c) => log::warn!(
                    "the network config in etcd changed (Network {}, SubnetLen {}, VNI {}); this agent keeps running with the one it started with: restart it to apply the new one",
                    c.network,
                    c.subnet_len,
                    c.backend.vni
                ),
                Err(e) => log::warn!(
                    "the network config in etcd changed and is invalid ({e}); this agent keeps running with the one it started with"
                ),
            },
        }
        self.seen = now;
    }
}

async fn connect(cli: &Cli) -> Result<Registry> {
    let opts = cli.etcd_options();
    retry_etcd("connecting to etcd", || Registry::connect(&opts)).await
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
            match overlay_agent::netlink::vxlan_device::checked_device_name(vni) {
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

/// Retry an etcd operation with backoff while it fails for a transient
/// reason; stop on a problem of configuration (`etcd::failure`).
async fn retry_etcd<T, E, F, Fut>(what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: Into<RetryClass>,
{
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) => match e.into() {
                RetryClass::Retry(msg) => {
                    let delay = backoff.next_delay();
                    log::warn!("{what}: {msg}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                }
                RetryClass::Fatal(e) => return Err(e.context(what.to_owned())),
            },
        }
    }
}

enum RetryClass {
    Retry(String),
    Fatal(anyhow::Error),
}

impl From<EtcdError> for RetryClass {
    fn from(e: EtcdError) -> Self {
        if e.is_transient() {
            RetryClass::Retry(e.to_string())
        } else {
            RetryClass::Fatal(e.into())
        }
    }
}

impl From<AcquireError> for RetryClass {
    fn from(e: AcquireError) -> Self {
        match e {
            AcquireError::Etcd(e) => e.into(),
            e => RetryClass::Fatal(e.into()),
        }
    }
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
    if matches!(lease.choice, overlay_agent::alloc::Choice::Reuse { .. }) {
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

/// flanneld's rules for this lease: masquerading with `--ip-masq`, FORWARD
/// accepts with `--iptables-forward-rules`; in iptables, or with
/// `EnableNFTables` in flanneld's nft table.
fn flanneld_rules(
    cli: &Cli,
    config: &NetworkConfig,
    subnet: ipnet::Ipv4Net,
    random_fully: bool,
) -> ipmasq::Wanted {
    if config.enable_nftables {
        return ipmasq::Wanted {
            iptables: Vec::new(),
            nft: Some(ipmasq::nft::NftRules {
                network: config.network,
                subnet,
                masq: cli.ip_masq,
                random_fully,
                forward: cli.iptables_forward_rules,
            }),
        };
    }
    let mut rules = Vec::new();
    if cli.ip_masq {
        rules.extend(ipmasq::masq_rules(config.network, subnet, random_fully));
    }
    if cli.iptables_forward_rules {
        rules.extend(ipmasq::forward_rules(config.network));
    }
    ipmasq::Wanted {
        iptables: rules,
        nft: None,
    }
}

/// The fast path's mangle rule (its datapath installed it), so the resync
/// repairs it like flanneld's own.
fn fast_path_rules(dp: &AnyDatapath) -> Vec<Rule> {
    dp.as_ebpf()
        .and_then(EbpfDatapath::fast_path_subnet)
        .map(ipmasq::fast_path_rules)
        .unwrap_or_default()
}

/// How long start-up waits for the first iptables run: READY=1 follows the
/// rules unless something holds the xtables lock; then the rules follow it.
const FIRST_RULES_WAIT: Duration = Duration::from_secs(5);

async fn first_rules(applied: tokio::sync::oneshot::Receiver<()>) {
    if tokio::time::timeout(FIRST_RULES_WAIT, applied)
        .await
        .is_err()
    {
        log::warn!(
            "iptables has not answered within {FIRST_RULES_WAIT:?} (is the xtables lock held?); \
             carrying on, the rules follow when it does"
        );
    }
}

/// bpffs's `statfs` magic.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The pin directory must be on bpffs (created if missing).
fn check_pin_dir(dir: &Path) -> Result<(), String> {
    if let Err(e) = std::fs::create_dir_all(dir) {
        return Err(format!(
            "cannot create pin directory {}: {e}",
            dir.display()
        ));
    }
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("pin directory {} has a NUL byte", dir.display()))?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statfs.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(format!(
            "cannot statfs pin directory {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    #[allow(clippy::unnecessary_cast)]
    if st.f_type as i64 != BPF_FS_MAGIC {
        return Err(format!(
            "pin directory {} is not on bpffs (mount -t bpf bpf /sys/fs/bpf)",
            dir.display()
        ));
    }
    Ok(())
}

async fn start_datapath(cli: &Cli, spec: &NodeSpec) -> Result<(AnyDatapath, NodeState)> {
    let options = EbpfOptions {
        ingress: match cli.ebpf_ingress {
            IngressChoice::Tc => IngressMode::Tc,
            IngressChoice::XdpTc => IngressMode::XdpAndTc,
        },
        fast_path: match cli.fast_path {
            FastPathChoice::Auto => FastPathMode::Auto,
            FastPathChoice::On => FastPathMode::On,
            FastPathChoice::Off => FastPathMode::Off,
        },
        tc_attach: match cli.tc_attach {
            TcAttachChoice::Auto => TcAttachMode::Auto,
            TcAttachChoice::Tcx => TcAttachMode::Tcx,
            TcAttachChoice::Legacy => TcAttachMode::Legacy,
        },
        ..EbpfOptions::default()
    };
    let try_ebpf = || async {
        let mut options = options.clone();
        options.object.clone_from(&cli.bpf_object);
        options.pins = match &cli.bpf_pin_dir {
            Some(dir) => {
                check_pin_dir(dir)?;
                Some(PinLayout::new(dir))
            }
            None => match check_pin_dir(Path::new(DEFAULT_PIN_DIR)) {
                Ok(()) => Some(PinLayout::new(DEFAULT_PIN_DIR)),
                Err(why) => {
                    log::warn!(
                        "{why}: running unpinned, so the programs detach when the agent stops \
                         (restarts are not hitless); mount bpffs or pass --bpf-pin-dir"
                    );
                    None
                }
            },
        };
        if let Some(pins) = &options.pins {
            log::info!("eBPF state pinned under {}", pins.root().display());
        }
        let mut dp = EbpfDatapath::new(options);
        match dp.setup(spec).await {
            Ok(state) => Ok((AnyDatapath::Ebpf(dp), state)),
            Err(e) => Err(e.reason()),
        }
    };
    match cli.datapath {
        DatapathChoice::Ebpf => try_ebpf()
            .await
            .map_err(|why| anyhow!("eBPF datapath (--datapath ebpf): {why}")),
        DatapathChoice::Kernel => kernel_datapath(cli, spec).await,
        DatapathChoice::Auto => match try_ebpf().await {
            Ok(v) => Ok(v),
            Err(why) => {
                log::warn!("eBPF datapath unavailable, falling back to the kernel datapath: {why}");
                kernel_datapath(cli, spec).await
            }
        },
    }
}

async fn kernel_datapath(cli: &Cli, spec: &NodeSpec) -> Result<(AnyDatapath, NodeState)> {
    remove_ebpf_leftovers(cli, spec);
    let mut dp = KernelDatapath::new();
    let state = dp
        .setup(spec)
        .await
        .map_err(|e| anyhow!("kernel datapath: {}", e.reason()))?;
    Ok((AnyDatapath::Kernel(dp), state))
}

/// The kernel datapath maintains no eBPF state: programs a previous eBPF run
/// (or a half-done attach just now) left pinned or as legacy clsact filters
/// would keep filtering with maps nobody updates, so their pins and filters
/// go (detaching them), and so does the fast path's mangle rule. The lease
/// and `flannel.<VNI>` stay.
fn remove_ebpf_leftovers(cli: &Cli, spec: &NodeSpec) {
    let layout = pin_layout(cli);
    match overlay_agent::datapath::ebpf::remove_attachments(Some(&layout)) {
        Ok(removed) if !removed.is_empty() => log::info!(
            "kernel datapath: removed {} eBPF attachment(s) and pin(s) (under {}): {removed:?}",
            removed.len(),
            layout.root().display()
        ),
        Ok(_) => {}
        Err(e) => log::warn!(
            "kernel datapath: removing the eBPF pins under {}: {e}",
            layout.root().display()
        ),
    }
    overlay_agent::datapath::fastpath::release_host(spec.subnet);
}

/// The pin directory `status` and `cleanup` look at.
fn pin_layout(cli: &Cli) -> PinLayout {
    PinLayout::new(
        cli.bpf_pin_dir
            .clone()
            .unwrap_or_else(|| DEFAULT_PIN_DIR.into()),
    )
}

/// The node's public IP: `--public-ip`, else the pinned NODE_CONFIG's local
/// address (the interface address, which is the public IP without
/// `--public-ip`), else the interface flags'.
async fn node_public_ip(
    cli: &Cli,
    state: Option<&overlay_agent::inspect::PinnedState>,
) -> Option<std::net::Ipv4Addr> {
    if let Some(ip) = cli.public_ip {
        return Some(ip);
    }
    if let Some(st) = state {
        return Some(std::net::Ipv4Addr::from(st.node.local_ip));
    }
    let nl = Netlink::connect().ok()?;
    iface::find(&nl, &cli.iface_selector())
        .await
        .ok()
        .map(|e| e.public_ip)
}

/// One etcd step of a one-shot subcommand (`status`, `cleanup`): they must
/// answer even when etcd does not, so each step gets 5 s.
async fn briefly<T, E: std::fmt::Display>(
    step: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    tokio::time::timeout(Duration::from_secs(5), step)
        .await
        .map_err(|_| "etcd did not answer within 5 s".to_owned())?
        .map_err(|e| e.to_string())
}

async fn connect_briefly(cli: &Cli) -> Result<Registry, String> {
    let mut opts = cli.etcd_options();
    opts.request_timeout = Duration::from_secs(3);
    briefly(Registry::connect(&opts)).await
}

/// `overlay-agent status`.
async fn status(cli: Cli) -> Result<()> {
    use overlay_agent::inspect::{self, LeaseStatus};
    let layout = pin_layout(&cli);
    let state = inspect::read(&layout).context("reading the pinned maps")?;
    let public_ip = node_public_ip(&cli, state.as_ref()).await;
    let lease = async {
        let reg = connect_briefly(&cli).await?;
        let Some(ip) = public_ip else {
            return Err("cannot tell this node's public IP".to_owned());
        };
        let snapshot = briefly(reg.list()).await?;
        for entry in snapshot.entries {
            let Ok(l) = overlay_agent::lease::decode(&entry.key, &entry.value) else {
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
    match rejected_leases(&cli, public_ip).await {
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

/// The other nodes' leases in etcd that fail `lease_check`, one line each.
async fn rejected_leases(
    cli: &Cli,
    own_public_ip: Option<std::net::Ipv4Addr>,
) -> Result<Vec<String>, String> {
    use overlay_agent::{lease, lease_check};
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
            own_public_ip: own_public_ip.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
            vni: config.backend.vni,
        };
        if let Err(why) = lease_check::check(&trust, l.subnet, l.public_ip, vtep_mac, vni) {
            out.push(format!("{}: {why} ({})", entry.key, why.label()));
        }
    }
    Ok(out)
}

/// `overlay-agent cleanup`.
async fn cleanup(cli: &Cli, args: &CleanupArgs) -> Result<()> {
    let layout = pin_layout(cli);
    // The network config's VNI names the device when neither the pins nor
    // --vni do: ask etcd, briefly.
    let config_vni = match args.vni {
        Some(_) => None,
        None => {
            async {
                let reg = connect_briefly(cli).await.ok()?;
                let config = briefly(reg.get_config()).await.ok()??;
                Some(config.backend.vni)
            }
            .await
        }
    };
    let opts = overlay_agent::cleanup::Options {
        vni: args.vni,
        config_vni,
        force: args.force,
    };
    let removed = overlay_agent::cleanup::run(&layout, &opts)
        .await
        .context("cleaning up")?;
    if removed.is_empty() {
        println!("nothing to remove");
    }
    for r in &removed {
        println!("removed {r}");
    }
    Ok(())
}

/// `/healthz`, `/readyz` and `/metrics` (see `overlay_agent::health`).
async fn spawn_healthz(cli: &Cli, health: Health) -> Result<()> {
    let addr = (cli.healthz_ip, cli.healthz_port);
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!(
            "--healthz-ip/--healthz-port: cannot listen on {}:{}",
            addr.0, addr.1
        )
    })?;
    log::info!(
        "health on http://{}:{}/healthz, /readyz and /metrics",
        addr.0,
        addr.1
    );
    tokio::spawn(health::serve(listener, health));
    Ok(())
}

/// Refreshes what `/metrics` reports from the loop's state.
fn refresh_health(
    health: &Health,
    rec: &mut Reconciler<AnyDatapath>,
    lease: &OwnLease,
    watcher: &LeaseWatcher,
    metrics_per_peer: bool,
) {
    // Every second: nothing here grows with the number of peers (only with
    // the leases rejected, normally none); each peer's traffic is read when
    // /metrics is scraped, and only with --metrics-per-peer (health::peers).
    let programmed = rec.programmed().len();
    let mut rejected = std::collections::BTreeMap::new();
    for (_, why) in rec.rejected().values() {
        *rejected.entry(*why).or_insert(0) += 1;
    }
    let refused = rec.refused().len();
    let dp = rec.datapath();
    let counters = dp.as_ebpf().and_then(|e| e.counters().ok());
    let expiry = lease.expires.map(|at| {
        let left = at.saturating_duration_since(std::time::Instant::now());
        (std::time::SystemTime::now() + left)
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    });
    let mut h = health.lock();
    h.leases_rejected = rejected;
    h.mode = Some(dp.mode());
    h.peers_programmed = programmed;
    h.peers_rejected_map_full = refused;
    h.counters = counters;
    if metrics_per_peer {
        health::peers::follow(&mut h.peer_maps, dp.as_ebpf());
    }
    h.lease_expiry_unix = expiry;
    h.reservation = lease.is_reservation();
    h.etcd_connected = !watcher.is_failing();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_dir_must_be_on_bpffs() {
        let dir = std::env::temp_dir().join(format!("overlay-agent-pin-{}", std::process::id()));
        let e = check_pin_dir(&dir).unwrap_err();
        assert!(e.contains("not on bpffs"), "{e}");
        let _ = std::fs::remove_dir(&dir);
    }
}
