//! Latency of `/inject` over HTTPS on loopback for a realistic pod.
//!
//! ```text
//! cargo run --release -p weft-injector --example bench_inject [-- REQUESTS [CONNECTIONS]]
//! ```
//!
//! Starts the real server (rustls, hyper, axum) with an rcgen certificate,
//! sends a kube-apiserver-shaped AdmissionReview for a Deployment pod (two
//! containers, probes of three kinds, volumes, managedFields) over
//! keep-alive connections like the API server's webhook client, and prints
//! p50/p90/p99/max of the full round trip. Prints figures; asserts nothing
//! about time (the bar, p99 < 5 ms, is in PERFORMANCE.md).

#[path = "../tests/common/https.rs"]
mod https;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use serde_json::json;
use weft_injector::InjectConfig;
use weft_injector::metrics::Metrics;
use weft_injector::server::{self, ServerOptions};

fn realistic_review() -> Vec<u8> {
    let pod = json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {
            "generateName": "checkout-7c9d8f6b5-", "namespace": "shop",
            "labels": {"app.kubernetes.io/name": "checkout", "app.kubernetes.io/version": "2.14.1",
                       "pod-template-hash": "7c9d8f6b5"},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9090",
                            "kubectl.kubernetes.io/restartedAt": "2026-11-20T10:00:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "checkout-7c9d8f6b5",
                                 "uid": "5f1c7f1e-1f7e-4c55-9d1c-6c1b5b0c9e11", "controller": true,
                                 "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                               "time": "2026-11-22T00:00:00Z", "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {}}},
                                            "f:spec": {"f:containers": {"k:{\"name\":\"checkout\"}": {".": {}}}}}}]
        },
        "spec": {
            "serviceAccountName": "checkout", "serviceAccount": "checkout",
            "volumes": [
                {"name": "kube-api-access-x7k2q", "projected": {"defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}},
                {"name": "cache", "emptyDir": {"sizeLimit": "256Mi"}}
            ],
            "initContainers": [{"name": "migrate", "image": "shop/checkout-migrate:2.14.1",
                                "args": ["--to", "latest"], "resources": {}}],
            "containers": [
                {"name": "checkout", "image": "shop/checkout:2.14.1",
                 "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                           {"name": "grpc", "containerPort": 9000, "protocol": "TCP"},
                           {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
                 "env": [{"name": "DB_HOST", "value": "postgres.shop.svc"}, {"name": "LOG_FORMAT", "value": "json"}],
                 "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
                 "livenessProbe": {"httpGet": {"path": "/livez", "port": "http", "scheme": "HTTP"},
                                   "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3},
                 "readinessProbe": {"grpc": {"port": 9000, "service": "checkout.v1"}, "periodSeconds": 5},
                 "startupProbe": {"tcpSocket": {"port": 8080}, "failureThreshold": 30, "periodSeconds": 2},
                 "volumeMounts": [{"name": "kube-api-access-x7k2q", "readOnly": true,
                                   "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"},
                                  {"name": "cache", "mountPath": "/cache"}],
                 "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
                 "imagePullPolicy": "IfNotPresent"},
                {"name": "log-shipper", "image": "fluent/fluent-bit:3.1",
                 "resources": {"requests": {"cpu": "20m", "memory": "32Mi"}},
                 "livenessProbe": {"exec": {"command": ["/fluent-bit/bin/health"]}}}
            ],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "securityContext": {"runAsNonRoot": true, "runAsUser": 10001, "fsGroup": 10001},
            "schedulerName": "default-scheduler", "priority": 0, "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]
        },
        "status": {}
    });
    serde_json::to_vec(&json!({
        "kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": "0c9a8d74-9cb7-44dd-b98e-09fd62def2f4",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop", "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "uid": "a1", "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]},
            "object": pod, "oldObject": null, "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    }))
    .expect("review serializes")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut args = std::env::args().skip(1);
    let requests: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(20_000);
    let connections: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1)
        .max(1);

    let pki = https::TestPki::new("weft bench CA");
    let mut dir = https::AtomicDir::new();
    let (cert, key) = pki.leaf("weft-injector");
    dir.publish(&[("tls.crt", cert.as_bytes()), ("tls.key", key.as_bytes())]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let running = server::start(
        ServerOptions {
            tls_dir: dir.path().to_owned(),
            ..ServerOptions::default()
        },
        listener,
        Arc::new(ArcSwap::from_pointee(InjectConfig::default())),
        Arc::new(Metrics::new()),
    )
    .await?;
    let client = https::client_config(&pki.ca);
    let body = realistic_review();

    // Check once that this is a real injection, not an error path.
    let mut probe = https::Conn::open(running.local_addr, client.clone()).await?;
    let (status, resp) = probe.request("POST", "/inject", body.clone()).await?;
    let resp: serde_json::Value = serde_json::from_slice(&resp).context("response is JSON")?;
    anyhow::ensure!(
        status == 200 && resp["response"]["patchType"] == "JSONPatch",
        "unexpected response {status}: {resp}"
    );
    let patch_len = resp["response"]["patch"].as_str().map_or(0, str::len);

    let per_conn = requests / connections;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let client = client.clone();
        let body = body.clone();
        let addr = running.local_addr;
        tasks.push(tokio::spawn(async move {
            let mut conn = https::Conn::open(addr, client).await?;
            for _ in 0..200 {
                conn.request("POST", "/inject", body.clone()).await?;
            }
            let mut samples = Vec::with_capacity(per_conn);
            for _ in 0..per_conn {
                let t = Instant::now();
                let (status, _) = conn.request("POST", "/inject", body.clone()).await?;
                samples.push(t.elapsed());
                anyhow::ensure!(status == 200, "status {status}");
            }
            anyhow::Ok(samples)
        }));
    }
    let started = Instant::now();
    let mut all = Vec::with_capacity(requests);
    for t in tasks {
        all.extend(t.await??);
    }
    let wall = started.elapsed();
    all.sort();
    println!(
        "weft-injector /inject over HTTPS (loopback, keep-alive): review {} B, patch {} B (base64)",
        body.len(),
        patch_len
    );
    println!(
        "requests {}  connections {}  throughput {:.0}/s",
        all.len(),
        connections,
        all.len() as f64 / wall.as_secs_f64()
    );
    println!(
        "latency  p50 {:?}  p90 {:?}  p99 {:?}  p99.9 {:?}  max {:?}",
        percentile(&all, 0.50),
        percentile(&all, 0.90),
        percentile(&all, 0.99),
        percentile(&all, 0.999),
        all.last().copied().unwrap_or_default()
    );
    running.shutdown().await;
    Ok(())
}
