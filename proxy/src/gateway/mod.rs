//! Ingress gateway mode: a proxy whose `proxy.json` has a `gateway`
//! section listens on that section's ports, terminates TLS on HTTPS
//! listeners with the certificate the client's SNI selects (on TLS
//! passthrough listeners it only reads the SNI and forwards the connection
//! by its Service's TCP routes), and routes each request by its host to a
//! Service's routes, then on like any outbound
//! request (balancing, retries, timeouts, mTLS to meshed endpoints with its
//! own SPIFFE identity, metrics, logs and spans).
//!
//! ```text
//! snapshot.gateway ──► ports to bind (re-read at every reload)
//! accept :port ──► HTTPS: TLS (certs::SniResolver) ─┐
//!             ├──► HTTP: detect h1 / h2 ────────────┴─► outbound::http::serve_gateway
//!             └──► TLS passthrough: ClientHello SNI (sni) ─► outbound::tcp::to_service
//! ```
//!
//! A sidecar's document has no gateway section, and this task then binds
//! nothing. In: the active snapshot. Out: connections handed to
//! `outbound::http`.

pub mod certs;
pub mod sni;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use weft_proxy_config::ListenerProtocol;

use crate::http::pool::Version;
use crate::metrics::{Direction, OpenConn};
use crate::net::detect::{Detected, detect};
use crate::net::listen::{Serving, accept_loop, staged};
use crate::net::{BoxFuture, Prefixed};
use crate::state::State;
use certs::{CertStore, SniResolver};

/// How long a TLS client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a port that could not be bound is tried again.
const REBIND: Duration = Duration::from_secs(5);

/// Keeps the gateway's ports bound to what the active snapshot lists,
/// until shutdown.
pub async fn serve(state: Arc<State>) {
    let mut changes = state.snapshot_changes();
    let store = Arc::new(CertStore::new(state.settings.gateway_cert_dir.clone()));
    let mut bound: HashMap<u16, (ListenerProtocol, JoinHandle<()>)> = HashMap::new();
    let mut shutdown = state.shutdown_signal();
    loop {
        let want: BTreeMap<u16, ListenerProtocol> = state
            .snapshot
            .load()
            .as_ref()
            .and_then(|s| s.gateway.as_ref())
            .map(|g| g.ports().collect())
            .unwrap_or_default();
        bound.retain(|port, (protocol, task)| {
            let keep = want.get(port) == Some(protocol);
            if !keep {
                tracing::info!(port, "gateway listener closed");
                task.abort();
            }
            keep
        });
        let mut failed = false;
        for (port, protocol) in want {
            if bound.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(state.settings.gateway_ip, port);
            match crate::net::bind_listener(addr) {
                Ok(listener) => {
                    tracing::info!(%addr, ?protocol, "gateway listener bound");
                    let task = tokio::spawn(accept(
                        state.clone(),
                        store.clone(),
                        listener,
                        port,
                        protocol,
                    ));
                    bound.insert(port, (protocol, task));
                }
                Err(e) => {
                    failed = true;
                    state.metrics.error(Direction::Inbound, "gateway-bind");
                    tracing::error!(%addr, error = %e, "cannot bind a gateway listener; retrying");
                }
            }
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { break },
            () = tokio::time::sleep(REBIND), if failed => {}
            () = crate::net::listen::shutdown_requested(&mut shutdown) => break,
        }
    }
    for (_, (_, task)) in bound {
        task.abort();
    }
}

async fn accept(
    state: Arc<State>,
    store: Arc<CertStore>,
    listener: tokio::net::TcpListener,
    port: u16,
    protocol: ListenerProtocol,
) {
    let tls = match protocol {
        ListenerProtocol::Http | ListenerProtocol::Tls => None,
        ListenerProtocol::Https => {
            let resolver = Arc::new(SniResolver {
                state: state.clone(),
                store,
                port,
            });
            let mut cfg =
                rustls::ServerConfig::builder_with_provider(crate::tls::params::provider())
                    .with_safe_default_protocol_versions()
                    .map(|b| b.with_no_client_auth().with_cert_resolver(resolver));
            match &mut cfg {
                Ok(c) => c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()],
                Err(e) => {
                    tracing::error!(error = %e, "cannot build the gateway's TLS configuration");
                    return;
                }
            }
            cfg.ok().map(|c| TlsAcceptor::from(Arc::new(c)))
        }
    };
    let shutdown = state.shutdown_signal();
    accept_loop(listener, Direction::Inbound, shutdown, |conn, peer| {
        if protocol == ListenerProtocol::Tls {
            state.spawn_drained(passthrough(state.clone(), port, conn, peer));
        } else {
            state.spawn_drained(handle(state.clone(), tls.clone(), port, conn, peer));
        }
    })
    .await;
}

/// A TLS passthrough connection: routed by its ClientHello's SNI, then
/// forwarded untouched like any opaque outbound connection (TCP route,
/// balancing, mTLS to a meshed endpoint, TCP metrics and access log).
async fn passthrough(state: Arc<State>, port: u16, mut conn: TcpStream, peer: SocketAddr) {
    let _ = conn.set_nodelay(true);
    let Ok(local) = conn.local_addr() else { return };
    let _open = OpenConn::new(&state.metrics, Direction::Inbound, false);
    let (hello, name) =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, sni::read_client_hello(&mut conn)).await {
            Ok(Ok(read)) => read,
            Ok(Err(e)) => {
                state.metrics.error(Direction::Inbound, "gateway-tls");
                tracing::debug!(%peer, error = %e, "TLS passthrough: no ClientHello");
                return;
            }
            Err(_) => {
                state.metrics.error(Direction::Inbound, "gateway-tls");
                return;
            }
        };
    let Some(snap) = state.snapshot.load_full() else {
        return;
    };
    let routed = snap.gateway.as_ref().and_then(|g| {
        let (_, target) = g.route(port, name.as_deref())?;
        let (_, service_port) = snap.service(target);
        snap.routes.tcp(target, service_port.port).map(|_| target)
    });
    let Some(target) = routed else {
        state.metrics.error(Direction::Inbound, "gateway-no-route");
        tracing::debug!(%peer, port, sni = name.as_deref().unwrap_or(""), "TLS passthrough: no listener routes this server name; closing");
        return;
    };
    crate::outbound::tcp::to_service(state.clone(), snap, target, conn, hello, local).await;
}

/// One connection of an HTTP or HTTPS listener: its prelude (the TLS
/// handshake, or detection) runs in an allocation of its own
/// ([`staged`]); an idle plaintext HTTP/1 connection's task holds the HTTP
/// server's state alone, a TLS connection its boxed session.
fn handle(
    state: Arc<State>,
    tls: Option<TlsAcceptor>,
    port: u16,
    conn: TcpStream,
    peer: SocketAddr,
) -> impl Future<Output = ()> + Send {
    staged(prelude(state, tls, port, conn, peer))
}

/// Decides what serves a gateway connection; `None` when nothing does.
async fn prelude(
    state: Arc<State>,
    tls: Option<TlsAcceptor>,
    port: u16,
    mut conn: TcpStream,
    peer: SocketAddr,
) -> Option<(OpenConn, Serving<impl Future<Output = ()> + Send + use<>>)> {
    let _ = conn.set_nodelay(true);
    let local = conn.local_addr().ok()?;
    let open = OpenConn::new(&state.metrics, Direction::Inbound, false);
    let Some(acceptor) = tls else {
        let (prefix, version) = match detect(&mut conn, state.settings.detect_timeout).await {
            Ok((prefix, Detected::Http2)) => (prefix, Version::Http2),
            Ok((prefix, _)) => (prefix, Version::Http1),
            Err(_) => (Bytes::new(), Version::Http1),
        };
        let serving = crate::outbound::http::serve_gateway(
            state,
            port,
            local,
            peer,
            version,
            "http",
            Prefixed::new(prefix, conn),
        );
        return Some((open, Either::Left(serving)));
    };
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            state.metrics.error(Direction::Inbound, "gateway-tls");
            tracing::debug!(%peer, error = %e, "gateway TLS handshake failed");
            return None;
        }
        Err(_) => {
            state.metrics.error(Direction::Inbound, "gateway-tls");
            return None;
        }
    };
    let (_, session) = stream.get_ref();
    let version = match session.alpn_protocol() {
        Some(b"h2") => Version::Http2,
        _ => Version::Http1,
    };
    // Boxed whole, the TLS session with it: it is large whatever the
    // protocol, and the h1 server moves its connection in and out of each
    // request's state.
    let serving: BoxFuture<'static, ()> = Box::pin(crate::outbound::http::serve_gateway(
        state,
        port,
        local,
        peer,
        version,
        "https",
        Prefixed::new(Bytes::new(), Box::new(stream)),
    ));
    Some((open, Either::Right(serving)))
}
