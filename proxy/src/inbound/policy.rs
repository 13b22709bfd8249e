//! The inbound decisions taken on the active snapshot, for connections
//! and requests alike: whether an open connection is still allowed
//! (revocation on reload: a new Deny, a port turned Strict) and the
//! reports of Audit-mode AccessPolicies. The rules themselves are
//! evaluated by [`super::authz`] (pure).
//!
//! In: the active snapshot, the pod's labels, a peer identity and port.
//! Out: why a connection must close, metrics and log lines.

use std::collections::BTreeMap;

use weft_proxy_config::{MtlsMode, mtls_mode};

use super::authz::{self, Decision, authorize};
use crate::snapshot::Snapshot;
use crate::state::State;
use crate::tls::SpiffeId;

/// Counts and logs an allowed request or connection that Audit-mode
/// policies would refuse (`weft_proxy_authz_audit_total{policy}`).
/// Whether it would be refused.
pub fn report_audit(state: &State, snap: &Snapshot, r: &authz::Request<'_>) -> bool {
    let Some(policies) = authz::audit(&snap.config, &state.settings.labels, r) else {
        return false;
    };
    for policy in &policies {
        state
            .metrics
            .authz_audit
            .get_or_create(&crate::metrics::AuditLabels {
                policy: policy.clone(),
            })
            .inc();
    }
    tracing::warn!(
        peer = r.identity.map_or("-", SpiffeId::as_str),
        port = r.port,
        method = r.method.unwrap_or("-"),
        path = r.path.unwrap_or("-"),
        policies = %policies.join(","),
        audit = true,
        "allowed, but enforcing these Audit-mode AccessPolicies would refuse it"
    );
    true
}

/// Why an open opaque connection from `id` to `port` may no longer be
/// served under `snap`: plaintext while the mode is now Strict, or a
/// policy that now denies it.
pub fn connection_revoked(
    snap: &Snapshot,
    labels: &BTreeMap<String, String>,
    port: u16,
    id: Option<&SpiffeId>,
) -> Option<String> {
    plaintext_revoked(snap, labels, port, id).or_else(|| {
        let r = authz::Request {
            identity: id,
            port,
            method: None,
            path: None,
        };
        match authorize(&snap.config, labels, &r) {
            Decision::Deny(why) => Some(why),
            Decision::Allow => None,
        }
    })
}

/// Why a plaintext connection to `port` may no longer be served: the mode
/// of the port (mesh, namespace, workload or port) is Strict.
pub fn plaintext_revoked(
    snap: &Snapshot,
    labels: &BTreeMap<String, String>,
    port: u16,
    id: Option<&SpiffeId>,
) -> Option<String> {
    (id.is_none() && mtls_mode(&snap.config, labels, port) == MtlsMode::Strict)
        .then(|| format!("plaintext while the mTLS mode of port {port} is Strict"))
}

/// Resolves, with the reason, once the active snapshot revokes an open
/// connection (`revoked` says why it may not be served); checked against
/// the snapshot active now, then at every reload. Never resolves
/// otherwise.
pub async fn until_revoked(state: &State, revoked: impl Fn(&Snapshot) -> Option<String>) -> String {
    // Subscribe first: a reload between the connection's own check and
    // this one is not missed.
    let mut changes = state.snapshot_changes();
    loop {
        if let Some(why) = state.snapshot.load_full().and_then(|s| revoked(&s)) {
            return why;
        }
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}
