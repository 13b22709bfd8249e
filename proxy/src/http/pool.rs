//! Keep-alive connection pools, one per upstream (endpoint address, expected
//! identity, HTTP version, multiplexing). HTTP/1.1 keeps a stack of idle
//! connections; HTTP/2 shares one multiplexed connection. HTTP/1.1 requests
//! to a weft peer are multiplexed too ([`PoolKey::mux`]): they travel as
//! streams of one shared HTTP/2 connection (ALPN `weft/h2m`), and the peer
//! hands them to its app as HTTP/1.1 again; a peer that does not offer it
//! gets HTTP/1.1 connections from the same pool. Requests in flight are counted
//! per endpoint address in one atomic shared by that address's pools, which
//! the least-request balancer reads with one map lookup (no scan, no lock
//! held while counting).
//!
//! A multiplexing pool also keeps a few plain HTTP/1.1 connections to the
//! peer, its lanes ([`Pools::with_lanes`], `WEFT_PROXY_MUX_LANES`): a request
//! takes an idle lane, or dials one while the pool has fewer than its
//! limit, and only a request that finds every lane busy goes to the shared
//! connection. One request at a time on a connection costs both proxies less
//! as HTTP/1.1 than as an HTTP/2 stream; many at once share the multiplexed
//! connection's records and syscalls (architecture decision 36).
//!
//! A pool follows the [`ConnPolicy`] of the Service it serves (idle timeout,
//! requests per connection); [`Pools::sweep`] closes idle connections past
//! it and forgets pools nothing uses.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::Notify;

use super::form::into_form;
use super::h1::client::{self as h1, Conn};
use super::{Body, BoxError, SendFailed, mux};
use crate::tls::SpiffeId;

/// How long an idle connection is kept when no ServicePolicy says.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most idle HTTP/1.1 connections kept per upstream.
const MAX_IDLE: usize = 64;
/// HTTP/1.1 lanes a multiplexing pool keeps beside its shared connection
/// unless `WEFT_PROXY_MUX_LANES` says otherwise (decision 36).
pub const DEFAULT_MUX_LANES: usize = 4;

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
    /// HTTP version of the requests (what the app on the far side speaks).
    pub version: Version,
    /// HTTP/1.1 requests carried as streams of one HTTP/2 connection to a
    /// weft peer, which offers ALPN `weft/h2m` (never for upgrades or
    /// CONNECT, whose bytes after the head are a tunnel).
    pub mux: bool,
}

/// How a pool treats its connections: a ServicePolicy's
/// `connectionPool.idleTimeout` and `maxRequestsPerConnection`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnPolicy {
    /// An idle connection is closed after this.
    pub idle_timeout: Duration,
    /// A connection is closed (HTTP/2: replaced) after this many requests.
    pub max_requests_per_connection: Option<u32>,
}

impl Default for ConnPolicy {
    fn default() -> Self {
        ConnPolicy {
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_requests_per_connection: None,
        }
    }
}

impl ConnPolicy {
    /// The policy a ServicePolicy's connection pool asks for.
    pub fn of(pool: Option<&weft_proxy_config::ConnectionPool>) -> Self {
        match pool {
            Some(p) => ConnPolicy {
                idle_timeout: if p.idle_timeout_ms == 0 {
                    DEFAULT_IDLE_TIMEOUT
                } else {
                    Duration::from_millis(p.idle_timeout_ms)
                },
                max_requests_per_connection: p.max_requests_per_connection.filter(|n| *n > 0),
            },
            None => ConnPolicy::default(),
        }
    }
}

/// An idle HTTP/1.1 connection.
#[derive(Debug)]
struct Idle {
    since: Instant,
    conn: Box<Conn>,
    /// Requests it has carried.
    served: u32,
}

/// The shared HTTP/2 connection.
#[derive(Debug)]
struct Shared {
    send: Multiplexed,
    /// Requests it has carried.
    served: u32,
    last_used: Instant,
}

/// Connections to one upstream.
#[derive(Debug)]
pub struct Pool {
    version: Version,
    /// Offers the peer multiplexed HTTP/1.1 ([`PoolKey::mux`]).
    mux: bool,
    /// Most HTTP/1.1 lanes beside the multiplexed connection (0 for pools
    /// that do not multiplex).
    lanes: usize,
    /// Lanes open or being dialled ([`Lane`]).
    lanes_open: AtomicUsize,
    /// The peer chose plain HTTP/1.1 connections instead of `weft/h2m`:
    /// this pool keeps idle HTTP/1.1 connections from now on.
    fell_back: std::sync::atomic::AtomicBool,
    idle: Mutex<Vec<Idle>>,
    h2: Mutex<Option<Shared>>,
    /// Requests in flight to this pool's address (shared with the
    /// address's other pools).
    in_flight: Arc<AtomicUsize>,
    /// [`ConnPolicy`] of the Service whose request used the pool last.
    idle_timeout_ms: AtomicU64,
    max_per_connection: AtomicU32,
    /// Woken when a connection comes back idle (HTTP/1) or the shared
    /// connection is up or given up (HTTP/2).
    idle_ready: Notify,
    /// HTTP/2: a request is dialling the shared connection.
    h2_dialing: std::sync::atomic::AtomicBool,
    /// Services with `maxConnections` whose connections this pool holds;
    /// their waiting requests are woken when a connection comes back idle.
    services: Mutex<Vec<Weak<dyn IdleWatcher>>>,
}

/// Told when a connection of a pool comes back idle: connection limits
/// (`client::limits`) wake the requests waiting for room. The pool knows
/// no more of them than this.
pub trait IdleWatcher: Send + Sync + std::fmt::Debug {
    /// A connection of a pool this watcher was added to is idle again.
    fn idle_returned(&self);
}

/// What [`Pool::dial_or_share`] got.
#[derive(Debug)]
pub enum Dial {
    /// This request dials the pool's HTTP/2 connection (alone, with the
    /// guard; alongside others when the dial it waited for failed).
    Mine(Option<Dialing>),
    /// Another request's connection came up meanwhile.
    Shared(Sender),
}

/// The right to dial a pool's HTTP/2 connection; dropping it lets the
/// requests waiting for the connection look again.
#[derive(Debug)]
pub struct Dialing(Arc<Pool>);

impl Drop for Dialing {
    fn drop(&mut self) {
        self.0.h2_dialing.store(false, Ordering::Release);
        self.0.idle_ready.notify_waiters();
    }
}

/// A connection ready for one request.
#[derive(Debug)]
pub enum Sender {
    /// HTTP/1.1 (weft's client, [`h1`]) and the requests it carried
    /// before; returned to `pool` once the response is done.
    H1(Box<Conn>, Arc<Pool>, u32),
    /// HTTP/2 handle (cheap clone of the shared connection).
    H2(http2::SendRequest<Body>),
    /// HTTP/1.1 multiplexed to a weft peer ([`mux`]; a cheap clone).
    Mux(mux::Client),
}

/// A shared HTTP/2 connection: hyper's to an HTTP/2 upstream, weft's own
/// to a weft peer multiplexing HTTP/1.1 ([`mux`]).
#[derive(Clone, Debug)]
enum Multiplexed {
    H2(http2::SendRequest<Body>),
    Mux(mux::Client),
}

impl Multiplexed {
    fn is_closed(&self) -> bool {
        match self {
            Multiplexed::H2(s) => s.is_closed(),
            Multiplexed::Mux(c) => c.is_closed(),
        }
    }

    fn sender(&self) -> Sender {
        match self {
            Multiplexed::H2(s) => Sender::H2(s.clone()),
            Multiplexed::Mux(c) => Sender::Mux(c.clone()),
        }
    }
}

/// One of a multiplexing pool's HTTP/1.1 lanes, counted from before it is
/// dialled until its connection closes (held by the connection's I/O).
#[derive(Debug)]
pub struct Lane(Arc<Pool>);

impl Drop for Lane {
    fn drop(&mut self) {
        self.0.lanes_open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    fn new(version: Version, mux: bool, lanes: usize, in_flight: Arc<AtomicUsize>) -> Self {
        let d = ConnPolicy::default();
        Pool {
            version,
            mux,
            lanes: if mux && version == Version::Http1 {
                lanes
            } else {
                0
            },
            lanes_open: AtomicUsize::new(0),
            fell_back: std::sync::atomic::AtomicBool::new(false),
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            in_flight,
            idle_timeout_ms: AtomicU64::new(d.idle_timeout.as_millis() as u64),
            max_per_connection: AtomicU32::new(0),
            idle_ready: Notify::new(),
            h2_dialing: std::sync::atomic::AtomicBool::new(false),
            services: Mutex::new(Vec::new()),
        }
    }

    /// Whether requests share one HTTP/2 connection: HTTP/2, or HTTP/1.1
    /// multiplexed to a peer that took it.
    pub fn shared(&self) -> bool {
        self.version == Version::Http2 || (self.mux && !self.fell_back.load(Ordering::Relaxed))
    }

    /// What a new connection speaks, given the ALPN id the peer chose
    /// (`None`: plaintext). A multiplexing pool whose peer chose HTTP/1.1
    /// falls back to it for good.
    pub fn wire(&self, alpn: Option<crate::tls::Alpn>) -> Version {
        use crate::tls::Alpn;
        match (self.version, self.mux, alpn) {
            (Version::Http2, _, _) => Version::Http2,
            (Version::Http1, true, Some(Alpn::Mux)) => Version::Http2,
            (Version::Http1, true, _) => {
                if !self.fell_back.swap(true, Ordering::Relaxed) {
                    tracing::debug!(
                        ?alpn,
                        "peer proxy does not multiplex HTTP/1.1; using HTTP/1.1 connections"
                    );
                }
                Version::Http1
            }
            (Version::Http1, false, _) => Version::Http1,
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

    /// Applies the connection policy of the Service being served (two
    /// atomic loads when it is unchanged).
    pub fn configure(&self, policy: ConnPolicy) {
        let idle = policy.idle_timeout.as_millis() as u64;
        if self.idle_timeout_ms.load(Ordering::Relaxed) != idle {
            self.idle_timeout_ms.store(idle, Ordering::Relaxed);
        }
        let max = policy.max_requests_per_connection.unwrap_or(0);
        if self.max_per_connection.load(Ordering::Relaxed) != max {
            self.max_per_connection.store(max, Ordering::Relaxed);
        }
    }

    fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms.load(Ordering::Relaxed))
    }

    /// Whether a connection that carried `served` requests is done.
    fn used_up(&self, served: u32) -> bool {
        let max = self.max_per_connection.load(Ordering::Relaxed);
        max > 0 && served >= max
    }

    /// Woken when a connection of this pool comes back idle.
    pub fn idle_ready(&self) -> &Notify {
        &self.idle_ready
    }

    /// HTTP/1.1 lanes open or being dialled now.
    pub fn lanes_open(&self) -> usize {
        self.lanes_open.load(Ordering::Relaxed)
    }

    /// Idle HTTP/1 connections now.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Remembers a watcher (a Service that counts this pool's
    /// connections) to tell when a connection comes back idle.
    pub fn add_idle_watcher(&self, watcher: Weak<dyn IdleWatcher>) {
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        if !services.iter().any(|w| Weak::ptr_eq(w, &watcher)) {
            services.retain(|w| w.strong_count() > 0);
            services.push(watcher);
        }
    }

    /// HTTP/2 keeps one connection per upstream: the first request without
    /// one dials it, and the others wait for it instead of each dialling
    /// their own. When the dial they waited for failed, they dial too (so a
    /// dead endpoint costs a request at most two connect timeouts). A
    /// multiplexing pool's lane given back meanwhile serves a waiting
    /// request; it does not count as the dial ending.
    pub async fn dial_or_share(self: &Arc<Self>) -> Dial {
        let mut waited = false;
        loop {
            let ready = self.idle_ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            if let Some(s) = self.multiplexed() {
                return Dial::Shared(s);
            }
            if self.lanes > 0
                && let Some(s) = self.idle_h1()
            {
                return Dial::Shared(s);
            }
            if !self.h2_dialing.swap(true, Ordering::AcqRel) {
                return Dial::Mine(Some(Dialing(self.clone())));
            }
            if waited {
                return Dial::Mine(None);
            }
            ready.await;
            // Woken by the dial ending (its guard clears the flag first),
            // or by a lane coming back while it still runs.
            waited = !self.h2_dialing.load(Ordering::Acquire);
        }
    }

    /// An open, idle connection, if any. A multiplexing pool gives an idle
    /// lane first; with every lane busy, the shared connection once the pool
    /// has all the lanes it may open (until then, `None`: the caller dials a
    /// lane, [`Pool::reserve_lane`]).
    pub fn checkout(self: &Arc<Self>) -> Option<Sender> {
        if !self.shared() {
            return self.idle_h1();
        }
        if self.lanes > 0 {
            if let Some(s) = self.idle_h1() {
                return Some(s);
            }
            if self.lanes_open.load(Ordering::Relaxed) < self.lanes {
                return None;
            }
        }
        self.multiplexed()
    }

    /// An idle HTTP/1.1 connection still within the idle timeout.
    fn idle_h1(self: &Arc<Self>) -> Option<Sender> {
        let timeout = self.idle_timeout();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(mut c) = idle.pop() {
            if c.since.elapsed() < timeout && c.conn.is_open() {
                return Some(Sender::H1(c.conn, self.clone(), c.served));
            }
        }
        None
    }

    /// The shared HTTP/2 connection, when it is open.
    fn multiplexed(&self) -> Option<Sender> {
        let mut h2 = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        let shared = h2.as_mut().filter(|s| !s.send.is_closed())?;
        shared.served += 1;
        shared.last_used = Instant::now();
        let send = shared.send.sender();
        if self.used_up(shared.served) {
            // Its open streams finish; new requests get a new one.
            *h2 = None;
        }
        Some(send)
    }

    /// The right to dial one more HTTP/1.1 lane, while a multiplexing pool
    /// (whose peer multiplexes) has fewer than its limit.
    pub fn reserve_lane(self: &Arc<Self>) -> Option<Lane> {
        if self.lanes == 0 || !self.shared() {
            return None;
        }
        self.lanes_open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.lanes).then_some(n + 1)
            })
            .ok()
            .map(|_| Lane(self.clone()))
    }

    /// Runs the HTTP handshake of `wire` (see [`Pool::wire`]) on a fresh
    /// connection and keeps the connection driven by a task until it
    /// closes: `io` lives as long as the socket, upgrades and HTTP/2
    /// streams included (what it holds, e.g. a Service's `maxConnections`
    /// count, is held as long).
    pub async fn handshake<I>(self: &Arc<Self>, io: I, wire: Version) -> Result<Sender, BoxError>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let send = match wire {
            // Driven by its requests and responses: no task.
            Version::Http1 => return Ok(Sender::H1(Conn::new(io), self.clone(), 0)),
            // HTTP/1.1 multiplexed to a weft peer.
            Version::Http2 if self.version == Version::Http1 => {
                let (client, conn) = mux::handshake(io).await?;
                drive(conn, "HTTP/2 (multiplexed HTTP/1.1)");
                Multiplexed::Mux(client)
            }
            Version::Http2 => {
                let (send, conn) = http2::Builder::new(TokioExecutor::new())
                    // Fixed windows (hyper's 2 MiB per stream, 5 MiB per
                    // connection): adaptive ones cost a PING round trip per
                    // burst of data, which measured as a third more CPU per
                    // request between two proxies (decision 25).
                    .adaptive_window(false)
                    .handshake(TokioIo::new(io))
                    .await?;
                drive(conn, "HTTP/2");
                Multiplexed::H2(send)
            }
        };
        if !self.used_up(1) {
            *self.h2.lock().unwrap_or_else(|p| p.into_inner()) = Some(Shared {
                send: send.clone(),
                served: 1,
                last_used: Instant::now(),
            });
        }
        // Requests waiting for the connection share it now.
        self.idle_ready.notify_waiters();
        Ok(send.sender())
    }

    fn put_idle(&self, conn: Box<Conn>, served: u32) {
        if self.used_up(served) {
            // Dropping the handle closes the connection.
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                since: Instant::now(),
                conn,
                served,
            });
            drop(idle);
            self.idle_ready.notify_one();
            // A request of the Service waiting for room elsewhere may close
            // this connection now.
            for service in self
                .services
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter_map(Weak::upgrade)
            {
                service.idle_returned();
            }
        }
    }

    /// Closes connections idle longer than the idle timeout (HTTP/2: no
    /// request in flight to the address and none sent for that long).
    fn sweep(&self, now: Instant) {
        let timeout = self.idle_timeout();
        // A multiplexing pool that fell back holds both kinds for a while.
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain_mut(|c| now.saturating_duration_since(c.since) < timeout && c.conn.is_open());
        let mut h2 = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        if h2.as_ref().is_some_and(|s| {
            s.send.is_closed()
                || (self.load() == 0 && now.saturating_duration_since(s.last_used) >= timeout)
        }) {
            *h2 = None;
        }
    }

    /// Closes this pool's longest-idle connection, to make room under a
    /// Service's `maxConnections`; whether there was one.
    pub fn close_one_idle(&self) -> bool {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if !idle.is_empty() {
            idle.remove(0);
            return true;
        }
        drop(idle);
        let mut h2 = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        if h2.is_some() && self.load() == 0 {
            *h2 = None;
            true
        } else {
            false
        }
    }

    /// Nothing open or in use.
    fn unused(&self) -> bool {
        self.load() == 0
            && self
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
            && self.h2.lock().unwrap_or_else(|p| p.into_inner()).is_none()
    }
}

impl Sender {
    /// Sends one request. Each kind of connection has a future of its own:
    /// one `async` function for all of them would hold the request twice
    /// and be the size of the largest.
    pub fn send(
        self,
        req: Request<Body>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendFailed>> {
        use tokio_util::either::Either;
        match self {
            Sender::Mux(c) => Either::Left(send_mux(c, req)),
            Sender::H1(s, pool, served) => {
                Either::Right(Either::Left(send_h1(s, pool, served, req)))
            }
            Sender::H2(s) => Either::Right(Either::Right(send_h2(s, req))),
        }
    }
}

/// `req` in the form of `version`.
fn in_form(req: Request<Body>, version: http::Version) -> Request<Body> {
    if req.version() == version {
        req
    } else {
        into_form(req, version)
    }
}

/// A failure of hyper's send, with the request when it never left.
fn unsent(mut e: hyper::client::conn::TrySendError<Request<Body>>) -> SendFailed {
    SendFailed {
        request: e.take_message(),
        error: e.into_error().into(),
    }
}

async fn send_h1(
    conn: Box<Conn>,
    pool: Arc<Pool>,
    served: u32,
    req: Request<Body>,
) -> Result<Response<UpstreamBody>, SendFailed> {
    // Either form of the request head does: the client writes an
    // authority in the URI as `Host`.
    let resp = conn
        .send(req)
        .await
        .map_err(|(error, request)| SendFailed { error, request })?;
    Ok(resp.map(|body| UpstreamBody {
        body: Received::H1(body),
        back: Some(Back {
            pool,
            served: served + 1,
        }),
    }))
}

async fn send_h2(
    mut s: http2::SendRequest<Body>,
    req: Request<Body>,
) -> Result<Response<UpstreamBody>, SendFailed> {
    let mut req = in_form(req, http::Version::HTTP_2);
    super::never_indexed(req.headers_mut());
    let resp = s.try_send_request(req).await.map_err(unsent)?;
    Ok(resp.map(|body| UpstreamBody {
        body: Received::Hyper(body),
        back: None,
    }))
}

/// HTTP/1.1 multiplexed to a weft peer.
async fn send_mux(
    c: mux::Client,
    req: Request<Body>,
) -> Result<Response<UpstreamBody>, SendFailed> {
    let resp = c.send(in_form(req, http::Version::HTTP_2)).await?;
    Ok(resp.map(|body| UpstreamBody {
        body: Received::Mux(body),
        back: None,
    }))
}

/// An upstream response's body: weft's HTTP/1 client's, hyper's (HTTP/2)
/// or a multiplexed stream's. An HTTP/1.1 connection goes back to its pool
/// when the body has ended and the connection is fit for another request
/// (the client says); a body dropped before its end closes its connection.
#[derive(Debug)]
pub struct UpstreamBody {
    body: Received,
    back: Option<Back>,
}

/// Where a response body comes from.
#[derive(Debug)]
enum Received {
    H1(h1::ResponseBody<Body>),
    Hyper(Incoming),
    Mux(super::stream::RecvBody),
}

/// Where an HTTP/1.1 connection goes back to.
#[derive(Debug)]
struct Back {
    pool: Arc<Pool>,
    /// Requests it will have carried.
    served: u32,
}

impl UpstreamBody {
    fn give_back(&mut self) {
        if let Received::H1(b) = &mut self.body
            && let Some(conn) = b.take_reusable()
            && let Some(Back { pool, served }) = self.back.take()
        {
            pool.put_idle(conn, served);
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        use std::task::Poll;
        let polled = match &mut self.body {
            Received::H1(b) => std::pin::Pin::new(b).poll_frame(cx),
            Received::Hyper(b) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BoxError::from))),
            Received::Mux(b) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BoxError::from))),
        };
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) if self.is_end_stream() => self.give_back(),
            // The connection failed with the body: nothing to give back.
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.body {
            Received::H1(b) => b.is_end_stream(),
            Received::Hyper(b) => b.is_end_stream(),
            Received::Mux(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.body {
            Received::H1(b) => b.size_hint(),
            Received::Hyper(b) => b.size_hint(),
            Received::Mux(b) => b.size_hint(),
        }
    }
}

impl Drop for UpstreamBody {
    /// A body without content (`HEAD`, `204`, `304`, a zero length) may
    /// never be polled: it gives its connection back when dropped (one
    /// dropped before its end has none to give).
    fn drop(&mut self) {
        self.give_back();
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
    /// Looked up twice per request (its key holds an address and an
    /// identity): hashed with foldhash rather than SipHash, a third of the
    /// instructions. Keys come from the config, not from clients.
    pools: RwLock<foldhash::HashMap<PoolKey, Arc<Pool>>>,
    loads: RwLock<foldhash::HashMap<SocketAddr, Arc<AtomicUsize>>>,
    /// HTTP/1.1 lanes of each multiplexing pool (0: every request to a
    /// multiplexing peer is a stream of the shared connection).
    lanes: usize,
}

impl Pools {
    /// Pools whose multiplexing ones keep up to `lanes` HTTP/1.1 lanes.
    pub fn with_lanes(lanes: usize) -> Self {
        Pools {
            lanes,
            ..Pools::default()
        }
    }

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
            .or_insert_with(|| Arc::new(Pool::new(key.version, key.mux, self.lanes, in_flight)))
            .clone()
    }

    /// Closes connections past their idle timeout and forgets pools (and
    /// in-flight counters) nothing uses any more, such as those of
    /// endpoints that left the config. Run every second by the proxy.
    pub fn sweep(&self, now: Instant) {
        let mut forget = false;
        for p in self
            .pools
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            p.sweep(now);
            forget |= Arc::strong_count(p) == 1 && p.unused();
        }
        if !forget {
            return;
        }
        let mut pools = self.pools.write().unwrap_or_else(|p| p.into_inner());
        pools.retain(|_, p| !(Arc::strong_count(p) == 1 && p.unused()));
        drop(pools);
        self.loads
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, c| Arc::strong_count(c) > 1);
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

/// Drives an upstream connection in a task of its own until it closes
/// (`wire`: its protocol, for the log). Polled in place: an `async` block
/// that awaits a captured future keeps two slots for it (the captured value
/// and the one being awaited), doubling the task's memory.
fn drive<F, E>(mut conn: F, wire: &'static str)
where
    F: std::future::Future<Output = Result<(), E>> + Unpin + Send + 'static,
    E: std::fmt::Display,
{
    tokio::spawn(std::future::poll_fn(move |cx| {
        std::pin::Pin::new(&mut conn).poll(cx).map(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, wire, "upstream connection closed with error");
            }
        })
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lane_given_back_serves_a_request_waiting_for_the_shared_connection() {
        let pool = Arc::new(Pool::new(Version::Http1, true, 1, Arc::default()));
        let Dial::Mine(Some(dialing)) = pool.dial_or_share().await else {
            panic!("the first request dials the shared connection");
        };
        let waiting = tokio::spawn({
            let pool = pool.clone();
            async move { pool.dial_or_share().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiting.is_finished(),
            "the second request waits for the dial"
        );
        let (io, _peer) = tokio::io::duplex(1024);
        pool.put_idle(Conn::new(io), 1);
        let got = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("in time")
            .expect("task");
        assert!(
            matches!(got, Dial::Shared(Sender::H1(..))),
            "the lane given back, not a second shared connection: {got:?}"
        );
        drop(dialing);
    }

    #[test]
    fn load_counts_every_pool_of_an_address_and_only_while_tracked() {
        let pools = Pools::default();
        let a: SocketAddr = "10.0.0.1:80".parse().expect("addr");
        let b: SocketAddr = "10.0.0.2:80".parse().expect("addr");
        let key = |addr, version| PoolKey {
            addr,
            identity: None,
            version,
            mux: false,
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

    /// Request ids and trace contexts, new on every request, go to an
    /// HTTP/2 peer (multiplexed HTTP/1.1 or hyper's HTTP/2) as
    /// never-indexed literals: a request repeating the previous one's
    /// values is as long as that one on the wire. Indexed, its values
    /// would have shrunk to an index each.
    #[tokio::test]
    async fn per_request_values_go_to_http2_peers_never_indexed() {
        for (version, kind) in [
            (Version::Http1, "multiplexed HTTP/1.1"),
            (Version::Http2, "HTTP/2"),
        ] {
            let (a, mut peer) = tokio::io::duplex(64 * 1024);
            let pool = Arc::new(Pool::new(
                version,
                version == Version::Http1,
                0,
                Arc::default(),
            ));
            // The handshake's sender is the shared connection's, which
            // each request below checks out.
            drop(pool.handshake(a, Version::Http2).await.expect("handshake"));
            let ids = ["a5a0c6a9-1", "b7f3c2d1-2", "b7f3c2d1-2"];
            for (i, id) in ids.into_iter().enumerate() {
                let sender = pool.checkout().expect("the shared connection");
                let req = Request::post("http://app.shop/upload")
                    .header("x-request-id", id)
                    .header(
                        "traceparent",
                        format!("00-4bf92f3577b34da6a3ce929d0e0e473{i}-00f067aa0ba902b7-01"),
                    )
                    .body(crate::http::full(bytes::Bytes::new()))
                    .expect("request");
                // No peer answers: the request waits for its response.
                tokio::spawn(sender.send(req));
            }
            let frames = tokio::time::timeout(
                Duration::from_secs(10),
                crate::test_util::client_frames(&mut peer, |f| {
                    f.iter().filter(|f| f.kind == 1).count() >= 3
                }),
            )
            .await
            .expect("three HEADERS frames");
            let heads: Vec<usize> = frames
                .iter()
                .filter(|f| f.kind == 1)
                .map(|f| f.len)
                .collect();
            assert_eq!(
                heads[2], heads[1],
                "{kind}: the third request repeats the second's values and must be as long ({heads:?})"
            );
        }
    }

    /// An app on loopback: `/empty` answers 204, anything else 64 KiB.
    async fn app() -> SocketAddr {
        use http_body_util::Full;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            loop {
                let (io, _) = listener.accept().await.expect("accept");
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let resp = if req.uri().path() == "/empty" {
                        let mut r = Response::new(Full::new(bytes::Bytes::new()));
                        *r.status_mut() = http::StatusCode::NO_CONTENT;
                        r
                    } else {
                        Response::new(Full::new(bytes::Bytes::from(vec![b'x'; 64 * 1024])))
                    };
                    Ok::<_, std::convert::Infallible>(resp)
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(io), svc),
                );
            }
        });
        addr
    }

    async fn send(pool: &Arc<Pool>, addr: SocketAddr, path: &str) -> Response<UpstreamBody> {
        let sender = match pool.checkout() {
            Some(s) => s,
            None => {
                let io = tokio::net::TcpStream::connect(addr).await.expect("connect");
                pool.handshake(io, Version::Http1).await.expect("handshake")
            }
        };
        let req = Request::builder()
            .uri(path)
            .header("host", "app")
            .body(crate::http::full(bytes::Bytes::new()))
            .expect("request");
        sender.send(req).await.expect("response")
    }

    /// An HTTP/1.1 connection is back in its pool the moment its response
    /// body has been read to the end, or dropped when it had none, with no
    /// task in between; a body dropped before its end takes its connection
    /// with it.
    #[tokio::test]
    async fn a_connection_returns_when_its_response_body_ends_and_not_before() {
        use http_body_util::BodyExt as _;
        let addr = app().await;
        let pool = Arc::new(Pool::new(Version::Http1, false, 0, Arc::default()));

        let resp = send(&pool, addr, "/").await;
        let body = resp.into_body().collect().await.expect("body");
        assert_eq!(body.to_bytes().len(), 64 * 1024);
        // No yield to the runtime since the end: nothing else ran.
        assert_eq!(pool.idle_count(), 1, "back as the body ended");

        let resp = send(&pool, addr, "/empty").await;
        assert_eq!(pool.idle_count(), 0, "in use");
        drop(resp);
        assert_eq!(pool.idle_count(), 1, "back when the empty body was dropped");

        let mut body = send(&pool, addr, "/").await.into_body();
        let first = body.frame().await.expect("a frame").expect("data");
        assert!(first.is_data());
        drop(body);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            pool.idle_count(),
            0,
            "a body cut short loses its connection"
        );
    }

    /// An app that answers one request as keep-alive, then closes the
    /// connection.
    async fn answers_once() -> SocketAddr {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut io, _) = listener.accept().await.expect("accept");
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let mut buf = [0u8; 4096];
                let n = io.read(&mut buf).await.expect("read");
                assert!(n > 0, "closed before the request");
                got.extend_from_slice(&buf[..n]);
            }
            io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .expect("write");
        });
        addr
    }

    /// Until the close of the pool's one idle connection has reached it.
    async fn closed_by_peer(pool: &Pool) {
        for _ in 0..200 {
            if !pool.idle.lock().expect("lock")[0].conn.is_open() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the peer's close never arrived");
    }

    /// A pooled HTTP/1.1 connection the upstream closed while it sat idle
    /// is never handed to a request: checkout and the sweep both see it.
    #[tokio::test]
    async fn a_connection_closed_while_idle_is_not_handed_out() {
        use http_body_util::BodyExt as _;
        let pool = Arc::new(Pool::new(Version::Http1, false, 0, Arc::default()));
        for sweep in [true, false] {
            let addr = answers_once().await;
            let body = send(&pool, addr, "/").await.into_body().collect().await;
            assert_eq!(body.expect("body").to_bytes(), "ok");
            assert_eq!(pool.idle_count(), 1, "kept alive");
            closed_by_peer(&pool).await;
            if sweep {
                pool.sweep(Instant::now());
            } else {
                assert!(pool.checkout().is_none(), "not handed out");
            }
            assert_eq!(pool.idle_count(), 0, "dropped (sweep: {sweep})");
        }
    }
}
