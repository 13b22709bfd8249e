//! A real Jaeger (the all-in-one `cmd/jaeger` of Jaeger v1.75, built by
//! `e2e/jaeger/build.sh`) receiving the proxies' spans in a harness cluster.
//!
//! ```text
//!  test (host netns)                        netns weft-<id> (the node)
//!  Jaeger::trace ──127.0.0.1:<p>──▶ forward ──▶ 127.0.0.1:16686 query API
//!                                               0.0.0.0:4318   OTLP/HTTP receiver
//!  pods 10.244.0.n ── proxies POST /v1/traces ──▶ 10.244.0.1:4318 (the node IP)
//! ```
//!
//! Jaeger v2 is an OpenTelemetry collector configured by a YAML file; the
//! harness writes one with in-memory storage, the OTLP/HTTP receiver only
//! (gRPC, Jaeger and Zipkin receivers off), the query service (HTTP API on
//! 127.0.0.1:16686, its gRPC API on 127.0.0.1:16685) and the health check
//! (127.0.0.1:13133), and its own metrics off. Only the query API and the
//! health check are forwarded to host loopback; the receiver is reached by
//! the pods at the node's address, inside the cluster's namespaces.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hyper::body::Bytes;
use serde_json::Value;

use crate::cluster::NODE_IP;
use crate::node_service::{NodeService, io};
use crate::{Cluster, HarnessError};

/// The OTLP/HTTP receiver's port, on every address of the node namespace.
pub const OTLP_HTTP_PORT: u16 = 4318;
/// Where the query service (HTTP API and UI) listens in the node namespace.
pub const QUERY_LISTEN: &str = "127.0.0.1:16686";
/// Where the query service's gRPC API listens in the node namespace.
pub const QUERY_GRPC_LISTEN: &str = "127.0.0.1:16685";
/// Where the health check listens in the node namespace.
pub const HEALTH_LISTEN: &str = "127.0.0.1:13133";

const BUILD_HINT: &str =
    "build it with e2e/jaeger/build.sh (needs Go and the Go module proxy; scripts/setup does)";

/// The Jaeger binary: `$WEFT_JAEGER_BIN`, else
/// `<repo>/target/jaeger/jaeger` (what `e2e/jaeger/build.sh` builds).
pub fn jaeger_bin() -> PathBuf {
    std::env::var_os("WEFT_JAEGER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::mesh::repo_root().join("target/jaeger/jaeger"))
}

/// The collector configuration the harness runs Jaeger with (see the
/// module docs).
pub fn config_yaml() -> String {
    format!(
        "service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: info
extensions:
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: {QUERY_LISTEN}
    grpc:
      endpoint: {QUERY_GRPC_LISTEN}
  healthcheckv2:
    use_v2: true
    http:
      endpoint: {HEALTH_LISTEN}
receivers:
  otlp:
    protocols:
      http:
        endpoint: 0.0.0.0:{OTLP_HTTP_PORT}
processors:
  batch:
    timeout: 200ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"
    )
}

/// A Jaeger all-in-one in a harness cluster's node namespace, with
/// in-memory storage (see the module docs). Killed on drop.
#[derive(Debug)]
pub struct Jaeger {
    svc: NodeService,
    url: String,
    health_url: String,
}

impl Jaeger {
    /// Starts Jaeger in the node's network namespace, its query API
    /// forwarded to a host loopback port ([`Jaeger::url`]); returns once
    /// the health check reports every component up and the query API
    /// answers. A missing binary is [`HarnessError::Prerequisite`], naming
    /// the command that builds it.
    pub async fn start(cluster: &Cluster) -> Result<Self, HarnessError> {
        if cluster.is_external() {
            return Err(HarnessError::HarnessOnly("Jaeger::start"));
        }
        let bin = jaeger_bin();
        if !bin.exists() {
            return Err(HarnessError::Prerequisite(format!(
                "{} not found: {BUILD_HINT}",
                bin.display()
            )));
        }
        let dir = NodeService::temp_dir(cluster, "jaeger")?;
        let config_path = dir.path().join("jaeger.yaml");
        std::fs::write(&config_path, config_yaml()).map_err(io("writing jaeger.yaml"))?;
        let svc = NodeService::spawn(
            cluster,
            "jaeger",
            dir,
            &bin,
            &["--config".into(), config_path.into_os_string()],
        )?;
        let mut jaeger = Jaeger {
            url: svc.forward(QUERY_LISTEN)?,
            health_url: svc.forward(HEALTH_LISTEN)?,
            svc,
        };
        let (health, query) = (
            format!("{}/status", jaeger.health_url),
            format!("{}/api/services", jaeger.url),
        );
        let svc = &mut jaeger.svc;
        let probe = svc.prober();
        svc.wait_ready(|| {
            let probe = probe.clone();
            let (health, query) = (health.clone(), query.clone());
            async move {
                matches!(probe.get(&health).await, Ok((200, _)))
                    && matches!(probe.get(&query).await, Ok((200, _)))
            }
        })
        .await?;
        Ok(jaeger)
    }

    /// The OTLP/HTTP endpoint pods export to (the node's address): the
    /// value for the Mesh's `telemetry.tracing.otlpEndpoint`.
    pub fn otlp_endpoint(&self) -> String {
        format!("http://{NODE_IP}:{OTLP_HTTP_PORT}")
    }

    /// The query API's (and UI's) base URL, on host loopback.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The configuration Jaeger runs.
    pub fn config_path(&self) -> PathBuf {
        self.svc.dir().join("jaeger.yaml")
    }

    /// Jaeger's own log.
    pub fn log(&self) -> String {
        self.svc.log()
    }

    async fn get(&self, path: &str) -> Result<(u16, Bytes), HarnessError> {
        self.svc.get(&format!("{}{path}", self.url)).await
    }

    /// A query API call (`/api/...`): its JSON answer, whatever the status.
    pub async fn api(&self, path: &str) -> Result<(u16, Value), HarnessError> {
        let (code, body) = self.get(path).await?;
        let v = serde_json::from_slice(&body).map_err(|e| HarnessError::Command {
            cmd: format!("jaeger {path}"),
            status: format!("HTTP {code}"),
            stderr: format!("not JSON ({e}): {}", String::from_utf8_lossy(&body)),
        })?;
        Ok((code, v))
    }

    /// The services Jaeger has spans of (`/api/services`).
    pub async fn services(&self) -> Result<Vec<String>, HarnessError> {
        let (_, v) = self.api("/api/services").await?;
        Ok(v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect())
    }

    /// The trace `trace_id` (32 hex digits) as the query API gives it
    /// (`/api/traces/<id>`: `traceID`, `spans`, `processes`), or `Null`
    /// while Jaeger has no span of it.
    pub async fn trace(&self, trace_id: &str) -> Result<Value, HarnessError> {
        let (code, v) = self.api(&format!("/api/traces/{trace_id}")).await?;
        match code {
            200 => Ok(v["data"][0].clone()),
            404 => Ok(Value::Null),
            _ => Err(HarnessError::Command {
                cmd: format!("jaeger /api/traces/{trace_id}"),
                status: format!("HTTP {code}"),
                stderr: v["errors"].to_string(),
            }),
        }
    }

    /// Polls the trace (every 250 ms) until `pred` holds for it ([`spans`]
    /// reads it); returns it. On timeout the error names the spans it had.
    pub async fn wait_for_trace(
        &self,
        trace_id: &str,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.trace(trace_id).await {
                Ok(t) if pred(&t) => return Ok(t),
                Ok(t) => format!("{:#?}", spans(&t)),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout(
                    timeout,
                    format!("trace {trace_id} in Jaeger; last: {last}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// One span of a trace from the query API, flattened.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// `service.name` of the span's process (resource).
    pub service: String,
    /// The span's name.
    pub operation: String,
    /// Its id (16 hex digits).
    pub span_id: String,
    /// Its `CHILD_OF` parent's id, if any.
    pub parent: Option<String>,
    /// `span.kind`: `client`, `server`, …
    pub kind: String,
    /// Every tag (span attribute), by key.
    pub tags: std::collections::BTreeMap<String, Value>,
}

impl Span {
    /// A tag's value as text (strings as they are, numbers and booleans
    /// printed).
    pub fn tag(&self, key: &str) -> Option<String> {
        self.tags.get(key).map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    }
}

/// The spans of a trace as [`Jaeger::trace`] returns it (none for `Null`).
pub fn spans(trace: &Value) -> Vec<Span> {
    let processes = &trace["processes"];
    trace["spans"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let tags: std::collections::BTreeMap<String, Value> = s["tags"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| Some((t["key"].as_str()?.to_owned(), t["value"].clone())))
                .collect();
            let parent = s["references"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["refType"] == "CHILD_OF")
                .and_then(|r| r["spanID"].as_str())
                .map(str::to_owned);
            let process = s["processID"].as_str().unwrap_or_default();
            Span {
                service: processes[process]["serviceName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                operation: s["operationName"].as_str().unwrap_or_default().to_owned(),
                span_id: s["spanID"].as_str().unwrap_or_default().to_owned(),
                parent,
                kind: tags
                    .get("span.kind")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                tags,
            }
        })
        .collect()
}
