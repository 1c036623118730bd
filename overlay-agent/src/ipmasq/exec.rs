//! Running the iptables binaries, each with a deadline: with the legacy
//! backend every change waits for `/run/xtables.lock`, which any other
//! program on the host (kube-proxy, docker, an admin's `iptables -w`) may
//! hold for as long as it likes. nf_tables' iptables takes no such lock.

use std::{
    io::{Read, Write},
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

/// How long `iptables-restore` waits for the xtables lock (`--wait`).
pub const LOCK_WAIT: Duration = Duration::from_secs(20);
/// Past this a run is killed: the lock wait and then some, so only a hung
/// binary reaches it.
const DEADLINE: Duration = Duration::from_secs(LOCK_WAIT.as_secs() + 10);
/// How often a running binary is checked for having exited.
const POLL: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("cannot run {command}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("{command} did not finish within {limit:?} (killed)")]
    TimedOut { command: String, limit: Duration },
}

/// Runs `program` with `args` (and `input` on its stdin) to completion; its
/// stdout, or why not.
pub fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, IptablesError> {
    run_within(program, args, input, DEADLINE)
}

fn run_within(
    program: &str,
    args: &[&str],
    input: Option<&str>,
    limit: Duration,
) -> Result<String, IptablesError> {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| IptablesError::Spawn {
            command: command.clone(),
            source,
        })?;
    // Each pipe on its own thread: a large iptables-save (kube-proxy's
    // thousands of rules) must not block on a full pipe while we wait.
    let writer = child.stdin.take().zip(input).map(|(mut stdin, text)| {
        let text = text.to_owned();
        thread::spawn(move || {
            // A failed write shows as the binary's own error.
            let _ = stdin.write_all(text.as_bytes());
        })
    });
    let read = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut out);
            }
            String::from_utf8_lossy(&out).into_owned()
        })
    };
    let stdout = read(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = read(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
            // Out of time, or the child cannot be waited for: it goes.
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        None => Err(IptablesError::TimedOut { command, limit }),
        Some(status) if status.success() => Ok(stdout),
        Some(status) => Err(IptablesError::Failed {
            command,
            status,
            stderr: stderr.trim().to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_input_and_failure_are_reported() {
        assert_eq!(
            run("cat", &[], Some("*filter\nCOMMIT\n")).unwrap(),
            "*filter\nCOMMIT\n"
        );
        match run("sh", &["-c", "echo nope >&2; exit 3"], None) {
            Err(IptablesError::Failed { stderr, status, .. }) => {
                assert_eq!(stderr, "nope");
                assert_eq!(status.code(), Some(3));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            run("/nonexistent/iptables", &[], None),
            Err(IptablesError::Spawn { .. })
        ));
    }

    #[test]
    fn a_binary_past_its_deadline_is_killed() {
        let t0 = Instant::now();
        let r = run_within("sleep", &["5"], None, Duration::from_millis(200));
        assert!(matches!(r, Err(IptablesError::TimedOut { .. })), "{r:?}");
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }

    #[test]
    fn a_large_output_does_not_block() {
        let out = run(
            "sh",
            &["-c", "head -c 1000000 /dev/zero | tr '\\0' x"],
            None,
        )
        .unwrap();
        assert_eq!(out.len(), 1_000_000);
    }
}
