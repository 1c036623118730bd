//! The values flags take, parsed as flanneld (Go) takes them: shared by the
//! agent's own flags ([`super::Cli`]) and the compatibility ones
//! ([`super::compat`]), which import nothing else of each other.

use std::time::Duration;

/// A `Duration` that prints like the flag took it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

/// Go's `strconv.ParseBool`.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("expected true or false, got {s:?}")),
    }
}

/// A duration: digits with a unit (`ms`, `s`, `m`, `h`), e.g. `24h`, `90s`.
pub fn parse_duration(s: &str) -> Result<HumanDuration, String> {
    let bad = || format!("expected a duration such as 30s, 10m or 24h, got {s:?}");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(bad()),
    };
    if d.is_zero() {
        return Err(format!("{s:?} must be more than zero"));
    }
    Ok(HumanDuration(d))
}

/// flanneld's minutes (1..=1439), or a duration with a unit.
pub fn parse_minutes(s: &str) -> Result<HumanDuration, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let m: u64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
        if !(1..=1439).contains(&m) {
            return Err(format!("must be between 1 and 1439 minutes, got {m}"));
        }
        return Ok(HumanDuration(Duration::from_secs(m * 60)));
    }
    parse_duration(s)
}
