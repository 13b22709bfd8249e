//! Verdicts: what is rejected, why, and that a rejection never breaks the
//! rest of the namespace's config.

mod render_support;

use render_support::*;
use serde_json::{Value, json};
use weft_operator::index::{Kind, ObjectRef};
use weft_operator::render::{CrStatus, Reason, RenderOutput};

fn status<'a>(out: &'a RenderOutput, kind: Kind, name: &str) -> &'a CrStatus {
    out.statuses
        .iter()
        .find(|s| s.kind == kind && s.object.name == name)
        .unwrap_or_else(|| panic!("no status for {kind:?} {name}: {:?}", out.statuses))
}

fn reason(out: &RenderOutput, kind: Kind, name: &str) -> Option<Reason> {
    status(out, kind, name).rejection.as_ref().map(|r| r.reason)
}

fn with(extra: Vec<Value>) -> RenderOutput {
    let mut objs = shop();
    objs.extend(extra);
    rendered(&index(objs), "shop")
}

fn good_route() -> Value {
    route(
        "shop",
        "good",
        json!({"service": "web", "http": [{"timeout": "1s"}]}),
    )
}

/// The config without the offending resource is exactly what renders.
fn assert_rest_intact(bad: Value) {
    let with_bad = with(vec![good_route(), bad]);
    let without = with(vec![good_route()]);
    assert_eq!(with_bad.config.to_json(), without.config.to_json());
    assert!(status(&with_bad, Kind::ServiceRoute, "good").accepted());
}

#[test]
fn unknown_service() {
    let out = with(vec![
        route("shop", "r", json!({"service": "nope", "http": [{}]})),
        policy("shop", "p", json!({"service": "nope"})),
        access(
            "shop",
            "a",
            json!({"targetService": "nope", "action": "Allow"}),
        ),
        route(
            "shop",
            "b",
            json!({"service": "cart", "http": [{"backends": [{"service": "nope"}]}]}),
        ),
        route(
            "shop",
            "m",
            json!({"service": "web", "http": [{"mirror": {"service": "nope"}}]}),
        ),
    ]);
    for (kind, name) in [
        (Kind::ServiceRoute, "r"),
        (Kind::ServicePolicy, "p"),
        (Kind::AccessPolicy, "a"),
        (Kind::ServiceRoute, "b"),
        (Kind::ServiceRoute, "m"),
    ] {
        assert_eq!(
            reason(&out, kind, name),
            Some(Reason::UnknownService),
            "{kind:?} {name}"
        );
    }
    assert!(out.config.inbound.policies.is_empty());
    assert!(service(&out.config, "shop/cart").http_routes.is_empty());
    assert!(
        status(&out, Kind::ServiceRoute, "r")
            .message()
            .contains("shop/nope")
    );
    assert_rest_intact(route("shop", "r", json!({"service": "nope", "http": [{}]})));
}

#[test]
fn unknown_subset_and_port() {
    let out = with(vec![
        policy(
            "shop",
            "cart",
            json!({"service": "cart", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}),
        ),
        route(
            "shop",
            "sub",
            json!({"service": "cart", "http": [{"backends": [{"subset": "v9"}]}]}),
        ),
        route(
            "shop",
            "port",
            json!({"service": "cart", "port": 81, "http": [{}]}),
        ),
        route(
            "shop",
            "bport",
            json!({"service": "web", "http": [{"backends": [{"service": "cart", "port": 9999}]}]}),
        ),
        policy(
            "shop",
            "pp",
            json!({"service": "web", "opaquePorts": [1234]}),
        ),
    ]);
    assert_eq!(
        reason(&out, Kind::ServiceRoute, "sub"),
        Some(Reason::UnknownSubset)
    );
    assert_eq!(
        reason(&out, Kind::ServiceRoute, "port"),
        Some(Reason::UnknownPort)
    );
    assert_eq!(
        reason(&out, Kind::ServiceRoute, "bport"),
        Some(Reason::UnknownPort)
    );
    assert_eq!(
        reason(&out, Kind::ServicePolicy, "pp"),
        Some(Reason::UnknownPort)
    );
    assert!(status(&out, Kind::ServicePolicy, "cart").accepted());
    assert_rest_intact(route(
        "shop",
        "sub",
        json!({"service": "cart", "http": [{"backends": [{"subset": "v9"}]}]}),
    ));
}

#[test]
fn subset_of_a_rejected_policy_is_unknown() {
    let out = with(vec![
        policy(
            "shop",
            "cart",
            json!({"service": "cart", "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
                                      "connectionPool": {"connectTimeout": "5x"}}),
        ),
        route(
            "shop",
            "sub",
            json!({"service": "cart", "http": [{"backends": [{"subset": "v1"}]}]}),
        ),
    ]);
    assert_eq!(
        reason(&out, Kind::ServicePolicy, "cart"),
        Some(Reason::InvalidDuration)
    );
    assert_eq!(
        reason(&out, Kind::ServiceRoute, "sub"),
        Some(Reason::UnknownSubset)
    );
}

#[test]
fn conflicting_routes_oldest_wins_then_name() {
    let out = with(vec![
        route_at(
            "shop",
            "young",
            "2026-03-01T00:00:00Z",
            json!({"service": "cart", "http": [{"name": "young"}]}),
        ),
        route_at(
            "shop",
            "old",
            "2026-02-01T00:00:00Z",
            json!({"service": "cart", "http": [{"name": "old"}]}),
        ),
        route_at(
            "shop",
            "b-same",
            "2026-02-01T00:00:00Z",
            json!({"service": "web", "port": 80, "http": [{}]}),
        ),
        route_at(
            "shop",
            "a-same",
            "2026-02-01T00:00:00Z",
            json!({"service": "web", "port": 80, "http": [{}]}),
        ),
        // Different port of the same Service: no conflict.
        route_at(
            "shop",
            "all-ports",
            "2026-03-01T00:00:00Z",
            json!({"service": "web", "http": [{}]}),
        ),
    ]);
    assert!(status(&out, Kind::ServiceRoute, "old").accepted());
    assert_eq!(
        reason(&out, Kind::ServiceRoute, "young"),
        Some(Reason::Conflicted)
    );
    assert!(
        status(&out, Kind::ServiceRoute, "young")
            .message()
            .contains("\"old\"")
    );
    assert!(status(&out, Kind::ServiceRoute, "a-same").accepted());
    assert_eq!(
        reason(&out, Kind::ServiceRoute, "b-same"),
        Some(Reason::Conflicted)
    );
    assert!(status(&out, Kind::ServiceRoute, "all-ports").accepted());
    let names: Vec<&str> = service(&out.config, "shop/cart")
        .http_routes
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(names, vec!["old/old"]);
    let names: Vec<&str> = service(&out.config, "shop/web")
        .http_routes
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(names, vec!["a-same/0", "all-ports/0"]);
}

#[test]
fn conflicting_service_policies_oldest_wins() {
    let out = with(vec![
        policy_at(
            "shop",
            "second",
            "2026-03-01T00:00:00Z",
            json!({"service": "cart", "loadBalancer": {"kind": "Random"}}),
        ),
        policy_at(
            "shop",
            "first",
            "2026-02-01T00:00:00Z",
            json!({"service": "cart", "loadBalancer": {"kind": "RoundRobin"}}),
        ),
    ]);
    assert!(status(&out, Kind::ServicePolicy, "first").accepted());
    assert_eq!(
        reason(&out, Kind::ServicePolicy, "second"),
        Some(Reason::Conflicted)
    );
    assert_eq!(
        service(&out.config, "shop/cart").policy.load_balancer,
        weft_proxy_config::LoadBalancer::RoundRobin
    );
}

#[test]
fn regexes_that_do_not_compile() {
    for (name, rule) in [
        (
            "path",
            json!({"matches": [{"path": {"regex": "(unclosed"}}]}),
        ),
        (
            "header",
            json!({"matches": [{"headers": [{"name": "x", "regex": "[z-a]"}]}]}),
        ),
        (
            "query",
            json!({"matches": [{"queryParams": [{"name": "x", "regex": "*"}]}]}),
        ),
    ] {
        let bad = route("shop", name, json!({"service": "cart", "http": [rule]}));
        let out = with(vec![bad.clone()]);
        assert_eq!(
            reason(&out, Kind::ServiceRoute, name),
            Some(Reason::InvalidRegex),
            "{name}"
        );
        assert_rest_intact(bad);
    }
}

#[test]
fn bad_durations_and_inconsistent_specs() {
    let cases = [
        (json!({"timeout": "5x"}), Reason::InvalidDuration),
        (json!({"timeout": "0s"}), Reason::InvalidDuration),
        (
            json!({"retries": {"perTryTimeout": "1d"}}),
            Reason::InvalidDuration,
        ),
        (
            json!({"retries": {"backoff": {"baseInterval": "1s", "maxInterval": "10ms"}}}),
            Reason::InvalidDuration,
        ),
        (
            json!({"fault": {"delay": {"fixedDelay": "soon"}}}),
            Reason::InvalidDuration,
        ),
        (json!({"retries": {"attempts": 11}}), Reason::Invalid),
        (
            json!({"fault": {"abort": {"httpStatus": 503, "percent": 120}}}),
            Reason::Invalid,
        ),
        (json!({"backends": [{"weight": 0}]}), Reason::Invalid),
        (
            json!({"redirect": {"statusCode": 302}, "backends": [{}]}),
            Reason::Invalid,
        ),
        (json!({"redirect": {"statusCode": 200}}), Reason::Invalid),
        (
            json!({"matches": [{"path": {"exact": "no-slash"}}]}),
            Reason::Invalid,
        ),
    ];
    for (rule, want) in cases {
        let bad = route(
            "shop",
            "bad",
            json!({"service": "cart", "http": [rule.clone()]}),
        );
        let out = with(vec![bad.clone()]);
        assert_eq!(
            reason(&out, Kind::ServiceRoute, "bad"),
            Some(want),
            "{rule}"
        );
        assert_rest_intact(bad);
    }
    let out = with(vec![
        policy(
            "shop",
            "p1",
            json!({"service": "cart", "outlierDetection": {"interval": "0s"}}),
        ),
        policy(
            "shop",
            "p2",
            json!({"service": "web", "retryBudget": {"ttl": "forever"}}),
        ),
        access(
            "shop",
            "a1",
            json!({"action": "Allow", "rules": [{"to": [{"paths": ["api"]}]}]}),
        ),
        access(
            "shop",
            "a2",
            json!({"action": "Allow", "rules": [{"from": [{"serviceAccounts": ["a/b/c"]}]}]}),
        ),
        route(
            "shop",
            "two-tcp",
            json!({"service": "web", "tcp": [{"backends": [{}]}, {"backends": [{}]}]}),
        ),
    ]);
    assert_eq!(
        reason(&out, Kind::ServicePolicy, "p1"),
        Some(Reason::InvalidDuration)
    );
    assert_eq!(
        reason(&out, Kind::ServicePolicy, "p2"),
        Some(Reason::InvalidDuration)
    );
    assert_eq!(
        reason(&out, Kind::AccessPolicy, "a1"),
        Some(Reason::Invalid)
    );
    assert_eq!(
        reason(&out, Kind::AccessPolicy, "a2"),
        Some(Reason::Invalid)
    );
    assert_eq!(
        reason(&out, Kind::ServiceRoute, "two-tcp"),
        Some(Reason::Invalid)
    );
    assert!(out.config.inbound.policies.is_empty());
}

#[test]
fn rate_limit_needs_a_selector() {
    let out = with(vec![
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "shop", "name": "manual"},
               "spec": {"clusterIP": "10.96.0.99", "ports": [{"port": 80}]}}),
        policy(
            "shop",
            "rl",
            json!({"service": "manual", "rateLimit": {"requests": 5, "unit": "Second"}}),
        ),
    ]);
    assert_eq!(
        reason(&out, Kind::ServicePolicy, "rl"),
        Some(Reason::Invalid)
    );
    assert!(out.config.inbound.rate_limits.is_empty());
}

#[test]
fn rejected_update_keeps_the_last_accepted_version() {
    let v1 = with_generation(
        route(
            "shop",
            "r",
            json!({"service": "cart", "http": [{"timeout": "1s"}]}),
        ),
        1,
    );
    let v2 = with_generation(
        route(
            "shop",
            "r",
            json!({"service": "cart", "http": [{"timeout": "forever"}]}),
        ),
        2,
    );
    let mut objs = shop();
    objs.push(v1);
    let mut idx = index(objs);
    let first = rendered(&idx, "shop");
    assert!(status(&first, Kind::ServiceRoute, "r").accepted());
    // What the operator does after acting on a render.
    idx.record_accepted(Kind::ServiceRoute, &ObjectRef::new("shop", "r"), Some(1));

    idx.apply(object(v2.clone()));
    let second = rendered(&idx, "shop");
    let st = status(&second, Kind::ServiceRoute, "r");
    assert_eq!(st.generation, Some(2));
    assert_eq!(
        st.rejection.as_ref().map(|r| r.reason),
        Some(Reason::InvalidDuration)
    );
    assert!(
        st.message().contains("still rendering generation 1"),
        "{}",
        st.message()
    );
    assert_eq!(
        service(&second.config, "shop/cart").http_routes[0].timeout_ms,
        Some(1000),
        "the last accepted version keeps rendering"
    );

    // Without an accepted past, nothing of it renders.
    let mut objs = shop();
    objs.push(v2);
    let fresh = rendered(&index(objs), "shop");
    assert!(service(&fresh.config, "shop/cart").http_routes.is_empty());
    assert!(
        status(&fresh, Kind::ServiceRoute, "r")
            .message()
            .contains("nothing of it is rendered")
    );
}

#[test]
fn every_resource_of_the_namespace_gets_a_status_sorted() {
    let out = with(vec![
        access("shop", "z", json!({"action": "Allow"})),
        route("shop", "b", json!({"service": "cart", "http": [{}]})),
        route("shop", "a", json!({"service": "nope", "http": [{}]})),
        policy("shop", "p", json!({"service": "cart"})),
    ]);
    let got: Vec<(Kind, &str)> = out
        .statuses
        .iter()
        .map(|s| (s.kind, s.object.name.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            (Kind::ServiceRoute, "a"),
            (Kind::ServiceRoute, "b"),
            (Kind::ServicePolicy, "p"),
            (Kind::AccessPolicy, "z")
        ]
    );
}

#[test]
fn mtls_policies_one_per_namespace_and_per_pod_oldest_wins() {
    let out = with(vec![
        mtls_at(
            "shop",
            "ns-young",
            "2026-03-01T00:00:00Z",
            json!({"mode": "Strict"}),
        ),
        mtls_at(
            "shop",
            "ns-old",
            "2026-02-01T00:00:00Z",
            json!({"mode": "Permissive"}),
        ),
        mtls_at(
            "shop",
            "cart-all",
            "2026-02-01T00:00:00Z",
            json!({"selector": {"matchLabels": {"app": "cart"}}, "ports": [{"port": 8080, "mode": "Strict"}]}),
        ),
        mtls_at(
            "shop",
            "v1-only",
            "2026-03-01T00:00:00Z",
            json!({"selector": {"matchLabels": {"version": "v1"}}, "mode": "Permissive"}),
        ),
        mtls_at(
            "shop",
            "web",
            "2026-03-01T00:00:00Z",
            json!({"selector": {"matchLabels": {"app": "web"}}, "mode": "Permissive"}),
        ),
    ]);
    for accepted in ["ns-old", "cart-all", "web"] {
        assert!(
            status(&out, Kind::MtlsPolicy, accepted).accepted(),
            "{accepted}"
        );
    }
    assert_eq!(
        reason(&out, Kind::MtlsPolicy, "ns-young"),
        Some(Reason::Conflicted)
    );
    assert!(
        status(&out, Kind::MtlsPolicy, "ns-young")
            .message()
            .contains("\"ns-old\"")
    );
    assert_eq!(
        reason(&out, Kind::MtlsPolicy, "v1-only"),
        Some(Reason::Conflicted)
    );
    let msg = status(&out, Kind::MtlsPolicy, "v1-only").message();
    assert!(
        msg.contains("\"cart-all\"") && msg.contains("pod cart-"),
        "{msg}"
    );
    // Workload overrides oldest first, then the namespace-wide one.
    let rendered: Vec<(&str, Option<weft_proxy_config::MtlsMode>)> = out
        .config
        .inbound
        .mtls
        .iter()
        .map(|o| (o.name.as_str(), o.mode))
        .collect();
    assert_eq!(
        rendered,
        vec![
            ("cart-all", None),
            ("web", Some(weft_proxy_config::MtlsMode::Permissive)),
            ("ns-old", Some(weft_proxy_config::MtlsMode::Permissive)),
        ]
    );
    out.config.validate().expect("valid");
}
