//! The proxy's listeners on `0.0.0.0` are dual-stack (`net::bind_listener`):
//! IPv4 and IPv6 clients reach the same admin and inbound listeners, and
//! inbound connections over IPv6 are delivered to the app.

mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use http::{Request, StatusCode};
use support::*;
use tokio::net::TcpStream;
use weft_proxy::test_util::TestCa;
use weft_proxy_config::MtlsMode;

#[tokio::test]
async fn unspecified_listeners_accept_ipv4_and_ipv6() {
    init();
    let ca = TestCa::new("ca");
    let app = echo_app().await;
    let pod = Pod::start_with(
        &config(1, MtlsMode::Permissive, vec![]),
        &ca.leaf(SERVER_ID, 3600),
        &ca,
        |s| *s = s.clone().ephemeral(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
    )
    .await;
    assert!(
        pod.proxy.admin_addr.is_ipv6() && pod.proxy.admin_addr.ip().is_unspecified(),
        "0.0.0.0 binds [::] dual-stack, got {}",
        pod.proxy.admin_addr
    );
    for ip in [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ] {
        // Admin over both families.
        let s = TcpStream::connect((ip, pod.proxy.admin_addr.port()))
            .await
            .unwrap_or_else(|e| panic!("admin over {ip}: {e}"));
        let mut c = h1(s).await;
        let req = Request::get("/live")
            .header("host", "weft")
            .body(body(""))
            .expect("request");
        let (status, _, _) = read_text(c.send_request(req).await.expect("live")).await;
        assert_eq!(status, StatusCode::OK, "/live over {ip}");

        // Inbound over both families, delivered to the app on loopback.
        let listener = SocketAddr::new(ip, pod.proxy.inbound_addr.port());
        let s = pod
            .inbound_stamps
            .connect(listener, SocketAddr::new(ip, app.port()))
            .await
            .expect("inbound");
        let mut c = h1(s).await;
        let req = Request::get("/over")
            .header("host", "echo")
            .body(body(""))
            .expect("request");
        let (status, _, text) = read_text(c.send_request(req).await.expect("resp")).await;
        assert_eq!(status, StatusCode::OK, "inbound over {ip}: {text}");
        assert!(text.starts_with("GET /over"), "{text}");
    }
}
