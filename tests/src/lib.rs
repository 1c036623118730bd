//! The lab harness shared by the end-to-end tests (and the `lab`/`bench` binaries).
//!
//! - [`lab`]: hosts, containers and the underlay switch as network namespaces,
//!   removed on drop;
//! - [`netns`]: run Rust code (sync or on a tokio runtime) inside a namespace;
//! - [`cmd`]: run tools inside a namespace, background processes killed on drop;
//! - [`reference`]: a host programmed exactly as flanneld does, with iproute2;
//! - [`node`]: one of our datapaths driven as a library on a thread in a host;
//! - [`overlay`]: members (eBPF, kernel fallback, reference) and the full mesh;
//! - [`scenario`]: the ping/TCP/UDP workload every pair must carry;
//! - [`traffic`]: ping, TCP with SHA-256 on both ends, paced UDP bursts;
//! - [`capture`]: tcpdump on the underlay and tshark's view of the VXLAN;
//! - [`agent`]: hosts on one bridge and `overlay-agent` processes in them;
//! - [`binaries`]: the agent binary, built on demand for tests that run it;
//! - [`docker`]: a real dockerd in a host's namespace, with a busybox image;
//! - [`image`]: the runtime image `cargo xtask image` builds, for that dockerd to load;
//! - [`kubelet`]: a manifest's pod template translated to `docker run`, as a kubelet would run it;
//! - [`cni`]: pods made as a Kubernetes node makes them: the CNI plugins from
//!   kube-flannel's conflist, flannel's meta-plugin reading subnet.env;
//! - [`stats`]: device statistics and attached BPF programs;
//! - [`http`]: the agent's health and metrics endpoints;
//! - [`peer_check`]: a host with thousands of peers converged to exactly the expected entries, once each;
//! - [`peers`]: thousands of flannel-format leases of other nodes, written in transactions;
//! - [`route_watch`]: a namespace's vxlan routes as netlink announces them, timestamped;
//! - [`rx_csum`]: a sender whose packets arrive as if a NIC had verified their checksums;
//! - [`interrupt`]: Ctrl-C and SIGTERM for the benchmark binaries;
//! - [`kube_api`]: a Kubernetes API server stand-in (nodes, pods; LIST/WATCH/PATCH) for kube mode;
//! - [`kube_cluster`]: Kubernetes-mode clusters: hosts, the API stand-in, Nodes, agents as the DaemonSet runs them, a flanneld node;
//! - [`machine`]: where a benchmark ran (commit, CPU, kernel), for the reports.

pub mod agent;
pub mod binaries;
pub mod capture;
pub mod cmd;
pub mod cni;
pub mod docker;
pub mod dual_stack;
pub mod etcd;
pub mod frames;
pub mod http;
pub mod image;
pub mod interrupt;
pub mod kube_api;
pub mod kube_cluster;
pub mod kubelet;
pub mod lab;
pub mod machine;
pub mod netns;
pub mod node;
pub mod overlay;
pub mod peer_check;
pub mod peers;
pub mod reference;
pub mod route_watch;
pub mod rx_csum;
pub mod scenario;
pub mod stats;
pub mod traffic;
