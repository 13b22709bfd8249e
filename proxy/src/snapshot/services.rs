//! Which destination a connection was addressed to: the Service port
//! behind a ClusterIP:port, or the endpoint whose pod IP:port it is,
//! indexed once per snapshot.
//!
//! In: the config's Services. Out: [`ServiceRef`]s, the handle every layer
//! above uses for "this port of this Service" (routes, client policy,
//! listeners).

use std::collections::HashMap;
use std::net::SocketAddr;

use weft_proxy_config::{Endpoint, ProxyConfig, ServicePort};

/// Where a Service port is found in the config.
#[derive(Clone, Copy, Debug)]
pub struct ServiceRef {
    /// Index into `config.services`.
    pub service: usize,
    /// Index into that service's `ports`.
    pub port: usize,
    /// Set when the destination was one endpoint's own address (a pod IP,
    /// as headless Services and StatefulSet peers use): the index into that
    /// service's `endpoints`. Such traffic goes to that endpoint only,
    /// without routes, with mTLS when it is meshed.
    pub endpoint: Option<usize>,
}

/// Destination address → Service port, built once per snapshot.
#[derive(Debug, Default)]
pub struct Destinations {
    /// ClusterIP:port → Service port.
    by_addr: HashMap<SocketAddr, ServiceRef>,
    /// Endpoint IP:port → that endpoint of a Service port.
    by_endpoint: HashMap<SocketAddr, ServiceRef>,
}

impl Destinations {
    /// Indexes every ClusterIP:port and endpoint IP:port of `config`.
    pub fn build(config: &ProxyConfig) -> Self {
        let (mut addrs, mut endpoints) = (0, 0);
        for svc in &config.services {
            addrs += svc.ports.len() * svc.cluster_ips.len();
            endpoints += svc.ports.len() * svc.endpoints.len();
        }
        let mut by_addr = HashMap::with_capacity(addrs);
        let mut by_endpoint = HashMap::with_capacity(endpoints);
        for (si, svc) in config.services.iter().enumerate() {
            for (pi, port) in svc.ports.iter().enumerate() {
                let at = ServiceRef {
                    service: si,
                    port: pi,
                    endpoint: None,
                };
                for ip in &svc.cluster_ips {
                    by_addr.insert(SocketAddr::new(*ip, port.port), at);
                }
                for (ei, ep) in svc.endpoints.iter().enumerate() {
                    // A pod behind several Services keeps the first one
                    // listing it (the config's order is deterministic).
                    by_endpoint
                        .entry(SocketAddr::new(ep.address, endpoint_port(ep, port)))
                        .or_insert(ServiceRef {
                            endpoint: Some(ei),
                            ..at
                        });
                }
            }
        }
        Destinations {
            by_addr,
            by_endpoint,
        }
    }

    /// The Service port behind a ClusterIP:port, else the endpoint whose
    /// pod IP:port it is.
    pub fn lookup(&self, dst: SocketAddr) -> Option<ServiceRef> {
        self.by_addr
            .get(&dst)
            .or_else(|| self.by_endpoint.get(&dst))
            .copied()
    }
}

/// The port to dial on an endpoint for a Service port.
pub fn endpoint_port(ep: &Endpoint, port: &ServicePort) -> u16 {
    port.name
        .as_ref()
        .and_then(|n| ep.ports.get(n).copied())
        .unwrap_or(port.target_port)
}
