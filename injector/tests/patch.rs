//! The patch builder over many pod shapes: each patch is applied with
//! json-patch, the result is checked, recorded for schema validation, and a
//! second pass must be empty.

mod common;

use common::{container, env, inject, names, pod};
use json_patch::PatchOperation;
use serde_json::{Value, json};
use weft_injector::patch::{Decision, PatchError, Skip};
use weft_injector::probes::AppProbes;
use weft_injector::{InjectConfig, decide};

fn legacy() -> InjectConfig {
    InjectConfig {
        native_sidecar: false,
        ..InjectConfig::default()
    }
}

fn bare() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"containers": [{"name": "app", "image": "web:1"}]}
    })
}

fn paths(p: &json_patch::Patch) -> Vec<String> {
    p.0.iter()
        .map(|op| match op {
            PatchOperation::Add(a) => format!("add {}", a.path),
            PatchOperation::Replace(r) => format!("replace {}", r.path),
            other => format!("{other:?}"),
        })
        .collect()
}

#[test]
fn bare_pod_gets_everything_as_native_sidecar() {
    let (patch, doc) = inject("bare-native", &pod(bare()), &InjectConfig::default());
    // Whole lists/maps are added when absent.
    assert_eq!(
        paths(&patch),
        [
            "add /spec/initContainers",
            "add /spec/volumes",
            "add /metadata/labels",
            "add /metadata/annotations"
        ]
    );
    assert_eq!(names(&doc, "initContainers"), ["weft-init", "weft-proxy"]);
    assert_eq!(names(&doc, "containers"), ["app"]);
    assert_eq!(doc["metadata"]["labels"]["weft.dev/proxy"], "injected");
    assert_eq!(
        doc["metadata"]["annotations"]["weft.dev/proxy-version"],
        env!("CARGO_PKG_VERSION")
    );

    let proxy = container(&doc, "initContainers", "weft-proxy");
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["args"], json!(["run"]));
    assert_eq!(proxy["startupProbe"]["httpGet"]["port"], 15020);
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
    assert!(proxy.get("lifecycle").is_none());
    let sc = &proxy["securityContext"];
    assert_eq!(sc["runAsUser"], 1337);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(
        proxy["resources"]["requests"],
        json!({"cpu": "10m", "memory": "20Mi"})
    );
    assert_eq!(proxy["resources"]["limits"], json!({"memory": "128Mi"}));
    assert_eq!(
        proxy["volumeMounts"],
        json!([{"name": "weft", "mountPath": "/var/run/weft", "readOnly": true}])
    );
    for (var, field) in [
        ("WEFT_POD_NAME", "metadata.name"),
        ("WEFT_POD_NAMESPACE", "metadata.namespace"),
        ("WEFT_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ("WEFT_POD_IP", "status.podIP"),
        ("WEFT_NODE_NAME", "spec.nodeName"),
    ] {
        let e = env(proxy, var).unwrap_or_else(|| panic!("{var} missing"));
        assert_eq!(e["valueFrom"]["fieldRef"]["fieldPath"], field, "{var}");
    }
    assert_eq!(
        env(proxy, "WEFT_TRUST_DOMAIN").expect("trust domain")["value"],
        "cluster.local"
    );
    assert_eq!(
        env(proxy, "WEFT_LOG_LEVEL").expect("log level")["value"],
        "info"
    );
    assert!(env(proxy, "WEFT_APP_PROBES").is_none(), "no probes, no env");

    let init = container(&doc, "initContainers", "weft-init");
    assert_eq!(init["args"][0], "init");
    let isc = &init["securityContext"];
    assert_eq!(isc["runAsUser"], 0);
    assert_eq!(isc["runAsNonRoot"], false);
    assert_eq!(isc["allowPrivilegeEscalation"], false);
    assert_eq!(isc["privileged"], false);
    assert_eq!(isc["capabilities"]["add"], json!(["NET_ADMIN", "NET_RAW"]));
    assert_eq!(isc["capabilities"]["drop"], json!(["ALL"]));
    let args: Vec<&str> = init["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let at = args
        .iter()
        .position(|a| *a == "--exclude-inbound-ports")
        .expect("inbound exclusions");
    assert_eq!(args[at + 1], "15020", "the admin port is never captured");
    assert!(!args.contains(&"--exclude-outbound-ports"));

    let vol = &doc["spec"]["volumes"][0];
    assert_eq!(vol["name"], "weft");
    let sources = vol["projected"]["sources"].as_array().expect("sources");
    assert_eq!(sources.len(), 3, "{sources:?}");
    // The config first and whole: `proxy.json` or `proxy.json.gz`, whichever
    // the operator wrote; the ConfigMap itself is required.
    assert_eq!(
        sources[0],
        json!({"configMap": {"name": "weft-proxy", "optional": false}})
    );
    assert_eq!(sources[1]["secret"]["name"], "weft-identity-default");
    assert_eq!(sources[1]["secret"]["optional"], false);
    let keys: Vec<&str> = sources[1]["secret"]["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["key"].as_str())
        .collect();
    assert_eq!(keys, ["tls.crt", "tls.key", "ca.crt"]);
    assert_eq!(sources[2]["downwardAPI"]["items"][0]["path"], "labels");
    assert_eq!(
        sources[2]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"],
        "metadata.labels"
    );
}

#[test]
fn existing_init_containers_come_after_the_proxy() {
    let mut p = bare();
    p["spec"]["initContainers"] = json!([
        {"name": "migrate", "image": "migrate:1"},
        {"name": "seed", "image": "seed:1"}
    ]);
    let (patch, doc) = inject("init-containers-native", &pod(p), &InjectConfig::default());
    assert_eq!(
        &paths(&patch)[..2],
        ["add /spec/initContainers/0", "add /spec/initContainers/1"]
    );
    assert_eq!(
        names(&doc, "initContainers"),
        ["weft-init", "weft-proxy", "migrate", "seed"]
    );
}

#[test]
fn empty_init_container_list_and_empty_maps() {
    let mut p = bare();
    p["spec"]["initContainers"] = json!([]);
    p["spec"]["volumes"] = json!([]);
    p["metadata"]["labels"] = json!({});
    p["metadata"]["annotations"] = json!({});
    let (patch, doc) = inject("empty-lists", &pod(p), &InjectConfig::default());
    let ps = paths(&patch);
    assert!(ps.contains(&"add /spec/volumes/-".to_owned()), "{ps:?}");
    assert!(
        ps.contains(&"add /metadata/labels/weft.dev~1proxy".to_owned()),
        "{ps:?}"
    );
    assert!(
        ps.contains(&"add /metadata/annotations/weft.dev~1proxy-version".to_owned()),
        "{ps:?}"
    );
    assert_eq!(names(&doc, "initContainers"), ["weft-init", "weft-proxy"]);
}

#[test]
fn user_native_sidecars_keep_their_place_and_get_probes_rewritten() {
    let mut p = bare();
    p["spec"]["initContainers"] = json!([
        {"name": "setup", "image": "setup:1"},
        {"name": "logship", "image": "ship:1", "restartPolicy": "Always",
         "ports": [{"name": "ship-http", "containerPort": 2020}],
         "readinessProbe": {"httpGet": {"path": "/ok", "port": "ship-http"}}}
    ]);
    let (_, doc) = inject("user-native-sidecar", &pod(p), &InjectConfig::default());
    assert_eq!(
        names(&doc, "initContainers"),
        ["weft-init", "weft-proxy", "setup", "logship"]
    );
    let ship = container(&doc, "initContainers", "logship");
    assert_eq!(
        ship["readinessProbe"]["httpGet"]["path"],
        "/app-health/logship/readyz"
    );
    assert_eq!(ship["restartPolicy"], "Always");
    let rec: AppProbes = serde_json::from_str(
        doc["metadata"]["annotations"]["weft.dev/app-probes"]
            .as_str()
            .expect("annotation"),
    )
    .expect("probe record parses");
    let r = rec.containers["logship"].readyz.as_ref().expect("readyz");
    assert_eq!(
        serde_json::to_value(r).expect("json"),
        json!({"http": {"port": 2020, "path": "/ok", "scheme": "HTTP"}, "timeoutSeconds": 1})
    );
}

#[test]
fn every_probe_kind_is_rewritten_and_recorded() {
    let p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "probes", "namespace": "shop"},
        "spec": {"containers": [
            {"name": "web", "image": "web:1",
             "ports": [{"name": "http", "containerPort": 8080}, {"name": "admin", "containerPort": 9000}],
             "livenessProbe": {"httpGet": {"path": "/healthz?deep=1", "port": "http", "scheme": "HTTPS",
                               "host": "127.0.0.1", "httpHeaders": [{"name": "X-Probe", "value": "1"}]},
                               "periodSeconds": 7, "failureThreshold": 4, "timeoutSeconds": 3},
             "readinessProbe": {"tcpSocket": {"port": 9000}, "initialDelaySeconds": 2},
             "startupProbe": {"grpc": {"port": 9090, "service": "web.v1"}, "failureThreshold": 30}},
            {"name": "db", "image": "db:1",
             "livenessProbe": {"exec": {"command": ["pg_isready"]}},
             "readinessProbe": {"tcpSocket": {"port": "5432"}}}
        ]}
    });
    let (patch, doc) = inject("every-probe-kind", &pod(p), &InjectConfig::default());
    let ps = paths(&patch);
    assert_eq!(
        &ps[..4],
        [
            "replace /spec/containers/0/livenessProbe",
            "replace /spec/containers/0/readinessProbe",
            "replace /spec/containers/0/startupProbe",
            "replace /spec/containers/1/readinessProbe"
        ]
    );
    let web = container(&doc, "containers", "web");
    for (field, ep) in [
        ("livenessProbe", "livez"),
        ("readinessProbe", "readyz"),
        ("startupProbe", "startupz"),
    ] {
        let probe = &web[field];
        assert_eq!(
            probe["httpGet"]["path"],
            format!("/app-health/web/{ep}"),
            "{field}"
        );
        assert_eq!(probe["httpGet"]["port"], 15020, "{field}");
        assert!(
            probe.get("tcpSocket").is_none() && probe.get("grpc").is_none(),
            "{field}"
        );
    }
    // Timing stays on the rewritten probe.
    assert_eq!(web["livenessProbe"]["periodSeconds"], 7);
    assert_eq!(web["livenessProbe"]["failureThreshold"], 4);
    assert_eq!(web["livenessProbe"]["timeoutSeconds"], 3);
    assert_eq!(web["readinessProbe"]["initialDelaySeconds"], 2);
    assert_eq!(web["startupProbe"]["failureThreshold"], 30);
    // exec is left alone.
    let db = container(&doc, "containers", "db");
    assert_eq!(
        db["livenessProbe"],
        json!({"exec": {"command": ["pg_isready"]}})
    );
    assert_eq!(
        db["readinessProbe"]["httpGet"]["path"],
        "/app-health/db/readyz"
    );

    let text = doc["metadata"]["annotations"]["weft.dev/app-probes"]
        .as_str()
        .expect("annotation");
    let record: Value = serde_json::from_str(text).expect("annotation is JSON");
    assert_eq!(
        record,
        json!({"version": 1, "containers": {
            "web": {
                "livez": {"http": {"port": 8080, "path": "/healthz?deep=1", "scheme": "HTTPS", "host": "127.0.0.1",
                                   "headers": [{"name": "X-Probe", "value": "1"}]}, "timeoutSeconds": 3},
                "readyz": {"tcp": {"port": 9000}, "timeoutSeconds": 1},
                "startupz": {"grpc": {"port": 9090, "service": "web.v1"}, "timeoutSeconds": 1}
            },
            "db": {"readyz": {"tcp": {"port": 5432}, "timeoutSeconds": 1}}
        }})
    );
    let proxy = container(&doc, "initContainers", "weft-proxy");
    assert_eq!(env(proxy, "WEFT_APP_PROBES").expect("env")["value"], text);
}

#[test]
fn legacy_mode_puts_the_proxy_first_with_a_post_start_wait() {
    let mut p = bare();
    p["spec"]["initContainers"] = json!([{"name": "migrate", "image": "migrate:1"}]);
    p["spec"]["containers"][0]["readinessProbe"] = json!({"httpGet": {"path": "/r", "port": 80}});
    let (patch, doc) = inject("legacy-sidecar", &pod(p), &legacy());
    let ps = paths(&patch);
    // The probe is replaced before the proxy shifts container indices.
    assert_eq!(ps[0], "replace /spec/containers/0/readinessProbe");
    assert_eq!(names(&doc, "containers"), ["weft-proxy", "app"]);
    // User init containers run before capture: no proxy would serve them yet.
    assert_eq!(names(&doc, "initContainers"), ["migrate", "weft-init"]);
    let proxy = container(&doc, "containers", "weft-proxy");
    assert!(proxy.get("restartPolicy").is_none());
    assert!(proxy.get("startupProbe").is_none());
    assert_eq!(
        proxy["lifecycle"]["postStart"]["exec"]["command"],
        json!(["weft-proxy", "wait-ready", "--timeout", "120s"])
    );
    let app = container(&doc, "containers", "app");
    assert_eq!(
        app["readinessProbe"]["httpGet"]["path"],
        "/app-health/app/readyz"
    );
    assert_eq!(
        doc["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
        "app"
    );
}

#[test]
fn legacy_mode_without_init_containers() {
    let (_, doc) = inject("legacy-bare", &pod(bare()), &legacy());
    assert_eq!(names(&doc, "initContainers"), ["weft-init"]);
    assert_eq!(names(&doc, "containers"), ["weft-proxy", "app"]);
}

#[test]
fn existing_volumes_labels_and_slashy_annotations() {
    let p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "vols", "namespace": "shop",
                     "labels": {"app.kubernetes.io/name": "web", "a~b": "c"},
                     "annotations": {"example.com/owner": "team/a", "odd~key/x": "y"}},
        "spec": {
            "serviceAccountName": "web-sa",
            "containers": [{"name": "app", "image": "web:1",
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
            "volumes": [{"name": "data", "emptyDir": {}},
                        {"name": "cfg", "configMap": {"name": "web-cfg"}}]
        }
    });
    let (patch, doc) = inject("existing-volumes", &pod(p), &InjectConfig::default());
    let ps = paths(&patch);
    assert!(ps.contains(&"add /spec/volumes/-".to_owned()));
    assert!(ps.contains(&"add /metadata/labels/weft.dev~1proxy".to_owned()));
    let vols: Vec<&str> = doc["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(vols, ["data", "cfg", "weft"]);
    assert_eq!(
        doc["spec"]["volumes"][2]["projected"]["sources"][1]["secret"]["name"],
        "weft-identity-web-sa"
    );
    let labels = &doc["metadata"]["labels"];
    assert_eq!(labels["app.kubernetes.io/name"], "web");
    assert_eq!(labels["a~b"], "c");
    let ann = &doc["metadata"]["annotations"];
    assert_eq!(ann["example.com/owner"], "team/a");
    assert_eq!(ann["odd~key/x"], "y");
    assert!(ann.get("weft.dev/proxy-version").is_some());
}

#[test]
fn overrides_reach_init_args_env_and_resources() {
    let mut p = bare();
    p["metadata"]["annotations"] = json!({
        "weft.dev/exclude-inbound-ports": "9100",
        "weft.dev/exclude-outbound-ports": "5432,6379",
        "weft.dev/exclude-outbound-cidrs": "169.254.169.254/32,fd00::/8",
        "weft.dev/opaque-ports": "3306",
        "weft.dev/proxy-cpu-request": "50m",
        "weft.dev/proxy-cpu-limit": "500m",
        "weft.dev/proxy-memory-request": "32Mi",
        "weft.dev/proxy-memory-limit": "256Mi",
        "weft.dev/proxy-log-level": "debug",
        "weft.dev/inject": "true"
    });
    let (_, doc) = inject("overrides", &pod(p), &InjectConfig::default());
    let init = container(&doc, "initContainers", "weft-init");
    let args: Vec<&str> = init["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let arg = |flag: &str| args[args.iter().position(|a| *a == flag).expect(flag) + 1];
    assert_eq!(arg("--exclude-inbound-ports"), "15020,9100");
    assert_eq!(arg("--exclude-outbound-ports"), "5432,6379");
    assert_eq!(
        arg("--exclude-outbound-cidrs"),
        "169.254.169.254/32,fd00::/8"
    );
    assert_eq!(arg("--proxy-uid"), "1337");
    let proxy = container(&doc, "initContainers", "weft-proxy");
    assert_eq!(
        env(proxy, "WEFT_OPAQUE_PORTS").expect("opaque")["value"],
        "3306"
    );
    assert_eq!(
        env(proxy, "WEFT_LOG_LEVEL").expect("level")["value"],
        "debug"
    );
    assert_eq!(
        proxy["resources"],
        json!({"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"cpu": "500m", "memory": "256Mi"}})
    );
}

#[test]
fn mesh_image_and_pull_policy_are_used() {
    let mut mesh = weft_api::mesh::MeshSpec::default();
    mesh.injection.proxy_image = "registry.local/weft-proxy:dev".into();
    mesh.injection.image_pull_policy = Some(weft_api::mesh::PullPolicy::Never);
    mesh.injection.exclude_outbound_cidrs = vec!["10.96.0.1/32".into()];
    let cfg = InjectConfig::from_mesh(&mesh).expect("valid mesh");
    let (_, doc) = inject("mesh-image", &pod(bare()), &cfg);
    for name in ["weft-init", "weft-proxy"] {
        let c = container(&doc, "initContainers", name);
        assert_eq!(c["image"], "registry.local/weft-proxy:dev");
        assert_eq!(c["imagePullPolicy"], "Never");
    }
    let init = container(&doc, "initContainers", "weft-init");
    assert!(
        init["args"]
            .as_array()
            .expect("args")
            .contains(&json!("10.96.0.1/32"))
    );
}

#[test]
fn skipped_pods_get_an_empty_patch() {
    let cfg = InjectConfig::default();
    let mut host = bare();
    host["spec"]["hostNetwork"] = json!(true);
    assert_eq!(
        decide(&pod(host), &cfg),
        Ok(Decision::Skip(Skip::HostNetwork))
    );

    let mut out = bare();
    out["metadata"]["annotations"] = json!({"weft.dev/inject": "false"});
    assert_eq!(
        decide(&pod(out.clone()), &cfg),
        Ok(Decision::Skip(Skip::OptedOut))
    );
    assert!(
        weft_injector::patch(&pod(out), &cfg)
            .expect("skip")
            .0
            .is_empty()
    );

    let mut labelled = bare();
    labelled["metadata"]["labels"] = json!({"weft.dev/proxy": "injected"});
    assert_eq!(
        decide(&pod(labelled), &cfg),
        Ok(Decision::Skip(Skip::AlreadyInjected))
    );

    let mut has_proxy = bare();
    has_proxy["spec"]["containers"] =
        json!([{"name": "weft-proxy", "image": "x"}, {"name": "app", "image": "y"}]);
    assert_eq!(
        decide(&pod(has_proxy), &cfg),
        Ok(Decision::Skip(Skip::AlreadyInjected))
    );
}

#[test]
fn unusable_pods_are_denied_with_a_clear_message() {
    let cfg = InjectConfig::default();
    let cases: Vec<(Value, &str)> = vec![
        (
            {
                let mut p = bare();
                p["metadata"]["annotations"] = json!({"weft.dev/inject": "yes please"});
                p
            },
            "weft.dev/inject",
        ),
        (
            {
                let mut p = bare();
                p["metadata"]["annotations"] = json!({"weft.dev/exclude-inbound-ports": "80,http"});
                p
            },
            "weft.dev/exclude-inbound-ports: \"http\"",
        ),
        (
            {
                let mut p = bare();
                p["metadata"]["annotations"] = json!({"weft.dev/proxy-memory-limit": "lots"});
                p
            },
            "weft.dev/proxy-memory-limit",
        ),
        (
            {
                let mut p = bare();
                p["spec"]["volumes"] = json!([{"name": "weft", "emptyDir": {}}]);
                p
            },
            "volume named \"weft\"",
        ),
        (
            {
                let mut p = bare();
                p["spec"]["serviceAccountName"] = json!("a".repeat(250));
                p
            },
            "too long",
        ),
        (
            {
                let mut p = bare();
                p["spec"]["containers"][0]["livenessProbe"] = json!({"httpGet": {"port": "nope"}});
                p
            },
            "container \"app\" livenessProbe: port \"nope\" names no port",
        ),
    ];
    let more: Vec<(Value, &str)> = vec![
        (
            {
                let mut p = bare();
                p["spec"]["containers"][0]["ports"] = json!([{"containerPort": 15006}]);
                p
            },
            "container \"app\" declares port 15006",
        ),
        (
            {
                let mut p = bare();
                p["spec"]["securityContext"] = json!({"runAsUser": 1337});
                p
            },
            "pod securityContext runs as uid 1337",
        ),
        (
            {
                let mut p = bare();
                p["spec"]["initContainers"] =
                    json!([{"name": "i", "image": "i", "securityContext": {"runAsUser": 1337}}]);
                p
            },
            "container \"i\" runs as uid 1337",
        ),
    ];
    for (p, needle) in cases.into_iter().chain(more) {
        let err: PatchError = decide(&pod(p), &cfg).expect_err(needle);
        let msg = err.to_string();
        assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
        assert!(msg.starts_with("weft: "), "{msg}");
    }
}

#[test]
fn generate_name_pods_and_deprecated_service_account() {
    let p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "web-7d9f-", "namespace": "shop"},
        "spec": {"serviceAccount": "legacy-sa", "containers": [{"name": "app", "image": "web:1"}]}
    });
    let (_, doc) = inject("generate-name", &pod(p), &InjectConfig::default());
    assert_eq!(
        doc["spec"]["volumes"][0]["projected"]["sources"][1]["secret"]["name"],
        "weft-identity-legacy-sa"
    );
}

#[test]
fn job_like_pod_with_many_containers() {
    let p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "batch", "namespace": "jobs", "labels": {"job-name": "batch"}},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000},
            "containers": [
                {"name": "worker", "image": "w:1", "ports": [{"containerPort": 8080, "name": "metrics"}]},
                {"name": "helper", "image": "h:1"}
            ]
        }
    });
    let (_, doc) = inject("job-pod", &pod(p), &InjectConfig::default());
    assert_eq!(names(&doc, "containers"), ["worker", "helper"]);
    // The pod-level runAsNonRoot must not block weft-init.
    let init = container(&doc, "initContainers", "weft-init");
    assert_eq!(init["securityContext"]["runAsNonRoot"], false);
}

#[test]
fn the_proxy_knows_its_workload_and_prometheus_finds_its_metrics() {
    // A Deployment's pod at admission: no name yet, owned by its ReplicaSet.
    let deployment_pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": "cart-5d4f9c7b8-", "namespace": "shop",
            "labels": {"app": "cart", "pod-template-hash": "5d4f9c7b8"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": "cart-5d4f9c7b8", "uid": "u1", "controller": true}]
        },
        "spec": {"containers": [{"name": "app", "image": "cart:1"}]}
    });
    let (_, doc) = inject(
        "workload-deployment",
        &pod(deployment_pod),
        &InjectConfig::default(),
    );
    let proxy = container(&doc, "initContainers", "weft-proxy");
    assert_eq!(
        env(proxy, "WEFT_WORKLOAD_NAME").map(|e| &e["value"]),
        Some(&json!("cart"))
    );
    assert_eq!(
        env(proxy, "WEFT_WORKLOAD_KIND").map(|e| &e["value"]),
        Some(&json!("Deployment"))
    );
    let a = &doc["metadata"]["annotations"];
    assert_eq!(a["prometheus.io/scrape"], "true");
    assert_eq!(a["prometheus.io/port"], "15020");
    assert_eq!(a["prometheus.io/path"], "/metrics");

    // A bare pod is its own workload; an app scraping its own metrics keeps
    // its annotations.
    let mut own = bare();
    own["metadata"]["annotations"] =
        json!({"prometheus.io/scrape": "true", "prometheus.io/port": "9100"});
    let (_, doc) = inject("workload-bare", &pod(own), &InjectConfig::default());
    let proxy = container(&doc, "initContainers", "weft-proxy");
    assert_eq!(
        env(proxy, "WEFT_WORKLOAD_NAME").map(|e| &e["value"]),
        Some(&json!("web"))
    );
    assert_eq!(
        env(proxy, "WEFT_WORKLOAD_KIND").map(|e| &e["value"]),
        Some(&json!("Pod"))
    );
    let a = &doc["metadata"]["annotations"];
    assert_eq!(a["prometheus.io/port"], "9100");
    assert!(a.get("prometheus.io/path").is_none(), "{a}");
}
