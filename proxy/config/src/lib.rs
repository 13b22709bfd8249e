//! The `proxy.json` contract between weft's operator (the only writer) and
//! weft's proxy (the only reader).
//!
//! ```text
//! operator: render(index, ns) ──► ProxyConfig ──seal()──► JSON ──encode()──► ConfigMap weft-proxy
//!                                        hash ──sign──► ConfigSignature ──►   (+ proxy.json.sig)
//!                                                                              │ kubelet projected volume
//! proxy:    ProxyConfig ◄──validate()── parse() ◄──decode()── /var/run/weft/proxy.json[.gz]
//!           accepted only if proxy.json.sig verifies (see [`ConfigSignature`])
//! ```
//!
//! One file per meshed namespace holds everything a proxy of that namespace
//! needs: mesh settings, every Service it may call (cluster IPs, ports with
//! protocol, ready endpoints with their identity and subsets, routes and
//! client policy), and the inbound rules (authorization, rate limits) with
//! the workload selectors the proxy matches against its own pod labels.
//!
//! Durations are integer milliseconds and percentages are numbers 0–100, so
//! the reader never parses unit strings on a hot path. Every list is written
//! in a deterministic order by the operator, and [`ProxyConfig::hash`] is a
//! content hash (see [`ProxyConfig::compute_hash`]), so a reader can detect a
//! torn or edited file and a writer can skip unchanged writes.
//!
//! # Built from parts
//!
//! At mesh scale every namespace's file lists the same thousands of
//! Services; only the top (namespace, generation, hash) and `inbound` differ.
//! So the contract is shaped to let a writer serialize, hash and compress
//! each Service once and share the result between namespaces:
//!
//! - the hash covers each Service through its own digest
//!   ([`service_digest`], [`services_root`]), and the rest of the document
//!   through [`ProxyConfig::hash_with_services_root`];
//! - [`ProxyConfig::json_parts`] gives the bytes around the `services`
//!   array, so a document is `head ‖ service₁ ‖ , ‖ … ‖ serviceₙ ‖ tail`;
//! - [`Deflated`] parts compressed on their own concatenate into one
//!   ordinary gzip member ([`GZIP_HEADER`], parts, [`gzip_trailer`]);
//! - [`validate_services`] checks a group of Services whose backends resolve
//!   among themselves, once per change of that group.

mod gzip;
mod labels;
mod model;
pub mod par;
#[cfg(test)]
mod prop_tests;
mod signature;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
#[cfg(test)]
mod tests;
mod validate;

pub use gzip::{Crc, Deflated, GZIP_HEADER, gunzip, gzip, gzip_trailer};
pub use labels::{app_label, version_label};
pub use model::*;
pub use signature::{
    CODE_SIGNING_OID, CONFIG_SIGNER_PATH, ConfigSignature, MAX_SIGNATURE_BYTES,
    SIGNATURE_ALGORITHM, SIGNATURE_FILE_NAME, SIGNATURE_VERSION, SignatureFormatError,
    config_signer_id,
};
pub use validate::{ValidationError, ValidationErrors, validate_services};

use validate::OwnChecks;

use std::collections::HashMap;
use std::hash::BuildHasher as _;
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// The format version this crate reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Ports treated as opaque TCP unless configured otherwise: the operator
/// renders them `Opaque` (Service port or target port), and the proxy never
/// waits for client bytes on them, since their servers speak first or their
/// clients send binary that detection cannot use: FTP (21), SMTP (25, 465,
/// 587), POP3 (110), IMAP (143), MySQL (3306, 33060), NATS (4222), Galera
/// (4444), PostgreSQL (5432), Redis (6379), Cassandra (9042), Elasticsearch
/// transport (9300), memcached (11211), MongoDB (27017).
pub const DEFAULT_OPAQUE_PORTS: [u16; 16] = [
    21, 25, 110, 143, 465, 587, 3306, 4222, 4444, 5432, 6379, 9042, 9300, 11211, 27017, 33060,
];
/// The key of the uncompressed config in the ConfigMap and mount.
pub const FILE_NAME: &str = "proxy.json";
/// The key of the gzip-compressed config (in `binaryData`) and mount.
pub const GZIP_FILE_NAME: &str = "proxy.json.gz";
/// Largest accepted decoded config: the ConfigMap limit is 1 MiB compressed,
/// so anything much larger than that decompressed is hostile.
pub const MAX_DECODED_BYTES: u64 = 64 * 1024 * 1024;

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The bytes are not a JSON document of the expected shape.
    #[error("proxy.json is not valid: {0}")]
    Parse(#[from] serde_json::Error),
    /// The gzip stream is corrupt or truncated.
    #[error("proxy.json.gz could not be decompressed (truncated or corrupt?): {0}")]
    Gzip(std::io::Error),
    /// The decompressed config is implausibly large.
    #[error("proxy.json.gz decompresses to more than {MAX_DECODED_BYTES} bytes; refusing it")]
    TooLarge,
    /// A Service in the document is not of the expected shape.
    #[error("proxy.json services[{index}] is not valid: {source}")]
    Service {
        /// Its place in `services`.
        index: usize,
        /// What the parser found.
        source: serde_json::Error,
    },
    /// A format version this proxy does not understand.
    #[error(
        "proxy.json has format version {found}, this proxy reads version {FORMAT_VERSION}; upgrade the proxy or the operator so they agree"
    )]
    Version {
        /// The version in the file.
        found: u32,
    },
    /// The content does not match its hash: the file is torn or was edited.
    #[error(
        "proxy.json content hash mismatch (file says {stated}, content is {actual}): torn write or hand edit"
    )]
    Hash {
        /// The hash in the file.
        stated: String,
        /// The hash of the content.
        actual: String,
    },
    /// The document parsed but is inconsistent.
    #[error(transparent)]
    Invalid(#[from] ValidationErrors),
}

/// SHA-256 of one Service's JSON (as [`ProxyConfig::to_json`] writes it
/// inside `services`): a leaf of the content hash.
pub fn service_digest(service_json: &[u8]) -> [u8; 32] {
    Sha256::digest(service_json).into()
}

/// SHA-256 over the [`service_digest`]s of the Services, in document order:
/// what the content hash knows of the `services` array.
pub fn services_root<'a>(digests: impl IntoIterator<Item = &'a [u8; 32]>) -> [u8; 32] {
    let mut h = Sha256::new();
    for d in digests {
        h.update(d);
    }
    h.finalize().into()
}

/// The key that opens the `services` array in the serialized document.
const SERVICES_KEY: &[u8] = b"\"services\":[";

impl ProxyConfig {
    /// Computes the content hash:
    /// `sha256:` hex of SHA-256(`S` ‖ `R`), where `S` is the JSON of the
    /// document with `hash` empty and `services` empty, and `R` is
    /// [`services_root`] of the [`service_digest`] of each Service's JSON.
    /// Equal to SHA-256 of a flat serialization in what it detects (any
    /// changed byte changes it), but a writer can keep each Service's digest
    /// and hash a namespace's document without serializing its Services.
    pub fn compute_hash(&self) -> String {
        let digests: Vec<[u8; 32]> = self
            .services
            .iter()
            .map(|s| service_digest(&serde_json::to_vec(s).expect("a Service always serializes")))
            .collect();
        self.hash_with_services_root(&services_root(&digests))
    }

    /// The content hash of this document with its `services` replaced by
    /// Services whose [`services_root`] is `root`; `self.services` and
    /// `self.hash` are ignored.
    pub fn hash_with_services_root(&self, root: &[u8; 32]) -> String {
        let skeleton = serde_json::to_vec(&self.skeleton(String::new()))
            .expect("a ProxyConfig always serializes");
        let mut h = Sha256::new();
        h.update(&skeleton);
        h.update(root);
        format!("sha256:{}", hex::encode(h.finalize()))
    }

    /// The serialized document around its Services: `(head, tail)` such that
    /// the bytes [`ProxyConfig::to_json`] would write for this document with
    /// Services `s₁…sₙ` are `head ‖ json(s₁) ‖ , ‖ … ‖ json(sₙ) ‖ tail`.
    /// `self.services` is ignored; `self.hash` is written as it is.
    pub fn json_parts(&self) -> (Vec<u8>, Vec<u8>) {
        let mut bytes = serde_json::to_vec(&self.skeleton(self.hash.clone()))
            .expect("a ProxyConfig always serializes");
        // The first match is the key: no field before `services` is named
        // so, and inside JSON strings every quote is escaped.
        let at = bytes
            .windows(SERVICES_KEY.len())
            .position(|w| w == SERVICES_KEY)
            .expect("the document always has a services array")
            + SERVICES_KEY.len();
        let tail = bytes.split_off(at);
        (bytes, tail)
    }

    /// This document without Services, with the given hash.
    fn skeleton(&self, hash: String) -> ProxyConfig {
        ProxyConfig {
            gateway: self.gateway.clone(),
            version: self.version,
            generation: self.generation,
            hash,
            namespace: self.namespace.clone(),
            mesh: self.mesh.clone(),
            services: Vec::new(),
            inbound: self.inbound.clone(),
        }
    }

    /// Sets [`ProxyConfig::hash`] from the content. Call last, before writing.
    pub fn seal(&mut self) {
        self.hash = self.compute_hash();
    }

    /// Serializes to the exact bytes written to the ConfigMap.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a ProxyConfig always serializes")
    }

    /// Parses and fully checks a config: format version, content hash, and
    /// [`ProxyConfig::validate`]. This is what the proxy runs on every reload.
    ///
    /// Each Service's digest is taken over its bytes as the document holds
    /// them, which are exactly [`ProxyConfig::to_json`]'s for a document the
    /// operator wrote, instead of over a re-serialization of what was
    /// parsed; only a document in another layout (pretty-printed, keys
    /// reordered) pays for the re-serialization, and its hash is then
    /// checked as defined.
    pub fn load(bytes: &[u8]) -> Result<Self, LoadError> {
        Self::load_after(bytes, None).map(|l| l.config)
    }

    /// [`ProxyConfig::load`], taking from the previous load of the same
    /// mount every Service whose bytes in the document are the same as
    /// then: its parsed form is shared instead of parsed again, its digest
    /// is not taken again, and the checks of its own fields are not run
    /// again while the trust domain is the same (what its routes say of
    /// other Services is). A reload at mesh scale changes a few Services of
    /// thousands.
    ///
    /// "The same bytes" is decided by a fast hash of them, seeded at random
    /// and carried from load to load ([`Known`]). A Service taken that way contributes the
    /// digest of the bytes it was parsed from to the content hash, so the
    /// document is accepted only if the hash it states (and the signature
    /// over it) covers exactly the Services that will serve; if it does
    /// not, the document is loaded again from nothing, and a document that
    /// is not what its hash says is refused as before.
    pub fn load_after(bytes: &[u8], prev: Option<Previous<'_>>) -> Result<Loaded, LoadError> {
        let wire: Wire<'_> = match serde_json::from_slice(bytes) {
            Ok(w) => w,
            Err(e) => {
                // Another format version is named as such, not by its first
                // field this version does not know.
                #[derive(serde::Deserialize)]
                struct VersionOnly {
                    version: u32,
                }
                return Err(match serde_json::from_slice::<VersionOnly>(bytes) {
                    Ok(v) if v.version != FORMAT_VERSION => LoadError::Version { found: v.version },
                    _ => LoadError::Parse(e),
                });
            }
        };
        if wire.version != FORMAT_VERSION {
            return Err(LoadError::Version {
                found: wire.version,
            });
        }
        let hasher = prev.map(|p| p.known.hasher.clone()).unwrap_or_default();
        let prints: Vec<u64> = wire
            .services
            .iter()
            .map(|raw| hasher.hash_one(raw.get().as_bytes()))
            .collect();
        // What is taken from before: its index there, digest and parsed form.
        type Kept = (usize, [u8; 32], Arc<Service>);
        let old: Vec<Option<Kept>> = prints
            .iter()
            .map(|print| {
                let p = prev?;
                let &i = p.known.prints.get(print)?;
                Some((
                    i,
                    *p.known.digests.get(i)?,
                    p.config.services.get(i)?.clone(),
                ))
            })
            .collect();
        // The new Services are digested, parsed and checked on their own
        // (their own fields: the trust domain is the document's), on more
        // than one thread when there are many.
        let new: Vec<usize> = (0..old.len()).filter(|&i| old[i].is_none()).collect();
        let trust_domain = wire.mesh.trust_domain.as_str();
        let raws = &wire.services;
        let mut parsed = par::map(&new, par::threads_for(new.len()), |_, &index| {
            let text = raws[index].get();
            let service: Service = serde_json::from_str(text)
                .map_err(|source| LoadError::Service { index, source })?;
            let own = validate::own_errors(&service, trust_domain);
            Ok::<_, LoadError>((service_digest(text.as_bytes()), Arc::new(service), own))
        })
        .into_iter();
        let mut known = Known {
            prints: HashMap::with_capacity_and_hasher(prints.len(), Default::default()),
            digests: Vec::with_capacity(prints.len()),
            hasher,
        };
        let mut reused = Vec::with_capacity(prints.len());
        let mut services = Vec::with_capacity(prints.len());
        let mut own_checks = Vec::with_capacity(prints.len());
        for (index, (print, old)) in prints.into_iter().zip(old).enumerate() {
            match old {
                Some((i, digest, service)) => {
                    known.digests.push(digest);
                    services.push(service);
                    reused.push(Some(i));
                    own_checks.push(None);
                }
                None => {
                    let (digest, service, own) =
                        parsed.next().expect("a parse for every new Service")?;
                    known.digests.push(digest);
                    services.push(service);
                    reused.push(None);
                    own_checks.push(Some(own));
                }
            }
            known.prints.insert(print, index);
        }
        let cfg = ProxyConfig {
            version: wire.version,
            generation: wire.generation,
            hash: wire.hash,
            namespace: wire.namespace,
            mesh: wire.mesh,
            services,
            inbound: wire.inbound,
            gateway: wire.gateway,
        };
        if cfg.hash != cfg.hash_with_services_root(&services_root(&known.digests)) {
            if reused.iter().any(Option::is_some) {
                // A Service taken from before is not what the document holds
                // (a fingerprint collision): load it from nothing.
                return Self::load_after(bytes, None);
            }
            let actual = cfg.compute_hash();
            if cfg.hash != actual {
                return Err(LoadError::Hash {
                    stated: cfg.hash,
                    actual,
                });
            }
        }
        // A Service's own checks hold while its bytes and the trust domain
        // do; what it says of other Services is checked again.
        let same_domain = prev.is_some_and(|p| p.config.mesh.trust_domain == cfg.mesh.trust_domain);
        cfg.validate_with(|i| match own_checks.get_mut(i).and_then(Option::take) {
            Some(found) => OwnChecks::Done(found),
            None if same_domain => OwnChecks::Skip,
            None => OwnChecks::Run,
        })?;
        Ok(Loaded {
            config: cfg,
            known,
            reused,
        })
    }
}

/// Whether a Service's routes name Services (backends, mirrors): its checks
/// and compiled routes depend on those too, not on its own bytes alone.
pub fn names_other_services(svc: &Service) -> bool {
    !svc.http_routes.is_empty() || !svc.tcp_routes.is_empty()
}

/// A loaded document ([`ProxyConfig::load_after`]).
#[derive(Debug)]
pub struct Loaded {
    /// The document.
    pub config: ProxyConfig,
    /// What the next load of the same mount needs of this one.
    pub known: Known,
    /// For each Service of `config`, in order: its index in the previous
    /// load's Services when it was taken from there unchanged.
    pub reused: Vec<Option<usize>>,
}

/// What a load keeps of each Service for the next one: a fingerprint of its
/// bytes (a fast hash, seeded at random and carried from load to load; a
/// load from nothing seeds it anew) and its digest.
#[derive(Clone, Debug, Default)]
pub struct Known {
    /// Fingerprint → index in the document's Services.
    prints: HashMap<u64, usize, foldhash::fast::RandomState>,
    digests: Vec<[u8; 32]>,
    hasher: foldhash::fast::RandomState,
}

/// The previous load of a mount, for [`ProxyConfig::load_after`].
#[derive(Clone, Copy, Debug)]
pub struct Previous<'a> {
    /// Its document.
    pub config: &'a ProxyConfig,
    /// What it kept ([`Loaded::known`]).
    pub known: &'a Known,
}

/// `proxy.json` as [`ProxyConfig::load`] reads it: [`ProxyConfig`]'s fields
/// with the same names and defaults, each Service still its bytes in the
/// document. A field added to [`ProxyConfig`] must be added here too: the
/// struct literal in `load` does not compile without it.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Wire<'a> {
    version: u32,
    generation: u64,
    #[serde(default)]
    hash: String,
    namespace: String,
    mesh: MeshSettings,
    #[serde(default, borrow)]
    services: Vec<&'a serde_json::value::RawValue>,
    #[serde(default)]
    inbound: Inbound,
    #[serde(default)]
    gateway: Option<Gateway>,
}
