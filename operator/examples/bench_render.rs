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
//! itself (annotation `weft.dev/visible-namespaces`); without, every meshed
//! namespace sees every Service (the default visibility).
//!
//! Objects are applied to the index as they are generated, the way watch
//! events arrive, so the peak memory is the operator's (index, renderer,
//! outputs), not a list of every Kubernetes object at once.
//!
//! Prints: index build time; the full render of every meshed namespace with
//! the operator's [`Renderer`] (render, hash, validate and encode each
//! namespace, plain or gzip, keeping every payload); the time to copy every
//! payload into one buffer as a write would; the incremental re-render after
//! one endpoint change (every namespace that sees it); the largest
//! ConfigMap raw and gzipped; peak memory (VmHWM). It also checks one
//! namespace against the uncached renderer, byte for byte.

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
use weft_operator::config::{ConfigOptions, Encoded, encode};
use weft_operator::index::{Index, Object, Previous};
use weft_operator::render::{Renderer, render};

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
            || "every meshed namespace (default)".to_owned(),
            |k| format!("own + {k} others")
        )
    );

    let started = Instant::now();
    let mut index = Index::new();
    let mut apply = |o: Object| {
        index.apply(o);
    };
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
        apply(Object::Namespace(Box::new(ns)));
    }
    for s in 0..services {
        let ns = format!("ns-{}", s % namespaces);
        let name = format!("svc-{s}");
        apply(Object::Service(Box::new(Service {
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
        apply(Object::EndpointSlice(Box::new(slice_for(
            &ns,
            &name,
            s * per_svc,
            per_svc,
            0,
        ))));
        for e in 0..per_svc {
            let version = if e % 2 == 0 { "v1" } else { "v2" };
            apply(Object::Pod(Box::new(Pod {
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
            apply(Object::ServicePolicy(Box::new(p)));
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
            apply(Object::ServiceRoute(Box::new(r)));
        }
    }
    println!(
        "index build (generate + apply every object): {:.2?}",
        started.elapsed()
    );
    let after_index = vm_hwm_kib().unwrap_or(0);

    let opts = ConfigOptions::default();
    let all: Vec<String> = index.meshed_namespaces().map(str::to_owned).collect();
    let mut renderer = Renderer::new();
    let mut outputs = Vec::with_capacity(all.len());
    let started = Instant::now();
    for ns in &all {
        let out = renderer.render(&index, ns);
        out.document.validate()?;
        let encoded = encode(&out.document, opts.gzip_threshold, opts.max_bytes);
        outputs.push((out.document, encoded));
    }
    let full = started.elapsed();
    let stats = renderer.stats();
    println!(
        "FULL RENDER, {} namespaces (render + hash + validate + encode each, payloads kept): {full:.2?} ({:.2?} per namespace)",
        all.len(),
        full / all.len().max(1) as u32
    );
    println!(
        "  work done: {} Service entries rendered, {} namespace blocks, {} visible sets, {} chunks compressed",
        stats.fragments, stats.blocks, stats.sets, stats.chunks_compressed
    );

    let mut largest_raw = 0usize;
    let mut largest_gz = 0usize;
    let mut too_large = 0usize;
    let started = Instant::now();
    for (doc, encoded) in &outputs {
        largest_raw = largest_raw.max(doc.raw_len());
        match encoded {
            Encoded::Plain(s) => largest_raw = largest_raw.max(s.len()),
            Encoded::Gzip(p) => {
                let bytes = p.to_vec();
                largest_gz = largest_gz.max(bytes.len());
            }
            Encoded::TooLarge { gzipped, .. } => {
                too_large += 1;
                largest_gz = largest_gz.max(*gzipped);
            }
        }
    }
    println!(
        "  copying every payload into one buffer (what each write serializes): {:.2?}",
        started.elapsed()
    );
    let mib = |n: usize| n as f64 / 1048576.0;
    println!(
        "LARGEST CONFIGMAP: proxy.json {largest_raw} bytes ({:.2} MiB) raw, {largest_gz} bytes ({:.2} MiB) gzipped; {}",
        mib(largest_raw),
        mib(largest_gz),
        if largest_raw <= 1 << 20 {
            "fits 1 MiB raw".to_owned()
        } else if too_large == 0 {
            "raw exceeds 1 MiB, the gzip fits (written as binaryData proxy.json.gz)".to_owned()
        } else {
            format!("{too_large} namespaces do NOT fit even gzipped")
        }
    );

    // One namespace, checked against the uncached renderer.
    let probe = &all[all.len() / 2];
    let reference = render(&index, probe).config.to_json();
    let (doc, encoded) = outputs
        .iter()
        .find(|(d, _)| d.namespace() == probe)
        .expect("every namespace rendered");
    anyhow::ensure!(
        doc.to_json() == reference,
        "cached render of {probe} differs"
    );
    if let Encoded::Gzip(p) = encoded {
        anyhow::ensure!(
            weft_proxy_config::gunzip(&p.to_vec())? == reference,
            "gzip of {probe} does not decompress to its JSON"
        );
    }
    println!(
        "  check: {probe} is byte-identical to the uncached renderer's output (and its gzip decompresses to it)"
    );

    // What the operator records after writing.
    for (doc, _) in &outputs {
        index.set_previous(
            doc.namespace(),
            Some(Previous {
                generation: doc.generation(),
                hash: doc.hash().to_owned(),
                edited: false,
                signer: None,
            }),
        );
    }
    let peak_full = vm_hwm_kib().unwrap_or(0);

    // One endpoint turns unready.
    let before = renderer.stats();
    let started = Instant::now();
    let dirty = index.apply(Object::EndpointSlice(Box::new(slice_for(
        "ns-7",
        "svc-7",
        7 * per_svc,
        per_svc,
        1,
    ))));
    let dirty = dirty.resolve(&index);
    let mut rendered = 0;
    let mut changed = 0;
    for ns in &dirty {
        if index.is_meshed(ns) {
            let out = renderer.render(&index, ns);
            out.document.validate()?;
            if index.previous(ns).map(|p| p.hash.as_str()) != Some(out.document.hash()) {
                let _ = encode(&out.document, opts.gzip_threshold, opts.max_bytes);
                changed += 1;
            }
            rendered += 1;
        }
    }
    let incremental = started.elapsed();
    let after = renderer.stats();
    println!(
        "INCREMENTAL: one endpoint change dirties {} namespaces; apply + re-render + encode {rendered} ({changed} changed): {incremental:.2?}",
        dirty.len()
    );
    println!(
        "  work done: {} Service entries rendered, {} namespace blocks, {} visible sets, {} chunks compressed",
        after.fragments - before.fragments,
        after.blocks - before.blocks,
        after.sets - before.sets,
        after.chunks_compressed - before.chunks_compressed
    );
    drop(outputs);
    println!(
        "PEAK MEMORY (VmHWM): {} MiB ({} MiB after the index build, {} MiB after the full render with every payload held)",
        vm_hwm_kib().unwrap_or(0) / 1024,
        after_index / 1024,
        peak_full / 1024
    );
    Ok(())
}
