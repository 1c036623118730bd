//! `cargo xtask cpbench`: the control plane at N peers. For each N,
//! datapath and subnet manager, one host, a real etcd holding N leases of
//! other nodes (or the Kubernetes API stand-in holding N Nodes of other
//! flanneld nodes) and the release agent: cold start, single add/delete
//! latency, a burst of 1,000, CPU, peak RSS and requests to etcd or the API
//! (see [`report::METHOD`] and [`report::KUBE_METHOD`]).

mod case;
mod etcd_requests;
mod floor;
mod herd;
mod kube_case;
mod proc_stats;
mod report;

use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use case::{Datapath, Manager};
use report::{Context, Row};

const USAGE: &str = "\
usage: cpbench [--quick] [--peers LIST] [--datapaths LIST] [--subnet-managers LIST]
               [--events N] [--write] [--herd | --herd-only] [--herd-agents N] [--herd-peers N]

  --peers LIST      comma-separated peer counts (default 1000,5000,10000)
  --datapaths LIST  comma-separated: ebpf,kernel (default both)
  --subnet-managers LIST
                    comma-separated: etcd (leases in etcd), kube (Nodes of a Kubernetes
                    API server stand-in, --kube-subnet-mgr) (default both)
  --events N        single adds and single deletes timed per case (default 20)
  --quick           smoke run: 500 peers, eBPF only
  --herd            then the herd figure: agents in their own namespaces on one etcd
                    holding --herd-peers leases, etcd restarted, then compacted past
                    their revision (first datapath of --datapaths)
  --herd-only       the herd figure alone
  --herd-agents N   agents of the herd (default 20)
  --herd-peers N    leases of the herd (default 5000)
  --write           write the table to docs/control-plane-benchmark.md and into
                    README.md between <!-- cpbench:start --> and <!-- cpbench:end -->";

struct Args {
    peers: Vec<usize>,
    datapaths: Vec<Datapath>,
    managers: Vec<Manager>,
    events: usize,
    write: bool,
    herd: bool,
    cases: bool,
    herd_agents: usize,
    herd_peers: usize,
}

fn parse_args(args: &[String]) -> Result<Option<Args>> {
    let mut a = Args {
        peers: vec![1000, 5000, 10_000],
        datapaths: vec![Datapath::Ebpf, Datapath::Kernel],
        managers: vec![Manager::Etcd, Manager::Kube],
        events: 20,
        write: false,
        herd: false,
        cases: true,
        herd_agents: 20,
        herd_peers: 5000,
    };
    let mut quick = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v.to_owned())),
            None => (arg.as_str(), None),
        };
        let mut value = || -> Result<String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it
                    .next()
                    .cloned()
                    .with_context(|| format!("{flag} needs a value")),
            }
        };
        match flag {
            "-h" | "--help" => return Ok(None),
            "--quick" => quick = true,
            "--write" => a.write = true,
            "--herd" => a.herd = true,
            "--herd-only" => (a.herd, a.cases) = (true, false),
            "--herd-agents" => a.herd_agents = value()?.parse().context("--herd-agents")?,
            "--herd-peers" => a.herd_peers = value()?.parse().context("--herd-peers")?,
            "--events" => a.events = value()?.parse().context("--events")?,
            "--peers" => {
                a.peers = value()?
                    .split(',')
                    .map(|s| s.trim().parse::<usize>().context("--peers"))
                    .collect::<Result<_>>()?;
            }
            "--datapaths" | "--datapath" => {
                a.datapaths = value()?
                    .split(',')
                    .map(Datapath::parse)
                    .collect::<Result<_>>()?;
            }
            "--subnet-managers" | "--subnet-manager" => {
                a.managers = value()?
                    .split(',')
                    .map(|s| Manager::parse(s.trim()))
                    .collect::<Result<_>>()?;
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if quick {
        a.peers = vec![500];
        a.datapaths = vec![Datapath::Ebpf];
    }
    let room = overlay_tests::peers::MAX - a.events - case::BURST;
    if a.peers.iter().any(|&n| n == 0 || n > room)
        || a.datapaths.is_empty()
        || a.managers.is_empty()
        || a.events == 0
    {
        bail!("peers must be 1..={room}, and datapaths, subnet managers and events non-empty");
    }
    if a.write && !a.cases {
        bail!("--write replaces the whole table: it needs the cases, not --herd-only");
    }
    if a.herd && (a.herd_agents == 0 || a.herd_agents > 200 || a.herd_peers + 2 > room) {
        bail!("--herd-agents must be 1..=200 and --herd-peers below {room}");
    }
    Ok(Some(a))
}

use overlay_tests::interrupt::catch_signals;
pub use overlay_tests::interrupt::interrupted;

use overlay_tests::machine::{self, workspace_root};

fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(args) = parse_args(&argv)? else {
        println!("{USAGE}");
        return Ok(());
    };
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark builds network namespaces: run it as root (cargo xtask cpbench)");
    }
    catch_signals();
    let load_before = load_average();
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let peers = if args.cases {
        args.peers.clone()
    } else {
        Vec::new()
    };
    for &n in &peers {
        for &dp in &args.datapaths {
            for &mgr in &args.managers {
                let what = format!(
                    "{n} peers, {} datapath, {} subnet manager",
                    dp.name(),
                    mgr.name()
                );
                eprintln!("cpbench: {what}");
                let row = match mgr {
                    Manager::Etcd => case::run(n, dp, args.events),
                    Manager::Kube => kube_case::run(n, dp, args.events),
                }
                .with_context(|| what.clone())?;
                if row.resyncs > 0 {
                    eprintln!(
                        "  (the route watch overflowed {} time(s) and re-read the table)",
                        row.resyncs
                    );
                }
                rows.push(row);
                if interrupted() {
                    bail!("interrupted");
                }
            }
        }
    }
    let mut herds = Vec::new();
    if args.herd {
        let dp = args.datapaths[0];
        eprintln!(
            "cpbench: herd of {} agents, {} peers, {} datapath",
            args.herd_agents,
            args.herd_peers,
            dp.name()
        );
        herds.push(herd::run(args.herd_agents, args.herd_peers, dp).context("the herd")?);
    }
    if !rows.is_empty() {
        print!(
            "{}\n{}\n{}\n{}\n{}",
            report::table(&rows),
            report::floor_targets(&rows),
            report::targets(&rows),
            report::kube_targets(&rows),
            report::kube_details(&rows)
        );
    }
    if !herds.is_empty() {
        print!("\n{}", report::herd_table(&herds));
    }
    if args.write {
        let ctx = context(&args, started.elapsed().as_secs_f64(), load_before);
        let root = workspace_root();
        let doc = root.join("docs/control-plane-benchmark.md");
        let previous = std::fs::read_to_string(&doc).unwrap_or_default();
        let notes = report::notes_of(&previous);
        let kept = report::kept_herd(&previous);
        std::fs::write(
            &doc,
            report::document(&rows, &herds, &ctx, notes, kept.as_deref()),
        )
        .with_context(|| format!("writing {}", doc.display()))?;
        update_readme(
            &root.join("README.md"),
            &report::readme_section(&rows, &herds, &ctx, kept.as_deref()),
        )?;
        eprintln!("wrote {} and README.md", doc.display());
    }
    Ok(())
}

fn update_readme(path: &Path, section: &str) -> Result<()> {
    let readme = std::fs::read_to_string(path).context("reading README.md")?;
    let (Some(a), Some(b)) = (
        readme.find(report::README_START),
        readme.find(report::README_END),
    ) else {
        bail!(
            "README.md has no {} ... {} markers",
            report::README_START,
            report::README_END
        );
    };
    let updated = format!(
        "{}{section}{}",
        &readme[..a],
        &readme[b + report::README_END.len()..]
    );
    std::fs::write(path, updated).context("writing README.md")
}

/// `/proc/loadavg`'s 1-minute figure.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default()
}

fn context(args: &Args, wall_s: f64, load_before: String) -> Context {
    Context {
        date: machine::utc_now(),
        commit: machine::commit(),
        kernel: machine::kernel(),
        cpu: machine::cpu_model(),
        cores: machine::cores(),
        events: args.events,
        wall_s,
        load_before,
        load_after: load_average(),
    }
}
