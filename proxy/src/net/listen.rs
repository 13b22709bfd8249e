//! The accept loop both capture listeners share, and the shutdown signal
//! every long-running loop watches.
//!
//! In: a bound listener. Out: each accepted connection, handed to the
//! listener's handler (`outbound`, `inbound`), until shutdown.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::metrics::Direction;

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
