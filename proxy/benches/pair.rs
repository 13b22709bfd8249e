//! The sidecar-pair benchmark (PERFORMANCE.md): load generator → client
//! sidecar → mTLS → server sidecar → app, for weft, nginx and HAProxy pairs,
//! against the direct connection. Prints Markdown tables and writes them to
//! `target/bench/pair.md`, with a plot in `target/bench/pair.svg`. Run as
//! root, holding the build lock so nothing builds during the measurement:
//!
//! ```text
//! flock /tmp/weft-build.lock cargo bench -p weft-proxy --bench pair --profile sidecar            # ~5 min
//! flock /tmp/weft-build.lock cargo bench -p weft-proxy --bench pair --profile sidecar -- --core  # ~2.5 min
//! ```
//!
//! Flags: `--rounds N` (interleaved rounds of the main comparison, 3),
//! `--measure-secs N` (constant-rate window, 5), `--max-secs N` (the
//! closed-loop maximum's window, 3; longer to profile it), `--base-bin PATH`
//! (another weft-proxy build run beside this one as target `weft-base`, for
//! a same-run before/after: its ratio row is `/ weft-base`), `--only weft,nginx`
//! (targets; direct always runs, as the baseline), `--core` (main comparison
//! only: no matrix, handshakes or idle connections), `--full` (the whole
//! payload × protocol × connections matrix instead of one axis at a time),
//! `--telemetry` (weft's access logs on and tracing at 1 %, to price them
//! against the default), `--loopback` (the second, unfair layout below),
//! `--syscalls` (syscalls per request per sidecar under `strace -c -f`, in a
//! table of its own), `--cells h1/16384/16,h1/1048576/16` (only these
//! matrix cells, protocol `h1`/`h2`/`stream`/`tcp` / payload bytes /
//! connections, each measured `--rounds` times with the targets taking
//! turns at going first, medians reported; no handshakes or idle
//! connections), `--idle` (only the fresh proxies' idle RSS and RSS per
//! 1000 idle connections, then exit: a quick look at what a change does
//! to them).
//!
//! Topology (the default, "fair": every target pays the same kernel path).
//! Every target gets its own pair of network namespaces, a client namespace
//! and a server namespace, joined by its own veth: 10.78.N.1 (client) and
//! 10.78.N.2 (server) on 10.78.N.0/24, N = 1 direct, 2 weft, 3 nginx,
//! 4 HAProxy, with `lo` up in both. Each server namespace runs its own app
//! (HTTP/1.1 on :8080, HTTP/2 on :8081, the raw TCP rows' HTTP/1.1 bytes on
//! :8082, the streaming echo on :8083). The load generator runs in the client
//! namespace and dials Service ClusterIPs, one per protocol (10.96.0.1 h1,
//! .2 h2, .3 raw TCP, .4 streaming, port 80).
//! - weft: `weft-proxy init --iptables nft` in both namespaces (its real
//!   capture rules: every outbound TCP connection REDIRECTed to :15001 but
//!   uid 1337's, every inbound one to :15006), both proxies as uid 1337.
//! - nginx and HAProxy: both peers as uid 1337 (`setpriv --reuid=1337
//!   --regid=1337 --clear-groups`, as weft), behind capture rules of the same
//!   shape, with iptables-nft: in the client namespace nat OUTPUT REDIRECTs
//!   TCP to each ClusterIP:80 to the client peer's listener for that
//!   protocol, except uid 1337's (`-m owner ! --uid-owner 1337`); in the
//!   server namespace nat PREROUTING REDIRECTs TCP arriving on the veth for
//!   each app port to the server peer's TLS listener for that protocol. The
//!   client peer dials the server pod's IP and app port (10.78.N.2:8080 …),
//!   as weft's does, and the server namespace's capture delivers it.
//! - direct: the load generator dials the app's pod IP across its veth. Its
//!   namespaces have no capture rules (an unmeshed pod pair: no NAT, so no
//!   conntrack), so "added" latency includes what capture costs.
//!
//! `--loopback`: the old layout, reported under its own title. nginx, HAProxy
//! and direct each run in a single namespace of their own on 127.0.0.1 (load
//! generator, peers and app), without veth or capture; weft still runs
//! across its two namespaces, veth and capture rules, so it pays kernel work
//! the others do not.
//!
//! Every proxy and the app are pinned to CPU 1, the load generator to CPU 0
//! (`taskset`, `sched_setaffinity`). nginx and HAProxy run one worker/thread
//! each, TLS 1.3, client certificates required by the server side,
//! keep-alive upstream pools; nginx streams large bodies through its buffers
//! (`proxy_max_temp_file_size 0`) instead of spilling them to temp files.
//!
//! The matrix: payload 0 B / 1 KiB / 16 KiB / 1 MiB (1 MiB at
//! [`BIG_RATE`] rps, so a cell stays bounded in time), HTTP/1.1, HTTP/2,
//! gRPC-style streaming (one long-lived HTTP/2 stream per connection carrying
//! length-prefixed messages that the app echoes back; messages per second and
//! per-message latency) and raw TCP (HTTP/1.1 bytes through an opaque TCP
//! proxy), 1 / 16 / 64 connections. A target lacking a protocol is n/a:
//! nginx has no raw TCP in Debian's base package, and its HTTP/2 row is h2
//! in, HTTP/1.1 over the mTLS hop (its streaming row uses `grpc_pass`, h2 on
//! both hops).
//!
//! Hygiene. Peers must never outlive the benchmark (an inherited lock fd
//! once held the build lock for 25 minutes): at start the benchmark re-execs
//! itself without any inherited descriptor beyond stdio, every peer (and
//! strace) is started under `setpriv --pdeathsig KILL` (it dies with the
//! benchmark, whatever the exit path), SIGINT/SIGTERM/SIGHUP run the cleanup
//! (kill the peers, delete the namespaces), and a panic or normal exit runs
//! it through `Drop`. nginx runs without a master process, HAProxy in the
//! foreground, so each peer is exactly one process.
//!
//! CPU time is read from `/proc/<pid>/task/*/schedstat` (nanoseconds, the same
//! quantity as utime+stime in `/proc/<pid>/stat`, without its 10 ms ticks).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use weft_proxy::test_util::{Leaf, TestCa};
use weft_proxy_config::{
    ClientPolicy, Endpoint, Inbound, MeshSettings, MtlsMode, Protocol, ProxyConfig, Service,
    ServicePort,
};

const RATE: u64 = 1000;
const CONNS: usize = 16;
const WARMUP: Duration = Duration::from_secs(1);
const MAX_CONNS: usize = 64;
/// How long the closed-loop maximum runs (`--max-secs`).
const MAX_FOR: Duration = Duration::from_secs(3);
const CELL_FOR: Duration = Duration::from_secs(2);
const HANDSHAKE_FOR: Duration = Duration::from_secs(3);
const HANDSHAKE_CONC: usize = 8;
const IDLE_CONNS: usize = 1000;
/// Requests per warm-up connection before idle connections are measured.
const IDLE_WARMUP: usize = 50;
const BIG: usize = 1 << 20;
const PAYLOADS: [usize; 4] = [0, 1024, 16384, BIG];
/// The constant rate of 1 MiB cells (1000 rps would be 1 GB/s per hop).
const BIG_RATE: u64 = 50;
/// A request, a streamed message or a connection that takes longer fails.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Slots still queued this long after a constant-rate window count as
/// errors without being sent, so a stuck target cannot stall the run.
const DRAIN_FOR: Duration = Duration::from_secs(5);

/// The app's ports, per protocol (h1, h2, raw TCP, streaming).
const APP_PORTS: [u16; 4] = [8080, 8081, 8082, 8083];
/// The Services' ClusterIPs (port 80), per protocol.
const CLUSTER_IPS: [&str; 4] = ["10.96.0.1", "10.96.0.2", "10.96.0.3", "10.96.0.4"];
/// nginx's and HAProxy's client listeners (plain), per protocol.
const PEER_IN: [u16; 4] = [18081, 18091, 18093, 18094];
/// nginx's and HAProxy's server listeners (mTLS), per protocol.
const PEER_TLS: [u16; 4] = [18443, 18453, 18463, 18473];
/// The uid every sidecar runs as (exempt from capture).
const PROXY_UID: &str = "1337";

fn rate_for(payload: usize) -> u64 {
    if payload >= BIG { BIG_RATE } else { RATE }
}

// ---------------------------------------------------------------- options

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Topology {
    /// Every target in its own namespace pair, veth and capture rules.
    Fair,
    /// nginx, HAProxy and direct on loopback in one namespace each.
    Loopback,
}

struct Opts {
    rounds: usize,
    measure: Duration,
    /// The closed-loop maximum's window (long enough to profile).
    max_for: Duration,
    /// Another weft-proxy binary run beside this one as target
    /// `weft-base` (a same-run before/after of a change).
    base_bin: Option<String>,
    only: Option<Vec<String>>,
    core: bool,
    full: bool,
    /// weft with access logs on and tracing at 1 % (to a collector that
    /// refuses, so export costs nothing but attempts).
    telemetry: bool,
    topology: Topology,
    syscalls: bool,
    /// `--cells`: only these matrix cells (protocol, payload, connections),
    /// each measured `rounds` times, medians reported; no handshakes or
    /// idle connections.
    cells: Option<Vec<(Proto, usize, usize)>>,
    /// `--idle`: only the fresh proxies' RSS per 1000 idle connections.
    idle: bool,
}

fn opts() -> Opts {
    let mut o = Opts {
        rounds: 3,
        measure: Duration::from_secs(5),
        max_for: MAX_FOR,
        base_bin: None,
        only: None,
        core: false,
        full: false,
        telemetry: false,
        topology: Topology::Fair,
        syscalls: false,
        cells: None,
        idle: false,
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
            "--max-secs" => {
                o.max_for = Duration::from_secs(
                    args.next().and_then(|v| v.parse().ok()).unwrap_or(3).max(1),
                )
            }
            "--base-bin" => o.base_bin = args.next(),
            "--only" => {
                o.only = args
                    .next()
                    .map(|v| v.split(',').map(str::to_owned).collect())
            }
            "--core" => o.core = true,
            "--idle" => o.idle = true,
            "--full" => o.full = true,
            "--telemetry" => o.telemetry = true,
            "--loopback" => o.topology = Topology::Loopback,
            "--syscalls" => o.syscalls = true,
            "--cells" => match args.next().map(|v| parse_cells(&v)) {
                Some(Ok(cells)) => o.cells = Some(cells),
                Some(Err(e)) => {
                    eprintln!("pair: --cells: {e}");
                    std::process::exit(2);
                }
                None => {
                    eprintln!("pair: --cells needs a list such as h1/16384/16,tcp/1024/16");
                    std::process::exit(2);
                }
            },
            // cargo bench passes --bench; anything else is ignored with a note.
            "--bench" => {}
            other => eprintln!("pair: ignoring unknown argument {other:?}"),
        }
    }
    o
}

/// `h1/16384/16,h2/0/64`: protocol (`h1`, `h2`, `stream`, `tcp`), payload
/// bytes and connections of each matrix cell.
fn parse_cells(list: &str) -> Result<Vec<(Proto, usize, usize)>, String> {
    list.split(',')
        .map(|cell| {
            let parts: Vec<&str> = cell.split('/').collect();
            let [proto, payload, conns] = parts[..] else {
                return Err(format!("{cell:?} is not protocol/payload/connections"));
            };
            let proto = match proto {
                "h1" => Proto::H1,
                "h2" => Proto::H2,
                "stream" => Proto::Stream,
                "tcp" => Proto::Tcp,
                other => return Err(format!("unknown protocol {other:?}")),
            };
            let number = |v: &str| {
                v.parse::<usize>()
                    .map_err(|e| format!("{v:?} in {cell:?}: {e}"))
            };
            let conns = number(conns)?;
            if conns == 0 {
                return Err(format!("{cell:?} has no connections"));
            }
            Ok((proto, number(payload)?, conns))
        })
        .collect()
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

fn remember(pid: u32) {
    LEFTOVERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .0
        .push(pid);
}

/// A child that has been reaped: never signal its (reusable) pid again.
fn forget(pid: u32) {
    LEFTOVERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .0
        .retain(|p| *p != pid);
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
/// for here. Children inherit the mask (SIGINT/SIGTERM/SIGHUP stay blocked
/// in them): [`cleanup`] ends peers with SIGKILL after its SIGTERM, and
/// strace is stopped with SIGQUIT.
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

/// Starts `cmd` in namespace `ns` pinned to CPU 1, dying with the benchmark,
/// its stderr to `log`.
fn spawn_peer(ns: &str, setpriv: &[&str], cmd: &[String], log: &Path) -> u32 {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "taskset", "-c", "1", "setpriv"])
        .args(["--pdeathsig", "KILL"])
        .args(setpriv)
        .args(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("peer log"));
    let child = c.spawn().expect("spawn peer");
    let pid = child.id();
    remember(pid);
    // Killed and reaped by pid in `cleanup`; dropping the handle neither
    // kills nor waits.
    drop(child);
    pid
}

/// Panics (and so cleans up) with the peer's log when it is not running.
fn check_alive(name: &str, pid: u32, log: &Path) {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let st = waitpid(
        nix::unistd::Pid::from_raw(pid as i32),
        Some(WaitPidFlag::WNOHANG),
    );
    if !matches!(st, Ok(WaitStatus::StillAlive)) {
        forget(pid);
        panic!(
            "{name} (pid {pid}) is not running ({st:?}); its stderr:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
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

/// The streaming app's response body: the request's data frames echoed as
/// they arrive (so every length-prefixed message comes straight back), then
/// `grpc-status: 0` when the client ends its stream.
struct Echo {
    req: Incoming,
    done: bool,
}

impl hyper::body::Body for Echo {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match std::task::ready!(Pin::new(&mut self.req).poll_frame(cx)) {
                Some(Ok(f)) if f.is_data() => return Poll::Ready(Some(Ok(f))),
                // Request trailers: nothing to echo.
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    self.done = true;
                    let mut t = http::HeaderMap::new();
                    t.insert("grpc-status", http::HeaderValue::from_static("0"));
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
        }
    }
}

/// The app in `ns` (one per server namespace), pinned to CPU 1: HTTP/1.1 on
/// :8080 and :8082 (the raw TCP rows), HTTP/2 (prior knowledge) on :8081,
/// where `GET /<n>` answers `n` bytes; the streaming echo (HTTP/2, any
/// request) on :8083.
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
                hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let n = req.uri().path()[1..].parse::<usize>().unwrap_or(1024);
                    let body = bodies.get(&n).cloned().unwrap_or_default();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(body)))
                    }
                })
            };
            let bind = |port: u16| async move {
                tokio::net::TcpListener::bind(("0.0.0.0", port))
                    .await
                    .expect("bind app")
            };
            let [h1, h2, tcp, stream] = APP_PORTS;
            let (h1, h2, tcp, stream) = (
                bind(h1).await,
                bind(h2).await,
                bind(tcp).await,
                bind(stream).await,
            );
            let _ = tx.send(());
            for l in [h1, tcp] {
                let svc = svc.clone();
                tokio::spawn(async move {
                    while let Ok((s, _)) = l.accept().await {
                        let _ = s.set_nodelay(true);
                        let svc = svc();
                        tokio::spawn(async move {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(s), svc)
                                .await;
                        });
                    }
                });
            }
            tokio::spawn(async move {
                while let Ok((s, _)) = h2.accept().await {
                    let _ = s.set_nodelay(true);
                    let svc = svc();
                    tokio::spawn(async move {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(s), svc)
                            .await;
                    });
                }
            });
            while let Ok((s, _)) = stream.accept().await {
                let _ = s.set_nodelay(true);
                let echo = hyper::service::service_fn(|req: http::Request<Incoming>| async move {
                    let resp = http::Response::builder()
                        .header(http::header::CONTENT_TYPE, "application/grpc")
                        .body(Echo {
                            req: req.into_body(),
                            done: false,
                        })
                        .expect("response");
                    Ok::<_, std::convert::Infallible>(resp)
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), echo)
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
    /// gRPC-style: one long-lived HTTP/2 stream per connection, one
    /// length-prefixed message at a time, echoed back.
    Stream,
    Tcp,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::H1 => "HTTP/1.1",
            Proto::H2 => "HTTP/2",
            Proto::Stream => "HTTP/2 stream",
            Proto::Tcp => "TCP",
        }
    }

    /// Index into the per-protocol port and address tables.
    fn index(self) -> usize {
        match self {
            Proto::H1 => 0,
            Proto::H2 => 1,
            Proto::Tcp => 2,
            Proto::Stream => 3,
        }
    }
}

/// A streaming request body fed from a channel.
struct ChanBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChanBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

/// A gRPC-framed message: flag byte, 4-byte big-endian length, payload.
fn message(payload: usize) -> Bytes {
    let mut v = Vec::with_capacity(5 + payload);
    v.push(0);
    v.extend_from_slice(&(payload as u32).to_be_bytes());
    v.resize(5 + payload, b'x');
    Bytes::from(v)
}

/// One long-lived HTTP/2 stream: each message sent is read back in full
/// before the next one goes.
struct StreamConn {
    _send: hyper::client::conn::http2::SendRequest<ChanBody>,
    tx: tokio::sync::mpsc::Sender<Bytes>,
    rx: Incoming,
    msg: Bytes,
}

impl StreamConn {
    /// Opens the connection and the stream, and echoes a first message (so
    /// a proxy that waits for request data before answering is served).
    async fn open(target: SocketAddr, payload: usize) -> Option<StreamConn> {
        let s = tokio::net::TcpStream::connect(target).await.ok()?;
        let _ = s.set_nodelay(true);
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                .await
                .ok()?;
        tokio::spawn(conn);
        let (tx, body) = tokio::sync::mpsc::channel(1);
        let msg = message(payload);
        tx.send(msg.clone()).await.ok()?;
        let req = http::Request::post("http://app/bench.Echo/Stream")
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header("te", "trailers")
            .body(ChanBody(body))
            .ok()?;
        let resp = send.send_request(req).await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let mut c = StreamConn {
            _send: send,
            tx,
            rx: resp.into_body(),
            msg,
        };
        c.read_echo().await.then_some(c)
    }

    async fn read_echo(&mut self) -> bool {
        let mut need = self.msg.len();
        while need > 0 {
            match self.rx.frame().await {
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => need = need.saturating_sub(d.len()),
                    Err(_) => return false,
                },
                _ => return false,
            }
        }
        true
    }

    async fn message(&mut self) -> bool {
        self.tx.send(self.msg.clone()).await.is_ok() && self.read_echo().await
    }
}

/// One client connection (raw TCP carries HTTP/1.1 through the proxies).
enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
    Stream(Box<StreamConn>),
}

impl Conn {
    /// Opens a connection (for streams, with `payload`-byte messages);
    /// None on failure or after [`OP_TIMEOUT`].
    async fn open(target: SocketAddr, proto: Proto, payload: usize) -> Option<Conn> {
        tokio::time::timeout(OP_TIMEOUT, Self::open_inner(target, proto, payload))
            .await
            .ok()
            .flatten()
    }

    async fn open_inner(target: SocketAddr, proto: Proto, payload: usize) -> Option<Conn> {
        if proto == Proto::Stream {
            return Some(Conn::Stream(Box::new(
                StreamConn::open(target, payload).await?,
            )));
        }
        let s = tokio::net::TcpStream::connect(target).await.ok()?;
        let _ = s.set_nodelay(true);
        let io = TokioIo::new(s);
        Some(match proto {
            Proto::H1 | Proto::Tcp => {
                let (send, conn) = hyper::client::conn::http1::handshake(io).await.ok()?;
                tokio::spawn(conn);
                Conn::H1(send)
            }
            _ => {
                let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .ok()?;
                tokio::spawn(conn);
                Conn::H2(send)
            }
        })
    }

    /// One GET of `payload` bytes, or one streamed message echoed back;
    /// false on any failure or after [`OP_TIMEOUT`].
    async fn once(&mut self, payload: usize) -> bool {
        tokio::time::timeout(OP_TIMEOUT, self.once_inner(payload))
            .await
            .unwrap_or(false)
    }

    async fn once_inner(&mut self, payload: usize) -> bool {
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
            Conn::Stream(s) => return s.message().await,
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
/// Slots still queued [`DRAIN_FOR`] after the window are errors, unsent.
async fn constant_rate(
    target: SocketAddr,
    proto: Proto,
    payload: usize,
    rate: u64,
    conns: usize,
    dur: Duration,
) -> (Vec<u64>, u64) {
    let give_up = Instant::now() + dur + DRAIN_FOR;
    let mut txs = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        txs.push(tx);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut conn = Conn::open(target, proto, payload).await;
            while let Some(intended) = rx.recv().await {
                if Instant::now() > give_up {
                    errors += 1;
                    continue;
                }
                let ok = match conn.as_mut() {
                    Some(c) => c.once(payload).await,
                    None => false,
                };
                if ok {
                    lat.push(intended.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                    conn = Conn::open(target, proto, payload).await;
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

/// Requests (or streamed messages) per second with `conns` closed-loop
/// connections.
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
            let Some(mut c) = Conn::open(target, proto, payload).await else {
                return 0;
            };
            let mut n = 0u64;
            while Instant::now() < end {
                if !c.once(payload).await {
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
                let hs = async {
                    let s = tokio::net::TcpStream::connect(target).await.ok()?;
                    connector.connect(name.clone(), s).await.ok()
                };
                match tokio::time::timeout(OP_TIMEOUT, hs).await {
                    Ok(Some(_)) => n += 1,
                    Ok(None) => {}
                    Err(_) => break,
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

/// Sends `IDLE_WARMUP` requests over each of 4 connections, one after
/// another, and closes them.
async fn warm_up(target: SocketAddr) {
    for _ in 0..4 {
        if let Some(mut c) = Conn::open(target, Proto::H1, 0).await {
            for _ in 0..IDLE_WARMUP {
                if !c.once(0).await {
                    break;
                }
            }
        }
    }
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
        if let Some(mut c) = Conn::open(target, Proto::H1, 0).await
            && c.once(0).await
        {
            conns.push(c);
        }
    }
    let _ = opened.send(conns.len());
    let _ = tokio::task::spawn_blocking(move || hold.recv()).await;
    drop(conns);
}

/// Each sidecar's RSS growth per 1000 connections while `IDLE_CONNS` idle
/// HTTP/1.1 connections (one request each) to `t` are held open: (client,
/// server), MB. None for a target without sidecars or when none opened.
fn idle_rss(t: &Target, when: &str) -> Option<(f64, f64)> {
    if t.sidecars.is_empty() {
        return None;
    }
    // What a proxy allocates once (its first upstream connection and TLS
    // session, metric series, the runtime's slabs) is paid before the
    // measurement, not counted per connection.
    let (addr, ns) = (t.h1(), t.ns.clone());
    load(&ns, move || warm_up(addr));
    std::thread::sleep(Duration::from_millis(500));
    let before: Vec<f64> = t.sidecars.iter().map(|p| mb(&[*p], "VmRSS:")).collect();
    let (otx, orx) = std::sync::mpsc::channel();
    let (htx, hrx) = std::sync::mpsc::channel();
    let addr = t.h1();
    let ns = t.ns.clone();
    let opening = Instant::now();
    let holder =
        std::thread::spawn(move || load(&ns, move || idle_conns(addr, IDLE_CONNS, otx, hrx)));
    let opened = orx.recv().unwrap_or(0);
    let opening = opening.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let after: Vec<f64> = t.sidecars.iter().map(|p| mb(&[*p], "VmRSS:")).collect();
    let _ = htx.send(());
    let _ = holder.join();
    eprintln!(
        "{} ({when}): {opened} idle connections opened in {} ms, RSS client {:.1} → {:.1} MB, server {:.1} → {:.1} MB",
        t.name,
        opening.as_millis(),
        before[0],
        after[0],
        before[1],
        after[1]
    );
    (opened > 0).then(|| {
        let k = 1000.0 / opened as f64;
        ((after[0] - before[0]) * k, (after[1] - before[1]) * k)
    })
}

/// "client, server" MB, or "–".
fn pair_mb(v: Option<(f64, f64)>) -> String {
    v.map_or("–".to_owned(), |(c, s)| format!("{c:.1}, {s:.1}"))
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
    /// Where the load generator runs (the client namespace).
    ns: String,
    /// What the load generator dials, per protocol (see [`Proto::index`]);
    /// None where the target lacks the protocol.
    addrs: [Option<SocketAddr>; 4],
    /// The server side's TLS listener as a peer proxy reaches it, for the
    /// handshake rate.
    tls: Option<SocketAddr>,
    /// Client sidecar, server sidecar.
    sidecars: Vec<u32>,
}

impl Target {
    fn addr(&self, p: Proto) -> Option<SocketAddr> {
        self.addrs[p.index()]
    }

    fn h1(&self) -> SocketAddr {
        self.addr(Proto::H1).expect("every target speaks HTTP/1.1")
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
    /// Measured after the load.
    idle_per_1000: Option<(f64, f64)>,
    /// Measured before any load.
    idle_fresh_per_1000: Option<(f64, f64)>,
}

/// One constant-rate window: latencies, vCPU per 1000 rps per sidecar, RSS
/// per sidecar at the end.
struct Window {
    lat: Vec<u64>,
    errors: u64,
    secs: f64,
    vcpu: f64,
    rss: f64,
}

fn window(t: &Target, proto: Proto, payload: usize, conns: usize, dur: Duration) -> Window {
    let addr = t.addr(proto).expect("protocol offered");
    let rate = rate_for(payload);
    let before = cpu_secs(&t.sidecars);
    let t0 = Instant::now();
    let (lat, errors) = load(&t.ns, move || {
        constant_rate(addr, proto, payload, rate, conns, dur)
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
        secs,
        vcpu,
        rss: mb(&t.sidecars, "VmRSS:"),
    }
}

// ---------------------------------------------------------------- setup

/// A target's network: where the load generator runs and where the app and
/// the server side run.
struct Net {
    client: String,
    server: String,
    /// The server pod's IP (10.78.N.2), or 127.0.0.1 on loopback.
    server_ip: String,
}

impl Net {
    fn fair(&self) -> bool {
        self.client != self.server
    }
}

/// A new namespace with `lo` up, deleted on every exit path.
fn netns(name: String) -> String {
    sh(&["ip", "netns", "add", &name]);
    LEFTOVERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .1
        .push(name.clone());
    sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
    name
}

/// A client and a server namespace joined by a veth (vb0 10.78.n.1, vb1
/// 10.78.n.2, 10.78.n.0/24); a meshed client routes the ClusterIP range
/// over the veth (the capture rewrites it before it leaves).
fn veth_pair(tag: &str, n: u8, meshed: bool) -> Net {
    let id = std::process::id();
    let client = netns(format!("weftb-{id}-{tag}-c"));
    let server = netns(format!("weftb-{id}-{tag}-s"));
    sh(&[
        "ip", "-n", &client, "link", "add", "vb0", "type", "veth", "peer", "name", "vb1", "netns",
        &server,
    ]);
    for (ns, dev, host) in [(&client, "vb0", 1), (&server, "vb1", 2)] {
        let ip = format!("10.78.{n}.{host}/24");
        sh(&["ip", "-n", ns, "addr", "add", &ip, "dev", dev]);
        sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
    }
    if meshed {
        sh(&[
            "ip",
            "-n",
            &client,
            "route",
            "add",
            "10.96.0.0/16",
            "dev",
            "vb0",
        ]);
    }
    Net {
        client,
        server,
        server_ip: format!("10.78.{n}.2"),
    }
}

/// One namespace, loopback only (the `--loopback` layout).
fn loopback_ns(tag: &str) -> Net {
    let ns = netns(format!("weftb-{}-{tag}", std::process::id()));
    Net {
        client: ns.clone(),
        server: ns,
        server_ip: "127.0.0.1".into(),
    }
}

/// nginx's or HAProxy's capture, the shape of `weft-proxy init`'s, with
/// iptables-nft: in the client namespace, nat OUTPUT REDIRECTs TCP to each
/// ClusterIP:80 to the client peer's listener for that protocol, except
/// uid 1337's; in the server namespace, nat PREROUTING REDIRECTs TCP
/// arriving on the veth for each app port to the server peer's TLS listener
/// for that protocol. (Rules for a protocol the peer lacks stay, unused.)
fn peer_capture(net: &Net) {
    let nat = |ns: &str, rule: &[&str]| {
        let mut a = vec!["ip", "netns", "exec", ns, "iptables-nft", "-t", "nat", "-A"];
        a.extend_from_slice(rule);
        sh(&a);
    };
    for i in 0..4 {
        let (to_in, to_tls, app) = (
            PEER_IN[i].to_string(),
            PEER_TLS[i].to_string(),
            APP_PORTS[i].to_string(),
        );
        nat(
            &net.client,
            &[
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                CLUSTER_IPS[i],
                "--dport",
                "80",
                "-m",
                "owner",
                "!",
                "--uid-owner",
                PROXY_UID,
                "-j",
                "REDIRECT",
                "--to-ports",
                &to_in,
            ],
        );
        nat(
            &net.server,
            &[
                "PREROUTING",
                "-i",
                "vb1",
                "-p",
                "tcp",
                "--dport",
                &app,
                "-j",
                "REDIRECT",
                "--to-ports",
                &to_tls,
            ],
        );
    }
}

/// Where a peer pair listens and dials, per protocol.
struct PeerNet {
    /// Where the client peer dials the server peer: the server pod's app
    /// port (captured there), or its TLS listener on loopback.
    dial: [String; 4],
    /// The server peer's TLS listeners' address.
    listen: &'static str,
}

impl PeerNet {
    fn new(net: &Net) -> PeerNet {
        if net.fair() {
            PeerNet {
                dial: std::array::from_fn(|i| format!("{}:{}", net.server_ip, APP_PORTS[i])),
                listen: "0.0.0.0",
            }
        } else {
            PeerNet {
                dial: std::array::from_fn(|i| format!("127.0.0.1:{}", PEER_TLS[i])),
                listen: "127.0.0.1",
            }
        }
    }
}

/// A peer's directory, owned by uid 1337: certificates, keys, configs, pid
/// and temp files, logs.
fn peer_dir(work: &Path, name: &str, ca: &TestCa, cl: &Leaf, sl: &Leaf) -> PathBuf {
    let d = work.join(name);
    std::fs::create_dir_all(d.join("tmp")).expect("peer dir");
    for (f, body) in [
        ("ca.crt", ca.cert_pem.clone()),
        ("c.crt", cl.cert_pem.clone()),
        ("c.key", cl.key_pem.clone()),
        ("s.crt", sl.cert_pem.clone()),
        ("s.key", sl.key_pem.clone()),
        ("c.pem", format!("{}{}", cl.cert_pem, cl.key_pem)),
        ("s.pem", format!("{}{}", sl.cert_pem, sl.key_pem)),
    ] {
        std::fs::write(d.join(f), body).expect("write");
    }
    let owner = format!("{PROXY_UID}:{PROXY_UID}");
    sh(&["chown", "-R", &owner, d.to_str().expect("utf8")]);
    d
}

/// nginx's client and server configs. nginx 1.22 speaks HTTP/2 only towards
/// clients on `proxy_pass` (its upstreams are HTTP/1.1) and has no stream
/// module in Debian's base package: its HTTP/2 row is h2 in, HTTP/1.1 over
/// the mTLS hop; no raw TCP row. Its streaming row uses `grpc_pass`, HTTP/2
/// on both hops.
fn nginx_confs(d: &Path, n: &PeerNet) -> (String, String) {
    let p = |f: &str| d.join(f).to_string_lossy().into_owned();
    let common = |name: &str| {
        let t = p("tmp");
        format!(
            "worker_processes 1; master_process off; daemon off; pid {pid}; error_log {err} error;\nevents {{ worker_connections 4096; }}\nhttp {{ access_log off; client_body_temp_path {t}; proxy_temp_path {t}; fastcgi_temp_path {t}; uwsgi_temp_path {t}; scgi_temp_path {t}; keepalive_requests 1000000;\n",
            pid = p(&format!("{name}.pid")),
            err = p(&format!("{name}.err")),
        )
    };
    let [in_h1, in_h2, _, in_st] = PEER_IN;
    let [tls_h1, _, _, tls_st] = PEER_TLS;
    let [app_h1, _, _, app_st] = APP_PORTS;
    let client = format!(
        "{common} upstream srv {{ server {h1}; keepalive 64; keepalive_requests 1000000; }}\n upstream srv_stream {{ server {st}; keepalive 64; keepalive_requests 1000000; }}\n server {{ listen 127.0.0.1:{in_h1}; listen 127.0.0.1:{in_h2} http2; location / {{ proxy_pass https://srv; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_max_temp_file_size 0; proxy_ssl_certificate {cc}; proxy_ssl_certificate_key {ck}; proxy_ssl_protocols TLSv1.3; proxy_ssl_session_reuse on; }} }}\n server {{ listen 127.0.0.1:{in_st} http2; location / {{ grpc_pass grpcs://srv_stream; grpc_ssl_certificate {cc}; grpc_ssl_certificate_key {ck}; grpc_ssl_protocols TLSv1.3; grpc_ssl_session_reuse on; }} }} }}\n",
        common = common("nc"),
        h1 = n.dial[0],
        st = n.dial[3],
        cc = p("c.crt"),
        ck = p("c.key"),
    );
    let ssl = format!(
        "ssl_certificate {}; ssl_certificate_key {}; ssl_protocols TLSv1.3; ssl_verify_client on; ssl_client_certificate {};",
        p("s.crt"),
        p("s.key"),
        p("ca.crt")
    );
    let server = format!(
        "{common} upstream app {{ server 127.0.0.1:{app_h1}; keepalive 64; keepalive_requests 1000000; }}\n upstream app_stream {{ server 127.0.0.1:{app_st}; keepalive 64; keepalive_requests 1000000; }}\n server {{ listen {l}:{tls_h1} ssl; {ssl} location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_max_temp_file_size 0; }} }}\n server {{ listen {l}:{tls_st} ssl http2; {ssl} location / {{ grpc_pass grpc://app_stream; }} }} }}\n",
        common = common("ns"),
        l = n.listen,
    );
    (client, server)
}

/// HAProxy's client and server configs: HTTP/1.1, HTTP/2 (h2 on both
/// hops), the stream (h2 on both hops) and raw TCP.
fn haproxy_confs(d: &Path, n: &PeerNet) -> (String, String) {
    let p = |f: &str| d.join(f).to_string_lossy().into_owned();
    let head = "global\n nbthread 1\n maxconn 4096\ndefaults\n timeout connect 5s\n timeout client 30s\n timeout server 30s\n";
    let (c, s, ca) = (p("c.pem"), p("s.pem"), p("ca.crt"));
    let ssl_c = format!("ssl crt {c} ca-file {ca} verify required ssl-min-ver TLSv1.3");
    let ssl_s = format!("ssl crt {s} ca-file {ca} verify required ssl-min-ver TLSv1.3");
    let [in_h1, in_h2, in_tcp, in_st] = PEER_IN;
    let [tls_h1, tls_h2, tls_tcp, tls_st] = PEER_TLS;
    let [app_h1, app_h2, app_tcp, app_st] = APP_PORTS;
    let [d_h1, d_h2, d_tcp, d_st] = &n.dial;
    let client = format!(
        "{head}frontend f\n mode http\n bind 127.0.0.1:{in_h1}\n default_backend b\nbackend b\n mode http\n http-reuse always\n server s {d_h1} {ssl_c}\n\
         frontend f2\n mode http\n bind 127.0.0.1:{in_h2} proto h2\n default_backend b2\nbackend b2\n mode http\n http-reuse always\n server s {d_h2} {ssl_c} alpn h2\n\
         frontend fs\n mode http\n bind 127.0.0.1:{in_st} proto h2\n default_backend bs\nbackend bs\n mode http\n http-reuse always\n server s {d_st} {ssl_c} alpn h2\n\
         frontend ft\n mode tcp\n bind 127.0.0.1:{in_tcp}\n default_backend bt\nbackend bt\n mode tcp\n server s {d_tcp} {ssl_c}\n"
    );
    let l = n.listen;
    let server = format!(
        "{head}frontend f\n mode http\n bind {l}:{tls_h1} {ssl_s}\n default_backend b\nbackend b\n mode http\n http-reuse always\n server app 127.0.0.1:{app_h1}\n\
         frontend f2\n mode http\n bind {l}:{tls_h2} {ssl_s} alpn h2\n default_backend b2\nbackend b2\n mode http\n http-reuse always\n server app 127.0.0.1:{app_h2} proto h2\n\
         frontend fs\n mode http\n bind {l}:{tls_st} {ssl_s} alpn h2\n default_backend bs\nbackend bs\n mode http\n http-reuse always\n server app 127.0.0.1:{app_st} proto h2\n\
         frontend ft\n mode tcp\n bind {l}:{tls_tcp} {ssl_s}\n default_backend bt\nbackend bt\n mode tcp\n server app 127.0.0.1:{app_tcp}\n"
    );
    (client, server)
}

struct Setup {
    targets: Vec<Target>,
    /// mTLS client settings for the handshake rate: weft's (ALPN weft/h1:
    /// the server proxy waits for a request, as nginx and HAProxy do, instead
    /// of dialling the app for an opaque stream) and the same without ALPN
    /// for nginx/HAProxy.
    tls_weft: Arc<rustls::ClientConfig>,
    tls_plain: Arc<rustls::ClientConfig>,
    work: tempfile::TempDir,
}

/// The weft-proxy binary as it ships, built for the run: `cargo bench`
/// builds the binary beside a benchmark with the dev-dependencies'
/// features unified in (tokio's `test-util`, whose clock every timer
/// reads through, and weft's own `test-util`), and measured against the
/// same code built alone, that binary read 1.05 vCPU per 1000 rps, 1.08
/// added p50 and 0.95 max rps. Built by `cargo build --profile sidecar`
/// into a target directory of its own: the benchmark's is locked by the
/// cargo that runs it.
fn shipped_bin() -> String {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = manifest.join("../target/shipped");
    eprintln!(
        "pair: building weft-proxy as it ships (--profile sidecar, no dev-dependency features)"
    );
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--profile",
            "sidecar",
            "-p",
            "weft-proxy",
            "--bin",
            "weft-proxy",
            "--target-dir",
        ])
        .arg(&target)
        .current_dir(manifest)
        .status()
        .expect("run cargo");
    assert!(status.success(), "building weft-proxy as it ships failed");
    target
        .join("sidecar/weft-proxy")
        .to_str()
        .expect("utf-8 path")
        .to_owned()
}

fn setup(o: &Opts) -> Setup {
    let work = tempfile::tempdir().expect("tmp");
    sh(&["chmod", "755", work.path().to_str().expect("utf8")]);
    let want = |name: &str| o.only.as_ref().is_none_or(|v| v.iter().any(|x| x == name));
    let fair = o.topology == Topology::Fair;
    let net = |tag: &str, n: u8, meshed: bool| {
        if fair {
            veth_pair(tag, n, meshed)
        } else {
            loopback_ns(tag)
        }
    };
    let uid1337 = [
        format!("--reuid={PROXY_UID}"),
        format!("--regid={PROXY_UID}"),
        "--clear-groups".to_owned(),
    ];
    let uid1337: Vec<&str> = uid1337.iter().map(String::as_str).collect();
    let a = |s: String| -> SocketAddr { s.parse().expect("addr") };
    let cluster = |i: usize| Some(a(format!("{}:80", CLUSTER_IPS[i])));

    // Identities.
    let ca = TestCa::new("bench CA");
    let td = "cluster.local";
    let cid = "spiffe://cluster.local/ns/bench/sa/client";
    let sid = "spiffe://cluster.local/ns/bench/sa/server";
    let (cl, sl) = (ca.leaf(cid, 86400), ca.leaf(sid, 86400));

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

    let mut targets = Vec::new();
    let mut logs: Vec<(&'static str, u32, PathBuf)> = Vec::new();

    // The baseline: no proxy, no capture.
    let dn = net("direct", 1, false);
    spawn_app(&dn.server);
    targets.push(Target {
        name: "direct",
        ns: dn.client.clone(),
        addrs: std::array::from_fn(|i| Some(a(format!("{}:{}", dn.server_ip, APP_PORTS[i])))),
        tls: None,
        sidecars: vec![],
    });

    // weft, and with --base-bin another build of it beside, in the same
    // layout on a pair of namespaces of its own.
    let mut wefts: Vec<(&'static str, u8, String)> = Vec::new();
    if want("weft") {
        wefts.push(("weft", 2, shipped_bin()));
    }
    if let Some(base) = &o.base_bin {
        wefts.push(("weft-base", 5, base.clone()));
    }
    for (name, n, bin) in wefts {
        let bin = bin.as_str();
        let wn = veth_pair(name, n, true);
        // The handshake clients dial the server pod's port 8080 from the
        // client namespace: excluded from the client sidecar's capture, they
        // reach the server sidecar's inbound listener as a peer proxy would
        // (captured, the client sidecar would wrap their TLS in its own
        // mTLS, as it does for any meshed pod IP).
        let exclude = APP_PORTS[0].to_string();
        sh(&[
            "ip",
            "netns",
            "exec",
            &wn.client,
            bin,
            "init",
            "--iptables",
            "nft",
            "--exclude-outbound-ports",
            &exclude,
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            &wn.server,
            bin,
            "init",
            "--iptables",
            "nft",
        ]);
        let cfg = |services: Vec<Service>| {
            let mut c = ProxyConfig {
                gateway: None,
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
                services: services.into_iter().map(Arc::new).collect(),
                inbound: Inbound::default(),
            };
            c.seal();
            c
        };
        let svc = |name: &str, i: usize, protocol: Protocol| Service {
            name: name.into(),
            namespace: "bench".into(),
            cluster_ips: vec![CLUSTER_IPS[i].parse().expect("ip")],
            ports: vec![ServicePort {
                port: 80,
                name: Some("web".into()),
                target_port: APP_PORTS[i],
                protocol,
            }],
            subsets: vec![],
            endpoints: vec![Endpoint {
                address: wn.server_ip.parse().expect("ip"),
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
        let mk_dir = |name: &str, c: &ProxyConfig, leaf: &Leaf| {
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
            &format!("{name}-client"),
            &cfg(vec![
                svc("app", 0, Protocol::Http1),
                svc("app-h2", 1, Protocol::Http2),
                svc("app-tcp", 2, Protocol::Opaque),
                svc("app-stream", 3, Protocol::Grpc),
            ]),
            &cl,
        );
        let sdir = mk_dir(&format!("{name}-server"), &cfg(vec![]), &sl);
        spawn_app(&wn.server);
        let mut sidecars = Vec::new();
        for (ns, dir, side) in [(&wn.client, &cdir, "client"), (&wn.server, &sdir, "server")] {
            let log = work.path().join(format!("{name}-{side}.log"));
            let pid = spawn_peer(
                ns,
                &uid1337,
                &[
                    bin.to_owned(),
                    "run".into(),
                    "--config-dir".into(),
                    dir.to_string_lossy().into_owned(),
                    "--log-level".into(),
                    "warn".into(),
                ],
                &log,
            );
            logs.push((name, pid, log));
            sidecars.push(pid);
        }
        targets.push(Target {
            name,
            ns: wn.client.clone(),
            addrs: std::array::from_fn(cluster),
            // Captured by the server sidecar's inbound listener.
            tls: Some(a(format!("{}:{}", wn.server_ip, APP_PORTS[0]))),
            sidecars,
        });
    }

    // nginx and HAProxy: the same namespaces, veth and capture shape as weft
    // (or loopback with --loopback), as uid 1337.
    for (name, n) in [("nginx", 3u8), ("haproxy", 4u8)] {
        if !want(name) {
            continue;
        }
        let pn = net(name, n, true);
        if pn.fair() {
            peer_capture(&pn);
        }
        let d = peer_dir(work.path(), name, &ca, &cl, &sl);
        let pnet = PeerNet::new(&pn);
        let (cconf, sconf) = if name == "nginx" {
            nginx_confs(&d, &pnet)
        } else {
            haproxy_confs(&d, &pnet)
        };
        spawn_app(&pn.server);
        let mut sidecars = Vec::new();
        for (ns, conf, side) in [(&pn.client, cconf, "client"), (&pn.server, sconf, "server")] {
            let path = d.join(format!("{side}.conf"));
            std::fs::write(&path, conf).expect("write conf");
            let path = path.to_string_lossy().into_owned();
            let log = d.join(format!("{side}.log"));
            let cmd: Vec<String> = if name == "nginx" {
                let early = d.join(format!("{side}.early.err"));
                vec![
                    "nginx".into(),
                    "-e".into(),
                    early.to_string_lossy().into_owned(),
                    "-c".into(),
                    path,
                ]
            } else {
                vec!["haproxy".into(), "-db".into(), "-f".into(), path]
            };
            let pid = spawn_peer(ns, &uid1337, &cmd, &log);
            logs.push((name, pid, log));
            sidecars.push(pid);
        }
        let addr = |i: usize| {
            if pn.fair() {
                cluster(i)
            } else {
                Some(a(format!("127.0.0.1:{}", PEER_IN[i])))
            }
        };
        let mut addrs: [Option<SocketAddr>; 4] = std::array::from_fn(addr);
        if name == "nginx" {
            addrs[Proto::Tcp.index()] = None;
        }
        targets.push(Target {
            name,
            ns: pn.client.clone(),
            addrs,
            tls: Some(a(if pn.fair() {
                format!("{}:{}", pn.server_ip, APP_PORTS[0])
            } else {
                format!("127.0.0.1:{}", PEER_TLS[0])
            })),
            sidecars,
        });
    }
    std::thread::sleep(Duration::from_secs(2));
    for (name, pid, log) in &logs {
        check_alive(name, *pid, log);
    }
    Setup {
        targets,
        tls_weft: Arc::new(tls_weft),
        tls_plain: Arc::new(tls_plain),
        work,
    }
}

// ---------------------------------------------------------------- syscalls

/// One sidecar's syscalls over the `--syscalls` window.
struct Sys {
    target: &'static str,
    side: &'static str,
    requests: usize,
    errors: u64,
    rps: f64,
    /// (syscall, calls), most frequent first; empty when strace failed.
    calls: Vec<(String, u64)>,
}

/// `strace -c` output: (syscall, calls) per line, most frequent first.
fn parse_strace(text: &str) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = text
        .lines()
        .filter_map(|l| {
            // % time, seconds, usecs/call, calls, [errors], syscall
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 5 || f[0].parse::<f64>().is_err() {
                return None;
            }
            let name = *f.last()?;
            if name == "total" {
                return None;
            }
            Some((name.to_owned(), f[3].parse().ok()?))
        })
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

/// The main point's window (HTTP/1.1, 1 KiB, [`RATE`] rps over [`CONNS`]
/// connections) with `strace -c -f -p` attached to every thread of each
/// sidecar. strace runs unpinned (it stops the tracee at every syscall and
/// would otherwise starve the proxies' core).
fn strace_window(t: &Target, o: &Opts, dir: &Path) -> Vec<Sys> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let addr = t.h1();
    load(&t.ns, move || {
        constant_rate(addr, Proto::H1, 1024, RATE, CONNS, WARMUP)
    });
    let mut tracers = Vec::new();
    for (k, pid) in t.sidecars.iter().enumerate() {
        let out = dir.join(format!("strace-{}-{k}.txt", t.name));
        let log = dir.join(format!("strace-{}-{k}.log", t.name));
        let child = Command::new("setpriv")
            .args([
                "--pdeathsig",
                "KILL",
                "strace",
                "-c",
                "-f",
                "-q",
                "-S",
                "calls",
                "-o",
            ])
            .arg(&out)
            .args(["-p", &pid.to_string()])
            // strace re-raises SIGQUIT after its summary: a core, if any,
            // lands in the temporary directory.
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("strace log"))
            .spawn()
            .expect("spawn strace");
        remember(child.id());
        tracers.push((child, out, log));
    }
    // Attached to every thread before the window opens.
    std::thread::sleep(Duration::from_secs(1));
    let w = window(t, Proto::H1, 1024, CONNS, o.measure);
    for (child, _, _) in &tracers {
        // Not SIGINT: it is blocked in children (see `handle_signals`).
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGQUIT);
    }
    let mut rows = Vec::new();
    for (k, (mut child, out, log)) in tracers.into_iter().enumerate() {
        let give_up = Instant::now() + Duration::from_secs(10);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
        let status = child.wait();
        forget(child.id());
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        let calls = parse_strace(&text);
        if calls.is_empty() {
            eprintln!(
                "{}: strace ({status:?}) gave no counts: {text}{}",
                t.name,
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        rows.push(Sys {
            target: t.name,
            side: if k == 0 { "client" } else { "server" },
            requests: w.lat.len(),
            errors: w.errors,
            rps: w.lat.len() as f64 / w.secs,
            calls,
        });
    }
    rows
}

// ---------------------------------------------------------------- main

/// A matrix cell: latencies from one constant-rate window, vCPU per 1000
/// requests (or messages) per second per sidecar, max throughput.
#[derive(Clone, Copy)]
struct Cell {
    p50: f64,
    p99: f64,
    vcpu: f64,
    max: f64,
    ok: usize,
    errors: u64,
}

/// Each figure's median over repeated windows of one cell; counts summed.
fn median_cell(v: &[Cell]) -> Cell {
    let med = |f: fn(&Cell) -> f64| {
        let mut xs: Vec<f64> = v.iter().map(f).collect();
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    Cell {
        p50: med(|c| c.p50),
        p99: med(|c| c.p99),
        vcpu: med(|c| c.vcpu),
        max: med(|c| c.max),
        ok: v.iter().map(|c| c.ok).sum(),
        errors: v.iter().map(|c| c.errors).sum(),
    }
}

fn main() {
    drop_inherited_fds();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the pair benchmark needs root (network namespaces, iptables); run it as root");
        std::process::exit(1);
    }
    let o = opts();
    let mut needed = vec![
        ("nginx", "nginx"),
        ("haproxy", "haproxy"),
        ("taskset", "util-linux"),
        ("setpriv", "util-linux"),
        ("iptables-nft", "iptables"),
        ("bash", "bash"),
    ];
    if o.syscalls {
        needed.push(("strace", "strace"));
    }
    for (bin, package) in needed {
        if Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            eprintln!("{bin} missing: apt-get install -y {package}");
            std::process::exit(1);
        }
    }
    handle_signals();
    let _cleanup = Cleanup;
    let _ = rustls::crypto::ring::default_provider().install_default();
    eprintln!("pair: {} topology", topology_title(o.topology));
    let started = Instant::now();
    let s = setup(&o);
    let targets = &s.targets;
    let mut rows: Vec<Row> = vec![Row::default(); targets.len()];
    for (ti, t) in targets.iter().enumerate() {
        rows[ti].rss_idle = mb(&t.sidecars, "VmRSS:");
        rows[ti].handshakes = f64::NAN;
    }
    // RSS per 1000 idle connections of a fresh proxy, before any load: what
    // an allocator freed during a load is reused first, so measured after
    // one, a cost smaller than that reads 0.0 (the second measurement).
    if !o.core && o.cells.is_none() {
        for (ti, t) in targets.iter().enumerate() {
            rows[ti].idle_fresh_per_1000 = idle_rss(t, "fresh");
        }
    }
    if o.idle {
        for (t, r) in targets.iter().zip(&rows) {
            if let Some(per) = r.idle_fresh_per_1000 {
                println!(
                    "{}: RSS idle {:.1} MB; RSS per 1000 idle connections, fresh: {}",
                    t.name,
                    r.rss_idle,
                    pair_mb(Some(per))
                );
            }
        }
        return;
    }

    // Main comparison: HTTP/1.1, 1 KiB, 1000 rps, 16 connections; then the
    // maximum with 64 connections. Interleaved rounds.
    // The direct baseline runs first in every round; the proxied targets
    // take turns at going first after it. Measured twice as `weft` and
    // `weft-base` in a fixed order, one and the same proxy read 1.10 vCPU,
    // 1.20 added p50 and 4.15 added p99 against itself: whatever follows
    // the baseline pays for it.
    let proxied = targets.len().saturating_sub(1).max(1);
    for round in 0..o.rounds {
        let order =
            std::iter::once(0).chain((0..targets.len() - 1).map(|k| 1 + (k + round) % proxied));
        for ti in order {
            let t = &targets[ti];
            let addr = t.h1();
            load(&t.ns, move || {
                constant_rate(addr, Proto::H1, 1024, RATE, CONNS, WARMUP)
            });
            let w = window(t, Proto::H1, 1024, CONNS, o.measure);
            let max_for = o.max_for;
            let maxrps = load(&t.ns, move || {
                max_throughput(addr, Proto::H1, 1024, MAX_CONNS, max_for)
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
    if !o.core && o.cells.is_none() {
        for (ti, t) in targets.iter().enumerate() {
            let Some(addr) = t.tls else { continue };
            let cfg = if t.name.starts_with("weft") {
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
            rows[ti].idle_per_1000 = idle_rss(t, "after the load");
        }
    }

    // The matrix: one axis at a time around the main point, or the whole
    // cross product with --full. Short single windows, interleaved targets.
    let mut cells: Vec<(Proto, usize, usize)> = Vec::new();
    let mut cell_rounds = 1;
    if let Some(chosen) = &o.cells {
        cells = chosen.clone();
        cell_rounds = o.rounds;
    } else if !o.core {
        if o.full {
            for proto in [Proto::H1, Proto::H2, Proto::Stream, Proto::Tcp] {
                for payload in PAYLOADS {
                    // Streams carry small messages.
                    if proto == Proto::Stream && payload >= BIG {
                        continue;
                    }
                    for conns in [1, 16, 64] {
                        cells.push((proto, payload, conns));
                    }
                }
            }
        } else {
            for payload in [0, 16384, BIG] {
                cells.push((Proto::H1, payload, CONNS));
            }
            for proto in [Proto::H2, Proto::Stream, Proto::Tcp] {
                cells.push((proto, 1024, CONNS));
            }
            for conns in [1, 64] {
                cells.push((Proto::H1, 1024, conns));
            }
        }
    }
    let mut measured: HashMap<(usize, usize), Vec<Cell>> = HashMap::new();
    for round in 0..cell_rounds {
        for (ci, &(proto, payload, conns)) in cells.iter().enumerate() {
            // Repeated cells take turns at going first, as the main rounds do.
            let n = targets.len();
            for ti in (0..n).map(|k| (k + round) % n) {
                let t = &targets[ti];
                let Some(addr) = t.addr(proto) else { continue };
                let rate = rate_for(payload);
                load(&t.ns, move || {
                    constant_rate(
                        addr,
                        proto,
                        payload,
                        rate,
                        conns,
                        Duration::from_millis(300),
                    )
                });
                let w = window(t, proto, payload, conns, CELL_FOR);
                let max = load(&t.ns, move || {
                    max_throughput(addr, proto, payload, conns.max(16), CELL_FOR)
                });
                measured.entry((ci, ti)).or_default().push(Cell {
                    p50: pct(&w.lat, 0.5),
                    p99: pct(&w.lat, 0.99),
                    vcpu: w.vcpu,
                    max,
                    ok: w.lat.len(),
                    errors: w.errors,
                });
                if w.errors > 0 || cell_rounds > 1 {
                    eprintln!(
                        "matrix {} {payload} B {conns} conns {}: {} ok, {} errors, {:.3} vCPU/1000, max {:.0}",
                        proto.name(),
                        t.name,
                        w.lat.len(),
                        w.errors,
                        w.vcpu,
                        max
                    );
                }
            }
            eprintln!("matrix {} {} B {} conns done", proto.name(), payload, conns);
        }
    }
    let matrix: HashMap<(usize, usize), Cell> = measured
        .into_iter()
        .map(|(k, v)| (k, median_cell(&v)))
        .collect();

    let mut sys = Vec::new();
    if o.syscalls {
        for t in targets.iter().filter(|t| !t.sidecars.is_empty()) {
            let rows = strace_window(t, &o, s.work.path());
            for r in &rows {
                eprintln!(
                    "syscalls {} {}: {} requests, {} syscalls",
                    r.target,
                    r.side,
                    r.requests,
                    r.calls.iter().map(|c| c.1).sum::<u64>()
                );
            }
            sys.extend(rows);
        }
    }

    let md = report(&o, targets, &rows, &cells, &matrix, &sys, started.elapsed());
    println!("{md}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(out.join("pair.md"), &md);
    let _ = std::fs::write(out.join("pair.svg"), plot(o.topology, targets, &rows));
    eprintln!(
        "wrote {} and {}",
        out.join("pair.md").display(),
        out.join("pair.svg").display()
    );
}

// ---------------------------------------------------------------- report

fn topology_title(t: Topology) -> &'static str {
    match t {
        Topology::Fair => "fair",
        Topology::Loopback => "loopback",
    }
}

fn topology_text(t: Topology) -> &'static str {
    match t {
        Topology::Fair => {
            "Topology: fair. Every target has its own pair of network namespaces (client, server) joined by its own veth (10.78.N.0/24), with its own app in the server namespace; the load generator runs in the client namespace. weft: `weft-proxy init` capture rules in both namespaces. nginx and HAProxy: both sidecars as uid 1337, behind iptables-nft rules of the same shape (client namespace: nat OUTPUT REDIRECT of TCP to the ClusterIPs to the client peer's listeners, uid 1337 exempt; server namespace: nat PREROUTING REDIRECT of TCP arriving on the veth to the server peer's TLS listeners); the client peer dials the server pod's IP. direct: the load generator dials the app's pod IP across its veth, with no capture rules in its namespaces (an unmeshed pod pair: no NAT, no conntrack), so added latency includes what capture costs."
        }
        Topology::Loopback => {
            "Topology: loopback (not fair). nginx, HAProxy and direct each run in one namespace of their own on 127.0.0.1 (load generator, sidecars, app), without veth or capture rules; weft alone runs across two namespaces, a veth and its capture rules, so it pays kernel work (NAT, conntrack, veth) the others do not."
        }
    }
}

fn ratio(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else if v == f64::INFINITY {
        "∞".to_owned()
    } else {
        "–".to_owned()
    }
}

fn report(
    o: &Opts,
    targets: &[Target],
    rows: &[Row],
    cells: &[(Proto, usize, usize)],
    matrix: &HashMap<(usize, usize), Cell>,
    sys: &[Sys],
    took: Duration,
) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Sidecar pair benchmark, {} topology\n\n{}\n",
        topology_title(o.topology),
        topology_text(o.topology)
    );
    let _ = writeln!(
        md,
        "HTTP/1.1, 1 KiB responses, {RATE} rps over {CONNS} connections for {}s (latency from the intended send time: no coordinated omission), max throughput with {MAX_CONNS} closed-loop connections for {}s; medians of {} interleaved rounds (direct first in each, the proxied targets taking turns at going first after it). Proxies and the apps pinned to CPU 1, the load generator to CPU 0. vCPU from schedstat over the constant-rate window, per sidecar. RSS per 1000 idle connections: each sidecar's RSS growth while {IDLE_CONNS} idle HTTP/1.1 connections (one request each) are held open, after 4 × {IDLE_WARMUP} warm-up requests; once on the fresh proxy before any load and once after the load (then memory its allocator freed earlier in the run is reused first, so a cost smaller than that reads 0.0).{} Run took {:.0} s.\n",
        o.measure.as_secs(),
        o.max_for.as_secs(),
        o.rounds,
        if o.telemetry {
            " weft with access logs on and tracing at 1 %."
        } else {
            ""
        },
        took.as_secs_f64()
    );
    md.push_str("| target | added p50 ms | added p90 ms | added p99 ms | added p99.9 ms | added max ms | vCPU/1000 rps per sidecar | RSS idle MB | RSS at 1000 rps MB | RSS peak MB | max rps | % of direct | mTLS handshakes per server-core-s | RSS per 1000 idle conns MB fresh (client, server) | after the load | errors |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
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
            "| {}{} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {:.0} | {:.0}% | {} | {} | {} | {} |",
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
            pair_mb(r.idle_fresh_per_1000),
            pair_mb(r.idle_per_1000),
            r.errors
        );
    }
    if let Some(w) = targets.iter().position(|t| t.name == "weft")
        && targets
            .iter()
            .any(|t| t.name != "weft" && !t.sidecars.is_empty())
    {
        let _ = writeln!(
            md,
            "\nRatios weft / peer, same run, {} topology (the bar: ≤ 0.7 for vCPU and added latency, ≥ 1.3 for max rps, ≥ 2 for handshakes vs nginx, < 1 for RSS per idle connection).\n",
            topology_title(o.topology)
        );
        md.push_str("| weft / peer | vCPU per 1000 rps | added p50 | added p99 | max rps | RSS idle | mTLS handshakes per server-core-s | RSS per 1000 idle conns, fresh (client, server) |\n|---|---|---|---|---|---|---|---|\n");
        for (pi, p) in targets.iter().enumerate() {
            if p.sidecars.is_empty() || pi == w {
                continue;
            }
            let r = |f: fn(&Row) -> &Vec<f64>| median(f(&rows[w])) / median(f(&rows[pi]));
            let idle = match (rows[w].idle_fresh_per_1000, rows[pi].idle_fresh_per_1000) {
                (Some((wc, ws)), Some((pc, ps))) => {
                    // Growth under 0.05 MB reads 0.0: no ratio of two of those.
                    let r = |a: f64, b: f64| {
                        if a.abs() < 0.05 && b.abs() < 0.05 {
                            "–".to_owned()
                        } else {
                            ratio(a / b)
                        }
                    };
                    format!(
                        "{} ({wc:.1} vs {pc:.1} MB), {} ({ws:.1} vs {ps:.1} MB)",
                        r(wc, pc),
                        r(ws, ps)
                    )
                }
                _ => "–".to_owned(),
            };
            let _ = writeln!(
                md,
                "| / {} | {} | {} | {} | {} | {} | {} | {} |",
                p.name,
                ratio(r(|r| &r.vcpu)),
                ratio(d(w, |r| &r.p50) / d(pi, |r| &r.p50)),
                ratio(d(w, |r| &r.p99) / d(pi, |r| &r.p99)),
                ratio(r(|r| &r.maxrps)),
                ratio(rows[w].rss_idle / rows[pi].rss_idle),
                ratio(rows[w].handshakes / rows[pi].handshakes),
                idle,
            );
        }
    }
    if !cells.is_empty() {
        let _ = writeln!(
            md,
            "\nMatrix ({RATE} rps, 1 MiB cells {BIG_RATE} rps, for {}s per cell, one window; max with max(16, conns) closed-loop connections for {}s). Cells: added p50 / added p99 ms, vCPU per 1000 rps per sidecar, max rps; direct in absolute figures. HTTP/2 stream rows count messages, not requests: one long-lived HTTP/2 stream per connection carrying gRPC-framed messages of the payload size (plus 5 bytes), each echoed back by the app before the next is sent; latency per message, vCPU per 1000 messages/s, max messages/s. TCP rows: HTTP/1.1 bytes through an opaque TCP proxy. nginx: HTTP/2 row is h2 in, HTTP/1.1 over mTLS (no HTTP/2 upstream for `proxy_pass`); stream row via `grpc_pass` (h2 on both hops); no raw TCP in Debian's base package (n/a).\n",
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
            let size = if *payload >= BIG {
                format!("{} MiB", payload >> 20)
            } else if *payload >= 1024 {
                format!("{} KiB", payload >> 10)
            } else {
                format!("{payload} B")
            };
            let unit = if *proto == Proto::Stream {
                "msg/s"
            } else {
                "rps"
            };
            let _ = write!(md, "| {} | {size} | {conns} |", proto.name());
            let base = matrix.get(&(ci, 0)).copied();
            for ti in 0..targets.len() {
                match (matrix.get(&(ci, ti)), base) {
                    (Some(c), _) if c.ok == 0 => {
                        let _ = write!(md, " failed ({} errors) |", c.errors);
                    }
                    (Some(c), _) if ti == 0 => {
                        let _ = write!(
                            md,
                            " {:.3} / {:.3} abs, {:.0} {unit} |",
                            c.p50, c.p99, c.max
                        );
                    }
                    (Some(c), Some(b)) => {
                        let _ = write!(
                            md,
                            " {:.3} / {:.3}, {:.3}, {:.0} {unit}{} |",
                            c.p50 - b.p50,
                            c.p99 - b.p99,
                            c.vcpu,
                            c.max,
                            if c.errors > 0 {
                                format!(" ({} errors)", c.errors)
                            } else {
                                String::new()
                            }
                        );
                    }
                    _ => md.push_str(" n/a |"),
                }
            }
            md.push('\n');
        }
    }
    if !sys.is_empty() {
        let _ = writeln!(
            md,
            "\nSyscalls per request, {} topology: one window of HTTP/1.1, 1 KiB, {RATE} rps over {CONNS} connections for {}s per target, with `strace -c -f -p` attached to every thread of each sidecar (strace unpinned). strace stops the sidecar at every syscall: this window's latency and CPU are not reported, and nothing in the tables above was measured under strace. Per request: syscalls counted over the window (and the second before it, when strace attaches) divided by the requests completed.\n",
            topology_title(o.topology),
            o.measure.as_secs()
        );
        md.push_str("| target | sidecar | requests (rps, errors) | syscalls per request | top 5 by count, per request |\n|---|---|---|---|---|\n");
        for s in sys {
            let n = s.requests.max(1) as f64;
            let total: u64 = s.calls.iter().map(|c| c.1).sum();
            let top: Vec<String> = s
                .calls
                .iter()
                .take(5)
                .map(|(name, c)| format!("{name} {:.2}", *c as f64 / n))
                .collect();
            let _ = writeln!(
                md,
                "| {} | {} | {} ({:.0} rps, {} errors) | {} | {} |",
                s.target,
                s.side,
                s.requests,
                s.rps,
                s.errors,
                if s.calls.is_empty() {
                    "strace failed".to_owned()
                } else {
                    format!("{:.2}", total as f64 / n)
                },
                top.join(", ")
            );
        }
        let pair_total = |name: &str| -> f64 {
            sys.iter()
                .filter(|s| s.target == name)
                .map(|s| s.calls.iter().map(|c| c.1).sum::<u64>() as f64 / s.requests.max(1) as f64)
                .sum()
        };
        if sys.iter().any(|s| s.target == "weft") {
            md.push('\n');
            for p in targets
                .iter()
                .filter(|t| t.name != "weft" && !t.sidecars.is_empty())
            {
                let _ = writeln!(
                    md,
                    "weft / {}: syscalls per request, both sidecars: {:.1} / {:.1} = {}",
                    p.name,
                    pair_total("weft"),
                    pair_total(p.name),
                    ratio(pair_total("weft") / pair_total(p.name))
                );
            }
        }
    }
    md
}

/// Four bar groups (added p50, added p99, vCPU/1000 rps, max rps % of
/// direct), one bar per proxy, as a self-contained SVG.
fn plot(topology: Topology, targets: &[Target], rows: &[Row]) -> String {
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
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{pad}\" y=\"18\" font-size=\"14\">sidecar pair, {} topology, HTTP/1.1 1 KiB, 1000 rps / 16 conns (medians)</text>\n",
        topology_title(topology)
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
