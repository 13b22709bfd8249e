//! Assembling a running proxy: settings, shared state, the three listeners,
//! the reload watcher, and graceful shutdown.
//!
//! ```text
//!             ┌──────────── State (ArcSwap<Snapshot>, metrics, pools) ────────────┐
//! :15001 ──► outbound::serve        :15006 ──► inbound::serve        :15020 ──► admin::serve
//!                       reload::watch (..data swap) ──► State::publish
//! ```
//!
//! [`start`] is what `weft-proxy run` calls and what component tests call
//! in-process, with their own [`Net`].

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rustls::pki_types::UnixTime;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::http::pool::Pools;
use crate::metrics::Metrics;
use crate::net::{Dialer, DirectDialer, OrigDst, orig_dst::SoOriginalDst};
use crate::probes::AppProbes;
use crate::snapshot::{Snapshot, SnapshotError, load_dir};

/// Everything a proxy is started with. Built from flags/env by the binary,
/// directly by tests.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The mount with `..data`, `proxy.json[.gz]`, `tls.crt`, `tls.key`, `ca.crt`.
    pub config_dir: PathBuf,
    /// Outbound capture listener (15001).
    pub outbound_addr: SocketAddr,
    /// Inbound capture listener (15006).
    pub inbound_addr: SocketAddr,
    /// Admin listener (15020).
    pub admin_addr: SocketAddr,
    /// Where inbound traffic is delivered to the app (loopback).
    pub app_host: IpAddr,
    /// This pod's IP, for loop detection.
    pub pod_ip: Option<IpAddr>,
    /// This pod's labels (authorization selectors).
    pub labels: BTreeMap<String, String>,
    /// Extra opaque ports (annotation), on top of the server-first list.
    pub opaque_ports: Vec<u16>,
    /// How long to wait for a client's first bytes.
    pub detect_timeout: Duration,
    /// Connect timeout per endpoint attempt.
    pub connect_timeout: Duration,
    /// How long in-flight work may finish after shutdown starts.
    pub drain_timeout: Duration,
    /// The app's original probes.
    pub app_probes: AppProbes,
    /// Largest request head a client may send on any HTTP connection the
    /// proxy serves (HTTP/1: request line and header lines; HTTP/2: the
    /// decoded header list). Over it: 431, and an HTTP/1 connection closes.
    pub max_header_bytes: usize,
    /// How long an HTTP/1 client may take to send a whole request head,
    /// counted from its first byte (an idle keep-alive connection is not
    /// sending one). Past it the connection closes. `None`: no limit.
    pub header_read_timeout: Option<Duration>,
}

/// Default of [`Settings::max_header_bytes`]: 60 KiB, room for large cookies
/// and tokens while bounding what one client makes the proxy buffer.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 60 * 1024;
/// Default of [`Settings::header_read_timeout`].
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

impl Settings {
    /// Defaults for the given mount dir, listening on the standard ports.
    pub fn new(config_dir: PathBuf) -> Self {
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        Settings {
            config_dir,
            outbound_addr: SocketAddr::new(any, 15001),
            inbound_addr: SocketAddr::new(any, 15006),
            admin_addr: SocketAddr::new(any, 15020),
            app_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            pod_ip: None,
            labels: BTreeMap::new(),
            opaque_ports: Vec::new(),
            detect_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            drain_timeout: Duration::from_secs(20),
            app_probes: AppProbes::default(),
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            header_read_timeout: Some(DEFAULT_HEADER_READ_TIMEOUT),
        }
    }

    /// Same settings, every listener on an ephemeral port of `ip` (tests).
    pub fn ephemeral(mut self, ip: IpAddr) -> Self {
        self.outbound_addr = SocketAddr::new(ip, 0);
        self.inbound_addr = SocketAddr::new(ip, 0);
        self.admin_addr = SocketAddr::new(ip, 0);
        self
    }
}

/// How the proxy meets the network: production uses `SO_ORIGINAL_DST` and
/// plain connects; tests stamp destinations (see `net::stamp`).
#[derive(Clone, Debug)]
pub struct Net {
    /// Original-destination lookup for the outbound listener.
    pub outbound_orig_dst: Arc<dyn OrigDst>,
    /// Original-destination lookup for the inbound listener.
    pub inbound_orig_dst: Arc<dyn OrigDst>,
    /// Outgoing connections.
    pub dialer: Arc<dyn Dialer>,
}

impl Default for Net {
    fn default() -> Self {
        Net {
            outbound_orig_dst: Arc::new(SoOriginalDst),
            inbound_orig_dst: Arc::new(SoOriginalDst),
            dialer: Arc::new(DirectDialer),
        }
    }
}

/// State shared by every listener and task.
#[derive(Debug)]
pub struct State {
    /// Settings.
    pub settings: Settings,
    /// Network hooks.
    pub net: Net,
    /// The active snapshot (none until the first good load).
    pub snapshot: ArcSwapOption<Snapshot>,
    /// Metrics.
    pub metrics: Metrics,
    /// Pools to endpoints and peer proxies.
    pub outbound_pools: Pools,
    /// Pools to the local app.
    pub inbound_pools: Pools,
    /// Inbound rate-limit buckets (kept across reloads).
    pub inbound_limits: crate::inbound::ratelimit::Limiters,
    /// Endpoints ejected after a failed connection (passive health).
    pub outliers: crate::outbound::Outliers,
    /// Requests in flight per Service (connectionPool.maxRequests).
    pub breakers: crate::outbound::Breakers,
    /// Retry budgets per Service (retryBudget).
    pub retry_budgets: crate::outbound::RetryBudgets,
    /// Open connections per Service (connectionPool.maxConnections).
    pub conn_limits: crate::limits::ConnLimits,
    /// Bound listener addresses: [outbound, inbound, admin].
    pub listeners: Mutex<Vec<SocketAddr>>,
    listening: AtomicBool,
    rr: AtomicUsize,
    shutdown: watch::Sender<bool>,
    published: watch::Sender<u64>,
    drain: Mutex<Option<mpsc::Sender<()>>>,
}

impl State {
    /// Publishes a good snapshot and updates its metrics.
    pub fn publish(&self, snap: Snapshot) {
        let m = &self.metrics;
        if let Some(old) = self.snapshot.load_full() {
            m.config_info.remove(&crate::metrics::ConfigLabels {
                hash: old.config.hash.clone(),
            });
        }
        m.config_generation.set(snap.config.generation as i64);
        m.config_info
            .get_or_create(&crate::metrics::ConfigLabels {
                hash: snap.config.hash.clone(),
            })
            .set(1);
        m.cert_expiry.set(snap.identity.not_after());
        tracing::info!(
            generation = snap.config.generation,
            hash = %snap.config.hash,
            identity = %snap.identity.id(),
            source = %snap.source.display(),
            "snapshot active"
        );
        self.snapshot.store(Some(Arc::new(snap)));
        self.published.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that changes each time a snapshot is published: open
    /// connections re-check themselves against the new one.
    pub fn snapshot_changes(&self) -> watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// Loads the mount and publishes it; a bad snapshot is logged, counted
    /// and dropped, and the previous one keeps serving.
    pub fn reload(&self) -> Result<(), SnapshotError> {
        match load_dir(&self.settings.config_dir, UnixTime::now()) {
            Ok(s) => {
                self.metrics.reload(true);
                self.publish(s);
                Ok(())
            }
            Err(e) => {
                self.metrics.reload(false);
                self.metrics
                    .config_rejected
                    .get_or_create(&crate::metrics::RejectLabels { reason: e.reason() })
                    .inc();
                tracing::error!(error = %e, reason = e.reason(), "rejected new config/identity snapshot; the previous one keeps serving");
                Err(e)
            }
        }
    }

    /// Ready: a snapshot is active, listeners are bound, not shutting down.
    pub fn is_ready(&self) -> bool {
        self.snapshot.load().is_some()
            && self.listening.load(Ordering::Acquire)
            && !*self.shutdown.borrow()
    }

    /// A per-Service round-robin counter (one shared counter is enough for
    /// fairness within each Service's endpoint list).
    pub fn next_rr(&self) -> usize {
        self.rr.fetch_add(1, Ordering::Relaxed)
    }

    /// A receiver that flips to `true` when shutdown starts.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Starts graceful shutdown.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// A token held by every connection task; shutdown waits for all of
    /// them (or the drain deadline).
    pub fn drain_token(&self) -> Option<mpsc::Sender<()>> {
        self.drain.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether `dst` is one of this proxy's own listeners (a loop).
    pub fn is_own_listener(&self, dst: SocketAddr) -> bool {
        let listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        listeners.iter().any(|l| {
            l.port() == dst.port()
                && (l.ip() == dst.ip()
                    || dst.ip().is_loopback()
                    || Some(dst.ip()) == self.settings.pod_ip
                    || (l.ip().is_unspecified() && dst.ip().is_unspecified()))
        })
    }
}

/// Resolves once shutdown has started (at once if it already has).
pub async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind.
    #[error("cannot listen on {addr} ({what}): {source}; is another proxy running in this pod?")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    /// Shared state (tests read the snapshot and metrics from it).
    pub state: Arc<State>,
    /// Bound outbound address.
    pub outbound_addr: SocketAddr,
    /// Bound inbound address.
    pub inbound_addr: SocketAddr,
    /// Bound admin address.
    pub admin_addr: SocketAddr,
    drained: Mutex<Option<mpsc::Receiver<()>>>,
    tasks: Vec<JoinHandle<()>>,
}

/// Binds the listeners, loads the first snapshot, starts the watcher.
pub async fn start(settings: Settings, net: Net) -> Result<Proxy, StartError> {
    // `0.0.0.0` binds dual-stack `[::]`: IPv6 captures reach the same listeners.
    let bind = |what: &'static str, addr: SocketAddr| {
        crate::net::bind_listener(addr).map_err(|source| StartError::Bind { what, addr, source })
    };
    let outbound = bind("outbound", settings.outbound_addr)?;
    let inbound = bind("inbound", settings.inbound_addr)?;
    let admin = bind("admin", settings.admin_addr)?;
    let addr = |l: &TcpListener, what, a| {
        l.local_addr().map_err(|source| StartError::Bind {
            what,
            addr: a,
            source,
        })
    };
    let outbound_addr = addr(&outbound, "outbound", settings.outbound_addr)?;
    let inbound_addr = addr(&inbound, "inbound", settings.inbound_addr)?;
    let admin_addr = addr(&admin, "admin", settings.admin_addr)?;

    let (shutdown, _) = watch::channel(false);
    let (drain_tx, drain_rx) = mpsc::channel(1);
    let state = Arc::new(State {
        settings,
        net,
        snapshot: ArcSwapOption::empty(),
        metrics: Metrics::default(),
        outbound_pools: Pools::default(),
        inbound_pools: Pools::default(),
        inbound_limits: Default::default(),
        outliers: crate::outbound::Outliers::default(),
        breakers: crate::outbound::Breakers::default(),
        retry_budgets: crate::outbound::RetryBudgets::default(),
        conn_limits: crate::limits::ConnLimits::default(),
        listeners: Mutex::new(vec![outbound_addr, inbound_addr, admin_addr]),
        listening: AtomicBool::new(false),
        rr: AtomicUsize::new(0),
        shutdown,
        published: watch::channel(0).0,
        drain: Mutex::new(Some(drain_tx)),
    });
    if let Err(e) = state.reload() {
        tracing::error!(error = %e, "no usable config/identity yet; not ready until the mount holds a good snapshot");
    }
    let tasks = vec![
        tokio::spawn(crate::outbound::serve(state.clone(), outbound)),
        tokio::spawn(crate::inbound::serve(state.clone(), inbound)),
        tokio::spawn(crate::admin::serve(state.clone(), admin)),
        tokio::spawn(crate::reload::watch(state.clone())),
        tokio::spawn(sweep_pools(Arc::downgrade(&state))),
    ];
    state.listening.store(true, Ordering::Release);
    Ok(Proxy {
        state,
        outbound_addr,
        inbound_addr,
        admin_addr,
        drained: Mutex::new(Some(drain_rx)),
        tasks,
    })
}

/// Once a second, closes pooled connections past their idle timeout and
/// forgets unused pools; ends with the proxy.
async fn sweep_pools(state: std::sync::Weak<State>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else { return };
        let now = std::time::Instant::now();
        state.outbound_pools.sweep(now);
        state.inbound_pools.sweep(now);
    }
}

impl Proxy {
    /// Waits until shutdown is requested (SIGTERM or `POST /shutdown`
    /// call [`State::begin_shutdown`]), then drains.
    pub async fn run_until_shutdown(self) {
        let mut sig = self.state.shutdown_signal();
        while !*sig.borrow_and_update() {
            if sig.changed().await.is_err() {
                break;
            }
        }
        self.drain().await;
    }

    /// Stops accepting, lets in-flight connections finish until the drain
    /// deadline, then stops everything.
    pub async fn drain(self) {
        self.state.begin_shutdown();
        self.state
            .drain
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let rx = self
            .drained
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut rx) = rx {
            let deadline = self.state.settings.drain_timeout;
            if tokio::time::timeout(deadline, rx.recv()).await.is_err() {
                tracing::warn!(
                    ?deadline,
                    "drain deadline reached with connections still open; closing them"
                );
            }
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}
