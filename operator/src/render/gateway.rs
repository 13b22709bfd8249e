//! Gateway API `Gateway`s of weft's `GatewayClass`, rendered into the
//! `proxy.json` of their ingress gateway proxy, and the verdicts on their
//! listeners and on the `HTTPRoute`s that name them.
//!
//! # The document
//!
//! A gateway's document is its namespace's (the Services its proxies may
//! reach: every meshed namespace in scope, plus the namespaces of the
//! routes attached to it and of their backends) with a `gateway` section:
//! per listener, the host names its routes answer, each served by a
//! Service made for it (named `<gateway>:<listener>:<n>`, a name no
//! Kubernetes Service can have) whose `httpRoutes` are the rules of the
//! routes for that host name, in the Gateway API's order: routes of an
//! exact host name first, then of the longest wildcard, then of none; then
//! the precedence of [`super::gamma`] (path, method, headers, query, age,
//! name, rule order).
//!
//! # Attaching a route
//!
//! An `HTTPRoute` parent of kind `Gateway` (group
//! `gateway.networking.k8s.io`) naming a Gateway of a weft class attaches
//! to each of its listeners that `sectionName` and `port` select (all when
//! unset), whose `allowedRoutes` admit the route's namespace (`Same`,
//! `All`, or a label `Selector`) and kind, and whose host name intersects
//! the route's. Otherwise the parent is `Accepted=False`:
//! `NoMatchingParent`, `NotAllowedByListeners` or
//! `NoMatchingListenerHostname`, in that order of checks.
//!
//! # Listeners
//!
//! `HTTP` and `HTTPS` (TLS terminated with `certificateRefs`: Secrets of
//! the Gateway's namespace, mounted into the gateway's pods) take
//! `HTTPRoute`s; `TLS` with `tls.mode: Passthrough` takes `TLSRoute`s
//! (experimental channel): per SNI host name, the oldest route answering
//! it wins, and its backends share the connections by weight as a TCP
//! route; the client's TLS goes to them untouched (inside mTLS to meshed
//! ones). Unresolved backends are left out (`ResolvedRefs=False`); with
//! none left, connections for that name are closed.
//! A certificate Secret of another namespace needs a `ReferenceGrant` there
//! (else `RefNotPermitted`); the writer keeps a copy of it in the Gateway's
//! namespace, which the pods mount (kubelet mounts Secrets of the pod's own
//! namespace only). Another protocol is `Accepted=False`
//! `UnsupportedProtocol`; a missing or malformed certificate Secret
//! `ResolvedRefs=False` `InvalidCertificateRef`;
//! route kinds other than `HTTPRoute` `InvalidRouteKinds`; listeners on one
//! port with different protocols, or the same host name, `Conflicted`.

use std::collections::{BTreeMap, BTreeSet};

use weft_api::gateway::{
    GATEWAY_CONTROLLER, GROUP, GatewayListener, GatewaySpec, HttpRouteSpec, ParentReference,
    TlsRouteSpec,
};
use weft_proxy_config as pc;

use super::gamma::{self, ParentVerdict};
use crate::index::{Index, Tracked};

/// The verdict on one listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerVerdict {
    /// Its name.
    pub name: String,
    /// Routes attached to it.
    pub attached: i32,
    /// `None`: `Accepted=True`; else reason and message.
    pub refused: Option<(&'static str, String)>,
    /// `None`: `ResolvedRefs=True`.
    pub unresolved: Option<(&'static str, String)>,
    /// `None`: `Conflicted=False`.
    pub conflicted: Option<(&'static str, String)>,
    /// The route kinds it takes (`HTTPRoute` on HTTP and HTTPS, `TLSRoute`
    /// on TLS passthrough, as far as `allowedRoutes.kinds` lists them): its
    /// `supportedKinds`.
    pub kinds: Vec<&'static str>,
}

impl ListenerVerdict {
    /// Whether the gateway serves it.
    pub fn programmed(&self) -> bool {
        self.refused.is_none() && self.unresolved.is_none() && self.conflicted.is_none()
    }
}

/// What one weft `Gateway` renders to.
#[derive(Clone, Debug, PartialEq)]
pub struct GatewayRender {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The `metadata.generation` judged.
    pub generation: Option<i64>,
    /// The gateway proxy's document, sealed (generation 1; the writer
    /// sets it).
    pub config: pc::ProxyConfig,
    /// `None`: `Accepted=True`.
    pub refused: Option<(&'static str, String)>,
    /// Per listener, in the Gateway's order.
    pub listeners: Vec<ListenerVerdict>,
    /// Names of the certificate Secrets the pods mount (of the Gateway's
    /// namespace; a certificate of another namespace is mounted from the
    /// copy named in `copies`).
    pub certificates: Vec<String>,
    /// Certificates of other namespaces a `ReferenceGrant` lets the
    /// Gateway use: (namespace, Secret, name of its copy in the Gateway's
    /// namespace, which the writer keeps equal to it).
    pub copies: Vec<(String, String, String)>,
    /// The ports the gateway's Service exposes: (listener name, port).
    pub ports: Vec<(String, u16)>,
}

/// A route attached to a listener: its namespace, name, tracked spec and
/// the host names it answers there.
type Attached<'a> = (
    String,
    String,
    &'a Tracked<HttpRouteSpec>,
    Vec<Option<String>>,
);

/// A `TLSRoute` attached to a passthrough listener, likewise.
type AttachedTls<'a> = (
    String,
    String,
    &'a Tracked<TlsRouteSpec>,
    Vec<Option<String>>,
);

/// Whether a parent reference names a Gateway (group and kind defaults).
pub fn is_gateway_ref(p: &ParentReference) -> bool {
    p.group.as_deref().is_none_or(|g| g == GROUP)
        && p.kind.as_deref().is_none_or(|k| k == "Gateway")
}

/// The Gateway of a weft class a parent names, if it is one.
fn weft_gateway<'a>(
    index: &'a Index,
    route_ns: &str,
    p: &ParentReference,
) -> Option<(&'a str, &'a str, &'a Tracked<GatewaySpec>)> {
    if !is_gateway_ref(p) {
        return None;
    }
    let ns = p.namespace.as_deref().unwrap_or(route_ns);
    index
        .weft_gateways()
        .find(|(n, name, _)| *n == ns && *name == p.name)
}

/// Whether `p` names a Gateway weft implements.
pub fn is_weft_gateway_parent(index: &Index, route_ns: &str, p: &ParentReference) -> bool {
    weft_gateway(index, route_ns, p).is_some()
}

/// The protocols whose listeners take routes of `kind`.
fn protocols_of(kind: &str) -> &'static [&'static str] {
    match kind {
        "HTTPRoute" => &["HTTP", "HTTPS"],
        "TLSRoute" => &["TLS"],
        _ => &[],
    }
}

/// The route kinds a listener of `protocol` can take.
fn kinds_of(protocol: &str) -> &'static [&'static str] {
    match protocol {
        "HTTP" | "HTTPS" => &["HTTPRoute"],
        "TLS" => &["TLSRoute"],
        _ => &[],
    }
}

/// The listeners of its Gateway a parent of a route of `kind` with host
/// names `hostnames` attaches to (by index), or why none.
pub fn attach(
    index: &Index,
    route_ns: &str,
    kind: &str,
    hostnames: &[String],
    p: &ParentReference,
) -> Result<Vec<usize>, (&'static str, String)> {
    let Some((gw_ns, gw_name, gw)) = weft_gateway(index, route_ns, p) else {
        return Err((
            "NoMatchingParent",
            format!("no Gateway {} of a weft class", p.name),
        ));
    };
    let selected: Vec<(usize, &GatewayListener)> = gw
        .spec
        .listeners
        .iter()
        .enumerate()
        .filter(|(_, l)| p.section_name.as_ref().is_none_or(|s| *s == l.name))
        .filter(|(_, l)| p.port.is_none_or(|port| port == l.port))
        .collect();
    if selected.is_empty() {
        return Err((
            "NoMatchingParent",
            format!("Gateway {gw_ns}/{gw_name} has no listener that sectionName and port select"),
        ));
    }
    // A listener of another protocol does not allow the kind, like one
    // whose allowedRoutes leaves it out.
    let allowed: Vec<(usize, &GatewayListener)> = selected
        .into_iter()
        .filter(|(_, l)| protocols_of(kind).contains(&l.protocol.as_str()))
        .filter(|(_, l)| allows(index, gw_ns, route_ns, kind, l))
        .collect();
    if allowed.is_empty() {
        return Err((
            "NotAllowedByListeners",
            format!(
                "no listener of Gateway {gw_ns}/{gw_name} allows {kind}s of namespace {route_ns}"
            ),
        ));
    }
    let matching: Vec<usize> = allowed
        .into_iter()
        .filter(|(_, l)| !route_hosts(hostnames, l).is_empty())
        .map(|(i, _)| i)
        .collect();
    if matching.is_empty() {
        return Err((
            "NoMatchingListenerHostname",
            format!(
                "no host name of the route is one a listener of Gateway {gw_ns}/{gw_name} answers"
            ),
        ));
    }
    Ok(matching)
}

fn allows(index: &Index, gw_ns: &str, route_ns: &str, kind: &str, l: &GatewayListener) -> bool {
    let ar = l.allowed_routes.as_ref();
    let kinds_ok = ar.is_none_or(|a| {
        a.kinds.is_empty()
            || a.kinds
                .iter()
                .any(|k| k.kind == kind && k.group.as_deref().is_none_or(|g| g == GROUP))
    });
    let from = ar
        .and_then(|a| a.namespaces.as_ref())
        .and_then(|n| n.from.as_deref())
        .unwrap_or("Same");
    let ns_ok = match from {
        "All" => true,
        "Same" => gw_ns == route_ns,
        "Selector" => {
            let selector = ar
                .and_then(|a| a.namespaces.as_ref())
                .and_then(|n| n.selector.as_ref());
            let labels = index.namespace_labels(route_ns);
            match (selector, labels) {
                (Some(s), Some(labels)) => selector_matches(s, labels),
                _ => false,
            }
        }
        _ => false,
    };
    kinds_ok && ns_ok
}

fn selector_matches(
    s: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    labels: &BTreeMap<String, String>,
) -> bool {
    let exact = s
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs = s.match_expressions.iter().flatten().all(|e| {
        let have = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => have.is_some_and(|v| values.contains(v)),
            "NotIn" => have.is_none_or(|v| !values.contains(v)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            _ => false,
        }
    });
    exact && exprs
}

/// The host names a route answers on a listener: each route host name
/// intersected with the listener's; a route without host names takes the
/// listener's (`None`: any). Empty: the route does not fit the listener.
fn route_hosts(hostnames: &[String], l: &GatewayListener) -> Vec<Option<String>> {
    let lh = l.hostname.as_deref();
    if hostnames.is_empty() {
        return vec![lh.map(str::to_owned)];
    }
    let mut out = Vec::new();
    for h in hostnames {
        let h = h.to_ascii_lowercase();
        let i = match lh {
            None => Some(h),
            Some(lh) => intersect(&h, lh),
        };
        if let Some(i) = i
            && !out.contains(&Some(i.clone()))
        {
            out.push(Some(i));
        }
    }
    out
}

/// The narrower of two host name patterns when one includes the other.
fn intersect(a: &str, b: &str) -> Option<String> {
    let within = |narrow: &str, wide: &str| {
        narrow == wide
            || (wide.starts_with("*.") && pc::host_matches(wide, narrow.trim_start_matches("*.")))
            || (wide.starts_with("*.")
                && !narrow.starts_with("*.")
                && pc::host_matches(wide, narrow))
    };
    if within(a, b) {
        Some(a.to_owned())
    } else if within(b, a) {
        Some(b.to_owned())
    } else {
        None
    }
}

/// How well host pattern `h` of a route fits virtual host `v`: `None` when
/// it does not; smaller is more specific.
fn fits(h: Option<&str>, v: Option<&str>) -> Option<(u8, std::cmp::Reverse<usize>)> {
    match (h, v) {
        (None, _) => Some((2, std::cmp::Reverse(0))),
        (Some(h), Some(v)) if h == v => Some((0, std::cmp::Reverse(h.len()))),
        (Some(h), Some(v)) if h.starts_with("*.") && intersect(h, v).as_deref() == Some(v) => {
            Some((1, std::cmp::Reverse(h.len())))
        }
        _ => None,
    }
}

/// Renders a Gateway of a weft class; `None` when it is not one.
/// `secret_ok(name)`: whether Secret `name` of the Gateway's namespace is
/// a usable TLS Secret (the writer reads it; the renderer does no I/O).
pub fn render_gateway(
    index: &Index,
    ns: &str,
    name: &str,
    secret_ok: &dyn Fn(&str, &str) -> bool,
) -> Option<GatewayRender> {
    let (_, _, gw) = index
        .weft_gateways()
        .find(|(n, m, _)| *n == ns && *m == name)?;
    let spec = &gw.spec;

    // Listener verdicts.
    let mut listeners: Vec<ListenerVerdict> = Vec::new();
    let mut usable = BTreeSet::new();
    let mut copies: Vec<(String, String, String)> = Vec::new();
    let mut cert_names: Vec<Vec<String>> = Vec::new();
    for l in &spec.listeners {
        let mut names = Vec::new();
        let mut v = ListenerVerdict {
            name: l.name.clone(),
            attached: 0,
            refused: None,
            unresolved: None,
            conflicted: None,
            kinds: kinds_of(&l.protocol).to_vec(),
        };
        match l.protocol.as_str() {
            "HTTP" => {}
            "TLS" => {
                if l.tls.as_ref().and_then(|t| t.mode.as_deref()) != Some("Passthrough") {
                    v.refused = Some((
                        "UnsupportedProtocol",
                        "a TLS listener of weft's gateway passes TLS through to the backend (tls.mode Passthrough); it does not terminate TLS for TCP".to_owned(),
                    ));
                }
            }
            "HTTPS" => {
                let tls = l.tls.as_ref();
                if tls
                    .and_then(|t| t.mode.as_deref())
                    .is_some_and(|m| m != "Terminate")
                {
                    v.refused = Some((
                        "UnsupportedProtocol",
                        "an HTTPS listener terminates TLS (mode Terminate)".to_owned(),
                    ));
                }
                let refs = tls
                    .map(|t| t.certificate_refs.as_slice())
                    .unwrap_or_default();
                if refs.is_empty() {
                    v.unresolved = Some((
                        "InvalidCertificateRef",
                        "an HTTPS listener needs a certificateRef".to_owned(),
                    ));
                }
                for r in refs {
                    let bad = if !matches!(r.group.as_deref(), None | Some("" | "core"))
                        || r.kind.as_deref().is_some_and(|k| k != "Secret")
                    {
                        Some((
                            "InvalidCertificateRef",
                            format!("{}: only Secrets hold certificates", r.name),
                        ))
                    } else if let Some(other) = r.namespace.as_deref().filter(|n| *n != ns)
                        && !index.gateway_may_use(ns, other, &r.name)
                    {
                        Some((
                            "RefNotPermitted",
                            format!(
                                "Secret {other}/{}: no ReferenceGrant in {other} lets Gateways of {ns} use it",
                                r.name
                            ),
                        ))
                    } else if !secret_ok(r.namespace.as_deref().unwrap_or(ns), &r.name) {
                        Some((
                            "InvalidCertificateRef",
                            format!(
                                "Secret {}/{} does not exist or holds no PEM tls.crt and tls.key",
                                r.namespace.as_deref().unwrap_or(ns),
                                r.name
                            ),
                        ))
                    } else {
                        None
                    };
                    match bad {
                        Some(b) => {
                            v.unresolved.get_or_insert(b);
                        }
                        None => {
                            let mounted = match r.namespace.as_deref().filter(|n| *n != ns) {
                                None => r.name.clone(),
                                Some(other) => {
                                    let copy = copy_name(name, other, &r.name);
                                    if !copies.iter().any(|c| c.2 == copy) {
                                        copies.push((
                                            other.to_owned(),
                                            r.name.clone(),
                                            copy.clone(),
                                        ));
                                    }
                                    copy
                                }
                            };
                            usable.insert(mounted.clone());
                            names.push(mounted);
                        }
                    }
                }
            }
            other => {
                v.refused = Some((
                    "UnsupportedProtocol",
                    format!(
                        "protocol {other:?} is not served by weft's gateway (HTTP, HTTPS and TLS passthrough are)"
                    ),
                ));
            }
        }
        let takes = kinds_of(&l.protocol);
        let fits_protocol = |k: &weft_api::gateway::RouteGroupKind| {
            takes.contains(&k.kind.as_str()) && k.group.as_deref().is_none_or(|g| g == GROUP)
        };
        if let Some(ar) = &l.allowed_routes
            && !ar.kinds.is_empty()
        {
            v.kinds
                .retain(|kind| ar.kinds.iter().any(|k| fits_protocol(k) && k.kind == *kind));
            if !ar.kinds.iter().all(fits_protocol) {
                v.unresolved.get_or_insert((
                    "InvalidRouteKinds",
                    format!(
                        "a {} listener of weft's gateway takes {} only",
                        l.protocol,
                        if takes.is_empty() {
                            "no routes".to_owned()
                        } else {
                            takes.join(" and ")
                        }
                    ),
                ));
            }
        }
        listeners.push(v);
        cert_names.push(names);
    }
    // Conflicts between listeners sharing a port.
    for (i, a) in spec.listeners.iter().enumerate() {
        for (j, b) in spec.listeners.iter().enumerate() {
            if i == j || a.port != b.port {
                continue;
            }
            if a.protocol != b.protocol {
                listeners[i].conflicted = Some((
                    "ProtocolConflict",
                    format!(
                        "listener {:?} uses port {} with protocol {}",
                        b.name, b.port, b.protocol
                    ),
                ));
            } else if a.hostname == b.hostname {
                listeners[i].conflicted = Some((
                    "HostnameConflict",
                    format!("listener {:?} has the same port and host name", b.name),
                ));
            }
        }
    }

    // Routes attached to each listener, with their host names.
    let mut attached: Vec<Vec<Attached<'_>>> = vec![Vec::new(); spec.listeners.len()];
    let mut attached_tls: Vec<Vec<AttachedTls<'_>>> = vec![Vec::new(); spec.listeners.len()];
    for route_ns in index.all_namespaces() {
        for (rname, t) in index.http_routes(&route_ns).into_iter().flatten() {
            let (parents, hostnames) = (&t.spec.parent_refs, &t.spec.hostnames);
            for i in attached_to(index, ns, name, &route_ns, "HTTPRoute", parents, hostnames) {
                let hosts = route_hosts(&t.spec.hostnames, &spec.listeners[i]);
                attached[i].push((route_ns.clone(), rname.clone(), t, hosts));
            }
        }
        for (rname, t) in index.tls_routes(&route_ns).into_iter().flatten() {
            let (parents, hostnames) = (&t.spec.parent_refs, &t.spec.hostnames);
            for i in attached_to(index, ns, name, &route_ns, "TLSRoute", parents, hostnames) {
                let hosts = route_hosts(&t.spec.hostnames, &spec.listeners[i]);
                attached_tls[i].push((route_ns.clone(), rname.clone(), t, hosts));
            }
        }
    }

    let mut config = super::render(index, ns).config;
    config.inbound = pc::Inbound::default();
    let mut have: BTreeSet<String> = config.services.iter().map(|s| s.key()).collect();
    let mut extra_namespaces = BTreeSet::new();
    let mut gw_listeners = Vec::new();
    let mut made = Vec::new();
    for (i, l) in spec.listeners.iter().enumerate() {
        listeners[i].attached = (attached[i].len() + attached_tls[i].len()) as i32;
        if !listeners[i].programmed() {
            continue;
        }
        let Ok(port) = u16::try_from(l.port) else {
            continue;
        };
        if l.protocol == "TLS" {
            let (hosts, services) = passthrough_hosts(
                index,
                ns,
                name,
                l,
                port,
                &attached_tls[i],
                &mut extra_namespaces,
            );
            made.extend(services);
            gw_listeners.push(pc::Listener {
                name: l.name.clone(),
                port,
                protocol: pc::ListenerProtocol::Tls,
                hostname: l.hostname.clone(),
                certificates: Vec::new(),
                hosts,
            });
            continue;
        }
        // Virtual hosts: every host name a route answers here.
        let vhosts = virtual_hosts(attached[i].iter().map(|(_, _, _, h)| h));
        let mut hosts = Vec::new();
        for (n, v) in vhosts.iter().enumerate() {
            let mut entries = Vec::new();
            for (route_ns, rname, t, rhosts) in &attached[i] {
                let Some(fit) = rhosts
                    .iter()
                    .filter_map(|h| fits(h.as_deref(), v.as_deref()))
                    .min()
                else {
                    continue;
                };
                let Some(rules) = gamma::route_entries(index, route_ns, rname, t) else {
                    continue;
                };
                let age = (t.created.is_none(), t.created.clone());
                for (k, (prec, mut e)) in rules.into_iter().enumerate() {
                    e.name = format!("{route_ns}/{}", e.name);
                    for b in &e.backends {
                        if let Some((bns, _)) = b.service.split_once('/') {
                            extra_namespaces.insert(bns.to_owned());
                        }
                    }
                    entries.push((
                        (fit, prec, age.clone(), format!("{route_ns}/{rname}"), k),
                        e,
                    ));
                }
            }
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let (svc, host) = host_service(ns, name, l, n, port, v, pc::Protocol::Http1);
            made.push(pc::Service {
                http_routes: entries.into_iter().map(|(_, e)| e).collect(),
                ..svc
            });
            hosts.push(host);
        }
        let certs: Vec<String> = cert_names[i]
            .iter()
            .filter(|n| usable.contains(*n))
            .cloned()
            .collect();
        gw_listeners.push(pc::Listener {
            name: l.name.clone(),
            port,
            protocol: if l.protocol == "HTTPS" {
                pc::ListenerProtocol::Https
            } else {
                pc::ListenerProtocol::Http
            },
            hostname: l.hostname.clone(),
            certificates: certs,
            hosts,
        });
    }
    // Backends in namespaces outside the scope (not meshed, or scoped out):
    // their Services are listed too, so the gateway reaches them.
    let td = index.mesh().trust_domain;
    for bns in extra_namespaces {
        if index.visible_from(ns).contains(bns.as_str()) {
            continue;
        }
        let judged = super::judge_namespace(index, &bns, &td);
        for (sname, info) in index.services(&bns).into_iter().flatten() {
            if let Some(s) = super::render_service(index, &td, &bns, sname, info, &judged)
                && have.insert(s.key())
            {
                config.services.push(std::sync::Arc::new(s));
            }
        }
    }
    config
        .services
        .extend(made.into_iter().map(std::sync::Arc::new));
    let certificates: BTreeSet<String> = gw_listeners
        .iter()
        .flat_map(|l| l.certificates.iter().cloned())
        .collect();
    config
        .services
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let ports: Vec<(String, u16)> = {
        let mut seen = BTreeSet::new();
        gw_listeners
            .iter()
            .filter(|l| seen.insert(l.port))
            .map(|l| (l.name.clone(), l.port))
            .collect()
    };
    config.gateway = Some(pc::Gateway {
        name: format!("{ns}/{name}"),
        listeners: gw_listeners,
    });
    config.generation = 1;
    config.seal();

    let refused = if listeners.iter().any(ListenerVerdict::programmed) || listeners.is_empty() {
        None
    } else {
        Some(("ListenersNotValid", "no listener can be served".to_owned()))
    };
    Some(GatewayRender {
        namespace: ns.to_owned(),
        name: name.to_owned(),
        generation: gw.generation,
        config,
        refused,
        listeners,
        copies: copies
            .into_iter()
            .filter(|c| certificates.contains(&c.2))
            .collect(),
        certificates: certificates.into_iter().collect(),
        ports,
    })
}

/// Every host name the attached routes answer, once, most specific first:
/// exact names (longest first), then wildcards (longest first), then any.
fn virtual_hosts<'a>(routes: impl Iterator<Item = &'a Vec<Option<String>>>) -> Vec<Option<String>> {
    let mut vhosts: Vec<Option<String>> = Vec::new();
    for h in routes.flatten() {
        if !vhosts.contains(h) {
            vhosts.push(h.clone());
        }
    }
    vhosts.sort_by_key(|h| match h {
        Some(h) if !h.starts_with("*.") => (0, std::cmp::Reverse(h.len()), h.clone()),
        Some(h) => (1, std::cmp::Reverse(h.len()), h.clone()),
        None => (2, std::cmp::Reverse(0), String::new()),
    });
    vhosts
}

/// The listeners (by index) of Gateway `ns/name` that a route of `kind` in
/// `route_ns`, with these parents and host names, attaches to.
fn attached_to(
    index: &Index,
    ns: &str,
    name: &str,
    route_ns: &str,
    kind: &str,
    parents: &[ParentReference],
    hostnames: &[String],
) -> BTreeSet<usize> {
    let mut on = BTreeSet::new();
    for p in parents {
        let ours = weft_gateway(index, route_ns, p).is_some_and(|(n, m, _)| n == ns && m == name);
        if ours && let Ok(ls) = attach(index, route_ns, kind, hostnames, p) {
            on.extend(ls);
        }
    }
    on
}

/// The virtual hosts of a TLS passthrough listener and the Services made
/// for them: per SNI host name its routes answer (most specific first),
/// the TCP route of the one route that wins it (the oldest, then by
/// namespace and name, as the Gateway API orders conflicting routes),
/// whose rules' resolved backends share the connections by weight. A host
/// whose route resolves no backend keeps its Service without a route: the
/// gateway closes its connections.
fn passthrough_hosts(
    index: &Index,
    ns: &str,
    gateway: &str,
    l: &GatewayListener,
    port: u16,
    attached: &[AttachedTls<'_>],
    extra_namespaces: &mut BTreeSet<String>,
) -> (Vec<pc::VirtualHost>, Vec<pc::Service>) {
    let vhosts = virtual_hosts(attached.iter().map(|(_, _, _, h)| h));
    let (mut hosts, mut services) = (Vec::new(), Vec::new());
    for (n, v) in vhosts.iter().enumerate() {
        let winner = attached
            .iter()
            .filter_map(|(rns, rname, t, rhosts)| {
                let fit = rhosts
                    .iter()
                    .filter_map(|h| fits(h.as_deref(), v.as_deref()))
                    .min()?;
                Some((
                    (fit, t.created.is_none(), t.created.clone(), rns, rname),
                    (rns, rname, t),
                ))
            })
            .min_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, r)| r);
        let mut tcp_routes = Vec::new();
        if let Some((rns, rname, t)) = winner {
            let (backends, _) = tls_backends(index, rns, &t.spec);
            for b in &backends {
                if let Some((bns, _)) = b.service.split_once('/') {
                    extra_namespaces.insert(bns.to_owned());
                }
            }
            if backends.iter().any(|b| b.weight > 0) {
                tcp_routes.push(pc::TcpRoute {
                    name: format!("{rns}/{rname}"),
                    port: None,
                    backends,
                });
            }
        }
        let (svc, host) = host_service(ns, gateway, l, n, port, v, pc::Protocol::Opaque);
        services.push(pc::Service { tcp_routes, ..svc });
        hosts.push(host);
    }
    (hosts, services)
}

/// The Service made for host name `hostname` (the `n`th) of listener `l`
/// of Gateway `ns/gateway` (named `<gateway>:<listener>:<n>`, no addresses,
/// the listener's port, no routes yet), and the virtual host naming it.
fn host_service(
    ns: &str,
    gateway: &str,
    l: &GatewayListener,
    n: usize,
    port: u16,
    hostname: &Option<String>,
    protocol: pc::Protocol,
) -> (pc::Service, pc::VirtualHost) {
    let name = format!("{gateway}:{}:{n}", l.name);
    let host = pc::VirtualHost {
        hostname: hostname.clone(),
        service: format!("{ns}/{name}"),
    };
    let svc = pc::Service {
        name,
        namespace: ns.to_owned(),
        cluster_ips: Vec::new(),
        ports: vec![pc::ServicePort {
            port,
            name: None,
            target_port: port,
            protocol,
        }],
        subsets: Vec::new(),
        endpoints: Vec::new(),
        http_routes: Vec::new(),
        tcp_routes: Vec::new(),
        policy: pc::ClientPolicy::default(),
    };
    (svc, host)
}

/// The backends a `TLSRoute`'s rules resolve to, and why the others do
/// not (`ResolvedRefs` reason, message).
fn tls_backends(
    index: &Index,
    ns: &str,
    spec: &TlsRouteSpec,
) -> (Vec<pc::Backend>, Vec<(&'static str, String)>) {
    let (mut backends, mut unresolved) = (Vec::new(), Vec::new());
    for (i, rule) in spec.rules.iter().enumerate() {
        for (k, b) in rule.backend_refs.iter().enumerate() {
            let at = format!("rules[{i}].backendRefs[{k}]");
            let Ok(weight) = u32::try_from(b.weight.unwrap_or(1)) else {
                unresolved.push(("UnsupportedValue", format!("{at}.weight: negative")));
                continue;
            };
            match gamma::backend_ref(index, "TLSRoute", ns, &b.backend, weight, &at) {
                Ok(backend) => backends.push(backend),
                Err(r) => unresolved.push(r),
            }
        }
    }
    (backends, unresolved)
}

/// The verdicts on the `TLSRoute`s of `ns`: per parent naming a weft
/// Gateway, whether it attaches and whether its backends resolve.
pub(super) fn judge_tls_routes(index: &Index, ns: &str, statuses: &mut Vec<super::CrStatus>) {
    for (rname, t) in index.tls_routes(ns).into_iter().flatten() {
        let (_, unresolved) = tls_backends(index, ns, &t.spec);
        let resolved = unresolved.first().map(|(reason, _)| {
            (
                *reason,
                unresolved
                    .iter()
                    .map(|(_, m)| m.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        });
        let parents: Vec<ParentVerdict> = t
            .spec
            .parent_refs
            .iter()
            .filter(|p| is_weft_gateway_parent(index, ns, p))
            .map(|p| {
                let refused = attach(index, ns, "TLSRoute", &t.spec.hostnames, p).err();
                ParentVerdict {
                    parent: p.clone(),
                    controller: GATEWAY_CONTROLLER,
                    unresolved: if refused.is_none() {
                        resolved.clone()
                    } else {
                        None
                    },
                    refused,
                }
            })
            .collect();
        if parents.is_empty() {
            continue;
        }
        statuses.push(super::CrStatus {
            kind: crate::index::Kind::TlsRoute,
            object: crate::index::ObjectRef::new(ns, rname.clone()),
            generation: t.generation,
            rejection: None,
            parents,
        });
    }
}

/// The name of the copy of certificate Secret `ns/secret` that Gateway
/// `gateway` mounts (a Secret name: at most 253 characters).
pub fn copy_name(gateway: &str, ns: &str, secret: &str) -> String {
    let full = format!("weft-gateway-{gateway}-cert-{ns}-{secret}");
    if full.len() <= 253 {
        return full;
    }
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    full.hash(&mut h);
    format!("{}-{:016x}", &full[..230], h.finish())
}

/// The verdict of a Gateway parent of a route, for `status.parents`.
pub fn parent_verdict(
    index: &Index,
    route_ns: &str,
    spec: &HttpRouteSpec,
    p: &ParentReference,
    unresolved: Option<(&'static str, String)>,
) -> ParentVerdict {
    let refused = attach(index, route_ns, "HTTPRoute", &spec.hostnames, p).err();
    ParentVerdict {
        parent: p.clone(),
        controller: GATEWAY_CONTROLLER,
        unresolved: if refused.is_none() { unresolved } else { None },
        refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_intersect_to_the_narrower() {
        assert_eq!(
            intersect("a.example.com", "*.example.com").as_deref(),
            Some("a.example.com")
        );
        assert_eq!(
            intersect("*.example.com", "a.example.com").as_deref(),
            Some("a.example.com")
        );
        assert_eq!(
            intersect("*.a.example.com", "*.example.com").as_deref(),
            Some("*.a.example.com")
        );
        assert_eq!(intersect("a.example.com", "b.example.com"), None);
        assert_eq!(intersect("*.example.com", "*.example.org"), None);
        assert_eq!(intersect("x.com", "x.com").as_deref(), Some("x.com"));
    }

    #[test]
    fn routes_fit_exact_then_wildcard_then_any() {
        let v = Some("a.example.com");
        assert!(fits(Some("a.example.com"), v) < fits(Some("*.example.com"), v));
        assert!(fits(Some("*.example.com"), v) < fits(None, v));
        assert_eq!(fits(Some("b.example.com"), v), None);
        assert_eq!(fits(Some("a.example.com"), None), None);
    }
}
