//! Endpoint choice: the order in which a request or connection tries the
//! endpoints of its destination ([`attempt_order`]): the balancer's pick
//! among endpoints not ejected ([`super::outliers`]), then the others.
//! The default balancer is power-of-two-choices on requests in flight;
//! round robin, random and consistent hashing (rendezvous) follow the
//! Service's `ServicePolicy` ([`pick`], pure).
//!
//! In: a resolved destination, the pools' loads, the outliers. Out:
//! indices into the destination's endpoints, tried in order by
//! `outbound::http` and `outbound::tcp`, at most [`MAX_ATTEMPTS`].

use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::{IpAddr, SocketAddr};

use rand::Rng;
use smallvec::SmallVec;
use tokio::time::Instant;
use weft_proxy_config::LoadBalancer;

use super::outliers::Outliers;
use crate::http::pool::Pools;
use crate::snapshot::dest::Dest;
use crate::snapshot::services::endpoint_port;

/// Indices into a destination's endpoints in the order to try them: at
/// most [`MAX_ATTEMPTS`], held inline (no allocation per request).
pub type Attempts = SmallVec<[usize; MAX_ATTEMPTS]>;

/// Most endpoints tried for one request or connection.
pub const MAX_ATTEMPTS: usize = 3;

/// Endpoint attempt order for one request or connection to `dest`: the
/// balancer's pick among the endpoints not ejected (among all of them when
/// every one is ejected), then the other non-ejected ones, then the ejected
/// ones; the first [`MAX_ATTEMPTS`] of that order.
pub fn attempt_order(
    outliers: &Outliers,
    pools: &Pools,
    rr: impl FnOnce() -> usize,
    dest: &Dest<'_>,
    key: Option<&str>,
) -> Attempts {
    let eps = &dest.endpoints;
    let addr = |i: usize| {
        let ep = eps.get(i);
        SocketAddr::new(ep.address, endpoint_port(ep, dest.port))
    };
    let now = Instant::now();
    // Inline up to 16 endpoints; a larger Service spills to the heap.
    let mut healthy: SmallVec<[usize; 16]> = SmallVec::new();
    let mut ejected = Attempts::new();
    for i in 0..eps.len() {
        if !outliers.is_ejected(addr(i), now) {
            healthy.push(i);
        } else if ejected.len() < MAX_ATTEMPTS {
            ejected.push(i);
        }
    }
    if healthy.is_empty() {
        return order_from(pools, rr, dest, eps.len(), |i| i, key, &addr);
    }
    let mut order = order_from(pools, rr, dest, healthy.len(), |i| healthy[i], key, &addr);
    let room = MAX_ATTEMPTS - order.len();
    order.extend(ejected.into_iter().take(room));
    order
}

/// The first [`MAX_ATTEMPTS`] of `n` endpoints (the `k`-th is endpoint
/// `at(k)`), starting at the balancer's pick and going round.
fn order_from(
    pools: &Pools,
    rr: impl FnOnce() -> usize,
    dest: &Dest<'_>,
    n: usize,
    at: impl Fn(usize) -> usize,
    key: Option<&str>,
    addr: &impl Fn(usize) -> SocketAddr,
) -> Attempts {
    if n == 0 {
        return Attempts::new();
    }
    let lb: &LoadBalancer = &dest.service.policy.load_balancer;
    let first = pick(
        lb,
        n,
        |i| pools.load_of(addr(at(i))),
        rr(),
        key,
        |i| addr(at(i)),
        &mut rand::rng(),
    );
    (0..n.min(MAX_ATTEMPTS))
        .map(|k| at((first + k) % n))
        .collect()
}

/// Picks an index in `0..n` (`n > 0`). `load(i)` is endpoint `i`'s requests
/// in flight, `rr` a per-Service counter, `key` the consistent-hash key and
/// `ids(i)` endpoint `i`'s address, which names it stably.
pub fn pick<R: Rng>(
    lb: &LoadBalancer,
    n: usize,
    load: impl Fn(usize) -> usize,
    rr: usize,
    key: Option<&str>,
    ids: impl Fn(usize) -> SocketAddr,
    rng: &mut R,
) -> usize {
    if n <= 1 {
        return 0;
    }
    match lb {
        LoadBalancer::RoundRobin => rr % n,
        LoadBalancer::Random => rng.random_range(0..n),
        LoadBalancer::ConsistentHash(_) => match key {
            Some(k) => (0..n)
                .max_by_key(|i| {
                    // The address as bytes: the same on every proxy and
                    // release, and no string built per endpoint.
                    let a = ids(*i);
                    let mut h = DefaultHasher::new();
                    k.hash(&mut h);
                    match a.ip() {
                        IpAddr::V4(ip) => h.write(&ip.octets()),
                        IpAddr::V6(ip) => h.write(&ip.octets()),
                    }
                    h.write_u16(a.port());
                    h.finish()
                })
                .unwrap_or(0),
            None => rng.random_range(0..n),
        },
        LoadBalancer::LeastRequest => {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            if load(b) < load(a) { b } else { a }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::ServiceRef;
    use crate::snapshot::dest::resolve;
    use crate::snapshot::routes::RouteTable;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use weft_proxy_config::{HashKey, ProxyConfig};

    /// The sample config with the backend Service's endpoints replaced by
    /// `n` meshed ones at 10.244.1.1…, balanced round robin.
    fn backend_of(n: u8) -> ProxyConfig {
        let mut c = weft_proxy_config::testing::sample();
        let svc = std::sync::Arc::make_mut(
            c.services
                .iter_mut()
                .find(|s| s.name == "backend")
                .expect("backend"),
        );
        let first = svc.endpoints[0].clone();
        svc.endpoints = (1..=n)
            .map(|i| {
                let mut e = first.clone();
                e.address = IpAddr::from([10, 244, 1, i]);
                e.pod = Some(format!("backend-{i}"));
                e.terminating = false;
                e
            })
            .collect();
        svc.policy.load_balancer = LoadBalancer::RoundRobin;
        c
    }

    fn order(c: &ProxyConfig, outliers: &Outliers) -> Vec<String> {
        let table = RouteTable::build(c).expect("routes");
        let service = c
            .services
            .iter()
            .position(|s| s.name == "backend")
            .expect("backend");
        let target = ServiceRef {
            service,
            port: 0,
            endpoint: None,
        };
        let dst = SocketAddr::from(([10, 96, 0, 20], 8080));
        let dest = resolve(c, &table, target, None, dst).expect("resolves");
        attempt_order(outliers, &Pools::default(), || 0, &dest, None)
            .iter()
            .map(|i| {
                assert!(dest.endpoints.identity(*i).is_some());
                dest.endpoints.get(*i).address.to_string()
            })
            .collect()
    }

    #[test]
    fn an_attempt_order_is_the_pick_then_the_healthy_then_the_ejected_at_most_three() {
        let c = backend_of(5);
        let outliers = Outliers::default();
        assert_eq!(
            order(&c, &outliers),
            ["10.244.1.1", "10.244.1.2", "10.244.1.3"]
        );
        let now = Instant::now();
        for i in [1, 2, 4] {
            outliers.eject(SocketAddr::from(([10, 244, 1, i], 8080)), now);
        }
        assert_eq!(
            order(&c, &outliers),
            ["10.244.1.3", "10.244.1.5", "10.244.1.1"]
        );
        outliers.eject(SocketAddr::from(([10, 244, 1, 3], 8080)), now);
        outliers.eject(SocketAddr::from(([10, 244, 1, 5], 8080)), now);
        // Every endpoint ejected: balanced over all of them again.
        assert_eq!(
            order(&c, &outliers),
            ["10.244.1.1", "10.244.1.2", "10.244.1.3"]
        );
        assert_eq!(order(&backend_of(2), &Outliers::default()).len(), 2);
    }

    #[test]
    fn least_request_never_picks_the_busiest_of_two() {
        let mut rng = StdRng::seed_from_u64(7);
        let loads = [100, 0];
        for _ in 0..200 {
            let i = pick(
                &LoadBalancer::LeastRequest,
                2,
                |i| loads[i],
                0,
                None,
                |i| SocketAddr::from(([10, 0, 0, i as u8], 80)),
                &mut rng,
            );
            assert_eq!(i, 1);
        }
    }

    #[test]
    fn least_request_spreads_equal_load() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut seen = [0; 3];
        for _ in 0..300 {
            seen[pick(
                &LoadBalancer::LeastRequest,
                3,
                |_| 0,
                0,
                None,
                |i| SocketAddr::from(([10, 0, 0, i as u8], 80)),
                &mut rng,
            )] += 1;
        }
        assert!(seen.iter().all(|c| *c > 0), "{seen:?}");
    }

    #[test]
    fn round_robin_cycles() {
        let mut rng = StdRng::seed_from_u64(1);
        let got: Vec<_> = (0..6)
            .map(|rr| {
                pick(
                    &LoadBalancer::RoundRobin,
                    3,
                    |_| 0,
                    rr,
                    None,
                    |i| SocketAddr::from(([10, 0, 0, i as u8], 80)),
                    &mut rng,
                )
            })
            .collect();
        assert_eq!(got, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn consistent_hash_is_stable_per_key() {
        let lb = LoadBalancer::ConsistentHash(HashKey::Header("x-user".into()));
        let mut rng = StdRng::seed_from_u64(1);
        let first = pick(
            &lb,
            5,
            |_| 0,
            0,
            Some("alice"),
            |i| SocketAddr::from(([10, 0, 0, i as u8], 80)),
            &mut rng,
        );
        for _ in 0..20 {
            assert_eq!(
                pick(
                    &lb,
                    5,
                    |_| 0,
                    0,
                    Some("alice"),
                    |i| SocketAddr::from(([10, 0, 0, i as u8], 80)),
                    &mut rng
                ),
                first
            );
        }
    }
}
