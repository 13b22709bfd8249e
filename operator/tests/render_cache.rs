//! The cached renderer ([`Renderer`]) against the uncached one ([`render`]):
//! after any sequence of changes, every namespace's document is the same
//! bytes, hash, generation and verdicts; a change re-renders only what it
//! touches; the gzip form is one member that decompresses to the JSON.

mod render_support;

use proptest::prelude::*;
use render_support::*;
use serde_json::{Value, json};
use weft_operator::index::{Index, Kind, ObjectRef, Previous};
use weft_operator::render::{Renderer, render};

/// Three meshed namespaces (`c` scoped to `a`), one outside the mesh.
fn base() -> Vec<Value> {
    let mut objs = vec![
        ns("a", true),
        ns("b", true),
        scoped("c", "a"),
        ns("d", false),
    ];
    for (n, (space, svc)) in [
        ("a", "web"),
        ("a", "api"),
        ("b", "db"),
        ("c", "ui"),
        ("d", "old"),
    ]
    .into_iter()
    .enumerate()
    {
        objs.push(svc_obj(space, svc, 80));
        objs.push(slice_obj(
            space,
            svc,
            &format!("{svc}-a"),
            svc,
            &[true, true, false],
        ));
        for p in 0..3 {
            objs.push(pod(
                space,
                &format!("{svc}-{p}"),
                svc,
                p != 2,
                json!({"app": svc, "version": if p % 2 == 0 { "v1" } else { "v2" }}),
            ));
        }
        if n == 0 {
            objs.push(subsets_policy(space, svc));
            objs.push(split_route(space, svc));
        }
    }
    objs.push(access("a", "allow-c", json!({"targetService": "web", "action": "Allow", "rules": [{"from": [{"namespaces": ["c"]}]}]})));
    objs
}

fn scoped(name: &str, sees: &str) -> Value {
    let mut v = ns(name, true);
    v["metadata"]["annotations"] = json!({"weft.dev/visible-namespaces": sees});
    v
}

fn svc_obj(space: &str, name: &str, port: u16) -> Value {
    let n = name.len() as u16;
    svc(
        space,
        name,
        &format!("10.96.{}.{}", space.as_bytes()[0], n),
        json!([{"name": "http", "port": port, "targetPort": "http"}]),
    )
}

/// Endpoints `<pod_prefix>-0..` with the given readiness.
fn slice_obj(space: &str, service: &str, name: &str, pod_prefix: &str, ready: &[bool]) -> Value {
    let eps: Vec<Value> = ready
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut e = ep(
                &format!("10.{}.{}.{}", space.as_bytes()[0], pod_prefix.len(), i + 1),
                &format!("{pod_prefix}-{i}"),
            );
            e["conditions"]["ready"] = json!(r);
            e
        })
        .collect();
    slice(space, name, service, http_slice_port(), json!(eps))
}

fn subsets_policy(space: &str, svc: &str) -> Value {
    policy(
        space,
        svc,
        json!({"service": svc, "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}),
    )
}

fn split_route(space: &str, svc: &str) -> Value {
    route(
        space,
        svc,
        json!({"service": svc, "http": [{"backends": [{"subset": "v1", "weight": 9}, {"subset": "v2", "weight": 1}]}]}),
    )
}

/// The Services every change picks from: (namespace, name).
const SERVICES: [(&str, &str); 5] = [
    ("a", "web"),
    ("a", "api"),
    ("b", "db"),
    ("c", "ui"),
    ("d", "old"),
];

/// Applies change number `what` (with arguments `x`, `y`) to the index.
fn change(idx: &mut Index, what: u8, x: u8, y: u8) {
    let (space, svc) = SERVICES[usize::from(x) % SERVICES.len()];
    let pod_name = format!("{svc}-{}", y % 3);
    match what % 14 {
        0 => {
            let ready: Vec<bool> = (0..3).map(|i| (y >> i) & 1 == 1).collect();
            idx.apply(object(slice_obj(
                space,
                svc,
                &format!("{svc}-a"),
                svc,
                &ready,
            )));
        }
        1 => {
            let labels =
                json!({"app": svc, "version": if y.is_multiple_of(2) { "v1" } else { "v2" }});
            idx.apply(object(pod(space, &pod_name, svc, y % 3 != 2, labels)));
        }
        2 => {
            idx.delete(Kind::Pod, &ObjectRef::new(space, pod_name));
        }
        3 => {
            idx.apply(object(svc_obj(space, svc, 80 + u16::from(y % 2))));
        }
        4 => {
            idx.delete(Kind::Service, &ObjectRef::new(space, svc));
        }
        5 => {
            idx.apply(object(subsets_policy(space, svc)));
        }
        6 => {
            idx.delete(Kind::ServicePolicy, &ObjectRef::new(space, svc));
        }
        7 => {
            idx.apply(object(split_route(space, svc)));
        }
        8 => {
            // A second slice of the Service, or the first one filed under
            // another Service.
            let owner = if y.is_multiple_of(2) { svc } else { "web" };
            idx.apply(object(slice_obj(
                space,
                owner,
                &format!("{svc}-a"),
                svc,
                &[true, true, true],
            )));
        }
        9 => {
            let sees = ["a", "b", "a,b", "*"][usize::from(y) % 4];
            idx.apply(object(scoped("c", sees)));
        }
        10 => {
            idx.apply(object(ns("b", y.is_multiple_of(2))));
        }
        11 => {
            let td = if y.is_multiple_of(2) {
                "cluster.local"
            } else {
                "example.org"
            };
            idx.apply(object(mesh(json!({"trustDomain": td}))));
        }
        12 => {
            idx.apply(object(route(
                space,
                &format!("{svc}-bad"),
                json!({"service": svc, "http": [{"timeout": "soon"}]}),
            )));
        }
        _ => {
            idx.delete(
                Kind::EndpointSlice,
                &ObjectRef::new(space, format!("{svc}-a")),
            );
        }
    }
}

/// Renders every namespace both ways and asserts they agree; records what
/// was "written" and accepted, as the operator does.
fn check_all(renderer: &mut Renderer, idx: &mut Index) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for space in ["a", "b", "c", "d"] {
        let reference = render(idx, space);
        let cached = renderer.render(idx, space);
        let json = cached.document.to_json();
        assert_eq!(
            String::from_utf8_lossy(&json),
            String::from_utf8_lossy(&reference.config.to_json()),
            "namespace {space}"
        );
        assert_eq!(cached.document.hash(), reference.config.hash);
        assert_eq!(cached.document.generation(), reference.config.generation);
        assert_eq!(cached.document.raw_len(), json.len());
        assert_eq!(cached.statuses, reference.statuses);
        cached.document.validate().expect("every render validates");
        let loaded = cached.document.to_config().expect("loads as a proxy would");
        assert_eq!(loaded, reference.config);
        let gz = cached.document.gzip();
        let bytes = gz.to_vec();
        assert_eq!(bytes.len(), gz.len());
        assert_eq!(
            weft_proxy_config::gunzip(&bytes).expect("one gzip member"),
            json
        );
        out.push((space.to_owned(), json));
    }
    for space in ["a", "b", "c", "d"] {
        let r = render(idx, space);
        for st in r.statuses.iter().filter(|s| s.accepted()) {
            idx.record_accepted(st.kind, &st.object, st.generation);
        }
        idx.set_previous(
            space,
            Some(Previous {
                generation: r.config.generation,
                hash: r.config.hash,
                edited: false,
                signer: None,
            }),
        );
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever changes, and whatever the renderer kept from before, its
    /// output is the uncached renderer's, byte for byte.
    #[test]
    fn cached_matches_uncached_after_any_changes(
        steps in prop::collection::vec((any::<u8>(), any::<u8>(), any::<u8>()), 1..24),
        prune_every in 1usize..5,
    ) {
        let mut idx = index(base());
        let mut renderer = Renderer::new();
        check_all(&mut renderer, &mut idx);
        for (i, (what, x, y)) in steps.into_iter().enumerate() {
            change(&mut idx, what, x, y);
            check_all(&mut renderer, &mut idx);
            if i % prune_every == 0 {
                renderer.prune(&idx);
            }
        }
    }
}

#[test]
fn one_endpoint_change_renders_one_entry_and_changes_only_its_viewers() {
    let mut idx = index(base());
    let mut renderer = Renderer::new();
    let before = check_all(&mut renderer, &mut idx);
    for space in ["a", "b", "c", "d"] {
        renderer.render(&idx, space).document.gzip();
    }
    let stats = renderer.stats();

    // An endpoint of b/db turns unready: a and b see b; c sees only a.
    idx.apply(object(slice_obj(
        "b",
        "db",
        "db-a",
        "db",
        &[true, false, false],
    )));
    let after = check_all(&mut renderer, &mut idx);
    for space in ["a", "b", "c", "d"] {
        renderer.render(&idx, space).document.gzip();
    }
    // Among the meshed namespaces (d is outside the mesh and never written).
    let changed: Vec<&str> = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| b.0 != "d" && b.1 != a.1)
        .map(|(b, _)| b.0.as_str())
        .collect();
    assert_eq!(changed, vec!["a", "b"]);

    let now = renderer.stats();
    assert_eq!(
        now.fragments - stats.fragments,
        1,
        "only b/db rendered again"
    );
    assert_eq!(now.blocks - stats.blocks, 1, "only b's block rebuilt");
    assert_eq!(now.namespaces_judged - stats.namespaces_judged, 1);
    assert_eq!(now.chunks_compressed - stats.chunks_compressed, 1);
}

#[test]
fn a_pod_change_renders_again_only_the_services_naming_it() {
    let mut idx = index(base());
    let mut renderer = Renderer::new();
    check_all(&mut renderer, &mut idx);
    // (pod, labels, Service entries rendered again)
    let cases = [
        // a/web-0 moves from subset v1 to v2: a/web's entry changes, a/api's not.
        ("web-0", json!({"app": "web", "version": "v2"}), 1),
        // A pod no slice names changes nothing rendered.
        ("stray", json!({"app": "stray"}), 0),
    ];
    for (name, labels, entries) in cases {
        let stats = renderer.stats();
        idx.apply(object(pod("a", name, "web", true, labels)));
        check_all(&mut renderer, &mut idx);
        assert_eq!(
            renderer.stats().fragments - stats.fragments,
            entries,
            "{name}"
        );
    }
}

#[test]
fn unscoped_namespaces_share_one_services_part() {
    let mut idx = index(base());
    let mut renderer = Renderer::new();
    for space in ["a", "b"] {
        renderer.render(&idx, space);
    }
    assert_eq!(renderer.stats().sets, 1, "a and b see the same Services");
    renderer.render(&idx, "c");
    assert_eq!(renderer.stats().sets, 2, "c sees fewer");
    check_all(&mut renderer, &mut idx);
}

#[test]
fn diverging_copies_of_an_index_never_share_stale_entries() {
    let mut idx = index(base());
    let mut renderer = Renderer::new();
    check_all(&mut renderer, &mut idx);
    let mut copy = idx.clone();
    change(&mut idx, 0, 0, 0b001);
    change(&mut copy, 0, 0, 0b110);
    // One renderer, both lineages, alternately.
    check_all(&mut renderer, &mut idx);
    check_all(&mut renderer, &mut copy);
    check_all(&mut renderer, &mut idx);
}
