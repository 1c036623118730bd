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
        let r = traffic::tcp_transfer(
            &src.container_ns,
            &dst.container_ns,
            dst.container_ip,
            5001,
            100 * MB,
        )?;
        eprintln!(
            "tcp {} -> {}: {} bytes in {:?}",
            src.index,
            dst.index,
            r.bytes_received,
            t.elapsed()
        );
        let u = traffic::udp_burst(
            &src.container_ns,
            &dst.container_ns,
            dst.container_ip,
            5002,
            UdpBurst::default(),
        )?;
        eprintln!(
            "udp {} -> {}: {}/{}",
            src.index, dst.index, u.received, u.sent
        );
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

/// Internet checksum over `data`.
fn csum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 64, proto, 0, 0];
    h[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = csum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

fn eth(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::from(dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(payload);
    f
}

/// A VXLAN frame like the kernel's: ICMP echo inside, UDP checksum 0.
fn vxlan_frame(vni: u32, inner_ip: Vec<u8>) -> Vec<u8> {
    let inner = eth([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1], &inner_ip);
    let mut vx = vec![0x08, 0, 0, 0];
    vx.extend_from_slice(&(vni << 8).to_be_bytes());
    vx.extend_from_slice(&inner);
    let mut udp = vec![0x9c, 0x40, 0x21, 0x18, 0, 0, 0, 0];
    udp[4..6].copy_from_slice(&((8 + vx.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&vx);
    let outer = ipv4([192, 168, 64, 1], [192, 168, 64, 2], 17, &udp);
    eth([2, 0, 0, 0, 1, 2], [2, 0, 0, 0, 1, 1], &outer)
}

fn icmp_echo() -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
    icmp.extend_from_slice(&[0xab; 32]);
    let c = csum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4([10, 5, 1, 2], [10, 5, 2, 2], 1, &icmp)
}

fn write_pcap(path: &std::path::Path, frames: &[Vec<u8>]) -> std::io::Result<()> {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    for v in [0u32, 0, 65535, 1] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for (i, f) in frames.iter().enumerate() {
        for v in [1_700_000_000u32, i as u32, f.len() as u32, f.len() as u32] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(f);
    }
    std::fs::write(path, out)
}

#[test]
#[ignore = "needs tshark: run `cargo xtask test`"]
fn tshark_checks_can_fail() -> anyhow::Result<()> {
    use overlay_tests::capture;
    let good = vxlan_frame(1, icmp_echo());
    let mut bad_outer_checksum = good.clone();
    bad_outer_checksum[14 + 10] ^= 0xff;
    let mut truncated_inner = icmp_echo();
    truncated_inner.truncate(12);
    let truncated = vxlan_frame(1, truncated_inner);
    let other_vni = vxlan_frame(7, icmp_echo());
    let path = std::env::temp_dir().join(format!("{}tshark.pcap", prefix_for("tshark")));
    write_pcap(&path, &[good, bad_outer_checksum, truncated, other_vni])?;
    let problems = capture::problems(&path, 8472);
    let frames = capture::vxlan_frames(&path, 8472);
    let _ = std::fs::remove_file(&path);
    let problems = problems?;
    let frames = frames?;
    eprintln!("problems: {problems:?}");
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].starts_with("frame 2: "), "{problems:?}");
    assert!(problems[1].starts_with("frame 3: "), "{problems:?}");
    assert_eq!(frames.len(), 4);
    assert_eq!(frames[0].vni, 1);
    assert_eq!(frames[0].vxlan_flags, 0x0800);
    assert_eq!(frames[0].udp_dst, 8472);
    assert_eq!(frames[0].udp_src, 40000);
    assert_eq!(frames[0].outer_ttl, 64);
    assert!(!frames[0].outer_df);
    assert_eq!(frames[0].inner_eth_src, "02:00:00:00:00:01");
    assert_eq!(frames[0].inner_eth_dst, "02:00:00:00:00:02");
    assert_eq!(frames[0].outer_eth_src, "02:00:00:00:01:01");
    assert_eq!(frames[0].inner_src, Some("10.5.1.2".parse()?));
    assert_eq!(frames[3].vni, 7);
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn dropping_an_ebpf_node_detaches_and_unloads_its_programs() -> anyhow::Result<()> {
    use overlay_agent::datapath::ebpf::IngressMode;
    use overlay_tests::{
        cmd,
        overlay::{Kind, Member, Overlay},
        stats::attachments,
    };
    let lab = Lab::build(&LabSpec::new("drop", 1))?;
    let m = Member::join(
        lab.host(1),
        Kind::Ebpf(IngressMode::XdpAndTc),
        Overlay::default(),
    )?;
    let ids = m.node().unwrap().program_ids()?.expect("program ids");
    let att = attachments(&lab.host(1).ns)?;
    assert!(!att.is_empty(), "nothing attached after setup");
    let all = [Some(ids.egress), Some(ids.ingress_tc), ids.ingress_xdp];
    for id in all.iter().flatten() {
        cmd::run(None, &["bpftool", "prog", "show", "id", &id.to_string()])?;
    }
    drop(m);
    let att = attachments(&lab.host(1).ns)?;
    assert!(att.is_empty(), "still attached after drop: {att:?}");
    let links = cmd::ip(&lab.host(1).ns, &["-o", "link", "show"])?;
    assert!(
        !links.contains("flannel.1"),
        "flannel.1 left after drop: {links}"
    );
    for id in all.iter().flatten() {
        // The kernel frees a program once its last link and fd are gone
        // (after an RCU grace period, hence the short wait).
        let gone = (0..50).any(|_| {
            let gone = cmd::run(None, &["bpftool", "prog", "show", "id", &id.to_string()]).is_err();
            if !gone {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            gone
        });
        assert!(gone, "program {id} still loaded after the node was dropped");
    }
    lab.destroy()
}
