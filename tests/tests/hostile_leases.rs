//! Impossible leases written into etcd next to good ones never reach the
//! datapath, on either datapath: PublicIPs no VTEP can have, a multicast or
//! zero VtepMAC, subnets outside the network or of another size, another
//! VNI. Each is logged once with its key and reason, counted in
//! `overlay_leases_rejected{reason}`, listed by `status`, and never retried;
//! containers on the two healthy nodes keep talking, entries removed from
//! outside are programmed again, and a lease mended in place is programmed.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use overlay_tests::{
    agent::{Agent, Bpffs, Cluster, Containers, add_container, sh, within},
    http::{sample, scrape},
};

const CONFIG: &str = r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "SubnetMin": "10.0.1.0","SubnetMax": "10.0.20.0", "Backend": {"Type": "vxlan"}}"#;
const PORT: u16 = 9872;
const PREFIX: &str = "/coreos.com/network/subnets";
const MAC: &str = "0a:bb:cc:dd:ee:01";

fn lease(public_ip: &str, mac: &str, vni: u32) -> String {
    format!(
        r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":{vni},"VtepMAC":"{mac}"}}}}"#
    )
}

/// (key suffix, value, reason label, what must not appear in the kernel).
fn hostile() -> Vec<(&'static str, String, &'static str, &'static str)> {
    vec![
        (
            "10.0.30.0-24",
            lease("0.0.0.0", MAC, 1),
            "public_ip",
            "10.0.30.0",
        ),
        (
            "10.0.31.0-24",
            lease("255.255.255.255", MAC, 1),
            "public_ip",
            "10.0.31.0",
        ),
        (
            "10.0.32.0-24",
            lease("127.0.0.1", MAC, 1),
            "public_ip",
            "10.0.32.0",
        ),
        (
            "10.0.33.0-24",
            lease("224.0.0.1", MAC, 1),
            "public_ip",
            "10.0.33.0",
        ),
        (
            "10.0.34.0-24",
            lease("10.98.0.77", "01:00:5e:00:00:01", 1),
            "vtep_mac",
            "10.0.34.0",
        ),
        (
            "10.0.35.0-24",
            lease("10.98.0.78", "00:00:00:00:00:00", 1),
            "vtep_mac",
            "10.0.35.0",
        ),
        (
            "172.16.0.0-24",
            lease("10.98.0.79", MAC, 1),
            "outside_network",
            "172.16.0.0",
        ),
        (
            "10.0.0.0-16",
            lease("10.98.0.80", MAC, 1),
            "prefix_len",
            "10.0.0.0/16",
        ),
        (
            "10.0.36.0-25",
            lease("10.98.0.81", MAC, 1),
            "prefix_len",
            "10.0.36.0",
        ),
        (
            "10.0.37.0-24",
            lease("10.98.0.82", MAC, 7),
            "vni",
            "10.0.37.0",
        ),
    ]
}

#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn impossible_leases_are_rejected_once_and_healthy_peers_keep_working() -> Result<()> {
    let cluster = Cluster::start("hl", 2, CONFIG)?;
    let Cluster { hosts, etcd, bin } = &cluster;
    let dir = etcd.dir().to_path_buf();
    let bpf = Bpffs::mount(dir.join("bpf1"))?;
    let pins = bpf.0.join("overlay");
    let pin_dir = format!("--bpf-pin-dir={}", pins.display());
    let health = |i: usize| {
        vec![
            format!("--healthz-ip={}", hosts.ip(i)),
            format!("--healthz-port={PORT}"),
        ]
    };
    let mut args1 = cluster.args(1, &["--datapath=ebpf", &pin_dir, "--recheck-interval=1s"]);
    args1.extend(health(1));
    let mut args2 = cluster.args(2, &["--datapath=kernel", "--recheck-interval=1s"]);
    args2.extend(health(2));
    let mut a1 = Agent::start(&dir, "h1", &hosts.ns(1), bin, &args1)?;
    let mut a2 = Agent::start(&dir, "h2", &hosts.ns(2), bin, &args2)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    a2.wait_for("running: lease", Duration::from_secs(20))?;
    let (c1, _) = add_container(hosts, 1, &dir.join("h1.env"))?;
    let mut containers = Containers(vec![c1.clone()]);
    let (c2, ip2) = add_container(hosts, 2, &dir.join("h2.env"))?;
    containers.0.push(c2.clone());
    within(Duration::from_secs(5), "c1 reaches c2", || {
        sh(&["ip", "netns", "exec", &c1, "ping", "-c1", "-W1", &ip2]).is_ok()
    })?;

    for (key, value, ..) in hostile() {
        etcd.put(&format!("{PREFIX}/{key}"), &value)?;
    }
    // A good lease written after them: once it is programmed, the bad ones
    // before it have been seen.
    etcd.put(
        &format!("{PREFIX}/10.0.40.0-24"),
        &lease("10.98.0.40", "0a:bb:cc:dd:ee:40", 1),
    )?;
    for (i, a) in [(1, &mut a1), (2, &mut a2)] {
        within(
            Duration::from_secs(5),
            "the good lease is programmed",
            || sh(&["ip", "-n", &hosts.ns(i), "route"]).is_ok_and(|r| r.contains("10.0.40.0/24")),
        )?;
        // Several resyncs later, each bad key was still logged only once.
        std::thread::sleep(Duration::from_millis(if i == 1 { 3000 } else { 0 }));
        let log = a.log();
        for (key, _, label, _) in hostile() {
            let lines = log
                .lines()
                .filter(|l| l.contains("rejecting lease") && l.contains(&format!("/{key} ")))
                .count();
            ensure!(
                lines == 1,
                "host {i}: {key} ({label}) logged {lines} times:\n{log}"
            );
        }
        let routes = sh(&["ip", "-n", &hosts.ns(i), "route"])?;
        let fdb = sh(&[
            "bridge",
            "-n",
            &hosts.ns(i),
            "fdb",
            "show",
            "dev",
            "flannel.1",
        ])?;
        let neigh = sh(&[
            "ip",
            "-n",
            &hosts.ns(i),
            "neigh",
            "show",
            "dev",
            "flannel.1",
        ])?;
        for (key, _, _, absent) in hostile() {
            ensure!(
                !routes.contains(absent),
                "host {i}: {key} got a route:\n{routes}"
            );
            ensure!(
                !neigh.contains(absent.split('/').next().unwrap_or(absent)),
                "host {i}: {key} got a neighbour:\n{neigh}"
            );
        }
        for ip in [
            "0.0.0.0",
            "255.255.255.255",
            "127.0.0.1",
            "224.0.0.1",
            "10.98.0.77",
        ] {
            ensure!(
                !fdb.contains(&format!("dst {ip} ")),
                "host {i}: FDB entry to {ip}:\n{fdb}"
            );
        }
        let m = scrape(&hosts.ns(i), &hosts.ip(i), PORT)?;
        for (label, n) in [
            ("public_ip", 4.0),
            ("vtep_mac", 2.0),
            ("outside_network", 1.0),
            ("prefix_len", 2.0),
            ("vni", 1.0),
        ] {
            let got = sample(
                &m,
                &format!("overlay_leases_rejected{{reason=\"{label}\"}}"),
            )?;
            ensure!(got == n, "host {i}: {label}: {got} rejected, expected {n}");
        }
    }
    // The eBPF datapath's trusted VTEPs hold none of them.
    let status = sh(&[
        "ip",
        "netns",
        "exec",
        &hosts.ns(1),
        bin.to_str().unwrap_or_default(),
        &format!("--etcd-endpoints={}", etcd.endpoints()),
        &format!("-iface={}", hosts.ip(1)),
        &pin_dir,
        "status",
    ])?;
    for (key, _, label, _) in hostile() {
        ensure!(
            status.contains(&format!("{PREFIX}/{key}: ")) && status.contains(label),
            "status does not list {key}:\n{status}"
        );
    }
    for ip in ["0.0.0.0", "255.255.255.255", "127.0.0.1", "224.0.0.1"] {
        ensure!(
            !status
                .lines()
                .any(|l| l.contains(&format!(" {ip} ")) && !l.contains("rejected")),
            "status shows a peer at {ip}:\n{status}"
        );
    }
    sh(&[
        "ip", "netns", "exec", &c1, "ping", "-c3", "-i0.2", "-W1", &ip2,
    ])?;

    let digest = overlay_tests::traffic::tcp_transfer(
        &c1,
        &c2,
        ip2.parse::<std::net::Ipv4Addr>()?,
        5201,
        4 << 20,
    )?;
    eprintln!("c1 -> c2 next to the bad leases: {digest:?}");

    // A lease overlapping a good peer's subnet (and its neighbour address)
    // is rejected; once it is gone the good peer is still fully programmed.
    etcd.put(
        &format!("{PREFIX}/10.0.40.0-25"),
        &lease("10.98.0.41", "0a:bb:cc:dd:ee:41", 1),
    )?;
    a1.wait_for("/10.0.40.0-25 ", Duration::from_secs(5))?;
    a2.wait_for("/10.0.40.0-25 ", Duration::from_secs(5))?;
    etcd.delete(&format!("{PREFIX}/10.0.40.0-25"))?;
    std::thread::sleep(Duration::from_millis(500));
    for i in [1, 2] {
        let ns = hosts.ns(i);
        let neigh = sh(&["ip", "-n", &ns, "neigh", "show", "dev", "flannel.1"])?;
        let fdb = sh(&["bridge", "-n", &ns, "fdb", "show", "dev", "flannel.1"])?;
        ensure!(
            neigh.contains("10.0.40.0 lladdr 0a:bb:cc:dd:ee:40 PERMANENT")
                && fdb.contains("0a:bb:cc:dd:ee:40 dst 10.98.0.40")
                && !fdb.contains("10.98.0.41"),
            "host {i}: the good peer's entries after the overlap:\n{neigh}\n{fdb}"
        );
    }

    // Entries removed from outside are programmed again (drift repair).
    for i in [1, 2] {
        let ns = hosts.ns(i);
        sh(&[
            "ip",
            "-n",
            &ns,
            "neigh",
            "del",
            "10.0.40.0",
            "dev",
            "flannel.1",
        ])?;
        sh(&[
            "bridge",
            "-n",
            &ns,
            "fdb",
            "del",
            "0a:bb:cc:dd:ee:40",
            "dev",
            "flannel.1",
            "dst",
            "10.98.0.40",
        ])?;
        within(
            Duration::from_secs(5),
            "the removed entries come back",
            || {
                sh(&["ip", "-n", &ns, "neigh", "show", "dev", "flannel.1"])
                    .is_ok_and(|n| n.contains("10.0.40.0 lladdr 0a:bb:cc:dd:ee:40"))
                    && sh(&["bridge", "-n", &ns, "fdb", "show", "dev", "flannel.1"])
                        .is_ok_and(|f| f.contains("0a:bb:cc:dd:ee:40 dst 10.98.0.40"))
            },
        )?;
    }

    // Mended in place: programmed at once.
    etcd.put(
        &format!("{PREFIX}/10.0.34.0-24"),
        &lease("10.98.0.77", "0a:bb:cc:dd:ee:34", 1),
    )?;
    within(
        Duration::from_secs(5),
        "the mended lease is programmed",
        || sh(&["ip", "-n", &hosts.ns(1), "route"]).is_ok_and(|r| r.contains("10.0.34.0/24")),
    )?;
    within(Duration::from_secs(5), "the metric drops to one", || {
        scrape(&hosts.ns(1), &hosts.ip(1), PORT)
            .and_then(|m| sample(&m, "overlay_leases_rejected{reason=\"vtep_mac\"}"))
            .is_ok_and(|n| n == 1.0)
    })?;
    drop((a1, a2));
    drop(containers);
    Ok(())
}

/// No lease is taken for a config or a flag the host cannot use, and a
/// start that fails after taking one releases it and removes the device it
/// created: the agent names what is wrong (and waits for a config it
/// cannot serve to change, or stops on a bad flag), and etcd holds no lease
/// and the host no device.
#[test]
#[ignore = "needs root, network namespaces and etcd: run `cargo xtask test`"]
fn a_start_that_cannot_succeed_takes_no_lease() -> Result<()> {
    let cluster = Cluster::without_config("hn", 1)?;
    let Cluster { hosts, etcd, bin } = &cluster;
    let dir = etcd.dir().to_path_buf();
    let not_a_dir = dir.join("a-file");
    std::fs::write(&not_a_dir, "")?;
    let bad_subnet_file = format!("--subnet-file={}", not_a_dir.join("subnet.env").display());
    let cases: [(&str, &str, Vec<String>, &str); 3] = [
        (
            "vni",
            r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "Backend": {"Type": "vxlan", "VNI": 16777215}}"#,
            cluster.args(1, &["--datapath=kernel"]),
            "flannel.16777215 is longer than 15 bytes",
        ),
        (
            "subnet-file",
            CONFIG,
            cluster
                .args(1, &["--datapath=kernel"])
                .into_iter()
                .map(|a| {
                    if a.starts_with("--subnet-file=") {
                        bad_subnet_file.clone()
                    } else {
                        a
                    }
                })
                .collect(),
            "cannot write there",
        ),
        // Fails after the lease and the device: both go again.
        (
            "ebpf-object",
            CONFIG,
            cluster.args(1, &["--datapath=ebpf", "--bpf-object=/nonexistent/overlay"]),
            "released lease",
        ),
    ];
    for (name, config, args, why) in cases {
        etcd.put("/coreos.com/network/config", config)?;
        let mut a = Agent::start(&dir, name, &hosts.ns(1), bin, &args)?;
        within(Duration::from_secs(15), "the agent says why", || {
            a.exited().is_some() || a.log().contains(why)
        })?;
        // A config the kernel cannot serve is waited out like a malformed
        // one (no crash loop under a supervisor); a bad flag stops the agent.
        let waits = name == "vni";
        if waits {
            std::thread::sleep(Duration::from_secs(2));
        } else {
            within(Duration::from_secs(15), "the agent exits", || {
                a.exited().is_some()
            })?;
        }
        eprintln!("--- {name}:\n{}", a.log());
        ensure!(
            a.log().contains(why)
                && if waits {
                    a.exited().is_none()
                } else {
                    a.exited().is_some_and(|c| c != 0)
                },
            "{name}: exit {:?}, expected {} saying {why:?}:\n{}",
            a.exited(),
            if waits { "a wait" } else { "an error" },
            a.log()
        );
        let leases = etcd.etcdctl(&["get", "--prefix", "--keys-only", PREFIX])?;
        ensure!(
            leases.trim().is_empty(),
            "{name}: a lease was left in etcd: {leases}"
        );
        let links = sh(&["ip", "-n", &hosts.ns(1), "-o", "link", "show"])?;
        ensure!(
            !links.contains("flannel."),
            "{name}: a device was left: {links}"
        );
    }
    Ok(())
}

/// 500 leases written in one burst, with five impossible ones among them:
/// every good one is programmed exactly once on both datapaths, the bad
/// ones nowhere.
#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn a_burst_of_500_leases_with_bad_ones_among_them() -> Result<()> {
    // The agents take 10.1.x.0/24, away from the burst's 10.200 and up (a
    // random pick there would collide with a lease, or be counted below).
    const WIDE: &str = r#"{"Network": "10.0.0.0/8", "SubnetLen": 24, "SubnetMin": "10.1.0.0", "SubnetMax": "10.1.255.0", "Backend": {"Type": "vxlan"}}"#;
    let cluster = Cluster::start("hb", 2, WIDE)?;
    let Cluster { hosts, etcd, bin } = &cluster;
    let dir = etcd.dir().to_path_buf();
    let bpf = Bpffs::mount(dir.join("bpf1"))?;
    let pin_dir = format!("--bpf-pin-dir={}", bpf.0.join("overlay").display());
    let mut a1 = Agent::start(
        &dir,
        "h1",
        &hosts.ns(1),
        bin,
        &cluster.args(1, &["--datapath=ebpf", &pin_dir]),
    )?;
    let mut a2 = Agent::start(
        &dir,
        "h2",
        &hosts.ns(2),
        bin,
        &cluster.args(2, &["--datapath=kernel"]),
    )?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    a2.wait_for("running: lease", Duration::from_secs(20))?;
    // 10.200.<i>.0/24 for the good ones, PublicIP 10.99.<i / 250>.<i % 250 + 1>.
    let mut puts: Vec<(String, String)> = (0..500u32)
        .map(|i| {
            (
                format!("{PREFIX}/10.{}.{}.0-24", 200 + i / 256, i % 256),
                lease(
                    &format!("10.99.{}.{}", i / 250, i % 250 + 1),
                    &format!("0a:00:00:00:{:02x}:{:02x}", i / 256, i % 256),
                    1,
                ),
            )
        })
        .collect();
    let bad = [
        ("10.210.0.0-24", lease("0.0.0.0", MAC, 1)),
        ("10.210.1.0-24", lease("127.0.0.1", MAC, 1)),
        ("10.210.2.0-24", lease("10.99.9.9", "01:00:5e:00:00:01", 1)),
        ("10.210.3.0-25", lease("10.99.9.10", MAC, 1)),
        ("172.16.0.0-24", lease("10.99.9.11", MAC, 1)),
    ];
    for (k, (key, value)) in bad.iter().enumerate() {
        puts.insert(100 * k + 50, (format!("{PREFIX}/{key}"), value.clone()));
    }
    let opts = etcd.options("/coreos.com/network");
    overlay_tests::netns::run_async_in(&hosts.ns(1), move || async move {
        let reg = overlay_agent::subnet::etcd::Registry::connect(&opts).await?;
        let mut client = reg.client();
        for (key, value) in puts {
            client.put(key, value, None).await?;
        }
        anyhow::Ok(())
    })?;
    let count = |i: usize| -> usize {
        sh(&[
            "ip",
            "-n",
            &hosts.ns(i),
            "route",
            "show",
            "dev",
            "flannel.1",
        ])
        .map(|r| r.lines().filter(|l| l.starts_with("10.20")).count())
        .unwrap_or(0)
    };
    for i in [1, 2] {
        within(Duration::from_secs(20), "500 routes", || count(i) >= 500)
            .with_context(|| format!("host {i}: {} routes", count(i)))?;
        let routes = sh(&[
            "ip",
            "-n",
            &hosts.ns(i),
            "route",
            "show",
            "dev",
            "flannel.1",
        ])?;
        ensure!(count(i) == 500, "host {i}: {} routes", count(i));
        for absent in ["10.210.", "172.16.0.0"] {
            ensure!(
                !routes.contains(absent),
                "host {i}: a bad lease got a route:\n{routes}"
            );
        }
        let fdb = sh(&[
            "bridge",
            "-n",
            &hosts.ns(i),
            "fdb",
            "show",
            "dev",
            "flannel.1",
        ])?;
        let vteps = fdb.lines().filter(|l| l.contains(" dst 10.99.")).count();
        ensure!(vteps == 500, "host {i}: {vteps} FDB entries, expected 500");
    }
    let log = a1.log();
    for (key, _) in bad {
        let n = log
            .lines()
            .filter(|l| l.contains("rejecting lease") && l.contains(&format!("/{key} ")))
            .count();
        ensure!(n == 1, "{key} logged {n} times");
    }
    drop((a1, a2));
    Ok(())
}
