//! Each peer's traffic for `/metrics`, with `--metrics-per-peer` only: read
//! from the eBPF maps when scraped (one pass over REMOTE_SUBNETS, one over
//! PEER_STATS, joined by public IP), so the agent's refresh every second
//! does no work per peer.

use std::{collections::HashMap, net::Ipv4Addr, os::fd::AsFd as _, sync::Arc};

use aya::maps::{Map, MapData, MapError};
use overlay_common::consts::{MAP_PEER_STATS, MAP_REMOTE_SUBNETS};

use super::state::PeerTrafficMetric;
use crate::datapath::{
    DatapathError, Peer,
    ebpf::{
        EbpfDatapath, EbpfError, PeerCounters, ProgramIds, read_peer_counters, read_remote_subnets,
    },
};

/// Handles of our own on the datapath's peer maps, for the HTTP server.
#[derive(Debug)]
pub struct PeerMaps {
    /// The programs loaded with these maps: a datapath set up again has new
    /// programs, and maybe new maps.
    programs: Option<ProgramIds>,
    remote_subnets: Map,
    peer_stats: Map,
}

impl PeerMaps {
    /// Takes handles on `dp`'s peer maps.
    pub fn of(dp: &EbpfDatapath) -> Result<PeerMaps, DatapathError> {
        let handle = |name: &'static str| -> Result<Map, DatapathError> {
            duplicate(dp.map(name)?).map_err(|source| {
                EbpfError::Map {
                    map: name,
                    op: "duplicate the handle".into(),
                    source,
                }
                .into()
            })
        };
        Ok(PeerMaps {
            programs: dp.program_ids(),
            remote_subnets: handle(MAP_REMOTE_SUBNETS)?,
            peer_stats: handle(MAP_PEER_STATS)?,
        })
    }

    /// Every peer in REMOTE_SUBNETS with its traffic, sorted by subnet.
    pub fn read(&self) -> Result<Vec<PeerTrafficMetric>, EbpfError> {
        let peers = read_remote_subnets(&self.remote_subnets)?;
        let traffic = read_peer_counters(&self.peer_stats)?;
        Ok(join(&peers, &traffic))
    }
}

/// Keeps `slot` on the peer maps of the eBPF datapath in use: the same
/// handles while its programs stay (no system call), new ones after it was
/// set up again, none without it.
pub fn follow(slot: &mut Option<Arc<PeerMaps>>, dp: Option<&EbpfDatapath>) {
    let Some(dp) = dp else {
        *slot = None;
        return;
    };
    if slot
        .as_ref()
        .is_some_and(|m| m.programs == dp.program_ids())
    {
        return;
    }
    *slot = match PeerMaps::of(dp) {
        Ok(m) => Some(Arc::new(m)),
        Err(e) => {
            log::warn!(
                "per-peer metrics: opening the peer maps: {}; /metrics leaves them out",
                e.reason()
            );
            None
        }
    };
}

/// Each peer with its counters (zero when PEER_STATS has no entry for its
/// public IP): a lookup per peer, not a scan.
pub fn join(peers: &[Peer], traffic: &HashMap<Ipv4Addr, PeerCounters>) -> Vec<PeerTrafficMetric> {
    peers
        .iter()
        .map(|p| PeerTrafficMetric {
            subnet: p.subnet,
            traffic: traffic.get(&p.public_ip).copied().unwrap_or(PeerCounters {
                public_ip: p.public_ip,
                tx: Default::default(),
                rx: Default::default(),
            }),
        })
        .collect()
}

/// A second handle on an open map (a duplicate of its file descriptor),
/// sharing the kernel object.
fn duplicate(map: &Map) -> Result<Map, MapError> {
    let data = match map {
        Map::Array(d)
        | Map::ArrayOfMaps(d)
        | Map::BloomFilter(d)
        | Map::CgroupArray(d)
        | Map::CgroupStorage(d)
        | Map::CgrpStorage(d)
        | Map::CpuMap(d)
        | Map::DevMap(d)
        | Map::DevMapHash(d)
        | Map::HashMap(d)
        | Map::HashOfMaps(d)
        | Map::InodeStorage(d)
        | Map::LpmTrie(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuCgroupStorage(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::PerfEventArray(d)
        | Map::ProgramArray(d)
        | Map::Queue(d)
        | Map::ReusePortSockArray(d)
        | Map::RingBuf(d)
        | Map::SockHash(d)
        | Map::SockMap(d)
        | Map::SkStorage(d)
        | Map::Stack(d)
        | Map::StackTraceMap(d)
        | Map::Unsupported(d)
        | Map::XskMap(d) => d,
    };
    let fd = data.fd().as_fd().try_clone_to_owned()?;
    Map::from_map_data(MapData::from_fd(fd)?)
}

#[cfg(test)]
mod tests {
    use overlay_common::counters::Counter;

    use super::*;

    #[test]
    fn join_looks_each_peer_up_and_zeroes_the_missing() {
        let peer = |subnet: &str, ip: &str| Peer {
            subnet: subnet.parse().unwrap(),
            public_ip: ip.parse().unwrap(),
            vtep_mac: "02:00:00:00:00:01".parse().unwrap(),
            v6: None,
        };
        let counted = PeerCounters {
            public_ip: "192.168.64.4".parse().unwrap(),
            tx: Counter {
                packets: 5,
                bytes: 500,
            },
            rx: Counter {
                packets: 3,
                bytes: 450,
            },
        };
        let traffic = [(counted.public_ip, counted)].into();
        let got = join(
            &[
                peer("10.5.53.0/24", "192.168.64.4"),
                peer("10.5.54.0/24", "192.168.64.5"),
            ],
            &traffic,
        );
        assert_eq!(got[0].traffic, counted);
        assert_eq!(got[1].subnet, "10.5.54.0/24".parse().unwrap());
        assert_eq!(
            got[1].traffic.public_ip,
            "192.168.64.5".parse::<Ipv4Addr>().unwrap()
        );
        assert_eq!(got[1].traffic.tx, Counter::default());
        assert_eq!(got[1].traffic.rx, Counter::default());
    }
}
