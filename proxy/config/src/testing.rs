//! A complete, valid sample config for tests, touching every field.

use std::collections::BTreeMap;

use crate::model::*;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn backend(service: &str, subset: Option<&str>, weight: u32) -> Backend {
    Backend {
        service: service.to_owned(),
        subset: subset.map(str::to_owned),
        port: None,
        weight,
    }
}

/// A sealed config for namespace `demo` with a frontend, a two-version
/// backend with routes and policies, a TCP database, and inbound rules.
pub fn sample() -> ProxyConfig {
    let mut cfg = ProxyConfig {
        gateway: None,
        version: crate::FORMAT_VERSION,
        generation: 7,
        hash: String::new(),
        namespace: "demo".to_owned(),
        mesh: MeshSettings {
            trust_domain: "cluster.local".to_owned(),
            mtls_mode: MtlsMode::Strict,
            default_access: AccessAction::Allow,
            access_log: true,
            access_log_options: Default::default(),
            tracing: Some(Tracing {
                otlp_endpoint: "http://collector.observability:4318".to_owned(),
                sampling_percent: 1.0,
            }),
            escaped_slashes: EscapedSlashes::Keep,
            metrics_naming: Default::default(),
        },
        services: vec![
            Service {
                name: "backend".to_owned(),
                namespace: "demo".to_owned(),
                cluster_ips: vec!["10.96.0.20".parse().expect("ip")],
                ports: vec![ServicePort {
                    port: 8080,
                    name: Some("http".to_owned()),
                    target_port: 8080,
                    protocol: Protocol::Http1,
                }],
                subsets: vec!["v1".to_owned(), "v2".to_owned()],
                endpoints: vec![
                    Endpoint {
                        address: "10.244.0.11".parse().expect("ip"),
                        meshed: true,
                        identity: Some("spiffe://cluster.local/ns/demo/sa/backend".to_owned()),
                        pod: None,
                        subsets: vec!["v1".to_owned()],
                        ports: BTreeMap::new(),
                        terminating: false,
                        workload: None,
                        app: None,
                        version: None,
                    },
                    Endpoint {
                        address: "10.244.0.12".parse().expect("ip"),
                        meshed: true,
                        identity: Some("spiffe://cluster.local/ns/demo/sa/backend".to_owned()),
                        pod: None,
                        subsets: vec!["v2".to_owned()],
                        ports: BTreeMap::from([("http".to_owned(), 9090)]),
                        terminating: false,
                        workload: None,
                        app: None,
                        version: None,
                    },
                ],
                http_routes: vec![
                    HttpRoute {
                        name: "backend/hidden-release".to_owned(),
                        matches: vec![HttpMatch {
                            headers: vec![NamedMatch {
                                name: "x-weft-release".to_owned(),
                                value: ValueMatch::Exact("canary".to_owned()),
                            }],
                            ..HttpMatch::default()
                        }],
                        backends: vec![backend("demo/backend", Some("v2"), 1)],
                        ..HttpRoute::default()
                    },
                    HttpRoute {
                        name: "backend/api".to_owned(),
                        port: Some(8080),
                        matches: vec![HttpMatch {
                            path: Some(PathMatch::Regex("/api/v[0-9]+/.*".to_owned())),
                            query_params: vec![NamedMatch {
                                name: "debug".to_owned(),
                                value: ValueMatch::Present(false),
                            }],
                            method: Some("GET".to_owned()),
                            ..HttpMatch::default()
                        }],
                        backends: vec![
                            backend("demo/backend", Some("v1"), 90),
                            backend("demo/backend", Some("v2"), 10),
                        ],
                        timeout_ms: Some(2000),
                        retry: Some(RetryPolicy {
                            attempts: 3,
                            per_try_timeout_ms: Some(500),
                            retry_on: vec![RetryOn::ServerError, RetryOn::ConnectFailure],
                            retriable_status_codes: vec![409],
                            backoff_base_ms: 25,
                            backoff_max_ms: 250,
                        }),
                        fault: Some(Fault {
                            delay: Some(FaultDelay {
                                delay_ms: 100,
                                percent: 20.0,
                            }),
                            abort: Some(FaultAbort {
                                status: 503,
                                percent: 10.0,
                            }),
                        }),
                        mirror: Some(Mirror {
                            backend: backend("demo/backend", Some("v2"), 1),
                            percent: 5.0,
                        }),
                        request_headers: HeaderOps {
                            set: vec![("x-route".to_owned(), "api".to_owned())],
                            add: vec![("x-added".to_owned(), "1".to_owned())],
                            remove: vec!["x-internal".to_owned()],
                        },
                        response_headers: HeaderOps {
                            remove: vec!["server".to_owned()],
                            ..HeaderOps::default()
                        },
                        rewrite: Some(Rewrite {
                            path_prefix: Some("/v2".to_owned()),
                            authority: Some("backend.internal".to_owned()),
                            path: None,
                        }),
                        redirect: None,
                        unresolved_weight: 0,
                    },
                    HttpRoute {
                        name: "backend/moved".to_owned(),
                        matches: vec![HttpMatch {
                            path: Some(PathMatch::Prefix("/old".to_owned())),
                            ..HttpMatch::default()
                        }],
                        redirect: Some(Redirect {
                            scheme: Some("https".to_owned()),
                            host: None,
                            port: None,
                            path: Some("/new".to_owned()),
                            path_prefix: None,
                            status: 301,
                        }),
                        ..HttpRoute::default()
                    },
                ],
                tcp_routes: Vec::new(),
                policy: ClientPolicy {
                    load_balancer: LoadBalancer::ConsistentHash(HashKey::Header(
                        "x-user".to_owned(),
                    )),
                    connection_pool: Some(ConnectionPool {
                        max_connections: Some(100),
                        max_pending_requests: Some(50),
                        max_requests: Some(200),
                        max_requests_per_connection: None,
                        connect_timeout_ms: 1000,
                        idle_timeout_ms: 90_000,
                    }),
                    outlier_detection: Some(OutlierDetection {
                        consecutive_5xx: Some(5),
                        consecutive_gateway_errors: None,
                        interval_ms: 10_000,
                        base_ejection_ms: 30_000,
                        max_ejection_percent: 50,
                    }),
                    retry_budget: Some(RetryBudget {
                        retry_percent: 20.0,
                        min_retries_per_second: 10,
                        ttl_ms: 10_000,
                    }),
                },
            },
            Service {
                name: "db".to_owned(),
                namespace: "demo".to_owned(),
                cluster_ips: vec!["10.96.0.30".parse().expect("ip")],
                ports: vec![ServicePort {
                    port: 5432,
                    name: None,
                    target_port: 5432,
                    protocol: Protocol::Opaque,
                }],
                subsets: Vec::new(),
                endpoints: vec![Endpoint {
                    address: "10.244.0.31".parse().expect("ip"),
                    meshed: false,
                    identity: None,
                    pod: None,
                    subsets: Vec::new(),
                    ports: BTreeMap::new(),
                    terminating: false,
                    workload: None,
                    app: None,
                    version: None,
                }],
                http_routes: Vec::new(),
                tcp_routes: vec![TcpRoute {
                    name: "db/primary".to_owned(),
                    port: Some(5432),
                    backends: vec![backend("demo/db", None, 1)],
                }],
                policy: ClientPolicy::default(),
            },
            Service {
                name: "frontend".to_owned(),
                namespace: "demo".to_owned(),
                cluster_ips: vec!["10.96.0.10".parse().expect("ip")],
                ports: vec![ServicePort {
                    port: 80,
                    name: Some("http".to_owned()),
                    target_port: 8080,
                    protocol: Protocol::Detect,
                }],
                subsets: Vec::new(),
                endpoints: Vec::new(),
                http_routes: Vec::new(),
                tcp_routes: Vec::new(),
                policy: ClientPolicy {
                    load_balancer: LoadBalancer::RoundRobin,
                    ..ClientPolicy::default()
                },
            },
        ]
        .into_iter()
        .map(std::sync::Arc::new)
        .collect(),
        inbound: Inbound {
            policies: vec![
                AccessPolicy {
                    name: "backend-allow-frontend".to_owned(),
                    selector: labels(&[("app", "backend")]),
                    ports: vec![8080],
                    action: AccessAction::Allow,
                    audit: false,
                    rules: vec![AccessRule {
                        from: vec![AccessSource {
                            identities: vec![
                                "spiffe://cluster.local/ns/demo/sa/frontend".to_owned(),
                            ],
                            ..AccessSource::default()
                        }],
                        to: vec![AccessDestination {
                            ports: Vec::new(),
                            methods: vec!["GET".to_owned()],
                            paths: vec!["/api/*".to_owned()],
                        }],
                    }],
                },
                AccessPolicy {
                    name: "deny-untrusted".to_owned(),
                    selector: BTreeMap::new(),
                    ports: Vec::new(),
                    action: AccessAction::Deny,
                    audit: false,
                    rules: vec![AccessRule {
                        from: vec![AccessSource {
                            namespaces: vec!["untrusted".to_owned()],
                            ..AccessSource::default()
                        }],
                        to: Vec::new(),
                    }],
                },
            ],
            rate_limits: vec![RateLimit {
                name: "backend".to_owned(),
                selector: labels(&[("app", "backend")]),
                ports: vec![8080],
                requests: 500,
                interval_ms: 1000,
                burst: 100,
            }],
            ports: vec![InboundPort {
                selector: labels(&[("app", "backend")]),
                port: 8080,
                protocol: Protocol::Http1,
            }],
            mtls: vec![MtlsOverride {
                name: "legacy-metrics".to_owned(),
                selector: labels(&[("app", "backend")]),
                mode: None,
                ports: vec![PortMtls {
                    port: 9090,
                    mode: MtlsMode::Permissive,
                }],
            }],
        },
    };
    cfg.seal();
    cfg
}
