//! The upstream Gateway API conformance suite against weft, on the
//! harness: the suite's `GATEWAY-HTTP` and `GATEWAY-TLS` profiles (on the
//! experimental channel's CRDs, where TLSRoute is), unchanged, from the release
//! pinned in `e2e/gateway-api/go.mod` (`e2e/gateway-api/build.sh` builds
//! it and its echo backend), run in the node's network namespace like a
//! client outside the mesh. Its report is written to
//! `target/gateway-api/report.yaml` (published as
//! `docs/conformance/gateway-v1.4.1-report.yaml`) and its log next to it.

mod common;

use std::time::{Duration, Instant};

use common::serial;
use weft_e2e::images::ImageMap;
use weft_e2e::{Cluster, ClusterConfig, mesh};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_http_conformance() -> anyhow::Result<()> {
    let _serial = serial().await;
    let root = mesh::repo_root();
    let out_dir = root.join("target/gateway-api");
    let suite = out_dir.join("conformance.test");
    anyhow::ensure!(
        suite.exists(),
        "{} is missing: run e2e/gateway-api/build.sh (scripts/setup does)",
        suite.display()
    );
    let images = ImageMap::workspace()
        .with("echo-basic", out_dir.join("echo-basic"))
        .with("coredns", root.join("e2e/gateway-api/udp-stand-in.sh"));
    let cluster = Cluster::for_scenario_with(ClusterConfig {
        images,
        ..ClusterConfig::default()
    })
    .await?;
    mesh::install_gateway_api(&cluster, mesh::Channel::Experimental).await?;
    mesh::install(&cluster).await?;
    mesh::install_gateway_class(&cluster).await?;
    // As a user would: the class is accepted, with the features weft
    // supports, before Gateways of it are made (the suite reads them).
    cluster
        .wait_until(
            Duration::from_secs(60),
            "GatewayClass weft accepted",
            || async {
                let features = cluster
                    .kubectl(&[
                        "get",
                        "gatewayclass",
                        "weft",
                        "-o",
                        "jsonpath={.status.supportedFeatures[*].name}",
                    ])
                    .await?;
                Ok(!features.is_empty())
            },
        )
        .await?;

    // The suite talks to the API server from the node's namespace, where it
    // listens on 127.0.0.1:6443 (the host reaches it through a forward).
    let node_kubeconfig = node_side(&std::fs::read_to_string(cluster.kubeconfig())?);
    let kc_path = out_dir.join("node-kubeconfig");
    std::fs::write(&kc_path, node_kubeconfig)?;
    let report = out_dir.join("report.yaml");
    let _ = std::fs::remove_file(&report);
    let start = Instant::now();
    let args = [
        "env".to_owned(),
        format!("KUBECONFIG={}", kc_path.display()),
        suite.display().to_string(),
        "-test.run=TestConformance".to_owned(),
        "-test.v".to_owned(),
        "-test.timeout=40m".to_owned(),
        "--gateway-class=weft".to_owned(),
        "--conformance-profiles=GATEWAY-HTTP,GATEWAY-TLS".to_owned(),
        "--organization=weft-mesh".to_owned(),
        "--project=weft".to_owned(),
        "--url=https://github.com/weft-mesh/weft".to_owned(),
        "--version=0.1.0".to_owned(),
        "--contact=https://github.com/weft-mesh/weft/issues".to_owned(),
        format!("--report-output={}", report.display()),
    ];
    let mut args = args.to_vec();
    // WEFT_CONFORMANCE_RUN_TEST=<name> runs one test of the suite.
    if let Ok(t) = std::env::var("WEFT_CONFORMANCE_RUN_TEST") {
        args.push(format!("--run-test={t}"));
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = tokio::time::timeout(Duration::from_secs(45 * 60), cluster.exec_in_node(&argv))
        .await
        .map_err(|_| anyhow::anyhow!("the conformance suite ran over 45 minutes"))??;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(out_dir.join("conformance.log"), &log)?;
    eprintln!(
        "conformance suite: {:?} in {:?}; log in {}",
        out.status,
        start.elapsed(),
        out_dir.join("conformance.log").display()
    );
    for line in log
        .lines()
        .filter(|l| l.contains("--- FAIL") || l.contains("--- PASS") || l.contains("--- SKIP"))
    {
        eprintln!("{line}");
    }
    // The operator's and the gateways' logs, for a failure's cause.
    for (i, f) in cluster.log_files().iter().enumerate() {
        let path = f.to_string_lossy();
        if path.contains("operator") || path.contains("weft-gateway") {
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let _ = std::fs::copy(f, out_dir.join(format!("log-{i}-{name}")));
        }
    }
    let text = std::fs::read_to_string(&report)
        .map_err(|e| anyhow::anyhow!("no report at {}: {e}\n{log}", report.display()))?;
    eprintln!("{text}");
    anyhow::ensure!(
        out.status.success(),
        "the suite failed; see {}",
        out_dir.join("conformance.log").display()
    );
    cluster.shutdown();
    Ok(())
}

/// The kubeconfig with the forwarded API server address replaced by the
/// one the node's namespace reaches it at.
fn node_side(kubeconfig: &str) -> String {
    const HOST: &str = "https://127.0.0.1:";
    let mut out = String::with_capacity(kubeconfig.len());
    let mut rest = kubeconfig;
    while let Some(i) = rest.find(HOST) {
        out.push_str(&rest[..i]);
        out.push_str("https://127.0.0.1:6443");
        rest = rest[i + HOST.len()..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}
