//! `weft-injector`: serves the mutating admission webhook.
//!
//! Configuration by flags or environment (`--help`); logs are JSON lines
//! on stdout. SIGTERM/SIGINT: `/readyz` turns 503, the server keeps
//! answering for `--shutdown-delay` while endpoints drop it, then stops
//! accepting and drains open connections.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use weft_injector::InjectConfig;
use weft_injector::metrics::Metrics;
use weft_injector::server::{self, ServerOptions};

/// weft's mutating admission webhook.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to serve HTTPS on.
    #[arg(long, env = "WEFT_INJECTOR_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Directory of the mounted serving Secret (tls.crt, tls.key).
    #[arg(
        long,
        env = "WEFT_INJECTOR_TLS_DIR",
        default_value = "/var/run/weft-injector/tls"
    )]
    tls_dir: PathBuf,
    /// Largest accepted AdmissionReview body, in bytes.
    #[arg(long, env = "WEFT_INJECTOR_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Seconds allowed to receive a request body.
    #[arg(long, env = "WEFT_INJECTOR_BODY_TIMEOUT_SECONDS", default_value_t = 10)]
    body_timeout_seconds: u64,
    /// Seconds to keep serving after SIGTERM while /readyz reports 503.
    #[arg(
        long,
        env = "WEFT_INJECTOR_SHUTDOWN_DELAY_SECONDS",
        default_value_t = 5
    )]
    shutdown_delay_seconds: u64,
    /// Seconds open connections get to finish after that.
    #[arg(
        long,
        env = "WEFT_INJECTOR_DRAIN_TIMEOUT_SECONDS",
        default_value_t = 15
    )]
    drain_timeout_seconds: u64,
    /// Watch the `Mesh` named `default` for injection defaults (needs
    /// in-cluster credentials or a kubeconfig). Without it the built-in
    /// defaults apply.
    #[arg(long, env = "WEFT_INJECTOR_WATCH_MESH", default_value_t = true, action = clap::ArgAction::Set)]
    watch_mesh: bool,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "WEFT_INJECTOR_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log)
                .with_context(|| format!("--log {:?} is not a valid filter", args.log))?,
        )
        .with_current_span(false)
        .init();

    let config = Arc::new(ArcSwap::from_pointee(InjectConfig::default()));
    let metrics = Arc::new(Metrics::new());
    let stop = CancellationToken::new();

    let mesh_task = if args.watch_mesh {
        let client = kube::Client::try_default().await.context(
            "connecting to the Kubernetes API (use --watch-mesh=false to run without it)",
        )?;
        Some(tokio::spawn(weft_injector::mesh::watch(
            client,
            config.clone(),
            metrics.clone(),
            stop.clone(),
        )))
    } else {
        tracing::info!("not watching Mesh: built-in injection defaults apply");
        None
    };

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let opts = ServerOptions {
        tls_dir: args.tls_dir,
        max_body_bytes: args.max_body_bytes,
        body_timeout: Duration::from_secs(args.body_timeout_seconds),
        drain_timeout: Duration::from_secs(args.drain_timeout_seconds),
        ..ServerOptions::default()
    };
    let running = server::start(opts, listener, config, metrics).await?;
    tracing::info!(addr = %running.local_addr, version = env!("CARGO_PKG_VERSION"), "weft-injector serving");

    shutdown_signal().await?;
    tracing::info!("shutting down: unready first, then draining");
    running.set_unready();
    tokio::time::sleep(Duration::from_secs(args.shutdown_delay_seconds)).await;
    stop.cancel();
    running.shutdown().await;
    if let Some(t) = mesh_task {
        let _ = t.await;
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
    }
    Ok(())
}
