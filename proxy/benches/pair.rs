//! The sidecar-pair benchmark (PERFORMANCE.md): load generator → client
//! sidecar → mTLS → server sidecar → app, for weft, nginx and HAProxy pairs,
//! against the direct connection. Prints a Markdown table and writes it to
//! `target/bench/pair.md`. Run as root:
//!
//! ```text
//! flock /tmp/weft-build.lock cargo bench -p weft-proxy --bench pair
//! ```
//!
//! Topology. weft runs for real: two network namespaces joined by a veth,
//! `weft-proxy init` in each, both proxies as uid 1337 subprocesses; the
//! load generator dials a ClusterIP in the client namespace and is captured.
//! nginx and HAProxy pairs (Debian packages, TLS 1.3, client certificates
//! required by the server side, keep-alive upstream pools) and the direct
//! baseline run on loopback inside the server namespace. Proxies are pinned
//! to CPU 1, the load generator to CPU 0.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use weft_proxy::test_util::TestCa;
use weft_proxy_config::{
    ClientPolicy, Endpoint, Inbound, MeshSettings, MtlsMode, Protocol, ProxyConfig, Service,
    ServicePort,
};

const RATE: u64 = 1000;
const CONNS: usize = 16;
const MEASURE: Duration = Duration::from_secs(5);
const WARMUP: Duration = Duration::from_secs(1);
const MAX_CONNS: usize = 64;
const MAX_FOR: Duration = Duration::from_secs(3);
const ROUNDS: usize = 3;

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

struct Netns(Vec<String>);
impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

struct Procs(Vec<Child>);
impl Drop for Procs {
    fn drop(&mut self) {
        // SIGTERM first: an nginx or HAProxy master then stops its workers.
        for c in &self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        std::thread::sleep(Duration::from_millis(500));
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

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
            let l = tokio::net::TcpListener::bind("0.0.0.0:8080")
                .await
                .expect("bind app");
            let _ = tx.send(());
            let payload = Bytes::from(vec![b'x'; 1024]);
            while let Ok((s, _)) = l.accept().await {
                let _ = s.set_nodelay(true);
                let p = payload.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let p = p.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(p)))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
    });
    rx.recv().expect("app up");
}

/// Latencies (µs, corrected for coordinated omission) at a constant rate.
async fn constant_rate(
    target: SocketAddr,
    host: &'static str,
    rate: u64,
    conns: usize,
    dur: Duration,
) -> (Vec<u64>, u64) {
    let start = Instant::now() + Duration::from_millis(50);
    let per_conn = Duration::from_nanos(1_000_000_000 * conns as u64 / rate);
    let mut tasks = Vec::new();
    for i in 0..conns {
        tasks.push(tokio::spawn(async move {
            let s = tokio::net::TcpStream::connect(target)
                .await
                .expect("connect");
            let _ = s.set_nodelay(true);
            let (mut send, conn) =
                hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(s))
                    .await
                    .expect("hs");
            tokio::spawn(conn);
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let offset = per_conn * i as u32 / conns as u32;
            let mut k = 0u32;
            loop {
                let intended = start + offset + per_conn * k;
                if intended.duration_since(start) >= dur {
                    break;
                }
                // The timer has millisecond granularity: sleep close, then spin.
                if let Some(early) = intended.checked_sub(Duration::from_millis(1)) {
                    tokio::time::sleep_until(early.into()).await;
                }
                while Instant::now() < intended {
                    tokio::task::yield_now().await;
                }
                let req = http::Request::get("/")
                    .header("host", host)
                    .body(Empty::new())
                    .expect("req");
                match send.send_request(req).await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.into_body().collect().await;
                        lat.push(intended.elapsed().as_micros() as u64);
                    }
                    _ => errors += 1,
                }
                k += 1;
            }
            (lat, errors)
        }));
    }
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
    host: &'static str,
    conns: usize,
    dur: Duration,
) -> f64 {
    let end = Instant::now() + dur;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        tasks.push(tokio::spawn(async move {
            let s = tokio::net::TcpStream::connect(target)
                .await
                .expect("connect");
            let _ = s.set_nodelay(true);
            let (mut send, conn) =
                hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(s))
                    .await
                    .expect("hs");
            tokio::spawn(conn);
            let mut n = 0u64;
            while Instant::now() < end {
                let req = http::Request::get("/")
                    .header("host", host)
                    .body(Empty::new())
                    .expect("req");
                match send.send_request(req).await {
                    Ok(r) => {
                        let _ = r.into_body().collect().await;
                        n += 1;
                    }
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
    total as f64 / dur.as_secs_f64()
}

fn pct(v: &[u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i] as f64 / 1000.0
}

fn tree(root: u32) -> Vec<u32> {
    let mut out = vec![root];
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                && let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r.to_owned())
                && rest
                    .split_whitespace()
                    .nth(1)
                    .and_then(|p| p.parse::<u32>().ok())
                    == Some(root)
            {
                out.push(pid);
            }
        }
    }
    out
}

fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            let rest = s.rsplit_once(')')?.1.to_owned();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
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

struct Target {
    name: &'static str,
    ns: String,
    addr: SocketAddr,
    host: &'static str,
    sidecars: Vec<Vec<u32>>,
}

#[derive(Default, Clone)]
struct Row {
    p50: Vec<f64>,
    p90: Vec<f64>,
    p99: Vec<f64>,
    p999: Vec<f64>,
    max: Vec<f64>,
    vcpu: Vec<f64>,
    rss_idle: Vec<f64>,
    rss_peak: Vec<f64>,
    maxrps: Vec<f64>,
    errors: u64,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).expect("write");
    p
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the pair benchmark needs root (network namespaces, iptables); run it as root");
        std::process::exit(1);
    }
    for bin in ["nginx", "haproxy", "taskset", "setpriv", "iptables-nft"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            eprintln!("{bin} missing: apt-get install -y nginx haproxy util-linux iptables");
            std::process::exit(1);
        }
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bin = env!("CARGO_BIN_EXE_weft-proxy");
    let work = tempfile::tempdir().expect("tmp");
    sh(&["chmod", "755", work.path().to_str().expect("utf8")]);
    let id = std::process::id();
    let (nc, nsrv) = (format!("weftb-c-{id}"), format!("weftb-s-{id}"));
    sh(&["ip", "netns", "add", &nc]);
    sh(&["ip", "netns", "add", &nsrv]);
    let _ns = Netns(vec![nc.clone(), nsrv.clone()]);
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
    for n in [&nc, &nsrv] {
        sh(&["ip", "netns", "exec", n, bin, "init", "--iptables", "nft"]);
    }

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
                access_log: false,
                tracing: None,
            },
            services,
            inbound: Inbound::default(),
        };
        c.seal();
        c
    };
    let svc = Service {
        name: "app".into(),
        namespace: "bench".into(),
        cluster_ips: vec!["10.96.0.1".parse().expect("ip")],
        ports: vec![ServicePort {
            port: 80,
            name: Some("http".into()),
            target_port: 8080,
            protocol: Protocol::Http1,
        }],
        subsets: vec![],
        endpoints: vec![Endpoint {
            address: "10.78.0.2".parse().expect("ip"),
            meshed: true,
            identity: Some(sid.into()),
            subsets: vec![],
            ports: Default::default(),
            terminating: false,
        }],
        http_routes: vec![],
        tcp_routes: vec![],
        policy: ClientPolicy::default(),
    };
    let mk_dir = |name: &str, c: &ProxyConfig, leaf: &weft_proxy::test_util::Leaf| {
        let d = work.path().join(name);
        std::fs::create_dir(&d).expect("dir");
        std::fs::write(d.join("proxy.json"), c.to_json()).expect("w");
        std::fs::write(d.join("tls.crt"), &leaf.cert_pem).expect("w");
        std::fs::write(d.join("tls.key"), &leaf.key_pem).expect("w");
        std::fs::write(d.join("ca.crt"), &ca.cert_pem).expect("w");
        sh(&["chmod", "-R", "a+rX", d.to_str().expect("utf8")]);
        d
    };
    let cdir = mk_dir("client", &cfg(vec![svc]), &cl);
    let sdir = mk_dir("server", &cfg(vec![]), &sl);

    spawn_app(&nsrv);
    let mut procs = Procs(Vec::new());
    let weft = |ns: &str, dir: &Path| {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "taskset",
                "-c",
                "1",
                "setpriv",
                "--reuid=1337",
                "--regid=1337",
                "--clear-groups",
                bin,
                "run",
                "--config-dir",
            ])
            .arg(dir)
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .spawn()
            .expect("weft-proxy run")
    };
    procs.0.push(weft(&nc, &cdir));
    procs.0.push(weft(&nsrv, &sdir));
    let weft_pids = vec![vec![procs.0[0].id()], vec![procs.0[1].id()]];

    // nginx and HAProxy pairs on loopback in the server namespace.
    let p = |f: &str| work.path().join(f).to_string_lossy().into_owned();
    write(work.path(), "ca.crt", &ca.cert_pem);
    write(work.path(), "c.crt", &cl.cert_pem);
    write(work.path(), "c.key", &cl.key_pem);
    write(work.path(), "s.crt", &sl.cert_pem);
    write(work.path(), "s.key", &sl.key_pem);
    write(
        work.path(),
        "c.pem",
        &format!("{}{}", cl.cert_pem, cl.key_pem),
    );
    write(
        work.path(),
        "s.pem",
        &format!("{}{}", sl.cert_pem, sl.key_pem),
    );
    let nginx_common = |name: &str| {
        format!(
            "worker_processes 1; daemon off; pid {pid}; error_log {err} error;\nevents {{ worker_connections 4096; }}\n",
            pid = p(&format!("{name}.pid")),
            err = p(&format!("{name}.err"))
        )
    };
    let nginx_c = format!(
        "{}http {{ access_log off; client_body_temp_path {t}; proxy_temp_path {t};\n upstream srv {{ server 127.0.0.1:18443; keepalive 64; }}\n server {{ listen 127.0.0.1:18081; location / {{ proxy_pass https://srv; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_ssl_certificate {cc}; proxy_ssl_certificate_key {ck}; proxy_ssl_protocols TLSv1.3; proxy_ssl_session_reuse on; }} }} }}\n",
        nginx_common("nc"),
        t = p("tmp"),
        cc = p("c.crt"),
        ck = p("c.key")
    );
    let nginx_s = format!(
        "{}http {{ access_log off; client_body_temp_path {t}; proxy_temp_path {t};\n upstream app {{ server 127.0.0.1:8080; keepalive 64; }}\n server {{ listen 127.0.0.1:18443 ssl; ssl_certificate {sc}; ssl_certificate_key {sk}; ssl_protocols TLSv1.3; ssl_verify_client on; ssl_client_certificate {ca}; keepalive_requests 100000; location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }} }}\n",
        nginx_common("ns"),
        t = p("tmp"),
        sc = p("s.crt"),
        sk = p("s.key"),
        ca = p("ca.crt")
    );
    std::fs::create_dir_all(p("tmp")).expect("tmp");
    let haproxy_c = format!(
        "global\n nbthread 1\n maxconn 4096\ndefaults\n mode http\n timeout connect 5s\n timeout client 30s\n timeout server 30s\n http-reuse always\nfrontend f\n bind 127.0.0.1:18082\n default_backend b\nbackend b\n server s 127.0.0.1:18444 ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3\n",
        p("c.pem"),
        p("ca.crt")
    );
    let haproxy_s = format!(
        "global\n nbthread 1\n maxconn 4096\ndefaults\n mode http\n timeout connect 5s\n timeout client 30s\n timeout server 30s\n http-reuse always\nfrontend f\n bind 127.0.0.1:18444 ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3\n default_backend b\nbackend b\n server app 127.0.0.1:8080\n",
        p("s.pem"),
        p("ca.crt")
    );
    let run = |args: Vec<String>| {
        let mut full = vec![
            "netns".to_owned(),
            "exec".to_owned(),
            nsrv.clone(),
            "taskset".into(),
            "-c".into(),
            "1".into(),
        ];
        full.extend(args);
        Command::new("ip")
            .args(&full)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn peer")
    };
    let f = |name: &str, body: &str| {
        write(work.path(), name, body)
            .to_string_lossy()
            .into_owned()
    };
    let (nc_cfg, ns_cfg, hc_cfg, hs_cfg) = (
        f("nc.conf", &nginx_c),
        f("ns.conf", &nginx_s),
        f("hc.cfg", &haproxy_c),
        f("hs.cfg", &haproxy_s),
    );
    procs.0.push(run(vec!["nginx".into(), "-c".into(), nc_cfg]));
    procs.0.push(run(vec!["nginx".into(), "-c".into(), ns_cfg]));
    procs.0.push(run(vec![
        "haproxy".into(),
        "-db".into(),
        "-f".into(),
        hc_cfg,
    ]));
    procs.0.push(run(vec![
        "haproxy".into(),
        "-db".into(),
        "-f".into(),
        hs_cfg,
    ]));
    std::thread::sleep(Duration::from_secs(2));
    let ids: Vec<u32> = procs.0.iter().map(Child::id).collect();

    let targets = [
        Target {
            name: "direct",
            ns: nsrv.clone(),
            addr: "127.0.0.1:8080".parse().expect("a"),
            host: "app",
            sidecars: vec![],
        },
        Target {
            name: "weft",
            ns: nc.clone(),
            addr: "10.96.0.1:80".parse().expect("a"),
            host: "app",
            sidecars: weft_pids,
        },
        Target {
            name: "nginx",
            ns: nsrv.clone(),
            addr: "127.0.0.1:18081".parse().expect("a"),
            host: "app",
            sidecars: vec![tree(ids[2]), tree(ids[3])],
        },
        Target {
            name: "haproxy",
            ns: nsrv.clone(),
            addr: "127.0.0.1:18082".parse().expect("a"),
            host: "app",
            sidecars: vec![tree(ids[4]), tree(ids[5])],
        },
    ];
    let mut rows: Vec<Row> = vec![Row::default(); targets.len()];
    for round in 0..ROUNDS {
        for (ti, t) in targets.iter().enumerate() {
            let (addr, host) = (t.addr, t.host);
            let pids: Vec<u32> = t.sidecars.iter().flat_map(|v| v.iter().copied()).collect();
            let idle = status_kb(&pids, "VmRSS:") as f64 / 1024.0 / t.sidecars.len().max(1) as f64;
            in_ns(&t.ns, 0, move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("rt");
                rt.block_on(constant_rate(addr, host, RATE, CONNS, WARMUP));
            });
            let before = cpu_ticks(&pids);
            let t0 = Instant::now();
            let (lat, errors) = in_ns(&t.ns, 0, move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("rt");
                rt.block_on(constant_rate(addr, host, RATE, CONNS, MEASURE))
            });
            let secs = t0.elapsed().as_secs_f64();
            let ticks = cpu_ticks(&pids).saturating_sub(before) as f64 / 100.0;
            let maxrps = in_ns(&t.ns, 0, move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("rt");
                rt.block_on(max_throughput(addr, host, MAX_CONNS, MAX_FOR))
            });
            let peak = status_kb(&pids, "VmHWM:") as f64 / 1024.0 / t.sidecars.len().max(1) as f64;
            let r = &mut rows[ti];
            r.p50.push(pct(&lat, 0.5));
            r.p90.push(pct(&lat, 0.9));
            r.p99.push(pct(&lat, 0.99));
            r.p999.push(pct(&lat, 0.999));
            r.max.push(pct(&lat, 1.0));
            let achieved = lat.len() as f64 / secs;
            r.vcpu.push(if t.sidecars.is_empty() {
                0.0
            } else {
                ticks / secs / t.sidecars.len() as f64 / (achieved / 1000.0)
            });
            r.rss_idle.push(idle);
            r.rss_peak.push(peak);
            r.maxrps.push(maxrps);
            r.errors += errors;
            eprintln!(
                "round {round} {}: {} ok, {errors} errors, p50 {:.3} ms p99 {:.3} ms, max {:.0} rps",
                t.name,
                lat.len(),
                pct(&lat, 0.5),
                pct(&lat, 0.99),
                maxrps
            );
        }
    }
    let d = |ti: usize, f: fn(&Row) -> &Vec<f64>| median(f(&rows[ti])) - median(f(&rows[0]));
    let mut md = String::new();
    md.push_str(&format!(
        "HTTP/1.1, 1 KiB responses, {RATE} rps over {CONNS} connections for {}s (latency corrected for coordinated omission), max throughput with {MAX_CONNS} connections for {}s; medians of {ROUNDS} interleaved rounds. Proxies pinned to CPU 1, load generator to CPU 0.\n\n",
        MEASURE.as_secs(), MAX_FOR.as_secs()
    ));
    md.push_str("| target | added p50 ms | added p90 ms | added p99 ms | added p99.9 ms | added max ms | vCPU/1000 rps per sidecar | RSS idle MB per sidecar | RSS peak MB per sidecar | max rps | % of direct | errors |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let direct_max = median(&rows[0].maxrps);
    for (ti, t) in targets.iter().enumerate() {
        let (a50, a90, a99, a999, amax) = if ti == 0 {
            (
                median(&rows[0].p50),
                median(&rows[0].p90),
                median(&rows[0].p99),
                median(&rows[0].p999),
                median(&rows[0].max),
            )
        } else {
            (
                d(ti, |r| &r.p50),
                d(ti, |r| &r.p90),
                d(ti, |r| &r.p99),
                d(ti, |r| &r.p999),
                d(ti, |r| &r.max),
            )
        };
        md.push_str(&format!(
            "| {}{} | {a50:.3} | {a90:.3} | {a99:.3} | {a999:.3} | {amax:.3} | {:.3} | {:.1} | {:.1} | {:.0} | {:.0}% | {} |\n",
            t.name,
            if ti == 0 { " (absolute)" } else { "" },
            median(&rows[ti].vcpu),
            median(&rows[ti].rss_idle),
            median(&rows[ti].rss_peak),
            median(&rows[ti].maxrps),
            100.0 * median(&rows[ti].maxrps) / direct_max,
            rows[ti].errors
        ));
    }
    let ratio =
        |a: usize, b: usize, f: fn(&Row) -> &Vec<f64>| median(f(&rows[a])) / median(f(&rows[b]));
    md.push_str(&format!(
        "\nRatios weft/nginx, weft/haproxy: added p50 {:.2}, {:.2}; added p99 {:.2}, {:.2}; vCPU {:.2}, {:.2}; max rps {:.2}, {:.2}\n",
        d(1, |r| &r.p50) / d(2, |r| &r.p50),
        d(1, |r| &r.p50) / d(3, |r| &r.p50),
        d(1, |r| &r.p99) / d(2, |r| &r.p99),
        d(1, |r| &r.p99) / d(3, |r| &r.p99),
        ratio(1, 2, |r| &r.vcpu),
        ratio(1, 3, |r| &r.vcpu),
        ratio(1, 2, |r| &r.maxrps),
        ratio(1, 3, |r| &r.maxrps),
    ));
    println!("{md}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&out);
    if let Ok(mut f) = std::fs::File::create(out.join("pair.md")) {
        let _ = f.write_all(md.as_bytes());
    }
    drop(procs);
}
