//! weft's HTTP/1 client, for every HTTP/1.1 connection the proxy opens
//! upstream: the pod's app on loopback above all, and HTTP/1 upstreams
//! outbound.
//!
//! A connection is driven by whoever uses it, never by a task of its own:
//! the request's future writes the head and what the body has at hand and
//! reads the response head; the response body reads the rest off the
//! socket as its consumer polls it, and sends what the request body still
//! had to send. When both have ended and the upstream keeps the
//! connection, the response body hands it back ([`ResponseBody::take_reusable`]).
//! An idle connection costs its socket and its read buffer.
//!
//! ```text
//! send: head + body at hand ─► write ─► read head ─┬─► Response<ResponseBody>
//!                                                  │     body: decode ◄─ read; rest of request ─► write
//!                                                  └─► 101 / 2xx to CONNECT: the socket goes to OnUpgrade
//! ```
//!
//! What it speaks, as hyper's client does: HTTP/1.1 requests (a URI in
//! either form: origin form with `Host`, or with its authority, which
//! becomes `Host`), `Content-Length` or chunked request bodies with
//! trailers, responses of HTTP/1.0 and 1.1 framed by length, chunks (with
//! trailers) or the connection's end, `1xx` skipped, `HEAD`/`204`/`304`
//! without bodies, `Upgrade` and `CONNECT` handed over with the bytes read
//! past the head. A response that ends before its request's body was sent
//! ends the exchange: the rest is not sent and the connection closes.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::oneshot;

use super::body::{BoxError, Decoded, Decoder};
use super::head::{self, Out};
use super::{COPY_LIMIT, Io, OnUpgrade, Outbox, READ_SIZE, Upgraded, Writer};
use crate::net::Prefixed;

/// Longest response head accepted (hyper's client reads heads up to
/// about 400 KB; apps with many cookies send long ones).
const MAX_HEAD: usize = 256 * 1024;
/// Longest trailer section accepted.
const MAX_TRAILERS: usize = 64 * 1024;
/// Most bytes one read of a response asks for.
const MAX_READ: usize = 256 * 1024;

/// One HTTP/1.1 connection upstream, idle between requests.
pub struct Conn {
    io: Box<dyn Io>,
    /// What was read and not yet used.
    buf: BytesMut,
    /// Room reserved for the next read (see `poll_fill`).
    read_size: usize,
    /// The last read took less than half of `read_size`.
    read_small: bool,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("buffered", &self.buf.len())
            .finish()
    }
}

/// A send that failed: why, and the request when nothing of it was sent
/// (the connection had been closed while idle), so that it may be sent on
/// another one.
pub type Failed<B> = (BoxError, Option<Request<B>>);

impl Conn {
    /// A connection over `io`, ready for its first request.
    pub fn new<I: Io + 'static>(io: I) -> Box<Self> {
        Box::new(Conn {
            io: Box::new(io),
            buf: BytesMut::new(),
            read_size: READ_SIZE,
            read_small: false,
        })
    }

    /// Whether the connection can carry a request: the upstream has
    /// neither closed it nor sent anything unasked since the last
    /// response. Reads without waiting.
    pub fn is_open(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut byte = [0u8; 1];
        let mut rb = ReadBuf::new(&mut byte);
        // Pending: nothing to read, the usual state of an idle connection.
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut rb)
            .is_pending()
    }

    /// Reads more of the connection into the buffer; `Ok(0)` at its end.
    /// The size of reads follows what the upstream sends, per connection:
    /// a read that fills the room it had doubles the next one's, up to
    /// [`MAX_READ`], so a body of megabytes is read (and handed on) in
    /// frames of that size rather than of 8 KiB; two reads in a row that
    /// take less than half their room halve it, down to [`READ_SIZE`]. An
    /// upstream that answers 16 KiB each time is read in one read per
    /// response, not two.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < self.read_size / 4 {
            self.buf.reserve(self.read_size);
        }
        let room = self.buf.capacity() - self.buf.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.buf
        ))?;
        if n == room {
            self.read_size = (self.read_size * 2).min(MAX_READ);
            self.read_small = false;
        } else if n < self.read_size / 2 {
            if self.read_small {
                self.read_size = (self.read_size / 2).max(READ_SIZE);
            }
            self.read_small = !self.read_small;
        } else {
            self.read_small = false;
        }
        Poll::Ready(Ok(n))
    }

    /// Ready for the next exchange: a buffer grown by a large body is not
    /// kept while the connection is idle (the read size is).
    fn rewind(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 2 * READ_SIZE {
            self.buf = BytesMut::new();
        }
    }

    /// Reads the response head; `1xx` other than `101` are skipped.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head: bool,
        connect: bool,
    ) -> Poll<Result<head::ResponseHead, BoxError>> {
        loop {
            // Nothing to parse yet: read first.
            let parsed = match self.buf.is_empty() {
                true => Ok(None),
                false => head::parse_response(&mut self.buf, MAX_HEAD, head, connect),
            };
            match parsed {
                Ok(Some(h))
                    if h.response.status().is_informational()
                        && h.response.status() != StatusCode::SWITCHING_PROTOCOLS => {}
                Ok(Some(h)) => return Poll::Ready(Ok(h)),
                Ok(None) => match ready!(self.poll_fill(cx)) {
                    Ok(0) => {
                        return Poll::Ready(Err(
                            "the upstream closed the connection before its response".into(),
                        ));
                    }
                    Ok(_) => {}
                    Err(e) => return Poll::Ready(Err(e.into())),
                },
                Err(why) => {
                    return Poll::Ready(Err(format!("malformed response: {why}").into()));
                }
            }
        }
    }

    /// Sends `req` and reads its response's head. The response body reads
    /// the rest; the connection comes back from it when reusable.
    pub async fn send<B>(
        mut self: Box<Self>,
        req: Request<B>,
    ) -> Result<Response<ResponseBody<B>>, Failed<B>>
    where
        B: http_body::Body<Data = Bytes, Error: Into<BoxError> + std::fmt::Display> + Unpin,
    {
        if !self.is_open() {
            return Err(("the upstream closed the idle connection".into(), Some(req)));
        }
        let (parts, body) = req.into_parts();
        let connect = parts.method == Method::CONNECT;
        let asked_head = parts.method == Method::HEAD;
        let upgrade = connect || parts.headers.contains_key(http::header::UPGRADE);
        let mut sending = Sending {
            out: Outbox::default(),
            writer: Writer {
                body: None,
                out: Out::Length(0),
                trailers: None,
                any_trailer: true,
                failed: None,
            },
        };
        let length = http_body::Body::size_hint(&body).exact();
        // Room for the head and a body small enough to be copied next to
        // it, at once (growing the buffer for the body moved the head).
        let copied = length.filter(|&n| n < COPY_LIMIT as u64).unwrap_or(0) as usize;
        let staging = &mut sending.out.staging;
        staging.reserve(head::request_size(&parts) + copied);
        sending.writer.out = head::encode_request(&parts, length, staging);
        if !(connect || sending.writer.out == Out::Length(0) && body.is_end_stream()) {
            sending.writer.body = Some(body);
        }
        let mut writing = true;
        let head = std::future::poll_fn(|cx| {
            if writing {
                match sending.poll(&mut self.io, cx) {
                    Poll::Ready(Ok(())) => writing = false,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            self.poll_head(cx, asked_head, connect)
        })
        .await
        .map_err(|e| (e, None))?;
        let status = head.response.status();
        if status == StatusCode::SWITCHING_PROTOCOLS || (connect && status.is_success()) {
            if !upgrade {
                return Err(("101 to a request that asked for no upgrade".into(), None));
            }
            let rest = std::mem::take(&mut self.buf).freeze();
            let io: Upgraded = if rest.is_empty() {
                self.io
            } else {
                Box::new(Prefixed::new(rest, self.io))
            };
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(io);
            let mut resp = head.response.map(|()| ResponseBody::ended());
            resp.extensions_mut()
                .insert(OnUpgrade(Arc::new(Mutex::new(rx))));
            return Ok(resp);
        }
        let mut body = ResponseBody {
            conn: Some(self),
            decoder: Decoder::new(head.framing),
            sending: writing.then_some(sending),
            keep_alive: head.keep_alive,
            reusable: None,
        };
        if body.decoder.is_done() {
            body.end();
        }
        Ok(head.response.map(|()| body))
    }
}

/// The request's body still being sent.
struct Sending<B: http_body::Body> {
    out: Outbox,
    writer: Writer<B>,
}

impl<B> Sending<B>
where
    B: http_body::Body<Data = Bytes, Error: Into<BoxError> + std::fmt::Display> + Unpin,
{
    /// Ready(Ok) once the whole request is written; an error is the body's
    /// own when it failed, else the connection's.
    fn poll(&mut self, io: &mut Box<dyn Io>, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        ready!(self.writer.poll(&mut self.out, io, cx)).map_err(|()| {
            self.writer.failed.take().map_or_else(
                || BoxError::from("writing the request to the upstream failed"),
                Into::into,
            )
        })?;
        Poll::Ready(Ok(()))
    }
}

/// A response body, read off its connection as it is polled.
pub struct ResponseBody<B: http_body::Body> {
    /// The connection until the exchange ends.
    conn: Option<Box<Conn>>,
    decoder: Decoder,
    /// The request's body, when the response came before its end.
    sending: Option<Sending<B>>,
    keep_alive: bool,
    /// The connection, once the exchange ended with it fit for another
    /// request.
    reusable: Option<Box<Conn>>,
}

impl<B: http_body::Body> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("decoder", &self.decoder)
            .field("ended", &self.conn.is_none())
            .finish()
    }
}

impl<B: http_body::Body> ResponseBody<B> {
    /// No body, and no connection to give back.
    fn ended() -> Self {
        ResponseBody {
            conn: None,
            decoder: Decoder::Done,
            sending: None,
            keep_alive: false,
            reusable: None,
        }
    }

    /// The response has been read to its end.
    fn end(&mut self) {
        let conn = self.conn.take();
        if self.keep_alive && self.sending.is_none() {
            self.reusable = conn.map(|mut c| {
                c.rewind();
                c
            });
        }
        self.sending = None;
    }

    /// The exchange failed: the connection closes.
    fn fail(&mut self, e: impl Into<BoxError>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        self.sending = None;
        Poll::Ready(Some(Err(e.into())))
    }

    /// The connection, once the response has ended and the connection may
    /// carry another request.
    pub fn take_reusable(&mut self) -> Option<Box<Conn>> {
        self.reusable.take()
    }
}

// Nothing of it is pinned in place: its fields are only ever used by `&mut`.
impl<B: http_body::Body> Unpin for ResponseBody<B> {}

impl<B> http_body::Body for ResponseBody<B>
where
    B: http_body::Body<Data = Bytes, Error: Into<BoxError> + std::fmt::Display> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some(s) = this.sending.as_mut() {
            match s.poll(&mut conn.io, cx) {
                Poll::Ready(Ok(())) => this.sending = None,
                Poll::Ready(Err(e)) => return this.fail(e),
                Poll::Pending => {}
            }
        }
        loop {
            match this.decoder.decode(&mut conn.buf, MAX_TRAILERS) {
                Ok(Decoded::Data(d)) => {
                    if this.decoder.is_done() {
                        this.end();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Ok(Decoded::Trailers(t)) => {
                    this.end();
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
                Ok(Decoded::End) => {
                    this.end();
                    return Poll::Ready(None);
                }
                Ok(Decoded::More) => {}
                Err(e) => return this.fail(e),
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if matches!(this.decoder, Decoder::Close) => {
                    this.keep_alive = false;
                    this.end();
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return this
                        .fail("the upstream closed the connection before the response body ended");
                }
                Ok(_) => {}
                Err(e) => return this.fail(e),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Length(n) => SizeHint::with_exact(n),
            Decoder::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{Body, full};
    use crate::test_util::channel_body;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A connection whose upstream end the test plays by hand.
    fn pair() -> (Box<Conn>, DuplexStream) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        (Conn::new(a), b)
    }

    /// Sends `req` on `conn` from a task of its own.
    fn start(
        conn: Box<Conn>,
        req: Request<Body>,
    ) -> tokio::task::JoinHandle<Result<Response<ResponseBody<Body>>, Failed<Body>>> {
        tokio::spawn(conn.send(req))
    }

    /// The response of a send [`start`]ed.
    async fn done(
        send: tokio::task::JoinHandle<Result<Response<ResponseBody<Body>>, Failed<Body>>>,
    ) -> Response<ResponseBody<Body>> {
        send.await
            .expect("task")
            .map_err(|e| e.0)
            .expect("response")
    }

    /// Reads from the upstream end until `end` has been seen.
    async fn read_until(up: &mut DuplexStream, end: &[u8]) -> String {
        let mut got = Vec::new();
        while !got.windows(end.len()).any(|w| w == end) {
            let mut b = [0u8; 4096];
            let n = tokio::time::timeout(std::time::Duration::from_secs(10), up.read(&mut b))
                .await
                .expect("the client wrote nothing more")
                .expect("read");
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&b[..n]);
        }
        String::from_utf8(got).expect("utf-8")
    }

    async fn collect(
        mut resp: Response<ResponseBody<Body>>,
    ) -> (Vec<u8>, Option<http::HeaderMap>, Option<Box<Conn>>) {
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(f) = resp.body_mut().frame().await {
            let f = f.expect("frame");
            match f.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        (data, trailers, resp.body_mut().take_reusable())
    }

    #[tokio::test]
    async fn a_kept_alive_connection_carries_the_next_request() {
        let (conn, mut up) = pair();
        // HTTP/2 form: the authority becomes Host.
        let req = Request::post("http://app.shop:8080/a?b=c")
            .body(full("hello"))
            .expect("request");
        let send = start(conn, req);
        let head = read_until(&mut up, b"hello").await;
        assert!(head.starts_with("POST /a?b=c HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("host: app.shop:8080\r\n"), "{head}");
        assert!(head.contains("content-length: 5\r\n"), "{head}");
        up.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: 1\r\n\r\nok")
            .await
            .expect("write");
        let resp = done(send).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-a"], "1");
        let (data, _, conn) = collect(resp).await;
        assert_eq!(data, b"ok");
        let conn = conn.expect("reusable");

        let req = Request::get("/second").body(full("")).expect("request");
        let send = start(conn, req);
        let head = read_until(&mut up, b"\r\n\r\n").await;
        assert!(head.starts_with("GET /second HTTP/1.1\r\n"), "{head}");
        assert!(!head.contains("content-length"), "{head}");
        up.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .expect("write");
        let resp = done(send).await;
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        let (data, _, conn) = collect(resp).await;
        assert!(data.is_empty());
        assert!(conn.is_some(), "a 204 leaves the connection reusable");
    }

    #[tokio::test]
    async fn chunked_both_ways_with_trailers() {
        let (conn, mut up) = pair();
        let (tx, body) = channel_body();
        let req = Request::put("/up").body(body).expect("request");
        let send = start(conn, req);
        tx.send(Ok(Frame::data(Bytes::from_static(b"abc"))))
            .await
            .expect("send");
        let mut t = http::HeaderMap::new();
        t.insert("x-sum", "7".parse().expect("value"));
        tx.send(Ok(Frame::trailers(t))).await.expect("trailers");
        drop(tx);
        let got = read_until(&mut up, b"x-sum: 7\r\n\r\n").await;
        assert!(got.contains("transfer-encoding: chunked\r\n"), "{got}");
        assert!(
            got.ends_with("\r\n\r\n3\r\nabc\r\n0\r\nx-sum: 7\r\n\r\n"),
            "{got}"
        );
        up.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n1\r\n!\r\n0\r\nx-done: y\r\n\r\n")
            .await
            .expect("write");
        let resp = done(send).await;
        let (data, trailers, conn) = collect(resp).await;
        assert_eq!(data, b"hi!");
        assert_eq!(trailers.expect("trailers")["x-done"], "y");
        assert!(conn.is_some());
    }

    /// A large body is read in growing reads (frames of more than 8 KiB),
    /// and the connection goes back idle without the grown buffer.
    #[tokio::test]
    async fn a_large_body_is_read_in_growing_reads() {
        let (conn, mut up) = pair();
        let send = start(conn, Request::get("/big").body(full("")).expect("request"));
        read_until(&mut up, b"\r\n\r\n").await;
        const LEN: usize = 1 << 20;
        tokio::spawn(async move {
            up.write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {LEN}\r\n\r\n").as_bytes())
                .await
                .expect("write");
            up.write_all(&vec![b'x'; LEN]).await.expect("write");
            // Held open: the connection stays reusable.
            std::future::pending::<()>().await;
        });
        let mut resp = done(send).await;
        let (mut total, mut largest) = (0, 0);
        while let Some(f) = resp.body_mut().frame().await {
            let d = f.expect("frame").into_data().expect("data");
            total += d.len();
            largest = largest.max(d.len());
        }
        assert_eq!(total, LEN);
        assert!(largest > READ_SIZE, "the largest frame was {largest} bytes");
        let conn = resp.body_mut().take_reusable().expect("reusable");
        // The read size stays with the connection, for its next response.
        assert!(conn.read_size > READ_SIZE, "{}", conn.read_size);
        assert!(
            conn.buf.capacity() <= 2 * READ_SIZE,
            "{}",
            conn.buf.capacity()
        );
    }

    /// The size of reads stays with the connection: an upstream that
    /// answers 16 KiB each time is soon read in one read per response, and
    /// small answers bring the size back down.
    #[tokio::test]
    async fn read_sizes_follow_the_upstream_across_responses() {
        let (mut conn, mut up) = pair();
        let mut frames = Vec::new();
        for (i, len) in [16 * 1024; 3].into_iter().chain([10; 8]).enumerate() {
            let send = start(conn, Request::get("/").body(full("")).expect("request"));
            read_until(&mut up, b"\r\n\r\n").await;
            let mut answer =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n").into_bytes();
            answer.resize(answer.len() + len, b'z');
            up.write_all(&answer).await.expect("write");
            let mut resp = done(send).await;
            let mut got = Vec::new();
            while let Some(f) = resp.body_mut().frame().await {
                got.push(f.expect("frame").into_data().expect("data").len());
            }
            conn = resp.body_mut().take_reusable().expect("reusable");
            if i == 2 {
                frames = got;
                assert!(conn.read_size > 16 * 1024, "{}", conn.read_size);
            }
        }
        assert_eq!(frames, [16 * 1024], "the third 16 KiB response");
        assert_eq!(conn.read_size, READ_SIZE, "after small responses");
    }

    /// `Transfer-Encoding` beside a length: the body is read as chunked
    /// and the connection is not used again.
    #[tokio::test]
    async fn chunked_with_a_length_is_read_as_chunked_and_closes() {
        let (conn, mut up) = pair();
        let send = start(conn, Request::get("/").body(full("")).expect("request"));
        read_until(&mut up, b"\r\n\r\n").await;
        up.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
            .await
            .expect("write");
        let (data, _, conn) = collect(done(send).await).await;
        assert_eq!(data, b"ok");
        assert!(conn.is_none(), "not reusable");
    }

    #[tokio::test]
    async fn a_body_framed_by_the_connection_s_end_closes_it() {
        let (conn, mut up) = pair();
        let send = start(conn, Request::get("/").body(full("")).expect("request"));
        read_until(&mut up, b"\r\n\r\n").await;
        up.write_all(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
            .await
            .expect("write");
        drop(up);
        let resp = done(send).await;
        assert_eq!(resp.version(), http::Version::HTTP_10);
        let (data, _, conn) = collect(resp).await;
        assert_eq!(data, b"until the end");
        assert!(conn.is_none());
    }

    #[tokio::test]
    async fn informational_responses_are_skipped_and_head_has_no_body() {
        let (conn, mut up) = pair();
        let send = start(conn, Request::head("/").body(full("")).expect("request"));
        read_until(&mut up, b"\r\n\r\n").await;
        up.write_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n")
            .await
            .expect("write");
        let resp = done(send).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(http_body::Body::is_end_stream(resp.body()));
        let (data, _, conn) = collect(resp).await;
        assert!(data.is_empty());
        assert!(conn.is_some());
    }

    #[tokio::test]
    async fn a_response_before_the_request_s_end_ends_the_exchange() {
        let (conn, mut up) = pair();
        let (tx, body) = channel_body();
        let req = Request::post("/big")
            .header("content-length", "100")
            .body(body)
            .expect("request");
        let send = start(conn, req);
        tx.send(Ok(Frame::data(Bytes::from_static(b"part"))))
            .await
            .expect("send");
        read_until(&mut up, b"part").await;
        up.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 4\r\n\r\nbig!")
            .await
            .expect("write");
        let resp = done(send).await;
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let (data, _, conn) = collect(resp).await;
        assert_eq!(data, b"big!");
        assert!(conn.is_none(), "the rest of the request was never sent");
    }

    #[tokio::test]
    async fn a_request_body_that_fails_is_the_send_s_error() {
        let (conn, _up) = pair();
        let (tx, body) = channel_body();
        let req = Request::post("/").body(body).expect("request");
        let send = start(conn, req);
        tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
            .await
            .expect("send");
        // As `forward::prepare` marks a client's body failure.
        let failure = crate::http::ClientBodyError("the client went away".into());
        tx.send(Err(Box::new(failure))).await.expect("send");
        let (e, request) = send.await.expect("task").expect_err("failed");
        assert!(request.is_none());
        assert!(e.to_string().contains("went away"), "{e}");
        // Still the client's fault where the proxy answers it (400, not 502).
        assert!(crate::http::client_body_error(&*e).is_some(), "{e}");
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_hands_the_request_back() {
        let (mut conn, up) = pair();
        assert!(conn.is_open());
        drop(up);
        assert!(!conn.is_open());
        let (_, request) = conn
            .send(Request::get("/").body(full("")).expect("request"))
            .await
            .expect_err("closed");
        assert!(
            request.is_some(),
            "nothing was sent: it may go on another connection"
        );
    }

    #[tokio::test]
    async fn a_malformed_or_cut_response_is_an_error() {
        for reply in [
            &b"HTTP/1.1 2000 Huh\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            b"HTTP/1.1 200 O",
        ] {
            let (conn, mut up) = pair();
            let send = start(conn, Request::get("/").body(full("")).expect("request"));
            read_until(&mut up, b"\r\n\r\n").await;
            up.write_all(reply).await.expect("write");
            drop(up);
            let e = send.await.expect("task").expect_err("malformed").0;
            assert!(!e.to_string().is_empty());
        }
        // A body shorter than its length.
        let (conn, mut up) = pair();
        let send = start(conn, Request::get("/").body(full("")).expect("request"));
        read_until(&mut up, b"\r\n\r\n").await;
        up.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort")
            .await
            .expect("write");
        drop(up);
        let mut resp = done(send).await;
        let mut failed = false;
        while let Some(f) = resp.body_mut().frame().await {
            failed |= f.is_err();
        }
        assert!(failed);
        assert!(resp.body_mut().take_reusable().is_none());
    }

    #[tokio::test]
    async fn an_upgrade_hands_over_the_socket_with_what_was_read_past_the_head() {
        let (conn, mut up) = pair();
        let req = Request::get("/ws")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(full(""))
            .expect("request");
        let send = start(conn, req);
        let head = read_until(&mut up, b"\r\n\r\n").await;
        assert!(head.contains("upgrade: websocket\r\n"), "{head}");
        up.write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nearly")
            .await
            .expect("write");
        let mut resp = done(send).await;
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        let on = resp
            .extensions_mut()
            .remove::<OnUpgrade>()
            .expect("upgrade");
        let mut io = on.await.expect("upgraded");
        let mut b = [0u8; 5];
        tokio::time::timeout(std::time::Duration::from_secs(10), io.read_exact(&mut b))
            .await
            .expect("the bytes past the head are lost")
            .expect("read");
        assert_eq!(&b, b"early");
        io.write_all(b"ping").await.expect("write");
        let mut b = [0u8; 4];
        up.read_exact(&mut b).await.expect("read");
        assert_eq!(&b, b"ping");
    }
}
