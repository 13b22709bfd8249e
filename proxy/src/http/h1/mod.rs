//! weft's HTTP/1 server, for every HTTP/1 connection the proxy serves: the
//! pod's own apps', plaintext clients' under Permissive, peers' over mTLS,
//! an ingress gateway's.
//!
//! Clients keep their HTTP/1 connections open between requests, often by
//! the thousand. hyper keeps 16 KiB of buffers and its
//! whole connection state for each of them while they sit idle; this
//! server holds, between requests, only the socket and the connection's
//! context: it waits for the socket to become readable without a buffer
//! (`Readiness`), and everything a request needs (buffers, parser, the
//! exchange's state) lives in one allocation made when its first byte
//! arrives and freed when its response has been written.
//!
//! ```text
//! idle ──readable──► cycle (boxed): read head ─► service ─► write response ─┐
//!  ▲                         │ request body: Decoder ─► pipe ─► RecvBody     │
//!  └────────── keep-alive ◄──┴───────────────────────────────────────────────┘
//!                            upgrade / CONNECT: the socket goes to OnUpgrade
//! ```
//!
//! What it speaks, as hyper's server does: HTTP/1.0 and 1.1, keep-alive and
//! pipelining, `Content-Length` and chunked bodies with trailers both
//! ways, `Expect: 100-continue` (sent when the body is first asked for),
//! `Upgrade` and `CONNECT` handed over with the bytes read past the head,
//! `HEAD`/`204`/`304` without bodies, a `Date` on every response. A client
//! that closes its side while its request is in flight cancels it.
//! Limits: the head size (431), the header read timeout counted from the
//! head's first byte (the connection closes), heads with both
//! `Content-Length` and `Transfer-Encoding` refused with 400.

pub mod body;
pub mod client;
mod head;

pub use head::has_payload;

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::net::Prefixed;
use body::{BodyError, BoxError, Decoded, Decoder, Ready, RecvBody, Sender};
use head::{Asked, Out, Refused};

/// Bytes reserved for reading a head (and what follows it).
const READ_SIZE: usize = 8 * 1024;
/// Bytes of an unread request body read and dropped to keep the
/// connection for the next request; a longer rest closes it.
const DRAIN_LIMIT: usize = 64 * 1024;
/// Response bytes gathered but not yet written past which the response
/// body is not polled until they are (a slow client slows the upstream).
const HIGH_WATER: usize = 64 * 1024;
/// Response body data at least this large is written from its own buffer
/// rather than copied next to the framing.
const COPY_LIMIT: usize = 4 * 1024;
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A connection that can say when it has bytes to read without being read.
pub trait Readiness {
    /// Ready when a read would not wait (or would fail).
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Readiness for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
}

impl<T: Readiness + ?Sized> Readiness for Box<T> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_read_ready(cx)
    }
}

/// Ready at once while bytes read ahead are waiting.
impl<T: Readiness> Readiness for Prefixed<T> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.has_buffered() {
            return Poll::Ready(Ok(()));
        }
        self.get_ref().poll_read_ready(cx)
    }
}

/// A TLS connection is ready when the TLS session holds plaintext not yet
/// read or has heard the peer's close (a read returns without waiting),
/// else when its transport is: bytes that turn out to be no plaintext (a
/// session ticket, half a record) only start a read that waits.
impl<T: Readiness> Readiness for tokio_rustls::server::TlsStream<T> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (io, session) = self.get_ref();
        if !session.wants_read() {
            return Poll::Ready(Ok(()));
        }
        io.poll_read_ready(cx)
    }
}

/// A client connection taken over by an upgrade or a CONNECT tunnel: the
/// socket, after the bytes the server read past the request's head.
pub type Upgraded = Box<dyn Io>;

/// What an upgraded connection is.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Found in the extensions of a request that asks for an upgrade or a
/// tunnel: resolves to the client's connection once the response (101, or
/// 2xx to CONNECT) has been written; fails when the response was another.
/// (Extensions are `Clone`: clones share the one connection.)
#[derive(Clone, Debug)]
pub struct OnUpgrade(Arc<Mutex<oneshot::Receiver<Upgraded>>>);

impl Future for OnUpgrade {
    type Output = Result<Upgraded, BoxError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut rx = self.0.lock().unwrap_or_else(|p| p.into_inner());
        Pin::new(&mut *rx)
            .poll(cx)
            .map_err(|_| "the connection was not upgraded".into())
    }
}

impl std::fmt::Debug for dyn Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Upgraded")
    }
}

/// Limits of a connection.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub header_read_timeout: Option<Duration>,
}

/// Why a connection's server closed it early, for the caller's metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// A head over the size limit (answered 431).
    HeaderTooLarge,
    /// A malformed head (answered 400, or 414 for a long target).
    BadRequest,
    /// A head with both `Content-Length` and `Transfer-Encoding`
    /// (answered 400).
    Ambiguous,
    /// A head not complete within the header read timeout.
    HeaderTimeout,
}

/// What answers a connection's requests: called once per request, and
/// cloned into each request's allocation. Any `Fn(Request) -> Future` of
/// the right kind is one.
pub trait Service: Clone + Send + 'static {
    /// The response body.
    type Body: http_body::Body<Data = Bytes, Error: std::fmt::Display + Send>
        + Unpin
        + Send
        + 'static;
    type Future: Future<Output = Response<Self::Body>> + Send + 'static;
    fn call(&self, req: Request<RecvBody>) -> Self::Future;
}

impl<S, F, B> Service for S
where
    S: Fn(Request<RecvBody>) -> F + Clone + Send + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = Bytes, Error: std::fmt::Display + Send> + Unpin + Send + 'static,
{
    type Body = B;
    type Future = F;
    fn call(&self, req: Request<RecvBody>) -> F {
        self(req)
    }
}

/// The answer to a refused head ([`Hooks::ambiguous`]), given why.
pub trait Answer<B>: Fn(&'static str) -> Response<B> + Clone + Send + 'static {}
impl<T, B> Answer<B> for T where T: Fn(&'static str) -> Response<B> + Clone + Send + 'static {}

/// A connection the server can wait on without a buffer.
pub trait Conn: AsyncRead + AsyncWrite + Readiness + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Readiness + Unpin + Send + 'static> Conn for T {}

/// What the connection's owner decides besides the requests.
#[allow(missing_debug_implementations)] // closures
pub struct Hooks<R, C, P = NoPark> {
    /// The answer to a head with both `Content-Length` and
    /// `Transfer-Encoding`, given why it is refused.
    pub ambiguous: R,
    /// Hears why a connection was refused.
    pub closed: C,
    /// Takes the connection when it has sat idle long enough.
    pub park: P,
}

/// Takes a connection that has sat idle long enough out of the server
/// (`net::park`): the server's task ends, and the owner serves the
/// connection again when it becomes readable.
pub trait Park<I> {
    /// The parking tick now; `None` when the connection is never parked.
    fn tick(&self) -> Option<u32>;
    /// Whether a connection idle since tick `since` parks at tick `now`.
    fn due(&self, since: u32, now: u32) -> bool;
    /// Wakes `waker` at the next tick (the server asks once per tick, not
    /// once per idle period: a task's waker is the same across them).
    fn wake_at_next_tick(&self, waker: &std::task::Waker);
    /// Takes the idle `io`, or gives it back.
    fn park(&self, io: I) -> Result<(), I>;
}

/// Never parks.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoPark;

impl<I> Park<I> for NoPark {
    fn tick(&self) -> Option<u32> {
        None
    }
    fn due(&self, _: u32, _: u32) -> bool {
        false
    }
    fn wake_at_next_tick(&self, _: &std::task::Waker) {}
    fn park(&self, io: I) -> Result<(), I> {
        Err(io)
    }
}

/// Serves HTTP/1 on `io` until the client closes it, `ended` resolves
/// (in-flight requests finish, keep-alive ends), or a head is refused.
/// Each request goes to `svc`. `read_ahead`: bytes already read from `io`
/// (protocol detection's), the start of the first request.
///
/// The connection's future holds, between requests, the socket, `svc`,
/// `ended` and the hooks, each once: a hand-written future rather than an
/// `async fn`, which would keep its arguments and the locals they move
/// into side by side for the connection's whole life.
pub fn serve<I, S, R, C, E, P>(
    io: I,
    read_ahead: Bytes,
    limits: Limits,
    svc: S,
    ended: E,
    hooks: Hooks<R, C, P>,
) -> Serve<I, S, R, C, E, P>
where
    I: Conn,
    S: Service,
    R: Answer<S::Body>,
    C: Fn(Closed),
    E: Future<Output = ()>,
    P: Park<I>,
{
    let ending = Arc::new(AtomicBool::new(false));
    let phase = if read_ahead.is_empty() {
        Phase::Idle(io, hooks.park.tick())
    } else {
        Phase::Busy(start(
            io,
            BytesMut::from(read_ahead),
            limits,
            &svc,
            &hooks.ambiguous,
            &ending,
        ))
    };
    Serve {
        ended,
        ending,
        phase,
        asked: u32::MAX,
        limits: Packed::new(limits),
        svc,
        hooks,
    }
}

/// [`Limits`] in the 8 bytes a connection keeps them in between requests
/// (the head size in bytes, the timeout in milliseconds, 0 for none).
#[derive(Clone, Copy)]
struct Packed(u32, u32);

impl Packed {
    fn new(l: Limits) -> Self {
        let ms = l.header_read_timeout.map_or(0, |t| {
            u32::try_from(t.as_millis()).unwrap_or(u32::MAX).max(1)
        });
        Packed(u32::try_from(l.max_header_bytes).unwrap_or(u32::MAX), ms)
    }

    fn limits(self) -> Limits {
        Limits {
            max_header_bytes: self.0 as usize,
            header_read_timeout: (self.1 > 0).then(|| Duration::from_millis(self.1.into())),
        }
    }
}

/// One request's work, in its own allocation: it owns the socket and the
/// read buffer while it runs and gives them back.
type Busy<I> = Pin<Box<dyn Future<Output = (I, BytesMut, Next)> + Send>>;

/// Where a connection is.
enum Phase<I> {
    /// Waiting for the next request, nothing buffered; since which parking
    /// tick (`None`: parking was off when it went idle, so it does not park
    /// this time).
    Idle(I, Option<u32>),
    Busy(Busy<I>),
    /// Closing its side after a last response.
    Closing(I),
    Done,
}

pin_project_lite::pin_project! {
    /// The future of [`serve`].
    #[project = ServeProj]
    pub struct Serve<I, S, R, C, E, P> {
        #[pin]
        ended: E,
        // Shared with the request in flight: its response says
        // `connection: close` once the end has begun.
        ending: Arc<AtomicBool>,
        phase: Phase<I>,
        // The parking tick at which this connection last asked to be woken
        // at the next one.
        asked: u32,
        limits: Packed,
        svc: S,
        hooks: Hooks<R, C, P>,
    }
}

impl<I, S, R, C, E, P> std::fmt::Debug for Serve<I, S, R, C, E, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serve")
            .field("ending", &self.ending.load(Ordering::Relaxed))
            .finish()
    }
}

impl<I, S, R, C, E, P> Future for Serve<I, S, R, C, E, P>
where
    I: Conn,
    S: Service,
    R: Answer<S::Body>,
    C: Fn(Closed),
    E: Future<Output = ()>,
    P: Park<I>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let ending = this.ending.load(Ordering::Relaxed)
            || (this.ended.as_mut().poll(cx).is_ready() && {
                this.ending.store(true, Ordering::Relaxed);
                true
            });
        loop {
            match std::mem::replace(this.phase, Phase::Done) {
                Phase::Idle(io, since) => {
                    if ending {
                        *this.phase = Phase::Closing(io);
                        continue;
                    }
                    match io.poll_read_ready(cx) {
                        Poll::Pending => {
                            let park = &this.hooks.park;
                            let mut io = io;
                            if let (Some(since), Some(now)) = (since, park.tick()) {
                                if park.due(since, now) {
                                    match park.park(io) {
                                        Ok(()) => return Poll::Ready(()),
                                        Err(back) => io = back,
                                    }
                                } else if *this.asked != now {
                                    park.wake_at_next_tick(cx.waker());
                                    *this.asked = now;
                                }
                            }
                            *this.phase = Phase::Idle(io, since);
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(_)) => return Poll::Ready(()),
                        Poll::Ready(Ok(())) => {
                            *this.phase = Phase::Busy(start(
                                io,
                                BytesMut::new(),
                                this.limits.limits(),
                                this.svc,
                                &this.hooks.ambiguous,
                                this.ending,
                            ));
                        }
                    }
                }
                Phase::Busy(mut busy) => {
                    let Poll::Ready((io, buf, next)) = busy.as_mut().poll(cx) else {
                        *this.phase = Phase::Busy(busy);
                        return Poll::Pending;
                    };
                    match next {
                        Next::KeepAlive if !this.ending.load(Ordering::Relaxed) => {
                            // Pipelined bytes start the next request now;
                            // empty lines between requests are no request.
                            let blank = buf.iter().all(|&b| b == b'\r' || b == b'\n');
                            *this.phase = if blank {
                                Phase::Idle(io, this.hooks.park.tick())
                            } else {
                                Phase::Busy(start(
                                    io,
                                    buf,
                                    this.limits.limits(),
                                    this.svc,
                                    &this.hooks.ambiguous,
                                    this.ending,
                                ))
                            };
                        }
                        Next::KeepAlive | Next::Close => *this.phase = Phase::Closing(io),
                        Next::Refused(why) => {
                            (this.hooks.closed)(why);
                            *this.phase = Phase::Closing(io);
                        }
                        Next::Drop => return Poll::Ready(()),
                        Next::Upgrade(to) => {
                            let _ = to.send(Box::new(Prefixed::new(buf.freeze(), io)));
                            return Poll::Ready(());
                        }
                    }
                }
                Phase::Closing(mut io) => {
                    if Pin::new(&mut io).poll_shutdown(cx).is_pending() {
                        *this.phase = Phase::Closing(io);
                        return Poll::Pending;
                    }
                    return Poll::Ready(());
                }
                Phase::Done => return Poll::Ready(()),
            }
        }
    }
}

/// A request's cycle on `io`, `buf` holding what was read ahead.
fn start<I, S, R>(
    mut io: I,
    mut buf: BytesMut,
    limits: Limits,
    svc: &S,
    ambiguous: &R,
    ending: &Arc<AtomicBool>,
) -> Busy<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service,
    R: Answer<S::Body>,
{
    let (svc, ambiguous, ending) = (svc.clone(), ambiguous.clone(), ending.clone());
    Box::pin(async move {
        let next = cycle(&mut io, &mut buf, limits, svc, ambiguous, &ending).await;
        (io, buf, next)
    })
}

/// How a cycle left the connection.
enum Next {
    KeepAlive,
    /// Close after flushing (a graceful end).
    Close,
    Refused(Closed),
    /// Drop without a word (the client went away, a write failed).
    Drop,
    Upgrade(oneshot::Sender<Upgraded>),
}

/// One request: its head read, answered, and its response written.
async fn cycle<I, S, R>(
    io: &mut I,
    buf: &mut BytesMut,
    limits: Limits,
    svc: S,
    ambiguous_answer: R,
    ending: &AtomicBool,
) -> Next
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: Service,
    R: Answer<S::Body>,
{
    let head = match read_head(io, buf, limits, ending).await {
        Ok(Some(h)) => h,
        Ok(None) => return Next::Close,
        Err(HeadFailed::Refused(r)) => {
            let (status, why) = match r {
                Refused::TooLarge => (
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    Closed::HeaderTooLarge,
                ),
                Refused::UriTooLong => (StatusCode::URI_TOO_LONG, Closed::BadRequest),
                Refused::Malformed(what) => {
                    tracing::debug!(what, "malformed request head");
                    (StatusCode::BAD_REQUEST, Closed::BadRequest)
                }
            };
            let mut out = BytesMut::new();
            head::refusal(status, &mut out);
            let _ = io.write_all(&out).await;
            return Next::Refused(why);
        }
        Err(HeadFailed::Timeout) => return Next::Refused(Closed::HeaderTimeout),
        Err(HeadFailed::Io) => return Next::Drop,
    };
    let head::Head {
        request,
        framing,
        ambiguous,
        keep_alive,
        expect_continue,
        upgrade,
        te_trailers,
    } = head;
    let asked = Asked {
        head: request.method() == Method::HEAD,
        connect: request.method() == Method::CONNECT,
        http10: request.version() == http::Version::HTTP_10,
        keep_alive,
        trailers: te_trailers,
    };
    if ambiguous {
        let resp = ambiguous_answer(
            "the request has both Content-Length and Transfer-Encoding (RFC 9112 section 6.1); send one of them",
        );
        let mut ex = Exchange::new(None, Decoder::Done, false, limits);
        return match ex.respond(io, buf, resp, asked, false).await {
            Next::Drop => Next::Drop,
            _ => Next::Refused(Closed::Ambiguous),
        };
    }
    let (body, sender) = body::pipe(framing);
    let mut request = request.map(|()| body);
    let upgrade = upgrade.then(|| {
        let (tx, rx) = oneshot::channel();
        request
            .extensions_mut()
            .insert(OnUpgrade(Arc::new(Mutex::new(rx))));
        tx
    });
    let mut ex = Exchange::new(sender, Decoder::new(framing), expect_continue, limits);
    let resp = {
        let mut fut = std::pin::pin!(svc.call(request));
        match poll_fn(|cx| ex.poll_until(io, buf, cx, fut.as_mut())).await {
            Some(r) => r,
            None => return Next::Drop,
        }
    };
    let tunnel = resp.status() == StatusCode::SWITCHING_PROTOCOLS
        || (asked.connect && resp.status().is_success());
    match (tunnel, upgrade) {
        (true, Some(to)) => {
            if !ex.body_done {
                // The request's body bytes would reach the tunnel as its
                // first bytes.
                tracing::debug!("an upgrade answered before its request body was read");
                return Next::Drop;
            }
            head::encode(
                resp.status(),
                resp.headers(),
                None,
                asked,
                &mut ex.out.staging,
            );
            if poll_fn(|cx| ex.out.poll_flush(io, cx)).await.is_err() {
                return Next::Drop;
            }
            Next::Upgrade(to)
        }
        (true, None) => {
            // Nothing this server can frame: the response is the start of
            // another protocol.
            tracing::debug!("a 101 response to a request that asked for no upgrade");
            Next::Drop
        }
        (false, _) => {
            // The end may have begun while the service worked.
            let asked = Asked {
                keep_alive: asked.keep_alive && !ending.load(Ordering::Relaxed),
                ..asked
            };
            ex.respond(io, buf, resp, asked, true).await
        }
    }
}

enum HeadFailed {
    Refused(Refused),
    Timeout,
    Io,
}

/// Reads until `buf` holds a whole head. `Ok(None)`: the client closed
/// the connection before a head began, or the connection's end began
/// while no head had (empty lines between requests are no head, as RFC
/// 9112 §2.2 lets a server skip them).
async fn read_head<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    limits: Limits,
    ending: &AtomicBool,
) -> Result<Option<head::Head>, HeadFailed> {
    // The timeout runs from the head's first byte.
    let mut deadline = None;
    loop {
        let blank = buf
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        buf.advance(blank);
        if !buf.is_empty() {
            if let Some(h) =
                head::parse(buf, limits.max_header_bytes).map_err(HeadFailed::Refused)?
            {
                return Ok(Some(h));
            }
            if deadline.is_none()
                && let Some(t) = limits.header_read_timeout
            {
                deadline = Some(tokio::time::Instant::now() + t);
            }
        }
        buf.reserve(READ_SIZE);
        let read = poll_fn(|cx| {
            if buf.is_empty() && ending.load(Ordering::Relaxed) {
                return Poll::Ready(Ok(0));
            }
            tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf)
        });
        let n = match deadline {
            Some(d) => match tokio::time::timeout_at(d, read).await {
                Ok(r) => r,
                Err(_) => return Err(HeadFailed::Timeout),
            },
            None => read.await,
        };
        match n {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err(HeadFailed::Io),
            Ok(_) => {}
            Err(_) => return Err(HeadFailed::Io),
        }
    }
}

/// Bytes waiting to be written: small pieces copied together in
/// `staging`, large body data kept in buffers of its own (`queue`), all
/// written in one vectored write. What `staging` holds comes after what
/// `queue` holds.
#[derive(Default)]
struct Outbox {
    staging: BytesMut,
    queue: std::collections::VecDeque<Bytes>,
}

impl Outbox {
    fn put(&mut self, b: &[u8]) {
        self.staging.extend_from_slice(b);
    }

    fn put_data(&mut self, data: Bytes) {
        if data.len() < COPY_LIMIT {
            self.staging.extend_from_slice(&data);
        } else {
            if !self.staging.is_empty() {
                self.queue.push_back(self.staging.split().freeze());
            }
            self.queue.push_back(data);
        }
    }

    fn is_empty(&self) -> bool {
        self.staging.is_empty() && self.queue.is_empty()
    }

    fn len(&self) -> usize {
        self.staging.len() + self.queue.iter().map(Bytes::len).sum::<usize>()
    }

    /// Writes everything out.
    fn poll_flush<I: AsyncWrite + Unpin>(
        &mut self,
        io: &mut I,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        const MAX_SLICES: usize = 16;
        while !self.is_empty() {
            let n = {
                let mut slices = [io::IoSlice::new(&[]); MAX_SLICES];
                let mut count = 0;
                for (slot, b) in slices.iter_mut().zip(self.queue.iter()) {
                    *slot = io::IoSlice::new(b);
                    count += 1;
                }
                if count < MAX_SLICES && !self.staging.is_empty() {
                    slices[count] = io::IoSlice::new(&self.staging);
                    count += 1;
                }
                ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count]))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let mut n = n;
            while n > 0 {
                match self.queue.front_mut() {
                    Some(front) if front.len() <= n => {
                        n -= front.len();
                        self.queue.pop_front();
                    }
                    Some(front) => {
                        front.advance(n);
                        n = 0;
                    }
                    None => {
                        self.staging.advance(n);
                        n = 0;
                    }
                }
            }
        }
        Pin::new(&mut *io).poll_flush(cx)
    }
}

/// The request body's side of an exchange: decoding it off the
/// connection into the pipe, as the consumer takes it.
struct Exchange {
    sender: Option<Sender>,
    decoder: Decoder,
    expect_continue: bool,
    limits: Limits,
    out: Outbox,
    /// The request body was read to its end.
    body_done: bool,
    /// Its consumer dropped it unread: the rest is being read and dropped.
    draining: bool,
    drained: usize,
    /// The request body failed or was abandoned by its consumer before
    /// its end: the connection cannot carry another request.
    body_broken: bool,
    /// The client closed its side.
    eof: bool,
}

impl Exchange {
    fn new(
        sender: Option<Sender>,
        decoder: Decoder,
        expect_continue: bool,
        limits: Limits,
    ) -> Self {
        let body_done = sender.is_none();
        Exchange {
            sender,
            decoder,
            expect_continue,
            limits,
            out: Outbox::default(),
            body_done,
            draining: false,
            drained: 0,
            body_broken: false,
            eof: false,
        }
    }

    /// Moves the request body along: decodes what `buf` holds and reads
    /// more while the consumer has room. With no body to read, watches for
    /// the client closing its side (and reads pipelined bytes ahead).
    /// Returns an error only when the client went away.
    fn poll_read_side<I: AsyncRead + Unpin>(
        &mut self,
        io: &mut I,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Result<(), ()> {
        if self.draining {
            return self.poll_drain(io, buf, cx);
        }
        let Some(sender) = &self.sender else {
            return self.poll_eof(io, buf, cx);
        };
        loop {
            match sender.poll_ready(cx, self.expect_continue) {
                Poll::Pending => return Ok(()),
                Poll::Ready(Ready::Gone) => {
                    // Unread: what is left of it is read and dropped (up
                    // to a bound), so the connection can carry the next
                    // request.
                    self.sender = None;
                    self.draining = !self.decoder.is_done();
                    self.body_done = self.decoder.is_done();
                    return self.poll_read_side(io, buf, cx);
                }
                Poll::Ready(Ready::Free) => {}
            }
            if self.expect_continue {
                self.expect_continue = false;
                if buf.is_empty() {
                    self.out.put(CONTINUE);
                }
            }
            match self.decoder.decode(buf, self.limits.max_header_bytes) {
                Ok(Decoded::Data(d)) => sender.send(Frame::data(d)),
                Ok(Decoded::Trailers(t)) => sender.send(Frame::trailers(t)),
                Ok(Decoded::End) => self.decoder = Decoder::Done,
                Ok(Decoded::More) => {
                    buf.reserve(READ_SIZE);
                    match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf) {
                        Poll::Pending => return Ok(()),
                        Poll::Ready(Ok(0)) => {
                            self.fail_body(BodyError::Incomplete);
                            self.eof = true;
                            return Err(());
                        }
                        Poll::Ready(Ok(_)) => {}
                        Poll::Ready(Err(e)) => {
                            self.fail_body(BodyError::Io(e));
                            return Err(());
                        }
                    }
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "request body refused");
                    self.fail_body(e);
                    return Ok(());
                }
            }
            if self.decoder.is_done() {
                // The last frame is in the slot: the consumer sees the end
                // right after it, without asking again.
                sender.finish();
                self.sender = None;
                self.body_done = true;
                return Ok(());
            }
        }
    }

    /// Reads and drops the rest of a body nobody reads, up to
    /// [`DRAIN_LIMIT`] bytes; past them the connection closes after the
    /// response.
    fn poll_drain<I: AsyncRead + Unpin>(
        &mut self,
        io: &mut I,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Result<(), ()> {
        loop {
            match self.decoder.decode(buf, self.limits.max_header_bytes) {
                Ok(Decoded::Data(d)) => self.drained += d.len(),
                Ok(Decoded::Trailers(_)) => {}
                Ok(Decoded::End) => self.decoder = Decoder::Done,
                Ok(Decoded::More) if self.drained >= DRAIN_LIMIT => {
                    self.draining = false;
                    self.body_broken = true;
                    return Ok(());
                }
                Ok(Decoded::More) => {
                    buf.reserve(READ_SIZE);
                    match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf) {
                        Poll::Pending => return Ok(()),
                        Poll::Ready(Ok(0)) => {
                            self.eof = true;
                            self.draining = false;
                            self.body_broken = true;
                            return Err(());
                        }
                        Poll::Ready(Ok(_)) => {}
                        Poll::Ready(Err(_)) => return Err(()),
                    }
                }
                Err(_) => {
                    self.draining = false;
                    self.body_broken = true;
                    return Ok(());
                }
            }
            if self.decoder.is_done() {
                self.draining = false;
                self.body_done = true;
                return Ok(());
            }
        }
    }

    fn fail_body(&mut self, e: BodyError) {
        if let Some(s) = self.sender.take() {
            s.fail(e.into());
        }
        self.body_broken = true;
    }

    /// With no body being read: a read that ends (EOF) means the client
    /// went away; bytes read are a pipelined request, kept.
    fn poll_eof<I: AsyncRead + Unpin>(
        &mut self,
        io: &mut I,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Result<(), ()> {
        // Bytes already read ahead (a pipelined request) stop the watch, as
        // an EOF behind them belongs to that request.
        while !self.eof && buf.is_empty() {
            if buf.capacity() - buf.len() < 512 {
                buf.reserve(READ_SIZE);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf) {
                Poll::Pending => return Ok(()),
                Poll::Ready(Ok(0)) => {
                    self.eof = true;
                    return Err(());
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(_)) => return Err(()),
            }
        }
        Ok(())
    }

    /// Polls the service's future to its response while the request body
    /// flows. `None`: the client went away first (the request is
    /// cancelled).
    fn poll_until<I, F, B>(
        &mut self,
        io: &mut I,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
        fut: Pin<&mut F>,
    ) -> Poll<Option<Response<B>>>
    where
        I: AsyncRead + AsyncWrite + Unpin,
        F: Future<Output = Response<B>>,
    {
        if self.poll_read_side(io, buf, cx).is_err() {
            return Poll::Ready(None);
        }
        if !self.out.is_empty() && matches!(self.out.poll_flush(io, cx), Poll::Ready(Err(_))) {
            return Poll::Ready(None);
        }
        fut.poll(cx).map(Some)
    }

    /// Writes `resp` while the request body flows on; says what the
    /// connection does next.
    async fn respond<I, B>(
        &mut self,
        io: &mut I,
        buf: &mut BytesMut,
        resp: Response<B>,
        asked: Asked,
        may_keep: bool,
    ) -> Next
    where
        I: AsyncRead + AsyncWrite + Unpin,
        B: http_body::Body<Data = Bytes, Error: std::fmt::Display> + Unpin,
    {
        let (parts, body) = resp.into_parts();
        let status = parts.status;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            // A 1xx other than 101 is not a final response.
            tracing::debug!(%status, "interim response as a final one refused");
            head::refusal(StatusCode::BAD_GATEWAY, &mut self.out.staging);
            let _ = poll_fn(|cx| self.out.poll_flush(io, cx)).await;
            return Next::Close;
        }
        let mut asked = asked;
        if self.body_broken {
            asked.keep_alive = false;
        }
        if self.expect_continue {
            // Answered before its body was asked for: the client will not
            // send it, and the connection cannot tell whether it did.
            asked.keep_alive = false;
            self.fail_body(BodyError::Incomplete);
        }
        let headers = parts.headers;
        let length = body.size_hint().exact();
        // Room for the head and a body small enough to be copied next to
        // it, at once: growing the buffer as they arrive moved the head
        // once per response.
        let copied = length.filter(|&n| n < COPY_LIMIT as u64).unwrap_or(0) as usize;
        self.out.staging.reserve(head::size(&headers) + copied);
        let encoded = head::encode(status, &headers, length, asked, &mut self.out.staging);
        let mut writer = Writer {
            body: Some(body),
            out: encoded.out,
            trailers: encoded.trailers,
            any_trailer: false,
            failed: None,
        };
        if writer.out == Out::Length(0) && !writer.body.as_ref().is_some_and(|b| b.is_end_stream())
        {
            // No body on the wire (HEAD, 204, ...): not polled.
            writer.body = None;
        }
        let written = poll_fn(|cx| {
            if self.poll_read_side(io, buf, cx).is_err() {
                return Poll::Ready(Err(()));
            }
            writer.poll(&mut self.out, io, cx)
        })
        .await;
        if written.is_err() {
            return Next::Drop;
        }
        if self.sender.is_some() {
            // The response ended before the request body: the rest of it
            // cannot be told from the next request.
            self.fail_body(BodyError::Incomplete);
        }
        if !may_keep || !encoded.keep_alive || self.body_broken || !self.body_done || self.eof {
            return Next::Close;
        }
        if matches!(writer.out, Out::Close) {
            return Next::Close;
        }
        Next::KeepAlive
    }
}

/// A body on its way out, framed: a response's, or the client's request's.
struct Writer<B: http_body::Body> {
    body: Option<B>,
    out: Out,
    /// The trailer fields a response declared (only those are sent).
    trailers: Option<Vec<http::HeaderName>>,
    /// Every trailer field that may be one is sent (a request's).
    any_trailer: bool,
    /// The body's own failure, when it failed.
    failed: Option<B::Error>,
}

impl<B> Writer<B>
where
    B: http_body::Body<Data = Bytes, Error: std::fmt::Display> + Unpin,
{
    /// Ready(Ok) once the whole response is written and flushed.
    fn poll<I: AsyncWrite + Unpin>(
        &mut self,
        out: &mut Outbox,
        io: &mut I,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), ()>> {
        loop {
            if out.len() >= HIGH_WATER {
                ready!(out.poll_flush(io, cx)).map_err(|_| ())?;
            }
            let Some(body) = self.body.as_mut() else {
                return out.poll_flush(io, cx).map_err(|_| ());
            };
            match Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            self.data(out, data)?;
                            continue;
                        }
                        Err(f) => f,
                    };
                    if let Ok(t) = frame.into_trailers() {
                        if let Out::Length(left @ 1..) = self.out {
                            tracing::debug!(left, "body shorter than its length");
                            return Poll::Ready(Err(()));
                        }
                        if self.out == Out::Chunked {
                            let allowed = match self.any_trailer {
                                true => None,
                                false => Some(self.trailers.as_deref().unwrap_or_default()),
                            };
                            head::encode_trailers(&t, allowed, &mut out.staging);
                            self.out = Out::Length(0);
                        }
                        self.body = None;
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "body failed; the connection closes");
                    self.failed = Some(e);
                    return Poll::Ready(Err(()));
                }
                Poll::Ready(None) => {
                    match self.out {
                        Out::Chunked => out.put(b"0\r\n\r\n"),
                        Out::Length(0) | Out::Close => {}
                        Out::Length(left) => {
                            tracing::debug!(left, "body shorter than its length");
                            return Poll::Ready(Err(()));
                        }
                    }
                    self.out = Out::Length(0);
                    self.body = None;
                }
                Poll::Pending => {
                    // Nothing more right now: what was gathered goes out.
                    ready!(out.poll_flush(io, cx)).map_err(|_| ())?;
                    return Poll::Pending;
                }
            }
        }
    }

    fn data(&mut self, out: &mut Outbox, data: Bytes) -> Result<(), ()> {
        if data.is_empty() {
            return Ok(());
        }
        match &mut self.out {
            Out::Chunked => {
                // BytesMut is a fmt::Write: the size is formatted in place.
                let _ = std::fmt::Write::write_fmt(
                    &mut out.staging,
                    format_args!("{:x}\r\n", data.len()),
                );
                out.put_data(data);
                out.put(b"\r\n");
            }
            Out::Length(left) => {
                let n = data.len() as u64;
                if n > *left {
                    tracing::debug!(left = *left, n, "body longer than its length");
                    return Err(());
                }
                *left -= n;
                out.put_data(data);
            }
            Out::Close => out.put_data(data),
        }
        Ok(())
    }
}

#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod tests;
