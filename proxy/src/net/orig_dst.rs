//! `SO_ORIGINAL_DST`: the one syscall the proxy needs beyond what tokio
//! offers. iptables' `REDIRECT` rewrites a captured connection's destination
//! to the proxy's listener; conntrack remembers where it was going and
//! `getsockopt(SOL_IP, SO_ORIGINAL_DST)` (or `IP6T_SO_ORIGINAL_DST` for
//! IPv6) reads it back. We call it through nix's safe wrapper so the crate
//! keeps `unsafe_code = "forbid"`.
//!
//! The capture listeners are dual-stack (see [`super::bind_listener`]): an
//! IPv4 connection accepted on an `AF_INET6` socket has a v4-mapped local
//! address (`::ffff:a.b.c.d`), and its conntrack entry is an IPv4 one, so it
//! is asked with `SOL_IP` (which the kernel serves for mapped sockets) and
//! answered as a plain IPv4 address.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::TcpStream;

use super::OrigDst;

/// Reads the original destination from conntrack via `SO_ORIGINAL_DST`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SoOriginalDst;

impl OrigDst for SoOriginalDst {
    fn original_dst(&self, conn: &TcpStream) -> io::Result<SocketAddr> {
        let local = conn.local_addr()?;
        let v4 = match local {
            SocketAddr::V4(_) => true,
            SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
        };
        if v4 {
            let sin = getsockopt(conn, sockopt::OriginalDst).map_err(io::Error::from)?;
            Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        } else {
            let sin6 = getsockopt(conn, sockopt::Ip6tOriginalDst).map_err(io::Error::from)?;
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
    }
}
