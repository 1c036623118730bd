//! A real etcd (`/usr/bin/etcd`) for tests: one member or a small cluster on
//! loopback, with a temporary data directory and free ports, optionally with
//! TLS (certificates made with `openssl` at start) and username/password
//! auth (simple or JWT tokens). Members can be stopped, killed and started
//! again on the same ports and data directories. Every member is killed and
//! the directory removed on drop.
//!
//! Needs no root: plain tests can use it on loopback.

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use overlay_agent::subnet::etcd::EtcdOptions;

pub const ETCD: &str = "/usr/bin/etcd";
pub const ETCDCTL: &str = "/usr/bin/etcdctl";
/// The root user's password when auth is enabled.
pub const ROOT_PASSWORD: &str = "root-pw";

#[derive(Clone, Debug, Default)]
pub struct EtcdSpec {
    /// Number of members (1 when 0).
    pub members: usize,
    /// Serve clients over TLS and require client certificates.
    pub tls: bool,
    /// Enable auth and add this user (with read/write on everything).
    pub user: Option<(String, String)>,
    /// Sign auth tokens as JWTs (RS256, key made with `openssl` at start)
    /// instead of etcd's default simple tokens. A JWT carries the auth
    /// store's revision it was issued at, so any later change of users or
    /// roles makes etcd refuse it.
    pub jwt: bool,
    /// Run inside this network namespace (via `ip netns exec`), listening on
    /// `listen_ip` instead of 127.0.0.1.
    pub netns: Option<String>,
    pub listen_ip: Option<String>,
    /// More `etcd` flags (e.g. `--auth-token-ttl=1`).
    pub extra_args: Vec<String>,
}

/// Certificates made for one test cluster.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that did not sign the server's certificate.
    pub other_ca: PathBuf,
}

struct Member {
    name: String,
    client_url: String,
    peer_url: String,
    child: Option<Child>,
    log: PathBuf,
    /// How many times this member was started (its log is appended to).
    starts: usize,
}

pub struct Etcd {
    dir: PathBuf,
    spec: EtcdSpec,
    members: Vec<Member>,
    tls: Option<TlsFiles>,
    initial_cluster: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Ports handed out so far by this process, counted from a start that
/// depends on the pid (so two test binaries rarely probe the same ports).
static NEXT_PORT: AtomicU32 = AtomicU32::new(0);

/// The lowest port we hand out, and how many there are above it. They stay
/// below the kernel's ephemeral range (32768 and up by default): a port
/// taken from that range can be grabbed as the source port of any outgoing
/// connection while a member is down, and the member then cannot listen on
/// it again when it restarts ("bind: address already in use").
const PORT_BASE: u32 = 20000;
const PORT_SPAN: u32 = 12000;

/// A port nobody listens on right now, outside the ephemeral range.
pub fn free_port(ip: &str) -> Result<u16> {
    let start = std::process::id() * 97 % PORT_SPAN;
    for _ in 0..PORT_SPAN {
        let n = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        let port = (PORT_BASE + (start + n) % PORT_SPAN) as u16;
        if TcpListener::bind((ip, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!(
        "no free port on {ip} between {PORT_BASE} and {}",
        PORT_BASE + PORT_SPAN
    )
}

impl Etcd {
    /// One plain member on loopback.
    pub fn start() -> Result<Etcd> {
        Etcd::start_with(EtcdSpec::default())
    }

    pub fn start_with(mut spec: EtcdSpec) -> Result<Etcd> {
        let n = spec.members.max(1);
        let dir = std::env::temp_dir().join(format!(
            "overlay-tests-etcd-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ip = spec.listen_ip.clone().unwrap_or_else(|| "127.0.0.1".into());
        let tls = if spec.tls {
            Some(make_tls(&dir, &ip)?)
        } else {
            None
        };
        if spec.jwt {
            let (public, private) = make_jwt_keys(&dir)?;
            spec.extra_args.push(format!(
                "--auth-token=jwt,pub-key={},priv-key={},sign-method=RS256",
                public.display(),
                private.display()
            ));
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        // Ports are probed in our namespace; inside another one they are free anyway.
        let mut members = Vec::new();
        for i in 0..n {
            let probe_ip = if spec.netns.is_some() {
                "127.0.0.1"
            } else {
                &ip
            };
            members.push(Member {
                name: format!("m{i}"),
                client_url: format!("{scheme}://{ip}:{}", free_port(probe_ip)?),
                peer_url: format!("http://{ip}:{}", free_port(probe_ip)?),
                child: None,
                log: dir.join(format!("m{i}.log")),
                starts: 0,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Etcd {
            dir,
            spec,
            members,
            tls,
            initial_cluster,
        };
        for i in 0..n {
            etcd.spawn(i, true)?;
        }
        for i in 0..n {
            etcd.wait_ready(i, Duration::from_secs(30))?;
        }
        if let Some((user, password)) = etcd.spec.user.clone() {
            etcd.enable_auth(&user, &password)?;
        }
        Ok(etcd)
    }

    fn spawn(&mut self, i: usize, new: bool) -> Result<()> {
        let data = self.dir.join(format!("{}.etcd", self.members[i].name));
        let m = &self.members[i];
        let mut args: Vec<String> = vec![
            ETCD.into(),
            "--name".into(),
            m.name.clone(),
            "--data-dir".into(),
            data.display().to_string(),
            "--listen-client-urls".into(),
            m.client_url.clone(),
            "--advertise-client-urls".into(),
            m.client_url.clone(),
            "--listen-peer-urls".into(),
            m.peer_url.clone(),
            "--initial-advertise-peer-urls".into(),
            m.peer_url.clone(),
            "--initial-cluster".into(),
            self.initial_cluster.clone(),
            "--initial-cluster-token".into(),
            format!("overlay-tests-{}", self.dir.display()),
            "--initial-cluster-state".into(),
            if new { "new" } else { "existing" }.into(),
            // Faster elections for the member-failure tests.
            "--heartbeat-interval".into(),
            "50".into(),
            "--election-timeout".into(),
            "500".into(),
        ];
        args.extend(self.spec.extra_args.iter().cloned());
        if let Some(t) = &self.tls {
            for (flag, path) in [
                ("--cert-file", &t.server_cert),
                ("--key-file", &t.server_key),
                ("--trusted-ca-file", &t.ca),
            ] {
                args.push(flag.into());
                args.push(path.display().to_string());
            }
            args.push("--client-cert-auth".into());
        }
        let mut cmd = match &self.spec.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]);
                c.args(&args);
                c
            }
            None => {
                let mut c = Command::new(&args[0]);
                c.args(&args[1..]);
                c
            }
        };
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .with_context(|| format!("opening {}", m.log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {ETCD}"))?;
        self.members[i].child = Some(child);
        self.members[i].starts += 1;
        Ok(())
    }

    fn wait_ready(&mut self, i: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = fs::read_to_string(&self.members[i].log).unwrap_or_default();
            // Count the marker so a restarted member is only ready after its new start.
            if log.matches("ready to serve client requests").count() >= self.members[i].starts {
                return Ok(());
            }
            if let Some(status) = self.members[i]
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "etcd member {} exited ({status}) before it was ready:\n{}",
                    self.members[i].name,
                    tail(&log, 30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd member {} not ready after {timeout:?}:\n{}",
                    self.members[i].name,
                    tail(&log, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn enable_auth(&self, user: &str, password: &str) -> Result<()> {
        let root = format!("root:{ROOT_PASSWORD}");
        self.etcdctl_as(None, &["user", "add", &root])?;
        self.etcdctl_as(None, &["user", "grant-role", "root", "root"])
            .ok();
        self.etcdctl_as(None, &["user", "add", &format!("{user}:{password}")])?;
        self.etcdctl_as(None, &["role", "add", "overlay"])?;
        self.etcdctl_as(
            None,
            &[
                "role",
                "grant-permission",
                "overlay",
                "--prefix=true",
                "readwrite",
                "/",
            ],
        )?;
        self.etcdctl_as(None, &["user", "grant-role", user, "overlay"])?;
        self.etcdctl_as(None, &["auth", "enable"])?;
        Ok(())
    }

    /// The client URLs of all members, comma-separated (for `--etcd-endpoints`).
    pub fn endpoints(&self) -> String {
        self.client_urls().join(",")
    }

    pub fn client_urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Options for the agent's etcd client with the right TLS files and user.
    pub fn options(&self, prefix: &str) -> EtcdOptions {
        let mut o = EtcdOptions::new(self.client_urls(), prefix);
        if let Some(t) = &self.tls {
            o.ca_file = Some(t.ca.clone());
            o.cert_file = Some(t.client_cert.clone());
            o.key_file = Some(t.client_key.clone());
        }
        if let Some((u, p)) = &self.spec.user {
            o.username = Some(u.clone());
            o.password = Some(p.clone());
        }
        o
    }

    /// The `--etcd-*` flags for the agent's command line.
    pub fn agent_flags(&self) -> Vec<String> {
        let mut v = vec![format!("--etcd-endpoints={}", self.endpoints())];
        if let Some(t) = &self.tls {
            v.push(format!("--etcd-cafile={}", t.ca.display()));
            v.push(format!("--etcd-certfile={}", t.client_cert.display()));
            v.push(format!("--etcd-keyfile={}", t.client_key.display()));
        }
        if let Some((u, p)) = &self.spec.user {
            v.push(format!("--etcd-username={u}"));
            v.push(format!("--etcd-password={p}"));
        }
        v
    }

    /// Run etcdctl (v3 API) against the cluster as root (when auth is on).
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let root = format!("root:{ROOT_PASSWORD}");
        let user = self.spec.user.as_ref().map(|_| root.as_str());
        self.etcdctl_as(user, args)
    }

    fn etcdctl_as(&self, user: Option<&str>, args: &[&str]) -> Result<String> {
        let live: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.client_url.clone())
            .collect();
        let mut full: Vec<String> = vec![format!("--endpoints={}", live.join(","))];
        if let Some(t) = &self.tls {
            full.push(format!("--cacert={}", t.ca.display()));
            full.push(format!("--cert={}", t.client_cert.display()));
            full.push(format!("--key={}", t.client_key.display()));
        }
        if let Some(u) = user {
            full.push(format!("--user={u}"));
        }
        full.push("--command-timeout=10s".into());
        full.extend(args.iter().map(|s| s.to_string()));
        let mut cmd = match &self.spec.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, ETCDCTL]);
                c
            }
            None => Command::new(ETCDCTL),
        };
        let out = cmd
            .env("ETCDCTL_API", "3")
            .args(&full)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("spawning {ETCDCTL}"))?;
        if !out.status.success() {
            bail!(
                "etcdctl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        self.etcdctl(&["put", key, value]).map(|_| ())
    }

    /// The value of `key`, `None` if absent.
    pub fn get(&self, key: &str) -> Result<Option<String>> {
        let out = self.etcdctl(&["get", "--print-value-only", key])?;
        Ok(if out.is_empty() {
            None
        } else {
            Some(out.strip_suffix('\n').unwrap_or(&out).to_owned())
        })
    }

    pub fn delete(&self, key: &str) -> Result<()> {
        self.etcdctl(&["del", key]).map(|_| ())
    }

    /// Kill member `i` (SIGKILL) and wait for it.
    pub fn kill_member(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.members[i].child.take() {
            c.kill().ok();
            c.wait().context("reaping etcd")?;
        }
        Ok(())
    }

    /// Stop every member with SIGTERM, as a service manager does (etcd
    /// closes its connections), waiting up to 10 s before SIGKILL.
    pub fn terminate(&mut self) -> Result<()> {
        for m in &mut self.members {
            let Some(mut c) = m.child.take() else {
                continue;
            };
            // SAFETY: kill(2) on our child, not yet reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().context("waiting for etcd")?.is_none() {
                if Instant::now() > deadline {
                    c.kill().ok();
                    c.wait().context("reaping etcd")?;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Stop every member (SIGKILL): clients see the cluster unreachable.
    pub fn stop(&mut self) -> Result<()> {
        for i in 0..self.members.len() {
            self.kill_member(i)?;
        }
        Ok(())
    }

    /// Restart member `i` from its data directory, on the same ports.
    pub fn restart_member(&mut self, i: usize) -> Result<()> {
        self.kill_member(i)?;
        self.spawn(i, false)?;
        self.wait_ready(i, Duration::from_secs(30))
    }

    /// Restart every stopped member.
    pub fn start_again(&mut self) -> Result<()> {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.spawn(i, false)?;
            }
        }
        for i in 0..self.members.len() {
            self.wait_ready(i, Duration::from_secs(30))?;
        }
        Ok(())
    }

    /// The last lines of member `i`'s log (for failure messages).
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        tail(
            &fs::read_to_string(&self.members[i].log).unwrap_or_default(),
            lines,
        )
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("spawning openssl")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// An RSA key pair for etcd to sign JWT auth tokens with: (public, private).
pub fn make_jwt_keys(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let d = dir.join("jwt");
    fs::create_dir_all(&d)?;
    openssl(&d, &["genrsa", "-out", "jwt.key", "2048"])?;
    openssl(&d, &["rsa", "-in", "jwt.key", "-pubout", "-out", "jwt.pub"])?;
    Ok((d.join("jwt.pub"), d.join("jwt.key")))
}

/// A CA, a server certificate for `ip` (and localhost), a client certificate,
/// and an unrelated second CA, all EC P-256, valid for a day.
pub fn make_tls(dir: &Path, ip: &str) -> Result<TlsFiles> {
    let d = dir.join("tls");
    fs::create_dir_all(&d)?;
    let ca = |name: &str| -> Result<()> {
        openssl(
            &d,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "1",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        )
    };
    ca("ca")?;
    ca("other-ca")?;
    let leaf = |name: &str, cn: &str, ext: &str| -> Result<()> {
        openssl(
            &d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        )?;
        fs::write(d.join(format!("{name}.ext")), ext)?;
        openssl(
            &d,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-out",
                &format!("{name}.pem"),
                "-extfile",
                &format!("{name}.ext"),
            ],
        )
    };
    leaf(
        "server",
        "etcd",
        &format!(
            "subjectAltName=IP:{ip},IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\n"
        ),
    )?;
    // etcd takes the user name from the client certificate's CN when auth is
    // on and no password is given; the tests pass a password.
    leaf(
        "client",
        "overlay-agent",
        "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n",
    )?;
    Ok(TlsFiles {
        ca: d.join("ca.pem"),
        server_cert: d.join("server.pem"),
        server_key: d.join("server.key"),
        client_cert: d.join("client.pem"),
        client_key: d.join("client.key"),
        other_ca: d.join("other-ca.pem"),
    })
}
