//! Running Rust code inside a named network namespace.
//!
//! `setns(CLONE_NEWNET)` changes the namespace of the calling thread only, so
//! each call gets a fresh thread: sockets, netlink handles, `if_nametoindex` and
//! `/proc/sys/net` writes made there belong to the target namespace, while the
//! test's own thread stays where it was. `/sys/class/net` is *not* switched
//! (sysfs follows the mount, not the thread): read it with
//! `ip netns exec` (see [`crate::stats`]).

use std::{fs::File, future::Future, os::fd::AsRawFd, thread};

use anyhow::{Context, Result, anyhow, bail};

/// The bind-mount `ip netns add` creates for a namespace.
pub fn netns_path(name: &str) -> String {
    format!("/run/netns/{name}")
}

/// Moves the calling thread into namespace `name`. Only for threads created
/// for that purpose (see [`spawn_in`]).
pub fn enter(name: &str) -> Result<()> {
    let path = netns_path(name);
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns(2) on an open namespace fd; affects only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns({path}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Starts `f` on a new thread inside namespace `name` and returns its handle.
pub fn spawn_in<T, F>(name: &str, f: F) -> Result<thread::JoinHandle<Result<T>>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let ns = name.to_owned();
    thread::Builder::new()
        .name(format!("netns:{name}"))
        .spawn(move || {
            enter(&ns)?;
            f()
        })
        .context("spawning a netns thread")
}

/// Joins a netns thread, turning a panic inside it into an error (with the panic
/// message) so the test reports it instead of hanging or losing it.
pub fn join<T>(handle: thread::JoinHandle<Result<T>>) -> Result<T> {
    match handle.join() {
        Ok(r) => r,
        Err(panic) => Err(anyhow!("netns thread panicked: {}", panic_message(&panic))),
    }
}

pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic)".to_owned()
    }
}

/// Runs `f` inside namespace `name` and waits for its result.
pub fn run_in<T, F>(name: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    join(spawn_in(name, f)?)
}

/// Runs the future made by `f` on a current-thread tokio runtime inside
/// namespace `name` (rtnetlink, aya and async sockets then all live there).
pub fn run_async_in<T, F, Fut>(name: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    run_in(name, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building a tokio runtime")?;
        rt.block_on(f())
    })
}

/// The file behind a sysctl key: dotted (`net.ipv4.ip_forward`) or, for keys
/// that contain an interface name with a dot (`flannel.1`), slashed
/// (`net/ipv4/conf/flannel.1/rp_filter`).
fn sysctl_path(key: &str) -> String {
    if key.contains('/') {
        format!("/proc/sys/{key}")
    } else {
        format!("/proc/sys/{}", key.replace('.', "/"))
    }
}

/// Writes sysctls for namespace `name` (`/proc/sys/net` resolves against the
/// writing thread's namespace). Keys as in [`sysctl_path`].
pub fn sysctl(name: &str, settings: &[(&str, &str)]) -> Result<()> {
    let settings: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let ns = name.to_owned();
    run_in(name, move || {
        for (key, value) in &settings {
            let path = sysctl_path(key);
            std::fs::write(&path, value)
                .with_context(|| format!("[{ns}] sysctl {key}={value} ({path})"))?;
        }
        Ok(())
    })
}

/// Reads one sysctl in namespace `name`.
pub fn sysctl_get(name: &str, key: &str) -> Result<String> {
    let path = sysctl_path(key);
    let ns = name.to_owned();
    run_in(name, move || {
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("[{ns}] reading {path}"))?
            .trim()
            .to_owned())
    })
}
