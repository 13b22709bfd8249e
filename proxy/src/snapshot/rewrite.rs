//! What a route rule does to the request it forwards or answers: the path
//! and authority rewrite ([`HttpRoute::rewrite`]) and a redirect's
//! `Location` ([`redirect_location`]). Pure functions of the compiled rule
//! and the request.
//!
//! In: a rule selected by [`super::routes::RouteTable::http`]. Out: the
//! request's new URI and Host, or the redirect target; applied by
//! `outbound::http`.

use http::{HeaderMap, Uri};
use weft_proxy_config as pc;

use super::routes::HttpRoute;

/// The path after replacing the `matched` prefix of `path` with
/// `replacement` (a trailing `/` of the replacement is not doubled).
fn replace_prefix(path: &str, matched: &str, replacement: &str) -> String {
    let rest = &path[matched.len().min(path.len())..];
    let base = replacement.trim_end_matches('/');
    match (base.is_empty(), rest.is_empty()) {
        (true, true) => "/".to_owned(),
        (true, false) => rest.to_owned(),
        (false, _) => format!("{base}{rest}"),
    }
}

impl HttpRoute {
    /// Applies the rule's path and authority rewrite to a request about to
    /// be forwarded. `prefix` is what the matching prefix condition matched.
    pub fn rewrite(&self, prefix: Option<&str>, uri: &mut Uri, headers: &mut HeaderMap) {
        let Some(rw) = &self.rewrite else { return };
        let path = uri.path();
        let new_path = match (&rw.path, &rw.path_prefix, prefix) {
            (Some(p), _, _) => Some(p.clone()),
            (None, Some(replacement), Some(matched)) => {
                Some(replace_prefix(path, matched, replacement))
            }
            _ => None,
        };
        let mut parts = uri.clone().into_parts();
        let mut changed = false;
        if let Some(p) = new_path {
            let pq = match uri.query() {
                Some(q) => format!("{p}?{q}"),
                None => p,
            };
            if let Ok(pq) = pq.parse() {
                parts.path_and_query = Some(pq);
                changed = true;
            }
        }
        if let Some(a) = &self.authority {
            headers.insert(http::header::HOST, a.clone());
            if parts.authority.is_some()
                && let Ok(auth) = a.to_str().unwrap_or("").parse()
            {
                parts.authority = Some(auth);
                changed = true;
            }
        }
        if changed && let Ok(u) = Uri::from_parts(parts) {
            *uri = u;
        }
    }
}

/// Where a request arrived, for what a redirect keeps: the scheme a
/// request in origin form was sent with, and the port of the listener that
/// took it (an ingress gateway's; the Gateway API keeps the listener port
/// when a redirect sets neither scheme nor port). A sidecar's outbound
/// requests arrive as `http`, and keep the port their `Host` names.
#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    /// `http` or `https`.
    pub scheme: &'static str,
    /// The listener's port; `None`: the `Host` header's.
    pub port: Option<u16>,
}

impl Arrival {
    /// A sidecar's outbound request.
    pub const SIDECAR: Arrival = Arrival {
        scheme: "http",
        port: None,
    };
}

/// The `Location` of a redirect for a request with `uri` and `headers`:
/// each part the rule does not set is kept from the request. `prefix` is
/// what the matching prefix condition matched (for `pathPrefix`).
pub fn redirect_location(
    r: &pc::Redirect,
    prefix: Option<&str>,
    uri: &Uri,
    headers: &HeaderMap,
    arrival: Arrival,
) -> String {
    let scheme_in = uri.scheme_str().unwrap_or(arrival.scheme);
    let scheme = r.scheme.as_deref().unwrap_or(scheme_in);
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let (host_in, port_in) = split_authority(&authority);
    let port_in = arrival.port.or(port_in);
    let host = r.host.as_deref().unwrap_or(host_in);
    // A new scheme without a port goes to that scheme's default port.
    let port = match (r.port, r.scheme.is_some() && scheme != scheme_in) {
        (Some(p), _) => Some(p),
        (None, true) => None,
        (None, false) => port_in,
    };
    let default_port = if scheme == "https" { 443 } else { 80 };
    let replaced = match (&r.path_prefix, prefix) {
        (Some(replacement), Some(matched)) => {
            Some(replace_prefix(uri.path(), matched, replacement))
        }
        _ => None,
    };
    let path = r
        .path
        .as_deref()
        .or(replaced.as_deref())
        .unwrap_or(uri.path());
    let mut loc = format!("{scheme}://{host}");
    if let Some(p) = port.filter(|p| *p != default_port) {
        loc.push_str(&format!(":{p}"));
    }
    loc.push_str(path);
    if let Some(q) = uri.query() {
        loc.push('?');
        loc.push_str(q);
    }
    loc
}

fn split_authority(a: &str) -> (&str, Option<u16>) {
    match a.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !p.contains(']') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (a, None),
        },
        _ => (a, None),
    }
}
