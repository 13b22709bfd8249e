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
//!
//! This file is the listener (accept, mTLS, detection, opaque TCP);
//! [`requests`] serves HTTP requests; [`policy`] holds the decisions both take
//! on the active snapshot (revocation, audit reports) over the pure
//! evaluation of [`authz`]. In: connections on :15006. Out: requests and
//! bytes to the app on loopback (`client::connect`).

pub mod authz;
pub mod policy;
pub mod requests;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use weft_proxy_config::{MtlsMode, Protocol, ProxyConfig, mtls_mode, selector_matches};

use crate::accesslog::TcpEntry;
use crate::http::pool::Version;
use crate::metrics::traffic::{CallLabels, Reporter};
use crate::metrics::{Direction, OpenConn};
use crate::net::detect::{Detected, SERVER_FIRST_PORTS, detect};
use crate::net::listen::{Serving, accept_loop, staged};
use crate::net::{BoxFuture, Prefixed, Stream};
use crate::ratelimit::Verdict;
use crate::snapshot::Snapshot;
use crate::state::State;
use crate::tls::spiffe_id_of;
use crate::tls::{Alpn, SpiffeId};
use authz::{Decision, authorize};
use policy::{connection_revoked, report_audit, until_revoked};
use requests::serve_http;

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
    let shutdown = state.shutdown_signal();
    accept_loop(listener, Direction::Inbound, shutdown, |conn, peer| {
        state.spawn_drained(handle(state.clone(), conn, peer));
    })
    .await;
}

/// One captured connection: its prelude (original destination, detection,
/// the mTLS handshake) runs in an allocation of its own ([`staged`]); an
/// idle plaintext HTTP/1 connection's task holds the HTTP server's state
/// alone, a peer's connection its boxed session.
fn handle(state: Arc<State>, conn: TcpStream, peer: SocketAddr) -> impl Future<Output = ()> + Send {
    staged(prelude(state, conn, peer))
}

/// Decides what serves a connection, counting it open from the moment it
/// is known not to be a loop and a snapshot is loaded; `None` when
/// nothing does (refused, or the client went away).
async fn prelude(
    state: Arc<State>,
    mut conn: TcpStream,
    peer: SocketAddr,
) -> Option<(OpenConn, Serving<impl Future<Output = ()> + Send + use<>>)> {
    let _ = conn.set_nodelay(true);
    let dst = match state.net.inbound_orig_dst.original_dst(&conn) {
        Ok(d) => d,
        Err(e) => {
            state
                .metrics
                .error(Direction::Inbound, "original-destination");
            tracing::error!(%peer, error = %e, "cannot read the original destination of an inbound connection; was it redirected by weft-init?");
            return None;
        }
    };
    if state.is_own_listener(dst) {
        state.metrics.error(Direction::Inbound, "loop");
        tracing::warn!(%peer, %dst, "refusing an inbound connection addressed to the proxy's own listener (loop)");
        return None;
    }
    let Some(snap) = state.snapshot.load_full() else {
        state.metrics.error(Direction::Inbound, "not-ready");
        tracing::warn!(%peer, "inbound connection refused: no config/identity loaded yet");
        return None;
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
            return None;
        }
    };
    if detected == Detected::Tls {
        let open = OpenConn::new(&state.metrics, Direction::Inbound, true);
        let acceptor = TlsAcceptor::from(snap.identity.server_config());
        // Boxed: rustls' connection state is large, and the HTTP/1 server
        // moves its connection into and out of each request's state.
        let tls = match acceptor.accept(Prefixed::new(prefix, conn)).await {
            Ok(t) => Box::new(t),
            Err(e) => {
                state.metrics.error(Direction::Inbound, "tls");
                tracing::warn!(%peer, error = %e, "inbound mTLS handshake failed; the client must be a weft proxy with a current certificate from this mesh's CA");
                return None;
            }
        };
        let (_, session) = tls.get_ref();
        state
            .metrics
            .handshake(Direction::Inbound, session.handshake_kind());
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
                return None;
            }
        };
        // (what the peer speaks, what the app speaks)
        let http = match alpn {
            Some(Alpn::Http1) => Some((Version::Http1, Version::Http1)),
            Some(Alpn::Http2) => Some((Version::Http2, Version::Http2)),
            Some(Alpn::Mux) => Some((Version::Http2, Version::Http1)),
            Some(Alpn::Tcp) | None => None,
        };
        // A peer's connection is boxed whole: its TLS session is large
        // whatever the protocol.
        let serving: BoxFuture<'static, ()> = match http {
            Some((wire, app)) => Box::pin(serve_http(
                state,
                snap,
                port,
                Some(id),
                wire,
                app,
                Prefixed::new(Bytes::new(), tls),
            )),
            None => Box::pin(async move {
                to_app_tcp(&state, &snap, port, Some(&id), Bytes::new(), tls).await;
            }),
        };
        return Some((open, Either::Right(serving)));
    }
    let open = OpenConn::new(&state.metrics, Direction::Inbound, false);
    if mode == MtlsMode::Strict {
        state.metrics.error(Direction::Inbound, "plaintext-refused");
        tracing::warn!(%peer, port, "plaintext connection refused: mTLS mode is Strict; send through a weft proxy or set the mesh to Permissive");
        if detected == Detected::Http1 {
            crate::net::close_after_answer(
                conn,
                b"HTTP/1.1 403 Forbidden\r\nx-weft-error: plaintext-refused\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .await;
        }
        return None;
    }
    // The port's declared protocol wins over what the bytes look like.
    let version = match (protocol, detected) {
        (Protocol::Http1, _) | (Protocol::Detect, Detected::Http1) => Some(Version::Http1),
        (Protocol::Http2 | Protocol::Grpc, _) | (Protocol::Detect, Detected::Http2) => {
            Some(Version::Http2)
        }
        _ => None,
    };
    let serving = match version {
        Some(v) => Either::Left(serve_http(
            state,
            snap,
            port,
            None,
            v,
            v,
            Prefixed::new(prefix, conn),
        )),
        None => Either::Right(Box::pin(async move {
            to_app_tcp(
                &state,
                &snap,
                port,
                None,
                Bytes::new(),
                Prefixed::new(prefix, conn),
            )
            .await;
        }) as BoxFuture<'static, ()>),
    };
    Some((open, serving))
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
    let (start, began) = (std::time::SystemTime::now(), std::time::Instant::now());
    let addr = SocketAddr::new(state.settings.app_host, port);
    // Traffic metrics: the caller is known by its principal only (no
    // request headers on an opaque stream).
    let series = |step: Option<&'static str>| {
        let labels = CallLabels {
            reporter: Reporter::Destination,
            source: requests::caller(id, None),
            destination: state.local_peer(snap),
            service: requests::serving_service(snap, state.settings.pod_ip, port),
            route: None,
            mtls: id.is_some(),
        };
        state
            .metrics
            .traffic
            .tcp(&labels, step, snap.config.mesh.metrics_naming)
    };
    let plan = state.access_log_plan(snap);
    let log = |bytes: Option<(u64, u64)>, failed_step: Option<&'static str>| {
        if bytes.is_none()
            && let Some(step) = failed_step.filter(|s| *s != "revoked")
        {
            let refused = series(Some(step));
            refused.opened();
            refused.closed(0, 0);
        }
        if let Some(plan) = plan {
            state.access_log.record_tcp(
                &TcpEntry {
                    direction: Direction::Inbound,
                    start,
                    duration: began.elapsed(),
                    upstream: Some(addr),
                    source_principal: id.map(SpiffeId::as_str),
                    destination_principal: Some(snap.identity.id().as_str()),
                    destination_service: None,
                    bytes,
                    failed_step,
                },
                plan,
            );
        }
    };
    let r = authz::Request {
        identity: id,
        port,
        method: None,
        path: None,
    };
    if let Decision::Deny(why) = authorize(&snap.config, &state.settings.labels, &r) {
        state.metrics.error(Direction::Inbound, "denied");
        tracing::warn!(peer = ?id.map(SpiffeId::as_str), port, %why, "inbound connection denied");
        log(None, Some("denied"));
        return;
    }
    let _ = report_audit(state, snap, &r);
    if let Verdict::Limited { name, retry_after } =
        state
            .inbound_limits
            .check(&snap.config, &state.settings.labels, port)
    {
        state.metrics.error(Direction::Inbound, "rate-limited");
        tracing::warn!(peer = ?id.map(SpiffeId::as_str), port, limit = %name, ?retry_after, "inbound connection refused by a rate limit");
        log(None, Some("rate-limited"));
        return;
    }
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
            log(None, Some("connect"));
            return;
        }
        Err(_) => {
            state.metrics.error(Direction::Inbound, "connect-timeout");
            log(None, Some("connect-timeout"));
            return;
        }
    };
    let connected = series(None);
    connected.opened();
    let mut client = Prefixed::new(prefix, client);
    let mut up = Stream::Plain(up);
    let labels = &state.settings.labels;
    let revoked = until_revoked(state, |snap| connection_revoked(snap, labels, port, id));
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut up) => match r {
            Ok(bytes) => {
                connected.closed(bytes.1, bytes.0);
                log(Some(bytes), None);
            }
            Err(e) => {
                tracing::debug!(error = %e, "inbound tcp stream ended with error");
                connected.closed(0, 0);
                log(None, None);
            }
        },
        why = revoked => {
            connected.closed(0, 0);
            state.metrics.error(Direction::Inbound, "revoked");
            tracing::warn!(peer = ?id.map(SpiffeId::as_str), port, %why, "open inbound connection closed: the new config no longer allows it");
            log(None, Some("revoked"));
        }
    }
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
            gateway: None,
            version: 1,
            generation: 1,
            hash: String::new(),
            namespace: "shop".into(),
            mesh: weft_proxy_config::MeshSettings {
                trust_domain: "cluster.local".into(),
                mtls_mode: MtlsMode::Permissive,
                default_access: Default::default(),
                access_log: false,
                access_log_options: Default::default(),
                tracing: None,
                escaped_slashes: Default::default(),
                metrics_naming: Default::default(),
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
