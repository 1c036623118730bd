//! Driving a datapath inside a network namespace.
//!
//! `setns(CLONE_NEWNET)` moves only the calling thread, and netlink sockets and
//! interface-name lookups belong to the namespace of the thread that makes
//! them. A [`NetnsWorker`] is a thread that has entered a namespace and owns a
//! value (typically a datapath) for as long as the worker lives, with a
//! current-thread tokio runtime to run its async calls on. That matters for the
//! eBPF datapath, whose programs stay attached only while it is alive.
//!
//! ```no_run
//! use overlay_agent::{datapath::{Datapath, kernel::KernelDatapath}, netns::NetnsWorker};
//! # fn spec() -> overlay_agent::datapath::NodeSpec { unimplemented!() }
//! let node = NetnsWorker::spawn("h2-a", KernelDatapath::new)?;
//! let spec = spec();
//! let state = node.run(move |dp, rt| rt.block_on(dp.setup(&spec)))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::{
    any::Any,
    fs::File,
    io,
    os::fd::AsRawFd,
    panic::{AssertUnwindSafe, catch_unwind, resume_unwind},
    sync::mpsc,
    thread,
};

use tokio::runtime::Runtime;

/// Moves the calling thread into the namespace `ip netns add <name>` created
/// (`/run/netns/<name>`). Only for threads made for that purpose.
pub fn enter(name: &str) -> io::Result<()> {
    let path = format!("/run/netns/{name}");
    let file = File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    // SAFETY: setns(2) with a namespace fd we own; it affects this thread only.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("setns({path}): {e}")));
    }
    Ok(())
}

type Job<S> = Box<dyn FnOnce(&mut S, &Runtime) + Send>;

/// A thread inside a network namespace that owns an `S` and runs closures on it.
pub struct NetnsWorker<S> {
    netns: String,
    jobs: Option<mpsc::Sender<Job<S>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl<S: 'static> NetnsWorker<S> {
    /// Starts a thread in namespace `netns`, builds its runtime, and creates the
    /// state there with `init` (inside the runtime's context).
    pub fn spawn(netns: &str, init: impl FnOnce() -> S + Send + 'static) -> io::Result<Self> {
        let (jobs, inbox) = mpsc::channel::<Job<S>>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<()>>(1);
        let ns = netns.to_owned();
        let thread = thread::Builder::new()
            .name(format!("netns:{netns}"))
            .spawn(move || {
                let runtime = enter(&ns).and_then(|()| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                });
                let runtime = match runtime {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let guard = runtime.enter();
                let mut state = init();
                drop(guard);
                let _ = ready_tx.send(Ok(()));
                while let Ok(job) = inbox.recv() {
                    job(&mut state, &runtime);
                }
                // Dropped here, in the namespace and with a runtime at hand
                // (the datapath's netlink task and program links live here).
                let _guard = runtime.enter();
                drop(state);
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                netns: netns.to_owned(),
                jobs: Some(jobs),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let panic = thread.join().err();
                Err(io::Error::other(format!(
                    "netns worker for {netns} died while starting: {}",
                    panic.as_ref().map_or("?".into(), panic_message)
                )))
            }
        }
    }

    /// Runs `f` on the worker's thread with its state and runtime and returns
    /// the result; a panic inside `f` is re-raised here.
    pub fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut S, &Runtime) -> R + Send + 'static,
    ) -> R {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job<S> = Box::new(move |state, rt| {
            let _ = tx.send(catch_unwind(AssertUnwindSafe(|| f(state, rt))));
        });
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(job));
        if !matches!(sent, Some(Ok(()))) {
            panic!("netns worker for {} is gone", self.netns);
        }
        match rx.recv() {
            Ok(Ok(r)) => r,
            Ok(Err(panic)) => resume_unwind(panic),
            Err(_) => panic!("netns worker for {} died while running a job", self.netns),
        }
    }

    pub fn netns(&self) -> &str {
        &self.netns
    }
}

impl<S> Drop for NetnsWorker<S> {
    /// Drops the state on the worker thread and waits for it.
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn panic_message(panic: &Box<dyn Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic)".to_owned()
    }
}
