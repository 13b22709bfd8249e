//! `ServicePolicy`: how clients talk to one Service — subsets, load
//! balancing, connection limits (circuit breaking), outlier detection, retry
//! budget — plus the Service's local rate limit and protocol settings.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{Labels, ResourceStatus};
use crate::duration::Duration;

/// Traffic policy for one Service (`spec.service`).
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "ServicePolicy",
    namespaced,
    shortname = "spol",
    category = "weft",
    status = "ResourceStatus",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.service"}"#,
    printcolumn = r#"{"name":"LB","type":"string","jsonPath":".spec.loadBalancer.kind"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.subsets) || self.subsets.all(s, self.subsets.exists_one(t, t.name == s.name))").message("subset names must be unique"))]
pub struct ServicePolicySpec {
    /// Name of the Service (in this namespace) the policy applies to.
    #[schemars(length(min = 1, max = 63))]
    pub service: String,

    /// Named groups of the Service's endpoints, selected by pod labels;
    /// `ServiceRoute` backends refer to them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub subsets: Vec<Subset>,

    /// How a client picks an endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,

    /// Limits on connections and requests from each client proxy (circuit
    /// breaking): requests beyond them fail fast with 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,

    /// Passive health checking: endpoints that fail repeatedly are ejected
    /// from load balancing for a while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,

    /// Caps retries to a share of regular traffic, so retries cannot turn an
    /// outage into a retry storm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudget>,

    /// A rate limit enforced by each server-side proxy of the Service's pods
    /// on requests to the Service's ports; excess requests get 429.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<LocalRateLimit>,

    /// Protocol per Service port, overriding the Service's `appProtocol` and
    /// detection.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub ports: Vec<PortProtocol>,

    /// Ports whose traffic is opaque TCP: never inspected, never waited on
    /// for the client to speak first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub opaque_ports: Vec<u16>,
}

/// A named subset of a Service's endpoints.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    /// Name, referenced by `ServiceRoute` backends.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Pod labels that endpoints of the subset carry (all of them).
    #[schemars(length(min = 1))]
    pub labels: Labels,
}

/// Load balancing.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(self.kind == 'ConsistentHash') == has(self.consistentHash)").message("consistentHash is set exactly when kind is ConsistentHash"))]
pub struct LoadBalancer {
    /// The algorithm (default `LeastRequest`).
    #[serde(default)]
    pub kind: LoadBalancerKind,
    /// The hash key, for `ConsistentHash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHash>,
}

/// Load balancing algorithms.
#[derive(
    schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize,
)]
pub enum LoadBalancerKind {
    /// Each endpoint in turn.
    RoundRobin,
    /// Power of two choices: of two random endpoints, the one with fewer
    /// requests in flight.
    #[default]
    LeastRequest,
    /// Uniformly random.
    Random,
    /// Requests with the same key go to the same endpoint while it stays.
    ConsistentHash,
}

/// The key of consistent hashing: exactly one of header, cookie, sourceIp.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.header), has(self.cookie), has(self.sourceIp) && self.sourceIp].filter(x, x).size() == 1").message("exactly one of header, cookie or sourceIp must be set"))]
pub struct ConsistentHash {
    /// Hash on this request header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub header: Option<String>,
    /// Hash on this cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<HashCookie>,
    /// Hash on the client's IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<bool>,
}

/// A cookie used as hash key.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HashCookie {
    /// Cookie name.
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
}

/// Connection and request limits per client proxy.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    /// Maximum connections to all endpoints of the Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<u32>,
    /// Maximum requests waiting for a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_pending_requests: Option<u32>,
    /// Maximum requests in flight to the Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_requests: Option<u32>,
    /// Requests per connection before it is closed (0 or unset: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    /// Timeout for establishing a connection (default `1s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
    /// Idle connections are closed after this (default `90s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
}

/// Outlier detection (passive health checking).
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive 5xx responses (or connect failures) before ejection
    /// (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub consecutive_5xx_errors: Option<u32>,
    /// Consecutive 502/503/504 or connect failures before ejection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub consecutive_gateway_errors: Option<u32>,
    /// How often ejections are reconsidered (default `10s`): an ejected
    /// endpoint comes back at the first interval after its ejection time,
    /// so an ejection lasts whole intervals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// Ejection time, multiplied by the number of times the endpoint has been
    /// ejected (default `30s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<Duration>,
    /// At most this share of endpoints is ejected at once (default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub max_ejection_percent: Option<u32>,
}

/// Retry budget.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    /// Retries allowed as a percentage of requests (default 20).
    #[serde(default = "default_retry_percent")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub retry_percent: f64,
    /// Retries always allowed per second regardless of the ratio (default 10).
    #[serde(default = "default_min_retries")]
    pub min_retries_per_second: u32,
    /// The window over which requests are counted (default `10s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
}

fn default_retry_percent() -> f64 {
    20.0
}
fn default_min_retries() -> u32 {
    10
}

/// A token-bucket rate limit, local to each proxy.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalRateLimit {
    /// Requests allowed per `unit`.
    #[schemars(range(min = 1))]
    pub requests: u32,
    /// The time unit.
    pub unit: RateLimitUnit,
    /// Extra requests allowed in a burst (default 0).
    #[serde(default)]
    pub burst: u32,
}

/// Rate limit units.
#[derive(
    schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize,
)]
#[allow(missing_docs)]
pub enum RateLimitUnit {
    #[default]
    Second,
    Minute,
    Hour,
}

/// The protocol of one Service port.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortProtocol {
    /// The Service port.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Its protocol.
    pub protocol: Protocol,
}

/// Application protocols the proxy understands.
#[derive(
    schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize,
)]
pub enum Protocol {
    /// HTTP/1.1.
    #[serde(rename = "HTTP")]
    #[default]
    Http,
    /// HTTP/2 (prior knowledge).
    #[serde(rename = "HTTP2")]
    Http2,
    /// gRPC (HTTP/2 with trailers).
    #[serde(rename = "GRPC")]
    Grpc,
    /// Opaque TCP.
    #[serde(rename = "TCP")]
    Tcp,
}
