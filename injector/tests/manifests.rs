//! `inject_manifests`: multi-document YAML in, injected YAML out.

mod common;

use serde_json::{Value, json};
use weft_injector::{InjectConfig, InjectManifestError, inject_manifests};

const INPUT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
      annotations:
        example.com/owner: team/a
    spec:
      containers:
      - name: web
        image: web:1
        ports: [{name: http, containerPort: 8080}]
        readinessProbe:
          httpGet: {path: /ready, port: http}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: shop}
spec:
  serviceName: db
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      initContainers:
      - {name: perms, image: busybox:1}
      containers:
      - name: db
        image: postgres:17
        livenessProbe: {tcpSocket: {port: 5432}}
      volumes:
      - {name: scratch, emptyDir: {}}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent, namespace: ops}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      containers: [{name: agent, image: agent:1}]
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: node-exporter, namespace: ops}
spec:
  selector: {matchLabels: {app: ne}}
  template:
    metadata: {labels: {app: ne}}
    spec:
      hostNetwork: true
      containers: [{name: ne, image: ne:1}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: migrate, namespace: shop}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: migrate, image: migrate:1}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: report, namespace: shop}
spec:
  schedule: "0 * * * *"
  jobTemplate:
    spec:
      template:
        metadata:
          annotations: {weft.dev/exclude-outbound-ports: "25"}
        spec:
          restartPolicy: OnFailure
          containers: [{name: report, image: report:1}]
---
apiVersion: v1
kind: Pod
metadata: {name: debug, namespace: shop}
spec:
  containers: [{name: sh, image: busybox:1, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: shop}
data:
  key/with/slashes: "value: not yaml"
"#;

fn docs(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .expect("output is YAML")
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// Records a pod template as a Pod for schema validation.
fn record_template(name: &str, template: &Value, pod_name: &str) {
    let mut metadata = template
        .get("metadata")
        .cloned()
        .unwrap_or_else(|| json!({}));
    metadata["name"] = json!(pod_name);
    common::record(
        name,
        &json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}),
    );
}

fn init_names(template: &Value) -> Vec<&str> {
    template["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect()
}

#[test]
fn every_workload_kind_is_injected_and_others_pass_through() {
    let cfg = InjectConfig::default();
    let out = inject_manifests(INPUT, &cfg).expect("inject");
    let before = docs(INPUT);
    let after = docs(&out);
    assert_eq!(
        before.len(),
        after.len(),
        "one document out per document in"
    );

    let template = |i: usize| -> &Value {
        let d = &after[i];
        if d["kind"] == "CronJob" {
            &d["spec"]["jobTemplate"]["spec"]["template"]
        } else if d["kind"] == "Pod" {
            d
        } else {
            &d["spec"]["template"]
        }
    };
    let injected = [
        (0, "manifest-deployment"),
        (1, "manifest-statefulset"),
        (2, "manifest-daemonset"),
        (4, "manifest-job"),
        (5, "manifest-cronjob"),
        (6, "manifest-pod"),
    ];
    for (i, name) in injected {
        let t = template(i);
        assert_eq!(
            t["metadata"]["labels"]["weft.dev/proxy"], "injected",
            "{name}"
        );
        assert_eq!(&init_names(t)[..2], ["weft-init", "weft-proxy"], "{name}");
        record_template(
            name,
            t,
            after[i]["metadata"]["name"].as_str().expect("name"),
        );
    }
    // Details survive and are patched as the webhook would.
    let web = template(0);
    assert_eq!(
        web["metadata"]["annotations"]["example.com/owner"],
        "team/a"
    );
    assert_eq!(
        web["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"],
        "/app-health/web/readyz"
    );
    assert_eq!(after[0]["spec"]["replicas"], 2);
    assert_eq!(
        init_names(template(1)),
        ["weft-init", "weft-proxy", "perms"]
    );
    let cron_init = &template(5)["spec"]["initContainers"][0];
    assert!(
        cron_init["args"]
            .as_array()
            .expect("args")
            .contains(&json!("25"))
    );

    // hostNetwork template, Service and ConfigMap are unchanged.
    for i in [3, 7, 8] {
        assert_eq!(
            after[i], before[i],
            "document {i} must pass through unchanged"
        );
    }
}

#[test]
fn injecting_twice_changes_nothing_more() {
    let cfg = InjectConfig::default();
    let once = inject_manifests(INPUT, &cfg).expect("first");
    let twice = inject_manifests(&once, &cfg).expect("second");
    assert_eq!(docs(&once), docs(&twice));
}

#[test]
fn list_items_are_injected() {
    let input = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: a}
  spec: {containers: [{name: a, image: a:1}]}
- apiVersion: v1
  kind: Secret
  metadata: {name: s}
"#;
    let out = docs(&inject_manifests(input, &InjectConfig::default()).expect("inject"));
    assert_eq!(
        out[0]["items"][0]["metadata"]["labels"]["weft.dev/proxy"],
        "injected"
    );
    assert!(out[0]["items"][1].get("spec").is_none());
}

#[test]
fn errors_name_the_document() {
    let input = "apiVersion: v1\nkind: Service\nmetadata: {name: ok}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: bad}\nspec:\n  template:\n    metadata:\n      annotations: {weft.dev/opaque-ports: mysql}\n    spec:\n      containers: [{name: a, image: a:1}]\n";
    let err = inject_manifests(input, &InjectConfig::default()).expect_err("bad annotation");
    let msg = err.to_string();
    assert!(
        matches!(err, InjectManifestError::Patch { index: 2, .. }),
        "{msg}"
    );
    assert!(
        msg.contains("Deployment") && msg.contains("\"bad\"") && msg.contains("mysql"),
        "{msg}"
    );

    let input = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: 7\n";
    let err = inject_manifests(input, &InjectConfig::default()).expect_err("not a pod");
    assert!(
        matches!(err, InjectManifestError::NotAPod { index: 1, .. }),
        "{err}"
    );
}

#[test]
fn hostile_yaml_is_an_error_not_a_hang() {
    // Billion laughs: aliases expanding exponentially.
    let mut bomb = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    let mut prev = 'a';
    for c in 'b'..='j' {
        bomb.push_str(&format!(
            "{c}: &{c} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
        ));
        prev = c;
    }
    assert!(inject_manifests(&bomb, &InjectConfig::default()).is_err());
    assert!(inject_manifests("kind: Pod\nspec: [unclosed", &InjectConfig::default()).is_err());
}
