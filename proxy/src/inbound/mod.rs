//! Inbound: traffic for the app, captured on :15006.
//!
//! ```text
//! accept ─► original destination (the app port) ─► port protocol (inbound.ports) ─► peek first bytes
//!   ├ TLS ─► mTLS handshake (client cert verified against the bundle, SPIFFE ID read)
//!   │        ─► ALPN: weft/h1 | weft/h2 ─► per request: normal path (400 if ambiguous) ─► authz ─► rate limit ─► x-weft-peer-identity ─► app 127.0.0.1:port
//!   │                 weft/tcp          ─► authz ─► rate limit (per connection) ─► bytes to the app
//!   └ plaintext ─► Strict: refused, the app is never dialled
//!                  Permissive: the port's protocol (HTTP/1, HTTP/2, gRPC, opaque), else detected; no identity
//! ```
//!
//! How long the first bytes are awaited: a peer proxy always speaks first
//! (its ClientHello, sent as soon as TCP connects), so under Strict, and on
//! server-first ports (configured `opaque`, the server-first list,
//! `WEFT_OPAQUE_PORTS`), the wait is [`PEER_HELLO_TIMEOUT`]: a plaintext
//! client that waits for a banner is refused (Strict) or handed to the app
//! (Permissive) after that, not after the full detection timeout. Only a
//! plaintext client of a client-first port under Permissive gets the
//! detection timeout.
//!
//! The identity header is removed from every incoming request and set only
//! from a verified certificate, so the app can trust it.

pub mod authz;
pub mod ratelimit;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use weft_proxy_config::{MtlsMode, Protocol, ProxyConfig, mtls_mode, selector_matches};

use crate::connect::{acquire, send_request};
use crate::http::forward::{finish, prepare};
use crate::http::path::normalize_uri;
use crate::http::pool::{PoolKey, Version};
use crate::http::{Body, PEER_IDENTITY_HEADER, error_response, serve_connection};
use crate::metrics::{Direction, OpenConn};
use crate::net::{Prefixed, Stream};
use crate::outbound::detect::{Detected, SERVER_FIRST_PORTS, detect};
use crate::proxy::State;
use crate::snapshot::Snapshot;
use crate::tls::identity::spiffe_id_of;
use crate::tls::{Alpn, SpiffeId};
use authz::{Decision, authorize};
use ratelimit::Verdict;

/// How long a connection's first bytes are awaited when only a peer
/// proxy's ClientHello is worth waiting for (Strict, server-first ports).
pub const PEER_HELLO_TIMEOUT: Duration = Duration::from_secs(1);

/// The protocol of an inbound target port for this pod: the first
/// `inbound.ports` entry for `port` whose selector matches `labels`, else
/// detection.
pub fn port_protocol(
    config: &ProxyConfig,
    labels: &BTreeMap<String, String>,
    port: u16,
) -> Protocol {
    config
        .inbound
        .ports
        .iter()
        .find(|p| p.port == port && selector_matches(&p.selector, labels))
        .map_or(Protocol::Detect, |p| p.protocol)
}

/// How long to wait for the first bytes, and whether the client speaks
/// first: see the module doc.
fn first_bytes_wait(
    mode: MtlsMode,
    protocol: Protocol,
    server_first: bool,
    detect_timeout: Duration,
) -> Duration {
    let opaque = match protocol {
        Protocol::Opaque => true,
        Protocol::Detect => server_first,
        Protocol::Http1 | Protocol::Http2 | Protocol::Grpc => false,
    };
    if mode == MtlsMode::Strict || opaque {
        PEER_HELLO_TIMEOUT.min(detect_timeout)
    } else {
        detect_timeout
    }
}

/// Accepts captured inbound connections until shutdown.
pub async fn serve(state: Arc<State>, listener: TcpListener) {
    crate::outbound::accept_loop(state, listener, Direction::Inbound, |s, c, p| {
        Box::pin(handle(s, c, p))
    })
    .await;
}

async fn handle(state: Arc<State>, mut conn: TcpStream, peer: SocketAddr) {
    let _ = conn.set_nodelay(true);
    let dst = match state.net.inbound_orig_dst.original_dst(&conn) {
        Ok(d) => d,
        Err(e) => {
            state
                .metrics
                .error(Direction::Inbound, "original-destination");
            tracing::error!(%peer, error = %e, "cannot read the original destination of an inbound connection; was it redirected by weft-init?");
            return;
        }
    };
    if state.is_own_listener(dst) {
        state.metrics.error(Direction::Inbound, "loop");
        tracing::warn!(%peer, %dst, "refusing an inbound connection addressed to the proxy's own listener (loop)");
        return;
    }
    let Some(snap) = state.snapshot.load_full() else {
        state.metrics.error(Direction::Inbound, "not-ready");
        tracing::warn!(%peer, "inbound connection refused: no config/identity loaded yet");
        return;
    };
    let port = dst.port();
    let protocol = port_protocol(&snap.config, &state.settings.labels, port);
    let server_first =
        SERVER_FIRST_PORTS.contains(&port) || state.settings.opaque_ports.contains(&port);
    let mode = mtls_mode(&snap.config, &state.settings.labels, port);
    let wait = first_bytes_wait(mode, protocol, server_first, state.settings.detect_timeout);
    let (prefix, detected) = match detect(&mut conn, wait).await {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "client went away during detection");
            return;
        }
    };
    if detected == Detected::Tls {
        let _open = OpenConn::new(&state.metrics, Direction::Inbound, true);
        let acceptor = TlsAcceptor::from(snap.identity.server_config());
        let tls = match acceptor.accept(Prefixed::new(prefix, conn)).await {
            Ok(t) => t,
            Err(e) => {
                state.metrics.error(Direction::Inbound, "tls");
                tracing::warn!(%peer, error = %e, "inbound mTLS handshake failed; the client must be a weft proxy with a current certificate from this mesh's CA");
                return;
            }
        };
        let (_, session) = tls.get_ref();
        let alpn = session.alpn_protocol().and_then(Alpn::from_id);
        let id = session
            .peer_certificates()
            .and_then(|c| c.first())
            .map(spiffe_id_of);
        let id = match id {
            Some(Ok(id)) => id,
            _ => {
                state.metrics.error(Direction::Inbound, "identity");
                tracing::warn!(%peer, "inbound mTLS peer has no SPIFFE identity");
                return;
            }
        };
        match alpn {
            Some(Alpn::Http1) => serve_http(state, snap, port, Some(id), Version::Http1, tls).await,
            Some(Alpn::Http2) => serve_http(state, snap, port, Some(id), Version::Http2, tls).await,
            Some(Alpn::Tcp) | None => {
                to_app_tcp(&state, &snap, port, Some(&id), Bytes::new(), tls).await
            }
        }
        return;
    }
    let _open = OpenConn::new(&state.metrics, Direction::Inbound, false);
    if mode == MtlsMode::Strict {
        state.metrics.error(Direction::Inbound, "plaintext-refused");
        tracing::warn!(%peer, port, "plaintext connection refused: mTLS mode is Strict; send through a weft proxy or set the mesh to Permissive");
        if detected == Detected::Http1 {
            let mut conn = conn;
            let _ = conn
                .write_all(b"HTTP/1.1 403 Forbidden\r\nx-weft-error: plaintext-refused\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
        }
        return;
    }
    let conn = Prefixed::new(prefix, conn);
    // The port's declared protocol wins over what the bytes look like.
    let version = match (protocol, detected) {
        (Protocol::Http1, _) | (Protocol::Detect, Detected::Http1) => Some(Version::Http1),
        (Protocol::Http2 | Protocol::Grpc, _) | (Protocol::Detect, Detected::Http2) => {
            Some(Version::Http2)
        }
        _ => None,
    };
    match version {
        Some(v) => serve_http(state, snap, port, None, v, conn).await,
        None => to_app_tcp(&state, &snap, port, None, Bytes::new(), conn).await,
    }
}

async fn to_app_tcp<I>(
    state: &State,
    snap: &Snapshot,
    port: u16,
    id: Option<&SpiffeId>,
    prefix: Bytes,
    client: I,
) where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let r = authz::Request {
        identity: id,
        port,
        method: None,
        path: None,
    };
    if let Decision::Deny(why) = authorize(&snap.config, &state.settings.labels, &r) {
        state.metrics.error(Direction::Inbound, "denied");
        tracing::warn!(peer = ?id.map(SpiffeId::as_str), port, %why, "inbound connection denied");
        return;
    }
    report_audit(state, snap, &r);
    if let Verdict::Limited { name, retry_after } =
        state
            .inbound_limits
            .check(&snap.config, &state.settings.labels, port)
    {
        state.metrics.error(Direction::Inbound, "rate-limited");
        tracing::warn!(peer = ?id.map(SpiffeId::as_str), port, limit = %name, ?retry_after, "inbound connection refused by a rate limit");
        return;
    }
    let addr = SocketAddr::new(state.settings.app_host, port);
    let up = match tokio::time::timeout(
        state.settings.connect_timeout,
        state.net.dialer.connect(addr),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            state.metrics.error(Direction::Inbound, "connect");
            tracing::warn!(%addr, error = %e, "the app does not accept connections on this port; is it listening on 127.0.0.1/0.0.0.0?");
            return;
        }
        Err(_) => {
            state.metrics.error(Direction::Inbound, "connect-timeout");
            return;
        }
    };
    let mut client = Prefixed::new(prefix, client);
    let mut up = Stream::Plain(up);
    let labels = &state.settings.labels;
    let revoked = until_revoked(state, |snap| connection_revoked(snap, labels, port, id));
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut up) => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "inbound tcp stream ended with error");
            }
        }
        why = revoked => {
            state.metrics.error(Direction::Inbound, "revoked");
            tracing::warn!(peer = ?id.map(SpiffeId::as_str), port, %why, "open inbound connection closed: the new config no longer allows it");
        }
    }
}

/// Counts and logs an allowed request or connection that Audit-mode
/// policies would refuse (`weft_proxy_authz_audit_total{policy}`).
fn report_audit(state: &State, snap: &Snapshot, r: &authz::Request<'_>) {
    let Some(policies) = authz::audit(&snap.config, &state.settings.labels, r) else {
        return;
    };
    for policy in &policies {
        state
            .metrics
            .authz_audit
            .get_or_create(&crate::metrics::AuditLabels {
                policy: policy.clone(),
            })
            .inc();
    }
    tracing::warn!(
        peer = r.identity.map_or("-", SpiffeId::as_str),
        port = r.port,
        method = r.method.unwrap_or("-"),
        path = r.path.unwrap_or("-"),
        policies = %policies.join(","),
        audit = true,
        "allowed, but enforcing these Audit-mode AccessPolicies would refuse it"
    );
}

/// Why an open opaque connection from `id` to `port` may no longer be
/// served under `snap`: plaintext while the mode is now Strict, or a
/// policy that now denies it.
fn connection_revoked(
    snap: &Snapshot,
    labels: &BTreeMap<String, String>,
    port: u16,
    id: Option<&SpiffeId>,
) -> Option<String> {
    plaintext_revoked(snap, labels, port, id).or_else(|| {
        let r = authz::Request {
            identity: id,
            port,
            method: None,
            path: None,
        };
        match authorize(&snap.config, labels, &r) {
            Decision::Deny(why) => Some(why),
            Decision::Allow => None,
        }
    })
}

/// Why a plaintext connection to `port` may no longer be served: the mode
/// of the port (mesh, namespace, workload or port) is Strict.
fn plaintext_revoked(
    snap: &Snapshot,
    labels: &BTreeMap<String, String>,
    port: u16,
    id: Option<&SpiffeId>,
) -> Option<String> {
    (id.is_none() && mtls_mode(&snap.config, labels, port) == MtlsMode::Strict)
        .then(|| format!("plaintext while the mTLS mode of port {port} is Strict"))
}

/// Resolves, with the reason, once the active snapshot revokes an open
/// connection (`revoked` says why it may not be served); checked against
/// the snapshot active now, then at every reload. Never resolves
/// otherwise.
async fn until_revoked(state: &State, revoked: impl Fn(&Snapshot) -> Option<String>) -> String {
    // Subscribe first: a reload between the connection's own check and
    // this one is not missed.
    let mut changes = state.snapshot_changes();
    loop {
        if let Some(why) = state.snapshot.load_full().and_then(|s| revoked(&s)) {
            return why;
        }
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

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
    version: Version,
}

impl Ctx {
    /// The active snapshot.
    fn current(&self) -> Arc<Snapshot> {
        self.state
            .snapshot
            .load_full()
            .unwrap_or_else(|| self.snap.clone())
    }
}

async fn serve_http<I>(
    state: Arc<State>,
    snap: Arc<Snapshot>,
    port: u16,
    peer: Option<SpiffeId>,
    version: Version,
    io: I,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer_is_none = peer.is_none();
    let ctx = Arc::new(Ctx {
        state: state.clone(),
        snap,
        port,
        peer,
        version,
    });
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move {
            let resp = proxy(&ctx, req).await;
            ctx.state
                .metrics
                .request(Direction::Inbound, resp.status().as_u16());
            Ok::<_, Infallible>(resp)
        }
    });
    let plaintext = peer_is_none;
    let revoked = async {
        if plaintext {
            let labels = &state.settings.labels;
            let why =
                until_revoked(&state, |snap| plaintext_revoked(snap, labels, port, None)).await;
            state.metrics.error(Direction::Inbound, "revoked");
            tracing::warn!(port, %why, "open plaintext connection closed");
        } else {
            std::future::pending::<()>().await;
        }
    };
    serve_connection(&state, io, version, Direction::Inbound, svc, revoked).await;
}

async fn proxy(ctx: &Ctx, mut req: Request<Incoming>) -> Response<Body> {
    let state = &ctx.state;
    let snap = ctx.current();
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
    report_audit(state, &snap, &r);
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
    if let Some(id) = &ctx.peer
        && let Ok(v) = HeaderValue::from_str(id.as_str())
    {
        req.headers_mut().insert(PEER_IDENTITY_HEADER, v);
    }
    let key = PoolKey {
        addr: SocketAddr::new(state.settings.app_host, ctx.port),
        identity: None,
        version: ctx.version,
    };
    let pool = state.inbound_pools.get(&key);
    let prepared = prepare(req, ctx.version);
    let result = match acquire(
        state,
        &snap,
        &pool,
        &key,
        false,
        state.settings.connect_timeout,
        None,
    )
    .await
    {
        Ok((sender, fresh)) => {
            send_request(state, &snap, &pool, &key, sender, fresh, prepared.request)
                .await
                .map(|resp| finish(resp, prepared.client_upgrade))
        }
        Err(e) => Err(e.into()),
    };
    result.unwrap_or_else(|e| {
        let (status, step) = match &e {
            crate::connect::SendError::Connect(c) => (c.status(), c.step()),
            // The client's body failed (a malformed chunk), not the app.
            crate::connect::SendError::Upstream { source, .. }
                if crate::http::client_body_error(source).is_some() =>
            {
                (StatusCode::BAD_REQUEST, "bad-request")
            }
            crate::connect::SendError::Upstream { .. } => (StatusCode::BAD_GATEWAY, "app"),
        };
        state.metrics.error(Direction::Inbound, step);
        tracing::warn!(error = %e, "forwarding to the app failed");
        error_response(
            status,
            step,
            &format!("{e} (the local app on port {})", ctx.port),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proxy_config::{Inbound, InboundPort};

    #[test]
    fn strict_and_server_first_ports_wait_only_for_a_peer_hello() {
        let long = Duration::from_secs(3600);
        let w = |mode, protocol, server_first| first_bytes_wait(mode, protocol, server_first, long);
        for p in [
            Protocol::Detect,
            Protocol::Http1,
            Protocol::Http2,
            Protocol::Grpc,
            Protocol::Opaque,
        ] {
            assert_eq!(w(MtlsMode::Strict, p, false), PEER_HELLO_TIMEOUT, "{p:?}");
        }
        assert_eq!(
            w(MtlsMode::Permissive, Protocol::Opaque, false),
            PEER_HELLO_TIMEOUT
        );
        assert_eq!(
            w(MtlsMode::Permissive, Protocol::Detect, true),
            PEER_HELLO_TIMEOUT
        );
        assert_eq!(w(MtlsMode::Permissive, Protocol::Detect, false), long);
        // A declared HTTP port is client-first even on a "server-first" number.
        assert_eq!(w(MtlsMode::Permissive, Protocol::Http1, true), long);
        // Never longer than the configured detection timeout.
        assert_eq!(
            first_bytes_wait(
                MtlsMode::Strict,
                Protocol::Detect,
                false,
                Duration::from_millis(5)
            ),
            Duration::from_millis(5)
        );
    }

    #[test]
    fn port_protocol_follows_the_selector() {
        let c = ProxyConfig {
            version: 1,
            generation: 1,
            hash: String::new(),
            namespace: "shop".into(),
            mesh: weft_proxy_config::MeshSettings {
                trust_domain: "cluster.local".into(),
                mtls_mode: MtlsMode::Permissive,
                default_access: Default::default(),
                access_log: false,
                tracing: None,
                escaped_slashes: Default::default(),
            },
            services: vec![],
            inbound: Inbound {
                ports: vec![
                    InboundPort {
                        selector: [("app".to_owned(), "db".to_owned())].into(),
                        port: 5432,
                        protocol: Protocol::Opaque,
                    },
                    InboundPort {
                        selector: [("app".to_owned(), "web".to_owned())].into(),
                        port: 8080,
                        protocol: Protocol::Http2,
                    },
                ],
                ..Default::default()
            },
        };
        let web: BTreeMap<String, String> = [("app".to_owned(), "web".to_owned())].into();
        assert_eq!(port_protocol(&c, &web, 8080), Protocol::Http2);
        assert_eq!(port_protocol(&c, &web, 5432), Protocol::Detect);
        assert_eq!(port_protocol(&c, &web, 9090), Protocol::Detect);
    }
}
