//! Outbound: traffic the app sends, captured on :15001.
//!
//! ```text
//! accept ─► original destination (SO_ORIGINAL_DST) ─► own listener? refuse (loop)
//!        ─► ClusterIP:port in config? ── no ─► tcp::passthrough (untouched)
//!                                      └ yes ─► protocol (config, server-first ports, else detect)
//!                                                 ├ HTTP/1, HTTP/2 ─► http (per request: route ─► backend ─► balance ─► pool ─► endpoint)
//!                                                 └ opaque ─► tcp::to_service (per connection: TCP route ─► backend ─► balance ─► endpoint)
//! ```
//!
//! The routes of the snapshot (`snapshot::routes`) decide which backend
//! (Service, subset, port) a request or connection goes to; the client
//! policy (`client`) picks one of that backend's endpoints and keeps
//! endpoints that just refused or black-holed a connection out of the
//! choice for a while, so a deleted pod costs one failed attempt (retried
//! on another endpoint), not one per request, until kubelet delivers a
//! config without it. In: connections on :15001. Out: requests and bytes
//! to endpoints, or to the original destination untouched.
pub mod http;
pub mod tcp;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::either::Either;
use weft_proxy_config::Protocol;

use crate::http::pool::Version;
use crate::metrics::{Direction, OpenConn};
use crate::net::Prefixed;
use crate::net::detect::{Detected, SERVER_FIRST_PORTS, detect};
use crate::net::listen::{Serving, accept_loop, staged};
use crate::state::State;

/// Accepts captured connections until shutdown.
pub async fn serve(state: Arc<State>, listener: TcpListener) {
    let shutdown = state.shutdown_signal();
    accept_loop(listener, Direction::Outbound, shutdown, |conn, peer| {
        state.spawn_drained(handle(state.clone(), conn, peer));
    })
    .await;
}

/// One captured connection: its prelude runs in an allocation of its own
/// ([`staged`]); an idle HTTP/1 connection's task holds the HTTP server's
/// state alone.
fn handle(state: Arc<State>, conn: TcpStream, peer: SocketAddr) -> impl Future<Output = ()> + Send {
    staged(prelude(state, conn, peer))
}

/// Decides what serves a connection, counting it open from the moment it
/// is known not to be a loop; `None` when nothing does.
async fn prelude(
    state: Arc<State>,
    conn: TcpStream,
    peer: SocketAddr,
) -> Option<(OpenConn, Serving<impl Future<Output = ()> + Send + use<>>)> {
    let _ = conn.set_nodelay(true);
    let dst = match state.net.outbound_orig_dst.original_dst(&conn) {
        Ok(d) => d,
        Err(e) => {
            state
                .metrics
                .error(Direction::Outbound, "original-destination");
            tracing::error!(%peer, error = %e, "cannot read the original destination (SO_ORIGINAL_DST); was this connection redirected by weft-init's iptables rules?");
            return None;
        }
    };
    if state.is_own_listener(dst) {
        state.metrics.error(Direction::Outbound, "loop");
        tracing::warn!(%peer, %dst, "refusing a connection addressed to the proxy's own listener (loop); check that weft-init excluded uid 1337 and the proxy ports");
        return None;
    }
    let open = OpenConn::new(&state.metrics, Direction::Outbound, false);
    let passthrough = |state: Arc<State>, conn| -> Serving<_> {
        Either::Right(Box::pin(async move {
            tcp::passthrough(&state, conn, Bytes::new(), dst).await
        }))
    };
    let Some(snap) = state.snapshot.load_full() else {
        return Some((open, passthrough(state, conn)));
    };
    let Some(target) = snap.lookup(dst) else {
        return Some((open, passthrough(state, conn)));
    };
    let (_, port) = snap.service(target);
    // Boxed (as passthrough above): an idle HTTP connection's task should
    // not carry the TCP forwarder's state.
    let opaque = |conn, prefix| -> Serving<_> {
        Either::Right(Box::pin(tcp::to_service(
            state.clone(),
            snap.clone(),
            target,
            conn,
            prefix,
            dst,
        )))
    };
    let serving = match port.protocol {
        Protocol::Opaque => opaque(conn, Bytes::new()),
        Protocol::Http1 => Either::Left(http::serve(
            state.clone(),
            snap.clone(),
            target,
            dst,
            peer,
            Version::Http1,
            Prefixed::new(Bytes::new(), conn),
        )),
        Protocol::Http2 | Protocol::Grpc => Either::Left(http::serve(
            state.clone(),
            snap.clone(),
            target,
            dst,
            peer,
            Version::Http2,
            Prefixed::new(Bytes::new(), conn),
        )),
        Protocol::Detect => {
            // The dialled port, and the Service port when a pod IP was
            // dialled (its target port may be anything).
            let server_first = |p: u16| {
                SERVER_FIRST_PORTS.contains(&p) || state.settings.opaque_ports.contains(&p)
            };
            if server_first(dst.port()) || server_first(port.port) {
                return Some((open, opaque(conn, Bytes::new())));
            }
            let mut conn = conn;
            let (prefix, detected) = match detect(&mut conn, state.settings.detect_timeout).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "client went away during protocol detection");
                    return None;
                }
            };
            let version = match detected {
                Detected::Http1 => Version::Http1,
                Detected::Http2 => Version::Http2,
                Detected::Tls | Detected::Opaque => return Some((open, opaque(conn, prefix))),
            };
            Either::Left(http::serve(
                state.clone(),
                snap.clone(),
                target,
                dst,
                peer,
                version,
                Prefixed::new(prefix, conn),
            ))
        }
    };
    Some((open, serving))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Net, Settings};

    /// An app may hold thousands of connections to its sidecar open and
    /// idle; each one's task is as large as this future in every state,
    /// plus tokio's 96 bytes of task header and trailer, rounded up to
    /// 128-byte lines. At most 144 bytes (with the drain token and the
    /// stage's tag) keeps the task in two lines, 256 bytes. What it was:
    /// 1,608 bytes (debug build) while it nested `async fn`s that each kept
    /// their arguments beside what they moved them into; 616 with the
    /// prelude's locals (detection, lookups) and a 72-byte end signal in the
    /// task; 104 with a 16-byte end signal, 120 now that it keeps its waker.
    #[tokio::test]
    async fn an_outbound_connection_s_task_stays_small() {
        let dir = tempfile::tempdir().expect("dir");
        let state =
            Arc::new(State::new(Settings::new(dir.path().into()), Net::default(), vec![]).0);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let _client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (conn, peer) = listener.accept().await.expect("accept");
        let size = std::mem::size_of_val(&handle(state, conn, peer));
        assert!(
            size <= 144,
            "the outbound connection's future is {size} bytes"
        );
    }
}
