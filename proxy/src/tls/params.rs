//! What every TLS configuration of weft shares: the one crypto provider
//! ([`provider`]) and the ALPN ids that name the protocol inside a
//! proxy-to-proxy connection ([`Alpn`]). The bottom of `tls`: imported by
//! the identity and by both listeners, importing nothing of weft.

/// The protocol inside a proxy-to-proxy TLS connection, negotiated by ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Alpn {
    /// HTTP/1.1 (upgrades and CONNECT included).
    Http1,
    /// HTTP/2 (gRPC).
    Http2,
    /// HTTP/1.1 requests as streams of one HTTP/2 connection: the server
    /// proxy hands them to its app as HTTP/1.1. A client offering it also
    /// offers [`Alpn::Http1`], which a proxy that predates it chooses.
    Mux,
    /// Opaque bytes.
    Tcp,
}

impl Alpn {
    /// Every ALPN id the inbound side accepts, in preference order.
    pub const ALL: [Alpn; 4] = [Alpn::Http2, Alpn::Mux, Alpn::Http1, Alpn::Tcp];

    /// The ALPN protocol id on the wire.
    pub fn id(self) -> &'static [u8] {
        match self {
            Alpn::Http1 => b"weft/h1",
            Alpn::Http2 => b"weft/h2",
            Alpn::Mux => b"weft/h2m",
            Alpn::Tcp => b"weft/tcp",
        }
    }

    /// The ids a client offers for it, most preferred first.
    pub fn offer(self) -> Vec<Vec<u8>> {
        match self {
            Alpn::Mux => vec![Alpn::Mux.id().to_vec(), Alpn::Http1.id().to_vec()],
            a => vec![a.id().to_vec()],
        }
    }

    /// Parses a negotiated ALPN id.
    pub fn from_id(id: &[u8]) -> Option<Alpn> {
        Alpn::ALL.into_iter().find(|a| a.id() == id)
    }
}

/// The one crypto provider weft uses (ring), preferring AES-128-GCM with
/// SHA-256: every handshake's key schedule then runs on SHA-256 instead of
/// SHA-384 (the server's handshake profile spent 6 % in SHA-512 blocks), and
/// records are encrypted with 10 AES rounds instead of 14. AES-256-GCM and
/// ChaCha20-Poly1305 stay available for peers that only offer those.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    use rustls::CipherSuite::TLS13_AES_128_GCM_SHA256;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != TLS13_AES_128_GCM_SHA256);
    std::sync::Arc::new(p)
}
