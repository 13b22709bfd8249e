//! Config reload: how long from kubelet's `..data` swap to the new snapshot
//! serving, at mesh sizes up to the operator's render benchmark's (10,000
//! Services), and what a reload does to requests flowing through the proxy.
//!
//! ```text
//! cargo bench -p weft-proxy --bench reload [-- --sizes 10,1000,10000 --rounds 7 --rate 500]
//! ```
//!
//! A client and a server proxy run in-process (the library's `start`, the
//! same code as the binary), with an HTTP/1.1 load of `--rate` requests per
//! second over 8 connections through both for the whole run. For each size
//! (Services besides the one the load uses, shaped like the operator's
//! render benchmark's: 500 namespaces, one port and 10 meshed pods each
//! with identity, pod, workload, app and version, one in ten with a
//! weighted route to two subsets) and each round, a new generation is
//! written into the client proxy's mount the way kubelet does (files in a
//! new directory, `..data` renamed over), gzipped above 256 KiB as the
//! operator writes it, and the time from the rename to the proxy serving
//! that generation is measured (the file watch, reading, gunzip, parsing,
//! hashing, signature and certificate checks, validation and the route
//! tables). A size's first round brings Services all new to the proxy;
//! the later rounds in turn move one pod of one Service, the reload an
//! endpoint change causes, in which the proxy keeps every unchanged
//! Service, and add a Service in the middle of the list, which moves the
//! indices of half the Services. The
//! same snapshot load, with nothing to keep, is also timed alone, called
//! directly, and split into its first steps. Requests sent while a reload
//! was under way are reported apart from the rest, with failures.
//!
//! Prints Markdown and writes it to `target/bench/reload.md`. Figures only;
//! nothing is asserted (the bar, a new snapshot live within 50 ms of the
//! swap, is in PERFORMANCE.md).

#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use rustls::pki_types::UnixTime;
use support::{
    CLIENT_ID, Pod, SERVER_ID, SERVER_POD_IP, TD, cluster_ip, config, echo_app, meshed, service,
};
use weft_proxy::test_util::{Leaf, MountDir, TestCa};
use weft_proxy_config::{Backend, HttpRoute, MtlsMode, Protocol, ProxyConfig, Service};

const GZIP_THRESHOLD: usize = 256 * 1024;
const CONNS: usize = 8;

struct Opts {
    sizes: Vec<usize>,
    rounds: usize,
    rate: u64,
}

fn opts() -> Opts {
    let mut o = Opts {
        sizes: vec![10, 1000, 10_000],
        rounds: 7,
        rate: 500,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--sizes" => {
                if let Some(v) = args.next() {
                    o.sizes = v.split(',').filter_map(|s| s.parse().ok()).collect();
                }
            }
            "--rounds" => o.rounds = args.next().and_then(|v| v.parse().ok()).unwrap_or(7).max(3),
            "--rate" => {
                o.rate = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(500)
                    .max(8)
            }
            "--bench" => {}
            other => eprintln!("reload: ignoring unknown argument {other:?}"),
        }
    }
    o
}

/// `n` synthetic Services shaped like the operator's render benchmark's
/// (`operator/examples/bench_render.rs`): spread over 500 namespaces, one
/// port, 10 meshed pods each with their Service's own service account, pod
/// name, workload, `app` and `version` (v1/v2 alternating); one in ten
/// split 90/10 between two subsets.
fn synthetic(n: usize) -> Vec<Service> {
    (0..n)
        .map(|i| {
            let name = format!("svc-{i}");
            let namespace = format!("ns-{}", i % 500);
            let ip = IpAddr::V4(Ipv4Addr::new(10, 100, (i / 250) as u8, (i % 250) as u8 + 1));
            let identity = format!("spiffe://{TD}/ns/{namespace}/sa/{name}");
            let endpoints = (0..10u32)
                .map(|e| {
                    let k = i as u32 * 10 + e;
                    let mut ep = meshed(
                        Ipv4Addr::new(10, 200 + (k >> 16) as u8, (k >> 8) as u8, k as u8),
                        &identity,
                    );
                    let version = if e % 2 == 0 { "v1" } else { "v2" };
                    ep.pod = Some(format!("{name}-7d4f8b9c6-{e:05}"));
                    ep.workload = Some(name.clone());
                    ep.app = Some(name.clone());
                    ep.version = Some(version.into());
                    if i % 10 == 0 {
                        ep.subsets = vec![version.into()];
                    }
                    ep
                })
                .collect();
            let mut s = service(&name, ip, 80, 8080, Protocol::Http1, endpoints);
            s.namespace = namespace.clone();
            if i % 10 == 0 {
                s.subsets = vec!["v1".into(), "v2".into()];
                s.http_routes = vec![HttpRoute {
                    name: "split".into(),
                    backends: [("v1", 90), ("v2", 10)]
                        .into_iter()
                        .map(|(subset, weight)| Backend {
                            service: format!("{namespace}/{name}"),
                            subset: Some(subset.into()),
                            port: None,
                            weight,
                        })
                        .collect(),
                    ..Default::default()
                }];
            }
            s
        })
        .collect()
}

/// A Service added in generation `generation`: one port, 10 meshed pods,
/// on addresses no synthetic Service uses.
fn added(generation: u64) -> Service {
    let name = format!("added-{generation}");
    let identity = format!("spiffe://{TD}/ns/ns-0/sa/{name}");
    let [_, _, hi, lo] = (generation as u32).to_be_bytes();
    let endpoints = (0..10u8)
        .map(|e| meshed(Ipv4Addr::new(10, 252, lo, e + 1), &identity))
        .collect();
    let ip = IpAddr::V4(Ipv4Addr::new(10, 101, hi, lo));
    let mut s = service(&name, ip, 80, 8080, Protocol::Http1, endpoints);
    s.namespace = "ns-0".into();
    s
}

fn client_config(generation: u64, extra: &[Service]) -> ProxyConfig {
    let mut services = vec![service(
        "echo",
        cluster_ip(1),
        80,
        0,
        Protocol::Http1,
        vec![meshed(SERVER_POD_IP, SERVER_ID)],
    )];
    services.extend_from_slice(extra);
    config(generation, MtlsMode::Strict, services)
}

/// The mount's files as the operator and kubelet write them; the config
/// gzipped above the operator's threshold. Returns the files and the
/// config's size as written.
fn files(cfg: &ProxyConfig, leaf: &Leaf, ca: &TestCa) -> (Vec<(&'static str, Vec<u8>)>, usize) {
    let json = cfg.to_json();
    let (name, bytes) = if json.len() > GZIP_THRESHOLD {
        ("proxy.json.gz", weft_proxy_config::gzip(&json))
    } else {
        ("proxy.json", json)
    };
    let size = bytes.len();
    (
        vec![
            (name, bytes),
            ("tls.crt", leaf.cert_pem.clone().into_bytes()),
            ("tls.key", leaf.key_pem.clone().into_bytes()),
            ("ca.crt", ca.cert_pem.clone().into_bytes()),
            ("proxy.json.sig", ca.sign_config(cfg)),
        ],
        size,
    )
}

fn publish(mount: &MountDir, files: &[(&'static str, Vec<u8>)]) {
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    mount.publish(&refs);
}

/// One request of the load: when it was sent, how long it took, whether it
/// failed.
#[derive(Clone, Copy)]
struct Sample {
    sent: Instant,
    took: Duration,
    ok: bool,
}

/// The running load: set `stop`, await `tasks`, then read `samples`.
struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Runs `CONNS` paced HTTP/1.1 loops through the client proxy until
/// stopped.
fn start_load(client: &Pod, rate: u64) -> Load {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::with_capacity(1 << 20)));
    let every = Duration::from_nanos(1_000_000_000 * CONNS as u64 / rate);
    let mut tasks = Vec::new();
    for c in 0..CONNS {
        let (stop, samples) = (stop.clone(), samples.clone());
        let (stamps, listener) = (client.outbound_stamps.clone(), client.proxy.outbound_addr);
        let dst = SocketAddr::new(cluster_ip(1), 80);
        tasks.push(tokio::spawn(async move {
            let connect = || async {
                support::h1(stamps.connect(listener, dst).await.expect("connect")).await
            };
            let mut sender = connect().await;
            let start = tokio::time::Instant::now() + every.mul_f64(c as f64 / CONNS as f64);
            let mut tick = tokio::time::interval_at(start, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let sent = tick.tick().await.into_std();
                let req = Request::get("/load")
                    .header("host", "echo")
                    .body(support::body(""))
                    .expect("request");
                if let Err(e) = sender.ready().await {
                    note_failure(&format!("connection not ready: {e:?}"));
                    sender = connect().await;
                }
                let ok = match sender.send_request(req).await {
                    Ok(r) if r.status() == StatusCode::OK => r.into_body().collect().await.is_ok(),
                    Ok(r) => {
                        let status = r.status();
                        let text = r.into_body().collect().await.map(|b| b.to_bytes());
                        note_failure(&format!("{status}: {text:?}"));
                        false
                    }
                    Err(e) => {
                        note_failure(&format!("{e:?}"));
                        false
                    }
                };
                samples
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Sample {
                        sent,
                        took: sent.elapsed(),
                        ok,
                    });
                if !ok {
                    // A new connection after a failure, as a client would.
                    sender = connect().await;
                }
            }
        }));
    }
    Load {
        stop,
        samples,
        tasks,
    }
}

/// Prints the first few failures (what failed, not only how many).
fn note_failure(what: &str) {
    static SHOWN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    if SHOWN.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 5 {
        eprintln!("reload: a request failed: {what}");
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    quantile(&v, 0.5)
}

/// p50, p99, max and failures of the samples sent inside (`inside`) or
/// outside the windows.
fn latency(samples: &[Sample], windows: &[(Instant, Instant)], inside: bool) -> String {
    let mut took = Vec::new();
    let mut failed = 0;
    for s in samples {
        let within = windows.iter().any(|(a, b)| s.sent >= *a && s.sent <= *b);
        if within == inside {
            took.push(s.took);
            failed += usize::from(!s.ok);
        }
    }
    took.sort();
    format!(
        "{} | {:.3} | {:.3} | {:.3} | {failed}",
        took.len(),
        ms(quantile(&took, 0.5)),
        ms(quantile(&took, 0.99)),
        ms(took.last().copied().unwrap_or_default()),
    )
}

fn main() {
    let o = opts();
    // One thread, as the sidecar runs by default (architecture decision
    // 13): whatever a reload costs on the runtime's thread, every request
    // waits for. The load and the app share it; the reload itself runs on
    // the blocking pool, as in the proxy.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(o));
}

async fn run(o: Opts) {
    support::init();
    let ca = Arc::new(TestCa::new("ca"));
    let app = echo_app().await;
    let client_leaf = Arc::new(ca.leaf(CLIENT_ID, 3600));
    let server_leaf = ca.leaf(SERVER_ID, 3600);
    let mut first = client_config(1, &[]);
    Arc::make_mut(&mut first.services[0]).ports[0].target_port = app.port();
    first.seal();
    let client = Pod::start(&first, &client_leaf, &ca).await;
    let server = Pod::start(&config(1, MtlsMode::Strict, vec![]), &server_leaf, &ca).await;
    client.route_to(
        SocketAddr::new(IpAddr::V4(SERVER_POD_IP), app.port()),
        &server,
    );

    let Load {
        stop,
        samples,
        tasks,
    } = start_load(&client, o.rate);
    // Warm-up, then a quiet stretch for the baseline.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Config reload\n\n`cargo bench -p weft-proxy --bench reload`: a client and a server proxy in-process, HTTP/1.1 load of {} rps over {CONNS} connections through both for the whole run; per size, {} reloads of the client proxy, each a new generation written the way kubelet does (`..data` renamed over a new directory), gzipped above 256 KiB as the operator writes it: the first with every Service new to the proxy, then in turn one pod of one Service moved (an endpoint change, the common reload) and one Service added in the middle of the list (the indices of half the Services move). The whole load alone is the same load called directly with nothing to keep from before. Synthetic Services shaped like the operator's render benchmark's: 500 namespaces, one port and 10 meshed pods each (identity, pod, workload, app, version), one in ten split 90/10 between two subsets. Medians over the rounds. Machine: {} CPUs.\n",
        o.rate,
        o.rounds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let _ = writeln!(
        out,
        "| Services | endpoints | proxy.json raw | as written | swap → serving, all Services new, ms | swap → serving, one pod moved, median ms | max ms | swap → serving, one Service added, median ms | whole load alone, median ms | gunzip ms | parse + validate ms |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let mut windows: Vec<(Instant, Instant)> = Vec::new();
    let mut generation = 1;
    for &n in &o.sizes {
        // Writing the configs is the benchmark's work, not the proxies': off
        // the runtime's workers, so the requests' latency is theirs.
        let extra = Arc::new(
            tokio::task::spawn_blocking(move || synthetic(n))
                .await
                .expect("services"),
        );
        // The first round's Services are all new to the proxy (the previous
        // size's were others); each later round moves one pod of one
        // Service, as an endpoint change does.
        let mut cold = Duration::ZERO;
        let mut live = Vec::new();
        // Every other round after the first adds a Service instead, in the
        // middle of the list (it stays for the later rounds): the indices
        // of half the Services move.
        let mut grown = Vec::new();
        let mut adds: Vec<Service> = Vec::new();
        let mut alone = Vec::new();
        let mut gunzip = Vec::new();
        let mut parse = Vec::new();
        let (mut raw, mut written) = (0, 0);
        for round in 0..o.rounds {
            generation += 1;
            let adding = round > 0 && round % 2 == 0;
            if adding {
                adds.push(added(generation));
            }
            let (extra, leaf, ca, adds) =
                (extra.clone(), client_leaf.clone(), ca.clone(), adds.clone());
            let (f, size, json_len) = tokio::task::spawn_blocking(move || {
                let mut cfg = client_config(generation, &extra);
                Arc::make_mut(&mut cfg.services[0]).ports[0].target_port = app.port();
                let middle = 1 + n / 2;
                for (k, s) in adds.into_iter().enumerate() {
                    cfg.services.insert(middle + k, Arc::new(s));
                }
                if round > 0 && !adding && n > 0 {
                    let moved =
                        &mut Arc::make_mut(&mut cfg.services[1 + round * 37 % n]).endpoints[0];
                    moved.address = IpAddr::V4(Ipv4Addr::new(
                        10,
                        250,
                        (generation >> 8) as u8,
                        generation as u8,
                    ));
                    moved.pod = Some(format!("moved-{generation}"));
                }
                cfg.seal();
                let (f, size) = files(&cfg, &leaf, &ca);
                (f, size, cfg.to_json().len())
            })
            .await
            .expect("config");
            raw = json_len;
            written = size;
            // The reload under test: from the rename to the generation live.
            let mount = &client.mount;
            publish(mount, &f);
            let published = Instant::now();
            let deadline = published + Duration::from_secs(20);
            while client.generation() != generation && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            let done = Instant::now();
            if client.generation() != generation {
                eprintln!("reload: generation {generation} never went live");
            }
            if round == 0 {
                cold = done - published;
            } else if adding {
                grown.push(done - published);
            } else {
                live.push(done - published);
            }
            // Until the last request holding the old snapshot has let it go
            // (whoever drops it last frees it).
            windows.push((published, done + Duration::from_millis(100)));
            // Quiet time so the next window's requests are its own.
            tokio::time::sleep(Duration::from_millis(400)).await;

            // The same load, called directly on this thread's blocking pool.
            let dir = mount.path().to_path_buf();
            let (t_alone, t_gunzip, t_parse) = tokio::task::spawn_blocking(move || {
                let t = Instant::now();
                let snap = weft_proxy::snapshot::load_dir(&dir, UnixTime::now());
                let t_alone = t.elapsed();
                if let Err(e) = snap {
                    panic!("the published generation does not load: {e}");
                }
                let data = weft_proxy::snapshot::resolve_data_dir(&dir);
                let (bytes, t_gunzip) = match std::fs::read(data.join("proxy.json")) {
                    Ok(b) => (b, Duration::ZERO),
                    Err(_) => {
                        let gz = std::fs::read(data.join("proxy.json.gz")).expect("config");
                        let t = Instant::now();
                        let b = weft_proxy_config::gunzip(&gz).expect("gunzip");
                        (b, t.elapsed())
                    }
                };
                let t = Instant::now();
                let cfg = ProxyConfig::load(&bytes).expect("parse");
                let t_parse = t.elapsed();
                drop(cfg);
                (t_alone, t_gunzip, t_parse)
            })
            .await
            .expect("load");
            alone.push(t_alone);
            gunzip.push(t_gunzip);
            parse.push(t_parse);
        }
        let endpoints = n * 10 + 1;
        let max = live.iter().max().copied().unwrap_or_default();
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} MiB | {:.2} MiB | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            n + 1,
            endpoints,
            raw as f64 / 1048576.0,
            written as f64 / 1048576.0,
            ms(cold),
            ms(median(live)),
            ms(max),
            ms(median(grown)),
            ms(median(alone)),
            ms(median(gunzip)),
            ms(median(parse)),
        );
        eprintln!("reload: {} Services done", n + 1);
        // Freeing 10,000 Services is the benchmark's work too.
        let _ = tokio::task::spawn_blocking(move || drop(extra)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let samples = samples.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let _ = writeln!(
        out,
        "\nRequests through both proxies during the run (latency from the intended send time). A request counts as during a reload if it was sent between the swap and 100 ms after the new generation began serving.\n\n| requests | count | p50 ms | p99 ms | max ms | failed |\n|---|---|---|---|---|---|\n| sent during a reload | {} |\n| all others | {} |",
        latency(&samples, &windows, true),
        latency(&samples, &windows, false),
    );
    print!("{out}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("reload.md");
    match std::fs::write(&path, &out) {
        Ok(()) => eprintln!("wrote {}", path.display()),
        Err(e) => eprintln!("reload: cannot write {}: {e}", path.display()),
    }
    drop(server);
    drop(client);
}
