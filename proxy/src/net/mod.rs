//! Sockets under the proxy, shared by both directions: accepting on a
//! capture listener ([`listen`]), what the first bytes are ([`detect`]),
//! where a captured connection was going ([`OrigDst`]), how the proxy
//! dials out ([`Dialer`]), and replaying bytes already read for protocol
//! detection ([`Prefixed`]). The bottom of the crate with `tls`,
//! `metrics` and the config crate: nothing here knows a config or a
//! listener's policy.
//!
//! Both traits exist so that component tests can run the transparent-proxy
//! logic on loopback without iptables: see [`stamp`].

pub mod detect;
pub mod end;
pub mod listen;
pub mod orig_dst;
pub mod park;
#[cfg(any(test, feature = "test-util"))]
pub mod stamp;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// A boxed future returned by the network traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Finds the destination a captured connection was addressed to.
pub trait OrigDst: Send + Sync + std::fmt::Debug {
    /// The original destination of an accepted connection.
    fn original_dst(&self, conn: &TcpStream) -> io::Result<SocketAddr>;
}

/// Opens outgoing TCP connections.
pub trait Dialer: Send + Sync + std::fmt::Debug {
    /// Connects to `dst`.
    fn connect(&self, dst: SocketAddr) -> BoxFuture<'_, io::Result<TcpStream>>;
}

/// How long [`close_after_answer`] keeps reading what the client still
/// sends, and how much of it.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// Writes `answer`, ends the write side, then reads and drops what the
/// client still sends (the rest of its request) until it closes, for at
/// most [`LINGER`] and 1 MiB. Closing a socket with unread bytes makes the
/// kernel reset the connection, and a reset destroys the answer the client
/// has not read yet: without this a refused request with a body, or one
/// that arrived in several segments, sees "connection reset" instead of
/// the answer that says why.
pub async fn close_after_answer(mut conn: TcpStream, answer: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if conn.write_all(answer).await.is_err() || conn.shutdown().await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(LINGER, async {
        // On the heap: a buffer in the future would make every inbound
        // connection's task, which may take this path, 8 KiB larger.
        let mut buf = vec![0u8; 8192];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Binds a listener. An unspecified address (`0.0.0.0` or `[::]`) becomes
/// one dual-stack `[::]` socket (`IPV6_V6ONLY` off), so connections captured
/// by the IPv4 and the IPv6 rules reach the same listener; in a namespace
/// without IPv6 it falls back to `0.0.0.0`. Other addresses bind as given.
pub fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    if !addr.ip().is_unspecified() {
        return bind_one(addr, false);
    }
    let any6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, addr.port()));
    match bind_one(any6, true) {
        Ok(l) => Ok(l),
        Err(e)
            if addr.is_ipv4()
                && matches!(
                    e.raw_os_error(),
                    Some(nix::libc::EAFNOSUPPORT | nix::libc::EADDRNOTAVAIL)
                ) =>
        {
            tracing::info!(%addr, error = %e, "no IPv6 here; listening on IPv4 only");
            bind_one(addr, false)
        }
        Err(e) => Err(e),
    }
}

fn bind_one(addr: SocketAddr, dual_stack: bool) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if dual_stack {
        sock.set_only_v6(false)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}

/// The production dialer: a plain `connect`, with `TCP_NODELAY`. Traffic of
/// uid 1337 is excluded from capture by the init rules, so it is not looped.
#[derive(Debug, Default, Clone, Copy)]
pub struct DirectDialer;

impl Dialer for DirectDialer {
    fn connect(&self, dst: SocketAddr) -> BoxFuture<'_, io::Result<TcpStream>> {
        Box::pin(async move {
            let s = TcpStream::connect(dst).await?;
            s.set_nodelay(true)?;
            Ok(s)
        })
    }
}

/// An I/O stream that first yields `prefix` (bytes consumed while detecting
/// the protocol), then reads from the inner stream.
///
/// The read that returns the end of the prefix also takes what the inner
/// stream already holds, so a request head that arrived in one segment
/// reaches the reader in one read, as it would without detection. hyper
/// sizes an HTTP/1 connection's read buffer by its reads: a head that comes
/// in two reads (the prefix, then the rest) grew the buffer from 8 to 16
/// KiB, which the connection then kept while idle (docs/performance.md).
#[derive(Debug)]
pub struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
    /// An error of the inner stream met after the prefix was returned,
    /// reported by the next read.
    error: Option<io::Error>,
}

impl<T> Prefixed<T> {
    /// Wraps `inner`, replaying `prefix` first.
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Prefixed {
            prefix,
            inner,
            error: None,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The bytes not yet replayed and the wrapped stream, for a reader of
    /// its own (an error kept for the next read is dropped: take the parts
    /// before reading).
    pub fn into_parts(self) -> (Bytes, T) {
        (self.prefix, self.inner)
    }

    /// Whether the next read returns without touching the wrapped stream
    /// (prefix bytes, or an error kept for it).
    pub fn has_buffered(&self) -> bool {
        self.prefix.has_remaining() || self.error.is_some()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.error.take() {
            return Poll::Ready(Err(e));
        }
        if !self.prefix.has_remaining() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        if !self.prefix.has_remaining() {
            // The prefix is done with: its buffer is freed, and whatever
            // followed it and has arrived joins it in this read. Pending
            // leaves the inner stream to wake the task when more arrives;
            // this read returns the prefix alone.
            self.prefix = Bytes::new();
            if buf.remaining() > 0
                && let Poll::Ready(Err(e)) = Pin::new(&mut self.inner).poll_read(cx, buf)
            {
                self.error = Some(e);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// An upstream connection: plaintext, or mTLS to a peer proxy.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS client side.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    /// The ALPN id the TLS peer chose (`None`: plaintext, or none chosen).
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(s) => s.get_ref().1.alpn_protocol(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    // Vectored writes pass through: hyper and h2 then hand a head and its
    // body to TLS as one write (one record, no copy into a flat buffer)
    // instead of copying them together or writing them one by one.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A waker that counts its wakes (tests of `end` and `park`).
#[cfg(test)]
pub(crate) fn counting_waker() -> (
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::task::Waker,
) {
    struct Count(std::sync::Arc<std::sync::atomic::AtomicUsize>);
    impl std::task::Wake for Count {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let waker = std::task::Waker::from(std::sync::Arc::new(Count(count.clone())));
    (count, waker)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What arrived after the prefix comes in the read that ends the prefix.
    #[tokio::test]
    async fn the_read_that_ends_the_prefix_takes_what_followed_it() {
        let (inner, mut peer) = tokio::io::duplex(256);
        peer.write_all(b" /x HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .expect("write");
        drop(peer);
        let mut io = Prefixed::new(Bytes::from_static(b"GET"), inner);
        let mut buf = [0u8; 64];
        let n = io.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n");
        assert_eq!(io.read(&mut buf).await.expect("read"), 0, "then the end");
    }

    /// Nothing after the prefix yet: the prefix alone, and the rest when it
    /// arrives.
    #[tokio::test]
    async fn the_prefix_alone_when_nothing_followed_it_yet() {
        let (inner, mut peer) = tokio::io::duplex(256);
        let mut io = Prefixed::new(Bytes::from_static(b"GET"), inner);
        let mut buf = [0u8; 64];
        assert_eq!(io.read(&mut buf).await.expect("read"), 3);
        assert_eq!(&buf[..3], b"GET");
        peer.write_all(b" /y").await.expect("write");
        let n = io.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b" /y");
    }

    /// A prefix longer than the reader's buffer comes in pieces, the rest
    /// of the stream after it.
    #[tokio::test]
    async fn a_prefix_larger_than_the_buffer_comes_in_pieces() {
        let (inner, mut peer) = tokio::io::duplex(256);
        peer.write_all(b"DEF").await.expect("write");
        drop(peer);
        let mut io = Prefixed::new(Bytes::from_static(b"ABC"), inner);
        let mut buf = [0u8; 2];
        assert_eq!(io.read(&mut buf).await.expect("read"), 2);
        assert_eq!(&buf, b"AB");
        let mut out = Vec::new();
        io.read_to_end(&mut out).await.expect("read to the end");
        assert_eq!(out, b"CDEF");
    }

    /// A stream whose every read fails.
    struct Failing;

    impl AsyncRead for Failing {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset")))
        }
    }

    /// An error of the inner stream met in the read that ends the prefix
    /// does not take the prefix with it: the prefix is read, then the error.
    #[tokio::test]
    async fn an_error_after_the_prefix_comes_in_the_next_read() {
        let mut io = Prefixed::new(Bytes::from_static(b"PRI"), Failing);
        let mut buf = [0u8; 16];
        assert_eq!(io.read(&mut buf).await.expect("read"), 3);
        assert_eq!(&buf[..3], b"PRI");
        let e = io.read(&mut buf).await.expect_err("the inner error");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }
}
