//! Component tests of the proxy-to-proxy hop for HTTP/1.1 traffic: requests
//! from many app connections share one multiplexed HTTP/2 connection
//! between the two proxies (ALPN `weft/h2m`) and reach the app as HTTP/1.1
//! again; beside it a few HTTP/1.1 lanes carry requests one at a time, and
//! only requests that find every lane busy become streams; tunnels take
//! connections of their own; a peer that predates the multiplexing gets
//! HTTP/1.1 connections; reconnects resume TLS sessions.
//!
//! ```text
//! app clients ×N ─h1─► client proxy ══ one mTLS HTTP/2 connection ══► server proxy ─h1─► app
//! ```

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_proxy::metrics::{Direction, HandshakeLabels};
use weft_proxy::test_util::TestCa;
use weft_proxy_config::{ConnectionPool, MtlsMode, Protocol};

const LONG: Duration = Duration::from_secs(20);

struct Pair {
    client: Pod,
    server: Pod,
    dst: SocketAddr,
    app: SocketAddr,
    ca: TestCa,
}

/// A client and a server proxy, the service `echo` (HTTP/1.1) at
/// 10.96.0.1:80 behind the server proxy; `mux` for both proxies, `pool`
/// as the Service's connection pool policy. No HTTP/1.1 lanes beside the
/// multiplexed connection: these tests are about the shared connection.
async fn pair(app: SocketAddr, mux: bool, pool: Option<ConnectionPool>) -> Pair {
    pair_with_lanes(app, mux, pool, 0).await
}

/// [`pair`] whose client proxy keeps up to `lanes` HTTP/1.1 lanes per
/// multiplexing peer.
async fn pair_with_lanes(
    app: SocketAddr,
    mux: bool,
    pool: Option<ConnectionPool>,
    lanes: usize,
) -> Pair {
    init();
    let ca = TestCa::new("weft test CA");
    let mut svc = service(
        "echo",
        cluster_ip(1),
        80,
        app.port(),
        Protocol::Http1,
        vec![meshed(SERVER_POD_IP, SERVER_ID)],
    );
    svc.policy.connection_pool = pool;
    let client_cfg = config(1, MtlsMode::Strict, vec![svc]);
    let server_cfg = config(1, MtlsMode::Strict, vec![]);
    let set = move |s: &mut weft_proxy::Settings| {
        s.mux = mux;
        s.mux_lanes = lanes;
    };
    let server = Pod::start_with(&server_cfg, &ca.leaf(SERVER_ID, 3600), &ca, set).await;
    let client = Pod::start_with(&client_cfg, &ca.leaf(CLIENT_ID, 3600), &ca, set).await;
    client.route_to(
        SocketAddr::new(IpAddr::V4(SERVER_POD_IP), app.port()),
        &server,
    );
    Pair {
        client,
        server,
        dst: SocketAddr::new(cluster_ip(1), 80),
        app,
        ca,
    }
}

/// A connection pool policy with no limit, to set one field of.
fn pool_policy() -> ConnectionPool {
    ConnectionPool {
        max_connections: None,
        max_pending_requests: None,
        max_requests: None,
        max_requests_per_connection: None,
        connect_timeout_ms: 5_000,
        idle_timeout_ms: 60_000,
    }
}

fn handshakes(pod: &Pod, direction: Direction, kind: &'static str) -> u64 {
    pod.proxy
        .state
        .metrics
        .tls_handshakes
        .get_or_create(&HandshakeLabels { direction, kind })
        .get()
}

/// An app that answers after `delay` with the request line, its headers
/// and the body length, and counts the connections it accepted.
async fn slow_echo(delay: Duration, conns: Arc<AtomicUsize>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            conns.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    tokio::time::sleep(delay).await;
                    let mut desc = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
                    for (k, v) in req.headers() {
                        desc.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
                    }
                    let n = req
                        .into_body()
                        .collect()
                        .await
                        .map_or(0, |b| b.to_bytes().len());
                    desc.push_str(&format!("body-bytes: {n}\n"));
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(desc))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// 16 app connections, 4 requests each, all in flight together.
async fn sixteen_clients(p: &Pair) -> Vec<String> {
    let mut tasks = Vec::new();
    for i in 0..16 {
        let mut c = h1(p.client.app_connect(p.dst).await).await;
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for j in 0..4 {
                let req = Request::post(format!("/c{i}/r{j}?q=1"))
                    .header("host", "echo.shop.svc.cluster.local")
                    .header("connection", "keep-alive, x-private")
                    .header("x-private", "secret")
                    .body(body(format!("request {i}.{j}")))
                    .expect("request");
                let resp = c.send_request(req).await.expect("response");
                let (status, _, text) = read_text(resp).await;
                assert_eq!(status, StatusCode::OK, "{text}");
                // The app gets HTTP/1.1 in origin form, the client's
                // hop-by-hop fields gone.
                assert!(
                    text.starts_with(&format!("POST /c{i}/r{j}?q=1 HTTP/1.1\n")),
                    "{text}"
                );
                assert!(!text.contains("x-private"), "{text}");
                seen.push(text);
            }
            seen
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(
            tokio::time::timeout(LONG, t)
                .await
                .expect("in time")
                .expect("task"),
        );
    }
    all
}

#[tokio::test]
async fn many_http1_app_connections_share_one_proxy_connection() {
    let app_conns = Arc::new(AtomicUsize::new(0));
    let app = slow_echo(Duration::from_millis(30), app_conns.clone()).await;
    let p = pair(app, true, None).await;
    let texts = sixteen_clients(&p).await;
    assert_eq!(texts.len(), 64);
    for (n, text) in texts.iter().enumerate() {
        // The client's Host and the caller's identity stamped.
        let (i, j) = (n / 4, n % 4);
        assert!(
            text.contains("host: echo.shop.svc.cluster.local\n"),
            "{text}"
        );
        assert!(
            text.contains(&format!("x-weft-peer-identity: {CLIENT_ID}")),
            "{text}"
        );
        assert!(
            text.contains(&format!("body-bytes: {}", format!("request {i}.{j}").len())),
            "{text}"
        );
    }
    assert_eq!(
        inbound_mtls_connections(&p.server),
        1,
        "64 requests from 16 app connections share one proxy-to-proxy connection"
    );
    assert_eq!(handshakes(&p.server, Direction::Inbound, "full"), 1);
    // The server proxy's own HTTP/1.1 pool to the app opened a connection
    // per concurrent request, as it does for unmultiplexed traffic.
    assert!(app_conns.load(Ordering::SeqCst) >= 2);

    // Without multiplexing every concurrent app connection costs a
    // proxy-to-proxy connection of its own.
    let app_conns = Arc::new(AtomicUsize::new(0));
    let app = slow_echo(Duration::from_millis(30), app_conns).await;
    let p = pair(app, false, None).await;
    let texts = sixteen_clients(&p).await;
    assert_eq!(texts.len(), 64);
    assert!(
        inbound_mtls_connections(&p.server) >= 8,
        "{} connections without multiplexing",
        inbound_mtls_connections(&p.server)
    );
}

/// GETs `path` with `host` on `c`; the answer's text, which must be 200.
async fn get_ok(
    c: &mut hyper::client::conn::http1::SendRequest<TestBody>,
    path: &str,
    host: &str,
) -> String {
    let req = Request::get(path)
        .header("host", host)
        .body(body(Bytes::new()))
        .expect("request");
    let (status, _, text) = read_text(c.send_request(req).await.expect("response")).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    text
}

/// The client proxy's pool towards the server proxy's pod.
fn peer_pool(p: &Pair) -> Arc<weft_proxy::http::pool::Pool> {
    p.client
        .proxy
        .state
        .outbound_pools
        .get(&weft_proxy::http::pool::PoolKey {
            addr: SocketAddr::new(IpAddr::V4(SERVER_POD_IP), p.app.port()),
            identity: Some(weft_proxy::tls::SpiffeId::parse(SERVER_ID).expect("server id")),
            version: weft_proxy::http::pool::Version::Http1,
            mux: true,
        })
}

#[tokio::test]
async fn requests_take_an_idle_lane_and_only_the_overflow_is_multiplexed() {
    let app = slow_echo(Duration::from_millis(30), Arc::default()).await;
    let p = pair_with_lanes(app, true, None, 2).await;
    // One request at a time, from three app connections: each finds the
    // lane the one before it gave back.
    for i in 0..3 {
        let mut c = h1(p.client.app_connect(p.dst).await).await;
        for j in 0..2 {
            let text = get_ok(
                &mut c,
                &format!("/seq/{i}/{j}"),
                "echo.shop.svc.cluster.local",
            )
            .await;
            assert!(
                text.starts_with(&format!("GET /seq/{i}/{j} HTTP/1.1\n")),
                "{text}"
            );
            assert!(
                text.contains(&format!("x-weft-peer-identity: {CLIENT_ID}")),
                "{text}"
            );
        }
    }
    assert_eq!(
        inbound_mtls_connections(&p.server),
        1,
        "six requests one after another travel on one lane"
    );
    eventually(
        "the lane is an idle HTTP/1.1 connection between requests",
        || peer_pool(&p).idle_count() == 1,
    )
    .await;

    // 16 at once: one takes the idle lane, one dials the second lane, the
    // other 14 find both busy and share one multiplexed connection.
    assert_eq!(sixteen_clients(&p).await.len(), 64);
    assert_eq!(
        inbound_mtls_connections(&p.server),
        3,
        "two lanes and one multiplexed connection"
    );
    eventually("both lanes are back, idle", || {
        peer_pool(&p).idle_count() == 2
    })
    .await;
}

#[tokio::test]
async fn a_closed_lane_makes_room_for_another() {
    // One lane, closed after each request: every request dials a new lane,
    // none becomes a stream.
    let pool = ConnectionPool {
        max_requests_per_connection: Some(1),
        ..pool_policy()
    };
    let app = slow_echo(Duration::ZERO, Arc::default()).await;
    let p = pair_with_lanes(app, true, Some(pool), 1).await;
    // Held, so that the proxy's sweep cannot forget the pool between
    // requests: the proxy uses this one.
    let lanes = peer_pool(&p);
    let mut c = h1(p.client.app_connect(p.dst).await).await;
    for i in 0..3 {
        get_ok(&mut c, &format!("/one/{i}"), "echo").await;
        eventually("the used lane is closed and uncounted", || {
            lanes.lanes_open() == 0
        })
        .await;
    }
    assert_eq!(inbound_mtls_connections(&p.server), 3);
    assert_eq!(
        handshakes(&p.server, Direction::Inbound, "resumed"),
        2,
        "the later lanes resume the first one's TLS session"
    );
}

/// An app with a WebSocket-style upgrade at `/ws`, a CONNECT tunnel, a
/// chunked answer with trailers at `/trailers`, and an echo of the body
/// elsewhere.
async fn tunnel_app() -> SocketAddr {
    spawn_app(|mut req: Request<Incoming>| async move {
        let upgrade = req.headers().contains_key("upgrade");
        if upgrade || req.method() == http::Method::CONNECT {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = hyper_util::rt::TokioIo::new(up);
                    let mut buf = [0u8; 5];
                    if io.read_exact(&mut buf).await.is_ok() {
                        let _ = io.write_all(&buf.map(|b| b.to_ascii_uppercase())).await;
                    }
                }
            });
            let mut r = Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed());
            if upgrade {
                *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                r.headers_mut()
                    .insert("connection", "upgrade".parse().expect("v"));
                r.headers_mut()
                    .insert("upgrade", "websocket".parse().expect("v"));
            }
            return r;
        }
        if req.uri().path() == "/trailers" {
            let frames = vec![
                Ok::<_, hyper::Error>(Frame::data(Bytes::from_static(b"part one, "))),
                Ok(Frame::data(Bytes::from_static(b"part two"))),
                Ok(Frame::trailers({
                    let mut t = http::HeaderMap::new();
                    t.insert("x-checksum", "abc123".parse().expect("v"));
                    t
                })),
            ];
            let mut r = Response::new(StreamBody::new(futures::stream::iter(frames)).boxed());
            r.headers_mut()
                .insert("trailer", "x-checksum".parse().expect("v"));
            return r;
        }
        Response::new(req.into_body().boxed())
    })
    .await
}

/// Sends `out` through the tunnel `resp` opened and reads back as many
/// bytes.
async fn through_tunnel(resp: Response<Incoming>, out: &[u8; 5]) -> [u8; 5] {
    let up = tokio::time::timeout(LONG, hyper::upgrade::on(resp))
        .await
        .expect("in time")
        .expect("tunnel");
    let mut io = hyper_util::rt::TokioIo::new(up);
    io.write_all(out).await.expect("write");
    let mut buf = [0u8; 5];
    tokio::time::timeout(LONG, io.read_exact(&mut buf))
        .await
        .expect("in time")
        .expect("read");
    buf
}

#[tokio::test]
async fn upgrades_connect_trailers_and_large_bodies_work_beside_the_multiplexed_connection() {
    let p = pair(tunnel_app().await, true, None).await;
    let mut c = h1(p.client.app_connect(p.dst).await).await;

    // A large body both ways (8 MiB echoed) on the multiplexed connection.
    let big = Bytes::from(vec![b'x'; 8 << 20]);
    let req = Request::put("/echo")
        .header("host", "echo")
        .body(body(big.clone()))
        .expect("request");
    let resp = tokio::time::timeout(LONG, c.send_request(req))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let got = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(got.len(), big.len());
    assert_eq!(inbound_mtls_connections(&p.server), 1);

    // Trailers of a chunked HTTP/1.1 answer reach an HTTP/1.1 client that
    // accepts them.
    let req = Request::get("/trailers")
        .header("host", "echo")
        .header("te", "trailers")
        .body(body(Bytes::new()))
        .expect("request");
    let resp = c.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let collected = resp.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    assert_eq!(
        collected.to_bytes(),
        Bytes::from_static(b"part one, part two")
    );
    assert_eq!(
        trailers
            .as_ref()
            .and_then(|t| t.get("x-checksum"))
            .map(|v| v.as_bytes()),
        Some(&b"abc123"[..]),
        "trailers arrive: {trailers:?}"
    );

    // An upgrade takes a connection of its own and is spliced end to end.
    let mut c2 = h1(p.client.app_connect(p.dst).await).await;
    let req = Request::get("/ws")
        .header("host", "echo")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .body(body(Bytes::new()))
        .expect("request");
    let resp = c2.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(&through_tunnel(resp, b"hello").await, b"HELLO");
    assert_eq!(inbound_mtls_connections(&p.server), 2);

    // So does CONNECT.
    let mut c3 = h1(p.client.app_connect(p.dst).await).await;
    let req = Request::connect("db.shop:5432")
        .body(body(Bytes::new()))
        .expect("request");
    let resp = c3.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(&through_tunnel(resp, b"abcde").await, b"ABCDE");
    assert_eq!(inbound_mtls_connections(&p.server), 3);

    // The first connection still multiplexes.
    let req = Request::post("/after")
        .header("host", "echo")
        .body(body("still here"))
        .expect("request");
    let (status, _, text) = read_text(c.send_request(req).await.expect("response")).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "still here"));
    assert_eq!(inbound_mtls_connections(&p.server), 3);
}

#[tokio::test]
async fn more_requests_in_flight_than_hyper_s_default_stream_limit_share_the_connection() {
    // 300 requests, each held by the app until all 300 have arrived: with
    // fewer streams allowed per connection the last ones would wait for
    // streams that never end (the app gives up after 10 s with 504).
    const N: usize = 300;
    let arrived = Arc::new(AtomicUsize::new(0));
    let all_in = Arc::new(tokio::sync::Notify::new());
    let (a, n) = (arrived.clone(), all_in.clone());
    let app = spawn_app(move |_req: Request<Incoming>| {
        let (arrived, all_in) = (a.clone(), n.clone());
        async move {
            let wait = all_in.notified();
            tokio::pin!(wait);
            wait.as_mut().enable();
            let status = if arrived.fetch_add(1, Ordering::SeqCst) + 1 >= N {
                all_in.notify_waiters();
                StatusCode::OK
            } else if tokio::time::timeout(Duration::from_secs(10), wait)
                .await
                .is_ok()
            {
                StatusCode::OK
            } else {
                StatusCode::GATEWAY_TIMEOUT
            };
            let mut r = Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed());
            *r.status_mut() = status;
            r
        }
    })
    .await;
    let p = pair(app, true, None).await;
    let mut tasks = Vec::new();
    for i in 0..N {
        let mut c = h1(p.client.app_connect(p.dst).await).await;
        tasks.push(tokio::spawn(async move {
            let req = Request::get(format!("/held/{i}"))
                .header("host", "echo")
                .body(body(Bytes::new()))
                .expect("request");
            c.send_request(req).await.expect("response").status()
        }));
    }
    for t in tasks {
        let status = tokio::time::timeout(LONG, t)
            .await
            .expect("in time")
            .expect("task");
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(arrived.load(Ordering::SeqCst), N);
    assert_eq!(inbound_mtls_connections(&p.server), 1);
}

/// Dropped when the app's handler future is dropped unfinished.
struct Cancelled(Arc<AtomicUsize>);

impl Drop for Cancelled {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_only_its_own_request() {
    let cancelled = Arc::new(AtomicUsize::new(0));
    let seen = cancelled.clone();
    let app = spawn_app(move |req: Request<Incoming>| {
        let cancelled = cancelled.clone();
        async move {
            if req.uri().path() == "/hang" {
                let guard = Cancelled(cancelled);
                std::future::pending::<()>().await;
                drop(guard);
            }
            Response::new(
                Full::new(Bytes::from_static(b"ok"))
                    .map_err(|e| match e {})
                    .boxed(),
            )
        }
    })
    .await;
    let p = pair(app, true, None).await;
    let mut keep = h1(p.client.app_connect(p.dst).await).await;
    let req = Request::get("/first")
        .header("host", "echo")
        .body(body(Bytes::new()))
        .expect("r");
    assert_eq!(
        keep.send_request(req).await.expect("response").status(),
        StatusCode::OK
    );

    let mut gone = h1(p.client.app_connect(p.dst).await).await;
    let req = Request::get("/hang")
        .header("host", "echo")
        .body(body(Bytes::new()))
        .expect("r");
    let pending = tokio::spawn(async move { gone.send_request(req).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    pending.abort();
    // The app's handler is dropped: the stream was reset, the server proxy
    // dropped its request to the app.
    eventually("the app sees the request cancelled", || {
        seen.load(Ordering::SeqCst) == 1
    })
    .await;

    let req = Request::get("/after")
        .header("host", "echo")
        .body(body(Bytes::new()))
        .expect("r");
    let (status, _, text) = read_text(keep.send_request(req).await.expect("response")).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "ok"));
    assert_eq!(
        inbound_mtls_connections(&p.server),
        1,
        "the shared connection survived"
    );
}

/// A peer proxy from before multiplexing: mTLS with this mesh's server
/// identity, ALPN `weft/h1` only, HTTP/1.1 to an echo of its own.
async fn old_peer(ca: &TestCa, accepted: Arc<AtomicUsize>) -> SocketAddr {
    let leaf = ca.leaf(SERVER_ID, 3600);
    let files = weft_proxy::tls::identity::IdentityFiles {
        cert_chain: leaf.cert_pem.clone().into_bytes(),
        key: leaf.key_pem.clone().into_bytes(),
        bundle: ca.cert_pem.clone().into_bytes(),
    };
    let ident = weft_proxy::tls::Identity::load(&files, TD, rustls::pki_types::UnixTime::now())
        .expect("identity");
    let mut cfg = (*ident.server_config()).clone();
    cfg.alpn_protocols = vec![
        b"weft/h1".to_vec(),
        b"weft/h2".to_vec(),
        b"weft/tcp".to_vec(),
    ];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            let accepted = accepted.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"weft/h1"[..]));
                accepted.fetch_add(1, Ordering::SeqCst);
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let text = format!(
                        "old peer: {} {} {:?} host={}",
                        req.method(),
                        req.uri(),
                        req.version(),
                        req.headers()
                            .get("host")
                            .and_then(|h| h.to_str().ok())
                            .unwrap_or("-")
                    );
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(text))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_peer_that_does_not_offer_multiplexing_gets_http1_connections() {
    // With and without lanes beside the multiplexed connection: the lanes
    // ask for HTTP/1.1 anyway, and the overflow learns the peer does not
    // multiplex.
    for lanes in [0, 2] {
        old_peer_gets_http1(lanes).await;
    }
}

async fn old_peer_gets_http1(lanes: usize) {
    let p = pair_with_lanes(echo_app().await, true, None, lanes).await;
    let accepted = Arc::new(AtomicUsize::new(0));
    let old = old_peer(&p.ca, accepted.clone()).await;
    p.client.dialer.route(
        SocketAddr::new(IpAddr::V4(SERVER_POD_IP), p.app.port()),
        old,
        &weft_proxy::net::stamp::StampTable::default(),
    );
    let mut tasks = Vec::new();
    for i in 0..4 {
        let mut c = h1(p.client.app_connect(p.dst).await).await;
        tasks.push(tokio::spawn(async move {
            for j in 0..3 {
                let text = get_ok(&mut c, &format!("/o{i}/{j}"), "echo.shop").await;
                assert_eq!(
                    text,
                    format!("old peer: GET /o{i}/{j} HTTP/1.1 host=echo.shop")
                );
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(LONG, t)
            .await
            .expect("in time")
            .expect("task");
    }
    let n = accepted.load(Ordering::SeqCst);
    assert!(
        (2..=12).contains(&n),
        "{n} HTTP/1.1 connections to the old peer ({lanes} lanes)"
    );
}

#[tokio::test]
async fn a_service_with_max_connections_keeps_http1_connections_and_its_limit() {
    let pool = ConnectionPool {
        max_connections: Some(2),
        ..pool_policy()
    };
    let app_conns = Arc::new(AtomicUsize::new(0));
    let app = slow_echo(Duration::from_millis(50), app_conns.clone()).await;
    let p = pair(app, true, Some(pool)).await;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let mut c = h1(p.client.app_connect(p.dst).await).await;
        tasks.push(tokio::spawn(async move {
            get_ok(&mut c, &format!("/q{i}"), "echo").await;
        }));
    }
    for t in tasks {
        tokio::time::timeout(LONG, t)
            .await
            .expect("in time")
            .expect("task");
    }
    // Two HTTP/1.1 connections carried the six requests, two at a time, so
    // the app never had more than two in flight.
    assert_eq!(inbound_mtls_connections(&p.server), 2);
    assert!(app_conns.load(Ordering::SeqCst) <= 2);
}

#[tokio::test]
async fn a_reconnect_resumes_the_tls_session_and_keeps_the_peer_identity() {
    // One request per connection: every request after the first reconnects.
    let pool = ConnectionPool {
        max_requests_per_connection: Some(1),
        ..pool_policy()
    };
    let p = pair(echo_app().await, true, Some(pool)).await;
    let mut c = h1(p.client.app_connect(p.dst).await).await;
    for i in 0..4 {
        let text = get_ok(&mut c, &format!("/r{i}"), "echo").await;
        // The server proxy knows the caller on resumed sessions too.
        assert!(
            text.contains(&format!("x-weft-peer-identity: {CLIENT_ID}")),
            "{text}"
        );
        eventually("the connection is used up", || {
            inbound_mtls_connections(&p.server) == i + 1
        })
        .await;
    }
    assert_eq!(inbound_mtls_connections(&p.server), 4);
    assert_eq!(handshakes(&p.server, Direction::Inbound, "full"), 1);
    assert_eq!(handshakes(&p.server, Direction::Inbound, "resumed"), 3);
    assert_eq!(handshakes(&p.client, Direction::Outbound, "full"), 1);
    assert_eq!(handshakes(&p.client, Direction::Outbound, "resumed"), 3);
}
