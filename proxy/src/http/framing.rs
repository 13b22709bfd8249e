//! HTTP/1 request framing as the client sends it, followed next to hyper's
//! parser for two things hyper does not offer on a server connection:
//!
//! - **Refusing a head with both `Content-Length` and `Transfer-Encoding`.**
//!   RFC 9112 §6.1 lets a server refuse it or frame it by
//!   `Transfer-Encoding` alone; hyper does the latter and hides the
//!   `Content-Length` from the service. Such a head is how two parsers are
//!   made to disagree on where a request ends (request smuggling), so the
//!   proxy refuses it with 400 and never forwards it.
//! - **A header read timeout counted from the first byte of a head.**
//!   hyper's `header_read_timeout` runs from the moment it waits for a
//!   head, so it would also close every keep-alive connection idle for
//!   that long. [`HeadTimer`] gives hyper sleeps that do not run while no
//!   head has started.
//!
//! ```text
//! socket ─► Tracked (Scanner) ─► hyper http1 ─► Watch::refuses_next ─► service
//!              │ phase: idle / head since t0 / body / unknown; head #k refused
//!              └──► Watch ◄── HeadSleep (HeadTimer, hyper's timer): t0 + timeout
//! ```
//!
//! The [`Scanner`] follows the framing hyper applies to the requests it
//! accepts: leading empty lines, `Content-Length`, chunked bodies with
//! extensions and trailers. What it cannot follow (an upgrade or CONNECT,
//! whose later bytes may be a tunnel; a value longer than it keeps; bytes
//! hyper rejects anyway) makes it step aside for the rest of the
//! connection: no head is refused any more and the timeout runs from the
//! moment hyper waits for a head, as with hyper alone. Both are safe ends:
//! hyper drops `Content-Length` from such a head and closes the connection
//! after answering it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Bytes of a head line the scanner keeps: the names it looks for and
/// their values fit; a longer value of one of them makes it step aside.
const LINE: usize = 64;

/// What the client is sending now, as far as the scanner can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Nothing: between requests (an idle keep-alive connection).
    Idle,
    /// A request head, since its first byte arrived.
    Head(Instant),
    /// A request body.
    Body,
    /// The scanner stepped aside.
    Unknown,
}

/// What the scanner, hyper's timer and the service share on one connection.
#[derive(Debug)]
pub(crate) struct Watch {
    phase: Mutex<Phase>,
    /// Number (from 0) of the head to refuse; `u64::MAX`: none.
    refused: AtomicU64,
    /// Heads handed to the service so far.
    served: AtomicU64,
}

impl Watch {
    pub(crate) fn new() -> Self {
        Watch {
            phase: Mutex::new(Phase::Idle),
            refused: AtomicU64::new(u64::MAX),
            served: AtomicU64::new(0),
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_phase(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = phase;
    }

    /// Whether a head was refused on this connection.
    pub(crate) fn refused_one(&self) -> bool {
        let refused = self.refused.load(Ordering::Relaxed);
        refused != u64::MAX && self.served.load(Ordering::Relaxed) > refused
    }

    /// Called once per request hyper parsed, in order: whether it is the
    /// head the scanner found with both `Content-Length` and
    /// `Transfer-Encoding`.
    pub(crate) fn refuses_next(&self) -> bool {
        let n = self.served.fetch_add(1, Ordering::Relaxed);
        n == self.refused.load(Ordering::Relaxed)
    }
}

/// The scanner's place in the byte stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between requests; CR and LF are skipped, as hyper does.
    Idle,
    /// In a request head.
    Head,
    /// In a `Content-Length` body: bytes left.
    Body(u64),
    /// In a chunked body.
    Chunked(Chunk),
    /// Stepped aside for the rest of the connection.
    Aside,
}

/// Where in a chunked body, as hyper's decoder steps through it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Before the first hex digit of a size.
    Start,
    Size(u64),
    /// Blanks after the size.
    SizeLws(u64),
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk: a trailer line or the final CRLF.
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
    /// The body ended; the next request follows.
    Done,
}

/// What the current head says about its framing.
#[derive(Debug, Default)]
struct HeadFields {
    /// The request line is still being read.
    request_line: bool,
    content_length: Option<u64>,
    transfer_encoding: bool,
    chunked: bool,
    upgrade: bool,
}

impl HeadFields {
    /// Takes note of one line of the head; false when the scanner cannot
    /// follow this head.
    fn note(&mut self, line: &[u8], whole: bool) -> bool {
        let h = self;
        if h.request_line {
            h.request_line = false;
            // CONNECT: what follows a 2xx answer is a tunnel.
            h.upgrade |= line.starts_with(b"CONNECT ");
            return true;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            // A name longer than kept is none of those looked for; hyper
            // refuses a whole line without a colon.
            return true;
        };
        let name = &line[..colon];
        let value = trim(&line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"content-length") {
            let Some(n) = whole.then(|| digits(value)).flatten() else {
                return false;
            };
            if h.content_length.is_some_and(|m| m != n) {
                return false;
            }
            h.content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if !whole {
                return false;
            }
            h.transfer_encoding = true;
            h.chunked = value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| trim(last).eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            h.upgrade = true;
        }
        true
    }
}

/// Follows HTTP/1 request framing through the bytes a client sends.
#[derive(Debug)]
pub(crate) struct Scanner {
    state: State,
    head: HeadFields,
    /// The start of the current head line.
    line: [u8; LINE],
    /// Bytes of the current head line (also beyond those kept).
    len: usize,
    /// Heads completed so far.
    heads: u64,
}

impl Scanner {
    pub(crate) fn new() -> Self {
        Scanner {
            state: State::Idle,
            head: HeadFields::default(),
            line: [0; LINE],
            len: 0,
            heads: 0,
        }
    }

    /// Follows `bytes`, the next ones read from the client; tells `watch`
    /// when the phase changes and which head to refuse.
    pub(crate) fn scan(&mut self, mut bytes: &[u8], watch: &Watch) {
        while !bytes.is_empty() {
            let before = self.state;
            let used = match self.state {
                State::Aside => return,
                State::Idle => {
                    let skip = bytes
                        .iter()
                        .position(|b| !matches!(b, b'\r' | b'\n'))
                        .unwrap_or(bytes.len());
                    if skip < bytes.len() {
                        self.head = HeadFields {
                            request_line: true,
                            ..HeadFields::default()
                        };
                        self.len = 0;
                        self.state = State::Head;
                    }
                    skip
                }
                State::Head => self.head_bytes(bytes, watch),
                State::Body(left) => {
                    let n = left.min(bytes.len() as u64);
                    self.state = if n == left {
                        State::Idle
                    } else {
                        State::Body(left - n)
                    };
                    n as usize
                }
                State::Chunked(Chunk::Data(left)) => {
                    let n = left.min(bytes.len() as u64);
                    self.state = State::Chunked(if n == left {
                        Chunk::DataCr
                    } else {
                        Chunk::Data(left - n)
                    });
                    n as usize
                }
                State::Chunked(c) => {
                    self.state = match chunk_step(c, bytes[0]) {
                        Some(Chunk::Done) => State::Idle,
                        Some(next) => State::Chunked(next),
                        None => State::Aside,
                    };
                    1
                }
            };
            bytes = &bytes[used..];
            let body = |s| matches!(s, State::Body(_) | State::Chunked(_));
            if self.state != before && !(body(self.state) && body(before)) {
                watch.set_phase(match self.state {
                    State::Idle => Phase::Idle,
                    State::Head => Phase::Head(Instant::now()),
                    State::Body(_) | State::Chunked(_) => Phase::Body,
                    State::Aside => Phase::Unknown,
                });
            }
        }
    }

    /// Head bytes up to and including the end of the head; returns how
    /// many were used.
    fn head_bytes(&mut self, bytes: &[u8], watch: &Watch) -> usize {
        for (i, &b) in bytes.iter().enumerate() {
            if b != b'\n' {
                if let Some(slot) = self.line.get_mut(self.len) {
                    *slot = b;
                }
                self.len = self.len.saturating_add(1);
                continue;
            }
            let len = std::mem::take(&mut self.len);
            let kept = &self.line[..len.min(LINE)];
            let line = kept.strip_suffix(b"\r").unwrap_or(kept);
            let whole = len <= LINE;
            if line.is_empty() && whole {
                self.end_of_head(watch);
                return i + 1;
            }
            if !self.head.note(line, whole) {
                self.state = State::Aside;
                return i + 1;
            }
        }
        bytes.len()
    }

    fn end_of_head(&mut self, watch: &Watch) {
        let number = self.heads;
        self.heads += 1;
        let h = &self.head;
        self.state = if h.content_length.is_some() && h.transfer_encoding {
            watch.refused.store(number, Ordering::Relaxed);
            // hyper closes the connection after answering it.
            State::Aside
        } else if h.upgrade {
            State::Aside
        } else if h.transfer_encoding {
            if h.chunked {
                State::Chunked(Chunk::Start)
            } else {
                State::Aside
            }
        } else {
            match h.content_length {
                Some(n) if n > 0 => State::Body(n),
                _ => State::Idle,
            }
        };
    }
}

/// One byte of chunked framing outside chunk data; `None`: hyper rejects
/// it.
fn chunk_step(c: Chunk, b: u8) -> Option<Chunk> {
    let hex = |size: u64| {
        let d = (b as char).to_digit(16)?;
        size.checked_mul(16)?.checked_add(u64::from(d))
    };
    Some(match (c, b) {
        (Chunk::Start, _) => Chunk::Size(hex(0)?),
        (Chunk::Size(n), b'\t' | b' ') | (Chunk::SizeLws(n), b'\t' | b' ') => Chunk::SizeLws(n),
        (Chunk::Size(n) | Chunk::SizeLws(n) | Chunk::Extension(n), b';') => Chunk::Extension(n),
        (Chunk::Size(n) | Chunk::SizeLws(n) | Chunk::Extension(n), b'\r') => Chunk::SizeLf(n),
        (Chunk::Size(n), _) => Chunk::Size(hex(n)?),
        (Chunk::Extension(_), b'\n') => return None,
        (Chunk::Extension(n), _) => Chunk::Extension(n),
        (Chunk::SizeLf(0), b'\n') => Chunk::EndCr,
        (Chunk::SizeLf(n), b'\n') => Chunk::Data(n),
        (Chunk::DataCr, b'\r') => Chunk::DataLf,
        (Chunk::DataLf, b'\n') => Chunk::Start,
        (Chunk::EndCr, b'\r') => Chunk::EndLf,
        (Chunk::Trailer, b'\r') => Chunk::TrailerLf,
        (Chunk::EndCr | Chunk::Trailer, _) => Chunk::Trailer,
        (Chunk::TrailerLf, b'\n') => Chunk::EndCr,
        (Chunk::EndLf, b'\n') => Chunk::Done,
        _ => return None,
    })
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |i| i + 1);
    &v[start..end.max(start)]
}

/// A `Content-Length` value as hyper reads it: ASCII digits only.
fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))
            .flatten()
    })
}

/// The client's connection, its reads followed by a [`Scanner`].
#[derive(Debug)]
pub(crate) struct Tracked<I> {
    io: I,
    scanner: Scanner,
    watch: Arc<Watch>,
}

impl<I> Tracked<I> {
    pub(crate) fn new(io: I, watch: Arc<Watch>) -> Self {
        Tracked {
            io,
            scanner: Scanner::new(),
            watch,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        this.scanner.scan(&buf.filled()[before..], &this.watch);
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
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

/// hyper's timer on a server HTTP/1 connection, where hyper uses it for one
/// thing: the header read deadline, asked for each time it waits for a
/// head. Its sleeps end `timeout` after the head's first byte; while the
/// connection is idle they do not run. When the scanner stepped aside they
/// end when hyper asked, as hyper's own timer would.
#[derive(Clone, Debug)]
pub(crate) struct HeadTimer {
    watch: Arc<Watch>,
    timeout: Duration,
}

impl HeadTimer {
    pub(crate) fn new(watch: Arc<Watch>, timeout: Duration) -> Self {
        HeadTimer { watch, timeout }
    }
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until((Instant::now() + duration).into_std())
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let asked = Instant::from_std(deadline);
        Box::pin(HeadSleep {
            watch: self.watch.clone(),
            timeout: self.timeout,
            asked,
            sleep: tokio::time::sleep_until(asked),
        })
    }

    /// Moves the deadline of a sleep this timer made, in place: hyper
    /// re-arms its header deadline before every head, and a new sleep each
    /// time would cost two allocations per request.
    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: std::time::Instant) {
        match sleep.as_mut().downcast_mut_pin::<HeadSleep>() {
            Some(head) => {
                let asked = Instant::from_std(new_deadline);
                let head = head.project();
                *head.asked = asked;
                head.sleep.reset(asked);
            }
            None => *sleep = self.sleep_until(new_deadline),
        }
    }

    /// tokio's clock, so that tests with paused time see the same one.
    fn now(&self) -> std::time::Instant {
        Instant::now().into_std()
    }
}

pin_project_lite::pin_project! {
    /// A header read deadline; see [`HeadTimer`]. The sleep is held in
    /// place, so a deadline costs one allocation (hyper's box), not two.
    struct HeadSleep {
        watch: Arc<Watch>,
        timeout: Duration,
        // The deadline hyper asked for.
        asked: Instant,
        #[pin]
        sleep: tokio::time::Sleep,
    }
}

impl std::future::Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let deadline = match this.watch.phase() {
            // hyper polls this after each read that left its head
            // incomplete, so the first byte of a head is never missed.
            Phase::Idle => return Poll::Pending,
            Phase::Head(first_byte) => first_byte + *this.timeout,
            Phase::Body | Phase::Unknown => *this.asked,
        };
        if this.sleep.deadline() != deadline {
            this.sleep.as_mut().reset(deadline);
        }
        this.sleep.poll(cx)
    }
}

impl hyper::rt::Sleep for HeadSleep {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `bytes` split into reads of `step` bytes.
    fn scan(bytes: &[u8], step: usize) -> (Scanner, Arc<Watch>) {
        let watch = Arc::new(Watch::new());
        let mut s = Scanner::new();
        for part in bytes.chunks(step) {
            s.scan(part, &watch);
        }
        (s, watch)
    }

    fn refused(w: &Watch) -> Option<u64> {
        Some(w.refused.load(Ordering::Relaxed)).filter(|n| *n != u64::MAX)
    }

    const PIPELINE: &[u8] = b"\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n\
POST /b HTTP/1.1\r\nhost: x\r\nContent-Length: 5\r\n\r\nhello\
POST /c HTTP/1.1\nhost: x\nTransfer-Encoding: gzip, Chunked\n\n\
5;ext=1\r\nhello\r\n10 \r\n0123456789abcdef\r\n0\r\nx-trailer: 1\r\n\r\n\
PUT /d HTTP/1.1\r\ncontent-length:  3 \r\n\r\nabc";

    #[test]
    fn requests_of_every_framing_are_followed_through_any_read_split() {
        for step in [1, 2, 3, 7, 64, PIPELINE.len()] {
            let (s, w) = scan(PIPELINE, step);
            assert_eq!((s.heads, s.state), (4, State::Idle), "reads of {step}");
            assert_eq!(w.phase(), Phase::Idle);
            assert_eq!(refused(&w), None);
        }
    }

    #[test]
    fn a_head_with_content_length_and_transfer_encoding_is_marked_in_either_order() {
        for head in [
            &b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
        ] {
            let mut bytes = b"GET / HTTP/1.1\r\n\r\n".to_vec();
            bytes.extend_from_slice(head);
            let (s, w) = scan(&bytes, 5);
            assert_eq!(refused(&w), Some(1));
            assert_eq!(s.state, State::Aside);
            assert!(!w.refuses_next(), "the first request is served");
            assert!(w.refuses_next(), "the second is refused");
        }
    }

    #[test]
    fn the_phase_says_when_a_head_started_and_when_the_connection_is_idle() {
        let watch = Watch::new();
        let mut s = Scanner::new();
        assert_eq!(watch.phase(), Phase::Idle);
        s.scan(b"GET / HTTP/1.1\r\nHo", &watch);
        assert!(matches!(watch.phase(), Phase::Head(_)));
        s.scan(b"st: x\r\nContent-Length: 2\r\n\r\n", &watch);
        assert_eq!(watch.phase(), Phase::Body);
        s.scan(b"ok", &watch);
        assert_eq!(watch.phase(), Phase::Idle);
        s.scan(b"\r\n", &watch);
        assert_eq!(watch.phase(), Phase::Idle, "empty lines start no head");
    }

    #[test]
    fn what_the_scanner_cannot_follow_makes_it_step_aside() {
        for bytes in [
            &b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"[..],
            b"CONNECT db:5432 HTTP/1.1\r\nhost: db:5432\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;a\nb\r\n",
        ] {
            let (s, w) = scan(bytes, 4);
            assert_eq!(s.state, State::Aside, "{}", String::from_utf8_lossy(bytes));
            assert_eq!(w.phase(), Phase::Unknown);
            assert_eq!(refused(&w), None);
        }
        let mut long = b"POST / HTTP/1.1\r\nTransfer-Encoding: ".to_vec();
        long.extend(std::iter::repeat_n(b'x', LINE));
        long.extend_from_slice(b", chunked\r\nContent-Length: 1\r\n\r\n");
        let (s, w) = scan(&long, 9);
        assert_eq!((s.state, refused(&w)), (State::Aside, None));
    }

    #[test]
    fn long_lines_of_other_headers_are_skipped() {
        let mut bytes = b"GET / HTTP/1.1\r\nx-long: ".to_vec();
        bytes.extend(std::iter::repeat_n(b'a', 10 * LINE));
        bytes.extend_from_slice(b"\r\nContent-Length: 1\r\n\r\nzGET / HTTP/1.1\r\n\r\n");
        let (s, w) = scan(&bytes, 13);
        assert_eq!((s.heads, s.state, refused(&w)), (2, State::Idle, None));
    }

    /// How many requests hyper's server parses from `bytes` (sent at once,
    /// then the client's write side closes).
    fn hyper_requests(bytes: &[u8]) -> usize {
        use std::sync::atomic::AtomicUsize;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            use http_body_util::BodyExt as _;
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let (mut client, server) = tokio::io::duplex(1 << 20);
            let count = Arc::new(AtomicUsize::new(0));
            let c = count.clone();
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let c = c.clone();
                    async move {
                        if req.into_body().collect().await.is_ok() {
                            c.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok::<_, std::convert::Infallible>(http::Response::new(crate::http::full(
                            "",
                        )))
                    }
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .half_close(true)
                .serve_connection(hyper_util::rt::TokioIo::new(server), svc);
            let serve = tokio::spawn(conn);
            client.write_all(bytes).await.expect("write");
            client.shutdown().await.expect("shutdown");
            let mut answers = Vec::new();
            let _ = client.read_to_end(&mut answers).await;
            let _ = serve.await;
            count.load(Ordering::SeqCst)
        })
    }

    #[test]
    fn hyper_reads_the_example_requests_as_the_scanner_does() {
        assert_eq!(hyper_requests(PIPELINE), 4);
    }

    proptest::proptest! {
        /// Requests of every framing hyper accepts, pipelined, in reads of
        /// any size: the scanner ends where hyper does, after as many heads.
        #[test]
        fn the_scanner_counts_the_requests_hyper_reads(
            requests in proptest::collection::vec(
                (
                    0usize..3,
                    proptest::collection::vec(1usize..40, 0..4),
                    proptest::bool::ANY,
                    proptest::bool::ANY,
                ),
                1..6,
            ),
            step in 1usize..48,
        ) {
            let mut bytes = Vec::new();
            for (framing, sizes, upper, trailer) in &requests {
                bytes.extend_from_slice(b"POST /p HTTP/1.1\r\nhost: x\r\n");
                let body: usize = sizes.iter().sum();
                match framing {
                    0 => bytes.extend_from_slice(b"\r\n"),
                    1 => {
                        let name: &[u8] = if *upper { b"Content-Length" } else { b"content-length" };
                        bytes.extend_from_slice(name);
                        bytes.extend_from_slice(format!(": {body}\r\n\r\n").as_bytes());
                        bytes.extend(std::iter::repeat_n(b'b', body));
                    }
                    _ => {
                        bytes.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                        for n in sizes {
                            let ext = if *upper { ";x=1" } else { "" };
                            bytes.extend_from_slice(format!("{n:X}{ext}\r\n").as_bytes());
                            bytes.extend(std::iter::repeat_n(b'c', *n));
                            bytes.extend_from_slice(b"\r\n");
                        }
                        bytes.extend_from_slice(b"0\r\n");
                        if *trailer {
                            bytes.extend_from_slice(b"x-sum: 1\r\n");
                        }
                        bytes.extend_from_slice(b"\r\n");
                    }
                }
            }
            let (s, w) = scan(&bytes, step);
            proptest::prop_assert_eq!((s.heads, s.state), (requests.len() as u64, State::Idle));
            proptest::prop_assert_eq!(refused(&w), None);
            proptest::prop_assert_eq!(hyper_requests(&bytes), requests.len());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_header_deadline_runs_from_the_first_byte_of_a_head_only() {
        use hyper::rt::Timer as _;
        let watch = Arc::new(Watch::new());
        let timer = HeadTimer::new(watch.clone(), Duration::from_secs(10));
        let mut s = Scanner::new();
        // Idle keep-alive connection: hyper's deadline passes, nothing ends.
        let mut sleep = timer.sleep(Duration::from_secs(10));
        let idle = tokio::time::timeout(Duration::from_secs(60), &mut sleep).await;
        assert!(idle.is_err(), "an idle connection is not timed out");
        // A head starts 60 s later: 10 s from its first byte.
        s.scan(b"GET / HTTP/1.1\r\n", &watch);
        let started = Instant::now();
        sleep.as_mut().await;
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        // Stepped aside: hyper's own deadline.
        s.scan(b"\r\n", &watch);
        s.scan(b"GET / HTTP/1.1\r\nUpgrade: x\r\n\r\n", &watch);
        let asked = Instant::now();
        timer.sleep(Duration::from_secs(3)).await;
        assert_eq!(asked.elapsed(), Duration::from_secs(3));
    }
}
