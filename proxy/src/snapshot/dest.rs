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
use crate::tls::SpiffeId;

/// Where a chosen backend's traffic goes.
#[derive(Debug)]
pub struct Dest<'a> {
    /// The backend's Service.
    pub service: &'a Service,
    /// Its index in `config.services`.
    pub index: usize,
    /// Its `namespace/name`: the key of its breakers, retry budget and
    /// connection limits.
    pub key: &'a str,
    /// The Service port dialled (its target port and protocol apply).
    pub port: &'a ServicePort,
    /// Its endpoints that take new traffic (the subset's, with a subset).
    pub endpoints: Endpoints<'a>,
    /// Where to send traffic when `endpoints` is empty: the original
    /// destination, or the backend Service's ClusterIP; none for a subset
    /// (a ClusterIP would spread over every version).
    pub fallback: Option<SocketAddr>,
    /// The subset's name, for messages.
    pub subset: Option<&'a str>,
}

/// Some endpoints of one Service, with their identities: a view into the
/// snapshot (its config and route table), so resolving a request's
/// destination allocates nothing.
#[derive(Clone, Copy, Debug)]
pub struct Endpoints<'a> {
    all: &'a [Endpoint],
    identities: &'a [Option<SpiffeId>],
    chosen: Chosen<'a>,
}

/// Which of a Service's endpoints an [`Endpoints`] holds.
#[derive(Clone, Copy, Debug)]
enum Chosen<'a> {
    /// One pod, addressed by its IP.
    One(usize),
    /// Those at these indices.
    Listed(&'a [usize]),
}

impl<'a> Endpoints<'a> {
    fn of(
        config: &'a ProxyConfig,
        table: &'a RouteTable,
        service: usize,
        chosen: Chosen<'a>,
    ) -> Self {
        Endpoints {
            all: config
                .services
                .get(service)
                .map_or(&[], |s| s.endpoints.as_slice()),
            identities: table.identities(service),
            chosen,
        }
    }

    fn index(&self, k: usize) -> usize {
        match self.chosen {
            Chosen::One(i) if k == 0 => i,
            Chosen::One(_) => usize::MAX,
            Chosen::Listed(l) => l.get(k).copied().unwrap_or(usize::MAX),
        }
    }

    /// How many.
    pub fn len(&self) -> usize {
        match self.chosen {
            Chosen::One(i) => usize::from(i < self.all.len()),
            Chosen::Listed(l) => l.len(),
        }
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `k`-th (`k < len()`).
    pub fn get(&self, k: usize) -> &'a Endpoint {
        &self.all[self.index(k)]
    }

    /// The identity of the `k`-th; none when it is outside the mesh.
    pub fn identity(&self, k: usize) -> Option<&'a SpiffeId> {
        self.identities.get(self.index(k)).and_then(Option::as_ref)
    }

    /// All of them, in order.
    pub fn iter(&self) -> impl Iterator<Item = &'a Endpoint> + use<'a> {
        let this = *self;
        (0..this.len()).map(move |k| this.get(k))
    }
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
    table: &'a RouteTable,
    target: ServiceRef,
    backend: Option<Backend>,
    dst: SocketAddr,
) -> Result<Dest<'a>, NoSuchPort> {
    let routed = &config.services[target.service];
    let routed_port = &routed.ports[target.port];
    if let Some(i) = target.endpoint.filter(|i| *i < routed.endpoints.len()) {
        // Addressed to one pod: that pod only (routes do not apply).
        return Ok(Dest {
            service: routed,
            index: target.service,
            key: table.key(target.service),
            port: routed_port,
            endpoints: Endpoints::of(config, table, target.service, Chosen::One(i)),
            fallback: Some(dst),
            subset: None,
        });
    }
    let Some(b) = backend else {
        return Ok(Dest {
            service: routed,
            index: target.service,
            key: table.key(target.service),
            port: routed_port,
            endpoints: Endpoints::of(
                config,
                table,
                target.service,
                Chosen::Listed(table.live_endpoints(target.service, None)),
            ),
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
        key: table.key(b.service),
        port,
        endpoints: Endpoints::of(
            config,
            table,
            b.service,
            Chosen::Listed(table.live_endpoints(b.service, b.subset)),
        ),
        fallback,
        subset: b
            .subset
            .and_then(|s| service.subsets.get(s))
            .map(String::as_str),
    })
}
