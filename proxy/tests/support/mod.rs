//! Shared fixtures of the component tests: a CA, configs, proxies started
//! in-process on loopback with stamped original destinations, and small
//! apps (HTTP/1, HTTP/2 with trailers, WebSocket-style upgrade, TCP echo,
//! server-first greeter).

#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_proxy::net::stamp::{StampTable, TestDialer};
use weft_proxy::test_util::{Leaf, MountDir, TestCa};
use weft_proxy::{Net, Proxy, Settings};
use weft_proxy_config::{
    ClientPolicy, Endpoint, HttpMatch, HttpRoute, Inbound, MeshSettings, MtlsMode, PathMatch,
    Protocol, ProxyConfig, Redirect, Service, ServicePort,
};

pub const TD: &str = "cluster.local";
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/shop/sa/echo";
/// Every meshed test endpoint listens "on" this pod IP.
pub const SERVER_POD_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub fn cluster_ip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 96, 0, n))
}

/// One Service with one port.
pub fn service(
    name: &str,
    ip: IpAddr,
    port: u16,
    target: u16,
    protocol: Protocol,
    endpoints: Vec<Endpoint>,
) -> Service {
    Service {
        name: name.into(),
        namespace: "shop".into(),
        cluster_ips: vec![ip],
        ports: vec![ServicePort {
            port,
            name: Some("p".into()),
            target_port: target,
            protocol,
        }],
        subsets: vec![],
        endpoints,
        http_routes: vec![],
        tcp_routes: vec![],
        policy: ClientPolicy::default(),
    }
}

/// A route named `name` that answers every request with a 301 to the same
/// URL over HTTPS.
pub fn https_redirect(name: &str) -> HttpRoute {
    HttpRoute {
        name: name.into(),
        matches: vec![HttpMatch {
            path: Some(PathMatch::Prefix("/".into())),
            ..Default::default()
        }],
        redirect: Some(Redirect {
            scheme: Some("https".into()),
            host: None,
            port: None,
            path: None,
            path_prefix: None,
            status: 301,
        }),
        ..Default::default()
    }
}

pub fn meshed(ip: Ipv4Addr, identity: &str) -> Endpoint {
    Endpoint {
        address: IpAddr::V4(ip),
        meshed: true,
        identity: Some(identity.into()),
        pod: None,
        subsets: vec![],
        ports: Default::default(),
        terminating: false,
        workload: None,
        app: None,
        version: None,
    }
}

pub fn plain(ip: Ipv4Addr) -> Endpoint {
    Endpoint {
        address: IpAddr::V4(ip),
        meshed: false,
        identity: None,
        pod: None,
        subsets: vec![],
        ports: Default::default(),
        terminating: false,
        workload: None,
        app: None,
        version: None,
    }
}

pub fn config(generation: u64, mode: MtlsMode, services: Vec<Service>) -> ProxyConfig {
    let mut c = ProxyConfig {
        gateway: None,
        version: 1,
        generation,
        hash: String::new(),
        namespace: "shop".into(),
        mesh: MeshSettings {
            trust_domain: TD.into(),
            mtls_mode: mode,
            default_access: Default::default(),
            access_log: false,
            access_log_options: Default::default(),
            tracing: None,
            escaped_slashes: Default::default(),
            metrics_naming: Default::default(),
        },
        services: services.into_iter().map(std::sync::Arc::new).collect(),
        inbound: Inbound::default(),
    };
    c.seal();
    c
}

/// The files of one mount generation.
pub fn files(cfg: &ProxyConfig, leaf: &Leaf, ca: &TestCa) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("proxy.json", cfg.to_json()),
        ("tls.crt", leaf.cert_pem.clone().into_bytes()),
        ("tls.key", leaf.key_pem.clone().into_bytes()),
        ("ca.crt", ca.cert_pem.clone().into_bytes()),
        ("proxy.json.sig", ca.sign_config(cfg)),
    ]
}

pub fn publish(mount: &MountDir, files: &[(&'static str, Vec<u8>)]) {
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    mount.publish(&refs);
}

/// A proxy started in-process, with its mount and stamp tables.
pub struct Pod {
    pub proxy: Proxy,
    pub mount: MountDir,
    pub outbound_stamps: StampTable,
    pub inbound_stamps: StampTable,
    pub dialer: TestDialer,
}

impl Pod {
    pub async fn start(cfg: &ProxyConfig, leaf: &Leaf, ca: &TestCa) -> Pod {
        Self::start_with(cfg, leaf, ca, |_| {}).await
    }

    pub async fn start_with(
        cfg: &ProxyConfig,
        leaf: &Leaf,
        ca: &TestCa,
        tweak: impl FnOnce(&mut Settings),
    ) -> Pod {
        let mount = MountDir::new();
        publish(&mount, &files(cfg, leaf, ca));
        let outbound_stamps = StampTable::default();
        let inbound_stamps = StampTable::default();
        let dialer = TestDialer::default();
        let mut settings =
            Settings::new(mount.path().to_path_buf()).ephemeral(IpAddr::V4(Ipv4Addr::LOCALHOST));
        settings.detect_timeout = Duration::from_millis(500);
        settings.connect_timeout = Duration::from_secs(5);
        settings.drain_timeout = Duration::from_secs(5);
        tweak(&mut settings);
        let net = Net {
            outbound_orig_dst: Arc::new(outbound_stamps.clone()),
            inbound_orig_dst: Arc::new(inbound_stamps.clone()),
            dialer: Arc::new(dialer.clone()),
        };
        let proxy = weft_proxy::start(settings, net)
            .await
            .expect("proxy starts");
        Pod {
            proxy,
            mount,
            outbound_stamps,
            inbound_stamps,
            dialer,
        }
    }

    /// A connection from the app, addressed to `dst`, captured by this proxy.
    pub async fn app_connect(&self, dst: SocketAddr) -> TcpStream {
        self.outbound_stamps
            .connect(self.proxy.outbound_addr, dst)
            .await
            .expect("connect to outbound listener")
    }

    /// Routes this proxy's connections to `endpoint` into `server`'s inbound listener.
    pub fn route_to(&self, endpoint: SocketAddr, server: &Pod) {
        self.dialer
            .route(endpoint, server.proxy.inbound_addr, &server.inbound_stamps);
    }

    pub fn generation(&self) -> u64 {
        self.proxy
            .state
            .snapshot
            .load()
            .as_ref()
            .map_or(0, |s| s.config.generation)
    }

    pub fn errors(&self, direction: weft_proxy::metrics::Direction, step: &str) -> u64 {
        self.proxy
            .state
            .metrics
            .errors
            .get_or_create(&weft_proxy::metrics::ErrorLabels {
                direction,
                step: step.into(),
            })
            .get()
    }

    pub fn rejected(&self, reason: &'static str) -> u64 {
        self.proxy
            .state
            .metrics
            .config_rejected
            .get_or_create(&weft_proxy::metrics::RejectLabels { reason })
            .get()
    }

    pub fn reloads(&self, ok: bool) -> u64 {
        self.proxy
            .state
            .metrics
            .reloads
            .get_or_create(&weft_proxy::metrics::ReloadLabels {
                result: if ok { "ok" } else { "rejected" }.into(),
            })
            .get()
    }
}

/// Connections `server`'s inbound listener took over mTLS.
pub fn inbound_mtls_connections(server: &Pod) -> u64 {
    server
        .proxy
        .state
        .metrics
        .connections
        .get_or_create(&weft_proxy::metrics::ConnLabels {
            direction: weft_proxy::metrics::Direction::Inbound,
            tls: true,
        })
        .get()
}

/// Polls `cond` until true; panics with `what` after a generous bound.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

pub type TestBody = BoxBody<Bytes, Infallible>;

pub fn body(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).boxed()
}

/// Spawns an HTTP app (HTTP/1 and HTTP/2 via auto) on 127.0.0.1.
pub async fn spawn_app<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<BoxBody<Bytes, hyper::Error>>> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let h = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let h = h.clone();
                    async move { Ok::<_, Infallible>(h(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// An app answering with a description of the request it received.
pub async fn echo_app() -> SocketAddr {
    spawn_app(|req: Request<Incoming>| async move {
        let mut desc = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
        for (k, v) in req.headers() {
            desc.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
        }
        let n = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes().len())
            .unwrap_or(0);
        desc.push_str(&format!("body-bytes: {n}\n"));
        Response::new(Full::new(Bytes::from(desc)).map_err(|e| match e {}).boxed())
    })
    .await
}

/// A plain TCP echo server.
pub async fn tcp_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A server that speaks first.
pub async fn greeter(greeting: &'static [u8]) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(greeting).await;
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
            });
        }
    });
    addr
}

/// HTTP/1.1 client over an established connection.
pub async fn h1(io: TcpStream) -> hyper::client::conn::http1::SendRequest<TestBody> {
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn.with_upgrades());
    send
}

/// HTTP/2 prior-knowledge client over an established connection.
pub async fn h2(io: TcpStream) -> hyper::client::conn::http2::SendRequest<TestBody> {
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    send
}

pub async fn read_text(resp: Response<Incoming>) -> (StatusCode, http::HeaderMap, String) {
    let status = resp.status();
    let headers = resp.headers().clone();
    let b = resp.into_body().collect().await.expect("body").to_bytes();
    (status, headers, String::from_utf8_lossy(&b).into_owned())
}

/// A streaming request body fed from a channel.
pub fn channel_body() -> (tokio::sync::mpsc::Sender<Bytes>, TestBody) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    (tx, ChannelBody(rx).boxed())
}

/// Body frames from a channel; ends when the sender drops.
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}
