//! Idle connections parked outside the runtime.
//!
//! An app's connection pool may hold thousands of HTTP/1 connections to its
//! sidecar open and unused. In the runtime each one costs a task (256
//! bytes), the runtime's registration of its socket (256), the connection's
//! context and its metric series cache: about 800 bytes of heap per
//! connection, where nginx holds about 500 (docs/performance.md). A
//! connection idle for a while gives all of that up here: its socket moves
//! into a second epoll instance, nested in the runtime's as one file
//! descriptor, and what serves it again is a small boxed closure. When the
//! socket becomes readable (the next request, the client's close, an
//! error) the closure puts it back in the runtime and spawns its task.
//!
//! When: [`Parking::run`] advances a tick every `after`. A connection going
//! idle notes the tick, and asks to be woken at the next one
//! ([`Parking::wake_at_next_tick`], at most once per tick: its task's waker
//! is the same from one idle period to the next). Once it has seen two
//! ticks since it went idle (idle between one and two `after`) it parks
//! itself. A busy connection pays one atomic read per request and one
//! waker left per tick, and is woken at most once per tick for nothing.
//!
//! A crowd: while [`CROWD`] or more connections are idle (parked, or
//! waiting for the next tick), the next tick comes `after / 100` after the
//! last (10 ms by default) instead of `after`, so a connection going idle
//! then parks within tens of milliseconds. A few idle connections stay in
//! the runtime for `after`; when an app holds hundreds idle, each costs
//! the runtime's 512 bytes for milliseconds, not a second, and a burst of
//! new connections reuses the memory of those that parked before it. The
//! price is paid only in a crowd: by a connection whose requests come more
//! than one or two quick ticks apart, a park and a resume (about 8 µs) per
//! such request; by a busy one, a wake-up for nothing per quick tick.
//!
//! ```text
//! idle ≥ after ──park──► epoll (nested) ──readable──► runtime + task ──► serve
//! ```
//!
//! Shutdown closes what is parked: those connections are idle, and an idle
//! connection closes at shutdown anyway.

use std::io;
use std::net::TcpStream as StdTcpStream;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::task::Waker;
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// What serves a parked connection again, given its socket back in the
/// runtime (it spawns the connection's task).
pub type Resume = Box<dyn FnOnce(TcpStream) + Send>;

/// Ticks a connection must see idle before it parks: with a tick every
/// `after`, it has been idle between one and two `after`.
const IDLE_TICKS: u32 = 2;

/// Events taken from the nested epoll per wait.
const BATCH: usize = 64;

/// Idle connections (parked, or waiting for the next tick) from which the
/// ticks come quickly: more than the busiest of the benchmark's loads holds
/// (64 connections, each asking once per tick), few enough that the
/// runtime's share of them stays small (128 × 512 bytes).
pub const CROWD: usize = 128;

/// In a crowd, the next tick comes this fraction of `after` after the last.
const QUICK_PER_AFTER: u32 = 100;

/// The parked connections of one proxy and the tick that decides when an
/// idle one parks.
#[derive(Debug)]
pub struct Parking {
    /// `None`: connections are never parked.
    after: Option<Duration>,
    tick: AtomicU32,
    /// The wakers of idle connections not yet due, woken at the next tick.
    waiting: Mutex<Vec<Waker>>,
    /// A quick tick was asked for since the last tick (a crowd).
    quick_asked: AtomicBool,
    /// Asks [`Parking::run`] for a quick tick.
    crowded: Notify,
    epoll: Option<Epoll>,
    lot: Mutex<Lot>,
    /// No more parking: the run ended (shutdown) or never started.
    closed: AtomicBool,
    /// The run started, or parking was closed: it never starts again.
    started: AtomicBool,
    /// Connections parked now (the `connections_parked` metric).
    gauge: Gauge,
}

#[allow(missing_debug_implementations)] // closures
#[derive(Default)]
struct Lot {
    slots: Vec<Option<(StdTcpStream, Resume)>>,
    free: Vec<u32>,
}

impl Lot {
    /// The key the next [`Lot::fill`] takes.
    fn vacant(&self) -> u32 {
        match self.free.last() {
            Some(&k) => k,
            None => u32::try_from(self.slots.len()).unwrap_or(u32::MAX),
        }
    }

    /// Fills the slot [`Lot::vacant`] named.
    fn fill(&mut self, key: u32, parked: (StdTcpStream, Resume)) {
        if self.free.last() == Some(&key) {
            self.free.pop();
            self.slots[key as usize] = Some(parked);
        } else {
            self.slots.push(Some(parked));
        }
    }

    fn take(&mut self, key: u64) -> Option<(StdTcpStream, Resume)> {
        let k = u32::try_from(key).ok()?;
        let parked = self.slots.get_mut(k as usize)?.take()?;
        self.free.push(k);
        Some(parked)
    }
}

impl std::fmt::Debug for Lot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lot")
            .field("parked", &(self.slots.len() - self.free.len()))
            .finish()
    }
}

impl Parking {
    /// Parks connections idle for `after` (`None`: never), counting them in
    /// `gauge`. Nothing parks until [`Parking::run`] runs.
    pub fn new(after: Option<Duration>, gauge: Gauge) -> Self {
        let epoll = after.and_then(|_| match Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC) {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::warn!(error = %e, "cannot create an epoll instance; idle connections will not be parked");
                None
            }
        });
        Parking {
            after,
            tick: AtomicU32::new(0),
            waiting: Mutex::default(),
            quick_asked: AtomicBool::new(false),
            crowded: Notify::new(),
            epoll,
            lot: Mutex::default(),
            closed: AtomicBool::new(true),
            started: AtomicBool::new(false),
            gauge,
        }
    }

    /// The tick now, for a connection going idle or checking whether to
    /// park; `None` when connections are not parked.
    pub fn tick(&self) -> Option<u32> {
        if self.closed.load(Ordering::Relaxed) {
            return None;
        }
        Some(self.tick.load(Ordering::Relaxed))
    }

    /// Whether a connection idle since tick `since` parks at tick `now`:
    /// it has seen two ticks since (idle between one and two `after`).
    pub fn due(since: u32, now: u32) -> bool {
        now.wrapping_sub(since) >= IDLE_TICKS
    }

    /// Wakes `waker` at the next tick (while parking runs), and asks for
    /// that tick to come quickly when the idle connections are a crowd.
    pub fn wake_at_next_tick(&self, waker: &Waker) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        let waiting = {
            let mut w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            w.push(waker.clone());
            w.len()
        };
        let parked = usize::try_from(self.gauge.get()).unwrap_or(0);
        if waiting + parked >= CROWD
            && !self.quick_asked.load(Ordering::Relaxed)
            && !self.quick_asked.swap(true, Ordering::Relaxed)
        {
            self.crowded.notify_one();
        }
    }

    /// Connections parked now.
    pub fn parked(&self) -> usize {
        let lot = self.lot.lock().unwrap_or_else(|p| p.into_inner());
        lot.slots.len() - lot.free.len()
    }

    /// Takes the idle connection `io` out of the runtime until it becomes
    /// readable, then hands it to `resume`. Gives `io` back when it cannot
    /// (parking off or ended, the epoll refused it); a connection whose
    /// socket the runtime would not release is closed (`Ok`).
    pub fn park(&self, io: TcpStream, resume: Resume) -> Result<(), (TcpStream, Resume)> {
        let Some(epoll) = self.epoll.as_ref().filter(|_| self.tick().is_some()) else {
            return Err((io, resume));
        };
        let std = match io.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "an idle connection could not leave the runtime; closed");
                return Ok(());
            }
        };
        // The key is known before the socket joins the epoll; the lot stays
        // locked until it is filled, so an event that comes at once finds it.
        let mut lot = self.lot.lock().unwrap_or_else(|p| p.into_inner());
        if self.closed.load(Ordering::Relaxed) {
            // Closed since the check above ([`Parking::close`] sets the
            // flag before it empties the lot).
            drop(lot);
            return match TcpStream::from_std(std) {
                Ok(io) => Err((io, resume)),
                Err(_) => Ok(()),
            };
        }
        let key = lot.vacant();
        let interest = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLONESHOT;
        if let Err(e) = epoll.add(&std, EpollEvent::new(interest, u64::from(key))) {
            drop(lot);
            tracing::debug!(error = %e, "an idle connection could not be parked");
            return match TcpStream::from_std(std) {
                Ok(io) => Err((io, resume)),
                Err(_) => Ok(()),
            };
        }
        lot.fill(key, (std, resume));
        drop(lot);
        self.gauge.inc();
        Ok(())
    }

    /// Ticks every `after` (at once first; in a crowd, `after / 100` after
    /// the last), waking the idle connections that asked, and resumes
    /// parked connections as they become readable, until `stop` resolves;
    /// then closes those still parked. Returns at once when parking is off.
    pub async fn run(&self, stop: impl std::future::Future<Output = ()>) {
        let (Some(after), Some(epoll)) = (self.after, self.epoll.as_ref()) else {
            return;
        };
        // `AsyncFd::new` is deprecated for file descriptors their owner
        // may close or replace while registered; this one is an `OwnedFd`
        // the `AsyncFd` owns, closed only after it deregisters. Its
        // replacement, `register`, is `unsafe`, which weft forbids.
        #[allow(deprecated)]
        let nested = match epoll.0.try_clone().and_then(AsyncFd::new) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the parked connections' epoll; idle connections will not be parked");
                return;
            }
        };
        if self.started.swap(true, Ordering::Relaxed) {
            // Once, and never after [`Parking::close`].
            return;
        }
        self.closed.store(false, Ordering::Relaxed);
        let quick = (after / QUICK_PER_AFTER).max(Duration::from_millis(1));
        let mut last = tokio::time::Instant::now();
        let mut next = last;
        tokio::pin!(stop);
        // The list woken last tick, kept for its room.
        let mut spare = Vec::new();
        loop {
            tokio::select! {
                () = &mut stop => break,
                () = self.crowded.notified() => next = next.min(last + quick),
                () = tokio::time::sleep_until(next) => {
                    last = tokio::time::Instant::now();
                    next = last + after;
                    // Those woken below that are not yet due ask again, and
                    // ask for a quick tick if they are still a crowd.
                    self.quick_asked.store(false, Ordering::Relaxed);
                    self.tick.fetch_add(1, Ordering::Relaxed);
                    let woken = std::mem::replace(
                        &mut *self.waiting.lock().unwrap_or_else(|p| p.into_inner()),
                        std::mem::take(&mut spare),
                    );
                    for w in &woken {
                        w.wake_by_ref();
                    }
                    spare = woken;
                    spare.clear();
                }
                r = nested.readable() => match r {
                    Ok(mut guard) => {
                        let r = guard.try_io(|_| self.resume_ready(epoll));
                        if let Ok(Err(e)) = r {
                            tracing::warn!(error = %e, "waiting on parked connections failed");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "waiting on parked connections failed");
                        break;
                    }
                },
            }
        }
        self.close();
    }

    /// Stops parking and closes every parked connection (shutdown: they
    /// are idle). Parking stays off.
    pub fn close(&self) {
        self.started.store(true, Ordering::Relaxed);
        self.closed.store(true, Ordering::Relaxed);
        let waiting = std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|p| p.into_inner()));
        drop(waiting);
        let parked = std::mem::take(&mut *self.lot.lock().unwrap_or_else(|p| p.into_inner()));
        let closed = parked.slots.into_iter().flatten().count();
        self.gauge.dec_by(i64::try_from(closed).unwrap_or(i64::MAX));
    }

    /// Resumes the parked connections that are ready; `WouldBlock` when
    /// none is.
    fn resume_ready(&self, epoll: &Epoll) -> io::Result<()> {
        let mut events = [EpollEvent::empty(); BATCH];
        let n = epoll.wait(&mut events, EpollTimeout::ZERO)?;
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        for ev in &events[..n] {
            let taken = self
                .lot
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(ev.data());
            let Some((std, resume)) = taken else {
                continue;
            };
            self.gauge.dec();
            let _ = epoll.delete(&std);
            match TcpStream::from_std(std) {
                Ok(io) => resume(io),
                Err(e) => {
                    tracing::debug!(error = %e, "a parked connection could not return to the runtime; closed");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Runs `parking` until the sender is used or dropped.
    fn spawn_run(
        parking: &Arc<Parking>,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let (stop_tx, stop) = tokio::sync::oneshot::channel::<()>();
        let parking = parking.clone();
        let run = tokio::spawn(async move {
            parking
                .run(async {
                    let _ = stop.await;
                })
                .await;
        });
        (stop_tx, run)
    }

    /// A connection idle since a tick is due two ticks later; before, it
    /// leaves its waker, and the next tick wakes it.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_due_two_ticks_after_it_went_idle() {
        let parking = Arc::new(Parking::new(Some(Duration::from_secs(1)), Gauge::default()));
        let (stop_tx, run) = spawn_run(&parking);
        // The run's first tick is at once.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let since = parking.tick().expect("parking runs");
        let (count, waker) = crate::net::counting_waker();
        let now = || parking.tick().expect("parking runs");
        assert!(!Parking::due(since, now()));
        parking.wake_at_next_tick(&waker);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(count.load(Ordering::SeqCst), 1, "woken at the tick");
        assert!(!Parking::due(since, now()), "idle less than a whole tick");
        parking.wake_at_next_tick(&waker);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(count.load(Ordering::SeqCst), 2);
        assert!(Parking::due(since, now()));
        // Asked once, woken once.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(count.load(Ordering::SeqCst), 2);
        let _ = stop_tx.send(());
        run.await.expect("run ends");
        assert_eq!(parking.tick(), None, "off after the run");
    }

    /// While few connections are idle the ticks come every `after`; once
    /// parked and waiting connections together are a crowd, the next tick
    /// comes `after / 100` after the last, and only while they still ask.
    #[tokio::test(start_paused = true)]
    async fn a_crowd_of_idle_connections_ticks_quickly() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let gauge = Gauge::default();
        let parking = Arc::new(Parking::new(Some(Duration::from_secs(1)), gauge.clone()));
        let (stop_tx, run) = spawn_run(&parking);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let first = parking.tick().expect("parking runs");
        // Two parked connections count toward the crowd.
        let mut clients = Vec::new();
        for _ in 0..2 {
            clients.push(TcpStream::connect(addr).await.expect("connect"));
            let (server, _) = listener.accept().await.expect("accept");
            assert!(parking.park(server, Box::new(|_| {})).is_ok());
        }
        assert_eq!(gauge.get(), 2);
        let (count, waker) = crate::net::counting_waker();
        let now = || parking.tick().expect("parking runs");
        for _ in 0..CROWD - 3 {
            parking.wake_at_next_tick(&waker);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            (now(), count.load(Ordering::SeqCst)),
            (first, 0),
            "not yet a crowd"
        );
        parking.wake_at_next_tick(&waker);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(now(), first + 1, "the crowd's first tick comes at once");
        assert_eq!(
            count.load(Ordering::SeqCst),
            CROWD - 2,
            "every waiting one woken"
        );
        // Still a crowd: the next tick comes 10 ms after.
        for _ in 0..CROWD - 2 {
            parking.wake_at_next_tick(&waker);
        }
        tokio::time::sleep(Duration::from_millis(9)).await;
        assert_eq!(now(), first + 1);
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(now(), first + 2, "a quick tick");
        // Nobody asks again: the next tick comes `after` later.
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(now(), first + 2);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(now(), first + 3);
        let _ = stop_tx.send(());
        run.await.expect("run ends");
        drop(clients);
    }

    /// Parking turned off never runs, never ticks and takes nothing.
    #[tokio::test]
    async fn parking_turned_off_takes_nothing() {
        let parking = Parking::new(None, Gauge::default());
        tokio::time::timeout(Duration::from_secs(5), parking.run(std::future::pending()))
            .await
            .expect("returns at once");
        assert_eq!(parking.tick(), None);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let _client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        assert!(parking.park(server, Box::new(|_| {})).is_err());
    }

    /// Parking that is not running, or was closed, gives the connection
    /// back; closing closes what is parked and counts it.
    #[tokio::test]
    async fn closed_parking_gives_connections_back_and_closes_what_it_held() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let gauge = Gauge::default();
        let parking = Arc::new(Parking::new(Some(Duration::from_secs(60)), gauge.clone()));
        let resume: Resume = Box::new(|_| {});
        let (server, resume) = parking.park(server, resume).expect_err("not running");

        let (stop_tx, run) = spawn_run(&parking);
        while parking.tick().is_none() {
            tokio::task::yield_now().await;
        }
        assert!(parking.park(server, resume).is_ok());
        assert_eq!((parking.parked(), gauge.get()), (1, 1));
        parking.close();
        assert_eq!((parking.parked(), gauge.get()), (0, 0));
        let mut b = [0u8; 1];
        let n = tokio::io::AsyncReadExt::read(&mut client, &mut b)
            .await
            .expect("read");
        assert_eq!(n, 0, "the parked connection is closed");
        // Closed: nothing parks again, even while the run goes on.
        let (other, _) = {
            let _c = TcpStream::connect(addr).await.expect("connect");
            listener.accept().await.expect("accept")
        };
        assert!(parking.park(other, Box::new(|_| {})).is_err());
        drop(stop_tx);
        run.await.expect("run ends");
    }
}
