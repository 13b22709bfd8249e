//! Keep-alive connection pools, one per upstream (endpoint address, expected
//! identity, HTTP version). HTTP/1.1 keeps a stack of idle connections;
//! HTTP/2 shares one multiplexed connection. Requests in flight are counted
//! per endpoint address in one atomic shared by that address's pools, which
//! the least-request balancer reads with one map lookup (no scan, no lock
//! held while counting).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::Body;
use crate::net::Stream;
use crate::tls::SpiffeId;

/// How long an idle HTTP/1.1 connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most idle HTTP/1.1 connections kept per upstream.
const MAX_IDLE: usize = 64;

/// Upstream HTTP version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2.
    Http2,
}

/// Identifies a pool.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Address dialled.
    pub addr: SocketAddr,
    /// Expected peer identity (mTLS), or plaintext.
    pub identity: Option<SpiffeId>,
    /// HTTP version spoken.
    pub version: Version,
}

/// Connections to one upstream.
#[derive(Debug)]
pub struct Pool {
    version: Version,
    idle: Mutex<Vec<(Instant, http1::SendRequest<Body>)>>,
    h2: Mutex<Option<http2::SendRequest<Body>>>,
    /// Requests in flight to this pool's address (shared with the
    /// address's other pools).
    in_flight: Arc<AtomicUsize>,
}

/// A connection ready for one request.
#[derive(Debug)]
pub enum Sender {
    /// HTTP/1.1; returned to `pool` once the response is done.
    H1(http1::SendRequest<Body>, Arc<Pool>),
    /// HTTP/2 handle (cheap clone of the shared connection).
    H2(http2::SendRequest<Body>),
}

/// A send failed; `request` is handed back when it was not sent at all, so
/// it may be retried on a fresh connection.
#[derive(Debug)]
pub struct SendFailed {
    /// The failure.
    pub error: hyper::Error,
    /// The untouched request, when it never left.
    pub request: Option<Request<Body>>,
}

impl Pool {
    fn new(version: Version, in_flight: Arc<AtomicUsize>) -> Self {
        Pool {
            version,
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            in_flight,
        }
    }

    /// Requests in flight to this pool's address (all its pools).
    pub fn load(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request in flight until the guard drops.
    pub fn track(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// An open, idle connection, if any.
    pub fn checkout(self: &Arc<Self>) -> Option<Sender> {
        match self.version {
            Version::Http1 => {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                while let Some((since, s)) = idle.pop() {
                    if since.elapsed() < IDLE_TIMEOUT && s.is_ready() {
                        return Some(Sender::H1(s, self.clone()));
                    }
                }
                None
            }
            Version::Http2 => {
                let h2 = self.h2.lock().unwrap_or_else(|p| p.into_inner());
                h2.as_ref()
                    .filter(|s| !s.is_closed())
                    .map(|s| Sender::H2(s.clone()))
            }
        }
    }

    /// Runs the HTTP handshake on a fresh connection and keeps the
    /// connection driven by a task until it closes.
    pub async fn handshake(self: &Arc<Self>, io: Stream) -> Result<Sender, hyper::Error> {
        let io = TokioIo::new(io);
        match self.version {
            Version::Http1 => {
                let (send, conn) = http1::Builder::new().handshake(io).await?;
                tokio::spawn(async move {
                    if let Err(e) = conn.with_upgrades().await {
                        tracing::debug!(error = %e, "upstream HTTP/1 connection closed with error");
                    }
                });
                Ok(Sender::H1(send, self.clone()))
            }
            Version::Http2 => {
                let (send, conn) = http2::Builder::new(TokioExecutor::new())
                    .adaptive_window(true)
                    .handshake(io)
                    .await?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "upstream HTTP/2 connection closed with error");
                    }
                });
                *self.h2.lock().unwrap_or_else(|p| p.into_inner()) = Some(send.clone());
                Ok(Sender::H2(send))
            }
        }
    }

    fn put_idle(&self, s: http1::SendRequest<Body>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push((Instant::now(), s));
        }
    }
}

impl Sender {
    /// Sends one request.
    pub async fn send(self, req: Request<Body>) -> Result<Response<Incoming>, SendFailed> {
        match self {
            Sender::H1(mut s, pool) => {
                let resp = s.try_send_request(req).await.map_err(|mut e| SendFailed {
                    request: e.take_message(),
                    error: e.into_error(),
                })?;
                if resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
                    // Back to the pool once the response body is done.
                    tokio::spawn(async move {
                        if s.ready().await.is_ok() {
                            pool.put_idle(s);
                        }
                    });
                }
                Ok(resp)
            }
            Sender::H2(mut s) => s.try_send_request(req).await.map_err(|mut e| SendFailed {
                request: e.take_message(),
                error: e.into_error(),
            }),
        }
    }
}

/// Decrements the in-flight count on drop.
#[derive(Debug)]
pub struct InFlight(Arc<Pool>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every pool of one direction, plus one in-flight counter per address.
/// Lookups take a shared read lock and clone nothing but an `Arc`; the write
/// lock is taken only the first time an upstream is used.
#[derive(Debug, Default)]
pub struct Pools {
    pools: RwLock<HashMap<PoolKey, Arc<Pool>>>,
    loads: RwLock<HashMap<SocketAddr, Arc<AtomicUsize>>>,
}

impl Pools {
    /// The pool for `key`, created on first use.
    pub fn get(&self, key: &PoolKey) -> Arc<Pool> {
        if let Some(p) = self
            .pools
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
        {
            return p.clone();
        }
        let in_flight = self
            .loads
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.addr)
            .or_default()
            .clone();
        let mut pools = self.pools.write().unwrap_or_else(|p| p.into_inner());
        pools
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Pool::new(key.version, in_flight)))
            .clone()
    }

    /// Requests in flight to `addr` across its pools (for the balancer):
    /// one map lookup and one atomic load.
    pub fn load_of(&self, addr: SocketAddr) -> usize {
        self.loads
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&addr)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_counts_every_pool_of_an_address_and_only_while_tracked() {
        let pools = Pools::default();
        let a: SocketAddr = "10.0.0.1:80".parse().expect("addr");
        let b: SocketAddr = "10.0.0.2:80".parse().expect("addr");
        let key = |addr, version| PoolKey {
            addr,
            identity: None,
            version,
        };
        let h1 = pools.get(&key(a, Version::Http1));
        let h2 = pools.get(&key(a, Version::Http2));
        assert!(Arc::ptr_eq(&h1, &pools.get(&key(a, Version::Http1))));
        let other = pools.get(&key(b, Version::Http1));
        let g1 = h1.track();
        let g2 = h2.track();
        let g3 = h1.track();
        assert_eq!(pools.load_of(a), 3);
        assert_eq!(pools.load_of(b), 0);
        assert_eq!(other.load(), 0);
        drop(g1);
        drop(g2);
        assert_eq!(pools.load_of(a), 1);
        drop(g3);
        assert_eq!(pools.load_of(a), 0);
        let unknown: SocketAddr = "10.0.0.9:80".parse().expect("addr");
        assert_eq!(pools.load_of(unknown), 0);
    }
}
