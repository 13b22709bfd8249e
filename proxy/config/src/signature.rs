//! `proxy.json.sig`: the operator's detached signature of one namespace's
//! config, next to it in ConfigMap `weft-proxy`.
//!
//! ```text
//! operator: hash of proxy.json ──sign(config-signer key)──► proxy.json.sig
//! proxy:    proxy.json.sig ──chain to ca.crt, ID, EKU, signature──► accept proxy.json
//! ```
//!
//! The signature covers [`ConfigSignature::message`]: a fixed context
//! string, the namespace and the content hash. The hash covers every byte
//! of the document (see [`crate::ProxyConfig::compute_hash`]), so signing it
//! signs the document; the namespace is signed again so a signature can
//! never be read as one for another namespace.
//!
//! The signer is a leaf of the mesh CA with the SPIFFE ID
//! [`config_signer_id`] (no workload has an ID of that shape) and the
//! `codeSigning` extended key usage (no workload or serving certificate
//! carries it). The proxy checks both, plus the chain to the trust bundle it
//! already mounts, so nothing but the operator's key can make a document a
//! proxy runs. This crate only defines the format; signing and checking
//! live in the operator and the proxy.

use serde::{Deserialize, Serialize};

/// The key of the signature in the ConfigMap and mount.
pub const SIGNATURE_FILE_NAME: &str = "proxy.json.sig";
/// The format version of `proxy.json.sig` this crate reads and writes.
pub const SIGNATURE_VERSION: u32 = 1;
/// The one algorithm signatures use: ECDSA on P-256 with SHA-256, the
/// signature ASN.1 DER encoded.
pub const SIGNATURE_ALGORITHM: &str = "ECDSA_P256_SHA256";
/// Path of the config signer's SPIFFE ID.
pub const CONFIG_SIGNER_PATH: &str = "/weft/config-signer";
/// DER content of the `id-kp-codeSigning` OID (1.3.6.1.5.5.7.3.3): the
/// extended key usage only the config signer's certificate carries.
pub const CODE_SIGNING_OID: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x03];
/// Largest accepted `proxy.json.sig`: a certificate chain of a few
/// certificates and a signature are a few kilobytes.
pub const MAX_SIGNATURE_BYTES: usize = 64 * 1024;

/// The SPIFFE ID of the operator's config signer in `trust_domain`.
pub fn config_signer_id(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}{CONFIG_SIGNER_PATH}")
}

/// The content of `proxy.json.sig`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigSignature {
    /// [`SIGNATURE_VERSION`].
    pub version: u32,
    /// The namespace of the signed document.
    pub namespace: String,
    /// The signed document's content hash (`sha256:<hex>`).
    pub hash: String,
    /// [`SIGNATURE_ALGORITHM`].
    pub algorithm: String,
    /// The signature of [`ConfigSignature::message`], hex.
    pub signature: String,
    /// The signer's certificate followed by any intermediates (PEM); the
    /// trust anchor is not included, the proxy has it in `ca.crt`.
    pub certificates: String,
}

/// Why `proxy.json.sig` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SignatureFormatError {
    /// Not a JSON document of the expected shape.
    #[error("proxy.json.sig is not valid: {0}")]
    Parse(#[from] serde_json::Error),
    /// Larger than any real signature.
    #[error("proxy.json.sig is {0} bytes, more than {MAX_SIGNATURE_BYTES}; refusing it")]
    TooLarge(usize),
    /// A version or algorithm this proxy does not know.
    #[error(
        "proxy.json.sig has version {version} and algorithm {algorithm}; this proxy reads version {SIGNATURE_VERSION} with {SIGNATURE_ALGORITHM}"
    )]
    Unsupported {
        /// The version in the file.
        version: u32,
        /// The algorithm in the file.
        algorithm: String,
    },
    /// The signature is not hex.
    #[error("proxy.json.sig signature is not hex: {0}")]
    Hex(#[from] hex::FromHexError),
}

impl ConfigSignature {
    /// The bytes the signature covers for a document of `namespace` with
    /// content hash `hash`.
    pub fn message(namespace: &str, hash: &str) -> Vec<u8> {
        format!(
            "weft proxy config signature v{SIGNATURE_VERSION}\nnamespace={namespace}\nhash={hash}\n"
        )
        .into_bytes()
    }

    /// A signature of `hash` of `namespace`'s document: `signature` is the
    /// DER ECDSA signature of [`ConfigSignature::message`], `certificates`
    /// the signer's chain.
    pub fn new(namespace: &str, hash: &str, signature: &[u8], certificates: String) -> Self {
        Self {
            version: SIGNATURE_VERSION,
            namespace: namespace.to_owned(),
            hash: hash.to_owned(),
            algorithm: SIGNATURE_ALGORITHM.to_owned(),
            signature: hex::encode(signature),
            certificates,
        }
    }

    /// Parses `proxy.json.sig`, refusing unknown versions and algorithms.
    pub fn parse(bytes: &[u8]) -> Result<Self, SignatureFormatError> {
        if bytes.len() > MAX_SIGNATURE_BYTES {
            return Err(SignatureFormatError::TooLarge(bytes.len()));
        }
        let sig: ConfigSignature = serde_json::from_slice(bytes)?;
        if sig.version != SIGNATURE_VERSION || sig.algorithm != SIGNATURE_ALGORITHM {
            return Err(SignatureFormatError::Unsupported {
                version: sig.version,
                algorithm: sig.algorithm,
            });
        }
        Ok(sig)
    }

    /// The raw signature bytes.
    pub fn signature_bytes(&self) -> Result<Vec<u8>, SignatureFormatError> {
        Ok(hex::decode(&self.signature)?)
    }

    /// Serializes to the bytes written to the ConfigMap.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a ConfigSignature always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let s = ConfigSignature::new("shop", "sha256:ab", &[1, 2, 255], "PEM".into());
        let back = ConfigSignature::parse(s.to_json().as_bytes()).expect("parses");
        assert_eq!(back, s);
        assert_eq!(back.signature_bytes().expect("hex"), [1, 2, 255]);

        let mut other = s.clone();
        other.algorithm = "RSA_PKCS1_SHA256".into();
        assert!(matches!(
            ConfigSignature::parse(other.to_json().as_bytes()),
            Err(SignatureFormatError::Unsupported { .. })
        ));
        let mut bad = s.clone();
        bad.signature = "zz".into();
        assert!(bad.signature_bytes().is_err());
        assert!(ConfigSignature::parse(b"{\"version\":1}").is_err());
        assert!(matches!(
            ConfigSignature::parse(&vec![b' '; MAX_SIGNATURE_BYTES + 1]),
            Err(SignatureFormatError::TooLarge(_))
        ));
    }

    #[test]
    fn the_message_binds_namespace_and_hash() {
        let m = ConfigSignature::message("shop", "sha256:ab");
        assert_ne!(m, ConfigSignature::message("shop2", "sha256:ab"));
        assert_ne!(m, ConfigSignature::message("shop", "sha256:ac"));
        assert_eq!(
            config_signer_id("cluster.local"),
            "spiffe://cluster.local/weft/config-signer"
        );
    }
}
