//! Client policy: what the proxy decides as a client of upstream
//! endpoints, for both directions, with state kept per process (across
//! config reloads).
//!
//! ```text
//! routed destination (snapshot::dest::Dest)
//!   ──► breakers (connectionPool.maxRequests) ──► budgets (retryBudget)
//!   ──► balance::attempt_order (load balancer over endpoints not ejected by outliers)
//!   ──► connect::acquire (limits: maxConnections, maxPendingRequests; pool; TCP, mTLS)
//!   ──► answer ──► outliers::Outliers::judge (passive health, outlierDetection)
//! ```
//!
//! In: a destination resolved from the active snapshot and the per-process
//! counters. Out: an endpoint order, a connection (or why not), verdicts on
//! endpoints. Below the listeners (`outbound`, `inbound`) that call it,
//! above the plumbing it uses (`http::pool`, `net`, `tls`, `snapshot`).

pub mod balance;
pub mod breakers;
pub mod budgets;
pub mod connect;
pub mod limits;
pub mod outliers;
