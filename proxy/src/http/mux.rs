//! Both sides of the multiplexed hop between two weft proxies (ALPN
//! `weft/h2m`, decision 25), spoken with h2 directly.
//!
//! Client ([`Client`]): hyper's HTTP/2 client hands each request to the
//! connection's task over a channel, answers it over a oneshot, and sends a
//! request body from a task of its own. Here the request's own task opens
//! the stream, writes the head and, when the body is at hand before the
//! response head (the common case: a small body the app sent with its
//! head), the body too; only a body still streaming when the response head
//! arrives continues in a task of its own. The connection's task does what
//! only it can: reading frames and flushing what the streams queued.
//!
//! Server ([`serve`]): each stream's request runs in one task, which sends
//! the response head and body when the service answers, and drops the
//! service's future if the peer resets the stream (its client went away).
//!
//! What the hop carries was made HTTP/2 by [`super::form`] and stripped of
//! hop-by-hop fields by [`super::forward`]; upgrades and `CONNECT` never
//! take it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{HeaderValue, Request, Response};
use http_body::Body as _;

use super::h1::has_payload;
use super::stream::RecvBody;
use super::{Body, BoxError, ReqBody, SendFailed};

/// Initial flow-control window per stream, on what this side receives
/// (fixed, decision 25).
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// Initial flow-control window of the connection.
const CONN_WINDOW: u32 = 5 * 1024 * 1024;
/// Largest header list accepted in a response.
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Most bytes buffered per stream for sending.
const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// Streams opened before the peer's SETTINGS say how many it takes.
const INITIAL_STREAMS: usize = 100;
/// Streams this side resets on errors it finds, before it gives the
/// connection up (an errant peer).
const MAX_LOCAL_RESETS: usize = 1024;

/// A handle on one multiplexed connection; clones share it.
#[derive(Clone, Debug)]
pub struct Client {
    send: h2::client::SendRequest<Bytes>,
    /// Set once the connection's task has ended.
    closed: Arc<AtomicBool>,
}

/// The connection's half: polled by a task of its own until the connection
/// closes (every [`Client`] dropped and no stream open, or a failure).
pub struct Connection<I> {
    conn: h2::client::Connection<I, Bytes>,
    closed: Arc<AtomicBool>,
}

impl<I> std::fmt::Debug for Connection<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl<I> Future for Connection<I>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    type Output = Result<(), h2::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let r = ready!(Pin::new(&mut self.conn).poll(cx));
        self.closed.store(true, Ordering::Release);
        Poll::Ready(r)
    }
}

impl<I> Drop for Connection<I> {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
    }
}

/// The HTTP/2 handshake on a fresh `weft/h2m` connection.
pub async fn handshake<I>(io: I) -> Result<(Client, Connection<I>), h2::Error>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (send, conn) = h2::client::Builder::new()
        .initial_max_send_streams(INITIAL_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_local_error_reset_streams(Some(MAX_LOCAL_RESETS))
        .enable_push(false)
        .handshake(io)
        .await?;
    let closed = Arc::new(AtomicBool::new(false));
    Ok((
        Client {
            send,
            closed: closed.clone(),
        },
        Connection { conn, closed },
    ))
}

impl Client {
    /// Whether the connection has closed (it takes no more requests).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sends one request and waits for its response head. The request is
    /// handed back, unsent, when the connection could not take it.
    pub fn send(self, req: Request<Body>) -> Sending {
        Sending {
            stage: Stage::Waiting(self, req),
        }
    }

    /// Opens a stream for `req` and queues its head, and its body when
    /// that is already known to be empty.
    fn open(&mut self, req: Request<Body>) -> Result<Stage, h2::Error> {
        let (mut parts, body) = req.into_parts();
        if !parts.headers.contains_key(CONTENT_LENGTH)
            && let Some(len) = body.size_hint().exact()
            && (len != 0 || has_payload(&parts.method))
        {
            parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
        }
        super::never_indexed(&mut parts.headers);
        let end = body.is_end_stream();
        let (response, stream) = self
            .send
            .send_request(Request::from_parts(parts, ()), end)?;
        Ok(Stage::Sent(
            response,
            (!end).then_some(Pipe {
                body,
                stream,
                eager: true,
            }),
        ))
    }
}

/// [`Client::send`]'s future.
#[derive(Debug)]
pub struct Sending {
    stage: Stage,
}

#[derive(Debug)]
// In place in the request's future: boxing the request would cost an
// allocation per request.
#[allow(clippy::large_enum_variant)]
enum Stage {
    /// Waiting for a stream: past the peer's concurrent-stream limit, h2
    /// holds a request back until one closes.
    Waiting(Client, Request<Body>),
    /// The head is queued; the body goes with it until the response head
    /// arrives.
    Sent(h2::client::ResponseFuture, Option<Pipe>),
    Done,
}

impl Future for Sending {
    type Output = Result<Response<RecvBody>, SendFailed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Stage::Waiting(client, _) = &mut this.stage {
            let ready = ready!(client.send.poll_ready(cx));
            if let Stage::Waiting(mut client, req) = std::mem::replace(&mut this.stage, Stage::Done)
            {
                this.stage = match ready {
                    Ok(()) => client.open(req).map_err(|e| SendFailed {
                        error: e.into(),
                        request: None,
                    })?,
                    Err(e) => {
                        return Poll::Ready(Err(SendFailed {
                            error: e.into(),
                            request: Some(req),
                        }));
                    }
                };
            }
        }
        let Stage::Sent(response, pipe) = &mut this.stage else {
            return Poll::Pending;
        };
        if let Some(p) = pipe.as_mut() {
            match p.poll_send(cx) {
                Poll::Ready(Ok(())) => *pipe = None,
                // The client's body failed: the stream is reset, and the
                // failure is the client's to answer.
                Poll::Ready(Err(error)) => {
                    this.stage = Stage::Done;
                    return Poll::Ready(Err(SendFailed {
                        error,
                        request: None,
                    }));
                }
                Poll::Pending => {}
            }
        }
        let resp = ready!(Pin::new(response).poll(cx));
        let Stage::Sent(_, pipe) = std::mem::replace(&mut this.stage, Stage::Done) else {
            return Poll::Pending;
        };
        let resp = resp.map_err(|e| SendFailed {
            error: e.into(),
            request: None,
        })?;
        if let Some(mut p) = pipe {
            // A body still streaming (a gRPC stream, a large upload) goes on
            // beside the response.
            tokio::spawn(std::future::poll_fn(move |cx| {
                p.poll_send(cx).map(|r| {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "request body not sent whole");
                    }
                })
            }));
        }
        let (parts, recv) = resp.into_parts();
        let body = RecvBody::new(recv, parts.headers.get(CONTENT_LENGTH));
        Poll::Ready(Ok(Response::from_parts(parts, body)))
    }
}

/// Initial flow-control windows of a served connection, per stream and
/// for the connection (fixed, decision 25).
const SERVER_WINDOW: u32 = 1024 * 1024;
/// Most bytes buffered per stream for sending, served side.
const SERVER_SEND_BUFFER: usize = 400 * 1024;

/// Serves a multiplexed connection from a peer proxy until it closes or
/// `ended` resolves (then it finishes gracefully: streams open by then
/// complete, no new ones are taken). Each stream's request goes to `svc`;
/// at most `max_streams` are open at once, and a header list over
/// `max_header_bytes` is answered 431 by h2 without reaching `svc`.
pub async fn serve<I, S, F>(
    io: I,
    max_streams: u32,
    max_header_bytes: usize,
    svc: S,
    ended: impl Future<Output = ()>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    S: Fn(Request<ReqBody>) -> F + Clone + Send + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(SERVER_WINDOW)
        .initial_connection_window_size(SERVER_WINDOW)
        .max_concurrent_streams(max_streams)
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
        .max_send_buffer_size(SERVER_SEND_BUFFER)
        .max_local_error_reset_streams(Some(MAX_LOCAL_RESETS))
        .handshake::<_, Bytes>(io);
    let mut conn = match handshake.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "multiplexed connection failed its handshake");
            return;
        }
    };
    let mut ended = std::pin::pin!(ended);
    let mut ending = false;
    loop {
        let next = std::future::poll_fn(|cx| {
            if !ending && ended.as_mut().poll(cx).is_ready() {
                ending = true;
                conn.graceful_shutdown();
            }
            conn.poll_accept(cx)
        })
        .await;
        match next {
            Some(Ok((req, respond))) => {
                let (parts, recv) = req.into_parts();
                let body = RecvBody::new(recv, parts.headers.get(CONTENT_LENGTH));
                let req = Request::from_parts(parts, ReqBody::Mux(body));
                tokio::spawn(answer(svc.clone(), req, respond));
            }
            // h2 reports here what ends the connection (a stream's own
            // failure stays with the stream).
            Some(Err(e)) => {
                tracing::debug!(error = %e, "multiplexed connection ended with error");
                return;
            }
            None => return,
        }
    }
}

/// Runs one stream's request through `svc` and sends its response. The
/// service is called inside: a future made outside and awaited here would
/// be held twice.
async fn answer<S, F>(svc: S, req: Request<ReqBody>, mut respond: h2::server::SendResponse<Bytes>)
where
    S: Fn(Request<ReqBody>) -> F,
    F: Future<Output = Response<Body>>,
{
    let resp = {
        let mut fut = std::pin::pin!(svc(req));
        let answered = std::future::poll_fn(|cx| {
            if let Poll::Ready(resp) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(resp));
            }
            // The peer reset the stream (its client went away): the
            // request is dropped where it stands.
            if respond.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        match answered {
            Some(resp) => resp,
            None => return,
        }
    };
    let (mut parts, body) = resp.into_parts();
    // Fields of one connection have no place on a stream.
    super::strip_hop_by_hop(&mut parts.headers, false);
    parts.headers.remove(http::header::TE);
    let end = body.is_end_stream();
    if !end
        && !parts.headers.contains_key(CONTENT_LENGTH)
        && let Some(len) = body.size_hint().exact()
    {
        parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    }
    let stream = match respond.send_response(Response::from_parts(parts, ()), end) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "response head not sent");
            return;
        }
    };
    if !end {
        let mut pipe = Pipe {
            body,
            stream,
            eager: false,
        };
        if let Err(e) = std::future::poll_fn(|cx| pipe.poll_send(cx)).await {
            tracing::debug!(error = %e, "response body failed; stream reset");
        }
    }
}

/// A request body on its way into its stream.
#[derive(Debug)]
struct Pipe {
    body: Body,
    stream: h2::SendStream<Bytes>,
    /// The body's first frame, when at hand, is queued without waiting for
    /// the stream's share of the window. A new stream has none until the
    /// connection's task has sent its head: waiting for it sent the head
    /// in one TLS record and write and the body in another, where queued
    /// beside it they leave together. One frame the body already holds is
    /// all this queues past the window.
    eager: bool,
}

impl Pipe {
    /// Sends what the body has, as the peer's window allows; ready when the
    /// body has ended (or the peer reset the stream, which the response
    /// reports). An error is the body's own.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            // The peer gave up on the stream: nothing more to send.
            if self.stream.poll_reset(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            // Read no more of the body than the peer can take now, so a
            // slow peer holds the client back instead of filling memory.
            self.stream.reserve_capacity(1);
            // Only the first turn may skip the wait, whatever the window.
            let eager = std::mem::take(&mut self.eager);
            if self.stream.capacity() == 0 && !eager {
                match ready!(self.stream.poll_capacity(cx)) {
                    Some(Ok(_)) => continue,
                    // The stream or the connection is gone; the response
                    // says why.
                    Some(Err(_)) | None => return Poll::Ready(Ok(())),
                }
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => {
                    let _ = self.stream.send_data(Bytes::new(), true);
                    return Poll::Ready(Ok(()));
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let end = self.body.is_end_stream();
                        if self.stream.send_data(data, end).is_err() || end {
                            return Poll::Ready(Ok(()));
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            let _ = self.stream.send_trailers(trailers);
                        } else {
                            let _ = self.stream.send_data(Bytes::new(), true);
                        }
                        return Poll::Ready(Ok(()));
                    }
                },
                Some(Err(e)) => {
                    self.stream.send_reset(h2::Reason::INTERNAL_ERROR);
                    return Poll::Ready(Err(e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::channel_body;
    use http::Method;
    use http_body::Frame;
    use http_body_util::{BodyExt as _, StreamBody};

    /// A client on one end of an in-memory pipe; the h2 server's end is
    /// handed to `serve`.
    async fn pair<F, Fut>(serve: F) -> Client
    where
        F: FnOnce(h2::server::Connection<tokio::io::DuplexStream, Bytes>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let (a, b) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let conn = h2::server::handshake(b).await.expect("server handshake");
            serve(conn).await;
        });
        let (client, conn) = handshake(a).await.expect("client handshake");
        tokio::spawn(conn);
        client
    }

    /// `fut`, or a failure if it hangs (a stream that never ends).
    async fn settled<T>(fut: impl Future<Output = T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(10), fut)
            .await
            .expect("no hang")
    }

    fn post(body: Body) -> Request<Body> {
        Request::post("http://echo.shop/upload")
            .version(http::Version::HTTP_2)
            .body(body)
            .expect("request")
    }

    /// The server answers a request's head at once, then reads its body to
    /// the end and reports what it got in the trailers: a body that is
    /// still streaming when the response head arrives must reach it whole.
    #[tokio::test]
    async fn a_body_still_streaming_when_the_answer_comes_is_sent_to_its_end() {
        let client = pair(|mut conn| async move {
            let (req, mut respond) = conn.accept().await.expect("a stream").expect("a request");
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let resp = Response::builder()
                .header(CONTENT_LENGTH, "2")
                .body(())
                .expect("response");
            let mut send = respond.send_response(resp, false).expect("head");
            send.send_data(Bytes::from_static(b"ok"), false)
                .expect("data");
            let mut body = req.into_body();
            let mut got = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.expect("request data");
                let _ = body.flow_control().release_capacity(chunk.len());
                got.extend_from_slice(&chunk);
            }
            let mut trailers = http::HeaderMap::new();
            trailers.insert(
                "x-got",
                HeaderValue::from_str(std::str::from_utf8(&got).expect("utf-8")).expect("value"),
            );
            send.send_trailers(trailers).expect("trailers");
        })
        .await;
        let (tx, body) = channel_body();
        tx.send(Ok(Frame::data(Bytes::from_static(b"first "))))
            .await
            .expect("first chunk");
        let resp = client.send(post(body)).await.expect("a response");
        assert_eq!(
            resp.body().size_hint().exact(),
            Some(2),
            "from content-length"
        );
        // Only now the rest of the body.
        tx.send(Ok(Frame::data(Bytes::from_static(b"second"))))
            .await
            .expect("second chunk");
        drop(tx);
        let all = settled(resp.into_body().collect())
            .await
            .expect("the whole answer");
        let trailers = all.trailers().cloned().expect("trailers");
        assert_eq!(all.to_bytes(), "ok");
        assert_eq!(trailers["x-got"], "first second");
    }

    /// A request body that fails is the client's fault: the stream is
    /// reset and the send fails with the body's own error, which
    /// `client_body_error` recognises.
    #[tokio::test]
    async fn a_failing_request_body_resets_the_stream_and_blames_the_client() {
        let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
        let client = pair(|mut conn| async move {
            let (req, _respond) = conn.accept().await.expect("a stream").expect("a request");
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let mut body = req.into_body();
            let mut outcome = None;
            while let Some(chunk) = body.data().await {
                if let Err(e) = chunk {
                    outcome = e.reason();
                    break;
                }
            }
            let _ = seen_tx.send(outcome);
        })
        .await;
        let (tx, body) = channel_body();
        let body = crate::http::boxed(body.map_err(crate::http::ClientBodyError));
        tx.send(Ok(Frame::data(Bytes::from_static(b"part"))))
            .await
            .expect("chunk");
        tx.send(Err("malformed chunk".into())).await.expect("error");
        let failed = client.send(post(body)).await.expect_err("the body failed");
        assert!(failed.request.is_none(), "the head had left");
        let blamed = crate::http::client_body_error(&*failed.error);
        assert!(
            blamed
                .as_deref()
                .is_some_and(|e| e.contains("malformed chunk")),
            "{blamed:?}"
        );
        assert_eq!(
            settled(seen_rx)
                .await
                .expect("the server saw the stream end"),
            Some(h2::Reason::INTERNAL_ERROR)
        );
    }

    /// An in-memory connection that keeps what each write put on it.
    struct Recorder {
        io: tokio::io::DuplexStream,
        writes: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    }

    impl tokio::io::AsyncRead for Recorder {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl tokio::io::AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, buf))?;
            self.writes.lock().expect("writes").push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// A request whose body is at hand when it is sent leaves in one write
    /// with its head (over mTLS: one record, one syscall), not after the
    /// connection has sent the head and given the new stream its window.
    #[tokio::test]
    async fn a_body_at_hand_leaves_in_the_same_write_as_its_head() {
        let (a, mut peer) = tokio::io::duplex(64 * 1024);
        let writes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (client, conn) = handshake(Recorder {
            io: a,
            writes: writes.clone(),
        })
        .await
        .expect("client handshake");
        tokio::spawn(conn);
        // No peer answers: the request waits for its response.
        tokio::spawn(client.send(post(crate::http::full("hello"))));
        let frames = settled(crate::test_util::client_frames(&mut peer, |f| {
            f.iter().any(|f| f.kind == 0 && f.stream == 1)
        }))
        .await;
        // Which write each byte offset came from.
        let writes = writes.lock().expect("writes").clone();
        let write_of = |end: usize| {
            let mut total = 0;
            writes
                .iter()
                .position(|w| {
                    total += w.len();
                    end <= total
                })
                .expect("written")
        };
        let head = frames
            .iter()
            .find(|f| f.kind == 1 && f.stream == 1)
            .expect("the HEADERS frame");
        let data = frames
            .iter()
            .find(|f| f.kind == 0 && f.stream == 1)
            .expect("the DATA frame");
        assert_eq!(
            write_of(head.end),
            write_of(data.end),
            "head and body in one write ({} writes: {:?})",
            writes.len(),
            writes.iter().map(Vec::len).collect::<Vec<_>>()
        );
    }

    /// Once the connection has closed, a request is handed back unsent, to
    /// be retried on a fresh connection.
    #[tokio::test]
    async fn a_closed_connection_hands_the_request_back() {
        let client = pair(|conn| async move { drop(conn) }).await;
        for _ in 0..100 {
            if client.is_closed() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(client.is_closed());
        let failed = client
            .send(post(crate::http::full(Bytes::from_static(b"x"))))
            .await
            .expect_err("no connection");
        let back = failed.request.expect("the request, unsent");
        assert_eq!(back.uri().path(), "/upload");
    }

    /// A client and weft's server on the two ends of an in-memory pipe;
    /// `end` ends the server's connection gracefully.
    async fn served<S, F>(svc: S) -> (Client, tokio::sync::oneshot::Sender<()>)
    where
        S: Fn(Request<ReqBody>) -> F + Clone + Send + 'static,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (end, ended) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(b, 8, 16 * 1024, svc, async move {
            let _ = ended.await;
        }));
        let (client, conn) = handshake(a).await.expect("client handshake");
        tokio::spawn(conn);
        (client, end)
    }

    /// Echoes the request body, with its length in a trailer and fields
    /// that belong to one connection, which a stream must not carry.
    async fn echo(req: Request<ReqBody>) -> Response<Body> {
        let body = req.into_body().collect().await.expect("request body");
        let data = body.to_bytes();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-length", HeaderValue::from(data.len()));
        let frames = [
            Ok::<_, BoxError>(Frame::data(data)),
            Ok(Frame::trailers(trailers)),
        ];
        Response::builder()
            .header("connection", "keep-alive, x-hop")
            .header("keep-alive", "timeout=5")
            .header("x-hop", "1")
            .header("transfer-encoding", "chunked")
            .header("te", "trailers")
            .body(crate::http::boxed(StreamBody::new(futures::stream::iter(
                frames,
            ))))
            .expect("response")
    }

    /// A request crosses weft's client and server whole: its body reaches
    /// the service, the answer comes back with its trailers, and the
    /// fields of one connection the service set stay behind.
    #[tokio::test]
    async fn a_served_request_reaches_the_service_and_its_answer_comes_back_whole() {
        let (client, _end) = served(echo).await;
        let resp = settled(client.send(post(crate::http::full(Bytes::from_static(b"hello")))))
            .await
            .expect("a response");
        for hop in [
            "connection",
            "keep-alive",
            "x-hop",
            "transfer-encoding",
            "te",
        ] {
            assert!(resp.headers().get(hop).is_none(), "{hop} crossed the hop");
        }
        let all = settled(resp.into_body().collect())
            .await
            .expect("the answer");
        let trailers = all.trailers().cloned().expect("trailers");
        assert_eq!(all.to_bytes(), "hello");
        assert_eq!(trailers["x-length"], "5");
    }

    /// Streams of one connection are answered side by side: an answer that
    /// waits holds back none of the others.
    #[tokio::test]
    async fn an_answer_that_waits_holds_back_no_other_stream() {
        let (go_tx, go_rx) = tokio::sync::watch::channel(false);
        let go_tx = Arc::new(go_tx);
        let (client, _end) = served(move |req: Request<ReqBody>| {
            let (mut go, go_tx) = (go_rx.clone(), go_tx.clone());
            async move {
                if req.uri().path() == "/first" {
                    // Answers only once the second request was answered.
                    let _ = go.wait_for(|g| *g).await;
                } else {
                    go_tx.send_replace(true);
                }
                echo(req).await
            }
        })
        .await;
        let request = |path: &str, body: &'static [u8]| {
            Request::post(format!("http://echo{path}"))
                .version(http::Version::HTTP_2)
                .body(crate::http::full(Bytes::from_static(body)))
                .expect("request")
        };
        let first = tokio::spawn(client.clone().send(request("/first", b"first")));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let second = settled(client.send(request("/second", b"second")))
            .await
            .expect("the second is answered while the first waits");
        assert_eq!(second.status(), http::StatusCode::OK);
        let first = settled(first).await.expect("task").expect("the first");
        let all = settled(first.into_body().collect()).await.expect("body");
        assert_eq!(all.to_bytes(), "first");
    }

    /// When the peer resets a stream (its client went away), the request's
    /// future in the service is dropped where it stands.
    #[tokio::test]
    async fn a_stream_the_peer_resets_drops_its_request() {
        let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
        let dropped_tx = Arc::new(std::sync::Mutex::new(Some(dropped_tx)));
        let (client, _end) = served(move |_req| {
            // Sends when dropped: never answers.
            let guard = dropped_tx.lock().expect("lock").take();
            async move {
                let _guard = guard;
                std::future::pending::<()>().await;
                Response::new(crate::http::full(Bytes::new()))
            }
        })
        .await;
        let mut sending = Box::pin(client.send(post(crate::http::full(Bytes::new()))));
        // The request leaves; no answer comes.
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(50), sending.as_mut()).await;
        assert!(waited.is_err(), "the service never answers");
        drop(sending);
        // Dropping the request resets its stream; the server drops the
        // service's future, whose guard's sender goes with it.
        assert!(
            settled(dropped_rx).await.is_err(),
            "the request's future was dropped"
        );
    }

    /// Ending the connection lets an open stream finish and takes no new
    /// one.
    #[tokio::test]
    async fn an_ended_connection_finishes_its_open_streams_and_takes_no_more() {
        let (go_tx, go_rx) = tokio::sync::watch::channel(false);
        let (client, end) = served(move |req| {
            let mut go = go_rx.clone();
            async move {
                let _ = go.wait_for(|g| *g).await;
                echo(req).await
            }
        })
        .await;
        let first = tokio::spawn(
            client
                .clone()
                .send(post(crate::http::full(Bytes::from_static(b"in flight")))),
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        end.send(()).expect("the server is up");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        go_tx.send(true).expect("the service waits");
        let resp = settled(first)
            .await
            .expect("the task")
            .expect("the open stream is answered");
        let all = settled(resp.into_body().collect())
            .await
            .expect("the answer");
        assert_eq!(all.to_bytes(), "in flight");
        let later = settled(client.send(post(crate::http::full(Bytes::new())))).await;
        assert!(later.is_err(), "no new stream after the end");
    }

    /// A body of a known size crosses the hop with its `content-length`
    /// both ways, even when its head had none: an empty POST's `0`, the
    /// request body's and the answer's lengths; a GET without a body gets
    /// none.
    #[tokio::test]
    async fn a_body_of_known_size_carries_its_length_across() {
        let (client, _end) = served(|req: Request<ReqBody>| async move {
            let saw = req
                .headers()
                .get(CONTENT_LENGTH)
                .map_or("none".to_owned(), |v| v.to_str().expect("ascii").to_owned());
            // No content-length of its own: the body's size says it.
            Response::builder()
                .header("x-saw-length", saw)
                .body(crate::http::full(Bytes::from_static(b"abc")))
                .expect("response")
        })
        .await;
        let cases = [
            (Method::POST, &b"hello"[..], "5"),
            (Method::POST, &b""[..], "0"),
            (Method::GET, &b""[..], "none"),
        ];
        for (method, body, want) in cases {
            let req = Request::builder()
                .method(method.clone())
                .uri("http://echo.shop/length")
                .version(http::Version::HTTP_2)
                .body(crate::http::full(Bytes::from_static(body)))
                .expect("request");
            let resp = settled(client.clone().send(req)).await.expect("a response");
            assert_eq!(resp.headers()["x-saw-length"], want, "{method}");
            assert_eq!(resp.headers()[CONTENT_LENGTH], "3", "{method}");
            assert_eq!(resp.body().size_hint().exact(), Some(3), "{method}");
        }
    }
}
