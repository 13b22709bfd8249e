//! Test helpers (feature `test-util`): an ECDSA P-256 CA issuing SPIFFE
//! leaves, and a mount directory written with kubelet's atomic-writer
//! layout. Both clean up on drop.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use weft_proxy_config::{ConfigSignature, ProxyConfig, config_signer_id};

/// A test certificate authority.
#[derive(Debug)]
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM), i.e. `ca.crt`.
    pub cert_pem: String,
    /// Config signers issued so far, by trust domain: (key, certificate PEM).
    signers: Mutex<HashMap<String, Arc<(KeyPair, String)>>>,
}

/// A leaf: `tls.crt` and `tls.key` PEM.
#[derive(Clone, Debug)]
pub struct Leaf {
    /// Certificate chain PEM.
    pub cert_pem: String,
    /// Private key PEM.
    pub key_pem: String,
}

impl TestCa {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Self {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key generation");
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).expect("self-signed CA");
        let cert_pem = cert.pem();
        let issuer = Issuer::new(p, key);
        TestCa {
            issuer,
            cert_pem,
            signers: Mutex::default(),
        }
    }

    /// A certificate for a config signer: the SPIFFE ID `spiffe_id`, EKU
    /// codeSigning when `code_signing` (the operator's signer has it),
    /// else serverAuth and clientAuth (a workload's).
    pub fn signer_leaf(&self, spiffe_id: &str, code_signing: bool) -> (KeyPair, String) {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key generation");
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().expect("URI SAN"))];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = if code_signing {
            vec![ExtendedKeyUsagePurpose::CodeSigning]
        } else {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        };
        let now = time_now();
        p.not_before = now - time::Duration::hours(2);
        p.not_after = now + time::Duration::days(1);
        let cert = p.signed_by(&key, &self.issuer).expect("signer signing");
        (key, cert.pem())
    }

    /// `proxy.json.sig` for `cfg`, signed by this CA's config signer of
    /// the config's trust domain (the way weft's operator signs).
    pub fn sign_config(&self, cfg: &ProxyConfig) -> Vec<u8> {
        let td = &cfg.mesh.trust_domain;
        let signer = self
            .signers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(td.clone())
            .or_insert_with(|| Arc::new(self.signer_leaf(&config_signer_id(td), true)))
            .clone();
        sign_with(&signer.0, &signer.1, &cfg.namespace, &cfg.hash)
    }
}

/// `proxy.json.sig` for the document of `namespace` with content hash
/// `hash`, signed by `key` whose certificates are `certificates`.
pub fn sign_with(key: &KeyPair, certificates: &str, namespace: &str, hash: &str) -> Vec<u8> {
    let signature = rcgen::SigningKey::sign(key, &ConfigSignature::message(namespace, hash))
        .expect("ECDSA signing");
    ConfigSignature::new(namespace, hash, &signature, certificates.to_owned())
        .to_json()
        .into_bytes()
}

impl TestCa {
    /// A web server certificate for DNS `names` (an ingress gateway's
    /// listener certificate), valid for a day.
    pub fn server_leaf(&self, names: &[&str]) -> Leaf {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key generation");
        let mut p =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .expect("DNS names");
        p.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("server"),
        );
        p.is_ca = IsCa::ExplicitNoCa;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = time_now();
        p.not_before = now - time::Duration::hours(2);
        p.not_after = now + time::Duration::days(1);
        let cert = p.signed_by(&key, &self.issuer).expect("leaf signing");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A leaf for `spiffe_id`, valid from `now - 1h` for `valid_for`
    /// seconds after now (negative: already expired).
    pub fn leaf(&self, spiffe_id: &str, valid_for_secs: i64) -> Leaf {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key generation");
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, "weft-test-leaf");
        p.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().expect("URI SAN"))];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time_now();
        p.not_before = now - time::Duration::hours(2);
        p.not_after = now + time::Duration::seconds(valid_for_secs);
        if valid_for_secs < 0 {
            p.not_before = now - time::Duration::hours(48);
        }
        let cert = p.signed_by(&key, &self.issuer).expect("leaf signing");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// A mount directory in kubelet's atomic-writer layout.
#[derive(Debug)]
pub struct MountDir {
    dir: tempfile::TempDir,
    seq: AtomicU64,
}

impl MountDir {
    /// An empty mount.
    pub fn new() -> Self {
        MountDir {
            dir: tempfile::tempdir().expect("temp dir"),
            seq: AtomicU64::new(0),
        }
    }

    /// The mount path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a new generation the way kubelet does: a fresh `..<n>` dir,
    /// a `..data_tmp` link renamed over `..data`, and top-level key links.
    pub fn publish(&self, files: &[(&str, &[u8])]) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let gen_name = format!("..gen_{n}");
        let gen_dir = self.dir.path().join(&gen_name);
        std::fs::create_dir(&gen_dir).expect("generation dir");
        for (name, bytes) in files {
            std::fs::write(gen_dir.join(name), bytes).expect("write key");
        }
        let tmp = self.dir.path().join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&gen_name, &tmp).expect("symlink");
        std::fs::rename(&tmp, self.dir.path().join("..data")).expect("swap ..data");
        for (name, _) in files {
            let link = self.dir.path().join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("..data/{name}"), &link).expect("key link");
            }
        }
        gen_dir
    }
}

impl Default for MountDir {
    fn default() -> Self {
        Self::new()
    }
}

/// One HTTP/2 frame as a client wrote it (see [`client_frames`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawFrame {
    /// Frame type (0 DATA, 1 HEADERS, …).
    pub kind: u8,
    /// Stream id.
    pub stream: u32,
    /// Payload length.
    pub len: usize,
    /// Where the frame ends in the bytes read (the preface included).
    pub end: usize,
}

/// A request or response body fed from a channel, frame by frame (an
/// error ends it failed).
pub fn channel_body() -> (
    tokio::sync::mpsc::Sender<Result<http_body::Frame<bytes::Bytes>, crate::http::BoxError>>,
    crate::http::Body,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    (tx, crate::http::boxed(ChannelBody(rx)))
}

/// See [`channel_body`].
struct ChannelBody(
    tokio::sync::mpsc::Receiver<Result<http_body::Frame<bytes::Bytes>, crate::http::BoxError>>,
);

impl http_body::Body for ChannelBody {
    type Data = bytes::Bytes;
    type Error = crate::http::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        self.0.poll_recv(cx)
    }
}

/// Reads what an HTTP/2 client wrote to the other end of an in-memory
/// pipe, without answering it, until `enough` holds for the frames after
/// the connection preface; fails if the client closes first.
pub async fn client_frames(
    peer: &mut tokio::io::DuplexStream,
    enough: impl Fn(&[RawFrame]) -> bool,
) -> Vec<RawFrame> {
    use tokio::io::AsyncReadExt as _;
    const PREFACE: usize = 24;
    let mut wire = Vec::new();
    loop {
        let mut frames = Vec::new();
        let mut at = PREFACE;
        while wire.len() >= at + 9 {
            let len = usize::from(wire[at]) << 16
                | usize::from(wire[at + 1]) << 8
                | usize::from(wire[at + 2]);
            frames.push(RawFrame {
                kind: wire[at + 3],
                stream: u32::from_be_bytes([
                    wire[at + 5] & 0x7f,
                    wire[at + 6],
                    wire[at + 7],
                    wire[at + 8],
                ]),
                len,
                end: at + 9 + len,
            });
            at += 9 + len;
        }
        if enough(&frames) {
            return frames;
        }
        let mut chunk = [0u8; 4096];
        let n = peer
            .read(&mut chunk)
            .await
            .expect("read the client's bytes");
        assert!(n > 0, "the client closed");
        wire.extend_from_slice(&chunk[..n]);
    }
}
