//! The backend step of an outbound HTTP request: resolve the routed
//! backend to a destination, apply the Service's circuit breaker
//! (`connectionPool.maxRequests`) and retry budget, then the route's retry
//! policy (per-try timeout, backoff) and mirroring. Requests sent more than
//! once are held whole, up to [`MAX_REPLAY_BODY`].
//!
//! In: a routed request from [`super`]. Out: each attempt to
//! [`super::endpoint::forward`].

use std::sync::Arc;

use http::header::HeaderValue;
use http::{HeaderMap, Method, Request, Response, StatusCode};

use super::endpoint::{Ctx, forward};
use crate::accesslog::Sent;
use crate::http::{Body, ERROR_NAME, ReqBody, bad_request, error_response};
use crate::metrics::Direction;
use crate::snapshot::dest::{Dest, resolve};
use crate::snapshot::routes;
use crate::snapshot::{ServiceRef, Snapshot};
use crate::trace::context::sample;

/// Largest request body kept in memory so a request can be sent more than
/// once (retries, mirroring). Larger bodies, bodies of unknown length and
/// upgrades are sent once and not mirrored.
const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// A request held whole, to be sent more than once.
struct Copyable {
    method: Method,
    uri: http::Uri,
    version: http::Version,
    headers: HeaderMap,
    body: bytes::Bytes,
}

/// What [`Copyable::read`] made of a request.
enum Held {
    Whole(Copyable),
    /// Not to be copied: sent once as it is.
    Once(Request<ReqBody>),
    /// The client's body failed while being read.
    Failed(Response<Body>),
}

impl Copyable {
    async fn read(parts: http::request::Parts, body: ReqBody) -> Held {
        use http_body::Body as _;
        use http_body_util::BodyExt as _;
        let upgrade =
            parts.method == Method::CONNECT || parts.headers.contains_key(http::header::UPGRADE);
        let small = body.is_end_stream()
            || body
                .size_hint()
                .upper()
                .is_some_and(|n| n <= MAX_REPLAY_BODY);
        if upgrade || !small {
            return Held::Once(Request::from_parts(parts, body));
        }
        match body.collect().await {
            Ok(c) => Held::Whole(Copyable {
                method: parts.method,
                uri: parts.uri,
                version: parts.version,
                headers: parts.headers,
                body: c.to_bytes(),
            }),
            Err(e) => Held::Failed(bad_request(&format!(
                "reading the request body: {e}; the request was not sent"
            ))),
        }
    }

    fn request(&self) -> Request<http_body_util::Full<bytes::Bytes>> {
        let mut r = Request::new(http_body_util::Full::new(self.body.clone()));
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        r
    }
}

/// Sends the request to the routed backend with the route's retry policy,
/// and a copy to its mirror when this request is mirrored.
pub(super) async fn send(
    ctx: &Ctx,
    snap: &Arc<Snapshot>,
    target: ServiceRef,
    backend: Option<routes::Backend>,
    route: Option<&routes::HttpRoute>,
    req: Request<ReqBody>,
    sent: &mut Sent,
) -> Response<Body> {
    let dest = match resolve(&snap.config, &snap.routes, target, backend, ctx.dst) {
        Ok(d) => d,
        Err(e) => {
            ctx.state
                .metrics
                .error(Direction::Outbound, "route-backend");
            tracing::error!(error = %e, "route backend cannot be resolved");
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "route-backend",
                &e.to_string(),
            );
        }
    };
    // Circuit breaker: a request over connectionPool.maxRequests is not sent.
    let slot = match dest
        .service
        .policy
        .connection_pool
        .as_ref()
        .and_then(|p| p.max_requests)
    {
        Some(max) => match ctx.state.breakers.try_acquire(dest.key, max as usize) {
            Some(slot) => Some(slot),
            None => {
                ctx.state.metrics.error(Direction::Outbound, "overflow");
                return error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overflow",
                    &format!(
                        "{} already has {max} requests in flight, its connectionPool.maxRequests; this one was not sent",
                        dest.service.key()
                    ),
                );
            }
        },
        None => None,
    };
    if let Some(b) = dest.service.policy.retry_budget.as_ref() {
        ctx.state
            .retry_budgets
            .request(dest.key, b, tokio::time::Instant::now());
    }
    let copies = Copies {
        retry: route.and_then(|r| r.retry.as_ref().map(|p| (r, p))),
        mirror: route.and_then(|r| {
            r.mirror
                .filter(|(_, pct)| sample(*pct))
                .map(|(b, _)| (r, b))
        }),
    };
    let resp = if copies.retry.is_none() && copies.mirror.is_none() {
        forward(ctx, snap, &dest, req, sent).await
    } else {
        // Boxed: retries and mirroring hold the request whole, and the
        // request sent once does not carry their room (nor a layer more).
        Box::pin(send_to(ctx, snap, target, &dest, copies, req, sent)).await
    };
    match slot {
        // In flight until the response body is done with.
        Some(slot) => resp.map(|b| {
            crate::http::boxed(http_body_util::BodyExt::map_frame(b, move |f| {
                let _held = &slot;
                f
            }))
        }),
        None => resp,
    }
}

/// What sends a request more than once: the route's retry policy, and
/// its mirror when this request was sampled for it.
#[derive(Clone, Copy)]
struct Copies<'a> {
    retry: Option<(&'a routes::HttpRoute, &'a weft_proxy_config::RetryPolicy)>,
    mirror: Option<(&'a routes::HttpRoute, routes::Backend)>,
}

/// [`send`] once the destination is known, for a request retried or
/// mirrored.
async fn send_to(
    ctx: &Ctx,
    snap: &Arc<Snapshot>,
    target: ServiceRef,
    dest: &Dest<'_>,
    copies: Copies<'_>,
    req: Request<ReqBody>,
    sent: &mut Sent,
) -> Response<Body> {
    let Copies { retry, mirror } = copies;
    let (parts, body) = req.into_parts();
    let copy = match Copyable::read(parts, body).await {
        Held::Whole(c) => c,
        Held::Once(req) => return forward(ctx, snap, dest, req, sent).await,
        Held::Failed(resp) => {
            ctx.state.metrics.error(Direction::Outbound, "bad-request");
            return resp;
        }
    };
    if let Some((r, b)) = mirror {
        mirror_copy(ctx, snap, target, r, b, &copy);
    }
    let Some((r, policy)) = retry else {
        return forward(ctx, snap, dest, copy.request(), sent).await;
    };
    let mut retries = 0u32;
    loop {
        let attempt = forward(ctx, snap, dest, copy.request(), sent);
        let resp = match policy.per_try_timeout_ms.filter(|ms| *ms > 0) {
            Some(ms) => {
                match tokio::time::timeout(std::time::Duration::from_millis(ms), attempt).await {
                    Ok(resp) => resp,
                    Err(_) => {
                        ctx.state.metrics.route_event(&r.name, "per-try-timeout");
                        error_response(
                            StatusCode::GATEWAY_TIMEOUT,
                            "per-try-timeout",
                            &format!(
                                "no response within {ms} ms, the per-try timeout of route {}",
                                r.name
                            ),
                        )
                    }
                }
            }
            None => attempt.await,
        };
        if retries >= policy.attempts || !retriable(policy, &resp) {
            sent.retries = retries;
            return resp;
        }
        if let Some(b) = dest.service.policy.retry_budget.as_ref()
            && !ctx
                .state
                .retry_budgets
                .try_retry(dest.key, b, tokio::time::Instant::now())
        {
            ctx.state
                .metrics
                .route_event(&r.name, "retry-budget-exhausted");
            sent.retries = retries;
            return resp;
        }
        retries += 1;
        ctx.state.metrics.route_event(&r.name, "retry");
        let wait = backoff(policy, retries);
        tracing::debug!(route = %r.name, status = resp.status().as_u16(), retry = retries, ?wait, "retrying");
        drop(resp);
        tokio::time::sleep(wait).await;
    }
}

/// Whether the retry policy covers this response. gRPC statuses are read
/// from trailers-only responses (a `grpc-status` header).
fn retriable(policy: &weft_proxy_config::RetryPolicy, resp: &Response<Body>) -> bool {
    use weft_proxy_config::RetryOn;
    let status = resp.status().as_u16();
    let step = resp.headers().get(ERROR_NAME).and_then(|v| v.to_str().ok());
    let grpc = crate::metrics::traffic::grpc_status(resp.headers());
    policy.retry_on.iter().any(|on| match on {
        RetryOn::ServerError => status >= 500,
        RetryOn::GatewayError => matches!(status, 502..=504),
        RetryOn::Reset | RetryOn::RefusedStream => step == Some("upstream"),
        RetryOn::ConnectFailure => matches!(step, Some("connect" | "connect-timeout")),
        RetryOn::Retriable4xx => status == 409,
        RetryOn::RetriableStatusCodes => policy.retriable_status_codes.contains(&status),
        RetryOn::Cancelled => grpc == Some(1),
        RetryOn::DeadlineExceeded => grpc == Some(4),
        RetryOn::ResourceExhausted => grpc == Some(8),
        RetryOn::Unavailable => grpc == Some(14),
    })
}

/// Fully jittered exponential backoff before retry `n` (1-based).
fn backoff(policy: &weft_proxy_config::RetryPolicy, n: u32) -> std::time::Duration {
    let cap = policy
        .backoff_base_ms
        .saturating_mul(1u64 << (n - 1).min(20))
        .min(policy.backoff_max_ms.max(policy.backoff_base_ms));
    std::time::Duration::from_millis(if cap == 0 {
        0
    } else {
        rand::random_range(0..=cap)
    })
}

/// Sends a copy of the request to the route's mirror backend in the
/// background; its answer is dropped. The copy's Host (authority) gets a
/// `-shadow` suffix, so the mirror's logs tell copies from real traffic.
fn mirror_copy(
    ctx: &Ctx,
    snap: &Arc<Snapshot>,
    target: ServiceRef,
    route: &routes::HttpRoute,
    backend: routes::Backend,
    copy: &Copyable,
) {
    let mut req = copy.request();
    shadow_authority(&mut req);
    let ctx = ctx.clone();
    let snap = Arc::clone(snap);
    let name = route.name.clone();
    ctx.state.metrics.route_event(&name, "mirror");
    tokio::spawn(async move {
        let dest = match resolve(&snap.config, &snap.routes, target, Some(backend), ctx.dst) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(route = %name, error = %e, "mirror backend cannot be resolved");
                return;
            }
        };
        let resp = forward(&ctx, &snap, &dest, req, &mut Sent::default()).await;
        if let Some(step) = resp.headers().get(ERROR_NAME) {
            tracing::debug!(route = %name, status = resp.status().as_u16(), ?step, "mirrored request failed");
        }
        // Read the answer out, so the pooled connection stays usable.
        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
    });
}

/// Appends `-shadow` to the host of the request's authority (Host header
/// for HTTP/1, the URI for absolute-form and HTTP/2 requests).
fn shadow_authority<B>(req: &mut Request<B>) {
    fn shadow(authority: &str) -> String {
        match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
                if port.chars().all(|c| c.is_ascii_digit()) && !host.is_empty() {
                    format!("{host}-shadow:{port}")
                } else {
                    format!("{authority}-shadow")
                }
            }
            _ => format!("{authority}-shadow"),
        }
    }
    if let Some(a) = req.uri().authority().map(|a| shadow(a.as_str())) {
        let mut parts = req.uri().clone().into_parts();
        if let Ok(auth) = a.parse() {
            parts.authority = Some(auth);
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }
    if let Some(h) = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(shadow)
        && let Ok(v) = HeaderValue::from_str(&h)
    {
        req.headers_mut().insert(http::header::HOST, v);
    }
}
