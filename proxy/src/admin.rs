//! The admin listener (:15020, never captured): health for the kubelet,
//! metrics for Prometheus, the active snapshot for operators, and the app's
//! rewritten probes.
//!
//! | path | answer |
//! |---|---|
//! | `GET /live` | 200 while the process serves |
//! | `GET /ready` | 200 once config + identity are loaded and listeners bound, 503 otherwise and while draining |
//! | `GET /metrics` | Prometheus text |
//! | `GET /config` | the active `proxy.json` |
//! | `GET /certs` | identity, validity, trust anchors |
//! | `POST /shutdown` | starts a graceful shutdown |
//! | `GET /app-health/<container>/<kind>` | runs the app's original probe |

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::net::TcpListener;

use crate::http::{Body, full};
use crate::proxy::State;

/// Serves the admin API until shutdown completes.
pub async fn serve(state: Arc<State>, listener: TcpListener) {
    loop {
        let (conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let st = state.clone();
        tokio::spawn(async move {
            let svc_state = st.clone();
            let svc = service_fn(move |req| {
                let st = svc_state.clone();
                async move { Ok::<_, Infallible>(route(&st, req).await) }
            });
            // Not tied to shutdown: /ready must keep answering 503 while draining.
            let io = hyper_util::rt::TokioIo::new(conn);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!(error = %e, "admin connection ended with error");
            }
        });
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

async fn route(state: &State, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
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
