//! Durations as they appear in weft resources: strings such as `250ms`, `5s`,
//! `1m30s` or `24h`, the notation Kubernetes users already write in Istio,
//! Gateway API and kubelet flags.
//!
//! The schema carries a `pattern`, so the API server rejects a malformed value
//! before weft ever sees it; [`Duration::to_std`] is the single parser used by
//! the operator, so what validates is exactly what renders.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// The regular expression the API server enforces for every duration field.
pub const DURATION_PATTERN: &str = r"^([0-9]{1,9}(\.[0-9]{1,9})?(ms|s|m|h))+$";

/// A duration written as a string (`250ms`, `5s`, `1m30s`, `24h`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Duration(pub String);

/// Why a duration string could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DurationError(pub String);

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid duration {:?}: expected numbers with units ms, s, m or h, e.g. 250ms, 5s, 1m30s",
            self.0
        )
    }
}

impl std::error::Error for DurationError {}

impl Duration {
    /// Builds a duration from its string form without checking it; use
    /// [`Duration::to_std`] to validate.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// Parses the string into a [`std::time::Duration`].
    pub fn to_std(&self) -> Result<std::time::Duration, DurationError> {
        parse(&self.0).ok_or_else(|| DurationError(self.0.clone()))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn parse(s: &str) -> Option<std::time::Duration> {
    if s.is_empty() {
        return None;
    }
    let mut total_nanos: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&n| n > 0)?;
        let (num, after) = rest.split_at(num_len);
        let (unit_nanos, unit_len) = if after.starts_with("ms") {
            (1_000_000u128, 2)
        } else if after.starts_with('s') {
            (1_000_000_000, 1)
        } else if after.starts_with('m') {
            (60_000_000_000, 1)
        } else if after.starts_with('h') {
            (3_600_000_000_000, 1)
        } else {
            return None;
        };
        let (whole, frac) = match num.split_once('.') {
            Some((w, f)) if !w.is_empty() && !f.is_empty() && !f.contains('.') => (w, f),
            Some(_) => return None,
            None => (num, ""),
        };
        if whole.len() > 9 || frac.len() > 9 {
            return None;
        }
        let whole: u128 = whole.parse().ok()?;
        let mut nanos = whole * unit_nanos;
        if !frac.is_empty() {
            let frac_val: u128 = frac.parse().ok()?;
            nanos += frac_val * unit_nanos / 10u128.pow(frac.len() as u32);
        }
        total_nanos = total_nanos.checked_add(nanos)?;
        rest = &after[unit_len..];
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000).ok()?;
    Some(std::time::Duration::new(
        secs,
        (total_nanos % 1_000_000_000) as u32,
    ))
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration as Std;

    #[test]
    fn parses_common_forms() {
        let cases = [
            ("250ms", Std::from_millis(250)),
            ("5s", Std::from_secs(5)),
            ("1m30s", Std::from_secs(90)),
            ("24h", Std::from_secs(86_400)),
            ("1.5s", Std::from_millis(1500)),
            ("0s", Std::ZERO),
            ("1h1m1s1ms", Std::from_millis(3_661_001)),
        ];
        for (s, want) in cases {
            assert_eq!(Duration::new(s).to_std(), Ok(want), "{s}");
        }
    }

    #[test]
    fn rejects_malformed() {
        for s in [
            "", "5", "s", "5x", "-1s", "1.s", ".5s", "1..5s", "5 s", "1d",
        ] {
            assert!(Duration::new(s).to_std().is_err(), "{s:?} should fail");
        }
    }

    #[test]
    fn parser_agrees_with_schema_pattern() {
        let re = regex::Regex::new(DURATION_PATTERN).expect("pattern compiles");
        for s in [
            "250ms",
            "5s",
            "1m30s",
            "1.5h",
            "5",
            "1d",
            "",
            "1..5s",
            ".5s",
            "1msx",
            "9999999999s",
        ] {
            assert_eq!(re.is_match(s), Duration::new(s).to_std().is_ok(), "{s:?}");
        }
    }
}
