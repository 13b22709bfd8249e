//! Shared helpers of the e2e tests (each test binary uses a subset).
#![allow(dead_code)]

use std::sync::OnceLock;

/// Clusters are heavy (a control plane each) on a 2-core machine and share
/// host mount points: tests of one binary take this lock and run one at a time.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(()))
        .lock()
        .await
}

/// The test app binary, built by cargo for these tests.
pub const APP: &str = env!("CARGO_BIN_EXE_weft-e2e-app");

/// Applies YAML through real `kubectl apply -f -`.
pub async fn apply(cluster: &weft_e2e::Cluster, yaml: &str) -> anyhow::Result<String> {
    Ok(cluster
        .kubectl_stdin(&["apply", "-f", "-"], Some(yaml))
        .await?)
}
