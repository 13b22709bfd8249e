//! Gateway API `HTTPRoute`s attached to Services (GAMMA mesh routes),
//! rendered into the same route model as `ServiceRoute`s.
//!
//! # What applies
//!
//! A route applies to the mesh through each `parentRef` of group `""` and
//! kind `Service` in the route's own namespace (a *producer* route: it
//! shapes every client's traffic to that Service). With `port` (or
//! `sectionName`, the port's name) it covers that Service port, else every
//! port. `hostnames` are ignored for Service parents. A parent Service in
//! another namespace (a *consumer* route, which applies only to the route
//! namespace's own clients) is not supported yet and reported so.
//!
//! # How rules become proxy rules
//!
//! Each match of each rule becomes one `httpRoutes` entry (a rule without
//! matches gets `PathPrefix /`). All entries of all routes attached to a
//! Service are ordered by the Gateway API's precedence, because the proxy
//! takes the first matching entry: an exact path first, then regular
//! expressions, then the longest prefix; then a match with a method, more
//! header matches, more query matches; ties go to the older route, then to
//! `namespace/name` order, then to rule and match order.
//!
//! | `HTTPRoute` | `proxy.json` |
//! |---|---|
//! | `backendRefs` (Service, port, weight; default weight 1) | `backends`; a reference that does not resolve keeps its weight in `unresolvedWeight` (answered 500) and sets `ResolvedRefs=False`; a rule without backends (and no redirect) answers 500 |
//! | `RequestHeaderModifier`, `ResponseHeaderModifier` | `requestHeaders`, `responseHeaders` |
//! | `RequestRedirect` (scheme, hostname, port, status, full path or prefix) | `redirect` |
//! | `URLRewrite` (hostname, full path or prefix) | `rewrite` |
//! | `RequestMirror` (one per rule; `percent` or `fraction`) | `mirror` |
//! | `timeouts.request`, `timeouts.backendRequest` | `timeoutMs`: the smaller (weft sends an `HTTPRoute` request to one backend once, so the two bound the same wait); `0s` is none |
//!
//! Anything else a rule asks for (another filter type, filters on a
//! backend) rejects the route (`Accepted=False`, `UnsupportedValue`),
//! rather than forwarding requests without it.
//!
//! # `ServiceRoute` and `HTTPRoute` on one Service
//!
//! weft's own `ServiceRoute` wins: an `HTTPRoute` parent whose Service and
//! port (either side without a port covers all) a `ServiceRoute` already
//! routes is `Accepted=False` with reason `Conflicted`, and renders nothing
//! for that parent (decision 26 in `docs/architecture.md`).

use std::cmp::Reverse;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use weft_api::gateway::{
    BackendObjectReference, GATEWAY_CONTROLLER, HttpRouteFilter, HttpRouteRule, HttpRouteSpec,
    MESH_CONTROLLER, ParentReference, PathModifier,
};
use weft_proxy_config as pc;

use super::{
    Candidate, CrStatus, EffectiveRoute, Problem, Reason, Rejection, candidate, check_regex,
    problem, service_of,
};
use crate::index::{Index, Kind, ObjectRef};

/// A parent's verdict on a Gateway API route: the `Accepted` and
/// `ResolvedRefs` conditions of its `status.parents` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentVerdict {
    /// The parent as the route names it.
    pub parent: ParentReference,
    /// The controller whose verdict it is: `weft.dev/mesh` for Services,
    /// `weft.dev/gateway-controller` for Gateways of weft's class.
    pub controller: &'static str,
    /// `None`: `Accepted=True`; else the reason and message of `False`.
    pub refused: Option<(&'static str, String)>,
    /// `None`: `ResolvedRefs=True`; else the reason and message of `False`.
    pub unresolved: Option<(&'static str, String)>,
}

/// What one route translates to.
#[derive(Clone, Debug, PartialEq)]
struct Translated {
    parents: Vec<ParentVerdict>,
    /// (Service, port) pairs the rules attach to.
    attach: Vec<(String, Option<u16>)>,
    /// Entries with their precedence, without port.
    entries: Vec<(Precedence, pc::HttpRoute)>,
}

/// The Gateway API's precedence of one match; smaller sorts first.
pub(super) type Precedence = (u8, Reverse<usize>, bool, Reverse<usize>, Reverse<usize>);

/// Judges the `HTTPRoute`s of `ns` with Service parents, adds their rules to
/// `routes` (Services a `ServiceRoute` does not already route on those
/// ports), and their verdicts to `statuses`.
pub(super) fn judge(
    index: &Index,
    ns: &str,
    routes: &mut BTreeMap<String, Vec<EffectiveRoute>>,
    statuses: &mut Vec<CrStatus>,
) {
    let Some(all) = index.http_routes(ns) else {
        return;
    };
    // Service → entries with their full sort key.
    type Key = (Precedence, (bool, Option<Time>), String, usize);
    let mut by_service: BTreeMap<String, Vec<(Key, pc::HttpRoute)>> = BTreeMap::new();
    for (name, t) in all {
        if !t
            .spec
            .parent_refs
            .iter()
            .any(|p| p.is_service() || super::gateway::is_weft_gateway_parent(index, ns, p))
        {
            continue;
        }
        let c: Candidate<Translated> =
            candidate(name, t, |spec| translate(index, ns, name, spec, routes));
        let parents = match (&c.current, &c.effective) {
            (Ok(()), Some(tr)) => tr.parents.clone(),
            (Err(p), _) => t
                .spec
                .parent_refs
                .iter()
                .filter_map(|parent| {
                    let controller = if parent.is_service() {
                        MESH_CONTROLLER
                    } else if super::gateway::is_weft_gateway_parent(index, ns, parent) {
                        GATEWAY_CONTROLLER
                    } else {
                        return None;
                    };
                    Some(ParentVerdict {
                        parent: parent.clone(),
                        controller,
                        refused: Some((gateway_reason(p.reason), rejected_message(p, &c))),
                        unresolved: None,
                    })
                })
                .collect(),
            (Ok(()), None) => Vec::new(),
        };
        statuses.push(CrStatus {
            kind: Kind::HttpRoute,
            object: ObjectRef::new(ns, name.clone()),
            generation: c.generation,
            rejection: c.current.as_ref().err().map(|p| Rejection {
                reason: p.reason,
                message: p.message.clone(),
                rendering_generation: c.fallback_generation,
            }),
            parents,
        });
        let Some(tr) = c.effective else { continue };
        let age = (t.created.is_none(), t.created.clone());
        for (svc, port) in &tr.attach {
            for (n, (prec, entry)) in tr.entries.iter().enumerate() {
                let mut e = entry.clone();
                e.port = *port;
                by_service
                    .entry(svc.clone())
                    .or_default()
                    .push(((*prec, age.clone(), name.clone(), n), e));
            }
        }
    }
    for (svc, mut entries) in by_service {
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        routes.entry(svc).or_default().push(EffectiveRoute {
            port: None,
            http: entries.into_iter().map(|(_, e)| e).collect(),
            tcp: Vec::new(),
        });
    }
}

fn rejected_message(p: &Problem, c: &Candidate<Translated>) -> String {
    match c.fallback_generation {
        Some(g) => format!(
            "{}; still rendering generation {}, the last accepted",
            p.message,
            g.map_or_else(|| "?".to_owned(), |g| g.to_string())
        ),
        None => format!("{}; nothing of it is rendered", p.message),
    }
}

/// The Gateway API reason of a rejected route.
pub(super) fn gateway_reason(r: Reason) -> &'static str {
    match r {
        Reason::IncompatibleFilters => "IncompatibleFilters",
        Reason::Conflicted => "Conflicted",
        _ => "UnsupportedValue",
    }
}

/// The proxy rules of a route (without port), with their precedence, and
/// the backend references that do not resolve.
type Rules = (
    Vec<(Precedence, pc::HttpRoute)>,
    Vec<(&'static str, String)>,
);

fn rules_of(index: &Index, ns: &str, name: &str, spec: &HttpRouteSpec) -> Result<Rules, Problem> {
    let mut unresolved: Vec<(&'static str, String)> = Vec::new();
    let mut entries = Vec::new();
    let default_rule;
    let rules: &[HttpRouteRule] = if spec.rules.is_empty() {
        default_rule = [HttpRouteRule::default()];
        &default_rule
    } else {
        &spec.rules
    };
    for (i, rule) in rules.iter().enumerate() {
        entries.extend(rule_entries(index, ns, name, i, rule, &mut unresolved)?);
    }
    Ok((entries, unresolved))
}

/// The proxy rules a route renders (for a Gateway): those of its current
/// spec, else of the last accepted one, else none.
pub(super) fn route_entries(
    index: &Index,
    ns: &str,
    name: &str,
    t: &crate::index::Tracked<HttpRouteSpec>,
) -> Option<Vec<(Precedence, pc::HttpRoute)>> {
    match rules_of(index, ns, name, &t.spec) {
        Ok((entries, _)) => Some(entries),
        Err(_) => t
            .last_accepted
            .as_ref()
            .and_then(|(_, spec)| rules_of(index, ns, name, spec).ok())
            .map(|(entries, _)| entries),
    }
}

fn translate(
    index: &Index,
    ns: &str,
    name: &str,
    spec: &HttpRouteSpec,
    service_routes: &BTreeMap<String, Vec<EffectiveRoute>>,
) -> Result<Translated, Problem> {
    let (entries, unresolved) = rules_of(index, ns, name, spec)?;
    let resolved = match unresolved.first() {
        None => None,
        Some((reason, _)) => Some((
            *reason,
            unresolved
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        )),
    };
    let mut parents = Vec::new();
    let mut attach = Vec::new();
    for parent in &spec.parent_refs {
        if !parent.is_service() {
            if super::gateway::is_weft_gateway_parent(index, ns, parent) {
                parents.push(super::gateway::parent_verdict(
                    index,
                    ns,
                    spec,
                    parent,
                    resolved.clone(),
                ));
            }
            continue;
        }
        let refused = match attach_to(index, ns, parent, service_routes) {
            Ok(a) => {
                if !attach.contains(&a) {
                    attach.push(a);
                }
                None
            }
            Err(r) => Some(r),
        };
        parents.push(ParentVerdict {
            parent: parent.clone(),
            controller: MESH_CONTROLLER,
            unresolved: refused.is_none().then(|| resolved.clone()).flatten(),
            refused,
        });
    }
    Ok(Translated {
        parents,
        attach,
        entries,
    })
}

/// The Service and port a Service parent attaches the route to, or why not.
fn attach_to(
    index: &Index,
    ns: &str,
    parent: &ParentReference,
    service_routes: &BTreeMap<String, Vec<EffectiveRoute>>,
) -> Result<(String, Option<u16>), (&'static str, String)> {
    let parent_ns = parent.namespace.as_deref().unwrap_or(ns);
    if parent_ns != ns {
        return Err((
            "UnsupportedValue",
            format!(
                "Service {parent_ns}/{} is in another namespace: weft applies HTTPRoutes to Services of their own namespace (producer routes) and does not support consumer routes yet",
                parent.name
            ),
        ));
    }
    let svc = service_of(index, ns, &parent.name).map_err(|p| ("NoMatchingParent", p.message))?;
    let mut port = match parent.port {
        None => None,
        Some(p) => {
            let p = u16::try_from(p)
                .ok()
                .filter(|p| *p > 0 && super::has_port(svc, *p));
            Some(p.ok_or_else(|| {
                (
                    "NoMatchingParent",
                    format!(
                        "Service {ns}/{} has no TCP port {}",
                        parent.name,
                        parent.port.unwrap_or_default()
                    ),
                )
            })?)
        }
    };
    if let Some(section) = &parent.section_name {
        let named = svc
            .ports
            .iter()
            .find(|p| p.name.as_deref() == Some(section.as_str()))
            .map(|p| p.port)
            .ok_or_else(|| {
                (
                    "NoMatchingParent",
                    format!("Service {ns}/{} has no port named {section:?}", parent.name),
                )
            })?;
        if port.is_some_and(|p| p != named) {
            return Err((
                "NoMatchingParent",
                format!(
                    "sectionName {section:?} is port {named}, not port {}",
                    port.unwrap_or_default()
                ),
            ));
        }
        port = Some(named);
    }
    let taken = service_routes.get(&parent.name).is_some_and(|rs| {
        rs.iter()
            .any(|r| r.port.is_none() || port.is_none() || r.port == port)
    });
    if taken {
        let on = port.map_or_else(|| "a port".to_owned(), |p| format!("port {p}"));
        return Err((
            "Conflicted",
            format!(
                "a ServiceRoute already routes Service {ns}/{} on {on}; weft's ServiceRoute wins over HTTPRoutes on the same Service port",
                parent.name
            ),
        ));
    }
    Ok((parent.name.clone(), port))
}

/// Resolves a backend reference of a route of kind `route_kind`
/// (`HTTPRoute`, `TLSRoute`); the error is a `ResolvedRefs` reason and
/// message.
pub(super) fn backend_ref(
    index: &Index,
    route_kind: &str,
    ns: &str,
    b: &BackendObjectReference,
    weight: u32,
    at: &str,
) -> Result<pc::Backend, (&'static str, String)> {
    if !b.is_service() {
        return Err((
            "InvalidKind",
            format!(
                "{at}: {}/{} is not a kind weft can send to (only core Services)",
                b.group.as_deref().unwrap_or(""),
                b.kind.as_deref().unwrap_or("Service")
            ),
        ));
    }
    let target_ns = b.namespace.as_deref().unwrap_or(ns);
    if !index.route_may_reach(route_kind, ns, target_ns, &b.name) {
        return Err((
            "RefNotPermitted",
            format!(
                "{at}: Service {target_ns}/{} is in another namespace and no ReferenceGrant there allows {route_kind}s of {ns}",
                b.name
            ),
        ));
    }
    let svc = service_of(index, target_ns, &b.name)
        .map_err(|p| ("BackendNotFound", format!("{at}: {}", p.message)))?;
    let port = b
        .port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| super::has_port(svc, *p))
        .ok_or_else(|| {
            (
                "BackendNotFound",
                match b.port {
                    None => format!("{at}: a Service backend needs a port"),
                    Some(p) => format!("{at}: Service {target_ns}/{} has no TCP port {p}", b.name),
                },
            )
        })?;
    Ok(pc::Backend {
        service: format!("{target_ns}/{}", b.name),
        subset: None,
        port: Some(port),
        weight,
    })
}

fn rule_entries(
    index: &Index,
    ns: &str,
    name: &str,
    i: usize,
    rule: &HttpRouteRule,
    unresolved: &mut Vec<(&'static str, String)>,
) -> Result<Vec<(Precedence, pc::HttpRoute)>, Problem> {
    let at = format!("rules[{i}]");
    let mut route = pc::HttpRoute {
        name: format!(
            "{name}/{}",
            rule.name.clone().unwrap_or_else(|| i.to_string())
        ),
        ..pc::HttpRoute::default()
    };

    for (k, f) in rule.filters.iter().enumerate() {
        apply_filter(
            index,
            ns,
            &mut route,
            f,
            &format!("{at}.filters[{k}]"),
            unresolved,
        )?;
    }
    if route.redirect.is_some() && route.rewrite.is_some() {
        return Err(problem(
            Reason::IncompatibleFilters,
            format!("{at}: RequestRedirect and URLRewrite cannot be combined"),
        ));
    }
    if route.redirect.is_some() && !rule.backend_refs.is_empty() {
        return Err(problem(
            Reason::IncompatibleFilters,
            format!("{at}: a rule with RequestRedirect has no backendRefs"),
        ));
    }

    for (k, b) in rule.backend_refs.iter().enumerate() {
        let b_at = format!("{at}.backendRefs[{k}]");
        if !b.filters.is_empty() {
            return Err(problem(
                Reason::UnsupportedValue,
                format!("{b_at}.filters: filters on a single backend are not supported by weft"),
            ));
        }
        let weight = u32::try_from(b.weight.unwrap_or(1)).map_err(|_| {
            problem(
                Reason::Invalid,
                format!("{b_at}.weight: must not be negative"),
            )
        })?;
        match backend_ref(index, "HTTPRoute", ns, &b.backend, weight, &b_at) {
            Ok(backend) => route.backends.push(backend),
            Err(r) => {
                route.unresolved_weight = route.unresolved_weight.saturating_add(weight);
                unresolved.push(r);
            }
        }
    }
    if route.redirect.is_none() {
        let resolved: u64 = route.backends.iter().map(|b| u64::from(b.weight)).sum();
        if resolved == 0 {
            // Nothing to forward to: every request of the rule gets 500.
            route.backends.clear();
            route.unresolved_weight = route.unresolved_weight.max(1);
        }
    }

    if let Some(t) = &rule.timeouts {
        let request = timeout(t.request.as_deref(), &format!("{at}.timeouts.request"))?;
        let backend = timeout(
            t.backend_request.as_deref(),
            &format!("{at}.timeouts.backendRequest"),
        )?;
        route.timeout_ms = match (request, backend) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    let default_match = [weft_api::gateway::HttpRouteMatch::default()];
    let matches = if rule.matches.is_empty() {
        &default_match[..]
    } else {
        &rule.matches[..]
    };
    let mut out = Vec::with_capacity(matches.len());
    for (j, m) in matches.iter().enumerate() {
        let m_at = format!("{at}.matches[{j}]");
        let (path, path_class) = match &m.path {
            None => (pc::PathMatch::Prefix("/".into()), 2),
            Some(p) => {
                let value = p.value.clone().unwrap_or_else(|| "/".into());
                match p.type_.as_deref().unwrap_or("PathPrefix") {
                    "Exact" | "PathPrefix" if !value.starts_with('/') => {
                        return Err(problem(
                            Reason::Invalid,
                            format!("{m_at}.path.value: {value:?} does not start with /"),
                        ));
                    }
                    "Exact" => (pc::PathMatch::Exact(value), 0),
                    "PathPrefix" => (pc::PathMatch::Prefix(value), 2),
                    "RegularExpression" => {
                        check_regex(&value, &format!("{m_at}.path.value"))?;
                        (pc::PathMatch::Regex(value), 1)
                    }
                    other => {
                        return Err(problem(
                            Reason::UnsupportedValue,
                            format!("{m_at}.path.type: {other:?} is not supported"),
                        ));
                    }
                }
            }
        };
        let path_len = match &path {
            pc::PathMatch::Exact(v) | pc::PathMatch::Prefix(v) | pc::PathMatch::Regex(v) => {
                v.trim_end_matches('/').len()
            }
        };
        let named = |list: &[weft_api::gateway::HttpValueMatch], kind: &str, lower: bool| {
            list.iter()
                .enumerate()
                .map(|(k, v)| {
                    let f = format!("{m_at}.{kind}[{k}]");
                    let value = match v.type_.as_deref().unwrap_or("Exact") {
                        "Exact" => pc::ValueMatch::Exact(v.value.clone()),
                        "RegularExpression" => {
                            check_regex(&v.value, &f)?;
                            pc::ValueMatch::Regex(v.value.clone())
                        }
                        other => {
                            return Err(problem(
                                Reason::UnsupportedValue,
                                format!("{f}.type: {other:?} is not supported"),
                            ));
                        }
                    };
                    if v.name.is_empty() {
                        return Err(problem(Reason::Invalid, format!("{f}: empty name")));
                    }
                    Ok(pc::NamedMatch {
                        name: if lower {
                            v.name.to_ascii_lowercase()
                        } else {
                            v.name.clone()
                        },
                        value,
                    })
                })
                .collect::<Result<Vec<_>, Problem>>()
        };
        let headers = named(&m.headers, "headers", true)?;
        let query_params = named(&m.query_params, "queryParams", false)?;
        let method = m.method.as_ref().map(|s| s.to_ascii_uppercase());
        let precedence = (
            path_class,
            Reverse(path_len),
            method.is_none(),
            Reverse(headers.len()),
            Reverse(query_params.len()),
        );
        let mut entry = route.clone();
        entry.matches = vec![pc::HttpMatch {
            path: Some(path),
            headers,
            query_params,
            method,
        }];
        out.push((precedence, entry));
    }
    Ok(out)
}

fn apply_filter(
    index: &Index,
    ns: &str,
    route: &mut pc::HttpRoute,
    f: &HttpRouteFilter,
    at: &str,
    unresolved: &mut Vec<(&'static str, String)>,
) -> Result<(), Problem> {
    let missing = |field: &str| {
        problem(
            Reason::Invalid,
            format!("{at}: type {} needs {field}", f.type_),
        )
    };
    match f.type_.as_str() {
        "RequestHeaderModifier" => {
            let m = f
                .request_header_modifier
                .as_ref()
                .ok_or_else(|| missing("requestHeaderModifier"))?;
            merge_ops(&mut route.request_headers, m);
        }
        "ResponseHeaderModifier" => {
            let m = f
                .response_header_modifier
                .as_ref()
                .ok_or_else(|| missing("responseHeaderModifier"))?;
            merge_ops(&mut route.response_headers, m);
        }
        "RequestRedirect" => {
            let r = f
                .request_redirect
                .as_ref()
                .ok_or_else(|| missing("requestRedirect"))?;
            if route.redirect.is_some() {
                return Err(problem(
                    Reason::Invalid,
                    format!("{at}: more than one RequestRedirect"),
                ));
            }
            let (path, path_prefix) =
                path_modifier(r.path.as_ref(), &format!("{at}.requestRedirect.path"))?;
            let status = r.status_code.unwrap_or(302);
            let status = u16::try_from(status)
                .ok()
                .filter(|s| [301, 302, 303, 307, 308].contains(s))
                .ok_or_else(|| {
                    problem(
                        Reason::UnsupportedValue,
                        format!(
                            "{at}.requestRedirect.statusCode: {status} is not a redirect status"
                        ),
                    )
                })?;
            let scheme = match r.scheme.as_deref() {
                None => None,
                Some(s @ ("http" | "https")) => Some(s.to_owned()),
                Some(other) => {
                    return Err(problem(
                        Reason::UnsupportedValue,
                        format!("{at}.requestRedirect.scheme: {other:?} is not http or https"),
                    ));
                }
            };
            let port = r
                .port
                .map(|p| {
                    u16::try_from(p).ok().filter(|p| *p > 0).ok_or_else(|| {
                        problem(
                            Reason::Invalid,
                            format!("{at}.requestRedirect.port: {p} is not a port"),
                        )
                    })
                })
                .transpose()?;
            route.redirect = Some(pc::Redirect {
                scheme,
                host: r.hostname.clone(),
                port,
                path,
                path_prefix,
                status,
            });
        }
        "URLRewrite" => {
            let r = f
                .url_rewrite
                .as_ref()
                .ok_or_else(|| missing("urlRewrite"))?;
            if route.rewrite.is_some() {
                return Err(problem(
                    Reason::Invalid,
                    format!("{at}: more than one URLRewrite"),
                ));
            }
            let (path, path_prefix) =
                path_modifier(r.path.as_ref(), &format!("{at}.urlRewrite.path"))?;
            route.rewrite = Some(pc::Rewrite {
                path,
                path_prefix,
                authority: r.hostname.clone(),
            });
        }
        "RequestMirror" => {
            let m = f
                .request_mirror
                .as_ref()
                .ok_or_else(|| missing("requestMirror"))?;
            if route.mirror.is_some() {
                return Err(problem(
                    Reason::UnsupportedValue,
                    format!(
                        "{at}: weft mirrors a rule's requests to one backend; this is a second RequestMirror"
                    ),
                ));
            }
            let percent = match (&m.percent, &m.fraction) {
                (Some(p), _) => f64::from(*p),
                (None, Some(fr)) => {
                    let den = fr.denominator.unwrap_or(100);
                    if den <= 0 || fr.numerator < 0 || fr.numerator > den {
                        return Err(problem(
                            Reason::Invalid,
                            format!(
                                "{at}.requestMirror.fraction: {}/{den} is not a share",
                                fr.numerator
                            ),
                        ));
                    }
                    f64::from(fr.numerator) * 100.0 / f64::from(den)
                }
                (None, None) => 100.0,
            };
            if !(0.0..=100.0).contains(&percent) {
                return Err(problem(
                    Reason::Invalid,
                    format!("{at}.requestMirror.percent: {percent} is not a percentage"),
                ));
            }
            match backend_ref(
                index,
                "HTTPRoute",
                ns,
                &m.backend_ref,
                1,
                &format!("{at}.requestMirror.backendRef"),
            ) {
                Ok(backend) => route.mirror = Some(pc::Mirror { backend, percent }),
                Err(r) => unresolved.push(r),
            }
        }
        other => {
            return Err(problem(
                Reason::UnsupportedValue,
                format!("{at}: filter type {other:?} is not supported by weft"),
            ));
        }
    }
    Ok(())
}

fn merge_ops(ops: &mut pc::HeaderOps, m: &weft_api::gateway::HeaderModifier) {
    ops.set.extend(
        m.set
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.clone())),
    );
    ops.add.extend(
        m.add
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.clone())),
    );
    ops.remove
        .extend(m.remove.iter().map(|n| n.to_ascii_lowercase()));
}

/// `(full path, prefix replacement)` of a path modifier.
fn path_modifier(
    m: Option<&PathModifier>,
    at: &str,
) -> Result<(Option<String>, Option<String>), Problem> {
    let Some(m) = m else {
        return Ok((None, None));
    };
    match (
        m.type_.as_str(),
        &m.replace_full_path,
        &m.replace_prefix_match,
    ) {
        ("ReplaceFullPath", Some(p), _) => Ok((Some(p.clone()), None)),
        ("ReplacePrefixMatch", _, Some(p)) => Ok((None, Some(p.clone()))),
        (t, _, _) => Err(problem(
            Reason::UnsupportedValue,
            format!("{at}: type {t:?} without its value is not supported"),
        )),
    }
}

/// A Gateway API timeout in milliseconds; `0s` (or unset) is none.
fn timeout(value: Option<&str>, at: &str) -> Result<Option<u64>, Problem> {
    let Some(v) = value else { return Ok(None) };
    let d = weft_api::Duration::new(v)
        .to_std()
        .map_err(|e| problem(Reason::InvalidDuration, format!("{at}: {e}")))?;
    if d.is_zero() {
        return Ok(None);
    }
    Ok(Some(
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1),
    ))
}
