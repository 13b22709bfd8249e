//! One pod's life on the simulated node, from binding to final deletion.
//!
//! ```text
//! sandbox (netns, veth, IP) → volumes (retried until all sources exist)
//!   → init containers in order (sidecars started, startup probe gating)
//!   → containers → status loop (probes, restarts, phase)
//!   → deletionTimestamp: SIGTERM containers, then sidecars; SIGKILL after
//!     the grace period → tear down → DELETE with grace 0 (kubelet's final step)
//! ```

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, Pod, PodCondition, PodIP,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::network::Sandbox;
use super::probe::{ProbeState, ProbeTarget, Verdict};
use super::volumes::PodVolumes;
use super::{KubeletError, Node, PodRecord, container};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Init,
    Sidecar,
    Main,
}

/// A container's observed state, shared between its runner and the status loop.
#[derive(Debug, Default, Clone)]
struct CState {
    state: Option<ContainerState>,
    last_state: Option<ContainerState>,
    restart_count: i32,
    started: bool,
    ready: bool,
    /// Set when the runner returned for good: the exit code.
    done: Option<i32>,
}

type Shared = Arc<Mutex<CState>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, CState> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Everything a container runner needs about its pod.
#[derive(Debug, Clone)]
struct PodCtx {
    node: Arc<Node>,
    pod: Pod,
    netns: String,
    ip: IpAddr,
    volumes: HashMap<String, PathBuf>,
    logs: PathBuf,
    notify: Arc<Notify>,
}

/// Runs the pod until it is deleted; `updates` carries the latest object
/// (`None`: gone from the API).
pub async fn run(node: Arc<Node>, pod: Pod, updates: watch::Receiver<Option<Pod>>) {
    let key = super::pod_key(&pod);
    if let Err(e) = run_inner(node.clone(), pod, updates).await {
        tracing::warn!(pod = %key, error = %e, "pod worker ended with an error");
        node.log(&format!("pod {key}: {e}"));
    }
    node.forget(&key);
}

async fn run_inner(
    node: Arc<Node>,
    mut pod: Pod,
    mut updates: watch::Receiver<Option<Pod>>,
) -> Result<(), KubeletError> {
    let key = super::pod_key(&pod);
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(node.client.clone(), &ns);
    let spec = pod.spec.clone().unwrap_or_default();

    let sandbox = Sandbox::create(&node, &pod)?;
    let dir = node.pods_dir.join(format!("{ns}_{name}_{uid}"));
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| KubeletError::Process(e.to_string()))?;
    node.remember(
        &key,
        PodRecord {
            netns: sandbox.netns_name().to_owned(),
            ip: sandbox.ip(),
            logs: logs.clone(),
            volumes: dir.join("volumes"),
        },
    );
    let start_time = now();
    let status = pod.status.get_or_insert_with(Default::default);
    status.pod_ip = Some(sandbox.ip().to_string());
    status.pod_ips = Some(vec![PodIP {
        ip: sandbox.ip().to_string(),
    }]);
    status.host_ip = Some(node.node_ip.to_string());

    let notify = Arc::new(Notify::new());
    let mut reporter = Reporter {
        pods: pods.clone(),
        name: name.clone(),
        start_time,
        node_ip: node.node_ip.to_string(),
        pod_ip: sandbox.ip().to_string(),
        last: None,
        volume_error: None,
    };
    let init_names: Vec<Container> = spec.init_containers.clone().unwrap_or_default();
    let init_states: Vec<Shared> = init_names.iter().map(|_| Shared::default()).collect();
    let main_states: Vec<Shared> = spec.containers.iter().map(|_| Shared::default()).collect();
    reporter
        .push(&pod, &init_states, &main_states, false, None)
        .await;

    // Volumes: retried until every source exists, like kubelet's
    // "ContainerCreating" state.
    let mut volumes = PodVolumes::new(dir.join("volumes"));
    loop {
        let latest = updates.borrow().clone();
        match latest {
            None => return finish(&node, sandbox, &dir, None).await,
            Some(p) if p.metadata.deletion_timestamp.is_some() => {
                return finish(&node, sandbox, &dir, Some((&pods, &name, &uid))).await;
            }
            Some(_) => {}
        }
        match volumes.sync(&node.client, &pod).await {
            Ok(()) => break,
            Err(e) => {
                reporter.volume_error = Some(e.to_string());
                reporter
                    .push(&pod, &init_states, &main_states, false, None)
                    .await;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = updates.changed() => {}
                }
            }
        }
    }
    reporter.volume_error = None;
    let volume_paths: HashMap<String, PathBuf> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| (v.name.clone(), volumes.path(&pod, &v.name)))
        .collect();
    let refresher = {
        let node = node.clone();
        let key = key.clone();
        let period = node.sync_period;
        let mut rx = updates.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    r = rx.changed() => if r.is_err() { return },
                }
                if node.volume_refresh_held(&key) {
                    continue;
                }
                let client = &node.client;
                let latest = rx.borrow().clone();
                if let Some(mut p) = latest {
                    p.status = None;
                    if let Err(e) = volumes.sync(client, &p).await {
                        tracing::debug!(error = %e, "volume refresh");
                    }
                }
            }
        })
    };

    let ctx = PodCtx {
        node: node.clone(),
        pod: pod.clone(),
        netns: sandbox.netns_name().to_owned(),
        ip: sandbox.ip(),
        volumes: volume_paths,
        logs,
        notify: notify.clone(),
    };
    let (stop_main_tx, stop_main) = watch::channel(None::<i64>);
    let (stop_side_tx, stop_side) = watch::channel(None::<i64>);
    let mut sidecars: Vec<JoinHandle<()>> = Vec::new();
    let mut failed = false;

    // Init containers, in order.
    'init: for (c, st) in init_names.iter().zip(&init_states) {
        let kind = if c.restart_policy.as_deref() == Some("Always") {
            Kind::Sidecar
        } else {
            Kind::Init
        };
        let stop = if kind == Kind::Sidecar {
            stop_side.clone()
        } else {
            stop_main.clone()
        };
        let handle = tokio::spawn(run_container(
            ctx.clone(),
            c.clone(),
            kind,
            st.clone(),
            stop,
        ));
        let mut handle = if kind == Kind::Sidecar {
            sidecars.push(handle);
            None
        } else {
            Some(handle)
        };
        loop {
            reporter
                .push(&pod, &init_states, &main_states, false, None)
                .await;
            let deleting = updates
                .borrow()
                .as_ref()
                .is_none_or(|p| p.metadata.deletion_timestamp.is_some());
            if deleting {
                break 'init;
            }
            {
                let s = lock(st);
                match kind {
                    Kind::Sidecar if s.started => break,
                    Kind::Init if s.done == Some(0) => break,
                    Kind::Init if s.done.is_some() => {
                        failed = true;
                        break 'init;
                    }
                    _ => {}
                }
            }
            tokio::select! {
                _ = notify.notified() => {}
                _ = updates.changed() => {}
                _ = async { if let Some(h) = handle.as_mut() { let _ = h.await; } else { std::future::pending::<()>().await } } => { handle = None; }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
    let initialized = !failed
        && init_names.iter().zip(&init_states).all(|(c, s)| {
            let s = lock(s);
            if c.restart_policy.as_deref() == Some("Always") {
                s.started
            } else {
                s.done == Some(0)
            }
        });

    let mut mains: Vec<JoinHandle<()>> = Vec::new();
    if initialized {
        for (c, st) in spec.containers.iter().zip(&main_states) {
            mains.push(tokio::spawn(run_container(
                ctx.clone(),
                c.clone(),
                Kind::Main,
                st.clone(),
                stop_main.clone(),
            )));
        }
    }

    // Status loop until deletion.
    let mut phase_final: Option<&'static str> = if failed { Some("Failed") } else { None };
    loop {
        if phase_final.is_none() && initialized && mains.iter().all(JoinHandle::is_finished) {
            let all_ok = main_states.iter().all(|s| lock(s).done == Some(0));
            phase_final = Some(if all_ok { "Succeeded" } else { "Failed" });
            let _ = stop_side_tx.send(Some(grace(&pod)));
        }
        reporter
            .push(&pod, &init_states, &main_states, initialized, phase_final)
            .await;
        let latest = updates.borrow().clone();
        match latest {
            None => break,
            Some(p) if p.metadata.deletion_timestamp.is_some() => {
                pod.metadata.deletion_grace_period_seconds =
                    p.metadata.deletion_grace_period_seconds;
                break;
            }
            Some(_) => {}
        }
        tokio::select! {
            _ = notify.notified() => {}
            r = updates.changed() => if r.is_err() { break },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }

    // Termination: containers first, then sidecars (reverse order is
    // approximated by stopping them together after the containers).
    let grace = grace(&pod);
    let _ = stop_main_tx.send(Some(grace));
    for h in mains {
        let _ = h.await;
    }
    let _ = stop_side_tx.send(Some(grace));
    for h in sidecars.into_iter().rev() {
        let _ = h.await;
    }
    refresher.abort();
    let still_there = updates.borrow().is_some();
    finish(
        &node,
        sandbox,
        &dir,
        still_there.then_some((&pods, &name, &uid)),
    )
    .await
}

fn grace(pod: &Pod) -> i64 {
    pod.metadata
        .deletion_grace_period_seconds
        .or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
        })
        .unwrap_or(30)
}

/// Tears the pod down and, if it still exists, deletes it for good.
async fn finish(
    node: &Node,
    sandbox: Sandbox,
    dir: &std::path::Path,
    delete: Option<(&Api<Pod>, &str, &str)>,
) -> Result<(), KubeletError> {
    drop(sandbox);
    node.keep_logs(dir);
    if let Some((pods, name, uid)) = delete {
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_owned()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match pods.delete(name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => return Err(KubeletError::Api(e)),
        }
    }
    Ok(())
}

struct Reporter {
    pods: Api<Pod>,
    name: String,
    start_time: Time,
    node_ip: String,
    pod_ip: String,
    last: Option<serde_json::Value>,
    volume_error: Option<String>,
}

impl Reporter {
    async fn push(
        &mut self,
        pod: &Pod,
        init: &[Shared],
        main: &[Shared],
        initialized: bool,
        phase_final: Option<&str>,
    ) {
        let spec = pod.spec.clone().unwrap_or_default();
        let image = |c: &Container| c.image.clone().unwrap_or_default();
        let status_of = |c: &Container, s: &Shared| {
            let s = lock(s).clone();
            ContainerStatus {
                name: c.name.clone(),
                image: image(c),
                image_id: format!("weft-e2e://{}", image(c)),
                container_id: Some(format!("weft-e2e://{}", c.name)),
                ready: s.ready,
                started: Some(s.started),
                restart_count: s.restart_count,
                state: Some(s.state.unwrap_or_else(|| ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some(if self.volume_error.is_some() {
                            "ContainerCreating".into()
                        } else {
                            "PodInitializing".into()
                        }),
                        message: self.volume_error.clone(),
                    }),
                    ..Default::default()
                })),
                last_state: s.last_state,
                ..Default::default()
            }
        };
        let init_statuses: Vec<ContainerStatus> = spec
            .init_containers
            .iter()
            .flatten()
            .zip(init)
            .map(|(c, s)| status_of(c, s))
            .collect();
        let main_statuses: Vec<ContainerStatus> = spec
            .containers
            .iter()
            .zip(main)
            .map(|(c, s)| status_of(c, s))
            .collect();
        let sidecars_ready = spec
            .init_containers
            .iter()
            .flatten()
            .zip(init)
            .filter(|(c, _)| c.restart_policy.as_deref() == Some("Always"))
            .all(|(_, s)| lock(s).ready);
        let containers_ready = initialized && sidecars_ready && main.iter().all(|s| lock(s).ready);
        let any_running = main.iter().any(|s| {
            lock(s)
                .state
                .as_ref()
                .is_some_and(|st| st.running.is_some())
        });
        let phase = phase_final.unwrap_or(if initialized && any_running {
            "Running"
        } else {
            "Pending"
        });
        let cond = |t: &str, ok: bool| PodCondition {
            type_: t.into(),
            status: if ok { "True" } else { "False" }.into(),
            ..Default::default()
        };
        let conditions = vec![
            cond("PodReadyToStartContainers", true),
            cond("Initialized", initialized),
            cond("ContainersReady", containers_ready && phase == "Running"),
            cond("Ready", containers_ready && phase == "Running"),
            cond("PodScheduled", true),
        ];
        let status = json!({
            "phase": phase,
            "hostIP": self.node_ip,
            "hostIPs": [{"ip": self.node_ip}],
            "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}],
            "startTime": self.start_time,
            "conditions": conditions,
            "initContainerStatuses": init_statuses,
            "containerStatuses": main_statuses,
        });
        if self.last.as_ref() == Some(&status) {
            return;
        }
        // Timestamps only on transitions: set them now, compare without.
        let mut with_times = status.clone();
        if let Some(conds) = with_times["conditions"].as_array_mut() {
            for c in conds {
                c["lastTransitionTime"] = json!(now());
            }
        }
        let patch = json!({ "status": with_times });
        match self
            .pods
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => self.last = Some(status),
            Err(e) => tracing::debug!(pod = %self.name, error = %e, "status update"),
        }
    }
}

/// Starts, probes, restarts and stops one container until it is done for
/// good or told to stop (the value is the grace period).
async fn run_container(
    ctx: PodCtx,
    c: Container,
    kind: Kind,
    st: Shared,
    mut stop: watch::Receiver<Option<i64>>,
) {
    let policy = ctx
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.clone())
        .unwrap_or_else(|| "Always".into());
    let target = ProbeTarget {
        ip: ctx.ip,
        node: ctx.node.node_rt.clone(),
        netns: ctx.netns.clone(),
    };
    let mut backoff = Duration::from_millis(500);
    loop {
        if stop.borrow().is_some() {
            return;
        }
        let restarts = lock(&st).restart_count;
        let child = start(&ctx, &c, restarts).await;
        let mut child = match child {
            Ok(child) => child,
            Err(e) => {
                {
                    let mut s = lock(&st);
                    s.state = Some(ContainerState {
                        waiting: Some(ContainerStateWaiting {
                            reason: Some(e.reason().into()),
                            message: Some(e.to_string()),
                        }),
                        ..Default::default()
                    });
                    if kind == Kind::Init && policy == "Never" {
                        s.done = Some(128);
                    }
                }
                ctx.node
                    .log(&format!("{}/{}: {e}", super::pod_key(&ctx.pod), c.name));
                ctx.notify.notify_one();
                if lock(&st).done.is_some() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let pid = child.id().and_then(|p| i32::try_from(p).ok());
        {
            let mut s = lock(&st);
            s.state = Some(ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(now()),
                }),
                ..Default::default()
            });
            s.started = c.startup_probe.is_none();
            s.ready = kind != Kind::Init && s.started && c.readiness_probe.is_none();
        }
        ctx.notify.notify_one();
        let mut startup = c.startup_probe.clone().map(ProbeState::new);
        let mut liveness = c.liveness_probe.clone().map(ProbeState::new);
        let mut readiness = c.readiness_probe.clone().map(ProbeState::new);
        let exit_code: i32 = loop {
            tokio::select! {
                status = child.wait() => {
                    untrack(&ctx, pid);
                    break status.ok().and_then(|s| s.code().or_else(|| {
                        use std::os::unix::process::ExitStatusExt;
                        s.signal().map(|sig| 128 + sig)
                    })).unwrap_or(255);
                }
                _ = stop.changed() => {
                    let grace = stop.borrow().unwrap_or(30);
                    let code = terminate(&mut child, pid, grace).await;
                    untrack(&ctx, pid);
                    set_terminated(&st, code);
                    ctx.notify.notify_one();
                    return;
                }
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if kind == Kind::Init {
                        continue;
                    }
                    let started = lock(&st).started;
                    if !started {
                        if let Some(p) = startup.as_mut() {
                            match p.tick(&c, &target).await {
                                Verdict::Success => {
                                    let mut s = lock(&st);
                                    s.started = true;
                                    s.ready = readiness.is_none();
                                    drop(s);
                                    ctx.notify.notify_one();
                                }
                                Verdict::Failure => {
                                    let code = terminate(&mut child, pid, grace_of(&ctx.pod)).await;
                                    untrack(&ctx, pid);
                                    break code;
                                }
                                Verdict::Pending => {}
                            }
                        }
                        continue;
                    }
                    if let Some(p) = liveness.as_mut()
                        && p.tick(&c, &target).await == Verdict::Failure
                    {
                        let code = terminate(&mut child, pid, grace_of(&ctx.pod)).await;
                        untrack(&ctx, pid);
                        break code;
                    }
                    if let Some(p) = readiness.as_mut() {
                        let verdict = p.tick(&c, &target).await;
                        let mut s = lock(&st);
                        let was = s.ready;
                        match verdict {
                            Verdict::Success => s.ready = true,
                            Verdict::Failure => s.ready = false,
                            Verdict::Pending => {}
                        }
                        if was != s.ready {
                            drop(s);
                            ctx.notify.notify_one();
                        }
                    }
                }
            }
        };
        set_terminated(&st, exit_code);
        let restart = match kind {
            Kind::Sidecar => true,
            Kind::Init => exit_code != 0 && policy != "Never",
            Kind::Main => policy == "Always" || (policy == "OnFailure" && exit_code != 0),
        };
        if !restart {
            lock(&st).done = Some(exit_code);
            ctx.notify.notify_one();
            return;
        }
        {
            let mut s = lock(&st);
            s.restart_count += 1;
            s.last_state = s.state.take();
            s.state = Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("CrashLoopBackOff".into()),
                    message: None,
                }),
                ..Default::default()
            });
        }
        ctx.notify.notify_one();
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn untrack(ctx: &PodCtx, pid: Option<i32>) {
    if let Some(pid) = pid.and_then(|p| u32::try_from(p).ok()) {
        ctx.node.untrack(pid);
    }
}

fn grace_of(pod: &Pod) -> i64 {
    pod.spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30)
}

fn set_terminated(st: &Shared, code: i32) {
    let mut s = lock(st);
    s.ready = false;
    s.state = Some(ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: code,
            reason: Some(if code == 0 { "Completed" } else { "Error" }.into()),
            finished_at: Some(now()),
            ..Default::default()
        }),
        ..Default::default()
    });
}

/// SIGTERM, then SIGKILL after `grace` seconds; returns the exit code.
async fn terminate(child: &mut tokio::process::Child, pid: Option<i32>, grace: i64) -> i32 {
    if let Some(pid) = pid {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let grace = Duration::from_secs(grace.max(0) as u64);
    let status = match tokio::time::timeout(grace, child.wait()).await {
        Ok(s) => s.ok(),
        Err(_) => {
            let _ = child.start_kill();
            child.wait().await.ok()
        }
    };
    status
        .and_then(|s| {
            use std::os::unix::process::ExitStatusExt;
            s.code().or_else(|| s.signal().map(|sig| 128 + sig))
        })
        .unwrap_or(137)
}

async fn start(
    ctx: &PodCtx,
    c: &Container,
    restarts: i32,
) -> Result<tokio::process::Child, KubeletError> {
    let env = container::environment(
        &ctx.node.client,
        &ctx.pod,
        c,
        (&ctx.node.kubernetes_service_ip, 443),
    )
    .await?;
    let argv = container::argv(&ctx.node.images, c, &env)?;
    let mut mounts = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let base = ctx
            .volumes
            .get(&m.name)
            .ok_or_else(|| KubeletError::Volume {
                volume: m.name.clone(),
                detail: format!("container {} mounts an undeclared volume", c.name),
            })?;
        let src = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            // kubelet resolves a subPath once: later volume updates do not reach it.
            Some(sub) => {
                std::fs::canonicalize(base.join(sub)).map_err(|e| KubeletError::Volume {
                    volume: m.name.clone(),
                    detail: format!("subPath {sub}: {e}"),
                })?
            }
            None => base.clone(),
        };
        let dst = PathBuf::from(&m.mount_path);
        ctx.node.ensure_mountpoint(&dst, src.is_dir())?;
        mounts.push((src, dst, m.read_only.unwrap_or(false)));
    }
    let sc = c.security_context.as_ref();
    let psc = ctx
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.security_context.as_ref());
    let uid = sc
        .and_then(|s| s.run_as_user)
        .or_else(|| psc.and_then(|s| s.run_as_user));
    let gid = sc
        .and_then(|s| s.run_as_group)
        .or_else(|| psc.and_then(|s| s.run_as_group));
    let spec = container::ProcessSpec {
        netns: ctx.netns.clone(),
        hostname: ctx.pod.metadata.name.clone().unwrap_or_default(),
        argv,
        env,
        workdir: c.working_dir.clone().unwrap_or_else(|| "/".into()),
        user: uid.map(|u| (u, gid.unwrap_or(0))),
        mounts,
        log: ctx.logs.join(format!("{}-{restarts}.log", c.name)),
    };
    let child = container::spawn(&spec)?;
    if let Some(pid) = child.id() {
        ctx.node.track(pid);
    }
    Ok(child)
}
