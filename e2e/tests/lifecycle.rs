//! The mesh over time, on the real control plane: the mTLS mode switched
//! between Strict and Permissive with kubectl, the operator killed and
//! restarted under traffic, and workload certificates rotated under
//! traffic. Traffic is the harness's `weft-e2e-app load` run inside the
//! frontend pod, so every request crosses both sidecars.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::serial;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use rustls_pki_types::pem::PemObject as _;
use weft_e2e::Cluster;
use weft_e2e::mesh::{self, Reply};

/// Installs weft, deploys the demo and waits until frontend → backend
/// works. Returns the frontend pod's name and the backend URL.
async fn meshed_demo(cluster: &Cluster) -> anyhow::Result<(String, String)> {
    mesh::install(cluster).await?;
    mesh::deploy_demo(cluster).await?;
    let frontend = mesh::pods(cluster, "demo", "frontend").await?;
    let fe = frontend[0].metadata.name.clone().expect("frontend name");
    let url = format!(
        "http://{}:8080/api/items",
        mesh::cluster_ip(cluster, "demo", "backend").await?
    );
    mesh::wait_for_route(cluster, "demo", &fe, &url, Duration::from_secs(60)).await?;
    mesh::wait_for_proxy_sync(cluster, "demo", &fe, Duration::from_secs(60)).await?;
    Ok((fe, url))
}

async fn set_mtls_mode(cluster: &Cluster, mode: &str) -> anyhow::Result<()> {
    mesh::patch_mesh_spec(cluster, &format!(r#"{{"mtls":{{"mode":"{mode}"}}}}"#)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_serves_plaintext_and_strict_refuses_it() -> anyhow::Result<()> {
    let _serial = serial().await;
    let cluster = Cluster::for_scenario().await?;
    let (fe, url) = meshed_demo(&cluster).await?;

    let client = mesh::pods(&cluster, "outside", "client").await?;
    let client = client[0].metadata.name.clone().expect("client name");
    let backend = mesh::pods(&cluster, "demo", "backend").await?;
    let target = format!(
        "http://{}:8080/api/items",
        backend[0]
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .expect("backend pod IP")
    );
    let plain = || mesh::get_from_pod(&cluster, "outside", &client, &target, &[]);

    // Strict: the backend's proxy refuses the connection itself, and says
    // why in a 403 of its own; the app never sees the request.
    let strict_refused = |r: &Reply| matches!(r, Reply::Failed(why) if why.contains("HTTP 403") && why.contains("x-weft-error: plaintext-refused"));
    let refused = plain().await?;
    assert!(
        strict_refused(&refused),
        "Strict answered plaintext: {refused:?}"
    );

    // Permissive reaches the backend's proxy through ConfigMap → volume →
    // reload. From then on the plaintext connection is accepted, and the
    // request meets authorization: the example AccessPolicy allows only
    // the frontend's identity, so the unauthenticated client gets 403.
    set_mtls_mode(&cluster, "Permissive").await?;
    cluster
        .wait_until(
            Duration::from_secs(60),
            "plaintext accepted, then denied",
            || async {
                Ok(matches!(plain().await?, Reply::Failed(why) if why.contains("HTTP 403") && why.contains("x-weft-error: denied")))
            },
        )
        .await?;
    // Without the AccessPolicy (and with the mesh's default Allow) it is
    // served, with no peer identity: nobody authenticated it.
    cluster
        .kubectl(&["delete", "accesspolicy", "-n", "demo", "--all"])
        .await?;
    cluster
        .wait_until(Duration::from_secs(60), "plaintext served", || async {
            Ok(matches!(plain().await?, Reply::Ok(_)))
        })
        .await?;
    match plain().await? {
        Reply::Ok(body) => {
            assert!(body["identity"].is_null(), "{body}");
            assert!(
                body["pod"].as_str().unwrap_or("").starts_with("backend-"),
                "{body}"
            );
        }
        Reply::Failed(why) => panic!("Permissive refused plaintext: {why}"),
    }
    // Meshed callers (through the Service) still arrive over mTLS with
    // their identity.
    match mesh::get_from_pod(&cluster, "demo", &fe, &url, &[]).await? {
        Reply::Ok(body) => assert_eq!(
            body["identity"], "spiffe://cluster.local/ns/demo/sa/frontend",
            "{body}"
        ),
        Reply::Failed(why) => panic!("meshed request failed under Permissive: {why}"),
    }

    // Back to Strict: plaintext is refused again.
    set_mtls_mode(&cluster, "Strict").await?;
    cluster
        .wait_until(Duration::from_secs(60), "plaintext refused", || async {
            Ok(strict_refused(&plain().await?))
        })
        .await?;

    cluster.shutdown();
    Ok(())
}

/// What `weft-e2e-app load` printed.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoadSummary {
    sent: u64,
    ok: u64,
    failed: u64,
    errors: Vec<String>,
    by_identity: BTreeMap<String, u64>,
}

/// Runs `weft-e2e-app load` in `ns/pod` against `url` for `seconds`.
async fn load(
    cluster: &Cluster,
    ns: &str,
    pod: &str,
    url: &str,
    seconds: u64,
) -> anyhow::Result<LoadSummary> {
    let app = cluster.pod_program("weft-e2e-app")?;
    let secs = seconds.to_string();
    let out = cluster
        .exec_in_pod(
            ns,
            pod,
            &[&app, "load", url, "--seconds", &secs, "--interval-ms", "20"],
        )
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).map_err(|e| {
        anyhow::anyhow!(
            "load printed no summary ({e}): {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// `name → resourceVersion` of the objects the operator writes in `ns`.
async fn written_versions(cluster: &Cluster, ns: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client(), ns);
    let cm = cms.get("weft-proxy").await?;
    out.insert(
        "configmap/weft-proxy".to_owned(),
        cm.metadata.resource_version.unwrap_or_default(),
    );
    let secrets: Api<Secret> = Api::namespaced(cluster.client(), ns);
    for name in mesh::identity_secrets(cluster, ns).await? {
        let s = secrets.get(&name).await?;
        out.insert(
            format!("secret/{name}"),
            s.metadata.resource_version.unwrap_or_default(),
        );
    }
    Ok(out)
}

async fn lease_holder(cluster: &Cluster) -> anyhow::Result<Option<String>> {
    let leases: Api<Lease> = Api::namespaced(cluster.client(), "weft-system");
    let lease = leases.get_opt("weft-operator").await?;
    Ok(lease
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty()))
}

/// Write calls (not reads, not leader election, not Events) the operator's
/// service account made, from the API server's audit log; `None` on a
/// cluster whose audit log the harness cannot read (`WEFT_E2E_KUBECONFIG`).
fn operator_writes(cluster: &Cluster) -> anyhow::Result<Option<Vec<String>>> {
    if cluster.is_external() {
        return Ok(None);
    }
    Ok(Some(
        cluster
            .audit_events()?
            .into_iter()
            .filter(|e| e["user"]["username"] == "system:serviceaccount:weft-system:weft-operator")
            .filter(|e| {
                matches!(
                    e["verb"].as_str(),
                    Some("create" | "update" | "patch" | "delete" | "deletecollection")
                )
            })
            .filter(|e| {
                !matches!(
                    e["objectRef"]["resource"].as_str(),
                    Some("leases" | "events")
                )
            })
            .map(|e| {
                format!(
                    "{} {}/{}{} {}",
                    e["verb"].as_str().unwrap_or(""),
                    e["objectRef"]["namespace"].as_str().unwrap_or("-"),
                    e["objectRef"]["resource"].as_str().unwrap_or(""),
                    e["objectRef"]["subresource"]
                        .as_str()
                        .map(|s| format!("/{s}"))
                        .unwrap_or_default(),
                    e["objectRef"]["name"].as_str().unwrap_or(""),
                )
            })
            .collect(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_killed_and_restarted_under_traffic() -> anyhow::Result<()> {
    let _serial = serial().await;
    let cluster = Cluster::for_scenario().await?;
    let (fe, url) = meshed_demo(&cluster).await?;

    // Let the operator settle: its last write is behind us when the
    // written objects stop changing.
    let mut before = written_versions(&cluster, "demo").await?;
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = written_versions(&cluster, "demo").await?;
        if now == before {
            break;
        }
        before = now;
    }
    let holder = lease_holder(&cluster)
        .await?
        .expect("a leader holds the lease");
    let writes_before = operator_writes(&cluster)?.map(|w| w.len());

    // Traffic for the whole kill/restart; every operator pod is killed
    // without a grace period while it runs.
    let traffic = {
        let cluster = &cluster;
        let (fe, url) = (fe.clone(), url.clone());
        async move { load(cluster, "demo", &fe, &url, 30).await }
    };
    let restart = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        cluster
            .kubectl(&[
                "delete",
                "pod",
                "-n",
                "weft-system",
                "-l",
                "app.kubernetes.io/name=weft-operator",
                "--grace-period=0",
                "--force",
                "--wait=false",
            ])
            .await?;
        cluster
            .wait_until(Duration::from_secs(60), "a new operator leader", || async {
                Ok(matches!(lease_holder(&cluster).await, Ok(Some(h)) if h != holder))
            })
            .await?;
        cluster
            .wait_deployment_ready("weft-system", "weft-operator", Duration::from_secs(60))
            .await?;
        anyhow::Ok(())
    };
    let (summary, restarted) = tokio::join!(traffic, restart);
    restarted?;
    let summary = summary?;
    eprintln!("traffic across the operator restart: {summary:?}");
    assert!(summary.sent > 100, "{summary:?}");
    assert_eq!(summary.failed, 0, "{summary:?}");
    assert_eq!(summary.ok, summary.sent, "{summary:?}");

    // The new leader rebuilt its state from the cluster and found nothing
    // to change: no object it owns was rewritten. Give it time to finish
    // its first full reconcile before looking.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = written_versions(&cluster, "demo").await?;
    assert_eq!(before, after, "objects rewritten after the restart");
    // The audit log also shows writes that changed nothing (harness only).
    if let (Some(writes), Some(before)) = (operator_writes(&cluster)?, writes_before) {
        assert_eq!(
            writes[before..].to_vec(),
            Vec::<String>::new(),
            "the restarted operator wrote"
        );
    }

    cluster.shutdown();
    Ok(())
}

/// `notAfter` (Unix seconds) of the leaf in an identity Secret.
async fn leaf_not_after(cluster: &Cluster, ns: &str, sa: &str) -> anyhow::Result<i64> {
    let secrets: Api<Secret> = Api::namespaced(cluster.client(), ns);
    let s = secrets.get(&format!("weft-identity-{sa}")).await?;
    let pem = s
        .data
        .as_ref()
        .and_then(|d| d.get("tls.crt"))
        .map(|b| b.0.clone())
        .ok_or_else(|| anyhow::anyhow!("weft-identity-{sa} has no tls.crt"))?;
    let der = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
        .next()
        .ok_or_else(|| anyhow::anyhow!("weft-identity-{sa}: no certificate"))??;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)?;
    Ok(cert.validity().not_after.timestamp())
}

/// `notAfter` of the certificate the proxy of `demo/pod` serves (admin
/// `/certs`, served to loopback clients only: asked from inside the pod).
async fn proxy_not_after(cluster: &Cluster, pod: &str) -> anyhow::Result<i64> {
    let url = "http://127.0.0.1:15020/certs";
    match mesh::get_from_pod(cluster, "demo", pod, url, &[]).await? {
        Reply::Ok(v) => v["notAfter"]
            .as_i64()
            .ok_or_else(|| anyhow::anyhow!("/certs without notAfter: {v}")),
        Reply::Failed(why) => anyhow::bail!("{url}: {why}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_traffic() -> anyhow::Result<()> {
    let _serial = serial().await;
    let cluster = Cluster::for_scenario().await?;
    // The demo applies manifests/examples, whose Mesh sets a 24 h TTL.
    let (fe, url) = meshed_demo(&cluster).await?;
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    };
    for sa in ["frontend", "backend"] {
        let left = leaf_not_after(&cluster, "demo", sa).await? - now();
        assert!(left > 3600, "{sa}: a day-long leaf first, {left}s left");
    }
    // Shortening the TTL replaces the day-long leaves at once. Workload
    // certificates then live 18 s and are renewed every 12 s: several
    // rotations fit in the traffic window below.
    mesh::patch_mesh_spec(&cluster, r#"{"certificates":{"ttl":"18s"}}"#).await?;
    cluster
        .wait_until(
            Duration::from_secs(30),
            "leaves re-issued for the shortened TTL",
            || async {
                for sa in ["frontend", "backend"] {
                    match leaf_not_after(&cluster, "demo", sa).await {
                        Ok(at) if at - now() <= 60 => {}
                        _ => return Ok(false),
                    }
                }
                Ok(true)
            },
        )
        .await?;

    let mut seen: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    let watch_serials = async {
        let end = tokio::time::Instant::now() + Duration::from_secs(40);
        while tokio::time::Instant::now() < end {
            for sa in ["frontend", "backend"] {
                let not_after = leaf_not_after(&cluster, "demo", sa).await?;
                let list = seen.entry(sa).or_default();
                if list.last() != Some(&not_after) {
                    list.push(not_after);
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        anyhow::Ok(())
    };
    let (summary, watched) = tokio::join!(load(&cluster, "demo", &fe, &url, 40), watch_serials);
    watched?;
    let summary = summary?;
    eprintln!(
        "traffic across rotations: {summary:?}; certificates seen: frontend {}, backend {}",
        seen["frontend"].len(),
        seen["backend"].len()
    );
    // 40 s of a 12 s renewal period: at least two new certificates each.
    assert!(
        seen["frontend"].len() >= 3,
        "frontend certificate did not rotate"
    );
    assert!(
        seen["backend"].len() >= 3,
        "backend certificate did not rotate"
    );
    assert!(summary.sent > 200, "{summary:?}");
    assert_eq!(summary.failed, 0, "failed requests: {:?}", summary.errors);
    // Every answer came over mTLS with the frontend's identity.
    assert_eq!(
        summary
            .by_identity
            .get("spiffe://cluster.local/ns/demo/sa/frontend"),
        Some(&summary.ok),
        "{summary:?}"
    );

    // The proxies serve the renewed certificates: each one's loaded leaf
    // is newer than the first one issued to its service account and is
    // the one in the Secret now (allowing for a renewal in between).
    for (app, sa) in [("frontend", "frontend"), ("backend", "backend")] {
        for pod in mesh::pods(&cluster, "demo", app).await? {
            let name = pod.metadata.name.clone().expect("pod name");
            cluster
                .wait_until(
                    Duration::from_secs(20),
                    "proxy serves the current certificate",
                    || async {
                        let served = proxy_not_after(&cluster, &name).await.ok();
                        let current = leaf_not_after(&cluster, "demo", sa).await.ok();
                        Ok(served.is_some() && served == current && served > Some(seen[sa][0]))
                    },
                )
                .await?;
        }
    }

    cluster.shutdown();
    Ok(())
}
