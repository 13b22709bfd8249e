//! `render_offline`: the function behind `weftctl render -f FILES`.

mod render_support;

use weft_operator::index::Kind;
use weft_operator::render::{OfflineError, parse_yaml, render_offline};

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    weft.dev/inject: enabled
---
apiVersion: v1
kind: Namespace
metadata:
  name: outside
---
# A document with only a comment is skipped.
---
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Service
    metadata: {name: cart, namespace: shop}
    spec:
      clusterIP: 10.96.0.10
      selector: {app: cart}
      ports: [{name: http, port: 80, targetPort: 8080, appProtocol: http}]
  - apiVersion: apps/v1
    kind: Deployment
    metadata: {name: cart, namespace: shop}
    spec: {}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: cart-x1
  namespace: shop
  labels: {kubernetes.io/service-name: cart}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
  - addresses: [10.0.0.1]
    targetRef: {kind: Pod, name: cart-1}
---
apiVersion: v1
kind: Pod
metadata:
  name: cart-1
  namespace: shop
  labels: {app: cart, weft.dev/proxy: injected}
spec:
  serviceAccountName: cart
  containers: []
---
apiVersion: weft.dev/v1alpha1
kind: ServiceRoute
metadata: {name: cart, namespace: shop}
spec:
  service: cart
  http:
    - timeout: 2s
---
apiVersion: weft.dev/v1alpha1
kind: ServiceRoute
metadata: {name: broken, namespace: shop}
spec:
  service: missing
  http: [{}]
---
apiVersion: v1
kind: Service
metadata: {name: api}
spec:
  clusterIP: 10.96.0.20
  ports: [{port: 80}]
---
apiVersion: weft.dev/v1alpha1
kind: AccessPolicy
metadata: {name: a, namespace: outside}
spec:
  action: Allow
  targetService: nothing-here
"#;

#[test]
fn renders_each_namespace_from_multi_document_yaml() -> anyhow::Result<()> {
    let objects = parse_yaml(MANIFESTS)?;
    let out = render_offline(objects)?;
    // shop is labelled; "default" has objects but no Namespace object, so it
    // is assumed meshed; "outside" is not meshed.
    assert_eq!(
        out.configs.keys().collect::<Vec<_>>(),
        vec!["default", "shop"]
    );
    let shop = &out.configs["shop"];
    shop.validate()?;
    let cart = shop
        .services
        .iter()
        .find(|s| s.name == "cart")
        .expect("cart rendered");
    assert_eq!(
        cart.endpoints[0].identity.as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/cart")
    );
    assert_eq!(cart.http_routes[0].timeout_ms, Some(2000));
    assert_eq!(shop.generation, 1);
    assert!(shop.services.iter().any(|s| s.key() == "default/api"));
    assert_eq!(out.ignored, vec!["Deployment shop/cart"]);
    let verdicts: Vec<(Kind, String, bool)> = out
        .statuses
        .iter()
        .map(|s| (s.kind, s.object.to_string(), s.accepted()))
        .collect();
    assert_eq!(
        verdicts,
        vec![
            (Kind::ServiceRoute, "shop/broken".into(), false),
            (Kind::ServiceRoute, "shop/cart".into(), true),
            (Kind::AccessPolicy, "outside/a".into(), false),
        ]
    );
    // The output is what the operator would write: it loads back.
    weft_proxy_config::ProxyConfig::load(&shop.to_json())?;
    Ok(())
}

#[test]
fn offline_output_is_deterministic() -> anyhow::Result<()> {
    let a = render_offline(parse_yaml(MANIFESTS)?)?;
    let mut docs = parse_yaml(MANIFESTS)?;
    docs.reverse();
    let b = render_offline(docs)?;
    for (ns, cfg) in &a.configs {
        assert_eq!(cfg.to_json(), b.configs[ns].to_json());
    }
    Ok(())
}

#[test]
fn bad_input_gives_clear_errors() {
    assert!(matches!(
        parse_yaml("a: [unclosed"),
        Err(OfflineError::Yaml(_))
    ));
    let err =
        render_offline(vec![serde_json::json!({"hello": "world"})]).expect_err("not an object");
    assert!(matches!(err, OfflineError::NotAnObject { index: 0 }));
    let err = render_offline(vec![serde_json::json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "ServiceRoute",
        "metadata": {"name": "r", "namespace": "x"},
        "spec": {"service": 42}
    })])
    .expect_err("wrong shape");
    let msg = err.to_string();
    assert!(msg.contains("ServiceRoute r"), "{msg}");
}
