//! Pods made the way a Kubernetes node makes them: a new network namespace,
//! then the CNI reference plugins (Debian's `containernetworking-plugins`,
//! `/usr/lib/cni`) run as a container runtime runs them, inside the host's
//! network namespace, from kube-flannel's `10-flannel.conflist`.
//!
//! What a runtime (containerd through libcni) does for a pod sandbox, and
//! what [`Pod::add`] does in the same order:
//! 1. `ip netns add` (containerd's `cni-<uuid>`; here `cni-<pid>-<n>-<name>`);
//! 2. `loopback` with `CNI_IFNAME=lo` (containerd's built-in `cni-loopback`
//!    network);
//! 3. the conflist's plugins in order with `CNI_COMMAND=ADD`,
//!    `CNI_CONTAINERID`, `CNI_NETNS=/run/netns/<pod>`, `CNI_IFNAME=eth0`,
//!    `CNI_PATH=/usr/lib/cni`, `CNI_ARGS` (kubelet's `K8S_POD_*`) and the
//!    plugin's config on stdin, with `name`, `cniVersion`, `prevResult` and
//!    the `runtimeConfig` of the capabilities it declares injected as libcni
//!    does. Every plugin runs inside the host's network namespace
//!    (`nsenter --net`): the bridge plugin creates `cni0` and the host end of
//!    the veth there, portmap writes its iptables rules there.
//!
//! The conflist's first plugin, `flannel`, is flannel's CNI meta-plugin
//! (github.com/flannel-io/cni-plugin, `flannel.go` and `flannel_linux.go`).
//! Debian does not ship it and nothing here builds Go, so [`Pod`] does its
//! work itself, field by field as documented in [`flannel_delegate`]: read
//! subnet.env, build the delegate `bridge` config, save it for DEL, run the
//! delegate. Everything else is the real plugin binaries.
//!
//! Teardown ([`Pod::remove`], or drop, also while a test unwinds) is the
//! runtime's: the conflist's plugins in reverse with `CNI_COMMAND=DEL` and
//! the same configs and runtime config, `loopback` DEL, `ip netns del`.
//!
//! Per node state lives next to the subnet file, never in the machine's
//! `/var/lib/cni`: `<subnet.env>.cni/networks` is host-local's `dataDir`
//! (the leases, `/var/lib/cni/networks` on a node) and
//! `<subnet.env>.cni/flannel` is the meta-plugin's `dataDir` (the saved
//! delegate configs, `/var/lib/cni/flannel`). One subnet file per host, so
//! one such directory per host.
//!
//! # For kube-mode tests
//!
//! Once the agent on host `i` has written its subnet file (`--subnet-file`
//! pointing into the test's directory, one file per host), a pod on that
//! host is:
//!
//! ```no_run
//! # use overlay_tests::{agent::Hosts, cni::{Pod, PodOpts, PortMapping}};
//! # fn f(hosts: &Hosts, dir: &std::path::Path) -> anyhow::Result<()> {
//! // The agents ran with --subnet-file=<dir>/h1.env and <dir>/h2.env.
//! let (env1, env2) = (dir.join("h1.env"), dir.join("h2.env"));
//! let pod = Pod::add(&hosts.ns(1), &env1, "a", PodOpts::default())?;
//! let web = Pod::add(
//!     &hosts.ns(2),
//!     &env2,
//!     "web",
//!     PodOpts { port_mappings: vec![PortMapping::tcp(30080, 8080)], ..PodOpts::default() },
//! )?;
//! pod.exec(&["ping", "-c", "1", "-W", "2", &web.ip.to_string()])?;
//! # Ok(()) }
//! ```
//!
//! Wait for the agent's subnet file first (its `/readyz`, or the file
//! itself): the meta-plugin fails like flannel's does ("failed to load
//! flannel 'subnet.env' file") when it is missing. The agent's eBPF fast
//! path finds `cni0` and the veths the bridge plugin made; pods on two hosts
//! reach each other through the overlay. Drop the pods before the hosts.

use std::{
    fs,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    str::FromStr,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::{Map, Value, json};

use crate::cmd;

/// Where Debian's `containernetworking-plugins` puts the plugins.
pub const CNI_PATH: &str = "/usr/lib/cni";

/// How long one plugin invocation may take before it is killed.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// kube-flannel.yml's `cni-conf.json` (v0.28.9, doc A.7), which its
/// `install-cni` init container installs as
/// `/etc/cni/net.d/10-flannel.conflist`. The deployment tests check that our
/// manifests carry exactly this.
pub const KUBE_FLANNEL_CNI_CONF: &str = r#"{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "flannel",
      "delegate": {
        "hairpinMode": true,
        "isDefaultGateway": true
      }
    },
    {
      "type": "portmap",
      "capabilities": {
        "portMappings": true
      }
    }
  ]
}
"#;

/// The network containerd sets `lo` up with (its built-in loopback config).
const LOOPBACK_CONF: &str = r#"{"cniVersion":"0.3.1","name":"cni-loopback","type":"loopback"}"#;

/// subnet.env as flannel's CNI plugin reads it (`loadFlannelSubnetEnv`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK`: comma-separated, masked, duplicates dropped.
    pub networks: Vec<Ipv4Net>,
    /// `FLANNEL_SUBNET` as Go's `net.ParseCIDR` returns it: the *network*
    /// (10.244.1.0/24 from `FLANNEL_SUBNET=10.244.1.1/24`).
    pub subnet: Option<Ipv4Net>,
    pub ipv6_networks: Vec<Ipv6Net>,
    pub ipv6_subnet: Option<Ipv6Net>,
    pub mtu: Option<u32>,
    /// `FLANNEL_IPMASQ`: true only for the exact text `true`.
    pub ipmasq: Option<bool>,
}

impl SubnetEnv {
    /// Parses the file the way the plugin does: unknown lines are ignored,
    /// a bad CIDR or MTU is an error, and the same keys must be present.
    pub fn parse(text: &str) -> Result<SubnetEnv> {
        let mut env = SubnetEnv {
            networks: Vec::new(),
            subnet: None,
            ipv6_networks: Vec::new(),
            ipv6_subnet: None,
            mtu: None,
            ipmasq: None,
        };
        for line in text.lines() {
            let (key, value) = line.split_once('=').unwrap_or((line, ""));
            match key {
                "FLANNEL_NETWORK" => {
                    env.networks.clear();
                    for c in value.split(',') {
                        let n = Ipv4Net::from_str(c)
                            .with_context(|| format!("FLANNEL_NETWORK {c:?}"))?
                            .trunc();
                        if !env.networks.contains(&n) {
                            env.networks.push(n);
                        }
                    }
                }
                "FLANNEL_SUBNET" => {
                    env.subnet = Some(
                        Ipv4Net::from_str(value)
                            .with_context(|| format!("FLANNEL_SUBNET {value:?}"))?
                            .trunc(),
                    )
                }
                "FLANNEL_IPV6_NETWORK" => {
                    env.ipv6_networks.clear();
                    for c in value.split(',') {
                        let n = Ipv6Net::from_str(c)
                            .with_context(|| format!("FLANNEL_IPV6_NETWORK {c:?}"))?
                            .trunc();
                        if !env.ipv6_networks.contains(&n) {
                            env.ipv6_networks.push(n);
                        }
                    }
                }
                "FLANNEL_IPV6_SUBNET" => {
                    env.ipv6_subnet = Some(
                        Ipv6Net::from_str(value)
                            .with_context(|| format!("FLANNEL_IPV6_SUBNET {value:?}"))?
                            .trunc(),
                    )
                }
                "FLANNEL_MTU" => {
                    env.mtu = Some(
                        value
                            .parse()
                            .with_context(|| format!("FLANNEL_MTU {value:?}"))?,
                    )
                }
                "FLANNEL_IPMASQ" => env.ipmasq = Some(value == "true"),
                _ => {}
            }
        }
        // The plugin's `missing()`, with its wording.
        let mut missing = Vec::new();
        if env.networks.is_empty() && env.ipv6_networks.is_empty() {
            missing.extend(["FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK"]);
        }
        if env.subnet.is_none() && env.ipv6_subnet.is_none() {
            missing.extend(["FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"]);
        }
        if env.mtu.is_none() {
            missing.push("FLANNEL_MTU");
        }
        if env.ipmasq.is_none() {
            missing.push("FLANNEL_IPMASQ");
        }
        ensure!(missing.is_empty(), "is missing {}", missing.join(", "));
        Ok(env)
    }

    pub fn read(path: &Path) -> Result<SubnetEnv> {
        let text = fs::read_to_string(path).with_context(|| {
            format!(
                "failed to load flannel 'subnet.env' file {}",
                path.display()
            )
        })?;
        Self::parse(&text).with_context(|| format!("{}", path.display()))
    }
}

/// Writes an IPv4 subnet.env as flanneld does (`WriteSubnetFile`: these
/// lines in this order, `FLANNEL_SUBNET` = the lease's first address, written
/// to a temporary name and renamed), for tests that run no agent.
pub fn write_subnet_env(
    path: &Path,
    network: &str,
    subnet: &str,
    mtu: u32,
    ipmasq: bool,
) -> Result<()> {
    let text = format!(
        "FLANNEL_NETWORK={network}\nFLANNEL_SUBNET={subnet}\nFLANNEL_MTU={mtu}\nFLANNEL_IPMASQ={ipmasq}\n"
    );
    let dir = path.parent().context("subnet file has no directory")?;
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}",
        path.file_name().context("file name")?.to_string_lossy()
    ));
    fs::write(&tmp, text)?;
    fs::rename(&tmp, path)?;
    Ok(())
}

/// The delegate config flannel's meta-plugin hands to `bridge` (its
/// `cmdAdd` and `doCmdAdd` in `flannel.go`/`flannel_linux.go`), from the
/// meta-plugin's own config `conf` (the conflist entry with `name` and
/// `cniVersion` injected) and subnet.env. `ipam_data_dir` is the one field
/// flannel does not set: host-local's lease directory, so tests never touch
/// `/var/lib/cni/networks`.
pub fn flannel_delegate(conf: &Value, env: &SubnetEnv, ipam_data_dir: &Path) -> Result<Value> {
    let mut delegate = match conf.get("delegate") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(d)) => {
            // cmdAdd's checks, with its messages.
            if d.get("type").is_some_and(|t| !t.is_string()) {
                bail!("'delegate' dictionary, if present, must have (string) 'type' field");
            }
            if d.contains_key("name") {
                bail!("'delegate' dictionary must not have 'name' field, it'll be set by flannel");
            }
            if d.contains_key("ipam") {
                bail!("'delegate' dictionary must not have 'ipam' field, it'll be set by flannel");
            }
            d.clone()
        }
        Some(other) => bail!("failed to load netconf: delegate is {other}"),
    };
    // cmdAdd: the meta-plugin's runtimeConfig goes down to the delegate.
    if let Some(rc) = conf.get("runtimeConfig").filter(|v| !v.is_null()) {
        delegate.insert("runtimeConfig".into(), rc.clone());
    }
    // doCmdAdd: the network's name (kube-flannel's "cbr0"); it is also the
    // directory under host-local's dataDir and portmap's rule comment.
    delegate.insert(
        "name".into(),
        conf.get("name").cloned().unwrap_or(Value::Null),
    );
    // doCmdAdd: bridge unless the delegate names another type. flannel sets
    // no `bridge` key: the bridge plugin's default name is `cni0`.
    delegate
        .entry("type")
        .or_insert_with(|| Value::from("bridge"));
    // doCmdAdd: "if flannel is not doing ipmasq, we should": the delegate
    // masquerades exactly when flanneld (here the agent's --ip-masq) does not.
    let ipmasq = env.ipmasq.context("FLANNEL_IPMASQ")?;
    delegate
        .entry("ipMasq")
        .or_insert_with(|| Value::from(!ipmasq));
    // doCmdAdd: FLANNEL_MTU (the VXLAN device's MTU) on the bridge and veths.
    let mtu = env.mtu.context("FLANNEL_MTU")?;
    delegate.entry("mtu").or_insert_with(|| Value::from(mtu));
    // doCmdAdd: a bridge delegate is the pods' gateway (cni0 gets .1).
    // `hairpinMode` and `isDefaultGateway` come from kube-flannel's
    // cni-conf.json delegate, copied above.
    if delegate["type"] == "bridge" {
        delegate
            .entry("isGateway")
            .or_insert_with(|| Value::from(true));
    }
    // doCmdAdd: the conflist's cniVersion, when it has one.
    if let Some(v) = conf
        .get("cniVersion")
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty())
    {
        delegate.insert("cniVersion".into(), Value::from(v));
    }
    // getDelegateIPAM: the meta-plugin's own `ipam` if any, else host-local,
    // one range set per family holding the node's subnet (masked, as Go's
    // ParseCIDR gives it), and routes: the config's own first, then each
    // FLANNEL_NETWORK with no gateway (ipam.ConfigureIface then routes them
    // via the range's gateway, cni0's .1).
    let mut ipam = match conf.get("ipam") {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    ipam.entry("type")
        .or_insert_with(|| Value::from("host-local"));
    let mut ranges = Vec::new();
    if let Some(sn) = env.subnet {
        ranges.push(json!([{ "subnet": sn.to_string() }]));
    }
    if let Some(sn) = env.ipv6_subnet {
        ranges.push(json!([{ "subnet": sn.to_string() }]));
    }
    ipam.insert("ranges".into(), Value::Array(ranges));
    let mut routes = match ipam.get("routes") {
        Some(Value::Array(r)) => r.clone(),
        None => Vec::new(),
        Some(other) => bail!("failed to read IPAM routes: ipam.routes is {other}"),
    };
    routes.extend(env.networks.iter().map(|n| json!({ "dst": n.to_string() })));
    routes.extend(
        env.ipv6_networks
            .iter()
            .map(|n| json!({ "dst": n.to_string() })),
    );
    ipam.insert("routes".into(), Value::Array(routes));
    // Ours, not flannel's: see above.
    ipam.entry("dataDir")
        .or_insert_with(|| Value::from(ipam_data_dir.to_string_lossy().into_owned()));
    delegate.insert("ipam".into(), Value::Object(ipam));
    Ok(Value::Object(delegate))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// A pod's `hostPort`: what kubelet passes in the `portMappings` capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
}

impl PortMapping {
    pub fn tcp(host_port: u16, container_port: u16) -> PortMapping {
        PortMapping {
            host_port,
            container_port,
            protocol: Protocol::Tcp,
        }
    }
    pub fn udp(host_port: u16, container_port: u16) -> PortMapping {
        PortMapping {
            host_port,
            container_port,
            protocol: Protocol::Udp,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct PodOpts {
    /// The pod's host ports (portmap's `runtimeConfig.portMappings`).
    pub port_mappings: Vec<PortMapping>,
    /// The conflist; kube-flannel's [`KUBE_FLANNEL_CNI_CONF`] when `None`.
    pub conflist: Option<String>,
    /// The node's CNI state directory; `<subnet.env>.cni` when `None`.
    pub data_dir: Option<PathBuf>,
    /// The pod's network namespace name; `cni-<pid>-<n>-<name>` when `None`.
    pub netns: Option<String>,
}

/// A pod sandbox's network: its namespace and what the plugins made for it.
/// DEL and the namespace's removal happen on drop, or with [`Pod::remove`].
#[derive(Debug)]
pub struct Pod {
    /// The name the test gave it (`K8S_POD_NAME`).
    pub name: String,
    /// Its network namespace (`/run/netns/<netns>`).
    pub netns: String,
    /// The host's network namespace the plugins ran in.
    pub host_ns: String,
    pub container_id: String,
    /// eth0's IPv4 address, from the chain's result.
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    /// eth0's IPv6 address when subnet.env has an IPv6 subnet.
    pub ipv6: Option<Ipv6Addr>,
    /// The bridge (`cni0`): the result's first interface.
    pub bridge: String,
    /// The host end of the veth (`veth<8 hex>`, named by the bridge plugin).
    pub host_veth: String,
    /// The chain's final result, as the runtime would cache it.
    pub result: Value,
    conflist: Value,
    runtime_config: Map<String, Value>,
    subnet_env: PathBuf,
    data_dir: PathBuf,
    /// Set once ADD of the chain started, so teardown runs its DEL.
    added: bool,
    removed: bool,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Pod {
    /// Creates pod `name` on the host whose network namespace is `host_ns`,
    /// with that host's subnet file. On failure everything made so far is
    /// torn down again (as kubelet does for a sandbox whose setup failed).
    pub fn add(host_ns: &str, subnet_env: &Path, name: &str, opts: PodOpts) -> Result<Pod> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // The pid tells apart tests in other processes, the counter tests
        // (threads) of this one.
        let netns = opts
            .netns
            .clone()
            .unwrap_or_else(|| format!("cni-{pid}-{n}-{name}"));
        let container_id = container_id(&netns);
        let conflist: Value =
            serde_json::from_str(opts.conflist.as_deref().unwrap_or(KUBE_FLANNEL_CNI_CONF))
                .context("conflist")?;
        let data_dir = opts.data_dir.clone().unwrap_or_else(|| {
            let mut s = subnet_env.as_os_str().to_owned();
            s.push(".cni");
            PathBuf::from(s)
        });
        let mut runtime_config = Map::new();
        if !opts.port_mappings.is_empty() {
            let maps: Vec<Value> = opts
                .port_mappings
                .iter()
                .map(|m| {
                    json!({
                        "hostPort": m.host_port,
                        "containerPort": m.container_port,
                        "protocol": m.protocol.as_str(),
                    })
                })
                .collect();
            runtime_config.insert("portMappings".into(), Value::Array(maps));
        }
        cmd::run(None, &["ip", "netns", "add", &netns])?;
        let mut pod = Pod {
            name: name.to_owned(),
            netns,
            host_ns: host_ns.to_owned(),
            container_id,
            ip: Ipv4Addr::UNSPECIFIED,
            prefix_len: 0,
            gateway: Ipv4Addr::UNSPECIFIED,
            ipv6: None,
            bridge: String::new(),
            host_veth: String::new(),
            result: Value::Null,
            conflist,
            runtime_config,
            subnet_env: subnet_env.to_owned(),
            data_dir,
            added: false,
            removed: false,
        };
        // On an error `pod` drops here and its Drop runs DEL and removes the
        // namespace.
        pod.setup()?;
        Ok(pod)
    }

    fn setup(&mut self) -> Result<()> {
        self.invoke("loopback", "ADD", "lo", LOOPBACK_CONF.as_bytes())?;
        self.added = true;
        let result = self.chain_add()?;
        self.parse_result(&result)?;
        self.result = result;
        Ok(())
    }

    /// libcni's `AddNetworkList`: each plugin gets the previous one's result.
    fn chain_add(&self) -> Result<Value> {
        let mut prev: Option<Value> = None;
        for plugin in self.plugins()? {
            let conf = self.plugin_conf(plugin, prev.as_ref())?;
            let out = if conf["type"] == "flannel" {
                self.flannel_add(&conf)?
            } else {
                let ty = conf["type"].as_str().context("plugin without type")?;
                self.invoke(ty, "ADD", "eth0", &serde_json::to_vec(&conf)?)?
            };
            prev = Some(
                serde_json::from_slice(&out)
                    .with_context(|| format!("result of {}", conf["type"]))?,
            );
        }
        prev.context("the conflist has no plugins")
    }

    fn plugins(&self) -> Result<&Vec<Value>> {
        self.conflist["plugins"]
            .as_array()
            .context("conflist without plugins")
    }

    /// libcni's `buildOneConfig`: the list's `name` and `cniVersion`, the
    /// previous result, and `runtimeConfig` holding only the capabilities
    /// the plugin declares (portmap's `portMappings`; flannel declares none).
    fn plugin_conf(&self, plugin: &Value, prev: Option<&Value>) -> Result<Value> {
        let mut conf = plugin.as_object().context("plugin config")?.clone();
        conf.insert("name".into(), self.conflist["name"].clone());
        conf.insert("cniVersion".into(), self.conflist["cniVersion"].clone());
        if let Some(prev) = prev {
            conf.insert("prevResult".into(), prev.clone());
        }
        let mut rc = Map::new();
        if let Some(Value::Object(caps)) = plugin.get("capabilities") {
            for (cap, on) in caps {
                if on == true
                    && let Some(v) = self.runtime_config.get(cap)
                {
                    rc.insert(cap.clone(), v.clone());
                }
            }
        }
        if !rc.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(rc));
        }
        Ok(Value::Object(conf))
    }

    /// The meta-plugin's ADD: build the delegate, save it under the
    /// container ID for DEL (`saveScratchNetConf`, mode 0600), run it and
    /// pass its result on.
    fn flannel_add(&self, conf: &Value) -> Result<Vec<u8>> {
        let env = SubnetEnv::read(&self.subnet_env)?;
        let delegate = flannel_delegate(conf, &env, &self.data_dir.join("networks"))?;
        let bytes = serde_json::to_vec(&delegate)?;
        let scratch = self.data_dir.join("flannel");
        fs::create_dir_all(&scratch)?;
        let saved = scratch.join(&self.container_id);
        fs::write(&saved, &bytes)?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&saved, fs::Permissions::from_mode(0o600))?;
        let ty = delegate["type"].as_str().context("delegate type")?;
        self.invoke(ty, "ADD", "eth0", &bytes)
            .context("failed to delegate add")
    }

    /// The meta-plugin's DEL: the saved delegate config, DEL'd as it was
    /// added; nothing saved means nothing to do (the spec's idempotent DEL).
    /// The saved file goes only once DEL worked, so a retry can still run.
    fn flannel_del(&self) -> Result<()> {
        let saved = self.data_dir.join("flannel").join(&self.container_id);
        let bytes = match fs::read(&saved) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).context(format!("{}", saved.display())),
        };
        let delegate: Value = serde_json::from_slice(&bytes)?;
        let ty = delegate["type"].as_str().context("saved delegate type")?;
        self.invoke(ty, "DEL", "eth0", &bytes)?;
        let _ = fs::remove_file(&saved);
        Ok(())
    }

    fn parse_result(&mut self, result: &Value) -> Result<()> {
        let ifaces = result["interfaces"]
            .as_array()
            .context("result without interfaces")?;
        // The bridge plugin reports [bridge, host veth, container veth];
        // only the container's end has a sandbox.
        let host_side: Vec<&str> = ifaces
            .iter()
            .filter(|i| i.get("sandbox").is_none_or(|s| s == ""))
            .filter_map(|i| i["name"].as_str())
            .collect();
        self.bridge = host_side.first().context("no bridge")?.to_string();
        self.host_veth = host_side.last().context("no host veth")?.to_string();
        ensure!(host_side.len() >= 2, "no host veth in {result}");
        for ip in result["ips"].as_array().context("result without ips")? {
            let addr = IpNet::from_str(ip["address"].as_str().context("address")?)?;
            match addr {
                IpNet::V4(a) => {
                    self.ip = a.addr();
                    self.prefix_len = a.prefix_len();
                    self.gateway = ip["gateway"]
                        .as_str()
                        .context("no gateway")?
                        .parse()
                        .context("gateway")?;
                }
                IpNet::V6(a) => self.ipv6 = Some(a.addr()),
            }
        }
        ensure!(
            !self.ip.is_unspecified() || self.ipv6.is_some(),
            "no address in {result}"
        );
        Ok(())
    }

    /// Runs one plugin binary in the host's network namespace as a runtime
    /// does, returning its stdout (the result). A plugin's error result (a
    /// JSON `msg` on stdout, non-zero exit) becomes the error.
    fn invoke(&self, plugin: &str, command: &str, ifname: &str, stdin: &[u8]) -> Result<Vec<u8>> {
        let bin = Path::new(CNI_PATH).join(plugin);
        ensure!(
            bin.exists(),
            "{} missing: install containernetworking-plugins (`cargo xtask setup`)",
            bin.display()
        );
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
            self.name, self.container_id
        );
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", crate::netns::netns_path(&self.host_ns)))
            .arg(&bin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.container_id)
            .env("CNI_NETNS", crate::netns::netns_path(&self.netns))
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", CNI_PATH)
            .env("CNI_ARGS", args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        // Configs are a few KB: they fit the pipe, so writing before reading
        // cannot deadlock.
        child.stdin.take().context("stdin")?.write_all(stdin)?;
        let deadline = Instant::now() + PLUGIN_TIMEOUT;
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{plugin} {command} ({}): no answer within {PLUGIN_TIMEOUT:?}",
                    self.netns
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut out = Vec::new();
        child
            .stdout
            .take()
            .context("stdout")?
            .read_to_end(&mut out)?;
        let mut err = String::new();
        child
            .stderr
            .take()
            .context("stderr")?
            .read_to_string(&mut err)?;
        if !status.success() {
            bail!(
                "CNI {plugin} {command} for {} in {} failed ({status}): {} {}\nconfig: {}",
                self.netns,
                self.host_ns,
                String::from_utf8_lossy(&out).trim(),
                err.trim(),
                String::from_utf8_lossy(stdin)
            );
        }
        Ok(out)
    }

    /// The runtime's teardown: the chain's DEL in reverse order with the
    /// same configs (`DelNetworkList`; no `prevResult` for cniVersion
    /// 0.3.1), loopback's DEL, then the namespace. Every step runs even if
    /// an earlier one failed; the first error is returned.
    fn teardown(&mut self) -> Result<()> {
        if self.removed {
            return Ok(());
        }
        self.removed = true;
        let mut first: Option<anyhow::Error> = None;
        let mut note = |r: Result<()>| {
            if let Err(e) = r
                && first.is_none()
            {
                first = Some(e);
            }
        };
        if self.added {
            let plugins = self.plugins().cloned().unwrap_or_default();
            for plugin in plugins.iter().rev() {
                note((|| {
                    let conf = self.plugin_conf(plugin, None)?;
                    if conf["type"] == "flannel" {
                        self.flannel_del()
                    } else {
                        let ty = conf["type"].as_str().context("plugin without type")?;
                        self.invoke(ty, "DEL", "eth0", &serde_json::to_vec(&conf)?)
                            .map(drop)
                    }
                })());
            }
            note(
                self.invoke("loopback", "DEL", "lo", LOOPBACK_CONF.as_bytes())
                    .map(drop),
            );
        }
        note(cmd::run(None, &["ip", "netns", "del", &self.netns]).map(drop));
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// DEL and the namespace's removal, reporting what failed.
    pub fn remove(mut self) -> Result<()> {
        self.teardown()
    }

    /// Runs a command inside the pod's namespace; its stdout.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        cmd::run_in(&self.netns, args)
    }

    /// Starts a command inside the pod, killed when the handle drops.
    pub fn spawn(&self, args: &[&str]) -> Result<cmd::Background> {
        cmd::Background::spawn(Some(&self.netns), args)
    }

    /// host-local's lease file for the pod's address (removed by DEL).
    pub fn lease_file(&self) -> PathBuf {
        let net = self.conflist["name"].as_str().unwrap_or("cbr0");
        self.data_dir
            .join("networks")
            .join(net)
            .join(self.ip.to_string())
    }

    /// The node's CNI state directory (`networks/`, `flannel/`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn addr(&self) -> IpAddr {
        IpAddr::V4(self.ip)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("tearing down pod {}: {e:#}", self.netns);
        }
    }
}

/// A 64-hex-digit sandbox ID as containerd makes them, unique per pod.
fn container_id(netns: &str) -> String {
    use sha2::{Digest, Sha256};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let digest = Sha256::digest(format!("{netns}/{nanos}").as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> SubnetEnv {
        SubnetEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap()
    }

    fn flannel_conf() -> Value {
        let list: Value = serde_json::from_str(KUBE_FLANNEL_CNI_CONF).unwrap();
        let mut conf = list["plugins"][0].clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf
    }

    #[test]
    fn subnet_env_is_read_as_flannels_plugin_reads_it() {
        let e = env();
        assert_eq!(e.networks, vec!["10.244.0.0/16".parse().unwrap()]);
        // The network, not the gateway address the file holds.
        assert_eq!(e.subnet, Some("10.244.1.0/24".parse().unwrap()));
        assert_eq!((e.mtu, e.ipmasq), (Some(1450), Some(true)));
        let err = SubnetEnv::parse("FLANNEL_NETWORK=10.244.0.0/16\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "is missing FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET, FLANNEL_MTU, FLANNEL_IPMASQ"
        );
    }

    #[test]
    fn delegate_is_flannels_bridge_config() {
        let d = flannel_delegate(&flannel_conf(), &env(), Path::new("/t/networks")).unwrap();
        assert_eq!(
            d,
            json!({
                "name": "cbr0",
                "cniVersion": "0.3.1",
                "type": "bridge",
                "hairpinMode": true,
                "isDefaultGateway": true,
                "isGateway": true,
                "ipMasq": false,
                "mtu": 1450,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.244.1.0/24"}]],
                    "routes": [{"dst": "10.244.0.0/16"}],
                    "dataDir": "/t/networks",
                },
            })
        );
        let mut bad = flannel_conf();
        bad["delegate"]["ipam"] = json!({});
        assert!(flannel_delegate(&bad, &env(), Path::new("/t")).is_err());
    }
}
