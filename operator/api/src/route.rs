//! `ServiceRoute`: how requests to one Service are routed — matches,
//! weighted backends, timeouts, retries, faults, mirroring, header edits,
//! rewrites and redirects, and weighted TCP routes.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::ResourceStatus;
use crate::duration::Duration;

/// Routing for requests sent to one Service (`spec.service`) by meshed clients.
///
/// HTTP rules are tried in order; the first rule with a matching `matches`
/// entry (or with no `matches`) handles the request. A request no rule
/// matches goes to the Service itself, as if there were no route.
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "ServiceRoute",
    namespaced,
    shortname = "sroute",
    category = "weft",
    status = "ResourceStatus",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.service"}"#,
    printcolumn = r#"{"name":"Port","type":"integer","jsonPath":".spec.port"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.http) || has(self.tcp)").message("a ServiceRoute needs at least one http or tcp rule"))]
pub struct ServiceRouteSpec {
    /// Name of the Service (in this namespace) whose traffic is routed.
    #[schemars(length(min = 1, max = 63))]
    pub service: String,

    /// Only route traffic to this Service port; unset means every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,

    /// HTTP (and gRPC) rules, tried in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub http: Vec<HttpRule>,

    /// TCP rules for opaque traffic: weighted backends only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub tcp: Vec<TcpRule>,
}

/// One HTTP routing rule.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.redirect) || !has(self.backends) || size(self.backends) == 0").message("a redirect rule has no backends"))]
#[x_kube(validation = Rule::new("!has(self.redirect) || !has(self.rewrite)").message("redirect and rewrite are mutually exclusive"))]
#[x_kube(validation = Rule::new("!has(self.backends) || size(self.backends) == 0 || self.backends.exists(b, !has(b.weight) || b.weight > 0)").message("at least one backend needs a weight above zero"))]
pub struct HttpRule {
    /// A name for the rule, shown in metrics (`route` label) and logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: Option<String>,

    /// The rule applies when any entry matches; no entries match everything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub matches: Vec<HttpMatch>,

    /// Where matching requests go, split by weight. Empty: the Service itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub backends: Vec<Backend>,

    /// Total time for the request including retries; unset: no timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,

    /// Retries of failed requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,

    /// Faults injected for testing resilience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,

    /// A copy of matching requests sent to another backend (responses ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,

    /// Header edits on the request before it is forwarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderModifier>,

    /// Header edits on the response before it is returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderModifier>,

    /// Rewrites of the path and authority before forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,

    /// Answer with a redirect instead of forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
}

/// Conditions on a request; all given conditions must hold.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatch {
    /// The request path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// Request headers (names are case-insensitive).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub headers: Vec<HeaderMatch>,
    /// Query parameters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub query_params: Vec<QueryParamMatch>,
    /// The request method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<HttpMethod>,
}

/// A path condition: exactly one of `exact`, `prefix` or `regex`.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.exact), has(self.prefix), has(self.regex)].filter(x, x).size() == 1").message("exactly one of exact, prefix or regex must be set"))]
pub struct PathMatch {
    /// The path equals this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^/"))]
    pub exact: Option<String>,
    /// The path starts with this value at a segment boundary (`/api` matches
    /// `/api` and `/api/x`, not `/apix`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^/"))]
    pub prefix: Option<String>,
    /// The whole path matches this regular expression (RE2 syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub regex: Option<String>,
}

/// A header condition: exactly one of `exact`, `prefix`, `regex` or `present`.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.exact), has(self.prefix), has(self.regex), has(self.present)].filter(x, x).size() == 1").message("exactly one of exact, prefix, regex or present must be set"))]
pub struct HeaderMatch {
    /// Header name.
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
    )]
    pub name: String,
    /// The value equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// The value starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The whole value matches this regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// true: the header is present (any value); false: it is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

/// A query parameter condition: exactly one of `exact`, `regex` or `present`.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.exact), has(self.regex), has(self.present)].filter(x, x).size() == 1").message("exactly one of exact, regex or present must be set"))]
pub struct QueryParamMatch {
    /// Parameter name.
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    /// The value equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// The whole value matches this regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// true: the parameter is present; false: it is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

/// HTTP methods.
#[derive(schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
#[allow(missing_docs)]
pub enum HttpMethod {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
}

/// A weighted destination.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    /// Service in this namespace; default: the routed Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub service: Option<String>,
    /// A subset of that Service's endpoints, defined in its `ServicePolicy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub subset: Option<String>,
    /// Service port; default: the port the request was sent to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// Relative weight (default 1). Traffic share is weight / sum of weights.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0, max = 1000000))]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// Retry policy.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    /// Retries after the first attempt (0–10, default 2).
    #[serde(default = "default_attempts")]
    #[schemars(range(min = 0, max = 10))]
    pub attempts: u32,
    /// Timeout of each attempt; unset: only the rule's `timeout` applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// Which failures are retried (default `connect-failure`,
    /// `refused-stream`, `unavailable`, `gateway-error`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<RetryOn>,
    /// Extra status codes retried when `retry-on` contains
    /// `retriable-status-codes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub retriable_status_codes: Vec<StatusCode>,
    /// Exponential backoff between attempts, with full jitter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
}

fn default_attempts() -> u32 {
    2
}

/// An HTTP status code (100–599).
#[derive(schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StatusCode(#[schemars(range(min = 100, max = 599))] pub u16);

/// Failure conditions that trigger a retry.
#[derive(schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RetryOn {
    /// Any 5xx response, or a reset/connect failure.
    #[serde(rename = "5xx")]
    ServerError,
    /// 502, 503 or 504.
    #[serde(rename = "gateway-error")]
    GatewayError,
    /// The connection was reset or closed before a response.
    #[serde(rename = "reset")]
    Reset,
    /// The connection to the endpoint could not be established.
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// 409 Conflict.
    #[serde(rename = "retriable-4xx")]
    Retriable4xx,
    /// An HTTP/2 stream refused (REFUSED_STREAM) before processing.
    #[serde(rename = "refused-stream")]
    RefusedStream,
    /// Codes listed in `retriableStatusCodes`.
    #[serde(rename = "retriable-status-codes")]
    RetriableStatusCodes,
    /// gRPC status UNAVAILABLE.
    #[serde(rename = "unavailable")]
    Unavailable,
    /// gRPC status CANCELLED.
    #[serde(rename = "cancelled")]
    Cancelled,
    /// gRPC status DEADLINE_EXCEEDED.
    #[serde(rename = "deadline-exceeded")]
    DeadlineExceeded,
    /// gRPC status RESOURCE_EXHAUSTED.
    #[serde(rename = "resource-exhausted")]
    ResourceExhausted,
}

/// Exponential backoff.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Backoff {
    /// First interval (default `25ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_interval: Option<Duration>,
    /// Upper bound (default ten times the base interval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_interval: Option<Duration>,
}

/// Fault injection: delays and aborts, each on a percentage of requests.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.delay) || has(self.abort)").message("a fault needs a delay or an abort"))]
pub struct Fault {
    /// Delay requests before forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// Answer requests with an error instead of forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// An injected delay.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    /// How long.
    pub fixed_delay: Duration,
    /// Share of requests delayed, 0–100 (default 100).
    #[serde(default = "default_percent")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
}

/// An injected error response.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    /// Status code returned.
    #[schemars(range(min = 200, max = 599))]
    pub http_status: u16,
    /// Share of requests aborted, 0–100 (default 100).
    #[serde(default = "default_percent")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
}

fn default_percent() -> f64 {
    100.0
}

/// Traffic mirroring.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mirror {
    /// Service in this namespace that receives the copies.
    #[schemars(length(min = 1, max = 63))]
    pub service: String,
    /// Subset of that Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Service port; default: the port of the original request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// Share of requests mirrored, 0–100 (default 100).
    #[serde(default = "default_percent")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
}

/// Header edits: `set` replaces, `add` appends, `remove` deletes.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderModifier {
    /// Headers set, replacing any value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub set: Vec<HeaderValue>,
    /// Headers appended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub add: Vec<HeaderValue>,
    /// Header names removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub remove: Vec<String>,
}

/// A header name and value.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderValue {
    /// Header name.
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
    )]
    pub name: String,
    /// Header value.
    #[schemars(length(max = 4096))]
    pub value: String,
}

/// Path and authority rewrite.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.path) && has(self.pathPrefix))").message("path and pathPrefix are mutually exclusive"))]
#[x_kube(validation = Rule::new("has(self.path) || has(self.pathPrefix) || has(self.authority)").message("a rewrite needs path, pathPrefix or authority"))]
pub struct Rewrite {
    /// Replace the whole path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/"))]
    pub path: Option<String>,
    /// Replace the prefix matched by the rule's `path.prefix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/"))]
    pub path_prefix: Option<String>,
    /// Replace the authority (`Host`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

/// An HTTP redirect answered by the client's proxy.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Redirect {
    /// `http` or `https`; default: unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<Scheme>,
    /// Host; default: unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Port; default: unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// Path; default: unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/"))]
    pub path: Option<String>,
    /// 301, 302 (default), 303, 307 or 308.
    #[serde(default = "default_redirect_code")]
    #[schemars(extend("enum" = [301, 302, 303, 307, 308]))]
    pub status_code: u16,
}

fn default_redirect_code() -> u16 {
    302
}

/// URL scheme.
#[derive(schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum Scheme {
    Http,
    Https,
}

/// A TCP rule: connections are spread over backends by weight.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.backends.exists(b, !has(b.weight) || b.weight > 0)").message("at least one backend needs a weight above zero"))]
pub struct TcpRule {
    /// A name shown in metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub name: Option<String>,
    /// Weighted backends.
    #[schemars(length(min = 1, max = 16))]
    pub backends: Vec<Backend>,
}
