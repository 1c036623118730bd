//! A flanneld command line starts the agent unchanged: every flanneld flag
//! that does nothing here is accepted with one warning naming it (also from
//! its `FLANNELD_*` variable), klog's `-v=2` turns on debug logging,
//! `--iface-can-reach` picks the interface of the route to that address,
//! and `--kube-subnet-mgr` without any way to the API server (no flags, not
//! in a pod) stops the agent with a clear error.

use std::time::Duration;

use anyhow::{Result, ensure};
use overlay_tests::agent::{Agent, Cluster, sh, within};

const CONFIG: &str = r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "Backend": {"Type": "vxlan"}}"#;

#[test]
#[ignore = "needs root, network namespaces and etcd: run `cargo xtask test`"]
fn a_flanneld_command_line_starts_the_agent() -> Result<()> {
    let cluster = Cluster::start("ff", 2, CONFIG)?;
    let Cluster { hosts, etcd, bin } = &cluster;
    let dir = etcd.dir().to_path_buf();
    let h1 = hosts.ns(1);
    // Host 1's default route leaves through another interface, so only
    // --iface-can-reach leads the agent to eth0.
    for cmd in [
        "link add ext0 type veth peer name ext0p",
        "addr add 172.31.0.1/24 dev ext0",
        "link set ext0p up",
        "link set ext0 up",
        "route add default dev ext0",
    ] {
        let mut v = vec!["ip", "-n", h1.as_str()];
        v.extend(cmd.split_whitespace());
        sh(&v)?;
    }
    let args: Vec<String> = [
        format!("-etcd-endpoints={}", etcd.endpoints()),
        "-etcd-prefix=/coreos.com/network".into(),
        format!("-subnet-file={}", dir.join("h1.env").display()),
        format!("-iface-can-reach={}", hosts.ip(2)),
        "-ip-masq".into(),
        "-iptables-resync=5".into(),
        "-subnet-lease-renew-margin=60".into(),
        "-kube-api-url=https://10.96.0.1:443".into(),
        "-kubeconfig-file=/etc/kubernetes/kubeconfig".into(),
        "-kube-annotation-prefix=flannel.alpha.coreos.com".into(),
        "-net-config-path=/etc/kube-flannel/net-conf.json".into(),
        "-set-node-network-unavailable=true".into(),
        "-ip-blackhole-route".into(),
        "-v=2".into(),
        "-vmodule=main=3".into(),
        "-log_backtrace_at=main.go:1".into(),
        "-logtostderr".into(),
        "--datapath=kernel".into(),
    ]
    .into();
    let mut a1 = Agent::start_with_env(
        &dir,
        "h1",
        &h1,
        bin,
        &args,
        &[("FLANNELD_PUBLIC_IPV6", "2001:db8::1"), ("RUST_LOG", "")],
    )?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    let log = a1.log();
    for flag in [
        "--kube-api-url",
        "--kubeconfig-file",
        "--kube-annotation-prefix",
        "--net-config-path",
        "--set-node-network-unavailable",
        "--ip-blackhole-route",
        "--public-ipv6",
        "--vmodule",
        "--log_backtrace_at",
        "--logtostderr",
    ] {
        let warned = log
            .lines()
            .filter(|l| {
                l.contains(" WARN ") && l.contains(flag) && l.contains("has no effect here")
            })
            .count();
        ensure!(
            warned == 1,
            "{flag}: {warned} warnings, expected one:\n{log}"
        );
    }
    ensure!(log.contains(" DEBUG "), "-v=2 gave no debug lines:\n{log}");
    ensure!(
        log.contains(&format!("using interface eth0 ({})", hosts.ip(1))),
        "--iface-can-reach did not pick eth0:\n{log}"
    );
    drop(a1);

    // --kube-subnet-mgr outside a pod and without --kube-api-url or
    // --kubeconfig-file cannot reach any API server: a clear error.
    let mut a2 = Agent::start(
        &dir,
        "h2",
        &hosts.ns(2),
        bin,
        &cluster.args(2, &["--kube-subnet-mgr"]),
    )?;
    within(Duration::from_secs(10), "the agent exits", || {
        a2.exited().is_some()
    })?;
    ensure!(a2.exited() == Some(1), "exit code {:?}", a2.exited());
    ensure!(
        a2.log().contains(
            "neither --kube-api-url nor --kubeconfig-file was given, and the in-cluster configuration cannot be used"
        ),
        "{}",
        a2.log()
    );
    Ok(())
}
