//! The network config at `<prefix>/config`, read with flannel's defaults and
//! validation (flannel's `ParseConfig` + `CheckNetworkConfig` and the VXLAN
//! backend's config), so that a config written for flanneld means the same
//! here. `Backend.Type = "vxlan"` only; the IPv6 fields of a dual-stack
//! config are read and checked as flannel does.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::flannel::gojson::{Field, GoObject, GoValue, ParseError};

/// The kernel's (and so flannel's) VXLAN port when `Backend.Port` is 0.
pub const DEFAULT_VXLAN_PORT: u16 = 8472;
/// flannel's default `Backend.VNI`.
pub const DEFAULT_VNI: u32 = 1;
/// Outer IPv4 + UDP + VXLAN + inner Ethernet.
pub const VXLAN_OVERHEAD: u32 = 50;
const MAX_VNI: i64 = (1 << 24) - 1;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    /// `Network`, with host bits cleared as Go's `net.ParseCIDR` does.
    pub network: Ipv4Net,
    pub subnet_len: u8,
    /// First subnet that may be leased (network address of a SubnetLen subnet).
    pub subnet_min: Ipv4Addr,
    /// Last subnet that may be leased (network address of a SubnetLen subnet).
    pub subnet_max: Ipv4Addr,
    pub backend: VxlanConfig,
    /// `EnableNFTables`: flanneld's rules as an nft table, not iptables.
    pub enable_nftables: bool,
    /// `IPv6Network` and its subnets, present when `EnableIPv6` is true.
    pub ipv6: Option<Ipv6Range>,
}

/// `IPv6Network`, `IPv6SubnetLen`, `IPv6SubnetMin` and `IPv6SubnetMax` with
/// flannel's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Range {
    pub network: Ipv6Net,
    pub subnet_len: u8,
    /// First subnet that may be leased (network address of a subnet).
    pub subnet_min: Ipv6Addr,
    /// Last subnet that may be leased (network address of a subnet).
    pub subnet_max: Ipv6Addr,
}

impl Ipv6Range {
    /// flannel's `isIPv6SubnetConfigCompat`, plus alignment.
    pub fn fits(&self, subnet: Ipv6Net) -> bool {
        subnet.prefix_len() == self.subnet_len
            && subnet.addr() == subnet.network()
            && subnet.addr() >= self.subnet_min
            && subnet.addr() <= self.subnet_max
    }

    /// How many subnets lie in [IPv6SubnetMin, IPv6SubnetMax], saturated.
    pub fn subnet_count(&self) -> u64 {
        let span = u128::from(self.subnet_max) - u128::from(self.subnet_min);
        u64::try_from((span >> (128 - u32::from(self.subnet_len))) + 1).unwrap_or(u64::MAX)
    }
}

/// `Backend` for `Type = "vxlan"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanConfig {
    pub vni: u32,
    /// As configured; 0 means the kernel default ([`DEFAULT_VXLAN_PORT`]).
    pub port: u16,
    /// `Backend.MTU`; `None` (0 or absent) means the underlay interface's MTU.
    pub mtu: Option<u32>,
    pub gbp: bool,
    pub learning: bool,
    pub direct_routing: bool,
}

impl Default for VxlanConfig {
    fn default() -> Self {
        VxlanConfig {
            vni: DEFAULT_VNI,
            port: 0,
            mtu: None,
            gbp: false,
            learning: false,
            direct_routing: false,
        }
    }
}

impl VxlanConfig {
    /// The UDP port on the wire.
    pub fn dst_port(&self) -> u16 {
        if self.port == 0 {
            DEFAULT_VXLAN_PORT
        } else {
            self.port
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("network config: {0}")]
    Document(#[from] ParseError),
    /// `field` is the key as flannel documents it (`Backend.VNI` for nested ones).
    #[error("network config field {field}: {problem}")]
    Field {
        field: &'static str,
        problem: String,
    },
}

fn field_err(field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field,
        problem: problem.into(),
    }
}

impl NetworkConfig {
    /// Parse and validate the value of `<prefix>/config`.
    pub fn parse(text: &[u8]) -> Result<NetworkConfig, ConfigError> {
        NetworkConfig::parse_with(text, true)
    }

    /// Parse and validate `net-conf.json` in Kubernetes mode, where flanneld
    /// skips `CheckNetworkConfig`: the subnets are the nodes' podCIDRs, so
    /// `SubnetLen`, `SubnetMin` and `SubnetMax` are not checked.
    pub fn parse_kube(text: &[u8]) -> Result<NetworkConfig, ConfigError> {
        NetworkConfig::parse_with(text, false)?.served()
    }

    /// A dual-stack config with `extra` IPv6 fields, before the check that
    /// this agent serves it: for other modules' unit tests.
    #[cfg(test)]
    pub fn parse_with_ipv6_for_tests(extra: &str) -> NetworkConfig {
        let text = format!(
            r#"{{"Network":"10.0.0.0/16","EnableIPv6":true,{extra},"Backend":{{"Type":"vxlan"}}}}"#
        );
        NetworkConfig::parse_with(text.as_bytes(), true).expect("valid test config")
    }

    /// The config, if this agent can serve it in Kubernetes mode: IPv4
    /// and dual stack (the IPv6 podCIDR inside `IPv6Network`). IPv6-only
    /// (`EnableIPv4: false`) is refused by [`NetworkConfig::parse_with`]
    /// in both modes.
    fn served(self) -> Result<NetworkConfig, ConfigError> {
        Ok(self)
    }

    fn parse_with(text: &[u8], check_subnets: bool) -> Result<NetworkConfig, ConfigError> {
        let doc = GoObject::parse(text)?;

        let enable_ipv4 = opt_bool(&doc, "EnableIPv4")?.unwrap_or(true);
        let enable_ipv6 = opt_bool(&doc, "EnableIPv6")?.unwrap_or(false);
        if !enable_ipv4 {
            return Err(field_err(
                "EnableIPv4",
                "IPv6-only is not served (and flanneld's etcd subnet manager gives every \
                 node the same IPv6 lease); expected true or absent",
            ));
        }
        let ipv6 = if enable_ipv6 {
            Some(ipv6_range(&doc, check_subnets)?)
        } else {
            None
        };

        let network = match doc.field("Network") {
            Field::Absent => None,
            Field::Present(v) => Some(parse_cidr("Network", v)?),
        };
        // flannel's `Empty()` treats 0.0.0.0/0 like a missing Network.
        let network = match network {
            Some(n) if n != Ipv4Net::default() => n,
            _ => {
                return Err(field_err(
                    "Network",
                    "missing; expected an IPv4 CIDR such as \"10.0.0.0/16\"",
                ));
            }
        };
        let (subnet_len, subnet_min, subnet_max) = match subnet_range(&doc, network) {
            Ok(range) => range,
            // flanneld's kube subnet manager never reads SubnetLen, SubnetMin
            // or SubnetMax (the podCIDRs come from the API): a value it would
            // refuse in etcd mode is ignored there too.
            Err(_) if !check_subnets => {
                (network.prefix_len(), network.network(), network.network())
            }
            Err(e) => return Err(e),
        };

        let backend = parse_backend(&doc)?;
        let enable_nftables = opt_bool(&doc, "EnableNFTables")?.unwrap_or(false);

        Ok(NetworkConfig {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            backend,
            enable_nftables,
            ipv6,
        })
    }

    /// Whether an existing lease still fits this config (flannel's
    /// `isSubnetConfigCompat`, plus alignment, which flannel gets for free
    /// from how its own keys are made).
    pub fn fits(&self, subnet: Ipv4Net) -> bool {
        subnet.prefix_len() == self.subnet_len
            && subnet.addr() == subnet.network()
            && subnet.addr() >= self.subnet_min
            && subnet.addr() <= self.subnet_max
    }

    /// The size of one subnet in addresses.
    pub fn subnet_size(&self) -> u32 {
        1u32 << (32 - self.subnet_len)
    }

    /// How many subnets lie in [SubnetMin, SubnetMax].
    pub fn subnet_count(&self) -> u64 {
        u64::from(u32::from(self.subnet_max) - u32::from(self.subnet_min))
            / u64::from(self.subnet_size())
            + 1
    }
}

/// The fields and limits of one family's subnet range: flannel's
/// `CheckNetworkConfig` applies the same rules to both with these numbers.
struct RangeRules {
    bits: u32,
    network: &'static str,
    len: &'static str,
    min: &'static str,
    max: &'static str,
    /// The longest subnet (room for the tunnel and a bridge address).
    max_len: u8,
    /// The longest Network prefix that gets a derived SubnetLen.
    max_prefix: u8,
    /// The derived SubnetLen for networks of this prefix or shorter.
    default_len: u8,
    default_up_to: u8,
}

const V4_RULES: RangeRules = RangeRules {
    bits: 32,
    network: "Network",
    len: "SubnetLen",
    min: "SubnetMin",
    max: "SubnetMax",
    max_len: 30,
    max_prefix: 28,
    default_len: 24,
    default_up_to: 22,
};

const V6_RULES: RangeRules = RangeRules {
    bits: 128,
    network: "IPv6Network",
    len: "IPv6SubnetLen",
    min: "IPv6SubnetMin",
    max: "IPv6SubnetMax",
    max_len: 126,
    max_prefix: 124,
    default_len: 64,
    default_up_to: 62,
};

/// `SubnetLen`, `SubnetMin` and `SubnetMax` with flannel's defaults, checked
/// as flannel's `CheckNetworkConfig` does.
fn subnet_range(doc: &GoObject, network: Ipv4Net) -> Result<(u8, Ipv4Addr, Ipv4Addr), ConfigError> {
    let min = opt_ip(doc, "SubnetMin")?
        // An explicit 0.0.0.0 counts as unset, as in flannel.
        .filter(|ip| !ip.is_unspecified())
        .map(|ip| u128::from(u32::from(ip)));
    let max = opt_ip(doc, "SubnetMax")?
        .filter(|ip| !ip.is_unspecified())
        .map(|ip| u128::from(u32::from(ip)));
    let net = u128::from(u32::from(network.network()));
    let (len, min, max) = checked_range(doc, &V4_RULES, net, network.prefix_len(), min, max)?;
    // checked_range keeps both inside the 32-bit network.
    let v4 = |a: u128| Ipv4Addr::from(a as u32);
    Ok((len, v4(min), v4(max)))
}

/// `IPv6Network` and its subnets. In kube mode only the network is needed
/// (the podCIDRs come from the API), as in flanneld.
fn ipv6_range(doc: &GoObject, check_subnets: bool) -> Result<Ipv6Range, ConfigError> {
    let network = match doc.field("IPv6Network") {
        Field::Absent => None,
        Field::Present(v) => Some(parse_cidr6("IPv6Network", v)?),
    };
    let network = match network {
        Some(n) if n != Ipv6Net::default() => n,
        _ => {
            return Err(field_err(
                "IPv6Network",
                "missing with EnableIPv6; expected an IPv6 CIDR such as \"fc00::/48\"",
            ));
        }
    };
    let min = opt_ip6(doc, "IPv6SubnetMin")?.map(u128::from);
    let max = opt_ip6(doc, "IPv6SubnetMax")?.map(u128::from);
    let net = u128::from(network.network());
    let (subnet_len, min, max) =
        match checked_range(doc, &V6_RULES, net, network.prefix_len(), min, max) {
            Ok(range) => range,
            Err(_) if !check_subnets => (network.prefix_len(), net, net),
            Err(e) => return Err(e),
        };
    Ok(Ipv6Range {
        network,
        subnet_len,
        subnet_min: Ipv6Addr::from(min),
        subnet_max: Ipv6Addr::from(max),
    })
}

/// One family's subnet length and [min, max], addresses as integers of
/// `rules.bits` bits.
fn checked_range(
    doc: &GoObject,
    rules: &RangeRules,
    net: u128,
    prefix: u8,
    min: Option<u128>,
    max: Option<u128>,
) -> Result<(u8, u128, u128), ConfigError> {
    let subnet_len = match doc.field(rules.len) {
        Field::Absent => 0,
        Field::Present(v) => v.as_u64().ok_or_else(|| {
            field_err(
                rules.len,
                format!("expected a non-negative integer, got {}", v.to_json()),
            )
        })?,
    };
    let subnet_len: u8 = if subnet_len > 0 {
        if subnet_len > u64::from(rules.max_len) {
            return Err(field_err(
                rules.len,
                format!(
                    "must be at most {} (less than /{}), got {subnet_len}",
                    rules.max_len,
                    rules.max_len + 1
                ),
            ));
        }
        let subnet_len = subnet_len as u8;
        // The first subnet is never leased, so at least four are needed.
        if subnet_len < prefix + 2 {
            return Err(field_err(
                rules.len,
                format!(
                    "must be at least {}'s prefix + 2 = {} so the network holds at \
                     least four subnets, got {subnet_len}",
                    rules.network,
                    prefix + 2
                ),
            ));
        }
        subnet_len
    } else if prefix > rules.max_prefix {
        return Err(field_err(
            rules.network,
            format!(
                "/{prefix} is too small; the minimum useful network prefix is /{}",
                rules.max_prefix
            ),
        ));
    } else if prefix <= rules.default_up_to {
        rules.default_len
    } else {
        prefix + 2
    };

    let host_bits = rules.bits - u32::from(subnet_len);
    let size = 1u128 << host_bits;
    let net_last = net + ((1u128 << (rules.bits - u32::from(prefix))) - 1);
    let inside = |a: u128| (net..=net_last).contains(&a);
    let show = |a: u128| show_addr(rules.bits, a);

    let subnet_min = match min {
        None => net + size,
        Some(a) if inside(a) => a,
        Some(a) => {
            return Err(field_err(
                rules.min,
                format!(
                    "{} is not in the range of the {} {}/{prefix}",
                    show(a),
                    rules.network,
                    show(net)
                ),
            ));
        }
    };
    let subnet_max = match max {
        None => net_last - (size - 1),
        Some(a) if inside(a) => a,
        Some(a) => {
            return Err(field_err(
                rules.max,
                format!(
                    "{} is not in the range of the {} {}/{prefix}",
                    show(a),
                    rules.network,
                    show(net)
                ),
            ));
        }
    };
    for (field, a) in [(rules.min, subnet_min), (rules.max, subnet_max)] {
        if a % size != 0 {
            return Err(field_err(
                field,
                format!(
                    "{} is not on a {} (/{subnet_len}) boundary",
                    show(a),
                    rules.len
                ),
            ));
        }
    }
    // Not checked by flannel, where it surfaces later as "out of subnets"
    // on every node; a config that can never lease anything is an error.
    if subnet_min > subnet_max {
        return Err(field_err(
            rules.min,
            format!(
                "{} is above {} {}: no subnet can be leased",
                show(subnet_min),
                rules.max,
                show(subnet_max)
            ),
        ));
    }

    Ok((subnet_len, subnet_min, subnet_max))
}

/// An address of a family of `bits` bits, printed as that family.
fn show_addr(bits: u32, a: u128) -> String {
    if bits == 32 {
        Ipv4Addr::from(a as u32).to_string()
    } else {
        Ipv6Addr::from(a).to_string()
    }
}

fn parse_backend(doc: &GoObject) -> Result<VxlanConfig, ConfigError> {
    let backend = match doc.field("Backend") {
        // flannel's default backend when none is given.
        Field::Absent => {
            return Err(field_err(
                "Backend.Type",
                "missing, which flannel reads as \"udp\"; only \"vxlan\" is served",
            ));
        }
        Field::Present(GoValue::Object(o)) => o,
        Field::Present(v) => {
            return Err(field_err(
                "Backend",
                format!(
                    "expected an object such as {{\"Type\":\"vxlan\"}}, got {}",
                    v.kind()
                ),
            ));
        }
    };
    let ty = match backend.field("Type") {
        Field::Absent => String::new(),
        Field::Present(v) => v
            .as_str()
            .ok_or_else(|| {
                field_err(
                    "Backend.Type",
                    format!("expected a string, got {}", v.kind()),
                )
            })?
            .to_owned(),
    };
    // flannel looks backends up by the lower-cased type.
    if !ty.eq_ignore_ascii_case("vxlan") {
        return Err(field_err(
            "Backend.Type",
            format!("{ty:?} is not served: overlay-agent implements only \"vxlan\""),
        ));
    }

    let mut cfg = VxlanConfig::default();
    if let Some(vni) = opt_int(backend, "VNI", "Backend.VNI")? {
        if !(0..=MAX_VNI).contains(&vni) {
            return Err(field_err(
                "Backend.VNI",
                format!("must be between 0 and {MAX_VNI}, got {vni}"),
            ));
        }
        cfg.vni = vni as u32;
    }
    if let Some(port) = opt_int(backend, "Port", "Backend.Port")? {
        cfg.port = u16::try_from(port).map_err(|_| {
            field_err(
                "Backend.Port",
                format!("must be between 0 (kernel default 8472) and 65535, got {port}"),
            )
        })?;
    }
    if let Some(mtu) = opt_int(backend, "MTU", "Backend.MTU")? {
        cfg.mtu = match mtu {
            0 => None,
            m if (i64::from(VXLAN_OVERHEAD) + 68..=65535).contains(&m) => Some(m as u32),
            m => {
                return Err(field_err(
                    "Backend.MTU",
                    format!(
                        "must be 0 (the underlay's MTU) or between {} and 65535 (the device gets \
                         MTU - 50), got {m}",
                        VXLAN_OVERHEAD + 68
                    ),
                ));
            }
        };
    }
    cfg.gbp = opt_bool_in(backend, "GBP", "Backend.GBP")?.unwrap_or(false);
    cfg.learning = opt_bool_in(backend, "Learning", "Backend.Learning")?.unwrap_or(false);
    cfg.direct_routing =
        opt_bool_in(backend, "DirectRouting", "Backend.DirectRouting")?.unwrap_or(false);
    Ok(cfg)
}

fn opt_bool(doc: &GoObject, name: &'static str) -> Result<Option<bool>, ConfigError> {
    opt_bool_in(doc, name, name)
}

fn opt_bool_in(
    doc: &GoObject,
    name: &str,
    field: &'static str,
) -> Result<Option<bool>, ConfigError> {
    match doc.field(name) {
        Field::Absent => Ok(None),
        Field::Present(v) => v.as_bool().map(Some).ok_or_else(|| {
            field_err(
                field,
                format!("expected true or false, got {}", v.to_json()),
            )
        }),
    }
}

fn opt_int(doc: &GoObject, name: &str, field: &'static str) -> Result<Option<i64>, ConfigError> {
    match doc.field(name) {
        Field::Absent => Ok(None),
        Field::Present(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| field_err(field, format!("expected an integer, got {}", v.to_json()))),
    }
}

fn opt_ip(doc: &GoObject, name: &'static str) -> Result<Option<Ipv4Addr>, ConfigError> {
    opt_addr(doc, name, "IPv4", parse_ipv4)
}

fn opt_ip6(doc: &GoObject, name: &'static str) -> Result<Option<Ipv6Addr>, ConfigError> {
    opt_addr(doc, name, "IPv6", parse_ipv6)
}

fn opt_addr<A>(
    doc: &GoObject,
    name: &'static str,
    family: &str,
    parse: fn(&str) -> Option<A>,
) -> Result<Option<A>, ConfigError> {
    match doc.field(name) {
        Field::Absent => Ok(None),
        Field::Present(v) => {
            let s = v.as_str().ok_or_else(|| {
                field_err(
                    name,
                    format!("expected an {family} address string, got {}", v.to_json()),
                )
            })?;
            parse(s)
                .map(Some)
                .ok_or_else(|| field_err(name, format!("{s:?} is not an {family} address")))
        }
    }
}

/// An IPv4 address as Go's `net.ParseIP(s).To4()` accepts it: dotted quad
/// (no leading zeros) or its IPv4-mapped IPv6 form.
pub fn parse_ipv4(s: &str) -> Option<Ipv4Addr> {
    match s.parse::<IpAddr>().ok()? {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(ip) => ip.to_ipv4_mapped(),
    }
}

/// An IPv6 address that is not an IPv4 one in disguise: Go's `ParseIP`
/// followed by flannel's `To4() == nil` check.
pub fn parse_ipv6(s: &str) -> Option<Ipv6Addr> {
    match s.parse::<IpAddr>().ok()? {
        IpAddr::V6(ip) if ip.to_ipv4_mapped().is_none() => Some(ip),
        _ => None,
    }
}

fn parse_cidr(field: &'static str, v: &GoValue) -> Result<Ipv4Net, ConfigError> {
    // Go's ParseCIDR takes no IPv4-mapped form for an IPv4 network.
    let (addr, len) = cidr_parts(field, v, "IPv4", "10.0.0.0/16", |s| s.parse().ok())?;
    // cidr_parts checked the length against the family.
    Ok(Ipv4Net::new(addr, len).expect("checked prefix").trunc())
}

fn parse_cidr6(field: &'static str, v: &GoValue) -> Result<Ipv6Net, ConfigError> {
    let (addr, len) = cidr_parts(field, v, "IPv6", "fc00::/48", parse_ipv6)?;
    Ok(Ipv6Net::new(addr, len).expect("checked prefix").trunc())
}

/// The address and prefix length of a CIDR string of one family, the length
/// checked against the family's width.
fn cidr_parts<A: Into<IpAddr> + Copy>(
    field: &'static str,
    v: &GoValue,
    family: &str,
    example: &str,
    parse: fn(&str) -> Option<A>,
) -> Result<(A, u8), ConfigError> {
    let s = v.as_str().ok_or_else(|| {
        field_err(
            field,
            format!("expected an {family} CIDR string, got {}", v.to_json()),
        )
    })?;
    let bad = || {
        field_err(
            field,
            format!("{s:?} is not an {family} CIDR such as \"{example}\""),
        )
    };
    let (addr, len) = s.split_once('/').ok_or_else(bad)?;
    let addr = parse(addr).ok_or_else(bad)?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let len: u8 = len.parse().map_err(|_| bad())?;
    let width = if addr.into().is_ipv4() { 32 } else { 128 };
    if len > width {
        return Err(bad());
    }
    Ok((addr, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the config says, before the check that this agent serves it.
    fn parse(s: &str) -> Result<NetworkConfig, ConfigError> {
        NetworkConfig::parse_with(s.as_bytes(), true)
    }

    fn err_field(s: &str) -> &'static str {
        match parse(s) {
            Err(ConfigError::Field { field, .. }) => field,
            other => panic!("expected a field error for {s}, got {other:?}"),
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn seed_001_config() {
        let c = parse(
            r#"{
      "Network": "10.0.0.0/8",
      "SubnetLen": 20,
      "SubnetMin": "10.10.0.0",
      "SubnetMax": "10.99.0.0",
      "Backend": {
          "Type": "vxlan",
          "VNI": 100,
          "Port": 8472
      }
  }"#,
        )
        .unwrap();
        assert_eq!(c.network, "10.0.0.0/8".parse().unwrap());
        assert_eq!(c.subnet_len, 20);
        assert_eq!(c.subnet_min, ip("10.10.0.0"));
        assert_eq!(c.subnet_max, ip("10.99.0.0"));
        assert_eq!(c.backend.vni, 100);
        assert_eq!(c.backend.dst_port(), 8472);
        // The leases seed 001 shows fit this config.
        assert!(c.fits("10.15.64.0/20".parse().unwrap()));
        assert!(c.fits("10.13.48.0/20".parse().unwrap()));
    }

    #[test]
    fn enable_nftables_is_flannel_s_top_level_bool() {
        let base = r#""Network":"10.0.0.0/16","Backend":{"Type":"vxlan"}"#;
        assert!(!parse(&format!("{{{base}}}")).unwrap().enable_nftables);
        assert!(
            parse(&format!(r#"{{{base},"EnableNFTables":true}}"#))
                .unwrap()
                .enable_nftables
        );
        assert!(
            !parse(&format!(r#"{{{base},"EnableNFTables":false}}"#))
                .unwrap()
                .enable_nftables
        );
        assert_eq!(
            err_field(&format!(r#"{{{base},"EnableNFTables":"yes"}}"#)),
            "EnableNFTables"
        );
    }

    #[test]
    fn seed_004_config_and_defaults() {
        let c = parse(
            r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "SubnetMin": "10.0.1.0","SubnetMax": "10.0.20.0", "Backend": {"Type": "vxlan"}}"#,
        )
        .unwrap();
        assert_eq!(c.subnet_min, ip("10.0.1.0"));
        assert_eq!(c.subnet_max, ip("10.0.20.0"));
        assert_eq!(c.subnet_count(), 20);
        assert_eq!(c.backend, VxlanConfig::default());
        assert_eq!(c.backend.vni, 1);
        assert_eq!(c.backend.dst_port(), 8472);
        assert_eq!(c.backend.mtu, None);
        assert!(c.fits("10.0.13.0/24".parse().unwrap()));
        assert!(!c.fits("10.0.21.0/24".parse().unwrap()));
        assert!(!c.fits("10.0.0.0/24".parse().unwrap()));
        assert!(!c.fits("10.0.13.0/25".parse().unwrap()));
    }

    #[test]
    fn subnet_len_defaults_follow_network_prefix() {
        let len = |net: &str| {
            parse(&format!(
                r#"{{"Network":"{net}","Backend":{{"Type":"vxlan"}}}}"#
            ))
            .unwrap()
            .subnet_len
        };
        assert_eq!(len("10.0.0.0/8"), 24);
        assert_eq!(len("10.0.0.0/22"), 24);
        assert_eq!(len("10.0.0.0/23"), 25);
        assert_eq!(len("10.0.0.0/26"), 28);
        assert_eq!(len("10.0.0.0/28"), 30);
        assert_eq!(
            err_field(r#"{"Network":"10.0.0.0/29","Backend":{"Type":"vxlan"}}"#),
            "Network"
        );
    }

    #[test]
    fn first_subnet_skipped_and_last_subnet_is_max() {
        let c = parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(c.subnet_min, ip("10.5.1.0"));
        assert_eq!(c.subnet_max, ip("10.5.255.0"));
        assert_eq!(c.subnet_count(), 255);
        // An explicit 0.0.0.0 is "unset" in flannel.
        let c = parse(
            r#"{"Network":"10.5.0.0/16","SubnetMin":"0.0.0.0","SubnetMax":"0.0.0.0","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        assert_eq!(
            (c.subnet_min, c.subnet_max),
            (ip("10.5.1.0"), ip("10.5.255.0"))
        );
        // Host bits in Network are cleared, as net.ParseCIDR does.
        let c = parse(r#"{"Network":"10.5.7.9/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(c.network, "10.5.0.0/16".parse().unwrap());
        // The top of the address space does not overflow.
        let c = parse(r#"{"Network":"255.255.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(c.subnet_max, ip("255.255.255.0"));
    }

    #[test]
    fn subnet_len_validation() {
        let cfg = |len: &str| {
            format!(r#"{{"Network":"10.0.0.0/16","SubnetLen":{len},"Backend":{{"Type":"vxlan"}}}}"#)
        };
        assert_eq!(parse(&cfg("30")).unwrap().subnet_len, 30);
        assert_eq!(parse(&cfg("18")).unwrap().subnet_len, 18);
        assert_eq!(err_field(&cfg("31")), "SubnetLen");
        assert_eq!(err_field(&cfg("17")), "SubnetLen");
        assert_eq!(err_field(&cfg("-1")), "SubnetLen");
        assert_eq!(err_field(&cfg("24.5")), "SubnetLen");
        assert_eq!(err_field(&cfg("\"24\"")), "SubnetLen");
        // 0 and null mean "use the default".
        assert_eq!(parse(&cfg("0")).unwrap().subnet_len, 24);
        assert_eq!(parse(&cfg("null")).unwrap().subnet_len, 24);
    }

    #[test]
    fn min_max_range_and_boundaries() {
        let cfg = |min: &str, max: &str| {
            format!(
                r#"{{"Network":"10.0.0.0/16","SubnetMin":"{min}","SubnetMax":"{max}","Backend":{{"Type":"vxlan"}}}}"#
            )
        };
        assert!(parse(&cfg("10.0.0.0", "10.0.255.0")).is_ok());
        assert_eq!(err_field(&cfg("10.1.0.0", "10.0.9.0")), "SubnetMin");
        assert_eq!(err_field(&cfg("10.0.1.0", "10.1.0.0")), "SubnetMax");
        assert_eq!(err_field(&cfg("10.0.1.1", "10.0.9.0")), "SubnetMin");
        assert_eq!(err_field(&cfg("10.0.1.0", "10.0.9.128")), "SubnetMax");
        assert_eq!(err_field(&cfg("10.0.9.0", "10.0.1.0")), "SubnetMin");
        assert_eq!(err_field(&cfg("10.0.300.0", "10.0.9.0")), "SubnetMin");
        assert_eq!(err_field(&cfg("010.0.1.0", "10.0.9.0")), "SubnetMin");
        // Go's ParseIP also takes the IPv4-mapped form.
        assert_eq!(
            parse(&cfg("::ffff:10.0.1.0", "10.0.9.0"))
                .unwrap()
                .subnet_min,
            ip("10.0.1.0")
        );
    }

    #[test]
    fn keys_are_case_insensitive() {
        let c = parse(
            r#"{"network":"10.1.0.0/16","SUBNETLEN":25,"subnetmin":"10.1.2.0","backend":{"type":"VXLAN","vni":7,"port":4789,"mtu":9000,"gbp":true,"learning":true,"directrouting":true}}"#,
        )
        .unwrap();
        assert_eq!(c.network, "10.1.0.0/16".parse().unwrap());
        assert_eq!(c.subnet_len, 25);
        assert_eq!(c.subnet_min, ip("10.1.2.0"));
        assert_eq!(
            c.backend,
            VxlanConfig {
                vni: 7,
                port: 4789,
                mtu: Some(9000),
                gbp: true,
                learning: true,
                direct_routing: true
            }
        );
        // Unknown keys are ignored, as in Go.
        assert!(
            parse(r#"{"Network":"10.1.0.0/16","Comment":[1],"Backend":{"Type":"vxlan","X":1}}"#)
                .is_ok()
        );
    }

    #[test]
    fn network_errors() {
        assert_eq!(err_field(r#"{"Backend":{"Type":"vxlan"}}"#), "Network");
        assert_eq!(
            err_field(r#"{"Network":"0.0.0.0/0","Backend":{"Type":"vxlan"}}"#),
            "Network"
        );
        assert_eq!(
            err_field(r#"{"Network":"10.0.0.0","Backend":{"Type":"vxlan"}}"#),
            "Network"
        );
        assert_eq!(
            err_field(r#"{"Network":"10.0.0.0/33","Backend":{"Type":"vxlan"}}"#),
            "Network"
        );
        assert_eq!(
            err_field(r#"{"Network":"fd00::/64","Backend":{"Type":"vxlan"}}"#),
            "Network"
        );
        assert_eq!(
            err_field(r#"{"Network":167772160,"Backend":{"Type":"vxlan"}}"#),
            "Network"
        );
        assert_eq!(
            err_field(r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"Backend":{"Type":"vxlan"}}"#),
            "IPv6Network"
        );
        assert_eq!(
            err_field(r#"{"Network":"10.0.0.0/16","EnableIPv4":false,"Backend":{"Type":"vxlan"}}"#),
            "EnableIPv4"
        );
    }

    #[test]
    fn backend_rules() {
        let with = |b: &str| format!(r#"{{"Network":"10.0.0.0/16","Backend":{b}}}"#);
        assert_eq!(err_field(r#"{"Network":"10.0.0.0/16"}"#), "Backend.Type");
        assert_eq!(err_field(&with(r#"{"Type":"host-gw"}"#)), "Backend.Type");
        assert_eq!(err_field(&with(r#"{"Type":"udp"}"#)), "Backend.Type");
        assert_eq!(err_field(&with(r#"{}"#)), "Backend.Type");
        assert_eq!(err_field(&with(r#""vxlan""#)), "Backend");
        assert_eq!(
            err_field(&with(r#"{"Type":"vxlan","VNI":16777216}"#)),
            "Backend.VNI"
        );
        assert_eq!(
            err_field(&with(r#"{"Type":"vxlan","VNI":-1}"#)),
            "Backend.VNI"
        );
        assert_eq!(
            err_field(&with(r#"{"Type":"vxlan","VNI":"1"}"#)),
            "Backend.VNI"
        );
        assert_eq!(
            err_field(&with(r#"{"Type":"vxlan","Port":65536}"#)),
            "Backend.Port"
        );
        assert_eq!(
            err_field(&with(r#"{"Type":"vxlan","MTU":100}"#)),
            "Backend.MTU"
        );
        assert_eq!(
            err_field(&with(r#"{"Type":"vxlan","GBP":"yes"}"#)),
            "Backend.GBP"
        );
        let c = parse(&with(r#"{"Type":"vxlan","VNI":0,"Port":0,"MTU":0}"#)).unwrap();
        assert_eq!(
            (c.backend.vni, c.backend.dst_port(), c.backend.mtu),
            (0, 8472, None)
        );
    }

    fn v6(extra: &str) -> String {
        format!(
            r#"{{"Network":"10.0.0.0/16","EnableIPv6":true,{extra},"Backend":{{"Type":"vxlan"}}}}"#
        )
    }

    fn ip6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn dual_stack_config_as_flannel_documents_it() {
        // Documentation/configuration.md's dual-stack example.
        let c = parse(
            r#"{"EnableIPv6":true,"Network":"10.42.0.0/16","IPv6Network":"2001:cafe:42::/56","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        let r = c.ipv6.unwrap();
        assert_eq!(r.network, "2001:cafe:42::/56".parse().unwrap());
        // prefix <= 62: /64 subnets; the first is never leased.
        assert_eq!(r.subnet_len, 64);
        assert_eq!(r.subnet_min, ip6("2001:cafe:42:1::"));
        assert_eq!(r.subnet_max, ip6("2001:cafe:42:ff::"));
        assert_eq!(r.subnet_count(), 255);
        assert!(r.fits("2001:cafe:42:7::/64".parse().unwrap()));
        assert!(!r.fits("2001:cafe:42::/64".parse().unwrap()));
        assert!(!r.fits("2001:cafe:42:7::/65".parse().unwrap()));
        assert!(!r.fits("2001:cafe:43::/64".parse().unwrap()));
        // IPv4 keeps its own range beside it.
        assert_eq!(c.subnet_len, 24);
        // Without EnableIPv6 the IPv6 fields are not read.
        let c =
            parse(r#"{"Network":"10.0.0.0/16","IPv6Network":"bogus","Backend":{"Type":"vxlan"}}"#)
                .unwrap();
        assert_eq!(c.ipv6, None);
    }

    #[test]
    fn ipv6_subnet_len_follows_flannel() {
        let len = |net: &str| {
            parse(&v6(&format!(r#""IPv6Network":"{net}""#)))
                .unwrap()
                .ipv6
                .unwrap()
                .subnet_len
        };
        assert_eq!(len("fc00::/48"), 64);
        assert_eq!(len("fc00::/62"), 64);
        assert_eq!(len("fc00::/63"), 65);
        assert_eq!(len("fc00::/124"), 126);
        assert_eq!(
            err_field(&v6(r#""IPv6Network":"fc00::/125""#)),
            "IPv6Network"
        );
        let with_len = |n: &str| v6(&format!(r#""IPv6Network":"fc00::/48","IPv6SubnetLen":{n}"#));
        assert_eq!(parse(&with_len("80")).unwrap().ipv6.unwrap().subnet_len, 80);
        assert_eq!(
            parse(&with_len("126")).unwrap().ipv6.unwrap().subnet_len,
            126
        );
        assert_eq!(err_field(&with_len("127")), "IPv6SubnetLen");
        assert_eq!(err_field(&with_len("49")), "IPv6SubnetLen");
        assert_eq!(err_field(&with_len("-1")), "IPv6SubnetLen");
        assert_eq!(parse(&with_len("0")).unwrap().ipv6.unwrap().subnet_len, 64);
    }

    #[test]
    fn ipv6_min_max_and_network_errors() {
        let mm = |min: &str, max: &str| {
            v6(&format!(
                r#""IPv6Network":"fc00::/48","IPv6SubnetMin":"{min}","IPv6SubnetMax":"{max}""#
            ))
        };
        let r = parse(&mm("fc00:0:0:10::", "fc00:0:0:20::"))
            .unwrap()
            .ipv6
            .unwrap();
        assert_eq!(
            (r.subnet_min, r.subnet_max),
            (ip6("fc00:0:0:10::"), ip6("fc00:0:0:20::"))
        );
        assert_eq!(r.subnet_count(), 17);
        assert_eq!(err_field(&mm("fc01::", "fc00:0:0:20::")), "IPv6SubnetMin");
        assert_eq!(err_field(&mm("fc00:0:0:10::", "fc01::")), "IPv6SubnetMax");
        assert_eq!(
            err_field(&mm("fc00:0:0:10::1", "fc00:0:0:20::")),
            "IPv6SubnetMin"
        );
        assert_eq!(
            err_field(&mm("fc00:0:0:10::", "fc00:0:0:20::8")),
            "IPv6SubnetMax"
        );
        assert_eq!(
            err_field(&mm("fc00:0:0:20::", "fc00:0:0:10::")),
            "IPv6SubnetMin"
        );
        assert_eq!(err_field(&mm("10.0.1.0", "fc00:0:0:20::")), "IPv6SubnetMin");
        assert_eq!(
            err_field(&mm("::ffff:10.0.1.0", "fc00:0:0:20::")),
            "IPv6SubnetMin"
        );
        for bad in [
            r#""10.0.0.0/16""#,
            r#""fc00::""#,
            r#""fc00::/129""#,
            "64",
            r#""::/0""#,
        ] {
            assert_eq!(
                err_field(&v6(&format!(r#""IPv6Network":{bad}"#))),
                "IPv6Network",
                "{bad}"
            );
        }
        // Host bits cleared, and the top of the space does not overflow.
        let r = parse(&v6(r#""IPv6Network":"ffff:ffff:ffff:ff00::1/56""#))
            .unwrap()
            .ipv6
            .unwrap();
        assert_eq!(r.network, "ffff:ffff:ffff:ff00::/56".parse().unwrap());
        assert_eq!(r.subnet_max, ip6("ffff:ffff:ffff:ffff::"));
        // A huge range saturates its count instead of overflowing.
        let r = parse(&v6(r#""IPv6Network":"fc00::/8","IPv6SubnetLen":120"#))
            .unwrap()
            .ipv6
            .unwrap();
        assert_eq!(r.subnet_count(), u64::MAX);
        let msg = parse(&mm("fc00:0:0:10::1", "fc00:0:0:20::"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("IPv6SubnetMin") && msg.contains("fc00:0:0:10::1"),
            "{msg}"
        );
    }

    #[test]
    fn kube_mode_reads_only_the_ipv6_network() {
        // flanneld's kube subnet manager skips CheckNetworkConfig for both families.
        let c = NetworkConfig::parse_with(
            v6(r#""IPv6Network":"fc00::/126","IPv6SubnetLen":7"#).as_bytes(),
            false,
        )
        .unwrap();
        assert_eq!(c.ipv6.unwrap().network, "fc00::/126".parse().unwrap());
        assert!(
            NetworkConfig::parse_with(v6(r#""IPv6Network":"nope""#).as_bytes(), false).is_err()
        );
    }

    #[test]
    fn dual_stack_is_served_in_kube_mode() {
        let text = v6(r#""IPv6Network":"fc00::/48""#);
        let c = NetworkConfig::parse_kube(text.as_bytes()).unwrap();
        assert_eq!(c.ipv6.unwrap().network, "fc00::/48".parse().unwrap());
        // IPv6-only stays refused, by name.
        match NetworkConfig::parse_kube(
            br#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"vxlan"}}"#,
        ) {
            Err(ConfigError::Field { field, .. }) => assert_eq!(field, "EnableIPv4"),
            other => panic!("{other:?}"),
        }
        // A broken IPv6 field is named before that.
        match NetworkConfig::parse(
            v6(r#""IPv6Network":"fc00::/48","IPv6SubnetLen":200"#).as_bytes(),
        ) {
            Err(ConfigError::Field { field, .. }) => assert_eq!(field, "IPv6SubnetLen"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_documents() {
        assert!(matches!(parse("{"), Err(ConfigError::Document(_))));
        assert!(matches!(parse("[]"), Err(ConfigError::Document(_))));
        assert!(matches!(parse(""), Err(ConfigError::Document(_))));
        let msg = parse(r#"{"Network":"10.0.0.0/16","SubnetLen":31,"Backend":{"Type":"vxlan"}}"#)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("SubnetLen") && msg.contains("31"), "{msg}");
    }
}
