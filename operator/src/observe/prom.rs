//! A small client of the Prometheus HTTP API: instant queries
//! (`GET <base>/api/v1/query`) over plain HTTP/1.1 with hyper, one
//! connection per query, one deadline covering connect, request and the
//! whole body, and answers decoded into [`Sample`]s.
//!
//! Errors name the Prometheus URL and the cause: unreachable, timed out,
//! refused by Prometheus (its `error` text), or an unreadable body.

use std::collections::BTreeMap;
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use super::Error;

/// Answers larger than this are refused rather than buffered.
const MAX_BODY: usize = 64 << 20;

/// One element of an instant vector: a label set and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The labels (Prometheus leaves out labels whose value is empty).
    pub labels: BTreeMap<String, String>,
    /// The value; `NaN` or infinite where PromQL made it so.
    pub value: f64,
}

impl Sample {
    /// The value of a label, `""` when absent (which is how Prometheus
    /// returns an empty label).
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// Where Prometheus is and how long to wait for it.
#[derive(Clone, Debug)]
pub struct Prom {
    url: String,
    connect_to: String,
    host: String,
    base_path: String,
    timeout: Duration,
}

impl Prom {
    /// A client of the Prometheus at `url` (`http://host[:port][/prefix]`),
    /// waiting at most `timeout` for each query.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, Error> {
        let bad = |reason: &str| Error::BadUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(bad(
                    "only http:// is supported; reach an in-cluster Prometheus with \
                     `kubectl port-forward` and use http://127.0.0.1:PORT",
                ));
            }
            _ => return Err(bad("expected http://host:port")),
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("credentials in the URL are not supported"));
        }
        if timeout.is_zero() {
            return Err(bad("the timeout must be longer than zero"));
        }
        let port = authority.port_u16().unwrap_or(80);
        Ok(Self {
            url: url.trim_end_matches('/').to_owned(),
            connect_to: format!("{}:{port}", authority.host()),
            host: authority.as_str().to_owned(),
            base_path: uri.path().trim_end_matches('/').to_owned(),
            timeout,
        })
    }

    /// The URL as given (without a trailing slash), for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The per-query timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The request path and query string of an instant query, evaluated
    /// at `time` (Unix seconds) or at Prometheus's current time. Prometheus
    /// is told the same timeout, so it gives up on its side too.
    pub fn query_path(&self, promql: &str, time: Option<f64>) -> String {
        let mut qs = form_urlencoded::Serializer::new(String::new());
        qs.append_pair("query", promql);
        if let Some(t) = time {
            qs.append_pair("time", &format!("{t:.3}"));
        }
        qs.append_pair("timeout", &format!("{}ms", self.timeout.as_millis()));
        format!("{}/api/v1/query?{}", self.base_path, qs.finish())
    }

    /// Run an instant query at Prometheus's current time.
    pub async fn query(&self, promql: &str) -> Result<Vec<Sample>, Error> {
        self.query_at(promql, None).await
    }

    /// Run an instant query at `time` (Unix seconds, as [`Prom::now`]
    /// answers). Queries whose results are combined must share one time:
    /// each evaluation at its own "now" extrapolates rates over slightly
    /// different spans, and a ratio of two of them is then off.
    pub async fn query_at(&self, promql: &str, time: Option<f64>) -> Result<Vec<Sample>, Error> {
        let path = self.query_path(promql, time);
        let (status, body) = tokio::time::timeout(self.timeout, self.get(&path))
            .await
            .map_err(|_| Error::Timeout {
                url: self.url.clone(),
                timeout: self.timeout,
            })??;
        parse_response(&self.url, status, &body, promql)
    }

    /// Prometheus's current time (Unix seconds), by its own clock.
    pub async fn now(&self) -> Result<f64, Error> {
        let samples = self.query("time()").await?;
        samples
            .first()
            .map(|s| s.value)
            .filter(|t| t.is_finite())
            .ok_or_else(|| Error::Decode {
                url: self.url.clone(),
                reason: "time() gave no number".to_owned(),
            })
    }

    /// Whether Prometheus holds any `weft_requests_total` series.
    pub async fn has_weft_series(&self) -> Result<bool, Error> {
        Ok(!self.query("count(weft_requests_total)").await?.is_empty())
    }

    /// [`Error::NoSeries`] when Prometheus holds no weft series: called
    /// when a query came back empty, to tell "nothing matched" from
    /// "nothing scraped".
    pub async fn require_weft_series(&self) -> Result<(), Error> {
        if self.has_weft_series().await? {
            Ok(())
        } else {
            Err(Error::NoSeries {
                url: self.url.clone(),
            })
        }
    }

    async fn get(&self, path_and_query: &str) -> Result<(u16, Bytes), Error> {
        let stream = tokio::net::TcpStream::connect(&self.connect_to)
            .await
            .map_err(|e| Error::Unreachable {
                url: self.url.clone(),
                cause: e.to_string(),
            })?;
        let transport = |e: &dyn std::error::Error| Error::Transport {
            url: self.url.clone(),
            cause: chain(e),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| transport(&e))?;
        let request = hyper::Request::get(path_and_query)
            .header(hyper::header::HOST, &self.host)
            .header(hyper::header::ACCEPT, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("weftctl/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::<Bytes>::new())
            .map_err(|e| Error::BadUrl {
                url: self.url.clone(),
                reason: e.to_string(),
            })?;
        // The connection is driven in this future (not a spawned task), so
        // a timeout drops the socket with everything else.
        let exchange = async move {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| transport(&e))?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| transport(&*e))?
                .to_bytes();
            drop(sender);
            Ok((status, body))
        };
        let (result, _) = tokio::join!(exchange, conn);
        result
    }
}

/// The error and its sources, `outer: inner: innermost`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[derive(Deserialize)]
struct Envelope {
    status: String,
    data: Option<Data>,
    #[serde(rename = "errorType")]
    error_type: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

#[derive(Deserialize)]
struct VectorElement {
    #[serde(default)]
    metric: BTreeMap<String, String>,
    value: (f64, String),
}

/// Decode an answer of `/api/v1/query`: an instant vector (or a scalar,
/// as one sample without labels), Prometheus's error envelope, or a
/// non-JSON HTTP error.
pub fn parse_response(
    url: &str,
    status: u16,
    body: &[u8],
    query: &str,
) -> Result<Vec<Sample>, Error> {
    let decode = |reason: String| Error::Decode {
        url: url.to_owned(),
        reason,
    };
    let envelope: Envelope = match serde_json::from_slice(body) {
        Ok(e) => e,
        Err(e) => {
            if (200..300).contains(&status) {
                return Err(decode(format!("not the JSON of the query API ({e})")));
            }
            return Err(Error::Http {
                url: url.to_owned(),
                status,
                body: snippet(body),
            });
        }
    };
    match envelope.status.as_str() {
        "success" => {}
        "error" => {
            return Err(Error::Api {
                url: url.to_owned(),
                error_type: envelope.error_type.unwrap_or_else(|| "unknown".to_owned()),
                error: envelope.error.unwrap_or_default(),
                query: query.to_owned(),
            });
        }
        other => return Err(decode(format!("status {other:?}"))),
    }
    let data = envelope
        .data
        .ok_or_else(|| decode("a success without data".to_owned()))?;
    match data.result_type.as_str() {
        "vector" => {
            let elements: Vec<VectorElement> = serde_json::from_value(data.result)
                .map_err(|e| decode(format!("a vector result that does not parse ({e})")))?;
            elements
                .into_iter()
                .map(|el| {
                    Ok(Sample {
                        labels: el.metric,
                        value: parse_value(&el.value.1).ok_or_else(|| {
                            decode(format!("sample value {:?} is not a number", el.value.1))
                        })?,
                    })
                })
                .collect()
        }
        "scalar" => {
            let (_, v): (f64, String) = serde_json::from_value(data.result)
                .map_err(|e| decode(format!("a scalar result that does not parse ({e})")))?;
            let value =
                parse_value(&v).ok_or_else(|| decode(format!("scalar {v:?} is not a number")))?;
            Ok(vec![Sample {
                labels: BTreeMap::new(),
                value,
            }])
        }
        other => Err(decode(format!(
            "result type {other:?} where an instant vector was expected"
        ))),
    }
}

/// Prometheus writes sample values as strings: numbers, `NaN`, `+Inf`,
/// `-Inf`.
fn parse_value(s: &str) -> Option<f64> {
    match s {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok().filter(|v: &f64| v.is_finite()),
    }
}

/// The start of a body, as text on one line.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let mut out: String = text
        .chars()
        .take(300)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > 300 {
        out.push('…');
    }
    if out.is_empty() {
        out.push_str("(empty body)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    const URL: &str = "http://prom.test:9090";

    fn parse(status: u16, body: &str) -> Result<Vec<Sample>, Error> {
        parse_response(URL, status, body.as_bytes(), "up")
    }

    #[test]
    fn urls_are_checked() {
        let p = Prom::new("http://127.0.0.1:9090/", Duration::from_secs(10)).expect("valid");
        assert_eq!(p.url(), "http://127.0.0.1:9090");
        assert_eq!(p.connect_to, "127.0.0.1:9090");
        assert_eq!(p.base_path, "");
        let p = Prom::new("http://localhost/prom/", Duration::from_secs(1)).expect("valid");
        assert_eq!(p.connect_to, "localhost:80");
        assert_eq!(p.base_path, "/prom");
        assert!(p.query_path("up", None).starts_with("/prom/api/v1/query?"));
        let p = Prom::new("http://[::1]:9090", Duration::from_secs(1)).expect("valid");
        assert_eq!(p.connect_to, "[::1]:9090");
        for bad in [
            "https://prom:9090",
            "prom:9090",
            "ftp://prom",
            "http://",
            "http://u:p@prom:9090",
            "not a url",
        ] {
            let e = Prom::new(bad, Duration::from_secs(1)).expect_err(bad);
            assert!(matches!(e, Error::BadUrl { .. }), "{bad}: {e}");
        }
        assert!(Prom::new("http://prom:9090", Duration::ZERO).is_err());
    }

    #[test]
    fn query_strings_are_encoded() {
        let p = Prom::new("http://127.0.0.1:9090", Duration::from_secs(10)).expect("valid");
        let path = p.query_path(r#"sum by (le) (rate(x{a="b",c=~".+\\.d"}[1m]))"#, None);
        assert_eq!(
            path,
            "/api/v1/query?query=sum+by+%28le%29+%28rate%28x%7Ba%3D%22b%22%2Cc%3D%7E%22.%2B%5C%5C.d%22%7D%5B1m%5D%29%29&timeout=10000ms"
        );
        assert_eq!(
            p.query_path("up", Some(1_700_000_000.25)),
            "/api/v1/query?query=up&time=1700000000.250&timeout=10000ms"
        );
    }

    #[test]
    fn vectors_parse_with_labels_and_special_values() {
        let body = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"destination_workload":"backend","route":"r/a"},"value":[1700000000.123,"2.5"]},
            {"metric":{"destination_workload":"db"},"value":[1700000000.123,"NaN"]},
            {"metric":{},"value":[1700000000,"+Inf"]},
            {"metric":{"x":"y"},"value":[1700000000,"-Inf"]},
            {"metric":{"x":"z"},"value":[1700000000,"1e-3"]}
        ]},"warnings":["something"]}"#;
        let samples = parse(200, body).expect("parses");
        assert_eq!(samples.len(), 5);
        assert_eq!(samples[0].label("destination_workload"), "backend");
        assert_eq!(samples[0].label("route"), "r/a");
        assert_eq!(samples[0].value, 2.5);
        assert_eq!(samples[1].label("route"), "", "absent labels read as empty");
        assert!(samples[1].value.is_nan());
        assert_eq!(samples[2].value, f64::INFINITY);
        assert_eq!(samples[3].value, f64::NEG_INFINITY);
        assert_eq!(samples[4].value, 0.001);
    }

    #[test]
    fn empty_results_and_scalars() {
        let empty = r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(parse(200, empty).expect("parses"), vec![]);
        let scalar =
            r#"{"status":"success","data":{"resultType":"scalar","result":[1700000000,"3"]}}"#;
        let s = parse(200, scalar).expect("parses");
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].value, 3.0);
    }

    #[test]
    fn error_envelopes_carry_prometheus_text() {
        let body = r#"{"status":"error","errorType":"bad_data","error":"invalid parameter \"query\": 1:5: parse error: unexpected \"}\""}"#;
        let e = parse(400, body).expect_err("an error");
        match &e {
            Error::Api {
                error_type, error, ..
            } => {
                assert_eq!(error_type, "bad_data");
                assert!(error.contains("parse error"), "{error}");
            }
            other => panic!("expected Api, got {other:?}"),
        }
        let text = e.to_string();
        assert!(
            text.contains(URL) && text.contains("bad_data") && text.contains("query: up"),
            "{text}"
        );

        let timeout = r#"{"status":"error","errorType":"timeout","error":"query timed out in expression evaluation"}"#;
        let e = parse(503, timeout).expect_err("an error");
        assert!(e.to_string().contains("query timed out"), "{e}");
    }

    #[test]
    fn non_json_and_truncated_bodies() {
        let e = parse(502, "<html>Bad Gateway</html>").expect_err("an error");
        assert!(
            matches!(&e, Error::Http { status: 502, body, .. } if body == "<html>Bad Gateway</html>"),
            "{e:?}"
        );
        let e = parse(404, "").expect_err("an error");
        assert!(e.to_string().contains("HTTP 404: (empty body)"), "{e}");

        let truncated = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"a":"b"},"val"#;
        let e = parse(200, truncated).expect_err("an error");
        assert!(matches!(e, Error::Decode { .. }), "{e:?}");
        assert!(e.to_string().contains("EOF"), "{e}");

        let matrix = r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert!(
            parse(200, matrix)
                .expect_err("an error")
                .to_string()
                .contains("matrix")
        );
        let bad_value = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"abc"]}]}}"#;
        assert!(
            parse(200, bad_value)
                .expect_err("an error")
                .to_string()
                .contains("abc")
        );
        let no_data = r#"{"status":"success"}"#;
        assert!(matches!(parse(200, no_data), Err(Error::Decode { .. })));
    }

    /// A one-shot HTTP server on loopback that answers with `response`
    /// (or never, when `None`) and hands back the request it read.
    async fn serve_once(
        response: Option<&'static str>,
    ) -> (String, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.expect("accept");
            let mut buf = vec![0u8; 8192];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = sock.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            match response {
                Some(r) => sock.write_all(r.as_bytes()).await.expect("write"),
                None => {
                    // Hold the connection open without answering.
                    let _ = sock.read(&mut buf).await;
                }
            }
            String::from_utf8_lossy(&got).into_owned()
        });
        (url, task)
    }

    #[tokio::test]
    async fn a_query_over_http() {
        let body = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"a":"b"},"value":[1,"4"]}]}}"#;
        let response: &'static str = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let (url, server) = serve_once(Some(response)).await;
        let prom = Prom::new(&format!("{url}/prefix"), Duration::from_secs(10)).expect("url");
        let samples = prom.query("sum(x)").await.expect("answers");
        assert_eq!(samples.len(), 1);
        assert_eq!(samples[0].value, 4.0);
        let request = server.await.expect("server");
        assert!(
            request.starts_with(
                "GET /prefix/api/v1/query?query=sum%28x%29&timeout=10000ms HTTP/1.1\r\n"
            ),
            "{request}"
        );
        assert!(
            request.to_ascii_lowercase().contains("host: 127.0.0.1:"),
            "{request}"
        );
    }

    #[tokio::test]
    async fn error_status_without_json_is_reported() {
        let (url, _server) = serve_once(Some(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 11\r\nConnection: close\r\n\r\nnot ready\r\n",
        ))
        .await;
        let prom = Prom::new(&url, Duration::from_secs(10)).expect("url");
        let e = prom.query("up").await.expect_err("503");
        assert!(
            matches!(&e, Error::Http { status: 503, body, .. } if body == "not ready"),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn a_body_cut_short_is_a_transport_error() {
        let (url, _server) = serve_once(Some(
            "HTTP/1.1 200 OK\r\nContent-Length: 500\r\nConnection: close\r\n\r\n{\"status\":\"succ",
        ))
        .await;
        let prom = Prom::new(&url, Duration::from_secs(10)).expect("url");
        let e = prom.query("up").await.expect_err("cut short");
        assert!(matches!(e, Error::Transport { .. }), "{e:?}");
        assert!(e.to_string().contains(&url), "{e}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let (url, _server) = serve_once(None).await;
        let prom = Prom::new(&url, Duration::from_millis(300)).expect("url");
        let e = prom.query("up").await.expect_err("times out");
        assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains(&url) && text.contains("300ms") && text.contains("--timeout"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let url = format!("http://{addr}");
        let prom = Prom::new(&url, Duration::from_secs(10)).expect("url");
        let e = prom.query("up").await.expect_err("refused");
        assert!(matches!(e, Error::Unreachable { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("cannot reach Prometheus at {url}: "))
                && text.to_lowercase().contains("refused"),
            "{text}"
        );
    }
}
