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
use std::net::SocketAddr;

use rand::Rng;
use tokio::time::Instant;
use weft_proxy_config::LoadBalancer;

use super::outliers::Outliers;
use crate::http::pool::Pools;
use crate::snapshot::dest::Dest;
use crate::snapshot::services::endpoint_port;

/// Endpoint attempt order for one request or connection to `dest`: the
/// balancer's pick among the endpoints not ejected (among all of them when
/// every one is ejected), then the other non-ejected ones, then the ejected
/// ones. Indices into `dest.endpoints`.
pub fn attempt_order(
    outliers: &Outliers,
    pools: &Pools,
    rr: impl FnOnce() -> usize,
    dest: &Dest<'_>,
    key: Option<&str>,
) -> Vec<usize> {
    let eps = &dest.endpoints;
    let addr = |i: usize| SocketAddr::new(eps[i].address, endpoint_port(eps[i], dest.port));
    let now = Instant::now();
    let (mut healthy, ejected): (Vec<usize>, Vec<usize>) =
        (0..eps.len()).partition(|i| !outliers.is_ejected(addr(*i), now));
    if healthy.is_empty() {
        healthy = ejected;
        return order_from(pools, rr, dest, healthy, key, &addr);
    }
    let mut order = order_from(pools, rr, dest, healthy, key, &addr);
    order.extend(ejected);
    order
}

fn order_from(
    pools: &Pools,
    rr: impl FnOnce() -> usize,
    dest: &Dest<'_>,
    set: Vec<usize>,
    key: Option<&str>,
    addr: &impl Fn(usize) -> SocketAddr,
) -> Vec<usize> {
    let n = set.len();
    if n == 0 {
        return set;
    }
    let lb: &LoadBalancer = &dest.service.policy.load_balancer;
    let first = pick(
        lb,
        n,
        |i| pools.load_of(addr(set[i])),
        rr(),
        key,
        |i| addr(set[i]).to_string(),
        &mut rand::rng(),
    );
    (0..n).map(|k| set[(first + k) % n]).collect()
}

/// Most endpoints tried for one request or connection.
pub const MAX_ATTEMPTS: usize = 3;

/// Picks an index in `0..n` (`n > 0`). `load(i)` is endpoint `i`'s requests
/// in flight, `rr` a per-Service counter, `key` the consistent-hash key and
/// `ids(i)` a stable name of endpoint `i`.
pub fn pick<R: Rng>(
    lb: &LoadBalancer,
    n: usize,
    load: impl Fn(usize) -> usize,
    rr: usize,
    key: Option<&str>,
    ids: impl Fn(usize) -> String,
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
                    let mut h = DefaultHasher::new();
                    (k, ids(*i)).hash(&mut h);
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
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use weft_proxy_config::HashKey;

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
                |i| i.to_string(),
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
                |i| i.to_string(),
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
                    |i| i.to_string(),
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
            |i| format!("10.0.0.{i}"),
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
                    |i| format!("10.0.0.{i}"),
                    &mut rng
                ),
                first
            );
        }
    }
}
