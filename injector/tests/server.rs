//! The injector over real HTTPS on loopback: real AdmissionReview bodies,
//! hostile ones, health and metrics, certificate reload through an
//! atomic-writer directory swap, and graceful shutdown.

mod common;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine as _;
use common::https::{AtomicDir, Conn, TestPki, client_config, h2_client_config, tls_connect};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_injector::InjectConfig;
use weft_injector::metrics::Metrics;
use weft_injector::server::{self, Running, ServerOptions};

/// Upper bound for any single wait, so a hang fails the test instead of
/// stalling CI. Not a performance assertion.
const GUARD: Duration = Duration::from_secs(30);

struct Harness {
    pki: TestPki,
    dir: AtomicDir,
    server: Running,
    client: Arc<rustls::ClientConfig>,
}

async fn start(opts: ServerOptions) -> Harness {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pki = TestPki::new("weft test CA");
    let mut dir = AtomicDir::new();
    let (cert, key) = pki.leaf("injector-1");
    dir.publish(&[("tls.crt", cert.as_bytes()), ("tls.key", key.as_bytes())]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let opts = ServerOptions {
        tls_dir: dir.path().to_owned(),
        ..opts
    };
    let server = server::start(
        opts,
        listener,
        Arc::new(ArcSwap::from_pointee(InjectConfig::default())),
        Arc::new(Metrics::new()),
    )
    .await
    .expect("server starts");
    let client = client_config(&pki.ca);
    Harness {
        pki,
        dir,
        server,
        client,
    }
}

async fn conn(h: &Harness) -> Conn {
    tokio::time::timeout(GUARD, Conn::open(h.server.local_addr, h.client.clone()))
        .await
        .expect("connect in time")
        .expect("connect")
}

async fn call(
    c: &mut Conn,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> (http::StatusCode, bytes::Bytes) {
    tokio::time::timeout(GUARD, c.request(method, path, body))
        .await
        .expect("response in time")
        .expect("response")
}

fn review(uid: &str, pod: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop", "operation": "CREATE",
            "userInfo": {"username": "admin"},
            "object": pod, "dryRun": false
        }
    }))
    .expect("json")
}

fn web_pod() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"},
                     "annotations": {"example.com/team": "a/b"}},
        "spec": {"containers": [{"name": "web", "image": "web:1",
                                 "ports": [{"name": "http", "containerPort": 8080}],
                                 "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}}}]}
    })
}

#[tokio::test]
async fn inject_over_https_returns_a_base64_patch_that_applies() {
    let h = start(ServerOptions::default()).await;
    let mut c = conn(&h).await;
    let (status, body) = call(&mut c, "POST", "/inject", review("a1b2", &web_pod())).await;
    assert_eq!(status, 200);
    let out: Value = serde_json::from_slice(&body).expect("JSON response");
    assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(out["kind"], "AdmissionReview");
    assert_eq!(out["response"]["uid"], "a1b2");
    assert_eq!(out["response"]["allowed"], true);
    assert_eq!(out["response"]["patchType"], "JSONPatch");
    let b64 = out["response"]["patch"]
        .as_str()
        .expect("patch is a base64 string");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("valid base64");
    let patch: json_patch::Patch = serde_json::from_slice(&raw).expect("JSON patch");
    let mut pod = web_pod();
    json_patch::patch(&mut pod, &patch.0).expect("patch applies");
    common::record("server-web", &pod);
    assert_eq!(pod["spec"]["initContainers"][1]["name"], "weft-proxy");
    assert_eq!(
        pod["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"],
        "/app-health/web/readyz"
    );

    // The same connection keeps working (keep-alive), also for a denial.
    let mut bad = web_pod();
    bad["metadata"]["annotations"] = json!({"weft.dev/proxy-log-level": "chatty"});
    let (status, body) = call(&mut c, "POST", "/inject", review("c3d4", &bad)).await;
    assert_eq!(status, 200);
    let out: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(out["response"]["allowed"], false);
    assert!(
        out["response"]["status"]["message"]
            .as_str()
            .expect("msg")
            .contains("weft.dev/proxy-log-level")
    );
    h.server.shutdown().await;
}

#[tokio::test]
async fn health_ready_and_metrics() {
    let h = start(ServerOptions::default()).await;
    let mut c = conn(&h).await;
    assert_eq!(call(&mut c, "GET", "/healthz", vec![]).await.0, 200);
    assert_eq!(call(&mut c, "GET", "/readyz", vec![]).await.0, 200);
    call(&mut c, "POST", "/inject", review("m1", &web_pod())).await;
    call(&mut c, "POST", "/inject", b"not json".to_vec()).await;
    let mut skipped = web_pod();
    skipped["spec"]["hostNetwork"] = json!(true);
    call(&mut c, "POST", "/inject", review("m2", &skipped)).await;
    let (status, body) = call(&mut c, "GET", "/metrics", vec![]).await;
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body);
    for needle in [
        "weft_injector_admissions_total{result=\"injected\"} 1",
        "weft_injector_admissions_total{result=\"invalid\"} 1",
        "weft_injector_admissions_total{result=\"skipped\"} 1",
        "weft_injector_admission_duration_seconds_count 2",
    ] {
        assert!(text.contains(needle), "metrics lack {needle:?}:\n{text}");
    }
    h.server.set_unready();
    assert_eq!(call(&mut c, "GET", "/readyz", vec![]).await.0, 503);
    assert_eq!(call(&mut c, "GET", "/nope", vec![]).await.0, 404);
    assert_eq!(call(&mut c, "GET", "/inject", vec![]).await.0, 405);
    h.server.shutdown().await;
}

#[tokio::test]
async fn hostile_bodies_get_4xx_or_a_denial_and_the_server_survives() {
    let h = start(ServerOptions {
        max_body_bytes: 1024 * 1024,
        ..ServerOptions::default()
    })
    .await;
    let mut c = conn(&h).await;
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (b"".to_vec(), 400),
        (b"{{{{".to_vec(), 400),
        (vec![0xff; 4096], 400),
        ("[".repeat(200_000).into_bytes(), 400),
        (br#"{"kind":"ConfigMap","apiVersion":"v1"}"#.to_vec(), 400),
        (
            br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1"}"#.to_vec(),
            400,
        ),
        (review("t1", &web_pod())[..200].to_vec(), 400),
        (vec![b' '; 3 * 1024 * 1024], 413),
    ];
    for (body, want) in cases {
        let (status, text) = call(&mut c, "POST", "/inject", body).await;
        assert_eq!(status.as_u16(), want, "{}", String::from_utf8_lossy(&text));
        assert!(!text.is_empty(), "a 4xx explains itself");
        if want == 413 {
            // The server may close after refusing a body it did not read.
            c = conn(&h).await;
        }
    }
    // Valid reviews with broken objects are denied with a message.
    let mut r: Value = serde_json::from_slice(&review("t2", &web_pod())).expect("json");
    r["request"].as_object_mut().expect("obj").remove("object");
    let (status, body) = call(
        &mut c,
        "POST",
        "/inject",
        serde_json::to_vec(&r).expect("json"),
    )
    .await;
    assert_eq!(status, 200);
    let out: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(out["response"]["allowed"], false);
    assert_eq!(out["response"]["uid"], "t2");
    // Still healthy.
    assert_eq!(
        call(&mut c, "POST", "/inject", review("t3", &web_pod()))
            .await
            .0,
        200
    );
    h.server.shutdown().await;
}

/// A raw request whose body never arrives in full: answered 408, not held.
#[tokio::test]
async fn stalled_bodies_time_out() {
    let h = start(ServerOptions {
        body_timeout: Duration::from_millis(300),
        ..ServerOptions::default()
    })
    .await;
    for head in [
        "POST /inject HTTP/1.1\r\nhost: localhost\r\ncontent-length: 5000\r\n\r\n{\"kind\":",
        "POST /inject HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\n10\r\n{\"kind\":\"Admiss",
    ] {
        let mut tls = tls_connect(h.server.local_addr, h.client.clone())
            .await
            .expect("tls");
        tls.write_all(head.as_bytes()).await.expect("write");
        let mut buf = vec![0u8; 512];
        let n = tokio::time::timeout(GUARD, tls.read(&mut buf))
            .await
            .expect("server answered instead of waiting forever")
            .expect("read");
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    }
    h.server.shutdown().await;
}

/// Chunked junk beyond the limit (no content-length to refuse early).
#[tokio::test]
async fn oversized_chunked_body_is_refused() {
    let h = start(ServerOptions {
        max_body_bytes: 64 * 1024,
        ..ServerOptions::default()
    })
    .await;
    let mut tls = tls_connect(h.server.local_addr, h.client.clone())
        .await
        .expect("tls");
    tls.write_all(
        b"POST /inject HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\n",
    )
    .await
    .expect("head");
    let chunk = format!("{:x}\r\n{}\r\n", 8192, "x".repeat(8192));
    // Keep sending until the server answers; it must answer before 1 MiB.
    let mut answered = String::new();
    for _ in 0..128 {
        if tls.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
        let mut buf = vec![0u8; 512];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(5), tls.read(&mut buf)).await
            && n > 0
        {
            answered = String::from_utf8_lossy(&buf[..n]).into_owned();
            break;
        }
    }
    if answered.is_empty() {
        let mut buf = vec![0u8; 512];
        let n = tokio::time::timeout(GUARD, tls.read(&mut buf))
            .await
            .expect("answer")
            .unwrap_or(0);
        answered = String::from_utf8_lossy(&buf[..n]).into_owned();
    }
    assert!(answered.starts_with("HTTP/1.1 413"), "{answered:?}");
    h.server.shutdown().await;
}

#[tokio::test]
async fn certificate_reloads_on_atomic_writer_swap_without_restart() {
    let mut h = start(ServerOptions::default()).await;
    let first = conn(&h).await.leaf;
    let mut old_conn = conn(&h).await;

    // A broken publish (key of another cert) is refused; the old pair serves.
    let (cert_a, _) = h.pki.leaf("injector-x");
    let (_, key_b) = h.pki.leaf("injector-y");
    h.dir.publish(&[
        ("tls.crt", cert_a.as_bytes()),
        ("tls.key", key_b.as_bytes()),
    ]);
    wait_for_metric(
        &h.server,
        "weft_injector_cert_reloads_total{result=\"error\"}",
    )
    .await;
    assert_eq!(
        conn(&h).await.leaf,
        first,
        "a mismatched pair must not be served"
    );

    // A good rotation is picked up by new handshakes.
    let (cert, key) = h.pki.leaf("injector-2");
    h.dir
        .publish(&[("tls.crt", cert.as_bytes()), ("tls.key", key.as_bytes())]);
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        let leaf = conn(&h).await.leaf;
        if leaf != first {
            assert_eq!(leaf, h.server.certs.leaf());
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "new certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The connection opened before the swap keeps working.
    assert_eq!(call(&mut old_conn, "GET", "/healthz", vec![]).await.0, 200);
    h.server.shutdown().await;
}

async fn wait_for_metric(server: &Running, needle: &str) {
    let deadline = tokio::time::Instant::now() + GUARD;
    while !server.metrics.render().contains(needle) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "metric {needle} never appeared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn shutdown_drains_and_stops_accepting() {
    let h = start(ServerOptions {
        drain_timeout: Duration::from_secs(5),
        ..ServerOptions::default()
    })
    .await;
    let addr = h.server.local_addr;
    let mut c = conn(&h).await;
    assert_eq!(call(&mut c, "GET", "/healthz", vec![]).await.0, 200);
    tokio::time::timeout(GUARD, h.server.shutdown())
        .await
        .expect("shutdown completes");
    assert!(
        tls_connect(addr, h.client.clone()).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn start_fails_clearly_without_a_certificate() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let empty = tempfile::tempdir().expect("tempdir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let err = server::start(
        ServerOptions {
            tls_dir: empty.path().to_owned(),
            ..ServerOptions::default()
        },
        listener,
        Arc::new(ArcSwap::from_pointee(InjectConfig::default())),
        Arc::new(Metrics::new()),
    )
    .await
    .expect_err("no certificate");
    assert!(err.to_string().contains("tls.crt"), "{err}");
}

/// kube-apiserver negotiates HTTP/2 when offered: the server speaks it.
#[tokio::test]
async fn inject_over_http2() {
    let h = start(ServerOptions::default()).await;
    let tls = tls_connect(h.server.local_addr, h2_client_config(&h.pki.ca))
        .await
        .expect("tls");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method("POST")
        .uri("https://localhost/inject")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(review(
            "h2",
            &web_pod(),
        ))))
        .expect("request");
    let resp = tokio::time::timeout(GUARD, sender.send_request(req))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .expect("body")
        .to_bytes();
    let out: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(out["response"]["uid"], "h2");
    assert_eq!(out["response"]["patchType"], "JSONPatch");
    h.server.shutdown().await;
}

/// A new configuration stored in the shared `ArcSwap` (what the Mesh watch
/// does) applies to the next review, without a restart.
#[tokio::test]
async fn mesh_defaults_apply_to_the_next_review() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pki = TestPki::new("weft test CA");
    let mut dir = AtomicDir::new();
    let (cert, key) = pki.leaf("injector");
    dir.publish(&[("tls.crt", cert.as_bytes()), ("tls.key", key.as_bytes())]);
    let config = Arc::new(ArcSwap::from_pointee(InjectConfig::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let server = server::start(
        ServerOptions {
            tls_dir: dir.path().to_owned(),
            ..ServerOptions::default()
        },
        listener,
        config.clone(),
        Arc::new(Metrics::new()),
    )
    .await
    .expect("start");
    let mut c = Conn::open(server.local_addr, client_config(&pki.ca))
        .await
        .expect("connect");
    let containers_after = |body: &[u8]| -> Vec<String> {
        let out: Value = serde_json::from_slice(body).expect("json");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(out["response"]["patch"].as_str().expect("patch"))
            .expect("b64");
        let patch: json_patch::Patch = serde_json::from_slice(&raw).expect("patch");
        let mut pod = web_pod();
        json_patch::patch(&mut pod, &patch.0).expect("applies");
        common::names(&pod, "containers")
    };
    let (_, body) = call(&mut c, "POST", "/inject", review("n1", &web_pod())).await;
    assert_eq!(containers_after(&body), ["web"]);

    config.store(Arc::new(InjectConfig {
        native_sidecar: false,
        ..InjectConfig::default()
    }));
    let (_, body) = call(&mut c, "POST", "/inject", review("n2", &web_pod())).await;
    assert_eq!(containers_after(&body), ["weft-proxy", "web"]);
    server.shutdown().await;
}
