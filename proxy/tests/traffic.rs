//! Component tests: a client proxy and a server proxy on loopback with real
//! mTLS, stamped original destinations instead of iptables.
//!
//! ```text
//! test client ──stamp 10.96.0.x:port──► client proxy :outbound ──mTLS──► server proxy :inbound ──► app 127.0.0.1:P
//! ```

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_proxy::metrics::Direction;
use weft_proxy::test_util::TestCa;
use weft_proxy_config::{MtlsMode, Protocol};

const LONG: Duration = Duration::from_secs(20);

/// Client and server proxies; the service `echo` at 10.96.0.1:80 points at
/// the app behind the server proxy.
struct Pair {
    client: Pod,
    server: Pod,
    dst: SocketAddr,
    _ca: TestCa,
}

async fn pair_with(
    app: SocketAddr,
    protocol: Protocol,
    mode: MtlsMode,
    endpoint_identity: &str,
) -> Pair {
    pair_with_settings(app, protocol, mode, endpoint_identity, |_| {}).await
}

/// [`pair_with`], both proxies started with `tweak` applied to their settings.
async fn pair_with_settings(
    app: SocketAddr,
    protocol: Protocol,
    mode: MtlsMode,
    endpoint_identity: &str,
    tweak: impl Fn(&mut weft_proxy::Settings),
) -> Pair {
    init();
    let ca = TestCa::new("weft test CA");
    let svc_port = 80;
    let svc = service(
        "echo",
        cluster_ip(1),
        svc_port,
        app.port(),
        protocol,
        vec![meshed(SERVER_POD_IP, endpoint_identity)],
    );
    let client_cfg = config(1, mode, vec![svc]);
    let server_cfg = config(1, mode, vec![]);
    let server = Pod::start_with(&server_cfg, &ca.leaf(SERVER_ID, 3600), &ca, &tweak).await;
    let client = Pod::start_with(&client_cfg, &ca.leaf(CLIENT_ID, 3600), &ca, &tweak).await;
    client.route_to(
        SocketAddr::new(IpAddr::V4(SERVER_POD_IP), app.port()),
        &server,
    );
    Pair {
        client,
        server,
        dst: SocketAddr::new(cluster_ip(1), svc_port),
        _ca: ca,
    }
}

async fn pair(app: SocketAddr, protocol: Protocol) -> Pair {
    pair_with(app, protocol, MtlsMode::Strict, SERVER_ID).await
}

#[tokio::test]
async fn http1_over_mtls_preserves_host_strips_hop_by_hop_and_stamps_identity() {
    let p = pair(echo_app().await, Protocol::Detect).await;
    let mut c = h1(p.client.app_connect(p.dst).await).await;
    for i in 0..3 {
        let req = Request::post("/hello?x=1")
            .header("host", "echo.shop.svc.cluster.local")
            .header("connection", "keep-alive, x-private")
            .header("x-private", "secret")
            .header(
                "x-weft-peer-identity",
                "spiffe://cluster.local/ns/evil/sa/forged",
            )
            .body(body(format!("payload {i}")))
            .expect("request");
        let (status, _, text) = read_text(c.send_request(req).await.expect("response")).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        assert!(text.starts_with("POST /hello?x=1 HTTP/1.1"), "{text}");
        assert!(text.contains("host: echo.shop.svc.cluster.local"), "{text}");
        assert!(
            text.contains(&format!("x-weft-peer-identity: {CLIENT_ID}")),
            "{text}"
        );
        assert!(!text.contains("forged"), "{text}");
        assert!(!text.contains("x-private"), "{text}");
        assert!(text.contains("body-bytes: 9"), "{text}");
    }
    assert_eq!(
        inbound_mtls_connections(&p.server),
        1,
        "keep-alive pool reuses one mTLS connection"
    );
}

#[tokio::test]
async fn http2_end_to_end_with_grpc_trailers() {
    let app = spawn_app(|req: Request<Incoming>| async move {
        assert_eq!(req.version(), http::Version::HTTP_2);
        let te = req.headers().get("te").cloned();
        let data = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().expect("value"));
        trailers.insert("grpc-message", format!("te={te:?}").parse().expect("value"));
        let frames = vec![
            Ok::<_, hyper::Error>(Frame::data(data)),
            Ok(Frame::trailers(trailers)),
        ];
        let body = http_body_util::StreamBody::new(futures_iter(frames));
        let mut r = Response::new(body.boxed());
        r.headers_mut()
            .insert("content-type", "application/grpc".parse().expect("value"));
        r
    })
    .await;
    let p = pair(app, Protocol::Grpc).await;
    let mut c = h2(p.client.app_connect(p.dst).await).await;
    let req = Request::post("http://echo.shop:80/pkg.Echo/Say")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body(Bytes::from_static(b"\0\0\0\0\x03abc")))
        .expect("request");
    let resp = c.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let collected = resp.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().expect("trailers arrive");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
    assert!(
        trailers
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|m| m.contains("trailers"))
    );
    assert_eq!(&collected.to_bytes()[..], b"\0\0\0\0\x03abc");
}

fn futures_iter<T>(items: Vec<T>) -> futures::stream::Iter<std::vec::IntoIter<T>> {
    futures::stream::iter(items)
}

#[tokio::test]
async fn websocket_style_upgrade_is_spliced_end_to_end() {
    let app = spawn_app(|mut req: Request<Incoming>| async move {
        assert_eq!(
            req.headers().get("upgrade").map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
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
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert("connection", "upgrade".parse().expect("v"));
        r.headers_mut()
            .insert("upgrade", "websocket".parse().expect("v"));
        r
    })
    .await;
    let p = pair(app, Protocol::Detect).await;
    let mut c = h1(p.client.app_connect(p.dst).await).await;
    let req = Request::get("/ws")
        .header("host", "echo")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .body(body(Bytes::new()))
        .expect("request");
    let resp = c.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let up = tokio::time::timeout(LONG, hyper::upgrade::on(resp))
        .await
        .expect("in time")
        .expect("upgraded");
    let mut io = hyper_util::rt::TokioIo::new(up);
    io.write_all(b"hello").await.expect("write");
    let mut buf = [0u8; 5];
    tokio::time::timeout(LONG, io.read_exact(&mut buf))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(&buf, b"HELLO");
}

#[tokio::test]
async fn opaque_tcp_over_mtls() {
    let p = pair(tcp_echo().await, Protocol::Opaque).await;
    let mut s = p.client.app_connect(p.dst).await;
    let msg = vec![7u8; 100_000];
    s.write_all(&msg).await.expect("write");
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(LONG, s.read_exact(&mut got))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(got, msg);
    assert_eq!(inbound_mtls_connections(&p.server), 1);
}

/// Pod IPs (headless Services, StatefulSet peers) are meshed too: a
/// connection addressed to a meshed endpoint's own IP:port goes to that pod
/// over mTLS, HTTP and opaque alike, and Strict on the server accepts it.
#[tokio::test]
async fn a_meshed_pod_ip_destination_gets_mtls() {
    let app = echo_app().await;
    let p = pair(app, Protocol::Detect).await;
    let pod = SocketAddr::new(IpAddr::V4(SERVER_POD_IP), app.port());
    let mut c = h1(p.client.app_connect(pod).await).await;
    let req = Request::get("/direct")
        .header("host", "echo-0.echo.shop.svc.cluster.local")
        .body(body(""))
        .expect("request");
    let (status, _, text) = read_text(c.send_request(req).await.expect("response")).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(text.starts_with("GET /direct HTTP/1.1"), "{text}");
    assert!(
        text.contains(&format!("x-weft-peer-identity: {CLIENT_ID}")),
        "{text}"
    );

    let tcp = tcp_echo().await;
    let p = pair(tcp, Protocol::Opaque).await;
    let pod = SocketAddr::new(IpAddr::V4(SERVER_POD_IP), tcp.port());
    let mut s = p.client.app_connect(pod).await;
    s.write_all(b"to the pod").await.expect("write");
    let mut got = [0u8; 10];
    tokio::time::timeout(LONG, s.read_exact(&mut got))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(&got, b"to the pod");
    assert_eq!(
        inbound_mtls_connections(&p.server),
        1,
        "the opaque connection to the pod IP came over mTLS"
    );
}

#[tokio::test]
async fn detected_non_http_is_forwarded_opaque() {
    let p = pair(tcp_echo().await, Protocol::Detect).await;
    let mut s = p.client.app_connect(p.dst).await;
    s.write_all(b"\x00\x01binary protocol")
        .await
        .expect("write");
    let mut got = [0u8; 17];
    tokio::time::timeout(LONG, s.read_exact(&mut got))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(&got, b"\x00\x01binary protocol");
}

#[tokio::test]
async fn server_first_protocol_on_a_server_first_port_never_waits_for_the_client() {
    init();
    let ca = TestCa::new("ca");
    let app = greeter(b"* OK mysql-like greeting\r\n").await;
    // Port 3306 is on the default server-first list; detection would wait 10 minutes.
    let svc = service(
        "db",
        cluster_ip(2),
        3306,
        app.port(),
        Protocol::Detect,
        vec![plain(std::net::Ipv4Addr::LOCALHOST)],
    );
    let client = Pod::start_with(
        &config(1, MtlsMode::Strict, vec![svc]),
        &ca.leaf(CLIENT_ID, 3600),
        &ca,
        |s| {
            s.detect_timeout = Duration::from_secs(600);
        },
    )
    .await;
    let mut s = client
        .app_connect(SocketAddr::new(cluster_ip(2), 3306))
        .await;
    let mut buf = [0u8; 26];
    tokio::time::timeout(LONG, s.read_exact(&mut buf))
        .await
        .expect("greeting without client bytes")
        .expect("read");
    assert_eq!(&buf, b"* OK mysql-like greeting\r\n");

    // Dialled at the endpoint's own address (a pod IP, any target port):
    // the Service port's server-first default still applies.
    let mut s = client.app_connect(app).await;
    tokio::time::timeout(LONG, s.read_exact(&mut buf))
        .await
        .expect("greeting from the pod IP without client bytes")
        .expect("read");
    assert_eq!(&buf, b"* OK mysql-like greeting\r\n");

    // An unknown destination passes through untouched, also server-first.
    let other = greeter(b"* OK mysql-like greeting\r\n").await;
    let mut s = client.app_connect(other).await;
    tokio::time::timeout(LONG, s.read_exact(&mut buf))
        .await
        .expect("passthrough greeting")
        .expect("read");
    assert_eq!(&buf, b"* OK mysql-like greeting\r\n");
}

#[tokio::test]
async fn large_bodies_stream_both_ways_without_buffering() {
    let app = spawn_app(|req: Request<Incoming>| async move {
        // Echo the body frame by frame.
        Response::new(req.into_body().boxed())
    })
    .await;
    let p = pair(app, Protocol::Detect).await;
    let mut c = h2(p.client.app_connect(p.dst).await).await;
    let (tx, req_body) = channel_body();
    let req = Request::post("http://echo/stream")
        .body(req_body)
        .expect("request");
    let resp = c.send_request(req);
    tx.send(Bytes::from(vec![b'a'; 1024]))
        .await
        .expect("first chunk");
    let resp = tokio::time::timeout(LONG, resp)
        .await
        .expect("headers before the body ends")
        .expect("resp");
    let mut body = resp.into_body();
    // The first chunk comes back while the request is still open: streamed.
    let mut got = 0usize;
    while got < 1024 {
        let f = tokio::time::timeout(LONG, body.frame())
            .await
            .expect("echo of the first chunk")
            .expect("frame")
            .expect("ok");
        got += f.into_data().map(|d| d.len()).unwrap_or(0);
    }
    // Then 32 MiB more.
    let chunk = Bytes::from(vec![b'b'; 1 << 20]);
    let sender = tokio::spawn(async move {
        for _ in 0..32 {
            tx.send(chunk.clone()).await.expect("send chunk");
        }
    });
    while let Some(f) = tokio::time::timeout(LONG, body.frame())
        .await
        .expect("frames keep coming")
    {
        got += f.expect("ok").into_data().map(|d| d.len()).unwrap_or(0);
    }
    sender.await.expect("sender");
    assert_eq!(got, 1024 + (32 << 20));

    // HTTP/1.1: a 16 MiB upload is counted by the app.
    let p1 = pair(echo_app().await, Protocol::Http1).await;
    let mut c = h1(p1.client.app_connect(p1.dst).await).await;
    let req = Request::put("/upload")
        .header("host", "echo")
        .body(body_of(16 << 20))
        .expect("request");
    let (status, _, text) = read_text(c.send_request(req).await.expect("resp")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        text.contains(&format!("body-bytes: {}", 16 << 20)),
        "{text}"
    );
}

fn body_of(n: usize) -> TestBody {
    body(Bytes::from(vec![b'z'; n]))
}

#[tokio::test]
async fn wrong_identity_is_rejected_with_identity_mismatch() {
    let p = pair_with(
        echo_app().await,
        Protocol::Detect,
        MtlsMode::Strict,
        "spiffe://cluster.local/ns/shop/sa/other",
    )
    .await;
    let mut c = h1(p.client.app_connect(p.dst).await).await;
    let req = Request::get("/")
        .header("host", "echo")
        .body(body(""))
        .expect("request");
    let (status, headers, text) = read_text(c.send_request(req).await.expect("resp")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{text}");
    assert_eq!(
        headers.get("x-weft-error").map(|v| v.as_bytes()),
        Some(&b"identity-mismatch"[..]),
        "{text}"
    );
    assert!(
        text.contains("sa/other") && text.contains("sa/echo"),
        "{text}"
    );
    assert!(p.client.errors(Direction::Outbound, "identity-mismatch") >= 1);
}

#[tokio::test]
async fn expired_or_foreign_peer_certificates_are_rejected() {
    init();
    let ca = TestCa::new("ca");
    let app = echo_app().await;
    // A "peer proxy" presenting an expired certificate of the right identity.
    let expired = ca.leaf(SERVER_ID, -3600);
    let peer = tls_server(&expired, &ca).await;
    // And one with the right identity from a foreign CA.
    let foreign_ca = TestCa::new("foreign");
    let foreign = tls_server(&foreign_ca.leaf(SERVER_ID, 3600), &foreign_ca).await;
    let svc = |ip, n| {
        service(
            &format!("echo{n}"),
            cluster_ip(n),
            80,
            app.port(),
            Protocol::Http1,
            vec![meshed(ip, SERVER_ID)],
        )
    };
    let cfg = config(
        1,
        MtlsMode::Strict,
        vec![
            svc(SERVER_POD_IP, 1),
            svc(std::net::Ipv4Addr::new(127, 0, 0, 3), 2),
        ],
    );
    let client = Pod::start(&cfg, &ca.leaf(CLIENT_ID, 3600), &ca).await;
    client.dialer.route(
        SocketAddr::new(IpAddr::V4(SERVER_POD_IP), app.port()),
        peer,
        &Default::default(),
    );
    client.dialer.route(
        SocketAddr::new("127.0.0.3".parse().expect("ip"), app.port()),
        foreign,
        &Default::default(),
    );
    for n in [1, 2] {
        let mut c = h1(client.app_connect(SocketAddr::new(cluster_ip(n), 80)).await).await;
        let req = Request::get("/")
            .header("host", "echo")
            .body(body(""))
            .expect("request");
        let (status, headers, text) = read_text(c.send_request(req).await.expect("resp")).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{text}");
        assert_eq!(
            headers.get("x-weft-error").map(|v| v.as_bytes()),
            Some(&b"tls"[..]),
            "{text}"
        );
    }

    // Inbound: a client with an expired certificate cannot reach the app.
    let (server, stamped) = strict_server_and_connection(&ca, app.port()).await;
    let r = tls_client(stamped, &ca.leaf(CLIENT_ID, -3600), &ca).await;
    assert!(r.is_err(), "expired client certificate must be refused");
    eventually("inbound tls failure counted", || {
        server.errors(Direction::Inbound, "tls") >= 1
    })
    .await;
}

/// A bare TLS 1.3 server with `leaf`, requiring nothing, answering HTTP 200.
async fn tls_server(leaf: &weft_proxy::test_util::Leaf, _ca: &TestCa) -> SocketAddr {
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("pem");
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key");
    let mut cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("cfg");
    cfg.alpn_protocols = vec![b"weft/h1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let a = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut t) = a.accept(s).await {
                    let _ = t
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await;
                }
            });
        }
    });
    addr
}

/// A Strict server pod, and a connection to its inbound listener stamped as
/// addressed to `app_port` on its pod IP.
async fn strict_server_and_connection(ca: &TestCa, app_port: u16) -> (Pod, tokio::net::TcpStream) {
    let server = Pod::start(
        &config(1, MtlsMode::Strict, vec![]),
        &ca.leaf(SERVER_ID, 3600),
        ca,
    )
    .await;
    let s = server
        .inbound_stamps
        .connect(
            server.proxy.inbound_addr,
            SocketAddr::new(IpAddr::V4(SERVER_POD_IP), app_port),
        )
        .await
        .expect("connect");
    (server, s)
}

/// A TLS client presenting `leaf`, trusting `ca`, sending one request.
async fn tls_client(
    s: tokio::net::TcpStream,
    leaf: &weft_proxy::test_util::Leaf,
    ca: &TestCa,
) -> std::io::Result<Vec<u8>> {
    let mut t = tls_connect(s, leaf, ca).await?;
    t.write_all(b"GET / HTTP/1.1\r\nhost: echo\r\n\r\n").await?;
    let mut buf = vec![0u8; 256];
    let n = t.read(&mut buf).await?;
    if n == 0 {
        return Err(std::io::Error::other("closed"));
    }
    buf.truncate(n);
    Ok(buf)
}

/// A TLS handshake presenting `leaf`, trusting `ca`, with rustls's default
/// (ring) cipher suite order, which prefers AES-256-GCM.
async fn tls_connect(
    s: tokio::net::TcpStream,
    leaf: &weft_proxy::test_util::Leaf,
    ca: &TestCa,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("pem");
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key");
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca.cert_pem.as_bytes()) {
        roots.add(c.expect("ca pem")).expect("root");
    }
    let verifier = weft_proxy::tls::verify::ServerIdentityVerifier::new(
        std::sync::Arc::new(roots),
        weft_proxy::tls::SpiffeId::parse(SERVER_ID).expect("id"),
        weft_proxy::tls::provider(),
    );
    let mut cfg = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(verifier))
        .with_client_auth_cert(chain, key)
        .expect("client cfg");
    cfg.alpn_protocols = vec![b"weft/h1".to_vec()];
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(
            rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 2]).into()),
            s,
        )
        .await
}

#[tokio::test]
async fn the_server_picks_aes_128_gcm_whatever_the_client_prefers() {
    init();
    let ca = TestCa::new("ca");
    let app = echo_app().await;
    let (_server, s) = strict_server_and_connection(&ca, app.port()).await;
    let t = tls_connect(s, &ca.leaf(CLIENT_ID, 3600), &ca)
        .await
        .expect("handshake");
    let suite = t.get_ref().1.negotiated_cipher_suite().map(|s| s.suite());
    assert_eq!(suite, Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
}

#[tokio::test]
async fn plaintext_is_refused_in_strict_and_accepted_in_permissive() {
    for mode in [MtlsMode::Strict, MtlsMode::Permissive] {
        init();
        let ca = TestCa::new("ca");
        let app = echo_app().await;
        let server = Pod::start(&config(1, mode, vec![]), &ca.leaf(SERVER_ID, 3600), &ca).await;
        let s = server
            .inbound_stamps
            .connect(
                server.proxy.inbound_addr,
                SocketAddr::new(IpAddr::V4(SERVER_POD_IP), app.port()),
            )
            .await
            .expect("connect");
        let mut c = h1(s).await;
        let req = Request::get("/plain")
            .header("host", "echo")
            .header(
                "x-weft-peer-identity",
                "spiffe://cluster.local/ns/evil/sa/forged",
            )
            .body(body(""))
            .expect("request");
        let (status, headers, text) = read_text(c.send_request(req).await.expect("resp")).await;
        match mode {
            MtlsMode::Strict => {
                assert_eq!(status, StatusCode::FORBIDDEN);
                assert_eq!(
                    headers.get("x-weft-error").map(|v| v.as_bytes()),
                    Some(&b"plaintext-refused"[..])
                );
                assert!(!text.contains("GET /plain"));
            }
            MtlsMode::Permissive => {
                assert_eq!(status, StatusCode::OK, "{text}");
                assert!(text.starts_with("GET /plain"), "{text}");
                assert!(
                    !text.contains("x-weft-peer-identity"),
                    "forged identity must be stripped: {text}"
                );
            }
        }
    }
}

#[tokio::test]
async fn connections_to_the_proxys_own_listener_are_refused() {
    let p = pair(echo_app().await, Protocol::Detect).await;
    // Unstamped: the original destination is the outbound listener itself.
    let mut s = tokio::net::TcpStream::connect(p.client.proxy.outbound_addr)
        .await
        .expect("connect");
    let _ = s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut buf = Vec::new();
    let n = tokio::time::timeout(LONG, s.read_to_end(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "a looping connection gets no answer");
    assert_eq!(p.client.errors(Direction::Outbound, "loop"), 1);
    // Stamped with the inbound listener's address: also a loop.
    let mut s = p.client.app_connect(p.client.proxy.inbound_addr).await;
    let n = tokio::time::timeout(LONG, s.read_to_end(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(p.client.errors(Direction::Outbound, "loop"), 2);
}

#[tokio::test]
async fn dead_endpoint_is_skipped_and_no_endpoints_fall_back_to_the_original_destination() {
    init();
    let ca = TestCa::new("ca");
    let app = echo_app().await;
    // A port nothing listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut two = service(
        "echo",
        cluster_ip(1),
        80,
        app.port(),
        Protocol::Http1,
        vec![
            plain(std::net::Ipv4Addr::new(127, 0, 0, 1)),
            plain(std::net::Ipv4Addr::new(127, 0, 0, 4)),
        ],
    );
    two.endpoints[1].ports.insert("p".into(), dead);
    let none = service("later", cluster_ip(5), 80, 80, Protocol::Http1, vec![]);
    let gone = service(
        "gone",
        cluster_ip(6),
        80,
        dead,
        Protocol::Http1,
        vec![plain(std::net::Ipv4Addr::new(127, 0, 0, 1))],
    );
    let client = Pod::start(
        &config(1, MtlsMode::Strict, vec![two, none, gone]),
        &ca.leaf(CLIENT_ID, 3600),
        &ca,
    )
    .await;
    for _ in 0..20 {
        let mut c = h1(client.app_connect(SocketAddr::new(cluster_ip(1), 80)).await).await;
        let req = Request::get("/")
            .header("host", "echo")
            .body(body(""))
            .expect("request");
        let (status, _, text) = read_text(c.send_request(req).await.expect("resp")).await;
        assert_eq!(status, StatusCode::OK, "{text}");
    }
    // No endpoints in config: the ClusterIP itself (here routed to the app).
    client
        .dialer
        .route(SocketAddr::new(cluster_ip(5), 80), app, &Default::default());
    let mut c = h1(client.app_connect(SocketAddr::new(cluster_ip(5), 80)).await).await;
    let req = Request::get("/fallback")
        .header("host", "later")
        .body(body(""))
        .expect("request");
    let (status, _, text) = read_text(c.send_request(req).await.expect("resp")).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(text.starts_with("GET /fallback"), "{text}");
    // Only a dead endpoint: 503 naming the connect step.
    let mut c = h1(client.app_connect(SocketAddr::new(cluster_ip(6), 80)).await).await;
    let req = Request::get("/")
        .header("host", "gone")
        .body(body(""))
        .expect("request");
    let (status, headers, text) = read_text(c.send_request(req).await.expect("resp")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert_eq!(
        headers.get("x-weft-error").map(|v| v.as_bytes()),
        Some(&b"connect"[..])
    );
    assert!(text.contains("check that the pod"), "{text}");
}

#[tokio::test]
async fn admin_serves_health_metrics_config_certs_and_shutdown() {
    let p = pair(echo_app().await, Protocol::Detect).await;
    let admin = p.client.proxy.admin_addr;
    let get = |path: &'static str| async move {
        let mut c = h1(tokio::net::TcpStream::connect(admin).await.expect("admin")).await;
        read_text(
            c.send_request(
                Request::get(path)
                    .header("host", "admin")
                    .body(body(""))
                    .expect("req"),
            )
            .await
            .expect("resp"),
        )
        .await
    };
    assert_eq!(get("/live").await.0, StatusCode::OK);
    assert_eq!(get("/ready").await.0, StatusCode::OK);
    let (_, _, cfg) = get("/config").await;
    assert!(cfg.contains("\"generation\": 1"), "{cfg}");
    let (_, _, certs) = get("/certs").await;
    assert!(certs.contains(CLIENT_ID), "{certs}");
    // Some traffic, then metrics.
    let mut c = h1(p.client.app_connect(p.dst).await).await;
    let (s, _, _) = read_text(
        c.send_request(
            Request::get("/")
                .header("host", "e")
                .body(body(""))
                .expect("r"),
        )
        .await
        .expect("resp"),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (_, _, m) = get("/metrics").await;
    assert!(
        m.contains("weft_proxy_requests_total{direction=\"outbound\",code=\"200\"} 1"),
        "{m}"
    );
    assert!(m.contains("weft_proxy_config_generation 1"), "{m}");
    assert!(
        m.contains("weft_proxy_cert_expiry_timestamp_seconds"),
        "{m}"
    );
    assert!(
        m.contains("weft_proxy_reloads_total{result=\"ok\"} 1"),
        "{m}"
    );
    let mut c = h1(tokio::net::TcpStream::connect(admin).await.expect("admin")).await;
    let r = c
        .send_request(
            Request::post("/shutdown")
                .header("host", "a")
                .body(body(""))
                .expect("r"),
        )
        .await
        .expect("resp");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(get("/ready").await.0, StatusCode::SERVICE_UNAVAILABLE);
}

/// One request to the admin API, served as to a connection from `peer`:
/// the proxy's own connection handler over an in-memory stream, so a test
/// on loopback can be a client in another pod.
async fn admin_from(
    pod: &Pod,
    peer: &str,
    method: http::Method,
    path: &str,
) -> (StatusCode, String) {
    let peer: SocketAddr = peer.parse().expect("peer address");
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(weft_proxy::admin::serve_connection(
        pod.proxy.state.clone(),
        server,
        peer,
    ));
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(client))
            .await
            .expect("h1 handshake");
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "admin")
        .body(body(""))
        .expect("request");
    let (status, _, text) = read_text(send.send_request(req).await.expect("response")).await;
    (status, text)
}

/// The admin port is exempt from capture and mTLS, so every pod reaches it:
/// a peer outside the pod gets the probes and metrics and 403 for the rest
/// (a shutdown it asks for never starts), loopback clients get everything.
/// The listener is the dual-stack `[::]` a pod's proxy binds, so the IPv4
/// loopback client is seen as `::ffff:127.0.0.1`.
#[tokio::test]
async fn admin_serves_only_probes_and_metrics_outside_the_pod() {
    init();
    let ca = TestCa::new("ca");
    let pod = Pod::start_with(
        &config(1, MtlsMode::Permissive, vec![]),
        &ca.leaf(SERVER_ID, 3600),
        &ca,
        |s| {
            *s = s
                .clone()
                .ephemeral(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
        },
    )
    .await;
    let peers = [
        "10.244.0.7:40000",
        "[::ffff:10.244.0.7]:40000",
        "[fd00::7]:40000",
    ];
    for peer in peers {
        for (method, path) in [
            (http::Method::GET, "/config"),
            (http::Method::GET, "/certs"),
            (http::Method::POST, "/shutdown"),
        ] {
            let (status, text) = admin_from(&pod, peer, method.clone(), path).await;
            assert_eq!(
                status,
                StatusCode::FORBIDDEN,
                "{method} {path} from {peer}: {text}"
            );
            assert!(text.contains("loopback clients in the pod only"), "{text}");
            assert!(
                !text.contains(SERVER_ID),
                "{path} from {peer} leaked: {text}"
            );
        }
        for path in ["/live", "/ready", "/metrics"] {
            let (status, text) = admin_from(&pod, peer, http::Method::GET, path).await;
            assert_eq!(status, StatusCode::OK, "{path} from {peer}: {text}");
        }
    }
    assert_eq!(pod.errors(Direction::Inbound, "admin-forbidden"), 9);
    assert!(
        pod.proxy.state.is_ready(),
        "a refused shutdown started draining"
    );

    // Real sockets from loopback, over both families.
    let port = pod.proxy.admin_addr.port();
    let call = |ip: IpAddr, method: http::Method, path: &'static str| async move {
        let mut c = h1(tokio::net::TcpStream::connect((ip, port))
            .await
            .expect("admin"))
        .await;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "admin")
            .body(body(""))
            .expect("request");
        read_text(c.send_request(req).await.expect("response")).await
    };
    let get = |ip: IpAddr, path: &'static str| call(ip, http::Method::GET, path);
    let v4 = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    let v6 = IpAddr::V6(std::net::Ipv6Addr::LOCALHOST);
    let (status, _, cfg) = get(v4, "/config").await;
    assert_eq!(status, StatusCode::OK, "/config from 127.0.0.1: {cfg}");
    assert!(cfg.contains("\"generation\": 1"), "{cfg}");
    let (status, _, certs) = get(v6, "/certs").await;
    assert_eq!(status, StatusCode::OK, "/certs from ::1: {certs}");
    assert!(certs.contains(SERVER_ID), "{certs}");
    assert_eq!(get(v4, "/ready").await.0, StatusCode::OK);
    let (status, _, _) = call(v4, http::Method::POST, "/shutdown").await;
    assert_eq!(status, StatusCode::OK, "shutdown from loopback");
    assert_eq!(get(v4, "/ready").await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(pod.errors(Direction::Inbound, "admin-forbidden"), 9);
}

#[tokio::test]
async fn app_health_runs_the_original_probes() {
    init();
    let ca = TestCa::new("ca");
    let app = spawn_app(|req: Request<Incoming>| async move {
        let code = if req.uri().path() == "/healthz" {
            200
        } else {
            500
        };
        let mut r = Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed());
        *r.status_mut() = StatusCode::from_u16(code).expect("code");
        r
    })
    .await;
    let probes = format!(
        r#"{{"version":1,"containers":{{"app":{{"livez":{{"http":{{"port":{p},"path":"/healthz","scheme":"HTTP"}},"timeoutSeconds":1}},"readyz":{{"http":{{"port":{p},"path":"/broken","scheme":"HTTP"}},"timeoutSeconds":1}},"startupz":{{"tcp":{{"port":{p}}},"timeoutSeconds":1}}}}}}}}"#,
        p = app.port()
    );
    let parsed = weft_proxy::probes::AppProbes::parse(&probes).expect("probe json");
    let pod = Pod::start_with(
        &config(1, MtlsMode::Strict, vec![]),
        &ca.leaf(SERVER_ID, 3600),
        &ca,
        |s| {
            s.app_probes = parsed;
        },
    )
    .await;
    let admin = pod.proxy.admin_addr;
    let get = |path: &'static str| async move {
        let mut c = h1(tokio::net::TcpStream::connect(admin).await.expect("admin")).await;
        read_text(
            c.send_request(
                Request::get(path)
                    .header("host", "admin")
                    .body(body(""))
                    .expect("req"),
            )
            .await
            .expect("resp"),
        )
        .await
    };
    assert_eq!(get("/app-health/app/livez").await.0, StatusCode::OK);
    assert_eq!(get("/app-health/app/startupz").await.0, StatusCode::OK);
    let (s, _, t) = get("/app-health/app/readyz").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(t.contains("500"), "{t}");
    assert_eq!(
        get("/app-health/other/livez").await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn connect_tunnels_through_the_mesh() {
    // The destination is an HTTP proxy; the app speaks CONNECT to it.
    let app = spawn_app(|mut req: Request<Incoming>| async move {
        assert_eq!(req.method(), http::Method::CONNECT);
        assert_eq!(
            req.uri().authority().map(|a| a.as_str()),
            Some("upstream.example:443")
        );
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = hyper_util::rt::TokioIo::new(up);
                let mut buf = [0u8; 4];
                if io.read_exact(&mut buf).await.is_ok() {
                    let _ = io.write_all(&buf).await;
                }
            }
        });
        Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
    })
    .await;
    let p = pair(app, Protocol::Detect).await;
    let mut c = h1(p.client.app_connect(p.dst).await).await;
    let req = Request::connect("upstream.example:443")
        .header("host", "upstream.example:443")
        .body(body(Bytes::new()))
        .expect("request");
    let resp = c.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let up = tokio::time::timeout(LONG, hyper::upgrade::on(resp))
        .await
        .expect("in time")
        .expect("tunnel");
    let mut io = hyper_util::rt::TokioIo::new(up);
    io.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    tokio::time::timeout(LONG, io.read_exact(&mut buf))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(&buf, b"ping");
}

#[tokio::test]
async fn inbound_access_policy_denies_with_403_and_allows_listed_callers() {
    init();
    let ca = TestCa::new("ca");
    let app = echo_app().await;
    let svc = service(
        "echo",
        cluster_ip(1),
        80,
        app.port(),
        Protocol::Http1,
        vec![meshed(SERVER_POD_IP, SERVER_ID)],
    );
    let mut server_cfg = config(1, MtlsMode::Strict, vec![]);
    server_cfg.inbound.policies = vec![weft_proxy_config::AccessPolicy {
        name: "only-web-on-api".into(),
        selector: [("app".to_owned(), "echo".to_owned())].into(),
        ports: vec![],
        action: weft_proxy_config::AccessAction::Allow,
        audit: false,
        rules: vec![weft_proxy_config::AccessRule {
            from: vec![weft_proxy_config::AccessSource {
                identities: vec![CLIENT_ID.into()],
                ..Default::default()
            }],
            to: vec![weft_proxy_config::AccessDestination {
                paths: vec!["/api/*".into()],
                ..Default::default()
            }],
        }],
    }];
    server_cfg.seal();
    let server = Pod::start_with(&server_cfg, &ca.leaf(SERVER_ID, 3600), &ca, |s| {
        s.labels = [("app".to_owned(), "echo".to_owned())].into();
    })
    .await;
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
    for (path, want) in [
        ("/api/items", StatusCode::OK),
        ("/admin", StatusCode::FORBIDDEN),
    ] {
        let req = Request::get(path)
            .header("host", "echo")
            .body(body(""))
            .expect("request");
        let (status, headers, text) = read_text(c.send_request(req).await.expect("resp")).await;
        assert_eq!(status, want, "{path}: {text}");
        if want == StatusCode::FORBIDDEN {
            assert_eq!(
                headers.get("x-weft-error").map(|v| v.as_bytes()),
                Some(&b"denied"[..])
            );
            assert!(
                text.contains(CLIENT_ID) && text.contains("only-web-on-api"),
                "{text}"
            );
        }
    }
}

#[tokio::test]
async fn shutdown_stops_accepting_and_lets_in_flight_requests_finish() {
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let (arrived_tx, mut arrived_rx) = tokio::sync::mpsc::channel::<()>(1);
    let app = spawn_app(move |_req: Request<Incoming>| {
        let mut release = release_rx.clone();
        let arrived = arrived_tx.clone();
        async move {
            let _ = arrived.send(()).await;
            let _ = release.wait_for(|r| *r).await;
            Response::new(
                Full::new(Bytes::from_static(b"done"))
                    .map_err(|e| match e {})
                    .boxed(),
            )
        }
    })
    .await;
    let p = pair(app, Protocol::Http1).await;
    let mut c = h1(p.client.app_connect(p.dst).await).await;
    let req = Request::get("/slow")
        .header("host", "echo")
        .body(body(""))
        .expect("request");
    let in_flight = tokio::spawn(c.send_request(req));
    tokio::time::timeout(LONG, arrived_rx.recv())
        .await
        .expect("request reached the app");

    p.client.proxy.state.begin_shutdown();
    let outbound = p.client.proxy.outbound_addr;
    let mut refused = false;
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(outbound).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the outbound listener closes on shutdown");
    assert!(!p.client.proxy.state.is_ready());

    release_tx.send_replace(true);
    let resp = tokio::time::timeout(LONG, in_flight)
        .await
        .expect("in time")
        .expect("task")
        .expect("the in-flight request completes");
    // Its connection does not stay open for another request.
    assert_eq!(
        resp.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    let (status, _, text) = read_text(resp).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "done"));
}

/// An app that counts the requests it sees and those whose body arrived whole.
async fn counting_app() -> (
    SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let seen = Arc::new(AtomicUsize::new(0));
    let whole = Arc::new(AtomicUsize::new(0));
    let (s, w) = (seen.clone(), whole.clone());
    let app = spawn_app(move |req: Request<Incoming>| {
        let (s, w) = (s.clone(), w.clone());
        async move {
            s.fetch_add(1, Ordering::SeqCst);
            let head = req.headers().len();
            let n = match req.into_body().collect().await {
                Ok(b) => {
                    w.fetch_add(1, Ordering::SeqCst);
                    b.to_bytes().len()
                }
                Err(_) => 0,
            };
            Response::new(
                Full::new(Bytes::from(format!("headers: {head}, body-bytes: {n}\n")))
                    .map_err(|e| match e {})
                    .boxed(),
            )
        }
    })
    .await;
    (app, seen, whole)
}

/// Writes `bytes` on `s` and reads until the proxy closes the connection.
async fn exchange(s: &mut tokio::net::TcpStream, bytes: &[u8]) -> String {
    let _ = s.write_all(bytes).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(LONG, s.read_to_end(&mut buf))
        .await
        .expect("the proxy answers and closes the connection");
    String::from_utf8_lossy(&buf).into_owned()
}

/// Requests an app writes back to back on one connection, with bodies of
/// both framings, come back answered in order; a request that expects
/// `100 Continue` gets it before it sends its body. Through both proxies.
#[tokio::test]
async fn pipelined_requests_and_expect_continue_cross_the_pair_on_one_app_connection() {
    let (app, _seen, whole) = counting_app().await;
    let p = pair(app, Protocol::Detect).await;
    let mut s = p.client.app_connect(p.dst).await;
    let text = exchange(
        &mut s,
        b"GET /1 HTTP/1.1\r\nhost: echo\r\n\r\n\
          POST /2 HTTP/1.1\r\nhost: echo\r\ncontent-length: 5\r\n\r\nhello\
          POST /3 HTTP/1.1\r\nhost: echo\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n\
          GET /4 HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n",
    )
    .await;
    let bodies: Vec<&str> = text
        .match_indices("body-bytes: ")
        .map(|(i, _)| text[i..].lines().next().unwrap_or(""))
        .collect();
    assert_eq!(
        bodies,
        [
            "body-bytes: 0",
            "body-bytes: 5",
            "body-bytes: 7",
            "body-bytes: 0"
        ],
        "{text}"
    );
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 4, "{text}");
    assert_eq!(whole.load(std::sync::atomic::Ordering::SeqCst), 4);

    let mut s = p.client.app_connect(p.dst).await;
    s.write_all(
        b"PUT /5 HTTP/1.1\r\nhost: echo\r\nconnection: close\r\nexpect: 100-continue\r\ncontent-length: 4\r\n\r\n",
    )
    .await
    .expect("write");
    let mut got = Vec::new();
    let mut b = [0u8; 256];
    while !got.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(LONG, s.read(&mut b))
            .await
            .expect("an interim answer in time")
            .expect("read");
        assert!(n > 0, "closed before 100 Continue");
        got.extend_from_slice(&b[..n]);
    }
    assert_eq!(got, b"HTTP/1.1 100 Continue\r\n\r\n");
    let text = exchange(&mut s, b"data").await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("body-bytes: 4"), "{text}");
}

/// The client proxy answers a request whose framing two parsers could read
/// differently with 400 itself: the app never sees it.
#[tokio::test]
async fn requests_with_ambiguous_framing_are_refused_400_by_the_first_proxy() {
    use std::sync::atomic::Ordering;
    let (app, seen, whole) = counting_app().await;
    let p = pair(app, Protocol::Detect).await;
    let cases: [(&str, &[u8], bool); 4] = [
        (
            "Content-Length, then Transfer-Encoding",
            b"POST /a HTTP/1.1\r\nhost: echo\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            true,
        ),
        (
            "Transfer-Encoding, then Content-Length",
            b"POST /a HTTP/1.1\r\nhost: echo\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
            true,
        ),
        (
            "two different Content-Length values",
            b"POST /a HTTP/1.1\r\nhost: echo\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            false,
        ),
        (
            "a malformed chunk size",
            b"POST /a HTTP/1.1\r\nhost: echo\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            true,
        ),
    ];
    for (n, (what, request, named)) in cases.into_iter().enumerate() {
        // A good request first: the refusal is of the request, on an open
        // keep-alive connection.
        let mut s = p.client.app_connect(p.dst).await;
        let mut bytes = b"GET /ok HTTP/1.1\r\nhost: echo\r\n\r\n".to_vec();
        bytes.extend_from_slice(request);
        let text = exchange(&mut s, &bytes).await;
        let second = text
            .match_indices("HTTP/1.1 ")
            .nth(1)
            .map_or("", |(i, _)| &text[i..]);
        assert!(text.starts_with("HTTP/1.1 200"), "{what}: {text}");
        assert!(second.starts_with("HTTP/1.1 400"), "{what}: {text}");
        if named {
            assert!(
                second.contains("x-weft-error: bad-request"),
                "{what}: {text}"
            );
        }
        // The first request only reached the app whole.
        assert_eq!(whole.load(Ordering::SeqCst), n + 1, "{what}");
        if what != "a malformed chunk size" {
            assert_eq!(
                seen.load(Ordering::SeqCst),
                whole.load(Ordering::SeqCst),
                "{what}"
            );
        }
        eventually(what, || {
            p.client.errors(Direction::Outbound, "bad-request") == n as u64 + 1
        })
        .await;
    }
    assert_eq!(p.client.errors(Direction::Outbound, "upstream"), 0);
}

/// A request head over the limit is answered 431 by whichever proxy
/// receives it (the app's own on its way out, the server's for plaintext)
/// and never forwarded; one just under it is served.
#[tokio::test]
async fn request_heads_over_the_limit_get_431_and_under_it_are_served() {
    use std::sync::atomic::Ordering;
    let (app, seen, _) = counting_app().await;
    let p = pair_with_settings(
        app,
        Protocol::Detect,
        MtlsMode::Permissive,
        SERVER_ID,
        |_| {},
    )
    .await;
    let limit = weft_proxy::state::DEFAULT_MAX_HEADER_BYTES;
    let head = |value_len: usize| {
        let mut h = b"GET /big HTTP/1.1\r\nhost: echo\r\nx-big: ".to_vec();
        h.extend(std::iter::repeat_n(b'a', value_len));
        h.extend_from_slice(b"\r\nconnection: close\r\n\r\n");
        h
    };
    let over = head(200 * 1024);
    let mut s = p.client.app_connect(p.dst).await;
    let text = exchange(&mut s, &over).await;
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    eventually("outbound counts it", || {
        p.client.errors(Direction::Outbound, "header-too-large") == 1
    })
    .await;
    let mut s = p
        .server
        .inbound_stamps
        .connect(
            p.server.proxy.inbound_addr,
            SocketAddr::new(IpAddr::V4(SERVER_POD_IP), app.port()),
        )
        .await
        .expect("connect");
    let text = exchange(&mut s, &over).await;
    assert!(
        text.starts_with("HTTP/1.1 431"),
        "plaintext inbound: {text}"
    );
    eventually("inbound counts it", || {
        p.server.errors(Direction::Inbound, "header-too-large") == 1
    })
    .await;
    assert_eq!(seen.load(Ordering::SeqCst), 0, "the app never saw them");

    let under = head(limit - 512);
    assert!(under.len() < limit);
    let mut s = p.client.app_connect(p.dst).await;
    let text = exchange(&mut s, &under).await;
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(200)]
    );
    assert_eq!(seen.load(Ordering::SeqCst), 1);
}

/// HTTP/2 has the same limit on the decoded header list: 431, or, for a
/// list far over it, the connection closes.
#[tokio::test]
async fn http2_header_lists_over_the_limit_are_refused() {
    use std::sync::atomic::Ordering;
    let (app, seen, _) = counting_app().await;
    let p = pair(app, Protocol::Http2).await;
    for (kib, refused_431) in [(70, true), (200, false)] {
        let mut c = h2(p.client.app_connect(p.dst).await).await;
        let req = Request::get("http://echo/big")
            .header("x-big", "a".repeat(kib * 1024))
            .body(body(""))
            .expect("request");
        match c.send_request(req).await {
            Ok(resp) => assert_eq!(
                (resp.status(), refused_431),
                (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, true)
            ),
            Err(e) => assert!(!refused_431, "{kib} KiB: {e:?}"),
        }
    }
    assert_eq!(seen.load(Ordering::SeqCst), 0, "the app never saw them");
}

/// A request head not complete `header_read_timeout` after its first byte
/// closes the connection; an idle keep-alive connection stays open.
#[tokio::test]
async fn a_half_sent_request_head_is_closed_after_the_header_read_timeout() {
    let timeout = Duration::from_millis(300);
    let p = pair_with_settings(
        echo_app().await,
        Protocol::Http1,
        MtlsMode::Strict,
        SERVER_ID,
        |s| s.header_read_timeout = Some(timeout),
    )
    .await;
    let mut idle = h1(p.client.app_connect(p.dst).await).await;
    let get = || {
        Request::get("/")
            .header("host", "echo")
            .body(body(""))
            .expect("request")
    };
    let (status, _, _) = read_text(idle.send_request(get()).await.expect("response")).await;
    assert_eq!(status, StatusCode::OK);

    let mut half = p.client.app_connect(p.dst).await;
    half.write_all(b"GET /slow HTTP/1.1\r\nhost: echo\r\nx-more: ")
        .await
        .expect("write");
    let started = tokio::time::Instant::now();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(LONG, half.read_to_end(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert!(started.elapsed() >= timeout - Duration::from_millis(50));
    eventually("counted", || {
        p.client.errors(Direction::Outbound, "header-timeout") == 1
    })
    .await;

    // The idle connection outlived several timeouts and still serves.
    tokio::time::sleep(4 * timeout).await;
    let (status, _, _) = read_text(idle.send_request(get()).await.expect("response")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(p.client.errors(Direction::Outbound, "header-timeout"), 1);

    // On a keep-alive connection the deadline of a later head counts from
    // that head's first byte, not from the first request.
    let mut later = p.client.app_connect(p.dst).await;
    later
        .write_all(b"GET / HTTP/1.1\r\nhost: echo\r\n\r\n")
        .await
        .expect("write");
    let mut first = [0u8; 64];
    let n = tokio::time::timeout(LONG, later.read(&mut first))
        .await
        .expect("answered in time")
        .expect("read");
    assert!(first[..n].starts_with(b"HTTP/1.1 200"));
    tokio::time::sleep(2 * timeout).await;
    later
        .write_all(b"GET /slow HTTP/1.1\r\nhost: echo\r\nx-more: ")
        .await
        .expect("write");
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(LONG, later.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .expect("read");
    assert!(started.elapsed() >= timeout - Duration::from_millis(50));
    assert_eq!(p.client.errors(Direction::Outbound, "header-timeout"), 2);
}

/// The proxy process's resident memory, in KiB.
fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Opens `n` connections through `p`'s client proxy, each sending `head`
/// and no more; returns them and the RSS growth per connection, in bytes.
async fn hold_half_sent(p: &Pair, n: usize, head: &[u8]) -> (Vec<tokio::net::TcpStream>, u64) {
    let before = vm_rss_kib();
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = p.client.app_connect(p.dst).await;
        // A head over the limit may be refused before it is all written.
        let _ = s.write_all(head).await;
        conns.push(s);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let per = vm_rss_kib().saturating_sub(before) * 1024 / n as u64;
    (conns, per)
}

/// How many of `conns` the proxy closed (after an answer or none).
async fn closed(conns: &mut [tokio::net::TcpStream]) -> usize {
    let mut n = 0;
    for s in conns {
        let mut b = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_millis(10), s.read(&mut b)).await {
                Ok(Ok(0) | Err(_)) => {
                    n += 1;
                    break;
                }
                Ok(Ok(_)) => {}
                Err(_) => break,
            }
        }
    }
    n
}

/// Not a check but a measurement: what idle half-sent request heads cost
/// the client proxy (the RSS growth of this process, which runs it), and
/// that the limits end them.
/// `cargo test -p weft-proxy --test traffic -- --ignored --nocapture half_sent`
#[tokio::test]
#[ignore = "measurement, prints figures"]
async fn half_sent_request_heads_memory() {
    const N: usize = 1000;
    let timeout = Duration::from_secs(3);
    let p = pair_with_settings(
        echo_app().await,
        Protocol::Http1,
        MtlsMode::Strict,
        SERVER_ID,
        |s| s.header_read_timeout = Some(timeout),
    )
    .await;
    let mut warm = p.client.app_connect(p.dst).await;
    let _ = warm.write_all(b"GET / HTTP/1.1\r\nhost: echo\r\n").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let small = b"GET /slow HTTP/1.1\r\nhost: echo\r\nx-half: sent\r\n";
    let (mut conns, per) = hold_half_sent(&p, N, small).await;
    println!(
        "{N} half-sent heads of {} bytes: {per} bytes per connection",
        small.len()
    );
    tokio::time::sleep(timeout).await;
    println!(
        "  {} of {N} closed {timeout:?} later",
        closed(&mut conns).await
    );
    drop(conns);
    let (mut again, per) = hold_half_sent(&p, N, small).await;
    println!("  {N} more once those closed: {per} bytes per connection (memory reused)");
    tokio::time::sleep(timeout).await;
    println!(
        "  {} of {N} closed {timeout:?} later",
        closed(&mut again).await
    );
    drop(again);

    const BIG: usize = 100;
    let mut big = b"GET /big HTTP/1.1\r\nhost: echo\r\nx-big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 200 * 1024));
    let (mut conns, per) = hold_half_sent(&p, BIG, &big).await;
    println!(
        "{BIG} half-sent heads of {} bytes: {per} bytes per connection, {} of {BIG} closed at once",
        big.len(),
        closed(&mut conns).await
    );
}
