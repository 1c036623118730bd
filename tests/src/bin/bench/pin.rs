//! Sender and receiver on separate CPUs.
//!
//! Unpinned, the scheduler moves the tools between the two cores and puts
//! them on top of the softirq work they cause, differently from one run to
//! the next: most of the spread of unpinned samples on this 2-core machine.
//! Pinned, the sender's CPU also does the forward path's softirq (a veth
//! transmit runs the receive side on the sending CPU's backlog) and the
//! receiver's CPU the reverse path's, the same in every mode and round.

use anyhow::{Result, bail};

/// Where the client (sender) and the server (receiver) run; `None` on a
/// machine with one CPU, where nothing is pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pinning {
    pub client: Option<usize>,
    pub server: Option<usize>,
}

impl Pinning {
    /// The first two CPUs this process may run on, if there are two.
    pub fn detect() -> Pinning {
        let cpus = allowed_cpus();
        match cpus.as_slice() {
            [a, b, ..] => Pinning {
                client: Some(*a),
                server: Some(*b),
            },
            _ => Pinning::NONE,
        }
    }

    pub const NONE: Pinning = Pinning {
        client: None,
        server: None,
    };

    /// `taskset -c <cpu>` in front of a tool's command line (taskset execs
    /// the tool, so its pid stays the tool's), or nothing.
    pub fn prefix(cpu: Option<usize>) -> Vec<String> {
        match cpu {
            Some(c) => vec!["taskset".into(), "-c".into(), c.to_string()],
            None => Vec::new(),
        }
    }

    pub fn describe(&self) -> String {
        match (self.client, self.server) {
            (Some(c), Some(s)) => format!("client on CPU {c}, server on CPU {s}"),
            _ => "not pinned (fewer than 2 CPUs)".into(),
        }
    }
}

/// The CPUs the calling thread may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity
    // fills it for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|c| libc::CPU_ISSET(*c, &set))
            .collect()
    }
}

/// Pins the calling thread to `cpu` (nothing for `None`).
pub fn pin_thread(cpu: Option<usize>) -> Result<()> {
    let Some(cpu) = cpu else {
        return Ok(());
    };
    // SAFETY: as above; sched_setaffinity(0, ...) affects the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        bail!(
            "sched_setaffinity(CPU {cpu}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
