//! Choosing the external (underlay) interface as flanneld does:
//! `--iface` (a name or an IPv4 address, tried in order), then
//! `--iface-regex` (matched against addresses, then names), else the
//! interface holding `--public-ip`, else the default route's interface. The
//! interface's first IPv4 address is the VTEP's local address; `--public-ip`
//! (if given) is what the lease publishes.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::{address::AddressAttribute, route::RouteAttribute},
};

use crate::netlink::{LinkSummary, Netlink};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub ifaces: Vec<String>,
    pub regexes: Vec<String>,
    pub public_ip: Option<Ipv4Addr>,
}

/// One interface as the selection sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub ifindex: u32,
    pub mtu: u32,
    /// IPv4 addresses in kernel order.
    pub addrs: Vec<Ipv4Addr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalInterface {
    pub name: String,
    pub ifindex: u32,
    pub mtu: u32,
    /// The interface's own address (the VXLAN device's `local`).
    pub ip: Ipv4Addr,
    /// What peers send to: `--public-ip`, or `ip`.
    pub public_ip: Ipv4Addr,
}

#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    #[error("--iface-regex {0:?} is not a valid regular expression: {1}")]
    BadRegex(String, String),
    #[error("no interface matches --iface {0:?}")]
    NoIface(String),
    #[error("no interface or IPv4 address matches any --iface-regex ({0})")]
    NoRegexMatch(String),
    #[error("no default IPv4 route to pick an interface from: give --iface or --iface-regex")]
    NoDefaultRoute,
    #[error("interface {0} has no IPv4 address")]
    NoAddress(String),
    #[error("interface {0} reports MTU 0")]
    NoMtu(String),
    #[error("listing interfaces: {0}")]
    Netlink(String),
}

/// Pick the interface from an inventory (pure, so the rules are unit-tested).
pub fn choose(
    all: &[Candidate],
    sel: &Selector,
    default_route_ifindex: Option<u32>,
) -> Result<ExternalInterface, IfaceError> {
    let pick = |c: &Candidate, ip: Option<Ipv4Addr>| -> Result<ExternalInterface, IfaceError> {
        let ip = match ip.or_else(|| c.addrs.first().copied()) {
            Some(ip) => ip,
            None => return Err(IfaceError::NoAddress(c.name.clone())),
        };
        if c.mtu == 0 {
            return Err(IfaceError::NoMtu(c.name.clone()));
        }
        Ok(ExternalInterface {
            name: c.name.clone(),
            ifindex: c.ifindex,
            mtu: c.mtu,
            ip,
            public_ip: sel.public_ip.unwrap_or(ip),
        })
    };

    if !sel.ifaces.is_empty() {
        for want in &sel.ifaces {
            let found = match want.parse::<Ipv4Addr>() {
                Ok(ip) => all
                    .iter()
                    .find(|c| c.addrs.contains(&ip))
                    .map(|c| (c, Some(ip))),
                Err(_) => all.iter().find(|c| c.name == *want).map(|c| (c, None)),
            };
            if let Some((c, ip)) = found {
                return pick(c, ip);
            }
            log::warn!("--iface {want}: no such interface or address; trying the next one");
        }
        if sel.regexes.is_empty() {
            return Err(IfaceError::NoIface(sel.ifaces.join(", ")));
        }
    }
    if !sel.regexes.is_empty() {
        for re in &sel.regexes {
            let r = regex::Regex::new(re)
                .map_err(|e| IfaceError::BadRegex(re.clone(), e.to_string()))?;
            for c in all {
                if let Some(ip) = c.addrs.iter().find(|ip| r.is_match(&ip.to_string())) {
                    return pick(c, Some(*ip));
                }
            }
            if let Some(c) = all.iter().find(|c| r.is_match(&c.name)) {
                return pick(c, None);
            }
        }
        return Err(IfaceError::NoRegexMatch(sel.regexes.join(", ")));
    }
    if let Some(public) = sel.public_ip
        && let Some(c) = all.iter().find(|c| c.addrs.contains(&public))
    {
        return pick(c, Some(public));
    }
    let idx = default_route_ifindex.ok_or(IfaceError::NoDefaultRoute)?;
    let c = all
        .iter()
        .find(|c| c.ifindex == idx)
        .ok_or(IfaceError::NoDefaultRoute)?;
    pick(c, None)
}

/// Read the links, their IPv4 addresses and the default route, then choose.
pub async fn find(nl: &Netlink, sel: &Selector) -> Result<ExternalInterface, IfaceError> {
    let h = nl.handle();
    let err = |e: rtnetlink::Error| IfaceError::Netlink(e.to_string());
    let links: Vec<_> = h.link().get().execute().try_collect().await.map_err(err)?;
    let addrs: Vec<_> = h
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(err)?;
    let routes: Vec<_> = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(err)?;

    let mut all: Vec<Candidate> = links
        .iter()
        .map(|l| {
            let s = LinkSummary::from_message(l);
            Candidate {
                name: s.name,
                ifindex: s.ifindex,
                mtu: s.mtu,
                addrs: Vec::new(),
            }
        })
        .collect();
    for a in &addrs {
        let mut local = None;
        let mut address = None;
        for attr in &a.attributes {
            match attr {
                AddressAttribute::Local(IpAddr::V4(ip)) => local = Some(*ip),
                AddressAttribute::Address(IpAddr::V4(ip)) => address = Some(*ip),
                _ => {}
            }
        }
        if let (Some(ip), Some(c)) = (
            local.or(address),
            all.iter_mut().find(|c| c.ifindex == a.header.index),
        ) {
            c.addrs.push(ip);
        }
    }
    let default = routes
        .iter()
        .filter(|r| r.header.destination_prefix_length == 0)
        .find_map(|r| {
            r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            })
        });
    // Loopback never carries the overlay.
    all.retain(|c| c.name != "lo");
    choose(&all, sel, default)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv() -> Vec<Candidate> {
        vec![
            Candidate {
                name: "eth0".into(),
                ifindex: 2,
                mtu: 1500,
                addrs: vec!["10.211.55.10".parse().unwrap()],
            },
            Candidate {
                name: "enp0s8".into(),
                ifindex: 3,
                mtu: 9000,
                addrs: vec![
                    "192.168.205.10".parse().unwrap(),
                    "192.168.205.99".parse().unwrap(),
                ],
            },
            Candidate {
                name: "dummy0".into(),
                ifindex: 4,
                mtu: 1500,
                addrs: vec![],
            },
        ]
    }

    fn sel(ifaces: &[&str], regexes: &[&str], public: Option<&str>) -> Selector {
        Selector {
            ifaces: ifaces.iter().map(|s| s.to_string()).collect(),
            regexes: regexes.iter().map(|s| s.to_string()).collect(),
            public_ip: public.map(|p| p.parse().unwrap()),
        }
    }

    #[test]
    fn iface_by_ip_as_in_seed_001_and_by_name() {
        let e = choose(&inv(), &sel(&["192.168.205.99"], &[], None), Some(2)).unwrap();
        assert_eq!(
            (e.name.as_str(), e.ip.to_string()),
            ("enp0s8", "192.168.205.99".into())
        );
        assert_eq!(e.public_ip, e.ip);
        assert_eq!(e.mtu, 9000);
        let e = choose(&inv(), &sel(&["enp0s8"], &[], None), Some(2)).unwrap();
        assert_eq!(e.ip.to_string(), "192.168.205.10");
        // Tried in order.
        let e = choose(&inv(), &sel(&["nope", "eth0"], &[], None), None).unwrap();
        assert_eq!(e.name, "eth0");
        assert!(matches!(
            choose(&inv(), &sel(&["nope"], &[], None), Some(2)),
            Err(IfaceError::NoIface(_))
        ));
        assert!(matches!(
            choose(&inv(), &sel(&["dummy0"], &[], None), Some(2)),
            Err(IfaceError::NoAddress(_))
        ));
    }

    #[test]
    fn regex_matches_addresses_then_names() {
        let e = choose(&inv(), &sel(&[], &[r"^192\.168\.205\.99$"], None), None).unwrap();
        assert_eq!(e.ip.to_string(), "192.168.205.99");
        let e = choose(&inv(), &sel(&[], &["^enp"], None), None).unwrap();
        assert_eq!(e.name, "enp0s8");
        assert!(matches!(
            choose(&inv(), &sel(&[], &["^wlan"], None), Some(2)),
            Err(IfaceError::NoRegexMatch(_))
        ));
        assert!(matches!(
            choose(&inv(), &sel(&[], &["("], None), Some(2)),
            Err(IfaceError::BadRegex(..))
        ));
    }

    #[test]
    fn default_route_and_public_ip() {
        let e = choose(&inv(), &sel(&[], &[], None), Some(2)).unwrap();
        assert_eq!(e.name, "eth0");
        assert!(matches!(
            choose(&inv(), &sel(&[], &[], None), None),
            Err(IfaceError::NoDefaultRoute)
        ));
        // --public-ip on a local interface picks it.
        let e = choose(&inv(), &sel(&[], &[], Some("192.168.205.99")), None).unwrap();
        assert_eq!((e.name.as_str(), e.ip), ("enp0s8", e.public_ip));
        // A NATed public IP is only published.
        let e = choose(&inv(), &sel(&["eth0"], &[], Some("203.0.113.7")), None).unwrap();
        assert_eq!(e.ip.to_string(), "10.211.55.10");
        assert_eq!(e.public_ip.to_string(), "203.0.113.7");
    }
}
