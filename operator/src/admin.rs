//! The operator's admin HTTP server: `/metrics` (Prometheus text),
//! `/healthz` (the process is alive and its loops run) and `/readyz` (the
//! operator has started: it either leads and runs the reconcilers or
//! stands by, ready to take over).
//!
//! [`app`] builds the router; tests drive it with `oneshot`, no socket.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;

/// What the admin endpoints report.
#[derive(Clone, Debug)]
pub struct AdminState {
    /// The metrics served on `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Set once the operator has started (API client and leader election).
    pub ready: Arc<AtomicBool>,
    /// Cleared when a loop the operator depends on has stopped.
    pub healthy: Arc<AtomicBool>,
}

impl AdminState {
    /// A state that is healthy but not ready yet.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            ready: Arc::new(AtomicBool::new(false)),
            healthy: Arc::new(AtomicBool::new(true)),
        }
    }
}

/// The admin router.
pub fn app(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

fn flag(ok: bool, what: &'static str) -> (StatusCode, &'static str) {
    if ok {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, what)
    }
}

async fn healthz(State(s): State<AdminState>) -> impl IntoResponse {
    flag(
        s.healthy.load(Ordering::Acquire),
        "a reconciler or leader election loop stopped\n",
    )
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    flag(s.ready.load(Ordering::Acquire), "starting\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    async fn get(app: Router, path: &str) -> (StatusCode, String) {
        let resp = app
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn endpoints_report_state() {
        let state = AdminState::new(Arc::new(Metrics::new()));
        state.metrics.certificates_issued.inc();
        let (code, body) = get(app(state.clone()), "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        assert!(body.contains("weft_certificates_issued_total 1"), "{body}");
        assert_eq!(
            get(app(state.clone()), "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        state.ready.store(true, Ordering::Release);
        assert_eq!(get(app(state.clone()), "/readyz").await.0, StatusCode::OK);
        assert_eq!(get(app(state.clone()), "/healthz").await.0, StatusCode::OK);
        state.healthy.store(false, Ordering::Release);
        assert_eq!(
            get(app(state.clone()), "/healthz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(get(app(state), "/nope").await.0, StatusCode::NOT_FOUND);
    }
}
