//! The pod's mesh identity: `tls.crt` (leaf + chain), `tls.key` and
//! `ca.crt` (trust bundle) from the mount, checked together and turned into
//! rustls configurations once per snapshot, off the hot path.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::Alpn;
use super::verify::{ClientIdentityVerifier, ServerIdentityVerifier};

/// A SPIFFE ID `spiffe://<trust domain>/<path>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(String);

impl SpiffeId {
    /// Parses `spiffe://td/path`.
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::NotSpiffe(s.to_owned()))?;
        match rest.split_once('/') {
            Some((td, path)) if !td.is_empty() && !path.is_empty() => Ok(SpiffeId(s.to_owned())),
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

/// The raw PEM bytes of an identity, as read from the mount.
#[derive(Clone, Debug)]
pub struct IdentityFiles {
    /// `tls.crt`.
    pub cert_chain: Vec<u8>,
    /// `tls.key`.
    pub key: Vec<u8>,
    /// `ca.crt`.
    pub bundle: Vec<u8>,
}

/// A checked identity with its TLS configurations.
pub struct Identity {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    not_before: i64,
    not_after: i64,
    provider: Arc<CryptoProvider>,
    server: Arc<ServerConfig>,
    clients: Mutex<HashMap<(SpiffeId, Alpn), Arc<ClientConfig>>>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Parses and checks an identity: PEM, the leaf's SPIFFE ID in
    /// `trust_domain`, the chain against the bundle at `now` (so expired or
    /// foreign certificates are refused here), and the key against the leaf.
    pub fn load(
        files: &IdentityFiles,
        trust_domain: &str,
        now: UnixTime,
    ) -> Result<Self, IdentityError> {
        let provider = super::provider();
        let chain = certs("tls.crt", &files.cert_chain)?;
        let bundle = certs("ca.crt", &files.bundle)?;
        let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|e| IdentityError::Pem {
            file: "tls.key",
            detail: e.to_string(),
        })?;
        let leaf = &chain[0];
        let id = spiffe_id_of(leaf)?;
        if id.trust_domain() != trust_domain {
            return Err(IdentityError::ForeignTrustDomain {
                id: id.to_string(),
                trust_domain: trust_domain.to_owned(),
            });
        }
        let mut roots = RootCertStore::empty();
        for c in bundle {
            roots
                .add(c)
                .map_err(|e| IdentityError::Certificate(format!("ca.crt: {e}")))?;
        }
        let roots = Arc::new(roots);
        let parsed = ParsedCertificate::try_from(leaf).map_err(IdentityError::Chain)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &chain[1..],
            now,
            provider.signature_verification_algorithms.all,
        )
        .map_err(IdentityError::Chain)?;
        let (_, x509) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|e| IdentityError::Certificate(e.to_string()))?;
        let not_before = x509.validity().not_before.timestamp();
        let not_after = x509.validity().not_after.timestamp();

        let client_verifier =
            ClientIdentityVerifier::new(roots.clone(), trust_domain.to_owned(), provider.clone())
                .map_err(|e| IdentityError::Config(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Config(e.to_string()))?
            .with_client_cert_verifier(Arc::new(client_verifier))
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(IdentityError::Key)?;
        server.alpn_protocols = Alpn::ALL.iter().map(|a| a.id().to_vec()).collect();
        // The provider's cipher suite order, whatever the client prefers.
        server.ignore_client_order = true;
        Ok(Identity {
            id,
            chain,
            key,
            roots,
            not_before,
            not_after,
            provider,
            server: Arc::new(server),
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// This pod's SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The trust bundle (`ca.crt`) peers and config signatures are checked
    /// against.
    pub fn trust_anchors(&self) -> &RootCertStore {
        &self.roots
    }

    /// Leaf validity start, Unix seconds.
    pub fn not_before(&self) -> i64 {
        self.not_before
    }

    /// Leaf expiry, Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// The inbound TLS configuration (client certificates required).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// The outbound TLS configuration expecting the server to be `peer`,
    /// offering `alpn`. Built once per pair and cached with this identity.
    pub fn client_config(
        &self,
        peer: &SpiffeId,
        alpn: Alpn,
    ) -> Result<Arc<ClientConfig>, IdentityError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&(peer.clone(), alpn)) {
            return Ok(c.clone());
        }
        let verifier =
            ServerIdentityVerifier::new(self.roots.clone(), peer.clone(), self.provider.clone());
        let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(IdentityError::Key)?;
        cfg.alpn_protocols = vec![alpn.id().to_vec()];
        let cfg = Arc::new(cfg);
        clients.insert((peer.clone(), alpn), cfg.clone());
        Ok(cfg)
    }

    /// A human summary for `/certs`.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "identity": self.id.as_str(),
            "notBefore": self.not_before,
            "notAfter": self.not_after,
            "chainLength": self.chain.len(),
            "trustAnchors": self.roots.len(),
        })
    }
}

fn certs(file: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::Pem {
            file,
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(IdentityError::Empty(file));
    }
    Ok(certs)
}
