//! `weftctl` as a user runs it: the real binary, real files.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("operator/ sits in the repository root")
        .to_path_buf()
}

fn weftctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_weftctl"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("weftctl runs")
}

#[test]
fn crds_writes_what_is_committed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = weftctl(&["crds", "--out", dir.path().to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut n = 0;
    for entry in std::fs::read_dir(dir.path()).expect("written") {
        let path = entry.expect("entry").path();
        let name = path.file_name().expect("name").to_owned();
        let committed =
            std::fs::read_to_string(repo().join("crds").join(&name)).expect("committed");
        assert_eq!(
            std::fs::read_to_string(&path).expect("generated"),
            committed
        );
        n += 1;
    }
    assert_eq!(n, 6, "five CRDs and their kustomization");
}

#[test]
fn check_accepts_examples_and_rejects_broken_resources() {
    let good = weftctl(&[
        "check",
        "-f",
        "manifests/examples/backend-route.yaml",
        "manifests/examples/access.yaml",
    ]);
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stdout)
    );
    assert!(String::from_utf8_lossy(&good.stdout).contains("3 valid, 0 invalid"));

    let bad = weftctl(&[
        "check",
        "-f",
        "operator/api/tests/invalid/all-weights-zero.yaml",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&bad.stdout);
    assert!(
        stdout.contains("at least one backend needs a weight above zero"),
        "{stdout}"
    );

    let garbage = weftctl(&["check", "-f", "Cargo.lock"]);
    assert_eq!(
        garbage.status.code(),
        Some(2),
        "not YAML is an error, not a pass"
    );
}

#[test]
fn inject_adds_the_sidecar_to_workload_templates() {
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("app.yaml");
    std::fs::write(
        &input,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers: [{name: web, image: nginx}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n",
    )
    .expect("write");
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        "apiVersion: weft.dev/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec:\n  injection: {proxyImage: registry.example/weft-proxy:test}\n",
    )
    .expect("write");
    let out = weftctl(&[
        "inject",
        "-f",
        input.to_str().expect("utf-8"),
        "--mesh",
        mesh.to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = weft_api::yaml::documents(&String::from_utf8_lossy(&out.stdout)).expect("YAML out");
    assert_eq!(docs.len(), 2);
    let init = docs[0]
        .pointer("/spec/template/spec/initContainers")
        .and_then(|v| v.as_array())
        .expect("init containers added");
    assert!(init.iter().any(|c| c["name"] == "weft-init"));
    assert!(
        init.iter()
            .any(|c| c["image"] == "registry.example/weft-proxy:test"),
        "Mesh defaults apply"
    );
    assert_eq!(
        docs[0].pointer("/spec/template/metadata/labels/weft.dev~1proxy"),
        Some(&serde_json::json!("injected"))
    );
    assert_eq!(docs[1]["kind"], "Service");
    assert!(
        docs[1]
            .get("spec")
            .is_some_and(|s| s.get("template").is_none()),
        "non-workloads pass through"
    );
}

#[test]
fn render_prints_the_config_each_namespace_gets() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = dir.path().join("cluster.yaml");
    std::fs::write(
        &cluster,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {weft.dev/inject: enabled}}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: backend, namespace: demo}\nspec:\n  clusterIP: 10.96.0.20\n  selector: {app: backend}\n  ports: [{name: http, port: 8080, targetPort: 8080, appProtocol: http}]\n",
    )
    .expect("write");
    let route = dir.path().join("route.yaml");
    std::fs::write(
        &route,
        "apiVersion: weft.dev/v1alpha1\nkind: ServiceRoute\nmetadata: {name: backend, namespace: demo}\nspec:\n  service: backend\n  http:\n  - name: slow\n    timeout: 2s\n",
    )
    .expect("write");
    let out_dir = dir.path().join("out");
    let out = weftctl(&[
        "render",
        "-f",
        cluster.to_str().expect("utf-8"),
        route.to_str().expect("utf-8"),
        "--out",
        out_dir.to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(out_dir.join("demo.proxy.json")).expect("demo rendered");
    let cfg = weft_proxy_config::ProxyConfig::load(&bytes).expect("the proxy would accept it");
    let svc = cfg
        .services
        .iter()
        .find(|s| s.name == "backend")
        .expect("backend rendered");
    assert_eq!(
        svc.http_routes.first().and_then(|r| r.timeout_ms),
        Some(2000)
    );

    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        "apiVersion: weft.dev/v1alpha1\nkind: ServiceRoute\nmetadata: {name: ghost, namespace: demo}\nspec:\n  service: nope\n  http:\n  - timeout: 1s\n",
    )
    .expect("write");
    let out = weftctl(&[
        "render",
        "-f",
        cluster.to_str().expect("utf-8"),
        broken.to_str().expect("utf-8"),
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a rejected resource fails the command"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("REJECTED"));
}

/// The upstream Gateway API CRDs of the release the harness pins (where
/// `e2e/gateway-api/crds.sh` finds them in Go's module cache).
fn gateway_api_crds() -> String {
    let out = Command::new(repo().join("e2e/gateway-api/crds.sh"))
        .output()
        .expect("crds.sh runs (Go is installed by scripts/setup)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn check_validates_gateway_api_resources_with_their_crds() {
    let dir = tempfile::tempdir().expect("temp dir");
    let routes = dir.path().join("routes.yaml");
    std::fs::write(
        &routes,
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: ok, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: cart, port: 80}]
  rules:
  - backendRefs: [{name: cart, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bad, namespace: shop}
spec:
  parentRefs: [{name: public}]
  rules:
  - matches: [{path: {type: Sideways, value: /x}}]
    bogus: 1
"#,
    )
    .expect("write");
    let routes = routes.to_str().expect("utf-8");
    // Without the CRDs the routes are not weft's: skipped.
    let out = weftctl(&["check", "-f", routes]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 valid, 0 invalid"));

    let crds = gateway_api_crds();
    let out = weftctl(&["check", "--crds", &crds, "-f", routes]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("ok      HTTPRoute shop/ok"), "{text}");
    assert!(text.contains("invalid HTTPRoute shop/bad"), "{text}");
    assert!(text.contains("\"Sideways\" is not one of"), "{text}");
    assert!(
        text.contains("spec.rules[0].bogus: unknown field"),
        "{text}"
    );
    assert!(text.contains("1 valid, 1 invalid"), "{text}");
}
