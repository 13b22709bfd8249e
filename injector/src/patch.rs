//! The pure patch builder: `Pod` + [`InjectConfig`] → RFC 6902 JSON patch.
//!
//! [`decide`] first selects (host-network pods, opted-out pods and pods that
//! already carry weft are skipped), then applies the pod's override
//! annotations ([`crate::overrides`]), rewrites app probes
//! ([`crate::probes`]) and emits the operations in an order that keeps every
//! index valid while the patch is applied top to bottom:
//!
//! 1. `replace` of rewritten probes (indices of the pod as sent);
//! 2. `weft-init` and, as a native sidecar, `weft-proxy` inserted at the
//!    front of `initContainers` — or, without native sidecars, `weft-init`
//!    appended after the user's init containers (which then keep a working
//!    network: no proxy would run yet to serve their traffic) and the proxy
//!    inserted as `containers[0]` with a `postStart` wait;
//! 3. the projected volume `weft`;
//! 4. the label `weft.dev/proxy=injected` and the annotations.
//!
//! Lists and maps the pod does not have yet are added whole; existing ones
//! get element/member `add`s with RFC 6901 escaping (`/` → `~1`,
//! `~` → `~0`), so the patch applies to any pod the API server accepts.

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapProjection, Container, ContainerPort, DownwardAPIProjection,
    DownwardAPIVolumeFile, EnvVar, EnvVarSource, ExecAction, HTTPGetAction, KeyToPath, Lifecycle,
    LifecycleHandler, ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource, ResourceRequirements,
    SeccompProfile, SecretProjection, SecurityContext, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use crate::config::{
    ADMIN_PORT, INBOUND_CAPTURE_PORT, InjectConfig, MOUNT_PATH, OUTBOUND_CAPTURE_PORT, PROXY_UID,
};
use crate::overrides::{self, OverrideError, PodSettings};
use crate::probes::{self, APP_PROBES_ANNOTATION, APP_PROBES_ENV, AppProbes, ProbeError};

/// Label set on injected pods.
pub const PROXY_LABEL: &str = "weft.dev/proxy";
/// Value of [`PROXY_LABEL`].
pub const PROXY_LABEL_VALUE: &str = "injected";
/// Annotation with the weft version that injected the pod.
pub const VERSION_ANNOTATION: &str = "weft.dev/proxy-version";
/// kubectl's annotation naming the container `kubectl logs/exec` default to.
pub const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";
/// Name of the capture init container.
pub const INIT_CONTAINER: &str = "weft-init";
/// Name of the proxy container.
pub const PROXY_CONTAINER: &str = "weft-proxy";
/// Prometheus's conventional annotations: scrape this pod, on this port and
/// path.
pub const SCRAPE_ANNOTATION: &str = "prometheus.io/scrape";
/// See [`SCRAPE_ANNOTATION`].
pub const SCRAPE_PORT_ANNOTATION: &str = "prometheus.io/port";
/// See [`SCRAPE_ANNOTATION`].
pub const SCRAPE_PATH_ANNOTATION: &str = "prometheus.io/path";
/// The proxy's env naming its pod's workload (see `weft_api::workload`).
pub const WORKLOAD_NAME_ENV: &str = "WEFT_WORKLOAD_NAME";
/// The proxy's env naming its workload's kind.
pub const WORKLOAD_KIND_ENV: &str = "WEFT_WORKLOAD_KIND";
/// Name of the projected volume mounted at [`MOUNT_PATH`].
pub const VOLUME: &str = "weft";
/// Identity Secret name prefix; the service account name follows.
pub const IDENTITY_SECRET_PREFIX: &str = "weft-identity-";
/// Name of the per-namespace proxy config ConfigMap.
pub const PROXY_CONFIG_MAP: &str = "weft-proxy";

/// Why a pod is left as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// `hostNetwork: true`: capture would redirect the node's traffic.
    HostNetwork,
    /// `weft.dev/inject: "false"`.
    OptedOut,
    /// The pod already carries weft (label or containers).
    AlreadyInjected,
}

impl Skip {
    /// Short reason, used as metric label and log field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HostNetwork => "host_network",
            Self::OptedOut => "opted_out",
            Self::AlreadyInjected => "already_injected",
        }
    }
}

/// What the builder decided for a pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Inject with this patch.
    Inject(Patch),
    /// Leave the pod unchanged.
    Skip(Skip),
}

/// A pod weft cannot inject as asked; the message is shown to whoever
/// created the pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// An override annotation has a bad value.
    #[error("weft: invalid annotation {0}")]
    Override(#[from] OverrideError),
    /// A probe cannot be routed through the proxy.
    #[error("weft: cannot rewrite probe of {0}")]
    Probe(#[from] ProbeError),
    /// `weft.dev/inject` holds neither `"true"` nor `"false"`.
    #[error("weft: annotation weft.dev/inject: {0:?} must be \"true\" or \"false\"")]
    InjectAnnotation(String),
    /// The pod already has a volume with weft's volume name.
    #[error("weft: the pod already has a volume named {VOLUME:?}; rename it to let weft inject")]
    VolumeTaken,
    /// The pod has no spec.
    #[error("weft: the pod has no spec")]
    MissingSpec,
    /// `spec.containers` is absent, `null` or empty.
    #[error("weft: the pod has no containers; a Pod needs at least one in spec.containers")]
    NoContainers,
    /// The pod uses the identity Secret of another service account.
    #[error(
        "weft: the pod runs as service account {service_account:?} but uses another service account's identity ({}); a pod may only present its own identity: mount nothing named weft-identity-* (weft mounts the pod's own) or run the pod as that service account",
        .found.join("; ")
    )]
    ForeignIdentity {
        /// The pod's service account.
        service_account: String,
        /// Each reference.
        found: Vec<String>,
    },
    /// The service account name makes the identity Secret name too long.
    #[error(
        "weft: service account name {0:?} is too long: Secret weft-identity-<name> would exceed 253 characters"
    )]
    ServiceAccountTooLong(String),
    /// An app container declares a port the proxy listens on.
    #[error(
        "weft: container {container:?} declares port {port}, which the weft proxy uses (15001, 15006, 15020); move the app to another port or opt the pod out with weft.dev/inject: \"false\""
    )]
    ReservedPort {
        /// Container name.
        container: String,
        /// The port.
        port: i32,
    },
    /// An app container runs as the proxy's uid, whose traffic is never captured.
    #[error(
        "weft: {0} runs as uid 1337, which weft reserves for the proxy: its traffic would bypass the mesh; choose another runAsUser"
    )]
    ReservedUid(String),
}

/// The JSON patch that injects `pod`; empty when the pod is skipped.
pub fn patch(pod: &Pod, cfg: &InjectConfig) -> Result<Patch, PatchError> {
    Ok(match decide(pod, cfg)? {
        Decision::Inject(p) => p,
        Decision::Skip(_) => Patch(Vec::new()),
    })
}

/// Selects and, when selected, builds the patch.
pub fn decide(pod: &Pod, cfg: &InjectConfig) -> Result<Decision, PatchError> {
    let annotations = pod.metadata.annotations.as_ref();
    let Some(spec) = pod.spec.as_ref() else {
        return Err(PatchError::MissingSpec);
    };
    // Before any skip: opting out of injection does not open other identities.
    let found = crate::identity_mounts::foreign_identity_refs(spec);
    if !found.is_empty() {
        return Err(PatchError::ForeignIdentity {
            service_account: crate::identity_mounts::service_account(spec),
            found,
        });
    }
    if spec.host_network == Some(true) {
        return Ok(Decision::Skip(Skip::HostNetwork));
    }
    if let Some(v) = annotations.and_then(|a| a.get(overrides::INJECT)) {
        match v.trim().to_ascii_lowercase().as_str() {
            "false" => return Ok(Decision::Skip(Skip::OptedOut)),
            "true" => {}
            _ => return Err(PatchError::InjectAnnotation(v.clone())),
        }
    }
    if is_injected(pod) {
        return Ok(Decision::Skip(Skip::AlreadyInjected));
    }
    // The API server would refuse such a pod; a patch that adds the proxy
    // would make it valid, or fail on a `null` list.
    if spec.containers.is_empty() {
        return Err(PatchError::NoContainers);
    }
    if spec.volumes.iter().flatten().any(|v| v.name == VOLUME) {
        return Err(PatchError::VolumeTaken);
    }
    let sa = crate::identity_mounts::service_account(spec);
    if IDENTITY_SECRET_PREFIX.len() + sa.len() > 253 {
        return Err(PatchError::ServiceAccountTooLong(sa));
    }
    check_reserved(spec)?;
    let settings = overrides::pod_settings(cfg, annotations)?;

    let mut ops = Vec::new();

    // 1. Probes, with the indices of the pod as sent.
    let mut record = AppProbes {
        version: 1,
        ..AppProbes::default()
    };
    for (i, c) in spec.containers.iter().enumerate() {
        for rw in probes::rewrite_container(c, &mut record)? {
            ops.push(replace(
                &["spec", "containers", &i.to_string(), rw.kind.field()],
                &rw.probe,
            ));
        }
    }
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        // Only restartable (sidecar) init containers may have probes.
        if c.restart_policy.as_deref() == Some("Always") {
            for rw in probes::rewrite_container(c, &mut record)? {
                ops.push(replace(
                    &["spec", "initContainers", &i.to_string(), rw.kind.field()],
                    &rw.probe,
                ));
            }
        }
    }
    let record = (!record.containers.is_empty())
        .then(|| serde_json::to_string(&record).expect("probe records serialize to JSON"));

    // 2. Containers.
    let init = init_container(cfg, &settings);
    let workload = weft_api::workload::workload_of(&pod.metadata);
    let proxy = proxy_container(cfg, &settings, record.as_deref(), workload.as_ref());
    let user_inits = spec.init_containers.as_ref().map_or(0, Vec::len);
    match (cfg.native_sidecar, spec.init_containers.is_some()) {
        (true, false) => ops.push(add(&["spec", "initContainers"], &vec![init, proxy])),
        (true, true) => {
            ops.push(add(&["spec", "initContainers", "0"], &init));
            ops.push(add(&["spec", "initContainers", "1"], &proxy));
        }
        (false, has_inits) => {
            if has_inits {
                ops.push(add(
                    &["spec", "initContainers", &user_inits.to_string()],
                    &init,
                ));
            } else {
                ops.push(add(&["spec", "initContainers"], &vec![init]));
            }
            ops.push(add(&["spec", "containers", "0"], &proxy));
        }
    }

    // 3. The projected volume.
    let volume = projected_volume(&sa);
    if spec.volumes.is_some() {
        ops.push(add(&["spec", "volumes", "-"], &volume));
    } else {
        ops.push(add(&["spec", "volumes"], &vec![volume]));
    }

    // 4. Label and annotations.
    let labels_exist = pod.metadata.labels.is_some();
    ops.push(add_member(
        labels_exist,
        "labels",
        PROXY_LABEL,
        PROXY_LABEL_VALUE,
    ));
    let mut new_annotations: Vec<(&str, String)> = vec![(VERSION_ANNOTATION, cfg.version.clone())];
    if let Some(r) = record {
        new_annotations.push((APP_PROBES_ANNOTATION, r));
    }
    // The conventional scrape annotations, for the proxy's metrics, unless
    // the app already uses them for its own.
    if !annotations.is_some_and(|a| a.contains_key(SCRAPE_ANNOTATION)) {
        new_annotations.push((SCRAPE_ANNOTATION, "true".to_owned()));
        new_annotations.push((SCRAPE_PORT_ANNOTATION, ADMIN_PORT.to_string()));
        new_annotations.push((SCRAPE_PATH_ANNOTATION, "/metrics".to_owned()));
    }
    if !cfg.native_sidecar
        && !annotations.is_some_and(|a| a.contains_key(DEFAULT_CONTAINER_ANNOTATION))
        && let Some(first) = spec.containers.first()
    {
        new_annotations.push((DEFAULT_CONTAINER_ANNOTATION, first.name.clone()));
    }
    if annotations.is_some() {
        for (k, v) in new_annotations {
            ops.push(add_member(true, "annotations", k, &v));
        }
    } else {
        let map: BTreeMap<&str, String> = new_annotations.into_iter().collect();
        ops.push(add(&["metadata", "annotations"], &map));
    }

    Ok(Decision::Inject(Patch(ops)))
}

/// Refuses pods that would collide with the proxy's ports or uid.
fn check_reserved(spec: &k8s_openapi::api::core::v1::PodSpec) -> Result<(), PatchError> {
    const RESERVED: [u16; 3] = [OUTBOUND_CAPTURE_PORT, INBOUND_CAPTURE_PORT, ADMIN_PORT];
    if spec.security_context.as_ref().and_then(|s| s.run_as_user) == Some(PROXY_UID) {
        return Err(PatchError::ReservedUid(
            "the pod securityContext".to_owned(),
        ));
    }
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        if let Some(p) = c
            .ports
            .iter()
            .flatten()
            .find(|p| RESERVED.iter().any(|r| i32::from(*r) == p.container_port))
        {
            return Err(PatchError::ReservedPort {
                container: c.name.clone(),
                port: p.container_port,
            });
        }
        if c.security_context.as_ref().and_then(|s| s.run_as_user) == Some(PROXY_UID) {
            return Err(PatchError::ReservedUid(format!("container {:?}", c.name)));
        }
    }
    Ok(())
}

/// A pod carries weft when it has the label or either weft container.
pub fn is_injected(pod: &Pod) -> bool {
    let labelled = pod
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(PROXY_LABEL));
    let spec = pod.spec.as_ref();
    let has_container = spec.is_some_and(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
            .any(|c| c.name == PROXY_CONTAINER || c.name == INIT_CONTAINER)
    });
    labelled || has_container
}

fn pointer(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("Kubernetes API types serialize to JSON")
}

fn add<T: serde::Serialize>(path: &[&str], value: &T) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: pointer(path),
        value: to_value(value),
    })
}

fn replace<T: serde::Serialize>(path: &[&str], value: &T) -> PatchOperation {
    PatchOperation::Replace(ReplaceOperation {
        path: pointer(path),
        value: to_value(value),
    })
}

/// `add` of one metadata map member, or of the whole map when it is absent.
fn add_member(map_exists: bool, map: &str, key: &str, value: &str) -> PatchOperation {
    if map_exists {
        add(&["metadata", map, key], &value)
    } else {
        add(&["metadata", map], &BTreeMap::from([(key, value)]))
    }
}

fn join<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn image_pull_policy(cfg: &InjectConfig) -> Option<String> {
    cfg.image_pull_policy.map(|p| {
        match p {
            weft_api::mesh::PullPolicy::Always => "Always",
            weft_api::mesh::PullPolicy::IfNotPresent => "IfNotPresent",
            weft_api::mesh::PullPolicy::Never => "Never",
        }
        .to_owned()
    })
}

fn quantities(pairs: &[(&str, Option<&String>)]) -> Option<BTreeMap<String, Quantity>> {
    let map: BTreeMap<String, Quantity> = pairs
        .iter()
        .filter_map(|(k, v)| v.map(|v| ((*k).to_owned(), Quantity(v.clone()))))
        .collect();
    (!map.is_empty()).then_some(map)
}

/// `weft-init`: installs the capture rules, then exits. Root only because
/// iptables needs it; NET_ADMIN and NET_RAW are its only capabilities. Its
/// root filesystem stays writable because iptables-legacy takes its lock
/// file under `/run`.
fn init_container(cfg: &InjectConfig, s: &PodSettings) -> Container {
    let mut inbound = vec![ADMIN_PORT];
    inbound.extend(s.exclude_inbound_ports.iter().filter(|p| **p != ADMIN_PORT));
    let mut args: Vec<String> = [
        "init",
        "--proxy-uid",
        &PROXY_UID.to_string(),
        "--proxy-gid",
        &PROXY_UID.to_string(),
        "--inbound-capture-port",
        &INBOUND_CAPTURE_PORT.to_string(),
        "--outbound-capture-port",
        &OUTBOUND_CAPTURE_PORT.to_string(),
        "--exclude-inbound-ports",
        &join(&inbound),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    if !s.exclude_outbound_ports.is_empty() {
        args.push("--exclude-outbound-ports".into());
        args.push(join(&s.exclude_outbound_ports));
    }
    if !s.exclude_outbound_cidrs.is_empty() {
        args.push("--exclude-outbound-cidrs".into());
        args.push(join(&s.exclude_outbound_cidrs));
    }
    Container {
        name: INIT_CONTAINER.to_owned(),
        image: Some(cfg.proxy_image.clone()),
        image_pull_policy: image_pull_policy(cfg),
        command: Some(vec![PROXY_CONTAINER.to_owned()]),
        args: Some(args),
        resources: Some(ResourceRequirements {
            requests: quantities(&[
                ("cpu", Some(&"10m".to_owned())),
                ("memory", Some(&"10Mi".to_owned())),
            ]),
            limits: quantities(&[("memory", Some(&"64Mi".to_owned()))]),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    }
}

fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn value_env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn admin_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(i32::from(ADMIN_PORT)),
            scheme: Some("HTTP".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Probe::default()
    }
}

fn proxy_container(
    cfg: &InjectConfig,
    s: &PodSettings,
    app_probes: Option<&str>,
    workload: Option<&weft_api::workload::Workload>,
) -> Container {
    let r = &s.resources;
    let mut env = vec![
        field_env("WEFT_POD_NAME", "metadata.name"),
        field_env("WEFT_POD_NAMESPACE", "metadata.namespace"),
        field_env("WEFT_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field_env("WEFT_POD_IP", "status.podIP"),
        field_env("WEFT_NODE_NAME", "spec.nodeName"),
        value_env("WEFT_TRUST_DOMAIN", &cfg.trust_domain),
        value_env("WEFT_LOG_LEVEL", overrides::log_level_str(s.log_level)),
        value_env("WEFT_CONFIG_DIR", MOUNT_PATH),
        value_env("WEFT_LABELS_FILE", format!("{MOUNT_PATH}/labels")),
        value_env("WEFT_ADMIN_PORT", ADMIN_PORT.to_string()),
        value_env(
            "WEFT_INBOUND_CAPTURE_PORT",
            INBOUND_CAPTURE_PORT.to_string(),
        ),
        value_env(
            "WEFT_OUTBOUND_CAPTURE_PORT",
            OUTBOUND_CAPTURE_PORT.to_string(),
        ),
    ];
    if !s.opaque_ports.is_empty() {
        env.push(value_env("WEFT_OPAQUE_PORTS", join(&s.opaque_ports)));
    }
    if let Some(p) = app_probes {
        env.push(value_env(APP_PROBES_ENV, p));
    }
    if let Some(mode) = s.access_log {
        env.push(value_env("WEFT_ACCESS_LOG", mode));
    }
    if let Some(w) = workload {
        env.push(value_env(WORKLOAD_NAME_ENV, &w.name));
        env.push(value_env(WORKLOAD_KIND_ENV, &w.kind));
    }
    let (restart_policy, startup_probe, lifecycle) = if cfg.native_sidecar {
        (
            Some("Always".to_owned()),
            Some(admin_probe("/ready", 1, 120)),
            None,
        )
    } else {
        let wait = Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(
                        [PROXY_CONTAINER, "wait-ready", "--timeout", "120s"]
                            .map(str::to_owned)
                            .to_vec(),
                    ),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        };
        (None, None, Some(wait))
    };
    Container {
        name: PROXY_CONTAINER.to_owned(),
        image: Some(cfg.proxy_image.clone()),
        image_pull_policy: image_pull_policy(cfg),
        command: Some(vec![PROXY_CONTAINER.to_owned()]),
        args: Some(vec!["run".to_owned()]),
        restart_policy,
        ports: Some(vec![ContainerPort {
            name: Some("weft-admin".into()),
            container_port: i32::from(ADMIN_PORT),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        env: Some(env),
        resources: Some(ResourceRequirements {
            requests: quantities(&[
                ("cpu", Some(&r.cpu_request)),
                ("memory", Some(&r.memory_request)),
            ]),
            limits: quantities(&[
                ("cpu", r.cpu_limit.as_ref()),
                ("memory", Some(&r.memory_limit)),
            ]),
            ..ResourceRequirements::default()
        }),
        startup_probe,
        readiness_probe: Some(admin_probe("/ready", 5, 3)),
        liveness_probe: Some(admin_probe("/live", 10, 3)),
        lifecycle,
        security_context: Some(SecurityContext {
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            run_as_non_root: Some(true),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: VOLUME.to_owned(),
            mount_path: MOUNT_PATH.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    }
}

fn key(k: &str) -> KeyToPath {
    KeyToPath {
        key: k.to_owned(),
        path: k.to_owned(),
        mode: None,
    }
}

fn field_file(path: &str, field_path: &str) -> DownwardAPIVolumeFile {
    DownwardAPIVolumeFile {
        path: path.to_owned(),
        field_ref: Some(ObjectFieldSelector {
            field_path: field_path.to_owned(),
            ..ObjectFieldSelector::default()
        }),
        ..DownwardAPIVolumeFile::default()
    }
}

/// One projected volume, so kubelet swaps identity, config and labels in a
/// single atomic `..data` rename. Files are world-readable (0444) because
/// the proxy runs as 1337 while kubelet writes them as root; the volume is
/// mounted into the proxy container only.
///
/// The `weft-proxy` ConfigMap is projected whole (no `items`): it holds
/// either `data` `proxy.json` or, above the operator's gzip threshold,
/// `binaryData` `proxy.json.gz`, never both, and kubelet fails a volume
/// whose non-optional source lists a key the object lacks. Without `items`
/// whichever key exists appears, and a missing ConfigMap still keeps the
/// pod from starting (`optional: false`). It comes first: kubelet lets a
/// later source win a path clash, so no key put in the ConfigMap can
/// replace the identity or the labels.
fn projected_volume(service_account: &str) -> Volume {
    projected_config_volume(PROXY_CONFIG_MAP, service_account)
}

/// The projected volume `weft` of a proxy that reads ConfigMap
/// `config_map` (a sidecar's is the namespace's `weft-proxy`; an ingress
/// gateway's is its own) with the identity of `service_account`.
pub fn projected_config_volume(config_map: &str, service_account: &str) -> Volume {
    Volume {
        name: VOLUME.to_owned(),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(0o444),
            sources: Some(vec![
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: config_map.to_owned(),
                        optional: Some(false),
                        items: None,
                    }),
                    ..VolumeProjection::default()
                },
                VolumeProjection {
                    secret: Some(SecretProjection {
                        name: format!("{IDENTITY_SECRET_PREFIX}{service_account}"),
                        optional: Some(false),
                        items: Some(vec![key("tls.crt"), key("tls.key"), key("ca.crt")]),
                    }),
                    ..VolumeProjection::default()
                },
                VolumeProjection {
                    downward_api: Some(DownwardAPIProjection {
                        items: Some(vec![
                            field_file("labels", "metadata.labels"),
                            field_file("annotations", "metadata.annotations"),
                        ]),
                    }),
                    ..VolumeProjection::default()
                },
            ]),
        }),
        ..Volume::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_tokens_are_escaped() {
        assert_eq!(
            pointer(&["metadata", "annotations", "a~b/c"]).as_str(),
            "/metadata/annotations/a~0b~1c"
        );
        assert_eq!(
            pointer(&["metadata", "labels", PROXY_LABEL]).as_str(),
            "/metadata/labels/weft.dev~1proxy"
        );
    }
}
