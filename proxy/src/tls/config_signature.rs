//! Checks `proxy.json.sig`: the proxy runs only a config the operator
//! signed.
//!
//! ```text
//! proxy.json.sig ──parse──► signer chain ──verify against ca.crt (the same
//!     bundle that checks peers), at now, EKU codeSigning──► signer leaf
//!   ──SPIFFE ID == spiffe://<trust domain>/weft/config-signer
//!   ──namespace and hash == the document's──► ECDSA P-256 signature
//! ```
//!
//! Called by [`crate::snapshot::load_dir`] after the document and identity
//! loaded and before anything is built from them; a refusal keeps the last
//! good snapshot serving (see `reload`). The trust bundle comes from the
//! same mount generation as the document, so a CA rotation that adds a new
//! CA to the bundle before the signer moves to it never refuses a good
//! config.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use weft_proxy_config::{
    CODE_SIGNING_OID, ConfigSignature, ProxyConfig, SignatureFormatError, config_signer_id,
};

use super::identity::Identity;
use super::spiffe::spiffe_id_of;

/// Why a config's signature was refused.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// No `proxy.json.sig` next to the document.
    #[error(
        "proxy.json.sig is missing: the document was not issued by weft's operator (hand-written ConfigMap, or an operator older than this proxy)"
    )]
    Missing,
    /// The file does not parse.
    #[error(transparent)]
    Format(#[from] SignatureFormatError),
    /// The signature is for another document.
    #[error(
        "proxy.json.sig signs namespace {signed_namespace} hash {signed_hash}, but proxy.json is namespace {namespace} hash {hash}: the document was edited or moved"
    )]
    OtherDocument {
        /// Namespace in the signature.
        signed_namespace: String,
        /// Hash in the signature.
        signed_hash: String,
        /// Namespace of the document.
        namespace: String,
        /// Hash of the document.
        hash: String,
    },
    /// The certificates are not PEM, or there are none.
    #[error("proxy.json.sig certificates: {0}")]
    Certificates(String),
    /// The signer's chain does not verify against the trust bundle.
    #[error(
        "proxy.json.sig signer does not verify against ca.crt as a config signer (codeSigning): {0:?}"
    )]
    Chain(webpki::Error),
    /// The signer is a mesh certificate, but not the config signer.
    #[error("proxy.json.sig is signed by {found}, not by the config signer {expected}")]
    NotTheSigner {
        /// The signer certificate's identity.
        found: String,
        /// The config signer's SPIFFE ID.
        expected: String,
    },
    /// The signature does not verify.
    #[error("proxy.json.sig signature does not verify: {0:?}")]
    Signature(webpki::Error),
}

impl SignatureError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            SignatureError::Missing => "unsigned",
            SignatureError::Format(_) | SignatureError::Certificates(_) => "malformed",
            SignatureError::OtherDocument { .. } => "other-document",
            SignatureError::Chain(_) | SignatureError::NotTheSigner { .. } => "untrusted-signer",
            SignatureError::Signature(_) => "bad-signature",
        }
    }
}

/// Checks that `sig` (the bytes of `proxy.json.sig`, `None` when absent)
/// is the config signer's signature of `config`, with the signer chained to
/// `identity`'s trust bundle at `now`.
pub fn verify(
    sig: Option<&[u8]>,
    config: &ProxyConfig,
    identity: &Identity,
    now: UnixTime,
) -> Result<(), SignatureError> {
    let sig = ConfigSignature::parse(sig.ok_or(SignatureError::Missing)?)?;
    if sig.namespace != config.namespace || sig.hash != config.hash {
        return Err(SignatureError::OtherDocument {
            signed_namespace: sig.namespace,
            signed_hash: sig.hash,
            namespace: config.namespace.clone(),
            hash: config.hash.clone(),
        });
    }
    let chain = CertificateDer::pem_slice_iter(sig.certificates.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SignatureError::Certificates(e.to_string()))?;
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| SignatureError::Certificates("no certificate".into()))?;
    let signer = webpki::EndEntityCert::try_from(leaf).map_err(SignatureError::Chain)?;
    signer
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &identity.trust_anchors().roots,
            intermediates,
            now,
            webpki::KeyUsage::required(CODE_SIGNING_OID),
            None,
            None,
        )
        .map_err(SignatureError::Chain)?;
    let expected = config_signer_id(&config.mesh.trust_domain);
    match spiffe_id_of(leaf) {
        Ok(id) if id.as_str() == expected => {}
        Ok(id) => {
            return Err(SignatureError::NotTheSigner {
                found: id.to_string(),
                expected,
            });
        }
        Err(e) => {
            return Err(SignatureError::NotTheSigner {
                found: e.to_string(),
                expected,
            });
        }
    }
    let bytes = sig.signature_bytes()?;
    signer
        .verify_signature(
            webpki::ring::ECDSA_P256_SHA256,
            &ConfigSignature::message(&config.namespace, &config.hash),
            &bytes,
        )
        .map_err(SignatureError::Signature)
}
