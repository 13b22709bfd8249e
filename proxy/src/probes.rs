//! The app's original probes, run by the proxy for the kubelet at
//! `GET /app-health/<container>/<livez|readyz|startupz>` on the admin port
//! (the injector rewrites app probes to that path, since under strict mTLS
//! a plaintext probe to the app port would be refused).
//!
//! Format (env `WEFT_APP_PROBES`, written by the injector, see
//! injector/README.md):
//! `{"version":1,"containers":{"app":{"readyz":{"http":{"port":8080,"path":"/healthz","scheme":"HTTP"},"timeoutSeconds":1}}}}`
//! with one of `http` (port, path, scheme, host?, headers?), `tcp` (port,
//! host?) or `grpc` (port, service?).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
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
        /// `HTTP` (HTTPS is not run by the proxy: reported as failure).
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
    /// gRPC health (checked as an HTTP/2 connection that the app accepts).
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

/// Runs a probe against the app at `host`; `Err` says why it failed.
pub async fn run(probe: &AppProbe, host: IpAddr) -> Result<(), String> {
    let deadline = Duration::from_secs(u64::from(probe.timeout_seconds.max(1)));
    match tokio::time::timeout(deadline, run_inner(&probe.action, host)).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {deadline:?}")),
    }
}

async fn run_inner(action: &ProbeAction, host: IpAddr) -> Result<(), String> {
    match action {
        ProbeAction::Tcp { port, .. } => {
            tokio::net::TcpStream::connect(SocketAddr::new(host, *port))
                .await
                .map(|_| ())
                .map_err(|e| format!("tcp connect to port {port}: {e}"))
        }
        ProbeAction::Http {
            port,
            path,
            scheme,
            host: host_header,
            headers,
        } => {
            if scheme.eq_ignore_ascii_case("https") {
                return Err("HTTPS app probes are not supported by weft-proxy yet".into());
            }
            let tcp = tokio::net::TcpStream::connect(SocketAddr::new(host, *port))
                .await
                .map_err(|e| format!("connect to port {port}: {e}"))?;
            let (mut send, conn) =
                hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let mut req = http::Request::get(path.as_str())
                .header(
                    http::header::HOST,
                    host_header.clone().unwrap_or_else(|| host.to_string()),
                )
                .header(http::header::USER_AGENT, "kube-probe/weft");
            for h in headers {
                req = req.header(h.name.as_str(), h.value.as_str());
            }
            let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
            let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
            let code = resp.status().as_u16();
            if (200..400).contains(&code) {
                Ok(())
            } else {
                Err(format!("HTTP probe {path} on port {port} returned {code}"))
            }
        }
        ProbeAction::Grpc { port, service } => {
            grpc_check(host, *port, service.as_deref().unwrap_or("")).await
        }
    }
}

/// `grpc.health.v1.Health/Check`: the request message is field 1 (service
/// name); the response's field 1 is the status (1 = SERVING).
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
        msg.push(service.len() as u8);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    let req = http::Request::post(format!("http://{host}:{port}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(frame)))
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    let status = body
        .trailers()
        .and_then(|t| t.get("grpc-status"))
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
        _ => Err("gRPC health status is not SERVING".into()),
    }
}
