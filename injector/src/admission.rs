//! AdmissionReview v1 in, AdmissionReview v1 out: no I/O, no panics.
//!
//! [`review`] reads a request body and decides; [`Reviewed::to_json`] writes
//! the response exactly as kube-apiserver expects it. The response is
//! serialized here rather than through kube-core's `AdmissionResponse`,
//! whose `patch: Vec<u8>` serializes as a JSON array of numbers; the API
//! server's Go type is `[]byte`, whose canonical JSON form is a base64
//! string (Go's decoder tolerates the array, but nothing promises it).
//!
//! Outcomes: a body that is not an AdmissionReview v1 with a request and a
//! uid is an [`AdmissionError`] (the server answers HTTP 400: there is no uid
//! to answer to). Everything else gets a review response: allowed with a
//! patch, allowed unchanged (skipped), or denied with a message for the
//! person who created the pod.

use base64::Engine as _;
use json_patch::Patch;
use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::InjectConfig;
use crate::patch::{self, Decision};

/// `apiVersion` of the only AdmissionReview version weft speaks.
pub const ADMISSION_V1: &str = "admission.k8s.io/v1";

/// A body that cannot be answered with an AdmissionReview.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    /// Not JSON, or not the shape of an AdmissionReview.
    #[error("body is not an AdmissionReview: {0}")]
    Malformed(#[from] serde_json::Error),
    /// An AdmissionReview of another version, or another kind of object.
    #[error(
        "expected kind AdmissionReview, apiVersion {ADMISSION_V1}; got kind {kind:?}, apiVersion {api_version:?}"
    )]
    WrongType {
        /// `kind` sent.
        kind: String,
        /// `apiVersion` sent.
        api_version: String,
    },
    /// No `request` member.
    #[error("AdmissionReview has no request")]
    MissingRequest,
    /// Empty `request.uid`.
    #[error("AdmissionReview request has no uid")]
    MissingUid,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewIn {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    request: Option<RequestIn>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestIn {
    #[serde(default)]
    uid: String,
    #[serde(default)]
    kind: Gvk,
    #[serde(default)]
    sub_resource: Option<String>,
    #[serde(default)]
    operation: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    object: Option<Value>,
}

#[derive(Deserialize, Default)]
struct Gvk {
    #[serde(default)]
    group: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    kind: String,
}

/// The decision for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Allowed with this (non-empty) patch.
    Patched(Patch),
    /// Allowed unchanged, for this reason.
    Skipped(&'static str),
    /// Denied with this message.
    Denied(String),
}

impl Verdict {
    /// Metric label of the outcome.
    pub fn result_label(&self) -> &'static str {
        match self {
            Self::Patched(_) => "injected",
            Self::Skipped(_) => "skipped",
            Self::Denied(_) => "denied",
        }
    }
}

/// A decided request.
#[derive(Debug, Clone, PartialEq)]
pub struct Reviewed {
    /// `request.uid`, echoed in the response.
    pub uid: String,
    /// Namespace of the pod (for logs).
    pub namespace: String,
    /// Name (or generateName) of the pod (for logs).
    pub name: String,
    /// What was decided.
    pub verdict: Verdict,
}

/// Decides one AdmissionReview body.
pub fn review(body: &[u8], cfg: &InjectConfig) -> Result<Reviewed, AdmissionError> {
    let review: ReviewIn = serde_json::from_slice(body)?;
    if review.kind != "AdmissionReview" || review.api_version != ADMISSION_V1 {
        return Err(AdmissionError::WrongType {
            kind: review.kind,
            api_version: review.api_version,
        });
    }
    let req = review.request.ok_or(AdmissionError::MissingRequest)?;
    if req.uid.is_empty() {
        return Err(AdmissionError::MissingUid);
    }
    let mut reviewed = Reviewed {
        uid: req.uid,
        namespace: req.namespace.unwrap_or_default(),
        name: req.name.unwrap_or_default(),
        verdict: Verdict::Skipped("not_pod_create"),
    };
    let gvk = &req.kind;
    if !(gvk.group.is_empty() && gvk.version == "v1" && gvk.kind == "Pod") {
        reviewed.verdict = Verdict::Denied(format!(
            "weft-injector only handles Pods; got kind {:?} (group {:?}, version {:?}): check the rules of the MutatingWebhookConfiguration",
            gvk.kind, gvk.group, gvk.version
        ));
        return Ok(reviewed);
    }
    if req.operation != "CREATE" || req.sub_resource.as_deref().is_some_and(|s| !s.is_empty()) {
        return Ok(reviewed);
    }
    let Some(object) = req.object else {
        reviewed.verdict = Verdict::Denied("AdmissionReview request has no object".to_owned());
        return Ok(reviewed);
    };
    let pod = match Pod::deserialize(&object) {
        Ok(p) => p,
        Err(e) => {
            reviewed.verdict = Verdict::Denied(format!("request object is not a valid Pod: {e}"));
            return Ok(reviewed);
        }
    };
    if reviewed.name.is_empty() {
        reviewed.name = pod
            .metadata
            .name
            .clone()
            .or_else(|| pod.metadata.generate_name.clone())
            .unwrap_or_default();
    }
    reviewed.verdict = match patch::decide(&pod, cfg) {
        Ok(Decision::Inject(p)) => Verdict::Patched(p),
        Ok(Decision::Skip(why)) => Verdict::Skipped(why.as_str()),
        Err(e) => Verdict::Denied(e.to_string()),
    };
    Ok(reviewed)
}

impl Reviewed {
    /// The AdmissionReview v1 response body.
    pub fn to_json(&self) -> Vec<u8> {
        let response = match &self.verdict {
            Verdict::Patched(p) => {
                let bytes = serde_json::to_vec(p).expect("a JSON patch serializes");
                json!({
                    "uid": self.uid,
                    "allowed": true,
                    "patchType": "JSONPatch",
                    "patch": base64::engine::general_purpose::STANDARD.encode(bytes),
                })
            }
            Verdict::Skipped(_) => json!({ "uid": self.uid, "allowed": true }),
            Verdict::Denied(msg) => json!({
                "uid": self.uid,
                "allowed": false,
                "status": {
                    "status": "Failure",
                    "code": 400,
                    "reason": "BadRequest",
                    "message": msg,
                },
            }),
        };
        serde_json::to_vec(&json!({
            "apiVersion": ADMISSION_V1,
            "kind": "AdmissionReview",
            "response": response,
        }))
        .expect("a JSON value serializes")
    }
}
