//! The ingress gateways: for each `Gateway` of weft's `GatewayClass`, the
//! objects that run it and the status that tells how it runs.
//!
//! ```text
//! Gateway ──render::gateway──► proxy.json (listeners, routes) ──sign──► ConfigMap weft-gateway-<name>
//!         ──► ServiceAccount weft-gateway-<name> (the identity controller issues weft-identity-<sa>)
//!         ──► Deployment weft-gateway-<name>: weft-proxy run, the ConfigMap + identity projected,
//!             each certificate Secret mounted at /var/run/weft-gateway/certs/<secret>
//!         ──► Service weft-gateway-<name> (type from annotation weft.dev/gateway-service-type,
//!             LoadBalancer by default): one port per listener port
//! status: Gateway Accepted/Programmed, listeners, addresses; GatewayClass Accepted
//! ```
//!
//! Every object carries the Gateway as owner, so deleting it deletes them.
//! The gateway proxy never calls the API: certificates and config reach it
//! through kubelet's volume updates, like a sidecar's (decision 1). It
//! runs in any namespace: the identity controller issues its service
//! account an identity also outside the mesh (`identity::is_gateway_account`).
//! Object builders are pure
//! ([`objects`]); [`Gateways::reconcile`] does the I/O after each config
//! batch.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, Secret, SecretVolumeSource,
    SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec, Sysctl, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    Condition, LabelSelector, ObjectMeta, OwnerReference, Time,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use weft_api::MeshSpec;
use weft_api::gateway::{
    Gateway, GatewayClass, GatewayStatusAddress, ListenerStatus, RouteGroupKind,
};

use crate::config::{FIELD_MANAGER, GENERATION_ANNOTATION, HASH_ANNOTATION, SIGNER_ANNOTATION};
use crate::index::Index;
use crate::render::gateway::{GatewayRender, ListenerVerdict, render_gateway};
use crate::signing::ConfigSigner;

/// The Gateway API features weft's gateway supports, as its GatewayClass
/// reports them (`status.supportedFeatures`, sorted by name); the
/// conformance suite runs the tests of these.
pub const SUPPORTED_FEATURES: &[&str] = &[
    "Gateway",
    "GatewayHTTPListenerIsolation",
    "GatewayPort8080",
    "HTTPRoute",
    "HTTPRouteBackendProtocolH2C",
    "HTTPRouteBackendProtocolWebSocket",
    "HTTPRouteBackendTimeout",
    "HTTPRouteHostRewrite",
    "HTTPRouteMethodMatching",
    "HTTPRouteNamedRouteRule",
    "HTTPRouteParentRefPort",
    "HTTPRoutePathRedirect",
    "HTTPRoutePathRewrite",
    "HTTPRoutePortRedirect",
    "HTTPRouteQueryParamMatching",
    "HTTPRouteRequestTimeout",
    "HTTPRouteResponseHeaderModification",
    "HTTPRouteSchemeRedirect",
    "ReferenceGrant",
    "TLSRoute",
];

/// Prefix of every object made for a Gateway.
pub const PREFIX: &str = "weft-gateway-";
/// Annotation on a Gateway choosing its Service's type.
pub const SERVICE_TYPE_ANNOTATION: &str = "weft.dev/gateway-service-type";
/// Where a gateway's certificates are mounted.
pub const CERT_DIR: &str = "/var/run/weft-gateway/certs";
/// Label naming the Gateway on its pods (the Gateway API's convention).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// The objects that run one Gateway.
#[derive(Clone, Debug, PartialEq)]
pub struct GatewayObjects {
    /// Its service account.
    pub service_account: ServiceAccount,
    /// Its signed document.
    pub config_map: ConfigMap,
    /// Its pods.
    pub deployment: Deployment,
    /// Its Service.
    pub service: Service,
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// The volume name of certificate Secret `secret`.
fn cert_volume(i: usize) -> String {
    format!("cert-{i}")
}

/// Builds the objects of a rendered Gateway. `owner`: the Gateway's
/// owner reference; `signature`: `proxy.json.sig` and the signer's
/// fingerprint; `service_type`: the Service's type.
pub fn objects(
    r: &GatewayRender,
    mesh: &MeshSpec,
    owner: &OwnerReference,
    signature: (&str, &str),
    service_type: &str,
) -> GatewayObjects {
    let name = format!("{PREFIX}{}", r.name);
    let labels = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "weft-gateway".to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            FIELD_MANAGER.to_owned(),
        ),
        (GATEWAY_NAME_LABEL.to_owned(), r.name.clone()),
    ]);
    let meta = |annotations: Option<BTreeMap<String, String>>| ObjectMeta {
        name: Some(name.clone()),
        namespace: Some(r.namespace.clone()),
        labels: Some(labels.clone()),
        annotations,
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    };
    let hash = r.config.hash.clone();
    let config_map = ConfigMap {
        metadata: meta(Some(BTreeMap::from([
            (HASH_ANNOTATION.to_owned(), hash),
            (
                GENERATION_ANNOTATION.to_owned(),
                r.config.generation.to_string(),
            ),
            (SIGNER_ANNOTATION.to_owned(), signature.1.to_owned()),
        ]))),
        data: Some(BTreeMap::from([
            (
                weft_proxy_config::FILE_NAME.to_owned(),
                String::from_utf8_lossy(&r.config.to_json()).into_owned(),
            ),
            (
                weft_proxy_config::SIGNATURE_FILE_NAME.to_owned(),
                signature.0.to_owned(),
            ),
        ])),
        ..ConfigMap::default()
    };

    let mut volumes = vec![weft_injector::patch::projected_config_volume(&name, &name)];
    let mut mounts = vec![VolumeMount {
        name: weft_injector::patch::VOLUME.to_owned(),
        mount_path: weft_injector::config::MOUNT_PATH.to_owned(),
        read_only: Some(true),
        ..VolumeMount::default()
    }];
    for (i, secret) in r.certificates.iter().enumerate() {
        volumes.push(Volume {
            name: cert_volume(i),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                default_mode: Some(0o444),
                optional: Some(true),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: cert_volume(i),
            mount_path: format!("{CERT_DIR}/{secret}"),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    let admin = i32::from(weft_injector::config::ADMIN_PORT);
    let mut ports: Vec<ContainerPort> = r
        .ports
        .iter()
        .map(|(_, p)| ContainerPort {
            container_port: i32::from(*p),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        })
        .collect();
    ports.push(ContainerPort {
        name: Some("weft-admin".to_owned()),
        container_port: admin,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    });
    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(admin),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(2),
        ..Probe::default()
    };
    let container = Container {
        name: "weft-gateway".to_owned(),
        image: Some(mesh.injection.proxy_image.clone()),
        image_pull_policy: mesh.injection.image_pull_policy.map(|p| format!("{p:?}")),
        args: Some(vec!["run".to_owned()]),
        env: Some(vec![
            field_env("WEFT_POD_NAME", "metadata.name"),
            field_env("WEFT_POD_NAMESPACE", "metadata.namespace"),
            field_env("WEFT_SERVICE_ACCOUNT", "spec.serviceAccountName"),
            field_env("WEFT_POD_IP", "status.podIP"),
            field_env("WEFT_NODE_NAME", "spec.nodeName"),
            env("WEFT_TRUST_DOMAIN", mesh.trust_domain.clone()),
            env("WEFT_CONFIG_DIR", weft_injector::config::MOUNT_PATH),
            env(
                "WEFT_LABELS_FILE",
                format!("{}/labels", weft_injector::config::MOUNT_PATH),
            ),
            env("WEFT_GATEWAY_CERT_DIR", CERT_DIR),
            env(weft_injector::patch::WORKLOAD_NAME_ENV, name.clone()),
            env(weft_injector::patch::WORKLOAD_KIND_ENV, "Deployment"),
        ]),
        ports: Some(ports),
        readiness_probe: Some(probe("/ready")),
        liveness_probe: Some(probe("/live")),
        volume_mounts: Some(mounts),
        security_context: Some(SecurityContext {
            run_as_user: Some(weft_injector::config::PROXY_UID),
            run_as_group: Some(weft_injector::config::PROXY_UID),
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    // No config hash on the pod template: the proxy reloads its files, and
    // the document lists the gateway's own pods (its Service's endpoints),
    // so a hash there would replace the pods at every rollout, forever.
    let pod_annotations = BTreeMap::from([
        (
            weft_injector::overrides::INJECT.to_owned(),
            "false".to_owned(),
        ),
        ("prometheus.io/scrape".to_owned(), "true".to_owned()),
        ("prometheus.io/port".to_owned(), admin.to_string()),
        ("prometheus.io/path".to_owned(), "/metrics".to_owned()),
    ]);
    let deployment = Deployment {
        metadata: meta(None),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    GATEWAY_NAME_LABEL.to_owned(),
                    r.name.clone(),
                )])),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels.clone()),
                    annotations: Some(pod_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(name.clone()),
                    containers: vec![container],
                    volumes: Some(volumes),
                    security_context: Some(PodSecurityContext {
                        // Listener ports below 1024 without privileges.
                        sysctls: Some(vec![Sysctl {
                            name: "net.ipv4.ip_unprivileged_port_start".to_owned(),
                            value: "0".to_owned(),
                        }]),
                        ..PodSecurityContext::default()
                    }),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    };
    let service = Service {
        metadata: meta(None),
        spec: Some(ServiceSpec {
            type_: Some(service_type.to_owned()),
            selector: Some(BTreeMap::from([(
                GATEWAY_NAME_LABEL.to_owned(),
                r.name.clone(),
            )])),
            ports: Some(
                r.ports
                    .iter()
                    .map(|(listener, p)| ServicePort {
                        name: Some(port_name(listener)),
                        port: i32::from(*p),
                        target_port: Some(IntOrString::Int(i32::from(*p))),
                        protocol: Some("TCP".to_owned()),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    GatewayObjects {
        service_account: ServiceAccount {
            metadata: meta(None),
            ..ServiceAccount::default()
        },
        config_map,
        deployment,
        service,
    }
}

/// A Service port name from a listener name (lower case, at most 15
/// characters of `[a-z0-9-]`).
fn port_name(listener: &str) -> String {
    let mut n: String = listener
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(15)
        .collect();
    n = n.trim_matches('-').to_owned();
    if n.is_empty() {
        "listener".to_owned()
    } else {
        n
    }
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// The status of a Gateway: `Accepted`, `Programmed` (its pods are ready),
/// its listeners and addresses.
pub fn gateway_status(
    r: &GatewayRender,
    ready: bool,
    addresses: &[GatewayStatusAddress],
    now: &Time,
) -> serde_json::Value {
    let g = r.generation;
    let (accepted, reason, message) = match &r.refused {
        Some((reason, message)) => (false, *reason, message.clone()),
        None => (true, "Accepted", "weft runs this Gateway".to_owned()),
    };
    let programmed = accepted && ready;
    let conditions = vec![
        condition("Accepted", accepted, reason, &message, g, now),
        condition(
            "Programmed",
            programmed,
            if programmed { "Programmed" } else { "Pending" },
            if programmed {
                "the gateway's pods are ready"
            } else {
                "waiting for the gateway's pods to be ready"
            },
            g,
            now,
        ),
    ];
    let listeners: Vec<ListenerStatus> = r
        .listeners
        .iter()
        .map(|l| listener_status(l, programmed, g, now))
        .collect();
    json!({"status": {"addresses": addresses, "conditions": conditions, "listeners": listeners}})
}

fn listener_status(
    l: &ListenerVerdict,
    programmed: bool,
    g: Option<i64>,
    now: &Time,
) -> ListenerStatus {
    let (acc_reason, acc_msg) = l
        .refused
        .clone()
        .unwrap_or(("Accepted", "the listener is served".to_owned()));
    let (res_reason, res_msg) = l
        .unresolved
        .clone()
        .unwrap_or(("ResolvedRefs", "every reference resolves".to_owned()));
    let (con_reason, con_msg) = l
        .conflicted
        .clone()
        .unwrap_or(("NoConflicts", "no conflicts".to_owned()));
    let served = l.programmed() && programmed;
    ListenerStatus {
        name: l.name.clone(),
        supported_kinds: if l.refused.is_some() {
            Vec::new()
        } else {
            l.kinds
                .iter()
                .map(|k| RouteGroupKind {
                    group: Some(weft_api::gateway::GROUP.to_owned()),
                    kind: (*k).to_owned(),
                })
                .collect()
        },
        attached_routes: l.attached,
        conditions: vec![
            condition(
                "Accepted",
                l.refused.is_none(),
                acc_reason,
                &acc_msg,
                g,
                now,
            ),
            condition(
                "ResolvedRefs",
                l.unresolved.is_none(),
                res_reason,
                &res_msg,
                g,
                now,
            ),
            condition(
                "Conflicted",
                l.conflicted.is_some(),
                con_reason,
                &con_msg,
                g,
                now,
            ),
            condition(
                "Programmed",
                served,
                if served { "Programmed" } else { "Pending" },
                if served { "served" } else { "not served yet" },
                g,
                now,
            ),
        ],
    }
}

/// Keeps each condition's `lastTransitionTime` when its status holds.
fn keep_times(old: &[Condition], new: &mut [Condition]) {
    for c in new {
        if let Some(o) = old.iter().find(|o| o.type_ == c.type_)
            && o.status == c.status
        {
            c.last_transition_time = o.last_transition_time.clone();
        }
    }
}

/// The I/O half: applies each Gateway's objects and status.
pub struct Gateways {
    client: Client,
    /// Gateway → the hash and generation last written.
    written: tokio::sync::Mutex<BTreeMap<(String, String), (String, u64)>>,
}

impl std::fmt::Debug for Gateways {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateways").finish_non_exhaustive()
    }
}

impl Gateways {
    /// For `client`.
    pub fn new(client: Client) -> Self {
        Gateways {
            client,
            written: tokio::sync::Mutex::default(),
        }
    }

    /// Renders and applies every Gateway of a weft class, and the status of
    /// weft's GatewayClasses. `index` is a snapshot of the config index.
    pub async fn reconcile(&self, index: &Index, signer: &ConfigSigner) {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        for class in index.weft_classes().map(str::to_owned).collect::<Vec<_>>() {
            let features: Vec<serde_json::Value> = SUPPORTED_FEATURES
                .iter()
                .map(|f| json!({"name": f}))
                .collect();
            let api = Api::<GatewayClass>::all(self.client.clone());
            let Ok(current) = api.get_status(&class).await else {
                continue;
            };
            let generation = current.metadata.generation;
            if current.status.as_ref().is_some_and(|s| {
                s.conditions.iter().any(|c| {
                    c.type_ == "Accepted"
                        && c.status == "True"
                        && c.observed_generation == generation
                }) && s
                    .supported_features
                    .iter()
                    .map(|f| f.name.as_str())
                    .eq(SUPPORTED_FEATURES.iter().copied())
            }) {
                continue;
            }
            let body = json!({"status": {
                "conditions": [condition(
                    "Accepted", true, "Accepted", "weft's gateway controller implements this class", generation, &now)],
                "supportedFeatures": features,
            }});
            if let Err(e) = api
                .patch_status(&class, &PatchParams::default(), &Patch::Merge(&body))
                .await
            {
                tracing::warn!(class, error = %e, "cannot write GatewayClass status");
            }
        }
        let gateways: Vec<(String, String)> = index
            .weft_gateways()
            .map(|(ns, name, _)| (ns.to_owned(), name.to_owned()))
            .collect();
        for (ns, name) in gateways {
            if let Err(e) = self.reconcile_one(index, &ns, &name, signer, &now).await {
                tracing::warn!(namespace = %ns, gateway = %name, error = %e, "gateway reconcile failed; retrying at the next change");
            }
        }
    }

    /// The certificate Secrets among `refs` (namespace, name) that exist
    /// and hold a PEM certificate and key, with their `data`.
    async fn usable_secrets(
        &self,
        refs: &[(String, String)],
    ) -> BTreeMap<(String, String), BTreeMap<String, k8s_openapi::ByteString>> {
        let mut out = BTreeMap::new();
        for (sns, sname) in refs {
            let api = Api::<Secret>::namespaced(self.client.clone(), sns);
            let Some(data) = api.get_opt(sname).await.ok().flatten().and_then(|s| s.data) else {
                continue;
            };
            let ok = match (data.get("tls.crt"), data.get("tls.key")) {
                (Some(crt), Some(key)) => usable_certificate(&crt.0, &key.0),
                _ => false,
            };
            if ok {
                out.insert((sns.clone(), sname.clone()), data);
            }
        }
        out
    }

    async fn reconcile_one(
        &self,
        index: &Index,
        ns: &str,
        name: &str,
        signer: &ConfigSigner,
        now: &Time,
    ) -> Result<(), kube::Error> {
        let gw_api = Api::<Gateway>::namespaced(self.client.clone(), ns);
        let Some(gw) = gw_api.get_opt(name).await? else {
            return Ok(());
        };
        // Certificate Secrets the Gateway may use (its namespace's, or
        // another's that a ReferenceGrant there allows), read and checked.
        let refs: Vec<(String, String)> = gw
            .spec
            .listeners
            .iter()
            .flat_map(|l| l.tls.iter().flat_map(|t| &t.certificate_refs))
            .map(|r| {
                (
                    r.namespace.clone().unwrap_or_else(|| ns.to_owned()),
                    r.name.clone(),
                )
            })
            .filter(|(sns, sname)| index.gateway_may_use(ns, sns, sname))
            .collect();
        let secrets = self.usable_secrets(&refs).await;
        let Some(mut r) = render_gateway(index, ns, name, &|sns, sname| {
            secrets.contains_key(&(sns.to_owned(), sname.to_owned()))
        }) else {
            return Ok(());
        };
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let object_name = format!("{PREFIX}{name}");
        // The objects first; the status is written whatever became of them.
        let applied: Result<(), kube::Error> = async {
            // The generation: the written one while the content is the
            // same, the next one when it changed.
            let cm_api = Api::<ConfigMap>::namespaced(self.client.clone(), ns);
            let previous = {
                let memo = self.written.lock().await;
                match memo.get(&(ns.to_owned(), name.to_owned())) {
                    Some(p) => Some(p.clone()),
                    None => cm_api.get_opt(&object_name).await?.and_then(|cm| {
                        let a = cm.annotations();
                        Some((
                            a.get(HASH_ANNOTATION)?.clone(),
                            a.get(GENERATION_ANNOTATION)?.parse().ok()?,
                        ))
                    }),
                }
            };
            let mut generation = previous.as_ref().map_or(1, |p| p.1.max(1));
            r.config.generation = generation;
            r.config.seal();
            if previous.as_ref().is_some_and(|p| p.0 != r.config.hash) {
                generation += 1;
                r.config.generation = generation;
                r.config.seal();
            }
            let signature = signer
                .sign(ns, &r.config.hash)
                .map_err(|e| kube::Error::Service(e.to_string().into()))?;
            let owner = OwnerReference {
                api_version: "gateway.networking.k8s.io/v1".to_owned(),
                kind: "Gateway".to_owned(),
                name: name.to_owned(),
                uid: gw.uid().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            };
            let service_type = gw
                .annotations()
                .get(SERVICE_TYPE_ANNOTATION)
                .cloned()
                .unwrap_or_else(|| "LoadBalancer".to_owned());
            let o = objects(
                &r,
                &index.mesh(),
                &owner,
                (&signature, signer.fingerprint()),
                &service_type,
            );
            let unchanged = previous.as_ref().is_some_and(|p| p.0 == r.config.hash);
            // Certificates of other namespaces: a copy here, kept equal.
            for (sns, sname, copy) in &r.copies {
                let Some(data) = secrets.get(&(sns.clone(), sname.clone())) else {
                    continue;
                };
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(copy.clone()),
                        namespace: Some(ns.to_owned()),
                        labels: Some(BTreeMap::from([
                            (
                                "app.kubernetes.io/managed-by".to_owned(),
                                FIELD_MANAGER.to_owned(),
                            ),
                            (GATEWAY_NAME_LABEL.to_owned(), name.to_owned()),
                        ])),
                        annotations: Some(BTreeMap::from([(
                            "weft.dev/copied-from".to_owned(),
                            format!("{sns}/{sname}"),
                        )])),
                        owner_references: Some(vec![owner.clone()]),
                        ..ObjectMeta::default()
                    },
                    type_: Some("kubernetes.io/tls".to_owned()),
                    data: Some(
                        data.iter()
                            .filter(|(k, _)| *k == "tls.crt" || *k == "tls.key")
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                    ),
                    ..Secret::default()
                };
                Api::<Secret>::namespaced(self.client.clone(), ns)
                    .patch(copy, &params, &Patch::Apply(&secret))
                    .await?;
            }
            Api::<ServiceAccount>::namespaced(self.client.clone(), ns)
                .patch(&object_name, &params, &Patch::Apply(&o.service_account))
                .await?;
            if !unchanged {
                cm_api
                    .patch(&object_name, &params, &Patch::Apply(&o.config_map))
                    .await?;
            }
            Api::<Deployment>::namespaced(self.client.clone(), ns)
                .patch(&object_name, &params, &Patch::Apply(&o.deployment))
                .await?;
            // A Service needs a port: with no listener served there is
            // nothing to expose (an existing one keeps its last ports).
            if !r.ports.is_empty() {
                Api::<Service>::namespaced(self.client.clone(), ns)
                    .patch(&object_name, &params, &Patch::Apply(&o.service))
                    .await?;
            }
            self.written.lock().await.insert(
                (ns.to_owned(), name.to_owned()),
                (r.config.hash.clone(), generation),
            );
            Ok(())
        }
        .await;

        // Status.
        let ready = Api::<Deployment>::namespaced(self.client.clone(), ns)
            .get_opt(&object_name)
            .await?
            .and_then(|d| d.status)
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0)
            > 0;
        let addresses = Api::<Service>::namespaced(self.client.clone(), ns)
            .get_opt(&object_name)
            .await?
            .map(|s| service_addresses(&s))
            .unwrap_or_default();
        let mut body = gateway_status(&r, ready, &addresses, now);
        if let Some(current) = gw.status.as_ref() {
            if let Ok(mut conditions) =
                serde_json::from_value::<Vec<Condition>>(body["status"]["conditions"].clone())
            {
                keep_times(&current.conditions, &mut conditions);
                body["status"]["conditions"] = json!(conditions);
            }
            if let Ok(mut ls) =
                serde_json::from_value::<Vec<ListenerStatus>>(body["status"]["listeners"].clone())
            {
                for l in &mut ls {
                    if let Some(old) = current.listeners.iter().find(|o| o.name == l.name) {
                        keep_times(&old.conditions, &mut l.conditions);
                    }
                }
                body["status"]["listeners"] = json!(ls);
            }
            if serde_json::to_value(current).ok().as_ref() == Some(&body["status"]) {
                return applied;
            }
        }
        gw_api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&body))
            .await?;
        applied
    }
}

/// Whether a TLS Secret's `tls.crt` and `tls.key` are a PEM certificate
/// and a PEM private key (what the gateway can serve).
pub fn usable_certificate(crt: &[u8], key: &[u8]) -> bool {
    use rustls::pki_types::pem::PemObject;
    let cert = rustls::pki_types::CertificateDer::pem_slice_iter(crt)
        .next()
        .and_then(Result::ok)
        .is_some_and(|der| x509_parser::parse_x509_certificate(&der).is_ok());
    cert && rustls::pki_types::PrivateKeyDer::from_pem_slice(key).is_ok()
}

/// The addresses of a gateway's Service: its load balancer's, else its
/// cluster IPs.
pub fn service_addresses(s: &Service) -> Vec<GatewayStatusAddress> {
    let lb: Vec<GatewayStatusAddress> = s
        .status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| match (&i.ip, &i.hostname) {
            (Some(ip), _) => Some(GatewayStatusAddress {
                type_: "IPAddress".to_owned(),
                value: ip.clone(),
            }),
            (None, Some(h)) => Some(GatewayStatusAddress {
                type_: "Hostname".to_owned(),
                value: h.clone(),
            }),
            _ => None,
        })
        .collect();
    if !lb.is_empty() {
        return lb;
    }
    s.spec
        .as_ref()
        .and_then(|sp| sp.cluster_ips.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|ip| ip != "None")
        .map(|ip| GatewayStatusAddress {
            type_: "IPAddress".to_owned(),
            value: ip,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_certificate_is_not_usable() {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["a.example.com".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let (crt, key) = (cert.pem(), key.serialize_pem());
        assert!(usable_certificate(crt.as_bytes(), key.as_bytes()));
        assert!(!usable_certificate(
            b"-----BEGIN CERTIFICATE-----\nnot base64\n",
            key.as_bytes()
        ));
        assert!(!usable_certificate(crt.as_bytes(), b"garbage"));
        assert!(!usable_certificate(b"", b""));
    }

    #[test]
    fn port_names_are_valid_service_port_names() {
        assert_eq!(port_name("https"), "https");
        assert_eq!(
            port_name("HTTP.Main_listener.with.a.long.name"),
            "http-main-liste"
        );
        assert_eq!(port_name("..."), "listener");
    }
}
