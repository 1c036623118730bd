//! `cargo xtask bench`: the same two-host lab in every mode (host network,
//! plain routing, kernel vxlan, eBPF with TC or XDP+TC ingress), measured
//! interleaved and repeated with the tools pinned to separate CPUs; medians,
//! ratios paired by round with intervals, the run's noise, the overlay's own
//! CPU, per-program cost, a markdown report, an SVG chart and `--json`.
//! The IPv6 rows (`--family`) measure the same figures in dual-stack labs
//! between the IPv6 addresses, reported in a section of their own.

mod connrate;
mod modes;
mod pin;
mod progcost;
mod report;
mod stats;
mod svg;
mod tools;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use modes::{Family, Mode, ModeLab};
use pin::Pinning;
use report::{Context, Metric, Results};

const USAGE: &str = "\
usage: bench [--quick] [--repeats N] [--duration SECS] [--short-repeats N]
             [--short-duration SECS] [--modes LIST] [--figures LIST] [--udp-rate KPPS]
             [--tcp-rate MBITS] [--rr-flows N] [--crr-clients N] [--family F] [--no-pin]
             [--out DIR] [--json]

  --repeats N      rounds over all modes; TCP throughput (the headline figures) is
                   measured in every round (default 10)
  --duration SECS  length of each TCP throughput measurement (default 10)
  --short-repeats N
                   in how many of the rounds (spread evenly) the other figures are
                   measured (default 4)
  --short-duration SECS
                   length of each of the other measurements (default 3)
  --modes LIST     comma-separated: host,plain,kernel,ebpf-fast,ebpf-tc,ebpf-xdp
                   (default all but ebpf-xdp)
  --figures LIST   comma-separated: tcp1,tcp4,udp,tps,crr,rtt,cpu,progs (default all);
                   e.g. one figure for a long run under `perf record`
  --udp-rate KPPS  offered 64-byte UDP rate of the CPU figure, in thousands of packets
                   per second (default 50; every mode must sustain it)
  --tcp-rate MBITS offered TCP rate of the CPU figure, Mbit/s (default 4000)
  --rr-flows N     concurrent flows of the request/response figure (default 32)
  --crr-clients N  concurrent clients of the connection-rate figure (default 32)
  --family F       ipv4, ipv6 or both (default both): the IPv6 rows are the same figures
                   in dual-stack labs between the IPv6 addresses (host, plain, kernel,
                   ebpf-fast only; no RTT: sockperf 3.7 has no IPv6), reported in their
                   own section; IPv4 keeps its IPv4-only labs
  --no-pin         leave the tools where the scheduler puts them
  --quick          smoke run: 1 round of 1 s per figure; writes to target/bench-partial/
                   unless --out
  --out DIR        where benchmark.md and benchmark.svg go (default: docs/ and the table in
                   README.md for a full run, target/bench-partial/ for a quick or partial one)
  --json           print the results as JSON on stdout";

struct Args {
    repeats: u32,
    secs: u32,
    short_repeats: u32,
    short_secs: u32,
    pin: bool,
    modes: Vec<Mode>,
    figures: Vec<Figure>,
    families: Vec<Family>,
    out: PathBuf,
    update_readme: bool,
    json: bool,
    udp_kpps: u32,
    tcp_mbps: u32,
    rr_flows: usize,
    crr_clients: usize,
}

impl Args {
    /// Whether the figures other than TCP throughput are measured in
    /// `round`: `short_repeats` of the `repeats` rounds, spread evenly.
    fn short_round(&self, round: u32) -> bool {
        let (n, k) = (self.repeats, self.short_repeats.min(self.repeats));
        (round + 1) * k / n > round * k / n
    }
}

fn parse_args(args: &[String]) -> Result<Option<Args>> {
    let mut a = Args {
        repeats: 10,
        secs: 10,
        short_repeats: 4,
        short_secs: 3,
        pin: true,
        modes: Mode::DEFAULT.to_vec(),
        figures: Figure::ALL.to_vec(),
        families: vec![Family::Ipv4, Family::Ipv6],
        out: workspace_root().join("docs"),
        update_readme: true,
        json: false,
        udp_kpps: 50,
        tcp_mbps: 4000,
        rr_flows: 32,
        crr_clients: 32,
    };
    let mut out = None;
    let mut quick = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--quick" => quick = true,
            "--json" => a.json = true,
            "--no-pin" => a.pin = false,
            "--short-repeats" => {
                a.short_repeats = value()?.parse().context("--short-repeats")?;
            }
            "--short-duration" => {
                a.short_secs = value()?.parse().context("--short-duration")?;
            }
            "--crr-clients" => a.crr_clients = value()?.parse().context("--crr-clients")?,
            "--repeats" => a.repeats = value()?.parse().context("--repeats")?,
            "--duration" => a.secs = value()?.parse().context("--duration")?,
            "--out" => out = Some(PathBuf::from(value()?)),
            "--udp-rate" => a.udp_kpps = value()?.parse().context("--udp-rate")?,
            "--tcp-rate" => a.tcp_mbps = value()?.parse().context("--tcp-rate")?,
            "--rr-flows" => a.rr_flows = value()?.parse().context("--rr-flows")?,
            "--figures" => {
                a.figures = value()?
                    .split(',')
                    .map(Figure::parse)
                    .collect::<Result<_>>()?;
            }
            "--family" => a.families = Family::parse_list(value()?)?,
            "--modes" => {
                a.modes = value()?
                    .split(',')
                    .map(Mode::parse)
                    .collect::<Result<_>>()?;
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if quick {
        a.repeats = 1;
        a.secs = 1;
        a.short_repeats = 1;
        a.short_secs = 1;
    }
    a.modes.sort();
    a.modes.dedup();
    a.figures.sort();
    a.figures.dedup();
    // Only a full run (every mode and figure, normal length) may replace the
    // published report and the README table.
    let partial = Mode::DEFAULT.iter().any(|m| !a.modes.contains(m))
        || a.figures.len() < Figure::ALL.len()
        || a.families.len() < 2;
    match out {
        Some(dir) => {
            a.update_readme = false;
            a.out = dir;
        }
        None if quick || partial => {
            a.update_readme = false;
            a.out = workspace_root().join("target/bench-partial");
        }
        None => {}
    }
    if a.repeats == 0
        || a.secs == 0
        || a.short_repeats == 0
        || a.short_secs == 0
        || a.modes.is_empty()
        || a.figures.is_empty()
    {
        bail!("repeats, durations, modes and figures must be non-zero");
    }
    a.short_repeats = a.short_repeats.min(a.repeats);
    if a.udp_kpps == 0
        || a.tcp_mbps == 0
        || !(1..=1000).contains(&a.rr_flows)
        || !(1..=1000).contains(&a.crr_clients)
    {
        bail!("--udp-rate and --tcp-rate must be non-zero, --rr-flows and --crr-clients 1..=1000");
    }
    if a.labs().is_empty() {
        bail!("none of these modes has IPv6 rows (host, plain, kernel, ebpf-fast)");
    }
    Ok(Some(a))
}

impl Args {
    /// About how many seconds the run measures (what the labs' set-up
    /// takes comes on top): the figures of every lab in every round (no RTT
    /// in the IPv6 labs), and the program-cost step of each eBPF lab.
    fn measuring_secs(&self) -> u32 {
        let labs = self.labs();
        let per_lab = |family: Family| -> u32 {
            let secs = |headline: bool, f: &Figure| -> u32 {
                if f.is_headline() != headline || (family == Family::Ipv6 && *f == Figure::Rtt) {
                    0
                } else if headline {
                    f.secs(self.secs)
                } else {
                    f.secs(self.short_secs)
                }
            };
            let headline: u32 = self.figures.iter().map(|f| secs(true, f)).sum();
            let short: u32 = self.figures.iter().map(|f| secs(false, f)).sum();
            self.repeats * headline + self.short_repeats * short
        };
        let ebpf_labs = labs.iter().filter(|(m, _)| m.is_ebpf()).count() as u32;
        let progs = if self.figures.contains(&Figure::Progs) {
            ebpf_labs * 3 * (self.short_secs + 3)
        } else {
            0
        };
        labs.iter().map(|(_, f)| per_lab(*f)).sum::<u32>() + progs
    }

    /// The labs to build, IPv4 ones first: every mode in each family that
    /// has rows for it.
    fn labs(&self) -> Vec<(Mode, Family)> {
        self.families
            .iter()
            .flat_map(|f| {
                self.modes
                    .iter()
                    .filter(|m| m.has_family(*f))
                    .map(|m| (*m, *f))
            })
            .collect()
    }
}

/// The results of each family: the IPv4 rows and the IPv6 rows are
/// reported apart (their ratios compare modes of the same family only).
#[derive(Default)]
struct ByFamily {
    v4: Results,
    v6: Results,
}

impl ByFamily {
    fn get_mut(&mut self, family: Family) -> &mut Results {
        match family {
            Family::Ipv4 => &mut self.v4,
            Family::Ipv6 => &mut self.v6,
        }
    }
}

/// How a lab is named in the log: the mode, with `/ipv6` for the IPv6 rows.
fn tag(mode: Mode, family: Family) -> String {
    match family {
        Family::Ipv4 => mode.name().to_owned(),
        Family::Ipv6 => format!("{}/ipv6", mode.name()),
    }
}

/// What one measurement step runs (the RTT and CPU steps yield two figures
/// each; `Progs` runs once per eBPF mode after the rounds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Figure {
    Tcp1,
    Tcp4,
    Udp,
    Tps,
    Crr,
    Rtt,
    Cpu,
    Progs,
}

impl Figure {
    const ALL: [Figure; 8] = [
        Figure::Tcp1,
        Figure::Tcp4,
        Figure::Udp,
        Figure::Tps,
        Figure::Crr,
        Figure::Rtt,
        Figure::Cpu,
        Figure::Progs,
    ];

    /// The headline figures, measured in every round for `--duration`.
    fn is_headline(self) -> bool {
        matches!(self, Figure::Tcp1 | Figure::Tcp4)
    }

    fn parse(s: &str) -> Result<Figure> {
        Ok(match s {
            "tcp1" => Figure::Tcp1,
            "tcp4" => Figure::Tcp4,
            "udp" => Figure::Udp,
            "tps" => Figure::Tps,
            "crr" => Figure::Crr,
            "rtt" => Figure::Rtt,
            "cpu" => Figure::Cpu,
            "progs" => Figure::Progs,
            _ => bail!("unknown figure {s:?} (tcp1, tcp4, udp, tps, crr, rtt, cpu, progs)"),
        })
    }

    /// About how long one step takes, in seconds, for measurements of `secs`:
    /// each tool also spends about a second starting; the CPU step measures the
    /// idle machine for a while, then runs two loads of `secs` + 2 s; the
    /// program-cost step runs three loads once per eBPF mode (not per round).
    fn secs(self, secs: u32) -> u32 {
        match self {
            Figure::Cpu => report::BACKGROUND_SECS + 2 * secs + 6,
            Figure::Progs => 0,
            _ => secs + 1,
        }
    }
}

use overlay_tests::interrupt::{catch_signals, interrupted};

use overlay_tests::machine::{self, first_line, workspace_root};

fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(args) = parse_args(&argv)? else {
        println!("{USAGE}");
        return Ok(());
    };
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the benchmark builds network namespaces and loads eBPF: run it as root (cargo xtask bench)"
        );
    }
    catch_signals();
    let started = Instant::now();
    let pin = if args.pin {
        Pinning::detect()
    } else {
        Pinning::NONE
    };
    let wanted = args.labs();
    for f in &args.families {
        let without: Vec<&str> = args
            .modes
            .iter()
            .filter(|m| !m.has_family(*f))
            .map(|m| m.name())
            .collect();
        if !without.is_empty() {
            eprintln!(
                "bench: no {} rows for {} (IPv6: host, plain, kernel, ebpf-fast)",
                f.name(),
                without.join(", ")
            );
        }
    }
    eprintln!(
        "bench: modes {}; TCP throughput {} rounds x {} s, other figures {} rounds x {} s; {}: about {} s of measuring",
        wanted
            .iter()
            .map(|(m, f)| tag(*m, *f))
            .collect::<Vec<_>>()
            .join(", "),
        args.repeats,
        args.secs,
        args.short_repeats,
        args.short_secs,
        pin.describe(),
        args.measuring_secs()
    );
    let load_before = loadavg();

    let mut all = ByFamily::default();
    let mut labs = Vec::new();
    for (mode, family) in wanted {
        eprintln!("bench: building the {} lab", tag(mode, family));
        match ModeLab::build(mode, family, pin) {
            Ok(l) => labs.push(l),
            Err(e) => {
                eprintln!("bench: {} lab failed: {e:#}", tag(mode, family));
                all.get_mut(family)
                    .errors
                    .push((mode, format!("lab setup: {e:#}")));
            }
        }
    }

    'rounds: for round in 0..args.repeats {
        // Rotate the order so no mode always runs first (or right after another).
        for i in 0..labs.len() {
            if interrupted() {
                break 'rounds;
            }
            let lab = &labs[(i + round as usize) % labs.len()];
            let results = all.get_mut(lab.family);
            if let Err(e) = measure(lab, &args, round, pin, results) {
                eprintln!(
                    "bench: {} round {}: {e:#}",
                    tag(lab.mode, lab.family),
                    round + 1
                );
                results
                    .errors
                    .push((lab.mode, format!("round {}: {e:#}", round + 1)));
            }
        }
    }
    if args.figures.contains(&Figure::Progs) {
        for lab in labs.iter().filter(|l| l.mode.is_ebpf()) {
            if interrupted() {
                break;
            }
            let results = all.get_mut(lab.family);
            if let Err(e) = prog_costs(lab, &args, pin, results) {
                eprintln!("bench: {} program cost: {e:#}", tag(lab.mode, lab.family));
                results
                    .errors
                    .push((lab.mode, format!("program cost: {e:#}")));
            }
        }
    }
    let stopped = interrupted();

    for lab in labs {
        if lab.mode.is_ebpf() {
            for r in lab.reports() {
                all.get_mut(lab.family).counters.push((lab.mode, r));
            }
        }
        if let Err(e) = lab.destroy() {
            eprintln!("bench: {e:#}");
        }
    }
    if stopped {
        bail!("interrupted; labs torn down, nothing written");
    }

    let ctx = context(&args, pin, load_before, started.elapsed().as_secs_f64());
    let ByFamily { v4: results, v6 } = all;
    let v6 = args.families.contains(&Family::Ipv6).then_some(&v6);
    let md = report::markdown(&results, v6, &ctx);
    // The chart shows the IPv4 rows, or the IPv6 ones of an IPv6-only run.
    let (charted, lab) = match v6 {
        Some(v6) if !args.families.contains(&Family::Ipv4) => (v6, "Two-host lab, IPv6"),
        _ => (&results, "Two-host lab"),
    };
    let chart = svg::chart(
        charted,
        &format!(
            "{lab}, {} (medians of {} rounds of TCP, {} of the rest; one run)",
            ctx.date, ctx.repeats, ctx.short_repeats
        ),
    );
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("benchmark.md"), &md)?;
    std::fs::write(args.out.join("benchmark.svg"), &chart)?;
    if args.update_readme {
        update_readme(&results, v6, &ctx)?;
    }
    if args.families.contains(&Family::Ipv4) {
        eprintln!(
            "\n{}\n{}",
            report::table(&results),
            report::targets(&results)
        );
    }
    if let Some(v6) = v6 {
        eprintln!(
            "\nIPv6 rows:\n{}\n{}",
            report::table(v6),
            report::targets_for(v6, report::TARGETS6)
        );
    }
    eprintln!(
        "bench: wrote {} and benchmark.svg{} in {:.0} s",
        args.out.join("benchmark.md").display(),
        if args.update_readme {
            ", and the table in README.md"
        } else {
            ""
        },
        ctx.wall_secs
    );
    if args.json {
        let mut j = report::json(&results, &ctx);
        if let Some(v6) = v6 {
            j["ipv6"] = report::json_rows(v6, report::TARGETS6);
        }
        println!("{}", serde_json::to_string_pretty(&j)?);
    }
    if results.samples.is_empty() && v6.is_none_or(|r| r.samples.is_empty()) {
        bail!("nothing was measured");
    }
    Ok(())
}

fn measure(
    lab: &ModeLab,
    args: &Args,
    round: u32,
    pin: Pinning,
    results: &mut Results,
) -> Result<()> {
    let ends = lab.endpoints();
    let (c1, dst) = (ends.client_ns.as_str(), ends.server_ip);
    let short_round = args.short_round(round);
    let mode = lab.mode;
    // Whatever was measured is printed even when a later figure fails.
    let mut logged = PrintOnDrop(format!(
        "bench: {:9} r{:<2}",
        tag(mode, lab.family),
        round + 1
    ));
    let line = &mut logged.0;
    for figure in &args.figures {
        if *figure == Figure::Progs || !(figure.is_headline() || short_round) {
            continue;
        }
        if *figure == Figure::Rtt && !tools::rtt_supported(dst) {
            continue;
        }
        let secs = if figure.is_headline() {
            args.secs
        } else {
            args.short_secs
        };
        let mut push = |metric, value| results.push(mode, metric, round, value);
        match figure {
            Figure::Tcp1 | Figure::Tcp4 => {
                let (streams, metric) = if *figure == Figure::Tcp1 {
                    (1, Metric::Tcp1)
                } else {
                    (4, Metric::Tcp4)
                };
                let gbps = tools::tcp_gbps(c1, dst, streams, secs, pin)?;
                push(metric, gbps);
                *line += &format!("  tcp{streams} {gbps:6.2} Gbit/s");
            }
            Figure::Udp => {
                let (pps, sent_pps) = tools::udp_pps(c1, dst, secs, pin)?;
                push(Metric::Udp64, pps / 1e3);
                *line += &format!(
                    "  udp64 {:5.0}/{:5.0} kpps rx/tx",
                    pps / 1e3,
                    sent_pps / 1e3
                );
            }
            Figure::Tps => {
                let tps = tools::rr_tps(&ends, args.rr_flows, secs, pin)?;
                push(Metric::Tps, tps / 1e3);
                *line += &format!("  rr {:5.1} ktps", tps / 1e3);
            }
            Figure::Crr => {
                let c = connrate::conn_rate(&ends, args.crr_clients, secs, pin)?;
                push(Metric::ConnRate, c.per_sec / 1e3);
                *results.failed_connections.entry(mode).or_default() += c.failed;
                *line += &format!("  crr {:5.2} kconn/s", c.per_sec / 1e3);
                if c.failed > 0 {
                    *line += &format!(" ({} failed)", c.failed);
                }
            }
            Figure::Rtt => {
                let rtt = tools::rtt(c1, dst, secs, pin)?;
                push(Metric::RttP50, rtt.p50_us);
                push(Metric::RttP99, rtt.p99_us);
                *line += &format!("  rtt p50 {:6.1} µs p99 {:6.1} µs", rtt.p50_us, rtt.p99_us);
            }
            Figure::Cpu => cpu_step(lab, args, round, secs, pin, results, line)?,
            Figure::Progs => {}
        }
    }
    Ok(())
}

fn cpu_step(
    lab: &ModeLab,
    args: &Args,
    round: u32,
    secs: u32,
    pin: Pinning,
    results: &mut Results,
    line: &mut String,
) -> Result<()> {
    let ends = lab.endpoints();
    let mode = lab.mode;
    let background = tools::background_busy(report::BACKGROUND_SECS)?;
    results.background.push((mode, background));
    *line += &format!("  idle machine {:2.0} % busy", background * 100.0);
    if background > MAX_BACKGROUND {
        // Other work would swamp (and, subtracted, zero) the figures.
        results.errors.push((
            mode,
            format!(
                "CPU step skipped: the machine was {:.0} % busy with no load offered",
                background * 100.0
            ),
        ));
        *line += " (CPU step skipped)";
        return Ok(());
    }
    let offered = f64::from(args.udp_kpps) * 1e3;
    let udp = tools::udp_cpu(&ends, args.udp_kpps * 1000, secs, background, pin)?;
    results.push(mode, Metric::CpuUdp, round, udp.cpu_per_mpkt());
    *line += &format!(
        "  cpu udp {:5.2} s/Mpkt ({:3.0} kpps, {:2.0} % busy)",
        udp.cpu_per_mpkt(),
        udp.rx_pps() / 1e3,
        udp.busy_fraction * 100.0
    );
    if udp.rx_pps() < 0.95 * offered {
        results.errors.push((
            mode,
            format!(
                "UDP at {} kpps not sustained: {:.0} kpps received",
                args.udp_kpps,
                udp.rx_pps() / 1e3
            ),
        ));
    }
    let offered = f64::from(args.tcp_mbps) / 1e3;
    let tcp = tools::tcp_cpu(&ends, args.tcp_mbps, secs, background, pin)?;
    results.push(mode, Metric::CpuTcp, round, tcp.cpu_per_gb());
    *line += &format!(
        "  cpu tcp {:5.2} s/GB ({:4.2} Gbit/s, {:2.0} % busy)",
        tcp.cpu_per_gb(),
        tcp.rx_gbps(),
        tcp.busy_fraction * 100.0
    );
    // Interface bytes include headers, goodput does not: 0.95 is lenient.
    if tcp.rx_gbps() < 0.95 * offered {
        results.errors.push((
            mode,
            format!(
                "TCP at {} Mbit/s not sustained: {:.2} Gbit/s received",
                args.tcp_mbps,
                tcp.rx_gbps()
            ),
        ));
    }
    Ok(())
}

/// Each eBPF program's ns per run in `lab` under the CPU figure's two fixed
/// loads and the connection-rate load, with the kernel's run-time
/// accounting on only for this step.
fn prog_costs(lab: &ModeLab, args: &Args, pin: Pinning, results: &mut Results) -> Result<()> {
    let ends = lab.endpoints();
    let secs = args.short_secs;
    let hosts: Vec<(usize, Vec<u32>)> = lab
        .host_namespaces()
        .into_iter()
        .map(|(i, ns)| progcost::attached_ids(&ns).map(|ids| (i, ids)))
        .collect::<Result<_>>()?;
    anyhow::ensure!(
        hosts.iter().any(|(_, ids)| !ids.is_empty()),
        "bpftool net show found no programs attached in the lab's hosts"
    );
    let _stats = progcost::StatsOn::enable()?;
    let loads: [(&'static str, &dyn Fn() -> Result<()>); 3] = [
        ("UDP 64 B at the CPU figure's rate", &|| {
            tools::udp_cpu(&ends, args.udp_kpps * 1000, secs, 0.0, pin).map(drop)
        }),
        ("one TCP stream at the CPU figure's rate", &|| {
            tools::tcp_cpu(&ends, args.tcp_mbps, secs, 0.0, pin).map(drop)
        }),
        ("connection rate", &|| {
            connrate::conn_rate(&ends, args.crr_clients, secs, pin).map(drop)
        }),
    ];
    let mut line = format!("bench: {:9} program cost:", tag(lab.mode, lab.family));
    for (load, run) in loads {
        line += &format!("\n  {load}:");
        let before: Vec<_> = hosts
            .iter()
            .map(|(i, ids)| (*i, progcost::snapshot(ids)))
            .collect();
        run()?;
        for (i, b) in &before {
            let ids = &hosts.iter().find(|(h, _)| h == i).expect("same hosts").1;
            for c in progcost::delta(*i, b, &progcost::snapshot(ids)) {
                if let Some(ns) = c.ns_per_run() {
                    line += &format!("  h{} {} {ns:.0} ns", c.host, c.name);
                }
                results.prog_costs.push((lab.mode, load, c));
            }
        }
    }
    eprintln!("{line}");
    Ok(())
}

/// Above this busy share of the idle machine the CPU step is not measured.
const MAX_BACKGROUND: f64 = 0.25;

/// Prints the line of a measuring round when dropped (also on an early return).
struct PrintOnDrop(String);

impl Drop for PrintOnDrop {
    fn drop(&mut self) {
        eprintln!("{}", self.0);
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn context(args: &Args, pin: Pinning, load_before: String, wall_secs: f64) -> Context {
    let sockperf = first_line("sockperf", &["--version"]);
    Context {
        date: machine::utc_now(),
        commit: machine::commit(),
        kernel: machine::kernel(),
        cpu: machine::cpu_model(),
        cores: machine::cores(),
        load_before,
        load_after: loadavg(),
        repeats: args.repeats,
        secs: args.secs,
        short_repeats: args.short_repeats,
        short_secs: args.short_secs,
        pinning: pin.describe(),
        tools: format!(
            "{}, {}",
            first_line("iperf3", &["--version"]),
            sockperf.trim_start_matches("sockperf: ")
        ),
        wall_secs,
        udp_kpps: args.udp_kpps,
        tcp_mbps: args.tcp_mbps,
        rr_flows: args.rr_flows,
        crr_clients: args.crr_clients,
    }
}

const README_START: &str = "<!-- bench:start -->";
const README_END: &str = "<!-- bench:end -->";

/// Replaces the benchmark section of README.md with this run's table.
fn update_readme(results: &Results, v6: Option<&Results>, ctx: &Context) -> Result<()> {
    let path = workspace_root().join("README.md");
    let readme = std::fs::read_to_string(&path).context("reading README.md")?;
    let (Some(a), Some(b)) = (readme.find(README_START), readme.find(README_END)) else {
        bail!("README.md has no {README_START} ... {README_END} section");
    };
    let body = format!(
        "{README_START}\nMeasured {} on {} ({} cores, kernel {}, shared with other work: load average {} before, {} after), commit {}, one run: TCP throughput medians of {} interleaved rounds of {} s, the other figures of {} rounds of {} s; {}. Ratios are medians of per-round ratios with a 95 % interval; details, the run's noise and per-program cost in [docs/benchmark.md](docs/benchmark.md).\n\n{}{README_END}",
        ctx.date,
        ctx.cpu,
        ctx.cores,
        ctx.kernel,
        ctx.load_before,
        ctx.load_after,
        ctx.commit,
        ctx.repeats,
        ctx.secs,
        ctx.short_repeats,
        ctx.short_secs,
        ctx.pinning,
        report::table(results) + &v6.map(report::readme_ipv6).unwrap_or_default()
    );
    let updated = format!("{}{body}{}", &readme[..a], &readme[b + README_END.len()..]);
    std::fs::write(&path, updated).context("writing README.md")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Result<Option<Args>> {
        parse_args(&s.split_whitespace().map(String::from).collect::<Vec<_>>())
    }

    #[test]
    fn quick_is_short_and_does_not_touch_docs() {
        let a = args("--quick").unwrap().unwrap();
        assert_eq!((a.repeats, a.secs, a.update_readme), (1, 1, false));
        assert_eq!((a.short_repeats, a.short_secs), (1, 1));
        assert!(a.short_round(0));
        assert!(a.out.ends_with("target/bench-partial"));
        let a = args("--repeats 7").unwrap().unwrap();
        assert_eq!((a.repeats, a.secs, a.update_readme), (7, 10, true));
        assert!(a.out.ends_with("docs"));
        assert!(args("--modes ebpf").is_err());
        assert!(args("--repeats").is_err());
        assert!(args("--bogus").is_err());
        assert!(args("--help").unwrap().is_none());
    }

    #[test]
    fn partial_runs_do_not_touch_docs() {
        let a = args("--modes kernel,plain,kernel,ebpf-tc")
            .unwrap()
            .unwrap();
        assert_eq!(a.modes, [Mode::Plain, Mode::Kernel, Mode::EbpfTc]);
        assert!(!a.update_readme && a.out.ends_with("target/bench-partial"));
        let a = args("--figures rtt,udp,rtt").unwrap().unwrap();
        assert_eq!(a.figures, [Figure::Udp, Figure::Rtt]);
        assert!(!a.update_readme);
        assert!(args("--figures pps").is_err());
        let a = args("--figures rtt --out /tmp/x").unwrap().unwrap();
        assert!(!a.update_readme && a.out.ends_with("/tmp/x"));
        // Leaving out the host network is a partial run too.
        let a = args("--modes plain,kernel,ebpf-tc,ebpf-xdp")
            .unwrap()
            .unwrap();
        assert!(!a.update_readme);
        // Adding the experimental XDP mode is not.
        let a = args("--modes host,plain,kernel,ebpf-fast,ebpf-tc,ebpf-xdp")
            .unwrap()
            .unwrap();
        assert!(a.update_readme);
    }

    #[test]
    fn headline_figures_every_round_the_rest_in_evenly_spread_rounds() {
        let a = args("").unwrap().unwrap();
        assert_eq!(
            (a.repeats, a.secs, a.short_repeats, a.short_secs),
            (10, 10, 4, 3)
        );
        assert_eq!(a.modes, Mode::DEFAULT);
        assert!(a.pin);
        let rounds: Vec<u32> = (0..10).filter(|r| a.short_round(*r)).collect();
        assert_eq!(rounds, [2, 4, 7, 9]);
        let a = args("--short-repeats 5").unwrap().unwrap();
        let rounds: Vec<u32> = (0..10).filter(|r| a.short_round(*r)).collect();
        assert_eq!(rounds, [1, 3, 5, 7, 9]);
        let a = args("--repeats 3 --short-repeats 9").unwrap().unwrap();
        assert_eq!(a.short_repeats, 3);
        assert!((0..3).all(|r| a.short_round(r)));
        let a = args("--repeats 4 --short-repeats 1 --no-pin")
            .unwrap()
            .unwrap();
        assert_eq!((0..4).filter(|r| a.short_round(*r)).count(), 1);
        assert!(!a.pin);
        assert!(Figure::Tcp1.is_headline() && !Figure::Crr.is_headline());
        assert!(args("--short-duration 0").is_err());
    }

    #[test]
    fn family_chooses_the_rows_and_only_both_is_a_full_run() {
        let a = args("").unwrap().unwrap();
        assert_eq!(a.families, [Family::Ipv4, Family::Ipv6]);
        assert!(a.update_readme);
        // Every default mode in IPv4; in IPv6 all but the eBPF host path.
        let labs = a.labs();
        assert_eq!(labs.len(), 5 + 4);
        assert_eq!(labs[0], (Mode::Host, Family::Ipv4));
        assert_eq!(
            labs[5..],
            [
                (Mode::Host, Family::Ipv6),
                (Mode::Plain, Family::Ipv6),
                (Mode::Kernel, Family::Ipv6),
                (Mode::EbpfFast, Family::Ipv6),
            ]
        );
        let a = args("--family ipv4").unwrap().unwrap();
        assert_eq!(a.families, [Family::Ipv4]);
        assert_eq!(a.labs().len(), 5);
        assert!(!a.update_readme && a.out.ends_with("target/bench-partial"));
        let a = args("--quick --family ipv6 --modes kernel,ebpf-fast,ebpf-tc")
            .unwrap()
            .unwrap();
        assert_eq!(
            a.labs(),
            [(Mode::Kernel, Family::Ipv6), (Mode::EbpfFast, Family::Ipv6)]
        );
        assert!(!a.update_readme);
        assert!(args("--family ipv6 --modes ebpf-tc,ebpf-xdp").is_err());
        assert!(args("--family v6").is_err());
        assert!(args("--family").is_err());
        assert_eq!(tag(Mode::Kernel, Family::Ipv6), "kernel/ipv6");
        // The IPv4 rows' time is what it was; the IPv6 labs add theirs
        // (no RTT: 4 rounds x 4 s less per lab).
        assert_eq!(
            args("--family ipv4").unwrap().unwrap().measuring_secs(),
            1736
        );
        assert_eq!(
            args("--family ipv6").unwrap().unwrap().measuring_secs(),
            4 * (10 * 22 + 4 * (30 - 4)) + 18
        );
        assert_eq!(args("").unwrap().unwrap().measuring_secs(), 1736 + 1314);
        assert_eq!(tag(Mode::Kernel, Family::Ipv4), "kernel");
    }

    #[test]
    fn offered_loads_and_new_figures() {
        let a = args("").unwrap().unwrap();
        assert_eq!(
            (a.udp_kpps, a.tcp_mbps, a.rr_flows, a.crr_clients),
            (50, 4000, 32, 32)
        );
        assert_eq!(a.modes.first(), Some(&Mode::Host));
        assert!(a.update_readme);
        let a = args(
            "--udp-rate 20 --tcp-rate 500 --rr-flows 8 --crr-clients 64 --figures cpu,crr,tps",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (a.udp_kpps, a.tcp_mbps, a.rr_flows, a.crr_clients),
            (20, 500, 8, 64)
        );
        assert_eq!(a.figures, [Figure::Tps, Figure::Crr, Figure::Cpu]);
        assert!(args("--udp-rate 0").is_err());
        assert!(args("--rr-flows 0").is_err());
        assert!(args("--crr-clients 0").is_err());
    }
}
