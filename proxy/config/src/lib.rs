//! The `proxy.json` contract between weft's operator (the only writer) and
//! weft's proxy (the only reader).
//!
//! ```text
//! operator: render(index, ns) ──► ProxyConfig ──seal()──► JSON ──encode()──► ConfigMap weft-proxy
//!                                                                              │ kubelet projected volume
//! proxy:    ProxyConfig ◄──validate()── parse() ◄──decode()── /var/run/weft/proxy.json[.gz]
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
//! in a deterministic order by the operator, and [`ProxyConfig::hash`] is the
//! SHA-256 of the document with an empty `hash`, so a reader can detect a
//! torn or edited file and a writer can skip unchanged writes.

mod model;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
#[cfg(test)]
mod tests;
mod validate;

pub use model::*;
pub use validate::{ValidationError, ValidationErrors};

use std::io::{Read, Write};

use sha2::{Digest, Sha256};

/// The format version this crate reads and writes.
pub const FORMAT_VERSION: u32 = 1;
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

impl ProxyConfig {
    /// Computes the content hash: SHA-256 over the canonical JSON with `hash` empty.
    pub fn compute_hash(&self) -> String {
        let mut unhashed = self.clone();
        unhashed.hash = String::new();
        let bytes = serde_json::to_vec(&unhashed).expect("a ProxyConfig always serializes");
        format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
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
    pub fn load(bytes: &[u8]) -> Result<Self, LoadError> {
        #[derive(serde::Deserialize)]
        struct VersionOnly {
            version: u32,
        }
        let v: VersionOnly = serde_json::from_slice(bytes)?;
        if v.version != FORMAT_VERSION {
            return Err(LoadError::Version { found: v.version });
        }
        let cfg: ProxyConfig = serde_json::from_slice(bytes)?;
        let actual = cfg.compute_hash();
        if cfg.hash != actual {
            return Err(LoadError::Hash {
                stated: cfg.hash,
                actual,
            });
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Gzip-compresses config bytes for a ConfigMap's `binaryData`.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(bytes).expect("writing to a Vec cannot fail");
    enc.finish().expect("writing to a Vec cannot fail")
}

/// Decompresses `proxy.json.gz` bytes, refusing more than [`MAX_DECODED_BYTES`].
pub fn gunzip(bytes: &[u8]) -> Result<Vec<u8>, LoadError> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(MAX_DECODED_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(LoadError::Gzip)?;
    if out.len() as u64 > MAX_DECODED_BYTES {
        return Err(LoadError::TooLarge);
    }
    Ok(out)
}
