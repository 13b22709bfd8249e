//! Where a routed backend's traffic goes ([`resolve`]): the backend
//! Service's port, its endpoints taking new traffic (a subset's, with a
//! subset), and the fallback address when it has none yet.
//!
//! In: the snapshot's config and route table, the destination the client
//! dialled, the backend a route picked (or none). Out: a [`Dest`], the
//! input of the client policy (`client`).

use std::net::SocketAddr;

use weft_proxy_config::{Endpoint, ProxyConfig, Service, ServicePort};

use super::routes::{Backend, RouteTable};
use super::services::ServiceRef;

/// Where a chosen backend's traffic goes.
#[derive(Debug)]
pub struct Dest<'a> {
    /// The backend's Service.
    pub service: &'a Service,
    /// Its index in `config.services`.
    pub index: usize,
    /// The Service port dialled (its target port and protocol apply).
    pub port: &'a ServicePort,
    /// Its endpoints that take new traffic (the subset's, with a subset).
    pub endpoints: Vec<&'a Endpoint>,
    /// Where to send traffic when `endpoints` is empty: the original
    /// destination, or the backend Service's ClusterIP; none for a subset
    /// (a ClusterIP would spread over every version).
    pub fallback: Option<SocketAddr>,
    /// The subset's name, for messages.
    pub subset: Option<&'a str>,
}

/// Why a backend could not be resolved for a request.
#[derive(Debug, thiserror::Error)]
#[error(
    "route backend {service} has no port {port}; check the ServiceRoute's backend port against the Service"
)]
pub struct NoSuchPort {
    /// `namespace/name`.
    pub service: String,
    /// The port asked for.
    pub port: u16,
}

/// Resolves `backend` (none: the target Service itself) for traffic that
/// was addressed to `dst`, i.e. to Service port `target`.
pub fn resolve<'a>(
    config: &'a ProxyConfig,
    table: &RouteTable,
    target: ServiceRef,
    backend: Option<Backend>,
    dst: SocketAddr,
) -> Result<Dest<'a>, NoSuchPort> {
    let routed = &config.services[target.service];
    let routed_port = &routed.ports[target.port];
    if let Some(ep) = target.endpoint.and_then(|i| routed.endpoints.get(i)) {
        // Addressed to one pod: that pod only (routes do not apply).
        return Ok(Dest {
            service: routed,
            index: target.service,
            port: routed_port,
            endpoints: vec![ep],
            fallback: Some(dst),
            subset: None,
        });
    }
    let Some(b) = backend else {
        return Ok(Dest {
            service: routed,
            index: target.service,
            port: routed_port,
            endpoints: table.endpoints(config, target.service, None),
            fallback: Some(dst),
            subset: None,
        });
    };
    let service = &config.services[b.service];
    let want = b.port.unwrap_or(routed_port.port);
    let port = service
        .ports
        .iter()
        .find(|p| p.port == want)
        .ok_or_else(|| NoSuchPort {
            service: service.key(),
            port: want,
        })?;
    let fallback = match b.subset {
        Some(_) => None,
        None if b.service == target.service && want == routed_port.port => Some(dst),
        None => service
            .cluster_ips
            .first()
            .map(|ip| SocketAddr::new(*ip, port.port)),
    };
    Ok(Dest {
        service,
        index: b.service,
        port,
        endpoints: table.endpoints(config, b.service, b.subset),
        fallback,
        subset: b
            .subset
            .and_then(|s| service.subsets.get(s))
            .map(String::as_str),
    })
}
