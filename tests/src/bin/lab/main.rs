//! `cargo xtask lab`: seed 001's two-host flannel walkthrough, one machine,
//! three hosts: a real etcd holding seed 001's network config, the release
//! `overlay-agent` on two hosts (eBPF and kernel datapath) and a flanneld
//! stand-in on the third, each with a bridge and a container addressed from
//! the host's lease. `up` prints the leases and the ping matrix and stays up
//! until interrupted; `status` and `down` work from another terminal.
//!
//! `up --kube` is the Kubernetes variant (`kube.rs`): the API stand-in
//! instead of etcd, agents with `--kube-subnet-mgr`, pods made by the CNI
//! plugins.

mod kube;
mod nodes;
mod report;
mod topo;

use std::{
    path::PathBuf,
    process::Child,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};

const USAGE: &str = "\
usage: lab [up [--kube] [--once] [--ingress tc|xdp] [--agent PATH]] | status | down

  up       (default) build the lab, print the leases and the ping matrix, and
           stay up until Ctrl-C or SIGTERM, then tear everything down
    --kube           the Kubernetes variant: the API stand-in (TLS, token) instead
                     of etcd, Nodes node1..3 (podCIDRs 10.244.<i>.0/24), the agents
                     with --kube-subnet-mgr, pods made by the CNI plugins; prints
                     the Nodes and a kubeconfig for this machine's kubectl
    --once           print, then tear down; exit 1 unless all 6 pairs pass
    --ingress tc|xdp the eBPF agent's --ebpf-ingress (tc, or xdp+tc)
    --agent PATH     the overlay-agent binary (default: next to this binary)
  status   the leases (or Nodes), each node's mode and subnet, and the ping matrix
  down     remove everything the lab made (processes, namespaces ovlab-*,
           /run/overlay-lab), also after a crash

State lives in /run/overlay-lab; namespaces are ovlab-{sw,etcd,h1..3,c1..3}
(ovlab-api instead of ovlab-etcd with --kube, c1..3 being the pods).";

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

struct UpArgs {
    kube: bool,
    once: bool,
    ingress: String,
    agent: PathBuf,
}

fn main() {
    if let Err(e) = dispatch() {
        eprintln!("lab: error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch() -> Result<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return Ok(());
    }
    // SAFETY: geteuid cannot fail.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the lab creates network namespaces and loads eBPF: run it as root (cargo xtask lab)"
    );
    let (cmd, rest) = match argv.split_first() {
        Some((c, rest)) if !c.starts_with('-') => (c.as_str(), rest),
        _ => ("up", &argv[..]),
    };
    match cmd {
        "up" => up(parse_up(rest)?),
        "status" if rest.is_empty() => status(),
        "down" if rest.is_empty() => down(),
        _ => bail!("unexpected arguments {argv:?}\n{USAGE}"),
    }
}

fn parse_up(args: &[String]) -> Result<UpArgs> {
    let mut up = UpArgs {
        kube: false,
        once: false,
        ingress: "tc".into(),
        agent: std::env::current_exe()?
            .parent()
            .context("locating this binary's directory")?
            .join("overlay-agent"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--once" => up.once = true,
            "--kube" => up.kube = true,
            "--ingress" => {
                up.ingress = match it.next().map(String::as_str) {
                    Some("tc") => "tc".into(),
                    Some("xdp") => "xdp+tc".into(),
                    other => bail!("--ingress takes tc or xdp, not {other:?}"),
                }
            }
            "--agent" => up.agent = it.next().context("--agent needs a path")?.into(),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(up)
}

fn up(args: UpArgs) -> Result<()> {
    ensure!(
        args.agent.is_file(),
        "no agent binary at {} (`cargo xtask lab` builds it; or pass --agent)",
        args.agent.display()
    );
    topo::set_variant(if args.kube {
        topo::Variant::Kube
    } else {
        topo::Variant::Etcd
    });
    let existing = topo::existing_namespaces()?;
    ensure!(
        existing.is_empty() && !topo::state_dir().exists(),
        "a lab is already up, or a crashed one left {existing:?} / {}: run `cargo xtask lab down` first",
        topo::STATE_DIR
    );
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
    std::fs::create_dir_all(topo::state_dir())?;
    std::fs::write(
        topo::state_dir().join("up.pid"),
        std::process::id().to_string(),
    )?;
    topo::record_variant()?;

    let mut children = Vec::new();
    let mut kube_lab = None;
    let result = if args.kube {
        bring_up_kube(&args, &mut children, &mut kube_lab)
    } else {
        bring_up(&args, &mut children)
    };
    if result.is_ok() && !args.once {
        println!(
            "\nthe lab is up. From another terminal: `cargo xtask lab status`, `cargo xtask lab down`.\n\
             Ctrl-C (or SIGTERM) tears it down."
        );
        let mut ticks = 0u32;
        while !STOP.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
            ticks += 1;
            // The flanneld stand-in follows the Nodes, as its watch would.
            if let Some(lab) = kube_lab.as_ref().filter(|_| ticks.is_multiple_of(10))
                && let Err(e) = lab.sync_flanneld()
            {
                eprintln!("lab: flanneld stand-in: {e:#}");
            }
            // `down` from another terminal removed the lab under us.
            if !topo::state_dir().exists() {
                println!("the lab was taken down from elsewhere");
                break;
            }
        }
    }
    if let Err(e) = &result {
        eprintln!("lab: {e:#}");
    }
    println!("\ntearing down");
    if let Some(lab) = kube_lab.as_mut() {
        // CNI DEL of each pod while its host and subnet.env are still there.
        let n = lab.pods.len();
        for pod in lab.pods.drain(..) {
            if let Err(e) = pod.remove() {
                eprintln!("lab: {e:#}");
            }
        }
        println!("{n} pod(s) deleted with the CNI plugins (DEL)");
    }
    let cleanup = teardown(children, kube_lab);
    result.and(cleanup)
}

fn interrupted() -> Result<()> {
    ensure!(!STOP.load(Ordering::SeqCst), "interrupted");
    Ok(())
}

/// The Kubernetes variant (see `kube.rs`).
fn bring_up_kube(
    args: &UpArgs,
    children: &mut Vec<Child>,
    slot: &mut Option<kube::KubeLab>,
) -> Result<()> {
    topo::build_underlay()?;
    let lab = slot.insert(kube::KubeLab::start(&args.agent)?);
    let port = lab.expose()?;
    println!(
        "Kubernetes API stand-in up at {} (namespace {}, TLS + bearer token), this machine reaches it at https://127.0.0.1:{port};\n  \
         Nodes {} with podCIDRs {} (kube-flannel's net-conf.json: 10.244.0.0/16, /24 each)",
        lab.cluster.api.url(),
        topo::API_NS,
        topo::NODES.map(|n| n.node_name()).join(", "),
        topo::NODES
            .map(|n| overlay_tests::kube_cluster::KubeCluster::pod_cidr(n.index as usize))
            .join(", "),
    );
    interrupted()?;

    let stand_in_node = topo::NODES[2];
    let f = lab.start_flanneld(&stand_in_node)?;
    println!(
        "h3: flanneld stand-in: {} {} (MTU {}), {} annotated as flanneld annotates it",
        f.peer.device, f.peer.vtep_mac, f.peer.mtu, f.name
    );
    for node in &topo::NODES[..2] {
        let mut child = lab.start_agent(node, &args.ingress)?;
        let env = nodes::wait_for_lease(node, &mut child);
        children.push(child);
        let env = env?;
        println!(
            "h{}: {} (NODE_NAME={}): podCIDR {} ({})",
            node.index,
            node.role.describe(),
            node.node_name(),
            env.subnet(),
            node.subnet_file().display()
        );
        interrupted()?;
    }
    let programmed = kube::sync_until(lab, 2, Duration::from_secs(30))?;
    println!(
        "h3: flanneld stand-in programmed {programmed} Node(s) from their annotations with iproute2"
    );
    if programmed < 2 {
        eprintln!("lab: the agents' Nodes are not both annotated after 30 s");
    }
    for node in topo::NODES {
        let pod = lab.add_pod(&node)?;
        println!(
            "h{}: pod {} {}/{} in {} (CNI: flannel -> bridge {} + host-local, portmap; veth {})",
            node.index, pod.name, pod.ip, pod.prefix_len, pod.netns, pod.bridge, pod.host_veth
        );
        interrupted()?;
    }

    let matrix = report::matrix_within(Duration::from_secs(15));
    println!();
    kube::print_nodes()?;
    println!();
    report::print_nodes()?;
    println!();
    report::print_matrix(&matrix);
    println!();
    kube::print_kubectl_hint();
    ensure!(
        matrix.all_pass() || !args.once,
        "{} of {} directed pairs fail",
        matrix.failures(),
        matrix.cells.len()
    );
    Ok(())
}

fn bring_up(args: &UpArgs, children: &mut Vec<Child>) -> Result<()> {
    topo::build_underlay()?;
    children.push(nodes::start_etcd()?);
    let config_key = format!("{}/config", topo::ETCD_PREFIX);
    nodes::etcdctl(&["put", &config_key, topo::NETWORK_CONFIG])?;
    println!(
        "etcd up at {} (namespace {}); {config_key} = seed 001's config",
        topo::ETCD_URL,
        topo::ETCD_NS
    );
    interrupted()?;

    // The stand-in takes its lease first (as seed 001's first flanneld did),
    // so the agents must allocate around it.
    let stand_in_node = topo::NODES[2];
    let stand_in = nodes::start_stand_in(&stand_in_node)?;
    println!(
        "h3: flanneld stand-in: flannel.{} {} (MTU {}), lease {}",
        topo::VNI,
        stand_in.vtep_mac,
        stand_in.mtu,
        stand_in.subnet
    );
    for node in &topo::NODES[..2] {
        let mut child = nodes::start_agent(node, &args.agent, &args.ingress)?;
        let env = nodes::wait_for_lease(node, &mut child);
        children.push(child);
        let env = env?;
        println!(
            "h{}: {}: lease {} ({})",
            node.index,
            node.role.describe(),
            env.subnet(),
            node.subnet_file().display()
        );
        interrupted()?;
    }
    for node in topo::NODES {
        let env = topo::SubnetEnv::read(&node)?;
        topo::add_container(&node, &env)?;
    }
    let programmed = nodes::program_stand_in(&stand_in)?;
    println!("h3: flanneld stand-in programmed {programmed} remote lease(s) with iproute2");
    interrupted()?;

    let matrix = report::matrix_within(Duration::from_secs(15));
    println!();
    report::print_leases()?;
    println!();
    report::print_nodes()?;
    println!();
    report::print_matrix(&matrix);
    ensure!(
        matrix.all_pass() || !args.once,
        "{} of {} directed pairs fail",
        matrix.failures(),
        matrix.cells.len()
    );
    Ok(())
}

/// Stops our own children (so they are reaped, not left as zombies), stops
/// the Kubernetes variant's API stand-in and unmounts its bpffs, then
/// removes whatever is left by name.
fn teardown(children: Vec<Child>, kube_lab: Option<kube::KubeLab>) -> Result<()> {
    for mut c in children {
        // SAFETY: kill(2) on a child we have not reaped.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while c.try_wait()?.is_none() {
            if std::time::Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    drop(kube_lab);
    let removed = topo::remove_everything(Duration::from_secs(3))?;
    println!(
        "removed {}; no {}* namespace or process is left",
        if removed.is_empty() {
            "nothing (already gone)".to_owned()
        } else {
            removed.join(", ")
        },
        topo::PREFIX
    );
    Ok(())
}

fn status() -> Result<()> {
    let namespaces = topo::existing_namespaces()?;
    if namespaces.is_empty() && !topo::state_dir().exists() {
        println!("no lab is up (`cargo xtask lab up` starts one)");
        return Ok(());
    }
    let up_pid = std::fs::read_to_string(topo::state_dir().join("up.pid")).unwrap_or_default();
    let up_pid = up_pid.trim();
    match up_pid.parse::<i32>() {
        Ok(pid) if topo::alive(pid) => {
            println!("lab up (process {pid}); namespaces {namespaces:?}")
        }
        _ => println!(
            "the process that brought the lab up is gone (pid {up_pid:?}): `cargo xtask lab down` cleans up; namespaces {namespaces:?}"
        ),
    }
    println!();
    let kube = topo::variant() == topo::Variant::Kube;
    if kube {
        if let Err(e) = kube::print_nodes() {
            println!("  cannot read the Nodes from the API stand-in: {e:#}");
        }
    } else if let Err(e) = report::print_leases() {
        println!("  cannot read the leases: {e:#}");
    }
    println!();
    report::print_nodes()?;
    println!();
    report::print_matrix(&report::matrix());
    if kube {
        println!();
        kube::print_kubectl_hint();
    }
    Ok(())
}

fn down() -> Result<()> {
    // A live `up` tears down itself (and reaps its children) when asked.
    let up_pid = std::fs::read_to_string(topo::state_dir().join("up.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
        .filter(|&p| p != std::process::id() as i32 && topo::alive(p));
    if let Some(pid) = up_pid {
        println!("asking the lab's process {pid} to tear down (SIGTERM)");
        // SAFETY: kill(2) on the pid `up` recorded, which is still running.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while topo::alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let removed = topo::remove_everything(Duration::from_secs(3))?;
    if removed.is_empty() {
        println!("nothing left to remove");
    } else {
        println!("removed {}", removed.join(", "));
    }
    println!("no {}* namespace or process is left", topo::PREFIX);
    Ok(())
}
