//! The app's original probes, run by the proxy against real apps on
//! loopback: HTTPS (self-signed certificate, as apps serving their own TLS
//! have; host header, custom headers, path and query honoured; same-host
//! redirects followed), plain HTTP, TCP, and gRPC health checks.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use weft_proxy::probes::{AppProbes, run};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// What the app saw of one request.
#[derive(Clone, Debug, Default)]
struct Seen {
    path_and_query: String,
    host: String,
    user_agent: String,
    accept: String,
    x_probe: Vec<String>,
}

/// The app's answer: 200 on `/healthz?full=1` when the probe's headers
/// arrived, 302 from `/old` to it, 503 on anything else.
fn answer(req: &Request<Incoming>, log: &Mutex<Vec<Seen>>) -> Response<Full<Bytes>> {
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let seen = Seen {
        path_and_query: req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default(),
        host: h("host"),
        user_agent: h("user-agent"),
        accept: h("accept"),
        x_probe: req
            .headers()
            .get_all("x-probe")
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect(),
    };
    log.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(seen.clone());
    let status = match seen.path_and_query.as_str() {
        "/healthz?full=1" if seen.x_probe == ["a", "b"] => StatusCode::OK,
        "/old" => {
            return Response::builder()
                .status(StatusCode::FOUND)
                .header("location", "/healthz?full=1")
                .body(Full::new(Bytes::new()))
                .expect("response");
        }
        "/elsewhere" => {
            return Response::builder()
                .status(StatusCode::MOVED_PERMANENTLY)
                .header("location", "https://example.invalid/")
                .body(Full::new(Bytes::new()))
                .expect("response");
        }
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::new()))
        .expect("response")
}

/// An HTTPS app on loopback with a self-signed certificate. Returns its
/// port and the requests it saw.
async fn https_app() -> (u16, Arc<Mutex<Vec<Seen>>>) {
    install_provider();
    let ck = rcgen::generate_simple_self_signed(vec!["app.internal".to_owned()])
        .expect("self-signed certificate");
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let log = Arc::new(Mutex::new(Vec::new()));
    let l2 = log.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let log = l2.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(move |req| {
                    let r = answer(&req, &log);
                    async move { Ok::<_, Infallible>(r) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (port, log)
}

/// The same app without TLS.
async fn http_app() -> (u16, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let log = Arc::new(Mutex::new(Vec::new()));
    let l2 = log.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let log = l2.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let r = answer(&req, &log);
                    async move { Ok::<_, Infallible>(r) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (port, log)
}

fn http_probe(port: u16, scheme: &str, path: &str, headers: &str) -> AppProbes {
    let json = format!(
        r#"{{"version":1,"containers":{{"app":{{"readyz":{{"http":{{"port":{port},"path":"{path}","scheme":"{scheme}","headers":[{headers}]}},"timeoutSeconds":5}}}}}}}}"#
    );
    AppProbes::parse(&json).expect("probe JSON")
}

const HEADERS: &str = r#"{"name":"Host","value":"probe.weft.test"},{"name":"x-probe","value":"a"},{"name":"x-probe","value":"b"}"#;

async fn check(p: &AppProbes) -> Result<(), String> {
    run(p.get("app", "readyz").expect("readyz probe"), LOOPBACK).await
}

#[tokio::test]
async fn https_probe_skips_verification_and_honours_host_headers_and_path() {
    let (port, log) = https_app().await;
    let ok = http_probe(port, "HTTPS", "/healthz?full=1", HEADERS);
    check(&ok).await.expect("HTTPS probe passes");
    let seen = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let last = seen.last().expect("the app saw the probe");
    assert_eq!(last.path_and_query, "/healthz?full=1");
    assert_eq!(last.host, "probe.weft.test");
    assert_eq!(last.x_probe, ["a", "b"]);
    assert!(last.user_agent.starts_with("kube-probe/"), "{last:?}");
    assert_eq!(last.accept, "*/*");

    // A failing status fails the probe, and says so.
    let bad = http_probe(port, "HTTPS", "/healthz?full=0", HEADERS);
    let err = check(&bad).await.expect_err("503 fails");
    assert!(err.contains("503"), "{err}");
    // Without the headers the app answers 503: they are really sent.
    let bare = http_probe(port, "HTTPS", "/healthz?full=1", "");
    check(&bare).await.expect_err("headers matter");
    let seen = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(
        seen.last().expect("seen").host,
        format!("127.0.0.1:{port}"),
        "default Host is the URL's host:port"
    );
}

#[tokio::test]
async fn https_probe_follows_same_host_redirects() {
    let (port, log) = https_app().await;
    check(&http_probe(port, "HTTPS", "/old", HEADERS))
        .await
        .expect("redirect to a passing path");
    let paths: Vec<String> = log
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|s| s.path_and_query.clone())
        .collect();
    assert_eq!(paths, ["/old", "/healthz?full=1"]);
    // A redirect to another host counts as success, as for the kubelet.
    check(&http_probe(port, "HTTPS", "/elsewhere", ""))
        .await
        .expect("redirect elsewhere passes");
}

#[tokio::test]
async fn scheme_must_match_the_app() {
    let (tls_port, _) = https_app().await;
    let (plain_port, plain_log) = http_app().await;
    check(&http_probe(plain_port, "HTTP", "/healthz?full=1", HEADERS))
        .await
        .expect("HTTP probe on the plain app");
    assert_eq!(plain_log.lock().expect("log").len(), 1);
    check(&http_probe(plain_port, "HTTPS", "/healthz?full=1", HEADERS))
        .await
        .expect_err("HTTPS against a plaintext app fails");
    check(&http_probe(tls_port, "HTTP", "/healthz?full=1", HEADERS))
        .await
        .expect_err("HTTP against a TLS app fails");
}

#[tokio::test]
async fn tcp_probe_connects_to_the_port_and_its_host() {
    let l = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    let probe = |json: String| AppProbes::parse(&json).expect("probe JSON");
    let open = probe(format!(
        r#"{{"version":1,"containers":{{"app":{{"livez":{{"tcp":{{"port":{port}}},"timeoutSeconds":2}}}}}}}}"#
    ));
    run(open.get("app", "livez").expect("livez"), LOOPBACK)
        .await
        .expect("open port passes");
    // The probe's own host wins over the app host (kubelet semantics).
    let elsewhere = probe(format!(
        r#"{{"version":1,"containers":{{"app":{{"livez":{{"tcp":{{"port":{port},"host":"127.0.0.1"}},"timeoutSeconds":2}}}}}}}}"#
    ));
    run(
        elsewhere.get("app", "livez").expect("livez"),
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)),
    )
    .await
    .expect("host field used");
    drop(l);
    run(open.get("app", "livez").expect("livez"), LOOPBACK)
        .await
        .expect_err("closed port fails");
}

/// A gRPC health server: SERVING for `service`, NOT_SERVING (trailers-only)
/// for anything else.
async fn grpc_app(service: String) -> u16 {
    let listener = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let service = service.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let service = service.clone();
                    async move {
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        let asked = body.ok().and_then(|b| decode_service(&b));
                        let resp = if asked.as_deref() == Some(service.as_str()) {
                            let body =
                                http_body_util::StreamBody::new(futures::stream::iter(vec![
                                    Ok::<_, Infallible>(Frame::data(Bytes::from_static(&[
                                        0, 0, 0, 0, 2, 0x08, 1,
                                    ]))),
                                    Ok(Frame::trailers({
                                        let mut t = http::HeaderMap::new();
                                        t.insert("grpc-status", "0".parse().expect("value"));
                                        t
                                    })),
                                ]));
                            Response::builder()
                                .header("content-type", "application/grpc")
                                .body(body.boxed())
                                .expect("response")
                        } else {
                            // Trailers-only: grpc-status 5 (NOT_FOUND) in the headers.
                            Response::builder()
                                .header("content-type", "application/grpc")
                                .header("grpc-status", "5")
                                .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
                                .expect("response")
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    port
}

/// The service name of a `HealthCheckRequest` (field 1, varint length).
fn decode_service(frame: &[u8]) -> Option<String> {
    let msg = frame.get(5..)?;
    if msg.is_empty() {
        return Some(String::new());
    }
    if msg[0] != 0x0a {
        return None;
    }
    let (mut len, mut shift, mut i) = (0usize, 0, 1);
    loop {
        let b = *msg.get(i)?;
        len |= usize::from(b & 0x7f) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    String::from_utf8(msg.get(i..i + len)?.to_vec()).ok()
}

#[tokio::test]
async fn grpc_probe_sends_long_service_names_and_reads_trailers_only_errors() {
    // Longer than 127 bytes: its length needs a two-byte varint.
    let service = format!("weft.test.{}", "x".repeat(200));
    let port = grpc_app(service.clone()).await;
    let probe = |svc: &str| {
        AppProbes::parse(&format!(
            r#"{{"version":1,"containers":{{"app":{{"startupz":{{"grpc":{{"port":{port},"service":"{svc}"}},"timeoutSeconds":5}}}}}}}}"#
        ))
        .expect("probe JSON")
    };
    let good = probe(&service);
    run(good.get("app", "startupz").expect("startupz"), LOOPBACK)
        .await
        .expect("SERVING passes");
    let other = probe("other");
    let err = run(other.get("app", "startupz").expect("startupz"), LOOPBACK)
        .await
        .expect_err("unknown service fails");
    assert!(err.contains("grpc-status 5"), "{err}");
}

#[tokio::test]
async fn unknown_scheme_is_a_clear_failure() {
    let (port, _) = http_app().await;
    let err = check(&http_probe(port, "FTP", "/", ""))
        .await
        .expect_err("unknown scheme");
    assert!(err.contains("FTP"), "{err}");
}
