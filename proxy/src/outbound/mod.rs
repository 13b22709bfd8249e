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

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};
use weft_proxy_config::Protocol;

use crate::http::pool::Version;
use crate::metrics::{Direction, OpenConn};
use crate::net::Prefixed;
use crate::net::detect::{Detected, SERVER_FIRST_PORTS, detect};
use crate::net::listen::accept_loop;
use crate::state::State;

/// Accepts captured connections until shutdown.
pub async fn serve(state: Arc<State>, listener: TcpListener) {
    let shutdown = state.shutdown_signal();
    accept_loop(listener, Direction::Outbound, shutdown, |conn, peer| {
        state.spawn_drained(handle(state.clone(), conn, peer));
    })
    .await;
}

async fn handle(state: Arc<State>, conn: TcpStream, peer: SocketAddr) {
    let _ = conn.set_nodelay(true);
    let dst = match state.net.outbound_orig_dst.original_dst(&conn) {
        Ok(d) => d,
        Err(e) => {
            state
                .metrics
                .error(Direction::Outbound, "original-destination");
            tracing::error!(%peer, error = %e, "cannot read the original destination (SO_ORIGINAL_DST); was this connection redirected by weft-init's iptables rules?");
            return;
        }
    };
    if state.is_own_listener(dst) {
        state.metrics.error(Direction::Outbound, "loop");
        tracing::warn!(%peer, %dst, "refusing a connection addressed to the proxy's own listener (loop); check that weft-init excluded uid 1337 and the proxy ports");
        return;
    }
    let _open = OpenConn::new(&state.metrics, Direction::Outbound, false);
    let Some(snap) = state.snapshot.load_full() else {
        Box::pin(tcp::passthrough(&state, conn, Bytes::new(), dst)).await;
        return;
    };
    let Some(target) = snap.lookup(dst) else {
        Box::pin(tcp::passthrough(&state, conn, Bytes::new(), dst)).await;
        return;
    };
    let (_, port) = snap.service(target);
    // Boxed (here and for passthrough above): the connection's task is as
    // large as its largest branch, and an idle HTTP connection should not
    // carry the TCP forwarder's state.
    let opaque = |conn, prefix| {
        Box::pin(tcp::to_service(
            state.clone(),
            snap.clone(),
            target,
            conn,
            prefix,
            dst,
        ))
    };
    match port.protocol {
        Protocol::Opaque => opaque(conn, Bytes::new()).await,
        Protocol::Http1 => {
            http::serve(
                state.clone(),
                snap.clone(),
                target,
                dst,
                peer,
                Version::Http1,
                Prefixed::new(Bytes::new(), conn),
            )
            .await
        }
        Protocol::Http2 | Protocol::Grpc => {
            http::serve(
                state.clone(),
                snap.clone(),
                target,
                dst,
                peer,
                Version::Http2,
                Prefixed::new(Bytes::new(), conn),
            )
            .await
        }
        Protocol::Detect => {
            // The dialled port, and the Service port when a pod IP was
            // dialled (its target port may be anything).
            let server_first = |p: u16| {
                SERVER_FIRST_PORTS.contains(&p) || state.settings.opaque_ports.contains(&p)
            };
            if server_first(dst.port()) || server_first(port.port) {
                return opaque(conn, Bytes::new()).await;
            }
            let mut conn = conn;
            match detect(&mut conn, state.settings.detect_timeout).await {
                Ok((prefix, Detected::Http1)) => {
                    http::serve(
                        state.clone(),
                        snap.clone(),
                        target,
                        dst,
                        peer,
                        Version::Http1,
                        Prefixed::new(prefix, conn),
                    )
                    .await
                }
                Ok((prefix, Detected::Http2)) => {
                    http::serve(
                        state.clone(),
                        snap.clone(),
                        target,
                        dst,
                        peer,
                        Version::Http2,
                        Prefixed::new(prefix, conn),
                    )
                    .await
                }
                Ok((prefix, Detected::Tls | Detected::Opaque)) => opaque(conn, prefix).await,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "client went away during protocol detection")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Net, Settings};

    /// An app may hold thousands of connections to its sidecar open and
    /// idle; each one's task is as large as this future in every state.
    /// What it was: 1,608 bytes (debug build) while it nested `async fn`s
    /// that each kept their arguments beside what they moved them into;
    /// 712 with the shutdown future that borrows the state, 616 now.
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
            size <= 1024,
            "the outbound connection's future is {size} bytes"
        );
    }
}
