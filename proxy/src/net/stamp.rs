//! Test networking without iptables: a [`StampTable`] records, per client
//! socket, the destination the connection "was going to", and serves it as
//! the original destination; a [`TestDialer`] sends chosen destinations to a
//! proxy listener with such a stamp (as `REDIRECT` would), others directly.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpSocket, TcpStream};

use super::{BoxFuture, Dialer, OrigDst};

/// Client socket address → stamped original destination.
#[derive(Debug, Default, Clone)]
pub struct StampTable(Arc<Mutex<HashMap<SocketAddr, SocketAddr>>>);

impl StampTable {
    /// Connects to `listener` as if the connection had been addressed to
    /// `dst` and redirected. The stamp is recorded before the connect, so
    /// the accepting side always finds it.
    pub async fn connect(&self, listener: SocketAddr, dst: SocketAddr) -> io::Result<TcpStream> {
        let sock = if listener.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        let local = SocketAddr::new(listener.ip(), 0);
        sock.bind(local)?;
        let local = sock.local_addr()?;
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(local, dst);
        let s = sock.connect(listener).await?;
        s.set_nodelay(true)?;
        Ok(s)
    }
}

impl OrigDst for StampTable {
    fn original_dst(&self, conn: &TcpStream) -> io::Result<SocketAddr> {
        // A dual-stack listener sees IPv4 clients as `::ffff:a.b.c.d`.
        let peer = match conn.peer_addr()? {
            SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(v4.into(), a.port()),
                None => SocketAddr::V6(a),
            },
            a => a,
        };
        let stamped = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&peer);
        // Unstamped: the client dialled the listener itself, as a loop would.
        Ok(stamped.unwrap_or(conn.local_addr()?))
    }
}

/// Routes chosen destinations to a listener with a stamp; the rest directly.
#[derive(Debug, Default, Clone)]
pub struct TestDialer {
    routes: Arc<Mutex<HashMap<SocketAddr, (SocketAddr, StampTable)>>>,
}

impl TestDialer {
    /// Connections to `dst` go to `listener`, stamped in `table`.
    pub fn route(&self, dst: SocketAddr, listener: SocketAddr, table: &StampTable) {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(dst, (listener, table.clone()));
    }
}

impl Dialer for TestDialer {
    fn connect(&self, dst: SocketAddr) -> BoxFuture<'_, io::Result<TcpStream>> {
        let route = self
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&dst)
            .cloned();
        Box::pin(async move {
            match route {
                Some((listener, table)) => table.connect(listener, dst).await,
                // A safety net: tests never reach beyond loopback.
                None if !dst.ip().is_loopback() => Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("test dialer: {dst} is not loopback and has no route"),
                )),
                None => {
                    let s = TcpStream::connect(dst).await?;
                    s.set_nodelay(true)?;
                    Ok(s)
                }
            }
        })
    }
}
