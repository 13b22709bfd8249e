//! Reload from files: watch the mount *directory* for kubelet's atomic
//! `..data` symlink swap and reload the whole snapshot when it changes.
//!
//! Why the directory: kubelet never rewrites a file in place. It writes a
//! new `..<timestamp>` directory, then renames a fresh `..data_tmp` link
//! over `..data`. Watches on the files (themselves symlinks through
//! `..data`) would follow the old inodes and miss the swap, or fire half
//! way through. The rename of `..data` is the one event that means "a
//! complete new generation is in place".
//!
//! Loading (parsing, hashing, validating, building TLS configs) runs on a
//! blocking thread, off the request path; the result is swapped in
//! atomically, or rejected with a log line and a metric.

use std::path::PathBuf;
use std::sync::Arc;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::snapshot::resolve_data_dir;
use crate::state::State;

/// Starts watching `state.settings.config_dir` now (so no swap after this
/// call is missed) and returns the task that reloads on each swap.
pub fn watch(state: Arc<State>) -> impl std::future::Future<Output = ()> + Send + 'static {
    let dir = state.settings.config_dir.clone();
    let (tx, rx) = mpsc::unbounded_channel::<()>();
    let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| match ev {
        Ok(ev) => {
            let swap = !matches!(ev.kind, EventKind::Access(_))
                && ev
                    .paths
                    .iter()
                    .any(|p| p.file_name().is_some_and(|n| n == "..data"));
            if swap {
                let _ = tx.send(());
            }
        }
        Err(e) => tracing::warn!(error = %e, "file watch error"),
    })
    .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w));
    let watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::error!(error = %e, dir = %dir.display(), "cannot watch the mount directory; config and certificates will not reload (inotify limits?)");
            None
        }
    };
    run(state, dir, rx, watcher)
}

async fn run(
    state: Arc<State>,
    dir: PathBuf,
    mut rx: mpsc::UnboundedReceiver<()>,
    watcher: Option<notify::RecommendedWatcher>,
) {
    let Some(watcher) = watcher else { return };
    let mut last: Option<PathBuf> = state.snapshot.load().as_ref().map(|s| s.source.clone());
    // No quiet time after an event: the rename of `..data` is the last step
    // of a generation's write, so the generation it points to is complete
    // when the event arrives. Swaps that come while a reload runs are
    // coalesced here: one reload of whatever `..data` points to then.
    while rx.recv().await.is_some() {
        while rx.try_recv().is_ok() {}
        let target = resolve_data_dir(&dir);
        if last.as_ref() == Some(&target) {
            continue;
        }
        let st = state.clone();
        let ok = tokio::task::spawn_blocking(move || st.reload().is_ok())
            .await
            .unwrap_or(false);
        // A rejected target is not retried until the next swap.
        last = Some(target);
        tracing::debug!(ok, "reload attempt finished");
    }
    drop(watcher);
}
