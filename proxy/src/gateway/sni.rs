//! The server name a TLS client asks for, read from its ClientHello without
//! answering it: a TLS passthrough listener routes on it and then forwards
//! every byte read, so the backend sees the handshake as the client sent it.
//!
//! rustls parses the ClientHello (`rustls::server::Acceptor`); weft only
//! buffers the bytes it was fed. A client whose hello rustls refuses (not
//! TLS, a malformed hello, no TLS 1.2 or 1.3 offered) is refused here too.

use std::io;

use bytes::{Bytes, BytesMut};
use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The most a ClientHello may take: its records, with post-quantum key
/// shares and many extensions, stay well under this.
const MAX_HELLO: usize = 64 * 1024;

/// Why no server name could be read.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    /// The client closed or the socket failed first.
    #[error("reading the ClientHello: {0}")]
    Io(#[from] io::Error),
    /// The bytes are not a TLS ClientHello rustls accepts.
    #[error("not a TLS ClientHello: {0}")]
    Invalid(rustls::Error),
    /// More than [`MAX_HELLO`] bytes without a complete hello.
    #[error("ClientHello larger than {MAX_HELLO} bytes")]
    TooLarge,
}

/// Reads from `io` until a whole ClientHello arrived; returns every byte
/// read (to forward first) and the SNI, lower-cased (`None`: the client
/// sent none).
pub async fn read_client_hello<R: AsyncRead + Unpin>(
    io: &mut R,
) -> Result<(Bytes, Option<String>), HelloError> {
    let mut buf = BytesMut::with_capacity(2048);
    let mut acceptor = Acceptor::default();
    let mut fed = 0;
    loop {
        if io.read_buf(&mut buf).await? == 0 {
            return Err(HelloError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        while fed < buf.len() {
            // Reading from a slice cannot fail: an error, or no byte taken,
            // is rustls' buffer for the hello being full.
            match acceptor.read_tls(&mut &buf[fed..]) {
                Ok(0) | Err(_) => return Err(HelloError::TooLarge),
                Ok(n) => fed += n,
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let sni = accepted
                    .client_hello()
                    .server_name()
                    .map(str::to_ascii_lowercase);
                return Ok((buf.freeze(), sni));
            }
            Ok(None) if buf.len() >= MAX_HELLO => return Err(HelloError::TooLarge),
            Ok(None) => {}
            Err((e, _)) => return Err(HelloError::Invalid(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The bytes a rustls client sends first for `name`.
    fn hello(name: &str) -> Vec<u8> {
        let roots = rustls::RootCertStore::empty();
        let cfg = rustls::ClientConfig::builder_with_provider(crate::tls::params::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut conn = rustls::ClientConnection::new(
            Arc::new(cfg),
            name.to_owned().try_into().expect("server name"),
        )
        .expect("client");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("hello");
        out
    }

    #[tokio::test]
    async fn reads_the_sni_and_returns_every_byte() {
        let bytes = hello("Shop.Example.com");
        // Delivered in small pieces, as a slow client would.
        let mut mock = chunked(&bytes, 7);
        let (read, sni) = read_client_hello(&mut mock).await.expect("hello");
        assert_eq!(sni.as_deref(), Some("shop.example.com"));
        assert_eq!(&read[..], &bytes[..]);
    }

    #[tokio::test]
    async fn an_ip_address_sends_no_sni() {
        let bytes = hello("10.0.0.1");
        let (_, sni) = read_client_hello(&mut &bytes[..]).await.expect("hello");
        assert_eq!(sni, None);
    }

    #[tokio::test]
    async fn plaintext_and_truncated_hellos_are_refused() {
        let http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert!(matches!(
            read_client_hello(&mut &http[..]).await,
            Err(HelloError::Invalid(_))
        ));
        let bytes = hello("shop.example.com");
        let half = &bytes[..bytes.len() / 2];
        assert!(matches!(
            read_client_hello(&mut &half[..]).await,
            Err(HelloError::Io(_))
        ));
    }

    /// A hello whose handshake message claims `len` bytes, sent as full
    /// 16 KiB records of zeros, more than [`MAX_HELLO`] in all.
    fn endless_hello(len: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut first = true;
        while out.len() < MAX_HELLO + 32 * 1024 {
            let mut payload = vec![0u8; 16 * 1024];
            if first {
                payload[0] = 1; // ClientHello
                payload[1..4].copy_from_slice(&len.to_be_bytes()[1..]);
                first = false;
            }
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(16u16 * 1024).to_be_bytes());
            out.extend_from_slice(&payload);
        }
        out
    }

    #[tokio::test]
    async fn a_hello_that_never_ends_is_refused_as_too_large() {
        for len in [0xFFFF, 0x1_0000, 0xF0_0000] {
            let bytes = endless_hello(len);
            let got = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                read_client_hello(&mut chunked(&bytes, 4096)),
            )
            .await
            .expect("the reader hung on an endless hello");
            assert!(
                matches!(got, Err(HelloError::TooLarge)),
                "{len:#x}: {:?}",
                got.map(|(b, s)| (b.len(), s))
            );
        }
    }

    /// A reader that yields `data` at most `chunk` bytes at a time.
    fn chunked(data: &[u8], chunk: usize) -> impl AsyncRead + Unpin {
        use tokio::io::AsyncWriteExt;
        let (mut w, r) = tokio::io::duplex(chunk);
        let data = data.to_vec();
        tokio::spawn(async move { w.write_all(&data).await });
        r
    }
}
