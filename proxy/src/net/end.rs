//! The graceful end as a future each connection holds for its whole life,
//! in 32 bytes.
//!
//! A connection must hear the end while it sits idle, so it holds a future
//! that resolves when the end begins. The usual ones keep an intrusive
//! waiter node inside the future (a cancellation token's owned future is
//! 72 bytes), and that node is paid by every idle connection's task. Here
//! the waiters live in one table the connections share instead: a
//! connection's [`EndSignal`] holds the table, its slot number and the
//! waker it registered, and the table keeps one waker per slot. A signal
//! polled again by the task that registered it reads one atomic flag and
//! takes no lock, so connections on several worker threads do not contend
//! for the table on every poll.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// The end's waiters: [`Ends::signal`] hands out futures, [`Ends::end`]
/// resolves them all, including those made after it.
#[derive(Debug, Default)]
pub struct Ends {
    /// Set (under the table's lock) when the end begins.
    ended: AtomicBool,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    ended: bool,
    /// One waker slot per waiting signal; `None`: free or not yet polled.
    wakers: Vec<Option<Waker>>,
    /// Slots free for the next signal.
    free: Vec<u32>,
}

impl Ends {
    /// A future that resolves once [`Ends::end`] has been called.
    pub fn signal(self: &Arc<Self>) -> EndSignal {
        EndSignal {
            ends: self.clone(),
            slot: NO_SLOT,
            registered: None,
        }
    }

    /// Begins the end: every signal, waiting or to come, resolves.
    pub fn end(&self) {
        let wakers = {
            let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
            t.ended = true;
            self.ended.store(true, Ordering::Release);
            std::mem::take(&mut t.wakers)
        };
        for w in wakers.into_iter().flatten() {
            w.wake();
        }
    }

    /// Whether the end has begun.
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Slots held by waiting signals (for tests).
    #[cfg(test)]
    fn waiting(&self) -> usize {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        t.wakers.len() - t.free.len()
    }
}

const NO_SLOT: u32 = u32::MAX;

/// Resolves once the end has begun ([`Ends::signal`]).
#[derive(Debug)]
pub struct EndSignal {
    ends: Arc<Ends>,
    /// The slot of this signal's waker in the table, once polled.
    slot: u32,
    /// The waker in that slot.
    registered: Option<Waker>,
}

impl Future for EndSignal {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if this.ends.ended() {
            return Poll::Ready(());
        }
        if this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            // `end` wakes this very waker: nothing to change.
            return Poll::Pending;
        }
        let mut t = this.ends.table.lock().unwrap_or_else(|p| p.into_inner());
        if t.ended {
            // `end` took the table's wakers: the slot is gone with them.
            this.slot = NO_SLOT;
            return Poll::Ready(());
        }
        if this.slot == NO_SLOT {
            this.slot = match t.free.pop() {
                Some(s) => s,
                None => {
                    t.wakers.push(None);
                    u32::try_from(t.wakers.len() - 1).unwrap_or(NO_SLOT)
                }
            };
            if this.slot == NO_SLOT {
                // Four billion waiters: this one polls again instead.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        t.wakers[this.slot as usize] = Some(cx.waker().clone());
        this.registered = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for EndSignal {
    fn drop(&mut self) {
        if self.slot == NO_SLOT {
            return;
        }
        let mut t = self.ends.table.lock().unwrap_or_else(|p| p.into_inner());
        if !t.ended {
            t.wakers[self.slot as usize] = None;
            t.free.push(self.slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::counting_waker;
    use std::sync::atomic::Ordering;

    fn poll(s: &mut EndSignal, waker: &Waker) -> Poll<()> {
        Pin::new(s).poll(&mut Context::from_waker(waker))
    }

    #[test]
    fn the_end_wakes_every_waiting_signal_once_and_resolves_them() {
        let ends = Arc::new(Ends::default());
        let (count, waker) = counting_waker();
        let mut signals: Vec<_> = (0..3).map(|_| ends.signal()).collect();
        for s in &mut signals {
            assert!(poll(s, &waker).is_pending());
            // Polled again with the same waker: still one slot each.
            assert!(poll(s, &waker).is_pending());
        }
        assert_eq!(ends.waiting(), 3);
        assert_eq!(count.load(Ordering::SeqCst), 0);
        ends.end();
        assert_eq!(count.load(Ordering::SeqCst), 3);
        for s in &mut signals {
            assert!(poll(s, &waker).is_ready());
        }
        // A signal made after the end resolves at once.
        assert!(poll(&mut ends.signal(), &waker).is_ready());
        assert!(ends.ended());
    }

    #[test]
    fn a_dropped_signal_frees_its_slot_and_is_not_woken() {
        let ends = Arc::new(Ends::default());
        let (count, waker) = counting_waker();
        let mut a = ends.signal();
        assert!(poll(&mut a, &waker).is_pending());
        drop(a);
        assert_eq!(ends.waiting(), 0);
        // The freed slot is reused, so the table does not grow with
        // connections that came and went.
        let mut b = ends.signal();
        assert!(poll(&mut b, &waker).is_pending());
        assert_eq!(ends.waiting(), 1);
        assert_eq!(ends.table.lock().expect("table").wakers.len(), 1);
        ends.end();
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_latest_waker_is_the_one_woken() {
        let ends = Arc::new(Ends::default());
        let (first, first_waker) = counting_waker();
        let (second, second_waker) = counting_waker();
        let mut s = ends.signal();
        assert!(poll(&mut s, &first_waker).is_pending());
        assert!(poll(&mut s, &second_waker).is_pending());
        ends.end();
        assert_eq!(first.load(Ordering::SeqCst), 0);
        assert_eq!(second.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_signal_is_small() {
        assert!(std::mem::size_of::<EndSignal>() <= 32);
    }
}
