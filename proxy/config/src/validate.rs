//! [`ProxyConfig::validate`]: the consistency rules a snapshot must satisfy
//! before a proxy will serve it. The operator runs the same check on every
//! render, so a config that reaches a proxy has already passed it once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use crate::model::*;

/// One violated rule, with the JSON path of the offending value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationError {
    /// Where, e.g. `services[shop/cart].httpRoutes[0].backends[1]`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every violated rule of a snapshot (never empty).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid proxy config ({} problem", self.0.len())?;
        if self.0.len() != 1 {
            f.write_str("s")?;
        }
        f.write_str("): ")?;
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Errors(Vec<ValidationError>);

impl Errors {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ValidationError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn regex(&mut self, path: &str, pattern: &str) {
        if let Err(e) = regex::Regex::new(&anchored(pattern)) {
            self.push(path, format!("regex {pattern:?} does not compile: {e}"));
        }
    }

    fn into_result(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(self.0))
        }
    }

    fn percent(&mut self, path: &str, value: f64) {
        if !(0.0..=100.0).contains(&value) {
            self.push(path, format!("percentage {value} is outside 0–100"));
        }
    }
}

/// Wraps a user regex so it must match the whole input, as the API documents.
pub fn anchored(pattern: &str) -> String {
    format!("^(?:{pattern})$")
}

const REDIRECT_CODES: [u16; 5] = [301, 302, 303, 307, 308];
const MAX_RETRY_ATTEMPTS: u32 = 10;

impl ProxyConfig {
    /// Checks every consistency rule and returns all violations at once.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        self.validate_except(|_| false)
    }

    /// [`ProxyConfig::validate`] without the checks of their own fields for
    /// the Services for which `checked(index)` holds: Services known to have
    /// passed them before, unchanged ([`ProxyConfig::load_after`]). What
    /// involves other Services (duplicates, backends, mirrors) is checked
    /// for all.
    pub fn validate_except(&self, checked: impl Fn(usize) -> bool) -> Result<(), ValidationErrors> {
        self.validate_with(|i| {
            if checked(i) {
                OwnChecks::Skip
            } else {
                OwnChecks::Run
            }
        })
    }

    /// [`ProxyConfig::validate`], with the checks of each Service's own
    /// fields had as `own(index)` says.
    pub(crate) fn validate_with(
        &self,
        own: impl FnMut(usize) -> OwnChecks,
    ) -> Result<(), ValidationErrors> {
        let mut errs = Errors::default();
        if self.version != crate::FORMAT_VERSION {
            errs.push(
                "version",
                format!(
                    "format version {} is not {}",
                    self.version,
                    crate::FORMAT_VERSION
                ),
            );
        }
        if self.namespace.is_empty() {
            errs.push("namespace", "must not be empty");
        }
        validate_mesh(&self.mesh, &mut errs);

        check_services(
            self.services.iter().map(|s| &**s),
            &self.mesh.trust_domain,
            own,
            &mut errs,
        );
        validate_inbound(&self.inbound, &mut errs);
        if let Some(g) = &self.gateway {
            validate_gateway(g, &self.services, &mut errs);
        }
        errs.into_result()
    }
}

fn validate_gateway(g: &Gateway, services: &[Arc<Service>], errs: &mut Errors) {
    if g.name.is_empty() {
        errs.push("gateway.name", "must not be empty");
    }
    let mut names = BTreeSet::new();
    let mut port_protocol: BTreeMap<u16, ListenerProtocol> = BTreeMap::new();
    for (i, l) in g.listeners.iter().enumerate() {
        let at = format!("gateway.listeners[{i}]");
        if l.name.is_empty() || !names.insert(l.name.as_str()) {
            errs.push(
                &at,
                format!("listener name {:?} is empty or repeated", l.name),
            );
        }
        if l.port == 0 {
            errs.push(&at, "port 0 is not a port");
        }
        if *port_protocol.entry(l.port).or_insert(l.protocol) != l.protocol {
            errs.push(
                &at,
                format!("port {} is already a listener of another protocol", l.port),
            );
        }
        if let Some(h) = &l.hostname {
            check_hostname(&format!("{at}.hostname"), h, errs);
        }
        match l.protocol {
            ListenerProtocol::Https if l.certificates.is_empty() => {
                errs.push(&at, "an https listener needs a certificate");
            }
            ListenerProtocol::Http if !l.certificates.is_empty() => {
                errs.push(&at, "an http listener has no certificates");
            }
            ListenerProtocol::Tls if !l.certificates.is_empty() => {
                errs.push(
                    &at,
                    "a tls (passthrough) listener has no certificates: the backend terminates TLS",
                );
            }
            _ => {}
        }
        for c in &l.certificates {
            if c.is_empty() || c.contains('/') || c.starts_with('.') {
                errs.push(
                    format!("{at}.certificates"),
                    format!("{c:?} is not a directory name"),
                );
            }
        }
        for (j, h) in l.hosts.iter().enumerate() {
            let h_at = format!("{at}.hosts[{j}]");
            if let Some(name) = &h.hostname {
                check_hostname(&h_at, name, errs);
            }
            match services.iter().find(|s| s.key() == h.service) {
                None => errs.push(&h_at, format!("unknown service {:?}", h.service)),
                Some(s) if l.protocol == ListenerProtocol::Tls && !s.http_routes.is_empty() => {
                    errs.push(
                        &h_at,
                        format!(
                            "service {:?} of a tls (passthrough) listener has httpRoutes; its connections take tcpRoutes",
                            h.service
                        ),
                    );
                }
                Some(_) => {}
            }
        }
    }
}

fn check_hostname(at: &str, h: &str, errs: &mut Errors) {
    let name = h.strip_prefix("*.").unwrap_or(h);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if !ok {
        errs.push(
            at,
            format!("{h:?} is not a lower-case host name or *.suffix"),
        );
    }
}

/// The rules of [`ProxyConfig::validate`] about Services, for a group of
/// Services checked on its own: backends and mirrors must resolve within the
/// group, except an HTTP route's backends and mirror in another namespace,
/// which may be absent from any document. A writer that assembles documents
/// from groups whose references stay inside the group or leave the
/// namespace (weft's operator: one namespace's Services) checks each group once: a
/// document whose Services are groups that pass, no Service in two groups,
/// and whose rest passes [`ProxyConfig::validate`] with no Services, passes
/// it too.
pub fn validate_services<'a, S: std::borrow::Borrow<Service> + 'a>(
    services: impl IntoIterator<Item = &'a S>,
    trust_domain: &str,
) -> Result<(), ValidationErrors> {
    let mut errs = Errors::default();
    check_services(
        services.into_iter().map(|s| s.borrow()),
        trust_domain,
        |_| OwnChecks::Run,
        &mut errs,
    );
    errs.into_result()
}

/// How a validation has the checks of a Service's own fields.
pub(crate) enum OwnChecks {
    /// Runs them.
    Run,
    /// Skips them: the Service passed them before, unchanged.
    Skip,
    /// Takes what they found, run beforehand ([`own_errors`]).
    Done(Vec<ValidationError>),
}

/// What the checks of a Service's own fields find, in the order and with
/// the paths [`ProxyConfig::validate`] reports them.
pub(crate) fn own_errors(svc: &Service, trust_domain: &str) -> Vec<ValidationError> {
    let mut errs = Errors::default();
    validate_own(&service_path(svc), svc, trust_domain, &mut errs);
    errs.0
}

fn service_path(svc: &Service) -> String {
    format!("services[{}]", svc.key())
}

fn check_services<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    trust_domain: &str,
    mut own: impl FnMut(usize) -> OwnChecks,
    errs: &mut Errors,
) {
    let list: Vec<&Service> = services.into_iter().collect();
    let mut by_key = ByKey::with_capacity_and_hasher(list.len(), Default::default());
    for svc in &list {
        if by_key
            .insert((svc.namespace.as_str(), svc.name.as_str()), svc)
            .is_some()
        {
            errs.push(format!("services[{}]", svc.key()), "duplicate service");
        }
    }
    for (i, svc) in list.into_iter().enumerate() {
        validate_service(svc, &by_key, trust_domain, own(i), errs);
    }
}

/// The Services of a document by namespace and name.
type ByKey<'a> = HashMap<(&'a str, &'a str), &'a Service, foldhash::fast::RandomState>;

/// The Service a backend names (`namespace/name`).
fn find<'a>(services: &ByKey<'a>, key: &str) -> Option<&'a Service> {
    let (namespace, name) = key.split_once('/')?;
    services.get(&(namespace, name)).copied()
}

fn validate_mesh(mesh: &MeshSettings, errs: &mut Errors) {
    if mesh.trust_domain.is_empty() || mesh.trust_domain.contains('/') {
        errs.push(
            "mesh.trustDomain",
            format!("{:?} is not a trust domain", mesh.trust_domain),
        );
    }
    if let Some(t) = &mesh.tracing {
        errs.percent("mesh.tracing.samplingPercent", t.sampling_percent);
        if !(t.otlp_endpoint.starts_with("http://") || t.otlp_endpoint.starts_with("https://")) {
            errs.push(
                "mesh.tracing.otlpEndpoint",
                format!("{:?} is not an http(s) URL", t.otlp_endpoint),
            );
        }
    }
}

/// Checks a Service: its own fields when `own`, and always what its routes
/// say of other Services.
fn validate_service(
    svc: &Service,
    services: &ByKey<'_>,
    trust_domain: &str,
    own: OwnChecks,
    errs: &mut Errors,
) {
    let at = service_path(svc);
    match own {
        OwnChecks::Run => validate_own(&at, svc, trust_domain, errs),
        OwnChecks::Skip => {}
        OwnChecks::Done(found) => errs.0.extend(found),
    }
    for (i, r) in svc.http_routes.iter().enumerate() {
        validate_http_route(&format!("{at}.httpRoutes[{i}]"), r, svc, services, errs);
    }
    let mut tcp_ports = BTreeSet::new();
    for (i, r) in svc.tcp_routes.iter().enumerate() {
        let r_at = format!("{at}.tcpRoutes[{i}]");
        if !tcp_ports.insert(r.port) {
            errs.push(&r_at, "more than one TCP route for the same port");
        }
        check_route_port(&r_at, r.port, svc, errs);
        if r.backends.is_empty() {
            errs.push(&r_at, "a TCP route needs backends");
        }
        check_backends(&r_at, &r.backends, None, services, errs);
    }
}

/// What a Service's checks find in its own fields alone.
fn validate_own(at: &str, svc: &Service, trust_domain: &str, errs: &mut Errors) {
    if svc.name.is_empty() || svc.namespace.is_empty() {
        errs.push(at, "service name and namespace must not be empty");
    }
    if svc.namespace.contains('/') {
        errs.push(at, "a namespace has no /");
    }
    let mut ports = BTreeSet::new();
    let mut names = BTreeSet::new();
    for p in &svc.ports {
        if p.port == 0 || p.target_port == 0 {
            errs.push(format!("{at}.ports[{}]", p.port), "port 0 is not a port");
        }
        if !ports.insert(p.port) {
            errs.push(format!("{at}.ports[{}]", p.port), "duplicate port");
        }
        if let Some(n) = &p.name
            && !names.insert(n.as_str())
        {
            errs.push(
                format!("{at}.ports[{}]", p.port),
                format!("duplicate port name {n:?}"),
            );
        }
    }
    let subsets: BTreeSet<&str> = svc.subsets.iter().map(String::as_str).collect();
    if subsets.len() != svc.subsets.len() {
        errs.push(format!("{at}.subsets"), "duplicate subset name");
    }
    let spiffe_prefix = format!("spiffe://{trust_domain}/");
    let mut addrs = BTreeSet::new();
    for ep in &svc.endpoints {
        // Named only when something is wrong: a mesh lists 100,000s of endpoints.
        let ep_at = || format!("{at}.endpoints[{}]", ep.address);
        if !addrs.insert(ep.address) {
            errs.push(ep_at(), "duplicate endpoint address");
        }
        match (&ep.identity, ep.meshed) {
            (Some(id), true) if !id.starts_with(&spiffe_prefix) => errs.push(
                ep_at(),
                format!("identity {id:?} is not in trust domain {trust_domain:?}"),
            ),
            (Some(id), true) if id.len() == spiffe_prefix.len() => {
                errs.push(ep_at(), format!("identity {id:?} has no path"));
            }
            (None, true) => errs.push(ep_at(), "meshed endpoint without identity"),
            (Some(_), false) => errs.push(ep_at(), "identity on a non-meshed endpoint"),
            _ => {}
        }
        for s in &ep.subsets {
            if !subsets.contains(s.as_str()) {
                errs.push(ep_at(), format!("unknown subset {s:?}"));
            }
        }
        for (name, port) in &ep.ports {
            if !names.contains(name.as_str()) {
                errs.push(
                    ep_at(),
                    format!("port override for unknown port name {name:?}"),
                );
            }
            if *port == 0 {
                errs.push(ep_at(), "port 0 is not a port");
            }
        }
    }
    validate_policy(&format!("{at}.policy"), &svc.policy, errs);
}

fn check_route_port(at: &str, port: Option<u16>, svc: &Service, errs: &mut Errors) {
    if let Some(p) = port
        && !svc.ports.iter().any(|sp| sp.port == p)
    {
        errs.push(at, format!("service has no port {p}"));
    }
}

/// Checks weighted backends. `foreign_from`: the namespace of the routed
/// Service of an HTTP route, whose backends may name a Service of another
/// namespace that the document does not list (a Gateway API route with a
/// `ReferenceGrant`, seen from a namespace whose scope leaves that
/// namespace out): the proxy answers that share 500.
fn check_backends(
    at: &str,
    backends: &[Backend],
    foreign_from: Option<&str>,
    services: &ByKey<'_>,
    errs: &mut Errors,
) {
    for (i, b) in backends.iter().enumerate() {
        check_backend(
            &format!("{at}.backends[{i}]"),
            b,
            foreign_from,
            services,
            errs,
        );
    }
    if !backends.is_empty() && backends.iter().all(|b| b.weight == 0) {
        errs.push(at, "every backend has weight 0");
    }
}

fn check_backend(
    at: &str,
    b: &Backend,
    foreign_from: Option<&str>,
    services: &ByKey<'_>,
    errs: &mut Errors,
) {
    let Some(target) = find(services, &b.service) else {
        let foreign = foreign_from.is_some_and(|own| {
            b.service
                .split_once('/')
                .is_some_and(|(ns, name)| ns != own && !ns.is_empty() && !name.is_empty())
        });
        if !foreign {
            errs.push(at, format!("unknown service {:?}", b.service));
        }
        return;
    };
    if let Some(s) = &b.subset
        && !target.subsets.contains(s)
    {
        errs.push(at, format!("service {:?} has no subset {s:?}", b.service));
    }
    if let Some(p) = b.port
        && !target.ports.iter().any(|sp| sp.port == p)
    {
        errs.push(at, format!("service {:?} has no port {p}", b.service));
    }
}

fn validate_http_route(
    at: &str,
    r: &HttpRoute,
    svc: &Service,
    services: &ByKey<'_>,
    errs: &mut Errors,
) {
    if r.name.is_empty() {
        errs.push(at, "route name must not be empty");
    }
    check_route_port(at, r.port, svc, errs);
    for (i, m) in r.matches.iter().enumerate() {
        let m_at = format!("{at}.matches[{i}]");
        match &m.path {
            Some(PathMatch::Regex(re)) => errs.regex(&format!("{m_at}.path"), re),
            Some(PathMatch::Exact(p) | PathMatch::Prefix(p)) if !p.starts_with('/') => {
                errs.push(
                    format!("{m_at}.path"),
                    format!("{p:?} does not start with /"),
                );
            }
            _ => {}
        }
        for (kind, list) in [("headers", &m.headers), ("queryParams", &m.query_params)] {
            for (j, nm) in list.iter().enumerate() {
                if nm.name.is_empty() {
                    errs.push(format!("{m_at}.{kind}[{j}]"), "empty name");
                }
                if let ValueMatch::Regex(re) = &nm.value {
                    errs.regex(&format!("{m_at}.{kind}[{j}]"), re);
                }
            }
        }
        if let Some(method) = &m.method
            && (method.is_empty() || method.chars().any(|c| !c.is_ascii_uppercase()))
        {
            errs.push(
                format!("{m_at}.method"),
                format!("{method:?} is not an upper-case method"),
            );
        }
    }
    check_backends(at, &r.backends, Some(&svc.namespace), services, errs);
    if let Some(redirect) = &r.redirect {
        if r.unresolved_weight > 0 {
            errs.push(at, "a redirect route has no unresolved backends");
        }
        if redirect.path.is_some() && redirect.path_prefix.is_some() {
            errs.push(
                format!("{at}.redirect"),
                "path and pathPrefix are mutually exclusive",
            );
        }
        if !r.backends.is_empty() {
            errs.push(at, "a redirect route has no backends");
        }
        if r.rewrite.is_some() {
            errs.push(at, "redirect and rewrite are mutually exclusive");
        }
        if !REDIRECT_CODES.contains(&redirect.status) {
            errs.push(
                format!("{at}.redirect.status"),
                format!("{} is not a redirect status", redirect.status),
            );
        }
        if let Some(s) = &redirect.scheme
            && s != "http"
            && s != "https"
        {
            errs.push(
                format!("{at}.redirect.scheme"),
                format!("{s:?} is not http or https"),
            );
        }
    }
    if let Some(retry) = &r.retry {
        if retry.attempts > MAX_RETRY_ATTEMPTS {
            errs.push(
                format!("{at}.retry.attempts"),
                format!("{} is more than {MAX_RETRY_ATTEMPTS}", retry.attempts),
            );
        }
        if retry.backoff_max_ms < retry.backoff_base_ms {
            errs.push(format!("{at}.retry"), "backoff max is below backoff base");
        }
        for code in &retry.retriable_status_codes {
            if !(100..=599).contains(code) {
                errs.push(
                    format!("{at}.retry"),
                    format!("{code} is not a status code"),
                );
            }
        }
    }
    if let Some(fault) = &r.fault {
        if fault.delay.is_none() && fault.abort.is_none() {
            errs.push(format!("{at}.fault"), "a fault needs a delay or an abort");
        }
        if let Some(d) = &fault.delay {
            errs.percent(&format!("{at}.fault.delay.percent"), d.percent);
        }
        if let Some(a) = &fault.abort {
            errs.percent(&format!("{at}.fault.abort.percent"), a.percent);
            if !(200..=599).contains(&a.status) {
                errs.push(
                    format!("{at}.fault.abort.status"),
                    format!("{} is not an error status", a.status),
                );
            }
        }
    }
    if let Some(m) = &r.mirror {
        errs.percent(&format!("{at}.mirror.percent"), m.percent);
        check_backend(
            &format!("{at}.mirror.backend"),
            &m.backend,
            Some(&svc.namespace),
            services,
            errs,
        );
    }
    if let Some(rw) = &r.rewrite
        && rw.path.is_some()
        && rw.path_prefix.is_some()
    {
        errs.push(
            format!("{at}.rewrite"),
            "path and pathPrefix are mutually exclusive",
        );
    }
}

fn validate_policy(at: &str, p: &ClientPolicy, errs: &mut Errors) {
    if let LoadBalancer::ConsistentHash(HashKey::Header(n) | HashKey::Cookie(n)) = &p.load_balancer
        && n.is_empty()
    {
        errs.push(format!("{at}.loadBalancer"), "empty hash key name");
    }
    if let Some(o) = &p.outlier_detection {
        if o.max_ejection_percent > 100 {
            errs.push(
                format!("{at}.outlierDetection.maxEjectionPercent"),
                format!("percentage {} is outside 0–100", o.max_ejection_percent),
            );
        }
        if o.interval_ms == 0 {
            errs.push(
                format!("{at}.outlierDetection.intervalMs"),
                "must be above 0",
            );
        }
    }
    if let Some(b) = &p.retry_budget {
        errs.percent(&format!("{at}.retryBudget.retryPercent"), b.retry_percent);
        if b.ttl_ms == 0 {
            errs.push(format!("{at}.retryBudget.ttlMs"), "must be above 0");
        }
    }
    if let Some(c) = &p.connection_pool {
        if c.connect_timeout_ms == 0 {
            errs.push(
                format!("{at}.connectionPool.connectTimeoutMs"),
                "must be above 0",
            );
        }
        // A limit of 0 would refuse every request or connection.
        for (field, v) in [
            ("maxConnections", c.max_connections),
            ("maxRequests", c.max_requests),
        ] {
            if v == Some(0) {
                errs.push(
                    format!("{at}.connectionPool.{field}"),
                    "must be above 0 when set",
                );
            }
        }
    }
}

fn validate_inbound(inbound: &Inbound, errs: &mut Errors) {
    let mut names = BTreeSet::new();
    for p in &inbound.policies {
        if !names.insert(p.name.as_str()) {
            errs.push(
                format!("inbound.policies[{}]", p.name),
                "duplicate policy name",
            );
        }
        for (i, rule) in p.rules.iter().enumerate() {
            for to in &rule.to {
                for path in &to.paths {
                    if !path.starts_with('/') && path != "*" {
                        errs.push(
                            format!("inbound.policies[{}].rules[{i}]", p.name),
                            format!("path {path:?} does not start with /"),
                        );
                    }
                }
            }
        }
    }
    let mut names = BTreeSet::new();
    for rl in &inbound.rate_limits {
        let at = format!("inbound.rateLimits[{}]", rl.name);
        if !names.insert(rl.name.as_str()) {
            errs.push(&at, "duplicate rate limit name");
        }
        if rl.requests == 0 || rl.interval_ms == 0 {
            errs.push(&at, "requests and interval must be above 0");
        }
    }
    let mut names = BTreeSet::new();
    let mut namespace_wide = 0;
    for o in &inbound.mtls {
        let at = format!("inbound.mtls[{}]", o.name);
        if !names.insert(o.name.as_str()) {
            errs.push(&at, "duplicate override name");
        }
        if o.selector.is_empty() {
            namespace_wide += 1;
        }
        let mut ports = BTreeSet::new();
        for p in &o.ports {
            if p.port == 0 || !ports.insert(p.port) {
                errs.push(&at, format!("port {} is 0 or listed twice", p.port));
            }
        }
    }
    if namespace_wide > 1 {
        errs.push("inbound.mtls", "more than one namespace-wide override");
    }
}
