//! flanneld's flags that do nothing here, accepted so that a flanneld command
//! line or unit file starts this agent unchanged: each set one gets one
//! warning saying why it has no effect, except klog's `-v`, which sets the
//! log level. (The Kubernetes flags are the agent's own: see `cli`.)

use clap::Args;

use super::values::parse_go_bool;

const KUBE: &str = "flanneld's IPv6 and logging flags (accepted for compatibility)";

/// The flags flanneld has and this agent does not act on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Args)]
pub struct CompatFlags {
    /// IPv6 accessible by other nodes, for dual stack (`EnableIPv6` in the
    /// network config; without it, ignored with a warning).
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6", help_heading = KUBE)]
    pub public_ipv6: Option<std::net::Ipv6Addr>,

    /// Add a blackhole route for the local pod subnet (not implemented:
    /// ignored with a warning).
    #[arg(long, env = "FLANNELD_IP_BLACKHOLE_ROUTE", num_args = 0..=1,
          default_missing_value = "true", require_equals = true, value_parser = parse_go_bool,
          help_heading = KUBE)]
    pub ip_blackhole_route: Option<bool>,

    /// klog verbosity: 0-1 info, 2-4 debug, 5 and more trace (RUST_LOG, when
    /// set, wins).
    #[arg(short = 'v', long = "v", help_heading = KUBE)]
    pub verbosity: Option<u8>,

    /// klog's per-file verbosity (ignored: use RUST_LOG=module=level).
    #[arg(long, help_heading = KUBE)]
    pub vmodule: Option<String>,

    /// klog's stack trace location (ignored).
    #[arg(long = "log_backtrace_at", help_heading = KUBE)]
    pub log_backtrace_at: Option<String>,

    /// klog: log to standard error (always so here).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true,
          value_parser = parse_go_bool, help_heading = KUBE)]
    pub logtostderr: Option<bool>,

    /// klog: also log to standard error (always so here).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true,
          value_parser = parse_go_bool, help_heading = KUBE)]
    pub alsologtostderr: Option<bool>,
}

impl CompatFlags {
    /// One line for each flag that was given and has no effect here.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut given = |set: bool, flag: &str, why: &str| {
            if set {
                out.push(format!("{flag} has no effect here: {why}"));
            }
        };
        given(
            self.ip_blackhole_route.is_some(),
            "--ip-blackhole-route",
            "this agent does not add flanneld's blackhole route for the local subnet (not implemented)",
        );
        given(
            self.vmodule.is_some(),
            "--vmodule",
            "use RUST_LOG=<module>=<level> instead",
        );
        given(
            self.log_backtrace_at.is_some(),
            "--log_backtrace_at",
            "the agent logs no stack traces",
        );
        given(
            self.logtostderr.is_some() || self.alsologtostderr.is_some(),
            "--logtostderr/--alsologtostderr",
            "the agent always logs to standard error",
        );
        out
    }

    /// The log filter `-v` asks for, when given.
    pub fn log_filter(&self) -> Option<&'static str> {
        self.verbosity.map(|v| match v {
            0 | 1 => "info",
            2..=4 => "debug",
            _ => "trace",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbosity_maps_onto_log_levels() {
        let at = |v| CompatFlags {
            verbosity: Some(v),
            ..CompatFlags::default()
        };
        assert_eq!(CompatFlags::default().log_filter(), None);
        assert_eq!(at(0).log_filter(), Some("info"));
        assert_eq!(at(2).log_filter(), Some("debug"));
        assert_eq!(at(10).log_filter(), Some("trace"));
    }

    #[test]
    fn only_given_flags_warn() {
        assert!(CompatFlags::default().warnings().is_empty());
        let c = CompatFlags {
            public_ipv6: Some("2001:db8::1".parse().unwrap()),
            ip_blackhole_route: Some(true),
            ..CompatFlags::default()
        };
        let w = c.warnings();
        // --public-ipv6 is judged against the network config, later.
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("--ip-blackhole-route has no effect"));
    }
}
