//! AdmissionReview in → AdmissionReview out, without a socket: the exact
//! response JSON kube-apiserver reads, and every kind of bad input.

mod common;

use base64::Engine as _;
use serde_json::{Value, json};
use weft_injector::InjectConfig;
use weft_injector::admission::{AdmissionError, Verdict, review};

/// A Pod CREATE review as kube-apiserver 1.33 sends it.
pub fn pod_review(uid: &str, pod: &Value) -> Value {
    json!({
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    })
}

fn web_pod() -> Value {
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"generateName": "web-5d8f-", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {"serviceAccountName": "web",
                 "containers": [{"name": "web", "image": "web:1", "ports": [{"containerPort": 8080}]}]}
    })
}

fn decide(body: &Value) -> (Verdict, Value) {
    let bytes = serde_json::to_vec(body).expect("json");
    let r = review(&bytes, &InjectConfig::default()).expect("a valid review");
    let out: Value = serde_json::from_slice(&r.to_json()).expect("response is JSON");
    (r.verdict, out)
}

#[test]
fn patched_response_is_exactly_what_the_api_server_expects() {
    let (verdict, out) = decide(&pod_review(
        "705ab4f5-6393-11e8-b7cc-42010a800002",
        &web_pod(),
    ));
    let Verdict::Patched(patch) = verdict else {
        panic!("expected a patch, got {verdict:?}")
    };
    let encoded = base64::engine::general_purpose::STANDARD
        .encode(serde_json::to_vec(&patch).expect("patch json"));
    assert_eq!(
        out,
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": encoded
            }
        })
    );
    // The patch is a base64 *string* that decodes to a JSON patch that applies.
    let b64 = out["response"]["patch"]
        .as_str()
        .expect("patch is a string");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64");
    let ops: json_patch::Patch = serde_json::from_slice(&raw).expect("JSON patch");
    let mut doc = web_pod();
    json_patch::patch(&mut doc, &ops.0).expect("applies");
    common::record("admission-web", &doc);
    assert_eq!(doc["metadata"]["labels"]["weft.dev/proxy"], "injected");
}

#[test]
fn skipped_response_has_no_patch() {
    let mut p = web_pod();
    p["spec"]["hostNetwork"] = json!(true);
    let (verdict, out) = decide(&pod_review("u1", &p));
    assert_eq!(verdict, Verdict::Skipped("host_network"));
    assert_eq!(out["response"], json!({"uid": "u1", "allowed": true}));
}

#[test]
fn denial_carries_the_reason() {
    let mut p = web_pod();
    p["metadata"]["annotations"] = json!({"weft.dev/opaque-ports": "mysql"});
    let (_, out) = decide(&pod_review("u2", &p));
    assert_eq!(out["response"]["uid"], "u2");
    assert_eq!(out["response"]["allowed"], false);
    assert_eq!(out["response"]["status"]["code"], 400);
    let msg = out["response"]["status"]["message"]
        .as_str()
        .expect("message");
    assert!(
        msg.contains("weft.dev/opaque-ports") && msg.contains("mysql"),
        "{msg}"
    );
    assert!(out["response"].get("patch").is_none());
}

#[test]
fn a_pod_using_another_service_accounts_identity_is_denied_even_when_opted_out() {
    let mut p = web_pod();
    p["spec"]["volumes"] =
        json!([{"name": "stolen", "secret": {"secretName": "weft-identity-payments"}}]);
    for opted_out in [false, true] {
        if opted_out {
            p["metadata"]["annotations"] = json!({"weft.dev/inject": "false"});
        }
        let (v, out) = decide(&pod_review("u7", &p));
        assert!(
            matches!(v, Verdict::Denied(_)),
            "opted out: {opted_out}: {v:?}"
        );
        let msg = out["response"]["status"]["message"]
            .as_str()
            .expect("message");
        assert!(
            msg.contains("\"web\"")
                && msg.contains("volume \"stolen\" uses Secret weft-identity-payments"),
            "{msg}"
        );
    }
    // Its own identity is fine (weft mounts it itself).
    p["spec"]["volumes"] = json!([{"name": "mine", "secret": {"secretName": "weft-identity-web"}}]);
    let (v, _) = decide(&pod_review("u8", &p));
    assert!(matches!(v, Verdict::Skipped(_)), "{v:?}");
}

#[test]
fn non_create_operations_pass_unchanged() {
    let mut r = pod_review("u3", &web_pod());
    r["request"]["operation"] = json!("UPDATE");
    let (verdict, _) = decide(&r);
    assert!(matches!(verdict, Verdict::Skipped(_)), "{verdict:?}");
    let mut r = pod_review("u4", &web_pod());
    r["request"]["subResource"] = json!("status");
    assert!(matches!(decide(&r).0, Verdict::Skipped(_)));
}

#[test]
fn wrong_object_kinds_and_shapes_are_denied() {
    let mut r = pod_review("u5", &json!({"kind": "Deployment"}));
    r["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let (v, _) = decide(&r);
    assert!(
        matches!(&v, Verdict::Denied(m) if m.contains("only handles Pods")),
        "{v:?}"
    );

    let mut r = pod_review("u6", &Value::Null);
    r["request"].as_object_mut().expect("obj").remove("object");
    let (v, _) = decide(&r);
    assert!(
        matches!(&v, Verdict::Denied(m) if m.contains("no object")),
        "{v:?}"
    );

    let r = pod_review("u7", &json!({"spec": {"containers": "not-a-list"}}));
    let (v, _) = decide(&r);
    assert!(
        matches!(&v, Verdict::Denied(m) if m.contains("not a valid Pod")),
        "{v:?}"
    );

    let r = pod_review(
        "u8",
        &json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "a", "livenessProbe": {"tcpSocket": {"port": 70000}}}]}}),
    );
    let (v, _) = decide(&r);
    assert!(
        matches!(&v, Verdict::Denied(m) if m.contains("70000")),
        "{v:?}"
    );
}

#[test]
fn bodies_that_are_not_reviews_are_errors() {
    let cfg = InjectConfig::default();
    let deep = "[".repeat(100_000);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"".to_vec(), "not an AdmissionReview"),
        (b"\x00\xff\xfe junk".to_vec(), "not an AdmissionReview"),
        (b"{\"kind\":\"AdmissionReview\",\"apiVersion\":\"admission.k8s.io/v1\",\"request\":{\"uid\":".to_vec(), "not an AdmissionReview"),
        (deep.into_bytes(), "not an AdmissionReview"),
        (b"[1,2,3]".to_vec(), "not an AdmissionReview"),
        (br#"{"kind":"Pod","apiVersion":"v1"}"#.to_vec(), "expected kind AdmissionReview"),
        (br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1beta1","request":{"uid":"x"}}"#.to_vec(), "admission.k8s.io/v1beta1"),
        (br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1"}"#.to_vec(), "no request"),
        (br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":{"uid":""}}"#.to_vec(), "no uid"),
        (br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":{"uid":5}}"#.to_vec(), "not an AdmissionReview"),
    ];
    for (body, needle) in cases {
        let err: AdmissionError = review(&body, &cfg).expect_err(needle);
        assert!(err.to_string().contains(needle), "{err} lacks {needle:?}");
    }
}
