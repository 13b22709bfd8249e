//! `Mesh`: the cluster-wide settings of weft. A singleton named `default`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::duration::Duration;

/// The name of the one `Mesh` object weft reads.
pub const MESH_NAME: &str = "default";

/// Cluster-wide settings of the weft mesh: identity, mTLS, injection defaults
/// and telemetry. Only the object named `default` is read.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "Mesh",
    plural = "meshes",
    shortname = "wmesh",
    category = "weft",
    status = "MeshStatus",
    validation = Rule::new("self.metadata.name == 'default'").message("the Mesh is a singleton and must be named 'default'"),
    printcolumn = r#"{"name":"Trust Domain","type":"string","jsonPath":".spec.trustDomain"}"#,
    printcolumn = r#"{"name":"mTLS","type":"string","jsonPath":".spec.mtls.mode"}"#,
    printcolumn = r#"{"name":"Identities","type":"integer","jsonPath":".status.identitiesIssued"}"#,
    printcolumn = r#"{"name":"CA Expiry","type":"date","jsonPath":".status.activeCa.notAfter"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MeshSpec {
    /// The SPIFFE trust domain: identities are
    /// `spiffe://<trustDomain>/ns/<namespace>/sa/<serviceaccount>`.
    /// Changing it re-issues every workload certificate.
    #[serde(default = "default_trust_domain")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")
    )]
    pub trust_domain: String,

    /// Mutual TLS between meshed workloads.
    #[serde(default)]
    pub mtls: MtlsSettings,

    /// Workload certificates and the certificate authority that signs them.
    #[serde(default)]
    pub certificates: CertificateSettings,

    /// Defaults for the sidecar the injector adds to pods.
    #[serde(default)]
    pub injection: InjectionSettings,

    /// Metrics, tracing and access logs of the proxies.
    #[serde(default)]
    pub telemetry: TelemetrySettings,

    /// What happens to a request no `AccessPolicy` speaks about, and to
    /// request paths that path rules cannot judge.
    #[serde(default)]
    pub access: AccessSettings,
}

impl Default for MeshSpec {
    fn default() -> Self {
        Self {
            trust_domain: default_trust_domain(),
            mtls: MtlsSettings::default(),
            certificates: CertificateSettings::default(),
            injection: InjectionSettings::default(),
            telemetry: TelemetrySettings::default(),
            access: AccessSettings::default(),
        }
    }
}

fn default_trust_domain() -> String {
    "cluster.local".to_owned()
}

/// How strictly proxies require mutual TLS.
#[derive(
    schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize,
)]
pub enum MtlsMode {
    /// Inbound plaintext is refused; only peers with a mesh certificate get in.
    #[default]
    Strict,
    /// Inbound plaintext is accepted too (for migrating workloads into the
    /// mesh); meshed peers still use mTLS.
    Permissive,
}

/// Mutual TLS settings.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MtlsSettings {
    /// `Strict` (default) refuses plaintext inbound connections; `Permissive`
    /// accepts them.
    #[serde(default)]
    pub mode: MtlsMode,
}

/// Workload certificate and CA settings.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.caSecretRef) || !has(self.rotateCa)").message("rotateCa only applies to the CA weft generates; rotate a user CA by updating its Secret"))]
pub struct CertificateSettings {
    /// Lifetime of workload certificates (default `24h`). They are renewed
    /// at two thirds of their lifetime.
    #[serde(default = "default_ttl")]
    pub ttl: Duration,

    /// Lifetime of the CA weft generates itself (default `87600h`, ten years).
    #[serde(default = "default_ca_ttl")]
    pub ca_ttl: Duration,

    /// A Secret with `tls.crt` (the CA certificate, followed by its chain if
    /// it is an intermediate) and `tls.key`, used instead of a generated CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretReference>,

    /// Set or change this value to rotate the generated CA: the new CA is
    /// trusted everywhere first, then certificates move to it, then the old
    /// one is dropped once nothing it signed is still valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub rotate_ca: Option<String>,
}

impl Default for CertificateSettings {
    fn default() -> Self {
        Self {
            ttl: default_ttl(),
            ca_ttl: default_ca_ttl(),
            ca_secret_ref: None,
            rotate_ca: None,
        }
    }
}

fn default_ttl() -> Duration {
    Duration::new("24h")
}

fn default_ca_ttl() -> Duration {
    Duration::new("87600h")
}

/// A reference to a Secret.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Namespace of the Secret (default: the operator's namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Defaults for injected sidecars; pods override some per annotation.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InjectionSettings {
    /// Image of the proxy (also used for the `weft-init` container).
    #[serde(default = "default_proxy_image")]
    #[schemars(length(min = 1))]
    pub proxy_image: String,

    /// Pull policy for the proxy image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,

    /// Run the proxy as a native sidecar (an init container with
    /// `restartPolicy: Always`, Kubernetes 1.29+), so the app starts after the
    /// proxy is ready and Jobs complete. When false, the proxy is the first
    /// regular container with a postStart hook that waits for readiness.
    #[serde(default = "default_true")]
    pub native_sidecar: bool,

    /// Resources of the proxy container.
    #[serde(default)]
    pub resources: ProxyResources,

    /// Log level of the proxy.
    #[serde(default)]
    pub log_level: LogLevel,

    /// Inbound ports never captured by the proxy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_inbound_ports: Vec<u16>,

    /// Outbound ports never captured by the proxy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_outbound_ports: Vec<u16>,

    /// Outbound destination CIDRs never captured by the proxy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_outbound_cidrs: Vec<String>,
}

impl Default for InjectionSettings {
    fn default() -> Self {
        Self {
            proxy_image: default_proxy_image(),
            image_pull_policy: None,
            native_sidecar: true,
            resources: ProxyResources::default(),
            log_level: LogLevel::default(),
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_proxy_image() -> String {
    "ghcr.io/weft-mesh/weft-proxy:0.1.0".to_owned()
}

/// Image pull policy.
#[derive(schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PullPolicy {
    /// Always pull.
    Always,
    /// Pull if the image is not present on the node.
    IfNotPresent,
    /// Never pull.
    Never,
}

/// Log level of the proxy.
#[derive(
    schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// The default.
    #[default]
    Info,
    /// Verbose.
    Debug,
    /// Everything.
    Trace,
}

/// CPU and memory for the proxy container, as Kubernetes quantities.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyResources {
    /// CPU request (default `10m`).
    #[serde(default = "default_cpu_request")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?m?$"))]
    pub cpu_request: String,
    /// Memory request (default `20Mi`).
    #[serde(default = "default_memory_request")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|k|M|G)?$"))]
    pub memory_request: String,
    /// CPU limit (default none: the proxy should not be throttled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?m?$"))]
    pub cpu_limit: Option<String>,
    /// Memory limit (default `128Mi`).
    #[serde(default = "default_memory_limit")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|k|M|G)?$"))]
    pub memory_limit: String,
}

impl Default for ProxyResources {
    fn default() -> Self {
        Self {
            cpu_request: default_cpu_request(),
            memory_request: default_memory_request(),
            cpu_limit: None,
            memory_limit: default_memory_limit(),
        }
    }
}

fn default_cpu_request() -> String {
    "10m".to_owned()
}
fn default_memory_request() -> String {
    "20Mi".to_owned()
}
fn default_memory_limit() -> String {
    "128Mi".to_owned()
}

/// Telemetry of the proxies.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TelemetrySettings {
    /// Distributed tracing. Proxies always propagate W3C `traceparent` and B3
    /// headers; spans are exported only when an endpoint is set.
    #[serde(default)]
    pub tracing: TracingSettings,
    /// Access logs as JSON lines on the proxy's stdout.
    #[serde(default)]
    pub access_log: AccessLogSettings,
    /// The proxies' traffic metrics.
    #[serde(default)]
    pub metrics: MetricsSettings,
}

/// Traffic metrics settings.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricsSettings {
    /// The names the proxies export traffic metrics under: `Weft`
    /// (default: `weft_requests_total`, `weft_request_duration_seconds`,
    /// …), `Istio` (Istio's standard metrics, `istio_requests_total`, …,
    /// with Istio's label names and values, so existing dashboards and
    /// alerts keep working), or `Both`.
    #[serde(default)]
    pub naming: MetricsNaming,
}

/// Names of the traffic metrics.
#[derive(
    schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize,
)]
pub enum MetricsNaming {
    /// weft's names.
    #[default]
    Weft,
    /// Istio's standard metric and label names.
    Istio,
    /// Both.
    Both,
}

/// Tracing settings.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TracingSettings {
    /// OTLP/HTTP endpoint spans are sent to (protobuf, `POST
    /// <endpoint>/v1/traces`), e.g.
    /// `http://otel-collector.observability:4318`. Unset: no export. Plain
    /// `http://` only: run the collector inside the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^http://.+"))]
    pub otlp_endpoint: Option<String>,
    /// Percentage of new traces sampled (0–100, default 1).
    #[serde(default = "default_sampling")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub sampling_percent: f64,
}

fn default_sampling() -> f64 {
    1.0
}

/// Access log settings. A namespace can turn them up or down with the
/// annotation `weft.dev/access-log: all | errors | off`, and a pod with the
/// same annotation.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessLogSettings {
    /// Write one line per request and per TCP connection on each proxy's
    /// stdout (default false).
    #[serde(default)]
    pub enabled: bool,
    /// `Json` (default) or `Text`.
    #[serde(default)]
    pub format: AccessLogFormat,
    /// `All` (default) or `Errors`: only requests answered 5xx or by a
    /// proxy itself, and TCP connections a proxy refused or closed.
    #[serde(default)]
    pub filter: AccessLogFilter,
    /// Share of requests logged, 0–100 (default 100), so a busy service
    /// can log less.
    #[serde(default = "default_log_sampling")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub sample_percent: f64,
}

impl Default for AccessLogSettings {
    fn default() -> Self {
        AccessLogSettings {
            enabled: false,
            format: AccessLogFormat::default(),
            filter: AccessLogFilter::default(),
            sample_percent: default_log_sampling(),
        }
    }
}

fn default_log_sampling() -> f64 {
    100.0
}

/// Access log line format.
#[derive(
    schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize,
)]
pub enum AccessLogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// One space-separated line per request.
    Text,
}

/// Which requests are logged.
#[derive(
    schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize,
)]
pub enum AccessLogFilter {
    /// Every request.
    #[default]
    All,
    /// Failed requests only.
    Errors,
}

/// The annotation (on a Namespace or a Pod) that turns access logs up or
/// down there: `all`, `errors` or `off`.
pub const ACCESS_LOG_ANNOTATION: &str = "weft.dev/access-log";

/// Mesh-wide authorization defaults.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessSettings {
    /// The decision for a request to a workload that no `Allow`
    /// `AccessPolicy` selects (default `Allow`). `Deny` makes the mesh
    /// default-deny: every workload needs an explicit Allow.
    #[serde(default)]
    pub default_action: crate::access::Action,

    /// What proxies do with a request path holding an encoded slash or
    /// backslash (`%2F`, `%5C`) or a raw backslash, which some apps read as
    /// a path separator and others as data, so `AccessPolicy` path rules
    /// cannot know which resource the app serves. `Reject` (default)
    /// answers 400 `ambiguous-path` and the app never sees the request.
    /// `Keep` passes them on as data of their segment (a raw `\` as
    /// `%5C`), and path rules match them as such: a Deny on `/a/b` does not
    /// refuse `/a%2Fb`. Choose `Keep` only when every meshed app treats an
    /// encoded slash as data.
    #[serde(default)]
    pub escaped_slashes: EscapedSlashes,
}

/// The proxies' answer to a request path with an encoded slash or backslash.
#[derive(
    schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize,
)]
pub enum EscapedSlashes {
    /// Refuse the request with 400 `ambiguous-path`.
    #[default]
    Reject,
    /// Pass `%2F` and `%5C` on encoded, as data of their path segment.
    Keep,
}

/// What the operator reports about the mesh.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshStatus {
    /// The `metadata.generation` the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (the CA is usable and identities are issued) and `CAValid`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The CA signing new workload certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_ca: Option<CaStatus>,
    /// Every CA currently in the trust bundle.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_cas: Vec<CaStatus>,
    /// Where a CA rotation stands.
    #[serde(default)]
    pub rotation_phase: RotationPhase,
    /// How many workload identities are currently issued.
    #[serde(default)]
    pub identities_issued: i64,
}

/// A CA as reported in status.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaStatus {
    /// SHA-256 fingerprint of the CA certificate (hex).
    pub fingerprint: String,
    /// Subject of the CA certificate.
    pub subject: String,
    /// End of validity (RFC 3339).
    pub not_after: String,
    /// `Generated` or `User`.
    pub source: String,
}

/// The phases of a CA rotation.
#[derive(
    schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize,
)]
pub enum RotationPhase {
    /// One CA, nothing in progress.
    #[default]
    Stable,
    /// The new CA is in every trust bundle; leaves are still signed by the old.
    Trusting,
    /// Leaves are being re-issued by the new CA.
    Reissuing,
    /// All leaves moved; the old CA stays trusted until its last leaf expires.
    Retiring,
}
