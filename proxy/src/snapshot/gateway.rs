//! An ingress gateway's listeners, compiled once per snapshot: per port,
//! the listeners that share it, and per listener the host names it routes,
//! each to the Service whose routes handle its requests.
//!
//! ```text
//! port ──► listener (TLS SNI or request host: exact, then the longest *.suffix, then none)
//!      ──► virtual host (request host, same order) ──► ServiceRef ──► outbound route, backend, endpoints
//! ```
//!
//! In: the `gateway` section of `proxy.json`. Out: [`GatewayTable`], read
//! by `crate::gateway` to bind ports and pick certificates, and per request
//! to find the routes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use weft_proxy_config::{ListenerProtocol, ProxyConfig, host_matches};

use super::services::ServiceRef;

/// The compiled listeners of a gateway.
#[derive(Debug, Default)]
pub struct GatewayTable {
    /// `namespace/name` of the Gateway.
    pub name: String,
    ports: BTreeMap<u16, Vec<GatewayListener>>,
}

/// One listener.
#[derive(Debug)]
pub struct GatewayListener {
    /// Its name in the Gateway.
    pub name: Arc<str>,
    /// HTTP or HTTPS.
    pub protocol: ListenerProtocol,
    /// Its host name pattern; none: any.
    pub hostname: Option<String>,
    /// Certificate directory names (HTTPS).
    pub certificates: Vec<String>,
    hosts: Vec<(Option<String>, ServiceRef)>,
}

impl GatewayTable {
    /// Compiles the gateway section; `None` for a sidecar's document.
    /// Validation has checked that every host names a known Service.
    pub fn build(config: &ProxyConfig) -> Option<Self> {
        let g = config.gateway.as_ref()?;
        let index: HashMap<String, usize> = config
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| (s.key(), i))
            .collect();
        let mut ports: BTreeMap<u16, Vec<GatewayListener>> = BTreeMap::new();
        for l in &g.listeners {
            let hosts = l
                .hosts
                .iter()
                .filter_map(|h| {
                    let service = *index.get(&h.service)?;
                    let port = config.services[service]
                        .ports
                        .iter()
                        .position(|p| p.port == l.port)
                        .unwrap_or(0);
                    Some((
                        h.hostname.clone(),
                        ServiceRef {
                            service,
                            port,
                            endpoint: None,
                        },
                    ))
                })
                .collect();
            ports.entry(l.port).or_default().push(GatewayListener {
                name: l.name.as_str().into(),
                protocol: l.protocol,
                hostname: l.hostname.clone(),
                certificates: l.certificates.clone(),
                hosts,
            });
        }
        Some(GatewayTable {
            name: g.name.clone(),
            ports,
        })
    }

    /// The ports to listen on, with their protocol.
    pub fn ports(&self) -> impl Iterator<Item = (u16, ListenerProtocol)> + '_ {
        self.ports
            .iter()
            .filter_map(|(p, ls)| ls.first().map(|l| (*p, l.protocol)))
    }

    /// The listener of `port` for `host` (TLS SNI or the request's host,
    /// without port): an exact host name first, then the longest matching
    /// `*.suffix`, then one without a host name.
    pub fn listener(&self, port: u16, host: Option<&str>) -> Option<&GatewayListener> {
        let ls = self.ports.get(&port)?;
        best(ls.iter().map(|l| (l.hostname.as_deref(), l)), host)
    }

    /// The Service whose routes handle a request for `host` on `port`.
    pub fn route(&self, port: u16, host: Option<&str>) -> Option<(&GatewayListener, ServiceRef)> {
        let l = self.listener(port, host)?;
        let r = best(l.hosts.iter().map(|(h, r)| (h.as_deref(), *r)), host)?;
        Some((l, r))
    }
}

/// The candidate whose pattern matches `host` best (see
/// [`GatewayTable::listener`]).
fn best<'a, T>(
    candidates: impl Iterator<Item = (Option<&'a str>, T)>,
    host: Option<&str>,
) -> Option<T> {
    let mut found: Option<(u8, usize, T)> = None;
    for (pattern, item) in candidates {
        let rank = match (pattern, host) {
            (None, _) => Some((0, 0)),
            (Some(p), Some(h)) if host_matches(p, h) => Some(if p.starts_with("*.") {
                (1, p.len())
            } else {
                (2, p.len())
            }),
            _ => None,
        };
        if let Some((class, len)) = rank
            && found
                .as_ref()
                .is_none_or(|(c, l, _)| (class, len) > (*c, *l))
        {
            found = Some((class, len, item));
        }
    }
    found.map(|(_, _, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_beats_the_longest_wildcard_beats_any() {
        let c = [
            (None, "any"),
            (Some("*.example.com"), "wild"),
            (Some("*.shop.example.com"), "longer-wild"),
            (Some("www.shop.example.com"), "exact"),
        ];
        let pick = |h: Option<&str>| best(c.iter().map(|(p, t)| (*p, *t)), h);
        assert_eq!(pick(Some("www.shop.example.com")), Some("exact"));
        assert_eq!(pick(Some("api.shop.example.com")), Some("longer-wild"));
        assert_eq!(pick(Some("a.b.example.com")), Some("wild"));
        assert_eq!(
            pick(Some("example.com")),
            Some("any"),
            "*.x needs a label before x"
        );
        assert_eq!(pick(None), Some("any"));
        let no_any = [(Some("a.example.com"), 1)];
        assert_eq!(best(no_any.iter().copied(), Some("b.example.com")), None);
    }
}
