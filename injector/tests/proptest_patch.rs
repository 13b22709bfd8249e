//! Property: for generated pods the patch always applies, the result is a
//! Pod with unique container names and weft's pieces in place, and a second
//! pass is empty.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use weft_injector::InjectConfig;

static CASE: AtomicUsize = AtomicUsize::new(0);

fn probe() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        (1u16..=65535, "/[a-z]{0,6}")
            .prop_map(|(p, path)| Some(json!({"httpGet": {"port": p, "path": path}}))),
        Just(Some(
            json!({"httpGet": {"port": "main"}, "periodSeconds": 3})
        )),
        (1u16..=65535).prop_map(|p| Some(json!({"tcpSocket": {"port": p}}))),
        Just(Some(json!({"tcpSocket": {"port": "main"}}))),
        (1u16..=65535).prop_map(|p| Some(json!({"grpc": {"port": p}}))),
        Just(Some(json!({"exec": {"command": ["true"]}}))),
    ]
}

fn container(name: String, sidecar: bool, allow_probes: bool) -> impl Strategy<Value = Value> {
    // Container ports avoid the proxy's own (15001, 15006, 15020): those are
    // denied, as tested in tests/patch.rs.
    let port = prop_oneof![1u16..15000, 15021u16..=65535];
    (probe(), probe(), probe(), port).prop_map(move |(l, r, s, port)| {
        let mut c = json!({
            "name": name, "image": "img:1",
            "ports": [{"name": "main", "containerPort": port}]
        });
        if sidecar {
            c["restartPolicy"] = json!("Always");
        }
        if allow_probes {
            for (field, p) in [
                ("livenessProbe", l),
                ("readinessProbe", r),
                ("startupProbe", s),
            ] {
                if let Some(p) = p {
                    c[field] = p;
                }
            }
        }
        c
    })
}

/// Metadata maps: absent, empty, or with keys that need JSON Pointer escaping.
fn map() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        Just(Some(json!({}))),
        prop::collection::btree_map(
            prop_oneof![
                "[a-z]{1,5}",
                "[a-z]{1,5}\\.io/[a-z]{1,5}",
                Just("odd~key/x".to_owned()),
                Just("a~1b".to_owned()),
            ],
            "[a-z0-9]{0,6}",
            1..4,
        )
        .prop_map(|m| Some(Value::Object(
            m.into_iter().map(|(k, v)| (k, Value::String(v))).collect()
        ))),
    ]
}

fn pod() -> impl Strategy<Value = Value> {
    let app = (1usize..4).prop_flat_map(|n| {
        (0..n)
            .map(|i| container(format!("app{i}"), false, true))
            .collect::<Vec<_>>()
    });
    let inits = prop_oneof![
        Just(None),
        (0usize..3, any::<bool>()).prop_flat_map(|(n, side)| {
            (0..n)
                .map(|i| container(format!("init{i}"), side && i % 2 == 1, side && i % 2 == 1))
                .collect::<Vec<_>>()
                .prop_map(Some)
        }),
    ];
    let volumes = prop_oneof![
        Just(None),
        Just(Some(json!([]))),
        Just(Some(json!([{"name": "data", "emptyDir": {}}]))),
    ];
    let sa = prop_oneof![Just(None), "[a-z][a-z0-9-]{0,20}[a-z0-9]".prop_map(Some)];
    (app, inits, volumes, map(), map(), sa).prop_map(
        |(containers, inits, volumes, labels, annotations, sa)| {
            let mut meta = Map::new();
            meta.insert("name".into(), json!("gen"));
            meta.insert("namespace".into(), json!("prop"));
            if let Some(l) = labels {
                meta.insert("labels".into(), l);
            }
            if let Some(a) = annotations {
                meta.insert("annotations".into(), a);
            }
            let mut spec = Map::new();
            spec.insert("containers".into(), Value::Array(containers));
            if let Some(i) = inits {
                spec.insert("initContainers".into(), Value::Array(i));
            }
            if let Some(v) = volumes {
                spec.insert("volumes".into(), v);
            }
            if let Some(sa) = sa {
                spec.insert("serviceAccountName".into(), json!(sa));
            }
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec})
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn patch_applies_and_second_pass_is_empty(p in pod(), native in any::<bool>()) {
        let cfg = InjectConfig { native_sidecar: native, ..InjectConfig::default() };
        let pod = common::pod(p);
        let name = format!("proptest-{:03}", CASE.fetch_add(1, Ordering::Relaxed));
        // `inject` applies, records, and asserts the second pass is empty.
        let (_, doc) = common::inject(&name, &pod, &cfg);

        let mut all = common::names(&doc, "containers");
        all.extend(common::names(&doc, "initContainers"));
        let mut unique = all.clone();
        unique.sort();
        unique.dedup();
        prop_assert_eq!(all.len(), unique.len(), "container names must stay unique: {:?}", all);
        prop_assert_eq!(&doc["metadata"]["labels"]["weft.dev/proxy"], "injected");
        let inits = common::names(&doc, "initContainers");
        if native {
            prop_assert_eq!(&inits[..2], ["weft-init", "weft-proxy"]);
        } else {
            prop_assert_eq!(inits.last().map(String::as_str), Some("weft-init"));
            let containers = common::names(&doc, "containers");
            prop_assert_eq!(containers[0].as_str(), "weft-proxy");
        }
        // Every tcp/http/grpc probe now points at the admin port.
        for list in ["containers", "initContainers"] {
            for c in doc["spec"][list].as_array().into_iter().flatten() {
                if c["name"] == "weft-proxy" { continue; }
                for f in ["livenessProbe", "readinessProbe", "startupProbe"] {
                    let p = &c[f];
                    if p.is_null() || p.get("exec").is_some() { continue; }
                    prop_assert_eq!(&p["httpGet"]["port"], 15020, "{} {} {}", list, c["name"], f);
                }
            }
        }
        // Existing metadata survives.
        for m in ["labels", "annotations"] {
            if let Some(orig) = serde_json::to_value(&pod).ok().and_then(|v| v["metadata"][m].as_object().cloned()) {
                for (k, v) in orig {
                    prop_assert_eq!(&doc["metadata"][m][&k], &v);
                }
            }
        }
    }

    #[test]
    fn arbitrary_json_never_panics(v in any::<Vec<u8>>()) {
        let cfg = InjectConfig::default();
        let _ = weft_injector::admission::review(&v, &cfg);
    }
}
