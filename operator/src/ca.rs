//! The mesh certificate authority: pure certificate logic, no I/O.
//!
//! What flows in: PEM text read from Secrets, the `Mesh` certificate
//! settings and the current time. What flows out: PEM text to write back,
//! and decisions (renew now or at a given time; the next CA rotation step).
//!
//! - [`CertificateAuthority`]: a signing CA, either generated here (ECDSA
//!   P-256) or loaded from a user's Secret ([`CertificateAuthority::from_pem`],
//!   which refuses expired certificates, non-CAs, CAs without `keyCertSign`,
//!   keys that do not belong to the certificate and malformed PEM).
//! - [`CertificateAuthority::issue`]: workload leaves (URI SAN
//!   `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`, client and server auth) and
//!   the injector's serving certificate (DNS SANs), each with its chain.
//! - [`decide_leaf`]: whether an existing leaf is kept (and until when) or
//!   re-issued: at two thirds of its lifetime, or at once when its names,
//!   signer or key no longer match.
//! - [`CaState`] and [`CaState::step`]: the CA rotation state machine
//!
//! ```text
//!   Stable ──(new CA wanted)──▶ Trusting ──(every bundle carries it, grace)──▶
//!   Reissuing ──(every leaf signed by it)──▶ Retiring ──(old leaves expired)──▶ Stable
//! ```
//!
//!   The whole state lives in the `weft-ca` Secret ([`CaState::to_secret`],
//!   [`CaState::from_secret`]), so an operator restarted at any point resumes
//!   the rotation where it stood.
//! - [`DesiredCa::from_mesh`]: the CA the `Mesh` asks for; a generated one
//!   only when it names no user CA, never in place of a broken user CA.
//! - [`on_missing_ca`]: what to do when `weft-ca` does not exist: create it
//!   (first start), regenerate it (deleted; reported, since every identity
//!   is re-issued), restore it from the user's CA, or issue nothing.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use sha2::{Digest, Sha256};
use weft_api::mesh::RotationPhase;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};

/// How far back `notBefore` is set, so peers whose clocks run slightly behind
/// the operator's accept a certificate the moment it is written.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Secret data key of a certificate (with its chain).
pub const TLS_CRT: &str = "tls.crt";
/// Secret data key of a private key.
pub const TLS_KEY: &str = "tls.key";
/// Secret data key of the trust bundle.
pub const CA_CRT: &str = "ca.crt";
/// `weft-ca` data key: the next CA's certificate while it is being trusted.
pub const NEXT_CRT: &str = "next.crt";
/// `weft-ca` data key: the next CA's key while it is being trusted.
pub const NEXT_KEY: &str = "next.key";
/// `weft-ca` data key: the previous CA's trust anchor while it retires.
pub const PREVIOUS_CRT: &str = "previous.crt";

/// `weft-ca` annotation: the rotation phase (`Stable`, `Trusting`, ...).
pub const ANN_PHASE: &str = "weft.dev/rotation-phase";
/// `weft-ca` annotation: when the current phase began (RFC 3339).
pub const ANN_PHASE_SINCE: &str = "weft.dev/phase-since";
/// `weft-ca` annotation: when the previous CA may leave the bundle (RFC 3339).
pub const ANN_RETIRE_AFTER: &str = "weft.dev/retire-after";
/// `weft-ca` annotation: the `Mesh` `rotateCa` value the state answers to.
pub const ANN_ROTATE_TOKEN: &str = "weft.dev/rotate-ca";
/// `weft-ca` annotation: `Generated` or `User`, for the active CA.
pub const ANN_ACTIVE_SOURCE: &str = "weft.dev/active-source";
/// `weft-ca` annotation: `Generated` or `User`, for the next CA.
pub const ANN_NEXT_SOURCE: &str = "weft.dev/next-source";

/// Why a CA could not be loaded or a certificate could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The certificate PEM could not be decoded.
    #[error(
        "{what}: malformed certificate PEM ({reason}); check that tls.crt holds PEM 'CERTIFICATE' blocks"
    )]
    MalformedCertificate {
        /// Which certificate (e.g. `CA tls.crt`).
        what: String,
        /// The decoder's complaint.
        reason: String,
    },
    /// The PEM held no certificate at all.
    #[error("{what}: no certificate found; tls.crt must start with a PEM 'CERTIFICATE' block")]
    NoCertificate {
        /// Which certificate.
        what: String,
    },
    /// The private key could not be decoded.
    #[error(
        "{what}: malformed or unsupported private key ({reason}); tls.key must be a PKCS#8 PEM ('PRIVATE KEY') ECDSA, Ed25519 or RSA key"
    )]
    MalformedKey {
        /// Which key.
        what: String,
        /// The decoder's complaint.
        reason: String,
    },
    /// The certificate is not a CA (basicConstraints CA:TRUE missing).
    #[error(
        "CA certificate {subject} is not a CA (basicConstraints CA:TRUE is missing); use a root or intermediate CA certificate"
    )]
    NotACa {
        /// Subject of the certificate.
        subject: String,
    },
    /// The CA's key usage does not allow signing certificates.
    #[error(
        "CA certificate {subject} may not sign certificates (its keyUsage lacks keyCertSign); issue the CA with keyCertSign"
    )]
    NoKeyCertSign {
        /// Subject of the certificate.
        subject: String,
    },
    /// The CA certificate has expired.
    #[error(
        "CA certificate {subject} expired at {not_after}; replace the CA Secret with a valid CA"
    )]
    Expired {
        /// Subject of the certificate.
        subject: String,
        /// End of validity (RFC 3339).
        not_after: String,
    },
    /// The CA certificate is not valid yet.
    #[error(
        "CA certificate {subject} is not valid before {not_before}; check the clocks of the issuing host and of this cluster"
    )]
    NotYetValid {
        /// Subject of the certificate.
        subject: String,
        /// Start of validity (RFC 3339).
        not_before: String,
    },
    /// The key does not belong to the certificate.
    #[error(
        "the private key in tls.key does not belong to certificate {subject} in tls.crt; put the matching key in the Secret"
    )]
    KeyMismatch {
        /// Subject of the certificate.
        subject: String,
    },
    /// A name cannot be put into a certificate.
    #[error("{name:?} cannot be used in a certificate: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why not.
        reason: String,
    },
    /// rcgen refused to build or sign a certificate.
    #[error("could not build the certificate: {0}")]
    Build(#[from] rcgen::Error),
    /// The `weft-ca` Secret's rotation state is inconsistent.
    #[error(
        "the weft-ca Secret is inconsistent: {0}; restore it from a backup or delete it to start over with a new CA"
    )]
    State(String),
}

/// Where a CA came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaSource {
    /// Generated by weft.
    Generated,
    /// Loaded from the Secret the `Mesh` names.
    User,
}

impl CaSource {
    /// The name used in status and annotations.
    pub fn as_str(self) -> &'static str {
        match self {
            CaSource::Generated => "Generated",
            CaSource::User => "User",
        }
    }

    fn parse(s: &str) -> Self {
        if s == "User" {
            CaSource::User
        } else {
            CaSource::Generated
        }
    }
}

/// Facts about one certificate, read once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// SHA-256 of the DER certificate, hex.
    pub fingerprint: String,
    /// Subject in RFC 4514 form.
    pub subject: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

/// A certificate authority that signs workload certificates.
pub struct CertificateAuthority {
    cert_der: Vec<u8>,
    /// Certificates above the CA, as given in the user's tls.crt.
    chain_der: Vec<Vec<u8>>,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    self_signed: bool,
    ski: Option<Vec<u8>>,
    subject_raw: Vec<u8>,
    info: CertInfo,
    source: CaSource,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("info", &self.info)
            .field("source", &self.source)
            .field("chain_len", &self.chain_der.len())
            .finish_non_exhaustive()
    }
}

/// What a leaf certificate is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeafSubject {
    /// A workload: `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
    Workload {
        /// SPIFFE trust domain.
        trust_domain: String,
        /// Namespace of the service account.
        namespace: String,
        /// Service account name.
        service_account: String,
    },
    /// A TLS server known by DNS names (the injector webhook).
    Server {
        /// DNS names, the first one is also the common name.
        dns_names: Vec<String>,
    },
    /// The operator's config signer: the SPIFFE ID
    /// `spiffe://<trust_domain>/weft/config-signer`, which no workload can
    /// have, and the `codeSigning` extended key usage instead of TLS ones,
    /// so it can sign `proxy.json.sig` and nothing else (see
    /// [`crate::signing`]).
    ConfigSigner {
        /// SPIFFE trust domain.
        trust_domain: String,
    },
}

impl LeafSubject {
    /// The SPIFFE ID of a workload subject.
    pub fn spiffe_id(&self) -> Option<String> {
        match self {
            LeafSubject::Workload {
                trust_domain,
                namespace,
                service_account,
            } => Some(format!(
                "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
            )),
            LeafSubject::ConfigSigner { trust_domain } => {
                Some(weft_proxy_config::config_signer_id(trust_domain))
            }
            LeafSubject::Server { .. } => None,
        }
    }
}

/// A freshly issued certificate.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    /// Leaf followed by the chain up to (not including) the trust anchor.
    pub cert_pem: String,
    /// The leaf's PKCS#8 private key.
    pub key_pem: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

/// What an existing leaf (read back from a Secret) says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafInfo {
    /// URI SANs.
    pub uris: Vec<String>,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    issuer_raw: Vec<u8>,
    aki: Option<Vec<u8>>,
    /// Whether tls.key holds the leaf's private key.
    pub key_matches: bool,
}

fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn to_system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Formats a time as RFC 3339 (UTC, whole seconds).
pub fn rfc3339(t: SystemTime) -> String {
    match k8s_openapi::jiff::Timestamp::try_from(t) {
        Ok(ts) => ts
            .round(k8s_openapi::jiff::Unit::Second)
            .map_or_else(|_| ts.to_string(), |r| r.to_string()),
        Err(_) => "out-of-range".to_owned(),
    }
}

fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    s.parse::<k8s_openapi::jiff::Timestamp>()
        .ok()
        .map(SystemTime::from)
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Decodes every `CERTIFICATE` block of a PEM text into DER.
pub fn parse_cert_pems(pem: &[u8], what: &str) -> Result<Vec<Vec<u8>>, CaError> {
    let mut out = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem) {
        let block = block.map_err(|e| CaError::MalformedCertificate {
            what: what.to_owned(),
            reason: e.to_string(),
        })?;
        if block.label != "CERTIFICATE" {
            continue;
        }
        x509_parser::parse_x509_certificate(&block.contents).map_err(|e| {
            CaError::MalformedCertificate {
                what: what.to_owned(),
                reason: e.to_string(),
            }
        })?;
        out.push(block.contents);
    }
    if out.is_empty() {
        return Err(CaError::NoCertificate {
            what: what.to_owned(),
        });
    }
    Ok(out)
}

fn parse_der<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, CaError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c)
        .map_err(|e| CaError::MalformedCertificate {
            what: what.to_owned(),
            reason: e.to_string(),
        })
}

fn info_of(cert: &X509Certificate<'_>, der: &[u8]) -> CertInfo {
    CertInfo {
        fingerprint: fingerprint(der),
        subject: cert.subject().to_string(),
        not_before: to_system_time(cert.validity().not_before),
        not_after: to_system_time(cert.validity().not_after),
    }
}

fn ski_of(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
}

fn aki_of(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
}

fn parse_key(key_pem: &str, what: &str) -> Result<KeyPair, CaError> {
    KeyPair::from_pem(key_pem).map_err(|e| CaError::MalformedKey {
        what: what.to_owned(),
        reason: e.to_string(),
    })
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

impl CertificateAuthority {
    /// Generates a new root CA: ECDSA P-256, valid for `ttl` from `now`
    /// (backdated by [`CLOCK_SKEW`]), allowed to sign leaves only.
    pub fn generate(trust_domain: &str, ttl: Duration, now: SystemTime) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "weft");
        // The issue time in the name tells CAs of successive rotations apart
        // in status and logs.
        dn.push(
            DnType::CommonName,
            format!("weft mesh CA {trust_domain} {}", rfc3339(now)),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = offset(now - CLOCK_SKEW);
        params.not_after = offset(now + ttl);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        Self::from_pem(
            cert_pem.as_bytes(),
            key.serialize_pem().as_bytes(),
            now,
            CaSource::Generated,
        )
    }

    /// Loads a CA from `tls.crt` (the CA certificate first, then the
    /// certificates above it) and `tls.key`, refusing anything that cannot
    /// safely sign workload certificates at `now`.
    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &[u8],
        now: SystemTime,
        source: CaSource,
    ) -> Result<Self, CaError> {
        let ders = parse_cert_pems(cert_pem, "CA tls.crt")?;
        let key_text = std::str::from_utf8(key_pem).map_err(|e| CaError::MalformedKey {
            what: "CA tls.key".to_owned(),
            reason: e.to_string(),
        })?;
        let key = parse_key(key_text, "CA tls.key")?;
        let (first, rest) = ders.split_first().ok_or_else(|| CaError::NoCertificate {
            what: "CA tls.crt".to_owned(),
        })?;
        let cert = parse_der(first, "CA tls.crt")?;
        let info = info_of(&cert, first);
        let subject = info.subject.clone();

        let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
        if !is_ca {
            return Err(CaError::NotACa { subject });
        }
        match cert.key_usage() {
            Ok(Some(ku)) if !ku.value.key_cert_sign() => {
                return Err(CaError::NoKeyCertSign { subject });
            }
            Ok(_) => {}
            Err(e) => {
                return Err(CaError::MalformedCertificate {
                    what: "CA tls.crt".to_owned(),
                    reason: e.to_string(),
                });
            }
        }
        if now >= info.not_after {
            return Err(CaError::Expired {
                subject,
                not_after: rfc3339(info.not_after),
            });
        }
        if now + CLOCK_SKEW < info.not_before {
            return Err(CaError::NotYetValid {
                subject,
                not_before: rfc3339(info.not_before),
            });
        }
        if key.der_bytes() != cert.public_key().subject_public_key.data.as_ref() {
            return Err(CaError::KeyMismatch { subject });
        }
        let self_signed = cert.subject().as_raw() == cert.issuer().as_raw();
        let ski = ski_of(&cert);
        let subject_raw = cert.subject().as_raw().to_vec();
        let key_pem = key.serialize_pem();
        let issuer = Issuer::from_ca_cert_der(&first.clone().into(), key)?;
        Ok(Self {
            cert_der: first.clone(),
            chain_der: rest.to_vec(),
            key_pem,
            issuer,
            self_signed,
            ski,
            subject_raw,
            info,
            source,
        })
    }

    /// Facts about the CA certificate.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// Where the CA came from.
    pub fn source(&self) -> CaSource {
        self.source
    }

    /// The CA certificate followed by its chain, as in `tls.crt`.
    pub fn cert_pem(&self) -> String {
        std::iter::once(&self.cert_der)
            .chain(&self.chain_der)
            .map(|d| pem_encode("CERTIFICATE", d))
            .collect()
    }

    /// The CA's private key (PKCS#8 PEM).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The certificate peers trust for this CA: the last certificate of
    /// its chain (the root), or the CA itself when no chain was given.
    pub fn anchor_pem(&self) -> String {
        pem_encode(
            "CERTIFICATE",
            self.chain_der.last().unwrap_or(&self.cert_der),
        )
    }

    /// The certificates a leaf carries after itself: the CA and its
    /// intermediates, without a self-signed root (peers have it).
    fn chain_for_leaf(&self) -> String {
        let mut out = String::new();
        if !self.self_signed {
            out.push_str(&pem_encode("CERTIFICATE", &self.cert_der));
        }
        for der in &self.chain_der {
            let root = parse_der(der, "CA chain")
                .map(|c| c.subject().as_raw() == c.issuer().as_raw())
                .unwrap_or(false);
            if !root {
                out.push_str(&pem_encode("CERTIFICATE", der));
            }
        }
        out
    }

    /// Issues a leaf for `subject`, valid from `now` (backdated by
    /// [`CLOCK_SKEW`], at most a tenth of `ttl`) for `ttl`, but never beyond
    /// the CA's own expiry.
    pub fn issue(
        &self,
        subject: &LeafSubject,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedCert, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "weft");
        match subject {
            LeafSubject::Workload { .. } | LeafSubject::ConfigSigner { .. } => {
                let id = subject.spiffe_id().unwrap_or_default();
                let uri =
                    id.clone()
                        .try_into()
                        .map_err(|e: rcgen::Error| CaError::InvalidName {
                            name: id.clone(),
                            reason: e.to_string(),
                        })?;
                params.subject_alt_names = vec![SanType::URI(uri)];
                params.extended_key_usages = match subject {
                    LeafSubject::ConfigSigner { .. } => vec![ExtendedKeyUsagePurpose::CodeSigning],
                    _ => vec![
                        ExtendedKeyUsagePurpose::ServerAuth,
                        ExtendedKeyUsagePurpose::ClientAuth,
                    ],
                };
            }
            LeafSubject::Server { dns_names } => {
                let mut sans = Vec::new();
                for name in dns_names {
                    let ia5 = name.clone().try_into().map_err(|e: rcgen::Error| {
                        CaError::InvalidName {
                            name: name.clone(),
                            reason: e.to_string(),
                        }
                    })?;
                    sans.push(SanType::DnsName(ia5));
                }
                if let Some(first) = dns_names.first() {
                    dn.push(DnType::CommonName, first.clone());
                }
                params.subject_alt_names = sans;
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            }
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        // Backdating is capped at a tenth of the TTL, so short-lived
        // certificates are not due for renewal the moment they are issued.
        let not_before = now - CLOCK_SKEW.min(ttl / 10);
        let not_after = (now + ttl).min(self.info.not_after);
        params.not_before = offset(not_before);
        params.not_after = offset(not_after);
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut cert_pem = cert.pem();
        cert_pem.push_str(&self.chain_for_leaf());
        // Read back what was encoded, so the times match what peers see.
        let (nb, na) = match parse_der(cert.der(), "issued leaf") {
            Ok(c) => (
                to_system_time(c.validity().not_before),
                to_system_time(c.validity().not_after),
            ),
            Err(_) => (not_before, not_after),
        };
        Ok(IssuedCert {
            cert_pem,
            key_pem: key.serialize_pem(),
            not_before: nb,
            not_after: na,
        })
    }

    /// Whether this CA signed the leaf.
    pub fn signed(&self, leaf: &LeafInfo) -> bool {
        if leaf.issuer_raw != self.subject_raw {
            return false;
        }
        match (&leaf.aki, &self.ski) {
            (Some(a), Some(s)) => a == s,
            _ => true,
        }
    }
}

impl LeafInfo {
    /// Reads the first certificate of `tls.crt` and checks `tls.key` against it.
    pub fn parse(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, CaError> {
        let ders = parse_cert_pems(cert_pem, "identity tls.crt")?;
        let der = ders.first().ok_or_else(|| CaError::NoCertificate {
            what: "identity tls.crt".to_owned(),
        })?;
        let cert = parse_der(der, "identity tls.crt")?;
        let mut uris = Vec::new();
        let mut dns_names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(u) => uris.push((*u).to_owned()),
                    GeneralName::DNSName(d) => dns_names.push((*d).to_owned()),
                    _ => {}
                }
            }
        }
        let key_matches = std::str::from_utf8(key_pem)
            .ok()
            .and_then(|k| KeyPair::from_pem(k).ok())
            .is_some_and(|k| k.der_bytes() == cert.public_key().subject_public_key.data.as_ref());
        Ok(Self {
            uris,
            dns_names,
            not_before: to_system_time(cert.validity().not_before),
            not_after: to_system_time(cert.validity().not_after),
            issuer_raw: cert.issuer().as_raw().to_vec(),
            aki: aki_of(&cert),
            key_matches,
        })
    }

    /// When this leaf is due for renewal: two thirds into its lifetime.
    pub fn renew_at(&self) -> SystemTime {
        renew_at(self.not_before, self.not_after)
    }

    fn matches(&self, subject: &LeafSubject) -> bool {
        match subject {
            LeafSubject::Workload { .. } | LeafSubject::ConfigSigner { .. } => {
                self.uris == subject.spiffe_id().into_iter().collect::<Vec<_>>()
            }
            LeafSubject::Server { dns_names } => &self.dns_names == dns_names,
        }
    }
}

/// Two thirds into the lifetime `[not_before, not_after]`.
pub fn renew_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    not_before + life * 2 / 3
}

/// Why a leaf is (re-)issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IssueReason {
    /// There is none.
    Missing,
    /// tls.crt could not be read.
    Unreadable(String),
    /// tls.key does not belong to tls.crt.
    KeyMismatch,
    /// The names in the certificate differ (trust domain changed, or edited).
    NamesChanged,
    /// Another CA signed it (CA rotation, or edited).
    SignerChanged,
    /// Two thirds of its lifetime have passed.
    Due,
    /// It lives longer than the TTL now asked for (the TTL was shortened).
    TtlShortened,
}

impl fmt::Display for IssueReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IssueReason::Missing => f.write_str("no certificate yet"),
            IssueReason::Unreadable(e) => write!(f, "existing certificate unreadable: {e}"),
            IssueReason::KeyMismatch => f.write_str("private key does not match the certificate"),
            IssueReason::NamesChanged => f.write_str("identity names changed"),
            IssueReason::SignerChanged => f.write_str("signed by a CA that no longer signs"),
            IssueReason::Due => f.write_str("two thirds of the lifetime passed"),
            IssueReason::TtlShortened => {
                f.write_str("lifetime longer than the certificate TTL now set")
            }
        }
    }
}

/// What to do about one leaf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeafDecision {
    /// Keep it; look again at `renew_at`.
    Keep {
        /// When renewal is due.
        renew_at: SystemTime,
    },
    /// Issue a new one now.
    Issue(IssueReason),
}

/// Decides whether the leaf in `existing` (`tls.crt`, `tls.key`) can stay
/// for `subject` under `signer` at `now`, when leaves are issued for `ttl`.
/// A leaf that lives longer than `ttl` allows (plus the backdating
/// [`CertificateAuthority::issue`] adds) is replaced at once, so shortening
/// the TTL applies to the certificates already out; lengthening it applies
/// at the next renewal.
pub fn decide_leaf(
    existing: Option<(&[u8], &[u8])>,
    subject: &LeafSubject,
    signer: &CertificateAuthority,
    ttl: Duration,
    now: SystemTime,
) -> LeafDecision {
    let Some((crt, key)) = existing else {
        return LeafDecision::Issue(IssueReason::Missing);
    };
    let leaf = match LeafInfo::parse(crt, key) {
        Ok(l) => l,
        Err(e) => return LeafDecision::Issue(IssueReason::Unreadable(e.to_string())),
    };
    if !leaf.key_matches {
        return LeafDecision::Issue(IssueReason::KeyMismatch);
    }
    if !leaf.matches(subject) {
        return LeafDecision::Issue(IssueReason::NamesChanged);
    }
    if !signer.signed(&leaf) {
        return LeafDecision::Issue(IssueReason::SignerChanged);
    }
    // Validity times are whole seconds: allow one more.
    let longest = ttl + CLOCK_SKEW.min(ttl / 10) + Duration::from_secs(1);
    if leaf
        .not_after
        .duration_since(leaf.not_before)
        .unwrap_or_default()
        > longest
    {
        return LeafDecision::Issue(IssueReason::TtlShortened);
    }
    let due = leaf.renew_at();
    if now >= due {
        return LeafDecision::Issue(IssueReason::Due);
    }
    LeafDecision::Keep { renew_at: due }
}

/// The trust bundle: the anchors of `cas`, in order, without duplicates.
pub fn trust_bundle<'a>(anchors: impl IntoIterator<Item = &'a str>) -> String {
    let mut seen = Vec::new();
    let mut out = String::new();
    for a in anchors {
        if !seen.contains(&a) {
            seen.push(a);
            out.push_str(a);
        }
    }
    out
}

/// The CA the `Mesh` asks for.
#[derive(Clone, Debug)]
pub enum DesiredCa {
    /// A CA weft generates; a changed `rotate` token asks for a new one.
    Generated {
        /// The `Mesh` `certificates.rotateCa` value.
        rotate: Option<String>,
    },
    /// The user's CA, already loaded and checked.
    User(Arc<CertificateAuthority>),
}

impl DesiredCa {
    /// The CA the `Mesh` asks for. `user` is `None` when the `Mesh` names no
    /// CA Secret, else the outcome of loading the one it names (an error
    /// message saying what to check). A generated CA is wanted only when no
    /// user CA is configured: a user CA that is missing or invalid gives its
    /// error, never a generated CA in its place, so the caller keeps the CA
    /// in `weft-ca`, or issues nothing.
    pub fn from_mesh(
        user: Option<Result<CertificateAuthority, String>>,
        rotate: Option<String>,
    ) -> Result<Self, String> {
        match user {
            None => Ok(DesiredCa::Generated { rotate }),
            Some(loaded) => loaded.map(|ca| DesiredCa::User(Arc::new(ca))),
        }
    }
}

/// What shows that the mesh had a CA before, looked at when `weft-ca` does
/// not exist.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PriorCa {
    /// Identity Secrets in the cluster: issued by an earlier CA.
    pub identities: usize,
    /// Fingerprint of the CA last known to sign: the `Mesh` status's active
    /// CA, or the signer this process published.
    pub known_ca: Option<String>,
}

impl PriorCa {
    /// Whether a CA signed in this mesh before.
    pub fn existed(&self) -> bool {
        self.identities > 0 || self.known_ca.is_some()
    }
}

/// What the CA loop does when the `weft-ca` Secret does not exist
/// ([`on_missing_ca`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MissingCa {
    /// The first start of the mesh: create `weft-ca` from the desired CA.
    Create,
    /// `weft-ca` was deleted while the mesh had a generated CA: a new CA is
    /// generated, and every identity, the injector's certificate and the
    /// webhook's `caBundle` are re-issued from it. To be reported.
    Regenerate,
    /// `weft-ca` was deleted and a user CA is configured: written again from
    /// it; identities it signed stay. To be reported.
    Restore,
    /// A user CA is configured but missing or invalid: nothing is created
    /// and nothing issued (never a generated CA in its place).
    IssueNothing,
}

/// What to do when `weft-ca` does not exist, from the CA the `Mesh` asks for
/// ([`DesiredCa::from_mesh`]) and what shows a CA existed before.
pub fn on_missing_ca(desired: Result<&DesiredCa, &String>, prior: &PriorCa) -> MissingCa {
    match desired {
        Err(_) => MissingCa::IssueNothing,
        Ok(_) if !prior.existed() => MissingCa::Create,
        Ok(DesiredCa::Generated { .. }) => MissingCa::Regenerate,
        Ok(DesiredCa::User(_)) => MissingCa::Restore,
    }
}

/// What the operator sees in the cluster, fed to [`CaState::step`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Every identity Secret, the injector and the webhook carry a trust
    /// bundle that includes the next CA.
    pub bundles_carry_next: bool,
    /// Every issued leaf is signed by the active CA.
    pub leaves_on_active: bool,
    /// The latest expiry among issued leaves.
    pub latest_leaf_expiry: Option<SystemTime>,
}

/// Timing knobs of a rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RotationTiming {
    /// Lifetime of workload leaves.
    pub leaf_ttl: Duration,
    /// Lifetime of generated CAs.
    pub ca_ttl: Duration,
    /// How long a new bundle must sit in every Secret before leaves move to
    /// the new CA: covers kubelet's refresh of mounted Secrets.
    pub propagation: Duration,
}

/// The CA rotation state, as stored in the `weft-ca` Secret.
#[derive(Clone, Debug)]
pub struct CaState {
    /// Where the rotation stands.
    pub phase: RotationPhase,
    /// When `phase` began.
    pub since: SystemTime,
    /// The CA signing leaves now.
    pub active: Arc<CertificateAuthority>,
    /// The CA being trusted before it signs (phase `Trusting`).
    pub next: Option<Arc<CertificateAuthority>>,
    /// The trust anchor of the CA that signed before (`Reissuing`, `Retiring`).
    pub previous: Option<String>,
    /// When the previous anchor may leave the bundle.
    pub retire_after: Option<SystemTime>,
    /// The `rotateCa` value this state answers to.
    pub rotate_token: Option<String>,
}

/// What one [`CaState::step`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    /// Nothing to do now.
    Unchanged,
    /// The state moved; the text says how (for logs and Events).
    Changed(String),
}

impl CaState {
    /// The first state: a fresh generated CA or the user's CA, `Stable`.
    pub fn initial(
        desired: &DesiredCa,
        trust_domain: &str,
        timing: &RotationTiming,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let (active, rotate_token) = match desired {
            DesiredCa::Generated { rotate } => (
                Arc::new(CertificateAuthority::generate(
                    trust_domain,
                    timing.ca_ttl,
                    now,
                )?),
                rotate.clone(),
            ),
            DesiredCa::User(ca) => (ca.clone(), None),
        };
        Ok(Self {
            phase: RotationPhase::Stable,
            since: now,
            active,
            next: None,
            previous: None,
            retire_after: None,
            rotate_token,
        })
    }

    /// Every anchor peers must trust now: active first, then next or previous.
    pub fn bundle(&self) -> String {
        let active = self.active.anchor_pem();
        let next = self.next.as_ref().map(|n| n.anchor_pem());
        trust_bundle(
            std::iter::once(active.as_str())
                .chain(next.as_deref())
                .chain(self.previous.as_deref()),
        )
    }

    /// The anchor of the CA leaves must move to, if a rotation waits for it.
    pub fn next_anchor(&self) -> Option<String> {
        self.next.as_ref().map(|n| n.anchor_pem())
    }

    /// Whether `desired` asks for a CA other than the one this state
    /// signs with (or is about to).
    fn wants_new(&self, desired: &DesiredCa, now: SystemTime) -> bool {
        let target = self.next.as_ref().unwrap_or(&self.active);
        match desired {
            DesiredCa::Generated { rotate } => {
                target.source() != CaSource::Generated
                    || *rotate != self.rotate_token
                    || now >= renew_at(target.info().not_before, target.info().not_after)
            }
            DesiredCa::User(ca) => ca.info().fingerprint != target.info().fingerprint,
        }
    }

    /// Advances the rotation by at most one phase.
    ///
    /// A new CA is wanted when the `Mesh` names another user CA, drops its
    /// user CA, or changes `rotateCa`, and when a generated CA has passed
    /// two thirds of its lifetime (so it is replaced long before it expires). Such a request is taken up in
    /// `Stable` (or replaces the pending CA in `Trusting`); in `Reissuing`
    /// and `Retiring` it waits until the current rotation has finished.
    pub fn step(
        &mut self,
        desired: &DesiredCa,
        observed: &Observed,
        trust_domain: &str,
        timing: &RotationTiming,
        now: SystemTime,
    ) -> Result<StepOutcome, CaError> {
        match self.phase {
            RotationPhase::Stable | RotationPhase::Trusting if self.wants_new(desired, now) => {
                let next = match desired {
                    DesiredCa::Generated { rotate } => {
                        self.rotate_token = rotate.clone();
                        Arc::new(CertificateAuthority::generate(
                            trust_domain,
                            timing.ca_ttl,
                            now,
                        )?)
                    }
                    DesiredCa::User(ca) => ca.clone(),
                };
                let msg = format!(
                    "CA rotation started: trusting new {} CA {} alongside {}",
                    next.source().as_str(),
                    next.info().subject,
                    self.active.info().subject
                );
                self.next = Some(next);
                self.phase = RotationPhase::Trusting;
                self.since = now;
                Ok(StepOutcome::Changed(msg))
            }
            RotationPhase::Stable => Ok(StepOutcome::Unchanged),
            RotationPhase::Trusting => {
                if !observed.bundles_carry_next || now < self.since + timing.propagation {
                    return Ok(StepOutcome::Unchanged);
                }
                let next = self
                    .next
                    .take()
                    .ok_or_else(|| CaError::State("phase Trusting without next.crt".into()))?;
                let old = std::mem::replace(&mut self.active, next);
                let latest = observed.latest_leaf_expiry.unwrap_or(now);
                self.retire_after = Some(latest.max(now + timing.leaf_ttl) + CLOCK_SKEW);
                self.previous = Some(old.anchor_pem());
                self.phase = RotationPhase::Reissuing;
                self.since = now;
                Ok(StepOutcome::Changed(format!(
                    "CA rotation: every bundle trusts {}; re-issuing certificates from it",
                    self.active.info().subject
                )))
            }
            RotationPhase::Reissuing => {
                if !observed.leaves_on_active {
                    return Ok(StepOutcome::Unchanged);
                }
                self.phase = RotationPhase::Retiring;
                self.since = now;
                Ok(StepOutcome::Changed(format!(
                    "CA rotation: every certificate re-issued; the previous CA stays trusted until {}",
                    self.retire_after.map(rfc3339).unwrap_or_default()
                )))
            }
            RotationPhase::Retiring => {
                let due = self.retire_after.unwrap_or(self.since);
                if now < due {
                    return Ok(StepOutcome::Unchanged);
                }
                self.previous = None;
                self.retire_after = None;
                self.phase = RotationPhase::Stable;
                self.since = now;
                Ok(StepOutcome::Changed(
                    "CA rotation finished: the previous CA left the trust bundle".to_owned(),
                ))
            }
        }
    }

    /// When the state machine wants to look again on its own (time-driven
    /// transitions), if ever.
    pub fn wake_at(&self, timing: &RotationTiming) -> Option<SystemTime> {
        match self.phase {
            RotationPhase::Trusting => Some(self.since + timing.propagation),
            RotationPhase::Retiring => self.retire_after,
            RotationPhase::Stable | RotationPhase::Reissuing => None,
        }
    }

    /// The `weft-ca` Secret's `data` and `annotations` for this state.
    pub fn to_secret(&self) -> (BTreeMap<String, Vec<u8>>, BTreeMap<String, String>) {
        let mut data = BTreeMap::new();
        data.insert(TLS_CRT.to_owned(), self.active.cert_pem().into_bytes());
        data.insert(
            TLS_KEY.to_owned(),
            self.active.key_pem().as_bytes().to_vec(),
        );
        data.insert(CA_CRT.to_owned(), self.bundle().into_bytes());
        let mut ann = BTreeMap::new();
        ann.insert(ANN_PHASE.to_owned(), phase_name(self.phase).to_owned());
        ann.insert(ANN_PHASE_SINCE.to_owned(), rfc3339(self.since));
        ann.insert(
            ANN_ACTIVE_SOURCE.to_owned(),
            self.active.source().as_str().to_owned(),
        );
        if let Some(next) = &self.next {
            data.insert(NEXT_CRT.to_owned(), next.cert_pem().into_bytes());
            data.insert(NEXT_KEY.to_owned(), next.key_pem().as_bytes().to_vec());
            ann.insert(
                ANN_NEXT_SOURCE.to_owned(),
                next.source().as_str().to_owned(),
            );
        }
        if let Some(prev) = &self.previous {
            data.insert(PREVIOUS_CRT.to_owned(), prev.clone().into_bytes());
        }
        if let Some(t) = self.retire_after {
            ann.insert(ANN_RETIRE_AFTER.to_owned(), rfc3339(t));
        }
        if let Some(tok) = &self.rotate_token {
            ann.insert(ANN_ROTATE_TOKEN.to_owned(), tok.clone());
        }
        (data, ann)
    }

    /// Reads the state back from the `weft-ca` Secret. The active CA is
    /// loaded without an expiry check at `now` (an expired active CA is
    /// reported by the caller, not forgotten).
    pub fn from_secret(
        data: &BTreeMap<String, Vec<u8>>,
        annotations: &BTreeMap<String, String>,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let get = |k: &str| data.get(k).map(Vec::as_slice);
        let load = |crt: &str, key: &str, src: CaSource| -> Result<CertificateAuthority, CaError> {
            let c = get(crt).ok_or_else(|| CaError::State(format!("{crt} is missing")))?;
            let k = get(key).ok_or_else(|| CaError::State(format!("{key} is missing")))?;
            load_stored(c, k, now, src)
        };
        let source = |k: &str| CaSource::parse(annotations.get(k).map_or("", String::as_str));
        let phase = match annotations.get(ANN_PHASE).map(String::as_str) {
            None | Some("Stable") => RotationPhase::Stable,
            Some("Trusting") => RotationPhase::Trusting,
            Some("Reissuing") => RotationPhase::Reissuing,
            Some("Retiring") => RotationPhase::Retiring,
            Some(other) => return Err(CaError::State(format!("unknown rotation phase {other:?}"))),
        };
        let active = Arc::new(load(TLS_CRT, TLS_KEY, source(ANN_ACTIVE_SOURCE))?);
        let next = if phase == RotationPhase::Trusting {
            Some(Arc::new(load(NEXT_CRT, NEXT_KEY, source(ANN_NEXT_SOURCE))?))
        } else {
            None
        };
        let previous = match phase {
            RotationPhase::Reissuing | RotationPhase::Retiring => {
                let p = get(PREVIOUS_CRT)
                    .ok_or_else(|| CaError::State(format!("{PREVIOUS_CRT} is missing")))?;
                let ders = parse_cert_pems(p, "weft-ca previous.crt")?;
                Some(ders.iter().map(|d| pem_encode("CERTIFICATE", d)).collect())
            }
            _ => None,
        };
        let since = annotations
            .get(ANN_PHASE_SINCE)
            .and_then(|s| parse_rfc3339(s))
            .unwrap_or(now);
        let retire_after = annotations
            .get(ANN_RETIRE_AFTER)
            .and_then(|s| parse_rfc3339(s));
        if previous.is_some() && retire_after.is_none() {
            return Err(CaError::State(format!("{ANN_RETIRE_AFTER} is missing")));
        }
        Ok(Self {
            phase,
            since,
            active,
            next,
            previous,
            retire_after,
            rotate_token: annotations.get(ANN_ROTATE_TOKEN).cloned(),
        })
    }
}

/// Loads a CA weft stored itself: all checks of
/// [`CertificateAuthority::from_pem`] except expiry, which the caller
/// reports separately so an expired CA is never silently replaced.
fn load_stored(
    crt: &[u8],
    key: &[u8],
    now: SystemTime,
    source: CaSource,
) -> Result<CertificateAuthority, CaError> {
    match CertificateAuthority::from_pem(crt, key, now, source) {
        Err(CaError::Expired { .. } | CaError::NotYetValid { .. }) => {
            let ders = parse_cert_pems(crt, "CA tls.crt")?;
            let first = ders.first().ok_or_else(|| CaError::NoCertificate {
                what: "CA tls.crt".to_owned(),
            })?;
            let c = parse_der(first, "CA tls.crt")?;
            let inside = to_system_time(c.validity().not_before) + CLOCK_SKEW;
            CertificateAuthority::from_pem(crt, key, inside, source)
        }
        other => other,
    }
}

/// The name of a phase, as stored and reported.
pub fn phase_name(p: RotationPhase) -> &'static str {
    match p {
        RotationPhase::Stable => "Stable",
        RotationPhase::Trusting => "Trusting",
        RotationPhase::Reissuing => "Reissuing",
        RotationPhase::Retiring => "Retiring",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{CertificateDer, UnixTime};
    use rustls::server::WebPkiClientVerifier;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn workload(td: &str, ns: &str, sa: &str) -> LeafSubject {
        LeafSubject::Workload {
            trust_domain: td.into(),
            namespace: ns.into(),
            service_account: sa.into(),
        }
    }

    fn root(now: SystemTime) -> CertificateAuthority {
        CertificateAuthority::generate("cluster.local", 3650 * DAY, now).expect("generate root")
    }

    fn ders(pem: &str) -> Vec<CertificateDer<'static>> {
        parse_cert_pems(pem.as_bytes(), "test")
            .expect("pem")
            .into_iter()
            .map(CertificateDer::from)
            .collect()
    }

    /// Verifies a client chain with rustls' WebPKI verifier against `bundle`.
    fn verify(bundle: &str, chain_pem: &str, at: SystemTime) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        for d in ders(bundle) {
            roots.add(d).expect("anchor");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .expect("verifier");
        let chain = ders(chain_pem);
        let (leaf, rest) = chain.split_first().expect("leaf");
        let secs = at
            .duration_since(UNIX_EPOCH)
            .expect("after epoch")
            .as_secs();
        verifier
            .verify_client_cert(
                leaf,
                rest,
                UnixTime::since_unix_epoch(Duration::from_secs(secs)),
            )
            .map(|_| ())
    }

    fn x509_of(pem: &str) -> Vec<u8> {
        ders(pem).remove(0).to_vec()
    }

    #[test]
    fn leaf_has_spiffe_san_usages_and_validity() {
        let now = t0();
        let ca = root(now);
        let leaf = ca
            .issue(&workload("example.org", "shop", "cart"), DAY, now)
            .expect("issue");
        let der = x509_of(&leaf.cert_pem);
        let cert = parse_der(&der, "leaf").expect("parse");
        let san = cert
            .subject_alternative_name()
            .expect("san ext")
            .expect("san");
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://example.org/ns/shop/sa/cart")]
        );
        let eku = cert
            .extended_key_usage()
            .expect("eku")
            .expect("eku present");
        assert!(eku.value.server_auth && eku.value.client_auth);
        let ku = cert.key_usage().expect("ku").expect("ku present");
        assert!(ku.value.digital_signature() && !ku.value.key_cert_sign());
        assert!(!cert.is_ca());
        assert_eq!(leaf.not_before, now - CLOCK_SKEW);
        assert_eq!(leaf.not_after, now + DAY);
        let info =
            LeafInfo::parse(leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes()).expect("info");
        assert!(info.key_matches);
        assert!(ca.signed(&info));
    }

    #[test]
    fn short_lived_leaves_are_not_due_at_once() {
        let now = t0();
        let ca = root(now);
        let subject = workload("cluster.local", "a", "b");
        let ttl = Duration::from_secs(60);
        let leaf = ca.issue(&subject, ttl, now).expect("issue");
        assert_eq!(leaf.not_before, now - Duration::from_secs(6));
        let LeafDecision::Keep { renew_at } = decide_leaf(
            Some((leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes())),
            &subject,
            &ca,
            ttl,
            now,
        ) else {
            panic!("a fresh leaf is kept");
        };
        assert_eq!(renew_at, now + Duration::from_secs(38));
    }

    #[test]
    fn leaf_never_outlives_its_ca() {
        let now = t0();
        let ca = CertificateAuthority::generate("cluster.local", DAY, now).expect("ca");
        let leaf = ca
            .issue(&workload("cluster.local", "a", "b"), 10 * DAY, now)
            .expect("issue");
        assert_eq!(leaf.not_after, now + DAY);
    }

    #[test]
    fn chain_verifies_against_bundle_and_not_against_a_foreign_ca() {
        let now = t0();
        let ca = root(now);
        let leaf = ca
            .issue(&workload("cluster.local", "ns", "sa"), DAY, now)
            .expect("issue");
        verify(&ca.anchor_pem(), &leaf.cert_pem, now).expect("verifies against own CA");
        let other = root(now);
        assert!(verify(&other.anchor_pem(), &leaf.cert_pem, now).is_err());
        // A bundle with both CAs (rotation) accepts it.
        let bundle = trust_bundle([other.anchor_pem().as_str(), ca.anchor_pem().as_str()]);
        verify(&bundle, &leaf.cert_pem, now).expect("verifies against a two-CA bundle");
        // Expired leaves are refused.
        assert!(verify(&ca.anchor_pem(), &leaf.cert_pem, now + 2 * DAY).is_err());
    }

    /// A user intermediate CA: tls.crt = intermediate + root. Leaves carry the
    /// intermediate; the bundle holds the root.
    #[test]
    fn user_intermediate_chain_is_carried_to_leaves() {
        let now = t0();
        let user_root = root(now);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "user intermediate");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = offset(now - DAY);
        params.not_after = offset(now + 365 * DAY);
        params.use_authority_key_identifier_extension = true;
        let inter = params
            .signed_by(&key, &user_root.issuer)
            .expect("sign intermediate");
        let tls_crt = format!("{}{}", inter.pem(), user_root.cert_pem());
        let ca = CertificateAuthority::from_pem(
            tls_crt.as_bytes(),
            key.serialize_pem().as_bytes(),
            now,
            CaSource::User,
        )
        .expect("user CA loads");
        assert_eq!(ca.anchor_pem(), user_root.anchor_pem());
        let leaf = ca
            .issue(&workload("cluster.local", "ns", "sa"), DAY, now)
            .expect("issue");
        assert_eq!(ders(&leaf.cert_pem).len(), 2, "leaf + intermediate");
        verify(&ca.anchor_pem(), &leaf.cert_pem, now).expect("chain verifies against user root");
    }

    #[test]
    fn server_leaf_for_the_injector_has_dns_names() {
        let now = t0();
        let ca = root(now);
        let names = vec![
            "weft-injector.weft-system.svc".to_owned(),
            "weft-injector.weft-system.svc.cluster.local".to_owned(),
        ];
        let subject = LeafSubject::Server {
            dns_names: names.clone(),
        };
        let leaf = ca.issue(&subject, DAY, now).expect("issue");
        let info =
            LeafInfo::parse(leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes()).expect("info");
        assert_eq!(info.dns_names, names);
        assert!(info.uris.is_empty());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ders(&ca.anchor_pem()).remove(0)).expect("anchor");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let v =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("verifier");
        let name =
            rustls::pki_types::ServerName::try_from("weft-injector.weft-system.svc").expect("name");
        let chain = ders(&leaf.cert_pem);
        let secs = now.duration_since(UNIX_EPOCH).expect("epoch").as_secs();
        v.verify_server_cert(
            &chain[0],
            &chain[1..],
            &name,
            &[],
            UnixTime::since_unix_epoch(Duration::from_secs(secs)),
        )
        .expect("server cert verifies for its DNS name");
    }

    #[test]
    fn renewal_decisions() {
        let now = t0();
        let ca = root(now);
        let subject = workload("cluster.local", "ns", "sa");
        let leaf = ca.issue(&subject, DAY, now).expect("issue");
        let existing = Some((leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes()));
        let due = renew_at(leaf.not_before, leaf.not_after);
        assert_eq!(due, leaf.not_before + (DAY + CLOCK_SKEW) * 2 / 3);
        assert_eq!(
            decide_leaf(existing, &subject, &ca, DAY, now),
            LeafDecision::Keep { renew_at: due }
        );
        assert_eq!(
            decide_leaf(existing, &subject, &ca, DAY, due - Duration::from_secs(1)),
            LeafDecision::Keep { renew_at: due }
        );
        assert_eq!(
            decide_leaf(existing, &subject, &ca, DAY, due),
            LeafDecision::Issue(IssueReason::Due)
        );
        assert_eq!(
            decide_leaf(None, &subject, &ca, DAY, now),
            LeafDecision::Issue(IssueReason::Missing)
        );
        // Trust domain changed: re-issue at once.
        let moved = workload("example.org", "ns", "sa");
        assert_eq!(
            decide_leaf(existing, &moved, &ca, DAY, now),
            LeafDecision::Issue(IssueReason::NamesChanged)
        );
        // Signing CA changed: re-issue at once.
        let other = root(now);
        assert_eq!(
            decide_leaf(existing, &subject, &other, DAY, now),
            LeafDecision::Issue(IssueReason::SignerChanged)
        );
        // Hand-edited key or garbage certificate: re-issue.
        let stranger = ca.issue(&subject, DAY, now).expect("issue");
        assert_eq!(
            decide_leaf(
                Some((leaf.cert_pem.as_bytes(), stranger.key_pem.as_bytes())),
                &subject,
                &ca,
                DAY,
                now
            ),
            LeafDecision::Issue(IssueReason::KeyMismatch)
        );
        assert!(matches!(
            decide_leaf(
                Some((b"not pem".as_slice(), leaf.key_pem.as_bytes())),
                &subject,
                &ca,
                DAY,
                now
            ),
            LeafDecision::Issue(IssueReason::Unreadable(_))
        ));
    }

    #[test]
    fn a_shortened_ttl_replaces_longer_lived_leaves_and_a_longer_one_waits() {
        let now = t0();
        let ca = root(now);
        let subject = workload("cluster.local", "ns", "sa");
        let leaf = ca.issue(&subject, DAY, now).expect("issue");
        let existing = Some((leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes()));
        let due = renew_at(leaf.not_before, leaf.not_after);
        // The Mesh TTL went from a day to 18 s: replace it now.
        assert_eq!(
            decide_leaf(existing, &subject, &ca, Duration::from_secs(18), now),
            LeafDecision::Issue(IssueReason::TtlShortened)
        );
        // Raised to a week: the leaf serves until its renewal.
        assert_eq!(
            decide_leaf(existing, &subject, &ca, 7 * DAY, now),
            LeafDecision::Keep { renew_at: due }
        );
        // Short leaves issued for the TTL itself are kept (backdating and
        // whole-second validity included).
        for secs in [10, 18, 600, 3600] {
            let ttl = Duration::from_secs(secs);
            let short = ca.issue(&subject, ttl, now).expect("issue");
            assert!(
                matches!(
                    decide_leaf(
                        Some((short.cert_pem.as_bytes(), short.key_pem.as_bytes())),
                        &subject,
                        &ca,
                        ttl,
                        now
                    ),
                    LeafDecision::Keep { .. }
                ),
                "a fresh {secs}s leaf is kept"
            );
        }
    }

    /// The renewal timing driven by tokio's clock: a worker that sleeps
    /// until the decision's `renew_at` wakes exactly at two thirds of the
    /// lifetime, not a second earlier.
    #[tokio::test(start_paused = true)]
    async fn renewal_wakes_at_two_thirds_with_paused_time() {
        let base = t0();
        let start = tokio::time::Instant::now();
        let clock = move || base + start.elapsed();
        let ca = root(base);
        let subject = workload("cluster.local", "ns", "sa");
        let mut leaf = ca.issue(&subject, DAY, clock()).expect("issue");
        let first = leaf.clone();
        let mut renewals = Vec::new();
        for _ in 0..3 {
            let existing = Some((leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes()));
            let LeafDecision::Keep { renew_at } =
                decide_leaf(existing, &subject, &ca, DAY, clock())
            else {
                panic!("fresh leaf must be kept");
            };
            let wait = renew_at.duration_since(clock()).expect("in the future");
            tokio::time::sleep(wait - Duration::from_secs(1)).await;
            let existing = Some((leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes()));
            assert!(matches!(
                decide_leaf(existing, &subject, &ca, DAY, clock()),
                LeafDecision::Keep { .. }
            ));
            tokio::time::sleep(Duration::from_secs(1)).await;
            let existing = Some((leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes()));
            assert_eq!(
                decide_leaf(existing, &subject, &ca, DAY, clock()),
                LeafDecision::Issue(IssueReason::Due)
            );
            renewals.push(clock());
            leaf = ca.issue(&subject, DAY, clock()).expect("renew");
            assert!(clock() < leaf.not_after, "never expired under traffic");
        }
        assert_eq!(renewals[0], renew_at(first.not_before, first.not_after));
        // Each renewal comes 2/3 of (TTL + backdating) after the previous one.
        let step = (DAY + CLOCK_SKEW) * 2 / 3 - CLOCK_SKEW;
        assert_eq!(
            renewals[1].duration_since(renewals[0]).expect("order"),
            step
        );
        assert_eq!(
            renewals[2].duration_since(renewals[1]).expect("order"),
            step
        );
    }

    fn self_signed_pem(
        ca: bool,
        usages: Vec<KeyUsagePurpose>,
        nb: SystemTime,
        na: SystemTime,
    ) -> (String, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "user CA");
        params.is_ca = if ca {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        params.key_usages = usages;
        params.not_before = offset(nb);
        params.not_after = offset(na);
        let cert = params.self_signed(&key).expect("self-signed");
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn bad_user_cas_are_refused_with_typed_errors() {
        let now = t0();
        let sign = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let load = |c: &str, k: &str| {
            CertificateAuthority::from_pem(c.as_bytes(), k.as_bytes(), now, CaSource::User)
        };

        let (c, k) = self_signed_pem(true, sign.clone(), now - 10 * DAY, now - DAY);
        assert!(matches!(load(&c, &k), Err(CaError::Expired { .. })));

        let (c, k) = self_signed_pem(
            false,
            vec![KeyUsagePurpose::DigitalSignature],
            now - DAY,
            now + DAY,
        );
        assert!(matches!(load(&c, &k), Err(CaError::NotACa { .. })));

        let (c, k) = self_signed_pem(
            true,
            vec![KeyUsagePurpose::DigitalSignature],
            now - DAY,
            now + DAY,
        );
        assert!(matches!(load(&c, &k), Err(CaError::NoKeyCertSign { .. })));

        let (c, _) = self_signed_pem(true, sign.clone(), now - DAY, now + DAY);
        let (_, other_key) = self_signed_pem(true, sign.clone(), now - DAY, now + DAY);
        let err = load(&c, &other_key).expect_err("mismatched key");
        assert!(matches!(err, CaError::KeyMismatch { .. }));
        assert!(err.to_string().contains("does not belong"), "{err}");

        let (_, k) = self_signed_pem(true, sign.clone(), now - DAY, now + DAY);
        assert!(matches!(
            load("garbage", &k),
            Err(CaError::NoCertificate { .. })
        ));
        assert!(matches!(
            load(
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                &k
            ),
            Err(CaError::MalformedCertificate { .. })
        ));
        let (c, _) = self_signed_pem(true, sign.clone(), now - DAY, now + DAY);
        assert!(matches!(
            load(
                &c,
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
            ),
            Err(CaError::MalformedKey { .. })
        ));

        let (c, k) = self_signed_pem(true, sign, now + 10 * DAY, now + 20 * DAY);
        assert!(matches!(load(&c, &k), Err(CaError::NotYetValid { .. })));
    }

    #[test]
    fn a_valid_user_root_loads() {
        let now = t0();
        let (c, k) = self_signed_pem(
            true,
            vec![KeyUsagePurpose::KeyCertSign],
            now - DAY,
            now + 100 * DAY,
        );
        let ca = CertificateAuthority::from_pem(c.as_bytes(), k.as_bytes(), now, CaSource::User)
            .expect("loads");
        assert_eq!(ca.source(), CaSource::User);
        let leaf = ca
            .issue(&workload("cluster.local", "a", "b"), DAY, now)
            .expect("issue");
        assert_eq!(
            ders(&leaf.cert_pem).len(),
            1,
            "a self-signed root is not repeated in the chain"
        );
        verify(&ca.anchor_pem(), &leaf.cert_pem, now).expect("verifies");
    }

    fn timing() -> RotationTiming {
        RotationTiming {
            leaf_ttl: DAY,
            ca_ttl: 3650 * DAY,
            propagation: Duration::from_secs(120),
        }
    }

    /// Writes the state to Secret parts and reads it back, as a restarted
    /// operator would.
    fn restart(state: &CaState, now: SystemTime) -> CaState {
        let (data, ann) = state.to_secret();
        CaState::from_secret(&data, &ann, now).expect("state reads back")
    }

    fn anchors(bundle: &str) -> usize {
        ders(bundle).len()
    }

    #[test]
    fn generated_ca_rotation_walks_every_phase_and_survives_restarts() {
        let td = "cluster.local";
        let tm = timing();
        let mut now = t0();
        let gen0 = DesiredCa::Generated { rotate: None };
        let mut st = CaState::initial(&gen0, td, &tm, now).expect("initial");
        let old_fp = st.active.info().fingerprint.clone();
        let old_anchor = st.active.anchor_pem();
        assert_eq!(st.phase, RotationPhase::Stable);
        assert_eq!(anchors(&st.bundle()), 1);
        assert_eq!(
            st.step(&gen0, &Observed::default(), td, &tm, now)
                .expect("step"),
            StepOutcome::Unchanged
        );
        let old_leaf = st
            .active
            .issue(&workload(td, "ns", "sa"), DAY, now)
            .expect("leaf");

        // Stable -> Trusting when rotateCa changes.
        let gen1 = DesiredCa::Generated {
            rotate: Some("2026-11".into()),
        };
        now += Duration::from_secs(3600);
        assert!(matches!(
            st.step(&gen1, &Observed::default(), td, &tm, now)
                .expect("step"),
            StepOutcome::Changed(_)
        ));
        assert_eq!(st.phase, RotationPhase::Trusting);
        assert_eq!(
            st.active.info().fingerprint,
            old_fp,
            "old CA still signs while the new one propagates"
        );
        assert_eq!(anchors(&st.bundle()), 2);
        let new_fp = st.next.as_ref().expect("next").info().fingerprint.clone();
        st = restart(&st, now);
        assert_eq!(st.phase, RotationPhase::Trusting);
        assert_eq!(
            st.next
                .as_ref()
                .expect("next survives restart")
                .info()
                .fingerprint,
            new_fp
        );
        // Same token again: no second new CA.
        assert_eq!(
            st.step(&gen1, &Observed::default(), td, &tm, now)
                .expect("step"),
            StepOutcome::Unchanged
        );

        // Trusting waits for every bundle and for the propagation grace.
        let carried = Observed {
            bundles_carry_next: true,
            leaves_on_active: false,
            latest_leaf_expiry: Some(old_leaf.not_after),
        };
        assert_eq!(
            st.step(&gen1, &Observed::default(), td, &tm, now + tm.propagation)
                .expect("step"),
            StepOutcome::Unchanged
        );
        assert_eq!(
            st.step(&gen1, &carried, td, &tm, now).expect("step"),
            StepOutcome::Unchanged
        );
        assert_eq!(st.wake_at(&tm), Some(st.since + tm.propagation));
        now += tm.propagation;
        assert!(matches!(
            st.step(&gen1, &carried, td, &tm, now).expect("step"),
            StepOutcome::Changed(_)
        ));
        assert_eq!(st.phase, RotationPhase::Reissuing);
        assert_eq!(st.active.info().fingerprint, new_fp, "new CA signs now");
        assert_eq!(anchors(&st.bundle()), 2, "old CA still trusted");
        assert!(st.bundle().contains(&old_anchor));
        let retire = st.retire_after.expect("retire time");
        assert!(retire >= old_leaf.not_after && retire >= now + DAY);
        // The old leaf must now be re-issued.
        let subject = workload(td, "ns", "sa");
        assert_eq!(
            decide_leaf(
                Some((old_leaf.cert_pem.as_bytes(), old_leaf.key_pem.as_bytes())),
                &subject,
                &st.active,
                DAY,
                now
            ),
            LeafDecision::Issue(IssueReason::SignerChanged)
        );
        st = restart(&st, now);
        assert_eq!(st.phase, RotationPhase::Reissuing);
        assert_eq!(st.retire_after, Some(retire));

        // Reissuing waits for every leaf to be on the new CA.
        assert_eq!(
            st.step(&gen1, &carried, td, &tm, now).expect("step"),
            StepOutcome::Unchanged
        );
        let moved = Observed {
            bundles_carry_next: true,
            leaves_on_active: true,
            latest_leaf_expiry: None,
        };
        assert!(matches!(
            st.step(&gen1, &moved, td, &tm, now).expect("step"),
            StepOutcome::Changed(_)
        ));
        assert_eq!(st.phase, RotationPhase::Retiring);
        st = restart(&st, now);
        assert_eq!(st.phase, RotationPhase::Retiring);
        // A new rotation request waits while retiring.
        let gen2 = DesiredCa::Generated {
            rotate: Some("2027-01".into()),
        };
        assert_eq!(
            st.step(&gen2, &moved, td, &tm, now).expect("step"),
            StepOutcome::Unchanged
        );

        // Retiring ends when the old CA's last leaf has expired.
        assert_eq!(st.wake_at(&tm), Some(retire));
        assert_eq!(
            st.step(&gen1, &moved, td, &tm, retire - Duration::from_secs(1))
                .expect("step"),
            StepOutcome::Unchanged
        );
        assert!(matches!(
            st.step(&gen1, &moved, td, &tm, retire).expect("step"),
            StepOutcome::Changed(_)
        ));
        assert_eq!(st.phase, RotationPhase::Stable);
        assert_eq!(anchors(&st.bundle()), 1);
        assert!(!st.bundle().contains(&old_anchor));
        let st = restart(&st, retire);
        assert_eq!(st.phase, RotationPhase::Stable);
        assert_eq!(st.active.info().fingerprint, new_fp);
        assert_eq!(st.rotate_token.as_deref(), Some("2026-11"));
    }

    #[test]
    fn generated_ca_rotates_itself_at_two_thirds_of_its_life() {
        let td = "cluster.local";
        let tm = RotationTiming {
            ca_ttl: 30 * DAY,
            ..timing()
        };
        let now = t0();
        let want = DesiredCa::Generated { rotate: None };
        let mut st = CaState::initial(&want, td, &tm, now).expect("initial");
        let due = renew_at(st.active.info().not_before, st.active.info().not_after);
        let quiet = Observed::default();
        assert_eq!(
            st.step(&want, &quiet, td, &tm, due - Duration::from_secs(1))
                .expect("step"),
            StepOutcome::Unchanged
        );
        assert!(matches!(
            st.step(&want, &quiet, td, &tm, due).expect("step"),
            StepOutcome::Changed(_)
        ));
        assert_eq!(st.phase, RotationPhase::Trusting);
        // The fresh next CA is not replaced again on the next pass.
        assert_eq!(
            st.step(&want, &quiet, td, &tm, due).expect("step"),
            StepOutcome::Unchanged
        );
    }

    #[test]
    fn switching_to_a_user_ca_rotates_through_trusting() {
        let td = "cluster.local";
        let tm = timing();
        let now = t0();
        let mut st = CaState::initial(&DesiredCa::Generated { rotate: None }, td, &tm, now)
            .expect("initial");
        let (c, k) = self_signed_pem(
            true,
            vec![KeyUsagePurpose::KeyCertSign],
            now - DAY,
            now + 100 * DAY,
        );
        let user = Arc::new(
            CertificateAuthority::from_pem(c.as_bytes(), k.as_bytes(), now, CaSource::User)
                .expect("user"),
        );
        let want = DesiredCa::User(user.clone());
        assert!(matches!(
            st.step(&want, &Observed::default(), td, &tm, now)
                .expect("step"),
            StepOutcome::Changed(_)
        ));
        assert_eq!(st.phase, RotationPhase::Trusting);
        let st = restart(&st, now);
        let next = st.next.as_ref().expect("next");
        assert_eq!(next.source(), CaSource::User);
        assert_eq!(next.info().fingerprint, user.info().fingerprint);
    }

    #[test]
    fn a_generated_ca_only_when_no_user_ca_is_configured() {
        let now = t0();
        assert!(matches!(
            DesiredCa::from_mesh(None, Some("r1".into())),
            Ok(DesiredCa::Generated { rotate: Some(r) }) if r == "r1"
        ));
        let user = CertificateAuthority::generate("cluster.local", DAY, now)
            .expect("generate")
            .cert_pem();
        let (crt, key) = self_signed_pem(
            true,
            vec![KeyUsagePurpose::KeyCertSign],
            now - DAY,
            now + DAY,
        );
        let loaded =
            CertificateAuthority::from_pem(crt.as_bytes(), key.as_bytes(), now, CaSource::User)
                .expect("a valid user CA");
        assert!(matches!(
            DesiredCa::from_mesh(Some(Ok(loaded)), None),
            Ok(DesiredCa::User(ca)) if ca.source() == CaSource::User
        ));
        // Missing or invalid: an error to report, never a generated CA.
        let missing = DesiredCa::from_mesh(
            Some(Err(
                "CA Secret weft-system/user-ca named by the Mesh does not exist".into(),
            )),
            None,
        );
        assert!(matches!(&missing, Err(m) if m.contains("does not exist")));
        let invalid = DesiredCa::from_mesh(
            Some(
                CertificateAuthority::from_pem(user.as_bytes(), b"junk", now, CaSource::User)
                    .map_err(|e| e.to_string()),
            ),
            None,
        );
        assert!(invalid.is_err());
        let prior = PriorCa {
            identities: 3,
            known_ca: Some("ab".into()),
        };
        assert_eq!(
            on_missing_ca(missing.as_ref(), &prior),
            MissingCa::IssueNothing
        );
        assert_eq!(
            on_missing_ca(invalid.as_ref(), &PriorCa::default()),
            MissingCa::IssueNothing,
            "not even on a first start"
        );
    }

    #[test]
    fn a_deleted_weft_ca_is_told_apart_from_a_first_start() {
        let generated = DesiredCa::Generated { rotate: None };
        let user = DesiredCa::User(Arc::new(root(t0())));
        let first = PriorCa::default();
        assert_eq!(on_missing_ca(Ok(&generated), &first), MissingCa::Create);
        assert_eq!(on_missing_ca(Ok(&user), &first), MissingCa::Create);
        let identities_left = PriorCa {
            identities: 2,
            known_ca: None,
        };
        let bundle_known = PriorCa {
            identities: 0,
            known_ca: Some("ab".into()),
        };
        for prior in [&identities_left, &bundle_known] {
            assert_eq!(on_missing_ca(Ok(&generated), prior), MissingCa::Regenerate);
            assert_eq!(on_missing_ca(Ok(&user), prior), MissingCa::Restore);
        }
    }

    #[test]
    fn inconsistent_state_is_an_error_not_a_panic() {
        let now = t0();
        let st = CaState::initial(
            &DesiredCa::Generated { rotate: None },
            "cluster.local",
            &timing(),
            now,
        )
        .expect("initial");
        let (mut data, mut ann) = st.to_secret();
        ann.insert(ANN_PHASE.into(), "Trusting".into());
        assert!(matches!(
            CaState::from_secret(&data, &ann, now),
            Err(CaError::State(_))
        ));
        ann.insert(ANN_PHASE.into(), "Sideways".into());
        assert!(matches!(
            CaState::from_secret(&data, &ann, now),
            Err(CaError::State(_))
        ));
        ann.insert(ANN_PHASE.into(), "Stable".into());
        data.insert(TLS_KEY.into(), b"junk".to_vec());
        assert!(matches!(
            CaState::from_secret(&data, &ann, now),
            Err(CaError::MalformedKey { .. })
        ));
    }

    #[test]
    fn an_expired_stored_ca_still_loads_so_it_can_be_reported() {
        let now = t0();
        let st = CaState::initial(
            &DesiredCa::Generated { rotate: None },
            "cluster.local",
            &RotationTiming {
                ca_ttl: DAY,
                ..timing()
            },
            now,
        )
        .expect("initial");
        let later = now + 2 * DAY;
        let back = restart(&st, later);
        assert!(back.active.info().not_after < later);
    }
}
