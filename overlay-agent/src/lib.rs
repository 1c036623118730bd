//! The overlay agent as a library: the datapaths behind one interface, and
//! (later) the control plane that drives them from etcd.

pub mod alloc;
pub mod cleanup;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod docker_opts;
pub mod etcd;
pub mod gojson;
pub mod health;
pub mod iface;
pub mod inspect;
pub mod ipmasq;
pub mod lease;
pub mod mac;
pub mod netlink;
pub mod netns;
pub mod notify;
pub mod reconcile;
pub mod subnet_env;
