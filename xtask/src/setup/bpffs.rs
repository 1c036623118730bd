//! bpffs at /sys/fs/bpf, where pinned maps and links live.

use std::process::Command;

use anyhow::Result;

use crate::run;

pub const MOUNT_POINT: &str = "/sys/fs/bpf";

pub fn is_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| mounted_in(&m))
}

/// Whether a mounts table (fstab format) has a bpf filesystem on the mount point.
pub fn mounted_in(mounts: &str) -> bool {
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_src, dir, fstype) = (f.next(), f.next(), f.next());
        dir == Some(MOUNT_POINT) && fstype == Some("bpf")
    })
}

pub fn mount() -> Result<()> {
    std::fs::create_dir_all(MOUNT_POINT)?;
    run::status(Command::new("mount").args(["-t", "bpf", "bpf", MOUNT_POINT]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_bpffs_only_on_its_mount_point() {
        let sysfs_only = "sysfs /sys sysfs rw,relatime 0 0\nproc /proc proc rw 0 0\n";
        assert!(!mounted_in(sysfs_only));
        let with_bpf = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,relatime 0 0\n";
        assert!(mounted_in(with_bpf));
        assert!(!mounted_in("bpf /tmp/elsewhere bpf rw 0 0\n"));
    }
}
