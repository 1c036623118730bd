//! A Node as a peer's lease (flannel's `nodeToLease`): which Nodes count,
//! which podCIDR is the subnet, and what a Node's annotations must hold.
//! Pure: the checks every lease passes (`lease_check`) come after this,
//! in the reconciler, as for etcd's leases.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
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

/// Why a node's podCIDRs give no subnet of a family.
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
    #[error("missing IPv6 address on spec.podCIDRs")]
    NoIpv6,
}

/// The node's podCIDRs as flannel picks them: `podCIDRs` when set (at
/// most two, one per family; the last of a family wins), else `podCIDR`.
/// Host bits are kept as the API holds them; a CIDR with host bits set is
/// refused, since no allocator writes one.
pub fn pod_cidrs(node: &Node) -> Result<(Option<Ipv4Net>, Option<Ipv6Net>), PodCidrError> {
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
    let (mut v4, mut v6) = (None, None);
    for c in list {
        match c.parse::<IpNet>() {
            Ok(IpNet::V4(n)) if n.trunc() == n => v4 = Some(n),
            Ok(IpNet::V6(n)) if n.trunc() == n => v6 = Some(n),
            _ => return Err(PodCidrError::Invalid(c.to_owned())),
        }
    }
    Ok((v4, v6))
}

/// The node's IPv4 podCIDR ([`pod_cidrs`]).
pub fn ipv4_pod_cidr(node: &Node) -> Result<Ipv4Net, PodCidrError> {
    pod_cidrs(node)?.0.ok_or(PodCidrError::NoIpv4)
}

/// The node's IPv6 podCIDR ([`pod_cidrs`]), for dual stack.
pub fn ipv6_pod_cidr(node: &Node) -> Result<Ipv6Net, PodCidrError> {
    pod_cidrs(node)?.1.ok_or(PodCidrError::NoIpv6)
}

/// What a Node's annotations say, as one byte string: a node is reported
/// again only when one of them (or its podCIDR) changes.
fn fingerprint(node: &Node, a: &BTreeMap<String, String>, names: &Names) -> Vec<u8> {
    let spec = node.spec.as_ref();
    let get = |k: &String| a.get(k).map_or("", String::as_str);
    format!(
        "{:?} {:?} {} {} {} {} {} {}",
        spec.and_then(|s| s.pod_cidr.as_deref()),
        spec.and_then(|s| s.pod_cidrs.as_deref()),
        get(&names.subnet_manager),
        get(&names.backend_type),
        get(&names.public_ip),
        get(&names.backend_data),
        get(&names.public_ipv6),
        get(&names.backend_v6_data)
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
///
/// With `ipv6` (this node is dual stack), a lease also needs its IPv6
/// half: a v6 podCIDR, `public-ipv6` and, for VXLAN, `backend-v6-data`. A
/// node missing any of them is malformed as a whole, IPv4 included, as
/// flanneld's `nodeToLease` skips it (unlike etcd mode, where an IPv4-only
/// lease beside dual-stack ones is served on IPv4).
pub fn record(node: &Node, names: &Names, ipv6: bool) -> Record {
    let name = node.metadata.name.as_deref().unwrap_or_default();
    let empty = BTreeMap::new();
    let a = node.metadata.annotations.as_ref().unwrap_or(&empty);
    let key = key(name);
    let claim = if a.get(&names.subnet_manager).map(String::as_str) != Some("true") {
        Claim::None
    } else {
        match lease_of(node, a, names, ipv6) {
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

fn lease_of(
    node: &Node,
    a: &BTreeMap<String, String>,
    names: &Names,
    ipv6: bool,
) -> Result<Lease, String> {
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
    let mut lease = Lease {
        subnet,
        ipv6_subnet: None,
        public_ip,
        public_ipv6: None,
        backend,
        vtep_mac_v6: None,
    };
    if ipv6 {
        lease.ipv6_subnet = Some(ipv6_pod_cidr(node).map_err(|e| e.to_string())?);
        let ip = a
            .get(&names.public_ipv6)
            .ok_or_else(|| format!("annotation {} is missing", names.public_ipv6))?;
        lease.public_ipv6 = match ip.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => Some(v6),
            _ => {
                return Err(format!(
                    "annotation {} {ip:?} is not an IPv6 address",
                    names.public_ipv6
                ));
            }
        };
        if let Backend::Vxlan { .. } = lease.backend {
            let data = a
                .get(&names.backend_v6_data)
                .ok_or_else(|| format!("annotation {} is missing", names.backend_v6_data))?;
            if let Backend::Vxlan { vtep_mac, .. } = lease::vxlan_backend(data.as_bytes())
                .map_err(|why| format!("annotation {}: {why}", names.backend_v6_data))?
            {
                lease.vtep_mac_v6 = Some(vtep_mac);
            }
        }
    }
    Ok(lease)
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
            false,
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
        assert_eq!(record(&bare, &names(), false).claim, Claim::None);
        let mut v = flannel_node("n", "10.244.1.0/24", "192.168.1.11");
        v["metadata"]["annotations"]["flannel.alpha.coreos.com/kube-subnet-manager"] =
            "false".into();
        assert_eq!(record(&node(v), &names(), false).claim, Claim::None);
    }

    fn reason(v: serde_json::Value) -> String {
        match record(&node(v), &names(), false).claim {
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

    /// A dual-stack node as flanneld v0.28 annotates it.
    fn dual_node(name: &str) -> serde_json::Value {
        let mut v = flannel_node(name, "10.244.1.0/24", "192.168.1.11");
        v["spec"]["podCIDRs"] = serde_json::json!(["10.244.1.0/24", "fd00:10:244:1::/64"]);
        let a = &mut v["metadata"]["annotations"];
        a["flannel.alpha.coreos.com/backend-v6-data"] =
            "{\"VNI\":1,\"VtepMAC\":\"0a:1b:2c:3d:4e:60\"}".into();
        a["flannel.alpha.coreos.com/public-ipv6"] = "2001:db8::11".into();
        v
    }

    fn dual_reason(v: serde_json::Value) -> String {
        match record(&node(v), &names(), true).claim {
            Claim::Malformed(e) => e.reason,
            other => panic!("expected malformed, got {other:?}"),
        }
    }

    #[test]
    fn a_dual_stack_node_is_a_dual_stack_lease() {
        let r = record(&node(dual_node("n1")), &names(), true);
        let Claim::Lease(l) = r.claim else {
            panic!("{r:?}")
        };
        assert_eq!(l.subnet, "10.244.1.0/24".parse::<Ipv4Net>().unwrap());
        let p6 = l.peer6().expect("the IPv6 half");
        assert_eq!(p6.subnet, "fd00:10:244:1::/64".parse::<Ipv6Net>().unwrap());
        assert_eq!(p6.public_ip.to_string(), "2001:db8::11");
        assert_eq!(p6.vtep_mac, "0a:1b:2c:3d:4e:60".parse().unwrap());
        assert_eq!(
            l.peer().unwrap().vtep_mac,
            "0a:1b:2c:3d:4e:5f".parse().unwrap()
        );
        // An IPv4-only node of ours reads only the IPv4 half.
        let Claim::Lease(l) = record(&node(dual_node("n1")), &names(), false).claim else {
            panic!()
        };
        assert_eq!(l.peer6(), None);
        // Which annotations make a node "changed".
        let a = record(&node(dual_node("n1")), &names(), true).raw;
        let mut v = dual_node("n1");
        v["metadata"]["annotations"]["flannel.alpha.coreos.com/public-ipv6"] =
            "2001:db8::12".into();
        assert_ne!(record(&node(v), &names(), true).raw, a);
    }

    #[test]
    fn a_dual_stack_peer_missing_a_part_is_skipped_whole() {
        let mut v = dual_node("n");
        v["spec"]["podCIDRs"] = serde_json::json!(["10.244.1.0/24"]);
        assert_eq!(dual_reason(v), "missing IPv6 address on spec.podCIDRs");
        let mut v = dual_node("n");
        v["metadata"]["annotations"]
            .as_object_mut()
            .unwrap()
            .remove("flannel.alpha.coreos.com/public-ipv6");
        assert_eq!(
            dual_reason(v),
            "annotation flannel.alpha.coreos.com/public-ipv6 is missing"
        );
        let mut v = dual_node("n");
        v["metadata"]["annotations"]["flannel.alpha.coreos.com/public-ipv6"] =
            "192.168.1.11".into();
        assert!(dual_reason(v).contains("is not an IPv6 address"));
        let mut v = dual_node("n");
        v["metadata"]["annotations"]
            .as_object_mut()
            .unwrap()
            .remove("flannel.alpha.coreos.com/backend-v6-data");
        assert_eq!(
            dual_reason(v),
            "annotation flannel.alpha.coreos.com/backend-v6-data is missing"
        );
        let mut v = dual_node("n");
        v["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-v6-data"] = "null".into();
        assert!(dual_reason(v).contains("backend-v6-data"));
        let mut v = dual_node("n");
        v["spec"]["podCIDRs"] = serde_json::json!(["10.244.1.0/24", "fd00::1/64"]);
        assert!(dual_reason(v).contains("not a CIDR"));
    }

    #[test]
    fn dual_stack_podcidrs_give_both() {
        let mut v = flannel_node("n", "10.244.1.0/24", "192.168.1.11");
        v["spec"]["podCIDRs"] = serde_json::json!(["fd00:1::/64", "10.244.1.0/24",]);
        assert_eq!(
            ipv6_pod_cidr(&node(v.clone())).unwrap(),
            "fd00:1::/64".parse::<Ipv6Net>().unwrap()
        );
        v["spec"]["podCIDRs"] = serde_json::json!(["10.244.1.0/24"]);
        assert_eq!(ipv6_pod_cidr(&node(v)), Err(PodCidrError::NoIpv6));
    }
}
