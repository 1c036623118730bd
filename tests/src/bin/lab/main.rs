//! `cargo xtask lab`: brings up two hosts joined by our eBPF datapath, pings
//! container to container both ways, shows what was set up and what the
//! programs counted, and tears everything down.

use anyhow::{Context, Result, bail, ensure};
use overlay_agent::datapath::ebpf::IngressMode;
use overlay_tests::{
    lab::{Lab, LabSpec, namespaces_with_prefix},
    overlay::{self, Kind, Member, Overlay},
    stats, traffic,
};

const USAGE: &str = "\
usage: lab [--ingress tc|xdp] [--pings N]

Builds a two-host lab (network namespaces), runs our eBPF datapath on both hosts,
pings container to container in both directions, prints the set-up and the eBPF
counters, and removes everything.

  --ingress tc|xdp  decapsulate in TC alone (default) or in XDP with a TC redirect
  --pings N         pings per direction (default 5)";

fn main() -> Result<()> {
    let mut ingress = IngressMode::Tc;
    let mut pings = 5u32;
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            "--ingress" => {
                ingress = match it.next().map(String::as_str) {
                    Some("tc") => IngressMode::Tc,
                    Some("xdp") => IngressMode::XdpAndTc,
                    other => bail!("--ingress takes tc or xdp, not {other:?}"),
                }
            }
            "--pings" => {
                pings = it
                    .next()
                    .context("--pings needs a number")?
                    .parse()
                    .context("--pings")?;
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    // SAFETY: geteuid cannot fail.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the lab creates network namespaces and loads eBPF: run it as root (cargo xtask lab)"
    );

    let lab = Lab::build(&LabSpec::new("lab", 2))?;
    let prefix = lab.prefix().to_owned();
    let result = run(&lab, ingress, pings);
    // Members are gone (dropped inside `run`); now the namespaces.
    let cleanup = lab.destroy();
    let left = namespaces_with_prefix(&prefix)?;
    match (&result, &cleanup) {
        (_, Err(e)) => eprintln!("lab: cleanup: {e:#}"),
        _ if left.is_empty() => println!("\ntorn down: no namespace named {prefix}* is left"),
        _ => println!("\nleft behind: {left:?}"),
    }
    result.and(cleanup)
}

fn run(lab: &Lab, ingress: IngressMode, pings: u32) -> Result<()> {
    let overlay = Overlay::default();
    let (h1, h2) = (lab.host(1), lab.host(2));
    println!(
        "lab: 2 hosts on underlay 192.168.64.0/24 (switch namespace {}), VNI {}, UDP port {}, eBPF ingress {ingress}",
        lab.switch_ns(),
        overlay.vni,
        overlay.port
    );
    let members = [
        Member::join(h1, Kind::Ebpf(ingress), overlay)?,
        Member::join(h2, Kind::Ebpf(ingress), overlay)?,
    ];
    overlay::mesh(&members.iter().collect::<Vec<_>>())?;

    for m in &members {
        let h = &m.host;
        println!("\nhost {} (namespace {})", h.index, h.ns);
        println!(
            "  underlay {} {}   lease {}   {} VTEP MAC {}",
            h.underlay_dev,
            h.underlay_ip,
            h.subnet,
            m.device,
            m.vtep_mac()
        );
        println!(
            "  container {} (namespace {}) behind cni0 {}",
            h.container_ip, h.container_ns, h.gateway
        );
        let att = stats::attachments(&h.ns)?;
        for (dev, id) in &att.xdp {
            println!("  XDP on {dev}: program id {id}");
        }
        for ((dev, dir), progs) in att.tcx.iter().filter(|(_, p)| !p.is_empty()) {
            println!("  TCX {dir} on {dev}: {}", progs.join(", "));
        }
        let routes = overlay_tests::cmd::ip(&h.ns, &["route", "show", "dev", &m.device])?;
        for r in routes.lines() {
            println!("  route: {r}");
        }
    }

    let before: Vec<_> = members
        .iter()
        .map(|m| stats::dev_stats(&m.host.ns, &m.device))
        .collect::<Result<_>>()?;
    println!();
    for (src, dst) in [(h1, h2), (h2, h1)] {
        traffic::ping(&src.container_ns, dst.container_ip, pings)?;
        println!(
            "ping {} -> {}: {pings}/{pings} replies",
            src.container_ip, dst.container_ip
        );
    }

    println!();
    let mut encap_total = 0;
    for (m, before) in members.iter().zip(&before) {
        let counters = m.counters()?.context("an eBPF member has counters")?;
        let dev = stats::dev_stats(&m.host.ns, &m.device)?.since(before);
        println!("host {} eBPF counters: {counters}", m.host.index);
        println!(
            "host {} {} own statistics during the pings: tx {} rx {} packets",
            m.host.index, m.device, dev.tx_packets, dev.rx_packets
        );
        encap_total += counters
            .get(overlay_common::counters::Reason::Encapsulated)
            .packets;
    }
    ensure!(
        encap_total >= u64::from(2 * pings),
        "the eBPF programs encapsulated {encap_total} packets for {} pings: the traffic did not take the eBPF path",
        2 * pings
    );
    Ok(())
}
