//! The `weft-injector` binary: flags, JSON logs, serving, and a clean exit
//! on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::https::{AtomicDir, Conn, TestPki, client_config};

/// Kills the child if the test fails before it exits.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn binary_serves_and_exits_cleanly_on_sigterm() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pki = TestPki::new("weft binary test CA");
    let mut dir = AtomicDir::new();
    let (cert, key) = pki.leaf("injector");
    dir.publish(&[("tls.crt", cert.as_bytes()), ("tls.key", key.as_bytes())]);

    let child = Command::new(env!("CARGO_BIN_EXE_weft-injector"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--watch-mesh",
            "false",
            "--shutdown-delay-seconds",
            "0",
        ])
        .arg("--tls-dir")
        .arg(dir.path())
        .env_remove("WEFT_INJECTOR_LISTEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn weft-injector");
    let mut guard = Guard(child);
    let stdout = guard.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    // Every log line is JSON; the "serving" line carries the bound address.
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a log line");
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        if v["fields"]["message"] == "weft-injector serving" {
            break v["fields"]["addr"]
                .as_str()
                .expect("addr")
                .parse()
                .expect("socket addr");
        }
    };
    let mut conn = Conn::open(addr, client_config(&pki.ca))
        .await
        .expect("connect");
    let (status, body) = conn
        .request("GET", "/healthz", vec![])
        .await
        .expect("healthz");
    assert_eq!((status.as_u16(), &body[..]), (200, &b"ok\n"[..]));
    drop(conn);

    let pid = guard.0.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || guard.0.wait().expect("wait"))
        .await
        .expect("join");
    assert!(status.success(), "weft-injector exited with {status}");
}
