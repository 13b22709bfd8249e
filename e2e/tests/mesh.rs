//! weft as a platform team meets it, on the real control plane: install from
//! `manifests/` with kubectl, label a namespace, create Deployments, and
//! check that pods come out injected, their init container installed real
//! capture rules, their sidecars serve mTLS with the right identities, and
//! plaintext from outside the mesh is refused under Strict.

mod common;

use std::time::Duration;

use common::serial;
use weft_e2e::Cluster;
use weft_e2e::mesh::{self, Reply};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_mesh_injects_pods_and_serves_mtls() -> anyhow::Result<()> {
    let _serial = serial().await;
    let cluster = Cluster::for_scenario().await?;
    scenario(&cluster).await?;
    cluster.shutdown();
    Ok(())
}

/// The external mode's own test: the same scenario on a harness cluster
/// reached only through its kubeconfig, as a real one would be
/// (`WEFT_E2E_KUBECONFIG`): installed from `manifests/` and cleaned up with
/// kubectl, requests sent by `weft-e2e-app` inside the pods, nothing read
/// from the harness's files. Only the way commands enter a pod differs
/// (the harness's network namespaces, where a real cluster uses
/// `kubectl exec`, which the simulator does not serve).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scenario_runs_on_a_cluster_reached_by_kubeconfig_only() -> anyhow::Result<()> {
    if weft_e2e::cluster::external_kubeconfig().is_some() {
        // Already running against an external cluster.
        return Ok(());
    }
    let _serial = serial().await;
    let harness = Cluster::start().await?;
    let external = Cluster::connect_to(&harness).await?;
    assert!(external.is_external());
    scenario(&external).await?;
    // Teardown removes what the scenario installed, as on a real cluster.
    external.shutdown();
    let left = harness
        .kubectl(&["get", "namespaces", "-o", "name"])
        .await?;
    for gone in [
        "namespace/demo",
        "namespace/outside",
        "namespace/weft-system",
    ] {
        assert!(
            !left.lines().any(|l| l == gone),
            "{gone} left behind:\n{left}"
        );
    }
    let crds = harness.kubectl(&["get", "crd", "-o", "name"]).await?;
    assert!(!crds.contains("weft.dev"), "weft CRDs left behind:\n{crds}");
    harness.shutdown();
    Ok(())
}

async fn scenario(cluster: &Cluster) -> anyhow::Result<()> {
    mesh::install(cluster).await?;
    mesh::deploy_demo(cluster).await?;

    // Injection: every demo pod carries the sidecar from the patched spec,
    // and the kubelet simulator ran it (the pods are Ready).
    let frontend = mesh::pods(cluster, "demo", "frontend").await?;
    let backends = mesh::pods(cluster, "demo", "backend").await?;
    assert_eq!((frontend.len(), backends.len()), (1, 3));
    for pod in frontend.iter().chain(&backends) {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get("weft.dev/proxy").map(String::as_str),
            Some("injected"),
            "{name}"
        );
        let spec = pod.spec.as_ref().expect("pod spec");
        let inits: Vec<&str> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            inits,
            ["weft-init", "weft-proxy"],
            "{name}: init containers"
        );
        assert!(weft_e2e::pod_is_ready(pod), "{name} is not ready");
    }
    // The unmeshed namespace is left alone.
    let client = mesh::pods(cluster, "outside", "client").await?;
    let client_name = client[0].metadata.name.clone().expect("client pod name");
    assert!(
        client[0]
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("weft.dev/proxy"))
            .is_none(),
        "pods outside labelled namespaces are not injected"
    );

    // weft-init installed real iptables rules in the pod's network namespace
    // (read with the host's iptables, so on the harness only; elsewhere the
    // identities and the Strict refusal below show the capture works).
    let fe = frontend[0].metadata.name.clone().expect("frontend name");
    if !cluster.is_external() {
        let rules = cluster
            .exec_in_pod("demo", &fe, &["iptables-save", "-t", "nat"])
            .await?;
        let legacy = cluster
            .exec_in_pod("demo", &fe, &["iptables-legacy-save", "-t", "nat"])
            .await?;
        let all_rules = format!(
            "{}{}",
            String::from_utf8_lossy(&rules.stdout),
            String::from_utf8_lossy(&legacy.stdout)
        );
        assert!(
            all_rules.contains("--to-ports 15001"),
            "outbound capture rules missing:\n{all_rules}"
        );
        assert!(
            all_rules.contains("--to-ports 15006"),
            "inbound capture rules missing:\n{all_rules}"
        );
    }

    // Identities were issued for the namespace's service accounts.
    let ids = mesh::identity_secrets(cluster, "demo").await?;
    assert!(
        ids.contains(&"weft-identity-frontend".to_owned()),
        "{ids:?}"
    );
    assert!(ids.contains(&"weft-identity-backend".to_owned()), "{ids:?}");

    // frontend → backend through both sidecars with mTLS: the backend sees
    // the frontend's SPIFFE identity from its proxy.
    let url = format!(
        "http://{}:8080/api/items",
        mesh::cluster_ip(cluster, "demo", "backend").await?
    );
    mesh::wait_for_route(cluster, "demo", &fe, &url, Duration::from_secs(60)).await?;
    // The first answer proves one subset is reachable; the split route sends
    // to both, so wait until the frontend's proxy runs the current config
    // and lists every backend pod before asking for ten answers in a row.
    mesh::wait_for_proxy_sync(cluster, "demo", &fe, Duration::from_secs(60)).await?;
    let backend_ips: Vec<String> = backends
        .iter()
        .filter_map(|p| p.status.as_ref().and_then(|s| s.pod_ip.clone()))
        .collect();
    assert_eq!(backend_ips.len(), 3, "backend pod IPs");
    cluster
        .wait_until(
            Duration::from_secs(60),
            "the frontend's proxy lists every backend pod",
            || async {
                let cfg = mesh::proxy_config(cluster, "demo", &fe).await?;
                let listed: Vec<String> = cfg["services"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|s| s["namespace"] == "demo" && s["name"] == "backend")
                    .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
                    .filter_map(|e| e["address"].as_str().map(str::to_owned))
                    .collect();
                Ok(backend_ips.iter().all(|ip| listed.contains(ip)))
            },
        )
        .await?;
    let mut served = 0;
    for _ in 0..10 {
        match mesh::get_from_pod(cluster, "demo", &fe, &url, &[]).await? {
            Reply::Ok(body) => {
                assert_eq!(
                    body["identity"], "spiffe://cluster.local/ns/demo/sa/frontend",
                    "{body}"
                );
                assert!(
                    body["pod"].as_str().unwrap_or("").starts_with("backend-"),
                    "{body}"
                );
                served += 1;
            }
            Reply::Failed(why) => panic!("request failed after the route was up: {why}"),
        }
    }
    assert_eq!(served, 10);

    let target = backends[0]
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("backend pod IP");
    let target_name = backends[0].metadata.name.clone().expect("backend name");

    // Addressed to a backend pod's own IP (as a headless Service resolves),
    // the request still goes over mTLS: Strict serves it, to that pod.
    mesh::wait_for_proxy_sync(cluster, "demo", &fe, Duration::from_secs(60)).await?;
    let direct = format!("http://{target}:8080/api/items");
    match mesh::get_from_pod(cluster, "demo", &fe, &direct, &[]).await? {
        Reply::Ok(body) => {
            assert_eq!(
                body["identity"], "spiffe://cluster.local/ns/demo/sa/frontend",
                "{body}"
            );
            assert_eq!(body["pod"], target_name.as_str(), "{body}");
        }
        Reply::Failed(why) => panic!("frontend → backend pod IP failed: {why}"),
    }

    // Plaintext from an unmeshed pod straight to a backend pod is refused
    // by the backend's proxy, which says so.
    let plain = mesh::get_from_pod(
        cluster,
        "outside",
        &client_name,
        &format!("http://{target}:8080/api/items"),
        &[],
    )
    .await?;
    assert!(
        matches!(&plain, Reply::Failed(why) if why.contains("x-weft-error: plaintext-refused")),
        "plaintext was not refused by the proxy under Strict: {plain:?}"
    );

    // The admin port is never captured, so every pod reaches it: from the
    // unmeshed pod, a backend's probes and metrics answer, its config,
    // certificates and shutdown are refused, and its sidecar keeps running.
    let restarts_before = proxy_restarts(cluster, "demo", &target_name).await?;
    let admin = |path: &str| format!("http://{target}:15020{path}");
    for (method, path) in [("POST", "/shutdown"), ("GET", "/config"), ("GET", "/certs")] {
        let got =
            mesh::request_from_pod(cluster, "outside", &client_name, method, &admin(path)).await?;
        match got {
            Err(out) if out.contains("HTTP 403") => {}
            other => panic!("{method} {path} from another pod was not refused: {other:?}"),
        }
    }
    for path in ["/ready", "/metrics"] {
        let got =
            mesh::request_from_pod(cluster, "outside", &client_name, "GET", &admin(path)).await?;
        // A started shutdown would answer /ready with 503 (draining).
        assert!(got.is_ok(), "{path} from another pod: {got:?}");
    }
    // Inside the pod (loopback) the config is still served.
    let config = mesh::proxy_config(cluster, "demo", &target_name).await?;
    assert!(config["generation"].as_u64().is_some(), "{config}");
    assert_eq!(
        proxy_restarts(cluster, "demo", &target_name).await?,
        restarts_before,
        "the backend's sidecar restarted"
    );

    Ok(())
}

/// Restarts of the `weft-proxy` sidecar of `ns/pod`, from the pod's status.
async fn proxy_restarts(cluster: &Cluster, ns: &str, pod: &str) -> anyhow::Result<i32> {
    let api: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(cluster.client(), ns);
    let status = api.get(pod).await?.status;
    status
        .iter()
        .flat_map(|s| s.init_container_statuses.iter().flatten())
        .find(|c| c.name == "weft-proxy")
        .map(|c| c.restart_count)
        .ok_or_else(|| anyhow::anyhow!("{ns}/{pod} has no weft-proxy status"))
}
