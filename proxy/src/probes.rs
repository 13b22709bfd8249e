//! The app's original probes, run by the proxy for the kubelet at
//! `GET /app-health/<container>/<livez|readyz|startupz>` on the admin port
//! (the injector rewrites app probes to that path, since under strict mTLS
//! a plaintext probe to the app port would be refused).
//!
//! Format (env `WEFT_APP_PROBES`, written by the injector, see
//! injector/README.md):
//! `{"version":1,"containers":{"app":{"readyz":{"http":{"port":8080,"path":"/healthz","scheme":"HTTP"},"timeoutSeconds":1}}}}`
//! with one of `http` (port, path, scheme, host?, headers?), `tcp` (port,
//! host?) or `grpc` (port, service?). They run with the kubelet's semantics:
//! `host` absent means the app (loopback here, the pod IP for the kubelet);
//! HTTP and HTTPS `GET` (HTTPS without certificate verification), the
//! probe's headers (`Host` sets the request host), same-host redirects
//! followed, 200–399 passes; TCP connect; gRPC `Health/Check` = SERVING.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

/// Every container's recorded probes.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppProbes {
    /// Format version (1).
    #[serde(default)]
    pub version: u32,
    /// Container name → probes.
    #[serde(default)]
    pub containers: BTreeMap<String, ContainerProbes>,
}

/// One container's probes.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ContainerProbes {
    /// Liveness.
    pub livez: Option<AppProbe>,
    /// Readiness.
    pub readyz: Option<AppProbe>,
    /// Startup.
    pub startupz: Option<AppProbe>,
}

/// One check.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppProbe {
    /// What to check.
    #[serde(flatten)]
    pub action: ProbeAction,
    /// Seconds the check may take.
    #[serde(default = "one")]
    pub timeout_seconds: u32,
}

fn one() -> u32 {
    1
}

/// The check.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProbeAction {
    /// HTTP GET, success 200–399.
    Http {
        /// App port.
        port: u16,
        /// Path and query.
        #[serde(default = "root")]
        path: String,
        /// `HTTP` or `HTTPS` (TLS without certificate verification).
        #[serde(default)]
        scheme: String,
        /// Host header / address; absent: loopback.
        #[serde(default)]
        host: Option<String>,
        /// Extra headers.
        #[serde(default)]
        headers: Vec<ProbeHeader>,
    },
    /// TCP connect.
    Tcp {
        /// App port.
        port: u16,
        /// Host; absent: loopback.
        #[serde(default)]
        host: Option<String>,
    },
    /// gRPC health (`grpc.health.v1.Health/Check`, plaintext HTTP/2).
    Grpc {
        /// App port.
        port: u16,
        /// Service name.
        #[serde(default)]
        service: Option<String>,
    },
}

/// A header of an HTTP probe.
#[derive(Clone, Debug, Deserialize)]
pub struct ProbeHeader {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

fn root() -> String {
    "/".into()
}

impl AppProbes {
    /// Parses the env var's JSON.
    pub fn parse(json: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(json)
    }

    /// The probe for `container` and `kind` (`livez`, `readyz`, `startupz`).
    pub fn get(&self, container: &str, kind: &str) -> Option<&AppProbe> {
        let c = self.containers.get(container)?;
        match kind {
            "livez" => c.livez.as_ref(),
            "readyz" => c.readyz.as_ref(),
            "startupz" => c.startupz.as_ref(),
            _ => None,
        }
    }
}

/// Runs a probe against the app at `host` (the probe's own `host`, when
/// recorded, wins, as for the kubelet); `Err` says why it failed.
pub async fn run(probe: &AppProbe, host: IpAddr) -> Result<(), String> {
    let deadline = Duration::from_secs(u64::from(probe.timeout_seconds.max(1)));
    match tokio::time::timeout(deadline, run_inner(&probe.action, host)).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {deadline:?}")),
    }
}

/// The kubelet's probe user agent (overridable by a probe header).
const USER_AGENT: &str = "kube-probe/weft";
/// Redirects followed, as the kubelet's HTTP client does.
const MAX_REDIRECTS: usize = 10;

async fn run_inner(action: &ProbeAction, host: IpAddr) -> Result<(), String> {
    match action {
        ProbeAction::Tcp {
            port,
            host: probe_host,
        } => {
            let addr = resolve(probe_host.as_deref(), host, *port).await?;
            tokio::net::TcpStream::connect(addr)
                .await
                .map(|_| ())
                .map_err(|e| format!("tcp connect to {addr}: {e}"))
        }
        ProbeAction::Http {
            port,
            path,
            scheme,
            host: probe_host,
            headers,
        } => {
            let tls = if scheme.is_empty() || scheme.eq_ignore_ascii_case("http") {
                false
            } else if scheme.eq_ignore_ascii_case("https") {
                true
            } else {
                return Err(format!("unknown probe scheme {scheme:?} (HTTP or HTTPS)"));
            };
            let target = Target {
                tls,
                host: probe_host
                    .clone()
                    .unwrap_or_else(|| url_host(&host.to_string())),
                port: *port,
                path: path.clone(),
            };
            http_probe(target, probe_host.is_none().then_some(host), headers).await
        }
        ProbeAction::Grpc { port, service } => {
            grpc_check(host, *port, service.as_deref().unwrap_or("")).await
        }
    }
}

/// The address to dial: the probe's host (an IP or a name to resolve), else
/// the app host.
async fn resolve(probe_host: Option<&str>, app: IpAddr, port: u16) -> Result<SocketAddr, String> {
    match probe_host {
        None => Ok(SocketAddr::new(app, port)),
        Some(h) => resolve_host(h, port).await,
    }
}

async fn resolve_host(h: &str, port: u16) -> Result<SocketAddr, String> {
    let bare = h.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    tokio::net::lookup_host((bare, port))
        .await
        .map_err(|e| format!("cannot resolve probe host {h:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("probe host {h:?} has no address"))
}

/// An IP as it appears in a URL authority (`[v6]`).
fn url_host(h: &str) -> String {
    if h.contains(':') && !h.starts_with('[') {
        format!("[{h}]")
    } else {
        h.to_owned()
    }
}

/// Where one HTTP probe request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Target {
    tls: bool,
    /// URL host: the probe's host, or the app IP.
    host: String,
    port: u16,
    /// Path and query.
    path: String,
}

/// kubelet's `httpGet`: GET with the probe's headers (a `Host` header sets
/// the request's host), `User-Agent: kube-probe/…` and `Accept: */*` unless
/// given; HTTPS without certificate verification; redirects to the same
/// host followed (up to 10), a redirect elsewhere counts as success; success
/// is a final status of 200–399.
async fn http_probe(
    mut target: Target,
    app: Option<IpAddr>,
    headers: &[ProbeHeader],
) -> Result<(), String> {
    for _ in 0..=MAX_REDIRECTS {
        let (code, location) = http_get(&target, app, headers).await?;
        let redirect = matches!(code, 301 | 302 | 303 | 307 | 308);
        match location.filter(|_| redirect) {
            Some(loc) => match follow(&target, &loc) {
                Some(next) => target = next,
                None => {
                    tracing::info!(from = %target.path, to = %loc, "probe redirected to another host; counted as success, as the kubelet does");
                    return Ok(());
                }
            },
            None if (200..400).contains(&code) => return Ok(()),
            None => {
                return Err(format!(
                    "HTTP probe {} on port {} returned {code}",
                    target.path, target.port
                ));
            }
        }
    }
    Err(format!(
        "HTTP probe {} on port {}: more than {MAX_REDIRECTS} redirects",
        target.path, target.port
    ))
}

/// The next target of a redirect, or `None` when it leaves the host.
fn follow(from: &Target, location: &str) -> Option<Target> {
    let absolute = location.starts_with("http://") || location.starts_with("https://");
    if location.starts_with("//") {
        // Scheme-relative: another authority, same scheme.
        let scheme = if from.tls { "https:" } else { "http:" };
        return follow(from, &format!("{scheme}{location}"));
    }
    if !absolute {
        let path = if location.starts_with('/') {
            location.to_owned()
        } else {
            // Relative to the current path's directory.
            let dir = from.path.rsplit_once('/').map_or("", |(d, _)| d);
            format!("{dir}/{location}")
        };
        return Some(Target {
            path,
            ..from.clone()
        });
    }
    let uri: http::Uri = location.parse().ok()?;
    let tls = uri.scheme_str() == Some("https");
    let host = url_host(uri.host()?);
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    if !host.eq_ignore_ascii_case(&from.host) {
        return None;
    }
    Some(Target {
        tls,
        host,
        port,
        path: uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
    })
}

/// One GET; returns the status and the `Location` header.
async fn http_get(
    t: &Target,
    app: Option<IpAddr>,
    headers: &[ProbeHeader],
) -> Result<(u16, Option<String>), String> {
    let addr = match app {
        Some(ip) => SocketAddr::new(ip, t.port),
        None => resolve_host(&t.host, t.port).await?,
    };
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let mut req = http::Request::get(t.path.as_str());
    {
        let h = req.headers_mut().expect("a fresh builder has no error");
        let authority = format!("{}:{}", t.host, t.port);
        let mut set = |name: http::HeaderName, value: &str| {
            if let Ok(v) = http::HeaderValue::from_str(value) {
                h.insert(name, v);
            }
        };
        set(http::header::HOST, &authority);
        set(http::header::USER_AGENT, USER_AGENT);
        set(http::header::ACCEPT, "*/*");
        set(http::header::CONNECTION, "close");
        let mut given = std::collections::HashSet::new();
        for ph in headers {
            let name = http::HeaderName::from_bytes(ph.name.as_bytes())
                .map_err(|e| format!("probe header {:?}: {e}", ph.name))?;
            let value = http::HeaderValue::from_str(&ph.value)
                .map_err(|e| format!("probe header {:?}: {e}", ph.name))?;
            // The probe's headers replace the defaults; repeated names add up.
            if given.insert(name.clone()) {
                h.insert(name, value);
            } else {
                h.append(name, value);
            }
        }
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    if t.tls {
        let server_name = match t
            .host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            Ok(ip) => rustls::pki_types::ServerName::IpAddress(ip.into()),
            Err(_) => rustls::pki_types::ServerName::try_from(t.host.clone())
                .map_err(|e| format!("probe host {:?}: {e}", t.host))?,
        };
        let tls = tokio_rustls::TlsConnector::from(insecure_client_config())
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
        send(tls, req).await
    } else {
        send(tcp, req).await
    }
}

async fn send<IO>(io: IO, req: http::Request<Empty<Bytes>>) -> Result<(u16, Option<String>), String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let location = resp
        .headers()
        .get(http::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok((resp.status().as_u16(), location))
}

/// TLS 1.2/1.3 client that accepts any server certificate (the kubelet's
/// `InsecureSkipVerify` for HTTPS probes) but still checks the handshake
/// signatures.
fn insecure_client_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let verifier = Arc::new(AnyServerCert(provider.clone()));
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("ring supports TLS 1.2 and 1.3")
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

/// Accepts every certificate chain; verifies handshake signatures.
#[derive(Debug)]
struct AnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Appends `n` as a protobuf varint.
fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// `grpc.health.v1.Health/Check` over plaintext HTTP/2, as the kubelet's
/// `grpc` probe: the request message is field 1 (service name); the
/// response's field 1 is the status (1 = SERVING). `grpc-status` is read
/// from the trailers, or from the headers of a trailers-only response.
async fn grpc_check(host: IpAddr, port: u16, service: &str) -> Result<(), String> {
    let tcp = tokio::net::TcpStream::connect(SocketAddr::new(host, port))
        .await
        .map_err(|e| format!("connect to port {port}: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut msg = Vec::new();
    if !service.is_empty() {
        msg.push(0x0a);
        put_varint(&mut msg, service.len() as u64);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    let authority = url_host(&host.to_string());
    let req = http::Request::post(format!(
        "http://{authority}:{port}/grpc.health.v1.Health/Check"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header(http::header::USER_AGENT, USER_AGENT)
    .body(Full::new(Bytes::from(frame)))
    .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let header_status = resp.headers().get("grpc-status").cloned();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    let status = body
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .or(header_status.as_ref())
        .and_then(|v| v.to_str().ok())
        .unwrap_or("unknown")
        .to_owned();
    let bytes = body.to_bytes();
    if status != "0" {
        return Err(format!("gRPC health check returned grpc-status {status}"));
    }
    // 5-byte frame header, then field 1 varint: 0x08 <status>.
    match bytes.get(5..7) {
        Some([0x08, 1]) => Ok(()),
        Some([0x08, s]) => Err(format!("gRPC health status is {s}, not SERVING (1)")),
        _ => Err("gRPC health status is not SERVING".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(tls: bool, host: &str, port: u16, path: &str) -> Target {
        Target {
            tls,
            host: host.into(),
            port,
            path: path.into(),
        }
    }

    #[test]
    fn redirects_stay_on_the_host() {
        let from = t(false, "127.0.0.1", 8080, "/a/b");
        assert_eq!(follow(&from, "/c"), Some(t(false, "127.0.0.1", 8080, "/c")));
        assert_eq!(
            follow(&from, "c?x=1"),
            Some(t(false, "127.0.0.1", 8080, "/a/c?x=1"))
        );
        assert_eq!(
            follow(&from, "https://127.0.0.1:8443/z"),
            Some(t(true, "127.0.0.1", 8443, "/z"))
        );
        assert_eq!(follow(&from, "http://example.com/z"), None);
        assert_eq!(follow(&from, "//example.com/z"), None);
    }

    #[test]
    fn varint_lengths() {
        let mut v = Vec::new();
        put_varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        v.clear();
        put_varint(&mut v, 5);
        assert_eq!(v, [5]);
    }
}
