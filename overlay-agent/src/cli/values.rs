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

/// `--fast-path-mark`: one bit of `skb->mark`, in hex (`0x1000`) or decimal.
pub fn parse_mark_bit(s: &str) -> Result<u32, String> {
    let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if v.count_ones() != 1 {
        return Err(format!(
            "{s:?} must be a single bit (such as 0x1000), got {} bits set",
            v.count_ones()
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod mark_tests {
    use super::*;

    #[test]
    fn a_mark_is_one_bit_in_hex_or_decimal() {
        assert_eq!(parse_mark_bit("0x1000"), Ok(0x1000));
        assert_eq!(parse_mark_bit("0X2000"), Ok(0x2000));
        assert_eq!(parse_mark_bit("4096"), Ok(0x1000));
        for bad in ["0", "0x3000", "0xffff0000", "mark", "", "0x"] {
            assert!(parse_mark_bit(bad).is_err(), "{bad}");
        }
    }
}
