//! The config signer: the key with which the operator signs every
//! namespace's `proxy.json` (as `proxy.json.sig`, see
//! [`weft_proxy_config::ConfigSignature`]), so a proxy runs only what the
//! operator rendered.
//!
//! ```text
//! CA loop: Secret weft-system/weft-config-signer (leaf of the active CA,
//!          spiffe://<td>/weft/config-signer, EKU codeSigning)
//!     │ parsed into a ConfigSigner, published on a watch channel
//!     ▼
//! config writer: sign(namespace, hash) ──► ConfigMap weft-proxy: proxy.json.sig
//!                a new signer (renewal, CA rotation) re-signs every namespace
//! ```
//!
//! The leaf is renewed and moved to a new CA by the same rules as workload
//! leaves ([`crate::ca::decide_leaf`]), so during a CA rotation it moves
//! only once every trust bundle holds the new CA. The key lives in the
//! operator's namespace next to the CA key, readable by the operator alone.

use std::time::SystemTime;

use rcgen::{KeyPair, SigningKey as _};
use sha2::{Digest, Sha256};
use weft_proxy_config::ConfigSignature;

use crate::ca::{CaError, LeafInfo, parse_cert_pems};

/// A config signer loaded from its Secret.
pub struct ConfigSigner {
    key: KeyPair,
    certificates: String,
    fingerprint: String,
    not_after: SystemTime,
}

impl std::fmt::Debug for ConfigSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSigner")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl ConfigSigner {
    /// Loads the signer from its Secret's `tls.crt` (the leaf and its
    /// chain, without the anchor) and `tls.key`; refuses a key that is not
    /// the certificate's.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, CaError> {
        let leaf = LeafInfo::parse(cert_pem, key_pem)?;
        if !leaf.key_matches {
            return Err(CaError::MalformedKey {
                what: "config signer tls.key".to_owned(),
                reason: "it is not the key of tls.crt".to_owned(),
            });
        }
        let key_text = std::str::from_utf8(key_pem).map_err(|e| CaError::MalformedKey {
            what: "config signer tls.key".to_owned(),
            reason: e.to_string(),
        })?;
        let key = KeyPair::from_pem(key_text).map_err(|e| CaError::MalformedKey {
            what: "config signer tls.key".to_owned(),
            reason: e.to_string(),
        })?;
        let first = parse_cert_pems(cert_pem, "config signer tls.crt")?
            .into_iter()
            .next()
            .ok_or_else(|| CaError::NoCertificate {
                what: "config signer tls.crt".to_owned(),
            })?;
        Ok(Self {
            key,
            certificates: String::from_utf8_lossy(cert_pem).into_owned(),
            fingerprint: hex::encode(Sha256::digest(first)),
            not_after: leaf.not_after,
        })
    }

    /// SHA-256 of the signer certificate, hex: what a ConfigMap's
    /// `weft.dev/config-signer` annotation records, so a new signer is
    /// noticed and every document signed again.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// End of the signer certificate's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// `proxy.json.sig` for the document of `namespace` with content hash
    /// `hash`.
    pub fn sign(&self, namespace: &str, hash: &str) -> Result<String, CaError> {
        let signature = self
            .key
            .sign(&ConfigSignature::message(namespace, hash))
            .map_err(CaError::from)?;
        Ok(ConfigSignature::new(namespace, hash, &signature, self.certificates.clone()).to_json())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ca::{CertificateAuthority, LeafSubject};

    #[test]
    fn signs_what_a_proxy_can_check() {
        let now = SystemTime::now();
        let ca = CertificateAuthority::generate("td", Duration::from_secs(86400), now).expect("CA");
        let subject = LeafSubject::ConfigSigner {
            trust_domain: "td".into(),
        };
        assert_eq!(
            subject.spiffe_id().as_deref(),
            Some("spiffe://td/weft/config-signer")
        );
        let leaf = ca
            .issue(&subject, Duration::from_secs(3600), now)
            .expect("leaf");
        let signer = ConfigSigner::from_pem(leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes())
            .expect("signer");
        let sig =
            ConfigSignature::parse(signer.sign("shop", "sha256:ab").expect("sign").as_bytes())
                .expect("parses");
        assert_eq!(
            (sig.namespace.as_str(), sig.hash.as_str()),
            ("shop", "sha256:ab")
        );
        assert!(sig.certificates.contains("BEGIN CERTIFICATE"));
        // The certificate says codeSigning and nothing for TLS.
        let der = parse_cert_pems(leaf.cert_pem.as_bytes(), "leaf").expect("pem");
        let (_, cert) = x509_parser::parse_x509_certificate(&der[0]).expect("x509");
        let eku = cert
            .extended_key_usage()
            .expect("eku")
            .expect("present")
            .value;
        assert!(eku.code_signing && !eku.server_auth && !eku.client_auth);

        // Another leaf's key is refused.
        let other = ca
            .issue(&subject, Duration::from_secs(3600), now)
            .expect("leaf");
        assert!(
            ConfigSigner::from_pem(leaf.cert_pem.as_bytes(), other.key_pem.as_bytes()).is_err()
        );
        assert!(ConfigSigner::from_pem(b"junk", leaf.key_pem.as_bytes()).is_err());
    }
}
