//! [`Cluster`]: a real control plane and a simulated node in a private
//! network namespace, for one test, removed on drop.
//!
//! ```text
//!  test process (host netns)                 netns weft-<id> (node + control plane)
//!  kube::Client, kubectl ──127.0.0.1:<p>──▶ forward thread ──▶ 127.0.0.1:6443 kube-apiserver
//!  kubelet simulator (tasks) ─ ip netns exec ─▶ pods: netns weft-<id>-p<n>, veth on weft0
//! ```
//!
//! Why a forward rather than moving the test into the namespace: the test
//! process, its tokio runtime and the `kubectl` children stay in the host
//! namespace, untouched, and only one listener on host loopback exists. The
//! forward's thread has `setns(2)`-ed into the cluster namespace, so its
//! outbound connections are made there (see [`crate::netns::NetnsRuntime`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node as KNode, Pod, ServiceAccount};
use kube::Api;
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::Rng as _;

use crate::hostfs::HostLease;
use crate::images::ImageMap;
use crate::kubelet::{Kubelet, NodeConfig, NodeParts, network};
use crate::netns::{NetNs, NetnsError, NetnsRuntime};

/// The node's address: the bridge in the cluster namespace.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// The Service ClusterIP range.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The `kubernetes` Service's ClusterIP.
pub const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A prerequisite is missing; the message says how to install it.
    #[error("missing prerequisite: {0}")]
    Prerequisite(String),
    /// Namespace or command failure.
    #[error(transparent)]
    Net(#[from] NetnsError),
    /// File system.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The control plane did not come up; the log tail is included.
    #[error("control plane: {0}")]
    ControlPlane(String),
    /// Kubernetes client.
    #[error("kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    /// Kubeconfig.
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    /// The simulator failed to start.
    #[error("kubelet simulator: {0}")]
    Kubelet(#[from] crate::kubelet::KubeletError),
    /// A wait ran out of time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    /// What was asked needs the harness's own cluster (its files, audit
    /// log or network namespaces), not one reached by kubeconfig.
    #[error(
        "{0} needs the harness's own cluster; not available on a cluster reached by WEFT_E2E_KUBECONFIG"
    )]
    HarnessOnly(&'static str),
    /// A pod is not running on the simulated node.
    #[error("pod {0} is not running on the node")]
    NoSuchPod(String),
    /// A command ran but failed.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        /// The command.
        cmd: String,
        /// Exit status.
        status: String,
        /// Its stderr.
        stderr: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Image → program table (default: [`ImageMap::workspace`]).
    pub images: ImageMap,
    /// How often the simulator refreshes mounted volumes.
    pub volume_sync_period: Duration,
    /// The control plane binary (default: `$WEFT_CONTROLPLANE_BIN`, else
    /// `<repo>/target/controlplane/weft-controlplane`, built by
    /// `e2e/controlplane/build.sh`).
    pub controlplane_bin: PathBuf,
    /// The node's name.
    pub node_name: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        let bin = std::env::var_os("WEFT_CONTROLPLANE_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../target/controlplane/weft-controlplane")
            });
        Self {
            images: ImageMap::workspace(),
            volume_sync_period: Duration::from_secs(2),
            controlplane_bin: bin,
            node_name: "weft-node".into(),
        }
    }
}

/// A running cluster. Dropping it stops every process and removes every
/// namespace, interface and file it made; if the thread is panicking (a
/// failed test) it first prints every process's log.
pub struct Cluster {
    id: String,
    kubelet: Option<Kubelet>,
    client: kube::Client,
    kubeconfig: PathBuf,
    controlplane: Option<Child>,
    /// Keeps the apiserver forward alive as long as the cluster.
    _forward_rt: Option<Arc<NetnsRuntime>>,
    /// Set for a cluster reached through a kubeconfig only
    /// ([`Cluster::for_scenario`]).
    external: Option<External>,
    node_ns: Option<NetNs>,
    dir: Option<tempfile::TempDir>,
    started_in: Duration,
    passed: bool,
    host: Option<Arc<HostLease>>,
}

/// A cluster the harness did not start: reached through a kubeconfig only,
/// as the scenarios run against a real cluster (`WEFT_E2E_KUBECONFIG`).
struct External {
    /// How commands run inside pods.
    pods: PodAccess,
    /// kubectl argument lists run at teardown, last registered first (what
    /// the scenario installed; see [`Cluster::on_teardown`]).
    cleanup: std::sync::Mutex<Vec<Vec<String>>>,
    /// The harness cluster behind it, when [`Cluster::for_scenario`] made
    /// one for `WEFT_E2E_VIA_KUBECONFIG`; torn down after the clean-up.
    harness: Option<Box<Cluster>>,
}

/// How an external cluster's pods are reached.
enum PodAccess {
    /// `kubectl exec` / `kubectl logs`: a real cluster.
    Kubectl,
    /// The network namespaces of a harness cluster the test also started:
    /// the external mode's own test on a machine without kubelet streaming.
    Harness(Arc<crate::kubelet::Node>),
}

/// The kubeconfig of the cluster to run the scenarios on, if one was given.
pub fn external_kubeconfig() -> Option<PathBuf> {
    std::env::var_os("WEFT_E2E_KUBECONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

impl Cluster {
    /// The cluster a mesh scenario runs on: the one `WEFT_E2E_KUBECONFIG`
    /// names when set (see [`Cluster::connect`]), else a new harness cluster.
    pub async fn for_scenario() -> Result<Self, HarnessError> {
        Self::for_scenario_with(ClusterConfig::default()).await
    }

    /// [`Cluster::for_scenario`] with a harness configuration (ignored for
    /// an external cluster).
    ///
    /// With `WEFT_E2E_VIA_KUBECONFIG=1` (and no `WEFT_E2E_KUBECONFIG`) it
    /// starts a harness cluster and returns it reached through its
    /// kubeconfig only ([`Cluster::connect_to`]): the scenarios' external
    /// mode, checked on this machine.
    pub async fn for_scenario_with(config: ClusterConfig) -> Result<Self, HarnessError> {
        if let Some(path) = external_kubeconfig() {
            return Self::connect(&path).await;
        }
        if std::env::var_os("WEFT_E2E_VIA_KUBECONFIG").is_some_and(|v| !v.is_empty()) {
            let harness = Self::start_with(config).await?;
            let mut cluster = Self::connect_to(&harness).await?;
            if let Some(ext) = cluster.external.as_mut() {
                ext.harness = Some(Box::new(harness));
            }
            return Ok(cluster);
        }
        Self::start_with(config).await
    }

    /// Uses the cluster of `kubeconfig` (its current context): commands in
    /// pods go through `kubectl exec`, logs through `kubectl logs`. Nothing
    /// is started; what a scenario installs is removed at teardown.
    pub async fn connect(kubeconfig: &Path) -> Result<Self, HarnessError> {
        Self::connect_with(kubeconfig, PodAccess::Kubectl).await
    }

    /// Uses `harness` through its kubeconfig only, as [`Cluster::connect`]
    /// would, except that commands run in pods through the harness's
    /// network namespaces (the simulator serves no `exec`). The external
    /// mode's own test.
    pub async fn connect_to(harness: &Cluster) -> Result<Self, HarnessError> {
        let node = harness
            .kubelet
            .as_ref()
            .map(|k| k.node().clone())
            .ok_or(HarnessError::HarnessOnly("connect_to"))?;
        Self::connect_with(harness.kubeconfig(), PodAccess::Harness(node)).await
    }

    async fn connect_with(kubeconfig: &Path, pods: PodAccess) -> Result<Self, HarnessError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let begin = Instant::now();
        let kc = Kubeconfig::read_from(kubeconfig)
            .map_err(|e| HarnessError::Kubeconfig(format!("{}: {e}", kubeconfig.display())))?;
        let kconf = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| HarnessError::Kubeconfig(e.to_string()))?;
        let client = kube::Client::try_from(kconf)?;
        client.apiserver_version().await?;
        let id: String = format!("ext{:04x}", rand::rng().random::<u16>());
        Ok(Cluster {
            id,
            kubelet: None,
            client,
            kubeconfig: kubeconfig.to_path_buf(),
            controlplane: None,
            _forward_rt: None,
            external: Some(External {
                pods,
                cleanup: std::sync::Mutex::default(),
                harness: None,
            }),
            node_ns: None,
            dir: None,
            started_in: begin.elapsed(),
            passed: false,
            host: None,
        })
    }

    /// Whether this cluster was reached by kubeconfig rather than started
    /// by the harness; scenarios skip their harness-only checks then.
    pub fn is_external(&self) -> bool {
        self.external.is_some()
    }

    /// Registers `kubectl <args>` to run when an external cluster is torn
    /// down (last registered first), so a scenario leaves it as it found
    /// it. Nothing happens on a harness cluster, which is removed whole.
    pub fn on_teardown(&self, args: &[&str]) {
        if let Some(ext) = &self.external
            && let Ok(mut list) = ext.cleanup.lock()
        {
            let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
            if !list.contains(&args) {
                list.push(args);
            }
        }
    }

    /// The path to run `program` (a test program of [`ImageMap`], e.g.
    /// `weft-e2e-app`) inside a pod: the host binary on the harness, the
    /// name in the image's `PATH` through `kubectl exec`.
    pub fn pod_program(&self, program: &str) -> Result<String, HarnessError> {
        if matches!(
            self.external.as_ref().map(|e| &e.pods),
            Some(PodAccess::Kubectl)
        ) {
            return Ok(program.to_owned());
        }
        ImageMap::workspace()
            .program_for_image(program)
            .map(|p| p.to_string_lossy().into_owned())
            .ok_or_else(|| {
                HarnessError::Prerequisite(format!(
                    "{program} is not built (cargo build -p weft-e2e)"
                ))
            })
    }

    /// Starts a cluster with the default configuration.
    pub async fn start() -> Result<Self, HarnessError> {
        Self::start_with(ClusterConfig::default()).await
    }

    /// Starts a cluster: namespace, control plane, forward, simulator; returns
    /// when the API server is ready, the node is Ready and namespace
    /// `default` has its service account.
    pub async fn start_with(config: ClusterConfig) -> Result<Self, HarnessError> {
        let begin = Instant::now();
        // One crypto provider everywhere: ring. Already installed is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        if !nix::unistd::Uid::effective().is_root() {
            return Err(HarnessError::Prerequisite(
                "the e2e harness needs root (network namespaces, veths, iptables); run the tests as root".into(),
            ));
        }
        if !config.controlplane_bin.exists() {
            return Err(HarnessError::Prerequisite(format!(
                "{} not found: build it with e2e/controlplane/build.sh (needs Go and the Go module proxy)",
                config.controlplane_bin.display()
            )));
        }
        for (tool, pkg) in [
            ("iptables-restore", "iptables"),
            ("kubectl", "kubectl"),
            ("setpriv", "util-linux"),
        ] {
            if which(tool).is_none() {
                return Err(HarnessError::Prerequisite(format!(
                    "{tool} not found: apt-get install -y {pkg}"
                )));
            }
        }
        let id: String = {
            let mut rng = rand::rng();
            (0..6)
                .map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0'))
                .collect()
        };
        let dir = tempfile::Builder::new()
            .prefix(&format!("weft-e2e-{id}-"))
            .tempdir()
            .map_err(io("temp dir"))?;
        set_mode(dir.path(), 0o755)?;
        let host = Arc::new(HostLease::acquire().map_err(io("lock /run/weft-e2e/lock"))?);
        let node_ns = NetNs::create(&format!("weft-{id}"))?;
        network::setup_node(&node_ns, NODE_IP, SERVICE_CIDR)?;

        let cp_dir = dir.path().join("controlplane");
        let admin = cp_dir.join("admin.kubeconfig");
        let log = std::fs::File::create(dir.path().join("controlplane.log"))
            .map_err(io("control plane log"))?;
        let log2 = log.try_clone().map_err(io("control plane log"))?;
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", node_ns.name()])
            .arg(&config.controlplane_bin)
            .arg("--data-dir")
            .arg(&cp_dir)
            .arg("--advertise-address")
            .arg(NODE_IP.to_string())
            .arg("--service-cidr")
            .arg(SERVICE_CIDR)
            .arg("--kubeconfig")
            .arg(&admin)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io("start control plane"))?;
        let node_rt = Arc::new(NetnsRuntime::enter(node_ns.path())?);
        let mut cluster = Self {
            id: id.clone(),
            kubelet: None,
            client: placeholder_client()?,
            kubeconfig: dir.path().join("kubeconfig"),
            controlplane: Some(child),
            _forward_rt: Some(node_rt.clone()),
            external: None,
            node_ns: Some(node_ns),
            dir: Some(dir),
            started_in: Duration::ZERO,
            passed: false,
            host: Some(host.clone()),
        };
        cluster.wait_controlplane(&admin).await?;

        let forwarded = node_rt
            .forward(SocketAddr::from(([127, 0, 0, 1], 6443)))
            .map_err(io("apiserver forward"))?;
        let text = std::fs::read_to_string(&admin).map_err(io("admin kubeconfig"))?;
        let text = text.replace("https://127.0.0.1:6443", &format!("https://{forwarded}"));
        std::fs::write(&cluster.kubeconfig, text).map_err(io("kubeconfig"))?;
        let kc = Kubeconfig::read_from(&cluster.kubeconfig)
            .map_err(|e| HarnessError::Kubeconfig(e.to_string()))?;
        let kconf = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| HarnessError::Kubeconfig(e.to_string()))?;
        cluster.client = kube::Client::try_from(kconf)?;

        let kubelet = Kubelet::start(NodeParts {
            client: cluster.client.clone(),
            config: NodeConfig {
                name: config.node_name.clone(),
                images: config.images,
                sync_period: config.volume_sync_period,
            },
            dir: cluster.dir()?.to_path_buf(),
            node_ns: format!("weft-{id}"),
            node_rt,
            node_ip: NODE_IP,
            kubernetes_service_ip: KUBERNETES_SERVICE_IP.into(),
            id,
            host,
        })
        .await?;
        cluster.kubelet = Some(kubelet);
        let nodes: Api<KNode> = Api::all(cluster.client.clone());
        let node_name = config.node_name.clone();
        cluster
            .wait_until(Duration::from_secs(60), "node Ready", || {
                let nodes = nodes.clone();
                let name = node_name.clone();
                async move {
                    Ok(nodes.get_opt(&name).await?.is_some_and(|n| {
                        n.status
                            .and_then(|s| s.conditions)
                            .into_iter()
                            .flatten()
                            .any(|c| c.type_ == "Ready" && c.status == "True")
                    }))
                }
            })
            .await?;
        cluster.wait_namespace_ready("default").await?;
        cluster.started_in = begin.elapsed();
        Ok(cluster)
    }

    async fn wait_controlplane(&mut self, admin: &Path) -> Result<(), HarnessError> {
        let deadline = Instant::now() + Duration::from_secs(180);
        let log = self.dir()?.join("controlplane.log");
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if admin.exists() && text.contains("weft-controlplane: ready") {
                return Ok(());
            }
            let exited = self
                .controlplane
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                self.dump_logs();
                return Err(HarnessError::ControlPlane(format!(
                    "not ready ({}); log tail:\n{}",
                    exited.map_or("timeout after 180s".into(), |s| s.to_string()),
                    tail(&text, 30)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn dir(&self) -> Result<&Path, HarnessError> {
        self.dir
            .as_ref()
            .map(tempfile::TempDir::path)
            .ok_or_else(|| HarnessError::ControlPlane("cluster already torn down".into()))
    }

    /// A client with admin (`system:masters`) credentials.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// An admin kubeconfig for real `kubectl` (server on host loopback).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The cluster's short random id (in namespace and interface names).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// How long [`Cluster::start`] took.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The network namespace of the node and control plane.
    pub fn node_netns(&self) -> String {
        format!("weft-{}", self.id)
    }

    /// Runs `kubectl --kubeconfig <admin> <args>`; fails unless it exits 0.
    pub async fn kubectl(&self, args: &[&str]) -> Result<String, HarnessError> {
        self.kubectl_stdin(args, None).await
    }

    /// Like [`Cluster::kubectl`], feeding `stdin` (for `apply -f -`).
    pub async fn kubectl_stdin(
        &self,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, HarnessError> {
        let out = self.kubectl_output(args, stdin).await?;
        if !out.status.success() {
            return Err(HarnessError::Command {
                cmd: format!("kubectl {}", args.join(" ")),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs kubectl and returns its raw output, whatever the exit status.
    pub async fn kubectl_output(
        &self,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<Output, HarnessError> {
        use tokio::io::AsyncWriteExt as _;
        let mut child = tokio::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(io("kubectl (apt-get install -y kubectl)"))?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes())
                .await
                .map_err(io("kubectl stdin"))?;
        }
        child.wait_with_output().await.map_err(io("kubectl"))
    }

    /// Polls `check` every 200 ms until it returns true or `timeout` passes.
    /// Errors from `check` count as "not yet".
    pub async fn wait_until<F, Fut>(
        &self,
        timeout: Duration,
        what: &str,
        mut check: F,
    ) -> Result<(), HarnessError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<bool, HarnessError>>,
    {
        let deadline = Instant::now() + timeout;
        let mut last_err = None;
        loop {
            match check().await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last_err = Some(e.to_string()),
            }
            if Instant::now() > deadline {
                let what = match last_err {
                    Some(e) => format!("{what} (last error: {e})"),
                    None => what.to_owned(),
                };
                return Err(HarnessError::Timeout(timeout, what));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Creates namespace `name` (if missing) and waits until pods can be
    /// created in it (its `default` ServiceAccount and `kube-root-ca.crt`).
    pub async fn create_namespace(&self, name: &str) -> Result<(), HarnessError> {
        let nss: Api<Namespace> = Api::all(self.client());
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.into());
        match nss.create(&PostParams::default(), &ns).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        self.wait_namespace_ready(name).await
    }

    async fn wait_namespace_ready(&self, name: &str) -> Result<(), HarnessError> {
        let sas: Api<ServiceAccount> = Api::namespaced(self.client(), name);
        let cms: Api<ConfigMap> = Api::namespaced(self.client(), name);
        self.wait_until(
            Duration::from_secs(60),
            &format!("namespace {name} ready"),
            || {
                let (sas, cms) = (sas.clone(), cms.clone());
                async move {
                    Ok(sas.get_opt("default").await?.is_some()
                        && cms.get_opt("kube-root-ca.crt").await?.is_some())
                }
            },
        )
        .await
    }

    /// Waits for pod `ns/name` to be Ready.
    pub async fn wait_pod_ready(
        &self,
        ns: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<Pod, HarnessError> {
        let pods: Api<Pod> = Api::namespaced(self.client(), ns);
        self.wait_until(timeout, &format!("pod {ns}/{name} Ready"), || {
            let pods = pods.clone();
            async move { Ok(pods.get_opt(name).await?.is_some_and(|p| pod_is_ready(&p))) }
        })
        .await?;
        Ok(pods.get(name).await?)
    }

    /// Waits for Deployment `ns/name` to have all replicas updated and ready.
    pub async fn wait_deployment_ready(
        &self,
        ns: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        let deps: Api<Deployment> = Api::namespaced(self.client(), ns);
        self.wait_until(timeout, &format!("deployment {ns}/{name} ready"), || {
            let deps = deps.clone();
            async move {
                let Some(d) = deps.get_opt(name).await? else {
                    return Ok(false);
                };
                let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                let st = d.status.unwrap_or_default();
                Ok(st.observed_generation >= d.metadata.generation
                    && st.updated_replicas.unwrap_or(0) == want
                    && st.ready_replicas.unwrap_or(0) == want
                    && st.replicas.unwrap_or(0) == want)
            }
        })
        .await
    }

    /// Waits until the node's service rules (kube-proxy's job) send
    /// Service `ns/name`'s ClusterIP to `endpoints` ready endpoints per port.
    /// Deployments report Ready before that: wait for this before calling a
    /// Service.
    pub async fn wait_service_endpoints(
        &self,
        ns: &str,
        name: &str,
        endpoints: usize,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        let svcs: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(self.client(), ns);
        self.wait_until(
            timeout,
            &format!("service {ns}/{name} with {endpoints} endpoints"),
            || {
                let svcs = svcs.clone();
                async move {
                    let Some(svc) = svcs.get_opt(name).await? else {
                        return Ok(false);
                    };
                    let spec = svc.spec.unwrap_or_default();
                    let ip = spec.cluster_ip.unwrap_or_default();
                    let out = self.exec_in_node(&["iptables-save", "-t", "nat"]).await?;
                    let rules = String::from_utf8_lossy(&out.stdout);
                    Ok(spec.ports.iter().flatten().all(|p| {
                        let needle = format!("-d {ip}/32 -p tcp -m tcp --dport {} ", p.port);
                        rules
                            .lines()
                            .filter(|l| l.contains(&needle) && l.contains("-j DNAT"))
                            .count()
                            == endpoints
                    }))
                }
            },
        )
        .await
    }

    /// Waits until `get` finds no object (e.g. after a delete or GC).
    pub async fn wait_gone<K>(
        &self,
        api: &Api<K>,
        name: &str,
        timeout: Duration,
    ) -> Result<(), HarnessError>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        self.wait_until(timeout, &format!("{name} gone"), || {
            let api = api.clone();
            async move { Ok(api.get_opt(name).await?.is_none()) }
        })
        .await
    }

    fn pod_record(&self, ns: &str, pod: &str) -> Result<crate::kubelet::PodRecord, HarnessError> {
        let node = match (&self.kubelet, &self.external) {
            (Some(k), _) => Some(k.node()),
            (
                None,
                Some(External {
                    pods: PodAccess::Harness(node),
                    ..
                }),
            ) => Some(node),
            _ => None,
        };
        node.and_then(|n| n.pod(&format!("{ns}/{pod}")))
            .ok_or_else(|| HarnessError::NoSuchPod(format!("{ns}/{pod}")))
    }

    /// Harness-only features refuse on an external cluster.
    fn harness_only(&self, what: &'static str) -> Result<(), HarnessError> {
        match self.external {
            Some(_) => Err(HarnessError::HarnessOnly(what)),
            None => Ok(()),
        }
    }

    /// Whether commands reach pods with `kubectl exec`.
    fn via_kubectl(&self) -> bool {
        matches!(
            self.external.as_ref().map(|e| &e.pods),
            Some(PodAccess::Kubectl)
        )
    }

    /// The container `kubectl exec` runs in: the pod's first one that is
    /// not weft's sidecar.
    async fn app_container(&self, ns: &str, pod: &str) -> Result<String, HarnessError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let p = api.get(pod).await?;
        p.spec
            .into_iter()
            .flat_map(|s| s.containers)
            .map(|c| c.name)
            .find(|n| n != "weft-proxy")
            .ok_or_else(|| HarnessError::NoSuchPod(format!("{ns}/{pod} has no app container")))
    }

    /// `kubectl exec` arguments running `cmd` in the app container.
    async fn kubectl_exec_args(
        &self,
        ns: &str,
        pod: &str,
        stdin: bool,
        cmd: &[&str],
    ) -> Result<Vec<String>, HarnessError> {
        let container = self.app_container(ns, pod).await?;
        let mut args: Vec<String> = vec!["--kubeconfig".into()];
        args.push(self.kubeconfig.to_string_lossy().into_owned());
        args.extend(["exec".into(), "-n".into(), ns.into(), pod.into()]);
        args.extend(["-c".into(), container]);
        if stdin {
            args.push("-i".into());
        }
        args.push("--".into());
        args.extend(cmd.iter().map(|c| (*c).to_owned()));
        Ok(args)
    }

    /// Starts `cmd` in the pod (as [`Cluster::exec_in_pod`] runs it) with
    /// stdin and stdout piped, for a program that runs until told to stop
    /// (its stdin closed).
    pub async fn spawn_in_pod(
        &self,
        ns: &str,
        pod: &str,
        cmd: &[&str],
    ) -> Result<tokio::process::Child, HarnessError> {
        let mut command = if self.via_kubectl() {
            let mut c = tokio::process::Command::new("kubectl");
            c.args(self.kubectl_exec_args(ns, pod, true, cmd).await?);
            c
        } else {
            let rec = self.pod_record(ns, pod)?;
            let mut c = tokio::process::Command::new("ip");
            c.args(["netns", "exec", &rec.netns]).args(cmd);
            c
        };
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!("spawn {cmd:?} in {ns}/{pod}")))
    }

    /// The IP of a pod running on the node.
    pub fn pod_ip(&self, ns: &str, pod: &str) -> Result<IpAddr, HarnessError> {
        self.harness_only("pod_ip")?;
        Ok(self.pod_record(ns, pod)?.ip)
    }

    /// Holds (`true`) or resumes (`false`) the kubelet's refresh of a
    /// running pod's volumes: while held, its mounted Secrets and
    /// ConfigMaps keep their current content, as with a real kubelet that
    /// is slow to sync. Harness only.
    pub fn hold_volume_refresh(&self, ns: &str, pod: &str, hold: bool) -> Result<(), HarnessError> {
        self.harness_only("hold_volume_refresh")?;
        let key = format!("{ns}/{pod}");
        match &self.kubelet {
            Some(k) if k.node().pod(&key).is_some() => {
                k.node().hold_volume_refresh(&key, hold);
                Ok(())
            }
            _ => Err(HarnessError::NoSuchPod(key)),
        }
    }

    /// The host directory of volume `volume` of a running pod (for
    /// Secret/ConfigMap/projected volumes: the atomic-writer layout).
    pub fn pod_volume_dir(
        &self,
        ns: &str,
        pod: &str,
        volume: &str,
    ) -> Result<PathBuf, HarnessError> {
        self.harness_only("pod_volume_dir")?;
        Ok(self.pod_record(ns, pod)?.volumes.join(volume))
    }

    /// Runs `cmd` (a host program, e.g. `weft-e2e-app get ...` or `curl`)
    /// inside the pod's network namespace; returns its output whatever the
    /// exit status. The file system is the host's. On a cluster reached by
    /// `WEFT_E2E_KUBECONFIG`, `kubectl exec` runs it in the pod's app
    /// container instead (see [`Cluster::pod_program`] for the path).
    pub async fn exec_in_pod(
        &self,
        ns: &str,
        pod: &str,
        cmd: &[&str],
    ) -> Result<Output, HarnessError> {
        if self.via_kubectl() {
            let args = self.kubectl_exec_args(ns, pod, false, cmd).await?;
            return tokio::process::Command::new("kubectl")
                .args(&args)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output()
                .await
                .map_err(io(format!("kubectl exec {cmd:?}")));
        }
        let rec = self.pod_record(ns, pod)?;
        self.exec_in_netns(&rec.netns, cmd).await
    }

    /// Runs `cmd` in the node (and control plane) network namespace.
    pub async fn exec_in_node(&self, cmd: &[&str]) -> Result<Output, HarnessError> {
        self.harness_only("exec_in_node")?;
        self.exec_in_netns(&self.node_netns(), cmd).await
    }

    async fn exec_in_netns(&self, netns: &str, cmd: &[&str]) -> Result<Output, HarnessError> {
        tokio::process::Command::new("ip")
            .args(["netns", "exec", netns])
            .args(cmd)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(io(format!("exec {cmd:?}")))
    }

    /// A runtime whose tasks run in the pod's network namespace, for Rust
    /// client code (e.g. a hyper client) that must originate from the pod.
    pub fn pod_runtime(&self, ns: &str, pod: &str) -> Result<NetnsRuntime, HarnessError> {
        self.harness_only("pod_runtime")?;
        let rec = self.pod_record(ns, pod)?;
        Ok(NetnsRuntime::enter(
            PathBuf::from("/var/run/netns").join(rec.netns),
        )?)
    }

    /// The current log of one container (latest restart) of a running pod.
    pub fn pod_log(&self, ns: &str, pod: &str, container: &str) -> Result<String, HarnessError> {
        if self.via_kubectl() {
            let out = std::process::Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args(["logs", "-n", ns, pod, "-c", container])
                .output()
                .map_err(io("kubectl logs"))?;
            if !out.status.success() {
                return Err(HarnessError::Command {
                    cmd: format!("kubectl logs -n {ns} {pod} -c {container}"),
                    status: out.status.to_string(),
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                });
            }
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let rec = self.pod_record(ns, pod)?;
        let mut best: Option<(u32, PathBuf)> = None;
        for e in std::fs::read_dir(&rec.logs)
            .map_err(io("pod logs"))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let restart = name
                .strip_prefix(&format!("{container}-"))
                .and_then(|r| r.strip_suffix(".log"))
                .and_then(|r| r.parse::<u32>().ok());
            if let Some(r) = restart
                && best.as_ref().is_none_or(|(b, _)| r > *b)
            {
                best = Some((r, e.path()));
            }
        }
        let (_, path) = best.ok_or_else(|| {
            HarnessError::NoSuchPod(format!("{ns}/{pod} container {container} has no log"))
        })?;
        std::fs::read_to_string(path).map_err(io("pod log"))
    }

    /// Every log file of the cluster: control plane components, simulator,
    /// and every container that ran.
    pub fn log_files(&self) -> Vec<PathBuf> {
        let Ok(dir) = self.dir() else {
            return Vec::new();
        };
        let mut files = vec![dir.join("controlplane.log"), dir.join("kubelet.log")];
        let mut collect = |d: PathBuf| {
            if let Ok(rd) = std::fs::read_dir(d) {
                let mut v: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
                v.sort();
                files.extend(v);
            }
        };
        collect(dir.join("controlplane/logs"));
        if let Ok(rd) = std::fs::read_dir(dir.join("pods")) {
            for pod in rd.flatten() {
                collect(pod.path().join("logs"));
            }
        }
        files.retain(|f| f.is_file());
        files
    }

    /// Every WARN or ERROR line that a container of a pod logged, each
    /// prefixed with the pod and container, in time order.
    pub fn weft_warnings(&self) -> String {
        let mut lines: Vec<(String, String)> = Vec::new();
        for f in self.log_files() {
            let Some(pod) = f
                .parent()
                .and_then(Path::parent)
                .filter(|d| d.parent().is_some_and(|p| p.ends_with("pods")))
                .and_then(|d| d.file_name())
            else {
                continue;
            };
            let who = format!(
                "{}/{}",
                pod.to_string_lossy(),
                f.file_stem().unwrap_or_default().to_string_lossy()
            );
            for l in std::fs::read_to_string(&f).unwrap_or_default().lines() {
                if l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\"") {
                    let at = l
                        .split("\"timestamp\":\"")
                        .nth(1)
                        .and_then(|r| r.split('"').next())
                        .unwrap_or_default()
                        .to_owned();
                    lines.push((at, format!("{who}: {l}")));
                }
            }
        }
        lines.sort();
        lines.into_iter().map(|(_, l)| l + "\n").collect()
    }

    /// The API server's audit events so far: the metadata of every request
    /// made by a service account of namespace `weft-system` (the policy is
    /// in `e2e/controlplane/main.go`), one JSON object per request.
    pub fn audit_events(&self) -> Result<Vec<serde_json::Value>, HarnessError> {
        self.harness_only("the API server's audit log")?;
        let path = self.dir()?.join("controlplane/logs/audit.log");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io("audit log")(e)),
        };
        // The last line may be half-written while the API server runs.
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// Ends a test that passed: tears down without printing logs. A cluster
    /// dropped without this (a panic, an early `?` return) prints them all.
    pub fn shutdown(mut self) {
        self.passed = true;
        if let Some(h) = self.external.as_mut().and_then(|e| e.harness.as_mut()) {
            h.passed = true;
        }
    }

    /// Prints the cluster's objects (`kubectl get`), the node's NAT rules
    /// and the tail of every log to stderr.
    pub fn dump_logs(&self) {
        if self.is_external() {
            self.dump_external();
            return;
        }
        // First, and short: what the pods' weft containers warned about,
        // which names the cause of most failures before the long tails.
        eprintln!(
            "===== weft warnings and errors, every pod =====\n{}",
            tail(&self.weft_warnings(), 60)
        );
        if let Ok(out) = crate::netns::run(
            "ip",
            &[
                "netns",
                "exec",
                &self.node_netns(),
                "iptables-save",
                "-t",
                "nat",
            ],
        ) {
            eprintln!(
                "===== node iptables-save -t nat =====\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        if let Ok(out) = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args([
                "get",
                "nodes,all,events",
                "-A",
                "-o",
                "wide",
                "--request-timeout=5s",
            ])
            .output()
        {
            eprintln!(
                "===== kubectl get nodes,all,events -A =====\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for f in self.log_files() {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            eprintln!("===== {} =====\n{}", f.display(), tail(&text, 80));
        }
    }

    /// What an external cluster shows: its objects and weft's logs.
    fn dump_external(&self) {
        let kubectl = |args: &[&str]| {
            std::process::Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args(args)
                .output()
                .map(|o| {
                    format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )
                })
                .unwrap_or_else(|e| format!("kubectl: {e}"))
        };
        for ns in ["weft-system", "demo", "outside"] {
            eprintln!(
                "===== kubectl get all,events -n {ns} =====\n{}",
                kubectl(&[
                    "get",
                    "all,events",
                    "-n",
                    ns,
                    "-o",
                    "wide",
                    "--request-timeout=5s"
                ])
            );
        }
        eprintln!(
            "===== weft-system logs =====\n{}",
            kubectl(&[
                "logs",
                "-n",
                "weft-system",
                "-l",
                "app.kubernetes.io/part-of=weft",
                "--all-containers",
                "--prefix",
                "--tail=80",
            ])
        );
    }

    /// Runs the registered clean-up of an external cluster, last first.
    fn clean_external(&mut self) {
        let Some(ext) = self.external.take() else {
            return;
        };
        let External {
            cleanup, harness, ..
        } = ext;
        let mut list = cleanup.into_inner().unwrap_or_default();
        if harness.is_some() && !self.passed {
            // The harness goes whole; keep its pods for its log dump.
            list.clear();
        }
        for args in list.iter().rev() {
            let out = std::process::Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args(args)
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "weft-e2e: clean-up `kubectl {}` failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("weft-e2e: clean-up `kubectl {}`: {e}", args.join(" ")),
            }
        }
        drop(harness);
    }

    fn teardown(&mut self) {
        self.clean_external();
        if let Some(kubelet) = self.kubelet.take() {
            // Only live, not yet reaped container processes are tracked, so
            // these ids cannot have been reused.
            for pid in kubelet.node().pids() {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            drop(kubelet);
        }
        if let Some(mut cp) = self.controlplane.take() {
            if let Ok(pid) = i32::try_from(cp.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while cp.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = cp.kill();
                    let _ = cp.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let prefix = format!("weft-{}-", self.id);
        if let Ok(rd) = std::fs::read_dir("/var/run/netns") {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&prefix) {
                    crate::netns::kill_all_in(&name);
                    let _ = crate::netns::run("ip", &["netns", "del", &name]);
                }
            }
        }
        self.node_ns.take();
        if let Some(host) = self.host.take() {
            // The kubelet's tasks may still hold a reference until the
            // runtime drops them; the last holder releases.
            if let Ok(host) = Arc::try_unwrap(host) {
                host.release();
            }
        }
        if std::env::var_os("WEFT_E2E_KEEP").is_some()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("weft-e2e: keeping {}", dir.keep().display());
        }
        self.dir.take();
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("id", &self.id)
            .field("kubeconfig", &self.kubeconfig)
            .finish_non_exhaustive()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.passed || std::thread::panicking() {
            eprintln!("weft-e2e: test failed; logs of cluster {}:", self.id);
            self.dump_logs();
        }
        self.teardown();
    }
}

/// Whether a pod has condition Ready=True.
pub fn pod_is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn set_mode(path: &Path, mode: u32) -> Result<(), HarnessError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io("chmod"))
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.exists())
}

/// A client pointing nowhere, replaced once the API server is up; lets the
/// cluster guard exist (and clean up) from the first resource created.
fn placeholder_client() -> Result<kube::Client, HarnessError> {
    let url: http::Uri = "https://127.0.0.1:1"
        .parse()
        .map_err(|e: http::uri::InvalidUri| HarnessError::Kubeconfig(e.to_string()))?;
    Ok(kube::Client::try_from(kube::Config::new(url))?)
}
