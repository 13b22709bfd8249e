//! The in-memory index of everything the proxy config is rendered from.
//!
//! # What it holds
//!
//! The operator's watchers (see [`crate::config`]) and the offline CLI feed
//! the same [`Index`] with Kubernetes objects, each through
//! [`Index::apply`] (add or update) or [`Index::delete`]. The index keeps
//! only what rendering needs, already converted into small plain structs:
//!
//! | kind | kept as | notes |
//! |---|---|---|
//! | `Mesh` (only `default`) | [`MeshSpec`] | absent: the API defaults |
//! | `Namespace` | [`NamespaceInfo`] | meshed = label `weft.dev/inject=enabled`; scope = annotation `weft.dev/visible-namespaces` |
//! | `Service` | [`ServiceInfo`] | TCP ports only; `ExternalName` Services are kept but render nothing |
//! | `EndpointSlice` | [`SliceInfo`] | grouped under the Service named by `kubernetes.io/service-name` |
//! | `Pod` (metadata) | [`PodInfo`] | labels, meshed = label `weft.dev/proxy=injected`, service account when known |
//! | `ServiceRoute`, `ServicePolicy`, `AccessPolicy`, `MtlsPolicy`, Gateway API `HTTPRoute`, `TLSRoute` | [`Tracked`] | the current spec plus the last spec that was accepted |
//! | Gateway API `ReferenceGrant` | its spec | who may send to a Service of its namespace |
//!
//! Nothing here does I/O or judges a resource: the index is a faithful,
//! cheap-to-query copy of the cluster, and [`crate::render`] is the pure
//! function from it to each namespace's `proxy.json`.
//!
//! # Dirty marking
//!
//! Every mutation returns the set of namespaces whose rendered output may
//! have changed (a [`Dirty`] set). The rules follow the visibility rule of the
//! renderer (a meshed namespace sees the Services of every meshed namespace;
//! any namespace sees its own):
//!
//! - a change to a Service, EndpointSlice, Pod, `ServiceRoute`,
//!   `ServicePolicy` or `HTTPRoute` in namespace `X` dirties the *viewers* of `X`: when `X`
//!   is meshed, every meshed namespace without a scope plus the scoped ones
//!   that list `X`; else only `X`;
//! - an `AccessPolicy` or `MtlsPolicy` in `X` dirties only `X` (it shapes
//!   `X`'s inbound rules);
//! - a `ReferenceGrant` dirties the viewers of every namespace with
//!   `HTTPRoute`s (any of them may send to the namespace it grants);
//! - a namespace joining or leaving the mesh dirties itself and every meshed
//!   namespace (before and after), and the `Mesh` dirties every namespace;
//! - an apply that changes nothing the renderer reads dirties nothing, so a
//!   watch re-list or a status-only update costs no render.
//!
//! The caller debounces dirty namespaces and renders each once.
//!
//! # Last accepted versions
//!
//! A `ServiceRoute`, `ServicePolicy` or `AccessPolicy` whose new spec is
//! rejected must not take the working version away. [`Tracked`] keeps the
//! spec last reported accepted ([`Index::record_accepted`], called after a
//! render), and the renderer falls back to it. This memory lives only in the
//! process: after an operator restart a rejected resource renders nothing
//! until it is fixed.
//!
//! # Previous output
//!
//! [`Index::set_previous`] records the generation and hash of the ConfigMap
//! currently in a namespace, so the renderer can keep the generation when
//! content is unchanged (see [`crate::render`]).
//!
//! # Content stamps
//!
//! The cached renderer ([`crate::render::Renderer`]) must know what changed
//! without comparing the cluster to its copy. Every change the renderer can
//! see gives a fresh stamp (from one process-wide counter, so two indexes
//! never share a stamp for different content):
//!
//! - [`Index::namespace_stamp`] changes with anything in the namespace:
//!   Services, EndpointSlices, Pods, the weft resources and what was last
//!   accepted of them;
//! - [`Index::service_stamp`] changes with what one Service's entry is
//!   rendered from: the Service, its EndpointSlices, and the Pods those
//!   slices name (the index counts, per Pod, the slice endpoints naming it).
//!
//! Routes and policies are not in a Service's stamp: the renderer compares
//! their judged form, which depends on the whole namespace.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use weft_api::gateway::{
    Gateway, GatewayClass, GatewayClassSpec, GatewaySpec, HTTPRoute, HttpRouteSpec, ReferenceGrant,
    ReferenceGrantSpec, TLSRoute, TlsRouteSpec,
};
use weft_api::mesh::MESH_NAME;
use weft_api::{AccessPolicy, Mesh, MeshSpec, MtlsPolicy, ServicePolicy, ServiceRoute};

/// Label on a Namespace that puts it in the mesh.
pub const INJECT_LABEL: &str = "weft.dev/inject";
/// Value of [`INJECT_LABEL`] that puts a namespace in the mesh.
pub const INJECT_ENABLED: &str = "enabled";
/// Label the injector puts on every pod that runs a weft proxy.
pub const PROXY_LABEL: &str = "weft.dev/proxy";
/// Value of [`PROXY_LABEL`] on injected pods.
pub const PROXY_INJECTED: &str = "injected";
/// Annotation on a meshed Namespace limiting which other meshed namespaces'
/// Services its config lists: comma-separated names, `*` (the default) for
/// all. The namespace's own Services are always listed. This is how a large
/// mesh keeps each namespace's config small (see [`crate::render`]).
pub const VISIBLE_NAMESPACES_ANNOTATION: &str = "weft.dev/visible-namespaces";
/// Label of an EndpointSlice naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Namespaces whose rendered output may have changed.
///
/// "Every meshed namespace" is kept as a flag and resolved only when a batch
/// is rendered ([`Dirty::resolve`]): with hundreds of meshed namespaces,
/// spelling the set out on every endpoint update would cost more than the
/// update itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    /// Every namespace meshed at resolution time.
    pub all_meshed: bool,
    /// Every meshed namespace without a visibility scope (they see every
    /// meshed namespace).
    pub unscoped_meshed: bool,
    /// These namespaces, meshed or not.
    pub namespaces: BTreeSet<String>,
}

impl Dirty {
    /// Nothing to re-render.
    pub fn none() -> Self {
        Self::default()
    }

    /// One namespace.
    pub fn one(namespace: &str) -> Self {
        Self {
            all_meshed: false,
            unscoped_meshed: false,
            namespaces: BTreeSet::from([namespace.to_owned()]),
        }
    }

    /// Whether nothing is dirty.
    pub fn is_empty(&self) -> bool {
        !self.all_meshed && !self.unscoped_meshed && self.namespaces.is_empty()
    }

    /// Adds another dirty set to this one.
    pub fn merge(&mut self, other: Dirty) {
        self.all_meshed |= other.all_meshed;
        self.unscoped_meshed |= other.unscoped_meshed;
        self.namespaces.extend(other.namespaces);
    }

    /// The namespaces, with "every meshed namespace" spelled out.
    pub fn resolve(&self, index: &Index) -> BTreeSet<String> {
        let mut out = self.namespaces.clone();
        if self.all_meshed || self.unscoped_meshed {
            out.extend(
                index
                    .namespaces
                    .iter()
                    .filter(|(_, i)| i.meshed && (self.all_meshed || i.visible.is_none()))
                    .map(|(n, _)| n.clone()),
            );
        }
        out
    }
}

/// `(namespace, name)` of a namespaced object; the namespace is empty for
/// cluster-scoped kinds.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    /// Namespace, empty for cluster-scoped kinds.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectRef {
    /// A reference to `namespace/name`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    fn of(meta: &ObjectMeta) -> Self {
        Self::new(
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        )
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// The kinds the index holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `weft.dev` `Mesh`.
    Mesh,
    /// Core `Namespace`.
    Namespace,
    /// Core `Service`.
    Service,
    /// `discovery.k8s.io` `EndpointSlice`.
    EndpointSlice,
    /// Core `Pod` (metadata).
    Pod,
    /// `weft.dev` `ServiceRoute`.
    ServiceRoute,
    /// `weft.dev` `ServicePolicy`.
    ServicePolicy,
    /// `weft.dev` `AccessPolicy`.
    AccessPolicy,
    /// `weft.dev` `MtlsPolicy`.
    MtlsPolicy,
    /// `gateway.networking.k8s.io` `HTTPRoute`.
    HttpRoute,
    /// `gateway.networking.k8s.io` `TLSRoute` (experimental channel).
    TlsRoute,
    /// `gateway.networking.k8s.io` `ReferenceGrant`.
    ReferenceGrant,
    /// `gateway.networking.k8s.io` `Gateway`.
    Gateway,
    /// `gateway.networking.k8s.io` `GatewayClass`.
    GatewayClass,
}

/// One object to apply to the index.
#[derive(Clone, Debug)]
pub enum Object {
    /// A `Mesh`.
    Mesh(Box<Mesh>),
    /// A `Namespace`.
    Namespace(Box<Namespace>),
    /// A `Service`.
    Service(Box<Service>),
    /// An `EndpointSlice`.
    EndpointSlice(Box<EndpointSlice>),
    /// A full `Pod` (offline input, or the watcher of injected pods that
    /// reads their service account).
    Pod(Box<Pod>),
    /// A Pod's metadata only (from a metadata watcher): labels and meshed
    /// flag; a service account already known is kept.
    PodMetadata(Box<ObjectMeta>),
    /// A `ServiceRoute`.
    ServiceRoute(Box<ServiceRoute>),
    /// A `ServicePolicy`.
    ServicePolicy(Box<ServicePolicy>),
    /// An `AccessPolicy`.
    AccessPolicy(Box<AccessPolicy>),
    /// An `MtlsPolicy`.
    MtlsPolicy(Box<MtlsPolicy>),
    /// A Gateway API `HTTPRoute`.
    HttpRoute(Box<HTTPRoute>),
    /// A Gateway API `TLSRoute`.
    TlsRoute(Box<TLSRoute>),
    /// A Gateway API `ReferenceGrant`.
    ReferenceGrant(Box<ReferenceGrant>),
    /// A Gateway API `Gateway`.
    Gateway(Box<Gateway>),
    /// A Gateway API `GatewayClass`.
    GatewayClass(Box<GatewayClass>),
}

impl Object {
    /// The kind of the object.
    pub fn kind(&self) -> Kind {
        match self {
            Object::Mesh(_) => Kind::Mesh,
            Object::Namespace(_) => Kind::Namespace,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Pod(_) | Object::PodMetadata(_) => Kind::Pod,
            Object::ServiceRoute(_) => Kind::ServiceRoute,
            Object::ServicePolicy(_) => Kind::ServicePolicy,
            Object::AccessPolicy(_) => Kind::AccessPolicy,
            Object::MtlsPolicy(_) => Kind::MtlsPolicy,
            Object::HttpRoute(_) => Kind::HttpRoute,
            Object::TlsRoute(_) => Kind::TlsRoute,
            Object::ReferenceGrant(_) => Kind::ReferenceGrant,
            Object::Gateway(_) => Kind::Gateway,
            Object::GatewayClass(_) => Kind::GatewayClass,
        }
    }

    /// Its `namespace/name`.
    pub fn object_ref(&self) -> ObjectRef {
        let meta = match self {
            Object::Mesh(o) => &o.metadata,
            Object::Namespace(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::PodMetadata(m) => m,
            Object::ServiceRoute(o) => &o.metadata,
            Object::ServicePolicy(o) => &o.metadata,
            Object::AccessPolicy(o) => &o.metadata,
            Object::MtlsPolicy(o) => &o.metadata,
            Object::HttpRoute(o) => &o.metadata,
            Object::TlsRoute(o) => &o.metadata,
            Object::ReferenceGrant(o) => &o.metadata,
            Object::Gateway(o) => &o.metadata,
            Object::GatewayClass(o) => &o.metadata,
        };
        ObjectRef::of(meta)
    }
}

/// What the index keeps of a Namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// Labelled `weft.dev/inject=enabled`.
    pub meshed: bool,
    /// Other namespaces whose Services it sees (`None`: every meshed one).
    pub visible: Option<BTreeSet<String>>,
    /// `weft.dev/access-log`: `Some(None)` off, `Some(Some(errors_only))`
    /// on; `None` when not set (or not one of `all`, `errors`, `off`).
    pub access_log: Option<Option<bool>>,
    /// Its labels (a Gateway listener's `allowedRoutes` selector reads them).
    pub labels: BTreeMap<String, String>,
}

impl NamespaceInfo {
    /// Reads the mesh label and the visibility annotation.
    pub fn from_meta(meta: &ObjectMeta) -> Self {
        let meshed = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(INJECT_LABEL))
            .is_some_and(|v| v == INJECT_ENABLED);
        let visible = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(VISIBLE_NAMESPACES_ANNOTATION))
            .filter(|v| v.trim() != "*")
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned)
                    .collect()
            });
        let access_log = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(weft_api::mesh::ACCESS_LOG_ANNOTATION))
            .and_then(|v| match v.trim() {
                "all" => Some(Some(false)),
                "errors" => Some(Some(true)),
                "off" => Some(None),
                other => {
                    tracing::warn!(
                        namespace = meta.name.as_deref().unwrap_or_default(),
                        value = other,
                        "annotation weft.dev/access-log must be all, errors or off; ignored"
                    );
                    None
                }
            });
        Self {
            meshed,
            visible,
            access_log,
            labels: meta.labels.clone().unwrap_or_default(),
        }
    }
}

/// The target port of a Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    /// A container port number.
    Number(u16),
    /// A container port name, resolved per pod (EndpointSlices carry the number).
    Name(String),
}

/// A TCP port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortInfo {
    /// Port name (required by Kubernetes when a Service has several ports).
    pub name: Option<String>,
    /// The port clients dial.
    pub port: u16,
    /// Where it goes on the pods.
    pub target_port: TargetPort,
    /// `appProtocol`, if set.
    pub app_protocol: Option<String>,
}

/// What the index keeps of a Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Parsed `clusterIPs` (empty for headless Services).
    pub cluster_ips: Vec<IpAddr>,
    /// Pod selector; `None` for Services without one (manual endpoints).
    pub selector: Option<BTreeMap<String, String>>,
    /// TCP ports (UDP and SCTP ports are not proxied and dropped here).
    pub ports: Vec<PortInfo>,
    /// `type: ExternalName`: a DNS alias with no endpoints; not rendered.
    pub external_name: bool,
    /// Creation time, for deterministic ordering of ties.
    pub created: Option<Time>,
}

/// One endpoint of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// Addresses (IPv4 or IPv6 slices only).
    pub addresses: Vec<IpAddr>,
    /// `conditions.ready` (unset means ready).
    pub ready: bool,
    /// The Pod behind it (`targetRef` of kind Pod in the same namespace).
    pub pod: Option<String>,
}

/// What the index keeps of an EndpointSlice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceInfo {
    /// The Service (label `kubernetes.io/service-name`).
    pub service: String,
    /// Port name (as in the Service) → port number on these endpoints.
    pub ports: Vec<(Option<String>, u16)>,
    /// Endpoints.
    pub endpoints: Vec<SliceEndpoint>,
}

/// What the index keeps of a Pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Runs a weft proxy (label `weft.dev/proxy=injected`).
    pub meshed: bool,
    /// `spec.serviceAccountName` when known (metadata alone does not carry it).
    pub service_account: Option<String>,
    /// Its workload's name (see `weft_api::workload`).
    pub workload: Option<String>,
}

/// A weft resource as the index tracks it.
#[derive(Clone, Debug, PartialEq)]
pub struct Tracked<S> {
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `metadata.creationTimestamp`; the oldest wins a conflict.
    pub created: Option<Time>,
    /// The current spec.
    pub spec: S,
    /// The generation and spec last reported accepted, if any.
    pub last_accepted: Option<(Option<i64>, S)>,
}

/// The generation and hash of the config currently written in a namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Previous {
    /// `generation` of the written config.
    pub generation: u64,
    /// Its `hash`.
    pub hash: String,
    /// Its content no longer is what weft wrote (edited by hand): write it
    /// again even when the announced hash equals the rendered one.
    pub edited: bool,
    /// Fingerprint of the config signer whose signature it carries (its
    /// `weft.dev/config-signer` annotation); a new signer signs again.
    pub signer: Option<String>,
}

type Namespaced<T> = BTreeMap<String, BTreeMap<String, T>>;

/// The index. See the module documentation.
#[derive(Clone, Debug, Default)]
pub struct Index {
    mesh: Option<MeshSpec>,
    namespaces: BTreeMap<String, NamespaceInfo>,
    services: Namespaced<ServiceInfo>,
    /// namespace → service → slice name → slice.
    slices: Namespaced<BTreeMap<String, SliceInfo>>,
    /// namespace → slice name → service it is filed under.
    slice_owner: HashMap<String, HashMap<String, String>>,
    pods: HashMap<String, HashMap<String, PodInfo>>,
    routes: Namespaced<Tracked<weft_api::ServiceRouteSpec>>,
    service_policies: Namespaced<Tracked<weft_api::ServicePolicySpec>>,
    access_policies: Namespaced<Tracked<weft_api::AccessPolicySpec>>,
    mtls_policies: Namespaced<Tracked<weft_api::MtlsPolicySpec>>,
    http_routes: Namespaced<Tracked<HttpRouteSpec>>,
    tls_routes: Namespaced<Tracked<TlsRouteSpec>>,
    grants: Namespaced<ReferenceGrantSpec>,
    gateways: Namespaced<Tracked<GatewaySpec>>,
    gateway_classes: BTreeMap<String, GatewayClassSpec>,
    previous: BTreeMap<String, Previous>,
    /// namespace → content stamp (see the module documentation).
    namespace_stamps: HashMap<String, u64>,
    /// namespace → Service name → content stamp.
    service_stamps: HashMap<String, HashMap<String, u64>>,
    /// namespace → Pod → (Service, slice endpoints of it naming the Pod).
    pod_services: HashMap<String, HashMap<String, Vec<(String, u32)>>>,
}

/// The source of content stamps; 0 means "never stamped".
static STAMPS: AtomicU64 = AtomicU64::new(1);

fn next_stamp() -> u64 {
    STAMPS.fetch_add(1, Ordering::Relaxed)
}

fn insert_namespaced<T: PartialEq>(map: &mut Namespaced<T>, r: &ObjectRef, value: T) -> bool {
    let slot = map.entry(r.namespace.clone()).or_default();
    if slot.get(&r.name) == Some(&value) {
        return false;
    }
    slot.insert(r.name.clone(), value);
    true
}

fn remove_namespaced<T>(map: &mut Namespaced<T>, r: &ObjectRef) -> bool {
    let Some(slot) = map.get_mut(&r.namespace) else {
        return false;
    };
    let removed = slot.remove(&r.name).is_some();
    if slot.is_empty() {
        map.remove(&r.namespace);
    }
    removed
}

fn tracked<S: Clone + PartialEq>(
    existing: Option<&Tracked<S>>,
    meta: &ObjectMeta,
    spec: &S,
) -> Tracked<S> {
    Tracked {
        generation: meta.generation,
        created: meta.creation_timestamp.clone(),
        spec: spec.clone(),
        last_accepted: existing.and_then(|t| t.last_accepted.clone()),
    }
}

impl Index {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds an index from objects, for offline rendering and tests.
    pub fn from_objects(objects: impl IntoIterator<Item = Object>) -> Self {
        let mut index = Self::new();
        for o in objects {
            index.apply(o);
        }
        index
    }

    /// Adds or updates an object; returns the namespaces to re-render.
    pub fn apply(&mut self, object: Object) -> Dirty {
        let r = object.object_ref();
        match object {
            Object::Mesh(m) => {
                if r.name != MESH_NAME || self.mesh.as_ref() == Some(&m.spec) {
                    return Dirty::none();
                }
                self.mesh = Some(m.spec);
                Dirty {
                    all_meshed: true,
                    unscoped_meshed: false,
                    namespaces: self.all_namespaces(),
                }
            }
            Object::Namespace(ns) => {
                let info = NamespaceInfo::from_meta(&ns.metadata);
                let meshed = info.meshed;
                let before = self.namespaces.insert(r.name.clone(), info.clone());
                match before {
                    Some(b) if b == info => Dirty::none(),
                    Some(b) if b.meshed == meshed => {
                        // Labels may decide which Gateway listeners take
                        // its routes.
                        self.touch_namespace(&r.name);
                        Dirty::one(&r.name)
                    }
                    None if !meshed => Dirty::none(),
                    _ => self.mesh_membership_changed(&r.name),
                }
            }
            Object::Service(svc) => {
                let info = ServiceInfo::from_service(&svc);
                if insert_namespaced(&mut self.services, &r, info) {
                    self.touch_service(&r.namespace, &r.name);
                    self.viewers(&r.namespace)
                } else {
                    Dirty::none()
                }
            }
            Object::EndpointSlice(slice) => {
                let info = SliceInfo::from_slice(&slice);
                let mut changed = self.remove_slice_if_moved(&r, &info.service);
                let slot = self
                    .slices
                    .entry(r.namespace.clone())
                    .or_default()
                    .entry(info.service.clone())
                    .or_default();
                if slot.get(&r.name) != Some(&info) {
                    let service = info.service.clone();
                    let added = pods_of(&info);
                    let old = slot.insert(r.name.clone(), info);
                    self.slice_owner
                        .entry(r.namespace.clone())
                        .or_default()
                        .insert(r.name.clone(), service.clone());
                    if let Some(old) = old {
                        self.count_pods(&r.namespace, &service, pods_of(&old), false);
                    }
                    self.count_pods(&r.namespace, &service, added, true);
                    self.touch_service(&r.namespace, &service);
                    changed = true;
                }
                if changed {
                    self.viewers(&r.namespace)
                } else {
                    Dirty::none()
                }
            }
            Object::Pod(pod) => {
                let mut info = PodInfo::from_meta(&pod.metadata);
                info.service_account = Some(
                    pod.spec
                        .as_ref()
                        .and_then(|s| s.service_account_name.clone())
                        .unwrap_or_else(|| "default".to_owned()),
                );
                self.put_pod(&r, info)
            }
            Object::PodMetadata(meta) => {
                let mut info = PodInfo::from_meta(&meta);
                info.service_account = self
                    .pod(&r.namespace, &r.name)
                    .and_then(|p| p.service_account.clone());
                self.put_pod(&r, info)
            }
            Object::ServiceRoute(o) => {
                let existing = self.routes.get(&r.namespace).and_then(|m| m.get(&r.name));
                let t = tracked(existing, &o.metadata, &o.spec);
                if insert_namespaced(&mut self.routes, &r, t) {
                    self.touch_namespace(&r.namespace);
                    self.viewers(&r.namespace)
                } else {
                    Dirty::none()
                }
            }
            Object::ServicePolicy(o) => {
                let existing = self
                    .service_policies
                    .get(&r.namespace)
                    .and_then(|m| m.get(&r.name));
                let t = tracked(existing, &o.metadata, &o.spec);
                if insert_namespaced(&mut self.service_policies, &r, t) {
                    self.touch_namespace(&r.namespace);
                    self.viewers(&r.namespace)
                } else {
                    Dirty::none()
                }
            }
            Object::AccessPolicy(o) => {
                let existing = self
                    .access_policies
                    .get(&r.namespace)
                    .and_then(|m| m.get(&r.name));
                let t = tracked(existing, &o.metadata, &o.spec);
                if insert_namespaced(&mut self.access_policies, &r, t) {
                    self.touch_namespace(&r.namespace);
                    Dirty::one(&r.namespace)
                } else {
                    Dirty::none()
                }
            }
            Object::MtlsPolicy(o) => {
                let existing = self
                    .mtls_policies
                    .get(&r.namespace)
                    .and_then(|m| m.get(&r.name));
                let t = tracked(existing, &o.metadata, &o.spec);
                if insert_namespaced(&mut self.mtls_policies, &r, t) {
                    self.touch_namespace(&r.namespace);
                    Dirty::one(&r.namespace)
                } else {
                    Dirty::none()
                }
            }
            Object::HttpRoute(o) => {
                let existing = self
                    .http_routes
                    .get(&r.namespace)
                    .and_then(|m| m.get(&r.name));
                let t = tracked(existing, &o.metadata, &o.spec);
                if insert_namespaced(&mut self.http_routes, &r, t) {
                    self.touch_namespace(&r.namespace);
                    self.viewers(&r.namespace)
                } else {
                    Dirty::none()
                }
            }
            Object::TlsRoute(o) => {
                let existing = self
                    .tls_routes
                    .get(&r.namespace)
                    .and_then(|m| m.get(&r.name));
                let t = tracked(existing, &o.metadata, &o.spec);
                if insert_namespaced(&mut self.tls_routes, &r, t) {
                    self.touch_namespace(&r.namespace);
                    self.viewers(&r.namespace)
                } else {
                    Dirty::none()
                }
            }
            Object::ReferenceGrant(o) => {
                if insert_namespaced(&mut self.grants, &r, o.spec.clone()) {
                    self.grants_changed()
                } else {
                    Dirty::none()
                }
            }
            Object::Gateway(o) => {
                let t = tracked(None, &o.metadata, &o.spec);
                if insert_namespaced(&mut self.gateways, &r, t) {
                    let mut dirty = self.grants_changed();
                    self.touch_namespace(&r.namespace);
                    dirty.merge(Dirty::one(&r.namespace));
                    dirty
                } else {
                    Dirty::none()
                }
            }
            Object::GatewayClass(o) => {
                if self.gateway_classes.get(&r.name) == Some(&o.spec) {
                    return Dirty::none();
                }
                self.gateway_classes.insert(r.name.clone(), o.spec.clone());
                self.gateways_changed()
            }
        }
    }

    /// A `GatewayClass` changed: every namespace with Gateways or
    /// `HTTPRoute`s may be judged differently.
    fn gateways_changed(&mut self) -> Dirty {
        let mut dirty = self.grants_changed();
        let namespaces: Vec<String> = self.gateways.keys().cloned().collect();
        for ns in namespaces {
            self.touch_namespace(&ns);
            dirty.merge(Dirty::one(&ns));
        }
        dirty
    }

    /// A `ReferenceGrant` changed: every namespace with `HTTPRoute`s or
    /// `TLSRoute`s may now resolve a backend differently.
    fn grants_changed(&mut self) -> Dirty {
        let mut dirty = Dirty::none();
        let namespaces: BTreeSet<String> = self
            .http_routes
            .keys()
            .chain(self.tls_routes.keys())
            .cloned()
            .collect();
        for ns in namespaces {
            self.touch_namespace(&ns);
            dirty.merge(self.viewers(&ns));
        }
        dirty
    }

    /// Removes an object; returns the namespaces to re-render.
    pub fn delete(&mut self, kind: Kind, r: &ObjectRef) -> Dirty {
        match kind {
            Kind::Mesh => {
                if r.name == MESH_NAME && self.mesh.take().is_some() {
                    Dirty {
                        all_meshed: true,
                        unscoped_meshed: false,
                        namespaces: self.all_namespaces(),
                    }
                } else {
                    Dirty::none()
                }
            }
            Kind::Namespace => match self.namespaces.remove(&r.name) {
                Some(info) if info.meshed => self.mesh_membership_changed(&r.name),
                Some(_) => Dirty::one(&r.name),
                None => Dirty::none(),
            },
            Kind::Service => {
                let removed = remove_namespaced(&mut self.services, r);
                if removed {
                    self.touch_service(&r.namespace, &r.name);
                }
                self.if_changed(removed, r)
            }
            Kind::EndpointSlice => {
                let owner = self
                    .slice_owner
                    .get_mut(&r.namespace)
                    .and_then(|m| m.remove(&r.name));
                let Some(service) = owner else {
                    return Dirty::none();
                };
                let mut old = None;
                if let Some(by_svc) = self.slices.get_mut(&r.namespace) {
                    if let Some(slot) = by_svc.get_mut(&service) {
                        old = slot.remove(&r.name);
                        if slot.is_empty() {
                            by_svc.remove(&service);
                        }
                    }
                    if by_svc.is_empty() {
                        self.slices.remove(&r.namespace);
                    }
                }
                if let Some(old) = old {
                    self.count_pods(&r.namespace, &service, pods_of(&old), false);
                }
                self.touch_service(&r.namespace, &service);
                self.viewers(&r.namespace)
            }
            Kind::Pod => {
                let removed = self
                    .pods
                    .get_mut(&r.namespace)
                    .and_then(|m| m.remove(&r.name))
                    .is_some();
                if removed {
                    self.touch_pod(&r.namespace, &r.name);
                }
                self.if_changed(removed, r)
            }
            Kind::ServiceRoute => {
                let removed = remove_namespaced(&mut self.routes, r);
                if removed {
                    self.touch_namespace(&r.namespace);
                }
                self.if_changed(removed, r)
            }
            Kind::ServicePolicy => {
                let removed = remove_namespaced(&mut self.service_policies, r);
                if removed {
                    self.touch_namespace(&r.namespace);
                }
                self.if_changed(removed, r)
            }
            Kind::AccessPolicy => {
                if remove_namespaced(&mut self.access_policies, r) {
                    self.touch_namespace(&r.namespace);
                    Dirty::one(&r.namespace)
                } else {
                    Dirty::none()
                }
            }
            Kind::MtlsPolicy => {
                if remove_namespaced(&mut self.mtls_policies, r) {
                    self.touch_namespace(&r.namespace);
                    Dirty::one(&r.namespace)
                } else {
                    Dirty::none()
                }
            }
            Kind::HttpRoute => {
                let removed = remove_namespaced(&mut self.http_routes, r);
                if removed {
                    self.touch_namespace(&r.namespace);
                }
                self.if_changed(removed, r)
            }
            Kind::TlsRoute => {
                let removed = remove_namespaced(&mut self.tls_routes, r);
                if removed {
                    self.touch_namespace(&r.namespace);
                }
                self.if_changed(removed, r)
            }
            Kind::ReferenceGrant => {
                if remove_namespaced(&mut self.grants, r) {
                    self.grants_changed()
                } else {
                    Dirty::none()
                }
            }
            Kind::Gateway => {
                if remove_namespaced(&mut self.gateways, r) {
                    let mut dirty = self.grants_changed();
                    self.touch_namespace(&r.namespace);
                    dirty.merge(Dirty::one(&r.namespace));
                    dirty
                } else {
                    Dirty::none()
                }
            }
            Kind::GatewayClass => {
                if self.gateway_classes.remove(&r.name).is_some() {
                    self.gateways_changed()
                } else {
                    Dirty::none()
                }
            }
        }
    }

    /// Every object of a kind currently held, to reconcile after a watch
    /// re-list (delete what the new list no longer contains).
    pub fn refs(&self, kind: Kind) -> BTreeSet<ObjectRef> {
        fn of<T>(map: &Namespaced<T>) -> BTreeSet<ObjectRef> {
            map.iter()
                .flat_map(|(ns, m)| m.keys().map(move |n| ObjectRef::new(ns.clone(), n.clone())))
                .collect()
        }
        match kind {
            Kind::Mesh => self
                .mesh
                .iter()
                .map(|_| ObjectRef::new("", MESH_NAME))
                .collect(),
            Kind::Namespace => self
                .namespaces
                .keys()
                .map(|n| ObjectRef::new("", n.clone()))
                .collect(),
            Kind::Service => of(&self.services),
            Kind::EndpointSlice => self
                .slice_owner
                .iter()
                .flat_map(|(ns, m)| m.keys().map(move |n| ObjectRef::new(ns.clone(), n.clone())))
                .collect(),
            Kind::Pod => self
                .pods
                .iter()
                .flat_map(|(ns, m)| m.keys().map(move |n| ObjectRef::new(ns.clone(), n.clone())))
                .collect(),
            Kind::ServiceRoute => of(&self.routes),
            Kind::ServicePolicy => of(&self.service_policies),
            Kind::AccessPolicy => of(&self.access_policies),
            Kind::MtlsPolicy => of(&self.mtls_policies),
            Kind::HttpRoute => of(&self.http_routes),
            Kind::TlsRoute => of(&self.tls_routes),
            Kind::ReferenceGrant => of(&self.grants),
            Kind::Gateway => of(&self.gateways),
            Kind::GatewayClass => self
                .gateway_classes
                .keys()
                .map(|n| ObjectRef::new("", n.clone()))
                .collect(),
        }
    }

    /// Records that `generation` of a resource was accepted, so a later
    /// rejected spec falls back to it. Ignored when the resource has moved on
    /// to another generation meanwhile.
    pub fn record_accepted(&mut self, kind: Kind, r: &ObjectRef, generation: Option<i64>) {
        /// Whether anything changed.
        fn record<S: Clone + PartialEq>(
            map: &mut Namespaced<Tracked<S>>,
            r: &ObjectRef,
            g: Option<i64>,
        ) -> bool {
            match map.get_mut(&r.namespace).and_then(|m| m.get_mut(&r.name)) {
                Some(t) if t.generation == g => {
                    let accepted = Some((g, t.spec.clone()));
                    let changed = t.last_accepted != accepted;
                    t.last_accepted = accepted;
                    changed
                }
                _ => false,
            }
        }
        let changed = match kind {
            Kind::ServiceRoute => record(&mut self.routes, r, generation),
            Kind::ServicePolicy => record(&mut self.service_policies, r, generation),
            Kind::AccessPolicy => record(&mut self.access_policies, r, generation),
            Kind::MtlsPolicy => record(&mut self.mtls_policies, r, generation),
            Kind::HttpRoute => record(&mut self.http_routes, r, generation),
            Kind::TlsRoute => record(&mut self.tls_routes, r, generation),
            _ => false,
        };
        if changed {
            self.touch_namespace(&r.namespace);
        }
    }

    /// The content stamp of a namespace: equal stamps, equal content (see
    /// the module documentation); 0 for a namespace never touched.
    pub fn namespace_stamp(&self, namespace: &str) -> u64 {
        self.namespace_stamps.get(namespace).copied().unwrap_or(0)
    }

    /// The content stamp of what one Service's entry is rendered from; 0
    /// when nothing of it was ever seen.
    pub fn service_stamp(&self, namespace: &str, service: &str) -> u64 {
        self.service_stamps
            .get(namespace)
            .and_then(|m| m.get(service))
            .copied()
            .unwrap_or(0)
    }

    fn touch_namespace(&mut self, namespace: &str) {
        self.namespace_stamps
            .insert(namespace.to_owned(), next_stamp());
    }

    fn touch_service(&mut self, namespace: &str, service: &str) {
        let exists =
            self.service(namespace, service).is_some() || self.slices(namespace, service).is_some();
        let stamps = self.service_stamps.entry(namespace.to_owned()).or_default();
        if exists {
            stamps.insert(service.to_owned(), next_stamp());
        } else {
            // Gone entirely: forget it; a new one gets a fresh stamp.
            stamps.remove(service);
            if stamps.is_empty() {
                self.service_stamps.remove(namespace);
            }
        }
        self.touch_namespace(namespace);
    }

    /// A Pod changed: so did every Service whose slices name it.
    fn touch_pod(&mut self, namespace: &str, pod: &str) {
        let services: Vec<String> = self
            .pod_services
            .get(namespace)
            .and_then(|m| m.get(pod))
            .map(|v| v.iter().map(|(s, _)| s.clone()).collect())
            .unwrap_or_default();
        for s in services {
            self.touch_service(namespace, &s);
        }
        self.touch_namespace(namespace);
    }

    /// Adds (or removes) one reference from `service` to each Pod named.
    fn count_pods(&mut self, namespace: &str, service: &str, pods: Vec<String>, add: bool) {
        if pods.is_empty() {
            return;
        }
        let by_pod = self.pod_services.entry(namespace.to_owned()).or_default();
        for pod in pods {
            let refs = by_pod.entry(pod.clone()).or_default();
            match refs.iter().position(|(s, _)| s == service) {
                Some(i) if add => refs[i].1 += 1,
                Some(i) => {
                    refs[i].1 -= 1;
                    if refs[i].1 == 0 {
                        refs.swap_remove(i);
                    }
                }
                None if add => refs.push((service.to_owned(), 1)),
                None => {}
            }
            if refs.is_empty() {
                by_pod.remove(&pod);
            }
        }
        if by_pod.is_empty() {
            self.pod_services.remove(namespace);
        }
    }

    /// Records the generation and hash of the config written in a namespace.
    pub fn set_previous(&mut self, namespace: &str, previous: Option<Previous>) {
        match previous {
            Some(p) => {
                self.previous.insert(namespace.to_owned(), p);
            }
            None => {
                self.previous.remove(namespace);
            }
        }
    }

    /// The config written in a namespace, if known.
    pub fn previous(&self, namespace: &str) -> Option<&Previous> {
        self.previous.get(namespace)
    }

    /// The mesh settings (API defaults when no `Mesh` exists).
    pub fn mesh(&self) -> MeshSpec {
        self.mesh.clone().unwrap_or_default()
    }

    /// Whether a namespace is in the mesh.
    pub fn is_meshed(&self, namespace: &str) -> bool {
        self.namespaces.get(namespace).is_some_and(|n| n.meshed)
    }

    /// The namespace's access log override (`weft.dev/access-log`).
    pub fn namespace_access_log(&self, namespace: &str) -> Option<Option<bool>> {
        self.namespaces.get(namespace).and_then(|n| n.access_log)
    }

    /// Whether a Namespace object is known at all.
    pub fn has_namespace(&self, namespace: &str) -> bool {
        self.namespaces.contains_key(namespace)
    }

    /// Meshed namespaces, sorted.
    pub fn meshed_namespaces(&self) -> impl Iterator<Item = &str> {
        self.namespaces
            .iter()
            .filter(|(_, i)| i.meshed)
            .map(|(n, _)| n.as_str())
    }

    /// Every namespace the index has heard of (from any object), sorted.
    pub fn all_namespaces(&self) -> BTreeSet<String> {
        let mut all: BTreeSet<String> = self.namespaces.keys().cloned().collect();
        all.extend(self.services.keys().cloned());
        all.extend(self.routes.keys().cloned());
        all.extend(self.service_policies.keys().cloned());
        all.extend(self.access_policies.keys().cloned());
        all.extend(self.mtls_policies.keys().cloned());
        all.extend(self.http_routes.keys().cloned());
        all.extend(self.tls_routes.keys().cloned());
        all.extend(self.gateways.keys().cloned());
        all
    }

    /// Services of a namespace, by name.
    pub fn services(&self, namespace: &str) -> Option<&BTreeMap<String, ServiceInfo>> {
        self.services.get(namespace)
    }

    /// One Service.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&ServiceInfo> {
        self.services.get(namespace)?.get(name)
    }

    /// EndpointSlices of a Service, by slice name.
    pub fn slices(&self, namespace: &str, service: &str) -> Option<&BTreeMap<String, SliceInfo>> {
        self.slices.get(namespace)?.get(service)
    }

    /// One Pod.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.pods.get(namespace)?.get(name)
    }

    /// The Pods of a namespace, by name (unordered).
    pub fn pods(&self, namespace: &str) -> impl Iterator<Item = (&String, &PodInfo)> {
        self.pods.get(namespace).into_iter().flatten()
    }

    /// `ServiceRoute`s of a namespace, by name.
    pub fn routes(
        &self,
        namespace: &str,
    ) -> Option<&BTreeMap<String, Tracked<weft_api::ServiceRouteSpec>>> {
        self.routes.get(namespace)
    }

    /// `ServicePolicy`s of a namespace, by name.
    pub fn service_policies(
        &self,
        namespace: &str,
    ) -> Option<&BTreeMap<String, Tracked<weft_api::ServicePolicySpec>>> {
        self.service_policies.get(namespace)
    }

    /// `AccessPolicy`s of a namespace, by name.
    pub fn access_policies(
        &self,
        namespace: &str,
    ) -> Option<&BTreeMap<String, Tracked<weft_api::AccessPolicySpec>>> {
        self.access_policies.get(namespace)
    }

    /// `MtlsPolicy`s of a namespace, by name.
    pub fn mtls_policies(
        &self,
        namespace: &str,
    ) -> Option<&BTreeMap<String, Tracked<weft_api::MtlsPolicySpec>>> {
        self.mtls_policies.get(namespace)
    }

    /// Gateway API `HTTPRoute`s of a namespace, by name.
    pub fn http_routes(
        &self,
        namespace: &str,
    ) -> Option<&BTreeMap<String, Tracked<HttpRouteSpec>>> {
        self.http_routes.get(namespace)
    }

    /// Gateway API `TLSRoute`s of a namespace, by name.
    pub fn tls_routes(&self, namespace: &str) -> Option<&BTreeMap<String, Tracked<TlsRouteSpec>>> {
        self.tls_routes.get(namespace)
    }

    /// Every `Gateway` of the cluster whose class is weft's, by namespace
    /// and name.
    pub fn weft_gateways(&self) -> impl Iterator<Item = (&str, &str, &Tracked<GatewaySpec>)> {
        self.gateways.iter().flat_map(move |(ns, m)| {
            m.iter()
                .filter(|(_, g)| self.is_weft_class(&g.spec.gateway_class_name))
                .map(move |(n, g)| (ns.as_str(), n.as_str(), g))
        })
    }

    /// A `Gateway`, whatever its class.
    pub fn gateway(&self, namespace: &str, name: &str) -> Option<&Tracked<GatewaySpec>> {
        self.gateways.get(namespace).and_then(|m| m.get(name))
    }

    /// Whether `GatewayClass` `name` is implemented by weft.
    pub fn is_weft_class(&self, name: &str) -> bool {
        self.gateway_classes
            .get(name)
            .is_some_and(|c| c.controller_name == weft_api::gateway::GATEWAY_CONTROLLER)
    }

    /// `GatewayClass`es implemented by weft.
    pub fn weft_classes(&self) -> impl Iterator<Item = &str> {
        self.gateway_classes
            .iter()
            .filter(|(_, c)| c.controller_name == weft_api::gateway::GATEWAY_CONTROLLER)
            .map(|(n, _)| n.as_str())
    }

    /// The labels of a Namespace, when known.
    pub fn namespace_labels(&self, namespace: &str) -> Option<&BTreeMap<String, String>> {
        self.namespaces.get(namespace).map(|n| &n.labels)
    }

    /// Whether a `ReferenceGrant` of `to_ns` lets a route of kind
    /// `route_kind` (`HTTPRoute`, `TLSRoute`) of `from_ns` send to Service
    /// `service` of `to_ns`.
    pub fn route_may_reach(
        &self,
        route_kind: &str,
        from_ns: &str,
        to_ns: &str,
        service: &str,
    ) -> bool {
        from_ns == to_ns
            || self
                .grants
                .get(to_ns)
                .into_iter()
                .flat_map(|m| m.values())
                .any(|g| g.allows_route_to_service(route_kind, from_ns, service))
    }

    /// Whether a `ReferenceGrant` of `to_ns` lets a `Gateway` of `from_ns`
    /// use Secret `secret` of `to_ns` as a certificate.
    pub fn gateway_may_use(&self, from_ns: &str, to_ns: &str, secret: &str) -> bool {
        from_ns == to_ns
            || self
                .grants
                .get(to_ns)
                .into_iter()
                .flat_map(|m| m.values())
                .any(|g| g.allows_gateway_to_secret(from_ns, secret))
    }

    /// Namespaces whose output shows what lives in `namespace`.
    pub fn viewers(&self, namespace: &str) -> Dirty {
        let meshed = self.is_meshed(namespace);
        let mut namespaces = BTreeSet::from([namespace.to_owned()]);
        if meshed {
            namespaces.extend(
                self.namespaces
                    .iter()
                    .filter(|(_, i)| {
                        i.meshed && i.visible.as_ref().is_some_and(|v| v.contains(namespace))
                    })
                    .map(|(n, _)| n.clone()),
            );
        }
        Dirty {
            all_meshed: false,
            unscoped_meshed: meshed,
            namespaces,
        }
    }

    /// The namespaces whose Services the config of `namespace` lists: the
    /// meshed ones within its scope, and itself.
    pub fn visible_from<'a>(&'a self, namespace: &'a str) -> BTreeSet<&'a str> {
        let scope = self
            .namespaces
            .get(namespace)
            .and_then(|i| i.visible.as_ref());
        let mut out: BTreeSet<&str> = self
            .meshed_namespaces()
            .filter(|n| scope.is_none_or(|s| s.contains(*n)))
            .collect();
        out.insert(namespace);
        out
    }

    fn if_changed(&self, changed: bool, r: &ObjectRef) -> Dirty {
        if changed {
            self.viewers(&r.namespace)
        } else {
            Dirty::none()
        }
    }

    fn mesh_membership_changed(&self, namespace: &str) -> Dirty {
        Dirty {
            all_meshed: true,
            unscoped_meshed: false,
            namespaces: BTreeSet::from([namespace.to_owned()]),
        }
    }

    fn put_pod(&mut self, r: &ObjectRef, info: PodInfo) -> Dirty {
        let slot = self.pods.entry(r.namespace.clone()).or_default();
        if slot.get(&r.name) == Some(&info) {
            return Dirty::none();
        }
        slot.insert(r.name.clone(), info);
        self.touch_pod(&r.namespace, &r.name);
        self.viewers(&r.namespace)
    }

    /// A slice whose service label changed is moved: drop it from the old
    /// Service. Returns whether something was removed.
    fn remove_slice_if_moved(&mut self, r: &ObjectRef, service: &str) -> bool {
        let old = self
            .slice_owner
            .get(&r.namespace)
            .and_then(|m| m.get(&r.name))
            .filter(|old| old.as_str() != service)
            .cloned();
        match old {
            Some(_) => !self.delete(Kind::EndpointSlice, r).is_empty(),
            None => false,
        }
    }
}

/// The Pods a slice's endpoints name, once per endpoint.
fn pods_of(slice: &SliceInfo) -> Vec<String> {
    slice
        .endpoints
        .iter()
        .filter_map(|e| e.pod.clone())
        .collect()
}

impl ServiceInfo {
    /// Converts a Service, keeping what rendering needs.
    pub fn from_service(svc: &Service) -> Self {
        let Some(spec) = svc.spec.as_ref() else {
            return Self {
                created: svc.metadata.creation_timestamp.clone(),
                ..Self::default()
            };
        };
        let ips: Vec<&String> = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips.iter().collect(),
            _ => spec.cluster_ip.iter().collect(),
        };
        let mut cluster_ips: Vec<IpAddr> = ips.iter().filter_map(|s| s.parse().ok()).collect();
        cluster_ips.sort();
        cluster_ips.dedup();
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                let port = u16::try_from(p.port).ok().filter(|&p| p != 0)?;
                let target_port = match &p.target_port {
                    Some(IntOrString::Int(n)) => {
                        TargetPort::Number(u16::try_from(*n).ok().filter(|&n| n != 0)?)
                    }
                    Some(IntOrString::String(s)) => match s.parse::<u16>() {
                        Ok(n) if n != 0 => TargetPort::Number(n),
                        _ => TargetPort::Name(s.clone()),
                    },
                    None => TargetPort::Number(port),
                };
                Some(PortInfo {
                    name: p.name.clone().filter(|n| !n.is_empty()),
                    port,
                    target_port,
                    app_protocol: p.app_protocol.clone(),
                })
            })
            .collect();
        Self {
            cluster_ips,
            selector: spec.selector.clone().filter(|s| !s.is_empty()),
            ports,
            external_name: spec.type_.as_deref() == Some("ExternalName"),
            created: svc.metadata.creation_timestamp.clone(),
        }
    }
}

impl SliceInfo {
    /// Converts an EndpointSlice, keeping what rendering needs. FQDN slices
    /// carry no addresses the proxy can use and come out empty.
    pub fn from_slice(slice: &EndpointSlice) -> Self {
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned()
            .unwrap_or_default();
        let ip = matches!(slice.address_type.as_str(), "IPv4" | "IPv6");
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                let n = p
                    .port
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|&n| n != 0)?;
                Some((p.name.clone().filter(|n| !n.is_empty()), n))
            })
            .collect();
        let endpoints = if ip {
            slice
                .endpoints
                .iter()
                .map(|e| SliceEndpoint {
                    addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                    ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
                    pod: e
                        .target_ref
                        .as_ref()
                        .filter(|t| t.kind.as_deref() == Some("Pod"))
                        .filter(|t| {
                            t.namespace.is_none() || t.namespace == slice.metadata.namespace
                        })
                        .and_then(|t| t.name.clone()),
                })
                .collect()
        } else {
            Vec::new()
        };
        Self {
            service,
            ports,
            endpoints,
        }
    }
}

impl PodInfo {
    /// Labels and meshed flag from a Pod's metadata (service account unknown).
    pub fn from_meta(meta: &ObjectMeta) -> Self {
        let labels = meta.labels.clone().unwrap_or_default();
        let meshed = labels.get(PROXY_LABEL).is_some_and(|v| v == PROXY_INJECTED);
        Self {
            labels,
            meshed,
            service_account: None,
            workload: weft_api::workload::workload_of(meta).map(|w| w.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort};

    fn ns(name: &str, meshed: bool) -> Object {
        let mut n = Namespace::default();
        n.metadata.name = Some(name.into());
        if meshed {
            n.metadata.labels = Some(BTreeMap::from([(
                INJECT_LABEL.to_owned(),
                INJECT_ENABLED.to_owned(),
            )]));
        }
        Object::Namespace(Box::new(n))
    }

    fn svc(ns: &str, name: &str, ip: &str) -> Object {
        Object::Service(Box::new(Service {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(ip.into()),
                ports: Some(vec![ServicePort {
                    port: 80,
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: None,
        }))
    }

    fn slice(ns: &str, name: &str, service: &str, ip: &str) -> Object {
        Object::EndpointSlice(Box::new(EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                labels: Some(BTreeMap::from([(
                    SERVICE_NAME_LABEL.to_owned(),
                    service.to_owned(),
                )])),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: vec![Endpoint {
                addresses: vec![ip.into()],
                ..Default::default()
            }],
            ports: Some(vec![EndpointPort {
                port: Some(8080),
                ..Default::default()
            }]),
        }))
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn service_in_meshed_namespace_dirties_every_meshed_namespace() {
        let mut idx = Index::from_objects([ns("a", true), ns("b", true), ns("c", false)]);
        let d = idx.apply(svc("a", "web", "10.0.0.1"));
        assert_eq!(d.resolve(&idx), set(&["a", "b"]));
        let d = idx.apply(svc("c", "db", "10.0.0.2"));
        assert_eq!(d.resolve(&idx), set(&["c"]));
    }

    #[test]
    fn scoped_namespaces_see_and_are_dirtied_by_what_they_list() {
        let mut scoped = Namespace::default();
        scoped.metadata.name = Some("s".into());
        scoped.metadata.labels = Some(BTreeMap::from([(
            INJECT_LABEL.to_owned(),
            INJECT_ENABLED.to_owned(),
        )]));
        scoped.metadata.annotations = Some(BTreeMap::from([(
            VISIBLE_NAMESPACES_ANNOTATION.to_owned(),
            " a , missing".to_owned(),
        )]));
        let mut idx = Index::from_objects([
            ns("a", true),
            ns("b", true),
            ns("c", false),
            Object::Namespace(Box::new(scoped)),
        ]);
        assert_eq!(
            idx.visible_from("s").into_iter().collect::<Vec<_>>(),
            vec!["a", "s"]
        );
        assert_eq!(
            idx.visible_from("a").into_iter().collect::<Vec<_>>(),
            vec!["a", "b", "s"]
        );
        let d = idx.apply(svc("a", "x", "10.0.0.1"));
        assert_eq!(d.resolve(&idx), set(&["a", "b", "s"]));
        let d = idx.apply(svc("b", "y", "10.0.0.2"));
        assert_eq!(d.resolve(&idx), set(&["a", "b"]), "s does not see b");
    }

    #[test]
    fn unchanged_apply_dirties_nothing() {
        let mut idx = Index::from_objects([ns("a", true), svc("a", "web", "10.0.0.1")]);
        assert!(idx.apply(svc("a", "web", "10.0.0.1")).is_empty());
        assert!(idx.apply(ns("a", true)).is_empty());
        assert!(!idx.apply(svc("a", "web", "10.0.0.9")).is_empty());
    }

    #[test]
    fn namespace_joining_and_leaving_dirties_the_mesh() {
        let mut idx = Index::from_objects([ns("a", true), ns("b", false)]);
        let d = idx.apply(ns("b", true));
        assert_eq!(d.resolve(&idx), set(&["a", "b"]));
        let d = idx.apply(ns("b", false));
        assert_eq!(d.resolve(&idx), set(&["a", "b"]));
        assert!(!idx.is_meshed("b"));
        let d = idx.delete(Kind::Namespace, &ObjectRef::new("", "a"));
        assert_eq!(d.resolve(&idx), set(&["a"]));
    }

    #[test]
    fn slices_are_filed_under_their_service_and_move_with_the_label() {
        let mut idx = Index::from_objects([ns("a", true)]);
        let d = idx.apply(slice("a", "web-1", "web", "10.1.0.1"));
        assert_eq!(d.resolve(&idx), set(&["a"]));
        assert_eq!(idx.slices("a", "web").map(|m| m.len()), Some(1));
        idx.apply(slice("a", "web-1", "api", "10.1.0.1"));
        assert!(idx.slices("a", "web").is_none());
        assert_eq!(idx.slices("a", "api").map(|m| m.len()), Some(1));
        let r = ObjectRef::new("a", "web-1");
        let d = idx.delete(Kind::EndpointSlice, &r);
        assert_eq!(d.resolve(&idx), set(&["a"]));
        assert!(idx.slices("a", "api").is_none());
        assert!(idx.delete(Kind::EndpointSlice, &r).is_empty());
    }

    #[test]
    fn pod_metadata_keeps_a_known_service_account() {
        let mut pod = Pod::default();
        pod.metadata.namespace = Some("a".into());
        pod.metadata.name = Some("p".into());
        pod.metadata.labels = Some(BTreeMap::from([(
            PROXY_LABEL.to_owned(),
            PROXY_INJECTED.to_owned(),
        )]));
        pod.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            service_account_name: Some("cart".into()),
            ..Default::default()
        });
        let mut idx = Index::new();
        idx.apply(Object::Pod(Box::new(pod.clone())));
        let mut meta = pod.metadata.clone();
        meta.labels
            .as_mut()
            .expect("labels set above")
            .insert("version".into(), "v2".into());
        let d = idx.apply(Object::PodMetadata(Box::new(meta)));
        assert_eq!(d.resolve(&idx), set(&["a"]));
        let info = idx.pod("a", "p").expect("pod indexed");
        assert!(info.meshed);
        assert_eq!(info.service_account.as_deref(), Some("cart"));
        assert_eq!(info.labels.get("version").map(String::as_str), Some("v2"));
    }

    #[test]
    fn stamps_follow_what_each_service_is_rendered_from() {
        let pod = |name: &str, version: &str| {
            let mut p = Pod::default();
            p.metadata.namespace = Some("a".into());
            p.metadata.name = Some(name.into());
            p.metadata.labels = Some(BTreeMap::from([("version".to_owned(), version.to_owned())]));
            Object::Pod(Box::new(p))
        };
        let mut named = slice("a", "web-1", "web", "10.1.0.1");
        if let Object::EndpointSlice(s) = &mut named {
            s.endpoints[0].target_ref = Some(k8s_openapi::api::core::v1::ObjectReference {
                kind: Some("Pod".into()),
                name: Some("web-0".into()),
                ..Default::default()
            });
        }
        let mut idx = Index::from_objects([
            ns("a", true),
            svc("a", "web", "10.0.0.1"),
            svc("a", "api", "10.0.0.2"),
            named.clone(),
            pod("web-0", "v1"),
        ]);
        let (web, api, space) = (
            idx.service_stamp("a", "web"),
            idx.service_stamp("a", "api"),
            idx.namespace_stamp("a"),
        );
        assert!(web > 0 && api > 0 && space > 0);

        // The pod web's slice names: web changes, api does not.
        idx.apply(pod("web-0", "v2"));
        assert_ne!(idx.service_stamp("a", "web"), web);
        assert_eq!(idx.service_stamp("a", "api"), api);
        assert_ne!(idx.namespace_stamp("a"), space);

        // A pod nobody names: no Service changes.
        let web = idx.service_stamp("a", "web");
        idx.apply(pod("stray", "v1"));
        assert_eq!(idx.service_stamp("a", "web"), web);

        // Once the slice is gone, its pod no longer touches web.
        idx.delete(Kind::EndpointSlice, &ObjectRef::new("a", "web-1"));
        let web = idx.service_stamp("a", "web");
        idx.apply(pod("web-0", "v3"));
        assert_eq!(idx.service_stamp("a", "web"), web);

        // An unchanged apply stamps nothing; a route stamps the namespace.
        let space = idx.namespace_stamp("a");
        idx.apply(svc("a", "api", "10.0.0.2"));
        assert_eq!(idx.namespace_stamp("a"), space);
        let mut route = ServiceRoute::new("r", Default::default());
        route.metadata.namespace = Some("a".into());
        route.metadata.generation = Some(1);
        idx.apply(Object::ServiceRoute(Box::new(route)));
        assert_ne!(idx.namespace_stamp("a"), space);

        // Recording the same acceptance twice stamps once.
        let r = ObjectRef::new("a", "r");
        idx.record_accepted(Kind::ServiceRoute, &r, Some(1));
        let space = idx.namespace_stamp("a");
        idx.record_accepted(Kind::ServiceRoute, &r, Some(1));
        assert_eq!(idx.namespace_stamp("a"), space);

        // A copy that diverges gets stamps the original never had.
        let mut copy = idx.clone();
        copy.apply(svc("a", "api", "10.0.0.3"));
        idx.apply(svc("a", "api", "10.0.0.4"));
        assert_ne!(
            copy.service_stamp("a", "api"),
            idx.service_stamp("a", "api")
        );
    }

    #[test]
    fn access_policy_dirties_only_its_namespace() {
        let mut idx = Index::from_objects([ns("a", true), ns("b", true)]);
        let mut ap = AccessPolicy::new("deny-all", Default::default());
        ap.metadata.namespace = Some("a".into());
        let d = idx.apply(Object::AccessPolicy(Box::new(ap)));
        assert_eq!(d.resolve(&idx), set(&["a"]));
    }

    #[test]
    fn refs_list_what_is_held() {
        let idx = Index::from_objects([ns("a", true), svc("a", "web", "10.0.0.1")]);
        assert_eq!(
            idx.refs(Kind::Service),
            BTreeSet::from([ObjectRef::new("a", "web")])
        );
        assert_eq!(
            idx.refs(Kind::Namespace),
            BTreeSet::from([ObjectRef::new("", "a")])
        );
    }

    #[test]
    fn udp_ports_and_bad_addresses_are_dropped() {
        let mut s = Service::default();
        s.metadata.namespace = Some("a".into());
        s.metadata.name = Some("dns".into());
        s.spec = Some(ServiceSpec {
            cluster_ips: Some(vec!["10.0.0.10".into(), "not-an-ip".into()]),
            ports: Some(vec![
                ServicePort {
                    port: 53,
                    protocol: Some("UDP".into()),
                    ..Default::default()
                },
                ServicePort {
                    port: 53,
                    name: Some("tcp".into()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        });
        let info = ServiceInfo::from_service(&s);
        assert_eq!(
            info.cluster_ips,
            vec!["10.0.0.10".parse::<IpAddr>().expect("ip")]
        );
        assert_eq!(info.ports.len(), 1);
        assert_eq!(info.ports[0].target_port, TargetPort::Number(53));
    }
}
