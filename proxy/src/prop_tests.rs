//! Property tests of what the proxy reads from outside the process: the
//! mounted identity (`tls.crt`, `tls.key`, `ca.crt` PEM), the config's
//! signature (`proxy.json.sig`), the whole mount through [`load_dir`], and the first bytes a client sends ([`classify`],
//! [`detect`]). Whatever the input: a clear error or a sound result, never a
//! panic. (`proxy.json` itself is fuzzed in `weft-proxy-config`.)
//!
//! Bounds, so the module stays within seconds on two slow cores: 128 cases
//! for the identity properties (a case that loads runs ECDSA verification
//! and key checks, slow in a debug build), 32 for [`load_dir`] (files
//! written to a temporary directory), 64 for the signature, 512 for the detector (pure and cheap),
//! 128 for `detect` over an in-memory stream.

use std::sync::OnceLock;
use std::time::Duration;

use proptest::prelude::*;
use rustls::pki_types::UnixTime;

use crate::net::detect::{Detected, H2_PREFACE, classify, detect};
use crate::snapshot::load_dir;
use crate::test_util::{MountDir, TestCa};
use crate::tls::identity::{Identity, IdentityFiles};

const TRUST_DOMAIN: &str = "cluster.local";
const ID: &str = "spiffe://cluster.local/ns/demo/sa/web";
const NAMES: [&str; 3] = ["tls.crt", "tls.key", "ca.crt"];

/// One valid identity and its CA, made once: key generation is the slow
/// part.
fn valid_with_ca() -> &'static (TestCa, IdentityFiles) {
    static FILES: OnceLock<(TestCa, IdentityFiles)> = OnceLock::new();
    FILES.get_or_init(|| {
        let ca = TestCa::new("weft-prop-ca");
        let leaf = ca.leaf(ID, 3600);
        let files = IdentityFiles {
            cert_chain: leaf.cert_pem.into_bytes(),
            key: leaf.key_pem.into_bytes(),
            bundle: ca.cert_pem.clone().into_bytes(),
        };
        (ca, files)
    })
}

fn valid() -> &'static IdentityFiles {
    &valid_with_ca().1
}

/// Namespace, hash, signature bytes and certificates (DER).
type Meaning = (String, String, Vec<u8>, Vec<Vec<u8>>);

/// What a `proxy.json.sig` says, for comparing two spellings of it.
fn meaning(sig: &[u8]) -> Option<Meaning> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let s = weft_proxy_config::ConfigSignature::parse(sig).ok()?;
    let certs = CertificateDer::pem_slice_iter(s.certificates.as_bytes())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    Some((
        s.namespace.clone(),
        s.hash.clone(),
        s.signature_bytes().ok()?,
        certs,
    ))
}

/// The valid identity with file `which` (index into [`NAMES`]) changed.
fn with_file(which: usize, change: impl FnOnce(&mut Vec<u8>)) -> IdentityFiles {
    let mut files = valid().clone();
    change(match which {
        0 => &mut files.cert_chain,
        1 => &mut files.key,
        _ => &mut files.bundle,
    });
    files
}

/// A changed identity either is refused, or was changed only where nothing
/// is read (a trailing newline, bits of a CA certificate that a trust
/// anchor does not use) and loads as the same identity.
fn refused_or_same(files: &IdentityFiles) -> Result<(), TestCaseError> {
    match Identity::load(files, TRUST_DOMAIN, UnixTime::now()) {
        Ok(id) => prop_assert_eq!(id.id().as_str(), ID),
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    Ok(())
}

/// The properties below start from this.
#[test]
fn valid_identity_loads() {
    let id = Identity::load(valid(), TRUST_DOMAIN, UnixTime::now()).expect("valid identity");
    assert_eq!(id.id().as_str(), ID);
}

const BASE64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

proptest! {
    // 128 cases (see the module documentation).
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn arbitrary_identity_file_is_refused(
        which in 0usize..3,
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let files = with_file(which, |f| *f = bytes);
        let err = Identity::load(&files, TRUST_DOMAIN, UnixTime::now()).expect_err("junk");
        prop_assert!(err.to_string().contains(NAMES[which]), "{} does not name {}", err, NAMES[which]);
    }

    #[test]
    fn truncated_identity_file_is_refused_or_whole(which in 0usize..3, cut in any::<prop::sample::Index>()) {
        let files = with_file(which, |f| {
            let cut = cut.index(f.len());
            f.truncate(cut);
        });
        refused_or_same(&files)?;
    }

    #[test]
    fn flipped_identity_bytes_never_panic(
        which in 0usize..3,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..=4),
    ) {
        let files = with_file(which, |f| {
            let len = f.len();
            for (at, mask) in &flips {
                f[at.index(len)] ^= mask;
            }
        });
        refused_or_same(&files)?;
    }

    // PEM that still decodes, around DER that does not mean what it did:
    // base64 characters of the body replaced by other base64 characters.
    #[test]
    fn changed_der_inside_valid_pem_never_panics(
        which in 0usize..3,
        changes in proptest::collection::vec(
            (any::<prop::sample::Index>(), any::<prop::sample::Index>()), 1..=4),
    ) {
        let files = with_file(which, |f| {
            let body: Vec<usize> = (0..f.len())
                .filter(|&i| BASE64.contains(&f[i]))
                .filter(|&i| {
                    let line_start = f[..i].iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
                    !f[line_start..].starts_with(b"-----")
                })
                .collect();
            for (at, with) in &changes {
                f[body[at.index(body.len())]] = BASE64[with.index(BASE64.len())];
            }
        });
        refused_or_same(&files)?;
    }
}

proptest! {
    // 32 cases: each writes a mount to a temporary directory.
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Junk in any one file of the mount is refused by [`load_dir`] with a
    /// message naming that file.
    #[test]
    fn junk_in_one_mounted_file_is_named(
        which in 0usize..5,
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let config = weft_proxy_config::testing::sample().to_json();
        let ids = valid();
        let gz = weft_proxy_config::gzip(&config);
        let (config_name, config_bytes) = match which {
            4 => (weft_proxy_config::GZIP_FILE_NAME, &gz),
            _ => (weft_proxy_config::FILE_NAME, &config),
        };
        let mut files: Vec<(&str, &[u8])> = vec![
            (config_name, config_bytes.as_slice()),
            ("tls.crt", ids.cert_chain.as_slice()),
            ("tls.key", ids.key.as_slice()),
            ("ca.crt", ids.bundle.as_slice()),
        ];
        let bad = if which == 4 { 0 } else { which };
        files[bad].1 = &bytes;
        let mount = MountDir::new();
        mount.publish(&files);
        let err = load_dir(mount.path(), UnixTime::now()).expect_err("junk is refused");
        prop_assert!(err.to_string().contains(files[bad].0), "{} does not name {}", err, files[bad].0);
    }
}

proptest! {
    // 64 cases: each writes a mount and most verify a signature chain.
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever `proxy.json.sig` holds next to a valid document, the mount
    /// is refused with an error naming the file, or the bytes changed only
    /// the spelling of the operator's signature (hex case, say) and it
    /// loads.
    #[test]
    fn a_junk_or_changed_signature_is_refused(
        junk in proptest::collection::vec(any::<u8>(), 0..1024),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..=3),
        flip_real in any::<bool>(),
    ) {
        let (ca, ids) = valid_with_ca();
        let config = weft_proxy_config::testing::sample();
        let real = ca.sign_config(&config);
        let sig = if flip_real {
            let mut s = real.clone();
            let len = s.len();
            for (at, mask) in &flips {
                s[at.index(len)] ^= mask;
            }
            s
        } else {
            junk
        };
        let json = config.to_json();
        let files: Vec<(&str, &[u8])> = vec![
            (weft_proxy_config::FILE_NAME, json.as_slice()),
            (weft_proxy_config::SIGNATURE_FILE_NAME, sig.as_slice()),
            ("tls.crt", ids.cert_chain.as_slice()),
            ("tls.key", ids.key.as_slice()),
            ("ca.crt", ids.bundle.as_slice()),
        ];
        let mount = MountDir::new();
        mount.publish(&files);
        match load_dir(mount.path(), UnixTime::now()) {
            Ok(_) => prop_assert!(meaning(&sig).is_some() && meaning(&sig) == meaning(&real), "a changed signature loaded"),
            Err(e) => prop_assert!(e.to_string().contains("proxy.json.sig"), "{}", e),
        }
    }
}

#[test]
fn the_signed_sample_mount_loads() {
    let (ca, ids) = valid_with_ca();
    let config = weft_proxy_config::testing::sample();
    let sig = ca.sign_config(&config);
    let json = config.to_json();
    let mount = MountDir::new();
    mount.publish(&[
        (weft_proxy_config::FILE_NAME, json.as_slice()),
        (weft_proxy_config::SIGNATURE_FILE_NAME, sig.as_slice()),
        ("tls.crt", ids.cert_chain.as_slice()),
        ("tls.key", ids.key.as_slice()),
        ("ca.crt", ids.bundle.as_slice()),
    ]);
    load_dir(mount.path(), UnixTime::now()).expect("the signed sample loads");
}

/// What [`detect`] must decide for `input` sent whole and then closed: the
/// first decision [`classify`] makes on a prefix, else opaque.
fn decision(input: &[u8]) -> Detected {
    (1..=input.len().min(H2_PREFACE.len()))
        .find_map(|n| classify(&input[..n]))
        .unwrap_or(Detected::Opaque)
}

/// First bytes: mostly starts of what the detector knows, then anything.
fn first_bytes() -> impl Strategy<Value = Vec<u8>> {
    let known = prop_oneof![
        Just(H2_PREFACE.to_vec()),
        Just(b"GET / HTTP/1.1\r\n".to_vec()),
        Just(b"CONNECT ".to_vec()),
        Just(vec![0x16, 0x03, 0x01]),
        Just(vec![0x16]),
        Just(Vec::new()),
    ];
    (
        known,
        any::<prop::sample::Index>(),
        proptest::collection::vec(any::<u8>(), 0..40),
    )
        .prop_map(|(k, cut, tail)| {
            let mut v = k[..cut.index(k.len() + 1)].to_vec();
            v.extend(tail);
            v
        })
}

proptest! {
    // 512 cases: pure functions over a few dozen bytes.
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// A decision never changes with more bytes (so [`detect`] may stop at
    /// the first one), and "need more" only happens below the preface's
    /// length (so [`detect`] reads a bounded amount).
    #[test]
    fn classification_is_stable_under_more_bytes(
        input in first_bytes(),
        more in proptest::collection::vec(any::<u8>(), 1..40),
    ) {
        let first = classify(&input);
        let longer = [&input[..], &more[..]].concat();
        match first {
            Some(d) => prop_assert_eq!(classify(&longer), Some(d)),
            None => prop_assert!(input.len() < H2_PREFACE.len(), "undecided at {} bytes", input.len()),
        }
    }

    #[test]
    fn classification_of_known_starts(method in 0usize..9, tail in proptest::collection::vec(any::<u8>(), 0..40)) {
        const METHODS: [&str; 9] =
            ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE"];
        let h1 = [format!("{} ", METHODS[method]).as_bytes(), &tail].concat();
        prop_assert_eq!(classify(&h1), Some(Detected::Http1));
        let h2 = [H2_PREFACE, &tail].concat();
        prop_assert_eq!(classify(&h2), Some(Detected::Http2));
    }
}

proptest! {
    // 128 cases: each runs a small runtime.
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Over a stream, in any chunking, [`detect`] decides what the bytes
    /// say and hands back a prefix of them to replay, never more than the
    /// preface's length.
    #[test]
    fn detect_over_a_stream_matches_classify(
        input in first_bytes(),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
    ) {
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
        at.sort_unstable();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let sent = input.clone();
        let (bytes, d) = rt.block_on(async move {
            // The input is shorter than the pipe, so writes never wait.
            let (mut reader, mut writer) = tokio::io::duplex(256);
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let mut from = 0;
                for to in at.into_iter().chain([sent.len()]) {
                    // Fails only once `detect` has decided and dropped its end.
                    let _ = writer.write_all(&sent[from..to]).await;
                    tokio::task::yield_now().await;
                    from = to;
                }
            });
            detect(&mut reader, Duration::from_secs(30)).await.expect("detect")
        });
        prop_assert_eq!(d, decision(&input));
        prop_assert!(input.starts_with(&bytes) && bytes.len() <= H2_PREFACE.len());
    }
}
