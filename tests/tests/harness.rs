//! The lab itself: two hosts programmed by the iproute2 reference peer (no code
//! of ours in the datapath) carry ping, TCP and UDP between their containers,
//! and a lab leaves nothing behind, also when the test using it panics.

use overlay_tests::{
    lab::{Lab, LabSpec, namespaces_with_prefix, prefix_for},
    reference::ReferencePeer,
    traffic::{self, UdpBurst},
};

const MB: u64 = 1 << 20;

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn reference_peers_carry_ping_tcp_udp_both_ways() -> anyhow::Result<()> {
    let lab = Lab::build(&LabSpec::new("refref", 2))?;
    let (h1, h2) = (lab.host(1).clone(), lab.host(2).clone());
    let a = ReferencePeer::setup(&h1, 1, 8472)?;
    let b = ReferencePeer::setup(&h2, 1, 8472)?;
    a.add_peer(&b.as_peer())?;
    b.add_peer(&a.as_peer())?;
    for (src, dst) in [(&h1, &h2), (&h2, &h1)] {
        traffic::ping(&src.container_ns, dst.container_ip, 10)?;
        let t = std::time::Instant::now();
        let r = traffic::tcp_transfer(&src.container_ns, &dst.container_ns, dst.container_ip, 5001, 100 * MB)?;
        eprintln!("tcp {} -> {}: {} bytes in {:?}", src.index, dst.index, r.bytes_received, t.elapsed());
        let u = traffic::udp_burst(&src.container_ns, &dst.container_ns, dst.container_ip, 5002, UdpBurst::default())?;
        eprintln!("udp {} -> {}: {}/{}", src.index, dst.index, u.received, u.sent);
    }
    lab.destroy()
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn lab_is_removed_even_when_the_test_panics() -> anyhow::Result<()> {
    let prefix = prefix_for("panic");
    let outcome = std::panic::catch_unwind(|| {
        let lab = Lab::build(&LabSpec::new("panic", 2).with_outsider()).unwrap();
        assert_eq!(namespaces_with_prefix(lab.prefix()).unwrap().len(), 6);
        panic!("deliberate failure inside a lab");
    });
    assert!(outcome.is_err());
    assert_eq!(namespaces_with_prefix(&prefix)?, Vec::<String>::new());
    Ok(())
}
