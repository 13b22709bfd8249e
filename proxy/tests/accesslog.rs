//! Access logs (`mesh.accessLog`): one JSON line per HTTP request on each
//! reporter, joined by the request id the client proxy adds; none when the
//! setting is off.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_proxy::accesslog::Output;
use weft_proxy::test_util::TestCa;
use weft_proxy_config::{
    AccessAction, AccessDestination, AccessPolicy, AccessRule, MtlsMode, Protocol,
};

type Lines = Arc<Mutex<Vec<String>>>;

struct Logged {
    client: Pod,
    _server: Pod,
    client_lines: Lines,
    server_lines: Lines,
    dst: SocketAddr,
    _ca: TestCa,
}

async fn pair(access_log: bool, app: SocketAddr, policies: Vec<AccessPolicy>) -> Logged {
    pair_of(access_log, app, policies, Protocol::Http1).await
}

async fn pair_of(
    access_log: bool,
    app: SocketAddr,
    policies: Vec<AccessPolicy>,
    protocol: Protocol,
) -> Logged {
    init();
    let ca = TestCa::new("weft test CA");
    let svc = service(
        "echo",
        cluster_ip(1),
        80,
        app.port(),
        protocol,
        vec![meshed(SERVER_POD_IP, SERVER_ID)],
    );
    let mut client_cfg = config(1, MtlsMode::Strict, vec![svc]);
    let mut server_cfg = config(1, MtlsMode::Strict, vec![]);
    server_cfg.inbound.policies = policies;
    for c in [&mut client_cfg, &mut server_cfg] {
        c.mesh.access_log = access_log;
        c.seal();
    }
    let client_lines = Lines::default();
    let server_lines = Lines::default();
    let (cl, sl) = (client_lines.clone(), server_lines.clone());
    let server = Pod::start_with(&server_cfg, &ca.leaf(SERVER_ID, 3600), &ca, move |s| {
        s.access_log_output = Output::Capture(sl.clone());
    })
    .await;
    let client = Pod::start_with(&client_cfg, &ca.leaf(CLIENT_ID, 3600), &ca, move |s| {
        s.access_log_output = Output::Capture(cl.clone());
    })
    .await;
    client.route_to(
        SocketAddr::new(IpAddr::V4(SERVER_POD_IP), app.port()),
        &server,
    );
    Logged {
        client,
        _server: server,
        client_lines,
        server_lines,
        dst: SocketAddr::new(cluster_ip(1), 80),
        _ca: ca,
    }
}

fn parsed(lines: &Lines) -> Vec<serde_json::Value> {
    lines
        .lock()
        .expect("lines")
        .iter()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
        .collect()
}

async fn until_lines(lines: &Lines, n: usize) -> Vec<serde_json::Value> {
    for _ in 0..200 {
        if lines.lock().expect("lines").len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    parsed(lines)
}

#[tokio::test]
async fn each_request_is_logged_once_by_each_proxy_with_one_request_id() {
    let p = pair(true, echo_app().await, vec![]).await;
    let mut c = h1(p.client.app_connect(p.dst).await).await;
    let mine = Request::get("/orders/7?token=secret")
        .header("host", "echo")
        .header("x-request-id", "req-from-the-app")
        .body(body(""))
        .expect("request");
    let (status, _, text) = read_text(c.send_request(mine).await.expect("response")).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(
        text.contains("x-request-id: req-from-the-app"),
        "kept: {text}"
    );
    let fresh = Request::post("/orders")
        .header("host", "echo")
        .body(body("four"))
        .expect("request");
    let (status, _, text) = read_text(c.send_request(fresh).await.expect("response")).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let added = text
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .expect("the client proxy adds a request id")
        .to_owned();
    assert_eq!(added.len(), 32, "{added}");

    let client = until_lines(&p.client_lines, 2).await;
    let server = until_lines(&p.server_lines, 2).await;
    assert_eq!(
        (client.len(), server.len()),
        (2, 2),
        "{client:?} {server:?}"
    );
    for (i, id) in ["req-from-the-app", added.as_str()].into_iter().enumerate() {
        let (c, s) = (&client[i], &server[i]);
        assert_eq!(c["request_id"], id, "{c}");
        assert_eq!(s["request_id"], id, "{s}");
        assert_eq!(c["reporter"], "source");
        assert_eq!(s["reporter"], "destination");
        assert_eq!(c["status"], 200);
        assert_eq!(s["status"], 200);
        assert_eq!(c["source_principal"], CLIENT_ID);
        assert_eq!(c["destination_principal"], SERVER_ID);
        assert_eq!(s["source_principal"], CLIENT_ID);
        assert_eq!(s["destination_principal"], SERVER_ID);
        assert_eq!(c["destination_service"], "echo.shop");
        assert!(
            c["upstream"]
                .as_str()
                .is_some_and(|u| u.starts_with("127.0.0.2:")),
            "{c}"
        );
        assert_eq!(c["protocol"], "HTTP/1.1");
        assert!(c["failed_step"].is_null(), "{c}");
        assert!(c["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{c}");
        assert!(c["start"].as_str().is_some_and(|t| t.ends_with('Z')), "{c}");
    }
    assert_eq!(client[0]["path"], "/orders/7", "the query is not logged");
    assert!(!client[0].to_string().contains("secret"));
    assert_eq!(client[0]["method"], "GET");
    assert_eq!(client[1]["method"], "POST");
    assert_eq!(client[1]["request_bytes"], 4);
    assert_eq!(p.client.proxy.state.metrics.access_log_dropped.get(), 0);
}

#[tokio::test]
async fn a_failed_request_names_its_step_and_nothing_is_logged_when_off() {
    // An app that is gone: the server proxy cannot reach it.
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let p = pair(true, gone, vec![]).await;
    let mut c = h1(p.client.app_connect(p.dst).await).await;
    let req = Request::get("/")
        .header("host", "echo")
        .body(body(""))
        .expect("request");
    let (status, _, text) = read_text(c.send_request(req).await.expect("response")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    let client = until_lines(&p.client_lines, 1).await;
    let server = until_lines(&p.server_lines, 1).await;
    assert_eq!(server[0]["status"], 503, "{server:?}");
    assert_eq!(server[0]["failed_step"], "connect", "{server:?}");
    assert_eq!(client[0]["status"], 503, "{client:?}");
    assert_eq!(client[0]["failed_step"], "connect", "{client:?}");
    assert_eq!(client[0]["request_id"], server[0]["request_id"]);

    let off = pair(false, echo_app().await, vec![]).await;
    let mut c = h1(off.client.app_connect(off.dst).await).await;
    let req = Request::get("/")
        .header("host", "echo")
        .body(body(""))
        .expect("request");
    let (status, _, _) = read_text(c.send_request(req).await.expect("response")).await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(off.client_lines.lock().expect("lines").is_empty());
    assert!(off.server_lines.lock().expect("lines").is_empty());
}

#[tokio::test]
async fn a_request_an_audit_policy_would_refuse_is_marked_on_the_server_line() {
    let audit_deny = AccessPolicy {
        name: "audit-no-admin".into(),
        selector: Default::default(),
        ports: vec![],
        action: AccessAction::Deny,
        audit: true,
        rules: vec![AccessRule {
            from: vec![],
            to: vec![AccessDestination {
                paths: vec!["/admin".into()],
                ..Default::default()
            }],
        }],
    };
    let p = pair(true, echo_app().await, vec![audit_deny]).await;
    let mut c = h1(p.client.app_connect(p.dst).await).await;
    for path in ["/admin", "/"] {
        let req = Request::get(path)
            .header("host", "echo")
            .body(body(""))
            .expect("request");
        let (status, _, text) = read_text(c.send_request(req).await.expect("response")).await;
        assert_eq!(status, StatusCode::OK, "audit refuses nothing: {text}");
    }
    let server = until_lines(&p.server_lines, 2).await;
    assert_eq!(server[0]["path"], "/admin");
    assert_eq!(server[0]["audit"], true, "{server:?}");
    assert_eq!(server[1]["audit"], false, "{server:?}");
    let client = until_lines(&p.client_lines, 2).await;
    assert_eq!(client[0]["audit"], false, "only the server decides");
}

#[tokio::test]
async fn an_opaque_connection_is_logged_when_it_ends_with_its_bytes() {
    let p = pair_of(true, tcp_echo().await, vec![], Protocol::Opaque).await;
    let mut s = p.client.app_connect(p.dst).await;
    let msg = vec![7u8; 10_000];
    s.write_all(&msg).await.expect("write");
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).await.expect("echo");
    s.shutdown().await.expect("half close");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .await
        .expect("the server side closes too");
    drop(s);
    let client = until_lines(&p.client_lines, 1).await;
    let server = until_lines(&p.server_lines, 1).await;
    for (line, reporter) in [(&client[0], "source"), (&server[0], "destination")] {
        assert_eq!(line["protocol"], "tcp", "{line}");
        assert_eq!(line["reporter"], reporter, "{line}");
        assert_eq!(line["request_bytes"], 10_000, "{line}");
        assert_eq!(line["response_bytes"], 10_000, "{line}");
        assert_eq!(line["source_principal"], CLIENT_ID, "{line}");
        assert_eq!(line["destination_principal"], SERVER_ID, "{line}");
        assert!(line["failed_step"].is_null(), "{line}");
    }
    assert_eq!(client[0]["destination_service"], "echo.shop");
}

async fn send_get(client: &Pod, dst: SocketAddr, path: &'static str) -> StatusCode {
    let mut c = h1(client.app_connect(dst).await).await;
    let req = Request::get(path)
        .header("host", "echo")
        .body(body(""))
        .expect("request");
    c.send_request(req).await.expect("response").status()
}

#[tokio::test]
async fn a_pod_turns_logs_down_to_errors_and_a_namespace_to_text_or_a_sample() {
    init();
    let ca = TestCa::new("weft test CA");
    let app = echo_app().await;
    let svc = service(
        "echo",
        cluster_ip(1),
        80,
        app.port(),
        Protocol::Http1,
        vec![meshed(SERVER_POD_IP, SERVER_ID)],
    );
    // A Service whose only endpoint refuses connections.
    let gone = service(
        "gone",
        cluster_ip(2),
        80,
        1,
        Protocol::Http1,
        vec![meshed(SERVER_POD_IP, SERVER_ID)],
    );
    let start =
        |options: weft_proxy_config::AccessLogOptions, pod: Option<Option<bool>>, lines: Lines| {
            let mut cfg = config(1, MtlsMode::Strict, vec![svc.clone(), gone.clone()]);
            cfg.mesh.access_log = true;
            cfg.mesh.access_log_options = options;
            cfg.seal();
            let leaf = ca.leaf(CLIENT_ID, 3600);
            let ca = &ca;
            async move {
                Pod::start_with(&cfg, &leaf, ca, move |s| {
                    s.access_log_output = Output::Capture(lines.clone());
                    s.access_log_override = pod;
                })
                .await
            }
        };
    let server_lines = Lines::default();
    let mut server_cfg = config(1, MtlsMode::Strict, vec![]);
    server_cfg.seal();
    let server = Pod::start_with(&server_cfg, &ca.leaf(SERVER_ID, 3600), &ca, move |s| {
        s.access_log_output = Output::Capture(server_lines.clone());
    })
    .await;
    let dst = SocketAddr::new(cluster_ip(1), 80);
    // The pod says "errors": the successes go unlogged, a failure is.
    let lines = Lines::default();
    let client = start(Default::default(), Some(Some(true)), lines.clone()).await;
    client.route_to(
        SocketAddr::new(IpAddr::V4(SERVER_POD_IP), app.port()),
        &server,
    );
    for _ in 0..3 {
        assert_eq!(send_get(&client, dst, "/ok").await, StatusCode::OK);
    }
    // An endpoint that refuses: 503 from the client proxy itself.
    let refused = SocketAddr::new(cluster_ip(2), 80);
    assert_eq!(
        send_get(&client, refused, "/gone").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let got = until_lines(&lines, 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got_after = parsed(&lines);
    assert_eq!(got_after.len(), 1, "{got_after:#?}");
    assert_eq!(got[0]["path"], "/gone");
    assert_eq!(got[0]["failed_step"], "connect");

    // The pod says "off".
    let lines = Lines::default();
    let client = start(Default::default(), Some(None), lines.clone()).await;
    client.route_to(
        SocketAddr::new(IpAddr::V4(SERVER_POD_IP), app.port()),
        &server,
    );
    assert_eq!(send_get(&client, dst, "/ok").await, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(parsed(&lines).is_empty());

    // Text lines, from the namespace's document.
    let lines = Lines::default();
    let text = weft_proxy_config::AccessLogOptions {
        format: weft_proxy_config::AccessLogFormat::Text,
        ..Default::default()
    };
    let client = start(text, None, lines.clone()).await;
    client.route_to(
        SocketAddr::new(IpAddr::V4(SERVER_POD_IP), app.port()),
        &server,
    );
    assert_eq!(send_get(&client, dst, "/t").await, StatusCode::OK);
    eventually("a text line", || !lines.lock().expect("lines").is_empty()).await;
    let line = lines.lock().expect("lines")[0].clone();
    assert!(line.contains(" source \"GET /t HTTP/1.1\" 200 "), "{line}");
    assert!(
        serde_json::from_str::<serde_json::Value>(&line).is_err(),
        "{line}"
    );

    // A 0 % sample logs nothing; 100 % everything.
    let lines = Lines::default();
    let none = weft_proxy_config::AccessLogOptions {
        sample_percent: 0.0,
        ..Default::default()
    };
    let client = start(none, None, lines.clone()).await;
    client.route_to(
        SocketAddr::new(IpAddr::V4(SERVER_POD_IP), app.port()),
        &server,
    );
    for _ in 0..5 {
        assert_eq!(send_get(&client, dst, "/s").await, StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(parsed(&lines).is_empty());
}

#[tokio::test]
async fn a_line_has_the_bytes_sent_and_the_time_to_first_byte() {
    let p = pair(true, echo_app().await, vec![]).await;
    let mut c = h1(p.client.app_connect(p.dst).await).await;
    let req = Request::post("/bytes")
        .header("host", "echo")
        .body(body("0123456789"))
        .expect("request");
    let (status, _, text) = read_text(c.send_request(req).await.expect("response")).await;
    assert_eq!(status, StatusCode::OK);
    let client = until_lines(&p.client_lines, 1).await;
    assert_eq!(client[0]["response_bytes"], text.len(), "{:#?}", client[0]);
    assert!(client[0]["ttfb_ms"].as_f64().is_some_and(|t| t > 0.0));
    assert!(
        client[0]["duration_ms"].as_f64() >= client[0]["ttfb_ms"].as_f64(),
        "{:#?}",
        client[0]
    );
}
