//! Renders a synthetic cluster and prints what it costs.
//!
//! ```text
//! cargo run --release -p weft-operator --example bench_render -- [services] [endpoints] [namespaces] [scope]
//! ```
//!
//! Defaults: 10,000 Services, 100,000 endpoints, 500 namespaces, every
//! namespace meshed, every endpoint a meshed pod; one Service in ten has a
//! `ServicePolicy` with two subsets and a `ServiceRoute` splitting between
//! them. With `scope` k, namespace n sees only namespaces n+1..=n+k besides
//! itself (annotation `weft.dev/visible-namespaces`). Prints: index build time, one namespace's render and its size with
//! and without gzip, the full render of every namespace (render + seal +
//! serialize, what the operator does before comparing hashes), the
//! incremental re-render after one endpoint change (every namespace that
//! sees it), and peak memory (VmHWM).

use std::collections::BTreeMap;
use std::time::Instant;

use k8s_openapi::api::core::v1::{
    Namespace, ObjectReference, Pod, PodSpec, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use weft_api::policy::Subset;
use weft_api::route::{Backend, HttpRule};
use weft_api::{ServicePolicy, ServicePolicySpec, ServiceRoute, ServiceRouteSpec};
use weft_operator::index::{Index, Object};
use weft_operator::render::render;

fn meta(ns: &str, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        namespace: (!ns.is_empty()).then(|| ns.to_owned()),
        name: Some(name.to_owned()),
        labels: Some(
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        ),
        generation: Some(1),
        ..Default::default()
    }
}

fn ip(i: usize, base: u8) -> String {
    format!("10.{base}.{}.{}", (i >> 8) & 0xff, i & 0xff)
}

fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn slice_for(ns: &str, svc: &str, first_ep: usize, eps: usize, generation: u64) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(
            ns,
            &format!("{svc}-abcde"),
            &[("kubernetes.io/service-name", svc)],
        ),
        address_type: "IPv4".into(),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        endpoints: (0..eps)
            .map(|e| Endpoint {
                addresses: vec![ip(first_ep + e, 1)],
                conditions: Some(EndpointConditions {
                    ready: Some(e as u64 != generation % eps as u64 || generation == 0),
                    ..Default::default()
                }),
                target_ref: Some(ObjectReference {
                    kind: Some("Pod".into()),
                    name: Some(format!("{svc}-{e}")),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let services = args.first().copied().unwrap_or(10_000);
    let endpoints = args.get(1).copied().unwrap_or(100_000);
    let namespaces = args.get(2).copied().unwrap_or(500);
    // With a scope, namespace n sees n+1..=n+scope (annotation
    // weft.dev/visible-namespaces); without, every meshed namespace.
    let scope = args.get(3).copied();
    let per_svc = endpoints / services;
    println!(
        "synthetic cluster: {services} Services, {} endpoints ({per_svc} per Service), {namespaces} meshed namespaces, visibility: {}",
        per_svc * services,
        scope.map_or_else(
            || "every meshed namespace".to_owned(),
            |k| format!("own + {k} others")
        )
    );

    let started = Instant::now();
    let mut objects = Vec::new();
    for n in 0..namespaces {
        let mut ns = Namespace {
            metadata: meta("", &format!("ns-{n}"), &[("weft.dev/inject", "enabled")]),
            ..Default::default()
        };
        if let Some(k) = scope {
            let visible: Vec<String> = (1..=k)
                .map(|d| format!("ns-{}", (n + d) % namespaces))
                .collect();
            ns.metadata.annotations = Some(BTreeMap::from([(
                "weft.dev/visible-namespaces".to_owned(),
                visible.join(","),
            )]));
        }
        objects.push(Object::Namespace(Box::new(ns)));
    }
    for s in 0..services {
        let ns = format!("ns-{}", s % namespaces);
        let name = format!("svc-{s}");
        objects.push(Object::Service(Box::new(Service {
            metadata: meta(&ns, &name, &[]),
            spec: Some(ServiceSpec {
                cluster_ip: Some(ip(s, 96)),
                cluster_ips: Some(vec![ip(s, 96)]),
                selector: Some(BTreeMap::from([("app".to_owned(), name.clone())])),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    target_port: Some(IntOrString::String("http".into())),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: None,
        })));
        objects.push(Object::EndpointSlice(Box::new(slice_for(
            &ns,
            &name,
            s * per_svc,
            per_svc,
            0,
        ))));
        for e in 0..per_svc {
            let version = if e % 2 == 0 { "v1" } else { "v2" };
            objects.push(Object::Pod(Box::new(Pod {
                metadata: meta(
                    &ns,
                    &format!("{name}-{e}"),
                    &[
                        ("app", &name),
                        ("version", version),
                        ("weft.dev/proxy", "injected"),
                    ],
                ),
                spec: Some(PodSpec {
                    service_account_name: Some(name.clone()),
                    ..Default::default()
                }),
                status: None,
            })));
        }
        if s % 10 == 0 {
            let mut p = ServicePolicy::new(
                &name,
                ServicePolicySpec {
                    service: name.clone(),
                    subsets: ["v1", "v2"]
                        .iter()
                        .map(|v| Subset {
                            name: (*v).to_owned(),
                            labels: BTreeMap::from([("version".to_owned(), (*v).to_owned())]),
                        })
                        .collect(),
                    ..Default::default()
                },
            );
            p.metadata.namespace = Some(ns.clone());
            objects.push(Object::ServicePolicy(Box::new(p)));
            let mut r = ServiceRoute::new(
                &name,
                ServiceRouteSpec {
                    service: name.clone(),
                    http: vec![HttpRule {
                        backends: ["v1", "v2"]
                            .iter()
                            .map(|v| Backend {
                                subset: Some((*v).to_owned()),
                                weight: 50,
                                ..Default::default()
                            })
                            .collect(),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            );
            r.metadata.namespace = Some(ns.clone());
            objects.push(Object::ServiceRoute(Box::new(r)));
        }
    }
    println!("generate objects: {:.2?}", started.elapsed());

    let started = Instant::now();
    let mut index = Index::from_objects(objects);
    println!("index build: {:.2?}", started.elapsed());

    let started = Instant::now();
    let one = render(&index, "ns-0");
    let one_render = started.elapsed();
    let json = one.config.to_json();
    let started = Instant::now();
    let gz = weft_proxy_config::gzip(&json);
    let gzip_time = started.elapsed();
    one.config.validate()?;
    println!(
        "one namespace: render+seal {one_render:.2?}; {} services, {} endpoints; proxy.json {} bytes ({:.2} MiB), gzip {} bytes ({:.2} MiB, {gzip_time:.2?}); fits 1 MiB: {}",
        one.config.services.len(),
        one.config
            .services
            .iter()
            .map(|s| s.endpoints.len())
            .sum::<usize>(),
        json.len(),
        json.len() as f64 / 1048576.0,
        gz.len(),
        gz.len() as f64 / 1048576.0,
        if json.len() <= 1 << 20 {
            "raw"
        } else if gz.len() <= 1 << 20 {
            "gzip only"
        } else {
            "NO"
        },
    );
    drop((one, json, gz));

    let all: Vec<String> = index.meshed_namespaces().map(str::to_owned).collect();
    let started = Instant::now();
    let mut largest = 0usize;
    for ns in &all {
        let out = render(&index, ns);
        largest = largest.max(out.config.to_json().len());
    }
    let full = started.elapsed();
    println!(
        "full render, {} namespaces (render+seal+serialize each): {full:.2?} ({:.2?} per namespace); largest proxy.json {largest} bytes",
        all.len(),
        full / all.len().max(1) as u32
    );

    // One endpoint turns unready.
    let started = Instant::now();
    let dirty = index.apply(Object::EndpointSlice(Box::new(slice_for(
        "ns-7",
        "svc-7",
        7 * per_svc,
        per_svc,
        1,
    ))));
    let mut rendered = 0;
    for ns in &dirty.resolve(&index) {
        if index.is_meshed(ns) {
            let _ = render(&index, ns).config.to_json();
            rendered += 1;
        }
    }
    println!(
        "incremental: one endpoint change dirties {} namespaces; apply + re-render {rendered}: {:.2?}",
        dirty.resolve(&index).len(),
        started.elapsed()
    );
    println!(
        "peak memory (VmHWM): {} MiB",
        vm_hwm_kib().unwrap_or(0) / 1024
    );
    Ok(())
}
