//! Endpoint choice: pure decisions over the ready endpoints of a Service.
//! The default is power-of-two-choices on requests in flight; round robin,
//! random and consistent hashing (rendezvous) follow the Service's
//! `ServicePolicy`.

use std::hash::{DefaultHasher, Hash, Hasher};

use rand::Rng;
use weft_proxy_config::LoadBalancer;

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
