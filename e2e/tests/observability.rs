//! `manifests/observability/` checked without a cluster: the scrape jobs
//! as the harness runs them pass `promtool check config`, and their
//! relabeling (run by promtool on discovery files written as Kubernetes
//! discovery would label the pods weft deploys) keeps exactly the targets
//! it should; every dashboard parses, every panel has a query, and every
//! query is valid PromQL (`promtool check rules`); the ConfigMap and the
//! PodMonitors pass `kubernetes-validate`, which has no schema for the
//! PodMonitor kind: the PodMonitors are decoded strictly into
//! prometheus-operator's own Go types instead (`e2e/podmonitor-check/`).

#[path = "common/dashboards.rs"]
mod dashboards;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use weft_e2e::prometheus::{self, PROMTOOL_BIN};

fn promtool(args: &[&str]) -> std::process::Output {
    assert!(
        Path::new(PROMTOOL_BIN).exists(),
        "{PROMTOOL_BIN} not found: apt-get install -y --no-install-recommends prometheus (scripts/setup does)"
    );
    Command::new(PROMTOOL_BIN)
        .args(args)
        .output()
        .expect("run promtool")
}

/// A pod as the API server holds it once the injector meshed it (native
/// sidecar) and the simulated kubelet runs it.
fn meshed_pod(ns: &str, name: &str, ip: &str, labels: Value, extra_annotations: &Value) -> Pod {
    let mut annotations = json!({
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "15020",
        "prometheus.io/path": "/metrics",
        "weft.dev/proxy-version": "0.1.0",
    });
    if let (Some(a), Some(extra)) = (annotations.as_object_mut(), extra_annotations.as_object()) {
        a.extend(extra.clone());
    }
    let mut labels = labels;
    labels["weft.dev/proxy"] = json!("injected");
    serde_json::from_value(json!({
        "metadata": {
            "name": name, "namespace": ns, "uid": format!("uid-{name}"),
            "labels": labels, "annotations": annotations,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": name.rsplit_once('-').map_or(name, |(rs, _)| rs), "uid": "rs", "controller": true}]
        },
        "spec": {
            "nodeName": "weft-node",
            "initContainers": [
                {"name": "weft-init", "image": "ghcr.io/weft-mesh/weft-proxy:0.1.0"},
                {"name": "weft-proxy", "image": "ghcr.io/weft-mesh/weft-proxy:0.1.0", "restartPolicy": "Always",
                 "ports": [{"name": "weft-admin", "containerPort": 15020, "protocol": "TCP"}]}
            ],
            "containers": [{"name": "app", "image": "weft-e2e-app",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]
        },
        "status": {"phase": "Running", "podIP": ip, "hostIP": "10.244.0.1",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "app", "containerID": "weft-e2e://app", "image": "weft-e2e-app",
                "imageID": "", "ready": true, "restartCount": 0}]}
    }))
    .expect("pod")
}

fn plain_pod(ns: &str, name: &str, ip: &str, labels: &Value, port: (&str, i32)) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"containers": [{"name": "main", "image": "x",
            "ports": [{"name": port.0, "containerPort": port.1, "protocol": "TCP"}]},
            {"name": "portless", "image": "x"}]},
        "status": {"phase": "Running", "podIP": ip}
    }))
    .expect("pod")
}

/// Pods of every kind the jobs must tell apart.
fn pods() -> Vec<Pod> {
    vec![
        meshed_pod(
            "demo",
            "backend-v1-5d8f7-abcde",
            "10.244.0.5",
            json!({"app": "backend", "version": "v1"}),
            &json!({}),
        ),
        meshed_pod(
            "shop",
            "cart-7c9-xyz12",
            "10.244.0.6",
            json!({"app.kubernetes.io/name": "cart", "app.kubernetes.io/version": "2.1"}),
            &json!({}),
        ),
        // The app's own scrape annotations, which the injector leaves alone:
        // its proxy is scraped all the same (by its port).
        meshed_pod(
            "demo",
            "exporter-6f5-qwert",
            "10.244.0.7",
            json!({"app": "exporter"}),
            &json!({"prometheus.io/port": "8080"}),
        ),
        // Annotated not to be scraped (for an annotation-driven job): the
        // proxies' job goes by the port.
        meshed_pod(
            "demo",
            "quiet-55f-asdfg",
            "10.244.0.8",
            json!({"app": "quiet"}),
            &json!({"prometheus.io/scrape": "false"}),
        ),
        // Not meshed, annotated for some other job.
        serde_json::from_value(json!({
            "metadata": {"name": "other", "namespace": "outside",
                "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "15020"}},
            "spec": {"containers": [{"name": "weft-proxy", "image": "x",
                "ports": [{"containerPort": 15020}]}]},
            "status": {"phase": "Running", "podIP": "10.244.0.9"}
        }))
        .expect("pod"),
        plain_pod(
            "weft-system",
            "weft-operator-7b-aaaaa",
            "10.244.0.10",
            &json!({"app.kubernetes.io/name": "weft-operator", "app.kubernetes.io/part-of": "weft"}),
            ("admin", 9090),
        ),
        plain_pod(
            "weft-system",
            "weft-injector-6c-bbbbb",
            "10.244.0.11",
            &json!({"app.kubernetes.io/name": "weft-injector", "app.kubernetes.io/part-of": "weft"}),
            ("https", 8443),
        ),
        // The same label in another namespace: outside the jobs' namespaces.
        plain_pod(
            "elsewhere",
            "weft-operator-copy",
            "10.244.0.12",
            &json!({"app.kubernetes.io/name": "weft-operator"}),
            ("admin", 9090),
        ),
        // No IP yet: no targets.
        serde_json::from_value(json!({
            "metadata": {"name": "pending", "namespace": "weft-system",
                "labels": {"app.kubernetes.io/name": "weft-operator"}},
            "spec": {"containers": [{"name": "operator", "image": "x",
                "ports": [{"name": "admin", "containerPort": 9090}]}]},
            "status": {"phase": "Pending"}
        }))
        .expect("pod"),
    ]
}

/// The harness config with discovery files for [`pods`], in `dir`.
fn write_harness_config(dir: &Path) -> (prometheus::HarnessConfig, std::path::PathBuf) {
    let scrape = prometheus::shipped_scrape_configs().expect("shipped scrape configs");
    std::fs::create_dir_all(dir.join("sd")).expect("sd dir");
    let hc = prometheus::harness_config(&scrape, dir, Duration::from_secs(1)).expect("rewrite");
    let pods = pods();
    for job in &hc.jobs {
        std::fs::write(
            &job.file,
            serde_json::to_vec_pretty(&prometheus::job_targets(job, &pods)).expect("json"),
        )
        .expect("sd file");
    }
    // Any CA will do for these checks; Prometheus loads the file.
    let ca = rcgen::generate_simple_self_signed(vec!["weft-test-ca".to_owned()]).expect("ca");
    std::fs::write(&hc.ca_file, ca.cert.pem()).expect("ca file");
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, serde_json::to_vec_pretty(&hc.config).expect("json")).expect("config");
    (hc, path)
}

#[test]
fn the_shipped_jobs_rewritten_for_the_harness_pass_promtool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (hc, path) = write_harness_config(dir.path());
    let jobs: Vec<&str> = hc.jobs.iter().map(|j| j.job.as_str()).collect();
    assert_eq!(jobs, ["weft-proxies", "weft-operator", "weft-injector"]);
    // Only discovery, intervals and the CA path changed.
    let shipped = prometheus::shipped_scrape_configs().expect("shipped");
    for (orig, run) in shipped
        .iter()
        .zip(hc.config["scrape_configs"].as_array().expect("list"))
    {
        assert_eq!(
            orig["relabel_configs"], run["relabel_configs"],
            "{}",
            orig["job_name"]
        );
        assert_eq!(orig["scheme"], run["scheme"]);
        assert_eq!(
            orig["tls_config"]["server_name"],
            run["tls_config"]["server_name"]
        );
        assert!(run.get("kubernetes_sd_configs").is_none());
        assert_eq!(run["scrape_interval"], "1000ms");
    }
    let out = promtool(&["check", "config", &path.to_string_lossy()]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check config: {text}");
    println!("promtool check config: {}", text.trim());
}

/// `promtool check service-discovery`: the targets `job` keeps, by address.
fn kept_targets(config: &Path, job: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let out = promtool(&[
        "check",
        "service-discovery",
        "--timeout=3s",
        &config.to_string_lossy(),
        job,
    ]);
    assert!(
        out.status.success(),
        "promtool check service-discovery {job}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Vec<Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{job}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    // A dropped target has empty labels.
    list.iter()
        .filter_map(|t| t["labels"].as_object())
        .filter(|labels| !labels.is_empty())
        .map(|labels| {
            let labels: BTreeMap<String, String> = labels
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect();
            (labels["__address__"].clone(), labels)
        })
        .collect()
}

#[test]
fn the_shipped_relabeling_keeps_one_target_per_proxy_operator_and_injector() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, path) = write_harness_config(dir.path());

    let proxies = kept_targets(&path, "weft-proxies");
    assert_eq!(
        proxies.keys().collect::<Vec<_>>(),
        [
            "10.244.0.5:15020",
            "10.244.0.6:15020",
            "10.244.0.7:15020",
            "10.244.0.8:15020"
        ],
        "{proxies:#?}"
    );
    let public = |l: &BTreeMap<String, String>| -> BTreeMap<String, String> {
        l.iter()
            .filter(|(k, _)| !k.starts_with("__"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let backend = &proxies["10.244.0.5:15020"];
    assert_eq!(backend["__metrics_path__"], "/metrics");
    assert_eq!(backend["__scheme__"], "http");
    assert_eq!(
        public(backend),
        BTreeMap::from(
            [
                ("app", "backend"),
                ("instance", "10.244.0.5:15020"),
                ("job", "weft-proxies"),
                ("namespace", "demo"),
                ("pod", "backend-v1-5d8f7-abcde"),
                ("version", "v1"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        )
    );
    let cart = public(&proxies["10.244.0.6:15020"]);
    assert_eq!(
        cart["app"], "cart",
        "app.kubernetes.io/name stands in for app"
    );
    assert_eq!(cart["version"], "2.1");

    let operator = kept_targets(&path, "weft-operator");
    assert_eq!(
        operator.keys().collect::<Vec<_>>(),
        ["10.244.0.10:9090"],
        "{operator:#?}"
    );
    assert_eq!(operator["10.244.0.10:9090"]["__scheme__"], "http");
    assert_eq!(
        operator["10.244.0.10:9090"]["pod"],
        "weft-operator-7b-aaaaa"
    );

    let injector = kept_targets(&path, "weft-injector");
    assert_eq!(
        injector.keys().collect::<Vec<_>>(),
        ["10.244.0.11:8443"],
        "{injector:#?}"
    );
    assert_eq!(injector["10.244.0.11:8443"]["__scheme__"], "https");
    println!(
        "weft-proxies keeps {:?}; weft-operator {:?}; weft-injector {:?}",
        proxies.keys().collect::<Vec<_>>(),
        operator.keys().collect::<Vec<_>>(),
        injector.keys().collect::<Vec<_>>()
    );
}

#[test]
fn discovery_files_carry_the_labels_kubernetes_discovery_gives_a_pod() {
    let pod = &pods()[0];
    let groups = prometheus::pod_targets(pod);
    // weft-init (no ports) and weft-proxy (one port) and app (one port).
    let addrs: Vec<&str> = groups
        .iter()
        .map(|g| g["targets"][0].as_str().unwrap_or(""))
        .collect();
    assert_eq!(addrs, ["10.244.0.5:8080", "10.244.0.5", "10.244.0.5:15020"]);
    let proxy = &groups[2]["labels"];
    for (k, v) in [
        ("__meta_kubernetes_namespace", "demo"),
        ("__meta_kubernetes_pod_name", "backend-v1-5d8f7-abcde"),
        ("__meta_kubernetes_pod_ip", "10.244.0.5"),
        ("__meta_kubernetes_pod_ready", "true"),
        ("__meta_kubernetes_pod_phase", "Running"),
        ("__meta_kubernetes_pod_node_name", "weft-node"),
        ("__meta_kubernetes_pod_host_ip", "10.244.0.1"),
        ("__meta_kubernetes_pod_uid", "uid-backend-v1-5d8f7-abcde"),
        ("__meta_kubernetes_pod_controller_kind", "ReplicaSet"),
        ("__meta_kubernetes_pod_controller_name", "backend-v1-5d8f7"),
        ("__meta_kubernetes_pod_label_weft_dev_proxy", "injected"),
        ("__meta_kubernetes_pod_labelpresent_weft_dev_proxy", "true"),
        (
            "__meta_kubernetes_pod_annotation_prometheus_io_port",
            "15020",
        ),
        (
            "__meta_kubernetes_pod_annotationpresent_prometheus_io_scrape",
            "true",
        ),
        ("__meta_kubernetes_pod_container_name", "weft-proxy"),
        ("__meta_kubernetes_pod_container_init", "true"),
        ("__meta_kubernetes_pod_container_port_name", "weft-admin"),
        ("__meta_kubernetes_pod_container_port_number", "15020"),
        ("__meta_kubernetes_pod_container_port_protocol", "TCP"),
        ("__meta_kubernetes_pod_container_id", ""),
    ] {
        assert_eq!(proxy[k], v, "{k} in {proxy:#}");
    }
    assert_eq!(
        groups[0]["labels"]["__meta_kubernetes_pod_container_id"],
        "weft-e2e://app"
    );
    assert_eq!(
        groups[0]["labels"]["__meta_kubernetes_pod_container_init"],
        "false"
    );
    assert!(
        groups[1]["labels"]
            .get("__meta_kubernetes_pod_container_port_name")
            .is_none()
    );
    assert_eq!(
        prometheus::sanitize_label_name("app.kubernetes.io/name"),
        "app_kubernetes_io_name"
    );
}

/// Metric names the dashboards may use: what weft exports (see
/// `operator/src/metrics.rs`, `operator/src/config.rs`,
/// `injector/src/metrics.rs`, the proxy's metrics module, and the metrics
/// table in `manifests/observability/README.md`).
const KNOWN_METRICS: &[&str] = &[
    // proxies: golden metrics
    "weft_requests_total",
    "weft_request_duration_seconds_bucket",
    "weft_request_bytes_bucket",
    "weft_response_bytes_bucket",
    "weft_tcp_connections_opened_total",
    "weft_tcp_connections_closed_total",
    "weft_tcp_sent_bytes_total",
    "weft_tcp_received_bytes_total",
    // proxies: their own state
    "weft_proxy_route_events_total",
    "weft_proxy_errors_total",
    "weft_proxy_requests_total",
    "weft_proxy_reloads_total",
    "weft_proxy_config_rejected_total",
    "weft_proxy_config_generation",
    "weft_proxy_config_info",
    "weft_proxy_cert_expiry_timestamp_seconds",
    // operator
    "weft_certificates_issued_total",
    "weft_certificate_renewal_failures_total",
    "weft_certificate_earliest_expiry_seconds",
    "weft_identities",
    "weft_identity_restored_total",
    "weft_ca_regenerated_total",
    "weft_config_writes_total",
    "weft_config_renders_total",
    "weft_config_unchanged_total",
    "weft_config_too_large_total",
    "weft_config_deletes_total",
    "weft_config_restored_total",
    // injector
    "weft_injector_admissions_total",
    "weft_injector_admission_duration_seconds_bucket",
    "weft_injector_cert_reloads_total",
    "weft_injector_mesh_updates_total",
];

#[test]
fn every_dashboard_parses_and_every_query_is_valid_promql() {
    let files = dashboards::files();
    let names: Vec<String> = files
        .iter()
        .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    assert_eq!(
        names,
        [
            "control-plane.json",
            "mesh-overview.json",
            "service.json",
            "workload.json"
        ]
    );
    for f in &files {
        let d: Value = serde_json::from_str(&std::fs::read_to_string(f).expect("read"))
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let name = f.display();
        assert!(
            d["schemaVersion"].as_u64().is_some_and(|v| v >= 39),
            "{name}: schemaVersion"
        );
        assert!(
            d["uid"].as_str().is_some_and(|u| u.starts_with("weft-")),
            "{name}: uid"
        );
        let vars = d["templating"]["list"].as_array().expect("templating.list");
        assert!(
            vars.iter().any(|v| v["name"] == "datasource"
                && v["type"] == "datasource"
                && v["query"] == "prometheus"),
            "{name}: a Prometheus datasource variable"
        );
        let mut ids = BTreeSet::new();
        for p in d["panels"].as_array().expect("panels") {
            assert!(
                ids.insert(p["id"].as_u64().expect("panel id")),
                "{name}: duplicate panel id"
            );
            if p["type"] == "row" {
                continue;
            }
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{name}: {}",
                p["title"]
            );
            for t in p["targets"].as_array().into_iter().flatten() {
                assert_eq!(
                    t["datasource"]["uid"], "${datasource}",
                    "{name}: {}",
                    p["title"]
                );
            }
        }
    }

    // Every query (substituted as Grafana would) as a recording rule:
    // `promtool check rules` parses each one as PromQL.
    let all = dashboards::all();
    let name_re = |s: &str| -> Vec<String> {
        let mut v = Vec::new();
        let b = s.as_bytes();
        let mut i = 0;
        while let Some(off) = s[i..].find("weft_") {
            let start = i + off;
            let prev = start.checked_sub(1).map(|p| b[p]);
            let mut end = start;
            while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
                end += 1;
            }
            if !prev.is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'"') {
                v.push(s[start..end].to_owned());
            }
            i = end;
        }
        v
    };
    let mut rules = Vec::new();
    for (i, (e, s)) in all.iter().enumerate() {
        assert!(
            !s.contains('$'),
            "{} / {}: unsubstituted variable: {s}",
            e.dashboard,
            e.panel
        );
        for m in name_re(s) {
            assert!(
                KNOWN_METRICS.contains(&m.as_str()),
                "{} / {}: {m} is not a metric weft exports",
                e.dashboard,
                e.panel
            );
        }
        rules.push(json!({ "record": format!("weft_dashboard:check:{i}"), "expr": s }));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rules.yml");
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&json!({ "groups": [{ "name": "dashboards", "rules": rules }] }))
            .expect("json"),
    )
    .expect("rules");
    let out = promtool(&["check", "rules", &path.to_string_lossy()]);
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "{} dashboards, {} queries: promtool check rules: {}",
        files.len(),
        all.len(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
}

#[test]
fn the_configmap_and_the_podmonitors_pass_kubernetes_validate() {
    let dir = weft_e2e::prometheus::observability_dir();
    let tmp = tempfile::tempdir().expect("tempdir");
    let built = tmp.path().join("observability.yaml");
    let out = Command::new("kubectl")
        .args(["kustomize", &dir.to_string_lossy()])
        .output()
        .expect("kubectl kustomize");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&built, &out.stdout).expect("write");
    let kinds: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("kind: ").map(str::to_owned))
        .collect();
    assert_eq!(kinds, ["PodMonitor", "PodMonitor", "PodMonitor"]);
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "-k", "1.33.0"])
        .arg(dir.join("prometheus-scrape.yaml"))
        .arg(&built)
        .output()
        .expect("kubernetes-validate (scripts/setup installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubernetes-validate: {text}");
    assert!(
        text.contains("passed for resource configmap/weft-prometheus-scrape"),
        "{text}"
    );
    // The only warnings: no schema for the PodMonitor kind.
    for l in text.lines().filter(|l| l.starts_with("WARN")) {
        assert!(
            l.contains("Couldn't find schema for kind PodMonitor"),
            "unexpected warning: {l}"
        );
    }
    println!("{}", text.trim());
}

/// `e2e/podmonitor-check/build.sh` builds it (scripts/setup runs that).
fn podmonitor_check() -> std::path::PathBuf {
    let bin = weft_e2e::mesh::repo_root().join("target/podmonitor-check/weft-podmonitor-check");
    assert!(
        bin.exists(),
        "{} not found: run e2e/podmonitor-check/build.sh (needs Go and the Go module proxy; scripts/setup does)",
        bin.display()
    );
    bin
}

#[test]
fn the_podmonitors_decode_strictly_into_prometheus_operator_types() {
    let dir = weft_e2e::prometheus::observability_dir();
    let out = Command::new("kubectl")
        .args(["kustomize", &dir.to_string_lossy()])
        .output()
        .expect("kubectl kustomize");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let built = String::from_utf8_lossy(&out.stdout).into_owned();
    let tmp = tempfile::tempdir().expect("tempdir");
    let good = tmp.path().join("podmonitors.yaml");
    std::fs::write(&good, &built).expect("write");
    let out = Command::new(podmonitor_check())
        .arg(&good)
        .output()
        .expect("run weft-podmonitor-check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("3 PodMonitors ok"), "{text}");
    // The check is strict: a field the type lacks, or a scheme it does
    // not know, fails it.
    for (from, to) in [
        ("serverName:", "server_name:"),
        ("scheme: https", "scheme: ftp"),
    ] {
        assert!(built.contains(from), "{from} in the PodMonitors");
        let bad = tmp.path().join("bad.yaml");
        std::fs::write(&bad, built.replace(from, to)).expect("write");
        let out = Command::new(podmonitor_check())
            .arg(&bad)
            .output()
            .expect("run weft-podmonitor-check");
        assert!(!out.status.success(), "{from} → {to} passed");
    }
    println!("{}", text.trim());
}
