//! Trace context in request headers: W3C `traceparent`/`tracestate` and
//! B3 (the single `b3` header and the `x-b3-*` headers), read, continued
//! and written back so that an app using either library propagates the
//! same trace.
//!
//! In: a request's headers. Out: the caller's context ([`Incoming`]), and
//! headers naming a new span ([`TraceContext::write`]) in every format.
//! Precedence when several are present: `traceparent`, then `b3`, then the
//! `x-b3-*` headers; an invalid one is ignored as if absent, so a broken
//! header from an app never breaks the request, it only starts a new trace.

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

/// `traceparent`.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate`.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// B3 single header.
pub const B3: HeaderName = HeaderName::from_static("b3");
/// B3 multi headers.
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
/// See [`B3_TRACE_ID`].
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
/// See [`B3_TRACE_ID`].
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
/// See [`B3_TRACE_ID`].
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
/// See [`B3_TRACE_ID`].
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// Longest `tracestate` passed on (the W3C limit of 32 members of at most
/// 256 characters each, and commas); longer is dropped.
pub const MAX_TRACESTATE: usize = 32 * 257;

/// A 128-bit trace id (a 64-bit B3 id is its low half).
pub type TraceId = [u8; 16];
/// A 64-bit span id.
pub type SpanId = [u8; 8];

/// What a request says about its trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// No usable context: start a trace, sampling by the Mesh's percentage.
    None,
    /// Only a sampling decision (`b3: 0|1|d`, or `x-b3-sampled` alone):
    /// start a trace with that decision.
    Decision(bool),
    /// A context to continue.
    Context(TraceContext),
}

/// One span's place in a trace, as propagated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace.
    pub trace_id: TraceId,
    /// The span (the caller's, when read; ours, when written).
    pub span_id: SpanId,
    /// The caller's caller, when B3 named one (written as B3's parent).
    pub parent_span_id: Option<SpanId>,
    /// Whether the trace is recorded.
    pub sampled: bool,
    /// B3 debug (`x-b3-flags: 1`, `b3: …-d`): sampled, and said so again.
    pub debug: bool,
    /// `tracestate`, passed on unchanged.
    pub state: Option<HeaderValue>,
}

impl TraceContext {
    /// A child of this context: same trace, a new span id, this span as
    /// its parent.
    pub fn child(&self, span_id: SpanId) -> TraceContext {
        TraceContext {
            trace_id: self.trace_id,
            span_id,
            parent_span_id: Some(self.span_id),
            sampled: self.sampled,
            debug: self.debug,
            state: self.state.clone(),
        }
    }

    /// The trace id as 32 lower-case hex digits.
    pub fn trace_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// Writes this context into `h` in every format (replacing what was
    /// there), so whichever library the next app uses reads the same
    /// trace and span.
    pub fn write(&self, h: &mut HeaderMap) {
        let trace = hex(&self.trace_id);
        let span = hex(&self.span_id);
        let sampled = if self.sampled { "1" } else { "0" };
        let flags = if self.sampled { "01" } else { "00" };
        let put = |h: &mut HeaderMap, name: HeaderName, value: String| {
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(name, v);
            }
        };
        put(h, TRACEPARENT, format!("00-{trace}-{span}-{flags}"));
        match &self.state {
            Some(s) => {
                h.insert(TRACESTATE, s.clone());
            }
            None => {
                h.remove(TRACESTATE);
            }
        }
        let single_sampled = if self.debug { "d" } else { sampled };
        put(
            h,
            B3,
            match self.parent_span_id {
                Some(p) => format!("{trace}-{span}-{single_sampled}-{}", hex(&p)),
                None => format!("{trace}-{span}-{single_sampled}"),
            },
        );
        put(h, B3_TRACE_ID, trace);
        put(h, B3_SPAN_ID, span);
        match self.parent_span_id {
            Some(p) => put(h, B3_PARENT_SPAN_ID, hex(&p)),
            None => {
                h.remove(B3_PARENT_SPAN_ID);
            }
        }
        if self.debug {
            h.remove(B3_SAMPLED);
            h.insert(B3_FLAGS, HeaderValue::from_static("1"));
        } else {
            h.insert(
                B3_SAMPLED,
                HeaderValue::from_static(sampled_value(self.sampled)),
            );
            h.remove(B3_FLAGS);
        }
    }
}

fn sampled_value(sampled: bool) -> &'static str {
    if sampled { "1" } else { "0" }
}

/// Reads the trace context of a request.
pub fn read(h: &HeaderMap) -> Incoming {
    let state = h
        .get(TRACESTATE)
        .filter(|v| v.len() <= MAX_TRACESTATE)
        .cloned();
    if let Some(mut c) = h
        .get(TRACEPARENT)
        .and_then(|v| parse_traceparent(v.as_bytes()))
    {
        c.state = state;
        return Incoming::Context(c);
    }
    if let Some(v) = h.get(B3) {
        match parse_b3_single(v.as_bytes()) {
            Some(Incoming::Context(mut c)) => {
                c.state = state;
                return Incoming::Context(c);
            }
            Some(decision) => return decision,
            None => {}
        }
    }
    parse_b3_multi(h, state)
}

/// `traceparent: {version}-{trace-id}-{parent-id}-{flags}`: lower-case
/// hex; version `ff` invalid; all-zero ids invalid; a later version may
/// append fields after a `-`.
fn parse_traceparent(v: &[u8]) -> Option<TraceContext> {
    if v.len() < 55 {
        return None;
    }
    let version = lower_hex::<1>(&v[0..2])?;
    if version[0] == 0xff || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    // Version 00 is exactly 55 characters; later versions may go on.
    if (version[0] == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let trace_id = lower_hex::<16>(&v[3..35]).filter(|t| t != &[0; 16])?;
    let span_id = lower_hex::<8>(&v[36..52]).filter(|s| s != &[0; 8])?;
    let flags = lower_hex::<1>(&v[53..55])?;
    Some(TraceContext {
        trace_id,
        span_id,
        parent_span_id: None,
        sampled: flags[0] & 1 == 1,
        debug: false,
        state: None,
    })
}

/// `b3: {trace}-{span}[-{sampled}[-{parent}]]` or a bare `0`, `1`, `d`.
fn parse_b3_single(v: &[u8]) -> Option<Incoming> {
    match v {
        b"0" => return Some(Incoming::Decision(false)),
        b"1" | b"d" => return Some(Incoming::Decision(true)),
        _ => {}
    }
    let text = std::str::from_utf8(v).ok()?;
    let mut parts = text.split('-');
    let trace_id = b3_trace_id(parts.next()?.as_bytes())?;
    let span_id = b3_span_id(parts.next()?.as_bytes())?;
    let (sampled, debug) = match parts.next() {
        None => (true, false),
        Some("1") => (true, false),
        Some("0") => (false, false),
        Some("d") => (true, true),
        Some(_) => return None,
    };
    let parent_span_id = match parts.next() {
        None => None,
        Some(p) => Some(b3_span_id(p.as_bytes())?),
    };
    if parts.next().is_some() {
        return None;
    }
    Some(Incoming::Context(TraceContext {
        trace_id,
        span_id,
        parent_span_id,
        sampled,
        debug,
        state: None,
    }))
}

/// The `x-b3-*` headers. A missing sampling decision means "sampled" (the
/// caller propagated ids, so it records).
fn parse_b3_multi(h: &HeaderMap, state: Option<HeaderValue>) -> Incoming {
    let debug = h.get(B3_FLAGS).is_some_and(|v| v.as_bytes() == b"1");
    let decision = match h.get(B3_SAMPLED).map(HeaderValue::as_bytes) {
        Some(b"1" | b"true") => Some(true),
        Some(b"0" | b"false") => Some(false),
        _ => None,
    };
    let ids = h
        .get(B3_TRACE_ID)
        .and_then(|v| b3_trace_id(v.as_bytes()))
        .zip(h.get(B3_SPAN_ID).and_then(|v| b3_span_id(v.as_bytes())));
    match ids {
        Some((trace_id, span_id)) => Incoming::Context(TraceContext {
            trace_id,
            span_id,
            parent_span_id: h
                .get(B3_PARENT_SPAN_ID)
                .and_then(|v| b3_span_id(v.as_bytes())),
            sampled: debug || decision.unwrap_or(true),
            debug,
            state,
        }),
        None if debug => Incoming::Decision(true),
        None => decision.map_or(Incoming::None, Incoming::Decision),
    }
}

/// A B3 trace id: 32 or 16 lower-case hex digits (the latter the low
/// half), not all zero.
fn b3_trace_id(v: &[u8]) -> Option<TraceId> {
    let id = match v.len() {
        32 => lower_hex::<16>(v)?,
        16 => {
            let low = lower_hex::<8>(v)?;
            let mut id = [0; 16];
            id[8..].copy_from_slice(&low);
            id
        }
        _ => return None,
    };
    (id != [0; 16]).then_some(id)
}

fn b3_span_id(v: &[u8]) -> Option<SpanId> {
    (v.len() == 16)
        .then(|| lower_hex::<8>(v))
        .flatten()
        .filter(|s| s != &[0; 8])
}

/// `N` bytes from `2N` lower-case hex digits.
fn lower_hex<const N: usize>(v: &[u8]) -> Option<[u8; N]> {
    if v.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0; N];
    for (i, pair) in v.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(char::from(DIGITS[usize::from(x >> 4)]));
        s.push(char::from(DIGITS[usize::from(x & 0xf)]));
    }
    s
}

/// A random non-zero trace id.
pub fn new_trace_id() -> TraceId {
    loop {
        let id: TraceId = rand::random();
        if id != [0; 16] {
            return id;
        }
    }
}

/// A random non-zero span id.
pub fn new_span_id() -> SpanId {
    loop {
        let id: SpanId = rand::random();
        if id != [0; 8] {
            return id;
        }
    }
}

/// Whether a new trace is sampled at `percent` (0–100).
pub fn sample(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && rand::random::<f64>() * 100.0 < percent)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn ctx(h: &HeaderMap) -> TraceContext {
        match read(h) {
            Incoming::Context(c) => c,
            other => panic!("no context: {other:?}"),
        }
    }

    #[test]
    fn traceparent_valid_and_continued() {
        let h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]);
        let c = ctx(&h);
        assert_eq!(c.trace_hex(), TRACE);
        assert_eq!(hex(&c.span_id), SPAN);
        assert!(c.sampled);
        assert_eq!(
            c.state.as_ref().map(|v| v.to_str().expect("present")),
            Some("congo=t61rcWkgMzE")
        );
        let unsampled = headers(&[("traceparent", &format!("00-{TRACE}-{SPAN}-00"))]);
        assert!(!ctx(&unsampled).sampled);
        // A later version with more fields is read by its first four.
        let later = headers(&[("traceparent", &format!("01-{TRACE}-{SPAN}-01-what-next"))]);
        assert_eq!(ctx(&later).trace_hex(), TRACE);
    }

    #[test]
    fn invalid_traceparents_are_ignored() {
        for bad in [
            format!("00-{}-{SPAN}-01", TRACE.to_uppercase()),
            format!("00-{}-{SPAN}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("00-{TRACE}-{SPAN}-01-extra"),
            format!("00-{TRACE}-{SPAN}-1"),
            format!("00-{TRACE}x{SPAN}-01"),
            format!("00-{TRACE}-{SPAN}-zz"),
            "00-short".to_owned(),
            format!("00-{TRACE}-{SPAN}-01{}", "0".repeat(600)),
        ] {
            assert_eq!(
                read(&headers(&[("traceparent", &bad)])),
                Incoming::None,
                "{bad}"
            );
        }
    }

    #[test]
    fn b3_single_and_multi() {
        let single = headers(&[("b3", &format!("{TRACE}-{SPAN}-1-{}", "05e3ac9a4f6e3b90"))]);
        let c = ctx(&single);
        assert_eq!(c.trace_hex(), TRACE);
        assert_eq!(
            c.parent_span_id.map(|p| hex(&p)).as_deref(),
            Some("05e3ac9a4f6e3b90")
        );
        assert!(c.sampled);
        // 64-bit trace ids are the low half.
        let short = ctx(&headers(&[("b3", &format!("a3ce929d0e0e4736-{SPAN}-0"))]));
        assert_eq!(
            short.trace_hex(),
            format!("{}a3ce929d0e0e4736", "0".repeat(16))
        );
        assert!(!short.sampled);
        let debug = ctx(&headers(&[("b3", &format!("{TRACE}-{SPAN}-d"))]));
        assert!(debug.sampled && debug.debug);
        assert_eq!(read(&headers(&[("b3", "0")])), Incoming::Decision(false));
        assert_eq!(read(&headers(&[("b3", "d")])), Incoming::Decision(true));
        let multi = ctx(&headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "0"),
        ]));
        assert!(!multi.sampled);
        // Ids without a decision: sampled.
        assert!(ctx(&headers(&[("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN)])).sampled);
        assert_eq!(
            read(&headers(&[("x-b3-sampled", "1")])),
            Incoming::Decision(true)
        );
        assert_eq!(
            read(&headers(&[("x-b3-flags", "1")])),
            Incoming::Decision(true)
        );
        for bad in [
            format!("{}-{SPAN}-1", TRACE.to_uppercase()),
            format!("{TRACE}-{SPAN}-x"),
            format!("{TRACE}-{SPAN}-1-{SPAN}-more"),
            format!("{TRACE}-abc"),
            "garbage".to_owned(),
        ] {
            assert_eq!(read(&headers(&[("b3", &bad)])), Incoming::None, "{bad}");
        }
        assert_eq!(
            read(&headers(&[("x-b3-traceid", "xyz"), ("x-b3-spanid", SPAN)])),
            Incoming::None
        );
    }

    #[test]
    fn mixed_headers_prefer_traceparent_then_b3() {
        let other = "11111111111111111111111111111111";
        let h = headers(&[
            ("b3", &format!("{other}-{SPAN}-1")),
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
        ]);
        assert_eq!(ctx(&h).trace_hex(), TRACE);
        // An invalid traceparent gives way to a valid b3.
        let h = headers(&[
            ("traceparent", "00-nonsense"),
            ("b3", &format!("{other}-{SPAN}-1")),
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
        ]);
        assert_eq!(ctx(&h).trace_hex(), other);
    }

    #[test]
    fn a_child_is_written_the_same_in_every_format() {
        let parent = ctx(&headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("tracestate", "a=b"),
        ]));
        let child = parent.child([1, 2, 3, 4, 5, 6, 7, 8]);
        let mut h = headers(&[
            ("x-b3-flags", "1"),
            ("x-b3-parentspanid", "ffffffffffffffff"),
        ]);
        child.write(&mut h);
        let get = |n: &str| h.get(n).map(|v| v.to_str().expect("present").to_owned());
        assert_eq!(
            get("traceparent").as_deref(),
            Some(&*format!("00-{TRACE}-0102030405060708-01"))
        );
        assert_eq!(get("tracestate").as_deref(), Some("a=b"));
        assert_eq!(
            get("b3").as_deref(),
            Some(&*format!("{TRACE}-0102030405060708-1-{SPAN}"))
        );
        assert_eq!(get("x-b3-traceid").as_deref(), Some(TRACE));
        assert_eq!(get("x-b3-spanid").as_deref(), Some("0102030405060708"));
        assert_eq!(get("x-b3-parentspanid").as_deref(), Some(SPAN));
        assert_eq!(get("x-b3-sampled").as_deref(), Some("1"));
        assert_eq!(get("x-b3-flags"), None);
        // Each format, read back alone, names the same trace and span.
        for name in ["traceparent", "b3"] {
            let alone = headers(&[(name, &get(name).expect("present"))]);
            let back = ctx(&alone);
            assert_eq!(
                (back.trace_id, back.span_id),
                (child.trace_id, child.span_id),
                "{name}"
            );
        }
        let multi = ctx(&headers(&[
            ("x-b3-traceid", &get("x-b3-traceid").expect("present")),
            ("x-b3-spanid", &get("x-b3-spanid").expect("present")),
        ]));
        assert_eq!(
            (multi.trace_id, multi.span_id),
            (child.trace_id, child.span_id)
        );
    }

    #[test]
    fn sampling_follows_the_percentage() {
        assert!((0..1000).all(|_| sample(100.0)));
        assert!((0..1000).all(|_| !sample(0.0)));
        let n = (0..20_000).filter(|_| sample(10.0)).count();
        // 10 % of 20,000 with a wide margin (binomial sd ≈ 42).
        assert!((1600..2400).contains(&n), "{n}");
        assert_ne!(new_trace_id(), [0; 16]);
        assert_ne!(new_span_id(), [0; 8]);
    }
}
