//! The overlay agent as a library; `main.rs` is the daemon and its
//! subcommands on top of it. The folders follow the data's way, leases in,
//! datapath out:
//!
//! - [`flannel`]: flanneld's formats and rules (config, lease key and JSON,
//!   subnet.env, Go's JSON, the VTEP MAC, mk-docker-opts);
//! - [`subnet`]: where leases come from, behind one shape: [`subnet::etcd`]
//!   and [`subnet::kube`] (`--kube-subnet-mgr`), with the checks every
//!   peer's lease passes and the allocator;
//! - [`daemon`]: the agent itself, its stages from config to the running
//!   loop, and the reconciler that drives a datapath from the leases;
//! - [`datapath`]: the eBPF and kernel-vxlan datapaths behind one interface;
//! - the host: [`netlink`], [`iface`], [`ipmasq`], [`notify`], [`netns`],
//!   [`instance_lock`] (one agent per pin directory and subnet file);
//! - the operator's side: [`cli`], [`health`], [`inspect`] (`status`),
//!   [`printable`] (strings from etcd or the API server, escaped for logs),
//!   [`cleanup`], and the subcommands on top of them, [`commands`].
//!
//! A layer imports only from below: `flannel` from nothing else, the host
//! from `flannel`, `subnet` and `datapath` from those two; the host's errors
//! are its own types, which `datapath` maps into `DatapathError`. A test
//! (`layering`) scans the sources for imports against the flow.

pub mod cleanup;
pub mod cli;
pub mod commands;
pub mod daemon;
pub mod datapath;
pub mod flannel;
pub mod health;
pub mod iface;
pub mod inspect;
pub mod instance_lock;
pub mod ipmasq;
#[cfg(test)]
mod layering;
pub mod netlink;
pub mod netns;
pub mod notify;
pub mod printable;
pub mod subnet;
