//! The server side of client connections, for both directions: HTTP/1
//! with weft's own server ([`super::h1`]), which enforces the limits on
//! request heads and refuses ambiguous framing itself, HTTP/2 with hyper's
//! and the same head limit, until the client closes the connection or the
//! caller's `ended` resolves (shutdown, a revocation), when in-flight
//! requests finish and keep-alive ends.
//!
//! In: an accepted (possibly decrypted) connection and the listener's
//! request service. Out: each request to that service; refused heads
//! counted in the `errors` metric of the direction.

use std::time::Duration;

use std::convert::Infallible;
use std::future::Future;

use http::Response;
use hyper::body::Incoming;

use super::h1;
use super::pool::Version;
use super::{Body, ReqBody, bad_request};
use crate::net::{BoxFuture, Prefixed};
use tokio_util::either::Either;

/// Limits on the request heads a client may send.
#[derive(Clone, Copy, Debug)]
pub struct HeadLimits {
    /// Largest request head (HTTP/1: request line and header lines;
    /// HTTP/2: the decoded header list). Over it: 431, and an HTTP/1
    /// connection closes.
    pub max_header_bytes: usize,
    /// How long an HTTP/1 client may take to send a whole request head,
    /// counted from its first byte. `None`: no limit.
    pub header_read_timeout: Option<Duration>,
}

/// Concurrent streams a peer may open on one HTTP/2 connection. A client
/// proxy multiplexes every HTTP/1.1 request of its pod to this pod on one
/// connection ([`super::pool::PoolKey::mux`]), long polls included, so the
/// limit is well above what one app connection at a time would need;
/// requests past it wait in the client proxy for a stream to end.
pub const MAX_STREAMS: u32 = 1024;

/// Serves an HTTP/1 connection with weft's own server ([`h1`]: nothing
/// but the socket held between requests) until it closes or `ended`
/// resolves, `read_ahead` the bytes already read from `io`. Limits and
/// refusals as [`serve_client`]; each refusal's step
/// (`header-too-large`, `bad-request`, `header-timeout`) goes to
/// `refused`, for the errors metric. A plain function: the caller's task
/// holds the returned future alone (an app's idle connection, whose task
/// is as small as it can be).
pub fn serve_h1<I, S, F, E, M, P>(
    io: I,
    read_ahead: bytes::Bytes,
    limits: HeadLimits,
    svc: S,
    ended: E,
    refused: M,
    park: P,
) -> impl Future<Output = ()> + Send
where
    I: h1::Conn,
    S: Fn(http::Request<ReqBody>) -> F + Clone + Send + 'static,
    F: std::future::Future<Output = Response<Body>> + Send + 'static,
    E: std::future::Future<Output = ()> + Send,
    M: Fn(&'static str) + Send,
    P: h1::Park<I> + Send,
{
    let limits = h1::Limits {
        max_header_bytes: limits.max_header_bytes,
        header_read_timeout: limits.header_read_timeout,
    };
    let closed = move |why| {
        let step = match why {
            h1::Closed::HeaderTooLarge => "header-too-large",
            h1::Closed::BadRequest | h1::Closed::Ambiguous => "bad-request",
            h1::Closed::HeaderTimeout => "header-timeout",
        };
        refused(step);
        tracing::debug!(step, "client connection refused");
    };
    let svc = move |req: http::Request<h1::body::RecvBody>| svc(req.map(ReqBody::H1));
    let hooks = h1::Hooks {
        ambiguous: bad_request,
        closed,
        park,
    };
    h1::serve(io, read_ahead, limits, svc, ended, hooks)
}

/// Serves one client connection until it closes, `conn` replaying first
/// the bytes protocol detection read from it: HTTP/1 with weft's own
/// server ([`serve_h1`]), whose future the caller's task holds inline
/// (small between requests), HTTP/2 with hyper's, boxed (hyper's
/// connection is large). On shutdown, or when `ended` resolves for
/// another reason (the connection may no longer be served, e.g.
/// plaintext after a switch to Strict), it finishes gracefully: in-flight
/// requests complete, keep-alive ends.
///
/// Limits on request heads ([`HeadLimits`]): a head over
/// `max_header_bytes` is answered 431 (HTTP/1 then closes); an HTTP/1 head
/// not complete `header_read_timeout` after its first byte closes the
/// connection; an HTTP/1 head with both `Content-Length` and
/// `Transfer-Encoding` is answered 400 and never reaches `svc`. Each
/// refusal's step (`header-too-large`, `bad-request`, `header-timeout`)
/// goes to `refused`, for the errors metric.
pub fn serve_client<I, S, F, E, M, P>(
    conn: Prefixed<I>,
    version: Version,
    limits: HeadLimits,
    svc: S,
    ended: E,
    refused: M,
    park: P,
) -> impl Future<Output = ()> + Send + use<I, S, F, E, M, P>
where
    I: h1::Conn,
    S: Fn(http::Request<ReqBody>) -> F + Clone + Send + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
    E: Future<Output = ()> + Send + 'static,
    M: Fn(&'static str) + Send + 'static,
    P: h1::Park<I> + Send + 'static,
{
    match version {
        Version::Http1 => {
            let (read_ahead, io) = conn.into_parts();
            Either::Left(serve_h1(io, read_ahead, limits, svc, ended, refused, park))
        }
        Version::Http2 => {
            let h2: BoxFuture<'static, ()> = Box::pin(serve_h2(conn, limits, svc, ended, refused));
            Either::Right(h2)
        }
    }
}

/// Serves an HTTP/2 connection with hyper's server, as [`serve_client`].
async fn serve_h2<I, S, F>(
    io: I,
    limits: HeadLimits,
    svc: S,
    ended: impl Future<Output = ()>,
    refused: impl Fn(&'static str),
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Fn(http::Request<ReqBody>) -> F + Clone + Send + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    // The service is called inside the block: a block awaiting a future
    // made outside it holds that future twice (the one it captured and the
    // one it awaits), and hyper allocates each stream's future (3.7 KB more
    // per request, measured).
    let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        let svc = svc.clone();
        async move { Ok::<_, Infallible>(svc(req.map(ReqBody::Hyper)).await) }
    });
    let conn = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        // Fixed windows (1 MiB): see the client side in `pool`.
        .adaptive_window(false)
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::pin!(ended);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = &mut ended => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        let step = if e.is_parse_too_large() {
            Some("header-too-large")
        } else if e.is_parse() {
            Some("bad-request")
        } else if e.is_timeout() {
            Some("header-timeout")
        } else {
            None
        };
        match step {
            Some(step) => {
                refused(step);
                tracing::debug!(error = %e, step, "client connection refused");
            }
            None => tracing::debug!(error = %e, "client connection ended with error"),
        }
    }
}
