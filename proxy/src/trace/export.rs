//! The span export task: spans from the [`super::Tracer`] queue, in
//! batches, encoded as OTLP protobuf (`ExportTraceServiceRequest`) and
//! POSTed to `{endpoint}/v1/traces` over HTTP/1.1.
//!
//! In: the queue, the current endpoint and resource (read per batch, so a
//! reload applies), a dialer. Out: one POST per batch, at most every
//! [`FLUSH_EVERY`] or when [`BATCH`] spans wait. A batch that cannot be
//! sent within [`EXPORT_TIMEOUT`] is dropped and counted; nothing waits on
//! it but this task.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, span, status};
use prometheus_client::metrics::counter::Counter;
use prost::Message as _;
use tokio::sync::mpsc;

use super::{Kind, Span, Value};
use crate::net::Dialer;

/// Most spans in one export.
pub const BATCH: usize = 512;
/// Longest a span waits for a batch to fill.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Deadline of one export (connect, send, response).
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and as whom spans are exported, read for each batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    /// `http://host:port` (a path prefix is kept).
    pub endpoint: String,
    /// Resource attributes (`service.name`, `k8s.namespace.name`, …).
    pub resource: Vec<(&'static str, String)>,
}

/// Counters of the export task.
#[derive(Clone, Debug, Default)]
pub struct ExportCounters {
    /// Spans accepted by the collector.
    pub exported: Counter,
    /// Spans in batches that failed.
    pub failed: Counter,
}

/// Runs until the queue closes: batches spans and exports each batch to
/// the target `target()` names (none: the batch is discarded, tracing was
/// turned off).
pub async fn run(
    mut rx: mpsc::Receiver<Span>,
    target: impl Fn() -> Option<Target> + Send,
    dialer: Arc<dyn Dialer>,
    counters: ExportCounters,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let first = match rx.recv().await {
            Some(s) => s,
            None => return,
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let Some(t) = target() else {
            batch.clear();
            continue;
        };
        let body = encode(&batch, &t.resource);
        batch.clear();
        match tokio::time::timeout(EXPORT_TIMEOUT, post(&*dialer, &t.endpoint, body)).await {
            Ok(Ok(())) => {
                let _ = counters.exported.inc_by(n);
            }
            Ok(Err(e)) => {
                let _ = counters.failed.inc_by(n);
                tracing::warn!(endpoint = %t.endpoint, error = %e, spans = n, "span export failed; the batch is dropped");
            }
            Err(_) => {
                let _ = counters.failed.inc_by(n);
                tracing::warn!(endpoint = %t.endpoint, spans = n, "span export timed out; the batch is dropped");
            }
        }
    }
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The endpoint is not `http://host[:port][/path]`.
    #[error("OTLP endpoint {0:?} is not an http:// URL")]
    Endpoint(String),
    /// The host did not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// Host.
        host: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Connecting or speaking HTTP failed.
    #[error("{0}")]
    Io(String),
    /// The collector refused the batch.
    #[error("collector answered {0}")]
    Status(http::StatusCode),
}

/// The host, port and base path of an `http://` endpoint.
pub fn parse_endpoint(endpoint: &str) -> Result<(String, u16, String), ExportError> {
    let bad = || ExportError::Endpoint(endpoint.to_owned());
    let rest = endpoint.strip_prefix("http://").ok_or_else(bad)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
            (h, p.parse::<u16>().map_err(|_| bad())?)
        }
        _ => (authority, 80),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_owned(), port, path.to_owned()))
}

async fn post(dialer: &dyn Dialer, endpoint: &str, body: Vec<u8>) -> Result<(), ExportError> {
    let (host, port, path) = parse_endpoint(endpoint)?;
    let addr = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port),
        Err(_) => tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|source| ExportError::Resolve {
                host: host.clone(),
                source,
            })?
            .next()
            .ok_or_else(|| ExportError::Resolve {
                host: host.clone(),
                source: std::io::Error::other("no address"),
            })?,
    };
    let io = dialer
        .connect(addr)
        .await
        .map_err(|e| ExportError::Io(format!("connect {addr}: {e}")))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| ExportError::Io(e.to_string()))?;
    tokio::spawn(conn);
    let req = http::Request::post(format!("{path}/v1/traces"))
        .header(http::header::HOST, format!("{host}:{port}"))
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| ExportError::Io(e.to_string()))?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| ExportError::Io(e.to_string()))?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(ExportError::Status(status))
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn kv(key: &str, v: &Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(match v {
                Value::Str(s) => any_value::Value::StringValue(s.clone()),
                Value::Int(i) => any_value::Value::IntValue(*i),
            }),
        }),
        ..Default::default()
    }
}

/// The OTLP protobuf of a batch.
pub fn encode(spans: &[Span], resource: &[(&'static str, String)]) -> Vec<u8> {
    let spans = spans
        .iter()
        .map(|s| opentelemetry_proto::tonic::trace::v1::Span {
            trace_id: s.trace_id.to_vec(),
            span_id: s.span_id.to_vec(),
            parent_span_id: s.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
            trace_state: s.trace_state.clone().unwrap_or_default(),
            name: s.name.clone(),
            kind: match s.kind {
                Kind::Client => span::SpanKind::Client as i32,
                Kind::Server => span::SpanKind::Server as i32,
            },
            start_time_unix_nano: nanos(s.start),
            end_time_unix_nano: nanos(s.end),
            attributes: s.attributes.iter().map(|(k, v)| kv(k, v)).collect(),
            status: Some(opentelemetry_proto::tonic::trace::v1::Status {
                code: if s.error {
                    status::StatusCode::Error as i32
                } else {
                    status::StatusCode::Unset as i32
                },
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: resource
                    .iter()
                    .map(|(k, v)| kv(k, &Value::Str(v.clone())))
                    .collect(),
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "weft-proxy".to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_or_say_why_not() {
        let p = |e: &str| parse_endpoint(e).map_err(|e| e.to_string());
        assert_eq!(
            p("http://jaeger:4318"),
            Ok(("jaeger".into(), 4318, String::new()))
        );
        assert_eq!(
            p("http://10.0.0.1:4318/otlp/"),
            Ok(("10.0.0.1".into(), 4318, "/otlp".into()))
        );
        assert_eq!(
            p("http://collector"),
            Ok(("collector".into(), 80, String::new()))
        );
        assert_eq!(
            p("http://[::1]:4318"),
            Ok(("::1".into(), 4318, String::new()))
        );
        assert!(
            p("https://x:4318")
                .expect_err("an error")
                .contains("not an http:// URL")
        );
        assert!(p("http://x:port").is_err());
        assert!(p("http://").is_err());
    }

    #[test]
    fn a_batch_encodes_to_what_a_collector_decodes() {
        let s = Span {
            trace_id: [7; 16],
            span_id: [8; 8],
            parent_span_id: Some([9; 8]),
            trace_state: Some("a=b".into()),
            kind: Kind::Server,
            name: "GET".into(),
            start: UNIX_EPOCH + Duration::from_secs(1),
            end: UNIX_EPOCH + Duration::from_secs(2),
            attributes: vec![("http.response.status_code", Value::Int(200))],
            error: false,
        };
        let bytes = encode(&[s], &[("service.name", "web.shop".into())]);
        let back = ExportTraceServiceRequest::decode(bytes.as_slice()).expect("decodes");
        let rs = &back.resource_spans[0];
        assert_eq!(
            rs.resource.as_ref().expect("present").attributes[0].key,
            "service.name"
        );
        let span = &rs.scope_spans[0].spans[0];
        assert_eq!(span.trace_id, vec![7; 16]);
        assert_eq!(span.parent_span_id, vec![9; 8]);
        assert_eq!(span.kind, span::SpanKind::Server as i32);
        assert_eq!(span.end_time_unix_nano, 2_000_000_000);
        assert_eq!(span.trace_state, "a=b");
    }
}
