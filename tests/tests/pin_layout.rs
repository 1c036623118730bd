//! Pinned maps carry the version of their layout (`LAYOUT`), so a restart
//! never runs one build's programs against maps another build laid out.
//!
//! "Another build" is emulated on the pins of a real agent: removing the
//! `LAYOUT` pin leaves what a build from before the versions leaves, and
//! `bpftool map update` stamps a newer version, as a later build would.
//! Building a second agent with another `MAP_LAYOUT_VERSION` would test the
//! same code path at the cost of a second full build.
//!
//! - Without a version (an upgrade from such a build): the agent migrates.
//!   Every map is new (new ids), the pinned links are kept and get the new
//!   programs (hitless: 100 pings/s across the restart lose none), the old
//!   maps are freed once no program uses them, and `status` shows the peer.
//! - A newer version (a downgrade), under `--datapath auto`: the agent exits
//!   with one error naming the pin directory, both versions and the way out,
//!   does not fall back to the kernel datapath, and leaves every pin, map
//!   and program as it was; traffic keeps flowing through them.

use std::{collections::BTreeMap, path::Path, process::Command, time::Duration};

use anyhow::{Context, Result, ensure};
use overlay_common::maps::MAP_LAYOUT_VERSION;
use overlay_tests::{
    agent::{Agent, Bpffs, Cluster, Containers, add_container, sh, within},
    cmd::Background,
};

const CONFIG: &str = r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "SubnetMin": "10.0.1.0","SubnetMax": "10.0.20.0", "Backend": {"Type": "vxlan"}}"#;

/// The maps the agent pins (`overlay_agent::datapath::pins::MAPS`).
const MAPS: [&str; 9] = [
    "REMOTE_SUBNETS",
    "KNOWN_VTEPS",
    "NODE_CONFIG",
    "COUNTERS",
    "PEER_STATS",
    "FAST_CONFIG",
    "FAST_FLOWS",
    "POD_VETHS",
    "LAYOUT",
];

fn bpftool_json(args: &[&str]) -> Result<serde_json::Value> {
    let mut all = vec!["bpftool", "-j"];
    all.extend_from_slice(args);
    let out = sh(&all)?;
    serde_json::from_str(&out).with_context(|| format!("bpftool {args:?} said: {out}"))
}

fn id_of(what: &str, pin: &Path, field: &str) -> Result<u64> {
    let v = bpftool_json(&[what, "show", "pinned", pin.to_str().unwrap()])?;
    v[field]
        .as_u64()
        .with_context(|| format!("no {field} for {}: {v}", pin.display()))
}

/// Map name -> map id, for every map pinned under `pins`.
fn map_ids(pins: &Path) -> Result<BTreeMap<&'static str, u64>> {
    MAPS.iter()
        .map(|&name| Ok((name, id_of("map", &pins.join(name), "id")?)))
        .collect()
}

/// Link pin name -> (link id, program id), for every pinned link.
fn links(pins: &Path) -> Result<BTreeMap<String, (u64, u64)>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(pins.join("links"))? {
        let path = entry?.path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        out.insert(
            name,
            (
                id_of("link", &path, "id")?,
                id_of("link", &path, "prog_id")?,
            ),
        );
    }
    Ok(out)
}

/// The version `LAYOUT` records.
fn recorded_layout(pins: &Path) -> Result<u32> {
    let v = bpftool_json(&[
        "map",
        "lookup",
        "pinned",
        pins.join("LAYOUT").to_str().unwrap(),
        "key",
        "0",
        "0",
        "0",
        "0",
    ])?;
    v["formatted"]["value"]
        .as_u64()
        .map(|n| n as u32)
        .with_context(|| format!("no value in {v}"))
}

/// What a build with layout `version` records.
fn stamp_layout(pins: &Path, version: u32) -> Result<()> {
    let b = version.to_ne_bytes().map(|b| b.to_string());
    sh(&[
        "bpftool",
        "map",
        "update",
        "pinned",
        pins.join("LAYOUT").to_str().unwrap(),
        "key",
        "0",
        "0",
        "0",
        "0",
        "value",
        &b[0],
        &b[1],
        &b[2],
        &b[3],
    ])?;
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn maps_of_an_older_layout_are_migrated_and_a_newer_layout_stops_the_agent() -> Result<()> {
    let cluster = Cluster::start("pl", 2, CONFIG)?;
    let Cluster { hosts, etcd, bin } = &cluster;
    let dir = etcd.dir().to_path_buf();
    let bpf1 = Bpffs::mount(dir.join("bpf1"))?;
    let bpf2 = Bpffs::mount(dir.join("bpf2"))?;
    let pins1 = bpf1.0.join("overlay");
    let pins2 = bpf2.0.join("overlay");
    let args = |i: usize, datapath: &str, pins: &Path| {
        let pin_dir = format!("--bpf-pin-dir={}", pins.display());
        cluster.args(i, &[datapath, &pin_dir])
    };
    let args1 = args(1, "--datapath=ebpf", &pins1);
    let mut a1 = Agent::start(&dir, "h1", &hosts.ns(1), bin, &args1)?;
    let _a2 = Agent::start(
        &dir,
        "h2",
        &hosts.ns(2),
        bin,
        &args(2, "--datapath=ebpf", &pins2),
    )?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    let (c1, _) = add_container(hosts, 1, &dir.join("h1.env"))?;
    let mut containers = Containers(vec![c1.clone()]);
    let (c2, ip2) = add_container(hosts, 2, &dir.join("h2.env"))?;
    containers.0.push(c2);
    within(Duration::from_secs(10), "c1 reaches c2", || {
        sh(&["ip", "netns", "exec", &c1, "ping", "-c1", "-W1", &ip2]).is_ok()
    })?;
    // The fast path on the container's veth: its links are swapped too.
    within(Duration::from_secs(5), "the fast path on vc", || {
        links(&pins1).is_ok_and(|l| l.keys().any(|k| k.starts_with("veth_from_pod-")))
    })
    .with_context(|| format!("agent log:\n{}", a1.log()))?;
    ensure!(recorded_layout(&pins1)? == MAP_LAYOUT_VERSION);

    // 1. Pins without a version, as a build from before versions leaves
    // them: the restarted agent migrates, hitlessly.
    let old_maps = map_ids(&pins1)?;
    let old_links = links(&pins1)?;
    let ping = Background::spawn(
        Some(&c1),
        &["ping", "-q", "-i", "0.01", "-c", "800", "-W", "2", &ip2],
    )?;
    std::thread::sleep(Duration::from_secs(1));
    a1.kill9()?;
    std::fs::remove_file(pins1.join("LAYOUT"))?;
    let mut a1 = Agent::start(&dir, "h1-migrated", &hosts.ns(1), bin, &args1)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    let log = a1.log();
    let migrated: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("migrating to new maps"))
        .collect();
    ensure!(
        migrated.len() == 1
            && migrated[0].contains(&pins1.display().to_string())
            && migrated[0].contains("no layout version"),
        "expected one line about the migration:\n{log}"
    );
    eprintln!("migration: {}", migrated[0]);
    let new_maps = map_ids(&pins1)?;
    for (name, id) in &new_maps {
        ensure!(
            !old_maps.values().any(|old| old == id),
            "{name} (id {id}) is a map of the old set: {old_maps:?} -> {new_maps:?}"
        );
    }
    ensure!(recorded_layout(&pins1)? == MAP_LAYOUT_VERSION);
    // The same links (so the hooks were never empty), with new programs;
    // the veth's once the pods are synced after the start.
    within(Duration::from_secs(5), "every link swapped", || {
        links(&pins1).is_ok_and(|now| {
            old_links.iter().all(|(name, (link, prog))| {
                now.get(name).is_some_and(|(l, p)| l == link && p != prog)
            })
        })
    })
    .with_context(|| format!("{old_links:?} -> {:?}\n{}", links(&pins1), a1.log()))?;
    // The old maps go with the old programs, the last ones using them.
    within(Duration::from_secs(5), "the old maps freed", || {
        old_maps
            .values()
            .all(|id| sh(&["bpftool", "map", "show", "id", &id.to_string()]).is_err())
    })?;
    let (sent, received) =
        overlay_tests::traffic::ping_summary(&ping.wait_output(Duration::from_secs(20))?)?;
    ensure!(
        sent == 800 && received == 800,
        "pings lost across the migration: {received}/{sent}"
    );
    let status_args = [
        format!("--etcd-endpoints={}", etcd.endpoints()),
        format!("-iface={}", hosts.ip(1)),
        format!("--bpf-pin-dir={}", pins1.display()),
    ];
    let text = overlay_tests::agent::status(&hosts.ns(1), bin, &status_args)?;
    let subnet2 = overlay_tests::agent::subnet_of(&dir.join("h2.env"))?;
    ensure!(
        text.contains(&format!("{subnet2}/24")),
        "status does not show the peer {subnet2}/24:\n{text}"
    );
    ensure!(!text.contains("maps:"), "{text}");

    // 2. A newer version, as a later build leaves it: `auto` stops with one
    // clear error and touches nothing.
    std::thread::sleep(Duration::from_secs(1));
    a1.kill9()?;
    let newer = MAP_LAYOUT_VERSION + 1;
    stamp_layout(&pins1, newer)?;
    let before = (map_ids(&pins1)?, links(&pins1)?);
    let auto = args(1, "--datapath=auto", &pins1);
    let mut a1 = Agent::start(&dir, "h1-downgraded", &hosts.ns(1), bin, &auto)?;
    within(Duration::from_secs(20), "the agent exits", || {
        a1.exited().is_some()
    })
    .with_context(|| a1.log())?;
    let log = a1.log();
    ensure!(a1.exited() != Some(0), "exited 0:\n{log}");
    let error: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("have layout version {newer}")))
        .collect();
    ensure!(
        error.len() == 1
            && error[0].contains(&pins1.display().to_string())
            && error[0].contains(&format!("this build's {MAP_LAYOUT_VERSION}"))
            && error[0].contains("cleanup")
            && error[0].contains("not falling back"),
        "expected one error naming the pins, both versions and what to do:\n{log}"
    );
    eprintln!("refusal: {}", error[0]);
    ensure!(!log.contains("unavailable, falling back"), "{log}");
    let after = (map_ids(&pins1)?, links(&pins1)?);
    ensure!(
        after == before,
        "the refused start changed the pins: {before:?} -> {after:?}"
    );
    ensure!(recorded_layout(&pins1)? == newer);
    // Still attached, by the kernel's own view of the hook.
    let egress = before.1["vxlan_egress"].1;
    let att = overlay_tests::stats::attachments(&hosts.ns(1))?;
    ensure!(
        att.tcx_on("flannel.1", "egress")
            .iter()
            .any(|p| u64::from(p.id) == egress),
        "vxlan_egress (prog {egress}) is no longer on flannel.1: {att:?}"
    );
    within(Duration::from_secs(5), "c1 still reaches c2", || {
        sh(&["ip", "netns", "exec", &c1, "ping", "-c1", "-W1", &ip2]).is_ok()
    })?;
    let status = Command::new("ip")
        .args(["netns", "exec", &hosts.ns(1)])
        .arg(bin)
        .args([
            format!("--etcd-endpoints={}", etcd.endpoints()),
            format!("-iface={}", hosts.ip(1)),
            format!("--bpf-pin-dir={}", pins1.display()),
            "status".into(),
        ])
        .output()?;
    let err = String::from_utf8_lossy(&status.stderr);
    ensure!(
        !status.status.success()
            && err.contains(&format!("newer than this build's {MAP_LAYOUT_VERSION}")),
        "status read maps of a newer layout:\n{}{err}",
        String::from_utf8_lossy(&status.stdout)
    );
    drop(containers);
    Ok(())
}
