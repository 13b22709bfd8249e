//! Workload identities: the reconcilers that keep the mesh CA, every
//! meshed service account's certificate, the injector's serving
//! certificate and the webhook's `caBundle` in the cluster.
//!
//! ```text
//!  Mesh "default" ─┐                          ┌─▶ Secret weft-ca (state of the CA rotation)
//!  Secret weft-ca ─┼─▶ CA loop (run_ca) ──────┼─▶ Secret weft-injector-tls
//!  user CA Secret ─┤   one reconcile at a     ├─▶ Secret weft-config-signer ──▶ ConfigSigner (watch
//!  webhook config ─┘   time, [`ca`] decides   │     channel) to the config writer ([`crate::signing`])
//!                            │                ├─▶ MutatingWebhookConfiguration weft-injector caBundle
//!                            │                └─▶ Mesh status, Events
//!                            │ Signer (watch channel)
//!                            ▼
//!  ServiceAccount ─┐
//!  Namespace ──────┼─▶ identity Controller ────▶ Secret weft-identity-<sa> per meshed namespace
//!  identity Secret ┘   (kube-runtime)
//! ```
//!
//! The CA loop is the only writer of CA state. It publishes a [`Signer`]
//! (active CA + trust bundle + trust domain + TTL); every change of it
//! re-reconciles all service accounts, so a rotation step or a new trust
//! domain reaches every identity Secret. Each identity reconcile requeues
//! itself at its leaf's renewal time (two thirds of the lifetime).
//!
//! Writes are server-side apply with field manager [`FIELD_MANAGER`] and
//! happen only when the desired content differs from what is stored.
//! The decisions ([`plan_identity`], [`observe`], [`mesh_status`]) are
//! pure functions; the async functions around them only read and write.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, OwnerReference, Time};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use weft_api::mesh::{CaStatus, MESH_NAME, Mesh, MeshSpec, MeshStatus, RotationPhase};

use crate::ca::{
    self, CA_CRT, CaError, CaSource, CaState, CertificateAuthority, DesiredCa, LeafDecision,
    LeafInfo, LeafSubject, MissingCa, Observed, RotationTiming, StepOutcome, TLS_CRT, TLS_KEY,
};
use crate::metrics::Metrics;
use crate::signing::ConfigSigner;

/// Field manager of every write.
pub const FIELD_MANAGER: &str = "weft-operator";
/// The Secret holding the mesh CA and its rotation state.
pub const CA_SECRET: &str = "weft-ca";
/// The injector's serving certificate.
pub const INJECTOR_SECRET: &str = "weft-injector-tls";
/// The config signer's Secret in the operator namespace (see
/// [`crate::signing`]).
pub const CONFIG_SIGNER_SECRET: &str = "weft-config-signer";
/// The injector's Service and MutatingWebhookConfiguration name.
pub const INJECTOR_NAME: &str = "weft-injector";
/// Label on identity Secrets: the service account's name.
pub const IDENTITY_LABEL: &str = "weft.dev/identity";
/// Annotation on identity Secrets: the SPIFFE ID in the certificate.
pub const SPIFFE_ANNOTATION: &str = "weft.dev/spiffe-id";
/// Namespace label that puts a namespace in the mesh (value `enabled`).
pub const INJECT_LABEL: &str = "weft.dev/inject";
/// Label marking objects weft manages.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// Name of the identity Secret of a service account.
pub fn identity_secret_name(service_account: &str) -> String {
    format!("weft-identity-{service_account}")
}

/// Whether a namespace is in the mesh.
pub fn is_meshed(ns: &Namespace) -> bool {
    ns.labels().get(INJECT_LABEL).map(String::as_str) == Some("enabled")
}

/// Label values are at most 63 characters; longer service account names
/// are shortened with a hash suffix so the label stays unique.
pub fn identity_label_value(service_account: &str) -> String {
    if service_account.len() <= 63 {
        return service_account.to_owned();
    }
    use sha2::Digest as _;
    let digest = hex::encode(sha2::Sha256::digest(service_account.as_bytes()));
    let cut = service_account
        .char_indices()
        .map(|(i, _)| i)
        .take_while(|&i| i <= 54)
        .last()
        .unwrap_or(0);
    format!(
        "{}-{}",
        service_account[..cut].trim_end_matches(['-', '.']),
        &digest[..8]
    )
}

/// Errors of the identity reconcilers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error(
        "{action}: {source}; check the operator's RBAC (Secrets, ServiceAccounts, Namespaces, Meshes, MutatingWebhookConfigurations) and the API server's health"
    )]
    Kube {
        /// What was attempted.
        action: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// Certificate logic failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The `Mesh` holds a value weft cannot use.
    #[error("Mesh {MESH_NAME}: {0}")]
    InvalidMesh(String),
    /// A name is too long for the objects weft derives from it.
    #[error(
        "service account {namespace}/{name}: the name is too long for Secret {secret:?} (253 characters at most)"
    )]
    NameTooLong {
        /// Namespace.
        namespace: String,
        /// Service account.
        name: String,
        /// The Secret name it would need.
        secret: String,
    },
}

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| Error::Kube { action, source }
}

/// Where the current time comes from; tests drive it with tokio's paused
/// clock.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// What signs workload certificates right now, published by the CA loop.
#[derive(Clone, Debug)]
pub struct Signer {
    /// The active CA.
    pub ca: Arc<CertificateAuthority>,
    /// The trust bundle every identity carries in `ca.crt`.
    pub bundle: String,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Workload certificate lifetime.
    pub ttl: Duration,
}

impl Signer {
    fn same_as(&self, other: &Signer) -> bool {
        self.ca.info().fingerprint == other.ca.info().fingerprint
            && self.bundle == other.bundle
            && self.trust_domain == other.trust_domain
            && self.ttl == other.ttl
    }
}

/// Settings of the identity half, from the command line.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The operator's namespace (`weft-ca`, `weft-injector-tls`).
    pub namespace: String,
    /// How long a new trust bundle must sit in every Secret before leaves
    /// move to a new CA (kubelet's refresh of mounted Secrets).
    pub propagation: Duration,
    /// How often the CA loop looks again when nothing wakes it.
    pub resync: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespace: "weft-system".to_owned(),
            propagation: Duration::from_secs(120),
            resync: Duration::from_secs(300),
        }
    }
}

/// Shared by both reconcilers.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Settings.
    pub settings: Settings,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Time source.
    pub clock: Arc<dyn Clock>,
    signer: watch::Sender<Option<Signer>>,
    config_signer: watch::Sender<Option<Arc<ConfigSigner>>>,
    /// The caBundle last written to or found right in the webhook
    /// configuration: a later difference from the same bundle is an edit.
    webhook_bundle: Mutex<Option<String>>,
    recorder: Recorder,
    namespaces: Mutex<HashMap<String, bool>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context whose events are reported as `reporter`.
    pub fn new(
        client: Client,
        settings: Settings,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        reporter: Reporter,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            metrics,
            clock,
            signer: watch::channel(None).0,
            config_signer: watch::channel(None).0,
            webhook_bundle: Mutex::new(None),
            namespaces: Mutex::new(HashMap::new()),
        }
    }

    /// The signer the identity reconciler uses now.
    pub fn signer(&self) -> Option<Signer> {
        self.signer.borrow().clone()
    }

    /// The config signer, now and as it changes (renewal, CA rotation):
    /// what the config writer signs `proxy.json` with.
    pub fn config_signer(&self) -> watch::Receiver<Option<Arc<ConfigSigner>>> {
        self.config_signer.subscribe()
    }

    /// A Secret weft owns was changed outside weft and is written again:
    /// a Warning Event `IdentityRestored` on it, a log line and
    /// `weft_identity_restored_total`.
    async fn report_restored(&self, secret: &Secret, what: &str, issued: Option<&ca::IssueReason>) {
        self.metrics.identity_restored.inc();
        let how = match issued {
            Some(reason) => {
                format!("its certificate was replaced ({reason}); weft issued a new one")
            }
            None => "its content no longer matched what weft wrote; weft wrote it again".to_owned(),
        };
        tracing::warn!(secret = what, "Secret changed outside weft; restored");
        self.event(
            secret,
            EventType::Warning,
            "IdentityRestored",
            format!("Secret {what} was changed outside weft: {how}. Identities are issued by weft alone."),
        )
        .await;
    }

    async fn event(
        &self,
        obj: &impl Resource<DynamicType = ()>,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let ev = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note.chars().take(1000).collect()),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "could not publish an Event");
        }
    }
}

/// Runs both reconcilers until `shutdown` is cancelled.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    tokio::join!(
        run_ca(ctx.clone(), shutdown.clone()),
        run_identities(ctx, shutdown)
    );
}

// ---------------------------------------------------------------------------
// Identity Secrets, one per service account in a meshed namespace.

/// What the identity reconciler should do for one service account.
#[derive(Clone, Debug, PartialEq)]
pub enum IdentityPlan {
    /// The stored Secret is right; look again at `renew_at`.
    Unchanged {
        /// Renewal time of the stored leaf.
        renew_at: SystemTime,
    },
    /// Apply this Secret.
    Write {
        /// The full desired Secret.
        secret: Box<Secret>,
        /// Renewal time of the leaf in it.
        renew_at: SystemTime,
        /// Why a new leaf was issued, when one was.
        issued: Option<ca::IssueReason>,
    },
}

fn owner_ref(sa: &ServiceAccount) -> Option<OwnerReference> {
    sa.controller_owner_ref(&()).map(|mut o| {
        o.controller = Some(false);
        o.block_owner_deletion = Some(false);
        o
    })
}

/// A leaf certificate and key for a Secret's `tls.crt` and `tls.key`.
struct StoredLeaf {
    crt: Vec<u8>,
    key: Vec<u8>,
    renew_at: SystemTime,
    /// Why it was issued now; none when the stored one is kept.
    issued: Option<ca::IssueReason>,
}

/// The leaf certificate and key `existing` holds, when `ca::decide_leaf`
/// keeps them, else a new leaf for `subject`; with its renewal time and,
/// for a new one, why it was issued.
fn keep_or_issue(
    existing: Option<&Secret>,
    subject: &LeafSubject,
    signer: &Signer,
    now: SystemTime,
) -> Result<StoredLeaf, Error> {
    let stored = existing
        .and_then(|s| s.data.as_ref())
        .and_then(|d| Some((d.get(TLS_CRT)?.0.as_slice(), d.get(TLS_KEY)?.0.as_slice())));
    Ok(
        match ca::decide_leaf(stored, subject, &signer.ca, signer.ttl, now) {
            LeafDecision::Keep { renew_at } => {
                let (c, k) = stored.unwrap_or_default();
                StoredLeaf {
                    crt: c.to_vec(),
                    key: k.to_vec(),
                    renew_at,
                    issued: None,
                }
            }
            LeafDecision::Issue(reason) => {
                let leaf = signer.ca.issue(subject, signer.ttl, now)?;
                StoredLeaf {
                    renew_at: ca::renew_at(leaf.not_before, leaf.not_after),
                    crt: leaf.cert_pem.into_bytes(),
                    key: leaf.key_pem.into_bytes(),
                    issued: Some(reason),
                }
            }
        },
    )
}

/// Decides the identity Secret of `sa` (pure; `now` and the stored Secret
/// are inputs). A new leaf is issued when the stored one is missing,
/// unreadable, edited, for other names, signed by another CA, or due.
pub fn plan_identity(
    sa: &ServiceAccount,
    existing: Option<&Secret>,
    signer: &Signer,
    now: SystemTime,
) -> Result<IdentityPlan, Error> {
    let ns = sa.namespace().unwrap_or_default();
    let name = sa.name_any();
    let secret_name = identity_secret_name(&name);
    if secret_name.len() > 253 {
        return Err(Error::NameTooLong {
            namespace: ns,
            name,
            secret: secret_name,
        });
    }
    let subject = LeafSubject::Workload {
        trust_domain: signer.trust_domain.clone(),
        namespace: ns.clone(),
        service_account: name.clone(),
    };
    let StoredLeaf {
        crt,
        key,
        renew_at,
        issued,
    } = keep_or_issue(existing, &subject, signer, now)?;
    let desired = Secret {
        metadata: ObjectMeta {
            name: Some(secret_name),
            namespace: Some(ns),
            labels: Some(BTreeMap::from([
                (IDENTITY_LABEL.to_owned(), identity_label_value(&name)),
                (MANAGED_BY_LABEL.to_owned(), FIELD_MANAGER.to_owned()),
            ])),
            annotations: Some(BTreeMap::from([(
                SPIFFE_ANNOTATION.to_owned(),
                subject.spiffe_id().unwrap_or_default(),
            )])),
            owner_references: owner_ref(sa).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(BTreeMap::from([
            (TLS_CRT.to_owned(), ByteString(crt)),
            (TLS_KEY.to_owned(), ByteString(key)),
            (
                CA_CRT.to_owned(),
                ByteString(signer.bundle.clone().into_bytes()),
            ),
        ])),
        ..Secret::default()
    };
    if issued.is_none() && existing.is_some_and(|e| covers(e, &desired)) {
        return Ok(IdentityPlan::Unchanged { renew_at });
    }
    Ok(IdentityPlan::Write {
        secret: Box::new(desired),
        renew_at,
        issued,
    })
}

/// Whether writing `desired` over a Secret that exists undoes a change
/// made outside weft: its certificate or key were replaced by something
/// weft would not have written (unreadable, another key, other names), or,
/// with no new leaf needed, something besides the trust bundle differs, or
/// the stored bundle shares no anchor with the desired one (a CA rotation
/// grows and shrinks the bundle one CA at a time, so it always shares one).
/// A renewal, a rotation step or a shortened TTL is not a restore; neither
/// is a first write.
pub fn is_restore(
    existing: Option<&Secret>,
    desired: &Secret,
    issued: Option<&ca::IssueReason>,
) -> bool {
    let Some(existing) = existing else {
        return false;
    };
    match issued {
        Some(
            ca::IssueReason::Unreadable(_)
            | ca::IssueReason::KeyMismatch
            | ca::IssueReason::NamesChanged,
        ) => true,
        Some(_) => false,
        None => {
            let without_bundle = |s: &Secret| {
                let mut s = s.clone();
                if let Some(d) = s.data.as_mut() {
                    d.remove(CA_CRT);
                }
                s
            };
            let anchors = |s: &Secret| {
                secret_data(s, CA_CRT)
                    .and_then(|b| ca::parse_cert_pems(&b, "ca.crt").ok())
                    .unwrap_or_default()
            };
            let (have, want) = (anchors(existing), anchors(desired));
            !covers(&without_bundle(existing), &without_bundle(desired))
                || !have.iter().any(|a| want.contains(a))
        }
    }
}

/// Whether `existing` already holds everything `desired` sets.
fn covers(existing: &Secret, desired: &Secret) -> bool {
    fn sub<V: PartialEq>(
        have: Option<&BTreeMap<String, V>>,
        want: Option<&BTreeMap<String, V>>,
    ) -> bool {
        want.is_none_or(|w| {
            w.iter()
                .all(|(k, v)| have.and_then(|h| h.get(k)) == Some(v))
        })
    }
    let (e, d) = (&existing.metadata, &desired.metadata);
    sub(existing.data.as_ref(), desired.data.as_ref())
        && sub(e.labels.as_ref(), d.labels.as_ref())
        && sub(e.annotations.as_ref(), d.annotations.as_ref())
        && existing.type_ == desired.type_
        && d.owner_references.as_ref().is_none_or(|want| {
            want.iter().all(|w| {
                e.owner_references
                    .as_ref()
                    .is_some_and(|h| h.iter().any(|o| o.uid == w.uid))
            })
        })
}

async fn namespace_meshed(ctx: &Context, ns: &str) -> Result<Option<bool>, Error> {
    if let Some(m) = ctx.namespaces.lock().ok().and_then(|m| m.get(ns).copied()) {
        return Ok(Some(m));
    }
    let got = Api::<Namespace>::all(ctx.client.clone())
        .get_opt(ns)
        .await
        .map_err(kube_err(format!("reading namespace {ns}")))?;
    let meshed = got.as_ref().map(is_meshed);
    if let (Some(m), Ok(mut cache)) = (meshed, ctx.namespaces.lock()) {
        cache.insert(ns.to_owned(), m);
    }
    Ok(meshed)
}

/// Whether `sa` is the service account weft made for a Gateway of its own
/// class (it owns it, by name, and the Gateway exists with that uid): such
/// a gateway is a mesh client wherever it runs, so it gets an identity in
/// a namespace outside the mesh too (decision 28).
async fn is_gateway_account(ctx: &Context, sa: &ServiceAccount) -> bool {
    let ns = sa.namespace().unwrap_or_default();
    let Some(owner) = sa.owner_references().iter().find(|o| {
        o.kind == "Gateway"
            && o.api_version == "gateway.networking.k8s.io/v1"
            && o.controller == Some(true)
    }) else {
        return false;
    };
    if sa.name_any() != format!("{}{}", crate::gateway::PREFIX, owner.name) {
        return false;
    }
    let Ok(Some(gw)) = Api::<weft_api::gateway::Gateway>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&owner.name)
        .await
    else {
        return false;
    };
    if gw.uid().as_deref() != Some(owner.uid.as_str()) {
        return false;
    }
    Api::<weft_api::gateway::GatewayClass>::all(ctx.client.clone())
        .get_opt(&gw.spec.gateway_class_name)
        .await
        .ok()
        .flatten()
        .is_some_and(|c| c.spec.controller_name == weft_api::gateway::GATEWAY_CONTROLLER)
}

async fn reconcile_identity(sa: Arc<ServiceAccount>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = sa.namespace().unwrap_or_default();
    let name = sa.name_any();
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &ns);
    let secret_name = identity_secret_name(&name);
    let mut meshed = namespace_meshed(&ctx, &ns).await?;
    if meshed == Some(false) && is_gateway_account(&ctx, &sa).await {
        meshed = Some(true);
    }
    match meshed {
        Some(true) => {}
        Some(false) => {
            // The namespace left the mesh (or never was in it): remove a
            // Secret weft made, never one it did not.
            if let Some(existing) = secrets
                .get_opt(&secret_name)
                .await
                .map_err(kube_err(format!("reading Secret {ns}/{secret_name}")))?
                && existing.labels().contains_key(IDENTITY_LABEL)
            {
                secrets
                    .delete(&secret_name, &DeleteParams::default())
                    .await
                    .map_err(kube_err(format!("deleting Secret {ns}/{secret_name}")))?;
                tracing::info!(namespace = %ns, service_account = %name, "identity removed: namespace left the mesh");
            }
            return Ok(Action::await_change());
        }
        None => return Ok(Action::await_change()),
    }
    if sa.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let Some(signer) = ctx.signer() else {
        tracing::debug!(namespace = %ns, service_account = %name, "waiting for the mesh CA");
        return Ok(Action::requeue(Duration::from_secs(5)));
    };
    let existing = secrets
        .get_opt(&secret_name)
        .await
        .map_err(kube_err(format!("reading Secret {ns}/{secret_name}")))?;
    let now = ctx.clock.now();
    let renew_at = match plan_identity(&sa, existing.as_ref(), &signer, now)? {
        IdentityPlan::Unchanged { renew_at } => renew_at,
        IdentityPlan::Write {
            secret,
            renew_at,
            issued,
        } => {
            secrets
                .patch(
                    &secret_name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&*secret),
                )
                .await
                .map_err(kube_err(format!("writing Secret {ns}/{secret_name}")))?;
            if is_restore(existing.as_ref(), &secret, issued.as_ref())
                && let Some(e) = existing.as_ref()
            {
                ctx.report_restored(e, &format!("{ns}/{secret_name}"), issued.as_ref())
                    .await;
            }
            if let Some(reason) = issued {
                ctx.metrics.certificates_issued.inc();
                tracing::info!(namespace = %ns, service_account = %name, %reason, "identity certificate issued");
            }
            renew_at
        }
    };
    let next = until(renew_at, now);
    tracing::debug!(namespace = %ns, service_account = %name, next_in = ?next, "identity up to date");
    Ok(Action::requeue(next))
}

/// Time from `now` to `at`, at least one second.
fn until(at: SystemTime, now: SystemTime) -> Duration {
    at.duration_since(now)
        .unwrap_or_default()
        .max(Duration::from_secs(1))
}

fn identity_error_policy(sa: Arc<ServiceAccount>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.renewal_failures.inc();
    tracing::warn!(
        namespace = %sa.namespace().unwrap_or_default(),
        service_account = %sa.name_any(),
        error = %err,
        "identity reconcile failed"
    );
    let note = err.to_string();
    tokio::spawn(async move {
        ctx.event(&*sa, EventType::Warning, "IdentityFailed", note)
            .await;
    });
    Action::requeue(Duration::from_secs(15))
}

async fn run_identities(ctx: Arc<Context>, shutdown: CancellationToken) {
    let client = ctx.client.clone();
    let controller = Controller::new(
        Api::<ServiceAccount>::all(client.clone()),
        watcher::Config::default(),
    );
    let sa_store = controller.store();
    let ns_ctx = ctx.clone();
    let signer_changes = tokio_stream_of(ctx.signer.subscribe()).map(|()| ());
    controller
        .owns(
            Api::<Secret>::all(client.clone()),
            watcher::Config::default().labels(IDENTITY_LABEL),
        )
        .watches(
            Api::<Namespace>::all(client),
            watcher::Config::default(),
            move |ns: Namespace| {
                let name = ns.name_any();
                let meshed = ns.metadata.deletion_timestamp.is_none() && is_meshed(&ns);
                if let Ok(mut cache) = ns_ctx.namespaces.lock() {
                    cache.insert(name.clone(), meshed);
                }
                sa_store
                    .state()
                    .into_iter()
                    .filter(|sa| sa.namespace().as_deref() == Some(name.as_str()))
                    .map(|sa| ObjectRef::from_obj(&*sa))
                    .collect::<Vec<_>>()
            },
        )
        .reconcile_all_on(signer_changes)
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile_identity, identity_error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "identity controller");
            }
        })
        .await;
}

/// A stream that yields once per change of a watch channel.
fn tokio_stream_of<T: Send + Sync + 'static>(
    rx: watch::Receiver<T>,
) -> impl futures::Stream<Item = ()> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    })
}

// ---------------------------------------------------------------------------
// The CA loop: weft-ca, rotation, injector certificate, webhook, status.

/// What the CA loop sees in the identity Secrets and the injector.
pub fn observe(
    secrets: &[Secret],
    extra_bundles: &[Option<&[u8]>],
    state: &CaState,
) -> (Observed, Option<SystemTime>) {
    let next = state.next_anchor();
    let carries = |bundle: Option<&[u8]>| match &next {
        None => true,
        Some(anchor) => bundle.is_some_and(|b| contains(b, anchor.as_bytes())),
    };
    let mut obs = Observed {
        bundles_carry_next: extra_bundles.iter().all(|b| carries(*b)),
        leaves_on_active: true,
        latest_leaf_expiry: None,
    };
    let mut earliest: Option<SystemTime> = None;
    for s in secrets {
        let data = s.data.as_ref();
        let get = |k: &str| data.and_then(|d| d.get(k)).map(|b| b.0.as_slice());
        obs.bundles_carry_next &= carries(get(CA_CRT));
        match LeafInfo::parse(
            get(TLS_CRT).unwrap_or_default(),
            get(TLS_KEY).unwrap_or_default(),
        ) {
            Ok(leaf) => {
                obs.leaves_on_active &= state.active.signed(&leaf);
                obs.latest_leaf_expiry = Some(
                    obs.latest_leaf_expiry
                        .map_or(leaf.not_after, |t| t.max(leaf.not_after)),
                );
                earliest = Some(earliest.map_or(leaf.not_after, |t| t.min(leaf.not_after)));
            }
            Err(_) => obs.leaves_on_active = false,
        }
    }
    (obs, earliest)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn ca_status(ca: &CertificateAuthority) -> CaStatus {
    CaStatus {
        fingerprint: ca.info().fingerprint.clone(),
        subject: ca.info().subject.clone(),
        not_after: ca::rfc3339(ca.info().not_after),
        source: ca.source().as_str().to_owned(),
    }
}

fn anchor_status(pem: &str) -> Option<CaStatus> {
    let ders = ca::parse_cert_pems(pem.as_bytes(), "anchor").ok()?;
    let der = ders.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    use sha2::Digest as _;
    Some(CaStatus {
        fingerprint: hex::encode(sha2::Sha256::digest(der)),
        subject: cert.subject().to_string(),
        not_after: ca::rfc3339(
            UNIX_EPOCH
                + Duration::from_secs(cert.validity().not_after.timestamp().max(0).unsigned_abs()),
        ),
        source: "Previous".to_owned(),
    })
}

/// A status condition: (type, true?, reason, message).
pub type Cond = (&'static str, bool, String, String);

/// The `Mesh` status for the current state (pure). Transition times of
/// conditions whose status did not change are kept from `previous`.
pub fn mesh_status(
    state: Option<&CaState>,
    identities: i64,
    conditions: &[Cond],
    previous: Option<&MeshStatus>,
    generation: Option<i64>,
    now: SystemTime,
) -> MeshStatus {
    let mut trusted = Vec::new();
    if let Some(st) = state {
        trusted.push(ca_status(&st.active));
        if let Some(n) = &st.next {
            trusted.push(ca_status(n));
        }
        if let Some(p) = st.previous.as_deref().and_then(anchor_status) {
            trusted.push(p);
        }
    }
    let ts = k8s_openapi::jiff::Timestamp::try_from(now)
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    let conditions = conditions
        .iter()
        .map(|(type_, ok, reason, message)| {
            let status = if *ok { "True" } else { "False" }.to_owned();
            let kept = previous
                .and_then(|p| p.conditions.iter().find(|c| c.type_ == *type_))
                .filter(|c| c.status == status)
                .map(|c| c.last_transition_time.clone());
            Condition {
                type_: (*type_).to_owned(),
                status,
                reason: reason.clone(),
                message: message.clone(),
                observed_generation: generation,
                last_transition_time: kept.unwrap_or(Time(ts)),
            }
        })
        .collect();
    MeshStatus {
        observed_generation: generation,
        conditions,
        active_ca: state.map(|s| ca_status(&s.active)),
        trusted_cas: trusted,
        rotation_phase: state.map_or(RotationPhase::Stable, |s| s.phase),
        identities_issued: identities,
    }
}

/// The injector's DNS names in `namespace`.
pub fn injector_dns_names(namespace: &str) -> Vec<String> {
    vec![
        format!("{INJECTOR_NAME}.{namespace}.svc"),
        format!("{INJECTOR_NAME}.{namespace}.svc.cluster.local"),
    ]
}

fn secret_data(s: &Secret, k: &str) -> Option<Vec<u8>> {
    s.data.as_ref().and_then(|d| d.get(k)).map(|b| b.0.clone())
}

/// One pass of the CA loop; returns when it wants to run again.
async fn reconcile_ca(ctx: &Context) -> Result<Duration, Error> {
    let now = ctx.clock.now();
    let client = ctx.client.clone();
    let op_ns = ctx.settings.namespace.clone();
    let meshes = Api::<Mesh>::all(client.clone());
    let mesh = meshes
        .get_opt(MESH_NAME)
        .await
        .map_err(kube_err("reading Mesh default"))?;
    let spec = mesh
        .as_ref()
        .map(|m| m.spec.clone())
        .unwrap_or_else(MeshSpec::default);
    let mut conds: Vec<Cond> = Vec::new();

    let ttl = spec
        .certificates
        .ttl
        .to_std()
        .map_err(|e| Error::InvalidMesh(format!("certificates.ttl: {e}")))?;
    let ca_ttl = spec
        .certificates
        .ca_ttl
        .to_std()
        .map_err(|e| Error::InvalidMesh(format!("certificates.caTtl: {e}")))?;
    let timing = RotationTiming {
        leaf_ttl: ttl,
        ca_ttl,
        propagation: ctx.settings.propagation,
    };
    let td = spec.trust_domain.clone();

    // The CA the Mesh asks for. A user CA that fails its checks is
    // reported and ignored: the CA in weft-ca keeps signing, and without
    // one nothing is issued; a generated CA never takes its place.
    let user_ca = match &spec.certificates.ca_secret_ref {
        None => None,
        Some(r) => {
            let ns = r.namespace.clone().unwrap_or_else(|| op_ns.clone());
            let found = Api::<Secret>::namespaced(client.clone(), &ns)
                .get_opt(&r.name)
                .await
                .map_err(kube_err(format!("reading CA Secret {ns}/{}", r.name)))?;
            Some(match found {
                None => Err(format!(
                    "CA Secret {ns}/{} named by the Mesh does not exist",
                    r.name
                )),
                Some(s) => CertificateAuthority::from_pem(
                    &secret_data(&s, TLS_CRT).unwrap_or_default(),
                    &secret_data(&s, TLS_KEY).unwrap_or_default(),
                    now,
                    CaSource::User,
                )
                .map_err(|e| format!("CA Secret {ns}/{}: {e}", r.name)),
            })
        }
    };
    let desired = DesiredCa::from_mesh(user_ca, spec.certificates.rotate_ca.clone());

    // The stored state. A weft-ca Secret that cannot be read is reported
    // and left alone: replacing it would cut every workload off.
    let ca_secrets = Api::<Secret>::namespaced(client.clone(), &op_ns);
    let stored = ca_secrets
        .get_opt(CA_SECRET)
        .await
        .map_err(kube_err(format!("reading Secret {op_ns}/{CA_SECRET}")))?;
    let identity_secrets = Api::<Secret>::all(client.clone())
        .list(&ListParams::default().labels(IDENTITY_LABEL))
        .await
        .map_err(kube_err("listing identity Secrets"))?
        .items;
    if let Err(msg) = &desired {
        let (msg, consequence) = if stored.is_some() {
            (
                format!("{msg}; the CA in Secret {op_ns}/{CA_SECRET} keeps signing"),
                "keeping the current CA",
            )
        } else {
            (
                format!(
                    "{msg}; Secret {op_ns}/{CA_SECRET} does not exist either, so no CA signs: no identity is issued or renewed until the user CA Secret holds a valid CA (a generated CA never replaces a configured user CA)"
                ),
                "issuing nothing",
            )
        };
        tracing::error!(error = %msg, "user CA unusable; {consequence}. Check the Secret named by Mesh {MESH_NAME} spec.certificates.caSecretRef: it must exist and hold tls.crt and tls.key of an unexpired CA with keyCertSign");
        conds.push(("CAValid", false, "InvalidUserCA".into(), msg.clone()));
        if let Some(m) = &mesh {
            ctx.event(m, EventType::Warning, "InvalidUserCA", msg).await;
        }
    }
    let mut missing = None;
    let mut state = match &stored {
        Some(s) => {
            let data: BTreeMap<String, Vec<u8>> = s
                .data
                .clone()
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            match CaState::from_secret(&data, s.annotations(), now) {
                Ok(st) => Some(st),
                Err(e) => {
                    let msg = format!("Secret {op_ns}/{CA_SECRET}: {e}");
                    conds.push(("CAValid", false, "CAStateInvalid".into(), msg.clone()));
                    if let Some(m) = &mesh {
                        ctx.event(m, EventType::Warning, "CAStateInvalid", msg)
                            .await;
                    }
                    None
                }
            }
        }
        None => {
            let prior = ca::PriorCa {
                identities: identity_secrets.len(),
                known_ca: ctx
                    .signer()
                    .map(|s| s.ca.info().fingerprint.clone())
                    .or_else(|| {
                        mesh.as_ref()
                            .and_then(|m| m.status.as_ref())
                            .and_then(|s| s.active_ca.as_ref())
                            .map(|a| a.fingerprint.clone())
                    }),
            };
            match (&desired, ca::on_missing_ca(desired.as_ref(), &prior)) {
                (Ok(d), plan) if plan != MissingCa::IssueNothing => {
                    missing = Some((plan, prior));
                    Some(CaState::initial(d, &td, &timing, now)?)
                }
                _ => None,
            }
        }
    };
    let webhooks = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let webhook = webhooks
        .get_opt(INJECTOR_NAME)
        .await
        .map_err(kube_err(format!(
            "reading MutatingWebhookConfiguration {INJECTOR_NAME}"
        )))?;
    let injector_secret = ca_secrets
        .get_opt(INJECTOR_SECRET)
        .await
        .map_err(kube_err(format!(
            "reading Secret {op_ns}/{INJECTOR_SECRET}"
        )))?;
    let config_signer_secret = ca_secrets
        .get_opt(CONFIG_SIGNER_SECRET)
        .await
        .map_err(kube_err(format!(
            "reading Secret {op_ns}/{CONFIG_SIGNER_SECRET}"
        )))?;

    let mut wake = ctx.settings.resync;
    let mut earliest: Option<SystemTime> = None;
    if let Some(st) = state.as_mut() {
        let webhook_bundles: Vec<Vec<u8>> = webhook
            .iter()
            .flat_map(|w| w.webhooks.iter().flatten())
            .map(|w| {
                w.client_config
                    .ca_bundle
                    .as_ref()
                    .map(|b| b.0.clone())
                    .unwrap_or_default()
            })
            .collect();
        let injector_bundle = injector_secret
            .as_ref()
            .and_then(|s| secret_data(s, CA_CRT));
        let mut extra: Vec<Option<&[u8]>> =
            webhook_bundles.iter().map(|b| Some(b.as_slice())).collect();
        extra.push(injector_bundle.as_deref());
        let (observed, leaf_earliest) = observe(&identity_secrets, &extra, st);
        earliest = leaf_earliest;
        if let Ok(d) = &desired
            && let StepOutcome::Changed(msg) = st.step(d, &observed, &td, &timing, now)?
        {
            tracing::info!(phase = ca::phase_name(st.phase), "{msg}");
            if let Some(m) = &mesh {
                ctx.event(m, EventType::Normal, "CARotation", msg).await;
            }
        }

        // weft-ca: written only when its content changes.
        let (data, annotations) = st.to_secret();
        let desired_ca = Secret {
            metadata: ObjectMeta {
                name: Some(CA_SECRET.to_owned()),
                namespace: Some(op_ns.clone()),
                labels: Some(BTreeMap::from([(
                    MANAGED_BY_LABEL.to_owned(),
                    FIELD_MANAGER.to_owned(),
                )])),
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".to_owned()),
            data: Some(data.into_iter().map(|(k, v)| (k, ByteString(v))).collect()),
            ..Secret::default()
        };
        if !stored
            .as_ref()
            .is_some_and(|s| covers(s, &desired_ca) && same_keys(s, &desired_ca))
        {
            ca_secrets
                .patch(
                    CA_SECRET,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&desired_ca),
                )
                .await
                .map_err(kube_err(format!("writing Secret {op_ns}/{CA_SECRET}")))?;
        }
        if let Some((plan, prior)) = &missing {
            report_missing_ca(ctx, mesh.as_ref(), *plan, prior, st, &op_ns).await;
        }

        let active_expired = st.active.info().not_after <= now;
        if active_expired {
            let msg = format!(
                "the active CA {} expired at {}; set Mesh certificates.rotateCa (generated CA) or replace the CA Secret",
                st.active.info().subject,
                ca::rfc3339(st.active.info().not_after)
            );
            conds.push(("CAValid", false, "CAExpired".into(), msg.clone()));
            if let Some(m) = &mesh {
                ctx.event(m, EventType::Warning, "CAExpired", msg).await;
            }
            ctx.signer.send_replace(None);
        } else {
            let signer = Signer {
                ca: st.active.clone(),
                bundle: st.bundle(),
                trust_domain: td.clone(),
                ttl,
            };
            ctx.signer.send_if_modified(|cur| {
                if cur.as_ref().is_some_and(|c| c.same_as(&signer)) {
                    false
                } else {
                    *cur = Some(signer.clone());
                    true
                }
            });
            let injector_renew =
                reconcile_injector(ctx, &ca_secrets, injector_secret.as_ref(), &signer, now)
                    .await?;
            wake = wake.min(until(injector_renew, now));
            let signer_renew = reconcile_config_signer(
                ctx,
                &ca_secrets,
                config_signer_secret.as_ref(),
                &signer,
                now,
            )
            .await?;
            wake = wake.min(until(signer_renew, now));
            reconcile_webhook(ctx, &webhooks, webhook.as_ref(), &signer.bundle).await?;
        }
        let ca_expiry = st.active.info().not_after;
        earliest = Some(earliest.map_or(ca_expiry, |t| t.min(ca_expiry)));
        if let Some(at) = st.wake_at(&timing) {
            wake = wake.min(until(at, now));
        }
        if st.phase != RotationPhase::Stable {
            wake = wake.min(Duration::from_secs(10));
        }
    } else {
        ctx.signer.send_replace(None);
    }

    if let Some(t) = earliest {
        let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        ctx.metrics
            .earliest_expiry
            .set(i64::try_from(secs).unwrap_or(i64::MAX));
    }
    let issued = i64::try_from(identity_secrets.len()).unwrap_or(i64::MAX);
    ctx.metrics.identities.set(issued);

    if !conds.iter().any(|c| c.0 == "CAValid") {
        let msg = state.as_ref().map_or_else(String::new, |s| {
            format!(
                "{} CA {} signs workload certificates",
                s.active.source().as_str(),
                s.active.info().subject
            )
        });
        conds.push((
            "CAValid",
            state.is_some(),
            if state.is_some() { "Valid" } else { "NoCA" }.into(),
            msg,
        ));
    }
    let ca_ok = conds.iter().all(|c| c.1) && state.is_some();
    let ready_msg = if ca_ok {
        format!("{issued} workload identities issued")
    } else {
        "no usable CA: workload certificates are not issued or renewed; see condition CAValid"
            .to_owned()
    };
    conds.push((
        "Ready",
        ca_ok,
        if ca_ok { "Issued" } else { "CAUnavailable" }.into(),
        ready_msg,
    ));

    if let Some(m) = &mesh {
        let status = mesh_status(
            state.as_ref(),
            issued,
            &conds,
            m.status.as_ref(),
            m.metadata.generation,
            now,
        );
        if m.status.as_ref() != Some(&status) {
            let patch = json!({
                "apiVersion": "weft.dev/v1alpha1",
                "kind": "Mesh",
                "status": status,
            });
            meshes
                .patch_status(
                    MESH_NAME,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
                .map_err(kube_err("writing Mesh default status"))?;
        }
    }
    Ok(wake)
}

/// Tells what became of a missing `weft-ca`, once it is written again: a
/// log line for every case, and for a deleted one a Warning Event on the
/// `Mesh` (`CARegenerated`, counted in `weft_ca_regenerated_total`, or
/// `CARestored`).
async fn report_missing_ca(
    ctx: &Context,
    mesh: Option<&Mesh>,
    plan: MissingCa,
    prior: &ca::PriorCa,
    st: &CaState,
    op_ns: &str,
) {
    let subject = &st.active.info().subject;
    let source = st.active.source().as_str();
    let before = format!(
        "{} identity Secrets exist{}",
        prior.identities,
        prior
            .known_ca
            .as_ref()
            .map_or_else(String::new, |f| format!(", the mesh CA was {f}"))
    );
    let (reason, msg) = match plan {
        MissingCa::Create => {
            tracing::info!(%subject, source, "mesh CA created");
            return;
        }
        MissingCa::IssueNothing => return,
        MissingCa::Regenerate => {
            ctx.metrics.ca_regenerated.inc();
            (
                "CARegenerated",
                format!(
                    "Secret {op_ns}/{CA_SECRET} was missing although the mesh had a CA ({before}); generated a new CA {subject} ({}): every identity, the injector's certificate and the webhook's caBundle are being re-issued from it, and pods trust it once kubelet has delivered their new Secrets. Find out who deleted the Secret (API audit log) and restrict delete on Secrets in {op_ns}",
                    st.active.info().fingerprint
                ),
            )
        }
        MissingCa::Restore => (
            "CARestored",
            format!(
                "Secret {op_ns}/{CA_SECRET} was missing although the mesh had a CA ({before}); written again from the user CA {subject}: identities it signed are kept, any other is re-issued. Find out who deleted the Secret (API audit log) and restrict delete on Secrets in {op_ns}"
            ),
        ),
    };
    tracing::warn!(reason, "{msg}");
    if let Some(m) = mesh {
        ctx.event(m, EventType::Warning, reason, msg).await;
    }
}

/// Whether `existing` has no data keys beyond `desired`'s (a finished
/// rotation drops `next.*` and `previous.crt`).
fn same_keys(existing: &Secret, desired: &Secret) -> bool {
    let keys = |s: &Secret| {
        s.data
            .as_ref()
            .map(|d| d.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    keys(existing) == keys(desired)
}

/// Keeps a Secret `name` in the operator namespace holding a leaf for
/// `subject` (`tls.crt`, `tls.key`, and the trust bundle in `ca.crt`),
/// issuing one when [`ca::decide_leaf`] says so. Returns when to look again
/// and the `tls.crt` and `tls.key` now in the Secret.
async fn reconcile_operator_leaf(
    ctx: &Context,
    secrets: &Api<Secret>,
    name: &str,
    existing: Option<&Secret>,
    subject: &LeafSubject,
    signer: &Signer,
    now: SystemTime,
) -> Result<StoredLeaf, Error> {
    let leaf = keep_or_issue(existing, subject, signer, now)?;
    let desired = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(ctx.settings.namespace.clone()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_owned(),
                FIELD_MANAGER.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(BTreeMap::from([
            (TLS_CRT.to_owned(), ByteString(leaf.crt.clone())),
            (TLS_KEY.to_owned(), ByteString(leaf.key.clone())),
            (
                CA_CRT.to_owned(),
                ByteString(signer.bundle.clone().into_bytes()),
            ),
        ])),
        ..Secret::default()
    };
    let issued = leaf.issued.is_some();
    if issued || !existing.is_some_and(|e| covers(e, &desired)) {
        if is_restore(existing, &desired, leaf.issued.as_ref())
            && let Some(e) = existing
        {
            ctx.report_restored(
                e,
                &format!("{}/{name}", ctx.settings.namespace),
                leaf.issued.as_ref(),
            )
            .await;
        }
        secrets
            .patch(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&desired),
            )
            .await
            .map_err(kube_err(format!(
                "writing Secret {}/{name}",
                ctx.settings.namespace
            )))?;
        if issued {
            ctx.metrics.certificates_issued.inc();
            tracing::info!(secret = name, reason = ?leaf.issued, "operator certificate issued");
        }
    }
    Ok(leaf)
}

/// The injector's serving certificate; returns when to look again.
async fn reconcile_injector(
    ctx: &Context,
    secrets: &Api<Secret>,
    existing: Option<&Secret>,
    signer: &Signer,
    now: SystemTime,
) -> Result<SystemTime, Error> {
    let subject = LeafSubject::Server {
        dns_names: injector_dns_names(&ctx.settings.namespace),
    };
    let leaf = reconcile_operator_leaf(
        ctx,
        secrets,
        INJECTOR_SECRET,
        existing,
        &subject,
        signer,
        now,
    )
    .await?;
    Ok(leaf.renew_at)
}

/// The config signer's certificate and key, published to the config
/// writer when they change; returns when to look again.
async fn reconcile_config_signer(
    ctx: &Context,
    secrets: &Api<Secret>,
    existing: Option<&Secret>,
    signer: &Signer,
    now: SystemTime,
) -> Result<SystemTime, Error> {
    let subject = LeafSubject::ConfigSigner {
        trust_domain: signer.trust_domain.clone(),
    };
    let leaf = reconcile_operator_leaf(
        ctx,
        secrets,
        CONFIG_SIGNER_SECRET,
        existing,
        &subject,
        signer,
        now,
    )
    .await?;
    let loaded = ConfigSigner::from_pem(&leaf.crt, &leaf.key)?;
    ctx.config_signer.send_if_modified(|cur| {
        if cur
            .as_ref()
            .is_some_and(|c| c.fingerprint() == loaded.fingerprint())
        {
            false
        } else {
            tracing::info!(fingerprint = loaded.fingerprint(), "config signer in use");
            *cur = Some(Arc::new(loaded));
            true
        }
    });
    Ok(leaf.renew_at)
}

async fn reconcile_webhook(
    ctx: &Context,
    api: &Api<MutatingWebhookConfiguration>,
    existing: Option<&MutatingWebhookConfiguration>,
    bundle: &str,
) -> Result<(), Error> {
    let Some(cfg) = existing else {
        tracing::debug!("MutatingWebhookConfiguration {INJECTOR_NAME} not installed yet");
        return Ok(());
    };
    let hooks = cfg.webhooks.as_deref().unwrap_or_default();
    let stale = hooks.iter().any(|w| {
        w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(bundle.as_bytes())
    });
    let edited = ctx
        .webhook_bundle
        .lock()
        .map(|last| stale && last.as_deref() == Some(bundle))
        .unwrap_or(false);
    if !stale {
        if let Ok(mut last) = ctx.webhook_bundle.lock() {
            *last = Some(bundle.to_owned());
        }
        return Ok(());
    }
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(bundle);
    let patch = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": INJECTOR_NAME },
        "webhooks": hooks.iter().map(|w| json!({
            "name": w.name,
            "clientConfig": { "caBundle": b64 },
        })).collect::<Vec<_>>(),
    });
    api.patch(
        INJECTOR_NAME,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(kube_err(format!(
        "writing caBundle of MutatingWebhookConfiguration {INJECTOR_NAME}"
    )))?;
    tracing::info!("webhook caBundle updated to the trust bundle");
    if let Ok(mut last) = ctx.webhook_bundle.lock() {
        *last = Some(bundle.to_owned());
    }
    if edited {
        ctx.metrics.identity_restored.inc();
        tracing::warn!("webhook caBundle changed outside weft; restored");
        ctx.event(
            cfg,
            EventType::Warning,
            "CABundleRestored",
            format!("the caBundle of MutatingWebhookConfiguration {INJECTOR_NAME} was changed outside weft; weft wrote the mesh trust bundle back"),
        )
        .await;
    }
    Ok(())
}

/// Runs the CA loop until `shutdown`: reconciles on every change of the
/// Mesh, of Secrets in the operator namespace and of the webhook
/// configuration, at the time the state asks for, and after failures with
/// exponential backoff (1 s doubling to 5 min).
pub async fn run_ca(ctx: Arc<Context>, shutdown: CancellationToken) {
    let client = ctx.client.clone();
    let mesh_events = watcher(Api::<Mesh>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .map(|_| ());
    let secret_events = watcher(
        Api::<Secret>::namespaced(client.clone(), &ctx.settings.namespace),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|_| ());
    let webhook_events = watcher(
        Api::<MutatingWebhookConfiguration>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={INJECTOR_NAME}")),
    )
    .default_backoff()
    .map(|_| ());
    let mut triggers = futures::stream::select_all([
        mesh_events.boxed(),
        secret_events.boxed(),
        webhook_events.boxed(),
    ]);
    let mut failures: u32 = 0;
    loop {
        let wait = match reconcile_ca(&ctx).await {
            Ok(wake) => {
                failures = 0;
                wake
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                ctx.metrics.renewal_failures.inc();
                tracing::warn!(error = %e, failures, "CA reconcile failed");
                backoff(failures)
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
            next = triggers.next() => {
                if next.is_none() {
                    break;
                }
                // Coalesce a burst of events into one reconcile.
                while let Some(Some(())) = futures::FutureExt::now_or_never(triggers.next()) {}
            }
        }
    }
}

/// Delay after `failures` consecutive failures.
pub fn backoff(failures: u32) -> Duration {
    let secs = 1u64 << failures.saturating_sub(1).min(9);
    Duration::from_secs(secs.min(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn sa(ns: &str, name: &str) -> ServiceAccount {
        ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(ns.to_owned()),
                uid: Some(format!("uid-{ns}-{name}")),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        }
    }

    fn signer(now: SystemTime, td: &str) -> Signer {
        let ca = Arc::new(CertificateAuthority::generate(td, 3650 * DAY, now).expect("ca"));
        Signer {
            bundle: ca.anchor_pem(),
            ca,
            trust_domain: td.to_owned(),
            ttl: DAY,
        }
    }

    fn written(plan: IdentityPlan) -> (Secret, Option<ca::IssueReason>) {
        match plan {
            IdentityPlan::Write { secret, issued, .. } => (*secret, issued),
            IdentityPlan::Unchanged { .. } => panic!("expected a write"),
        }
    }

    #[test]
    fn identity_secret_shape() {
        let now = t0();
        let s = signer(now, "cluster.local");
        let (secret, issued) =
            written(plan_identity(&sa("shop", "cart"), None, &s, now).expect("plan"));
        assert_eq!(issued, Some(ca::IssueReason::Missing));
        assert_eq!(secret.metadata.name.as_deref(), Some("weft-identity-cart"));
        assert_eq!(secret.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(
            secret.labels().get(IDENTITY_LABEL).map(String::as_str),
            Some("cart")
        );
        assert_eq!(
            secret
                .annotations()
                .get(SPIFFE_ANNOTATION)
                .map(String::as_str),
            Some("spiffe://cluster.local/ns/shop/sa/cart")
        );
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        let owners = secret.metadata.owner_references.clone().expect("owner");
        assert_eq!(owners[0].kind, "ServiceAccount");
        assert_eq!(owners[0].uid, "uid-shop-cart");
        let data = secret.data.expect("data");
        assert_eq!(data[CA_CRT].0, s.bundle.as_bytes());
        let leaf = LeafInfo::parse(&data[TLS_CRT].0, &data[TLS_KEY].0).expect("leaf");
        assert_eq!(
            leaf.uris,
            vec!["spiffe://cluster.local/ns/shop/sa/cart".to_owned()]
        );
        assert!(leaf.key_matches);
    }

    #[test]
    fn unchanged_secret_is_not_rewritten_and_edits_are_repaired() {
        let now = t0();
        let s = signer(now, "cluster.local");
        let account = sa("shop", "cart");
        let (stored, _) = written(plan_identity(&account, None, &s, now).expect("plan"));
        let later = now + Duration::from_secs(3600);
        assert!(matches!(
            plan_identity(&account, Some(&stored), &s, later).expect("plan"),
            IdentityPlan::Unchanged { .. }
        ));

        // Someone edited ca.crt: rewritten, no new leaf.
        let mut edited = stored.clone();
        edited
            .data
            .as_mut()
            .expect("data")
            .insert(CA_CRT.into(), ByteString(b"junk".to_vec()));
        let (fixed, issued) =
            written(plan_identity(&account, Some(&edited), &s, later).expect("plan"));
        assert_eq!(issued, None);
        assert_eq!(
            fixed.data.as_ref().expect("data")[TLS_CRT],
            stored.data.as_ref().expect("data")[TLS_CRT]
        );

        // Someone removed the label: rewritten.
        let mut edited = stored.clone();
        edited.metadata.labels = None;
        assert!(matches!(
            plan_identity(&account, Some(&edited), &s, later).expect("plan"),
            IdentityPlan::Write { issued: None, .. }
        ));

        // Someone replaced tls.crt: a new leaf.
        let mut edited = stored.clone();
        edited.data.as_mut().expect("data").insert(
            TLS_CRT.into(),
            ByteString(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_vec()),
        );
        let (_, issued) = written(plan_identity(&account, Some(&edited), &s, later).expect("plan"));
        assert!(matches!(issued, Some(ca::IssueReason::Unreadable(_))));

        // Renewal time reached: a new leaf.
        let due = match plan_identity(&account, Some(&stored), &s, later).expect("plan") {
            IdentityPlan::Unchanged { renew_at } => renew_at,
            IdentityPlan::Write { .. } => panic!("unchanged expected"),
        };
        let (_, issued) = written(plan_identity(&account, Some(&stored), &s, due).expect("plan"));
        assert_eq!(issued, Some(ca::IssueReason::Due));
    }

    #[test]
    fn trust_domain_or_ca_change_reissues_at_once() {
        let now = t0();
        let s = signer(now, "cluster.local");
        let account = sa("shop", "cart");
        let (stored, _) = written(plan_identity(&account, None, &s, now).expect("plan"));
        let moved = Signer {
            trust_domain: "example.org".into(),
            ..s.clone()
        };
        let (secret, issued) =
            written(plan_identity(&account, Some(&stored), &moved, now).expect("plan"));
        assert_eq!(issued, Some(ca::IssueReason::NamesChanged));
        assert_eq!(
            secret
                .annotations()
                .get(SPIFFE_ANNOTATION)
                .map(String::as_str),
            Some("spiffe://example.org/ns/shop/sa/cart")
        );
        let other = signer(now, "cluster.local");
        let (_, issued) =
            written(plan_identity(&account, Some(&stored), &other, now).expect("plan"));
        assert_eq!(issued, Some(ca::IssueReason::SignerChanged));
    }

    #[test]
    fn overlong_names_are_refused_not_truncated() {
        let now = t0();
        let s = signer(now, "cluster.local");
        let long = "a".repeat(250);
        assert!(matches!(
            plan_identity(&sa("ns", &long), None, &s, now),
            Err(Error::NameTooLong { .. })
        ));
        let label = identity_label_value(&"b".repeat(100));
        assert!(label.len() <= 63, "{label}");
        assert_ne!(
            identity_label_value(&"b".repeat(100)),
            identity_label_value(&"b".repeat(101))
        );
    }

    #[test]
    fn observation_of_bundles_and_signers() {
        let now = t0();
        let tm = RotationTiming {
            leaf_ttl: DAY,
            ca_ttl: 3650 * DAY,
            propagation: Duration::from_secs(120),
        };
        let mut st = CaState::initial(
            &DesiredCa::Generated { rotate: None },
            "cluster.local",
            &tm,
            now,
        )
        .expect("state");
        let s_old = Signer {
            ca: st.active.clone(),
            bundle: st.bundle(),
            trust_domain: "cluster.local".into(),
            ttl: DAY,
        };
        let (a, _) = written(plan_identity(&sa("x", "a"), None, &s_old, now).expect("plan"));
        let (obs, earliest) = observe(std::slice::from_ref(&a), &[], &st);
        assert!(obs.bundles_carry_next && obs.leaves_on_active);
        assert!(earliest.is_some());

        st.step(
            &DesiredCa::Generated {
                rotate: Some("r1".into()),
            },
            &obs,
            "cluster.local",
            &tm,
            now,
        )
        .expect("step");
        assert_eq!(st.phase, RotationPhase::Trusting);
        // The stored Secret still carries the old bundle.
        let (obs, _) = observe(std::slice::from_ref(&a), &[], &st);
        assert!(!obs.bundles_carry_next);
        // After the identity reconciler rewrote it with the new bundle.
        let s_trust = Signer {
            bundle: st.bundle(),
            ..s_old.clone()
        };
        let (a2, _) = written(plan_identity(&sa("x", "a"), Some(&a), &s_trust, now).expect("plan"));
        let (obs, _) = observe(std::slice::from_ref(&a2), &[], &st);
        assert!(obs.bundles_carry_next);
        // A webhook bundle that lags holds the rotation back.
        let old_bundle = s_old.bundle.as_bytes();
        let (obs, _) = observe(std::slice::from_ref(&a2), &[Some(old_bundle)], &st);
        assert!(!obs.bundles_carry_next);

        st.step(
            &DesiredCa::Generated {
                rotate: Some("r1".into()),
            },
            &Observed {
                bundles_carry_next: true,
                ..obs
            },
            "cluster.local",
            &tm,
            now + tm.propagation,
        )
        .expect("step");
        assert_eq!(st.phase, RotationPhase::Reissuing);
        let (obs, _) = observe(std::slice::from_ref(&a2), &[], &st);
        assert!(!obs.leaves_on_active, "leaf still signed by the old CA");
    }

    #[test]
    fn status_keeps_transition_times_of_unchanged_conditions() {
        let now = t0();
        let tm = RotationTiming {
            leaf_ttl: DAY,
            ca_ttl: 3650 * DAY,
            propagation: Duration::from_secs(120),
        };
        let st = CaState::initial(
            &DesiredCa::Generated { rotate: None },
            "cluster.local",
            &tm,
            now,
        )
        .expect("state");
        let conds = vec![
            ("CAValid", true, "Valid".to_owned(), String::new()),
            ("Ready", true, "Issued".to_owned(), "3".to_owned()),
        ];
        let first = mesh_status(Some(&st), 3, &conds, None, Some(1), now);
        assert_eq!(first.identities_issued, 3);
        assert_eq!(
            first.active_ca.as_ref().expect("active").source,
            "Generated"
        );
        assert_eq!(first.trusted_cas.len(), 1);
        let again = mesh_status(Some(&st), 3, &conds, Some(&first), Some(1), now + DAY);
        assert_eq!(again, first, "no change, so no status write");
        let bad = vec![
            (
                "CAValid",
                false,
                "InvalidUserCA".to_owned(),
                "expired".to_owned(),
            ),
            ("Ready", true, "Issued".to_owned(), "3".to_owned()),
        ];
        let changed = mesh_status(Some(&st), 3, &bad, Some(&first), Some(1), now + DAY);
        assert_ne!(
            changed.conditions[0].last_transition_time,
            first.conditions[0].last_transition_time
        );
        assert_eq!(
            changed.conditions[1].last_transition_time,
            first.conditions[1].last_transition_time
        );
    }

    #[test]
    fn only_edits_count_as_restores() {
        let now = t0();
        let old = signer(now, "td");
        let desired =
            |sg: &Signer| match plan_identity(&sa("shop", "web"), None, sg, now).expect("plan") {
                IdentityPlan::Write { secret, .. } => *secret,
                other => panic!("{other:?}"),
            };
        let stored = desired(&old);
        let plain = Secret::default();
        assert!(!is_restore(None, &stored, None), "a first write");
        assert!(!is_restore(None, &stored, Some(&ca::IssueReason::Missing)));
        for edit in [
            ca::IssueReason::KeyMismatch,
            ca::IssueReason::NamesChanged,
            ca::IssueReason::Unreadable("junk".into()),
        ] {
            assert!(is_restore(Some(&plain), &stored, Some(&edit)), "{edit}");
        }
        for renewal in [
            ca::IssueReason::Due,
            ca::IssueReason::SignerChanged,
            ca::IssueReason::TtlShortened,
        ] {
            assert!(
                !is_restore(Some(&stored), &stored, Some(&renewal)),
                "{renewal}"
            );
        }
        // A rotation step: the bundle gains the next CA, the leaf stays.
        let next = signer(now, "td");
        let mut grown = stored.clone();
        let both = ca::trust_bundle([old.bundle.as_str(), next.bundle.as_str()]);
        grown
            .data
            .as_mut()
            .expect("data")
            .insert(CA_CRT.to_owned(), ByteString(both.into_bytes()));
        assert!(
            !is_restore(Some(&stored), &grown, None),
            "a rotation step is not a restore"
        );
        // A bundle replaced by a foreign CA, or a label removed, is.
        let mut foreign = stored.clone();
        foreign.data.as_mut().expect("data").insert(
            CA_CRT.to_owned(),
            ByteString(next.bundle.clone().into_bytes()),
        );
        assert!(is_restore(Some(&foreign), &stored, None));
        let mut unlabelled = stored.clone();
        unlabelled.metadata.labels = None;
        assert!(is_restore(Some(&unlabelled), &stored, None));
        assert!(!is_restore(Some(&stored), &stored, None));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(50), Duration::from_secs(300));
    }
}
