//! Reload from the mount: kubelet's atomic `..data` swap applies a new
//! config and new certificates; bad snapshots are rejected while the last
//! good one keeps serving; reloads under load fail no request.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use http::{Request, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_proxy::test_util::{TestCa, sign_with};
use weft_proxy_config::{MtlsMode, Protocol, ProxyConfig, Service};

struct World {
    ca: TestCa,
    client: Pod,
    server: Pod,
    app: SocketAddr,
    echo_tcp: SocketAddr,
}

fn services(app: SocketAddr, echo_tcp: SocketAddr, extra: bool) -> Vec<Service> {
    let mut v = vec![
        service(
            "echo",
            cluster_ip(1),
            80,
            app.port(),
            Protocol::Detect,
            vec![meshed(SERVER_POD_IP, SERVER_ID)],
        ),
        service(
            "tcp",
            cluster_ip(2),
            9000,
            echo_tcp.port(),
            Protocol::Opaque,
            vec![meshed(SERVER_POD_IP, SERVER_ID)],
        ),
    ];
    if extra {
        v.push(service(
            "new",
            cluster_ip(3),
            80,
            app.port(),
            Protocol::Http1,
            vec![meshed(SERVER_POD_IP, SERVER_ID)],
        ));
    }
    v
}

async fn world() -> World {
    init();
    let ca = TestCa::new("ca");
    let app = echo_app().await;
    let echo_tcp = tcp_echo().await;
    let server = Pod::start(
        &config(1, MtlsMode::Strict, vec![]),
        &ca.leaf(SERVER_ID, 3600),
        &ca,
    )
    .await;
    let client = Pod::start(
        &config(1, MtlsMode::Strict, services(app, echo_tcp, false)),
        &ca.leaf(CLIENT_ID, 3600),
        &ca,
    )
    .await;
    for port in [app.port(), echo_tcp.port()] {
        client.route_to(SocketAddr::new(IpAddr::V4(SERVER_POD_IP), port), &server);
    }
    World {
        ca,
        client,
        server,
        app,
        echo_tcp,
    }
}

async fn get(w: &World, ip: IpAddr) -> (StatusCode, String) {
    let mut c = h1(w.client.app_connect(SocketAddr::new(ip, 80)).await).await;
    let req = Request::get("/r")
        .header("host", "echo")
        .body(body(""))
        .expect("request");
    match c.send_request(req).await {
        Ok(r) => {
            let (s, _, t) = read_text(r).await;
            (s, t)
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[tokio::test]
async fn atomic_swap_applies_new_config_and_certificates_and_open_connections_live_on() {
    let w = world().await;
    // Before generation 2 the `new` Service is unknown: its ClusterIP passes
    // through untouched (here to a sentinel app), without mTLS.
    let sentinel = spawn_app(|_req: http::Request<hyper::body::Incoming>| async move {
        use http_body_util::BodyExt;
        http::Response::new(
            http_body_util::Full::new(bytes::Bytes::from_static(b"sentinel"))
                .map_err(|e| match e {})
                .boxed(),
        )
    })
    .await;
    w.client.dialer.route(
        SocketAddr::new(cluster_ip(3), 80),
        sentinel,
        &Default::default(),
    );
    let (s, t) = get(&w, cluster_ip(3)).await;
    assert_eq!((s, t.as_str()), (StatusCode::OK, "sentinel"));
    // An open opaque connection from before the swap.
    let mut open = w
        .client
        .app_connect(SocketAddr::new(cluster_ip(2), 9000))
        .await;
    open.write_all(b"before").await.expect("write");
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).await.expect("read");

    let old_expiry = w
        .client
        .proxy
        .state
        .snapshot
        .load()
        .as_ref()
        .map(|s| s.identity.not_after());
    let cfg2 = config(2, MtlsMode::Strict, services(w.app, w.echo_tcp, true));
    publish(
        &w.client.mount,
        &files(&cfg2, &w.ca.leaf(CLIENT_ID, 7200), &w.ca),
    );
    eventually("generation 2 active", || w.client.generation() == 2).await;
    let new_expiry = w
        .client
        .proxy
        .state
        .snapshot
        .load()
        .as_ref()
        .map(|s| s.identity.not_after());
    assert_ne!(old_expiry, new_expiry, "the new certificate is active");
    assert_eq!(w.client.reloads(true), 2);
    // The new Service routes; the old one still does.
    let (s, t) = get(&w, cluster_ip(3)).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    assert!(t.contains(CLIENT_ID), "now routed through the mesh: {t}");
    assert_eq!(get(&w, cluster_ip(1)).await.0, StatusCode::OK);
    // The connection opened before the swap is untouched.
    open.write_all(b"after!").await.expect("write");
    open.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"after!");
    let _ = &w.server;
}

#[tokio::test]
async fn bad_snapshots_are_rejected_and_the_last_good_one_keeps_serving() {
    let w = world().await;
    let good = config(1, MtlsMode::Strict, services(w.app, w.echo_tcp, false));
    let leaf = w.ca.leaf(CLIENT_ID, 3600);

    let mut truncated = files(
        &config(2, MtlsMode::Strict, services(w.app, w.echo_tcp, true)),
        &leaf,
        &w.ca,
    );
    let json = truncated[0].1.clone();
    truncated[0].1 = json[..json.len() / 2].to_vec();

    let mut invalid_cfg: ProxyConfig =
        config(3, MtlsMode::Strict, services(w.app, w.echo_tcp, true));
    invalid_cfg.services.push(invalid_cfg.services[0].clone());
    invalid_cfg.seal();
    let invalid = files(&invalid_cfg, &leaf, &w.ca);

    let mut tampered = files(
        &config(4, MtlsMode::Strict, services(w.app, w.echo_tcp, true)),
        &leaf,
        &w.ca,
    );
    let s = String::from_utf8(tampered[0].1.clone())
        .expect("utf8")
        .replace("\"generation\":4", "\"generation\":5");
    tampered[0].1 = s.into_bytes();

    let mut half_written = files(
        &config(6, MtlsMode::Strict, services(w.app, w.echo_tcp, true)),
        &leaf,
        &w.ca,
    );
    half_written.retain(|(n, _)| *n != "tls.key");

    let expired = files(
        &config(7, MtlsMode::Strict, services(w.app, w.echo_tcp, true)),
        &w.ca.leaf(CLIENT_ID, -60),
        &w.ca,
    );

    let foreign_ca = TestCa::new("foreign");
    let foreign = files(
        &config(8, MtlsMode::Strict, services(w.app, w.echo_tcp, true)),
        &foreign_ca.leaf(CLIENT_ID, 3600),
        &w.ca,
    );

    let mut wrong_key = files(
        &config(9, MtlsMode::Strict, services(w.app, w.echo_tcp, true)),
        &leaf,
        &w.ca,
    );
    wrong_key[2].1 = w.ca.leaf(CLIENT_ID, 3600).key_pem.into_bytes();

    let cases = [
        ("truncated JSON", truncated),
        ("invalid config", invalid),
        ("hash mismatch", tampered),
        ("half-written dir (no tls.key)", half_written),
        ("expired certificate", expired),
        ("certificate from a foreign CA", foreign),
        ("key of another certificate", wrong_key),
    ];
    for (i, (what, bad)) in cases.iter().enumerate() {
        publish(&w.client.mount, bad);
        let want = i as u64 + 1;
        eventually(what, || w.client.reloads(false) == want).await;
        assert_eq!(
            w.client.generation(),
            1,
            "{what}: the last good snapshot stays active"
        );
        let (s, t) = get(&w, cluster_ip(1)).await;
        assert_eq!(s, StatusCode::OK, "{what}: traffic keeps flowing: {t}");
    }
    // A good snapshot after all that is taken.
    let mut next = good.clone();
    next.generation = 10;
    next.seal();
    publish(&w.client.mount, &files(&next, &leaf, &w.ca));
    eventually("recovered", || w.client.generation() == 10).await;
}

/// A document the operator did not sign is never run, however valid: the
/// last good snapshot keeps serving, and `weft_proxy_config_rejected_total`
/// names the reason.
#[tokio::test]
async fn a_config_the_operator_did_not_sign_is_refused_and_the_last_good_one_keeps_serving() {
    let w = world().await;
    let leaf = w.ca.leaf(CLIENT_ID, 3600);
    // What every forgery wants: the Service `new` (cluster IP 3) routed.
    let forged = |generation| {
        config(
            generation,
            MtlsMode::Strict,
            services(w.app, w.echo_tcp, true),
        )
    };
    let with_sig = |cfg: &ProxyConfig, sig: Vec<u8>| {
        let mut f = files(cfg, &leaf, &w.ca);
        match sig.is_empty() {
            true => f.retain(|(n, _)| *n != "proxy.json.sig"),
            false => f.last_mut().expect("sig").1 = sig,
        }
        f
    };
    let td = |path: &str| format!("spiffe://{TD}{path}");

    // A valid document with no signature: a hand-written ConfigMap.
    let unsigned = with_sig(&forged(2), Vec::new());
    // An edited document carrying the signature of the one it replaced.
    let signed = forged(3);
    let mut edited = forged(3);
    std::sync::Arc::make_mut(&mut edited.services[2]).cluster_ips = vec![cluster_ip(4)];
    edited.seal();
    let replayed_sig = with_sig(&edited, w.ca.sign_config(&signed));
    // Signed by a workload's certificate (serverAuth/clientAuth, a workload
    // ID) of the same CA: anyone holding an identity Secret.
    let (wk, wc) = w.ca.signer_leaf(CLIENT_ID, false);
    let f4 = forged(4);
    let by_workload = with_sig(&f4, sign_with(&wk, &wc, &f4.namespace, &f4.hash));
    // codeSigning, but another SPIFFE ID than the config signer's.
    let (ok, oc) = w.ca.signer_leaf(&td("/weft/not-the-signer"), true);
    let f5 = forged(5);
    let other_id = with_sig(&f5, sign_with(&ok, &oc, &f5.namespace, &f5.hash));
    // The config signer's ID, from a CA the proxy does not trust.
    let foreign = TestCa::new("foreign");
    let f6 = forged(6);
    let foreign_sig = with_sig(&f6, foreign.sign_config(&f6));
    // The right signer, one signature byte changed.
    let f7 = forged(7);
    let mut sig7: serde_json::Value =
        serde_json::from_slice(&w.ca.sign_config(&f7)).expect("sig json");
    let hex = sig7["signature"].as_str().expect("hex").to_owned();
    let flipped = if hex.ends_with('0') { "1" } else { "0" };
    sig7["signature"] = format!("{}{flipped}", &hex[..hex.len() - 1]).into();
    let bad_sig = with_sig(&f7, serde_json::to_vec(&sig7).expect("json"));
    // Another namespace's document, properly signed for that namespace.
    let mut elsewhere = forged(8);
    elsewhere.namespace = "billing".into();
    elsewhere.seal();
    let moved = with_sig(&elsewhere, w.ca.sign_config(&elsewhere));
    // Junk.
    let junk = with_sig(&forged(9), b"{\"version\":1".to_vec());

    let cases = [
        ("unsigned", unsigned, "unsigned"),
        ("edited after signing", replayed_sig, "other-document"),
        (
            "signed by a workload identity",
            by_workload,
            "untrusted-signer",
        ),
        (
            "signed by another codeSigning ID",
            other_id,
            "untrusted-signer",
        ),
        ("signed under a foreign CA", foreign_sig, "untrusted-signer"),
        ("signature bytes changed", bad_sig, "bad-signature"),
        ("another namespace's document", moved, "foreign-namespace"),
        ("truncated signature file", junk, "malformed"),
    ];
    for (i, (what, bad, reason)) in cases.iter().enumerate() {
        let before = w.client.rejected(reason);
        publish(&w.client.mount, bad);
        let want = i as u64 + 1;
        eventually(what, || w.client.reloads(false) == want).await;
        assert_eq!(
            w.client.rejected(reason),
            before + 1,
            "{what}: counted as {reason}"
        );
        assert_eq!(
            w.client.generation(),
            1,
            "{what}: the last good snapshot stays active"
        );
        assert_eq!(get(&w, cluster_ip(1)).await.0, StatusCode::OK, "{what}");
        let (s, t) = get(&w, cluster_ip(3)).await;
        assert_ne!(
            s,
            StatusCode::OK,
            "{what}: the forged route is not taken: {t}"
        );
    }
    // The same document, signed by the operator's signer, is taken.
    let good = forged(10);
    publish(&w.client.mount, &files(&good, &leaf, &w.ca));
    eventually("signed", || w.client.generation() == 10).await;
    let (s, t) = get(&w, cluster_ip(3)).await;
    assert_eq!(s, StatusCode::OK, "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_continuous_load_fail_zero_requests() {
    let w = Arc::new(world().await);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (w, stop, ok, failed) = (w.clone(), stop.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // A new client connection every 20 requests.
                let mut c = h1(w
                    .client
                    .app_connect(SocketAddr::new(cluster_ip(1), 80))
                    .await)
                .await;
                for _ in 0..20 {
                    let req = Request::post("/load")
                        .header("host", "echo")
                        .body(body("x".repeat(512)))
                        .expect("req");
                    match c.send_request(req).await {
                        Ok(r) if r.status() == StatusCode::OK => {
                            let _ = read_text(r).await;
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => {
                            let (s, _, t) = read_text(r).await;
                            eprintln!("failed request: {s} {t}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("failed request: {e}");
                            failed.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            }
        }));
    }
    for g in 2..=6u64 {
        eventually("traffic flowing", || ok.load(Ordering::Relaxed) >= g * 50).await;
        let cfg = config(g, MtlsMode::Strict, services(w.app, w.echo_tcp, g % 2 == 0));
        publish(
            &w.client.mount,
            &files(&cfg, &w.ca.leaf(CLIENT_ID, 3600 + g as i64), &w.ca),
        );
        publish(
            &w.server.mount,
            &files(
                &config(g, MtlsMode::Strict, vec![]),
                &w.ca.leaf(SERVER_ID, 3600 + g as i64),
                &w.ca,
            ),
        );
        eventually("client reloaded", || w.client.generation() == g).await;
        eventually("server reloaded", || w.server.generation() == g).await;
    }
    let before = ok.load(Ordering::Relaxed);
    eventually("traffic after the last reload", || {
        ok.load(Ordering::Relaxed) >= before + 100
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in workers {
        t.await.expect("worker");
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("requests ok={ok} failed={failed} across 5 reloads of both proxies");
    assert_eq!(failed, 0);
    assert!(ok > 0);
}

/// Connections `pod`'s inbound listener accepted over mTLS (a counter).
fn inbound_mtls_accepted(pod: &Pod) -> u64 {
    pod.proxy
        .state
        .metrics
        .connections
        .get_or_create(&weft_proxy::metrics::ConnLabels {
            direction: weft_proxy::metrics::Direction::Inbound,
            tls: true,
        })
        .get()
}

/// A plaintext connection captured by `server`'s inbound listener,
/// addressed to its pod's `port`.
async fn plaintext_to(server: &Pod, port: u16) -> tokio::net::TcpStream {
    server
        .inbound_stamps
        .connect(
            server.proxy.inbound_addr,
            SocketAddr::new(IpAddr::V4(SERVER_POD_IP), port),
        )
        .await
        .expect("connect inbound")
}

/// A plaintext HTTP/1 connection to `server`'s pod `port`, after one GET
/// on it was answered 200.
async fn served_plaintext_http(
    server: &Pod,
    port: u16,
) -> hyper::client::conn::http1::SendRequest<TestBody> {
    let mut http = h1(plaintext_to(server, port).await).await;
    let req = Request::get("/")
        .header("host", "echo")
        .body(body(""))
        .expect("request");
    let (status, _, _) = read_text(http.send_request(req).await.expect("response")).await;
    assert_eq!(status, StatusCode::OK);
    http
}

/// Reads until the peer closes (EOF or reset); panics if it stays open.
async fn expect_closed(s: &mut tokio::net::TcpStream, what: &str) {
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let mut buf = [0u8; 64];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "{what} is still open");
}

#[tokio::test]
async fn a_new_deny_applies_to_open_connections_at_their_next_request_and_closes_denied_tunnels() {
    use weft_proxy_config::{
        AccessAction, AccessDestination, AccessPolicy, AccessRule, AccessSource,
    };
    let w = world().await;
    // One keep-alive app connection, so every request rides the same
    // pooled proxy-to-proxy connection.
    let mut c = h1(w
        .client
        .app_connect(SocketAddr::new(cluster_ip(1), 80))
        .await)
    .await;
    let mut send = async |path: &str| {
        let req = Request::get(path)
            .header("host", "echo")
            .body(body(""))
            .expect("request");
        let (s, h, t) = read_text(c.send_request(req).await.expect("response")).await;
        (s, h.get("x-weft-error").cloned(), t)
    };
    assert_eq!(send("/api/admin").await.0, StatusCode::OK);
    let mut tunnel = w
        .client
        .app_connect(SocketAddr::new(cluster_ip(2), 9000))
        .await;
    tunnel.write_all(b"before").await.expect("write");
    let mut buf = [0u8; 6];
    tunnel.read_exact(&mut buf).await.expect("read");
    let accepted = inbound_mtls_accepted(&w.server);
    assert_eq!(accepted, 2, "one pooled HTTP connection and one tunnel");

    let mut cfg = config(2, MtlsMode::Strict, vec![]);
    cfg.inbound.policies = vec![
        AccessPolicy {
            name: "no-admin".into(),
            selector: Default::default(),
            ports: vec![w.app.port()],
            action: AccessAction::Deny,
            audit: false,
            rules: vec![AccessRule {
                from: vec![],
                to: vec![AccessDestination {
                    paths: vec!["/api/admin".into()],
                    ..Default::default()
                }],
            }],
        },
        AccessPolicy {
            name: "no-web-on-tcp".into(),
            selector: Default::default(),
            ports: vec![w.echo_tcp.port()],
            action: AccessAction::Deny,
            audit: false,
            rules: vec![AccessRule {
                from: vec![AccessSource {
                    identities: vec![CLIENT_ID.into()],
                    ..Default::default()
                }],
                to: vec![],
            }],
        },
    ];
    cfg.seal();
    publish(
        &w.server.mount,
        &files(&cfg, &w.ca.leaf(SERVER_ID, 3600), &w.ca),
    );
    eventually("the server runs generation 2", || {
        w.server.generation() == 2
    })
    .await;

    // The next request on the open connection is decided on the new policy.
    let (status, step, text) = send("/api/admin").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
    assert_eq!(step.as_ref().map(|v| v.as_bytes()), Some(&b"denied"[..]));
    assert_eq!(send("/api/other").await.0, StatusCode::OK);
    assert_eq!(
        inbound_mtls_accepted(&w.server),
        accepted,
        "the requests after the reload rode the connection opened before it"
    );
    // The tunnel the new policy denies is closed.
    expect_closed(&mut tunnel, "the denied tunnel").await;
    assert_eq!(
        w.server
            .errors(weft_proxy::metrics::Direction::Inbound, "revoked"),
        1
    );
}

#[tokio::test]
async fn open_plaintext_connections_close_when_the_mode_turns_strict() {
    init();
    let ca = TestCa::new("ca");
    let app = echo_app().await;
    let echo_tcp = tcp_echo().await;
    let server = Pod::start(
        &config(1, MtlsMode::Permissive, vec![]),
        &ca.leaf(SERVER_ID, 3600),
        &ca,
    )
    .await;
    let http = served_plaintext_http(&server, app.port()).await;
    let mut tcp = plaintext_to(&server, echo_tcp.port()).await;
    tcp.write_all(b"hello!").await.expect("write");
    let mut buf = [0u8; 6];
    tcp.read_exact(&mut buf).await.expect("read");

    let strict = config(2, MtlsMode::Strict, vec![]);
    publish(
        &server.mount,
        &files(&strict, &ca.leaf(SERVER_ID, 3600), &ca),
    );
    eventually("the server runs generation 2", || server.generation() == 2).await;
    expect_closed(&mut tcp, "the plaintext tunnel").await;
    eventually("the plaintext HTTP connection closes", || http.is_closed()).await;
    assert_eq!(
        server.errors(weft_proxy::metrics::Direction::Inbound, "revoked"),
        2
    );
}

#[tokio::test]
async fn an_mtls_override_makes_one_port_of_one_workload_permissive() {
    use weft_proxy_config::{MtlsOverride, PortMtls, Selector};
    init();
    let ca = TestCa::new("ca");
    let app = echo_app().await;
    let echo_tcp = tcp_echo().await;
    let echo = Selector::from([("app".to_owned(), "echo".to_owned())]);
    let with_override = |generation, selector: &Selector| {
        let mut c = config(generation, MtlsMode::Strict, vec![]);
        c.inbound.mtls = vec![MtlsOverride {
            name: "legacy-http".into(),
            selector: selector.clone(),
            mode: None,
            ports: vec![PortMtls {
                port: app.port(),
                mode: MtlsMode::Permissive,
            }],
        }];
        c.seal();
        c
    };
    let server = Pod::start_with(
        &with_override(1, &echo),
        &ca.leaf(SERVER_ID, 3600),
        &ca,
        |s| s.labels = echo.clone(),
    )
    .await;
    // The overridden port serves plaintext; another port of the same pod
    // stays Strict.
    let http = served_plaintext_http(&server, app.port()).await;
    let mut tcp = plaintext_to(&server, echo_tcp.port()).await;
    let _ = tcp.write_all(b"hello!").await;
    expect_closed(&mut tcp, "plaintext to a Strict port").await;
    assert_eq!(
        server.errors(weft_proxy::metrics::Direction::Inbound, "plaintext-refused"),
        1
    );
    // An override for other pods does not apply here: the port is Strict
    // again and the open plaintext connection closes.
    let other = Selector::from([("app".to_owned(), "legacy".to_owned())]);
    publish(
        &server.mount,
        &files(&with_override(2, &other), &ca.leaf(SERVER_ID, 3600), &ca),
    );
    eventually("the server runs generation 2", || server.generation() == 2).await;
    eventually("the plaintext HTTP connection closes", || http.is_closed()).await;
}
