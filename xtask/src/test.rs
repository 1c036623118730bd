//! `cargo xtask test`: formatting, lints (host crates, and the eBPF crate for
//! its real target), the runtime image (`cargo xtask image`), then every test
//! including the root-only end-to-end ones.
//!
//! All steps run even when an earlier one fails, so one CI log shows every
//! problem; the command fails if any step failed or if no test ran.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::run;
use crate::setup::NIGHTLY;

/// The crate that only builds for BPF; the host steps leave it out and a
/// separate clippy run checks it with the pinned nightly.
const EBPF_CRATE: &str = "overlay-ebpf";

pub fn run(filters: &[String]) -> Result<()> {
    let mut failed = Vec::new();
    let mut took = Vec::new();
    let mut step = |name: &str, f: &mut dyn FnMut() -> Result<()>| {
        let t0 = std::time::Instant::now();
        eprintln!("xtask test: {name} ...");
        let result = f();
        let secs = t0.elapsed().as_secs_f64();
        took.push((name.to_owned(), secs, result.is_ok()));
        match result {
            Ok(()) => eprintln!("xtask test: {name}: ok in {secs:.1} s"),
            Err(e) => {
                eprintln!("xtask test: step `{name}` failed after {secs:.1} s: {e:#}");
                failed.push(name.to_owned());
            }
        }
    };

    step("fmt", &mut || {
        run::status(run::cargo().args(["fmt", "--all", "--check"]))
    });
    step("clippy (host)", &mut || {
        run::status(run::cargo().args([
            "clippy",
            "--quiet",
            "--workspace",
            "--exclude",
            EBPF_CRATE,
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    });
    step("clippy (bpf)", &mut || run::status(&mut clippy_bpf()));
    // Before the tests, so its time is counted here (the container tests
    // find it cached; they build it themselves if it is missing).
    step("image", &mut || {
        crate::build()?;
        crate::image::build(&crate::release_agent())
    });
    let mut outcome = None;
    step("cargo test", &mut || {
        let (totals, failures, tested) = cargo_test(filters);
        outcome = Some((totals, failures));
        tested
    });
    let (totals, failures) = outcome.unwrap_or_default();

    eprintln!("\nxtask test: time per step");
    for (name, secs, ok) in &took {
        let mark = if *ok { "ok" } else { "FAILED" };
        eprintln!("  {name:<14} {secs:>7.1} s  {mark}");
    }
    if !failures.is_empty() {
        // Again at the end, where a truncated CI log still shows it.
        println!("\n=== why the failed tests failed ===");
        for l in &failures {
            println!("{l}");
        }
    }
    eprintln!();
    if failed.is_empty() {
        eprintln!("xtask test: fmt, clippy (host, bpf) and tests all passed");
    } else {
        eprintln!("xtask test: failed steps: {}", failed.join(", "));
    }
    // The plain closing line CI reads: the sum over every test binary.
    println!(
        "total: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !failed.is_empty() {
        bail!("{} step(s) failed: {}", failed.len(), failed.join(", "));
    }
    if totals.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// Lints the eBPF crate as it is really compiled: for bpfel with core built
/// from source by the pinned nightly (what aya-build does, minus linking).
fn clippy_bpf() -> Command {
    let mut cmd = run::rustup_run(NIGHTLY, "cargo");
    cmd.args([
        "clippy",
        "--quiet",
        "--package",
        EBPF_CRATE,
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]);
    cmd
}

/// Runs `cargo test` over the workspace with the ignored (root-only) tests
/// included, one test at a time because the end-to-end tests share kernel
/// state (namespaces, bpffs, XDP on shared devices). Output is passed through
/// unchanged; the `test result:` lines are summed, also when some failed.
fn cargo_test(filters: &[String]) -> (Totals, Vec<String>, Result<()>) {
    let mut totals = Totals::default();
    let mut failures = Failures::default();
    let result = run_cargo_test(filters, &mut totals, &mut failures);
    (totals, failures.lines, result)
}

fn run_cargo_test(filters: &[String], totals: &mut Totals, failures: &mut Failures) -> Result<()> {
    let mut cmd = run::cargo();
    cmd.args([
        "test",
        "--workspace",
        "--exclude",
        EBPF_CRATE,
        "--no-fail-fast",
        "--",
        "--include-ignored",
        "--test-threads=1",
    ])
    .args(filters);
    if std::env::var_os("RUST_BACKTRACE").is_none() {
        cmd.env("RUST_BACKTRACE", "1");
    }
    let line = run::display(&cmd);
    eprintln!("$ {line}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{line}`"))?;
    let stdout = child.stdout.take().expect("piped");
    for l in BufReader::new(stdout).lines() {
        let l = l?;
        println!("{l}");
        failures.see(&l);
        if let Some(t) = Totals::parse(&l) {
            totals.add(t);
        }
    }
    let st = child.wait()?;
    if !st.success() {
        bail!("`{line}` failed ({st}); {} test(s) failed", totals.failed);
    }
    Ok(())
}

/// The lines libtest prints about failed tests (from its first `failures:`
/// to the `test result:` line of that binary), each block cut to its first
/// and last lines so one long agent log cannot hide the others.
#[derive(Debug, Default)]
struct Failures {
    lines: Vec<String>,
    block: Option<Vec<String>>,
}

impl Failures {
    /// Lines kept at each end of one binary's block.
    const KEEP: usize = 60;

    fn see(&mut self, line: &str) {
        match &mut self.block {
            None if line == "failures:" => self.block = Some(vec![line.to_owned()]),
            None => {}
            Some(block) => {
                block.push(line.to_owned());
                if Totals::parse(line).is_some() {
                    let block = self.block.take().expect("matched Some");
                    self.keep(block);
                }
            }
        }
    }

    fn keep(&mut self, block: Vec<String>) {
        if block.len() <= 2 * Self::KEEP {
            self.lines.extend(block);
            return;
        }
        let cut = block.len() - 2 * Self::KEEP;
        self.lines.extend_from_slice(&block[..Self::KEEP]);
        self.lines.push(format!("[... {cut} lines ...]"));
        self.lines
            .extend_from_slice(&block[block.len() - Self::KEEP..]);
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    /// Parses libtest's `test result: ok. 3 passed; 0 failed; 1 ignored; ...`.
    fn parse(line: &str) -> Option<Self> {
        let rest = line.trim().strip_prefix("test result: ")?;
        let (_verdict, counts) = rest.split_once(". ")?;
        let mut t = Self::default();
        for part in counts.split(';') {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => t.passed = n,
                "failed" => t.failed = n,
                "ignored" => t.ignored = n,
                _ => {}
            }
        }
        Some(t)
    }

    fn add(&mut self, o: Self) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.ignored += o.ignored;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libtest_summaries() {
        let ok = "test result: ok. 12 passed; 0 failed; 3 ignored; 0 measured; 0 filtered out; finished in 0.01s";
        assert_eq!(
            Totals::parse(ok),
            Some(Totals {
                passed: 12,
                failed: 0,
                ignored: 3
            })
        );
        let bad = "test result: FAILED. 4 passed; 2 failed; 0 ignored; 0 measured; 1 filtered out; finished in 9.90s";
        assert_eq!(
            Totals::parse(bad),
            Some(Totals {
                passed: 4,
                failed: 2,
                ignored: 0
            })
        );
        assert_eq!(Totals::parse("test foo ... ok"), None);
        assert_eq!(Totals::parse("running 3 tests"), None);
    }

    #[test]
    fn keeps_what_libtest_says_about_failures() {
        let mut f = Failures::default();
        for l in [
            "test a ... ok",
            "test b ... FAILED",
            "",
            "failures:",
            "",
            "---- b stdout ----",
            "Error: peer not within 20s",
            "",
            "failures:",
            "    b",
            "",
            "test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s",
            "running 2 tests",
            "test c ... ok",
            "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s",
        ] {
            f.see(l);
        }
        assert_eq!(f.lines.first().map(String::as_str), Some("failures:"));
        assert!(f.lines.iter().any(|l| l == "Error: peer not within 20s"));
        assert!(f.lines.last().unwrap().starts_with("test result: FAILED"));
        assert!(!f.lines.iter().any(|l| l.contains("test c")));
    }

    #[test]
    fn cuts_long_failure_blocks_in_the_middle() {
        let mut f = Failures::default();
        f.see("failures:");
        for i in 0..500 {
            f.see(&format!("log line {i}"));
        }
        f.see("test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s");
        assert_eq!(f.lines.len(), 2 * Failures::KEEP + 1);
        assert!(f.lines.iter().any(|l| l.starts_with("[... ")));
        assert!(f.lines.last().unwrap().starts_with("test result: FAILED"));
    }

    #[test]
    fn sums_over_binaries() {
        let mut t = Totals::default();
        t.add(Totals {
            passed: 1,
            failed: 2,
            ignored: 3,
        });
        t.add(Totals {
            passed: 10,
            failed: 0,
            ignored: 1,
        });
        assert_eq!(
            t,
            Totals {
                passed: 11,
                failed: 2,
                ignored: 4
            }
        );
    }
}
