//! Network namespaces the harness creates, and a way to run Rust code in one.
//!
//! A [`NetNs`] is a named namespace (`ip netns add`), deleted on drop. Shell
//! commands reach it through `ip netns exec` / `ip -n`. Rust code reaches it
//! through a [`NetnsRuntime`]: a dedicated OS thread that `setns(2)`s into the
//! namespace and drives a current-thread tokio runtime, so every socket its
//! tasks create lives in that namespace, while the rest of the test process
//! stays in the host's. Sockets created *before* entering keep their own
//! namespace, which is how [`NetnsRuntime::forward`] bridges a host loopback
//! port to a port inside the namespace.

use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use nix::sched::CloneFlags;
use tokio::sync::oneshot;

/// Errors of namespace handling.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A command (`ip`, `iptables`, ...) could not be run or failed.
    #[error("`{cmd}` failed: {detail}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its stderr or the spawn error.
        detail: String,
    },
    /// Entering a namespace failed.
    #[error("entering network namespace {path}: {source}")]
    Enter {
        /// The namespace file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Runs a command to completion; an error carries its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<Output, NetnsError> {
    run_with_stdin(program, args, None)
}

/// Like [`run`], feeding `stdin` to the command.
pub fn run_with_stdin(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<Output, NetnsError> {
    use std::io::Write;
    let cmd = format!("{program} {}", args.join(" "));
    let fail = |detail: String| NetnsError::Command {
        cmd: cmd.clone(),
        detail,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                fail(format!(
                    "{program} is not installed (apt-get install -y iproute2 iptables util-linux)"
                ))
            } else {
                fail(e.to_string())
            }
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out)
}

/// A named network namespace; on drop every process left in it is killed
/// and the namespace (with its interfaces) deleted.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates namespace `name` with its loopback up. Needs root.
    pub fn create(name: &str) -> Result<Self, NetnsError> {
        run("ip", &["netns", "add", name]).map_err(|e| match e {
            NetnsError::Command { cmd, detail } => NetnsError::Command {
                cmd,
                detail: format!(
                    "{detail} (the e2e harness needs root and iproute2: run as root, apt-get install -y iproute2)"
                ),
            },
            other => other,
        })?;
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind-mounted file.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<Output, NetnsError> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs `program args` inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output, NetnsError> {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Like [`NetNs::exec`] with `stdin` fed to the program.
    pub fn exec_with_stdin(
        &self,
        program: &str,
        args: &[&str],
        stdin: &str,
    ) -> Result<Output, NetnsError> {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        run_with_stdin("ip", &all, Some(stdin))
    }
}

/// SIGKILLs every process in namespace `name` (all of them were started by
/// the harness inside it: containers and whatever they forked).
pub fn kill_all_in(name: &str) {
    let Ok(out) = run("ip", &["netns", "pids", name]) else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        // Never ourselves: a NetnsRuntime thread of this process may be in it.
        if let Ok(pid) = pid.parse::<i32>()
            && u32::try_from(pid).is_ok_and(|p| p != std::process::id())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if !self.path().exists() {
            return;
        }
        kill_all_in(&self.name);
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("weft-e2e: cleanup: {e}");
        }
    }
}

/// A thread living in a network namespace, running a current-thread tokio
/// runtime; tasks spawned on it open their sockets in that namespace.
/// Stopped (its tasks dropped) on drop.
#[derive(Debug)]
pub struct NetnsRuntime {
    handle: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NetnsRuntime {
    /// Starts the thread and enters the namespace at `path`
    /// (e.g. `/var/run/netns/<name>`).
    pub fn enter(path: PathBuf) -> Result<Self, NetnsError> {
        let file = File::open(&path).map_err(|source| NetnsError::Enter {
            path: path.clone(),
            source,
        })?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let thread_path = path.clone();
        let thread = std::thread::Builder::new()
            .name("weft-e2e-netns".into())
            .spawn(move || {
                let entered = nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
                    .and_then(|()| {
                        tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                    });
                match entered {
                    Ok(rt) => {
                        // The receiver only disappears if `enter` gave up.
                        let _ = ready_tx.send(Ok(rt.handle().clone()));
                        rt.block_on(async {
                            let _ = stop_rx.await;
                        });
                    }
                    Err(source) => {
                        let _ = ready_tx.send(Err(NetnsError::Enter {
                            path: thread_path,
                            source,
                        }));
                    }
                }
            })
            .map_err(|source| NetnsError::Enter {
                path: path.clone(),
                source,
            })?;
        let handle = ready_rx.recv().map_err(|_| NetnsError::Enter {
            path,
            source: std::io::Error::other("namespace thread died"),
        })??;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Runs `fut` inside the namespace; await the handle from anywhere.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(fut)
    }

    /// Forwards a new host loopback port to `target` inside the namespace;
    /// returns the host address. Lives as long as this runtime.
    pub fn forward(&self, target: SocketAddr) -> std::io::Result<SocketAddr> {
        // Bound here, in the caller's (host) namespace.
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        self.spawn(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            while let Ok((mut inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    // Connected from this thread: inside the namespace.
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Ok(addr)
    }
}

impl Drop for NetnsRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
