//! Certificate verifiers: the WebPKI chain check against the mesh trust
//! bundle, plus the SPIFFE identity check that makes a certificate a mesh
//! identity.
//!
//! SPIFFE certificates carry a URI SAN and no DNS name, so the stock
//! server-name check of rustls cannot be used on the client side: we verify
//! the chain with rustls' WebPKI helpers and compare the SPIFFE ID ourselves.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, RootCertStore,
    SignatureScheme,
};

use super::spiffe::{SpiffeId, spiffe_id_of};

/// The server presented a valid mesh certificate for another identity.
#[derive(Debug, thiserror::Error)]
#[error(
    "identity mismatch: expected {expected}, peer presented {actual}; the request was not sent. Either the endpoint's pod does not run with the service account the config says, or its address now belongs to another pod (reused after a delete, before this proxy's config caught up; that clears with the next config)"
)]
pub struct IdentityMismatch {
    /// What the config says the endpoint runs as.
    pub expected: String,
    /// What its certificate says.
    pub actual: String,
}

/// The peer certificate has no usable SPIFFE ID.
#[derive(Debug, thiserror::Error)]
#[error("peer certificate is not a mesh identity: {0}")]
pub struct NotAMeshIdentity(pub String);

fn other(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Client side: the server must chain to the bundle and be `expected`.
#[derive(Debug)]
pub struct ServerIdentityVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl ServerIdentityVerifier {
    /// A verifier accepting only `expected`, chained to `roots`.
    pub fn new(
        roots: Arc<RootCertStore>,
        expected: SpiffeId,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            roots,
            expected,
            provider,
        }
    }
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let actual =
            spiffe_id_of(end_entity).map_err(|e| other(NotAMeshIdentity(e.to_string())))?;
        if actual != self.expected {
            return Err(other(IdentityMismatch {
                expected: self.expected.to_string(),
                actual: actual.to_string(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Server side: the client must present a certificate chaining to the
/// bundle (WebPKI, client-auth usage) that carries a SPIFFE ID of our trust
/// domain. Which identities may do what is authorization's job, later.
#[derive(Debug)]
pub struct ClientIdentityVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientIdentityVerifier {
    /// Builds the verifier over `roots`.
    pub fn new(
        roots: Arc<RootCertStore>,
        trust_domain: String,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, rustls::server::VerifierBuilderError> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider).build()?;
        Ok(Self {
            inner,
            trust_domain,
        })
    }
}

impl ClientCertVerifier for ClientIdentityVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = spiffe_id_of(end_entity).map_err(|e| other(NotAMeshIdentity(e.to_string())))?;
        if id.trust_domain() != self.trust_domain {
            return Err(other(NotAMeshIdentity(format!(
                "{id} is not in trust domain {}",
                self.trust_domain
            ))));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Walks an error's source chain for an [`IdentityMismatch`].
pub fn find_identity_mismatch<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a IdentityMismatch> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(m) = e.downcast_ref::<IdentityMismatch>() {
            return Some(m);
        }
        if let Some(Error::InvalidCertificate(CertificateError::Other(OtherError(inner)))) =
            e.downcast_ref::<Error>()
            && let Some(m) = inner.downcast_ref::<IdentityMismatch>()
        {
            return Some(m);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(m) = find_identity_mismatch(inner)
        {
            return Some(m);
        }
        cur = e.source();
    }
    None
}
