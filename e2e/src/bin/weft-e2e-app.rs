//! weft-e2e-app: the small programs e2e pods run (image `weft-e2e-app`).
//!
//! - `echo --port P [--next URL]`: HTTP server answering every request with
//!   JSON naming the pod, the caller address it saw and the
//!   `x-weft-peer-identity` header it received (`/healthz` answers `ok`).
//!   A request whose path has a segment `chain` (`/chain`, `/api/chain`)
//!   is a traced call chain: its
//!   answer also holds the trace headers and `x-request-id` it came with
//!   (`headers`), and with `--next` the app first GETs URL (a new
//!   connection), passing those headers on as an app in a traced mesh must,
//!   and adds the answer (`next`: the JSON, or `{"error": ...}` with status
//!   502).
//! - `get URL [--method M]`: one plain HTTP/1.1 request (GET unless `M`,
//!   e.g. `POST`, with an empty body); prints the body; exit 1 unless 2xx.
//! - `load URL --seconds S --interval-ms I`: sends GETs one after another
//!   (a new connection each) for S seconds, then prints a JSON summary:
//!   `sent`, `ok`, `failed`, the first errors, and counts of answers by
//!   `pod` and by `identity`. Always exits 0; the caller judges.
//! - `webhook --port P --cert F --key F`: HTTPS mutating admission webhook
//!   that labels every object `weft-e2e/mutated=true`.
//! - `tcp-echo --port P`: plain TCP server writing back every byte it
//!   reads, closing its side when the client closes its own.
//! - `tcp-send ADDR --bytes N --count C`: C connections one after another,
//!   each sending N bytes, closing its write side, and reading until the
//!   server closes; prints one JSON line per connection: `{"sent": N,
//!   "received": M}` or `{"error": ...}`.
//! - `kube-access --namespace NS`: authenticates with the pod's service
//!   account (in-cluster config), tries to list ConfigMaps and Secrets in NS,
//!   prints `<resource>: allowed` or `<resource>: denied <code>`, then idles.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use axum::extract::{ConnectInfo, Request};
use base64::Engine as _;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use kube::api::ListParams;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[derive(Parser, Debug)]
#[command(about = "test programs for weft's e2e pods")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// HTTP echo server.
    Echo {
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// For `…/chain…` requests: GET this `http://` URL first, passing the
        /// trace headers on, and include its answer.
        #[arg(long)]
        next: Option<String>,
    },
    /// One HTTP request (GET unless --method).
    Get {
        url: String,
        /// Request method; any body is empty.
        #[arg(long, default_value = "GET")]
        method: String,
        /// Extra request headers, `Name: value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
    },
    /// GETs in a loop for a while; prints a JSON summary.
    Load {
        url: String,
        /// How long to send for.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Pause between requests.
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
        /// Extra request headers, `Name: value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
    },
    /// GETs one after another (each on a new connection); prints one JSON
    /// line per request: `{"pod": ...}` (the echo app that answered) or
    /// `{"error": ...}`.
    Send {
        url: String,
        /// How many requests.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Extra request headers, `Name: value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
    },
    /// GETs one after another until stdin closes; prints one JSON line per
    /// request as it completes: `{"atMs": <send time since start>, "pod"|"error": ...}`.
    Stream {
        url: String,
        /// Pause between requests.
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
    },
    /// Mutating admission webhook over HTTPS.
    Webhook {
        #[arg(long, default_value_t = 8443)]
        port: u16,
        #[arg(long)]
        cert: std::path::PathBuf,
        #[arg(long)]
        key: std::path::PathBuf,
    },
    /// TCP echo server.
    TcpEcho {
        #[arg(long, default_value_t = 9000)]
        port: u16,
    },
    /// TCP connections sending a known number of bytes each.
    TcpSend {
        addr: String,
        /// Bytes sent on each connection.
        #[arg(long, default_value_t = 1000)]
        bytes: usize,
        /// How many connections.
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    /// Service-account access check.
    KubeAccess {
        #[arg(long)]
        namespace: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    match Cli::parse().cmd {
        Cmd::Echo { port, next } => echo(port, next).await,
        Cmd::Get {
            url,
            method,
            headers,
        } => {
            println!("{}", request(&method, &url, &headers).await?);
            Ok(())
        }
        Cmd::Load {
            url,
            seconds,
            interval_ms,
            headers,
        } => load(&url, seconds, interval_ms, &headers).await,
        Cmd::Send {
            url,
            count,
            headers,
        } => {
            for _ in 0..count {
                println!("{}", outcome(&url, &headers).await);
            }
            Ok(())
        }
        Cmd::Stream { url, interval_ms } => stream(&url, interval_ms).await,
        Cmd::Webhook { port, cert, key } => webhook(port, &cert, &key).await,
        Cmd::KubeAccess { namespace } => kube_access(&namespace).await,
        Cmd::TcpEcho { port } => tcp_echo(port).await,
        Cmd::TcpSend { addr, bytes, count } => {
            for _ in 0..count {
                let line = match tokio::time::timeout(
                    std::time::Duration::from_secs(15),
                    tcp_send(&addr, bytes),
                )
                .await
                {
                    Ok(Ok(received)) => json!({ "sent": bytes, "received": received }),
                    Ok(Err(e)) => json!({ "error": format!("{e:#}") }),
                    Err(_) => json!({ "error": "timed out after 15s" }),
                };
                println!("{line}");
            }
            Ok(())
        }
    }
}

async fn tcp_echo(port: u16) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    eprintln!("tcp echo listening on {}", listener.local_addr()?);
    loop {
        let (mut conn, _) = listener.accept().await?;
        tokio::spawn(async move {
            let (mut r, mut w) = conn.split();
            if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                let _ = w.shutdown().await;
            }
        });
    }
}

/// One connection: sends `bytes` bytes, closes the write side, reads until
/// the server closes; returns how many bytes came back.
async fn tcp_send(addr: &str, bytes: usize) -> anyhow::Result<usize> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    let payload: Vec<u8> = (0..bytes).map(|i| b'a' + (i % 26) as u8).collect();
    s.write_all(&payload).await.context("send")?;
    s.shutdown().await.context("close the write side")?;
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.context("receive")?;
    Ok(back.len())
}

/// The headers an app passes from an incoming request to the requests it
/// makes because of it, so the mesh's proxies put them in one trace: W3C
/// trace context, B3 (single and multi header) and the request id.
const PROPAGATED: [&str; 9] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-request-id",
];

async fn echo(port: u16, next: Option<String>) -> anyhow::Result<()> {
    let pod = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default();
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .fallback(
            move |ConnectInfo(peer): ConnectInfo<SocketAddr>, req: Request| {
                let pod = pod.clone();
                let next = next.clone();
                async move {
                    let identity = req
                        .headers()
                        .get("x-weft-peer-identity")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let mut answer = json!({
                        "pod": pod,
                        "peer": peer.to_string(),
                        "identity": identity,
                        "path": req.uri().path(),
                    });
                    let mut status = axum::http::StatusCode::OK;
                    if req.uri().path().split('/').any(|s| s == "chain") {
                        let (received, next_answer) = chain(req.headers(), next.as_deref()).await;
                        answer["headers"] = received;
                        if let Some(n) = next_answer {
                            if n.get("error").is_some() {
                                status = axum::http::StatusCode::BAD_GATEWAY;
                            }
                            answer["next"] = n;
                        }
                    }
                    (status, axum::Json(answer))
                }
            },
        );
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    eprintln!("echo listening on {}", listener.local_addr()?);
    // As a well-behaved server in a pod: on SIGTERM stop accepting and
    // finish the requests in flight, so a deleted pod cuts no response.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            term.recv().await;
        } else {
            std::future::pending::<()>().await;
        }
    })
    .await?;
    Ok(())
}

/// A `/chain` request: the propagated headers it came with (name → value),
/// and, with a next hop, that hop's answer (its JSON, or `{"error": ...}`)
/// to a GET carrying the same headers.
async fn chain(
    headers: &axum::http::HeaderMap,
    next: Option<&str>,
) -> (serde_json::Value, Option<serde_json::Value>) {
    let mut received = serde_json::Map::new();
    let mut pass_on = Vec::new();
    for name in PROPAGATED {
        if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) {
            received.insert(name.to_owned(), json!(v));
            pass_on.push(format!("{name}: {v}"));
        }
    }
    let Some(url) = next else {
        return (received.into(), None);
    };
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), fetch(url, &pass_on))
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within 10 s")))
        .and_then(|body| Ok(serde_json::from_str::<serde_json::Value>(body.trim())?));
    let next = match answer {
        Ok(v) => v,
        Err(e) => json!({ "url": url, "error": format!("{e:#}") }),
    };
    (received.into(), Some(next))
}

/// One GET on a new connection; the body of a 2xx answer.
async fn fetch(url: &str, headers: &[String]) -> anyhow::Result<String> {
    request("GET", url, headers).await
}

/// One request with an empty body on a new connection; the body of a 2xx
/// answer.
async fn request(method: &str, url: &str, headers: &[String]) -> anyhow::Result<String> {
    let rest = url
        .strip_prefix("http://")
        .context("only http:// URLs are supported")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut s = tokio::net::TcpStream::connect(authority)
        .await
        .with_context(|| format!("connect {authority}"))?;
    let mut extra = String::new();
    for h in headers {
        extra.push_str(h);
        extra.push_str("\r\n");
    }
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: {authority}\r\n{extra}{length}Connection: close\r\n\r\n",
            length = if method == "GET" { "" } else { "Content-Length: 0\r\n" }
        )
        .as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed HTTP response")?;
    if !(200..300).contains(&code) {
        // The step a weft proxy names when it answered itself.
        let step = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("x-weft-error")
                .then(|| v.trim().to_owned())
        });
        match step {
            Some(step) => bail!("HTTP {code} (x-weft-error: {step}): {}", body.trim()),
            None => bail!("HTTP {code}: {}", body.trim()),
        }
    }
    Ok(body.to_owned())
}

/// One request to an echo app, as a JSON object: who answered, or why not.
async fn outcome(url: &str, headers: &[String]) -> serde_json::Value {
    let answer = tokio::time::timeout(std::time::Duration::from_secs(15), fetch(url, headers))
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within 15 s")))
        .and_then(|body| Ok(serde_json::from_str::<serde_json::Value>(body.trim())?));
    match answer {
        Ok(v) => json!({"pod": v["pod"].as_str().unwrap_or("?")}),
        Err(e) => json!({"error": format!("{e:#}")}),
    }
}

async fn stream(url: &str, interval_ms: u64) -> anyhow::Result<()> {
    use std::io::Write as _;
    let start = tokio::time::Instant::now();
    let mut stdin_closed = tokio::spawn(async {
        let mut sink = Vec::new();
        let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    });
    loop {
        let at = start.elapsed();
        let mut line = outcome(url, &[]).await;
        line["atMs"] = json!(u64::try_from(at.as_millis()).unwrap_or(u64::MAX));
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
        drop(out);
        tokio::select! {
            _ = &mut stdin_closed => return Ok(()),
            () = tokio::time::sleep(std::time::Duration::from_millis(interval_ms)) => {}
        }
    }
}

async fn load(url: &str, seconds: u64, interval_ms: u64, headers: &[String]) -> anyhow::Result<()> {
    use std::collections::BTreeMap;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(seconds);
    let (mut sent, mut ok) = (0u64, 0u64);
    let mut errors: Vec<String> = Vec::new();
    let mut by_pod: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_identity: BTreeMap<String, u64> = BTreeMap::new();
    while tokio::time::Instant::now() < deadline {
        sent += 1;
        let answer = tokio::time::timeout(std::time::Duration::from_secs(10), fetch(url, headers))
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within 10 s")))
            .and_then(|body| Ok(serde_json::from_str::<serde_json::Value>(&body)?));
        match answer {
            Ok(v) => {
                ok += 1;
                let field = |k: &str| v[k].as_str().unwrap_or("").to_owned();
                *by_pod.entry(field("pod")).or_default() += 1;
                *by_identity.entry(field("identity")).or_default() += 1;
            }
            Err(e) => {
                if errors.len() < 10 {
                    errors.push(format!("request {sent}: {e:#}"));
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(interval_ms)).await;
    }
    println!(
        "{}",
        json!({
            "sent": sent,
            "ok": ok,
            "failed": sent - ok,
            "errors": errors,
            "byPod": by_pod,
            "byIdentity": by_identity,
        })
    );
    Ok(())
}

async fn webhook(port: u16, cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<()> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("read {}", cert.display()))?
        .collect::<Result<_, _>>()?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("read {}", key.display()))?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    eprintln!("webhook listening on {}", listener.local_addr()?);
    loop {
        let (tcp, peer) = listener.accept().await?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("tls from {peer}: {e}");
                    return;
                }
            };
            let svc = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    let body = req.into_body().collect().await?.to_bytes();
                    let reply = match mutate(&body) {
                        Ok(v) => v,
                        Err(e) => {
                            eprintln!("bad review: {e}");
                            json!({"error": e.to_string()})
                        }
                    };
                    Ok::<_, hyper::Error>(
                        hyper::Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(reply.to_string())))
                            .unwrap_or_default(),
                    )
                },
            );
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await
            {
                eprintln!("conn from {peer}: {e}");
            }
        });
    }
}

/// AdmissionReview in, AdmissionReview with a JSON patch out.
fn mutate(body: &[u8]) -> anyhow::Result<serde_json::Value> {
    let review: serde_json::Value = serde_json::from_slice(body)?;
    let req = review.get("request").context("no request")?;
    let uid = req.get("uid").and_then(|u| u.as_str()).context("no uid")?;
    let has_labels = req
        .pointer("/object/metadata/labels")
        .is_some_and(|l| l.is_object());
    let patch = if has_labels {
        json!([{"op": "add", "path": "/metadata/labels/weft-e2e~1mutated", "value": "true"}])
    } else {
        json!([{"op": "add", "path": "/metadata/labels", "value": {"weft-e2e/mutated": "true"}}])
    };
    eprintln!("mutating {uid}");
    Ok(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {
            "uid": uid,
            "allowed": true,
            "patchType": "JSONPatch",
            "patch": base64::engine::general_purpose::STANDARD.encode(patch.to_string()),
        }
    }))
}

async fn kube_access(namespace: &str) -> anyhow::Result<()> {
    let config = kube::Config::incluster().context("in-cluster config")?;
    let client = kube::Client::try_from(config)?;
    let outcome = |r: Result<(), kube::Error>| match r {
        Ok(()) => "allowed".to_string(),
        Err(kube::Error::Api(s)) => format!("denied {}", s.code),
        Err(e) => format!("error {e}"),
    };
    let cms = Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .map(|_| ());
    println!("configmaps: {}", outcome(cms));
    let secrets = Api::<Secret>::namespaced(client, namespace)
        .list(&ListParams::default())
        .await
        .map(|_| ());
    println!("secrets: {}", outcome(secrets));
    std::future::pending::<()>().await;
    Ok(())
}
