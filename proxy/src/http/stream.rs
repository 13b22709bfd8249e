//! A body arriving on an HTTP/2 stream of h2's, for both sides of the
//! multiplexed hop ([`super::mux`]).

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::HeaderValue;
use http_body::{Frame, SizeHint};

/// A body arriving on an HTTP/2 stream (a response to weft's client, a
/// request to weft's server): data is handed on as it comes, and its
/// window given back to the peer as it is.
#[derive(Debug)]
pub struct RecvBody {
    recv: h2::RecvStream,
    /// Every data frame has been read; trailers (if any) are next.
    data_done: bool,
    /// What `content-length` said is still to come.
    remaining: Option<u64>,
}

impl RecvBody {
    /// The body of a message whose head said `length` (its size hint).
    pub fn new(recv: h2::RecvStream, length: Option<&HeaderValue>) -> Self {
        RecvBody {
            recv,
            data_done: false,
            remaining: length
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.parse().ok()),
        }
    }
}

impl http_body::Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Read: the peer may send that much more.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    if let Some(r) = self.remaining.as_mut() {
                        *r = r.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.recv.is_end_stream() {
            return SizeHint::with_exact(0);
        }
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
