//! `config::run` against the e2e harness's real API server and simulated
//! node: kubectl-applied resources change the ConfigMap, scaling a
//! Deployment changes endpoints, a burst of 100 EndpointSlice updates gives
//! few writes, an invalid resource gets `Accepted=False` while the rest
//! keeps working, a rendered one `Rendered=True` naming the config
//! generation that carries it (never `Ready`: weft cannot see proxies), and
//! neither renders of other changes nor a restarted operator write again.
//!
//! Needs root and the control plane binary (`e2e/controlplane/build.sh`);
//! the harness fails with instructions when either is missing.

use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use weft_api::ServiceRoute;
use weft_e2e::Cluster;
use weft_operator::ca::{CertificateAuthority, LeafSubject};
use weft_operator::config::{self, ConfigMetrics, ConfigOptions};
use weft_operator::signing::ConfigSigner;
use weft_proxy_config::ProxyConfig;

const WORKLOAD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {weft.dev/inject: enabled}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: sleep
        image: busybox
        command: [sleep, "100000"]
        ports: [{name: http, containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: burst, namespace: shop}
spec:
  ports: [{name: tcp, port: 9000, targetPort: 9000}]
"#;

const GOOD_ROUTE: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: ServiceRoute
metadata: {name: web, namespace: shop}
spec:
  service: web
  http:
  - timeout: 3s
"#;

const BAD_ROUTE: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: ServiceRoute
metadata: {name: typo, namespace: shop}
spec:
  service: wbe
  http:
  - timeout: 1s
"#;

async fn current(cms: &Api<ConfigMap>) -> anyhow::Result<Option<ProxyConfig>> {
    let Some(cm) = cms.get_opt(config::CONFIG_MAP_NAME).await? else {
        return Ok(None);
    };
    let bytes = match (&cm.data, &cm.binary_data) {
        (Some(d), _) if d.contains_key("proxy.json") => d["proxy.json"].as_bytes().to_vec(),
        (_, Some(b)) => weft_proxy_config::gunzip(&b["proxy.json.gz"].0)?,
        _ => anyhow::bail!("weft-proxy has no proxy.json"),
    };
    Ok(Some(ProxyConfig::load(&bytes)?))
}

fn endpoints(cfg: &ProxyConfig, key: &str) -> usize {
    cfg.services
        .iter()
        .find(|s| s.key() == key)
        .map_or(0, |s| s.endpoints.len())
}

fn options(metrics: &ConfigMetrics) -> ConfigOptions {
    ConfigOptions {
        metrics: metrics.clone(),
        ..Default::default()
    }
}

async fn wait_config(
    cluster: &Cluster,
    cms: &Api<ConfigMap>,
    what: &str,
    check: impl Fn(&ProxyConfig) -> bool,
) -> anyhow::Result<ProxyConfig> {
    let check = &check;
    cluster
        .wait_until(Duration::from_secs(90), what, || async move {
            Ok(current(cms).await.ok().flatten().is_some_and(|c| check(&c)))
        })
        .await?;
    current(cms).await?.context("ConfigMap vanished")
}

fn burst_slice(i: u32) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "burst-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "burst"}},
        "addressType": "IPv4",
        "ports": [{"name": "tcp", "port": 9000}],
        "endpoints": (0..=(i % 5)).map(|k| serde_json::json!({"addresses": [format!("10.250.{}.{}", i / 200, k + 1)]})).collect::<Vec<_>>()
    })
}

/// A config signer issued by a fresh CA, as the identity half publishes it;
/// the same one across the operator's restart below, as a Secret keeps it.
fn config_signer() -> tokio::sync::watch::Receiver<Option<std::sync::Arc<ConfigSigner>>> {
    let now = std::time::SystemTime::now();
    let ca = CertificateAuthority::generate("cluster.local", Duration::from_secs(86400), now)
        .expect("CA");
    let subject = LeafSubject::ConfigSigner {
        trust_domain: "cluster.local".into(),
    };
    let leaf = ca
        .issue(&subject, Duration::from_secs(3600), now)
        .expect("signer leaf");
    let signer =
        ConfigSigner::from_pem(leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes()).expect("signer");
    tokio::sync::watch::channel(Some(std::sync::Arc::new(signer))).1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_follows_the_cluster() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let client = cluster.client();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in weft_api::crds() {
        crds.create(&PostParams::default(), &crd).await?;
    }
    let routes: Api<ServiceRoute> = Api::namespaced(client.clone(), "shop");
    cluster
        .wait_until(Duration::from_secs(30), "weft CRDs established", || {
            let api: Api<ServiceRoute> = Api::all(client.clone());
            async move { Ok(api.list(&Default::default()).await.is_ok()) }
        })
        .await?;
    cluster
        .kubectl_stdin(&["apply", "-f", "-"], Some(WORKLOAD))
        .await?;

    let metrics = ConfigMetrics::default();
    let signer = config_signer();
    let operator = tokio::spawn(config::run(
        client.clone(),
        options(&metrics),
        signer.clone(),
    ));
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "shop");

    // Deployment pods become endpoints, with the identity of their
    // service account once the injector labels them (not here: plain pods).
    let cfg = wait_config(&cluster, &cms, "two endpoints of shop/web", |c| {
        endpoints(c, "shop/web") == 2
    })
    .await?;
    cfg.validate()?;
    cluster
        .kubectl(&["-n", "shop", "scale", "deployment/web", "--replicas=3"])
        .await?;
    wait_config(&cluster, &cms, "three endpoints after scaling", |c| {
        endpoints(c, "shop/web") == 3
    })
    .await?;

    // kubectl-applied routes: the good one renders, the bad one is rejected
    // with its reason and breaks nothing.
    cluster
        .kubectl_stdin(&["apply", "-f", "-"], Some(GOOD_ROUTE))
        .await?;
    cluster
        .kubectl_stdin(&["apply", "-f", "-"], Some(BAD_ROUTE))
        .await?;
    let cfg = wait_config(&cluster, &cms, "route web rendered", |c| {
        c.services.iter().any(|s| {
            s.key() == "shop/web" && s.http_routes.first().and_then(|r| r.timeout_ms) == Some(3000)
        })
    })
    .await?;
    assert_eq!(endpoints(&cfg, "shop/web"), 3);
    let accepted = |name: &'static str| {
        let routes = routes.clone();
        async move {
            let r = routes.get(name).await?;
            let c = r
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Accepted").cloned());
            anyhow::Ok(c.map(|c| (c.status, c.reason)))
        }
    };
    cluster
        .wait_until(Duration::from_secs(30), "statuses patched", || async {
            Ok(accepted("web").await.ok().flatten().is_some()
                && accepted("typo").await.ok().flatten().is_some())
        })
        .await?;
    assert_eq!(
        accepted("web").await?,
        Some(("True".into(), "Accepted".into()))
    );
    assert_eq!(
        accepted("typo").await?,
        Some(("False".into(), "UnknownService".into()))
    );

    // `Rendered`, not `Ready`: the route is in the ConfigMap, at the config
    // generation its message names, which a proxy's /config can be
    // compared with.
    let conditions = |name: &'static str| {
        let routes = routes.clone();
        async move {
            let r = routes.get(name).await?;
            anyhow::Ok(r.status.map(|s| s.conditions).unwrap_or_default())
        }
    };
    let web = conditions("web").await?;
    assert!(web.iter().all(|c| c.type_ != "Ready"), "{web:?}");
    let rendered = web
        .iter()
        .find(|c| c.type_ == "Rendered")
        .context("Rendered on web")?;
    assert_eq!(
        (rendered.status.as_str(), rendered.reason.as_str()),
        ("True", "Rendered")
    );
    let stamped: u64 = rendered
        .message
        .split("config generation ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|g| g.parse().ok())
        .with_context(|| format!("no config generation in {:?}", rendered.message))?;
    let now = current(&cms).await?.context("config exists")?;
    assert!(
        (1..=now.generation).contains(&stamped),
        "stamped {stamped}, ConfigMap at {}",
        now.generation
    );
    let typo = conditions("typo").await?;
    let not_rendered = typo
        .iter()
        .find(|c| c.type_ == "Rendered")
        .context("Rendered on typo")?;
    assert_eq!(
        (not_rendered.status.as_str(), not_rendered.reason.as_str()),
        ("False", "NotAccepted")
    );
    let web_version = routes.get("web").await?.resource_version();

    // A burst of 100 EndpointSlice updates: few writes.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "shop");
    let ssa = PatchParams::apply("burst-test").force();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = metrics.writes.get();
    for i in 0..100 {
        slices
            .patch("burst-1", &ssa, &Patch::Apply(burst_slice(i)))
            .await?;
    }
    let last = burst_slice(99);
    let want = last["endpoints"].as_array().map_or(0, Vec::len);
    wait_config(&cluster, &cms, "burst's final endpoints", |c| {
        endpoints(c, "shop/burst") == want
            && c.services.iter().any(|s| {
                s.key() == "shop/burst"
                    && s.endpoints
                        .iter()
                        .all(|e| e.address.to_string().starts_with("10.250.0."))
            })
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let burst_writes = metrics.writes.get() - before;
    println!("100 EndpointSlice updates → {burst_writes} ConfigMap writes");
    assert!(
        (1..=15).contains(&burst_writes),
        "{burst_writes} writes for a burst of 100 updates"
    );
    assert_eq!(
        routes.get("web").await?.resource_version(),
        web_version,
        "new config generations that do not change the route write no status"
    );

    // Restart: a new operator renders every namespace again and writes nothing.
    operator.abort();
    let final_cfg = current(&cms).await?.context("config exists")?;
    let restarted = ConfigMetrics::default();
    let operator = tokio::spawn(config::run(
        client.clone(),
        options(&restarted),
        signer.clone(),
    ));
    cluster
        .wait_until(
            Duration::from_secs(60),
            "restarted operator rendered shop",
            || async { Ok(restarted.renders.get() >= 1) },
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(restarted.writes.get(), 0, "no spurious write after restart");
    let after = current(&cms).await?.context("config exists")?;
    assert_eq!(after.hash, final_cfg.hash);
    assert_eq!(after.generation, final_cfg.generation);
    assert_eq!(
        routes.get("web").await?.resource_version(),
        web_version,
        "a restarted operator keeps the route's status"
    );

    // Leaving the mesh removes the ConfigMap.
    cluster
        .kubectl(&["label", "namespace", "shop", "weft.dev/inject-"])
        .await?;
    cluster
        .wait_until(Duration::from_secs(30), "weft-proxy deleted", || async {
            Ok(cms
                .get_opt(config::CONFIG_MAP_NAME)
                .await
                .ok()
                .flatten()
                .is_none())
        })
        .await?;
    operator.abort();
    Ok(())
}
