//! Routes: which backend a request (or an opaque connection) to a Service
//! port goes to, compiled once per snapshot.
//!
//! ```text
//! Snapshot::new ──► RouteTable::build (regexes compiled, backends resolved to
//!                   service indices, endpoint index lists per subset)
//! request ──► RouteTable::http(target, method, uri, headers)
//!               first matching HttpRoute (or none: the Service itself)
//!         ──► HttpRoute::backends.pick(rng) ──► Backend { service, subset, port }
//!         ──► dest::resolve() ──► Dest { service, port, endpoints } ──► client policy
//! ```
//!
//! Everything here is pure: no I/O, no locks. Matching costs a few string
//! comparisons per rule; regexes are compiled at build time and never per
//! request; the query string is parsed only when a rule has query
//! conditions. Subsets were evaluated by the operator (endpoints carry their
//! subset names, decision 3 of `docs/architecture.md`); the table turns
//! them into index lists so a request never looks at labels or names.
//!
//! What is applied: matches (path exact / prefix at a segment boundary /
//! whole-path regex, method, headers, query parameters), weighted backends
//! (other Services, subsets, ports), request and response header edits,
//! path and authority rewrites, redirects; for TCP, weighted backends per
//! port; each rule's timeout, retry policy, fault and mirror, which
//! `outbound::http` applies per request. Out: [`Selected`] routes and
//! destinations (`super::dest`), handed to the client policy (`client`).

use std::collections::HashMap;
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Uri};
use rand::Rng;
use regex::Regex;
use weft_proxy_config::{
    self as pc, PathMatch, ProxyConfig, Service, ValueMatch, names_other_services, par,
};

use super::services::ServiceRef;
use crate::tls::{IdentityError, SpiffeId};

/// Why a route could not be compiled (the config validated, so this means
/// a proxy and operator disagree on the rules).
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// A regex did not compile.
    #[error("{at}: regex {pattern:?} does not compile: {source}")]
    Regex {
        /// Where in the config.
        at: String,
        /// The pattern.
        pattern: String,
        /// Why.
        source: regex::Error,
    },
    /// A backend names a Service or subset the config does not have.
    #[error("{at}: {what}")]
    Backend {
        /// Where in the config.
        at: String,
        /// What is missing.
        what: String,
    },
    /// A meshed endpoint's identity is not a SPIFFE ID.
    #[error("{at}: {source}")]
    Identity {
        /// Where in the config.
        at: String,
        /// Why.
        source: IdentityError,
    },
    /// A header name or value cannot be sent.
    #[error("{at}: {what}")]
    Header {
        /// Where in the config.
        at: String,
        /// What is wrong.
        what: String,
    },
}

/// The compiled routes of every Service of a snapshot, indexed like
/// `config.services`.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Shared, so that a reload keeps what an unchanged Service compiled
    /// to ([`RouteTable::build_after`]).
    services: Vec<Arc<ServiceRoutes>>,
}

#[derive(Debug, Default)]
struct ServiceRoutes {
    http: Vec<HttpRoute>,
    tcp: Vec<TcpRoute>,
    /// Indices of the endpoints that take new traffic (not terminating).
    live: Vec<usize>,
    /// Per subset (in `Service::subsets` order): indices of live endpoints.
    subsets: Vec<Vec<usize>>,
    /// Per endpoint (in config order): its identity, parsed once here so
    /// that a request clones a shared ID instead of parsing a string; none
    /// for an endpoint outside the mesh.
    identities: Vec<Option<SpiffeId>>,
    /// `namespace/name`, the key of the Service's breakers, budgets and
    /// connection limits, built here rather than per request.
    key: String,
}

/// A compiled HTTP route rule.
#[derive(Debug)]
pub struct HttpRoute {
    /// `<ServiceRoute>/<rule>` (shared: responses carry it).
    pub name: std::sync::Arc<str>,
    port: Option<u16>,
    matches: Vec<Match>,
    /// Where matching requests go.
    pub backends: Backends,
    /// Request header edits.
    pub request_headers: HeaderOps,
    /// Response header edits.
    pub response_headers: HeaderOps,
    pub(super) rewrite: Option<pc::Rewrite>,
    pub(super) authority: Option<HeaderValue>,
    /// Answer with a redirect instead of forwarding.
    pub redirect: Option<pc::Redirect>,
    /// Deadline for the response headers, retries included.
    pub timeout: Option<std::time::Duration>,
    /// Retry policy (at least one retry).
    pub retry: Option<pc::RetryPolicy>,
    /// Fault injection.
    pub fault: Option<pc::Fault>,
    /// Copies of requests: where to, and the share (0–100).
    pub mirror: Option<(Backend, f64)>,
}

#[derive(Debug)]
struct Match {
    path: Option<PathCond>,
    headers: Vec<(HeaderName, ValueCond)>,
    query: Vec<(String, ValueCond)>,
    method: Option<Method>,
}

#[derive(Debug)]
enum PathCond {
    Exact(String),
    /// Without a trailing `/`; empty matches every path.
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum ValueCond {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    Present(bool),
}

/// A compiled TCP route.
#[derive(Debug)]
struct TcpRoute {
    port: Option<u16>,
    backends: Backends,
}

/// Weighted backends; empty (and nothing unresolved) means "the routed
/// Service itself".
#[derive(Debug, Default)]
pub struct Backends {
    list: Vec<Backend>,
    /// Running sums of the weights of `list` (zero weights never picked).
    cumulative: Vec<u64>,
    /// The weight of backends that do not resolve: that share is answered
    /// 500 (Gateway API semantics).
    unresolved: u64,
}

/// What [`Backends::pick`] chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// No backends: the routed Service itself.
    Service,
    /// This backend.
    Backend(Backend),
    /// A backend the route names that does not resolve: answer 500.
    Unresolved,
}

/// A resolved backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Index into `config.services`.
    pub service: usize,
    /// Index into that Service's `subsets`.
    pub subset: Option<usize>,
    /// Service port; none: the port of the request.
    pub port: Option<u16>,
}

/// Compiled header edits.
#[derive(Debug, Default)]
pub struct HeaderOps {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

/// The route chosen for a request.
#[derive(Debug, Clone, Copy)]
pub struct Selected<'a> {
    /// The rule.
    pub route: &'a HttpRoute,
    /// The prefix its matching condition matched, if it was a prefix
    /// (for `rewrite.pathPrefix`).
    pub prefix: Option<&'a str>,
}

impl RouteTable {
    /// Compiles every route of `config`.
    pub fn build(config: &ProxyConfig) -> Result<Self, RouteError> {
        Self::build_after(config, None, &[], false)
    }

    /// [`RouteTable::build`], keeping from `prev` (the table of the
    /// previous snapshot) what each Service taken unchanged from there
    /// compiled to: `reused[i]` is the previous index of Service `i`
    /// ([`weft_proxy_config::Loaded::reused`]). A Service whose routes name
    /// other Services is kept only when `same_order` (the Services are the
    /// previous snapshot's, by namespace and name, in the same order: every
    /// index means the same Service) and every Service its routes send to
    /// is unchanged too; else it is compiled again.
    pub fn build_after(
        config: &ProxyConfig,
        prev: Option<&RouteTable>,
        reused: &[Option<usize>],
        same_order: bool,
    ) -> Result<Self, RouteError> {
        let unchanged = |i: usize| reused.get(i) == Some(&Some(i));
        let kept: Vec<Option<Arc<ServiceRoutes>>> = config
            .services
            .iter()
            .enumerate()
            .map(|(i, svc)| {
                reused
                    .get(i)
                    .copied()
                    .flatten()
                    .and_then(|old| prev?.services.get(old))
                    .filter(|kept| {
                        !names_other_services(svc) || (same_order && kept.targets().all(unchanged))
                    })
                    .cloned()
            })
            .collect();
        let compile = kept.iter().filter(|k| k.is_none()).count();
        if compile == 0 {
            return Ok(RouteTable {
                services: kept.into_iter().flatten().collect(),
            });
        }
        let index: Index<'_> = config
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| ((s.namespace.as_str(), s.name.as_str()), i))
            .collect();
        // Each Service compiles on its own: on more than one thread when
        // many are new (a first load, a change of every Service).
        let services = par::map(&kept, par::threads_for(compile), |i, kept| match kept {
            Some(kept) => Ok(kept.clone()),
            None => compile_service(&config.services[i], config, &index).map(Arc::new),
        })
        .into_iter()
        .collect::<Result<_, _>>()?;
        Ok(RouteTable { services })
    }

    /// The first HTTP route of the target's Service that applies to its
    /// port and matches the request; `None`: no route (the Service itself).
    pub fn http<'a>(
        &'a self,
        target: ServiceRef,
        port: u16,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Option<Selected<'a>> {
        if target.endpoint.is_some() {
            return None;
        }
        let routes = &self.services.get(target.service)?.http;
        if routes.is_empty() {
            return None;
        }
        let mut query: Option<Vec<(String, String)>> = None;
        for route in routes {
            if route.port.is_some_and(|p| p != port) {
                continue;
            }
            if route.matches.is_empty() {
                return Some(Selected {
                    route,
                    prefix: None,
                });
            }
            for m in &route.matches {
                if m.matches(method, uri, headers, &mut query) {
                    let prefix = match &m.path {
                        Some(PathCond::Prefix(p)) => Some(p.as_str()),
                        _ => None,
                    };
                    return Some(Selected { route, prefix });
                }
            }
        }
        None
    }

    /// The backends of the TCP route for `port` of the target's Service
    /// (a port-specific route before the all-ports one).
    pub fn tcp(&self, target: ServiceRef, port: u16) -> Option<&Backends> {
        if target.endpoint.is_some() {
            return None;
        }
        let routes = &self.services.get(target.service)?.tcp;
        routes
            .iter()
            .find(|r| r.port == Some(port))
            .or_else(|| routes.iter().find(|r| r.port.is_none()))
            .map(|r| &r.backends)
    }

    /// Indices (into the Service's endpoints, in config order) of the
    /// endpoints of Service `service` (optionally one subset) that take new
    /// traffic.
    pub fn live_endpoints(&self, service: usize, subset: Option<usize>) -> &[usize] {
        let Some(routes) = self.services.get(service) else {
            return &[];
        };
        match subset {
            None => &routes.live,
            Some(s) => routes.subsets.get(s).map_or(&[], Vec::as_slice),
        }
    }

    /// `namespace/name` of Service `service` (empty for an unknown index).
    pub fn key(&self, service: usize) -> &str {
        self.services.get(service).map_or("", |r| r.key.as_str())
    }

    /// The identity of each endpoint of Service `service`, in config order
    /// (none outside the mesh).
    pub fn identities(&self, service: usize) -> &[Option<SpiffeId>] {
        self.services
            .get(service)
            .map_or(&[], |r| r.identities.as_slice())
    }
}

/// Services by namespace and name: where a backend's `namespace/name` is.
type Index<'a> = HashMap<(&'a str, &'a str), usize, foldhash::fast::RandomState>;

impl ServiceRoutes {
    /// The Services its routes send to: backends and mirrors.
    fn targets(&self) -> impl Iterator<Item = usize> + '_ {
        let http = self.http.iter().flat_map(|r| {
            r.backends
                .list
                .iter()
                .chain(r.mirror.as_ref().map(|(b, _)| b))
        });
        let tcp = self.tcp.iter().flat_map(|r| r.backends.list.iter());
        http.chain(tcp).map(|b| b.service)
    }
}

fn compile_service(
    svc: &Service,
    config: &ProxyConfig,
    index: &Index<'_>,
) -> Result<ServiceRoutes, RouteError> {
    let at = format!("services[{}]", svc.key());
    let live: Vec<usize> = svc
        .endpoints
        .iter()
        .enumerate()
        .filter(|(_, e)| !e.terminating)
        .map(|(i, _)| i)
        .collect();
    let subsets = svc
        .subsets
        .iter()
        .map(|name| {
            live.iter()
                .copied()
                .filter(|i| svc.endpoints[*i].subsets.iter().any(|s| s == name))
                .collect()
        })
        .collect();
    // The pods of a workload share one identity and are listed together:
    // parsed and stored once per run of equal identities.
    let mut last: Option<(&str, SpiffeId)> = None;
    let identities = svc
        .endpoints
        .iter()
        .map(|e| match e.identity.as_deref().filter(|_| e.meshed) {
            Some(id) => match &last {
                Some((seen, parsed)) if *seen == id => Ok(Some(parsed.clone())),
                _ => {
                    let parsed = SpiffeId::parse(id).map_err(|source| RouteError::Identity {
                        at: format!("{at}.endpoints[{}].identity", e.address),
                        source,
                    })?;
                    last = Some((id, parsed.clone()));
                    Ok(Some(parsed))
                }
            },
            None => Ok(None),
        })
        .collect::<Result<_, _>>()?;
    let http = svc
        .http_routes
        .iter()
        .enumerate()
        .map(|(i, r)| compile_http(&format!("{at}.httpRoutes[{i}]"), r, svc, config, index))
        .collect::<Result<_, _>>()?;
    let tcp = svc
        .tcp_routes
        .iter()
        .enumerate()
        .map(|(i, r)| {
            Ok(TcpRoute {
                port: r.port,
                backends: compile_backends(
                    &format!("{at}.tcpRoutes[{i}]"),
                    &r.backends,
                    None,
                    config,
                    index,
                )?,
            })
        })
        .collect::<Result<_, RouteError>>()?;
    Ok(ServiceRoutes {
        http,
        tcp,
        live,
        subsets,
        identities,
        key: svc.key(),
    })
}

fn compile_http(
    at: &str,
    r: &pc::HttpRoute,
    svc: &Service,
    config: &ProxyConfig,
    index: &Index<'_>,
) -> Result<HttpRoute, RouteError> {
    let matches = r
        .matches
        .iter()
        .enumerate()
        .map(|(i, m)| compile_match(&format!("{at}.matches[{i}]"), m))
        .collect::<Result<_, _>>()?;
    let authority = r
        .rewrite
        .as_ref()
        .and_then(|rw| rw.authority.as_deref())
        .map(|a| {
            HeaderValue::from_str(a).map_err(|_| RouteError::Header {
                at: format!("{at}.rewrite.authority"),
                what: format!("{a:?} is not a valid Host value"),
            })
        })
        .transpose()?;
    Ok(HttpRoute {
        name: r.name.as_str().into(),
        port: r.port,
        matches,
        backends: {
            let mut b = compile_backends(at, &r.backends, Some(&svc.namespace), config, index)?;
            b.add_unresolved(r.unresolved_weight);
            b
        },
        request_headers: compile_ops(&format!("{at}.requestHeaders"), &r.request_headers)?,
        response_headers: compile_ops(&format!("{at}.responseHeaders"), &r.response_headers)?,
        rewrite: r.rewrite.clone(),
        authority,
        redirect: r.redirect.clone(),
        timeout: r
            .timeout_ms
            .filter(|ms| *ms > 0)
            .map(std::time::Duration::from_millis),
        retry: r.retry.clone().filter(|p| p.attempts > 0),
        fault: r.fault.clone(),
        mirror: r
            .mirror
            .as_ref()
            .map(|m| {
                let b = compile_backends(
                    &format!("{at}.mirror"),
                    std::slice::from_ref(&m.backend),
                    Some(&svc.namespace),
                    config,
                    index,
                )?;
                Ok::<_, RouteError>(b.list.first().map(|b| (*b, m.percent)))
            })
            .transpose()?
            .flatten(),
    })
}

/// Compiles a user regex so it must match the whole input, as the API
/// documents (the same anchoring `ProxyConfig::validate` checks with).
fn regex(at: &str, pattern: &str) -> Result<Regex, RouteError> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|source| RouteError::Regex {
        at: at.to_owned(),
        pattern: pattern.to_owned(),
        source,
    })
}

fn value_cond(at: &str, v: &ValueMatch) -> Result<ValueCond, RouteError> {
    Ok(match v {
        ValueMatch::Exact(s) => ValueCond::Exact(s.clone()),
        ValueMatch::Prefix(s) => ValueCond::Prefix(s.clone()),
        ValueMatch::Regex(re) => ValueCond::Regex(regex(at, re)?),
        ValueMatch::Present(p) => ValueCond::Present(*p),
    })
}

fn compile_match(at: &str, m: &pc::HttpMatch) -> Result<Match, RouteError> {
    let path = match &m.path {
        None => None,
        Some(PathMatch::Exact(p)) => Some(PathCond::Exact(p.clone())),
        Some(PathMatch::Prefix(p)) => Some(PathCond::Prefix(p.trim_end_matches('/').to_owned())),
        Some(PathMatch::Regex(re)) => Some(PathCond::Regex(regex(&format!("{at}.path"), re)?)),
    };
    let headers = m
        .headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let hat = format!("{at}.headers[{i}]");
            let name =
                HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| RouteError::Header {
                    at: hat.clone(),
                    what: format!("{:?} is not a header name", h.name),
                })?;
            Ok((name, value_cond(&hat, &h.value)?))
        })
        .collect::<Result<_, RouteError>>()?;
    let query = m
        .query_params
        .iter()
        .enumerate()
        .map(|(i, q)| {
            Ok((
                q.name.clone(),
                value_cond(&format!("{at}.queryParams[{i}]"), &q.value)?,
            ))
        })
        .collect::<Result<_, RouteError>>()?;
    let method = m
        .method
        .as_deref()
        .map(|s| {
            Method::from_bytes(s.as_bytes()).map_err(|_| RouteError::Header {
                at: format!("{at}.method"),
                what: format!("{s:?} is not a method"),
            })
        })
        .transpose()?;
    Ok(Match {
        path,
        headers,
        query,
        method,
    })
}

/// `foreign_from`: the routed Service's namespace when a backend of another
/// namespace may be missing from the config (HTTP routes: a Gateway API
/// route's granted backend outside this namespace's scope); its weight then
/// counts as unresolved.
fn compile_backends(
    at: &str,
    backends: &[pc::Backend],
    foreign_from: Option<&str>,
    config: &ProxyConfig,
    index: &Index<'_>,
) -> Result<Backends, RouteError> {
    let mut out = Backends::default();
    let mut sum = 0u64;
    for (i, b) in backends.iter().enumerate() {
        let bat = format!("{at}.backends[{i}]");
        let found = b
            .service
            .split_once('/')
            .and_then(|(namespace, name)| index.get(&(namespace, name)));
        let Some(&service) = found else {
            let foreign = foreign_from
                .is_some_and(|own| b.service.split_once('/').is_some_and(|(ns, _)| ns != own));
            if !foreign {
                return Err(RouteError::Backend {
                    at: bat,
                    what: format!("unknown service {:?}", b.service),
                });
            }
            out.unresolved += u64::from(b.weight);
            continue;
        };
        let subset = b
            .subset
            .as_ref()
            .map(|s| {
                config.services[service]
                    .subsets
                    .iter()
                    .position(|n| n == s)
                    .ok_or_else(|| RouteError::Backend {
                        at: bat.clone(),
                        what: format!("service {:?} has no subset {s:?}", b.service),
                    })
            })
            .transpose()?;
        sum += u64::from(b.weight);
        out.list.push(Backend {
            service,
            subset,
            port: b.port,
        });
        out.cumulative.push(sum);
    }
    Ok(out)
}

fn compile_ops(at: &str, ops: &pc::HeaderOps) -> Result<HeaderOps, RouteError> {
    let name = |n: &str| {
        HeaderName::from_bytes(n.as_bytes()).map_err(|_| RouteError::Header {
            at: at.to_owned(),
            what: format!("{n:?} is not a header name"),
        })
    };
    let pair = |(n, v): &(String, String)| {
        Ok((
            name(n)?,
            HeaderValue::from_str(v).map_err(|_| RouteError::Header {
                at: at.to_owned(),
                what: format!("value of {n:?} is not a valid header value"),
            })?,
        ))
    };
    Ok(HeaderOps {
        set: ops.set.iter().map(pair).collect::<Result<_, _>>()?,
        add: ops.add.iter().map(pair).collect::<Result<_, _>>()?,
        remove: ops
            .remove
            .iter()
            .map(|n| name(n))
            .collect::<Result<_, _>>()?,
    })
}

impl Match {
    fn matches(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        query: &mut Option<Vec<(String, String)>>,
    ) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        if let Some(p) = &self.path
            && !p.matches(uri.path())
        {
            return false;
        }
        for (name, cond) in &self.headers {
            let mut values = headers.get_all(name).iter().peekable();
            let ok = match cond {
                ValueCond::Present(want) => values.peek().is_some() == *want,
                _ => values.any(|v| v.to_str().is_ok_and(|v| cond.matches(v))),
            };
            if !ok {
                return false;
            }
        }
        if !self.query.is_empty() {
            let params = query.get_or_insert_with(|| {
                uri.query()
                    .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
                    .unwrap_or_default()
            });
            for (name, cond) in &self.query {
                let mut values = params
                    .iter()
                    .filter(|(k, _)| k == name)
                    .map(|(_, v)| v.as_str())
                    .peekable();
                let ok = match cond {
                    ValueCond::Present(want) => values.peek().is_some() == *want,
                    _ => values.any(|v| cond.matches(v)),
                };
                if !ok {
                    return false;
                }
            }
        }
        true
    }
}

impl PathCond {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathCond::Exact(p) => path == p,
            PathCond::Prefix(p) => {
                path.starts_with(p.as_str())
                    && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
            }
            PathCond::Regex(re) => re.is_match(path),
        }
    }
}

impl ValueCond {
    fn matches(&self, v: &str) -> bool {
        match self {
            ValueCond::Exact(e) => v == e,
            ValueCond::Prefix(p) => v.starts_with(p.as_str()),
            ValueCond::Regex(re) => re.is_match(v),
            ValueCond::Present(want) => *want,
        }
    }
}

impl Backends {
    /// Whether the route names no backend (traffic goes to the Service itself).
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// A backend chosen with probability weight / sum of weights; `None`
    /// when there are no backends (or, which validation forbids, every
    /// weight is zero). Unresolved weight is never picked here.
    pub fn pick_resolved<R: Rng>(&self, rng: &mut R) -> Option<Backend> {
        let total = *self.cumulative.last()?;
        if total == 0 {
            return None;
        }
        if self.list.len() == 1 {
            return self.list.first().copied();
        }
        let r = rng.random_range(0..total);
        let i = self.cumulative.partition_point(|c| *c <= r);
        self.list.get(i).copied()
    }

    /// A backend chosen by weight, unresolved backends included.
    pub fn pick<R: Rng>(&self, rng: &mut R) -> Pick {
        if self.unresolved == 0 {
            return self.pick_resolved(rng).map_or(Pick::Service, Pick::Backend);
        }
        let resolved = self.cumulative.last().copied().unwrap_or(0);
        if rng.random_range(0..resolved + self.unresolved) >= resolved {
            return Pick::Unresolved;
        }
        self.pick_resolved(rng)
            .map_or(Pick::Unresolved, Pick::Backend)
    }

    fn add_unresolved(&mut self, weight: u32) {
        self.unresolved += u64::from(weight);
    }
}

impl HeaderOps {
    /// Applies set, then add, then remove.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (n, v) in &self.set {
            headers.insert(n, v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n, v.clone());
        }
        for n in &self.remove {
            headers.remove(n);
        }
    }

    /// No edits.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::super::dest::resolve;
    use super::super::rewrite::{Arrival, redirect_location};
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use std::net::SocketAddr;
    use std::net::{IpAddr, Ipv4Addr};
    use weft_proxy_config::{ClientPolicy, HttpMatch, NamedMatch, Protocol, Redirect, Rewrite};
    use weft_proxy_config::{Endpoint, ServicePort};

    fn ep(n: u8, subsets: &[&str], terminating: bool) -> Endpoint {
        Endpoint {
            address: IpAddr::V4(Ipv4Addr::new(10, 244, 0, n)),
            meshed: false,
            identity: None,
            pod: None,
            workload: None,
            app: None,
            version: None,
            subsets: subsets.iter().map(|s| s.to_string()).collect(),
            ports: Default::default(),
            terminating,
        }
    }

    fn svc(name: &str, routes: Vec<pc::HttpRoute>) -> Service {
        Service {
            name: name.into(),
            namespace: "shop".into(),
            cluster_ips: vec![IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1))],
            ports: vec![ServicePort {
                port: 80,
                name: Some("http".into()),
                target_port: 8080,
                protocol: Protocol::Http1,
            }],
            subsets: vec!["v1".into(), "v2".into()],
            endpoints: vec![
                ep(1, &["v1"], false),
                ep(2, &["v1"], true),
                ep(3, &["v2"], false),
            ],
            http_routes: routes,
            tcp_routes: vec![],
            policy: ClientPolicy::default(),
        }
    }

    fn config(services: Vec<Service>) -> ProxyConfig {
        let mut c = weft_proxy_config::ProxyConfig {
            gateway: None,
            version: 1,
            generation: 1,
            hash: String::new(),
            namespace: "shop".into(),
            mesh: pc::MeshSettings {
                trust_domain: "cluster.local".into(),
                mtls_mode: pc::MtlsMode::Strict,
                default_access: Default::default(),
                access_log: false,
                access_log_options: Default::default(),
                tracing: None,
                escaped_slashes: Default::default(),
                metrics_naming: Default::default(),
            },
            services: services.into_iter().map(Arc::new).collect(),
            inbound: Default::default(),
        };
        c.seal();
        c
    }

    fn backend(subset: &str, weight: u32) -> pc::Backend {
        pc::Backend {
            service: "shop/cart".into(),
            subset: Some(subset.into()),
            port: None,
            weight,
        }
    }

    fn route(name: &str, matches: Vec<HttpMatch>, backends: Vec<pc::Backend>) -> pc::HttpRoute {
        pc::HttpRoute {
            name: name.into(),
            matches,
            backends,
            ..Default::default()
        }
    }

    fn at() -> ServiceRef {
        ServiceRef {
            service: 0,
            port: 0,
            endpoint: None,
        }
    }

    fn select<'a>(
        t: &'a RouteTable,
        method: &str,
        uri: &str,
        hs: &[(&str, &str)],
    ) -> Option<&'a str> {
        let mut headers = HeaderMap::new();
        for (k, v) in hs {
            headers.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        let uri: Uri = uri.parse().expect("uri");
        let method = Method::from_bytes(method.as_bytes()).expect("method");
        t.http(at(), 80, &method, &uri, &headers)
            .map(|s| &*s.route.name)
    }

    #[test]
    fn first_matching_rule_wins_in_order() {
        let routes = vec![
            route(
                "canary",
                vec![HttpMatch {
                    headers: vec![NamedMatch {
                        name: "x-release".into(),
                        value: ValueMatch::Exact("canary".into()),
                    }],
                    ..Default::default()
                }],
                vec![backend("v2", 1)],
            ),
            route(
                "api",
                vec![HttpMatch {
                    path: Some(PathMatch::Prefix("/api/".into())),
                    method: Some("GET".into()),
                    ..Default::default()
                }],
                vec![backend("v1", 1)],
            ),
            route(
                "search",
                vec![HttpMatch {
                    query_params: vec![NamedMatch {
                        name: "q".into(),
                        value: ValueMatch::Regex("[a-z ]+".into()),
                    }],
                    ..Default::default()
                }],
                vec![],
            ),
            route(
                "items",
                vec![HttpMatch {
                    path: Some(PathMatch::Regex("/items/[0-9]+".into())),
                    ..Default::default()
                }],
                vec![],
            ),
        ];
        let c = config(vec![svc("cart", routes)]);
        let t = RouteTable::build(&c).expect("compiles");
        assert_eq!(
            select(&t, "GET", "/api/x", &[("x-release", "canary")]),
            Some("canary")
        );
        assert_eq!(select(&t, "GET", "/api", &[]), Some("api"));
        assert_eq!(select(&t, "GET", "/api/v1/x", &[]), Some("api"));
        assert_eq!(select(&t, "GET", "/apix", &[]), None, "segment boundary");
        assert_eq!(select(&t, "POST", "/api/x", &[]), None, "method");
        assert_eq!(select(&t, "GET", "/s?q=hello+world", &[]), Some("search"));
        assert_eq!(
            select(&t, "GET", "/s?q=Hello", &[]),
            None,
            "whole-value regex"
        );
        assert_eq!(select(&t, "GET", "/items/42", &[]), Some("items"));
        assert_eq!(
            select(&t, "GET", "/items/42/x", &[]),
            None,
            "whole-path regex"
        );
        assert_eq!(
            select(&t, "GET", "/x", &[("x-release", "canary-2")]),
            None,
            "exact header"
        );
    }

    #[test]
    fn presence_and_prefix_conditions() {
        let routes = vec![
            route(
                "absent",
                vec![HttpMatch {
                    headers: vec![
                        NamedMatch {
                            name: "x-debug".into(),
                            value: ValueMatch::Present(false),
                        },
                        NamedMatch {
                            name: "user-agent".into(),
                            value: ValueMatch::Prefix("curl/".into()),
                        },
                    ],
                    ..Default::default()
                }],
                vec![],
            ),
            route("rest", vec![], vec![]),
        ];
        let c = config(vec![svc("cart", routes)]);
        let t = RouteTable::build(&c).expect("compiles");
        assert_eq!(
            select(&t, "GET", "/", &[("user-agent", "curl/8")]),
            Some("absent")
        );
        assert_eq!(
            select(
                &t,
                "GET",
                "/",
                &[("user-agent", "curl/8"), ("x-debug", "1")]
            ),
            Some("rest")
        );
        assert_eq!(select(&t, "GET", "/", &[]), Some("rest"));
    }

    #[test]
    fn port_specific_rules_skip_other_ports() {
        let mut r = route("p81", vec![], vec![]);
        r.port = Some(81);
        let c = config(vec![svc("cart", vec![r])]);
        let t = RouteTable::build(&c).expect("compiles");
        assert_eq!(select(&t, "GET", "/", &[]), None);
    }

    #[test]
    fn weights_split_and_zero_weights_are_never_picked() {
        let c = config(vec![svc(
            "cart",
            vec![route("w", vec![], vec![backend("v1", 0), backend("v2", 5)])],
        )]);
        let t = RouteTable::build(&c).expect("compiles");
        let r = select_route(&t);
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..200 {
            assert_eq!(
                r.backends.pick_resolved(&mut rng).and_then(|b| b.subset),
                Some(1)
            );
        }
        let c = config(vec![svc(
            "cart",
            vec![route("w", vec![], vec![backend("v1", 3), backend("v2", 1)])],
        )]);
        let t = RouteTable::build(&c).expect("compiles");
        let r = select_route(&t);
        let mut seen = [0usize; 2];
        for _ in 0..4000 {
            seen[r
                .backends
                .pick_resolved(&mut rng)
                .and_then(|b| b.subset)
                .expect("subset")] += 1;
        }
        // 3:1 with 4000 draws: v1 near 3000; far outside chance otherwise.
        assert!((2700..3300).contains(&seen[0]), "{seen:?}");
    }

    fn select_route(t: &RouteTable) -> &HttpRoute {
        t.http(
            at(),
            80,
            &Method::GET,
            &"/".parse().expect("uri"),
            &HeaderMap::new(),
        )
        .expect("route")
        .route
    }

    /// A reload keeps what an unchanged Service compiled to, unless a
    /// Service its routes send to changed or the indices moved: then its
    /// backends are compiled again.
    #[test]
    fn a_kept_route_is_compiled_again_when_its_target_changes() {
        let api = svc(
            "api",
            vec![route("to-cart", vec![], vec![backend("v2", 1)])],
        );
        let first = config(vec![api.clone(), svc("cart", vec![])]);
        let t1 = RouteTable::build(&first).expect("compiles");
        let pick = |t: &RouteTable| t.services[0].http[0].backends.list[0];
        assert_eq!(pick(&t1).subset, Some(1));
        // cart drops v1: v2 becomes its first subset; api is unchanged.
        let mut cart = svc("cart", vec![]);
        cart.subsets = vec!["v2".into()];
        cart.endpoints = vec![ep(3, &["v2"], false)];
        let mut second = config(vec![api, cart]);
        second.services[0] = first.services[0].clone();
        let t2 =
            RouteTable::build_after(&second, Some(&t1), &[Some(0), None], true).expect("compiles");
        assert_eq!(pick(&t2).subset, Some(0));
        // Nothing changed: both kept.
        let t3 = RouteTable::build_after(&second, Some(&t2), &[Some(0), Some(1)], true)
            .expect("compiles");
        assert!(Arc::ptr_eq(&t3.services[0], &t2.services[0]));
        assert!(Arc::ptr_eq(&t3.services[1], &t2.services[1]));
        // Indices that may mean other Services: only the route-less one kept.
        let t4 = RouteTable::build_after(&second, Some(&t2), &[Some(0), Some(1)], false)
            .expect("compiles");
        assert!(!Arc::ptr_eq(&t4.services[0], &t2.services[0]));
        assert!(Arc::ptr_eq(&t4.services[1], &t2.services[1]));
    }

    /// A first load of many Services compiles them on more than one
    /// thread: each routes as compiled alone, and a failure is the first in
    /// document order, as one thread would find it.
    #[test]
    fn many_services_compile_as_one_by_one() {
        let n = 4 * weft_proxy_config::par::MIN_PER_THREAD;
        let mut services = vec![svc("cart", vec![])];
        services.extend((0..n).map(|i| {
            svc(
                &format!("s-{i}"),
                vec![route("to-cart", vec![], vec![backend("v2", 1)])],
            )
        }));
        let t = RouteTable::build(&config(services.clone())).expect("compiles");
        assert_eq!(t.services.len(), n + 1);
        for s in &t.services[1..] {
            let b = s.http[0].backends.list[0];
            assert_eq!((b.service, b.subset), (0, Some(1)));
        }
        let meshed_as = |s: &mut Service, id: &str| {
            s.endpoints[0].meshed = true;
            s.endpoints[0].identity = Some(id.into());
        };
        let (early, late) = (1 + n / 4, n - 1);
        meshed_as(&mut services[late], "not an id");
        meshed_as(&mut services[early], "spiffe://cluster.local/");
        let err = RouteTable::build(&config(services)).expect_err("two bad identities");
        assert!(
            err.to_string()
                .contains(&format!("services[shop/s-{}]", early - 1)),
            "{err}"
        );
    }

    #[test]
    fn subsets_hold_live_endpoints_only() {
        let c = config(vec![svc("cart", vec![])]);
        let t = RouteTable::build(&c).expect("compiles");
        let addrs = |v: &[usize]| {
            v.iter()
                .map(|i| c.services[0].endpoints[*i].address.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(addrs(t.live_endpoints(0, Some(0))), ["10.244.0.1"]);
        assert_eq!(addrs(t.live_endpoints(0, Some(1))), ["10.244.0.3"]);
        assert_eq!(
            addrs(t.live_endpoints(0, None)),
            ["10.244.0.1", "10.244.0.3"]
        );
        assert!(t.live_endpoints(0, Some(9)).is_empty());
        assert!(t.live_endpoints(7, None).is_empty());
    }

    #[test]
    fn resolve_falls_back_to_the_original_destination_only_without_subset() {
        let c = config(vec![svc("cart", vec![])]);
        let t = RouteTable::build(&c).expect("compiles");
        let dst: SocketAddr = "10.96.0.1:80".parse().expect("addr");
        let d = resolve(&c, &t, at(), None, dst).expect("resolves");
        assert_eq!(d.fallback, Some(dst));
        assert_eq!(d.key, c.services[0].key());
        assert!(d.key.ends_with("/cart"), "{}", d.key);
        let b = Backend {
            service: 0,
            subset: Some(1),
            port: None,
        };
        let d = resolve(&c, &t, at(), Some(b), dst).expect("resolves");
        assert_eq!(d.fallback, None);
        assert_eq!(d.subset, Some("v2"));
        let b = Backend {
            service: 0,
            subset: None,
            port: Some(9),
        };
        assert!(resolve(&c, &t, at(), Some(b), dst).is_err());
    }

    #[test]
    fn a_pod_ip_target_skips_routes_and_goes_to_that_endpoint_only() {
        let c = config(vec![svc(
            "cart",
            vec![route("all", vec![], vec![backend("v2", 1)])],
        )]);
        let t = RouteTable::build(&c).expect("compiles");
        let uri: Uri = "/".parse().expect("uri");
        let headers = HeaderMap::new();
        assert!(t.http(at(), 80, &Method::GET, &uri, &headers).is_some());
        // The terminating v1 endpoint, addressed by its pod IP.
        let pinned = ServiceRef {
            endpoint: Some(1),
            ..at()
        };
        assert!(t.http(pinned, 80, &Method::GET, &uri, &headers).is_none());
        assert!(t.tcp(pinned, 80).is_none());
        let dst: SocketAddr = "10.244.0.2:8080".parse().expect("addr");
        let d = resolve(&c, &t, pinned, None, dst).expect("resolves");
        let addrs: Vec<IpAddr> = d.endpoints.iter().map(|e| e.address).collect();
        assert_eq!(addrs, vec![IpAddr::V4(Ipv4Addr::new(10, 244, 0, 2))]);
        assert_eq!(d.fallback, Some(dst));
    }

    #[test]
    fn unknown_backend_or_bad_header_value_is_an_error_not_a_panic() {
        let mut c = config(vec![svc(
            "cart",
            vec![route("x", vec![], vec![backend("v9", 1)])],
        )]);
        assert!(RouteTable::build(&c).is_err());
        let mut r = route("h", vec![], vec![]);
        r.request_headers.set = vec![("x-a".into(), "bad\nvalue".into())];
        Arc::make_mut(&mut c.services[0]).http_routes = vec![r];
        let e = RouteTable::build(&c).expect_err("bad value");
        assert!(e.to_string().contains("requestHeaders"), "{e}");
    }

    #[test]
    fn rewrites_and_header_ops() {
        let mut r = route(
            "rw",
            vec![HttpMatch {
                path: Some(PathMatch::Prefix("/old".into())),
                ..Default::default()
            }],
            vec![],
        );
        r.rewrite = Some(Rewrite {
            path: None,
            path_prefix: Some("/new".into()),
            authority: Some("cart.internal".into()),
        });
        r.request_headers.set = vec![("x-route".into(), "rw".into())];
        r.request_headers.remove = vec!["x-drop".into()];
        r.request_headers.add = vec![("x-multi".into(), "2".into())];
        let c = config(vec![svc("cart", vec![r])]);
        let t = RouteTable::build(&c).expect("compiles");
        let mut uri: Uri = "/old/a/b?x=1".parse().expect("uri");
        let mut h = HeaderMap::new();
        h.insert("x-drop", HeaderValue::from_static("1"));
        h.insert("x-multi", HeaderValue::from_static("1"));
        let sel = t.http(at(), 80, &Method::GET, &uri, &h).expect("route");
        sel.route.rewrite(sel.prefix, &mut uri, &mut h);
        sel.route.request_headers.apply(&mut h);
        assert_eq!(uri.to_string(), "/new/a/b?x=1");
        assert_eq!(
            h.get("host").map(|v| v.as_bytes()),
            Some(&b"cart.internal"[..])
        );
        assert_eq!(h.get("x-route").map(|v| v.as_bytes()), Some(&b"rw"[..]));
        assert!(h.get("x-drop").is_none());
        assert_eq!(h.get_all("x-multi").iter().count(), 2);

        let mut uri: Uri = "/old".parse().expect("uri");
        let mut r2 = route("p", vec![], vec![]);
        r2.rewrite = Some(Rewrite {
            path: None,
            path_prefix: Some("/".into()),
            authority: None,
        });
        let t2 = RouteTable::build(&config(vec![svc("cart", vec![r2])])).expect("compiles");
        let sel = t2.http(at(), 80, &Method::GET, &uri, &h).expect("route");
        sel.route.rewrite(Some("/old"), &mut uri, &mut h);
        assert_eq!(uri.path(), "/");
    }

    #[test]
    fn redirect_keeps_what_the_rule_does_not_set() {
        let uri: Uri = "/shop/a?x=1".parse().expect("uri");
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("frontend:8080"));
        let r = Redirect {
            scheme: None,
            host: None,
            port: None,
            path: Some("/store".into()),
            path_prefix: None,
            status: 301,
        };
        assert_eq!(
            redirect_location(&r, None, &uri, &h, Arrival::SIDECAR),
            "http://frontend:8080/store?x=1"
        );
        let r = Redirect {
            scheme: Some("https".into()),
            host: Some("shop.example".into()),
            port: None,
            path: None,
            path_prefix: None,
            status: 302,
        };
        assert_eq!(
            redirect_location(&r, None, &uri, &h, Arrival::SIDECAR),
            "https://shop.example/shop/a?x=1"
        );
        // On a gateway's HTTPS listener of port 8443, a redirect that sets
        // neither scheme nor port keeps https and the listener's port.
        let gateway = Arrival {
            scheme: "https",
            port: Some(8443),
        };
        let r = Redirect {
            scheme: None,
            host: Some("example.org".into()),
            port: None,
            path: None,
            path_prefix: None,
            status: 302,
        };
        assert_eq!(
            redirect_location(&r, None, &uri, &h, gateway),
            "https://example.org:8443/shop/a?x=1"
        );
        let on_443 = Arrival {
            scheme: "https",
            port: Some(443),
        };
        assert_eq!(
            redirect_location(&r, None, &uri, &h, on_443),
            "https://example.org/shop/a?x=1"
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn table() -> (ProxyConfig, RouteTable) {
            let m = |path, headers, query| HttpMatch {
                path,
                headers,
                query_params: query,
                method: None,
            };
            let routes = vec![
                route(
                    "every-kind",
                    vec![
                        m(Some(PathMatch::Regex("/a(/.*)?".into())), vec![], vec![]),
                        m(
                            None,
                            vec![NamedMatch {
                                name: "x-h".into(),
                                value: ValueMatch::Regex("[0-9]+".into()),
                            }],
                            vec![NamedMatch {
                                name: "q".into(),
                                value: ValueMatch::Present(true),
                            }],
                        ),
                        m(Some(PathMatch::Exact("/exact".into())), vec![], vec![]),
                    ],
                    vec![backend("v2", 1)],
                ),
                route(
                    "prefix",
                    vec![m(Some(PathMatch::Prefix("/p/q".into())), vec![], vec![])],
                    vec![backend("v1", 1)],
                ),
            ];
            let c = config(vec![svc("cart", routes)]);
            let t = RouteTable::build(&c).expect("compiles");
            (c, t)
        }

        proptest! {
            #[test]
            fn matching_never_panics(
                path in "/[ -~&&[^?#]]{0,40}",
                query in proptest::option::of("[ -~&&[^#]]{0,40}"),
                header in proptest::option::of("[ -~]{0,20}"),
            ) {
                let (_, t) = table();
                let text = match &query {
                    Some(q) => format!("{path}?{q}"),
                    None => path.clone(),
                };
                let Ok(uri) = text.parse::<Uri>() else { return Ok(()) };
                let mut h = HeaderMap::new();
                if let Some(v) = header.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
                    h.insert("x-h", v);
                }
                if let Some(sel) = t.http(at(), 80, &Method::GET, &uri, &h) {
                    let mut uri = uri.clone();
                    sel.route.rewrite(sel.prefix, &mut uri, &mut h);
                }
            }

            #[test]
            fn prefix_matches_exactly_at_segment_boundaries(rest in "[a-z0-9/]{0,12}") {
                let (_, t) = table();
                let name = |p: String| {
                    p.parse::<Uri>()
                        .ok()
                        .and_then(|u| t.http(at(), 80, &Method::GET, &u, &HeaderMap::new()))
                        .map(|s| s.route.name.to_string())
                };
                prop_assert_eq!(name(format!("/p/q/{rest}")), Some("prefix".to_owned()));
                let glued = format!("/p/qx{rest}");
                prop_assert_eq!(name(glued), None);
            }

            #[test]
            fn zero_weights_are_never_picked(weights in proptest::collection::vec(0u32..4, 1..6), seed: u64) {
                prop_assume!(weights.iter().any(|w| *w > 0));
                let mut b = Backends::default();
                let mut sum = 0u64;
                for (i, w) in weights.iter().enumerate() {
                    sum += u64::from(*w);
                    b.list.push(Backend { service: 0, subset: Some(i), port: None });
                    b.cumulative.push(sum);
                }
                let mut rng = StdRng::seed_from_u64(seed);
                for _ in 0..50 {
                    let i = b.pick_resolved(&mut rng).and_then(|p| p.subset).expect("a backend");
                    prop_assert!(weights[i] > 0, "picked weight 0 at {} of {:?}", i, weights);
                }
            }
        }
    }
}
