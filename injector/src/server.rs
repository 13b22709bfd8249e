//! The HTTPS server: axum routes over hyper over rustls.
//!
//! ```text
//! TCP accept ─▶ TLS handshake (cert from CertResolver, bounded in time)
//!            ─▶ hyper HTTP/1.1 or HTTP/2 (header read timeout)
//!            ─▶ axum: POST /inject · GET /healthz · GET /readyz · GET /metrics
//! ```
//!
//! `/inject` reads at most `max_body_bytes` within `body_timeout` (413 or 408
//! otherwise, so junk can neither exhaust memory nor hold a task forever),
//! decides with [`crate::admission::review`] against the current
//! [`InjectConfig`] (an `ArcSwap`, replaced when the `Mesh` changes) and
//! answers 200 with an AdmissionReview, or 400 when the body is not one.
//!
//! Shutdown: `/readyz` turns 503 first, new connections stop being accepted,
//! and open ones get `drain_timeout` to finish their requests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::admission;
use crate::config::InjectConfig;
use crate::metrics::Metrics;
use crate::tls::{self, CertResolver, TlsError};

/// Knobs of the server; every field has a safe default.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Directory of the mounted serving Secret (`tls.crt`, `tls.key`).
    pub tls_dir: PathBuf,
    /// Largest accepted `/inject` body.
    pub max_body_bytes: usize,
    /// Time allowed to receive a whole `/inject` body.
    pub body_timeout: Duration,
    /// Time allowed for the TLS handshake and the request headers.
    pub handshake_timeout: Duration,
    /// Time open connections get to finish after shutdown starts.
    pub drain_timeout: Duration,
    /// Fallback re-read of the certificate when no change event arrives.
    pub cert_poll_interval: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            tls_dir: PathBuf::from("/var/run/weft-injector/tls"),
            max_body_bytes: 4 * 1024 * 1024,
            body_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(15),
            cert_poll_interval: Duration::from_secs(300),
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The serving certificate could not be loaded or watched.
    #[error("serving certificate: {0}")]
    Tls(#[from] TlsError),
    /// The listener failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Shared by every request.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Current injection defaults.
    pub config: Arc<ArcSwap<InjectConfig>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// `/readyz` answer.
    pub ready: Arc<AtomicBool>,
    /// Largest `/inject` body.
    pub max_body_bytes: usize,
    /// Time to receive an `/inject` body.
    pub body_timeout: Duration,
}

/// The routes.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/inject", post(inject))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(s): State<AppState>) -> Response {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

fn plain(status: StatusCode, msg: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        msg,
    )
        .into_response()
}

async fn inject(State(s): State<AppState>, req: Request) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > s.max_body_bytes as u64) {
        s.metrics.admission_invalid();
        return plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("AdmissionReview larger than {} bytes\n", s.max_body_bytes),
        );
    }
    let body = Limited::new(req.into_body(), s.max_body_bytes);
    let body = match tokio::time::timeout(s.body_timeout, body.collect()).await {
        Err(_) => {
            s.metrics.admission_invalid();
            return plain(
                StatusCode::REQUEST_TIMEOUT,
                "AdmissionReview body not received in time\n".into(),
            );
        }
        Ok(Err(e)) => {
            s.metrics.admission_invalid();
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("AdmissionReview larger than {} bytes\n", s.max_body_bytes),
                );
            }
            return plain(StatusCode::BAD_REQUEST, format!("reading body: {e}\n"));
        }
        Ok(Ok(b)) => b.to_bytes(),
    };
    let started = Instant::now();
    let cfg = s.config.load();
    match admission::review(&body, &cfg) {
        Ok(reviewed) => {
            let json = reviewed.to_json();
            let result = reviewed.verdict.result_label();
            s.metrics.admission(result, started.elapsed());
            match &reviewed.verdict {
                admission::Verdict::Denied(msg) => tracing::info!(
                    uid = %reviewed.uid, namespace = %reviewed.namespace, pod = %reviewed.name,
                    reason = %msg, "pod denied"
                ),
                admission::Verdict::Skipped(why) => tracing::debug!(
                    uid = %reviewed.uid, namespace = %reviewed.namespace, pod = %reviewed.name,
                    reason = why, "pod skipped"
                ),
                admission::Verdict::Patched(_) => tracing::debug!(
                    uid = %reviewed.uid, namespace = %reviewed.namespace, pod = %reviewed.name,
                    "pod injected"
                ),
            }
            ([(header::CONTENT_TYPE, "application/json")], json).into_response()
        }
        Err(e) => {
            s.metrics.admission_invalid();
            tracing::warn!(error = %e, "bad AdmissionReview");
            plain(StatusCode::BAD_REQUEST, format!("{e}\n"))
        }
    }
}

/// A running server.
#[derive(Debug)]
pub struct Running {
    /// Where it listens.
    pub local_addr: SocketAddr,
    /// The served certificate.
    pub certs: Arc<CertResolver>,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Marks the server unready (endpoints drop it) without stopping it.
    pub fn set_unready(&self) {
        self.ready.store(false, Ordering::Relaxed);
    }

    /// Stops accepting, drains open connections, and returns when done.
    pub async fn shutdown(self) {
        self.set_unready();
        self.shutdown.cancel();
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "server task failed");
        }
    }
}

/// Loads the certificate, starts watching it, and serves on `listener`.
pub async fn start(
    opts: ServerOptions,
    listener: TcpListener,
    config: Arc<ArcSwap<InjectConfig>>,
    metrics: Arc<Metrics>,
) -> Result<Running, ServerError> {
    let certs = CertResolver::new(tls::load(&opts.tls_dir)?);
    let shutdown = CancellationToken::new();
    // Set up the watch before serving so a rotation right after start is seen.
    let watch = tls::spawn_watch(
        opts.tls_dir.clone(),
        certs.clone(),
        metrics.clone(),
        opts.cert_poll_interval,
        shutdown.clone(),
    )?;
    let ready = Arc::new(AtomicBool::new(true));
    let state = AppState {
        config,
        metrics: metrics.clone(),
        ready: ready.clone(),
        max_body_bytes: opts.max_body_bytes,
        body_timeout: opts.body_timeout,
    };
    let acceptor = TlsAcceptor::from(tls::server_config(certs.clone()));
    let local_addr = listener.local_addr()?;
    let task = tokio::spawn(accept_loop(
        listener,
        acceptor,
        app(state),
        opts,
        shutdown.clone(),
        watch,
    ));
    Ok(Running {
        local_addr,
        certs,
        metrics,
        ready,
        shutdown,
        task,
    })
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: Router,
    opts: ServerOptions,
    shutdown: CancellationToken,
    watch: tokio::task::JoinHandle<()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.handshake_timeout);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let handshake_timeout = opts.handshake_timeout;
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let conn = builder
                .serve_connection(TokioIo::new(tls), service)
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(opts.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached; closing remaining connections");
    }
    if let Err(e) = watch.await {
        tracing::error!(error = %e, "certificate watch task failed");
    }
}
