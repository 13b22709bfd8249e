//! Mesh-wide injection defaults from the `Mesh` named `default`.
//!
//! A kube-runtime watcher (field selector `metadata.name=default`) feeds
//! [`MeshTracker`], a pure state machine that turns watch events into the
//! [`InjectConfig`] to serve: the Mesh's settings while it exists, the
//! built-in defaults when it does not (or after it is deleted). A Mesh whose
//! injection settings are unusable is ignored with a warning and the last
//! good configuration stays in force — a bad edit must not break every pod
//! creation in the cluster.

use std::sync::Arc;

use arc_swap::ArcSwap;
use futures::StreamExt;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use weft_api::mesh::{MESH_NAME, Mesh};

use crate::config::{InjectConfig, MeshConfigError};
use crate::metrics::Metrics;

/// Turns `Mesh` watch events into configurations to serve.
#[derive(Debug, Default)]
pub struct MeshTracker {
    seen_in_init: bool,
}

/// What one event means for the served configuration.
#[derive(Debug)]
pub enum Update {
    /// Serve this configuration.
    Set(Box<InjectConfig>),
    /// The Mesh is invalid: keep serving the current configuration.
    Rejected(MeshConfigError),
    /// Nothing changes.
    Unchanged,
}

impl MeshTracker {
    /// Feeds one watch event.
    pub fn on_event(&mut self, event: Event<Mesh>) -> Update {
        match event {
            Event::Init => {
                self.seen_in_init = false;
                Update::Unchanged
            }
            Event::InitApply(m) => {
                self.seen_in_init = true;
                Self::from_mesh(&m)
            }
            Event::Apply(m) => Self::from_mesh(&m),
            Event::InitDone if !self.seen_in_init => Update::Set(Box::default()),
            Event::InitDone => Update::Unchanged,
            Event::Delete(_) => Update::Set(Box::default()),
        }
    }

    fn from_mesh(m: &Mesh) -> Update {
        if m.metadata.name.as_deref() != Some(MESH_NAME) {
            return Update::Unchanged;
        }
        match InjectConfig::from_mesh(&m.spec) {
            Ok(c) => Update::Set(Box::new(c)),
            Err(e) => Update::Rejected(e),
        }
    }
}

/// Watches the `Mesh` until `shutdown`, storing each new configuration in
/// `config`. Watch errors are retried with backoff.
pub async fn watch(
    client: Client,
    config: Arc<ArcSwap<InjectConfig>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let api: Api<Mesh> = Api::all(client);
    let stream = watcher::watcher(
        api,
        watcher::Config::default().fields(&format!("metadata.name={MESH_NAME}")),
    )
    .default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut tracker = MeshTracker::default();
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            e = stream.next() => e,
        };
        match event {
            None => return,
            Some(Err(e)) => {
                metrics.mesh_update("watch_error");
                tracing::warn!(error = %e, "watching Mesh failed; keeping current injection defaults");
            }
            Some(Ok(e)) => match tracker.on_event(e) {
                Update::Set(c) => {
                    if **config.load() != *c {
                        tracing::info!(
                            image = %c.proxy_image, native_sidecar = c.native_sidecar,
                            "injection defaults updated from Mesh"
                        );
                        metrics.mesh_update("applied");
                        config.store(Arc::from(c));
                    }
                }
                Update::Rejected(e) => {
                    metrics.mesh_update("rejected");
                    tracing::warn!(error = %e, "Mesh ignored; keeping the last good injection defaults");
                }
                Update::Unchanged => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::mesh::MeshSpec;

    fn mesh(native: bool) -> Mesh {
        let mut spec = MeshSpec::default();
        spec.injection.native_sidecar = native;
        Mesh::new(MESH_NAME, spec)
    }

    fn set(u: Update) -> InjectConfig {
        match u {
            Update::Set(c) => *c,
            other => panic!("expected Set, got {other:?}"),
        }
    }

    #[test]
    fn absent_mesh_means_builtin_defaults() {
        let mut t = MeshTracker::default();
        assert!(matches!(t.on_event(Event::Init), Update::Unchanged));
        assert_eq!(set(t.on_event(Event::InitDone)), InjectConfig::default());
    }

    #[test]
    fn mesh_settings_apply_and_deletion_restores_defaults() {
        let mut t = MeshTracker::default();
        t.on_event(Event::Init);
        assert!(!set(t.on_event(Event::InitApply(mesh(false)))).native_sidecar);
        assert!(matches!(t.on_event(Event::InitDone), Update::Unchanged));
        assert!(set(t.on_event(Event::Apply(mesh(true)))).native_sidecar);
        assert_eq!(
            set(t.on_event(Event::Delete(mesh(true)))),
            InjectConfig::default()
        );
    }

    #[test]
    fn invalid_mesh_is_rejected_not_applied() {
        let mut t = MeshTracker::default();
        let mut m = mesh(true);
        m.spec.injection.exclude_outbound_cidrs = vec!["not-a-cidr".into()];
        assert!(matches!(t.on_event(Event::Apply(m)), Update::Rejected(_)));
    }

    #[test]
    fn other_names_are_ignored() {
        let mut t = MeshTracker::default();
        let m = Mesh::new("other", MeshSpec::default());
        assert!(matches!(t.on_event(Event::Apply(m)), Update::Unchanged));
    }
}
