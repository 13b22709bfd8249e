//! Mutual TLS between weft proxies.
//!
//! ```text
//! mount dir ──► identity::Identity::load ──► ServerConfig (inbound, client auth required)
//!                                        └─► ClientConfig per (expected peer ID, ALPN) (outbound)
//! ```
//!
//! Only TLS 1.3 is offered. Both sides verify the peer's chain against the
//! mounted trust bundle and read its SPIFFE URI SAN (see [`verify`]); the
//! client additionally requires the server's SPIFFE ID to equal the identity
//! the config says the endpoint runs as. ALPN carries the protocol spoken
//! inside the tunnel ([`Alpn`]).

pub mod config_signature;
pub mod identity;
pub mod spiffe;
pub mod verify;

pub use identity::Identity;
pub use spiffe::{IdentityError, SpiffeId, spiffe_id_of};

/// The protocol inside a proxy-to-proxy TLS connection, negotiated by ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Alpn {
    /// HTTP/1.1 (upgrades and CONNECT included).
    Http1,
    /// HTTP/2 (gRPC).
    Http2,
    /// Opaque bytes.
    Tcp,
}

impl Alpn {
    /// Every ALPN id the inbound side accepts, in preference order.
    pub const ALL: [Alpn; 3] = [Alpn::Http2, Alpn::Http1, Alpn::Tcp];

    /// The ALPN protocol id on the wire.
    pub fn id(self) -> &'static [u8] {
        match self {
            Alpn::Http1 => b"weft/h1",
            Alpn::Http2 => b"weft/h2",
            Alpn::Tcp => b"weft/tcp",
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
