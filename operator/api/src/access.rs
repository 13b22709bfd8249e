//! `AccessPolicy`: who may call a workload. Evaluated by the server-side
//! proxy on every inbound request after mTLS has proven the caller's identity.
//!
//! Decision order for a request to a workload: if any `Deny` policy that
//! selects the workload has a matching rule, deny; else if any `Allow` policy
//! selects the workload, allow only when one of their rules matches; else the
//! mesh default (`Mesh.spec.access.defaultAction`, `Allow` unless changed).

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{Labels, ResourceStatus};

/// Authorization for workloads selected by labels or for a Service's pods.
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "AccessPolicy",
    namespaced,
    shortname = "apol",
    category = "weft",
    status = "ResourceStatus",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.targetService"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.selector) && has(self.targetService))").message("set selector or targetService, not both"))]
pub struct AccessPolicySpec {
    /// Pods (in this namespace) the policy protects, by labels. With neither
    /// `selector` nor `targetService`, every meshed pod of the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,

    /// Protect the pods behind this Service (in this namespace), on its
    /// target ports only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub target_service: Option<String>,

    /// `Allow` or `Deny`.
    pub action: Action,

    /// `Enforce` (default): the policy decides. `Audit`: the policy is
    /// evaluated as if enforced, and a request or connection it would
    /// refuse is let through, logged by the proxy and counted in
    /// `weft_proxy_authz_audit_total{policy}`: a dry run before moving to
    /// default-deny. Enforced policies decide as if Audit ones were absent.
    #[serde(default, skip_serializing_if = "is_enforce")]
    pub mode: PolicyMode,

    /// The policy applies to a request matching any rule. An empty list
    /// matches nothing; a rule with neither `from` nor `to` matches every
    /// request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub rules: Vec<AccessRule>,
}

/// Pods selected by labels.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Labels the pod carries (all of them). Empty: every pod.
    #[serde(default)]
    pub match_labels: Labels,
}

/// Allow or deny.
#[derive(
    schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize,
)]
pub enum Action {
    /// Let matching requests through.
    #[default]
    Allow,
    /// Refuse matching requests with 403 (HTTP) or a closed connection (TCP).
    Deny,
}

/// Whether a policy decides or only reports what it would decide.
#[derive(
    schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize,
)]
pub enum PolicyMode {
    /// The policy decides.
    #[default]
    Enforce,
    /// Evaluated, logged and counted; denies nothing.
    Audit,
}

fn is_enforce(m: &PolicyMode) -> bool {
    *m == PolicyMode::Enforce
}

/// One rule: it matches when some `from` entry and some `to` entry match
/// (an omitted list matches anything).
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessRule {
    /// Callers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub from: Vec<Source>,
    /// Request properties.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub to: Vec<Destination>,
}

/// A caller: it matches when every list given contains the caller.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.serviceAccounts) || has(self.namespaces) || has(self.identities) || has(self.unauthenticated)").message("a source needs serviceAccounts, namespaces, identities or unauthenticated"))]
pub struct Source {
    /// Service accounts as `namespace/name`, or `name` for this namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub service_accounts: Vec<String>,
    /// Namespaces of the callers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub namespaces: Vec<String>,
    /// Full SPIFFE identities; a trailing `*` matches a prefix
    /// (`spiffe://cluster.local/ns/shop/*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub identities: Vec<String>,
    /// true: matches callers without a mesh identity (plaintext, Permissive
    /// mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unauthenticated: Option<bool>,
}

/// Request properties.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    /// Target (container) ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub ports: Vec<u16>,
    /// HTTP methods (HTTP only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub methods: Vec<String>,
    /// Paths: exact, or a prefix when ending in `*` (HTTP only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub paths: Vec<String>,
}
