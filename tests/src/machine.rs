//! Where a benchmark ran: the facts both benchmarks' reports record.

use std::path::{Path, PathBuf};

/// The workspace's root directory (the reports are written below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The first non-empty line a command prints (stdout, then stderr), trimmed;
/// empty when it cannot run.
pub fn first_line(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned()
                + &String::from_utf8_lossy(&o.stderr);
            text.lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

/// The workspace's short commit, with "+ uncommitted changes" when tracked
/// files differ from it.
pub fn commit() -> String {
    let root = workspace_root();
    let root = root.to_string_lossy();
    let mut commit = first_line("git", &["-C", &root, "rev-parse", "--short", "HEAD"]);
    let dirty = first_line(
        "git",
        &["-C", &root, "status", "--porcelain", "--untracked-files=no"],
    );
    if !dirty.is_empty() {
        commit.push_str(" + uncommitted changes");
    }
    commit
}

/// The CPU's model name from `/proc/cpuinfo`.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The running kernel's release.
pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Now, in UTC to the minute.
pub fn utc_now() -> String {
    first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
}

/// The CPUs this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}
