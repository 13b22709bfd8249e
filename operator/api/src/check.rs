//! Offline validation of weft resources against their generated CRD schemas,
//! the way the API server validates them: OpenAPI constraints (types,
//! enums, ranges, patterns, lengths), strict field checking (an unknown
//! field is an error, as with `kubectl apply --validate=strict`), and the
//! CEL `x-kubernetes-validations` rules, with schema defaults applied first.
//!
//! `weftctl check` and the example tests use it, so a GitOps pipeline can
//! reject a broken resource before it reaches a cluster.

use std::collections::BTreeMap;

use kube_cel::{CompiledSchema, Validator};
use serde_json::Value;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

use crate::{GROUP, VERSION, crds};

/// One problem found in a resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// JSON path of the offending value (`spec.http[0].backends`).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

struct KindSchema {
    raw: Value,
    openapi: jsonschema::Validator,
    cel: CompiledSchema,
}

/// Validates weft resources against the CRDs of this build, and resources
/// of other CRDs given to it ([`Checker::add_crd`], e.g. the Gateway API's).
pub struct Checker {
    /// `apiVersion` → kind → schema.
    kinds: BTreeMap<String, BTreeMap<String, KindSchema>>,
    cel: Validator,
}

impl std::fmt::Debug for Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker")
            .field("api_versions", &self.kinds.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Why a CRD given to [`Checker::add_crd`] cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("CRD {name}: {message}")]
pub struct CrdError {
    /// The CRD's name.
    pub name: String,
    /// What is wrong.
    pub message: String,
}

impl Default for Checker {
    fn default() -> Self {
        Self::new()
    }
}

impl Checker {
    /// Compiles the schemas of every weft CRD.
    pub fn new() -> Self {
        let mut kinds: BTreeMap<String, BTreeMap<String, KindSchema>> = BTreeMap::new();
        for crd in crds() {
            let version = crd
                .spec
                .versions
                .iter()
                .find(|v| v.name == VERSION)
                .expect("every weft CRD serves v1alpha1");
            let schema = version
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .expect("every weft CRD has a schema");
            let raw = serde_json::to_value(schema).expect("a CRD schema serializes");
            let openapi = jsonschema::draft4::new(&raw)
                .expect("the generated schema is a valid JSON schema (tested)");
            let cel = kube_cel::compile_schema(&raw);
            kinds
                .entry(format!("{GROUP}/{VERSION}"))
                .or_default()
                .insert(
                    crd.spec.names.kind.clone(),
                    KindSchema { raw, openapi, cel },
                );
        }
        Self {
            kinds,
            cel: Validator::new(),
        }
    }

    /// Adds every served version of `crd` (a CRD weft does not own, e.g.
    /// the Gateway API's `HTTPRoute`), so resources of it are checked too.
    pub fn add_crd(&mut self, crd: &CustomResourceDefinition) -> Result<(), CrdError> {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let err = |message: String| CrdError {
            name: name.clone(),
            message,
        };
        for v in crd.spec.versions.iter().filter(|v| v.served) {
            let Some(schema) = v
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
            else {
                return Err(err(format!("version {} has no schema", v.name)));
            };
            let raw = serde_json::to_value(schema).map_err(|e| err(e.to_string()))?;
            let openapi = jsonschema::draft4::new(&raw).map_err(|e| err(e.to_string()))?;
            let cel = kube_cel::compile_schema(&raw);
            self.kinds
                .entry(format!("{}/{}", crd.spec.group, v.name))
                .or_default()
                .insert(
                    crd.spec.names.kind.clone(),
                    KindSchema { raw, openapi, cel },
                );
        }
        Ok(())
    }

    /// Whether `apiVersion`/`kind` name a weft resource.
    pub fn is_weft(obj: &Value) -> bool {
        obj.get("apiVersion")
            .and_then(Value::as_str)
            .is_some_and(|v| v.starts_with(&format!("{GROUP}/")))
    }

    /// Whether the checker has a schema for the object's `apiVersion` (a
    /// weft resource, or one of a CRD added).
    pub fn knows(&self, obj: &Value) -> bool {
        Self::is_weft(obj)
            || obj
                .get("apiVersion")
                .and_then(Value::as_str)
                .is_some_and(|v| self.kinds.contains_key(v))
    }

    /// Checks one resource; `Ok` or every problem found.
    pub fn check(&self, obj: &Value) -> Result<(), Vec<Problem>> {
        let problem = |path: &str, message: String| Problem {
            path: path.to_owned(),
            message,
        };
        let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let want = format!("{GROUP}/{VERSION}");
        let Some(kinds) = self.kinds.get(api_version) else {
            return Err(vec![problem(
                "apiVersion",
                format!("{api_version:?} is not {want:?} (nor of a CRD given)"),
            )]);
        };
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
        let Some(schema) = kinds.get(kind) else {
            return Err(vec![problem(
                "kind",
                format!(
                    "{kind:?} is not a kind of {api_version} (one of {})",
                    kinds.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )]);
        };
        let mut problems = Vec::new();
        match obj.pointer("/metadata/name").and_then(Value::as_str) {
            Some(name) if is_dns_subdomain(name) => {}
            Some(name) => problems.push(problem(
                "metadata.name",
                format!("{name:?} is not a DNS subdomain name"),
            )),
            None => problems.push(problem("metadata.name", "is required".to_owned())),
        }
        for err in schema.openapi.iter_errors(obj) {
            problems.push(problem(
                &pointer_to_path(err.instance_path().as_str()),
                err.to_string(),
            ));
        }
        unknown_fields(&schema.raw, obj, "", &mut problems);
        if problems.is_empty()
            && let Err(errs) = self.cel.validate_compiled(&schema.cel, obj, None)
        {
            for e in errs.iter() {
                problems.push(problem(&e.field_path, e.message.clone()));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .split('.')
            .all(|l| !l.is_empty() && !l.starts_with('-') && !l.ends_with('-'))
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

fn pointer_to_path(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').skip(1) {
        if seg.chars().all(|c| c.is_ascii_digit()) && !seg.is_empty() {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg.replace("~1", "/").replace("~0", "~"));
        }
    }
    out
}

/// Reports fields the schema does not declare, as strict field validation
/// does (the API server would otherwise silently prune them).
fn unknown_fields(schema: &Value, value: &Value, path: &str, out: &mut Vec<Problem>) {
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return;
    }
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            for (k, v) in map {
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                if path.is_empty() && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                if let Some(s) = props.and_then(|p| p.get(k)) {
                    unknown_fields(s, v, &child, out);
                } else if let Some(s) = additional.filter(|a| a.is_object()) {
                    unknown_fields(s, v, &child, out);
                } else if props.is_some() && additional.is_none() {
                    out.push(Problem {
                        path: child,
                        message: "unknown field".to_owned(),
                    });
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    unknown_fields(s, v, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}
