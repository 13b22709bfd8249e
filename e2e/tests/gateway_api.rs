//! The upstream Gateway API CRDs (standard channel) installed from the Go
//! module pinned in `e2e/gateway-api/go.mod`: the release a user installs,
//! served by the harness's real API server.

mod common;

use common::serial;
use weft_e2e::{Cluster, mesh};

/// A GAMMA route: its parent is a Service, as the mesh's routes are.
const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: x, namespace: default}
spec:
  parentRefs:
  - {group: "", kind: Service, name: x, port: 80}
  rules:
  - backendRefs:
    - {name: x, port: 80}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_gateway_api_crds_install_and_serve_httproutes() -> anyhow::Result<()> {
    let _serial = serial().await;
    let cluster = Cluster::start().await?;

    let start = std::time::Instant::now();
    mesh::install_gateway_api(&cluster).await?;
    eprintln!("Gateway API CRDs installed in {:?}", start.elapsed());
    // Idempotent: installing again changes nothing and succeeds.
    mesh::install_gateway_api(&cluster).await?;

    let version = cluster
        .kubectl(&[
            "get",
            "crd",
            "httproutes.gateway.networking.k8s.io",
            "-o",
            r"jsonpath={.metadata.annotations.gateway\.networking\.k8s\.io/bundle-version}",
        ])
        .await?;
    assert_eq!(version, "v1.4.1");

    let out = cluster
        .kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], Some(ROUTE))
        .await?;
    assert!(
        out.contains("httproute.gateway.networking.k8s.io/x created (server dry run)"),
        "unexpected kubectl output: {out}"
    );

    cluster.shutdown();
    Ok(())
}
