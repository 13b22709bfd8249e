//! The accept loop both capture listeners share, the shape of an accepted
//! connection's task ([`staged`]), and the shutdown signal every
//! long-running loop watches.
//!
//! In: a bound listener. Out: each accepted connection, handed to the
//! listener's handler (`outbound`, `inbound`), until shutdown.

use std::future::{Future, Pending};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::either::Either;

use super::BoxFuture;
use crate::metrics::{Direction, OpenConn};

/// Accepts connections on `listener` and hands each to `accepted`, until
/// `shutdown` turns true. An accept error (file descriptor limit) is
/// logged and retried after a short pause.
pub async fn accept_loop(
    listener: TcpListener,
    direction: Direction,
    mut shutdown: watch::Receiver<bool>,
    mut accepted: impl FnMut(TcpStream, SocketAddr),
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((conn, peer)) => accepted(conn, peer),
                Err(e) => {
                    tracing::warn!(?direction, error = %e, "accept failed (file descriptor limit?)");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            },
            () = shutdown_requested(&mut shutdown) => break,
        }
    }
}

/// Resolves once shutdown has started (at once if it already has).
pub async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// What serves a connection once its prelude has decided: a future the
/// task holds inline (HTTP, whose idle state is small) or, boxed, one
/// whose state is large (a TCP forwarder, an mTLS session).
pub type Serving<H> = Either<H, BoxFuture<'static, ()>>;

/// A captured connection's task: its prelude (original destination,
/// snapshot lookups, protocol detection and its timer, a TLS handshake)
/// runs in an allocation of its own, freed when it has decided what serves
/// the connection; the task then holds that and nothing the prelude
/// needed, so an idle connection's task is the size of its serving state,
/// not of its largest prelude. `prelude` resolves to the connection's
/// open-connection count and what serves it, or `None` when nothing does.
pub fn staged<P, S>(prelude: P) -> Staged<P, S>
where
    P: Future<Output = Option<(OpenConn, S)>>,
    S: Future<Output = ()>,
{
    Staged::Prelude {
        prelude: Box::pin(prelude),
    }
}

/// A connection's task that serves at once, `open` counting it: a parked
/// connection served again (`net::park`).
pub fn serving<S>(open: OpenConn, serving: S) -> Staged<Pending<Option<(OpenConn, S)>>, S>
where
    S: Future<Output = ()>,
{
    Staged::Serving { open, serving }
}

pin_project_lite::pin_project! {
    /// The future of [`staged`].
    #[project = StagedProj]
    #[allow(missing_debug_implementations)] // futures
    pub enum Staged<P, S> {
        Prelude { prelude: Pin<Box<P>> },
        Serving { open: OpenConn, #[pin] serving: S },
        Done,
    }
}

impl<P, S> Future for Staged<P, S>
where
    P: Future<Output = Option<(OpenConn, S)>>,
    S: Future<Output = ()>,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match self.as_mut().project() {
                StagedProj::Prelude { prelude } => match ready!(prelude.as_mut().poll(cx)) {
                    Some((open, serving)) => self.set(Staged::Serving { open, serving }),
                    None => {
                        self.set(Staged::Done);
                        return Poll::Ready(());
                    }
                },
                StagedProj::Serving { serving, .. } => return serving.poll(cx),
                StagedProj::Done => return Poll::Ready(()),
            }
        }
    }
}
