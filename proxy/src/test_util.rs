//! Test helpers (feature `test-util`): an ECDSA P-256 CA issuing SPIFFE
//! leaves, and a mount directory written with kubelet's atomic-writer
//! layout. Both clean up on drop.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A test certificate authority.
#[derive(Debug)]
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM), i.e. `ca.crt`.
    pub cert_pem: String,
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
        TestCa { issuer, cert_pem }
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
