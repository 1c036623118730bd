//! The firewall rules the daemon keeps: flanneld's, and the fast path's.

use std::time::Duration;

use crate::{
    cli::Cli,
    datapath::{AnyDatapath, ebpf::EbpfDatapath},
    flannel::config::NetworkConfig,
    ipmasq::{self, Rule},
};

/// flanneld's rules for this lease: masquerading with `--ip-masq`, FORWARD
/// accepts with `--iptables-forward-rules`; in iptables, or with
/// `EnableNFTables` in flanneld's nft table.
pub fn flanneld_rules(
    cli: &Cli,
    config: &NetworkConfig,
    subnet: ipnet::Ipv4Net,
    random_fully: bool,
) -> ipmasq::Wanted {
    if config.enable_nftables {
        return ipmasq::Wanted {
            iptables: Vec::new(),
            nft: Some(ipmasq::nft::NftRules {
                network: config.network,
                subnet,
                masq: cli.ip_masq,
                random_fully,
                forward: cli.iptables_forward_rules,
            }),
        };
    }
    let mut rules = Vec::new();
    if cli.ip_masq {
        rules.extend(ipmasq::masq_rules(config.network, subnet, random_fully));
    }
    if cli.iptables_forward_rules {
        rules.extend(ipmasq::forward_rules(config.network));
    }
    ipmasq::Wanted {
        iptables: rules,
        nft: None,
    }
}

/// The fast path's mangle rule (its datapath installed it), so the resync
/// repairs it like flanneld's own.
pub fn fast_path_rules(dp: &AnyDatapath) -> Vec<Rule> {
    dp.as_ebpf()
        .and_then(EbpfDatapath::fast_path_settings)
        .map(|s| ipmasq::fast_path_rules(s.subnet, s.mark))
        .unwrap_or_default()
}

/// Whether `--random-fully` can be used (asked of the tool in use, on a
/// blocking thread since it runs one).
pub async fn random_fully(cli: &Cli, config: &NetworkConfig) -> bool {
    let nft_mode = config.enable_nftables;
    !cli.ip_masq_fully_random_disable
        && tokio::task::spawn_blocking(move || {
            if nft_mode {
                ipmasq::nft::supports_random_fully()
            } else {
                ipmasq::supports_random_fully()
            }
        })
        .await
        .unwrap_or(false)
}

/// How long start-up waits for the first iptables run: READY=1 follows the
/// rules unless something holds the xtables lock; then the rules follow it.
const FIRST_RULES_WAIT: Duration = Duration::from_secs(5);

pub async fn first_rules(applied: tokio::sync::oneshot::Receiver<()>) {
    if tokio::time::timeout(FIRST_RULES_WAIT, applied)
        .await
        .is_err()
    {
        log::warn!(
            "iptables has not answered within {FIRST_RULES_WAIT:?} (is the xtables lock held?); \
             carrying on, the rules follow when it does"
        );
    }
}
