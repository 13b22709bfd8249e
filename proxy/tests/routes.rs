//! Component tests of routing: a client proxy on loopback applies the
//! `httpRoutes` / `tcpRoutes` of `proxy.json` — matches, subsets, weights,
//! redirects, header edits — and follows a reload that changes them.
//!
//! ```text
//! test client ──stamp 10.96.0.1:80──► client proxy :outbound ──► route ──► backend (subset) ──► endpoint
//!   plain endpoints: apps on 127.0.0.1x:P;  meshed: 10.244.0.x:P ──mTLS──► server proxy ──► app 127.0.0.1:P
//! ```

mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use weft_proxy::metrics::Direction;
use weft_proxy::test_util::TestCa;
use weft_proxy_config::{
    Backend, Endpoint, HttpMatch, HttpRoute, MtlsMode, NamedMatch, PathMatch, Protocol,
    ProxyConfig, Redirect, Rewrite, Service, TcpRoute, ValueMatch,
};

const PORT: u16 = 80;

fn dst() -> SocketAddr {
    SocketAddr::new(cluster_ip(1), PORT)
}

/// An HTTP app on `ip` answering `<name> <path>` plus the headers it got.
async fn named_app(ip: Ipv4Addr, name: &'static str) -> u16 {
    let l = TcpListener::bind((ip, 0)).await.expect("bind app");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    let mut text = format!("{name} {}\n", req.uri());
                    for (k, v) in req.headers() {
                        text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
                    }
                    let mut r = Response::new(Full::new(Bytes::from(text)));
                    r.headers_mut()
                        .insert("server", "named-app".parse().expect("value"));
                    Ok::<_, std::convert::Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    port
}

/// A TCP app on `ip` that greets with its name.
async fn named_tcp(ip: Ipv4Addr, name: &'static str) -> u16 {
    let l = TcpListener::bind((ip, 0)).await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(name.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    port
}

/// A plain endpoint at `ip` listening on `port` (port override of "p").
fn plain_at(ip: Ipv4Addr, port: u16, subset: &str) -> Endpoint {
    let mut e = plain(ip);
    e.subsets = vec![subset.into()];
    e.ports = BTreeMap::from([("p".to_owned(), port)]);
    e
}

fn to(subset: &str, weight: u32) -> Backend {
    Backend {
        service: "shop/cart".into(),
        subset: Some(subset.into()),
        port: None,
        weight,
    }
}

fn rule(name: &str, matches: Vec<HttpMatch>, backends: Vec<Backend>) -> HttpRoute {
    HttpRoute {
        name: format!("cart/{name}"),
        matches,
        backends,
        ..Default::default()
    }
}

/// Service `shop/cart` at 10.96.0.1:80 with subsets v1 and v2.
fn cart(endpoints: Vec<Endpoint>, protocol: Protocol, routes: Vec<HttpRoute>) -> Service {
    let mut s = service("cart", cluster_ip(1), PORT, 1, protocol, endpoints);
    s.subsets = vec!["v1".into(), "v2".into()];
    s.http_routes = routes;
    s
}

/// Two plain "pods" per version: v1 on 127.0.0.11/12, v2 on 127.0.0.21/22.
async fn plain_fleet() -> Vec<Endpoint> {
    let mut eps = Vec::new();
    for (ip, name, subset) in [
        (Ipv4Addr::new(127, 0, 0, 11), "v1-a", "v1"),
        (Ipv4Addr::new(127, 0, 0, 12), "v1-b", "v1"),
        (Ipv4Addr::new(127, 0, 0, 21), "v2-a", "v2"),
        (Ipv4Addr::new(127, 0, 0, 22), "v2-b", "v2"),
    ] {
        eps.push(plain_at(ip, named_app(ip, name).await, subset));
    }
    eps
}

struct Client {
    pod: Pod,
    ca: TestCa,
    leaf: weft_proxy::test_util::Leaf,
}

async fn client(cfg: &ProxyConfig) -> Client {
    init();
    let ca = TestCa::new("weft test CA");
    let leaf = ca.leaf(CLIENT_ID, 3600);
    let pod = Pod::start(cfg, &leaf, &ca).await;
    Client { pod, ca, leaf }
}

impl Client {
    async fn reload(&self, cfg: &ProxyConfig) {
        publish(&self.pod.mount, &files(cfg, &self.leaf, &self.ca));
        let want = cfg.generation;
        eventually("the new generation is active", || {
            self.pod.generation() == want
        })
        .await;
    }
}

/// Sends `n` GETs over one keep-alive connection; counts answers by the
/// name of the app that served them (`status <code>` for failures).
async fn count(
    pod: &Pod,
    n: usize,
    path: &str,
    headers: &[(&str, &str)],
) -> BTreeMap<String, usize> {
    let mut c = h1(pod.app_connect(dst()).await).await;
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let mut b = Request::get(path).header("host", "cart.shop");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = c
            .send_request(b.body(body("")).expect("request"))
            .await
            .expect("response");
        let (status, _, text) = read_text(resp).await;
        let who = if status == StatusCode::OK {
            text.split_whitespace().next().unwrap_or("?").to_owned()
        } else {
            format!("status {status}: {text}")
        };
        *seen.entry(who).or_default() += 1;
    }
    seen
}

fn versions(seen: &BTreeMap<String, usize>) -> BTreeMap<&str, usize> {
    let mut v = BTreeMap::new();
    for (who, n) in seen {
        *v.entry(who.split('-').next().unwrap_or("?")).or_default() += n;
    }
    v
}

#[tokio::test]
async fn header_match_sends_to_the_subset_over_mtls() {
    init();
    let ca = TestCa::new("weft test CA");
    let v1_app = named_app(Ipv4Addr::LOCALHOST, "v1").await;
    let v2_app = named_app(Ipv4Addr::LOCALHOST, "v2").await;
    let server_cfg = config(1, MtlsMode::Strict, vec![]);
    let server = Pod::start(&server_cfg, &ca.leaf(SERVER_ID, 3600), &ca).await;
    let (v1_ip, v2_ip) = (Ipv4Addr::new(10, 244, 0, 1), Ipv4Addr::new(10, 244, 0, 2));
    let ep = |ip, port: u16, subset: &str| {
        let mut e = meshed(ip, SERVER_ID);
        e.subsets = vec![subset.into()];
        e.ports = BTreeMap::from([("p".to_owned(), port)]);
        e
    };
    let routes = vec![
        rule(
            "hidden-release",
            vec![HttpMatch {
                headers: vec![NamedMatch {
                    name: "x-weft-release".into(),
                    value: ValueMatch::Exact("canary".into()),
                }],
                ..Default::default()
            }],
            vec![to("v2", 1)],
        ),
        rule("default", vec![], vec![to("v1", 1)]),
    ];
    let cfg = config(
        1,
        MtlsMode::Strict,
        vec![cart(
            vec![ep(v1_ip, v1_app, "v1"), ep(v2_ip, v2_app, "v2")],
            Protocol::Detect,
            routes,
        )],
    );
    let client = Pod::start(&cfg, &ca.leaf(CLIENT_ID, 3600), &ca).await;
    client.route_to(SocketAddr::new(IpAddr::V4(v1_ip), v1_app), &server);
    client.route_to(SocketAddr::new(IpAddr::V4(v2_ip), v2_app), &server);

    let plain = count(&client, 20, "/", &[]).await;
    assert_eq!(plain, BTreeMap::from([("v1".to_owned(), 20)]));
    let canary = count(&client, 20, "/", &[("x-weft-release", "canary")]).await;
    assert_eq!(canary, BTreeMap::from([("v2".to_owned(), 20)]));
    let other = count(&client, 10, "/", &[("x-weft-release", "stable")]).await;
    assert_eq!(other, BTreeMap::from([("v1".to_owned(), 10)]));
}

#[tokio::test]
async fn path_prefix_at_a_segment_boundary_picks_the_rule() {
    let routes = vec![
        rule(
            "api",
            vec![HttpMatch {
                path: Some(PathMatch::Prefix("/api".into())),
                ..Default::default()
            }],
            vec![to("v2", 1)],
        ),
        rule("default", vec![], vec![to("v1", 1)]),
    ];
    let cfg = config(
        1,
        MtlsMode::Strict,
        vec![cart(plain_fleet().await, Protocol::Http1, routes)],
    );
    let c = client(&cfg).await;
    for (path, want) in [
        ("/api", "v2"),
        ("/api/items?x=1", "v2"),
        ("/apix", "v1"),
        ("/", "v1"),
    ] {
        let seen = count(&c.pod, 8, path, &[]).await;
        assert_eq!(
            versions(&seen),
            BTreeMap::from([(want, 8)]),
            "{path}: {seen:?}"
        );
    }
}

#[tokio::test]
async fn weights_100_0_and_0_100_go_one_way_and_50_50_reaches_both() {
    let fleet = plain_fleet().await;
    let with = |g, w1, w2| {
        config(
            g,
            MtlsMode::Strict,
            vec![cart(
                fleet.clone(),
                Protocol::Detect,
                vec![rule("split", vec![], vec![to("v1", w1), to("v2", w2)])],
            )],
        )
    };
    let c = client(&with(1, 100, 0)).await;
    let seen = count(&c.pod, 60, "/", &[]).await;
    assert_eq!(versions(&seen), BTreeMap::from([("v1", 60)]), "{seen:?}");
    // Both endpoints of the subset take part.
    assert!(
        seen.contains_key("v1-a") && seen.contains_key("v1-b"),
        "{seen:?}"
    );

    c.reload(&with(2, 0, 100)).await;
    let seen = count(&c.pod, 60, "/", &[]).await;
    assert_eq!(versions(&seen), BTreeMap::from([("v2", 60)]), "{seen:?}");

    c.reload(&with(3, 50, 50)).await;
    let seen = count(&c.pod, 200, "/", &[]).await;
    let v = versions(&seen);
    // 200 fair coin flips: each side is seen (a miss has odds 2^-199).
    assert!(v.get("v1").is_some_and(|n| *n > 0), "{seen:?}");
    assert!(v.get("v2").is_some_and(|n| *n > 0), "{seen:?}");
    assert_eq!(v.values().sum::<usize>(), 200, "no failures: {seen:?}");
}

#[tokio::test]
async fn reload_changing_weights_switches_traffic_on_an_open_connection() {
    let fleet = plain_fleet().await;
    let with = |g, w1, w2| {
        config(
            g,
            MtlsMode::Strict,
            vec![cart(
                fleet.clone(),
                Protocol::Http1,
                vec![rule("split", vec![], vec![to("v1", w1), to("v2", w2)])],
            )],
        )
    };
    let c = client(&with(1, 1, 0)).await;
    // One keep-alive client connection across the reload: routing is per
    // request, so the open connection follows the new weights.
    let mut conn = h1(c.pod.app_connect(dst()).await).await;
    let mut send = async || {
        let resp = conn
            .send_request(
                Request::get("/")
                    .header("host", "cart")
                    .body(body(""))
                    .expect("request"),
            )
            .await
            .expect("response");
        let (status, _, text) = read_text(resp).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        text.split('-').next().unwrap_or("?").to_owned()
    };
    for _ in 0..10 {
        assert_eq!(send().await, "v1");
    }
    c.reload(&with(2, 0, 1)).await;
    for _ in 0..10 {
        assert_eq!(send().await, "v2");
    }
}

#[tokio::test]
async fn backend_on_another_service_and_an_empty_subset() {
    let fleet = plain_fleet().await;
    let other_ip = Ipv4Addr::new(127, 0, 0, 31);
    let other_port = named_app(other_ip, "other").await;
    let mut other = service(
        "other",
        cluster_ip(2),
        PORT,
        1,
        Protocol::Http1,
        vec![plain_at(other_ip, other_port, "v1")],
    );
    other.subsets = vec!["v1".into()];
    let routes = vec![
        rule(
            "elsewhere",
            vec![HttpMatch {
                path: Some(PathMatch::Exact("/other".into())),
                ..Default::default()
            }],
            vec![Backend {
                service: "shop/other".into(),
                subset: None,
                port: None,
                weight: 1,
            }],
        ),
        rule("default", vec![], vec![to("v2", 1)]),
    ];
    // v2 has no endpoints: 503 naming the subset, never another version.
    let v1_only: Vec<Endpoint> = fleet
        .iter()
        .filter(|e| e.subsets == ["v1"])
        .cloned()
        .collect();
    let cfg = config(
        1,
        MtlsMode::Strict,
        vec![cart(v1_only, Protocol::Http1, routes), other],
    );
    let c = client(&cfg).await;
    let seen = count(&c.pod, 5, "/other", &[]).await;
    assert_eq!(seen, BTreeMap::from([("other".to_owned(), 5)]));
    let seen = count(&c.pod, 3, "/", &[]).await;
    let (what, n) = seen.iter().next().expect("one answer kind");
    assert_eq!((seen.len(), *n), (1, 3), "{seen:?}");
    assert!(
        what.starts_with("status 503") && what.contains("subset \"v2\""),
        "{what}"
    );
    assert_eq!(c.pod.errors(Direction::Outbound, "no-endpoint"), 3);
}

#[tokio::test]
async fn redirect_rewrite_and_header_edits() {
    let fleet = plain_fleet().await;
    let mut retired = rule(
        "retired",
        vec![HttpMatch {
            path: Some(PathMatch::Prefix("/shop".into())),
            method: Some("GET".into()),
            ..Default::default()
        }],
        vec![],
    );
    retired.redirect = Some(Redirect {
        scheme: None,
        host: None,
        port: None,
        path: Some("/store".into()),
        path_prefix: None,
        status: 301,
    });
    let mut moved = rule(
        "moved",
        vec![HttpMatch {
            path: Some(PathMatch::Prefix("/old".into())),
            ..Default::default()
        }],
        vec![to("v1", 1)],
    );
    moved.rewrite = Some(Rewrite {
        path: None,
        path_prefix: Some("/new".into()),
        authority: Some("cart.internal".into()),
    });
    let mut default = rule("default", vec![], vec![to("v2", 1)]);
    default.request_headers.set = vec![("x-weft-route".into(), "default".into())];
    default.request_headers.remove = vec!["x-secret".into()];
    default.response_headers.remove = vec!["server".into()];
    default.response_headers.add = vec![("x-served-by-route".into(), "default".into())];
    let cfg = config(
        1,
        MtlsMode::Strict,
        vec![cart(fleet, Protocol::Http1, vec![retired, moved, default])],
    );
    let c = client(&cfg).await;
    let mut conn = h1(c.pod.app_connect(dst()).await).await;
    let mut get = async |path: &str| {
        let resp = conn
            .send_request(
                Request::get(path)
                    .header("host", "cart.shop:80")
                    .header("x-secret", "s3cret")
                    .body(body(""))
                    .expect("request"),
            )
            .await
            .expect("response");
        read_text(resp).await
    };
    let (status, headers, _) = get("/shop/cart?id=7").await;
    assert_eq!(status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(
        headers.get("location").and_then(|v| v.to_str().ok()),
        Some("http://cart.shop/store?id=7")
    );

    let (status, _, text) = get("/old/a?b=1").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(
        text.starts_with("v1-") && text.contains(" /new/a?b=1\n"),
        "{text}"
    );
    assert!(text.contains("host: cart.internal"), "{text}");

    let (status, headers, text) = get("/x").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(text.starts_with("v2-"), "{text}");
    assert!(text.contains("x-weft-route: default"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
    assert!(headers.get("server").is_none(), "{headers:?}");
    assert_eq!(
        headers.get("x-served-by-route").map(|v| v.as_bytes()),
        Some(&b"default"[..])
    );
}

/// Gateway API semantics: the weight of backends that do not resolve is
/// answered 500; a backend in another namespace the config does not list
/// (a granted reference out of this namespace's scope) is such a backend,
/// not an invalid config; a redirect can replace the matched prefix.
#[tokio::test]
async fn unresolved_and_foreign_backends_answer_500_for_their_share() {
    let fleet = plain_fleet().await;
    let mut split = rule(
        "split",
        vec![HttpMatch {
            path: Some(PathMatch::Prefix("/split".into())),
            ..Default::default()
        }],
        vec![to("v1", 1)],
    );
    split.unresolved_weight = 1;
    let mut foreign = rule(
        "foreign",
        vec![HttpMatch {
            path: Some(PathMatch::Prefix("/foreign".into())),
            ..Default::default()
        }],
        vec![Backend {
            service: "elsewhere/api".into(),
            subset: None,
            port: Some(8080),
            weight: 1,
        }],
    );
    foreign.response_headers.set = vec![("x-route".into(), "foreign".into())];
    let mut none = rule(
        "none",
        vec![HttpMatch {
            path: Some(PathMatch::Exact("/none".into())),
            ..Default::default()
        }],
        vec![],
    );
    none.unresolved_weight = 1;
    let mut moved = rule(
        "moved",
        vec![HttpMatch {
            path: Some(PathMatch::Prefix("/old".into())),
            ..Default::default()
        }],
        vec![],
    );
    moved.redirect = Some(Redirect {
        scheme: None,
        host: None,
        port: None,
        path: None,
        path_prefix: Some("/new".into()),
        status: 302,
    });
    let cfg = config(
        1,
        MtlsMode::Strict,
        vec![cart(
            fleet,
            Protocol::Http1,
            vec![split, foreign, none, moved],
        )],
    );
    cfg.validate().expect("a foreign backend is valid");
    let c = client(&cfg).await;

    let seen = count(&c.pod, 200, "/split/x", &[]).await;
    let failed: usize = seen
        .iter()
        .filter(|(k, _)| k.starts_with("status 500"))
        .map(|(_, n)| n)
        .sum();
    let served = versions(&seen).get("v1").copied().unwrap_or(0);
    assert_eq!(failed + served, 200, "{seen:?}");
    assert!(failed > 40 && served > 40, "about half each: {seen:?}");

    let seen = count(&c.pod, 5, "/none", &[]).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        seen.keys()
            .all(|k| k.starts_with("status 500") && k.contains("unresolved")),
        "{seen:?}"
    );

    let mut conn = h1(c.pod.app_connect(dst()).await).await;
    let resp = conn
        .send_request(
            Request::get("/foreign/a")
                .header("host", "cart.shop")
                .body(body(""))
                .expect("request"),
        )
        .await
        .expect("response");
    let (status, headers, _) = read_text(resp).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        headers.get("x-weft-error").and_then(|v| v.to_str().ok()),
        Some("unresolved-backend")
    );
    assert_eq!(
        headers.get("x-route").and_then(|v| v.to_str().ok()),
        Some("foreign"),
        "response header edits apply to the 500 too"
    );

    let resp = conn
        .send_request(
            Request::get("/old/a/b?q=1")
                .header("host", "cart.shop")
                .body(body(""))
                .expect("request"),
        )
        .await
        .expect("response");
    let (status, headers, _) = read_text(resp).await;
    assert_eq!(status, StatusCode::FOUND);
    assert_eq!(
        headers.get("location").and_then(|v| v.to_str().ok()),
        Some("http://cart.shop/new/a/b?q=1")
    );
    assert!(
        c.pod.errors(Direction::Outbound, "unresolved-backend") >= 7,
        "counted"
    );
}

#[tokio::test]
async fn tcp_route_weights_pick_the_backend_per_connection() {
    let v1_ip = Ipv4Addr::new(127, 0, 0, 41);
    let v2_ip = Ipv4Addr::new(127, 0, 0, 42);
    let eps = vec![
        plain_at(v1_ip, named_tcp(v1_ip, "v1").await, "v1"),
        plain_at(v2_ip, named_tcp(v2_ip, "v2").await, "v2"),
    ];
    let with = |g, w1, w2| {
        let mut s = cart(eps.clone(), Protocol::Opaque, vec![]);
        s.tcp_routes = vec![TcpRoute {
            name: "cart/tcp".into(),
            port: Some(PORT),
            backends: vec![to("v1", w1), to("v2", w2)],
        }];
        config(g, MtlsMode::Strict, vec![s])
    };
    let c = client(&with(1, 0, 1)).await;
    let greet = async || {
        let mut s = c.pod.app_connect(dst()).await;
        let mut name = String::new();
        s.read_to_string(&mut name).await.expect("read");
        name
    };
    for _ in 0..10 {
        assert_eq!(greet().await, "v2");
    }
    c.reload(&with(2, 1, 1)).await;
    let mut seen = BTreeMap::<String, usize>::new();
    for _ in 0..100 {
        *seen.entry(greet().await).or_default() += 1;
    }
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["v1", "v2"], "{seen:?}");
}

#[tokio::test]
async fn a_dead_endpoint_costs_one_attempt_then_is_ejected() {
    let mut fleet = plain_fleet().await;
    // v1-b's address refuses connections (nothing listens there).
    let dead = Ipv4Addr::new(127, 0, 0, 13);
    let dead_port = {
        let l = std::net::TcpListener::bind((dead, 0)).expect("bind");
        l.local_addr().expect("addr").port()
    };
    fleet[1] = plain_at(dead, dead_port, "v1");
    let cfg = config(
        1,
        MtlsMode::Strict,
        vec![cart(
            fleet,
            Protocol::Http1,
            vec![rule("v1", vec![], vec![to("v1", 1)])],
        )],
    );
    let c = client(&cfg).await;
    let seen = count(&c.pod, 40, "/", &[]).await;
    assert_eq!(seen, BTreeMap::from([("v1-a".to_owned(), 40)]), "{seen:?}");
    assert_eq!(
        c.pod.errors(Direction::Outbound, "connect"),
        1,
        "the refused endpoint is tried once, then ejected"
    );
}

#[tokio::test]
async fn a_peer_whose_app_is_gone_is_skipped_without_a_failed_request() {
    init();
    let ca = TestCa::new("weft test CA");
    let live_app = named_app(Ipv4Addr::LOCALHOST, "live").await;
    // The port of an app that has exited: its proxy still accepts.
    let gone_app = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let (client, _server) = client_of_two_meshed_endpoints(&ca, live_app, gone_app).await;
    let seen = count(&client, 30, "/", &[]).await;
    assert_eq!(seen, BTreeMap::from([("live".to_owned(), 30)]), "{seen:?}");
    assert_eq!(
        client.errors(Direction::Outbound, "peer-app-unavailable"),
        1,
        "one attempt reached the peer whose app is gone, then it was ejected"
    );
}

#[tokio::test]
async fn an_idempotent_request_whose_peer_app_fails_it_goes_to_another_endpoint() {
    init();
    let ca = TestCa::new("weft test CA");
    let live_app = named_app(Ipv4Addr::LOCALHOST, "live").await;
    // An app that is shutting down: it accepts, reads the request and
    // closes the connection without answering.
    let dying = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let dying_app = dying.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = dying.accept().await {
            let mut buf = [0u8; 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
        }
    });
    let (client, _server) = client_of_two_meshed_endpoints(&ca, live_app, dying_app).await;
    let seen = count(&client, 30, "/", &[]).await;
    assert_eq!(seen, BTreeMap::from([("live".to_owned(), 30)]), "{seen:?}");
    assert!(
        client.errors(Direction::Outbound, "peer-app-unavailable") >= 1,
        "the dying app was tried and skipped"
    );
}

#[tokio::test]
async fn an_endpoint_address_taken_by_another_identity_is_refused_skipped_and_ejected() {
    // The config still lists 10.244.0.2 as an `echo` pod, but the address
    // now belongs to a pod of service account `intruder` (reused before
    // the config caught up).
    init();
    let ca = TestCa::new("weft test CA");
    let live_app = named_app(Ipv4Addr::LOCALHOST, "live").await;
    let (intruder_app, intruder_conns, _release) = counting_app(Ipv4Addr::LOCALHOST).await;
    let intruder_id = "spiffe://cluster.local/ns/shop/sa/intruder";
    let intruder_cfg = config(1, MtlsMode::Strict, vec![]);
    let intruder = Pod::start(&intruder_cfg, &ca.leaf(intruder_id, 3600), &ca).await;
    let (client, _server) =
        client_of_two_endpoints(&ca, live_app, (intruder_app, Some(&intruder))).await;
    let seen = count(&client, 30, "/", &[]).await;
    assert_eq!(seen, BTreeMap::from([("live".to_owned(), 30)]), "{seen:?}");
    assert_eq!(
        intruder_conns
            .accepted
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing reached the app of the pod with the wrong identity"
    );
    assert_eq!(
        client.errors(Direction::Outbound, "identity-mismatch"),
        1,
        "the endpoint with the wrong identity is refused once, then ejected"
    );
}

/// A client pod whose `cart` Service has two meshed endpoints behind one
/// server proxy: app port `first` at 10.244.0.1 and `second` at 10.244.0.2.
async fn client_of_two_meshed_endpoints(ca: &TestCa, first: u16, second: u16) -> (Pod, Pod) {
    client_of_two_endpoints(ca, first, (second, None)).await
}

/// As [`client_of_two_meshed_endpoints`], with the second endpoint's
/// connections going to `second_server` when given (both are listed as the
/// server's identity in the client's config).
async fn client_of_two_endpoints(
    ca: &TestCa,
    first: u16,
    (second, second_server): (u16, Option<&Pod>),
) -> (Pod, Pod) {
    let server_cfg = config(1, MtlsMode::Strict, vec![]);
    let server = Pod::start(&server_cfg, &ca.leaf(SERVER_ID, 3600), ca).await;
    let (first_ip, second_ip) = (Ipv4Addr::new(10, 244, 0, 1), Ipv4Addr::new(10, 244, 0, 2));
    let ep = |ip, port: u16| {
        let mut e = meshed(ip, SERVER_ID);
        e.subsets = vec!["v1".into()];
        e.ports = BTreeMap::from([("p".to_owned(), port)]);
        e
    };
    let cfg = config(
        1,
        MtlsMode::Strict,
        vec![cart(
            vec![ep(first_ip, first), ep(second_ip, second)],
            Protocol::Http1,
            vec![],
        )],
    );
    let client = Pod::start(&cfg, &ca.leaf(CLIENT_ID, 3600), ca).await;
    client.route_to(SocketAddr::new(IpAddr::V4(first_ip), first), &server);
    client.route_to(
        SocketAddr::new(IpAddr::V4(second_ip), second),
        second_server.unwrap_or(&server),
    );
    (client, server)
}

// ---------------------------------------------------------------------------
// Route policies: retries, timeouts, fault injection, mirroring.

/// What a [`scripted`] app saw: the Host and body of every request.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, Bytes)>>>;

/// An HTTP app on `ip` answering request `i` with `script[i]` (the last
/// status repeats); the first `slow` requests hang for a minute first.
async fn scripted(ip: Ipv4Addr, script: Vec<u16>, slow: usize) -> (u16, Seen) {
    use http_body_util::BodyExt as _;
    let l = TcpListener::bind((ip, 0)).await.expect("bind app");
    let port = l.local_addr().expect("addr").port();
    let seen: Seen = Seen::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (log, script) = (log.clone(), script.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (log, script) = (log.clone(), script.clone());
                    async move {
                        let host = req
                            .headers()
                            .get("host")
                            .and_then(|h| h.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        let bytes = req
                            .into_body()
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let i = {
                            let mut l = log.lock().expect("log");
                            l.push((host, bytes.clone()));
                            l.len() - 1
                        };
                        if i < slow {
                            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                        }
                        let code = script.get(i).or(script.last()).copied().unwrap_or(200);
                        let mut r = Response::new(Full::new(Bytes::from(format!(
                            "attempt {i}: {bytes:?}"
                        ))));
                        *r.status_mut() = StatusCode::from_u16(code).expect("status");
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (port, seen)
}

/// A client proxy whose `shop/cart` v1 subset is one scripted app and v2
/// another, with `route` (to v1) as its only rule.
async fn policy_client(v1: (Ipv4Addr, u16), v2: (Ipv4Addr, u16), route: HttpRoute) -> Client {
    let eps = vec![plain_at(v1.0, v1.1, "v1"), plain_at(v2.0, v2.1, "v2")];
    client(&config(
        1,
        MtlsMode::Strict,
        vec![cart(eps, Protocol::Http1, vec![route])],
    ))
    .await
}

async fn post(pod: &Pod, payload: &'static str) -> (StatusCode, http::HeaderMap, String) {
    let mut c = h1(pod.app_connect(dst()).await).await;
    let req = Request::post("/order")
        .header("host", "cart.shop")
        .body(body(payload))
        .expect("request");
    read_text(c.send_request(req).await.expect("response")).await
}

fn events(pod: &Pod, route: &str, event: &'static str) -> u64 {
    pod.proxy
        .state
        .metrics
        .route_events
        .get_or_create(&weft_proxy::metrics::RouteEventLabels {
            route: route.to_owned(),
            event,
        })
        .get()
}

fn retry(attempts: u32, on: Vec<weft_proxy_config::RetryOn>) -> weft_proxy_config::RetryPolicy {
    weft_proxy_config::RetryPolicy {
        attempts,
        per_try_timeout_ms: None,
        retry_on: on,
        retriable_status_codes: vec![],
        backoff_base_ms: 1,
        backoff_max_ms: 5,
    }
}

#[tokio::test]
async fn retries_follow_the_route_policy_and_resend_the_body() {
    use weft_proxy_config::RetryOn;
    let ip = Ipv4Addr::new(127, 0, 0, 31);
    let other = Ipv4Addr::new(127, 0, 0, 32);
    let (spare, _) = scripted(other, vec![200], 0).await;

    // 503, 503, then 200: two retries on 5xx get the 200, with the body
    // sent each time.
    let (port, seen) = scripted(ip, vec![503, 503, 200], 0).await;
    let mut r = rule("retry", vec![], vec![to("v1", 1)]);
    r.retry = Some(retry(2, vec![RetryOn::ServerError]));
    let c = policy_client((ip, port), (other, spare), r).await;
    let (status, _, text) = post(&c.pod, "one order").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let bodies: Vec<Bytes> = seen
        .lock()
        .expect("seen")
        .iter()
        .map(|s| s.1.clone())
        .collect();
    assert_eq!(bodies, vec![Bytes::from("one order"); 3]);
    assert_eq!(events(&c.pod, "cart/retry", "retry"), 2);
    // The call is counted once, under the rule that answered it.
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &c.pod.proxy.state.metrics.registry())
        .expect("encode");
    let calls: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("weft_requests_total{") && l.contains("reporter=\"source\""))
        .collect();
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert!(
        calls[0].contains("route=\"cart/retry\"") && calls[0].ends_with(" 1"),
        "{calls:#?}"
    );

    // The same app without a retry policy: the first 503 is the answer.
    let (port, seen) = scripted(ip, vec![503, 200], 0).await;
    let c = policy_client(
        (ip, port),
        (other, spare),
        rule("plain", vec![], vec![to("v1", 1)]),
    )
    .await;
    let (status, _, _) = post(&c.pod, "x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(seen.lock().expect("seen").len(), 1);

    // A status outside the conditions is not retried: 500 is no gateway error.
    let (port, seen) = scripted(ip, vec![500, 200], 0).await;
    let mut r = rule("gw", vec![], vec![to("v1", 1)]);
    r.retry = Some(retry(3, vec![RetryOn::GatewayError]));
    let c = policy_client((ip, port), (other, spare), r).await;
    let (status, _, _) = post(&c.pod, "x").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(seen.lock().expect("seen").len(), 1);

    // Listed status codes, and the attempt limit: 1 retry, then the answer.
    let (port, seen) = scripted(ip, vec![429, 429, 200], 0).await;
    let mut r = rule("codes", vec![], vec![to("v1", 1)]);
    let mut p = retry(1, vec![RetryOn::RetriableStatusCodes]);
    p.retriable_status_codes = vec![429];
    r.retry = Some(p);
    let c = policy_client((ip, port), (other, spare), r).await;
    let (status, _, _) = post(&c.pod, "x").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(seen.lock().expect("seen").len(), 2);
}

#[tokio::test]
async fn route_and_per_try_timeouts_answer_504_or_retry() {
    use weft_proxy_config::RetryOn;
    let ip = Ipv4Addr::new(127, 0, 0, 33);
    let other = Ipv4Addr::new(127, 0, 0, 34);
    let (spare, _) = scripted(other, vec![200], 0).await;

    // Every request hangs: the route timeout answers 504.
    let (port, _) = scripted(ip, vec![200], usize::MAX).await;
    let mut r = rule("slow", vec![], vec![to("v1", 1)]);
    r.timeout_ms = Some(300);
    let c = policy_client((ip, port), (other, spare), r).await;
    let (status, headers, text) = post(&c.pod, "x").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{text}");
    assert_eq!(headers["x-weft-error"], "timeout");
    assert_eq!(events(&c.pod, "cart/slow", "timeout"), 1);

    // Only the first request hangs: the per-try timeout gives up on it and
    // the retry is answered, inside the overall timeout.
    let (port, seen) = scripted(ip, vec![200], 1).await;
    let mut r = rule("per-try", vec![], vec![to("v1", 1)]);
    let mut p = retry(2, vec![RetryOn::GatewayError]);
    p.per_try_timeout_ms = Some(300);
    r.retry = Some(p);
    r.timeout_ms = Some(20_000);
    let c = policy_client((ip, port), (other, spare), r).await;
    let (status, _, text) = post(&c.pod, "x").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(text.starts_with("attempt 1"), "{text}");
    assert_eq!(seen.lock().expect("seen").len(), 2);
    assert_eq!(events(&c.pod, "cart/per-try", "per-try-timeout"), 1);
}

#[tokio::test]
async fn faults_abort_without_reaching_the_app_and_delay_requests() {
    use weft_proxy_config::{Fault, FaultAbort, FaultDelay};
    let ip = Ipv4Addr::new(127, 0, 0, 35);
    let other = Ipv4Addr::new(127, 0, 0, 36);
    let (spare, _) = scripted(other, vec![200], 0).await;
    let (port, seen) = scripted(ip, vec![200], 0).await;

    let mut r = rule("abort", vec![], vec![to("v1", 1)]);
    r.fault = Some(Fault {
        delay: None,
        abort: Some(FaultAbort {
            status: 418,
            percent: 100.0,
        }),
    });
    let c = policy_client((ip, port), (other, spare), r.clone()).await;
    for _ in 0..3 {
        let (status, headers, _) = post(&c.pod, "x").await;
        assert_eq!(status, StatusCode::IM_A_TEAPOT);
        assert_eq!(headers["x-weft-error"], "fault");
    }
    assert!(
        seen.lock().expect("seen").is_empty(),
        "an aborted request reached the app"
    );
    assert_eq!(events(&c.pod, "cart/abort", "fault-abort"), 3);

    // At 0 % nothing is injected.
    r.fault = Some(Fault {
        delay: Some(FaultDelay {
            delay_ms: 60_000,
            percent: 0.0,
        }),
        abort: Some(FaultAbort {
            status: 418,
            percent: 0.0,
        }),
    });
    c.reload(&config(
        2,
        MtlsMode::Strict,
        vec![cart(
            vec![plain_at(ip, port, "v1"), plain_at(other, spare, "v2")],
            Protocol::Http1,
            vec![r.clone()],
        )],
    ))
    .await;
    let (status, _, _) = post(&c.pod, "x").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(seen.lock().expect("seen").len(), 1);

    // A one-minute delay on every request: no answer yet after a second,
    // and the app has not seen the request.
    r.fault = Some(Fault {
        delay: Some(FaultDelay {
            delay_ms: 60_000,
            percent: 100.0,
        }),
        abort: None,
    });
    c.reload(&config(
        3,
        MtlsMode::Strict,
        vec![cart(
            vec![plain_at(ip, port, "v1"), plain_at(other, spare, "v2")],
            Protocol::Http1,
            vec![r],
        )],
    ))
    .await;
    let delayed = tokio::time::timeout(std::time::Duration::from_secs(1), post(&c.pod, "x")).await;
    assert!(
        delayed.is_err(),
        "the delayed request was answered: {delayed:?}"
    );
    assert_eq!(seen.lock().expect("seen").len(), 1);
    assert_eq!(events(&c.pod, "cart/abort", "fault-delay"), 1);
}

#[tokio::test]
async fn mirrored_requests_reach_the_mirror_with_a_shadow_host() {
    let primary_ip = Ipv4Addr::new(127, 0, 0, 37);
    let mirror_ip = Ipv4Addr::new(127, 0, 0, 38);
    let (primary, primary_seen) = scripted(primary_ip, vec![200], 0).await;
    // The mirror fails: its answers never reach the client.
    let (mirror, mirror_seen) = scripted(mirror_ip, vec![500], 0).await;
    let mut r = rule("mirror", vec![], vec![to("v1", 1)]);
    r.mirror = Some(weft_proxy_config::Mirror {
        backend: to("v2", 0),
        percent: 100.0,
    });
    let c = policy_client((primary_ip, primary), (mirror_ip, mirror), r).await;
    for i in 0..5 {
        let (status, _, text) = post(&c.pod, "copy me").await;
        assert_eq!(status, StatusCode::OK, "request {i}: {text}");
    }
    assert_eq!(primary_seen.lock().expect("seen").len(), 5);
    eventually("the mirror saw every request", || {
        mirror_seen.lock().expect("seen").len() == 5
    })
    .await;
    for (host, body) in mirror_seen.lock().expect("seen").iter() {
        assert_eq!(host, "cart.shop-shadow");
        assert_eq!(body, &Bytes::from("copy me"));
    }
    assert_eq!(events(&c.pod, "cart/mirror", "mirror"), 5);
}

// ---------------------------------------------------------------------------
// Client policies: outlier detection and the circuit breaker.

fn outlier_detection(
    consecutive_5xx: u32,
    max_percent: u32,
) -> weft_proxy_config::OutlierDetection {
    weft_proxy_config::OutlierDetection {
        consecutive_5xx: Some(consecutive_5xx),
        consecutive_gateway_errors: None,
        interval_ms: 1_000,
        base_ejection_ms: 60_000,
        max_ejection_percent: max_percent,
    }
}

/// A client proxy whose `shop/cart` has one v1 endpoint per app, balanced
/// round robin, with `policy` edits.
async fn round_robin_client(
    apps: &[(Ipv4Addr, u16)],
    edit: impl FnOnce(&mut weft_proxy_config::ClientPolicy),
) -> Client {
    let eps = apps
        .iter()
        .map(|(ip, port)| plain_at(*ip, *port, "v1"))
        .collect();
    let mut svc = cart(eps, Protocol::Http1, vec![]);
    svc.policy.load_balancer = weft_proxy_config::LoadBalancer::RoundRobin;
    edit(&mut svc.policy);
    client(&config(1, MtlsMode::Strict, vec![svc])).await
}

/// `shop/cart` over the two scripted apps (round robin), with `policy`
/// edits; `n` GETs one after another; the statuses seen.
async fn round_robin(
    apps: [(Ipv4Addr, u16); 2],
    edit: impl FnOnce(&mut weft_proxy_config::ClientPolicy),
    n: usize,
) -> (Client, BTreeMap<u16, usize>) {
    let c = round_robin_client(&apps, edit).await;
    let mut statuses = BTreeMap::new();
    for _ in 0..n {
        let (status, _, _) = post(&c.pod, "x").await;
        *statuses.entry(status.as_u16()).or_default() += 1;
    }
    (c, statuses)
}

#[tokio::test]
async fn outlier_detection_ejects_an_endpoint_after_consecutive_5xx() {
    let (bad_ip, good_ip) = (Ipv4Addr::new(127, 0, 0, 41), Ipv4Addr::new(127, 0, 0, 42));
    let (bad, bad_seen) = scripted(bad_ip, vec![500], 0).await;
    let (good, _) = scripted(good_ip, vec![200], 0).await;

    // Without it, round robin keeps sending every other request to the
    // failing endpoint.
    let (_, plain) = round_robin([(bad_ip, bad), (good_ip, good)], |_| {}, 20).await;
    assert_eq!(plain, BTreeMap::from([(200, 10), (500, 10)]));

    // With it, two 500s in a row eject it: nothing more goes there.
    bad_seen.lock().expect("seen").clear();
    let (c, with) = round_robin(
        [(bad_ip, bad), (good_ip, good)],
        |p| p.outlier_detection = Some(outlier_detection(2, 50)),
        20,
    )
    .await;
    assert_eq!(with, BTreeMap::from([(200, 18), (500, 2)]));
    assert_eq!(bad_seen.lock().expect("seen").len(), 2);
    assert_eq!(c.pod.errors(Direction::Outbound, "outlier-ejection"), 1);
}

#[tokio::test]
async fn a_refused_connection_counts_toward_the_outlier_streak() {
    let (dead_ip, good_ip) = (Ipv4Addr::new(127, 0, 0, 47), Ipv4Addr::new(127, 0, 0, 48));
    // A port nothing listens on: every connection is refused.
    let dead = {
        let l = std::net::TcpListener::bind((dead_ip, 0)).expect("bind");
        l.local_addr().expect("addr").port()
    };
    let (good, _) = scripted(good_ip, vec![200], 0).await;
    let (c, statuses) = round_robin(
        [(dead_ip, dead), (good_ip, good)],
        |p| p.outlier_detection = Some(outlier_detection(1, 50)),
        10,
    )
    .await;
    // The request that met the refusal went on to the good endpoint.
    assert_eq!(statuses, BTreeMap::from([(200, 10)]));
    assert_eq!(c.pod.errors(Direction::Outbound, "connect"), 1);
    // Its streak (one gateway error) reached the policy's threshold: the
    // ejection is outlier detection's (base time × ejections), not only
    // the fixed one for a failed connect.
    assert_eq!(c.pod.errors(Direction::Outbound, "outlier-ejection"), 1);
}

#[tokio::test]
async fn outlier_detection_never_ejects_more_than_its_share() {
    let (a_ip, b_ip) = (Ipv4Addr::new(127, 0, 0, 43), Ipv4Addr::new(127, 0, 0, 44));
    let (a, _) = scripted(a_ip, vec![503], 0).await;
    let (b, _) = scripted(b_ip, vec![503], 0).await;
    // Both fail; at most 50 % of two endpoints may be out: one.
    let (c, statuses) = round_robin(
        [(a_ip, a), (b_ip, b)],
        |p| p.outlier_detection = Some(outlier_detection(1, 50)),
        10,
    )
    .await;
    assert_eq!(statuses, BTreeMap::from([(503, 10)]));
    assert_eq!(c.pod.errors(Direction::Outbound, "outlier-ejection"), 1);
}

#[tokio::test]
async fn the_circuit_breaker_refuses_requests_over_max_requests() {
    let (a_ip, b_ip) = (Ipv4Addr::new(127, 0, 0, 45), Ipv4Addr::new(127, 0, 0, 46));
    // Each app's first request hangs; later ones are answered.
    let (a, a_seen) = scripted(a_ip, vec![200], 1).await;
    let (b, b_seen) = scripted(b_ip, vec![200], 1).await;
    let eps = vec![plain_at(a_ip, a, "v1"), plain_at(b_ip, b, "v1")];
    let mut svc = cart(eps, Protocol::Http1, vec![]);
    svc.policy.load_balancer = weft_proxy_config::LoadBalancer::RoundRobin;
    svc.policy.connection_pool = Some(weft_proxy_config::ConnectionPool {
        max_connections: None,
        max_pending_requests: None,
        max_requests: Some(2),
        max_requests_per_connection: None,
        connect_timeout_ms: 1_000,
        idle_timeout_ms: 60_000,
    });
    let c = client(&config(1, MtlsMode::Strict, vec![svc])).await;
    let mut hanging = Vec::new();
    for _ in 0..2 {
        let conn = c.pod.app_connect(dst()).await;
        hanging.push(tokio::spawn(async move {
            let mut s = h1(conn).await;
            let req = Request::post("/order")
                .header("host", "cart.shop")
                .body(body("x"))
                .expect("request");
            let _ = s.send_request(req).await;
        }));
    }
    eventually("both apps hold a request", || {
        a_seen.lock().expect("seen").len() == 1 && b_seen.lock().expect("seen").len() == 1
    })
    .await;

    // Two in flight: the third is refused without being sent.
    let (status, headers, text) = post(&c.pod, "x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert_eq!(headers["x-weft-error"], "overflow");
    assert_eq!(c.pod.errors(Direction::Outbound, "overflow"), 1);
    assert_eq!(
        a_seen.lock().expect("seen").len() + b_seen.lock().expect("seen").len(),
        2
    );

    // The callers give up: their slots are freed and requests flow again.
    for h in hanging {
        h.abort();
    }
    let mut answered = false;
    for _ in 0..200 {
        let (status, _, _) = post(&c.pod, "x").await;
        if status == StatusCode::OK {
            answered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(answered, "slots were not given back when the callers left");
}

#[tokio::test]
async fn the_retry_budget_caps_retries_per_service() {
    use weft_proxy_config::RetryOn;
    let (ip, other) = (Ipv4Addr::new(127, 0, 0, 47), Ipv4Addr::new(127, 0, 0, 48));
    let (spare, _) = scripted(other, vec![200], 0).await;
    let (port, seen) = scripted(ip, vec![503], 0).await;
    let mut r = rule("budget", vec![], vec![to("v1", 1)]);
    r.retry = Some(retry(3, vec![RetryOn::ServerError]));
    let eps = vec![plain_at(ip, port, "v1"), plain_at(other, spare, "v2")];
    let mut svc = cart(eps, Protocol::Http1, vec![r]);
    // No share of requests, a floor of 1 retry/s over 5 s: 5 retries.
    svc.policy.retry_budget = Some(weft_proxy_config::RetryBudget {
        retry_percent: 0.0,
        min_retries_per_second: 1,
        ttl_ms: 5_000,
    });
    let c = client(&config(1, MtlsMode::Strict, vec![svc])).await;
    for _ in 0..4 {
        let (status, _, _) = post(&c.pod, "x").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
    // 4 requests and 5 retries reached the app; without the budget, 16.
    assert_eq!(seen.lock().expect("seen").len(), 9);
    assert_eq!(events(&c.pod, "cart/budget", "retry"), 5);
    assert_eq!(events(&c.pod, "cart/budget", "retry-budget-exhausted"), 3);
}

#[tokio::test]
async fn a_service_connect_timeout_replaces_the_proxy_default() {
    init();
    // A meshed endpoint whose "proxy" accepts and never speaks TLS.
    let silent = TcpListener::bind((Ipv4Addr::new(127, 0, 0, 49), 0))
        .await
        .expect("bind");
    let port = silent.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let mut ep = meshed(Ipv4Addr::new(127, 0, 0, 49), SERVER_ID);
    ep.subsets = vec!["v1".into()];
    ep.ports = BTreeMap::from([("p".to_owned(), port)]);
    let mut svc = cart(vec![ep], Protocol::Http1, vec![]);
    svc.policy.connection_pool = Some(weft_proxy_config::ConnectionPool {
        max_connections: None,
        max_pending_requests: None,
        max_requests: None,
        max_requests_per_connection: None,
        connect_timeout_ms: 200,
        idle_timeout_ms: 60_000,
    });
    let ca = TestCa::new("weft test CA");
    // The proxy's own connect timeout is a minute here.
    let pod = Pod::start_with(
        &config(1, MtlsMode::Strict, vec![svc]),
        &ca.leaf(CLIENT_ID, 3600),
        &ca,
        |s| s.connect_timeout = std::time::Duration::from_secs(60),
    )
    .await;
    let (status, headers, text) =
        tokio::time::timeout(std::time::Duration::from_secs(20), post(&pod, "x"))
            .await
            .expect("answered well before the proxy's one-minute default");
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{text}");
    assert_eq!(headers["x-weft-error"], "connect-timeout");
}

// ---------------------------------------------------------------------------
// Connection pool limits: maxConnections, maxPendingRequests,
// maxRequestsPerConnection, idleTimeout.

/// Connections an app has seen.
#[derive(Default)]
struct ConnStats {
    accepted: std::sync::atomic::AtomicUsize,
    open: std::sync::atomic::AtomicUsize,
    most_open: std::sync::atomic::AtomicUsize,
    closed: std::sync::atomic::AtomicUsize,
    requests: std::sync::atomic::AtomicUsize,
}

impl ConnStats {
    fn get(n: &std::sync::atomic::AtomicUsize) -> usize {
        n.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// An HTTP/1 app on `ip` that counts connections; `/hold` requests wait
/// until `release` turns true.
async fn counting_app(
    ip: Ipv4Addr,
) -> (
    u16,
    std::sync::Arc<ConnStats>,
    tokio::sync::watch::Sender<bool>,
) {
    counting_app_of(ip, false).await
}

/// [`counting_app`] speaking HTTP/2 (prior knowledge) when `h2`.
async fn counting_app_of(
    ip: Ipv4Addr,
    h2: bool,
) -> (
    u16,
    std::sync::Arc<ConnStats>,
    tokio::sync::watch::Sender<bool>,
) {
    use std::sync::atomic::Ordering::SeqCst;
    let l = TcpListener::bind((ip, 0)).await.expect("bind app");
    let port = l.local_addr().expect("addr").port();
    let stats = std::sync::Arc::new(ConnStats::default());
    let (release, released) = tokio::sync::watch::channel(false);
    let st = stats.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            st.accepted.fetch_add(1, SeqCst);
            let now = st.open.fetch_add(1, SeqCst) + 1;
            st.most_open.fetch_max(now, SeqCst);
            let (st, released) = (st.clone(), released.clone());
            tokio::spawn(async move {
                let st2 = st.clone();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (st, mut released) = (st2.clone(), released.clone());
                    async move {
                        st.requests.fetch_add(1, SeqCst);
                        if req.uri().path() == "/hold" {
                            let _ = released.wait_for(|r| *r).await;
                        }
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            "ok",
                        ))))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(s);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(io, svc)
                    .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
                st.open.fetch_sub(1, SeqCst);
                st.closed.fetch_add(1, SeqCst);
            });
        }
    });
    (port, stats, release)
}

fn pool_limits(
    max_connections: Option<u32>,
    max_pending_requests: Option<u32>,
    max_requests_per_connection: Option<u32>,
    idle_timeout_ms: u64,
) -> weft_proxy_config::ConnectionPool {
    weft_proxy_config::ConnectionPool {
        max_connections,
        max_pending_requests,
        max_requests: None,
        max_requests_per_connection,
        connect_timeout_ms: 1_000,
        idle_timeout_ms,
    }
}

/// A client proxy whose `shop/cart` has one endpoint per app and `limits`.
async fn limited_client(
    apps: &[(Ipv4Addr, u16)],
    limits: weft_proxy_config::ConnectionPool,
) -> Client {
    round_robin_client(apps, |p| p.connection_pool = Some(limits)).await
}

/// Two [`counting_app`]s behind `shop/cart`, round robin, with room for one
/// connection; each app's stats and release switch.
async fn two_apps_one_connection(
    a_ip: Ipv4Addr,
    b_ip: Ipv4Addr,
) -> (
    Client,
    [(std::sync::Arc<ConnStats>, tokio::sync::watch::Sender<bool>); 2],
) {
    let (a, a_stats, a_release) = counting_app(a_ip).await;
    let (b, b_stats, b_release) = counting_app(b_ip).await;
    let c = limited_client(
        &[(a_ip, a), (b_ip, b)],
        pool_limits(Some(1), None, None, 60_000),
    )
    .await;
    (c, [(a_stats, a_release), (b_stats, b_release)])
}

/// A GET of `path` on a connection of its own, answered in the background.
async fn get_in_background(
    pod: &Pod,
    path: &'static str,
) -> tokio::task::JoinHandle<(StatusCode, http::HeaderMap, String)> {
    let conn = pod.app_connect(dst()).await;
    tokio::spawn(async move {
        let mut c = h1(conn).await;
        let req = Request::get(path)
            .header("host", "cart.shop")
            .body(body(""))
            .expect("request");
        read_text(c.send_request(req).await.expect("response")).await
    })
}

#[tokio::test]
async fn max_connections_queues_requests_on_the_connections_it_allows() {
    let ip = Ipv4Addr::new(127, 0, 0, 51);
    let (port, stats, release) = counting_app(ip).await;
    let c = limited_client(&[(ip, port)], pool_limits(Some(1), None, None, 60_000)).await;
    let mut calls = Vec::new();
    for _ in 0..3 {
        calls.push(get_in_background(&c.pod, "/hold").await);
    }
    eventually("the app holds the first request", || {
        ConnStats::get(&stats.requests) == 1
    })
    .await;
    // The other two wait in the proxy for the one connection allowed.
    let conns = c.pod.proxy.state.conn_limits.of("shop/cart");
    eventually("two requests wait", || conns.pending() == 2).await;
    assert_eq!(ConnStats::get(&stats.requests), 1);
    assert_eq!(ConnStats::get(&stats.accepted), 1);
    release.send_replace(true);
    for call in calls {
        let (status, _, text) = call.await.expect("call");
        assert_eq!(status, StatusCode::OK, "{text}");
    }
    assert_eq!(ConnStats::get(&stats.requests), 3);
    assert_eq!(
        ConnStats::get(&stats.accepted),
        1,
        "one connection carried all three"
    );
    assert_eq!(c.pod.errors(Direction::Outbound, "overflow"), 0);
}

#[tokio::test]
async fn requests_over_max_pending_requests_are_refused_unsent() {
    let ip = Ipv4Addr::new(127, 0, 0, 52);
    let (port, stats, release) = counting_app(ip).await;
    let c = limited_client(&[(ip, port)], pool_limits(Some(1), Some(1), None, 60_000)).await;
    let held = get_in_background(&c.pod, "/hold").await;
    eventually("the app holds a request", || {
        ConnStats::get(&stats.requests) == 1
    })
    .await;
    let waiting = get_in_background(&c.pod, "/").await;
    let conns = c.pod.proxy.state.conn_limits.of("shop/cart");
    eventually("the second request waits for the connection", || {
        conns.pending() == 1
    })
    .await;
    // The queue is full: a third is refused.
    let (status, headers, text) = get_in_background(&c.pod, "/").await.await.expect("call");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert_eq!(headers["x-weft-error"], "overflow", "{text}");
    assert!(text.contains("maxPendingRequests"), "{text}");
    assert_eq!(c.pod.errors(Direction::Outbound, "overflow"), 1);
    assert_eq!(
        ConnStats::get(&stats.requests),
        1,
        "neither waiting nor refused requests were sent"
    );
    release.send_replace(true);
    assert_eq!(held.await.expect("held").0, StatusCode::OK);
    assert_eq!(waiting.await.expect("waiting").0, StatusCode::OK);
    assert_eq!(ConnStats::get(&stats.accepted), 1);
}

#[tokio::test]
async fn a_request_waiting_for_room_closes_an_idle_connection_elsewhere() {
    let (c, [(a_stats, _), (b_stats, _)]) =
        two_apps_one_connection(Ipv4Addr::new(127, 0, 0, 53), Ipv4Addr::new(127, 0, 0, 54)).await;
    // Round robin over two endpoints with room for one connection: each
    // request closes the other endpoint's idle connection first.
    for i in 0..6 {
        let (status, _, text) = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            get_in_background(&c.pod, "/").await,
        )
        .await
        .unwrap_or_else(|_| panic!("request {i} stranded behind an idle connection"))
        .expect("call");
        assert_eq!(status, StatusCode::OK, "{text}");
    }
    assert_eq!(ConnStats::get(&a_stats.requests), 3);
    assert_eq!(ConnStats::get(&b_stats.requests), 3);
    eventually("the last idle connection is the only one open", || {
        ConnStats::get(&a_stats.open) + ConnStats::get(&b_stats.open) == 1
    })
    .await;
    assert_eq!(
        ConnStats::get(&a_stats.accepted) + ConnStats::get(&b_stats.accepted),
        6
    );
}

#[tokio::test]
async fn max_requests_per_connection_closes_used_up_connections() {
    let ip = Ipv4Addr::new(127, 0, 0, 55);
    let (port, stats, _release) = counting_app(ip).await;
    let c = limited_client(&[(ip, port)], pool_limits(None, None, Some(2), 60_000)).await;
    let mut conn = h1(c.pod.app_connect(dst()).await).await;
    let pool = c
        .pod
        .proxy
        .state
        .outbound_pools
        .get(&weft_proxy::http::pool::PoolKey {
            addr: SocketAddr::new(IpAddr::V4(ip), port),
            identity: None,
            version: weft_proxy::http::pool::Version::Http1,
            mux: false,
        });
    for _ in 0..6 {
        let req = Request::get("/")
            .header("host", "cart.shop")
            .body(body(""))
            .expect("request");
        let (status, _, text) = read_text(conn.send_request(req).await.expect("response")).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        // The connection is back in the pool, or closed, before the next.
        eventually("the connection is pooled or closed", || {
            pool.idle_count() == 1
                || ConnStats::get(&stats.closed) == ConnStats::get(&stats.accepted)
        })
        .await;
    }
    // Without the limit, one keep-alive connection carries all six.
    assert_eq!(ConnStats::get(&stats.accepted), 3);
    eventually("used-up connections are closed", || {
        ConnStats::get(&stats.closed) == 3
    })
    .await;
}

#[tokio::test]
async fn idle_connections_close_after_the_services_idle_timeout() {
    let ip = Ipv4Addr::new(127, 0, 0, 56);
    let (port, stats, _release) = counting_app(ip).await;
    let c = limited_client(&[(ip, port)], pool_limits(None, None, None, 300)).await;
    let (status, _, _) = get_in_background(&c.pod, "/").await.await.expect("call");
    assert_eq!(status, StatusCode::OK);
    // The proxy's default keeps it a minute; the policy says 300 ms.
    eventually("the idle connection is closed", || {
        ConnStats::get(&stats.closed) == 1
    })
    .await;
    let (status, _, _) = get_in_background(&c.pod, "/").await.await.expect("call");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ConnStats::get(&stats.accepted), 2);
}

#[tokio::test]
async fn tcp_connections_over_max_connections_are_refused() {
    init();
    let ip = Ipv4Addr::new(127, 0, 0, 57);
    let l = TcpListener::bind((ip, 0)).await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let mut svc = cart(vec![plain_at(ip, port, "v1")], Protocol::Opaque, vec![]);
    svc.policy.connection_pool = Some(pool_limits(Some(1), None, None, 60_000));
    let c = client(&config(1, MtlsMode::Strict, vec![svc])).await;
    let echo = |mut s: tokio::net::TcpStream| async move {
        s.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_exact(&mut buf))
            .await
            .expect("no hang");
        (s, n.is_ok() && &buf == b"ping")
    };
    let (first, ok) = echo(c.pod.app_connect(dst()).await).await;
    assert!(ok, "the first connection is served");
    let (_, ok) = echo(c.pod.app_connect(dst()).await).await;
    assert!(!ok, "a second connection over maxConnections is refused");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(c.pod.errors(Direction::Outbound, "overflow"), 1);
    drop(first);
    let mut served = false;
    for _ in 0..200 {
        if echo(c.pod.app_connect(dst()).await).await.1 {
            served = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        served,
        "the slot was not given back when the first connection closed"
    );
}

#[tokio::test]
async fn http2_requests_share_one_connection_under_max_connections() {
    let ip = Ipv4Addr::new(127, 0, 0, 58);
    let (port, stats, release) = counting_app_of(ip, true).await;
    let mut svc = cart(vec![plain_at(ip, port, "v1")], Protocol::Http2, vec![]);
    svc.policy.connection_pool = Some(pool_limits(Some(1), None, None, 60_000));
    let c = client(&config(1, MtlsMode::Strict, vec![svc])).await;
    let send = h2(c.pod.app_connect(dst()).await).await;
    // Four streams at once: one dials, the others wait for its connection.
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let mut send = send.clone();
            tokio::spawn(async move {
                let req = Request::get("http://cart.shop/hold")
                    .body(body(""))
                    .expect("request");
                read_text(send.send_request(req).await.expect("response")).await
            })
        })
        .collect();
    eventually("the app holds all four requests", || {
        ConnStats::get(&stats.requests) == 4
    })
    .await;
    release.send_replace(true);
    for call in calls {
        let (status, _, text) = call.await.expect("call");
        assert_eq!(status, StatusCode::OK, "{text}");
    }
    assert_eq!(ConnStats::get(&stats.accepted), 1);
}

#[tokio::test]
async fn a_waiting_request_takes_the_room_of_a_connection_that_goes_idle_elsewhere() {
    let (c, [(a_stats, a_release), (b_stats, b_release)]) =
        two_apps_one_connection(Ipv4Addr::new(127, 0, 0, 59), Ipv4Addr::new(127, 0, 0, 60)).await;
    let requests = || ConnStats::get(&a_stats.requests) + ConnStats::get(&b_stats.requests);
    // Round robin: the held request uses one endpoint's connection, the
    // next request wants the other endpoint and waits for room.
    let held = get_in_background(&c.pod, "/hold").await;
    eventually("one app holds a request", || requests() == 1).await;
    let waiting = get_in_background(&c.pod, "/").await;
    let conns = c.pod.proxy.state.conn_limits.of("shop/cart");
    eventually("the second request waits", || conns.pending() == 1).await;
    // The held one is answered: its connection goes idle, and the waiting
    // request closes it to dial its own endpoint.
    a_release.send_replace(true);
    b_release.send_replace(true);
    assert_eq!(held.await.expect("held").0, StatusCode::OK);
    let (status, _, text) = tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
        .await
        .expect("the waiting request was woken when a connection went idle")
        .expect("call");
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(ConnStats::get(&a_stats.requests), 1);
    assert_eq!(ConnStats::get(&b_stats.requests), 1);
    assert_eq!(
        ConnStats::get(&a_stats.accepted) + ConnStats::get(&b_stats.accepted),
        2
    );
}

#[tokio::test]
async fn an_upgraded_connection_counts_against_max_connections_until_it_closes() {
    use http_body_util::BodyExt as _;
    let app = spawn_app(|mut req: Request<Incoming>| async move {
        if req.headers().contains_key("upgrade") {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = hyper_util::rt::TokioIo::new(up);
                    let mut buf = [0u8; 64];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            let mut r = Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed());
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut()
                .insert("connection", "upgrade".parse().expect("v"));
            r.headers_mut()
                .insert("upgrade", "websocket".parse().expect("v"));
            return r;
        }
        Response::new(Full::new(Bytes::from("ok")).map_err(|e| match e {}).boxed())
    })
    .await;
    let mut svc = cart(
        vec![plain_at(Ipv4Addr::LOCALHOST, app.port(), "v1")],
        Protocol::Http1,
        vec![],
    );
    svc.policy.connection_pool = Some(pool_limits(Some(1), Some(0), None, 60_000));
    let c = client(&config(1, MtlsMode::Strict, vec![svc])).await;
    let mut ws = h1(c.pod.app_connect(dst()).await).await;
    let req = Request::get("/ws")
        .header("host", "cart.shop")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .body(body(Bytes::new()))
        .expect("request");
    let resp = ws.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut up = hyper_util::rt::TokioIo::new(hyper::upgrade::on(resp).await.expect("upgraded"));
    up.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    up.read_exact(&mut buf).await.expect("echo");
    assert_eq!(&buf, b"ping");
    // The tunnel holds the one connection allowed: no room, no queue.
    let (status, headers, text) = get_in_background(&c.pod, "/").await.await.expect("call");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert_eq!(headers["x-weft-error"], "overflow");
    // Once the tunnel closes, its room is given back.
    drop(up);
    let mut served = false;
    for _ in 0..200 {
        let (status, _, _) = get_in_background(&c.pod, "/").await.await.expect("call");
        if status == StatusCode::OK {
            served = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(served, "the closed tunnel's connection still counted");
}
