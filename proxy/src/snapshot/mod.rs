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
use std::sync::Arc;

use rustls::pki_types::UnixTime;
use weft_proxy_config::{
    Known, Loaded, Previous, ProxyConfig, SIGNATURE_FILE_NAME, Service, ServicePort,
};

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
    /// What the next reload needs to keep unchanged Services.
    known: Known,
}

impl Snapshot {
    /// Builds a snapshot from parts (tests, and [`load_dir`]); fails when
    /// the config's routes do not compile.
    pub fn new(
        config: ProxyConfig,
        identity: Identity,
        source: PathBuf,
    ) -> Result<Self, RouteError> {
        let loaded = Loaded {
            config,
            known: Known::default(),
            reused: Vec::new(),
        };
        Self::after(loaded, identity, source, None)
    }

    /// Builds a snapshot from a loaded document; `prev` is the snapshot the
    /// document was loaded after ([`ProxyConfig::load_after`]), whose
    /// compiled routes of unchanged Services are kept.
    fn after(
        loaded: Loaded,
        identity: Identity,
        source: PathBuf,
        prev: Option<&Snapshot>,
    ) -> Result<Self, RouteError> {
        let Loaded {
            config,
            known,
            reused,
        } = loaded;
        // Every index means the Service it meant before: what was built
        // for unchanged Services can be kept as it is.
        let same_order = prev.is_some_and(|p| {
            p.config.services.len() == config.services.len()
                && p.config
                    .services
                    .iter()
                    .zip(&config.services)
                    .all(|(a, b)| {
                        Arc::ptr_eq(a, b) || (a.namespace == b.namespace && a.name == b.name)
                    })
        });
        let routes =
            RouteTable::build_after(&config, prev.map(|p| &p.routes), &reused, same_order)?;
        let destinations =
            Destinations::build_after(&config, prev.map(|p| (&p.destinations, &p.config)), &reused);
        let gateway = gateway::GatewayTable::build(&config);
        Ok(Snapshot {
            config,
            identity,
            source,
            routes,
            destinations,
            gateway,
            known,
        })
    }

    /// What a load after this snapshot may take from it.
    fn previous(&self) -> Previous<'_> {
        Previous {
            config: &self.config,
            known: &self.known,
        }
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
    load_dir_after(dir, now, None)
}

/// [`load_dir`] after `prev`, the snapshot serving now: Services whose
/// bytes did not change are taken from it ([`ProxyConfig::load_after`]).
pub fn load_dir_after(
    dir: &Path,
    now: UnixTime,
    prev: Option<&Snapshot>,
) -> Result<Snapshot, SnapshotError> {
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
    let loaded =
        ProxyConfig::load_after(&bytes, prev.map(Snapshot::previous)).map_err(|source| {
            SnapshotError::Config {
                path: cfg_path,
                source,
            }
        })?;
    let config = &loaded.config;
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
            config: config.namespace.clone(),
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
    config_signature::verify(sig.as_deref(), config, &identity, now).map_err(|source| {
        SnapshotError::Signature {
            path: cfg_path_for_routes.clone(),
            source,
        }
    })?;
    Snapshot::after(loaded, identity, data, prev).map_err(|source| SnapshotError::Routes {
        path: cfg_path_for_routes,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{MountDir, TestCa};

    /// Writes `config`, signed, and an identity of its namespace as a new
    /// generation of `mount`.
    fn publish(mount: &MountDir, ca: &TestCa, config: &ProxyConfig) {
        let leaf = ca.leaf("spiffe://cluster.local/ns/demo/sa/web", 3600);
        let (json, sig) = (config.to_json(), ca.sign_config(config));
        mount.publish(&[
            (weft_proxy_config::FILE_NAME, json.as_slice()),
            (SIGNATURE_FILE_NAME, sig.as_slice()),
            ("tls.crt", leaf.cert_pem.as_bytes()),
            ("tls.key", leaf.key_pem.as_bytes()),
            ("ca.crt", ca.cert_pem.as_bytes()),
        ]);
    }

    /// A reload after an endpoint change keeps the unchanged Services
    /// (parsed, checked and compiled once) and serves what a load from
    /// nothing serves.
    #[test]
    fn a_reload_keeps_unchanged_services_and_serves_the_new_document() {
        let ca = TestCa::new("weft-snapshot-ca");
        let mount = MountDir::new();
        let first = weft_proxy_config::testing::sample();
        publish(&mount, &ca, &first);
        let before = load_dir(mount.path(), UnixTime::now()).expect("loads");
        let mut second = first.clone();
        second.generation += 1;
        Arc::make_mut(&mut second.services[0]).endpoints[0].address =
            "10.244.0.99".parse().expect("ip");
        second.seal();
        publish(&mount, &ca, &second);
        let after = load_dir_after(mount.path(), UnixTime::now(), Some(&before)).expect("loads");
        let cold = load_dir(mount.path(), UnixTime::now()).expect("loads");
        assert_eq!(after.config, cold.config);
        assert!(!Arc::ptr_eq(
            &after.config.services[0],
            &before.config.services[0]
        ));
        for i in 1..after.config.services.len() {
            assert!(Arc::ptr_eq(
                &after.config.services[i],
                &before.config.services[i]
            ));
        }
        // The moved pod is found at its new address only, and routed as
        // from nothing.
        let at = |s: &Snapshot, addr: &str| {
            s.lookup(addr.parse().expect("addr"))
                .map(|r| (r.service, r.port, r.endpoint))
        };
        for addr in ["10.244.0.99:8080", "10.244.0.11:8080", "10.96.0.20:8080"] {
            assert_eq!(at(&after, addr), at(&cold, addr), "{addr}");
        }
        assert_eq!(at(&after, "10.244.0.99:8080"), Some((0, 0, Some(0))));
        assert_eq!(at(&after, "10.244.0.11:8080"), None);
        assert_eq!(
            after.routes.live_endpoints(0, None),
            cold.routes.live_endpoints(0, None)
        );
    }
}
