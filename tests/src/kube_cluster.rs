//! Kubernetes-mode clusters of lab hosts: the API stand-in ([`KubeApi`],
//! TLS and a bearer token, listening on host 1's address), a Node per host
//! as kubelet and the node IPAM controller leave it (podCIDR
//! `10.244.<i>.0/24`), `net-conf.json` as kube-flannel's ConfigMap holds
//! it, and `overlay-agent --kube-subnet-mgr` processes started as the
//! DaemonSet starts them (`NODE_NAME`, a kubeconfig). A flanneld stand-in
//! node publishes its lease as flanneld's kube subnet manager does and
//! programs `flannel.1` with iproute2 as flanneld does.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::{
    agent::{Agent, Bpffs, Hosts},
    kube_api::{KubeApi, KubeApiSpec, simple_node},
    lab, peers,
    reference::ReferencePeer,
};

/// kube-flannel's default prefix.
pub const PREFIX: &str = "flannel.alpha.coreos.com";

/// kube-flannel.yml's `net-conf.json`.
pub const NET_CONF: &str = r#"{
  "Network": "10.244.0.0/16",
  "EnableNFTables": false,
  "Backend": {
    "Type": "vxlan"
  }
}"#;

/// Fields drop in this order: the bpffs is unmounted before the stand-in
/// removes its directory, which holds the mount point (mounted, it made
/// that removal fail half-way and leave the directory behind).
pub struct KubeCluster {
    /// A bpffs outside the hosts' mount namespaces, for the agents' pins.
    pub bpffs: Bpffs,
    pub hosts: Hosts,
    pub api: KubeApi,
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub net_conf: PathBuf,
}

/// What [`KubeCluster::start_with`] builds on.
pub struct KubeClusterSpec {
    pub hosts: Hosts,
    /// The API stand-in (its `netns`, `ip`, TLS and token).
    pub api: KubeApiSpec,
    /// The `overlay-agent` binary.
    pub bin: PathBuf,
    /// Where the kubeconfig, net-conf.json, subnet files and pins go (and
    /// the API's scratch directory, under `api`); inside the API's scratch
    /// directory when `None`.
    pub dir: Option<PathBuf>,
}

impl KubeCluster {
    /// `ip -n <host i> <args>`'s output (routes, neighbours, links), empty
    /// when the command fails.
    pub fn ip(&self, i: usize, args: &[&str]) -> String {
        let ns = self.hosts.ns(i);
        let mut a = vec!["ip", "-n", ns.as_str()];
        a.extend_from_slice(args);
        crate::agent::sh(&a).unwrap_or_default()
    }

    /// `n` hosts, the API stand-in on host 1, and no Nodes yet.
    pub fn start(test: &str, n: usize) -> Result<KubeCluster> {
        let bin = crate::binaries::agent()?;
        let hosts = Hosts::new(test, n)?;
        let api = KubeApiSpec {
            netns: Some(hosts.ns(1)),
            ip: Some(hosts.ip(1)),
            tls: true,
            token: Some(format!("token-{}", std::process::id())),
            ..KubeApiSpec::default()
        };
        Self::start_with(KubeClusterSpec {
            hosts,
            api,
            bin,
            dir: None,
        })
    }

    /// A cluster on given hosts with a given API stand-in (the `lab`
    /// binary's fixed namespaces and directory), no Nodes yet.
    pub fn start_with(spec: KubeClusterSpec) -> Result<KubeCluster> {
        let KubeClusterSpec {
            hosts,
            mut api,
            bin,
            dir,
        } = spec;
        if let Some(d) = &dir {
            api.dir.get_or_insert_with(|| d.join("api"));
        }
        let api = KubeApi::start(api)?;
        let dir = dir.unwrap_or_else(|| api.dir().join("cluster"));
        std::fs::create_dir_all(&dir)?;
        let kubeconfig = api.kubeconfig(&dir.join("kubeconfig"))?;
        let net_conf = dir.join("net-conf.json");
        std::fs::write(&net_conf, NET_CONF)?;
        let bpffs = Bpffs::mount(dir.join("bpf"))?;
        Ok(KubeCluster {
            hosts,
            api,
            bin,
            dir,
            kubeconfig,
            net_conf,
            bpffs,
        })
    }

    pub fn node_name(i: usize) -> String {
        format!("node{i}")
    }

    pub fn pod_cidr(i: usize) -> String {
        format!("10.244.{i}.0/24")
    }

    /// Node `node<i>` as kubelet registers it, with its podCIDR.
    pub fn add_node(&self, i: usize) -> Result<Value> {
        self.api
            .put_node(simple_node(&Self::node_name(i), &Self::pod_cidr(i)))
    }

    /// Where agent `i` writes subnet.env.
    pub fn subnet_env(&self, i: usize) -> PathBuf {
        self.dir.join(format!("h{i}.env"))
    }

    /// The flags of the DaemonSet's container (`--ip-masq
    /// --kube-subnet-mgr`), with the kubeconfig and net-conf of this
    /// cluster, host `i`'s interface, its subnet file and pins, then `extra`.
    pub fn agent_args(&self, i: usize, datapath: &str, extra: &[&str]) -> Vec<String> {
        let mut args = vec![
            "--ip-masq".to_owned(),
            "--kube-subnet-mgr".to_owned(),
            format!("--kubeconfig-file={}", self.kubeconfig.display()),
            format!("--net-config-path={}", self.net_conf.display()),
            format!("--iface={}", self.hosts.ip(i)),
            format!("--subnet-file={}", self.subnet_env(i).display()),
            format!("--datapath={datapath}"),
            format!(
                "--bpf-pin-dir={}",
                self.bpffs.0.join(format!("h{i}")).display()
            ),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        args
    }

    /// The agent on host `i` as node `node<i>`.
    pub fn start_agent(&self, i: usize, datapath: &str, extra: &[&str]) -> Result<Agent> {
        let name = Self::node_name(i);
        Agent::start_with_env(
            &self.dir,
            &format!("agent{i}"),
            &self.hosts.ns(i),
            &self.bin,
            &self.agent_args(i, datapath, extra),
            &[("NODE_NAME", name.as_str())],
        )
    }

    /// Node `i`'s annotations (empty when it has none).
    pub fn annotations(&self, i: usize) -> serde_json::Map<String, Value> {
        self.api
            .node(&Self::node_name(i))
            .and_then(|n| n["metadata"]["annotations"].as_object().cloned())
            .unwrap_or_default()
    }

    /// Node `i`'s condition of `type`.
    pub fn condition(&self, i: usize, kind: &str) -> Option<Value> {
        let node = self.api.node(&Self::node_name(i))?;
        node["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == kind)
            .cloned()
    }

    /// Host `i` as a flanneld node: `flannel.1` made with iproute2 exactly
    /// as flanneld makes it, and the annotations flanneld's kube subnet
    /// manager writes (byte for byte), subnet.env as flanneld writes it.
    /// Its peers are programmed with [`FlannelNode::sync`].
    pub fn flannel_node(&self, i: usize) -> Result<FlannelNode> {
        let cidr: ipnet::Ipv4Net = Self::pod_cidr(i).parse()?;
        let host = lab::Host {
            index: i as u8,
            ns: self.hosts.ns(i),
            container_ns: String::new(),
            underlay_dev: "eth0".into(),
            underlay_ip: self.hosts.ip(i).parse()?,
            switch_port: format!("p{i}"),
            subnet: cidr,
            gateway: Ipv4Addr::from(u32::from(cidr.network()) + 1),
            container_ip: Ipv4Addr::from(u32::from(cidr.network()) + 2),
        };
        let peer = ReferencePeer::setup(&host, 1, 8472)?;
        let name = Self::node_name(i);
        let annotations = flannel_annotations(&peer.vtep_mac.to_string(), &self.hosts.ip(i));
        self.api.patch_node_annotations(&name, &annotations)?;
        std::fs::write(
            self.subnet_env(i),
            format!(
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={}/24\nFLANNEL_MTU={}\nFLANNEL_IPMASQ=true\n",
                host.gateway, peer.mtu
            ),
        )?;
        Ok(FlannelNode { peer, name })
    }
}

/// The annotations flanneld v0.28's kube subnet manager writes for a VXLAN
/// node with VNI 1 (`backend-data` compact JSON, lower-case MAC).
pub fn flannel_annotations(mac: &str, public_ip: &str) -> BTreeMap<String, Option<String>> {
    BTreeMap::from([
        (
            format!("{PREFIX}/backend-data"),
            Some(format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#)),
        ),
        (format!("{PREFIX}/backend-type"), Some("vxlan".into())),
        (format!("{PREFIX}/kube-subnet-manager"), Some("true".into())),
        (format!("{PREFIX}/public-ip"), Some(public_ip.into())),
    ])
}

/// A net-conf.json with room for [`peers::MAX`] peer podCIDRs (`/24`s in
/// 10.0.0.0/8), for thousands of Nodes made with [`peer_node`]; the agent's
/// own Node takes [`SCALE_OWN_CIDR`], outside every peer's.
pub const SCALE_NET_CONF: &str = r#"{"Network": "10.0.0.0/8", "Backend": {"Type": "vxlan"}}"#;

/// The podCIDR of the agent's own Node next to [`peer_node`]s.
pub const SCALE_OWN_CIDR: &str = "10.200.0.0/24";

/// The name of peer `i`'s Node.
pub fn peer_name(i: usize) -> String {
    format!("peer{i}")
}

/// Peer `i` of [`peers`] as a Node of a flanneld (kube subnet manager):
/// podCIDR [`peers::subnet`], public-ip [`peers::public_ip`], VtepMAC
/// [`peers::vtep_mac`], VNI 1.
pub fn peer_node(i: usize) -> Value {
    let annotations: serde_json::Map<String, Value> =
        flannel_annotations(&peers::vtep_mac(i), &peers::public_ip(i).to_string())
            .into_iter()
            .filter_map(|(k, v)| Some((k, Value::String(v?))))
            .collect();
    node_with(
        &peer_name(i),
        &[&peers::subnet(i).to_string()],
        Value::Object(annotations),
    )
}

/// A flanneld stand-in node.
pub struct FlannelNode {
    pub peer: ReferencePeer,
    pub name: String,
}

impl FlannelNode {
    /// Programs every other node that publishes a VXLAN lease (neighbour,
    /// FDB, route, as flanneld's `handleSubnetEvents` does for each).
    pub fn sync(&self, api: &KubeApi) -> Result<usize> {
        let mut n = 0;
        for node in api.nodes() {
            if node["metadata"]["name"] == self.name.as_str() {
                continue;
            }
            let a = &node["metadata"]["annotations"];
            if a[format!("{PREFIX}/kube-subnet-manager")] != "true" {
                continue;
            }
            let data: Value = serde_json::from_str(
                a[format!("{PREFIX}/backend-data")]
                    .as_str()
                    .context("backend-data")?,
            )?;
            let peer = overlay_agent::datapath::Peer {
                subnet: node["spec"]["podCIDR"]
                    .as_str()
                    .context("podCIDR")?
                    .parse()?,
                public_ip: a[format!("{PREFIX}/public-ip")]
                    .as_str()
                    .context("public-ip")?
                    .parse()?,
                vtep_mac: data["VtepMAC"].as_str().context("VtepMAC")?.parse()?,
                v6: None,
            };
            self.peer.add_peer(&peer)?;
            n += 1;
        }
        Ok(n)
    }
}

/// Waits for a file to exist (subnet.env written by an agent).
pub fn wait_file(path: &Path, limit: Duration) -> Result<()> {
    crate::agent::within(limit, &format!("{} written", path.display()), || {
        path.exists()
    })
    .map(|_| ())
}

/// A node whose annotations are whatever the test says.
pub fn node_with(name: &str, pod_cidrs: &[&str], annotations: Value) -> Value {
    let mut n = simple_node(name, pod_cidrs.first().copied().unwrap_or(""));
    n["spec"]["podCIDRs"] = json!(pod_cidrs);
    if pod_cidrs.is_empty() {
        n["spec"] = json!({});
    }
    n["metadata"]["annotations"] = annotations;
    n
}
