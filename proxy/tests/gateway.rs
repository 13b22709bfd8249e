//! Component tests of the ingress gateway on loopback: a proxy whose config
//! has a `gateway` section terminates TLS with the certificate the client's
//! SNI picks (two certificates on one port), routes by host, and forwards
//! over mTLS to a backend proxy, which sees the gateway's SPIFFE identity;
//! certificates follow the files; unrouted hosts get 404. A TLS passthrough
//! listener routes by SNI alone and hands the backend the client's own
//! handshake, inside mTLS.
//!
//! ```text
//! test client ──TLS (SNI a|b.example.com)──► gateway :P ──route by host──► cart ──mTLS──► server proxy ──► app
//! test client ──HTTP──► gateway :Q (redirect to https)
//! test client ──TLS (SNI vault.example.com)──► gateway :T ──SNI──► vault ──mTLS──► server proxy ──► TLS app
//! ```

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use support::*;
use tokio::net::{TcpListener, TcpStream};
use weft_proxy::metrics::Direction;
use weft_proxy::test_util::{Leaf, TestCa};
use weft_proxy_config::{
    Backend, Gateway, HttpMatch, HttpRoute, Listener, ListenerProtocol, MtlsMode, PathMatch,
    Protocol, ProxyConfig, Service, ServicePort, TcpRoute, VirtualHost,
};

const GATEWAY_ID: &str = "spiffe://cluster.local/ns/shop/sa/weft-gateway-public";

/// A free port for a listener the config names, which the proxy binds
/// later. Taken outside the kernel's ephemeral range (32768-60999 by
/// default: what binding port 0 and every outgoing connection get), so the
/// tests running in parallel cannot take it meanwhile; a new one per call.
fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 5_000) as u16;
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = base + n % 10_000;
        if std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok() {
            return port;
        }
    }
}

/// An app answering `<name> host=<host> peer=<identity> proto=<xfp> vhost=<x-vhost>`.
async fn app(name: &'static str) -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind app");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    let h = |n: &str| {
                        req.headers()
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_owned()
                    };
                    let text = format!(
                        "{name} host={} peer={} proto={} vhost={} path={}",
                        h("host"),
                        h("x-weft-peer-identity"),
                        h("x-forwarded-proto"),
                        h("x-vhost"),
                        req.uri().path()
                    );
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(text))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    port
}

/// An app that terminates TLS itself with `leaf` and answers each line
/// `<line>` with `vault:<line>`.
async fn tls_app(leaf: &Leaf) -> u16 {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let certs = vec![CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).expect("pem")];
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key pem");
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind tls app");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let (r, mut w) = tokio::io::split(tls);
                let mut lines = tokio::io::BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if w.write_all(format!("vault:{line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// A Service made for one listener and host name: no addresses, the
/// listener's port, the routes.
fn vhost_service(name: &str, port: u16, routes: Vec<HttpRoute>) -> Service {
    Service {
        name: name.into(),
        namespace: "shop".into(),
        cluster_ips: vec![],
        ports: vec![ServicePort {
            port,
            name: None,
            target_port: port,
            protocol: Protocol::Http1,
        }],
        subsets: vec![],
        endpoints: vec![],
        http_routes: routes,
        tcp_routes: vec![],
        policy: Default::default(),
    }
}

fn to_cart(name: &str) -> HttpRoute {
    HttpRoute {
        name: name.into(),
        matches: vec![HttpMatch {
            path: Some(PathMatch::Prefix("/".into())),
            ..Default::default()
        }],
        backends: vec![Backend {
            service: "shop/cart".into(),
            subset: None,
            port: Some(80),
            weight: 1,
        }],
        ..Default::default()
    }
}

struct Fixture {
    gateway: Pod,
    gateway_leaf: Leaf,
    mesh_ca: TestCa,
    _server: Pod,
    certs: tempfile::TempDir,
    web_ca: TestCa,
    https: u16,
    http: u16,
    passthrough: u16,
}

fn write_cert(dir: &std::path::Path, name: &str, leaf: &Leaf) {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).expect("cert dir");
    std::fs::write(d.join("tls.crt"), &leaf.cert_pem).expect("crt");
    std::fs::write(d.join("tls.key"), &leaf.key_pem).expect("key");
}

async fn fixture() -> Fixture {
    init();
    let mesh_ca = TestCa::new("weft test CA");
    let web_ca = TestCa::new("public web CA");
    let certs = tempfile::tempdir().expect("tempdir");
    write_cert(
        certs.path(),
        "a-cert",
        &web_ca.server_leaf(&["a.example.com"]),
    );
    write_cert(
        certs.path(),
        "b-cert",
        &web_ca.server_leaf(&["b.example.com"]),
    );

    let app_port = app("cart").await;
    let server = Pod::start(
        &config(1, MtlsMode::Strict, vec![]),
        &mesh_ca.leaf(SERVER_ID, 3600),
        &mesh_ca,
    )
    .await;
    let cart_ip = Ipv4Addr::new(10, 244, 0, 9);
    let mut ep = meshed(cart_ip, SERVER_ID);
    ep.ports = [("p".to_owned(), app_port)].into();
    let cart = service(
        "cart",
        cluster_ip(1),
        80,
        app_port,
        Protocol::Http1,
        vec![ep],
    );

    // Behind the passthrough listener: an app with its own certificate,
    // which the gateway never holds.
    let vault_port = tls_app(&web_ca.server_leaf(&["vault.example.com"])).await;
    let vault_ip = Ipv4Addr::new(10, 244, 0, 10);
    let mut vault_ep = meshed(vault_ip, SERVER_ID);
    vault_ep.ports = [("p".to_owned(), vault_port)].into();
    let vault = service(
        "vault",
        cluster_ip(2),
        443,
        vault_port,
        Protocol::Opaque,
        vec![vault_ep],
    );

    let (https, http, passthrough) = (free_port(), free_port(), free_port());
    let mut vault_host = vhost_service("public.tls", passthrough, vec![]);
    vault_host.ports[0].protocol = Protocol::Opaque;
    vault_host.tcp_routes = vec![TcpRoute {
        name: "public/vault".into(),
        port: None,
        backends: vec![Backend {
            service: "shop/vault".into(),
            subset: None,
            port: Some(443),
            weight: 1,
        }],
    }];
    let mut b_route = to_cart("public/b");
    b_route.request_headers.set = vec![("x-vhost".into(), "b".into())];
    let moved = https_redirect("public/moved");
    let mut cfg = config(
        1,
        MtlsMode::Strict,
        vec![
            cart,
            vhost_service("public.https.a", https, vec![to_cart("public/a")]),
            vhost_service("public.https.b", https, vec![b_route]),
            vhost_service("public.http", http, vec![moved]),
            vault,
            vault_host,
        ],
    );
    cfg.gateway = Some(Gateway {
        name: "shop/public".into(),
        listeners: vec![
            Listener {
                name: "https".into(),
                port: https,
                protocol: ListenerProtocol::Https,
                hostname: None,
                certificates: vec!["a-cert".into(), "b-cert".into()],
                hosts: vec![
                    VirtualHost {
                        hostname: Some("a.example.com".into()),
                        service: "shop/public.https.a".into(),
                    },
                    VirtualHost {
                        hostname: Some("b.example.com".into()),
                        service: "shop/public.https.b".into(),
                    },
                ],
            },
            Listener {
                name: "http".into(),
                port: http,
                protocol: ListenerProtocol::Http,
                hostname: None,
                certificates: vec![],
                hosts: vec![VirtualHost {
                    hostname: None,
                    service: "shop/public.http".into(),
                }],
            },
            Listener {
                name: "tls".into(),
                port: passthrough,
                protocol: ListenerProtocol::Tls,
                hostname: None,
                certificates: vec![],
                hosts: vec![VirtualHost {
                    hostname: Some("vault.example.com".into()),
                    service: "shop/public.tls".into(),
                }],
            },
        ],
    });
    cfg.seal();
    cfg.validate().expect("gateway config validates");
    let cert_dir = certs.path().to_path_buf();
    let gateway_leaf = mesh_ca.leaf(GATEWAY_ID, 3600);
    let gateway = Pod::start_with(&cfg, &gateway_leaf, &mesh_ca, |s| {
        s.gateway_ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        s.gateway_cert_dir = cert_dir;
    })
    .await;
    gateway.route_to(SocketAddr::new(IpAddr::V4(cart_ip), app_port), &server);
    gateway.route_to(SocketAddr::new(IpAddr::V4(vault_ip), vault_port), &server);
    Fixture {
        gateway,
        gateway_leaf,
        mesh_ca,
        _server: server,
        certs,
        web_ca,
        https,
        http,
        passthrough,
    }
}

/// Connects to the gateway, retrying while its listener is being bound.
async fn connect(port: u16) -> TcpStream {
    for _ in 0..100 {
        if let Ok(s) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("gateway port {port} never listened");
}

/// A TLS handshake with SNI `sni` on gateway port `port`.
async fn handshake(
    f: &Fixture,
    port: u16,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(f.web_ca.cert_pem.as_bytes()).expect("pem"))
        .expect("root");
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = ServerName::try_from(sni.to_owned()).expect("server name");
    connector.connect(name, connect(port).await).await
}

/// A TLS handshake with SNI `sni`; the presented leaf's DNS names, and
/// the connection.
async fn tls(f: &Fixture, sni: &str) -> (Vec<String>, tokio_rustls::client::TlsStream<TcpStream>) {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(f.web_ca.cert_pem.as_bytes()).expect("pem"))
        .expect("root");
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = ServerName::try_from(sni.to_owned()).expect("server name");
    let s = connector
        .connect(name, connect(f.https).await)
        .await
        .expect("handshake verifies against the web CA for the SNI");
    let leaf = s.get_ref().1.peer_certificates().expect("certs")[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).expect("x509");
    let names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    (names, s)
}

async fn get<T>(io: T, host: &str, path: &str) -> (StatusCode, http::HeaderMap, String)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get(path)
                .header("host", host)
                .body(body(""))
                .expect("request"),
        )
        .await
        .expect("response");
    read_text(resp).await
}

#[tokio::test]
async fn sni_picks_the_certificate_and_host_routes_over_mtls() {
    let f = fixture().await;

    let (names, s) = tls(&f, "a.example.com").await;
    assert_eq!(names, ["a.example.com"]);
    let (status, _, text) = get(s, "a.example.com", "/items").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(text.starts_with("cart host=a.example.com"), "{text}");
    assert!(
        text.contains(&format!("peer={GATEWAY_ID}")),
        "the backend sees the gateway's identity: {text}"
    );
    assert!(text.contains("proto=https"), "{text}");
    assert!(text.contains("vhost=-"), "{text}");

    let (names, s) = tls(&f, "b.example.com").await;
    assert_eq!(names, ["b.example.com"]);
    let (status, _, text) = get(s, "b.example.com", "/").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(text.contains("vhost=b"), "b's routes apply: {text}");

    // A host no listener routes: 404, never forwarded.
    let (_, s) = tls(&f, "a.example.com").await;
    let (status, headers, _) = get(s, "c.example.com", "/").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        headers.get("x-weft-error").and_then(|v| v.to_str().ok()),
        Some("no-route")
    );
    assert!(f.gateway.errors(Direction::Inbound, "gateway-no-route") >= 1);

    // The plaintext listener redirects to HTTPS.
    let (status, headers, _) = get(connect(f.http).await, "a.example.com", "/x?y=1").await;
    assert_eq!(status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(
        headers.get("location").and_then(|v| v.to_str().ok()),
        Some("https://a.example.com/x?y=1")
    );
}

#[tokio::test]
async fn a_renewed_certificate_is_served_and_a_broken_one_is_not() {
    let f = fixture().await;
    let (names, _) = tls(&f, "a.example.com").await;
    assert_eq!(names, ["a.example.com"]);

    // Renewed with another name as kubelet would write it: served after
    // the store looks again (within about a second).
    write_cert(
        f.certs.path(),
        "a-cert",
        &f.web_ca
            .server_leaf(&["a.example.com", "www.a.example.com"]),
    );
    let mut seen = Vec::new();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen = tls(&f, "a.example.com").await.0;
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen, ["a.example.com", "www.a.example.com"]);

    // Half-written: the last good certificate stays, and it is counted.
    std::fs::write(f.certs.path().join("a-cert/tls.crt"), "-----BEGIN CERT").expect("write");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (names, s) = tls(&f, "a.example.com").await;
    assert_eq!(names, ["a.example.com", "www.a.example.com"]);
    let (status, _, _) = get(s, "a.example.com", "/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(f.gateway.errors(Direction::Inbound, "gateway-certificate") >= 1);
}

#[tokio::test]
async fn a_reload_closes_listeners_the_config_drops() {
    let f = fixture().await;
    let (_, s) = tls(&f, "a.example.com").await;
    assert_eq!(get(s, "a.example.com", "/").await.0, StatusCode::OK);
    // The same document without its gateway section: its ports close.
    let mut cfg: ProxyConfig = f
        .gateway
        .proxy
        .state
        .snapshot
        .load_full()
        .expect("snapshot")
        .config
        .clone();
    cfg.gateway = None;
    cfg.generation = 2;
    cfg.seal();
    publish(&f.gateway.mount, &files(&cfg, &f.gateway_leaf, &f.mesh_ca));
    eventually("generation 2 is active", || f.gateway.generation() == 2).await;
    let mut closed = false;
    for _ in 0..100 {
        if TcpStream::connect((Ipv4Addr::LOCALHOST, f.https))
            .await
            .is_err()
        {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(closed, "the HTTPS port no longer listens");
}

#[tokio::test]
async fn a_passthrough_listener_routes_by_sni_and_leaves_tls_to_the_backend() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let f = fixture().await;

    // The client's handshake reaches the app: the certificate it verifies
    // is the app's (vault.example.com), which the gateway does not have.
    let s = handshake(&f, f.passthrough, "vault.example.com")
        .await
        .expect("the app's certificate verifies for vault.example.com");
    let leaf = s.get_ref().1.peer_certificates().expect("certs")[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).expect("x509");
    let sans = format!("{:?}", cert.subject_alternative_name());
    assert!(sans.contains("vault.example.com"), "{sans}");
    let (r, mut w) = tokio::io::split(s);
    let mut lines = tokio::io::BufReader::new(r).lines();
    for msg in ["one", "two"] {
        w.write_all(format!("{msg}\n").as_bytes())
            .await
            .expect("write");
        let got = lines.next_line().await.expect("read").expect("a line");
        assert_eq!(got, format!("vault:{msg}"));
    }
    drop(w);

    // The backend Service's TCP series counts the connection, sent over
    // mTLS with the gateway's identity.
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &f.gateway.proxy.state.metrics.registry())
        .expect("encode");
    assert!(
        text.lines()
            .any(|l| l.starts_with("weft_tcp_connections_opened_total{")
                && l.contains("destination_service=\"vault.shop\"")
                && l.contains(&format!("source_principal=\"{GATEWAY_ID}\""))
                && l.contains("connection_security=\"mutual_tls\"")
                && l.ends_with("} 1")),
        "no TCP series for vault:\n{text}"
    );

    // An SNI that no host of the listener routes: the connection is
    // closed without an answer, and counted.
    assert!(
        handshake(&f, f.passthrough, "other.example.com")
            .await
            .is_err()
    );
    assert!(f.gateway.errors(Direction::Inbound, "gateway-no-route") >= 1);

    // Not TLS at all: closed, counted.
    let mut plain = connect(f.passthrough).await;
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: vault.example.com\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 16];
    let n = tokio::io::AsyncReadExt::read(&mut plain, &mut buf)
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert!(f.gateway.errors(Direction::Inbound, "gateway-tls") >= 1);
}
