//! The pure renderer: [`render`]`(&Index, namespace)` → the `proxy.json` of
//! that namespace plus the verdict on every weft resource of the namespace.
//!
//! No I/O happens here; [`crate::config`] calls it for each dirty namespace
//! and `weftctl render` calls it offline through [`render_offline`].
//!
//! # What a namespace sees
//!
//! A meshed namespace's config lists every Service of every meshed namespace
//! (its pods may call any of them, and a meshed server in `Strict` mode only
//! accepts mTLS, so the client proxy must know it is meshed) plus the
//! namespace's own Services. The annotation `weft.dev/visible-namespaces:
//! a,b` on a Namespace narrows "every meshed namespace" to those listed:
//! the config size of a namespace then grows with what it calls, not with
//! the mesh (at 10,000 Services an unscoped config is about 12 MB, far
//! above the 1 MiB ConfigMap limit before compression). Services of namespaces outside the mesh are not
//! listed: traffic to them passes through untouched, as to any unknown
//! destination. `ExternalName` Services have no endpoints and are skipped.
//!
//! # How each part is derived
//!
//! - **Ports** (TCP only), sorted by number. The target port is the number the
//!   EndpointSlices give for the port's name (first slice by name); endpoints
//!   whose slices say otherwise carry a per-endpoint override. Without slices,
//!   a numeric `targetPort`, else the port itself.
//! - **Protocol**, first rule that applies: `ServicePolicy.opaquePorts` →
//!   opaque; `ServicePolicy.ports` → its protocol; the Service's
//!   `appProtocol` (`http`, `kubernetes.io/h2c`, `grpc`, `tcp`, … see
//!   [`app_protocol`]); a port in [`DEFAULT_OPAQUE_PORTS`] (server-first
//!   protocols the proxy must not wait on) → opaque; else detection.
//! - **Endpoints**: ready addresses of the Service's EndpointSlices, deduped
//!   and sorted. An endpoint is meshed when its `targetRef` Pod carries
//!   `weft.dev/proxy=injected` and its service account is known; its identity
//!   is `spiffe://<trust domain>/ns/<ns>/sa/<service account>`. Its subsets
//!   are the `ServicePolicy` subsets whose labels the Pod carries.
//! - **Routes** from the accepted `ServiceRoute`s of the Service: rules of
//!   port-specific routes first (by port), then the all-ports route.
//!   Durations become milliseconds; retries default to 2 attempts on
//!   `connect-failure`, `refused-stream`, `unavailable`, `gateway-error` with
//!   25 ms base backoff capped at ten times the base.
//! - **Client policy** from the accepted `ServicePolicy`, with the documented
//!   API defaults filled in.
//! - **Inbound** (own namespace only): `AccessPolicy`s (service accounts
//!   become SPIFFE identities; `targetService` becomes the Service's selector
//!   and target ports), `ServicePolicy` rate limits (the Service's selector
//!   and target ports), and the protocol of each Service target port that is
//!   not left to detection.
//!
//! # Verdicts
//!
//! Each `ServiceRoute`, `ServicePolicy` and `AccessPolicy` is judged against
//! the index: unknown Service, unknown subset, unknown port, a regex that does
//! not compile, a bad duration or an inconsistent spec reject it, and so does
//! a conflict (two `ServiceRoute`s for the same Service and port, or two
//! `ServicePolicy`s for the same Service: the oldest wins, ties broken by
//! name). A rejected resource never breaks the rest: the last version of it
//! that was accepted (kept by the index) is rendered if it still holds, else
//! nothing.
//!
//! # Two renderers, one output
//!
//! [`render`] builds the whole [`ProxyConfig`] from scratch: the reference,
//! used offline and by tests. [`Renderer`] (module `cache`) produces the
//! same bytes, hash and verdicts from parts it keeps between renders, so a
//! mesh where every namespace lists 10,000 Services renders each Service
//! once per change, not once per namespace; the operator uses it.
//!
//! # Determinism, hash and generation
//!
//! Every list comes from sorted maps or sorted explicitly, so the same index
//! renders byte-identical JSON whatever order objects arrived in. The hash is
//! [`ProxyConfig::seal`]'s. `generation` is derived from the config currently
//! written ([`Index::previous`]): the new content is sealed with the previous
//! generation; if the hash is unchanged the generation stays, otherwise it is
//! the previous plus one. With nothing written yet it is 1. Because the
//! operator reads generation and hash back from the existing ConfigMap, a
//! restart renders the same bytes and writes nothing.

mod cache;
mod gamma;
pub mod gateway;
mod offline;

pub use cache::{Document, Payload, RenderStats, Rendered, Renderer};
pub use gamma::ParentVerdict;
pub use offline::{OfflineError, OfflineOutput, parse_yaml, render_offline, to_object};

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use weft_api::access::{AccessRule as ApiAccessRule, Action, PolicyMode};
use weft_api::policy::{LoadBalancerKind, Protocol as ApiProtocol, RateLimitUnit};
use weft_api::route::{HttpMethod, HttpRule, RetryOn as ApiRetryOn, Scheme};
use weft_api::{AccessPolicySpec, Duration, ServicePolicySpec, ServiceRouteSpec};
use weft_proxy_config as pc;
use weft_proxy_config::ProxyConfig;

use crate::index::{Index, Kind, ObjectRef, ServiceInfo, TargetPort, Tracked};

/// Ports rendered opaque unless configured otherwise (shared with the proxy).
pub use weft_proxy_config::DEFAULT_OPAQUE_PORTS;

const DEFAULT_RETRY_ON: [pc::RetryOn; 4] = [
    pc::RetryOn::ConnectFailure,
    pc::RetryOn::RefusedStream,
    pc::RetryOn::Unavailable,
    pc::RetryOn::GatewayError,
];
const DEFAULT_BACKOFF_BASE_MS: u64 = 25;
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 1_000;
const DEFAULT_IDLE_TIMEOUT_MS: u64 = 90_000;
const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
const DEFAULT_OUTLIER_INTERVAL_MS: u64 = 10_000;
const DEFAULT_BASE_EJECTION_MS: u64 = 30_000;
const DEFAULT_MAX_EJECTION_PERCENT: u32 = 50;
const DEFAULT_RETRY_BUDGET_TTL_MS: u64 = 10_000;

/// What [`render`] produces for one namespace.
#[derive(Clone, Debug, PartialEq)]
pub struct RenderOutput {
    /// The sealed config; [`ProxyConfig::validate`] passes on it.
    pub config: ProxyConfig,
    /// The verdict on every weft resource of the namespace, sorted by kind
    /// then name.
    pub statuses: Vec<CrStatus>,
}

/// Why a resource was not accepted; the `reason` of its `Accepted=False`
/// condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// `spec.service` (or a backend, mirror or `targetService`) names no
    /// Service in the namespace.
    UnknownService,
    /// A backend names a subset no accepted `ServicePolicy` defines.
    UnknownSubset,
    /// A port the resource names is not a TCP port of the Service.
    UnknownPort,
    /// Another, older resource already covers the same Service (and port).
    Conflicted,
    /// A regular expression does not compile.
    InvalidRegex,
    /// A duration does not parse or is zero where that makes no sense.
    InvalidDuration,
    /// Some other inconsistency, explained in the message.
    Invalid,
    /// A Gateway API route asks for something weft does not do (a filter
    /// type, filters on one backend).
    UnsupportedValue,
    /// A Gateway API rule combines filters that exclude each other.
    IncompatibleFilters,
}

impl Reason {
    /// The condition reason string.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UnknownService => "UnknownService",
            Reason::UnknownSubset => "UnknownSubset",
            Reason::UnknownPort => "UnknownPort",
            Reason::Conflicted => "Conflicted",
            Reason::InvalidRegex => "InvalidRegex",
            Reason::InvalidDuration => "InvalidDuration",
            Reason::Invalid => "Invalid",
            Reason::UnsupportedValue => "UnsupportedValue",
            Reason::IncompatibleFilters => "IncompatibleFilters",
        }
    }
}

/// The verdict on one weft resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrStatus {
    /// `ServiceRoute`, `ServicePolicy` or `AccessPolicy`.
    pub kind: Kind,
    /// Which one.
    pub object: ObjectRef,
    /// The `metadata.generation` judged.
    pub generation: Option<i64>,
    /// `None` when accepted, else why not.
    pub rejection: Option<Rejection>,
    /// Gateway API routes: the verdict of each parent weft serves (their
    /// `status.parents` entries); empty for weft's own kinds.
    pub parents: Vec<ParentVerdict>,
}

impl CrStatus {
    /// Whether the judged generation was accepted.
    pub fn accepted(&self) -> bool {
        self.rejection.is_none()
    }

    /// Whether some version of the resource is rendered: the judged one, or
    /// the last accepted one in its place.
    pub fn rendered(&self) -> bool {
        self.rejection
            .as_ref()
            .is_none_or(|r| r.rendering_generation.is_some())
    }

    /// The condition reason (`Accepted` when accepted).
    pub fn reason(&self) -> &'static str {
        self.rejection
            .as_ref()
            .map_or("Accepted", |r| r.reason.as_str())
    }

    /// A human-readable condition message.
    pub fn message(&self) -> String {
        match &self.rejection {
            None => "valid, and every object it refers to exists".to_owned(),
            Some(r) => match r.rendering_generation {
                Some(g) => format!(
                    "{}; still rendering generation {}, the last accepted",
                    r.message,
                    g.map_or_else(|| "?".to_owned(), |g| g.to_string())
                ),
                None => format!("{}; nothing of it is rendered", r.message),
            },
        }
    }
}

/// Why a resource was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Classification.
    pub reason: Reason,
    /// What is wrong, naming the field or the other resource.
    pub message: String,
    /// `Some(generation)` when the last accepted version is rendered instead.
    pub rendering_generation: Option<Option<i64>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Problem {
    reason: Reason,
    message: String,
}

fn problem(reason: Reason, message: impl Into<String>) -> Problem {
    Problem {
        reason,
        message: message.into(),
    }
}

/// Renders the config of `namespace` and judges its weft resources.
pub fn render(index: &Index, namespace: &str) -> RenderOutput {
    let mesh = index.mesh();
    let td = mesh.trust_domain.clone();

    let visible = index.visible_from(namespace);

    let mut services = Vec::new();
    let mut own = None;
    for ns in visible {
        let judged = judge_namespace(index, ns, &td);
        if let Some(svcs) = index.services(ns) {
            for (name, info) in svcs {
                if let Some(s) = render_service(index, &td, ns, name, info, &judged) {
                    services.push(std::sync::Arc::new(s));
                }
            }
        }
        if ns == namespace {
            own = Some(judged);
        }
    }
    let own = own.expect("the namespace itself is always visible");
    let inbound = render_inbound(index, namespace, &own);

    let mut config = skeleton(
        &mesh,
        namespace,
        index.namespace_access_log(namespace),
        inbound,
    );
    config.services = services;
    assign_generation(
        &mut config,
        index.previous(namespace),
        ProxyConfig::compute_hash,
    );
    RenderOutput {
        config,
        statuses: own.statuses,
    }
}

/// The document of `namespace` without Services, not sealed.
fn skeleton(
    mesh: &weft_api::MeshSpec,
    namespace: &str,
    access_log: Option<Option<bool>>,
    inbound: pc::Inbound,
) -> ProxyConfig {
    let log = &mesh.telemetry.access_log;
    // The namespace's annotation, else the Mesh.
    let (log_on, errors_only) = match access_log {
        Some(Some(errors_only)) => (true, errors_only),
        Some(None) => (false, false),
        None => (
            log.enabled,
            log.filter == weft_api::mesh::AccessLogFilter::Errors,
        ),
    };
    ProxyConfig {
        gateway: None,
        version: pc::FORMAT_VERSION,
        generation: 1,
        hash: String::new(),
        namespace: namespace.to_owned(),
        mesh: pc::MeshSettings {
            trust_domain: mesh.trust_domain.clone(),
            mtls_mode: match mesh.mtls.mode {
                weft_api::mesh::MtlsMode::Strict => pc::MtlsMode::Strict,
                weft_api::mesh::MtlsMode::Permissive => pc::MtlsMode::Permissive,
            },
            default_access: access_action(mesh.access.default_action),
            access_log: log_on,
            access_log_options: pc::AccessLogOptions {
                format: match log.format {
                    weft_api::mesh::AccessLogFormat::Json => pc::AccessLogFormat::Json,
                    weft_api::mesh::AccessLogFormat::Text => pc::AccessLogFormat::Text,
                },
                errors_only,
                sample_percent: log.sample_percent,
            },
            tracing: mesh
                .telemetry
                .tracing
                .otlp_endpoint
                .as_ref()
                .map(|e| pc::Tracing {
                    otlp_endpoint: e.clone(),
                    sampling_percent: mesh.telemetry.tracing.sampling_percent,
                }),
            escaped_slashes: match mesh.access.escaped_slashes {
                weft_api::mesh::EscapedSlashes::Reject => pc::EscapedSlashes::Reject,
                weft_api::mesh::EscapedSlashes::Keep => pc::EscapedSlashes::Keep,
            },
            metrics_naming: match mesh.telemetry.metrics.naming {
                weft_api::mesh::MetricsNaming::Weft => pc::MetricsNaming::Weft,
                weft_api::mesh::MetricsNaming::Istio => pc::MetricsNaming::Istio,
                weft_api::mesh::MetricsNaming::Both => pc::MetricsNaming::Both,
            },
        },
        services: Vec::new(),
        inbound,
    }
}

/// Judges the weft resources of a namespace without rendering a config (for
/// namespaces outside the mesh, whose resources still get a status).
pub fn judge(index: &Index, namespace: &str) -> Vec<CrStatus> {
    judge_namespace(index, namespace, &index.mesh().trust_domain).statuses
}

/// Seals `config` with `hash`, keeping the previous generation when the
/// hash is unchanged and taking the next one otherwise.
fn assign_generation(
    config: &mut ProxyConfig,
    previous: Option<&crate::index::Previous>,
    hash: impl Fn(&ProxyConfig) -> String,
) {
    config.generation = previous.map_or(1, |p| p.generation.max(1));
    config.hash = hash(config);
    if let Some(p) = previous
        && p.hash != config.hash
    {
        config.generation = p.generation.saturating_add(1);
        config.hash = hash(config);
    }
}

// ---------------------------------------------------------------------------
// Judging

/// The accepted (or last accepted) form of each resource of one namespace.
struct Judged {
    /// Service name → effective policy.
    policies: BTreeMap<String, EffectivePolicy>,
    /// Service name → routes, port-specific first (by port), then all-ports.
    routes: BTreeMap<String, Vec<EffectiveRoute>>,
    /// Accepted access policies, by name.
    access: Vec<pc::AccessPolicy>,
    /// Accepted mTLS overrides, in the proxy's precedence order.
    mtls: Vec<pc::MtlsOverride>,
    statuses: Vec<CrStatus>,
}

#[derive(Clone, Debug, PartialEq)]
struct EffectivePolicy {
    name: String,
    client: pc::ClientPolicy,
    subsets: Vec<(String, BTreeMap<String, String>)>,
    protocols: BTreeMap<u16, pc::Protocol>,
    rate_limit: Option<(u32, u64, u32)>,
}

#[derive(Clone, Debug, PartialEq)]
struct EffectiveRoute {
    port: Option<u16>,
    http: Vec<pc::HttpRoute>,
    tcp: Vec<pc::TcpRoute>,
}

/// One resource's candidate for rendering, before conflicts are resolved.
struct Candidate<T> {
    name: String,
    created: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    generation: Option<i64>,
    /// The verdict on the current spec.
    current: Result<(), Problem>,
    /// What renders: the current spec if accepted, else the last accepted
    /// one if it still holds, else nothing.
    effective: Option<T>,
    /// The generation of `effective` when it is the fallback.
    fallback_generation: Option<Option<i64>>,
}

fn candidate<S, T>(
    name: &str,
    tracked: &Tracked<S>,
    judge: impl Fn(&S) -> Result<T, Problem>,
) -> Candidate<T> {
    let (current, effective, fallback_generation) = match judge(&tracked.spec) {
        Ok(t) => (Ok(()), Some(t), None),
        Err(p) => {
            let fallback = tracked
                .last_accepted
                .as_ref()
                .filter(|(g, _)| *g != tracked.generation)
                .and_then(|(g, spec)| judge(spec).ok().map(|t| (*g, t)));
            match fallback {
                Some((g, t)) => (Err(p), Some(t), Some(g)),
                None => (Err(p), None, None),
            }
        }
    };
    Candidate {
        name: name.to_owned(),
        created: tracked.created.clone(),
        generation: tracked.generation,
        current,
        effective,
        fallback_generation,
    }
}

type RouteCandidate = Candidate<(String, EffectiveRoute)>;

/// Oldest first, then by name; a missing creation time sorts last.
fn age_key<T>(
    c: &Candidate<T>,
) -> (
    bool,
    Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    &str,
) {
    (c.created.is_none(), c.created.as_ref(), c.name.as_str())
}

fn status_of<T>(kind: Kind, namespace: &str, c: &Candidate<T>, conflict: Option<&str>) -> CrStatus {
    let rejection = match (&c.current, conflict) {
        (Ok(()), None) => None,
        (Ok(()), Some(msg)) => Some(Rejection {
            reason: Reason::Conflicted,
            message: msg.to_owned(),
            rendering_generation: None,
        }),
        (Err(p), conflict) => Some(Rejection {
            reason: p.reason,
            message: p.message.clone(),
            rendering_generation: if conflict.is_none() {
                c.fallback_generation
            } else {
                None
            },
        }),
    };
    CrStatus {
        kind,
        object: ObjectRef::new(namespace, c.name.clone()),
        generation: c.generation,
        rejection,
        parents: Vec::new(),
    }
}

fn judge_namespace(index: &Index, ns: &str, td: &str) -> Judged {
    let mut statuses = Vec::new();

    // ServicePolicies first: routes check subsets against them.
    let mut by_service: BTreeMap<String, Vec<Candidate<(String, EffectivePolicy)>>> =
        BTreeMap::new();
    let mut rejected = Vec::new();
    for (name, t) in index.service_policies(ns).into_iter().flatten() {
        let c = candidate(name, t, |spec| {
            judge_policy(index, ns, spec).map(|p| (spec.service.clone(), p))
        });
        match &c.effective {
            Some((svc, _)) => by_service.entry(svc.clone()).or_default().push(c),
            None => rejected.push(c),
        }
    }
    let mut policies = BTreeMap::new();
    for c in &rejected {
        statuses.push(status_of(Kind::ServicePolicy, ns, c, None));
    }
    for (svc, mut cs) in by_service {
        cs.sort_by(|a, b| age_key(a).cmp(&age_key(b)));
        let winner = cs[0].name.clone();
        for (i, c) in cs.iter().enumerate() {
            let conflict = (i > 0).then(|| {
                format!("ServicePolicy {winner:?} is older and already applies to Service {svc:?}")
            });
            statuses.push(status_of(Kind::ServicePolicy, ns, c, conflict.as_deref()));
        }
        let mut first = cs.swap_remove(0);
        if let Some((_, mut p)) = first.effective.take() {
            p.name = winner;
            policies.insert(svc, p);
        }
    }

    // ServiceRoutes: conflicts per (service, port).
    let mut by_key: BTreeMap<(String, Option<u16>), Vec<RouteCandidate>> = BTreeMap::new();
    for (name, t) in index.routes(ns).into_iter().flatten() {
        let c = candidate(name, t, |spec| {
            judge_route(index, ns, name, spec, &policies).map(|r| (spec.service.clone(), r))
        });
        match &c.effective {
            Some((svc, r)) => by_key.entry((svc.clone(), r.port)).or_default().push(c),
            None => statuses.push(status_of(Kind::ServiceRoute, ns, &c, None)),
        }
    }
    let mut routes: BTreeMap<String, Vec<EffectiveRoute>> = BTreeMap::new();
    for ((svc, port), mut cs) in by_key {
        cs.sort_by(|a, b| age_key(a).cmp(&age_key(b)));
        let winner = cs[0].name.clone();
        for (i, c) in cs.iter().enumerate() {
            let conflict = (i > 0).then(|| {
                let on = port.map_or_else(|| "all ports".to_owned(), |p| format!("port {p}"));
                format!(
                    "ServiceRoute {winner:?} is older and already routes Service {svc:?} on {on}"
                )
            });
            statuses.push(status_of(Kind::ServiceRoute, ns, c, conflict.as_deref()));
        }
        if let Some((_, r)) = cs.swap_remove(0).effective {
            routes.entry(svc).or_default().push(r);
        }
    }
    // HTTPRoutes (GAMMA) on Services no ServiceRoute routes.
    gamma::judge(index, ns, &mut routes, &mut statuses);
    // TLSRoutes of this namespace (their Gateways render them).
    gateway::judge_tls_routes(index, ns, &mut statuses);
    for rs in routes.values_mut() {
        // BTreeMap order put None first; port-specific rules go first.
        rs.sort_by_key(|r| (r.port.is_none(), r.port));
    }

    // AccessPolicies compose; no conflicts.
    let mut access = Vec::new();
    for (name, t) in index.access_policies(ns).into_iter().flatten() {
        let c = candidate(name, t, |spec| judge_access(index, ns, name, spec, td));
        statuses.push(status_of(Kind::AccessPolicy, ns, &c, None));
        if let Some(p) = c.effective {
            access.push(p);
        }
    }

    let mtls = judge_mtls_policies(index, ns, &mut statuses);

    statuses.sort_by(|a, b| (a.kind, &a.object).cmp(&(b.kind, &b.object)));
    Judged {
        policies,
        routes,
        access,
        mtls,
        statuses,
    }
}

/// MtlsPolicies: one namespace-wide policy, and one workload policy per
/// pod. The older wins an overlap (two namespace-wide policies, or two
/// selectors that select a common pod of the namespace); the other is
/// `Conflicted` and not rendered. Rendered: the workload winners oldest
/// first, then the namespace-wide one (the proxy takes the first workload
/// override that selects it).
fn judge_mtls_policies(
    index: &Index,
    ns: &str,
    statuses: &mut Vec<CrStatus>,
) -> Vec<pc::MtlsOverride> {
    let mut cs: Vec<Candidate<pc::MtlsOverride>> = index
        .mtls_policies(ns)
        .into_iter()
        .flatten()
        .map(|(name, t)| candidate(name, t, |spec| Ok(mtls_override(name, spec))))
        .collect();
    cs.sort_by(|a, b| age_key(a).cmp(&age_key(b)));
    let mut winners: Vec<pc::MtlsOverride> = Vec::new();
    for c in &cs {
        let Some(o) = &c.effective else {
            statuses.push(status_of(Kind::MtlsPolicy, ns, c, None));
            continue;
        };
        let conflict = if o.selector.is_empty() {
            winners.iter().find(|w| w.selector.is_empty()).map(|w| {
                format!(
                    "MtlsPolicy {:?} is older and already applies to the whole namespace",
                    w.name
                )
            })
        } else {
            winners
                .iter()
                .filter(|w| !w.selector.is_empty())
                .find_map(|w| {
                    let mut both = index.pods(ns).filter(|(_, p)| {
                        pc::selector_matches(&w.selector, &p.labels)
                            && pc::selector_matches(&o.selector, &p.labels)
                    });
                    both.next().map(|(pod, _)| {
                        format!(
                            "MtlsPolicy {:?} is older and already selects pod {pod}",
                            w.name
                        )
                    })
                })
        };
        statuses.push(status_of(Kind::MtlsPolicy, ns, c, conflict.as_deref()));
        if conflict.is_none() {
            winners.push(o.clone());
        }
    }
    winners.sort_by_key(|w| w.selector.is_empty());
    winners
}

fn mtls_override(name: &str, spec: &weft_api::MtlsPolicySpec) -> pc::MtlsOverride {
    let mode = |m: weft_api::mesh::MtlsMode| match m {
        weft_api::mesh::MtlsMode::Strict => pc::MtlsMode::Strict,
        weft_api::mesh::MtlsMode::Permissive => pc::MtlsMode::Permissive,
    };
    pc::MtlsOverride {
        name: name.to_owned(),
        selector: spec
            .selector
            .as_ref()
            .map(|s| s.match_labels.clone())
            .unwrap_or_default(),
        mode: spec.mode.map(mode),
        ports: spec
            .ports
            .iter()
            .map(|p| pc::PortMtls {
                port: p.port,
                mode: mode(p.mode),
            })
            .collect(),
    }
}

fn service_of<'a>(index: &'a Index, ns: &str, name: &str) -> Result<&'a ServiceInfo, Problem> {
    index
        .service(ns, name)
        .filter(|s| !s.external_name)
        .ok_or_else(|| {
            problem(
                Reason::UnknownService,
                format!("Service {ns}/{name} does not exist (or is an ExternalName Service)"),
            )
        })
}

fn has_port(svc: &ServiceInfo, port: u16) -> bool {
    svc.ports.iter().any(|p| p.port == port)
}

fn millis(d: &Duration, field: &str) -> Result<u64, Problem> {
    let std = d
        .to_std()
        .map_err(|e| problem(Reason::InvalidDuration, format!("{field}: {e}")))?;
    Ok(u64::try_from(std.as_millis()).unwrap_or(u64::MAX))
}

fn positive_millis(d: &Duration, field: &str) -> Result<u64, Problem> {
    match millis(d, field)? {
        0 => Err(problem(
            Reason::InvalidDuration,
            format!("{field}: {d} must be at least 1ms"),
        )),
        ms => Ok(ms),
    }
}

fn percent(value: f64, field: &str) -> Result<f64, Problem> {
    if (0.0..=100.0).contains(&value) {
        Ok(value)
    } else {
        Err(problem(
            Reason::Invalid,
            format!("{field}: {value} is not a percentage (0–100)"),
        ))
    }
}

fn judge_policy(
    index: &Index,
    ns: &str,
    spec: &ServicePolicySpec,
) -> Result<EffectivePolicy, Problem> {
    let svc = service_of(index, ns, &spec.service)?;
    let load_balancer = match &spec.load_balancer {
        None => pc::LoadBalancer::default(),
        Some(lb) => match lb.kind {
            LoadBalancerKind::RoundRobin => pc::LoadBalancer::RoundRobin,
            LoadBalancerKind::LeastRequest => pc::LoadBalancer::LeastRequest,
            LoadBalancerKind::Random => pc::LoadBalancer::Random,
            LoadBalancerKind::ConsistentHash => {
                let h = lb.consistent_hash.as_ref().ok_or_else(|| {
                    problem(
                        Reason::Invalid,
                        "loadBalancer.consistentHash is required for ConsistentHash",
                    )
                })?;
                let key = match (&h.header, &h.cookie, h.source_ip.unwrap_or(false)) {
                    (Some(name), None, false) if !name.is_empty() => {
                        pc::HashKey::Header(name.to_ascii_lowercase())
                    }
                    (None, Some(c), false) if !c.name.is_empty() => {
                        pc::HashKey::Cookie(c.name.clone())
                    }
                    (None, None, true) => pc::HashKey::SourceIp,
                    _ => {
                        return Err(problem(
                            Reason::Invalid,
                            "loadBalancer.consistentHash needs exactly one of header, cookie or sourceIp",
                        ));
                    }
                };
                pc::LoadBalancer::ConsistentHash(key)
            }
        },
    };
    let connection_pool = spec
        .connection_pool
        .as_ref()
        .map(|c| -> Result<_, Problem> {
            Ok(pc::ConnectionPool {
                max_connections: c.max_connections,
                max_pending_requests: c.max_pending_requests,
                max_requests: c.max_requests,
                max_requests_per_connection: c.max_requests_per_connection.filter(|&n| n > 0),
                connect_timeout_ms: c
                    .connect_timeout
                    .as_ref()
                    .map_or(Ok(DEFAULT_CONNECT_TIMEOUT_MS), |d| {
                        positive_millis(d, "connectionPool.connectTimeout")
                    })?,
                idle_timeout_ms: c
                    .idle_timeout
                    .as_ref()
                    .map_or(Ok(DEFAULT_IDLE_TIMEOUT_MS), |d| {
                        millis(d, "connectionPool.idleTimeout")
                    })?,
            })
        })
        .transpose()?;
    let outlier_detection = spec
        .outlier_detection
        .as_ref()
        .map(|o| -> Result<_, Problem> {
            let max = o
                .max_ejection_percent
                .unwrap_or(DEFAULT_MAX_EJECTION_PERCENT);
            if max > 100 {
                return Err(problem(
                    Reason::Invalid,
                    format!("outlierDetection.maxEjectionPercent: {max} is not a percentage"),
                ));
            }
            let consecutive_5xx = match (o.consecutive_5xx_errors, o.consecutive_gateway_errors) {
                (None, None) => Some(DEFAULT_CONSECUTIVE_5XX),
                (c, _) => c,
            };
            Ok(pc::OutlierDetection {
                consecutive_5xx,
                consecutive_gateway_errors: o.consecutive_gateway_errors,
                interval_ms: o
                    .interval
                    .as_ref()
                    .map_or(Ok(DEFAULT_OUTLIER_INTERVAL_MS), |d| {
                        positive_millis(d, "outlierDetection.interval")
                    })?,
                base_ejection_ms: o
                    .base_ejection_time
                    .as_ref()
                    .map_or(Ok(DEFAULT_BASE_EJECTION_MS), |d| {
                        millis(d, "outlierDetection.baseEjectionTime")
                    })?,
                max_ejection_percent: max,
            })
        })
        .transpose()?;
    let retry_budget = spec
        .retry_budget
        .as_ref()
        .map(|b| -> Result<_, Problem> {
            Ok(pc::RetryBudget {
                retry_percent: percent(b.retry_percent, "retryBudget.retryPercent")?,
                min_retries_per_second: b.min_retries_per_second,
                ttl_ms: b
                    .ttl
                    .as_ref()
                    .map_or(Ok(DEFAULT_RETRY_BUDGET_TTL_MS), |d| {
                        positive_millis(d, "retryBudget.ttl")
                    })?,
            })
        })
        .transpose()?;

    let mut protocols = BTreeMap::new();
    for p in &spec.ports {
        if !has_port(svc, p.port) {
            return Err(problem(
                Reason::UnknownPort,
                format!(
                    "ports: Service {ns}/{} has no TCP port {}",
                    spec.service, p.port
                ),
            ));
        }
        protocols.insert(
            p.port,
            match p.protocol {
                ApiProtocol::Http => pc::Protocol::Http1,
                ApiProtocol::Http2 => pc::Protocol::Http2,
                ApiProtocol::Grpc => pc::Protocol::Grpc,
                ApiProtocol::Tcp => pc::Protocol::Opaque,
            },
        );
    }
    for &port in &spec.opaque_ports {
        if !has_port(svc, port) {
            return Err(problem(
                Reason::UnknownPort,
                format!(
                    "opaquePorts: Service {ns}/{} has no TCP port {port}",
                    spec.service
                ),
            ));
        }
        protocols.insert(port, pc::Protocol::Opaque);
    }

    let mut seen = BTreeSet::new();
    for s in &spec.subsets {
        if !seen.insert(s.name.as_str()) {
            return Err(problem(
                Reason::Invalid,
                format!("subsets: duplicate name {:?}", s.name),
            ));
        }
        if s.labels.is_empty() {
            return Err(problem(
                Reason::Invalid,
                format!("subsets[{}]: labels must not be empty", s.name),
            ));
        }
    }

    let rate_limit = match &spec.rate_limit {
        None => None,
        Some(rl) => {
            if svc.selector.is_none() {
                return Err(problem(
                    Reason::Invalid,
                    format!(
                        "rateLimit: Service {ns}/{} has no selector, so no pods to enforce it on",
                        spec.service
                    ),
                ));
            }
            if rl.requests == 0 {
                return Err(problem(
                    Reason::Invalid,
                    "rateLimit.requests must be above 0",
                ));
            }
            let interval = match rl.unit {
                RateLimitUnit::Second => 1_000,
                RateLimitUnit::Minute => 60_000,
                RateLimitUnit::Hour => 3_600_000,
            };
            Some((rl.requests, interval, rl.burst))
        }
    };

    Ok(EffectivePolicy {
        name: String::new(),
        client: pc::ClientPolicy {
            load_balancer,
            connection_pool,
            outlier_detection,
            retry_budget,
        },
        subsets: spec
            .subsets
            .iter()
            .map(|s| (s.name.clone(), s.labels.clone()))
            .collect(),
        protocols,
        rate_limit,
    })
}

fn check_regex(pattern: &str, field: &str) -> Result<(), Problem> {
    regex::Regex::new(&format!("^(?:{pattern})$"))
        .map(|_| ())
        .map_err(|e| {
            problem(
                Reason::InvalidRegex,
                format!("{field}: regex {pattern:?} does not compile: {e}"),
            )
        })
}

/// What backends of one `ServiceRoute` are resolved against.
struct Scope<'a> {
    index: &'a Index,
    ns: &'a str,
    routed: &'a str,
    policies: &'a BTreeMap<String, EffectivePolicy>,
}

fn backend(
    scope: &Scope<'_>,
    service: Option<&str>,
    subset: Option<&str>,
    port: Option<u16>,
    weight: u32,
    field: &str,
) -> Result<pc::Backend, Problem> {
    let Scope {
        index,
        ns,
        routed,
        policies,
    } = *scope;
    let name = service.unwrap_or(routed);
    let svc = service_of(index, ns, name)
        .map_err(|p| problem(p.reason, format!("{field}: {}", p.message)))?;
    if let Some(s) = subset
        && !policies
            .get(name)
            .is_some_and(|p| p.subsets.iter().any(|(n, _)| n == s))
    {
        return Err(problem(
            Reason::UnknownSubset,
            format!(
                "{field}: no accepted ServicePolicy of Service {ns}/{name} defines subset {s:?}"
            ),
        ));
    }
    if let Some(p) = port
        && !has_port(svc, p)
    {
        return Err(problem(
            Reason::UnknownPort,
            format!("{field}: Service {ns}/{name} has no TCP port {p}"),
        ));
    }
    Ok(pc::Backend {
        service: format!("{ns}/{name}"),
        subset: subset.map(str::to_owned),
        port,
        weight,
    })
}

/// Resolves the weighted backends of the rule at `at`; when there are any,
/// at least one must carry weight.
fn backends(
    scope: &Scope<'_>,
    list: &[weft_api::route::Backend],
    at: &str,
) -> Result<Vec<pc::Backend>, Problem> {
    let out = list
        .iter()
        .enumerate()
        .map(|(j, b)| {
            backend(
                scope,
                b.service.as_deref(),
                b.subset.as_deref(),
                b.port,
                b.weight,
                &format!("{at}.backends[{j}]"),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    if !out.is_empty() && out.iter().all(|b| b.weight == 0) {
        return Err(problem(
            Reason::Invalid,
            format!("{at}: every backend has weight 0"),
        ));
    }
    Ok(out)
}

fn method(m: HttpMethod) -> &'static str {
    match m {
        HttpMethod::Get => "GET",
        HttpMethod::Head => "HEAD",
        HttpMethod::Post => "POST",
        HttpMethod::Put => "PUT",
        HttpMethod::Delete => "DELETE",
        HttpMethod::Connect => "CONNECT",
        HttpMethod::Options => "OPTIONS",
        HttpMethod::Trace => "TRACE",
        HttpMethod::Patch => "PATCH",
    }
}

fn retry_on(r: ApiRetryOn) -> pc::RetryOn {
    match r {
        ApiRetryOn::ServerError => pc::RetryOn::ServerError,
        ApiRetryOn::GatewayError => pc::RetryOn::GatewayError,
        ApiRetryOn::Reset => pc::RetryOn::Reset,
        ApiRetryOn::ConnectFailure => pc::RetryOn::ConnectFailure,
        ApiRetryOn::Retriable4xx => pc::RetryOn::Retriable4xx,
        ApiRetryOn::RefusedStream => pc::RetryOn::RefusedStream,
        ApiRetryOn::RetriableStatusCodes => pc::RetryOn::RetriableStatusCodes,
        ApiRetryOn::Unavailable => pc::RetryOn::Unavailable,
        ApiRetryOn::Cancelled => pc::RetryOn::Cancelled,
        ApiRetryOn::DeadlineExceeded => pc::RetryOn::DeadlineExceeded,
        ApiRetryOn::ResourceExhausted => pc::RetryOn::ResourceExhausted,
    }
}

fn header_ops(m: Option<&weft_api::route::HeaderModifier>) -> pc::HeaderOps {
    let Some(m) = m else {
        return pc::HeaderOps::default();
    };
    pc::HeaderOps {
        set: m
            .set
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
            .collect(),
        add: m
            .add
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
            .collect(),
        remove: m.remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
    }
}

fn judge_route(
    index: &Index,
    ns: &str,
    route_name: &str,
    spec: &ServiceRouteSpec,
    policies: &BTreeMap<String, EffectivePolicy>,
) -> Result<EffectiveRoute, Problem> {
    let svc = service_of(index, ns, &spec.service)?;
    let scope = Scope {
        index,
        ns,
        routed: &spec.service,
        policies,
    };
    if let Some(p) = spec.port
        && !has_port(svc, p)
    {
        return Err(problem(
            Reason::UnknownPort,
            format!("port: Service {ns}/{} has no TCP port {p}", spec.service),
        ));
    }
    if spec.http.is_empty() && spec.tcp.is_empty() {
        return Err(problem(
            Reason::Invalid,
            "a ServiceRoute needs at least one http or tcp rule",
        ));
    }
    if spec.tcp.len() > 1 {
        return Err(problem(
            Reason::Invalid,
            "tcp: at most one tcp rule per ServiceRoute (TCP rules have no matches; put every backend in one rule)",
        ));
    }
    let http = spec
        .http
        .iter()
        .enumerate()
        .map(|(i, rule)| http_route(index, ns, route_name, spec, i, rule, policies))
        .collect::<Result<Vec<_>, _>>()?;
    let tcp = spec
        .tcp
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            let at = format!("tcp[{i}]");
            if rule.backends.is_empty() {
                return Err(problem(
                    Reason::Invalid,
                    format!("{at}: a tcp rule needs backends"),
                ));
            }
            let backends = backends(&scope, &rule.backends, &at)?;
            Ok(pc::TcpRoute {
                name: format!("{route_name}/{}", rule.name.as_deref().unwrap_or("tcp")),
                port: spec.port,
                backends,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(EffectiveRoute {
        port: spec.port,
        http,
        tcp,
    })
}

fn http_route(
    index: &Index,
    ns: &str,
    route_name: &str,
    spec: &ServiceRouteSpec,
    i: usize,
    rule: &HttpRule,
    policies: &BTreeMap<String, EffectivePolicy>,
) -> Result<pc::HttpRoute, Problem> {
    let at = format!("http[{i}]");
    let scope = Scope {
        index,
        ns,
        routed: &spec.service,
        policies,
    };
    let mut matches = Vec::with_capacity(rule.matches.len());
    for (j, m) in rule.matches.iter().enumerate() {
        let m_at = format!("{at}.matches[{j}]");
        let path = match &m.path {
            None => None,
            Some(p) => Some(match (&p.exact, &p.prefix, &p.regex) {
                (Some(e), None, None) if e.starts_with('/') => pc::PathMatch::Exact(e.clone()),
                (None, Some(pre), None) if pre.starts_with('/') => {
                    pc::PathMatch::Prefix(pre.clone())
                }
                (None, None, Some(re)) => {
                    check_regex(re, &format!("{m_at}.path.regex"))?;
                    pc::PathMatch::Regex(re.clone())
                }
                _ => {
                    return Err(problem(
                        Reason::Invalid,
                        format!(
                            "{m_at}.path: exactly one of exact, prefix or regex, starting with /"
                        ),
                    ));
                }
            }),
        };
        let headers = m
            .headers
            .iter()
            .enumerate()
            .map(|(k, h)| {
                let f = format!("{m_at}.headers[{k}]");
                let value = value_match(
                    h.exact.as_ref(),
                    h.prefix.as_ref(),
                    h.regex.as_ref(),
                    h.present,
                    &f,
                )?;
                if h.name.is_empty() {
                    return Err(problem(Reason::Invalid, format!("{f}: empty name")));
                }
                Ok(pc::NamedMatch {
                    name: h.name.to_ascii_lowercase(),
                    value,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let query_params = m
            .query_params
            .iter()
            .enumerate()
            .map(|(k, q)| {
                let f = format!("{m_at}.queryParams[{k}]");
                let value = value_match(q.exact.as_ref(), None, q.regex.as_ref(), q.present, &f)?;
                if q.name.is_empty() {
                    return Err(problem(Reason::Invalid, format!("{f}: empty name")));
                }
                Ok(pc::NamedMatch {
                    name: q.name.clone(),
                    value,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        matches.push(pc::HttpMatch {
            path,
            headers,
            query_params,
            method: m.method.map(|m| method(m).to_owned()),
        });
    }

    let backends = backends(&scope, &rule.backends, &at)?;

    let timeout_ms = rule
        .timeout
        .as_ref()
        .map(|d| positive_millis(d, &format!("{at}.timeout")))
        .transpose()?;

    let retry = rule
        .retries
        .as_ref()
        .map(|r| -> Result<_, Problem> {
            if r.attempts > 10 {
                return Err(problem(
                    Reason::Invalid,
                    format!("{at}.retries.attempts: {} is more than 10", r.attempts),
                ));
            }
            let base = match r.backoff.as_ref().and_then(|b| b.base_interval.as_ref()) {
                Some(d) => positive_millis(d, &format!("{at}.retries.backoff.baseInterval"))?,
                None => DEFAULT_BACKOFF_BASE_MS,
            };
            let max = match r.backoff.as_ref().and_then(|b| b.max_interval.as_ref()) {
                Some(d) => millis(d, &format!("{at}.retries.backoff.maxInterval"))?,
                None => base.saturating_mul(10),
            };
            if max < base {
                return Err(problem(
                    Reason::InvalidDuration,
                    format!("{at}.retries.backoff: maxInterval ({max}ms) is below baseInterval ({base}ms)"),
                ));
            }
            let mut codes = Vec::with_capacity(r.retriable_status_codes.len());
            for c in &r.retriable_status_codes {
                if !(100..=599).contains(&c.0) {
                    return Err(problem(
                        Reason::Invalid,
                        format!("{at}.retries.retriableStatusCodes: {} is not a status code", c.0),
                    ));
                }
                codes.push(c.0);
            }
            Ok(pc::RetryPolicy {
                attempts: r.attempts,
                per_try_timeout_ms: r
                    .per_try_timeout
                    .as_ref()
                    .map(|d| positive_millis(d, &format!("{at}.retries.perTryTimeout")))
                    .transpose()?,
                retry_on: if r.retry_on.is_empty() {
                    DEFAULT_RETRY_ON.to_vec()
                } else {
                    r.retry_on.iter().copied().map(retry_on).collect()
                },
                retriable_status_codes: codes,
                backoff_base_ms: base,
                backoff_max_ms: max,
            })
        })
        .transpose()?;

    let fault = rule
        .fault
        .as_ref()
        .map(|f| -> Result<_, Problem> {
            if f.delay.is_none() && f.abort.is_none() {
                return Err(problem(
                    Reason::Invalid,
                    format!("{at}.fault: needs a delay or an abort"),
                ));
            }
            Ok(pc::Fault {
                delay: f
                    .delay
                    .as_ref()
                    .map(|d| -> Result<_, Problem> {
                        Ok(pc::FaultDelay {
                            delay_ms: millis(
                                &d.fixed_delay,
                                &format!("{at}.fault.delay.fixedDelay"),
                            )?,
                            percent: percent(d.percent, &format!("{at}.fault.delay.percent"))?,
                        })
                    })
                    .transpose()?,
                abort: f
                    .abort
                    .as_ref()
                    .map(|a| -> Result<_, Problem> {
                        if !(200..=599).contains(&a.http_status) {
                            return Err(problem(
                                Reason::Invalid,
                                format!(
                                    "{at}.fault.abort.httpStatus: {} is not an error status",
                                    a.http_status
                                ),
                            ));
                        }
                        Ok(pc::FaultAbort {
                            status: a.http_status,
                            percent: percent(a.percent, &format!("{at}.fault.abort.percent"))?,
                        })
                    })
                    .transpose()?,
            })
        })
        .transpose()?;

    let mirror = rule
        .mirror
        .as_ref()
        .map(|m| -> Result<_, Problem> {
            Ok(pc::Mirror {
                backend: backend(
                    &scope,
                    Some(&m.service),
                    m.subset.as_deref(),
                    m.port,
                    1,
                    &format!("{at}.mirror"),
                )?,
                percent: percent(m.percent, &format!("{at}.mirror.percent"))?,
            })
        })
        .transpose()?;

    let rewrite = rule.rewrite.as_ref().map(|r| pc::Rewrite {
        path: r.path.clone(),
        path_prefix: r.path_prefix.clone(),
        authority: r.authority.clone(),
    });
    if let Some(r) = &rewrite
        && r.path.is_some()
        && r.path_prefix.is_some()
    {
        return Err(problem(
            Reason::Invalid,
            format!("{at}.rewrite: path and pathPrefix are mutually exclusive"),
        ));
    }
    let redirect = rule.redirect.as_ref().map(|r| pc::Redirect {
        scheme: r.scheme.map(|s| match s {
            Scheme::Http => "http".to_owned(),
            Scheme::Https => "https".to_owned(),
        }),
        host: r.host.clone(),
        port: r.port,
        path: r.path.clone(),
        path_prefix: None,
        status: r.status_code,
    });
    if let Some(r) = &redirect {
        if !backends.is_empty() || rewrite.is_some() {
            return Err(problem(
                Reason::Invalid,
                format!("{at}.redirect: a redirect rule has no backends and no rewrite"),
            ));
        }
        if ![301, 302, 303, 307, 308].contains(&r.status) {
            return Err(problem(
                Reason::Invalid,
                format!(
                    "{at}.redirect.statusCode: {} is not a redirect status",
                    r.status
                ),
            ));
        }
    }

    Ok(pc::HttpRoute {
        name: format!(
            "{route_name}/{}",
            rule.name.clone().unwrap_or_else(|| i.to_string())
        ),
        port: spec.port,
        matches,
        backends,
        timeout_ms,
        retry,
        fault,
        mirror,
        request_headers: header_ops(rule.request_headers.as_ref()),
        response_headers: header_ops(rule.response_headers.as_ref()),
        rewrite,
        redirect,
        unresolved_weight: 0,
    })
}

fn value_match(
    exact: Option<&String>,
    prefix: Option<&String>,
    regex: Option<&String>,
    present: Option<bool>,
    field: &str,
) -> Result<pc::ValueMatch, Problem> {
    match (exact, prefix, regex, present) {
        (Some(e), None, None, None) => Ok(pc::ValueMatch::Exact(e.clone())),
        (None, Some(p), None, None) => Ok(pc::ValueMatch::Prefix(p.clone())),
        (None, None, Some(r), None) => {
            check_regex(r, field)?;
            Ok(pc::ValueMatch::Regex(r.clone()))
        }
        (None, None, None, Some(b)) => Ok(pc::ValueMatch::Present(b)),
        _ => Err(problem(
            Reason::Invalid,
            format!("{field}: exactly one of exact, prefix, regex or present"),
        )),
    }
}

fn access_action(a: Action) -> pc::AccessAction {
    match a {
        Action::Allow => pc::AccessAction::Allow,
        Action::Deny => pc::AccessAction::Deny,
    }
}

fn identity_matches(pattern: &str, id: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => id.starts_with(prefix),
        None => pattern == id,
    }
}

fn judge_access(
    index: &Index,
    ns: &str,
    name: &str,
    spec: &AccessPolicySpec,
    td: &str,
) -> Result<pc::AccessPolicy, Problem> {
    let (selector, ports) = match (&spec.selector, &spec.target_service) {
        (Some(_), Some(_)) => {
            return Err(problem(
                Reason::Invalid,
                "set selector or targetService, not both",
            ));
        }
        (Some(sel), None) => (sel.match_labels.clone(), Vec::new()),
        (None, Some(svc_name)) => {
            let svc = service_of(index, ns, svc_name)
                .map_err(|p| problem(p.reason, format!("targetService: {}", p.message)))?;
            let Some(selector) = svc.selector.clone() else {
                return Err(problem(
                    Reason::Invalid,
                    format!(
                        "targetService: Service {ns}/{svc_name} has no selector, so no pods to protect"
                    ),
                ));
            };
            let mut ports: Vec<u16> = target_ports(index, ns, svc_name, svc)
                .into_iter()
                .flat_map(|(_, t)| t)
                .collect();
            ports.sort_unstable();
            ports.dedup();
            if ports.is_empty() {
                return Err(problem(
                    Reason::UnknownPort,
                    format!(
                        "targetService: the target ports of Service {ns}/{svc_name} are not known yet"
                    ),
                ));
            }
            (selector, ports)
        }
        (None, None) => (BTreeMap::new(), Vec::new()),
    };
    let rules = spec
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| access_rule(ns, td, i, r))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    Ok(pc::AccessPolicy {
        name: name.to_owned(),
        selector,
        ports,
        action: access_action(spec.action),
        audit: spec.mode == PolicyMode::Audit,
        rules,
    })
}

/// Converts one rule. `Ok(None)`: the rule can never match (every source is
/// self-contradictory) and is dropped, which narrows the policy exactly as
/// the rule would have.
fn access_rule(
    ns: &str,
    td: &str,
    i: usize,
    r: &ApiAccessRule,
) -> Result<Option<pc::AccessRule>, Problem> {
    let at = format!("rules[{i}]");
    let mut from = Vec::with_capacity(r.from.len());
    for (j, s) in r.from.iter().enumerate() {
        let mut sa_ids = Vec::with_capacity(s.service_accounts.len());
        for sa in &s.service_accounts {
            let (sa_ns, sa_name) = sa.split_once('/').unwrap_or((ns, sa.as_str()));
            if sa_ns.is_empty() || sa_name.is_empty() || sa_name.contains('/') {
                return Err(problem(
                    Reason::Invalid,
                    format!("{at}.from[{j}].serviceAccounts: {sa:?} is not name or namespace/name"),
                ));
            }
            sa_ids.push(format!("spiffe://{td}/ns/{sa_ns}/sa/{sa_name}"));
        }
        for id in &s.identities {
            if !id.starts_with("spiffe://") {
                return Err(problem(
                    Reason::Invalid,
                    format!("{at}.from[{j}].identities: {id:?} is not a spiffe:// ID"),
                ));
            }
        }
        // Both lists given: the caller must be in both, so keep the service
        // accounts that some identity pattern admits.
        let identities = match (sa_ids.is_empty(), s.identities.is_empty()) {
            (true, _) => s.identities.clone(),
            (false, true) => sa_ids,
            (false, false) => {
                let both: Vec<String> = sa_ids
                    .into_iter()
                    .filter(|id| s.identities.iter().any(|p| identity_matches(p, id)))
                    .collect();
                if both.is_empty() {
                    continue;
                }
                both
            }
        };
        let unauthenticated = s.unauthenticated.unwrap_or(false);
        if identities.is_empty() && s.namespaces.is_empty() && !unauthenticated {
            // An empty source would match anyone; the API requires content.
            return Err(problem(
                Reason::Invalid,
                format!(
                    "{at}.from[{j}]: needs serviceAccounts, namespaces, identities or unauthenticated"
                ),
            ));
        }
        if unauthenticated && (!identities.is_empty() || !s.namespaces.is_empty()) {
            // A caller without identity has no namespace or identity either.
            continue;
        }
        from.push(pc::AccessSource {
            identities,
            namespaces: s.namespaces.clone(),
            unauthenticated,
        });
    }
    if !r.from.is_empty() && from.is_empty() {
        return Ok(None);
    }
    let mut to = Vec::with_capacity(r.to.len());
    for (j, d) in r.to.iter().enumerate() {
        for p in &d.paths {
            if !p.starts_with('/') && p != "*" {
                return Err(problem(
                    Reason::Invalid,
                    format!("{at}.to[{j}].paths: {p:?} does not start with /"),
                ));
            }
        }
        to.push(pc::AccessDestination {
            ports: d.ports.clone(),
            methods: d.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
            paths: d.paths.clone(),
        });
    }
    Ok(Some(pc::AccessRule { from, to }))
}

// ---------------------------------------------------------------------------
// Services and endpoints

/// Maps a Service port's `appProtocol` to the proxy's protocol; `None` when
/// the value says nothing the proxy can use (then the next rule applies).
pub fn app_protocol(value: &str) -> Option<pc::Protocol> {
    match value.to_ascii_lowercase().as_str() {
        "http" | "http1" | "http/1.1" | "kubernetes.io/ws" => Some(pc::Protocol::Http1),
        "http2" | "h2c" | "kubernetes.io/h2c" => Some(pc::Protocol::Http2),
        "grpc" | "grpc-web" => Some(pc::Protocol::Grpc),
        "tcp" | "https" | "tls" | "kubernetes.io/wss" | "mysql" | "postgresql" | "postgres"
        | "redis" | "mongo" | "mongodb" | "kafka" => Some(pc::Protocol::Opaque),
        _ => None,
    }
}

/// For each TCP port of a Service: the target port every endpoint slice
/// agrees on first, and every number seen, by slice order.
fn target_ports(index: &Index, ns: &str, name: &str, svc: &ServiceInfo) -> Vec<(u16, Vec<u16>)> {
    let slices = index.slices(ns, name);
    svc.ports
        .iter()
        .map(|p| {
            let mut seen: Vec<u16> = Vec::new();
            for slice in slices.into_iter().flat_map(|m| m.values()) {
                if slice.endpoints.is_empty() {
                    continue;
                }
                if let Some((_, n)) = slice.ports.iter().find(|(pn, _)| *pn == p.name)
                    && !seen.contains(n)
                {
                    seen.push(*n);
                }
            }
            if seen.is_empty()
                && let TargetPort::Number(n) = p.target_port
            {
                seen.push(n);
            }
            (p.port, seen)
        })
        .collect()
}

fn render_service(
    index: &Index,
    td: &str,
    ns: &str,
    name: &str,
    info: &ServiceInfo,
    judged: &Judged,
) -> Option<pc::Service> {
    if info.external_name {
        return None;
    }
    let policy = judged.policies.get(name);
    let targets = target_ports(index, ns, name, info);
    let mut ports: Vec<pc::ServicePort> = info
        .ports
        .iter()
        .zip(&targets)
        .map(|(p, (_, seen))| pc::ServicePort {
            port: p.port,
            name: p.name.clone(),
            target_port: seen.first().copied().unwrap_or(p.port),
            protocol: port_protocol(policy, p.port, p.app_protocol.as_deref(), &p.target_port),
        })
        .collect();
    ports.sort_by_key(|p| p.port);
    ports.dedup_by_key(|p| p.port);

    let subsets: &[(String, BTreeMap<String, String>)] = policy.map_or(&[], |p| &p.subsets);
    let mut endpoints: BTreeMap<IpAddr, pc::Endpoint> = BTreeMap::new();
    for slice in index.slices(ns, name).into_iter().flat_map(|m| m.values()) {
        // Named ports whose number here differs from the Service-wide one.
        let overrides: BTreeMap<String, u16> = ports
            .iter()
            .filter_map(|sp| {
                let n = sp.name.as_ref()?;
                let (_, here) = slice.ports.iter().find(|(pn, _)| pn.as_ref() == Some(n))?;
                (*here != sp.target_port).then(|| (n.clone(), *here))
            })
            .collect();
        for ep in slice.endpoints.iter().filter(|e| e.ready) {
            let pod = ep.pod.as_deref().and_then(|p| index.pod(ns, p));
            let identity = pod
                .filter(|p| p.meshed)
                .and_then(|p| p.service_account.as_deref())
                .map(|sa| format!("spiffe://{td}/ns/{ns}/sa/{sa}"));
            let ep_subsets: Vec<String> = match pod {
                Some(p) => subsets
                    .iter()
                    .filter(|(_, labels)| pc::selector_matches(labels, &p.labels))
                    .map(|(n, _)| n.clone())
                    .collect(),
                None => Vec::new(),
            };
            for addr in &ep.addresses {
                endpoints.entry(*addr).or_insert_with(|| pc::Endpoint {
                    address: *addr,
                    meshed: identity.is_some(),
                    identity: identity.clone(),
                    pod: ep.pod.clone(),
                    workload: pod.and_then(|p| p.workload.clone()),
                    app: pod
                        .and_then(|p| pc::app_label(&p.labels))
                        .map(str::to_owned),
                    version: pod
                        .and_then(|p| pc::version_label(&p.labels))
                        .map(str::to_owned),
                    subsets: ep_subsets.clone(),
                    ports: overrides.clone(),
                    terminating: false,
                });
            }
        }
    }

    let mut http_routes = Vec::new();
    let mut tcp_routes = Vec::new();
    for r in judged.routes.get(name).into_iter().flatten() {
        http_routes.extend(r.http.iter().cloned());
        tcp_routes.extend(r.tcp.iter().cloned());
    }

    Some(pc::Service {
        name: name.to_owned(),
        namespace: ns.to_owned(),
        cluster_ips: info.cluster_ips.clone(),
        ports,
        subsets: subsets.iter().map(|(n, _)| n.clone()).collect(),
        endpoints: endpoints.into_values().collect(),
        http_routes,
        tcp_routes,
        policy: policy.map(|p| p.client.clone()).unwrap_or_default(),
    })
}

fn port_protocol(
    policy: Option<&EffectivePolicy>,
    port: u16,
    app: Option<&str>,
    target: &TargetPort,
) -> pc::Protocol {
    if let Some(p) = policy.and_then(|p| p.protocols.get(&port)) {
        return *p;
    }
    if let Some(p) = app.and_then(app_protocol) {
        return p;
    }
    let target_default =
        matches!(target, TargetPort::Number(n) if DEFAULT_OPAQUE_PORTS.contains(n));
    if DEFAULT_OPAQUE_PORTS.contains(&port) || target_default {
        return pc::Protocol::Opaque;
    }
    pc::Protocol::Detect
}

fn render_inbound(index: &Index, ns: &str, judged: &Judged) -> pc::Inbound {
    let mut policies = judged.access.clone();
    policies.sort_by(|a, b| a.name.cmp(&b.name));

    let mut rate_limits = Vec::new();
    let mut ports = Vec::new();
    for (name, svc) in index.services(ns).into_iter().flatten() {
        let Some(selector) = svc.selector.as_ref() else {
            continue;
        };
        if svc.external_name {
            continue;
        }
        let policy = judged.policies.get(name);
        let targets = target_ports(index, ns, name, svc);
        for (p, (_, seen)) in svc.ports.iter().zip(&targets) {
            let protocol = port_protocol(policy, p.port, p.app_protocol.as_deref(), &p.target_port);
            if protocol == pc::Protocol::Detect {
                continue;
            }
            for &t in seen {
                ports.push(pc::InboundPort {
                    selector: selector.clone(),
                    port: t,
                    protocol,
                });
            }
        }
        if let Some((requests, interval_ms, burst)) = policy.and_then(|p| p.rate_limit) {
            let mut rl_ports: Vec<u16> = targets
                .iter()
                .flat_map(|(_, t)| t.iter().copied())
                .collect();
            rl_ports.sort_unstable();
            rl_ports.dedup();
            rate_limits.push(pc::RateLimit {
                name: policy.map(|p| p.name.clone()).unwrap_or_default(),
                selector: selector.clone(),
                ports: rl_ports,
                requests,
                interval_ms,
                burst,
            });
        }
    }
    rate_limits.sort_by(|a, b| a.name.cmp(&b.name));
    ports.sort_by(|a, b| (&a.selector, a.port).cmp(&(&b.selector, b.port)));
    ports.dedup();
    pc::Inbound {
        policies,
        rate_limits,
        ports,
        mtls: judged.mtls.clone(),
    }
}
