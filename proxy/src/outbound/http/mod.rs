//! Outbound HTTP: each request of a client connection is routed on its own
//! (the Service's first matching `httpRoutes` rule: redirect, rewrite,
//! header edits, a backend chosen by weight), balanced over that backend's
//! endpoints, and sent over a pooled connection (mTLS + ALPN to meshed
//! endpoints). Three steps, each a file, each calling only the next:
//!
//! ```text
//! mod.rs      the route: select the rule, redirect, rewrite, header edits,
//!             fault injection, the route timeout
//!   ──► retry.rs     the backend: resolve it, circuit breaker, retry budget,
//!                    retries with backoff, mirroring
//!     ──► endpoint.rs  the endpoints: attempt order, pooled connection,
//!                      failover, passive health
//! ```
//!
//! In: requests of a client connection on :15001 whose destination is a
//! known Service port. Out: responses to the client; requests to endpoints
//! through `client::connect`.

use std::borrow::Borrow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

mod endpoint;
mod retry;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, LOCATION};
use http::{Request, Response, StatusCode};
use tokio::net::TcpStream;

use crate::accesslog::{Deferred, Logged, Sent, new_request_id};
use crate::http::h1::{Conn, NoPark, Park};
use crate::http::pool::Version;
use crate::http::server::serve_client;
use crate::http::{Body, ReqBody, content_length, error_response, full, outcome};
use crate::metrics::traffic::{
    CallLabels, MeteredBody, OnEnd, Peer, Reporter, Series, SeriesCache, is_grpc,
};
use crate::metrics::{Direction, OpenConn};
use crate::net::park::Resume;
use crate::net::{Prefixed, listen};
use crate::snapshot::rewrite::{Arrival, redirect_location};
use crate::snapshot::routes;
use crate::snapshot::{ServiceRef, Snapshot};
use crate::state::State;
use crate::trace::context::sample;
use crate::trace::{Kind, Pending, Value, ending};
use endpoint::{Ctx, SeriesKey};
use retry::send;

/// Serves HTTP on a captured client connection. A plain function: the
/// connection's task holds the returned future alone, not it beside this
/// function's arguments (docs/performance.md, idle connections).
/// `conn` replays first the bytes protocol detection read from it.
pub fn serve(
    state: Arc<State>,
    snap: Arc<Snapshot>,
    target: ServiceRef,
    dst: SocketAddr,
    client: SocketAddr,
    version: Version,
    conn: Prefixed<TcpStream>,
) -> impl std::future::Future<Output = ()> + Send + use<> {
    let ctx = Arc::new(Ctx {
        state: state.clone(),
        snap,
        target,
        dst,
        client,
        version,
        arrival: Arrival::SIDECAR,
        series: SeriesCache::default(),
    });
    let park = ParkIdle(ctx.clone());
    // The request's future is `handle`'s own: a block around it would hold
    // it beside what it captured, and move it once more.
    let svc = move |mut req: Request<ReqBody>| {
        let started = Instant::now();
        stamp(&mut req);
        let (snap, target) = current(&ctx);
        handle(ctx.clone(), snap, target, req, started, NoRoute::Service)
    };
    let (limits, ended) = (state.settings.head_limits(), state.end_signal());
    let refused = move |step| state.metrics.error(Direction::Outbound, step);
    serve_client(conn, version, limits, svc, ended, refused, park)
}

/// Parks an app's idle HTTP/1 connection outside the runtime
/// (`net::park`) and, when it becomes readable, serves it again with a
/// task of its own.
///
/// A parked connection does not keep a snapshot alive: it is served again
/// with the active snapshot when that knows its destination (as its next
/// request would have been, see [`current`]), else with the snapshot it
/// had if something else still holds it, else as a new connection to an
/// unknown destination is: passed through to where the app sent it.
struct ParkIdle(Arc<Ctx>);

impl Park<TcpStream> for ParkIdle {
    fn tick(&self) -> Option<u32> {
        self.0.state.parking.tick()
    }

    fn due(&self, since: u32, now: u32) -> bool {
        crate::net::park::Parking::due(since, now)
    }

    fn wake_at_next_tick(&self, waker: &std::task::Waker) {
        self.0.state.parking.wake_at_next_tick(waker);
    }

    fn park(&self, io: TcpStream) -> Result<(), TcpStream> {
        let c = &*self.0;
        let (own, target) = (Arc::downgrade(&c.snap), c.target);
        let (dst, client, version) = (c.dst, c.client, c.version);
        let open = OpenConn::again(&c.state.metrics, Direction::Outbound, false);
        // What is parked does not keep the proxy's state alive either.
        let state = Arc::downgrade(&c.state);
        let resume: Resume = Box::new(move |io| {
            let Some(state) = state.upgrade() else {
                return;
            };
            let active = state.snapshot.load_full();
            let found = match active.as_ref().and_then(|s| Some((s, s.lookup(dst)?))) {
                Some((snap, target)) => Some((snap.clone(), target)),
                None => own.upgrade().map(|snap| (snap, target)),
            };
            let Some((snap, target)) = found else {
                tracing::debug!(%dst, "a parked connection's Service is gone; passed through");
                let st = state.clone();
                let through: crate::net::BoxFuture<'static, ()> = Box::pin(async move {
                    crate::outbound::tcp::passthrough(&st, io, Bytes::new(), dst).await;
                });
                state.spawn_drained(listen::serving(open, through));
                return;
            };
            let conn = Prefixed::new(Bytes::new(), io);
            let serving = serve(state.clone(), snap, target, dst, client, version, conn);
            state.spawn_drained(listen::serving(open, serving));
        });
        c.state.parking.park(io, resume).map_err(|(io, _)| io)
    }
}

/// Serves HTTP on a connection of an ingress gateway listener on `port`
/// (after TLS for HTTPS): each request is routed by its host to the Service
/// of the listener and host name it matches (see
/// `snapshot::gateway::GatewayTable::route`), whose routes handle it like
/// any outbound request. A request no listener, host name or rule takes is
/// answered 404. The client's address is appended to `x-forwarded-for`
/// and the listener's scheme set in `x-forwarded-proto`.
pub fn serve_gateway<I>(
    state: Arc<State>,
    port: u16,
    local: SocketAddr,
    client: SocketAddr,
    version: Version,
    scheme: &'static str,
    conn: Prefixed<I>,
) -> impl std::future::Future<Output = ()> + Send + use<I>
where
    I: Conn,
{
    let series = SeriesCache::default();
    let shared = state.clone();
    let svc = move |mut req: Request<ReqBody>| {
        let state = shared.clone();
        let series = series.clone();
        async move {
            let started = Instant::now();
            stamp(&mut req);
            forwarded(req.headers_mut(), client, scheme);
            let host = request_host(&req);
            let snap = state.snapshot.load_full();
            let routed = snap.as_ref().and_then(|s| {
                let (_, target) = s.gateway.as_ref()?.route(port, host.as_deref())?;
                Some((s.clone(), target))
            });
            let Some((snap, target)) = routed else {
                state.metrics.error(Direction::Inbound, "gateway-no-route");
                state.metrics.request(Direction::Inbound, 404);
                return error_response(
                    StatusCode::NOT_FOUND,
                    "no-route",
                    &format!(
                        "no listener of port {port} routes host {:?}",
                        host.as_deref().unwrap_or("")
                    ),
                );
            };
            let ctx = Ctx {
                state: state.clone(),
                snap: snap.clone(),
                target,
                dst: local,
                client,
                version,
                arrival: Arrival {
                    scheme,
                    port: Some(port),
                },
                series,
            };
            handle(ctx, snap, target, req, started, NoRoute::NotFound).await
        }
    };
    let (limits, ended) = (state.settings.head_limits(), state.end_signal());
    let refused = move |step| state.metrics.error(Direction::Inbound, step);
    serve_client(conn, version, limits, svc, ended, refused, NoPark)
}

/// Gives a request an `x-request-id` when it has none, and removes a
/// caller's `x-weft-source`: only this proxy says which workload calls.
fn stamp(req: &mut Request<ReqBody>) {
    use crate::http::{REQUEST_ID_NAME, SOURCE_NAME};
    // Static names: looking them up parses nothing, inserting copies nothing.
    if !req.headers().contains_key(REQUEST_ID_NAME) {
        req.headers_mut().insert(REQUEST_ID_NAME, new_request_id());
    }
    req.headers_mut().remove(SOURCE_NAME);
}

/// One request routed to `target` under `snap`, sent, and counted: its
/// span, access log line and traffic metrics end with its response body.
async fn handle<C: Borrow<Ctx>>(
    ctx: C,
    snap: Arc<Snapshot>,
    target: ServiceRef,
    mut req: Request<ReqBody>,
    started: Instant,
    no_route: NoRoute,
) -> Response<Body> {
    let (ctx, snap) = (ctx.borrow(), &snap);
    let span = ctx.state.start_span(snap, Kind::Client, &mut req);
    let logged = ctx
        .state
        .access_log_plan(snap)
        .map(|plan| Logged::of(&req, plan));
    let grpc = is_grpc(req.headers());
    let request_bytes = content_length(req.headers());
    let mut sent = Sent::default();
    let resp = proxy(ctx, snap, target, req, no_route, &mut sent).await;
    ctx.state
        .metrics
        .request(Direction::Outbound, resp.status().as_u16());
    let (resp, _) = meter(
        ctx,
        snap,
        target,
        Metered {
            started,
            grpc,
            request_bytes,
            span,
            logged,
        },
        &sent,
        resp,
    );
    resp
}

/// The host a request is for (its URI's authority, else `Host`), lower
/// case, without port.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = req.uri().host().map(str::to_owned).or_else(|| {
        req.headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| match h.rsplit_once(':') {
                Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name.to_owned(),
                _ => h.to_owned(),
            })
    })?;
    Some(raw.trim_end_matches('.').to_ascii_lowercase())
}

/// Appends the client to `x-forwarded-for` and sets `x-forwarded-proto`.
fn forwarded(headers: &mut HeaderMap, client: SocketAddr, scheme: &'static str) {
    const XFF: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");
    const XFP: http::HeaderName = http::HeaderName::from_static("x-forwarded-proto");
    let ip = client.ip().to_canonical().to_string();
    let value = match headers.get(&XFF).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => format!("{prev}, {ip}"),
        _ => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(XFF, v);
    }
    headers.insert(XFP, HeaderValue::from_static(scheme));
}

/// What a request that no rule of its Service matches gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NoRoute {
    /// The Service itself (a sidecar's outbound request).
    Service,
    /// 404 (a gateway's request: its Service has no addresses).
    NotFound,
}

/// The access log line of a request whose response head is `resp`, to be
/// written when the response ends.
fn deferred(ctx: &Ctx, l: Logged, sent: &Sent, resp: &Response<Body>, series: &Series) -> OnEnd {
    let mut line = Deferred::new(l, Direction::Outbound, resp, series);
    line.route = sent.route.clone();
    line.upstream = sent.upstream.map(|u| u.addr);
    line.retries = sent.retries;
    let state = ctx.state.clone();
    Box::new(move |outcome, bytes| line.finish(&state.access_log, outcome.grpc_status, bytes))
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

/// What a request's metrics and span need from its start.
struct Metered {
    started: Instant,
    grpc: bool,
    request_bytes: u64,
    span: Option<Pending>,
    logged: Option<Logged>,
}

/// The response, its body wrapped to count the call in the traffic metrics
/// (see [`crate::metrics::traffic`]) and end its span when it ends; and the
/// call's series.
fn meter(
    ctx: &Ctx,
    snap: &Arc<Snapshot>,
    target: ServiceRef,
    m: Metered,
    sent: &Sent,
    resp: Response<Body>,
) -> (Response<Body>, Arc<Series>) {
    let route = sent.route.clone();
    let upstream = sent.upstream;
    let retries = sent.retries;
    let key: SeriesKey = (
        Arc::as_ptr(snap) as usize,
        snap.config.generation,
        route
            .as_ref()
            .map_or(0, |r| Arc::as_ptr(r).cast::<u8>() as usize),
        upstream,
    );
    let series = ctx.series.get(key, || {
        let state = &ctx.state;
        let service = &snap.config.services[upstream.map_or(target.service, |u| u.service)];
        let endpoint =
            upstream.and_then(|u| service.endpoints.iter().find(|e| e.address == u.addr.ip()));
        let labels = CallLabels {
            reporter: Reporter::Source,
            source: state.local_peer(snap),
            destination: Peer::endpoint(endpoint, &service.namespace),
            service: Some((service.name.clone(), service.namespace.clone())),
            route,
            mtls: endpoint.is_some_and(|e| e.meshed),
        };
        state
            .metrics
            .traffic
            .http(&labels, snap.config.mesh.metrics_naming)
    });
    let mut recording = series.start(m.started, outcome(&resp, m.grpc), m.request_bytes);
    if let Some(span) = m.span {
        let mut extra = Vec::new();
        if let Some(u) = upstream {
            extra.push(("network.peer.address", Value::Str(u.addr.ip().to_string())));
            extra.push(("network.peer.port", Value::Int(i64::from(u.addr.port()))));
        }
        extra.push(("weft.retries", Value::Int(i64::from(retries))));
        recording = recording.on_end(ending(ctx.state.tracer.clone(), span, &series, extra));
    }
    if let Some(l) = m.logged {
        recording = recording.on_end(deferred(ctx, l, sent, &resp, &series));
    }
    (
        resp.map(|b| Body::new(MeteredBody::new(b, recording))),
        series,
    )
}

async fn proxy(
    ctx: &Ctx,
    snap: &Arc<Snapshot>,
    target: ServiceRef,
    req: Request<ReqBody>,
    no_route: NoRoute,
    sent: &mut Sent,
) -> Response<Body> {
    let snap = snap.clone();
    let (_, routed_port) = snap.service(target);
    let selected = snap.routes.http(
        target,
        routed_port.port,
        req.method(),
        req.uri(),
        req.headers(),
    );
    if selected.is_none() && no_route == NoRoute::NotFound {
        ctx.state
            .metrics
            .error(Direction::Inbound, "gateway-no-route");
        return error_response(
            StatusCode::NOT_FOUND,
            "no-route",
            &format!(
                "no rule of {} matches {} {}",
                snap.service(target).0.key(),
                req.method(),
                req.uri().path()
            ),
        );
    }
    let (mut parts, body) = req.into_parts();
    let mut backend = None;
    if let Some(sel) = selected {
        if let Some(r) = &sel.route.redirect {
            return redirect(ctx, sel, r, &parts.uri, &parts.headers);
        }
        sel.route
            .rewrite(sel.prefix, &mut parts.uri, &mut parts.headers);
        sel.route.request_headers.apply(&mut parts.headers);
        backend = match sel.route.backends.pick(&mut rand::rng()) {
            routes::Pick::Service => None,
            routes::Pick::Backend(b) => Some(b),
            routes::Pick::Unresolved => {
                ctx.state
                    .metrics
                    .error(Direction::Outbound, "unresolved-backend");
                let mut resp = error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "unresolved-backend",
                    &format!(
                        "route {} sends this share of its requests to a backend that does not resolve; see the route's ResolvedRefs condition",
                        sel.route.name
                    ),
                );
                sel.route.response_headers.apply(resp.headers_mut());
                sent.route = Some(sel.route.name.clone());
                return resp;
            }
        };
    }
    let route = selected.map(|s| s.route);
    let abort = match route.and_then(|r| r.fault.as_ref().map(|f| (r, f))) {
        Some((r, fault)) => inject(ctx, r, fault).await,
        None => None,
    };
    // The route's timeout covers every attempt until the response headers
    // arrive (the body streams on after). The sending future is made where
    // it is awaited, in this function's own state: a function of its own
    // around it, or a local awaited later, would hold and move it again.
    let mut resp = match (abort, route.and_then(|r| r.timeout.map(|t| (r, t)))) {
        (Some(abort), _) => abort,
        (None, None) => {
            let req = Request::from_parts(parts, body);
            send(ctx, &snap, target, backend, route, req, sent).await
        }
        (None, Some((r, limit))) => {
            let req = Request::from_parts(parts, body);
            match tokio::time::timeout(limit, send(ctx, &snap, target, backend, route, req, sent))
                .await
            {
                Ok(resp) => resp,
                Err(_) => timed_out(ctx, r, limit),
            }
        }
    };
    if let Some(sel) = selected {
        sel.route.response_headers.apply(resp.headers_mut());
        sent.route = Some(sel.route.name.clone());
    }
    resp
}

/// Fault injection, decided per request: a delay first (outside the route
/// timeout: the fault happens before the request is routed), then an
/// abort, whose response is returned.
async fn inject(
    ctx: &Ctx,
    route: &routes::HttpRoute,
    fault: &weft_proxy_config::Fault,
) -> Option<Response<Body>> {
    if let Some(d) = fault.delay.as_ref().filter(|d| sample(d.percent)) {
        ctx.state.metrics.route_event(&route.name, "fault-delay");
        tokio::time::sleep(std::time::Duration::from_millis(d.delay_ms)).await;
    }
    let a = fault.abort.as_ref().filter(|a| sample(a.percent))?;
    ctx.state.metrics.route_event(&route.name, "fault-abort");
    Some(error_response(
        StatusCode::from_u16(a.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        "fault",
        &format!("fault injected by route {}", route.name),
    ))
}

/// The answer to a request whose route's timeout ran out.
fn timed_out(ctx: &Ctx, r: &routes::HttpRoute, limit: std::time::Duration) -> Response<Body> {
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

fn redirect(
    ctx: &Ctx,
    sel: routes::Selected<'_>,
    r: &weft_proxy_config::Redirect,
    uri: &http::Uri,
    headers: &HeaderMap,
) -> Response<Body> {
    let route = sel.route;
    let location = redirect_location(r, sel.prefix, uri, headers, ctx.arrival);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::h1::body::RecvBody;
    use crate::snapshot::load_dir;
    use crate::state::{Net, Settings};
    use crate::test_util::{MountDir, TestCa};
    use rustls::pki_types::UnixTime;

    /// A request's future is built layer by layer, each layer's moved into
    /// the next, and an HTTP/1 request's whole state is one allocation of
    /// the server's: its size is paid, in copies and in bytes, by every
    /// request. The future of a request on its common path (no retries, no
    /// mirror), in this test's build: 7,688 bytes while the service wrapped
    /// `handle` in a block of its own, the route timeout had a function of
    /// its own and retries were a layer on every request; 5,856 since (the
    /// same in a release build).
    #[test]
    fn a_request_s_future_stays_small() {
        let ca = TestCa::new("ca");
        let config = weft_proxy_config::testing::sample();
        let leaf = ca.leaf("spiffe://cluster.local/ns/demo/sa/frontend", 3600);
        let (json, sig) = (config.to_json(), ca.sign_config(&config));
        let mount = MountDir::new();
        mount.publish(&[
            (weft_proxy_config::FILE_NAME, json.as_slice()),
            (weft_proxy_config::SIGNATURE_FILE_NAME, sig.as_slice()),
            ("tls.crt", leaf.cert_pem.as_bytes()),
            ("tls.key", leaf.key_pem.as_bytes()),
            ("ca.crt", ca.cert_pem.as_bytes()),
        ]);
        let snap = Arc::new(load_dir(mount.path(), UnixTime::now()).expect("the sample loads"));
        let dir = tempfile::tempdir().expect("dir");
        let state =
            Arc::new(State::new(Settings::new(dir.path().into()), Net::default(), vec![]).0);
        let target = ServiceRef {
            service: 0,
            port: 0,
            endpoint: None,
        };
        let addr: SocketAddr = "127.0.0.1:80".parse().expect("addr");
        let ctx = Arc::new(Ctx {
            state,
            snap: snap.clone(),
            target,
            dst: addr,
            client: addr,
            version: Version::Http1,
            arrival: Arrival::SIDECAR,
            series: SeriesCache::default(),
        });
        let req = Request::new(ReqBody::H1(RecvBody::empty()));
        let fut = handle(ctx, snap, target, req, Instant::now(), NoRoute::Service);
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 6 * 1024, "a request's future is {size} bytes");
    }
}
