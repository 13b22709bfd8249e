//! Offline injection of YAML manifests, for `weftctl inject -f FILE`.
//!
//! Every document of a multi-document YAML stream is read; the pod template
//! of Deployments, StatefulSets, DaemonSets, ReplicaSets,
//! ReplicationControllers, Jobs and CronJobs, and bare Pods, get the same
//! patch the webhook would return; a `List` is walked item by item; all
//! other kinds pass through unchanged. The output is YAML again, one
//! document per input document (map keys come out sorted).

use json_patch::Patch;
use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;

use crate::config::InjectConfig;
use crate::patch::{self, PatchError};

/// Why a manifest stream could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum InjectManifestError {
    /// The input is not YAML.
    #[error("input is not valid YAML: {0}")]
    Yaml(String),
    /// A pod template does not have the shape of a pod.
    #[error("document {index} ({kind} {name:?}): pod template is not a valid Pod: {source}")]
    NotAPod {
        /// 1-based document number.
        index: usize,
        /// Kind of the document.
        kind: String,
        /// `metadata.name` of the document.
        name: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The pod cannot be injected as asked.
    #[error("document {index} ({kind} {name:?}): {source}")]
    Patch {
        /// 1-based document number.
        index: usize,
        /// Kind of the document.
        kind: String,
        /// `metadata.name` of the document.
        name: String,
        /// Why.
        #[source]
        source: Box<PatchError>,
    },
    /// The patch did not apply (a bug in weft: please report it).
    #[error("document {index} ({kind} {name:?}): patch did not apply: {source}")]
    Apply {
        /// 1-based document number.
        index: usize,
        /// Kind of the document.
        kind: String,
        /// `metadata.name` of the document.
        name: String,
        /// Why.
        #[source]
        source: json_patch::PatchError,
    },
    /// The result could not be written as YAML.
    #[error("cannot write YAML: {0}")]
    Write(String),
}

/// Injects every pod template in a multi-document YAML stream and returns
/// the stream as YAML.
pub fn inject_manifests(input: &str, cfg: &InjectConfig) -> Result<String, InjectManifestError> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(input).map_err(|e| InjectManifestError::Yaml(e.to_string()))?;
    let mut out = Vec::with_capacity(docs.len());
    for (i, mut doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        inject_document(&mut doc, i + 1, cfg)?;
        out.push(doc);
    }
    serde_saphyr::to_string_multiple(&out).map_err(|e| InjectManifestError::Write(e.to_string()))
}

fn inject_document(
    doc: &mut Value,
    index: usize,
    cfg: &InjectConfig,
) -> Result<(), InjectManifestError> {
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let template_path = match kind.as_str() {
        "Pod" => "",
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => "/spec/template",
        "CronJob" => "/spec/jobTemplate/spec/template",
        "List" => {
            if let Some(items) = doc.get_mut("items").and_then(Value::as_array_mut) {
                for item in items {
                    inject_document(item, index, cfg)?;
                }
            }
            return Ok(());
        }
        _ => return Ok(()),
    };
    let Some(template) = doc.pointer_mut(template_path) else {
        return Ok(());
    };
    // Templates may omit metadata; the label and annotations need a home.
    if let Some(t) = template.as_object_mut() {
        let meta = t
            .entry("metadata")
            .or_insert_with(|| Value::Object(Default::default()));
        if meta.is_null() {
            *meta = Value::Object(Default::default());
        }
    }
    let pod = pod_of(template).map_err(|source| InjectManifestError::NotAPod {
        index,
        kind: kind.clone(),
        name: name.clone(),
        source,
    })?;
    let Patch(ops) = patch::patch(&pod, cfg).map_err(|source| InjectManifestError::Patch {
        index,
        kind: kind.clone(),
        name: name.clone(),
        source: Box::new(source),
    })?;
    json_patch::patch(template, &ops).map_err(|source| InjectManifestError::Apply {
        index,
        kind,
        name,
        source,
    })
}

/// A pod template (`{metadata, spec}`) or a Pod read as a Pod.
fn pod_of(template: &Value) -> Result<Pod, serde_json::Error> {
    let view = serde_json::json!({
        "metadata": template.get("metadata").cloned().unwrap_or(Value::Null),
        "spec": template.get("spec").cloned().unwrap_or(Value::Null),
    });
    serde_json::from_value(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junk_is_a_yaml_error() {
        let err = inject_manifests("kind: [unclosed", &InjectConfig::default()).expect_err("junk");
        assert!(matches!(err, InjectManifestError::Yaml(_)), "{err}");
    }

    #[test]
    fn empty_input_is_empty_output() {
        let out = inject_manifests("", &InjectConfig::default()).expect("empty");
        assert!(out.trim().is_empty() || out.trim() == "---", "{out:?}");
    }
}
