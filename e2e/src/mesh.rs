//! weft on the harness the way a platform team meets it: install from
//! `manifests/` with kubectl, deploy the demo app, send requests from
//! inside pods. Shared by the `weft-demo` binary and the scenario tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::Api;
use kube::api::ListParams;
use serde_json::Value;

use crate::{Cluster, HarnessError};

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
    let manifests = manifests_dir();
    if cluster.is_external() {
        // Start from a clean cluster (an interrupted run may have left
        // weft or the demo behind) and leave one.
        uninstall(cluster).await?;
        cluster.on_teardown(&uninstall_args(&manifests));
    }
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

/// The kustomization weft is installed from: `$WEFT_E2E_MANIFESTS` (an
/// overlay of `manifests/` with the images of a real cluster's registry),
/// else `manifests/`.
pub fn manifests_dir() -> String {
    std::env::var("WEFT_E2E_MANIFESTS")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| path_arg(&repo_root().join("manifests")))
}

/// A release channel of the Gateway API CRDs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// What most users install: `HTTPRoute`, `Gateway`, `GatewayClass`,
    /// `ReferenceGrant`, `GRPCRoute`.
    Standard,
    /// The standard kinds plus experimental ones, among them `TLSRoute`
    /// (TLS passthrough listeners).
    Experimental,
}

impl Channel {
    fn as_str(self) -> &'static str {
        match self {
            Channel::Standard => "standard",
            Channel::Experimental => "experimental",
        }
    }
}

/// Installs the Kubernetes Gateway API CRDs (`gateway.networking.k8s.io`)
/// of `channel`, whose `HTTPRoute`s, `TLSRoute`s (experimental) and
/// `ReferenceGrant`s weft reads.
/// They are not weft's to ship: a cluster holds one copy of them, users
/// install the upstream release, and weft's manifests
/// never write them. The harness installs that same release, from the
/// module pinned in `e2e/gateway-api/go.mod` (`crds.sh` prints where its
/// CRDs are), with `kubectl apply --server-side`, and waits until the kinds
/// weft meets are established.
///
/// Applying again changes nothing, so a second call, or a cluster that
/// already has this release, is fine; on a cluster with another release
/// the apply fails on the conflicting fields rather than replace it. The
/// CRDs stay when an external cluster is torn down: deleting one would
/// delete every object of its kind, not only the harness's.
pub async fn install_gateway_api(cluster: &Cluster, channel: Channel) -> Result<(), HarnessError> {
    let crds = gateway_api_crds_dir(channel).await?;
    // The experimental directory is a kustomization (its file lists the
    // CRDs); the standard one holds the CRDs alone.
    let how = if std::path::Path::new(&crds)
        .join("kustomization.yaml")
        .exists()
    {
        "-k"
    } else {
        "-f"
    };
    let apply = [
        "apply",
        "--server-side",
        "--field-manager=weft-e2e",
        how,
        &crds,
    ];
    let out = cluster.kubectl_output(&apply, None).await?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            cmd: format!("kubectl {}", apply.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let mut wait = vec![
        "wait",
        "--for",
        "condition=established",
        "--timeout=60s",
        "crd/httproutes.gateway.networking.k8s.io",
        "crd/referencegrants.gateway.networking.k8s.io",
        "crd/gateways.gateway.networking.k8s.io",
        "crd/gatewayclasses.gateway.networking.k8s.io",
    ];
    if channel == Channel::Experimental {
        wait.push("crd/tlsroutes.gateway.networking.k8s.io");
    }
    cluster.kubectl(&wait).await?;
    Ok(())
}

/// Applies weft's `GatewayClass` (`manifests/gateway/`), as a user does
/// after the Gateway API CRDs.
pub async fn install_gateway_class(cluster: &Cluster) -> Result<(), HarnessError> {
    let dir = path_arg(&repo_root().join("manifests/gateway"));
    cluster.kubectl(&["apply", "-k", &dir]).await?;
    Ok(())
}

/// The directory of the pinned Gateway API release's CRDs of `channel`:
/// what `e2e/gateway-api/crds.sh` prints (it downloads the module first
/// when Go's module cache lacks it).
async fn gateway_api_crds_dir(channel: Channel) -> Result<String, HarnessError> {
    let script = repo_root().join("e2e/gateway-api/crds.sh");
    let out = tokio::process::Command::new(&script)
        .arg(channel.as_str())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| HarnessError::Io {
            what: format!("running {}", script.display()),
            source,
        })?;
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || dir.is_empty() {
        return Err(HarnessError::Command {
            cmd: path_arg(&script),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(dir)
}

/// `kubectl delete` of the demo app, waiting until it is gone.
fn remove_demo_args(app: &str) -> [&str; 6] {
    [
        "delete",
        "-f",
        app,
        "--ignore-not-found",
        "--wait=true",
        "--timeout=180s",
    ]
}

fn uninstall_args(manifests: &str) -> [&str; 6] {
    [
        "delete",
        "-k",
        manifests,
        "--ignore-not-found",
        "--wait=true",
        "--timeout=180s",
    ]
}

/// Removes the demo app and weft (what [`deploy_demo`] and [`install`]
/// applied), waiting until they are gone.
pub async fn uninstall(cluster: &Cluster) -> Result<(), HarnessError> {
    let app = path_arg(&repo_root().join("e2e/demo/app.yaml"));
    cluster.kubectl(&remove_demo_args(&app)).await?;
    // Without weft's CRDs, kubectl cannot map the default Mesh and says
    // so, after deleting everything else; that is nothing left to delete.
    let manifests = manifests_dir();
    let args = uninstall_args(&manifests);
    let out = cluster.kubectl_output(&args, None).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let unmapped = |l: &str| {
        l.contains("no matches for kind") || l.contains("ensure CRDs are installed first")
    };
    if !out.status.success()
        && !stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .all(unmapped)
    {
        return Err(HarnessError::Command {
            cmd: format!("kubectl {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: stderr.into_owned(),
        });
    }
    Ok(())
}

/// The demo app's YAML: `e2e/demo/app.yaml`, with its image replaced by
/// `$WEFT_E2E_APP_IMAGE` when set (a real cluster's registry).
pub fn demo_app_yaml() -> Result<String, HarnessError> {
    let path = repo_root().join("e2e/demo/app.yaml");
    let text = std::fs::read_to_string(&path).map_err(|source| HarnessError::Io {
        what: format!("reading {}", path.display()),
        source,
    })?;
    Ok(match std::env::var("WEFT_E2E_APP_IMAGE") {
        Ok(image) if !image.is_empty() => {
            text.replace("image: weft-e2e-app\n", &format!("image: {image}\n"))
        }
        _ => text,
    })
}

/// Applies the demo app (`e2e/demo/app.yaml`) and the examples, and waits
/// until every demo Deployment is ready.
pub async fn deploy_demo(cluster: &Cluster) -> Result<(), HarnessError> {
    let app = path_arg(&repo_root().join("e2e/demo/app.yaml"));
    cluster.on_teardown(&remove_demo_args(&app));
    cluster
        .kubectl_stdin(&["apply", "-f", "-"], Some(&demo_app_yaml()?))
        .await?;
    let examples = path_arg(&repo_root().join("manifests/examples"));
    cluster.kubectl(&["apply", "-f", &examples]).await?;
    for (ns, name) in [
        ("demo", "frontend"),
        ("demo", "backend-v1"),
        ("demo", "backend-v2"),
        ("demo", "store"),
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
    let app = cluster.pod_program("weft-e2e-app")?;
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

/// Sends one HTTP request with an empty body (`method` as given) from inside
/// pod `ns/pod` with the harness's test client: the body of a 2xx answer,
/// else what the client printed (`HTTP <code>: <body>` for an answer).
pub async fn request_from_pod(
    cluster: &Cluster,
    ns: &str,
    pod: &str,
    method: &str,
    url: &str,
) -> Result<Result<String, String>, HarnessError> {
    let app = cluster.pod_program("weft-e2e-app")?;
    let out = cluster
        .exec_in_pod(ns, pod, &[&app, "get", "--method", method, url])
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    })
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

/// One line of `weft-e2e-app send` / `stream`: who answered, or why not.
fn outcome_of(line: &Value) -> Result<String, String> {
    match (line["pod"].as_str(), line["error"].as_str()) {
        (Some(pod), _) => Ok(pod.to_owned()),
        (None, Some(e)) => Err(e.to_owned()),
        (None, None) => Err(format!("unexpected client output: {line}")),
    }
}

/// Sends `n` GETs one after another from inside pod `ns/pod` (through its
/// sidecar) to the echo app behind `addr`, each on a new connection, with
/// `weft-e2e-app send`; tallies who answered.
pub async fn send_from_pod(
    cluster: &Cluster,
    ns: &str,
    pod: &str,
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> Result<Tally, HarnessError> {
    let app = cluster.pod_program("weft-e2e-app")?;
    let count = n.to_string();
    let url = format!("http://{addr}{path}");
    let mut cmd: Vec<String> = vec![app, "send".into(), url, "--count".into(), count];
    for (k, v) in headers {
        cmd.push("--header".into());
        cmd.push(format!("{k}: {v}"));
    }
    let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let out = cluster.exec_in_pod(ns, pod, &args).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let samples: Vec<Sample> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| Sample {
            at: Duration::ZERO,
            outcome: outcome_of(&v),
        })
        .collect();
    if samples.len() != n {
        return Err(HarnessError::Command {
            cmd: format!("weft-e2e-app send in {ns}/{pod}"),
            status: format!("{} of {n} results", samples.len()),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(Tally::of(&samples))
}

/// Continuous GETs from inside a pod (through its sidecar) until stopped,
/// one at a time, each on a new connection, every sample timestamped:
/// `weft-e2e-app stream`, running in the pod until its stdin closes.
#[derive(Debug)]
pub struct Load {
    child: tokio::process::Child,
    started: std::time::Instant,
}

impl Load {
    /// Starts sending from `ns/pod` to `addr` + `path`, pausing `pause`
    /// between requests. [`Sample::at`] is measured by the sender from its
    /// own start, which is this call's to within the program's start-up.
    pub async fn start(
        cluster: &Cluster,
        ns: &str,
        pod: &str,
        addr: std::net::SocketAddr,
        path: &str,
        pause: Duration,
    ) -> Result<Self, HarnessError> {
        let app = cluster.pod_program("weft-e2e-app")?;
        let url = format!("http://{addr}{path}");
        let interval = pause.as_millis().to_string();
        let child = cluster
            .spawn_in_pod(ns, pod, &[&app, "stream", &url, "--interval-ms", &interval])
            .await?;
        Ok(Load {
            child,
            started: std::time::Instant::now(),
        })
    }

    /// Time since the load started (the clock of [`Sample::at`]).
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops after the request in flight; every sample.
    pub async fn stop(mut self) -> Result<Vec<Sample>, HarnessError> {
        drop(self.child.stdin.take());
        let out = tokio::time::timeout(Duration::from_secs(30), self.child.wait_with_output())
            .await
            .map_err(|_| HarnessError::Timeout(Duration::from_secs(30), "the load to stop".into()))?
            .map_err(|source| HarnessError::Io {
                what: "load".into(),
                source,
            })?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let samples: Vec<Sample> = stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| Sample {
                at: Duration::from_millis(v["atMs"].as_u64().unwrap_or(0)),
                outcome: outcome_of(&v),
            })
            .collect();
        if samples.is_empty() {
            return Err(HarnessError::Command {
                cmd: "weft-e2e-app stream".into(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(samples)
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
    match get_from_pod(cluster, ns, pod, "http://127.0.0.1:15020/config", &[]).await? {
        Reply::Ok(v) => Ok(v),
        Reply::Failed(why) => Err(HarnessError::Prerequisite(format!(
            "{ns}/{pod} admin /config: {why}"
        ))),
    }
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
