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
pub mod params;
pub mod spiffe;
pub mod verify;

pub use identity::Identity;
pub use params::{Alpn, provider};
pub use spiffe::{IdentityError, SpiffeId, spiffe_id_of};
