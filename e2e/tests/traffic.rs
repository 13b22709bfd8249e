//! Traffic management end to end: `ServiceRoute` changes applied with
//! kubectl reach the proxies through the operator's ConfigMap, kubelet's
//! volume swap and the proxy's reload, and the split follows; a scale-up is
//! picked up; a deleted pod stops getting traffic without failed requests,
//! also before the ConfigMap catches up.
//!
//! Requests start in the demo's frontend pod (its network namespace, so
//! they go through its sidecar) and go to the backend Service's ClusterIP;
//! the backend echo apps answer with their pod name.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::serial;
use weft_e2e::mesh::{self, Load, Tally};
use weft_e2e::{Cluster, ClusterConfig};

/// The demo installed and the frontend's proxy routing to the backend.
struct Demo {
    cluster: Cluster,
    frontend: String,
    backend: SocketAddr,
}

async fn demo(config: ClusterConfig) -> anyhow::Result<Demo> {
    let cluster = Cluster::for_scenario_with(config).await?;
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
    let url = format!("http://{backend}/");
    mesh::wait_for_route(&cluster, "demo", &frontend, &url, Duration::from_secs(90)).await?;
    // Reaching the backend is not enough: the examples' route and every
    // backend endpoint must be in the config the frontend's proxy runs.
    mesh::wait_for_proxy_sync(&cluster, "demo", &frontend, Duration::from_secs(90)).await?;
    Ok(Demo {
        cluster,
        frontend,
        backend,
    })
}

impl Demo {
    async fn send(&self, path: &str, headers: &[(&str, &str)], n: usize) -> anyhow::Result<Tally> {
        Ok(mesh::send_from_pod(
            &self.cluster,
            "demo",
            &self.frontend,
            self.backend,
            path,
            headers,
            n,
        )
        .await?)
    }

    /// Polls batches of `n` requests until `done` holds for one; returns
    /// how long that took.
    async fn until(
        &self,
        what: &str,
        n: usize,
        done: impl Fn(&Tally) -> bool,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let mut last = Tally::default();
        while start.elapsed() < Duration::from_secs(90) {
            last = self.send("/", &[], n).await?;
            if done(&last) {
                return Ok(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        anyhow::bail!("timed out waiting for {what}; last batch: {last:?}")
    }

    /// The frontend's mounted `proxy.json` (what kubelet delivered); on a
    /// cluster reached by kubeconfig, what the proxy loaded from it (its
    /// admin `/config`).
    async fn mounted_config(&self) -> anyhow::Result<serde_json::Value> {
        if self.cluster.is_external() {
            return Ok(mesh::proxy_config(&self.cluster, "demo", &self.frontend).await?);
        }
        let dir = self
            .cluster
            .pod_volume_dir("demo", &self.frontend, "weft")?;
        let text = std::fs::read_to_string(dir.join("proxy.json"))?;
        Ok(serde_json::from_str(&text)?)
    }
}

fn only(tally: &Tally, version: &str, n: usize) -> bool {
    tally.failures.is_empty() && tally.by_version() == BTreeMap::from([(version.to_owned(), n)])
}

/// The `backend` Service of a mounted config.
fn backend_service(cfg: &serde_json::Value) -> Option<&serde_json::Value> {
    cfg["services"]
        .as_array()?
        .iter()
        .find(|s| s["namespace"] == "demo" && s["name"] == "backend")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_weight_change_reaches_the_proxies_and_the_split_follows() -> anyhow::Result<()> {
    let _serial = serial().await;
    let d = demo(ClusterConfig::default()).await?;

    // manifests/examples/backend-route.yaml: a canary header goes to v2,
    // everything else that is not /api to v1.
    let before = d.send("/", &[], 60).await?;
    assert!(only(&before, "v1", 60), "before: {before:?}");
    let canary = d.send("/", &[("x-weft-release", "canary")], 20).await?;
    assert!(only(&canary, "v2", 20), "canary header: {canary:?}");
    let api = d.send("/api/items", &[], 100).await?;
    assert!(api.failures.is_empty(), "{api:?}");
    println!(
        "before: / {:?}; canary header {:?}; /api (90/10) {:?}",
        before.by_version(),
        canary.by_version(),
        api.by_version()
    );

    // The weight change, applied with kubectl like a user would.
    let generation = d.mounted_config().await?["generation"]
        .as_u64()
        .unwrap_or(0);
    mesh::apply_yaml(&d.cluster, &mesh::backend_split_route(0, 100)).await?;
    let took = d
        .until("every request on v2 after 0/100", 20, |t| only(t, "v2", 20))
        .await?;
    // It came through kubelet's volume: the mounted file has the new route.
    let cfg = d.mounted_config().await?;
    assert!(
        cfg["generation"].as_u64().unwrap_or(0) > generation,
        "mounted generation did not move: {}",
        cfg["generation"]
    );
    let routes = &backend_service(&cfg).expect("backend in mounted config")["httpRoutes"];
    assert_eq!(routes.as_array().map(Vec::len), Some(1), "{routes}");
    assert_eq!(routes[0]["name"], "backend/split", "{routes}");
    let after = d.send("/", &[], 60).await?;
    assert!(only(&after, "v2", 60), "after 0/100: {after:?}");
    println!(
        "0/100 applied: live after {:.1}s; / {:?}",
        took.as_secs_f64(),
        after.by_version()
    );

    mesh::apply_yaml(&d.cluster, &mesh::backend_split_route(50, 50)).await?;
    let took = d
        .until("both versions after 50/50", 20, |t| {
            t.failures.is_empty() && t.by_version().len() == 2
        })
        .await?;
    let split = d.send("/", &[], 100).await?;
    assert!(split.failures.is_empty(), "{split:?}");
    let v = split.by_version();
    // 100 fair coin flips: both sides seen (a miss has odds 2^-99).
    assert!(
        v.get("v1").is_some_and(|n| *n > 0) && v.get("v2").is_some_and(|n| *n > 0),
        "50/50: {split:?}"
    );
    println!(
        "50/50 applied: live after {:.1}s; / {:?}",
        took.as_secs_f64(),
        v
    );
    d.cluster.shutdown();
    Ok(())
}

/// Injected faults and per-route policies travel like routes: a
/// ServiceRoute applied with kubectl makes the frontend's proxy abort the
/// requests it matches (without the backend seeing them) and serve the rest;
/// with access logs turned on in the Mesh, both proxies log each request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_applied_with_kubectl_aborts_the_requests_it_matches() -> anyhow::Result<()> {
    let _serial = serial().await;
    let d = demo(ClusterConfig::default()).await?;
    // Access logs on, as a user turns them on.
    mesh::patch_mesh_spec(
        &d.cluster,
        r#"{"telemetry":{"accessLog":{"enabled":true}}}"#,
    )
    .await?;
    mesh::apply_yaml(
        &d.cluster,
        "apiVersion: weft.dev/v1alpha1
kind: ServiceRoute
metadata:
  name: backend
  namespace: demo
spec:
  service: backend
  http:
  - name: chaos
    matches:
    - headers:
      - name: x-chaos
        exact: abort
    fault:
      abort:
        httpStatus: 418
        percent: 100
    backends:
    - subset: v1
  - name: default
    timeout: 5s
    retries:
      attempts: 2
      retryOn: [\"5xx\"]
    backends:
    - subset: v1
",
    )
    .await?;
    mesh::wait_for_proxy_sync(&d.cluster, "demo", &d.frontend, Duration::from_secs(90)).await?;
    // The backends' proxies log too: they must run the config that says so
    // (kubelet refreshes each pod's volume on its own schedule).
    let backends: Vec<String> = mesh::pods(&d.cluster, "demo", "backend")
        .await?
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    for b in &backends {
        mesh::wait_for_proxy_sync(&d.cluster, "demo", b, Duration::from_secs(90)).await?;
    }
    let chaos = d.send("/", &[("x-chaos", "abort")], 10).await?;
    assert_eq!(chaos.ok(), 0, "{chaos:?}");
    assert_eq!(chaos.failures.len(), 10, "{chaos:?}");
    assert!(
        chaos
            .failures
            .iter()
            .all(|f| f.contains("HTTP 418") && f.contains("fault")),
        "{chaos:?}"
    );
    let calm = d.send("/", &[], 10).await?;
    assert!(only(&calm, "v1", 10), "{calm:?}");
    println!(
        "x-chaos: abort → {:?}; others → {:?}",
        chaos.failures.first(),
        calm.by_version()
    );

    // The access logs: every request on the frontend's proxy, the aborted
    // ones with their rule and step; each served one also on exactly one
    // backend proxy, under the same request id.
    let lines = |pod: &str| -> anyhow::Result<Vec<serde_json::Value>> {
        Ok(d.cluster
            .pod_log("demo", pod, "weft-proxy")?
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("reporter").is_some())
            .collect())
    };
    let start = Instant::now();
    let (front, served) = loop {
        let front: Vec<serde_json::Value> = lines(&d.frontend)?
            .into_iter()
            .filter(|v| v["reporter"] == "source")
            .collect();
        let mut served = Vec::new();
        for b in &backends {
            served.extend(
                lines(b)?
                    .into_iter()
                    .filter(|v| v["reporter"] == "destination"),
            );
        }
        let aborted = front.iter().filter(|v| v["status"] == 418).count();
        let ok: Vec<&serde_json::Value> = front.iter().filter(|v| v["status"] == 200).collect();
        // A line is written when its queue drains: wait until the backends'
        // lines of the served requests are there too.
        let twinned = ok
            .iter()
            .all(|o| served.iter().any(|s| s["request_id"] == o["request_id"]));
        if (aborted >= 10 && ok.len() >= 10 && twinned) || start.elapsed() > Duration::from_secs(30)
        {
            break (front, served);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let aborted: Vec<&serde_json::Value> = front.iter().filter(|v| v["status"] == 418).collect();
    assert_eq!(aborted.len(), 10, "{front:?}");
    for a in &aborted {
        assert_eq!(a["route"], "backend/chaos", "{a}");
        assert_eq!(a["failed_step"], "fault", "{a}");
        let id = &a["request_id"];
        assert!(
            served.iter().all(|s| &s["request_id"] != id),
            "an aborted request reached a backend: {a}"
        );
    }
    let ok: Vec<&serde_json::Value> = front
        .iter()
        .filter(|v| v["status"] == 200 && v["route"] == "backend/default")
        .collect();
    assert!(ok.len() >= 10, "{front:?}");
    for o in &ok {
        let twins = served
            .iter()
            .filter(|s| s["request_id"] == o["request_id"])
            .count();
        assert_eq!(twins, 1, "one backend line per served request: {o}");
    }
    println!(
        "access logs: {} frontend lines ({} aborted by the fault, none on a backend), {} backend lines, every served request id on exactly one backend",
        front.len(),
        aborted.len(),
        served.len()
    );
    d.cluster.shutdown();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_up_is_picked_up() -> anyhow::Result<()> {
    let _serial = serial().await;
    let d = demo(ClusterConfig::default()).await?;
    mesh::apply_yaml(&d.cluster, &mesh::backend_split_route(0, 100)).await?;
    d.until("every request on v2", 20, |t| only(t, "v2", 20))
        .await?;
    let old: Vec<String> = mesh::pods(&d.cluster, "demo", "backend")
        .await?
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();

    let scaled = Instant::now();
    d.cluster
        .kubectl(&[
            "scale",
            "-n",
            "demo",
            "deployment/backend-v2",
            "--replicas=2",
        ])
        .await?;
    d.cluster
        .wait_deployment_ready("demo", "backend-v2", Duration::from_secs(90))
        .await?;
    let new_pod = mesh::pods(&d.cluster, "demo", "backend")
        .await?
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .find(|n| n.starts_with("backend-v2") && !old.contains(n))
        .ok_or_else(|| anyhow::anyhow!("no new backend-v2 pod"))?;
    let ready = scaled.elapsed();
    let took = d
        .until("the new pod gets traffic", 20, |t| {
            t.by_pod.contains_key(&new_pod)
        })
        .await?;
    let after = d.send("/", &[], 60).await?;
    assert!(after.failures.is_empty(), "{after:?}");
    assert_eq!(
        after.by_version().keys().collect::<Vec<_>>(),
        ["v2"],
        "{after:?}"
    );
    assert_eq!(after.by_pod.len(), 2, "both v2 pods serve: {after:?}");
    println!(
        "scale-up: new pod {new_pod} ready after {:.1}s, first traffic {:.1}s later; then {:?}",
        ready.as_secs_f64(),
        took.as_secs_f64(),
        after.by_pod
    );
    d.cluster.shutdown();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_pod_stops_getting_traffic_without_failed_requests() -> anyhow::Result<()> {
    let _serial = serial().await;
    // A slow volume refresh, so the proxies learn of the deletion late.
    let d = demo(ClusterConfig {
        volume_sync_period: Duration::from_secs(10),
        ..ClusterConfig::default()
    })
    .await?;
    // "/" goes to v1 (manifests/examples), which has two pods.
    let warm = d
        .until("both v1 pods serve", 20, |t| {
            t.failures.is_empty() && t.by_pod.len() == 2
        })
        .await?;
    let v1 = mesh::pods(&d.cluster, "demo", "backend").await?;
    let victim = v1
        .iter()
        .find(|p| {
            p.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("backend-v1"))
        })
        .ok_or_else(|| anyhow::anyhow!("no backend-v1 pod"))?;
    let victim_name = victim.metadata.name.clone().expect("name");
    let victim_ip = victim
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("victim pod IP");

    let load = Load::start(
        &d.cluster,
        "demo",
        &d.frontend,
        d.backend,
        "/",
        Duration::from_millis(10),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deleted_at = load.elapsed();
    d.cluster
        .kubectl(&["delete", "pod", "-n", "demo", &victim_name, "--wait=false"])
        .await?;
    // Until kubelet delivers a config where the pod takes no new requests.
    // The pod is recognised by name: its address may already belong to
    // another pod.
    let live_in_config = |cfg: &serde_json::Value| {
        backend_service(cfg)
            .and_then(|s| s["endpoints"].as_array())
            .is_some_and(|eps| {
                eps.iter()
                    .any(|e| e["pod"] == victim_name.as_str() && e["terminating"] != true)
            })
    };
    assert!(
        live_in_config(&d.mounted_config().await?),
        "the frontend's config does not name {victim_name} as an endpoint"
    );
    let mut caught_up = None;
    let mut gone = None;
    let wait_start = Instant::now();
    while wait_start.elapsed() < Duration::from_secs(90) && (caught_up.is_none() || gone.is_none())
    {
        if caught_up.is_none() && !live_in_config(&d.mounted_config().await?) {
            caught_up = Some(load.elapsed());
        }
        if gone.is_none() {
            let pods = mesh::pods(&d.cluster, "demo", "backend").await?;
            if !pods
                .iter()
                .any(|p| p.metadata.name.as_deref() == Some(victim_name.as_str()))
            {
                gone = Some(load.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let caught_up = caught_up
        .ok_or_else(|| anyhow::anyhow!("the frontend's config never dropped pod {victim_name}"))?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let samples = load.stop().await?;

    let all = Tally::of(&samples);
    let during = Tally::of(
        samples
            .iter()
            .filter(|s| s.at >= deleted_at && s.at < caught_up),
    );
    let after = Tally::of(samples.iter().filter(|s| s.at >= caught_up));
    let last_by_victim = samples
        .iter()
        .filter(|s| s.outcome.as_deref() == Ok(victim_name.as_str()))
        .map(|s| s.at)
        .max();
    println!(
        "deletion of {victim_name} ({victim_ip}): {} requests, {} failed; warm-up {:.1}s; \
         config caught up {:.1}s after the delete, pod gone from the API after {}; \
         last request served by it {} after the delete",
        samples.len(),
        all.failures.len(),
        warm.as_secs_f64(),
        (caught_up - deleted_at).as_secs_f64(),
        gone.map_or("(not yet)".into(), |g| format!(
            "{:.1}s",
            (g - deleted_at).as_secs_f64()
        )),
        last_by_victim.map_or("(none)".into(), |t| format!(
            "{:+.2}s",
            t.as_secs_f64() - deleted_at.as_secs_f64()
        )),
    );
    println!("  between the delete and the config: {:?}", during.by_pod);
    println!("  after the config caught up:        {:?}", after.by_pod);
    // What the frontend's proxy did about it (its log lines).
    let log = d.cluster.pod_log("demo", &d.frontend, "weft-proxy")?;
    for what in [
        "endpoint attempt failed; trying another",
        "could not reach its app; trying another endpoint",
        "connection lost before a response",
        "every endpoint attempt failed",
    ] {
        println!(
            "  frontend proxy log: {:>3} × {what}",
            log.matches(what).count()
        );
    }
    for line in log
        .lines()
        .filter(|l| l.contains("endpoint attempt failed"))
        .take(3)
    {
        println!("  {line}");
    }
    assert!(
        all.failures.is_empty(),
        "failed requests: {:?}",
        all.failures
    );
    assert!(
        during.ok() > 0,
        "no request was sent before the config caught up"
    );
    assert!(
        !after.by_pod.contains_key(&victim_name),
        "the deleted pod got requests after the config caught up: {after:?}"
    );
    d.cluster.shutdown();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_pod_address_with_another_identity_gets_no_request_meant_for_the_old_pod()
-> anyhow::Result<()> {
    let _serial = serial().await;
    let d = demo(ClusterConfig::default()).await?;
    if d.cluster.is_external() {
        println!("skipped: forcing a pod address needs the harness's kubelet");
        return Ok(());
    }
    d.until("both v1 pods serve", 20, |t| {
        t.failures.is_empty() && t.by_pod.len() == 2
    })
    .await?;
    let victim = mesh::pods(&d.cluster, "demo", "backend")
        .await?
        .into_iter()
        .find_map(|p| p.metadata.name.filter(|n| n.starts_with("backend-v1")))
        .ok_or_else(|| anyhow::anyhow!("no backend-v1 pod"))?;
    let victim_ip = d.cluster.pod_ip("demo", &victim)?;
    let names_victim = |cfg: &serde_json::Value| {
        backend_service(cfg)
            .and_then(|s| s["endpoints"].as_array())
            .is_some_and(|eps| {
                eps.iter().any(|e| {
                    e["pod"] == victim.as_str() && e["address"] == victim_ip.to_string().as_str()
                })
            })
    };
    // The frontend's kubelet is slow: its config keeps the victim.
    d.cluster.hold_volume_refresh("demo", &d.frontend, true)?;
    d.cluster
        .kubectl(&["delete", "pod", "-n", "demo", &victim, "--timeout=90s"])
        .await?;
    // A pod of another service account gets the victim's address.
    mesh::apply_yaml(
        &d.cluster,
        &format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: intruder, namespace: demo}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata:\n  name: intruder\n  namespace: demo\n  labels: {{app: intruder}}\n  \
             annotations: {{{}: \"{victim_ip}\"}}\nspec:\n  serviceAccountName: intruder\n  containers:\n  \
             - name: app\n    image: weft-e2e-app\n    args: [\"echo\", \"--port\", \"8080\"]\n    \
             ports: [{{name: http, containerPort: 8080}}]\n",
            weft_e2e::kubelet::ipam::POD_IP_ANNOTATION
        ),
    )
    .await?;
    d.cluster
        .wait_pod_ready("demo", "intruder", Duration::from_secs(90))
        .await?;
    assert_eq!(d.cluster.pod_ip("demo", "intruder")?, victim_ip);
    assert!(
        names_victim(&d.mounted_config().await?),
        "the frontend's config should still list {victim} at {victim_ip}"
    );

    // Through the Service: the remaining v1 pod answers everything; the
    // intruder, which the config takes for the victim, gets nothing.
    let stale = d.send("/", &[], 20).await?;
    println!("config stale, through the Service: {stale:?}");
    assert!(stale.failures.is_empty(), "{stale:?}");
    assert!(!stale.by_pod.contains_key("intruder"), "{stale:?}");
    // Addressed to the pod IP itself: refused, with the reason.
    let direct = mesh::get_from_pod(
        &d.cluster,
        "demo",
        &d.frontend,
        &format!("http://{victim_ip}:8080/"),
        &[],
    )
    .await?;
    println!("config stale, to {victim_ip} directly: {direct:?}");
    match &direct {
        mesh::Reply::Failed(why) => assert!(
            why.contains("HTTP 502")
                && why.contains("x-weft-error: identity-mismatch")
                && why.contains("sa/intruder"),
            "{why}"
        ),
        mesh::Reply::Ok(body) => panic!("the intruder was reached as {victim}: {body}"),
    }
    let log = d.cluster.pod_log("demo", &d.frontend, "weft-proxy")?;
    let refusal = log
        .lines()
        .find(|l| l.contains("identity mismatch") && l.contains(victim.as_str()))
        .ok_or_else(|| anyhow::anyhow!("no identity-mismatch line naming {victim} in:\n{log}"))?;
    println!("frontend proxy log: {refusal}");
    assert!(refusal.contains("sa/intruder"), "{refusal}");

    // Once the config catches up, traffic flows to the backend's pods.
    d.cluster.hold_volume_refresh("demo", &d.frontend, false)?;
    let took =
        mesh::wait_for_proxy_sync(&d.cluster, "demo", &d.frontend, Duration::from_secs(90)).await?;
    assert!(!names_victim(&d.mounted_config().await?));
    let after = d
        .until("the caught-up config routes to every v1 pod", 20, |t| {
            t.failures.is_empty() && t.by_pod.len() == 2
        })
        .await?;
    let fresh = d.send("/", &[], 20).await?;
    println!(
        "config caught up {:.1}s after the hold was lifted; all v1 pods served {:.1}s later: {fresh:?}",
        took.as_secs_f64(),
        after.as_secs_f64()
    );
    assert!(fresh.failures.is_empty(), "{fresh:?}");
    assert!(!fresh.by_pod.contains_key("intruder"), "{fresh:?}");
    d.cluster.shutdown();
    Ok(())
}

/// The hash the operator announces on the namespace's `weft-proxy` ConfigMap.
async fn announced_hash(d: &Demo) -> anyhow::Result<Option<String>> {
    let cms: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(d.cluster.client(), "demo");
    Ok(cms.get_opt("weft-proxy").await?.and_then(|cm| {
        cm.metadata
            .annotations
            .and_then(|a| a.get("weft.dev/config-hash").cloned())
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_applied_under_load_binds_every_open_connection_once_the_proxies_run_it()
-> anyhow::Result<()> {
    let _serial = serial().await;
    let d = demo(ClusterConfig::default()).await?;
    let backends: Vec<String> = mesh::pods(&d.cluster, "demo", "backend")
        .await?
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    let before = announced_hash(&d).await?;
    // Each request is a new app connection; the frontend's proxy carries
    // them over the connections it keeps open to the backends' proxies.
    let load = Load::start(
        &d.cluster,
        "demo",
        &d.frontend,
        d.backend,
        "/api/admin",
        Duration::from_millis(20),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let applied_at = load.elapsed();
    mesh::apply_yaml(
        &d.cluster,
        "apiVersion: weft.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: deny-admin, namespace: demo}\n\
         spec:\n  targetService: backend\n  action: Deny\n  rules:\n  - to:\n    - paths: [\"/api/admin\"]\n",
    )
    .await?;
    // From when every backend proxy reports the new hash.
    let start = Instant::now();
    let enforced_at = loop {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(90),
            "the backend proxies never all ran the new config"
        );
        let now = announced_hash(&d).await?;
        if now.is_some() && now != before {
            let mut all = true;
            for pod in &backends {
                let cfg = mesh::proxy_config(&d.cluster, "demo", pod).await?;
                all &= cfg["hash"].as_str() == now.as_deref();
            }
            if all {
                break load.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    let samples = load.stop().await?;
    let before_apply = Tally::of(samples.iter().filter(|s| s.at < applied_at));
    let meanwhile = Tally::of(
        samples
            .iter()
            .filter(|s| s.at >= applied_at && s.at < enforced_at),
    );
    let after: Vec<_> = samples.iter().filter(|s| s.at >= enforced_at).collect();
    let served_after: Vec<_> = after.iter().filter(|s| s.outcome.is_ok()).collect();
    println!(
        "{} requests to /api/admin: before the apply {} served, {} failed; \
         between the apply and all backend proxies running it ({:.1}s) {} served, {} refused; \
         after that {} sent, {} served",
        samples.len(),
        before_apply.ok(),
        before_apply.failures.len(),
        (enforced_at - applied_at).as_secs_f64(),
        meanwhile.ok(),
        meanwhile.failures.len(),
        after.len(),
        served_after.len(),
    );
    assert!(
        before_apply.ok() > 0 && before_apply.failures.is_empty(),
        "{before_apply:?}"
    );
    assert!(
        after.len() > 50,
        "too few requests after the reload: {}",
        after.len()
    );
    assert!(
        served_after.is_empty(),
        "served after the proxies ran the Deny: {served_after:?}"
    );
    for s in &after {
        let why = s.outcome.as_ref().expect_err("refused");
        assert!(
            why.contains("HTTP 403") && why.contains("x-weft-error: denied"),
            "{why}"
        );
    }
    d.cluster.shutdown();
    Ok(())
}

/// Applies `yaml` and waits until each of `pods` runs the namespace's new
/// config.
async fn apply_and_sync(d: &Demo, yaml: &str, pods: &[String]) -> anyhow::Result<()> {
    mesh::apply_yaml(&d.cluster, yaml).await?;
    for pod in pods {
        mesh::wait_for_proxy_sync(&d.cluster, "demo", pod, Duration::from_secs(90)).await?;
    }
    Ok(())
}

/// `weft_proxy_authz_audit_total{policy}` summed over `pods`' proxies.
async fn audit_count(d: &Demo, pods: &[String], policy: &str) -> anyhow::Result<u64> {
    let app = d.cluster.pod_program("weft-e2e-app")?;
    let series = format!("weft_proxy_authz_audit_total{{policy=\"{policy}\"}} ");
    let mut total = 0;
    for pod in pods {
        let out = d
            .cluster
            .exec_in_pod(
                "demo",
                pod,
                &[&app, "get", "http://127.0.0.1:15020/metrics"],
            )
            .await?;
        let text = String::from_utf8_lossy(&out.stdout);
        total += text
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .map_or(Ok(0), |v| v.trim().parse::<u64>())?;
    }
    Ok(total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_mode_policy_refuses_nothing_and_counts_what_it_would_refuse() -> anyhow::Result<()>
{
    let _serial = serial().await;
    let d = demo(ClusterConfig::default()).await?;
    let backends: Vec<String> = mesh::pods(&d.cluster, "demo", "backend")
        .await?
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    let no_root = |mode: &str| {
        format!(
            "apiVersion: weft.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: audit-no-root, namespace: demo}}\n\
             spec:\n  targetService: backend\n  action: Deny\n  mode: {mode}\n  rules:\n  - to:\n    - paths: [\"/\"]\n"
        )
    };
    apply_and_sync(&d, &no_root("Audit"), &backends).await?;
    let root = d.send("/", &[], 10).await?;
    let api = d.send("/api/items", &[], 10).await?;
    println!("with an Audit Deny on \"/\": / {root:?}; /api/items {api:?}");
    assert!(root.failures.is_empty() && root.ok() == 10, "{root:?}");
    assert!(api.failures.is_empty() && api.ok() == 10, "{api:?}");
    let counted = audit_count(&d, &backends, "audit-no-root").await?;
    println!(
        "weft_proxy_authz_audit_total{{policy=\"audit-no-root\"}} over the backends: {counted}"
    );
    assert_eq!(counted, 10, "exactly the requests to / are counted");
    let logged: usize = backends
        .iter()
        .map(|p| d.cluster.pod_log("demo", p, "weft-proxy"))
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .map(|log| {
            log.lines()
                .filter(|l| l.contains("Audit-mode") && l.contains("audit-no-root"))
                .count()
        })
        .sum();
    assert_eq!(logged, 10, "one log line per audited request");

    // Enforced, the same policy refuses them.
    apply_and_sync(&d, &no_root("Enforce"), &backends).await?;
    let enforced = d.send("/", &[], 10).await?;
    println!("enforced: {enforced:?}");
    assert_eq!(enforced.failures.len(), 10, "{enforced:?}");
    assert!(
        enforced
            .failures
            .iter()
            .all(|f| f.contains("HTTP 403") && f.contains("audit-no-root")),
        "{enforced:?}"
    );
    d.cluster.shutdown();
    Ok(())
}

/// The `Accepted` condition of a weft resource: (status, reason).
async fn accepted(
    d: &Demo,
    kind: &str,
    name: &str,
) -> Result<(String, String), weft_e2e::cluster::HarnessError> {
    let out = d
        .cluster
        .kubectl_output(
            &[
                "get",
                kind,
                "-n",
                "demo",
                name,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Accepted\")].status} {.status.conditions[?(@.type==\"Accepted\")].reason}",
            ],
            None,
        )
        .await?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let (s, r) = text.split_once(' ').unwrap_or((text.as_str(), ""));
    Ok((s.to_owned(), r.to_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mtls_policy_opens_one_port_of_one_workload_to_plaintext() -> anyhow::Result<()> {
    let _serial = serial().await;
    let d = demo(ClusterConfig::default()).await?;
    // Authorization and the example's MtlsPolicy out of the way: what is
    // left to decide is this test's mode.
    d.cluster
        .kubectl(&["delete", "accesspolicy,mtlspolicy", "-n", "demo", "--all"])
        .await?;
    let client = mesh::pods(&d.cluster, "outside", "client")
        .await?
        .into_iter()
        .find_map(|p| p.metadata.name)
        .ok_or_else(|| anyhow::anyhow!("no outside client"))?;
    let backends = mesh::pods(&d.cluster, "demo", "backend").await?;
    let ip_of = |version: &str| {
        backends
            .iter()
            .find(|p| {
                p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("version"))
                    .is_some_and(|v| v == version)
            })
            .and_then(|p| p.status.as_ref()?.pod_ip.clone())
            .ok_or_else(|| anyhow::anyhow!("no backend {version} pod IP"))
    };
    let (v1, v2) = (ip_of("v1")?, ip_of("v2")?);
    let plain = |ip: String| {
        let cluster = &d.cluster;
        let client = client.clone();
        async move {
            mesh::get_from_pod(
                cluster,
                "outside",
                &client,
                &format!("http://{ip}:8080/"),
                &[],
            )
            .await
        }
    };
    let served = |r: &mesh::Reply| matches!(r, mesh::Reply::Ok(body) if body["identity"].is_null());
    for ip in [&v1, &v2] {
        let r = plain(ip.clone()).await?;
        assert!(!served(&r), "Strict served plaintext to {ip}: {r:?}");
    }

    mesh::apply_yaml(
        &d.cluster,
        "apiVersion: weft.dev/v1alpha1\nkind: MtlsPolicy\nmetadata: {name: v1-http-plaintext, namespace: demo}\n\
         spec:\n  selector: {matchLabels: {app: backend, version: v1}}\n  ports:\n  - {port: 8080, mode: Permissive}\n",
    )
    .await?;
    d.cluster
        .wait_until(
            Duration::from_secs(60),
            "plaintext served by v1",
            || async { Ok(served(&plain(v1.clone()).await?)) },
        )
        .await?;
    let r = plain(v2.clone()).await?;
    assert!(!served(&r), "the v2 pod is not selected: {r:?}");
    assert_eq!(
        accepted(&d, "mtlspolicy", "v1-http-plaintext").await?.0,
        "True"
    );
    // Meshed callers still come over mTLS with their identity.
    let from_frontend = mesh::get_from_pod(
        &d.cluster,
        "demo",
        &d.frontend,
        &format!("http://{v1}:8080/"),
        &[],
    )
    .await?;
    match &from_frontend {
        mesh::Reply::Ok(body) => assert_eq!(
            body["identity"], "spiffe://cluster.local/ns/demo/sa/frontend",
            "{body}"
        ),
        mesh::Reply::Failed(why) => panic!("frontend → v1: {why}"),
    }

    // A younger policy selecting the same pods conflicts and is not applied.
    mesh::apply_yaml(
        &d.cluster,
        "apiVersion: weft.dev/v1alpha1\nkind: MtlsPolicy\nmetadata: {name: all-backends-permissive, namespace: demo}\n\
         spec:\n  selector: {matchLabels: {app: backend}}\n  mode: Permissive\n",
    )
    .await?;
    d.cluster
        .wait_until(Duration::from_secs(60), "the conflict reported", || async {
            Ok(accepted(&d, "mtlspolicy", "all-backends-permissive").await?
                == ("False".to_owned(), "Conflicted".to_owned()))
        })
        .await?;
    for pod in backends.iter().filter_map(|p| p.metadata.name.as_deref()) {
        mesh::wait_for_proxy_sync(&d.cluster, "demo", pod, Duration::from_secs(90)).await?;
    }
    let r = plain(v2.clone()).await?;
    assert!(!served(&r), "the conflicting policy must not apply: {r:?}");

    // Without the policies, v1's port is Strict again (deleting only the
    // older one would hand v1 to the younger, no longer conflicting).
    d.cluster
        .kubectl(&["delete", "mtlspolicy", "-n", "demo", "--all"])
        .await?;
    d.cluster
        .wait_until(Duration::from_secs(60), "v1 Strict again", || async {
            Ok(!served(&plain(v1.clone()).await?))
        })
        .await?;
    d.cluster.shutdown();
    Ok(())
}

/// The `weft-proxy` ConfigMap of `demo` as JSON.
async fn config_map(d: &Demo) -> anyhow::Result<serde_json::Value> {
    let out = d
        .cluster
        .kubectl(&["get", "configmap", "-n", "demo", "weft-proxy", "-o", "json"])
        .await?;
    Ok(serde_json::from_str(&out)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_edited_proxy_config_is_restored_by_the_operator() -> anyhow::Result<()> {
    let _serial = serial().await;
    let d = demo(ClusterConfig::default()).await?;
    if d.cluster.is_external() {
        println!("skipped: reads the operator's metrics from its pod's network namespace");
        return Ok(());
    }
    let original = config_map(&d).await?;
    let text = original["data"]["proxy.json"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("the demo's config is not plain proxy.json"))?
        .to_owned();
    let load = Load::start(
        &d.cluster,
        "demo",
        &d.frontend,
        d.backend,
        "/",
        Duration::from_millis(20),
    )
    .await?;

    // 1. Bytes that are not a config at all.
    let mut edits = vec![("invalid edit", load.elapsed())];
    d.cluster
        .kubectl(&[
            "patch",
            "configmap",
            "-n",
            "demo",
            "weft-proxy",
            "--type",
            "merge",
            "-p",
            r#"{"data":{"proxy.json":"{not json"}}"#,
        ])
        .await?;
    let start = Instant::now();
    while config_map(&d).await?["data"]["proxy.json"].as_str() != Some(text.as_str()) {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(30),
            "the invalid edit was not undone"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "invalid edit undone after {:.1}s",
        start.elapsed().as_secs_f64()
    );

    // 2. A valid document that sends every request to v2, with its own
    //    hash in the document and in the annotation.
    let mut doc: weft_proxy_config::ProxyConfig = serde_json::from_str(&text)?;
    for svc in doc.services.iter_mut().filter(|s| s.name == "backend") {
        for r in &mut std::sync::Arc::make_mut(svc).http_routes {
            for b in &mut r.backends {
                b.subset = Some("v2".into());
            }
        }
    }
    doc.seal();
    let forged = String::from_utf8(doc.to_json())?;
    let patch = serde_json::json!({
        "metadata": {"annotations": {"weft.dev/config-hash": doc.hash}},
        "data": {"proxy.json": forged},
    });
    edits.push(("forged config", load.elapsed()));
    d.cluster
        .kubectl(&[
            "patch",
            "configmap",
            "-n",
            "demo",
            "weft-proxy",
            "--type",
            "merge",
            "-p",
            &patch.to_string(),
        ])
        .await?;
    let start = Instant::now();
    loop {
        // Rendered again from the cluster's resources: a new generation of
        // the original routes, not the forged document.
        let cm = config_map(&d).await?;
        let now = cm["data"]["proxy.json"].as_str().unwrap_or_default();
        if now != forged
            && let Ok(doc) = serde_json::from_str::<weft_proxy_config::ProxyConfig>(now)
            && cm["metadata"]["annotations"]["weft.dev/config-hash"] == doc.hash.as_str()
            && doc
                .services
                .iter()
                .filter(|s| s.name == "backend")
                .all(|s| {
                    s.http_routes
                        .iter()
                        .flat_map(|r| &r.backends)
                        .any(|b| b.subset.as_deref() == Some("v1"))
                })
        {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(30),
            "the forged config was not undone"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "forged config undone after {:.1}s",
        start.elapsed().as_secs_f64()
    );
    mesh::wait_for_proxy_sync(&d.cluster, "demo", &d.frontend, Duration::from_secs(90)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let samples = load.stop().await?;
    let all = Tally::of(&samples);
    println!("under load meanwhile: {all:?}");
    // When, next to the edits, each failure was sent.
    let when: Vec<String> = samples
        .iter()
        .filter(|s| s.outcome.is_err())
        .map(|s| format!("{:?} at {:?}", s.outcome, s.at))
        .collect();
    assert!(all.failures.is_empty(), "{when:?}; edits at {edits:?}");
    let after = d.send("/", &[], 20).await?;
    assert_eq!(
        after.by_version(),
        BTreeMap::from([("v1".to_owned(), 20)]),
        "{after:?}"
    );

    // Told, and counted.
    assert!(
        events_of(&d, "ConfigRestored").await? >= 1,
        "no ConfigRestored event"
    );
    // Two replicas: the leader wrote; sum over both.
    let restored_total = operator_counter(&d, "weft_config_restored_total").await?;
    assert!(
        restored_total >= 2,
        "weft_config_restored_total {restored_total}"
    );

    // An identity Secret edited by hand (a key that is not the
    // certificate's) is written again, told and counted.
    let identity = "weft-identity-frontend".to_owned();
    let key_before = secret_key(&d, &identity).await?;
    let junk = serde_json::json!({"data": {"tls.key": "anVuaw=="}});
    d.cluster
        .kubectl(&[
            "patch",
            "secret",
            "-n",
            "demo",
            &identity,
            "--type",
            "merge",
            "-p",
            &junk.to_string(),
        ])
        .await?;
    let start = Instant::now();
    loop {
        let now = secret_key(&d, &identity).await?;
        if now != "anVuaw==" && !now.is_empty() {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(30),
            "the identity Secret was not restored"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "identity Secret edit undone after {:.1}s (new key issued: {})",
        start.elapsed().as_secs_f64(),
        secret_key(&d, &identity).await? != key_before
    );
    assert!(
        events_of(&d, "IdentityRestored").await? >= 1,
        "no IdentityRestored event"
    );
    let identity_restored = operator_counter(&d, "weft_identity_restored_total").await?;
    assert!(
        identity_restored >= 1,
        "weft_identity_restored_total {identity_restored}"
    );

    // 3. With the operator down nothing undoes an edit, and kubelet
    //    delivers it: the proxies refuse it themselves, since the operator
    //    did not sign it.
    let signed = config_map(&d).await?;
    let running = mesh::proxy_config(&d.cluster, "demo", &d.frontend).await?["hash"].clone();
    scale_operator(&d, 0).await?;
    let mut doc: weft_proxy_config::ProxyConfig =
        serde_json::from_str(signed["data"]["proxy.json"].as_str().unwrap_or_default())?;
    for svc in doc.services.iter_mut().filter(|s| s.name == "backend") {
        for r in &mut std::sync::Arc::make_mut(svc).http_routes {
            for b in &mut r.backends {
                b.subset = Some("v2".into());
            }
        }
    }
    doc.seal();
    let rejected = |reason: &str| {
        let series = format!("weft_proxy_config_rejected_total{{reason=\"{reason}\"}} ");
        let d = &d;
        async move { proxy_counter(d, "demo", &d.frontend, &series).await }
    };
    // Each edit: a valid document sending everything to v2, first next to
    // the real document's signature (kept by a merge patch), then alone.
    for (what, data, reason) in [
        (
            "the forged document under the original signature",
            serde_json::json!({"proxy.json": String::from_utf8(doc.to_json())?}),
            "other-document",
        ),
        (
            "the forged document without a signature",
            serde_json::json!({"proxy.json": String::from_utf8(doc.to_json())?, "proxy.json.sig": null}),
            "unsigned",
        ),
    ] {
        let before = rejected(reason).await?;
        let patch = serde_json::json!({
            "metadata": {"annotations": {"weft.dev/config-hash": doc.hash}},
            "data": data,
        });
        d.cluster
            .kubectl(&[
                "patch",
                "configmap",
                "-n",
                "demo",
                "weft-proxy",
                "--type",
                "merge",
                "-p",
                &patch.to_string(),
            ])
            .await?;
        let start = Instant::now();
        while rejected(reason).await? == before {
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(120),
                "{what}: the frontend's proxy never refused it (delivered? {})",
                d.mounted_config().await?["hash"] == doc.hash.as_str()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let mounted = d.mounted_config().await?;
        assert_eq!(
            mounted["hash"],
            doc.hash.as_str(),
            "{what}: delivered to the pod"
        );
        let now = mesh::proxy_config(&d.cluster, "demo", &d.frontend).await?;
        assert_eq!(
            now["hash"], running,
            "{what}: the proxy keeps the signed config"
        );
        let tally = d.send("/", &[], 20).await?;
        assert_eq!(
            tally.by_version(),
            BTreeMap::from([("v1".to_owned(), 20)]),
            "{what}: {tally:?}"
        );
        println!(
            "{what}: delivered and refused ({reason}) {:.1}s after the edit; 20 of 20 requests still to v1",
            start.elapsed().as_secs_f64()
        );
    }
    // Back up, the operator writes (and signs) the namespace's config again.
    scale_operator(&d, 2).await?;
    mesh::wait_for_proxy_sync(&d.cluster, "demo", &d.frontend, Duration::from_secs(120)).await?;
    let cm = config_map(&d).await?;
    assert!(
        cm["data"]["proxy.json.sig"].is_string(),
        "signed again: {cm}"
    );
    d.cluster.shutdown();
    Ok(())
}

/// Scales the operator's Deployment and waits until that many of its pods
/// exist.
async fn scale_operator(d: &Demo, replicas: usize) -> anyhow::Result<()> {
    d.cluster
        .kubectl(&[
            "-n",
            "weft-system",
            "scale",
            "deployment/weft-operator",
            &format!("--replicas={replicas}"),
        ])
        .await?;
    d.cluster
        .wait_until(
            Duration::from_secs(90),
            &format!("{replicas} operator pods"),
            || async {
                let running = d
                    .cluster
                    .kubectl(&[
                        "get",
                        "pods",
                        "-n",
                        "weft-system",
                        "-l",
                        "app.kubernetes.io/name=weft-operator",
                        "-o",
                        "jsonpath={range .items[*]}{.status.phase}{\"\\n\"}{end}",
                    ])
                    .await?;
                let running: Vec<&str> = running.lines().filter(|l| !l.is_empty()).collect();
                Ok(running.len() == replicas && running.iter().all(|p| *p == "Running"))
            },
        )
        .await?;
    Ok(())
}

/// How many Events of `reason` namespace `demo` holds.
async fn events_of(d: &Demo, reason: &str) -> anyhow::Result<usize> {
    let selector = format!("reason={reason}");
    let names = d
        .cluster
        .kubectl(&[
            "get",
            "events",
            "-n",
            "demo",
            "--field-selector",
            &selector,
            "-o",
            "name",
        ])
        .await?;
    Ok(names.lines().count())
}

/// A counter of the operator, summed over its replicas (the leader
/// counts; a replica that led before may too).
async fn operator_counter(d: &Demo, name: &str) -> anyhow::Result<u64> {
    let operators = d
        .cluster
        .kubectl(&[
            "get",
            "pods",
            "-n",
            "weft-system",
            "-l",
            "app.kubernetes.io/name=weft-operator",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])
        .await?;
    let app = d.cluster.pod_program("weft-e2e-app")?;
    let series = format!("{name} ");
    let mut total = 0;
    for operator in operators.split_whitespace() {
        let metrics = d
            .cluster
            .exec_in_pod(
                "weft-system",
                operator,
                &[&app, "get", "http://127.0.0.1:9090/metrics"],
            )
            .await?;
        total += String::from_utf8_lossy(&metrics.stdout)
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

/// `tls.key` of Secret `demo/name`, base64 as stored.
async fn secret_key(d: &Demo, name: &str) -> anyhow::Result<String> {
    Ok(d.cluster
        .kubectl(&[
            "get",
            "secret",
            "-n",
            "demo",
            name,
            "-o",
            "jsonpath={.data.tls\\.key}",
        ])
        .await?)
}

/// The value of one counter series (`name{labels} `) of `ns/pod`'s proxy.
async fn proxy_counter(d: &Demo, ns: &str, pod: &str, series: &str) -> anyhow::Result<u64> {
    let app = d.cluster.pod_program("weft-e2e-app")?;
    let out = d
        .cluster
        .exec_in_pod(ns, pod, &[&app, "get", "http://127.0.0.1:15020/metrics"])
        .await?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .map_or(Ok(0), |v| v.trim().parse::<u64>())?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_spellings_of_a_denied_path_are_refused() -> anyhow::Result<()> {
    let _serial = serial().await;
    let d = demo(ClusterConfig::default()).await?;
    let backends: Vec<String> = mesh::pods(&d.cluster, "demo", "backend")
        .await?
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    apply_and_sync(
        &d,
        "apiVersion: weft.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: no-admin, namespace: demo}\n\
         spec:\n  targetService: backend\n  action: Deny\n  rules:\n  - to:\n    - paths: [\"/api/admin\", \"/api/admin/*\"]\n",
        &backends,
    )
    .await?;
    let mut refused = BTreeMap::new();
    for path in [
        "/api/admin",
        "/api//admin",
        "/api/./admin",
        "/api/x/../admin",
        "/api/%61dmin",
        "/api/admin;x",
        "/api/admin/%2e%2e/admin/users",
        "/api/admin%2F",
        "/api%2Fadmin",
    ] {
        let t = d.send(path, &[], 1).await?;
        println!("{path}: {t:?}");
        assert_eq!(t.ok(), 0, "{path} was served: {t:?}");
        let why = t.failures.first().cloned().unwrap_or_default();
        let step = if why.contains("HTTP 403") && why.contains("x-weft-error: denied") {
            "denied"
        } else if why.contains("HTTP 400") && why.contains("x-weft-error: ambiguous-path") {
            "ambiguous-path"
        } else {
            panic!("{path}: refused for another reason: {why}")
        };
        *refused.entry(step).or_insert(0) += 1;
    }
    assert_eq!(
        refused,
        BTreeMap::from([("ambiguous-path", 2), ("denied", 7)])
    );
    // Paths the rule does not name are served, in their normal form.
    let served = d.send("/api/./items", &[], 5).await?;
    assert_eq!(served.ok(), 5, "{served:?}");
    d.cluster.shutdown();
    Ok(())
}
