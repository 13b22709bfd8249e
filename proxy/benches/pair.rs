//! The sidecar-pair benchmark (PERFORMANCE.md): load generator → client
//! sidecar → mTLS → server sidecar → app, for weft, nginx and HAProxy pairs,
//! against the direct connection. Prints Markdown tables and writes them to
//! `target/bench/pair.md`, with a plot in `target/bench/pair.svg`. Run as
//! root, holding the build lock so nothing builds during the measurement:
//!
//! ```text
//! flock /tmp/weft-build.lock cargo bench -p weft-proxy --bench pair            # ~4 min
//! flock /tmp/weft-build.lock cargo bench -p weft-proxy --bench pair -- --full  # whole matrix
//! ```
//!
//! Flags: `--rounds N` (interleaved rounds of the main comparison, 3),
//! `--measure-secs N` (constant-rate window, 5), `--only weft,direct`
//! (targets), `--core` (main comparison only: no matrix, handshakes or idle
//! connections), `--full` (the whole payload × protocol × connections
//! matrix instead of one axis at a time), `--telemetry` (weft's access logs
//! on and tracing at 1 %, to price them against the default).
//!
//! Topology. weft runs for real: two network namespaces joined by a veth,
//! `weft-proxy init` in each, both proxies as uid 1337 subprocesses; the
//! load generator dials ClusterIPs in the client namespace and is captured.
//! nginx and HAProxy pairs (Debian packages, one worker/thread each, TLS 1.3,
//! client certificates required by the server side, keep-alive upstream
//! pools) and the direct baseline run on loopback inside the server
//! namespace. Every proxy and the app are pinned to CPU 1, the load
//! generator to CPU 0 (`taskset`, `sched_setaffinity`).
//!
//! Hygiene. Peers must never outlive the benchmark (an inherited lock fd
//! once held the build lock for 25 minutes): at start the benchmark re-execs
//! itself without any inherited descriptor beyond stdio, every peer is
//! started under `setpriv --pdeathsig KILL` (it dies with the benchmark,
//! whatever the exit path), SIGINT/SIGTERM/SIGHUP run the cleanup (kill the
//! peers, delete the namespaces), and a panic or normal exit runs it through
//! `Drop`. nginx runs without a master process, HAProxy in the foreground, so
//! each peer is exactly one process.
//!
//! CPU time is read from `/proc/<pid>/task/*/schedstat` (nanoseconds, the same
//! quantity as utime+stime in `/proc/<pid>/stat`, without its 10 ms ticks).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use weft_proxy::test_util::TestCa;
use weft_proxy_config::{
    ClientPolicy, Endpoint, Inbound, MeshSettings, MtlsMode, Protocol, ProxyConfig, Service,
    ServicePort,
};

const RATE: u64 = 1000;
const CONNS: usize = 16;
const WARMUP: Duration = Duration::from_secs(1);
const MAX_CONNS: usize = 64;
const MAX_FOR: Duration = Duration::from_secs(3);
const CELL_FOR: Duration = Duration::from_secs(2);
const HANDSHAKE_FOR: Duration = Duration::from_secs(3);
const HANDSHAKE_CONC: usize = 8;
const IDLE_CONNS: usize = 1000;
const PAYLOADS: [usize; 3] = [0, 1024, 16384];

// ---------------------------------------------------------------- options

struct Opts {
    rounds: usize,
    measure: Duration,
    only: Option<Vec<String>>,
    core: bool,
    full: bool,
    /// weft with access logs on and tracing at 1 % (to a collector that
    /// refuses, so export costs nothing but attempts).
    telemetry: bool,
}

fn opts() -> Opts {
    let mut o = Opts {
        rounds: 3,
        measure: Duration::from_secs(5),
        only: None,
        core: false,
        full: false,
        telemetry: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => o.rounds = args.next().and_then(|v| v.parse().ok()).unwrap_or(3).max(1),
            "--measure-secs" => {
                o.measure = Duration::from_secs(
                    args.next().and_then(|v| v.parse().ok()).unwrap_or(5).max(1),
                )
            }
            "--only" => {
                o.only = args
                    .next()
                    .map(|v| v.split(',').map(str::to_owned).collect())
            }
            "--core" => o.core = true,
            "--full" => o.full = true,
            "--telemetry" => o.telemetry = true,
            // cargo bench passes --bench; anything else is ignored with a note.
            "--bench" => {}
            other => eprintln!("pair: ignoring unknown argument {other:?}"),
        }
    }
    o
}

// ---------------------------------------------------------------- hygiene

/// Peers and namespaces to remove on any exit.
static LEFTOVERS: Mutex<(Vec<u32>, Vec<String>)> = Mutex::new((Vec::new(), Vec::new()));

fn cleanup() {
    let (pids, nss) = {
        let mut l = LEFTOVERS.lock().unwrap_or_else(|p| p.into_inner());
        (std::mem::take(&mut l.0), std::mem::take(&mut l.1))
    };
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    for p in &pids {
        let _ = kill(Pid::from_raw(*p as i32), Signal::SIGTERM);
    }
    if !pids.is_empty() {
        std::thread::sleep(Duration::from_millis(300));
    }
    for p in &pids {
        let _ = kill(Pid::from_raw(*p as i32), Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(Pid::from_raw(*p as i32), None);
    }
    for n in &nss {
        let _ = Command::new("ip")
            .args(["netns", "del", n])
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs [`cleanup`] when dropped (normal exit, panic unwinding).
struct Cleanup;
impl Drop for Cleanup {
    fn drop(&mut self) {
        cleanup();
    }
}

/// Re-executes the benchmark with every descriptor above stdio closed, so
/// that nothing it starts inherits (and holds) the build lock.
fn drop_inherited_fds() {
    if std::env::var_os("WEFT_BENCH_CLEAN_FDS").is_some() {
        return;
    }
    let listed: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .filter(|fd| *fd > 2)
                .collect()
        })
        .unwrap_or_default();
    // The directory's own descriptor is closed by now; keep the ones still open.
    let open: Vec<i32> = listed
        .into_iter()
        .filter(|fd| Path::new(&format!("/proc/self/fd/{fd}")).exists())
        .collect();
    if open.is_empty() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut script = String::new();
    for fd in &open {
        let _ = write!(script, "exec {fd}<&-; ");
    }
    script.push_str("exec \"$WEFT_BENCH_EXE\" \"$@\"");
    let err = Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg("pair")
        .args(std::env::args().skip(1))
        .env("WEFT_BENCH_EXE", exe)
        .env("WEFT_BENCH_CLEAN_FDS", "1")
        .exec();
    eprintln!("pair: cannot re-exec without inherited descriptors ({err}); continuing");
}

/// SIGINT/SIGTERM/SIGHUP: clean up and exit. The signals are blocked in
/// every thread (the mask is inherited by threads started later) and waited
/// for here; children get a fresh mask from `Command`.
fn handle_signals() {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    if pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None).is_err() {
        return;
    }
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            eprintln!("pair: {sig:?}: stopping peers and removing namespaces");
            cleanup();
            std::process::exit(130);
        }
    });
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts `cmd` in namespace `ns` pinned to CPU 1, dying with the benchmark.
fn spawn_peer(ns: &str, setpriv: &[&str], cmd: &[String]) -> u32 {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "taskset", "-c", "1", "setpriv"])
        .args(["--pdeathsig", "KILL"])
        .args(setpriv)
        .args(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = c.spawn().expect("spawn peer");
    let pid = child.id();
    LEFTOVERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .0
        .push(pid);
    // Killed and reaped by pid in `cleanup`; dropping the handle neither
    // kills nor waits.
    drop(child);
    pid
}

/// Runs `f` on a thread in `ns` pinned to `cpu`.
fn in_ns<T: Send + 'static>(ns: &str, cpu: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(path).expect("netns file");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let mut set = nix::sched::CpuSet::new();
        let _ = set.set(cpu);
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
        f()
    })
    .join()
    .expect("thread")
}

/// Runs an async load on a fresh single-thread runtime in `ns` on CPU 0.
fn load<T: Send + 'static, F: std::future::Future<Output = T> + 'static>(
    ns: &str,
    f: impl FnOnce() -> F + Send + 'static,
) -> T {
    in_ns(ns, 0, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt")
            .block_on(f())
    })
}

// ---------------------------------------------------------------- the app

/// The app in `ns`: HTTP/1.1 on :8080 and HTTP/2 (prior knowledge) on :8081;
/// `GET /<n>` answers `n` bytes.
fn spawn_app(ns: &str) {
    let path = format!("/var/run/netns/{ns}");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let file = std::fs::File::open(path).expect("netns file");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let mut set = nix::sched::CpuSet::new();
        let _ = set.set(1);
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async move {
            let bodies: Arc<HashMap<usize, Bytes>> = Arc::new(
                PAYLOADS
                    .iter()
                    .map(|n| (*n, Bytes::from(vec![b'x'; *n])))
                    .collect(),
            );
            let svc = move || {
                let bodies = bodies.clone();
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let n = req.uri().path()[1..].parse::<usize>().unwrap_or(1024);
                    let body = bodies.get(&n).cloned().unwrap_or_default();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(body)))
                    }
                })
            };
            let h1 = tokio::net::TcpListener::bind("0.0.0.0:8080")
                .await
                .expect("bind app");
            let h2 = tokio::net::TcpListener::bind("0.0.0.0:8081")
                .await
                .expect("bind app h2");
            let _ = tx.send(());
            let svc2 = svc.clone();
            tokio::spawn(async move {
                while let Ok((s, _)) = h2.accept().await {
                    let _ = s.set_nodelay(true);
                    let svc = svc2();
                    tokio::spawn(async move {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(s), svc)
                            .await;
                    });
                }
            });
            while let Ok((s, _)) = h1.accept().await {
                let _ = s.set_nodelay(true);
                let svc = svc();
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
    });
    rx.recv().expect("app up");
}

// ---------------------------------------------------------------- load

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Proto {
    H1,
    H2,
    Tcp,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::H1 => "HTTP/1.1",
            Proto::H2 => "HTTP/2",
            Proto::Tcp => "TCP",
        }
    }
}

/// One client connection (raw TCP carries HTTP/1.1 through the proxies).
enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Conn {
    async fn open(target: SocketAddr, proto: Proto) -> Option<Conn> {
        let s = tokio::net::TcpStream::connect(target).await.ok()?;
        let _ = s.set_nodelay(true);
        let io = TokioIo::new(s);
        Some(match proto {
            Proto::H1 | Proto::Tcp => {
                let (send, conn) = hyper::client::conn::http1::handshake(io).await.ok()?;
                tokio::spawn(conn);
                Conn::H1(send)
            }
            Proto::H2 => {
                let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .ok()?;
                tokio::spawn(conn);
                Conn::H2(send)
            }
        })
    }

    /// One GET of `payload` bytes; false on any failure.
    async fn get(&mut self, payload: usize) -> bool {
        let resp = match self {
            Conn::H1(s) => {
                let req = http::Request::get(format!("/{payload}"))
                    .header("host", "app")
                    .body(Empty::new())
                    .expect("req");
                s.send_request(req).await
            }
            Conn::H2(s) => {
                let req = http::Request::get(format!("http://app/{payload}"))
                    .body(Empty::new())
                    .expect("req");
                s.send_request(req).await
            }
        };
        match resp {
            Ok(r) if r.status().is_success() => r.into_body().collect().await.is_ok(),
            _ => false,
        }
    }
}

/// Latencies (µs) at a constant rate, corrected for coordinated omission:
/// a pacer thread releases request slots on schedule (round robin over the
/// connections) and each latency is measured from the slot's intended time,
/// so a slow response delays and is charged to the requests behind it.
async fn constant_rate(
    target: SocketAddr,
    proto: Proto,
    payload: usize,
    rate: u64,
    conns: usize,
    dur: Duration,
) -> (Vec<u64>, u64) {
    let mut txs = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        txs.push(tx);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut conn = Conn::open(target, proto).await;
            while let Some(intended) = rx.recv().await {
                let ok = match conn.as_mut() {
                    Some(c) => c.get(payload).await,
                    None => false,
                };
                if ok {
                    lat.push(intended.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                    conn = Conn::open(target, proto).await;
                }
            }
            (lat, errors)
        }));
    }
    let slots = (rate as f64 * dur.as_secs_f64()) as u64;
    let gap = Duration::from_nanos(1_000_000_000 / rate);
    // Give the connections time to open before the schedule starts.
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::thread::spawn(move || {
        let start = Instant::now();
        for j in 0..slots {
            let intended = start + gap * j as u32;
            if let Some(d) = intended.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
            let _ = txs[j as usize % txs.len()].send(intended);
        }
    });
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("task");
        all.extend(l);
        errors += e;
    }
    all.sort_unstable();
    (all, errors)
}

/// Requests per second with `conns` closed-loop connections.
async fn max_throughput(
    target: SocketAddr,
    proto: Proto,
    payload: usize,
    conns: usize,
    dur: Duration,
) -> f64 {
    let end = Instant::now() + dur;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        tasks.push(tokio::spawn(async move {
            let Some(mut c) = Conn::open(target, proto).await else {
                return 0;
            };
            let mut n = 0u64;
            while Instant::now() < end {
                if !c.get(payload).await {
                    break;
                }
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    total as f64 / dur.as_secs_f64()
}

/// Completed full mTLS handshakes (no resumption) with `HANDSHAKE_CONC`
/// concurrent closed-loop clients.
async fn handshakes(target: SocketAddr, cfg: Arc<rustls::ClientConfig>, dur: Duration) -> u64 {
    let end = Instant::now() + dur;
    let mut tasks = Vec::new();
    for _ in 0..HANDSHAKE_CONC {
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move {
            let connector = tokio_rustls::TlsConnector::from(cfg);
            let name = rustls::pki_types::ServerName::IpAddress(target.ip().into());
            let mut n = 0u64;
            while Instant::now() < end {
                let Ok(s) = tokio::net::TcpStream::connect(target).await else {
                    break;
                };
                if connector.connect(name.clone(), s).await.is_ok() {
                    n += 1;
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    total
}

/// Opens `n` connections, sends one request on each, and keeps them open
/// until `hold` is signalled.
async fn idle_conns(
    target: SocketAddr,
    n: usize,
    opened: std::sync::mpsc::Sender<usize>,
    hold: std::sync::mpsc::Receiver<()>,
) {
    let mut conns = Vec::new();
    for _ in 0..n {
        if let Some(mut c) = Conn::open(target, Proto::H1).await
            && c.get(0).await
        {
            conns.push(c);
        }
    }
    let _ = opened.send(conns.len());
    let _ = tokio::task::spawn_blocking(move || hold.recv()).await;
    drop(conns);
}

// ---------------------------------------------------------------- /proc

fn pct(v: &[u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i] as f64 / 1000.0
}

/// CPU seconds of every thread of `pids`.
fn cpu_secs(pids: &[u32]) -> f64 {
    let mut ns = 0u64;
    for p in pids {
        let Ok(rd) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in rd.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
                ns += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    ns as f64 / 1e9
}

fn status_kb(pids: &[u32], field: &str) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .sum()
}

fn mb(pids: &[u32], field: &str) -> f64 {
    status_kb(pids, field) as f64 / 1024.0 / pids.len().max(1) as f64
}

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

// ---------------------------------------------------------------- targets

struct Target {
    name: &'static str,
    ns: String,
    h1: SocketAddr,
    h2: Option<SocketAddr>,
    tcp: Option<SocketAddr>,
    /// The server side's TLS listener, for the handshake rate.
    tls: Option<SocketAddr>,
    /// Client sidecar, server sidecar.
    sidecars: Vec<u32>,
}

impl Target {
    fn addr(&self, p: Proto) -> Option<SocketAddr> {
        match p {
            Proto::H1 => Some(self.h1),
            Proto::H2 => self.h2,
            Proto::Tcp => self.tcp,
        }
    }
}

#[derive(Default, Clone)]
struct Row {
    p50: Vec<f64>,
    p90: Vec<f64>,
    p99: Vec<f64>,
    p999: Vec<f64>,
    max: Vec<f64>,
    vcpu: Vec<f64>,
    rss_idle: f64,
    rss_load: Vec<f64>,
    rss_peak: Vec<f64>,
    maxrps: Vec<f64>,
    errors: u64,
    handshakes: f64,
    idle_per_1000: Option<(f64, f64)>,
}

/// One constant-rate window: latencies, vCPU per 1000 rps per sidecar, RSS
/// per sidecar at the end.
struct Window {
    lat: Vec<u64>,
    errors: u64,
    vcpu: f64,
    rss: f64,
}

fn window(t: &Target, proto: Proto, payload: usize, conns: usize, dur: Duration) -> Window {
    let addr = t.addr(proto).expect("protocol offered");
    let before = cpu_secs(&t.sidecars);
    let t0 = Instant::now();
    let (lat, errors) = load(&t.ns, move || {
        constant_rate(addr, proto, payload, RATE, conns, dur)
    });
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs(&t.sidecars) - before;
    let achieved = lat.len() as f64 / secs;
    let vcpu = if t.sidecars.is_empty() || achieved == 0.0 {
        0.0
    } else {
        cpu / secs / t.sidecars.len() as f64 / (achieved / 1000.0)
    };
    Window {
        lat,
        errors,
        vcpu,
        rss: mb(&t.sidecars, "VmRSS:"),
    }
}

// ---------------------------------------------------------------- setup

struct Setup {
    targets: Vec<Target>,
    /// mTLS client settings for the handshake rate: weft's (ALPN weft/h1:
    /// the server proxy waits for a request, as nginx and HAProxy do, instead
    /// of dialling the app for an opaque stream) and the same without ALPN
    /// for nginx/HAProxy.
    tls_weft: Arc<rustls::ClientConfig>,
    tls_plain: Arc<rustls::ClientConfig>,
    _work: tempfile::TempDir,
}

fn setup(o: &Opts) -> Setup {
    let bin = env!("CARGO_BIN_EXE_weft-proxy");
    let work = tempfile::tempdir().expect("tmp");
    sh(&["chmod", "755", work.path().to_str().expect("utf8")]);
    let id = std::process::id();
    let (nc, nsrv) = (format!("weftb-c-{id}"), format!("weftb-s-{id}"));
    for n in [&nc, &nsrv] {
        sh(&["ip", "netns", "add", n]);
        LEFTOVERS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .push(n.clone());
    }
    sh(&[
        "ip", "-n", &nc, "link", "add", "vb0", "type", "veth", "peer", "name", "vb1", "netns",
        &nsrv,
    ]);
    for (n, dev, ip) in [(&nc, "vb0", "10.78.0.1/24"), (&nsrv, "vb1", "10.78.0.2/24")] {
        sh(&["ip", "-n", n, "addr", "add", ip, "dev", dev]);
        sh(&["ip", "-n", n, "link", "set", dev, "up"]);
        sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
    }
    sh(&[
        "ip",
        "-n",
        &nc,
        "route",
        "add",
        "10.96.0.0/16",
        "dev",
        "vb0",
    ]);
    // The handshake clients dial the server pod's port 8080 from the client
    // namespace: excluded from the client sidecar's capture, they reach the
    // server sidecar's inbound listener as a peer proxy would (captured,
    // the client sidecar would wrap their TLS in its own mTLS, as it does
    // for any meshed pod IP).
    sh(&[
        "ip",
        "netns",
        "exec",
        &nc,
        bin,
        "init",
        "--iptables",
        "nft",
        "--exclude-outbound-ports",
        "8080",
    ]);
    sh(&[
        "ip",
        "netns",
        "exec",
        &nsrv,
        bin,
        "init",
        "--iptables",
        "nft",
    ]);

    // Identities and configs.
    let ca = TestCa::new("bench CA");
    let td = "cluster.local";
    let cid = "spiffe://cluster.local/ns/bench/sa/client";
    let sid = "spiffe://cluster.local/ns/bench/sa/server";
    let (cl, sl) = (ca.leaf(cid, 86400), ca.leaf(sid, 86400));
    let cfg = |services: Vec<Service>| {
        let mut c = ProxyConfig {
            version: 1,
            generation: 1,
            hash: String::new(),
            namespace: "bench".into(),
            mesh: MeshSettings {
                trust_domain: td.into(),
                mtls_mode: MtlsMode::Strict,
                default_access: Default::default(),
                access_log: o.telemetry,
                access_log_options: Default::default(),
                tracing: o.telemetry.then(|| weft_proxy_config::Tracing {
                    otlp_endpoint: "http://127.0.0.1:9".into(),
                    sampling_percent: 1.0,
                }),
                escaped_slashes: Default::default(),
                metrics_naming: Default::default(),
            },
            services,
            inbound: Inbound::default(),
        };
        c.seal();
        c
    };
    let svc = |name: &str, ip: &str, target_port: u16, protocol: Protocol| Service {
        name: name.into(),
        namespace: "bench".into(),
        cluster_ips: vec![ip.parse().expect("ip")],
        ports: vec![ServicePort {
            port: 80,
            name: Some("web".into()),
            target_port,
            protocol,
        }],
        subsets: vec![],
        endpoints: vec![Endpoint {
            address: "10.78.0.2".parse().expect("ip"),
            meshed: true,
            identity: Some(sid.into()),
            pod: None,
            subsets: vec![],
            ports: Default::default(),
            terminating: false,
            workload: None,
            app: None,
            version: None,
        }],
        http_routes: vec![],
        tcp_routes: vec![],
        policy: ClientPolicy::default(),
    };
    let mk_dir = |name: &str, c: &ProxyConfig, leaf: &weft_proxy::test_util::Leaf| {
        let d = work.path().join(name);
        std::fs::create_dir(&d).expect("dir");
        std::fs::write(d.join("proxy.json"), c.to_json()).expect("w");
        std::fs::write(d.join("proxy.json.sig"), ca.sign_config(c)).expect("w");
        std::fs::write(d.join("tls.crt"), &leaf.cert_pem).expect("w");
        std::fs::write(d.join("tls.key"), &leaf.key_pem).expect("w");
        std::fs::write(d.join("ca.crt"), &ca.cert_pem).expect("w");
        sh(&["chmod", "-R", "a+rX", d.to_str().expect("utf8")]);
        d
    };
    let cdir = mk_dir(
        "client",
        &cfg(vec![
            svc("app", "10.96.0.1", 8080, Protocol::Http1),
            svc("app-h2", "10.96.0.2", 8081, Protocol::Http2),
            svc("app-tcp", "10.96.0.3", 8080, Protocol::Opaque),
        ]),
        &cl,
    );
    let sdir = mk_dir("server", &cfg(vec![]), &sl);

    // The client TLS settings weft itself uses, without resumption.
    let files = weft_proxy::tls::identity::IdentityFiles {
        cert_chain: cl.cert_pem.clone().into_bytes(),
        key: cl.key_pem.clone().into_bytes(),
        bundle: ca.cert_pem.clone().into_bytes(),
    };
    let ident = weft_proxy::tls::Identity::load(&files, td, rustls::pki_types::UnixTime::now())
        .expect("client identity");
    let server_id = weft_proxy::tls::SpiffeId::parse(sid).expect("id");
    let mut tls_weft = (*ident
        .client_config(&server_id, weft_proxy::tls::Alpn::Http1)
        .expect("client config"))
    .clone();
    tls_weft.resumption = rustls::client::Resumption::disabled();
    let mut tls_plain = tls_weft.clone();
    tls_plain.alpn_protocols.clear();

    spawn_app(&nsrv);
    let weft = |ns: &str, dir: &Path| {
        spawn_peer(
            ns,
            &["--reuid=1337", "--regid=1337", "--clear-groups"],
            &[
                bin.to_owned(),
                "run".into(),
                "--config-dir".into(),
                dir.to_string_lossy().into_owned(),
                "--log-level".into(),
                "warn".into(),
            ],
        )
    };
    let weft_pids = vec![weft(&nc, &cdir), weft(&nsrv, &sdir)];

    // nginx and HAProxy pairs on loopback in the server namespace.
    let p = |f: &str| work.path().join(f).to_string_lossy().into_owned();
    let write = |name: &str, body: &str| {
        let path = work.path().join(name);
        std::fs::write(&path, body).expect("write");
        path.to_string_lossy().into_owned()
    };
    write("ca.crt", &ca.cert_pem);
    write("c.crt", &cl.cert_pem);
    write("c.key", &cl.key_pem);
    write("s.crt", &sl.cert_pem);
    write("s.key", &sl.key_pem);
    write("c.pem", &format!("{}{}", cl.cert_pem, cl.key_pem));
    write("s.pem", &format!("{}{}", sl.cert_pem, sl.key_pem));
    std::fs::create_dir_all(p("tmp")).expect("tmp");
    let nginx_common = |name: &str| {
        format!(
            "worker_processes 1; master_process off; daemon off; pid {pid}; error_log {err} error;\nevents {{ worker_connections 4096; }}\n",
            pid = p(&format!("{name}.pid")),
            err = p(&format!("{name}.err"))
        )
    };
    // nginx 1.22 speaks HTTP/2 only towards clients (its upstreams are
    // HTTP/1.1) and has no stream module in Debian's base package: its
    // HTTP/2 row is h2 in, HTTP/1.1 over the mTLS hop; no raw TCP row.
    let nginx_c = format!(
        "{}http {{ access_log off; client_body_temp_path {t}; proxy_temp_path {t}; keepalive_requests 1000000;\n upstream srv {{ server 127.0.0.1:18443; keepalive 64; keepalive_requests 1000000; }}\n server {{ listen 127.0.0.1:18081; listen 127.0.0.1:18091 http2; location / {{ proxy_pass https://srv; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_ssl_certificate {cc}; proxy_ssl_certificate_key {ck}; proxy_ssl_protocols TLSv1.3; proxy_ssl_session_reuse on; }} }} }}\n",
        nginx_common("nc"),
        t = p("tmp"),
        cc = p("c.crt"),
        ck = p("c.key")
    );
    let nginx_s = format!(
        "{}http {{ access_log off; client_body_temp_path {t}; proxy_temp_path {t}; keepalive_requests 1000000;\n upstream app {{ server 127.0.0.1:8080; keepalive 64; keepalive_requests 1000000; }}\n server {{ listen 127.0.0.1:18443 ssl; ssl_certificate {sc}; ssl_certificate_key {sk}; ssl_protocols TLSv1.3; ssl_verify_client on; ssl_client_certificate {ca}; location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }} }}\n",
        nginx_common("ns"),
        t = p("tmp"),
        sc = p("s.crt"),
        sk = p("s.key"),
        ca = p("ca.crt")
    );
    let haproxy_c = format!(
        "global\n nbthread 1\n maxconn 4096\ndefaults\n timeout connect 5s\n timeout client 30s\n timeout server 30s\nfrontend f\n mode http\n http-reuse always\n bind 127.0.0.1:18082\n default_backend b\nfrontend f2\n mode http\n bind 127.0.0.1:18092 proto h2\n default_backend b2\nbackend b\n mode http\n http-reuse always\n server s 127.0.0.1:18444 ssl crt {c} ca-file {ca} verify required ssl-min-ver TLSv1.3\nbackend b2\n mode http\n http-reuse always\n server s 127.0.0.1:18454 ssl crt {c} ca-file {ca} verify required ssl-min-ver TLSv1.3 alpn h2\nfrontend ft\n mode tcp\n bind 127.0.0.1:18093\n default_backend bt\nbackend bt\n mode tcp\n server s 127.0.0.1:18464 ssl crt {c} ca-file {ca} verify required ssl-min-ver TLSv1.3\n",
        c = p("c.pem"),
        ca = p("ca.crt")
    );
    let haproxy_s = format!(
        "global\n nbthread 1\n maxconn 4096\ndefaults\n timeout connect 5s\n timeout client 30s\n timeout server 30s\nfrontend f\n mode http\n bind 127.0.0.1:18444 ssl crt {s} ca-file {ca} verify required ssl-min-ver TLSv1.3\n default_backend b\nbackend b\n mode http\n http-reuse always\n server app 127.0.0.1:8080\nfrontend f2\n mode http\n bind 127.0.0.1:18454 ssl crt {s} ca-file {ca} verify required ssl-min-ver TLSv1.3 alpn h2\n default_backend b2\nbackend b2\n mode http\n http-reuse always\n server app 127.0.0.1:8081 proto h2\nfrontend ft\n mode tcp\n bind 127.0.0.1:18464 ssl crt {s} ca-file {ca} verify required ssl-min-ver TLSv1.3\n default_backend bt\nbackend bt\n mode tcp\n server app 127.0.0.1:8080\n",
        s = p("s.pem"),
        ca = p("ca.crt")
    );
    let want = |name: &str| o.only.as_ref().is_none_or(|v| v.iter().any(|x| x == name));
    let mut nginx_pids = Vec::new();
    let mut haproxy_pids = Vec::new();
    if want("nginx") {
        for conf in [write("nc.conf", &nginx_c), write("ns.conf", &nginx_s)] {
            nginx_pids.push(spawn_peer(&nsrv, &[], &["nginx".into(), "-c".into(), conf]));
        }
    }
    if want("haproxy") {
        for conf in [write("hc.cfg", &haproxy_c), write("hs.cfg", &haproxy_s)] {
            haproxy_pids.push(spawn_peer(
                &nsrv,
                &[],
                &["haproxy".into(), "-db".into(), "-f".into(), conf],
            ));
        }
    }
    std::thread::sleep(Duration::from_secs(2));

    let a = |s: &str| -> SocketAddr { s.parse().expect("addr") };
    let mut targets = vec![
        Target {
            name: "direct",
            ns: nsrv.clone(),
            h1: a("127.0.0.1:8080"),
            h2: Some(a("127.0.0.1:8081")),
            tcp: Some(a("127.0.0.1:8080")),
            tls: None,
            sidecars: vec![],
        },
        Target {
            name: "weft",
            ns: nc.clone(),
            h1: a("10.96.0.1:80"),
            h2: Some(a("10.96.0.2:80")),
            tcp: Some(a("10.96.0.3:80")),
            // Captured by the server sidecar's inbound listener (from the
            // client namespace, port 8080 excluded from its capture).
            tls: Some(a("10.78.0.2:8080")),
            sidecars: weft_pids,
        },
    ];
    if want("nginx") {
        targets.push(Target {
            name: "nginx",
            ns: nsrv.clone(),
            h1: a("127.0.0.1:18081"),
            h2: Some(a("127.0.0.1:18091")),
            tcp: None,
            tls: Some(a("127.0.0.1:18443")),
            sidecars: nginx_pids,
        });
    }
    if want("haproxy") {
        targets.push(Target {
            name: "haproxy",
            ns: nsrv.clone(),
            h1: a("127.0.0.1:18082"),
            h2: Some(a("127.0.0.1:18092")),
            tcp: Some(a("127.0.0.1:18093")),
            tls: Some(a("127.0.0.1:18444")),
            sidecars: haproxy_pids,
        });
    }
    // direct stays as the baseline; weft only when asked for (or by default).
    if !want("weft") {
        targets.retain(|t| t.name != "weft");
    }
    Setup {
        targets,
        tls_weft: Arc::new(tls_weft),
        tls_plain: Arc::new(tls_plain),
        _work: work,
    }
}

// ---------------------------------------------------------------- main

fn main() {
    drop_inherited_fds();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the pair benchmark needs root (network namespaces, iptables); run it as root");
        std::process::exit(1);
    }
    for bin in [
        "nginx",
        "haproxy",
        "taskset",
        "setpriv",
        "iptables-nft",
        "bash",
    ] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            eprintln!("{bin} missing: apt-get install -y nginx haproxy util-linux iptables bash");
            std::process::exit(1);
        }
    }
    handle_signals();
    let _cleanup = Cleanup;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let o = opts();
    let started = Instant::now();
    let s = setup(&o);
    let targets = &s.targets;
    let mut rows: Vec<Row> = vec![Row::default(); targets.len()];
    for (ti, t) in targets.iter().enumerate() {
        rows[ti].rss_idle = mb(&t.sidecars, "VmRSS:");
        rows[ti].handshakes = f64::NAN;
    }

    // Main comparison: HTTP/1.1, 1 KiB, 1000 rps, 16 connections; then the
    // maximum with 64 connections. Interleaved rounds.
    for round in 0..o.rounds {
        for (ti, t) in targets.iter().enumerate() {
            let addr = t.h1;
            load(&t.ns, move || {
                constant_rate(addr, Proto::H1, 1024, RATE, CONNS, WARMUP)
            });
            let w = window(t, Proto::H1, 1024, CONNS, o.measure);
            let maxrps = load(&t.ns, move || {
                max_throughput(addr, Proto::H1, 1024, MAX_CONNS, MAX_FOR)
            });
            let r = &mut rows[ti];
            r.p50.push(pct(&w.lat, 0.5));
            r.p90.push(pct(&w.lat, 0.9));
            r.p99.push(pct(&w.lat, 0.99));
            r.p999.push(pct(&w.lat, 0.999));
            r.max.push(pct(&w.lat, 1.0));
            r.vcpu.push(w.vcpu);
            r.rss_load.push(w.rss);
            r.rss_peak.push(mb(&t.sidecars, "VmHWM:"));
            r.maxrps.push(maxrps);
            r.errors += w.errors;
            eprintln!(
                "round {round} {}: {} ok, {} errors, p50 {:.3} ms p99 {:.3} ms, {:.3} vCPU/1000 rps, max {:.0} rps",
                t.name,
                w.lat.len(),
                w.errors,
                pct(&w.lat, 0.5),
                pct(&w.lat, 0.99),
                w.vcpu,
                maxrps
            );
        }
    }

    // Handshakes per server-core-second and RSS per 1000 idle connections.
    if !o.core {
        for (ti, t) in targets.iter().enumerate() {
            let Some(addr) = t.tls else { continue };
            let cfg = if t.name == "weft" {
                s.tls_weft.clone()
            } else {
                s.tls_plain.clone()
            };
            // The server side is the second sidecar.
            let server = [t.sidecars[1]];
            let before = cpu_secs(&server);
            let n = load(&t.ns, move || handshakes(addr, cfg, HANDSHAKE_FOR));
            let cpu = cpu_secs(&server) - before;
            rows[ti].handshakes = if cpu > 0.0 { n as f64 / cpu } else { f64::NAN };
            eprintln!(
                "{}: {n} handshakes, server CPU {cpu:.2} s, {:.0} per core-second",
                t.name, rows[ti].handshakes
            );
        }
        for (ti, t) in targets.iter().enumerate() {
            if t.sidecars.is_empty() {
                continue;
            }
            std::thread::sleep(Duration::from_millis(500));
            let before: Vec<f64> = t.sidecars.iter().map(|p| mb(&[*p], "VmRSS:")).collect();
            let (otx, orx) = std::sync::mpsc::channel();
            let (htx, hrx) = std::sync::mpsc::channel();
            let addr = t.h1;
            let ns = t.ns.clone();
            let holder = std::thread::spawn(move || {
                load(&ns, move || idle_conns(addr, IDLE_CONNS, otx, hrx))
            });
            let opened = orx.recv().unwrap_or(0);
            std::thread::sleep(Duration::from_millis(500));
            let after: Vec<f64> = t.sidecars.iter().map(|p| mb(&[*p], "VmRSS:")).collect();
            let _ = htx.send(());
            let _ = holder.join();
            if opened > 0 {
                let k = 1000.0 / opened as f64;
                rows[ti].idle_per_1000 =
                    Some(((after[0] - before[0]) * k, (after[1] - before[1]) * k));
            }
            eprintln!(
                "{}: {opened} idle connections, RSS client {:.1} → {:.1} MB, server {:.1} → {:.1} MB",
                t.name, before[0], after[0], before[1], after[1]
            );
        }
    }

    // The matrix: one axis at a time around the main point, or the whole
    // cross product with --full. Short single windows, interleaved targets.
    let mut cells: Vec<(Proto, usize, usize)> = Vec::new();
    if !o.core {
        if o.full {
            for proto in [Proto::H1, Proto::H2, Proto::Tcp] {
                for payload in PAYLOADS {
                    for conns in [1, 16, 64] {
                        cells.push((proto, payload, conns));
                    }
                }
            }
        } else {
            for payload in [0, 16384] {
                cells.push((Proto::H1, payload, CONNS));
            }
            for proto in [Proto::H2, Proto::Tcp] {
                cells.push((proto, 1024, CONNS));
            }
            for conns in [1, 64] {
                cells.push((Proto::H1, 1024, conns));
            }
        }
    }
    // (cell, target) → (p50, p99, vCPU, max rps)
    let mut matrix: HashMap<(usize, usize), (f64, f64, f64, f64)> = HashMap::new();
    for (ci, &(proto, payload, conns)) in cells.iter().enumerate() {
        for (ti, t) in targets.iter().enumerate() {
            let Some(addr) = t.addr(proto) else { continue };
            load(&t.ns, move || {
                constant_rate(
                    addr,
                    proto,
                    payload,
                    RATE,
                    conns,
                    Duration::from_millis(300),
                )
            });
            let w = window(t, proto, payload, conns, CELL_FOR);
            let maxrps = load(&t.ns, move || {
                max_throughput(addr, proto, payload, conns.max(16), CELL_FOR)
            });
            matrix.insert(
                (ci, ti),
                (pct(&w.lat, 0.5), pct(&w.lat, 0.99), w.vcpu, maxrps),
            );
        }
        eprintln!("matrix {} {} B {} conns done", proto.name(), payload, conns);
    }

    let md = report(&o, targets, &rows, &cells, &matrix, started.elapsed());
    println!("{md}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(out.join("pair.md"), &md);
    let _ = std::fs::write(out.join("pair.svg"), plot(targets, &rows));
    eprintln!(
        "wrote {} and {}",
        out.join("pair.md").display(),
        out.join("pair.svg").display()
    );
}

// ---------------------------------------------------------------- report

fn report(
    o: &Opts,
    targets: &[Target],
    rows: &[Row],
    cells: &[(Proto, usize, usize)],
    matrix: &HashMap<(usize, usize), (f64, f64, f64, f64)>,
    took: Duration,
) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "HTTP/1.1, 1 KiB responses, {RATE} rps over {CONNS} connections for {}s (latency from the intended send time: no coordinated omission), max throughput with {MAX_CONNS} closed-loop connections for {}s; medians of {} interleaved rounds. Proxies and the app pinned to CPU 1, the load generator to CPU 0. vCPU from schedstat over the constant-rate window, per sidecar. Run took {:.0} s.\n",
        o.measure.as_secs(),
        MAX_FOR.as_secs(),
        o.rounds,
        took.as_secs_f64()
    );
    md.push_str("| target | added p50 ms | added p90 ms | added p99 ms | added p99.9 ms | added max ms | vCPU/1000 rps per sidecar | RSS idle MB | RSS at 1000 rps MB | RSS peak MB | max rps | % of direct | mTLS handshakes per server-core-s | RSS per 1000 idle conns MB (client, server) | errors |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let direct_max = median(&rows[0].maxrps);
    let d = |ti: usize, f: fn(&Row) -> &Vec<f64>| median(f(&rows[ti])) - median(f(&rows[0]));
    for (ti, t) in targets.iter().enumerate() {
        let lat: [f64; 5] = if ti == 0 {
            [
                median(&rows[0].p50),
                median(&rows[0].p90),
                median(&rows[0].p99),
                median(&rows[0].p999),
                median(&rows[0].max),
            ]
        } else {
            [
                d(ti, |r| &r.p50),
                d(ti, |r| &r.p90),
                d(ti, |r| &r.p99),
                d(ti, |r| &r.p999),
                d(ti, |r| &r.max),
            ]
        };
        let r = &rows[ti];
        let side = !t.sidecars.is_empty();
        let opt = |v: f64, prec: usize| {
            if side && v.is_finite() {
                format!("{v:.prec$}")
            } else {
                "–".to_owned()
            }
        };
        let _ = writeln!(
            md,
            "| {}{} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {:.0} | {:.0}% | {} | {} | {} |",
            t.name,
            if ti == 0 { " (absolute)" } else { "" },
            lat[0],
            lat[1],
            lat[2],
            lat[3],
            lat[4],
            opt(median(&r.vcpu), 3),
            opt(r.rss_idle, 1),
            opt(median(&r.rss_load), 1),
            opt(median(&r.rss_peak), 1),
            median(&r.maxrps),
            100.0 * median(&r.maxrps) / direct_max,
            opt(r.handshakes, 0),
            r.idle_per_1000
                .map_or("–".to_owned(), |(c, s)| format!("{c:.1}, {s:.1}")),
            r.errors
        );
    }
    if let Some(w) = targets.iter().position(|t| t.name == "weft") {
        md.push('\n');
        for (pi, p) in targets.iter().enumerate() {
            if p.sidecars.is_empty() || pi == w {
                continue;
            }
            let ratio = |f: fn(&Row) -> &Vec<f64>| median(f(&rows[w])) / median(f(&rows[pi]));
            let _ = writeln!(
                md,
                "weft / {}: added p50 {:.2}, added p99 {:.2}, vCPU {:.2}, RSS idle {:.2}, max rps {:.2}, handshakes {:.2}",
                p.name,
                d(w, |r| &r.p50) / d(pi, |r| &r.p50),
                d(w, |r| &r.p99) / d(pi, |r| &r.p99),
                ratio(|r| &r.vcpu),
                rows[w].rss_idle / rows[pi].rss_idle,
                ratio(|r| &r.maxrps),
                rows[w].handshakes / rows[pi].handshakes,
            );
        }
    }
    if !cells.is_empty() {
        let _ = writeln!(
            md,
            "\nMatrix ({RATE} rps for {}s per cell, one window; max rps with max(16, conns) closed-loop connections for {}s). Cells: added p50 / added p99 ms, vCPU/1000 rps per sidecar, max rps. nginx has no HTTP/2 upstream (h2 in, HTTP/1.1 over mTLS) and no raw TCP in Debian's base package.\n",
            CELL_FOR.as_secs(),
            CELL_FOR.as_secs()
        );
        md.push_str("| protocol | payload | conns |");
        for t in targets {
            let _ = write!(md, " {} |", t.name);
        }
        md.push_str("\n|---|---|---|");
        for _ in targets {
            md.push_str("---|");
        }
        md.push('\n');
        for (ci, (proto, payload, conns)) in cells.iter().enumerate() {
            let _ = write!(md, "| {} | {payload} B | {conns} |", proto.name());
            let base = matrix.get(&(ci, 0)).copied();
            for ti in 0..targets.len() {
                match (matrix.get(&(ci, ti)), base) {
                    (Some(&(p50, p99, _, max)), _) if ti == 0 => {
                        let _ = write!(md, " {p50:.3} / {p99:.3} abs, {max:.0} rps |");
                    }
                    (Some(&(p50, p99, vcpu, max)), Some((b50, b99, _, _))) => {
                        let _ = write!(
                            md,
                            " {:.3} / {:.3}, {vcpu:.3}, {max:.0} rps |",
                            p50 - b50,
                            p99 - b99
                        );
                    }
                    _ => md.push_str(" n/a |"),
                }
            }
            md.push('\n');
        }
    }
    md
}

/// Four bar groups (added p50, added p99, vCPU/1000 rps, max rps % of
/// direct), one bar per proxy, as a self-contained SVG.
fn plot(targets: &[Target], rows: &[Row]) -> String {
    let colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"];
    let (b50, b99) = (median(&rows[0].p50), median(&rows[0].p99));
    let direct_max = median(&rows[0].maxrps);
    type Metric = (&'static str, Box<dyn Fn(&Row) -> f64>);
    let metrics: Vec<Metric> = vec![
        (
            "added p50 (ms)",
            Box::new(move |r: &Row| median(&r.p50) - b50),
        ),
        (
            "added p99 (ms)",
            Box::new(move |r: &Row| median(&r.p99) - b99),
        ),
        ("vCPU per 1000 rps", Box::new(|r: &Row| median(&r.vcpu))),
        (
            "max rps, % of direct",
            Box::new(move |r: &Row| 100.0 * median(&r.maxrps) / direct_max),
        ),
    ];
    let (w, h, pad) = (900.0, 320.0, 40.0);
    let gw = (w - pad) / metrics.len() as f64;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{pad}\" y=\"18\" font-size=\"14\">sidecar pair, HTTP/1.1 1 KiB, 1000 rps / 16 conns (medians)</text>\n"
    );
    let proxies: Vec<usize> = (1..targets.len()).collect();
    for (mi, (label, f)) in metrics.iter().enumerate() {
        let vals: Vec<f64> = proxies.iter().map(|&ti| f(&rows[ti]).max(0.0)).collect();
        let top = vals
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max)
            * 1.15;
        let x0 = pad + gw * mi as f64;
        let (y0, ch) = (h - 50.0, h - 110.0);
        let _ = writeln!(
            svg,
            "<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"middle\">{label}</text>\n<line x1=\"{:.0}\" y1=\"{y0}\" x2=\"{:.0}\" y2=\"{y0}\" stroke=\"black\"/>",
            x0 + gw / 2.0,
            h - 20.0,
            x0 + 10.0,
            x0 + gw - 10.0
        );
        let bw = (gw - 40.0) / vals.len().max(1) as f64;
        for (k, v) in vals.iter().enumerate() {
            let bh = if top > 0.0 && v.is_finite() {
                v / top * ch
            } else {
                0.0
            };
            let x = x0 + 20.0 + bw * k as f64;
            let _ = writeln!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                y0 - bh,
                bw - 4.0,
                colors[(k + 1) % colors.len()],
                x + (bw - 4.0) / 2.0,
                y0 - bh - 4.0,
                if *v >= 100.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.3}")
                }
            );
        }
    }
    for (k, &ti) in proxies.iter().enumerate() {
        let _ = writeln!(
            svg,
            "<rect x=\"{:.0}\" y=\"30\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{:.0}\" y=\"39\">{}</text>",
            pad + 110.0 * k as f64,
            colors[(k + 1) % colors.len()],
            pad + 14.0 + 110.0 * k as f64,
            targets[ti].name
        );
    }
    svg.push_str("</svg>\n");
    svg
}
