//! Observing a running mesh from the metrics its proxies export (the
//! `weft_requests_total` / `weft_request_duration_seconds` contract), read
//! back from Prometheus: the library behind `weftctl stat` and
//! `weftctl graph`, also called by the demo.
//!
//! - [`prom`]: a small client of the Prometheus HTTP API (instant queries).
//! - [`stat`]: golden signals (success rate, requests per second, latency
//!   quantiles) per workload, service or route.
//! - [`graph`]: the service topology (who calls whom, with rps, success rate
//!   and p99 per edge), as DOT or as a laid-out SVG ([`layout`], [`svg`]).
//!
//! A request counts as a success when its `response_code` is not 5xx
//! (`grpc_status` is not looked at; a response the proxy made itself, e.g. a
//! `503` after a failed connect, is a failure through its code).

pub mod graph;
pub mod layout;
pub mod prom;
pub mod stat;
pub mod svg;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

pub use prom::{Prom, Sample};

/// Everything that can go wrong while asking Prometheus, each variant with
/// the Prometheus URL so a message alone says which server failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The `--prometheus` value is not a usable `http://` URL.
    #[error("invalid Prometheus URL {url:?}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No TCP connection could be made.
    #[error("cannot reach Prometheus at {url}: {cause}")]
    Unreachable {
        /// The Prometheus URL.
        url: String,
        /// The connect error, e.g. `Connection refused (os error 111)`.
        cause: String,
    },
    /// The connection broke before a whole answer arrived.
    #[error("lost the connection to Prometheus at {url} before its answer was complete: {cause}")]
    Transport {
        /// The Prometheus URL.
        url: String,
        /// The HTTP-level error.
        cause: String,
    },
    /// No whole answer within the client timeout.
    #[error(
        "Prometheus at {url} did not answer within {} (raise --timeout or shorten --window)",
        fmt_duration(*timeout)
    )]
    Timeout {
        /// The Prometheus URL.
        url: String,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// Prometheus answered with its error envelope (`"status":"error"`).
    #[error("Prometheus at {url} refused the query ({error_type}): {error}\n  query: {query}")]
    Api {
        /// The Prometheus URL.
        url: String,
        /// Its `errorType`, e.g. `bad_data`, `timeout`.
        error_type: String,
        /// Its `error` text.
        error: String,
        /// The PromQL sent.
        query: String,
    },
    /// A non-2xx HTTP answer that is not Prometheus's JSON envelope (a proxy
    /// in front of it, or not a Prometheus at all).
    #[error("Prometheus at {url} answered HTTP {status}: {body}")]
    Http {
        /// The Prometheus URL.
        url: String,
        /// The HTTP status code.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// A 2xx answer that is not the JSON the API documents (truncated, or a
    /// result type these queries never produce).
    #[error("unreadable answer from Prometheus at {url}: {reason}")]
    Decode {
        /// The Prometheus URL.
        url: String,
        /// What did not parse.
        reason: String,
    },
    /// Prometheus holds no `weft_requests_total` series at all.
    #[error("no weft_requests_total series in Prometheus at {url}: are the proxies scraped?")]
    NoSeries {
        /// The Prometheus URL.
        url: String,
    },
}

/// A Prometheus range-vector window such as `1m` or `1h30m`, checked when
/// parsed so it can be pasted into PromQL as is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window(String);

impl Window {
    /// The window as PromQL writes it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its length.
    pub fn duration(&self) -> Duration {
        parse_duration(&self.0).unwrap_or_default()
    }
}

impl FromStr for Window {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match parse_duration(s) {
            Some(d) if !d.is_zero() => Ok(Self(s.to_owned())),
            _ => Err(format!(
                "{s:?} is not a Prometheus duration such as 30s, 1m, 5m or 1h30m"
            )),
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Kubernetes namespace name (an RFC 1123 label), checked when parsed so
/// it can be pasted into a PromQL label matcher as is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace(String);

impl Namespace {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Namespace {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "{s:?} is not a namespace name (lower-case letters, digits and '-', at most 63)"
            ))
        }
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which proxy's count of a request to read: every request between two
/// meshed pods is counted twice, once by each side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reporter {
    /// The client's proxy (outbound): knows the route that matched and
    /// counts answers the proxy made itself (connect failures, faults).
    Source,
    /// The server's proxy (inbound): also sees callers outside the mesh.
    Destination,
}

impl Reporter {
    /// The `reporter` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Destination => "destination",
        }
    }
}

/// A duration in Prometheus notation (`500ms`, `10s`, `1m`, `1h30m`, units
/// `ms s m h d w y` in decreasing order), or a bare number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    if s.is_empty() {
        return None;
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    const UNITS: [(&str, u64); 7] = [
        ("y", 365 * 86_400_000),
        ("w", 7 * 86_400_000),
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ];
    let mut rest = s;
    let mut total_ms: u64 = 0;
    let mut last_unit = None::<usize>;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        // "ms" before "m": the longer unit wins.
        let (unit, per_ms) = UNITS
            .iter()
            .enumerate()
            .filter(|(_, (u, _))| rest.starts_with(u))
            .max_by_key(|(_, (u, _))| u.len())
            .map(|(i, (u, ms))| (i, (u.len(), *ms)))?;
        if last_unit.is_some_and(|last| unit <= last) {
            return None;
        }
        last_unit = Some(unit);
        rest = &rest[per_ms.0..];
        total_ms = total_ms.checked_add(n.checked_mul(per_ms.1)?)?;
    }
    Some(Duration::from_millis(total_ms))
}

/// `10s`, `1.5s`, `250ms`.
fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else if d.as_secs() == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

/// Columns aligned as kubectl prints them: each column as wide as its
/// widest cell, three spaces between columns, no trailing blanks.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("   ");
            }
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', w - cell.chars().count()));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A success rate as a percentage, `-` when there was no traffic.
pub fn fmt_success(rate: Option<f64>) -> String {
    rate.map_or_else(|| "-".to_owned(), |r| format!("{:.2}%", r * 100.0))
}

/// Requests per second.
pub fn fmt_rps(rps: f64) -> String {
    format!("{rps:.2}")
}

/// A latency in milliseconds, with more digits as it gets smaller; `-`
/// when unknown (no requests in the window).
pub fn fmt_ms(ms: Option<f64>) -> String {
    match ms {
        None => "-".to_owned(),
        Some(ms) if ms >= 100.0 => format!("{ms:.0}ms"),
        Some(ms) if ms >= 10.0 => format!("{ms:.1}ms"),
        Some(ms) => format!("{ms:.2}ms"),
    }
}

/// `Some(v)` when `v` is a finite number: Prometheus answers `NaN` for a
/// quotient or quantile over no requests.
pub(crate) fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_prometheus_notation() {
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("10"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("2d"), Some(Duration::from_secs(172_800)));
        for bad in ["", "m", "1x", "1m1h", "1s1s", "-1m", "1.5m", "5m "] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn windows_and_namespaces_are_checked() {
        assert_eq!(
            "5m".parse::<Window>().map(|w| w.duration()),
            Ok(Duration::from_secs(300))
        );
        assert!("0s".parse::<Window>().is_err());
        assert!("5m]) or vector(1".parse::<Window>().is_err());
        assert!("demo".parse::<Namespace>().is_ok());
        assert!("team-a1".parse::<Namespace>().is_ok());
        for bad in ["", "Demo", "a\"b", "-a", "a-", "a.b", &"x".repeat(64)] {
            assert!(bad.parse::<Namespace>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tables_align_like_kubectl() {
        let t = render_table(
            &["NAMESPACE", "WORKLOAD", "RPS"],
            &[
                vec!["demo".into(), "frontend".into(), "1.00".into()],
                vec!["demo".into(), "db".into(), "12.50".into()],
            ],
        );
        assert_eq!(
            t,
            "NAMESPACE   WORKLOAD   RPS\n\
             demo        frontend   1.00\n\
             demo        db         12.50\n"
        );
    }

    #[test]
    fn numbers_format_for_people() {
        assert_eq!(fmt_success(Some(0.985)), "98.50%");
        assert_eq!(fmt_success(None), "-");
        assert_eq!(fmt_ms(Some(1234.4)), "1234ms");
        assert_eq!(fmt_ms(Some(23.46)), "23.5ms");
        assert_eq!(fmt_ms(Some(0.5)), "0.50ms");
        assert_eq!(fmt_ms(None), "-");
        assert_eq!(fmt_rps(2.0), "2.00");
        assert_eq!(fmt_duration(Duration::from_secs(10)), "10s");
        assert_eq!(fmt_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(finite(f64::NAN), None);
        assert_eq!(finite(f64::INFINITY), None);
        assert_eq!(finite(0.5), Some(0.5));
    }
}
