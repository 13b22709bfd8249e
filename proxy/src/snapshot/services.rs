//! Which destination a connection was addressed to: the Service port
//! behind a ClusterIP:port, or the endpoint whose pod IP:port it is,
//! indexed once per snapshot.
//!
//! In: the config's Services. Out: [`ServiceRef`]s, the handle every layer
//! above uses for "this port of this Service" (routes, client policy,
//! listeners).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use weft_proxy_config::{Endpoint, ProxyConfig, Service, ServicePort};

/// Where a Service port is found in the config.
#[derive(Clone, Copy, Debug)]
pub struct ServiceRef {
    /// Index into `config.services`.
    pub service: usize,
    /// Index into that service's `ports`.
    pub port: usize,
    /// Set when the destination was one endpoint's own address (a pod IP,
    /// as headless Services and StatefulSet peers use): the index into that
    /// service's `endpoints`. Such traffic goes to that endpoint only,
    /// without routes, with mTLS when it is meshed.
    pub endpoint: Option<usize>,
}

/// Destination address → Service port, built once per snapshot.
#[derive(Debug, Default)]
pub struct Destinations {
    /// ClusterIP:port → Service port.
    by_addr: ByAddr,
    /// Endpoint IP:port → that endpoint of a Service port.
    by_endpoint: ByAddr,
    /// Addresses listed more than once (by two Services, or two ports of
    /// one): which listing wins depends on the others, so a change that
    /// touches one is not patched but indexed again from nothing.
    contested: HashSet<(IpAddr, u16), foldhash::fast::RandomState>,
}

/// Keyed by address and port, hashed with foldhash (seeded per map: the keys
/// come from the config). Entries are 32 bytes rather than 64: a mesh-wide
/// view indexes 100,000s of endpoints on each reload, and the time goes to
/// the memory they touch.
type ByAddr = HashMap<(IpAddr, u16), Slot, foldhash::fast::RandomState>;

/// A [`ServiceRef`] as the index stores it.
#[derive(Clone, Copy, Debug)]
struct Slot {
    service: u32,
    port: u32,
    /// `u32::MAX`: none.
    endpoint: u32,
}

impl Slot {
    fn of(service: usize, port: usize, endpoint: Option<usize>) -> Self {
        Slot {
            service: narrow(service),
            port: narrow(port),
            endpoint: endpoint.map_or(u32::MAX, narrow),
        }
    }

    fn get(self) -> ServiceRef {
        ServiceRef {
            service: self.service as usize,
            port: self.port as usize,
            endpoint: (self.endpoint != u32::MAX).then_some(self.endpoint as usize),
        }
    }
}

impl Destinations {
    /// Indexes every ClusterIP:port and endpoint IP:port of `config`.
    pub fn build(config: &ProxyConfig) -> Self {
        let (mut addrs, mut endpoints) = (0, 0);
        for svc in &config.services {
            addrs += svc.ports.len() * svc.cluster_ips.len();
            endpoints += svc.ports.len() * svc.endpoints.len();
        }
        let mut d = Destinations {
            by_addr: ByAddr::with_capacity_and_hasher(addrs, Default::default()),
            by_endpoint: ByAddr::with_capacity_and_hasher(endpoints, Default::default()),
            contested: Default::default(),
        };
        for (si, svc) in config.services.iter().enumerate() {
            for (pi, port) in svc.ports.iter().enumerate() {
                for ip in &svc.cluster_ips {
                    let key = (*ip, port.port);
                    if d.by_addr.insert(key, Slot::of(si, pi, None)).is_some() {
                        d.contested.insert(key);
                    }
                }
                for (ei, ep) in svc.endpoints.iter().enumerate() {
                    // A pod behind several Services keeps the first one
                    // listing it (the config's order is deterministic).
                    let key = (ep.address, endpoint_port(ep, port));
                    match d.by_endpoint.entry(key) {
                        Entry::Vacant(v) => {
                            v.insert(Slot::of(si, pi, Some(ei)));
                        }
                        Entry::Occupied(_) => {
                            d.contested.insert(key);
                        }
                    }
                }
            }
        }
        d
    }

    /// [`Destinations::build`] for `config`, patched from `prev`, the index
    /// of `prev_config`: what the Services not taken unchanged listed goes,
    /// the kept ones move to their new index, and what the new and changed
    /// ones list is added (`reused[i]`: the previous index of Service `i`
    /// when it was taken unchanged). A reload that moves a pod or adds a
    /// Service touches a few entries of 100,000s. Kept Services in another
    /// order than before, or a change to an address listed more than once,
    /// index everything again.
    pub fn build_after(
        config: &ProxyConfig,
        prev: Option<(&Destinations, &ProxyConfig)>,
        reused: &[Option<usize>],
    ) -> Self {
        let Some((prev, prev_config)) = prev else {
            return Self::build(config);
        };
        let Some(to_new) = kept_in_order(prev_config.services.len(), reused) else {
            return Self::build(config);
        };
        let mut d = Destinations {
            by_addr: prev.by_addr.clone(),
            by_endpoint: prev.by_endpoint.clone(),
            contested: prev.contested.clone(),
        };
        for (old, svc) in prev_config.services.iter().enumerate() {
            if to_new[old].is_none() && !d.remove(old, svc) {
                return Self::build(config);
            }
        }
        if to_new
            .iter()
            .enumerate()
            .any(|(old, new)| *new != Some(old))
        {
            for slot in d.by_addr.values_mut().chain(d.by_endpoint.values_mut()) {
                match to_new.get(slot.service as usize).copied().flatten() {
                    Some(new) => slot.service = narrow(new),
                    None => return Self::build(config),
                }
            }
        }
        for (si, svc) in config.services.iter().enumerate() {
            if reused.get(si).copied().flatten().is_none() && !d.insert(si, svc) {
                return Self::build(config);
            }
        }
        d
    }

    /// Removes what Service `si` (as `svc`) listed; false when an entry is
    /// not its own alone.
    fn remove(&mut self, si: usize, svc: &Service) -> bool {
        let owned = |slot: Option<&Slot>| slot.is_some_and(|s| s.service as usize == si);
        for port in &svc.ports {
            for ip in &svc.cluster_ips {
                let key = (*ip, port.port);
                if self.contested.contains(&key) || !owned(self.by_addr.get(&key)) {
                    return false;
                }
                self.by_addr.remove(&key);
            }
            for ep in &svc.endpoints {
                let key = (ep.address, endpoint_port(ep, port));
                if self.contested.contains(&key) || !owned(self.by_endpoint.get(&key)) {
                    return false;
                }
                self.by_endpoint.remove(&key);
            }
        }
        true
    }

    /// Adds what Service `si` (as `svc`) lists; false when an address is
    /// listed already.
    fn insert(&mut self, si: usize, svc: &Service) -> bool {
        for (pi, port) in svc.ports.iter().enumerate() {
            for ip in &svc.cluster_ips {
                match self.by_addr.entry((*ip, port.port)) {
                    Entry::Vacant(v) => {
                        v.insert(Slot::of(si, pi, None));
                    }
                    Entry::Occupied(_) => return false,
                }
            }
            for (ei, ep) in svc.endpoints.iter().enumerate() {
                match self
                    .by_endpoint
                    .entry((ep.address, endpoint_port(ep, port)))
                {
                    Entry::Vacant(v) => {
                        v.insert(Slot::of(si, pi, Some(ei)));
                    }
                    Entry::Occupied(_) => return false,
                }
            }
        }
        true
    }

    /// The Service port behind a ClusterIP:port, else the endpoint whose
    /// pod IP:port it is.
    pub fn lookup(&self, dst: SocketAddr) -> Option<ServiceRef> {
        let key = (dst.ip(), dst.port());
        self.by_addr
            .get(&key)
            .or_else(|| self.by_endpoint.get(&key))
            .map(|s| s.get())
    }
}

/// An index as a [`Slot`] stores it: a document has far fewer than 2³²
/// Services, ports or endpoints.
fn narrow(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX - 1)
}

/// For each Service of the previous snapshot, its index in this one when it
/// was taken unchanged; none when the kept Services are not in the order
/// they had (which listing of a shared address comes first could change).
fn kept_in_order(previous: usize, reused: &[Option<usize>]) -> Option<Vec<Option<usize>>> {
    let mut to_new = vec![None; previous];
    let mut last = None;
    for (new, old) in reused.iter().enumerate() {
        let Some(old) = *old else { continue };
        if old >= previous || last.is_some_and(|l| old <= l) {
            return None;
        }
        last = Some(old);
        to_new[old] = Some(new);
    }
    Some(to_new)
}

/// The port to dial on an endpoint for a Service port.
pub fn endpoint_port(ep: &Endpoint, port: &ServicePort) -> u16 {
    port.name
        .as_ref()
        .and_then(|n| ep.ports.get(n).copied())
        .unwrap_or(port.target_port)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// An entry as a lookup sees it: which index, key, Service, port and
    /// endpoint.
    type Entry = (bool, (IpAddr, u16), (usize, usize, Option<usize>));

    /// Every entry of both indexes.
    fn entries(d: &Destinations) -> Vec<Entry> {
        let mut v: Vec<_> = [(true, &d.by_addr), (false, &d.by_endpoint)]
            .into_iter()
            .flat_map(|(cluster, m)| {
                m.iter().map(move |(k, s)| {
                    let r = s.get();
                    (cluster, *k, (r.service, r.port, r.endpoint))
                })
            })
            .collect();
        v.sort();
        v
    }

    /// A reload patches the index of the Services it changed, added or
    /// removed; the result is the index built from nothing, also when an
    /// address is listed by two Services or moves between them, and when
    /// the kept Services change their order.
    #[test]
    fn a_patched_index_is_the_index_built_from_nothing() {
        fn ip(s: &str) -> IpAddr {
            s.parse().expect("ip")
        }
        fn at(c: &mut ProxyConfig, i: usize) -> &mut Service {
            Arc::make_mut(&mut c.services[i])
        }
        fn cache() -> Service {
            let mut s = (*weft_proxy_config::testing::sample().services[1]).clone();
            s.name = "cache".into();
            s.tcp_routes.clear();
            s.cluster_ips = vec![ip("10.96.0.55")];
            s.endpoints[0].address = ip("10.244.5.5");
            s
        }
        let steps: [fn(&mut ProxyConfig); 12] = [
            // A pod of db moves.
            |c| at(c, 1).endpoints[0].address = ip("10.244.7.7"),
            // frontend lists backend's first pod on the same port: an
            // address listed twice, which backend (listed first) keeps.
            |c| {
                let e = c.services[0].endpoints[0].clone();
                at(c, 2).endpoints.push(e);
            },
            // backend's pod moves away: the address is frontend's now.
            |c| at(c, 0).endpoints[0].address = ip("10.244.0.99"),
            // frontend gets another ClusterIP.
            |c| at(c, 2).cluster_ips = vec![ip("10.96.0.77")],
            // backend gets another port.
            |c| {
                let mut p = c.services[0].ports[0].clone();
                p.port = 9090;
                p.name = Some("admin".into());
                at(c, 0).ports.push(p);
            },
            // A Service is added before db and frontend: their indices move.
            |c| c.services.insert(1, Arc::new(cache())),
            // ... and db's pod moves, with the new indices.
            |c| at(c, 2).endpoints[0].address = ip("10.244.8.8"),
            // An added Service lists db's pod on db's port: listed twice,
            // and the added one comes first.
            |c| {
                let mut s = cache();
                s.name = "archive".into();
                s.cluster_ips = vec![ip("10.96.0.56")];
                s.endpoints = c.services[2].endpoints.clone();
                c.services.insert(1, Arc::new(s));
            },
            // Both added Services go again.
            |c| {
                c.services
                    .retain(|s| s.name != "cache" && s.name != "archive")
            },
            // frontend lists db's pod on db's port: db, listed first, keeps it.
            |c| {
                let mut e = c.services[1].endpoints[0].clone();
                e.ports = [("http".to_owned(), 5432)].into();
                at(c, 2).endpoints.push(e);
            },
            // The kept Services in another order: frontend comes first now.
            |c| c.services.swap(1, 2),
            // db's pod goes away.
            |c| at(c, 2).endpoints.clear(),
        ];
        let mut prev = weft_proxy_config::testing::sample();
        let mut index = Destinations::build(&prev);
        for (n, edit) in steps.into_iter().enumerate() {
            let mut next = prev.clone();
            edit(&mut next);
            let reused: Vec<Option<usize>> = next
                .services
                .iter()
                .map(|s| prev.services.iter().position(|p| Arc::ptr_eq(s, p)))
                .collect();
            let patched = Destinations::build_after(&next, Some((&index, &prev)), &reused);
            assert_eq!(
                entries(&patched),
                entries(&Destinations::build(&next)),
                "step {n}"
            );
            (prev, index) = (next, patched);
        }
    }
}
