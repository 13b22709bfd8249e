//! The certificates an ingress gateway presents: one directory per
//! certificate (`<dir>/<name>/tls.crt`, `tls.key`: a Kubernetes TLS Secret
//! mounted by kubelet), read again when kubelet swaps the directory's
//! `..data`, and picked per handshake by the client's SNI.
//!
//! A certificate that does not load (half-written, wrong key, not PEM) is
//! logged and counted; the last good one of that name keeps being served.
//! In: the listener's certificate names from the snapshot. Out: the
//! `CertifiedKey` rustls presents.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::state::State;

/// How long a loaded certificate is served before its directory is looked
/// at again (one `readlink` per name and interval, not per handshake).
const RECHECK: Duration = Duration::from_secs(1);

/// Certificates by directory name, loaded on demand and kept current.
#[derive(Debug)]
pub struct CertStore {
    dir: PathBuf,
    provider: Arc<CryptoProvider>,
    loaded: Mutex<HashMap<String, Loaded>>,
}

#[derive(Debug, Clone)]
struct Loaded {
    /// What `..data` pointed at (or the files' modification time) when
    /// it was read.
    version: String,
    checked: Instant,
    key: Option<Arc<CertifiedKey>>,
    /// DNS names of the leaf (lower case; `*.x` wildcards as written).
    names: Vec<String>,
}

impl CertStore {
    /// Certificates under `dir`.
    pub fn new(dir: PathBuf) -> Self {
        CertStore {
            dir,
            provider: crate::tls::params::provider(),
            loaded: Mutex::new(HashMap::new()),
        }
    }

    /// The certificate `name` and the DNS names it covers; `None` when it
    /// never loaded.
    pub fn get(&self, name: &str, state: &State) -> Option<(Arc<CertifiedKey>, Vec<String>)> {
        let now = Instant::now();
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = loaded.get(name)
            && now.duration_since(l.checked) < RECHECK
        {
            return l.key.clone().map(|k| (k, l.names.clone()));
        }
        let dir = self.dir.join(name);
        let version = version_of(&dir);
        let previous = loaded.get(name).cloned();
        let entry = match previous {
            Some(mut l) if l.version == version => {
                l.checked = now;
                l
            }
            previous => match load(&dir, &self.provider) {
                Ok((key, names)) => {
                    tracing::info!(certificate = name, ?names, "gateway certificate loaded");
                    Loaded {
                        version,
                        checked: now,
                        key: Some(Arc::new(key)),
                        names,
                    }
                }
                Err(e) => {
                    state
                        .metrics
                        .error(crate::metrics::Direction::Inbound, "gateway-certificate");
                    tracing::error!(certificate = name, dir = %dir.display(), error = %e, "gateway certificate does not load; serving the last good one, if any");
                    let mut keep = previous.unwrap_or(Loaded {
                        version: String::new(),
                        checked: now,
                        key: None,
                        names: Vec::new(),
                    });
                    keep.version = version;
                    keep.checked = now;
                    keep
                }
            },
        };
        let out = entry.key.clone().map(|k| (k, entry.names.clone()));
        loaded.insert(name.to_owned(), entry);
        out
    }
}

/// What identifies one generation of a certificate directory.
fn version_of(dir: &Path) -> String {
    if let Ok(target) = std::fs::read_link(dir.join("..data")) {
        return target.to_string_lossy().into_owned();
    }
    let mtime = |f: &str| {
        std::fs::metadata(dir.join(f))
            .and_then(|m| m.modified())
            .map(|t| format!("{t:?}"))
            .unwrap_or_default()
    };
    format!("{}|{}", mtime("tls.crt"), mtime("tls.key"))
}

fn load(dir: &Path, provider: &CryptoProvider) -> Result<(CertifiedKey, Vec<String>), String> {
    let read = |f: &str| std::fs::read(dir.join(f)).map_err(|e| format!("{f}: {e}"));
    let (crt, key) = (read("tls.crt")?, read("tls.key")?);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&crt)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.crt: {e}"))?;
    let leaf = chain.first().ok_or("tls.crt: no certificate")?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| format!("tls.key: {e}"))?;
    let names = dns_names(leaf)?;
    let ck = CertifiedKey::from_der(chain, key, provider).map_err(|e| format!("{e}"))?;
    Ok((ck, names))
}

fn dns_names(leaf: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| format!("tls.crt: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        for cn in cert.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                names.push(s.to_ascii_lowercase());
            }
        }
    }
    Ok(names)
}

/// Whether a certificate DNS name covers `host` (a `*.` wildcard covers
/// exactly one label).
fn covers(name: &str, host: &str) -> bool {
    match name.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(first, rest)| !first.is_empty() && rest == suffix),
        None => name == host,
    }
}

/// Picks the certificate of one gateway port per handshake: the listener
/// the SNI selects, then the first of its certificates whose names cover
/// the SNI, else its first that loads.
#[derive(Debug)]
pub struct SniResolver {
    /// The proxy (its snapshot says which listeners share the port).
    pub state: Arc<State>,
    /// The certificates.
    pub store: Arc<CertStore>,
    /// The port.
    pub port: u16,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name().map(str::to_ascii_lowercase);
        let snap = self.state.snapshot.load_full()?;
        let listener = snap.gateway.as_ref()?.listener(self.port, sni.as_deref())?;
        let mut first = None;
        for name in &listener.certificates {
            let Some((key, names)) = self.store.get(name, &self.state) else {
                continue;
            };
            if let Some(h) = &sni
                && names.iter().any(|n| covers(n, h))
            {
                return Some(key);
            }
            first.get_or_insert(key);
        }
        first
    }
}

#[cfg(test)]
mod tests {
    use super::covers;

    #[test]
    fn a_wildcard_covers_one_label() {
        assert!(covers("a.example.com", "a.example.com"));
        assert!(covers("*.example.com", "a.example.com"));
        assert!(!covers("*.example.com", "a.b.example.com"));
        assert!(!covers("*.example.com", "example.com"));
        assert!(!covers("b.example.com", "a.example.com"));
    }
}
