//! `weft-operator`: the mesh CA, workload identities and (with the config
//! half) the proxy configuration of every meshed namespace.
//!
//! Start-up: JSON (or text) logs, the ring crypto provider for rustls, a
//! Kubernetes client from the in-cluster or kubeconfig environment, the
//! admin server (`/metrics`, `/healthz`, `/readyz`), then leader election
//! on a Lease: only the leader runs the reconcilers, both halves of them
//! ([`weft_operator::identity::run`] and [`weft_operator::config::run`]). SIGTERM or Ctrl-C
//! stops the reconcilers, releases the Lease and ends the admin server.
//!
//! Every flag can also be set by the environment variable named in
//! `--help`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use kube::runtime::events::Reporter;
use tokio_util::sync::CancellationToken;
use weft_operator::admin::{self, AdminState};
use weft_operator::config;
use weft_operator::identity::{self, Settings, SystemClock};
use weft_operator::leader::{self, LeaseSettings};
use weft_operator::metrics::Metrics;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// One JSON object per line (for log collectors).
    Json,
    /// Human-readable lines.
    Text,
}

/// weft's operator: the mesh CA, workload identities and proxy
/// configuration.
#[derive(Debug, Parser)]
#[command(name = "weft-operator", version)]
struct Args {
    /// Namespace the operator runs in; holds Secrets weft-ca and
    /// weft-injector-tls.
    #[arg(long, env = "WEFT_NAMESPACE", default_value = "weft-system")]
    namespace: String,

    /// Address the admin server listens on.
    #[arg(long, env = "WEFT_ADMIN_ADDRESS", default_value = "0.0.0.0")]
    admin_address: IpAddr,

    /// Port of the admin server (/metrics, /healthz, /readyz).
    #[arg(long, env = "WEFT_ADMIN_PORT", default_value_t = 9090)]
    admin_port: u16,

    /// Name of the leader election Lease.
    #[arg(long, env = "WEFT_LEASE_NAME", default_value = "weft-operator")]
    lease_name: String,

    /// Namespace of the leader election Lease (default: --namespace).
    #[arg(long, env = "WEFT_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,

    /// This replica's identity in the Lease (default: the pod name from
    /// POD_NAME, else the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,

    /// Seconds a Lease stays valid after its last renewal.
    #[arg(long, env = "WEFT_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,

    /// Seconds before expiry at which the holder renews the Lease (also
    /// the clock skew tolerated between replicas).
    #[arg(long, env = "WEFT_LEASE_GRACE_SECONDS", default_value_t = 5)]
    lease_grace_seconds: u64,

    /// Seconds a new trust bundle must be in every Secret before workload
    /// certificates move to a new CA (covers kubelet's Secret refresh).
    #[arg(long, env = "WEFT_CA_PROPAGATION_SECONDS", default_value_t = 120)]
    ca_propagation_seconds: u64,

    /// Log format.
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum, default_value = "json")]
    log_format: LogFormat,
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn identity_default() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("weft-operator-{}", std::process::id()))
}

async fn shutdown_signal(token: CancellationToken) {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down");
    token.cancel();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logs(args.log_format);
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("another rustls crypto provider is already installed"))?;

    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_signal(shutdown.clone()));

    let config_metrics = config::ConfigMetrics::default();
    let metrics = Arc::new(Metrics::new_with(|r| config_metrics.register(r)));
    let admin_state = AdminState::new(metrics.clone());
    let addr = SocketAddr::new(args.admin_address, args.admin_port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin server to {addr}; is the port free?"))?;
    tracing::info!(%addr, "admin server listening");
    let admin_shutdown = shutdown.clone();
    let admin_app = admin::app(admin_state.clone());
    let admin_task = tokio::spawn(async move {
        axum::serve(listener, admin_app)
            .with_graceful_shutdown(async move { admin_shutdown.cancelled().await })
            .await
    });

    let client = kube::Client::try_default().await.context(
        "creating the Kubernetes client; check the in-cluster service account or KUBECONFIG",
    )?;
    let identity = args.identity.clone().unwrap_or_else(identity_default);
    let lease = LeaseSettings {
        name: args.lease_name.clone(),
        namespace: args
            .lease_namespace
            .clone()
            .unwrap_or_else(|| args.namespace.clone()),
        identity: identity.clone(),
        duration: Duration::from_secs(args.lease_duration_seconds),
        grace: Duration::from_secs(args.lease_grace_seconds),
    };
    let settings = Settings {
        namespace: args.namespace.clone(),
        propagation: Duration::from_secs(args.ca_propagation_seconds),
        ..Settings::default()
    };
    let config_opts = config::ConfigOptions {
        metrics: config_metrics,
        instance: Some(identity.clone()),
        ..config::ConfigOptions::default()
    };
    let reporter = Reporter {
        controller: "weft-operator".to_owned(),
        instance: Some(identity.clone()),
    };
    tracing::info!(
        namespace = %args.namespace,
        lease = %format!("{}/{}", lease.namespace, lease.name),
        identity = %identity,
        "weft-operator starting"
    );
    let ready = admin_state.ready.clone();
    let result = leader::run_with_lease(
        client.clone(),
        &lease,
        shutdown.clone(),
        move || ready.store(true, Ordering::Release),
        move |token| {
            let ctx = Arc::new(identity::Context::new(
                client.clone(),
                settings.clone(),
                metrics.clone(),
                Arc::new(SystemClock),
                reporter.clone(),
            ));
            let config = config::run(client.clone(), config_opts.clone(), ctx.config_signer());
            async move {
                // Both halves run while leading; if the config half fails
                // for good, the identity half stops too and the lease goes
                // to another replica.
                tokio::select! {
                    () = identity::run(ctx, token) => {}
                    res = config => match res {
                        Ok(()) => tracing::error!("config reconcilers ended"),
                        Err(e) => tracing::error!(error = %e, "config reconcilers failed"),
                    },
                }
            }
        },
    )
    .await;
    admin_state.healthy.store(false, Ordering::Release);
    shutdown.cancel();
    match admin_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "admin server failed"),
        Err(e) => tracing::warn!(error = %e, "admin server task failed"),
    }
    result.context("leader election")?;
    tracing::info!("weft-operator stopped");
    Ok(())
}
