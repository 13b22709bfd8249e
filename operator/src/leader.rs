//! Leader election: only the replica holding the `Lease` runs the
//! reconcilers, so two replicas never both write.
//!
//! The Lease itself is managed by `kube-lease-manager` (server-side apply
//! on a `coordination.k8s.io/v1` Lease, renewed before it expires, taken
//! over only after it has expired). [`lead`] turns its "am I the leader"
//! channel into running work: the work starts when leadership is gained,
//! is cancelled *and awaited* when it is lost, and starts afresh when it is
//! gained again. [`run_with_lease`] wires the two together.

use std::future::Future;
use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseCreateMode, LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Leader election settings.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// Name of the Lease.
    pub name: String,
    /// Namespace of the Lease.
    pub namespace: String,
    /// This replica's identity in the Lease (usually the pod name).
    pub identity: String,
    /// How long a lease is valid after its last renewal.
    pub duration: Duration,
    /// How long before expiry the holder renews; also the clock skew
    /// tolerated between replicas.
    pub grace: Duration,
}

/// Why leader election failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The Lease could not be created or read.
    #[error(
        "leader election on Lease {namespace}/{name}: {source}; check RBAC for coordination.k8s.io leases in {namespace}"
    )]
    Lease {
        /// Lease namespace.
        namespace: String,
        /// Lease name.
        name: String,
        /// The error.
        #[source]
        source: LeaseManagerError,
    },
    /// The reconcilers stopped by themselves while this replica led.
    #[error(
        "the reconcilers stopped on their own (see the errors logged before); the lease was released so another replica can take over"
    )]
    WorkStopped,
}

/// How [`lead`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// `shutdown` was cancelled or the leadership channel closed.
    Shutdown,
    /// The work stopped by itself while leading (a fatal reconciler error).
    WorkStopped,
}

/// Runs `work` while `leadership` says this replica leads, until `shutdown`.
///
/// Each run of `work` gets its own cancellation token; when leadership is
/// lost the token is cancelled and the run is awaited before anything else
/// happens, so at most one run is ever alive in this process. If a run
/// ends by itself, `lead` returns [`Ended::WorkStopped`] so the process can
/// exit and hand the lease to another replica.
pub async fn lead<W, F>(
    mut leadership: watch::Receiver<bool>,
    shutdown: CancellationToken,
    mut work: W,
) -> Ended
where
    W: FnMut(CancellationToken) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    loop {
        // Wait to become the leader.
        while !*leadership.borrow_and_update() {
            tokio::select! {
                () = shutdown.cancelled() => return Ended::Shutdown,
                changed = leadership.changed() => {
                    if changed.is_err() {
                        return Ended::Shutdown;
                    }
                }
            }
        }
        tracing::info!("leadership acquired: starting reconcilers");
        let token = shutdown.child_token();
        let mut running = tokio::spawn(work(token.clone()));
        let stop = loop {
            tokio::select! {
                () = shutdown.cancelled() => break true,
                changed = leadership.changed() => {
                    if changed.is_err() {
                        break true;
                    }
                    if !*leadership.borrow_and_update() {
                        tracing::warn!("leadership lost: stopping reconcilers");
                        break false;
                    }
                }
                res = &mut running => {
                    if let Err(e) = res {
                        tracing::error!(error = %e, "reconcilers ended unexpectedly");
                    }
                    token.cancel();
                    if shutdown.is_cancelled() {
                        // The work saw the shutdown first.
                        return Ended::Shutdown;
                    }
                    // Let the lease go to another replica rather than
                    // holding it with nothing running.
                    return Ended::WorkStopped;
                }
            }
        };
        token.cancel();
        if let Err(e) = running.await {
            tracing::error!(error = %e, "reconcilers failed while stopping");
        }
        if stop {
            return Ended::Shutdown;
        }
    }
}

/// Takes part in leader election on the Lease and runs `work` while
/// leading, until `shutdown`; `on_started` runs once the Lease is set up; releases the Lease on the way out so a
/// standby replica takes over at once.
pub async fn run_with_lease<W, F>(
    client: Client,
    settings: &LeaseSettings,
    shutdown: CancellationToken,
    on_started: impl FnOnce(),
    work: W,
) -> Result<(), LeaderError>
where
    W: FnMut(CancellationToken) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let err = |source| LeaderError::Lease {
        namespace: settings.namespace.clone(),
        name: settings.name.clone(),
        source,
    };
    let manager = LeaseManagerBuilder::new(client, &settings.name)
        .with_namespace(&settings.namespace)
        .with_create_mode(LeaseCreateMode::AutoCreate)
        .with_identity(&settings.identity)
        .with_duration(settings.duration.as_secs().max(2))
        .with_grace(settings.grace.as_secs().max(1))
        .with_field_manager(format!("weft-operator-{}", settings.identity))
        .build()
        .await
        .map_err(err)?;
    let (leadership, task) = manager.watch().await;
    on_started();
    let ended = lead(leadership, shutdown, work).await;
    // `lead` dropped the receiver: the manager releases the lease and ends.
    match task.await {
        Ok(Ok(_manager)) => {}
        Ok(Err(e)) => return Err(err(e)),
        Err(e) => tracing::warn!(error = %e, "lease manager task ended abnormally"),
    }
    match ended {
        Ended::Shutdown => Ok(()),
        Ended::WorkStopped => Err(LeaderError::WorkStopped),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts runs that are alive and the most alive at once.
    #[derive(Default)]
    struct Probe {
        alive: AtomicUsize,
        max_alive: AtomicUsize,
        started: AtomicUsize,
        writes: AtomicUsize,
    }

    fn worker(
        probe: Arc<Probe>,
    ) -> impl FnMut(CancellationToken) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
        move |token| {
            let p = probe.clone();
            Box::pin(async move {
                let now = p.alive.fetch_add(1, Ordering::SeqCst) + 1;
                p.max_alive.fetch_max(now, Ordering::SeqCst);
                p.started.fetch_add(1, Ordering::SeqCst);
                loop {
                    tokio::select! {
                        () = token.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {
                            p.writes.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
                // Stopping takes a while (in-flight reconciles finish).
                tokio::time::sleep(Duration::from_millis(300)).await;
                p.alive.fetch_sub(1, Ordering::SeqCst);
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn work_runs_only_while_leading() {
        let (tx, rx) = watch::channel(false);
        let shutdown = CancellationToken::new();
        let probe = Arc::new(Probe::default());
        let task = tokio::spawn(lead(rx, shutdown.clone(), worker(probe.clone())));

        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            probe.started.load(Ordering::SeqCst),
            0,
            "a standby does not write"
        );

        tx.send(true).expect("send");
        tokio::time::sleep(Duration::from_millis(5500)).await;
        assert_eq!(probe.alive.load(Ordering::SeqCst), 1);
        let writes = probe.writes.load(Ordering::SeqCst);
        assert_eq!(writes, 5);

        tx.send(false).expect("send");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            probe.alive.load(Ordering::SeqCst),
            0,
            "losing the lease stops the work"
        );
        assert_eq!(
            probe.writes.load(Ordering::SeqCst),
            writes,
            "no write after losing the lease"
        );

        // Flapping: lost and regained at once never runs two copies.
        tx.send(true).expect("send");
        tokio::time::sleep(Duration::from_millis(10)).await;
        tx.send(false).expect("send");
        tx.send(true).expect("send");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(probe.max_alive.load(Ordering::SeqCst), 1);
        assert_eq!(probe.alive.load(Ordering::SeqCst), 1);

        shutdown.cancel();
        assert_eq!(task.await.expect("lead ends on shutdown"), Ended::Shutdown);
        assert_eq!(
            probe.alive.load(Ordering::SeqCst),
            0,
            "shutdown waits for the work to stop"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn work_that_stops_by_itself_ends_the_leadership() {
        let (_tx, rx) = watch::channel(true);
        let ended = lead(rx, CancellationToken::new(), |_token| async {
            tokio::time::sleep(Duration::from_secs(2)).await;
        })
        .await;
        assert_eq!(ended, Ended::WorkStopped);
    }

    /// Two replicas behind one simulated lease: the lease passes from A to
    /// B only after A's term ended, and the writes of both never overlap.
    #[tokio::test(start_paused = true)]
    async fn two_replicas_hand_over_without_overlap() {
        let (tx_a, rx_a) = watch::channel(true);
        let (tx_b, rx_b) = watch::channel(false);
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Probe::default());
        let a = tokio::spawn(lead(rx_a, shutdown.clone(), worker(shared.clone())));
        let b = tokio::spawn(lead(rx_b, shutdown.clone(), worker(shared.clone())));
        tokio::time::sleep(Duration::from_secs(3)).await;
        // A loses the lease; B may only acquire it after the lease
        // duration has passed, which exceeds A's stop time.
        tx_a.send(false).expect("send");
        tokio::time::sleep(Duration::from_secs(15)).await;
        tx_b.send(true).expect("send");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(shared.started.load(Ordering::SeqCst), 2);
        assert_eq!(
            shared.max_alive.load(Ordering::SeqCst),
            1,
            "never two writers"
        );
        shutdown.cancel();
        a.await.expect("a");
        b.await.expect("b");
    }
}
