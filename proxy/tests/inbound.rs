//! Inbound behaviour that depends on the config's `inbound` section and the
//! mTLS mode: plaintext on server-first ports (refused at once under Strict,
//! delivered without the detection wait under Permissive), per-port
//! protocols overriding detection, local rate limits (HTTP and TCP), and
//! path rules judged on the normal form of the path the app receives.
//!
//! The detection timeout is set to an hour in these tests, so a proxy that
//! waited for it would hang until the tests' generous guard fails them.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_proxy::metrics::Direction;
use weft_proxy::test_util::TestCa;
use weft_proxy_config::{
    AccessAction, AccessDestination, AccessPolicy, AccessRule, EscapedSlashes, InboundPort,
    MtlsMode, Protocol, ProxyConfig, RateLimit, Selector,
};

/// A hang guard, far above anything the proxy should take.
const GUARD: Duration = Duration::from_secs(20);

fn echo_labels() -> Selector {
    [("app".to_owned(), "echo".to_owned())].into()
}

/// A server-first app that counts the connections it accepted.
async fn counting_greeter() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            n2.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = s.write_all(b"220 hello\r\n").await;
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
            });
        }
    });
    (addr, n)
}

/// A server pod with `cfg`, labels `app=echo`, an hour of detection timeout.
async fn server(cfg: &ProxyConfig, ca: &TestCa, opaque_ports: Vec<u16>) -> Pod {
    Pod::start_with(cfg, &ca.leaf(SERVER_ID, 3600), ca, |s| {
        s.labels = echo_labels();
        s.detect_timeout = Duration::from_secs(3600);
        s.opaque_ports = opaque_ports;
    })
    .await
}

/// A plaintext client connection captured by `pod`'s inbound listener,
/// addressed to the pod's `port`.
async fn plaintext(pod: &Pod, port: u16) -> TcpStream {
    pod.inbound_stamps
        .connect(
            pod.proxy.inbound_addr,
            SocketAddr::new(IpAddr::V4(SERVER_POD_IP), port),
        )
        .await
        .expect("connect inbound")
}

/// Reads until EOF (or a reset); returns what arrived.
async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let r = tokio::time::timeout(GUARD, async {
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(r.is_ok(), "the proxy kept a refused connection open");
    out
}

#[tokio::test]
async fn strict_refuses_silent_plaintext_clients_without_dialling_the_app() {
    init();
    let ca = TestCa::new("ca");
    let (greeter, accepted) = counting_greeter().await;
    let (other, accepted_other) = counting_greeter().await;
    // One port declared server-first by the pod, one left to detection:
    // under Strict neither waits for the detection timeout.
    let pod = server(
        &config(1, MtlsMode::Strict, vec![]),
        &ca,
        vec![greeter.port()],
    )
    .await;
    for port in [greeter.port(), other.port()] {
        let mut c = plaintext(&pod, port).await;
        let got = read_to_close(&mut c).await;
        assert!(got.is_empty(), "no banner may leak: {got:?}");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "app dialled under Strict"
    );
    assert_eq!(accepted_other.load(Ordering::SeqCst), 0);
    assert_eq!(pod.errors(Direction::Inbound, "plaintext-refused"), 2);
}

/// A plaintext HTTP/1 request with a body that Strict refuses: the client
/// sends all of it, reads the 403 that says why, and sees the connection
/// end in an orderly close. A proxy that closed with the body unread
/// would reset the connection, and the reset can destroy the answer.
#[tokio::test]
async fn strict_refusal_of_a_request_with_a_body_reaches_the_client_and_closes_cleanly() {
    init();
    let ca = TestCa::new("ca");
    let (app, accepted) = counting_greeter().await;
    let pod = server(&config(1, MtlsMode::Strict, vec![]), &ca, vec![]).await;
    let c = plaintext(&pod, app.port()).await;
    let (mut rd, mut wr) = c.into_split();
    const BODY: usize = 512 * 1024;
    let writer = tokio::spawn(async move {
        wr.write_all(
            format!("POST /upload HTTP/1.1\r\nhost: echo\r\ncontent-length: {BODY}\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        for _ in 0..BODY / 8192 {
            wr.write_all(&[b'x'; 8192]).await?;
        }
        wr.shutdown().await
    });
    let mut got = Vec::new();
    let end = tokio::time::timeout(GUARD, async {
        let mut buf = [0u8; 4096];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the proxy kept a refused connection open");
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 403") && text.contains("x-weft-error: plaintext-refused"),
        "{text:?} ({end:?})"
    );
    assert!(end.is_ok(), "the refusal ended in {end:?}, not a close");
    let sent = tokio::time::timeout(GUARD, writer)
        .await
        .expect("writer hung")
        .expect("writer panicked");
    assert!(sent.is_ok(), "the body could not be sent: {sent:?}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "app dialled under Strict"
    );
    assert_eq!(pod.errors(Direction::Inbound, "plaintext-refused"), 1);
}

#[tokio::test]
async fn permissive_server_first_ports_get_the_banner_without_the_detection_wait() {
    init();
    let ca = TestCa::new("ca");
    let (declared, _) = counting_greeter().await;
    let (listed, _) = counting_greeter().await;
    let mut cfg = config(1, MtlsMode::Permissive, vec![]);
    cfg.inbound.ports = vec![InboundPort {
        selector: echo_labels(),
        port: declared.port(),
        protocol: Protocol::Opaque,
    }];
    cfg.seal();
    // `declared` is opaque by the config, `listed` by WEFT_OPAQUE_PORTS.
    let pod = server(&cfg, &ca, vec![listed.port()]).await;
    for port in [declared.port(), listed.port()] {
        let mut c = plaintext(&pod, port).await;
        let mut buf = [0u8; 11];
        tokio::time::timeout(GUARD, c.read_exact(&mut buf))
            .await
            .expect("banner before the guard")
            .expect("banner");
        assert_eq!(&buf, b"220 hello\r\n");
    }
}

#[tokio::test]
async fn declared_http1_port_is_proxied_as_http_whatever_the_bytes_look_like() {
    init();
    let ca = TestCa::new("ca");
    let app = echo_app().await;
    let mut cfg = config(1, MtlsMode::Permissive, vec![]);
    cfg.inbound.ports = vec![InboundPort {
        selector: echo_labels(),
        port: app.port(),
        protocol: Protocol::Http1,
    }];
    cfg.seal();
    let pod = server(&cfg, &ca, vec![]).await;
    // A WebDAV method detection does not know: as HTTP, the proxy strips the
    // forged identity header; as opaque bytes it would reach the app.
    let mut c = plaintext(&pod, app.port()).await;
    c.write_all(
        b"PROPFIND /dav HTTP/1.1\r\nhost: echo\r\nx-weft-peer-identity: spiffe://cluster.local/ns/evil/sa/forged\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
    )
    .await
    .expect("write");
    let text = String::from_utf8_lossy(&read_to_close(&mut c).await).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("PROPFIND /dav"), "{text}");
    assert!(
        !text.contains("x-weft-peer-identity"),
        "handled as HTTP, the forged header is stripped: {text}"
    );
    // The same pod under a label the entry does not select: detection, opaque.
    let other = Pod::start_with(&cfg, &ca.leaf(SERVER_ID, 3600), &ca, |s| {
        s.labels = [("app".to_owned(), "cart".to_owned())].into();
    })
    .await;
    let mut c = plaintext(&other, app.port()).await;
    c.write_all(
        b"PROPFIND /dav HTTP/1.1\r\nhost: echo\r\nx-weft-peer-identity: forged\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
    )
    .await
    .expect("write");
    let text = String::from_utf8_lossy(&read_to_close(&mut c).await).into_owned();
    assert!(
        text.contains("x-weft-peer-identity: forged"),
        "not selected: bytes pass opaque: {text}"
    );
}

fn limit(port: u16, requests: u32, burst: u32) -> RateLimit {
    RateLimit {
        name: "echo-policy".into(),
        selector: echo_labels(),
        ports: vec![port],
        requests,
        // Per hour: no token comes back during a test.
        interval_ms: 3_600_000,
        burst,
    }
}

#[tokio::test]
async fn rate_limit_answers_429_with_the_step_and_counts_it() {
    init();
    let ca = TestCa::new("ca");
    let seen = Arc::new(AtomicUsize::new(0));
    let seen2 = seen.clone();
    let app = spawn_app(move |_req| {
        seen2.fetch_add(1, Ordering::SeqCst);
        async move {
            http::Response::new(
                http_body_util::Full::new(bytes::Bytes::from_static(b"ok"))
                    .map_err(|e| match e {})
                    .boxed(),
            )
        }
    })
    .await;
    let svc = service(
        "echo",
        cluster_ip(1),
        80,
        app.port(),
        Protocol::Http1,
        vec![meshed(SERVER_POD_IP, SERVER_ID)],
    );
    let mut server_cfg = config(1, MtlsMode::Strict, vec![]);
    server_cfg.inbound.rate_limits = vec![limit(app.port(), 2, 1)];
    server_cfg.seal();
    let server = server(&server_cfg, &ca, vec![]).await;
    let client = Pod::start(
        &config(1, MtlsMode::Strict, vec![svc]),
        &ca.leaf(CLIENT_ID, 3600),
        &ca,
    )
    .await;
    client.route_to(
        SocketAddr::new(IpAddr::V4(SERVER_POD_IP), app.port()),
        &server,
    );
    let mut c = h1(client.app_connect(SocketAddr::new(cluster_ip(1), 80)).await).await;
    let mut statuses = Vec::new();
    let mut limited_headers = None;
    for i in 0..5 {
        let req = Request::get(format!("/{i}"))
            .header("host", "echo")
            .body(body(""))
            .expect("request");
        let (status, headers, text) = read_text(c.send_request(req).await.expect("resp")).await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            assert!(text.contains("echo-policy"), "{text}");
            limited_headers = Some(headers);
        }
        statuses.push(status.as_u16());
    }
    // requests 2 + burst 1 = 3 at once, then refused.
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    let h = limited_headers.expect("a 429");
    assert_eq!(
        h.get("x-weft-error").map(|v| v.as_bytes()),
        Some(&b"rate-limited"[..])
    );
    let retry: u64 = h
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("retry-after seconds");
    assert!(retry >= 1, "{retry}");
    assert_eq!(
        seen.load(Ordering::SeqCst),
        3,
        "refused requests never reach the app"
    );
    assert_eq!(server.errors(Direction::Inbound, "rate-limited"), 2);
}

#[tokio::test]
async fn rate_limit_on_an_opaque_port_counts_connections() {
    init();
    let ca = TestCa::new("ca");
    let echo = tcp_echo().await;
    let mut cfg = config(1, MtlsMode::Permissive, vec![]);
    cfg.inbound.rate_limits = vec![limit(echo.port(), 1, 0)];
    cfg.seal();
    let pod = server(&cfg, &ca, vec![]).await;
    let mut first = plaintext(&pod, echo.port()).await;
    first.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    tokio::time::timeout(GUARD, first.read_exact(&mut buf))
        .await
        .expect("echo before the guard")
        .expect("echo");
    assert_eq!(&buf, b"ping");
    let mut second = plaintext(&pod, echo.port()).await;
    second.write_all(b"ping").await.expect("write");
    assert!(
        read_to_close(&mut second).await.is_empty(),
        "over the limit: closed before reaching the app"
    );
    assert_eq!(pod.errors(Direction::Inbound, "rate-limited"), 1);
}

/// An app that records the path and query of every request it gets and
/// answers 200 with them.
async fn recording_app() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let app = spawn_app(move |req: hyper::Request<hyper::body::Incoming>| {
        let target = req
            .uri()
            .path_and_query()
            .map_or_else(String::new, |pq| pq.as_str().to_owned());
        seen2.lock().expect("lock").push(target.clone());
        async move {
            http::Response::new(
                http_body_util::Full::new(bytes::Bytes::from(target))
                    .map_err(|e| match e {})
                    .boxed(),
            )
        }
    })
    .await;
    (app, seen)
}

fn path_policy(name: &str, action: AccessAction, paths: &[&str]) -> AccessPolicy {
    AccessPolicy {
        name: name.into(),
        selector: echo_labels(),
        ports: vec![],
        action,
        audit: false,
        rules: vec![AccessRule {
            from: vec![],
            to: vec![AccessDestination {
                paths: paths.iter().map(|p| (*p).to_owned()).collect(),
                ..Default::default()
            }],
        }],
    }
}

/// A server pod with `server_cfg` for `app`, and a client pod whose app
/// connection (HTTP/1, over mTLS between the proxies) reaches it.
async fn pair(
    server_cfg: &ProxyConfig,
    app: SocketAddr,
    ca: &TestCa,
) -> (Pod, Pod, hyper::client::conn::http1::SendRequest<TestBody>) {
    let svc = service(
        "echo",
        cluster_ip(1),
        80,
        app.port(),
        Protocol::Http1,
        vec![meshed(SERVER_POD_IP, SERVER_ID)],
    );
    let server = server(server_cfg, ca, vec![]).await;
    let client = Pod::start(
        &config(1, MtlsMode::Strict, vec![svc]),
        &ca.leaf(CLIENT_ID, 3600),
        ca,
    )
    .await;
    client.route_to(
        SocketAddr::new(IpAddr::V4(SERVER_POD_IP), app.port()),
        &server,
    );
    let c = h1(client.app_connect(SocketAddr::new(cluster_ip(1), 80)).await).await;
    (server, client, c)
}

async fn get(
    c: &mut hyper::client::conn::http1::SendRequest<TestBody>,
    path: &str,
) -> (StatusCode, Option<String>, String) {
    let req = Request::get(path)
        .header("host", "echo")
        .body(body(""))
        .expect("request");
    let resp = tokio::time::timeout(GUARD, c.send_request(req))
        .await
        .expect("answer before the guard")
        .expect("response");
    let (status, headers, text) = read_text(resp).await;
    let step = headers
        .get("x-weft-error")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, step, text)
}

#[tokio::test]
async fn spellings_of_a_denied_path_are_denied_or_refused_and_never_reach_the_app() {
    init();
    let ca = TestCa::new("ca");
    let (app, seen) = recording_app().await;
    let mut cfg = config(1, MtlsMode::Strict, vec![]);
    cfg.inbound.policies = vec![path_policy(
        "no-admin",
        AccessAction::Deny,
        &["/api/admin", "/api/admin/*"],
    )];
    cfg.seal();
    let (server, _client, mut c) = pair(&cfg, app, &ca).await;
    let forbidden = (StatusCode::FORBIDDEN, "denied");
    let ambiguous = (StatusCode::BAD_REQUEST, "ambiguous-path");
    for (path, (status, step)) in [
        ("/api//admin", forbidden),
        ("/api/./admin", forbidden),
        ("/api/x/../admin", forbidden),
        ("/api/%61dmin", forbidden),
        ("/api/admin;x", forbidden),
        ("/api/%2e%2e/api/admin/users", forbidden),
        ("/api/admin%2F", ambiguous),
        ("/api%2Fadmin", ambiguous),
        ("/api/..;x/admin", ambiguous),
    ] {
        let got = get(&mut c, path).await;
        assert_eq!(
            (got.0, got.1.as_deref()),
            (status, Some(step)),
            "{path}: {got:?}"
        );
    }
    assert_eq!(
        *seen.lock().expect("lock"),
        Vec::<String>::new(),
        "no spelling reached the app"
    );
    assert_eq!(server.errors(Direction::Inbound, "denied"), 6);
    assert_eq!(server.errors(Direction::Inbound, "ambiguous-path"), 3);
    // Paths next to the denied one are still served.
    let (status, _, text) = get(&mut c, "/api/administrators").await;
    assert_eq!(
        (status, text.as_str()),
        (StatusCode::OK, "/api/administrators")
    );
}

#[tokio::test]
async fn allowed_paths_are_served_in_normal_form_and_the_app_sees_that_form() {
    init();
    let ca = TestCa::new("ca");
    let (app, seen) = recording_app().await;
    let mut cfg = config(1, MtlsMode::Strict, vec![]);
    cfg.inbound.policies = vec![path_policy(
        "public-only",
        AccessAction::Allow,
        &["/api/public/*"],
    )];
    cfg.seal();
    let (_server, _client, mut c) = pair(&cfg, app, &ca).await;
    for (path, normal) in [
        ("/api//public/a", "/api/public/a"),
        (
            "/api/./public/x/../b?q=%2f&r=/../",
            "/api/public/b?q=%2f&r=/../",
        ),
        ("/api/%70ublic/%7euser", "/api/public/~user"),
        ("/api/public/caf%c3%a9", "/api/public/caf%C3%A9"),
        ("/api/public;v=1/c", "/api/public;v=1/c"),
    ] {
        let (status, step, text) = get(&mut c, path).await;
        assert_eq!((status, step), (StatusCode::OK, None), "{path}: {text}");
        assert_eq!(text, normal, "{path}");
    }
    // Spellings that leave the allowed prefix once normalised.
    for path in [
        "/api/public/../admin",
        "/api/public/%2e%2e/admin",
        "/api/private",
    ] {
        let (status, step, _) = get(&mut c, path).await;
        assert_eq!(
            (status, step.as_deref()),
            (StatusCode::FORBIDDEN, Some("denied")),
            "{path}"
        );
    }
    assert_eq!(
        seen.lock().expect("lock").len(),
        5,
        "only the allowed reached the app"
    );
}

#[tokio::test]
async fn keep_passes_encoded_slashes_to_the_app_as_data() {
    init();
    let ca = TestCa::new("ca");
    let (app, seen) = recording_app().await;
    let mut cfg = config(1, MtlsMode::Strict, vec![]);
    cfg.mesh.escaped_slashes = EscapedSlashes::Keep;
    cfg.inbound.policies = vec![path_policy(
        "files-only",
        AccessAction::Allow,
        &["/api/files/*"],
    )];
    cfg.seal();
    let (server, _client, mut c) = pair(&cfg, app, &ca).await;
    let (status, step, text) = get(&mut c, "/api/./files/group%2fname").await;
    assert_eq!((status, step), (StatusCode::OK, None), "{text}");
    assert_eq!(text, "/api/files/group%2Fname");
    assert_eq!(
        *seen.lock().expect("lock"),
        ["/api/files/group%2Fname"],
        "the app sees the encoded slash as the policy did"
    );
    assert_eq!(server.errors(Direction::Inbound, "ambiguous-path"), 0);
}
