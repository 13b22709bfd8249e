//! Outbound HTTP: each request of a client connection is routed on its own
//! (the Service's first matching `httpRoutes` rule: redirect, rewrite,
//! header edits, a backend chosen by weight), balanced over that backend's
//! endpoints, and sent over a pooled connection (mTLS + ALPN to meshed
//! endpoints).
//!
//! Failing over to another endpoint:
//! - a connect failure (refused, unreachable, timed out) moves on before
//!   anything was sent, and ejects the endpoint for a while
//!   ([`super::Outliers`]);
//! - a pooled connection found closed before the request left is replaced
//!   by a fresh one to the same endpoint;
//! - for requests without a body, which can be sent again as they are: the
//!   peer proxy's answer that it could not reach its app (`x-weft-error:
//!   connect`/`connect-timeout` from a meshed endpoint: the request never
//!   reached an app) and, for idempotent methods, a peer answer that its
//!   app failed the request (`x-weft-error: app`) or a connection lost before
//!   any response, move on to another endpoint. A pod being deleted goes
//!   through exactly these states (app gone, then proxy gone, then the
//!   address gone), long before kubelet delivers a config without it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{HeaderValue, LOCATION};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::io::{AsyncRead, AsyncWrite};
use weft_proxy_config::{HashKey, LoadBalancer};

use crate::connect::{ConnectError, Gate, acquire};
use crate::http::forward::{finish, prepare};
use crate::http::pool::{ConnPolicy, PoolKey, SendFailed, Version};
use crate::http::{
    Body, ERROR_HEADER, bad_request, client_body_error, error_response, full, serve_connection,
};
use crate::metrics::Direction;
use crate::proxy::State;
use crate::snapshot::{ServiceRef, Snapshot, endpoint_port};
use crate::tls::SpiffeId;

use super::route::{self, Dest};

#[derive(Clone)]
struct Ctx {
    state: Arc<State>,
    /// The snapshot the connection started with; each request routes with
    /// the current one (see [`current`]).
    snap: Arc<Snapshot>,
    target: ServiceRef,
    dst: SocketAddr,
    client: SocketAddr,
    version: Version,
}

/// Serves HTTP on a captured client connection.
pub async fn serve<I>(
    state: Arc<State>,
    snap: Arc<Snapshot>,
    target: ServiceRef,
    dst: SocketAddr,
    client: SocketAddr,
    version: Version,
    io: I,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ctx = Arc::new(Ctx {
        state: state.clone(),
        snap,
        target,
        dst,
        client,
        version,
    });
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move {
            let resp = proxy(&ctx, req).await;
            ctx.state
                .metrics
                .request(Direction::Outbound, resp.status().as_u16());
            Ok::<_, Infallible>(resp)
        }
    });
    serve_connection(
        &state,
        io,
        version,
        Direction::Outbound,
        svc,
        std::future::pending(),
    )
    .await;
}

fn hash_key(lb: &LoadBalancer, headers: &HeaderMap, client: SocketAddr) -> Option<String> {
    match lb {
        LoadBalancer::ConsistentHash(HashKey::Header(h)) => headers
            .get(h.as_str())
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        LoadBalancer::ConsistentHash(HashKey::Cookie(c)) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| k == c)
            .map(|(_, v)| v.to_owned()),
        LoadBalancer::ConsistentHash(HashKey::SourceIp) => Some(client.ip().to_string()),
        _ => None,
    }
}

/// The snapshot and Service port a request routes with: the active
/// snapshot, so a reload applies to open keep-alive connections at their
/// next request; the connection's own when the active one no longer knows
/// the destination.
fn current(ctx: &Ctx) -> (Arc<Snapshot>, ServiceRef) {
    let active = ctx.state.snapshot.load();
    match active.as_ref() {
        Some(cur) if !Arc::ptr_eq(cur, &ctx.snap) => match cur.lookup(ctx.dst) {
            Some(target) => (cur.clone(), target),
            None => (ctx.snap.clone(), ctx.target),
        },
        _ => (ctx.snap.clone(), ctx.target),
    }
}

async fn proxy(ctx: &Ctx, req: Request<Incoming>) -> Response<Body> {
    let (snap, target) = current(ctx);
    let (_, routed_port) = snap.service(target);
    let selected = snap.routes.http(
        target,
        routed_port.port,
        req.method(),
        req.uri(),
        req.headers(),
    );
    let (mut parts, body) = req.into_parts();
    let mut backend = None;
    if let Some(sel) = selected {
        if let Some(r) = &sel.route.redirect {
            return redirect(ctx, sel.route, r, &parts.uri, &parts.headers);
        }
        sel.route
            .rewrite(sel.prefix, &mut parts.uri, &mut parts.headers);
        sel.route.request_headers.apply(&mut parts.headers);
        backend = sel.route.backends.pick(&mut rand::rng());
    }
    let route = selected.map(|s| s.route);
    let mut resp = match route.and_then(|r| r.fault.as_ref().map(|f| (r, f))) {
        Some((r, fault)) => match inject(ctx, r, fault).await {
            Some(abort) => abort,
            None => send_in_time(ctx, &snap, target, backend, route, parts, body).await,
        },
        None => send_in_time(ctx, &snap, target, backend, route, parts, body).await,
    };
    if let Some(sel) = selected {
        sel.route.response_headers.apply(resp.headers_mut());
    }
    resp
}

/// Whether an event of probability `percent` (0–100) happens this time.
fn chance(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && rand::random::<f64>() * 100.0 < percent)
}

/// Fault injection, decided per request: a delay first (outside the route
/// timeout: the fault happens before the request is routed), then an
/// abort, whose response is returned.
async fn inject(
    ctx: &Ctx,
    route: &route::HttpRoute,
    fault: &weft_proxy_config::Fault,
) -> Option<Response<Body>> {
    if let Some(d) = fault.delay.as_ref().filter(|d| chance(d.percent)) {
        ctx.state.metrics.route_event(&route.name, "fault-delay");
        tokio::time::sleep(std::time::Duration::from_millis(d.delay_ms)).await;
    }
    let a = fault.abort.as_ref().filter(|a| chance(a.percent))?;
    ctx.state.metrics.route_event(&route.name, "fault-abort");
    Some(error_response(
        StatusCode::from_u16(a.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        "fault",
        &format!("fault injected by route {}", route.name),
    ))
}

/// [`send`] under the route's timeout, which covers every attempt until
/// the response headers arrive (the body streams on after).
async fn send_in_time(
    ctx: &Ctx,
    snap: &Arc<Snapshot>,
    target: ServiceRef,
    backend: Option<route::Backend>,
    route: Option<&route::HttpRoute>,
    parts: http::request::Parts,
    body: Incoming,
) -> Response<Body> {
    let req = Request::from_parts(parts, body);
    let work = send(ctx, snap, target, backend, route, req);
    let Some((r, limit)) = route.and_then(|r| r.timeout.map(|t| (r, t))) else {
        return work.await;
    };
    match tokio::time::timeout(limit, work).await {
        Ok(resp) => resp,
        Err(_) => {
            ctx.state.metrics.error(Direction::Outbound, "timeout");
            ctx.state.metrics.route_event(&r.name, "timeout");
            error_response(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                &format!(
                    "no response within {} ms, the timeout of route {}; raise its timeoutMs or look at the backend",
                    limit.as_millis(),
                    r.name
                ),
            )
        }
    }
}

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
    Once(Request<Incoming>),
    /// The client's body failed while being read.
    Failed(Response<Body>),
}

impl Copyable {
    async fn read(parts: http::request::Parts, body: Incoming) -> Held {
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
async fn send(
    ctx: &Ctx,
    snap: &Arc<Snapshot>,
    target: ServiceRef,
    backend: Option<route::Backend>,
    route: Option<&route::HttpRoute>,
    req: Request<Incoming>,
) -> Response<Body> {
    let dest = match route::resolve(&snap.config, &snap.routes, target, backend, ctx.dst) {
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
        Some(max) => match ctx
            .state
            .breakers
            .try_acquire(&dest.service.key(), max as usize)
        {
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
            .request(&dest.service.key(), b, tokio::time::Instant::now());
    }
    let resp = send_to(ctx, snap, target, &dest, route, req).await;
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

/// [`send`] once the destination is known: retries and mirroring.
async fn send_to(
    ctx: &Ctx,
    snap: &Arc<Snapshot>,
    target: ServiceRef,
    dest: &Dest<'_>,
    route: Option<&route::HttpRoute>,
    req: Request<Incoming>,
) -> Response<Body> {
    let retry = route.and_then(|r| r.retry.as_ref().map(|p| (r, p)));
    let mirror = route.and_then(|r| {
        r.mirror
            .filter(|(_, pct)| chance(*pct))
            .map(|(b, _)| (r, b))
    });
    if retry.is_none() && mirror.is_none() {
        return forward(ctx, snap, dest, req).await;
    }
    let (parts, body) = req.into_parts();
    let copy = match Copyable::read(parts, body).await {
        Held::Whole(c) => c,
        Held::Once(req) => return forward(ctx, snap, dest, req).await,
        Held::Failed(resp) => {
            ctx.state.metrics.error(Direction::Outbound, "bad-request");
            return resp;
        }
    };
    if let Some((r, b)) = mirror {
        mirror_copy(ctx, snap, target, r, b, &copy);
    }
    let Some((r, policy)) = retry else {
        return forward(ctx, snap, dest, copy.request()).await;
    };
    let mut retries = 0u32;
    loop {
        let attempt = forward(ctx, snap, dest, copy.request());
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
            return resp;
        }
        if let Some(b) = dest.service.policy.retry_budget.as_ref()
            && !ctx.state.retry_budgets.try_retry(
                &dest.service.key(),
                b,
                tokio::time::Instant::now(),
            )
        {
            ctx.state
                .metrics
                .route_event(&r.name, "retry-budget-exhausted");
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
    let step = resp
        .headers()
        .get(ERROR_HEADER)
        .and_then(|v| v.to_str().ok());
    let grpc = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
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
    route: &route::HttpRoute,
    backend: route::Backend,
    copy: &Copyable,
) {
    let mut req = copy.request();
    shadow_authority(&mut req);
    let ctx = ctx.clone();
    let snap = Arc::clone(snap);
    let name = route.name.clone();
    ctx.state.metrics.route_event(&name, "mirror");
    tokio::spawn(async move {
        let dest = match route::resolve(&snap.config, &snap.routes, target, Some(backend), ctx.dst)
        {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(route = %name, error = %e, "mirror backend cannot be resolved");
                return;
            }
        };
        let resp = forward(&ctx, &snap, &dest, req).await;
        if let Some(step) = resp.headers().get(ERROR_HEADER) {
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

fn redirect(
    ctx: &Ctx,
    route: &route::HttpRoute,
    r: &weft_proxy_config::Redirect,
    uri: &http::Uri,
    headers: &HeaderMap,
) -> Response<Body> {
    let location = route::redirect_location(r, uri, headers);
    let mut resp = Response::new(full(""));
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND);
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            resp.headers_mut().insert(LOCATION, v);
        }
        Err(_) => {
            ctx.state.metrics.error(Direction::Outbound, "redirect");
            return error_response(
                StatusCode::BAD_GATEWAY,
                "redirect",
                &format!(
                    "route {} builds an invalid Location {location:?}",
                    route.name
                ),
            );
        }
    }
    route.response_headers.apply(resp.headers_mut());
    resp
}

/// Passive health from an answer of `addr`: without outlier detection any
/// answer takes the endpoint back; with it, a 5xx extends its streak and
/// a streak at the policy's threshold ejects it for the base ejection time
/// times its ejections so far, unless that would eject more than the
/// policy's share of the destination's endpoints.
fn judge(state: &State, dest: &Dest<'_>, addr: SocketAddr, status: StatusCode) {
    let Some(od) = dest.service.policy.outlier_detection.as_ref() else {
        state.outliers.restore(addr);
        return;
    };
    let code = status.as_u16();
    if code < 500 {
        state.outliers.healthy(addr);
        return;
    }
    extend_streak(state, dest, od, addr, (502..=504).contains(&code));
}

/// A connection to `addr` could not be made (refused, unreachable, timed
/// out): under outlier detection it counts as a gateway error in the
/// endpoint's streak, as a 503 would.
fn judge_connect_failure(state: &State, dest: &Dest<'_>, addr: SocketAddr) {
    if let Some(od) = dest.service.policy.outlier_detection.as_ref() {
        extend_streak(state, dest, od, addr, true);
    }
}

/// How long the `times`-th ejection in a row lasts: the base ejection time
/// times `times` (at most 10), rounded up to whole `interval`s, since
/// ejections are reconsidered once per interval.
pub(crate) fn ejection_time(base_ms: u64, times: u32, interval_ms: u64) -> std::time::Duration {
    let raw = base_ms.saturating_mul(u64::from(times.clamp(1, 10)));
    let rounded = match interval_ms {
        0 => raw,
        i => raw.div_ceil(i).saturating_mul(i),
    };
    std::time::Duration::from_millis(rounded)
}

fn extend_streak(
    state: &State,
    dest: &Dest<'_>,
    od: &weft_proxy_config::OutlierDetection,
    addr: SocketAddr,
    gateway: bool,
) {
    let streak = state.outliers.failed(addr, gateway);
    let reached = |limit: Option<u32>, n: u32| limit.is_some_and(|k| k > 0 && n >= k);
    if !(reached(od.consecutive_5xx, streak.server_errors)
        || reached(od.consecutive_gateway_errors, streak.gateway_errors))
    {
        return;
    }
    let now = tokio::time::Instant::now();
    let total = dest.endpoints.len();
    let ejected = dest
        .endpoints
        .iter()
        .filter(|e| {
            state
                .outliers
                .is_ejected(SocketAddr::new(e.address, endpoint_port(e, dest.port)), now)
        })
        .count();
    if (ejected + 1) * 100 > od.max_ejection_percent as usize * total {
        tracing::debug!(%addr, service = %dest.service.key(), "outlier detection would eject more than maxEjectionPercent; keeping the endpoint");
        return;
    }
    state.outliers.tripped(addr);
    let how_long = ejection_time(
        od.base_ejection_ms,
        streak.ejections.saturating_add(1),
        od.interval_ms,
    );
    state.outliers.eject_for(addr, now, how_long);
    state.metrics.error(Direction::Outbound, "outlier-ejection");
    tracing::warn!(%addr, service = %dest.service.key(), server_errors = streak.server_errors, gateway_errors = streak.gateway_errors, ?how_long, "endpoint ejected by outlier detection");
}

/// A body-less request kept to be sent again to another endpoint.
struct Replay {
    method: Method,
    uri: http::Uri,
    version: http::Version,
    headers: HeaderMap,
}

impl Replay {
    fn of(req: &Request<Body>) -> Option<Self> {
        use http_body::Body as _;
        req.body().is_end_stream().then(|| Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        })
    }

    fn request(&self) -> Request<Body> {
        let mut r = Request::new(full(""));
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        r
    }

    /// RFC 9110 §9.2.2: sending it twice has the effect of sending it once.
    fn idempotent(&self) -> bool {
        matches!(
            self.method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        )
    }
}

/// The peer proxy answered that it could not connect to its app: the
/// request reached no app.
fn undelivered(resp: &Response<Incoming>) -> bool {
    resp.headers()
        .get(ERROR_HEADER)
        .is_some_and(|v| v == "connect" || v == "connect-timeout")
}

/// The peer proxy answered that its app failed the request before
/// answering it (`x-weft-error: app`: the app reset or closed the
/// connection, e.g. while its pod shuts down). The app may have seen the
/// request, so only an idempotent one is sent to another endpoint.
fn app_failed(resp: &Response<Incoming>) -> bool {
    resp.headers().get(ERROR_HEADER).is_some_and(|v| v == "app")
}

async fn forward<B>(ctx: &Ctx, snap: &Snapshot, dest: &Dest<'_>, req: Request<B>) -> Response<Body>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<crate::http::BoxError>,
{
    let state = &ctx.state;
    let key = hash_key(
        &dest.service.policy.load_balancer,
        req.headers(),
        ctx.client,
    );
    let prepared = prepare(req, ctx.version);

    // Candidates: balanced endpoints, or the fallback when the config knows
    // none (kubelet may not have delivered them yet).
    let mut candidates: Vec<(SocketAddr, Option<SpiffeId>, Option<&str>)> = Vec::new();
    if dest.endpoints.is_empty() {
        candidates.extend(dest.fallback.map(|a| (a, None, None)));
    } else {
        for i in super::attempt_order(state, dest, key.as_deref())
            .into_iter()
            .take(super::MAX_ATTEMPTS)
        {
            let ep = dest.endpoints[i];
            let addr = SocketAddr::new(ep.address, endpoint_port(ep, dest.port));
            match ep
                .identity
                .as_deref()
                .filter(|_| ep.meshed)
                .map(SpiffeId::parse)
                .transpose()
            {
                Ok(id) => candidates.push((addr, id, ep.pod.as_deref())),
                Err(e) => {
                    tracing::error!(%addr, error = %e, "endpoint identity in config is not a SPIFFE ID; skipping it")
                }
            }
        }
    }
    if candidates.is_empty() {
        state.metrics.error(Direction::Outbound, "no-endpoint");
        let what = match dest.subset {
            Some(s) => format!("subset {s:?} of service {}", dest.service.key()),
            None => format!("service {}", dest.service.key()),
        };
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "no-endpoint",
            &format!(
                "{what} has no usable endpoint; check that its pods are ready (and their labels, for a subset) and the endpoint identities in proxy.json"
            ),
        );
    }

    let conn_policy = ConnPolicy::of(dest.service.policy.connection_pool.as_ref());
    let gate = Gate::of(&state.conn_limits, dest.service);
    let upgrade = prepared.client_upgrade.is_some();
    let replay = (candidates.len() > 1 && !upgrade)
        .then(|| Replay::of(&prepared.request))
        .flatten();
    let mut client_upgrade = prepared.client_upgrade;
    let mut request = Some(prepared.request);
    let mut last: Option<Response<Body>> = None;
    let n = candidates.len();
    for (attempt, (addr, identity, pod)) in candidates.into_iter().enumerate() {
        let more = attempt + 1 < n;
        let Some(req) = request
            .take()
            .or_else(|| replay.as_ref().map(Replay::request))
        else {
            break;
        };
        let meshed = identity.is_some();
        let key = PoolKey {
            addr,
            identity,
            version: ctx.version,
        };
        let pool = state.outbound_pools.get(&key);
        pool.configure(conn_policy);
        let _in_flight = pool.track();
        let mut req = req;
        let mut fresh_only = false;
        loop {
            let deadline = crate::connect::connect_timeout(state, &dest.service.policy);
            let (sender, fresh) = match acquire(
                state, snap, &pool, &key, fresh_only, deadline, gate,
            )
            .await
            {
                Ok(s) => s,
                Err(e @ ConnectError::Overflow { .. }) => {
                    state.metrics.error(Direction::Outbound, e.step());
                    tracing::warn!(error = %e, "request not sent: connection limit");
                    return error_response(e.status(), e.step(), &e.to_string());
                }
                Err(e) => {
                    state.metrics.error(Direction::Outbound, e.step());
                    if matches!(
                        e,
                        ConnectError::Connect { .. } | ConnectError::Timeout { .. }
                    ) {
                        judge_connect_failure(state, dest, addr);
                    }
                    if e.ejects_endpoint() {
                        state.outliers.eject(addr, tokio::time::Instant::now());
                    }
                    let pod = pod.unwrap_or("-");
                    if more {
                        tracing::warn!(error = %e, pod, "endpoint attempt failed; trying another");
                    } else {
                        tracing::warn!(error = %e, pod, step = e.step(), "outbound request failed");
                    }
                    last = Some(error_response(e.status(), e.step(), &e.to_string()));
                    request = Some(req);
                    break;
                }
            };
            match sender.send(req).await {
                Ok(resp) => {
                    judge(state, dest, addr, resp.status());
                    let app_failed_idempotent =
                        app_failed(&resp) && replay.as_ref().is_some_and(Replay::idempotent);
                    if meshed
                        && more
                        && replay.is_some()
                        && (undelivered(&resp) || app_failed_idempotent)
                    {
                        state
                            .metrics
                            .error(Direction::Outbound, "peer-app-unavailable");
                        state.outliers.eject(addr, tokio::time::Instant::now());
                        tracing::warn!(%addr, "the endpoint's proxy could not reach its app; trying another endpoint");
                        last = Some(finish(resp, None));
                        break;
                    }
                    return finish(resp, client_upgrade.take());
                }
                // A pooled connection closed before the request left: the
                // same endpoint on a fresh connection.
                Err(SendFailed {
                    request: Some(r), ..
                }) if !fresh => {
                    req = r;
                    fresh_only = true;
                }
                Err(SendFailed {
                    request: Some(r),
                    error,
                }) => {
                    state.metrics.error(Direction::Outbound, "upstream");
                    tracing::warn!(%addr, error = %error, "request not sent on a fresh connection");
                    last = Some(error_response(
                        StatusCode::BAD_GATEWAY,
                        "upstream",
                        &format!("{addr}: {error}"),
                    ));
                    request = Some(r);
                    break;
                }
                // The client's body failed while it was being sent (a
                // malformed chunk): its fault, answered as such while no
                // response has gone out. The upstream connection is closed
                // mid-request, so no app receives it whole.
                Err(SendFailed {
                    request: None,
                    error,
                }) if client_body_error(&error).is_some() => {
                    state.metrics.error(Direction::Outbound, "bad-request");
                    let e = client_body_error(&error)
                        .map_or_else(|| error.to_string(), ToString::to_string);
                    tracing::debug!(%addr, error = %e, "client request body failed");
                    return bad_request(&format!("{e}; the request was abandoned"));
                }
                Err(SendFailed {
                    request: None,
                    error,
                }) => {
                    state.metrics.error(Direction::Outbound, "upstream");
                    let e = crate::connect::SendError::Upstream {
                        addr,
                        source: error,
                    };
                    let again = more && replay.as_ref().is_some_and(Replay::idempotent);
                    if again {
                        tracing::warn!(error = %e, "connection lost before a response; sending the idempotent request to another endpoint");
                        last = Some(error_response(
                            StatusCode::BAD_GATEWAY,
                            "upstream",
                            &e.to_string(),
                        ));
                        break;
                    }
                    tracing::warn!(error = %e, "outbound request failed upstream");
                    return error_response(StatusCode::BAD_GATEWAY, "upstream", &e.to_string());
                }
            }
        }
    }
    match last {
        Some(resp) => {
            tracing::warn!(service = %dest.service.key(), "every endpoint attempt failed");
            resp
        }
        None => error_response(StatusCode::BAD_GATEWAY, "connect", "no attempt was made"),
    }
}
