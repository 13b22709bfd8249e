//! The Grafana dashboards of `manifests/observability/dashboards/`: every
//! PromQL expression in them, with Grafana's variables substituted.
#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;

/// One query of a dashboard panel (or of a template variable).
#[derive(Debug, Clone)]
pub struct Expr {
    /// The dashboard's file name.
    pub dashboard: String,
    /// The panel's title (`variable <name>` for a template variable).
    pub panel: String,
    /// The expression as written in the dashboard.
    pub raw: String,
}

/// The dashboard files, sorted.
pub fn files() -> Vec<PathBuf> {
    let dir = weft_e2e::prometheus::observability_dir().join("dashboards");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    v.sort();
    v
}

/// Every panel target's `expr`, and the selector inside every
/// `label_values(<selector>, <label>)` variable query, of one dashboard.
/// Panics (naming the panel) on a panel without targets or with an empty
/// expression.
pub fn exprs(name: &str, dashboard: &Value) -> Vec<Expr> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().unwrap_or("?").to_owned();
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        assert!(
            !targets.is_empty(),
            "{name}: panel {title:?} has no targets"
        );
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or("").trim().to_owned();
            assert!(
                !expr.is_empty(),
                "{name}: panel {title:?} has a target without expr: {t}"
            );
            out.push(Expr {
                dashboard: name.to_owned(),
                panel: title.clone(),
                raw: expr,
            });
        }
    }
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"]
            .as_str()
            .or_else(|| v["query"].as_str())
            .unwrap_or("");
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|r| r.rsplit_once(','))
            .map(|(sel, _label)| sel.trim().to_owned())
            .unwrap_or_else(|| {
                panic!(
                    "{name}: variable {}: not label_values(selector, label): {q}",
                    v["name"]
                )
            });
        out.push(Expr {
            dashboard: name.to_owned(),
            panel: format!("variable {}", v["name"].as_str().unwrap_or("?")),
            raw: inner,
        });
    }
    out
}

/// The demo's values for the dashboards' variables, as Grafana would
/// substitute a selection (several values become an alternation), and a
/// range for Grafana's interval variables.
pub fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__range", "5m")
        .replace("$__interval", "1m")
        .replace("$namespace", "demo")
        .replace("$service", "backend.demo|tcp-echo.demo")
        .replace("$workload", "frontend|backend-v1|tcp-echo")
}

/// Every dashboard's expressions, substituted ([`substitute`]).
pub fn all() -> Vec<(Expr, String)> {
    let mut out = Vec::new();
    for f in files() {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{name}: {e}"));
        let d: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        for e in exprs(&name, &d) {
            let s = substitute(&e.raw);
            out.push((e, s));
        }
    }
    out
}

/// Panels whose metrics count events the telemetry scenario does not cause
/// (their series exist only once such an event happened): outlier
/// ejections and pool overflow, proxy configs refused, injector
/// certificate reloads. Their queries must still be accepted.
pub const EVENT_ONLY_PANELS: &[&str] = &[
    "Outlier ejections and connection-pool overflow",
    "Proxy configs rejected by reason",
    "Injector certificate reloads and Mesh updates",
];
