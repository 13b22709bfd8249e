//! Inbound authorization: the config's `inbound.policies` evaluated against
//! this pod's labels, the target port and the caller's verified identity
//! (and, for HTTP, method and path). Pure; the inbound path calls it per
//! connection (opaque) or per request (HTTP), with the request's policy
//! path ([`crate::http::path`]), never the raw one.
//!
//! Order: any applicable Deny rule that matches denies; otherwise, if any
//! Allow policy applies to the pod and port, one of its rules must match;
//! with none, the mesh's `defaultAccess` decides.

use std::collections::BTreeMap;

use weft_proxy_config::{
    AccessAction, AccessDestination, AccessPolicy, AccessSource, ProxyConfig, selector_matches,
};

use crate::tls::SpiffeId;

/// What is being authorized.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The verified caller, none for plaintext.
    pub identity: Option<&'a SpiffeId>,
    /// Target port.
    pub port: u16,
    /// HTTP method; none for opaque TCP.
    pub method: Option<&'a str>,
    /// HTTP path in normal form, without parameters
    /// ([`crate::http::path::NormalPath::policy`]); none for opaque TCP.
    pub path: Option<&'a str>,
}

/// The decision, with the deciding policy for the log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed.
    Allow,
    /// Denied, by this policy (or the default).
    Deny(String),
}

fn source_matches(s: &AccessSource, id: Option<&SpiffeId>) -> bool {
    let Some(id) = id else {
        return s.unauthenticated;
    };
    if s.identities.is_empty() && s.namespaces.is_empty() {
        return !s.unauthenticated;
    }
    let ids_ok = s.identities.is_empty()
        || s.identities.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => id.as_str().starts_with(prefix),
            None => p == id.as_str(),
        });
    let ns_ok = s.namespaces.is_empty()
        || id
            .namespace()
            .is_some_and(|ns| s.namespaces.iter().any(|n| n == ns));
    ids_ok && ns_ok
}

/// `deny_side`: for opaque traffic, HTTP-only conditions count as matching
/// in Deny rules (fail closed) and as not matching in Allow rules.
fn destination_matches(d: &AccessDestination, r: &Request<'_>, deny_side: bool) -> bool {
    if !d.ports.is_empty() && !d.ports.contains(&r.port) {
        return false;
    }
    let methods_ok = d.methods.is_empty()
        || match r.method {
            Some(m) => d.methods.iter().any(|x| x.eq_ignore_ascii_case(m)),
            None => deny_side,
        };
    let paths_ok = d.paths.is_empty()
        || match r.path {
            Some(path) => d.paths.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => path.starts_with(prefix),
                None => p == path,
            }),
            None => deny_side,
        };
    methods_ok && paths_ok
}

fn policy_matches(p: &AccessPolicy, r: &Request<'_>) -> bool {
    let deny_side = p.action == AccessAction::Deny;
    p.rules.iter().any(|rule| {
        (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, r.identity)))
            && (rule.to.is_empty() || rule.to.iter().any(|d| destination_matches(d, r, deny_side)))
    })
}

/// Decides `r` for a pod with `labels`, on the enforced policies (Audit
/// ones are left out: see [`audit`]).
pub fn authorize(
    cfg: &ProxyConfig,
    labels: &BTreeMap<String, String>,
    r: &Request<'_>,
) -> Decision {
    decide(cfg, labels, r, false).0
}

/// What the Audit policies would change about an allowed `r`: the names of
/// the Audit policies that would refuse it, when enforcing them would.
/// Call only for a request the enforced policies allow. Costs one scan of
/// the policies when none is in Audit mode.
pub fn audit(
    cfg: &ProxyConfig,
    labels: &BTreeMap<String, String>,
    r: &Request<'_>,
) -> Option<Vec<String>> {
    if !cfg.inbound.policies.iter().any(|p| p.audit) {
        return None;
    }
    match decide(cfg, labels, r, true) {
        (Decision::Deny(_), deciding) => Some(
            deciding
                .into_iter()
                .filter(|p| p.audit)
                .map(|p| p.name.clone())
                .collect(),
        )
        .filter(|names: &Vec<String>| !names.is_empty()),
        (Decision::Allow, _) => None,
    }
}

/// The decision over the enforced policies (and the Audit ones too with
/// `with_audit`), with the policies that decided a denial.
fn decide<'c>(
    cfg: &'c ProxyConfig,
    labels: &BTreeMap<String, String>,
    r: &Request<'_>,
    with_audit: bool,
) -> (Decision, Vec<&'c AccessPolicy>) {
    let applicable: Vec<&AccessPolicy> = cfg
        .inbound
        .policies
        .iter()
        .filter(|p| {
            (with_audit || !p.audit)
                && selector_matches(&p.selector, labels)
                && (p.ports.is_empty() || p.ports.contains(&r.port))
        })
        .collect();
    if let Some(p) = applicable
        .iter()
        .find(|p| p.action == AccessAction::Deny && policy_matches(p, r))
    {
        return (
            Decision::Deny(format!("AccessPolicy {} (Deny)", p.name)),
            vec![*p],
        );
    }
    let allows: Vec<&AccessPolicy> = applicable
        .iter()
        .copied()
        .filter(|p| p.action == AccessAction::Allow)
        .collect();
    if allows.is_empty() {
        return match cfg.mesh.default_access {
            AccessAction::Allow => (Decision::Allow, vec![]),
            AccessAction::Deny => (
                Decision::Deny("mesh defaultAccess Deny (no Allow policy selects this pod)".into()),
                vec![],
            ),
        };
    }
    if allows.iter().any(|p| policy_matches(p, r)) {
        (Decision::Allow, vec![])
    } else {
        let why = format!(
            "no rule of the Allow policies ({}) matches",
            allows
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        (Decision::Deny(why), allows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proxy_config::{AccessRule, MeshSettings, MtlsMode};

    fn cfg(policies: Vec<AccessPolicy>, default_access: AccessAction) -> ProxyConfig {
        ProxyConfig {
            gateway: None,
            version: 1,
            generation: 1,
            hash: String::new(),
            namespace: "shop".into(),
            mesh: MeshSettings {
                trust_domain: "td".into(),
                mtls_mode: MtlsMode::Strict,
                default_access,
                access_log: false,
                access_log_options: Default::default(),
                tracing: None,
                escaped_slashes: Default::default(),
                metrics_naming: Default::default(),
            },
            services: vec![],
            inbound: weft_proxy_config::Inbound {
                policies,
                ..Default::default()
            },
        }
    }

    fn allow_from(name: &str, ids: &[&str], paths: &[&str]) -> AccessPolicy {
        AccessPolicy {
            name: name.into(),
            selector: [("app".to_owned(), "cart".to_owned())].into(),
            ports: vec![],
            action: AccessAction::Allow,
            audit: false,
            rules: vec![AccessRule {
                from: vec![AccessSource {
                    identities: ids.iter().map(|s| (*s).to_owned()).collect(),
                    ..Default::default()
                }],
                to: if paths.is_empty() {
                    vec![]
                } else {
                    vec![AccessDestination {
                        paths: paths.iter().map(|s| (*s).to_owned()).collect(),
                        ..Default::default()
                    }]
                },
            }],
        }
    }

    #[test]
    fn allow_policy_admits_only_listed_identities_and_paths() {
        let c = cfg(
            vec![allow_from(
                "web",
                &["spiffe://td/ns/shop/sa/web"],
                &["/api/*"],
            )],
            AccessAction::Allow,
        );
        let labels = [("app".to_owned(), "cart".to_owned())].into();
        let web = SpiffeId::parse("spiffe://td/ns/shop/sa/web").expect("id");
        let evil = SpiffeId::parse("spiffe://td/ns/shop/sa/evil").expect("id");
        let req = |id, path| Request {
            identity: id,
            port: 80,
            method: Some("GET"),
            path,
        };
        assert_eq!(
            authorize(&c, &labels, &req(Some(&web), Some("/api/x"))),
            Decision::Allow
        );
        assert!(matches!(
            authorize(&c, &labels, &req(Some(&web), Some("/admin"))),
            Decision::Deny(_)
        ));
        assert!(matches!(
            authorize(&c, &labels, &req(Some(&evil), Some("/api/x"))),
            Decision::Deny(_)
        ));
        assert!(matches!(
            authorize(&c, &labels, &req(None, Some("/api/x"))),
            Decision::Deny(_)
        ));
        // Another pod is not selected: default applies.
        let other = [("app".to_owned(), "db".to_owned())].into();
        assert_eq!(
            authorize(&c, &other, &req(Some(&evil), Some("/x"))),
            Decision::Allow
        );
    }

    #[test]
    fn deny_wins_and_default_deny_applies() {
        let mut deny = allow_from("block-evil", &["spiffe://td/ns/shop/sa/evil"], &[]);
        deny.action = AccessAction::Deny;
        let c = cfg(vec![deny], AccessAction::Deny);
        let labels = [("app".to_owned(), "cart".to_owned())].into();
        let evil = SpiffeId::parse("spiffe://td/ns/shop/sa/evil").expect("id");
        let r = Request {
            identity: Some(&evil),
            port: 80,
            method: None,
            path: None,
        };
        assert_eq!(
            authorize(&c, &labels, &r),
            Decision::Deny("AccessPolicy block-evil (Deny)".into())
        );
        let web = SpiffeId::parse("spiffe://td/ns/shop/sa/web").expect("id");
        let r = Request {
            identity: Some(&web),
            ..r
        };
        assert!(
            matches!(authorize(&c, &labels, &r), Decision::Deny(m) if m.contains("defaultAccess"))
        );
    }

    #[test]
    fn audit_policies_decide_nothing_and_name_what_they_would_refuse() {
        let mut allow_api = allow_from("only-api", &[], &["/api/*"]);
        allow_api.audit = true;
        let mut deny_web = allow_from("no-web", &["spiffe://td/ns/shop/sa/web"], &[]);
        deny_web.action = AccessAction::Deny;
        deny_web.audit = true;
        let c = cfg(vec![allow_api, deny_web], AccessAction::Allow);
        let labels = [("app".to_owned(), "cart".to_owned())].into();
        let web = SpiffeId::parse("spiffe://td/ns/shop/sa/web").expect("id");
        let db = SpiffeId::parse("spiffe://td/ns/shop/sa/db").expect("id");
        let req = |id, path| Request {
            identity: Some(id),
            port: 80,
            method: Some("GET"),
            path: Some(path),
        };
        // Enforced: nothing selects the pod, the default allows everything.
        for (id, path) in [(&web, "/api/x"), (&web, "/"), (&db, "/"), (&db, "/api/x")] {
            assert_eq!(authorize(&c, &labels, &req(id, path)), Decision::Allow);
        }
        // Audit: what enforcing each would refuse, by name.
        assert_eq!(audit(&c, &labels, &req(&db, "/api/x")), None);
        assert_eq!(
            audit(&c, &labels, &req(&db, "/")),
            Some(vec!["only-api".to_owned()])
        );
        assert_eq!(
            audit(&c, &labels, &req(&web, "/api/x")),
            Some(vec!["no-web".to_owned()])
        );
        // An enforced Deny is unaffected by an Audit Allow.
        let mut enforced = allow_from("block-db", &["spiffe://td/ns/shop/sa/db"], &[]);
        enforced.action = AccessAction::Deny;
        let mut c2 = c.clone();
        c2.inbound.policies.push(enforced);
        assert!(matches!(
            authorize(&c2, &labels, &req(&db, "/api/x")),
            Decision::Deny(m) if m.contains("block-db")
        ));
    }
}
