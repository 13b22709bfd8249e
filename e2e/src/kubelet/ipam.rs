//! Pod addresses of the simulated node, handed out the way the host-local
//! IPAM plugin does: round robin through the node's range, starting after
//! the last address given out and wrapping at the end, so a freed address
//! comes back only once the range has come round. (Handing out the lowest
//! free address would give a deleted pod's IP to the very next pod, while
//! proxies may still list it as the old pod's endpoint.)
//!
//! A test that wants exactly that reuse asks for it: the pod annotation
//! [`POD_IP_ANNOTATION`] names the address the pod must get.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use super::KubeletError;

/// Pod annotation naming the IPv4 address the simulated kubelet must give
/// the pod (harness only; a real kubelet ignores it). The pod fails to
/// start while another pod holds the address.
pub const POD_IP_ANNOTATION: &str = "e2e.weft.dev/pod-ip";

/// First and last host number of the node's /24 (`.1` is the node).
const FIRST: u8 = 2;
const LAST: u8 = 254;

/// The node's pod range: which host numbers are in use, and the last one
/// handed out.
#[derive(Debug)]
pub struct HostIpam {
    prefix: [u8; 3],
    used: BTreeSet<u8>,
    last: u8,
}

impl HostIpam {
    /// The range of `node_ip`'s /24, nothing handed out yet.
    pub fn new(node_ip: Ipv4Addr) -> Self {
        let o = node_ip.octets();
        HostIpam {
            prefix: [o[0], o[1], o[2]],
            used: BTreeSet::new(),
            last: FIRST - 1,
        }
    }

    fn addr(&self, host: u8) -> Ipv4Addr {
        let [a, b, c] = self.prefix;
        Ipv4Addr::new(a, b, c, host)
    }

    /// The next free address after the last one handed out (wrapping), or
    /// `forced` when it is in the range and free.
    pub fn allocate(&mut self, forced: Option<Ipv4Addr>) -> Result<Ipv4Addr, KubeletError> {
        let host = match forced {
            Some(ip) => {
                let o = ip.octets();
                let host = o[3];
                if o[..3] != self.prefix || !(FIRST..=LAST).contains(&host) {
                    return Err(KubeletError::ForcedIp(format!(
                        "{ip} is outside the node's pod range {}.2-{LAST}",
                        self.prefix.map(|b| b.to_string()).join(".")
                    )));
                }
                if self.used.contains(&host) {
                    return Err(KubeletError::ForcedIp(format!(
                        "{ip} is held by another pod"
                    )));
                }
                // A requested address does not move the round.
                host
            }
            None => {
                let host = (self.last + 1..=LAST)
                    .chain(FIRST..=self.last)
                    .find(|h| !self.used.contains(h))
                    .ok_or(KubeletError::NoIp)?;
                self.last = host;
                host
            }
        };
        self.used.insert(host);
        Ok(self.addr(host))
    }

    /// Frees `ip` for a later round.
    pub fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&ip.octets()[3]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipam() -> HostIpam {
        HostIpam::new(Ipv4Addr::new(10, 244, 0, 1))
    }

    #[test]
    fn a_freed_address_is_reused_only_after_the_range_comes_round() {
        let mut i = ipam();
        let a = i.allocate(None).expect("test value");
        let b = i.allocate(None).expect("test value");
        assert_eq!(
            (a, b),
            (
                "10.244.0.2".parse().expect("test value"),
                "10.244.0.3".parse().expect("test value")
            )
        );
        i.release(a);
        // Not .2 again: the next after the last handed out.
        assert_eq!(
            i.allocate(None).expect("test value"),
            Ipv4Addr::new(10, 244, 0, 4)
        );
        // Round the whole range: .2 comes back after .254, .3 and .4 are held.
        for host in 5..=254 {
            assert_eq!(
                i.allocate(None).expect("test value"),
                Ipv4Addr::new(10, 244, 0, host)
            );
        }
        assert_eq!(i.allocate(None).expect("test value"), a);
        assert!(matches!(i.allocate(None), Err(KubeletError::NoIp)));
        i.release(Ipv4Addr::new(10, 244, 0, 100));
        assert_eq!(
            i.allocate(None).expect("test value"),
            Ipv4Addr::new(10, 244, 0, 100)
        );
    }

    #[test]
    fn a_forced_address_is_given_when_free_and_refused_otherwise() {
        let mut i = ipam();
        let a = i.allocate(None).expect("test value");
        assert!(matches!(
            i.allocate(Some(a)),
            Err(KubeletError::ForcedIp(_))
        ));
        for bad in ["10.244.1.9", "10.244.0.1", "10.244.0.255"] {
            assert!(
                matches!(
                    i.allocate(Some(bad.parse().expect("test value"))),
                    Err(KubeletError::ForcedIp(_))
                ),
                "{bad}"
            );
        }
        i.release(a);
        assert_eq!(i.allocate(Some(a)).expect("test value"), a);
        // The round goes on after the forced one.
        assert_eq!(
            i.allocate(None).expect("test value"),
            Ipv4Addr::new(10, 244, 0, 3)
        );
    }
}
