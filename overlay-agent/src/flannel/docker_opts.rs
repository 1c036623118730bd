//! `overlay-agent mk-docker-opts`: flannel's `dist/mk-docker-opts.sh` (as
//! shipped with flannel 0.21.4, the release seed 004 installs), which turns
//! subnet.env into the options docker's unit reads from
//! `/run/docker_opts.env` (`EnvironmentFile=-/run/docker_opts.env`,
//! `ExecStart=/usr/bin/dockerd ... $DOCKER_OPTS`).
//!
//! The output is the script's, byte for byte: `DOCKER_OPT_*` variables sorted
//! by name as the shell's `set` lists them, each as `NAME="value"`, then the
//! combined key whose value starts with a space per option
//! (`DOCKER_OPTS=" --bip=10.0.13.1/24 --ip-masq=false --mtu=1450"`). As in the
//! script, the variables are those of the environment overridden by what
//! sourcing the flannel env file sets, so `DOCKER_OPT_*` and the combined key
//! already set there are carried over.
//!
//! Where this differs from the script, it fails instead of writing nonsense
//! or nothing: a `-k` that is not a shell variable name, an unreadable
//! flannel env file, or a docker env file that cannot be written (the script
//! then still exits 0) are errors. A missing flannel env file is not (the
//! script then uses the environment alone), but it is logged.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs, io,
    path::{Path, PathBuf},
    process::Command,
};

use ipnet::Ipv4Net;

use crate::flannel::subnet_env;

/// Where docker's unit reads its options from (`-d`).
pub const DEFAULT_DOCKER_ENV: &str = "/run/docker_opts.env";
/// The variable holding all options in one (`-k`).
pub const DEFAULT_COMBINED_KEY: &str = "DOCKER_OPTS";
/// Every variable with this prefix is one docker option.
const OPTION_PREFIX: &str = "DOCKER_OPT_";

/// The script's options, with its single-letter names; as with getopts, a
/// repeated option's last value wins.
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
#[command(args_override_self = true)]
pub struct MkDockerOptsArgs {
    /// Path to flannel env file. Defaults to the agent's --subnet-file
    /// (/run/flannel/subnet.env unless set, e.g. with FLANNELD_SUBNET_FILE).
    #[arg(short = 'f', value_name = "FLANNEL-ENV-FILE")]
    pub flannel_env: Option<PathBuf>,

    /// Path to Docker env file to write to.
    #[arg(short = 'd', value_name = "DOCKER-ENV-FILE", default_value = DEFAULT_DOCKER_ENV)]
    pub docker_env: PathBuf,

    /// Output each Docker option as individual var, e.g. DOCKER_OPT_MTU="--mtu=1450"
    /// (with -c too, or when neither is given).
    #[arg(short = 'i')]
    pub individual: bool,

    /// Output combined Docker options into the COMBINED-KEY var (with -i too,
    /// or when neither is given).
    #[arg(short = 'c')]
    pub combined: bool,

    /// Set the combined options key to this value.
    #[arg(short = 'k', value_name = "COMBINED-KEY", default_value = DEFAULT_COMBINED_KEY)]
    pub combined_key: String,

    /// Do not output --ip-masq (useful for older Docker version).
    #[arg(short = 'm')]
    pub no_ip_masq: bool,
}

/// What to write, independent of where from and to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub individual: bool,
    pub combined: bool,
    pub ip_masq: bool,
    pub combined_key: String,
}

impl Default for Options {
    /// The script run without options.
    fn default() -> Options {
        Options {
            individual: false,
            combined: false,
            ip_masq: true,
            combined_key: DEFAULT_COMBINED_KEY.to_owned(),
        }
    }
}

impl From<&MkDockerOptsArgs> for Options {
    fn from(a: &MkDockerOptsArgs) -> Options {
        Options {
            individual: a.individual,
            combined: a.combined,
            ip_masq: !a.no_ip_masq,
            combined_key: a.combined_key.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DockerOptsError {
    /// The script's own message and exit status; nothing is written.
    #[error("Invalid value of FLANNEL_IPMASQ: {0}")]
    InvalidIpMasq(String),
    #[error("-k {0:?} is not a shell variable name")]
    InvalidKey(String),
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    /// The script's own message: the file is written, the exit status is 1.
    #[error("Your routing table already contains the subnet: {0}")]
    RouteConflict(String),
}

/// The variables the script sees: `env` overridden by the assignments of the
/// flannel env file's text (`None` when the file does not exist).
pub fn variables<I, K, V>(env: I, flannel_env: Option<&str>) -> BTreeMap<String, String>
where
    I: IntoIterator<Item = (K, V)>,
    K: Into<String>,
    V: Into<String>,
{
    let mut vars: BTreeMap<String, String> =
        env.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
    if let Some(text) = flannel_env {
        vars.extend(subnet_env::parse_env(text));
    }
    vars
}

/// The docker env file's contents for these variables.
pub fn render(opts: &Options, vars: &BTreeMap<String, String>) -> Result<String, DockerOptsError> {
    let key = opts.combined_key.as_str();
    if !is_shell_name(key) {
        return Err(DockerOptsError::InvalidKey(key.to_owned()));
    }
    let set = |name: &str| vars.get(name).filter(|v| !v.is_empty());

    let mut docker: BTreeMap<&str, String> = vars
        .iter()
        .filter(|(k, _)| k.starts_with(OPTION_PREFIX))
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    if let Some(subnet) = set("FLANNEL_SUBNET") {
        docker.insert("DOCKER_OPT_BIP", format!("--bip={subnet}"));
    }
    if let Some(mtu) = set("FLANNEL_MTU") {
        docker.insert("DOCKER_OPT_MTU", format!("--mtu={mtu}"));
    }
    if let Some(masq) = set("FLANNEL_IPMASQ").filter(|_| opts.ip_masq) {
        // flanneld masquerades, so docker must not do it again (and the
        // other way round).
        let docker_masq = match masq.as_str() {
            "true" => "--ip-masq=false",
            "false" => "--ip-masq=true",
            other => return Err(DockerOptsError::InvalidIpMasq(other.to_owned())),
        };
        docker.insert("DOCKER_OPT_IPMASQ", docker_masq.to_owned());
    }

    let (individual, combined) = match (opts.individual, opts.combined) {
        (false, false) => (true, true),
        both => both,
    };
    let mut all = match set(key) {
        Some(before) => format!("{before} "),
        None => String::new(),
    };
    let mut out = String::new();
    for (name, value) in &docker {
        if individual {
            let _ = writeln!(out, "{name}=\"{value}\"");
        }
        all.push(' ');
        all.push_str(value);
    }
    if combined {
        let _ = writeln!(out, "{key}=\"{all}\"");
    }
    Ok(out)
}

/// The lines of `ip route show` that route this host's own subnet (the
/// network of FLANNEL_SUBNET, whose last octet flanneld writes as the
/// network's plus one) via a gateway: a stale route to a subnet that another
/// node held before, which would take docker0's traffic.
pub fn route_conflicts(flannel_subnet: &str, ip_route_show: &str) -> Vec<String> {
    let Ok(given) = flannel_subnet.parse::<Ipv4Net>() else {
        return Vec::new();
    };
    let ip = u32::from(given.addr());
    // The script subtracts one from the last octet; a .0 gives it nothing to find.
    if ip & 0xff == 0 {
        return Vec::new();
    }
    let own = format!(
        "{}/{}",
        std::net::Ipv4Addr::from(ip - 1),
        given.prefix_len()
    );
    ip_route_show
        .lines()
        .filter(|l| {
            let mut words = l.split_whitespace();
            words.next() == Some(own.as_str()) && words.any(|w| w == "via")
        })
        .map(str::to_owned)
        .collect()
}

/// Runs the subcommand: reads `-f` (or `default_flannel_env`) and the
/// environment, writes `-d`, then checks the routing table as the script does.
pub fn run(args: &MkDockerOptsArgs, default_flannel_env: &Path) -> Result<(), DockerOptsError> {
    let flannel_env = args.flannel_env.as_deref().unwrap_or(default_flannel_env);
    let text = match fs::read_to_string(flannel_env) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            log::warn!(
                "{} does not exist: docker options from the environment only",
                flannel_env.display()
            );
            None
        }
        Err(source) => {
            return Err(DockerOptsError::Read {
                path: flannel_env.to_owned(),
                source,
            });
        }
    };
    // Variables that are not UTF-8 cannot be any the script reads.
    let env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
    let vars = variables(env, text.as_deref());
    let out = render(&Options::from(args), &vars)?;
    subnet_env::write_atomic(&args.docker_env, out.as_bytes(), 0o644).map_err(|source| {
        DockerOptsError::Write {
            path: args.docker_env.clone(),
            source,
        }
    })?;
    if let Some(subnet) = vars.get("FLANNEL_SUBNET").filter(|v| !v.is_empty()) {
        match Command::new("ip").args(["route", "show"]).output() {
            Ok(o) if o.status.success() => {
                let conflicts = route_conflicts(subnet, &String::from_utf8_lossy(&o.stdout));
                if !conflicts.is_empty() {
                    return Err(DockerOptsError::RouteConflict(conflicts.join("\n")));
                }
            }
            // The script carries on without the check, too.
            Ok(o) => log::warn!(
                "`ip route show` failed ({}): not checking for a route to {subnet}",
                o.status
            ),
            Err(e) => {
                log::warn!("cannot run `ip route show` ({e}): not checking for a route to {subnet}")
            }
        }
    }
    Ok(())
}

fn is_shell_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seed 004's node 1: its subnet.env and the docker_opts.env it shows.
    const SEED_004_SUBNET_ENV: &str = "FLANNEL_NETWORK=10.0.0.0/16\nFLANNEL_SUBNET=10.0.13.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
    const SEED_004_DOCKER_OPTS: &str = "DOCKER_OPT_BIP=\"--bip=10.0.13.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\nDOCKER_OPTS=\" --bip=10.0.13.1/24 --ip-masq=false --mtu=1450\"\n";

    fn seed_vars() -> BTreeMap<String, String> {
        variables(Vec::<(String, String)>::new(), Some(SEED_004_SUBNET_ENV))
    }

    fn with(f: impl FnOnce(&mut Options)) -> Options {
        let mut o = Options::default();
        f(&mut o);
        o
    }

    fn parse(args: &[&str]) -> MkDockerOptsArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Top {
            #[command(flatten)]
            a: MkDockerOptsArgs,
        }
        let mut v = vec!["mk-docker-opts"];
        v.extend_from_slice(args);
        Top::try_parse_from(v)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .a
    }

    #[test]
    fn seed_004_byte_for_byte() {
        let out = render(&Options::default(), &seed_vars()).unwrap();
        assert_eq!(out, SEED_004_DOCKER_OPTS);
    }

    #[test]
    fn individual_only_and_combined_only() {
        let out = render(&with(|o| o.individual = true), &seed_vars()).unwrap();
        assert_eq!(
            out,
            "DOCKER_OPT_BIP=\"--bip=10.0.13.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\n"
        );
        let out = render(&with(|o| o.combined = true), &seed_vars()).unwrap();
        assert_eq!(
            out,
            "DOCKER_OPTS=\" --bip=10.0.13.1/24 --ip-masq=false --mtu=1450\"\n"
        );
        let both = with(|o| {
            o.individual = true;
            o.combined = true;
        });
        assert_eq!(render(&both, &seed_vars()).unwrap(), SEED_004_DOCKER_OPTS);
    }

    #[test]
    fn combined_key_and_no_ip_masq() {
        let out = render(
            &with(|o| {
                o.combined = true;
                o.combined_key = "DOCKER_NETWORK_OPTIONS".into();
            }),
            &seed_vars(),
        )
        .unwrap();
        assert_eq!(
            out,
            "DOCKER_NETWORK_OPTIONS=\" --bip=10.0.13.1/24 --ip-masq=false --mtu=1450\"\n"
        );
        let out = render(&with(|o| o.ip_masq = false), &seed_vars()).unwrap();
        assert_eq!(
            out,
            "DOCKER_OPT_BIP=\"--bip=10.0.13.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\nDOCKER_OPTS=\" --bip=10.0.13.1/24 --mtu=1450\"\n"
        );
        for bad in ["", "1X", "DOCKER-OPTS", "A B"] {
            let e = render(&with(|o| o.combined_key = bad.into()), &seed_vars()).unwrap_err();
            assert!(matches!(e, DockerOptsError::InvalidKey(_)), "{bad:?}: {e}");
        }
    }

    #[test]
    fn flanneld_without_ip_masq_lets_docker_masquerade() {
        // Seed 001's flanneld runs without --ip-masq.
        let vars = variables(
            Vec::<(String, String)>::new(),
            Some(
                "FLANNEL_NETWORK=10.0.0.0/8\nFLANNEL_SUBNET=10.15.64.1/20\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
            ),
        );
        assert_eq!(
            render(&Options::default(), &vars).unwrap(),
            "DOCKER_OPT_BIP=\"--bip=10.15.64.1/20\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\nDOCKER_OPTS=\" --bip=10.15.64.1/20 --ip-masq=true --mtu=1450\"\n"
        );
    }

    #[test]
    fn invalid_ip_masq_is_the_scripts_error_unless_m() {
        let vars = variables([("FLANNEL_IPMASQ", "yes")], Some("FLANNEL_MTU=1450\n"));
        let e = render(&Options::default(), &vars).unwrap_err();
        assert_eq!(e.to_string(), "Invalid value of FLANNEL_IPMASQ: yes");
        // -m never looks at it.
        assert_eq!(
            render(&with(|o| o.ip_masq = false), &vars).unwrap(),
            "DOCKER_OPT_MTU=\"--mtu=1450\"\nDOCKER_OPTS=\" --mtu=1450\"\n"
        );
    }

    #[test]
    fn missing_or_empty_values_give_no_option() {
        let none = variables(Vec::<(String, String)>::new(), None);
        assert_eq!(
            render(&Options::default(), &none).unwrap(),
            "DOCKER_OPTS=\"\"\n"
        );
        assert_eq!(render(&with(|o| o.individual = true), &none).unwrap(), "");
        let empty = variables(
            Vec::<(String, String)>::new(),
            Some("FLANNEL_SUBNET=\nFLANNEL_MTU=\nFLANNEL_IPMASQ=\n"),
        );
        assert_eq!(
            render(&Options::default(), &empty).unwrap(),
            "DOCKER_OPTS=\"\"\n"
        );
    }

    #[test]
    fn the_environment_is_read_and_the_file_wins() {
        // As `. $flannel_env` in the script: the file overrides the environment,
        // which fills in what the file lacks.
        let vars = variables(
            [
                ("FLANNEL_SUBNET", "10.9.9.1/24"),
                ("FLANNEL_MTU", "1400"),
                ("PATH", "/usr/bin"),
            ],
            Some("FLANNEL_SUBNET=10.0.13.1/24\n"),
        );
        assert_eq!(
            render(&with(|o| o.combined = true), &vars).unwrap(),
            "DOCKER_OPTS=\" --bip=10.0.13.1/24 --mtu=1400\"\n"
        );
    }

    #[test]
    fn existing_docker_opt_vars_and_combined_key_are_kept() {
        // DOCKER_OPT_* already set are options too, sorted by name with ours;
        // the combined key's value comes first, followed by a space.
        let vars = variables(
            [
                ("DOCKER_OPT_DNS", "--dns=192.0.2.53"),
                ("DOCKER_OPTS", "--log-level=warn"),
            ],
            Some(SEED_004_SUBNET_ENV),
        );
        assert_eq!(
            render(&Options::default(), &vars).unwrap(),
            "DOCKER_OPT_BIP=\"--bip=10.0.13.1/24\"\nDOCKER_OPT_DNS=\"--dns=192.0.2.53\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\nDOCKER_OPTS=\"--log-level=warn  --bip=10.0.13.1/24 --dns=192.0.2.53 --ip-masq=false --mtu=1450\"\n"
        );
        // With -m, an inherited DOCKER_OPT_IPMASQ stays (the script only
        // skips setting it).
        let vars = variables(
            [("DOCKER_OPT_IPMASQ", "--ip-masq=true")],
            Some(SEED_004_SUBNET_ENV),
        );
        assert!(
            render(&with(|o| o.ip_masq = false), &vars)
                .unwrap()
                .contains("DOCKER_OPT_IPMASQ=\"--ip-masq=true\"\n")
        );
    }

    #[test]
    fn quoted_and_exported_assignments_are_sourced() {
        let vars = variables(
            Vec::<(String, String)>::new(),
            Some("# written by hand\nexport FLANNEL_SUBNET=\"10.0.13.1/24\"\nFLANNEL_MTU='1450'\n"),
        );
        assert_eq!(
            render(&with(|o| o.combined = true), &vars).unwrap(),
            "DOCKER_OPTS=\" --bip=10.0.13.1/24 --mtu=1450\"\n"
        );
    }

    #[test]
    fn options_parse_as_getopts_does() {
        let a = parse(&[]);
        assert_eq!(a.flannel_env, None);
        assert_eq!(a.docker_env, PathBuf::from(DEFAULT_DOCKER_ENV));
        assert_eq!(a.combined_key, DEFAULT_COMBINED_KEY);
        assert_eq!(Options::from(&a), Options::default());
        // Seed-style spellings: separate, attached and bundled.
        let a = parse(&[
            "-f",
            "/a/subnet.env",
            "-d/b/opts.env",
            "-ic",
            "-m",
            "-kNET_OPTS",
        ]);
        assert_eq!(a.flannel_env, Some(PathBuf::from("/a/subnet.env")));
        assert_eq!(a.docker_env, PathBuf::from("/b/opts.env"));
        assert_eq!(
            Options::from(&a),
            Options {
                individual: true,
                combined: true,
                ip_masq: false,
                combined_key: "NET_OPTS".into(),
            }
        );
        let a = parse(&["-mk", "K", "-i"]);
        assert!(a.no_ip_masq && a.individual && !a.combined);
        assert_eq!(a.combined_key, "K");
        let a = parse(&["-d", "/x", "-i", "-d", "/y", "-i"]);
        assert_eq!(a.docker_env, PathBuf::from("/y"));
    }

    #[test]
    fn route_to_our_own_subnet_via_a_gateway_conflicts() {
        let routes = "default via 10.211.55.1 dev enp0s5\n\
                      10.0.14.0/24 via 10.0.14.0 dev flannel.1 onlink\n\
                      10.0.13.0/24 dev docker0 proto kernel scope link src 10.0.13.1\n";
        assert!(route_conflicts("10.0.13.1/24", routes).is_empty());
        assert_eq!(
            route_conflicts("10.0.14.1/24", routes),
            ["10.0.14.0/24 via 10.0.14.0 dev flannel.1 onlink"]
        );
        // Only that exact prefix counts, not one that merely contains its text.
        assert!(route_conflicts("10.0.1.1/24", "110.0.1.0/24 via 192.0.2.1 dev eth0\n").is_empty());
        assert!(
            route_conflicts("10.0.13.0/24", "10.0.12.255/24 via 192.0.2.1 dev eth0\n").is_empty()
        );
        assert!(route_conflicts("not-a-cidr", routes).is_empty());
    }

    #[test]
    fn run_writes_the_file_and_reads_the_default_path() {
        let dir =
            std::env::temp_dir().join(format!("overlay-agent-docker-opts-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let subnet = dir.join("subnet.env");
        fs::write(&subnet, SEED_004_SUBNET_ENV).unwrap();
        let mut args = parse(&["-c"]);
        args.docker_env = dir.join("out/docker_opts.env");
        run(&args, &subnet).unwrap();
        let got = fs::read_to_string(&args.docker_env).unwrap();
        // Loose on purpose: DOCKER_OPTS or DOCKER_OPT_* in the environment
        // of the test run would be carried over, as by the script.
        assert!(got.starts_with("DOCKER_OPTS=\""), "{got}");
        assert!(
            got.contains(" --bip=10.0.13.1/24 --ip-masq=false --mtu=1450\"\n"),
            "{got}"
        );
        // A flannel env file that is a directory cannot be read.
        args.flannel_env = Some(dir.clone());
        assert!(matches!(
            run(&args, &subnet),
            Err(DockerOptsError::Read { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
