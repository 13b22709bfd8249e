//! Gateway API `HTTPRoute`s attached to Services (GAMMA): every supported
//! field's translation into `proxy.json`, the Gateway API's precedence
//! between rules, and each parent's `Accepted` / `ResolvedRefs` verdict.

// json! literals read naturally passed by value.
#![allow(clippy::needless_pass_by_value)]

mod render_support;

use pretty_assertions::assert_eq;
use render_support::*;
use serde_json::{Value, json};
use weft_operator::index::Kind;
use weft_operator::render::{CrStatus, ParentVerdict, RenderOutput};
use weft_proxy_config as pc;

fn http_route(ns: &str, name: &str, created: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"namespace": ns, "name": name, "generation": 3, "creationTimestamp": created},
        "spec": spec
    })
}

fn on_cart(rules: Value) -> Value {
    json!({"parentRefs": [{"group": "", "kind": "Service", "name": "cart", "port": 80}], "rules": rules})
}

fn grant(ns: &str, from_ns: &str, to_name: Option<&str>) -> Value {
    let mut to = json!({"group": "", "kind": "Service"});
    if let Some(n) = to_name {
        to["name"] = json!(n);
    }
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
        "metadata": {"namespace": ns, "name": format!("from-{from_ns}")},
        "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": from_ns}], "to": [to]}
    })
}

/// Namespace `other` with Service `api` (port 8080), meshed.
fn other() -> Vec<Value> {
    vec![
        ns("other", true),
        svc(
            "other",
            "api",
            "10.96.1.1",
            json!([{"name": "http", "port": 8080}]),
        ),
    ]
}

fn render_with(extra: Vec<Value>) -> RenderOutput {
    let mut objs = shop();
    objs.extend(extra);
    rendered(&index(objs), "shop")
}

fn status<'a>(out: &'a RenderOutput, name: &str) -> &'a CrStatus {
    out.statuses
        .iter()
        .find(|s| s.kind == Kind::HttpRoute && s.object.name == name)
        .unwrap_or_else(|| panic!("no status for HTTPRoute {name}: {:?}", out.statuses))
}

fn parent<'a>(out: &'a RenderOutput, name: &str) -> &'a ParentVerdict {
    let st = status(out, name);
    assert_eq!(st.parents.len(), 1, "{st:?}");
    &st.parents[0]
}

fn refused(out: &RenderOutput, name: &str) -> Option<&'static str> {
    parent(out, name).refused.as_ref().map(|(r, _)| *r)
}

fn unresolved(out: &RenderOutput, name: &str) -> Option<&'static str> {
    parent(out, name).unresolved.as_ref().map(|(r, _)| *r)
}

fn cart_routes(out: &RenderOutput) -> &[pc::HttpRoute] {
    &service(&out.config, "shop/cart").http_routes
}

fn backend(service: &str, port: u16, weight: u32) -> pc::Backend {
    pc::Backend {
        service: service.into(),
        subset: None,
        port: Some(port),
        weight,
    }
}

#[test]
fn every_supported_field_becomes_the_proxy_rule() {
    let route = http_route(
        "shop",
        "cart-routes",
        "2026-01-01T00:00:00Z",
        on_cart(json!([
            {
                "name": "api",
                "matches": [{
                    "path": {"type": "Exact", "value": "/api/exact"},
                    "headers": [{"type": "RegularExpression", "name": "X-Tier", "value": "gold|silver"}],
                    "queryParams": [{"name": "Debug", "value": "1"}],
                    "method": "GET"
                }],
                "filters": [
                    {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                        "set": [{"name": "X-Route", "value": "api"}],
                        "add": [{"name": "X-Added", "value": "1"}],
                        "remove": ["X-Internal"]
                    }},
                    {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"remove": ["Server"]}},
                    {"type": "URLRewrite", "urlRewrite": {
                        "hostname": "cart.internal",
                        "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}
                    }},
                    {"type": "RequestMirror", "requestMirror": {
                        "backendRef": {"name": "web", "port": 80},
                        "fraction": {"numerator": 1, "denominator": 4}
                    }}
                ],
                "backendRefs": [
                    {"name": "cart", "port": 80, "weight": 3},
                    {"name": "web", "port": 80}
                ],
                "timeouts": {"request": "2s", "backendRequest": "500ms"}
            },
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
                "filters": [{"type": "RequestRedirect", "requestRedirect": {
                    "scheme": "https", "hostname": "shop.example", "port": 8443, "statusCode": 301,
                    "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}
                }}]
            },
            {"backendRefs": [{"name": "web", "port": 80}], "timeouts": {"request": "0s"}}
        ])),
    );
    let out = render_with(vec![route]);
    let p = parent(&out, "cart-routes");
    assert_eq!((&p.refused, &p.unresolved), (&None, &None), "{p:?}");
    let routes = cart_routes(&out);
    assert_eq!(routes.len(), 3, "{routes:#?}");

    let api = pc::HttpRoute {
        name: "cart-routes/api".into(),
        port: Some(80),
        matches: vec![pc::HttpMatch {
            path: Some(pc::PathMatch::Exact("/api/exact".into())),
            headers: vec![pc::NamedMatch {
                name: "x-tier".into(),
                value: pc::ValueMatch::Regex("gold|silver".into()),
            }],
            query_params: vec![pc::NamedMatch {
                name: "Debug".into(),
                value: pc::ValueMatch::Exact("1".into()),
            }],
            method: Some("GET".into()),
        }],
        backends: vec![backend("shop/cart", 80, 3), backend("shop/web", 80, 1)],
        unresolved_weight: 0,
        timeout_ms: Some(500),
        retry: None,
        fault: None,
        mirror: Some(pc::Mirror {
            backend: backend("shop/web", 80, 1),
            percent: 25.0,
        }),
        request_headers: pc::HeaderOps {
            set: vec![("x-route".into(), "api".into())],
            add: vec![("x-added".into(), "1".into())],
            remove: vec!["x-internal".into()],
        },
        response_headers: pc::HeaderOps {
            remove: vec!["server".into()],
            ..pc::HeaderOps::default()
        },
        rewrite: Some(pc::Rewrite {
            path: None,
            path_prefix: Some("/v2".into()),
            authority: Some("cart.internal".into()),
        }),
        redirect: None,
    };
    assert_eq!(routes[0], api);

    assert_eq!(routes[1].name, "cart-routes/1");
    assert_eq!(
        routes[1].matches[0].path,
        Some(pc::PathMatch::Prefix("/old".into()))
    );
    assert_eq!(
        routes[1].redirect,
        Some(pc::Redirect {
            scheme: Some("https".into()),
            host: Some("shop.example".into()),
            port: Some(8443),
            path: None,
            path_prefix: Some("/new".into()),
            status: 301,
        })
    );
    assert!(routes[1].backends.is_empty() && routes[1].unresolved_weight == 0);

    // No matches: PathPrefix /; `0s`: no timeout.
    assert_eq!(routes[2].name, "cart-routes/2");
    assert_eq!(
        routes[2].matches,
        vec![pc::HttpMatch {
            path: Some(pc::PathMatch::Prefix("/".into())),
            ..Default::default()
        }]
    );
    assert_eq!(routes[2].backends, vec![backend("shop/web", 80, 1)]);
    assert_eq!(routes[2].timeout_ms, None);
}

#[test]
fn rules_of_every_route_follow_the_gateway_api_precedence() {
    let prefix = |p: &str, extra: Value| {
        let mut m = json!({"path": {"type": "PathPrefix", "value": p}});
        if let Value::Object(o) = extra {
            for (k, v) in o {
                m[k] = v;
            }
        }
        m
    };
    let rule = |m: Value| json!({"matches": [m], "backendRefs": [{"name": "cart", "port": 80}]});
    let newer = http_route(
        "shop",
        "b-newer",
        "2026-02-01T00:00:00Z",
        on_cart(json!([
            rule(prefix("/api", json!({}))),
            rule(prefix("/api/v1/items", json!({}))),
            rule(json!({"path": {"type": "Exact", "value": "/api"}})),
        ])),
    );
    let older = http_route(
        "shop",
        "a-older",
        "2026-01-01T00:00:00Z",
        on_cart(json!([
            rule(prefix("/api", json!({}))),
            rule(prefix("/api", json!({"method": "POST"}))),
            rule(prefix(
                "/api",
                json!({"headers": [{"name": "a", "value": "1"}, {"name": "b", "value": "2"}]})
            )),
            rule(prefix(
                "/api",
                json!({"headers": [{"name": "a", "value": "1"}]})
            )),
            rule(prefix(
                "/api",
                json!({"queryParams": [{"name": "q", "value": "1"}]})
            )),
            rule(json!({"path": {"type": "RegularExpression", "value": "/api/[0-9]+"}})),
        ])),
    );
    let out = render_with(vec![newer, older]);
    let names: Vec<&str> = cart_routes(&out).iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "b-newer/2", // exact path
            "a-older/5", // regular expression
            "b-newer/1", // the longest prefix
            "a-older/1", // a method
            "a-older/2", // two header matches
            "a-older/3", // one header match
            "a-older/4", // a query match
            "a-older/0", // a tie: the older route
            "b-newer/0",
        ]
    );
}

#[test]
fn parents_that_do_not_match_are_not_accepted() {
    let mut spec = on_cart(json!([{"backendRefs": [{"name": "cart", "port": 80}]}]));
    spec["parentRefs"] = json!([
        {"group": "", "kind": "Service", "name": "nope"},
        {"group": "", "kind": "Service", "name": "cart", "port": 81},
        {"group": "", "kind": "Service", "name": "cart", "sectionName": "grpc"},
        {"group": "", "kind": "Service", "name": "api", "namespace": "other"},
        {"group": "", "kind": "Service", "name": "web", "sectionName": "http"},
        {"name": "some-gateway"}
    ]);
    let mut objs = other();
    objs.push(http_route("shop", "r", "2026-01-01T00:00:00Z", spec));
    let out = render_with(objs);
    let st = status(&out, "r");
    let verdicts: Vec<(&str, Option<&str>)> = st
        .parents
        .iter()
        .map(|p| (p.parent.name.as_str(), p.refused.as_ref().map(|(r, _)| *r)))
        .collect();
    assert_eq!(
        verdicts,
        [
            ("nope", Some("NoMatchingParent")),
            ("cart", Some("NoMatchingParent")),
            ("cart", Some("NoMatchingParent")),
            ("api", Some("UnsupportedValue")),
            ("web", None),
        ],
        "a Gateway parent is not the mesh's to judge"
    );
    assert!(cart_routes(&out).is_empty());
    let web = &service(&out.config, "shop/web").http_routes;
    assert_eq!(web.len(), 1);
    assert_eq!(web[0].port, Some(80), "sectionName http is port 80");
}

#[test]
fn unresolved_backends_keep_their_share_as_500() {
    let out = render_with(vec![
        http_route(
            "shop",
            "missing",
            "2026-01-01T00:00:00Z",
            on_cart(json!([{"backendRefs": [
                {"name": "cart", "port": 80, "weight": 1},
                {"name": "gone", "port": 80, "weight": 3}
            ]}])),
        ),
        http_route(
            "shop",
            "kind",
            "2026-01-01T00:00:00Z",
            json!({
                "parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
                "rules": [{"backendRefs": [{"group": "example.com", "kind": "Bucket", "name": "b"}]}]
            }),
        ),
    ]);
    assert_eq!(refused(&out, "missing"), None);
    assert_eq!(unresolved(&out, "missing"), Some("BackendNotFound"));
    let r = &cart_routes(&out)[0];
    assert_eq!(r.backends, vec![backend("shop/cart", 80, 1)]);
    assert_eq!(r.unresolved_weight, 3);

    assert_eq!(unresolved(&out, "kind"), Some("InvalidKind"));
    let web = &service(&out.config, "shop/web").http_routes[0];
    assert!(web.backends.is_empty());
    assert_eq!(web.unresolved_weight, 1, "every request answered 500");
}

#[test]
fn a_rule_without_backends_answers_500() {
    let out = render_with(vec![http_route(
        "shop",
        "empty",
        "2026-01-01T00:00:00Z",
        on_cart(json!([{"matches": [{"path": {"type": "PathPrefix", "value": "/x"}}]}])),
    )]);
    assert_eq!(unresolved(&out, "empty"), None);
    let r = &cart_routes(&out)[0];
    assert!(r.backends.is_empty());
    assert_eq!(r.unresolved_weight, 1);
}

#[test]
fn another_namespace_needs_a_reference_grant() {
    let rules =
        on_cart(json!([{"backendRefs": [{"name": "api", "namespace": "other", "port": 8080}]}]));
    let mut objs = other();
    objs.push(http_route(
        "shop",
        "cross",
        "2026-01-01T00:00:00Z",
        rules.clone(),
    ));
    let out = render_with(objs.clone());
    assert_eq!(unresolved(&out, "cross"), Some("RefNotPermitted"));
    assert!(cart_routes(&out)[0].backends.is_empty());

    // A grant for another Service, or from another namespace: still not.
    let mut wrong = objs.clone();
    wrong.push(grant("other", "shop", Some("db")));
    wrong.push(grant("other", "elsewhere", None));
    assert_eq!(
        unresolved(&render_with(wrong), "cross"),
        Some("RefNotPermitted")
    );

    let mut granted = objs;
    granted.push(grant("other", "shop", Some("api")));
    let idx = {
        let mut all = shop();
        all.extend(granted);
        index(all)
    };
    let out = rendered(&idx, "shop");
    assert_eq!(unresolved(&out, "cross"), None);
    assert_eq!(
        cart_routes(&out)[0].backends,
        vec![backend("other/api", 8080, 1)]
    );
    // Every namespace that sees shop/cart gets the route, including one
    // whose scope leaves `other` out: its proxy answers that share 500.
    let mut scoped = ns("scoped", true);
    scoped["metadata"]["annotations"] = json!({"weft.dev/visible-namespaces": "shop"});
    let mut idx = idx;
    idx.apply(object(scoped));
    let out = rendered(&idx, "scoped");
    assert!(!has_service(&out.config, "other/api"));
    assert_eq!(
        service(&out.config, "shop/cart").http_routes[0].backends,
        vec![backend("other/api", 8080, 1)]
    );
}

#[test]
fn unsupported_or_incompatible_filters_reject_the_route_and_render_nothing() {
    let out = render_with(vec![
        http_route(
            "shop",
            "ext",
            "2026-01-01T00:00:00Z",
            on_cart(json!([{
                "filters": [{"type": "ExtensionRef", "extensionRef": {"group": "x", "kind": "Y", "name": "z"}}],
                "backendRefs": [{"name": "cart", "port": 80}]
            }])),
        ),
        http_route(
            "shop",
            "both",
            "2026-01-01T00:00:00Z",
            json!({
                "parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
                "rules": [{"filters": [
                    {"type": "RequestRedirect", "requestRedirect": {"scheme": "https"}},
                    {"type": "URLRewrite", "urlRewrite": {"hostname": "x"}}
                ]}]
            }),
        ),
        http_route(
            "shop",
            "per-backend",
            "2026-01-01T00:00:00Z",
            json!({
                "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                "rules": [{"backendRefs": [{"name": "web", "port": 80, "filters": [
                    {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "a", "value": "b"}]}}
                ]}]}]
            }),
        ),
    ]);
    assert_eq!(refused(&out, "ext"), Some("UnsupportedValue"));
    assert_eq!(refused(&out, "both"), Some("IncompatibleFilters"));
    assert_eq!(refused(&out, "per-backend"), Some("UnsupportedValue"));
    assert!(!status(&out, "ext").accepted());
    assert!(cart_routes(&out).is_empty());
    assert!(service(&out.config, "shop/web").http_routes.is_empty());
    assert!(
        parent(&out, "ext").refused.as_ref().is_some_and(
            |(_, m)| m.contains("ExtensionRef") && m.contains("nothing of it is rendered")
        ),
        "{:?}",
        parent(&out, "ext")
    );
}

#[test]
fn a_service_route_on_the_same_port_wins() {
    let out = render_with(vec![
        route(
            "shop",
            "native",
            json!({"service": "cart", "http": [{"name": "only", "timeout": "1s"}]}),
        ),
        http_route(
            "shop",
            "portable",
            "2025-01-01T00:00:00Z",
            on_cart(json!([{"backendRefs": [{"name": "web", "port": 80}]}])),
        ),
        http_route(
            "shop",
            "on-web",
            "2025-01-01T00:00:00Z",
            json!({
                "parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
                "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]
            }),
        ),
    ]);
    assert_eq!(refused(&out, "portable"), Some("Conflicted"));
    let names: Vec<&str> = cart_routes(&out).iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["native/only"]);
    assert_eq!(refused(&out, "on-web"), None);
    assert_eq!(service(&out.config, "shop/web").http_routes.len(), 1);
}

#[test]
fn a_rejected_route_keeps_rendering_its_last_accepted_generation() {
    let good = http_route(
        "shop",
        "r",
        "2026-01-01T00:00:00Z",
        on_cart(json!([{"backendRefs": [{"name": "web", "port": 80}]}])),
    );
    let mut objs = shop();
    objs.push(good);
    let mut idx = index(objs);
    let first = rendered(&idx, "shop");
    let st = status(&first, "r");
    assert!(st.accepted());
    idx.record_accepted(Kind::HttpRoute, &st.object, st.generation);

    let mut bad = http_route(
        "shop",
        "r",
        "2026-01-01T00:00:00Z",
        on_cart(
            json!([{"filters": [{"type": "CORS"}], "backendRefs": [{"name": "cart", "port": 80}]}]),
        ),
    );
    bad["metadata"]["generation"] = json!(4);
    idx.apply(object(bad));
    let out = rendered(&idx, "shop");
    assert_eq!(refused(&out, "r"), Some("UnsupportedValue"));
    assert!(
        parent(&out, "r")
            .refused
            .as_ref()
            .is_some_and(|(_, m)| m.contains("still rendering generation 3")),
        "{:?}",
        parent(&out, "r")
    );
    assert_eq!(
        cart_routes(&out)[0].backends,
        vec![backend("shop/web", 80, 1)],
        "the last accepted rules stay"
    );
}

#[test]
fn weftctl_render_reads_http_routes_and_grants() {
    let text = format!(
        "{}\n---\n{}\n---\n{}",
        serde_json::to_string(&http_route(
            "shop",
            "r",
            "2026-01-01T00:00:00Z",
            on_cart(json!([{"backendRefs": [{"name": "api", "namespace": "other", "port": 8080}]}]))
        ))
        .expect("json"),
        serde_json::to_string(&grant("other", "shop", None)).expect("json"),
        serde_json::to_string(&json!({"kind": "List", "apiVersion": "v1", "items": other().into_iter().chain(shop()).collect::<Vec<_>>()})).expect("json"),
    );
    let objects = weft_operator::render::parse_yaml(&text).expect("parses");
    let out = weft_operator::render::render_offline(objects).expect("renders");
    assert!(out.ignored.is_empty(), "{:?}", out.ignored);
    let shop = &out.configs["shop"];
    assert_eq!(
        service(shop, "shop/cart").http_routes[0].backends,
        vec![backend("other/api", 8080, 1)]
    );
}
