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

use super::params::{Alpn, provider};
use super::spiffe::{IdentityError, SpiffeId, spiffe_id_of};
use super::verify::{ClientIdentityVerifier, ServerIdentityVerifier};

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
        let provider = provider();
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
        cfg.alpn_protocols = alpn.offer();
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
