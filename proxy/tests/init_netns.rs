//! `weft-proxy init` in real network namespaces, with real iptables, for
//! both backends. Needs root, `ip` (iproute2), `setpriv` (util-linux) and
//! iptables with both `iptables-nft` and `iptables-legacy`; CI runs it as
//! root (`.ci/run`). Without them it fails and says how to install them.
//!
//! ```text
//!  netns "pod" (weft-proxy init applied)             netns "peer"
//!  listeners :15001 :15006 :15020 :8080  ── veth ──  listener 10.77.x.2:7777, :5555
//!     10.77.x.1                                         10.77.x.2
//! ```
//! Every listener answers with its name and the connection's original
//! destination (`SO_ORIGINAL_DST`), so each client shows where the rules
//! sent it.

use std::fs::File;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use weft_proxy::net::OrigDst;
use weft_proxy::net::orig_dst::SoOriginalDst;

fn require_prerequisites() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the init tests need root (network namespaces, iptables); run them as root, as CI does (.ci/run)"
    );
    for bin in [
        "ip",
        "setpriv",
        "iptables-nft",
        "iptables-legacy",
        "iptables-nft-restore",
        "iptables-legacy-restore",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{bin} is missing; install it with: apt-get install -y iproute2 util-linux iptables"
        );
    }
}

fn sh(args: &[&str]) -> std::process::Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Two namespaces joined by a veth pair; removed on drop.
struct Namespaces {
    pod: String,
    peer: String,
    pod_ip: String,
    peer_ip: String,
}

impl Namespaces {
    fn new(tag: &str, subnet: u8) -> Self {
        let id = std::process::id();
        let ns = Namespaces {
            pod: format!("weft-pod-{tag}-{id}"),
            peer: format!("weft-peer-{tag}-{id}"),
            pod_ip: format!("10.77.{subnet}.1"),
            peer_ip: format!("10.77.{subnet}.2"),
        };
        sh(&["ip", "netns", "add", &ns.pod]);
        sh(&["ip", "netns", "add", &ns.peer]);
        let (a, b) = (format!("wp{subnet}a"), format!("wp{subnet}b"));
        sh(&[
            "ip", "-n", &ns.pod, "link", "add", &a, "type", "veth", "peer", "name", &b, "netns",
            &ns.peer,
        ]);
        for (n, dev, ip) in [(&ns.pod, &a, &ns.pod_ip), (&ns.peer, &b, &ns.peer_ip)] {
            sh(&[
                "ip",
                "-n",
                n,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                dev,
            ]);
            sh(&["ip", "-n", n, "link", "set", dev, "up"]);
            sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        ns
    }

    /// Runs `bash -c script` in `ns`, optionally as another uid; returns stdout.
    fn client(&self, ns: &str, uid: Option<u32>, ip: &str, port: u16) -> String {
        let script = format!("exec 3<>/dev/tcp/{ip}/{port} && cat <&3");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, "timeout", "10"]);
        if let Some(u) = uid {
            cmd.args([
                "setpriv",
                &format!("--reuid={u}"),
                &format!("--regid={u}"),
                "--clear-groups",
            ]);
        }
        cmd.args(["bash", "-c", &script]);
        let out = cmd.output().expect("spawn client");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.pod])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.peer])
            .status();
    }
}

/// Runs named listeners inside `ns` on a thread that entered it; stops on drop.
struct Listeners {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Listeners {
    fn start(ns: &str, binds: Vec<(&'static str, SocketAddr)>) -> Self {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let path = format!("/var/run/netns/{ns}");
        let thread = std::thread::spawn(move || {
            let entered = File::open(&path).map_err(|e| e.to_string()).and_then(|f| {
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| e.to_string())
            });
            if let Err(e) = entered {
                let _ = ready_tx.send(Err(e));
                return;
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for (name, addr) in binds {
                    let l = match TcpListener::bind(addr).await {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("bind {addr}: {e}")));
                            return;
                        }
                    };
                    tasks.push(tokio::spawn(async move {
                        while let Ok((mut s, _)) = l.accept().await {
                            let dst = SoOriginalDst
                                .original_dst(&s)
                                .map_or_else(|e| format!("no-orig-dst({e})"), |d| d.to_string());
                            let _ = s.write_all(format!("{name} {dst}\n").as_bytes()).await;
                        }
                    }));
                }
                let _ = ready_tx.send(Ok(()));
                let _ = stop_rx.await;
                for t in tasks {
                    t.abort();
                }
            });
        });
        ready_rx
            .recv()
            .expect("listener thread")
            .expect("listeners in namespace");
        Listeners {
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn init_in(ns: &str, extra: &[&str]) -> String {
    let bin = env!("CARGO_BIN_EXE_weft-proxy");
    let mut args = vec![
        "netns",
        "exec",
        ns,
        bin,
        "init",
        "--exclude-outbound-ports",
        "5555",
    ];
    args.extend(extra);
    let out = Command::new("ip").args(&args).output().expect("spawn init");
    assert!(
        out.status.success(),
        "weft-proxy init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn scenario(tag: &str, subnet: u8, backend_bin: &str, save_bin: &str, preexisting_rule: bool) {
    require_prerequisites();
    let ns = Namespaces::new(tag, subnet);
    if preexisting_rule {
        // The "host" already uses this backend: detection must pick it.
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns.pod,
            backend_bin,
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-j",
            "RETURN",
        ]);
    }
    let printed = init_in(&ns.pod, &[]);
    assert!(
        printed.contains(&format!("({backend_bin})")),
        "detected backend: {printed}"
    );
    assert!(printed.contains("REDIRECT --to-ports 15001"), "{printed}");
    // Idempotent: a second run leaves exactly one copy of each rule.
    init_in(&ns.pod, &[]);
    let saved = String::from_utf8_lossy(
        &sh(&["ip", "netns", "exec", &ns.pod, save_bin, "-t", "nat"]).stdout,
    )
    .into_owned();
    for needle in [
        "-j WEFT_OUTPUT",
        "-j WEFT_INBOUND",
        "--to-ports 15001",
        "--to-ports 15006",
        "--uid-owner 1337",
    ] {
        assert_eq!(
            saved.matches(needle).count(),
            1,
            "{needle} once in:\n{saved}"
        );
    }

    let any = |p: u16| SocketAddr::from(([0, 0, 0, 0], p));
    let _pod = Listeners::start(
        &ns.pod,
        vec![
            ("outbound", any(15001)),
            ("inbound", any(15006)),
            ("admin", any(15020)),
            ("app", any(8080)),
        ],
    );
    let _peer = Listeners::start(&ns.peer, vec![("peer", any(7777)), ("peer", any(5555))]);

    // The app's outbound connection is captured with its original destination.
    let got = ns.client(&ns.pod, None, &ns.peer_ip, 7777);
    assert_eq!(got, format!("outbound {}:7777", ns.peer_ip));
    // The proxy's own traffic (uid 1337) is not.
    let got = ns.client(&ns.pod, Some(1337), &ns.peer_ip, 7777);
    assert!(
        got.starts_with("peer "),
        "uid 1337 must bypass capture, got {got:?}"
    );
    // Nor an excluded outbound port.
    let got = ns.client(&ns.pod, None, &ns.peer_ip, 5555);
    assert!(
        got.starts_with("peer "),
        "excluded port must bypass capture, got {got:?}"
    );
    // Inbound from the peer is captured, with the app port as original destination.
    let got = ns.client(&ns.peer, None, &ns.pod_ip, 8080);
    assert_eq!(got, format!("inbound {}:8080", ns.pod_ip));
    // The admin port is never captured.
    let got = ns.client(&ns.peer, None, &ns.pod_ip, 15020);
    assert!(
        got.starts_with("admin "),
        "admin port must bypass capture, got {got:?}"
    );
}

#[test]
fn init_captures_real_connections_with_iptables_nft() {
    scenario("nft", 81, "iptables-nft", "iptables-nft-save", false);
}

#[test]
fn init_captures_real_connections_with_iptables_legacy() {
    scenario(
        "legacy",
        82,
        "iptables-legacy",
        "iptables-legacy-save",
        true,
    );
}

#[test]
fn dry_run_prints_and_installs_nothing() {
    require_prerequisites();
    let ns = Namespaces::new("dry", 83);
    let printed = init_in(&ns.pod, &["--dry-run"]);
    assert!(
        printed.contains("dry run") && printed.contains("-A OUTPUT -p tcp -j WEFT_OUTPUT"),
        "{printed}"
    );
    let saved = String::from_utf8_lossy(
        &sh(&[
            "ip",
            "netns",
            "exec",
            &ns.pod,
            "iptables-nft-save",
            "-t",
            "nat",
        ])
        .stdout,
    )
    .into_owned();
    assert!(!saved.contains("WEFT_"), "{saved}");
}
