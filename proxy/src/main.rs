//! The `weft-proxy` binary: `init` installs capture rules, `run` runs the
//! sidecar, `wait-ready` blocks until the local proxy is ready.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use weft_proxy::init::InitArgs;
use weft_proxy::probes::AppProbes;
use weft_proxy::{Net, Settings};

/// With the `mimalloc` feature the proxy allocates with mimalloc (the
/// allocator comparison of docs/architecture.md); by default with the C
/// library's.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "weft-proxy", version, about = "weft's sidecar proxy")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the iptables capture rules in this network namespace.
    Init(InitArgs),
    /// Run the proxy.
    Run(RunArgs),
    /// Wait until the local proxy answers /ready (postStart hook).
    WaitReady {
        /// Give up after this long (e.g. 120s).
        #[arg(long, default_value = "120s", value_parser = parse_secs)]
        timeout: Duration,
        /// Admin port.
        #[arg(long, env = "WEFT_ADMIN_PORT", default_value_t = 15020)]
        admin_port: u16,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The mount with proxy.json and the identity.
    #[arg(long, env = "WEFT_CONFIG_DIR", default_value = "/var/run/weft")]
    config_dir: PathBuf,
    /// Downward-API labels file (`key="value"` lines).
    #[arg(long, env = "WEFT_LABELS_FILE")]
    labels_file: Option<PathBuf>,
    /// This pod's access log setting (`all`, `errors`, `off`), over the
    /// namespace's (set by the injector from `weft.dev/access-log`).
    #[arg(long, env = "WEFT_ACCESS_LOG", value_parser = ["all", "errors", "off"])]
    access_log: Option<String>,
    /// This pod's workload (set by the injector).
    #[arg(long, env = "WEFT_WORKLOAD_NAME")]
    workload: Option<String>,
    /// Most label sets of traffic metrics kept; calls beyond are counted
    /// under `overflow`.
    #[arg(long, env = "WEFT_MAX_METRIC_SERIES", default_value_t = weft_proxy::metrics::traffic::DEFAULT_SERIES_CAP)]
    max_metric_series: usize,
    /// HTTP/1.1 requests to weft peers share one HTTP/2 connection per
    /// peer (`true`), or each takes an HTTP/1.1 connection of its own.
    #[arg(long, env = "WEFT_PROXY_MUX", default_value_t = true, action = clap::ArgAction::Set)]
    mux: bool,
    /// HTTP/1.1 connections kept to each multiplexing peer beside the
    /// shared one; a request finding all of them busy becomes a stream of
    /// the shared connection (0: every request is a stream).
    #[arg(long, env = "WEFT_PROXY_MUX_LANES", default_value_t = weft_proxy::http::pool::DEFAULT_MUX_LANES)]
    mux_lanes: usize,
    /// This pod's IP.
    #[arg(long, env = "WEFT_POD_IP")]
    pod_ip: Option<IpAddr>,
    #[arg(long, env = "WEFT_OUTBOUND_CAPTURE_PORT", default_value_t = 15001)]
    outbound_port: u16,
    #[arg(long, env = "WEFT_INBOUND_CAPTURE_PORT", default_value_t = 15006)]
    inbound_port: u16,
    #[arg(long, env = "WEFT_ADMIN_PORT", default_value_t = 15020)]
    admin_port: u16,
    /// Extra opaque ports, comma separated.
    #[arg(long, env = "WEFT_OPAQUE_PORTS", value_delimiter = ',')]
    opaque_ports: Vec<u16>,
    /// The app's original probes (JSON, written by the injector).
    #[arg(long, env = "WEFT_APP_PROBES")]
    app_probes: Option<String>,
    /// Log filter (error, warn, info, debug, trace).
    #[arg(long, env = "WEFT_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Drain deadline after SIGTERM, seconds.
    #[arg(long, env = "WEFT_DRAIN_SECONDS", default_value_t = 20)]
    drain_seconds: u64,
    /// Protocol detection timeout, milliseconds.
    #[arg(long, env = "WEFT_DETECT_TIMEOUT_MS", default_value_t = 5000)]
    detect_timeout_ms: u64,
    /// Worker threads serving traffic. 1 (the default) runs everything on
    /// one thread with no work stealing; more cores only pay off for pods
    /// that push several thousand requests per second.
    #[arg(long, env = "WEFT_PROXY_CORES", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    cores: u16,
    /// Largest request head (request line and headers) a client may send,
    /// bytes; over it the client gets 431.
    #[arg(long, env = "WEFT_MAX_HEADER_BYTES", default_value_t = weft_proxy::state::DEFAULT_MAX_HEADER_BYTES as u32, value_parser = clap::value_parser!(u32).range(4096..=262_144))]
    max_header_bytes: u32,
    /// Time an HTTP/1 client has to send a whole request head once it has
    /// started one, milliseconds; 0 turns the limit off.
    #[arg(long, env = "WEFT_HEADER_READ_TIMEOUT_MS", default_value_t = weft_proxy::state::DEFAULT_HEADER_READ_TIMEOUT.as_millis() as u64)]
    header_read_timeout_ms: u64,
    /// An app's plaintext HTTP/1 connection idle between one and two of
    /// this, milliseconds, leaves the runtime until its next bytes (about
    /// 210 bytes of heap instead of 830 meanwhile); while 128 or more are
    /// idle, between one and two hundredths of it; 0 never parks.
    #[arg(long, env = "WEFT_PARK_IDLE_AFTER_MS", default_value_t = weft_proxy::state::DEFAULT_PARK_IDLE_AFTER.as_millis() as u64)]
    park_idle_after_ms: u64,
    /// Where an ingress gateway's certificates are mounted (one directory
    /// per certificate; only read when the config has a gateway section).
    #[arg(long, env = "WEFT_GATEWAY_CERT_DIR", default_value = weft_proxy::state::DEFAULT_GATEWAY_CERT_DIR)]
    gateway_cert_dir: PathBuf,
}

/// Builds the runtime: one thread by default (a sidecar shares its pod's
/// CPU budget; a work-stealing pool costs cross-thread wake-ups and per-thread
/// allocator arenas for nothing at sidecar rates), `cores` workers otherwise.
/// Blocking work (snapshot reloads) gets one thread that exits when idle.
fn runtime(cores: u16) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = if cores <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(usize::from(cores));
        b
    };
    b.enable_all()
        .max_blocking_threads(1)
        .thread_keep_alive(Duration::from_secs(5))
        .thread_name("weft-proxy")
        .build()
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let n = s.strip_suffix('s').unwrap_or(s);
    n.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|e| format!("{s:?}: {e}"))
}

/// Parses the downward API's labels file: `key="value"` per line.
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
        .collect()
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Init(a) => {
            let report = weft_proxy::init::install(&a)?;
            print!("{report}");
            Ok(())
        }
        Cmd::WaitReady {
            timeout,
            admin_port,
        } => wait_ready(timeout, admin_port),
        Cmd::Run(a) => run(a),
    }
}

fn wait_ready(timeout: Duration, port: u16) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        use std::io::{Read, Write};
        let ok = std::net::TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port)))
            .and_then(|mut s| {
                s.write_all(
                    b"GET /ready HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
                )?;
                let mut buf = String::new();
                s.read_to_string(&mut buf)?;
                Ok(buf.starts_with("HTTP/1.1 200"))
            })
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "weft-proxy not ready after {timeout:?}; see `kubectl logs <pod> -c weft-proxy`"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A flag in milliseconds where 0 turns the thing off.
fn millis_or_off(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// The proxy's log filter (`info`, `warn,weft_proxy=debug`): one it
/// cannot read stops the proxy with its reason, rather than logging at a
/// level nobody asked for.
fn log_filter(spec: &str) -> anyhow::Result<tracing_subscriber::EnvFilter> {
    tracing_subscriber::EnvFilter::try_new(spec)
        .with_context(|| format!("--log-level {spec:?}: not a log filter (error, warn, info, debug, trace, or target=level pairs separated by commas)"))
}

fn run(a: RunArgs) -> anyhow::Result<()> {
    // The proxy's own log goes to stderr; stdout carries the access log
    // alone (`accesslog`), so a collector can tell the two apart.
    tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::stderr)
        .with_env_filter(log_filter(&a.log_level)?)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut s = Settings::new(a.config_dir);
    let any = IpAddr::from([0, 0, 0, 0]);
    s.outbound_addr = SocketAddr::new(any, a.outbound_port);
    s.inbound_addr = SocketAddr::new(any, a.inbound_port);
    s.admin_addr = SocketAddr::new(any, a.admin_port);
    s.gateway_cert_dir = a.gateway_cert_dir;
    s.pod_ip = a.pod_ip;
    s.workload = a.workload.filter(|w| !w.is_empty());
    s.access_log_override = match a.access_log.as_deref() {
        Some("all") => Some(Some(false)),
        Some("errors") => Some(Some(true)),
        Some("off") => Some(None),
        _ => None,
    };
    s.max_metric_series = a.max_metric_series;
    s.mux = a.mux;
    s.mux_lanes = a.mux_lanes;
    s.opaque_ports = a.opaque_ports;
    s.drain_timeout = Duration::from_secs(a.drain_seconds);
    s.detect_timeout = Duration::from_millis(a.detect_timeout_ms);
    s.max_header_bytes = a.max_header_bytes as usize;
    s.header_read_timeout = millis_or_off(a.header_read_timeout_ms);
    s.park_idle_after = millis_or_off(a.park_idle_after_ms);
    if let Some(f) = a.labels_file {
        match std::fs::read_to_string(&f) {
            Ok(t) => s.labels = parse_labels(&t),
            Err(e) => {
                tracing::warn!(file = %f.display(), error = %e, "cannot read pod labels; authorization selectors will not match this pod")
            }
        }
    }
    if let Some(p) = a.app_probes.filter(|p| !p.trim().is_empty()) {
        s.app_probes = AppProbes::parse(&p).context("WEFT_APP_PROBES is not valid probe JSON")?;
    }
    let rt = runtime(a.cores)?;
    rt.block_on(async move {
        let proxy = weft_proxy::start(s, Net::default()).await?;
        let state = proxy.state.clone();
        tokio::spawn(async move {
            if let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                term.recv().await;
                tracing::info!("SIGTERM: draining");
                state.begin_shutdown();
            }
        });
        let state = proxy.state.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                state.begin_shutdown();
            }
        });
        proxy.run_until_shutdown().await;
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiplexing_is_on_unless_turned_off() {
        let mux = |args: &[&str]| match Cli::try_parse_from(args).expect("parses").cmd {
            Cmd::Run(r) => r.mux,
            _ => unreachable!("run"),
        };
        assert!(mux(&["weft-proxy", "run"]));
        assert!(!mux(&["weft-proxy", "run", "--mux", "false"]));
        assert!(mux(&["weft-proxy", "run", "--mux", "true"]));
    }

    #[test]
    fn a_log_filter_it_cannot_read_stops_the_proxy_with_its_reason() {
        for ok in ["info", "warn,weft_proxy::outbound=debug", "trace"] {
            assert!(log_filter(ok).is_ok(), "{ok}");
        }
        let e = log_filter("weft_proxy=loud").expect_err("not a level");
        assert!(
            format!("{e:#}").contains("--log-level \"weft_proxy=loud\": not a log filter"),
            "{e:#}"
        );
    }

    #[test]
    fn idle_connections_park_after_a_second_unless_turned_off() {
        let park = |args: &[&str]| match Cli::try_parse_from(args).expect("parses").cmd {
            Cmd::Run(r) => millis_or_off(r.park_idle_after_ms),
            _ => unreachable!("run"),
        };
        assert_eq!(park(&["weft-proxy", "run"]), Some(Duration::from_secs(1)));
        assert_eq!(
            park(&["weft-proxy", "run", "--park-idle-after-ms", "250"]),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            park(&["weft-proxy", "run", "--park-idle-after-ms", "0"]),
            None
        );
    }

    #[test]
    fn downward_api_labels_parse() {
        let l = parse_labels("app=\"cart\"\npod-template-hash=\"5d4\"\n");
        assert_eq!(l.get("app").map(String::as_str), Some("cart"));
        assert_eq!(l.len(), 2);
    }
}
