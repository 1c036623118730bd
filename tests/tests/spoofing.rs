//! VXLAN injection from a host that holds no lease.
//!
//! An underlay-only namespace (same L2 as the hosts) gets its own kernel vxlan
//! device with the overlay's VNI and port, an FDB entry pointing at the victim
//! and the source address of a legitimate container, and sends UDP into the
//! victim's container. A flannel host (the iproute2 reference) accepts it (the
//! control: the attack works and the test can fail); an eBPF host drops it,
//! counted as `drop_unknown_vtep`, while its legitimate peer's traffic keeps
//! flowing.

use std::time::Duration;

use anyhow::{Context, ensure};
use overlay_agent::datapath::ebpf::IngressMode;
use overlay_common::counters::Reason;
use overlay_tests::{
    cmd,
    lab::{Lab, LabSpec, Outsider},
    overlay::{Kind, Member, Overlay, mesh},
    traffic::{self, GsoSends, UdpBurst, UdpListener},
};

const ATTACK_PORT: u16 = 7777;
/// Plain spoofed datagrams.
const ATTACK_COUNT: u32 = 50;
/// Then this many UDP GSO sends of `GSO_SEGMENTS` datagrams each.
const GSO_SENDS: u32 = 10;
const GSO_SEGMENTS: u32 = 16;
/// Every spoofed datagram sent.
const ATTACK_TOTAL: u32 = ATTACK_COUNT + GSO_SENDS * GSO_SEGMENTS;

/// Turns the outsider into a rogue VTEP aimed at `victim`, impersonating
/// `impersonated`'s container address.
fn arm_attacker(
    x: &Outsider,
    victim: &Member,
    impersonated: &Member,
    overlay: Overlay,
) -> anyhow::Result<()> {
    let ns = x.ns.as_str();
    let dev = overlay.device();
    cmd::ip(
        ns,
        &[
            "link",
            "add",
            &dev,
            "type",
            "vxlan",
            "id",
            &overlay.vni.to_string(),
            "local",
            &x.underlay_ip.to_string(),
            "dev",
            &x.underlay_dev,
            "dstport",
            &overlay.port.to_string(),
            "nolearning",
        ],
    )?;
    cmd::ip(ns, &["link", "set", &dev, "up"])?;
    let spoofed = format!("{}/32", impersonated.host.container_ip);
    cmd::ip(ns, &["addr", "add", &spoofed, "dev", &dev])?;
    let gw = victim.host.subnet.network().to_string();
    let mac = victim.vtep_mac().to_string();
    cmd::ip(
        ns,
        &[
            "neigh",
            "replace",
            &gw,
            "lladdr",
            &mac,
            "dev",
            &dev,
            "nud",
            "permanent",
        ],
    )?;
    cmd::run(
        None,
        &[
            "bridge",
            "-n",
            ns,
            "fdb",
            "replace",
            &mac,
            "dev",
            &dev,
            "dst",
            &victim.host.underlay_ip.to_string(),
            "self",
            "permanent",
        ],
    )?;
    cmd::ip(
        ns,
        &[
            "route",
            "replace",
            &victim.host.subnet.to_string(),
            "via",
            &gw,
            "dev",
            &dev,
            "onlink",
        ],
    )?;
    Ok(())
}

/// Runs the attack against a victim of `kind`; returns how many spoofed
/// datagrams reached the victim's container and the unknown-VTEP drop delta.
fn attack(name: &str, kind: Kind) -> anyhow::Result<(usize, Option<u64>)> {
    let lab = Lab::build(&LabSpec::new(name, 2).with_outsider())?;
    let overlay = Overlay::default();
    let victim = Member::join(lab.host(1), kind, overlay)?;
    let legit = Member::join(lab.host(2), Kind::Reference, overlay)?;
    mesh(&[&victim, &legit])?;
    let x = lab.outsider().context("lab has no outsider")?.clone();
    arm_attacker(&x, &victim, &legit, overlay)?;

    // Resolve the victim's neighbours first, so what follows measures the
    // datapath, not ARP.
    traffic::ping(&legit.host.container_ns, victim.host.container_ip, 3)?;
    let drops_before = victim
        .counters()?
        .map(|c| c.get(Reason::DropUnknownVtep).packets);

    let listener = UdpListener::start(
        &victim.host.container_ns,
        victim.host.container_ip,
        ATTACK_PORT,
    )?;
    let attacker = {
        let (ns, spoofed, dst) = (
            x.ns.clone(),
            legit.host.container_ip,
            victim.host.container_ip,
        );
        std::thread::spawn(move || {
            traffic::udp_send(
                &ns,
                Some(spoofed),
                dst,
                ATTACK_PORT,
                ATTACK_COUNT,
                Duration::from_millis(10),
            )?;
            // Then GSO buffers, which can reach the victim's ingress as
            // UDP-tunnel aggregates: the filter must hold for those too.
            traffic::udp_send_gso(
                &ns,
                Some(spoofed),
                dst,
                ATTACK_PORT,
                GsoSends {
                    first_seq: ATTACK_COUNT,
                    sends: GSO_SENDS,
                    segments: GSO_SEGMENTS,
                    segment_size: 1000,
                },
            )
        })
    };
    // The legitimate peer keeps working during the attack.
    traffic::udp_burst(
        &legit.host.container_ns,
        &victim.host.container_ns,
        victim.host.container_ip,
        7778,
        UdpBurst {
            count: 500,
            rate: 1000,
            ..UdpBurst::default()
        },
    )
    .context("legitimate UDP during the attack")?;
    attacker.join().expect("attacker thread panicked")?;
    traffic::ping(&legit.host.container_ns, victim.host.container_ip, 5)
        .context("legitimate ping after the attack")?;
    // Let the last spoofed datagram arrive (or not) before counting.
    std::thread::sleep(Duration::from_millis(300));
    let received = listener.finish()?;
    let drops_after = victim
        .counters()?
        .map(|c| c.get(Reason::DropUnknownVtep).packets);
    let drops = drops_before.zip(drops_after).map(|(b, a)| a - b);
    eprintln!(
        "victim {kind}: {} of {ATTACK_TOTAL} spoofed datagrams reached the container (from {:?}), drop_unknown_vtep +{drops:?}",
        received.len(),
        received.first()
    );
    drop((victim, legit));
    lab.destroy()?;
    Ok((received.len(), drops))
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn spoofed_vxlan_reaches_a_flannel_host() -> anyhow::Result<()> {
    // The control: without our filtering, the attack is delivered in full.
    let (received, _) = attack("sref", Kind::Reference)?;
    ensure!(
        received == ATTACK_TOTAL as usize,
        "only {received}/{ATTACK_TOTAL} spoofed datagrams reached a flannel host: the attack setup is broken"
    );
    Ok(())
}

fn ebpf_drops(name: &str, ingress: IngressMode) -> anyhow::Result<()> {
    let (received, drops) = attack(name, Kind::Ebpf(ingress))?;
    ensure!(
        received == 0,
        "{received} spoofed datagrams reached the eBPF host's container"
    );
    let drops = drops.context("eBPF victim has no counters")?;
    // One count per plain datagram, and at least one per GSO send (an
    // aggregate is one packet to the program).
    let min = u64::from(ATTACK_COUNT + GSO_SENDS);
    ensure!(
        drops >= min,
        "drop_unknown_vtep rose by {drops}, expected at least {min}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn spoofed_vxlan_is_dropped_by_ebpf_tc() -> anyhow::Result<()> {
    ebpf_drops("stc", IngressMode::Tc)
}

#[test]
#[ignore = "needs root, network namespaces and eBPF: run `cargo xtask test`"]
fn spoofed_vxlan_is_dropped_by_ebpf_xdp() -> anyhow::Result<()> {
    ebpf_drops("sxdp", IngressMode::XdpAndTc)
}
