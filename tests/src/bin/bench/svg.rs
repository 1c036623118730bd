//! A hand-written grouped bar chart: one group per figure, one bar per mode,
//! heights relative to plain routing (= 100 %; the best mode where plain was
//! not measured or measured zero) so figures with different
//! units share one axis; each bar is labelled with its absolute median. The
//! chart grows wider with the number of bars so labels do not overlap.

use std::fmt::Write as _;

use crate::modes::Mode;
use crate::report::{Metric, Results};

const MIN_W: f64 = 900.0;
/// Horizontal room per bar (the bars of a group take 80 % of it).
const PER_BAR: f64 = 30.0;
const H: f64 = 420.0;
/// Bars taller than this (relative to the base) are cut off at it, so one
/// figure whose base is near zero (e.g. the CPU of a path that costs almost
/// nothing) does not flatten all the others; their label still says the value.
const CAP: f64 = 3.0;
const LEFT: f64 = 60.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 90.0;

fn color(mode: Mode) -> &'static str {
    match mode {
        Mode::Host => "#5c5c5c",
        Mode::Plain => "#9e9e9e",
        Mode::Kernel => "#e07b39",
        Mode::EbpfFast => "#7b3294",
        Mode::EbpfTc => "#3b75af",
        Mode::EbpfXdp => "#2e9e6b",
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn chart(results: &Results, title: &str) -> String {
    let modes = results.modes();
    let metrics = Metric::ALL;
    let bars = metrics.len() * modes.len().max(1);
    let w = MIN_W.max(LEFT + 20.0 + bars as f64 * PER_BAR / 0.8);
    // Relative to plain when measured, else to the best mode of the figure.
    let rel = |mode: Mode, metric: Metric| -> Option<f64> {
        let v = results.median(mode, metric)?;
        let base = results
            .median(Mode::Plain, metric)
            .filter(|b| *b > 0.0)
            .or_else(|| {
                modes
                    .iter()
                    .filter_map(|m| results.median(*m, metric))
                    .reduce(f64::max)
            })?;
        (base > 0.0).then(|| (v / base).min(CAP))
    };
    let max_rel = modes
        .iter()
        .flat_map(|m| metrics.iter().filter_map(move |x| rel(*m, *x)))
        .fold(1.0f64, f64::max);
    let top_rel = (max_rel * 1.15 * 4.0).ceil() / 4.0;
    let plot_h = H - TOP - BOTTOM;
    let plot_w = w - LEFT - 20.0;
    let group_w = plot_w / metrics.len() as f64;
    let bar_w = (group_w * 0.8) / modes.len().max(1) as f64;
    let y = |r: f64| TOP + plot_h * (1.0 - r / top_rel);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{H}" viewBox="0 0 {w:.0} {H}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(s, r##"<rect width="{w:.0}" height="{H}" fill="white"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"##,
        w / 2.0,
        esc(title)
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="40" text-anchor="middle" fill="#555">bar height relative to plain routing = 100 % (throughput, transactions: higher is better; RTT, CPU: lower is better); labels are medians</text>"##,
        w / 2.0
    );
    // Grid every 25 %.
    let mut g = 0.0;
    while g <= top_rel + 1e-9 {
        let yy = y(g);
        let stroke = if (g - 1.0).abs() < 1e-9 {
            "#333"
        } else {
            "#ddd"
        };
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="{stroke}"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">{:.0} %</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            yy + 4.0,
            g * 100.0
        );
        g += 0.25;
    }
    for (gi, metric) in metrics.iter().enumerate() {
        let gx = LEFT + group_w * gi as f64 + group_w * 0.1;
        for (mi, mode) in modes.iter().enumerate() {
            let Some(r) = rel(*mode, *metric) else {
                continue;
            };
            let x = gx + bar_w * mi as f64;
            let (y0, y1) = (y(r), y(0.0));
            let v = results.median(*mode, *metric).unwrap_or(0.0);
            let label = if v >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            };
            let _ = writeln!(
                s,
                r##"<rect x="{x:.1}" y="{y0:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {}</title></rect>"##,
                bar_w - 2.0,
                y1 - y0,
                color(*mode),
                esc(mode.label()),
                label
            );
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="9">{label}</text>"##,
                x + (bar_w - 2.0) / 2.0,
                y0 - 3.0
            );
        }
        let cx = LEFT + group_w * (gi as f64 + 0.5);
        let _ = writeln!(
            s,
            r##"<text x="{cx:.1}" y="{:.1}" text-anchor="middle">{}</text><text x="{cx:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}</text>"##,
            H - BOTTOM + 18.0,
            esc(metric.short()),
            H - BOTTOM + 33.0,
            esc(metric.unit()),
        );
    }
    // Legend.
    let mut lx = LEFT;
    for mode in &modes {
        let _ = writeln!(
            s,
            r##"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"##,
            H - 40.0,
            color(*mode),
            lx + 16.0,
            H - 30.0,
            esc(mode.label())
        );
        lx += 40.0 + 7.0 * mode.label().len() as f64;
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_near_zero_base_does_not_blow_up_the_axis() {
        let mut r = Results::default();
        r.push(Mode::Plain, Metric::CpuTcp, 0, 0.001);
        r.push(Mode::Kernel, Metric::CpuTcp, 0, 3.5);
        r.push(Mode::Plain, Metric::Tcp1, 0, 10.0);
        let svg = chart(&r, "t");
        // The grid stops at the cap (300 %) plus headroom, not at 350000 %.
        assert!(svg.contains(">300 %<") && !svg.contains(">500 %<"), "{svg}");
        assert!(svg.contains(">3.50<"), "{svg}");
    }

    #[test]
    fn one_bar_per_measured_value_and_well_formed() {
        let mut r = Results::default();
        r.push(Mode::Plain, Metric::Tcp1, 0, 10.0);
        r.push(Mode::Kernel, Metric::Tcp1, 0, 8.0);
        r.push(Mode::Kernel, Metric::RttP50, 0, 30.0);
        let svg = chart(&r, "t <1>");
        // Three bars (the RTT one relative to its own group's best, since plain
        // has no RTT) + two legend swatches + background.
        assert_eq!(svg.matches("<rect").count(), 6);
        assert_eq!(svg.matches("<title>").count(), 3);
        assert!(svg.contains("t &lt;1&gt;"));
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
