//! `Backend.DirectRouting`, on both datapaths, with strict `rp_filter`
//! everywhere. Host 1 runs our agent (etcd too); host 2 is a flanneld
//! stand-in on the same switch that, as flanneld with DirectRouting, routes
//! our subnet `via` our address on `eth0`; host 3 is a stand-in behind a
//! router namespace (its own underlay, 192.168.60.0/24), so it keeps VXLAN.
//! Then host 3 moves onto the switch and host 2 behind the router (their
//! leases' PublicIP changes) and our entries for them change kind.
//!
//! Checked each time: `ip route`, the neighbour and FDB entries on
//! `flannel.1`, REMOTE_SUBNETS (eBPF, through `overlay-agent status`), ping
//! and a TCP transfer with SHA-256 both ways between containers, and on
//! host 1's `eth0` whether VXLAN crosses.

use std::{net::Ipv4Addr, path::Path, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use ipnet::Ipv4Net;
use overlay_agent::datapath::Peer;
use overlay_tests::{
    agent::{Agent, Bpffs, Cluster, Containers, Hosts, add_container, sh, within},
    capture::{Capture, vxlan_frames},
    etcd::Etcd,
    lab::Host,
    reference::ReferencePeer,
    traffic::tcp_transfer,
};

const CONFIG: &str = r#"{"Network": "10.0.0.0/16", "SubnetLen": 24, "SubnetMin": "10.0.1.0","SubnetMax": "10.0.20.0", "Backend": {"Type": "vxlan", "DirectRouting": true}}"#;
const PREFIX: &str = "/coreos.com/network";
const DIRECT_SUBNET: &str = "10.0.14.0/24";
const ROUTED_SUBNET: &str = "10.0.15.0/24";
/// The router's address on the hosts' switch.
const ROUTER: &str = "10.98.0.254";
const BEHIND: &str = "192.168.60.2";
/// Host 2's address once it has moved behind the router too.
const BEHIND_2: &str = "192.168.61.2";
const VXLAN_PORT: u16 = 8472;
const PAYLOAD_BYTES: u64 = 2 << 20;
/// What the agent logs when the datapath's peers are not as it programmed them.
const DRIFT: &str = "not as programmed";

#[test]
#[ignore = "needs root, network namespaces, etcd and eBPF: run `cargo xtask test`"]
fn direct_routing_on_the_ebpf_datapath() -> Result<()> {
    run("dre", "ebpf")
}

#[test]
#[ignore = "needs root, network namespaces and etcd: run `cargo xtask test`"]
fn direct_routing_on_the_kernel_datapath() -> Result<()> {
    run("drk", "kernel")
}

fn exec(ns: &str, args: &str) -> Result<String> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend(args.split_whitespace());
    sh(&v)
}

/// A namespace deleted on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.0]);
    }
}

fn strict_rp_filter(ns: &str) -> Result<()> {
    for key in ["all", "default"] {
        exec(ns, &format!("sysctl -qw net.ipv4.conf.{key}.rp_filter=1"))?;
    }
    Ok(())
}

fn run(tag: &str, datapath: &str) -> Result<()> {
    let cluster = Cluster::start(tag, 3, CONFIG)?;
    let Cluster { hosts, etcd, bin } = &cluster;
    let dir = etcd.dir().to_path_buf();
    let env = |i: usize| dir.join(format!("h{i}.env"));
    for i in 1..=3 {
        strict_rp_filter(&hosts.ns(i))?;
        exec(&hosts.ns(i), "sysctl -qw net.ipv4.conf.eth0.rp_filter=1")?;
    }

    // Host 3 behind the router: only lan0, default route via the router.
    let router = Netns(format!("{}-rt", hosts.ns(3)));
    put_behind_router(hosts, &router.0)?;

    let direct = StandIn::start(hosts, etcd, 2, "eth0", &hosts.ip(2), DIRECT_SUBNET, &env(2))?;
    let routed = StandIn::start(hosts, etcd, 3, "lan0", BEHIND, ROUTED_SUBNET, &env(3))?;

    let bpf = Bpffs::mount(dir.join("bpf1"))?;
    let pin_dir = format!("--bpf-pin-dir={}", bpf.0.join("overlay").display());
    let mut agent = Agent::start(
        &dir,
        "h1",
        &hosts.ns(1),
        bin,
        &cluster.args(
            1,
            &[
                &format!("--datapath={datapath}"),
                &pin_dir,
                "--recheck-interval=1s",
            ],
        ),
    )?;
    agent.wait_for("running: lease", Duration::from_secs(20))?;
    ensure!(
        agent.log().contains(&format!("({datapath} datapath)")),
        "{}",
        agent.log()
    );
    ensure!(
        !agent.log().contains("DirectRouting"),
        "DirectRouting is still reported as not applied:\n{}",
        agent.log()
    );
    let ours = our_lease(etcd, &[DIRECT_SUBNET, ROUTED_SUBNET])?;
    direct.program_direct(&ours, &hosts.ip(1))?;
    routed.reference.add_peer(&ours)?;
    for i in 1..=3 {
        exec(
            &hosts.ns(i),
            "sysctl -qw net.ipv4.conf.flannel/1.rp_filter=1",
        )?;
    }

    let status = || -> Result<String> {
        sh(&[
            "ip",
            "netns",
            "exec",
            &hosts.ns(1),
            bin.to_str().unwrap_or_default(),
            &format!("--etcd-endpoints={}", etcd.endpoints()),
            &format!("-iface={}", hosts.ip(1)),
            &pin_dir,
            "status",
        ])
    };
    let direct_route = format!("{DIRECT_SUBNET} via {} dev eth0", hosts.ip(2));
    within(Duration::from_secs(10), "both peers programmed", || {
        let r = hosts.routes(1);
        r.contains(&direct_route) && r.contains(&vxlan_route(ROUTED_SUBNET))
    })
    .with_context(|| format!("{}\n{}", hosts.routes(1), agent.log()))?;
    expect_direct(hosts, &direct.reference.as_peer())?;
    expect_vxlan(hosts, &routed.reference.as_peer())?;
    if datapath == "ebpf" {
        maps_catch_up(
            &status,
            "REMOTE_SUBNETS holds the routed peer, not the direct one",
            |st| !st.contains(DIRECT_SUBNET) && st.contains(ROUTED_SUBNET),
        )?;
    }

    // The periodic re-read finds the direct peer as programmed: no drift.
    std::thread::sleep(Duration::from_millis(2500));
    ensure!(
        !agent.log().contains(DRIFT),
        "a direct peer is taken for drift:\n{}",
        agent.log()
    );

    let mut containers = Containers(Vec::new());
    let mut c = Vec::new();
    for i in 1..=3 {
        let (ns, ip) = add_container(hosts, i, &env(i))?;
        exec(&hosts.ns(i), "sysctl -qw net.ipv4.conf.cni0.rp_filter=1")?;
        containers.0.push(ns.clone());
        c.push((ns, ip.parse::<Ipv4Addr>()?));
    }

    // (1) The direct peer: traffic both ways, and no VXLAN on the wire.
    let frames = traffic(hosts, &dir, "direct", &c[0], &c[1])?;
    ensure!(
        frames == 0,
        "{frames} VXLAN frames between host 1 and the direct peer"
    );
    // (2) The peer behind the router: VXLAN.
    let frames = traffic(hosts, &dir, "routed", &c[0], &c[2])?;
    ensure!(
        frames > 0,
        "no VXLAN between host 1 and the peer behind the router"
    );

    // (3) Host 3 moves onto the switch: its lease's PublicIP changes, its
    // stand-in routes our subnet directly, and our vxlan entries for it give
    // way to a direct route.
    let h3 = hosts.ns(3);
    exec(&h3, "ip link del lan0")?;
    exec(&h3, &format!("ip addr add {}/24 dev eth0", hosts.ip(3)))?;
    exec(&h3, "ip link set eth0 up")?;
    let moved = StandIn {
        reference: ReferencePeer {
            public_ip: hosts.ip(3).parse()?,
            ..routed.reference.clone()
        },
    };
    moved.publish(etcd)?;
    moved.program_direct(&ours, &hosts.ip(1))?;
    let moved_route = format!("{ROUTED_SUBNET} via {} dev eth0", hosts.ip(3));
    within(
        Duration::from_secs(10),
        "the moved peer routed directly",
        || hosts.routes(1).contains(&moved_route),
    )
    .with_context(|| format!("{}\n{}", hosts.routes(1), agent.log()))?;
    ensure!(
        !hosts.routes(1).contains(&vxlan_route(ROUTED_SUBNET)),
        "{}",
        hosts.routes(1)
    );
    expect_direct(hosts, &moved.reference.as_peer())?;
    if datapath == "ebpf" {
        maps_catch_up(&status, "REMOTE_SUBNETS holds no direct peer", |st| {
            !st.contains(ROUTED_SUBNET) && !st.contains(DIRECT_SUBNET)
        })?;
    }
    let frames = traffic(hosts, &dir, "moved", &c[0], &c[2])?;
    ensure!(frames == 0, "{frames} VXLAN frames to the moved peer");

    // A direct route removed from outside is drift, and is put back.
    ensure!(!agent.log().contains(DRIFT), "{}", agent.log());
    exec(&hosts.ns(1), &format!("ip route del {moved_route}"))?;
    within(Duration::from_secs(5), "the direct route put back", || {
        hosts.routes(1).contains(&moved_route)
    })
    .with_context(|| agent.log())?;
    ensure!(agent.log().contains(DRIFT), "{}", agent.log());

    // (4) And the other way: host 2 moves behind the router (a new link, a
    // new flannel.1, its lease's PublicIP there), and its direct route gives
    // way to VXLAN.
    let h2 = hosts.ns(2);
    exec(&h2, "ip link del flannel.1")?;
    exec(&h2, "ip addr flush dev eth0")?;
    exec(&h2, "ip link set eth0 down")?;
    exec(
        &router.0,
        &format!("ip link add lan2 type veth peer name lan0 netns {h2}"),
    )?;
    exec(&router.0, "ip addr add 192.168.61.1/24 dev lan2")?;
    exec(&router.0, "ip link set lan2 up")?;
    exec(&h2, &format!("ip addr add {BEHIND_2}/24 dev lan0"))?;
    exec(&h2, "ip link set lan0 up")?;
    exec(&h2, "ip route add default via 192.168.61.1")?;
    exec(&h2, "sysctl -qw net.ipv4.conf.lan0.rp_filter=1")?;
    exec(
        &hosts.ns(1),
        &format!("ip route add 192.168.61.0/24 via {ROUTER}"),
    )?;
    let behind = StandIn::start(hosts, etcd, 2, "lan0", BEHIND_2, DIRECT_SUBNET, &env(2))?;
    behind.reference.add_peer(&ours)?;
    within(Duration::from_secs(10), "the moved peer on VXLAN", || {
        hosts.routes(1).contains(&vxlan_route(DIRECT_SUBNET))
    })
    .with_context(|| format!("{}\n{}", hosts.routes(1), agent.log()))?;
    ensure!(
        !hosts.routes(1).contains(&direct_route),
        "{}",
        hosts.routes(1)
    );
    expect_vxlan(hosts, &behind.reference.as_peer())?;
    if datapath == "ebpf" {
        maps_catch_up(
            &status,
            "REMOTE_SUBNETS holds the peer now behind the router",
            |st| st.contains(DIRECT_SUBNET),
        )?;
    }
    let frames = traffic(hosts, &dir, "moved-back", &c[0], &c[1])?;
    ensure!(frames > 0, "no VXLAN to the peer now behind the router");

    ensure!(
        agent.exited().is_none(),
        "the agent exited:\n{}",
        agent.log()
    );
    drop(containers);
    Ok(())
}

/// The eBPF datapath programs a peer's kernel entries (its route among them)
/// before its map entries, so a route seen in place may precede the maps by
/// a moment: wait for `status` to show what `holds` asks, bounded.
fn maps_catch_up(
    status: &dyn Fn() -> Result<String>,
    what: &str,
    holds: impl Fn(&str) -> bool,
) -> Result<()> {
    let mut last = String::new();
    within(Duration::from_secs(5), what, || match status() {
        Ok(st) => {
            let ok = holds(&st);
            last = st;
            ok
        }
        Err(e) => {
            last = format!("{e:#}");
            false
        }
    })
    .with_context(|| last.clone())?;
    Ok(())
}

fn vxlan_route(subnet: &str) -> String {
    let net: Ipv4Net = subnet.parse().expect("a subnet");
    format!("{subnet} via {} dev flannel.1 onlink", net.network())
}

/// Host 3's only link becomes `lan0` to a router namespace that owns
/// [`ROUTER`] on the switch; host 1 routes 192.168.60.0/24 via the router.
fn put_behind_router(hosts: &Hosts, router: &str) -> Result<()> {
    let (sw, h3) = (hosts.sw(), hosts.ns(3));
    sh(&["ip", "netns", "add", router])?;
    exec(
        &sw,
        &format!("ip link add pr type veth peer name wan0 netns {router}"),
    )?;
    exec(&sw, "ip link set pr master br0 up")?;
    exec(router, &format!("ip addr add {ROUTER}/24 dev wan0"))?;
    exec(router, "ip link set wan0 up")?;
    exec(router, "ip link set lo up")?;
    exec(&h3, "ip addr flush dev eth0")?;
    exec(&h3, "ip link set eth0 down")?;
    exec(
        router,
        &format!("ip link add lan1 type veth peer name lan0 netns {h3}"),
    )?;
    exec(router, "ip addr add 192.168.60.1/24 dev lan1")?;
    exec(router, "ip link set lan1 up")?;
    exec(&h3, &format!("ip addr add {BEHIND}/24 dev lan0"))?;
    exec(&h3, "ip link set lan0 up")?;
    exec(&h3, "ip route add default via 192.168.60.1")?;
    exec(&h3, "sysctl -qw net.ipv4.conf.lan0.rp_filter=1")?;
    strict_rp_filter(router)?;
    exec(router, "sysctl -qw net.ipv4.ip_forward=1")?;
    exec(
        &hosts.ns(1),
        &format!("ip route add 192.168.60.0/24 via {ROUTER}"),
    )?;
    Ok(())
}

/// A flanneld stand-in: `flannel.1` made with iproute2, its lease in etcd in
/// flannel's format, subnet.env for its container.
struct StandIn {
    reference: ReferencePeer,
}

impl StandIn {
    fn start(
        hosts: &Hosts,
        etcd: &Etcd,
        i: usize,
        dev: &str,
        ip: &str,
        subnet: &str,
        env: &Path,
    ) -> Result<StandIn> {
        let subnet: Ipv4Net = subnet.parse()?;
        let nth = |n: u32| Ipv4Addr::from(u32::from(subnet.network()) + n);
        let host = Host {
            index: u8::try_from(i)?,
            ns: hosts.ns(i),
            container_ns: String::new(),
            underlay_dev: dev.into(),
            underlay_ip: ip.parse()?,
            switch_port: format!("p{i}"),
            subnet,
            gateway: nth(1),
            container_ip: nth(2),
        };
        let s = StandIn {
            reference: ReferencePeer::setup(&host, 1, VXLAN_PORT)?,
        };
        s.publish(etcd)?;
        std::fs::write(
            env,
            format!(
                "FLANNEL_NETWORK=10.0.0.0/16\nFLANNEL_SUBNET={}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ=false\n",
                host.gateway,
                subnet.prefix_len(),
                s.reference.mtu
            ),
        )?;
        Ok(s)
    }

    /// Writes (or rewrites) the lease.
    fn publish(&self, etcd: &Etcd) -> Result<()> {
        let r = &self.reference;
        let key = format!(
            "{PREFIX}/subnets/{}-{}",
            r.subnet.network(),
            r.subnet.prefix_len()
        );
        let value = format!(
            r#"{{"PublicIP":"{}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
            r.public_ip, r.vtep_mac
        );
        etcd.put(&key, &value)
    }

    /// What flanneld with DirectRouting programs for a peer on its segment.
    fn program_direct(&self, peer: &Peer, via: &str) -> Result<()> {
        exec(
            &self.reference.ns,
            &format!("ip route replace {} via {via} dev eth0", peer.subnet),
        )?;
        Ok(())
    }
}

/// Our lease: the one in etcd that is not a stand-in's.
fn our_lease(etcd: &Etcd, others: &[&str]) -> Result<Peer> {
    let out = etcd.etcdctl(&["get", "--prefix", &format!("{PREFIX}/subnets/")])?;
    let lines: Vec<&str> = out.lines().collect();
    for kv in lines.chunks(2) {
        let [key, value] = kv else {
            bail!("etcdctl get printed an odd number of lines:\n{out}")
        };
        let lease = overlay_agent::flannel::lease::decode(key, value.as_bytes())?;
        if let Some(p) = lease.peer()
            && !others.contains(&p.subnet.to_string().as_str())
        {
            return Ok(p);
        }
    }
    bail!("no lease of ours in etcd:\n{out}")
}

fn neighbours_and_fdb(hosts: &Hosts) -> Result<(String, String)> {
    let ns = hosts.ns(1);
    Ok((
        exec(&ns, "ip neigh show dev flannel.1")?,
        exec(&ns, "bridge fdb show dev flannel.1")?,
    ))
}

fn expect_direct(hosts: &Hosts, peer: &Peer) -> Result<()> {
    let (neigh, fdb) = neighbours_and_fdb(hosts)?;
    let mac = peer.vtep_mac.to_string();
    ensure!(
        !neigh.contains(&format!("{} ", peer.subnet.network())) && !fdb.contains(&mac),
        "direct peer {} still has vxlan entries:\n{neigh}\n{fdb}",
        peer.subnet
    );
    Ok(())
}

fn expect_vxlan(hosts: &Hosts, peer: &Peer) -> Result<()> {
    let (neigh, fdb) = neighbours_and_fdb(hosts)?;
    let mac = peer.vtep_mac.to_string();
    ensure!(
        neigh.contains(&format!("{} lladdr {mac}", peer.subnet.network()))
            && fdb.contains(&format!("{mac} dst {}", peer.public_ip)),
        "peer {} lacks its vxlan entries:\n{neigh}\n{fdb}",
        peer.subnet
    );
    Ok(())
}

/// Ping and a TCP transfer both ways between two containers while host 1's
/// `eth0` is captured; the number of VXLAN frames seen.
fn traffic(
    hosts: &Hosts,
    dir: &Path,
    what: &str,
    a: &(String, Ipv4Addr),
    b: &(String, Ipv4Addr),
) -> Result<usize> {
    let pcap = dir.join(format!("{what}.pcap"));
    let cap = Capture::start(
        &hosts.ns(1),
        "eth0",
        &format!("udp port {VXLAN_PORT}"),
        &pcap,
    )?;
    for (from, to) in [(a, b), (b, a)] {
        let dst = to.1.to_string();
        within(
            Duration::from_secs(5),
            &format!("{what}: {} -> {dst}", from.1),
            || exec(&from.0, &format!("ping -c1 -W1 {dst}")).is_ok(),
        )?;
        exec(&from.0, &format!("ping -c3 -i0.2 -W1 {dst}"))
            .with_context(|| format!("{what}: ping {} -> {dst}", from.1))?;
        let report = tcp_transfer(&from.0, &to.0, to.1, 5201, PAYLOAD_BYTES)
            .with_context(|| format!("{what}: TCP {} -> {dst}", from.1))?;
        ensure!(
            report.received_sha256 == report.sent_sha256,
            "{what}: {report:?}"
        );
    }
    let pcap = cap.stop()?;
    Ok(vxlan_frames(&pcap, VXLAN_PORT)?.len())
}
