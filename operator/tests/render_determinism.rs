//! The same objects in any order render byte-identical JSON, and every
//! render validates.

mod render_support;

use proptest::prelude::*;
use render_support::*;
use serde_json::{Value, json};
use weft_operator::index::Index;
use weft_operator::render::render;

/// A rich fixture: two meshed namespaces, one outside, routes, policies,
/// access policies, a conflict, a rejected route, overlapping slices.
fn objects() -> Vec<Value> {
    let mut objs = shop();
    objs.extend([
        ns("pay", true),
        ns("legacy", false),
        mesh(json!({"trustDomain": "example.org"})),
        svc("pay", "ledger", "10.96.2.1", json!([{"name": "grpc", "port": 9000, "appProtocol": "grpc"}, {"name": "pg", "port": 5432}])),
        slice("pay", "ledger-a", "ledger", json!([{"name": "grpc", "port": 9000}, {"name": "pg", "port": 5432}]),
              json!([ep("10.1.0.2", "ledger-2"), ep("10.1.0.1", "ledger-1")])),
        slice("pay", "ledger-b", "ledger", json!([{"name": "grpc", "port": 9001}, {"name": "pg", "port": 5432}]),
              json!([ep("10.1.0.1", "ledger-1"), ep("10.1.0.3", "ledger-3")])),
        pod("pay", "ledger-1", "ledger", true, json!({"app": "ledger", "track": "stable"})),
        pod("pay", "ledger-2", "ledger", true, json!({"app": "ledger", "track": "canary"})),
        svc("legacy", "old", "10.96.3.1", http_port()),
        policy("shop", "cart", json!({"service": "cart", "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}],
                                      "rateLimit": {"requests": 10, "unit": "Second"}})),
        policy("pay", "ledger", json!({"service": "ledger", "subsets": [{"name": "canary", "labels": {"track": "canary"}}], "opaquePorts": [5432]})),
        route("shop", "cart", json!({"service": "cart", "http": [{"backends": [{"subset": "v1", "weight": 9}, {"subset": "v2", "weight": 1}]}]})),
        route_at("shop", "cart-dup", "2026-06-01T00:00:00Z", json!({"service": "cart", "http": [{}]})),
        route("shop", "broken", json!({"service": "web", "http": [{"timeout": "never"}]})),
        route("pay", "ledger", json!({"service": "ledger", "port": 9000, "http": [{"backends": [{"subset": "canary"}], "retries": {}}]})),
        access("shop", "b", json!({"action": "Deny", "rules": [{"from": [{"namespaces": ["legacy"]}]}]})),
        access("shop", "a", json!({"targetService": "cart", "action": "Allow", "rules": [{"from": [{"serviceAccounts": ["web"]}]}]})),
        access("pay", "ledger", json!({"targetService": "ledger", "action": "Allow", "rules": [{"from": [{"identities": ["spiffe://example.org/ns/shop/*"]}]}]})),
    ]);
    objs
}

fn render_all(idx: &Index) -> Vec<Vec<u8>> {
    ["shop", "pay", "legacy"]
        .iter()
        .map(|ns| {
            let out = render(idx, ns);
            out.config.validate().expect("every render validates");
            out.config.to_json()
        })
        .collect()
}

#[test]
fn fixture_renders_and_validates() {
    let idx = index(objects());
    for ns in ["shop", "pay", "legacy"] {
        rendered(&idx, ns);
    }
    let pay = rendered(&idx, "pay").config;
    let keys: Vec<String> = pay.services.iter().map(|s| s.key()).collect();
    assert_eq!(keys, vec!["pay/ledger", "shop/cart", "shop/web"]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_order_gives_identical_bytes(order in Just(objects()).prop_shuffle()) {
        let reference = render_all(&index(objects()));
        prop_assert_eq!(render_all(&index(order)), reference);
    }

    /// Applying objects one at a time in any order, and re-applying some,
    /// converges on the same output (watch replays and re-lists).
    #[test]
    fn replays_converge(order in Just(objects()).prop_shuffle(), replay in prop::collection::vec(0usize..30, 0..10)) {
        let reference = render_all(&index(objects()));
        let all = objects();
        let mut idx = Index::new();
        for v in order {
            idx.apply(object(v));
        }
        for i in replay {
            idx.apply(object(all[i % all.len()].clone()));
        }
        prop_assert_eq!(render_all(&idx), reference);
    }
}
