//! weft-injector: the mutating admission webhook that brings pods into the mesh.
//!
//! ```text
//!  kube-apiserver ──AdmissionReview──▶ server (axum/hyper/rustls, :8443)
//!                                        │  admission::review(body, cfg)
//!                                        ▼
//!                  Mesh "default" ──▶ mesh::watch ──▶ ArcSwap<InjectConfig>
//!                                        │
//!                                        ▼
//!                          patch::patch(&Pod, &InjectConfig) ──▶ JSON patch
//! ```
//!
//! The decision is pure: [`patch::patch`] builds the RFC 6902 patch that adds
//! `weft-init`, the `weft-proxy` sidecar, the projected `/var/run/weft`
//! volume, rewritten app probes ([`probes`]), and the injected label and
//! annotations, honouring per-pod annotations ([`overrides`]).
//! [`admission`] wraps it in AdmissionReview v1; [`server`] serves it over
//! HTTPS with a certificate [`tls`] reloads from its mounted Secret;
//! [`manifests::inject_manifests`] applies the same patch to YAML for
//! `weftctl inject`. The contract with the proxy (env, files, probe format)
//! is written down in `injector/README.md`.

pub mod admission;
pub mod config;
pub mod identity_mounts;
pub mod manifests;
pub mod mesh;
pub mod metrics;
pub mod overrides;
pub mod patch;
pub mod probes;
#[cfg(test)]
mod prop_tests;
pub mod server;
pub mod tls;

pub use config::InjectConfig;
pub use manifests::{InjectManifestError, inject_manifests};
pub use patch::{PatchError, decide, patch};
