//! Subnet lease keys and values, byte-compatible with flannel's etcd layout.
//!
//! Key (below `<prefix>/`): `subnets/10.5.52.0-24`, or for a dual-stack
//! flanneld `subnets/10.5.52.0-24&fd00:1::-64`.
//! Value, as flanneld's VXLAN backend writes it:
//! `{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}`
//! and for dual stack `PublicIPv6` holds the node's IPv6 and
//! `"BackendV6Data":{"VNI":1,"VtepMAC":"..."}` follows (the v6 VTEP has its
//! own MAC). Older flanneld versions wrote neither `PublicIPv6` nor `VNI`.

use crate::printable::printable;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::flannel::config::{parse_ipv4, parse_ipv6};
use crate::flannel::gojson::{Field, GoObject, GoValue};
use crate::flannel::mac::MacAddr;

/// The directory of leases below the prefix.
pub const SUBNETS_DIR: &str = "subnets";

/// `10.5.52.0-24`: the last component of a lease key.
pub fn subnet_key(subnet: Ipv4Net) -> String {
    format!("{}-{}", subnet.addr(), subnet.prefix_len())
}

/// `10.5.52.0-24&fc00:0:0:1::-64`: the last component of a dual-stack
/// lease key (flannel's `MakeSubnetKey`; the IPv6 part in RFC 5952 text as
/// Go prints it), or [`subnet_key`] without an IPv6 subnet.
pub fn dual_subnet_key(subnet: Ipv4Net, ipv6: Option<Ipv6Net>) -> String {
    match ipv6 {
        None => subnet_key(subnet),
        Some(v6) => format!("{}&{}-{}", subnet_key(subnet), v6.addr(), v6.prefix_len()),
    }
}

/// The subnets a lease key names: the IPv4 one, and the IPv6 one of a
/// dual-stack lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseSubnets {
    pub v4: Ipv4Net,
    pub v6: Option<Ipv6Net>,
}

impl From<Ipv4Net> for LeaseSubnets {
    fn from(v4: Ipv4Net) -> Self {
        LeaseSubnets { v4, v6: None }
    }
}

impl std::fmt::Display for LeaseSubnets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.v6 {
            None => write!(f, "{}", self.v4),
            Some(v6) => write!(f, "{} and {v6}", self.v4),
        }
    }
}

/// `<prefix>/subnets/10.5.52.0-24` (or `...-24&fc00:0:0:1::-64`).
pub fn lease_key(prefix: &str, subnets: impl Into<LeaseSubnets>) -> String {
    let subnets = subnets.into();
    format!(
        "{}/{SUBNETS_DIR}/{}",
        prefix.trim_end_matches('/'),
        dual_subnet_key(subnets.v4, subnets.v6)
    )
}

/// `<prefix>/subnets/` (what to list and watch).
pub fn subnets_prefix(prefix: &str) -> String {
    format!("{}/{SUBNETS_DIR}/", prefix.trim_end_matches('/'))
}

/// `<prefix>/config`.
pub fn config_key(prefix: &str) -> String {
    format!("{}/config", prefix.trim_end_matches('/'))
}

/// The subnets named by a lease key (a full key or its last component).
/// The IPv4 subnet must be a network address: a key with host bits set would
/// make a peer route through a wrong gateway, so it is rejected.
pub fn parse_subnet_key(key: &str) -> Result<(Ipv4Net, Option<Ipv6Net>), String> {
    let last = key.rsplit('/').next().unwrap_or(key);
    let (v4, v6) = match last.split_once('&') {
        Some((a, b)) => (a, Some(b)),
        None => (last, None),
    };
    let v4 = parse_key_net(v4)
        .and_then(|(ip, len)| Ipv4Net::new(ip.parse().ok()?, len).ok())
        .ok_or_else(|| format!("{last:?} is not of the form 10.5.52.0-24"))?;
    if v4.addr() != v4.network() {
        return Err(format!(
            "{last:?} has host bits set (expected {}-{})",
            v4.network(),
            v4.prefix_len()
        ));
    }
    let v6 = match v6 {
        None => None,
        Some(s) => Some(
            parse_key_net(s)
                .and_then(|(ip, len)| Ipv6Net::new(ip.parse().ok()?, len).ok())
                .ok_or_else(|| format!("{last:?}: IPv6 part {s:?} is not of the form fd00::-64"))?,
        ),
    };
    Ok((v4, v6))
}

fn parse_key_net(s: &str) -> Option<(&str, u8)> {
    let (ip, len) = s.rsplit_once('-')?;
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((ip, len.parse().ok()?))
}

/// Our own lease value, byte for byte as flanneld's VXLAN backend writes it.
pub fn encode_vxlan(public_ip: Ipv4Addr, vni: u32, vtep_mac: MacAddr) -> String {
    encode_vxlan_dual(public_ip, vni, vtep_mac, None)
}

/// Our own lease value with, for dual stack, the node's IPv6 and the MAC
/// of its `flannel-v6.<VNI>` (Go's field order: `PublicIP`, `PublicIPv6`,
/// `BackendType`, `BackendData`, `BackendV6Data`).
pub fn encode_vxlan_dual(
    public_ip: Ipv4Addr,
    vni: u32,
    vtep_mac: MacAddr,
    v6: Option<(Ipv6Addr, MacAddr)>,
) -> String {
    let data = |mac: MacAddr| format!(r#"{{"VNI":{vni},"VtepMAC":"{mac}"}}"#);
    match v6 {
        None => format!(
            r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{}}}"#,
            data(vtep_mac)
        ),
        Some((public_ipv6, mac6)) => format!(
            r#"{{"PublicIP":"{public_ip}","PublicIPv6":"{public_ipv6}","BackendType":"vxlan","BackendData":{},"BackendV6Data":{}}}"#,
            data(vtep_mac),
            data(mac6)
        ),
    }
}

/// A lease read from etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub subnet: Ipv4Net,
    /// Set on dual-stack flanneld leases; we serve only the IPv4 side.
    pub ipv6_subnet: Option<Ipv6Net>,
    pub public_ip: Ipv4Addr,
    pub public_ipv6: Option<Ipv6Addr>,
    pub backend: Backend,
    /// `BackendV6Data.VtepMAC` of a VXLAN lease, when present.
    pub vtep_mac_v6: Option<MacAddr>,
}

/// Another node's VXLAN lease as the datapath needs it: where its subnet
/// goes (`PublicIP`) and through which VTEP (`VtepMAC`). [`Lease::peer`] makes
/// one; `crate::datapath` re-exports it for the datapaths and their callers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    pub vtep_mac: MacAddr,
    /// The lease's IPv6 side, when this node and the peer are both dual
    /// stack (the reconciler sets it; the IPv4 datapath ignores it).
    pub v6: Option<Peer6>,
}

/// The IPv6 side of a dual-stack VXLAN lease, as the `flannel-v6.<VNI>`
/// device needs it: the peer's IPv6 subnet, its `PublicIPv6` and the MAC of
/// its own v6 VTEP (`BackendV6Data.VtepMAC`, distinct from the v4 one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Peer6 {
    pub subnet: Ipv6Net,
    pub public_ip: Ipv6Addr,
    pub vtep_mac: MacAddr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    Vxlan {
        /// Absent in leases written by older flanneld.
        vni: Option<u32>,
        vtep_mac: MacAddr,
    },
    /// Another backend type (`host-gw`, `udp`, ...): ignored by the VXLAN backend.
    Other(String),
}

impl Lease {
    /// The datapath's view of a VXLAN lease; `None` for other backends.
    pub fn peer(&self) -> Option<Peer> {
        match self.backend {
            Backend::Vxlan { vtep_mac, .. } => Some(Peer {
                subnet: self.subnet,
                public_ip: self.public_ip,
                vtep_mac,
                v6: None,
            }),
            Backend::Other(_) => None,
        }
    }

    /// The IPv6 side of a dual-stack VXLAN lease; `None` when the lease has
    /// no IPv6 subnet, or lacks its `PublicIPv6` or `BackendV6Data`.
    pub fn peer6(&self) -> Option<Peer6> {
        match self.backend {
            Backend::Vxlan { .. } => Some(Peer6 {
                subnet: self.ipv6_subnet?,
                public_ip: self.public_ipv6?,
                vtep_mac: self.vtep_mac_v6?,
            }),
            Backend::Other(_) => None,
        }
    }
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
// Key and reason carry what a node wrote: escaped for logs and `status`.
#[error("lease {}: {}", printable(.key), printable(.reason))]
pub struct LeaseError {
    pub key: String,
    pub reason: String,
}

/// Decode a lease from its key and value. Errors name the key so that the
/// caller can log and skip it.
pub fn decode(key: &str, value: &[u8]) -> Result<Lease, LeaseError> {
    let err = |reason: String| LeaseError {
        key: key.to_owned(),
        reason,
    };
    let (subnet, ipv6_subnet) = parse_subnet_key(key).map_err(err)?;
    let doc = GoObject::parse(value).map_err(|e| err(e.to_string()))?;

    let public_ip = match doc.field("PublicIP") {
        Field::Absent => return Err(err("PublicIP is missing".into())),
        Field::Present(v) => v
            .as_str()
            .and_then(parse_ipv4)
            .ok_or_else(|| err(format!("PublicIP {} is not an IPv4 address", v.to_json())))?,
    };
    let public_ipv6 =
        match doc.field("PublicIPv6") {
            // Go marshals a nil *IP as null, which reads as absent.
            Field::Absent => None,
            Field::Present(v) => Some(v.as_str().and_then(parse_ipv6).ok_or_else(|| {
                err(format!("PublicIPv6 {} is not an IPv6 address", v.to_json()))
            })?),
        };
    let backend_type = match doc.field("BackendType") {
        Field::Absent => String::new(),
        Field::Present(v) => v
            .as_str()
            .ok_or_else(|| err(format!("BackendType {} is not a string", v.to_json())))?
            .to_owned(),
    };
    // The VXLAN backend compares the type exactly.
    if backend_type != "vxlan" {
        return Ok(Lease {
            subnet,
            ipv6_subnet,
            public_ip,
            public_ipv6,
            backend: Backend::Other(backend_type),
            vtep_mac_v6: None,
        });
    }
    let data = match doc.field("BackendData") {
        Field::Present(GoValue::Object(o)) => o,
        Field::Present(v) => {
            return Err(err(format!(
                "BackendData is {}, expected an object",
                v.kind()
            )));
        }
        Field::Absent => return Err(err("BackendData is missing".into())),
    };
    let backend = vxlan_data(data, "BackendData.").map_err(err)?;
    let vtep_mac_v6 = match doc.field("BackendV6Data") {
        Field::Absent => None,
        Field::Present(GoValue::Object(o)) => match vxlan_data(o, "BackendV6Data.").map_err(err)? {
            Backend::Vxlan { vtep_mac, .. } => Some(vtep_mac),
            Backend::Other(_) => None,
        },
        Field::Present(v) => {
            return Err(err(format!(
                "BackendV6Data is {}, expected an object",
                v.kind()
            )));
        }
    };
    Ok(Lease {
        subnet,
        ipv6_subnet,
        public_ip,
        public_ipv6,
        backend,
        vtep_mac_v6,
    })
}

/// The VXLAN backend's data as flanneld writes it (`{"VNI":1,"VtepMAC":
/// "..."}`), from a Node's `backend-data` annotation; errors name the
/// field.
pub fn vxlan_backend(data: &[u8]) -> Result<Backend, String> {
    let doc = GoObject::parse(data).map_err(|e| e.to_string())?;
    vxlan_data(&doc, "")
}

/// `VNI` and `VtepMAC` of a VXLAN lease's data; `field` prefixes the
/// field names in errors.
fn vxlan_data(data: &GoObject, field: &str) -> Result<Backend, String> {
    let err = |s: String| s;
    let vni = match data.field("VNI") {
        Field::Absent => None,
        Field::Present(v) => Some(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| err(format!("{field}VNI {} is not a VNI", v.to_json())))?,
        ),
    };
    let vtep_mac = match data.field("VtepMAC") {
        Field::Absent => return Err(err(format!("{field}VtepMAC is missing"))),
        Field::Present(v) => v
            .as_str()
            .and_then(|s| s.parse::<MacAddr>().ok())
            .ok_or_else(|| {
                err(format!(
                    "{field}VtepMAC {} is not a MAC address",
                    v.to_json()
                ))
            })?,
    };
    Ok(Backend::Vxlan { vni, vtep_mac })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLANNEL_VALUE: &str = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn keys_round_trip() {
        assert_eq!(subnet_key(net("10.5.52.0/24")), "10.5.52.0-24");
        assert_eq!(
            lease_key("/coreos.com/network", net("10.15.64.0/20")),
            "/coreos.com/network/subnets/10.15.64.0-20"
        );
        assert_eq!(
            lease_key("/coreos.com/network/", net("10.15.64.0/20")),
            "/coreos.com/network/subnets/10.15.64.0-20"
        );
        assert_eq!(
            config_key("/coreos.com/network"),
            "/coreos.com/network/config"
        );
        assert_eq!(subnets_prefix("/x"), "/x/subnets/");
        for k in ["10.5.52.0-24", "/coreos.com/network/subnets/10.13.48.0-20"] {
            let (n, v6) = parse_subnet_key(k).unwrap();
            assert!(v6.is_none());
            assert!(k.ends_with(&subnet_key(n)));
        }
        let (n, v6) = parse_subnet_key("/p/subnets/10.5.52.0-24&fd00:1::-64").unwrap();
        assert_eq!(n, net("10.5.52.0/24"));
        assert_eq!(v6, Some("fd00:1::/64".parse().unwrap()));
    }

    #[test]
    fn bad_keys() {
        for k in [
            "/p/subnets/10.5.52.0",
            "/p/subnets/10.5.52.0-",
            "/p/subnets/10.5.52.0-33",
            "/p/subnets/10.5.52.0--1",
            "/p/subnets/10.5.52-24",
            "/p/subnets/10.5.52.1-24",
            "/p/subnets/garbage",
            "/p/subnets/10.5.52.0-24&zz-64",
        ] {
            assert!(parse_subnet_key(k).is_err(), "{k}");
        }
    }

    #[test]
    fn encodes_exactly_like_flannel() {
        let v = encode_vxlan(
            "192.168.64.3".parse().unwrap(),
            1,
            "c6:d2:32:6f:8f:44".parse().unwrap(),
        );
        assert_eq!(v, FLANNEL_VALUE);
    }

    #[test]
    fn decodes_current_and_old_forms() {
        let l = decode(
            "/coreos.com/network/subnets/10.5.52.0-24",
            FLANNEL_VALUE.as_bytes(),
        )
        .unwrap();
        assert_eq!(l.subnet, net("10.5.52.0/24"));
        assert_eq!(l.public_ip, "192.168.64.3".parse::<Ipv4Addr>().unwrap());
        assert_eq!(l.public_ipv6, None);
        assert_eq!(
            l.backend,
            Backend::Vxlan {
                vni: Some(1),
                vtep_mac: "c6:d2:32:6f:8f:44".parse().unwrap()
            }
        );
        // Seed 001, as `etcdctl get | jq .` printed it (flannel v0.6).
        let old = r#"{
    "PublicIP": "192.168.205.10",
    "BackendType": "vxlan",
    "BackendData": {
      "VtepMAC": "82:53:2e:6a:a9:43"
    }
  }"#;
        let l = decode("/coreos.com/network/subnets/10.15.64.0-20", old.as_bytes()).unwrap();
        assert_eq!(
            l.peer().unwrap(),
            Peer {
                subnet: net("10.15.64.0/20"),
                public_ip: "192.168.205.10".parse().unwrap(),
                vtep_mac: "82:53:2e:6a:a9:43".parse().unwrap(),
                v6: None,
            }
        );
        assert_eq!(
            l.backend,
            Backend::Vxlan {
                vni: None,
                vtep_mac: "82:53:2e:6a:a9:43".parse().unwrap()
            }
        );
        // Seed 001's second lease, compact.
        let l = decode(
            "/coreos.com/network/subnets/10.13.48.0-20",
            br#"{"PublicIP":"192.168.205.11","BackendType":"vxlan","BackendData":{"VtepMAC":"9e:e7:65:f3:9d:31"}}"#,
        )
        .unwrap();
        assert_eq!(l.peer().unwrap().vtep_mac.to_string(), "9e:e7:65:f3:9d:31");
        // Our own encoding decodes to what we encoded.
        let mac: MacAddr = "02:11:22:33:44:55".parse().unwrap();
        let l = decode(
            "10.0.13.0-24",
            encode_vxlan("10.211.55.10".parse().unwrap(), 100, mac).as_bytes(),
        )
        .unwrap();
        assert_eq!(
            l.backend,
            Backend::Vxlan {
                vni: Some(100),
                vtep_mac: mac
            }
        );
    }

    /// B.2's dual-stack value, as flanneld's json.Marshal writes it.
    const FLANNEL_DUAL_VALUE: &str = r#"{"PublicIP":"192.168.64.3","PublicIPv6":"2001:db8::3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"},"BackendV6Data":{"VNI":1,"VtepMAC":"7a:01:9e:55:20:0b"}}"#;

    #[test]
    fn dual_stack_keys_and_values_are_flannel_s() {
        let v6: Ipv6Net = "fc00:0:0:1::/64".parse().unwrap();
        assert_eq!(
            dual_subnet_key(net("10.5.34.0/24"), Some(v6)),
            "10.5.34.0-24&fc00:0:0:1::-64"
        );
        assert_eq!(dual_subnet_key(net("10.5.34.0/24"), None), "10.5.34.0-24");
        // Go's RFC 5952 text: lower case, the longest zero run compressed.
        let v6: Ipv6Net = "2001:DB8:0:0:1:0:0:0/80".parse().unwrap();
        assert_eq!(
            dual_subnet_key(net("10.5.34.0/24"), Some(v6)),
            "10.5.34.0-24&2001:db8:0:0:1::-80"
        );
        let key = dual_subnet_key(net("10.5.34.0/24"), Some(v6));
        assert_eq!(
            parse_subnet_key(&key).unwrap(),
            (net("10.5.34.0/24"), Some(v6))
        );

        let v = encode_vxlan_dual(
            "192.168.64.3".parse().unwrap(),
            1,
            "c6:d2:32:6f:8f:44".parse().unwrap(),
            Some((
                "2001:db8::3".parse().unwrap(),
                "7a:01:9e:55:20:0b".parse().unwrap(),
            )),
        );
        assert_eq!(v, FLANNEL_DUAL_VALUE);
        assert_eq!(
            encode_vxlan_dual(
                "192.168.64.3".parse().unwrap(),
                1,
                "c6:d2:32:6f:8f:44".parse().unwrap(),
                None
            ),
            FLANNEL_VALUE
        );
    }

    #[test]
    fn decodes_dual_stack_leases() {
        let l = decode(
            "/coreos.com/network/subnets/10.5.34.0-24&fc00:0:0:1::-64",
            FLANNEL_DUAL_VALUE.as_bytes(),
        )
        .unwrap();
        assert_eq!(l.peer().unwrap().vtep_mac.to_string(), "c6:d2:32:6f:8f:44");
        assert_eq!(
            l.peer6().unwrap(),
            Peer6 {
                subnet: "fc00:0:0:1::/64".parse().unwrap(),
                public_ip: "2001:db8::3".parse().unwrap(),
                vtep_mac: "7a:01:9e:55:20:0b".parse().unwrap(),
            }
        );
        // A v4-only lease (an older node) has no IPv6 side.
        let l = decode("/p/subnets/10.5.52.0-24", FLANNEL_VALUE.as_bytes()).unwrap();
        assert_eq!(l.peer6(), None);
        assert!(l.peer().is_some());
        // A v6 key whose value lacks the v6 parts is v4 only to the datapath.
        let l = decode(
            "/p/subnets/10.5.52.0-24&fc00::-64",
            FLANNEL_VALUE.as_bytes(),
        )
        .unwrap();
        assert_eq!(l.ipv6_subnet, Some("fc00::/64".parse().unwrap()));
        assert_eq!(l.peer6(), None);
        // Malformed v6 parts name the field.
        for (value, field) in [
            (
                r#"{"PublicIP":"192.168.64.3","PublicIPv6":"10.0.0.1","BackendType":"vxlan","BackendData":{"VtepMAC":"c6:d2:32:6f:8f:44"}}"#,
                "PublicIPv6",
            ),
            (
                r#"{"PublicIP":"192.168.64.3","PublicIPv6":"::ffff:10.0.0.1","BackendType":"vxlan","BackendData":{"VtepMAC":"c6:d2:32:6f:8f:44"}}"#,
                "PublicIPv6",
            ),
            (
                r#"{"PublicIP":"192.168.64.3","BackendType":"vxlan","BackendData":{"VtepMAC":"c6:d2:32:6f:8f:44"},"BackendV6Data":{"VtepMAC":"xx"}}"#,
                "BackendV6Data.VtepMAC",
            ),
            (
                r#"{"PublicIP":"192.168.64.3","BackendType":"vxlan","BackendData":{"VtepMAC":"c6:d2:32:6f:8f:44"},"BackendV6Data":[]}"#,
                "BackendV6Data",
            ),
        ] {
            let e = decode("/p/subnets/10.5.52.0-24&fc00::-64", value.as_bytes()).unwrap_err();
            assert!(e.reason.starts_with(field), "{value}: {e}");
        }
    }

    #[test]
    fn other_backends_are_not_peers() {
        let l = decode(
            "/p/subnets/10.5.53.0-24",
            br#"{"PublicIP":"192.168.64.4","BackendType":"host-gw"}"#,
        )
        .unwrap();
        assert_eq!(l.backend, Backend::Other("host-gw".into()));
        assert_eq!(l.peer(), None);
    }

    #[test]
    fn malformed_leases_name_the_key() {
        let key = "/coreos.com/network/subnets/10.5.52.0-24";
        for value in [
            "not json",
            "[]",
            r#"{"BackendType":"vxlan","BackendData":{"VtepMAC":"c6:d2:32:6f:8f:44"}}"#,
            r#"{"PublicIP":"300.1.1.1","BackendType":"vxlan","BackendData":{"VtepMAC":"c6:d2:32:6f:8f:44"}}"#,
            r#"{"PublicIP":"192.168.64.3","BackendType":"vxlan"}"#,
            r#"{"PublicIP":"192.168.64.3","BackendType":"vxlan","BackendData":{}}"#,
            r#"{"PublicIP":"192.168.64.3","BackendType":"vxlan","BackendData":{"VtepMAC":"c6:d2"}}"#,
            r#"{"PublicIP":"192.168.64.3","BackendType":"vxlan","BackendData":{"VNI":-1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#,
        ] {
            let e = decode(key, value.as_bytes()).unwrap_err();
            assert_eq!(e.key, key, "{value}");
            assert!(e.to_string().contains(key));
        }
        let e = decode(
            "/coreos.com/network/subnets/bogus",
            FLANNEL_VALUE.as_bytes(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("bogus"));
    }

    #[test]
    fn lease_errors_print_escaped() {
        let e = decode(
            "/coreos.com/network/subnets/10.0.1.0-24\nINFO forged",
            b"{\"PublicIP\":\"10.0.0.1\"}",
        )
        .unwrap_err();
        let shown = e.to_string();
        assert!(!shown.contains('\n'), "{shown}");
        assert!(shown.contains("10.0.1.0-24\\x0aINFO forged"), "{shown}");
    }
}
