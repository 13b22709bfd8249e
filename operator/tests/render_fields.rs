//! Every field the renderer writes, from every kind it reads.

mod render_support;

use std::collections::BTreeMap;

use pretty_assertions::assert_eq;
use render_support::*;
use serde_json::json;
use weft_proxy_config as pc;

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().expect("test IP")
}

#[test]
fn service_cluster_ips_ports_and_target_ports() {
    let idx = index(vec![
        ns("shop", true),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "shop", "name": "api"},
            "spec": {
                "clusterIP": "10.96.0.5", "clusterIPs": ["fd00::5", "10.96.0.5"],
                "selector": {"app": "api"},
                "ports": [
                    {"name": "metrics", "port": 9090, "targetPort": 9091},
                    {"name": "http", "port": 80, "targetPort": "web"},
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "admin", "port": 81, "targetPort": "admin"}
                ]
            }
        }),
        slice(
            "shop",
            "api-a",
            "api",
            json!([{"name": "http", "port": 8080}, {"name": "metrics", "port": 9091}]),
            json!([ep("10.0.0.1", "api-1")]),
        ),
        slice(
            "shop",
            "api-b",
            "api",
            json!([{"name": "http", "port": 8081}, {"name": "metrics", "port": 9091}]),
            json!([ep("10.0.0.2", "api-2")]),
        ),
    ]);
    let out = rendered(&idx, "shop");
    let s = service(&out.config, "shop/api");
    assert_eq!(s.cluster_ips, vec![ip("10.96.0.5"), ip("fd00::5")]);
    let ports: Vec<(u16, Option<&str>, u16)> = s
        .ports
        .iter()
        .map(|p| (p.port, p.name.as_deref(), p.target_port))
        .collect();
    // Sorted by port; UDP dropped; a named target port without slices falls
    // back to the port itself; the first slice by name sets the target port.
    assert_eq!(
        ports,
        vec![
            (80, Some("http"), 8080),
            (81, Some("admin"), 81),
            (9090, Some("metrics"), 9091)
        ]
    );
    // The endpoint of the slice that disagrees carries an override.
    assert!(s.endpoints[0].ports.is_empty());
    assert_eq!(
        s.endpoints[1].ports,
        BTreeMap::from([("http".to_owned(), 8081)])
    );
}

#[test]
fn protocol_precedence() {
    let idx = index(vec![
        ns("shop", true),
        svc(
            "shop",
            "multi",
            "10.96.0.7",
            json!([
                {"name": "a", "port": 80, "appProtocol": "http"},
                {"name": "b", "port": 81, "appProtocol": "kubernetes.io/h2c"},
                {"name": "c", "port": 82, "appProtocol": "grpc"},
                {"name": "d", "port": 83, "appProtocol": "tcp"},
                {"name": "e", "port": 84, "appProtocol": "example.com/custom"},
                {"name": "f", "port": 3306},
                {"name": "g", "port": 85, "targetPort": 5432},
                {"name": "h", "port": 86, "appProtocol": "http"},
                {"name": "i", "port": 87, "appProtocol": "http"},
                {"name": "j", "port": 6379, "appProtocol": "http"},
                {"name": "k", "port": 9042},
                {"name": "l", "port": 4444}
            ]),
        ),
        policy(
            "shop",
            "multi",
            json!({
                "service": "multi",
                "ports": [{"port": 86, "protocol": "GRPC"}],
                "opaquePorts": [87]
            }),
        ),
    ]);
    let out = rendered(&idx, "shop");
    let got: Vec<(u16, pc::Protocol)> = service(&out.config, "shop/multi")
        .ports
        .iter()
        .map(|p| (p.port, p.protocol))
        .collect();
    use pc::Protocol::*;
    assert_eq!(
        got,
        vec![
            (80, Http1),
            (81, Http2),
            (82, Grpc),
            (83, Opaque),
            (84, Detect),
            (85, Opaque),
            (86, Grpc),
            (87, Opaque),
            (3306, Opaque),
            (4444, Opaque),
            (6379, Http1),
            (9042, Opaque),
        ]
    );
}

#[test]
fn endpoints_ready_deduped_sorted_with_identity_and_subsets() {
    let mut objs = shop();
    objs.push(mesh(json!({"trustDomain": "example.org"})));
    objs.push(slice("shop", "cart-b", "cart", http_slice_port(), json!([
        ep("10.0.0.2", "cart-2"),
        {"addresses": ["10.0.0.9"], "conditions": {"ready": false}, "targetRef": {"kind": "Pod", "name": "cart-9"}},
        {"addresses": ["10.0.0.8"]}
    ])));
    objs.push(policy("shop", "cart", json!({
        "service": "cart",
        "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]
    })));
    let out = rendered(&index(objs), "shop");
    let s = service(&out.config, "shop/cart");
    assert_eq!(s.subsets, vec!["v1", "v2"]);
    let eps: Vec<(String, bool, Option<&str>, Vec<&str>)> = s
        .endpoints
        .iter()
        .map(|e| {
            (
                e.address.to_string(),
                e.meshed,
                e.identity.as_deref(),
                e.subsets.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        eps,
        vec![
            (
                "10.0.0.1".into(),
                true,
                Some("spiffe://example.org/ns/shop/sa/cart"),
                vec!["v1"]
            ),
            (
                "10.0.0.2".into(),
                true,
                Some("spiffe://example.org/ns/shop/sa/cart"),
                vec!["v2"]
            ),
            ("10.0.0.3".into(), false, None, vec!["v1"]),
            ("10.0.0.8".into(), false, None, vec![]),
        ]
    );
}

#[test]
fn visibility_meshed_namespaces_and_own() {
    let idx = index(vec![
        ns("a", true),
        ns("b", true),
        ns("c", false),
        svc("a", "x", "10.96.1.1", http_port()),
        svc("b", "y", "10.96.1.2", http_port()),
        svc("c", "z", "10.96.1.3", http_port()),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "a", "name": "ext"},
               "spec": {"type": "ExternalName", "externalName": "example.com"}}),
    ]);
    let a = rendered(&idx, "a").config;
    let keys: Vec<String> = a.services.iter().map(|s| s.key()).collect();
    assert_eq!(keys, vec!["a/x", "b/y"]);
    let mut scoped = ns("s", true);
    scoped["metadata"]["annotations"] = json!({"weft.dev/visible-namespaces": "b"});
    let mut objs = vec![scoped, svc("s", "own", "10.96.1.4", http_port())];
    objs.extend([
        ns("a", true),
        ns("b", true),
        svc("a", "x", "10.96.1.1", http_port()),
        svc("b", "y", "10.96.1.2", http_port()),
    ]);
    let s = rendered(&index(objs), "s").config;
    let keys: Vec<String> = s.services.iter().map(|s| s.key()).collect();
    assert_eq!(keys, vec!["b/y", "s/own"], "scoped to b, plus its own");
    let c = rendered(&idx, "c").config;
    let keys: Vec<String> = c.services.iter().map(|s| s.key()).collect();
    assert_eq!(keys, vec!["a/x", "b/y", "c/z"]);
}

#[test]
fn http_route_every_field() {
    let mut objs = shop();
    objs.push(policy(
        "shop",
        "cart",
        json!({
            "service": "cart",
            "subsets": [{"name": "v2", "labels": {"version": "v2"}}]
        }),
    ));
    objs.push(route("shop", "cart", json!({
        "service": "cart",
        "port": 80,
        "http": [{
            "name": "canary",
            "matches": [{
                "path": {"prefix": "/api"},
                "headers": [{"name": "X-User", "exact": "alice"}, {"name": "X-Trace", "present": true},
                            {"name": "X-Re", "regex": "a+b"}, {"name": "X-P", "prefix": "pre"}],
                "queryParams": [{"name": "debug", "exact": "1"}, {"name": "q", "regex": "[0-9]+"}],
                "method": "POST"
            }, {"path": {"regex": "/v[0-9]+/.*"}}, {"path": {"exact": "/exact"}}],
            "backends": [{"subset": "v2", "weight": 10}, {"service": "web", "port": 80, "weight": 90}],
            "timeout": "1.5s",
            "retries": {"attempts": 3, "perTryTimeout": "250ms", "retryOn": ["5xx", "retriable-status-codes"],
                        "retriableStatusCodes": [409], "backoff": {"baseInterval": "10ms", "maxInterval": "1s"}},
            "fault": {"delay": {"fixedDelay": "100ms", "percent": 5}, "abort": {"httpStatus": 503, "percent": 1.5}},
            "mirror": {"service": "web", "percent": 20},
            "requestHeaders": {"set": [{"name": "X-Set", "value": "1"}], "add": [{"name": "X-Add", "value": "2"}], "remove": ["X-Remove"]},
            "responseHeaders": {"set": [{"name": "X-Served-By", "value": "weft"}]},
            "rewrite": {"pathPrefix": "/v2", "authority": "cart.internal"}
        }, {
            "retries": {}
        }, {
            "matches": [{"path": {"exact": "/old"}}],
            "redirect": {"scheme": "https", "host": "new.example.com", "port": 8443, "path": "/new", "statusCode": 301}
        }]
    })));
    let out = rendered(&index(objs), "shop");
    assert!(
        out.statuses.iter().all(|s| s.accepted()),
        "{:?}",
        out.statuses
    );
    let routes = &service(&out.config, "shop/cart").http_routes;
    assert_eq!(routes.len(), 3);
    let want = pc::HttpRoute {
        name: "cart/canary".into(),
        port: Some(80),
        matches: vec![
            pc::HttpMatch {
                path: Some(pc::PathMatch::Prefix("/api".into())),
                headers: vec![
                    pc::NamedMatch {
                        name: "x-user".into(),
                        value: pc::ValueMatch::Exact("alice".into()),
                    },
                    pc::NamedMatch {
                        name: "x-trace".into(),
                        value: pc::ValueMatch::Present(true),
                    },
                    pc::NamedMatch {
                        name: "x-re".into(),
                        value: pc::ValueMatch::Regex("a+b".into()),
                    },
                    pc::NamedMatch {
                        name: "x-p".into(),
                        value: pc::ValueMatch::Prefix("pre".into()),
                    },
                ],
                query_params: vec![
                    pc::NamedMatch {
                        name: "debug".into(),
                        value: pc::ValueMatch::Exact("1".into()),
                    },
                    pc::NamedMatch {
                        name: "q".into(),
                        value: pc::ValueMatch::Regex("[0-9]+".into()),
                    },
                ],
                method: Some("POST".into()),
            },
            pc::HttpMatch {
                path: Some(pc::PathMatch::Regex("/v[0-9]+/.*".into())),
                ..Default::default()
            },
            pc::HttpMatch {
                path: Some(pc::PathMatch::Exact("/exact".into())),
                ..Default::default()
            },
        ],
        backends: vec![
            pc::Backend {
                service: "shop/cart".into(),
                subset: Some("v2".into()),
                port: None,
                weight: 10,
            },
            pc::Backend {
                service: "shop/web".into(),
                subset: None,
                port: Some(80),
                weight: 90,
            },
        ],
        timeout_ms: Some(1500),
        retry: Some(pc::RetryPolicy {
            attempts: 3,
            per_try_timeout_ms: Some(250),
            retry_on: vec![pc::RetryOn::ServerError, pc::RetryOn::RetriableStatusCodes],
            retriable_status_codes: vec![409],
            backoff_base_ms: 10,
            backoff_max_ms: 1000,
        }),
        fault: Some(pc::Fault {
            delay: Some(pc::FaultDelay {
                delay_ms: 100,
                percent: 5.0,
            }),
            abort: Some(pc::FaultAbort {
                status: 503,
                percent: 1.5,
            }),
        }),
        mirror: Some(pc::Mirror {
            backend: pc::Backend {
                service: "shop/web".into(),
                subset: None,
                port: None,
                weight: 1,
            },
            percent: 20.0,
        }),
        request_headers: pc::HeaderOps {
            set: vec![("x-set".into(), "1".into())],
            add: vec![("x-add".into(), "2".into())],
            remove: vec!["x-remove".into()],
        },
        response_headers: pc::HeaderOps {
            set: vec![("x-served-by".into(), "weft".into())],
            ..Default::default()
        },
        rewrite: Some(pc::Rewrite {
            path: None,
            path_prefix: Some("/v2".into()),
            authority: Some("cart.internal".into()),
        }),
        redirect: None,
        unresolved_weight: 0,
    };
    assert_eq!(routes[0], want);
    // Rule without a name is named by its index; retry defaults.
    assert_eq!(routes[1].name, "cart/1");
    assert_eq!(
        routes[1].retry,
        Some(pc::RetryPolicy {
            attempts: 2,
            per_try_timeout_ms: None,
            retry_on: vec![
                pc::RetryOn::ConnectFailure,
                pc::RetryOn::RefusedStream,
                pc::RetryOn::Unavailable,
                pc::RetryOn::GatewayError
            ],
            retriable_status_codes: vec![],
            backoff_base_ms: 25,
            backoff_max_ms: 250,
        })
    );
    assert_eq!(
        routes[2].redirect,
        Some(pc::Redirect {
            scheme: Some("https".into()),
            host: Some("new.example.com".into()),
            port: Some(8443),
            path: Some("/new".into()),
            path_prefix: None,
            status: 301
        })
    );
}

#[test]
fn tcp_routes_and_port_specific_rules_first() {
    let mut objs = shop();
    objs.push(svc(
        "shop",
        "db",
        "10.96.0.20",
        json!([{"name": "pg", "port": 5432}, {"name": "x", "port": 7000}]),
    ));
    objs.push(svc(
        "shop",
        "db-new",
        "10.96.0.21",
        json!([{"name": "pg", "port": 5432}]),
    ));
    objs.push(route("shop", "db-all", json!({
        "service": "db",
        "tcp": [{"name": "split", "backends": [{"weight": 1}, {"service": "db-new", "port": 5432, "weight": 3}]}]
    })));
    objs.push(route(
        "shop",
        "db-pg",
        json!({
            "service": "db", "port": 5432,
            "tcp": [{"backends": [{"service": "db-new"}]}]
        }),
    ));
    let out = rendered(&index(objs), "shop");
    let tcp = &service(&out.config, "shop/db").tcp_routes;
    assert_eq!(
        tcp,
        &vec![
            pc::TcpRoute {
                name: "db-pg/tcp".into(),
                port: Some(5432),
                backends: vec![pc::Backend {
                    service: "shop/db-new".into(),
                    subset: None,
                    port: None,
                    weight: 1
                }],
            },
            pc::TcpRoute {
                name: "db-all/split".into(),
                port: None,
                backends: vec![
                    pc::Backend {
                        service: "shop/db".into(),
                        subset: None,
                        port: None,
                        weight: 1
                    },
                    pc::Backend {
                        service: "shop/db-new".into(),
                        subset: None,
                        port: Some(5432),
                        weight: 3
                    },
                ],
            },
        ]
    );
}

#[test]
fn client_policy_every_field_and_defaults() {
    let mut objs = shop();
    objs.push(policy("shop", "cart", json!({
        "service": "cart",
        "loadBalancer": {"kind": "ConsistentHash", "consistentHash": {"header": "X-User"}},
        "connectionPool": {"maxConnections": 100, "maxPendingRequests": 10, "maxRequests": 1000,
                           "maxRequestsPerConnection": 0, "connectTimeout": "2s", "idleTimeout": "1m"},
        "outlierDetection": {"consecutiveGatewayErrors": 3, "interval": "5s", "baseEjectionTime": "1m", "maxEjectionPercent": 30},
        "retryBudget": {"retryPercent": 25, "minRetriesPerSecond": 5, "ttl": "20s"}
    })));
    objs.push(policy(
        "shop",
        "web",
        json!({
            "service": "web",
            "loadBalancer": {"kind": "RoundRobin"},
            "connectionPool": {},
            "outlierDetection": {},
            "retryBudget": {}
        }),
    ));
    let out = rendered(&index(objs), "shop");
    assert_eq!(
        service(&out.config, "shop/cart").policy,
        pc::ClientPolicy {
            load_balancer: pc::LoadBalancer::ConsistentHash(pc::HashKey::Header("x-user".into())),
            connection_pool: Some(pc::ConnectionPool {
                max_connections: Some(100),
                max_pending_requests: Some(10),
                max_requests: Some(1000),
                max_requests_per_connection: None,
                connect_timeout_ms: 2000,
                idle_timeout_ms: 60_000,
            }),
            outlier_detection: Some(pc::OutlierDetection {
                consecutive_5xx: None,
                consecutive_gateway_errors: Some(3),
                interval_ms: 5000,
                base_ejection_ms: 60_000,
                max_ejection_percent: 30,
            }),
            retry_budget: Some(pc::RetryBudget {
                retry_percent: 25.0,
                min_retries_per_second: 5,
                ttl_ms: 20_000
            }),
        }
    );
    assert_eq!(
        service(&out.config, "shop/web").policy,
        pc::ClientPolicy {
            load_balancer: pc::LoadBalancer::RoundRobin,
            connection_pool: Some(pc::ConnectionPool {
                max_connections: None,
                max_pending_requests: None,
                max_requests: None,
                max_requests_per_connection: None,
                connect_timeout_ms: 1000,
                idle_timeout_ms: 90_000,
            }),
            outlier_detection: Some(pc::OutlierDetection {
                consecutive_5xx: Some(5),
                consecutive_gateway_errors: None,
                interval_ms: 10_000,
                base_ejection_ms: 30_000,
                max_ejection_percent: 50,
            }),
            retry_budget: Some(pc::RetryBudget {
                retry_percent: 20.0,
                min_retries_per_second: 10,
                ttl_ms: 10_000
            }),
        }
    );
    // No policy: the defaults of the contract.
    let bare = rendered(&index(shop()), "shop");
    assert_eq!(
        service(&bare.config, "shop/cart").policy,
        pc::ClientPolicy::default()
    );
}

#[test]
fn hash_keys_cookie_and_source_ip() {
    for (hash, want) in [
        (
            json!({"cookie": {"name": "session"}}),
            pc::HashKey::Cookie("session".into()),
        ),
        (json!({"sourceIp": true}), pc::HashKey::SourceIp),
    ] {
        let mut objs = shop();
        objs.push(policy(
            "shop",
            "cart",
            json!({
                "service": "cart",
                "loadBalancer": {"kind": "ConsistentHash", "consistentHash": hash}
            }),
        ));
        let out = rendered(&index(objs), "shop");
        assert_eq!(
            service(&out.config, "shop/cart").policy.load_balancer,
            pc::LoadBalancer::ConsistentHash(want)
        );
    }
    for (kind, want) in [
        ("Random", pc::LoadBalancer::Random),
        ("LeastRequest", pc::LoadBalancer::LeastRequest),
    ] {
        let mut objs = shop();
        objs.push(policy(
            "shop",
            "cart",
            json!({"service": "cart", "loadBalancer": {"kind": kind}}),
        ));
        let out = rendered(&index(objs), "shop");
        assert_eq!(service(&out.config, "shop/cart").policy.load_balancer, want);
    }
}

#[test]
fn inbound_access_rate_limits_and_ports() {
    let mut objs = shop();
    objs.push(svc(
        "shop",
        "db",
        "10.96.0.20",
        json!([{"name": "pg", "port": 5432, "targetPort": 5432}]),
    ));
    objs.push(access("shop", "cart-callers", json!({
        "targetService": "cart",
        "action": "Allow",
        "rules": [{
            "from": [
                {"serviceAccounts": ["web", "ops/admin"]},
                {"namespaces": ["monitoring"]},
                {"identities": ["spiffe://cluster.local/ns/batch/*"]},
                {"unauthenticated": true}
            ],
            "to": [{"ports": [8080], "methods": ["get", "POST"], "paths": ["/api/*", "/health"]}]
        }]
    })));
    objs.push(access(
        "shop",
        "deny-debug",
        json!({
            "selector": {"matchLabels": {"app": "web"}},
            "action": "Deny",
            "mode": "Audit",
            "rules": [{"to": [{"paths": ["/debug/*"]}]}]
        }),
    ));
    objs.push(access(
        "shop",
        "all-pods",
        json!({"action": "Allow", "rules": [{}]}),
    ));
    objs.push(policy(
        "shop",
        "cart-limit",
        json!({
            "service": "cart",
            "rateLimit": {"requests": 100, "unit": "Minute", "burst": 20}
        }),
    ));
    let out = rendered(&index(objs), "shop");
    let inbound = &out.config.inbound;
    let cart_sel = BTreeMap::from([("app".to_owned(), "cart".to_owned())]);
    assert_eq!(
        inbound.policies,
        vec![
            pc::AccessPolicy {
                name: "all-pods".into(),
                selector: BTreeMap::new(),
                ports: vec![],
                action: pc::AccessAction::Allow,
                audit: false,
                rules: vec![pc::AccessRule::default()]
            },
            pc::AccessPolicy {
                name: "cart-callers".into(),
                selector: cart_sel.clone(),
                ports: vec![8080],
                action: pc::AccessAction::Allow,
                audit: false,
                rules: vec![pc::AccessRule {
                    from: vec![
                        pc::AccessSource {
                            identities: vec![
                                "spiffe://cluster.local/ns/shop/sa/web".into(),
                                "spiffe://cluster.local/ns/ops/sa/admin".into()
                            ],
                            ..Default::default()
                        },
                        pc::AccessSource {
                            namespaces: vec!["monitoring".into()],
                            ..Default::default()
                        },
                        pc::AccessSource {
                            identities: vec!["spiffe://cluster.local/ns/batch/*".into()],
                            ..Default::default()
                        },
                        pc::AccessSource {
                            unauthenticated: true,
                            ..Default::default()
                        },
                    ],
                    to: vec![pc::AccessDestination {
                        ports: vec![8080],
                        methods: vec!["GET".into(), "POST".into()],
                        paths: vec!["/api/*".into(), "/health".into()]
                    }],
                }],
            },
            pc::AccessPolicy {
                name: "deny-debug".into(),
                selector: BTreeMap::from([("app".to_owned(), "web".to_owned())]),
                ports: vec![],
                action: pc::AccessAction::Deny,
                audit: true,
                rules: vec![pc::AccessRule {
                    from: vec![],
                    to: vec![pc::AccessDestination {
                        paths: vec!["/debug/*".into()],
                        ..Default::default()
                    }]
                }],
            },
        ]
    );
    assert_eq!(
        inbound.rate_limits,
        vec![pc::RateLimit {
            name: "cart-limit".into(),
            selector: cart_sel,
            ports: vec![8080],
            requests: 100,
            interval_ms: 60_000,
            burst: 20
        }]
    );
    assert_eq!(
        inbound.ports,
        vec![pc::InboundPort {
            selector: BTreeMap::from([("app".to_owned(), "db".to_owned())]),
            port: 5432,
            protocol: pc::Protocol::Opaque
        }]
    );
}

#[test]
fn source_with_service_accounts_and_identities_needs_both() {
    let mut objs = shop();
    objs.push(access("shop", "narrow", json!({
        "action": "Allow",
        "rules": [
            {"from": [{"serviceAccounts": ["web", "ops/admin"], "identities": ["spiffe://cluster.local/ns/ops/*"]}]},
            // Contradictory: no service account of shop is in ns/other. The
            // rule must vanish, never turn into "anyone".
            {"from": [{"serviceAccounts": ["web"], "identities": ["spiffe://cluster.local/ns/other/*"]}]}
        ]
    })));
    let out = rendered(&index(objs), "shop");
    let p = &out.config.inbound.policies[0];
    assert_eq!(
        p.rules,
        vec![pc::AccessRule {
            from: vec![pc::AccessSource {
                identities: vec!["spiffe://cluster.local/ns/ops/sa/admin".into()],
                ..Default::default()
            }],
            to: vec![],
        }]
    );
}

#[test]
fn mesh_settings() {
    let mut objs = shop();
    objs.push(mesh(json!({
        "trustDomain": "corp.example",
        "mtls": {"mode": "Permissive"},
        "access": {"defaultAction": "Deny", "escapedSlashes": "Keep"},
        "telemetry": {"accessLog": {"enabled": true},
                      "tracing": {"otlpEndpoint": "http://otel.observability:4318", "samplingPercent": 10}}
    })));
    let out = rendered(&index(objs), "shop");
    assert_eq!(
        out.config.mesh,
        pc::MeshSettings {
            trust_domain: "corp.example".into(),
            mtls_mode: pc::MtlsMode::Permissive,
            default_access: pc::AccessAction::Deny,
            access_log: true,
            access_log_options: Default::default(),
            tracing: Some(pc::Tracing {
                otlp_endpoint: "http://otel.observability:4318".into(),
                sampling_percent: 10.0
            }),
            escaped_slashes: pc::EscapedSlashes::Keep,
            metrics_naming: Default::default(),
        }
    );
    let bare = rendered(&index(shop()), "shop");
    assert_eq!(bare.config.mesh.trust_domain, "cluster.local");
    assert_eq!(bare.config.mesh.mtls_mode, pc::MtlsMode::Strict);
    assert_eq!(bare.config.mesh.tracing, None);
    assert_eq!(bare.config.mesh.escaped_slashes, pc::EscapedSlashes::Reject);
}

#[test]
fn generation_kept_on_same_content_and_bumped_on_change() {
    use weft_operator::index::Previous;
    let mut idx = index(shop());
    let first = rendered(&idx, "shop").config;
    assert_eq!(first.generation, 1);

    // Restart: the operator reads generation and hash from the ConfigMap.
    idx.set_previous(
        "shop",
        Some(Previous {
            generation: 7,
            hash: String::new(),
            edited: false,
            signer: None,
        }),
    );
    let seventh = rendered(&idx, "shop").config;
    assert_eq!(seventh.generation, 8, "unknown hash: content differs, bump");
    idx.set_previous(
        "shop",
        Some(Previous {
            generation: 8,
            hash: seventh.hash.clone(),
            edited: false,
            signer: None,
        }),
    );
    let again = rendered(&idx, "shop").config;
    assert_eq!(
        again.to_json(),
        seventh.to_json(),
        "same content, same bytes"
    );

    idx.apply(object(slice(
        "shop",
        "cart-z",
        "cart",
        http_slice_port(),
        json!([ep("10.0.0.7", "cart-7")]),
    )));
    let changed = rendered(&idx, "shop").config;
    assert_eq!(changed.generation, 9);
    assert_ne!(changed.hash, again.hash);
}

#[test]
fn endpoints_carry_their_workload_app_and_version() {
    let mut objs = shop();
    // cart-1 belongs to Deployment cart-v1 (through its ReplicaSet).
    objs.retain(|o| o["metadata"]["name"] != "cart-1");
    let mut owned = pod(
        "shop",
        "cart-1",
        "cart",
        true,
        json!({"app": "cart", "version": "v1", "pod-template-hash": "7f9d"}),
    );
    owned["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "cart-v1-7f9d",
        "uid": "u1", "controller": true
    }]);
    objs.push(owned);
    objs.push(mesh(json!({"telemetry": {"metrics": {"naming": "Both"}}})));
    let out = rendered(&index(objs), "shop");
    assert_eq!(out.config.mesh.metrics_naming, pc::MetricsNaming::Both);
    let s = service(&out.config, "shop/cart");
    let of = |ip: &str| {
        let e = s
            .endpoints
            .iter()
            .find(|e| e.address.to_string() == ip)
            .expect("endpoint");
        (
            e.workload.as_deref(),
            e.app.as_deref(),
            e.version.as_deref(),
        )
    };
    assert_eq!(of("10.0.0.1"), (Some("cart-v1"), Some("cart"), Some("v1")));
    // A pod without a controller is its own workload.
    assert_eq!(of("10.0.0.2"), (Some("cart-2"), Some("cart"), Some("v2")));
    let bare = rendered(&index(shop()), "shop");
    assert_eq!(bare.config.mesh.metrics_naming, pc::MetricsNaming::Weft);
}

#[test]
fn access_logs_follow_the_mesh_and_a_namespace_turns_them_up_or_down() {
    let with = |annotation: Option<&str>| {
        let mut objs = shop();
        if let Some(a) = annotation {
            let n = objs
                .iter_mut()
                .find(|o| o["kind"] == "Namespace" && o["metadata"]["name"] == "shop")
                .expect("namespace");
            n["metadata"]["annotations"] = json!({"weft.dev/access-log": a});
        }
        objs.push(mesh(json!({"telemetry": {"accessLog": {
            "enabled": false, "format": "Text", "filter": "All", "samplePercent": 25
        }}})));
        rendered(&index(objs), "shop").config.mesh
    };
    let off = with(None);
    assert!(!off.access_log);
    assert_eq!(off.access_log_options.format, pc::AccessLogFormat::Text);
    assert_eq!(off.access_log_options.sample_percent, 25.0);
    let errors = with(Some("errors"));
    assert!(errors.access_log && errors.access_log_options.errors_only);
    let all = with(Some("all"));
    assert!(all.access_log && !all.access_log_options.errors_only);
    assert!(!with(Some("off")).access_log);
    // Not a value: ignored, the Mesh's setting applies.
    assert!(!with(Some("loud")).access_log);
}
