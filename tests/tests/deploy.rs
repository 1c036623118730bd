//! The deployment files in `deploy/` carry what the agent needs: the
//! DaemonSet (host network, capabilities, bpffs and flannel's directories,
//! probes on the health endpoints the agent serves, a config the agent
//! accepts, rolling updates), the systemd unit (Type=notify, restart on
//! failure, ordered before docker without tying docker's lifetime to it,
//! accepted by `systemd-analyze verify`) and the image (multi-stage, the binary where the manifest runs it).
//! The agent's side of `Type=notify` is tested in `health.rs`.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Context, Result, ensure};
use serde_yaml::Value;

fn deploy(path: &str) -> Result<String> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path);
    std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
}

fn manifests() -> Result<Vec<Value>> {
    let text = deploy("kubernetes/kube-overlay.yml")?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = <Value as serde::Deserialize>::deserialize(doc)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .with_context(|| format!("no {kind} in kube-overlay.yml"))
}

fn strs(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn daemonset_has_host_network_capabilities_mounts_and_probes() -> Result<()> {
    let docs = manifests()?;
    let ds = kind(&docs, "DaemonSet")?;
    let pod = &ds["spec"]["template"]["spec"];
    ensure!(pod["hostNetwork"] == true, "hostNetwork");
    ensure!(pod["priorityClassName"] == "system-node-critical");
    let agent = pod["containers"]
        .as_sequence()
        .and_then(|c| c.iter().find(|c| c["name"] == "overlay-agent"))
        .context("no overlay-agent container")?;

    let caps = strs(&agent["securityContext"]["capabilities"]["add"]);
    let privileged = agent["securityContext"]["privileged"] == true;
    for cap in ["NET_ADMIN", "BPF", "PERFMON", "SYS_ADMIN"] {
        ensure!(
            privileged || caps.iter().any(|c| c == cap),
            "capability {cap} missing: {caps:?}"
        );
    }

    // Each volume mount resolves to the host path it must be.
    let volumes: BTreeMap<String, &Value> = pod["volumes"]
        .as_sequence()
        .context("volumes")?
        .iter()
        .map(|v| (v["name"].as_str().unwrap_or("").to_owned(), v))
        .collect();
    let host_path_of = |mount_path: &str| -> Option<String> {
        let m = agent["volumeMounts"]
            .as_sequence()?
            .iter()
            .find(|m| m["mountPath"] == mount_path)?;
        let vol = volumes.get(m["name"].as_str()?)?;
        vol["hostPath"]["path"].as_str().map(str::to_owned)
    };
    for (mount, host) in [
        ("/sys/fs/bpf", "/sys/fs/bpf"),
        ("/run/flannel", "/run/flannel"),
        ("/run/xtables.lock", "/run/xtables.lock"),
        ("/lib/modules", "/lib/modules"),
    ] {
        ensure!(
            host_path_of(mount).as_deref() == Some(host),
            "{mount} is not the host's {host}"
        );
    }
    // The CNI directory is written by the install-cni init container.
    let inits = pod["initContainers"]
        .as_sequence()
        .context("initContainers")?;
    let cni = inits
        .iter()
        .find(|c| c["name"] == "install-cni")
        .context("install-cni")?;
    let cni_vol = cni["volumeMounts"]
        .as_sequence()
        .and_then(|m| m.iter().find(|m| m["mountPath"] == "/etc/cni/net.d"))
        .context("install-cni mounts no /etc/cni/net.d")?;
    ensure!(volumes[cni_vol["name"].as_str().unwrap()]["hostPath"]["path"] == "/etc/cni/net.d");
    ensure!(strs(&cni["args"]).contains(&"/etc/cni/net.d/10-flannel.conflist".to_owned()));
    // The fast path's sysctl, which the unprivileged agent cannot write.
    let liberal = inits
        .iter()
        .find(|c| c["name"] == "conntrack-liberal")
        .context("conntrack-liberal")?;
    ensure!(liberal["securityContext"]["privileged"] == true);
    ensure!(
        strs(&liberal["command"])
            .iter()
            .any(|c| c.contains("nf_conntrack_tcp_be_liberal")),
        "{:?}",
        strs(&liberal["command"])
    );

    // Probes hit the endpoints the agent serves, on the port it is told.
    let args = strs(&agent["args"]);
    let port: u64 = args
        .iter()
        .find_map(|a| a.strip_prefix("--healthz-port="))
        .context("no --healthz-port")?
        .parse()?;
    ensure!(
        args.contains(&"--healthz-ip=0.0.0.0".to_owned()),
        "{args:?}"
    );
    ensure!(agent["livenessProbe"]["httpGet"]["path"] == "/healthz");
    ensure!(agent["livenessProbe"]["httpGet"]["port"].as_u64() == Some(port));
    ensure!(agent["readinessProbe"]["httpGet"]["path"] == "/readyz");
    ensure!(agent["readinessProbe"]["httpGet"]["port"].as_u64() == Some(port));
    ensure!(
        args.iter()
            .any(|a| a == "--bpf-pin-dir=/sys/fs/bpf/overlay"),
        "pins must live on the host's bpffs for hitless pod replacement: {args:?}"
    );
    // Every flag given is one the agent accepts.
    let mut argv = vec!["overlay-agent".to_owned()];
    argv.extend(args.iter().map(|a| a.replace("$(POD_IP)", "10.0.0.5")));
    overlay_agent::cli::Cli::parse_from_go(argv).map_err(|e| anyhow::anyhow!("{e}"))?;

    let strategy = &ds["spec"]["updateStrategy"];
    ensure!(strategy["type"] == "RollingUpdate");
    ensure!(strategy["rollingUpdate"]["maxUnavailable"].as_u64() == Some(1));
    Ok(())
}

#[test]
fn configmap_holds_a_network_config_the_agent_accepts_and_a_flannel_cni_config() -> Result<()> {
    let docs = manifests()?;
    let cm = kind(&docs, "ConfigMap")?;
    let net = cm["data"]["net-conf.json"]
        .as_str()
        .context("net-conf.json")?;
    let config = overlay_agent::flannel::config::NetworkConfig::parse(net.as_bytes())
        .map_err(|e| anyhow::anyhow!("net-conf.json: {e}"))?;
    ensure!(config.network.to_string() == "10.244.0.0/16");
    let cni: serde_json::Value = serde_json::from_str(
        cm["data"]["cni-conf.json"]
            .as_str()
            .context("cni-conf.json")?,
    )?;
    ensure!(cni["plugins"][0]["type"] == "flannel", "{cni}");
    // The init container puts it in etcd only when absent.
    let ds = kind(&docs, "DaemonSet")?;
    let put = ds["spec"]["template"]["spec"]["initContainers"]
        .as_sequence()
        .and_then(|c| c.iter().find(|c| c["name"] == "put-network-config"))
        .context("put-network-config")?;
    let script = strs(&put["command"]).join(" ");
    ensure!(
        script.contains("etcdctl") && script.contains("create(") && script.contains("= \"0\""),
        "{script}"
    );
    Ok(())
}

/// The unit's `[Section] Key=` values; a key given twice keeps both.
fn unit_keys(unit: &str) -> BTreeMap<(String, String), Vec<String>> {
    let mut section = String::new();
    let mut keys: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_owned();
        } else if let Some((k, v)) = line.split_once('=') {
            keys.entry((section.clone(), k.trim().to_owned()))
                .or_default()
                .push(v.trim().to_owned());
        }
    }
    keys
}

#[test]
fn systemd_unit_is_type_notify_and_restarts_on_failure() -> Result<()> {
    let unit = deploy("systemd/overlay-agent.service")?;
    let keys = unit_keys(&unit);
    let get = |s: &str, k: &str| keys.get(&(s.to_owned(), k.to_owned())).map(|v| v.join(" "));
    ensure!(get("Service", "Type").as_deref() == Some("notify"));
    ensure!(get("Service", "Restart").as_deref() == Some("on-failure"));
    ensure!(
        get("Service", "ExecStart").is_some_and(|e| e.starts_with("/opt/bin/overlay-agent")),
        "ExecStart"
    );
    ensure!(get("Service", "EnvironmentFile").is_some());
    ensure!(get("Unit", "After").is_some_and(|a| a.contains("network-online.target")));
    // docker and containerd start after the agent, and starting docker
    // starts it (Wants= does not pass a stop or restart on)...
    let wanted_by = get("Install", "WantedBy").unwrap_or_default();
    let wanted_by: Vec<&str> = wanted_by.split_whitespace().collect();
    ensure!(
        wanted_by.contains(&"multi-user.target") && wanted_by.contains(&"docker.service"),
        "WantedBy {wanted_by:?}"
    );
    let before = get("Unit", "Before").unwrap_or_default();
    ensure!(
        before.contains("docker.service") && before.contains("containerd.service"),
        "Before={before}"
    );
    // ...and nothing ties them to it so that `systemctl restart
    // overlay-agent` (hitless for the datapath) stops or restarts them.
    for (section, key) in [
        ("Unit", "Requires"),
        ("Unit", "Requisite"),
        ("Unit", "BindsTo"),
        ("Unit", "PartOf"),
        ("Unit", "Upholds"),
        ("Unit", "PropagatesStopTo"),
        ("Unit", "StopPropagatedFrom"),
        ("Install", "RequiredBy"),
        ("Install", "UpheldBy"),
    ] {
        let v = get(section, key).unwrap_or_default();
        ensure!(
            !v.contains("docker") && !v.contains("containerd"),
            "[{section}] {key}={v} passes a stop or restart of overlay-agent to the containers"
        );
    }
    // The example environment uses only variables the agent reads.
    for line in deploy("systemd/overlay-agent.env")?.lines() {
        let Some((k, _)) = line.split_once('=') else {
            continue;
        };
        if k.starts_with('#') || k == "FLANNEL_OPTIONS" {
            continue;
        }
        let flag = format!(
            "--{}",
            k.strip_prefix("FLANNELD_")
                .context(k.to_owned())?
                .to_lowercase()
                .replace('_', "-")
        );
        let help = overlay_agent::cli::Cli::parse_from_go(["overlay-agent", "--help"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        ensure!(help.contains(&flag), "{k}: the agent has no {flag}");
    }
    Ok(())
}

/// `systemd-analyze verify` accepts the unit. It checks that ExecStart's
/// binary exists, so it reads a copy naming an executable this machine has;
/// the path itself is checked above.
#[test]
fn systemd_analyze_verifies_the_unit() -> Result<()> {
    let unit = deploy("systemd/overlay-agent.service")?;
    ensure!(unit.contains("ExecStart=/opt/bin/overlay-agent "));
    ensure!(
        unit.contains("ExecStartPost=/opt/bin/overlay-agent $FLANNEL_OPTIONS mk-docker-opts"),
        "the unit does not write docker's options"
    );
    let dir = std::env::temp_dir().join(format!("overlay-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let copy = dir.join("overlay-agent.service");
    std::fs::write(
        &copy,
        unit.replace("ExecStart=/opt/bin/overlay-agent ", "ExecStart=/bin/true ")
            .replace(
                "ExecStartPost=/opt/bin/overlay-agent ",
                "ExecStartPost=/bin/true ",
            ),
    )?;
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .context("running systemd-analyze (package systemd)");
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify ({}): {stderr}",
        out.status
    );
    Ok(())
}

#[test]
fn image_is_multi_stage_and_ships_the_binary_where_the_manifest_runs_it() -> Result<()> {
    let dockerfile = deploy("Dockerfile")?;
    let froms: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    ensure!(froms.len() >= 2, "not multi-stage: {froms:?}");
    ensure!(
        dockerfile.contains("cargo build --release --locked -p overlay-agent"),
        "the image does not build the agent"
    );
    ensure!(dockerfile.contains("nightly-2026-07-20") && dockerfile.contains("bpf-linker"));
    let copy = dockerfile
        .lines()
        .find(|l| l.starts_with("COPY --from="))
        .context("no COPY from the build stage")?;
    ensure!(copy.ends_with(" /opt/bin/overlay-agent"), "{copy}");
    ensure!(
        dockerfile.contains("ENTRYPOINT [\"/opt/bin/overlay-agent\"]"),
        "the Dockerfile's entrypoint is not the agent"
    );
    // The same runtime layout as `cargo xtask image`: its packages in the
    // runtime stage, the agent as entrypoint at the same path.
    let xtask = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../xtask/src/image.rs"),
    )?;
    let list = xtask
        .split_once("pub const PACKAGES: &[&str] = &[")
        .and_then(|(_, rest)| rest.split_once("];"))
        .context("PACKAGES in xtask/src/image.rs")?
        .0;
    let runtime = dockerfile
        .rsplit_once("\nFROM ")
        .context("no runtime stage")?
        .1;
    for pkg in list
        .split(',')
        .map(|p| p.trim().trim_matches('"'))
        .filter(|p| !p.is_empty())
    {
        ensure!(
            runtime.split_whitespace().any(|w| w == pkg),
            "the Dockerfile's runtime stage lacks {pkg}, which `cargo xtask image` installs"
        );
    }
    ensure!(xtask.contains("COPY overlay-agent /opt/bin/overlay-agent"));
    ensure!(xtask.contains("ENTRYPOINT [\\\"/opt/bin/overlay-agent\\\"]"));
    let docs = manifests()?;
    let ds = kind(&docs, "DaemonSet")?;
    let command = strs(&ds["spec"]["template"]["spec"]["containers"][0]["command"]);
    ensure!(command == ["/opt/bin/overlay-agent"], "{command:?}");
    Ok(())
}

/// The put-network-config init container's script, run for real against
/// etcd: it writes net-conf.json when `<prefix>/config` is absent and leaves
/// an existing config alone.
#[test]
#[ignore = "needs etcd (started by the test): run `cargo xtask test`"]
fn network_config_init_script_puts_only_when_absent() -> Result<()> {
    let docs = manifests()?;
    let ds = kind(&docs, "DaemonSet")?;
    let init = ds["spec"]["template"]["spec"]["initContainers"]
        .as_sequence()
        .and_then(|c| c.iter().find(|c| c["name"] == "put-network-config"))
        .context("put-network-config")?;
    let command = strs(&init["command"]);
    let script = command.last().context("script")?;
    let cm = kind(&docs, "ConfigMap")?;
    let net_conf = cm["data"]["net-conf.json"]
        .as_str()
        .context("net-conf.json")?;

    let etcd = overlay_tests::etcd::Etcd::start()?;
    let file = etcd.dir().join("net-conf.json");
    std::fs::write(&file, net_conf)?;
    let script = script.replace("/etc/kube-overlay/net-conf.json", file.to_str().unwrap());
    let run = || -> Result<String> {
        let out = std::process::Command::new("sh")
            .args(["-c", &script])
            .env("ETCDCTL_API", "3")
            .env("FLANNELD_ETCD_ENDPOINTS", etcd.endpoints())
            .env("FLANNELD_ETCD_PREFIX", "/coreos.com/network")
            .output()?;
        ensure!(
            out.status.success(),
            "init script failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    ensure!(run()?.starts_with("SUCCESS"));
    let stored = etcd
        .get("/coreos.com/network/config")?
        .context("no config")?;
    let parsed = overlay_agent::flannel::config::NetworkConfig::parse(stored.as_bytes())
        .map_err(|e| anyhow::anyhow!("stored config: {e}"))?;
    ensure!(parsed.network.to_string() == "10.244.0.0/16", "{stored}");
    etcd.put("/coreos.com/network/config", r#"{"Network":"10.9.0.0/16"}"#)?;
    ensure!(
        run()?.starts_with("FAILURE"),
        "the script overwrote a config"
    );
    ensure!(
        etcd.get("/coreos.com/network/config")?.as_deref() == Some(r#"{"Network":"10.9.0.0/16"}"#)
    );
    Ok(())
}

/// A systemd `EnvironmentFile=`: `KEY=VALUE` lines, `#` and `;` comments,
/// one pair of surrounding quotes removed.
fn environment_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            Some((k.trim().to_owned(), v.to_owned()))
        })
        .collect()
}

/// A command line of the unit as systemd expands it: `$VAR` becomes the
/// variable's words (none when it is empty), `${VAR}` one word.
fn systemd_words(line: &str, env: &[(String, String)]) -> Vec<String> {
    let get = |k: &str| {
        env.iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let mut words = Vec::new();
    for w in line.split_whitespace() {
        if let Some(k) = w.strip_prefix("${").and_then(|w| w.strip_suffix('}')) {
            words.push(get(k));
        } else if let Some(k) = w.strip_prefix('$') {
            words.extend(get(k).split_whitespace().map(str::to_owned));
        } else {
            words.push(w.to_owned());
        }
    }
    words
}

/// The unit's `ExecStart=` run for real, as systemd would run it, in each
/// of two lab hosts: a clean environment holding the variables of
/// `deploy/systemd/overlay-agent.env` (the unit's `EnvironmentFile=`) with
/// what must differ in the lab changed (etcd's address, a bpffs and a
/// subnet file of the test's, via the same `FLANNELD_*` variables),
/// `$FLANNEL_OPTIONS` expanded as systemd expands it, and a
/// `NOTIFY_SOCKET` (the unit is `Type=notify`): each agent reports
/// `READY=1`, takes its lease from etcd, and pods behind the two hosts
/// reach each other. Not run here: `ExecStartPost=` (it writes
/// `/run/docker_opts.env` on the machine; `docker.rs` runs it with `-d`),
/// and systemd itself (not this machine's init).
#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn systemd_exec_start_with_its_environment_file_takes_a_lease_and_carries_traffic() -> Result<()> {
    use overlay_tests::agent::{Agent, Bpffs, Cluster, Containers, add_container, sh};
    use std::os::unix::net::UnixDatagram;
    use std::time::{Duration, Instant};

    let unit = deploy("systemd/overlay-agent.service")?;
    let keys = unit_keys(&unit);
    let get = |k: &str| {
        keys.get(&("Service".to_owned(), k.to_owned()))
            .and_then(|v| v.first().cloned())
            .with_context(|| format!("the unit has no {k}="))
    };
    ensure!(get("Type")? == "notify");
    let env_file = get("EnvironmentFile")?;
    ensure!(
        env_file.trim_start_matches('-') == "/etc/default/overlay-agent",
        "EnvironmentFile={env_file}"
    );
    let exec_start = get("ExecStart")?;
    let shipped = environment_file(&deploy("systemd/overlay-agent.env")?);

    let cluster = Cluster::start(
        "sd",
        2,
        r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan"}}"#,
    )?;
    let Cluster { hosts, etcd, bin } = &cluster;
    let dir = etcd.dir().to_path_buf();
    let mut agents = Vec::new();
    let mut bpffs = Vec::new();
    for i in 1..=2 {
        let b = Bpffs::mount(dir.join(format!("bpf{i}")))?;
        // The lab's /etc/default/overlay-agent: the shipped file, changed
        // only where this machine differs from a node.
        let mut env = shipped.clone();
        let lab = [
            ("FLANNELD_ETCD_ENDPOINTS", etcd.endpoints()),
            (
                "FLANNELD_BPF_PIN_DIR",
                b.0.join("overlay").display().to_string(),
            ),
            (
                "FLANNELD_SUBNET_FILE",
                dir.join(format!("h{i}.env")).display().to_string(),
            ),
        ];
        for (k, v) in lab {
            env.retain(|(n, _)| n != k);
            env.push((k.to_owned(), v));
        }
        bpffs.push(b);
        let iface = env.iter().find(|(k, _)| k == "FLANNELD_IFACE");
        ensure!(
            iface.is_some_and(|(_, v)| v == "eth0"),
            "the shipped FLANNELD_IFACE is the lab hosts' underlay eth0: {iface:?}"
        );
        let words = systemd_words(&exec_start, &env);
        ensure!(words[0] == "/opt/bin/overlay-agent", "{words:?}");
        let notify_path = dir.join(format!("notify-h{i}.sock"));
        let notify = UnixDatagram::bind(&notify_path)?;
        notify.set_read_timeout(Some(Duration::from_millis(200)))?;
        let log = dir.join(format!("systemd-h{i}.log"));
        let f = std::fs::File::create(&log)?;
        eprintln!("h{i}: ExecStart={exec_start} -> {words:?} with {env:?}");
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &hosts.ns(i)])
            // /opt/bin/overlay-agent is this build's agent.
            .arg(bin)
            .args(&words[1..])
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("NOTIFY_SOCKET", &notify_path)
            .stdin(std::process::Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()?;
        let mut agent = Agent { child, log };
        let t0 = Instant::now();
        let mut buf = [0u8; 512];
        loop {
            if let Ok(n) = notify.recv(&mut buf)
                && String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
            {
                break;
            }
            if let Some(code) = agent.exited() {
                anyhow::bail!("h{i}: the agent exited ({code}):\n{}", agent.log());
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(30),
                "h{i}: no READY=1 within 30 s:\n{}",
                agent.log()
            );
        }
        eprintln!("h{i}: READY=1 after {:.1} s", t0.elapsed().as_secs_f64());
        agents.push(agent);
    }
    let leases = etcd.etcdctl(&["get", "--prefix", "/coreos.com/network/subnets/"])?;
    for i in 1..=2 {
        ensure!(
            leases.contains(&format!("\"PublicIP\":\"{}\"", hosts.ip(i))),
            "no lease of host {i}:\n{leases}"
        );
    }
    let (c1, ip1) = add_container(hosts, 1, &dir.join("h1.env"))?;
    let mut pods = Containers(vec![c1.clone()]);
    let (c2, ip2) = add_container(hosts, 2, &dir.join("h2.env"))?;
    pods.0.push(c2.clone());
    overlay_tests::agent::pings_both_ways(
        &[(&c1, &ip2), (&c2, &ip1)].map(|(a, b)| (a.as_str(), b.as_str())),
    )?;
    // Health where the environment file puts it.
    let healthz = format!(
        "http://{}:{}/healthz",
        shipped
            .iter()
            .find(|(k, _)| k == "FLANNELD_HEALTHZ_IP")
            .map(|(_, v)| v.as_str())
            .unwrap_or_default(),
        shipped
            .iter()
            .find(|(k, _)| k == "FLANNELD_HEALTHZ_PORT")
            .map(|(_, v)| v.as_str())
            .unwrap_or_default()
    );
    sh(&[
        "ip",
        "netns",
        "exec",
        &hosts.ns(1),
        "curl",
        "-sf",
        "--max-time",
        "2",
        &healthz,
    ])?;
    drop(pods);
    drop(agents);
    drop(bpffs);
    Ok(())
}
