//! A ServicePolicy's connection limits, per client proxy:
//! `connectionPool.maxConnections` counts the HTTP and opaque TCP
//! connections open to the Service's endpoints together, and
//! `maxPendingRequests` the HTTP requests waiting for one of them.
//!
//! A connection holds a [`ConnSlot`] from before it is dialled until it
//! closes. An HTTP request that needs a new connection while the Service
//! is at its limit waits, as one of at most `maxPendingRequests`, until a
//! connection of its endpoint comes back idle or any of the Service's
//! connections closes; meanwhile an idle connection to another endpoint is
//! closed to make room, so the limit never strands a request behind
//! connections nobody uses. An opaque TCP connection over the limit is
//! refused, unless an idle HTTP connection of the Service can be closed for
//! it. Counts are kept across reloads.
//!
//! Pools are per endpoint address, so two Services sharing pods share
//! pools: a connection counts against the Service whose request dialled it.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use crate::http::pool::{IdleWatcher, Lane, Pool, Sender};

/// Connection counts per Service (`namespace/name`).
#[derive(Debug, Default)]
pub struct ConnLimits {
    services: Mutex<HashMap<String, Arc<ServiceConns>>>,
}

impl ConnLimits {
    /// The counts of `service`, created on first use.
    pub fn of(&self, service: &str) -> Arc<ServiceConns> {
        let mut m = self.services.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(service) {
            Some(c) => c.clone(),
            None => m.entry(service.to_owned()).or_default().clone(),
        }
    }
}

/// Adds one to `count` if it is below `max` (none: no limit); whether it did.
pub(crate) fn increment_below(count: &AtomicUsize, max: Option<usize>) -> bool {
    let mut cur = count.load(Ordering::Acquire);
    loop {
        if max.is_some_and(|m| cur >= m) {
            return false;
        }
        match count.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(now) => cur = now,
        }
    }
}

/// One Service's open connections and waiting requests.
#[derive(Debug, Default)]
pub struct ServiceConns {
    open: AtomicUsize,
    pending: AtomicUsize,
    /// Woken when one of the Service's connections closes or comes back
    /// idle.
    freed: Notify,
    /// Pools that hold connections of this Service, to close an idle one
    /// when a request waits.
    pools: Mutex<Vec<Weak<Pool>>>,
}

/// One open connection of a Service; dropped when the connection closes.
#[derive(Debug)]
pub struct ConnSlot(Arc<ServiceConns>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

/// A request waiting for a connection; dropped when it stops waiting.
#[derive(Debug)]
struct Pending(Arc<ServiceConns>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What [`ServiceConns::reserve`] got.
#[derive(Debug)]
pub enum Reserved {
    /// Room for a new connection.
    Room(ConnSlot),
    /// A connection of the pool came back idle meanwhile.
    Idle(Sender),
}

/// The Service is at `maxConnections` and `maxPendingRequests` requests
/// already wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow {
    /// The Service's maxConnections.
    pub max_connections: usize,
    /// Its maxPendingRequests.
    pub max_pending: usize,
}

impl ServiceConns {
    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Requests waiting for a connection now.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// A slot, if fewer than `max` connections are open.
    pub fn try_open(self: &Arc<Self>, max: usize) -> Option<ConnSlot> {
        increment_below(&self.open, Some(max)).then(|| ConnSlot(self.clone()))
    }

    fn try_pend(self: &Arc<Self>, max: Option<usize>) -> Option<Pending> {
        increment_below(&self.pending, max).then(|| Pending(self.clone()))
    }

    fn register(self: &Arc<Self>, pool: &Arc<Pool>) {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if pools
            .iter()
            .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(pool)))
        {
            return;
        }
        pools.retain(|w| w.strong_count() > 0);
        pools.push(Arc::downgrade(pool));
        drop(pools);
        let me: Arc<dyn IdleWatcher> = self.clone();
        pool.add_idle_watcher(Arc::downgrade(&me));
    }

    /// Closes an idle connection of a pool of the Service other than
    /// `except`; whether there was one.
    fn close_idle(&self, except: Option<&Arc<Pool>>) -> bool {
        let pools: Vec<Arc<Pool>> = self
            .pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        pools
            .iter()
            .any(|p| !except.is_some_and(|e| Arc::ptr_eq(p, e)) && p.close_one_idle())
    }

    /// Room for an opaque TCP connection under `max`: at once, or once an
    /// idle HTTP connection of the Service, closed for it, is gone (within
    /// `wait`); none when every connection is in use.
    pub async fn reserve_now(self: &Arc<Self>, max: usize, wait: Duration) -> Option<ConnSlot> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(slot) = self.try_open(max) {
                return Some(slot);
            }
            if !self.close_idle(None) {
                return None;
            }
            tokio::time::timeout_at(deadline, freed).await.ok()?;
        }
    }

    /// Room for a new connection of `pool`, under `max` connections:
    /// at once, or after waiting (one of at most `max_pending`) until a
    /// connection closes or one of `pool` comes back idle.
    pub async fn reserve(
        self: &Arc<Self>,
        pool: &Arc<Pool>,
        max: usize,
        max_pending: Option<usize>,
    ) -> Result<Reserved, Overflow> {
        self.register(pool);
        let mut waiting: Option<Pending> = None;
        loop {
            let freed = self.freed.notified();
            let idle = pool.idle_ready().notified();
            tokio::pin!(freed, idle);
            freed.as_mut().enable();
            idle.as_mut().enable();
            if let Some(slot) = self.try_open(max) {
                return Ok(Reserved::Room(slot));
            }
            if let Some(s) = pool.checkout() {
                return Ok(Reserved::Idle(s));
            }
            if waiting.is_none() {
                waiting = Some(self.try_pend(max_pending).ok_or(Overflow {
                    max_connections: max,
                    max_pending: max_pending.unwrap_or(usize::MAX),
                })?);
            }
            self.close_idle(Some(pool));
            tokio::select! {
                _ = freed => {}
                _ = idle => {}
            }
        }
    }
}

impl IdleWatcher for ServiceConns {
    /// A connection of one of the Service's pools came back idle: requests
    /// waiting for room look again (and may close it).
    fn idle_returned(&self) {
        if self.pending() > 0 {
            self.freed.notify_waiters();
        }
    }
}

/// An upstream connection holding its Service's [`ConnSlot`] (or its
/// pool's [`Lane`]) for as long as the socket lives: an upgraded HTTP/1
/// connection or an HTTP/2 connection whose handles are gone but whose
/// streams still run are still counted.
#[derive(Debug)]
pub struct Counted<S> {
    io: S,
    _slot: Option<ConnSlot>,
    _lane: Option<Lane>,
}

impl<S> Counted<S> {
    /// `io`, counted under `slot` and as `lane`.
    pub fn new(io: S, slot: Option<ConnSlot>, lane: Option<Lane>) -> Self {
        Counted {
            io,
            _slot: slot,
            _lane: lane,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_count_open_connections_up_to_the_limit() {
        let limits = ConnLimits::default();
        let cart = limits.of("shop/cart");
        assert!(Arc::ptr_eq(&cart, &limits.of("shop/cart")));
        let a = cart.try_open(2).expect("first");
        let b = cart.try_open(2).expect("second");
        assert!(cart.try_open(2).is_none());
        assert_eq!(cart.open(), 2);
        assert_eq!(limits.of("shop/other").open(), 0);
        drop(a);
        assert_eq!(cart.open(), 1);
        let _c = cart.try_open(2).expect("room again");
        drop(b);
        assert_eq!(cart.open(), 1);
    }

    #[test]
    fn pending_requests_stop_at_their_limit() {
        let conns = Arc::new(ServiceConns::default());
        let a = conns.try_pend(Some(1)).expect("first waits");
        assert!(conns.try_pend(Some(1)).is_none());
        assert!(conns.try_pend(Some(0)).is_none());
        drop(a);
        assert!(conns.try_pend(Some(1)).is_some());
        let many: Vec<_> = (0..100).filter_map(|_| conns.try_pend(None)).collect();
        assert_eq!(many.len(), 100, "no maxPendingRequests: no limit");
    }
}
