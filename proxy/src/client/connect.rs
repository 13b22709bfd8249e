//! Opening upstream connections: TCP with a deadline, then mTLS when the
//! upstream is a meshed endpoint, then (for HTTP) the hyper handshake,
//! under the Service's connection limits ([`super::limits`]). Every failure
//! is a [`ConnectError`] naming the step, the address and what an operator
//! should check.
//!
//! In: an endpoint address, its expected identity, a pool ([`Pool`]) and a
//! [`Connector`] (the dialer and the snapshot whose identity runs mTLS).
//! Out: a [`Sender`] for one request, or a plain/TLS [`Stream`] for opaque
//! TCP. Used by `outbound::http`, `outbound::tcp` and `inbound` (to the app).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::limits::{ConnLimits, Counted, Reserved};
use crate::http::pool::{Dial, Pool, PoolKey, Sender, Version};
use crate::metrics::Direction;
use crate::net::{Dialer, Stream};
use crate::snapshot::Snapshot;
use crate::snapshot::dest::Dest;
use crate::tls::IdentityError;
use crate::tls::{Alpn, verify::find_identity_mismatch};

/// An upstream connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect failed.
    #[error(
        "connect to {addr} failed: {source}; check that the pod behind it is running and listening on that port (stale endpoint?) and that no NetworkPolicy blocks it"
    )]
    Connect {
        /// Upstream.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// TCP connect or TLS handshake took too long.
    #[error(
        "connect to {addr} timed out; is the pod overloaded, or is a NetworkPolicy dropping packets?"
    )]
    Timeout {
        /// Upstream.
        addr: SocketAddr,
    },
    /// The TLS handshake failed.
    #[error(
        "mTLS handshake with {addr} failed: {source}; check that the peer runs a weft proxy with a certificate from this mesh's CA and that both trust bundles are current"
    )]
    Tls {
        /// Upstream.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The peer's certificate is valid but for another identity.
    #[error("mTLS to {addr}: {detail}")]
    IdentityMismatch {
        /// Upstream.
        addr: SocketAddr,
        /// Expected vs presented.
        detail: String,
    },
    /// Our own identity cannot make a client configuration.
    #[error("local identity unusable: {0}")]
    Identity(#[from] IdentityError),
    /// The Service is at its `connectionPool.maxConnections` and
    /// `maxPendingRequests` requests already wait for a connection.
    #[error(
        "{service} has {max_connections} connections open, its connectionPool.maxConnections, and {max_pending} requests waiting for one, its maxPendingRequests; this one was not sent"
    )]
    Overflow {
        /// The Service.
        service: String,
        /// Its maxConnections.
        max_connections: usize,
        /// Its maxPendingRequests.
        max_pending: usize,
    },
    /// The HTTP handshake failed.
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake {
        /// Upstream.
        addr: SocketAddr,
        /// Why.
        source: crate::http::BoxError,
    },
}

impl ConnectError {
    /// The step named in `x-weft-error` and the `errors` metric.
    pub fn step(&self) -> &'static str {
        match self {
            ConnectError::Connect { .. } => "connect",
            ConnectError::Timeout { .. } => "connect-timeout",
            ConnectError::Tls { .. } => "tls",
            ConnectError::IdentityMismatch { .. } => "identity-mismatch",
            ConnectError::Identity(_) => "local-identity",
            ConnectError::Overflow { .. } => "overflow",
            ConnectError::Handshake { .. } => "http-handshake",
        }
    }

    /// Whether the endpoint should leave balancing for a while: it could
    /// not be reached, or it answered with another identity than the
    /// config gives it (its address was most likely handed to a new pod
    /// before this proxy's config caught up; it stays wrong until then).
    pub fn ejects_endpoint(&self) -> bool {
        matches!(
            self,
            ConnectError::Connect { .. }
                | ConnectError::Timeout { .. }
                | ConnectError::IdentityMismatch { .. }
        )
    }

    /// The status a client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            ConnectError::Connect { .. } | ConnectError::Overflow { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ConnectError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// The connect timeout for endpoints of a Service: its ServicePolicy's
/// `connectionPool.connectTimeout`, else the proxy's own (`default`).
pub fn connect_timeout(default: Duration, policy: &weft_proxy_config::ClientPolicy) -> Duration {
    policy
        .connection_pool
        .as_ref()
        .map(|p| p.connect_timeout_ms)
        .filter(|ms| *ms > 0)
        .map_or(default, Duration::from_millis)
}

/// What opening a connection needs: how to dial, and the snapshot whose
/// identity runs mTLS.
#[derive(Clone, Copy, Debug)]
pub struct Connector<'a> {
    /// Outgoing TCP connections.
    pub dialer: &'a dyn Dialer,
    /// The snapshot of the request or connection.
    pub snapshot: &'a Snapshot,
    /// Where handshakes are counted.
    pub metrics: &'a crate::metrics::Metrics,
}

/// Connects to `addr` within `deadline` (TCP, then TLS each); with
/// `identity`, runs mTLS expecting that peer and offering `alpn`.
pub async fn connect(
    via: Connector<'_>,
    addr: SocketAddr,
    identity: Option<&crate::tls::SpiffeId>,
    alpn: Alpn,
    deadline: Duration,
) -> Result<Stream, ConnectError> {
    let tcp = tokio::time::timeout(deadline, via.dialer.connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout { addr })?
        .map_err(|source| ConnectError::Connect { addr, source })?;
    let Some(id) = identity else {
        return Ok(Stream::Plain(tcp));
    };
    let cfg = via.snapshot.identity.client_config(id, alpn)?;
    let name = ServerName::IpAddress(addr.ip().into());
    let tls = tokio::time::timeout(deadline, TlsConnector::from(cfg).connect(name, tcp))
        .await
        .map_err(|_| ConnectError::Timeout { addr })?
        .map_err(|source| match find_identity_mismatch(&source) {
            Some(m) => ConnectError::IdentityMismatch {
                addr,
                detail: m.to_string(),
            },
            None => ConnectError::Tls { addr, source },
        })?;
    via.metrics
        .handshake(Direction::Outbound, tls.get_ref().1.handshake_kind());
    Ok(Stream::Tls(Box::new(tls)))
}

/// A Service's `connectionPool.maxConnections` and `maxPendingRequests`
/// (see [`crate::limits`]).
#[derive(Clone, Copy, Debug)]
pub struct Gate<'a> {
    /// Counts per Service.
    pub limits: &'a ConnLimits,
    /// The Service's `namespace/name`.
    pub service: &'a str,
    /// Its maxConnections.
    pub max_connections: usize,
    /// Its maxPendingRequests (none: no limit).
    pub max_pending: Option<usize>,
}

impl<'a> Gate<'a> {
    /// The gate of `dest`'s Service, when its policy limits connections.
    pub fn of(limits: &'a ConnLimits, dest: &Dest<'a>) -> Option<Self> {
        let pool = dest.service.policy.connection_pool.as_ref()?;
        Some(Gate {
            limits,
            service: dest.key,
            max_connections: pool.max_connections? as usize,
            max_pending: pool.max_pending_requests.map(|n| n as usize),
        })
    }
}

/// A sender for one request on `key`: an idle pooled connection, or a new
/// one (under `gate`, room for it first). The flag says whether it is fresh
/// (a stale pooled connection may be retried once on a fresh one).
pub async fn acquire(
    via: Connector<'_>,
    pool: &Arc<Pool>,
    key: &PoolKey,
    fresh_only: bool,
    deadline: Duration,
    gate: Option<Gate<'_>>,
) -> Result<(Sender, bool), ConnectError> {
    if !fresh_only && let Some(s) = pool.checkout() {
        return Ok((s, false));
    }
    // Dialling holds a TCP connect's and a TLS handshake's state. Boxed, it
    // costs an allocation per new connection, and the future of every
    // request (which hyper keeps per client connection) stays small.
    Box::pin(dial(via, pool, key, fresh_only, deadline, gate)).await
}

/// [`acquire`] without an idle pooled connection: share a connection being
/// dialled, or dial one.
async fn dial(
    via: Connector<'_>,
    pool: &Arc<Pool>,
    key: &PoolKey,
    fresh_only: bool,
    deadline: Duration,
    gate: Option<Gate<'_>>,
) -> Result<(Sender, bool), ConnectError> {
    // A multiplexing pool with fewer lanes than its limit dials one more
    // HTTP/1.1 lane (decision 36).
    let lane = pool.reserve_lane();
    // HTTP/2 (and multiplexed HTTP/1.1): one request dials, the others
    // share its connection.
    let _dialing = match pool.shared() {
        true if lane.is_none() && !fresh_only => match pool.dial_or_share().await {
            Dial::Shared(s) => return Ok((s, false)),
            Dial::Mine(d) => d,
        },
        _ => None,
    };
    let slot = match gate {
        None => None,
        Some(g) => {
            let conns = g.limits.of(g.service);
            match conns.reserve(pool, g.max_connections, g.max_pending).await {
                Ok(Reserved::Room(slot)) => Some(slot),
                Ok(Reserved::Idle(s)) => return Ok((s, false)),
                Err(o) => {
                    return Err(ConnectError::Overflow {
                        service: g.service.to_owned(),
                        max_connections: o.max_connections,
                        max_pending: o.max_pending,
                    });
                }
            }
        }
    };
    let alpn = match key.version {
        Version::Http1 if key.mux && lane.is_none() => Alpn::Mux,
        Version::Http1 => Alpn::Http1,
        Version::Http2 => Alpn::Http2,
    };
    let io = connect(via, key.addr, key.identity.as_ref(), alpn, deadline).await?;
    let wire = match lane {
        // Asked for HTTP/1.1: the peer's answer says nothing of whether it
        // multiplexes.
        Some(_) => Version::Http1,
        None => pool.wire(io.alpn().and_then(Alpn::from_id)),
    };
    let s = pool
        .handshake(Counted::new(io, slot, lane), wire)
        .await
        .map_err(|source| ConnectError::Handshake {
            addr: key.addr,
            source,
        })?;
    Ok((s, true))
}

/// Why a request failed after a connection was acquired.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// A fresh connection for the retry could not be made.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The upstream failed or reset the request.
    #[error(
        "{addr} failed the request: {source}; check the upstream's logs (crash, restart, or connection limit)"
    )]
    Upstream {
        /// Upstream.
        addr: SocketAddr,
        /// Why.
        source: crate::http::BoxError,
    },
}

/// Sends `req` on `sender`. When a pooled (not fresh) connection turns out
/// closed before the request left, retries once on a fresh connection
/// (within `connect_timeout`).
pub async fn send_request(
    via: Connector<'_>,
    connect_timeout: Duration,
    pool: &Arc<Pool>,
    key: &PoolKey,
    sender: Sender,
    fresh: bool,
    req: http::Request<crate::http::Body>,
) -> Result<http::Response<crate::http::pool::UpstreamBody>, SendError> {
    match sender.send(req).await {
        Ok(r) => Ok(r),
        Err(crate::http::SendFailed {
            request: Some(req), ..
        }) if !fresh => {
            let (sender, _) = acquire(via, pool, key, true, connect_timeout, None).await?;
            sender.send(req).await.map_err(|f| SendError::Upstream {
                addr: key.addr,
                source: f.error,
            })
        }
        Err(f) => Err(SendError::Upstream {
            addr: key.addr,
            source: f.error,
        }),
    }
}
