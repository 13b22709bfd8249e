//! The circuit breaker of a ServicePolicy's `connectionPool.maxRequests`:
//! requests in flight per Service, kept across reloads.
//!
//! In: each outbound HTTP request's destination Service (from
//! `outbound::http`). Out: a [`Slot`] held until the response body is done,
//! or none (the request is refused 503 `overflow`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Requests in flight per Service, for the circuit breaker of a
/// ServicePolicy's `connectionPool.maxRequests`; kept across reloads.
#[derive(Debug, Default)]
pub struct Breakers {
    counts: Mutex<HashMap<String, Arc<AtomicUsize>>>,
}

/// A request counted in flight until dropped.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Breakers {
    /// A slot of `service` if fewer than `max` of its requests are in flight.
    pub fn try_acquire(&self, service: &str, max: usize) -> Option<Slot> {
        let count = {
            let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            match m.get(service) {
                Some(c) => c.clone(),
                None => m.entry(service.to_owned()).or_default().clone(),
            }
        };
        super::limits::increment_below(&count, Some(max)).then(|| Slot(count))
    }
}
