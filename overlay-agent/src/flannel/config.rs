//! The network config at `<prefix>/config`, read with flannel's defaults and
//! validation (flannel's `ParseConfig` + `CheckNetworkConfig` and the VXLAN
//! backend's config), so that a config written for flanneld means the same
//! here. Only IPv4 with `Backend.Type = "vxlan"` is served.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;

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
        NetworkConfig::parse_with(text, false)
    }

    fn parse_with(text: &[u8], check_subnets: bool) -> Result<NetworkConfig, ConfigError> {
        let doc = GoObject::parse(text)?;

        let enable_ipv4 = opt_bool(&doc, "EnableIPv4")?.unwrap_or(true);
        let enable_ipv6 = opt_bool(&doc, "EnableIPv6")?.unwrap_or(false);
        if enable_ipv6 {
            return Err(field_err(
                "EnableIPv6",
                "IPv6 is not supported by overlay-agent; expected false or absent",
            ));
        }
        if !enable_ipv4 {
            return Err(field_err(
                "EnableIPv4",
                "overlay-agent serves IPv4 only; expected true or absent",
            ));
        }

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

/// `SubnetLen`, `SubnetMin` and `SubnetMax` with flannel's defaults, checked
/// as flannel's `CheckNetworkConfig` does.
fn subnet_range(doc: &GoObject, network: Ipv4Net) -> Result<(u8, Ipv4Addr, Ipv4Addr), ConfigError> {
    let prefix = network.prefix_len();
    let subnet_len = match doc.field("SubnetLen") {
        Field::Absent => 0,
        Field::Present(v) => v.as_u64().ok_or_else(|| {
            field_err(
                "SubnetLen",
                format!("expected a non-negative integer, got {}", v.to_json()),
            )
        })?,
    };
    let subnet_len: u8 = if subnet_len > 0 {
        // Room for the tunnel address and a bridge address on each host.
        if subnet_len > 30 {
            return Err(field_err(
                "SubnetLen",
                format!("must be at most 30 (less than /31), got {subnet_len}"),
            ));
        }
        let subnet_len = subnet_len as u8;
        // The first subnet is never leased, so at least four are needed.
        if subnet_len < prefix + 2 {
            return Err(field_err(
                "SubnetLen",
                format!(
                    "must be at least Network's prefix + 2 = {} so the network holds at \
                     least four subnets, got {subnet_len}",
                    prefix + 2
                ),
            ));
        }
        subnet_len
    } else if prefix > 28 {
        return Err(field_err(
            "Network",
            format!("/{prefix} is too small; the minimum useful network prefix is /28"),
        ));
    } else if prefix <= 22 {
        24
    } else {
        prefix + 2
    };

    let net_start = u32::from(network.network());
    let size = 1u32 << (32 - subnet_len);
    let mask = u32::MAX << (32 - subnet_len);

    let subnet_min = match opt_ip(doc, "SubnetMin")? {
        // An explicit 0.0.0.0 counts as unset, as in flannel.
        None | Some(Ipv4Addr::UNSPECIFIED) => Ipv4Addr::from(net_start.wrapping_add(size)),
        Some(ip) if network.contains(&ip) => ip,
        Some(ip) => {
            return Err(field_err(
                "SubnetMin",
                format!("{ip} is not in the range of the Network {network}"),
            ));
        }
    };
    let subnet_max = match opt_ip(doc, "SubnetMax")? {
        None | Some(Ipv4Addr::UNSPECIFIED) => {
            let next = u32::from(network.broadcast()).wrapping_add(1);
            Ipv4Addr::from(next.wrapping_sub(size))
        }
        Some(ip) if network.contains(&ip) => ip,
        Some(ip) => {
            return Err(field_err(
                "SubnetMax",
                format!("{ip} is not in the range of the Network {network}"),
            ));
        }
    };
    if u32::from(subnet_min) & mask != u32::from(subnet_min) {
        return Err(field_err(
            "SubnetMin",
            format!("{subnet_min} is not on a SubnetLen (/{subnet_len}) boundary"),
        ));
    }
    if u32::from(subnet_max) & mask != u32::from(subnet_max) {
        return Err(field_err(
            "SubnetMax",
            format!("{subnet_max} is not on a SubnetLen (/{subnet_len}) boundary"),
        ));
    }
    // Not checked by flannel, where it surfaces later as "out of subnets"
    // on every node; a config that can never lease anything is an error.
    if subnet_min > subnet_max {
        return Err(field_err(
            "SubnetMin",
            format!("{subnet_min} is above SubnetMax {subnet_max}: no subnet can be leased"),
        ));
    }

    Ok((subnet_len, subnet_min, subnet_max))
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
    match doc.field(name) {
        Field::Absent => Ok(None),
        Field::Present(v) => {
            let s = v.as_str().ok_or_else(|| {
                field_err(
                    name,
                    format!("expected an IPv4 address string, got {}", v.to_json()),
                )
            })?;
            parse_ipv4(s)
                .map(Some)
                .ok_or_else(|| field_err(name, format!("{s:?} is not an IPv4 address")))
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

fn parse_cidr(field: &'static str, v: &GoValue) -> Result<Ipv4Net, ConfigError> {
    let s = v.as_str().ok_or_else(|| {
        field_err(
            field,
            format!("expected an IPv4 CIDR string, got {}", v.to_json()),
        )
    })?;
    let bad = || {
        field_err(
            field,
            format!("{s:?} is not an IPv4 CIDR such as \"10.0.0.0/16\""),
        )
    };
    let (addr, len) = s.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let len: u8 = len.parse().map_err(|_| bad())?;
    let net = Ipv4Net::new(addr, len).map_err(|_| bad())?;
    Ok(net.trunc())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetworkConfig, ConfigError> {
        NetworkConfig::parse(s.as_bytes())
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
            "EnableIPv6"
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
