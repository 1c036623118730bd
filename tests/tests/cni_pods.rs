//! Pods made as a Kubernetes node makes them (`overlay_tests::cni`): the
//! CNI reference plugins from kube-flannel's conflist, run in a lab host's
//! network namespace, with flannel's meta-plugin reading a subnet.env
//! written as flanneld writes it. No agent runs here: these pin down what
//! the pods look like (addresses, routes, MTU, hairpin, host ports) before
//! the Kubernetes-mode tests put the agent under them, and that DEL leaves
//! nothing behind, even when a test panics.

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use ipnet::Ipv4Net;
use overlay_tests::{
    agent::Hosts,
    cmd,
    cni::{Pod, PodOpts, PortMapping, write_subnet_env},
    netns,
};

/// The test's own directory (subnet files, the plugins' state), removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("overlay-cni-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// subnet.env of a node whose lease is 10.244.1.0/24, as flanneld writes it.
fn subnet_env(dir: &Path, ipmasq: bool) -> Result<PathBuf> {
    let env = dir.join("h1.env");
    write_subnet_env(&env, "10.244.0.0/16", "10.244.1.1/24", 1450, ipmasq)?;
    Ok(env)
}

fn netns_exists(name: &str) -> bool {
    Path::new(&netns::netns_path(name)).exists()
}

fn link_exists(ns: &str, dev: &str) -> bool {
    cmd::ip(ns, &["link", "show", "dev", dev]).is_ok()
}

fn nat_rules(ns: &str) -> Result<String> {
    cmd::run_in(ns, &["iptables-save", "-t", "nat"])
}

#[test]
#[ignore = "needs root, network namespaces and the CNI plugins: run `cargo xtask test`"]
fn pods_get_flannels_addresses_routes_mtu_and_hairpin_and_reach_each_other() -> Result<()> {
    let scratch = Scratch::new("pods")?;
    let hosts = Hosts::new("cnp", 1)?;
    let host = hosts.ns(1);
    let env = subnet_env(&scratch.0, true)?;
    let a = Pod::add(&host, &env, "a", PodOpts::default())?;
    let b = Pod::add(&host, &env, "b", PodOpts::default())?;

    let subnet: Ipv4Net = "10.244.1.0/24".parse()?;
    let gw: Ipv4Addr = "10.244.1.1".parse()?;
    for p in [&a, &b] {
        ensure!(
            subnet.contains(&p.ip) && p.ip != gw && p.ip != subnet.network(),
            "{} got {}",
            p.name,
            p.ip
        );
        ensure!(p.prefix_len == 24 && p.gateway == gw, "{p:?}");
        ensure!(p.bridge == "cni0", "bridge {}", p.bridge);
        // The pod's side: eth0 at flannel's MTU, lo up (loopback plugin),
        // the default route (isDefaultGateway) and the cluster network
        // (flannel's ipam route) both via cni0's address.
        let eth0 = cmd::ip(&p.netns, &["-o", "link", "show", "dev", "eth0"])?;
        ensure!(eth0.contains("mtu 1450"), "{eth0}");
        let lo = cmd::ip(&p.netns, &["-o", "link", "show", "dev", "lo"])?;
        ensure!(lo.contains(",UP"), "{lo}");
        let addr = cmd::ip(&p.netns, &["-o", "-4", "addr", "show", "dev", "eth0"])?;
        ensure!(addr.contains(&format!("inet {}/24", p.ip)), "{addr}");
        let routes = cmd::ip(&p.netns, &["-4", "route"])?;
        for want in [
            "default via 10.244.1.1 dev eth0",
            "10.244.0.0/16 via 10.244.1.1 dev eth0",
        ] {
            ensure!(
                routes.contains(want),
                "{} routes lack {want:?}:\n{routes}",
                p.name
            );
        }
        // The host's side: a veth in cni0 at the MTU, hairpin on.
        let veth = cmd::ip(&host, &["-d", "-o", "link", "show", "dev", &p.host_veth])?;
        for want in ["mtu 1450", "master cni0", "hairpin on"] {
            ensure!(
                veth.contains(want),
                "{} lacks {want:?}: {veth}",
                p.host_veth
            );
        }
    }
    ensure!(a.ip != b.ip, "both pods got {}", a.ip);
    ensure!(a.host_veth != b.host_veth);
    // cni0 is the gateway (isGateway) at flannel's MTU.
    let cni0 = cmd::ip(&host, &["-o", "-4", "addr", "show", "dev", "cni0"])?;
    ensure!(cni0.contains("inet 10.244.1.1/24"), "{cni0}");
    let cni0 = cmd::ip(&host, &["-o", "link", "show", "dev", "cni0"])?;
    ensure!(cni0.contains("mtu 1450"), "{cni0}");
    // FLANNEL_IPMASQ=true: the agent masquerades, so the bridge must not.
    let nat = nat_rules(&host)?;
    ensure!(
        !nat.contains(&a.container_id) && !nat.contains(&b.container_id),
        "the bridge masquerades although FLANNEL_IPMASQ=true:\n{nat}"
    );

    for (from, to) in [(&a, &b), (&b, &a)] {
        from.exec(&[
            "ping",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "2",
            &to.ip.to_string(),
        ])
        .with_context(|| format!("{} -> {}", from.name, to.name))?;
    }
    a.exec(&["ping", "-c", "1", "-W", "2", "10.244.1.1"])?;

    // DEL removes the veth, the lease, the saved delegate config and the
    // namespace, and leaves the other pod alone.
    let (veth, lease, netns) = (a.host_veth.clone(), a.lease_file(), a.netns.clone());
    let saved = a.data_dir().join("flannel").join(&a.container_id);
    ensure!(lease.exists(), "no lease {}", lease.display());
    ensure!(saved.exists(), "no saved delegate {}", saved.display());
    a.remove()?;
    ensure!(!link_exists(&host, &veth), "{veth} left behind");
    ensure!(!lease.exists(), "lease {} left behind", lease.display());
    ensure!(!saved.exists(), "{} left behind", saved.display());
    ensure!(!netns_exists(&netns), "netns {netns} left behind");
    ensure!(link_exists(&host, &b.host_veth) && b.lease_file().exists());
    b.exec(&["ping", "-c", "1", "-W", "2", "10.244.1.1"])?;
    Ok(())
}

/// Accepts one connection inside the pod, answers it, and returns the
/// address the pod saw it from.
fn serve_once(pod_ns: &str, port: u16) -> Result<std::thread::JoinHandle<Result<SocketAddr>>> {
    netns::spawn_in(pod_ns, move || {
        let l = TcpListener::bind(("0.0.0.0", port))?;
        l.set_nonblocking(true)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        let (mut s, peer) = loop {
            match l.accept() {
                Ok(c) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    ensure!(Instant::now() < deadline, "no connection within 15 s");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line)?;
        s.write_all(format!("pod got {line}").as_bytes())?;
        Ok(peer)
    })
}

/// Connects from a host to `to`, retrying for `patience` while nothing
/// listens yet, sends a line and returns the answer.
fn ask(host_ns: &str, to: SocketAddr, patience: Duration) -> Result<String> {
    netns::join(netns::spawn_in(host_ns, move || {
        let deadline = Instant::now() + patience;
        let s = loop {
            match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e).context(format!("connecting to {to}")),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        (&s).write_all(b"hello\n")?;
        let mut reply = String::new();
        BufReader::new(&s).read_line(&mut reply)?;
        Ok(reply)
    })?)
}

#[test]
#[ignore = "needs root, network namespaces and the CNI plugins: run `cargo xtask test`"]
fn a_host_port_reaches_the_pod_from_another_host_and_del_removes_portmaps_rules() -> Result<()> {
    let scratch = Scratch::new("hostport")?;
    let hosts = Hosts::new("cnh", 2)?;
    let host = hosts.ns(1);
    let env = subnet_env(&scratch.0, true)?;
    let web = Pod::add(
        &host,
        &env,
        "web",
        PodOpts {
            port_mappings: vec![PortMapping::tcp(30080, 8080)],
            ..PodOpts::default()
        },
    )?;

    // portmap's DNAT: the host-port chain dispatches 30080 to a per-pod
    // chain (named by the container ID) that DNATs to the pod.
    let nat = nat_rules(&host)?;
    let dispatch = nat
        .lines()
        .find(|l| l.starts_with("-A CNI-HOSTPORT-DNAT") && l.contains(&web.container_id))
        .with_context(|| format!("no CNI-HOSTPORT-DNAT rule for the pod:\n{nat}"))?;
    ensure!(dispatch.contains("--dports 30080"), "{dispatch}");
    let chain = dispatch
        .split_whitespace()
        .skip_while(|w| *w != "-j")
        .nth(1)
        .context("dispatch target")?;
    ensure!(chain.starts_with("CNI-DN-"), "{dispatch}");
    ensure!(
        nat.lines().any(|l| l.starts_with(&format!("-A {chain} "))
            && l.contains(&format!("--to-destination {}:8080", web.ip))),
        "{chain} does not DNAT to {}:8080:\n{nat}",
        web.ip
    );
    ensure!(
        nat.contains("-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT"),
        "{nat}"
    );

    // Host 2 reaches the pod through host 1's address and the host port;
    // the pod sees host 2's own address (DNAT only, no masquerade).
    let server = serve_once(&web.netns, 8080)?;
    let to: SocketAddr = format!("{}:30080", hosts.ip(1)).parse()?;
    let reply = ask(&hosts.ns(2), to, Duration::from_secs(10))?;
    let peer = netns::join(server)?;
    ensure!(reply == "pod got hello\n", "{reply:?}");
    ensure!(peer.ip().to_string() == hosts.ip(2), "the pod saw {peer}");

    // DEL (portmap's with the same runtimeConfig) removes the pod's rules.
    let cid = web.container_id.clone();
    web.remove()?;
    let nat = nat_rules(&host)?;
    ensure!(!nat.contains(&cid), "portmap's rules left behind:\n{nat}");
    ensure!(
        !nat.contains(&format!(":{chain} ")),
        "{chain} left behind:\n{nat}"
    );
    ensure!(
        ask(&hosts.ns(2), to, Duration::from_millis(500)).is_err(),
        "the host port still answers after DEL"
    );
    Ok(())
}

#[test]
#[ignore = "needs root, network namespaces and the CNI plugins: run `cargo xtask test`"]
fn a_pod_dropped_by_a_panicking_test_is_deleted() -> Result<()> {
    let scratch = Scratch::new("panic")?;
    let hosts = Hosts::new("cnx", 1)?;
    let host = hosts.ns(1);
    // FLANNEL_IPMASQ=false: the bridge masquerades the pod (ipMasq is the
    // inverse), so DEL has the bridge's rules to remove as well as portmap's.
    let env = subnet_env(&scratch.0, false)?;
    let mut seen = None;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let pod = Pod::add(
            &host,
            &env,
            "doomed",
            PodOpts {
                port_mappings: vec![PortMapping::udp(30053, 53)],
                ..PodOpts::default()
            },
        )
        .expect("adding the pod");
        let nat = nat_rules(&host).expect("iptables-save");
        seen = Some((
            pod.netns.clone(),
            pod.host_veth.clone(),
            pod.lease_file(),
            pod.container_id.clone(),
            nat,
        ));
        panic!("deliberate panic with pod {} alive", pod.netns);
    }));
    ensure!(outcome.is_err(), "the closure did not panic");
    let (netns, veth, lease, cid, nat_before) = seen.context("the pod was never made")?;
    let masq = nat_before
        .lines()
        .find(|l| l.starts_with("-A POSTROUTING") && l.contains(&cid))
        .with_context(|| format!("no masquerade with FLANNEL_IPMASQ=false:\n{nat_before}"))?;
    ensure!(masq.contains("-s 10.244.1."), "{masq}");
    ensure!(
        nat_before
            .lines()
            .any(|l| l.starts_with("-A CNI-HOSTPORT-DNAT") && l.contains("--dports 30053")),
        "no udp host port:\n{nat_before}"
    );

    ensure!(!netns_exists(&netns), "netns {netns} left behind");
    ensure!(!link_exists(&host, &veth), "{veth} left behind");
    ensure!(!lease.exists(), "lease {} left behind", lease.display());
    let nat = nat_rules(&host)?;
    ensure!(!nat.contains(&cid), "rules left behind:\n{nat}");
    Ok(())
}
