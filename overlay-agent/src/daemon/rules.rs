//! The firewall rules the daemon keeps: flanneld's, and the fast path's.

use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};

use crate::{
    cli::Cli,
    datapath::{AnyDatapath, ebpf::EbpfDatapath},
    flannel::config::NetworkConfig,
    ipmasq::{self, Family, Net, Rule, nft::NftRules},
};

/// flanneld's rules for this lease: masquerading with `--ip-masq`, FORWARD
/// accepts with `--iptables-forward-rules`; in iptables, or with
/// `EnableNFTables` in flanneld's nft table. With `v6` (`IPv6Network` and
/// this node's IPv6 subnet; flanneld's rules follow an `IPv6Network`, not
/// `EnableIPv6`) the same for IPv6: in ip6tables, or table `ip6
/// flannel-ipv6`.
pub fn flanneld_rules(
    cli: &Cli,
    config: &NetworkConfig,
    subnet: Ipv4Net,
    random_fully: RandomFully,
    v6: Option<(Ipv6Net, Ipv6Net)>,
) -> ipmasq::Wanted {
    if config.enable_nftables {
        return ipmasq::Wanted {
            iptables: Vec::new(),
            nft: Some(nft_rules(cli, config.network, subnet, random_fully.v4)),
            nft6: v6.map(|(network, subnet)| nft_rules(cli, network, subnet, random_fully.v6)),
        };
    }
    let mut rules = iptables_rules(cli, config.network, subnet, random_fully.v4);
    if let Some((network, subnet)) = v6 {
        rules.extend(iptables_rules(cli, network, subnet, random_fully.v6));
    }
    ipmasq::Wanted {
        iptables: rules,
        nft: None,
        nft6: None,
    }
}

fn nft_rules<N: Net>(cli: &Cli, network: N, subnet: N, random_fully: bool) -> NftRules<N> {
    NftRules {
        network,
        subnet,
        masq: cli.ip_masq,
        random_fully,
        forward: cli.iptables_forward_rules,
    }
}

fn iptables_rules<N: Net>(cli: &Cli, network: N, subnet: N, random_fully: bool) -> Vec<Rule> {
    let mut rules = Vec::new();
    if cli.ip_masq {
        rules.extend(ipmasq::masq_rules(network, subnet, random_fully));
    }
    if cli.iptables_forward_rules {
        rules.extend(ipmasq::forward_rules(network));
    }
    rules
}

/// The fast path's mangle rules (its datapath installed them), so the
/// resync repairs them like flanneld's own: iptables', and ip6tables' on a
/// dual-stack node.
pub fn fast_path_rules(dp: &AnyDatapath) -> Vec<Rule> {
    let Some(s) = dp.as_ebpf().and_then(EbpfDatapath::fast_path_settings) else {
        return Vec::new();
    };
    let mut rules = ipmasq::fast_path_rules(s.subnet, s.mark);
    if let Some(subnet6) = s.subnet6 {
        rules.extend(ipmasq::fast_path_rules(subnet6, s.mark));
    }
    rules
}

/// Whether `--random-fully` (`fully-random`) can be used, per family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RandomFully {
    pub v4: bool,
    pub v6: bool,
}

/// Whether `--random-fully` can be used (asked of the tool in use, on a
/// blocking thread since it runs one): of iptables, and of ip6tables when
/// the config has an `IPv6Network`; nft's one answer serves both.
pub async fn random_fully(cli: &Cli, config: &NetworkConfig) -> RandomFully {
    if cli.ip_masq_fully_random_disable {
        return RandomFully::default();
    }
    let nft_mode = config.enable_nftables;
    let ipv6 = config.ipv6.is_some();
    tokio::task::spawn_blocking(move || {
        if nft_mode {
            let r = ipmasq::nft::supports_random_fully();
            return RandomFully { v4: r, v6: r };
        }
        RandomFully {
            v4: ipmasq::supports_random_fully(Family::Ipv4),
            v6: ipv6 && ipmasq::supports_random_fully(Family::Ipv6),
        }
    })
    .await
    .unwrap_or_default()
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
