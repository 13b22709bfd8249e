//! Property tests of the webhook's input: AdmissionReview bodies built from
//! hostile pods (fields missing or `null`, wrong types, huge strings, `/`
//! and `~` in label and annotation keys, weft's override annotations with
//! any value, reserved ports and uids, other service accounts' identities)
//! and from broken envelopes. [`review`] never panics: it refuses the body,
//! denies or skips the pod with a message, or returns a JSON patch that
//! applies to the pod as sent and yields a Pod that a second review skips.
//!
//! 256 cases per property: a case is a pod of a few containers, reviewed
//! and patched in a few milliseconds at most, so the module takes one to
//! two seconds in a debug build.

use proptest::prelude::*;
use serde_json::{Map, Value, json};

use crate::admission::{ADMISSION_V1, Verdict, review};
use crate::config::InjectConfig;
use crate::overrides;

/// Whether generated fields may hold values of the wrong type. Well-typed
/// pods get past deserialization and reach the patch builder; ill-typed
/// ones test that deserialization refuses cleanly.
#[derive(Clone, Copy, Debug)]
enum Typing {
    Well,
    Ill,
}

/// Values of a type no field expects, or of its edges.
fn wrong() -> BoxedStrategy<Value> {
    prop_oneof![
        Just(Value::Null),
        Just(json!(true)),
        Just(json!(-1)),
        Just(json!(u64::MAX)),
        Just(json!(1.5)),
        Just(json!("")),
        Just(json!([])),
        Just(json!({})),
        Just(json!([{}])),
    ]
    .boxed()
}

/// Names and values: ordinary, empty, with JSON Pointer specials, huge.
fn text() -> BoxedStrategy<String> {
    prop_oneof![
        8 => "[a-z][a-z0-9-]{0,10}",
        1 => Just(String::new()),
        1 => Just("a/b".to_owned()),
        1 => Just("~0~1/~".to_owned()),
        1 => Just("weft-proxy".to_owned()),
        1 => Just("x".repeat(300)),
        1 => Just("y".repeat(100_000)),
        1 => any::<String>(),
    ]
    .boxed()
}

/// A field: mostly the generated value, else absent, or (ill-typed) a
/// value of the wrong type.
fn field(v: impl Strategy<Value = Value> + 'static, t: Typing) -> BoxedStrategy<Option<Value>> {
    match t {
        Typing::Well => prop_oneof![1 => Just(None), 3 => v.prop_map(Some)].boxed(),
        Typing::Ill => prop_oneof![
            1 => Just(None),
            3 => v.prop_map(Some),
            1 => wrong().prop_map(Some),
        ]
        .boxed(),
    }
}

/// A field that is mostly absent: settings that end in a denial when set.
fn rare(v: impl Strategy<Value = Value> + 'static) -> BoxedStrategy<Option<Value>> {
    prop_oneof![15 => Just(None), 1 => v.prop_map(Some)].boxed()
}

/// A probe's port: a number, a name, or a number written as a string.
fn probe_port() -> BoxedStrategy<Value> {
    prop_oneof![
        60 => (1u16..=65535).prop_map(Value::from),
        4 => Just(json!("main")),
        1 => Just(json!("8080")),
        1 => Just(json!("+80")),
        1 => Just(json!(0)),
        1 => Just(json!(70000)),
        1 => Just(json!(-80)),
        1 => text().prop_map(Value::String),
    ]
    .boxed()
}

fn container_port() -> BoxedStrategy<Value> {
    prop_oneof![
        12 => (1i32..15000).prop_map(Value::from),
        1 => Just(json!(15020)),
        1 => Just(json!(0)),
        1 => Just(json!(70000)),
        1 => Just(json!(-80)),
    ]
    .boxed()
}

fn probe(t: Typing) -> BoxedStrategy<Value> {
    let headers = prop::collection::vec(
        (text(), text()).prop_map(|(n, v)| json!({"name": n, "value": v})),
        0..3,
    );
    let scheme = prop_oneof![
        10 => Just(json!("HTTP")),
        1 => Just(json!("https")),
        1 => Just(json!("FTP")),
    ];
    let http = (
        // Always a port (none is a mistake the API server reports), of the
        // wrong type when ill-typed.
        match t {
            Typing::Well => probe_port().prop_map(Some).boxed(),
            Typing::Ill => {
                prop_oneof![3 => probe_port().prop_map(Some), 1 => wrong().prop_map(Some)].boxed()
            }
        },
        field(text().prop_map(Value::String), t),
        field(scheme, t),
        field(headers.prop_map(Value::Array), t),
    )
        .prop_map(|(port, path, scheme, headers)| {
            object([
                ("port", port),
                ("path", path),
                ("scheme", scheme),
                ("httpHeaders", headers),
            ])
        });
    let port_only = move || field(probe_port(), t).prop_map(|p| object([("port", p)]));
    (
        field(http, t),
        rare(port_only()),
        // gRPC ports are numbers only.
        rare(field((0i32..=65536).prop_map(Value::from), t).prop_map(|p| object([("port", p)]))),
        rare(Just(json!({"command": ["true"]}))),
        field((0i32..5).prop_map(Value::from), t),
    )
        .prop_map(|(http, tcp, grpc, exec, timeout)| {
            object([
                ("httpGet", http),
                ("tcpSocket", tcp),
                ("grpc", grpc),
                ("exec", exec),
                ("timeoutSeconds", timeout),
            ])
        })
        .boxed()
}

fn container(t: Typing) -> BoxedStrategy<Value> {
    let ports = prop::collection::vec(
        (
            field(
                prop_oneof![Just(json!("main")), text().prop_map(Value::String)],
                t,
            ),
            field(container_port(), t),
        )
            .prop_map(|(name, p)| object([("name", name), ("containerPort", p)])),
        0..3,
    );
    let secret = prop_oneof![
        1 => Just("weft-identity-default".to_owned()),
        1 => Just("weft-identity-other".to_owned()),
        4 => Just("db-password".to_owned()),
    ];
    (
        field(text().prop_map(Value::String), t),
        field(ports.prop_map(Value::Array), t),
        (field(probe(t), t), field(probe(t), t), field(probe(t), t)),
        field(prop_oneof![Just(json!("Always")), Just(json!("Never"))], t),
        rare(prop_oneof![Just(json!(1337)), Just(json!(0))].prop_map(|u| json!({"runAsUser": u}))),
        rare(secret.prop_map(
            |n| json!([{"name": "T", "valueFrom": {"secretKeyRef": {"name": n, "key": "k"}}}]),
        )),
    )
        .prop_map(|(name, ports, (live, ready, start), restart, sc, env)| {
            object([
                ("name", name),
                ("image", Some(json!("app:1"))),
                ("ports", ports),
                ("livenessProbe", live),
                ("readinessProbe", ready),
                ("startupProbe", start),
                ("restartPolicy", restart),
                ("securityContext", sc),
                ("env", env),
            ])
        })
        .boxed()
}

/// Label and annotation maps: keys that need escaping, weft's own keys
/// with good and bad values, any strings.
fn string_map(t: Typing) -> BoxedStrategy<Value> {
    let weft_key = prop_oneof![
        Just(overrides::INJECT),
        Just(overrides::EXCLUDE_INBOUND_PORTS),
        Just(overrides::EXCLUDE_OUTBOUND_PORTS),
        Just(overrides::EXCLUDE_OUTBOUND_CIDRS),
        Just(overrides::OPAQUE_PORTS),
        Just(overrides::PROXY_CPU_REQUEST),
        Just(overrides::PROXY_CPU_LIMIT),
        Just(overrides::PROXY_MEMORY_REQUEST),
        Just(overrides::PROXY_MEMORY_LIMIT),
        Just(overrides::PROXY_LOG_LEVEL),
        Just(crate::patch::PROXY_LABEL),
        Just(crate::patch::DEFAULT_CONTAINER_ANNOTATION),
    ]
    .prop_map(str::to_owned);
    let key = prop_oneof![
        1 => weft_key,
        3 => prop_oneof![
            Just("a/b".to_owned()),
            Just("odd~key/x".to_owned()),
            Just("a~1b".to_owned()),
            "[a-z]{1,5}\\.io/[a-z]{1,5}",
            text(),
        ],
    ];
    let value = prop_oneof![
        Just("true".to_owned()),
        Just("8080, 9090".to_owned()),
        Just("0,65536".to_owned()),
        Just("10.0.0.0/8,fd00::/8".to_owned()),
        Just("10.0.0.0/33".to_owned()),
        Just("100m".to_owned()),
        Just("0.5.5".to_owned()),
        Just("64Mi".to_owned()),
        Just("99999999999999999999999Ti".to_owned()),
        Just("debug".to_owned()),
        text(),
    ];
    let value = match t {
        Typing::Well => value.prop_map(Value::String).boxed(),
        Typing::Ill => prop_oneof![5 => value.prop_map(Value::String), 1 => wrong()].boxed(),
    };
    prop::collection::btree_map(key, value, 0..4)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
        .boxed()
}

fn pod(t: Typing) -> BoxedStrategy<Value> {
    let metadata = (
        field(text().prop_map(Value::String), t),
        field(string_map(t), t),
        field(string_map(t), t),
    )
        .prop_map(|(name, labels, annotations)| {
            object([
                ("name", name),
                ("labels", labels),
                ("annotations", annotations),
            ])
        });
    let volume = prop_oneof![
        12 => Just(json!({"name": "data", "emptyDir": {}})),
        1 => Just(json!({"name": "weft", "emptyDir": {}})),
        1 => Just(json!({"name": "id", "secret": {"secretName": "weft-identity-other"}})),
    ];
    let spec = (
        // Mostly some containers; sometimes none, `null` or absent.
        prop_oneof![
            30 => prop::collection::vec(container(t), 1..4).prop_map(|c| Some(Value::Array(c))),
            1 => Just(Some(json!([]))),
            1 => Just(Some(Value::Null)),
            1 => Just(None),
        ],
        field(
            prop::collection::vec(container(t), 0..3).prop_map(Value::Array),
            t,
        ),
        field(
            prop::collection::vec(volume, 0..3).prop_map(Value::Array),
            t,
        ),
        rare(Just(json!(true))),
        field(
            prop_oneof![Just("default".to_owned()), text()].prop_map(Value::String),
            t,
        ),
        rare(
            prop_oneof![Just(json!(1337)), Just(json!(1000))].prop_map(|u| json!({"runAsUser": u})),
        ),
    )
        .prop_map(|(containers, inits, volumes, host, sa, sc)| {
            object([
                ("containers", containers),
                ("initContainers", inits),
                ("volumes", volumes),
                ("hostNetwork", host),
                ("serviceAccountName", sa),
                ("securityContext", sc),
            ])
        });
    let no_spec = match t {
        Typing::Well => Just(None).boxed(),
        Typing::Ill => field(wrong(), t),
    };
    (
        field(metadata, t),
        prop_oneof![20 => spec.prop_map(Some), 1 => no_spec],
    )
        .prop_map(|(metadata, spec)| {
            object([
                ("apiVersion", Some(json!("v1"))),
                ("kind", Some(json!("Pod"))),
                ("metadata", metadata),
                ("spec", spec),
            ])
        })
        .boxed()
}

/// A well-formed AdmissionReview v1 for creating `pod`.
fn create(uid: &str, pod: &Value) -> Value {
    json!({
        "apiVersion": ADMISSION_V1,
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "namespace": "prop",
            "object": pod,
        },
    })
}

/// An AdmissionReview for `pod` with a broken or unexpected envelope.
fn odd_review(pod: Value) -> BoxedStrategy<Value> {
    (
        prop_oneof![
            Just(json!(ADMISSION_V1)),
            Just(json!("admission.k8s.io/v1beta1")),
            wrong()
        ],
        prop_oneof![Just(json!("AdmissionReview")), wrong()],
        prop_oneof![Just(json!("3f1c")), Just(json!("")), wrong()],
        prop_oneof![
            Just(json!({"group": "", "version": "v1", "kind": "Pod"})),
            Just(json!({"group": "apps", "version": "v1", "kind": "Deployment"})),
            wrong(),
        ],
        prop_oneof![Just(json!("CREATE")), Just(json!("UPDATE")), wrong()],
        prop_oneof![Just(None), Just(Some(json!("status")))],
        any::<bool>(),
    )
        .prop_map(move |(api_version, kind, uid, gvk, op, sub, with_object)| {
            let request = object([
                ("uid", Some(uid)),
                ("kind", Some(gvk)),
                ("operation", Some(op)),
                ("subResource", sub),
                ("object", with_object.then(|| pod.clone())),
            ]);
            json!({"apiVersion": api_version, "kind": kind, "request": request})
        })
        .boxed()
}

/// A JSON object of the members that are present.
fn object<const N: usize>(members: [(&str, Option<Value>); N]) -> Value {
    Value::Object(
        members
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v)))
            .collect::<Map<_, _>>(),
    )
}

/// Found by `hostile_reviews_are_answered_or_refused`: a pod without
/// containers got a patch adding the proxy at `/spec/containers/0`, which
/// does not apply to a missing or `null` list and would turn an empty list
/// into a pod running only the proxy.
#[test]
fn pod_without_containers_is_denied() {
    for spec in [
        json!({}),
        json!({"containers": null}),
        json!({"containers": []}),
    ] {
        for native in [false, true] {
            let cfg = InjectConfig {
                native_sidecar: native,
                ..InjectConfig::default()
            };
            let body = create(
                "u",
                &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {}, "spec": spec}),
            );
            let reviewed =
                review(&serde_json::to_vec(&body).expect("JSON"), &cfg).expect("a review");
            let Verdict::Denied(msg) = reviewed.verdict else {
                panic!(
                    "{spec} (native {native}): expected a denial, got {:?}",
                    reviewed.verdict
                );
            };
            assert!(msg.contains("no containers"), "{msg}");
        }
    }
}

/// Checks one review's answer: a response for the request's uid, and a
/// patch, when there is one, that applies to the pod and is not needed
/// twice.
fn check_answer(body: &Value, cfg: &InjectConfig) -> Result<(), TestCaseError> {
    let bytes = serde_json::to_vec(body).expect("JSON serializes");
    let Ok(reviewed) = review(&bytes, cfg) else {
        return Ok(());
    };
    let out: Value = serde_json::from_slice(&reviewed.to_json()).expect("the response is JSON");
    prop_assert_eq!(&out["response"]["uid"], &body["request"]["uid"]);
    match reviewed.verdict {
        Verdict::Patched(patch) => {
            // The API server applies the patch to the pod it sent, whose
            // `metadata` is always an object (Go's encoder writes a struct
            // even when empty); absent or `null` here, it reads as empty.
            let mut pod = body["request"]["object"].clone();
            if pod["metadata"].is_null() {
                pod["metadata"] = json!({});
            }
            json_patch::patch(&mut pod, &patch).map_err(|e| {
                TestCaseError::fail(format!("patch does not apply: {e}\n{patch:?}"))
            })?;
            let again = review(
                &serde_json::to_vec(&create("again", &pod)).expect("JSON"),
                cfg,
            )
            .map_err(|e| TestCaseError::fail(format!("patched pod: {e}")))?;
            prop_assert_eq!(again.verdict, Verdict::Skipped("already_injected"));
        }
        Verdict::Denied(msg) => prop_assert!(!msg.is_empty()),
        Verdict::Skipped(_) => {}
    }
    Ok(())
}

proptest! {
    // 256 cases per property (see the module documentation).
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn well_typed_pods_are_patched_or_denied(pod in pod(Typing::Well), native in any::<bool>()) {
        let cfg = InjectConfig { native_sidecar: native, ..InjectConfig::default() };
        check_answer(&create("3f1c", &pod), &cfg)?;
    }

    #[test]
    fn ill_typed_pods_and_odd_reviews_are_answered_or_refused(
        body in prop_oneof![
            pod(Typing::Ill).prop_map(|p| create("3f1c", &p)),
            pod(Typing::Ill).prop_flat_map(odd_review),
        ],
        native in any::<bool>(),
    ) {
        let cfg = InjectConfig { native_sidecar: native, ..InjectConfig::default() };
        check_answer(&body, &cfg)?;
    }

    #[test]
    fn arbitrary_and_truncated_bodies_never_panic(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..512),
            pod(Typing::Well).prop_map(|p| serde_json::to_vec(&create("3f1c", &p)).expect("JSON")),
        ],
        cut in any::<prop::sample::Index>(),
    ) {
        let cfg = InjectConfig::default();
        let _ = review(&bytes, &cfg);
        let _ = review(&bytes[..cut.index(bytes.len() + 1)], &cfg);
    }
}
