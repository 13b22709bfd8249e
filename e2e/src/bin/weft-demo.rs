//! `weft-demo`: the local mesh, end to end, on the e2e harness.
//!
//! Starts a real control plane and the kubelet simulator in an isolated
//! network namespace, installs weft from `manifests/` with kubectl, deploys
//! a frontend and two versions of a backend in a meshed namespace, applies
//! `manifests/examples/`, sends traffic from the frontend pod through its
//! sidecar, and prints what happened: routing, identities, and the golden
//! signals and service graph a real Prometheus scraped from the proxies
//! (through `weftctl stat` and `weftctl graph`), and one trace through
//! frontend, backend and store as Jaeger holds it. `--keep` leaves the
//! cluster running.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context as _;
use clap::Parser;
use weft_e2e::jaeger::Jaeger;
use weft_e2e::mesh::{self, Reply};
use weft_e2e::prometheus::{Prometheus, samples};
use weft_e2e::{Cluster, ClusterConfig};

#[derive(Parser, Debug)]
#[command(about = "weft's local mesh demo on the e2e cluster harness")]
struct Args {
    /// Requests the frontend sends to the backend.
    #[arg(long, default_value_t = 100)]
    requests: usize,
    /// Pause between requests, so that Prometheus (scraping every second)
    /// sees the counters grow and can compute rates.
    #[arg(long, default_value_t = 50)]
    interval_ms: u64,
    /// Leave the cluster running after the report (Ctrl-C to stop).
    #[arg(long)]
    keep: bool,
}

fn step(t0: Instant, what: &str) {
    println!("[{:>5.1}s] {what}", t0.elapsed().as_secs_f64());
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let t0 = Instant::now();

    step(
        t0,
        "starting the cluster (etcd, kube-apiserver, controller-manager, scheduler, simulated kubelet)",
    );
    let cluster = Cluster::start_with(ClusterConfig::default())
        .await
        .context("starting the e2e cluster (run scripts/setup first)")?;
    let result = run(&cluster, &args, t0).await;
    if let Err(e) = &result {
        eprintln!("demo failed: {e:#}");
        cluster.dump_logs();
    }
    if args.keep && result.is_ok() {
        println!();
        println!("The cluster keeps running. In another shell:");
        println!("  export KUBECONFIG={}", cluster.kubeconfig().display());
        println!("  kubectl get pods -A; kubectl get weft -A");
        println!(
            "  ip netns exec {} bash   # the cluster's network",
            cluster.node_netns()
        );
        println!("Ctrl-C stops and cleans up.");
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
    }
    // Logs were printed above on failure; stop without dumping them again.
    cluster.shutdown();
    step(t0, "cleaned up");
    result
}

async fn run(cluster: &Cluster, args: &Args, t0: Instant) -> anyhow::Result<()> {
    step(t0, "kubectl apply --server-side -k manifests/");
    mesh::install(cluster).await.context("installing weft")?;
    step(t0, "weft-operator and weft-injector are ready");
    let prometheus = Prometheus::start(cluster)
        .await
        .context("starting Prometheus (scripts/setup installs it)")?;
    step(
        t0,
        &format!(
            "Prometheus scrapes the proxies, operator and injector with manifests/observability's jobs ({})",
            prometheus.url()
        ),
    );

    let jaeger = Jaeger::start(cluster)
        .await
        .context("starting Jaeger (scripts/setup builds it)")?;
    mesh::patch_mesh_spec(
        cluster,
        &format!(
            r#"{{"telemetry":{{"tracing":{{"otlpEndpoint":"{}"}}}}}}"#,
            jaeger.otlp_endpoint()
        ),
    )
    .await
    .context("pointing the Mesh's tracing at Jaeger")?;
    step(
        t0,
        &format!(
            "Jaeger receives the proxies' spans (Mesh telemetry.tracing.otlpEndpoint {}; UI and API {})",
            jaeger.otlp_endpoint(),
            jaeger.url()
        ),
    );
    step(t0, "deploying the demo app and manifests/examples/");
    mesh::deploy_demo(cluster)
        .await
        .context("deploying the demo app")?;
    step(t0, "demo pods are ready");

    let demo_pods = mesh::pods(cluster, "demo", "frontend")
        .await?
        .into_iter()
        .chain(mesh::pods(cluster, "demo", "backend").await?)
        .chain(mesh::pods(cluster, "demo", "store").await?)
        .collect::<Vec<_>>();
    let injected = demo_pods
        .iter()
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("weft.dev/proxy"))
                .map(String::as_str)
                == Some("injected")
        })
        .count();
    let identities = mesh::identity_secrets(cluster, "demo").await?;

    let frontend = mesh::pods(cluster, "demo", "frontend")
        .await?
        .into_iter()
        .find_map(|p| p.metadata.name)
        .context("no frontend pod")?;
    let backend_ip = mesh::cluster_ip(cluster, "demo", "backend").await?;
    let url = format!("http://{backend_ip}:8080/api/items");
    let warm = mesh::wait_for_route(
        cluster,
        "demo",
        &frontend,
        &url,
        std::time::Duration::from_secs(60),
    )
    .await
    .context("the frontend never reached the backend")?;
    step(
        t0,
        &format!(
            "the frontend's proxy has the backend's endpoints (after {:.1}s: kubelet volume sync + reload)",
            warm.as_secs_f64()
        ),
    );
    let synced = mesh::wait_for_proxy_sync(
        cluster,
        "demo",
        &frontend,
        std::time::Duration::from_secs(60),
    )
    .await
    .context("the frontend's proxy never caught up with the namespace's config")?;
    step(
        t0,
        &format!(
            "the frontend's proxy runs the namespace's current config: the backend's ServiceRoute and every endpoint (after {:.1}s more)",
            synced.as_secs_f64()
        ),
    );
    step(
        t0,
        &format!(
            "sending {} requests frontend → backend ({backend_ip}:8080/api/items)",
            args.requests
        ),
    );
    let mut per_version: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen_identity: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    let started = Instant::now();
    for _ in 0..args.requests {
        tokio::time::sleep(std::time::Duration::from_millis(args.interval_ms)).await;
        match mesh::get_from_pod(cluster, "demo", &frontend, &url, &[]).await? {
            Reply::Ok(body) => {
                let pod = body["pod"].as_str().unwrap_or("?");
                let version = if pod.starts_with("backend-v2") {
                    "v2"
                } else if pod.starts_with("backend-v1") {
                    "v1"
                } else {
                    pod
                };
                *per_version.entry(version.to_owned()).or_default() += 1;
                let id = body["identity"].as_str().unwrap_or("(none)").to_owned();
                *seen_identity.entry(id).or_default() += 1;
            }
            Reply::Failed(why) => {
                *failures
                    .entry(mesh::last_line(&why).to_owned())
                    .or_default() += 1
            }
        }
    }
    let elapsed = started.elapsed();
    let weights = route_weights(cluster, "api-canary").await;
    let observed = observe(&prometheus, args.requests, t0).await;
    let traced = trace(cluster, &jaeger, &frontend, &backend_ip, t0).await;

    let hidden = mesh::get_from_pod(
        cluster,
        "demo",
        &frontend,
        &url,
        &[("x-weft-release", "canary")],
    )
    .await?;

    let backend_pod = mesh::pods(cluster, "outside", "client")
        .await?
        .into_iter()
        .next()
        .and_then(|p| p.metadata.name)
        .context("no client pod")?;
    let target = mesh::pods(cluster, "demo", "backend")
        .await?
        .into_iter()
        .next()
        .and_then(|p| p.status.and_then(|s| s.pod_ip))
        .context("no backend pod IP")?;
    let plaintext = mesh::get_from_pod(
        cluster,
        "outside",
        &backend_pod,
        &format!("http://{target}:8080/api/items"),
        &[],
    )
    .await?;

    println!();
    println!("weft demo report");
    println!(
        "  pods in demo:           {} ({} injected with the weft sidecar)",
        demo_pods.len(),
        injected
    );
    println!("  identities issued:      {}", identities.join(", "));
    println!(
        "  requests sent:          {} in {:.1}s",
        args.requests,
        elapsed.as_secs_f64()
    );
    let total_weight: u64 = weights.values().sum();
    match &weights {
        w if w.is_empty() => {
            println!(
                "    ServiceRoute demo/backend rule api-canary: not found (split by endpoints)"
            )
        }
        w => println!(
            "    ServiceRoute demo/backend rule api-canary (/api/*): {}",
            w.iter()
                .map(|(v, n)| format!(
                    "{v} weight {n} ({:.0}%)",
                    100.0 * *n as f64 / total_weight.max(1) as f64
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
    for (v, n) in &per_version {
        println!(
            "    served by backend {v}: {n} ({:.0}%)",
            100.0 * *n as f64 / args.requests as f64
        );
    }
    for (why, n) in &failures {
        println!("    failed: {n} × {why}");
    }
    println!(
        "    (the rule's 2 s timeout and retries apply too, and 5% of its requests are copied to v2 with a -shadow Host, answers dropped)"
    );
    for (id, n) in &seen_identity {
        println!("  identity the backend saw: {id} ({n} requests)");
    }
    match hidden {
        Reply::Ok(body) => println!(
            "  x-weft-release: canary → served by {}",
            body["pod"].as_str().unwrap_or("?")
        ),
        Reply::Failed(why) => println!(
            "  x-weft-release: canary → failed: {}",
            mesh::last_line(&why)
        ),
    }
    match plaintext {
        Reply::Ok(_) => {
            println!("  plaintext from the unmeshed namespace: SERVED (Strict mTLS not enforced!)")
        }
        Reply::Failed(why) => println!(
            "  plaintext from the unmeshed namespace: refused ({})",
            mesh::last_line(&why)
        ),
    }
    match observed {
        Ok(o) => {
            println!(
                "  Prometheus counted {} requests frontend → backend (reporter=source)",
                o.counted
            );
            println!("  golden signals in namespace demo (weftctl stat --namespace demo):");
            for line in o.stat.lines() {
                println!("    {line}");
            }
            println!(
                "  service graph (weftctl graph): {} (open it in a browser), DOT: {}",
                o.svg.display(),
                o.dot.display()
            );
        }
        Err(e) => println!("  metrics: not shown: {e:#}"),
    }
    match traced {
        Ok(t) => {
            println!(
                "  one traced request frontend → backend → store: trace {}, {} spans ({})",
                t.id,
                t.spans,
                t.services.join(", ")
            );
            println!("    look it up: {}/trace/{}", jaeger.url(), t.id);
            if !args.keep {
                println!("    (the URL lives as long as the cluster: run with --keep to open it)");
            }
        }
        Err(e) => println!("  tracing: not shown: {e:#}"),
    }
    println!("  total time: {:.1}s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// One trace as Jaeger holds it.
struct Traced {
    id: String,
    spans: usize,
    services: Vec<String>,
}

/// Sends one request frontend → backend → store that starts a sampled
/// trace (the frontend app sends `traceparent` with the sampled flag, as an
/// app's tracing library would), and waits until Jaeger has the spans of
/// all four proxies on the way.
async fn trace(
    cluster: &Cluster,
    jaeger: &Jaeger,
    frontend: &str,
    backend_ip: &str,
    t0: Instant,
) -> anyhow::Result<Traced> {
    step(t0, "one traced request frontend → backend → store");
    let id: String = (0..16)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let parent: String = (0..8)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let traceparent = format!("00-{id}-{parent}-01");
    // Every proxy on the way must run the config that traces.
    for app in ["frontend", "backend", "store"] {
        for pod in mesh::pods(cluster, "demo", app).await? {
            if let Some(name) = pod.metadata.name {
                mesh::wait_for_proxy_sync(
                    cluster,
                    "demo",
                    &name,
                    std::time::Duration::from_secs(90),
                )
                .await
                .with_context(|| format!("{name}'s proxy never ran the tracing config"))?;
            }
        }
    }
    let url = format!("http://{backend_ip}:8080/api/chain");
    match mesh::get_from_pod(
        cluster,
        "demo",
        frontend,
        &url,
        &[("traceparent", &traceparent)],
    )
    .await?
    {
        Reply::Ok(_) => {}
        Reply::Failed(why) => anyhow::bail!("the traced request failed: {}", mesh::last_line(&why)),
    }
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let trace = jaeger.trace(&id).await?;
        let spans = trace["spans"].as_array().map_or(0, Vec::len);
        if spans >= 4 {
            let mut services: Vec<String> = trace["processes"]
                .as_object()
                .into_iter()
                .flat_map(|p| p.values())
                .filter_map(|p| p["serviceName"].as_str().map(str::to_owned))
                .collect();
            services.sort();
            services.dedup();
            return Ok(Traced {
                id,
                spans,
                services,
            });
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "Jaeger has {spans} spans of trace {id} after 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// What the demo shows of the metrics.
struct Observed {
    counted: f64,
    stat: String,
    svg: std::path::PathBuf,
    dot: std::path::PathBuf,
}

/// Waits until Prometheus has scraped the demo's requests, then runs
/// `weftctl stat` and `weftctl graph` against it as a user would.
async fn observe(prom: &Prometheus, requests: usize, t0: Instant) -> anyhow::Result<Observed> {
    step(t0, "waiting for Prometheus to scrape the demo's requests");
    let query = r#"sum(weft_requests_total{reporter="source", source_workload="frontend", destination_service="backend.demo"})"#;
    #[allow(clippy::cast_precision_loss)]
    let want = requests as f64;
    let data = prom
        .wait_for(
            query,
            |d| samples(d).first().is_some_and(|(_, v)| *v >= want),
            std::time::Duration::from_secs(60),
        )
        .await
        .context("Prometheus never counted the demo's requests")?;
    let counted = samples(&data).first().map_or(0.0, |(_, v)| *v);
    // Two more scrapes, so every series has a sample after the last request.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let weftctl = std::env::current_exe()
        .context("locating the demo binary")?
        .with_file_name("weftctl");
    let run = |args: Vec<String>| {
        let weftctl = weftctl.clone();
        async move {
            let out = tokio::process::Command::new(&weftctl)
                .args(&args)
                .output()
                .await
                .with_context(|| format!("running {}", weftctl.display()))?;
            anyhow::ensure!(
                out.status.success(),
                "weftctl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            Ok::<_, anyhow::Error>(String::from_utf8_lossy(&out.stdout).into_owned())
        }
    };
    let url = prom.url().to_owned();
    let stat = run([
        "stat",
        "--prometheus",
        &url,
        "--namespace",
        "demo",
        "--window",
        "1m",
    ]
    .map(str::to_owned)
    .to_vec())
    .await?;
    let dir = weft_e2e::mesh::repo_root().join("target/demo");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (svg, dot) = (dir.join("graph.svg"), dir.join("graph.dot"));
    for (format, path) in [("svg", &svg), ("dot", &dot)] {
        run(vec![
            "graph".into(),
            "--prometheus".into(),
            url.clone(),
            "--namespace".into(),
            "demo".into(),
            "-o".into(),
            format.into(),
            "--out".into(),
            path.display().to_string(),
        ])
        .await?;
    }
    Ok(Observed {
        counted,
        stat,
        svg,
        dot,
    })
}

/// Subset → weight of the backends of rule `rule` of the applied
/// `ServiceRoute` demo/backend (as the API server holds it); empty when the
/// route or rule is missing.
async fn route_weights(cluster: &Cluster, rule: &str) -> BTreeMap<String, u64> {
    let out = match cluster
        .kubectl(&["get", "serviceroute", "-n", "demo", "backend", "-o", "json"])
        .await
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("cannot read ServiceRoute demo/backend: {e}");
            return BTreeMap::new();
        }
    };
    let route: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    route["spec"]["http"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["name"] == rule)
        .flat_map(|r| r["backends"].as_array().cloned().unwrap_or_default())
        .map(|b| {
            (
                b["subset"].as_str().unwrap_or("backend").to_owned(),
                b["weight"].as_u64().unwrap_or(1),
            )
        })
        .collect()
}
