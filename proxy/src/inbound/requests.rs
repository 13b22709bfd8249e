//! Inbound HTTP: the requests of one connection to the app, each decided
//! on the snapshot active when it arrives: plaintext under Strict refused,
//! the path put in normal form (400 if ambiguous), authorization, Audit
//! reports, the rate limit, then `x-weft-peer-identity` set from the
//! verified certificate and the request sent to the app on loopback over a
//! pooled connection.
//!
//! In: a connection from [`super`] (decrypted, or plaintext under
//! Permissive) with its peer identity. Out: requests to the app
//! (`client::connect`), responses to the peer.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::HeaderValue;
use http::{Request, Response, StatusCode};

use super::authz::{self, Decision, authorize};
use super::policy::{plaintext_revoked, report_audit, until_revoked};
use crate::accesslog::{Deferred, Logged};
use crate::client::connect::{SendError, acquire, send_request};
use crate::http::form::into_form;
use crate::http::forward::{finish, prepare};
use crate::http::h1::Conn;
use crate::http::path::normalize_uri;
use crate::http::pool::{PoolKey, Version};
use crate::http::server::serve_client;
use crate::http::{
    Body, PEER_IDENTITY_HEADER, ReqBody, SOURCE_NAME, content_length, error_response, outcome,
};
use crate::metrics::Direction;
use crate::metrics::traffic::{
    CallLabels, MeteredBody, OnEnd, Peer, Reporter, Series, SeriesCache, is_grpc,
};
use crate::net::end::EndSignal;
use crate::net::{BoxFuture, Prefixed};
use crate::ratelimit::Verdict;
use crate::snapshot::Snapshot;
use crate::state::State;
use crate::tls::SpiffeId;
use crate::trace::{Kind, Pending, ending};
use tokio_util::either::Either;

/// One inbound HTTP connection: what its requests share. Each request is
/// decided on the snapshot active when it arrives ([`Ctx::current`]), never
/// on the connection's first one: a reload (a new Deny, Strict) applies to
/// open keep-alive connections at their next request.
struct Ctx {
    state: Arc<State>,
    /// The snapshot the connection was accepted on (used only if none is
    /// active, which cannot happen once one was).
    snap: Arc<Snapshot>,
    port: u16,
    peer: Option<SpiffeId>,
    /// `peer` as the value of `x-weft-peer-identity`, made once.
    peer_header: Option<HeaderValue>,
    /// What the app speaks: the connection's version, except HTTP/1.1
    /// multiplexed by a peer proxy over HTTP/2.
    app: Version,
    /// The traffic metric series its requests were counted in.
    series: SeriesCache<SeriesKey>,
}

/// What a connection's cached series are found by: the snapshot (pointer
/// and generation) and what the peer proxy said of its workload.
type SeriesKey = (usize, u64, Option<HeaderValue>);

impl Ctx {
    /// The active snapshot.
    fn current(&self) -> Arc<Snapshot> {
        self.state
            .snapshot
            .load_full()
            .unwrap_or_else(|| self.snap.clone())
    }
}

/// Serves HTTP on an inbound connection, which replays first the bytes
/// detection read from it: from a peer proxy whose identity `peer` is (after mTLS),
/// or plaintext (`None`, Permissive). HTTP/1 with weft's own server, whose
/// future the connection's task holds inline (a plain function, as
/// `outbound::http::serve`); HTTP/2 boxed.
pub fn serve_http<I>(
    state: Arc<State>,
    snap: Arc<Snapshot>,
    port: u16,
    peer: Option<SpiffeId>,
    wire: Version,
    app: Version,
    conn: Prefixed<I>,
) -> impl Future<Output = ()> + Send + use<I>
where
    I: Conn,
{
    let peer_is_none = peer.is_none();
    let ctx = Arc::new(Ctx {
        state: state.clone(),
        snap,
        port,
        peer_header: peer
            .as_ref()
            .and_then(|id| HeaderValue::from_str(id.as_str()).ok()),
        peer,
        app,
        series: SeriesCache::default(),
    });
    let svc = move |req: Request<ReqBody>| {
        let ctx = ctx.clone();
        async move {
            let started = Instant::now();
            // HTTP/1.1 multiplexed by the peer proxy: from here on the
            // request is what its client sent, `Host` and all.
            let mut req = if ctx.app == Version::Http1 && req.version() == http::Version::HTTP_2 {
                into_form(req, http::Version::HTTP_11)
            } else {
                req
            };
            // What the calling proxy says of its workload counts only when
            // it proved who it is; the app never sees it.
            let source = req
                .headers_mut()
                .remove(SOURCE_NAME)
                .filter(|_| ctx.peer.is_some());
            let snap = ctx.current();
            let span = ctx.state.start_span(&snap, Kind::Server, &mut req);
            let logged = ctx
                .state
                .access_log_plan(&snap)
                .map(|plan| Logged::of(&req, plan));
            let grpc = is_grpc(req.headers());
            let request_bytes = content_length(req.headers());
            let resp = proxy(&ctx, &snap, req).await;
            let start = Start {
                started,
                grpc,
                request_bytes,
                source,
                span,
                logged,
            };
            let (resp, _) = meter(&ctx, &snap, start, resp);
            ctx.state
                .metrics
                .request(Direction::Inbound, resp.status().as_u16());
            resp
        }
    };
    // Serving ends at shutdown; a plaintext connection's also when the
    // active snapshot no longer admits plaintext on its port (Strict).
    let ended: Either<EndSignal, BoxFuture<'static, ()>> = if peer_is_none {
        let state = state.clone();
        Either::Right(Box::pin(async move {
            let revoked = async {
                let labels = &state.settings.labels;
                let why =
                    until_revoked(&state, |snap| plaintext_revoked(snap, labels, port, None)).await;
                state.metrics.error(Direction::Inbound, "revoked");
                tracing::warn!(port, %why, "open plaintext connection closed");
            };
            tokio::select! {
                () = state.end_signal() => {}
                () = revoked => {}
            }
        }))
    } else {
        Either::Left(state.end_signal())
    };
    let limits = state.settings.head_limits();
    if wire == Version::Http2 && app == Version::Http1 {
        // HTTP/1.1 multiplexed by a peer proxy: weft's own HTTP/2 server.
        let mux: BoxFuture<'static, ()> = Box::pin(crate::http::mux::serve(
            conn,
            crate::http::server::MAX_STREAMS,
            limits.max_header_bytes,
            svc,
            ended,
        ));
        return Either::Right(mux);
    }
    let refused = move |step| state.metrics.error(Direction::Inbound, step);
    Either::Left(serve_client(
        conn,
        wire,
        limits,
        svc,
        ended,
        refused,
        crate::http::h1::NoPark,
    ))
}

/// What a request's metrics and span need from its start.
struct Start {
    started: Instant,
    grpc: bool,
    request_bytes: u64,
    /// What the calling proxy said of its workload (verified peers only).
    source: Option<HeaderValue>,
    span: Option<Pending>,
    logged: Option<Logged>,
}

/// The response, its body wrapped to count the call in the traffic metrics
/// (see [`crate::metrics::traffic`]) and end its span when it ends; and the
/// call's series.
fn meter(
    ctx: &Ctx,
    snap: &Arc<Snapshot>,
    m: Start,
    resp: Response<Body>,
) -> (Response<Body>, Arc<Series>) {
    let source = m.source;
    let key: SeriesKey = (
        Arc::as_ptr(snap) as usize,
        snap.config.generation,
        source.clone(),
    );
    let series = ctx.series.get(key, || {
        let state = &ctx.state;
        let labels = CallLabels {
            reporter: Reporter::Destination,
            source: caller(ctx.peer.as_ref(), source.as_ref()),
            destination: state.local_peer(snap),
            service: serving_service(snap, state.settings.pod_ip, ctx.port),
            route: None,
            mtls: ctx.peer.is_some(),
        };
        state
            .metrics
            .traffic
            .http(&labels, snap.config.mesh.metrics_naming)
    });
    let mut recording = series.start(m.started, outcome(&resp, m.grpc), m.request_bytes);
    if let Some(span) = m.span {
        recording = recording.on_end(ending(ctx.state.tracer.clone(), span, &series, Vec::new()));
    }
    if let Some(l) = m.logged {
        recording = recording.on_end(deferred(ctx, l, &resp, &series));
    }
    (
        resp.map(|b| Body::new(MeteredBody::new(b, recording))),
        series,
    )
}

/// The calling end of an inbound call: its principal (verified) and the
/// namespace in it, and what its proxy said of its workload (only from a
/// verified peer: the caller passes `None` otherwise).
pub(super) fn caller(peer: Option<&SpiffeId>, source: Option<&HeaderValue>) -> Peer {
    let mut p = Peer {
        principal: peer.map(|id| id.as_str().to_owned()),
        namespace: peer
            .and_then(|id| Peer::namespace_of_principal(id.as_str()))
            .map(str::to_owned),
        ..Peer::default()
    };
    if peer.is_none() {
        return p;
    }
    let text = source.and_then(|v| v.to_str().ok()).unwrap_or_default();
    for field in text.split(';') {
        let Some((k, v)) = field.split_once('=') else {
            continue;
        };
        let v = v.trim();
        if v.is_empty() || v.len() > 253 {
            continue;
        }
        match k.trim() {
            "workload" => p.workload = Some(v.to_owned()),
            "app" => p.app = Some(v.to_owned()),
            "version" => p.version = Some(v.to_owned()),
            _ => {}
        }
    }
    p
}

/// The Service of this pod's namespace whose endpoint this pod is on
/// `port` (the first by name, if several): the `destination_service` of
/// inbound calls.
pub(super) fn serving_service(
    snap: &Snapshot,
    pod_ip: Option<std::net::IpAddr>,
    port: u16,
) -> Option<(String, String)> {
    let ip = pod_ip?;
    snap.config
        .services
        .iter()
        .filter(|s| s.namespace == snap.config.namespace)
        .find(|s| {
            s.endpoints.iter().any(|e| {
                e.address == ip
                    && s.ports.iter().any(|p| {
                        p.name
                            .as_ref()
                            .and_then(|n| e.ports.get(n))
                            .copied()
                            .unwrap_or(p.target_port)
                            == port
                    })
            })
        })
        .map(|s| (s.name.clone(), s.namespace.clone()))
}

async fn proxy(ctx: &Ctx, snap: &Arc<Snapshot>, mut req: Request<ReqBody>) -> Response<Body> {
    let state = &ctx.state;
    let snap = snap.clone();
    if let Some(why) = plaintext_revoked(&snap, &state.settings.labels, ctx.port, ctx.peer.as_ref())
    {
        state.metrics.error(Direction::Inbound, "plaintext-refused");
        tracing::warn!(port = ctx.port, %why, "plaintext request refused on an open connection");
        let mut resp = error_response(
            StatusCode::FORBIDDEN,
            "plaintext-refused",
            "mTLS mode is Strict; send through a weft proxy",
        );
        resp.headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    req.headers_mut().remove(PEER_IDENTITY_HEADER);
    // Authorize and forward one normal path, so the app serves what the
    // policy judged (`http::path`).
    let path = match normalize_uri(req.uri_mut(), snap.config.mesh.escaped_slashes) {
        Ok(path) => path,
        Err(e) => {
            state.metrics.error(Direction::Inbound, "ambiguous-path");
            tracing::debug!(port = ctx.port, error = %e, "inbound request path refused");
            return error_response(StatusCode::BAD_REQUEST, "ambiguous-path", &e.to_string());
        }
    };
    let r = authz::Request {
        identity: ctx.peer.as_ref(),
        port: ctx.port,
        method: Some(req.method().as_str()),
        path: Some(path.policy()),
    };
    if let Decision::Deny(why) = authorize(&snap.config, &state.settings.labels, &r) {
        state.metrics.error(Direction::Inbound, "denied");
        let who = ctx
            .peer
            .as_ref()
            .map_or("an unauthenticated client", SpiffeId::as_str);
        tracing::warn!(peer = who, port = ctx.port, %why, "inbound request denied");
        return error_response(
            StatusCode::FORBIDDEN,
            "denied",
            &format!("{who} may not call port {}: {why}", ctx.port),
        );
    }
    let audited = report_audit(state, &snap, &r);
    if let Verdict::Limited { name, retry_after } =
        state
            .inbound_limits
            .check(&snap.config, &state.settings.labels, ctx.port)
    {
        state.metrics.error(Direction::Inbound, "rate-limited");
        tracing::debug!(port = ctx.port, limit = %name, ?retry_after, "inbound request over its rate limit");
        let mut resp = error_response(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            &format!(
                "port {} is over the rate limit of ServicePolicy {name}; retry later",
                ctx.port
            ),
        );
        let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        return resp;
    }
    if let Some(v) = &ctx.peer_header {
        // A static name and a shared value: nothing is copied.
        const NAME: http::HeaderName = http::HeaderName::from_static(PEER_IDENTITY_HEADER);
        req.headers_mut().insert(NAME, v.clone());
    }
    let key = PoolKey {
        addr: SocketAddr::new(state.settings.app_host, ctx.port),
        identity: None,
        version: ctx.app,
        mux: false,
    };
    let pool = state.inbound_pools.get(&key);
    let prepared = prepare(req, ctx.app);
    let result = match acquire(
        state.connector(&snap),
        &pool,
        &key,
        false,
        state.settings.connect_timeout,
        None,
    )
    .await
    {
        Ok((sender, fresh)) => send_request(
            state.connector(&snap),
            state.settings.connect_timeout,
            &pool,
            &key,
            sender,
            fresh,
            prepared.request,
        )
        .await
        .map(|resp| finish(resp, prepared.client_upgrade)),
        Err(e) => Err(e.into()),
    };
    let mut resp = result.unwrap_or_else(|e| {
        let (status, step) = match &e {
            SendError::Connect(c) => (c.status(), c.step()),
            // The client's body failed (a malformed chunk), not the app.
            SendError::Upstream { source, .. }
                if crate::http::client_body_error(&**source).is_some() =>
            {
                (StatusCode::BAD_REQUEST, "bad-request")
            }
            SendError::Upstream { .. } => (StatusCode::BAD_GATEWAY, "app"),
        };
        state.metrics.error(Direction::Inbound, step);
        tracing::warn!(error = %e, "forwarding to the app failed");
        error_response(
            status,
            step,
            &format!("{e} (the local app on port {})", ctx.port),
        )
    });
    if audited {
        resp.extensions_mut().insert(Audited);
    }
    resp
}

/// Set on a response whose request Audit-mode AccessPolicies would refuse.
#[derive(Clone, Copy, Debug)]
struct Audited;

/// The access log line of a request whose response head is `resp`, to be
/// written when the response ends.
fn deferred(ctx: &Ctx, l: Logged, resp: &Response<Body>, series: &Series) -> OnEnd {
    let mut line = Deferred::new(l, Direction::Inbound, resp, series);
    line.upstream = Some(SocketAddr::new(ctx.state.settings.app_host, ctx.port));
    line.audit = resp.extensions().get::<Audited>().is_some();
    let state = ctx.state.clone();
    Box::new(move |outcome, bytes| line.finish(&state.access_log, outcome.grpc_status, bytes))
}
