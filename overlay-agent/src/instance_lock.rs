//! One agent per pin directory and per subnet file. Two agents on the same
//! pins would overwrite each other's maps and links (and one on the kernel
//! datapath removes them); two on the same subnet file both "own" the lease
//! it names. So the daemon takes an exclusive `flock` on each at start and
//! holds it for its lifetime:
//!
//! - the pin directory itself (bpffs takes no regular files, so there is no
//!   lock file inside it; a directory's inode can be flocked like any other);
//! - `<subnet-file>.lock`, next to the subnet file (it also holds our pid,
//!   for a reader without access to `/proc/locks`).
//!
//! `flock` belongs to the open file, so the kernel releases it when the
//! process dies however it dies: `kill -9` then a new start, `systemctl
//! restart` and a DaemonSet's rolling update (the old pod goes first) work
//! as before. The holder's pid comes from `/proc/locks` (as the reader's PID
//! namespace sees it; unknown when the holder is in another one).

use std::{
    fs,
    io::{self, Write},
    os::{
        fd::AsRawFd,
        unix::fs::{MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
};

/// Who holds a lock, as far as this process can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder(pub Option<u32>);

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(pid) => write!(f, "pid {pid}"),
            None => f.write_str("pid unknown, in another PID namespace"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another overlay-agent ({holder}) already runs with {what} {}: one agent per {what} \
         (stop it first)",
        path.display()
    )]
    Held {
        what: &'static str,
        path: PathBuf,
        holder: Holder,
    },
    #[error("opening {} to lock it", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("locking {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The locks a running agent holds; released when dropped (or when the
/// process ends).
#[derive(Debug, Default)]
pub struct InstanceLock {
    held: Vec<(PathBuf, fs::File)>,
}

impl InstanceLock {
    /// The paths locked.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.held.iter().map(|(p, _)| p.as_path())
    }

    /// Locks the pin directory `dir` (which must exist).
    pub fn lock_pin_dir(&mut self, dir: &Path) -> Result<(), LockError> {
        let f = open_dir(dir)?;
        try_lock(&f, dir, "pin directory")?;
        self.held.push((dir.to_path_buf(), f));
        Ok(())
    }

    /// Locks `<subnet_file>.lock` (created if missing, never through a
    /// symlink) and writes our pid into it.
    pub fn lock_subnet_file(&mut self, subnet_file: &Path) -> Result<(), LockError> {
        let path = subnet_lock_path(subnet_file);
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| LockError::Open {
                path: path.clone(),
                source,
            })?;
        try_lock(&f, subnet_file, "subnet file")?;
        // Only after the lock: the previous holder's pid stays until then.
        let _ = f
            .set_len(0)
            .and_then(|()| writeln!(f, "{}", std::process::id()));
        self.held.push((path, f));
        Ok(())
    }
}

/// `<subnet-file>.lock`.
pub fn subnet_lock_path(subnet_file: &Path) -> PathBuf {
    let mut s = subnet_file.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

fn open_dir(dir: &Path) -> Result<fs::File, LockError> {
    // Read-only: flock refuses O_PATH descriptors.
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|source| LockError::Open {
            path: dir.to_path_buf(),
            source,
        })
}

fn try_lock(f: &fs::File, path: &Path, what: &'static str) -> Result<(), LockError> {
    // SAFETY: flock(2) on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(LockError::Held {
            what,
            path: path.to_path_buf(),
            holder: holder_of(f),
        });
    }
    Err(LockError::Lock {
        path: path.to_path_buf(),
        source: e,
    })
}

/// Whether an agent holds the pin directory `dir` now, for `cleanup`: it
/// takes the lock and lets go at once, so it never keeps an agent from
/// starting. `None` when free or when `dir` cannot be opened (no agent
/// can hold what does not exist).
pub fn pin_dir_holder(dir: &Path) -> Option<Holder> {
    let f = open_dir(dir).ok()?;
    match try_lock(&f, dir, "pin directory") {
        Err(LockError::Held { holder, .. }) => Some(holder),
        // Ours now: released with `f`, when this returns.
        _ => None,
    }
}

/// The pid holding a flock on `f`'s inode, from `/proc/locks`.
fn holder_of(f: &fs::File) -> Holder {
    let Ok(meta) = f.metadata() else {
        return Holder(None);
    };
    let locks = fs::read_to_string("/proc/locks").unwrap_or_default();
    Holder(flock_holder(&locks, meta.dev(), meta.ino()))
}

/// The holder of a granted FLOCK on device `dev`, inode `ino` in the text
/// of `/proc/locks`: `1: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF`
/// (device as hex major:minor). Waiters (`1: -> FLOCK ...`) are not
/// holders; a pid of 0 or less is one the kernel could not translate into
/// our PID namespace.
fn flock_holder(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let want = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    locks.lines().find_map(|line| {
        let mut fields = line.split_whitespace().skip(1);
        if fields.next()? != "FLOCK" {
            return None;
        }
        let mut fields = fields.skip(2);
        let pid: i64 = fields.next()?.parse().ok()?;
        (fields.next()? == want && pid > 0)
            .then(|| u32::try_from(pid).ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "overlay-lock-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_and_gets_it_once_released() {
        let d = scratch("second");
        let env = d.join("subnet.env");
        let mut first = InstanceLock::default();
        first.lock_pin_dir(&d).unwrap();
        first.lock_subnet_file(&env).unwrap();
        assert_eq!(
            fs::read_to_string(subnet_lock_path(&env)).unwrap(),
            format!("{}\n", std::process::id())
        );
        // flock conflicts between two opens even in one process.
        let me = Holder(Some(std::process::id()));
        let e = InstanceLock::default().lock_pin_dir(&d).unwrap_err();
        assert!(
            matches!(&e, LockError::Held { holder, what: "pin directory", .. } if *holder == me),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.contains(&format!(
                "another overlay-agent (pid {})",
                std::process::id()
            )),
            "{text}"
        );
        let e = InstanceLock::default().lock_subnet_file(&env).unwrap_err();
        assert!(
            matches!(&e, LockError::Held { holder, what: "subnet file", .. } if *holder == me),
            "{e:?}"
        );
        assert_eq!(pin_dir_holder(&d), Some(me));
        drop(first);
        assert_eq!(pin_dir_holder(&d), None);
        let mut again = InstanceLock::default();
        again.lock_pin_dir(&d).unwrap();
        again.lock_subnet_file(&env).unwrap();
        assert_eq!(again.paths().count(), 2);
        drop(again);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_lock_file_is_not_opened_through_a_symlink() {
        let d = scratch("symlink");
        let outside = d.join("outside");
        fs::write(&outside, "precious\n").unwrap();
        let env = d.join("subnet.env");
        std::os::unix::fs::symlink(&outside, subnet_lock_path(&env)).unwrap();
        let e = InstanceLock::default().lock_subnet_file(&env).unwrap_err();
        assert!(matches!(e, LockError::Open { .. }), "{e:?}");
        assert_eq!(fs::read_to_string(&outside).unwrap(), "precious\n");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn proc_locks_lines_name_the_holder_of_that_inode_only() {
        let dev = libc::makedev(0, 0x1f);
        let text = "1: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 999 00:1f:5678 0 EOF\n\
                    2: POSIX  ADVISORY  WRITE 77 00:1f:9 0 EOF\n\
                    3: FLOCK  ADVISORY  WRITE 0 00:1f:42 0 EOF\n";
        assert_eq!(flock_holder(text, dev, 5678), Some(1234));
        assert_eq!(flock_holder(text, dev, 9), None);
        assert_eq!(flock_holder(text, dev, 42), None);
        assert_eq!(flock_holder(text, libc::makedev(8, 1), 5678), None);
    }
}
