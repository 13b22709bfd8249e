//! Distributed tracing: the trace context of each request ([`context`]),
//! one span per request and proxy, and their export over OTLP/HTTP
//! ([`export`]) to the Mesh's `tracing.otlpEndpoint`.
//!
//! ```text
//! outbound: read caller's context ─► client span (child) ─► headers in W3C + B3 ─► peer
//! inbound:  read client span's context ─► server span (child) ─► headers ─► app
//! both:     response body ends ─► Tracer::record (try_send, never waits)
//!           ─► bounded queue ─► export task: batches ─► POST {endpoint}/v1/traces
//! ```
//!
//! Nothing here runs for a request while the Mesh sets no endpoint: the
//! headers pass through untouched. A full queue drops the span and counts
//! it (`weft_proxy_spans_dropped_total`); an exporter that is slow or down
//! costs requests nothing.

pub mod context;
pub mod export;

use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use context::{SpanId, TraceContext, TraceId};

/// Spans waiting for the exporter, at most.
pub const SPAN_QUEUE: usize = 2048;

/// Client (outbound) or server (inbound).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The client proxy's span of a request.
    Client,
    /// The server proxy's span of a request.
    Server,
}

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Text.
    Str(String),
    /// Integer.
    Int(i64),
}

/// A finished span, as the proxy records it.
#[derive(Clone, Debug)]
pub struct Span {
    /// The trace.
    pub trace_id: TraceId,
    /// This span.
    pub span_id: SpanId,
    /// Its parent, if any.
    pub parent_span_id: Option<SpanId>,
    /// `tracestate`, as received.
    pub trace_state: Option<String>,
    /// Client or server.
    pub kind: Kind,
    /// `{method} {route}` or `{method}`.
    pub name: String,
    /// Start.
    pub start: SystemTime,
    /// End.
    pub end: SystemTime,
    /// OpenTelemetry HTTP attributes and weft's.
    pub attributes: Vec<(&'static str, Value)>,
    /// Failed (client: 4xx/5xx or a proxy's own answer; server: 5xx).
    pub error: bool,
}

/// A span being timed: its context and start, with attributes added as the
/// request goes.
#[derive(Clone, Debug)]
pub struct Pending {
    /// The span's own context (what was written into the request).
    pub context: TraceContext,
    /// Client or server.
    pub kind: Kind,
    /// The span's name (the method; the caller may add to it).
    pub name: String,
    /// Start.
    pub start: SystemTime,
    /// Attributes known at the start.
    pub attributes: Vec<(&'static str, Value)>,
}

impl Pending {
    /// The finished span.
    pub fn finish(
        self,
        status: u16,
        failed_step: Option<&str>,
        mut attributes: Vec<(&'static str, Value)>,
    ) -> Span {
        let mut all = self.attributes;
        all.push(("http.response.status_code", Value::Int(i64::from(status))));
        if let Some(step) = failed_step {
            all.push(("weft.failed_step", Value::Str(step.to_owned())));
            all.push(("error.type", Value::Str(step.to_owned())));
        } else if status >= 500 || (self.kind == Kind::Client && status >= 400) {
            all.push(("error.type", Value::Str(status.to_string())));
        }
        all.append(&mut attributes);
        let error =
            failed_step.is_some() || status >= 500 || (self.kind == Kind::Client && status >= 400);
        Span {
            trace_id: self.context.trace_id,
            span_id: self.context.span_id,
            parent_span_id: self.context.parent_span_id,
            trace_state: self
                .context
                .state
                .as_ref()
                .and_then(|s| s.to_str().ok())
                .map(str::to_owned),
            kind: self.kind,
            name: self.name,
            start: self.start,
            end: SystemTime::now(),
            attributes: all,
            error,
        }
    }
}

/// weft's attributes of a call's span, from its metric labels (`weft.`
/// followed by the label name: workloads, principals, Service, route).
pub fn span_attributes(labels: &crate::metrics::traffic::Series) -> Vec<(&'static str, Value)> {
    const NAMES: [(&str, &str); 9] = [
        ("source_workload", "weft.source_workload"),
        ("source_namespace", "weft.source_namespace"),
        ("source_principal", "weft.source_principal"),
        ("destination_workload", "weft.destination_workload"),
        ("destination_namespace", "weft.destination_namespace"),
        ("destination_principal", "weft.destination_principal"),
        ("destination_service", "weft.destination_service"),
        ("route", "weft.route"),
        ("connection_security", "weft.connection_security"),
    ];
    NAMES
        .iter()
        .filter_map(|(label, attr)| {
            labels
                .label(label)
                .filter(|v| !v.is_empty())
                .map(|v| (*attr, Value::Str(v.to_owned())))
        })
        .collect()
}

/// Ends `span` when its call ends (the name gets the destination Service,
/// the attributes weft's labels of `series` and `extra`), and hands it to
/// `tracer`.
pub fn ending(
    tracer: Arc<Tracer>,
    mut span: Pending,
    series: &crate::metrics::traffic::Series,
    mut extra: Vec<(&'static str, Value)>,
) -> crate::metrics::traffic::OnEnd {
    let mut attributes = span_attributes(series);
    attributes.append(&mut extra);
    if let Some(s) = series.label("destination_service") {
        span.name = format!("{} {s}", span.name);
    }
    Box::new(move |outcome, _| tracer.record(span_end(span, outcome, attributes)))
}

/// The finished span of a call that ended with `outcome`.
pub fn span_end(
    span: Pending,
    outcome: crate::metrics::traffic::Outcome,
    mut attributes: Vec<(&'static str, Value)>,
) -> Span {
    if let Some(g) = outcome.grpc_status {
        attributes.push(("rpc.grpc.status_code", Value::Int(i64::from(g))));
    }
    span.finish(outcome.code, outcome.failed_step, attributes)
}

/// Where finished spans go: a bounded queue to the export task.
#[derive(Debug)]
pub struct Tracer {
    queue: mpsc::Sender<Span>,
    dropped: Counter,
}

impl Tracer {
    /// A tracer with a queue of `capacity` spans, counting drops in
    /// `dropped`; the receiver goes to [`export::run`].
    pub fn new(capacity: usize, dropped: Counter) -> (Self, mpsc::Receiver<Span>) {
        let (queue, rx) = mpsc::channel(capacity);
        (Tracer { queue, dropped }, rx)
    }

    /// Hands a span to the exporter, or drops (and counts) it when the
    /// queue is full. Never waits.
    pub fn record(&self, span: Span) {
        if self.queue.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(kind: Kind) -> Pending {
        Pending {
            context: TraceContext {
                trace_id: [1; 16],
                span_id: [2; 8],
                parent_span_id: None,
                sampled: true,
                debug: false,
                state: None,
            },
            kind,
            name: "GET".into(),
            start: SystemTime::now(),
            attributes: vec![],
        }
    }

    fn span() -> Span {
        pending(Kind::Client).finish(200, None, vec![])
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let dropped = Counter::default();
        let (t, mut rx) = Tracer::new(2, dropped.clone());
        for _ in 0..5 {
            t.record(span());
        }
        assert_eq!(dropped.get(), 3);
        assert!(rx.try_recv().is_ok());
        t.record(span());
        assert_eq!(dropped.get(), 3, "room again once the exporter reads");
    }

    #[test]
    fn errors_follow_the_kind() {
        let p = pending;
        assert!(p(Kind::Client).finish(404, None, vec![]).error);
        assert!(!p(Kind::Server).finish(404, None, vec![]).error);
        assert!(p(Kind::Server).finish(503, None, vec![]).error);
        let s = p(Kind::Client).finish(503, Some("fault"), vec![]);
        assert!(
            s.attributes
                .contains(&("weft.failed_step", Value::Str("fault".into())))
        );
    }
}
