//! One consistent view of the mount: the parsed `proxy.json` plus the
//! identity, loaded and validated together, then published atomically.
//!
//! ```text
//! /var/run/weft/..data ──► <..timestamp dir> ──► proxy.json[.gz], proxy.json.sig, tls.crt, tls.key, ca.crt
//!                     load_dir() ──► Snapshot ──► ArcSwap (readers: one atomic load per connection)
//! ```
//!
//! kubelet's atomic writer puts every key in a fresh `..<timestamp>`
//! directory and swaps the `..data` symlink; reading through the resolved
//! `..data` target gives files of one generation, never a mix.
//!
//! Everything derived from one config generation is built here, once, off
//! the request path, and lives and dies with the snapshot: the destination
//! index ([`services`]) and the compiled routes ([`routes`]). State that
//! must outlive a reload (pools, counters, ejections, rate-limit buckets)
//! is per process and lives in [`crate::state::State`]. In: the mount
//! directory. Out: a [`Snapshot`], published by `State::reload`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rustls::pki_types::UnixTime;
use weft_proxy_config::{ProxyConfig, SIGNATURE_FILE_NAME, Service, ServicePort};

pub mod dest;
pub mod gateway;
pub mod rewrite;
pub mod routes;
pub mod services;

use crate::tls::IdentityError;
use crate::tls::config_signature::{self, SignatureError};
use crate::tls::identity::{Identity, IdentityFiles};
use routes::{RouteError, RouteTable};
pub use services::{Destinations, ServiceRef, endpoint_port};

/// Why a snapshot was rejected.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Neither `proxy.json` nor `proxy.json.gz` exists.
    #[error(
        "{0}: neither proxy.json nor proxy.json.gz exists; is the weft-proxy ConfigMap projected into the volume?"
    )]
    NoConfig(PathBuf),
    /// The config did not load.
    #[error("{path}: {source}")]
    Config {
        /// The file.
        path: PathBuf,
        /// Why.
        source: weft_proxy_config::LoadError,
    },
    /// The identity did not load.
    #[error("identity in {dir}: {source}")]
    Identity {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: IdentityError,
    },
    /// `proxy.json.sig` is missing or does not make the document one the
    /// operator issued.
    #[error("{path}: {source}")]
    Signature {
        /// The config file.
        path: PathBuf,
        /// Why.
        source: SignatureError,
    },
    /// The document is another namespace's.
    #[error(
        "{path} is the config of namespace {config}, but this pod is {identity}: a ConfigMap copied from another namespace?"
    )]
    ForeignNamespace {
        /// The config file.
        path: PathBuf,
        /// The document's namespace.
        config: String,
        /// This pod's identity.
        identity: String,
    },
    /// The routes did not compile (a proxy older or newer than its operator?).
    #[error("{path}: {source}")]
    Routes {
        /// The config file.
        path: PathBuf,
        /// Why.
        source: RouteError,
    },
}

impl SnapshotError {
    /// A short label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            SnapshotError::Read { .. } => "read",
            SnapshotError::NoConfig(_) => "no-config",
            SnapshotError::Config { .. } => "config",
            SnapshotError::Identity { .. } => "identity",
            SnapshotError::Signature { source, .. } => source.reason(),
            SnapshotError::ForeignNamespace { .. } => "foreign-namespace",
            SnapshotError::Routes { .. } => "routes",
        }
    }
}

/// A loaded, validated config + identity, with the state derived from them
/// once per snapshot (off the request path): the ClusterIP index and the
/// compiled routes.
#[derive(Debug)]
pub struct Snapshot {
    /// The config.
    pub config: ProxyConfig,
    /// The identity.
    pub identity: Identity,
    /// Where it was read from (the resolved `..data` target).
    pub source: PathBuf,
    /// Compiled routes and per-subset endpoint lists.
    pub routes: RouteTable,
    /// Destination address → Service port.
    destinations: Destinations,
    /// An ingress gateway's listeners (none for a sidecar).
    pub gateway: Option<gateway::GatewayTable>,
}

impl Snapshot {
    /// Builds a snapshot from parts (tests, and [`load_dir`]); fails when
    /// the config's routes do not compile.
    pub fn new(
        config: ProxyConfig,
        identity: Identity,
        source: PathBuf,
    ) -> Result<Self, RouteError> {
        let routes = RouteTable::build(&config)?;
        let destinations = Destinations::build(&config);
        let gateway = gateway::GatewayTable::build(&config);
        Ok(Snapshot {
            config,
            identity,
            source,
            routes,
            destinations,
            gateway,
        })
    }

    /// Where the destination is in the config: the Service port behind a
    /// ClusterIP:port, else the endpoint whose pod IP:port it is.
    pub fn lookup(&self, dst: SocketAddr) -> Option<ServiceRef> {
        self.destinations.lookup(dst)
    }

    /// The Service and port a [`ServiceRef`] points at.
    pub fn service(&self, r: ServiceRef) -> (&Service, &ServicePort) {
        let svc = &self.config.services[r.service];
        (svc, &svc.ports[r.port])
    }
}

/// Resolves the directory holding one generation: `dir/..data` when
/// kubelet's layout is present, else `dir` itself.
pub fn resolve_data_dir(dir: &Path) -> PathBuf {
    let data = dir.join("..data");
    match std::fs::read_link(&data) {
        Ok(target) if target.is_absolute() => target,
        Ok(target) => dir.join(target),
        Err(_) => dir.to_path_buf(),
    }
}

/// Loads and validates the whole snapshot under `dir`.
pub fn load_dir(dir: &Path, now: UnixTime) -> Result<Snapshot, SnapshotError> {
    let data = resolve_data_dir(dir);
    let read = |name: &str| {
        let path = data.join(name);
        std::fs::read(&path).map_err(|source| SnapshotError::Read { path, source })
    };
    let (cfg_path, bytes) = match std::fs::read(data.join(weft_proxy_config::FILE_NAME)) {
        Ok(b) => (data.join(weft_proxy_config::FILE_NAME), b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let path = data.join(weft_proxy_config::GZIP_FILE_NAME);
            let gz = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(SnapshotError::NoConfig(data));
                }
                Err(source) => return Err(SnapshotError::Read { path, source }),
            };
            let b = weft_proxy_config::gunzip(&gz).map_err(|source| SnapshotError::Config {
                path: path.clone(),
                source,
            })?;
            (path, b)
        }
        Err(source) => {
            return Err(SnapshotError::Read {
                path: data.join(weft_proxy_config::FILE_NAME),
                source,
            });
        }
    };
    let cfg_path_for_routes = cfg_path.clone();
    let config = ProxyConfig::load(&bytes).map_err(|source| SnapshotError::Config {
        path: cfg_path,
        source,
    })?;
    let files = IdentityFiles {
        cert_chain: read("tls.crt")?,
        key: read("tls.key")?,
        bundle: read("ca.crt")?,
    };
    let identity = Identity::load(&files, &config.mesh.trust_domain, now).map_err(|source| {
        SnapshotError::Identity {
            dir: data.clone(),
            source,
        }
    })?;
    if identity.id().namespace() != Some(config.namespace.as_str()) {
        return Err(SnapshotError::ForeignNamespace {
            path: cfg_path_for_routes,
            config: config.namespace,
            identity: identity.id().to_string(),
        });
    }
    let sig = match std::fs::read(data.join(SIGNATURE_FILE_NAME)) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(SnapshotError::Read {
                path: data.join(SIGNATURE_FILE_NAME),
                source,
            });
        }
    };
    config_signature::verify(sig.as_deref(), &config, &identity, now).map_err(|source| {
        SnapshotError::Signature {
            path: cfg_path_for_routes.clone(),
            source,
        }
    })?;
    Snapshot::new(config, identity, data).map_err(|source| SnapshotError::Routes {
        path: cfg_path_for_routes,
        source,
    })
}
