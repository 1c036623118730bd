//! What the dual-stack tests share: ping6 and an agent's flags.

use std::path::Path;

use crate::{
    agent::{Hosts, sh},
    etcd::Etcd,
};

/// Whether one ping6 from `ns` to `dst` is answered within a second.
pub fn ping6(ns: &str, dst: &str) -> bool {
    sh(&[
        "ip", "netns", "exec", ns, "ping", "-6", "-c", "1", "-W", "1", dst,
    ])
    .is_ok()
}

/// Host `i`'s agent flags: etcd, its address as `--iface`, `h<i>.env` next
/// to etcd's data, the datapath, and pins under `bpf/h<i>`.
pub fn agent_args(etcd: &Etcd, hosts: &Hosts, bpf: &Path, i: usize, dp: &str) -> Vec<String> {
    vec![
        format!("--etcd-endpoints={}", etcd.endpoints()),
        format!("--iface={}", hosts.ip(i)),
        format!(
            "--subnet-file={}",
            etcd.dir().join(format!("h{i}.env")).display()
        ),
        format!("--datapath={dp}"),
        format!("--bpf-pin-dir={}", bpf.join(format!("h{i}")).display()),
    ]
}
