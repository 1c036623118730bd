//! Choosing the external (underlay) interface as flanneld does:
//! `--iface` (a name or an IPv4 address, tried in order), then
//! `--iface-regex` (matched against addresses, then names), then
//! `--iface-can-reach` (the interface and source address of the route to
//! that address), else the interface holding `--public-ip`, else the default
//! route's interface. The
//! interface's first IPv4 address is the VTEP's local address; `--public-ip`
//! (if given) is what the lease publishes. For dual stack the interface's
//! IPv6 address is picked as flanneld's `GetInterfaceIP6Addrs` orders them
//! ([`pick_ipv6`]); `--public-ipv6` (if given) wins.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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
    /// `--iface-can-reach`.
    pub can_reach: Option<Ipv4Addr>,
    /// `--public-ipv6`.
    pub public_ipv6: Option<Ipv6Addr>,
}

/// A main-table route as [`route_to`] needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteEntry {
    pub dst: ipnet::Ipv4Net,
    pub oif: u32,
    /// `src` of the route (`prefsrc`), if it has one.
    pub prefsrc: Option<Ipv4Addr>,
    pub metric: u32,
}

/// The route the kernel would take to `dst` among `routes` (longest prefix,
/// then lowest metric), as `ip route get` answers for a unicast address.
pub fn route_to(routes: &[RouteEntry], dst: Ipv4Addr) -> Option<RouteEntry> {
    routes
        .iter()
        .filter(|r| r.dst.contains(&dst))
        .min_by_key(|r| (std::cmp::Reverse(r.dst.prefix_len()), r.metric))
        .copied()
}

/// One interface as the selection sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub ifindex: u32,
    pub mtu: u32,
    /// IPv4 addresses in kernel order.
    pub addrs: Vec<Ipv4Addr>,
    /// IPv6 addresses in kernel order, with their `IFA_F_*` flags.
    pub addrs6: Vec<(Ipv6Addr, u32)>,
}

/// `IFA_F_TEMPORARY` (privacy addresses; `IFA_F_SECONDARY`'s value).
const IFA_F_TEMPORARY: u32 = 0x01;
const IFA_F_DEPRECATED: u32 = 0x20;
const IFA_F_PERMANENT: u32 = 0x80;

/// The interface's IPv6 address for the overlay, as flanneld orders them
/// (`compareAddrs`): not deprecated, permanent before dynamic, stable before
/// temporary (a privacy address expires, flannel issue #2293). Only global
/// unicast addresses (ULAs included) count: a link-local one cannot be a
/// VTEP's address across a routed underlay.
pub fn pick_ipv6(addrs: &[(Ipv6Addr, u32)]) -> Option<Ipv6Addr> {
    addrs
        .iter()
        .filter(|(ip, flags)| {
            flags & IFA_F_DEPRECATED == 0
                && !(ip.is_unspecified()
                    || ip.is_loopback()
                    || ip.is_multicast()
                    || ip.is_unicast_link_local()
                    || ip.to_ipv4_mapped().is_some())
        })
        .min_by_key(|(_, flags)| (flags & IFA_F_PERMANENT == 0, flags & IFA_F_TEMPORARY != 0))
        .map(|(ip, _)| *ip)
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
    /// For dual stack, what peers send IPv6 VXLAN to (and the v6 device's
    /// `local`, as flanneld since v0.27.4): `--public-ipv6`, else the
    /// interface's IPv6 ([`pick_ipv6`]); `None` when it has none.
    pub public_ipv6: Option<Ipv6Addr>,
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
    #[error("--iface-can-reach {0}: no route to it")]
    NoRouteTo(Ipv4Addr),
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
            public_ipv6: sel.public_ipv6.or_else(|| pick_ipv6(&c.addrs6)),
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
                addrs6: Vec::new(),
            }
        })
        .collect();
    for a in &addrs {
        let mut local = None;
        let mut address = None;
        let mut address6 = None;
        // The header holds the flags' low byte; the attribute all of them.
        let mut flags = u32::from(a.header.flags.bits());
        for attr in &a.attributes {
            match attr {
                AddressAttribute::Local(IpAddr::V4(ip)) => local = Some(*ip),
                AddressAttribute::Address(IpAddr::V4(ip)) => address = Some(*ip),
                AddressAttribute::Address(IpAddr::V6(ip)) => address6 = Some(*ip),
                AddressAttribute::Flags(f) => flags = f.bits(),
                _ => {}
            }
        }
        let Some(c) = all.iter_mut().find(|c| c.ifindex == a.header.index) else {
            continue;
        };
        if let Some(ip) = local.or(address) {
            c.addrs.push(ip);
        }
        if let Some(ip) = address6 {
            c.addrs6.push((ip, flags));
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
    log::debug!("choosing the external interface among {all:?}, default route via #{default:?}");
    if let Some(target) = sel
        .can_reach
        .filter(|_| sel.ifaces.is_empty() && sel.regexes.is_empty())
    {
        let main: Vec<RouteEntry> = routes.iter().filter_map(main_route).collect();
        let route = route_to(&main, target).ok_or(IfaceError::NoRouteTo(target))?;
        let c = all
            .iter()
            .find(|c| c.ifindex == route.oif)
            .ok_or(IfaceError::NoRouteTo(target))?;
        // As `ip route get`: the route's source, else the interface's address.
        let want = route
            .prefsrc
            .map_or_else(|| c.name.clone(), |ip| ip.to_string());
        let by_route = Selector {
            ifaces: vec![want],
            ..sel.clone()
        };
        return choose(&all, &by_route, default);
    }
    choose(&all, sel, default)
}

/// A unicast route of the main table, with its output interface.
fn main_route(r: &rtnetlink::packet_route::route::RouteMessage) -> Option<RouteEntry> {
    use rtnetlink::packet_route::route::{RouteAddress, RouteType};
    const MAIN_TABLE: u32 = 254;
    let table = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table));
    if table != MAIN_TABLE || r.header.kind != RouteType::Unicast {
        return None;
    }
    let mut entry = RouteEntry {
        dst: ipnet::Ipv4Net::default(),
        oif: 0,
        prefsrc: None,
        metric: 0,
    };
    let mut dst = Ipv4Addr::UNSPECIFIED;
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
            RouteAttribute::Oif(i) => entry.oif = *i,
            RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => entry.prefsrc = Some(*ip),
            RouteAttribute::Priority(m) => entry.metric = *m,
            _ => {}
        }
    }
    entry.dst = ipnet::Ipv4Net::new(dst, r.header.destination_prefix_length).ok()?;
    (entry.oif != 0).then_some(entry)
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
                addrs6: vec![
                    ("fe80::1".parse().unwrap(), IFA_F_PERMANENT),
                    ("fd00:55::10".parse().unwrap(), IFA_F_PERMANENT),
                ],
            },
            Candidate {
                name: "enp0s8".into(),
                ifindex: 3,
                mtu: 9000,
                addrs: vec![
                    "192.168.205.10".parse().unwrap(),
                    "192.168.205.99".parse().unwrap(),
                ],
                addrs6: vec![],
            },
            Candidate {
                name: "dummy0".into(),
                ifindex: 4,
                mtu: 1500,
                addrs: vec![],
                addrs6: vec![],
            },
        ]
    }

    #[test]
    fn the_route_to_an_address_is_the_longest_prefix_then_the_lowest_metric() {
        let r = |dst: &str, oif, metric| RouteEntry {
            dst: dst.parse().unwrap(),
            oif,
            prefsrc: None,
            metric,
        };
        let routes = [
            r("0.0.0.0/0", 2, 0),
            r("192.168.205.0/24", 3, 100),
            r("192.168.205.0/24", 4, 50),
            r("192.168.205.128/25", 5, 0),
        ];
        let to = |ip: &str| route_to(&routes, ip.parse().unwrap()).map(|e| e.oif);
        assert_eq!(to("8.8.8.8"), Some(2));
        assert_eq!(to("192.168.205.7"), Some(4));
        assert_eq!(to("192.168.205.200"), Some(5));
        assert_eq!(route_to(&routes[1..2], "8.8.8.8".parse().unwrap()), None);
    }

    fn sel(ifaces: &[&str], regexes: &[&str], public: Option<&str>) -> Selector {
        Selector {
            ifaces: ifaces.iter().map(|s| s.to_string()).collect(),
            regexes: regexes.iter().map(|s| s.to_string()).collect(),
            public_ip: public.map(|p| p.parse().unwrap()),
            can_reach: None,
            public_ipv6: None,
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

    #[test]
    fn the_ipv6_address_is_flanneld_s_choice() {
        let e = choose(&inv(), &sel(&["eth0"], &[], None), None).unwrap();
        assert_eq!(e.public_ipv6, Some("fd00:55::10".parse().unwrap()));
        let e = choose(&inv(), &sel(&["enp0s8"], &[], None), None).unwrap();
        assert_eq!(e.public_ipv6, None);
        let mut s = sel(&["enp0s8"], &[], None);
        s.public_ipv6 = Some("2001:db8::7".parse().unwrap());
        assert_eq!(
            choose(&inv(), &s, None).unwrap().public_ipv6,
            Some("2001:db8::7".parse().unwrap())
        );
        let a = |ip: &str, flags| (ip.parse::<Ipv6Addr>().unwrap(), flags);
        // Permanent before dynamic, stable before temporary, never deprecated
        // or link-local.
        let got = pick_ipv6(&[
            a("fe80::1", IFA_F_PERMANENT),
            a("2001:db8::dead", IFA_F_DEPRECATED | IFA_F_PERMANENT),
            a("2001:db8::7e3", IFA_F_TEMPORARY),
            a("2001:db8::1", 0),
            a("2001:db8::2", IFA_F_PERMANENT),
        ]);
        assert_eq!(got, Some("2001:db8::2".parse().unwrap()));
        assert_eq!(
            pick_ipv6(&[a("2001:db8::7e3", IFA_F_TEMPORARY), a("2001:db8::1", 0)]),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(pick_ipv6(&[a("fe80::1", IFA_F_PERMANENT)]), None);
    }
}
