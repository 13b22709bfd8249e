//! The TLS provider benchmark (decision 6 in `docs/architecture.md`): the
//! crypto provider and TLS 1.3 cipher suite of the mTLS between proxies,
//! measured in-process. For each provider (ring, the one weft ships, and
//! aws-lc-rs) and each TLS 1.3 suite:
//!
//! - full mTLS handshakes per CPU-second, and per server-CPU-second;
//! - resumed handshakes (TLS 1.3 PSK with X25519, the stateful tickets weft's
//!   servers issue) per CPU-second, and per server-CPU-second;
//! - record throughput on an established connection: 1 KiB and 16 KiB
//!   application-data records sealed by the client and opened by the server,
//!   in MB/s (10^6 bytes) of plaintext per CPU-second of both.
//!
//! Both ends run in one thread, in memory, with no sockets: the client's and
//! the server's `rustls` connections hand each other their TLS bytes
//! (`write_tls` / `read_tls`). Certificates are weft's shape: an ECDSA P-256
//! CA and SPIFFE leaves of P-256 keys, checked by weft's own verifiers
//! (chain and SPIFFE ID on both sides), configurations built the way
//! `tls::Identity` builds them (TLS 1.3 only, client certificates required,
//! the server's suite order, weft's ALPN ids), with the provider under test.
//! Key exchange is X25519 with both providers (the first group offered; the
//! suite is the only one each side enables). Two more rows: weft's real
//! `Identity` configurations, to show the bench's ring rows are weft's; and
//! aws-lc-rs with X25519MLKEM768, the hybrid post-quantum group that rustls's
//! own aws-lc-rs provider offers first (ring's offers X25519 first and has no
//! ML-KEM).
//!
//! CPU time is the thread's, from the scheduler (`/proc/thread-self/schedstat`,
//! nanoseconds; wall time if that cannot be read); the server's share is the
//! wall time spent inside the server connection's calls, as a fraction of the
//! cell's. Cells run interleaved for `--rounds` rounds (5) of `--secs`
//! seconds each (1.0); the figures are medians. Prints a Markdown table and
//! writes it to `target/bench/tls.md`. Hold the build lock, so nothing else
//! runs on the machine during the measurement:
//!
//! ```text
//! flock /tmp/weft-build.lock cargo bench -p weft-proxy --bench tls             # ~3 min
//! flock /tmp/weft-build.lock cargo bench -p weft-proxy --bench tls -- --rounds 3 --secs 0.5
//! ```
//!
//! rustls implements aws-lc-rs's provider behind its `aws_lc_rs` feature; but
//! cargo unifies features, so enabling it for a benchmark would also build the
//! `weft-proxy` binary that benchmarks and tests run (and every workspace
//! crate's tests) with both providers. The bench therefore assembles the
//! aws-lc-rs provider itself ([`aws_lc`]), from the same aws-lc-rs primitives
//! and in the same shape as rustls's own: AES-GCM through aws-lc's TLS record
//! keys, ChaCha20-Poly1305 through its AEAD, aws-lc's HKDF, X25519 / P-256 /
//! P-384 key agreement, ECDSA signing and signature checks.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CipherSuite, ClientConfig, ClientConnection, Connection, HandshakeKind, NamedGroup,
    RootCertStore, ServerConfig, ServerConnection,
};
use weft_proxy::test_util::TestCa;
use weft_proxy::tls::identity::IdentityFiles;
use weft_proxy::tls::verify::{ClientIdentityVerifier, ServerIdentityVerifier};
use weft_proxy::tls::{Alpn, Identity, spiffe_id_of};

const TD: &str = "cluster.local";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const SERVER_ID: &str = "spiffe://cluster.local/ns/shop/sa/echo";

/// The TLS 1.3 suites, in the order the table lists them.
const SUITES: [CipherSuite; 3] = [
    CipherSuite::TLS13_AES_128_GCM_SHA256,
    CipherSuite::TLS13_AES_256_GCM_SHA384,
    CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
];

/// Application data per record batch: 64 records of 1 KiB, or 4 of 16 KiB.
const BATCH_BYTES: usize = 64 * 1024;

fn main() {
    let opts = Opts::parse();
    pin_to_last_cpu();
    let pki = Pki::new();

    let mut variants = Vec::new();
    for suite in SUITES {
        variants.push(Variant::custom("ring", suite, ring_provider(suite), &pki));
        variants.push(Variant::custom(
            "aws-lc-rs",
            suite,
            aws_lc::provider(suite),
            &pki,
        ));
    }
    variants.push(Variant::weft(&pki));
    // aws-lc-rs with the key exchange its stock rustls provider prefers.
    let mut hybrid = aws_lc::provider(SUITES[0]);
    hybrid.kx_groups.insert(0, aws_lc::X25519MLKEM768);
    variants.push(Variant::custom("aws-lc-rs", SUITES[0], hybrid, &pki));

    eprintln!(
        "tls: {} configurations × 4 cells, {} rounds of {} s",
        variants.len(),
        opts.rounds,
        opts.secs
    );
    let mut buf = Vec::with_capacity(2 * BATCH_BYTES);
    // Warm-up: every configuration once, untimed, and the invariants
    // checked (suite, key exchange group, ALPN, handshake kinds).
    for v in &variants {
        v.check(&mut buf);
        for m in Measure::ALL {
            run_cell(v, m, 0.1, &mut buf);
        }
    }

    let mut samples: Vec<[Vec<Sample>; 4]> = variants.iter().map(|_| Default::default()).collect();
    for round in 0..opts.rounds {
        for (i, v) in variants.iter().enumerate() {
            for (j, m) in Measure::ALL.into_iter().enumerate() {
                samples[i][j].push(run_cell(v, m, opts.secs, &mut buf));
            }
        }
        eprintln!("tls: round {}/{} done", round + 1, opts.rounds);
    }

    let rows: Vec<Row> = variants
        .iter()
        .zip(&samples)
        .map(|(v, s)| Row::new(v, s))
        .collect();
    let md = markdown(&rows, &opts);
    println!("{md}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&out);
    match std::fs::write(out.join("tls.md"), &md) {
        Ok(()) => eprintln!("tls: wrote {}", out.join("tls.md").display()),
        Err(e) => eprintln!("tls: cannot write {}: {e}", out.join("tls.md").display()),
    }
}

struct Opts {
    rounds: usize,
    secs: f64,
}

impl Opts {
    fn parse() -> Self {
        let mut o = Opts {
            rounds: 5,
            secs: 1.0,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--rounds" => o.rounds = args.next().and_then(|v| v.parse().ok()).unwrap_or(5),
                "--secs" => o.secs = args.next().and_then(|v| v.parse().ok()).unwrap_or(1.0),
                // `cargo bench` passes `--bench`; anything else is ignored too.
                _ => {}
            }
        }
        o.rounds = o.rounds.max(1);
        o
    }
}

/// The scheduler's noise is smaller on one core: the last one (the pair
/// benchmark puts its proxies on CPU 1 as well).
fn pin_to_last_cpu() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpus - 1).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// This thread's CPU time, from the scheduler's accounting. Yielding first
/// makes the kernel bring the running task's figure up to date.
fn thread_cpu() -> Option<Duration> {
    std::thread::yield_now();
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// The CA and the two workload identities, as weft issues them.
struct Pki {
    ca_pem: String,
    client: IdentityFiles,
    server: IdentityFiles,
}

impl Pki {
    fn new() -> Self {
        let ca = TestCa::new("weft-bench-ca");
        let files = |id: &str| {
            let leaf = ca.leaf(id, 24 * 3600);
            IdentityFiles {
                cert_chain: leaf.cert_pem.into_bytes(),
                key: leaf.key_pem.into_bytes(),
                bundle: ca.cert_pem.clone().into_bytes(),
            }
        };
        Pki {
            client: files(CLIENT_ID),
            server: files(SERVER_ID),
            ca_pem: ca.cert_pem.clone(),
        }
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(c.expect("CA PEM")).expect("CA certificate");
        }
        Arc::new(roots)
    }
}

fn chain(files: &IdentityFiles) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(&files.cert_chain)
        .collect::<Result<_, _>>()
        .expect("leaf PEM")
}

fn key(files: &IdentityFiles) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_slice(&files.key).expect("key PEM")
}

/// ring with only `suite` enabled (its default key exchange groups: X25519
/// first, then P-256 and P-384).
fn ring_provider(suite: CipherSuite) -> CryptoProvider {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.retain(|s| s.suite() == suite);
    p
}

/// A provider and suite under test, with its server configuration and two
/// client configurations (without resumption for full handshakes, with
/// weft's default in-memory session cache for resumed ones).
struct Variant {
    provider: &'static str,
    suite: CipherSuite,
    /// The key exchange group both sides prefer (and so negotiate).
    group: NamedGroup,
    server: Arc<ServerConfig>,
    full: Arc<ClientConfig>,
    resume: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl Variant {
    /// Configurations built as `tls::Identity::load` and
    /// `Identity::client_config` build them, with `provider`.
    fn custom(
        provider_name: &'static str,
        suite: CipherSuite,
        provider: CryptoProvider,
        pki: &Pki,
    ) -> Self {
        let group = provider.kx_groups[0].name();
        let provider = Arc::new(provider);
        let roots = pki.roots();
        let client_verifier =
            ClientIdentityVerifier::new(roots.clone(), TD.to_owned(), provider.clone())
                .expect("client verifier");
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_client_cert_verifier(Arc::new(client_verifier))
            .with_single_cert(chain(&pki.server), key(&pki.server))
            .expect("server certificate");
        server.alpn_protocols = Alpn::ALL.iter().map(|a| a.id().to_vec()).collect();
        server.ignore_client_order = true;

        let server_id = spiffe_id_of(&chain(&pki.server)[0]).expect("server SPIFFE ID");
        let verifier = ServerIdentityVerifier::new(roots, server_id, provider.clone());
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(chain(&pki.client), key(&pki.client))
            .expect("client certificate");
        client.alpn_protocols = Alpn::Mux.offer();
        Self::new(
            provider_name,
            suite,
            group,
            Arc::new(server),
            Arc::new(client),
        )
    }

    /// weft's own configurations: `Identity::load` on both sides (ring,
    /// AES-128-GCM first, every suite enabled).
    fn weft(pki: &Pki) -> Self {
        let now = UnixTime::now();
        let server = Identity::load(&pki.server, TD, now).expect("server identity");
        let client = Identity::load(&pki.client, TD, now).expect("client identity");
        let cfg = client
            .client_config(server.id(), Alpn::Mux)
            .expect("client config");
        Self::new(
            "ring, weft's Identity",
            CipherSuite::TLS13_AES_128_GCM_SHA256,
            NamedGroup::X25519,
            server.server_config(),
            cfg,
        )
    }

    fn new(
        provider: &'static str,
        suite: CipherSuite,
        group: NamedGroup,
        server: Arc<ServerConfig>,
        resume: Arc<ClientConfig>,
    ) -> Self {
        let mut full = (*resume).clone();
        full.resumption = Resumption::disabled();
        Variant {
            provider,
            suite,
            group,
            server,
            full: Arc::new(full),
            resume,
            name: ServerName::IpAddress(Ipv4Addr::new(10, 0, 0, 2).into()),
        }
    }

    /// One handshake with `client`; its connections, established.
    fn handshake(
        &self,
        client: &Arc<ClientConfig>,
        buf: &mut Vec<u8>,
        server_time: &mut Duration,
    ) -> (Connection, Connection) {
        let mut c = Connection::Client(
            ClientConnection::new(client.clone(), self.name.clone()).expect("client connection"),
        );
        let t = Instant::now();
        let mut s =
            Connection::Server(ServerConnection::new(self.server.clone()).expect("server conn"));
        *server_time += t.elapsed();
        // Until both are quiet: the server's session tickets follow its
        // handshake and reach the client in the last flight.
        loop {
            let a = flight(&mut c, &mut s, buf, false, server_time);
            let b = flight(&mut s, &mut c, buf, true, server_time);
            if !a && !b {
                break;
            }
        }
        assert!(
            !c.is_handshaking() && !s.is_handshaking(),
            "handshake stalled"
        );
        (c, s)
    }

    /// What the table claims about this configuration, checked once.
    fn check(&self, buf: &mut Vec<u8>) {
        let mut t = Duration::ZERO;
        for (cfg, kind) in [
            (&self.full, HandshakeKind::Full),
            (&self.resume, HandshakeKind::Full),
            (&self.resume, HandshakeKind::Resumed),
        ] {
            let (c, s) = self.handshake(cfg, buf, &mut t);
            assert_eq!(c.handshake_kind(), Some(kind), "{}", self.provider);
            assert_eq!(s.handshake_kind(), Some(kind), "{}", self.provider);
            let suite = c.negotiated_cipher_suite().map(|s| s.suite());
            assert_eq!(suite, Some(self.suite), "{}", self.provider);
            let group = c.negotiated_key_exchange_group().map(|g| g.name());
            assert_eq!(group, Some(self.group), "{}", self.provider);
            assert_eq!(s.alpn_protocol(), Some(Alpn::Mux.id()), "{}", self.provider);
            let Connection::Server(server) = &s else {
                unreachable!("the server side is a server connection")
            };
            let peer = server
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|leaf| spiffe_id_of(leaf).ok());
            assert_eq!(
                peer.as_ref().map(|id| id.as_str()),
                Some(CLIENT_ID),
                "{}",
                self.provider
            );
        }
    }
}

/// Moves every TLS byte `from` has to send into `to`, which processes them.
/// The server's side of it is added to `server_time`. Whether any moved.
fn flight(
    from: &mut Connection,
    to: &mut Connection,
    buf: &mut Vec<u8>,
    from_server: bool,
    server_time: &mut Duration,
) -> bool {
    buf.clear();
    let t = Instant::now();
    while from.wants_write() {
        from.write_tls(buf).expect("write_tls");
    }
    if from_server {
        *server_time += t.elapsed();
    }
    if buf.is_empty() {
        return false;
    }
    let t = Instant::now();
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).expect("read_tls");
        to.process_new_packets().expect("TLS error");
    }
    if !from_server {
        *server_time += t.elapsed();
    }
    true
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Measure {
    Full,
    Resumed,
    Records1K,
    Records16K,
}

impl Measure {
    const ALL: [Measure; 4] = [
        Measure::Full,
        Measure::Resumed,
        Measure::Records1K,
        Measure::Records16K,
    ];
}

/// One cell of one round: what was done, in how much CPU and wall time, and
/// how much of the wall time the server's calls took.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    /// Handshakes, or plaintext bytes sealed and opened.
    ops: f64,
    cpu: Duration,
    wall: Duration,
    server: Duration,
}

impl Sample {
    /// Operations per CPU-second of both sides.
    fn rate(&self) -> f64 {
        self.ops / self.cpu.as_secs_f64()
    }

    /// Operations per CPU-second of the server side.
    fn server_rate(&self) -> f64 {
        let share = self.server.as_secs_f64() / self.wall.as_secs_f64();
        self.ops / (self.cpu.as_secs_f64() * share)
    }
}

fn run_cell(v: &Variant, m: Measure, secs: f64, buf: &mut Vec<u8>) -> Sample {
    let budget = Duration::from_secs_f64(secs);
    let mut server = Duration::ZERO;
    let mut ops = 0u64;
    let record = match m {
        Measure::Records1K => 1024,
        _ => 16 * 1024,
    };
    let payload = vec![0x5a_u8; record];
    let mut out = vec![0u8; BATCH_BYTES];
    // Records: one connection, established before the clock starts.
    let mut conn = matches!(m, Measure::Records1K | Measure::Records16K).then(|| {
        let (mut c, s) = v.handshake(&v.full, buf, &mut server);
        c.set_buffer_limit(None);
        (c, s)
    });
    // Resumption: the first handshake (full) leaves tickets behind, and
    // every resumed one leaves new ones.
    if m == Measure::Resumed {
        v.handshake(&v.resume, buf, &mut server);
    }
    server = Duration::ZERO;

    let cpu0 = thread_cpu();
    let start = Instant::now();
    while start.elapsed() < budget {
        match (m, conn.as_mut()) {
            (Measure::Full, _) => {
                for _ in 0..8 {
                    let (c, _) = v.handshake(&v.full, buf, &mut server);
                    debug_assert_eq!(c.handshake_kind(), Some(HandshakeKind::Full));
                }
                ops += 8;
            }
            (Measure::Resumed, _) => {
                for _ in 0..8 {
                    let (c, _) = v.handshake(&v.resume, buf, &mut server);
                    debug_assert_eq!(c.handshake_kind(), Some(HandshakeKind::Resumed));
                }
                ops += 8;
            }
            (_, Some((c, s))) => {
                for _ in 0..16 {
                    ops += records(c, s, &payload, buf, &mut out, &mut server) as u64;
                }
            }
            (_, None) => unreachable!("record cells have a connection"),
        }
    }
    let wall = start.elapsed();
    let cpu = match (cpu0, thread_cpu()) {
        (Some(a), Some(b)) if b > a => b - a,
        _ => wall,
    };
    Sample {
        ops: ops as f64,
        cpu,
        wall,
        server,
    }
}

/// One batch of [`BATCH_BYTES`] of application data in `payload`-sized
/// records: sealed by the client, opened and read by the server. The bytes
/// delivered.
fn records(
    c: &mut Connection,
    s: &mut Connection,
    payload: &[u8],
    buf: &mut Vec<u8>,
    out: &mut [u8],
    server_time: &mut Duration,
) -> usize {
    buf.clear();
    for _ in 0..BATCH_BYTES / payload.len() {
        c.writer().write_all(payload).expect("write plaintext");
    }
    while c.wants_write() {
        c.write_tls(buf).expect("write_tls");
    }
    let t = Instant::now();
    let mut got = 0;
    let mut rd = &buf[..];
    while !rd.is_empty() {
        s.read_tls(&mut rd).expect("read_tls");
        s.process_new_packets().expect("TLS error");
        loop {
            match s.reader().read(out) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("read plaintext: {e}"),
            }
        }
    }
    *server_time += t.elapsed();
    assert_eq!(got, BATCH_BYTES, "every record delivered");
    got
}

/// The medians of one configuration's cells.
struct Row {
    provider: &'static str,
    suite: CipherSuite,
    group: NamedGroup,
    full: f64,
    full_server: f64,
    resumed: f64,
    resumed_server: f64,
    mb_1k: f64,
    mb_16k: f64,
}

impl Row {
    fn new(v: &Variant, s: &[Vec<Sample>; 4]) -> Self {
        let med = |i: usize, f: fn(&Sample) -> f64| median(s[i].iter().map(f).collect());
        Row {
            provider: v.provider,
            suite: v.suite,
            group: v.group,
            full: med(0, Sample::rate),
            full_server: med(0, Sample::server_rate),
            resumed: med(1, Sample::rate),
            resumed_server: med(1, Sample::server_rate),
            mb_1k: med(2, Sample::rate) / 1e6,
            mb_16k: med(3, Sample::rate) / 1e6,
        }
    }

    fn figures(&self) -> [f64; 6] {
        [
            self.full,
            self.full_server,
            self.resumed,
            self.resumed_server,
            self.mb_1k,
            self.mb_16k,
        ]
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn suite_name(s: CipherSuite) -> &'static str {
    match s {
        CipherSuite::TLS13_AES_128_GCM_SHA256 => "AES-128-GCM-SHA256",
        CipherSuite::TLS13_AES_256_GCM_SHA384 => "AES-256-GCM-SHA384",
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => "CHACHA20-POLY1305-SHA256",
        _ => "other",
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn markdown(rows: &[Row], o: &Opts) -> String {
    let mut md = String::new();
    md.push_str(&format!(
        "### TLS providers and TLS 1.3 suites, in-process (medians of {} rounds of {} s per cell; {}, one pinned thread)\n\n",
        o.rounds,
        o.secs,
        cpu_model()
    ));
    md.push_str(
        "mTLS between weft proxies: ECDSA P-256 CA and SPIFFE leaves, both chains and IDs verified, key exchange as the row says. \
         Handshakes per CPU-second of client and server together, and per CPU-second of the server side alone; \
         records sealed by the client and opened by the server, MB/s (10^6 bytes of plaintext) per CPU-second of both.\n\n",
    );
    md.push_str("| provider | suite | key exchange | full hs / CPU-s | full hs / server-CPU-s | resumed hs / CPU-s | resumed hs / server-CPU-s | 1 KiB records MB/s | 16 KiB records MB/s |\n");
    md.push_str("|---|---|---|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        md.push_str(&format!(
            "| {} | {} | {:?} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
            r.provider,
            suite_name(r.suite),
            r.group,
            r.full,
            r.full_server,
            r.resumed,
            r.resumed_server,
            r.mb_1k,
            r.mb_16k
        ));
    }
    md.push_str("\n#### aws-lc-rs / ring, same suite\n\n");
    md.push_str("| suite | full hs | full hs (server) | resumed hs | resumed hs (server) | 1 KiB records | 16 KiB records |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    for suite in SUITES {
        let find = |p: &str| {
            rows.iter()
                .find(|r| r.provider == p && r.suite == suite && r.group == NamedGroup::X25519)
        };
        if let (Some(ring), Some(aws)) = (find("ring"), find("aws-lc-rs")) {
            let cells: Vec<String> = aws
                .figures()
                .iter()
                .zip(ring.figures())
                .map(|(a, r)| format!("{:.2}", a / r))
                .collect();
            md.push_str(&format!(
                "| {} | {} |\n",
                suite_name(suite),
                cells.join(" | ")
            ));
        }
    }
    md.push_str("\n#### each suite / AES-128-GCM-SHA256, same provider\n\n");
    md.push_str("| provider | suite | full hs | full hs (server) | resumed hs | resumed hs (server) | 1 KiB records | 16 KiB records |\n");
    md.push_str("|---|---|---:|---:|---:|---:|---:|---:|\n");
    for provider in ["ring", "aws-lc-rs"] {
        let x25519 = |r: &&Row| r.provider == provider && r.group == NamedGroup::X25519;
        let base = rows.iter().filter(x25519).find(|r| r.suite == SUITES[0]);
        for r in rows.iter().filter(x25519).filter(|r| r.suite != SUITES[0]) {
            let Some(base) = base else { continue };
            let cells: Vec<String> = r
                .figures()
                .iter()
                .zip(base.figures())
                .map(|(a, b)| format!("{:.2}", a / b))
                .collect();
            md.push_str(&format!(
                "| {} | {} | {} |\n",
                provider,
                suite_name(r.suite),
                cells.join(" | ")
            ));
        }
    }
    let aws = |g: NamedGroup| {
        rows.iter()
            .find(|r| r.provider == "aws-lc-rs" && r.suite == SUITES[0] && r.group == g)
    };
    if let (Some(hybrid), Some(classic)) =
        (aws(NamedGroup::X25519MLKEM768), aws(NamedGroup::X25519))
    {
        md.push_str("\n#### X25519MLKEM768 / X25519, aws-lc-rs, AES-128-GCM-SHA256\n\n");
        md.push_str("| full hs | full hs (server) | resumed hs | resumed hs (server) | 1 KiB records | 16 KiB records |\n");
        md.push_str("|---:|---:|---:|---:|---:|---:|\n");
        let cells: Vec<String> = hybrid
            .figures()
            .iter()
            .zip(classic.figures())
            .map(|(a, b)| format!("{:.2}", a / b))
            .collect();
        md.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    md
}

/// A rustls crypto provider on aws-lc-rs: TLS 1.3 suites, key exchange,
/// signatures, randomness. Assembled here because rustls's own is behind a
/// crate feature that cargo would switch on for weft's binaries too.
mod aws_lc {
    use std::fmt;
    use std::sync::Arc;

    use aws_lc_rs::hkdf::KeyType;
    use aws_lc_rs::rand::SecureRandom as _;
    use aws_lc_rs::signature::KeyPair as _;
    use aws_lc_rs::{aead, agreement, digest, hkdf, hmac, kem, signature};
    use rustls::crypto::cipher::{
        AeadKey, InboundOpaqueMessage, InboundPlainMessage, Iv, MessageDecrypter, MessageEncrypter,
        Nonce, OutboundOpaqueMessage, OutboundPlainMessage, PrefixedPayload, Tls13AeadAlgorithm,
        UnsupportedOperationError, make_tls13_aad,
    };
    use rustls::crypto::tls13::{Hkdf, HkdfExpander, OkmBlock, OutputLengthError};
    use rustls::crypto::{
        ActiveKeyExchange, CompletedKeyExchange, CryptoProvider, GetRandomFailed, KeyProvider,
        SecureRandom, SharedSecret, SupportedKxGroup, WebPkiSupportedAlgorithms, hash,
    };
    use rustls::pki_types::{
        AlgorithmIdentifier, InvalidSignature, PrivateKeyDer, SignatureVerificationAlgorithm,
        SubjectPublicKeyInfoDer, alg_id,
    };
    use rustls::sign::{Signer, SigningKey, public_key_to_spki};
    use rustls::{
        CipherSuite, CipherSuiteCommon, ConnectionTrafficSecrets, ContentType, Error, NamedGroup,
        PeerMisbehaved, ProtocolVersion, SignatureAlgorithm, SignatureScheme, SupportedCipherSuite,
        Tls13CipherSuite,
    };

    /// The provider with only `suite` enabled, key exchange groups in
    /// ring's order (X25519, P-256, P-384).
    pub fn provider(suite: CipherSuite) -> CryptoProvider {
        CryptoProvider {
            cipher_suites: [
                TLS13_AES_128_GCM_SHA256,
                TLS13_AES_256_GCM_SHA384,
                TLS13_CHACHA20_POLY1305_SHA256,
            ]
            .into_iter()
            .filter(|s| s.suite() == suite)
            .collect(),
            kx_groups: vec![X25519, SECP256R1, SECP384R1],
            signature_verification_algorithms: SIG_ALGS,
            secure_random: &AwsLc,
            key_provider: &AwsLc,
        }
    }

    // Randomness and private keys.

    #[derive(Debug)]
    struct AwsLc;

    impl SecureRandom for AwsLc {
        fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
            aws_lc_rs::rand::SystemRandom::new()
                .fill(buf)
                .map_err(|_| GetRandomFailed)
        }
    }

    impl KeyProvider for AwsLc {
        fn load_private_key(
            &self,
            der: PrivateKeyDer<'static>,
        ) -> Result<Arc<dyn SigningKey>, Error> {
            let schemes: [(SignatureScheme, &'static signature::EcdsaSigningAlgorithm); 2] = [
                (
                    SignatureScheme::ECDSA_NISTP256_SHA256,
                    &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                ),
                (
                    SignatureScheme::ECDSA_NISTP384_SHA384,
                    &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
                ),
            ];
            for (scheme, alg) in schemes {
                let pair = match &der {
                    PrivateKeyDer::Pkcs8(k) => {
                        signature::EcdsaKeyPair::from_pkcs8(alg, k.secret_pkcs8_der())
                    }
                    PrivateKeyDer::Sec1(k) => {
                        signature::EcdsaKeyPair::from_private_key_der(alg, k.secret_sec1_der())
                    }
                    _ => continue,
                };
                if let Ok(pair) = pair {
                    return Ok(Arc::new(EcdsaKey {
                        pair: Arc::new(pair),
                        scheme,
                    }));
                }
            }
            Err(Error::General("not an ECDSA P-256 or P-384 key".into()))
        }
    }

    struct EcdsaKey {
        pair: Arc<signature::EcdsaKeyPair>,
        scheme: SignatureScheme,
    }

    impl fmt::Debug for EcdsaKey {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("EcdsaKey")
                .field("scheme", &self.scheme)
                .finish()
        }
    }

    impl SigningKey for EcdsaKey {
        fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
            offered.contains(&self.scheme).then(|| {
                Box::new(EcdsaSigner {
                    pair: self.pair.clone(),
                    scheme: self.scheme,
                }) as Box<dyn Signer>
            })
        }

        fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
            let id = match self.scheme {
                SignatureScheme::ECDSA_NISTP256_SHA256 => alg_id::ECDSA_P256,
                _ => alg_id::ECDSA_P384,
            };
            Some(public_key_to_spki(&id, self.pair.public_key()))
        }

        fn algorithm(&self) -> SignatureAlgorithm {
            SignatureAlgorithm::ECDSA
        }
    }

    struct EcdsaSigner {
        pair: Arc<signature::EcdsaKeyPair>,
        scheme: SignatureScheme,
    }

    impl fmt::Debug for EcdsaSigner {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("EcdsaSigner")
                .field("scheme", &self.scheme)
                .finish()
        }
    }

    impl Signer for EcdsaSigner {
        fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error> {
            self.pair
                .sign(&aws_lc_rs::rand::SystemRandom::new(), message)
                .map(|sig| sig.as_ref().to_vec())
                .map_err(|_| Error::General("signing failed".into()))
        }

        fn scheme(&self) -> SignatureScheme {
            self.scheme
        }
    }

    // Signature checks (certificate chains and CertificateVerify), for the
    // same signature schemes ring's provider offers.

    struct Verify {
        public_key: AlgorithmIdentifier,
        signature: AlgorithmIdentifier,
        alg: &'static dyn signature::VerificationAlgorithm,
    }

    impl fmt::Debug for Verify {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("Verify").field("alg", &self.alg).finish()
        }
    }

    impl SignatureVerificationAlgorithm for Verify {
        fn verify_signature(
            &self,
            public_key: &[u8],
            message: &[u8],
            signature: &[u8],
        ) -> Result<(), InvalidSignature> {
            signature::UnparsedPublicKey::new(self.alg, public_key)
                .verify(message, signature)
                .map_err(|_| InvalidSignature)
        }

        fn public_key_alg_id(&self) -> AlgorithmIdentifier {
            self.public_key
        }

        fn signature_alg_id(&self) -> AlgorithmIdentifier {
            self.signature
        }
    }

    type Alg = &'static dyn SignatureVerificationAlgorithm;

    static P256_SHA256: Alg = &Verify {
        public_key: alg_id::ECDSA_P256,
        signature: alg_id::ECDSA_SHA256,
        alg: &signature::ECDSA_P256_SHA256_ASN1,
    };
    static P256_SHA384: Alg = &Verify {
        public_key: alg_id::ECDSA_P256,
        signature: alg_id::ECDSA_SHA384,
        alg: &signature::ECDSA_P256_SHA384_ASN1,
    };
    static P384_SHA256: Alg = &Verify {
        public_key: alg_id::ECDSA_P384,
        signature: alg_id::ECDSA_SHA256,
        alg: &signature::ECDSA_P384_SHA256_ASN1,
    };
    static P384_SHA384: Alg = &Verify {
        public_key: alg_id::ECDSA_P384,
        signature: alg_id::ECDSA_SHA384,
        alg: &signature::ECDSA_P384_SHA384_ASN1,
    };
    static ED25519: Alg = &Verify {
        public_key: alg_id::ED25519,
        signature: alg_id::ED25519,
        alg: &signature::ED25519,
    };
    static RSA_PSS_SHA256: Alg = &Verify {
        public_key: alg_id::RSA_ENCRYPTION,
        signature: alg_id::RSA_PSS_SHA256,
        alg: &signature::RSA_PSS_2048_8192_SHA256,
    };
    static RSA_PSS_SHA384: Alg = &Verify {
        public_key: alg_id::RSA_ENCRYPTION,
        signature: alg_id::RSA_PSS_SHA384,
        alg: &signature::RSA_PSS_2048_8192_SHA384,
    };
    static RSA_PSS_SHA512: Alg = &Verify {
        public_key: alg_id::RSA_ENCRYPTION,
        signature: alg_id::RSA_PSS_SHA512,
        alg: &signature::RSA_PSS_2048_8192_SHA512,
    };
    static RSA_PKCS1_SHA256: Alg = &Verify {
        public_key: alg_id::RSA_ENCRYPTION,
        signature: alg_id::RSA_PKCS1_SHA256,
        alg: &signature::RSA_PKCS1_2048_8192_SHA256,
    };
    static RSA_PKCS1_SHA384: Alg = &Verify {
        public_key: alg_id::RSA_ENCRYPTION,
        signature: alg_id::RSA_PKCS1_SHA384,
        alg: &signature::RSA_PKCS1_2048_8192_SHA384,
    };
    static RSA_PKCS1_SHA512: Alg = &Verify {
        public_key: alg_id::RSA_ENCRYPTION,
        signature: alg_id::RSA_PKCS1_SHA512,
        alg: &signature::RSA_PKCS1_2048_8192_SHA512,
    };

    static SIG_ALGS: WebPkiSupportedAlgorithms = WebPkiSupportedAlgorithms {
        all: &[
            P256_SHA256,
            P256_SHA384,
            P384_SHA256,
            P384_SHA384,
            ED25519,
            RSA_PSS_SHA256,
            RSA_PSS_SHA384,
            RSA_PSS_SHA512,
            RSA_PKCS1_SHA256,
            RSA_PKCS1_SHA384,
            RSA_PKCS1_SHA512,
        ],
        mapping: &[
            (
                SignatureScheme::ECDSA_NISTP384_SHA384,
                &[P384_SHA384, P256_SHA384],
            ),
            (
                SignatureScheme::ECDSA_NISTP256_SHA256,
                &[P256_SHA256, P384_SHA256],
            ),
            (SignatureScheme::ED25519, &[ED25519]),
            (SignatureScheme::RSA_PSS_SHA512, &[RSA_PSS_SHA512]),
            (SignatureScheme::RSA_PSS_SHA384, &[RSA_PSS_SHA384]),
            (SignatureScheme::RSA_PSS_SHA256, &[RSA_PSS_SHA256]),
            (SignatureScheme::RSA_PKCS1_SHA512, &[RSA_PKCS1_SHA512]),
            (SignatureScheme::RSA_PKCS1_SHA384, &[RSA_PKCS1_SHA384]),
            (SignatureScheme::RSA_PKCS1_SHA256, &[RSA_PKCS1_SHA256]),
        ],
    };

    // Key exchange.

    struct KxGroup {
        name: NamedGroup,
        alg: &'static agreement::Algorithm,
        valid: fn(&[u8]) -> bool,
    }

    impl fmt::Debug for KxGroup {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            self.name.fmt(f)
        }
    }

    static X25519: &dyn SupportedKxGroup = &KxGroup {
        name: NamedGroup::X25519,
        alg: &agreement::X25519,
        valid: |p| p.len() == 32,
    };
    static SECP256R1: &dyn SupportedKxGroup = &KxGroup {
        name: NamedGroup::secp256r1,
        alg: &agreement::ECDH_P256,
        valid: uncompressed_point,
    };
    static SECP384R1: &dyn SupportedKxGroup = &KxGroup {
        name: NamedGroup::secp384r1,
        alg: &agreement::ECDH_P384,
        valid: uncompressed_point,
    };

    fn uncompressed_point(p: &[u8]) -> bool {
        p.first() == Some(&0x04)
    }

    impl SupportedKxGroup for KxGroup {
        fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
            let rng = aws_lc_rs::rand::SystemRandom::new();
            let private = agreement::EphemeralPrivateKey::generate(self.alg, &rng)
                .map_err(|_| GetRandomFailed)?;
            let public = private.compute_public_key().map_err(|_| GetRandomFailed)?;
            Ok(Box::new(KeyExchange {
                name: self.name,
                alg: self.alg,
                private,
                public,
                valid: self.valid,
            }))
        }

        fn name(&self) -> NamedGroup {
            self.name
        }
    }

    struct KeyExchange {
        name: NamedGroup,
        alg: &'static agreement::Algorithm,
        private: agreement::EphemeralPrivateKey,
        public: agreement::PublicKey,
        valid: fn(&[u8]) -> bool,
    }

    impl ActiveKeyExchange for KeyExchange {
        fn complete(self: Box<Self>, peer: &[u8]) -> Result<SharedSecret, Error> {
            if !(self.valid)(peer) {
                return Err(PeerMisbehaved::InvalidKeyShare.into());
            }
            let peer = agreement::UnparsedPublicKey::new(self.alg, peer);
            agreement::agree_ephemeral(self.private, peer, (), |secret| {
                Ok(SharedSecret::from(secret))
            })
            .map_err(|()| PeerMisbehaved::InvalidKeyShare.into())
        }

        fn pub_key(&self) -> &[u8] {
            self.public.as_ref()
        }

        fn group(&self) -> NamedGroup {
            self.name
        }
    }

    /// X25519MLKEM768 (ML-KEM-768 and X25519, in that order on the wire):
    /// the group rustls's own aws-lc-rs provider offers first. Measured as
    /// an extra row, since ring has no ML-KEM.
    pub static X25519MLKEM768: &dyn SupportedKxGroup = &Hybrid;

    const MLKEM768_KEY: usize = 1184;
    const MLKEM768_CIPHERTEXT: usize = 1088;

    #[derive(Debug)]
    struct Hybrid;

    impl SupportedKxGroup for Hybrid {
        fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
            let classical = X25519.start()?;
            let decapsulation =
                kem::DecapsulationKey::generate(&kem::ML_KEM_768).map_err(|_| GetRandomFailed)?;
            let mut share = decapsulation
                .encapsulation_key()
                .and_then(|k| k.key_bytes())
                .map_err(|_| GetRandomFailed)?
                .as_ref()
                .to_vec();
            share.extend_from_slice(classical.pub_key());
            Ok(Box::new(ActiveHybrid {
                classical,
                decapsulation,
                share,
            }))
        }

        fn start_and_complete(&self, client: &[u8]) -> Result<CompletedKeyExchange, Error> {
            if client.len() != MLKEM768_KEY + 32 {
                return Err(PeerMisbehaved::InvalidKeyShare.into());
            }
            let (post_quantum, classical) = client.split_at(MLKEM768_KEY);
            let classical = X25519.start_and_complete(classical)?;
            let invalid = |_| Error::from(PeerMisbehaved::InvalidKeyShare);
            let (ciphertext, secret) = kem::EncapsulationKey::new(&kem::ML_KEM_768, post_quantum)
                .map_err(invalid)?
                .encapsulate()
                .map_err(|_| Error::from(PeerMisbehaved::InvalidKeyShare))?;
            let mut pub_key = ciphertext.as_ref().to_vec();
            pub_key.extend_from_slice(&classical.pub_key);
            let mut both = secret.as_ref().to_vec();
            both.extend_from_slice(classical.secret.secret_bytes());
            Ok(CompletedKeyExchange {
                group: NamedGroup::X25519MLKEM768,
                pub_key,
                secret: SharedSecret::from(&both[..]),
            })
        }

        fn name(&self) -> NamedGroup {
            NamedGroup::X25519MLKEM768
        }

        fn usable_for_version(&self, version: ProtocolVersion) -> bool {
            version == ProtocolVersion::TLSv1_3
        }
    }

    struct ActiveHybrid {
        classical: Box<dyn ActiveKeyExchange>,
        decapsulation: kem::DecapsulationKey,
        share: Vec<u8>,
    }

    impl ActiveKeyExchange for ActiveHybrid {
        fn complete(self: Box<Self>, peer: &[u8]) -> Result<SharedSecret, Error> {
            if peer.len() != MLKEM768_CIPHERTEXT + 32 {
                return Err(PeerMisbehaved::InvalidKeyShare.into());
            }
            let (ciphertext, classical) = peer.split_at(MLKEM768_CIPHERTEXT);
            let secret = self
                .decapsulation
                .decapsulate(ciphertext.into())
                .map_err(|_| Error::from(PeerMisbehaved::InvalidKeyShare))?;
            let classical = self.classical.complete(classical)?;
            let mut both = secret.as_ref().to_vec();
            both.extend_from_slice(classical.secret_bytes());
            Ok(SharedSecret::from(&both[..]))
        }

        fn pub_key(&self) -> &[u8] {
            &self.share
        }

        fn group(&self) -> NamedGroup {
            NamedGroup::X25519MLKEM768
        }
    }

    // Hashes (the handshake transcript).

    struct Hash(&'static digest::Algorithm, hash::HashAlgorithm);

    static SHA256: Hash = Hash(&digest::SHA256, hash::HashAlgorithm::SHA256);
    static SHA384: Hash = Hash(&digest::SHA384, hash::HashAlgorithm::SHA384);

    impl hash::Hash for Hash {
        fn start(&self) -> Box<dyn hash::Context> {
            Box::new(HashContext(digest::Context::new(self.0)))
        }

        fn hash(&self, bytes: &[u8]) -> hash::Output {
            hash::Output::new(digest::digest(self.0, bytes).as_ref())
        }

        fn output_len(&self) -> usize {
            self.0.output_len()
        }

        fn algorithm(&self) -> hash::HashAlgorithm {
            self.1
        }
    }

    struct HashContext(digest::Context);

    impl hash::Context for HashContext {
        fn fork_finish(&self) -> hash::Output {
            hash::Output::new(self.0.clone().finish().as_ref())
        }

        fn fork(&self) -> Box<dyn hash::Context> {
            Box::new(HashContext(self.0.clone()))
        }

        fn finish(self: Box<Self>) -> hash::Output {
            hash::Output::new(self.0.finish().as_ref())
        }

        fn update(&mut self, data: &[u8]) {
            self.0.update(data);
        }
    }

    // The key schedule.

    struct AwsLcHkdf(hkdf::Algorithm, hmac::Algorithm);

    impl AwsLcHkdf {
        fn expander(&self, salt: Option<&[u8]>, secret: Option<&[u8]>) -> Box<dyn HkdfExpander> {
            let zeroes = [0u8; OkmBlock::MAX_LEN];
            let zeroes = &zeroes[..self.0.len()];
            Box::new(Expander {
                alg: self.0,
                prk: hkdf::Salt::new(self.0, salt.unwrap_or(zeroes))
                    .extract(secret.unwrap_or(zeroes)),
            })
        }
    }

    impl Hkdf for AwsLcHkdf {
        fn extract_from_zero_ikm(&self, salt: Option<&[u8]>) -> Box<dyn HkdfExpander> {
            self.expander(salt, None)
        }

        fn extract_from_secret(&self, salt: Option<&[u8]>, secret: &[u8]) -> Box<dyn HkdfExpander> {
            self.expander(salt, Some(secret))
        }

        fn expander_for_okm(&self, okm: &OkmBlock) -> Box<dyn HkdfExpander> {
            Box::new(Expander {
                alg: self.0,
                prk: hkdf::Prk::new_less_safe(self.0, okm.as_ref()),
            })
        }

        fn hmac_sign(&self, key: &OkmBlock, message: &[u8]) -> rustls::crypto::hmac::Tag {
            let tag = hmac::sign(&hmac::Key::new(self.1, key.as_ref()), message);
            rustls::crypto::hmac::Tag::new(tag.as_ref())
        }
    }

    struct Expander {
        alg: hkdf::Algorithm,
        prk: hkdf::Prk,
    }

    struct Len(usize);

    impl KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }

    impl HkdfExpander for Expander {
        fn expand_slice(&self, info: &[&[u8]], output: &mut [u8]) -> Result<(), OutputLengthError> {
            self.prk
                .expand(info, Len(output.len()))
                .and_then(|okm| okm.fill(output))
                .map_err(|_| OutputLengthError)
        }

        fn expand_block(&self, info: &[&[u8]]) -> OkmBlock {
            let mut block = [0u8; OkmBlock::MAX_LEN];
            let out = &mut block[..self.alg.len()];
            self.prk
                .expand(info, Len(out.len()))
                .and_then(|okm| okm.fill(out))
                .expect("HKDF output of the hash's length");
            OkmBlock::new(out)
        }

        fn hash_len(&self) -> usize {
            self.alg.len()
        }
    }

    // The suites and their record protection.

    static TLS13_AES_128_GCM_SHA256: SupportedCipherSuite =
        SupportedCipherSuite::Tls13(&Tls13CipherSuite {
            common: CipherSuiteCommon {
                suite: CipherSuite::TLS13_AES_128_GCM_SHA256,
                hash_provider: &SHA256,
                confidentiality_limit: 1 << 24,
            },
            hkdf_provider: &AwsLcHkdf(hkdf::HKDF_SHA256, hmac::HMAC_SHA256),
            aead_alg: &Aead::Gcm(&aead::AES_128_GCM),
            quic: None,
        });

    static TLS13_AES_256_GCM_SHA384: SupportedCipherSuite =
        SupportedCipherSuite::Tls13(&Tls13CipherSuite {
            common: CipherSuiteCommon {
                suite: CipherSuite::TLS13_AES_256_GCM_SHA384,
                hash_provider: &SHA384,
                confidentiality_limit: 1 << 24,
            },
            hkdf_provider: &AwsLcHkdf(hkdf::HKDF_SHA384, hmac::HMAC_SHA384),
            aead_alg: &Aead::Gcm(&aead::AES_256_GCM),
            quic: None,
        });

    static TLS13_CHACHA20_POLY1305_SHA256: SupportedCipherSuite =
        SupportedCipherSuite::Tls13(&Tls13CipherSuite {
            common: CipherSuiteCommon {
                suite: CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
                hash_provider: &SHA256,
                confidentiality_limit: u64::MAX,
            },
            hkdf_provider: &AwsLcHkdf(hkdf::HKDF_SHA256, hmac::HMAC_SHA256),
            aead_alg: &Aead::Chacha,
            quic: None,
        });

    /// AES-GCM through aws-lc's TLS 1.3 record keys, ChaCha20-Poly1305
    /// through its general AEAD key, as rustls's provider does.
    enum Aead {
        Gcm(&'static aead::Algorithm),
        Chacha,
    }

    impl Aead {
        fn alg(&self) -> &'static aead::Algorithm {
            match self {
                Aead::Gcm(alg) => alg,
                Aead::Chacha => &aead::CHACHA20_POLY1305,
            }
        }
    }

    impl Tls13AeadAlgorithm for Aead {
        fn encrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageEncrypter> {
            let key = key.as_ref();
            let key = match self {
                Aead::Gcm(alg) => SealKey::Tls(
                    aead::TlsRecordSealingKey::new(alg, aead::TlsProtocolId::TLS13, key)
                        .expect("AES-GCM key of the suite's length"),
                ),
                Aead::Chacha => SealKey::Aead(aead::LessSafeKey::new(
                    aead::UnboundKey::new(&aead::CHACHA20_POLY1305, key)
                        .expect("ChaCha20 key of the suite's length"),
                )),
            };
            Box::new(Encrypter { key, iv })
        }

        fn decrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageDecrypter> {
            let key = key.as_ref();
            let key = match self {
                Aead::Gcm(alg) => OpenKey::Tls(
                    aead::TlsRecordOpeningKey::new(alg, aead::TlsProtocolId::TLS13, key)
                        .expect("AES-GCM key of the suite's length"),
                ),
                Aead::Chacha => OpenKey::Aead(aead::LessSafeKey::new(
                    aead::UnboundKey::new(&aead::CHACHA20_POLY1305, key)
                        .expect("ChaCha20 key of the suite's length"),
                )),
            };
            Box::new(Decrypter {
                key,
                iv,
                tag_len: self.alg().tag_len(),
            })
        }

        fn key_len(&self) -> usize {
            self.alg().key_len()
        }

        fn extract_keys(
            &self,
            key: AeadKey,
            iv: Iv,
        ) -> Result<ConnectionTrafficSecrets, UnsupportedOperationError> {
            Ok(match self {
                Aead::Chacha => ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv },
                Aead::Gcm(alg) if alg.key_len() == 16 => {
                    ConnectionTrafficSecrets::Aes128Gcm { key, iv }
                }
                Aead::Gcm(_) => ConnectionTrafficSecrets::Aes256Gcm { key, iv },
            })
        }
    }

    enum SealKey {
        Tls(aead::TlsRecordSealingKey),
        Aead(aead::LessSafeKey),
    }

    enum OpenKey {
        Tls(aead::TlsRecordOpeningKey),
        Aead(aead::LessSafeKey),
    }

    struct Encrypter {
        key: SealKey,
        iv: Iv,
    }

    impl MessageEncrypter for Encrypter {
        fn encrypt(
            &mut self,
            msg: OutboundPlainMessage<'_>,
            seq: u64,
        ) -> Result<OutboundOpaqueMessage, Error> {
            let total = self.encrypted_payload_len(msg.payload.len());
            let mut payload = PrefixedPayload::with_capacity(total);
            let nonce = aead::Nonce::assume_unique_for_key(Nonce::new(&self.iv, seq).0);
            let aad = aead::Aad::from(make_tls13_aad(total));
            payload.extend_from_chunks(&msg.payload);
            payload.extend_from_slice(&msg.typ.to_array());
            match &mut self.key {
                SealKey::Tls(k) => k.seal_in_place_append_tag(nonce, aad, &mut payload),
                SealKey::Aead(k) => k.seal_in_place_append_tag(nonce, aad, &mut payload),
            }
            .map_err(|_| Error::EncryptError)?;
            Ok(OutboundOpaqueMessage::new(
                ContentType::ApplicationData,
                ProtocolVersion::TLSv1_2,
                payload,
            ))
        }

        fn encrypted_payload_len(&self, payload_len: usize) -> usize {
            let tag = match &self.key {
                SealKey::Tls(k) => k.algorithm().tag_len(),
                SealKey::Aead(k) => k.algorithm().tag_len(),
            };
            payload_len + 1 + tag
        }
    }

    struct Decrypter {
        key: OpenKey,
        iv: Iv,
        tag_len: usize,
    }

    impl MessageDecrypter for Decrypter {
        fn decrypt<'a>(
            &mut self,
            mut msg: InboundOpaqueMessage<'a>,
            seq: u64,
        ) -> Result<InboundPlainMessage<'a>, Error> {
            let payload = &mut msg.payload;
            if payload.len() < self.tag_len {
                return Err(Error::DecryptError);
            }
            let nonce = aead::Nonce::assume_unique_for_key(Nonce::new(&self.iv, seq).0);
            let aad = aead::Aad::from(make_tls13_aad(payload.len()));
            let plain = match &self.key {
                OpenKey::Tls(k) => k.open_in_place(nonce, aad, payload),
                OpenKey::Aead(k) => k.open_in_place(nonce, aad, payload),
            }
            .map_err(|_| Error::DecryptError)?
            .len();
            payload.truncate(plain);
            msg.into_tls13_unpadded_message()
        }
    }
}
