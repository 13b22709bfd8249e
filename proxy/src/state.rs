//! The proxy's per-process state: [`Settings`], the network hooks
//! ([`Net`]) and [`State`], which every listener holds.
//!
//! ```text
//! State ── snapshot: ArcSwap<Snapshot>  (per config generation; reload publishes)
//!       ── client policy: pools, outliers, breakers, budgets, connection limits
//!       ── inbound rate-limit buckets, metrics, shutdown and drain signals
//! ```
//!
//! In: a loaded [`Snapshot`] ([`State::reload`], [`State::publish`]). Out:
//! what the listeners read per connection and per request. Nothing here
//! starts a task or knows a listener; [`crate::app`] assembles those.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rustls::pki_types::UnixTime;
use tokio::sync::{mpsc, watch};

use crate::accesslog::{ACCESS_LOG_QUEUE, AccessLog, Plan};
use crate::client::breakers::Breakers;
use crate::client::budgets::RetryBudgets;
use crate::client::connect::Connector;
use crate::client::limits::ConnLimits;
use crate::client::outliers::Outliers;
use crate::http::pool::Pools;
use crate::http::server::HeadLimits;
use crate::metrics::Metrics;
use crate::metrics::traffic::Peer;
use crate::net::{Dialer, DirectDialer, OrigDst, orig_dst::SoOriginalDst};
use crate::probes::AppProbes;
use crate::ratelimit::Limiters;
use crate::snapshot::{Snapshot, SnapshotError, load_dir_after};
use crate::trace::context::{self, Incoming, TraceContext};
use crate::trace::{Kind, Pending, SPAN_QUEUE, Tracer, Value};

/// Everything a proxy is started with. Built from flags/env by the binary,
/// directly by tests.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The mount with `..data`, `proxy.json[.gz]`, `tls.crt`, `tls.key`, `ca.crt`.
    pub config_dir: PathBuf,
    /// Outbound capture listener (15001).
    pub outbound_addr: SocketAddr,
    /// Inbound capture listener (15006).
    pub inbound_addr: SocketAddr,
    /// Admin listener (15020).
    pub admin_addr: SocketAddr,
    /// Where inbound traffic is delivered to the app (loopback).
    pub app_host: IpAddr,
    /// This pod's IP, for loop detection.
    pub pod_ip: Option<IpAddr>,
    /// This pod's labels (authorization selectors; `app` and `version`
    /// label its traffic metrics).
    pub labels: BTreeMap<String, String>,
    /// This pod's workload (Deployment, StatefulSet, … or the pod itself),
    /// as the injector derived it; the `source_workload` of its calls.
    pub workload: Option<String>,
    /// Most label sets of traffic metrics kept before calls are counted
    /// under `overflow`.
    pub max_metric_series: usize,
    /// HTTP/1.1 requests to weft peers are multiplexed on one HTTP/2
    /// connection per peer ([`crate::http::pool::PoolKey::mux`]).
    pub mux: bool,
    /// HTTP/1.1 connections kept to each multiplexing peer beside the
    /// shared one: a request takes an idle one before a stream
    /// ([`crate::http::pool::Pools::with_lanes`]; 0: streams only).
    pub mux_lanes: usize,
    /// The pod's `weft.dev/access-log` annotation (through the injector's
    /// `WEFT_ACCESS_LOG`): `Some(None)` off, `Some(Some(errors_only))` on,
    /// over the namespace's and the Mesh's setting.
    pub access_log_override: Option<Option<bool>>,
    /// Extra opaque ports (annotation), on top of the server-first list.
    pub opaque_ports: Vec<u16>,
    /// How long to wait for a client's first bytes.
    pub detect_timeout: Duration,
    /// Connect timeout per endpoint attempt.
    pub connect_timeout: Duration,
    /// How long in-flight work may finish after shutdown starts.
    pub drain_timeout: Duration,
    /// The app's original probes.
    pub app_probes: AppProbes,
    /// Largest request head a client may send on any HTTP connection the
    /// proxy serves (HTTP/1: request line and header lines; HTTP/2: the
    /// decoded header list). Over it: 431, and an HTTP/1 connection closes.
    pub max_header_bytes: usize,
    /// How long an HTTP/1 client may take to send a whole request head,
    /// counted from its first byte (an idle keep-alive connection is not
    /// sending one). Past it the connection closes. `None`: no limit.
    pub header_read_timeout: Option<Duration>,
    /// Where access log lines go (stdout; tests capture them).
    pub access_log_output: crate::accesslog::Output,
    /// The address an ingress gateway's listeners bind (their ports come
    /// from the config).
    pub gateway_ip: IpAddr,
    /// Where an ingress gateway's certificates are mounted: one directory
    /// per certificate, named as the config names it.
    pub gateway_cert_dir: PathBuf,
    /// An app's plaintext HTTP/1 connection idle between one and two of
    /// this leaves the runtime until its next bytes (`net::park`). `None`:
    /// never.
    pub park_idle_after: Option<Duration>,
}

/// Default of [`Settings::park_idle_after`].
pub const DEFAULT_PARK_IDLE_AFTER: Duration = Duration::from_secs(1);

/// Default of [`Settings::gateway_cert_dir`].
pub const DEFAULT_GATEWAY_CERT_DIR: &str = "/var/run/weft-gateway/certs";

/// Default of [`Settings::max_header_bytes`]: 60 KiB, room for large cookies
/// and tokens while bounding what one client makes the proxy buffer.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 60 * 1024;
/// Default of [`Settings::header_read_timeout`].
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

impl Settings {
    /// The limits on request heads every HTTP listener applies.
    pub fn head_limits(&self) -> HeadLimits {
        HeadLimits {
            max_header_bytes: self.max_header_bytes,
            header_read_timeout: self.header_read_timeout,
        }
    }

    /// Defaults for the given mount dir, listening on the standard ports.
    pub fn new(config_dir: PathBuf) -> Self {
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        Settings {
            config_dir,
            outbound_addr: SocketAddr::new(any, 15001),
            inbound_addr: SocketAddr::new(any, 15006),
            admin_addr: SocketAddr::new(any, 15020),
            app_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            pod_ip: None,
            labels: BTreeMap::new(),
            workload: None,
            max_metric_series: crate::metrics::traffic::DEFAULT_SERIES_CAP,
            mux: true,
            mux_lanes: crate::http::pool::DEFAULT_MUX_LANES,
            access_log_override: None,
            opaque_ports: Vec::new(),
            detect_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            drain_timeout: Duration::from_secs(20),
            app_probes: AppProbes::default(),
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            header_read_timeout: Some(DEFAULT_HEADER_READ_TIMEOUT),
            access_log_output: crate::accesslog::Output::default(),
            gateway_ip: any,
            gateway_cert_dir: PathBuf::from(DEFAULT_GATEWAY_CERT_DIR),
            park_idle_after: Some(DEFAULT_PARK_IDLE_AFTER),
        }
    }

    /// Same settings, every listener on an ephemeral port of `ip` (tests).
    pub fn ephemeral(mut self, ip: IpAddr) -> Self {
        self.outbound_addr = SocketAddr::new(ip, 0);
        self.inbound_addr = SocketAddr::new(ip, 0);
        self.admin_addr = SocketAddr::new(ip, 0);
        self
    }
}

/// How the proxy meets the network: production uses `SO_ORIGINAL_DST` and
/// plain connects; tests stamp destinations (see `net::stamp`).
#[derive(Clone, Debug)]
pub struct Net {
    /// Original-destination lookup for the outbound listener.
    pub outbound_orig_dst: Arc<dyn OrigDst>,
    /// Original-destination lookup for the inbound listener.
    pub inbound_orig_dst: Arc<dyn OrigDst>,
    /// Outgoing connections.
    pub dialer: Arc<dyn Dialer>,
}

impl Default for Net {
    fn default() -> Self {
        Net {
            outbound_orig_dst: Arc::new(SoOriginalDst),
            inbound_orig_dst: Arc::new(SoOriginalDst),
            dialer: Arc::new(DirectDialer),
        }
    }
}

/// State shared by every listener and task.
#[derive(Debug)]
pub struct State {
    /// Settings.
    pub settings: Settings,
    /// Network hooks.
    pub net: Net,
    /// The active snapshot (none until the first good load).
    pub snapshot: ArcSwapOption<Snapshot>,
    /// Metrics.
    pub metrics: Metrics,
    /// Pools to endpoints and peer proxies.
    pub outbound_pools: Pools,
    /// Pools to the local app.
    pub inbound_pools: Pools,
    /// Inbound rate-limit buckets (kept across reloads).
    pub inbound_limits: Limiters,
    /// Endpoints ejected after a failed connection (passive health).
    pub outliers: Outliers,
    /// Requests in flight per Service (connectionPool.maxRequests).
    pub breakers: Breakers,
    /// Retry budgets per Service (retryBudget).
    pub retry_budgets: RetryBudgets,
    /// Open connections per Service (connectionPool.maxConnections).
    pub conn_limits: ConnLimits,
    /// Access log lines on their way to the writer.
    pub access_log: AccessLog,
    /// What this proxy tells peer proxies about its workload (see
    /// [`crate::http::SOURCE_HEADER`]).
    pub source_header: Option<http::HeaderValue>,
    /// Where finished spans go.
    pub tracer: Arc<Tracer>,
    /// Bound listener addresses: [outbound, inbound, admin].
    pub listeners: Mutex<Vec<SocketAddr>>,
    listening: AtomicBool,
    rr: AtomicUsize,
    shutdown: watch::Sender<bool>,
    /// The same signal for futures held per connection
    /// ([`State::end_signal`]).
    ends: Arc<crate::net::end::Ends>,
    /// Idle app connections parked outside the runtime.
    pub parking: crate::net::park::Parking,
    published: watch::Sender<u64>,
    drain: Mutex<Option<mpsc::Sender<()>>>,
}

/// The value of [`crate::http::SOURCE_HEADER`] this pod sends: its
/// workload, `app` and `version` (each only if known and a header can
/// carry it).
fn source_header(s: &Settings) -> Option<http::HeaderValue> {
    let fields = [
        ("workload", s.workload.as_deref()),
        ("app", weft_proxy_config::app_label(&s.labels)),
        ("version", weft_proxy_config::version_label(&s.labels)),
    ];
    let text: Vec<String> = fields
        .iter()
        .filter_map(|(k, v)| {
            v.filter(|v| !v.is_empty() && !v.contains([';', '=']))
                .map(|v| format!("{k}={v}"))
        })
        .collect();
    if text.is_empty() {
        return None;
    }
    http::HeaderValue::from_str(&text.join(";")).ok()
}

impl State {
    /// A state with no snapshot yet, for listeners bound at `listeners`
    /// ([outbound, inbound, admin]). The first receiver ends once every
    /// drain token is dropped (see [`State::drain_token`]); the second
    /// gets the access log lines (see [`crate::accesslog::write`]).
    pub fn new(
        settings: Settings,
        net: Net,
        listeners: Vec<SocketAddr>,
    ) -> (
        Self,
        mpsc::Receiver<()>,
        mpsc::Receiver<String>,
        mpsc::Receiver<crate::trace::Span>,
    ) {
        let (drain_tx, drain_rx) = mpsc::channel(1);
        let metrics = Metrics::default();
        metrics.traffic.set_cap(settings.max_metric_series);
        let source_header = source_header(&settings);
        let (tracer, span_rx) = Tracer::new(SPAN_QUEUE, metrics.spans_dropped.clone());
        let (access_log, log_rx) =
            AccessLog::new(ACCESS_LOG_QUEUE, metrics.access_log_dropped.clone());
        let parking = crate::net::park::Parking::new(
            settings.park_idle_after,
            metrics.connections_parked.clone(),
        );
        let lanes = settings.mux_lanes;
        let state = State {
            parking,
            settings,
            net,
            snapshot: ArcSwapOption::empty(),
            metrics,
            outbound_pools: Pools::with_lanes(lanes),
            inbound_pools: Pools::default(),
            inbound_limits: Default::default(),
            outliers: Outliers::default(),
            breakers: Breakers::default(),
            retry_budgets: RetryBudgets::default(),
            conn_limits: ConnLimits::default(),
            access_log,
            source_header,
            tracer: Arc::new(tracer),
            listeners: Mutex::new(listeners),
            listening: AtomicBool::new(false),
            rr: AtomicUsize::new(0),
            shutdown: watch::channel(false).0,
            ends: Arc::default(),
            published: watch::channel(0).0,
            drain: Mutex::new(Some(drain_tx)),
        };
        (state, drain_rx, log_rx, span_rx)
    }

    /// This pod as one end of a call, under `snap` (its namespace and
    /// identity): the source of its outbound calls, the destination of its
    /// inbound ones.
    pub fn local_peer(&self, snap: &Snapshot) -> Peer {
        Peer {
            workload: self.settings.workload.clone(),
            namespace: Some(snap.config.namespace.clone()),
            principal: Some(snap.identity.id().to_string()),
            app: weft_proxy_config::app_label(&self.settings.labels).map(str::to_owned),
            version: weft_proxy_config::version_label(&self.settings.labels).map(str::to_owned),
        }
    }

    /// Starts the span of a request when the Mesh traces (`None`
    /// otherwise, and the headers are left alone): continues the trace the
    /// request carries (its sampling decision included) or starts one at
    /// the Mesh's sampling percentage, and writes the new span's context
    /// into the request in every format. `None` too for an unsampled
    /// request, whose headers still carry the decision on.
    pub fn start_span<B>(
        &self,
        snap: &Snapshot,
        kind: Kind,
        req: &mut http::Request<B>,
    ) -> Option<Pending> {
        let tracing = snap.config.mesh.tracing.as_ref()?;
        let (trace_id, parent, sampled, debug, state) = match context::read(req.headers()) {
            Incoming::Context(c) => (c.trace_id, Some(c.span_id), c.sampled, c.debug, c.state),
            Incoming::Decision(d) => (context::new_trace_id(), None, d, false, None),
            Incoming::None => (
                context::new_trace_id(),
                None,
                context::sample(tracing.sampling_percent),
                false,
                None,
            ),
        };
        let ctx = TraceContext {
            trace_id,
            span_id: context::new_span_id(),
            parent_span_id: parent,
            sampled,
            debug,
            state,
        };
        ctx.write(req.headers_mut());
        if !sampled {
            return None;
        }
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            });
        let mut attributes = vec![
            (
                "http.request.method",
                Value::Str(req.method().as_str().to_owned()),
            ),
            ("url.path", Value::Str(req.uri().path().to_owned())),
            (
                "network.protocol.version",
                Value::Str(
                    match req.version() {
                        http::Version::HTTP_2 => "2",
                        http::Version::HTTP_10 => "1.0",
                        _ => "1.1",
                    }
                    .to_owned(),
                ),
            ),
        ];
        if let Some(a) = authority {
            attributes.push(("server.address", Value::Str(a)));
        }
        if let Some(id) = req
            .headers()
            .get(crate::accesslog::REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            attributes.push(("weft.request_id", Value::Str(id.to_owned())));
        }
        Some(Pending {
            context: ctx,
            kind,
            name: req.method().as_str().to_owned(),
            start: std::time::SystemTime::now(),
            attributes,
        })
    }

    /// The resource of this proxy's spans: `service.name` is the workload's
    /// `app` (else its name) and namespace, as `<app>.<namespace>`.
    pub fn trace_resource(&self, snap: &Snapshot) -> Vec<(&'static str, String)> {
        let local = self.local_peer(snap);
        let ns = local.namespace.clone().unwrap_or_default();
        let name = local
            .app
            .clone()
            .or_else(|| local.workload.clone())
            .unwrap_or_else(|| "unknown".to_owned());
        let mut r = vec![
            ("service.name", format!("{name}.{ns}")),
            ("k8s.namespace.name", ns),
            ("weft.principal", local.principal.unwrap_or_default()),
        ];
        if let Some(w) = local.workload {
            r.push(("weft.workload", w));
        }
        r
    }

    /// Every listener is accepting: ready once a snapshot is active too.
    pub fn set_listening(&self) {
        self.listening.store(true, Ordering::Release);
    }

    /// Drops the state's own drain token: from now on the drain receiver
    /// ends when the last connection task ends.
    pub fn close_drain(&self) {
        self.drain.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Runs `task` (one connection) holding a drain token, so shutdown
    /// waits for it until the drain deadline.
    pub fn spawn_drained(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        tokio::spawn(Drained {
            task,
            token: self.drain_token(),
        });
    }

    /// Publishes a good snapshot and updates its metrics.
    pub fn publish(&self, snap: Snapshot) {
        let m = &self.metrics;
        if let Some(old) = self.snapshot.load_full() {
            m.config_info.remove(&crate::metrics::ConfigLabels {
                hash: old.config.hash.clone(),
            });
        }
        m.config_generation.set(snap.config.generation as i64);
        m.config_info
            .get_or_create(&crate::metrics::ConfigLabels {
                hash: snap.config.hash.clone(),
            })
            .set(1);
        m.cert_expiry.set(snap.identity.not_after());
        tracing::info!(
            generation = snap.config.generation,
            hash = %snap.config.hash,
            identity = %snap.identity.id(),
            source = %snap.source.display(),
            "snapshot active"
        );
        self.snapshot.store(Some(Arc::new(snap)));
        self.published.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that changes each time a snapshot is published: open
    /// connections re-check themselves against the new one.
    pub fn snapshot_changes(&self) -> watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// Loads the mount and publishes it; a bad snapshot is logged, counted
    /// and dropped, and the previous one keeps serving.
    pub fn reload(&self) -> Result<(), SnapshotError> {
        // The snapshot serving now: what did not change is taken from it.
        let prev = self.snapshot.load_full();
        match load_dir_after(&self.settings.config_dir, UnixTime::now(), prev.as_deref()) {
            Ok(s) => {
                self.metrics.reload(true);
                self.publish(s);
                Ok(())
            }
            Err(e) => {
                self.metrics.reload(false);
                self.metrics
                    .config_rejected
                    .get_or_create(&crate::metrics::RejectLabels { reason: e.reason() })
                    .inc();
                tracing::error!(error = %e, reason = e.reason(), "rejected new config/identity snapshot; the previous one keeps serving");
                Err(e)
            }
        }
    }

    /// Ready: a snapshot is active, listeners are bound, not shutting down.
    pub fn is_ready(&self) -> bool {
        self.snapshot.load().is_some()
            && self.listening.load(Ordering::Acquire)
            && !*self.shutdown.borrow()
    }

    /// A per-Service round-robin counter (one shared counter is enough for
    /// fairness within each Service's endpoint list).
    pub fn next_rr(&self) -> usize {
        self.rr.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether the active snapshot asks for access logs.
    pub fn access_logging(&self) -> bool {
        self.snapshot
            .load()
            .as_ref()
            .is_some_and(|s| self.access_log_plan(s).is_some())
    }

    /// Whether (and how) a request or connection arriving now under `snap`
    /// is logged: the pod's override, else the namespace's document; the
    /// sample share decided here, once per request.
    pub fn access_log_plan(&self, snap: &Snapshot) -> Option<Plan> {
        let mesh = &snap.config.mesh;
        let opts = &mesh.access_log_options;
        let errors_only = match self.settings.access_log_override {
            Some(None) => return None,
            Some(Some(errors_only)) => errors_only,
            None if !mesh.access_log => return None,
            None => opts.errors_only,
        };
        if opts.sample_percent < 100.0 && !context::sample(opts.sample_percent) {
            return None;
        }
        Some(Plan {
            format: opts.format,
            errors_only,
        })
    }

    /// Resolves once shutdown has started.
    pub async fn shutdown_started(&self) {
        shutdown_requested(&mut self.shutdown_signal()).await;
    }

    /// What opening upstream connections for a request or connection of
    /// `snapshot` needs (see [`crate::client::connect`]).
    pub fn connector<'a>(&'a self, snapshot: &'a Snapshot) -> Connector<'a> {
        Connector {
            dialer: &*self.net.dialer,
            snapshot,
            metrics: &self.metrics,
        }
    }

    /// Resolves once shutdown has started: for futures every connection
    /// holds for its whole life (32 bytes, against 72 for a cancellation
    /// token's owned future and 208 for an async block owning the state
    /// around [`State::shutdown_started`]; see `net::end`).
    pub fn end_signal(&self) -> crate::net::end::EndSignal {
        self.ends.signal()
    }

    /// Parks idle connections (`net::park`) until shutdown starts, then
    /// closes those parked.
    pub async fn run_parking(self: Arc<Self>) {
        let mut shutdown = self.shutdown_signal();
        self.parking.run(shutdown_requested(&mut shutdown)).await;
    }

    /// A receiver that flips to `true` when shutdown starts.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Starts graceful shutdown.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
        self.ends.end();
        self.parking.close();
    }

    /// A token held by every connection task; shutdown waits for all of
    /// them (or the drain deadline).
    pub fn drain_token(&self) -> Option<mpsc::Sender<()>> {
        self.drain.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether `dst` is one of this proxy's own listeners (a loop).
    pub fn is_own_listener(&self, dst: SocketAddr) -> bool {
        let listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        listeners.iter().any(|l| {
            l.port() == dst.port()
                && (l.ip() == dst.ip()
                    || dst.ip().is_loopback()
                    || Some(dst.ip()) == self.settings.pod_ip
                    || (l.ip().is_unspecified() && dst.ip().is_unspecified()))
        })
    }
}

pub use crate::net::listen::shutdown_requested;

pin_project_lite::pin_project! {
    /// A connection's task: its future, and the drain token it holds until
    /// the future ends. The future stays in place: an `async` block that
    /// awaits a captured future keeps two slots for it (the captured value
    /// and the one being awaited), which doubled every connection task's
    /// memory (docs/performance.md).
    struct Drained<F> {
        #[pin]
        task: F,
        token: Option<mpsc::Sender<()>>,
    }
}

impl<F: std::future::Future<Output = ()>> std::future::Future for Drained<F> {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let this = self.project();
        std::task::ready!(this.task.poll(cx));
        this.token.take();
        std::task::Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The drain token is held while the connection's future runs and
    /// released when it ends: shutdown waits for exactly that.
    #[tokio::test]
    async fn a_drained_task_holds_its_token_until_its_future_ends() {
        let (token, mut drained) = mpsc::channel::<()>(1);
        let (end, ended) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(Drained {
            task: async move {
                let _ = ended.await;
            },
            token: Some(token),
        });
        let early = tokio::time::timeout(Duration::from_millis(50), drained.recv()).await;
        assert!(early.is_err(), "the token is held while the future runs");
        end.send(()).expect("the task waits");
        task.await.expect("the task ends");
        assert_eq!(drained.recv().await, None, "the token is released");
    }
}
