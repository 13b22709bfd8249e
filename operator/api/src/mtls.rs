//! `MtlsPolicy`: which mTLS mode the server-side proxies of a namespace, of
//! some workloads, or of some of their ports apply, overriding the mesh-wide
//! `Mesh.spec.mtls.mode`.
//!
//! The mode a proxy applies to an inbound connection on a target port is the
//! most specific one that is set:
//!
//! 1. the `ports` entry for that port of the workload policy (with a
//!    `selector`) that selects the pod;
//! 2. that workload policy's `mode`;
//! 3. the `ports` entry of the namespace-wide policy (no `selector`);
//! 4. the namespace-wide policy's `mode`;
//! 5. the mesh's mode.
//!
//! One namespace-wide policy per namespace and one workload policy per pod
//! apply: when two overlap, the older one wins (creation time, then name)
//! and the other reports `Accepted=False`, reason `Conflicted`, and is not
//! applied.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::access::WorkloadSelector;
use crate::common::{PortNumber, ResourceStatus};
use crate::mesh::MtlsMode;

/// The mTLS mode of a namespace's or some workloads' inbound traffic.
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "MtlsPolicy",
    namespaced,
    shortname = "mtlspol",
    category = "weft",
    status = "ResourceStatus",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.mode) || size(self.ports) > 0").message("set mode, ports, or both"))]
#[x_kube(validation = Rule::new("self.ports.all(p, self.ports.exists_one(q, q.port == p.port))").message("each port may be listed once"))]
pub struct MtlsPolicySpec {
    /// The pods (in this namespace) it applies to, by labels. Absent: the
    /// whole namespace (the namespace-wide policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,

    /// The mode for every port of the selected pods (absent: inherited
    /// from the namespace-wide policy, else the mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MtlsMode>,

    /// Per target (container) port overrides.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub ports: Vec<PortMtls>,
}

/// The mode of one target port.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMtls {
    /// The pod's (container) port.
    #[schemars(range(min = 1))]
    pub port: PortNumber,
    /// Its mode.
    pub mode: MtlsMode,
}
