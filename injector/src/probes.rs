//! Probe rewriting: app probes go through the proxy admin port.
//!
//! Under strict mTLS the kubelet's plaintext probes to the pod IP would be
//! captured and refused by the proxy. So every `httpGet`, `tcpSocket` and
//! `grpc` liveness/readiness/startup probe of an app container is replaced by
//! an `httpGet` on the admin port (15020, never captured):
//!
//! ```text
//! GET /app-health/<container>/<livez|readyz|startupz>
//! ```
//!
//! and the original check is recorded in [`AppProbes`], serialized as JSON
//! into the pod annotation [`APP_PROBES_ANNOTATION`] and the proxy's
//! `WEFT_APP_PROBES` env var. The proxy runs the recorded check against the
//! app and answers 200 on success, 503 otherwise. Timing fields (periods,
//! thresholds, timeouts) stay on the rewritten probe, so the kubelet keeps
//! scheduling the checks. `exec` probes run inside the app container and
//! are left alone. Named ports are resolved here, against the container's
//! own ports, because the proxy does not see the pod spec.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, HTTPGetAction, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

use crate::config::ADMIN_PORT;

/// Pod annotation holding the original probes (JSON of [`AppProbes`]).
pub const APP_PROBES_ANNOTATION: &str = "weft.dev/app-probes";
/// Proxy env var holding the same JSON.
pub const APP_PROBES_ENV: &str = "WEFT_APP_PROBES";
/// URL path prefix the proxy serves on its admin port.
pub const APP_HEALTH_PREFIX: &str = "/app-health";

/// The original probes of a pod, keyed by container name. The format the
/// proxy reads; see `injector/README.md`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppProbes {
    /// Format version, currently 1.
    pub version: u32,
    /// Container name → its recorded probes.
    pub containers: BTreeMap<String, ContainerProbes>,
}

/// The recorded probes of one container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerProbes {
    /// Served at `/app-health/<container>/livez`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub livez: Option<AppProbe>,
    /// Served at `/app-health/<container>/readyz`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readyz: Option<AppProbe>,
    /// Served at `/app-health/<container>/startupz`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startupz: Option<AppProbe>,
}

/// One original check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppProbe {
    /// What to check.
    #[serde(flatten)]
    pub action: ProbeAction,
    /// Seconds the check may take (the original probe's, default 1).
    pub timeout_seconds: i32,
}

/// The check itself. Exactly one key: `http`, `tcp` or `grpc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProbeAction {
    /// HTTP GET; success is a status 200..=399 (as the kubelet decides).
    Http {
        /// App port (named ports already resolved).
        port: u16,
        /// Path and query, default `/`.
        path: String,
        /// `HTTP` or `HTTPS` (HTTPS: no certificate verification, like the kubelet).
        scheme: String,
        /// Host to connect to; absent means the pod IP.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<String>,
        /// Extra request headers, in order.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        headers: Vec<Header>,
    },
    /// TCP connect; success is an established connection.
    Tcp {
        /// App port.
        port: u16,
        /// Host to connect to; absent means the pod IP.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<String>,
    },
    /// gRPC health checking protocol (`grpc.health.v1.Health/Check`, plaintext);
    /// success is `SERVING`.
    Grpc {
        /// App port.
        port: u16,
        /// Service name in the check request; absent means `""`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service: Option<String>,
    },
}

/// An HTTP header of a recorded probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Header name.
    pub name: String,
    /// Header value.
    pub value: String,
}

/// A probe that cannot be rewritten, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("container {container:?} {kind}: {reason}")]
pub struct ProbeError {
    /// Container name.
    pub container: String,
    /// `livenessProbe`, `readinessProbe` or `startupProbe`.
    pub kind: &'static str,
    /// What is wrong.
    pub reason: String,
}

/// Which probe of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// `livenessProbe` → `livez`.
    Liveness,
    /// `readinessProbe` → `readyz`.
    Readiness,
    /// `startupProbe` → `startupz`.
    Startup,
}

impl ProbeKind {
    /// All kinds, in spec order.
    pub const ALL: [ProbeKind; 3] = [Self::Liveness, Self::Readiness, Self::Startup];

    /// Field name in the container spec.
    pub fn field(self) -> &'static str {
        match self {
            Self::Liveness => "livenessProbe",
            Self::Readiness => "readinessProbe",
            Self::Startup => "startupProbe",
        }
    }

    /// Last path segment under `/app-health/<container>/`.
    pub fn endpoint(self) -> &'static str {
        match self {
            Self::Liveness => "livez",
            Self::Readiness => "readyz",
            Self::Startup => "startupz",
        }
    }

    fn get(self, c: &Container) -> Option<&Probe> {
        match self {
            Self::Liveness => c.liveness_probe.as_ref(),
            Self::Readiness => c.readiness_probe.as_ref(),
            Self::Startup => c.startup_probe.as_ref(),
        }
    }
}

/// A probe replacement for one container.
#[derive(Debug, Clone, PartialEq)]
pub struct Rewrite {
    /// Which probe.
    pub kind: ProbeKind,
    /// The probe that replaces it.
    pub probe: Probe,
}

/// Rewrites the probes of one container, recording the originals in
/// `record`. Returns the replacements (empty when nothing needs rewriting).
pub fn rewrite_container(
    c: &Container,
    record: &mut AppProbes,
) -> Result<Vec<Rewrite>, ProbeError> {
    let mut out = Vec::new();
    for kind in ProbeKind::ALL {
        let Some(probe) = kind.get(c) else { continue };
        let Some(action) = original_action(c, kind, probe)? else {
            continue;
        };
        let entry = record.containers.entry(c.name.clone()).or_default();
        let recorded = AppProbe {
            action,
            timeout_seconds: probe.timeout_seconds.unwrap_or(1),
        };
        match kind {
            ProbeKind::Liveness => entry.livez = Some(recorded),
            ProbeKind::Readiness => entry.readyz = Some(recorded),
            ProbeKind::Startup => entry.startupz = Some(recorded),
        }
        let probe = Probe {
            http_get: Some(HTTPGetAction {
                path: Some(format!(
                    "{APP_HEALTH_PREFIX}/{}/{}",
                    c.name,
                    kind.endpoint()
                )),
                port: IntOrString::Int(i32::from(ADMIN_PORT)),
                scheme: Some("HTTP".to_owned()),
                ..HTTPGetAction::default()
            }),
            tcp_socket: None,
            grpc: None,
            exec: None,
            ..probe.clone()
        };
        out.push(Rewrite { kind, probe });
    }
    Ok(out)
}

fn original_action(
    c: &Container,
    kind: ProbeKind,
    p: &Probe,
) -> Result<Option<ProbeAction>, ProbeError> {
    let err = |reason: String| ProbeError {
        container: c.name.clone(),
        kind: kind.field(),
        reason,
    };
    if let Some(h) = &p.http_get {
        let port = resolve_port(c, &h.port).map_err(err)?;
        let scheme = h.scheme.clone().unwrap_or_else(|| "HTTP".to_owned());
        if !scheme.eq_ignore_ascii_case("HTTP") && !scheme.eq_ignore_ascii_case("HTTPS") {
            return Err(err(format!(
                "httpGet scheme {scheme:?} is neither HTTP nor HTTPS"
            )));
        }
        return Ok(Some(ProbeAction::Http {
            port,
            path: h
                .path
                .clone()
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "/".to_owned()),
            scheme: scheme.to_ascii_uppercase(),
            host: h.host.clone().filter(|h| !h.is_empty()),
            headers: h
                .http_headers
                .iter()
                .flatten()
                .map(|h| Header {
                    name: h.name.clone(),
                    value: h.value.clone(),
                })
                .collect(),
        }));
    }
    if let Some(t) = &p.tcp_socket {
        let port = resolve_port(c, &t.port).map_err(err)?;
        return Ok(Some(ProbeAction::Tcp {
            port,
            host: t.host.clone().filter(|h| !h.is_empty()),
        }));
    }
    if let Some(g) = &p.grpc {
        let port = u16::try_from(g.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| err(format!("grpc port {} is not 1..=65535", g.port)))?;
        return Ok(Some(ProbeAction::Grpc {
            port,
            service: g.service.clone().filter(|s| !s.is_empty()),
        }));
    }
    Ok(None)
}

fn resolve_port(c: &Container, port: &IntOrString) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("port {n} is not 1..=65535")),
        IntOrString::String(name) => {
            let by_name = c
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok());
            // Like the kubelet: a name first, then a number written as a string.
            by_name
                .or_else(|| name.parse::<u16>().ok())
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("port {name:?} names no port of the container"))
        }
    }
}
