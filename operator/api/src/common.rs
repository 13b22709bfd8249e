//! Types shared by every weft kind: status conditions and small building blocks.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition type set on every weft resource once the operator has judged it.
pub const CONDITION_ACCEPTED: &str = "Accepted";
/// Condition type set once what was accepted has been written into the
/// namespace's `weft-proxy` ConfigMap. Not `Ready`: proxies never report to
/// the operator, and kubelet delivers the ConfigMap to pods later, so weft
/// cannot know when a proxy runs it.
pub const CONDITION_RENDERED: &str = "Rendered";

/// The status every namespaced weft resource carries.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceStatus {
    /// The `metadata.generation` the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions: `Accepted` (the spec is valid and refers to things
    /// that exist) and `Rendered` (it is written into the namespace's
    /// `weft-proxy` ConfigMap; the message names the config generation and
    /// hash that first carried it, to compare with a proxy's `/config`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Labels that select pods, with the semantics of a Service selector: every
/// key must be present with the given value.
pub type Labels = BTreeMap<String, String>;

/// A port number (1–65535).
pub type PortNumber = u16;

/// Returns the condition of the given type, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}
