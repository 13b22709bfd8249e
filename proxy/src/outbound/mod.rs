//! Outbound: traffic the app sends, captured on :15001.
//!
//! ```text
//! accept ─► original destination (SO_ORIGINAL_DST) ─► own listener? refuse (loop)
//!        ─► ClusterIP:port in config? ── no ─► tcp::passthrough (untouched)
//!                                      └ yes ─► protocol (config, server-first ports, else detect)
//!                                                 ├ HTTP/1, HTTP/2 ─► http::Outbound (per request: balance ─► pool ─► endpoint)
//!                                                 └ opaque ─► tcp::to_service (per connection: balance ─► endpoint)
//! ```

pub mod balance;
pub mod detect;
pub mod http;
pub mod tcp;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};
use weft_proxy_config::{Endpoint, LoadBalancer, Protocol};

use crate::http::pool::Version;
use crate::metrics::{Direction, OpenConn};
use crate::net::Prefixed;
use crate::proxy::State;
use crate::snapshot::{ServiceRef, Snapshot};
use detect::{Detected, SERVER_FIRST_PORTS, detect};

/// Accepts captured connections until shutdown.
pub async fn serve(state: Arc<State>, listener: TcpListener) {
    accept_loop(state, listener, Direction::Outbound, |s, c, p| {
        Box::pin(handle(s, c, p))
    })
    .await;
}

/// The accept loop both capture listeners share: each connection runs in
/// its own task holding a drain token.
pub(crate) async fn accept_loop<F>(
    state: Arc<State>,
    listener: TcpListener,
    direction: Direction,
    handler: F,
) where
    F: Fn(Arc<State>, TcpStream, SocketAddr) -> crate::net::BoxFuture<'static, ()>,
{
    let mut shutdown = state.shutdown_signal();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((conn, peer)) => {
                    let token = state.drain_token();
                    let fut = handler(state.clone(), conn, peer);
                    tokio::spawn(async move {
                        fut.await;
                        drop(token);
                    });
                }
                Err(e) => {
                    tracing::warn!(?direction, error = %e, "accept failed (file descriptor limit?)");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            },
            () = crate::proxy::shutdown_requested(&mut shutdown) => break,
        }
    }
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
        tcp::passthrough(&state, conn, Bytes::new(), dst).await;
        return;
    };
    let Some(target) = snap.lookup(dst) else {
        tcp::passthrough(&state, conn, Bytes::new(), dst).await;
        return;
    };
    let (_, port) = snap.service(target);
    let opaque =
        |conn, prefix| tcp::to_service(state.clone(), snap.clone(), target, conn, prefix, dst);
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
            if SERVER_FIRST_PORTS.contains(&dst.port())
                || state.settings.opaque_ports.contains(&dst.port())
            {
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

/// Ready, non-terminating endpoints of a Service, in config order.
pub(crate) fn live_endpoints(snap: &Snapshot, target: ServiceRef) -> Vec<&Endpoint> {
    let (svc, _) = snap.service(target);
    svc.endpoints.iter().filter(|e| !e.terminating).collect()
}

/// Endpoint attempt order: the balancer's pick first, then the others.
pub(crate) fn attempt_order(
    state: &State,
    snap: &Snapshot,
    target: ServiceRef,
    eps: &[&Endpoint],
    key: Option<&str>,
) -> Vec<usize> {
    let n = eps.len();
    if n == 0 {
        return Vec::new();
    }
    let (svc, port) = snap.service(target);
    let addr =
        |i: usize| SocketAddr::new(eps[i].address, crate::snapshot::endpoint_port(eps[i], port));
    let lb: &LoadBalancer = &svc.policy.load_balancer;
    let first = balance::pick(
        lb,
        n,
        |i| state.outbound_pools.load_of(addr(i)),
        state.next_rr(),
        key,
        |i| addr(i).to_string(),
        &mut rand::rng(),
    );
    (0..n).map(|k| (first + k) % n).collect()
}

/// Most endpoints tried for one request or connection.
pub(crate) const MAX_ATTEMPTS: usize = 3;
