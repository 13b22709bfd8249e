//! Proxy telemetry in Prometheus text format, served at `:15020/metrics`.
//!
//! Two kinds: the proxy's own counters here (`weft_proxy_*`: connections,
//! failed steps, route events, reloads; labels bounded to direction, TLS
//! yes/no, status code, step and result), and the golden traffic metrics
//! by source and destination workload in [`traffic`] (`weft_*` and/or
//! `istio_*`).

pub mod traffic;

use std::sync::OnceLock;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Traffic direction; the label value is lower case (`outbound`,
/// `inbound`), as Prometheus label values conventionally are.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// Leaving the pod (listener 15001).
    Outbound,
    /// Entering the pod (listener 15006).
    Inbound,
}

impl Direction {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

impl EncodeLabelValue for Direction {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// Labels of the Audit-mode authorization counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuditLabels {
    /// The AccessPolicy (of the pod's namespace) that would refuse.
    pub policy: String,
}

/// Labels of connection counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    /// Direction.
    pub direction: Direction,
    /// `true` when the mesh side of the connection is mTLS.
    pub tls: bool,
}

/// Labels of the mTLS handshake counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `outbound`: this proxy dialled; `inbound`: a peer dialled it.
    pub direction: Direction,
    /// `full` (certificates exchanged and verified) or `resumed` (a
    /// session ticket of an earlier full handshake between the same two
    /// identities).
    pub kind: &'static str,
}

/// Labels of request counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Direction.
    pub direction: Direction,
    /// HTTP status code.
    pub code: u16,
}

/// Labels of failure counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Direction.
    pub direction: Direction,
    /// The failed step (`connect`, `tls`, `identity-mismatch`, `loop`, …).
    pub step: String,
}

/// Labels of route policy counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteEventLabels {
    /// The route (`<ServiceRoute>/<rule>`).
    pub route: String,
    /// `retry`, `retry-budget-exhausted`, `timeout`, `per-try-timeout`,
    /// `fault-delay`, `fault-abort`, `mirror`.
    pub event: &'static str,
}

/// Labels of reload counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` or `rejected`.
    pub result: String,
}

/// Labels of the rejected-snapshot counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    /// Why (see [`crate::snapshot::SnapshotError::reason`]).
    pub reason: &'static str,
}

/// Labels of the config info gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigLabels {
    /// The active config's content hash.
    pub hash: String,
}

/// Counter handles of `requests` by direction and status code, resolved
/// on first use, so that counting a response is an index and an atomic add
/// instead of a locked map lookup with a hashed label set.
#[derive(Debug)]
struct RequestCounters([Vec<OnceLock<Counter>>; 2]);

impl Default for RequestCounters {
    fn default() -> Self {
        let slots = || (0..500).map(|_| OnceLock::new()).collect();
        RequestCounters([slots(), slots()])
    }
}

/// Every metric of the proxy.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Connections accepted.
    pub connections: Family<ConnLabels, Counter>,
    /// Connections open now.
    pub connections_open: Family<ConnLabels, Gauge>,
    /// Idle connections parked outside the runtime now (`net::park`),
    /// among those open.
    pub connections_parked: Gauge,
    /// Completed mTLS handshakes, full or resumed.
    pub tls_handshakes: Family<HandshakeLabels, Counter>,
    /// HTTP responses sent to clients.
    pub requests: Family<RequestLabels, Counter>,
    /// Failures by step.
    pub errors: Family<ErrorLabels, Counter>,
    /// What route policies did (retries, timeouts, faults, mirrors).
    pub route_events: Family<RouteEventLabels, Counter>,
    /// Requests and connections an Audit-mode AccessPolicy would refuse.
    pub authz_audit: Family<AuditLabels, Counter>,
    /// Reload attempts by result.
    pub reloads: Family<ReloadLabels, Counter>,
    /// Access log lines dropped because the writer fell behind.
    pub access_log_dropped: Counter,
    /// Spans dropped because the exporter fell behind.
    pub spans_dropped: Counter,
    /// Spans the collector accepted, and spans of failed exports.
    pub span_export: crate::trace::export::ExportCounters,
    /// Rejected snapshots by reason.
    pub config_rejected: Family<RejectLabels, Counter>,
    /// Generation of the active config.
    pub config_generation: Gauge,
    /// 1 for the hash of the active config.
    pub config_info: Family<ConfigLabels, Gauge>,
    /// Expiry of the active leaf certificate, Unix seconds.
    pub cert_expiry: Gauge,
    /// Golden traffic metrics by source and destination.
    pub traffic: traffic::Traffic,
    /// Resolved handles into `requests`.
    request_counters: RequestCounters,
}

impl Metrics {
    /// Registers the proxy's own metrics under the `weft_proxy` prefix and
    /// the traffic metrics under theirs.
    pub fn registry(&self) -> Registry {
        let mut root = Registry::default();
        self.register_own(root.sub_registry_with_prefix("weft_proxy"));
        self.traffic.register(&mut root);
        root
    }

    fn register_own(&self, r: &mut Registry) {
        r.register(
            "connections",
            "Connections accepted",
            self.connections.clone(),
        );
        r.register(
            "connections_open",
            "Connections open now",
            self.connections_open.clone(),
        );
        r.register(
            "connections_parked",
            "Idle connections parked outside the runtime now (counted in connections_open too)",
            self.connections_parked.clone(),
        );
        r.register(
            "tls_handshakes",
            "Completed proxy-to-proxy mTLS handshakes by direction and kind (full or resumed)",
            self.tls_handshakes.clone(),
        );
        r.register(
            "requests",
            "HTTP responses by direction and status code",
            self.requests.clone(),
        );
        r.register("errors", "Failed proxying steps", self.errors.clone());
        r.register(
            "route_events",
            "Route policy actions: retries, timeouts, injected faults, mirrored requests",
            self.route_events.clone(),
        );
        r.register(
            "authz_audit",
            "Inbound requests (HTTP) and connections (opaque TCP) let through that an Audit-mode AccessPolicy would refuse",
            self.authz_audit.clone(),
        );
        r.register(
            "reloads",
            "Config/identity reloads by result",
            self.reloads.clone(),
        );
        r.register(
            "access_log_dropped",
            "Access log lines dropped because the queue to the writer was full",
            self.access_log_dropped.clone(),
        );
        r.register(
            "spans_dropped",
            "Spans dropped because the queue to the exporter was full",
            self.spans_dropped.clone(),
        );
        r.register(
            "spans_exported",
            "Spans the OTLP collector accepted",
            self.span_export.exported.clone(),
        );
        r.register(
            "span_export_failed",
            "Spans in export batches that failed (collector down, slow or refusing)",
            self.span_export.failed.clone(),
        );
        r.register(
            "config_rejected",
            "Mounted config/identity generations refused, by reason (unsigned, bad-signature, untrusted-signer, other-document, foreign-namespace, config, identity, ...)",
            self.config_rejected.clone(),
        );
        r.register(
            "config_generation",
            "Generation of the active proxy.json",
            self.config_generation.clone(),
        );
        r.register(
            "config_info",
            "Hash of the active proxy.json (value 1)",
            self.config_info.clone(),
        );
        r.register(
            "cert_expiry_timestamp_seconds",
            "Expiry of the active identity certificate",
            self.cert_expiry.clone(),
        );
    }

    /// Counts a completed mTLS handshake of `kind` (`None`: not finished,
    /// not counted).
    pub fn handshake(&self, direction: Direction, kind: Option<rustls::HandshakeKind>) {
        let kind = match kind {
            Some(rustls::HandshakeKind::Resumed) => "resumed",
            Some(_) => "full",
            None => return,
        };
        self.tls_handshakes
            .get_or_create(&HandshakeLabels { direction, kind })
            .inc();
    }

    /// Counts a failed step.
    pub fn error(&self, direction: Direction, step: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                direction,
                step: step.to_owned(),
            })
            .inc();
    }

    /// Counts what a route policy did.
    pub fn route_event(&self, route: &str, event: &'static str) {
        self.route_events
            .get_or_create(&RouteEventLabels {
                route: route.to_owned(),
                event,
            })
            .inc();
    }

    /// Counts a response.
    pub fn request(&self, direction: Direction, code: u16) {
        let d = match direction {
            Direction::Outbound => 0,
            Direction::Inbound => 1,
        };
        let labels = || RequestLabels { direction, code };
        match code
            .checked_sub(100)
            .and_then(|i| self.request_counters.0[d].get(usize::from(i)))
        {
            Some(slot) => slot
                .get_or_init(|| self.requests.get_or_create(&labels()).clone())
                .inc(),
            None => self.requests.get_or_create(&labels()).inc(),
        };
    }

    /// Counts a reload result.
    pub fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "rejected" };
        self.reloads
            .get_or_create(&ReloadLabels {
                result: result.to_owned(),
            })
            .inc();
    }
}

/// Counts an open connection until dropped.
#[derive(Debug)]
pub struct OpenConn {
    gauge: Gauge,
}

impl OpenConn {
    /// Counts a new connection.
    pub fn new(m: &Metrics, direction: Direction, tls: bool) -> Self {
        let labels = ConnLabels { direction, tls };
        m.connections.get_or_create(&labels).inc();
        let gauge = m.connections_open.get_or_create(&labels).clone();
        gauge.inc();
        OpenConn { gauge }
    }
}

impl OpenConn {
    /// A second count of a connection already counted by an [`OpenConn`]
    /// that is about to go (a connection parked: the guard moves from its
    /// task to the parked entry). Counts no new connection.
    pub fn again(m: &Metrics, direction: Direction, tls: bool) -> Self {
        let gauge = m
            .connections_open
            .get_or_create(&ConnLabels { direction, tls })
            .clone();
        gauge.inc();
        OpenConn { gauge }
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Metrics) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry()).expect("encode");
        out
    }

    #[test]
    fn responses_are_counted_per_direction_and_code_in_and_out_of_the_cache() {
        let m = Metrics::default();
        for _ in 0..3 {
            m.request(Direction::Outbound, 200);
        }
        m.request(Direction::Inbound, 200);
        m.request(Direction::Inbound, 503);
        // Outside the cached range: counted through the family directly.
        m.request(Direction::Outbound, 42);
        m.request(Direction::Outbound, 42);
        let t = text(&m);
        let line = |d: &str, c: u16| {
            t.lines()
                .find(|l| {
                    l.starts_with("weft_proxy_requests_total{")
                        && l.contains(&format!("direction=\"{d}\""))
                        && l.contains(&format!("code=\"{c}\""))
                })
                .map(|l| l.rsplit(' ').next().unwrap_or_default().to_owned())
        };
        assert_eq!(line("outbound", 200).as_deref(), Some("3"), "{t}");
        assert_eq!(line("inbound", 200).as_deref(), Some("1"), "{t}");
        assert_eq!(line("inbound", 503).as_deref(), Some("1"), "{t}");
        assert_eq!(line("outbound", 42).as_deref(), Some("2"), "{t}");
        assert_eq!(
            line("outbound", 503),
            None,
            "no series before a response: {t}"
        );
    }
}
