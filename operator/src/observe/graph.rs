//! The service topology seen in the request metrics: nodes are workloads
//! (`namespace/workload`), an edge is "A called B" with its requests per
//! second, success rate and p99 latency over a window.
//!
//! Edges come from the calling proxies' counts (`reporter="source"`) of
//! HTTP requests and of opaque TCP connections (connections and bytes per
//! second; an edge may carry both); a
//! caller only the serving proxy saw (outside the mesh, or whose proxy is
//! not scraped) is added from `reporter="destination"` and marked so.
//! [`Graph::to_dot`] writes Graphviz DOT, [`Graph::to_svg`] a drawing laid
//! out left to right by call depth ([`super::layout`], [`super::svg`]).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::{Error, Namespace, Prom, Reporter, Sample, Window, finite, fmt_ms, fmt_success};

/// The labels an edge is keyed by.
const EDGE_LABELS: [&str; 4] = [
    "source_namespace",
    "source_workload",
    "destination_namespace",
    "destination_workload",
];

/// What to ask for.
#[derive(Clone, Debug)]
pub struct GraphArgs {
    /// Only edges from or to a workload in this namespace.
    pub namespace: Option<Namespace>,
    /// The rate window.
    pub window: Window,
}

impl Default for GraphArgs {
    fn default() -> Self {
        Self {
            namespace: None,
            window: Window("5m".to_owned()),
        }
    }
}

/// The PromQL for one reporter's edges: requests per second, non-5xx
/// requests per second, p99 latency in seconds.
pub fn queries(args: &GraphArgs, reporter: Reporter) -> [String; 3] {
    let by = EDGE_LABELS.join(", ");
    let sel = format!("reporter=\"{}\"", reporter.as_str());
    let w = &args.window;
    [
        format!("sum by ({by}) (rate(weft_requests_total{{{sel}}}[{w}]))"),
        format!("sum by ({by}) (rate(weft_requests_total{{{sel},response_code!~\"5..\"}}[{w}]))"),
        format!(
            "histogram_quantile(0.99, sum by (le, {by}) (rate(weft_request_duration_seconds_bucket{{{sel}}}[{w}])))"
        ),
    ]
}

/// The PromQL for the calling proxies' opaque TCP edges: connections
/// opened per second, bytes per second both ways.
pub fn tcp_queries(args: &GraphArgs) -> [String; 2] {
    let by = EDGE_LABELS.join(", ");
    let w = &args.window;
    [
        format!(
            "sum by ({by}) (rate(weft_tcp_connections_opened_total{{reporter=\"source\"}}[{w}]))"
        ),
        format!(
            "sum by ({by}) (rate(weft_tcp_sent_bytes_total{{reporter=\"source\"}}[{w}]) + rate(weft_tcp_received_bytes_total{{reporter=\"source\"}}[{w}]))"
        ),
    ]
}

/// Answers to [`tcp_queries`], in the same order.
#[derive(Clone, Debug, Default)]
pub struct TcpAnswers {
    /// Connections opened per second per edge.
    pub connections: Vec<Sample>,
    /// Bytes per second (both ways) per edge.
    pub bytes: Vec<Sample>,
}

/// One reporter's answers to [`queries`], in the same order.
#[derive(Clone, Debug, Default)]
pub struct Answers {
    /// Requests per second per edge.
    pub total: Vec<Sample>,
    /// Non-5xx requests per second per edge.
    pub success: Vec<Sample>,
    /// p99 latency in seconds per edge.
    pub p99: Vec<Sample>,
}

/// A workload.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Node {
    /// Its namespace (`unknown` for a caller outside the mesh).
    pub namespace: String,
    /// Its name (`unknown` for a caller outside the mesh).
    pub workload: String,
}

impl Node {
    /// `namespace/workload`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.workload)
    }

    /// Whether the workload is known to the mesh (its proxy named it).
    pub fn meshed(&self) -> bool {
        self.workload != "unknown"
    }

    /// The big line of its box.
    pub fn title(&self) -> &str {
        if self.meshed() {
            &self.workload
        } else {
            "unknown"
        }
    }

    /// The small line of its box.
    pub fn subtitle(&self) -> String {
        if !self.meshed() {
            "outside the mesh".to_owned()
        } else {
            self.namespace.clone()
        }
    }
}

/// "`from` called `to`".
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Edge {
    /// Index of the caller in [`Graph::nodes`].
    pub from: usize,
    /// Index of the callee in [`Graph::nodes`].
    pub to: usize,
    /// Requests per second over the window.
    pub rps: f64,
    /// Share of requests not answered 5xx, `None` without requests.
    pub success_rate: Option<f64>,
    /// 99th percentile latency in milliseconds.
    pub p99_ms: Option<f64>,
    /// Whose count this is: `source` normally, `destination` for a caller
    /// only the serving proxy saw.
    pub seen_by: Reporter,
    /// Opaque TCP between the two: connections opened and bytes (both
    /// ways) per second.
    pub tcp: Option<TcpRates>,
}

/// An edge's opaque TCP traffic.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct TcpRates {
    /// Connections opened per second.
    pub connections: f64,
    /// Bytes per second, both ways.
    pub bytes: f64,
}

impl Edge {
    /// `12.00 rps`, `0.50 conn/s (tcp)`, or both.
    pub fn rps_text(&self) -> String {
        match (self.tcp, self.rps > 0.0 || self.success_rate.is_some()) {
            (Some(t), false) => format!("{:.2} conn/s (tcp)", t.connections),
            (Some(t), true) => format!("{:.2} rps · {:.2} conn/s", self.rps, t.connections),
            (None, _) => format!("{:.2} rps", self.rps),
        }
    }

    /// `99.50% · p99 23.5ms`, `tcp 1.2 kB/s`, or `no requests`.
    pub fn quality_text(&self) -> String {
        if self.success_rate.is_none() {
            return match self.tcp {
                Some(t) => format!("tcp {}", fmt_bytes_rate(t.bytes)),
                None => "no requests".to_owned(),
            };
        }
        format!(
            "{} · p99 {}",
            fmt_success(self.success_rate),
            fmt_ms(self.p99_ms)
        )
    }
}

/// The topology.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Graph {
    /// Workloads, sorted by namespace and name.
    pub nodes: Vec<Node>,
    /// Calls, sorted by caller and callee.
    pub edges: Vec<Edge>,
    /// The rate window, for the drawing's caption.
    pub window: String,
    /// The namespace asked for, if any.
    pub namespace: Option<String>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    rps: f64,
    ok: f64,
    p99: Option<f64>,
}

type Key = [String; 4];

fn by_edge(a: &Answers) -> BTreeMap<Key, Stats> {
    let key = |s: &Sample| EDGE_LABELS.map(|l| s.label(l).to_owned());
    let mut m: BTreeMap<Key, Stats> = a
        .total
        .iter()
        .map(|s| {
            (
                key(s),
                Stats {
                    rps: finite(s.value).unwrap_or(0.0),
                    ..Stats::default()
                },
            )
        })
        .collect();
    for s in &a.success {
        if let Some(st) = m.get_mut(&key(s)) {
            st.ok = finite(s.value).unwrap_or(0.0);
        }
    }
    for s in &a.p99 {
        if let Some(st) = m.get_mut(&key(s)) {
            st.p99 = finite(s.value).map(|sec| sec * 1000.0);
        }
    }
    m
}

/// `512 B/s`, `1.2 kB/s`, `3.4 MB/s`.
fn fmt_bytes_rate(b: f64) -> String {
    if b >= 1e6 {
        format!("{:.1} MB/s", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB/s", b / 1e3)
    } else {
        format!("{b:.0} B/s")
    }
}

impl Graph {
    /// Build the graph from both reporters' answers, HTTP only.
    pub fn build(args: &GraphArgs, source: &Answers, destination: &Answers) -> Self {
        Self::build_with_tcp(args, source, destination, &TcpAnswers::default())
    }

    /// Build the graph from both reporters' HTTP answers and the callers'
    /// TCP answers: a pair with TCP traffic gets it on its edge (a new edge
    /// when no HTTP went between them).
    pub fn build_with_tcp(
        args: &GraphArgs,
        source: &Answers,
        destination: &Answers,
        tcp: &TcpAnswers,
    ) -> Self {
        let key = |s: &Sample| EDGE_LABELS.map(|l| s.label(l).to_owned());
        let mut tcp_rates: BTreeMap<Key, TcpRates> = tcp
            .connections
            .iter()
            .map(|s| {
                (
                    key(s),
                    TcpRates {
                        connections: finite(s.value).unwrap_or(0.0),
                        bytes: 0.0,
                    },
                )
            })
            .collect();
        for s in &tcp.bytes {
            if let Some(t) = tcp_rates.get_mut(&key(s)) {
                t.bytes = finite(s.value).unwrap_or(0.0);
            }
        }
        let from_source = by_edge(source);
        let from_destination = by_edge(destination);
        let wanted = |k: &Key| {
            args.namespace
                .as_ref()
                .is_none_or(|ns| k[0] == ns.as_str() || k[2] == ns.as_str())
        };
        let mut chosen: Vec<(Key, Stats, Reporter)> = from_source
            .into_iter()
            .filter(|(k, _)| wanted(k))
            .map(|(k, s)| (k, s, Reporter::Source))
            .collect();
        let known: BTreeSet<Key> = chosen.iter().map(|(k, _, _)| k.clone()).collect();
        chosen.extend(
            from_destination
                .into_iter()
                .filter(|(k, _)| wanted(k) && !known.contains(k))
                .map(|(k, s)| (k, s, Reporter::Destination)),
        );
        let known: BTreeSet<Key> = chosen.iter().map(|(k, _, _)| k.clone()).collect();
        chosen.extend(
            tcp_rates
                .keys()
                .filter(|k| wanted(k) && !known.contains(*k))
                .map(|k| (k.clone(), Stats::default(), Reporter::Source)),
        );
        let nodes: BTreeSet<Node> = chosen
            .iter()
            .flat_map(|(k, _, _)| {
                [
                    Node {
                        namespace: k[0].clone(),
                        workload: k[1].clone(),
                    },
                    Node {
                        namespace: k[2].clone(),
                        workload: k[3].clone(),
                    },
                ]
            })
            .collect();
        let nodes: Vec<Node> = nodes.into_iter().collect();
        let index = |ns: &str, wl: &str| {
            nodes
                .iter()
                .position(|n| n.namespace == ns && n.workload == wl)
                .unwrap_or_default()
        };
        let mut edges: Vec<Edge> = chosen
            .iter()
            .map(|(k, s, seen_by)| Edge {
                from: index(&k[0], &k[1]),
                to: index(&k[2], &k[3]),
                rps: s.rps,
                success_rate: (s.rps > 0.0).then(|| (s.ok / s.rps).clamp(0.0, 1.0)),
                p99_ms: s.p99,
                seen_by: *seen_by,
                tcp: tcp_rates.get(k).copied(),
            })
            .collect();
        edges.sort_by_key(|e| (e.from, e.to));
        Self {
            nodes,
            edges,
            window: args.window.to_string(),
            namespace: args.namespace.as_ref().map(ToString::to_string),
        }
    }

    /// `namespace/workload` of each end of an edge.
    pub fn ends(&self, e: &Edge) -> (String, String) {
        (self.nodes[e.from].id(), self.nodes[e.to].id())
    }

    /// The caption of a drawing.
    pub fn caption(&self) -> String {
        let mut c = "weft service graph".to_owned();
        if let Some(ns) = &self.namespace {
            c.push_str(&format!(" · namespace {ns}"));
        }
        c.push_str(&format!(" · last {}", self.window));
        c
    }

    /// Graphviz DOT, laid out left to right; edge colours as in the SVG.
    pub fn to_dot(&self) -> String {
        let mut out = String::from("digraph weft {\n");
        out.push_str("  rankdir=LR;\n");
        out.push_str(&format!(
            "  graph [label=\"{}\", labelloc=t, fontname=\"Helvetica\"];\n",
            dot_escape(&self.caption())
        ));
        out.push_str(
            "  node [shape=box, style=\"rounded,filled\", fillcolor=\"#f5f7fa\", fontname=\"Helvetica\"];\n",
        );
        out.push_str("  edge [fontname=\"Helvetica\", fontsize=10];\n");
        for n in &self.nodes {
            let style = if n.meshed() {
                String::new()
            } else {
                ", style=\"rounded,dashed\"".to_owned()
            };
            out.push_str(&format!(
                "  \"{}\" [label=\"{}\\n{}\"{style}];\n",
                dot_escape(&n.id()),
                dot_escape(n.title()),
                dot_escape(&n.subtitle()),
            ));
        }
        for e in &self.edges {
            let (from, to) = self.ends(e);
            let dashed = if e.seen_by == Reporter::Destination {
                ", style=dashed"
            } else {
                ""
            };
            out.push_str(&format!(
                "  \"{}\" -> \"{}\" [label=\"{}\\n{}\", color=\"{}\", fontcolor=\"{}\"{dashed}];\n",
                dot_escape(&from),
                dot_escape(&to),
                dot_escape(&e.rps_text()),
                dot_escape(&e.quality_text()),
                health(e).color(),
                health(e).color(),
            ));
        }
        out.push_str("}\n");
        out
    }

    /// A self-contained SVG drawing (see [`super::svg`]).
    pub fn to_svg(&self) -> String {
        super::svg::render(self)
    }
}

/// An edge's colour class by success rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// At least 99% success.
    Good,
    /// At least 95%.
    Degraded,
    /// Below 95%.
    Failing,
    /// No requests in the window.
    Idle,
}

impl Health {
    /// All classes, for the legend.
    pub const ALL: [Self; 4] = [Self::Good, Self::Degraded, Self::Failing, Self::Idle];

    /// Its colour.
    pub fn color(self) -> &'static str {
        match self {
            Self::Good => "#2e7d32",
            Self::Degraded => "#e65100",
            Self::Failing => "#c62828",
            Self::Idle => "#9e9e9e",
        }
    }

    /// A name usable as an identifier.
    pub fn name(self) -> &'static str {
        match self {
            Self::Good => "good",
            Self::Degraded => "degraded",
            Self::Failing => "failing",
            Self::Idle => "idle",
        }
    }

    /// What it means, for the legend.
    pub fn meaning(self) -> &'static str {
        match self {
            Self::Good => "≥ 99% success",
            Self::Degraded => "≥ 95%",
            Self::Failing => "< 95%",
            Self::Idle => "no requests",
        }
    }
}

/// The colour class of an edge.
pub fn health(e: &Edge) -> Health {
    match e.success_rate {
        None if e.tcp.is_some_and(|t| t.connections > 0.0 || t.bytes > 0.0) => Health::Good,
        None => Health::Idle,
        Some(r) if r >= 0.99 => Health::Good,
        Some(r) if r >= 0.95 => Health::Degraded,
        Some(_) => Health::Failing,
    }
}

/// A DOT string's contents: quotes and backslashes escaped, line breaks as
/// `\n`.
fn dot_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Ask Prometheus for the topology: six instant queries (three per
/// reporter) at one evaluation time. When nothing came back at all, [`Error::NoSeries`] if
/// Prometheus holds no weft series.
pub async fn query(prom: &Prom, args: &GraphArgs) -> Result<Graph, Error> {
    let [s_total, s_ok, s_p99] = queries(args, Reporter::Source);
    let [d_total, d_ok, d_p99] = queries(args, Reporter::Destination);
    let [tcp_conns, tcp_bytes] = tcp_queries(args);
    let t = Some(prom.now().await?);
    let (st, so, sp, dt, dok, dp) = tokio::try_join!(
        prom.query_at(&s_total, t),
        prom.query_at(&s_ok, t),
        prom.query_at(&s_p99, t),
        prom.query_at(&d_total, t),
        prom.query_at(&d_ok, t),
        prom.query_at(&d_p99, t),
    )?;
    let (tc, tb) = tokio::try_join!(prom.query_at(&tcp_conns, t), prom.query_at(&tcp_bytes, t),)?;
    if st.is_empty() && dt.is_empty() && tc.is_empty() {
        prom.require_weft_series().await?;
    }
    Ok(Graph::build_with_tcp(
        args,
        &Answers {
            total: st,
            success: so,
            p99: sp,
        },
        &Answers {
            total: dt,
            success: dok,
            p99: dp,
        },
        &TcpAnswers {
            connections: tc,
            bytes: tb,
        },
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    fn edge(s: (&str, &str), d: (&str, &str), v: f64) -> Sample {
        Sample {
            labels: [
                ("source_namespace", s.0),
                ("source_workload", s.1),
                ("destination_namespace", d.0),
                ("destination_workload", d.1),
            ]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
            value: v,
        }
    }

    /// frontend -> backend-v1 (100%), frontend -> backend-v2 (90%),
    /// backend-v1 -> db (75%), and an unmeshed caller of frontend only its
    /// proxy saw.
    pub(crate) fn demo() -> Graph {
        let fe = ("demo", "frontend");
        let v1 = ("demo", "backend-v1");
        let v2 = ("demo", "backend-v2");
        let db = ("data", "db");
        let source = Answers {
            total: vec![edge(fe, v1, 10.0), edge(fe, v2, 10.0), edge(v1, db, 4.0)],
            success: vec![edge(fe, v1, 10.0), edge(fe, v2, 9.0), edge(v1, db, 3.0)],
            p99: vec![
                edge(fe, v1, 0.0245),
                edge(fe, v2, f64::NAN),
                edge(v1, db, 0.09),
            ],
        };
        let outside = ("unknown", "unknown");
        let destination = Answers {
            total: vec![
                edge(fe, v1, 10.0),
                edge(outside, fe, 2.0),
                edge(v1, db, 4.0),
            ],
            success: vec![edge(fe, v1, 10.0), edge(outside, fe, 2.0)],
            p99: vec![edge(outside, fe, 0.3)],
        };
        Graph::build(&GraphArgs::default(), &source, &destination)
    }

    #[test]
    fn tcp_traffic_joins_its_edge_or_makes_one() {
        let fe = ("demo", "frontend");
        let v1 = ("demo", "backend-v1");
        let db = ("demo", "tcp-echo");
        let source = Answers {
            total: vec![edge(fe, v1, 2.0)],
            success: vec![edge(fe, v1, 2.0)],
            p99: vec![edge(fe, v1, 0.01)],
        };
        let tcp = TcpAnswers {
            connections: vec![edge(fe, db, 0.5), edge(fe, v1, 0.25)],
            bytes: vec![edge(fe, db, 1500.0), edge(fe, v1, 10.0)],
        };
        let g = Graph::build_with_tcp(&GraphArgs::default(), &source, &Answers::default(), &tcp);
        let ends: Vec<(String, String)> = g.edges.iter().map(|e| g.ends(e)).collect();
        assert_eq!(
            ends,
            [
                ("demo/frontend".to_owned(), "demo/backend-v1".to_owned()),
                ("demo/frontend".to_owned(), "demo/tcp-echo".to_owned()),
            ]
        );
        let http = &g.edges[0];
        assert_eq!(http.rps_text(), "2.00 rps · 0.25 conn/s");
        let opaque = &g.edges[1];
        assert_eq!(opaque.rps_text(), "0.50 conn/s (tcp)");
        assert_eq!(opaque.quality_text(), "tcp 1.5 kB/s");
        assert_eq!(health(opaque), Health::Good);
        assert!(g.to_dot().contains("0.50 conn/s (tcp)"));
        assert!(
            tcp_queries(&GraphArgs::default())[0].contains("weft_tcp_connections_opened_total")
        );
    }

    #[test]
    fn promql_per_reporter() {
        let args = GraphArgs {
            namespace: Some("demo".parse().expect("ns")),
            window: "2m".parse().expect("window"),
        };
        let [total, ok, p99] = queries(&args, Reporter::Source);
        let by = "source_namespace, source_workload, destination_namespace, destination_workload";
        assert_eq!(
            total,
            format!("sum by ({by}) (rate(weft_requests_total{{reporter=\"source\"}}[2m]))")
        );
        assert_eq!(
            ok,
            format!(
                "sum by ({by}) (rate(weft_requests_total{{reporter=\"source\",response_code!~\"5..\"}}[2m]))"
            )
        );
        assert_eq!(
            p99,
            format!(
                "histogram_quantile(0.99, sum by (le, {by}) (rate(weft_request_duration_seconds_bucket{{reporter=\"source\"}}[2m])))"
            )
        );
        let [total, ..] = queries(&GraphArgs::default(), Reporter::Destination);
        assert!(total.contains("{reporter=\"destination\"}[5m]"), "{total}");
    }

    #[test]
    fn edges_from_both_reporters() {
        let g = demo();
        let ids: Vec<String> = g.nodes.iter().map(Node::id).collect();
        assert_eq!(
            ids,
            [
                "data/db",
                "demo/backend-v1",
                "demo/backend-v2",
                "demo/frontend",
                "unknown/unknown"
            ]
        );
        let edges: Vec<(String, String, Reporter)> = g
            .edges
            .iter()
            .map(|e| {
                let (a, b) = g.ends(e);
                (a, b, e.seen_by)
            })
            .collect();
        assert_eq!(
            edges,
            [
                ("demo/backend-v1".into(), "data/db".into(), Reporter::Source),
                (
                    "demo/frontend".into(),
                    "demo/backend-v1".into(),
                    Reporter::Source
                ),
                (
                    "demo/frontend".into(),
                    "demo/backend-v2".into(),
                    Reporter::Source
                ),
                (
                    "unknown/unknown".into(),
                    "demo/frontend".into(),
                    Reporter::Destination
                ),
            ]
        );
        assert_eq!(g.edges[0].success_rate, Some(0.75));
        assert_eq!(g.edges[0].p99_ms, Some(90.0));
        assert_eq!(g.edges[1].success_rate, Some(1.0));
        assert_eq!(g.edges[2].success_rate, Some(0.9));
        assert_eq!(g.edges[2].p99_ms, None, "NaN p99");
        assert_eq!(g.edges[3].p99_ms, Some(300.0));
        assert!(!g.nodes[4].meshed());
    }

    #[test]
    fn namespace_keeps_edges_touching_it() {
        let fe = ("demo", "frontend");
        let db = ("data", "db");
        let other = ("other", "x");
        let source = Answers {
            total: vec![edge(fe, db, 1.0), edge(other, other, 1.0)],
            ..Answers::default()
        };
        let args = GraphArgs {
            namespace: Some("data".parse().expect("ns")),
            ..GraphArgs::default()
        };
        let g = Graph::build(&args, &source, &Answers::default());
        assert_eq!(g.nodes.len(), 2);
        assert_eq!(g.edges.len(), 1);
        assert_eq!(g.edges[0].success_rate, Some(0.0), "no non-5xx answer");
        assert!(g.caption().contains("namespace data"), "{}", g.caption());
    }

    #[test]
    fn health_classes() {
        let mut g = demo();
        let classes: Vec<Health> = g.edges.iter().map(health).collect();
        assert_eq!(
            classes,
            [Health::Failing, Health::Good, Health::Failing, Health::Good]
        );
        g.edges[0].success_rate = Some(0.97);
        g.edges[1].success_rate = None;
        assert_eq!(health(&g.edges[0]), Health::Degraded);
        assert_eq!(health(&g.edges[1]), Health::Idle);
        assert_eq!(g.edges[1].quality_text(), "no requests");
        assert_eq!(g.edges[0].quality_text(), "97.00% · p99 90.0ms");
    }

    /// The DOT statements, checked token by token: balanced braces, every
    /// string closed, each statement a node or an edge between declared
    /// nodes.
    #[test]
    fn dot_is_well_formed() {
        let dot = demo().to_dot();
        assert!(dot.starts_with("digraph weft {\n  rankdir=LR;\n"), "{dot}");
        assert!(dot.ends_with("}\n"));
        let mut declared = BTreeSet::new();
        let mut edges = Vec::new();
        for line in dot.lines().skip(1) {
            let line = line.trim();
            if line == "}" {
                continue;
            }
            assert!(line.ends_with(';'), "{line}");
            let quoted = strings(line);
            if line.starts_with("graph [")
                || line.starts_with("node [")
                || line.starts_with("edge [")
                || line == "rankdir=LR;"
            {
                continue;
            }
            if line.contains(" -> ") {
                assert!(
                    declared.contains(&quoted[0]) && declared.contains(&quoted[1]),
                    "{line}"
                );
                edges.push((quoted[0].clone(), quoted[1].clone(), quoted[2].clone()));
            } else {
                declared.insert(quoted[0].clone());
            }
        }
        assert_eq!(declared.len(), 5);
        assert_eq!(edges.len(), 4);
        assert!(
            edges.contains(&(
                "demo/frontend".into(),
                "demo/backend-v2".into(),
                "10.00 rps\\n90.00% · p99 -".into()
            )),
            "{edges:?}"
        );
        assert!(dot.contains("\"unknown/unknown\" -> \"demo/frontend\" [label=\"2.00 rps\\n100.00% · p99 300ms\", color=\"#2e7d32\", fontcolor=\"#2e7d32\", style=dashed];"), "{dot}");
    }

    /// The double-quoted strings of a DOT line, panicking on one left open.
    fn strings(line: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c != '"' {
                continue;
            }
            let mut s = String::new();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => {
                        s.push('\\');
                        s.push(chars.next().expect("escape completed"));
                    }
                    Some(c) => s.push(c),
                    None => panic!("unclosed string in {line}"),
                }
            }
            out.push(s);
        }
        out
    }

    #[test]
    fn dot_escapes_names() {
        assert_eq!(dot_escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let g = Graph {
            nodes: vec![Node {
                namespace: "n".into(),
                workload: "we\"ird".into(),
            }],
            ..Graph::default()
        };
        let dot = g.to_dot();
        assert!(
            dot.contains("\"n/we\\\"ird\" [label=\"we\\\"ird\\nn\"];"),
            "{dot}"
        );
        for line in dot.lines() {
            let _ = strings(line);
        }
    }
}
