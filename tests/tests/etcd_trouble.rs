//! etcd trouble under the real agent, over TLS with client certificates:
//! etcd stopped (SIGTERM) and killed (SIGKILL) and started again on the
//! same port and data directory while the agent runs is retried, and the
//! agent keeps its lease and follows the peers afterwards; a CA that does
//! not verify the server, or a key file that is missing or holds no key,
//! stops the agent at once, naming the problem. (A wrong password is
//! `control_agent::agent_with_tls_and_auth_flags_and_a_wrong_password`.)

use std::{
    path::Path,
    process::ExitStatus,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use overlay_tests::{
    agent::{Agent, Hosts, sh, subnet_of, within},
    etcd::{Etcd, EtcdSpec},
};

const PREFIX: &str = "/coreos.com/network";
const CONFIG: &str = r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "SubnetMin": "10.0.1.0","SubnetMax": "10.0.20.0", "Backend": {"Type": "vxlan"}}"#;

/// Hosts `h1` (etcd, TLS with client certificates) and `h2` (the agent).
fn tls_etcd(tag: &str) -> Result<(Hosts, Etcd)> {
    let hosts = Hosts::new(tag, 2)?;
    let etcd = Etcd::start_with(EtcdSpec {
        tls: true,
        netns: Some(hosts.ns(1)),
        listen_ip: Some(hosts.ip(1)),
        ..EtcdSpec::default()
    })?;
    etcd.put(&format!("{PREFIX}/config"), CONFIG)?;
    Ok((hosts, etcd))
}

/// The agent's flags on `h2`: etcd's (with the TLS files), then `extra`,
/// each replacing a flag of the same name.
fn agent_args(hosts: &Hosts, etcd: &Etcd, extra: &[String]) -> Vec<String> {
    let mut args = etcd.agent_flags();
    args.push(format!("--iface={}", hosts.ip(2)));
    args.push(format!(
        "--subnet-file={}",
        etcd.dir().join("h2.env").display()
    ));
    args.push("--datapath=kernel".into());
    for e in extra {
        let name = e.split('=').next().unwrap_or(e);
        args.retain(|a| a.split('=').next() != Some(name));
        args.push(e.clone());
    }
    args
}

/// How the agent exited, failing if it still runs after `limit`.
fn exit_within(agent: &mut Agent, limit: Duration) -> Result<ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Some(st) = agent.child.try_wait()? {
            return Ok(st);
        }
        if t0.elapsed() > limit {
            bail!("agent still running after {limit:?}:\n{}", agent.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ensure_alive(agent: &mut Agent, when: &str) -> Result<()> {
    if let Some(st) = agent.child.try_wait()? {
        bail!("agent exited ({st}) {when}:\n{}", agent.log());
    }
    Ok(())
}

#[derive(Clone, Copy, Debug)]
enum Outage {
    /// SIGTERM, two seconds away: requests in flight wait it out.
    Stopped,
    /// SIGKILL, six seconds away: longer than the agent's 5 s request
    /// timeout, so a renewal fails and is retried.
    Killed,
    /// SIGKILL and straight back: the agent's reconnects meet a member
    /// that is still starting.
    KilledAndBack,
}

#[test]
#[ignore = "needs root and network namespaces: run `cargo xtask test`"]
fn agent_carries_on_while_a_tls_etcd_restarts_under_it() -> Result<()> {
    let bin = overlay_tests::binaries::agent()?;
    let (hosts, mut etcd) = tls_etcd("e")?;
    let dir = etcd.dir().to_path_buf();
    // A lease renewed every 2 s, so that renewals meet the outages (and a
    // failed one is retried within 2 s), and that 10 s without one lose it.
    let args = agent_args(
        &hosts,
        &etcd,
        &[
            "--subnet-lease-ttl=10s".into(),
            "--subnet-lease-renew-margin=8s".into(),
        ],
    );
    ensure!(
        args.iter()
            .any(|a| a.starts_with("--etcd-endpoints=https://"))
    );
    ensure!(args.iter().any(|a| a.starts_with("--etcd-keyfile=")));
    let mut agent = Agent::start(&dir, "h2", &hosts.ns(2), &bin, &args)?;
    agent.wait_for("running: lease", Duration::from_secs(20))?;
    let subnet = subnet_of(&dir.join("h2.env"))?;
    let key = format!("{PREFIX}/subnets/{subnet}-24");
    let value = etcd.get(&key)?.context("our lease in etcd")?;

    // The lease watch follows every lease; the keeper's follows our key
    // alone, and says so.
    let lease_watch = format!("etcd watch of {PREFIX}/subnets/ resumed at revision");
    let own_watch = format!("etcd watch of our lease key {key} resumed at revision");
    for outage in [Outage::Stopped, Outage::Killed, Outage::KilledAndBack] {
        let log = agent.log();
        let (renewed, resumed, own_resumed) = (
            log.matches("renewed lease").count(),
            log.matches(&lease_watch).count(),
            log.matches(&own_watch).count(),
        );
        match outage {
            Outage::Stopped => etcd.terminate()?,
            Outage::Killed | Outage::KilledAndBack => etcd.stop()?,
        }
        match outage {
            Outage::Stopped => std::thread::sleep(Duration::from_secs(2)),
            Outage::Killed => std::thread::sleep(Duration::from_secs(6)),
            Outage::KilledAndBack => {}
        }
        ensure_alive(&mut agent, &format!("while etcd was down ({outage:?})"))?;
        etcd.start_again()?;
        // Back to normal: both watches re-opened and a renewal went through.
        within(
            Duration::from_secs(15),
            &format!("recovery after {outage:?}"),
            || {
                let log = agent.log();
                log.matches(&lease_watch).count() > resumed
                    && log.matches(&own_watch).count() > own_resumed
                    && log.matches("renewed lease").count() > renewed
            },
        )
        .with_context(|| agent.log())?;
        ensure_alive(&mut agent, &format!("after {outage:?}"))?;
        ensure!(
            etcd.get(&key)?.as_deref() == Some(value.as_str()),
            "our lease changed after {outage:?}"
        );
    }

    // A peer that joins after the restarts (in a subnet that is not ours)
    // is programmed.
    let peer = if subnet == "10.0.19.0" {
        "10.0.18.0"
    } else {
        "10.0.19.0"
    };
    etcd.put(
        &format!("{PREFIX}/subnets/{peer}-24"),
        r#"{"PublicIP":"10.98.0.4","BackendType":"vxlan","BackendData":{"VtepMAC":"02:00:00:00:00:04"}}"#,
    )?;
    within(Duration::from_secs(5), "route to the new peer", || {
        hosts
            .routes(2)
            .contains(&format!("{peer}/24 via {peer} dev flannel.1 onlink"))
    })
    .with_context(|| agent.log())?;
    ensure_alive(&mut agent, "at the end")?;
    ensure!(
        subnet_of(&dir.join("h2.env"))? == subnet,
        "subnet.env moved"
    );
    let log = agent.log();
    eprintln!("{log}");
    ensure!(!log.contains("LOST OUR LEASE"), "{log}");
    // The outages were seen, and retried.
    ensure!(log.contains("the watch broke"), "{log}");
    ensure!(
        log.contains("failed (retrying in"),
        "no renewal met an outage:\n{log}"
    );
    Ok(())
}

/// The agent with `extra` flags exits with a failure within 10 s, its log
/// naming every one of `needles`; nothing on the host was touched.
fn stops_at_once(
    hosts: &Hosts,
    etcd: &Etcd,
    bin: &Path,
    name: &str,
    extra: &[String],
    needles: &[&str],
) -> Result<()> {
    let dir = etcd.dir();
    let args = agent_args(hosts, etcd, extra);
    let mut agent = Agent::start(dir, name, &hosts.ns(2), bin, &args)?;
    let t0 = Instant::now();
    let st = exit_within(&mut agent, Duration::from_secs(10))?;
    let log = agent.log();
    eprintln!("{name}: {st} after {:?}:\n{log}", t0.elapsed());
    ensure!(!st.success(), "{name}: exited successfully:\n{log}");
    for n in needles {
        ensure!(log.contains(n), "{name}: log names no {n:?}:\n{log}");
    }
    ensure!(
        !sh(&["ip", "-n", &hosts.ns(2), "link"])?.contains("flannel"),
        "{name}: the agent created its device"
    );
    ensure!(!dir.join("h2.env").exists(), "{name}: wrote subnet.env");
    Ok(())
}

#[test]
#[ignore = "needs root and network namespaces: run `cargo xtask test`"]
fn a_ca_that_does_not_verify_or_a_bad_key_file_stops_the_agent() -> Result<()> {
    let bin = overlay_tests::binaries::agent()?;
    let (hosts, etcd) = tls_etcd("f")?;
    let tls = etcd.tls().context("TLS files")?.clone();

    // A CA that did not sign the server's certificate: the handshake fails
    // the same way every time, which retrying cannot change.
    stops_at_once(
        &hosts,
        &etcd,
        &bin,
        "other-ca",
        &[format!("--etcd-cafile={}", tls.other_ca.display())],
        &["invalid peer certificate", "UnknownIssuer", "--etcd-cafile"],
    )?;

    // A missing key file, with an endpoint nobody answers on: an agent
    // that tried to connect first would retry instead of stopping.
    let missing = etcd.dir().join("no-such.key");
    stops_at_once(
        &hosts,
        &etcd,
        &bin,
        "missing-key",
        &[
            format!("--etcd-endpoints=https://{}:1", hosts.ip(1)),
            format!("--etcd-keyfile={}", missing.display()),
        ],
        &["--etcd-keyfile", &missing.display().to_string()],
    )?;

    // A key file that holds a certificate.
    stops_at_once(
        &hosts,
        &etcd,
        &bin,
        "cert-as-key",
        &[
            format!("--etcd-endpoints=https://{}:1", hosts.ip(1)),
            format!("--etcd-keyfile={}", tls.client_cert.display()),
        ],
        &[
            "--etcd-keyfile",
            &tls.client_cert.display().to_string(),
            "private key",
        ],
    )?;
    Ok(())
}
