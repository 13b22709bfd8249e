//! Retry budgets per Service (a ServicePolicy's `retryBudget`): how many
//! retries the proxy may add to a Service's traffic, kept across reloads.
//!
//! In: every request to a Service with a budget, and each retry a route's
//! retry policy wants (from `outbound::http`). Out: whether that retry may
//! go.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Retry budgets per Service (a ServicePolicy's `retryBudget`): requests
/// and retries counted in a sliding window of ten slots of a tenth of its
/// `ttl` each; kept across reloads.
#[derive(Debug, Default)]
pub struct RetryBudgets {
    windows: Mutex<HashMap<String, Window>>,
}

#[derive(Debug)]
struct Window {
    origin: Instant,
    slot: Duration,
    /// Per slot: its epoch (slots since `origin`), requests, retries.
    slots: [(u64, u64, u64); 10],
}

impl Window {
    fn new(ttl: Duration, now: Instant) -> Self {
        Window {
            origin: now,
            slot: (ttl / 10).max(Duration::from_millis(1)),
            slots: [(u64::MAX, 0, 0); 10],
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        let n = now.saturating_duration_since(self.origin).as_nanos() / self.slot.as_nanos();
        u64::try_from(n).unwrap_or(u64::MAX - 1)
    }

    fn current(&mut self, now: Instant) -> &mut (u64, u64, u64) {
        let e = self.epoch(now);
        let s = &mut self.slots[(e % 10) as usize];
        if s.0 != e {
            *s = (e, 0, 0);
        }
        s
    }

    /// Requests and retries in the window.
    fn totals(&self, now: Instant) -> (u64, u64) {
        let e = self.epoch(now);
        self.slots
            .iter()
            .filter(|s| s.0 != u64::MAX && s.0 <= e && e - s.0 < 10)
            .fold((0, 0), |(q, r), s| (q + s.1, r + s.2))
    }
}

impl RetryBudgets {
    fn with<T>(
        &self,
        service: &str,
        budget: &weft_proxy_config::RetryBudget,
        now: Instant,
        f: impl FnOnce(&mut Window) -> T,
    ) -> T {
        let ttl = Duration::from_millis(budget.ttl_ms.max(1));
        let mut m = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let w = m
            .entry(service.to_owned())
            .or_insert_with(|| Window::new(ttl, now));
        if w.slot != (ttl / 10).max(Duration::from_millis(1)) {
            *w = Window::new(ttl, now);
        }
        f(w)
    }

    /// Counts a request to `service`.
    pub fn request(&self, service: &str, budget: &weft_proxy_config::RetryBudget, now: Instant) {
        self.with(service, budget, now, |w| w.current(now).1 += 1);
    }

    /// Takes one retry from `service`'s budget if it has one left: retries
    /// in the window stay below `minRetriesPerSecond` × ttl or
    /// `retryPercent` of the window's requests, whichever is more.
    pub fn try_retry(
        &self,
        service: &str,
        budget: &weft_proxy_config::RetryBudget,
        now: Instant,
    ) -> bool {
        self.with(service, budget, now, |w| {
            let (requests, retries) = w.totals(now);
            let ttl_s = Duration::from_millis(budget.ttl_ms.max(1)).as_secs_f64();
            let allowed = (f64::from(budget.min_retries_per_second) * ttl_s)
                .max(budget.retry_percent / 100.0 * requests as f64);
            if (retries as f64) < allowed {
                w.current(now).2 += 1;
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retry_budget_allows_its_share_and_refills_as_the_window_slides() {
        let b = weft_proxy_config::RetryBudget {
            retry_percent: 20.0,
            min_retries_per_second: 1,
            ttl_ms: 10_000,
        };
        let budgets = RetryBudgets::default();
        let now = Instant::now();
        // No requests yet: the floor, 1/s over 10 s.
        let floor = (0..20)
            .filter(|_| budgets.try_retry("shop/cart", &b, now))
            .count();
        assert_eq!(floor, 10);
        // 100 requests: 20 % of them, of which 10 are spent.
        for _ in 0..100 {
            budgets.request("shop/cart", &b, now);
        }
        let more = (0..20)
            .filter(|_| budgets.try_retry("shop/cart", &b, now))
            .count();
        assert_eq!(more, 10);
        assert!(!budgets.try_retry("shop/cart", &b, now));
        // Another service has its own budget.
        assert!(budgets.try_retry("shop/other", &b, now));
        // Once the window has passed, the floor is back.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(budgets.try_retry("shop/cart", &b, Instant::now()));
    }
}
