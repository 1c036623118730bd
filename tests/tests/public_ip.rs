//! `--public-ip` on a node behind NAT, as flanneld means it: the lease's
//! `PublicIP` is the NAT's address, while `flannel.<VNI>`'s `local` (and so
//! the outer source of everything the node sends, on both datapaths) is the
//! interface's own address, which the NAT translates. A device a flanneld
//! stand-in created that way is adopted, not re-created.
//!
//! Host 2 sits behind a NAT namespace: its only link is `lan0`
//! (192.168.50.2) to the NAT, which owns 10.98.0.102 on the hosts' switch,
//! masquerades what host 2 sends and forwards VXLAN arriving for
//! 10.98.0.102 to 192.168.50.2.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use overlay_tests::{
    agent::{Agent, Cluster, Containers, add_container, sh, within},
    capture::{Capture, vxlan_frames},
};

const CONFIG: &str = r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "SubnetMin": "10.0.1.0","SubnetMax": "10.0.20.0", "Backend": {"Type": "vxlan"}}"#;
const PUBLIC: &str = "10.98.0.102";
const LAN: &str = "192.168.50.2";

/// A namespace deleted on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.0]);
    }
}

fn run(ns: &str, args: &str) -> Result<String> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend(args.split_whitespace());
    sh(&v)
}

/// Puts host 2 behind a NAT namespace (see the module docs).
fn put_behind_nat(sw: &str, h2: &str, nat: &str) -> Result<()> {
    sh(&["ip", "netns", "add", nat])?;
    run(
        sw,
        &format!("ip link add pn type veth peer name wan0 netns {nat}"),
    )?;
    run(sw, "ip link set pn master br0 up")?;
    run(nat, &format!("ip addr add {PUBLIC}/24 dev wan0"))?;
    run(nat, "ip link set wan0 up")?;
    run(nat, "ip link set lo up")?;
    run(h2, "ip addr flush dev eth0")?;
    run(h2, "ip link set eth0 down")?;
    run(
        nat,
        &format!("ip link add lan1 type veth peer name lan0 netns {h2}"),
    )?;
    run(nat, "ip addr add 192.168.50.1/24 dev lan1")?;
    run(nat, "ip link set lan1 up")?;
    run(h2, &format!("ip addr add {LAN}/24 dev lan0"))?;
    run(h2, "ip link set lan0 up")?;
    run(h2, "ip route add default via 192.168.50.1")?;
    run(nat, "sysctl -qw net.ipv4.ip_forward=1")?;
    run(nat, "iptables -t nat -A POSTROUTING -o wan0 -j MASQUERADE")?;
    run(
        nat,
        &format!(
            "iptables -t nat -A PREROUTING -i wan0 -p udp --dport 8472 -j DNAT --to-destination {LAN}"
        ),
    )?;
    Ok(())
}

/// The outer sources of the VXLAN frames host 2 sends on `lan0` while c2
/// pings c1, checking the pings answer.
fn outer_sources_from_h2(
    h2: &str,
    c2: &str,
    ip1: &str,
    pcap: &std::path::Path,
) -> Result<Vec<String>> {
    let cap = Capture::start(h2, "lan0", "udp port 8472", pcap)?;
    sh(&[
        "ip", "netns", "exec", c2, "ping", "-c5", "-i0.2", "-W1", ip1,
    ])
    .context("c2 -> c1 through the NAT")?;
    let pcap = cap.stop()?;
    let frames = vxlan_frames(&pcap, 8472)?;
    let sent: Vec<String> = frames
        .iter()
        .filter(|f| f.outer_dst.to_string() == "10.98.0.1")
        .map(|f| f.outer_src.to_string())
        .collect();
    ensure!(!sent.is_empty(), "no VXLAN frame left host 2: {frames:?}");
    Ok(sent)
}

#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn behind_nat_the_lease_has_the_public_ip_and_the_device_the_interface_address() -> Result<()> {
    let cluster = Cluster::start("pi", 2, CONFIG)?;
    let Cluster { hosts, etcd, bin } = &cluster;
    let dir = etcd.dir().to_path_buf();
    let (h1, h2) = (hosts.ns(1), hosts.ns(2));
    let nat = Netns(format!("{h2}n"));
    put_behind_nat(&hosts.sw(), &h2, &nat.0)?;

    // flanneld's device on host 2: local is the interface address.
    run(
        &h2,
        &format!(
            "ip link add flannel.1 type vxlan id 1 local {LAN} dev lan0 dstport 8472 nolearning"
        ),
    )?;
    run(&h2, "ip link set flannel.1 up")?;
    let ifindex = || -> Result<String> {
        let out = run(&h2, "ip -o link show flannel.1")?;
        Ok(out.split(':').next().unwrap_or_default().trim().to_owned())
    };
    let before = ifindex()?;

    let h2_args = |datapath: &str| {
        vec![
            format!("--etcd-endpoints={}", etcd.endpoints()),
            format!("-iface={LAN}"),
            format!("--public-ip={PUBLIC}"),
            format!("--subnet-file={}", dir.join("h2.env").display()),
            datapath.to_owned(),
        ]
    };
    let mut a1 = Agent::start(&dir, "h1", &h1, bin, &cluster.args(1, &["--datapath=ebpf"]))?;
    let mut a2 = Agent::start(&dir, "h2", &h2, bin, &h2_args("--datapath=ebpf"))?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    a2.wait_for("running: lease", Duration::from_secs(20))?;
    ensure!(
        a2.log().contains("flannel.1 (Adopted)") && ifindex()? == before,
        "flanneld's device was not adopted as it is:\n{}",
        a2.log()
    );
    let detail = run(&h2, "ip -d link show flannel.1")?;
    ensure!(
        detail.contains(&format!("local {LAN}")),
        "device local is not the interface address: {detail}"
    );
    let leases = etcd.etcdctl(&["get", "--prefix", "/coreos.com/network/subnets"])?;
    ensure!(
        leases.contains(&format!("\"PublicIP\":\"{PUBLIC}\"")),
        "no lease with PublicIP {PUBLIC}:\n{leases}"
    );

    let (c1, ip1) = add_container(hosts, 1, &dir.join("h1.env"))?;
    let mut containers = Containers(vec![c1.clone()]);
    let (c2, ip2) = add_container(hosts, 2, &dir.join("h2.env"))?;
    containers.0.push(c2.clone());
    within(
        Duration::from_secs(5),
        "c1 reaches c2 through the NAT",
        || sh(&["ip", "netns", "exec", &c1, "ping", "-c1", "-W1", &ip2]).is_ok(),
    )
    .with_context(|| format!("{}\n{}", a1.log(), a2.log()))?;
    let ebpf = outer_sources_from_h2(&h2, &c2, &ip1, &dir.join("ebpf.pcap"))?;
    ensure!(
        ebpf.iter().all(|s| s == LAN),
        "the eBPF datapath sent from {ebpf:?}, not from {LAN}"
    );

    // The kernel datapath adopts the same device and sends from it too.
    drop(a2);
    let mut a2 = Agent::start(&dir, "h2-kernel", &h2, bin, &h2_args("--datapath=kernel"))?;
    a2.wait_for("running: lease", Duration::from_secs(20))?;
    ensure!(
        a2.log().contains("flannel.1 (Adopted)") && ifindex()? == before,
        "the kernel datapath re-created the device:\n{}",
        a2.log()
    );
    let kernel = outer_sources_from_h2(&h2, &c2, &ip1, &dir.join("kernel.pcap"))?;
    ensure!(
        kernel.iter().all(|s| s == LAN),
        "the kernel datapath sent from {kernel:?}, not from {LAN}"
    );
    sh(&[
        "ip", "netns", "exec", &c1, "ping", "-c3", "-i0.2", "-W1", &ip2,
    ])
    .context("c1 -> c2 on the kernel datapath")?;
    drop(a2);
    drop(a1);
    drop(containers);
    Ok(())
}
