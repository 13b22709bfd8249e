//! weft on the harness the way a platform team meets it: install from
//! `manifests/` with kubectl, deploy the demo app, send requests from
//! inside pods. Shared by the `weft-demo` binary and the scenario tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::Api;
use kube::api::ListParams;
use serde_json::Value;

use crate::{Cluster, HarnessError, ImageMap};

/// The repository root (manifests, examples and the demo app live there).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ sits in the repository root")
        .to_path_buf()
}

fn path_arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `kubectl apply --server-side -k manifests/`, then waits for the operator
/// and injector Deployments. A fresh cluster does not know weft's kinds
/// until the CRDs are established, so the first apply may refuse the
/// default `Mesh`; like a user, apply again once the CRDs are in.
pub async fn install(cluster: &Cluster) -> Result<(), HarnessError> {
    let manifests = path_arg(&repo_root().join("manifests"));
    let mut last = None;
    for _ in 0..5 {
        let out = cluster
            .kubectl_output(&["apply", "--server-side", "-k", &manifests], None)
            .await?;
        if out.status.success() {
            last = None;
            break;
        }
        last = Some(String::from_utf8_lossy(&out.stderr).into_owned());
        cluster
            .kubectl_output(
                &[
                    "wait",
                    "--for",
                    "condition=established",
                    "--timeout=30s",
                    "crd",
                    "--all",
                ],
                None,
            )
            .await?;
    }
    if let Some(stderr) = last {
        return Err(HarnessError::Command {
            cmd: format!("kubectl apply --server-side -k {manifests}"),
            status: "failed 5 times".into(),
            stderr,
        });
    }
    for name in ["weft-operator", "weft-injector"] {
        cluster
            .wait_deployment_ready("weft-system", name, Duration::from_secs(120))
            .await?;
    }
    Ok(())
}

/// Applies the demo app (`e2e/demo/app.yaml`) and the examples, and waits
/// until every demo Deployment is ready.
pub async fn deploy_demo(cluster: &Cluster) -> Result<(), HarnessError> {
    let app = path_arg(&repo_root().join("e2e/demo/app.yaml"));
    cluster.kubectl(&["apply", "-f", &app]).await?;
    let examples = path_arg(&repo_root().join("manifests/examples"));
    cluster.kubectl(&["apply", "-f", &examples]).await?;
    for (ns, name) in [
        ("demo", "frontend"),
        ("demo", "backend-v1"),
        ("demo", "backend-v2"),
        ("outside", "client"),
    ] {
        cluster
            .wait_deployment_ready(ns, name, Duration::from_secs(120))
            .await?;
    }
    Ok(())
}

/// Names of the pods of namespace `ns` whose `app` label is `app`.
pub async fn pods(cluster: &Cluster, ns: &str, app: &str) -> Result<Vec<Pod>, HarnessError> {
    let api: Api<Pod> = Api::namespaced(cluster.client(), ns);
    let list = api
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await?;
    Ok(list.items)
}

/// The ClusterIP of a Service.
pub async fn cluster_ip(cluster: &Cluster, ns: &str, name: &str) -> Result<String, HarnessError> {
    let api: Api<Service> = Api::namespaced(cluster.client(), ns);
    let svc = api.get(name).await?;
    svc.spec
        .and_then(|s| s.cluster_ip)
        .ok_or_else(|| HarnessError::Prerequisite(format!("service {ns}/{name} has no ClusterIP")))
}

/// Identity Secrets (`weft-identity-*`) in a namespace.
pub async fn identity_secrets(cluster: &Cluster, ns: &str) -> Result<Vec<String>, HarnessError> {
    let api: Api<Secret> = Api::namespaced(cluster.client(), ns);
    let mut names: Vec<String> = api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .filter(|n| n.starts_with("weft-identity-"))
        .collect();
    names.sort();
    Ok(names)
}

/// What one request from inside a pod returned.
#[derive(Debug, Clone)]
pub enum Reply {
    /// The echo server answered: its JSON body.
    Ok(Value),
    /// The request failed: what the client printed.
    Failed(String),
}

/// Sends one HTTP GET from inside pod `ns/pod` (its network namespace, so
/// through its sidecar when it has one) with the harness's test client.
pub async fn get_from_pod(
    cluster: &Cluster,
    ns: &str,
    pod: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, HarnessError> {
    let images = ImageMap::workspace();
    let app = images
        .program_for_image("weft-e2e-app")
        .map(path_arg)
        .ok_or_else(|| HarnessError::Prerequisite("weft-e2e-app is not built".into()))?;
    let mut cmd: Vec<String> = vec![app, "get".into(), url.into()];
    for (k, v) in headers {
        cmd.push("--header".into());
        cmd.push(format!("{k}: {v}"));
    }
    let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let out = cluster.exec_in_pod(ns, pod, &args).await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(serde_json::from_str(&stdout)
            .map(Reply::Ok)
            .unwrap_or(Reply::Failed(format!("not JSON: {stdout}"))))
    } else {
        Ok(Reply::Failed(format!(
            "{}{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// The error line of a failed command's output (`Error: ...`), else its
/// last non-empty line.
pub fn last_line(text: &str) -> String {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    lines
        .clone()
        .find(|l| l.starts_with("Error"))
        .or_else(|| lines.next_back())
        .unwrap_or("")
        .to_owned()
}

/// Waits until a request from `ns/pod` to `url` succeeds: the pod's proxy
/// has loaded a config with the destination's endpoints (the operator's
/// write, kubelet's volume sync and the proxy's reload all took place).
/// Returns how long that took.
pub async fn wait_for_route(
    cluster: &Cluster,
    ns: &str,
    pod: &str,
    url: &str,
    timeout: Duration,
) -> Result<Duration, HarnessError> {
    let start = std::time::Instant::now();
    cluster
        .wait_until(timeout, &format!("{ns}/{pod} → {url}"), || async {
            Ok(matches!(
                get_from_pod(cluster, ns, pod, url, &[]).await?,
                Reply::Ok(_)
            ))
        })
        .await?;
    Ok(start.elapsed())
}
