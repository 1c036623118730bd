//! A NIC's checksum verdict on a VXLAN packet covers its outer UDP header
//! (and its checksum may be 0, which checks nothing) and, only if the NIC
//! parses VXLAN, the inner packet's too. After decapsulating, the receiver
//! must lower the verdict by one, as the kernel's UDP tunnel receive does, or
//! the stack takes an inner checksum nobody verified as good.
//!
//! Host 2 sends UDP from its container to host 1's, every other datagram
//! with a wrong UDP checksum; [`ClaimedChecksums`] on host 2's underlay makes
//! them arrive as a NIC that verified one checksum (the outer) or two (outer
//! and inner) reports them. With one claimed, host 1's container must get
//! only the good datagrams and count the others as `InCsumErrors`, in both
//! ingress modes: on the TC path `bpf_skb_adjust_room` removes the outer
//! headers and the program lowers the level; on the XDP path XDP removes them
//! before the skb exists and the TC program lowers the level of the skb the
//! driver built. With two claimed, the NIC's verdict on the inner checksum
//! stands and the bad datagrams get through too. The kernel's vxlan device on
//! host 1 decides the same in both cases. The control, in every round: a bad
//! datagram to host 1's own address (no VXLAN) is delivered with the claim, so
//! the claim reaches host 1 and the test can fail (before the fix, the XDP
//! path delivered every bad datagram with one level claimed).
//!
//! The sender is our eBPF datapath: it sends UDP checksum 0, and these
//! datagrams (from a raw socket) leave as CHECKSUM_NONE, as a NIC's skb
//! starts out, which the claim turns into CHECKSUM_UNNECESSARY. flannel's vxlan device fills in the outer checksum
//! by offload (CHECKSUM_PARTIAL), which a veth hands on as is and a receiver
//! on the same machine takes as data that never left memory, whatever is
//! claimed.

use std::{net::Ipv4Addr, os::fd::FromRawFd, time::Duration};

use anyhow::{Context, Result, ensure};
use overlay_agent::datapath::{ebpf::IngressMode, fastpath::FastPathMode};
use overlay_tests::{
    cmd, frames,
    lab::{Lab, LabSpec},
    netns,
    overlay::{Kind, Member, Overlay, mesh},
    rx_csum::ClaimedChecksums,
    traffic::{self, UdpListener},
};

const PORT: u16 = 7000;
const CONTROL_PORT: u16 = 7001;
/// Good datagrams come from this port, bad ones from the next.
const GOOD_SPORT: u16 = 41000;
const BAD_SPORT: u16 = 41001;
const EACH: usize = 20;

/// What host 1 made of one round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Round {
    good: usize,
    bad: usize,
    csum_errors: u64,
}

/// UDP/IPv4 datagrams with the given checksums, sent from a raw socket in
/// `ns` (the kernel leaves a raw socket's UDP header alone): `(source port,
/// right checksum)` each.
fn send_raw(
    ns: &str,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    port: u16,
    which: Vec<(u16, bool)>,
) -> Result<()> {
    netns::run_in(ns, move || {
        // SAFETY: plain socket calls with valid buffers and addresses.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP);
            ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let _close = std::os::fd::OwnedFd::from_raw_fd(fd);
            let mut to: libc::sockaddr_in = std::mem::zeroed();
            to.sin_family = libc::AF_INET as u16;
            to.sin_addr.s_addr = u32::from(dst).to_be();
            for (i, (sport, right)) in which.into_iter().enumerate() {
                let mut seg =
                    frames::udp(src.octets(), dst.octets(), (sport, port), &[i as u8; 32]);
                if !right {
                    // One off; from 0xffff down, as up would make it 0 ("no
                    // checksum").
                    let c = u16::from_be_bytes([seg[6], seg[7]]);
                    let bad = if c == 0xffff { c - 1 } else { c + 1 };
                    seg[6..8].copy_from_slice(&bad.to_be_bytes());
                }
                let n = libc::sendto(
                    fd,
                    seg.as_ptr().cast(),
                    seg.len(),
                    0,
                    (&raw const to).cast(),
                    size_of::<libc::sockaddr_in>() as u32,
                );
                ensure!(
                    n == seg.len() as isize,
                    "sendto: {}",
                    std::io::Error::last_os_error()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        }
    })
}

/// `Udp: ... InCsumErrors` from the namespace's /proc/net/snmp.
fn udp_csum_errors(ns: &str) -> Result<u64> {
    let snmp = cmd::run_in(ns, &["cat", "/proc/net/snmp"])?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (
        udp.next().context("Udp header")?,
        udp.next().context("Udp values")?,
    );
    let col = names
        .split_whitespace()
        .position(|n| n == "InCsumErrors")
        .context("no InCsumErrors")?;
    Ok(values
        .split_whitespace()
        .nth(col)
        .context("short line")?
        .parse()?)
}

fn by_port(received: &[std::net::SocketAddr], port: u16) -> usize {
    received.iter().filter(|a| a.port() == port).count()
}

/// Builds the two hosts with host 1 as `victim`, then one round per claimed
/// level in `levels`.
fn rounds(name: &str, victim: Kind, levels: &[u8]) -> Result<Vec<Round>> {
    let lab = Lab::build(&LabSpec::new(name, 2))?;
    let overlay = Overlay::default();
    let v = Member::join_with(lab.host(1), victim, overlay, FastPathMode::Off)?;
    let s = Member::join_with(
        lab.host(2),
        Kind::Ebpf(IngressMode::Tc),
        overlay,
        FastPathMode::Off,
    )?;
    mesh(&[&v, &s])?;
    let (h1, h2) = (&v.host, &s.host);
    traffic::ping(&h2.container_ns, h1.container_ip, 3)?;
    traffic::ping(&h2.ns, h1.underlay_ip, 1)?;

    let mut out = Vec::new();
    for &levels in levels {
        let claim = ClaimedChecksums::attach(&h2.ns, &h2.underlay_dev, levels)?;
        let control = UdpListener::start(&h1.ns, h1.underlay_ip, CONTROL_PORT)?;
        send_raw(
            &h2.ns,
            h2.underlay_ip,
            h1.underlay_ip,
            CONTROL_PORT,
            vec![(BAD_SPORT, false); 3],
        )?;
        std::thread::sleep(Duration::from_millis(200));
        let control = control.finish()?;
        ensure!(
            by_port(&control, BAD_SPORT) == 3,
            "{victim}, {levels} level(s) claimed: {} of 3 bad plain datagrams reached host 1 (the claim does not arrive)",
            by_port(&control, BAD_SPORT)
        );

        let errors_before = udp_csum_errors(&h1.container_ns)?;
        let listener = UdpListener::start(&h1.container_ns, h1.container_ip, PORT)?;
        let which = (0..EACH)
            .flat_map(|_| [(GOOD_SPORT, true), (BAD_SPORT, false)])
            .collect();
        send_raw(
            &h2.container_ns,
            h2.container_ip,
            h1.container_ip,
            PORT,
            which,
        )?;
        std::thread::sleep(Duration::from_millis(300));
        let received = listener.finish()?;
        drop(claim);
        let round = Round {
            good: by_port(&received, GOOD_SPORT),
            bad: by_port(&received, BAD_SPORT),
            csum_errors: udp_csum_errors(&h1.container_ns)? - errors_before,
        };
        eprintln!("{victim}, {levels} level(s) claimed: {round:?}");
        if let Some(c) = v.counters()? {
            eprintln!("  counters: {c}");
        }
        out.push(round);
    }
    drop((v, s));
    lab.destroy()?;
    Ok(out)
}

/// One claimed level: the bad inner checksums are caught; two: believed.
fn expect(victim: Kind, got: &[Round]) -> Result<()> {
    let caught = Round {
        good: EACH,
        bad: 0,
        csum_errors: EACH as u64,
    };
    let believed = Round {
        good: EACH,
        bad: EACH,
        csum_errors: 0,
    };
    ensure!(
        got == [caught, believed],
        "{victim}: {got:?}, expected [one level: {caught:?}, two levels: {believed:?}]"
    );
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn tc_decapsulation_hands_on_only_the_outer_checksum_verdict() -> Result<()> {
    let victim = Kind::Ebpf(IngressMode::Tc);
    expect(victim, &rounds("cstc", victim, &[1, 2])?)
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn xdp_decapsulation_hands_on_only_the_outer_checksum_verdict() -> Result<()> {
    let victim = Kind::Ebpf(IngressMode::XdpAndTc);
    expect(victim, &rounds("csxdp", victim, &[1, 2])?)
}

#[test]
#[ignore = "needs root and network namespaces: run `cargo xtask test`"]
fn the_kernel_vxlan_device_decides_the_same() -> Result<()> {
    let victim = Kind::Reference;
    expect(victim, &rounds("csref", victim, &[1, 2])?)
}
