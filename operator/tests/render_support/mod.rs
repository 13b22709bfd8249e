//! Fixtures for the renderer tests: Kubernetes objects as JSON, the way a
//! user writes them, converted through the same path `weftctl render` uses.
// Each test binary uses a different part of the fixtures; values are taken by
// value so `json!` literals read naturally at the call sites.
#![allow(dead_code, clippy::needless_pass_by_value)]

use serde_json::{Value, json};
use weft_operator::index::{Index, Object};
use weft_operator::render::{RenderOutput, render, to_object};
use weft_proxy_config::{ProxyConfig, Service};

pub fn object(v: Value) -> Object {
    to_object(0, v)
        .expect("fixture has the shape of its kind")
        .expect("fixture is of a kind weft reads")
}

pub fn index(values: Vec<Value>) -> Index {
    Index::from_objects(values.into_iter().map(object))
}

/// Renders and checks what every render must satisfy: `validate()` passes and
/// the written bytes load back (hash and version) into the same config.
pub fn rendered(index: &Index, ns: &str) -> RenderOutput {
    let out = render(index, ns);
    if let Err(e) = out.config.validate() {
        panic!("render of {ns} does not validate: {e}");
    }
    let loaded = ProxyConfig::load(&out.config.to_json()).expect("rendered bytes load back");
    assert_eq!(loaded, out.config);
    out
}

pub fn service<'a>(cfg: &'a ProxyConfig, key: &str) -> &'a Service {
    cfg.services
        .iter()
        .find(|s| s.key() == key)
        .unwrap_or_else(|| panic!("service {key} not rendered"))
}

pub fn has_service(cfg: &ProxyConfig, key: &str) -> bool {
    cfg.services.iter().any(|s| s.key() == key)
}

pub fn ns(name: &str, meshed: bool) -> Value {
    let labels = if meshed {
        json!({"weft.dev/inject": "enabled"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// A Service selecting `app=<name>` with the given ports.
pub fn svc(ns: &str, name: &str, ip: &str, ports: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": ns, "name": name, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "selector": {"app": name}, "ports": ports}
    })
}

/// The usual single HTTP port: 80 → named `http` → 8080.
pub fn http_port() -> Value {
    json!([{"name": "http", "port": 80, "targetPort": "http"}])
}

pub fn slice(ns: &str, name: &str, service: &str, ports: Value, endpoints: Value) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints
    })
}

pub fn http_slice_port() -> Value {
    json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
}

/// A ready endpoint backed by a Pod.
pub fn ep(ip: &str, pod: &str) -> Value {
    json!({"addresses": [ip], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": pod}})
}

pub fn pod(ns: &str, name: &str, sa: &str, meshed: bool, labels: Value) -> Value {
    let mut labels = labels;
    if meshed {
        labels["weft.dev/proxy"] = json!("injected");
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {"serviceAccountName": sa, "containers": []}
    })
}

fn cr(kind: &str, ns: &str, name: &str, created: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": kind,
        "metadata": {"namespace": ns, "name": name, "generation": 1, "creationTimestamp": created},
        "spec": spec
    })
}

pub fn route(ns: &str, name: &str, spec: Value) -> Value {
    cr("ServiceRoute", ns, name, "2026-01-01T00:00:00Z", spec)
}

pub fn route_at(ns: &str, name: &str, created: &str, spec: Value) -> Value {
    cr("ServiceRoute", ns, name, created, spec)
}

pub fn policy(ns: &str, name: &str, spec: Value) -> Value {
    cr("ServicePolicy", ns, name, "2026-01-01T00:00:00Z", spec)
}

pub fn policy_at(ns: &str, name: &str, created: &str, spec: Value) -> Value {
    cr("ServicePolicy", ns, name, created, spec)
}

pub fn mtls_at(ns: &str, name: &str, created: &str, spec: Value) -> Value {
    cr("MtlsPolicy", ns, name, created, spec)
}

pub fn access(ns: &str, name: &str, spec: Value) -> Value {
    cr("AccessPolicy", ns, name, "2026-01-01T00:00:00Z", spec)
}

pub fn with_generation(mut v: Value, generation: i64) -> Value {
    v["metadata"]["generation"] = json!(generation);
    v
}

pub fn mesh(spec: Value) -> Value {
    json!({"apiVersion": "weft.dev/v1alpha1", "kind": "Mesh", "metadata": {"name": "default"}, "spec": spec})
}

/// A small meshed namespace `shop`: Service `cart` with two meshed pods
/// (versions v1, v2) and one plain pod, plus Service `web`.
pub fn shop() -> Vec<Value> {
    vec![
        ns("shop", true),
        svc("shop", "cart", "10.96.0.10", http_port()),
        slice(
            "shop",
            "cart-a",
            "cart",
            http_slice_port(),
            json!([
                ep("10.0.0.2", "cart-2"),
                ep("10.0.0.1", "cart-1"),
                ep("10.0.0.3", "cart-3")
            ]),
        ),
        pod(
            "shop",
            "cart-1",
            "cart",
            true,
            json!({"app": "cart", "version": "v1"}),
        ),
        pod(
            "shop",
            "cart-2",
            "cart",
            true,
            json!({"app": "cart", "version": "v2"}),
        ),
        pod(
            "shop",
            "cart-3",
            "legacy",
            false,
            json!({"app": "cart", "version": "v1"}),
        ),
        svc("shop", "web", "10.96.0.11", http_port()),
        slice(
            "shop",
            "web-a",
            "web",
            http_slice_port(),
            json!([ep("10.0.1.1", "web-1")]),
        ),
        pod("shop", "web-1", "web", true, json!({"app": "web"})),
    ]
}
