//! Passive health of endpoints: which to keep out of the balancer's
//! choice for a while. A refused or black-holed connection ejects an
//! endpoint for [`EJECTION`]; a ServicePolicy's `outlierDetection` ejects
//! one after a streak of 5xx or gateway errors ([`Outliers::judge`]).
//!
//! In: answers and connect failures of endpoints (from `outbound::http`,
//! `outbound::tcp`). Out: [`Outliers::is_ejected`], read by
//! [`super::balance::attempt_order`]. Kept across reloads: a dead pod stays
//! listed until kubelet delivers a config without it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;

use crate::metrics::{Direction, Metrics};
use crate::snapshot::dest::Dest;
use crate::snapshot::services::endpoint_port;

/// How long an endpoint that refused or black-holed a connection is kept
/// out of the balancer's choice (unless every endpoint is ejected).
pub const EJECTION: Duration = Duration::from_secs(30);

/// Passive health: endpoints whose last connection attempt failed (refused,
/// unreachable, timed out), each until a deadline. Shared by every
/// snapshot, since a dead pod stays listed until kubelet delivers a config
/// without it. The common case (nothing ejected) costs one atomic load.
#[derive(Debug, Default)]
pub struct Outliers {
    any: AtomicBool,
    until: Mutex<HashMap<SocketAddr, Instant>>,
    /// Failure streaks, for the outlier detection of ServicePolicies.
    streaks: Mutex<HashMap<SocketAddr, Streak>>,
}

/// An endpoint's answers since its last good one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Streak {
    /// Consecutive 5xx answers.
    pub server_errors: u32,
    /// Consecutive 502/503/504 answers.
    pub gateway_errors: u32,
    /// Ejections since its last good answer.
    pub ejections: u32,
}

impl Outliers {
    /// Ejects `addr` for [`EJECTION`] from `now`, or longer when it is
    /// already ejected for longer (by outlier detection).
    pub fn eject(&self, addr: SocketAddr, now: Instant) {
        let mut m = self.until.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, t| *t > now);
        let until = m.entry(addr).or_insert(now);
        *until = (*until).max(now + EJECTION);
        self.any.store(true, Ordering::Release);
    }

    /// Ejects `addr` for `how_long` from `now`.
    pub fn eject_for(&self, addr: SocketAddr, now: Instant, how_long: Duration) {
        let mut m = self.until.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, t| *t > now);
        m.insert(addr, now + how_long);
        self.any.store(true, Ordering::Release);
    }

    /// Counts a 5xx answer of `addr` (a gateway error when 502–504); the
    /// streak so far.
    pub fn failed(&self, addr: SocketAddr, gateway: bool) -> Streak {
        let mut m = self.streaks.lock().unwrap_or_else(|p| p.into_inner());
        let s = m.entry(addr).or_default();
        s.server_errors += 1;
        if gateway {
            s.gateway_errors += 1;
        } else {
            s.gateway_errors = 0;
        }
        *s
    }

    /// `addr` was ejected for its streak: the streak starts over, the
    /// ejection count (which lengthens the next ejection) goes up.
    pub fn tripped(&self, addr: SocketAddr) {
        let mut m = self.streaks.lock().unwrap_or_else(|p| p.into_inner());
        let s = m.entry(addr).or_default();
        *s = Streak {
            ejections: s.ejections.saturating_add(1),
            ..Streak::default()
        };
    }

    /// `addr` answered well: no streak, and it takes traffic again.
    pub fn healthy(&self, addr: SocketAddr) {
        {
            let mut m = self.streaks.lock().unwrap_or_else(|p| p.into_inner());
            if !m.is_empty() {
                m.remove(&addr);
            }
        }
        self.restore(addr);
    }

    /// Whether `addr` is ejected at `now`.
    pub fn is_ejected(&self, addr: SocketAddr, now: Instant) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let m = self.until.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&addr).is_some_and(|t| *t > now)
    }

    /// `addr` answered: take it back at once.
    pub fn restore(&self, addr: SocketAddr) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let mut m = self.until.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(&addr);
        if m.is_empty() {
            self.any.store(false, Ordering::Release);
        }
    }
}

impl Outliers {
    /// Passive health from an answer of `addr`: without outlier detection
    /// any answer takes the endpoint back; with it, a 5xx extends its
    /// streak and a streak at the policy's threshold ejects it for the base
    /// ejection time times its ejections so far, unless that would eject
    /// more than the policy's share of the destination's endpoints.
    pub fn judge(&self, metrics: &Metrics, dest: &Dest<'_>, addr: SocketAddr, status: StatusCode) {
        let Some(od) = dest.service.policy.outlier_detection.as_ref() else {
            self.restore(addr);
            return;
        };
        let code = status.as_u16();
        if code < 500 {
            self.healthy(addr);
            return;
        }
        self.extend_streak(metrics, dest, od, addr, (502..=504).contains(&code));
    }

    /// A connection to `addr` could not be made (refused, unreachable,
    /// timed out): under outlier detection it counts as a gateway error in
    /// the endpoint's streak, as a 503 would.
    pub fn judge_connect_failure(&self, metrics: &Metrics, dest: &Dest<'_>, addr: SocketAddr) {
        if let Some(od) = dest.service.policy.outlier_detection.as_ref() {
            self.extend_streak(metrics, dest, od, addr, true);
        }
    }

    fn extend_streak(
        &self,
        metrics: &Metrics,
        dest: &Dest<'_>,
        od: &weft_proxy_config::OutlierDetection,
        addr: SocketAddr,
        gateway: bool,
    ) {
        let streak = self.failed(addr, gateway);
        let reached = |limit: Option<u32>, n: u32| limit.is_some_and(|k| k > 0 && n >= k);
        if !(reached(od.consecutive_5xx, streak.server_errors)
            || reached(od.consecutive_gateway_errors, streak.gateway_errors))
        {
            return;
        }
        let now = Instant::now();
        let total = dest.endpoints.len();
        let ejected = dest
            .endpoints
            .iter()
            .filter(|e| {
                self.is_ejected(SocketAddr::new(e.address, endpoint_port(e, dest.port)), now)
            })
            .count();
        if (ejected + 1) * 100 > od.max_ejection_percent as usize * total {
            tracing::debug!(%addr, service = %dest.service.key(), "outlier detection would eject more than maxEjectionPercent; keeping the endpoint");
            return;
        }
        self.tripped(addr);
        let how_long = ejection_time(
            od.base_ejection_ms,
            streak.ejections.saturating_add(1),
            od.interval_ms,
        );
        self.eject_for(addr, now, how_long);
        metrics.error(Direction::Outbound, "outlier-ejection");
        tracing::warn!(%addr, service = %dest.service.key(), server_errors = streak.server_errors, gateway_errors = streak.gateway_errors, ?how_long, "endpoint ejected by outlier detection");
    }
}

/// How long the `times`-th ejection in a row lasts: the base ejection time
/// times `times` (at most 10), rounded up to whole `interval`s, since
/// ejections are reconsidered once per interval.
pub fn ejection_time(base_ms: u64, times: u32, interval_ms: u64) -> Duration {
    let raw = base_ms.saturating_mul(u64::from(times.clamp(1, 10)));
    let rounded = match interval_ms {
        0 => raw,
        i => raw.div_ceil(i).saturating_mul(i),
    };
    Duration::from_millis(rounded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outlier_ejections_last_whole_intervals_and_grow_with_each_ejection() {
        let s = Duration::from_secs;
        assert_eq!(ejection_time(30_000, 1, 10_000), s(30));
        // Reconsidered once per interval: rounded up to the next one.
        assert_eq!(ejection_time(25_000, 1, 10_000), s(30));
        assert_eq!(ejection_time(25_000, 2, 10_000), s(50));
        assert_eq!(ejection_time(1_500, 1, 1_000), s(2));
        // At most ten times the base.
        assert_eq!(ejection_time(1_000, 20, 1), s(10));
        assert_eq!(ejection_time(1_000, 0, 1), s(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fixed_ejection_never_shortens_a_longer_one() {
        let o = Outliers::default();
        let a: SocketAddr = "10.244.0.5:8080".parse().expect("addr");
        o.eject_for(a, Instant::now(), EJECTION * 4);
        o.eject(a, Instant::now());
        tokio::time::advance(EJECTION * 2).await;
        assert!(o.is_ejected(a, Instant::now()));
        tokio::time::advance(EJECTION * 2).await;
        assert!(!o.is_ejected(a, Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_expires_and_restore_takes_back_at_once() {
        let o = Outliers::default();
        let a: SocketAddr = "10.244.0.5:8080".parse().expect("addr");
        let b: SocketAddr = "10.244.0.6:8080".parse().expect("addr");
        assert!(!o.is_ejected(a, Instant::now()));
        o.eject(a, Instant::now());
        assert!(o.is_ejected(a, Instant::now()));
        assert!(!o.is_ejected(b, Instant::now()));
        tokio::time::advance(EJECTION + Duration::from_millis(1)).await;
        assert!(!o.is_ejected(a, Instant::now()));
        o.eject(b, Instant::now());
        o.restore(b);
        assert!(!o.is_ejected(b, Instant::now()));
    }
}
