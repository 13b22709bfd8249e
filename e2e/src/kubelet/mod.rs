//! The kubelet simulator: one Node, its pods as local processes.
//!
//! It registers the Node (pod CIDR 10.244.0.0/24, node IP 10.244.0.1 on the
//! harness bridge) and heartbeats its Ready condition; watches pods bound to
//! it and runs one worker per pod ([`pod`]); and plays kube-proxy
//! ([`network::proxy_services`]). What differs from a real kubelet is
//! listed in `e2e/README.md`.

pub mod atomic;
pub mod container;
pub mod ipam;
pub mod network;
pub mod pod;
pub mod probe;
pub mod volumes;

use std::collections::{BTreeSet, HashMap};
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node as KNode, Pod};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::images::ImageMap;
use crate::netns::{NetnsError, NetnsRuntime};

/// Errors of the simulated kubelet.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    /// An API call failed.
    #[error("kubernetes API: {0}")]
    Api(#[from] kube::Error),
    /// A namespace/veth/iptables command failed.
    #[error(transparent)]
    Net(#[from] NetnsError),
    /// A volume could not be prepared.
    #[error("volume {volume}: {detail}")]
    Volume {
        /// Volume name.
        volume: String,
        /// What went wrong.
        detail: String,
    },
    /// A container's environment could not be built.
    #[error("container {container} env: {detail}")]
    Env {
        /// Container name.
        container: String,
        /// What went wrong.
        detail: String,
    },
    /// The image maps to no program.
    #[error("{0}")]
    Image(String),
    /// A process could not be started.
    #[error("process: {0}")]
    Process(String),
    /// The pod CIDR is exhausted.
    #[error("no free pod IP in 10.244.0.0/24")]
    NoIp,
    /// The address a pod asked for (annotation [`ipam::POD_IP_ANNOTATION`])
    /// is outside the node's range or held by another pod.
    #[error("pod IP {0}")]
    ForcedIp(String),
}

impl KubeletError {
    /// The container `waiting.reason` kubelet would report.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Image(_) => "ErrImagePull",
            Self::Env { .. } => "CreateContainerConfigError",
            _ => "CreateContainerError",
        }
    }
}

/// Where a running pod lives (for exec and logs).
#[derive(Debug, Clone)]
pub struct PodRecord {
    /// Network namespace name.
    pub netns: String,
    /// Pod IP.
    pub ip: IpAddr,
    /// Its container log directory (`<container>-<restart>.log`).
    pub logs: PathBuf,
    /// Host directory holding one subdirectory per volume.
    pub volumes: PathBuf,
}

/// Settings of the simulated node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Node name.
    pub name: String,
    /// Image table.
    pub images: ImageMap,
    /// How often mounted volumes are refreshed (kubelet: ~1 min + cache TTL).
    pub sync_period: Duration,
}

/// The node's shared state.
pub struct Node {
    /// Client (admin credentials; see README).
    pub client: kube::Client,
    /// Node name.
    pub name: String,
    /// Image table.
    pub images: ImageMap,
    /// Where pod directories go.
    pub pods_dir: PathBuf,
    /// The node (harness) network namespace's name.
    pub node_ns: String,
    /// Runtime inside the node namespace (probes).
    pub node_rt: Arc<NetnsRuntime>,
    /// The node IP (the bridge address).
    pub node_ip: Ipv4Addr,
    /// ClusterIP of the `kubernetes` Service.
    pub kubernetes_service_ip: String,
    /// Volume refresh period.
    pub sync_period: Duration,
    /// Short cluster id used in namespace and interface names.
    pub id: String,
    log_file: PathBuf,
    ipam: Mutex<ipam::HostIpam>,
    seq: AtomicU32,
    pods: Mutex<HashMap<String, PodRecord>>,
    pids: Mutex<BTreeSet<u32>>,
    held_volumes: Mutex<BTreeSet<String>>,
    host: Arc<crate::hostfs::HostLease>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("node_ns", &self.node_ns)
            .field("node_ip", &self.node_ip)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for NodeParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeParts")
            .field("config", &self.config)
            .field("node_ns", &self.node_ns)
            .finish_non_exhaustive()
    }
}

fn guard<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `namespace/name`.
pub fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

impl Node {
    /// Appends a line to the simulator's log.
    pub fn log(&self, line: &str) {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
        {
            let _ = writeln!(f, "{line}");
        }
    }

    /// The next pod address (round robin over the range, see [`ipam`]),
    /// or the one the pod asks for; with a sequence number for names.
    fn allocate_ip(&self, forced: Option<Ipv4Addr>) -> Result<(u32, Ipv4Addr), KubeletError> {
        let ip = guard(&self.ipam).allocate(forced)?;
        Ok((self.seq.fetch_add(1, Ordering::Relaxed), ip))
    }

    fn release_ip(&self, ip: Ipv4Addr) {
        guard(&self.ipam).release(ip);
    }

    fn remember(&self, key: &str, rec: PodRecord) {
        guard(&self.pods).insert(key.to_owned(), rec);
    }

    fn forget(&self, key: &str) {
        guard(&self.pods).remove(key);
    }

    /// Where pod `namespace/name` runs, if it does.
    pub fn pod(&self, key: &str) -> Option<PodRecord> {
        guard(&self.pods).get(key).cloned()
    }

    fn keep_logs(&self, dir: &Path) {
        self.log(&format!("pod dir kept for logs: {}", dir.display()));
    }

    fn track(&self, pid: u32) {
        guard(&self.pids).insert(pid);
    }

    fn untrack(&self, pid: u32) {
        guard(&self.pids).remove(&pid);
    }

    /// Holds (`true`) or resumes the refresh of pod `namespace/name`'s
    /// volumes: while held, the files stay as they are, as when a real
    /// kubelet is slow to sync (tests of stale config).
    pub fn hold_volume_refresh(&self, key: &str, hold: bool) {
        let mut held = guard(&self.held_volumes);
        if hold {
            held.insert(key.to_owned());
        } else {
            held.remove(key);
        }
    }

    /// Whether pod `namespace/name`'s volume refresh is held.
    pub fn volume_refresh_held(&self, key: &str) -> bool {
        guard(&self.held_volumes).contains(key)
    }

    /// Container processes started and not yet reaped (for cleanup).
    pub fn pids(&self) -> Vec<u32> {
        guard(&self.pids).iter().copied().collect()
    }

    /// Creates a missing mount point on the host (see [`crate::hostfs`]).
    fn ensure_mountpoint(&self, dst: &Path, dir: bool) -> Result<(), KubeletError> {
        self.host
            .create(dst, dir)
            .map_err(|e| KubeletError::Process(format!("mount point {}: {e}", dst.display())))
    }
}

/// Everything needed to start the simulator.
pub struct NodeParts {
    /// Client.
    pub client: kube::Client,
    /// Settings.
    pub config: NodeConfig,
    /// Directory for pods and the simulator log.
    pub dir: PathBuf,
    /// Node namespace name.
    pub node_ns: String,
    /// Runtime in the node namespace.
    pub node_rt: Arc<NetnsRuntime>,
    /// Node IP.
    pub node_ip: Ipv4Addr,
    /// `kubernetes` Service ClusterIP.
    pub kubernetes_service_ip: String,
    /// Cluster id.
    pub id: String,
    /// The cluster's share of host mount points.
    pub host: Arc<crate::hostfs::HostLease>,
}

/// The running simulator; its tasks are aborted on drop.
#[derive(Debug)]
pub struct Kubelet {
    node: Arc<Node>,
    tasks: Vec<JoinHandle<()>>,
}

impl Kubelet {
    /// Registers the Node and starts the pod, heartbeat and proxy loops.
    pub async fn start(parts: NodeParts) -> Result<Self, KubeletError> {
        let pods_dir = parts.dir.join("pods");
        std::fs::create_dir_all(&pods_dir).map_err(|e| KubeletError::Process(e.to_string()))?;
        let node = Arc::new(Node {
            client: parts.client,
            name: parts.config.name,
            images: parts.config.images,
            pods_dir,
            node_ns: parts.node_ns,
            node_rt: parts.node_rt,
            node_ip: parts.node_ip,
            kubernetes_service_ip: parts.kubernetes_service_ip,
            sync_period: parts.config.sync_period,
            id: parts.id,
            log_file: parts.dir.join("kubelet.log"),
            ipam: Mutex::new(ipam::HostIpam::new(parts.node_ip)),
            seq: AtomicU32::new(0),
            pods: Mutex::new(HashMap::new()),
            pids: Mutex::new(BTreeSet::new()),
            held_volumes: Mutex::new(BTreeSet::new()),
            host: parts.host,
        });
        register(&node).await?;
        let tasks = vec![
            tokio::spawn(heartbeat(node.clone())),
            tokio::spawn(network::proxy_services(
                node.clone(),
                Duration::from_millis(500),
            )),
            tokio::spawn(watch_pods(node.clone())),
        ];
        Ok(Self { node, tasks })
    }

    /// The node's shared state.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn node_status(node: &Node) -> serde_json::Value {
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let capacity =
        json!({"cpu": "8", "memory": "32Gi", "pods": "110", "ephemeral-storage": "100Gi"});
    json!({
        "capacity": capacity,
        "allocatable": capacity,
        "addresses": [
            {"type": "InternalIP", "address": node.node_ip.to_string()},
            {"type": "Hostname", "address": node.name},
        ],
        "conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "weft-e2e kubelet simulator is posting ready status",
            "lastHeartbeatTime": now, "lastTransitionTime": now,
        }],
        "nodeInfo": {
            "machineID": node.id, "systemUUID": node.id, "bootID": node.id,
            "kernelVersion": "", "osImage": "weft-e2e", "containerRuntimeVersion": "weft-e2e://0",
            "kubeletVersion": "v1.33.13", "kubeProxyVersion": "v1.33.13",
            "operatingSystem": "linux", "architecture": "amd64",
        },
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
    })
}

async fn register(node: &Node) -> Result<(), KubeletError> {
    let nodes: Api<KNode> = Api::all(node.client.clone());
    let obj: KNode = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node.name,
            "labels": {
                "kubernetes.io/hostname": node.name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            },
        },
        "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]},
    }))
    .map_err(|e| KubeletError::Process(e.to_string()))?;
    match nodes.create(&PostParams::default(), &obj).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    nodes
        .patch_status(
            &node.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": node_status(node)})),
        )
        .await?;
    // The TaintNodesByCondition admission plugin taints a new node
    // not-ready; the node lifecycle controller (not run here) would lift
    // it once the node reports Ready, so the simulator does.
    nodes
        .patch(
            &node.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"taints": null}})),
        )
        .await?;
    Ok(())
}

async fn heartbeat(node: Arc<Node>) {
    let nodes: Api<KNode> = Api::all(node.client.clone());
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let patch = Patch::Merge(json!({"status": node_status(&node)}));
        if let Err(e) = nodes
            .patch_status(&node.name, &PatchParams::default(), &patch)
            .await
        {
            node.log(&format!("heartbeat: {e}"));
        }
    }
}

async fn watch_pods(node: Arc<Node>) {
    let pods: Api<Pod> = Api::all(node.client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", node.name));
    // Aborting this task (the kubelet is dropped) drops the map, and with it
    // every pod worker: none outlives the node and calls an API server that
    // is gone.
    let mut workers: HashMap<String, (watch::Sender<Option<Pod>>, Worker)> = HashMap::new();
    let mut stream = watcher(pods, cfg).boxed();
    while let Some(ev) = stream.next().await {
        let (pod, deleted) = match ev {
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => (p, false),
            Ok(watcher::Event::Delete(p)) => (p, true),
            Ok(_) => continue,
            Err(e) => {
                node.log(&format!("pod watch: {e}"));
                continue;
            }
        };
        let Some(uid) = pod.metadata.uid.clone() else {
            continue;
        };
        workers.retain(|_, (_, w)| !w.0.is_finished());
        if let Some((tx, _)) = workers.get(&uid) {
            let _ = tx.send(if deleted { None } else { Some(pod) });
            continue;
        }
        if deleted {
            continue;
        }
        let (tx, rx) = watch::channel(Some(pod.clone()));
        let handle = tokio::spawn(pod::run(node.clone(), pod, rx));
        workers.insert(uid, (tx, Worker(handle)));
    }
}

/// A pod worker, aborted when dropped.
struct Worker(JoinHandle<()>);

impl Drop for Worker {
    fn drop(&mut self) {
        self.0.abort();
    }
}
