//! Assembling a running proxy: bind the three listeners, load the first
//! snapshot, start the listeners, the reload watcher and the pool sweeper;
//! graceful shutdown.
//!
//! ```text
//!             ┌──────────── State (ArcSwap<Snapshot>, metrics, client policy) ────────────┐
//! :15001 ──► outbound::serve        :15006 ──► inbound::serve        :15020 ──► admin::serve
//!                       reload::watch (..data swap) ──► State::reload ──► State::publish
//! ```
//!
//! The top of the crate: it imports every listener and nothing imports it
//! but `main` and lib's re-exports. [`start`] is what `weft-proxy run` calls
//! and what component tests call in-process, with their own [`Net`].

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::state::{Net, Settings, State};

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
    /// The access log writer's thread could not start.
    #[error("cannot start the access log writer thread: {source}")]
    Thread {
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

    let (state, drain_rx, log_rx, span_rx) =
        State::new(settings, net, vec![outbound_addr, inbound_addr, admin_addr]);
    let state = Arc::new(state);
    if let Err(e) = state.reload() {
        tracing::error!(error = %e, "no usable config/identity yet; not ready until the mount holds a good snapshot");
    }
    crate::accesslog::spawn_writer(log_rx, state.settings.access_log_output.clone())
        .map_err(|source| StartError::Thread { source })?;
    let tasks = vec![
        tokio::spawn(crate::outbound::serve(state.clone(), outbound)),
        tokio::spawn(crate::inbound::serve(state.clone(), inbound)),
        tokio::spawn(crate::admin::serve(state.clone(), admin)),
        tokio::spawn(crate::reload::watch(state.clone())),
        tokio::spawn(crate::gateway::serve(state.clone())),
        tokio::spawn(sweep_pools(Arc::downgrade(&state))),
        tokio::spawn(state.clone().run_parking()),
        tokio::spawn(crate::trace::export::run(
            span_rx,
            span_target(Arc::downgrade(&state)),
            state.net.dialer.clone(),
            state.metrics.span_export.clone(),
        )),
    ];
    state.set_listening();
    Ok(Proxy {
        state,
        outbound_addr,
        inbound_addr,
        admin_addr,
        drained: Mutex::new(Some(drain_rx)),
        tasks,
    })
}

/// Where spans go, read per batch from the active snapshot: none while the
/// Mesh sets no OTLP endpoint.
fn span_target(
    state: std::sync::Weak<State>,
) -> impl Fn() -> Option<crate::trace::export::Target> + Send {
    move || {
        let state = state.upgrade()?;
        let snap = state.snapshot.load_full()?;
        let tracing = snap.config.mesh.tracing.as_ref()?;
        Some(crate::trace::export::Target {
            endpoint: tracing.otlp_endpoint.clone(),
            resource: state.trace_resource(&snap),
        })
    }
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
        self.state.close_drain();
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
