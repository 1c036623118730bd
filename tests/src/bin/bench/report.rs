//! Turning samples into the report: medians per mode and figure, the ratios
//! the targets are stated in (paired by round, with an interval),
//! the overlay's own CPU, the run's noise, and the markdown and JSON forms.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::modes::Mode;
use crate::progcost::ProgCost;
use crate::stats::{Spread, own_cost_ratios, paired_ratios};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    Tcp1,
    Tcp4,
    Udp64,
    Tps,
    ConnRate,
    RttP50,
    RttP99,
    CpuUdp,
    CpuTcp,
}

impl Metric {
    pub const ALL: [Metric; 9] = [
        Metric::Tcp1,
        Metric::Tcp4,
        Metric::Udp64,
        Metric::Tps,
        Metric::ConnRate,
        Metric::RttP50,
        Metric::RttP99,
        Metric::CpuUdp,
        Metric::CpuTcp,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Metric::Tcp1 => "tcp_1_stream_gbps",
            Metric::Tcp4 => "tcp_4_streams_gbps",
            Metric::Udp64 => "udp_64b_rx_kpps",
            Metric::Tps => "tcp_rr_ktps",
            Metric::ConnRate => "tcp_crr_kconn_per_s",
            Metric::RttP50 => "rtt_p50_us",
            Metric::RttP99 => "rtt_p99_us",
            Metric::CpuUdp => "cpu_s_per_mpkt_udp64",
            Metric::CpuTcp => "cpu_s_per_gb_tcp",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Metric::Tcp1 => "TCP, 1 stream (Gbit/s)",
            Metric::Tcp4 => "TCP, 4 streams (Gbit/s)",
            Metric::Udp64 => "UDP 64 B received (kpps)",
            Metric::Tps => "TCP 64 B request/response, concurrent flows (k transactions/s)",
            Metric::ConnRate => {
                "TCP connection rate: connect, 64 B request/response, close; concurrent clients (k connections/s)"
            }
            Metric::RttP50 => "UDP request/response RTT p50, 1 flow (µs)",
            Metric::RttP99 => "UDP request/response RTT p99, 1 flow (µs)",
            Metric::CpuUdp => "CPU, UDP 64 B at a fixed rate (CPU s per M packets)",
            Metric::CpuTcp => "CPU, TCP paced to a fixed rate (CPU s per GB)",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Metric::Tcp1 => "TCP 1 stream",
            Metric::Tcp4 => "TCP 4 streams",
            Metric::Udp64 => "UDP 64 B pps",
            Metric::Tps => "TCP RR, N flows",
            Metric::ConnRate => "TCP connections/s",
            Metric::RttP50 => "RTT p50",
            Metric::RttP99 => "RTT p99",
            Metric::CpuUdp => "CPU / M UDP pkts",
            Metric::CpuTcp => "CPU / GB TCP",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::Tcp1 | Metric::Tcp4 => "Gbit/s",
            Metric::Udp64 => "kpps",
            Metric::Tps => "k trans/s",
            Metric::ConnRate => "k conn/s",
            Metric::RttP50 | Metric::RttP99 => "µs (lower better)",
            Metric::CpuUdp => "CPU s (lower better)",
            Metric::CpuTcp => "CPU s (lower better)",
        }
    }

    pub fn higher_is_better(self) -> bool {
        !matches!(
            self,
            Metric::RttP50 | Metric::RttP99 | Metric::CpuUdp | Metric::CpuTcp
        )
    }
}

/// What a target compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantity {
    /// `mode / baseline` of one figure, paired by round.
    Ratio { metric: Metric, baseline: Mode },
    /// The overlay's own CPU (the mode's minus the host network's) over
    /// kernel vxlan's own, of a CPU figure.
    OwnCpu(Metric),
}

/// A target from the issue: a quantity compared with `bound`.
pub struct Target {
    pub quantity: Quantity,
    /// At least this when higher is better, at most when lower is.
    pub bound: f64,
}

const fn ratio(metric: Metric, baseline: Mode, bound: f64) -> Target {
    Target {
        quantity: Quantity::Ratio { metric, baseline },
        bound,
    }
}

/// The targets of issue 20 ("Performance, round two").
pub const TARGETS: &[Target] = &[
    ratio(Metric::Tcp1, Mode::Plain, 1.00),
    ratio(Metric::Tcp4, Mode::Plain, 1.00),
    ratio(Metric::Tcp1, Mode::Host, 0.90),
    Target {
        quantity: Quantity::OwnCpu(Metric::CpuUdp),
        bound: 0.20,
    },
    Target {
        quantity: Quantity::OwnCpu(Metric::CpuTcp),
        bound: 0.35,
    },
    ratio(Metric::Tps, Mode::Kernel, 1.50),
    ratio(Metric::ConnRate, Mode::Kernel, 1.00),
    ratio(Metric::ConnRate, Mode::Plain, 0.95),
    ratio(Metric::Udp64, Mode::Kernel, 1.70),
];

/// The targets of issue 18 for the IPv6 rows: the eBPF datapath with its
/// fast path against kernel vxlan (`flannel-v6.<VNI>`), both over IPv6.
pub const TARGETS6: &[Target] = &[
    ratio(Metric::Tcp1, Mode::Kernel, 1.10),
    ratio(Metric::Tcp4, Mode::Kernel, 1.10),
    ratio(Metric::Udp64, Mode::Kernel, 1.50),
];

impl Target {
    fn higher_is_better(&self) -> bool {
        match self.quantity {
            Quantity::Ratio { metric, .. } => metric.higher_is_better(),
            Quantity::OwnCpu(_) => false,
        }
    }

    pub fn describe(&self) -> String {
        let op = if self.higher_is_better() {
            "≥"
        } else {
            "≤"
        };
        match self.quantity {
            Quantity::Ratio { metric, baseline } => {
                format!(
                    "{} {op} {:.2}× {}",
                    metric.short(),
                    self.bound,
                    baseline.label()
                )
            }
            Quantity::OwnCpu(metric) => format!(
                "own {} {op} {:.2}× kernel vxlan's own",
                metric.short(),
                self.bound
            ),
        }
    }

    /// The quantity for `mode`, per round.
    pub fn reached(&self, results: &Results, mode: Mode) -> Option<Spread> {
        match self.quantity {
            Quantity::Ratio { metric, baseline } => results.ratio(mode, baseline, metric),
            Quantity::OwnCpu(metric) => results.own_cpu(mode, metric),
        }
    }

    pub fn met(&self, value: f64) -> bool {
        if self.higher_is_better() {
            value >= self.bound
        } else {
            value <= self.bound
        }
    }

    /// "yes" when the whole interval is on the right side of the bound,
    /// "median only" when the median is but the interval is not (the run
    /// cannot tell), "**no**" otherwise.
    pub fn verdict(&self, s: &Spread) -> &'static str {
        if !self.met(s.median) {
            "**no**"
        } else if s.clear_of(self.bound, self.higher_is_better()) {
            "yes"
        } else {
            "median only (interval includes the bound)"
        }
    }
}

/// Everything one benchmark run measured.
#[derive(Default)]
pub struct Results {
    /// `(round, value)` per mode and figure: rounds pair samples of
    /// different modes for the ratios.
    pub samples: BTreeMap<(Mode, Metric), Vec<(u32, f64)>>,
    /// What failed, per mode (a mode that could not be built, or a tool error).
    pub errors: Vec<(Mode, String)>,
    /// The datapaths' counters after the run, per eBPF mode: proof of path.
    pub counters: Vec<(Mode, String)>,
    /// The busy fraction of all CPUs with no load, measured before each CPU
    /// step and subtracted from its figures.
    pub background: Vec<(Mode, f64)>,
    /// Per-program cost per eBPF mode and load (see `progcost`).
    pub prog_costs: Vec<(Mode, &'static str, ProgCost)>,
    /// Connections that failed during the connection-rate figure, per mode.
    pub failed_connections: BTreeMap<Mode, u64>,
}

impl Results {
    pub fn push(&mut self, mode: Mode, metric: Metric, round: u32, value: f64) {
        self.samples
            .entry((mode, metric))
            .or_default()
            .push((round, value));
    }

    fn rounds(&self, mode: Mode, metric: Metric) -> &[(u32, f64)] {
        self.samples.get(&(mode, metric)).map_or(&[], Vec::as_slice)
    }

    pub fn values(&self, mode: Mode, metric: Metric) -> Vec<f64> {
        self.rounds(mode, metric).iter().map(|(_, v)| *v).collect()
    }

    pub fn spread(&self, mode: Mode, metric: Metric) -> Option<Spread> {
        Spread::of(&self.values(mode, metric))
    }

    pub fn median(&self, mode: Mode, metric: Metric) -> Option<f64> {
        self.spread(mode, metric).map(|s| s.median)
    }

    /// `mode / baseline`, one ratio per round both were measured in.
    pub fn ratio(&self, mode: Mode, baseline: Mode, metric: Metric) -> Option<Spread> {
        Spread::of(&paired_ratios(
            self.rounds(mode, metric),
            self.rounds(baseline, metric),
        ))
    }

    /// The mode's CPU above the host network's over kernel vxlan's above it,
    /// one per round all three were measured in.
    pub fn own_cpu(&self, mode: Mode, metric: Metric) -> Option<Spread> {
        Spread::of(&own_cost_ratios(
            self.rounds(mode, metric),
            self.rounds(Mode::Host, metric),
            self.rounds(Mode::Kernel, metric),
        ))
    }

    pub fn modes(&self) -> Vec<Mode> {
        let mut modes: Vec<Mode> = self.samples.keys().map(|(m, _)| *m).collect();
        modes.dedup();
        modes
    }
}

/// What the report says about how and where it was measured.
pub struct Context {
    pub date: String,
    pub commit: String,
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub load_before: String,
    pub load_after: String,
    pub repeats: u32,
    pub secs: u32,
    /// Rounds and seconds of the figures other than TCP throughput.
    pub short_repeats: u32,
    pub short_secs: u32,
    pub pinning: String,
    pub tools: String,
    pub wall_secs: f64,
    /// The offered loads of the CPU figures and the flows of the RR figure.
    pub udp_kpps: u32,
    pub tcp_mbps: u32,
    pub rr_flows: usize,
    pub crr_clients: usize,
}

fn fmt_value(metric: Metric, v: Option<f64>) -> String {
    match v {
        None => "n/a".into(),
        Some(v) => match metric {
            Metric::Tcp1 | Metric::Tcp4 => format!("{v:.2}"),
            Metric::Udp64 | Metric::Tps => format!("{v:.0}"),
            Metric::ConnRate => format!("{v:.1}"),
            Metric::RttP50 | Metric::RttP99 => format!("{v:.1}"),
            Metric::CpuUdp | Metric::CpuTcp => format!("{v:.2}"),
        },
    }
}

/// A ratio's median and its interval: `1.15× (1.02–1.30)`.
fn fmt_ratio(r: Option<Spread>) -> String {
    match r {
        None => "n/a".into(),
        Some(s) if s.n == 1 => format!("{:.2}×", s.median),
        Some(s) => format!("{:.2}× ({:.2}–{:.2})", s.median, s.lo, s.hi),
    }
}

/// The table of medians with the ratios of each eBPF mode, as markdown.
pub fn table(results: &Results) -> String {
    let modes = results.modes();
    let ebpf: Vec<Mode> = modes.iter().copied().filter(|m| m.is_ebpf()).collect();
    let mut head = vec![
        "figure (median; ratios: median of per-round ratios (interval, see below))".to_owned(),
    ];
    head.extend(modes.iter().map(|m| m.label().to_owned()));
    for e in &ebpf {
        let tag = if ebpf.len() > 1 {
            format!(" ({})", e.name())
        } else {
            String::new()
        };
        for base in BASELINES {
            head.push(format!("eBPF/{}{tag}", base.name()));
        }
    }
    let mut out = String::new();
    let _ = writeln!(out, "| {} |", head.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(head.len()));
    for metric in Metric::ALL {
        let mut row = vec![metric.label().to_owned()];
        row.extend(
            modes
                .iter()
                .map(|m| fmt_value(metric, results.median(*m, metric))),
        );
        for e in &ebpf {
            for base in BASELINES {
                row.push(fmt_ratio(results.ratio(*e, base, metric)));
            }
        }
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out
}

/// What the eBPF modes are compared with, in the order of the ratio columns.
pub const BASELINES: [Mode; 3] = [Mode::Kernel, Mode::Plain, Mode::Host];

/// The CPU figures per mode (every mode, not only eBPF) with ratios to kernel
/// vxlan, and the overlay's own CPU (above the host network) as a share of
/// kernel vxlan's own, as markdown.
pub fn cpu_table(results: &Results, ctx: &Context) -> String {
    let mut out = format!(
        "| mode | CPU s per M packets, UDP 64 B at {} kpps | vs kernel vxlan | own CPU per packet vs kernel vxlan's own | CPU s per GB, TCP at {} Mbit/s | vs kernel vxlan | own CPU per GB vs kernel vxlan's own |\n|---|---|---|---|---|---|---|\n",
        ctx.udp_kpps, ctx.tcp_mbps
    );
    for mode in results.modes() {
        let mut row = vec![mode.label().to_owned()];
        for metric in [Metric::CpuUdp, Metric::CpuTcp] {
            row.push(fmt_value(metric, results.median(mode, metric)));
            row.push(fmt_ratio(results.ratio(mode, Mode::Kernel, metric)));
            row.push(if mode == Mode::Host {
                "0 (the floor)".into()
            } else {
                fmt_ratio(results.own_cpu(mode, metric))
            });
        }
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out
}

/// One line per target of issue 20 and eBPF mode: what was reached (median
/// of the per-round values and its interval) and whether it is met.
pub fn targets(results: &Results) -> String {
    targets_for(results, TARGETS)
}

/// [`targets`] for these targets (e.g. [`TARGETS6`] of the IPv6 rows).
pub fn targets_for(results: &Results, targets: &[Target]) -> String {
    let mut out = String::from("| target | eBPF mode | reached | met |\n|---|---|---|---|\n");
    for mode in results.modes().into_iter().filter(|m| m.is_ebpf()) {
        for t in targets {
            let r = t.reached(results, mode);
            let met = r.as_ref().map_or("not measured", |s| t.verdict(s));
            let _ = writeln!(
                out,
                "| {} | {} | {} | {met} |",
                t.describe(),
                mode.name(),
                fmt_ratio(r)
            );
        }
    }
    out
}

/// The host network's spread per figure: how far apart its own samples were
/// in this run, the noise every ratio carries.
pub fn noise_table(results: &Results) -> String {
    let mut out = String::from(
        "| figure | host network min / median / max | spread (max − min) / median | samples |\n|---|---|---|---|\n",
    );
    for metric in Metric::ALL {
        let Some(s) = results.spread(Mode::Host, metric) else {
            continue;
        };
        let _ = writeln!(
            out,
            "| {} | {} / {} / {} | {:.0} % | {} |",
            metric.label(),
            fmt_value(metric, Some(s.min)),
            fmt_value(metric, Some(s.median)),
            fmt_value(metric, Some(s.max)),
            s.relative_spread() * 100.0,
            s.n
        );
    }
    out
}

/// Nanoseconds per run of each program, per eBPF mode and load.
pub fn prog_cost_table(results: &Results) -> String {
    let mut out = String::from(
        "| mode | load | host | program | runs | ns per run |\n|---|---|---|---|---|---|\n",
    );
    for (mode, load, c) in &results.prog_costs {
        let _ = writeln!(
            out,
            "| {} | {load} | {} | `{}` | {} | {} |",
            mode.name(),
            c.host,
            c.name,
            c.runs,
            c.ns_per_run().map_or("–".into(), |ns| format!("{ns:.0}"))
        );
    }
    out
}

/// The report: the IPv4 rows, and with `v6` the IPv6 rows in a section of
/// their own (only those of an IPv6-only run).
pub fn markdown(results: &Results, v6: Option<&Results>, ctx: &Context) -> String {
    let v4 = v6.is_none() || !results.samples.is_empty() || !results.errors.is_empty();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Benchmark: host network vs plain routing vs kernel vxlan vs eBPF\n"
    );
    let _ = writeln!(
        out,
        "Measured {} at commit `{}` by `cargo xtask bench`: one run; TCP throughput in {} interleaved rounds of {} s, the other figures in {} of them, {} s each; {}; {:.0} s in all. \
         Load average before / after: {} / {}; other work on the machine in the same minutes counts in every figure (see the noise below).\n",
        ctx.date,
        ctx.commit,
        ctx.repeats,
        ctx.secs,
        ctx.short_repeats,
        ctx.short_secs,
        ctx.pinning,
        ctx.wall_secs,
        ctx.load_before,
        ctx.load_after,
    );
    if v4 {
        v4_sections(&mut out, results, ctx);
    }
    if let Some(v6) = v6 {
        out.push_str(&ipv6_section(v6, ctx));
    }
    how_measured(&mut out, v6.is_some(), ctx);
    if v4 {
        out.push_str(&samples_table(results));
    }
    out
}

/// The IPv4 rows' table, noise, CPU, program cost, targets, failures and
/// counters.
fn v4_sections(out: &mut String, results: &Results, ctx: &Context) {
    out.push_str(&table(results));
    let _ = write!(
        out,
        "\nValues are medians over the rounds. A ratio is the median of the per-round ratios (both modes measured in the same round, \
         minutes apart at most) with, in brackets, an interval that holds the true median ratio with ≥ 95 % probability when there \
         are at least 6 rounds (order statistics, no distribution assumed); with fewer rounds it is the min–max of the rounds \
         (e.g. 94 % for 5 rounds, nothing for 1). A target is met only if its whole interval is on the right side.\n"
    );
    out.push_str("\n![benchmark chart](benchmark.svg)\n\n## Noise of this run\n\n");
    out.push_str(&noise_table(results));
    out.push_str(
        "\nThe host network has no overlay at all: its spread is the machine's own noise \
         (scheduling on two shared cores, other work). A ratio between modes whose interval \
         is not clear of 1.0 is not a difference this run can show.\n",
    );
    out.push_str("\n## CPU cost at a fixed offered load\n\n");
    out.push_str(&cpu_table(results, ctx));
    let _ = write!(
        out,
        "\nEvery mode carries the same offered load (64-byte UDP at {udp} kpps, one TCP stream paced \
         to {tcp} Mbit/s; both well below the slowest mode's maximum), so the CPU each needs is \
         comparable where the saturating figures above are not. Ratios below 1 mean less CPU than kernel vxlan. \
         **Own CPU** is the part above the host network (no containers, no overlay), the only part a datapath can \
         change: (mode − host) / (kernel vxlan − host), per round; 0 would be an overlay that costs nothing, 1 one \
         that costs what kernel vxlan does. It divides differences of noisy figures, so its interval is wide.\n",
        udp = ctx.udp_kpps,
        tcp = ctx.tcp_mbps
    );
    let bg: Vec<f64> = results.background.iter().map(|(_, b)| b * 100.0).collect();
    if let Some(s) = Spread::of(&bg) {
        let _ = writeln!(
            out,
            "\nThe idle machine, measured for {} s before each CPU step and subtracted from it, was \
             {:.1} / {:.1} / {:.1} % busy (min / median / max over all CPUs).",
            BACKGROUND_SECS, s.min, s.median, s.max
        );
    }
    if !results.prog_costs.is_empty() {
        out.push_str("\n## Per-program cost (kernel BPF run-time statistics)\n\n");
        out.push_str(&prog_cost_table(results));
        out.push_str(
            "\nAfter the rounds, each eBPF lab carries each load again for the figures' length while the kernel's \
             run-time accounting is on (`BPF_ENABLE_STATS`, what `sysctl kernel.bpf_stats_enabled=1` turns on); \
             the table is `run_time_ns / run_cnt` of each program attached in the lab's two hosts \
             (`bpftool prog show` prints the same counters). The accounting is off during the measured figures: \
             it reads the clock twice per run. It covers the program and its helpers, not the work the kernel \
             does after the program returns (the redirect, the transmission of what it encapsulated).\n",
        );
    }
    out.push_str("\n## Targets (issue 20)\n\n");
    out.push_str(&targets(results));
    if !results.errors.is_empty() {
        out.push_str("\n## Failures during the run\n\n");
        for (mode, e) in &results.errors {
            let _ = writeln!(out, "- {}: {}", mode.name(), e.replace('\n', " "));
        }
    }
    if results.failed_connections.values().any(|n| *n > 0) {
        out.push_str("\n## Failed connections (connection-rate figure)\n\n");
        for (mode, n) in &results.failed_connections {
            let _ = writeln!(out, "- {}: {n}", mode.name());
        }
    }
    if !results.counters.is_empty() {
        out.push_str("\n## eBPF counters after the run (proof of path)\n\n");
        for (mode, c) in &results.counters {
            let _ = writeln!(out, "- {}: `{}`", mode.name(), c);
        }
    }
}

fn how_measured(out: &mut String, ipv6: bool, ctx: &Context) {
    let mut text = String::new();
    let _ = write!(
        text,
        "\n## How it was measured\n\n\
         - One lab per mode, built with the test harness: two hosts (network namespaces) on an underlay \
           bridge in a switch namespace, each host with a bridge `cni0` and one container behind a veth \
           (MTU 1450), strict `rp_filter`. Modes: **host network** (host 1 to host 2's underlay address \
           over the same veth pair and switch, no containers, no overlay, MTU 1500: the ceiling no pod \
           path can beat), **plain routing** (each host routes the other's container \
           subnet via its underlay IP: no encapsulation, but the bridge and routing on both hosts), \
           **kernel vxlan** (our `KernelDatapath`: `flannel.1` programmed as flannel does, the kernel's \
           vxlan driver moves packets), **eBPF fast path** (our `EbpfDatapath` as it runs by default: \
           established flows go between the pod's veth and the underlay, encapsulated at the veth and \
           delivered into the pod with `bpf_redirect_peer`), **eBPF host path** (`--fast-path=off`: TC \
           egress encapsulation on `flannel.1`; ingress by TC alone, or XDP decapsulation + TC \
           redirect, both into `flannel.1`; XDP only with `--modes`).\n\
         - All labs are up for the whole run; each round measures every mode in turn, starting with a \
           different mode each round, so slow drifts of the machine spread over all modes, and a ratio \
           compares two modes measured in the same round.\n\
         - Pinning: {pinning}. Every client (iperf3, sockperf, the request/response and connection-rate \
           clients) runs on the client's CPU, every server on the server's. A veth transmit continues on \
           the sending CPU's backlog, so the forward path's softirq (both hosts, the switch) runs on the \
           client's CPU and the reverse path's (ACKs, responses) on the server's: the same split in every \
           mode and round, instead of wherever the scheduler put the tools.\n\
         - Traffic goes from host 1's container to host 2's container (host 1 to host 2 for the host \
           network). TCP: `iperf3 -c … -P 1|4 -t {secs}`, \
           receiver-side goodput. UDP: `iperf3 -u -l 64 -b 0 -t {ssecs}` (sender unthrottled), datagrams \
           that reached the receiving socket per second (`sum_received.packets - lost_packets`); \
           the sending CPU does the whole path in softirq (veth, bridge, routing, datapath, underlay, \
           the other host), so this figure is bound by the sender and rises as the per-packet cost of \
           the path falls. \
           Latency: `sockperf ping-pong -m 64 -t {ssecs} --full-rtt` (UDP, one flow, one message in \
           flight), round-trip percentiles.\n\
         - Request/response rate: {flows} TCP connections (`TCP_NODELAY`), each with one 64-byte \
           request in flight; the server echoes 64 bytes and the client sends the next request when a \
           response arrives. One client thread and one server thread (in the bench process, moved \
           into the two namespaces) serve all flows with `poll(2)`; transactions per second over {ssecs} s \
           after 0.5 s of warm-up. With one flow and one message in flight both ends sleep between \
           messages and the RTT is mostly the scheduler waking a thread on each side; with many flows in \
           flight neither thread sleeps and the rate is the inverse of the CPU a transaction costs.\n\
         - Connection rate: {clients} concurrent clients, each in a loop of connect, one 64-byte request, \
           the 64-byte response, close (the client closes first; the server closes on its FIN), like \
           netperf's TCP_CRR with many clients; one client and one server thread (tokio, one thread \
           each); completed connections per second over {ssecs} s after 0.5 s of warm-up. Every \
           connection pays the handshake, the teardown and a new conntrack entry on each host, and on \
           the eBPF fast path the approvals made and revoked for it, most of which no packet uses. The \
           client's namespace has `tcp_tw_reuse=1` and the ports 1024–65535 so its TIME_WAIT sockets \
           do not exhaust the ephemeral ports; every mode has the same settings.\n\
         - CPU cost at a fixed offered load: `iperf3 -u -l 64 -b <{udp} kpps>` and `iperf3 -b {tcp}M` \
           (one TCP stream, paced by iperf3), run for {ssecs} s + 2 s; after 1 s of warm-up, busy time of \
           **all CPUs** (from `/proc/stat`: the CPUs' time less idle, iowait and steal, exact under NOHZ) \
           over a {ssecs} s window, and the packets and bytes the receiving interface (the receiving \
           container's `eth0`, host 2's `eth0` for the host network) counted in it. The system-wide \
           figure is the CPU of both ends, the switch and the tools together. Reported as CPU seconds \
           per million packets (= CPU µs per packet) and per 10^9 bytes (L2 bytes at the receiving \
           interface). Right before each CPU step the idle machine is measured for {bg} s and its busy \
           share subtracted, so steady background work cancels out (work that comes and goes does not); \
           when it is more than 25 % busy the step is skipped and listed under failures. \
           A mode that did not sustain the offered rate is listed under failures.\n\
         \n\
         ## What these figures can and cannot show\n\n\
         - Both hosts, the switch, the senders, the receivers and all softirq work share this machine's \
           {cores} cores. The figures compare what each datapath costs per packet and per connection on \
           this machine; they are not line rates, and a real NIC's costs are absent.\n\
         - veth links keep TCP's GSO aggregates whole from sender to receiver (no segmentation, no \
           checksums: `CHECKSUM_PARTIAL` travels end to end), so MTU, the 50-byte encapsulation and \
           checksum offloads cost nearly nothing here; on real NICs they matter (tunnel segmentation \
           offload, jumbo frames). What differs between modes here is per-packet work: veth hops, \
           bridges, netfilter, TC programs and helpers.\n\
         - XDP on a veth strips GSO from its peer, so the XDP+TC mode's TCP figures show a veth \
           artefact, not what XDP costs on a NIC.\n\
         - The baselines differ in more than the datapath: the host network uses MTU 1500 and no \
           containers. Every mode's hosts track connections (a NAT rule that matches no lab traffic \
           turns conntrack on, as kube-proxy's or flanneld's `--ip-masq` rules do on a real node); \
           without it only the fast path, whose mangle rule matches on conntrack state, would pay \
           for conntrack, which made its connection rate look about 20 % worse than the host \
           path's on this machine.\n\
         - Throughput figures saturate one of the two CPUs; which one depends on the mode (the sender's \
           for UDP, often the receiver's for TCP). A 5–10 % difference is within one run's noise unless \
           its interval says otherwise; the noise table above says how large it was in this run.\n\
         - The CPU figures subtract an idle measurement taken just before; work that other users start \
           or stop within the window is not subtracted. The own-CPU shares divide two such differences \
           and amplify their noise.\n\
         - The connection rate is bound by the client's and server's CPUs, which also run the handshake \
           and teardown in softirq; it shows what a connection costs each datapath, not a limit of the \
           overlay.\n\n\
         ## Machine\n\n\
         - CPU: {cpu}, {cores} cores\n- kernel: {kernel}\n- tools: {tools}\n\
         - load average before / after: {lb} / {la} (other work on the machine adds noise)\n",
        pinning = ctx.pinning,
        secs = ctx.secs,
        ssecs = ctx.short_secs,
        bg = BACKGROUND_SECS,
        flows = ctx.rr_flows,
        clients = ctx.crr_clients,
        udp = ctx.udp_kpps,
        tcp = ctx.tcp_mbps,
        cpu = ctx.cpu,
        cores = ctx.cores,
        kernel = ctx.kernel,
        tools = ctx.tools,
        lb = ctx.load_before,
        la = ctx.load_after,
    );
    // The IPv6 labs close the list of how it was measured.
    let limits = "\n## What these figures can and cannot show";
    if ipv6 && let Some(at) = text.find(limits) {
        text.insert_str(at, IPV6_METHOD);
    }
    out.push_str(&text);
}

/// The IPv6 labs, for "How it was measured".
const IPV6_METHOD: &str = "- IPv6 rows: one dual-stack lab per mode (host network, plain routing, kernel vxlan, \
     eBPF fast path), built like the IPv4 ones plus IPv6 on the underlay (fd64::1 and fd64::2/64), \
     on `cni0` (fd05:0:0:<host>::1/64) and in the container (fd05:0:0:<host>::2/64, default route via \
     `cni0`), without duplicate address detection; the datapaths run dual stack (`flannel-v6.1` beside \
     `flannel.1`, each peer's IPv6 half programmed as a dual-stack lease has it) and the tools use \
     the IPv6 addresses. These labs are measured in the same rounds as the IPv4 ones, and every host \
     tracks IPv6 connections too (an ip6tables NAT rule for 2001:db8::/32). Plain routing routes the \
     other host's IPv6 subnet via its underlay IPv6 address.\n";

/// Every sample by mode, figure and round.
fn samples_table(results: &Results) -> String {
    let mut out = String::new();
    out.push_str("\n## Samples\n\n| mode | figure | samples (round: value) |\n|---|---|---|\n");
    for ((mode, metric), v) in &results.samples {
        let v: Vec<String> = v
            .iter()
            .map(|(r, x)| format!("{}: {}", r + 1, fmt_value(*metric, Some(*x))))
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            mode.name(),
            metric.key(),
            v.join(", ")
        );
    }
    out
}

/// The IPv6 rows: what they measure, their table, noise, CPU, program
/// cost, the targets of issue 18, failures, counters and samples.
pub fn ipv6_section(v6: &Results, ctx: &Context) -> String {
    let mut out = String::from("\n## IPv6 rows (dual-stack labs)\n\n");
    out.push_str(
        "The same figures between the pods' IPv6 addresses (host to host over the underlay's IPv6 for \
         the host network), each mode in a dual-stack lab of its own: kernel vxlan carries the pods' IPv6 \
         in `flannel-v6.1` over the underlay's IPv6, the eBPF datapath in its IPv6 programs with the IPv6 \
         fast path on. Ratios compare modes of these rows only, measured in the same rounds. The RTT rows \
         are not measured: sockperf 3.7, the tool of that figure, refuses IPv6 addresses.\n\n\
         MTU: the pods' veths have 1450 bytes in both families, the underlay 1500. That is what flannel gives \
         pods over IPv6 too (`FLANNEL_MTU` = underlay − 50 for both families, flannel issue #1781, closed \
         wontfix), although VXLAN over IPv6 costs 70 bytes: the kernel caps `flannel-v6.1` at underlay − 70 \
         (1430). The lab keeps flannel's 1450 so that the pods are configured as on a flannel node and as \
         in the IPv4 rows: a full-sized IPv6 packet from a pod does not fit `flannel-v6.1` and gets an \
         ICMPv6 \"packet too big\" from its node, after which the pod's kernel sends at most 1430 bytes to \
         that destination (for TCP, segments sized for 1430). The host network and plain routing carry no \
         encapsulation and so never meet the limit.\n\n\
         On the sending node, bulk TCP from a pod arrives at the pod's veth as GSO aggregates, which the \
         IPv6 programs hand to the kernel's `flannel-v6.1` (counter `pass_gso_ipv6`): in the TCP rows the \
         eBPF datapath's sending side is the kernel's vxlan path, its receiving side the fast path \
         (`fast_ingress`); single packets (UDP, request/response, ACKs) take the fast path both ways.\n\n",
    );
    out.push_str(&table(v6));
    out.push_str("\n### Noise of the IPv6 rows\n\n");
    out.push_str(&noise_table(v6));
    out.push_str("\n### CPU cost at a fixed offered load (IPv6)\n\n");
    out.push_str(&cpu_table(v6, ctx));
    if !v6.prog_costs.is_empty() {
        out.push_str("\n### Per-program cost (IPv6)\n\n");
        out.push_str(&prog_cost_table(v6));
        out.push_str(
            "\nThe IPv6 programs the attached ones reach by tail calls (`veth_from_pod6`, `veth_encap6`, \
             `veth_to_pod6`, `vxlan_ingress_tc6`) have no attachment of their own: the kernel counts their \
             time in the program that called them. `vxlan_egress6` is attached to `flannel-v6.1`.\n",
        );
    }
    out.push_str("\n### Targets (issue 18, IPv6)\n\n");
    out.push_str(&targets_for(v6, TARGETS6));
    if !v6.errors.is_empty() {
        out.push_str("\n### Failures during the run (IPv6)\n\n");
        for (mode, e) in &v6.errors {
            let _ = writeln!(out, "- {}: {}", mode.name(), e.replace('\n', " "));
        }
    }
    if v6.failed_connections.values().any(|n| *n > 0) {
        out.push_str("\n### Failed connections (IPv6, connection-rate figure)\n\n");
        for (mode, n) in &v6.failed_connections {
            let _ = writeln!(out, "- {}: {n}", mode.name());
        }
    }
    if !v6.counters.is_empty() {
        out.push_str("\n### eBPF counters after the run (IPv6 labs, proof of path)\n\n");
        for (mode, c) in &v6.counters {
            let _ = writeln!(out, "- {}: `{}`", mode.name(), c);
        }
    }
    out.push_str(&samples_table(v6).replace("\n## Samples\n", "\n### Samples (IPv6)\n"));
    out
}

/// The IPv6 rows' table for README.md, below the IPv4 one.
pub fn readme_ipv6(v6: &Results) -> String {
    format!(
        "\nIPv6 rows (dual-stack labs, pod to pod over the underlay's IPv6; no RTT: sockperf 3.7 has no IPv6):\n\n{}",
        table(v6)
    )
}

/// How long the idle machine is measured before each CPU step.
pub const BACKGROUND_SECS: u32 = 2;

fn spread_json(s: Option<Spread>) -> serde_json::Value {
    match s {
        None => serde_json::Value::Null,
        Some(s) => serde_json::json!({
            "n": s.n, "min": s.min, "median": s.median, "max": s.max,
            "interval": [s.lo, s.hi], "interval_coverage": s.coverage,
        }),
    }
}

pub fn json(results: &Results, ctx: &Context) -> serde_json::Value {
    let mut j = serde_json::json!({
        "date": ctx.date, "commit": ctx.commit, "kernel": ctx.kernel, "cpu": ctx.cpu,
        "cores": ctx.cores, "repeats": ctx.repeats, "seconds_per_figure": ctx.secs,
        "short_repeats": ctx.short_repeats, "short_seconds": ctx.short_secs,
        "pinning": ctx.pinning,
        "wall_seconds": ctx.wall_secs,
        "load_average": {"before": ctx.load_before, "after": ctx.load_after},
        "offered_load": {"udp_64b_kpps": ctx.udp_kpps, "tcp_mbps": ctx.tcp_mbps},
        "rr_flows": ctx.rr_flows, "crr_clients": ctx.crr_clients,
    });
    if let (Some(j), serde_json::Value::Object(rows)) =
        (j.as_object_mut(), json_rows(results, TARGETS))
    {
        j.extend(rows);
    }
    j
}

/// What one family's rows measured, as JSON (medians, ratios, `targets`,
/// noise, program cost, failures, counters).
pub fn json_rows(results: &Results, targets: &[Target]) -> serde_json::Value {
    let mut modes = serde_json::Map::new();
    for mode in results.modes() {
        let mut m = serde_json::Map::new();
        for metric in Metric::ALL {
            m.insert(
                metric.key().into(),
                serde_json::json!({
                    "median": results.median(mode, metric),
                    "spread": spread_json(results.spread(mode, metric)),
                    "samples": results.rounds(mode, metric)
                        .iter()
                        .map(|(r, v)| serde_json::json!({"round": r, "value": v}))
                        .collect::<Vec<_>>(),
                }),
            );
        }
        for metric in [Metric::CpuUdp, Metric::CpuTcp] {
            m.insert(
                format!("own_{}_vs_kernel_own", metric.key()),
                spread_json(results.own_cpu(mode, metric)),
            );
        }
        modes.insert(mode.name().into(), m.into());
    }
    let mut ratios = serde_json::Map::new();
    for mode in results.modes() {
        let mut r = serde_json::Map::new();
        for metric in Metric::ALL {
            let mut vs = serde_json::Map::new();
            for base in BASELINES.into_iter().filter(|b| *b != mode) {
                vs.insert(
                    format!("vs_{}", base.name()),
                    spread_json(results.ratio(mode, base, metric)),
                );
            }
            r.insert(metric.key().into(), vs.into());
        }
        ratios.insert(mode.name().into(), r.into());
    }
    let targets: Vec<serde_json::Value> = results
        .modes()
        .into_iter()
        .filter(|m| m.is_ebpf())
        .flat_map(|mode| {
            targets.iter().map(move |t| {
                let r = t.reached(results, mode);
                serde_json::json!({
                    "mode": mode.name(), "target": t.describe(), "reached": spread_json(r),
                    "met": r.map(|s| t.met(s.median)),
                    "interval_clear": r.map(|s| t.met(s.median) && s.clear_of(t.bound, t.higher_is_better())),
                })
            })
        })
        .collect();
    let noise: serde_json::Map<String, serde_json::Value> = Metric::ALL
        .into_iter()
        .map(|m| {
            (
                m.key().to_owned(),
                spread_json(results.spread(Mode::Host, m)),
            )
        })
        .collect();
    serde_json::json!({
        "modes": modes, "ratios": ratios, "targets": targets, "host_noise": noise,
        "prog_costs": results.prog_costs.iter().map(|(m, load, c)| serde_json::json!({
            "mode": m.name(), "load": load, "host": c.host, "program": c.name,
            "runs": c.runs, "run_time_ns": c.run_time_ns, "ns_per_run": c.ns_per_run(),
        })).collect::<Vec<_>>(),
        "failed_connections": results.failed_connections.iter().map(|(m, n)| (m.name().to_owned(), serde_json::json!(n))).collect::<serde_json::Map<_, _>>(),
        "errors": results.errors.iter().map(|(m, e)| serde_json::json!({"mode": m.name(), "error": e})).collect::<Vec<_>>(),
        "counters": results.counters.iter().map(|(m, c)| serde_json::json!({"mode": m.name(), "counters": c})).collect::<Vec<_>>(),
        "idle_machine_busy": results.background.iter().map(|(m, b)| serde_json::json!({"mode": m.name(), "fraction": b})).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context {
        Context {
            date: String::new(),
            commit: String::new(),
            kernel: String::new(),
            cpu: String::new(),
            cores: 2,
            load_before: String::new(),
            load_after: String::new(),
            repeats: 1,
            secs: 1,
            short_repeats: 1,
            short_secs: 1,
            pinning: "client on CPU 0, server on CPU 1".into(),
            tools: String::new(),
            wall_secs: 1.0,
            udp_kpps: 50,
            tcp_mbps: 1000,
            rr_flows: 32,
            crr_clients: 32,
        }
    }

    #[test]
    fn ratios_pair_rounds_and_targets_need_a_clear_interval() {
        let mut r = Results::default();
        for (round, v) in [10.0, 11.0, 12.0].into_iter().enumerate() {
            r.push(Mode::Plain, Metric::Tcp1, round as u32, v);
        }
        for (round, v) in [8.0, 8.0, 9.0].into_iter().enumerate() {
            r.push(Mode::Kernel, Metric::Tcp1, round as u32, v);
        }
        for (round, v) in [10.0, 11.0, 12.6].into_iter().enumerate() {
            r.push(Mode::EbpfTc, Metric::Tcp1, round as u32, v);
        }
        // Per round: 1.0, 1.0, 1.05 -> median 1.0, interval 1.0..1.05.
        let vs_plain = r.ratio(Mode::EbpfTc, Mode::Plain, Metric::Tcp1).unwrap();
        assert_eq!(vs_plain.median, 1.0);
        assert!((vs_plain.hi - 1.05).abs() < 1e-9);
        assert_eq!(
            TARGETS[0].verdict(&vs_plain),
            "median only (interval includes the bound)"
        );
        let vs_kernel = r.ratio(Mode::EbpfTc, Mode::Kernel, Metric::Tcp1).unwrap();
        assert_eq!(vs_kernel.median, 11.0 / 8.0);
        let t = ratio(Metric::Tcp1, Mode::Kernel, 1.1);
        assert_eq!(t.verdict(&vs_kernel), "yes");
        let latency = ratio(Metric::RttP50, Mode::Kernel, 0.9);
        assert!(latency.met(0.8) && !latency.met(0.95));
        let t = targets(&r);
        assert!(
            t.contains(
                "| TCP 1 stream ≥ 1.00× plain routing | ebpf-tc | 1.00× (1.00–1.05) | median only"
            ),
            "{t}"
        );
        assert!(t.contains("not measured"), "{t}");
        // A round one side missed is left out of the ratio.
        r.push(Mode::EbpfTc, Metric::Tcp1, 7, 1.0);
        assert_eq!(
            r.ratio(Mode::EbpfTc, Mode::Plain, Metric::Tcp1).unwrap().n,
            3
        );
    }

    #[test]
    fn own_cpu_is_above_the_host_network_relative_to_kernel_vxlan() {
        let mut r = Results::default();
        for round in 0..3 {
            r.push(Mode::Host, Metric::CpuUdp, round, 10.0);
            r.push(Mode::Kernel, Metric::CpuUdp, round, 20.0);
            r.push(
                Mode::EbpfFast,
                Metric::CpuUdp,
                round,
                12.0 + f64::from(round),
            );
        }
        let own = r.own_cpu(Mode::EbpfFast, Metric::CpuUdp).unwrap();
        assert!((own.median - 0.3).abs() < 1e-9, "{own:?}");
        let t = &TARGETS[3];
        assert!(matches!(t.quantity, Quantity::OwnCpu(Metric::CpuUdp)));
        assert_eq!(t.verdict(&own), "**no**");
        assert!(
            t.describe().starts_with("own CPU / M UDP pkts ≤ 0.20×"),
            "{}",
            t.describe()
        );
        let table = cpu_table(&r, &ctx());
        assert!(
            table.contains(
                "| eBPF fast path (default) | 13.00 | 0.65× (0.60–0.70) | 0.30× (0.20–0.40) |"
            ),
            "{table}"
        );
        assert!(
            table.contains("| host network | 10.00 | 0.50× (0.50–0.50) | 0 (the floor) |"),
            "{table}"
        );
    }

    #[test]
    fn cpu_table_has_every_mode_with_ratios_to_kernel() {
        let mut r = Results::default();
        r.push(Mode::Host, Metric::CpuUdp, 0, 2.0);
        r.push(Mode::Kernel, Metric::CpuUdp, 0, 8.0);
        r.push(Mode::EbpfTc, Metric::CpuUdp, 0, 6.0);
        r.push(Mode::EbpfTc, Metric::CpuTcp, 0, 1.5);
        let t = cpu_table(&r, &ctx());
        assert!(
            t.contains("at 50 kpps") && t.contains("at 1000 Mbit/s"),
            "{t}"
        );
        assert!(
            t.contains("| kernel vxlan | 8.00 | 1.00× | 1.00× | n/a | n/a | n/a |"),
            "{t}"
        );
        assert!(
            t.contains("| eBPF host path (TC) | 6.00 | 0.75× | 0.67× | 1.50 | n/a | n/a |"),
            "{t}"
        );
        let md = markdown(&r, None, &ctx());
        assert!(md.contains("## CPU cost at a fixed offered load"), "{md}");
        assert!(md.contains("## Noise of this run"), "{md}");
        assert!(md.contains("client on CPU 0, server on CPU 1"), "{md}");
        let j = json(&r, &ctx());
        assert_eq!(
            j["ratios"]["ebpf-tc"]["cpu_s_per_mpkt_udp64"]["vs_kernel"]["median"],
            0.75
        );
        assert_eq!(
            j["ratios"]["ebpf-tc"]["cpu_s_per_mpkt_udp64"]["vs_host"]["median"],
            3.0
        );
        assert!(
            j["ratios"]["kernel"]["cpu_s_per_mpkt_udp64"]
                .get("vs_kernel")
                .is_none()
        );
    }

    #[test]
    fn ipv6_rows_have_their_own_section_and_targets() {
        let mut v4 = Results::default();
        v4.push(Mode::Kernel, Metric::Tcp1, 0, 10.0);
        v4.push(Mode::EbpfFast, Metric::Tcp1, 0, 12.0);
        let mut v6 = Results::default();
        for round in 0..2 {
            v6.push(Mode::Kernel, Metric::Tcp1, round, 8.0);
            v6.push(Mode::EbpfFast, Metric::Tcp1, round, 9.6);
            v6.push(Mode::Kernel, Metric::Udp64, round, 100.0);
            v6.push(Mode::EbpfFast, Metric::Udp64, round, 140.0);
        }
        v6.counters
            .push((Mode::EbpfFast, "host 1: pass_gso_ipv6=3p/9B".into()));
        let t = targets_for(&v6, TARGETS6);
        assert!(
            t.contains(
                "| TCP 1 stream ≥ 1.10× kernel vxlan | ebpf-fast | 1.20× (1.20–1.20) | yes |"
            ),
            "{t}"
        );
        assert!(
            t.contains(
                "| UDP 64 B pps ≥ 1.50× kernel vxlan | ebpf-fast | 1.40× (1.40–1.40) | **no** |"
            ),
            "{t}"
        );
        assert!(t.contains("TCP 4 streams ≥ 1.10× kernel vxlan | ebpf-fast | n/a | not measured"));
        assert_eq!(t.lines().count(), 2 + TARGETS6.len());
        // Without IPv6 rows the report is what it was.
        let md4 = markdown(&v4, None, &ctx());
        assert!(!md4.contains("IPv6"), "{md4}");
        let md = markdown(&v4, Some(&v6), &ctx());
        assert!(md.starts_with(&md4[..md4.find("\n## How it was measured").unwrap()]));
        let section = &md[md.find("## IPv6 rows (dual-stack labs)").unwrap()..];
        assert!(section.contains("### Targets (issue 18, IPv6)"), "{md}");
        assert!(
            section.contains("- ebpf-fast: `host 1: pass_gso_ipv6=3p/9B`"),
            "{md}"
        );
        assert!(section.contains("| ebpf-fast | tcp_1_stream_gbps | 1: 9.60, 2: 9.60 |"));
        assert!(
            md.contains("- IPv6 rows: one dual-stack lab per mode"),
            "{md}"
        );
        assert!(
            md.find("- IPv6 rows: one dual-stack lab")
                < md.find("## What these figures can and cannot show")
        );
        // The IPv4 samples stay at the end, under their own heading.
        assert!(md.ends_with(&samples_table(&v4)));
        // An IPv6-only run has no IPv4 tables.
        let md6 = markdown(&Results::default(), Some(&v6), &ctx());
        assert!(!md6.contains("## Targets (issue 20)"), "{md6}");
        assert!(md6.contains("## IPv6 rows"), "{md6}");
        let j = json_rows(&v6, TARGETS6);
        assert_eq!(
            j["ratios"]["ebpf-fast"]["tcp_1_stream_gbps"]["vs_kernel"]["median"],
            1.2
        );
        assert_eq!(j["targets"].as_array().unwrap().len(), TARGETS6.len());
        assert!(readme_ipv6(&v6).contains("| TCP, 1 stream (Gbit/s) |"));
        let j = json(&v4, &ctx());
        assert_eq!(j["cores"], 2);
        assert_eq!(
            j["ratios"]["ebpf-fast"]["tcp_1_stream_gbps"]["vs_kernel"]["median"],
            1.2
        );
    }

    #[test]
    fn noise_is_the_host_networks_spread() {
        let mut r = Results::default();
        for (round, v) in [18.0, 20.0, 22.0].into_iter().enumerate() {
            r.push(Mode::Host, Metric::Tcp4, round as u32, v);
        }
        let t = noise_table(&r);
        assert!(
            t.contains("| TCP, 4 streams (Gbit/s) | 18.00 / 20.00 / 22.00 | 20 % | 3 |"),
            "{t}"
        );
        assert_eq!(t.lines().count(), 3);
    }

    #[test]
    fn table_has_a_row_per_figure_and_ratio_columns() {
        let mut r = Results::default();
        r.push(Mode::Plain, Metric::Udp64, 0, 1000.0);
        r.push(Mode::Kernel, Metric::Udp64, 0, 500.0);
        r.push(Mode::EbpfXdp, Metric::Udp64, 0, 750.0);
        r.push(Mode::Host, Metric::Udp64, 0, 1500.0);
        let t = table(&r);
        assert_eq!(t.lines().count(), 2 + Metric::ALL.len());
        assert!(
            t.contains(
                "| UDP 64 B received (kpps) | 1500 | 1000 | 500 | 750 | 1.50× | 0.75× | 0.50× |"
            ),
            "{t}"
        );
        assert!(t.contains("| host network | plain routing |"), "{t}");
        assert!(t.contains("eBPF/kernel | eBPF/plain | eBPF/host |"), "{t}");
    }
}
