//! Heap allocations per request through a weft proxy pair, in process.
//!
//! ```text
//! load client ──stamp 10.96.0.x:80──► client proxy ──mTLS──► server proxy ──► app 127.0.0.1:P
//! load client ─────────────────────────────────────────────────────────────► app 127.0.0.1:P   (direct)
//! ```
//!
//! Both proxies, the app and the load client share one current-thread
//! runtime (the sidecar's default flavour) on loopback, with real mTLS and
//! stamped original destinations instead of iptables, as the component tests
//! do. Each load (HTTP/1.1 POST with a 1 KiB body and a 1 KiB answer; HTTP/2
//! gRPC-style POST, 1 KiB each way with trailers, to a Service with protocol
//! Http2) is warmed up, so pools, caches and metric series exist, then
//! measured: N requests one after the other on one connection, then N
//! requests 16 at a time (16 HTTP/1 connections; 16 streams on one HTTP/2
//! connection). HTTP/1.1 runs three times: through a pair as it ships (a
//! request takes an idle HTTP/1.1 lane between the proxies, and only one
//! finding every lane busy becomes an HTTP/2 stream), through one whose
//! requests are all streams (`Settings::mux_lanes` 0), and through one with
//! multiplexing off (`Settings::mux`). The same loads against the app directly, in the same
//! run, give what the app and the load client cost; the difference is what
//! the two proxies add. Counts cover the whole process during the window.
//!
//! Then the heap an idle connection holds: a second pair, each proxy on a
//! thread of its own with its own current-thread runtime, so every block
//! it allocates is attributed to it (an allocation group of the tracking
//! allocator); `--idle N` HTTP/1.1 connections (1000) are opened through it
//! one after another, one request each, and held open; counted is what
//! each proxy allocated meanwhile and still holds, per connection. With
//! `--sites`, `--site-idle N` connections (200) again, with where each held
//! block was allocated.
//!
//! The counting global allocator wraps the system allocator; weft forbids
//! `unsafe` code, so the wrapping comes from two small crates: `stats_alloc`
//! counts allocations, reallocations and bytes with atomics, and
//! `tracking-allocator` below it calls a hook on every allocation while
//! tracking is on (never re-entrantly: allocations made by the hook itself are
//! not seen by it), which `--sites` and the idle measurement use. Below the counting layer each block
//! carries a one-word header and a reallocation becomes an allocation, a copy
//! and a free; the counts, taken above it, are what the code asks for.
//!
//! ```text
//! flock /tmp/weft-build.lock cargo bench -p weft-proxy --bench allocs
//! CARGO_PROFILE_BENCH_DEBUG=line-tables-only flock /tmp/weft-build.lock \
//!     cargo bench -p weft-proxy --bench allocs -- --sites      # file:line in sites
//! flock /tmp/weft-build.lock cargo bench -p weft-proxy --bench allocs -- --instructions
//! ```
//!
//! Flags: `--requests N` (measured requests per load, 20000), `--warmup N`
//! (2000), `--conc N` (16), `--idle N` and `--site-idle N` (above), `--sites` (or `WEFT_ALLOCS_SITES=1`: after the
//! counts, run each load again with a backtrace taken for every `--every N`th
//! allocation (97) over `--site-requests N` requests (5000), against the pair
//! and against the app directly, and print the top `--top N` (20) weft
//! frames and sites by what the pair adds per request; then the idle
//! connections' held blocks by site), `--instructions` (run the whole
//! benchmark again under valgrind's callgrind, 2000 requests per load unless
//! `--requests` says, and add user-space instructions per request for each
//! load: a count that, unlike CPU time, barely moves between runs; needs
//! `apt-get install -y valgrind`, about 40 s). Prints Markdown and
//! writes it to `target/bench/allocs.md`. Figures only; nothing is asserted.

#[path = "../tests/support/mod.rs"]
mod support;

use std::alloc::System;
use std::backtrace::Backtrace;
use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, TE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use stats_alloc::{Stats, StatsAlloc};
use support::{CLIENT_ID, Pod, SERVER_ID, SERVER_POD_IP, cluster_ip, config, meshed, service};
use tokio::net::{TcpListener, TcpStream};
use tracking_allocator::{
    AllocationGroupId, AllocationGroupToken, AllocationRegistry, AllocationTracker, Allocator,
};
use weft_proxy::test_util::TestCa;
use weft_proxy_config::{MtlsMode, Protocol};

#[global_allocator]
static HEAP: StatsAlloc<Allocator<System>> = StatsAlloc::new(Allocator::system());

static PAYLOAD: [u8; 1024] = [b'x'; 1024];

// ---------------------------------------------------------------- options

struct Opts {
    requests: usize,
    warmup: usize,
    conc: usize,
    sites: bool,
    site_requests: usize,
    every: u64,
    top: usize,
    idle: usize,
    site_idle: usize,
    /// Run again under callgrind and report instructions per request.
    instructions: bool,
    /// Arguments given, for that run.
    given: Vec<String>,
}

fn opts() -> Opts {
    let mut o = Opts {
        requests: 20_000,
        warmup: 2_000,
        conc: 16,
        sites: std::env::var_os("WEFT_ALLOCS_SITES").is_some_and(|v| v != "0"),
        site_requests: 5_000,
        every: 97,
        top: 20,
        idle: 1_000,
        site_idle: 200,
        instructions: false,
        given: std::env::args().skip(1).collect(),
    };
    let mut args = std::env::args().skip(1);
    let num = |v: Option<String>, d: usize| v.and_then(|v| v.parse().ok()).unwrap_or(d).max(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--requests" => o.requests = num(args.next(), o.requests),
            "--warmup" => o.warmup = num(args.next(), o.warmup),
            "--conc" => o.conc = num(args.next(), o.conc),
            "--sites" => o.sites = true,
            "--site-requests" => o.site_requests = num(args.next(), o.site_requests),
            "--every" => o.every = num(args.next(), o.every as usize) as u64,
            "--top" => o.top = num(args.next(), o.top),
            "--idle" => o.idle = num(args.next(), o.idle),
            "--site-idle" => o.site_idle = num(args.next(), o.site_idle),
            "--instructions" => o.instructions = true,
            // cargo bench passes --bench.
            "--bench" => {}
            other => eprintln!("allocs: ignoring unknown argument {other:?}"),
        }
    }
    o
}

// ---------------------------------------------------------------- sampling

/// Allocations the sampler saw while sampling was on (reallocations
/// included: below the counting layer they are an allocation and a free).
static SEEN: AtomicU64 = AtomicU64::new(0);
static EVERY: AtomicU64 = AtomicU64::new(97);
/// Whether allocations outside the idle measurement's proxies are sampled.
static SAMPLING: AtomicBool = AtomicBool::new(false);
/// Sampled allocations: where, and how many bytes.
static SAMPLES: Mutex<Vec<(Backtrace, usize)>> = Mutex::new(Vec::new());

/// While tracking is on: counts what the idle measurement's proxies
/// allocate and free (by their allocation groups), and, while sampling, takes
/// a backtrace of every `EVERY`th other allocation. The tracking allocator
/// never calls it re-entrantly, so the capture's own allocations are neither
/// seen nor recursed into.
struct Tracker;

impl AllocationTracker for Tracker {
    fn allocated(&self, addr: usize, size: usize, _wrapped: usize, group: AllocationGroupId) {
        if let Some(role) = role_of(&group) {
            let held = &HELD[role as usize];
            held[0].fetch_add(size as u64, Ordering::Relaxed);
            held[1].fetch_add(1, Ordering::Relaxed);
            let mut live = LIVE.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(live) = live.as_mut() {
                live.insert(addr, (role, Backtrace::force_capture(), size));
            }
            return;
        }
        if !SAMPLING.load(Ordering::Relaxed) {
            return;
        }
        let n = SEEN.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(EVERY.load(Ordering::Relaxed)) {
            let bt = Backtrace::force_capture();
            SAMPLES
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((bt, size));
        }
    }

    fn deallocated(
        &self,
        addr: usize,
        size: usize,
        _wrapped: usize,
        source: AllocationGroupId,
        _current: AllocationGroupId,
    ) {
        if let Some(role) = role_of(&source) {
            let held = &HELD[role as usize];
            held[2].fetch_add(size as u64, Ordering::Relaxed);
            held[3].fetch_add(1, Ordering::Relaxed);
            if let Some(live) = LIVE.lock().unwrap_or_else(PoisonError::into_inner).as_mut() {
                live.remove(&addr);
            }
        }
    }
}

// ---------------------------------------------------------------- app and load

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Proto {
    H1,
    H2,
}

impl Proto {
    fn label(self) -> &'static str {
        match self {
            Proto::H1 => "HTTP/1.1, 1 KiB",
            Proto::H2 => "HTTP/2 gRPC-style, 1 KiB",
        }
    }
}

type AppBody = BoxBody<Bytes, hyper::Error>;

/// An app that reads the request body and answers 1 KiB (gRPC-style: with
/// `grpc-status` trailers). HTTP/1 and HTTP/2 (auto); no Nagle delay, as a
/// gRPC server or any latency-minded app sets.
async fn app(grpc: bool) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let addr = l.local_addr().expect("app addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    let mut body = req.into_body();
                    while let Some(f) = body.frame().await {
                        if f.is_err() {
                            break;
                        }
                    }
                    Ok::<_, Infallible>(answer(grpc))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn answer(grpc: bool) -> Response<AppBody> {
    let data = Bytes::from_static(&PAYLOAD);
    if !grpc {
        return Response::new(Full::new(data).map_err(|e| match e {}).boxed());
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let frames = [
        Ok::<_, hyper::Error>(Frame::data(data)),
        Ok(Frame::trailers(trailers)),
    ];
    let mut r = Response::new(StreamBody::new(futures::stream::iter(frames)).boxed());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    r
}

enum Client {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

async fn handshake(proto: Proto, io: TcpStream) -> Client {
    let io = TokioIo::new(io);
    match proto {
        Proto::H1 => {
            let (send, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("h1 handshake");
            tokio::spawn(conn);
            Client::H1(send)
        }
        Proto::H2 => {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .expect("h2 handshake");
            tokio::spawn(conn);
            Client::H2(send)
        }
    }
}

/// One request; the answer is read to its end.
async fn one(client: &mut Client) {
    let body = Full::new(Bytes::from_static(&PAYLOAD));
    let resp = match client {
        Client::H1(send) => {
            let req = Request::post("/echo")
                .header(HOST, "echo.shop.svc.cluster.local")
                .body(body)
                .expect("request");
            send.ready().await.expect("h1 ready");
            send.send_request(req).await.expect("h1 response")
        }
        Client::H2(send) => {
            let req = Request::post("http://grpc.shop.svc.cluster.local/weft.bench.Echo/Say")
                .header(CONTENT_TYPE, "application/grpc")
                .header(TE, "trailers")
                .body(body)
                .expect("request");
            send.ready().await.expect("h2 ready");
            send.send_request(req).await.expect("h2 response")
        }
    };
    assert_eq!(resp.status(), StatusCode::OK, "the load must succeed");
    let mut body = resp.into_body();
    while let Some(f) = body.frame().await {
        f.expect("response body");
    }
}

/// Where the load goes: the app directly, or the pair's client proxy.
struct Via<'a> {
    name: &'static str,
    pod: Option<&'a Pod>,
    h1: SocketAddr,
    h2: SocketAddr,
}

impl Via<'_> {
    async fn connect(&self, proto: Proto) -> TcpStream {
        let dst = match proto {
            Proto::H1 => self.h1,
            Proto::H2 => self.h2,
        };
        let s = match self.pod {
            Some(pod) => pod.app_connect(dst).await,
            None => TcpStream::connect(dst).await.expect("connect to app"),
        };
        s.set_nodelay(true).expect("nodelay");
        s
    }

    /// Clients for `conc` concurrent requests: as many HTTP/1 connections, or
    /// one HTTP/2 connection shared by as many streams.
    async fn clients(&self, proto: Proto, conc: usize) -> Vec<Client> {
        match proto {
            Proto::H1 => {
                let mut v = Vec::with_capacity(conc);
                for _ in 0..conc {
                    v.push(handshake(proto, self.connect(proto).await).await);
                }
                v
            }
            Proto::H2 => match handshake(proto, self.connect(proto).await).await {
                Client::H2(send) => (0..conc).map(|_| Client::H2(send.clone())).collect(),
                Client::H1(_) => unreachable!("an HTTP/2 handshake"),
            },
        }
    }
}

/// `total` requests spread over `clients`, each client one at a time.
async fn drive(clients: &mut [Client], total: usize) {
    let n = clients.len();
    let per = total / n;
    let extra = total % n;
    futures::future::join_all(clients.iter_mut().enumerate().map(|(i, c)| async move {
        for _ in 0..per + usize::from(i < extra) {
            one(c).await;
        }
    }))
    .await;
}

/// Lets connection tasks finish what the last answer left them to do.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// Counts of one measured window.
#[derive(Clone, Copy, Default)]
struct Window {
    stats: Stats,
    requests: usize,
    took: Duration,
    /// CPU time of the thread running the runtime (everything in the
    /// window runs on it).
    cpu: Duration,
}

impl Window {
    fn per(&self, v: usize) -> f64 {
        v as f64 / self.requests as f64
    }
    fn allocs(&self) -> f64 {
        self.per(self.stats.allocations)
    }
    fn reallocs(&self) -> f64 {
        self.per(self.stats.reallocations)
    }
    fn bytes(&self) -> f64 {
        self.per(self.stats.bytes_allocated)
    }
    /// CPU microseconds per request.
    fn micros(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.requests as f64
    }
}

/// CPU time this thread has run (`/proc/thread-self/schedstat`, ns).
fn thread_cpu() -> Duration {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    let ns = s
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("schedstat's first field");
    Duration::from_nanos(ns)
}

/// Called at each measured window's start and end. Under `--instructions`
/// callgrind dumps its counts each time this is entered, so every other
/// dump holds one window's instructions. (`black_box` keeps the call: an
/// empty function would be dropped as having no effect.)
#[inline(never)]
fn window_mark() {
    std::hint::black_box(());
}

async fn measure(via: &Via<'_>, proto: Proto, conc: usize, o: &Opts) -> Window {
    let mut clients = via.clients(proto, conc).await;
    drive(&mut clients, o.warmup).await;
    settle().await;
    let start = Instant::now();
    window_mark();
    let cpu = thread_cpu();
    let before = HEAP.stats();
    drive(&mut clients, o.requests).await;
    let after = HEAP.stats();
    let cpu = thread_cpu() - cpu;
    window_mark();
    let took = start.elapsed();
    settle().await;
    Window {
        stats: after - before,
        requests: o.requests,
        took,
        cpu,
    }
}

/// Samples of one window with tracking on, and the allocations seen.
async fn sample(
    via: &Via<'_>,
    proto: Proto,
    conc: usize,
    o: &Opts,
) -> (Vec<(Backtrace, usize)>, u64) {
    let mut clients = via.clients(proto, conc).await;
    drive(&mut clients, o.warmup).await;
    settle().await;
    SAMPLES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clear();
    SEEN.store(0, Ordering::Relaxed);
    SAMPLING.store(true, Ordering::Relaxed);
    AllocationRegistry::enable_tracking();
    drive(&mut clients, o.site_requests).await;
    AllocationRegistry::disable_tracking();
    SAMPLING.store(false, Ordering::Relaxed);
    let seen = SEEN.load(Ordering::Relaxed);
    let samples = std::mem::take(&mut *SAMPLES.lock().unwrap_or_else(PoisonError::into_inner));
    settle().await;
    (samples, seen)
}

// ---------------------------------------------------------------- sites

/// Frames of the counting machinery, above every allocation's own.
const MACHINERY: &[&str] = &["stats_alloc", "tracking_allocator"];
/// Frames outside the standard library in a site's key (innermost first).
const KEY_FRAMES: usize = 3;
/// Longest symbol shown (generic arguments make some very long).
const SYMBOL_CHARS: usize = 110;

struct Frame_ {
    symbol: String,
    at: Option<String>,
}

impl Frame_ {
    /// The crate a frame belongs to, from its file when known (inlined
    /// frames carry a bare function name), else from its symbol.
    fn krate(&self) -> String {
        if let Some(at) = &self.at {
            for (prefix, name) in [
                ("proxy/src/", "weft_proxy"),
                ("proxy/config/src/", "weft_proxy_config"),
                ("proxy/benches/", "allocs"),
                ("proxy/tests/", "allocs"),
                ("alloc/", "std"),
                ("core/", "std"),
                ("std/", "std"),
                ("/rust/deps/", "std"),
            ] {
                if at.starts_with(prefix) {
                    return name.into();
                }
            }
            if at.contains("/rustc/") {
                return "std".into();
            }
            // `hyper-1.12.0/src/…`
            if let Some((dir, _)) = at.split_once('/')
                && let Some((name, version)) = dir.rsplit_once('-')
                && version.starts_with(|c: char| c.is_ascii_digit())
            {
                return name.replace('-', "_");
            }
        }
        let s = self.symbol.trim_start_matches('<');
        let head = s.split("::").next().unwrap_or(s);
        head.split('[').next().unwrap_or(head).into()
    }

    fn is_machinery(&self) -> bool {
        MACHINERY.contains(&self.krate().as_str())
            || ["__rust_alloc", "__rust_realloc", "__rg_", "__rdl_"]
                .iter()
                .any(|p| self.symbol.starts_with(p))
    }

    fn is_std(&self) -> bool {
        matches!(self.krate().as_str(), "std" | "core" | "alloc")
    }

    fn render(&self) -> String {
        let mut sym: String = self.symbol.chars().take(SYMBOL_CHARS).collect();
        if sym.len() < self.symbol.len() {
            sym.push('…');
        }
        match &self.at {
            Some(at) => format!("`{sym}` {at}"),
            None => format!("`{sym}`"),
        }
    }
}

/// The frames of a backtrace, innermost first, from its printed form
/// (`N: symbol` lines, each followed by `at file:line:col` when known).
fn frames(bt: &Backtrace) -> Vec<Frame_> {
    let text = bt.to_string();
    let mut out: Vec<Frame_> = Vec::new();
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(at) = t.strip_prefix("at ") {
            if let Some(last) = out.last_mut() {
                last.at = Some(short_path(at));
            }
        } else if let Some((idx, sym)) = t.split_once(": ")
            && !idx.is_empty()
            && idx.bytes().all(|b| b.is_ascii_digit())
        {
            // Full format puts the address first: `0x55d4… - symbol`.
            let sym = match sym.split_once(" - ") {
                Some((addr, s)) if addr.starts_with("0x") => s,
                _ => sym,
            };
            out.push(Frame_ {
                symbol: strip_hash(sym.trim()),
                at: None,
            });
        }
    }
    out
}

/// `foo::bar::h0123456789abcdef` → `foo::bar`.
fn strip_hash(sym: &str) -> String {
    match sym.rsplit_once("::h") {
        Some((head, h)) if h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()) => head.into(),
        _ => sym.into(),
    }
}

/// Registry and toolchain paths shortened to `crate-1.2.3/src/x.rs:12`,
/// weft's to `proxy/src/x.rs:12` (the short format prints paths under the
/// working directory, the package's, as `./…`); the column dropped.
fn short_path(at: &str) -> String {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let under_cwd = std::env::current_dir()
        .ok()
        .and_then(|cwd| {
            let root = repo.parent()?;
            Some(cwd.strip_prefix(root).ok()?.display().to_string())
        })
        .unwrap_or_else(|| "proxy".into());
    let p = if let Some(rest) = at.strip_prefix("./") {
        format!("{under_cwd}/{rest}")
    } else if let Some(rest) = repo
        .parent()
        .and_then(|r| Path::new(at).strip_prefix(r).ok())
    {
        rest.display().to_string()
    } else if let Some((_, rest)) = at.split_once("/registry/src/") {
        rest.split_once('/').map_or(rest, |(_, r)| r).into()
    } else if let Some((_, rest)) = at.split_once("/library/") {
        rest.into()
    } else {
        at.into()
    };
    // file:line:col → file:line
    match p.rsplit_once(':') {
        Some((head, col)) if col.bytes().all(|b| b.is_ascii_digit()) && head.contains(':') => {
            head.into()
        }
        _ => p,
    }
}

/// A site: what was allocated (the outermost standard-library frame under
/// the caller, e.g. `Box::new<T>`), then the innermost `KEY_FRAMES` frames
/// outside the standard library, then the first weft frame if not among them.
fn site_key(frames: &[Frame_]) -> String {
    let start = frames
        .iter()
        .rposition(Frame_::is_machinery)
        .map_or(0, |i| i + 1);
    let rest = &frames[start..];
    let caller = rest.iter().position(|f| !f.is_std());
    let mut key: Vec<String> = Vec::new();
    if let Some(i) = caller.and_then(|i| i.checked_sub(1)) {
        key.push(rest[i].render());
    }
    let outside: Vec<&Frame_> = rest.iter().filter(|f| !f.is_std()).collect();
    key.extend(outside.iter().take(KEY_FRAMES).map(|f| f.render()));
    if !outside
        .iter()
        .take(KEY_FRAMES)
        .any(|f| f.krate() == "weft_proxy")
        && let Some(w) = outside.iter().find(|f| f.krate() == "weft_proxy")
    {
        key.push(format!("… {}", w.render()));
    }
    if key.is_empty() {
        return "(standard library only)".into();
    }
    key.join(" ← ")
}

/// The innermost weft frame: the line in proxy/src that led to the
/// allocation. Allocations with no weft frame on the stack (tasks that hyper
/// spawns itself, the app's and the load client's) are named by their first
/// frame outside the standard library and the task they ran in.
fn weft_key(frames: &[Frame_]) -> String {
    let start = frames
        .iter()
        .rposition(Frame_::is_machinery)
        .map_or(0, |i| i + 1);
    let rest = &frames[start..];
    if let Some(w) = rest.iter().find(|f| f.krate() == "weft_proxy") {
        return w.render();
    }
    // The task: the outermost frame outside the standard library and the
    // runtime under the runtime's poll of a task, e.g. a connection future
    // hyper spawned.
    let harness = rest.iter().position(|f| {
        f.krate() == "tokio"
            && f.at
                .as_deref()
                .is_some_and(|a| a.contains("/runtime/task/"))
    });
    let task = rest[..harness.unwrap_or(rest.len())]
        .iter()
        .rev()
        .find(|f| !f.is_std() && f.krate() != "tokio")
        .map_or_else(String::new, |t| format!(" … in {}", t.render()));
    match rest.iter().find(|f| !f.is_std()) {
        Some(f) => format!("(no weft frame) {}{task}", f.render()),
        None => "(standard library only)".into(),
    }
}

/// Sampled allocations and bytes per key.
type Tally = HashMap<String, (u64, u64)>;

/// Tallies by site and by weft frame.
fn tally(samples: &[(Backtrace, usize)]) -> (Tally, Tally) {
    let (mut sites, mut weft) = (Tally::new(), Tally::new());
    for (bt, size) in samples {
        let f = frames(bt);
        for (m, k) in [(&mut sites, site_key(&f)), (&mut weft, weft_key(&f))] {
            let e = m.entry(k).or_default();
            e.0 += 1;
            e.1 += *size as u64;
        }
    }
    (sites, weft)
}

// ---------------------------------------------------------------- pair

/// `echo`: ClusterIP 1, port 80, detected protocol, to the app `app_h1` on
/// the server pod.
fn echo_service(app_h1: SocketAddr) -> weft_proxy_config::Service {
    service(
        "echo",
        cluster_ip(1),
        80,
        app_h1.port(),
        Protocol::Detect,
        vec![meshed(SERVER_POD_IP, SERVER_ID)],
    )
}

/// The services the client proxy knows: `echo` (detected, HTTP/1) and
/// `grpc` (protocol Http2), both on the server pod. `mux`: HTTP/1.1 between
/// the proxies multiplexed (the default) or as HTTP/1.1 only; `lanes`: the
/// HTTP/1.1 lanes a multiplexing client keeps beside the shared connection
/// (`Settings::mux_lanes`; 0: every request a stream).
async fn pair(
    app_h1: SocketAddr,
    app_h2: SocketAddr,
    ca: &TestCa,
    mux: bool,
    lanes: usize,
) -> (Pod, Pod) {
    let ep = || vec![meshed(SERVER_POD_IP, SERVER_ID)];
    let echo = echo_service(app_h1);
    let grpc = service(
        "grpc",
        cluster_ip(2),
        80,
        app_h2.port(),
        Protocol::Http2,
        ep(),
    );
    let client_cfg = config(1, MtlsMode::Strict, vec![echo, grpc]);
    let server_cfg = config(1, MtlsMode::Strict, vec![]);
    let tweak = |s: &mut weft_proxy::Settings| {
        s.mux = mux;
        s.mux_lanes = lanes;
    };
    let server = Pod::start_with(&server_cfg, &ca.leaf(SERVER_ID, 3600), ca, tweak).await;
    let client = Pod::start_with(&client_cfg, &ca.leaf(CLIENT_ID, 3600), ca, tweak).await;
    for app in [app_h1, app_h2] {
        client.route_to(
            SocketAddr::new(IpAddr::V4(SERVER_POD_IP), app.port()),
            &server,
        );
    }
    (client, server)
}

// ---------------------------------------------------------------- idle connections

/// The two proxies of the idle measurement, each on a thread of its own
/// whose allocations count in an allocation group of its own.
#[derive(Clone, Copy, Debug)]
enum Role {
    Client = 0,
    Server = 1,
}

/// Each role's allocation group (0 until registered).
static GROUPS: [AtomicUsize; 2] = [const { AtomicUsize::new(0) }; 2];
/// Per role, while tracking is on: bytes and blocks allocated, then bytes
/// and blocks of those freed again (by any thread).
static HELD: [[AtomicU64; 4]; 2] = [const { [const { AtomicU64::new(0) }; 4] }; 2];
/// With `--sites`: the blocks each role allocated while tracking was on and
/// has not freed, by address: the role, where, and the size.
type Live = HashMap<usize, (Role, Backtrace, usize)>;
static LIVE: Mutex<Option<Live>> = Mutex::new(None);

fn role_of(group: &AllocationGroupId) -> Option<Role> {
    let id = group.as_usize().get();
    if GROUPS[Role::Client as usize].load(Ordering::Relaxed) == id {
        Some(Role::Client)
    } else if GROUPS[Role::Server as usize].load(Ordering::Relaxed) == id {
        Some(Role::Server)
    } else {
        None
    }
}

/// Starts a proxy on a thread of its own with its own current-thread
/// runtime (as a sidecar runs), its allocations counted as `role`'s.
fn start_on_thread(
    role: Role,
    cfg: weft_proxy_config::ProxyConfig,
    identity: &'static str,
    ca: std::sync::Arc<TestCa>,
) -> Pod {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("{role:?}").to_lowercase())
        .spawn(move || {
            let mut token = AllocationGroupToken::register().expect("an allocation group");
            GROUPS[role as usize].store(token.id().as_usize().get(), Ordering::Relaxed);
            let _in_group = token.enter();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let pod = Pod::start(&cfg, &ca.leaf(identity, 3600), &ca).await;
                let _ = tx.send(pod);
                // Serves until the process ends.
                std::future::pending::<()>().await;
            });
        })
        .expect("proxy thread");
    rx.recv().expect("the proxy starts")
}

/// A client and a server proxy, each on its own thread, HTTP/1.1 between
/// them multiplexed as HTTP/2 streams (the default).
fn threaded_pair(app_h1: SocketAddr, ca: &std::sync::Arc<TestCa>) -> (Pod, Pod) {
    let client_cfg = config(1, MtlsMode::Strict, vec![echo_service(app_h1)]);
    let server_cfg = config(1, MtlsMode::Strict, vec![]);
    let server = start_on_thread(Role::Server, server_cfg, SERVER_ID, ca.clone());
    let client = start_on_thread(Role::Client, client_cfg, CLIENT_ID, ca.clone());
    client.route_to(
        SocketAddr::new(IpAddr::V4(SERVER_POD_IP), app_h1.port()),
        &server,
    );
    (client, server)
}

/// What each proxy allocated while `n` idle connections were opened and
/// still holds.
#[derive(Clone, Copy, Default)]
struct Held {
    /// Per role: bytes, blocks.
    kept: [(u64, u64); 2],
    conns: usize,
}

impl Held {
    fn per_conn(&self, role: Role) -> (f64, f64) {
        let (b, n) = self.kept[role as usize];
        let c = self.conns.max(1) as f64;
        (b as f64 / c, n as f64 / c)
    }
}

/// Opens `n` HTTP/1.1 connections through `via`, one request on each, and
/// counts what each proxy allocated meanwhile and still holds while they
/// stay open (a block allocated before the window and freed in it is not
/// counted: the window's own growth). With `live`, keeps where each held
/// block was allocated.
async fn idle(via: &Via<'_>, n: usize, live: bool) -> (Held, Option<Held>, Live) {
    // A first connection warms up what the proxies keep once (pools,
    // caches, metric series).
    let mut warm = handshake(Proto::H1, via.connect(Proto::H1).await).await;
    one(&mut warm).await;
    drop(warm);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for role in &HELD {
        for c in role {
            c.store(0, Ordering::Relaxed);
        }
    }
    if live {
        *LIVE.lock().unwrap_or_else(PoisonError::into_inner) = Some(Live::new());
    }
    AllocationRegistry::enable_tracking();
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = handshake(Proto::H1, via.connect(Proto::H1).await).await;
        one(&mut c).await;
        conns.push(c);
    }
    // Lets both proxies' threads finish what the last answer left them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let count = |conns: usize| {
        let mut held = Held {
            conns,
            ..Held::default()
        };
        for (i, role) in HELD.iter().enumerate() {
            let [ab, an, fb, fnum] = role.each_ref().map(|c| c.load(Ordering::Relaxed));
            held.kept[i] = (ab.saturating_sub(fb), an.saturating_sub(fnum));
        }
        held
    };
    let held = count(conns.len());
    // Then once the client proxy has parked them all (idle one to two
    // `park_idle_after`, 1 s by default).
    let mut parked = None;
    if let Some(pod) = via.pod.filter(|_| !live) {
        let gauge = &pod.proxy.state.metrics.connections_parked;
        for _ in 0..100 {
            if gauge.get() >= conns.len() as i64 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                parked = Some(count(conns.len()));
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    AllocationRegistry::disable_tracking();
    let live = LIVE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
        .unwrap_or_default();
    drop(conns);
    tokio::time::sleep(Duration::from_millis(200)).await;
    (held, parked, live)
}

fn idle_table(held: &Held, parked: Option<&Held>) -> String {
    let (cb, cn) = held.per_conn(Role::Client);
    let (sb, sn) = held.per_conn(Role::Server);
    let parked = parked.map_or(
        "| client, once it has parked them | not parked within 10 s | |\n".to_owned(),
        |p| {
            let (pb, pn) = p.per_conn(Role::Client);
            format!(
                "| client, once it has parked them (`net::park`) | {} | {} |\n",
                fmt_n(pb),
                fmt_n(pn)
            )
        },
    );
    let mut t = format!(
        "## Heap held per idle connection\n\n\
         {} HTTP/1.1 connections opened one after another through the pair, one 1 KiB request \
         each, then held open. Each proxy runs on a thread of its own (its own current-thread \
         runtime) whose allocations are attributed to it; counted: what it allocated while the \
         connections were opened and still holds while they are open, as requested (the \
         allocator's own overhead per block not included).\n\n\
         | proxy | bytes per idle connection | blocks per idle connection |\n|---|---:|---:|\n\
         | client (the app's connections) | {} | {} |\n\
         | server (its requests reach it on one connection from the client proxy: a lane) | {} | {} |\n",
        held.conns,
        fmt_n(cb),
        fmt_n(cn),
        fmt_n(sb),
        fmt_n(sn),
    );
    t.push_str(&parked);
    t
}

/// Held bytes and blocks by site and by weft frame, per role, per connection.
fn live_section(live: &Live, conns: usize, o: &Opts) -> String {
    let mut s = format!("\n### Where the held blocks were allocated ({conns} idle connections)\n");
    for role in [Role::Client, Role::Server] {
        let mut sites = Tally::new();
        let mut weft = Tally::new();
        for (r, bt, size) in live.values() {
            if *r as usize != role as usize {
                continue;
            }
            let f = frames(bt);
            for (m, k) in [(&mut sites, site_key(&f)), (&mut weft, weft_key(&f))] {
                let e = m.entry(k).or_default();
                e.0 += 1;
                e.1 += *size as u64;
            }
        }
        let _ = writeln!(s, "\n{role:?} proxy, by the innermost weft frame:\n");
        s.push_str(&held_rows(&weft, conns, o.top, "weft frame"));
        let _ = writeln!(s, "\n{role:?} proxy, by site:\n");
        s.push_str(&held_rows(&sites, conns, o.top, "site"));
    }
    s
}

/// The top `top` keys by bytes held, per connection.
fn held_rows(t: &Tally, conns: usize, top: usize, what: &str) -> String {
    let mut rows: Vec<(&String, &(u64, u64))> = t.iter().collect();
    rows.sort_by(|a, b| b.1.1.cmp(&a.1.1).then_with(|| a.0.cmp(b.0)));
    let c = conns.max(1) as f64;
    let mut s =
        format!("| # | bytes per conn | blocks per conn | {what} |\n|---:|---:|---:|---|\n");
    for (i, (k, (n, b))) in rows.iter().take(top).enumerate() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            i + 1,
            fmt_n(*b as f64 / c),
            fmt_n(*n as f64 / c),
            k.replace('|', "\\|")
        );
    }
    s
}

// ---------------------------------------------------------------- report

fn fmt_n(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

struct Row {
    load: String,
    weft: Window,
    direct: Window,
}

fn table(rows: &[Row], o: &Opts) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## Heap allocations per request\n\n\
         {} measured requests per load after {} warm-up requests; concurrent: {} at a time \
         (HTTP/1: {} connections; HTTP/2: {} streams on one connection). One current-thread \
         runtime for both proxies, the app and the load client. \"whole process\": the run \
         through the weft pair; \"app + client\": the same load against the app directly; \
         \"both proxies\": the difference. Bytes: requested by allocations plus growth by \
         reallocations. CPU: the runtime thread's run time (schedstat) over the window, \
         per request, counting allocator included.\n",
        o.requests, o.warmup, o.conc, o.conc, o.conc
    );
    let _ = writeln!(
        s,
        "| load | whole process allocs/req | reallocs/req | bytes/req | app + client allocs/req | reallocs/req | bytes/req | **both proxies allocs/req** | **reallocs/req** | **bytes/req** | CPU µs/req whole | direct | **both proxies** |"
    );
    let _ = writeln!(
        s,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let (w, d) = (&r.weft, &r.direct);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | **{}** | **{}** | **{}** | {:.1} | {:.1} | **{:.1}** |",
            r.load,
            fmt_n(w.allocs()),
            fmt_n(w.reallocs()),
            fmt_n(w.bytes()),
            fmt_n(d.allocs()),
            fmt_n(d.reallocs()),
            fmt_n(d.bytes()),
            fmt_n(w.allocs() - d.allocs()),
            fmt_n(w.reallocs() - d.reallocs()),
            fmt_n(w.bytes() - d.bytes()),
            w.micros(),
            d.micros(),
            w.micros() - d.micros(),
        );
    }
    s
}

/// Keys by what the pair adds per request: pair samples minus direct
/// samples of the same key, scaled by the sampling stride; the top `top`.
fn top_rows(weft: &Tally, direct: &Tally, o: &Opts, what: &str) -> String {
    let scale = o.every as f64 / o.site_requests as f64;
    let mut rows: Vec<(f64, f64, &str)> = weft
        .iter()
        .map(|(k, (n, b))| {
            let (dn, db) = direct.get(k).copied().unwrap_or_default();
            (
                (*n as f64 - dn as f64) * scale,
                (*b as f64 - db as f64) * scale,
                k.as_str(),
            )
        })
        .filter(|r| r.0 > 0.0)
        .collect();
    rows.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.2.cmp(b.2)));
    let mut s = String::new();
    let _ = writeln!(s, "| # | allocs/req | bytes/req | {what} |");
    let _ = writeln!(s, "|---:|---:|---:|---|");
    for (i, (n, b, k)) in rows.iter().take(o.top).enumerate() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            i + 1,
            fmt_n(*n),
            fmt_n(*b),
            k.replace('|', "\\|")
        );
    }
    s
}

/// The sites section of one load.
fn sites_section(
    load: &str,
    weft: &(Tally, Tally),
    direct: &(Tally, Tally),
    seen: (u64, u64),
    o: &Opts,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### {load}\n\n\
         Allocations seen with tracking on (reallocations included): {} per request through \
         the pair, {} directly. One backtrace every {} allocations over {} requests; figures \
         are what the pair adds (its samples less the direct run's, per request).\n",
        fmt_n(seen.0 as f64 / o.site_requests as f64),
        fmt_n(seen.1 as f64 / o.site_requests as f64),
        o.every,
        o.site_requests,
    );
    let _ = writeln!(
        s,
        "By the innermost weft frame (the line in proxy/src that led to the allocation):\n"
    );
    s.push_str(&top_rows(&weft.1, &direct.1, o, "weft frame"));
    let _ = writeln!(
        s,
        "\nBy site: what was allocated (the outermost standard-library frame), then the \
         innermost {KEY_FRAMES} frames outside the standard library (weft, hyper, h2, rustls, \
         tokio, …), innermost first, then the first weft frame further out:\n"
    );
    s.push_str(&top_rows(&weft.0, &direct.0, o, "site"));
    s
}

// ---------------------------------------------------------------- instructions

/// Set for the run under callgrind: where its dumps and the windows' list go.
const CALLGRIND_DIR: &str = "WEFT_ALLOCS_CALLGRIND_DIR";

/// `--instructions`: runs this benchmark again under callgrind, which dumps
/// its counts whenever a measured window starts or ends ([`window_mark`]),
/// and reports user-space instructions per request for each load: through
/// the pair, directly, and what both proxies add. Unlike CPU time, the count
/// barely moves from run to run (no scheduling, frequency or cache noise),
/// so a change of 1 % is a change in the code; it leaves out the kernel,
/// and an instruction that misses the cache counts as one that hits.
fn instructions(o: &Opts) {
    let dir = std::env::temp_dir().join(format!("weft-allocs-callgrind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("callgrind's directory");
    // Fewer requests than the default, unless asked: callgrind runs the
    // code about 50 times slower.
    let mut args: Vec<String> = o
        .given
        .iter()
        .filter(|a| *a != "--instructions")
        .cloned()
        .collect();
    for (flag, n) in [("--requests", 2_000), ("--warmup", 300), ("--idle", 50)] {
        if !args.iter().any(|a| a == flag) {
            args.extend([flag.to_owned(), n.to_string()]);
        }
    }
    let exe = std::env::current_exe().expect("this benchmark's path");
    let status = std::process::Command::new("valgrind")
        .args([
            "--tool=callgrind",
            "--dump-before=*window_mark*",
            &format!("--callgrind-out-file={}", dir.join("cg.out").display()),
        ])
        .arg(&exe)
        .args(&args)
        .env(CALLGRIND_DIR, &dir)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("the run under callgrind failed: {s}"),
        Err(e) => panic!("cannot run valgrind ({e}); install it: apt-get install -y valgrind"),
    }
    let requests = args
        .iter()
        .position(|a| a == "--requests")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse::<f64>().ok())
        .expect("--requests");
    let list = std::fs::read_to_string(dir.join("windows.txt")).expect("the windows' list");
    // Dump 2k is the k-th window (dump 2k-1 is what ran before it).
    let summary = |k: usize| -> f64 {
        let text = std::fs::read_to_string(dir.join(format!("cg.out.{k}")))
            .unwrap_or_else(|e| panic!("callgrind dump {k}: {e}"));
        text.lines()
            .find_map(|l| {
                l.strip_prefix("summary:")
                    .or_else(|| l.strip_prefix("totals:"))
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("callgrind dump {k} has no summary"))
    };
    let windows: Vec<(&str, f64)> = list
        .lines()
        .enumerate()
        .map(|(i, l)| (l, summary(2 * i + 2) / requests))
        .collect();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## Instructions per request\n\n\
         User-space instructions counted by callgrind over each window ({requests} requests \
         after the warm-up), whole process: the pair with the app and the load client, the \
         same load directly, and the difference: what both proxies execute per request.\n"
    );
    let _ = writeln!(s, "| load | through the pair | direct | **both proxies** |");
    let _ = writeln!(s, "|---|---:|---:|---:|");
    for pair in windows.chunks(2) {
        if let [(direct, d), (_, w)] = pair {
            let load = direct.split('\t').next().unwrap_or(direct);
            let _ = writeln!(s, "| {load} | {w:.0} | {d:.0} | **{:.0}** |", w - d);
        }
    }
    print!("{s}");
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/allocs.md");
    let mut report = std::fs::read_to_string(&file).unwrap_or_default();
    report.push_str(&s);
    match std::fs::write(&file, report) {
        Ok(()) => eprintln!("allocs: added the instructions to {}", file.display()),
        Err(e) => eprintln!("allocs: cannot write {}: {e}", file.display()),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- main

fn main() {
    let o = opts();
    if o.instructions && std::env::var_os(CALLGRIND_DIR).is_none() {
        instructions(&o);
        return;
    }
    EVERY.store(o.every, Ordering::Relaxed);
    AllocationRegistry::set_global_tracker(Tracker).expect("one tracker");
    let _ = rustls::crypto::ring::default_provider().install_default();
    // As the sidecar logs by default: JSON on stderr at info.
    tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(
                std::env::var("WEFT_LOG_LEVEL").unwrap_or_else(|_| "info".into()),
            )
            .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let report = rt.block_on(Box::pin(run(&o)));
    print!("{report}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&out);
    let file = out.join("allocs.md");
    match std::fs::write(&file, &report) {
        Ok(()) => eprintln!("allocs: wrote {}", file.display()),
        Err(e) => eprintln!("allocs: cannot write {}: {e}", file.display()),
    }
}

async fn run(o: &Opts) -> String {
    let app_h1 = app(false).await;
    let app_h2 = app(true).await;
    let ca = TestCa::new("weft bench CA");
    let lanes = weft_proxy::http::pool::DEFAULT_MUX_LANES;
    let (client, _server) = pair(app_h1, app_h2, &ca, true, lanes).await;
    let (client_streams, _server_streams) = pair(app_h1, app_h2, &ca, true, 0).await;
    let (client_h1, _server_h1) = pair(app_h1, app_h2, &ca, false, 0).await;
    let weft = |pod| Via {
        name: "weft pair",
        pod: Some(pod),
        h1: SocketAddr::new(cluster_ip(1), 80),
        h2: SocketAddr::new(cluster_ip(2), 80),
    };
    let (mux, streams, no_mux) = (weft(&client), weft(&client_streams), weft(&client_h1));
    let direct = Via {
        name: "direct",
        pod: None,
        h1: app_h1,
        h2: app_h2,
    };
    // (protocol, concurrency, the pair, what the label adds)
    let loads = [
        (Proto::H1, 1, &mux, ""),
        (Proto::H1, o.conc, &mux, ""),
        (
            Proto::H1,
            1,
            &streams,
            ", every request a stream between the proxies (no lanes)",
        ),
        (
            Proto::H1,
            o.conc,
            &streams,
            ", every request a stream between the proxies (no lanes)",
        ),
        (
            Proto::H1,
            1,
            &no_mux,
            ", HTTP/1.1 between the proxies (mux off)",
        ),
        (
            Proto::H1,
            o.conc,
            &no_mux,
            ", HTTP/1.1 between the proxies (mux off)",
        ),
        (Proto::H2, 1, &mux, ""),
        (Proto::H2, o.conc, &mux, ""),
    ];
    let label = |proto: Proto, conc: usize, extra: &str| {
        if conc == 1 {
            format!("{}, sequential{extra}", proto.label())
        } else {
            format!("{}, {conc} concurrent{extra}", proto.label())
        }
    };

    let mut rows = Vec::new();
    // Each measured window's load and target, in order (for `--instructions`).
    let mut windows = Vec::new();
    for (proto, conc, pair, extra) in loads {
        let mut w = [Window::default(); 2];
        for (i, via) in [&direct, pair].into_iter().enumerate() {
            w[i] = measure(via, proto, conc, o).await;
            windows.push(format!("{}\t{}", label(proto, conc, extra), via.name));
            eprintln!(
                "allocs: {} via {}: {} allocs/req ({:.1} s)",
                label(proto, conc, extra),
                via.name,
                fmt_n(w[i].allocs()),
                w[i].took.as_secs_f64()
            );
        }
        rows.push(Row {
            load: label(proto, conc, extra),
            direct: w[0],
            weft: w[1],
        });
    }
    let mut report = table(&rows, o);
    if let Some(dir) = std::env::var_os(CALLGRIND_DIR) {
        let list = Path::new(&dir).join("windows.txt");
        std::fs::write(&list, windows.join("\n")).expect("write the windows' list");
    }

    let ca = std::sync::Arc::new(ca);
    let (idle_client, _idle_server) = threaded_pair(app_h1, &ca);
    let idle_via = Via {
        name: "weft pair, a thread per proxy",
        pod: Some(&idle_client),
        h1: SocketAddr::new(cluster_ip(1), 80),
        h2: SocketAddr::new(cluster_ip(2), 80),
    };
    let (held, parked, _) = idle(&idle_via, o.idle, false).await;
    eprintln!(
        "allocs: {} idle connections: client proxy {} bytes each, server proxy {}; parked: client proxy {}",
        held.conns,
        fmt_n(held.per_conn(Role::Client).0),
        fmt_n(held.per_conn(Role::Server).0),
        parked.map_or("–".to_owned(), |p| fmt_n(p.per_conn(Role::Client).0)),
    );
    report.push('\n');
    report.push_str(&idle_table(&held, parked.as_ref()));

    if o.sites {
        let _ = writeln!(report, "\n## Allocation sites\n");
        for (proto, conc, pair, extra) in loads {
            let (ws, wseen) = sample(pair, proto, conc, o).await;
            let (ds, dseen) = sample(&direct, proto, conc, o).await;
            eprintln!(
                "allocs: resolving {} + {} backtraces of {}",
                ws.len(),
                ds.len(),
                label(proto, conc, extra)
            );
            let (wt, dt) = (tally(&ws), tally(&ds));
            report.push_str(&sites_section(
                &label(proto, conc, extra),
                &wt,
                &dt,
                (wseen, dseen),
                o,
            ));
            report.push('\n');
        }
        let (held, _, live) = idle(&idle_via, o.site_idle, true).await;
        eprintln!("allocs: resolving {} held blocks", live.len());
        report.push_str(&live_section(&live, held.conns, o));
    }
    report
}
