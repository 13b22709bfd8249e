//! weft-proxy: the sidecar of every meshed pod.
//!
//! ```text
//!  app ──► iptables (init) ──► :15001 outbound ──mTLS, ALPN──► peer :15006 inbound ──► app :port
//!                                   ▲                                ▲
//!                      snapshot (proxy.json + identity), reloaded on kubelet's ..data swap
//!  kubelet ──► :15020 admin (/ready, /live, /metrics, /app-health; loopback only: /config, /certs, /shutdown)
//! ```
//!
//! The module tree follows a request, and imports point down it:
//!
//! ```text
//! app            start(): binds the listeners, first load, tasks; graceful shutdown
//! gateway        an ingress gateway's listeners (TLS by SNI, route by host)
//! outbound  inbound  admin  reload      the listeners and the mount watcher
//! client         client policy: balance, outliers, breakers, budgets,
//!                connection limits, connect (TCP, mTLS, pooled HTTP)
//! state          Settings, Net, State (per process: snapshot slot, pools,
//!                policy counters, rate-limit buckets, shutdown and drain)
//! snapshot       per config generation: load_dir, routes, destinations
//! http  tls      HTTP plumbing (bodies, server, framing, paths, pools);
//!                identities, peer verification, config signatures
//! net  metrics  trace  accesslog  ratelimit  probes  init
//!                sockets, accept, detection; counters and golden metrics;
//!                trace context, spans, OTLP export; access log lines;
//!                token buckets; app probes; iptables
//! ```
//!
//! [`init`] installs capture; [`net`] accepts, finds where a captured
//! connection was going and detects its protocol; [`outbound`] routes,
//! balances and connects through [`client`]; [`inbound`] terminates mTLS,
//! authorizes and delivers to the app; [`http`] and [`tls`] are the
//! plumbing both share. [`snapshot`] and [`reload`] keep the config and
//! identity current; [`admin`] and [`metrics`] make it observable; [`app`]
//! assembles a running proxy, in-process for tests.

pub mod accesslog;
pub mod admin;
pub mod app;
pub mod client;
pub mod gateway;
pub mod http;
pub mod inbound;
pub mod init;
pub mod metrics;
pub mod net;
pub mod outbound;
pub mod probes;
#[cfg(test)]
mod prop_tests;
pub mod ratelimit;
pub mod reload;
pub mod snapshot;
pub mod state;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
pub mod tls;
pub mod trace;

pub use app::{Proxy, StartError, start};
pub use state::{Net, Settings, State};
