//! Probes: HTTP GET, TCP socket and exec, with kubelet's thresholds.
//!
//! HTTP and TCP probes are sent from the node's network namespace (through
//! the harness's [`crate::netns::NetnsRuntime`]) to the pod IP, as kubelet
//! does; exec probes run the command in the pod's network namespace.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::netns::NetnsRuntime;

/// Where and how a probe runs.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    /// The pod IP.
    pub ip: IpAddr,
    /// The node namespace's runtime (HTTP/TCP probes).
    pub node: Arc<NetnsRuntime>,
    /// The pod's namespace name (exec probes).
    pub netns: String,
}

/// A probe with its counters.
#[derive(Debug)]
pub struct ProbeState {
    probe: Probe,
    successes: i32,
    failures: i32,
    next: tokio::time::Instant,
}

/// What a probe run concluded, after thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Passed `successThreshold` times in a row.
    Success,
    /// Failed `failureThreshold` times in a row.
    Failure,
    /// Not decided yet (or not due).
    Pending,
}

impl ProbeState {
    /// A probe starting its initial delay now.
    pub fn new(probe: Probe) -> Self {
        let delay = Duration::from_secs(probe.initial_delay_seconds.unwrap_or(0).max(0) as u64);
        Self {
            probe,
            successes: 0,
            failures: 0,
            next: tokio::time::Instant::now() + delay,
        }
    }

    /// Runs the probe if it is due; returns the verdict after thresholds.
    pub async fn tick(&mut self, c: &Container, target: &ProbeTarget) -> Verdict {
        if tokio::time::Instant::now() < self.next {
            return Verdict::Pending;
        }
        let period = Duration::from_secs(self.probe.period_seconds.unwrap_or(10).max(1) as u64);
        self.next = tokio::time::Instant::now() + period;
        let timeout = Duration::from_secs(self.probe.timeout_seconds.unwrap_or(1).max(1) as u64);
        let ok = tokio::time::timeout(timeout, run_once(&self.probe, c, target))
            .await
            .unwrap_or(false);
        if ok {
            self.failures = 0;
            self.successes += 1;
            if self.successes >= self.probe.success_threshold.unwrap_or(1) {
                return Verdict::Success;
            }
        } else {
            self.successes = 0;
            self.failures += 1;
            if self.failures >= self.probe.failure_threshold.unwrap_or(3) {
                return Verdict::Failure;
            }
        }
        Verdict::Pending
    }
}

fn port_of(port: &IntOrString, c: &Container) -> Option<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

async fn run_once(probe: &Probe, c: &Container, target: &ProbeTarget) -> bool {
    if let Some(h) = &probe.http_get {
        let Some(port) = port_of(&h.port, c) else {
            return false;
        };
        if h.scheme.as_deref() == Some("HTTPS") {
            // No TLS client here: an open port counts, as a TCP probe would.
            return tcp(target, port).await;
        }
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        let addr = SocketAddr::new(target.ip, port);
        let fut = async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.33\r\nConnection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.ok()?;
            let mut buf = vec![0u8; 64];
            let n = s.read(&mut buf).await.ok()?;
            let line = String::from_utf8_lossy(&buf[..n]).into_owned();
            let code: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some((200..400).contains(&code))
        };
        return target.node.spawn(fut).await.ok().flatten().unwrap_or(false);
    }
    if let Some(t) = &probe.tcp_socket {
        return match port_of(&t.port, c) {
            Some(port) => tcp(target, port).await,
            None => false,
        };
    }
    if let Some(e) = &probe.exec {
        let cmd = e.command.clone().unwrap_or_default();
        if cmd.is_empty() {
            return false;
        }
        return tokio::process::Command::new("ip")
            .args(["netns", "exec", &target.netns])
            .args(&cmd)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .status()
            .await
            .is_ok_and(|s| s.success());
    }
    false
}

async fn tcp(target: &ProbeTarget, port: u16) -> bool {
    let addr = SocketAddr::new(target.ip, port);
    target
        .node
        .spawn(async move { tokio::net::TcpStream::connect(addr).await.is_ok() })
        .await
        .unwrap_or(false)
}
