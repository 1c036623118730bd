//! Turning samples into the report: medians per mode and figure, the ratios
//! the targets are stated in, and the markdown and JSON forms.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::modes::Mode;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    Tcp1,
    Tcp4,
    Udp64,
    Tps,
    RttP50,
    RttP99,
    CpuUdp,
    CpuTcp,
}

impl Metric {
    pub const ALL: [Metric; 8] = [
        Metric::Tcp1,
        Metric::Tcp4,
        Metric::Udp64,
        Metric::Tps,
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

/// A target from the issue: `ours / baseline` compared with `bound`.
pub struct Target {
    pub metric: Metric,
    pub baseline: Mode,
    /// At least this ratio when higher is better, at most when lower is.
    pub bound: f64,
}

/// The fast-path issue's targets. The request/response rate stands for its
/// latency target (≤ 0.8× kernel vxlan), hence ≥ 1/0.8 = 1.25×.
pub const TARGETS: &[Target] = &[
    Target {
        metric: Metric::Tcp1,
        baseline: Mode::Plain,
        bound: 1.00,
    },
    Target {
        metric: Metric::Tcp1,
        baseline: Mode::Host,
        bound: 0.90,
    },
    Target {
        metric: Metric::Tcp1,
        baseline: Mode::Kernel,
        bound: 1.10,
    },
    Target {
        metric: Metric::Tcp4,
        baseline: Mode::Plain,
        bound: 1.00,
    },
    Target {
        metric: Metric::Tcp4,
        baseline: Mode::Host,
        bound: 0.90,
    },
    Target {
        metric: Metric::Tcp4,
        baseline: Mode::Kernel,
        bound: 1.10,
    },
    Target {
        metric: Metric::Udp64,
        baseline: Mode::Kernel,
        bound: 1.50,
    },
    Target {
        metric: Metric::CpuUdp,
        baseline: Mode::Kernel,
        bound: 0.65,
    },
    Target {
        metric: Metric::CpuTcp,
        baseline: Mode::Kernel,
        bound: 0.65,
    },
    Target {
        metric: Metric::Tps,
        baseline: Mode::Kernel,
        bound: 1.25,
    },
];

impl Target {
    pub fn describe(&self) -> String {
        let op = if self.metric.higher_is_better() {
            "≥"
        } else {
            "≤"
        };
        format!(
            "{} {op} {:.2}× {}",
            self.metric.short(),
            self.bound,
            self.baseline.label()
        )
    }

    pub fn met(&self, ratio: f64) -> bool {
        if self.metric.higher_is_better() {
            ratio >= self.bound
        } else {
            ratio <= self.bound
        }
    }
}

/// Everything one benchmark run measured.
#[derive(Default)]
pub struct Results {
    pub samples: BTreeMap<(Mode, Metric), Vec<f64>>,
    /// What failed, per mode (a mode that could not be built, or a tool error).
    pub errors: Vec<(Mode, String)>,
    /// The datapaths' counters after the run, per eBPF mode: proof of path.
    pub counters: Vec<(Mode, String)>,
    /// The busy fraction of all CPUs with no load, measured before each CPU
    /// step and subtracted from its figures.
    pub background: Vec<(Mode, f64)>,
}

pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

impl Results {
    pub fn push(&mut self, mode: Mode, metric: Metric, value: f64) {
        self.samples.entry((mode, metric)).or_default().push(value);
    }

    pub fn median(&self, mode: Mode, metric: Metric) -> Option<f64> {
        self.samples.get(&(mode, metric)).and_then(|v| median(v))
    }

    pub fn ratio(&self, mode: Mode, baseline: Mode, metric: Metric) -> Option<f64> {
        let (a, b) = (self.median(mode, metric)?, self.median(baseline, metric)?);
        (b > 0.0).then_some(a / b)
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
    pub tools: String,
    pub wall_secs: f64,
    /// The offered loads of the CPU figures and the flows of the RR figure.
    pub udp_kpps: u32,
    pub tcp_mbps: u32,
    pub rr_flows: usize,
}

fn fmt_value(metric: Metric, v: Option<f64>) -> String {
    match v {
        None => "n/a".into(),
        Some(v) => match metric {
            Metric::Tcp1 | Metric::Tcp4 => format!("{v:.2}"),
            Metric::Udp64 | Metric::Tps => format!("{v:.0}"),
            Metric::RttP50 | Metric::RttP99 => format!("{v:.1}"),
            Metric::CpuUdp | Metric::CpuTcp => format!("{v:.2}"),
        },
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or("n/a".into(), |r| format!("{r:.2}×"))
}

/// The table of medians with the ratios of each eBPF mode, as markdown.
pub fn table(results: &Results) -> String {
    let modes = results.modes();
    let ebpf: Vec<Mode> = modes.iter().copied().filter(|m| m.is_ebpf()).collect();
    let mut head = vec!["figure (median)".to_owned()];
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
/// vxlan, and what the receiver counted, as markdown.
pub fn cpu_table(results: &Results, ctx: &Context) -> String {
    let mut out = format!(
        "| mode | CPU s per M packets, UDP 64 B at {} kpps | vs kernel vxlan | CPU s per GB, TCP at {} Mbit/s | vs kernel vxlan |\n|---|---|---|---|---|\n",
        ctx.udp_kpps, ctx.tcp_mbps
    );
    for mode in results.modes() {
        let mut row = vec![mode.label().to_owned()];
        for metric in [Metric::CpuUdp, Metric::CpuTcp] {
            row.push(fmt_value(metric, results.median(mode, metric)));
            row.push(fmt_ratio(results.ratio(mode, Mode::Kernel, metric)));
        }
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out
}

/// One line per target and eBPF mode: reached ratio and whether it is met.
pub fn targets(results: &Results) -> String {
    let mut out = String::from("| target | eBPF mode | reached | met |\n|---|---|---|---|\n");
    for mode in results.modes().into_iter().filter(|m| m.is_ebpf()) {
        for t in TARGETS {
            let r = results.ratio(mode, t.baseline, t.metric);
            let met = match r {
                None => "not measured",
                Some(r) if t.met(r) => "yes",
                Some(_) => "**no**",
            };
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

pub fn markdown(results: &Results, ctx: &Context) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Benchmark: host network vs plain routing vs kernel vxlan vs eBPF\n"
    );
    let _ = writeln!(
        out,
        "Measured {} at commit `{}` by `cargo xtask bench` ({} interleaved repeats, {} s per figure, {:.0} s in all). Medians over the repeats.\n",
        ctx.date, ctx.commit, ctx.repeats, ctx.secs, ctx.wall_secs
    );
    out.push_str(&table(results));
    out.push_str("\n![benchmark chart](benchmark.svg)\n\n## CPU cost at a fixed offered load\n\n");
    out.push_str(&cpu_table(results, ctx));
    let _ = write!(
        out,
        "\nEvery mode carries the same offered load (64-byte UDP at {udp} kpps, one TCP stream paced \
         to {tcp} Mbit/s; both well below the slowest mode's maximum), so the CPU each needs is \
         comparable where the saturating figures above are not: a path that is cheaper per packet \
         leaves more CPU to the applications. Ratios below 1 mean less CPU than kernel vxlan.\n",
        udp = ctx.udp_kpps,
        tcp = ctx.tcp_mbps
    );
    let bg: Vec<f64> = results.background.iter().map(|(_, b)| b * 100.0).collect();
    if let (Some(lo), Some(mid), Some(hi)) = (
        bg.iter().copied().reduce(f64::min),
        median(&bg),
        bg.iter().copied().reduce(f64::max),
    ) {
        let _ = writeln!(
            out,
            "\nThe idle machine, measured for {} s before each CPU step and subtracted from it, was \
             {lo:.1} / {mid:.1} / {hi:.1} % busy (min / median / max over all CPUs).",
            ctx.secs
        );
    }
    out.push_str("\n## Targets (from the issue)\n\n");
    out.push_str(&targets(results));
    if !results.errors.is_empty() {
        out.push_str("\n## Failures during the run\n\n");
        for (mode, e) in &results.errors {
            let _ = writeln!(out, "- {}: {}", mode.name(), e.replace('\n', " "));
        }
    }
    if !results.counters.is_empty() {
        out.push_str("\n## eBPF counters after the run (proof of path)\n\n");
        for (mode, c) in &results.counters {
            let _ = writeln!(out, "- {}: `{}`", mode.name(), c);
        }
    }
    let _ = write!(
        out,
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
           redirect, both into `flannel.1`).\n\
         - All labs are up for the whole run; each repeat measures every mode in turn, starting with a \
           different mode each repeat, so slow drifts of the machine spread over all modes.\n\
         - Traffic goes from host 1's container to host 2's container (host 1 to host 2 for the host \
           network). TCP: `iperf3 -c … -P 1|4 -t {secs}`, \
           receiver-side goodput. UDP: `iperf3 -u -l 64 -b 0 -t {secs}` (sender unthrottled), datagrams \
           that reached the receiving socket per second (`sum_received.packets - lost_packets`); \
           the sending CPU does the whole path in softirq (veth, bridge, routing, datapath, underlay, \
           the other host), so this figure is bound by the sender and rises as the per-packet cost of \
           the path falls (the run's log prints sent and received rates). \
           Latency: `sockperf ping-pong -m 64 -t {secs} --full-rtt` (UDP, one flow, one message in \
           flight), round-trip percentiles.\n\
         - Request/response rate: {flows} TCP connections (`TCP_NODELAY`), each with one 64-byte \
           request in flight; the server echoes 64 bytes and the client sends the next request when a \
           response arrives. One client thread and one server thread (in the bench process, moved \
           into the two namespaces) serve all flows with `poll(2)`; transactions per second over {secs} s \
           after 0.5 s of warm-up. Why this and not only the RTT: with one flow and one message in \
           flight, both ends sleep between messages, so the single-flow RTT is mostly the scheduler \
           waking a thread on each side (tens of µs) and every mode shows about the same figure; the \
           datapath's few µs vanish in it. With many flows in flight neither thread sleeps, the \
           machine is busy all the time, and the rate is the inverse of the CPU a transaction costs \
           (two small packets through the whole path plus four socket calls), so a cheaper datapath \
           shows up directly as more transactions per second.\n\
         - CPU cost at a fixed offered load: `iperf3 -u -l 64 -b <{udp} kpps>` and `iperf3 -b {tcp}M` \
           (one TCP stream, paced by iperf3), run for {secs} s + 2 s; after 1 s of warm-up, CPU time of \
           **all CPUs** is read from `/proc/stat` (user + nice + system + irq + softirq; idle, iowait \
           and steal excluded) at the start and end of a {secs} s window, and the packets and bytes \
           that the receiving interface (the receiving container's `eth0`, host 2's `eth0` for the \
           host network) counted in the same window from `/proc/net/dev`. Sender and receiver hosts \
           share this one machine, so the system-wide figure is the CPU of both ends, the switch and \
           the tools together; anything else running on the machine in the window counts too (see \
           the load averages below). Reported as CPU seconds per million packets received (the same \
           number as CPU µs per packet) and CPU seconds per 10^9 bytes received (L2 bytes at the \
           receiving interface, headers included). Busy time is the CPUs' time less their idle, iowait \
           and steal time (exact under NOHZ, unlike the tick-sampled busy fields). Right before each \
           CPU step the idle machine is measured for {secs} s in the same way and its busy share \
           subtracted, so steady background work cancels out (work that comes and goes does not); \
           when it is more than 25 % busy the step is skipped and listed under failures. \
           A mode that did not sustain the offered rate is listed under failures.\n\
         - Ratios are of medians; for RTT and CPU lower is better, so a ratio below 1 means eBPF is \
           faster or cheaper. eBPF/host compares with the host network, which has no container hop \
           and no overlay at all.\n\
         - Everything (both hosts, both containers, senders, receivers and softirq work) shares one \
           machine's cores, so these figures compare datapaths' CPU cost per packet on this machine, not \
           NIC line rates.\n\n\
         ## Machine\n\n\
         - CPU: {cpu}, {cores} cores\n- kernel: {kernel}\n- tools: {tools}\n\
         - load average before / after: {lb} / {la} (other work on the machine adds noise)\n",
        secs = ctx.secs,
        flows = ctx.rr_flows,
        udp = ctx.udp_kpps,
        tcp = ctx.tcp_mbps,
        cpu = ctx.cpu,
        cores = ctx.cores,
        kernel = ctx.kernel,
        tools = ctx.tools,
        lb = ctx.load_before,
        la = ctx.load_after,
    );
    out.push_str("\n## Samples\n\n| mode | figure | samples |\n|---|---|---|\n");
    for ((mode, metric), v) in &results.samples {
        let v: Vec<String> = v.iter().map(|x| fmt_value(*metric, Some(*x))).collect();
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

pub fn json(results: &Results, ctx: &Context) -> serde_json::Value {
    let mut modes = serde_json::Map::new();
    for mode in results.modes() {
        let mut m = serde_json::Map::new();
        for metric in Metric::ALL {
            m.insert(
                metric.key().into(),
                serde_json::json!({
                    "median": results.median(mode, metric),
                    "samples": results.samples.get(&(mode, metric)).cloned().unwrap_or_default(),
                }),
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
                    results.ratio(mode, base, metric).into(),
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
            TARGETS.iter().map(move |t| {
                let r = results.ratio(mode, t.baseline, t.metric);
                serde_json::json!({
                    "mode": mode.name(), "target": t.describe(), "ratio": r,
                    "met": r.map(|r| t.met(r)),
                })
            })
        })
        .collect();
    serde_json::json!({
        "date": ctx.date, "commit": ctx.commit, "kernel": ctx.kernel, "cpu": ctx.cpu,
        "cores": ctx.cores, "repeats": ctx.repeats, "seconds_per_figure": ctx.secs,
        "wall_seconds": ctx.wall_secs,
        "offered_load": {"udp_64b_kpps": ctx.udp_kpps, "tcp_mbps": ctx.tcp_mbps},
        "rr_flows": ctx.rr_flows,
        "modes": modes, "ratios": ratios, "targets": targets,
        "errors": results.errors.iter().map(|(m, e)| serde_json::json!({"mode": m.name(), "error": e})).collect::<Vec<_>>(),
        "counters": results.counters.iter().map(|(m, c)| serde_json::json!({"mode": m.name(), "counters": c})).collect::<Vec<_>>(),
        "idle_machine_busy": results.background.iter().map(|(m, b)| serde_json::json!({"mode": m.name(), "fraction": b})).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn ratios_and_targets() {
        let mut r = Results::default();
        for v in [10.0, 11.0, 12.0] {
            r.push(Mode::Plain, Metric::Tcp1, v);
        }
        for v in [8.0, 8.0, 9.0] {
            r.push(Mode::Kernel, Metric::Tcp1, v);
        }
        for v in [10.0, 11.0, 10.5] {
            r.push(Mode::EbpfTc, Metric::Tcp1, v);
        }
        let vs_plain = r.ratio(Mode::EbpfTc, Mode::Plain, Metric::Tcp1).unwrap();
        assert!((vs_plain - 10.5 / 11.0).abs() < 1e-9);
        assert_eq!(
            r.ratio(Mode::EbpfTc, Mode::Kernel, Metric::Tcp1),
            Some(10.5 / 8.0)
        );
        assert!(!TARGETS[0].met(vs_plain)); // 0.954 < 1.00
        assert!(TARGETS[2].met(10.5 / 8.0)); // 1.31 >= 1.10 kernel
        let latency = Target {
            metric: Metric::RttP50,
            baseline: Mode::Kernel,
            bound: 0.9,
        };
        assert!(latency.met(0.8) && !latency.met(0.95));
        let t = targets(&r);
        assert!(
            t.contains("| TCP 1 stream ≥ 1.00× plain routing | ebpf-tc | 0.95× | **no** |"),
            "{t}"
        );
        assert!(t.contains("not measured"), "{t}");
    }

    #[test]
    fn cpu_table_has_every_mode_with_ratios_to_kernel() {
        let mut r = Results::default();
        r.push(Mode::Host, Metric::CpuUdp, 2.0);
        r.push(Mode::Kernel, Metric::CpuUdp, 8.0);
        r.push(Mode::EbpfTc, Metric::CpuUdp, 6.0);
        r.push(Mode::EbpfTc, Metric::CpuTcp, 1.5);
        let ctx = Context {
            date: String::new(),
            commit: String::new(),
            kernel: String::new(),
            cpu: String::new(),
            cores: 2,
            load_before: String::new(),
            load_after: String::new(),
            repeats: 1,
            secs: 1,
            tools: String::new(),
            wall_secs: 1.0,
            udp_kpps: 50,
            tcp_mbps: 1000,
            rr_flows: 32,
        };
        let t = cpu_table(&r, &ctx);
        assert!(
            t.contains("at 50 kpps") && t.contains("at 1000 Mbit/s"),
            "{t}"
        );
        assert!(
            t.contains("| host network | 2.00 | 0.25× | n/a | n/a |"),
            "{t}"
        );
        assert!(
            t.contains("| kernel vxlan | 8.00 | 1.00× | n/a | n/a |"),
            "{t}"
        );
        assert!(
            t.contains("| eBPF host path (TC) | 6.00 | 0.75× | 1.50 | n/a |"),
            "{t}"
        );
        let md = markdown(&r, &ctx);
        assert!(md.contains("## CPU cost at a fixed offered load"), "{md}");
        let j = json(&r, &ctx);
        assert_eq!(
            j["ratios"]["ebpf-tc"]["cpu_s_per_mpkt_udp64"]["vs_kernel"],
            0.75
        );
        assert_eq!(
            j["ratios"]["ebpf-tc"]["cpu_s_per_mpkt_udp64"]["vs_host"],
            3.0
        );
        assert!(
            j["ratios"]["kernel"]["cpu_s_per_mpkt_udp64"]
                .get("vs_kernel")
                .is_none()
        );
    }

    #[test]
    fn table_has_a_row_per_figure_and_ratio_columns() {
        let mut r = Results::default();
        r.push(Mode::Plain, Metric::Udp64, 1000.0);
        r.push(Mode::Kernel, Metric::Udp64, 500.0);
        r.push(Mode::EbpfXdp, Metric::Udp64, 750.0);
        r.push(Mode::Host, Metric::Udp64, 1500.0);
        let t = table(&r);
        assert_eq!(t.lines().count(), 2 + Metric::ALL.len());
        assert!(
            t.contains(
                "| UDP 64 B received (kpps) | 1500 | 1000 | 500 | 750 | 1.50× | 0.75× | 0.50× |"
            ),
            "{t}"
        );
        assert!(
            t.starts_with("| figure (median) | host network | plain routing |"),
            "{t}"
        );
        assert!(t.contains("eBPF/kernel | eBPF/plain | eBPF/host |"), "{t}");
    }
}
