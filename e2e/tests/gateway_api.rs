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
    mesh::install_gateway_api(&cluster, mesh::Channel::Standard).await?;
    eprintln!("Gateway API CRDs installed in {:?}", start.elapsed());
    // Idempotent: installing again changes nothing and succeeds.
    mesh::install_gateway_api(&cluster, mesh::Channel::Standard).await?;

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
    mesh::install_gateway_api(&cluster, mesh::Channel::Standard).await?;
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

/// weft's ingress gateway for the demo: HTTPS for `demo.example.com` with
/// a certificate from Secret `demo-tls`, plain HTTP, one route to the
/// backend, and the AccessPolicy that lets the gateway's identity call it.
const INGRESS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: public
  namespace: demo
  annotations: {weft.dev/gateway-service-type: ClusterIP}
spec:
  gatewayClassName: weft
  listeners:
  - name: https
    port: 443
    protocol: HTTPS
    hostname: demo.example.com
    tls:
      certificateRefs: [{name: demo-tls}]
  - name: http
    port: 80
    protocol: HTTP
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: site, namespace: demo}
spec:
  parentRefs: [{name: public}]
  hostnames: [demo.example.com]
  rules:
  - backendRefs: [{name: backend, port: 8080}]
---
apiVersion: weft.dev/v1alpha1
kind: AccessPolicy
metadata: {name: backend-allow-gateway, namespace: demo}
spec:
  targetService: backend
  action: Allow
  rules:
  - from:
    - serviceAccounts: ["demo/weft-gateway-public"]
"#;

/// A CA and a server certificate for `demo.example.com`, as PEM:
/// (CA certificate, leaf certificate, leaf key).
fn demo_certificate() -> anyhow::Result<(String, String, String)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "demo web CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec!["demo.example.com".to_owned()])?;
    leaf.distinguished_name
        .push(DnType::CommonName, "demo.example.com");
    let leaf = leaf.signed_by(&key, &issuer)?;
    Ok((ca_cert.pem(), leaf.pem(), key.serialize_pem()))
}

async fn gateway_condition(cluster: &Cluster, type_: &str) -> anyhow::Result<String> {
    Ok(cluster
        .kubectl(&[
            "get",
            "gateway",
            "public",
            "-n",
            "demo",
            "-o",
            &format!("jsonpath={{.status.conditions[?(@.type==\"{type_}\")].status}}"),
        ])
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_gateway_brings_outside_clients_to_the_demo_over_mtls() -> anyhow::Result<()> {
    let _serial = serial().await;
    let cluster = Cluster::for_scenario_with(ClusterConfig::default()).await?;
    mesh::install_gateway_api(&cluster, mesh::Channel::Standard).await?;
    mesh::install(&cluster).await?;
    mesh::deploy_demo(&cluster).await?;
    mesh::install_gateway_class(&cluster).await?;

    let dir = tempfile::tempdir()?;
    let (ca, crt, key) = demo_certificate()?;
    let path = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    std::fs::write(path("ca.crt"), &ca)?;
    std::fs::write(path("tls.crt"), &crt)?;
    std::fs::write(path("tls.key"), &key)?;
    cluster
        .kubectl(&[
            "create",
            "secret",
            "tls",
            "demo-tls",
            "-n",
            "demo",
            &format!("--cert={}", path("tls.crt")),
            &format!("--key={}", path("tls.key")),
        ])
        .await?;
    mesh::apply_yaml(&cluster, INGRESS).await?;
    let start = std::time::Instant::now();
    cluster
        .wait_until(Duration::from_secs(120), "Gateway programmed", || async {
            Ok(gateway_condition(&cluster, "Programmed")
                .await
                .is_ok_and(|s| s == "True"))
        })
        .await?;
    eprintln!("Gateway programmed after {:?}", start.elapsed());
    assert_eq!(gateway_condition(&cluster, "Accepted").await?, "True");
    // The AccessPolicy that lets the gateway in must be in force on every
    // backend pod, not only on the one that answers first: the requests
    // below may reach any of them.
    for pod in mesh::pods(&cluster, "demo", "backend").await? {
        let name = pod.metadata.name.clone().unwrap_or_default();
        mesh::wait_for_proxy_sync(&cluster, "demo", &name, Duration::from_secs(90)).await?;
    }

    let vip = cluster
        .kubectl(&[
            "get",
            "service",
            "weft-gateway-public",
            "-n",
            "demo",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .await?;
    // A client outside the mesh: curl in the node's network namespace,
    // verifying the gateway's certificate for the SNI it sends.
    let curl = |url: String, resolve: String| {
        let ca = path("ca.crt");
        let cluster = &cluster;
        async move {
            cluster
                .exec_in_node(&[
                    "curl",
                    "-sS",
                    "--max-time",
                    "5",
                    "--cacert",
                    &ca,
                    "--resolve",
                    &resolve,
                    &url,
                ])
                .await
        }
    };
    let mut last = String::new();
    let mut answer = None;
    while start.elapsed() < Duration::from_secs(180) {
        let out = curl(
            "https://demo.example.com/".to_owned(),
            format!("demo.example.com:443:{vip}"),
        )
        .await?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success()
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        {
            answer = Some(v);
            break;
        }
        last = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let Some(v) = answer else {
        anyhow::bail!("no answer through the gateway; last: {last}");
    };
    eprintln!("through the gateway after {:?}: {v}", start.elapsed());
    assert!(
        v["pod"].as_str().is_some_and(|p| p.starts_with("backend-")),
        "{v}"
    );
    assert_eq!(
        v["identity"], "spiffe://cluster.local/ns/demo/sa/weft-gateway-public",
        "the backend sees the gateway's identity over mTLS"
    );

    // The same route on the HTTP listener (no host name: any).
    let out = curl(
        "http://demo.example.com/".to_owned(),
        format!("demo.example.com:80:{vip}"),
    )
    .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"pod\":\"backend-"), "{text}");

    let route = cluster
        .kubectl(&[
            "get",
            "httproute",
            "site",
            "-n",
            "demo",
            "-o",
            r#"jsonpath={.status.parents[?(@.controllerName=="weft.dev/gateway-controller")].conditions[?(@.type=="Accepted")].status}"#,
        ])
        .await?;
    assert_eq!(route, "True");
    let attached = cluster
        .kubectl(&[
            "get",
            "gateway",
            "public",
            "-n",
            "demo",
            "-o",
            "jsonpath={.status.listeners[*].attachedRoutes}",
        ])
        .await?;
    assert_eq!(attached, "1 1");
    cluster.shutdown();
    Ok(())
}
