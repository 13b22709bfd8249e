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

/// One request of a [`Load`]: when it was sent (since the load started) and
/// which pod answered (`Ok`), or what went wrong (`Err`: status and body,
/// or the connection error).
#[derive(Debug, Clone)]
pub struct Sample {
    /// Send time, from the start of the load.
    pub at: Duration,
    /// The serving pod's name, or the failure.
    pub outcome: Result<String, String>,
}

/// Counts of [`Sample`]s by serving pod, and the failures.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Pod name → requests it served.
    pub by_pod: std::collections::BTreeMap<String, usize>,
    /// Failed requests, in order.
    pub failures: Vec<String>,
}

impl Tally {
    /// Tallies `samples`.
    pub fn of<'a>(samples: impl IntoIterator<Item = &'a Sample>) -> Self {
        let mut t = Tally::default();
        for s in samples {
            match &s.outcome {
                Ok(pod) => *t.by_pod.entry(pod.clone()).or_default() += 1,
                Err(e) => t.failures.push(e.clone()),
            }
        }
        t
    }

    /// Counts by the pod name's Deployment-version part: `backend-v2-…` →
    /// `v2` (the demo's backends), any other name as is.
    pub fn by_version(&self) -> std::collections::BTreeMap<String, usize> {
        let mut v = std::collections::BTreeMap::new();
        for (pod, n) in &self.by_pod {
            let key = pod
                .split('-')
                .find(|p| {
                    p.len() >= 2 && p.starts_with('v') && p[1..].bytes().all(|b| b.is_ascii_digit())
                })
                .unwrap_or(pod);
            *v.entry(key.to_owned()).or_default() += n;
        }
        v
    }

    /// Requests answered.
    pub fn ok(&self) -> usize {
        self.by_pod.values().sum()
    }
}

/// One GET to `addr` (a new connection, `Connection: close`), from wherever
/// the calling task's sockets live; the body of a 2xx answer.
async fn http_get(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(String, String)],
) -> Result<String, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let code: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("malformed response: {head:?}"))?;
        if !(200..300).contains(&code) {
            return Err(format!("HTTP {code}: {}", last_line(body)));
        }
        Ok(body.to_owned())
    };
    tokio::time::timeout(Duration::from_secs(15), exchange)
        .await
        .unwrap_or_else(|_| Err("no answer within 15 s".into()))
}

/// [`http_get`] to the echo app: the `pod` of its answer.
async fn echo_get(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(String, String)],
) -> Result<String, String> {
    let body = http_get(addr, path, headers).await?;
    let v: Value =
        serde_json::from_str(body.trim()).map_err(|e| format!("not JSON ({e}): {body}"))?;
    Ok(v["pod"].as_str().unwrap_or("?").to_owned())
}

/// Sends `n` GETs one after another from inside pod `ns/pod` (its network
/// namespace, so through its sidecar) to the echo app behind `addr`, each
/// on a new connection; tallies who answered.
pub async fn send_from_pod(
    cluster: &Cluster,
    ns: &str,
    pod: &str,
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> Result<Tally, HarnessError> {
    let rt = cluster.pod_runtime(ns, pod)?;
    let path = path.to_owned();
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let samples = rt
        .spawn(async move {
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                out.push(Sample {
                    at: Duration::ZERO,
                    outcome: echo_get(addr, &path, &headers).await,
                });
            }
            out
        })
        .await
        .map_err(|e| HarnessError::Prerequisite(format!("request task failed: {e}")))?;
    Ok(Tally::of(&samples))
}

/// Continuous GETs from inside a pod (through its sidecar) until stopped,
/// one at a time, each on a new connection, every sample timestamped.
#[derive(Debug)]
pub struct Load {
    _rt: crate::netns::NetnsRuntime,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Sample>>,
    started: std::time::Instant,
}

impl Load {
    /// Starts sending from `ns/pod` to `addr` + `path`, pausing `pause`
    /// between requests.
    pub fn start(
        cluster: &Cluster,
        ns: &str,
        pod: &str,
        addr: std::net::SocketAddr,
        path: &str,
        pause: Duration,
    ) -> Result<Self, HarnessError> {
        let rt = cluster.pod_runtime(ns, pod)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let started = std::time::Instant::now();
        let path = path.to_owned();
        let flag = stop.clone();
        let task = rt.spawn(async move {
            let mut out = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let at = started.elapsed();
                let outcome = echo_get(addr, &path, &[]).await;
                out.push(Sample { at, outcome });
                tokio::time::sleep(pause).await;
            }
            out
        });
        Ok(Load {
            _rt: rt,
            stop,
            task,
            started,
        })
    }

    /// Time since the load started (the clock of [`Sample::at`]).
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops after the request in flight; every sample.
    pub async fn stop(self) -> Result<Vec<Sample>, HarnessError> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task
            .await
            .map_err(|e| HarnessError::Prerequisite(format!("load task failed: {e}")))
    }
}

/// Applies YAML with `kubectl apply -f -`.
pub async fn apply_yaml(cluster: &Cluster, yaml: &str) -> Result<String, HarnessError> {
    cluster
        .kubectl_stdin(&["apply", "-f", "-"], Some(yaml))
        .await
}

/// The demo's `ServiceRoute` for the backend with every request (no
/// matches) split between subsets v1 and v2 by these weights.
pub fn backend_split_route(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: weft.dev/v1alpha1
kind: ServiceRoute
metadata:
  name: backend
  namespace: demo
spec:
  service: backend
  http:
  - name: split
    backends:
    - subset: v1
      weight: {v1}
    - subset: v2
      weight: {v2}
"
    )
}

/// The config the sidecar of `ns/pod` is running (its admin `/config`, read
/// from inside the pod).
pub async fn proxy_config(cluster: &Cluster, ns: &str, pod: &str) -> Result<Value, HarnessError> {
    let rt = cluster.pod_runtime(ns, pod)?;
    let admin: std::net::SocketAddr = ([127, 0, 0, 1], 15020).into();
    let body = rt
        .spawn(async move { http_get(admin, "/config", &[]).await })
        .await
        .map_err(|e| HarnessError::Prerequisite(format!("request task failed: {e}")))?
        .map_err(|e| HarnessError::Prerequisite(format!("{ns}/{pod} admin /config: {e}")))?;
    serde_json::from_str(&body).map_err(|e| {
        HarnessError::Prerequisite(format!("{ns}/{pod} admin /config is not JSON: {e}"))
    })
}

/// Merges `spec` (JSON) into the spec of the `Mesh` named `default` with
/// `kubectl patch --type=merge`, as a user would.
pub async fn patch_mesh_spec(cluster: &Cluster, spec: &str) -> Result<String, HarnessError> {
    cluster
        .kubectl(&[
            "patch",
            "mesh",
            "default",
            "--type=merge",
            "-p",
            &format!(r#"{{"spec":{spec}}}"#),
        ])
        .await
}

/// Waits until the sidecar of `ns/pod` runs the operator's current view of
/// namespace `ns`, the way a user checks a rollout settled:
/// - every weft resource of `ns` has been judged (`status.observedGeneration`
///   equals `metadata.generation`);
/// - the proxy runs the config whose hash the `weft-proxy` ConfigMap
///   announces (kubelet delivered it and the proxy reloaded);
/// - in that config, each Service of `ns` has exactly the ready addresses
///   its EndpointSlices list (the operator saw the last endpoint change).
///
/// Returns how long that took.
pub async fn wait_for_proxy_sync(
    cluster: &Cluster,
    ns: &str,
    pod: &str,
    timeout: Duration,
) -> Result<Duration, HarnessError> {
    let start = std::time::Instant::now();
    cluster
        .wait_until(
            timeout,
            &format!("{ns}/{pod}'s proxy runs the current config of {ns}"),
            || async { proxy_in_sync(cluster, ns, pod).await },
        )
        .await?;
    Ok(start.elapsed())
}

async fn proxy_in_sync(cluster: &Cluster, ns: &str, pod: &str) -> Result<bool, HarnessError> {
    use k8s_openapi::api::core::v1::ConfigMap;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
    use std::collections::{BTreeMap, BTreeSet};

    for kind in ["ServiceRoute", "ServicePolicy", "AccessPolicy"] {
        let gvk = GroupVersionKind::gvk("weft.dev", "v1alpha1", kind);
        let api: Api<DynamicObject> =
            Api::namespaced_with(cluster.client(), ns, &ApiResource::from_gvk(&gvk));
        for obj in api.list(&ListParams::default()).await?.items {
            let observed = obj.data["status"]["observedGeneration"].as_i64();
            if observed.is_none() || observed != obj.metadata.generation {
                return Ok(false);
            }
        }
    }
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client(), ns);
    let Some(cm) = cms.get_opt("weft-proxy").await? else {
        return Ok(false);
    };
    let announced = cm
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("weft.dev/config-hash"))
        .cloned();
    let Ok(cfg) = proxy_config(cluster, ns, pod).await else {
        return Ok(false);
    };
    if announced.is_none() || cfg["hash"].as_str() != announced.as_deref() {
        return Ok(false);
    }
    let slices: Api<EndpointSlice> = Api::namespaced(cluster.client(), ns);
    let mut ready: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for slice in slices.list(&ListParams::default()).await?.items {
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
        else {
            continue;
        };
        let addrs = ready.entry(service.clone()).or_default();
        for ep in slice.endpoints {
            if ep.conditions.and_then(|c| c.ready) != Some(false) {
                addrs.extend(ep.addresses);
            }
        }
    }
    let services = cfg["services"].as_array().cloned().unwrap_or_default();
    Ok(ready.iter().all(|(name, want)| {
        let have: BTreeSet<String> = services
            .iter()
            .filter(|s| s["namespace"] == ns && s["name"] == name.as_str())
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .filter_map(|e| e["address"].as_str().map(str::to_owned))
            .collect();
        &have == want
    }))
}
