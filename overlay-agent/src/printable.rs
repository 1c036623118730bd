//! Strings from etcd and the API server (lease keys and values, node names,
//! annotation values) are written by any node holding the shared
//! credentials. Printed raw into a log line or `overlay-agent status`, a
//! newline forges another log line and an ESC sequence rewrites the
//! operator's terminal. [`printable`] escapes them where they are printed.

use std::{borrow::Cow, fmt::Write};

/// `s` with control characters escaped: C0 (tab included), DEL and C1 as
/// `\xNN`, and the bidirectional overrides and isolates (which reorder what
/// a terminal shows) as `\u{NNNN}`. Borrowed when there is nothing to
/// escape, which is the usual case.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            c if !needs_escape(c) => out.push(c),
            c if u32::from(c) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c => {
                let _ = write!(out, "\\u{{{:04x}}}", u32::from(c));
            }
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control() // C0, DEL, C1
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_as_is() {
        let key = "/coreos.com/network/subnets/10.0.1.0-24";
        assert!(matches!(printable(key), Cow::Borrowed(k) if k == key));
        assert!(matches!(printable("nöde-ü 漢"), Cow::Borrowed(_)));
    }

    #[test]
    fn controls_are_escaped() {
        assert_eq!(
            printable("a\nINFO forged\r\x1b[2Jb\t\0\x7f"),
            "a\\x0aINFO forged\\x0d\\x1b[2Jb\\x09\\x00\\x7f"
        );
        // C1, e.g. the one-byte CSI.
        assert_eq!(printable("x\u{9b}31m"), "x\\x9b31m");
        assert_eq!(printable("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
        // A backslash stays: only what a terminal acts on is escaped.
        assert_eq!(printable("a\\b"), "a\\b");
    }
}
