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
    let server = Pod::start(&server_cfg, &ca.leaf(SERVER_ID, 3600), &ca).await;
    let client = Pod::start(&client_cfg, &ca.leaf(CLIENT_ID, 3600), &ca).await;
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

/// Connections `server`'s inbound listener took over mTLS.
fn inbound_mtls_connections(server: &Pod) -> u64 {
    server
        .proxy
        .state
        .metrics
        .connections
        .get_or_create(&weft_proxy::metrics::ConnLabels {
            direction: Direction::Inbound,
            tls: true,
        })
        .get()
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
    let (status, _, text) = read_text(resp).await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "done"));
}
