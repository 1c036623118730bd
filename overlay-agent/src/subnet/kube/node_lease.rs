//! A Node as a peer's lease (flannel's `nodeToLease`): which Nodes count,
//! which podCIDR is the subnet, and what a Node's annotations must hold.
//! Pure: the checks every lease passes (`lease_check`) come after this,
//! in the reconciler, as for etcd's leases.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::Node;

use super::annotations::{BACKEND_TYPE, Names};
use crate::{
    flannel::lease::{self, Backend, Lease, LeaseError},
    subnet::{Claim, Record},
};

/// The key a Node's lease is known by in logs, status and metrics.
pub fn key(name: &str) -> String {
    format!("node/{name}")
}

/// The node's name back from [`key`].
pub fn name_of(key: &str) -> Option<&str> {
    key.strip_prefix("node/")
}

/// Why a node's podCIDRs give no IPv4 subnet.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PodCidrError {
    #[error("spec.podCIDR is not assigned")]
    Unassigned,
    #[error("spec.podCIDRs has {0} entries: should be IPv4/IPv6 only or dualstack")]
    TooMany(usize),
    #[error("spec.podCIDR(s) {0:?} is not a CIDR")]
    Invalid(String),
    #[error("missing IPv4 address on spec.podCIDRs")]
    NoIpv4,
}

/// The node's IPv4 podCIDR as flannel picks it: `podCIDRs` when set (at
/// most two, one per family; the last of a family wins), else `podCIDR`.
/// Host bits are kept as the API holds them; a CIDR with host bits set is
/// refused, since no allocator writes one.
pub fn ipv4_pod_cidr(node: &Node) -> Result<Ipv4Net, PodCidrError> {
    let spec = node.spec.as_ref();
    let list: Vec<&str> = match spec.and_then(|s| s.pod_cidrs.as_ref()) {
        Some(l) if !l.is_empty() => l.iter().map(String::as_str).collect(),
        _ => match spec.and_then(|s| s.pod_cidr.as_deref()) {
            Some(c) if !c.is_empty() => vec![c],
            _ => return Err(PodCidrError::Unassigned),
        },
    };
    if list.len() >= 3 {
        return Err(PodCidrError::TooMany(list.len()));
    }
    let mut v4 = None;
    for c in list {
        match c.parse::<IpNet>() {
            Ok(IpNet::V4(n)) if n.trunc() == n => v4 = Some(n),
            Ok(IpNet::V6(_)) => {}
            _ => return Err(PodCidrError::Invalid(c.to_owned())),
        }
    }
    v4.ok_or(PodCidrError::NoIpv4)
}

/// What a Node's annotations say, as one byte string: a node is reported
/// again only when one of them (or its podCIDR) changes.
fn fingerprint(node: &Node, a: &BTreeMap<String, String>, names: &Names) -> Vec<u8> {
    let spec = node.spec.as_ref();
    let get = |k: &String| a.get(k).map_or("", String::as_str);
    format!(
        "{:?} {:?} {} {} {} {}",
        spec.and_then(|s| s.pod_cidr.as_deref()),
        spec.and_then(|s| s.pod_cidrs.as_deref()),
        get(&names.subnet_manager),
        get(&names.backend_type),
        get(&names.public_ip),
        get(&names.backend_data)
    )
    .into_bytes()
}

/// When the node was created, in seconds: of two nodes claiming one
/// podCIDR, the older keeps it.
fn created(node: &Node) -> i64 {
    node.metadata
        .creation_timestamp
        .as_ref()
        .map_or(i64::MAX, |t| t.0.as_second())
}

/// A Node as the reconciler sees it. Nodes without
/// `<prefix>kube-subnet-manager: "true"` are not leases (flannel skips
/// them; a node with no annotations at all is one of them, where flannel
/// panics); the rest must carry a usable podCIDR, `public-ip` and, for
/// VXLAN, `backend-data`, or they are malformed (logged and skipped).
pub fn record(node: &Node, names: &Names) -> Record {
    let name = node.metadata.name.as_deref().unwrap_or_default();
    let empty = BTreeMap::new();
    let a = node.metadata.annotations.as_ref().unwrap_or(&empty);
    let key = key(name);
    let claim = if a.get(&names.subnet_manager).map(String::as_str) != Some("true") {
        Claim::None
    } else {
        match lease_of(node, a, names) {
            Ok(l) => Claim::Lease(l),
            Err(reason) => Claim::Malformed(LeaseError {
                key: key.clone(),
                reason,
            }),
        }
    };
    Record {
        raw: fingerprint(node, a, names),
        key,
        claim,
        rank: created(node),
    }
}

fn lease_of(node: &Node, a: &BTreeMap<String, String>, names: &Names) -> Result<Lease, String> {
    let subnet = ipv4_pod_cidr(node).map_err(|e| e.to_string())?;
    let ip = a
        .get(&names.public_ip)
        .ok_or_else(|| format!("annotation {} is missing", names.public_ip))?;
    let public_ip = match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4,
        _ => {
            return Err(format!(
                "annotation {} {ip:?} is not an IPv4 address",
                names.public_ip
            ));
        }
    };
    let backend_type = a.get(&names.backend_type).map_or("", String::as_str);
    let backend = if backend_type == BACKEND_TYPE {
        let data = a
            .get(&names.backend_data)
            .ok_or_else(|| format!("annotation {} is missing", names.backend_data))?;
        lease::vxlan_backend(data.as_bytes())
            .map_err(|why| format!("annotation {}: {why}", names.backend_data))?
    } else {
        Backend::Other(backend_type.to_owned())
    };
    Ok(Lease {
        subnet,
        ipv6_subnet: None,
        public_ip,
        public_ipv6: None,
        backend,
        vtep_mac_v6: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subnet::kube::annotations::DEFAULT_PREFIX;

    fn node(v: serde_json::Value) -> Node {
        serde_json::from_value(v).unwrap()
    }

    fn flannel_node(name: &str, cidr: &str, ip: &str) -> serde_json::Value {
        serde_json::json!({
            "metadata": {
                "name": name,
                "creationTimestamp": "2026-01-02T03:04:05Z",
                "annotations": {
                    "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"0a:1b:2c:3d:4e:5f\"}",
                    "flannel.alpha.coreos.com/backend-type": "vxlan",
                    "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                    "flannel.alpha.coreos.com/public-ip": ip,
                }
            },
            "spec": { "podCIDR": cidr, "podCIDRs": [cidr] }
        })
    }

    fn names() -> Names {
        Names::new(DEFAULT_PREFIX).unwrap()
    }

    #[test]
    fn a_flannel_node_is_a_vxlan_lease() {
        let r = record(
            &node(flannel_node("n1", "10.244.1.0/24", "192.168.1.11")),
            &names(),
        );
        assert_eq!(r.key, "node/n1");
        let Claim::Lease(l) = r.claim else {
            panic!("{r:?}")
        };
        assert_eq!(l.subnet, "10.244.1.0/24".parse::<Ipv4Net>().unwrap());
        assert_eq!(l.public_ip.to_string(), "192.168.1.11");
        assert_eq!(
            l.backend,
            Backend::Vxlan {
                vni: Some(1),
                vtep_mac: "0a:1b:2c:3d:4e:5f".parse().unwrap()
            }
        );
        assert_eq!(r.rank, 1_767_323_045);
    }

    #[test]
    fn nodes_without_flannel_annotations_are_not_leases() {
        let bare = node(
            serde_json::json!({"metadata": {"name": "bare"}, "spec": {"podCIDR": "10.244.9.0/24"}}),
        );
        assert_eq!(record(&bare, &names()).claim, Claim::None);
        let mut v = flannel_node("n", "10.244.1.0/24", "192.168.1.11");
        v["metadata"]["annotations"]["flannel.alpha.coreos.com/kube-subnet-manager"] =
            "false".into();
        assert_eq!(record(&node(v), &names()).claim, Claim::None);
    }

    fn reason(v: serde_json::Value) -> String {
        match record(&node(v), &names()).claim {
            Claim::Malformed(e) => e.reason,
            other => panic!("expected malformed, got {other:?}"),
        }
    }

    #[test]
    fn garbage_is_malformed_with_a_reason() {
        let mut v = flannel_node("n", "10.244.1.0/24", "not-an-ip");
        assert!(reason(v.clone()).contains("public-ip \"not-an-ip\" is not an IPv4"));
        v["metadata"]["annotations"]["flannel.alpha.coreos.com/public-ip"] = "2001:db8::1".into();
        assert!(reason(v.clone()).contains("is not an IPv4"));
        let mut v = flannel_node("n", "10.244.1.0/24", "192.168.1.11");
        v["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-data"] = "{".into();
        assert!(reason(v).contains("backend-data"));
        let mut v = flannel_node("n", "10.244.1.0/24", "192.168.1.11");
        v["spec"] = serde_json::json!({});
        assert_eq!(reason(v), "spec.podCIDR is not assigned");
        let mut v = flannel_node("n", "10.244.1.0/24", "192.168.1.11");
        v["spec"]["podCIDRs"] = serde_json::json!(["10.244.1.0/24", "fd00::/64", "10.244.2.0/24"]);
        assert!(reason(v).contains("3 entries"));
        let mut v = flannel_node("n", "10.244.1.0/24", "192.168.1.11");
        v["spec"]["podCIDRs"] = serde_json::json!(["fd00::/64"]);
        assert_eq!(reason(v), "missing IPv4 address on spec.podCIDRs");
        let mut v = flannel_node("n", "10.244.1.7/24", "192.168.1.11");
        v["spec"]["podCIDRs"] = serde_json::json!([]);
        assert!(reason(v).contains("not a CIDR"));
    }

    #[test]
    fn dual_stack_podcidrs_give_the_ipv4_one() {
        let mut v = flannel_node("n", "10.244.1.0/24", "192.168.1.11");
        v["spec"]["podCIDRs"] = serde_json::json!(["fd00:1::/64", "10.244.1.0/24"]);
        assert_eq!(
            ipv4_pod_cidr(&node(v)).unwrap(),
            "10.244.1.0/24".parse::<Ipv4Net>().unwrap()
        );
    }
}
