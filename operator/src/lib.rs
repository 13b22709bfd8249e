//! weft's operator: turns weft resources, Services, EndpointSlices and
//! ServiceAccounts into what the data plane reads.
//!
//! - [`ca`] and [`identity`]: the mesh CA and per-service-account SPIFFE
//!   certificates in Secrets (the security half).
//! - [`index`] and [`render`]: an in-memory index of the cluster and the pure
//!   renderer of each meshed namespace's `proxy.json` (the traffic half);
//!   [`config`] runs the reconcilers and writes the ConfigMaps.
//! - [`gateway`]: the ingress gateways of weft's `GatewayClass` (their
//!   Deployments, Services, signed configs and Gateway API status).
//!
//! The binary `weft-operator` runs both halves behind leader election; the
//! offline CLI `weftctl` reuses the pure parts.

pub mod admin;
pub mod ca;
pub mod config;
pub mod gateway;
pub mod identity;
pub mod index;
pub mod leader;
pub mod metrics;
pub mod observe;
pub mod render;
pub mod signing;
