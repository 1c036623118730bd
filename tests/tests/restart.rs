//! Operating the eBPF datapath: pinned state survives the agent, a `kill -9`
//! and a restart (and a restart that swaps in a freshly loaded program) lose
//! no packet between containers, `status` and `bpftool` read the pins while
//! the agent runs and after it stopped, SIGTERM leaves traffic flowing, and
//! `cleanup` removes everything the agent created. The containers appear
//! after the agents started: the fast path follows them by link events, its
//! veth links are pinned and swapped like the others, and most of the pings
//! and the stream take it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use overlay_tests::{
    agent::{Agent, Bpffs, Cluster, Containers, add_container, sh},
    cmd::Background,
};

const CONFIG: &str = r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "SubnetMin": "10.0.1.0","SubnetMax": "10.0.20.0", "Backend": {"Type": "vxlan"}}"#;

fn prog_of_link(pin: &Path) -> Result<u64> {
    let out = sh(&[
        "bpftool",
        "-j",
        "link",
        "show",
        "pinned",
        pin.to_str().unwrap(),
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v["prog_id"]
        .as_u64()
        .with_context(|| format!("no prog_id in {out}"))
}

#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn kill_9_restart_and_upgrade_lose_no_packet_then_cleanup_removes_everything() -> Result<()> {
    let cluster = Cluster::start("rs", 2, CONFIG)?;
    let Cluster { hosts, etcd, bin } = &cluster;
    let dir = etcd.dir().to_path_buf();
    let bpf1 = Bpffs::mount(dir.join("bpf1"))?;
    let bpf2 = Bpffs::mount(dir.join("bpf2"))?;
    let pins1 = bpf1.0.join("overlay");
    let pins2 = bpf2.0.join("overlay");
    let args = |i: usize, pins: &Path| {
        let pin_dir = format!("--bpf-pin-dir={}", pins.display());
        cluster.args(i, &["--datapath=ebpf", "--ip-masq", &pin_dir])
    };
    let (args1, args2) = (args(1, &pins1), args(2, &pins2));
    let mut a1 = Agent::start(&dir, "h1", &hosts.ns(1), bin, &args1)?;
    let mut a2 = Agent::start(&dir, "h2", &hosts.ns(2), bin, &args2)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    a2.wait_for("running: lease", Duration::from_secs(20))?;
    a1.wait_for("1 peer(s) programmed", Duration::from_secs(5))
        .or_else(|_| a1.wait_for("programmed", Duration::from_secs(1)))?;
    let (c1, _) = add_container(hosts, 1, &dir.join("h1.env"))?;
    let mut containers = Containers(vec![c1.clone()]);
    let (c2, ip2) = add_container(hosts, 2, &dir.join("h2.env"))?;
    containers.0.push(c2.clone());
    overlay_tests::agent::within(Duration::from_secs(5), "c1 reaches c2", || {
        sh(&["ip", "netns", "exec", &c1, "ping", "-c1", "-W1", &ip2]).is_ok()
    })?;

    let egress_pin = pins1.join("links/vxlan_egress");
    let ingress_pin = pins1.join("links/vxlan_ingress_tc");
    let first = (prog_of_link(&egress_pin)?, prog_of_link(&ingress_pin)?);
    // The pod veth `vc` appeared after the agent started: the link events
    // brought the fast path to it, pinned under its ifindex.
    let vc = sh(&["ip", "-n", &hosts.ns(1), "-o", "link", "show", "vc"])?;
    let vc_index = vc.split(':').next().unwrap_or_default().trim().to_owned();
    let veth_pin = pins1.join(format!("links/veth_from_pod-{vc_index}"));
    overlay_tests::agent::within(Duration::from_secs(5), "the fast path on vc", || {
        veth_pin.exists() && pins1.join(format!("links/veth_to_pod-{vc_index}")).exists()
    })
    .with_context(|| format!("agent log:\n{}", a1.log()))?;
    let veth_first = prog_of_link(&veth_pin)?;

    // 100 pings/s for 24 s and a TCP stream for 20 s, across everything below.
    let ping = Background::spawn(
        Some(&c1),
        &["ping", "-q", "-i", "0.01", "-c", "2400", "-W", "2", &ip2],
    )?;
    let server = Background::spawn(Some(&c2), &["iperf3", "-s", "-1", "-B", &ip2])?;
    std::thread::sleep(Duration::from_millis(300));
    let client = Background::spawn(
        Some(&c1),
        &[
            "iperf3", "-c", &ip2, "-t", "20", "-i", "1", "-J", "-b", "200M",
        ],
    )?;

    // 1. kill -9 and restart: the programs stay attached through the pins.
    std::thread::sleep(Duration::from_secs(3));
    a1.kill9()?;
    ensure!(
        prog_of_link(&egress_pin)? == first.0,
        "the pinned egress link lost its program when the agent died"
    );
    std::thread::sleep(Duration::from_secs(2));
    let mut a1 = Agent::start(&dir, "h1-restarted", &hosts.ns(1), bin, &args1)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    ensure!(
        a1.log()
            .contains("vxlan_egress: swapped into the pinned link"),
        "the restarted agent did not take over the pinned links:\n{}",
        a1.log()
    );
    let second = (prog_of_link(&egress_pin)?, prog_of_link(&ingress_pin)?);
    ensure!(
        second.0 != first.0 && second.1 != first.1,
        "the links still run the old programs: {first:?} -> {second:?}"
    );
    let veth_second = prog_of_link(&veth_pin)?;
    ensure!(
        veth_second != veth_first,
        "the pod veth's pinned link still runs the old program {veth_first}"
    );

    // 2. An upgrade: kill -9 again, start with the rebuilt object.
    std::thread::sleep(Duration::from_secs(3));
    a1.kill9()?;
    let object = overlay_tests::binaries::ebpf_object()?;
    let mut upgrade_args = args1.clone();
    upgrade_args.push(format!("--bpf-object={}", object.display()));
    let mut a1 = Agent::start(&dir, "h1-upgraded", &hosts.ns(1), bin, &upgrade_args)?;
    a1.wait_for("running: lease", Duration::from_secs(20))?;
    let third = (prog_of_link(&egress_pin)?, prog_of_link(&ingress_pin)?);
    ensure!(third.0 != second.0, "the upgrade did not swap the program");
    let prog_of_veth_after_upgrade = prog_of_link(&veth_pin)?;
    ensure!(
        prog_of_veth_after_upgrade != veth_second,
        "the upgrade did not swap the pod veth's program"
    );
    // 3. The other side restarts too.
    std::thread::sleep(Duration::from_secs(2));
    a2.kill9()?;
    let mut a2 = Agent::start(&dir, "h2-restarted", &hosts.ns(2), bin, &args2)?;
    a2.wait_for("running: lease", Duration::from_secs(20))?;

    let ping_out = ping.wait_output(Duration::from_secs(40))?;
    let sent_received = ping_out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .with_context(|| format!("no ping summary:\n{ping_out}"))?
        .to_owned();
    let nums: Vec<u64> = sent_received
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(2)
        .map(|s| s.parse().unwrap())
        .collect();
    ensure!(
        nums == [2400, 2400],
        "pings lost across the restarts: {sent_received}"
    );
    let iperf = client.wait_output(Duration::from_secs(30))?;
    drop(server);
    let report: serde_json::Value =
        serde_json::from_str(&iperf).with_context(|| format!("iperf3 -J output:\n{iperf}"))?;
    let intervals = report["intervals"].as_array().context("no intervals")?;
    ensure!(intervals.len() >= 19, "the stream stopped early: {iperf}");
    for (k, iv) in intervals.iter().enumerate() {
        let bytes = iv["sum"]["bytes"].as_u64().unwrap_or(0);
        ensure!(bytes > 0, "second {k} of the TCP stream carried nothing");
    }
    eprintln!(
        "no loss: {sent_received}; TCP {} bytes in {} one-second intervals; programs {first:?} -> {second:?} -> {third:?}",
        report["end"]["sum_received"]["bytes"],
        intervals.len()
    );

    // 4. status and bpftool read the pins while the agent runs...
    let status_args = [
        format!("--etcd-endpoints={}", etcd.endpoints()),
        format!("-iface={}", hosts.ip(1)),
        format!("--bpf-pin-dir={}", pins1.display()),
    ];
    let status = |what: &str| -> Result<String> {
        overlay_tests::agent::status(&hosts.ns(1), bin, &status_args)
            .with_context(|| format!("status ({what})"))
    };
    let running = status("agent running")?;
    ensure!(
        running.contains(
            "host firewall (nft table inet overlay-vtep): drop_unknown_vtep 0 packets, drop_spoofed_source 0 packets"
        ),
        "status lacks the host firewall's drop counters:\n{running}"
    );
    let subnet2 = overlay_tests::agent::subnet_of(&dir.join("h2.env"))?;
    let peer_line = running
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{subnet2}/24")))
        .with_context(|| format!("no peer {subnet2}/24 in status:\n{running}"))?;
    let cols: Vec<&str> = peer_line.split_whitespace().collect();
    let tx: u64 = cols[3].parse()?;
    let rx: u64 = cols[5].parse()?;
    ensure!(
        tx >= 2400 && rx >= 2400,
        "per-peer counters did not count the pings: {peer_line}"
    );
    let fast_egress = running
        .lines()
        .find(|l| l.trim_start().starts_with("fast_egress"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse::<u64>().ok())
        .with_context(|| {
            format!(
                "no fast_egress counter in status:
{running}"
            )
        })?;
    ensure!(
        fast_egress >= 2000,
        "the pings and the stream hardly took the fast path (fast_egress {fast_egress}):\n{running}"
    );
    ensure!(
        running.contains(&format!("veth_from_pod-{vc_index}")),
        "{running}"
    );
    ensure!(running.contains("expires in"), "{running}");
    ensure!(running.contains("vxlan_egress"), "{running}");
    let dump = sh(&[
        "bpftool",
        "-j",
        "map",
        "dump",
        "pinned",
        pins1.join("REMOTE_SUBNETS").to_str().unwrap(),
    ])?;
    let entries: serde_json::Value = serde_json::from_str(&dump)?;
    let entry = &entries[0]["formatted"];
    ensure!(
        entry["value"]["public_ip"].is_array() && entry["value"]["vtep_mac"].is_array(),
        "bpftool shows no named fields: {dump}"
    );
    // The README's other inspection commands.
    let stats = sh(&[
        "bpftool",
        "-j",
        "map",
        "dump",
        "pinned",
        pins1.join("PEER_STATS").to_str().unwrap(),
    ])?;
    let stats: serde_json::Value = serde_json::from_str(&stats)?;
    let per_cpu = stats[0]["formatted"]["values"]
        .as_array()
        .context("PEER_STATS has no per-CPU values")?;
    let tx_total: u64 = per_cpu
        .iter()
        .map(|v| v["value"]["tx_packets"].as_u64().unwrap_or(0))
        .sum();
    ensure!(tx_total >= 2400, "bpftool's PEER_STATS: {stats}");
    let link = sh(&[
        "bpftool",
        "-j",
        "link",
        "show",
        "pinned",
        egress_pin.to_str().unwrap(),
    ])?;
    // This bpftool prints BPF_LINK_TYPE_TCX as its number, newer ones as "tcx".
    let link: serde_json::Value = serde_json::from_str(&link)?;
    ensure!(
        link["type"] == "tcx" || link["type"] == 11,
        "not a TCX link: {link}"
    );
    ensure!(link["prog_id"] == third.0, "{link}");

    // 5. SIGTERM leaves the datapath in place: traffic still flows.
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(a1.child.id() as i32, libc::SIGTERM) };
    a1.child.wait()?;
    let after_stop = sh(&[
        "ip", "netns", "exec", &c1, "ping", "-c", "20", "-i", "0.05", "-W", "1", &ip2,
    ])?;
    ensure!(
        after_stop.contains("20 received"),
        "traffic stopped with the agent:\n{after_stop}"
    );
    let stopped = status("agent stopped")?;
    ensure!(stopped.contains(&format!("{subnet2}/24")), "{stopped}");

    // 6. cleanup removes programs, pins, device, routes and rules.
    let out = Command::new("ip")
        .args(["netns", "exec", &hosts.ns(1)])
        .arg(bin)
        .args([
            format!("--etcd-endpoints={}", etcd.endpoints()),
            format!("--bpf-pin-dir={}", pins1.display()),
            "cleanup".into(),
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "cleanup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let h1 = hosts.ns(1);
    let left_links = sh(&["ip", "-n", &h1, "-d", "link"])?;
    ensure!(!left_links.contains("flannel.1"), "{left_links}");
    ensure!(!left_links.contains("vxlan"), "{left_links}");
    let routes = sh(&["ip", "-n", &h1, "route"])?;
    ensure!(!routes.contains("flannel"), "{routes}");
    let neigh = sh(&["ip", "-n", &h1, "neigh", "show", "nud", "permanent"])?;
    ensure!(neigh.trim().is_empty(), "neighbour entries left: {neigh}");
    let fdb = sh(&["ip", "netns", "exec", &h1, "bridge", "fdb", "show"])?;
    ensure!(!fdb.contains("flannel"), "{fdb}");
    // progs.debug and maps.debug are the kernel's own (bpf_preload).
    let left: Vec<PathBuf> = fs::read_dir(&bpf1.0)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()?
        .into_iter()
        .filter(|p| p.extension().is_none_or(|e| e != "debug"))
        .collect();
    ensure!(
        left.is_empty(),
        "pins left: {left:?}; cleanup said:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for id in [third.0, third.1, prog_of_veth_after_upgrade] {
        ensure!(
            sh(&["bpftool", "prog", "show", "id", &id.to_string()]).is_err(),
            "program {id} is still loaded"
        );
    }
    let eth0 = sh(&[
        "ip", "netns", "exec", &h1, "bpftool", "net", "show", "dev", "eth0",
    ])?;
    ensure!(!eth0.contains("vxlan_"), "{eth0}");
    let nat = sh(&["ip", "netns", "exec", &h1, "iptables", "-t", "nat", "-S"])?;
    let filter = sh(&["ip", "netns", "exec", &h1, "iptables", "-S"])?;
    let mangle = sh(&["ip", "netns", "exec", &h1, "iptables", "-t", "mangle", "-S"])?;
    ensure!(
        !nat.contains("FLANNEL") && !filter.contains("FLANNEL") && !mangle.contains("FLANNEL"),
        "rules left:\n{nat}\n{filter}\n{mangle}"
    );
    // Nothing on any interface, the pod veth included, by the kernel's TCX
    // query (this bpftool cannot list TCX links), iproute2 and bpftool.
    let att = overlay_tests::stats::attachments(&h1)?;
    ensure!(att.is_empty(), "programs left after cleanup: {att:?}");
    drop(a2);
    drop(containers);
    Ok(())
}
