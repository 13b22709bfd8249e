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
//! [`route`] decides which backend (Service, subset, port) a request or
//! connection goes to; [`balance`] picks one of that backend's endpoints;
//! [`Outliers`] keeps endpoints that just refused or black-holed a
//! connection out of the choice for a while, so a deleted pod costs one
//! failed attempt (retried on another endpoint), not one per request, until
//! kubelet delivers a config without it.
pub mod balance;
pub mod detect;
pub mod http;
pub mod route;
pub mod tcp;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use weft_proxy_config::{LoadBalancer, Protocol};

use crate::http::pool::Version;
use crate::metrics::{Direction, OpenConn};
use crate::net::Prefixed;
use crate::proxy::State;
use crate::snapshot::endpoint_port;
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

/// Endpoint attempt order for one request or connection to `dest`: the
/// balancer's pick among the endpoints not ejected (among all of them when
/// every one is ejected), then the other non-ejected ones, then the ejected
/// ones. Indices into `dest.endpoints`.
pub(crate) fn attempt_order(
    state: &State,
    dest: &route::Dest<'_>,
    key: Option<&str>,
) -> Vec<usize> {
    let eps = &dest.endpoints;
    let addr = |i: usize| SocketAddr::new(eps[i].address, endpoint_port(eps[i], dest.port));
    let now = Instant::now();
    let (mut healthy, ejected): (Vec<usize>, Vec<usize>) =
        (0..eps.len()).partition(|i| !state.outliers.is_ejected(addr(*i), now));
    if healthy.is_empty() {
        healthy = ejected;
        return order_from(state, dest, healthy, key, &addr);
    }
    let mut order = order_from(state, dest, healthy, key, &addr);
    order.extend(ejected);
    order
}

fn order_from(
    state: &State,
    dest: &route::Dest<'_>,
    set: Vec<usize>,
    key: Option<&str>,
    addr: &impl Fn(usize) -> SocketAddr,
) -> Vec<usize> {
    let n = set.len();
    if n == 0 {
        return set;
    }
    let lb: &LoadBalancer = &dest.service.policy.load_balancer;
    let first = balance::pick(
        lb,
        n,
        |i| state.outbound_pools.load_of(addr(set[i])),
        state.next_rr(),
        key,
        |i| addr(set[i]).to_string(),
        &mut rand::rng(),
    );
    (0..n).map(|k| set[(first + k) % n]).collect()
}

/// Most endpoints tried for one request or connection.
pub(crate) const MAX_ATTEMPTS: usize = 3;

/// How long an endpoint that refused or black-holed a connection is kept
/// out of the balancer's choice (unless every endpoint is ejected).
pub const EJECTION: Duration = Duration::from_secs(30);

/// Passive health: endpoints whose last connection attempt failed (refused,
/// unreachable, timed out), each until a deadline. Shared by every
/// snapshot, since a dead pod stays listed until kubelet delivers a config
/// without it. The common case (nothing ejected) costs one atomic load.
#[derive(Debug, Default)]
pub struct Outliers {
    any: AtomicBool,
    until: Mutex<HashMap<SocketAddr, Instant>>,
    /// Failure streaks, for the outlier detection of ServicePolicies.
    streaks: Mutex<HashMap<SocketAddr, Streak>>,
}

/// An endpoint's answers since its last good one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Streak {
    /// Consecutive 5xx answers.
    pub server_errors: u32,
    /// Consecutive 502/503/504 answers.
    pub gateway_errors: u32,
    /// Ejections since its last good answer.
    pub ejections: u32,
}

impl Outliers {
    /// Ejects `addr` for [`EJECTION`] from `now`, or longer when it is
    /// already ejected for longer (by outlier detection).
    pub fn eject(&self, addr: SocketAddr, now: Instant) {
        let mut m = self.until.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, t| *t > now);
        let until = m.entry(addr).or_insert(now);
        *until = (*until).max(now + EJECTION);
        self.any.store(true, Ordering::Release);
    }

    /// Ejects `addr` for `how_long` from `now`.
    pub fn eject_for(&self, addr: SocketAddr, now: Instant, how_long: Duration) {
        let mut m = self.until.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, t| *t > now);
        m.insert(addr, now + how_long);
        self.any.store(true, Ordering::Release);
    }

    /// Counts a 5xx answer of `addr` (a gateway error when 502–504); the
    /// streak so far.
    pub fn failed(&self, addr: SocketAddr, gateway: bool) -> Streak {
        let mut m = self.streaks.lock().unwrap_or_else(|p| p.into_inner());
        let s = m.entry(addr).or_default();
        s.server_errors += 1;
        if gateway {
            s.gateway_errors += 1;
        } else {
            s.gateway_errors = 0;
        }
        *s
    }

    /// `addr` was ejected for its streak: the streak starts over, the
    /// ejection count (which lengthens the next ejection) goes up.
    pub fn tripped(&self, addr: SocketAddr) {
        let mut m = self.streaks.lock().unwrap_or_else(|p| p.into_inner());
        let s = m.entry(addr).or_default();
        *s = Streak {
            ejections: s.ejections.saturating_add(1),
            ..Streak::default()
        };
    }

    /// `addr` answered well: no streak, and it takes traffic again.
    pub fn healthy(&self, addr: SocketAddr) {
        {
            let mut m = self.streaks.lock().unwrap_or_else(|p| p.into_inner());
            if !m.is_empty() {
                m.remove(&addr);
            }
        }
        self.restore(addr);
    }

    /// Whether `addr` is ejected at `now`.
    pub fn is_ejected(&self, addr: SocketAddr, now: Instant) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let m = self.until.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&addr).is_some_and(|t| *t > now)
    }

    /// `addr` answered: take it back at once.
    pub fn restore(&self, addr: SocketAddr) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let mut m = self.until.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(&addr);
        if m.is_empty() {
            self.any.store(false, Ordering::Release);
        }
    }
}

/// Requests in flight per Service, for the circuit breaker of a
/// ServicePolicy's `connectionPool.maxRequests`; kept across reloads.
#[derive(Debug, Default)]
pub struct Breakers {
    counts: Mutex<HashMap<String, Arc<AtomicUsize>>>,
}

/// A request counted in flight until dropped.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Breakers {
    /// A slot of `service` if fewer than `max` of its requests are in flight.
    pub fn try_acquire(&self, service: &str, max: usize) -> Option<Slot> {
        let count = {
            let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            match m.get(service) {
                Some(c) => c.clone(),
                None => m.entry(service.to_owned()).or_default().clone(),
            }
        };
        crate::limits::increment_below(&count, Some(max)).then(|| Slot(count))
    }
}

/// Retry budgets per Service (a ServicePolicy's `retryBudget`): requests
/// and retries counted in a sliding window of ten slots of a tenth of its
/// `ttl` each; kept across reloads.
#[derive(Debug, Default)]
pub struct RetryBudgets {
    windows: Mutex<HashMap<String, Window>>,
}

#[derive(Debug)]
struct Window {
    origin: Instant,
    slot: Duration,
    /// Per slot: its epoch (slots since `origin`), requests, retries.
    slots: [(u64, u64, u64); 10],
}

impl Window {
    fn new(ttl: Duration, now: Instant) -> Self {
        Window {
            origin: now,
            slot: (ttl / 10).max(Duration::from_millis(1)),
            slots: [(u64::MAX, 0, 0); 10],
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        let n = now.saturating_duration_since(self.origin).as_nanos() / self.slot.as_nanos();
        u64::try_from(n).unwrap_or(u64::MAX - 1)
    }

    fn current(&mut self, now: Instant) -> &mut (u64, u64, u64) {
        let e = self.epoch(now);
        let s = &mut self.slots[(e % 10) as usize];
        if s.0 != e {
            *s = (e, 0, 0);
        }
        s
    }

    /// Requests and retries in the window.
    fn totals(&self, now: Instant) -> (u64, u64) {
        let e = self.epoch(now);
        self.slots
            .iter()
            .filter(|s| s.0 != u64::MAX && s.0 <= e && e - s.0 < 10)
            .fold((0, 0), |(q, r), s| (q + s.1, r + s.2))
    }
}

impl RetryBudgets {
    fn with<T>(
        &self,
        service: &str,
        budget: &weft_proxy_config::RetryBudget,
        now: Instant,
        f: impl FnOnce(&mut Window) -> T,
    ) -> T {
        let ttl = Duration::from_millis(budget.ttl_ms.max(1));
        let mut m = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let w = m
            .entry(service.to_owned())
            .or_insert_with(|| Window::new(ttl, now));
        if w.slot != (ttl / 10).max(Duration::from_millis(1)) {
            *w = Window::new(ttl, now);
        }
        f(w)
    }

    /// Counts a request to `service`.
    pub fn request(&self, service: &str, budget: &weft_proxy_config::RetryBudget, now: Instant) {
        self.with(service, budget, now, |w| w.current(now).1 += 1);
    }

    /// Takes one retry from `service`'s budget if it has one left: retries
    /// in the window stay below `minRetriesPerSecond` × ttl or
    /// `retryPercent` of the window's requests, whichever is more.
    pub fn try_retry(
        &self,
        service: &str,
        budget: &weft_proxy_config::RetryBudget,
        now: Instant,
    ) -> bool {
        self.with(service, budget, now, |w| {
            let (requests, retries) = w.totals(now);
            let ttl_s = Duration::from_millis(budget.ttl_ms.max(1)).as_secs_f64();
            let allowed = (f64::from(budget.min_retries_per_second) * ttl_s)
                .max(budget.retry_percent / 100.0 * requests as f64);
            if (retries as f64) < allowed {
                w.current(now).2 += 1;
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retry_budget_allows_its_share_and_refills_as_the_window_slides() {
        let b = weft_proxy_config::RetryBudget {
            retry_percent: 20.0,
            min_retries_per_second: 1,
            ttl_ms: 10_000,
        };
        let budgets = RetryBudgets::default();
        let now = Instant::now();
        // No requests yet: the floor, 1/s over 10 s.
        let floor = (0..20)
            .filter(|_| budgets.try_retry("shop/cart", &b, now))
            .count();
        assert_eq!(floor, 10);
        // 100 requests: 20 % of them, of which 10 are spent.
        for _ in 0..100 {
            budgets.request("shop/cart", &b, now);
        }
        let more = (0..20)
            .filter(|_| budgets.try_retry("shop/cart", &b, now))
            .count();
        assert_eq!(more, 10);
        assert!(!budgets.try_retry("shop/cart", &b, now));
        // Another service has its own budget.
        assert!(budgets.try_retry("shop/other", &b, now));
        // Once the window has passed, the floor is back.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(budgets.try_retry("shop/cart", &b, Instant::now()));
    }

    #[test]
    fn outlier_ejections_last_whole_intervals_and_grow_with_each_ejection() {
        use super::http::ejection_time;
        let s = Duration::from_secs;
        assert_eq!(ejection_time(30_000, 1, 10_000), s(30));
        // Reconsidered once per interval: rounded up to the next one.
        assert_eq!(ejection_time(25_000, 1, 10_000), s(30));
        assert_eq!(ejection_time(25_000, 2, 10_000), s(50));
        assert_eq!(ejection_time(1_500, 1, 1_000), s(2));
        // At most ten times the base.
        assert_eq!(ejection_time(1_000, 20, 1), s(10));
        assert_eq!(ejection_time(1_000, 0, 1), s(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fixed_ejection_never_shortens_a_longer_one() {
        let o = Outliers::default();
        let a: SocketAddr = "10.244.0.5:8080".parse().expect("addr");
        o.eject_for(a, Instant::now(), EJECTION * 4);
        o.eject(a, Instant::now());
        tokio::time::advance(EJECTION * 2).await;
        assert!(o.is_ejected(a, Instant::now()));
        tokio::time::advance(EJECTION * 2).await;
        assert!(!o.is_ejected(a, Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_expires_and_restore_takes_back_at_once() {
        let o = Outliers::default();
        let a: SocketAddr = "10.244.0.5:8080".parse().expect("addr");
        let b: SocketAddr = "10.244.0.6:8080".parse().expect("addr");
        assert!(!o.is_ejected(a, Instant::now()));
        o.eject(a, Instant::now());
        assert!(o.is_ejected(a, Instant::now()));
        assert!(!o.is_ejected(b, Instant::now()));
        tokio::time::advance(EJECTION + Duration::from_millis(1)).await;
        assert!(!o.is_ejected(a, Instant::now()));
        o.eject(b, Instant::now());
        o.restore(b);
        assert!(!o.is_ejected(b, Instant::now()));
    }
}
