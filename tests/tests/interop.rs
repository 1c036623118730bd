//! Interoperability matrix: every pair carries ping, a 100 MB TCP transfer
//! whose SHA-256 matches on both ends, and a paced UDP burst received complete
//! and intact, in both directions.
//!
//! The iproute2 reference peer is programmed with flannel's own commands (no
//! code of ours), so passing against it is what "drop-in replacement" means on
//! the wire.

use overlay_agent::datapath::ebpf::IngressMode;
use overlay_tests::{
    lab::{Lab, LabSpec},
    overlay::{Kind, Member, Overlay, mesh},
    scenario::{Workload, both_ways},
};

fn pair(name: &str, a: Kind, b: Kind) -> anyhow::Result<()> {
    let lab = Lab::build(&LabSpec::new(name, 2))?;
    let overlay = Overlay::default();
    let m1 = Member::join(lab.host(1), a, overlay)?;
    let m2 = Member::join(lab.host(2), b, overlay)?;
    mesh(&[&m1, &m2])?;
    for report in both_ways(&m1.host, &m2.host, &Workload::default())? {
        eprintln!("{a} <-> {b}: {report}");
    }
    // The datapaths must be dropped (detached, devices removed) before the lab.
    drop((m1, m2));
    lab.destroy()
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn ebpf_tc_with_ebpf_tc() -> anyhow::Result<()> {
    pair(
        "ietet",
        Kind::Ebpf(IngressMode::Tc),
        Kind::Ebpf(IngressMode::Tc),
    )
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn ebpf_xdp_with_ebpf_xdp() -> anyhow::Result<()> {
    pair(
        "iexex",
        Kind::Ebpf(IngressMode::XdpAndTc),
        Kind::Ebpf(IngressMode::XdpAndTc),
    )
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn ebpf_tc_with_iproute2_reference() -> anyhow::Result<()> {
    pair("ietr", Kind::Ebpf(IngressMode::Tc), Kind::Reference)
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn ebpf_xdp_with_iproute2_reference() -> anyhow::Result<()> {
    pair("iexr", Kind::Ebpf(IngressMode::XdpAndTc), Kind::Reference)
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn kernel_fallback_with_iproute2_reference() -> anyhow::Result<()> {
    pair("ikr", Kind::Kernel, Kind::Reference)
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn ebpf_tc_with_kernel_fallback() -> anyhow::Result<()> {
    // A mixed cluster: one node fell back to the kernel datapath.
    pair("ietk", Kind::Ebpf(IngressMode::Tc), Kind::Kernel)
}
