//! Gateways of weft's class: the gateway proxy's document (listeners,
//! virtual hosts by the Gateway API's host name rules, routes from several
//! namespaces), the listeners' verdicts, and the verdicts on the routes
//! that name them.

// json! literals read naturally passed by value.
#![allow(clippy::needless_pass_by_value, clippy::type_complexity)]

mod render_support;

use pretty_assertions::assert_eq;
use render_support::*;
use serde_json::{Value, json};
use weft_operator::index::{Index, Kind};
use weft_operator::render::gateway::{GatewayRender, render_gateway};
use weft_operator::render::{ParentVerdict, RenderOutput};
use weft_proxy_config as pc;

fn class(name: &str, controller: &str) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
        "metadata": {"name": name},
        "spec": {"controllerName": controller}
    })
}

fn gateway(ns: &str, name: &str, class: &str, listeners: Value) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"namespace": ns, "name": name, "generation": 2},
        "spec": {"gatewayClassName": class, "listeners": listeners}
    })
}

fn http_route(ns: &str, name: &str, created: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"namespace": ns, "name": name, "generation": 1, "creationTimestamp": created},
        "spec": spec
    })
}

/// `shop` (meshed, from the fixtures), `other` (meshed, Service `api`),
/// `plain` (not meshed, Service `legacy`), weft's class `weft`, another
/// class `nginx`, and Gateway `shop/public`: HTTP on 80 (routes of `shop`
/// only), HTTPS on 443 for `*.example.com` (routes of every namespace).
fn cluster(extra: Vec<Value>) -> Index {
    let mut objs = shop();
    objs.extend([
        ns("other", true),
        svc(
            "other",
            "api",
            "10.96.1.1",
            json!([{"name": "http", "port": 8080}]),
        ),
        ns("plain", false),
        svc(
            "plain",
            "legacy",
            "10.96.2.1",
            json!([{"name": "http", "port": 9000}]),
        ),
        class("weft", "weft.dev/gateway-controller"),
        class("nginx", "example.com/nginx"),
        gateway(
            "shop",
            "public",
            "weft",
            json!([
                {"name": "http", "port": 80, "protocol": "HTTP"},
                {"name": "https", "port": 443, "protocol": "HTTPS", "hostname": "*.example.com",
                 "tls": {"certificateRefs": [{"name": "wild-cert"}]},
                 "allowedRoutes": {"namespaces": {"from": "All"}}}
            ]),
        ),
    ]);
    objs.extend(extra);
    index(objs)
}

fn rendered_gateway(idx: &Index, name: &str) -> GatewayRender {
    let out = render_gateway(idx, "shop", name, &|ns, s| ns == "shop" && s == "wild-cert")
        .expect("a weft Gateway");
    out.config
        .validate()
        .expect("the gateway's document validates");
    out
}

fn listener<'a>(cfg: &'a pc::ProxyConfig, name: &str) -> &'a pc::Listener {
    cfg.gateway
        .as_ref()
        .expect("gateway section")
        .listeners
        .iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("listener {name}"))
}

/// Route names of the virtual host `host` of listener `l`.
fn vhost_routes(cfg: &pc::ProxyConfig, l: &str, host: Option<&str>) -> Vec<String> {
    let h = listener(cfg, l)
        .hosts
        .iter()
        .find(|h| h.hostname.as_deref() == host)
        .unwrap_or_else(|| panic!("host {host:?} of {l}"));
    service(cfg, &h.service)
        .http_routes
        .iter()
        .map(|r| r.name.clone())
        .collect()
}

fn parents(out: &RenderOutput, route: &str) -> Vec<ParentVerdict> {
    out.statuses
        .iter()
        .find(|s| s.kind == Kind::HttpRoute && s.object.name == route)
        .map(|s| s.parents.clone())
        .unwrap_or_default()
}

fn site() -> Value {
    http_route(
        "shop",
        "site",
        "2026-01-01T00:00:00Z",
        json!({
            "parentRefs": [{"name": "public"}],
            "hostnames": ["a.example.com"],
            "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]
        }),
    )
}

fn any_host() -> Value {
    http_route(
        "other",
        "any",
        "2026-01-02T00:00:00Z",
        json!({
            "parentRefs": [{"name": "public", "namespace": "shop", "sectionName": "https"}],
            "rules": [
                {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                 "backendRefs": [{"name": "api", "port": 8080}]},
                {"backendRefs": [{"name": "legacy", "namespace": "plain", "port": 9000}]}
            ]
        }),
    )
}

#[test]
fn listeners_route_by_host_name_with_routes_of_several_namespaces() {
    let grant = json!({
        "apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
        "metadata": {"namespace": "plain", "name": "from-other"},
        "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "other"}],
                 "to": [{"group": "", "kind": "Service"}]}
    });
    let idx = cluster(vec![site(), any_host(), grant]);
    let out = rendered_gateway(&idx, "public");
    let cfg = &out.config;
    assert_eq!(out.refused, None);
    assert_eq!(out.certificates, ["wild-cert"]);
    assert_eq!(
        out.ports,
        [("http".to_owned(), 80), ("https".to_owned(), 443)]
    );
    assert_eq!(
        cfg.gateway.as_ref().map(|g| g.name.as_str()),
        Some("shop/public")
    );

    let http = listener(cfg, "http");
    assert_eq!(http.protocol, pc::ListenerProtocol::Http);
    let hosts: Vec<Option<&str>> = http.hosts.iter().map(|h| h.hostname.as_deref()).collect();
    assert_eq!(
        hosts,
        [Some("a.example.com")],
        "only site: HTTP takes routes of shop only"
    );
    assert_eq!(
        vhost_routes(cfg, "http", Some("a.example.com")),
        ["shop/site/0"]
    );

    let https = listener(cfg, "https");
    assert_eq!(https.certificates, ["wild-cert"]);
    let hosts: Vec<Option<&str>> = https.hosts.iter().map(|h| h.hostname.as_deref()).collect();
    assert_eq!(hosts, [Some("a.example.com"), Some("*.example.com")]);
    // a.example.com: site's rule first (its exact host name), then any's
    // (the listener's wildcard), in path precedence.
    assert_eq!(
        vhost_routes(cfg, "https", Some("a.example.com")),
        ["shop/site/0", "other/any/0", "other/any/1"]
    );
    assert_eq!(
        vhost_routes(cfg, "https", Some("*.example.com")),
        ["other/any/0", "other/any/1"]
    );
    // The backend of a namespace outside the mesh is listed, so the
    // gateway reaches it (plainly: it has no proxy).
    assert!(has_service(cfg, "plain/legacy"));
    let any = &service(cfg, &https.hosts[1].service).http_routes[1];
    assert_eq!(any.backends[0].service, "plain/legacy");

    let verdicts: Vec<Vec<(&str, Option<&str>)>> = {
        let shop_out = rendered(&idx, "shop");
        let other_out = rendered(&idx, "other");
        [parents(&shop_out, "site"), parents(&other_out, "any")]
            .iter()
            .map(|ps| {
                ps.iter()
                    .map(|p| (p.controller, p.refused.as_ref().map(|(r, _)| *r)))
                    .collect()
            })
            .collect()
    };
    assert_eq!(
        verdicts,
        [
            vec![("weft.dev/gateway-controller", None)],
            vec![("weft.dev/gateway-controller", None)]
        ]
    );
    let attached: Vec<(&str, i32)> = out
        .listeners
        .iter()
        .map(|l| (l.name.as_str(), l.attached))
        .collect();
    assert_eq!(attached, [("http", 1), ("https", 2)]);
}

#[test]
fn routes_that_do_not_fit_a_listener_are_refused_with_the_reason() {
    let idx = cluster(vec![
        ns("elsewhere", true),
        http_route(
            "elsewhere",
            "wrong-host",
            "2026-01-01T00:00:00Z",
            json!({"parentRefs": [{"name": "public", "namespace": "shop"}], "hostnames": ["x.org"], "rules": [{}]}),
        ),
        http_route(
            "elsewhere",
            "http-only",
            "2026-01-01T00:00:00Z",
            json!({"parentRefs": [{"name": "public", "namespace": "shop", "sectionName": "http"}], "rules": [{}]}),
        ),
        http_route(
            "shop",
            "no-section",
            "2026-01-01T00:00:00Z",
            json!({"parentRefs": [{"name": "public", "sectionName": "nope"}], "rules": [{}]}),
        ),
        http_route(
            "shop",
            "theirs",
            "2026-01-01T00:00:00Z",
            json!({"parentRefs": [{"name": "internal"}], "rules": [{}]}),
        ),
        gateway(
            "shop",
            "internal",
            "nginx",
            json!([{"name": "http", "port": 80, "protocol": "HTTP"}]),
        ),
    ]);
    let elsewhere = rendered(&idx, "elsewhere");
    let reason = |out: &RenderOutput, r: &str| {
        parents(out, r)
            .first()
            .and_then(|p| p.refused.as_ref().map(|(reason, _)| *reason))
    };
    assert_eq!(
        reason(&elsewhere, "wrong-host"),
        Some("NoMatchingListenerHostname")
    );
    assert_eq!(
        reason(&elsewhere, "http-only"),
        Some("NotAllowedByListeners")
    );
    let shop_out = rendered(&idx, "shop");
    assert_eq!(reason(&shop_out, "no-section"), Some("NoMatchingParent"));
    assert!(
        parents(&shop_out, "theirs").is_empty(),
        "a Gateway of another class is not weft's to judge"
    );
    assert!(render_gateway(&idx, "shop", "internal", &|_, _| true).is_none());
    let out = rendered_gateway(&idx, "public");
    assert!(
        out.listeners.iter().all(|l| l.attached == 0),
        "{:?}",
        out.listeners
    );
}

#[test]
fn listener_verdicts() {
    let idx = cluster(vec![gateway(
        "shop",
        "edge",
        "weft",
        json!([
            {"name": "tcp", "port": 5432, "protocol": "TCP"},
            {"name": "no-secret", "port": 8443, "protocol": "HTTPS", "tls": {"certificateRefs": [{"name": "missing"}]}},
            {"name": "foreign", "port": 9443, "protocol": "HTTPS", "tls": {"certificateRefs": [{"name": "c", "namespace": "other"}]}},
            {"name": "a", "port": 8080, "protocol": "HTTP"},
            {"name": "b", "port": 8080, "protocol": "HTTPS", "hostname": "b.example.com",
             "tls": {"certificateRefs": [{"name": "wild-cert"}]}},
            {"name": "grpc-only", "port": 8081, "protocol": "HTTP",
             "allowedRoutes": {"kinds": [{"kind": "GRPCRoute"}]}},
            {"name": "ok", "port": 8082, "protocol": "HTTP"}
        ]),
    )]);
    let out = rendered_gateway(&idx, "edge");
    let summary: Vec<(&str, Option<&str>, Option<&str>, Option<&str>)> = out
        .listeners
        .iter()
        .map(|l| {
            (
                l.name.as_str(),
                l.refused.as_ref().map(|r| r.0),
                l.unresolved.as_ref().map(|r| r.0),
                l.conflicted.as_ref().map(|r| r.0),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("tcp", Some("UnsupportedProtocol"), None, None),
            ("no-secret", None, Some("InvalidCertificateRef"), None),
            ("foreign", None, Some("RefNotPermitted"), None),
            ("a", None, None, Some("ProtocolConflict")),
            ("b", None, None, Some("ProtocolConflict")),
            ("grpc-only", None, Some("InvalidRouteKinds"), None),
            ("ok", None, None, None),
        ]
    );
    assert_eq!(out.refused, None, "one listener is served");
    let served: Vec<&str> = out
        .config
        .gateway
        .as_ref()
        .map(|g| g.listeners.iter().map(|l| l.name.as_str()).collect())
        .unwrap_or_default();
    assert_eq!(served, ["ok"]);
    assert!(out.certificates.is_empty(), "{:?}", out.certificates);
}

#[test]
fn weftctl_render_writes_the_gateway_document() {
    let docs: Vec<Value> = vec![
        ns("shop", true),
        svc("shop", "web", "10.96.0.11", http_port()),
        class("weft", "weft.dev/gateway-controller"),
        gateway(
            "shop",
            "public",
            "weft",
            json!([
                {"name": "http", "port": 80, "protocol": "HTTP"},
                {"name": "tls", "port": 443, "protocol": "TLS", "tls": {"mode": "Passthrough"}}
            ]),
        ),
        http_route(
            "shop",
            "site",
            "2026-01-01T00:00:00Z",
            json!({"parentRefs": [{"name": "public"}], "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}),
        ),
        tls_route(
            "shop",
            "secure",
            "2026-01-01T00:00:00Z",
            json!({"parentRefs": [{"name": "public"}], "hostnames": ["web.example.com"],
                   "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}),
        ),
    ];
    let text = docs
        .iter()
        .map(|d| serde_json::to_string(d).expect("json"))
        .collect::<Vec<_>>()
        .join("\n---\n");
    let objects = weft_operator::render::parse_yaml(&text).expect("parses");
    let out = weft_operator::render::render_offline(objects).expect("renders");
    assert!(out.ignored.is_empty(), "{:?}", out.ignored);
    let g = &out.gateways["shop/public"];
    assert_eq!(g.refused, None);
    let cfg = &g.config;
    cfg.validate().expect("validates");
    assert_eq!(vhost_routes(cfg, "http", None), ["shop/site/0"]);
    // The TLSRoute (v1alpha2) is read offline too.
    let tls = listener(cfg, "tls");
    assert_eq!(tls.protocol, pc::ListenerProtocol::Tls);
    assert_eq!(tls.hosts[0].hostname.as_deref(), Some("web.example.com"));
    let routes: Vec<&str> = service(cfg, &tls.hosts[0].service)
        .tcp_routes
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(routes, ["shop/secure"]);
}

fn tls_route(ns: &str, name: &str, created: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TLSRoute",
        "metadata": {"namespace": ns, "name": name, "generation": 1, "creationTimestamp": created},
        "spec": spec
    })
}

fn tls_parents(out: &RenderOutput, route: &str) -> Vec<ParentVerdict> {
    out.statuses
        .iter()
        .find(|s| s.kind == Kind::TlsRoute && s.object.name == route)
        .map(|s| s.parents.clone())
        .unwrap_or_default()
}

/// TLS passthrough: a `TLS` listener in `Passthrough` mode takes
/// `TLSRoute`s; per SNI host name the oldest route wins and its weighted
/// backends become the TCP route of the host's Service; a TLS listener
/// that would terminate is refused; an HTTPRoute cannot attach to it nor a
/// TLSRoute to an HTTP listener; a backend of another namespace needs a
/// ReferenceGrant that names TLSRoute.
#[test]
fn tls_passthrough_listeners_route_sni_host_names_by_tls_routes() {
    let idx = cluster(vec![
        gateway(
            "shop",
            "edge",
            "weft",
            json!([
                {"name": "tls", "port": 8443, "protocol": "TLS", "hostname": "*.example.com",
                 "tls": {"mode": "Passthrough"},
                 "allowedRoutes": {"namespaces": {"from": "All"}}},
                {"name": "terminate", "port": 9443, "protocol": "TLS"},
                {"name": "http", "port": 80, "protocol": "HTTP"},
                {"name": "wrong-kinds", "port": 7443, "protocol": "TLS", "tls": {"mode": "Passthrough"},
                 "allowedRoutes": {"kinds": [{"kind": "HTTPRoute"}]}}
            ]),
        ),
        tls_route(
            "shop",
            "vault",
            "2026-01-01T00:00:00Z",
            json!({
                "parentRefs": [{"name": "edge", "sectionName": "tls"}],
                "hostnames": ["vault.example.com"],
                "rules": [{"backendRefs": [
                    {"name": "cart", "port": 80, "weight": 3},
                    {"name": "web", "port": 80}
                ]}]
            }),
        ),
        // Newer, same host name: the older route keeps it.
        tls_route(
            "shop",
            "vault-late",
            "2026-02-01T00:00:00Z",
            json!({
                "parentRefs": [{"name": "edge"}],
                "hostnames": ["vault.example.com"],
                "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]
            }),
        ),
        // Any other name under the listener's, to another namespace
        // without a grant for TLSRoutes (there is one for HTTPRoutes).
        tls_route(
            "shop",
            "rest",
            "2026-01-01T00:00:00Z",
            json!({
                "parentRefs": [{"name": "edge", "sectionName": "tls"}],
                "rules": [{"backendRefs": [{"name": "api", "namespace": "other", "port": 8080}]}]
            }),
        ),
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
            "metadata": {"namespace": "other", "name": "http-only"},
            "spec": {
                "from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "shop"}],
                "to": [{"group": "", "kind": "Service"}]
            }
        }),
        tls_route(
            "shop",
            "on-http",
            "2026-01-01T00:00:00Z",
            json!({"parentRefs": [{"name": "edge", "sectionName": "http"}], "rules": [{}]}),
        ),
        http_route(
            "shop",
            "http-on-tls",
            "2026-01-01T00:00:00Z",
            json!({"parentRefs": [{"name": "edge", "sectionName": "tls"}], "rules": [{}]}),
        ),
    ]);
    let out = rendered_gateway(&idx, "edge");
    let summary: Vec<(&str, Option<&str>, Option<&str>, Vec<&str>, i32)> = out
        .listeners
        .iter()
        .map(|l| {
            (
                l.name.as_str(),
                l.refused.as_ref().map(|r| r.0),
                l.unresolved.as_ref().map(|r| r.0),
                l.kinds.clone(),
                l.attached,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("tls", None, None, vec!["TLSRoute"], 3),
            // vault-late names no section: it attaches here too (the
            // count follows allowedRoutes and parentRefs alone).
            (
                "terminate",
                Some("UnsupportedProtocol"),
                None,
                vec!["TLSRoute"],
                1
            ),
            ("http", None, None, vec!["HTTPRoute"], 0),
            ("wrong-kinds", None, Some("InvalidRouteKinds"), vec![], 0),
        ]
    );

    let l = listener(&out.config, "tls");
    assert_eq!(l.protocol, pc::ListenerProtocol::Tls);
    assert!(l.certificates.is_empty());
    let hosts: Vec<Option<&str>> = l.hosts.iter().map(|h| h.hostname.as_deref()).collect();
    assert_eq!(hosts, [Some("vault.example.com"), Some("*.example.com")]);
    let vault = service(&out.config, &l.hosts[0].service);
    assert!(vault.http_routes.is_empty());
    assert_eq!(vault.ports[0].protocol, pc::Protocol::Opaque);
    assert_eq!(vault.ports[0].port, 8443);
    let tcp: Vec<(String, Vec<(String, u32)>)> = vault
        .tcp_routes
        .iter()
        .map(|r| {
            (
                r.name.clone(),
                r.backends
                    .iter()
                    .map(|b| (b.service.clone(), b.weight))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        tcp,
        [(
            "shop/vault".to_owned(),
            vec![("shop/cart".to_owned(), 3), ("shop/web".to_owned(), 1)]
        )]
    );
    // No backend of `rest` resolves: its host name's connections are closed.
    assert!(
        service(&out.config, &l.hosts[1].service)
            .tcp_routes
            .is_empty()
    );
    assert!(out.ports.contains(&("tls".to_owned(), 8443)));

    let shop_out = rendered(&idx, "shop");
    let verdict = |r: &str| {
        tls_parents(&shop_out, r).first().map(|p| {
            (
                p.controller,
                p.refused.as_ref().map(|x| x.0),
                p.unresolved.as_ref().map(|x| x.0),
            )
        })
    };
    assert_eq!(
        verdict("vault"),
        Some(("weft.dev/gateway-controller", None, None))
    );
    assert_eq!(
        verdict("rest"),
        Some(("weft.dev/gateway-controller", None, Some("RefNotPermitted")))
    );
    assert_eq!(
        verdict("on-http"),
        Some((
            "weft.dev/gateway-controller",
            Some("NotAllowedByListeners"),
            None
        ))
    );
    let http_on_tls = parents(&shop_out, "http-on-tls");
    assert_eq!(
        http_on_tls[0].refused.as_ref().map(|r| r.0),
        Some("NotAllowedByListeners")
    );
}
