//! Proxy telemetry in Prometheus text format, served at `:15020/metrics`.
//!
//! Labels are bounded: direction, TLS yes/no, status code, failed step and
//! reload result. Per-peer labels come with the telemetry issue.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Traffic direction.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Direction {
    /// Leaving the pod (listener 15001).
    Outbound,
    /// Entering the pod (listener 15006).
    Inbound,
}

/// Labels of connection counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    /// Direction.
    pub direction: Direction,
    /// `true` when the mesh side of the connection is mTLS.
    pub tls: bool,
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

/// Labels of reload counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` or `rejected`.
    pub result: String,
}

/// Labels of the config info gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigLabels {
    /// The active config's content hash.
    pub hash: String,
}

/// Every metric of the proxy.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Connections accepted.
    pub connections: Family<ConnLabels, Counter>,
    /// Connections open now.
    pub connections_open: Family<ConnLabels, Gauge>,
    /// HTTP responses sent to clients.
    pub requests: Family<RequestLabels, Counter>,
    /// Failures by step.
    pub errors: Family<ErrorLabels, Counter>,
    /// Reload attempts by result.
    pub reloads: Family<ReloadLabels, Counter>,
    /// Generation of the active config.
    pub config_generation: Gauge,
    /// 1 for the hash of the active config.
    pub config_info: Family<ConfigLabels, Gauge>,
    /// Expiry of the active leaf certificate, Unix seconds.
    pub cert_expiry: Gauge,
}

impl Metrics {
    /// Registers every metric under the `weft_proxy` prefix.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("weft_proxy");
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
            "requests",
            "HTTP responses by direction and status code",
            self.requests.clone(),
        );
        r.register("errors", "Failed proxying steps", self.errors.clone());
        r.register(
            "reloads",
            "Config/identity reloads by result",
            self.reloads.clone(),
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
        r
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

    /// Counts a response.
    pub fn request(&self, direction: Direction, code: u16) {
        self.requests
            .get_or_create(&RequestLabels { direction, code })
            .inc();
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

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}
