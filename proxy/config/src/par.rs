//! Work over many Services on more than one core, for a load whose
//! Services are mostly new (a proxy's first load, a change that touches
//! every Service): parsing, digesting and checking 10,000 of them is
//! 100–200 ms on one core, and each Service is independent of the others.
//!
//! Scoped threads, started for the one call and gone after it: the sidecar
//! keeps no pool of idle threads (architecture decision 37).

use std::num::NonZeroUsize;

/// Threads used at most, whatever the machine: past four the sequential
/// parts of a load (the document scan, the indices) dominate.
pub const MAX_THREADS: usize = 4;
/// Fewest items a thread is started for. A Service takes 10–20 µs, so a
/// thread would pay for itself at far fewer, but measured under load a
/// document of 1,001 new Services loaded 2 ms slower on two threads than
/// on one (12.1 and 12.6 ms against 14.0 and 14.3), while 10,001 loaded a
/// third faster: below a few thousand, one thread is within the reload's
/// bar anyway.
pub const MIN_PER_THREAD: usize = 1024;

/// How many threads `items` items are worth: one per [`MIN_PER_THREAD`],
/// at most [`MAX_THREADS`] and at most the CPUs this process may use
/// (`available_parallelism` counts a cgroup's CPU quota).
pub fn threads_for(items: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    (items / MIN_PER_THREAD).clamp(1, cpus.min(MAX_THREADS))
}

/// `f(i, &items[i])` for every item, in order, on `threads` threads (the
/// calling one among them), each taking one contiguous run of the items.
/// A run whose thread cannot be started (a pod at its process limit) runs
/// on the calling thread instead. A panic in `f` is raised again here.
pub fn map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(usize, &T) -> R + Sync,
) -> Vec<R> {
    let run = |start: usize, part: &[T]| -> Vec<R> {
        part.iter()
            .enumerate()
            .map(|(i, item)| f(start + i, item))
            .collect()
    };
    let threads = threads.clamp(1, items.len().max(1));
    if threads == 1 {
        return run(0, items);
    }
    let per = items.len().div_ceil(threads);
    std::thread::scope(|s| {
        let run = &run;
        let mut parts = items.chunks(per).enumerate();
        let first = parts.next();
        let others: Vec<_> = parts
            .map(|(k, part)| {
                let start = k * per;
                // No thread (a pod at its process limit): the caller does
                // the run, later; the result is the same.
                spawn(s, move || run(start, part)).map_err(|_| (start, part))
            })
            .collect();
        let mut out = first.map_or_else(Vec::new, |(_, part)| run(0, part));
        out.reserve(items.len() - out.len());
        for other in others {
            match other.map(|h| h.join()) {
                Ok(Ok(done)) => out.extend(done),
                Ok(Err(panic)) => std::panic::resume_unwind(panic),
                Err((start, part)) => out.extend(run(start, part)),
            }
        }
        out
    })
}

/// Starts a named worker thread in `scope`.
fn spawn<'scope, R: Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    work: impl FnOnce() -> R + Send + 'scope,
) -> std::io::Result<std::thread::ScopedJoinHandle<'scope, R>> {
    #[cfg(test)]
    {
        if tests::REFUSE_THREADS.with(std::cell::Cell::get) {
            return Err(std::io::Error::other("threads refused by the test"));
        }
        tests::STARTED.with(|n| n.set(n.get() + 1));
    }
    std::thread::Builder::new()
        .name("weft-load".into())
        .spawn_scoped(scope, work)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    thread_local! {
        /// Makes [`spawn`] fail on this thread, as at a process limit.
        pub(super) static REFUSE_THREADS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        /// Worker threads this thread has asked [`spawn`] for.
        pub(crate) static STARTED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    #[test]
    fn runs_whose_thread_cannot_start_run_on_the_caller() {
        REFUSE_THREADS.with(|r| r.set(true));
        let items: Vec<u32> = (0..100).collect();
        let out = map(&items, 4, |i, x| (i, *x, std::thread::current().id()));
        REFUSE_THREADS.with(|r| r.set(false));
        let me = std::thread::current().id();
        assert_eq!(out.len(), 100);
        for (i, (at, x, on)) in out.into_iter().enumerate() {
            assert_eq!((at, x), (i, i as u32));
            assert_eq!(on, me, "item {i} ran on the calling thread");
        }
    }

    #[test]
    fn results_come_in_order_with_their_index_whatever_the_threads() {
        let items: Vec<u32> = (0..1000).collect();
        for threads in [1, 2, 3, 4, 7] {
            let seen = std::sync::Mutex::new(std::collections::HashSet::new());
            let out = map(&items, threads, |i, x| {
                seen.lock()
                    .expect("not poisoned")
                    .insert(std::thread::current().id());
                (i, x * 2)
            });
            let want: Vec<(usize, u32)> = (0..1000).map(|i| (i as usize, i * 2)).collect();
            assert_eq!(out, want, "{threads} threads");
            let used = seen.into_inner().expect("not poisoned").len();
            assert_eq!(used, threads.min(1000), "{threads} threads asked");
        }
        let few: Vec<u32> = (0..3).collect();
        assert_eq!(map(&few, 8, |i, x| (i, *x)), vec![(0, 0), (1, 1), (2, 2)]);
        assert!(map(&[] as &[u32], 4, |_, x| *x).is_empty());
    }

    #[test]
    fn a_few_items_are_not_worth_a_thread() {
        assert_eq!(threads_for(0), 1);
        assert_eq!(threads_for(MIN_PER_THREAD - 1), 1);
        assert!(threads_for(100 * MIN_PER_THREAD) <= MAX_THREADS);
    }

    #[test]
    fn a_panic_on_another_thread_reaches_the_caller() {
        let items: Vec<u32> = (0..10).collect();
        let caught = std::panic::catch_unwind(|| {
            map(&items, 2, |i, _| {
                assert!(i != 9, "item nine");
            })
        });
        assert!(caught.is_err());
    }
}
