//! `/metrics` in the Prometheus text exposition format (0.0.4).

use std::fmt::Write as _;

use overlay_common::counters::Reason;

use super::state::{HealthState, PeerTrafficMetric, RECONCILE_BUCKETS};
use crate::datapath::Mode;

/// Reads one per-peer series' value.
type PeerValue = fn(&PeerTrafficMetric) -> u64;

/// Series per peer with `--metrics-per-peer` (tx and rx, packets and bytes).
pub const PER_PEER_SERIES: usize = 4;

/// Escapes a label value (backslash, double quote, newline).
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders every metric, with readiness as of Unix time `now`, and the
/// per-peer series of `peers` when given (`--metrics-per-peer`: four series
/// per peer, so off by default). Metrics that do not apply (eBPF counters on
/// the kernel datapath, the expiry of a reservation) are left out, not zero.
pub fn render(
    s: &HealthState,
    peers: Option<&[PeerTrafficMetric]>,
    version: &str,
    now: u64,
) -> String {
    let mut out = String::new();
    header(
        &mut out,
        "overlay_build_info",
        "gauge",
        "The agent's version.",
    );
    let _ = writeln!(
        out,
        "overlay_build_info{{version=\"{}\"}} 1",
        escape(version)
    );

    header(
        &mut out,
        "overlay_ready",
        "gauge",
        "1 when /readyz answers 200: lease held and not expired, datapath programmed.",
    );
    let _ = writeln!(
        out,
        "overlay_ready {}",
        u8::from(s.not_ready_reason(now).is_none())
    );

    header(
        &mut out,
        "overlay_datapath_mode",
        "gauge",
        "The datapath moving the packets: 1 for the one in use.",
    );
    for mode in [Mode::Ebpf, Mode::Kernel] {
        let _ = writeln!(
            out,
            "overlay_datapath_mode{{mode=\"{mode}\"}} {}",
            u8::from(s.mode == Some(mode))
        );
    }

    header(
        &mut out,
        "overlay_etcd_connected",
        "gauge",
        "1 while the watch of the subnet leases in etcd works.",
    );
    let _ = writeln!(out, "overlay_etcd_connected {}", u8::from(s.etcd_connected));

    header(
        &mut out,
        "overlay_lease_reservation",
        "gauge",
        "1 when this node's subnet is a reservation (no expiry).",
    );
    let _ = writeln!(out, "overlay_lease_reservation {}", u8::from(s.reservation));
    if let Some(t) = s.lease_expiry_unix {
        header(
            &mut out,
            "overlay_lease_expiry_timestamp_seconds",
            "gauge",
            "When this node's subnet lease expires unless renewed (Unix time).",
        );
        let _ = writeln!(out, "overlay_lease_expiry_timestamp_seconds {t}");
    }

    header(
        &mut out,
        "overlay_peers_programmed",
        "gauge",
        "Other nodes' subnets programmed in the datapath.",
    );
    let _ = writeln!(out, "overlay_peers_programmed {}", s.peers_programmed);

    header(
        &mut out,
        "overlay_peers_rejected",
        "gauge",
        "Other nodes' subnets the datapath refused and keeps retrying, by reason (map_full: a peer map is at capacity).",
    );
    let _ = writeln!(
        out,
        "overlay_peers_rejected{{reason=\"map_full\"}} {}",
        s.peers_rejected_map_full
    );

    header(
        &mut out,
        "overlay_peers_host_policy",
        "gauge",
        "Peers the eBPF datapath leaves to the kernel's vxlan device because host policy (xfrm, policy routing) covers them.",
    );
    let _ = writeln!(out, "overlay_peers_host_policy {}", s.peers_host_policy);
    header(
        &mut out,
        "overlay_peers_host_policy_ipv6",
        "gauge",
        "Dual-stack peers whose IPv6 side the eBPF datapath leaves to the kernel's flannel-v6 device because host policy (xfrm, policy routing) covers it.",
    );
    let _ = writeln!(
        out,
        "overlay_peers_host_policy_ipv6 {}",
        s.peers_host_policy_ipv6
    );

    if let Some(c) = &s.counters {
        header(
            &mut out,
            "overlay_datapath_packets_total",
            "counter",
            "Packets the eBPF programs handled, by verdict reason.",
        );
        for reason in Reason::ALL {
            let _ = writeln!(
                out,
                "overlay_datapath_packets_total{{reason=\"{}\"}} {}",
                reason.name(),
                c.get(reason).packets
            );
        }
        header(
            &mut out,
            "overlay_datapath_bytes_total",
            "counter",
            "Bytes the eBPF programs handled, by verdict reason.",
        );
        for reason in Reason::ALL {
            let _ = writeln!(
                out,
                "overlay_datapath_bytes_total{{reason=\"{}\"}} {}",
                reason.name(),
                c.get(reason).bytes
            );
        }
    }

    if let Some(peers) = peers {
        let series: [(&str, &str, PeerValue); PER_PEER_SERIES] = [
            (
                "overlay_peer_tx_packets_total",
                "Packets encapsulated to the peer.",
                |p| p.traffic.tx.packets,
            ),
            (
                "overlay_peer_tx_bytes_total",
                "Bytes encapsulated to the peer (inner frames).",
                |p| p.traffic.tx.bytes,
            ),
            (
                "overlay_peer_rx_packets_total",
                "VXLAN packets from the peer accepted by the programs.",
                |p| p.traffic.rx.packets,
            ),
            (
                "overlay_peer_rx_bytes_total",
                "Bytes of VXLAN packets from the peer accepted (outer frames).",
                |p| p.traffic.rx.bytes,
            ),
        ];
        for (name, help, value) in series {
            header(&mut out, name, "counter", help);
            for p in peers {
                let _ = writeln!(
                    out,
                    "{name}{{subnet=\"{}\",public_ip=\"{}\"}} {}",
                    escape(&p.subnet.to_string()),
                    p.traffic.public_ip,
                    value(p)
                );
            }
        }
    }

    header(
        &mut out,
        "overlay_lease_conflict",
        "gauge",
        "1 while another node's lease holds this node's subnet key in etcd.",
    );
    let _ = writeln!(
        out,
        "overlay_lease_conflict {}",
        u8::from(s.lease_conflict.is_some())
    );

    header(
        &mut out,
        "overlay_leases_rejected",
        "gauge",
        "Leases in etcd that are not programmed because they fail a check (README: What the agent trusts in etcd), by reason.",
    );
    for reason in crate::subnet::lease_check::Rejection::ALL {
        let n = s.leases_rejected.get(&reason).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "overlay_leases_rejected{{reason=\"{}\"}} {n}",
            reason.label()
        );
    }

    if let Some(g) = &s.vtep_guard {
        header(
            &mut out,
            "overlay_vtep_guard_drops_total",
            "counter",
            "VXLAN for our port dropped by the host firewall (nft table inet overlay-vtep, both datapaths), by reason.",
        );
        for (reason, n) in [
            ("unknown_vtep", g.unknown_vtep),
            ("spoofed_source", g.spoofed_source),
        ] {
            let _ = writeln!(
                out,
                "overlay_vtep_guard_drops_total{{reason=\"{reason}\"}} {n}"
            );
        }
    }

    let name = "overlay_reconcile_duration_seconds";
    header(
        &mut out,
        name,
        "histogram",
        "Time to apply a batch of lease changes from etcd to the datapath.",
    );
    let h = &s.reconcile;
    for (bound, n) in RECONCILE_BUCKETS.iter().zip(h.buckets.iter()) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum {}", h.sum_seconds);
    let _ = writeln!(out, "{name}_count {}", h.count);
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use overlay_common::counters::Counter;

    use super::*;
    use crate::{
        datapath::ebpf::{Counters, PeerCounters},
        health::state::{PeerTrafficMetric, Phase},
    };

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("x\ny"), "x\\ny");
    }

    #[test]
    fn kernel_datapath_before_the_lease() {
        let s = HealthState {
            phase: Phase::AcquiringLease,
            mode: None,
            ..HealthState::default()
        };
        let text = render(&s, None, "0.1.0", 1_700_000_000);
        assert!(text.starts_with(
            "# HELP overlay_build_info The agent's version.\n# TYPE overlay_build_info gauge\noverlay_build_info{version=\"0.1.0\"} 1\n"
        ));
        assert!(text.contains("\noverlay_ready 0\n"));
        assert!(text.contains(
            "\noverlay_datapath_mode{mode=\"ebpf\"} 0\noverlay_datapath_mode{mode=\"kernel\"} 0\n"
        ));
        assert!(!text.contains("overlay_datapath_packets_total"));
        assert!(!text.contains("overlay_lease_expiry_timestamp_seconds"));
        assert!(text.ends_with(
            "overlay_reconcile_duration_seconds_bucket{le=\"+Inf\"} 0\noverlay_reconcile_duration_seconds_sum 0\noverlay_reconcile_duration_seconds_count 0\n"
        ));
    }

    #[test]
    fn ebpf_datapath_running() {
        let peers = vec![PeerTrafficMetric {
            subnet: "10.5.53.0/24".parse().unwrap(),
            traffic: PeerCounters {
                public_ip: "192.168.64.4".parse().unwrap(),
                tx: Counter {
                    packets: 5,
                    bytes: 500,
                },
                rx: Counter {
                    packets: 3,
                    bytes: 450,
                },
            },
        }];
        let mut s = HealthState {
            phase: Phase::Running,
            mode: Some(Mode::Ebpf),
            lease_expiry_unix: Some(1_800_000_000),
            etcd_connected: true,
            peers_programmed: 1,
            counters: Some(Counters::from_totals(vec![(
                Reason::Encapsulated,
                Counter {
                    packets: 5,
                    bytes: 500,
                },
            )])),
            ..HealthState::default()
        };
        s.reconcile.observe(Duration::from_millis(3));
        let text = render(&s, Some(&peers), "0.1.0", 1_700_000_000);
        for line in [
            "overlay_ready 1",
            "overlay_datapath_mode{mode=\"ebpf\"} 1",
            "overlay_etcd_connected 1",
            "overlay_lease_expiry_timestamp_seconds 1800000000",
            "overlay_peers_programmed 1",
            "overlay_peers_rejected{reason=\"map_full\"} 0",
            "overlay_datapath_packets_total{reason=\"encapsulated\"} 5",
            "overlay_datapath_bytes_total{reason=\"encapsulated\"} 500",
            "overlay_datapath_packets_total{reason=\"drop_unknown_vtep\"} 0",
            "overlay_peer_tx_packets_total{subnet=\"10.5.53.0/24\",public_ip=\"192.168.64.4\"} 5",
            "overlay_peer_rx_bytes_total{subnet=\"10.5.53.0/24\",public_ip=\"192.168.64.4\"} 450",
            "overlay_reconcile_duration_seconds_bucket{le=\"0.0025\"} 0",
            "overlay_reconcile_duration_seconds_bucket{le=\"0.005\"} 1",
            "overlay_reconcile_duration_seconds_count 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Every sample line belongs to a family announced by # TYPE.
        let mut typed = Vec::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                typed.push(rest.split(' ').next().unwrap().to_owned());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                assert!(
                    typed.iter().any(|t| name.starts_with(t.as_str())),
                    "untyped sample {l}"
                );
            }
        }
    }

    /// The cardinality the README gives: a fixed number of series whatever
    /// the number of peers, plus four per peer with `--metrics-per-peer`.
    #[test]
    fn per_peer_series_only_when_asked_four_per_peer() {
        let mut s = HealthState {
            phase: Phase::Running,
            mode: Some(Mode::Ebpf),
            lease_expiry_unix: Some(1_800_000_000),
            peers_programmed: 3,
            counters: Some(Counters::from_totals(Vec::new())),
            ..HealthState::default()
        };
        let peers: Vec<_> = (1..=3u8)
            .map(|i| PeerTrafficMetric {
                subnet: format!("10.5.{i}.0/24").parse().unwrap(),
                traffic: PeerCounters {
                    public_ip: std::net::Ipv4Addr::new(192, 168, 64, i),
                    tx: Counter {
                        packets: u64::from(i),
                        bytes: 100 * u64::from(i),
                    },
                    rx: Counter::default(),
                },
            })
            .collect();
        let samples = |text: &str| text.lines().filter(|l| !l.starts_with('#')).count();

        let without = render(&s, None, "0.1.0", 1_700_000_000);
        assert!(!without.contains("overlay_peer_"), "{without}");
        // Packets and bytes per counter reason, and 29 other series.
        let base = 29 + 2 * overlay_common::counters::Reason::ALL.len();
        assert_eq!(samples(&without), base, "{without}");
        let with = render(&s, Some(&peers), "0.1.0", 1_700_000_000);
        assert_eq!(
            samples(&with),
            base + PER_PEER_SERIES * peers.len(),
            "{with}"
        );
        for line in [
            "overlay_peer_tx_packets_total{subnet=\"10.5.2.0/24\",public_ip=\"192.168.64.2\"} 2",
            "overlay_peer_tx_bytes_total{subnet=\"10.5.3.0/24\",public_ip=\"192.168.64.3\"} 300",
            "overlay_peer_rx_packets_total{subnet=\"10.5.1.0/24\",public_ip=\"192.168.64.1\"} 0",
            "overlay_peer_rx_bytes_total{subnet=\"10.5.1.0/24\",public_ip=\"192.168.64.1\"} 0",
        ] {
            assert!(
                with.lines().any(|l| l == line),
                "missing {line:?} in\n{with}"
            );
        }
        // Asked for, with no peer yet: the families, no samples.
        let none_yet = render(&s, Some(&[]), "0.1.0", 1_700_000_000);
        assert!(none_yet.contains("# TYPE overlay_peer_tx_packets_total counter\n"));
        assert_eq!(samples(&none_yet), base);

        // The kernel datapath has no eBPF counters by reason.
        s.mode = Some(Mode::Kernel);
        s.counters = None;
        assert_eq!(samples(&render(&s, None, "0.1.0", 1_700_000_000)), 29);
    }

    #[test]
    fn the_host_firewalls_drops_appear_when_read() {
        let s = HealthState {
            vtep_guard: Some(crate::datapath::vtep_guard::GuardCounters {
                unknown_vtep: 3,
                spoofed_source: 1,
            }),
            ..HealthState::default()
        };
        let text = render(&s, None, "0.1.0", 1_700_000_000);
        for line in [
            "# TYPE overlay_vtep_guard_drops_total counter",
            "overlay_vtep_guard_drops_total{reason=\"unknown_vtep\"} 3",
            "overlay_vtep_guard_drops_total{reason=\"spoofed_source\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert!(!render(&HealthState::default(), None, "0.1.0", 0).contains("vtep_guard"));
    }

    #[test]
    fn renders_a_fixed_state_exactly() {
        let peers = vec![PeerTrafficMetric {
            subnet: "10.5.53.0/24".parse().unwrap(),
            traffic: PeerCounters {
                public_ip: "192.168.64.4".parse().unwrap(),
                tx: Counter {
                    packets: 5,
                    bytes: 500,
                },
                rx: Counter {
                    packets: 4,
                    bytes: 600,
                },
            },
        }];
        let mut s = HealthState {
            leases_rejected: [(crate::subnet::lease_check::Rejection::PublicIp, 2)].into(),
            phase: Phase::Running,
            mode: Some(Mode::Ebpf),
            lease_expiry_unix: Some(1_800_000_000),
            etcd_connected: true,
            peers_programmed: 1,
            peers_rejected_map_full: 2,
            counters: Some(Counters::from_totals(vec![
                (
                    Reason::Encapsulated,
                    Counter {
                        packets: 5,
                        bytes: 500,
                    },
                ),
                (
                    Reason::Decapsulated,
                    Counter {
                        packets: 4,
                        bytes: 600,
                    },
                ),
            ])),
            ..HealthState::default()
        };
        s.reconcile.observe(Duration::from_micros(500));
        s.reconcile.observe(Duration::from_secs(2));
        let mut want = String::from(
            "\
# HELP overlay_build_info The agent's version.
# TYPE overlay_build_info gauge
overlay_build_info{version=\"0.1.0\"} 1
# HELP overlay_ready 1 when /readyz answers 200: lease held and not expired, datapath programmed.
# TYPE overlay_ready gauge
overlay_ready 1
# HELP overlay_datapath_mode The datapath moving the packets: 1 for the one in use.
# TYPE overlay_datapath_mode gauge
overlay_datapath_mode{mode=\"ebpf\"} 1
overlay_datapath_mode{mode=\"kernel\"} 0
# HELP overlay_etcd_connected 1 while the watch of the subnet leases in etcd works.
# TYPE overlay_etcd_connected gauge
overlay_etcd_connected 1
# HELP overlay_lease_reservation 1 when this node's subnet is a reservation (no expiry).
# TYPE overlay_lease_reservation gauge
overlay_lease_reservation 0
# HELP overlay_lease_expiry_timestamp_seconds When this node's subnet lease expires unless renewed (Unix time).
# TYPE overlay_lease_expiry_timestamp_seconds gauge
overlay_lease_expiry_timestamp_seconds 1800000000
# HELP overlay_peers_programmed Other nodes' subnets programmed in the datapath.
# TYPE overlay_peers_programmed gauge
overlay_peers_programmed 1
# HELP overlay_peers_rejected Other nodes' subnets the datapath refused and keeps retrying, by reason (map_full: a peer map is at capacity).
# TYPE overlay_peers_rejected gauge
overlay_peers_rejected{reason=\"map_full\"} 2
# HELP overlay_peers_host_policy Peers the eBPF datapath leaves to the kernel's vxlan device because host policy (xfrm, policy routing) covers them.
# TYPE overlay_peers_host_policy gauge
overlay_peers_host_policy 0
# HELP overlay_peers_host_policy_ipv6 Dual-stack peers whose IPv6 side the eBPF datapath leaves to the kernel's flannel-v6 device because host policy (xfrm, policy routing) covers it.
# TYPE overlay_peers_host_policy_ipv6 gauge
overlay_peers_host_policy_ipv6 0
# HELP overlay_datapath_packets_total Packets the eBPF programs handled, by verdict reason.
# TYPE overlay_datapath_packets_total counter
",
        );
        for (family, encap, decap) in [("packets", 5, 4), ("bytes", 500, 600)] {
            if family == "bytes" {
                want += "# HELP overlay_datapath_bytes_total Bytes the eBPF programs handled, by verdict reason.\n\
                         # TYPE overlay_datapath_bytes_total counter\n";
            }
            for r in Reason::ALL {
                let n = match r {
                    Reason::Encapsulated => encap,
                    Reason::Decapsulated => decap,
                    _ => 0,
                };
                want += &format!(
                    "overlay_datapath_{family}_total{{reason=\"{}\"}} {n}\n",
                    r.name()
                );
            }
        }
        want += "\
# HELP overlay_peer_tx_packets_total Packets encapsulated to the peer.
# TYPE overlay_peer_tx_packets_total counter
overlay_peer_tx_packets_total{subnet=\"10.5.53.0/24\",public_ip=\"192.168.64.4\"} 5
# HELP overlay_peer_tx_bytes_total Bytes encapsulated to the peer (inner frames).
# TYPE overlay_peer_tx_bytes_total counter
overlay_peer_tx_bytes_total{subnet=\"10.5.53.0/24\",public_ip=\"192.168.64.4\"} 500
# HELP overlay_peer_rx_packets_total VXLAN packets from the peer accepted by the programs.
# TYPE overlay_peer_rx_packets_total counter
overlay_peer_rx_packets_total{subnet=\"10.5.53.0/24\",public_ip=\"192.168.64.4\"} 4
# HELP overlay_peer_rx_bytes_total Bytes of VXLAN packets from the peer accepted (outer frames).
# TYPE overlay_peer_rx_bytes_total counter
overlay_peer_rx_bytes_total{subnet=\"10.5.53.0/24\",public_ip=\"192.168.64.4\"} 600
# HELP overlay_lease_conflict 1 while another node's lease holds this node's subnet key in etcd.
# TYPE overlay_lease_conflict gauge
overlay_lease_conflict 0
# HELP overlay_leases_rejected Leases in etcd that are not programmed because they fail a check (README: What the agent trusts in etcd), by reason.
# TYPE overlay_leases_rejected gauge
overlay_leases_rejected{reason=\"prefix_len\"} 0
overlay_leases_rejected{reason=\"outside_network\"} 0
overlay_leases_rejected{reason=\"public_ip\"} 2
overlay_leases_rejected{reason=\"own_public_ip\"} 0
overlay_leases_rejected{reason=\"vtep_mac\"} 0
overlay_leases_rejected{reason=\"vni\"} 0
# HELP overlay_reconcile_duration_seconds Time to apply a batch of lease changes from etcd to the datapath.
# TYPE overlay_reconcile_duration_seconds histogram
overlay_reconcile_duration_seconds_bucket{le=\"0.001\"} 1
overlay_reconcile_duration_seconds_bucket{le=\"0.0025\"} 1
overlay_reconcile_duration_seconds_bucket{le=\"0.005\"} 1
overlay_reconcile_duration_seconds_bucket{le=\"0.01\"} 1
overlay_reconcile_duration_seconds_bucket{le=\"0.025\"} 1
overlay_reconcile_duration_seconds_bucket{le=\"0.1\"} 1
overlay_reconcile_duration_seconds_bucket{le=\"0.5\"} 1
overlay_reconcile_duration_seconds_bucket{le=\"1\"} 1
overlay_reconcile_duration_seconds_bucket{le=\"+Inf\"} 2
overlay_reconcile_duration_seconds_sum 2.0005
overlay_reconcile_duration_seconds_count 2
";
        assert_eq!(render(&s, Some(&peers), "0.1.0", 1_700_000_000), want);
        // Past the expiry, the same state is not ready.
        assert!(
            render(&s, Some(&peers), "0.1.0", 1_800_000_000).contains("\noverlay_ready 0\n"),
            "expired lease still ready"
        );
    }

    #[test]
    fn label_values_are_escaped_in_the_output() {
        let text = render(&HealthState::default(), None, "1.0\"-dev\\\n", 0);
        assert!(
            text.contains("\noverlay_build_info{version=\"1.0\\\"-dev\\\\\\n\"} 1\n"),
            "{text}"
        );
    }
}
