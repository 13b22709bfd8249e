//! Offline rendering for `weftctl render -f FILES`: Kubernetes objects (as
//! parsed YAML or JSON) in, the exact `proxy.json` of each namespace out.
//!
//! Which namespaces are rendered: every namespace a `Namespace` object labels
//! `weft.dev/inject=enabled`, and every namespace that objects live in but no
//! `Namespace` object describes (the reader is asking what it would get, so
//! it is assumed meshed). Kinds weft does not read (Deployments, ...) are
//! skipped and listed in [`OfflineOutput::ignored`], so a whole manifest
//! directory can be passed as is.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Namespace;
use serde::de::DeserializeOwned;
use weft_proxy_config::ProxyConfig;

use super::{CrStatus, judge, render};
use crate::index::{INJECT_ENABLED, INJECT_LABEL, Index, Object};

/// Why offline input could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// The text is not YAML.
    #[error("document is not valid YAML: {0}")]
    Yaml(#[from] serde_saphyr::Error),
    /// A document is not an object with `apiVersion` and `kind`.
    #[error("document {index}: not a Kubernetes object (needs apiVersion and kind)")]
    NotAnObject {
        /// Position of the document in the input, from 0.
        index: usize,
    },
    /// An object of a kind weft reads does not have the expected shape.
    #[error("document {index} ({kind} {name}): {source}")]
    Shape {
        /// Position of the document in the input, from 0.
        index: usize,
        /// Its kind.
        kind: String,
        /// Its name.
        name: String,
        /// What serde found wrong.
        source: serde_json::Error,
    },
}

/// What [`render_offline`] produces.
#[derive(Clone, Debug, PartialEq)]
pub struct OfflineOutput {
    /// Namespace → its sealed config.
    pub configs: BTreeMap<String, ProxyConfig>,
    /// `namespace/name` of each Gateway of weft's class → its gateway
    /// proxy's config (listeners' certificate Secrets assumed present:
    /// offline there is no cluster to read them from) and the verdict on
    /// its listeners.
    pub gateways: BTreeMap<String, super::gateway::GatewayRender>,
    /// The verdict on every weft resource given, sorted by kind, namespace, name.
    pub statuses: Vec<CrStatus>,
    /// `kind namespace/name` of objects skipped because weft does not read them.
    pub ignored: Vec<String>,
}

/// Parses a (multi-document) YAML or JSON text into objects. Empty documents
/// are skipped; `kind: List` documents are flattened into their `items`.
pub fn parse_yaml(text: &str) -> Result<Vec<serde_json::Value>, OfflineError> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(text)?;
    let mut out = Vec::with_capacity(docs.len());
    for doc in docs {
        if doc.is_null() {
            continue;
        }
        let is_list = doc.get("kind").and_then(|k| k.as_str()) == Some("List");
        match (is_list, doc.get("items").and_then(|i| i.as_array())) {
            (true, Some(items)) => out.extend(items.iter().cloned()),
            _ => out.push(doc),
        }
    }
    Ok(out)
}

fn convert<T: DeserializeOwned>(
    index: usize,
    kind: &str,
    value: serde_json::Value,
) -> Result<Box<T>, OfflineError> {
    let name = value
        .pointer("/metadata/name")
        .and_then(|n| n.as_str())
        .unwrap_or("<unnamed>")
        .to_owned();
    serde_json::from_value(value)
        .map(Box::new)
        .map_err(|source| OfflineError::Shape {
            index,
            kind: kind.to_owned(),
            name,
            source,
        })
}

/// Turns one parsed object into an index [`Object`]; `Ok(None)` for kinds
/// weft does not read.
pub fn to_object(
    index: usize,
    mut value: serde_json::Value,
) -> Result<Option<Object>, OfflineError> {
    let (Some(api_version), Some(kind)) = (
        value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .map(str::to_owned),
        value
            .get("kind")
            .and_then(|v| v.as_str())
            .map(str::to_owned),
    ) else {
        return Err(OfflineError::NotAnObject { index });
    };
    let namespaced = !matches!(kind.as_str(), "Namespace" | "Mesh" | "GatewayClass");
    if namespaced
        && let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut())
        && !meta.contains_key("namespace")
    {
        meta.insert("namespace".into(), serde_json::Value::from("default"));
    }
    let object = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => Object::Namespace(convert(index, &kind, value)?),
        ("v1", "Service") => Object::Service(convert(index, &kind, value)?),
        ("v1", "Pod") => Object::Pod(convert(index, &kind, value)?),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            Object::EndpointSlice(convert(index, &kind, value)?)
        }
        ("weft.dev/v1alpha1", "Mesh") => Object::Mesh(convert(index, &kind, value)?),
        ("weft.dev/v1alpha1", "ServiceRoute") => {
            Object::ServiceRoute(convert(index, &kind, value)?)
        }
        ("weft.dev/v1alpha1", "ServicePolicy") => {
            Object::ServicePolicy(convert(index, &kind, value)?)
        }
        ("weft.dev/v1alpha1", "AccessPolicy") => {
            Object::AccessPolicy(convert(index, &kind, value)?)
        }
        ("weft.dev/v1alpha1", "MtlsPolicy") => Object::MtlsPolicy(convert(index, &kind, value)?),
        ("gateway.networking.k8s.io/v1", "HTTPRoute") => {
            Object::HttpRoute(convert(index, &kind, value)?)
        }
        (
            "gateway.networking.k8s.io/v1alpha2" | "gateway.networking.k8s.io/v1alpha3",
            "TLSRoute",
        ) => Object::TlsRoute(convert(index, &kind, value)?),
        (
            "gateway.networking.k8s.io/v1beta1" | "gateway.networking.k8s.io/v1",
            "ReferenceGrant",
        ) => Object::ReferenceGrant(convert(index, &kind, value)?),
        ("gateway.networking.k8s.io/v1", "Gateway") => {
            Object::Gateway(convert(index, &kind, value)?)
        }
        ("gateway.networking.k8s.io/v1", "GatewayClass") => {
            Object::GatewayClass(convert(index, &kind, value)?)
        }
        _ => return Ok(None),
    };
    Ok(Some(object))
}

/// Renders every namespace the objects describe (see the module docs).
pub fn render_offline(objects: Vec<serde_json::Value>) -> Result<OfflineOutput, OfflineError> {
    let mut index = Index::new();
    let mut ignored = Vec::new();
    for (i, value) in objects.into_iter().enumerate() {
        let label = format!(
            "{} {}/{}",
            value.get("kind").and_then(|v| v.as_str()).unwrap_or("?"),
            value
                .pointer("/metadata/namespace")
                .and_then(|v| v.as_str())
                .unwrap_or(""),
            value
                .pointer("/metadata/name")
                .and_then(|v| v.as_str())
                .unwrap_or("?"),
        );
        match to_object(i, value)? {
            Some(o) => {
                index.apply(o);
            }
            None => ignored.push(label),
        }
    }
    for ns in index.all_namespaces() {
        if !index.has_namespace(&ns) {
            let mut n = Namespace::default();
            n.metadata.name = Some(ns);
            n.metadata.labels = Some(BTreeMap::from([(
                INJECT_LABEL.to_owned(),
                INJECT_ENABLED.to_owned(),
            )]));
            index.apply(Object::Namespace(Box::new(n)));
        }
    }
    let mut configs = BTreeMap::new();
    let mut statuses = Vec::new();
    for ns in index.all_namespaces() {
        if index.is_meshed(&ns) {
            let out = render(&index, &ns);
            statuses.extend(out.statuses);
            configs.insert(ns, out.config);
        } else {
            statuses.extend(judge(&index, &ns));
        }
    }
    statuses.sort_by(|a, b| (a.kind, &a.object).cmp(&(b.kind, &b.object)));
    let gateways = index
        .weft_gateways()
        .filter_map(|(ns, name, _)| {
            super::gateway::render_gateway(&index, ns, name, &|_, _| true)
                .map(|g| (format!("{ns}/{name}"), g))
        })
        .collect();
    Ok(OfflineOutput {
        configs,
        gateways,
        statuses,
        ignored,
    })
}
