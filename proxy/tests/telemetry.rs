//! Golden traffic metrics on a proxy pair: after requests with known codes
//! and sizes, each reporter's `/metrics` holds exactly those counts with
//! the workloads of both ends; the caller's workload reaches the server
//! side only from a verified peer proxy; Istio naming; opaque TCP bytes.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_proxy::test_util::TestCa;
use weft_proxy_config::{Endpoint, MetricsNaming, MtlsMode, Protocol, ProxyConfig};

/// Headers named `x-weft-source` that reached the app.
type Seen = Arc<Mutex<Vec<String>>>;

/// An app answering `/s/<code>/<bytes>` with that status and body size.
async fn sized_app(seen: Seen) -> SocketAddr {
    spawn_app(move |req: Request<Incoming>| {
        let seen = seen.clone();
        async move {
            if let Some(v) = req.headers().get("x-weft-source") {
                seen.lock()
                    .expect("seen")
                    .push(v.to_str().unwrap_or("?").to_owned());
            }
            let mut parts = req.uri().path().split('/').skip(2);
            let code: u16 = parts.next().and_then(|c| c.parse().ok()).unwrap_or(200);
            let size: usize = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
            let _ = req.into_body().collect().await;
            let mut resp = Response::new(
                Full::new(Bytes::from(vec![b'x'; size]))
                    .map_err(|e| match e {})
                    .boxed(),
            );
            *resp.status_mut() = StatusCode::from_u16(code).expect("status");
            resp
        }
    })
    .await
}

fn echo_endpoint() -> Endpoint {
    Endpoint {
        workload: Some("echo-v1".into()),
        app: Some("echo".into()),
        version: Some("v1".into()),
        ..meshed(SERVER_POD_IP, SERVER_ID)
    }
}

struct Pair {
    client: Pod,
    server: Pod,
    dst: SocketAddr,
    app: SocketAddr,
    _ca: TestCa,
}

async fn pair(app: SocketAddr, protocol: Protocol, naming: MetricsNaming, mode: MtlsMode) -> Pair {
    init();
    let ca = TestCa::new("weft test CA");
    let svc = service(
        "echo",
        cluster_ip(1),
        80,
        app.port(),
        protocol,
        vec![echo_endpoint()],
    );
    let mut client_cfg = config(1, MtlsMode::Strict, vec![svc.clone()]);
    // The server's own namespace lists the Service it serves.
    let mut server_cfg: ProxyConfig = config(1, mode, vec![svc]);
    for c in [&mut client_cfg, &mut server_cfg] {
        c.mesh.metrics_naming = naming;
        c.seal();
    }
    let server = Pod::start_with(&server_cfg, &ca.leaf(SERVER_ID, 3600), &ca, |s| {
        s.workload = Some("echo-v1".into());
        s.pod_ip = Some(IpAddr::V4(SERVER_POD_IP));
        s.labels = [("app", "echo"), ("version", "v1")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
    })
    .await;
    let client = Pod::start_with(&client_cfg, &ca.leaf(CLIENT_ID, 3600), &ca, |s| {
        s.workload = Some("web".into());
        s.labels = [("app".to_owned(), "web".to_owned())].into_iter().collect();
    })
    .await;
    client.route_to(
        SocketAddr::new(IpAddr::V4(SERVER_POD_IP), app.port()),
        &server,
    );
    Pair {
        client,
        server,
        dst: SocketAddr::new(cluster_ip(1), 80),
        app,
        _ca: ca,
    }
}

fn metrics(p: &Pod) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &p.proxy.state.metrics.registry())
        .expect("encode");
    out
}

/// The value of the one series of `name` whose labels include all of
/// `with`; `None` if there is none, a panic if there are several.
fn value(text: &str, name: &str, with: &[&str]) -> Option<f64> {
    let found: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && with.iter().all(|w| l.contains(w)))
        .collect();
    assert!(
        found.len() <= 1,
        "several series match {with:?}: {found:#?}"
    );
    found
        .first()
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse().expect("a number"))
}

async fn send(
    p: &Pair,
    path: &str,
    body_text: &'static str,
    extra: Option<(&str, &str)>,
) -> StatusCode {
    let mut c = h1(p.client.app_connect(p.dst).await).await;
    let mut req = Request::post(path).header("host", "echo");
    if let Some((k, v)) = extra {
        req = req.header(k, v);
    }
    let resp = c
        .send_request(req.body(body(body_text)).expect("request"))
        .await
        .expect("response");
    let (status, _, _) = read_text(resp).await;
    status
}

#[tokio::test]
async fn both_reporters_count_each_call_with_both_workloads() {
    let seen = Seen::default();
    let p = pair(
        sized_app(seen.clone()).await,
        Protocol::Http1,
        MetricsNaming::Weft,
        MtlsMode::Strict,
    )
    .await;
    for _ in 0..3 {
        assert_eq!(send(&p, "/s/200/100", "four", None).await, StatusCode::OK);
    }
    // An app cannot name its workload: the client proxy replaces it.
    assert_eq!(
        send(
            &p,
            "/s/503/10",
            "",
            Some(("x-weft-source", "workload=evil"))
        )
        .await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        send(&p, "/s/503/10", "", None).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(
        seen.lock().expect("seen").is_empty(),
        "the app saw x-weft-source: {seen:?}"
    );

    let both = [
        "source_workload=\"web\"",
        "source_namespace=\"shop\"",
        "source_principal=\"spiffe://cluster.local/ns/shop/sa/web\"",
        "source_app=\"web\"",
        "source_version=\"unknown\"",
        "destination_workload=\"echo-v1\"",
        "destination_namespace=\"shop\"",
        "destination_service=\"echo.shop\"",
        "destination_principal=\"spiffe://cluster.local/ns/shop/sa/echo\"",
        "destination_app=\"echo\"",
        "destination_version=\"v1\"",
        "connection_security=\"mutual_tls\"",
        "protocol=\"http\"",
        "failed_step=\"\"",
    ];
    let client = metrics(&p.client);
    let server = metrics(&p.server);
    for (text, reporter) in [
        (&client, "reporter=\"source\""),
        (&server, "reporter=\"destination\""),
    ] {
        let ok: Vec<&str> = both
            .iter()
            .copied()
            .chain([reporter, "response_code=\"200\""])
            .collect();
        let failed: Vec<&str> = both
            .iter()
            .copied()
            .chain([reporter, "response_code=\"503\""])
            .collect();
        assert_eq!(
            value(text, "weft_requests_total", &ok),
            Some(3.0),
            "{reporter}\n{text}"
        );
        assert_eq!(
            value(text, "weft_requests_total", &failed),
            Some(2.0),
            "{reporter}\n{text}"
        );
        assert_eq!(
            value(text, "weft_request_duration_seconds_count", &ok),
            Some(3.0),
            "{text}"
        );
        assert_eq!(
            value(text, "weft_response_bytes_sum", &ok),
            Some(300.0),
            "{text}"
        );
        assert_eq!(
            value(text, "weft_response_bytes_sum", &failed),
            Some(20.0),
            "{text}"
        );
        assert_eq!(
            value(text, "weft_request_bytes_sum", &ok),
            Some(12.0),
            "{text}"
        );
        // Each response fell in some duration bucket: +Inf holds them all.
        assert_eq!(
            value(
                text,
                "weft_request_duration_seconds_bucket",
                &[&ok[..], &["le=\"+Inf\""]].concat()
            ),
            Some(3.0),
            "{text}"
        );
        assert!(!text.contains("workload=\"evil\""), "{text}");
    }
}

#[tokio::test]
async fn a_failed_step_and_a_plaintext_caller_are_labelled_as_such() {
    let p = pair(
        sized_app(Seen::default()).await,
        Protocol::Http1,
        MetricsNaming::Weft,
        MtlsMode::Permissive,
    )
    .await;
    // A plaintext client straight to the server's inbound listener, naming
    // a workload: not believed.
    let io = p
        .server
        .inbound_stamps
        .connect(
            p.server.proxy.inbound_addr,
            SocketAddr::new(IpAddr::V4(SERVER_POD_IP), p.app.port()),
        )
        .await
        .expect("connect");
    let mut c = h1(io).await;
    let resp = c
        .send_request(
            Request::get("/s/200/1")
                .header("host", "echo")
                .header("x-weft-source", "workload=spoofed;app=spoofed")
                .body(body(""))
                .expect("request"),
        )
        .await
        .expect("response");
    assert_eq!(read_text(resp).await.0, StatusCode::OK);
    let server = metrics(&p.server);
    assert_eq!(
        value(
            &server,
            "weft_requests_total",
            &[
                "reporter=\"destination\"",
                "source_workload=\"unknown\"",
                "source_app=\"unknown\"",
                "source_principal=\"unknown\"",
                "connection_security=\"plaintext\"",
                "destination_workload=\"echo-v1\"",
            ]
        ),
        Some(1.0),
        "{server}"
    );
    assert!(!server.contains("spoofed"), "{server}");

    // The app gone: the client proxy answers 503 itself, naming the step.
    let gone = SocketAddr::new(IpAddr::V4(SERVER_POD_IP), 1);
    p.client.dialer.route(
        SocketAddr::new(IpAddr::V4(SERVER_POD_IP), p.app.port()),
        gone,
        &p.server.inbound_stamps,
    );
    let status = send(&p, "/s/200/1", "", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let client = metrics(&p.client);
    assert_eq!(
        value(
            &client,
            "weft_requests_total",
            &[
                "reporter=\"source\"",
                "response_code=\"503\"",
                "failed_step=\"connect\""
            ]
        ),
        Some(1.0),
        "{client}"
    );
}

#[tokio::test]
async fn istio_naming_exports_istio_metrics_only() {
    let p = pair(
        sized_app(Seen::default()).await,
        Protocol::Http1,
        MetricsNaming::Istio,
        MtlsMode::Strict,
    )
    .await;
    for _ in 0..2 {
        assert_eq!(send(&p, "/s/201/5", "", None).await, StatusCode::CREATED);
    }
    let server = metrics(&p.server);
    let want = [
        "reporter=\"destination\"",
        "source_workload=\"web\"",
        "source_workload_namespace=\"shop\"",
        "source_canonical_service=\"web\"",
        "destination_workload=\"echo-v1\"",
        "destination_service=\"echo.shop.svc.cluster.local\"",
        "destination_service_name=\"echo\"",
        "destination_canonical_revision=\"v1\"",
        "response_code=\"201\"",
        "response_flags=\"-\"",
        "connection_security_policy=\"mutual_tls\"",
        "request_protocol=\"http\"",
    ];
    assert_eq!(
        value(&server, "istio_requests_total", &want),
        Some(2.0),
        "{server}"
    );
    assert_eq!(
        value(&server, "istio_request_duration_milliseconds_count", &want),
        Some(2.0),
        "{server}"
    );
    assert!(!server.contains("\nweft_requests_total{"), "{server}");
}

#[tokio::test]
async fn opaque_tcp_bytes_are_counted_each_way_on_both_reporters() {
    let p = pair(
        tcp_echo().await,
        Protocol::Opaque,
        MetricsNaming::Weft,
        MtlsMode::Strict,
    )
    .await;
    let mut s = p.client.app_connect(p.dst).await;
    let sent = vec![7u8; 10_000];
    s.write_all(&sent).await.expect("write");
    let mut back = vec![0u8; sent.len()];
    s.read_exact(&mut back).await.expect("echoed");
    drop(s);
    let closed = |pod: &Pod| {
        value(
            &metrics(pod),
            "weft_tcp_connections_closed_total",
            &["failed_step=\"\""],
        )
        .unwrap_or(0.0)
            >= 1.0
    };
    eventually("both proxies count the closed connection", || {
        closed(&p.client) && closed(&p.server)
    })
    .await;
    for (pod, reporter, source_workload) in [
        (&p.client, "reporter=\"source\"", "source_workload=\"web\""),
        // No request headers on an opaque stream: the principal only.
        (
            &p.server,
            "reporter=\"destination\"",
            "source_workload=\"unknown\"",
        ),
    ] {
        let text = metrics(pod);
        let l = [
            reporter,
            source_workload,
            "source_principal=\"spiffe://cluster.local/ns/shop/sa/web\"",
            "source_namespace=\"shop\"",
            "destination_workload=\"echo-v1\"",
            "destination_service=\"echo.shop\"",
            "protocol=\"tcp\"",
            "connection_security=\"mutual_tls\"",
        ];
        assert_eq!(
            value(&text, "weft_tcp_connections_opened_total", &l),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            value(&text, "weft_tcp_received_bytes_total", &l),
            Some(10_000.0),
            "{text}"
        );
        assert_eq!(
            value(&text, "weft_tcp_sent_bytes_total", &l),
            Some(10_000.0),
            "{text}"
        );
    }
}

/// Scrapes `/metrics` over the admin port: the status and the body.
async fn scrape(admin: SocketAddr) -> (StatusCode, String) {
    let io = tokio::net::TcpStream::connect(admin).await.expect("admin");
    let mut c = h1(io).await;
    let resp = c
        .send_request(
            Request::get("/metrics")
                .header("host", "admin")
                .body(body(""))
                .expect("request"),
        )
        .await
        .expect("response");
    let (status, _, text) = read_text(resp).await;
    (status, text)
}

/// The sum of every `weft_requests_total` series.
fn total_requests(text: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("weft_requests_total{"))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("not a sample line: {l}"))
        })
        .sum()
}

#[tokio::test]
async fn a_proxy_scraped_during_reloads_serves_whole_and_growing_counts() {
    let p = pair(
        sized_app(Seen::default()).await,
        Protocol::Http1,
        MetricsNaming::Weft,
        MtlsMode::Strict,
    )
    .await;
    let ca = &p._ca;
    let admin = p.client.proxy.admin_addr;
    let scraper = tokio::spawn(async move {
        let mut seen = Vec::new();
        for _ in 0..60 {
            let (status, text) = scrape(admin).await;
            assert_eq!(status, StatusCode::OK);
            assert!(text.ends_with("# EOF\n"), "a cut exposition: {text}");
            seen.push(total_requests(&text));
            tokio::task::yield_now().await;
        }
        seen
    });
    // Requests while the client's config changes generation (and naming)
    // under it.
    for generation in 2..=6 {
        for _ in 0..4 {
            assert_eq!(send(&p, "/s/200/1", "", None).await, StatusCode::OK);
        }
        let mut cfg = p
            .client
            .proxy
            .state
            .snapshot
            .load_full()
            .expect("snapshot")
            .config
            .clone();
        cfg.generation = generation;
        cfg.mesh.metrics_naming = if generation % 2 == 0 {
            MetricsNaming::Both
        } else {
            MetricsNaming::Weft
        };
        cfg.seal();
        publish(&p.client.mount, &files(&cfg, &ca.leaf(CLIENT_ID, 3600), ca));
        eventually("the new generation is active", || {
            p.client.generation() == generation
        })
        .await;
    }
    let seen = scraper.await.expect("scraper");
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "counts went down between scrapes: {seen:?}"
    );
    let (_, last) = scrape(admin).await;
    assert_eq!(total_requests(&last), 20.0, "{last}");
    // Generations 2 and 4 export both names: the requests made under them
    // are in Istio's too.
    assert!(last.contains("istio_requests_total{"), "{last}");
}
