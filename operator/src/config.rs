//! The reconcilers of the traffic half: watch the cluster, keep the
//! [`Index`] current, and write each meshed namespace's ConfigMap
//! `weft-proxy` plus the status of every weft resource.
//!
//! ```text
//! watchers (Mesh, Namespaces, Services, EndpointSlices, Pods as metadata,
//!           injected Pods' service accounts, the weft CRs, weft-proxy ConfigMaps)
//!     │ apply/delete → Dirty namespaces
//!     ▼
//! debounce (first mark opens a window of `debounce`; everything marked
//!           inside it is one batch, so a burst of endpoint updates is one
//!           render and at most one write per namespace)
//!     │
//!     ▼ for each namespace of the batch
//! render (pure, cached) ──► encode (plain / gzip / too large) ──► server-side apply
//!                                                      ──► CR status (Accepted, Rendered)
//! ```
//!
//! Decisions that matter to operators:
//!
//! - **No write without a change.** The generation and hash of the ConfigMap
//!   already in a namespace are read back from its annotations
//!   (`weft.dev/config-generation`, `weft.dev/config-hash`) before the first
//!   render, so a restarted operator renders the same bytes and writes
//!   nothing.
//! - **One renderer, kept.** The writer keeps a [`Renderer`] across batches:
//!   what did not change since the last render is not rendered, serialized,
//!   hashed or compressed again (see [`crate::render::Renderer`]).
//! - **Size.** `proxy.json` goes in `data`; above
//!   [`ConfigOptions::gzip_threshold`] it goes gzip-compressed into
//!   `binaryData` as `proxy.json.gz`; if even that exceeds
//!   [`ConfigOptions::max_bytes`], nothing is written (the proxies keep the
//!   last good config), a Warning Event `ConfigTooLarge` is recorded on the
//!   Namespace and the namespace's weft resources get `Rendered=False` with
//!   the same reason. Never a truncated config.
//! - **Leaving the mesh** deletes the ConfigMap (only one carrying weft's
//!   hash annotation).
//! - **Pods** are watched as metadata only (labels; `Api<PartialObjectMeta<Pod>>`, what
//!   `metadata_watcher` was) for all pods, plus a full
//!   watch restricted to `weft.dev/proxy=injected` pods, because a pod's
//!   service account (its identity) is in its spec, not its metadata. The
//!   second watch can go once the injector stamps the service account on
//!   the pod's metadata.
//! - **No owner reference** on the ConfigMap: its only natural owner, the
//!   `Mesh`, must not take every proxy config with it when deleted; a
//!   namespace's deletion removes it anyway.
//! - **`Rendered`, never `Ready`.** Proxies never talk to the operator and
//!   kubelet delivers a ConfigMap to pods a minute or two after it is
//!   written, so the operator cannot know when proxies run a resource. A
//!   resource's `Rendered=True` names the config generation and hash of the
//!   `weft-proxy` ConfigMap that first carried it; a proxy whose `/config`
//!   shows that generation or a later one runs it. Later renders of the
//!   namespace (endpoint changes) leave that message alone, so they cost no
//!   status writes.
//! - `lastTransitionTime` of a condition is set when weft patches the
//!   condition, which it does only when the verdict or message changes.
//!
//! Metrics: [`ConfigMetrics`] (`weft_config_writes_total` and friends),
//! registered into the operator's registry with [`ConfigMetrics::register`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ObjectReference, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Client, Resource, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::sync::mpsc;
use weft_api::common::{CONDITION_ACCEPTED, CONDITION_RENDERED, ResourceStatus, find_condition};
use weft_api::gateway::{
    GATEWAY_CONTROLLER, Gateway, GatewayClass, HTTPRoute, MESH_CONTROLLER, ReferenceGrant,
    RouteParentStatus, TLSRoute,
};
use weft_api::{AccessPolicy, Mesh, MtlsPolicy, ServicePolicy, ServiceRoute};
use weft_proxy_config::{FILE_NAME, GZIP_FILE_NAME, SIGNATURE_FILE_NAME, ValidationErrors};

use crate::index::{
    Dirty, INJECT_LABEL, Index, Kind, Object, ObjectRef, PROXY_INJECTED, PROXY_LABEL, Previous,
};
use crate::render::{CrStatus, Document, Payload, Renderer, judge};
use crate::signing::ConfigSigner;

/// Name of the ConfigMap written in every meshed namespace.
pub const CONFIG_MAP_NAME: &str = "weft-proxy";
/// Field manager of every write.
pub const FIELD_MANAGER: &str = "weft-operator";
/// Annotation holding the content hash of the written config.
pub const HASH_ANNOTATION: &str = "weft.dev/config-hash";
/// Annotation holding the generation of the written config.
pub const GENERATION_ANNOTATION: &str = "weft.dev/config-generation";
/// Annotation holding [`content_digest`] of what weft wrote in the
/// ConfigMap's `data` and `binaryData`, so a hand edit of the content that
/// leaves the hash annotation alone is noticed (and undone).
pub const CONTENT_DIGEST_ANNOTATION: &str = "weft.dev/content-digest";
/// Annotation holding the fingerprint of the config signer that signed
/// the ConfigMap's `proxy.json.sig` (see [`crate::signing`]).
pub const SIGNER_ANNOTATION: &str = "weft.dev/config-signer";
/// Kubernetes rejects objects above 1 MiB; leave room for metadata.
pub const DEFAULT_MAX_BYTES: usize = 1024 * 1024 - 16 * 1024;

/// Errors of the config reconcilers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A write to the API server failed.
    #[error("{action} {what}: {source}")]
    Kube {
        /// What was attempted (`apply`, `delete`, `patch status of`).
        action: &'static str,
        /// The object, `kind namespace/name`.
        what: String,
        /// The API error.
        source: kube::Error,
    },
    /// A document could not be signed (retried).
    #[error("signing the proxy config of namespace {namespace}: {reason}")]
    Signing {
        /// The namespace.
        namespace: String,
        /// Why.
        reason: String,
    },
    /// The writer's queue closed: every watcher stopped.
    #[error("every watcher stopped; the operator must restart")]
    WatchersGone,
}

/// Counters of the config reconcilers.
#[derive(Clone, Debug, Default)]
pub struct ConfigMetrics {
    /// ConfigMaps written (server-side applies that changed content).
    pub writes: Counter,
    /// Namespace renders performed.
    pub renders: Counter,
    /// Renders whose result was unchanged, so nothing was written.
    pub unchanged: Counter,
    /// Renders too large to write.
    pub too_large: Counter,
    /// ConfigMaps deleted because their namespace left the mesh.
    pub deletes: Counter,
    /// ConfigMaps written again because their content was edited by hand.
    pub restored: Counter,
}

impl ConfigMetrics {
    /// Registers the counters. In the operator's registry (prefix `weft`)
    /// they are `weft_config_writes_total`, `weft_config_renders_total`,
    /// `weft_config_unchanged_total`, `weft_config_too_large_total`,
    /// `weft_config_deletes_total` and `weft_config_restored_total`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "config_writes",
            "weft-proxy ConfigMaps written",
            self.writes.clone(),
        );
        registry.register(
            "config_renders",
            "Namespace proxy configs rendered",
            self.renders.clone(),
        );
        registry.register(
            "config_unchanged",
            "Renders skipped because the content hash was unchanged",
            self.unchanged.clone(),
        );
        registry.register(
            "config_too_large",
            "Renders not written because they exceed the ConfigMap size limit",
            self.too_large.clone(),
        );
        registry.register(
            "config_deletes",
            "weft-proxy ConfigMaps deleted when a namespace left the mesh",
            self.deletes.clone(),
        );
        registry.register(
            "config_restored",
            "weft-proxy ConfigMaps written again because they were edited outside weft",
            self.restored.clone(),
        );
    }
}

/// Settings of [`run`].
#[derive(Clone, Debug)]
pub struct ConfigOptions {
    /// How long changes are collected after the first one before rendering.
    pub debounce: Duration,
    /// Above this many bytes, `proxy.json` is written gzip-compressed.
    pub gzip_threshold: usize,
    /// Largest payload written; above it the config is not written at all.
    pub max_bytes: usize,
    /// Delay before a namespace whose write failed is tried again.
    pub retry_after: Duration,
    /// Counters (register them with [`ConfigMetrics::register`]).
    pub metrics: ConfigMetrics,
    /// Events are reported as `weft-operator` with this instance (pod name).
    pub instance: Option<String>,
}

impl Default for ConfigOptions {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(250),
            gzip_threshold: 256 * 1024,
            max_bytes: DEFAULT_MAX_BYTES,
            retry_after: Duration::from_secs(5),
            metrics: ConfigMetrics::default(),
            instance: None,
        }
    }
}

// ---------------------------------------------------------------------------
// Pure parts: encoding, the ConfigMap, status patches, debounce.

/// How a config goes into its ConfigMap.
#[derive(Clone, Debug, PartialEq)]
pub enum Encoded {
    /// `data["proxy.json"]`.
    Plain(String),
    /// `binaryData["proxy.json.gz"]`, as shared parts.
    Gzip(Payload),
    /// Too large even compressed: not written.
    TooLarge {
        /// Size of `proxy.json`.
        raw: usize,
        /// Size compressed.
        gzipped: usize,
    },
}

/// Chooses plain, gzip or nothing for a rendered document.
pub fn encode(document: &Document, gzip_threshold: usize, max_bytes: usize) -> Encoded {
    let raw = document.raw_len();
    if raw <= gzip_threshold && raw <= max_bytes {
        // serde_json writes UTF-8.
        return Encoded::Plain(String::from_utf8_lossy(&document.to_json()).into_owned());
    }
    let gz = document.gzip();
    if gz.len() <= max_bytes {
        Encoded::Gzip(gz)
    } else {
        Encoded::TooLarge {
            raw,
            gzipped: gz.len(),
        }
    }
}

/// A document's `proxy.json.sig` and the fingerprint of its signer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signed {
    /// The content of `proxy.json.sig`.
    pub signature: String,
    /// [`ConfigSigner::fingerprint`] of the signer.
    pub signer: String,
}

impl Signed {
    /// Signs `document` of `namespace` with `signer`.
    pub fn new(
        signer: &ConfigSigner,
        namespace: &str,
        document: &Document,
    ) -> Result<Self, String> {
        Ok(Self {
            signature: signer
                .sign(namespace, document.hash())
                .map_err(|e| e.to_string())?,
            signer: signer.fingerprint().to_owned(),
        })
    }
}

/// The ConfigMap holding a document and its signature. `None` for
/// [`Encoded::TooLarge`].
pub fn config_map(
    namespace: &str,
    document: &Document,
    encoded: &Encoded,
    signed: &Signed,
) -> Option<ConfigMap> {
    let sig = (SIGNATURE_FILE_NAME.to_owned(), signed.signature.clone());
    let (data, binary_data) = match encoded {
        Encoded::Plain(s) => (
            Some(BTreeMap::from([(FILE_NAME.to_owned(), s.clone()), sig])),
            None,
        ),
        Encoded::Gzip(b) => (
            Some(BTreeMap::from([sig])),
            Some(BTreeMap::from([(
                GZIP_FILE_NAME.to_owned(),
                ByteString(b.to_vec()),
            )])),
        ),
        Encoded::TooLarge { .. } => return None,
    };
    let digest = digest_of(data.as_ref(), binary_data.as_ref());
    Some(ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONFIG_MAP_NAME.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                FIELD_MANAGER.to_owned(),
            )])),
            annotations: Some(BTreeMap::from([
                (HASH_ANNOTATION.to_owned(), document.hash().to_owned()),
                (
                    GENERATION_ANNOTATION.to_owned(),
                    document.generation().to_string(),
                ),
                (CONTENT_DIGEST_ANNOTATION.to_owned(), digest),
                (SIGNER_ANNOTATION.to_owned(), signed.signer.clone()),
            ])),
            ..Default::default()
        },
        data,
        binary_data,
        ..Default::default()
    })
}

/// `sha256:<hex>` over every key and value of a ConfigMap's `data` and
/// `binaryData`, in key order (each key and value length-prefixed, so no
/// two contents share a digest by moving bytes between keys).
pub fn content_digest(cm: &ConfigMap) -> String {
    digest_of(cm.data.as_ref(), cm.binary_data.as_ref())
}

fn digest_of(
    data: Option<&BTreeMap<String, String>>,
    binary: Option<&BTreeMap<String, ByteString>>,
) -> String {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    let mut part = |tag: u8, key: &str, value: &[u8]| {
        h.update([tag]);
        h.update((key.len() as u64).to_be_bytes());
        h.update(key.as_bytes());
        h.update((value.len() as u64).to_be_bytes());
        h.update(value);
    };
    for (k, v) in data.into_iter().flatten() {
        part(b'd', k, v.as_bytes());
    }
    for (k, v) in binary.into_iter().flatten() {
        part(b'b', k, &v.0);
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The generation and hash a weft ConfigMap announces, and whether its
/// content is still what weft wrote (its [`CONTENT_DIGEST_ANNOTATION`]);
/// `None` for a ConfigMap weft did not write.
pub fn previous_from(cm: &ConfigMap) -> Option<Previous> {
    let a = cm.metadata.annotations.as_ref()?;
    let hash = a.get(HASH_ANNOTATION)?.clone();
    let generation = a.get(GENERATION_ANNOTATION)?.parse().ok()?;
    let edited = a.get(CONTENT_DIGEST_ANNOTATION) != Some(&content_digest(cm));
    Some(Previous {
        generation,
        hash,
        edited,
        signer: a.get(SIGNER_ANNOTATION).cloned(),
    })
}

/// What happened to the config of a CR's namespace, for its `Rendered`
/// condition.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Delivery {
    /// The namespace's config is written and current: ConfigMap
    /// `weft-proxy` holds the document of this generation and hash.
    Written {
        /// `generation` of the written `proxy.json`.
        generation: u64,
        /// Its `hash`, as a proxy's `/config` shows it.
        hash: String,
    },
    /// The namespace's config is too large to write.
    TooLarge,
    /// The namespace is not in the mesh; nothing is written for it.
    NotMeshed,
    /// The rendered config failed validation (a weft bug) and was not written.
    Invalid,
}

/// The server-side apply body of a CR's status.
pub fn status_patch(status: &CrStatus, delivery: &Delivery, now: &str) -> serde_json::Value {
    let kind = match status.kind {
        Kind::ServiceRoute => "ServiceRoute",
        Kind::ServicePolicy => "ServicePolicy",
        Kind::MtlsPolicy => "MtlsPolicy",
        _ => "AccessPolicy",
    };
    let (rendered, rendered_reason, rendered_message) = match (status.rendered(), delivery) {
        (false, _) => (
            "False",
            "NotAccepted",
            "nothing of this resource is rendered".to_owned(),
        ),
        (true, Delivery::Written { generation, hash }) => (
            "True",
            "Rendered",
            format!(
                "rendered into ConfigMap {CONFIG_MAP_NAME} at config generation {generation} ({hash}); proxies run it once kubelet has delivered that ConfigMap to their pod, which weft cannot see: a proxy whose /config shows generation {generation} or later runs it"
            ),
        ),
        (true, Delivery::TooLarge) => (
            "False",
            "ConfigTooLarge",
            "the namespace's proxy config exceeds the ConfigMap size limit and was not written; see the Namespace's events".to_owned(),
        ),
        (true, Delivery::NotMeshed) => (
            "False",
            "NamespaceNotMeshed",
            format!("label the namespace {INJECT_LABEL}=enabled to render it"),
        ),
        (true, Delivery::Invalid) => (
            "False",
            "InvalidConfig",
            "the namespace's rendered proxy config failed validation and was not written; see the operator's log".to_owned(),
        ),
    };
    let mut conditions = vec![json!({
        "type": CONDITION_ACCEPTED,
        "status": if status.accepted() { "True" } else { "False" },
        "reason": status.reason(),
        "message": status.message(),
        "observedGeneration": status.generation,
        "lastTransitionTime": now,
    })];
    conditions.push(json!({
        "type": CONDITION_RENDERED,
        "status": rendered,
        "reason": rendered_reason,
        "message": rendered_message,
        "observedGeneration": status.generation,
        "lastTransitionTime": now,
    }));
    json!({
        "apiVersion": "weft.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": status.object.name, "namespace": status.object.namespace},
        "status": {
            "observedGeneration": status.generation,
            "conditions": conditions,
        }
    })
}

/// The `status.parents` of an HTTPRoute with weft's verdict `st`: every
/// other controller's entry kept as it is and where it is, weft's entries
/// (controllers [`MESH_CONTROLLER`] and [`GATEWAY_CONTROLLER`]) replaced by
/// one per parent judged. A condition whose status, reason, message and generation hold
/// keeps its `lastTransitionTime`, so an unchanged verdict writes nothing.
pub fn route_parents(
    current: &[RouteParentStatus],
    st: &CrStatus,
    now: &Time,
) -> Vec<RouteParentStatus> {
    let ours = |c: &str| c == MESH_CONTROLLER || c == GATEWAY_CONTROLLER;
    let mut out: Vec<RouteParentStatus> = current
        .iter()
        .filter(|p| !ours(&p.controller_name))
        .cloned()
        .collect();
    for v in &st.parents {
        let old = current
            .iter()
            .find(|p| p.controller_name == v.controller && p.parent_ref == v.parent);
        let condition =
            |type_: &str, verdict: &Option<(&'static str, String)>, ok: &str, ok_msg: &str| {
                let (status, reason, message) = match verdict {
                    None => ("True", ok.to_owned(), ok_msg.to_owned()),
                    Some((r, m)) => ("False", (*r).to_owned(), m.clone()),
                };
                let mut c = Condition {
                    type_: type_.to_owned(),
                    status: status.to_owned(),
                    reason,
                    message,
                    observed_generation: st.generation,
                    last_transition_time: now.clone(),
                };
                if let Some(o) = old.and_then(|o| o.conditions.iter().find(|c| c.type_ == type_))
                    && o.status == c.status
                {
                    c.last_transition_time = o.last_transition_time.clone();
                    if o.reason == c.reason
                        && o.message == c.message
                        && o.observed_generation == c.observed_generation
                    {
                        c = o.clone();
                    }
                }
                c
            };
        out.push(RouteParentStatus {
            parent_ref: v.parent.clone(),
            controller_name: v.controller.to_owned(),
            conditions: vec![
                condition(
                    "Accepted",
                    &v.refused,
                    "Accepted",
                    if v.controller == MESH_CONTROLLER {
                        "weft routes this Service's mesh traffic by this route"
                    } else {
                        "attached to the Gateway's listeners"
                    },
                ),
                condition(
                    "ResolvedRefs",
                    &v.unresolved,
                    "ResolvedRefs",
                    "every backend reference resolves",
                ),
            ],
        });
    }
    out
}

/// The parts of a condition a status write decides (not its time).
fn condition_key(c: &serde_json::Value) -> [String; 5] {
    let text = |k: &str| match &c[k] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        v => v.to_string(),
    };
    ["type", "status", "reason", "message", "observedGeneration"].map(text)
}

/// Whether `current` already says what the status patch `body` would.
pub fn status_unchanged(current: &ResourceStatus, body: &serde_json::Value) -> bool {
    let Ok(current) = serde_json::to_value(current) else {
        return false;
    };
    let desired = &body["status"];
    if current["observedGeneration"] != desired["observedGeneration"] {
        return false;
    }
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<[String; 5]> = v
            .as_array()
            .map(|a| a.iter().map(condition_key).collect())
            .unwrap_or_default();
        k.sort();
        k
    };
    keys(&current["conditions"]) == keys(&desired["conditions"])
}

/// Keeps the message of a `Rendered=True` condition that already names the
/// config generation which first carried this verdict on this generation of
/// the resource: a later render of the namespace (an endpoint change) still
/// carries it, so the first generation stays the one to compare proxies
/// with, and the status is not rewritten for every render.
pub fn keep_rendered_since(current: &ResourceStatus, body: &mut serde_json::Value) {
    let desired = &body["status"]["conditions"];
    let find = |type_: &str| {
        desired
            .as_array()
            .and_then(|a| a.iter().position(|c| c["type"] == type_))
    };
    let (Some(accepted), Some(rendered)) = (find(CONDITION_ACCEPTED), find(CONDITION_RENDERED))
    else {
        return;
    };
    let same = |old: &Condition, new: &serde_json::Value| {
        new["status"] == old.status.as_str()
            && new["reason"] == old.reason.as_str()
            && new["message"] == old.message.as_str()
            && new["observedGeneration"].as_i64() == old.observed_generation
    };
    let old_accepted = find_condition(&current.conditions, CONDITION_ACCEPTED);
    let old_rendered = find_condition(&current.conditions, CONDITION_RENDERED);
    let (Some(old_accepted), Some(old_rendered)) = (old_accepted, old_rendered) else {
        return;
    };
    let new_rendered = &desired[rendered];
    if !same(old_accepted, &desired[accepted])
        || old_rendered.status != "True"
        || new_rendered["status"] != "True"
        || new_rendered["reason"] != old_rendered.reason.as_str()
        || new_rendered["observedGeneration"].as_i64() != old_rendered.observed_generation
    {
        return;
    }
    body["status"]["conditions"][rendered]["message"] = json!(old_rendered.message);
}

/// Keeps the `lastTransitionTime` of every condition whose status does not
/// change: the time says when the status last flipped, not when it was
/// last written.
pub fn keep_transition_times(current: &ResourceStatus, body: &mut serde_json::Value) {
    let Some(conditions) = body["status"]["conditions"].as_array_mut() else {
        return;
    };
    for c in conditions {
        let Some(old) = current
            .conditions
            .iter()
            .find(|o| Some(o.type_.as_str()) == c["type"].as_str())
        else {
            continue;
        };
        if Some(old.status.as_str()) == c["status"].as_str()
            && let Ok(t) = serde_json::to_value(&old.last_transition_time)
        {
            c["lastTransitionTime"] = t;
        }
    }
}

/// Waits for the first dirty mark, then collects every further mark for
/// `window`, and returns them as one batch. `None` when the sender is gone
/// and nothing is pending.
pub async fn next_batch(
    rx: &mut mpsc::UnboundedReceiver<Dirty>,
    window: Duration,
) -> Option<Dirty> {
    let mut batch = rx.recv().await?;
    let deadline = tokio::time::Instant::now() + window;
    loop {
        tokio::select! {
            more = rx.recv() => match more {
                Some(d) => batch.merge(d),
                None => return Some(batch),
            },
            () = tokio::time::sleep_until(deadline) => return Some(batch),
        }
    }
}

/// What to do with one namespace after rendering it.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// The written config, of this generation and hash, is current.
    Unchanged {
        /// Its `generation`.
        generation: u64,
        /// Its `hash`.
        hash: String,
    },
    /// Apply this ConfigMap.
    Write(Box<ConfigMap>),
    /// Report that the config is too large.
    TooLarge {
        /// Size of `proxy.json`.
        raw: usize,
        /// Size compressed.
        gzipped: usize,
    },
    /// The rendered config fails validation: not written.
    Invalid(ValidationErrors),
    /// The document could not be signed: not written (retried).
    SigningFailed(String),
    /// The namespace left the mesh: delete its ConfigMap.
    Delete,
    /// Nothing exists and nothing should.
    Nothing,
}

/// Decides what to do for a namespace, from the index alone (and what the
/// renderer kept of earlier renders); a document to write is signed by
/// `signer`, and one signed by another signer is written again.
pub fn plan(
    renderer: &mut Renderer,
    index: &Index,
    namespace: &str,
    opts: &ConfigOptions,
    signer: &ConfigSigner,
) -> (Plan, Vec<CrStatus>) {
    if !index.is_meshed(namespace) {
        let action = if index.previous(namespace).is_some() {
            Plan::Delete
        } else {
            Plan::Nothing
        };
        return (action, judge(index, namespace));
    }
    let out = renderer.render(index, namespace);
    if let Some(p) = index.previous(namespace).filter(|p| {
        !p.edited
            && p.hash == out.document.hash()
            && p.signer.as_deref() == Some(signer.fingerprint())
    }) {
        let unchanged = Plan::Unchanged {
            generation: p.generation,
            hash: p.hash.clone(),
        };
        return (unchanged, out.statuses);
    }
    if let Err(e) = out.document.validate() {
        return (Plan::Invalid(e), out.statuses);
    }
    let encoded = encode(&out.document, opts.gzip_threshold, opts.max_bytes);
    let signed = match Signed::new(signer, namespace, &out.document) {
        Ok(s) => s,
        Err(e) => return (Plan::SigningFailed(e), out.statuses),
    };
    let action = match config_map(namespace, &out.document, &encoded, &signed) {
        Some(cm) => Plan::Write(Box::new(cm)),
        None => match encoded {
            Encoded::TooLarge { raw, gzipped } => Plan::TooLarge { raw, gzipped },
            _ => Plan::Nothing,
        },
    };
    (action, out.statuses)
}

// ---------------------------------------------------------------------------
// I/O: watchers feeding the index, and the writer.

struct Shared {
    index: Mutex<Index>,
    dirty: mpsc::UnboundedSender<Dirty>,
    synced: tokio::sync::watch::Sender<usize>,
}

impl Shared {
    fn index(&self) -> MutexGuard<'_, Index> {
        // A panic while holding the lock leaves a consistent-enough index:
        // every mutation is a map insert or remove.
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mark(&self, dirty: Dirty) {
        if !dirty.is_empty() {
            // The writer outlives the watchers; a send error means shutdown.
            let _ = self.dirty.send(dirty);
        }
    }
}

/// Feeds one watch stream into the index. `owns_lifecycle`: this stream's
/// re-lists decide which objects of `kind` still exist (false for the
/// second Pod stream, which only sees injected pods).
async fn feed<K, S>(
    shared: Arc<Shared>,
    stream: S,
    kind: Kind,
    owns_lifecycle: bool,
    to_object: fn(K) -> Object,
) where
    K: Resource + Clone + Debug + Send + 'static,
    S: Stream<Item = Result<Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut seen: Option<BTreeSet<ObjectRef>> = None;
    let mut first_sync = true;
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => seen = Some(BTreeSet::new()),
            Ok(Event::InitApply(o) | Event::Apply(o)) => {
                let object = to_object(o);
                if let Some(seen) = seen.as_mut() {
                    seen.insert(object.object_ref());
                }
                let dirty = shared.index().apply(object);
                shared.mark(dirty);
            }
            Ok(Event::Delete(o)) => {
                let r = ObjectRef::new(o.namespace().unwrap_or_default(), o.name_any());
                let dirty = shared.index().delete(kind, &r);
                shared.mark(dirty);
            }
            Ok(Event::InitDone) => {
                if let Some(seen) = seen.take()
                    && owns_lifecycle
                {
                    let mut index = shared.index();
                    let mut dirty = Dirty::none();
                    for gone in index.refs(kind).difference(&seen) {
                        dirty.merge(index.delete(kind, gone));
                    }
                    drop(index);
                    shared.mark(dirty);
                }
                if first_sync {
                    first_sync = false;
                    shared.synced.send_modify(|n| *n += 1);
                }
            }
            Err(e) => tracing::warn!(?kind, error = %e, "watch failed; retrying with backoff"),
        }
    }
}

/// Feeds the `weft-proxy` ConfigMaps: their annotations are the previous
/// output the renderer compares against.
async fn feed_config_maps<S>(shared: Arc<Shared>, stream: S)
where
    S: Stream<Item = Result<Event<ConfigMap>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut seen: Option<BTreeSet<String>> = None;
    let mut known: BTreeSet<String> = BTreeSet::new();
    let mut first_sync = true;
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => seen = Some(BTreeSet::new()),
            Ok(Event::InitApply(cm) | Event::Apply(cm)) => {
                let ns = cm.namespace().unwrap_or_default();
                let previous = previous_from(&cm);
                if previous.is_some() {
                    known.insert(ns.clone());
                    if let Some(seen) = seen.as_mut() {
                        seen.insert(ns.clone());
                    }
                }
                let mut index = shared.index();
                let changed = index.previous(&ns) != previous.as_ref();
                index.set_previous(&ns, previous);
                drop(index);
                if changed && !first_sync {
                    // Edited behind weft's back: render again.
                    shared.mark(Dirty::one(&ns));
                }
            }
            Ok(Event::Delete(cm)) => {
                let ns = cm.namespace().unwrap_or_default();
                known.remove(&ns);
                shared.index().set_previous(&ns, None);
                shared.mark(Dirty::one(&ns));
            }
            Ok(Event::InitDone) => {
                if let Some(seen) = seen.take() {
                    for gone in known.difference(&seen) {
                        shared.index().set_previous(gone, None);
                        shared.mark(Dirty::one(gone));
                    }
                    known = seen;
                }
                if first_sync {
                    first_sync = false;
                    shared.synced.send_modify(|n| *n += 1);
                }
            }
            Err(e) => tracing::warn!(error = %e, "ConfigMap watch failed; retrying with backoff"),
        }
    }
}

fn pod_metadata(meta: PartialObjectMeta<Pod>) -> Object {
    Object::PodMetadata(Box::new(meta.metadata))
}

/// Runs the config reconcilers until a fatal error. Call it only while
/// leading: two writers would fight over the ConfigMaps. Nothing is written
/// before `signer` holds a config signer; each new one signs every meshed
/// namespace's document again.
pub async fn run(
    client: Client,
    opts: ConfigOptions,
    mut signer: tokio::sync::watch::Receiver<Option<Arc<ConfigSigner>>>,
) -> Result<(), Error> {
    let signer_changes = signer.clone();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (synced_tx, mut synced_rx) = tokio::sync::watch::channel(0usize);
    let shared = Arc::new(Shared {
        index: Mutex::new(Index::new()),
        dirty: tx,
        synced: synced_tx,
    });
    let cfg = watcher::Config::default;
    let c = &client;
    let mut feeds: Vec<futures::future::BoxFuture<'static, ()>> = vec![
        Box::pin(feed(
            shared.clone(),
            watcher(Api::<Mesh>::all(c.clone()), cfg()).default_backoff(),
            Kind::Mesh,
            true,
            |o| Object::Mesh(Box::new(o)),
        )),
        Box::pin(feed(
            shared.clone(),
            watcher(Api::<Namespace>::all(c.clone()), cfg()).default_backoff(),
            Kind::Namespace,
            true,
            |o| Object::Namespace(Box::new(o)),
        )),
        Box::pin(feed(
            shared.clone(),
            watcher(Api::<Service>::all(c.clone()), cfg()).default_backoff(),
            Kind::Service,
            true,
            |o| Object::Service(Box::new(o)),
        )),
        Box::pin(feed(
            shared.clone(),
            watcher(Api::<EndpointSlice>::all(c.clone()), cfg()).default_backoff(),
            Kind::EndpointSlice,
            true,
            |o| Object::EndpointSlice(Box::new(o)),
        )),
        Box::pin(feed(
            shared.clone(),
            watcher(Api::<PartialObjectMeta<Pod>>::all(c.clone()), cfg()).default_backoff(),
            Kind::Pod,
            true,
            pod_metadata,
        )),
        Box::pin(feed(
            shared.clone(),
            watcher(
                Api::<Pod>::all(c.clone()),
                cfg().labels(&format!("{PROXY_LABEL}={PROXY_INJECTED}")),
            )
            .default_backoff(),
            Kind::Pod,
            false,
            |o| Object::Pod(Box::new(o)),
        )),
        Box::pin(feed(
            shared.clone(),
            watcher(Api::<ServiceRoute>::all(c.clone()), cfg()).default_backoff(),
            Kind::ServiceRoute,
            true,
            |o| Object::ServiceRoute(Box::new(o)),
        )),
        Box::pin(feed(
            shared.clone(),
            watcher(Api::<ServicePolicy>::all(c.clone()), cfg()).default_backoff(),
            Kind::ServicePolicy,
            true,
            |o| Object::ServicePolicy(Box::new(o)),
        )),
        Box::pin(feed(
            shared.clone(),
            watcher(Api::<AccessPolicy>::all(c.clone()), cfg()).default_backoff(),
            Kind::AccessPolicy,
            true,
            |o| Object::AccessPolicy(Box::new(o)),
        )),
        Box::pin(feed(
            shared.clone(),
            watcher(Api::<MtlsPolicy>::all(c.clone()), cfg()).default_backoff(),
            Kind::MtlsPolicy,
            true,
            |o| Object::MtlsPolicy(Box::new(o)),
        )),
        Box::pin(feed_config_maps(
            shared.clone(),
            watcher(
                Api::<ConfigMap>::all(c.clone()),
                cfg().fields(&format!("metadata.name={CONFIG_MAP_NAME}")),
            )
            .default_backoff(),
        )),
    ];
    // Gateway API routes, when their CRDs are installed: counted among the
    // watchers to sync before the first render when they are there at
    // start, else watched from the moment they appear.
    let gateway_now = gateway_api_served(c).await;
    if gateway_now {
        feeds.extend(gateway_feeds(&shared, c));
    } else {
        tracing::info!("the Gateway API CRDs are not installed; HTTPRoutes are read once they are");
    }
    // TLSRoute is of the experimental channel: watched when it is served
    // (at start, or from the moment it appears).
    let tls_now = gateway_now && tls_routes_served(c).await;
    if tls_now {
        feeds.push(Box::pin(tls_route_feed(&shared, c)));
    }
    let watchers = feeds.len();
    let watch_all = futures::future::join_all(feeds);
    let late_tls = async {
        if !tls_now {
            loop {
                tokio::time::sleep(GATEWAY_API_POLL).await;
                if gateway_api_served(c).await && tls_routes_served(c).await {
                    tracing::info!("the TLSRoute CRD appeared; watching TLSRoutes");
                    tls_route_feed(&shared, c).await;
                    break;
                }
            }
        }
        std::future::pending::<()>().await;
    };
    let late_gateway = async {
        if !gateway_now {
            loop {
                tokio::time::sleep(GATEWAY_API_POLL).await;
                if gateway_api_served(c).await {
                    tracing::info!("the Gateway API CRDs appeared; watching HTTPRoutes");
                    futures::future::join_all(gateway_feeds(&shared, c)).await;
                    break;
                }
            }
        }
        std::future::pending::<()>().await;
    };

    let writer = async {
        // Render nothing before every watcher has listed once: a render
        // without the existing ConfigMaps' hashes would rewrite them all.
        if synced_rx.wait_for(|n| *n >= watchers).await.is_err() {
            return Err(Error::WatchersGone);
        }
        tracing::info!("config watchers synced; waiting for the config signer");
        let mut current = match signer.wait_for(Option::is_some).await {
            Ok(s) => s.clone().ok_or(Error::WatchersGone)?,
            Err(_) => return Err(Error::WatchersGone),
        };
        tracing::info!(signer = current.fingerprint(), "rendering");
        let writer = Writer::new(client.clone(), opts.clone(), shared.clone());
        let gateways = crate::gateway::Gateways::new(client.clone());
        // Gateways' status follows their pods, which the index does not
        // watch: look again now and then.
        let mut gateway_tick = tokio::time::interval(GATEWAY_STATUS_PERIOD);
        loop {
            // The batch being collected is kept across ticks: dropping it
            // would lose the marks it already took from the queue.
            let batch = {
                let next = next_batch(&mut rx, opts.debounce);
                tokio::pin!(next);
                loop {
                    tokio::select! {
                        b = &mut next => break b,
                        _ = gateway_tick.tick() => {
                            reconcile_gateways(&shared, &gateways, &current).await;
                        }
                    }
                }
            };
            let Some(batch) = batch else {
                return Err(Error::WatchersGone);
            };
            let latest = signer.borrow_and_update().clone();
            if let Some(next) = latest.filter(|n| n.fingerprint() != current.fingerprint()) {
                tracing::info!(
                    signer = next.fingerprint(),
                    "new config signer; signing every namespace again"
                );
                current = next;
            }
            writer.write_batch(batch, &current).await;
            reconcile_gateways(&shared, &gateways, &current).await;
        }
    };
    // A new signer marks every meshed namespace dirty, through the same
    // queue as every other change: nothing collected is ever dropped.
    let mut changes = signer_changes;
    let forward_signer = async {
        while changes.changed().await.is_ok() {
            shared.mark(Dirty {
                all_meshed: true,
                ..Dirty::none()
            });
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        () = watch_all.map(|_| ()) => Err(Error::WatchersGone),
        r = writer => r,
        () = forward_signer => Err(Error::WatchersGone),
        () = late_gateway => Err(Error::WatchersGone),
        () = late_tls => Err(Error::WatchersGone),
    }
}

/// How often the status of Gateways is looked at without a change.
const GATEWAY_STATUS_PERIOD: Duration = Duration::from_secs(5);

/// Renders and applies every Gateway of weft's class, from a copy of the
/// index (taken only when there is one).
async fn reconcile_gateways(
    shared: &Shared,
    gateways: &crate::gateway::Gateways,
    signer: &ConfigSigner,
) {
    let index = {
        let index = shared.index();
        if index.weft_classes().next().is_none() {
            return;
        }
        index.clone()
    };
    gateways.reconcile(&index, signer).await;
}

/// A Gateway API route kind whose `status.parents` weft writes.
trait GatewayRoute:
    kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
    + Clone
    + Debug
    + serde::de::DeserializeOwned
    + serde::Serialize
{
    fn status_mut(&mut self) -> &mut Option<weft_api::gateway::RouteStatus>;
}

impl GatewayRoute for HTTPRoute {
    fn status_mut(&mut self) -> &mut Option<weft_api::gateway::RouteStatus> {
        &mut self.status
    }
}

impl GatewayRoute for TLSRoute {
    fn status_mut(&mut self) -> &mut Option<weft_api::gateway::RouteStatus> {
        &mut self.status
    }
}

/// How often the operator looks for the Gateway API CRDs while they are
/// not installed.
const GATEWAY_API_POLL: Duration = Duration::from_secs(30);

/// Whether the API server serves `HTTPRoute`, `Gateway`, `GatewayClass`
/// (v1) and `ReferenceGrant` (v1beta1) of the Gateway API.
async fn gateway_api_served(client: &Client) -> bool {
    let has = async |version: &str, plural: &str| {
        client
            .list_api_group_resources(&format!("{}/{version}", weft_api::gateway::GROUP))
            .await
            .is_ok_and(|l| l.resources.iter().any(|r| r.name == plural))
    };
    has("v1", "httproutes").await
        && has("v1", "gateways").await
        && has("v1", "gatewayclasses").await
        && has("v1beta1", "referencegrants").await
}

/// Whether the API server serves `TLSRoute` (v1alpha2, experimental
/// channel).
async fn tls_routes_served(client: &Client) -> bool {
    client
        .list_api_group_resources(&format!("{}/v1alpha2", weft_api::gateway::GROUP))
        .await
        .is_ok_and(|l| l.resources.iter().any(|r| r.name == "tlsroutes"))
}

fn tls_route_feed(shared: &Arc<Shared>, client: &Client) -> impl Future<Output = ()> + use<> {
    feed(
        shared.clone(),
        watcher(
            Api::<TLSRoute>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff(),
        Kind::TlsRoute,
        true,
        |o| Object::TlsRoute(Box::new(o)),
    )
}

fn gateway_feeds(
    shared: &Arc<Shared>,
    client: &Client,
) -> Vec<futures::future::BoxFuture<'static, ()>> {
    let cfg = watcher::Config::default;
    vec![
        Box::pin(feed(
            shared.clone(),
            watcher(Api::<HTTPRoute>::all(client.clone()), cfg()).default_backoff(),
            Kind::HttpRoute,
            true,
            |o| Object::HttpRoute(Box::new(o)),
        )),
        Box::pin(feed(
            shared.clone(),
            watcher(Api::<ReferenceGrant>::all(client.clone()), cfg()).default_backoff(),
            Kind::ReferenceGrant,
            true,
            |o| Object::ReferenceGrant(Box::new(o)),
        )),
        Box::pin(feed(
            shared.clone(),
            watcher(Api::<Gateway>::all(client.clone()), cfg()).default_backoff(),
            Kind::Gateway,
            true,
            |o| Object::Gateway(Box::new(o)),
        )),
        Box::pin(feed(
            shared.clone(),
            watcher(Api::<GatewayClass>::all(client.clone()), cfg()).default_backoff(),
            Kind::GatewayClass,
            true,
            |o| Object::GatewayClass(Box::new(o)),
        )),
    ]
}

type StatusKey = (Kind, ObjectRef);
/// What a CR's status was last written for: its generation, verdict and the
/// kind of delivery. Not the config generation of a `Written` delivery: a
/// new render of the namespace alone does not rewrite a status (see
/// [`keep_rendered_since`]).
type StatusMemo = (
    Option<i64>,
    String,
    String,
    std::mem::Discriminant<Delivery>,
);

struct Writer {
    client: Client,
    opts: ConfigOptions,
    shared: Arc<Shared>,
    renderer: Mutex<Renderer>,
    recorder: Recorder,
    statuses: tokio::sync::Mutex<BTreeMap<StatusKey, StatusMemo>>,
}

impl Writer {
    fn new(client: Client, opts: ConfigOptions, shared: Arc<Shared>) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.to_owned(),
                instance: opts.instance.clone(),
            },
        );
        Self {
            client,
            opts,
            shared,
            renderer: Mutex::new(Renderer::new()),
            recorder,
            statuses: tokio::sync::Mutex::default(),
        }
    }

    async fn write_batch(&self, batch: Dirty, signer: &ConfigSigner) {
        let namespaces = batch.resolve(&self.shared.index());
        for ns in namespaces {
            if let Err(e) = self.reconcile(&ns, signer).await {
                tracing::warn!(namespace = %ns, error = %e, "config reconcile failed; retrying");
                let shared = self.shared.clone();
                let after = self.opts.retry_after;
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    shared.mark(Dirty::one(&ns));
                });
            }
        }
        let index = self.shared.index();
        self.renderer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .prune(&index);
    }

    /// A hand-edited ConfigMap was written again: a Warning Event on it, a
    /// log line and `weft_config_restored_total`.
    async fn report_restored(&self, ns: &str) {
        self.opts.metrics.restored.inc();
        let note = format!(
            "ConfigMap {ns}/{CONFIG_MAP_NAME} was changed outside weft (its content no longer matched what weft wrote); weft wrote it again from the cluster's resources. Change proxy behaviour with ServiceRoutes, ServicePolicies, AccessPolicies and MtlsPolicies instead."
        );
        tracing::warn!(namespace = %ns, "proxy config edited outside weft; restored");
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("ConfigMap".into()),
            namespace: Some(ns.to_owned()),
            name: Some(CONFIG_MAP_NAME.to_owned()),
            ..Default::default()
        };
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: "ConfigRestored".into(),
            note: Some(note),
            action: "Write".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            tracing::warn!(namespace = %ns, error = %e, "cannot record ConfigRestored event");
        }
    }

    async fn reconcile(&self, ns: &str, signer: &ConfigSigner) -> Result<(), Error> {
        let (action, statuses) = {
            let index = self.shared.index();
            let mut renderer = self.renderer.lock().unwrap_or_else(|e| e.into_inner());
            plan(&mut renderer, &index, ns, &self.opts, signer)
        };
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let delivery = match action {
            Plan::Unchanged { generation, hash } => {
                self.opts.metrics.renders.inc();
                self.opts.metrics.unchanged.inc();
                Delivery::Written { generation, hash }
            }
            Plan::Write(cm) => {
                self.opts.metrics.renders.inc();
                let edited = self.shared.index().previous(ns).is_some_and(|p| p.edited);
                let previous = previous_from(&cm);
                let written = previous.as_ref().expect(
                    "config_map() annotates every ConfigMap with its generation, hash and digest",
                );
                let delivery = Delivery::Written {
                    generation: written.generation,
                    hash: written.hash.clone(),
                };
                api.patch(
                    CONFIG_MAP_NAME,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&*cm),
                )
                .await
                .map_err(|source| Error::Kube {
                    action: "apply",
                    what: format!("ConfigMap {ns}/{CONFIG_MAP_NAME}"),
                    source,
                })?;
                self.opts.metrics.writes.inc();
                tracing::info!(namespace = %ns, generation = previous.as_ref().map(|p| p.generation), "wrote proxy config");
                self.shared.index().set_previous(ns, previous);
                if edited {
                    self.report_restored(ns).await;
                }
                delivery
            }
            Plan::TooLarge { raw, gzipped } => {
                self.opts.metrics.renders.inc();
                self.opts.metrics.too_large.inc();
                let note = format!(
                    "proxy.json for namespace {ns} is {raw} bytes ({gzipped} gzip-compressed), above the {} byte ConfigMap budget; it was NOT written and proxies keep their last config. Reduce the Services visible to the namespace.",
                    self.opts.max_bytes
                );
                tracing::error!(namespace = %ns, raw, gzipped, "proxy config too large; not written");
                let reference = ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Namespace".into()),
                    name: Some(ns.to_owned()),
                    ..Default::default()
                };
                let event = KubeEvent {
                    type_: EventType::Warning,
                    reason: "ConfigTooLarge".into(),
                    note: Some(note),
                    action: "Render".into(),
                    secondary: None,
                };
                if let Err(e) = self.recorder.publish(&event, &reference).await {
                    tracing::warn!(namespace = %ns, error = %e, "cannot record ConfigTooLarge event");
                }
                Delivery::TooLarge
            }
            Plan::Invalid(errors) => {
                self.opts.metrics.renders.inc();
                tracing::error!(namespace = %ns, %errors, "rendered proxy config fails validation (a weft bug); not written, proxies keep their last config");
                Delivery::Invalid
            }
            Plan::SigningFailed(reason) => {
                return Err(Error::Signing {
                    namespace: ns.to_owned(),
                    reason,
                });
            }
            Plan::Delete => {
                match api.delete(CONFIG_MAP_NAME, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.is_not_found() => {}
                    Err(source) => {
                        return Err(Error::Kube {
                            action: "delete",
                            what: format!("ConfigMap {ns}/{CONFIG_MAP_NAME}"),
                            source,
                        });
                    }
                }
                self.opts.metrics.deletes.inc();
                self.shared.index().set_previous(ns, None);
                Delivery::NotMeshed
            }
            Plan::Nothing => Delivery::NotMeshed,
        };
        self.patch_statuses(statuses, delivery).await
    }

    /// The status a weft resource carries now.
    async fn current_status(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
    ) -> Result<Option<ResourceStatus>, kube::Error> {
        let c = self.client.clone();
        Ok(match kind {
            Kind::ServiceRoute => {
                Api::<ServiceRoute>::namespaced(c, ns)
                    .get(name)
                    .await?
                    .status
            }
            Kind::ServicePolicy => {
                Api::<ServicePolicy>::namespaced(c, ns)
                    .get(name)
                    .await?
                    .status
            }
            Kind::MtlsPolicy => Api::<MtlsPolicy>::namespaced(c, ns).get(name).await?.status,
            _ => {
                Api::<AccessPolicy>::namespaced(c, ns)
                    .get(name)
                    .await?
                    .status
            }
        })
    }

    /// Writes weft's entries of a route's (`K`: HTTPRoute, TLSRoute)
    /// `status.parents`, keeping every other controller's: the list is
    /// replaced whole by the API server, so read it, merge, and write it
    /// back at that resourceVersion (again on a conflict).
    async fn patch_route_status<K: GatewayRoute>(&self, st: &CrStatus) -> Result<(), kube::Error> {
        let api = Api::<K>::namespaced(self.client.clone(), &st.object.namespace);
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        for attempt in 0..3 {
            let mut route = match api.get_status(&st.object.name).await {
                Ok(r) => r,
                Err(kube::Error::Api(s)) if s.is_not_found() => return Ok(()),
                Err(e) => return Err(e),
            };
            let current = route.status_mut().take().unwrap_or_default();
            let parents = route_parents(&current.parents, st, &now);
            if parents == current.parents {
                return Ok(());
            }
            *route.status_mut() = Some(weft_api::gateway::RouteStatus { parents });
            match api
                .replace_status(&st.object.name, &PostParams::default(), &route)
                .await
            {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(s)) if s.is_not_found() => return Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 && attempt < 2 => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn patch_statuses(
        &self,
        statuses: Vec<CrStatus>,
        delivery: Delivery,
    ) -> Result<(), Error> {
        let now = k8s_openapi::jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        let mut memo = self.statuses.lock().await;
        // One status that cannot be written does not hold up the others:
        // the first error is returned (the namespace is tried again) after
        // every other status had its turn.
        let mut failed: Option<Error> = None;
        for st in statuses {
            if st.accepted() {
                self.shared
                    .index()
                    .record_accepted(st.kind, &st.object, st.generation);
            }
            let key = (st.kind, st.object.clone());
            let value = (
                st.generation,
                st.reason().to_owned(),
                if matches!(st.kind, Kind::HttpRoute | Kind::TlsRoute) {
                    format!("{:?}", st.parents)
                } else {
                    st.message()
                },
                std::mem::discriminant(&delivery),
            );
            if memo.get(&key) == Some(&value) {
                continue;
            }
            if matches!(st.kind, Kind::HttpRoute | Kind::TlsRoute) {
                let (written, kind) = if st.kind == Kind::HttpRoute {
                    (self.patch_route_status::<HTTPRoute>(&st).await, "HTTPRoute")
                } else {
                    (self.patch_route_status::<TLSRoute>(&st).await, "TLSRoute")
                };
                match written {
                    Ok(()) => {
                        memo.insert(key, value);
                    }
                    Err(source) => {
                        failed.get_or_insert(Error::Kube {
                            action: "update status of",
                            what: format!("{kind} {}", st.object),
                            source,
                        });
                    }
                }
                continue;
            }
            let mut body = status_patch(&st, &delivery, &now);
            let ns = &st.object.namespace;
            let name = &st.object.name;
            // Not written by this process yet (e.g. after a restart or a
            // change of leader): compare with what the object carries, so
            // an unchanged verdict is not written again, and a condition
            // whose status holds keeps its lastTransitionTime.
            match self.current_status(st.kind, ns, name).await {
                Ok(Some(current)) => {
                    keep_rendered_since(&current, &mut body);
                    if status_unchanged(&current, &body) {
                        memo.insert(key, value);
                        continue;
                    }
                    keep_transition_times(&current, &mut body);
                }
                Ok(None) => {}
                Err(kube::Error::Api(s)) if s.is_not_found() => continue,
                Err(source) => {
                    failed.get_or_insert(Error::Kube {
                        action: "read status of",
                        what: format!("{:?} {}", st.kind, st.object),
                        source,
                    });
                    continue;
                }
            }
            let params = PatchParams::apply(FIELD_MANAGER).force();
            let result = match st.kind {
                Kind::ServiceRoute => Api::<ServiceRoute>::namespaced(self.client.clone(), ns)
                    .patch_status(name, &params, &Patch::Apply(&body))
                    .await
                    .map(|_| ()),
                Kind::ServicePolicy => Api::<ServicePolicy>::namespaced(self.client.clone(), ns)
                    .patch_status(name, &params, &Patch::Apply(&body))
                    .await
                    .map(|_| ()),
                Kind::MtlsPolicy => Api::<MtlsPolicy>::namespaced(self.client.clone(), ns)
                    .patch_status(name, &params, &Patch::Apply(&body))
                    .await
                    .map(|_| ()),
                _ => Api::<AccessPolicy>::namespaced(self.client.clone(), ns)
                    .patch_status(name, &params, &Patch::Apply(&body))
                    .await
                    .map(|_| ()),
            };
            match result {
                Ok(()) => {
                    memo.insert(key, value);
                }
                // Deleted meanwhile: nothing to report on.
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(source) => {
                    failed.get_or_insert(Error::Kube {
                        action: "patch status of",
                        what: format!("{:?} {}", st.kind, st.object),
                        source,
                    });
                    continue;
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::to_object;
    use serde_json::Value;
    use weft_proxy_config::ProxyConfig;

    fn obj(v: Value) -> Object {
        to_object(0, v)
            .expect("fixture has the right shape")
            .expect("fixture kind is read")
    }

    fn ns(name: &str, meshed: bool) -> Value {
        let labels = if meshed {
            json!({INJECT_LABEL: "enabled"})
        } else {
            json!({})
        };
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
    }

    fn slice(ips: &[&str]) -> Value {
        let eps: Vec<Value> = ips.iter().map(|ip| json!({"addresses": [ip]})).collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "shop", "name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": eps
        })
    }

    fn shop() -> Index {
        Index::from_objects([
            obj(ns("shop", true)),
            obj(json!({
                "apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "shop", "name": "web"},
                "spec": {"clusterIP": "10.96.0.1", "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]}
            })),
            obj(slice(&["10.0.0.1", "10.0.0.2"])),
            obj(json!({
                "apiVersion": "weft.dev/v1alpha1", "kind": "ServiceRoute",
                "metadata": {"namespace": "shop", "name": "bad", "generation": 3},
                "spec": {"service": "nope", "http": [{}]}
            })),
        ])
    }

    /// One config signer for every test: key generation is slow in debug.
    fn signer() -> &'static ConfigSigner {
        static SIGNER: std::sync::OnceLock<ConfigSigner> = std::sync::OnceLock::new();
        SIGNER.get_or_init(|| test_signer("td"))
    }

    fn test_signer(td: &str) -> ConfigSigner {
        let now = std::time::SystemTime::now();
        let ca = crate::ca::CertificateAuthority::generate(td, Duration::from_secs(86400), now)
            .expect("CA");
        let subject = crate::ca::LeafSubject::ConfigSigner {
            trust_domain: td.into(),
        };
        let leaf = ca
            .issue(&subject, Duration::from_secs(3600), now)
            .expect("leaf");
        ConfigSigner::from_pem(leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes()).expect("signer")
    }

    fn written(plan: &Plan) -> &ConfigMap {
        match plan {
            Plan::Write(cm) => cm,
            other => panic!("expected a write, got {other:?}"),
        }
    }

    /// The document in a ConfigMap, checked to load and to carry a
    /// signature of itself by [`signer`].
    fn decoded(cm: &ConfigMap) -> ProxyConfig {
        let data = cm.data.as_ref().expect("data holds proxy.json.sig");
        let bytes = match &cm.binary_data {
            None => data[FILE_NAME].as_bytes().to_vec(),
            Some(b) => {
                assert!(!data.contains_key(FILE_NAME), "one copy of the document");
                weft_proxy_config::gunzip(&b[GZIP_FILE_NAME].0).expect("valid gzip")
            }
        };
        let cfg = ProxyConfig::load(&bytes).expect("what is written loads in the proxy");
        let sig = weft_proxy_config::ConfigSignature::parse(data[SIGNATURE_FILE_NAME].as_bytes())
            .expect("a signature");
        assert_eq!((&sig.namespace, &sig.hash), (&cfg.namespace, &cfg.hash));
        assert_eq!(
            previous_from(cm).and_then(|p| p.signer).as_deref(),
            Some(signer().fingerprint())
        );
        cfg
    }

    #[test]
    fn first_render_writes_and_a_restart_writes_nothing() {
        let opts = ConfigOptions::default();
        let index = shop();
        let (first, statuses) = plan(&mut Renderer::new(), &index, "shop", &opts, signer());
        let cm = written(&first);
        let cfg = decoded(cm);
        assert_eq!(cfg.generation, 1);
        let previous = previous_from(cm).expect("weft's annotations");
        assert_eq!(previous.hash, cfg.hash);
        assert_eq!(statuses.len(), 1);

        // A restarted operator: a fresh index fed the same objects and the
        // existing ConfigMap's annotations.
        let mut restarted = shop();
        restarted.set_previous("shop", Some(previous.clone()));
        assert_eq!(
            plan(&mut Renderer::new(), &restarted, "shop", &opts, signer()).0,
            Plan::Unchanged {
                generation: 1,
                hash: cfg.hash.clone()
            }
        );

        // One endpoint more: a new generation.
        restarted.apply(obj(slice(&["10.0.0.1", "10.0.0.2", "10.0.0.3"])));
        let (next, _) = plan(&mut Renderer::new(), &restarted, "shop", &opts, signer());
        let cfg = decoded(written(&next));
        assert_eq!(cfg.generation, 2);
        assert_eq!(cfg.services[0].endpoints.len(), 3);
    }

    #[test]
    fn a_new_signer_signs_every_document_again() {
        let opts = ConfigOptions::default();
        let index = shop();
        let (first, _) = plan(&mut Renderer::new(), &index, "shop", &opts, signer());
        let cm = written(&first).clone();
        let mut restarted = shop();
        restarted.set_previous("shop", previous_from(&cm));
        assert!(matches!(
            plan(&mut Renderer::new(), &restarted, "shop", &opts, signer()).0,
            Plan::Unchanged { .. }
        ));
        let renewed = test_signer("td");
        let (again, _) = plan(&mut Renderer::new(), &restarted, "shop", &opts, &renewed);
        let again = written(&again);
        assert_eq!(
            previous_from(again).and_then(|p| p.signer).as_deref(),
            Some(renewed.fingerprint())
        );
        assert_eq!(
            again.data.as_ref().map(|d| &d[FILE_NAME]),
            cm.data.as_ref().map(|d| &d[FILE_NAME]),
            "the same document, signed again"
        );
        // A ConfigMap from before signing (no signer annotation) is signed.
        let mut unsigned = previous_from(&cm).expect("weft's");
        unsigned.signer = None;
        restarted.set_previous("shop", Some(unsigned));
        assert!(matches!(
            plan(&mut Renderer::new(), &restarted, "shop", &opts, signer()).0,
            Plan::Write(_)
        ));
    }

    #[test]
    fn a_hand_edited_config_map_is_written_again() {
        let index = shop();
        let opts = ConfigOptions::default();
        let (first, _) = plan(&mut Renderer::new(), &index, "shop", &opts, signer());
        let cm = written(&first).clone();
        assert!(!previous_from(&cm).expect("weft's").edited);
        let mut restarted = shop();
        // The content changed, the annotations did not: a valid document
        // someone wrote by hand, or any other bytes.
        for edit in ["{}".to_owned(), {
            let mut doc = decoded(&cm);
            doc.services.clear();
            doc.seal();
            String::from_utf8(doc.to_json()).expect("utf-8")
        }] {
            let mut edited = cm.clone();
            edited.data = Some(BTreeMap::from([(FILE_NAME.to_owned(), edit)]));
            let previous = previous_from(&edited).expect("weft's annotations");
            assert!(previous.edited);
            restarted.set_previous("shop", Some(previous));
            let (again, _) = plan(&mut Renderer::new(), &restarted, "shop", &opts, signer());
            assert_eq!(
                decoded(written(&again)),
                decoded(&cm),
                "the rendered content again"
            );
        }
        // A key added by hand is an edit too.
        let mut extra = cm.clone();
        extra
            .data
            .get_or_insert_with(BTreeMap::new)
            .insert("extra".to_owned(), "x".to_owned());
        assert!(previous_from(&extra).expect("weft's").edited);
    }

    #[test]
    fn large_configs_are_gzipped_and_too_large_ones_not_written() {
        let index = shop();
        let plain = written(
            &plan(
                &mut Renderer::new(),
                &index,
                "shop",
                &ConfigOptions::default(),
                signer(),
            )
            .0,
        )
        .clone();
        assert!(plain.binary_data.is_none());
        let gz_opts = ConfigOptions {
            gzip_threshold: 64,
            ..Default::default()
        };
        let gz = written(&plan(&mut Renderer::new(), &index, "shop", &gz_opts, signer()).0).clone();
        assert_eq!(
            gz.data.as_ref().map(|d| d.keys().collect::<Vec<_>>()),
            Some(vec![&SIGNATURE_FILE_NAME.to_owned()])
        );
        assert_eq!(decoded(&gz), decoded(&plain));

        let tiny = ConfigOptions {
            gzip_threshold: 16,
            max_bytes: 32,
            ..Default::default()
        };
        match plan(&mut Renderer::new(), &index, "shop", &tiny, signer()).0 {
            Plan::TooLarge { raw, gzipped } => assert!(raw > 32 && gzipped > 32),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn leaving_the_mesh_deletes_only_what_weft_wrote() {
        let mut index = shop();
        index.apply(obj(ns("shop", false)));
        assert_eq!(
            plan(
                &mut Renderer::new(),
                &index,
                "shop",
                &ConfigOptions::default(),
                signer()
            )
            .0,
            Plan::Nothing
        );
        index.set_previous(
            "shop",
            Some(Previous {
                generation: 4,
                hash: "sha256:x".into(),
                edited: false,
                signer: None,
            }),
        );
        let (p, statuses) = plan(
            &mut Renderer::new(),
            &index,
            "shop",
            &ConfigOptions::default(),
            signer(),
        );
        assert_eq!(p, Plan::Delete);
        assert_eq!(statuses.len(), 1, "resources still get a verdict");
        let mut foreign = ConfigMap::default();
        foreign.metadata.annotations = Some(BTreeMap::from([("x".to_owned(), "y".to_owned())]));
        assert_eq!(previous_from(&foreign), None);
    }

    fn written_at(generation: u64) -> Delivery {
        Delivery::Written {
            generation,
            hash: format!("sha256:{generation:064x}"),
        }
    }

    /// The condition of `type_` in a status patch.
    fn condition<'a>(body: &'a Value, type_: &str) -> &'a Value {
        body["status"]["conditions"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["type"] == type_))
            .unwrap_or_else(|| panic!("no condition {type_} in {body}"))
    }

    #[test]
    fn http_route_parents_keep_other_controllers_and_unchanged_times() {
        use crate::render::ParentVerdict;
        use weft_api::gateway::ParentReference;
        let svc = |name: &str| ParentReference {
            group: Some(String::new()),
            kind: Some("Service".into()),
            name: name.into(),
            ..Default::default()
        };
        let t = |s: &str| Time(s.parse().expect("timestamp"));
        let st = |generation: i64, cart: Option<(&'static str, String)>| CrStatus {
            kind: Kind::HttpRoute,
            object: ObjectRef::new("shop", "r"),
            generation: Some(generation),
            rejection: None,
            parents: vec![
                ParentVerdict {
                    parent: svc("cart"),
                    controller: MESH_CONTROLLER,
                    refused: cart,
                    unresolved: None,
                },
                ParentVerdict {
                    parent: svc("web"),
                    controller: MESH_CONTROLLER,
                    refused: None,
                    unresolved: Some(("BackendNotFound", "rules[0]: gone".into())),
                },
            ],
        };
        let gateway = RouteParentStatus {
            parent_ref: ParentReference {
                name: "public".into(),
                ..Default::default()
            },
            controller_name: "example.com/gateway".into(),
            conditions: Vec::new(),
        };
        let stale = RouteParentStatus {
            parent_ref: svc("removed"),
            controller_name: MESH_CONTROLLER.into(),
            conditions: Vec::new(),
        };
        let first = route_parents(
            &[gateway.clone(), stale],
            &st(1, None),
            &t("2026-01-01T00:00:00Z"),
        );
        assert_eq!(first.len(), 3, "{first:?}");
        assert_eq!(first[0], gateway, "another controller's entry stays first");
        let cond = |p: &RouteParentStatus, type_: &str| {
            p.conditions
                .iter()
                .find(|c| c.type_ == type_)
                .cloned()
                .expect("condition")
        };
        assert_eq!(first[1].parent_ref.name, "cart");
        assert_eq!(cond(&first[1], "Accepted").status, "True");
        assert_eq!(cond(&first[2], "ResolvedRefs").reason, "BackendNotFound");
        assert_eq!(cond(&first[2], "ResolvedRefs").observed_generation, Some(1));

        // The same verdict later: nothing changes, times included.
        let again = route_parents(&first, &st(1, None), &t("2026-02-01T00:00:00Z"));
        assert_eq!(again, first);

        // A new generation refused on cart: its Accepted flips with the new
        // time; web's conditions keep their transition time.
        let refused = st(2, Some(("NoMatchingParent", "no port 81".into())));
        let next = route_parents(&first, &refused, &t("2026-03-01T00:00:00Z"));
        let accepted = cond(&next[1], "Accepted");
        assert_eq!(
            (accepted.status.as_str(), accepted.reason.as_str()),
            ("False", "NoMatchingParent")
        );
        assert_eq!(accepted.last_transition_time, t("2026-03-01T00:00:00Z"));
        let web = cond(&next[2], "Accepted");
        assert_eq!(web.last_transition_time, t("2026-01-01T00:00:00Z"));
        assert_eq!(web.observed_generation, Some(2));
    }

    #[test]
    fn status_patches_carry_accepted_rendered_and_observed_generation() {
        let index = shop();
        let statuses = judge(&index, "shop");
        let body = status_patch(&statuses[0], &written_at(7), "2026-01-01T00:00:00Z");
        assert_eq!(body["kind"], "ServiceRoute");
        assert_eq!(body["status"]["observedGeneration"], 3);
        let types: Vec<&Value> = body["status"]["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .map(|c| &c["type"])
            .collect();
        assert_eq!(
            types,
            ["Accepted", "Rendered"],
            "no Ready: weft cannot see proxies"
        );
        let accepted = condition(&body, "Accepted");
        assert_eq!(accepted["status"], "False");
        assert_eq!(accepted["reason"], "UnknownService");
        assert_eq!(condition(&body, "Rendered")["reason"], "NotAccepted");

        let mut ok = statuses[0].clone();
        ok.rejection = None;
        let body = status_patch(&ok, &Delivery::TooLarge, "2026-01-01T00:00:00Z");
        assert_eq!(condition(&body, "Accepted")["status"], "True");
        assert_eq!(condition(&body, "Rendered")["status"], "False");
        assert_eq!(condition(&body, "Rendered")["reason"], "ConfigTooLarge");
        assert!(
            !condition(&body, "Accepted")["message"]
                .as_str()
                .expect("a message")
                .contains("rendered"),
            "Accepted speaks of validity only"
        );
    }

    #[test]
    fn rendered_names_the_config_generation_and_hash_to_compare_with_proxies() {
        let index = shop();
        let mut ok = judge(&index, "shop")[0].clone();
        ok.rejection = None;
        let body = status_patch(&ok, &written_at(7), "2026-01-01T00:00:00Z");
        let rendered = condition(&body, "Rendered");
        assert_eq!(rendered["status"], "True");
        assert_eq!(rendered["reason"], "Rendered");
        assert_eq!(rendered["observedGeneration"], 3);
        let message = rendered["message"].as_str().expect("a message");
        assert!(message.contains("config generation 7"), "{message}");
        assert!(message.contains(&format!("sha256:{:064x}", 7)), "{message}");
        assert!(message.contains("/config"), "{message}");
    }

    #[test]
    fn a_later_render_keeps_the_generation_that_first_carried_the_resource() {
        let index = shop();
        let mut ok = judge(&index, "shop")[0].clone();
        ok.rejection = None;
        let first = status_patch(&ok, &written_at(7), "2026-01-01T00:00:00Z");
        let current: ResourceStatus =
            serde_json::from_value(first["status"].clone()).expect("a ResourceStatus");

        // An endpoint change renders the namespace again: generation 9.
        let mut later = status_patch(&ok, &written_at(9), "2026-02-02T00:00:00Z");
        assert!(!status_unchanged(&current, &later));
        keep_rendered_since(&current, &mut later);
        assert!(
            status_unchanged(&current, &later),
            "no status write for a render that did not change the resource"
        );

        // A new generation of the resource is stamped with the config
        // that carries it.
        let mut next = ok.clone();
        next.generation = Some(4);
        let mut newer = status_patch(&next, &written_at(9), "2026-02-02T00:00:00Z");
        keep_rendered_since(&current, &mut newer);
        let message = condition(&newer, "Rendered")["message"]
            .as_str()
            .expect("a message");
        assert!(message.contains("config generation 9"), "{message}");

        // So is a verdict that changed on the same generation: a rejected
        // generation rendered in its last accepted version, then accepted.
        let mut fallback = ok.clone();
        fallback.rejection = Some(crate::render::Rejection {
            reason: judge(&index, "shop")[0]
                .rejection
                .clone()
                .expect("fixture is rejected")
                .reason,
            message: "spec.service: Service shop/nope does not exist".to_owned(),
            rendering_generation: Some(Some(2)),
        });
        let on_fallback = status_patch(&fallback, &written_at(7), "2026-01-01T00:00:00Z");
        let current: ResourceStatus =
            serde_json::from_value(on_fallback["status"].clone()).expect("a ResourceStatus");
        let mut accepted = status_patch(&ok, &written_at(8), "2026-02-02T00:00:00Z");
        keep_rendered_since(&current, &mut accepted);
        let message = condition(&accepted, "Rendered")["message"]
            .as_str()
            .expect("a message");
        assert!(message.contains("config generation 8"), "{message}");

        // Not rendered any more, then rendered again: a new stamp.
        let off = status_patch(&ok, &Delivery::NotMeshed, "2026-03-03T00:00:00Z");
        let current: ResourceStatus =
            serde_json::from_value(off["status"].clone()).expect("a ResourceStatus");
        let mut back = status_patch(&ok, &written_at(1), "2026-04-04T00:00:00Z");
        keep_rendered_since(&current, &mut back);
        let message = condition(&back, "Rendered")["message"]
            .as_str()
            .expect("a message");
        assert!(message.contains("config generation 1"), "{message}");
    }

    #[test]
    fn a_status_already_on_the_object_is_not_written_again() {
        let index = shop();
        let statuses = judge(&index, "shop");
        let written = status_patch(&statuses[0], &written_at(1), "2026-01-01T00:00:00Z");
        // What the API server holds after that write.
        let current: ResourceStatus =
            serde_json::from_value(written["status"].clone()).expect("a ResourceStatus");

        // A restarted operator computes the same verdict at another time.
        let later = status_patch(&statuses[0], &written_at(1), "2026-02-02T00:00:00Z");
        assert!(status_unchanged(&current, &later));

        // A different verdict is a change; a new generation is a change.
        let mut ok = statuses[0].clone();
        ok.rejection = None;
        let accepted = status_patch(&ok, &written_at(1), "2026-02-02T00:00:00Z");
        assert!(!status_unchanged(&current, &accepted));
        let mut next = statuses[0].clone();
        next.generation = Some(4);
        let newer = status_patch(&next, &written_at(1), "2026-02-02T00:00:00Z");
        assert!(!status_unchanged(&current, &newer));
        assert!(!status_unchanged(&ResourceStatus::default(), &later));

        // Only conditions whose status flips get the new time.
        let mut accepted = accepted;
        keep_transition_times(&current, &mut accepted);
        assert_eq!(
            condition(&accepted, "Accepted")["lastTransitionTime"],
            "2026-02-02T00:00:00Z"
        );
        let rendered = condition(&accepted, "Rendered");
        assert_eq!(rendered["status"], "True");
        assert_eq!(rendered["lastTransitionTime"], "2026-02-02T00:00:00Z");
        let mut same_rendered = status_patch(&ok, &Delivery::TooLarge, "2026-03-03T00:00:00Z");
        let after_accept: ResourceStatus =
            serde_json::from_value(accepted["status"].clone()).expect("a ResourceStatus");
        keep_transition_times(&after_accept, &mut same_rendered);
        assert_eq!(
            condition(&same_rendered, "Accepted")["lastTransitionTime"],
            "2026-02-02T00:00:00Z",
            "Accepted held"
        );
        assert_eq!(
            condition(&same_rendered, "Rendered")["lastTransitionTime"],
            "2026-03-03T00:00:00Z",
            "Rendered flipped"
        );
    }

    #[test]
    fn a_status_written_before_with_ready_is_rewritten() {
        let index = shop();
        let mut ok = judge(&index, "shop")[0].clone();
        ok.rejection = None;
        let mut body = status_patch(&ok, &written_at(1), "2026-01-01T00:00:00Z");
        body["status"]["conditions"][1]["type"] = json!("Ready");
        let old: ResourceStatus =
            serde_json::from_value(body["status"].clone()).expect("a ResourceStatus");
        let mut now = status_patch(&ok, &written_at(1), "2026-02-02T00:00:00Z");
        keep_rendered_since(&old, &mut now);
        assert!(
            !status_unchanged(&old, &now),
            "Ready is replaced by Rendered"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_one_batch() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sender = tokio::spawn(async move {
            for i in 0..100 {
                tx.send(Dirty::one(&format!("ns-{}", i % 3)))
                    .expect("receiver alive");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tokio::time::sleep(Duration::from_millis(1000)).await;
            tx.send(Dirty::one("late")).expect("receiver alive");
        });
        let window = Duration::from_millis(250);
        let started = tokio::time::Instant::now();
        let first = next_batch(&mut rx, window).await.expect("a batch");
        assert_eq!(started.elapsed(), window, "flushed when the window closes");
        assert_eq!(first.namespaces.len(), 3);
        // Marks after the first window form the second batch (100 marks over
        // 200ms fit in one window; nothing is left but "late").
        let second = next_batch(&mut rx, window).await.expect("a batch");
        assert_eq!(second, Dirty::one("late"));
        sender.await.expect("sender finished");
        assert_eq!(next_batch(&mut rx, window).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn continuous_churn_still_flushes_every_window() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            for _ in 0..1000 {
                if tx.send(Dirty::one("busy")).is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let window = Duration::from_millis(250);
        let started = tokio::time::Instant::now();
        let mut batches = 0;
        while started.elapsed() < Duration::from_secs(2) {
            next_batch(&mut rx, window).await.expect("a batch");
            batches += 1;
        }
        // 2 s of churn, one flush per 250 ms window: a bounded write rate,
        // and no starvation.
        assert!((7..=9).contains(&batches), "{batches} batches");
    }

    #[test]
    fn metrics_are_registered_under_their_documented_names() {
        let mut registry = Registry::with_prefix("weft");
        let metrics = ConfigMetrics::default();
        metrics.register(&mut registry);
        metrics.writes.inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        assert!(text.contains("weft_config_writes_total 1"), "{text}");
        assert!(text.contains("weft_config_too_large_total 0"), "{text}");
    }
}
