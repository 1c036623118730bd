//! The eBPF datapath's state on bpffs, so that it outlives the agent.
//!
//! Layout under the pin directory (`--bpf-pin-dir`, default
//! `/sys/fs/bpf/overlay`), stable across versions:
//!
//! ```text
//! <dir>/REMOTE_SUBNETS   LPM trie: remote subnet -> VTEP MAC + public IP
//! <dir>/KNOWN_VTEPS      hash: public IP of every peer -> VTEP MAC
//! <dir>/NODE_CONFIG      array[1]: this node's VNI, addresses, ifindexes
//! <dir>/COUNTERS         per-CPU array: packets/bytes per reason
//! <dir>/PEER_STATS       per-CPU hash: public IP -> packets/bytes each way
//! <dir>/FAST_CONFIG      array[1]: fast path on/off, this node's pod subnet
//! <dir>/FAST_FLOWS       LRU hash: flow + direction -> approval (time, pod veth, MACs)
//! <dir>/POD_VETHS        hash: ifindex of every pod veth the fast path is attached to
//! <dir>/links/vxlan_egress       TCX egress link on flannel.<VNI>
//! <dir>/links/vxlan_ingress_tc   TCX ingress link on the underlay
//! <dir>/links/vxlan_ingress_xdp  XDP link on the underlay (xdp+tc only)
//! <dir>/links/veth_from_pod-<ifindex>  TCX ingress link on a pod's veth (fast path)
//! <dir>/links/veth_to_pod-<ifindex>    TCX egress link on a pod's veth (fast path)
//! ```
//!
//! Pinned links keep the programs attached when the agent exits (as
//! flanneld leaves its routes); pinned maps keep the peers and counters. A
//! restarted agent reopens the maps (aya's `map_pin_path`) and swaps its
//! freshly loaded programs into the pinned links with `BPF_LINK_UPDATE`, an
//! atomic replacement: no packet ever meets an empty hook.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::maps::MapInfo;
use log::warn;
use overlay_common::{
    consts::{
        MAP_COUNTERS, MAP_FAST_CONFIG, MAP_FAST_FLOWS, MAP_KNOWN_VTEPS, MAP_NODE_CONFIG,
        MAP_PEER_STATS, MAP_POD_VETHS, MAP_REMOTE_SUBNETS, MAX_FAST_FLOWS, MAX_PEERS,
        MAX_POD_VETHS,
    },
    counters::{Counter, Reason},
    fastpath::{FastFlow, FastPathConfig, FlowKey},
    maps::{KnownVtep, NodeConfig, PeerTraffic, RemoteVtep},
};

/// Where the operator's pins live when `--bpf-pin-dir` is not given.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/overlay";

/// Every map of the object, with the geometry this build expects of a pinned
/// map it reopens: (name, key size, value size, max entries).
pub const MAPS: [(&str, u32, u32, u32); 8] = [
    (
        MAP_REMOTE_SUBNETS,
        // LPM key: prefix length (u32) + the address.
        4 + 4,
        size_of::<RemoteVtep>() as u32,
        MAX_PEERS,
    ),
    (MAP_KNOWN_VTEPS, 4, size_of::<KnownVtep>() as u32, MAX_PEERS),
    (MAP_NODE_CONFIG, 4, size_of::<NodeConfig>() as u32, 1),
    (MAP_COUNTERS, 4, size_of::<Counter>() as u32, Reason::SLOTS),
    (
        MAP_PEER_STATS,
        4,
        size_of::<PeerTraffic>() as u32,
        MAX_PEERS,
    ),
    (MAP_FAST_CONFIG, 4, size_of::<FastPathConfig>() as u32, 1),
    (
        MAP_FAST_FLOWS,
        size_of::<FlowKey>() as u32,
        size_of::<FastFlow>() as u32,
        MAX_FAST_FLOWS,
    ),
    (MAP_POD_VETHS, 4, 4, MAX_POD_VETHS),
];

/// The pin directory of one agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn link(&self, program: &str) -> PathBuf {
        self.links_dir().join(program)
    }

    /// Creates the directories and unpins every map whose geometry differs
    /// from this build's (an upgrade that changed a map): the new map is then
    /// created, filled and pinned, and the old programs keep the old map until
    /// the link update swaps them out. Returns the maps it unpinned.
    pub fn prepare(&self) -> io::Result<Vec<&'static str>> {
        std::fs::create_dir_all(self.links_dir())?;
        let mut replaced = Vec::new();
        for (name, key, value, max) in MAPS {
            let path = self.map(name);
            if !path.exists() {
                continue;
            }
            let fits = match MapInfo::from_pin(&path) {
                Ok(info) => {
                    info.key_size() == key
                        && info.value_size() == value
                        && info.max_entries() == max
                }
                Err(e) => {
                    warn!("cannot read pinned map {}: {e}", path.display());
                    false
                }
            };
            if !fits {
                warn!(
                    "pinned map {} does not match this build (key {key} B, value {value} B, {max} entries): replacing it",
                    path.display()
                );
                std::fs::remove_file(&path)?;
                replaced.push(name);
            }
        }
        Ok(replaced)
    }

    /// The pinned link of `program`, if it is still attached to `ifindex`.
    /// A pin whose link lost its device (the device was re-created) is
    /// removed, so the caller attaches afresh.
    pub fn live_link(&self, program: &str, ifindex: u32) -> io::Result<Option<PathBuf>> {
        live_link_at(&self.link(program), ifindex)
    }

    /// Removes every pin (links first, which detaches the programs once no
    /// process holds them), then the directories. Returns what it removed.
    pub fn remove_all(&self) -> io::Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        let mut remove = |p: PathBuf| -> io::Result<()> {
            match std::fs::remove_file(&p) {
                Ok(()) => {
                    removed.push(p);
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
        };
        if let Ok(entries) = std::fs::read_dir(self.links_dir()) {
            for entry in entries {
                remove(entry?.path())?;
            }
        }
        for (name, ..) in MAPS {
            remove(self.map(name))?;
        }
        for dir in [self.links_dir(), self.root.clone()] {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // Something else lives there (not ours): leave it.
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(removed)
    }
}

/// What the kernel says about a link (`struct bpf_link_info`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    pub prog_id: u32,
    /// The device of a TCX or XDP link; 0 once the device is gone.
    pub ifindex: u32,
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// The link pinned at `path`, if it is still attached to `ifindex`; see
/// [`PinLayout::live_link`].
pub fn live_link_at(path: &Path, ifindex: u32) -> io::Result<Option<PathBuf>> {
    if !path.exists() {
        return Ok(None);
    }
    let fd = obj_get(path)?;
    let info = link_info(&fd)?;
    if info.ifindex == ifindex && ifindex != 0 {
        return Ok(Some(path.to_owned()));
    }
    warn!(
        "pinned link {} is attached to ifindex {} instead of {ifindex}: attaching afresh",
        path.display(),
        info.ifindex
    );
    std::fs::remove_file(path)?;
    Ok(None)
}

/// `BPF_OBJ_GET`: an fd for a pinned object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // union bpf_attr for BPF_OBJ_GET: pathname (u64), bpf_fd, file_flags, path_fd.
    let mut attr = [0u64; 3];
    attr[0] = c.as_ptr() as u64;
    // SAFETY: attr is a zeroed bpf_attr prefix of the size passed; the path
    // outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_mut_ptr(),
            size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link: its id, program and device.
pub fn link_info(fd: &OwnedFd) -> io::Result<LinkInfo> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then an 8-aligned
    // union whose tcx and xdp members both start with the ifindex (offset 16).
    let mut info = [0u32; 32];
    let mut attr = [0u64; 2];
    attr[0] = u64::from(fd.as_raw_fd() as u32) | ((size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: attr points at `info`, writable for the length given.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            attr.as_mut_ptr(),
            size_of_val(&attr),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(LinkInfo {
        id: info[1],
        prog_id: info[2],
        ifindex: info[4],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_names_are_stable() {
        let p = PinLayout::new("/sys/fs/bpf/overlay");
        assert_eq!(
            p.map(MAP_REMOTE_SUBNETS),
            Path::new("/sys/fs/bpf/overlay/REMOTE_SUBNETS")
        );
        assert_eq!(
            p.link("vxlan_egress"),
            Path::new("/sys/fs/bpf/overlay/links/vxlan_egress")
        );
        let names: Vec<&str> = MAPS.iter().map(|m| m.0).collect();
        assert_eq!(
            names,
            [
                "REMOTE_SUBNETS",
                "KNOWN_VTEPS",
                "NODE_CONFIG",
                "COUNTERS",
                "PEER_STATS",
                "FAST_CONFIG",
                "FAST_FLOWS",
                "POD_VETHS"
            ]
        );
    }

    #[test]
    fn missing_pin_is_an_error_not_a_panic() {
        let e = obj_get(Path::new("/nonexistent/overlay/pin")).unwrap_err();
        assert!(
            matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EPERM)),
            "{e}"
        );
    }
}
