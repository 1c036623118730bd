//! The guard of the layering [`crate`]'s documentation describes: a lower
//! layer never names an upper one. A plain scan of the sources (comments
//! left out) for the crate's top-level modules each file names through
//! `crate::` paths, grouped `use crate::{a::.., b::..}` included.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

/// The host's plumbing: it may use flanneld's formats and itself, nothing above.
const HOST: &[&str] = &["netlink", "iface", "ipmasq", "notify", "netns"];

/// Leaf helpers under everything (escaping strings for logs): any layer may
/// name them, they name nothing of the crate.
const LEAVES: &[&str] = &["printable"];

/// Each layer: its files (a folder or a file, below `src/`) and the top-level
/// modules they may name.
fn rules() -> Vec<(&'static str, Vec<&'static str>)> {
    let host_allows: Vec<&str> = ["flannel"]
        .iter()
        .chain(HOST)
        .chain(LEAVES)
        .copied()
        .collect();
    let mut rules = vec![(
        "flannel",
        ["flannel"].iter().chain(LEAVES).copied().collect(),
    )];
    rules.push(("printable.rs", vec![]));
    for file in [
        "netlink",
        "iface.rs",
        "ipmasq",
        "ipmasq.rs",
        "notify.rs",
        "netns.rs",
    ] {
        rules.push((file, host_allows.clone()));
    }
    let mut subnet = host_allows.clone();
    subnet.push("subnet");
    rules.push(("subnet", subnet));
    let mut datapath = host_allows.clone();
    datapath.push("datapath");
    rules.push(("datapath", datapath));
    // The flag values are what both flag sets parse with: nothing else.
    rules.push(("cli/values.rs", vec![]));
    rules.push(("cli/compat.rs", vec![]));
    rules
}

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let mut entries: Vec<_> = fs::read_dir(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for entry in entries {
            rust_files(&entry, out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_owned());
    }
}

/// The source without `//` comments (doc comments included: an intra-doc
/// link upward is not an import). Good enough for this crate's sources: a
/// `//` inside a string literal only hides the rest of its line.
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|line| line.find("//").map_or(line, |at| &line[..at]))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The top-level modules named after `prefix` (`crate::` or `super::`):
/// `crate::a::b` names `a`, `crate::{a::b, c}` names `a` and `c`.
fn named_after(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices(prefix) {
        let rest = text[at + prefix.len()..].trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item_start = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' | ',' if depth == 1 => {
                        let name = ident(group[item_start..i].trim_start());
                        if !name.is_empty() {
                            names.insert(name.to_owned());
                        }
                        if c == '}' {
                            break;
                        }
                        item_start = i + 1;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

#[test]
fn scanner_sees_plain_and_grouped_paths() {
    let text = "use crate::{\n    datapath::{DatapathError, Peer},\n    flannel::mac::MacAddr,\n};\n\
                fn f() -> crate::daemon::X { crate::subnet::y() }\n// crate::health\n";
    let names = named_after(&strip_comments(text), "crate::");
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["daemon", "datapath", "flannel", "subnet"]
    );
    assert_eq!(
        named_after("use super::{values::parse_go_bool, Cli};", "super::")
            .into_iter()
            .collect::<Vec<_>>(),
        ["Cli", "values"]
    );
}

#[test]
fn lower_layers_never_import_upper_ones() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut problems = Vec::new();
    for (under, allowed) in rules() {
        let mut files = Vec::new();
        rust_files(&src.join(under), &mut files);
        assert!(!files.is_empty(), "no sources under src/{under}");
        for file in files {
            let text = strip_comments(&fs::read_to_string(&file).unwrap());
            let shown = file.strip_prefix(&src).unwrap().display().to_string();
            for name in named_after(&text, "crate::") {
                if !allowed.contains(&name.as_str()) {
                    problems.push(format!("src/{shown} names crate::{name}"));
                }
            }
            // The flag values and the compatibility flags are leaves below
            // `cli`: `super::` from them may only reach the values.
            if under.starts_with("cli/") {
                for name in named_after(&text, "super::") {
                    if name != "values" {
                        problems.push(format!("src/{shown} names super::{name}"));
                    }
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "an upward import (see the layers in lib.rs):\n{}",
        problems.join("\n")
    );
}
