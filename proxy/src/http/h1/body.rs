//! A request body as the connection reads it: the framing decoder
//! (`Content-Length` or chunked, trailers included) and the one-frame pipe
//! that hands what it decodes to the request's consumer.
//!
//! The pipe holds at most one frame: the connection reads the next bytes
//! of a body only once the consumer took the last frame, so a slow
//! upstream slows the client down instead of filling the proxy's memory.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Frame, SizeHint};

/// A body's error (the same type as the proxy's `http::BoxError`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Longest chunk-size line (size, extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// Most trailer fields accepted.
const MAX_TRAILERS: usize = 64;

/// How a message's body is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Framing {
    /// No body.
    Empty,
    /// `Content-Length`: this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the connection closes (responses only: no length, not chunked).
    Close,
}

/// Why a request body could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The chunked framing is malformed.
    #[error("malformed chunked body: {0}")]
    Chunked(&'static str),
    /// The trailer section is malformed or larger than allowed.
    #[error("malformed or oversized trailers")]
    Trailers,
    /// The client closed the connection before the body ended.
    #[error("the client closed the connection before the body ended")]
    Incomplete,
    /// Reading the connection failed.
    #[error("reading the request body: {0}")]
    Io(#[from] std::io::Error),
}

/// What one step of decoding gave.
#[derive(Debug)]
pub(super) enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The body ended.
    End,
    /// More bytes are needed.
    More,
}

/// Where a chunked body is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Chunk {
    /// At a chunk-size line.
    Size,
    /// In a chunk's data: bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer fields and the final CRLF.
    Trailers,
}

/// Decodes one body from the connection's read buffer.
#[derive(Debug)]
pub(super) enum Decoder {
    Length(u64),
    Chunked(Chunk),
    /// Everything until the connection closes; the reader ends it.
    Close,
    Done,
}

impl Decoder {
    pub(super) fn new(framing: Framing) -> Self {
        match framing {
            Framing::Empty | Framing::Length(0) => Decoder::Done,
            Framing::Length(n) => Decoder::Length(n),
            Framing::Chunked => Decoder::Chunked(Chunk::Size),
            Framing::Close => Decoder::Close,
        }
    }

    pub(super) fn is_done(&self) -> bool {
        matches!(self, Decoder::Done)
    }

    /// Takes the next frame of the body out of `buf`, which holds the
    /// bytes read after the head; `max_trailers` bounds the trailer
    /// section. Data frames share `buf`'s memory.
    pub(super) fn decode(
        &mut self,
        buf: &mut BytesMut,
        max_trailers: usize,
    ) -> Result<Decoded, BodyError> {
        loop {
            match self {
                Decoder::Done => return Ok(Decoded::End),
                Decoder::Close if buf.is_empty() => return Ok(Decoded::More),
                Decoder::Close => return Ok(Decoded::Data(buf.split().freeze())),
                Decoder::Length(left) => {
                    let Some(data) = take(buf, left) else {
                        return Ok(Decoded::More);
                    };
                    if *left == 0 {
                        *self = Decoder::Done;
                    }
                    return Ok(Decoded::Data(data));
                }
                Decoder::Chunked(Chunk::Size) => {
                    let Some(lf) = buf.iter().take(MAX_CHUNK_LINE).position(|&b| b == b'\n') else {
                        if buf.len() >= MAX_CHUNK_LINE {
                            return Err(BodyError::Chunked("chunk-size line too long"));
                        }
                        return Ok(Decoded::More);
                    };
                    let size = chunk_size(&buf[..lf])?;
                    buf.advance(lf + 1);
                    *self = Decoder::Chunked(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    });
                }
                Decoder::Chunked(Chunk::Data(left)) => {
                    let Some(data) = take(buf, left) else {
                        return Ok(Decoded::More);
                    };
                    if *left == 0 {
                        *self = Decoder::Chunked(Chunk::DataEnd);
                    }
                    return Ok(Decoded::Data(data));
                }
                Decoder::Chunked(Chunk::DataEnd) => {
                    if buf.len() < 2 {
                        if buf.first().is_some_and(|&b| b != b'\r') {
                            return Err(BodyError::Chunked("chunk data not followed by CRLF"));
                        }
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(BodyError::Chunked("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    *self = Decoder::Chunked(Chunk::Size);
                }
                Decoder::Chunked(Chunk::Trailers) => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        *self = Decoder::Done;
                        return Ok(Decoded::End);
                    }
                    if buf.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    let Some(end) = find(buf, b"\r\n\r\n") else {
                        if buf.len() > max_trailers {
                            return Err(BodyError::Trailers);
                        }
                        return Ok(Decoded::More);
                    };
                    if end + 4 > max_trailers {
                        return Err(BodyError::Trailers);
                    }
                    let section = buf.split_to(end + 4).freeze();
                    *self = Decoder::Done;
                    return Ok(Decoded::Trailers(trailers(&section)?));
                }
            }
        }
    }
}

/// What `buf` holds of the `left` bytes still due, taken out of it (and
/// counted off `left`); `None` when it holds nothing.
fn take(buf: &mut BytesMut, left: &mut u64) -> Option<Bytes> {
    if buf.is_empty() {
        return None;
    }
    let n = usize::try_from(*left).map_or(buf.len(), |l| buf.len().min(l));
    *left -= n as u64;
    Some(buf.split_to(n).freeze())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The size of a chunk-size line (without its LF): hex digits, optional
/// blanks, optional extensions, CR.
fn chunk_size(line: &[u8]) -> Result<u64, BodyError> {
    let Some(line) = line.strip_suffix(b"\r") else {
        return Err(BodyError::Chunked("chunk-size line not ended by CRLF"));
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(BodyError::Chunked("chunk size missing"));
    }
    if digits > 16 {
        return Err(BodyError::Chunked("chunk size too large"));
    }
    let rest = &line[digits..];
    let rest = &rest[rest
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count()..];
    if !rest.is_empty() && rest[0] != b';' {
        return Err(BodyError::Chunked("invalid byte after chunk size"));
    }
    if rest.iter().any(|&b| b == b'\r' || b == b'\n') {
        return Err(BodyError::Chunked("CR in chunk extension"));
    }
    let hex = std::str::from_utf8(&line[..digits]).map_err(|_| BodyError::Chunked("chunk size"))?;
    u64::from_str_radix(hex, 16).map_err(|_| BodyError::Chunked("chunk size too large"))
}

/// The trailer fields of `section` (ending with the empty line).
fn trailers(section: &Bytes) -> Result<HeaderMap, BodyError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILERS];
    // The whole section, CRLF line ends included: httparse also takes bare
    // LFs, and a section it ends earlier than the CRLF CRLF searched for
    // would swallow what follows it (a pipelined request).
    let parsed = match httparse::parse_headers(section, &mut fields) {
        Ok(httparse::Status::Complete((consumed, parsed))) if consumed == section.len() => parsed,
        _ => return Err(BodyError::Trailers),
    };
    let mut map = HeaderMap::with_capacity(parsed.len());
    for f in parsed {
        let name =
            http::HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| BodyError::Trailers)?;
        let value = http::HeaderValue::from_maybe_shared(section.slice_ref(f.value))
            .map_err(|_| BodyError::Trailers)?;
        map.append(name, value);
    }
    Ok(map)
}

/// The pipe's state, shared by the connection and the consumer.
#[derive(Debug, Default)]
struct Pipe {
    frame: Option<Result<Frame<Bytes>, BoxError>>,
    /// The connection will send no more frames.
    ended: bool,
    /// Why the body ended before its end, for the consumer once it has
    /// taken the frame in the slot.
    failed: Option<BoxError>,
    /// The consumer dropped the body.
    gone: bool,
    /// The consumer asked for a frame since the last one was sent.
    wanted: bool,
    consumer: Option<Waker>,
    connection: Option<Waker>,
}

type Shared = Arc<Mutex<Pipe>>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Pipe> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// A request body read from the client's connection (the consumer's end
/// of the pipe).
#[derive(Debug)]
pub struct RecvBody {
    shared: Option<Shared>,
    /// Bytes still to come (`Content-Length` bodies).
    left: Option<u64>,
}

/// The connection's end of the pipe.
#[derive(Debug)]
pub(super) struct Sender {
    shared: Shared,
}

/// A pipe for a body framed by `framing`; `None` for the sender when there
/// is no body.
pub(super) fn pipe(framing: Framing) -> (RecvBody, Option<Sender>) {
    match framing {
        Framing::Empty | Framing::Length(0) => (RecvBody::empty(), None),
        Framing::Length(_) | Framing::Chunked | Framing::Close => {
            let shared = Shared::default();
            let left = match framing {
                Framing::Length(n) => Some(n),
                _ => None,
            };
            (
                RecvBody {
                    shared: Some(shared.clone()),
                    left,
                },
                Some(Sender { shared }),
            )
        }
    }
}

impl RecvBody {
    /// A body with nothing in it.
    pub fn empty() -> Self {
        RecvBody {
            shared: None,
            left: Some(0),
        }
    }
}

impl http_body::Body for RecvBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(shared) = &this.shared else {
            return Poll::Ready(None);
        };
        let mut p = lock(shared);
        if let Some(frame) = p.frame.take() {
            if let (Ok(f), Some(left)) = (&frame, &mut this.left)
                && let Some(d) = f.data_ref()
            {
                *left = left.saturating_sub(d.len() as u64);
            }
            p.wanted = false;
            if let Some(w) = p.connection.take() {
                w.wake();
            }
            return Poll::Ready(Some(frame));
        }
        if p.ended {
            if let Some(e) = p.failed.take() {
                return Poll::Ready(Some(Err(e)));
            }
            if this.left.is_some_and(|n| n > 0) {
                // Ended short of its Content-Length: never a clean end.
                this.left = Some(0);
                return Poll::Ready(Some(Err(BodyError::Incomplete.into())));
            }
            return Poll::Ready(None);
        }
        if !p.wanted {
            p.wanted = true;
            if let Some(w) = p.connection.take() {
                w.wake();
            }
        }
        if !p.consumer.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            p.consumer = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        match &self.shared {
            None => true,
            Some(_) if self.left == Some(0) => true,
            Some(s) => {
                let p = lock(s);
                p.ended && p.frame.is_none() && p.failed.is_none()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Drop for RecvBody {
    fn drop(&mut self) {
        if let Some(s) = &self.shared {
            let mut p = lock(s);
            p.gone = true;
            p.frame = None;
            if let Some(w) = p.connection.take() {
                w.wake();
            }
        }
    }
}

/// What the connection's end of the pipe can do now.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Ready {
    /// The slot is free.
    Free,
    /// The consumer dropped the body.
    Gone,
}

impl Sender {
    /// Ready once the slot is free; with `wanted`, only once the consumer
    /// has also asked for a frame (to send `100 Continue` only then).
    pub(super) fn poll_ready(&self, cx: &mut Context<'_>, wanted: bool) -> Poll<Ready> {
        let mut p = lock(&self.shared);
        if p.gone {
            return Poll::Ready(Ready::Gone);
        }
        if p.frame.is_none() && (!wanted || p.wanted) {
            return Poll::Ready(Ready::Free);
        }
        if !p
            .connection
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            p.connection = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Puts a frame in the free slot.
    pub(super) fn send(&self, frame: Frame<Bytes>) {
        let mut p = lock(&self.shared);
        if p.gone {
            return;
        }
        p.frame = Some(Ok(frame));
        if let Some(w) = p.consumer.take() {
            w.wake();
        }
    }

    /// The body cannot be read to its end: the consumer sees `error` after
    /// the frame in the slot, if any, and no clean end.
    pub(super) fn fail(&self, error: BoxError) {
        self.fail_with(|| error);
    }

    /// [`Sender::fail`], the error made only if the body had not ended.
    fn fail_with(&self, error: impl FnOnce() -> BoxError) {
        let mut p = lock(&self.shared);
        if p.ended {
            return;
        }
        p.ended = true;
        p.failed = Some(error());
        if let Some(w) = p.consumer.take() {
            w.wake();
        }
    }

    /// No more frames: the body ended.
    pub(super) fn finish(&self) {
        let mut p = lock(&self.shared);
        p.ended = true;
        if let Some(w) = p.consumer.take() {
            w.wake();
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        // Dropped before the body ended (the connection closed or the
        // exchange was abandoned): the consumer sees an error, not an end.
        self.fail_with(|| BodyError::Incomplete.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;

    fn decode_all(
        framing: Framing,
        wire: &[u8],
    ) -> Result<(Vec<u8>, Option<HeaderMap>), BodyError> {
        let mut d = Decoder::new(framing);
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        let mut trailers = None;
        // One byte at a time: every state must wait for more at any cut.
        for &b in wire {
            buf.extend_from_slice(&[b]);
            loop {
                match d.decode(&mut buf, 1024)? {
                    Decoded::Data(d) => data.extend_from_slice(&d),
                    Decoded::Trailers(t) => trailers = Some(t),
                    Decoded::End | Decoded::More => break,
                }
            }
        }
        if !d.is_done() {
            return Err(BodyError::Incomplete);
        }
        Ok((data, trailers))
    }

    #[test]
    fn a_chunked_body_decodes_at_every_cut_with_extensions_and_trailers() {
        let wire = b"5;ext=1\r\nhello\r\n6 \r\n world\r\n0\r\nx-sum: 42\r\nx-two: a\r\n\r\n";
        let (data, trailers) = decode_all(Framing::Chunked, wire).expect("decodes");
        assert_eq!(data, b"hello world");
        let t = trailers.expect("trailers");
        assert_eq!(t["x-sum"], "42");
        assert_eq!(t["x-two"], "a");
    }

    #[test]
    fn a_length_body_ends_at_its_length_and_leaves_what_follows() {
        let mut d = Decoder::new(Framing::Length(3));
        let mut buf = BytesMut::from(&b"abcGET /"[..]);
        match d.decode(&mut buf, 1024).expect("decodes") {
            Decoded::Data(b) => assert_eq!(&b[..], b"abc"),
            other => panic!("{other:?}"),
        }
        assert!(d.is_done());
        assert_eq!(&buf[..], b"GET /");
    }

    #[test]
    fn malformed_chunked_framing_is_an_error() {
        for wire in [
            &b"zz\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5x\r\nhello\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
        ] {
            assert!(
                matches!(
                    decode_all(Framing::Chunked, wire),
                    Err(BodyError::Chunked(_))
                ),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    #[test]
    fn a_trailer_section_with_a_bare_lf_is_refused_not_stretched_over_the_next_request() {
        let wire = b"0\r\n\nGET /b HTTP/1.1\r\nhost: a\r\n\r\n";
        let mut d = Decoder::new(Framing::Chunked);
        let mut buf = BytesMut::from(&wire[..]);
        assert!(matches!(d.decode(&mut buf, 1024), Err(BodyError::Trailers)));
    }

    /// What is left of `body` ends in the error of a body cut short.
    fn assert_cut_short(body: RecvBody) {
        use http_body_util::BodyExt as _;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let err = rt.block_on(body.collect()).expect_err("cut short");
        assert!(err.to_string().contains("before the body ended"), "{err}");
    }

    #[test]
    fn a_body_cut_after_a_frame_ends_in_an_error_not_a_clean_end() {
        let (body, tx) = pipe(Framing::Chunked);
        let tx = tx.expect("a sender");
        tx.send(Frame::data(Bytes::from_static(b"ab")));
        drop(tx);
        assert_cut_short(body);
    }

    #[test]
    fn oversized_trailers_are_refused() {
        let mut wire = b"0\r\n".to_vec();
        for i in 0..100 {
            wire.extend_from_slice(format!("x-t{i}: {}\r\n", "v".repeat(20)).as_bytes());
        }
        wire.extend_from_slice(b"\r\n");
        assert!(matches!(
            decode_all(Framing::Chunked, &wire),
            Err(BodyError::Trailers)
        ));
    }

    #[test]
    fn the_pipe_hands_over_one_frame_at_a_time_and_reports_a_cut_body() {
        let (mut body, tx) = pipe(Framing::Length(4));
        let tx = tx.expect("a sender");
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(
            tx.poll_ready(&mut cx, true),
            Poll::Pending,
            "nobody asked yet"
        );
        assert!(
            std::pin::Pin::new(&mut body)
                .poll_frame(&mut cx)
                .is_pending()
        );
        assert_eq!(tx.poll_ready(&mut cx, true), Poll::Ready(Ready::Free));
        tx.send(Frame::data(Bytes::from_static(b"ab")));
        assert!(
            tx.poll_ready(&mut cx, false).is_pending(),
            "the slot is full"
        );
        let Poll::Ready(Some(Ok(f))) = std::pin::Pin::new(&mut body).poll_frame(&mut cx) else {
            panic!("a frame")
        };
        assert_eq!(f.into_data().expect("data"), "ab");
        assert_eq!(body.size_hint().exact(), Some(2));
        drop(tx);
        assert_cut_short(body);
    }
}
