//! What flanneld shares with us, byte for byte: the network config and its
//! validation, the lease key and JSON, `subnet.env`, Go's JSON rules, the
//! VTEP MAC, and `mk-docker-opts.sh`'s output. Nothing here talks to etcd,
//! the API server or the kernel.

pub mod config;
pub mod docker_opts;
pub mod gojson;
pub mod lease;
pub mod mac;
pub mod subnet_env;
