//! The serde types of `proxy.json`. Field names are camelCase on the wire.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// One namespace's proxy configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    /// Format version; see [`crate::FORMAT_VERSION`].
    pub version: u32,
    /// Increases with every content change the operator writes.
    pub generation: u64,
    /// `sha256:<hex>` of the document with this field empty.
    #[serde(default)]
    pub hash: String,
    /// The namespace whose pods read this file.
    pub namespace: String,
    /// Mesh-wide settings.
    pub mesh: MeshSettings,
    /// Services the namespace's pods may call, sorted by namespace then name.
    /// Shared, so that a reload can keep each Service whose bytes did not
    /// change ([`ProxyConfig::load_after`]) without parsing or copying it.
    #[serde(default)]
    pub services: Vec<Arc<Service>>,
    /// Rules for traffic into the namespace's pods.
    #[serde(default)]
    pub inbound: Inbound,
    /// Present in the document of an ingress gateway (a `Gateway` of
    /// weft's `GatewayClass`): the listeners it serves. A sidecar's
    /// document has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Gateway>,
}

/// What an ingress gateway serves: listeners that route each request by
/// its host name to one of the document's Services, whose `httpRoutes`
/// route it on (a Service made for that listener and host name, with no
/// addresses of its own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Gateway {
    /// `namespace/name` of the `Gateway` resource.
    pub name: String,
    /// Listeners, in the Gateway's order.
    pub listeners: Vec<Listener>,
}

/// One listener of a gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listener {
    /// The listener's name in the Gateway (metric and log label).
    pub name: String,
    /// The port it listens on; listeners may share a port when they all
    /// speak the same protocol, and are then told apart by host name (TLS
    /// SNI, then the request's host).
    pub port: u16,
    /// `http`, `https` (TLS terminated here) or `tls` (TLS passed through
    /// to the backend untouched).
    pub protocol: ListenerProtocol,
    /// The host names it answers: exact or `*.suffix`; none: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// HTTPS: certificates, each a directory name under the gateway's
    /// certificate directory holding `tls.crt` and `tls.key`; the first
    /// whose names cover the client's SNI is presented, else the first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<String>,
    /// Host names routed, most specific first; the first that matches the
    /// request's host (TLS passthrough: the ClientHello's SNI) routes it.
    /// None matching: 404 (TLS passthrough: the connection is closed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<VirtualHost>,
}

/// How a listener's connections are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// HTTP/1.1 or HTTP/2 (prior knowledge) in plaintext.
    Http,
    /// TLS terminated with the listener's certificates, then HTTP/1.1 or
    /// HTTP/2 (ALPN).
    Https,
    /// TLS passthrough: the ClientHello's SNI picks the host, whose
    /// Service's `tcpRoutes` pick the backend; the bytes, ClientHello
    /// included, go to it untouched (inside mTLS to a meshed endpoint).
    Tls,
}

/// Requests for one host name (pattern) of a listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualHost {
    /// Exact host, `*.suffix` (one or more labels), or none: any host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// `namespace/name` of the Service in [`ProxyConfig::services`] whose
    /// `httpRoutes` (TLS passthrough: `tcpRoutes`) route these requests.
    pub service: String,
}

/// Whether `host` (no port, lower case) matches a Gateway API host name
/// pattern: exact, or `*.suffix` matching one or more labels before the
/// suffix.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1
                && host.ends_with(suffix)
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        }
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// Mesh-wide settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshSettings {
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Inbound mTLS mode.
    pub mtls_mode: MtlsMode,
    /// Decision when no Allow policy selects a workload.
    #[serde(default)]
    pub default_access: AccessAction,
    /// Write access logs.
    #[serde(default)]
    pub access_log: bool,
    /// How access logs are written and filtered. Left out when default, so
    /// documents written before the field keep their hash.
    #[serde(default, skip_serializing_if = "AccessLogOptions::is_default")]
    pub access_log_options: AccessLogOptions,
    /// Tracing export, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Tracing>,
    /// What the inbound proxy does with a request path that holds an
    /// encoded slash or backslash, or a raw backslash. Left out when
    /// `Reject`, so documents written before the field keep their hash.
    #[serde(default, skip_serializing_if = "EscapedSlashes::is_reject")]
    pub escaped_slashes: EscapedSlashes,
    /// Which names the proxies' traffic metrics are exported under. Left
    /// out when `Weft`, so documents written before the field keep their
    /// hash.
    #[serde(default, skip_serializing_if = "MetricsNaming::is_weft")]
    pub metrics_naming: MetricsNaming,
}

/// How access logs are written and which requests are.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLogOptions {
    /// Line format.
    #[serde(default)]
    pub format: AccessLogFormat,
    /// Only requests that failed (5xx, or answered by a proxy itself) and
    /// TCP connections a proxy refused or closed.
    #[serde(default)]
    pub errors_only: bool,
    /// Share of requests (and connections) logged, 0–100, decided per
    /// request.
    #[serde(default = "hundred")]
    pub sample_percent: f64,
}

fn hundred() -> f64 {
    100.0
}

impl Default for AccessLogOptions {
    fn default() -> Self {
        AccessLogOptions {
            format: AccessLogFormat::Json,
            errors_only: false,
            sample_percent: 100.0,
        }
    }
}

impl AccessLogOptions {
    /// Whether these are the defaults (JSON, every request).
    pub fn is_default(&self) -> bool {
        *self == AccessLogOptions::default()
    }
}

/// The format of access log lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccessLogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// One space-separated line, fields in a fixed order.
    Text,
}

/// The names of the proxies' traffic metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MetricsNaming {
    /// `weft_requests_total`, `weft_request_duration_seconds`, … with
    /// weft's label names.
    #[default]
    Weft,
    /// Istio's standard metrics (`istio_requests_total`, …) with Istio's
    /// label names and values, so existing dashboards and alerts work.
    Istio,
    /// Both sets.
    Both,
}

impl MetricsNaming {
    /// Whether this is the default.
    pub fn is_weft(&self) -> bool {
        *self == MetricsNaming::Weft
    }

    /// Whether weft's names are exported.
    pub fn weft(self) -> bool {
        matches!(self, MetricsNaming::Weft | MetricsNaming::Both)
    }

    /// Whether Istio's names are exported.
    pub fn istio(self) -> bool {
        matches!(self, MetricsNaming::Istio | MetricsNaming::Both)
    }
}

/// The inbound proxy's answer to a request path holding `%2F`, `%5C` or a
/// raw `\`: characters that some apps read as a path separator and others
/// as data, so a path rule cannot know which resource the app will serve.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum EscapedSlashes {
    /// Refused with 400 `ambiguous-path`; the app never sees the request.
    #[default]
    Reject,
    /// Passed on as data of their segment, never as separators: `%2F` and
    /// `%5C` stay encoded, a raw `\` is sent as `%5C`, and path rules see
    /// the same.
    Keep,
}

impl EscapedSlashes {
    /// The default, which `proxy.json` leaves out.
    pub fn is_reject(&self) -> bool {
        *self == Self::Reject
    }
}

/// Inbound mTLS mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MtlsMode {
    /// Only mTLS from mesh identities.
    #[default]
    Strict,
    /// mTLS and plaintext.
    Permissive,
}

/// Tracing export settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tracing {
    /// OTLP/HTTP endpoint.
    pub otlp_endpoint: String,
    /// Share of new traces sampled, 0–100.
    pub sampling_percent: f64,
}

/// A Service a proxy may send traffic to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    /// Service name.
    pub name: String,
    /// Service namespace.
    pub namespace: String,
    /// ClusterIPs (empty for headless Services).
    #[serde(default)]
    pub cluster_ips: Vec<IpAddr>,
    /// Ports, sorted by number.
    pub ports: Vec<ServicePort>,
    /// Subset names defined for this Service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<String>,
    /// Ready endpoints, sorted by address.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// HTTP routes, in evaluation order (first match wins).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_routes: Vec<HttpRoute>,
    /// TCP routes (at most one per port, plus at most one for all ports).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp_routes: Vec<TcpRoute>,
    /// How clients talk to the Service.
    #[serde(default)]
    pub policy: ClientPolicy,
}

impl Service {
    /// `namespace/name`, the key backends use to refer to a Service.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A Service port.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    /// The Service port clients dial.
    pub port: u16,
    /// Port name (EndpointSlice ports are matched by it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The port on the endpoints; per-endpoint overrides in [`Endpoint::ports`].
    pub target_port: u16,
    /// How the proxy treats the traffic.
    pub protocol: Protocol,
}

/// How the proxy treats a port's traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Peek at the first bytes: HTTP/1, HTTP/2 prior knowledge, else opaque.
    #[default]
    Detect,
    /// HTTP/1.1.
    Http1,
    /// HTTP/2.
    Http2,
    /// gRPC over HTTP/2.
    Grpc,
    /// Opaque TCP; the client may not speak first.
    Opaque,
}

/// A ready endpoint of a Service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    /// Pod IP.
    pub address: IpAddr,
    /// Whether the pod runs a weft proxy (connect with mTLS).
    pub meshed: bool,
    /// The pod's SPIFFE identity; present exactly when `meshed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The name of the pod behind the address (the EndpointSlice's
    /// `targetRef`, in the Service's namespace), so a log line or a test
    /// can name the pod rather than an address that may be reused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The pod's workload (its Deployment, StatefulSet, … or the pod
    /// itself; see `weft_api::workload`), the `destination_workload`
    /// metric label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// The pod's `app` label (or `app.kubernetes.io/name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// The pod's `version` label (or `app.kubernetes.io/version`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Subsets of the Service this endpoint belongs to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<String>,
    /// Port name → port, where it differs from [`ServicePort::target_port`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
    /// Terminating endpoints receive no new requests but are kept for
    /// connections already open.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminating: bool,
}

/// An HTTP route rule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    /// `<ServiceRoute name>/<rule name or index>`, the `route` metric label.
    pub name: String,
    /// Service port the rule applies to; none: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Any of these; empty matches everything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpMatch>,
    /// Weighted backends; empty: the Service itself (unless redirecting,
    /// or unless `unresolvedWeight` is set).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<Backend>,
    /// The weight of backends the route names but that do not resolve
    /// (Gateway API `ResolvedRefs=False`): that share of requests is
    /// answered 500, as the Gateway API requires. With no `backends` every
    /// request is.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unresolved_weight: u32,
    /// Overall timeout in milliseconds, retries included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Retry policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Fault injection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// Mirroring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    /// Request header edits.
    #[serde(default, skip_serializing_if = "HeaderOps::is_empty")]
    pub request_headers: HeaderOps,
    /// Response header edits.
    #[serde(default, skip_serializing_if = "HeaderOps::is_empty")]
    pub response_headers: HeaderOps,
    /// Rewrite before forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    /// Redirect instead of forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
}

/// Request conditions (all must hold).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatch {
    /// Path condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// Header conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<NamedMatch>,
    /// Query parameter conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<NamedMatch>,
    /// Method (upper case).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// A path condition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum PathMatch {
    /// Equal.
    Exact(String),
    /// Prefix at a segment boundary.
    Prefix(String),
    /// Whole-path regular expression.
    Regex(String),
}

/// A header or query parameter condition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamedMatch {
    /// Header (lower case) or parameter name.
    pub name: String,
    /// The condition on its value.
    pub value: ValueMatch,
}

/// A condition on a value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum ValueMatch {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Whole-value regular expression.
    Regex(String),
    /// Present (true) or absent (false).
    Present(bool),
}

/// A weighted backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backend {
    /// `namespace/name` of a Service in [`ProxyConfig::services`].
    pub service: String,
    /// Subset of that Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Service port; none: the port of the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Relative weight.
    pub weight: u32,
}

/// Retry policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub attempts: u32,
    /// Per-attempt timeout in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout_ms: Option<u64>,
    /// Conditions retried.
    pub retry_on: Vec<RetryOn>,
    /// Status codes retried with [`RetryOn::RetriableStatusCodes`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retriable_status_codes: Vec<u16>,
    /// Base backoff in milliseconds.
    pub backoff_base_ms: u64,
    /// Maximum backoff in milliseconds.
    pub backoff_max_ms: u64,
}

/// Retry conditions (see the `ServiceRoute` API for their meaning).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(missing_docs)]
pub enum RetryOn {
    #[serde(rename = "5xx")]
    ServerError,
    GatewayError,
    Reset,
    ConnectFailure,
    #[serde(rename = "retriable-4xx")]
    Retriable4xx,
    RefusedStream,
    RetriableStatusCodes,
    Unavailable,
    Cancelled,
    DeadlineExceeded,
    ResourceExhausted,
}

/// Fault injection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fault {
    /// Delay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// Abort.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// Injected delay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    /// Delay in milliseconds.
    pub delay_ms: u64,
    /// Share of requests, 0–100.
    pub percent: f64,
}

/// Injected abort.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    /// Status returned.
    pub status: u16,
    /// Share of requests, 0–100.
    pub percent: f64,
}

/// Mirroring.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mirror {
    /// Where copies go (weight ignored).
    pub backend: Backend,
    /// Share of requests, 0–100.
    pub percent: f64,
}

/// Header edits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderOps {
    /// Set (replace) name → value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<(String, String)>,
    /// Append name → value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<(String, String)>,
    /// Remove by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderOps {
    /// No edits at all.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// Rewrite.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rewrite {
    /// Whole path replacement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Replacement of the matched prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Authority replacement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

/// Redirect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Redirect {
    /// `http` or `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// Host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Replacement of the prefix the rule's path condition matched
    /// (exclusive with `path`; without a prefix condition the path is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
}

/// A TCP route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRoute {
    /// Metric label.
    pub name: String,
    /// Service port; none: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Weighted backends.
    pub backends: Vec<Backend>,
}

/// How clients talk to a Service.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientPolicy {
    /// Load balancer.
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    /// Connection pool limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    /// Outlier detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Retry budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudget>,
}

/// Load balancer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum LoadBalancer {
    /// Round robin.
    RoundRobin,
    /// Power of two choices, least requests in flight.
    #[default]
    LeastRequest,
    /// Random.
    Random,
    /// Consistent hash on a key.
    ConsistentHash(HashKey),
}

/// Consistent hash key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum HashKey {
    /// A request header (lower case).
    Header(String),
    /// A cookie.
    Cookie(String),
    /// The client IP.
    SourceIp,
}

/// Connection pool limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPool {
    /// Max connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Max requests waiting for a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Max requests in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Requests per connection (none: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    /// Connect timeout in milliseconds.
    pub connect_timeout_ms: u64,
    /// Idle timeout in milliseconds.
    pub idle_timeout_ms: u64,
}

/// Outlier detection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive 5xx before ejection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx: Option<u32>,
    /// Consecutive gateway errors before ejection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    /// Ejections last whole intervals of this many milliseconds (they are
    /// reconsidered once per interval).
    pub interval_ms: u64,
    /// Base ejection time in milliseconds.
    pub base_ejection_ms: u64,
    /// Max share of endpoints ejected, 0–100.
    pub max_ejection_percent: u32,
}

/// Retry budget.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    /// Retries as a share of requests, 0–100.
    pub retry_percent: f64,
    /// Retries always allowed per second.
    pub min_retries_per_second: u32,
    /// Window in milliseconds.
    pub ttl_ms: u64,
}

/// Rules for traffic into the namespace's pods.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Inbound {
    /// Authorization policies, sorted by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<AccessPolicy>,
    /// Local rate limits, sorted by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<RateLimit>,
    /// Per-workload port protocols (from Services selecting the pods).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<InboundPort>,
    /// mTLS mode overrides (`MtlsPolicy`): the workload ones (non-empty
    /// selector) in precedence order, then at most one namespace-wide one
    /// (empty selector). See [`mtls_mode`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mtls: Vec<MtlsOverride>,
}

/// An mTLS mode override for selected pods (empty selector: the namespace).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtlsOverride {
    /// `MtlsPolicy` name.
    pub name: String,
    /// Pods it applies to; empty: every pod of the namespace.
    #[serde(default, skip_serializing_if = "Selector::is_empty")]
    pub selector: Selector,
    /// Mode of every port, unless a port entry says otherwise; none: inherited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MtlsMode>,
    /// Per target port modes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMtls>,
}

/// The mTLS mode of one target port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortMtls {
    /// Target port.
    pub port: u16,
    /// Its mode.
    pub mode: MtlsMode,
}

/// The mTLS mode a pod with `labels` applies to inbound traffic on target
/// `port`, most specific first: the port entry of the first workload
/// override selecting the pod, that override's mode, the port entry of the
/// namespace-wide override, its mode, then the mesh's.
pub fn mtls_mode(config: &ProxyConfig, labels: &BTreeMap<String, String>, port: u16) -> MtlsMode {
    let overrides = &config.inbound.mtls;
    let workload = overrides
        .iter()
        .find(|o| !o.selector.is_empty() && selector_matches(&o.selector, labels));
    let namespace = overrides.iter().find(|o| o.selector.is_empty());
    for o in [workload, namespace].into_iter().flatten() {
        if let Some(p) = o.ports.iter().find(|p| p.port == port) {
            return p.mode;
        }
        if let Some(m) = o.mode {
            return m;
        }
    }
    config.mesh.mtls_mode
}

/// Pods a rule applies to: all labels must be present with these values.
pub type Selector = BTreeMap<String, String>;

/// An authorization policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessPolicy {
    /// `AccessPolicy` name.
    pub name: String,
    /// Pods it applies to (empty: every pod).
    #[serde(default)]
    pub selector: Selector,
    /// Only these target ports (from `targetService`); empty: every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Allow or deny.
    pub action: AccessAction,
    /// Audit only: evaluated as if enforced; what it would refuse is let
    /// through, logged and counted, never refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub audit: bool,
    /// Any of these (empty: none).
    #[serde(default)]
    pub rules: Vec<AccessRule>,
}

/// Allow or deny.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccessAction {
    /// Allow.
    #[default]
    Allow,
    /// Deny.
    Deny,
}

/// An authorization rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessRule {
    /// Callers (any; empty: anyone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<AccessSource>,
    /// Request properties (any; empty: anything).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<AccessDestination>,
}

/// A caller condition (all given lists must contain the caller).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessSource {
    /// Full SPIFFE IDs, or prefixes ending in `*`. Service accounts from the
    /// API are rendered into this list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// Caller namespaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Matches callers without identity.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unauthenticated: bool,
}

/// A request condition.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessDestination {
    /// Target ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Methods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Paths (exact, or prefix with a trailing `*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

/// A local rate limit on inbound requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    /// `<ServicePolicy name>`.
    pub name: String,
    /// Pods it applies to (the Service's selector).
    pub selector: Selector,
    /// Target ports it applies to.
    pub ports: Vec<u16>,
    /// Tokens added per `interval_ms`.
    pub requests: u32,
    /// Refill interval in milliseconds.
    pub interval_ms: u64,
    /// Bucket size above `requests`.
    pub burst: u32,
}

/// The protocol of an inbound target port for selected pods.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundPort {
    /// Pods (the Service's selector).
    pub selector: Selector,
    /// Target port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
}

/// Whether every label of `selector` is present with its value in `labels`.
pub fn selector_matches(selector: &Selector, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}
