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

use crate::connect::{ConnectError, acquire};
use crate::http::forward::{finish, prepare};
use crate::http::pool::{PoolKey, SendFailed, Version};
use crate::http::{Body, ERROR_HEADER, error_response, full, serve_connection};
use crate::metrics::Direction;
use crate::proxy::State;
use crate::snapshot::{ServiceRef, Snapshot, endpoint_port};
use crate::tls::SpiffeId;

use super::route::{self, Dest};

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
    serve_connection(&state, io, version, svc).await;
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
    let req = Request::from_parts(parts, body);
    let mut resp = match route::resolve(&snap.config, &snap.routes, target, backend, ctx.dst) {
        Ok(dest) => forward(ctx, &snap, &dest, req).await,
        Err(e) => {
            ctx.state
                .metrics
                .error(Direction::Outbound, "route-backend");
            tracing::error!(error = %e, "route backend cannot be resolved");
            error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "route-backend",
                &e.to_string(),
            )
        }
    };
    if let Some(sel) = selected {
        sel.route.response_headers.apply(resp.headers_mut());
    }
    resp
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

async fn forward(
    ctx: &Ctx,
    snap: &Snapshot,
    dest: &Dest<'_>,
    req: Request<Incoming>,
) -> Response<Body> {
    let state = &ctx.state;
    let key = hash_key(
        &dest.service.policy.load_balancer,
        req.headers(),
        ctx.client,
    );
    let prepared = prepare(req, ctx.version);

    // Candidates: balanced endpoints, or the fallback when the config knows
    // none (kubelet may not have delivered them yet).
    let mut candidates: Vec<(SocketAddr, Option<SpiffeId>)> = Vec::new();
    if dest.endpoints.is_empty() {
        candidates.extend(dest.fallback.map(|a| (a, None)));
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
                Ok(id) => candidates.push((addr, id)),
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

    let upgrade = prepared.client_upgrade.is_some();
    let replay = (candidates.len() > 1 && !upgrade)
        .then(|| Replay::of(&prepared.request))
        .flatten();
    let mut client_upgrade = prepared.client_upgrade;
    let mut request = Some(prepared.request);
    let mut last: Option<Response<Body>> = None;
    let n = candidates.len();
    for (attempt, (addr, identity)) in candidates.into_iter().enumerate() {
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
        let _in_flight = pool.track();
        let mut req = req;
        let mut fresh_only = false;
        loop {
            let (sender, fresh) = match acquire(state, snap, &pool, &key, fresh_only).await {
                Ok(s) => s,
                Err(e) => {
                    state.metrics.error(Direction::Outbound, e.step());
                    if matches!(
                        e,
                        ConnectError::Connect { .. } | ConnectError::Timeout { .. }
                    ) {
                        state.outliers.eject(addr, tokio::time::Instant::now());
                    }
                    if more {
                        tracing::warn!(error = %e, "endpoint attempt failed; trying another");
                    } else {
                        tracing::warn!(error = %e, step = e.step(), "outbound request failed");
                    }
                    last = Some(error_response(e.status(), e.step(), &e.to_string()));
                    request = Some(req);
                    break;
                }
            };
            match sender.send(req).await {
                Ok(resp) => {
                    state.outliers.restore(addr);
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
