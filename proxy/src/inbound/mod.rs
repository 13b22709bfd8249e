//! Inbound: traffic for the app, captured on :15006.
//!
//! ```text
//! accept ─► original destination (the app port) ─► detect first bytes
//!   ├ TLS ─► mTLS handshake (client cert verified against the bundle, SPIFFE ID read)
//!   │        ─► ALPN: weft/h1 | weft/h2 ─► per request: authz ─► x-weft-peer-identity ─► app 127.0.0.1:port
//!   │                 weft/tcp          ─► authz once ─► bytes to the app
//!   └ plaintext ─► Strict: refused │ Permissive: HTTP/1, HTTP/2 or opaque to the app, no identity
//! ```
//!
//! The identity header is removed from every incoming request and set only
//! from a verified certificate, so the app can trust it.

pub mod authz;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use weft_proxy_config::MtlsMode;

use crate::connect::{acquire, send_request};
use crate::http::forward::{finish, prepare};
use crate::http::pool::{PoolKey, Version};
use crate::http::{Body, PEER_IDENTITY_HEADER, error_response, serve_connection};
use crate::metrics::{Direction, OpenConn};
use crate::net::{Prefixed, Stream};
use crate::outbound::detect::{Detected, detect};
use crate::proxy::State;
use crate::snapshot::Snapshot;
use crate::tls::identity::spiffe_id_of;
use crate::tls::{Alpn, SpiffeId};
use authz::{Decision, authorize};

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
    let (prefix, detected) = match detect(&mut conn, state.settings.detect_timeout).await {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "client went away during detection");
            return;
        }
    };
    let port = dst.port();
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
    if snap.config.mesh.mtls_mode == MtlsMode::Strict {
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
    match detected {
        Detected::Http1 => serve_http(state, snap, port, None, Version::Http1, conn).await,
        Detected::Http2 => serve_http(state, snap, port, None, Version::Http2, conn).await,
        _ => to_app_tcp(&state, &snap, port, None, Bytes::new(), conn).await,
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
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut up).await {
        tracing::debug!(error = %e, "inbound tcp stream ended with error");
    }
}

struct Ctx {
    state: Arc<State>,
    snap: Arc<Snapshot>,
    port: u16,
    peer: Option<SpiffeId>,
    version: Version,
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
    serve_connection(&state, io, version, svc).await;
}

async fn proxy(ctx: &Ctx, mut req: Request<Incoming>) -> Response<Body> {
    let state = &ctx.state;
    req.headers_mut().remove(PEER_IDENTITY_HEADER);
    let r = authz::Request {
        identity: ctx.peer.as_ref(),
        port: ctx.port,
        method: Some(req.method().as_str()),
        path: Some(req.uri().path()),
    };
    if let Decision::Deny(why) = authorize(&ctx.snap.config, &state.settings.labels, &r) {
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
    let result = match acquire(state, &ctx.snap, &pool, &key, false).await {
        Ok((sender, fresh)) => send_request(
            state,
            &ctx.snap,
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
    result.unwrap_or_else(|e| {
        let (status, step) = match &e {
            crate::connect::SendError::Connect(c) => (c.status(), c.step()),
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
