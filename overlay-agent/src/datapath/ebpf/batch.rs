//! Many peers written into the peer maps with `BPF_MAP_UPDATE_BATCH`: one
//! bpf(2) call per map for a whole batch instead of one per entry.
//!
//! aya 0.14 has no batch API, so this is the raw syscall (through libc) on
//! the map's descriptor, kept to [`update_batch`]. The kernel's generic
//! batch update (hash maps, per-CPU hash maps and the LPM trie all use it,
//! since 5.6) writes the elements in order, stops at the first one it
//! refuses and reports how many it wrote, so a refused element is matched
//! to its peer and the batch goes on after it.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

use aya::{
    Pod,
    maps::{MapData, MapError},
    sys::SyscallError,
};

use super::*;

/// `BPF_MAP_UPDATE_BATCH` (uapi linux/bpf.h, enum bpf_cmd).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// `BPF_ANY`: the only element flag a batch update takes besides
/// `BPF_F_LOCK` (the kernel refuses `BPF_NOEXIST` there with EINVAL).
const BPF_ANY: u64 = 0;

/// `union bpf_attr`'s `batch` member: the kernel reads this many bytes.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The bytes of a plain value (a map key or value type).
fn bytes_of<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: `Pod` types are plain data with no padding the kernel would
    // not also see; reading them as bytes is what aya does too.
    unsafe { std::slice::from_raw_parts((v as *const T).cast(), size_of::<T>()) }
}

/// Writes `count` elements (`keys` and `values` packed back to back) with
/// `elem_flags`. `Ok(())` when all went in; otherwise how many went in
/// before the one refused, and why.
fn update_batch(
    map: &MapData,
    keys: &[u8],
    values: &[u8],
    count: usize,
    elem_flags: u64,
) -> Result<(), (usize, io::Error)> {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: count as u32,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        elem_flags,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` and the buffers it points at are valid for the call;
    // the kernel reads `count` keys and values of the map's sizes from them
    // (the callers size them so) and writes `count` back.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &raw mut attr,
            size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        let err = io::Error::last_os_error();
        Err((attr.count as usize, err))
    }
}

/// One map's batch: `keys` and `values` hold `count` elements of equal
/// sizes back to back; each element's outcome, in order. An element the
/// map refuses fails alone and the batch goes on after it, from where it
/// stopped: no element is sent twice. A call refused before any element
/// (the kernel then leaves `count` as it was) fails every element left.
fn write_all(
    map: &MapData,
    keys: &[u8],
    values: &[u8],
    count: usize,
) -> Vec<Result<(), io::Error>> {
    let mut out: Vec<Result<(), io::Error>> = Vec::with_capacity(count);
    if count == 0 {
        return out;
    }
    let (ks, vs) = (keys.len() / count, values.len() / count);
    let mut at = 0;
    while at < count {
        match update_batch(
            map,
            &keys[at * ks..],
            &values[at * vs..],
            count - at,
            BPF_ANY,
        ) {
            Ok(()) => {
                out.extend((at..count).map(|_| Ok(())));
                at = count;
            }
            Err((done, e)) if done >= count - at => {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                out.extend((at..count).map(|_| Err(io::Error::from_raw_os_error(errno))));
                at = count;
            }
            Err((done, e)) => {
                out.extend((0..done).map(|_| Ok(())));
                out.push(Err(e));
                at += done + 1;
            }
        }
    }
    out
}

/// A failed batch element as aya would report a single insert.
fn syscall_error(e: io::Error) -> MapError {
    MapError::SyscallError(SyscallError {
        call: "bpf_map_update_batch",
        io_error: e,
    })
}

/// [`insert_peer`] for many vxlan peers: KNOWN_VTEPS for all, then
/// PEER_STATS (a zeroed entry for each public IP no peer in the maps uses
/// yet), then REMOTE_SUBNETS, each one batch, so every peer's
/// ingress entry is in before its egress entry, as one at a time. A peer a
/// map refuses (full, [`EbpfError::MapFull`], or any error) fails alone and
/// is taken out of the maps it entered, unless a peer the maps hold uses
/// its public IP. One result per peer.
pub(super) fn insert_peers(
    ebpf: &mut Ebpf,
    users: &mut VtepUsers,
    peers: &[Peer],
    capacity: u32,
) -> Vec<Result<(), EbpfError>> {
    let mut results: Vec<Result<(), EbpfError>> = peers.iter().map(|_| Ok(())).collect();
    let cpus = match possible_cpus() {
        Ok(n) => n,
        Err(e) => {
            let text = e.to_string();
            return peers
                .iter()
                .map(|_| Err(EbpfError::Cpus(io::Error::other(text.clone()))))
                .collect();
        }
    };
    // Only peers still fine go to the next map.
    let step = |results: &mut Vec<Result<(), EbpfError>>,
                ebpf: &mut Ebpf,
                name: &'static str,
                key: &dyn Fn(&Peer) -> Vec<u8>,
                keep: &dyn Fn(&Peer) -> bool,
                value: &dyn Fn(&Peer) -> Vec<u8>,
                what: &dyn Fn(&Peer) -> String| {
        let todo: Vec<usize> = (0..peers.len())
            .filter(|&i| results[i].is_ok() && !keep(&peers[i]))
            .collect();
        let keys: Vec<u8> = todo.iter().flat_map(|&i| key(&peers[i])).collect();
        let values: Vec<u8> = todo.iter().flat_map(|&i| value(&peers[i])).collect();
        let Some(map) = ebpf.map_mut(name) else {
            for &i in &todo {
                results[i] = Err(EbpfError::MissingMap(name));
            }
            return;
        };
        let map: &MapData = match map {
            aya::maps::Map::HashMap(m)
            | aya::maps::Map::PerCpuHashMap(m)
            | aya::maps::Map::LpmTrie(m) => m,
            _ => {
                for &i in &todo {
                    results[i] = Err(EbpfError::map(
                        name,
                        "batch update",
                        MapError::InvalidMapType { map_type: 0 },
                    ));
                }
                return;
            }
        };
        let outcomes = write_all(map, &keys, &values, todo.len());
        for (&i, outcome) in todo.iter().zip(outcomes) {
            if let Err(e) = outcome {
                results[i] = Err(insert_err(
                    name,
                    what(&peers[i]),
                    capacity,
                    syscall_error(e),
                ));
            }
        }
    };
    step(
        &mut results,
        ebpf,
        MAP_KNOWN_VTEPS,
        &|p| p.public_ip.octets().to_vec(),
        &|_| false,
        &|p| bytes_of(&known_vtep(p)).to_vec(),
        &|p| p.public_ip.to_string(),
    );
    let in_use: std::collections::HashSet<Ipv4Addr> = peers
        .iter()
        .map(|p| p.public_ip)
        .filter(|ip| users.in_use(*ip))
        .collect();
    let zeros: Vec<u8> = {
        // Per-CPU values: each CPU's value padded to 8 bytes.
        let one = bytes_of(&PeerTraffic::default()).to_vec();
        let stride = one.len().next_multiple_of(8);
        let mut v = vec![0u8; stride * cpus];
        for c in 0..cpus {
            v[c * stride..c * stride + one.len()].copy_from_slice(&one);
        }
        v
    };
    step(
        &mut results,
        ebpf,
        MAP_PEER_STATS,
        &|p| p.public_ip.octets().to_vec(),
        // A public IP a peer in the maps uses has its PEER_STATS entry
        // (start-up prunes every other): its counts stay. A batch update
        // cannot say "only if absent" (no BPF_NOEXIST there).
        &|p| in_use.contains(&p.public_ip),
        &|_| zeros.clone(),
        &|p| p.public_ip.to_string(),
    );
    step(
        &mut results,
        ebpf,
        MAP_REMOTE_SUBNETS,
        &|p| {
            let mut k = u32::from(p.subnet.prefix_len()).to_ne_bytes().to_vec();
            k.extend_from_slice(&p.subnet.network().octets());
            k
        },
        &|_| false,
        &|p| bytes_of(&remote_vtep(p)).to_vec(),
        &|p| p.subnet.to_string(),
    );

    // Count the peers now in the maps first, then drop the public IPs no
    // peer uses any more: a failed peer's, or one a moved peer left, unless
    // another peer of this batch now uses it.
    let mut unused: Vec<Ipv4Addr> = Vec::new();
    for (p, r) in peers.iter().zip(&results) {
        match r {
            Ok(()) => unused.extend(users.set(p.subnet, p.public_ip)),
            Err(_) => unused.push(p.public_ip),
        }
    }
    unused.sort_unstable();
    unused.dedup();
    for ip in unused {
        if users.in_use(ip) {
            continue;
        }
        if let Err(e) = forget_vtep(ebpf, ip.octets()) {
            warn!(
                "dropping the unused VTEP {ip} from the maps failed: {}",
                DatapathError::from(e).reason()
            );
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attr_is_the_kernels_batch_layout() {
        // in_batch, out_batch, keys, values (4 x u64), count, map_fd
        // (2 x u32), elem_flags, flags (2 x u64).
        assert_eq!(size_of::<BatchAttr>(), 56);
        assert_eq!(std::mem::offset_of!(BatchAttr, count), 32);
        assert_eq!(std::mem::offset_of!(BatchAttr, elem_flags), 40);
    }
}
