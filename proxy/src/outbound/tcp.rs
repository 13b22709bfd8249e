//! Opaque TCP: bytes copied both ways, to the original destination
//! (unknown destinations) or to a balanced endpoint of a known Service
//! (mTLS with ALPN `weft/tcp` when the endpoint is meshed). A TCP route of
//! the Service port picks the backend (Service, subset) per connection by
//! weight.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::accesslog::TcpEntry;
use crate::client::balance::attempt_order;
use crate::client::connect::{ConnectError, Gate, connect, connect_timeout};
use crate::metrics::Direction;
use crate::metrics::traffic::{CallLabels, Peer, Reporter, TcpSeries};
use crate::net::{Prefixed, Stream};
use crate::snapshot::{ServiceRef, Snapshot, endpoint_port};
use crate::state::State;
use crate::tls::{Alpn, SpiffeId};

use crate::snapshot::dest::{Dest, resolve};
use weft_proxy_config::Endpoint;

/// Forwards to `dst` itself, untouched.
pub async fn passthrough(state: &State, client: TcpStream, prefix: Bytes, dst: SocketAddr) {
    match tokio::time::timeout(
        state.settings.connect_timeout,
        state.net.dialer.connect(dst),
    )
    .await
    {
        Ok(Ok(up)) => {
            let _ = splice(client, prefix, Stream::Plain(up)).await;
        }
        Ok(Err(e)) => {
            state.metrics.error(Direction::Outbound, "connect");
            tracing::warn!(%dst, error = %e, "passthrough connect failed; the destination is not in the mesh config, check that it is reachable");
        }
        Err(_) => {
            state.metrics.error(Direction::Outbound, "connect-timeout");
            tracing::warn!(%dst, "passthrough connect timed out");
        }
    }
}

/// Forwards to an endpoint of the Service behind `dst` (of the backend its
/// TCP route picks); to the original destination (or the backend Service's
/// ClusterIP) when the config lists no endpoints.
pub async fn to_service(
    state: Arc<State>,
    snap: Arc<Snapshot>,
    target: ServiceRef,
    client: TcpStream,
    prefix: Bytes,
    dst: SocketAddr,
) {
    let (start, began, log) = (
        std::time::SystemTime::now(),
        std::time::Instant::now(),
        state.access_log_plan(&snap),
    );
    let (_, routed_port) = snap.service(target);
    let backend = snap
        .routes
        .tcp(target, routed_port.port)
        .and_then(|b| b.pick_resolved(&mut rand::rng()));
    let dest = match resolve(&snap.config, &snap.routes, target, backend, dst) {
        Ok(d) => d,
        Err(e) => {
            state.metrics.error(Direction::Outbound, "route-backend");
            tracing::error!(%dst, error = %e, "TCP route backend cannot be resolved; closing the connection");
            return;
        }
    };
    if dest.endpoints.is_empty() {
        match dest.fallback {
            Some(addr) => {
                tracing::debug!(%dst, %addr, "no endpoints in config; falling back to the original destination or the backend's ClusterIP");
                return passthrough(&state, client, prefix, addr).await;
            }
            None => {
                state.metrics.error(Direction::Outbound, "no-endpoint");
                refused(&state, &snap, &dest, "no-endpoint");
                tracing::warn!(%dst, service = %dest.service.key(), subset = dest.subset.unwrap_or(""), "the routed subset has no ready endpoint; closing the connection");
                return;
            }
        }
    }
    // connectionPool.maxConnections: over it, the connection is refused.
    let slot = match Gate::of(&state.conn_limits, &dest) {
        Some(g) => match g
            .limits
            .of(dest.key)
            .reserve_now(
                g.max_connections,
                connect_timeout(state.settings.connect_timeout, &dest.service.policy),
            )
            .await
        {
            Some(slot) => Some(slot),
            None => {
                state.metrics.error(Direction::Outbound, "overflow");
                refused(&state, &snap, &dest, "overflow");
                tracing::warn!(%dst, service = %dest.service.key(), max = g.max_connections, "connection refused: the Service has its connectionPool.maxConnections open");
                return;
            }
        },
        None => None,
    };
    let key = client.peer_addr().ok().map(|a| a.ip().to_string());
    let order = attempt_order(
        &state.outliers,
        &state.outbound_pools,
        || state.next_rr(),
        &dest,
        key.as_deref(),
    );
    let mut last: Option<ConnectError> = None;
    for i in order {
        let ep = dest.endpoints.get(i);
        let addr = SocketAddr::new(ep.address, endpoint_port(ep, dest.port));
        let id = dest.endpoints.identity(i);
        let deadline = connect_timeout(state.settings.connect_timeout, &dest.service.policy);
        match connect(state.connector(&snap), addr, id, Alpn::Tcp, deadline).await {
            Ok(up) => {
                state.outliers.restore(addr);
                let series = tcp_series(&state, &snap, &dest, Some(ep), None);
                series.opened();
                let bytes = splice(client, prefix, up).await;
                drop(slot);
                let (received, sent) = bytes.unwrap_or_default();
                series.closed(sent, received);
                if let Some(plan) = log {
                    state.access_log.record_tcp(
                        &TcpEntry {
                            direction: Direction::Outbound,
                            start,
                            duration: began.elapsed(),
                            upstream: Some(addr),
                            source_principal: Some(snap.identity.id().as_str()),
                            destination_principal: id.map(SpiffeId::as_str),
                            destination_service: Some(&format!(
                                "{}.{}",
                                dest.service.name, dest.service.namespace
                            )),
                            bytes,
                            failed_step: None,
                        },
                        plan,
                    );
                }
                return;
            }
            Err(e) => {
                state.metrics.error(Direction::Outbound, e.step());
                if e.ejects_endpoint() {
                    state.outliers.eject(addr, tokio::time::Instant::now());
                }
                tracing::warn!(error = %e, pod = ep.pod.as_deref().unwrap_or("-"), "endpoint attempt failed; trying another");
                last = Some(e);
            }
        }
    }
    if let Some(e) = last {
        tracing::error!(%dst, error = %e, "no endpoint of the service accepted the connection");
        refused(&state, &snap, &dest, e.step());
        if let Some(plan) = log {
            state.access_log.record_tcp(
                &TcpEntry {
                    direction: Direction::Outbound,
                    start,
                    duration: began.elapsed(),
                    upstream: None,
                    source_principal: Some(snap.identity.id().as_str()),
                    destination_principal: None,
                    destination_service: Some(&format!(
                        "{}.{}",
                        dest.service.name, dest.service.namespace
                    )),
                    bytes: None,
                    failed_step: Some(e.step()),
                },
                plan,
            );
        }
    }
}

/// The traffic metrics of connections to `ep` of `dest` (none: not
/// connected), ended at `step`.
fn tcp_series(
    state: &State,
    snap: &Snapshot,
    dest: &Dest<'_>,
    ep: Option<&Endpoint>,
    step: Option<&'static str>,
) -> Arc<TcpSeries> {
    let labels = CallLabels {
        reporter: Reporter::Source,
        source: state.local_peer(snap),
        destination: Peer::endpoint(ep, &dest.service.namespace),
        service: Some((dest.service.name.clone(), dest.service.namespace.clone())),
        route: None,
        mtls: ep.is_some_and(|e| e.meshed),
    };
    state
        .metrics
        .traffic
        .tcp(&labels, step, snap.config.mesh.metrics_naming)
}

/// Counts a connection the proxy closed without connecting it.
fn refused(state: &State, snap: &Snapshot, dest: &Dest<'_>, step: &'static str) {
    let series = tcp_series(state, snap, dest, None, Some(step));
    series.opened();
    series.closed(0, 0);
}

/// Copies both ways until both sides are done; the bytes each way, unless
/// the connection ended with an error.
async fn splice(client: TcpStream, prefix: Bytes, mut upstream: Stream) -> Option<(u64, u64)> {
    let mut client = Prefixed::new(prefix, client);
    let bytes = match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::debug!(error = %e, "tcp stream ended with error");
            None
        }
    };
    let _ = upstream.shutdown().await;
    bytes
}
