//! What an idle client connection costs the proxy on its server side.
//!
//! Every HTTP/1 connection a proxy serves (the app's outbound ones, plaintext
//! inbound ones under Permissive, an ingress gateway's: the last two here)
//! may sit idle between
//! requests, often by the thousand. The proxy's HTTP/1 server holds only the
//! socket and the connection's context while it waits; the request buffers
//! live as long as a request. A server that keeps its read and write
//! buffers (hyper's: 16 KiB and more per connection) fails the bound below.
//!
//! The whole process is counted (this binary's global allocator): the test
//! client's sockets, the proxy, the app. The app's side does not grow with
//! the client connections (the proxy pools its connections to the app),
//! nor does the client's beyond its sockets.

mod support;

use std::alloc::System;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use stats_alloc::StatsAlloc;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_proxy::test_util::TestCa;
use weft_proxy_config::{Gateway, Listener, ListenerProtocol, MtlsMode, Protocol, VirtualHost};

#[global_allocator]
static HEAP: StatsAlloc<System> = StatsAlloc::system();

/// Connections held idle at once.
const CONNS: usize = 200;
/// Heap held per idle connection, whole process, at most. With weft's
/// server: 1,366 bytes inbound (the connection's task, both sockets'
/// registrations, the context, the end signals, a metric series slot), 980
/// on a gateway; with hyper's HTTP/1 server: 21,778 and 25,120.
const BOUND: i64 = 4 * 1024;

/// The process's heap is counted whole: one test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Bytes allocated and not freed so far in this process.
fn held() -> i64 {
    let s = HEAP.stats();
    // A reallocation's growth is counted in `bytes_allocated` too.
    s.bytes_allocated as i64 - s.bytes_deallocated as i64
}

/// Sends one GET on `c` and reads its whole response (`content-length`
/// framed, as the echo app and the gateway's redirects answer), which
/// must have `status`.
async fn get(c: &mut TcpStream, status: &str) {
    c.write_all(b"GET /idle HTTP/1.1\r\nhost: echo\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = c.read(&mut chunk).await.expect("read");
        assert!(n > 0, "closed before a whole response");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        let Some(end) = text.find("\r\n\r\n") else {
            continue;
        };
        let head = text[..end].to_ascii_lowercase();
        assert!(head.starts_with(&format!("http/1.1 {status}")), "{text}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("content-length");
        if buf.len() >= end + 4 + length {
            return;
        }
    }
}

/// Heap held per idle connection: `CONNS` connections from `open`, each
/// sent one GET answered `status`, held open; after a few requests on a
/// connection of their own have paid what is paid once (pooled upstream
/// connections, metric series, the runtime's slabs). The first
/// connection is asked again at the end: still served.
async fn held_per_idle_connection<F, Fut>(open: F, status: &str) -> i64
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = TcpStream>,
{
    let mut warm = open().await;
    for _ in 0..3 {
        get(&mut warm, status).await;
    }
    drop(warm);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let before = held();
    let mut conns = Vec::with_capacity(CONNS);
    for _ in 0..CONNS {
        let mut c = open().await;
        get(&mut c, status).await;
        conns.push(c);
    }
    // Each connection's server reaches its idle state.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let per = (held() - before) / CONNS as i64;
    get(&mut conns[0], status).await;
    per
}

#[tokio::test(flavor = "current_thread")]
async fn an_idle_plaintext_inbound_connection_holds_no_request_buffers() {
    let _serial = SERIAL.lock().await;
    init();
    let ca = TestCa::new("ca");
    let app = echo_app().await;
    let mut cfg = config(1, MtlsMode::Permissive, vec![]);
    cfg.seal();
    let pod = Pod::start(&cfg, &ca.leaf(SERVER_ID, 3600), &ca).await;
    let dst = SocketAddr::new(IpAddr::V4(SERVER_POD_IP), app.port());
    let open = || async {
        pod.inbound_stamps
            .connect(pod.proxy.inbound_addr, dst)
            .await
            .expect("connect inbound")
    };
    let per = held_per_idle_connection(open, "200").await;
    assert!(
        per < BOUND,
        "{per} bytes held per idle inbound connection (at most {BOUND})"
    );
}

/// An ingress gateway's plaintext listener, whose one route redirects
/// every request to HTTPS (answered by the gateway itself): the same bound.
#[tokio::test(flavor = "current_thread")]
async fn an_idle_gateway_connection_holds_no_request_buffers() {
    let _serial = SERIAL.lock().await;
    init();
    let ca = TestCa::new("ca");
    // A free port outside the ephemeral range, for the listener the
    // config names.
    let port = (20_000 + (std::process::id() % 5_000) as u16..30_000)
        .find(|p| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, *p)).is_ok())
        .expect("a free port");
    let moved = https_redirect("public/moved");
    let mut public = service(
        "public.http",
        IpAddr::V4(Ipv4Addr::new(10, 96, 9, 9)),
        port,
        port,
        Protocol::Http1,
        vec![],
    );
    public.cluster_ips = vec![];
    public.http_routes = vec![moved];
    let mut cfg = config(1, MtlsMode::Strict, vec![public]);
    cfg.gateway = Some(Gateway {
        name: "shop/public".into(),
        listeners: vec![Listener {
            name: "http".into(),
            port,
            protocol: ListenerProtocol::Http,
            hostname: None,
            certificates: vec![],
            hosts: vec![VirtualHost {
                hostname: None,
                service: "shop/public.http".into(),
            }],
        }],
    });
    cfg.seal();
    cfg.validate().expect("gateway config validates");
    let leaf = ca.leaf(
        "spiffe://cluster.local/ns/shop/sa/weft-gateway-public",
        3600,
    );
    let _gateway = Pod::start_with(&cfg, &leaf, &ca, |s| {
        s.gateway_ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    })
    .await;
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    let open = || async {
        // The listener is bound once the gateway's config is loaded.
        for _ in 0..200 {
            if let Ok(c) = TcpStream::connect(addr).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the gateway's listener on {addr} never accepted");
    };
    let per = held_per_idle_connection(open, "301").await;
    assert!(
        per < BOUND,
        "{per} bytes held per idle gateway connection (at most {BOUND})"
    );
}

/// Heap held per parked app connection, whole process, at most: the test
/// client's own socket (its registration in the test's runtime, about 300
/// bytes) and what the proxy keeps of a parked connection (its closure
/// and slot, about 150). Unparked, the proxy's share alone is about 800.
const PARKED_BOUND: i64 = 640;

fn outbound_open(state: &weft_proxy::state::State) -> i64 {
    state
        .metrics
        .connections_open
        .get_or_create(&weft_proxy::metrics::ConnLabels {
            direction: weft_proxy::metrics::Direction::Outbound,
            tls: false,
        })
        .get()
}

/// A client proxy that parks idle connections after `after`, with one
/// HTTP/1 Service, `echo` at 10.96.0.`n`:80, whose endpoint is an echo app.
struct Parking {
    pod: Pod,
    dst: SocketAddr,
    app: SocketAddr,
    echo: weft_proxy_config::Service,
    ca: TestCa,
    leaf: weft_proxy::test_util::Leaf,
}

impl Parking {
    async fn start(n: u8, after: Duration) -> Parking {
        init();
        let ca = TestCa::new("ca");
        let app = echo_app().await;
        let echo = service(
            "echo",
            cluster_ip(n),
            80,
            app.port(),
            Protocol::Http1,
            vec![plain(Ipv4Addr::LOCALHOST)],
        );
        let leaf = ca.leaf(CLIENT_ID, 3600);
        let cfg = config(1, MtlsMode::Strict, vec![echo.clone()]);
        let pod = Pod::start_with(&cfg, &leaf, &ca, |s| {
            s.park_idle_after = Some(after);
        })
        .await;
        let dst = SocketAddr::new(cluster_ip(n), 80);
        Parking {
            pod,
            dst,
            app,
            echo,
            ca,
            leaf,
        }
    }
}

/// Opens `n` app connections to `dst` through `pod`, each sent one GET
/// answered 200, and keeps them in `conns`.
async fn open_idle(pod: &Pod, dst: SocketAddr, n: usize, conns: &mut Vec<TcpStream>) {
    for _ in 0..n {
        let mut c = pod.app_connect(dst).await;
        get(&mut c, "200").await;
        conns.push(c);
    }
}

/// An app's idle HTTP/1 connections leave the proxy's runtime (`net::park`)
/// and hold little while parked; each is served again when its next
/// request comes, closed when the app closes it, and closed at shutdown,
/// counted open throughout and parked while parked.
#[tokio::test(flavor = "current_thread")]
async fn idle_app_connections_are_parked_served_again_and_closed() {
    let _serial = SERIAL.lock().await;
    let Parking { pod, dst, .. } = Parking::start(7, Duration::from_millis(50)).await;
    let state = pod.proxy.state.clone();
    let parked = || state.metrics.connections_parked.get();

    let mut warm = pod.app_connect(dst).await;
    for _ in 0..3 {
        get(&mut warm, "200").await;
    }
    drop(warm);
    eventually("the warm-up connection closed", || {
        outbound_open(&state) == 0
    })
    .await;
    let before = held();
    let mut conns = Vec::with_capacity(CONNS);
    open_idle(&pod, dst, CONNS, &mut conns).await;
    eventually("every idle connection parked", || parked() == CONNS as i64).await;
    let per = (held() - before) / CONNS as i64;
    eprintln!("{per} bytes held per parked app connection, whole process");
    assert!(
        per < PARKED_BOUND,
        "{per} bytes held per parked app connection (at most {PARKED_BOUND})"
    );
    assert_eq!(
        outbound_open(&state),
        CONNS as i64,
        "parked connections are open"
    );
    assert_eq!(state.parking.parked(), CONNS);

    // The next request resumes a parked connection, on the same socket.
    for c in conns.iter_mut().take(3) {
        tokio::time::timeout(Duration::from_secs(10), get(c, "200"))
            .await
            .expect("a parked connection served again");
    }
    assert_eq!(outbound_open(&state), CONNS as i64, "counted open once");
    eventually("the served connections parked again", || {
        parked() == CONNS as i64
    })
    .await;

    // The app closes half of them: each parked one wakes, sees the close
    // and ends.
    let kept = conns.split_off(CONNS / 2);
    drop(conns);
    eventually("closed connections left the lot", || {
        parked() == kept.len() as i64 && outbound_open(&state) == kept.len() as i64
    })
    .await;

    // Shutdown closes what is parked.
    tokio::time::timeout(Duration::from_secs(30), pod.proxy.drain())
        .await
        .expect("drained");
    for mut c in kept {
        let mut b = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut b))
            .await
            .expect("a parked connection is closed at shutdown")
            .unwrap_or(0);
        assert_eq!(n, 0, "nothing but the close");
    }
    assert_eq!(parked(), 0);
}

/// A few idle app connections stay in the runtime for the idle time; a
/// crowd of them (`net::park::CROWD`) parks within a quick tick or two,
/// long before it.
#[tokio::test(flavor = "current_thread")]
async fn a_crowd_of_idle_app_connections_parks_long_before_the_idle_time() {
    let _serial = SERIAL.lock().await;
    let Parking { pod, dst, .. } = Parking::start(9, Duration::from_secs(60)).await;
    let state = pod.proxy.state.clone();
    let parked = || state.metrics.connections_parked.get();
    let few = weft_proxy::net::park::CROWD / 2;
    let mut conns = Vec::with_capacity(CONNS);
    open_idle(&pod, dst, few, &mut conns).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(parked(), 0, "a few idle connections stay for the idle time");
    open_idle(&pod, dst, CONNS - few, &mut conns).await;
    // Idle 60 s before they would park; `eventually` gives up after 10.
    eventually("the crowd parked", || parked() == CONNS as i64).await;
    for c in conns.iter_mut().take(3) {
        timed_get(c).await;
    }
}

/// [`get`], answered 200 within 10 s.
async fn timed_get(c: &mut TcpStream) {
    tokio::time::timeout(Duration::from_secs(10), get(c, "200"))
        .await
        .expect("answered");
}

fn proxied_ok(state: &weft_proxy::state::State) -> u64 {
    state
        .metrics
        .requests
        .get_or_create(&weft_proxy::metrics::RequestLabels {
            direction: weft_proxy::metrics::Direction::Outbound,
            code: 200,
        })
        .get()
}

/// A parked connection keeps no snapshot alive. After a reload it is
/// served with the active snapshot; once the active one no longer has its
/// Service and its own snapshot is gone, it is passed through to where the
/// app sent it, as a new connection there would be.
#[tokio::test(flavor = "current_thread")]
async fn a_parked_connection_is_served_again_with_the_active_snapshot() {
    let _serial = SERIAL.lock().await;
    let Parking {
        pod,
        dst,
        app,
        echo,
        ca,
        leaf,
    } = Parking::start(8, Duration::from_millis(50)).await;
    let state = pod.proxy.state.clone();
    let parked = || state.metrics.connections_parked.get();

    let mut c = pod.app_connect(dst).await;
    timed_get(&mut c).await;
    eventually("the connection parked", || parked() == 1).await;
    let first = Arc::downgrade(&state.snapshot.load_full().expect("a snapshot"));

    publish(
        &pod.mount,
        &files(&config(2, MtlsMode::Strict, vec![echo]), &leaf, &ca),
    );
    eventually("generation 2 serves", || pod.generation() == 2).await;
    assert!(
        first.upgrade().is_none(),
        "the parked connection keeps its first snapshot alive"
    );
    let before = proxied_ok(&state);
    timed_get(&mut c).await;
    assert_eq!(proxied_ok(&state), before + 1, "served by the proxy again");
    eventually("parked again", || parked() == 1).await;

    // The Service goes; what the app sent is passed through (here routed
    // to the app itself: tests never leave loopback).
    pod.dialer
        .route(dst, app, &weft_proxy::net::stamp::StampTable::default());
    publish(
        &pod.mount,
        &files(&config(3, MtlsMode::Strict, vec![]), &leaf, &ca),
    );
    eventually("generation 3 serves", || pod.generation() == 3).await;
    let before = proxied_ok(&state);
    timed_get(&mut c).await;
    assert_eq!(proxied_ok(&state), before, "passed through, not proxied");
}
