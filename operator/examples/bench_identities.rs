//! Benchmark: issue workload identities for 1,000 service accounts with the
//! operator's pure code (the same `plan_identity` the reconciler calls:
//! renewal decision, ECDSA P-256 key, signed leaf, Secret object), then
//! re-check all 1,000 stored Secrets (the steady-state path: no new leaf).
//! Prints wall time and peak RSS (VmHWM). The bar is < 5 s for 1,000.
//!
//! `cargo run --release -p weft-operator --example bench_identities [N]`

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use weft_operator::ca::CertificateAuthority;
use weft_operator::identity::{IdentityPlan, Signer, plan_identity};

fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1000);
    let now = SystemTime::now();
    let day = Duration::from_secs(24 * 3600);
    let ca = Arc::new(CertificateAuthority::generate(
        "cluster.local",
        3650 * day,
        now,
    )?);
    let signer = Signer {
        bundle: ca.anchor_pem(),
        ca,
        trust_domain: "cluster.local".to_owned(),
        ttl: day,
    };
    let accounts: Vec<ServiceAccount> = (0..n)
        .map(|i| ServiceAccount {
            metadata: ObjectMeta {
                name: Some(format!("sa-{i}")),
                namespace: Some(format!("ns-{}", i % 50)),
                uid: Some(format!("uid-{i}")),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        })
        .collect();

    let start = Instant::now();
    let mut secrets = Vec::with_capacity(n);
    for sa in &accounts {
        match plan_identity(sa, None, &signer, now)? {
            IdentityPlan::Write { secret, .. } => secrets.push(*secret),
            IdentityPlan::Unchanged { .. } => anyhow::bail!("a missing Secret must be written"),
        }
    }
    let issue = start.elapsed();

    let start = Instant::now();
    let mut unchanged = 0;
    for (sa, secret) in accounts.iter().zip(&secrets) {
        if matches!(
            plan_identity(sa, Some(secret), &signer, now)?,
            IdentityPlan::Unchanged { .. }
        ) {
            unchanged += 1;
        }
    }
    let recheck = start.elapsed();
    anyhow::ensure!(unchanged == n, "every fresh Secret must be kept");

    println!("identities: {n}");
    println!(
        "issue:   {:.3} s ({:.0} µs each)",
        issue.as_secs_f64(),
        issue.as_secs_f64() * 1e6 / n as f64
    );
    println!(
        "recheck: {:.3} s ({:.0} µs each, no write)",
        recheck.as_secs_f64(),
        recheck.as_secs_f64() * 1e6 / n as f64
    );
    match vm_hwm_kib() {
        Some(kib) => println!("peak RSS (VmHWM): {:.1} MiB", kib as f64 / 1024.0),
        None => println!("peak RSS (VmHWM): unavailable"),
    }
    Ok(())
}
