//! `weftctl stat` and `weftctl graph` against a real Prometheus
//! (`/usr/bin/prometheus`): a loopback HTTP server serves weft proxy
//! metrics per the metrics contract (counters growing by a fixed amount per
//! scrape), Prometheus scrapes it every second, and the library functions
//! and the built binary read the golden signals and the topology back.
//! Also: a Prometheus without weft series, one that is down, one that
//! never answers.
//!
//! Served traffic, per scrape, counted by both proxies unless noted:
//! - demo/frontend -> demo/backend-v1: 10 x 200 in (10ms, 25ms]
//! - demo/frontend -> demo/backend-v2: 9 x 200 in (50ms, 100ms], 1 x 503 in (0.5ms, 1ms]
//! - demo/backend-v1 -> data/db: 3 x 200 and 1 x 500, all in (1ms, 2.5ms]
//! - a caller outside the mesh -> demo/frontend: 2 x 200 in (100ms, 250ms],
//!   counted by frontend's proxy only

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use weft_operator::observe::{Error, Prom, Reporter, graph, stat};

const PROMETHEUS: &str = "/usr/bin/prometheus";
const BUCKETS: [&str; 16] = [
    "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1",
    "2.5", "5", "10", "30", "60",
];

/// Requests of one label set: `per_scrape` more at each scrape, each
/// lasting up to `BUCKETS[bucket]` (and more than the bucket before).
struct Traffic {
    src: (&'static str, &'static str),
    dst: (&'static str, &'static str),
    service: &'static str,
    route: &'static str,
    code: &'static str,
    per_scrape: u64,
    bucket: usize,
    reporters: &'static [&'static str],
}

const BOTH: &[&str] = &["source", "destination"];
const FE: (&str, &str) = ("demo", "frontend");
const V1: (&str, &str) = ("demo", "backend-v1");
const V2: (&str, &str) = ("demo", "backend-v2");
const DB: (&str, &str) = ("data", "db");
const OUTSIDE: (&str, &str) = ("unknown", "unknown");

fn traffic() -> Vec<Traffic> {
    let t = |src, dst, service, route, code, per_scrape, bucket, reporters| Traffic {
        src,
        dst,
        service,
        route,
        code,
        per_scrape,
        bucket,
        reporters,
    };
    vec![
        t(FE, V1, "backend.demo", "backend/stable", "200", 10, 5, BOTH),
        t(FE, V2, "backend.demo", "backend/canary", "200", 9, 7, BOTH),
        t(FE, V2, "backend.demo", "backend/canary", "503", 1, 1, BOTH),
        t(V1, DB, "db.data", "", "200", 3, 2, BOTH),
        t(V1, DB, "db.data", "", "500", 1, 2, BOTH),
        t(
            OUTSIDE,
            FE,
            "frontend.demo",
            "",
            "200",
            2,
            8,
            &["destination"],
        ),
    ]
}

/// The metrics text at the `n`th scrape.
fn metrics_text(n: u64) -> String {
    let all = traffic();
    let labels = |t: &Traffic, reporter: &str| {
        let principal = |(ns, wl): (&str, &str)| {
            if wl == "unknown" {
                "unknown".to_owned()
            } else {
                format!("spiffe://cluster.local/ns/{ns}/sa/{wl}")
            }
        };
        let app = |wl: &str| {
            wl.trim_end_matches("-v1")
                .trim_end_matches("-v2")
                .to_owned()
        };
        let version = |wl: &str| {
            wl.rsplit_once("-v")
                .map_or("unknown".to_owned(), |(_, v)| format!("v{v}"))
        };
        format!(
            "reporter=\"{reporter}\",source_workload=\"{}\",source_namespace=\"{}\",source_principal=\"{}\",source_app=\"{}\",source_version=\"{}\",destination_workload=\"{}\",destination_namespace=\"{}\",destination_principal=\"{}\",destination_app=\"{}\",destination_version=\"{}\",destination_service=\"{}\",route=\"{}\",response_code=\"{}\",grpc_status=\"\",failed_step=\"\",protocol=\"http\",connection_security=\"{}\"",
            t.src.1,
            t.src.0,
            principal(t.src),
            app(t.src.1),
            version(t.src.1),
            t.dst.1,
            t.dst.0,
            principal(t.dst),
            app(t.dst.1),
            version(t.dst.1),
            t.service,
            t.route,
            t.code,
            if t.src.1 == "unknown" {
                "plaintext"
            } else {
                "mutual_tls"
            },
        )
    };
    let series: Vec<(String, &Traffic)> = all
        .iter()
        .flat_map(|t| t.reporters.iter().map(move |r| (labels(t, r), t)))
        .collect();
    let mut out = String::new();
    out.push_str("# HELP weft_requests_total HTTP requests.\n# TYPE weft_requests_total counter\n");
    for (l, t) in &series {
        out.push_str(&format!(
            "weft_requests_total{{{l}}} {}\n",
            t.per_scrape * n
        ));
    }
    out.push_str("# HELP weft_request_duration_seconds HTTP request duration.\n# TYPE weft_request_duration_seconds histogram\n");
    for (l, t) in &series {
        let count = t.per_scrape * n;
        for (i, le) in BUCKETS.iter().enumerate() {
            let c = if i >= t.bucket { count } else { 0 };
            out.push_str(&format!(
                "weft_request_duration_seconds_bucket{{{l},le=\"{le}\"}} {c}\n"
            ));
        }
        out.push_str(&format!(
            "weft_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} {count}\n"
        ));
        let upper: f64 = BUCKETS[t.bucket].parse().expect("bucket");
        out.push_str(&format!(
            "weft_request_duration_seconds_sum{{{l}}} {}\n",
            upper * count as f64
        ));
        out.push_str(&format!(
            "weft_request_duration_seconds_count{{{l}}} {count}\n"
        ));
    }
    out.push_str(
        "# TYPE weft_proxy_reloads_total counter\nweft_proxy_reloads_total{result=\"ok\"} 1\n",
    );
    out
}

/// A loopback HTTP server answering every request with the next scrape's
/// metrics, on its own thread; stops when dropped.
struct MetricsServer {
    addr: String,
    scrapes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetricsServer {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind metrics server");
        let addr = listener.local_addr().expect("addr").to_string();
        let scrapes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (scrapes.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => req.extend_from_slice(&buf[..k]),
                    }
                }
                let n = s.fetch_add(1, Ordering::SeqCst) + 1;
                let body = metrics_text(n);
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Self {
            addr,
            scrapes,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A Prometheus on a free loopback port with its own storage; killed when
/// dropped.
struct Prometheus {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Start with a config scraping `target` (or nothing) every second;
    /// `None` when the binary is missing.
    fn start(target: Option<&str>) -> Option<Self> {
        if !Path::new(PROMETHEUS).exists() {
            eprintln!(
                "SKIPPED: {PROMETHEUS} is missing (Debian package `prometheus`); the real-Prometheus test did not run"
            );
            return None;
        }
        let mut dir = tempfile::tempdir().expect("temp dir");
        let scrape = match target {
            Some(t) => format!(
                "scrape_configs:\n  - job_name: weft-proxies\n    static_configs:\n      - targets: [\"{t}\"]\n"
            ),
            None => "scrape_configs: []\n".to_owned(),
        };
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n{scrape}"
            ),
        )
        .expect("write config");
        // A port that was free a moment ago; try again if it was taken.
        for _ in 0..3 {
            let port = free_port();
            let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
            let child = Command::new(PROMETHEUS)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("start prometheus");
            let mut p = Self {
                child,
                url: format!("http://127.0.0.1:{port}"),
                dir,
            };
            if p.wait_ready() {
                return Some(p);
            }
            eprintln!("prometheus did not start:\n{}", p.log());
            dir = p.take_dir();
        }
        panic!("prometheus did not start three times");
    }

    /// Poll until the query API answers; false if the process exited.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok(mut s) = TcpStream::connect(self.url.trim_start_matches("http://")) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(b"GET /-/ready HTTP/1.0\r\n\r\n");
                let mut answer = String::new();
                let _ = s.read_to_string(&mut answer);
                if answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200") {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Stop this process and keep its directory for the next try.
    fn take_dir(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = tempfile::tempdir().expect("temp dir");
        std::mem::replace(&mut self.dir, dir)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn weftctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_weftctl"))
        .args(args)
        .output()
        .expect("weftctl runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-6
}

fn row<'a>(rows: &'a [stat::Row], ns: &str, name: &str) -> &'a stat::Row {
    rows.iter()
        .find(|r| r.namespace == ns && r.name == name)
        .unwrap_or_else(|| panic!("no row {ns}/{name} in {rows:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_signals_and_graph_from_a_real_prometheus() {
    let server = MetricsServer::start();
    let Some(prometheus) = Prometheus::start(Some(&server.addr)) else {
        return;
    };
    let prom = Prom::new(&prometheus.url, Duration::from_secs(10)).expect("url");
    let args = stat::StatArgs::default();

    // Wait until every served edge has a rate (two scrapes in the window).
    let deadline = Instant::now() + Duration::from_secs(90);
    let rows = loop {
        let rows = stat::query(&prom, &args).await;
        if let Ok(rows) = &rows
            && rows.len() == 4
            && rows
                .iter()
                .all(|r| r.rps > 0.0 && r.latency_ms_p50.is_some())
        {
            break rows.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no rates after {} scrapes: {rows:?}\n{}",
            server.scrapes.load(Ordering::SeqCst),
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    // By serving workload, as the serving proxies counted.
    let v1 = row(&rows, "demo", "backend-v1");
    let v2 = row(&rows, "demo", "backend-v2");
    let db = row(&rows, "data", "db");
    let fe = row(&rows, "demo", "frontend");
    assert_eq!(v1.success_rate, Some(1.0));
    assert!(close(v2.success_rate.expect("rate"), 0.9), "{v2:?}");
    assert!(close(db.success_rate.expect("rate"), 0.75), "{db:?}");
    assert_eq!(fe.success_rate, Some(1.0));
    // All series move at every scrape: their rates keep the served ratios.
    assert!(close(v1.rps / db.rps, 10.0 / 4.0), "{v1:?} {db:?}");
    assert!(close(fe.rps / db.rps, 2.0 / 4.0), "{fe:?} {db:?}");
    // All of v1's requests in (10ms, 25ms]: histogram_quantile interpolates.
    assert!(close(v1.latency_ms_p50.expect("p50"), 17.5), "{v1:?}");
    assert!(close(v1.latency_ms_p99.expect("p99"), 24.85), "{v1:?}");
    // v2: one fast 503 in (0.5ms, 1ms], nine in (50ms, 100ms].
    let p50 = v2.latency_ms_p50.expect("p50");
    assert!(close(p50, 50.0 + 50.0 * 4.0 / 9.0), "{v2:?}");
    let p95 = db.latency_ms_p95.expect("p95");
    assert!(p95 > 1.0 && p95 <= 2.5, "{db:?}");

    // Namespace filter and the other groupings.
    let data_only = stat::query(
        &prom,
        &stat::StatArgs {
            namespace: Some("data".parse().expect("ns")),
            ..stat::StatArgs::default()
        },
    )
    .await
    .expect("stat -n data");
    assert_eq!(data_only.len(), 1);
    assert_eq!(data_only[0].name, "db");
    let by_route = stat::query(
        &prom,
        &stat::StatArgs {
            by: stat::By::Route,
            ..stat::StatArgs::default()
        },
    )
    .await
    .expect("stat --by route");
    let routes: Vec<(&str, &str, Option<&str>)> = by_route
        .iter()
        .map(|r| (r.namespace.as_str(), r.name.as_str(), r.route.as_deref()))
        .collect();
    assert_eq!(
        routes,
        [
            ("data", "db", Some("")),
            ("demo", "backend", Some("backend/canary")),
            ("demo", "backend", Some("backend/stable")),
        ],
        "the outside caller is not counted by a source proxy"
    );
    assert!(close(by_route[1].success_rate.expect("rate"), 0.9));
    let by_service = stat::query(
        &prom,
        &stat::StatArgs {
            by: stat::By::Service,
            reporter: Some(Reporter::Destination),
            ..stat::StatArgs::default()
        },
    )
    .await
    .expect("stat --by service");
    let backend = row(&by_service, "demo", "backend");

    assert!(
        close(backend.success_rate.expect("rate"), 0.95),
        "{backend:?}"
    );
    assert_eq!(by_service.len(), 3, "{by_service:?}");

    // The graph: three edges counted by callers, one only by the callee.
    let g = graph::query(
        &prom,
        &graph::GraphArgs {
            window: "1m".parse().expect("window"),
            ..graph::GraphArgs::default()
        },
    )
    .await
    .expect("graph");
    let mut edges: Vec<(String, String, Reporter, Option<f64>)> = g
        .edges
        .iter()
        .map(|e| {
            let (a, b) = g.ends(e);
            (a, b, e.seen_by, e.success_rate)
        })
        .collect();
    edges.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    let names: Vec<(&str, &str, Reporter)> = edges
        .iter()
        .map(|(a, b, r, _)| (a.as_str(), b.as_str(), *r))
        .collect();
    assert_eq!(
        names,
        [
            ("demo/backend-v1", "data/db", Reporter::Source),
            ("demo/frontend", "demo/backend-v1", Reporter::Source),
            ("demo/frontend", "demo/backend-v2", Reporter::Source),
            ("unknown/unknown", "demo/frontend", Reporter::Destination),
        ]
    );
    let rates: Vec<f64> = edges.iter().map(|e| e.3.expect("rate")).collect();
    for (got, want) in rates.iter().zip([0.75, 1.0, 0.9, 1.0]) {
        assert!(close(*got, want), "{rates:?}");
    }
    assert!(g.edges.iter().all(|e| e.rps > 0.0 && e.p99_ms.is_some()));

    // The binary, as a person runs it.
    let url = prometheus.url.as_str();
    let out = weftctl(&["stat", "--prometheus", url]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    println!("$ weftctl stat --prometheus {url}\n{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 5, "{table}");
    assert!(
        lines[0].starts_with("NAMESPACE   WORKLOAD     SUCCESS   RPS"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("data        db           75.00%"),
        "{table}"
    );
    assert!(
        lines[3].starts_with("demo        backend-v2   90.00%"),
        "{table}"
    );
    // Aligned: every column starts where its header does.
    let col = lines[0].find("LATENCY_P99").expect("header");
    assert!(
        lines[1..]
            .iter()
            .all(|l| l[col - 3..col] == *"   " && l.as_bytes()[col] != b' '),
        "{table}"
    );

    let out = weftctl(&["stat", "--prometheus", url, "--by", "route", "-n", "demo"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    println!("$ weftctl stat --by route -n demo\n{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("backend/canary   90.00%"));

    let out = weftctl(&["stat", "--prometheus", url, "-o", "json", "--window", "30s"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json.as_array().map(Vec::len), Some(4), "{json}");

    let out = weftctl(&["graph", "--prometheus", url, "--window", "1m", "-o", "dot"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dot = text(&out.stdout);
    println!("$ weftctl graph -o dot\n{dot}");
    for (a, b) in [
        ("demo/frontend", "demo/backend-v1"),
        ("demo/frontend", "demo/backend-v2"),
        ("demo/backend-v1", "data/db"),
        ("unknown/unknown", "demo/frontend"),
    ] {
        assert!(
            dot.contains(&format!("\"{a}\" -> \"{b}\" [label=")),
            "{a} -> {b}\n{dot}"
        );
    }
    assert!(dot.contains("90.00% · p99"), "{dot}");

    let file = prometheus.dir.path().join("graph.svg");
    let out = weftctl(&[
        "graph",
        "--prometheus",
        url,
        "-n",
        "demo",
        "-o",
        "svg",
        "--out",
        file.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("(5 workloads, 4 calls)"),
        "{}",
        text(&out.stderr)
    );
    let svg = std::fs::read_to_string(&file).expect("svg written");
    assert!(svg.starts_with("<?xml") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<g class=\"edge\"").count(), 4);
    assert_eq!(svg.matches("<g class=\"node\"").count(), 5);
    if let Ok(keep) = std::env::var("WEFT_OBSERVE_SVG") {
        std::fs::copy(&file, PathBuf::from(keep)).expect("copy svg");
    }
    drop(prometheus);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prometheus_without_weft_series() {
    let Some(prometheus) = Prometheus::start(None) else {
        return;
    };
    let url = prometheus.url.as_str();
    let prom = Prom::new(url, Duration::from_secs(10)).expect("url");
    let e = stat::query(&prom, &stat::StatArgs::default())
        .await
        .expect_err("no series");
    assert!(matches!(e, Error::NoSeries { .. }), "{e:?}");
    let e = graph::query(&prom, &graph::GraphArgs::default())
        .await
        .expect_err("no series");
    assert!(matches!(e, Error::NoSeries { .. }), "{e:?}");

    let want = format!(
        "weftctl: no weft_requests_total series in Prometheus at {url}: are the proxies scraped?\n"
    );
    for cmd in [
        ["stat", "--prometheus", url],
        ["graph", "--prometheus", url],
    ] {
        let out = weftctl(&cmd);
        assert_eq!(out.status.code(), Some(2), "{cmd:?}");
        assert_eq!(text(&out.stderr), want, "{cmd:?}");
        assert!(out.stdout.is_empty());
    }

    // Prometheus's own error text comes through.
    let e = prom
        .query("sum(rate(weft_requests_total[1m])")
        .await
        .expect_err("parse error");
    match &e {
        Error::Api {
            error_type, error, ..
        } => {
            assert_eq!(error_type, "bad_data");
            assert!(error.contains("parse error"), "{error}");
        }
        other => panic!("expected Api, got {other:?}"),
    }
    println!("{e}");
}

#[test]
fn a_prometheus_that_is_down_or_silent() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let out = weftctl(&["stat", "--prometheus", &url]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    println!("{err}");
    assert!(
        err.starts_with(&format!("weftctl: cannot reach Prometheus at {url}: "))
            && err.contains("refused"),
        "{err}"
    );

    // Connections complete in the listen backlog, but nothing answers.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", silent.local_addr().expect("addr"));
    let out = weftctl(&["graph", "--prometheus", &url, "--timeout", "300ms"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    println!("{err}");
    assert_eq!(
        err,
        format!(
            "weftctl: Prometheus at {url} did not answer within 300ms (raise --timeout or shorten --window)\n"
        )
    );

    let out = weftctl(&["stat", "--prometheus", "https://prom:9090"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("only http:// is supported"));
    let out = weftctl(&["stat", "--prometheus", &url, "--window", "5 minutes"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(text(&out.stderr).contains("not a Prometheus duration"));
    drop(silent);
}
