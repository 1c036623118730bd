//! The agent's health endpoints and systemd readiness, end to end: `/healthz`
//! answers from the start, `/readyz` only once the lease is held and the
//! datapath programmed (and says why not before), `READY=1` reaches
//! `NOTIFY_SOCKET` after subnet.env is written, and `/metrics` moves with
//! traffic: counters by reason, per-peer packets (with
//! `FLANNELD_METRICS_PER_PEER`; an eBPF agent without it has no per-peer
//! series), peers, lease, etcd, mode.

use std::{
    os::unix::net::UnixDatagram,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, ensure};
use overlay_tests::{
    agent::{Agent, Cluster, sh, subnet_of, within},
    http::{get, sample, scrape},
    netns,
};

const CONFIG: &str = r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "SubnetMin": "10.0.1.0","SubnetMax": "10.0.20.0", "Backend": {"Type": "vxlan"}}"#;
const PORT: u16 = 9871;

#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn readiness_notification_and_metrics_follow_the_agent() -> Result<()> {
    let cluster = Cluster::without_config("hm", 3)?;
    let dir = cluster.etcd.dir().to_path_buf();
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path)?;
    notify.set_read_timeout(Some(Duration::from_secs(30)))?;
    let args = |i: usize, datapath: &str| -> Vec<String> {
        let health = [
            format!("--datapath={datapath}"),
            format!("--healthz-ip={}", cluster.hosts.ip(i)),
            format!("--healthz-port={PORT}"),
        ];
        cluster.args(i, &health.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let (args1, args2, args3) = (args(1, "ebpf"), args(2, "kernel"), args(3, "ebpf"));
    let Cluster { hosts, etcd, bin } = cluster;
    let (h1, ip1) = (hosts.ns(1), hosts.ip(1));
    let mut a1 = Agent::start_with_env(
        &dir,
        "h1",
        &h1,
        &bin,
        &args1,
        &[
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
            ("FLANNELD_METRICS_PER_PEER", "true"),
        ],
    )?;
    a1.wait_for("waiting", Duration::from_secs(20))?;

    // Alive but not ready while etcd has no network config.
    within(Duration::from_secs(5), "/healthz answers", || {
        get(&h1, &ip1, PORT, "/healthz").is_ok_and(|(c, b)| c == 200 && b == "flanneld is running")
    })?;
    let (code, body) = get(&h1, &ip1, PORT, "/readyz")?;
    ensure!(
        code == 503 && body == "not ready: waiting for the network config in etcd",
        "/readyz before the config: {code} {body}"
    );
    ensure!(sample(&scrape(&h1, &ip1, PORT)?, "overlay_ready")? == 0.0);

    // The config arrives: READY=1 comes after subnet.env is written.
    etcd.put("/coreos.com/network/config", CONFIG)?;
    let mut buf = [0u8; 256];
    let n = notify
        .recv(&mut buf)
        .with_context(|| format!("no READY=1 from the agent:\n{}", a1.log()))?;
    let env1 = dir.join("h1.env");
    ensure!(
        env1.exists(),
        "READY=1 arrived before subnet.env was written"
    );
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    ensure!(
        msg.starts_with("READY=1\nSTATUS=lease 10.0."),
        "notification: {msg:?}"
    );
    let (code, body) = get(&h1, &ip1, PORT, "/readyz")?;
    ensure!(code == 200 && body == "ready", "/readyz: {code} {body}");

    // A second node (no NOTIFY_SOCKET: it just runs).
    let mut a2 = Agent::start(&dir, "h2", &hosts.ns(2), &bin, &args2)?;
    a2.wait_for("running: lease", Duration::from_secs(20))?;
    within(Duration::from_secs(5), "h1 programs its peer", || {
        scrape(&h1, &ip1, PORT)
            .and_then(|m| sample(&m, "overlay_peers_programmed"))
            .is_ok_and(|v| v == 1.0)
    })?;
    let subnet2 = subnet_of(&dir.join("h2.env"))?;
    let peer_label = format!("{{subnet=\"{subnet2}/24\",public_ip=\"{}\"}}", hosts.ip(2));

    let before = scrape(&h1, &ip1, PORT)?;
    let pings = 20;
    sh(&[
        "ip", "netns", "exec", &h1, "ping", "-c", "20", "-i", "0.05", "-W", "1", &subnet2,
    ])?;
    std::thread::sleep(Duration::from_millis(1500)); // one refresh tick
    let after = scrape(&h1, &ip1, PORT)?;
    let grew = |name: &str| -> Result<f64> {
        Ok(sample(&after, name)? - before.get(name).copied().unwrap_or(0.0))
    };
    for name in [
        "overlay_datapath_packets_total{reason=\"encapsulated\"}".to_owned(),
        "overlay_datapath_packets_total{reason=\"decapsulated\"}".to_owned(),
        format!("overlay_peer_tx_packets_total{peer_label}"),
        format!("overlay_peer_rx_packets_total{peer_label}"),
    ] {
        let d = grew(&name)?;
        ensure!(
            d >= f64::from(pings),
            "{name} grew by {d} for {pings} pings"
        );
    }
    ensure!(grew("overlay_datapath_bytes_total{reason=\"encapsulated\"}")? >= 20.0 * 98.0);
    ensure!(sample(&after, "overlay_ready")? == 1.0);
    ensure!(sample(&after, "overlay_datapath_mode{mode=\"ebpf\"}")? == 1.0);
    ensure!(sample(&after, "overlay_datapath_mode{mode=\"kernel\"}")? == 0.0);
    ensure!(sample(&after, "overlay_etcd_connected")? == 1.0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as f64;
    let expiry = sample(&after, "overlay_lease_expiry_timestamp_seconds")?;
    ensure!(
        expiry > now + 3600.0,
        "lease expiry {expiry} is not ~24 h after {now}"
    );
    // h2's arrival was a watch event, reconciled once at least.
    ensure!(sample(&after, "overlay_reconcile_duration_seconds_count")? >= 1.0);

    // The host firewall's known-VTEP drops: VXLAN from a stranger's address
    // to a secondary address of h1 (which the programs leave to nft).
    let base: std::net::Ipv4Addr = ip1.parse()?;
    let [a, b, c, _] = base.octets();
    let (secondary, stranger) = (format!("{a}.{b}.{c}.201"), format!("{a}.{b}.{c}.202"));
    sh(&[
        "ip",
        "-n",
        &h1,
        "addr",
        "add",
        &format!("{secondary}/32"),
        "dev",
        "eth0",
    ])?;
    sh(&[
        "ip",
        "-n",
        &hosts.ns(2),
        "addr",
        "add",
        &format!("{stranger}/32"),
        "dev",
        "eth0",
    ])?;
    sh(&[
        "ip",
        "-n",
        &hosts.ns(2),
        "route",
        "add",
        &format!("{secondary}/32"),
        "dev",
        "eth0",
        "src",
        &stranger,
    ])?;
    let guard = "overlay_vtep_guard_drops_total{reason=\"unknown_vtep\"}";
    let before_guard = sample(&scrape(&h1, &ip1, PORT)?, guard)?;
    let (to, from) = (secondary.clone(), stranger.clone());
    netns::run_in(&hosts.ns(2), move || {
        let s = std::net::UdpSocket::bind(format!("{from}:0"))?;
        for _ in 0..3 {
            s.send_to(&[0x08, 0, 0, 0, 0, 0, 1, 0, 0xaa], format!("{to}:8472"))?;
        }
        Ok(())
    })?;
    within(Duration::from_secs(5), "the nft drops in /metrics", || {
        scrape(&h1, &ip1, PORT)
            .and_then(|m| sample(&m, guard))
            .is_ok_and(|v| v >= before_guard + 3.0)
    })?;

    // The kernel datapath has no eBPF counters, and says so by omission.
    let m2 = scrape(&hosts.ns(2), &hosts.ip(2), PORT)?;
    ensure!(sample(&m2, "overlay_datapath_mode{mode=\"kernel\"}")? == 1.0);
    // The host firewall's part is there on both datapaths.
    ensure!(
        sample(&m2, guard).is_ok(),
        "the kernel datapath lacks {guard}"
    );
    ensure!(
        !m2.keys()
            .any(|k| k.starts_with("overlay_datapath_packets_total")),
        "kernel datapath reports eBPF counters"
    );

    // A third node, on the eBPF datapath without per-peer metrics: its
    // totals, none of its two peers' series; h1 (with them) has h3's.
    let mut a3 = Agent::start(&dir, "h3", &hosts.ns(3), &bin, &args3)?;
    a3.wait_for("running: lease", Duration::from_secs(20))?;
    let (h3, ip3) = (hosts.ns(3), hosts.ip(3));
    within(Duration::from_secs(5), "h3 programs its two peers", || {
        scrape(&h3, &ip3, PORT)
            .and_then(|m| sample(&m, "overlay_peers_programmed"))
            .is_ok_and(|v| v == 2.0)
    })?;
    let m3 = scrape(&h3, &ip3, PORT)?;
    ensure!(sample(&m3, "overlay_datapath_mode{mode=\"ebpf\"}")? == 1.0);
    ensure!(
        m3.contains_key("overlay_datapath_packets_total{reason=\"encapsulated\"}"),
        "h3 lacks the totals: {m3:#?}"
    );
    let per_peer: Vec<_> = m3
        .keys()
        .filter(|k| k.starts_with("overlay_peer_"))
        .collect();
    ensure!(
        per_peer.is_empty(),
        "per-peer series without --metrics-per-peer: {per_peer:?}"
    );
    let subnet3 = subnet_of(&dir.join("h3.env"))?;
    let label3 = format!("{{subnet=\"{subnet3}/24\",public_ip=\"{ip3}\"}}");
    within(Duration::from_secs(5), "h1's series of h3", || {
        scrape(&h1, &ip1, PORT).is_ok_and(|m| {
            let h1_per_peer = m.keys().filter(|k| k.starts_with("overlay_peer_")).count();
            h1_per_peer == 2 * 4 && m.contains_key(&format!("overlay_peer_rx_bytes_total{label3}"))
        })
    })?;
    drop(a3);

    // etcd goes away: the watch notices, metrics say so, readiness holds
    // (the datapath keeps working without etcd).
    drop(a2);
    let mut etcd = etcd;
    etcd.stop()?;
    within(Duration::from_secs(15), "etcd_connected drops to 0", || {
        scrape(&h1, &ip1, PORT)
            .and_then(|m| sample(&m, "overlay_etcd_connected"))
            .is_ok_and(|v| v == 0.0)
    })?;
    ensure!(get(&h1, &ip1, PORT, "/readyz")?.0 == 200);
    etcd.start_again()?;
    within(Duration::from_secs(20), "etcd_connected back to 1", || {
        scrape(&h1, &ip1, PORT)
            .and_then(|m| sample(&m, "overlay_etcd_connected"))
            .is_ok_and(|v| v == 1.0)
    })?;
    drop(a1);
    Ok(())
}
