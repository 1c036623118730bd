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
    RttP50,
    RttP99,
}

impl Metric {
    pub const ALL: [Metric; 5] = [
        Metric::Tcp1,
        Metric::Tcp4,
        Metric::Udp64,
        Metric::RttP50,
        Metric::RttP99,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Metric::Tcp1 => "tcp_1_stream_gbps",
            Metric::Tcp4 => "tcp_4_streams_gbps",
            Metric::Udp64 => "udp_64b_rx_kpps",
            Metric::RttP50 => "rtt_p50_us",
            Metric::RttP99 => "rtt_p99_us",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Metric::Tcp1 => "TCP, 1 stream (Gbit/s)",
            Metric::Tcp4 => "TCP, 4 streams (Gbit/s)",
            Metric::Udp64 => "UDP 64 B received (kpps)",
            Metric::RttP50 => "UDP request/response RTT p50 (µs)",
            Metric::RttP99 => "UDP request/response RTT p99 (µs)",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Metric::Tcp1 => "TCP 1 stream",
            Metric::Tcp4 => "TCP 4 streams",
            Metric::Udp64 => "UDP 64 B pps",
            Metric::RttP50 => "RTT p50",
            Metric::RttP99 => "RTT p99",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::Tcp1 | Metric::Tcp4 => "Gbit/s",
            Metric::Udp64 => "kpps",
            Metric::RttP50 | Metric::RttP99 => "µs (lower is better)",
        }
    }

    pub fn higher_is_better(self) -> bool {
        !matches!(self, Metric::RttP50 | Metric::RttP99)
    }
}

/// A target from the issue: `ours / baseline` compared with `bound`.
pub struct Target {
    pub metric: Metric,
    pub baseline: Mode,
    /// At least this ratio when higher is better, at most when lower is.
    pub bound: f64,
}

pub const TARGETS: &[Target] = &[
    Target {
        metric: Metric::Tcp1,
        baseline: Mode::Plain,
        bound: 0.95,
    },
    Target {
        metric: Metric::Tcp1,
        baseline: Mode::Kernel,
        bound: 1.10,
    },
    Target {
        metric: Metric::Tcp4,
        baseline: Mode::Plain,
        bound: 0.95,
    },
    Target {
        metric: Metric::Tcp4,
        baseline: Mode::Kernel,
        bound: 1.10,
    },
    Target {
        metric: Metric::Udp64,
        baseline: Mode::Kernel,
        bound: 1.30,
    },
    Target {
        metric: Metric::RttP50,
        baseline: Mode::Kernel,
        bound: 0.90,
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
}

fn fmt_value(metric: Metric, v: Option<f64>) -> String {
    match v {
        None => "n/a".into(),
        Some(v) => match metric {
            Metric::Tcp1 | Metric::Tcp4 => format!("{v:.2}"),
            Metric::Udp64 => format!("{v:.0}"),
            Metric::RttP50 | Metric::RttP99 => format!("{v:.1}"),
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
        head.push(format!("eBPF/kernel{tag}"));
        head.push(format!("eBPF/plain{tag}"));
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
            row.push(fmt_ratio(results.ratio(*e, Mode::Kernel, metric)));
            row.push(fmt_ratio(results.ratio(*e, Mode::Plain, metric)));
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
    let _ = writeln!(out, "# Benchmark: plain routing vs kernel vxlan vs eBPF\n");
    let _ = writeln!(
        out,
        "Measured {} at commit `{}` by `cargo xtask bench` ({} interleaved repeats, {} s per figure, {:.0} s in all). Medians over the repeats.\n",
        ctx.date, ctx.commit, ctx.repeats, ctx.secs, ctx.wall_secs
    );
    out.push_str(&table(results));
    out.push_str("\n![benchmark chart](benchmark.svg)\n\n## Targets (from the issue)\n\n");
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
           (MTU 1450), strict `rp_filter`. Modes: **plain routing** (each host routes the other's container \
           subnet via its underlay IP: no encapsulation, the ceiling), **kernel vxlan** (our \
           `KernelDatapath`: `flannel.1` programmed as flannel does, the kernel's vxlan driver moves \
           packets), **eBPF** (our `EbpfDatapath`: TC egress encapsulation; ingress by TC alone, or XDP \
           decapsulation + TC redirect).\n\
         - All labs are up for the whole run; each repeat measures every mode in turn, starting with a \
           different mode each repeat, so slow drifts of the machine spread over all modes.\n\
         - Traffic goes from host 1's container to host 2's container. TCP: `iperf3 -c … -P 1|4 -t {secs}`, \
           receiver-side goodput. UDP: `iperf3 -u -l 64 -b 0 -t {secs}` (sender unthrottled), datagrams \
           that reached the receiving socket per second (`sum_received.packets - lost_packets`); \
           the sending CPU does the whole path in softirq (veth, bridge, routing, datapath, underlay, \
           the other host), so this figure is bound by the sender and rises as the per-packet cost of \
           the path falls (the run's log prints sent and received rates). \
           Latency: `sockperf ping-pong -m 64 -t {secs} --full-rtt` (UDP), round-trip percentiles.\n\
         - Ratios are of medians; for RTT lower is better, so a ratio below 1 means eBPF is faster.\n\
         - Everything (both hosts, both containers, senders, receivers and softirq work) shares one \
           machine's cores, so these figures compare datapaths' CPU cost per packet on this machine, not \
           NIC line rates.\n\n\
         ## Machine\n\n\
         - CPU: {cpu}, {cores} cores\n- kernel: {kernel}\n- tools: {tools}\n\
         - load average before / after: {lb} / {la} (other work on the machine adds noise)\n",
        secs = ctx.secs,
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
    for mode in results.modes().into_iter().filter(|m| m.is_ebpf()) {
        let mut r = serde_json::Map::new();
        for metric in Metric::ALL {
            r.insert(
                metric.key().into(),
                serde_json::json!({
                    "vs_kernel": results.ratio(mode, Mode::Kernel, metric),
                    "vs_plain": results.ratio(mode, Mode::Plain, metric),
                }),
            );
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
        "modes": modes, "ratios": ratios, "targets": targets,
        "errors": results.errors.iter().map(|(m, e)| serde_json::json!({"mode": m.name(), "error": e})).collect::<Vec<_>>(),
        "counters": results.counters.iter().map(|(m, c)| serde_json::json!({"mode": m.name(), "counters": c})).collect::<Vec<_>>(),
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
        assert!(TARGETS[0].met(vs_plain)); // 0.954 >= 0.95
        let latency = Target {
            metric: Metric::RttP50,
            baseline: Mode::Kernel,
            bound: 0.9,
        };
        assert!(latency.met(0.8) && !latency.met(0.95));
        let t = targets(&r);
        assert!(
            t.contains("| TCP 1 stream ≥ 0.95× plain routing | ebpf-tc | 0.95× | yes |"),
            "{t}"
        );
        assert!(t.contains("not measured"), "{t}");
    }

    #[test]
    fn table_has_a_row_per_figure_and_ratio_columns() {
        let mut r = Results::default();
        r.push(Mode::Plain, Metric::Udp64, 1000.0);
        r.push(Mode::Kernel, Metric::Udp64, 500.0);
        r.push(Mode::EbpfXdp, Metric::Udp64, 750.0);
        let t = table(&r);
        assert_eq!(t.lines().count(), 2 + Metric::ALL.len());
        assert!(
            t.contains("| UDP 64 B received (kpps) | 1000 | 500 | 750 | 1.50× | 0.75× |"),
            "{t}"
        );
    }
}
