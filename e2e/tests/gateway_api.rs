//! The Gateway API on the harness: the upstream CRDs (standard channel)
//! installed from the Go module pinned in `e2e/gateway-api/go.mod`, the
//! release a user installs, and a GAMMA `HTTPRoute` routing the demo's
//! frontend → backend traffic through the proxies.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::serial;
use weft_e2e::mesh::{self, Reply};
use weft_e2e::{Cluster, ClusterConfig};

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

/// Per-version Services of the demo backend and a GAMMA route on the
/// `backend` Service: `x-canary: yes` goes to v2, `/legacy/...` is
/// rewritten to `/api/...` (what the examples' AccessPolicy allows) on v1, everything else goes to v1 (v2 weight 0).
const GAMMA: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: backend-v1, namespace: demo}
spec:
  selector: {app: backend, version: v1}
  ports: [{name: http, port: 8080, targetPort: 8080, appProtocol: http}]
---
apiVersion: v1
kind: Service
metadata: {name: backend-v2, namespace: demo}
spec:
  selector: {app: backend, version: v2}
  ports: [{name: http, port: 8080, targetPort: 8080, appProtocol: http}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: backend-split, namespace: demo}
spec:
  parentRefs:
  - {group: "", kind: Service, name: backend, port: 8080}
  rules:
  - matches:
    - headers: [{name: x-canary, value: "yes"}]
    backendRefs:
    - {name: backend-v2, port: 8080}
  - matches:
    - path: {type: PathPrefix, value: /legacy}
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /api}}
    backendRefs:
    - {name: backend-v1, port: 8080}
  - backendRefs:
    - {name: backend-v1, port: 8080, weight: 1}
    - {name: backend-v2, port: 8080, weight: 0}
"#;

/// `status` and `reason` of weft's `Accepted` condition on the route.
async fn accepted(cluster: &Cluster) -> anyhow::Result<String> {
    Ok(cluster
        .kubectl(&[
            "get",
            "httproute",
            "backend-split",
            "-n",
            "demo",
            "-o",
            r#"jsonpath={.status.parents[?(@.controllerName=="weft.dev/mesh")].conditions[?(@.type=="Accepted")]['status','reason']}"#,
        ])
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gamma_http_route_routes_frontend_to_backend_traffic() -> anyhow::Result<()> {
    let _serial = serial().await;
    let cluster = Cluster::for_scenario_with(ClusterConfig::default()).await?;
    mesh::install_gateway_api(&cluster).await?;
    mesh::install(&cluster).await?;
    mesh::deploy_demo(&cluster).await?;
    let frontend = mesh::pods(&cluster, "demo", "frontend")
        .await?
        .into_iter()
        .find_map(|p| p.metadata.name)
        .ok_or_else(|| anyhow::anyhow!("no frontend pod"))?;
    let ip: IpAddr = mesh::cluster_ip(&cluster, "demo", "backend")
        .await?
        .parse()?;
    let backend = SocketAddr::new(ip, 8080);
    mesh::wait_for_route(
        &cluster,
        "demo",
        &frontend,
        &format!("http://{backend}/"),
        Duration::from_secs(90),
    )
    .await?;

    // The examples' ServiceRoute on the backend would win over the
    // HTTPRoute; remove it, as a team moving to the Gateway API would.
    cluster
        .kubectl(&["delete", "serviceroute", "backend", "-n", "demo"])
        .await?;
    mesh::apply_yaml(&cluster, GAMMA).await?;
    cluster
        .wait_until(
            Duration::from_secs(60),
            "HTTPRoute accepted by weft",
            || async { Ok(accepted(&cluster).await.is_ok_and(|s| s == "True Accepted")) },
        )
        .await?;

    let send = async |path: &str, headers: &[(&str, &str)], n: usize| {
        mesh::send_from_pod(&cluster, "demo", &frontend, backend, path, headers, n).await
    };
    let only = |t: &mesh::Tally, v: &str, n: usize| {
        t.failures.is_empty() && t.by_version() == BTreeMap::from([(v.to_owned(), n)])
    };
    // kubelet delivers the new config within its sync period.
    let start = std::time::Instant::now();
    loop {
        let canary = send("/", &[("x-canary", "yes")], 10).await?;
        let rest = send("/", &[], 20).await?;
        if only(&canary, "v2", 10) && only(&rest, "v1", 20) {
            eprintln!(
                "the HTTPRoute split took effect after {:?}",
                start.elapsed()
            );
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(120),
            "split not in effect: canary {canary:?}, rest {rest:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let url = format!("http://{backend}/legacy/items");
    match mesh::get_from_pod(&cluster, "demo", &frontend, &url, &[]).await? {
        Reply::Ok(v) => {
            assert_eq!(v["path"], "/api/items", "{v}");
            assert!(v["pod"].as_str().is_some_and(|p| p.contains("-v1-")), "{v}");
            assert!(
                v["identity"]
                    .as_str()
                    .is_some_and(|i| i.ends_with("/ns/demo/sa/frontend")),
                "over mTLS with the caller's identity: {v}"
            );
        }
        Reply::Failed(e) => anyhow::bail!("GET {url}: {e}"),
    }

    // weft's own ServiceRoute back on the same Service and port: it wins,
    // and the HTTPRoute says so.
    let examples = mesh::repo_root().join("manifests/examples/backend-route.yaml");
    cluster
        .kubectl(&["apply", "-f", &examples.to_string_lossy()])
        .await?;
    cluster
        .wait_until(Duration::from_secs(60), "HTTPRoute conflicted", || async {
            Ok(accepted(&cluster)
                .await
                .is_ok_and(|s| s == "False Conflicted"))
        })
        .await?;

    cluster.shutdown();
    Ok(())
}
