//! A host driven by one of our datapaths, as a library.
//!
//! The datapath lives on a dedicated thread that has `setns()`-ed into the
//! host's namespace and runs a current-thread tokio runtime: its rtnetlink
//! socket, its BPF links and its maps are created, used and dropped there. The
//! test talks to it through a channel ([`Node::setup`], [`Node::add_peer`],
//! ...). Dropping the handle tears the datapath down (best effort) on its own
//! thread, so a failing test detaches every program it attached.

use std::{
    sync::mpsc as std_mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use overlay_agent::datapath::{
    AnyDatapath, Datapath, DatapathError, Mode, NodeSpec, NodeState, Peer,
    ebpf::{Counters, EbpfDatapath, EbpfOptions, ProgramIds},
    kernel::KernelDatapath,
};
use tokio::sync::mpsc;

use crate::netns;

/// Which of our datapaths a node runs.
#[derive(Clone, Debug)]
pub enum Flavor {
    Ebpf(EbpfOptions),
    Kernel,
}

impl Flavor {
    pub fn mode(&self) -> Mode {
        match self {
            Flavor::Ebpf(_) => Mode::Ebpf,
            Flavor::Kernel => Mode::Kernel,
        }
    }
}

type Reply<T> = std_mpsc::Sender<Result<T, String>>;

enum Command {
    Setup(NodeSpec, Reply<NodeState>),
    AddPeer(Peer, Reply<()>),
    RemovePeer(Peer, Reply<()>),
    Peers(Reply<Vec<Peer>>),
    Counters(Reply<Option<Counters>>),
    ProgramIds(Reply<Option<ProgramIds>>),
    Teardown(Reply<()>),
    SyncPods(Reply<()>),
}

/// How long one datapath call may take before the test gives up on it.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Handle to a datapath running in a host's namespace.
pub struct Node {
    ns: String,
    flavor: Flavor,
    commands: Option<mpsc::UnboundedSender<Command>>,
    done: std_mpsc::Receiver<()>,
    thread: Option<thread::JoinHandle<()>>,
}

/// Errors keep their whole source chain (e.g. the verifier's words) when they
/// cross the thread boundary as text; sources already quoted are not repeated.
fn chain(e: &DatapathError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

impl Node {
    /// Starts the datapath thread inside namespace `ns` (nothing is set up yet).
    pub fn start(ns: &str, flavor: Flavor) -> Result<Node> {
        let (tx, rx) = mpsc::unbounded_channel::<Command>();
        let (done_tx, done) = std_mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std_mpsc::channel::<Result<(), String>>();
        let name = ns.to_owned();
        let for_thread = flavor.clone();
        let thread = thread::Builder::new()
            .name(format!("node:{ns}"))
            .spawn(move || {
                let started = netns::enter(&name).and_then(|()| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("building a tokio runtime")
                });
                match started {
                    Ok(rt) => {
                        let _ = ready_tx.send(Ok(()));
                        rt.block_on(serve(for_thread, rx));
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("{e:#}")));
                    }
                }
                let _ = done_tx.send(());
            })
            .context("spawning a node thread")?;
        ready_rx
            .recv_timeout(CALL_TIMEOUT)
            .map_err(|_| anyhow!("node thread for {ns} did not start"))?
            .map_err(|e| anyhow!("node thread for {ns}: {e}"))?;
        Ok(Node {
            ns: ns.to_owned(),
            flavor,
            commands: Some(tx),
            done,
            thread: Some(thread),
        })
    }

    pub fn ns(&self) -> &str {
        &self.ns
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor.clone()
    }

    fn call<T>(&self, what: &str, make: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
        let (tx, rx) = std_mpsc::channel();
        self.commands
            .as_ref()
            .context("node stopped")?
            .send(make(tx))
            .map_err(|_| anyhow!("[{}] node thread is gone", self.ns))?;
        match rx.recv_timeout(CALL_TIMEOUT) {
            Ok(r) => r.map_err(|e| anyhow!("[{}] {what}: {e}", self.ns)),
            Err(_) => bail!(
                "[{}] {what}: no answer within {CALL_TIMEOUT:?} (node thread stuck or dead)",
                self.ns
            ),
        }
    }

    pub fn setup(&self, spec: &NodeSpec) -> Result<NodeState> {
        let spec = spec.clone();
        self.call("setup", |r| Command::Setup(spec, r))
    }

    pub fn add_peer(&self, peer: &Peer) -> Result<()> {
        let peer = *peer;
        self.call("add_peer", |r| Command::AddPeer(peer, r))
    }

    pub fn remove_peer(&self, peer: &Peer) -> Result<()> {
        let peer = *peer;
        self.call("remove_peer", |r| Command::RemovePeer(peer, r))
    }

    pub fn peers(&self) -> Result<Vec<Peer>> {
        self.call("peers", Command::Peers)
    }

    /// The eBPF counters (None for the kernel datapath).
    pub fn counters(&self) -> Result<Option<Counters>> {
        self.call("counters", Command::Counters)
    }

    /// Ids of the attached programs (None for the kernel datapath).
    pub fn program_ids(&self) -> Result<Option<ProgramIds>> {
        self.call("program_ids", Command::ProgramIds)
    }

    pub fn teardown(&self) -> Result<()> {
        self.call("teardown", Command::Teardown)
    }

    /// What the agent does on a link event: the fast path follows the pod veths.
    pub fn sync_pods(&self) -> Result<()> {
        self.call("sync_pods", Command::SyncPods)
    }
}

async fn serve(flavor: Flavor, mut rx: mpsc::UnboundedReceiver<Command>) {
    let mut dp = match flavor {
        Flavor::Ebpf(options) => AnyDatapath::Ebpf(EbpfDatapath::new(options)),
        Flavor::Kernel => AnyDatapath::Kernel(KernelDatapath::new()),
    };
    let mut set_up = false;
    while let Some(cmd) = rx.recv().await {
        match cmd {
            Command::Setup(spec, r) => {
                let res = dp.setup(&spec).await;
                set_up |= res.is_ok();
                let _ = r.send(res.map_err(|e| chain(&e)));
            }
            Command::AddPeer(p, r) => {
                let _ = r.send(dp.add_peer(&p).await.map_err(|e| chain(&e)));
            }
            Command::RemovePeer(p, r) => {
                let _ = r.send(dp.remove_peer(&p).await.map_err(|e| chain(&e)));
            }
            Command::Peers(r) => {
                let _ = r.send(dp.peers().await.map_err(|e| chain(&e)));
            }
            Command::Counters(r) => {
                let res = match &dp {
                    AnyDatapath::Ebpf(d) => d.counters().map(Some).map_err(|e| chain(&e)),
                    AnyDatapath::Kernel(_) => Ok(None),
                };
                let _ = r.send(res);
            }
            Command::ProgramIds(r) => {
                let res = match &dp {
                    AnyDatapath::Ebpf(d) => Ok(d.program_ids()),
                    AnyDatapath::Kernel(_) => Ok(None),
                };
                let _ = r.send(res);
            }
            Command::SyncPods(r) => {
                let _ = r.send(dp.sync_pods().await.map_err(|e| chain(&e)));
            }
            Command::Teardown(r) => {
                let res = dp.teardown().await;
                set_up &= res.is_err();
                let _ = r.send(res.map_err(|e| chain(&e)));
            }
        }
    }
    // The handle was dropped: remove what we created (the namespace may be
    // deleted right after, but BPF objects and links must not outlive the test).
    if set_up && let Err(e) = dp.teardown().await {
        eprintln!("node teardown on drop: {}", chain(&e));
    }
    drop(dp);
}

impl Drop for Node {
    fn drop(&mut self) {
        // Closing the channel ends `serve`, which tears down and returns.
        self.commands = None;
        let deadline = Instant::now() + CALL_TIMEOUT;
        match self
            .done
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(()) | Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                if let Some(t) = self.thread.take()
                    && let Err(panic) = t.join()
                {
                    eprintln!(
                        "node thread for {} panicked: {}",
                        self.ns,
                        netns::panic_message(&panic)
                    );
                }
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                eprintln!(
                    "node thread for {} did not stop within {CALL_TIMEOUT:?}; leaving it",
                    self.ns
                );
            }
        }
    }
}
