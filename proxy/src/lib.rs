//! weft-proxy: the sidecar of every meshed pod.
//!
//! ```text
//!  app ──► iptables (init) ──► :15001 outbound ──mTLS, ALPN──► peer :15006 inbound ──► app :port
//!                                   ▲                                ▲
//!                      snapshot (proxy.json + identity), reloaded on kubelet's ..data swap
//!  kubelet ──► :15020 admin (/ready, /live, /metrics, /app-health; loopback only: /config, /certs, /shutdown)
//! ```
//!
//! The module tree follows a request: [`init`] installs capture; [`net`]
//! finds where a captured connection was going; [`outbound`] detects the
//! protocol, balances over endpoints and connects ([`connect`], [`tls`]);
//! [`inbound`] terminates mTLS, authorizes and delivers to the app; [`http`]
//! holds the forwarding plumbing both share. [`snapshot`] and [`reload`]
//! keep the config and identity current; [`admin`] and [`metrics`] make it
//! observable; [`proxy`] assembles a running proxy, in-process for tests.

pub mod admin;
pub mod connect;
pub mod http;
pub mod inbound;
pub mod init;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod outbound;
pub mod probes;
#[cfg(test)]
mod prop_tests;
pub mod proxy;
pub mod reload;
pub mod snapshot;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
pub mod tls;

pub use proxy::{Net, Proxy, Settings, State, start};
