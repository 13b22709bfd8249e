//! SPIFFE IDs and the errors of reading identities: what both the
//! identity loader ([`super::identity`]) and the peer verifiers
//! ([`super::verify`]) need, below both.
//!
//! In: DER certificates. Out: the `spiffe://` URI SAN as a [`SpiffeId`].

use std::fmt;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;

/// A SPIFFE ID `spiffe://<trust domain>/<path>`. Shared: a clone (a pool
/// key per request, a peer per connection) copies no bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(Arc<str>);

impl SpiffeId {
    /// Parses `spiffe://td/path`.
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::NotSpiffe(s.to_owned()))?;
        match rest.split_once('/') {
            Some((td, path)) if !td.is_empty() && !path.is_empty() => Ok(SpiffeId(Arc::from(s))),
            _ => Err(IdentityError::NotSpiffe(s.to_owned())),
        }
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        let rest = &self.0["spiffe://".len()..];
        rest.split_once('/').map_or(rest, |(td, _)| td)
    }

    /// The `ns` segment of a `…/ns/<ns>/sa/<sa>` ID.
    pub fn namespace(&self) -> Option<&str> {
        let mut it = self.0["spiffe://".len()..].split('/').skip(1);
        match (it.next(), it.next()) {
            (Some("ns"), Some(ns)) => Some(ns),
            _ => None,
        }
    }

    /// The whole ID.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why the mounted identity is unusable.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file is missing or unreadable.
    #[error("cannot read {file}: {source}")]
    Read {
        /// Which file.
        file: String,
        /// Why.
        source: std::io::Error,
    },
    /// PEM did not parse.
    #[error("{file} is not valid PEM ({detail}); is the identity Secret complete?")]
    Pem {
        /// Which file.
        file: &'static str,
        /// Parser message.
        detail: String,
    },
    /// A PEM file holds no certificate.
    #[error("{0} holds no certificate")]
    Empty(&'static str),
    /// The leaf is not X.509 we can read.
    #[error("tls.crt leaf certificate does not parse: {0}")]
    Certificate(String),
    /// No SPIFFE URI SAN.
    #[error("not a SPIFFE ID: {0:?}")]
    NotSpiffe(String),
    /// The leaf carries no SPIFFE URI SAN.
    #[error("certificate has no spiffe:// URI SAN")]
    NoSpiffeSan,
    /// Chain does not verify against the bundle, or is expired.
    #[error(
        "tls.crt does not verify against ca.crt: {0}; check the operator's CA rotation and the certificate's validity dates"
    )]
    Chain(rustls::Error),
    /// Key does not belong to the certificate, or is unsupported.
    #[error("tls.key does not match tls.crt or is unsupported: {0}")]
    Key(rustls::Error),
    /// The identity's trust domain is not the mesh's.
    #[error("certificate identity {id} is not in the mesh trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The certificate's ID.
        id: String,
        /// The config's trust domain.
        trust_domain: String,
    },
    /// rustls refused to build a configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Reads the SPIFFE ID from a DER certificate's URI SAN.
pub fn spiffe_id_of(der: &CertificateDer<'_>) -> Result<SpiffeId, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| IdentityError::Certificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Certificate(e.to_string()))?
        .ok_or(IdentityError::NoSpiffeSan)?;
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(uri) = name
            && uri.starts_with("spiffe://")
        {
            return SpiffeId::parse(uri);
        }
    }
    Err(IdentityError::NoSpiffeSan)
}
