//! Access logs (`Mesh.spec.telemetry.accessLog.enabled`, rendered as
//! `mesh.accessLog`): one JSON line per HTTP request on each reporter, on
//! the proxy's stdout, next to (not mixed into) its own log lines.
//!
//! TCP connections (opaque, or detected as not HTTP) get one line when they
//! end ([`TcpEntry`]).
//!
//! ```text
//! request done (outbound and inbound listeners) ──► Entry ──► to_line()
//!   ──try_send──► bounded queue (ACCESS_LOG_QUEUE lines) ──► writer task ──► stdout
//!                 full: the line is dropped and counted, the request never waits
//! ```
//!
//! In: what the listeners know when a response's head is sent (method,
//! authority, path without its query, status, the failed step, the route
//! rule and upstream the lower steps recorded in the response's
//! extensions, principals, the request id). Out: lines on stdout, and
//! `weft_proxy_access_log_dropped_total`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderValue, Method, Request, Uri};
use prometheus_client::metrics::counter::Counter;
use std::io::Write as _;
use tokio::sync::mpsc;

use crate::metrics::Direction;
pub use weft_proxy_config::AccessLogFormat;

/// Lines held for the writer before new ones are dropped.
pub const ACCESS_LOG_QUEUE: usize = 4096;

pub use crate::http::REQUEST_ID_HEADER;

/// Where access log lines go.
#[derive(Clone, Debug, Default)]
pub enum Output {
    /// The proxy's stdout (what kubelet collects).
    #[default]
    Stdout,
    /// Kept in memory (component tests read them).
    Capture(Arc<Mutex<Vec<String>>>),
}

/// The sending side, held by [`crate::state::State`].
#[derive(Debug)]
pub struct AccessLog {
    tx: mpsc::Sender<String>,
    dropped: Counter,
}

impl AccessLog {
    /// A log with a queue of `capacity` lines; the receiver goes to
    /// [`write`]. `dropped` counts lines the full queue refused.
    pub fn new(capacity: usize, dropped: Counter) -> (Self, mpsc::Receiver<String>) {
        let (tx, rx) = mpsc::channel(capacity);
        (AccessLog { tx, dropped }, rx)
    }

    /// Queues one line; never waits. A full queue drops it and counts it.
    pub fn record(&self, entry: &Entry<'_>, format: AccessLogFormat) {
        if self.tx.try_send(entry.to_line(format)).is_err() {
            self.dropped.inc();
        }
    }
}

/// Writes queued lines to `output` until every sender is gone, flushing
/// whenever the queue is empty, then pausing [`WRITE_PAUSE`]. Runs on its
/// own thread with blocking
/// writes: through the runtime, each flush of stdout would hop to a
/// blocking-pool thread and back.
pub fn write(mut rx: mpsc::Receiver<String>, output: &Output) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
    while let Some(line) = rx.blocking_recv() {
        let mut next = Some(line);
        while let Some(line) = next.take() {
            match output {
                Output::Stdout => {
                    let _ = out.write_all(line.as_bytes());
                    let _ = out.write_all(b"\n");
                }
                Output::Capture(lines) => {
                    lines.lock().unwrap_or_else(|p| p.into_inner()).push(line)
                }
            }
            next = rx.try_recv().ok();
        }
        let _ = out.flush();
        // Let lines gather: a writer woken for every line costs a thread
        // wake-up and a write per request at high rates.
        std::thread::sleep(WRITE_PAUSE);
    }
}

/// How long the writer lets lines gather after a write: at most this late
/// on stdout, and [`ACCESS_LOG_QUEUE`] lines fit in it at 400,000 lines
/// per second.
pub const WRITE_PAUSE: Duration = Duration::from_millis(10);

/// Starts [`write`] on its own thread.
pub fn spawn_writer(rx: mpsc::Receiver<String>, output: Output) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("weft-access-log".into())
        .stack_size(64 * 1024)
        .spawn(move || write(rx, &output))
        .map(drop)
}

/// Whether and how a request is logged, decided when it arrives (see
/// `State::access_log_plan`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Line format.
    pub format: AccessLogFormat,
    /// Log it only if it fails.
    pub errors_only: bool,
}

/// What the access log needs of a request, kept before it is sent.
#[derive(Debug)]
pub struct Logged {
    pub plan: Plan,
    pub start: SystemTime,
    pub began: Instant,
    pub method: http::Method,
    pub uri: http::Uri,
    pub headers: HeaderMap,
    pub protocol: &'static str,
}

/// A request's line whose response head went out: written when the
/// response body ends (with the bytes sent and the whole duration), or
/// not at all if only errors are logged and it did not fail.
#[derive(Debug)]
pub struct Deferred {
    /// The request.
    pub logged: Logged,
    /// Which proxy reports.
    pub direction: Direction,
    /// Response status.
    pub status: u16,
    /// Response headers as sent.
    pub response_headers: HeaderMap,
    /// Until the response head was sent.
    pub ttfb: Duration,
    /// See [`Entry`].
    pub source_principal: Option<String>,
    /// See [`Entry`].
    pub destination_principal: Option<String>,
    /// See [`Entry`].
    pub source_workload: Option<String>,
    /// See [`Entry`].
    pub source_namespace: Option<String>,
    /// See [`Entry`].
    pub destination_namespace: Option<String>,
    /// See [`Entry`].
    pub destination_workload: Option<String>,
    /// See [`Entry`].
    pub destination_service: Option<String>,
    /// See [`Entry`].
    pub route: Option<Arc<str>>,
    /// See [`Entry`].
    pub upstream: Option<SocketAddr>,
    /// See [`Entry`].
    pub retries: u32,
    /// See [`Entry`].
    pub audit: bool,
}

impl Deferred {
    /// The line of request `l` answered by the head `resp` on
    /// `direction`'s side, with the call's workloads, namespaces,
    /// principals and Service from its metric `series`; no route,
    /// upstream, retries or audit mark yet.
    pub fn new<B>(
        l: Logged,
        direction: Direction,
        resp: &http::Response<B>,
        series: &crate::metrics::traffic::Series,
    ) -> Self {
        Deferred {
            direction,
            status: resp.status().as_u16(),
            response_headers: slim(resp.headers(), &RESPONSE_FIELDS),
            ttfb: l.began.elapsed(),
            source_principal: series.known("source_principal"),
            destination_principal: series.known("destination_principal"),
            source_workload: series.known("source_workload"),
            source_namespace: series.known("source_namespace"),
            destination_namespace: series.known("destination_namespace"),
            destination_workload: series.known("destination_workload"),
            destination_service: series.known("destination_service"),
            route: None,
            upstream: None,
            retries: 0,
            audit: false,
            logged: l,
        }
    }

    /// Writes the line of the request that ended with `grpc_status` (from
    /// trailers, if any) after `response_bytes` body bytes.
    pub fn finish(self, log: &AccessLog, grpc_status: Option<u16>, response_bytes: u64) {
        let failed = self.status >= 500
            || self
                .response_headers
                .contains_key(crate::http::ERROR_HEADER);
        if self.logged.plan.errors_only && !failed {
            return;
        }
        let l = &self.logged;
        let entry = Entry {
            direction: self.direction,
            start: l.start,
            duration: l.began.elapsed(),
            ttfb: Some(self.ttfb),
            method: &l.method,
            uri: &l.uri,
            request_headers: &l.headers,
            protocol: l.protocol,
            status: self.status,
            response_headers: &self.response_headers,
            grpc_status,
            response_bytes: Some(response_bytes),
            source_principal: self.source_principal.as_deref(),
            destination_principal: self.destination_principal.as_deref(),
            source_workload: self.source_workload.as_deref(),
            source_namespace: self.source_namespace.as_deref(),
            destination_namespace: self.destination_namespace.as_deref(),
            destination_workload: self.destination_workload.as_deref(),
            destination_service: self.destination_service.as_deref(),
            route: self.route.as_deref(),
            upstream: self.upstream,
            retries: self.retries,
            audit: self.audit,
        };
        log.record(&entry, l.plan.format);
    }
}

/// The request headers a line is made of.
const REQUEST_FIELDS: [&str; 4] = ["host", REQUEST_ID_HEADER, "content-length", "traceparent"];
/// The response headers a line is made of.
const RESPONSE_FIELDS: [&str; 3] = ["grpc-status", crate::http::ERROR_HEADER, "content-length"];

/// A copy of `h` with only the headers `names` (their values are shared,
/// not copied): what a line needs, without cloning every header of every
/// logged request.
fn slim(h: &HeaderMap, names: &[&'static str]) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(names.len());
    for name in names {
        if let Some(v) = h.get(*name) {
            out.insert(http::header::HeaderName::from_static(name), v.clone());
        }
    }
    out
}

impl Logged {
    /// Keeps what the access log needs of `req`, at its arrival.
    pub fn of<B>(req: &Request<B>, plan: Plan) -> Self {
        Logged {
            plan,
            start: SystemTime::now(),
            began: Instant::now(),
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers: slim(req.headers(), &REQUEST_FIELDS),
            protocol: match req.version() {
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
        }
    }
}

impl Logged {
    /// The entry of this request answered by `resp` on `direction`'s side,
    /// with nothing known yet of peers, route or upstream.
    pub fn entry<'a, B>(&'a self, direction: Direction, resp: &'a http::Response<B>) -> Entry<'a> {
        Entry {
            direction,
            start: self.start,
            duration: self.began.elapsed(),
            ttfb: None,
            method: &self.method,
            uri: &self.uri,
            request_headers: &self.headers,
            protocol: self.protocol,
            status: resp.status().as_u16(),
            response_headers: resp.headers(),
            grpc_status: None,
            response_bytes: None,
            source_principal: None,
            destination_principal: None,
            source_workload: None,
            source_namespace: None,
            destination_namespace: None,
            destination_workload: None,
            destination_service: None,
            route: None,
            upstream: None,
            retries: 0,
            audit: false,
        }
    }
}

/// What the client proxy learnt while sending a request, written by the
/// steps that learn it (the route rule, the endpoint the response came
/// from, the retries made) into one value the request's future owns, and
/// read by its metrics, span and access log line: carrying these in the
/// response's extensions cost three allocations per request.
#[derive(Debug, Default)]
pub struct Sent {
    /// The route rule that answered.
    pub route: Option<Arc<str>>,
    /// The endpoint the response came from.
    pub upstream: Option<Upstream>,
    /// Retries made.
    pub retries: u32,
}

/// The endpoint a response came from (see [`Sent`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Upstream {
    /// Its address.
    pub addr: SocketAddr,
    /// Its Service's index in the snapshot's `config.services`.
    pub service: usize,
}

/// One request, as a reporter saw it.
#[derive(Debug)]
pub struct Entry<'a> {
    /// Which proxy reports: the client's (`outbound`) or the server's
    /// (`inbound`).
    pub direction: Direction,
    /// When the request arrived.
    pub start: SystemTime,
    /// Until the response's body ended (or its head, where no body is
    /// awaited).
    pub duration: Duration,
    /// Until the response's head was sent.
    pub ttfb: Option<Duration>,
    /// Request method.
    pub method: &'a Method,
    /// Request URI (the query string is not logged).
    pub uri: &'a Uri,
    /// Request headers (authority, request id, declared length).
    pub request_headers: &'a HeaderMap,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
    /// Response status.
    pub status: u16,
    /// Response headers (failed step, gRPC status, declared length).
    pub response_headers: &'a HeaderMap,
    /// `grpc-status` of the trailers (else of the headers).
    pub grpc_status: Option<u16>,
    /// Body bytes sent (else the declared length).
    pub response_bytes: Option<u64>,
    /// The calling workload's SPIFFE ID, when known (mTLS).
    pub source_principal: Option<&'a str>,
    /// The called workload's SPIFFE ID, when known.
    pub destination_principal: Option<&'a str>,
    /// The calling workload (as in the traffic metrics).
    pub source_workload: Option<&'a str>,
    /// The calling workload's namespace.
    pub source_namespace: Option<&'a str>,
    /// The called workload's namespace.
    pub destination_namespace: Option<&'a str>,
    /// The called workload (as in the traffic metrics).
    pub destination_workload: Option<&'a str>,
    /// The destination Service (`<name>.<namespace>`).
    pub destination_service: Option<&'a str>,
    /// The route rule, outbound.
    pub route: Option<&'a str>,
    /// The upstream endpoint (outbound) or app address (inbound).
    pub upstream: Option<SocketAddr>,
    /// Retries made, outbound.
    pub retries: u32,
    /// Whether Audit-mode AccessPolicies would have refused it, inbound.
    pub audit: bool,
}

fn header<'h>(h: &'h HeaderMap, name: &str) -> Option<&'h str> {
    h.get(name).and_then(|v: &HeaderValue| v.to_str().ok())
}

/// The trace id of a request whose span the proxy started (its
/// `traceparent`, as the proxy wrote it).
fn trace_id(h: &HeaderMap) -> Option<&str> {
    header(h, "traceparent")
        .and_then(|t| t.get(3..35))
        .filter(|t| t.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `start` as RFC 3339.
fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The `reporter` value, in the words of Istio's and OpenTelemetry's
/// conventions: the client's proxy is the source.
fn reporter(direction: Direction) -> &'static str {
    match direction {
        Direction::Outbound => "source",
        Direction::Inbound => "destination",
    }
}

impl Entry<'_> {
    /// The line, in `format`.
    pub fn to_line(&self, format: AccessLogFormat) -> String {
        match format {
            AccessLogFormat::Json => self.to_json(),
            AccessLogFormat::Text => self.to_text(),
        }
    }

    fn authority(&self) -> Option<&str> {
        self.uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| header(self.request_headers, "host"))
    }

    fn grpc(&self) -> Option<String> {
        self.grpc_status
            .map(|g| g.to_string())
            .or_else(|| header(self.response_headers, "grpc-status").map(str::to_owned))
    }

    fn sizes(&self) -> (Option<u64>, Option<u64>) {
        let bytes = |h: &HeaderMap| header(h, "content-length").and_then(|v| v.parse::<u64>().ok());
        (
            bytes(self.request_headers),
            self.response_bytes.or_else(|| bytes(self.response_headers)),
        )
    }

    /// One line of space-separated fields in a fixed order (`-` for none):
    /// start, reporter, "method path protocol", status, gRPC status,
    /// failed step, request bytes, response bytes, duration ms, time to
    /// first byte ms, "authority", upstream, source workload and namespace,
    /// destination workload and namespace, source principal, destination principal, destination
    /// Service, route, retries, request id, trace id.
    pub fn to_text(&self) -> String {
        let opt = |v: Option<&str>| v.filter(|v| !v.is_empty()).unwrap_or("-").to_owned();
        let num = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |n| n.to_string());
        let (req_bytes, resp_bytes) = self.sizes();
        [
            rfc3339(self.start),
            reporter(self.direction).to_owned(),
            format!(
                "\"{} {} {}\"",
                self.method.as_str(),
                self.uri.path(),
                self.protocol
            ),
            self.status.to_string(),
            opt(self.grpc().as_deref()),
            opt(header(self.response_headers, crate::http::ERROR_HEADER)),
            num(req_bytes),
            num(resp_bytes),
            format!("{:.3}", self.duration.as_secs_f64() * 1000.0),
            self.ttfb.map_or_else(
                || "-".to_owned(),
                |t| format!("{:.3}", t.as_secs_f64() * 1000.0),
            ),
            format!("\"{}\"", self.authority().unwrap_or("-")),
            self.upstream
                .map_or_else(|| "-".to_owned(), |a| a.to_string()),
            opt(self.source_workload),
            opt(self.source_namespace),
            opt(self.destination_workload),
            opt(self.destination_namespace),
            opt(self.source_principal),
            opt(self.destination_principal),
            opt(self.destination_service),
            opt(self.route),
            self.retries.to_string(),
            opt(header(self.request_headers, REQUEST_ID_HEADER)),
            opt(trace_id(self.request_headers)),
        ]
        .join(" ")
    }

    /// The JSON line.
    pub fn to_json(&self) -> String {
        let (request_bytes, response_bytes) = self.sizes();
        let line = JsonLine {
            start: rfc3339(self.start),
            reporter: reporter(self.direction),
            duration_ms: self.duration.as_secs_f64() * 1000.0,
            ttfb_ms: self.ttfb.map(|t| t.as_secs_f64() * 1000.0),
            method: self.method.as_str(),
            authority: self.authority(),
            path: self.uri.path(),
            protocol: self.protocol,
            status: self.status,
            grpc_status: self.grpc(),
            request_bytes,
            response_bytes,
            failed_step: header(self.response_headers, crate::http::ERROR_HEADER),
            upstream: self.upstream.map(|a| a.to_string()),
            source_workload: self.source_workload,
            source_namespace: self.source_namespace,
            source_principal: self.source_principal,
            destination_workload: self.destination_workload,
            destination_namespace: self.destination_namespace,
            destination_principal: self.destination_principal,
            destination_service: self.destination_service,
            route: self.route,
            retries: self.retries,
            request_id: header(self.request_headers, REQUEST_ID_HEADER),
            trace_id: trace_id(self.request_headers),
            audit: self.audit,
        };
        serde_json::to_string(&line).unwrap_or_default()
    }
}

/// The fields of a JSON line, in the order they are written (serialized
/// straight from the request's data, without an intermediate map).
#[derive(serde::Serialize)]
struct JsonLine<'a> {
    start: String,
    reporter: &'static str,
    duration_ms: f64,
    ttfb_ms: Option<f64>,
    method: &'a str,
    authority: Option<&'a str>,
    path: &'a str,
    protocol: &'static str,
    status: u16,
    grpc_status: Option<String>,
    request_bytes: Option<u64>,
    response_bytes: Option<u64>,
    failed_step: Option<&'a str>,
    upstream: Option<String>,
    source_workload: Option<&'a str>,
    source_namespace: Option<&'a str>,
    source_principal: Option<&'a str>,
    destination_workload: Option<&'a str>,
    destination_namespace: Option<&'a str>,
    destination_principal: Option<&'a str>,
    destination_service: Option<&'a str>,
    route: Option<&'a str>,
    retries: u32,
    request_id: Option<&'a str>,
    trace_id: Option<&'a str>,
    audit: bool,
}

/// One opaque TCP connection, as a reporter saw it; logged when it ends.
#[derive(Debug)]
pub struct TcpEntry<'a> {
    /// Which proxy reports.
    pub direction: Direction,
    /// When the connection was accepted.
    pub start: SystemTime,
    /// Until it ended.
    pub duration: Duration,
    /// The upstream endpoint (outbound) or app address (inbound).
    pub upstream: Option<SocketAddr>,
    /// The calling workload's SPIFFE ID, when known (mTLS).
    pub source_principal: Option<&'a str>,
    /// The called workload's SPIFFE ID, when known.
    pub destination_principal: Option<&'a str>,
    /// The destination Service (`<name>.<namespace>`).
    pub destination_service: Option<&'a str>,
    /// Bytes from the client to the upstream, and back; `None` when the
    /// connection ended with an error or was closed by the proxy.
    pub bytes: Option<(u64, u64)>,
    /// Why the proxy refused or closed it (`connect`, `denied`, `revoked`, …).
    pub failed_step: Option<&'a str>,
}

impl TcpEntry<'_> {
    /// The line, in `format`: JSON, or the text fields of an HTTP line
    /// (`"tcp"` for the request, `-` where TCP has nothing).
    pub fn to_line(&self, format: AccessLogFormat) -> String {
        if format == AccessLogFormat::Text {
            let opt = |v: Option<&str>| v.unwrap_or("-").to_owned();
            let num = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |n| n.to_string());
            return [
                rfc3339(self.start),
                reporter(self.direction).to_owned(),
                "\"tcp\"".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                opt(self.failed_step),
                num(self.bytes.map(|b| b.0)),
                num(self.bytes.map(|b| b.1)),
                format!("{:.3}", self.duration.as_secs_f64() * 1000.0),
                "-".to_owned(),
                "\"-\"".to_owned(),
                self.upstream
                    .map_or_else(|| "-".to_owned(), |a| a.to_string()),
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                opt(self.source_principal),
                opt(self.destination_principal),
                opt(self.destination_service),
                "-".to_owned(),
                "0".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
            ]
            .join(" ");
        }
        let start = rfc3339(self.start);
        serde_json::json!({
            "start": start,
            "reporter": reporter(self.direction),
            "duration_ms": self.duration.as_secs_f64() * 1000.0,
            "protocol": "tcp",
            "request_bytes": self.bytes.map(|b| b.0),
            "response_bytes": self.bytes.map(|b| b.1),
            "failed_step": self.failed_step,
            "upstream": self.upstream.map(|a| a.to_string()),
            "source_principal": self.source_principal,
            "destination_principal": self.destination_principal,
            "destination_service": self.destination_service,
        })
        .to_string()
    }
}

impl AccessLog {
    /// Queues the line of a TCP connection as `plan` says (a connection
    /// that ended well is skipped when only errors are logged); never
    /// waits.
    pub fn record_tcp(&self, entry: &TcpEntry<'_>, plan: Plan) {
        if plan.errors_only && entry.failed_step.is_none() {
            return;
        }
        if self.tx.try_send(entry.to_line(plan.format)).is_err() {
            self.dropped.inc();
        }
    }
}

/// A new request id: 128 random bits as 32 hex digits.
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let id: u128 = rand::random();
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = HEX[((id >> (124 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&out).expect("hex is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>(
        method: &'a Method,
        uri: &'a Uri,
        req: &'a HeaderMap,
        resp: &'a HeaderMap,
    ) -> Entry<'a> {
        Entry {
            direction: Direction::Inbound,
            start: std::time::UNIX_EPOCH + Duration::from_millis(1_733_400_000_123),
            duration: Duration::from_micros(1500),
            ttfb: Some(Duration::from_micros(500)),
            method,
            uri,
            request_headers: req,
            protocol: "HTTP/2",
            status: 200,
            response_headers: resp,
            grpc_status: None,
            response_bytes: None,
            source_principal: Some("spiffe://td/ns/a/sa/b"),
            destination_principal: None,
            source_workload: Some("web"),
            source_namespace: Some("a"),
            destination_namespace: None,
            destination_workload: None,
            destination_service: None,
            route: None,
            upstream: None,
            retries: 0,
            audit: true,
        }
    }

    #[test]
    fn a_line_is_one_json_object_without_the_query() {
        let (m, u) = (
            Method::GET,
            "http://svc.ns:8080/a/b?secret=1"
                .parse::<Uri>()
                .expect("uri"),
        );
        let mut req = HeaderMap::new();
        req.insert(REQUEST_ID_HEADER, HeaderValue::from_static("r1"));
        req.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let mut resp = HeaderMap::new();
        resp.insert("grpc-status", HeaderValue::from_static("14"));
        resp.insert("content-length", HeaderValue::from_static("12"));
        let line = entry(&m, &u, &req, &resp).to_line(AccessLogFormat::Json);
        assert!(!line.contains('\n') && !line.contains("secret"), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["start"], "2024-12-05T12:00:00.123Z");
        assert_eq!(v["reporter"], "destination");
        assert_eq!(v["authority"], "svc.ns:8080");
        assert_eq!(v["path"], "/a/b");
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["grpc_status"], "14");
        assert_eq!(v["response_bytes"], 12);
        assert!(v["request_bytes"].is_null());
        assert_eq!(v["request_id"], "r1");
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["source_workload"], "web");
        assert!(v["destination_workload"].is_null());
        assert_eq!(v["audit"], true);
        assert_eq!(v["ttfb_ms"], 0.5);
        // The text format: the same facts, space separated, in a fixed order.
        let text = entry(&m, &u, &req, &resp).to_line(AccessLogFormat::Text);
        let fields: Vec<&str> = text.split(' ').collect();
        assert_eq!(
            fields,
            [
                "2024-12-05T12:00:00.123Z",
                "destination",
                "\"GET",
                "/a/b",
                "HTTP/2\"",
                "200",
                "14",
                "-",
                "-",
                "12",
                "1.500",
                "0.500",
                "\"svc.ns:8080\"",
                "-",
                "web",
                "a",
                "-",
                "-",
                "spiffe://td/ns/a/sa/b",
                "-",
                "-",
                "-",
                "0",
                "r1",
                "4bf92f3577b34da6a3ce929d0e0e4736",
            ],
            "{text}"
        );
    }

    #[test]
    fn tcp_text_lines_have_the_fields_of_http_ones() {
        let (m, u, h) = (Method::GET, Uri::from_static("/"), HeaderMap::new());
        let http = entry(&m, &u, &h, &h).to_line(AccessLogFormat::Text);
        let tcp = TcpEntry {
            direction: Direction::Inbound,
            start: std::time::UNIX_EPOCH,
            duration: Duration::from_millis(3),
            upstream: None,
            source_principal: Some("spiffe://td/ns/a/sa/b"),
            destination_principal: None,
            destination_service: None,
            bytes: Some((10, 20)),
            failed_step: None,
        }
        .to_line(AccessLogFormat::Text);
        // `"GET / HTTP/2"` is three space-separated words, `"tcp"` one.
        assert_eq!(
            http.split(' ').count(),
            tcp.split(' ').count() + 2,
            "{http}\n{tcp}"
        );
        let f: Vec<&str> = tcp.split(' ').collect();
        assert_eq!((f[2], f[6], f[7]), ("\"tcp\"", "10", "20"), "{tcp}");
    }

    #[test]
    fn a_deferred_line_has_the_bytes_sent_and_skips_successes_when_only_errors_are_logged() {
        let (log, mut rx) = AccessLog::new(8, Counter::default());
        let req = Request::get("/x").body(()).expect("request");
        let line = |errors_only: bool, status: u16, failed: Option<&'static str>| {
            let mut response_headers = HeaderMap::new();
            if let Some(f) = failed {
                response_headers.insert(crate::http::ERROR_HEADER, HeaderValue::from_static(f));
            }
            Deferred {
                logged: Logged::of(
                    &req,
                    Plan {
                        format: AccessLogFormat::Json,
                        errors_only,
                    },
                ),
                direction: Direction::Outbound,
                status,
                response_headers,
                ttfb: Duration::from_millis(2),
                source_principal: None,
                destination_principal: None,
                source_workload: None,
                source_namespace: None,
                destination_namespace: None,
                destination_workload: None,
                destination_service: None,
                route: None,
                upstream: None,
                retries: 0,
                audit: false,
            }
        };
        line(false, 200, None).finish(&log, Some(0), 4096);
        let v: serde_json::Value =
            serde_json::from_str(&rx.try_recv().expect("a line")).expect("json");
        assert_eq!(v["response_bytes"], 4096);
        assert_eq!(v["grpc_status"], "0");
        assert_eq!(v["ttfb_ms"], 2.0);
        line(true, 200, None).finish(&log, None, 1);
        line(true, 404, None).finish(&log, None, 1);
        assert!(rx.try_recv().is_err(), "successes are not errors");
        line(true, 503, None).finish(&log, None, 1);
        line(true, 429, Some("rate-limited")).finish(&log, None, 1);
        assert!(rx.try_recv().is_ok() && rx.try_recv().is_ok());
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let dropped = Counter::default();
        let (log, mut rx) = AccessLog::new(2, dropped.clone());
        let (m, u, h) = (Method::GET, Uri::from_static("/"), HeaderMap::new());
        for _ in 0..5 {
            log.record(&entry(&m, &u, &h, &h), AccessLogFormat::Json);
        }
        assert_eq!(dropped.get(), 3);
        assert!(rx.try_recv().is_ok() && rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err());
        log.record(&entry(&m, &u, &h, &h), AccessLogFormat::Json);
        assert_eq!(dropped.get(), 3, "room again once the writer took lines");
    }

    #[test]
    fn request_ids_are_32_hex_digits_and_differ() {
        let (a, b) = (new_request_id(), new_request_id());
        assert_ne!(a, b);
        let a = a.to_str().expect("ascii");
        assert!(
            a.len() == 32 && a.chars().all(|c| c.is_ascii_hexdigit()),
            "{a}"
        );
    }
}
