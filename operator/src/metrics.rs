//! The operator's Prometheus metrics, served on the admin port's `/metrics`.
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `weft_certificates_issued_total` | counter | leaf certificates signed (workloads and the injector) |
//! | `weft_certificate_renewal_failures_total` | counter | reconciles of a certificate that failed |
//! | `weft_certificate_earliest_expiry_seconds` | gauge | Unix time of the earliest `notAfter` among the CA and every issued leaf; alert when it comes close to now |
//! | `weft_identities` | gauge | identity Secrets currently issued |
//! | `weft_identity_restored_total` | counter | identity Secrets, the operator's own certificate Secrets (`weft-injector-tls`, `weft-config-signer`) and the webhook's `caBundle` found changed outside weft and written again (Warning Events `IdentityRestored`, `CABundleRestored`) |
//! | `weft_ca_regenerated_total` | counter | times `weft-ca` was found deleted and a new CA generated, re-issuing every identity (Warning Event `CARegenerated` on the `Mesh`); alert on any increase |

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The operator's metrics and the registry they are served from.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Leaf certificates signed.
    pub certificates_issued: Counter,
    /// Certificate reconciles that failed.
    pub renewal_failures: Counter,
    /// Earliest `notAfter` (Unix seconds) among the CA and issued leaves.
    pub earliest_expiry: Gauge<i64, AtomicI64>,
    /// Identity Secrets currently issued.
    pub identities: Gauge<i64, AtomicI64>,
    /// New CAs generated because `weft-ca` was deleted.
    pub ca_regenerated: Counter,
    /// Identity Secrets, operator certificates and the webhook caBundle
    /// restored after an edit outside weft.
    pub identity_restored: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Self {
        Self::new_with(|_| {})
    }

    /// Like [`Metrics::new`], letting another part of the operator (the
    /// config half's counters) register its metrics in the same registry,
    /// so one `/metrics` serves them all.
    pub fn new_with(extra: impl FnOnce(&mut Registry)) -> Self {
        let mut registry = Registry::with_prefix("weft");
        extra(&mut registry);
        let certificates_issued = Counter::default();
        let renewal_failures = Counter::default();
        let earliest_expiry = Gauge::<i64, AtomicI64>::default();
        let identities = Gauge::<i64, AtomicI64>::default();
        let ca_regenerated = Counter::default();
        let identity_restored = Counter::default();
        registry.register(
            "identity_restored",
            "Identity Secrets, operator certificate Secrets and webhook caBundles changed outside weft and written again",
            identity_restored.clone(),
        );
        registry.register(
            "certificates_issued",
            "Leaf certificates signed by the mesh CA",
            certificates_issued.clone(),
        );
        registry.register(
            "certificate_renewal_failures",
            "Certificate reconciles that failed",
            renewal_failures.clone(),
        );
        registry.register(
            "certificate_earliest_expiry_seconds",
            "Unix time of the earliest notAfter among the CA and every issued leaf",
            earliest_expiry.clone(),
        );
        registry.register(
            "identities",
            "Identity Secrets currently issued",
            identities.clone(),
        );
        registry.register(
            "ca_regenerated",
            "New mesh CAs generated because Secret weft-ca was deleted, re-issuing every identity",
            ca_regenerated.clone(),
        );
        Self {
            registry,
            certificates_issued,
            renewal_failures,
            earliest_expiry,
            identities,
            ca_regenerated,
            identity_restored,
        }
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric() {
        let m = Metrics::new();
        m.certificates_issued.inc();
        m.earliest_expiry.set(1_800_000_000);
        let text = m.render();
        assert!(text.contains("weft_certificates_issued_total 1"), "{text}");
        assert!(
            text.contains("weft_certificate_renewal_failures_total 0"),
            "{text}"
        );
        assert!(
            text.contains("weft_certificate_earliest_expiry_seconds 1800000000"),
            "{text}"
        );
        assert!(text.contains("weft_identities 0"), "{text}");
        assert!(text.contains("weft_ca_regenerated_total 0"), "{text}");
    }

    #[test]
    fn other_parts_register_in_the_same_registry() {
        let extra = Counter::<u64>::default();
        let m = Metrics::new_with(|r| r.register("config_writes", "writes", extra.clone()));
        extra.inc();
        assert!(m.render().contains("weft_config_writes_total 1"));
    }
}
