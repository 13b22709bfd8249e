//! Protocol detection: read a few first bytes (with a deadline) and decide
//! between HTTP/1.x, HTTP/2 prior knowledge, TLS (forwarded opaque) and
//! opaque TCP. The decision is a pure function of the bytes ([`classify`]);
//! [`detect`] does the bounded reading.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The HTTP/2 client connection preface.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// Ports the proxy never waits for client bytes on: the operator's default
/// opaque ports (one list, in the config contract).
pub use weft_proxy_config::DEFAULT_OPAQUE_PORTS as SERVER_FIRST_PORTS;

/// What the first bytes say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    /// HTTP/1.x request line.
    Http1,
    /// HTTP/2 prior-knowledge preface.
    Http2,
    /// A TLS record (the app's own TLS): forwarded as opaque bytes.
    Tls,
    /// Anything else, or nothing in time.
    Opaque,
}

/// Decides from a prefix; `None` means "need more bytes".
pub fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    if buf.len() >= H2_PREFACE.len() && buf.starts_with(H2_PREFACE) {
        return Some(Detected::Http2);
    }
    if buf[0] == 0x16 {
        return match buf.get(1) {
            None => None,
            Some(3) => Some(Detected::Tls),
            Some(_) => Some(Detected::Opaque),
        };
    }
    let mut possible = H2_PREFACE.starts_with(buf);
    for m in METHODS {
        if buf.starts_with(m) {
            return Some(Detected::Http1);
        }
        possible |= m.starts_with(buf);
    }
    if possible {
        None
    } else {
        Some(Detected::Opaque)
    }
}

/// Reads until [`classify`] decides, EOF, or `timeout`; returns the bytes
/// read (to replay) and the decision.
pub async fn detect<T: AsyncRead + Unpin>(
    io: &mut T,
    timeout: Duration,
) -> std::io::Result<(Bytes, Detected)> {
    let mut buf = BytesMut::with_capacity(H2_PREFACE.len());
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(d) = classify(&buf) {
            return Ok((buf.freeze(), d));
        }
        if buf.len() >= H2_PREFACE.len() {
            return Ok((buf.freeze(), Detected::Opaque));
        }
        let mut chunk = [0u8; 24];
        let want = H2_PREFACE.len() - buf.len();
        match tokio::time::timeout_at(deadline, io.read(&mut chunk[..want])).await {
            Err(_) => return Ok((buf.freeze(), Detected::Opaque)),
            Ok(Ok(0)) => return Ok((buf.freeze(), Detected::Opaque)),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_protocols() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"DELETE /x"), Some(Detected::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        assert_eq!(classify(b"PO"), None);
        assert_eq!(classify(&[0x16, 0x03, 0x01]), Some(Detected::Tls));
        assert_eq!(classify(b"\x00\x01binary"), Some(Detected::Opaque));
        assert_eq!(classify(b"HELLO"), Some(Detected::Opaque));
        assert_eq!(classify(b""), None);
    }

    #[tokio::test(start_paused = true)]
    async fn silent_client_times_out_as_opaque() {
        let (mut a, _b) = tokio::io::duplex(64);
        let (bytes, d) = detect(&mut a, Duration::from_millis(300))
            .await
            .expect("detect");
        assert_eq!(d, Detected::Opaque);
        assert!(bytes.is_empty());
    }

    #[tokio::test]
    async fn bytes_split_across_reads_are_joined() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = b.write_all(b"PRI * HTTP/2.0\r\n").await;
            tokio::task::yield_now().await;
            let _ = b.write_all(b"\r\nSM\r\n\r\nrest").await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let (bytes, d) = detect(&mut a, Duration::from_secs(5))
            .await
            .expect("detect");
        assert_eq!(d, Detected::Http2);
        assert_eq!(&bytes[..], H2_PREFACE);
    }
}
