//! Distributed tracing end to end, read back from a real Jaeger: with the
//! Mesh pointing its proxies at Jaeger's OTLP/HTTP receiver, a request
//! frontend → backend → store (the backend app passes the trace headers on)
//! is one trace of four spans, one per proxy, each the child of the one
//! before, with weft's attributes; the access logs of both proxies of each
//! hop name the same request id and trace id; a request aborted by an
//! injected fault is a trace of the frontend's client span alone, marked
//! with the step that answered.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::serial;
use serde_json::Value;
use weft_e2e::Cluster;
use weft_e2e::jaeger::{self, Jaeger, Span};
use weft_e2e::mesh::{self, Reply};

const WAIT: Duration = Duration::from_secs(90);

/// The examples allow the frontend only `/` and `/api/*` on the backend;
/// this adds the traced chain's path (Allow policies add up).
const CHAIN_ACCESS: &str = "apiVersion: weft.dev/v1alpha1
kind: AccessPolicy
metadata:
  name: backend-allow-chain
  namespace: demo
spec:
  targetService: backend
  action: Allow
  rules:
  - from:
    - serviceAccounts: [\"demo/frontend\"]
    to:
    - methods: [\"GET\"]
      paths: [\"/chain\", \"/chain/*\"]
";

/// The backend's route: `x-chaos: abort` is answered 418 by the caller's
/// proxy; everything else goes to v1.
const FAULT_ROUTE: &str = "apiVersion: weft.dev/v1alpha1
kind: ServiceRoute
metadata:
  name: backend
  namespace: demo
spec:
  service: backend
  http:
  - name: chaos
    matches:
    - headers:
      - name: x-chaos
        exact: abort
    fault:
      abort:
        httpStatus: 418
        percent: 100
    backends:
    - subset: v1
  - name: default
    backends:
    - subset: v1
";

const REQUEST_ID: &str = "weft-e2e-trace-chain-0001";
const FAULT_REQUEST_ID: &str = "weft-e2e-trace-fault-0001";

fn principal(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/demo/sa/{sa}")
}

/// `(trace id, span id)` of a W3C `traceparent`.
fn traceparent(v: &Value) -> anyhow::Result<(String, String)> {
    let tp = v
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no traceparent: {v}"))?;
    let parts: Vec<&str> = tp.split('-').collect();
    match parts.as_slice() {
        ["00", trace, span, flags] if trace.len() == 32 && span.len() == 16 => {
            anyhow::ensure!(*flags == "01", "not sampled: {tp}");
            Ok(((*trace).to_owned(), (*span).to_owned()))
        }
        _ => anyhow::bail!("malformed traceparent {tp}"),
    }
}

/// The access log lines (JSON with a `reporter`) of a pod's proxy.
fn access_log(cluster: &Cluster, pod: &str) -> anyhow::Result<Vec<Value>> {
    Ok(cluster
        .pod_log("demo", pod, "weft-proxy")?
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("reporter").is_some())
        .collect())
}

/// The line of `reporter` for request `id` in `pod`'s proxy log, waiting
/// until it is written (a line is written when the response ends, through
/// a queue).
async fn log_line(cluster: &Cluster, pod: &str, reporter: &str, id: &str) -> anyhow::Result<Value> {
    let mut found = None;
    cluster
        .wait_until(
            Duration::from_secs(30),
            &format!("{pod}'s proxy to log request {id} as {reporter}"),
            || {
                let line = access_log(cluster, pod).map(|lines| {
                    lines
                        .into_iter()
                        .find(|l| l["reporter"] == reporter && l["request_id"] == id)
                });
                let hit = matches!(line, Ok(Some(_)));
                if let Ok(Some(l)) = line {
                    found = Some(l);
                }
                async move { Ok(hit) }
            },
        )
        .await?;
    found.ok_or_else(|| anyhow::anyhow!("no line"))
}

/// The one span of `service` and `kind`.
fn span_of<'a>(spans: &'a [Span], service: &str, kind: &str) -> anyhow::Result<&'a Span> {
    let mut hits = spans
        .iter()
        .filter(|s| s.service == service && s.kind == kind);
    match (hits.next(), hits.next()) {
        (Some(s), None) => Ok(s),
        _ => anyhow::bail!("not exactly one {kind} span of {service}: {spans:#?}"),
    }
}

fn tags(s: &Span, keys: &[&str]) -> BTreeMap<String, Option<String>> {
    keys.iter().map(|k| ((*k).to_owned(), s.tag(k))).collect()
}

fn want(pairs: &[(&str, &str)]) -> BTreeMap<String, Option<String>> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Some((*v).to_owned())))
        .collect()
}

const CALL_TAGS: [&str; 6] = [
    "weft.source_workload",
    "weft.destination_workload",
    "weft.source_principal",
    "weft.destination_principal",
    "weft.request_id",
    "http.response.status_code",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_across_three_workloads_is_one_trace_in_jaeger() -> anyhow::Result<()> {
    let _serial = serial().await;
    let cluster = Cluster::start().await?;
    mesh::install(&cluster).await?;
    mesh::deploy_demo(&cluster).await?;
    let started = std::time::Instant::now();
    let jaeger = Jaeger::start(&cluster).await?;
    println!(
        "jaeger ready after {:.1}s, query API at {}",
        started.elapsed().as_secs_f64(),
        jaeger.url()
    );

    // Tracing on, every new trace sampled, access logs on: as a user
    // patches the Mesh.
    let endpoint = jaeger.otlp_endpoint();
    mesh::patch_mesh_spec(
        &cluster,
        &format!(
            r#"{{"telemetry":{{"tracing":{{"otlpEndpoint":"{endpoint}","samplingPercent":100}},"accessLog":{{"enabled":true}}}}}}"#
        ),
    )
    .await?;
    mesh::apply_yaml(&cluster, CHAIN_ACCESS).await?;
    mesh::apply_yaml(&cluster, FAULT_ROUTE).await?;

    // Every demo proxy on the path runs that: the Mesh's tracing and
    // access log, the route and policy, every endpoint.
    let mut pods: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for app in ["frontend", "backend", "store"] {
        pods.insert(
            app,
            mesh::pods(&cluster, "demo", app)
                .await?
                .into_iter()
                .filter_map(|p| p.metadata.name)
                .collect(),
        );
    }
    let frontend = pods["frontend"]
        .first()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no frontend pod"))?;
    let store = pods["store"]
        .first()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no store pod"))?;
    let started = std::time::Instant::now();
    for pod in pods.values().flatten() {
        cluster
            .wait_until(
                WAIT,
                &format!("{pod}'s proxy to trace to {endpoint}"),
                || async {
                    let cfg = mesh::proxy_config(&cluster, "demo", pod).await.ok();
                    Ok(cfg.is_some_and(|c| {
                        c["mesh"]["tracing"]["otlpEndpoint"] == endpoint.as_str()
                            && c["mesh"]["accessLog"] == true
                    }))
                },
            )
            .await?;
        mesh::wait_for_proxy_sync(&cluster, "demo", pod, WAIT).await?;
    }
    println!(
        "{} proxies run the tracing config after {:.1}s",
        pods.values().flatten().count(),
        started.elapsed().as_secs_f64()
    );

    // frontend → backend /chain → store, with a request id the frontend
    // app chose.
    let backend_ip: IpAddr = mesh::cluster_ip(&cluster, "demo", "backend")
        .await?
        .parse()?;
    let url = format!("http://{}/chain", SocketAddr::new(backend_ip, 8080));
    let answer = match mesh::get_from_pod(
        &cluster,
        "demo",
        &frontend,
        &url,
        &[("x-request-id", REQUEST_ID)],
    )
    .await?
    {
        Reply::Ok(v) => v,
        Reply::Failed(why) => anyhow::bail!("GET {url} from {frontend}: {why}"),
    };
    let backend = answer["pod"].as_str().unwrap_or_default().to_owned();
    assert!(
        pods["backend"].contains(&backend) && backend.starts_with("backend-v1-"),
        "{answer}"
    );
    assert_eq!(answer["next"]["pod"], store.as_str(), "{answer}");
    assert_eq!(
        answer["next"]["identity"],
        principal("backend").as_str(),
        "the store saw the backend's identity: {answer}"
    );
    // Each app got its server proxy's span context, and the request id.
    let (trace_id, backend_server_span) = traceparent(&answer["headers"]["traceparent"])?;
    let (store_trace, store_server_span) = traceparent(&answer["next"]["headers"]["traceparent"])?;
    assert_eq!(store_trace, trace_id, "{answer}");
    for h in [&answer["headers"], &answer["next"]["headers"]] {
        assert_eq!(h["x-request-id"], REQUEST_ID, "{answer}");
        assert_eq!(h["x-b3-traceid"], trace_id.as_str(), "{answer}");
    }
    println!("trace {trace_id}: frontend → {backend} → {store}");

    // Jaeger has the four spans, one per proxy, each linked to the one
    // before it.
    let trace = jaeger
        .wait_for_trace(&trace_id, |t| jaeger::spans(t).len() >= 4, WAIT)
        .await?;
    let spans = jaeger::spans(&trace);
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let fc = span_of(&spans, "frontend.demo", "client")?;
    let bs = span_of(&spans, "backend.demo", "server")?;
    let bc = span_of(&spans, "backend.demo", "client")?;
    let ss = span_of(&spans, "store.demo", "server")?;
    assert_eq!(fc.parent, None, "the frontend app sent no context: {fc:#?}");
    assert_eq!(
        bs.parent.as_deref(),
        Some(fc.span_id.as_str()),
        "{spans:#?}"
    );
    assert_eq!(
        bc.parent.as_deref(),
        Some(bs.span_id.as_str()),
        "{spans:#?}"
    );
    assert_eq!(
        ss.parent.as_deref(),
        Some(bc.span_id.as_str()),
        "{spans:#?}"
    );
    assert_eq!(bs.span_id, backend_server_span, "what the backend app got");
    assert_eq!(ss.span_id, store_server_span, "what the store app got");
    assert_eq!(fc.operation, "GET backend.demo");
    assert_eq!(bc.operation, "GET store.demo");

    let first_hop = [
        ("weft.source_workload", "frontend"),
        ("weft.destination_workload", backend_workload(&backend)),
        ("weft.source_principal", &principal("frontend")),
        ("weft.destination_principal", &principal("backend")),
        ("weft.request_id", REQUEST_ID),
        ("http.response.status_code", "200"),
    ];
    let second_hop = [
        ("weft.source_workload", backend_workload(&backend)),
        ("weft.destination_workload", "store"),
        ("weft.source_principal", &principal("backend")),
        ("weft.destination_principal", &principal("store")),
        ("weft.request_id", REQUEST_ID),
        ("http.response.status_code", "200"),
    ];
    assert_eq!(tags(fc, &CALL_TAGS), want(&first_hop), "{fc:#?}");
    assert_eq!(tags(bs, &CALL_TAGS), want(&first_hop), "{bs:#?}");
    assert_eq!(tags(bc, &CALL_TAGS), want(&second_hop), "{bc:#?}");
    assert_eq!(tags(ss, &CALL_TAGS), want(&second_hop), "{ss:#?}");
    for (s, service, route, path) in [
        (fc, "backend.demo", "backend/default", "/chain"),
        (bc, "store.demo", "", "/chain"),
    ] {
        assert_eq!(s.tag("weft.destination_service").as_deref(), Some(service));
        assert_eq!(s.tag("weft.route").unwrap_or_default(), route, "{s:#?}");
        assert_eq!(s.tag("url.path").as_deref(), Some(path), "{s:#?}");
        assert_eq!(s.tag("http.request.method").as_deref(), Some("GET"));
        assert_eq!(s.tag("weft.failed_step"), None, "{s:#?}");
    }
    for s in &spans {
        assert_eq!(s.tag("error"), None, "{s:#?}");
    }
    for s in &spans {
        println!(
            "  {:<14} {:<6} {} parent {:<16} {}",
            s.service,
            s.kind,
            s.span_id,
            s.parent.as_deref().unwrap_or("-"),
            s.operation
        );
    }

    // The access logs: both proxies of each hop name the request id and
    // the trace id.
    for (pod, reporter) in [
        (&frontend, "source"),
        (&backend, "destination"),
        (&backend, "source"),
        (&store, "destination"),
    ] {
        let line = log_line(&cluster, pod, reporter, REQUEST_ID).await?;
        assert_eq!(line["trace_id"], trace_id.as_str(), "{pod}: {line}");
        assert_eq!(line["status"], 200, "{pod}: {line}");
    }
    println!("access logs: request {REQUEST_ID} with trace {trace_id} on all four proxies");

    // An injected fault: the frontend's proxy answers itself; its span is
    // the whole trace and names the step, as its log line does.
    let reply = mesh::get_from_pod(
        &cluster,
        "demo",
        &frontend,
        &url,
        &[("x-request-id", FAULT_REQUEST_ID), ("x-chaos", "abort")],
    )
    .await?;
    match &reply {
        Reply::Failed(why) => assert!(why.contains("HTTP 418") && why.contains("fault"), "{why}"),
        Reply::Ok(v) => anyhow::bail!("the fault let a request through: {v}"),
    }
    let line = log_line(&cluster, &frontend, "source", FAULT_REQUEST_ID).await?;
    assert_eq!(line["failed_step"], "fault", "{line}");
    assert_eq!(line["status"], 418, "{line}");
    assert_eq!(line["route"], "backend/chaos", "{line}");
    let fault_trace = line["trace_id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no trace id: {line}"))?
        .to_owned();
    assert_ne!(fault_trace, trace_id);
    let trace = jaeger
        .wait_for_trace(&fault_trace, |t| !jaeger::spans(t).is_empty(), WAIT)
        .await?;
    let spans = jaeger::spans(&trace);
    let fc = span_of(&spans, "frontend.demo", "client")?;
    assert_eq!(
        fc.tag("weft.failed_step").as_deref(),
        Some("fault"),
        "{fc:#?}"
    );
    assert_eq!(
        fc.tag("http.response.status_code").as_deref(),
        Some("418"),
        "{fc:#?}"
    );
    assert_eq!(fc.tag("weft.route").as_deref(), Some("backend/chaos"));
    assert_eq!(fc.tag("error").as_deref(), Some("true"), "{fc:#?}");
    assert_eq!(fc.tag("weft.request_id").as_deref(), Some(FAULT_REQUEST_ID));
    // No backend saw it (no backend proxy logged it), so no other proxy
    // has a span of it.
    for b in &pods["backend"] {
        let lines = access_log(&cluster, b)?;
        assert!(
            lines.iter().all(|l| l["request_id"] != FAULT_REQUEST_ID),
            "the aborted request reached {b}"
        );
    }
    assert_eq!(spans.len(), 1, "{spans:#?}");
    println!(
        "fault: trace {fault_trace} = the frontend's client span, weft.failed_step={:?}",
        fc.tag("weft.failed_step")
    );

    drop(jaeger);
    cluster.shutdown();
    Ok(())
}

/// The Deployment of a demo backend pod (`backend-v1-<hash>-<id>`).
fn backend_workload(pod: &str) -> &'static str {
    if pod.starts_with("backend-v2-") {
        "backend-v2"
    } else {
        "backend-v1"
    }
}
