//! The overlay agent as a library; `main.rs` is the daemon and its
//! subcommands on top of it.
//!
//! - flannel's formats and rules: [`config`], [`lease`], [`subnet_env`],
//!   [`alloc`], [`gojson`], [`mac`];
//! - the control plane: [`etcd`] (config, leases, the watch) and
//!   [`reconcile`], which drives a datapath from the leases;
//! - [`datapath`]: the eBPF and kernel-vxlan datapaths behind one interface;
//! - the host: [`netlink`], [`iface`], [`ipmasq`], [`notify`], [`netns`];
//! - the operator's side: [`cli`], [`health`], [`inspect`] (`status`),
//!   [`cleanup`], and the subcommands on top of them, [`commands`];
//! - [`daemon`]: the agent itself, its stages from config to the running
//!   loop, as a library (`main.rs` only parses flags and dispatches).

pub mod alloc;
pub mod cleanup;
pub mod cli;
pub mod commands;
pub mod compat_flags;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod docker_opts;
pub mod etcd;
pub mod gojson;
pub mod health;
pub mod iface;
pub mod inspect;
pub mod ipmasq;
pub mod lease;
pub mod lease_check;
pub mod mac;
pub mod netlink;
pub mod netns;
pub mod notify;
pub mod reconcile;
pub mod subnet_env;
