//! Nothing of ours filters traffic the running datapath does not maintain:
//! an agent that moves from `xdp+tc` to `tc` ingress detaches its pinned XDP
//! program, and one started with `--datapath kernel` after an eBPF run
//! removes every pin (detaching the programs) and the fast path's mangle
//! rule, while the node keeps forwarding through the kernel's vxlan device.

use std::{path::Path, time::Duration};

use anyhow::{Result, ensure};
use overlay_tests::{
    agent::{Agent, Bpffs, Cluster, Containers, add_container, sh, within},
    stats::attachments,
};

const CONFIG: &str = r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "SubnetMin": "10.0.1.0","SubnetMax": "10.0.20.0", "Backend": {"Type": "vxlan"}}"#;

/// Every pin under `dir` (recursively), as paths relative to it.
fn pins(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(dir) {
                out.push(rel.display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn ingress_changes_and_kernel_fallback_leave_no_program_of_ours_attached() -> Result<()> {
    let cluster = Cluster::start("fb", 2, CONFIG)?;
    let Cluster { hosts, etcd, bin } = &cluster;
    let dir = etcd.dir().to_path_buf();
    let bpf1 = Bpffs::mount(dir.join("bpf1"))?;
    let pins1 = bpf1.0.join("overlay");
    let pin_dir = format!("--bpf-pin-dir={}", pins1.display());
    let h1 = hosts.ns(1);
    let mut a2 = Agent::start(
        &dir,
        "h2",
        &hosts.ns(2),
        bin,
        &cluster.args(2, &["--datapath=kernel"]),
    )?;
    a2.wait_for("running: lease", Duration::from_secs(20))?;

    // 1. eBPF with XDP+TC ingress, pinned, with a pod on the fast path.
    let xdp_args = cluster.args(1, &["--datapath=ebpf", "--ebpf-ingress=xdp+tc", &pin_dir]);
    let mut a1 = Agent::start(&dir, "h1-xdp", &h1, bin, &xdp_args)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    let (c1, _) = add_container(hosts, 1, &dir.join("h1.env"))?;
    let mut containers = Containers(vec![c1.clone()]);
    let (c2, ip2) = add_container(hosts, 2, &dir.join("h2.env"))?;
    containers.0.push(c2);
    within(Duration::from_secs(5), "c1 reaches c2", || {
        sh(&["ip", "netns", "exec", &c1, "ping", "-c1", "-W1", &ip2]).is_ok()
    })?;
    within(
        Duration::from_secs(5),
        "the fast path on the pod veth",
        || {
            pins(&pins1)
                .iter()
                .any(|p| p.starts_with("links/veth_from_pod-"))
        },
    )?;
    ensure!(
        pins(&pins1).contains(&"links/vxlan_ingress_xdp".to_owned()),
        "{:?}",
        pins(&pins1)
    );
    a1.kill9()?;

    // 2. Restarted with TC ingress: the XDP program goes.
    let tc_args = cluster.args(1, &["--datapath=ebpf", "--ebpf-ingress=tc", &pin_dir]);
    let mut a1 = Agent::start(&dir, "h1-tc", &h1, bin, &tc_args)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    ensure!(
        !pins(&pins1).contains(&"links/vxlan_ingress_xdp".to_owned()),
        "{:?}",
        pins(&pins1)
    );
    let att = attachments(&h1)?;
    ensure!(att.xdp.is_empty(), "XDP still attached: {:?}", att.xdp);
    let ping = sh(&[
        "ip", "netns", "exec", &c1, "ping", "-c", "5", "-i", "0.1", "-W", "1", &ip2,
    ])?;
    ensure!(ping.contains("5 received"), "{ping}");
    a1.kill9()?;

    // 3. Started with the kernel datapath: no pin, no program of ours, no
    // mangle rule; the pods still reach each other through flannel.1.
    let kernel_args = cluster.args(1, &["--datapath=kernel", &pin_dir]);
    let mut a1 = Agent::start(&dir, "h1-kernel", &h1, bin, &kernel_args)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    ensure!(
        pins(&pins1).is_empty(),
        "pins left for the kernel datapath: {:?}\n{}",
        pins(&pins1),
        a1.log()
    );
    // TCX (by the kernel's query: this bpftool cannot list TCX links), XDP
    // and classic tc, on every interface of the host.
    let att = attachments(&h1)?;
    ensure!(
        att.is_empty(),
        "still attached for the kernel datapath: {att:?}"
    );
    let mangle = sh(&["ip", "netns", "exec", &h1, "iptables", "-t", "mangle", "-S"])?;
    ensure!(!mangle.contains("FLANNEL-FASTPATH"), "{mangle}");
    let ping = sh(&[
        "ip", "netns", "exec", &c1, "ping", "-c", "5", "-i", "0.1", "-W", "1", &ip2,
    ])?;
    ensure!(ping.contains("5 received"), "{ping}");
    drop((a1, a2));
    drop(containers);
    Ok(())
}
