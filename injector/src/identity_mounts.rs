//! Identity Secrets belong to their service account: a pod may use
//! `weft-identity-<sa>` only for the service account it runs as.
//!
//! Every meshed namespace holds one identity Secret per service account
//! (certificate and private key). Kubernetes lets anyone who may create pods
//! in the namespace mount any of its Secrets, and pick any of its service
//! accounts, so refusing a foreign mount does not take a privilege away
//! that the API grants; it keeps a pod from *presenting* an identity other
//! than the one its spec names, which is what authorization policies and
//! audit logs read. Checked for every pod created in a meshed namespace,
//! also the ones skipped from injection: Secret volumes, Secret sources of
//! projected volumes, `env[].valueFrom.secretKeyRef` and `envFrom[].secretRef`
//! of every container, init container and ephemeral container.

use k8s_openapi::api::core::v1::{Container, EphemeralContainer, PodSpec};

use crate::patch::IDENTITY_SECRET_PREFIX;

/// The service account a pod runs as (`default` when unset).
pub fn service_account(spec: &PodSpec) -> String {
    spec.service_account_name
        .clone()
        .or_else(|| spec.service_account.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

/// Where the pod refers to an identity Secret of another service account:
/// one `"<where> uses Secret <name>"` line each.
pub fn foreign_identity_refs(spec: &PodSpec) -> Vec<String> {
    let own = format!("{IDENTITY_SECRET_PREFIX}{}", service_account(spec));
    let foreign = |name: Option<&str>| {
        name.filter(|n| n.starts_with(IDENTITY_SECRET_PREFIX) && *n != own)
            .map(str::to_owned)
    };
    let mut found = Vec::new();
    for v in spec.volumes.iter().flatten() {
        if let Some(n) = foreign(v.secret.as_ref().and_then(|s| s.secret_name.as_deref())) {
            found.push(format!("volume {:?} uses Secret {n}", v.name));
        }
        let sources = v.projected.as_ref().and_then(|p| p.sources.as_ref());
        for s in sources.into_iter().flatten() {
            if let Some(n) = foreign(s.secret.as_ref().map(|s| s.name.as_str())) {
                found.push(format!("projected volume {:?} uses Secret {n}", v.name));
            }
        }
    }
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .map(|c: &Container| (c.name.as_str(), c.env.as_deref(), c.env_from.as_deref()));
    let ephemeral = spec
        .ephemeral_containers
        .iter()
        .flatten()
        .map(|c: &EphemeralContainer| (c.name.as_str(), c.env.as_deref(), c.env_from.as_deref()));
    for (name, env, env_from) in containers.chain(ephemeral) {
        for e in env.unwrap_or_default() {
            let r = e
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref());
            if let Some(n) = foreign(r.map(|r| r.name.as_str())) {
                found.push(format!(
                    "container {name:?} env {:?} uses Secret {n}",
                    e.name
                ));
            }
        }
        for f in env_from.unwrap_or_default() {
            if let Some(n) = foreign(f.secret_ref.as_ref().map(|r| r.name.as_str())) {
                found.push(format!("container {name:?} envFrom uses Secret {n}"));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> PodSpec {
        serde_json::from_value(json).expect("pod spec")
    }

    #[test]
    fn only_the_own_service_accounts_identity_may_be_used() {
        let own = spec(serde_json::json!({
            "serviceAccountName": "web",
            "containers": [{"name": "app"}],
            "volumes": [{"name": "id", "secret": {"secretName": "weft-identity-web"}}],
        }));
        assert!(foreign_identity_refs(&own).is_empty());
        let other = spec(serde_json::json!({
            "serviceAccountName": "web",
            "containers": [{
                "name": "app",
                "env": [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "weft-identity-db", "key": "tls.key"}}}],
                "envFrom": [{"secretRef": {"name": "weft-identity-admin"}}],
            }],
            "initContainers": [{"name": "init", "envFrom": [{"secretRef": {"name": "weft-identity-db"}}]}],
            "volumes": [
                {"name": "a", "secret": {"secretName": "weft-identity-db"}},
                {"name": "b", "projected": {"sources": [{"secret": {"name": "weft-identity-db"}}]}},
                {"name": "c", "secret": {"secretName": "app-config"}},
            ],
        }));
        let found = foreign_identity_refs(&other);
        assert_eq!(found.len(), 5, "{found:?}");
        assert!(found.iter().any(|l| l.contains("volume \"a\"")));
        assert!(found.iter().any(|l| l.contains("projected volume \"b\"")));
        assert!(found.iter().any(|l| l.contains("env \"KEY\"")));
        assert!(found.iter().any(|l| l.contains("weft-identity-admin")));
        assert!(found.iter().any(|l| l.contains("\"init\"")));
    }

    #[test]
    fn no_service_account_means_default() {
        let s = spec(serde_json::json!({
            "containers": [{"name": "app"}],
            "volumes": [
                {"name": "a", "secret": {"secretName": "weft-identity-default"}},
                {"name": "b", "secret": {"secretName": "weft-identity-web"}},
            ],
        }));
        assert_eq!(foreign_identity_refs(&s).len(), 1);
    }
}
