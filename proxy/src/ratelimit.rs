//! Local rate limits on inbound traffic (`ServicePolicy.rateLimit`, rendered
//! into `inbound.rateLimits`): one token bucket per limit in this proxy.
//!
//! A limit applies when its selector matches this pod's labels and the
//! request's target port is in its `ports`. Its bucket holds at most
//! `requests + burst` tokens, starts full, and refills continuously at
//! `requests` tokens per `interval_ms`. Each HTTP request (each connection,
//! for opaque TCP) takes one token from every limit that applies; when one
//! of them is empty, the request is refused (429, `x-weft-error:
//! rate-limited`) and no token is taken from the others.
//!
//! Buckets survive config reloads as long as the limit is unchanged (same
//! name, rate and burst); a changed limit starts with a full bucket. The
//! decision is pure given the time ([`Limiters::check_at`]), so tests pass
//! their own clock.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use weft_proxy_config::{ProxyConfig, RateLimit, selector_matches};

/// The buckets of every limit this proxy enforces.
#[derive(Debug, Default)]
pub struct Limiters {
    inner: Mutex<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    /// The config hash the buckets were last pruned for.
    hash: String,
    buckets: HashMap<Key, Bucket>,
}

/// A limit's identity: a change of any of these is a new bucket.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Key {
    name: String,
    requests: u32,
    interval_ms: u64,
    burst: u32,
}

impl Key {
    fn of(rl: &RateLimit) -> Self {
        Key {
            name: rl.name.clone(),
            requests: rl.requests,
            interval_ms: rl.interval_ms,
            burst: rl.burst,
        }
    }

    fn capacity(&self) -> f64 {
        f64::from(self.requests) + f64::from(self.burst)
    }

    /// Tokens per millisecond.
    fn rate(&self) -> f64 {
        f64::from(self.requests) / self.interval_ms.max(1) as f64
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn refill(&mut self, key: &Key, now: Instant) {
        let elapsed_ms = now.saturating_duration_since(self.last).as_secs_f64() * 1000.0;
        self.tokens = (self.tokens + elapsed_ms * key.rate()).min(key.capacity());
        self.last = now;
    }
}

/// What the limits say about one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Within every limit (or none applies).
    Allow,
    /// Over the named limit; a token is due after `retry_after`.
    Limited {
        /// The limit's name (the `ServicePolicy`).
        name: String,
        /// Until the next token.
        retry_after: Duration,
    },
}

impl Limiters {
    /// Takes a token for a request to `port` from every limit of `config`
    /// that selects this pod (`labels`) and that port.
    pub fn check(
        &self,
        config: &ProxyConfig,
        labels: &BTreeMap<String, String>,
        port: u16,
    ) -> Verdict {
        if config.inbound.rate_limits.is_empty() {
            return Verdict::Allow;
        }
        self.check_at(config, labels, port, Instant::now())
    }

    /// [`Limiters::check`] at a given time.
    pub fn check_at(
        &self,
        config: &ProxyConfig,
        labels: &BTreeMap<String, String>,
        port: u16,
        now: Instant,
    ) -> Verdict {
        let applying: Vec<&RateLimit> = config
            .inbound
            .rate_limits
            .iter()
            .filter(|rl| rl.ports.contains(&port) && selector_matches(&rl.selector, labels))
            .collect();
        let mut b = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if b.hash != config.hash {
            // A new config: forget the buckets of limits that are gone.
            let keep: Vec<Key> = config.inbound.rate_limits.iter().map(Key::of).collect();
            b.buckets.retain(|k, _| keep.contains(k));
            b.hash = config.hash.clone();
        }
        if applying.is_empty() {
            return Verdict::Allow;
        }
        for rl in &applying {
            let key = Key::of(rl);
            let bucket = b.buckets.entry(key.clone()).or_insert_with(|| Bucket {
                tokens: key.capacity(),
                last: now,
            });
            bucket.refill(&key, now);
            if bucket.tokens < 1.0 {
                let wait_ms = (1.0 - bucket.tokens) / key.rate();
                return Verdict::Limited {
                    name: rl.name.clone(),
                    retry_after: Duration::from_secs_f64(wait_ms / 1000.0),
                };
            }
        }
        for rl in &applying {
            if let Some(bucket) = b.buckets.get_mut(&Key::of(rl)) {
                bucket.tokens -= 1.0;
            }
        }
        Verdict::Allow
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proxy_config::{Inbound, MeshSettings, MtlsMode};

    fn limit(name: &str, requests: u32, interval_ms: u64, burst: u32, ports: &[u16]) -> RateLimit {
        RateLimit {
            name: name.into(),
            selector: [("app".to_owned(), "echo".to_owned())].into(),
            ports: ports.to_vec(),
            requests,
            interval_ms,
            burst,
        }
    }

    fn config(limits: Vec<RateLimit>) -> ProxyConfig {
        let mut c = ProxyConfig {
            gateway: None,
            version: 1,
            generation: 1,
            hash: String::new(),
            namespace: "shop".into(),
            mesh: MeshSettings {
                trust_domain: "cluster.local".into(),
                mtls_mode: MtlsMode::Strict,
                default_access: Default::default(),
                access_log: false,
                access_log_options: Default::default(),
                tracing: None,
                escaped_slashes: Default::default(),
                metrics_naming: Default::default(),
            },
            services: vec![],
            inbound: Inbound {
                rate_limits: limits,
                ..Default::default()
            },
        };
        c.seal();
        c
    }

    fn echo() -> BTreeMap<String, String> {
        [("app".to_owned(), "echo".to_owned())].into()
    }

    fn allowed(l: &Limiters, c: &ProxyConfig, port: u16, at: Instant) -> bool {
        l.check_at(c, &echo(), port, at) == Verdict::Allow
    }

    #[test]
    fn bucket_holds_requests_plus_burst_and_refills_at_the_rate() {
        // 10 per second, burst 5: 15 at once, then one per 100 ms.
        let c = config(vec![limit("ten", 10, 1000, 5, &[8080])]);
        let l = Limiters::default();
        let t0 = Instant::now();
        for i in 0..15 {
            assert!(allowed(&l, &c, 8080, t0), "request {i} within burst");
        }
        match l.check_at(&c, &echo(), 8080, t0) {
            Verdict::Limited { name, retry_after } => {
                assert_eq!(name, "ten");
                assert_eq!(retry_after, Duration::from_millis(100));
            }
            v => panic!("16th request must be limited, got {v:?}"),
        }
        assert!(!allowed(&l, &c, 8080, t0 + Duration::from_millis(99)));
        assert!(allowed(&l, &c, 8080, t0 + Duration::from_millis(100)));
        assert!(!allowed(&l, &c, 8080, t0 + Duration::from_millis(150)));
        // A long pause refills only up to the capacity.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..15 {
            assert!(allowed(&l, &c, 8080, later));
        }
        assert!(!allowed(&l, &c, 8080, later));
    }

    #[test]
    fn only_selected_pods_and_listed_ports_are_limited() {
        let c = config(vec![limit("one", 1, 60_000, 0, &[8080])]);
        let l = Limiters::default();
        let t0 = Instant::now();
        assert!(allowed(&l, &c, 8080, t0));
        assert!(!allowed(&l, &c, 8080, t0));
        // Another port, another pod: untouched.
        assert!(allowed(&l, &c, 9090, t0));
        let other: BTreeMap<String, String> = [("app".to_owned(), "cart".to_owned())].into();
        assert_eq!(l.check_at(&c, &other, 8080, t0), Verdict::Allow);
    }

    #[test]
    fn every_applying_limit_must_have_a_token_and_none_is_taken_on_refusal() {
        let c = config(vec![
            limit("wide", 100, 1000, 0, &[8080]),
            limit("narrow", 1, 60_000, 0, &[8080]),
        ]);
        let l = Limiters::default();
        let t0 = Instant::now();
        assert!(allowed(&l, &c, 8080, t0));
        for _ in 0..50 {
            assert!(!allowed(&l, &c, 8080, t0));
        }
        // The refusals took nothing from "wide": 99 tokens are left in it.
        let b = l.inner.lock().expect("lock");
        let wide = b
            .buckets
            .iter()
            .find(|(k, _)| k.name == "wide")
            .expect("wide bucket");
        assert_eq!(wide.1.tokens, 99.0);
    }

    #[test]
    fn buckets_survive_reloads_of_unchanged_limits_and_reset_on_change() {
        let a = config(vec![limit("one", 1, 60_000, 0, &[8080])]);
        let l = Limiters::default();
        let t0 = Instant::now();
        assert!(allowed(&l, &a, 8080, t0));
        // Same limit, another config (another service added): still empty.
        let mut b = a.clone();
        b.generation = 2;
        b.inbound
            .rate_limits
            .push(limit("other", 5, 1000, 0, &[9090]));
        b.seal();
        assert!(!allowed(&l, &b, 8080, t0));
        // The limit changed: a new, full bucket; the old one is forgotten.
        let c = config(vec![limit("one", 2, 60_000, 0, &[8080])]);
        assert!(allowed(&l, &c, 8080, t0));
        assert!(allowed(&l, &c, 8080, t0));
        assert!(!allowed(&l, &c, 8080, t0));
        assert_eq!(l.inner.lock().expect("lock").buckets.len(), 1);
    }
}
