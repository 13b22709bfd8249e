//! weft's golden metrics end to end, read through a real Prometheus that
//! scrapes the cluster with the jobs weft ships
//! (`manifests/observability/prometheus-scrape.yaml`, see
//! `weft_e2e::prometheus`): known HTTP traffic from the demo's frontend to
//! the backend, a share of it aborted by an injected fault, and opaque TCP
//! connections of a known size; then PromQL must give back exactly what
//! was sent, every dashboard query must return data, and the operator and
//! injector targets must be up.

mod common;
#[path = "common/dashboards.rs"]
mod dashboards;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::serial;
use serde_json::Value;
use weft_e2e::Cluster;
use weft_e2e::mesh;
use weft_e2e::prometheus::{Prometheus, samples};

/// Requests the frontend sends that the backend serves.
const SERVED: usize = 40;
/// Requests the frontend sends with the header the fault aborts.
const ABORTED: usize = 10;
/// Opaque TCP connections from the frontend to tcp-echo ...
const TCP_CONNECTIONS: usize = 3;
/// ... each sending this many bytes, which tcp-echo sends back.
const TCP_BYTES: usize = 1500;

/// A TCP echo server in the demo's namespace, its Service marked opaque
/// TCP by `appProtocol: tcp`.
const TCP_ECHO: &str = "apiVersion: apps/v1
kind: Deployment
metadata: {name: tcp-echo, namespace: demo}
spec:
  replicas: 1
  selector: {matchLabels: {app: tcp-echo}}
  template:
    metadata: {labels: {app: tcp-echo, version: v1}}
    spec:
      containers:
      - name: app
        image: weft-e2e-app
        imagePullPolicy: IfNotPresent
        args: [tcp-echo, --port, '9000']
        ports: [{name: tcp, containerPort: 9000}]
        readinessProbe: {tcpSocket: {port: 9000}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: tcp-echo, namespace: demo}
spec:
  selector: {app: tcp-echo}
  ports: [{name: tcp, port: 9000, targetPort: 9000, appProtocol: tcp}]
";

/// The backend's route: requests with `x-chaos: abort` are aborted by the
/// frontend's proxy (418), all others go to v1.
const CHAOS_ROUTE: &str = "apiVersion: weft.dev/v1alpha1
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

type Edges = BTreeMap<(String, String), f64>;

/// `sum by (source_workload, destination_workload)` answers as a map.
fn edges(data: &Value) -> Edges {
    samples(data)
        .into_iter()
        .map(|(l, v)| {
            let get = |k: &str| l.get(k).cloned().unwrap_or_default();
            ((get("source_workload"), get("destination_workload")), v)
        })
        .collect()
}

fn edge_map(list: &[(&str, &str, usize)]) -> Edges {
    list.iter()
        .map(|(s, d, n)| ((s.to_string(), d.to_string()), *n as f64))
        .collect()
}

/// The single value of a scalar-like answer (one series), if any.
fn single(data: &Value) -> Option<f64> {
    match samples(data).as_slice() {
        [(_, v)] => Some(*v),
        _ => None,
    }
}

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_metrics_read_through_prometheus_match_the_traffic_sent() -> anyhow::Result<()> {
    let _serial = serial().await;
    let cluster = Cluster::start().await?;
    mesh::install(&cluster).await?;
    mesh::deploy_demo(&cluster).await?;
    common::apply(&cluster, TCP_ECHO).await?;
    mesh::apply_yaml(&cluster, CHAOS_ROUTE).await?;
    cluster
        .wait_deployment_ready("demo", "tcp-echo", Duration::from_secs(120))
        .await?;
    cluster
        .wait_service_endpoints("demo", "tcp-echo", 1, Duration::from_secs(60))
        .await?;
    let frontend = mesh::pods(&cluster, "demo", "frontend")
        .await?
        .into_iter()
        .find_map(|p| p.metadata.name)
        .ok_or_else(|| anyhow::anyhow!("no frontend pod"))?;
    // The frontend's proxy runs the chaos route and knows every endpoint;
    // this reads its admin API only, so the frontend has sent nothing yet.
    mesh::wait_for_proxy_sync(&cluster, "demo", &frontend, Duration::from_secs(90)).await?;
    let backend_ip: IpAddr = mesh::cluster_ip(&cluster, "demo", "backend")
        .await?
        .parse()?;
    let tcp_ip = mesh::cluster_ip(&cluster, "demo", "tcp-echo").await?;

    let prom = Prometheus::start(&cluster).await?;
    println!("prometheus at {}", prom.url());

    // Every scrape target up: both replicas of the operator and of the
    // injector (over HTTPS, verified with the mesh CA), every proxy.
    let meshed = ["frontend", "backend", "store", "tcp-echo"];
    let mut proxies = 0;
    for app in meshed {
        proxies += mesh::pods(&cluster, "demo", app).await?.len();
    }
    for (job, want) in [
        ("weft-operator", 2),
        ("weft-injector", 2),
        ("weft-proxies", proxies),
    ] {
        let q = format!("count(up{{job=\"{job}\"}} == 1)");
        prom.wait_for(&q, |d| single(d) == Some(want as f64), WAIT)
            .await?;
        println!("{q} = {want}");
    }

    // The traffic, each request on a new connection through the frontend's proxy.
    let backend = SocketAddr::new(backend_ip, 8080);
    let served =
        mesh::send_from_pod(&cluster, "demo", &frontend, backend, "/", &[], SERVED).await?;
    assert_eq!(served.failures, Vec::<String>::new(), "{served:?}");
    assert_eq!(
        served.by_version(),
        BTreeMap::from([("v1".to_owned(), SERVED)])
    );
    let aborted = mesh::send_from_pod(
        &cluster,
        "demo",
        &frontend,
        backend,
        "/",
        &[("x-chaos", "abort")],
        ABORTED,
    )
    .await?;
    assert_eq!(aborted.ok(), 0, "{aborted:?}");
    assert!(
        aborted.failures.len() == ABORTED
            && aborted.failures.iter().all(|f| f.contains("HTTP 418")),
        "{aborted:?}"
    );
    let app = cluster.pod_program("weft-e2e-app")?;
    let out = cluster
        .exec_in_pod(
            "demo",
            &frontend,
            &[
                &app,
                "tcp-send",
                &format!("{tcp_ip}:9000"),
                "--bytes",
                &TCP_BYTES.to_string(),
                "--count",
                &TCP_CONNECTIONS.to_string(),
            ],
        )
        .await?;
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(
        lines.len(),
        TCP_CONNECTIONS,
        "tcp-send: {lines:?} {:?}",
        out
    );
    for l in &lines {
        assert_eq!(l["received"], TCP_BYTES, "tcp-send: {l}");
    }
    println!(
        "sent: {SERVED} served and {ABORTED} aborted requests frontend → backend; {TCP_CONNECTIONS} TCP connections × {TCP_BYTES} bytes each way frontend → tcp-echo"
    );

    // Requests per edge, as the frontend's proxy counted them. The aborted
    // ones reached no workload: their destination_workload is "unknown".
    let q = r#"sum by (source_workload, destination_workload) (weft_requests_total{reporter="source"})"#;
    let want = edge_map(&[
        ("frontend", "backend-v1", SERVED),
        ("frontend", "unknown", ABORTED),
    ]);
    let got = prom.wait_for(q, |d| edges(d) == want, WAIT).await?;
    println!("{q}\n  = {:?}", edges(&got));
    // And as the backends' proxies counted them: only the served ones.
    let q = r#"sum by (source_workload, destination_workload) (weft_requests_total{reporter="destination"})"#;
    let want = edge_map(&[("frontend", "backend-v1", SERVED)]);
    let got = prom.wait_for(q, |d| edges(d) == want, WAIT).await?;
    println!("{q}\n  = {:?}", edges(&got));

    // The error share is the fault's share, and each aborted request says why.
    let q = r#"sum(weft_requests_total{reporter="source", source_workload="frontend", response_code!~"2.."}) / sum(weft_requests_total{reporter="source", source_workload="frontend"})"#;
    let share = ABORTED as f64 / (SERVED + ABORTED) as f64;
    prom.wait_for(
        q,
        |d| single(d).is_some_and(|v| (v - share).abs() < 1e-9),
        WAIT,
    )
    .await?;
    println!("{q}\n  = {share}");
    for (q, want) in [
        (
            r#"sum(weft_requests_total{reporter="source", destination_service="backend.demo", route="backend/chaos", response_code="418", failed_step="fault"})"#,
            ABORTED,
        ),
        (
            r#"sum(weft_proxy_route_events_total{route="backend/chaos", event="fault-abort"})"#,
            ABORTED,
        ),
        (
            r#"sum(weft_request_duration_seconds_count{reporter="source", source_workload="frontend", destination_service="backend.demo"})"#,
            SERVED + ABORTED,
        ),
    ] {
        prom.wait_for(q, |d| single(d) == Some(want as f64), WAIT)
            .await?;
        println!("{q}\n  = {want}");
    }

    // Opaque TCP: bytes and connections as sent, on both proxies.
    let total = (TCP_CONNECTIONS * TCP_BYTES) as f64;
    for (q, want) in [
        (
            r#"sum(weft_tcp_received_bytes_total{reporter="source", source_workload="frontend", destination_workload="tcp-echo", destination_service="tcp-echo.demo"})"#,
            total,
        ),
        (
            r#"sum(weft_tcp_sent_bytes_total{reporter="source", source_workload="frontend", destination_workload="tcp-echo"})"#,
            total,
        ),
        (
            r#"sum(weft_tcp_connections_opened_total{reporter="source", source_workload="frontend", destination_workload="tcp-echo"})"#,
            TCP_CONNECTIONS as f64,
        ),
        (
            r#"sum(weft_tcp_connections_closed_total{reporter="source", source_workload="frontend", destination_workload="tcp-echo"})"#,
            TCP_CONNECTIONS as f64,
        ),
        (
            r#"sum(weft_tcp_received_bytes_total{reporter="destination", destination_workload="tcp-echo"})"#,
            total,
        ),
        (
            r#"sum(weft_tcp_sent_bytes_total{reporter="destination", destination_workload="tcp-echo"})"#,
            total,
        ),
    ] {
        prom.wait_for(q, |d| single(d) == Some(want), WAIT).await?;
        println!("{q}\n  = {want}");
    }

    // weftctl, as a user runs it against this Prometheus: the golden
    // signals and the graph's edges (HTTP and opaque TCP). Rates need the
    // counters to grow between scrapes, so this traffic is spread over
    // several seconds (the exact counts above are already checked).
    for _ in 0..6 {
        mesh::send_from_pod(&cluster, "demo", &frontend, backend, "/", &[], 3).await?;
        mesh::send_from_pod(
            &cluster,
            "demo",
            &frontend,
            backend,
            "/",
            &[("x-chaos", "abort")],
            1,
        )
        .await?;
        cluster
            .exec_in_pod(
                "demo",
                &frontend,
                &[
                    &app,
                    "tcp-send",
                    &format!("{tcp_ip}:9000"),
                    "--bytes",
                    "100",
                ],
            )
            .await?;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let weftctl = weft_e2e::images::target_dir().join("weftctl");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&weftctl)
            .args(args)
            .output()
            .map_err(|e| anyhow::anyhow!("{}: {e}", weftctl.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "weftctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok::<_, anyhow::Error>(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let url = prom.url().to_owned();
    let stat = run(&[
        "stat",
        "--prometheus",
        &url,
        "--namespace",
        "demo",
        "--window",
        "1m",
    ])?;
    println!("weftctl stat --namespace demo:\n{stat}");
    assert!(
        stat.lines()
            .any(|l| l.split_whitespace().nth(1) == Some("backend-v1")),
        "{stat}"
    );
    let dot = run(&[
        "graph",
        "--prometheus",
        &url,
        "--namespace",
        "demo",
        "--window",
        "5m",
        "-o",
        "dot",
    ])?;
    println!("weftctl graph --namespace demo -o dot:\n{dot}");
    for edge in [
        "\"demo/frontend\" -> \"demo/backend-v1\"",
        "\"demo/frontend\" -> \"demo/unknown\"",
        "\"demo/frontend\" -> \"demo/tcp-echo\"",
    ] {
        assert!(dot.contains(edge), "no edge {edge} in:\n{dot}");
    }
    // Prometheus down: a clear error, no panic.
    let down = std::process::Command::new(&weftctl)
        .args(["stat", "--prometheus", "http://127.0.0.1:9"])
        .output()?;
    assert!(!down.status.success());
    assert!(
        String::from_utf8_lossy(&down.stderr).contains("cannot reach Prometheus"),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );

    // Every dashboard query, with the demo's values for its variables,
    // returns data; those that count events this scenario does not cause
    // must still be accepted by Prometheus.
    let mut empty_allowed = Vec::new();
    for (e, q) in dashboards::all() {
        if dashboards::EVENT_ONLY_PANELS.contains(&e.panel.as_str()) {
            let data = prom.query(&q).await?;
            if samples(&data).is_empty() {
                empty_allowed.push(format!("{} / {}", e.dashboard, e.panel));
            }
            continue;
        }
        prom.wait_for(&q, |d| !samples(d).is_empty(), WAIT)
            .await
            .map_err(|err| anyhow::anyhow!("{} / {}: {err}", e.dashboard, e.panel))?;
    }
    println!(
        "every dashboard query returned data, except (events this scenario causes none of): {empty_allowed:?}"
    );
    drop(prom);
    cluster.shutdown();
    Ok(())
}
