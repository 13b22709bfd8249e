//! Tracing on a proxy pair with an in-process OTLP/HTTP receiver: one
//! client and one server span per request, linked; a caller's trace is
//! continued; the app gets the server span's context in W3C and B3; an
//! exporter that is down costs no request.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use prost::Message as _;
use support::*;
use weft_proxy::test_util::TestCa;
use weft_proxy_config::{MtlsMode, Protocol, Tracing};

type Spans = Arc<Mutex<Vec<(String, Span)>>>;

/// An OTLP/HTTP receiver: decodes each POSTed batch and keeps its spans
/// with their resource's `service.name`.
async fn receiver(spans: Spans) -> SocketAddr {
    spawn_app(move |req: Request<Incoming>| {
        let spans = spans.clone();
        async move {
            assert_eq!(req.uri().path(), "/v1/traces");
            assert_eq!(req.headers()["content-type"], "application/x-protobuf");
            let body = req.into_body().collect().await.expect("body").to_bytes();
            let batch = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf batch");
            for rs in batch.resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|a| a.key == "service.name")
                    .and_then(|a| a.value.as_ref())
                    .and_then(|v| match &v.value {
                        Some(any_value::Value::StringValue(s)) => Some(s.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    for s in ss.spans {
                        spans.lock().expect("spans").push((service.clone(), s));
                    }
                }
            }
            Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
        }
    })
    .await
}

struct Traced {
    client: Pod,
    _server: Pod,
    dst: SocketAddr,
    _ca: TestCa,
}

async fn pair(app: SocketAddr, collector: SocketAddr, percent: f64) -> Traced {
    init();
    let ca = TestCa::new("weft test CA");
    let svc = service(
        "echo",
        cluster_ip(1),
        80,
        app.port(),
        Protocol::Http1,
        vec![meshed(SERVER_POD_IP, SERVER_ID)],
    );
    let mut client_cfg = config(1, MtlsMode::Strict, vec![svc.clone()]);
    let mut server_cfg = config(1, MtlsMode::Strict, vec![svc]);
    for c in [&mut client_cfg, &mut server_cfg] {
        c.mesh.tracing = Some(Tracing {
            otlp_endpoint: format!("http://{collector}"),
            sampling_percent: percent,
        });
        c.seal();
    }
    let server = Pod::start_with(&server_cfg, &ca.leaf(SERVER_ID, 3600), &ca, |s| {
        s.workload = Some("echo".into());
        s.pod_ip = Some(IpAddr::V4(SERVER_POD_IP));
    })
    .await;
    let client = Pod::start_with(&client_cfg, &ca.leaf(CLIENT_ID, 3600), &ca, |s| {
        s.workload = Some("web".into());
    })
    .await;
    client.route_to(
        SocketAddr::new(IpAddr::V4(SERVER_POD_IP), app.port()),
        &server,
    );
    Traced {
        client,
        _server: server,
        dst: SocketAddr::new(cluster_ip(1), 80),
        _ca: ca,
    }
}

async fn get(p: &Traced, headers: &[(&str, &str)]) -> (StatusCode, String) {
    let mut c = h1(p.client.app_connect(p.dst).await).await;
    let mut req = Request::get("/orders").header("host", "echo");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (status, _, text) = read_text(
        c.send_request(req.body(body("")).expect("request"))
            .await
            .expect("response"),
    )
    .await;
    (status, text)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr<'a>(s: &'a Span, key: &str) -> Option<&'a any_value::Value> {
    s.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

/// The line `name: value` of the echo app's answer.
fn echoed<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
}

#[tokio::test]
async fn a_request_gives_a_client_and_a_server_span_of_one_trace() {
    let spans = Spans::default();
    let p = pair(echo_app().await, receiver(spans.clone()).await, 100.0).await;
    let (status, text) = get(&p, &[]).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    eventually("two spans exported", || {
        spans.lock().expect("spans").len() >= 2
    })
    .await;
    let got = spans.lock().expect("spans").clone();
    assert_eq!(got.len(), 2, "{got:#?}");
    let (client_svc, client) = got
        .iter()
        .find(|(_, s)| s.kind == SpanKind::Client as i32)
        .expect("a client span");
    let (server_svc, server) = got
        .iter()
        .find(|(_, s)| s.kind == SpanKind::Server as i32)
        .expect("a server span");
    assert_eq!(client_svc, "web.shop");
    assert_eq!(server_svc, "echo.shop");
    assert_eq!(client.trace_id, server.trace_id);
    assert!(
        client.parent_span_id.is_empty(),
        "a new trace: the client span is its root"
    );
    assert_eq!(
        server.parent_span_id, client.span_id,
        "the server span is the client span's child"
    );
    assert_eq!(client.name, "GET echo.shop");
    assert_eq!(
        attr(client, "http.response.status_code"),
        Some(&any_value::Value::IntValue(200))
    );
    assert_eq!(
        attr(server, "weft.source_principal"),
        Some(&any_value::Value::StringValue(CLIENT_ID.into()))
    );
    assert_eq!(
        attr(client, "weft.destination_principal"),
        Some(&any_value::Value::StringValue(SERVER_ID.into()))
    );
    // The app got the server span's context, the same in W3C and B3.
    let trace = hex(&server.trace_id);
    let span = hex(&server.span_id);
    assert_eq!(
        echoed(&text, "traceparent"),
        Some(&*format!("00-{trace}-{span}-01")),
        "{text}"
    );
    assert_eq!(echoed(&text, "x-b3-traceid"), Some(&*trace), "{text}");
    assert_eq!(echoed(&text, "x-b3-spanid"), Some(&*span), "{text}");
    assert_eq!(
        echoed(&text, "x-b3-parentspanid"),
        Some(&*hex(&client.span_id)),
        "{text}"
    );
    assert_eq!(
        echoed(&text, "b3"),
        Some(&*format!("{trace}-{span}-1-{}", hex(&client.span_id))),
        "{text}"
    );
}

#[tokio::test]
async fn a_callers_trace_and_its_decision_are_continued() {
    let spans = Spans::default();
    // 0 %: no new trace is sampled, only a caller's sampled one.
    let p = pair(echo_app().await, receiver(spans.clone()).await, 0.0).await;
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let (status, text) = get(&p, &[("b3", &format!("{caller_trace}-{caller_span}-1"))]).await;
    assert_eq!(status, StatusCode::OK);
    eventually("two spans exported", || {
        spans.lock().expect("spans").len() >= 2
    })
    .await;
    let got = spans.lock().expect("spans").clone();
    let client = &got
        .iter()
        .find(|(_, s)| s.kind == SpanKind::Client as i32)
        .expect("client span")
        .1;
    assert_eq!(hex(&client.trace_id), caller_trace);
    assert_eq!(hex(&client.parent_span_id), caller_span);
    assert!(
        echoed(&text, "traceparent").is_some_and(|t| t.contains(caller_trace)),
        "{text}"
    );
    // A caller's "not sampled" is kept: no spans, and the app is told so.
    let (_, text) = get(
        &p,
        &[(
            "traceparent",
            &format!("00-{caller_trace}-{caller_span}-00"),
        )],
    )
    .await;
    assert!(
        echoed(&text, "traceparent").is_some_and(|t| t.ends_with("-00")),
        "{text}"
    );
    assert_eq!(echoed(&text, "x-b3-sampled"), Some("0"), "{text}");
    // And without a caller's trace, 0 % samples nothing.
    let (_, text) = get(&p, &[]).await;
    assert!(
        echoed(&text, "traceparent").is_some_and(|t| t.ends_with("-00")),
        "{text}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(
        spans.lock().expect("spans").len(),
        2,
        "only the sampled request's spans"
    );
}

#[tokio::test]
async fn an_exporter_that_is_down_costs_no_request() {
    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let p = pair(echo_app().await, closed, 100.0).await;
    for _ in 0..20 {
        assert_eq!(get(&p, &[]).await.0, StatusCode::OK);
    }
    let failed = || p.client.proxy.state.metrics.span_export.failed.get();
    eventually("the failed exports are counted", || failed() >= 20).await;
    assert_eq!(p.client.proxy.state.metrics.span_export.exported.get(), 0);
}
