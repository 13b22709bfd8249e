//! A real Prometheus (`/usr/bin/prometheus`) scraping a harness cluster with
//! the scrape jobs weft ships in `manifests/observability/`.
//!
//! ```text
//!  test (host netns)                         netns weft-<id> (the node)
//!  Prometheus::query ──127.0.0.1:<p>──▶ forward ──▶ 127.0.0.1:19090 prometheus
//!                                                      │ scrapes pod IPs 10.244.0.n
//!  refresher task: API server pod list ──▶ <dir>/sd/<job>.json (file_sd)
//! ```
//!
//! Debian's Prometheus is built without Kubernetes service discovery, so
//! the shipped jobs run with one change: each `kubernetes_sd_configs` (role
//! `pod`) becomes a `file_sd_configs` whose file the harness writes every
//! second from the API server's pod list, with exactly the
//! `__meta_kubernetes_*` labels Kubernetes discovery gives a pod target
//! ([`pod_targets`]). The shipped `relabel_configs` run unchanged in the
//! real Prometheus. Also changed: every interval is 1 s, and the injector
//! job's `ca_file` points at a copy of `ca.crt` of Secret
//! `weft-system/weft-injector-tls` the refresher keeps current, so the
//! injector's certificate is verified as the shipped job intends.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod, Secret};
use kube::Api;
use kube::api::ListParams;
use serde_json::{Value, json};

use crate::node_service::{NodeService, io};
use crate::{Cluster, HarnessError};

/// Debian's Prometheus server.
pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";
/// Debian's promtool.
pub const PROMTOOL_BIN: &str = "/usr/bin/promtool";
/// Where Prometheus listens inside the node's network namespace.
pub const LISTEN: &str = "127.0.0.1:19090";
/// The ConfigMap key holding weft's scrape jobs.
pub const SCRAPE_CONFIG_KEY: &str = "weft-scrape-configs.yml";
/// The Secret whose `ca.crt` verifies the injector's certificate.
pub const INJECTOR_CA_SECRET: (&str, &str) = ("weft-system", "weft-injector-tls");

const INSTALL_HINT: &str =
    "apt-get install -y --no-install-recommends prometheus (scripts/setup does)";

fn invalid(what: impl Into<String>) -> HarnessError {
    HarnessError::Command {
        cmd: "prometheus config".into(),
        status: "invalid".into(),
        stderr: what.into(),
    }
}

/// `manifests/observability/` of this checkout.
pub fn observability_dir() -> PathBuf {
    crate::mesh::repo_root().join("manifests/observability")
}

/// The scrape jobs weft ships: the `scrape_configs` list inside the
/// ConfigMap of `manifests/observability/prometheus-scrape.yaml`.
pub fn shipped_scrape_configs() -> Result<Vec<Value>, HarnessError> {
    let path = observability_dir().join("prometheus-scrape.yaml");
    let text = std::fs::read_to_string(&path).map_err(io(format!("reading {}", path.display())))?;
    let cm: Value =
        serde_saphyr::from_str(&text).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    let inner = cm["data"][SCRAPE_CONFIG_KEY]
        .as_str()
        .ok_or_else(|| invalid(format!("{}: no data.{SCRAPE_CONFIG_KEY}", path.display())))?;
    let file: Value =
        serde_saphyr::from_str(inner).map_err(|e| invalid(format!("{SCRAPE_CONFIG_KEY}: {e}")))?;
    file["scrape_configs"]
        .as_array()
        .cloned()
        .ok_or_else(|| invalid(format!("{SCRAPE_CONFIG_KEY}: no scrape_configs list")))
}

/// One job's discovery as the harness plays it.
#[derive(Debug, Clone)]
pub struct SdJob {
    /// `job_name`.
    pub job: String,
    /// The file_sd file the harness writes for it.
    pub file: PathBuf,
    /// `namespaces.names` of its Kubernetes discovery (empty: all).
    pub namespaces: Vec<String>,
}

/// The harness's Prometheus configuration, derived from the shipped jobs.
#[derive(Debug, Clone)]
pub struct HarnessConfig {
    /// The whole `prometheus.yml` (written as JSON, which is YAML).
    pub config: Value,
    /// The jobs whose discovery files the harness writes.
    pub jobs: Vec<SdJob>,
    /// The file every `tls_config.ca_file` now points at: the injector's CA.
    pub ca_file: PathBuf,
}

/// Rewrites the shipped jobs for the harness: `kubernetes_sd_configs`
/// (role `pod`, optionally `namespaces.names`) → `file_sd_configs` of
/// `<dir>/sd/<job>.json`; `scrape_interval`/`scrape_timeout` → `interval`;
/// `tls_config.ca_file` → `<dir>/injector-ca.crt`. Anything the harness
/// cannot reproduce faithfully (another role, label or field selectors,
/// other discovery mechanisms) is refused rather than approximated.
pub fn harness_config(
    scrape_configs: &[Value],
    dir: &Path,
    interval: Duration,
) -> Result<HarnessConfig, HarnessError> {
    let every = format!("{}ms", interval.as_millis());
    let ca_file = dir.join("injector-ca.crt");
    let mut jobs = Vec::new();
    let mut out = Vec::new();
    for sc in scrape_configs {
        let mut sc = sc
            .as_object()
            .cloned()
            .ok_or_else(|| invalid("a scrape config is not a mapping"))?;
        let job = sc
            .get("job_name")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("a scrape config has no job_name"))?
            .to_owned();
        for (key, _) in sc.iter() {
            if key.ends_with("_sd_configs") && key != "kubernetes_sd_configs" {
                return Err(invalid(format!(
                    "job {job}: {key} cannot be reproduced by the harness"
                )));
            }
        }
        let Some(Value::Array(sds)) = sc.remove("kubernetes_sd_configs") else {
            return Err(invalid(format!("job {job}: no kubernetes_sd_configs")));
        };
        let mut namespaces = Vec::new();
        for sd in &sds {
            let sd = sd
                .as_object()
                .ok_or_else(|| invalid(format!("job {job}: sd config not a mapping")))?;
            for (k, v) in sd {
                match k.as_str() {
                    "role" if v == "pod" => {}
                    "namespaces" => {
                        for (nk, nv) in v.as_object().into_iter().flatten() {
                            match (nk.as_str(), nv) {
                                ("names", Value::Array(names)) => namespaces.extend(
                                    names.iter().filter_map(Value::as_str).map(str::to_owned),
                                ),
                                ("own_namespace", Value::Bool(false)) => {}
                                _ => {
                                    return Err(invalid(format!(
                                        "job {job}: namespaces.{nk} cannot be reproduced by the harness"
                                    )));
                                }
                            }
                        }
                    }
                    _ => {
                        return Err(invalid(format!(
                            "job {job}: kubernetes_sd_configs {k}: {v} cannot be reproduced by the harness"
                        )));
                    }
                }
            }
        }
        let file = dir.join("sd").join(format!("{job}.json"));
        sc.insert(
            "file_sd_configs".into(),
            json!([{ "files": [file], "refresh_interval": every }]),
        );
        sc.insert("scrape_interval".into(), json!(every));
        sc.insert("scrape_timeout".into(), json!(every));
        if let Some(tls) = sc.get_mut("tls_config").and_then(Value::as_object_mut)
            && tls.contains_key("ca_file")
        {
            tls.insert("ca_file".into(), json!(ca_file));
        }
        jobs.push(SdJob {
            job,
            file,
            namespaces,
        });
        out.push(Value::Object(sc));
    }
    let config = json!({
        "global": {
            "scrape_interval": every,
            "scrape_timeout": every,
            "evaluation_interval": every,
        },
        "scrape_configs": out,
    });
    Ok(HarnessConfig {
        config,
        jobs,
        ca_file,
    })
}

/// A Kubernetes label or annotation name as a Prometheus label name part:
/// every character outside `[a-zA-Z0-9_]` becomes `_` (Prometheus's
/// `strutil.SanitizeLabelName`).
pub fn sanitize_label_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

const META: &str = "__meta_kubernetes_";

/// The targets Kubernetes service discovery (role `pod`, Prometheus 2.42)
/// makes of one pod, as file_sd target groups: none without a pod IP; else
/// one per declared port of each container and init container, and one per
/// container without ports (address: the bare pod IP). Each carries the
/// pod's labels (`__meta_kubernetes_namespace`, `_pod_name`, `_pod_ip`,
/// `_pod_ready`, `_pod_phase`, `_pod_node_name`, `_pod_host_ip`,
/// `_pod_uid`, `_pod_controller_kind`/`_name`, `_pod_label_<name>`,
/// `_pod_labelpresent_<name>`, `_pod_annotation_<name>`,
/// `_pod_annotationpresent_<name>`) and the target's (`_pod_container_name`,
/// `_id`, `_image`, `_init`, `_port_name`, `_port_number`, `_port_protocol`).
pub fn pod_targets(pod: &Pod) -> Vec<Value> {
    let status = pod.status.clone().unwrap_or_default();
    let Some(ip) = status.pod_ip.clone().filter(|ip| !ip.is_empty()) else {
        return Vec::new();
    };
    let spec = pod.spec.clone().unwrap_or_default();
    let meta = &pod.metadata;
    let mut common: BTreeMap<String, String> = BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        common.insert(format!("{META}{k}"), v.to_owned());
    };
    put("namespace", meta.namespace.as_deref().unwrap_or(""));
    put("pod_name", meta.name.as_deref().unwrap_or(""));
    put("pod_ip", &ip);
    let ready = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .map_or_else(|| "unknown".to_owned(), |c| c.status.to_lowercase());
    put("pod_ready", &ready);
    put("pod_phase", status.phase.as_deref().unwrap_or(""));
    put("pod_node_name", spec.node_name.as_deref().unwrap_or(""));
    put("pod_host_ip", status.host_ip.as_deref().unwrap_or(""));
    put("pod_uid", meta.uid.as_deref().unwrap_or(""));
    if let Some(owner) = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    {
        if !owner.kind.is_empty() {
            put("pod_controller_kind", &owner.kind);
        }
        if !owner.name.is_empty() {
            put("pod_controller_name", &owner.name);
        }
    }
    for (k, v) in meta.labels.iter().flatten() {
        let ln = sanitize_label_name(k);
        put(&format!("pod_label_{ln}"), v);
        put(&format!("pod_labelpresent_{ln}"), "true");
    }
    for (k, v) in meta.annotations.iter().flatten() {
        let ln = sanitize_label_name(k);
        put(&format!("pod_annotation_{ln}"), v);
        put(&format!("pod_annotationpresent_{ln}"), "true");
    }
    let id_of = |statuses: &Option<Vec<ContainerStatus>>, name: &str| {
        statuses
            .iter()
            .flatten()
            .find(|s| s.name == name)
            .and_then(|s| s.container_id.clone())
            .unwrap_or_default()
    };
    let containers = spec
        .containers
        .iter()
        .map(|c| (c, false))
        .chain(spec.init_containers.iter().flatten().map(|c| (c, true)));
    let mut groups = Vec::new();
    for (c, init) in containers {
        let statuses = if init {
            &status.init_container_statuses
        } else {
            &status.container_statuses
        };
        let mut target = common.clone();
        target.insert(format!("{META}pod_container_name"), c.name.clone());
        target.insert(format!("{META}pod_container_id"), id_of(statuses, &c.name));
        target.insert(
            format!("{META}pod_container_image"),
            c.image.clone().unwrap_or_default(),
        );
        target.insert(format!("{META}pod_container_init"), init.to_string());
        let ports = c.ports.clone().unwrap_or_default();
        if ports.is_empty() {
            groups.push(json!({ "targets": [ip], "labels": target }));
            continue;
        }
        for p in ports {
            let mut t = target.clone();
            let number = p.container_port.to_string();
            t.insert(
                format!("{META}pod_container_port_name"),
                p.name.clone().unwrap_or_default(),
            );
            t.insert(format!("{META}pod_container_port_number"), number.clone());
            t.insert(
                format!("{META}pod_container_port_protocol"),
                p.protocol.clone().unwrap_or_default(),
            );
            let addr = if ip.contains(':') {
                format!("[{ip}]:{number}")
            } else {
                format!("{ip}:{number}")
            };
            groups.push(json!({ "targets": [addr], "labels": t }));
        }
    }
    groups
}

/// The file_sd content of `job` for these pods (its namespaces only).
pub fn job_targets(job: &SdJob, pods: &[Pod]) -> Value {
    Value::Array(
        pods.iter()
            .filter(|p| {
                job.namespaces.is_empty()
                    || p.metadata
                        .namespace
                        .as_ref()
                        .is_some_and(|ns| job.namespaces.contains(ns))
            })
            .flat_map(pod_targets)
            .collect(),
    )
}

/// Writes `bytes` to `path` by rename, so Prometheus never reads half a file.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// One refresh: every job's targets from the pod list, and the injector CA.
async fn refresh(
    client: &kube::Client,
    jobs: &[SdJob],
    ca_file: &Path,
) -> Result<bool, HarnessError> {
    let pods: Api<Pod> = Api::all(client.clone());
    let list = pods.list(&ListParams::default()).await?.items;
    for job in jobs {
        let text = serde_json::to_vec_pretty(&job_targets(job, &list)).unwrap_or_default();
        if std::fs::read(&job.file).ok().as_deref() != Some(text.as_slice()) {
            write_atomic(&job.file, &text)
                .map_err(io(format!("writing {}", job.file.display())))?;
        }
    }
    let (ns, name) = INJECTOR_CA_SECRET;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let ca = secrets
        .get_opt(name)
        .await?
        .and_then(|s| s.data)
        .and_then(|d| d.get("ca.crt").map(|b| b.0.clone()));
    let Some(ca) = ca else {
        return Ok(false);
    };
    if std::fs::read(ca_file).ok().as_deref() != Some(ca.as_slice()) {
        write_atomic(ca_file, &ca).map_err(io("writing the injector CA"))?;
    }
    Ok(true)
}

/// A Prometheus server scraping a harness cluster with weft's shipped jobs
/// (see the module docs). Killed, with its discovery refresher, on drop.
#[derive(Debug)]
pub struct Prometheus {
    svc: NodeService,
    url: String,
    refresher: tokio::task::JoinHandle<()>,
}

impl Prometheus {
    /// Starts Prometheus in the node's network namespace with the shipped
    /// jobs rewritten for the harness ([`harness_config`]), its API
    /// forwarded to a host loopback port. Start it after weft is installed:
    /// it waits (up to 60 s) for the injector CA the injector job verifies
    /// with, since Prometheus refuses a job whose `ca_file` is missing.
    /// Returns once the server answers `/-/ready`.
    pub async fn start(cluster: &Cluster) -> Result<Self, HarnessError> {
        if cluster.is_external() {
            return Err(HarnessError::HarnessOnly("Prometheus::start"));
        }
        if !Path::new(PROMETHEUS_BIN).exists() {
            return Err(HarnessError::Prerequisite(format!(
                "{PROMETHEUS_BIN} not found: {INSTALL_HINT}"
            )));
        }
        let dir = NodeService::temp_dir(cluster, "prometheus")?;
        std::fs::create_dir_all(dir.path().join("sd")).map_err(io("prometheus sd dir"))?;
        let hc = harness_config(
            &shipped_scrape_configs()?,
            dir.path(),
            Duration::from_secs(1),
        )?;
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(
            &config_path,
            serde_json::to_vec_pretty(&hc.config).unwrap_or_default(),
        )
        .map_err(io("writing prometheus.yml"))?;

        let client = cluster.client();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match refresh(&client, &hc.jobs, &hc.ca_file).await {
                Ok(true) => break,
                Ok(false) | Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Ok(false) => {
                    return Err(HarnessError::Timeout(
                        Duration::from_secs(60),
                        format!(
                            "Secret {}/{} (the injector CA; install weft before starting Prometheus)",
                            INJECTOR_CA_SECRET.0, INJECTOR_CA_SECRET.1
                        ),
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        let refresher = {
            let (client, jobs, ca_file) = (client.clone(), hc.jobs.clone(), hc.ca_file.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    if let Err(e) = refresh(&client, &jobs, &ca_file).await {
                        tracing::debug!(error = %e, "prometheus discovery refresh");
                    }
                }
            })
        };

        let data = dir.path().join("data");
        let svc = NodeService::spawn(
            cluster,
            "prometheus",
            dir,
            Path::new(PROMETHEUS_BIN),
            &[
                format!("--config.file={}", config_path.display()).into(),
                format!("--storage.tsdb.path={}", data.display()).into(),
                format!("--web.listen-address={LISTEN}").into(),
            ],
        )?;
        let mut prom = Prometheus {
            url: svc.forward(LISTEN)?,
            svc,
            refresher,
        };
        let (probe, ready) = (prom.svc.prober(), format!("{}/-/ready", prom.url));
        prom.svc
            .wait_ready(|| {
                let (probe, ready) = (probe.clone(), ready.clone());
                async move { matches!(probe.get(&ready).await, Ok((200, _))) }
            })
            .await?;
        Ok(prom)
    }

    /// The HTTP API's base URL, on host loopback.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The `prometheus.yml` Prometheus runs.
    pub fn config_path(&self) -> PathBuf {
        self.svc.dir().join("prometheus.yml")
    }

    /// Prometheus's own log.
    pub fn log(&self) -> String {
        self.svc.log()
    }

    async fn send(&self, req: http::Request<Full<Bytes>>) -> Result<(u16, Bytes), HarnessError> {
        self.svc.send(req).await
    }

    async fn get(&self, path: &str) -> Result<(u16, Bytes), HarnessError> {
        let req = http::Request::get(format!("{}{path}", self.url))
            .body(Full::new(Bytes::new()))
            .map_err(|e| invalid(e.to_string()))?;
        self.send(req).await
    }

    /// An HTTP API call (`/api/v1/...`): its `data`, or an error with
    /// Prometheus's `error`.
    pub async fn api(&self, path: &str, form: &[(&str, &str)]) -> Result<Value, HarnessError> {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let req = http::Request::post(format!("{}{path}", self.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| invalid(e.to_string()))?;
        let (code, body) = self.send(req).await?;
        let v: Value = serde_json::from_slice(&body).map_err(|e| HarnessError::Command {
            cmd: format!("prometheus {path}"),
            status: format!("HTTP {code}"),
            stderr: format!("not JSON ({e}): {}", String::from_utf8_lossy(&body)),
        })?;
        if v["status"] != "success" {
            return Err(HarnessError::Command {
                cmd: format!("prometheus {path} {form:?}"),
                status: format!("HTTP {code} {}", v["errorType"]),
                stderr: v["error"].as_str().unwrap_or_default().to_owned(),
            });
        }
        Ok(v["data"].clone())
    }

    /// An instant query: the `data` of `/api/v1/query` (`resultType` and
    /// `result`). A PromQL syntax error is an error.
    pub async fn query(&self, promql: &str) -> Result<Value, HarnessError> {
        self.api("/api/v1/query", &[("query", promql)]).await
    }

    /// The scrape targets (`/api/v1/targets`: `activeTargets`, ...).
    pub async fn targets(&self) -> Result<Value, HarnessError> {
        let (code, body) = self.get("/api/v1/targets").await?;
        let v: Value = serde_json::from_slice(&body).map_err(|e| HarnessError::Command {
            cmd: "prometheus /api/v1/targets".into(),
            status: format!("HTTP {code}"),
            stderr: e.to_string(),
        })?;
        Ok(v["data"].clone())
    }

    /// Polls `promql` (every 500 ms) until `pred` holds for its `data`;
    /// returns that `data`. On timeout the error names the last answer.
    pub async fn wait_for(
        &self,
        promql: &str,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.query(promql).await {
                Ok(v) if pred(&v) => return Ok(v),
                Ok(v) => v["result"].to_string(),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout(
                    timeout,
                    format!("PromQL `{promql}` to hold; last: {last}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// The samples of an instant vector answer (`data` of [`Prometheus::query`]):
/// each series' labels (without `__name__`) and value.
pub fn samples(data: &Value) -> Vec<(BTreeMap<String, String>, f64)> {
    data["result"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let labels = s["metric"]
                .as_object()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|(k, _)| k != "__name__")
                .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_owned()))
                .collect();
            let value = s["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN);
            (labels, value)
        })
        .collect()
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}
