//! flannel's Node annotations (`pkg/subnet/kube/annotations.go` and the
//! VXLAN backend's lease attributes): their names under
//! `--kube-annotation-prefix`, the values flanneld writes, and which of
//! them a start must write. Pure: no API calls here.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use crate::{
    flannel::gojson::{Field, GoObject},
    flannel::mac::MacAddr,
};

/// flanneld's `--kube-annotation-prefix` default.
pub const DEFAULT_PREFIX: &str = "flannel.alpha.coreos.com";

/// The backend type this agent serves and writes.
pub const BACKEND_TYPE: &str = "vxlan";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrefixError {
    #[error("--kube-annotation-prefix {0:?}: the prefix can contain at most a single slash")]
    Slashes(String),
    #[error("--kube-annotation-prefix {0:?}: the prefix must be in a format: fqdn/[0-9a-z-_]*")]
    Format(String),
}

/// The annotation keys under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    pub subnet_manager: String,
    pub backend_data: String,
    /// The `flannel-v6.<VNI>` device's VNI and MAC, for dual stack.
    pub backend_v6_data: String,
    pub backend_type: String,
    pub public_ip: String,
    pub public_ipv6: String,
    /// Set by operators: replaces the `public-ip` this node publishes.
    pub public_ip_overwrite: String,
    /// Set by operators: replaces the `public-ipv6` this node publishes.
    pub public_ipv6_overwrite: String,
    /// Set by operators: replaces `--public-ip` before the interface is chosen.
    pub node_public_ip: String,
    /// Set by operators: replaces `--public-ipv6` before the interface is chosen.
    pub node_public_ipv6: String,
}

impl Names {
    /// flannel's normalisation: no slash gets `/` appended; one slash not
    /// at the end and not after a `-` gets `-` appended; the result must
    /// be `fqdn/` with an optional `name-` after it.
    pub fn new(prefix: &str) -> Result<Names, PrefixError> {
        let mut p = prefix.to_owned();
        match p.matches('/').count() {
            0 => p.push('/'),
            1 if !p.ends_with('/') && !p.ends_with('-') => p.push('-'),
            1 => {}
            _ => return Err(PrefixError::Slashes(prefix.to_owned())),
        }
        if !valid_prefix(&p) {
            return Err(PrefixError::Format(prefix.to_owned()));
        }
        let key = |name: &str| format!("{p}{name}");
        Ok(Names {
            subnet_manager: key("kube-subnet-manager"),
            backend_data: key("backend-data"),
            backend_v6_data: key("backend-v6-data"),
            backend_type: key("backend-type"),
            public_ip: key("public-ip"),
            public_ipv6: key("public-ipv6"),
            public_ip_overwrite: key("public-ip-overwrite"),
            public_ipv6_overwrite: key("public-ipv6-overwrite"),
            node_public_ip: key("node-public-ip"),
            node_public_ipv6: key("node-public-ipv6"),
        })
    }
}

/// `(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?$`, anchored at the end
/// only as flannel's regexp is: whatever precedes a matching suffix passes.
/// Checked by hand to keep the rule readable next to flannel's.
fn valid_prefix(p: &str) -> bool {
    let word = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    };
    let Some((fqdn, rest)) = p.split_once('/') else {
        return false;
    };
    let rest_ok = rest.is_empty() || (rest.ends_with('-') && word(&rest[..rest.len() - 1]));
    // Unanchored at the start: the label before the slash must be valid,
    // and the one before it needs only a valid last character (the match
    // may begin inside it).
    let mut labels = fqdn.rsplit('.');
    let last_ok = labels.next().is_some_and(word);
    let before_ok = labels
        .next()
        .and_then(|l| l.bytes().last())
        .is_some_and(|b| word(std::str::from_utf8(&[b]).unwrap_or("")));
    let fqdn_ok = last_ok && before_ok;
    rest_ok && fqdn_ok
}

/// `backend-data` as flanneld's VXLAN backend marshals it (Go field order,
/// no spaces, the MAC in lower-case hex).
pub fn backend_data(vni: u32, mac: MacAddr) -> String {
    format!(r#"{{"VNI":{vni},"VtepMAC":"{mac}"}}"#)
}

/// The VTEP MAC a previous run published in `backend-data`, so that the
/// device keeps its MAC across restarts and re-creation (flannel's
/// `GetStoredMacAddresses`, which reads the raw JSON by string slicing;
/// here it is parsed).
pub fn stored_mac(annotations: &BTreeMap<String, String>, names: &Names) -> Option<MacAddr> {
    mac_in(annotations.get(&names.backend_data)?)
}

/// The `flannel-v6.<VNI>` MAC a previous run published in
/// `backend-v6-data` (flannel's `GetStoredMacAddresses`, IPv6 half).
pub fn stored_mac_v6(annotations: &BTreeMap<String, String>, names: &Names) -> Option<MacAddr> {
    mac_in(annotations.get(&names.backend_v6_data)?)
}

fn mac_in(data: &str) -> Option<MacAddr> {
    let doc = GoObject::parse(data.as_bytes()).ok()?;
    match doc.field("VtepMAC") {
        Field::Present(v) => v.as_str()?.parse().ok(),
        Field::Absent => None,
    }
}

/// What this node publishes about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Own {
    pub vni: u32,
    pub vtep_mac: MacAddr,
    /// The lease's PublicIP (`--public-ip`, or the interface's address).
    pub public_ip: Ipv4Addr,
    /// Dual stack: what this node publishes about its IPv6 side.
    pub ipv6: Option<Own6>,
}

/// The IPv6 side of a dual-stack node: `flannel-v6.<VNI>`'s MAC and the
/// lease's PublicIPv6 (`--public-ipv6`, `node-public-ipv6`, or the
/// interface's address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Own6 {
    pub vtep_mac: MacAddr,
    pub public_ip: Ipv6Addr,
}

/// The annotations a start must write, as `(key, value)`: empty when the
/// node already carries them all (flanneld's "unchanged, skip"). Only
/// changed keys are listed, as the two-way merge patch flanneld computes.
/// `public-ip-overwrite`, when set, is what `public-ip` says. Dual stack
/// adds `backend-v6-data` and `public-ipv6` (`public-ipv6-overwrite` when
/// set), after the IPv4 ones as flanneld's patch lists them.
pub fn changes(
    current: &BTreeMap<String, String>,
    names: &Names,
    own: &Own,
) -> Vec<(String, String)> {
    let overwritten = |key: &String, ours: String| match current.get(key) {
        Some(o) if !o.is_empty() => o.clone(),
        _ => ours,
    };
    let mut wanted = vec![
        (&names.backend_type, BACKEND_TYPE.to_owned()),
        (&names.backend_data, backend_data(own.vni, own.vtep_mac)),
        (
            &names.public_ip,
            overwritten(&names.public_ip_overwrite, own.public_ip.to_string()),
        ),
        (&names.subnet_manager, "true".to_owned()),
    ];
    if let Some(v6) = own.ipv6 {
        wanted.push((&names.backend_v6_data, backend_data(own.vni, v6.vtep_mac)));
        wanted.push((
            &names.public_ipv6,
            overwritten(&names.public_ipv6_overwrite, v6.public_ip.to_string()),
        ));
    }
    wanted
        .into_iter()
        .filter(|(k, v)| current.get(*k) != Some(v))
        .map(|(k, v)| (k.clone(), v))
        .collect()
}

/// The strategic-merge patch body for `nodes/<name>/status` that sets
/// `changes`: `{"metadata":{"annotations":{...}}}`.
pub fn patch_body(changes: &[(String, String)]) -> serde_json::Value {
    let annotations: serde_json::Map<String, serde_json::Value> = changes
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::json!({ "metadata": { "annotations": annotations } })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_normalise_as_flannel_does() {
        // flannel's annotations_test.go cases.
        let ok = [
            (
                "flannel.alpha.coreos.com",
                "flannel.alpha.coreos.com/backend-type",
            ),
            ("org.com", "org.com/backend-type"),
            ("org.com/", "org.com/backend-type"),
            (
                "flannel.alpha.coreos.com/prefix",
                "flannel.alpha.coreos.com/prefix-backend-type",
            ),
            (
                "flannel.alpha.coreos.com/prefix-",
                "flannel.alpha.coreos.com/prefix-backend-type",
            ),
            ("org.com/9", "org.com/9-backend-type"),
            ("org9.com/", "org9.com/backend-type"),
            ("org_com.com/", "org_com.com/backend-type"),
        ];
        for (p, want) in ok {
            assert_eq!(Names::new(p).unwrap().backend_type, want, "{p}");
        }
        assert_eq!(
            Names::new("a.b/c/d"),
            Err(PrefixError::Slashes("a.b/c/d".into()))
        );
        // Go's regexp is not anchored at the start.
        assert!(Names::new("Ba.com").is_ok());
        for bad in [
            "org",
            "org/",
            "org.COM",
            "org.com/PREFIX",
            "/",
            "org.com/pre.fix",
            "aB.com",
            "A.com",
        ] {
            assert!(
                matches!(Names::new(bad), Err(PrefixError::Format(_))),
                "{bad} should be refused"
            );
        }
    }

    fn names() -> Names {
        Names::new(DEFAULT_PREFIX).unwrap()
    }

    fn own() -> Own {
        Own {
            vni: 1,
            vtep_mac: "0a:1b:2c:3d:4e:5f".parse().unwrap(),
            public_ip: Ipv4Addr::new(192, 168, 1, 10),
            ipv6: None,
        }
    }

    fn own_dual() -> Own {
        Own {
            ipv6: Some(Own6 {
                vtep_mac: "0a:1b:2c:3d:4e:60".parse().unwrap(),
                public_ip: "2001:db8::10".parse().unwrap(),
            }),
            ..own()
        }
    }

    #[test]
    fn values_are_flannels_bytes() {
        assert_eq!(
            backend_data(1, "0a:1b:2c:3d:4e:5f".parse().unwrap()),
            r#"{"VNI":1,"VtepMAC":"0a:1b:2c:3d:4e:5f"}"#
        );
        let all = changes(&BTreeMap::new(), &names(), &own());
        assert_eq!(
            all,
            [
                (
                    "flannel.alpha.coreos.com/backend-type".into(),
                    "vxlan".into()
                ),
                (
                    "flannel.alpha.coreos.com/backend-data".into(),
                    r#"{"VNI":1,"VtepMAC":"0a:1b:2c:3d:4e:5f"}"#.into()
                ),
                (
                    "flannel.alpha.coreos.com/public-ip".into(),
                    "192.168.1.10".into()
                ),
                (
                    "flannel.alpha.coreos.com/kube-subnet-manager".into(),
                    "true".into()
                ),
            ]
        );
        assert_eq!(
            patch_body(&all[..1]).to_string(),
            r#"{"metadata":{"annotations":{"flannel.alpha.coreos.com/backend-type":"vxlan"}}}"#
        );
    }

    #[test]
    fn only_what_differs_is_written() {
        let n = names();
        let mut current: BTreeMap<String, String> =
            changes(&BTreeMap::new(), &n, &own()).into_iter().collect();
        current.insert("other/annotation".into(), "x".into());
        assert!(changes(&current, &n, &own()).is_empty());
        let mut moved = own();
        moved.vtep_mac = "0a:1b:2c:3d:4e:60".parse().unwrap();
        assert_eq!(
            changes(&current, &n, &moved),
            [(n.backend_data.clone(), backend_data(1, moved.vtep_mac))]
        );
        current.insert(n.public_ip_overwrite.clone(), "203.0.113.7".into());
        assert_eq!(
            changes(&current, &n, &own()),
            [(n.public_ip.clone(), "203.0.113.7".into())]
        );
        current.insert(n.public_ip.clone(), "203.0.113.7".into());
        assert!(changes(&current, &n, &own()).is_empty());
    }

    #[test]
    fn the_mac_is_restored_from_our_annotation() {
        let n = names();
        let mut a = BTreeMap::new();
        assert_eq!(stored_mac(&a, &n), None);
        a.insert(
            n.backend_data.clone(),
            r#"{"VNI":1,"VtepMAC":"0a:1b:2c:3d:4e:5f"}"#.into(),
        );
        assert_eq!(
            stored_mac(&a, &n),
            Some("0a:1b:2c:3d:4e:5f".parse().unwrap())
        );
        a.insert(n.backend_data.clone(), "garbage".into());
        assert_eq!(stored_mac(&a, &n), None);
    }

    #[test]
    fn dual_stack_adds_flannels_ipv6_annotations() {
        let n = names();
        assert_eq!(
            n.backend_v6_data,
            "flannel.alpha.coreos.com/backend-v6-data"
        );
        assert_eq!(n.public_ipv6, "flannel.alpha.coreos.com/public-ipv6");
        assert_eq!(
            n.public_ipv6_overwrite,
            "flannel.alpha.coreos.com/public-ipv6-overwrite"
        );
        assert_eq!(
            n.node_public_ipv6,
            "flannel.alpha.coreos.com/node-public-ipv6"
        );
        let all = changes(&BTreeMap::new(), &n, &own_dual());
        let got: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            got,
            [
                ("flannel.alpha.coreos.com/backend-type", "vxlan"),
                (
                    "flannel.alpha.coreos.com/backend-data",
                    r#"{"VNI":1,"VtepMAC":"0a:1b:2c:3d:4e:5f"}"#
                ),
                ("flannel.alpha.coreos.com/public-ip", "192.168.1.10"),
                ("flannel.alpha.coreos.com/kube-subnet-manager", "true"),
                (
                    "flannel.alpha.coreos.com/backend-v6-data",
                    r#"{"VNI":1,"VtepMAC":"0a:1b:2c:3d:4e:60"}"#
                ),
                ("flannel.alpha.coreos.com/public-ipv6", "2001:db8::10"),
            ]
        );
        // RFC 5952 text, as Go's net.IP.String().
        let mut long = own_dual();
        long.ipv6.as_mut().unwrap().public_ip =
            "2001:0db8:0000:0000:0000:0000:0000:0010".parse().unwrap();
        assert_eq!(changes(&BTreeMap::new(), &n, &long)[5].1, "2001:db8::10");
        // Written once, then nothing; the v6 side alone is noticed.
        let mut current: BTreeMap<String, String> = all.into_iter().collect();
        assert!(changes(&current, &n, &own_dual()).is_empty());
        let mut moved = own_dual();
        moved.ipv6.as_mut().unwrap().public_ip = "2001:db8::11".parse().unwrap();
        assert_eq!(
            changes(&current, &n, &moved),
            [(n.public_ipv6.clone(), "2001:db8::11".into())]
        );
        // The operator's public-ipv6-overwrite is what public-ipv6 says.
        current.insert(n.public_ipv6_overwrite.clone(), "2001:db8::99".into());
        assert_eq!(
            changes(&current, &n, &own_dual()),
            [(n.public_ipv6.clone(), "2001:db8::99".into())]
        );
        // An IPv4-only node never writes the IPv6 annotations.
        assert!(
            changes(&BTreeMap::new(), &n, &own())
                .iter()
                .all(|(k, _)| !k.contains("v6"))
        );
    }

    #[test]
    fn the_v6_mac_is_restored_from_our_backend_v6_data() {
        let n = names();
        let mut a = BTreeMap::new();
        a.insert(
            n.backend_data.clone(),
            r#"{"VNI":1,"VtepMAC":"0a:1b:2c:3d:4e:5f"}"#.into(),
        );
        assert_eq!(stored_mac_v6(&a, &n), None);
        a.insert(
            n.backend_v6_data.clone(),
            r#"{"VNI":1,"VtepMAC":"0a:1b:2c:3d:4e:60"}"#.into(),
        );
        assert_eq!(
            stored_mac_v6(&a, &n),
            Some("0a:1b:2c:3d:4e:60".parse().unwrap())
        );
        assert_eq!(
            stored_mac(&a, &n),
            Some("0a:1b:2c:3d:4e:5f".parse().unwrap())
        );
        a.insert(n.backend_v6_data.clone(), "null".into());
        assert_eq!(stored_mac_v6(&a, &n), None);
    }
}
