//! The command line: flanneld's flags with the same names, defaults and
//! `FLANNELD_<NAME>` environment fallbacks (a flag on the command line wins),
//! plus ours (`--datapath`, `--bpf-pin-dir`, ...). Go's single-dash spelling
//! (`-iface=...`, as in flanneld's own docs) is accepted too.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use clap::{ArgAction, Parser, ValueEnum};

pub use self::values::{
    HumanDuration, parse_duration, parse_go_bool, parse_mark_bit, parse_minutes,
};
use crate::subnet::etcd::own::LeaseTiming;
use overlay_common::fastpath::DEFAULT_FAST_PATH_MARK;

pub mod compat;
pub mod values;

const ETCD: &str = "etcd (the subnet store)";
const KUBE: &str = "Kubernetes (--kube-subnet-mgr)";
/// flanneld's `--net-config-path` default (kube-flannel.yml mounts its
/// ConfigMap there).
pub const DEFAULT_NET_CONFIG_PATH: &str = "/etc/kube-flannel/net-conf.json";
const NETWORK: &str = "Network and interface";
const LEASE: &str = "Subnet lease";
const HEALTH: &str = "Health";
const DATAPATH: &str = "Datapath (overlay-agent)";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum DatapathChoice {
    /// eBPF when it loads and attaches, otherwise the kernel's vxlan device.
    #[default]
    Auto,
    /// eBPF only: failing to load or attach is an error.
    Ebpf,
    /// The kernel's vxlan device only, exactly as flanneld programs it.
    Kernel,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum IngressChoice {
    /// A TC program on the underlay decapsulates.
    #[default]
    Tc,
    /// Experimental: XDP decapsulates, TC hands the packet to flannel.<VNI>
    /// (never the fast path). On a veth underlay XDP turns GSO off on the
    /// peer: bulk TCP measured 0.15x the kernel's vxlan device.
    #[value(name = "xdp+tc")]
    XdpTc,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum FastPathChoice {
    /// On where the kernel and the host allow it, else off with a log line.
    #[default]
    Auto,
    /// On, or the eBPF datapath does not start (auto then uses the kernel's).
    On,
    /// Every packet takes the host's bridge, routing and flannel.<VNI>.
    Off,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum TcAttachChoice {
    /// TCX links on kernels 6.6 and later, legacy clsact filters before.
    #[default]
    Auto,
    /// TCX links (the eBPF datapath fails to start where the kernel lacks TCX).
    Tcx,
    /// cls_bpf filters on the clsact qdisc (direct action, priority 8472).
    Legacy,
}

/// flanneld-compatible VXLAN overlay agent with an eBPF datapath.
/// A flag's value that must never be printed (`--etcd-password`): its
/// `Debug` says `<redacted>`, so `{cli:?}` in a log or a panic message
/// does not leak it. Read it with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Clone, Debug, Parser, PartialEq, Eq)]
#[command(
    name = "overlay-agent",
    version,
    about = "flannel-compatible VXLAN overlay agent (etcd or Kubernetes subnet manager) with an \
             eBPF datapath and a kernel vxlan fallback",
    long_about = None,
    after_help = "Every flag can also be set with FLANNELD_<FLAG> in the environment \
                  (e.g. FLANNELD_ETCD_ENDPOINTS, FLANNELD_IFACE); the command line wins. \
                  Go's single-dash form (-iface=eth0) is accepted."
)]
pub struct Cli {
    /// A comma-delimited list of etcd endpoints.
    #[arg(long, env = "FLANNELD_ETCD_ENDPOINTS",
          default_value = "http://127.0.0.1:4001,http://127.0.0.1:2379",
          value_delimiter = ',', help_heading = ETCD)]
    pub etcd_endpoints: Vec<String>,

    /// etcd prefix.
    #[arg(long, env = "FLANNELD_ETCD_PREFIX", default_value = "/coreos.com/network",
          help_heading = ETCD)]
    pub etcd_prefix: String,

    /// SSL key file used to secure etcd communication.
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE", help_heading = ETCD)]
    pub etcd_keyfile: Option<PathBuf>,

    /// SSL certification file used to secure etcd communication.
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE", help_heading = ETCD)]
    pub etcd_certfile: Option<PathBuf>,

    /// SSL Certificate Authority file used to secure etcd communication.
    #[arg(long, env = "FLANNELD_ETCD_CAFILE", help_heading = ETCD)]
    pub etcd_cafile: Option<PathBuf>,

    /// Username for BasicAuth to etcd.
    #[arg(long, env = "FLANNELD_ETCD_USERNAME", help_heading = ETCD)]
    pub etcd_username: Option<String>,

    /// Password for BasicAuth to etcd.
    #[arg(long, env = "FLANNELD_ETCD_PASSWORD", hide_env_values = true, help_heading = ETCD)]
    pub etcd_password: Option<Secret>,

    /// Contact the Kubernetes API for subnet assignment instead of etcd.
    #[arg(long, env = "FLANNELD_KUBE_SUBNET_MGR", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", require_equals = true, value_parser = parse_go_bool,
          help_heading = KUBE)]
    pub kube_subnet_mgr: bool,

    /// Kubernetes API server URL. Does not need to be specified if the agent
    /// is running in a pod.
    #[arg(long, env = "FLANNELD_KUBE_API_URL", help_heading = KUBE)]
    pub kube_api_url: Option<String>,

    /// kubeconfig file location. Does not need to be specified if the agent
    /// is running in a pod.
    #[arg(long, env = "FLANNELD_KUBECONFIG_FILE", help_heading = KUBE)]
    pub kubeconfig_file: Option<PathBuf>,

    /// Kubernetes annotation prefix. Can contain single slash "/", otherwise
    /// it will be appended at the end [default: flannel.alpha.coreos.com].
    #[arg(long, env = "FLANNELD_KUBE_ANNOTATION_PREFIX", help_heading = KUBE)]
    pub kube_annotation_prefix: Option<String>,

    /// Path to the network configuration file to use (with
    /// --kube-subnet-mgr; etcd mode reads <etcd-prefix>/config) [default:
    /// /etc/kube-flannel/net-conf.json].
    #[arg(long, env = "FLANNELD_NET_CONFIG_PATH", help_heading = KUBE)]
    pub net_config_path: Option<PathBuf>,

    /// Set NodeNetworkUnavailable after ready [default: true].
    #[arg(long, env = "FLANNELD_SET_NODE_NETWORK_UNAVAILABLE", num_args = 0..=1,
          default_missing_value = "true", require_equals = true, value_parser = parse_go_bool,
          help_heading = KUBE)]
    pub set_node_network_unavailable: Option<bool>,

    /// Interface to use (IP or name) for inter-host communication. Can be
    /// specified multiple times to check each option in order. Returns the
    /// first match found.
    #[arg(long, env = "FLANNELD_IFACE", value_delimiter = ',', action = ArgAction::Append,
          help_heading = NETWORK)]
    pub iface: Vec<String>,

    /// Regex expression to match the first interface to use (IP or name) for
    /// inter-host communication. Can be specified multiple times; checked
    /// after --iface.
    #[arg(long, env = "FLANNELD_IFACE_REGEX", action = ArgAction::Append, help_heading = NETWORK)]
    pub iface_regex: Vec<String>,

    /// Detect the interface to use (and its address) from the route to this
    /// address, as `ip route get` would; checked after --iface and
    /// --iface-regex.
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH", help_heading = NETWORK)]
    pub iface_can_reach: Option<Ipv4Addr>,

    /// IP accessible by other nodes for inter-host communication.
    #[arg(long, env = "FLANNELD_PUBLIC_IP", help_heading = NETWORK)]
    pub public_ip: Option<Ipv4Addr>,

    /// Filename where env variables (subnet, MTU, ...) will be written to.
    #[arg(long, env = "FLANNELD_SUBNET_FILE", default_value = "/run/flannel/subnet.env",
          help_heading = NETWORK)]
    pub subnet_file: PathBuf,

    /// Setup IP masquerade rule for traffic destined outside of overlay network.
    #[arg(long, env = "FLANNELD_IP_MASQ", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", require_equals = true, value_parser = parse_go_bool,
          help_heading = NETWORK)]
    pub ip_masq: bool,

    /// Disable fully-random mode for MASQUERADE.
    #[arg(long, env = "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE", default_value = "false",
          num_args = 0..=1, default_missing_value = "true", require_equals = true,
          value_parser = parse_go_bool, help_heading = NETWORK)]
    pub ip_masq_fully_random_disable: bool,

    /// Add default accept rules to FORWARD chain in iptables.
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", default_value = "true",
          num_args = 0..=1, default_missing_value = "true", require_equals = true,
          value_parser = parse_go_bool, help_heading = NETWORK)]
    pub iptables_forward_rules: bool,

    /// Resync period for iptables rules, in seconds.
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value = "5",
          value_parser = clap::value_parser!(u64).range(1..), help_heading = NETWORK)]
    pub iptables_resync: u64,

    /// Subnet lease renewal margin, in minutes, ranging from 1 to 1439 (or a
    /// duration with a unit, e.g. 30s, for tests).
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN", default_value = "60",
          value_parser = parse_minutes, help_heading = LEASE)]
    pub subnet_lease_renew_margin: HumanDuration,

    /// Lifetime of the etcd lease on our subnet key (flannel: 24h fixed).
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_TTL", default_value = "24h",
          value_parser = parse_duration, help_heading = LEASE)]
    pub subnet_lease_ttl: HumanDuration,

    /// The IP address for healthz server to listen.
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0", help_heading = HEALTH)]
    pub healthz_ip: Ipv4Addr,

    /// The port for healthz server to listen (0 to disable).
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value = "0", help_heading = HEALTH)]
    pub healthz_port: u16,

    /// Also put each peer's traffic on /metrics: four series per peer
    /// (eBPF datapath only; off by default, since every node of a large
    /// cluster would export four series per node of the cluster).
    #[arg(long, env = "FLANNELD_METRICS_PER_PEER", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", require_equals = true, value_parser = parse_go_bool,
          help_heading = HEALTH)]
    pub metrics_per_peer: bool,

    /// Which datapath moves the packets.
    #[arg(long, env = "FLANNELD_DATAPATH", value_enum, default_value = "auto",
          help_heading = DATAPATH)]
    pub datapath: DatapathChoice,

    /// Where the eBPF datapath decapsulates (eBPF datapath only).
    #[arg(long, env = "FLANNELD_EBPF_INGRESS", value_enum, default_value = "tc",
          help_heading = DATAPATH)]
    pub ebpf_ingress: IngressChoice,

    /// Established, non-NATed pod traffic skips the host's bridge, routing
    /// and flannel.<VNI> (eBPF datapath only; see the README's "Fast path").
    #[arg(long, env = "FLANNELD_FAST_PATH", value_enum, default_value = "auto",
          help_heading = DATAPATH)]
    pub fast_path: FastPathChoice,

    /// The skb mark bit (one bit, in hex or decimal) with which the host's mangle
    /// rule approves flows for the fast path. Pick one no other software on
    /// the node sets (Calico, kube-proxy, Cilium, Istio keep clear of the
    /// default); the agent clears it before deciding and warns at start-up
    /// about other rules that can set it (eBPF datapath only).
    #[arg(long, env = "FLANNELD_FAST_PATH_MARK", default_value_t = DEFAULT_FAST_PATH_MARK,
          value_parser = parse_mark_bit, help_heading = DATAPATH)]
    pub fast_path_mark: u32,

    /// How the TC programs attach: TCX links or legacy clsact filters (eBPF
    /// datapath only; see the README's "Kernels").
    #[arg(long, env = "FLANNELD_TC_ATTACH", value_enum, default_value = "auto",
          help_heading = DATAPATH)]
    pub tc_attach: TcAttachChoice,

    /// bpffs directory where the eBPF datapath pins its maps and links, so
    /// they outlive the agent (restarts and upgrades without loss); one per
    /// agent when several run on one machine [default: /sys/fs/bpf/overlay,
    /// used unpinned with a warning if that is not on bpffs]. When given, it
    /// (created if missing) must be on bpffs or the eBPF datapath is not used
    /// (--datapath auto then falls back to the kernel).
    #[arg(long, env = "FLANNELD_BPF_PIN_DIR", help_heading = DATAPATH)]
    pub bpf_pin_dir: Option<PathBuf>,

    /// How often the agent re-reads what the datapath holds and programs
    /// again what was changed from outside (tests shorten it).
    #[arg(long, env = "FLANNELD_RECHECK_INTERVAL", default_value = "60s",
          value_parser = parse_duration, hide = true)]
    pub recheck_interval: HumanDuration,

    /// Load this eBPF object instead of the one built into the agent.
    #[arg(long, env = "FLANNELD_BPF_OBJECT", hide = true)]
    pub bpf_object: Option<PathBuf>,

    #[command(flatten)]
    pub compat: compat::CompatFlags,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What to do instead of running the agent (the flags above still say where
/// etcd and the pins are).
#[derive(Clone, Debug, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// Print this node's lease, datapath, peers with their traffic, and the
    /// counters by reason, from the pinned maps and etcd; works whether the
    /// agent runs or not.
    Status,
    /// Remove what the agent created on this host: the pinned programs and
    /// maps, flannel.<VNI> of its VNI (from the pins, else --vni, else etcd's
    /// network config) with its routes, neighbour and FDB entries, and the
    /// FLANNEL-* iptables chains and the jumps to them. The lease and
    /// subnet.env stay. Removes nothing while a flanneld runs on the host
    /// (unless --force), or when flannel.<N> devices exist and nothing says
    /// which VNI is ours.
    Cleanup(CleanupArgs),
    /// flannel's mk-docker-opts.sh: write docker's options (--bip, --mtu,
    /// --ip-masq) from subnet.env to /run/docker_opts.env, byte for byte as
    /// the script does.
    MkDockerOpts(crate::flannel::docker_opts::MkDockerOptsArgs),
}

/// `cleanup`'s own flags.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct CleanupArgs {
    /// The VNI whose flannel.<VNI> to delete, when the pins do not say it
    /// (the kernel datapath pins nothing) and etcd has no network config.
    #[arg(long)]
    pub vni: Option<u32>,

    /// Remove even though a flanneld runs on this host, whose flannel.<VNI>
    /// and FLANNEL-* chains have the same names as ours.
    #[arg(long)]
    pub force: bool,
}

impl Cli {
    /// Parse `args` (with the program name first), accepting Go's `-flag`.
    pub fn parse_from_go<I, S>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Cli::try_parse_from(normalize_go_flags(args.into_iter().map(Into::into)))
    }

    /// Checks across flags that clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.subnet_lease_renew_margin.0 >= self.subnet_lease_ttl.0 {
            return Err(format!(
                "--subnet-lease-renew-margin ({:?}) must be shorter than --subnet-lease-ttl ({:?})",
                self.subnet_lease_renew_margin.0, self.subnet_lease_ttl.0
            ));
        }
        if self.etcd_certfile.is_some() != self.etcd_keyfile.is_some() {
            return Err("--etcd-certfile and --etcd-keyfile must be given together".into());
        }
        Ok(())
    }

    pub fn lease_timing(&self) -> LeaseTiming {
        LeaseTiming {
            ttl: self.subnet_lease_ttl.0,
            renew_margin: self.subnet_lease_renew_margin.0,
            // flannel retries every minute; never longer than the margin allows.
            retry: Duration::from_secs(60).min(self.subnet_lease_renew_margin.0 / 4),
        }
    }

    pub fn etcd_options(&self) -> crate::subnet::etcd::EtcdOptions {
        let mut o = crate::subnet::etcd::EtcdOptions::new(
            self.etcd_endpoints
                .iter()
                .map(|e| e.trim().to_owned())
                .collect(),
            self.etcd_prefix.clone(),
        );
        o.ca_file = self.etcd_cafile.clone();
        o.cert_file = self.etcd_certfile.clone();
        o.key_file = self.etcd_keyfile.clone();
        o.username = self.etcd_username.clone().filter(|s| !s.is_empty());
        o.password = self
            .etcd_password
            .as_ref()
            .map(|s| s.expose().to_owned())
            .filter(|s| !s.is_empty());
        o
    }

    pub fn kube_options(&self) -> crate::subnet::kube::KubeOptions {
        crate::subnet::kube::KubeOptions {
            api_url: self.kube_api_url.clone(),
            kubeconfig: self.kubeconfig_file.clone(),
            annotation_prefix: self
                .kube_annotation_prefix
                .clone()
                .unwrap_or_else(|| crate::subnet::kube::annotations::DEFAULT_PREFIX.to_owned()),
            net_config_path: self
                .net_config_path
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_NET_CONFIG_PATH)),
            set_node_network_unavailable: self.set_node_network_unavailable.unwrap_or(true),
        }
    }

    /// Kubernetes flags given without `--kube-subnet-mgr`: one line each
    /// (flanneld ignores them silently).
    pub fn kube_flag_warnings(&self) -> Vec<String> {
        if self.kube_subnet_mgr {
            return Vec::new();
        }
        [
            (self.kube_api_url.is_some(), "--kube-api-url"),
            (self.kubeconfig_file.is_some(), "--kubeconfig-file"),
            (
                self.kube_annotation_prefix.is_some(),
                "--kube-annotation-prefix",
            ),
            (self.net_config_path.is_some(), "--net-config-path"),
            (
                self.set_node_network_unavailable.is_some(),
                "--set-node-network-unavailable",
            ),
        ]
        .into_iter()
        .filter(|(given, _)| *given)
        .map(|(_, flag)| {
            format!(
                "{flag} has no effect here: it only matters with --kube-subnet-mgr (leases and config come from etcd)"
            )
        })
        .collect()
    }

    pub fn iface_selector(&self) -> crate::iface::Selector {
        crate::iface::Selector {
            ifaces: self.iface.clone(),
            regexes: self.iface_regex.clone(),
            public_ip: self.public_ip,
            can_reach: self.iface_can_reach,
            public_ipv6: self.compat.public_ipv6,
        }
    }
}

/// The long flags, for rewriting Go's single-dash spelling.
fn long_flags() -> Vec<String> {
    use clap::CommandFactory;
    Cli::command()
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_owned))
        .chain(["help".to_owned(), "version".to_owned()])
        .collect()
}

/// `-iface=eth0` -> `--iface=eth0`, `-ip-masq` -> `--ip-masq`, for known flags only.
pub fn normalize_go_flags(args: impl Iterator<Item = String>) -> Vec<String> {
    let longs = long_flags();
    args.enumerate()
        .map(|(i, a)| {
            if i > 0
                && a.starts_with('-')
                && !a.starts_with("--")
                && a.len() > 2
                && longs
                    .iter()
                    .any(|l| a[1..].split('=').next() == Some(l.as_str()))
            {
                format!("-{a}")
            } else {
                a
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        let mut v = vec!["overlay-agent"];
        v.extend_from_slice(args);
        Cli::parse_from_go(v).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    fn parse_err(args: &[&str]) -> String {
        let mut v = vec!["overlay-agent"];
        v.extend_from_slice(args);
        Cli::parse_from_go(v).unwrap_err().to_string()
    }

    // Env vars are process-wide: every test that reads them holds this lock.
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn defaults_match_flanneld() {
        let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let c = parse(&[]);
        assert_eq!(
            c.etcd_endpoints,
            vec!["http://127.0.0.1:4001", "http://127.0.0.1:2379"]
        );
        assert_eq!(c.etcd_prefix, "/coreos.com/network");
        assert_eq!(c.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(c.subnet_lease_renew_margin.0, Duration::from_secs(3600));
        assert_eq!(c.subnet_lease_ttl.0, Duration::from_secs(86400));
        assert!(!c.ip_masq);
        assert!(c.iptables_forward_rules);
        assert_eq!(c.iptables_resync, 5);
        assert_eq!(c.healthz_ip, Ipv4Addr::UNSPECIFIED);
        assert_eq!(c.healthz_port, 0);
        assert!(!c.metrics_per_peer);
        assert_eq!(c.datapath, DatapathChoice::Auto);
        assert!(c.iface.is_empty());
        assert!(c.validate().is_ok());
    }

    #[test]
    fn seed_004_systemd_unit_flags() {
        let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let c = parse(&[
            "--etcd-endpoints=http://10.211.55.10:2379,http://10.211.55.11:2379",
            "--iface=10.211.55.10",
            "--ip-masq=true",
            "--etcd-prefix=/coreos.com/network",
        ]);
        assert_eq!(
            c.etcd_endpoints,
            vec!["http://10.211.55.10:2379", "http://10.211.55.11:2379"]
        );
        assert_eq!(c.iface, vec!["10.211.55.10"]);
        assert!(c.ip_masq);
    }

    #[test]
    fn go_single_dash_flags_as_in_seed_001() {
        let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let c = parse(&["-iface=192.168.205.10", "-ip-masq", "-etcd-prefix", "/x"]);
        assert_eq!(c.iface, vec!["192.168.205.10"]);
        assert!(c.ip_masq);
        assert_eq!(c.etcd_prefix, "/x");
        // Unknown single-dash flags are left for clap to reject.
        let e = parse_err(&["-bogus=1"]);
        assert!(e.contains("unexpected argument"), "{e}");
    }

    #[test]
    fn repeatable_iface_and_bools() {
        let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let c = parse(&[
            "--iface",
            "eth1",
            "--iface=10.0.0.1",
            "--iface-regex",
            "^enp",
        ]);
        assert_eq!(c.iface, vec!["eth1", "10.0.0.1"]);
        assert_eq!(c.iface_regex, vec!["^enp"]);
        assert!(!parse(&["--ip-masq=false"]).ip_masq);
        assert!(!parse(&["--iptables-forward-rules=false"]).iptables_forward_rules);
        assert!(parse(&["--ip-masq=1"]).ip_masq);
        assert!(parse_err(&["--ip-masq=yes"]).contains("ip-masq"));
    }

    #[test]
    fn durations_and_their_errors() {
        let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let c = parse(&["--subnet-lease-renew-margin=10", "--subnet-lease-ttl=30m"]);
        assert_eq!(c.subnet_lease_renew_margin.0, Duration::from_secs(600));
        assert_eq!(c.subnet_lease_ttl.0, Duration::from_secs(1800));
        let c = parse(&["--subnet-lease-renew-margin=5s", "--subnet-lease-ttl=20s"]);
        assert_eq!(c.lease_timing().renew_margin, Duration::from_secs(5));
        assert!(c.validate().is_ok());
        assert!(parse_err(&["--subnet-lease-renew-margin=0"]).contains("1439"));
        assert!(parse_err(&["--subnet-lease-renew-margin=1440"]).contains("1439"));
        assert!(parse_err(&["--subnet-lease-ttl=soon"]).contains("--subnet-lease-ttl"));
        let c = parse(&["--subnet-lease-renew-margin=30", "--subnet-lease-ttl=20m"]);
        assert!(
            c.validate()
                .unwrap_err()
                .contains("--subnet-lease-renew-margin")
        );
    }

    #[test]
    fn errors_name_the_flag_and_expectation() {
        let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let e = parse_err(&["--datapath=fast"]);
        assert!(e.contains("--datapath") && e.contains("auto"), "{e}");
        let e = parse_err(&["--public-ip=300.1.1.1"]);
        assert!(e.contains("--public-ip"), "{e}");
        let e = parse_err(&["--healthz-port=70000"]);
        assert!(e.contains("--healthz-port"), "{e}");
        let c = parse(&["--etcd-certfile=/a"]);
        assert!(c.validate().unwrap_err().contains("--etcd-keyfile"));
    }

    #[test]
    fn environment_fallbacks_and_command_line_precedence() {
        let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the ENV lock serialises every test in this module that
        // reads the environment; nothing else in the crate's tests reads these.
        unsafe {
            std::env::set_var(
                "FLANNELD_ETCD_ENDPOINTS",
                "http://192.0.2.1:2379,http://192.0.2.2:2379",
            );
            std::env::set_var("FLANNELD_IFACE", "eth9");
            std::env::set_var("FLANNELD_IP_MASQ", "true");
            std::env::set_var("FLANNELD_SUBNET_LEASE_RENEW_MARGIN", "15");
            std::env::set_var("FLANNELD_DATAPATH", "kernel");
            std::env::set_var("FLANNELD_METRICS_PER_PEER", "true");
        }
        let c = parse(&[]);
        let c2 = parse(&[
            "--iface=eth1",
            "--datapath=ebpf",
            "--metrics-per-peer=false",
        ]);
        unsafe {
            for v in [
                "FLANNELD_ETCD_ENDPOINTS",
                "FLANNELD_IFACE",
                "FLANNELD_IP_MASQ",
                "FLANNELD_SUBNET_LEASE_RENEW_MARGIN",
                "FLANNELD_DATAPATH",
                "FLANNELD_METRICS_PER_PEER",
            ] {
                std::env::remove_var(v);
            }
        }
        assert_eq!(c.etcd_endpoints.len(), 2);
        assert_eq!(c.iface, vec!["eth9"]);
        assert!(c.ip_masq);
        assert_eq!(c.subnet_lease_renew_margin.0, Duration::from_secs(900));
        assert_eq!(c.datapath, DatapathChoice::Kernel);
        assert!(c.metrics_per_peer);
        assert_eq!(c2.iface, vec!["eth1"]);
        assert_eq!(c2.datapath, DatapathChoice::Ebpf);
        assert!(!c2.metrics_per_peer);
        assert!(parse(&["--metrics-per-peer"]).metrics_per_peer);
    }

    #[test]
    fn help_is_grouped_with_defaults() {
        let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let help = parse_err(&["--help"]);
        for needle in [
            "etcd (the subnet store):",
            "Network and interface:",
            "Subnet lease:",
            "Datapath (overlay-agent):",
            "[default: http://127.0.0.1:4001,http://127.0.0.1:2379]",
            "[default: /coreos.com/network]",
            "[default: /run/flannel/subnet.env]",
            "[env: FLANNELD_ETCD_ENDPOINTS=]",
            "--subnet-lease-renew-margin",
            "--healthz-port",
            "[default: auto]",
        ] {
            assert!(help.contains(needle), "help lacks {needle:?}:\n{help}");
        }
    }

    /// Every flag of flanneld v0.28.9's command line (and klog's usual ones),
    /// in flanneld's single-dash spelling, is accepted.
    #[test]
    fn debug_of_the_flags_redacts_the_etcd_password() {
        let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let c = parse(&["-etcd-username=root", "-etcd-password=hunter2"]);
        assert_eq!(
            c.etcd_password.as_ref().map(Secret::expose),
            Some("hunter2")
        );
        let d = format!("{c:?} {c:#?} {:?}", c.etcd_options());
        assert!(!d.contains("hunter2"), "{d}");
        assert!(d.contains("etcd_password: Some(<redacted>)"), "{d}");
        assert_eq!(c.etcd_options().password.as_deref(), Some("hunter2"));
    }

    #[test]
    fn every_flanneld_flag_is_accepted() {
        let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let c = parse(&[
            "-etcd-endpoints=http://10.0.0.1:2379",
            "-etcd-prefix=/coreos.com/network",
            "-etcd-keyfile=/k.pem",
            "-etcd-certfile=/c.pem",
            "-etcd-cafile=/ca.pem",
            "-etcd-username=u",
            "-etcd-password=p",
            "-kube-api-url=https://10.0.0.1:6443",
            "-kubeconfig-file=/k",
            "-kube-annotation-prefix=flannel.alpha.coreos.com",
            "-net-config-path=/etc/kube-flannel/net-conf.json",
            "-set-node-network-unavailable=false",
            "-iface=eth0",
            "-iface-regex=^eth",
            "-iface-can-reach=10.0.0.1",
            "-public-ip=10.0.0.5",
            "-public-ipv6=2001:db8::5",
            "-ip-masq",
            "-ip-masq-fully-random-disable",
            "-iptables-resync=5",
            "-iptables-forward-rules=false",
            "-ip-blackhole-route",
            "-subnet-file=/run/flannel/subnet.env",
            "-subnet-lease-renew-margin=60",
            "-healthz-ip=0.0.0.0",
            "-healthz-port=8471",
            "-v=2",
            "-vmodule=main=3",
            "-log_backtrace_at=main.go:1",
            "-logtostderr",
            "-alsologtostderr=true",
        ]);
        assert!(c.validate().is_ok(), "{:?}", c.validate());
        assert_eq!(c.iface_can_reach, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(c.compat.log_filter(), Some("debug"));
        assert_eq!(c.compat.warnings().len(), 4, "{:?}", c.compat.warnings());
        assert_eq!(parse(&["-v", "5"]).compat.log_filter(), Some("trace"));
        let kube = parse(&["--kube-subnet-mgr"]);
        assert!(kube.validate().is_ok());
        let opts = kube.kube_options();
        assert!(kube.kube_subnet_mgr && opts.set_node_network_unavailable);
        assert_eq!(opts.annotation_prefix, "flannel.alpha.coreos.com");
        assert_eq!(
            opts.net_config_path,
            PathBuf::from("/etc/kube-flannel/net-conf.json")
        );
        assert!(kube.kube_flag_warnings().is_empty());
        assert!(!c.kube_options().set_node_network_unavailable);
        assert_eq!(c.kube_flag_warnings().len(), 5);
        let v = parse_err(&["--version"]);
        assert!(v.contains(env!("CARGO_PKG_VERSION")), "{v}");
    }

    #[test]
    fn cleanup_takes_a_vni_and_force_after_the_shared_flags() {
        let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let c = parse(&["-etcd-prefix=/x", "cleanup", "--vni", "7", "--force"]);
        assert_eq!(c.etcd_prefix, "/x");
        assert_eq!(
            c.command,
            Some(Command::Cleanup(CleanupArgs {
                vni: Some(7),
                force: true
            }))
        );
        let plain = parse(&["cleanup"]);
        assert_eq!(
            plain.command,
            Some(Command::Cleanup(CleanupArgs::default()))
        );
    }
}
