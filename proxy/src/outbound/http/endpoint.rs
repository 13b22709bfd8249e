//! The endpoint step of an outbound HTTP request: the attempt order over
//! the destination's endpoints (`client::balance`), a pooled connection to
//! each in turn (`client::connect`, under the Service's connection
//! limits), and the verdicts on each endpoint (`client::outliers`).
//!
//! Failing over to another endpoint:
//! - a connect failure (refused, unreachable, timed out) moves on before
//!   anything was sent, and ejects the endpoint for a while;
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
//!
//! In: one attempt from [`super::retry`]. Out: the response, or an error
//! response naming the failed step.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, Method, Request, Response, StatusCode};
use weft_proxy_config::{HashKey, LoadBalancer};

use crate::accesslog::{Sent, Upstream};
use crate::client::balance::{Attempts, attempt_order};
use crate::client::connect::{ConnectError, Gate, SendError, acquire, connect_timeout};
use crate::http::SendFailed;
use crate::http::forward::{finish, prepare};
use crate::http::pool::{ConnPolicy, PoolKey, Version};
use crate::http::{
    Body, ERROR_NAME, SOURCE_NAME, bad_request, client_body_error, error_response, full,
};
use crate::metrics::Direction;
use crate::metrics::traffic::SeriesCache;
use crate::snapshot::dest::Dest;
use crate::snapshot::{ServiceRef, Snapshot, endpoint_port};
use crate::state::State;
use crate::tls::SpiffeId;

/// The client connection a request came on, and the destination it was
/// addressed to: what every step of an outbound request reads.
#[derive(Clone)]
pub(super) struct Ctx {
    pub(super) state: Arc<State>,
    /// The snapshot the connection started with; each request routes with
    /// the current one (see [`current`]).
    pub(super) snap: Arc<Snapshot>,
    pub(super) target: ServiceRef,
    pub(super) dst: SocketAddr,
    pub(super) client: SocketAddr,
    pub(super) version: Version,
    /// How requests arrived (scheme, a gateway's listener port), for
    /// redirects.
    pub(super) arrival: crate::snapshot::rewrite::Arrival,
    /// The traffic metric series its requests were counted in.
    pub(super) series: SeriesCache<SeriesKey>,
}

/// What a connection's cached series are found by: the snapshot (pointer
/// and generation), the route rule and the endpoint that answered.
pub(super) type SeriesKey = (usize, u64, usize, Option<Upstream>);

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

/// An endpoint to try: its address, its identity (none outside the mesh)
/// and its pod's name.
type Candidate<'a> = (SocketAddr, Option<SpiffeId>, Option<&'a str>);

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
fn undelivered<B>(resp: &Response<B>) -> bool {
    resp.headers()
        .get(ERROR_NAME)
        .is_some_and(|v| v == "connect" || v == "connect-timeout")
}

/// The peer proxy answered that its app failed the request before
/// answering it (`x-weft-error: app`: the app reset or closed the
/// connection, e.g. while its pod shuts down). The app may have seen the
/// request, so only an idempotent one is sent to another endpoint.
fn app_failed<B>(resp: &Response<B>) -> bool {
    resp.headers().get(ERROR_NAME).is_some_and(|v| v == "app")
}

pub(super) async fn forward<B>(
    ctx: &Ctx,
    snap: &Snapshot,
    dest: &Dest<'_>,
    req: Request<B>,
    sent: &mut Sent,
) -> Response<Body>
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
    // none (kubelet may not have delivered them yet). Only their indices
    // are kept (inline); each attempt reads its endpoint from the snapshot,
    // its identity a shared clone. The request's future holds this state
    // for its whole life, so it stays small.
    let order = if dest.endpoints.is_empty() {
        Attempts::new()
    } else {
        attempt_order(
            &state.outliers,
            &state.outbound_pools,
            || state.next_rr(),
            dest,
            key.as_deref(),
        )
    };
    let candidate = |k: usize| -> Option<Candidate<'_>> {
        if dest.endpoints.is_empty() {
            return dest.fallback.filter(|_| k == 0).map(|a| (a, None, None));
        }
        let i = *order.get(k)?;
        let ep = dest.endpoints.get(i);
        Some((
            SocketAddr::new(ep.address, endpoint_port(ep, dest.port)),
            dest.endpoints.identity(i).cloned(),
            ep.pod.as_deref(),
        ))
    };
    let n = if dest.endpoints.is_empty() {
        usize::from(dest.fallback.is_some())
    } else {
        order.len()
    };
    if n == 0 {
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
    let gate = Gate::of(&state.conn_limits, dest);
    let upgrade = prepared.client_upgrade.is_some();
    let replay = (n > 1 && !upgrade)
        .then(|| Replay::of(&prepared.request))
        .flatten();
    let mut client_upgrade = prepared.client_upgrade;
    let mut request = Some(prepared.request);
    let mut last: Option<Response<Body>> = None;
    for attempt in 0..n {
        let Some((addr, identity, pod)) = candidate(attempt) else {
            break;
        };
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
            // A weft peer takes HTTP/1.1 as streams of one shared HTTP/2
            // connection; a tunnel needs a connection of its own, and a
            // Service with `maxConnections` keeps HTTP/1.1 connections, so
            // that the limit still bounds its requests in flight.
            mux: meshed && state.settings.mux && !upgrade && gate.is_none(),
        };
        let pool = state.outbound_pools.get(&key);
        pool.configure(conn_policy);
        let _in_flight = pool.track();
        let mut req = req;
        match (&state.source_header, meshed) {
            (Some(v), true) => {
                req.headers_mut().insert(SOURCE_NAME, v.clone());
            }
            _ => {
                req.headers_mut().remove(SOURCE_NAME);
            }
        }
        let mut fresh_only = false;
        loop {
            let deadline = connect_timeout(state.settings.connect_timeout, &dest.service.policy);
            let (sender, fresh) = match acquire(
                state.connector(snap),
                &pool,
                &key,
                fresh_only,
                deadline,
                gate,
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
                        state
                            .outliers
                            .judge_connect_failure(&state.metrics, dest, addr);
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
                    state
                        .outliers
                        .judge(&state.metrics, dest, addr, resp.status());
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
                    let out = finish(resp, client_upgrade.take());
                    sent.upstream = Some(Upstream {
                        addr,
                        service: dest.index,
                    });
                    return out;
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
                }) if client_body_error(&*error).is_some() => {
                    state.metrics.error(Direction::Outbound, "bad-request");
                    let e = client_body_error(&*error).unwrap_or_else(|| error.to_string());
                    tracing::debug!(%addr, error = %e, "client request body failed");
                    return bad_request(&format!("{e}; the request was abandoned"));
                }
                Err(SendFailed {
                    request: None,
                    error,
                }) => {
                    state.metrics.error(Direction::Outbound, "upstream");
                    let e = SendError::Upstream {
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
