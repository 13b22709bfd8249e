//! The admin listener (:15020, never captured): health for the kubelet,
//! metrics for Prometheus, the active snapshot for operators, and the app's
//! rewritten probes.
//!
//! | path | answer | served to |
//! |---|---|---|
//! | `GET /live` | 200 while the process serves | anyone |
//! | `GET /ready` | 200 once config + identity are loaded and listeners bound, 503 otherwise and while draining | anyone |
//! | `GET /metrics` | Prometheus text | anyone |
//! | `GET /app-health/<container>/<kind>` | runs the app's original probe | anyone |
//! | `GET /config` | the active `proxy.json` | loopback |
//! | `GET /certs` | identity, validity, trust anchors | loopback |
//! | `POST /shutdown` | starts a graceful shutdown | loopback |
//!
//! The port is exempt from capture and mTLS, so any pod of the cluster can
//! reach it. Only what the kubelet and Prometheus call is served to them;
//! everything else ([`Audience::Pod`]) answers 403 unless the peer is a
//! loopback address. The trust boundary is the pod: its containers share
//! one network namespace, so a loopback peer is the app or the proxy's own
//! tooling, and the inbound proxy never relays to this port (it refuses
//! connections addressed to its own listeners).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use crate::http::{Body, full};
use crate::metrics::Direction;
use crate::state::State;

/// Who an admin request is served to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audience {
    /// Anyone who reaches the port: what the kubelet (probes) and
    /// Prometheus (scrapes) call from outside the pod.
    Anyone,
    /// Loopback peers only: the pod's own processes.
    Pod,
}

/// The audience of a request: the probes and metrics are public, every
/// other method and path (the snapshot, the certificates, shutdown, and
/// paths that do not exist) is for the pod only.
pub fn audience(method: &Method, path: &str) -> Audience {
    let public =
        matches!(path, "/live" | "/ready" | "/metrics") || path.starts_with("/app-health/");
    if method == Method::GET && public {
        Audience::Anyone
    } else {
        Audience::Pod
    }
}

/// Whether `peer` is inside the pod: a loopback address (`127.0.0.0/8`,
/// `::1`, or `::ffff:127.x.y.z`, as the dual-stack `[::]` listener reports
/// IPv4 loopback peers).
pub fn in_pod(peer: IpAddr) -> bool {
    peer.to_canonical().is_loopback()
}

/// Whether the admin API serves `method path` to `peer`.
pub fn allowed(method: &Method, path: &str, peer: IpAddr) -> bool {
    audience(method, path) == Audience::Anyone || in_pod(peer)
}

/// Serves the admin API until shutdown completes.
pub async fn serve(state: Arc<State>, listener: TcpListener) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        tokio::spawn(serve_connection(state.clone(), conn, peer));
    }
}

/// Serves one admin connection from `peer` (HTTP/1.1). The peer address
/// decides what it may call ([`allowed`]).
pub async fn serve_connection<I>(state: Arc<State>, io: I, peer: SocketAddr)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let st = state.clone();
        async move { Ok::<_, Infallible>(route(&st, peer.ip(), req).await) }
    });
    // Not tied to shutdown: /ready must keep answering 503 while draining.
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
        .await
    {
        tracing::debug!(%peer, error = %e, "admin connection ended with error");
    }
}

fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r
}

fn json(value: &impl serde::Serialize) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(b) => {
            let mut r = text(StatusCode::OK, b);
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn route(state: &State, peer: IpAddr, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    if !allowed(req.method(), &path, peer) {
        // Counted, logged at debug only: anyone in the cluster can send these.
        state.metrics.error(Direction::Inbound, "admin-forbidden");
        tracing::debug!(%peer, method = %req.method(), path, "admin request from outside the pod refused");
        return text(
            StatusCode::FORBIDDEN,
            format!(
                "{} {path}: the weft admin API serves this to loopback clients in the pod only; \
                 from outside the pod only GET /live, /ready, /metrics and /app-health/... are served\n",
                req.method()
            ),
        );
    }
    match (req.method(), path.as_str()) {
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => {
            if state.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else if state.snapshot.load().is_none() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: no valid config/identity loaded yet (see the proxy log)\n",
                )
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: starting or draining\n",
                )
            }
        }
        (&Method::GET, "/metrics") => {
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, &state.metrics.registry()) {
                Ok(()) => {
                    let mut r = text(StatusCode::OK, out);
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    r
                }
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        (&Method::GET, "/config") => match state.snapshot.load_full() {
            Some(s) => json(&s.config),
            None => text(StatusCode::SERVICE_UNAVAILABLE, "no config loaded\n"),
        },
        (&Method::GET, "/certs") => match state.snapshot.load_full() {
            Some(s) => json(&s.identity.describe()),
            None => text(StatusCode::SERVICE_UNAVAILABLE, "no identity loaded\n"),
        },
        (&Method::POST, "/shutdown") => {
            tracing::info!("shutdown requested on the admin API");
            state.begin_shutdown();
            text(StatusCode::OK, "shutting down\n")
        }
        (&Method::GET, p) if p.starts_with("/app-health/") => {
            let mut parts = p["/app-health/".len()..].splitn(2, '/');
            let (Some(container), Some(kind)) = (parts.next(), parts.next()) else {
                return text(
                    StatusCode::NOT_FOUND,
                    "use /app-health/<container>/<livez|readyz|startupz>\n",
                );
            };
            let Some(probe) = state.settings.app_probes.get(container, kind) else {
                return text(
                    StatusCode::NOT_FOUND,
                    format!(
                        "no {kind} probe recorded for container {container:?} (WEFT_APP_PROBES)\n"
                    ),
                );
            };
            match crate::probes::run(probe, state.settings.app_host).await {
                Ok(()) => text(StatusCode::OK, "ok\n"),
                Err(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{container} {kind}: {why}\n"),
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn loopback_peers_are_in_the_pod() {
        for peer in [
            "127.0.0.1",
            "127.4.5.6",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:127.9.8.7",
        ] {
            assert!(in_pod(ip(peer)), "{peer}");
        }
        for peer in [
            "10.244.0.7",
            "::ffff:10.244.0.7",
            "fd00::7",
            "0.0.0.0",
            "::",
            "::ffff:0.0.0.0",
            // IPv4-compatible (deprecated) is not IPv4-mapped.
            "::127.0.0.1",
        ] {
            assert!(!in_pod(ip(peer)), "{peer}");
        }
    }

    #[test]
    fn probes_and_metrics_are_public_the_rest_is_for_the_pod() {
        let remote = IpAddr::V6(Ipv4Addr::new(10, 244, 0, 7).to_ipv6_mapped());
        for path in [
            "/live",
            "/ready",
            "/metrics",
            "/app-health/app/livez",
            "/app-health/x",
        ] {
            assert_eq!(audience(&Method::GET, path), Audience::Anyone, "{path}");
            assert!(allowed(&Method::GET, path, remote), "{path}");
        }
        for (method, path) in [
            (Method::GET, "/config"),
            (Method::GET, "/certs"),
            (Method::POST, "/shutdown"),
            (Method::GET, "/shutdown"),
            (Method::POST, "/ready"),
            (Method::GET, "/"),
            (Method::GET, "/app-health"),
            (Method::GET, "/live/../config"),
            (Method::GET, "/nope"),
        ] {
            assert_eq!(audience(&method, path), Audience::Pod, "{method} {path}");
            assert!(!allowed(&method, path, remote), "{method} {path}");
            for peer in [
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
                IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()),
            ] {
                assert!(allowed(&method, path, peer), "{method} {path} from {peer}");
            }
        }
    }
}
