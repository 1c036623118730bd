//! `/run/flannel/subnet.env`: what docker (`--bip=${FLANNEL_SUBNET}
//! --mtu=${FLANNEL_MTU}`) and flannel's CNI plugin read, written exactly as
//! flanneld writes it, and read back on start to remember our subnet.

use std::{
    collections::HashMap,
    fs,
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use ipnet::{Ipv4Net, Ipv6Net};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetEnv {
    /// FLANNEL_NETWORK.
    pub network: Ipv4Net,
    /// Our lease; written as its first host address (10.0.13.0/24 -> 10.0.13.1/24).
    pub subnet: Ipv4Net,
    /// FLANNEL_MTU: the `flannel.<VNI>` device's MTU.
    pub mtu: u32,
    /// FLANNEL_IPMASQ.
    pub ip_masq: bool,
    /// FLANNEL_IPV6_NETWORK and our IPv6 lease, for dual stack.
    pub ipv6: Option<(Ipv6Net, Ipv6Net)>,
}

impl SubnetEnv {
    /// The file's contents, byte for byte as flanneld writes them: the
    /// IPv6 lines (`WriteSubnetFile`'s order) only for dual stack.
    pub fn render(&self) -> String {
        let first = Ipv4Net::new(
            u32::from(self.subnet.network()).wrapping_add(1).into(),
            self.subnet.prefix_len(),
        )
        .expect("same prefix length");
        let mut out = format!("FLANNEL_NETWORK={}\nFLANNEL_SUBNET={first}\n", self.network);
        if let Some((network, subnet)) = self.ipv6 {
            let first = Ipv6Net::new(
                u128::from(subnet.network()).wrapping_add(1).into(),
                subnet.prefix_len(),
            )
            .expect("same prefix length");
            out += &format!("FLANNEL_IPV6_NETWORK={network}\nFLANNEL_IPV6_SUBNET={first}\n");
        }
        out + &format!(
            "FLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.mtu, self.ip_masq
        )
    }

    /// Write atomically: a reader sees the old file or the new one, never a
    /// torn one (temp file in the same directory, fsync, rename, fsync dir).
    pub fn write(&self, path: &Path) -> io::Result<()> {
        write_atomic(path, self.render().as_bytes(), 0o644)
    }
}

/// Whether [`write_atomic`] can write `path`: its directory exists (or is
/// created, as flanneld does) and takes a new file. Checked before a lease
/// is taken, so a path the agent cannot write costs no lease.
pub fn check_writable(path: &Path) -> io::Result<()> {
    let dir = dir_of(path);
    fs::create_dir_all(&dir)?;
    let (probe, _) = create_fresh(&dir, ".subnet-env.probe", 0o600)?;
    fs::remove_file(&probe)
}

fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A new file `<prefix>.<random>` in `dir`, created by this call. The
/// directory may be writable by others (`/run/flannel` on a host, a shared
/// hostPath): with `O_CREAT|O_EXCL|O_NOFOLLOW` a file or symlink planted
/// under the name makes the open fail rather than write through it, and the
/// random name makes planting one a guess (a taken name is retried).
fn create_fresh(dir: &Path, prefix: &str, mode: u32) -> io::Result<(PathBuf, fs::File)> {
    let mut last = None;
    for _ in 0..16 {
        let tmp = dir.join(format!("{prefix}.{:016x}", rand::random::<u64>()));
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists)))
}

/// Writes `data` to `path` atomically and without following symlinks: a
/// fresh temp file in the same directory ([`create_fresh`]), fsync, rename
/// over `path` (which replaces a symlink there rather than writing through
/// it), fsync the directory.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = dir_of(path);
    fs::create_dir_all(&dir)?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let (tmp, mut f) = create_fresh(&dir, &format!(".{}.tmp", name.to_string_lossy()), mode)?;
    let result = (|| {
        // The umask must not narrow what consumers may read; fchmod on our
        // own new file.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The variables of an env file, read as flanneld's `godotenv` does for the
/// cases that occur in practice: `KEY=value`, optional `export `, optional
/// quotes, `#` comments, blank lines.
pub fn parse_env(text: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim();
        let v = if v.len() >= 2
            && ((v.starts_with('"') && v.ends_with('"'))
                || (v.starts_with('\'') && v.ends_with('\'')))
        {
            &v[1..v.len() - 1]
        } else {
            // An unquoted value ends at an inline comment.
            v.split(" #").next().unwrap_or(v).trim()
        };
        out.insert(k.trim().to_owned(), v.to_owned());
    }
    out
}

/// The subnet remembered in a previous subnet.env (FLANNEL_SUBNET with host
/// bits cleared), or `None` if the file is missing or holds no single valid
/// IPv4 CIDR there, as in flanneld (which logs and carries on).
pub fn read_previous_subnet(path: &Path) -> Option<Ipv4Net> {
    read_previous(path, "FLANNEL_SUBNET", "an IPv4 CIDR", |v| {
        v.parse::<Ipv4Net>().ok().map(|n| n.trunc())
    })
}

/// The IPv6 subnet remembered in a previous subnet.env
/// (FLANNEL_IPV6_SUBNET), read as [`read_previous_subnet`] reads the IPv4 one.
pub fn read_previous_ipv6_subnet(path: &Path) -> Option<Ipv6Net> {
    read_previous(path, "FLANNEL_IPV6_SUBNET", "an IPv6 CIDR", |v| {
        v.parse::<Ipv6Net>().ok().map(|n| n.trunc())
    })
}

fn read_previous<N>(
    path: &Path,
    var: &str,
    what: &str,
    parse: impl Fn(&str) -> Option<N>,
) -> Option<N> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            log::warn!("cannot read previous subnet from {}: {e}", path.display());
            return None;
        }
    };
    let vars = parse_env(&text);
    let value = vars.get(var)?;
    if value.contains(',') {
        log::warn!(
            "{}: {var}={value} has more than one entry; ignoring it",
            path.display()
        );
        return None;
    }
    let parsed = parse(value);
    if parsed.is_none() {
        log::warn!(
            "{}: {var}={value} is not {what}; ignoring it",
            path.display()
        );
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "overlay-agent-subnet-env-{tag}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn renders_like_seed_004() {
        let env = SubnetEnv {
            network: "10.0.0.0/16".parse().unwrap(),
            subnet: "10.0.13.0/24".parse().unwrap(),
            mtu: 1450,
            ip_masq: true,
            ipv6: None,
        };
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=10.0.0.0/16\nFLANNEL_SUBNET=10.0.13.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        let env = SubnetEnv {
            network: "10.0.0.0/8".parse().unwrap(),
            subnet: "10.15.64.0/20".parse().unwrap(),
            mtu: 1450,
            ip_masq: false,
            ipv6: None,
        };
        assert!(env.render().contains("FLANNEL_SUBNET=10.15.64.1/20\n"));
        assert!(env.render().ends_with("FLANNEL_IPMASQ=false\n"));
    }

    #[test]
    fn renders_dual_stack_like_flannel_s_documentation() {
        // Documentation/configuration.md's dual-stack subnet.env.
        let env = SubnetEnv {
            network: "10.42.0.0/16".parse().unwrap(),
            subnet: "10.42.0.0/24".parse().unwrap(),
            mtu: 1450,
            ip_masq: true,
            ipv6: Some((
                "2001:cafe:42::/56".parse().unwrap(),
                "2001:cafe:42::/64".parse().unwrap(),
            )),
        };
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET=10.42.0.1/24\n\
             FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\nFLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\n\
             FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
    }

    #[test]
    fn write_is_atomic_and_reads_back() {
        let dir = tmpdir("rw");
        let path = dir.join("run/flannel/subnet.env");
        assert_eq!(read_previous_subnet(&path), None);
        let env = SubnetEnv {
            network: "10.0.0.0/16".parse().unwrap(),
            subnet: "10.0.14.0/24".parse().unwrap(),
            mtu: 1450,
            ip_masq: true,
            ipv6: None,
        };
        env.write(&path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), env.render());
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert_eq!(
            read_previous_subnet(&path),
            Some("10.0.14.0/24".parse().unwrap())
        );
        // Overwrite leaves no temp file behind.
        SubnetEnv {
            subnet: "10.0.15.0/24".parse().unwrap(),
            ..env
        }
        .write(&path)
        .unwrap();
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("subnet.env")]);
        assert_eq!(
            read_previous_subnet(&path),
            Some("10.0.15.0/24".parse().unwrap())
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn planted_symlinks_are_never_written_through() {
        let dir = tmpdir("symlink");
        let run = dir.join("run");
        fs::create_dir_all(&run).unwrap();
        let outside = dir.join("outside");
        fs::write(&outside, "precious\n").unwrap();
        let path = run.join("subnet.env");
        // The names the previous version used (pid-based), planted ahead.
        let pid = std::process::id();
        for planted in [
            format!(".subnet.env.tmp.{pid}"),
            format!(".subnet-env.probe.{pid}"),
        ] {
            std::os::unix::fs::symlink(&outside, run.join(planted)).unwrap();
        }
        check_writable(&path).unwrap();
        let env = SubnetEnv {
            network: "10.0.0.0/16".parse().unwrap(),
            subnet: "10.0.14.0/24".parse().unwrap(),
            mtu: 1450,
            ip_masq: true,
            ipv6: None,
        };
        env.write(&path).unwrap();
        assert_eq!(fs::read_to_string(&outside).unwrap(), "precious\n");
        assert_eq!(fs::read_to_string(&path).unwrap(), env.render());
        // A symlink at the target itself is replaced, not followed.
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&outside, &path).unwrap();
        env.write(&path).unwrap();
        assert!(!fs::symlink_metadata(&path).unwrap().is_symlink());
        assert_eq!(fs::read_to_string(&outside).unwrap(), "precious\n");
        // A name taken by a symlink is refused by the exclusive open.
        let taken = run.join("taken");
        std::os::unix::fs::symlink(&outside, &taken).unwrap();
        let e = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&taken)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_the_previous_ipv6_subnet() {
        let dir = tmpdir("read6");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("subnet.env");
        for (text, want) in [
            (
                "FLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\n",
                Some("2001:cafe:42::/64"),
            ),
            ("FLANNEL_SUBNET=10.0.13.1/24\n", None),
            ("FLANNEL_IPV6_SUBNET=10.0.13.1/24\n", None),
            ("FLANNEL_IPV6_SUBNET=fc00::1/64,fc00:1::1/64\n", None),
        ] {
            fs::write(&path, text).unwrap();
            assert_eq!(
                read_previous_ipv6_subnet(&path),
                want.map(|w| w.parse().unwrap()),
                "{text}"
            );
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_what_flanneld_and_people_write() {
        let dir = tmpdir("read");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("subnet.env");
        for (text, want) in [
            ("FLANNEL_SUBNET=10.0.13.1/24\n", Some("10.0.13.0/24")),
            (
                "# c\nexport FLANNEL_SUBNET=\"10.15.64.1/20\"\n",
                Some("10.15.64.0/20"),
            ),
            ("FLANNEL_SUBNET=10.0.13.1/24,10.0.14.1/24\n", None),
            ("FLANNEL_SUBNET=garbage\n", None),
            ("FLANNEL_NETWORK=10.0.0.0/16\n", None),
        ] {
            fs::write(&path, text).unwrap();
            assert_eq!(
                read_previous_subnet(&path),
                want.map(|w| w.parse().unwrap()),
                "{text}"
            );
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
