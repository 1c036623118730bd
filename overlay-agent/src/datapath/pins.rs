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
//! <dir>/POD_ADDRS        LRU hash: pod address -> the veth the host delivers it to
//! <dir>/FAST_CONFIG6, FAST_FLOWS6, POD_ADDRS6  the same for IPv6 (dual stack)
//! <dir>/JUMPS            prog array: the IPv6 programs the IPv4 ones tail-call
//! <dir>/LAYOUT           array[1]: the layout version of the maps above
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
//!
//! A map is reused only by a build that reads it as the build that created
//! it wrote it. Its shape (type, sizes, capacity, flags) is checked against
//! the object's declaration, but a field can change its meaning and keep
//! its size, so the maps also carry the version of their layout
//! (`overlay_common::maps::MAP_LAYOUT_VERSION`) in `LAYOUT`, see
//! [`PinLayout::layout_plan`]: the same version is reused, an older one (or
//! none) gets a new set of maps, and a newer one stops the agent before it
//! touches anything.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::maps::{Array, Map, MapData, MapError, MapInfo, MapType};
use log::warn;
use overlay_common::consts::{
    MAP_COUNTERS, MAP_FAST_CONFIG, MAP_FAST_CONFIG6, MAP_FAST_FLOWS, MAP_FAST_FLOWS6, MAP_JUMPS,
    MAP_KNOWN_VTEPS, MAP_KNOWN_VTEPS6, MAP_LAYOUT, MAP_NODE_CONFIG, MAP_NODE_CONFIG6,
    MAP_PEER_STATS, MAP_POD_ADDRS, MAP_POD_ADDRS6, MAP_POD_VETHS, MAP_REMOTE_SUBNETS,
    MAP_REMOTE_SUBNETS6,
};

/// Where the operator's pins live when `--bpf-pin-dir` is not given.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/overlay";

/// Every map of the object, pinned under these names.
pub const MAPS: [&str; 17] = [
    MAP_REMOTE_SUBNETS,
    MAP_KNOWN_VTEPS,
    MAP_NODE_CONFIG,
    MAP_REMOTE_SUBNETS6,
    MAP_KNOWN_VTEPS6,
    MAP_NODE_CONFIG6,
    MAP_COUNTERS,
    MAP_PEER_STATS,
    MAP_FAST_CONFIG,
    MAP_FAST_FLOWS,
    MAP_POD_VETHS,
    MAP_POD_ADDRS,
    MAP_FAST_CONFIG6,
    MAP_FAST_FLOWS6,
    MAP_POD_ADDRS6,
    MAP_JUMPS,
    MAP_LAYOUT,
];

/// The shape of `LAYOUT` (array of one u32). Every build that records a
/// layout version records it in a map of this shape; a `LAYOUT` of another
/// shape comes from a later build that changed how it records it.
const LAYOUT_SHAPE: MapShape = MapShape {
    map_type: aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
    key_size: 4,
    value_size: 4,
    max_entries: 1,
    flags: 0,
};

/// What the pins say about the layout of their maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinnedLayout {
    /// No map is pinned: nothing to reuse.
    Empty,
    /// Maps are pinned but no version is recorded: they were made by a
    /// build from before layout versions, or by a start that died between
    /// creating the maps and recording the version (`LAYOUT` holds 0).
    Unversioned,
    /// `LAYOUT` holds this version.
    Version(u32),
}

impl std::fmt::Display for PinnedLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PinnedLayout::Empty => f.write_str("no maps"),
            PinnedLayout::Unversioned => f.write_str("no layout version"),
            PinnedLayout::Version(v) => write!(f, "layout version {v}"),
        }
    }
}

/// What a start does with the pinned maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutPlan {
    /// Nothing pinned: the maps are created and pinned.
    Fresh,
    /// Our own layout: every map whose shape still matches is reused (a
    /// hitless restart keeps the peers, counters and approvals).
    Reuse,
    /// An older layout (or none recorded): no map of the old set is
    /// reused. A new set is created and pinned in its place; the programs
    /// attached now keep the old maps (their fds hold them) until their
    /// links are swapped, so old programs only ever see old maps and new
    /// programs new ones.
    Migrate { from: PinnedLayout },
}

/// Why the pinned maps cannot be used by this build. Nothing under the pin
/// directory has been changed when one of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A downgrade: the maps were made by a newer build. Running our
    /// programs against them would misread them, and replacing them would
    /// detach a newer build's datapath that nobody asked to remove.
    #[error(
        "the pinned maps under {} have layout version {found}, newer than this build's {ours} (a downgrade): not starting, so that no program of this build runs against maps of another layout, and leaving the pins and the programs attached through them as they are; {}",
        dir.display(),
        remedy(dir)
    )]
    Newer { dir: PathBuf, found: u32, ours: u32 },
    /// `LAYOUT` exists with another shape: only a later build could have
    /// made it.
    #[error(
        "the layout record {} is not one this build knows ({differences}), so it comes from a newer build: not starting, and leaving the pins and their programs as they are; {}",
        path.display(),
        remedy(dir)
    )]
    UnknownRecord {
        dir: PathBuf,
        path: PathBuf,
        differences: String,
    },
    /// The record could not be read: which build made the maps is unknown,
    /// so nothing is replaced either.
    #[error("reading the layout record {} failed: not starting over pins of unknown layout", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: MapError,
    },
}

/// What a program built for a map relies on: its type (a hash is not an LRU
/// hash, a per-CPU map holds one value per CPU), key and value sizes, capacity
/// and creation flags (`BPF_F_NO_PREALLOC` decides what the map reserves).
/// Either a pinned map as the kernel describes it (`struct bpf_map_info`) or a
/// map as an object declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    /// `enum bpf_map_type`.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl MapShape {
    /// The shape of the map pinned at `path`.
    pub fn of_pin(path: &Path) -> Result<MapShape, MapError> {
        let info = MapInfo::from_pin(path)?;
        Ok(MapShape {
            // MapType's discriminants are the kernel's bpf_map_type values.
            map_type: info.map_type()? as u32,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        })
    }

    /// How `self` differs from `want`, one phrase per field (`type Hash, not
    /// LruHash`); empty when a program built for `want` can use it.
    pub fn differences(&self, want: &MapShape) -> Vec<String> {
        let Self {
            map_type,
            key_size,
            value_size,
            max_entries,
            flags,
        } = *self;
        let mut out = Vec::new();
        if map_type != want.map_type {
            out.push(format!(
                "type {}, not {}",
                type_name(map_type),
                type_name(want.map_type)
            ));
        }
        for (what, have, wanted) in [
            ("key", key_size, want.key_size),
            ("value", value_size, want.value_size),
        ] {
            if have != wanted {
                out.push(format!("{what} {have} B, not {wanted} B"));
            }
        }
        if max_entries != want.max_entries {
            out.push(format!("{max_entries} entries, not {}", want.max_entries));
        }
        if flags != want.flags {
            out.push(format!("flags {flags:#x}, not {:#x}", want.flags));
        }
        out
    }
}

/// `Hash`, `PerCpuHash`, ... as aya names the kernel's map types; the number
/// when aya does not know it.
fn type_name(map_type: u32) -> String {
    aya_obj::generated::bpf_map_type::try_from(map_type)
        .ok()
        .and_then(|t| MapType::try_from(t).ok())
        .map_or_else(|| map_type.to_string(), |t| format!("{t:?}"))
}

/// The shapes `object` declares for [`MAPS`], with the capacities the loader
/// will override (`EbpfLoader::map_max_entries`) applied: what a pinned map
/// must match to be reused.
pub fn declared_shapes(
    object: &[u8],
    capacities: &[(&str, u32)],
) -> Result<Vec<(&'static str, MapShape)>, aya_obj::ParseError> {
    let obj = aya_obj::Object::parse(object)?;
    Ok(MAPS
        .iter()
        .filter_map(|&name| {
            let map = obj.maps.get(name)?;
            let max_entries = capacities
                .iter()
                .find(|(n, _)| *n == name)
                .map_or_else(|| map.max_entries(), |(_, max)| *max);
            Some((
                name,
                MapShape {
                    map_type: map.map_type(),
                    key_size: map.key_size(),
                    value_size: map.value_size(),
                    max_entries,
                    flags: map.map_flags(),
                },
            ))
        })
        .collect())
}

/// The pin directory of one agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `--bpf-pin-dir`, or the default directory without it: where `status`,
    /// `cleanup` and the kernel datapath's clean-up look.
    pub fn chosen(dir: Option<&Path>) -> Self {
        Self::new(dir.unwrap_or(Path::new(DEFAULT_PIN_DIR)))
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

    /// What the pins record about their maps' layout (see [`PinnedLayout`]).
    pub fn pinned_layout(&self) -> Result<PinnedLayout, LayoutError> {
        let path = self.map(MAP_LAYOUT);
        if !path.exists() {
            let any = MAPS.iter().any(|name| self.map(name).exists());
            return Ok(if any {
                PinnedLayout::Unversioned
            } else {
                PinnedLayout::Empty
            });
        }
        let read_err = |source| LayoutError::Read {
            path: path.clone(),
            source,
        };
        let shape = MapShape::of_pin(&path).map_err(read_err)?;
        let differences = shape.differences(&LAYOUT_SHAPE);
        if !differences.is_empty() {
            return Err(LayoutError::UnknownRecord {
                dir: self.root.clone(),
                path,
                differences: differences.join(", "),
            });
        }
        let map = MapData::from_pin(&path)
            .and_then(Map::from_map_data)
            .map_err(read_err)?;
        let record: Array<&MapData, u32> = Array::try_from(&map).map_err(read_err)?;
        Ok(match record.get(&0, 0).map_err(read_err)? {
            0 => PinnedLayout::Unversioned,
            v => PinnedLayout::Version(v),
        })
    }

    /// What a start of a build with layout version `ours` does with the
    /// pinned maps: see [`LayoutPlan`]; a newer layout is a [`LayoutError`].
    /// Changes nothing.
    pub fn layout_plan(&self, ours: u32) -> Result<LayoutPlan, LayoutError> {
        plan(self.root(), self.pinned_layout()?, ours)
    }

    /// Unpins every map (not the links), so that the next load creates a new
    /// set: [`LayoutPlan::Migrate`]. Programs attached now keep the maps
    /// they use until they are detached or replaced. Returns the maps it
    /// unpinned.
    pub fn unpin_maps(&self) -> io::Result<Vec<&'static str>> {
        std::fs::create_dir_all(self.links_dir())?;
        let mut unpinned = Vec::new();
        for name in MAPS {
            match std::fs::remove_file(self.map(name)) {
                Ok(()) => unpinned.push(name),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(unpinned)
    }

    /// Creates the directories and unpins every map that does not have the
    /// shape `declared` gives it (an upgrade that changed a map's type, flags,
    /// sizes or capacity): the new map is then created, filled and pinned, and
    /// the old programs keep the old map until the link update swaps them out.
    /// Reusing such a map would hand the new programs a map they were not
    /// built for (aya reopens a pin without looking at it). Returns the maps
    /// it unpinned.
    pub fn prepare(&self, declared: &[(&'static str, MapShape)]) -> io::Result<Vec<&'static str>> {
        std::fs::create_dir_all(self.links_dir())?;
        let mut replaced = Vec::new();
        for &(name, want) in declared {
            let path = self.map(name);
            if !path.exists() {
                continue;
            }
            let why = match MapShape::of_pin(&path) {
                Ok(have) => have.differences(&want).join(", "),
                Err(e) => format!("cannot read it: {e}"),
            };
            if !why.is_empty() {
                warn!(
                    "pinned map {} does not match this build ({why}): replacing it",
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
        for name in MAPS {
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

/// What the operator can do about the pins of a newer build under `dir`.
fn remedy(dir: &Path) -> String {
    format!(
        "start the newer build again, or remove its state first with its \
         `overlay-agent --bpf-pin-dir={} cleanup` (or remove the pins under that directory, \
         which detaches its programs)",
        dir.display()
    )
}

/// [`PinLayout::layout_plan`] for what the pins under `dir` record.
fn plan(dir: &Path, pinned: PinnedLayout, ours: u32) -> Result<LayoutPlan, LayoutError> {
    Ok(match pinned {
        PinnedLayout::Empty => LayoutPlan::Fresh,
        PinnedLayout::Version(v) if v == ours => LayoutPlan::Reuse,
        PinnedLayout::Version(found) if found > ours => {
            return Err(LayoutError::Newer {
                dir: dir.to_owned(),
                found,
                ours,
            });
        }
        from @ (PinnedLayout::Unversioned | PinnedLayout::Version(_)) => {
            LayoutPlan::Migrate { from }
        }
    })
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
        assert_eq!(
            MAPS,
            [
                "REMOTE_SUBNETS",
                "KNOWN_VTEPS",
                "NODE_CONFIG",
                "REMOTE_SUBNETS6",
                "KNOWN_VTEPS6",
                "NODE_CONFIG6",
                "COUNTERS",
                "PEER_STATS",
                "FAST_CONFIG",
                "FAST_FLOWS",
                "POD_VETHS",
                "POD_ADDRS",
                "FAST_CONFIG6",
                "FAST_FLOWS6",
                "POD_ADDRS6",
                "JUMPS",
                "LAYOUT"
            ]
        );
    }

    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
    const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
    const BPF_F_NO_PREALLOC: u32 = 1;

    fn peer_stats() -> MapShape {
        MapShape {
            map_type: BPF_MAP_TYPE_PERCPU_HASH,
            key_size: 4,
            value_size: 32,
            max_entries: 16384,
            flags: BPF_F_NO_PREALLOC,
        }
    }

    #[test]
    fn a_map_fits_only_with_the_same_type_flags_sizes_and_capacity() {
        let want = peer_stats();
        assert!(want.differences(&want).is_empty());
        let preallocated = MapShape { flags: 0, ..want };
        assert_eq!(preallocated.differences(&want), ["flags 0x0, not 0x1"]);
        let shared = MapShape {
            map_type: BPF_MAP_TYPE_HASH,
            ..want
        };
        assert_eq!(shared.differences(&want), ["type Hash, not PerCpuHash"]);
        let old = MapShape {
            map_type: BPF_MAP_TYPE_LRU_HASH,
            key_size: 8,
            value_size: 16,
            max_entries: 4,
            flags: 0,
        };
        assert_eq!(
            old.differences(&want),
            [
                "type LruHash, not PerCpuHash",
                "key 8 B, not 4 B",
                "value 16 B, not 32 B",
                "4 entries, not 16384",
                "flags 0x0, not 0x1",
            ]
        );
        let unknown = MapShape {
            map_type: 4242,
            ..want
        };
        assert_eq!(unknown.differences(&want), ["type 4242, not PerCpuHash"]);
    }

    #[test]
    fn shapes_come_from_the_object_with_the_loaders_capacities() {
        use overlay_common::{
            consts::{MAX_FAST_FLOWS, MAX_PEERS, MAX_POD_VETHS},
            maps::{KnownVtep, RemoteVtep},
        };
        let object = crate::datapath::ebpf::EBPF_OBJECT;
        let declared = declared_shapes(object, &[]).unwrap();
        let names: Vec<&str> = declared.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, MAPS);
        let shape = |name| declared.iter().find(|(n, _)| *n == name).unwrap().1;
        assert_eq!(
            shape(MAP_REMOTE_SUBNETS),
            MapShape {
                map_type: BPF_MAP_TYPE_LPM_TRIE,
                // LPM key: prefix length (u32) + the address.
                key_size: 4 + 4,
                value_size: size_of::<RemoteVtep>() as u32,
                max_entries: MAX_PEERS,
                flags: BPF_F_NO_PREALLOC,
            }
        );
        assert_eq!(
            shape(MAP_KNOWN_VTEPS),
            MapShape {
                map_type: BPF_MAP_TYPE_HASH,
                key_size: 4,
                value_size: size_of::<KnownVtep>() as u32,
                max_entries: MAX_PEERS,
                flags: 0,
            }
        );
        // Allocated per peer, not reserved for MAX_PEERS on every CPU.
        assert_eq!(shape(MAP_PEER_STATS), peer_stats());
        assert_eq!(shape(MAP_FAST_FLOWS).max_entries, MAX_FAST_FLOWS);
        assert_eq!(shape(MAP_POD_VETHS).max_entries, MAX_POD_VETHS);

        let small = declared_shapes(object, &[(MAP_KNOWN_VTEPS, 3)]).unwrap();
        let small = |name| small.iter().find(|(n, _)| *n == name).unwrap().1;
        assert_eq!(small(MAP_KNOWN_VTEPS).max_entries, 3);
        assert_eq!(small(MAP_REMOTE_SUBNETS).max_entries, MAX_PEERS);
    }

    #[test]
    fn the_layout_version_decides_reuse_migration_or_refusal() {
        let dir = Path::new("/sys/fs/bpf/overlay");
        assert_eq!(
            plan(dir, PinnedLayout::Empty, 3).unwrap(),
            LayoutPlan::Fresh
        );
        assert_eq!(
            plan(dir, PinnedLayout::Version(3), 3).unwrap(),
            LayoutPlan::Reuse
        );
        for from in [PinnedLayout::Unversioned, PinnedLayout::Version(2)] {
            assert_eq!(plan(dir, from, 3).unwrap(), LayoutPlan::Migrate { from });
        }
        let newer = plan(dir, PinnedLayout::Version(4), 3).unwrap_err();
        assert!(
            matches!(
                newer,
                LayoutError::Newer {
                    found: 4,
                    ours: 3,
                    ..
                }
            ),
            "{newer:?}"
        );
        let text = newer.to_string();
        for needed in [
            "/sys/fs/bpf/overlay",
            "layout version 4",
            "this build's 3",
            "--bpf-pin-dir=/sys/fs/bpf/overlay cleanup",
        ] {
            assert!(text.contains(needed), "{needed:?} missing from: {text}");
        }
    }

    #[test]
    fn the_layout_record_has_the_shape_the_object_declares() {
        let declared = declared_shapes(crate::datapath::ebpf::EBPF_OBJECT, &[]).unwrap();
        let layout = declared.iter().find(|(n, _)| *n == MAP_LAYOUT).unwrap().1;
        assert_eq!(layout, LAYOUT_SHAPE);
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
