//! `weft-proxy init` in real network namespaces, with real iptables, for
//! both backends. Needs root, `ip` (iproute2), `setpriv` (util-linux) and
//! iptables with both `iptables-nft` and `iptables-legacy`; CI runs it as
//! root (`.ci/run`). Without them it fails and says how to install them.
//!
//! ```text
//!  netns "pod" (weft-proxy init applied)             netns "peer"
//!  listeners :15001 :15006 :15020 :8080  ── veth ──  listener :7777, :5555
//!     10.77.x.1, fd77:x::1                              10.77.x.2, fd77:x::2, fd77:x::3
//! ```
//! Every listener is bound like the proxy binds its own (one dual-stack
//! socket, `net::bind_listener`) and answers with its name and the
//! connection's original destination (`SO_ORIGINAL_DST`, or
//! `IP6T_SO_ORIGINAL_DST` for IPv6), so each client shows where the rules
//! sent it, over IPv4 and IPv6.

use std::fs::File;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::io::AsyncWriteExt;
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
        "ip6tables-nft",
        "ip6tables-legacy",
        "ip6tables-nft-restore",
        "ip6tables-legacy-restore",
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
    pod_ip6: String,
    peer_ip6: String,
    /// A second peer address, excluded from capture by CIDR in the scenarios.
    peer_ip6_excluded: String,
}

impl Namespaces {
    fn new(tag: &str, subnet: u8) -> Self {
        let id = std::process::id();
        let ns = Namespaces {
            pod: format!("weft-pod-{tag}-{id}"),
            peer: format!("weft-peer-{tag}-{id}"),
            pod_ip: format!("10.77.{subnet}.1"),
            peer_ip: format!("10.77.{subnet}.2"),
            pod_ip6: format!("fd77:{subnet}::1"),
            peer_ip6: format!("fd77:{subnet}::2"),
            peer_ip6_excluded: format!("fd77:{subnet}::3"),
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
        // IPv6 without duplicate address detection, so addresses are usable at once.
        for (n, dev, ip) in [
            (&ns.pod, &a, &ns.pod_ip6),
            (&ns.peer, &b, &ns.peer_ip6),
            (&ns.peer, &b, &ns.peer_ip6_excluded),
        ] {
            sh(&[
                "ip",
                "-n",
                n,
                "-6",
                "addr",
                "add",
                &format!("{ip}/64"),
                "dev",
                dev,
                "nodad",
            ]);
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
                    let l = match weft_proxy::net::bind_listener(addr) {
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

fn saved_rules(ns: &str, save_bin: &str) -> String {
    String::from_utf8_lossy(&sh(&["ip", "netns", "exec", ns, save_bin, "-t", "nat"]).stdout)
        .into_owned()
}

fn scenario(tag: &str, subnet: u8, backend: &str, preexisting_rule: bool) {
    require_prerequisites();
    let ns = Namespaces::new(tag, subnet);
    let (v4_bin, v6_bin) = (
        format!("iptables-{backend}"),
        format!("ip6tables-{backend}"),
    );
    if preexisting_rule {
        // The "host" already uses this backend: detection must pick it.
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns.pod,
            &v4_bin,
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-j",
            "RETURN",
        ]);
    }
    let excluded = format!("{}/128", ns.peer_ip6_excluded);
    let extra = ["--exclude-outbound-cidrs", excluded.as_str()];
    let printed = init_in(&ns.pod, &extra);
    assert!(
        printed.contains(&format!("({v4_bin})")) && printed.contains(&format!("({v6_bin})")),
        "detected backend, both families: {printed}"
    );
    assert!(printed.contains("REDIRECT --to-ports 15001"), "{printed}");
    assert!(printed.contains("-d ::1/128 -j RETURN"), "{printed}");
    // Idempotent: a second run leaves exactly one copy of each rule.
    init_in(&ns.pod, &extra);
    for save_bin in [format!("{v4_bin}-save"), format!("{v6_bin}-save")] {
        let saved = saved_rules(&ns.pod, &save_bin);
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
                "{save_bin}: {needle} once in:\n{saved}"
            );
        }
    }
    // The IPv6 CIDR went to ip6tables only.
    assert!(saved_rules(&ns.pod, &format!("{v6_bin}-save")).contains(&ns.peer_ip6_excluded));
    assert!(!saved_rules(&ns.pod, &format!("{v4_bin}-save")).contains("fd77"));

    // Bound as the proxy binds: 0.0.0.0 becomes one dual-stack socket.
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

    for (pod_ip, peer_ip, dst) in [
        (&ns.pod_ip, &ns.peer_ip, format!("{}:7777", ns.peer_ip)),
        (&ns.pod_ip6, &ns.peer_ip6, format!("[{}]:7777", ns.peer_ip6)),
    ] {
        // The app's outbound connection is captured with its original destination.
        let got = ns.client(&ns.pod, None, peer_ip, 7777);
        assert_eq!(got, format!("outbound {dst}"));
        // The proxy's own traffic (uid 1337) is not.
        let got = ns.client(&ns.pod, Some(1337), peer_ip, 7777);
        assert!(
            got.starts_with("peer "),
            "uid 1337 must bypass capture ({peer_ip}), got {got:?}"
        );
        // Nor an excluded outbound port.
        let got = ns.client(&ns.pod, None, peer_ip, 5555);
        assert!(
            got.starts_with("peer "),
            "excluded port must bypass capture ({peer_ip}), got {got:?}"
        );
        // Inbound from the peer is captured, with the app port as original destination.
        let got = ns.client(&ns.peer, None, pod_ip, 8080);
        let want = if pod_ip.contains(':') {
            format!("inbound [{pod_ip}]:8080")
        } else {
            format!("inbound {pod_ip}:8080")
        };
        assert_eq!(got, want);
        // The admin port is never captured.
        let got = ns.client(&ns.peer, None, pod_ip, 15020);
        assert!(
            got.starts_with("admin "),
            "admin port must bypass capture ({pod_ip}), got {got:?}"
        );
    }
    // An excluded IPv6 CIDR is not captured.
    let got = ns.client(&ns.pod, None, &ns.peer_ip6_excluded, 7777);
    assert!(
        got.starts_with("peer "),
        "excluded IPv6 CIDR must bypass capture, got {got:?}"
    );
    // IPv6 loopback is not captured.
    let got = ns.client(&ns.pod, None, "::1", 8080);
    assert!(
        got.starts_with("app "),
        "::1 must bypass capture, got {got:?}"
    );
}

#[test]
fn init_captures_real_connections_with_iptables_nft() {
    scenario("nft", 81, "nft", false);
}

#[test]
fn init_captures_real_connections_with_iptables_legacy() {
    scenario("legacy", 82, "legacy", true);
}

#[test]
fn dry_run_prints_and_installs_nothing() {
    require_prerequisites();
    let ns = Namespaces::new("dry", 83);
    let printed = init_in(&ns.pod, &["--dry-run"]);
    assert!(
        printed.contains("dry run")
            && printed.contains("-A OUTPUT -p tcp -j WEFT_OUTPUT")
            && printed.contains("# (ip6tables-nft)")
            && printed.contains("-d ::1/128 -j RETURN"),
        "{printed}"
    );
    for save in ["iptables-nft-save", "ip6tables-nft-save"] {
        let saved = saved_rules(&ns.pod, save);
        assert!(!saved.contains("WEFT_"), "{save}: {saved}");
    }
}

#[test]
fn ipv6_capture_follows_the_namespace_and_the_flag() {
    require_prerequisites();
    let ns = Namespaces::new("v6off", 84);
    // `--ipv6 off` installs IPv4 only, and says IPv6 is not captured.
    let printed = init_in(&ns.pod, &["--ipv6", "off"]);
    assert!(
        printed.contains("IPv6 traffic is NOT captured"),
        "{printed}"
    );
    assert!(saved_rules(&ns.pod, "iptables-nft-save").contains("WEFT_OUTPUT"));
    assert!(!saved_rules(&ns.pod, "ip6tables-nft-save").contains("WEFT_"));

    // A namespace whose interfaces have IPv6 disabled: auto skips it with a
    // note, `on` fails and says why.
    let no6 = Namespaces::new("no6", 85);
    for key in ["all", "default", "lo"] {
        sh(&[
            "ip",
            "netns",
            "exec",
            &no6.pod,
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{key}.disable_ipv6=1"),
        ]);
    }
    sh(&["ip", "-n", &no6.pod, "-6", "addr", "flush", "dev", "wp85a"]);
    let printed = init_in(&no6.pod, &[]);
    assert!(
        printed.contains("# IPv6: skipped: this network namespace has no IPv6"),
        "{printed}"
    );
    assert!(!saved_rules(&no6.pod, "ip6tables-nft-save").contains("WEFT_"));
    let bin = env!("CARGO_BIN_EXE_weft-proxy");
    let out = Command::new("ip")
        .args(["netns", "exec", &no6.pod, bin, "init", "--ipv6", "on"])
        .output()
        .expect("spawn init");
    assert!(!out.status.success(), "--ipv6 on must fail without IPv6");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has no IPv6"), "{err}");
}
