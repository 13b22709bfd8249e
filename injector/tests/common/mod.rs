//! Helpers shared by the injector's integration tests.
#![allow(dead_code)]

pub mod https;

use std::path::PathBuf;

use json_patch::Patch;
use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;
use weft_injector::InjectConfig;

/// `<repo>/target/k8s-validate/injector`: every patched pod is written
/// here for `scripts/k8s-validate.py` (kubernetes-validate, strict, 1.33).
pub fn validate_dir() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let repo = manifest.parent().expect("injector/ lives in the repo root");
    repo.join("target").join("k8s-validate").join("injector")
}

/// Writes a patched pod for schema validation.
pub fn record(name: &str, pod: &Value) {
    let dir = validate_dir();
    std::fs::create_dir_all(&dir).expect("create target/k8s-validate/injector");
    // The validator keys files by name; a generateName pod gets one here,
    // as the API server would give it.
    let mut pod = pod.clone();
    if pod["metadata"].get("name").is_none() {
        let base = pod["metadata"]["generateName"]
            .as_str()
            .unwrap_or("pod-")
            .to_owned();
        pod["metadata"]["name"] = Value::String(format!("{base}x7k2q"));
    }
    let body = serde_json::to_vec_pretty(&pod).expect("pod serializes");
    std::fs::write(dir.join(format!("{name}.json")), body).expect("write patched pod");
}

/// Parses a pod from JSON text.
pub fn pod(json: Value) -> Pod {
    serde_json::from_value(json).expect("test pod is a valid Pod")
}

/// Patches `pod`, applies the patch with json-patch, records the result
/// under `name`, checks a second pass is empty, and returns the patch and
/// the patched pod as JSON.
pub fn inject(name: &str, pod: &Pod, cfg: &InjectConfig) -> (Patch, Value) {
    let patch = weft_injector::patch(pod, cfg).expect("pod can be injected");
    assert!(!patch.0.is_empty(), "{name}: expected a non-empty patch");
    let mut doc = serde_json::to_value(pod).expect("pod serializes");
    json_patch::patch(&mut doc, &patch.0)
        .unwrap_or_else(|e| panic!("{name}: patch does not apply: {e}"));
    record(name, &doc);
    let patched: Pod = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{name}: patched pod is not a Pod: {e}"));
    let again = weft_injector::patch(&patched, cfg).expect("second pass");
    assert!(
        again.0.is_empty(),
        "{name}: second pass must be empty, got {again:?}"
    );
    (patch, doc)
}

/// Names of a list of containers in the patched pod JSON.
pub fn names(doc: &Value, list: &str) -> Vec<String> {
    doc["spec"][list]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| c["name"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The container called `name` in `list`.
pub fn container<'a>(doc: &'a Value, list: &str, name: &str) -> &'a Value {
    doc["spec"][list]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {list} entry named {name}"))
}

/// Value of env var `name` of container `c`.
pub fn env<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    c["env"].as_array()?.iter().find(|e| e["name"] == name)
}
