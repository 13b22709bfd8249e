//! The serving certificate, reloaded from its mounted Secret without a restart.
//!
//! The operator rotates Secret `weft-injector-tls`; kubelet publishes it
//! with its atomic writer: a fresh `..<timestamp>/` directory, then the
//! `..data` symlink renamed over the old one, with `tls.crt` and `tls.key`
//! being symlinks through `..data`. Watching the files would follow the
//! old inodes and miss the swap, so [`watch`] watches the *directory* and
//! re-reads both files on any change in it (plus a slow periodic re-read in
//! case events are lost). A pair that does not parse or whose key does not
//! match the certificate (a read that straddled a swap) is refused with a
//! log line and the previous pair keeps serving; new handshakes use the new
//! pair, open connections are untouched.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Certificate file name inside the mounted Secret.
pub const CERT_FILE: &str = "tls.crt";
/// Key file name inside the mounted Secret.
pub const KEY_FILE: &str = "tls.key";

/// Why a certificate pair could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file is not the PEM it should be.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the pair (unsupported key, key not matching the certificate).
    #[error("certificate/key in {dir}: {source}")]
    Rustls {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The directory watch could not be set up.
    #[error("watching {dir}: {source}")]
    Watch {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: notify::Error,
    },
}

/// Reads `tls.crt` (leaf first, then chain) and `tls.key` from `dir`.
pub fn load(dir: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            path: p.to_owned(),
            source,
        })
    };
    let cert_pem = read(&cert_path)?;
    let key_pem = read(&key_path)?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: cert_path,
            reason: "holds no CERTIFICATE block".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
        path: key_path,
        reason: e.to_string(),
    })?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(certs, key, &provider).map_err(|source| TlsError::Rustls {
        dir: dir.to_owned(),
        source,
    })
}

/// The certificate currently served; swapped atomically on reload.
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertResolver").finish_non_exhaustive()
    }
}

impl CertResolver {
    /// Starts serving `key`.
    pub fn new(key: CertifiedKey) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(key),
        })
    }

    /// Re-reads `dir`; swaps in the pair when it differs. `Ok(true)` when
    /// a new certificate is now served.
    pub fn reload(&self, dir: &Path) -> Result<bool, TlsError> {
        let fresh = load(dir)?;
        if fresh.cert == self.current.load().cert {
            return Ok(false);
        }
        self.current.store(Arc::new(fresh));
        Ok(true)
    }

    /// The leaf certificate currently served.
    pub fn leaf(&self) -> CertificateDer<'static> {
        self.current.load().cert[0].clone()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// A TLS server config serving whatever `resolver` holds, HTTP/2 and HTTP/1.1.
pub fn server_config(resolver: Arc<CertResolver>) -> Arc<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// Watches `dir` and reloads into `resolver` until `shutdown` fires. Fails
/// only when the watch cannot be set up at all.
pub fn spawn_watch(
    dir: PathBuf,
    resolver: Arc<CertResolver>,
    metrics: Arc<Metrics>,
    poll: Duration,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, TlsError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |_event: notify::Result<notify::Event>| {
        // Coalesce: one pending reload covers any number of events.
        let _ = tx.try_send(());
    })
    .map_err(|source| TlsError::Watch {
        dir: dir.clone(),
        source,
    })?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|source| TlsError::Watch {
            dir: dir.clone(),
            source,
        })?;
    Ok(tokio::spawn(async move {
        // Keep the watcher alive as long as the loop runs.
        let _watcher = watcher;
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                Some(()) = rx.recv() => {}
                _ = tick.tick() => {}
            }
            match resolver.reload(&dir) {
                Ok(true) => {
                    metrics.cert_reload("reloaded");
                    tracing::info!(dir = %dir.display(), "serving certificate reloaded");
                }
                Ok(false) => {}
                Err(e) => {
                    metrics.cert_reload("error");
                    tracing::warn!(error = %e, "serving certificate not reloaded; keeping the previous one");
                }
            }
        }
    }))
}
