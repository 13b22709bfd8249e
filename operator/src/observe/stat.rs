//! Golden signals from the proxies' request metrics: per workload, service
//! or route, the success rate (share of requests whose `response_code` is
//! not 5xx), requests per second and the p50/p95/p99 latency, over a
//! window, from one reporter's count.
//!
//! [`queries`] builds the PromQL, [`rows`] joins the answers (pure, tested
//! without a server), [`query`] runs both against a [`Prom`], and
//! [`table`] / [`json`] print the rows.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{
    Error, Namespace, Prom, Reporter, Sample, Window, finite, fmt_ms, fmt_rps, fmt_success,
    render_table,
};

/// What a row is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum By {
    /// The workload that served the requests (`destination_workload`).
    #[default]
    Workload,
    /// The service the requests were addressed to (`destination_service`).
    Service,
    /// The service and the ServiceRoute rule that matched (`route`).
    Route,
}

impl By {
    /// The labels a row is keyed by.
    pub fn labels(self) -> &'static [&'static str] {
        match self {
            Self::Workload => &["destination_namespace", "destination_workload"],
            Self::Service => &["destination_service"],
            Self::Route => &["destination_service", "route"],
        }
    }

    /// The reporter read when none is asked for: the serving proxy for
    /// workloads (it also counts callers outside the mesh); the calling
    /// proxy for services and routes (it is the one that picks both).
    pub fn default_reporter(self) -> Reporter {
        match self {
            Self::Workload => Reporter::Destination,
            Self::Service | Self::Route => Reporter::Source,
        }
    }
}

/// What to ask for.
#[derive(Clone, Debug)]
pub struct StatArgs {
    /// Only rows in this namespace (the serving workload's namespace, or
    /// the service's namespace for `--by service|route`).
    pub namespace: Option<Namespace>,
    /// What a row is.
    pub by: By,
    /// The rate window.
    pub window: Window,
    /// Whose count to read; `None` for [`By::default_reporter`].
    pub reporter: Option<Reporter>,
}

impl Default for StatArgs {
    fn default() -> Self {
        Self {
            namespace: None,
            by: By::Workload,
            window: Window("1m".to_owned()),
            reporter: None,
        }
    }
}

impl StatArgs {
    /// The reporter read.
    pub fn reporter(&self) -> Reporter {
        self.reporter.unwrap_or_else(|| self.by.default_reporter())
    }

    /// The label matchers inside `{}`.
    fn selector(&self) -> String {
        let mut m = vec![format!("reporter=\"{}\"", self.reporter().as_str())];
        if let Some(ns) = &self.namespace {
            m.push(match self.by {
                By::Workload => format!("destination_namespace=\"{ns}\""),
                // "<service>.<namespace>"; a namespace name has no regex
                // metacharacters, and `\\.` is an escaped dot once PromQL
                // has read the string.
                By::Service | By::Route => format!("destination_service=~\".+\\\\.{ns}\""),
            });
        }
        m.join(",")
    }
}

/// The PromQL of one `stat`: five instant queries over the same selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queries {
    /// Requests per second per row.
    pub total: String,
    /// Non-5xx requests per second per row.
    pub success: String,
    /// Latency quantiles in seconds per row: p50, p95, p99.
    pub quantiles: [String; 3],
}

/// The quantiles of [`Queries::quantiles`].
pub const QUANTILES: [f64; 3] = [0.5, 0.95, 0.99];

/// The PromQL for `args`.
pub fn queries(args: &StatArgs) -> Queries {
    let by = args.by.labels().join(", ");
    let sel = args.selector();
    let w = &args.window;
    let quantile = |q: f64| {
        format!(
            "histogram_quantile({q}, sum by (le, {by}) (rate(weft_request_duration_seconds_bucket{{{sel}}}[{w}])))"
        )
    };
    Queries {
        total: format!("sum by ({by}) (rate(weft_requests_total{{{sel}}}[{w}]))"),
        success: format!(
            "sum by ({by}) (rate(weft_requests_total{{{sel},response_code!~\"5..\"}}[{w}]))"
        ),
        quantiles: QUANTILES.map(quantile),
    }
}

/// One line of `weftctl stat`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    /// The workload's namespace, or the service's.
    pub namespace: String,
    /// The workload or service name.
    pub name: String,
    /// For [`By::Route`]: `<ServiceRoute>/<rule>`, `""` when no rule
    /// matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Share of requests that were not answered 5xx, `None` without
    /// requests in the window.
    pub success_rate: Option<f64>,
    /// Requests per second over the window.
    pub rps: f64,
    /// Median latency, milliseconds.
    pub latency_ms_p50: Option<f64>,
    /// 95th percentile latency, milliseconds.
    pub latency_ms_p95: Option<f64>,
    /// 99th percentile latency, milliseconds.
    pub latency_ms_p99: Option<f64>,
}

/// The answers of the five [`Queries`], joined.
#[derive(Clone, Debug, Default)]
pub struct Answers {
    /// Of [`Queries::total`].
    pub total: Vec<Sample>,
    /// Of [`Queries::success`].
    pub success: Vec<Sample>,
    /// Of [`Queries::quantiles`], in the same order.
    pub quantiles: [Vec<Sample>; 3],
}

fn key(by: By, s: &Sample) -> Vec<String> {
    by.labels().iter().map(|l| s.label(l).to_owned()).collect()
}

/// Join the answers into rows, one per label set of `total`, sorted by
/// namespace, name and route. A row without non-5xx requests (absent from
/// `success`) has a success rate of 0; without any request, of `None`.
pub fn rows(by: By, answers: &Answers) -> Vec<Row> {
    let index = |samples: &[Sample]| -> BTreeMap<Vec<String>, f64> {
        samples.iter().map(|s| (key(by, s), s.value)).collect()
    };
    let success = index(&answers.success);
    let quantiles = answers.quantiles.each_ref().map(|q| index(q));
    let mut rows: Vec<Row> = answers
        .total
        .iter()
        .map(|s| {
            let k = key(by, s);
            let rps = finite(s.value).unwrap_or(0.0);
            let ok = success.get(&k).copied().and_then(finite).unwrap_or(0.0);
            let ms = |i: usize| {
                quantiles[i]
                    .get(&k)
                    .copied()
                    .and_then(finite)
                    .map(|sec| sec * 1000.0)
            };
            let (namespace, name, route) = match by {
                By::Workload => (k[0].clone(), k[1].clone(), None),
                By::Service | By::Route => {
                    let (name, ns) = split_service(&k[0]);
                    (ns, name, (by == By::Route).then(|| k[1].clone()))
                }
            };
            Row {
                namespace,
                name,
                route,
                success_rate: (rps > 0.0).then(|| (ok / rps).clamp(0.0, 1.0)),
                rps,
                latency_ms_p50: ms(0),
                latency_ms_p95: ms(1),
                latency_ms_p99: ms(2),
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.namespace, &a.name, &a.route).cmp(&(&b.namespace, &b.name, &b.route)));
    rows
}

/// `backend.demo` → (`backend`, `demo`); a value without a dot (such as
/// `unknown`) is a name without namespace.
fn split_service(s: &str) -> (String, String) {
    match s.split_once('.') {
        Some((name, ns)) => (name.to_owned(), ns.to_owned()),
        None => (s.to_owned(), String::new()),
    }
}

/// Ask Prometheus for the golden signals, all five queries at one
/// evaluation time (Prometheus's `time()`). An empty answer is checked
/// against "no weft series at all" ([`Error::NoSeries`]); otherwise it is
/// an empty list (nothing matched the namespace and reporter).
pub async fn query(prom: &Prom, args: &StatArgs) -> Result<Vec<Row>, Error> {
    let q = queries(args);
    let t = Some(prom.now().await?);
    let (total, success, p50, p95, p99) = tokio::try_join!(
        prom.query_at(&q.total, t),
        prom.query_at(&q.success, t),
        prom.query_at(&q.quantiles[0], t),
        prom.query_at(&q.quantiles[1], t),
        prom.query_at(&q.quantiles[2], t),
    )?;
    if total.is_empty() {
        prom.require_weft_series().await?;
    }
    Ok(rows(
        args.by,
        &Answers {
            total,
            success,
            quantiles: [p50, p95, p99],
        },
    ))
}

/// The rows as an aligned table.
pub fn table(by: By, rows: &[Row]) -> String {
    let mut headers = vec![
        "NAMESPACE",
        match by {
            By::Workload => "WORKLOAD",
            By::Service | By::Route => "SERVICE",
        },
    ];
    if by == By::Route {
        headers.push("ROUTE");
    }
    headers.extend([
        "SUCCESS",
        "RPS",
        "LATENCY_P50",
        "LATENCY_P95",
        "LATENCY_P99",
    ]);
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut c = vec![dash(&r.namespace), dash(&r.name)];
            if let Some(route) = &r.route {
                c.push(if route.is_empty() {
                    "[no rule]".to_owned()
                } else {
                    route.clone()
                });
            }
            c.extend([
                fmt_success(r.success_rate),
                fmt_rps(r.rps),
                fmt_ms(r.latency_ms_p50),
                fmt_ms(r.latency_ms_p95),
                fmt_ms(r.latency_ms_p99),
            ]);
            c
        })
        .collect();
    render_table(&headers, &cells)
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

/// The rows as a pretty-printed JSON array.
pub fn json(rows: &[Row]) -> String {
    serde_json::to_string_pretty(rows).unwrap_or_else(|_| "[]".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    fn sample(labels: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            value,
        }
    }

    fn args(by: By, ns: Option<&str>, reporter: Option<Reporter>, window: &str) -> StatArgs {
        StatArgs {
            namespace: ns.map(|n| n.parse().expect("namespace")),
            by,
            window: window.parse().expect("window"),
            reporter,
        }
    }

    #[test]
    fn promql_by_workload() {
        let q = queries(&StatArgs::default());
        assert_eq!(
            q.total,
            r#"sum by (destination_namespace, destination_workload) (rate(weft_requests_total{reporter="destination"}[1m]))"#
        );
        assert_eq!(
            q.success,
            r#"sum by (destination_namespace, destination_workload) (rate(weft_requests_total{reporter="destination",response_code!~"5.."}[1m]))"#
        );
        assert_eq!(
            q.quantiles,
            [
                r#"histogram_quantile(0.5, sum by (le, destination_namespace, destination_workload) (rate(weft_request_duration_seconds_bucket{reporter="destination"}[1m])))"#,
                r#"histogram_quantile(0.95, sum by (le, destination_namespace, destination_workload) (rate(weft_request_duration_seconds_bucket{reporter="destination"}[1m])))"#,
                r#"histogram_quantile(0.99, sum by (le, destination_namespace, destination_workload) (rate(weft_request_duration_seconds_bucket{reporter="destination"}[1m])))"#,
            ]
        );
    }

    #[test]
    fn promql_with_namespace_window_and_reporter() {
        let q = queries(&args(
            By::Workload,
            Some("demo"),
            Some(Reporter::Source),
            "5m",
        ));
        assert_eq!(
            q.total,
            r#"sum by (destination_namespace, destination_workload) (rate(weft_requests_total{reporter="source",destination_namespace="demo"}[5m]))"#
        );
        let q = queries(&args(By::Service, Some("demo"), None, "30s"));
        assert_eq!(
            q.total,
            r#"sum by (destination_service) (rate(weft_requests_total{reporter="source",destination_service=~".+\\.demo"}[30s]))"#
        );
        assert_eq!(
            q.success,
            r#"sum by (destination_service) (rate(weft_requests_total{reporter="source",destination_service=~".+\\.demo",response_code!~"5.."}[30s]))"#
        );
        let q = queries(&args(By::Route, None, Some(Reporter::Destination), "1h"));
        assert_eq!(
            q.total,
            r#"sum by (destination_service, route) (rate(weft_requests_total{reporter="destination"}[1h]))"#
        );
        assert_eq!(
            q.quantiles[2],
            r#"histogram_quantile(0.99, sum by (le, destination_service, route) (rate(weft_request_duration_seconds_bucket{reporter="destination"}[1h])))"#
        );
    }

    #[test]
    fn default_reporters() {
        assert_eq!(
            args(By::Workload, None, None, "1m").reporter(),
            Reporter::Destination
        );
        assert_eq!(
            args(By::Service, None, None, "1m").reporter(),
            Reporter::Source
        );
        assert_eq!(
            args(By::Route, None, None, "1m").reporter(),
            Reporter::Source
        );
        assert_eq!(
            args(By::Route, None, Some(Reporter::Destination), "1m").reporter(),
            Reporter::Destination
        );
    }

    fn wl(ns: &str, w: &str, v: f64) -> Sample {
        sample(
            &[("destination_namespace", ns), ("destination_workload", w)],
            v,
        )
    }

    #[test]
    fn rows_join_rates_and_quantiles() {
        let answers = Answers {
            total: vec![
                wl("demo", "db", 4.0),
                wl("demo", "backend", 10.0),
                wl("demo", "broken", 2.0),
                wl("demo", "idle", 0.0),
            ],
            success: vec![
                wl("demo", "db", 3.0),
                wl("demo", "backend", 10.0),
                wl("demo", "idle", 0.0),
            ],
            quantiles: [
                vec![wl("demo", "db", 0.004), wl("demo", "idle", f64::NAN)],
                vec![wl("demo", "db", 0.02)],
                vec![wl("demo", "db", 0.1), wl("demo", "backend", 0.25)],
            ],
        };
        let rows = rows(By::Workload, &answers);
        let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["backend", "broken", "db", "idle"]);
        assert_eq!(rows[0].success_rate, Some(1.0));
        assert_eq!(rows[0].latency_ms_p50, None);
        assert_eq!(rows[0].latency_ms_p99, Some(250.0));
        assert_eq!(
            rows[1].success_rate,
            Some(0.0),
            "all 5xx: absent from success"
        );
        assert_eq!(
            rows[2],
            Row {
                namespace: "demo".into(),
                name: "db".into(),
                route: None,
                success_rate: Some(0.75),
                rps: 4.0,
                latency_ms_p50: Some(4.0),
                latency_ms_p95: Some(20.0),
                latency_ms_p99: Some(100.0),
            }
        );
        assert_eq!(rows[3].success_rate, None, "no requests, no rate");
        assert_eq!(rows[3].latency_ms_p50, None, "NaN quantile");
    }

    #[test]
    fn rows_by_service_and_route() {
        let svc = |s: &str, route: Option<&str>, v: f64| {
            let mut l = vec![("destination_service", s)];
            if let Some(r) = route {
                l.push(("route", r));
            }
            sample(&l, v)
        };
        let answers = Answers {
            total: vec![
                svc("backend.demo", Some("backend/canary"), 2.0),
                svc("backend.demo", None, 1.0),
                svc("unknown", None, 1.0),
            ],
            success: vec![svc("backend.demo", Some("backend/canary"), 1.0)],
            quantiles: Default::default(),
        };
        let rows = rows(By::Route, &answers);
        assert_eq!(rows.len(), 3);
        assert_eq!(
            (rows[0].namespace.as_str(), rows[0].name.as_str()),
            ("", "unknown")
        );
        assert_eq!(rows[1].route.as_deref(), Some(""));
        assert_eq!(rows[2].route.as_deref(), Some("backend/canary"));
        assert_eq!(rows[2].namespace, "demo");
        assert_eq!(rows[2].success_rate, Some(0.5));
        let t = table(By::Route, &rows);
        assert_eq!(
            t,
            "NAMESPACE   SERVICE   ROUTE            SUCCESS   RPS    LATENCY_P50   LATENCY_P95   LATENCY_P99\n\
             -           unknown   [no rule]        0.00%     1.00   -             -             -\n\
             demo        backend   [no rule]        0.00%     1.00   -             -             -\n\
             demo        backend   backend/canary   50.00%    2.00   -             -             -\n"
        );
    }

    #[test]
    fn table_and_json_by_workload() {
        let answers = Answers {
            total: vec![wl("demo", "db", 4.0)],
            success: vec![wl("demo", "db", 3.0)],
            quantiles: [
                vec![wl("demo", "db", 0.0042)],
                vec![wl("demo", "db", 0.0237)],
                vec![wl("demo", "db", 0.2)],
            ],
        };
        let rows = rows(By::Workload, &answers);
        assert_eq!(
            table(By::Workload, &rows),
            "NAMESPACE   WORKLOAD   SUCCESS   RPS    LATENCY_P50   LATENCY_P95   LATENCY_P99\n\
             demo        db         75.00%    4.00   4.20ms        23.7ms        200ms\n"
        );
        let v: serde_json::Value = serde_json::from_str(&json(&rows)).expect("json");
        assert_eq!(v[0]["name"], "db");
        assert_eq!(v[0]["success_rate"], 0.75);
        assert_eq!(v[0]["latency_ms_p99"], 200.0);
        assert!(v[0].get("route").is_none());
        assert_eq!(json(&[]), "[]");
    }
}
