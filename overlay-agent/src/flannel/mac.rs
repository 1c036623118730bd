//! MAC addresses as flannel prints them (`c6:d2:32:6f:8f:44`).

use std::{fmt, str::FromStr};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid MAC address {0:?}: expected six hex octets separated by ':'")]
pub struct ParseMacError(pub String);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = ParseMacError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseMacError(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

impl MacAddr {
    /// A locally administered unicast MAC derived from the node's public IP and
    /// VNI, so that a restarted agent (or a re-created device) keeps the MAC its
    /// lease publishes and peers' neighbour/FDB entries stay valid. flannel picks
    /// a random MAC each time the device is created, which is a known source of
    /// stale entries on peers.
    pub fn stable_for(public_ip: std::net::Ipv4Addr, vni: u32) -> MacAddr {
        Self::stable_from(&public_ip.octets(), vni)
    }

    /// [`MacAddr::stable_for`] of the node's `flannel-v6.<VNI>`, from its
    /// public IPv6.
    pub fn stable_for_ipv6(public_ip: std::net::Ipv6Addr, vni: u32) -> MacAddr {
        Self::stable_from(&public_ip.octets(), vni)
    }

    fn stable_from(octets: &[u8], vni: u32) -> MacAddr {
        // FNV-1a over the inputs: small, deterministic and dependency-free.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in octets.iter().chain(vni.to_be_bytes().iter()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let b = h.to_be_bytes();
        // Set the locally-administered bit, clear the multicast bit.
        MacAddr([(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_flannel_format() {
        let m: MacAddr = "c6:d2:32:6f:8f:44".parse().unwrap();
        assert_eq!(m.to_string(), "c6:d2:32:6f:8f:44");
        assert!("c6:d2:32:6f:8f".parse::<MacAddr>().is_err());
        assert!("c6:d2:32:6f:8f:44:00".parse::<MacAddr>().is_err());
        assert!("zz:d2:32:6f:8f:44".parse::<MacAddr>().is_err());
    }

    #[test]
    fn stable_mac_is_deterministic_local_unicast() {
        let ip = "192.168.64.3".parse().unwrap();
        let a = MacAddr::stable_for(ip, 1);
        assert_eq!(a, MacAddr::stable_for(ip, 1));
        assert_ne!(a, MacAddr::stable_for(ip, 2));
        assert_eq!(a.0[0] & 0x03, 0x02);
        // Peers hold this MAC: it must not change between versions.
        assert_eq!(a.to_string(), "c2:30:e3:df:fc:f7");
        // The v6 VTEP's differs from the v4 one's, and is stable too.
        let ip6: std::net::Ipv6Addr = "fd00::3".parse().unwrap();
        let b = MacAddr::stable_for_ipv6(ip6, 1);
        assert_eq!(b, MacAddr::stable_for_ipv6(ip6, 1));
        assert_ne!(b, a);
        assert_eq!(b.0[0] & 0x03, 0x02);
    }
}
