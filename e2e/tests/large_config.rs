//! A namespace whose config crosses the operator's gzip threshold, both
//! ways. Above it the `weft-proxy` ConfigMap holds only `binaryData`
//! `proxy.json.gz`; below it only `data` `proxy.json`. At each step a new
//! pod starts (kubelet's volume of the injected sidecar must accept the
//! layout), gets traffic from the frontend, and every proxy runs the
//! config the ConfigMap announces (kubelet's refresh of the running pods'
//! volume must accept it too).
//!
//! The config grows with selector-less Services applied with kubectl in
//! the demo's namespace, and shrinks again when they are deleted.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::serial;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use weft_e2e::Cluster;
use weft_e2e::mesh::{self, Tally};

/// The label of the Services that make the config large.
const BULK_LABEL: &str = "e2e.weft.dev/bulk";
/// Ports per bulk Service. Such a Service takes over 1 000 bytes of
/// `proxy.json` (about 1 220 with these names).
const PORTS: usize = 16;

/// The operator's threshold: above it `proxy.json` is written gzipped.
fn gzip_threshold() -> usize {
    weft_operator::config::ConfigOptions::default().gzip_threshold
}

/// Enough bulk Services to put the namespace's `proxy.json` a quarter over
/// the threshold.
fn bulk_count() -> usize {
    gzip_threshold().div_ceil(1_000) * 5 / 4
}

/// `count` selector-less Services of `PORTS` HTTP ports each, as one
/// multi-document YAML.
fn bulk_services(count: usize) -> String {
    let mut out = String::new();
    for i in 0..count {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: bulk-{i:04}\n  namespace: demo\n  labels: {{{BULK_LABEL}: \"true\"}}\nspec:\n  ports:\n"
        ));
        for p in 0..PORTS {
            out.push_str(&format!(
                "  - {{name: http-{p:02}, port: {port}, targetPort: {port}, appProtocol: http}}\n",
                port = 8000 + p
            ));
        }
    }
    out
}

/// How the `weft-proxy` ConfigMap of `demo` holds its config.
#[derive(Debug, PartialEq)]
enum Layout {
    /// `data` `proxy.json` only (besides `proxy.json.sig`).
    Plain,
    /// `binaryData` `proxy.json.gz` only (and `data` `proxy.json.sig`);
    /// the size of the JSON inside.
    Gzip(usize),
    /// Anything else (missing, both keys, neither).
    Other(String),
}

async fn layout(cluster: &Cluster) -> anyhow::Result<Layout> {
    let api: Api<ConfigMap> = Api::namespaced(cluster.client(), "demo");
    let Some(cm) = api.get_opt("weft-proxy").await? else {
        return Ok(Layout::Other("no ConfigMap".into()));
    };
    let mut data: Vec<String> = cm.data.iter().flatten().map(|(k, _)| k.clone()).collect();
    // Every layout carries the operator's signature next to the document.
    let signed = data.iter().any(|k| k == "proxy.json.sig");
    data.retain(|k| k != "proxy.json.sig");
    let binary = cm.binary_data.unwrap_or_default();
    if !signed {
        return Ok(Layout::Other(format!("unsigned: data keys {data:?}")));
    }
    let layout = match (data.as_slice(), binary.get("proxy.json.gz")) {
        ([k], None) if k == "proxy.json" && binary.is_empty() => Layout::Plain,
        ([], Some(gz)) if binary.len() == 1 => {
            Layout::Gzip(weft_proxy_config::gunzip(&gz.0)?.len())
        }
        _ => Layout::Other(format!(
            "data keys {data:?}, binaryData keys {:?}",
            binary.keys().collect::<Vec<_>>()
        )),
    };
    Ok(layout)
}

/// Waits until the ConfigMap's layout satisfies `want`; returns it.
async fn wait_layout(
    cluster: &Cluster,
    what: &str,
    want: impl Fn(&Layout) -> bool,
) -> anyhow::Result<Layout> {
    let start = Instant::now();
    loop {
        let now = layout(cluster).await?;
        if want(&now) {
            return Ok(now);
        }
        if start.elapsed() > Duration::from_secs(120) {
            anyhow::bail!("timed out waiting for a {what} weft-proxy ConfigMap; last: {now:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The files of `pod`'s weft volume that carry its config (harness only).
fn mounted_config_files(cluster: &Cluster, pod: &str) -> anyhow::Result<Vec<String>> {
    let dir = cluster.pod_volume_dir("demo", pod, "weft")?;
    Ok(["proxy.json", "proxy.json.gz"]
        .into_iter()
        .filter(|f| dir.join(f).exists())
        .map(str::to_owned)
        .collect())
}

struct Step<'a> {
    cluster: &'a Cluster,
    frontend: &'a str,
    backend: SocketAddr,
}

impl Step<'_> {
    /// Scales `backend-v1` (where the demo's route sends `/`) to `replicas`
    /// and returns the new pod, once it is Ready.
    async fn scale_backend(&self, replicas: u32) -> anyhow::Result<String> {
        let old: Vec<String> = mesh::pods(self.cluster, "demo", "backend")
            .await?
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        self.cluster
            .kubectl(&[
                "scale",
                "-n",
                "demo",
                "deployment/backend-v1",
                &format!("--replicas={replicas}"),
            ])
            .await?;
        self.cluster
            .wait_deployment_ready("demo", "backend-v1", Duration::from_secs(120))
            .await?;
        mesh::pods(self.cluster, "demo", "backend")
            .await?
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .find(|n| n.starts_with("backend-v1") && !old.contains(n))
            .ok_or_else(|| anyhow::anyhow!("no new backend-v1 pod"))
    }

    /// Sends batches from the frontend until `pod` answers one; then one
    /// more batch, which must have no failure.
    async fn routes_to(&self, pod: &str) -> anyhow::Result<Tally> {
        let start = Instant::now();
        loop {
            let t = mesh::send_from_pod(
                self.cluster,
                "demo",
                self.frontend,
                self.backend,
                "/",
                &[],
                20,
            )
            .await?;
            if t.by_pod.contains_key(pod) {
                break;
            }
            if start.elapsed() > Duration::from_secs(90) {
                anyhow::bail!("{pod} got no request from the frontend; last batch: {t:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let after = mesh::send_from_pod(
            self.cluster,
            "demo",
            self.frontend,
            self.backend,
            "/",
            &[],
            40,
        )
        .await?;
        assert!(after.failures.is_empty(), "{after:?}");
        Ok(after)
    }

    /// Every listed pod's proxy runs the config the ConfigMap announces
    /// (its hash), and that config has `bulk` bulk Services: the operator
    /// saw every Service created or deleted (it may write while kubectl is
    /// still at work).
    async fn in_sync(&self, pods: &[&str], bulk: usize) -> anyhow::Result<()> {
        for pod in pods {
            let start = Instant::now();
            loop {
                mesh::wait_for_proxy_sync(self.cluster, "demo", pod, Duration::from_secs(120))
                    .await?;
                let cfg = mesh::proxy_config(self.cluster, "demo", pod).await?;
                let have = cfg["services"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|s| {
                        s["namespace"] == "demo"
                            && s["name"].as_str().is_some_and(|n| n.starts_with("bulk-"))
                    })
                    .count();
                if have == bulk {
                    break;
                }
                if start.elapsed() > Duration::from_secs(120) {
                    anyhow::bail!("{pod}'s config has {have} bulk Services, not {bulk}");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_crossing_the_gzip_threshold_both_ways_keeps_pods_starting_and_routing()
-> anyhow::Result<()> {
    let _serial = serial().await;
    let threshold = gzip_threshold();
    let count = bulk_count();
    let cluster = Cluster::for_scenario().await?;
    mesh::install(&cluster).await?;
    mesh::deploy_demo(&cluster).await?;
    let frontend = mesh::pods(&cluster, "demo", "frontend")
        .await?
        .into_iter()
        .find_map(|p| p.metadata.name)
        .ok_or_else(|| anyhow::anyhow!("no frontend pod"))?;
    let ip: IpAddr = mesh::cluster_ip(&cluster, "demo", "backend")
        .await?
        .parse()?;
    let backend = SocketAddr::new(ip, 8080);
    mesh::wait_for_route(
        &cluster,
        "demo",
        &frontend,
        &format!("http://{backend}/"),
        Duration::from_secs(90),
    )
    .await?;
    let step = Step {
        cluster: &cluster,
        frontend: &frontend,
        backend,
    };
    step.in_sync(&[&frontend], 0).await?;
    assert_eq!(layout(&cluster).await?, Layout::Plain, "the demo's config");

    // Plain → gzip.
    let grown = Instant::now();
    cluster
        .kubectl_stdin(
            &["apply", "--server-side", "-f", "-"],
            Some(&bulk_services(count)),
        )
        .await?;
    let applied = grown.elapsed();
    wait_layout(&cluster, "gzip", |l| matches!(l, Layout::Gzip(_))).await?;
    // The running frontend's volume refresh took the gzip layout.
    step.in_sync(&[&frontend], count).await?;
    let switched = grown.elapsed();
    let size = match layout(&cluster).await? {
        Layout::Gzip(size) => size,
        other => anyhow::bail!("with {count} bulk Services: {other:?}"),
    };
    assert!(
        size > threshold,
        "{size} bytes of proxy.json, threshold {threshold}"
    );
    if !cluster.is_external() {
        assert_eq!(
            mounted_config_files(&cluster, &frontend)?,
            ["proxy.json.gz"]
        );
    }
    // A pod started in gzip mode gets its volume, its config and traffic.
    let gz_pod = step.scale_backend(3).await?;
    step.in_sync(&[&frontend, &gz_pod], count).await?;
    if !cluster.is_external() {
        assert_eq!(mounted_config_files(&cluster, &gz_pod)?, ["proxy.json.gz"]);
    }
    let gz_tally = step.routes_to(&gz_pod).await?;

    // Gzip → plain.
    let shrunk = Instant::now();
    cluster
        .kubectl(&[
            "delete",
            "service",
            "-n",
            "demo",
            "-l",
            &format!("{BULK_LABEL}=true"),
            "--wait=false",
        ])
        .await?;
    let deleted = shrunk.elapsed();
    wait_layout(&cluster, "plain", |l| *l == Layout::Plain).await?;
    // Both the pod started before the first switch and the one started in
    // gzip mode take the plain layout.
    step.in_sync(&[&frontend, &gz_pod], 0).await?;
    let switched_back = shrunk.elapsed();
    if !cluster.is_external() {
        for pod in [&frontend, &gz_pod] {
            assert_eq!(
                mounted_config_files(&cluster, pod)?,
                ["proxy.json"],
                "{pod}"
            );
        }
    }
    let plain_pod = step.scale_backend(4).await?;
    step.in_sync(&[&frontend, &gz_pod, &plain_pod], 0).await?;
    step.routes_to(&plain_pod).await?;
    let plain_tally = step.routes_to(&gz_pod).await?;

    println!(
        "{count} Services of {PORTS} ports: proxy.json {size} bytes (threshold {threshold}); \
         kubectl apply {:.1}s, then gzip reached the frontend {:.1}s later; \
         kubectl delete {:.1}s, then plain reached both pods {:.1}s later; \
         gzip-mode pod {gz_pod}: {:?}; plain-mode pod {plain_pod}: {:?}",
        applied.as_secs_f64(),
        (switched - applied).as_secs_f64(),
        deleted.as_secs_f64(),
        (switched_back - deleted).as_secs_f64(),
        gz_tally.by_pod,
        plain_tally.by_pod,
    );
    cluster.shutdown();
    Ok(())
}
