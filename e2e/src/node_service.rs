//! [`NodeService`]: a program the harness runs in a cluster's node network
//! namespace next to the control plane (Prometheus, Jaeger), with its own
//! temp dir and log file, its HTTP listeners forwarded to host loopback so
//! the test process can call them, and killed on drop (the log's tail is
//! printed when a test panics).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::netns::NetnsRuntime;
use crate::{Cluster, HarnessError};

/// How long one HTTP call to a node service may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A program running in a cluster's node namespace. See the module docs.
pub struct NodeService {
    name: &'static str,
    child: Option<Child>,
    dir: tempfile::TempDir,
    http: HttpClient<HttpConnector, Full<Bytes>>,
    /// Keeps the forwards from host loopback alive.
    forward: NetnsRuntime,
}

impl std::fmt::Debug for NodeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeService")
            .field("name", &self.name)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

/// The error of an I/O step of `what`.
pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

impl NodeService {
    /// A fresh temp dir for service `name` of `cluster` (config, data, log).
    pub fn temp_dir(cluster: &Cluster, name: &str) -> Result<tempfile::TempDir, HarnessError> {
        tempfile::Builder::new()
            .prefix(&format!("weft-e2e-{}-{name}-", cluster.id()))
            .tempdir()
            .map_err(io(format!("{name} temp dir")))
    }

    /// Runs `program args` in the node namespace with `dir` as its working
    /// directory, stdout and stderr to `dir/<name>.log`.
    pub fn spawn(
        cluster: &Cluster,
        name: &'static str,
        dir: tempfile::TempDir,
        program: &Path,
        args: &[OsString],
    ) -> Result<Self, HarnessError> {
        let log = std::fs::File::create(dir.path().join(format!("{name}.log")))
            .map_err(io(format!("{name} log")))?;
        let log2 = log.try_clone().map_err(io(format!("{name} log")))?;
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &cluster.node_netns()])
            .arg(program)
            .args(args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io(format!("start {name}")))?;
        let forward =
            NetnsRuntime::enter(PathBuf::from("/var/run/netns").join(cluster.node_netns()))?;
        Ok(NodeService {
            name,
            child: Some(child),
            dir,
            http: HttpClient::builder(TokioExecutor::new()).build_http(),
            forward,
        })
    }

    /// Forwards a host loopback port to `listen` (an address the program
    /// listens on in the node namespace); its `http://` base URL.
    pub fn forward(&self, listen: &str) -> Result<String, HarnessError> {
        let addr: SocketAddr = listen.parse().map_err(|e| HarnessError::Command {
            cmd: self.name.into(),
            status: "bad listen address".into(),
            stderr: format!("{listen}: {e}"),
        })?;
        let host = self
            .forward
            .forward(addr)
            .map_err(io(format!("{} forward", self.name)))?;
        Ok(format!("http://{host}"))
    }

    /// The program's temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The program's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{}.log", self.name)))
            .unwrap_or_default()
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Polls `ready` every 200 ms for up to 60 s; fails with the log when
    /// the program exits first or the time runs out.
    pub async fn wait_ready<F, Fut>(&mut self, mut ready: F) -> Result<(), HarnessError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if ready().await {
                return Ok(());
            }
            let exited = self.exited();
            if exited.is_some() || std::time::Instant::now() > deadline {
                return Err(HarnessError::Command {
                    cmd: self.name.into(),
                    status: exited.map_or("not ready after 60s".into(), |s| s.to_string()),
                    stderr: self.log(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// An HTTP client for the program's forwards, free of the service's
    /// borrow (for readiness checks).
    pub fn prober(&self) -> Prober {
        Prober {
            name: self.name,
            http: self.http.clone(),
        }
    }

    /// Sends `req` through a forward; the status and body.
    pub async fn send(
        &self,
        req: http::Request<Full<Bytes>>,
    ) -> Result<(u16, Bytes), HarnessError> {
        self.prober().send(req).await
    }

    /// GETs `url`.
    pub async fn get(&self, url: &str) -> Result<(u16, Bytes), HarnessError> {
        self.prober().get(url).await
    }
}

/// HTTP calls to a [`NodeService`]'s forwards.
#[derive(Clone, Debug)]
pub struct Prober {
    name: &'static str,
    http: HttpClient<HttpConnector, Full<Bytes>>,
}

impl Prober {
    /// Sends `req`; the status and body.
    pub async fn send(
        &self,
        req: http::Request<Full<Bytes>>,
    ) -> Result<(u16, Bytes), HarnessError> {
        let what = format!("{} {} {}", self.name, req.method(), req.uri());
        let fail = |e: String| HarnessError::Command {
            cmd: what.clone(),
            status: "request failed".into(),
            stderr: e,
        };
        let resp = tokio::time::timeout(CALL_TIMEOUT, self.http.request(req))
            .await
            .map_err(|_| fail(format!("no answer in {CALL_TIMEOUT:?}")))?
            .map_err(|e| fail(e.to_string()))?;
        let code = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| fail(e.to_string()))?
            .to_bytes();
        Ok((code, body))
    }

    /// GETs `url`.
    pub async fn get(&self, url: &str) -> Result<(u16, Bytes), HarnessError> {
        let req = http::Request::get(url)
            .body(Full::new(Bytes::new()))
            .map_err(|e| HarnessError::Command {
                cmd: format!("{} GET {url}", self.name),
                status: "bad request".into(),
                stderr: e.to_string(),
            })?;
        self.send(req).await
    }
}

impl Drop for NodeService {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "===== {}.log =====\n{}",
                self.name,
                lines[lines.len().saturating_sub(60)..].join("\n")
            );
        }
    }
}
