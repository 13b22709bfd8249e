//! Golden traffic metrics: every HTTP request and opaque TCP connection
//! counted by who called whom, with latency and size histograms, under
//! weft's names, Istio's names, or both (`mesh.metricsNaming`).
//!
//! ```text
//! outbound / inbound ──resolve once per connection or route──► CallLabels
//!        │                                 Traffic::http(&labels) ──► Arc<Series>   (hashed here, once)
//!        └─ per request: Series::start(…) ─► Recording ─► MeteredBody (the response body)
//!                         end of body or drop ─► Series leaf (code, gRPC status, failed step):
//!                                                counter + duration + request/response bytes
//! ```
//!
//! Cardinality is bounded by design: labels are workloads, namespaces,
//! principals, Services, route rules and a closed list of failed steps —
//! never a path, a header an app chose, or any other value a client
//! controls. On top of that, a proxy keeps at most [`Traffic::cap`] label
//! sets; beyond it, calls are counted under one label set whose every
//! value is `overflow`, and each such call in
//! `weft_proxy_metric_series_overflow_total`.
//!
//! Cost: a request looks up its [`Series`] in its connection's cache (a
//! comparison, not a hash; see [`SeriesCache`]); only the outcome (status
//! code, gRPC status, failed step) is found per request, by a short scan
//! of the outcomes that series has seen.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use weft_proxy_config::MetricsNaming;

/// Buckets of `weft_request_duration_seconds`: sub-millisecond mesh hops up
/// to a minute.
pub const DURATION_BUCKETS_SECONDS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Buckets of `istio_request_duration_milliseconds` (Istio's defaults).
pub const ISTIO_DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Buckets of the request and response size histograms: powers of ten
/// from 1 byte to 1 GB.
pub const BYTES_BUCKETS: [f64; 10] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];
/// Label sets a proxy keeps before it counts under `overflow`.
pub const DEFAULT_SERIES_CAP: usize = 10_000;
/// The label value of anything not known.
pub const UNKNOWN: &str = "unknown";
/// Every label value of the overflow label set.
pub const OVERFLOW: &str = "overflow";
/// Istio's name of the cluster, as an Istio proxy reports it by default.
const ISTIO_CLUSTER: &str = "Kubernetes";
/// The cluster's DNS domain, for Istio's fully qualified `destination_service`.
const CLUSTER_DOMAIN: &str = "svc.cluster.local";

/// The failed steps a proxy names in `x-weft-error`. A value outside this
/// list (an app can send any header) is counted as `other`, so the label
/// stays bounded.
const STEPS: [&str; 31] = [
    "ambiguous-path",
    "bad-request",
    "connect",
    "connect-timeout",
    "denied",
    "fault",
    "header-timeout",
    "header-too-large",
    "http-handshake",
    "identity",
    "identity-mismatch",
    "local-identity",
    "loop",
    "no-endpoint",
    "not-ready",
    "original-destination",
    "overflow",
    "peer-app-unavailable",
    "per-try-timeout",
    "plaintext-refused",
    "rate-limited",
    "redirect",
    "retry-budget-exhausted",
    "revoked",
    "route-backend",
    "server-first",
    "timeout",
    "tls",
    "upstream",
    "app",
    "other",
];

/// The bounded label value of a failed step named in `x-weft-error`.
pub fn failed_step(value: &[u8]) -> &'static str {
    STEPS
        .iter()
        .find(|s| s.as_bytes() == value)
        .copied()
        .unwrap_or("other")
}

/// Which proxy counted a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The client's proxy (outbound).
    Source,
    /// The server's proxy (inbound).
    Destination,
}

impl Reporter {
    fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// One end of a call: what is known of its workload. `None` is reported
/// as `unknown`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Peer {
    /// Deployment, StatefulSet, … or bare pod name.
    pub workload: Option<String>,
    /// Namespace.
    pub namespace: Option<String>,
    /// SPIFFE ID.
    pub principal: Option<String>,
    /// `app` label.
    pub app: Option<String>,
    /// `version` label.
    pub version: Option<String>,
}

impl Peer {
    /// An endpoint of a Service in `namespace` as the callee (none: not
    /// connected, only the namespace is known).
    pub fn endpoint(ep: Option<&weft_proxy_config::Endpoint>, namespace: &str) -> Peer {
        Peer {
            workload: ep.and_then(|e| e.workload.clone()),
            namespace: Some(namespace.to_owned()),
            principal: ep.and_then(|e| e.identity.clone().filter(|_| e.meshed)),
            app: ep.and_then(|e| e.app.clone()),
            version: ep.and_then(|e| e.version.clone()),
        }
    }

    /// The namespace part of a SPIFFE ID `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn namespace_of_principal(principal: &str) -> Option<&str> {
        let path = principal.strip_prefix("spiffe://")?;
        let mut parts = path.split('/').skip(1);
        match (parts.next(), parts.next()) {
            (Some("ns"), Some(ns)) if !ns.is_empty() => Some(ns),
            _ => None,
        }
    }
}

/// The labels of a call that are fixed for a connection or a route:
/// everything but its outcome.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CallLabels {
    /// Which proxy counts.
    pub reporter: Reporter,
    /// The caller.
    pub source: Peer,
    /// The callee.
    pub destination: Peer,
    /// The destination Service: name and namespace.
    pub service: Option<(String, String)>,
    /// The ServiceRoute rule (`<route>/<rule>`) that matched.
    pub route: Option<Arc<str>>,
    /// Mutual TLS between the proxies.
    pub mtls: bool,
}

/// How an HTTP call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Outcome {
    /// Response status code.
    pub code: u16,
    /// The request was gRPC (`content-type: application/grpc…`).
    pub grpc: bool,
    /// `grpc-status` of the response (trailers, or headers of a
    /// trailers-only response).
    pub grpc_status: Option<u16>,
    /// The step a proxy failed at (`x-weft-error`).
    pub failed_step: Option<&'static str>,
}

type Labels = Vec<(&'static str, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn duration_seconds() -> Histogram {
    Histogram::new(DURATION_BUCKETS_SECONDS)
}
fn duration_ms() -> Histogram {
    Histogram::new(ISTIO_DURATION_BUCKETS_MS)
}
fn bytes_histogram() -> Histogram {
    Histogram::new(BYTES_BUCKETS)
}

/// The HTTP families of one naming.
#[derive(Debug)]
struct HttpFamilies {
    requests: Family<Labels, Counter>,
    duration: HistogramFamily,
    request_bytes: HistogramFamily,
    response_bytes: HistogramFamily,
}

impl HttpFamilies {
    fn new(duration: fn() -> Histogram) -> Self {
        HttpFamilies {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration),
            request_bytes: Family::new_with_constructor(bytes_histogram),
            response_bytes: Family::new_with_constructor(bytes_histogram),
        }
    }

    fn handles(&self, labels: &Labels) -> HttpHandles {
        HttpHandles {
            requests: self.requests.get_or_create(labels).clone(),
            duration: self.duration.get_or_create(labels).clone(),
            request_bytes: self.request_bytes.get_or_create(labels).clone(),
            response_bytes: self.response_bytes.get_or_create(labels).clone(),
        }
    }
}

/// The TCP families of one naming.
#[derive(Debug, Default)]
struct TcpFamilies {
    opened: Family<Labels, Counter>,
    closed: Family<Labels, Counter>,
    sent: Family<Labels, Counter>,
    received: Family<Labels, Counter>,
}

impl TcpFamilies {
    fn handles(&self, labels: &Labels) -> TcpHandles {
        TcpHandles {
            opened: self.opened.get_or_create(labels).clone(),
            closed: self.closed.get_or_create(labels).clone(),
            sent: self.sent.get_or_create(labels).clone(),
            received: self.received.get_or_create(labels).clone(),
        }
    }
}

#[derive(Debug)]
struct HttpHandles {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

#[derive(Debug)]
struct TcpHandles {
    opened: Counter,
    closed: Counter,
    sent: Counter,
    received: Counter,
}

/// What every series shares: the families, the cap and the overflow count.
#[derive(Debug)]
struct Shared {
    weft_http: HttpFamilies,
    istio_http: HttpFamilies,
    weft_tcp: TcpFamilies,
    istio_tcp: TcpFamilies,
    overflow: Counter,
    label_sets: AtomicUsize,
    cap: AtomicUsize,
    /// The overflow leaf per naming (index [`naming_index`]).
    overflow_http: [OnceLock<Arc<Leaf>>; 3],
    overflow_tcp: [OnceLock<Arc<TcpSeries>>; 3],
}

fn naming_index(n: MetricsNaming) -> usize {
    match n {
        MetricsNaming::Weft => 0,
        MetricsNaming::Istio => 1,
        MetricsNaming::Both => 2,
    }
}

impl Shared {
    /// Takes a label set from the cap; false when it is spent.
    fn take_label_set(&self) -> bool {
        let cap = self.cap.load(Ordering::Relaxed);
        self.label_sets
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < cap).then_some(n + 1)
            })
            .is_ok()
    }

    fn http_leaf(&self, naming: MetricsNaming, weft: &Labels, istio: &Labels) -> Leaf {
        Leaf {
            weft: naming.weft().then(|| self.weft_http.handles(weft)),
            istio: naming.istio().then(|| self.istio_http.handles(istio)),
            overflow: false,
        }
    }

    fn overflow_leaf(&self, naming: MetricsNaming) -> Arc<Leaf> {
        self.overflow_http[naming_index(naming)]
            .get_or_init(|| {
                let mut leaf = self.http_leaf(
                    naming,
                    &overflow_labels(&WEFT_HTTP),
                    &overflow_labels(&ISTIO),
                );
                leaf.overflow = true;
                Arc::new(leaf)
            })
            .clone()
    }
}

/// The counters of one label set with its outcome.
#[derive(Debug)]
struct Leaf {
    weft: Option<HttpHandles>,
    istio: Option<HttpHandles>,
    overflow: bool,
}

/// A TCP label set: the call, the step it ended at, the naming.
type TcpKey = (CallLabels, Option<&'static str>, MetricsNaming);

/// The traffic metrics of one proxy.
#[derive(Debug)]
pub struct Traffic {
    shared: Arc<Shared>,
    http: Mutex<HashMap<(CallLabels, MetricsNaming), Arc<Series>>>,
    tcp: Mutex<HashMap<TcpKey, Arc<TcpSeries>>>,
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic {
            shared: Arc::new(Shared {
                weft_http: HttpFamilies::new(duration_seconds),
                istio_http: HttpFamilies::new(duration_ms),
                weft_tcp: TcpFamilies::default(),
                istio_tcp: TcpFamilies::default(),
                overflow: Counter::default(),
                label_sets: AtomicUsize::new(0),
                cap: AtomicUsize::new(DEFAULT_SERIES_CAP),
                overflow_http: Default::default(),
                overflow_tcp: Default::default(),
            }),
            http: Mutex::new(HashMap::new()),
            tcp: Mutex::new(HashMap::new()),
        }
    }
}

impl Traffic {
    /// Sets the most label sets this proxy keeps (`--max-metric-series`).
    pub fn set_cap(&self, cap: usize) {
        self.shared.cap.store(cap, Ordering::Relaxed);
    }

    /// The most label sets this proxy keeps.
    pub fn cap(&self) -> usize {
        self.shared.cap.load(Ordering::Relaxed)
    }

    /// Registers the families: weft's under `weft_`, Istio's under
    /// `istio_`, the overflow count under `weft_proxy_`. A family no call
    /// was counted in yet shows only its HELP and TYPE lines.
    pub fn register(&self, root: &mut Registry) {
        let s = &self.shared;
        register_http(
            root.sub_registry_with_prefix("weft"),
            &s.weft_http,
            &s.weft_tcp,
            [
                (
                    "requests",
                    "HTTP requests by source and destination workload, route and outcome",
                ),
                (
                    "request_duration_seconds",
                    "HTTP request duration: from the request's head to the end of the response body",
                ),
                (
                    "request_bytes",
                    "HTTP request body size (as declared by content-length)",
                ),
                ("response_bytes", "HTTP response body size (bytes sent)"),
            ],
        );
        register_http(
            root.sub_registry_with_prefix("istio"),
            &s.istio_http,
            &s.istio_tcp,
            [
                ("requests", "HTTP requests (Istio standard metric)"),
                (
                    "request_duration_milliseconds",
                    "HTTP request duration in milliseconds (Istio standard metric)",
                ),
                (
                    "request_bytes",
                    "HTTP request body size (Istio standard metric)",
                ),
                (
                    "response_bytes",
                    "HTTP response body size (Istio standard metric)",
                ),
            ],
        );
        root.sub_registry_with_prefix("weft_proxy").register(
            "metric_series_overflow",
            "Calls counted under the overflow label set because the proxy's cap on label sets was reached",
            s.overflow.clone(),
        );
    }

    /// The series of HTTP calls with these labels (hashed: call once per
    /// connection or route, through a [`SeriesCache`]).
    pub fn http(&self, labels: &CallLabels, naming: MetricsNaming) -> Arc<Series> {
        let key = (labels.clone(), naming);
        let mut map = self.http.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key)
            .or_insert_with(|| {
                Arc::new(Series {
                    weft: weft_http_labels(labels),
                    istio: istio_labels(labels, "http"),
                    naming,
                    shared: self.shared.clone(),
                    leaves: RwLock::new(Vec::new()),
                })
            })
            .clone()
    }

    /// The counters of opaque TCP connections with these labels, ended at
    /// `failed_step` (hashed: call once per connection).
    pub fn tcp(
        &self,
        labels: &CallLabels,
        failed_step: Option<&'static str>,
        naming: MetricsNaming,
    ) -> Arc<TcpSeries> {
        let key = (labels.clone(), failed_step, naming);
        let mut map = self.tcp.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get(&key) {
            return s.clone();
        }
        let s = &self.shared;
        let series = if s.take_label_set() {
            let weft = tcp_labels(&WEFT_TCP, weft_tcp_labels(labels, failed_step));
            let istio = tcp_labels(&ISTIO_TCP, {
                let mut l = istio_labels(labels, "tcp");
                set(&mut l, "response_flags", response_flags(failed_step));
                l.retain(|(k, _)| ISTIO_TCP.contains(k));
                l
            });
            Arc::new(TcpSeries {
                weft: naming.weft().then(|| s.weft_tcp.handles(&weft)),
                istio: naming.istio().then(|| s.istio_tcp.handles(&istio)),
                overflow: None,
            })
        } else {
            s.overflow_tcp[naming_index(naming)]
                .get_or_init(|| {
                    Arc::new(TcpSeries {
                        weft: naming
                            .weft()
                            .then(|| s.weft_tcp.handles(&overflow_labels(&WEFT_TCP))),
                        istio: naming
                            .istio()
                            .then(|| s.istio_tcp.handles(&overflow_labels(&ISTIO_TCP))),
                        overflow: Some(s.overflow.clone()),
                    })
                })
                .clone()
        };
        map.insert(key, series.clone());
        series
    }
}

/// Registers one naming's families: the four HTTP ones under `names`
/// (requests, duration, request bytes, response bytes: name and help), and
/// the TCP ones.
fn register_http(
    r: &mut Registry,
    http: &HttpFamilies,
    tcp: &TcpFamilies,
    names: [(&str, &str); 4],
) {
    let [requests, duration, request_bytes, response_bytes] = names;
    r.register(requests.0, requests.1, http.requests.clone());
    r.register(duration.0, duration.1, http.duration.clone());
    r.register(request_bytes.0, request_bytes.1, http.request_bytes.clone());
    r.register(
        response_bytes.0,
        response_bytes.1,
        http.response_bytes.clone(),
    );
    register_tcp(r, tcp);
}

fn register_tcp(r: &mut Registry, f: &TcpFamilies) {
    r.register(
        "tcp_connections_opened",
        "Opaque TCP connections opened",
        f.opened.clone(),
    );
    r.register(
        "tcp_connections_closed",
        "Opaque TCP connections closed",
        f.closed.clone(),
    );
    r.register(
        "tcp_sent_bytes",
        "Bytes of opaque TCP connections sent to the downstream client (the response direction)",
        f.sent.clone(),
    );
    r.register(
        "tcp_received_bytes",
        "Bytes of opaque TCP connections received from the downstream client (the request direction)",
        f.received.clone(),
    );
}

/// The HTTP calls of one [`CallLabels`]: a leaf per outcome seen.
#[derive(Debug)]
pub struct Series {
    weft: Labels,
    istio: Labels,
    naming: MetricsNaming,
    shared: Arc<Shared>,
    leaves: RwLock<Vec<(Outcome, Arc<Leaf>)>>,
}

impl Series {
    /// Counts one call.
    pub fn record(
        &self,
        outcome: Outcome,
        duration: std::time::Duration,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        let leaf = self.leaf(outcome);
        if leaf.overflow {
            self.shared.overflow.inc();
        }
        #[allow(clippy::cast_precision_loss)]
        let (req, resp) = (request_bytes as f64, response_bytes as f64);
        if let Some(h) = &leaf.weft {
            h.requests.inc();
            h.duration.observe(duration.as_secs_f64());
            h.request_bytes.observe(req);
            h.response_bytes.observe(resp);
        }
        if let Some(h) = &leaf.istio {
            h.requests.inc();
            h.duration.observe(duration.as_secs_f64() * 1000.0);
            h.request_bytes.observe(req);
            h.response_bytes.observe(resp);
        }
    }

    fn leaf(&self, outcome: Outcome) -> Arc<Leaf> {
        {
            let leaves = self.leaves.read().unwrap_or_else(|p| p.into_inner());
            if let Some((_, l)) = leaves.iter().find(|(o, _)| *o == outcome) {
                return l.clone();
            }
        }
        let mut leaves = self.leaves.write().unwrap_or_else(|p| p.into_inner());
        if let Some((_, l)) = leaves.iter().find(|(o, _)| *o == outcome) {
            return l.clone();
        }
        let leaf = if self.shared.take_label_set() {
            let mut weft = self.weft.clone();
            weft_outcome(&mut weft, outcome);
            let mut istio = self.istio.clone();
            istio_outcome(&mut istio, outcome);
            Arc::new(self.shared.http_leaf(self.naming, &weft, &istio))
        } else {
            self.shared.overflow_leaf(self.naming)
        };
        leaves.push((outcome, leaf.clone()));
        leaf
    }

    /// Starts timing a call; the returned recording counts it when the
    /// response body ends (see [`MeteredBody`]) or is dropped.
    pub fn start(
        self: &Arc<Self>,
        started: Instant,
        outcome: Outcome,
        request_bytes: u64,
    ) -> Recording {
        Recording {
            series: self.clone(),
            outcome,
            started,
            request_bytes,
            response_bytes: 0,
            on_end: None,
        }
    }

    /// The value of one of weft's labels of this series (`source_workload`,
    /// `destination_principal`, …), for access logs and spans.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.weft
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// [`Series::label`], owned, and `None` when not known.
    pub fn known(&self, name: &str) -> Option<String> {
        self.label(name)
            .filter(|v| !v.is_empty() && *v != UNKNOWN)
            .map(str::to_owned)
    }
}

/// The counters of opaque TCP connections of one label set.
#[derive(Debug)]
pub struct TcpSeries {
    weft: Option<TcpHandles>,
    istio: Option<TcpHandles>,
    /// The overflow counter, when this is the overflow label set.
    overflow: Option<Counter>,
}

impl TcpSeries {
    /// Counts an opened connection.
    pub fn opened(&self) {
        if let Some(o) = &self.overflow {
            o.inc();
        }
        for h in [&self.weft, &self.istio].into_iter().flatten() {
            h.opened.inc();
        }
    }

    /// Counts a closed connection and its bytes: `sent` to the downstream
    /// client, `received` from it.
    pub fn closed(&self, sent: u64, received: u64) {
        for h in [&self.weft, &self.istio].into_iter().flatten() {
            h.closed.inc();
            h.sent.inc_by(sent);
            h.received.inc_by(received);
        }
    }
}

/// One call being timed.
pub struct Recording {
    series: Arc<Series>,
    outcome: Outcome,
    started: Instant,
    request_bytes: u64,
    response_bytes: u64,
    on_end: Option<OnEnd>,
}

/// Work done when a call ends, with its outcome and response bytes (the
/// span of a traced request).
pub type OnEnd = Box<dyn FnOnce(Outcome, u64) + Send + Sync>;

impl std::fmt::Debug for Recording {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recording")
            .field("outcome", &self.outcome)
            .field("response_bytes", &self.response_bytes)
            .finish_non_exhaustive()
    }
}

impl Recording {
    /// Runs `f` when the call ends, after it is counted (and after what
    /// was added before).
    pub fn on_end(mut self, f: OnEnd) -> Self {
        self.on_end = Some(match self.on_end.take() {
            None => f,
            Some(earlier) => Box::new(move |o, b| {
                earlier(o, b);
                f(o, b);
            }),
        });
        self
    }

    /// Counts the call now.
    fn finish(self) {
        self.series.record(
            self.outcome,
            self.started.elapsed(),
            self.request_bytes,
            self.response_bytes,
        );
        if let Some(f) = self.on_end {
            f(self.outcome, self.response_bytes);
        }
    }
}

/// A response body that counts its bytes and the `grpc-status` of its
/// trailers, and records its call when it ends or is dropped.
#[derive(Debug)]
pub struct MeteredBody<B> {
    inner: B,
    recording: Option<Recording>,
}

impl<B> MeteredBody<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, recording: Recording) -> Self {
        MeteredBody {
            inner,
            recording: Some(recording),
        }
    }
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        if let Some(r) = self.recording.take() {
            r.finish();
        }
    }
}

impl<B> HttpBody for MeteredBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(r) = this.recording.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        r.response_bytes += data.len() as u64;
                    } else if let Some(s) = frame.trailers_ref().and_then(grpc_status) {
                        r.outcome.grpc_status = Some(s);
                    }
                }
                if this.inner.is_end_stream()
                    && let Some(r) = this.recording.take()
                {
                    r.finish();
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                if let Some(r) = this.recording.take() {
                    r.finish();
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The `grpc-status` of a header map, if it holds a number.
pub fn grpc_status(h: &http::HeaderMap) -> Option<u16> {
    const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    h.get(GRPC_STATUS)?.to_str().ok()?.trim().parse().ok()
}

/// Whether a request is gRPC, by its content type.
pub fn is_grpc(h: &http::HeaderMap) -> bool {
    h.get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Recently resolved series of one connection: a request finds its series
/// by comparing keys (snapshot generation, Service, route, endpoint), not
/// by hashing labels. Holds a few entries, the oldest replaced first.
#[derive(Debug)]
pub struct SeriesCache<K> {
    entries: Mutex<Vec<(K, Arc<Series>)>>,
}

/// A copy starts empty: it is a cache.
impl<K> Clone for SeriesCache<K> {
    fn clone(&self) -> Self {
        SeriesCache {
            entries: Mutex::new(Vec::new()),
        }
    }
}

/// Entries a [`SeriesCache`] keeps.
const CACHE_ENTRIES: usize = 8;

impl<K> Default for SeriesCache<K> {
    fn default() -> Self {
        SeriesCache {
            entries: Mutex::new(Vec::new()),
        }
    }
}

impl<K: PartialEq> SeriesCache<K> {
    /// The series under `key`, resolved with `resolve` on a miss.
    pub fn get(&self, key: K, resolve: impl FnOnce() -> Arc<Series>) -> Arc<Series> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, s)) = entries.iter().find(|(k, _)| *k == key) {
            return s.clone();
        }
        let s = resolve();
        if entries.len() >= CACHE_ENTRIES {
            entries.remove(0);
        } else if entries.is_empty() {
            // Most connections meet one series: room for one, not the
            // four a first push makes, while the connection lives.
            entries.reserve_exact(1);
        }
        entries.push((key, s.clone()));
        s
    }
}

// ---- label sets -----------------------------------------------------------

/// weft's HTTP label names, in order.
const WEFT_HTTP: [&str; 18] = [
    "reporter",
    "source_workload",
    "source_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "destination_workload",
    "destination_namespace",
    "destination_service",
    "destination_principal",
    "destination_app",
    "destination_version",
    "route",
    "response_code",
    "grpc_status",
    "failed_step",
    "protocol",
    "connection_security",
];

/// weft's TCP label names: the HTTP ones without route, response code and
/// gRPC status.
const WEFT_TCP: [&str; 15] = [
    "reporter",
    "source_workload",
    "source_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "destination_workload",
    "destination_namespace",
    "destination_service",
    "destination_principal",
    "destination_app",
    "destination_version",
    "failed_step",
    "protocol",
    "connection_security",
];

/// Istio's standard label names, in order.
const ISTIO: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

/// Istio's TCP label names: the HTTP ones without response code and gRPC
/// status.
const ISTIO_TCP: [&str; 23] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

fn overflow_labels(names: &[&'static str]) -> Labels {
    names.iter().map(|n| (*n, OVERFLOW.to_owned())).collect()
}

fn or_unknown(v: Option<&String>) -> String {
    v.map_or_else(|| UNKNOWN.to_owned(), Clone::clone)
}

fn set(labels: &mut Labels, name: &str, value: impl Into<String>) {
    if let Some((_, v)) = labels.iter_mut().find(|(k, _)| *k == name) {
        *v = value.into();
    }
}

fn peer_labels(out: &mut Labels, side: &'static str, p: &Peer) {
    let name = |suffix: &str| match (side, suffix) {
        ("source", "workload") => "source_workload",
        ("source", "namespace") => "source_namespace",
        ("source", "principal") => "source_principal",
        ("source", "app") => "source_app",
        ("source", "version") => "source_version",
        (_, "workload") => "destination_workload",
        (_, "namespace") => "destination_namespace",
        (_, "principal") => "destination_principal",
        (_, "app") => "destination_app",
        _ => "destination_version",
    };
    out.push((name("workload"), or_unknown(p.workload.as_ref())));
    out.push((name("namespace"), or_unknown(p.namespace.as_ref())));
    out.push((name("principal"), or_unknown(p.principal.as_ref())));
    out.push((name("app"), or_unknown(p.app.as_ref())));
    out.push((name("version"), or_unknown(p.version.as_ref())));
}

fn service_label(l: &CallLabels) -> String {
    l.service
        .as_ref()
        .map_or_else(|| UNKNOWN.to_owned(), |(n, ns)| format!("{n}.{ns}"))
}

fn security(l: &CallLabels) -> &'static str {
    if l.mtls { "mutual_tls" } else { "plaintext" }
}

/// weft's HTTP labels with the outcome left empty.
fn weft_http_labels(l: &CallLabels) -> Labels {
    let mut out: Labels = vec![("reporter", l.reporter.as_str().to_owned())];
    peer_labels(&mut out, "source", &l.source);
    let mut dst = Vec::new();
    peer_labels(&mut dst, "destination", &l.destination);
    // destination_service sits after the namespace.
    out.extend(dst.drain(..2));
    out.push(("destination_service", service_label(l)));
    out.extend(dst);
    out.push(("route", l.route.as_deref().unwrap_or_default().to_owned()));
    out.push(("response_code", String::new()));
    out.push(("grpc_status", String::new()));
    out.push(("failed_step", String::new()));
    out.push(("protocol", "http".to_owned()));
    out.push(("connection_security", security(l).to_owned()));
    debug_assert_eq!(out.iter().map(|(k, _)| *k).collect::<Vec<_>>(), WEFT_HTTP);
    out
}

fn weft_tcp_labels(l: &CallLabels, step: Option<&'static str>) -> Labels {
    let mut out = weft_http_labels(l);
    set(&mut out, "failed_step", step.unwrap_or_default());
    set(&mut out, "protocol", "tcp");
    out.retain(|(k, _)| WEFT_TCP.contains(k));
    out
}

fn tcp_labels(names: &[&'static str], labels: Labels) -> Labels {
    debug_assert_eq!(labels.iter().map(|(k, _)| *k).collect::<Vec<_>>(), names);
    labels
}

fn weft_outcome(labels: &mut Labels, o: Outcome) {
    set(labels, "response_code", o.code.to_string());
    set(
        labels,
        "grpc_status",
        o.grpc_status.map(|s| s.to_string()).unwrap_or_default(),
    );
    set(labels, "failed_step", o.failed_step.unwrap_or_default());
    set(labels, "protocol", if o.grpc { "grpc" } else { "http" });
}

fn istio_outcome(labels: &mut Labels, o: Outcome) {
    set(labels, "response_code", o.code.to_string());
    set(
        labels,
        "grpc_response_status",
        o.grpc_status.map(|s| s.to_string()).unwrap_or_default(),
    );
    set(labels, "response_flags", response_flags(o.failed_step));
    set(
        labels,
        "request_protocol",
        if o.grpc { "grpc" } else { "http" },
    );
}

/// Istio's `response_flags` for a weft failed step (Envoy's short codes:
/// UF upstream connection failure, UH no healthy upstream, UO overflow,
/// UT upstream timeout, URX retries exhausted, FI fault injected, RL rate
/// limited, NR no route, DPE downstream protocol error, UAEX unauthorized).
pub fn response_flags(step: Option<&str>) -> &'static str {
    match step {
        None => "-",
        Some(
            "connect"
            | "connect-timeout"
            | "tls"
            | "identity-mismatch"
            | "http-handshake"
            | "upstream"
            | "peer-app-unavailable"
            | "app",
        ) => "UF",
        Some("no-endpoint") => "UH",
        Some("overflow") => "UO",
        Some("timeout" | "per-try-timeout") => "UT",
        Some("retry-budget-exhausted") => "URX",
        Some("fault") => "FI",
        Some("rate-limited") => "RL",
        Some("loop" | "original-destination" | "route-backend") => "NR",
        Some("bad-request" | "ambiguous-path" | "header-timeout" | "header-too-large") => "DPE",
        Some("denied" | "plaintext-refused" | "revoked") => "UAEX",
        Some(_) => "-",
    }
}

/// Istio's labels with the outcome left empty.
fn istio_labels(l: &CallLabels, protocol: &str) -> Labels {
    let canonical = |p: &Peer| {
        p.app
            .clone()
            .or_else(|| p.workload.clone())
            .unwrap_or_else(|| UNKNOWN.to_owned())
    };
    let revision = |p: &Peer| p.version.clone().unwrap_or_else(|| "latest".to_owned());
    let (s, d) = (&l.source, &l.destination);
    let (svc_fqdn, svc_name, svc_ns) = match &l.service {
        Some((n, ns)) => (format!("{n}.{ns}.{CLUSTER_DOMAIN}"), n.clone(), ns.clone()),
        None => (UNKNOWN.to_owned(), UNKNOWN.to_owned(), UNKNOWN.to_owned()),
    };
    let security = match (l.reporter, l.mtls) {
        (Reporter::Source, _) => "unknown",
        (Reporter::Destination, true) => "mutual_tls",
        (Reporter::Destination, false) => "none",
    };
    let out: Labels = vec![
        ("reporter", l.reporter.as_str().to_owned()),
        ("source_workload", or_unknown(s.workload.as_ref())),
        (
            "source_workload_namespace",
            or_unknown(s.namespace.as_ref()),
        ),
        ("source_principal", or_unknown(s.principal.as_ref())),
        ("source_app", or_unknown(s.app.as_ref())),
        ("source_version", or_unknown(s.version.as_ref())),
        ("source_canonical_service", canonical(s)),
        ("source_canonical_revision", revision(s)),
        ("source_cluster", ISTIO_CLUSTER.to_owned()),
        ("destination_workload", or_unknown(d.workload.as_ref())),
        (
            "destination_workload_namespace",
            or_unknown(d.namespace.as_ref()),
        ),
        ("destination_principal", or_unknown(d.principal.as_ref())),
        ("destination_app", or_unknown(d.app.as_ref())),
        ("destination_version", or_unknown(d.version.as_ref())),
        ("destination_service", svc_fqdn),
        ("destination_service_name", svc_name),
        ("destination_service_namespace", svc_ns),
        ("destination_canonical_service", canonical(d)),
        ("destination_canonical_revision", revision(d)),
        ("destination_cluster", ISTIO_CLUSTER.to_owned()),
        ("request_protocol", protocol.to_owned()),
        ("response_code", String::new()),
        ("grpc_response_status", String::new()),
        ("response_flags", "-".to_owned()),
        ("connection_security_policy", security.to_owned()),
    ];
    debug_assert_eq!(out.iter().map(|(k, _)| *k).collect::<Vec<_>>(), ISTIO);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn text(t: &Traffic) -> String {
        let mut r = Registry::default();
        t.register(&mut r);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).expect("encode");
        out
    }

    fn labels() -> CallLabels {
        CallLabels {
            reporter: Reporter::Source,
            source: Peer {
                workload: Some("frontend".into()),
                namespace: Some("demo".into()),
                principal: Some("spiffe://td/ns/demo/sa/frontend".into()),
                app: Some("frontend".into()),
                version: None,
            },
            destination: Peer {
                workload: Some("backend-v1".into()),
                namespace: Some("demo".into()),
                principal: Some("spiffe://td/ns/demo/sa/backend".into()),
                app: Some("backend".into()),
                version: Some("v1".into()),
            },
            service: Some(("backend".into(), "demo".into())),
            route: Some(Arc::from("backend/split")),
            mtls: true,
        }
    }

    fn ok() -> Outcome {
        Outcome {
            code: 200,
            grpc: false,
            grpc_status: None,
            failed_step: None,
        }
    }

    /// The value of the series of `name` whose labels include all of `with`.
    fn value(t: &str, name: &str, with: &[&str]) -> Option<String> {
        t.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && with.iter().all(|w| l.contains(w)))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_owned)
    }

    #[test]
    fn a_call_is_counted_once_with_every_label_under_weft_names() {
        let t = Traffic::default();
        let s = t.http(&labels(), MetricsNaming::Weft);
        s.record(ok(), Duration::from_micros(700), 10, 2048);
        s.record(ok(), Duration::from_micros(700), 10, 2048);
        let aborted = Outcome {
            code: 503,
            failed_step: Some(failed_step(b"fault")),
            ..ok()
        };
        s.record(aborted, Duration::from_millis(3), 0, 0);
        let out = text(&t);
        let want = [
            "reporter=\"source\"",
            "source_workload=\"frontend\"",
            "source_namespace=\"demo\"",
            "source_principal=\"spiffe://td/ns/demo/sa/frontend\"",
            "source_app=\"frontend\"",
            "source_version=\"unknown\"",
            "destination_workload=\"backend-v1\"",
            "destination_service=\"backend.demo\"",
            "destination_principal=\"spiffe://td/ns/demo/sa/backend\"",
            "destination_version=\"v1\"",
            "route=\"backend/split\"",
            "response_code=\"200\"",
            "grpc_status=\"\"",
            "failed_step=\"\"",
            "protocol=\"http\"",
            "connection_security=\"mutual_tls\"",
        ];
        assert_eq!(
            value(&out, "weft_requests_total", &want).as_deref(),
            Some("2"),
            "{out}"
        );
        assert_eq!(
            value(
                &out,
                "weft_requests_total",
                &["response_code=\"503\"", "failed_step=\"fault\""]
            )
            .as_deref(),
            Some("1"),
            "{out}"
        );
        // 700 µs falls in the 1 ms bucket, not the 0.5 ms one.
        assert_eq!(
            value(
                &out,
                "weft_request_duration_seconds_bucket",
                &["response_code=\"200\"", "le=\"0.0005\""]
            )
            .as_deref(),
            Some("0"),
            "{out}"
        );
        assert_eq!(
            value(
                &out,
                "weft_request_duration_seconds_bucket",
                &["response_code=\"200\"", "le=\"0.001\""]
            )
            .as_deref(),
            Some("2"),
            "{out}"
        );
        assert_eq!(
            value(&out, "weft_response_bytes_sum", &["response_code=\"200\""]).as_deref(),
            Some("4096.0"),
            "{out}"
        );
        assert_eq!(
            value(&out, "weft_request_bytes_count", &["response_code=\"200\""]).as_deref(),
            Some("2"),
            "{out}"
        );
        assert!(!out.contains("istio_requests_total{"), "{out}");
    }

    #[test]
    fn istio_naming_uses_istio_names_and_values() {
        let t = Traffic::default();
        let mut l = labels();
        l.reporter = Reporter::Destination;
        let s = t.http(&l, MetricsNaming::Istio);
        s.record(
            Outcome {
                code: 200,
                grpc: true,
                grpc_status: Some(14),
                failed_step: None,
            },
            Duration::from_millis(7),
            1,
            1,
        );
        let out = text(&t);
        let want = [
            "reporter=\"destination\"",
            "source_workload_namespace=\"demo\"",
            "source_canonical_service=\"frontend\"",
            "source_canonical_revision=\"latest\"",
            "destination_canonical_revision=\"v1\"",
            "destination_service=\"backend.demo.svc.cluster.local\"",
            "destination_service_name=\"backend\"",
            "destination_service_namespace=\"demo\"",
            "request_protocol=\"grpc\"",
            "grpc_response_status=\"14\"",
            "response_flags=\"-\"",
            "connection_security_policy=\"mutual_tls\"",
            "source_cluster=\"Kubernetes\"",
        ];
        assert_eq!(
            value(&out, "istio_requests_total", &want).as_deref(),
            Some("1"),
            "{out}"
        );
        // 7 ms in Istio's millisecond buckets.
        assert_eq!(
            value(
                &out,
                "istio_request_duration_milliseconds_bucket",
                &["le=\"5.0\""]
            )
            .as_deref(),
            Some("0"),
            "{out}"
        );
        assert_eq!(
            value(
                &out,
                "istio_request_duration_milliseconds_bucket",
                &["le=\"10.0\""]
            )
            .as_deref(),
            Some("1"),
            "{out}"
        );
        assert!(!out.contains("weft_requests_total{"), "{out}");
        // Both: one call in each set.
        let both = Traffic::default();
        both.http(&labels(), MetricsNaming::Both)
            .record(ok(), Duration::from_millis(1), 0, 0);
        let out = text(&both);
        assert_eq!(
            value(
                &out,
                "istio_requests_total",
                &["connection_security_policy=\"unknown\""]
            )
            .as_deref(),
            Some("1"),
            "{out}"
        );
        assert_eq!(
            value(&out, "weft_requests_total", &[]).as_deref(),
            Some("1"),
            "{out}"
        );
    }

    #[test]
    fn label_sets_beyond_the_cap_go_to_overflow_and_are_counted() {
        let t = Traffic::default();
        t.set_cap(2);
        let s = t.http(&labels(), MetricsNaming::Weft);
        for code in [200, 201, 202, 203] {
            s.record(Outcome { code, ..ok() }, Duration::from_millis(1), 0, 0);
        }
        s.record(
            Outcome { code: 203, ..ok() },
            Duration::from_millis(1),
            0,
            0,
        );
        let tcp = t.tcp(&labels(), None, MetricsNaming::Weft);
        tcp.opened();
        tcp.closed(5, 6);
        let out = text(&t);
        assert_eq!(
            value(&out, "weft_requests_total", &["response_code=\"200\""]).as_deref(),
            Some("1"),
            "{out}"
        );
        assert_eq!(
            value(&out, "weft_requests_total", &["response_code=\"201\""]).as_deref(),
            Some("1"),
            "{out}"
        );
        assert_eq!(
            value(&out, "weft_requests_total", &["response_code=\"202\""]),
            None,
            "{out}"
        );
        assert_eq!(
            value(
                &out,
                "weft_requests_total",
                &["reporter=\"overflow\"", "response_code=\"overflow\""]
            )
            .as_deref(),
            Some("3"),
            "{out}"
        );
        assert_eq!(
            value(
                &out,
                "weft_tcp_sent_bytes_total",
                &["reporter=\"overflow\""]
            )
            .as_deref(),
            Some("5"),
            "{out}"
        );
        assert!(
            out.contains("weft_proxy_metric_series_overflow_total 4\n"),
            "{out}"
        );
    }

    #[test]
    fn tcp_connections_count_bytes_each_way_without_http_labels() {
        let t = Traffic::default();
        let s = t.tcp(&labels(), None, MetricsNaming::Both);
        s.opened();
        s.closed(300, 1000);
        t.tcp(&labels(), Some("denied"), MetricsNaming::Both)
            .opened();
        let out = text(&t);
        let line = out
            .lines()
            .find(|l| l.starts_with("weft_tcp_sent_bytes_total{"))
            .expect("a tcp series");
        assert!(
            !line.contains("route=") && !line.contains("response_code="),
            "{line}"
        );
        assert!(line.contains("protocol=\"tcp\""), "{line}");
        assert_eq!(
            value(&out, "weft_tcp_sent_bytes_total", &["failed_step=\"\""]).as_deref(),
            Some("300")
        );
        assert_eq!(
            value(&out, "weft_tcp_received_bytes_total", &["failed_step=\"\""]).as_deref(),
            Some("1000")
        );
        assert_eq!(
            value(
                &out,
                "istio_tcp_received_bytes_total",
                &["response_flags=\"-\""]
            )
            .as_deref(),
            Some("1000")
        );
        assert_eq!(
            value(
                &out,
                "istio_tcp_connections_opened_total",
                &["response_flags=\"UAEX\""]
            )
            .as_deref(),
            Some("1"),
            "{out}"
        );
    }

    #[test]
    fn a_step_an_app_made_up_is_other() {
        assert_eq!(failed_step(b"fault"), "fault");
        assert_eq!(failed_step(b"drop table users"), "other");
        assert_eq!(response_flags(Some("no-endpoint")), "UH");
        assert_eq!(response_flags(None), "-");
    }

    #[test]
    fn the_namespace_comes_from_the_principal() {
        assert_eq!(
            Peer::namespace_of_principal("spiffe://td/ns/demo/sa/web"),
            Some("demo")
        );
        assert_eq!(
            Peer::namespace_of_principal("spiffe://td/weft/config-signer"),
            None
        );
        assert_eq!(Peer::namespace_of_principal("nonsense"), None);
    }

    #[test]
    fn a_metered_body_records_bytes_and_grpc_status_once() {
        use http_body_util::BodyExt as _;
        let t = Traffic::default();
        let s = t.http(&labels(), MetricsNaming::Weft);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("7"));
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hello"))),
            Ok(Frame::data(Bytes::from_static(b" world"))),
            Ok(Frame::trailers(trailers)),
        ];
        let inner = http_body_util::StreamBody::new(futures::stream::iter(frames));
        let rec = s.start(Instant::now(), Outcome { grpc: true, ..ok() }, 3);
        let body = MeteredBody::new(inner, rec);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let collected = rt.block_on(body.collect()).expect("body");
        assert_eq!(collected.to_bytes().len(), 11);
        let out = text(&t);
        assert_eq!(
            value(
                &out,
                "weft_response_bytes_sum",
                &["grpc_status=\"7\"", "protocol=\"grpc\""]
            )
            .as_deref(),
            Some("11.0"),
            "{out}"
        );
        assert_eq!(
            value(&out, "weft_requests_total", &[]).as_deref(),
            Some("1"),
            "{out}"
        );
        // A body dropped before its end still counts its call, once.
        let rec = s.start(Instant::now(), ok(), 0);
        drop(MeteredBody::new(http_body_util::Empty::<Bytes>::new(), rec));
        let out = text(&t);
        assert_eq!(
            value(&out, "weft_requests_total", &["grpc_status=\"\""]).as_deref(),
            Some("1"),
            "{out}"
        );
    }
}
