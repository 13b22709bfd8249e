//! Prometheus metrics of the injector, served at `/metrics`.
//!
//! - `weft_injector_admissions_total{result}`: `injected`, `skipped`,
//!   `denied` (a review answered with a denial) and `invalid` (HTTP 4xx: not
//!   an AdmissionReview, too large, too slow);
//! - `weft_injector_admission_duration_seconds`: handling time of `/inject`,
//!   from the full body being read to the response being built;
//! - `weft_injector_cert_reloads_total{result}` and
//!   `weft_injector_mesh_updates_total{result}`.

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type ResultLabel = [(&'static str, &'static str); 1];

/// The injector's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    admissions: Family<ResultLabel, Counter>,
    latency: Histogram,
    cert_reloads: Family<ResultLabel, Counter>,
    mesh_updates: Family<ResultLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weft_injector");
        let admissions = Family::<ResultLabel, Counter>::default();
        registry.register(
            "admissions",
            "AdmissionReviews handled, by result",
            admissions.clone(),
        );
        // 50µs .. ~0.4s
        let latency = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            0.000_05, 2.0, 14,
        ));
        registry.register_with_unit(
            "admission_duration",
            "Time to decide an AdmissionReview",
            prometheus_client::registry::Unit::Seconds,
            latency.clone(),
        );
        let cert_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "cert_reloads",
            "Serving certificate reloads, by result",
            cert_reloads.clone(),
        );
        let mesh_updates = Family::<ResultLabel, Counter>::default();
        registry.register(
            "mesh_updates",
            "Mesh resource changes applied to injection defaults, by result",
            mesh_updates.clone(),
        );
        Self {
            registry,
            admissions,
            latency,
            cert_reloads,
            mesh_updates,
        }
    }

    /// Counts one admission with its result and handling time.
    pub fn admission(&self, result: &'static str, took: Duration) {
        self.admissions.get_or_create(&[("result", result)]).inc();
        self.latency.observe(took.as_secs_f64());
    }

    /// Counts one admission that could not be timed (rejected before decoding).
    pub fn admission_invalid(&self) {
        self.admissions
            .get_or_create(&[("result", "invalid")])
            .inc();
    }

    /// Counts one certificate reload attempt.
    pub fn cert_reload(&self, result: &'static str) {
        self.cert_reloads.get_or_create(&[("result", result)]).inc();
    }

    /// Counts one `Mesh` update.
    pub fn mesh_update(&self, result: &'static str) {
        self.mesh_updates.get_or_create(&[("result", result)]).inc();
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
