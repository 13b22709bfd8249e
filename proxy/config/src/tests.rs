//! Contract tests: what the operator writes, the proxy reads back unchanged;
//! every consistency rule rejects what it guards; no input makes the reader
//! panic.

use pretty_assertions::assert_eq;
use proptest::prelude::*;

use crate::testing::sample;
use crate::*;
use std::sync::Arc;

#[test]
fn round_trip_preserves_every_field() {
    let cfg = sample();
    cfg.validate().expect("the sample is valid");
    let bytes = cfg.to_json();
    let back = ProxyConfig::load(&bytes).expect("loads");
    assert_eq!(back, cfg);
    assert_eq!(back.to_json(), bytes, "serialization is byte-stable");
}

#[test]
fn escaped_slashes_default_is_left_out_so_older_documents_keep_their_hash() {
    let keep = sample();
    assert!(String::from_utf8_lossy(&keep.to_json()).contains(r#""escapedSlashes":"Keep""#));
    let mut cfg = sample();
    cfg.mesh.escaped_slashes = EscapedSlashes::Reject;
    cfg.seal();
    let bytes = cfg.to_json();
    assert!(
        !String::from_utf8_lossy(&bytes).contains("escapedSlashes"),
        "a document written before the field looks the same"
    );
    let back = ProxyConfig::load(&bytes).expect("loads, hash verified");
    assert_eq!(back.mesh.escaped_slashes, EscapedSlashes::Reject);
}

#[test]
fn gzip_round_trip() {
    let bytes = sample().to_json();
    let gz = gzip(&bytes);
    assert!(gz.len() < bytes.len());
    assert_eq!(gunzip(&gz).expect("decompresses"), bytes);
}

/// The output is sized once from the length the trailer states: a large
/// config is not copied again and again as its buffer grows.
#[test]
fn gunzip_sizes_its_output_from_the_trailer() {
    let bytes: Vec<u8> = (0..3_000_000u32)
        .flat_map(|i| (i % 251).to_le_bytes())
        .collect();
    let out = gunzip(&gzip(&bytes)).expect("decompresses");
    assert_eq!(out, bytes);
    assert_eq!(out.capacity(), bytes.len() + 1);
}

#[test]
fn truncated_gzip_is_an_error() {
    let gz = gzip(&sample().to_json());
    let err = gunzip(&gz[..gz.len() / 2]).expect_err("truncated");
    assert!(matches!(err, LoadError::Gzip(_)), "{err}");
}

#[test]
fn gzip_bomb_is_refused() {
    let zeros = vec![0u8; (MAX_DECODED_BYTES + 10) as usize];
    let gz = gzip(&zeros);
    assert!(matches!(gunzip(&gz), Err(LoadError::TooLarge)));
}

#[test]
fn hash_is_content_addressed() {
    let a = sample();
    let mut b = sample();
    assert_eq!(a.hash, b.hash);
    assert!(a.hash.starts_with("sha256:"));
    b.generation += 1;
    b.seal();
    assert_ne!(a.hash, b.hash);
}

#[test]
fn edited_file_fails_the_hash_check() {
    let text = String::from_utf8(sample().to_json()).expect("utf-8");
    let edited = text.replacen("\"attempts\":3", "\"attempts\":4", 1);
    assert_ne!(text, edited, "the edit applies");
    let err = ProxyConfig::load(edited.as_bytes()).expect_err("hash mismatch");
    assert!(matches!(err, LoadError::Hash { .. }), "{err}");
}

#[test]
fn truncated_json_is_a_parse_error() {
    let bytes = sample().to_json();
    for cut in [0, 1, bytes.len() / 3, bytes.len() - 1] {
        let err = ProxyConfig::load(&bytes[..cut]).expect_err("truncated");
        assert!(matches!(err, LoadError::Parse(_)), "cut at {cut}: {err}");
    }
}

#[test]
fn unknown_version_is_refused_before_parsing_the_rest() {
    let err = ProxyConfig::load(br#"{"version": 2, "whatever": true}"#).expect_err("v2");
    assert!(matches!(err, LoadError::Version { found: 2 }), "{err}");
    assert!(err.to_string().contains("upgrade"));
}

/// `load` checks the hash over each Service's bytes as the document holds
/// them and re-serializes only when that fails. For what the operator
/// writes, those bytes must give the hash as defined, or every reload
/// would take the slow way without any test noticing.
#[test]
fn the_operator_s_layout_is_hashed_by_its_own_bytes() {
    #[derive(serde::Deserialize)]
    struct Services<'a> {
        #[serde(borrow)]
        services: Vec<&'a serde_json::value::RawValue>,
    }
    let cfg = sample();
    assert!(cfg.services.len() > 1);
    let json = cfg.to_json();
    let doc: Services<'_> = serde_json::from_slice(&json).expect("json");
    let digests: Vec<[u8; 32]> = doc
        .services
        .iter()
        .map(|raw| service_digest(raw.get().as_bytes()))
        .collect();
    assert_eq!(
        cfg.hash_with_services_root(&services_root(&digests)),
        cfg.compute_hash()
    );
    assert_eq!(cfg.hash, cfg.compute_hash());
}

#[test]
fn a_document_in_another_layout_loads_by_the_hash_as_defined() {
    // The operator writes compact JSON and the proxy hashes the bytes of each
    // Service as written; a pretty-printed document (another producer, a
    // hand copy) is checked against the hash's definition instead.
    let cfg = sample();
    assert!(!cfg.services.is_empty());
    let pretty = serde_json::to_vec_pretty(&cfg).expect("json");
    assert_ne!(pretty, cfg.to_json());
    assert_eq!(ProxyConfig::load(&pretty).expect("loads"), cfg);
    // An edit inside a Service is still caught in that layout.
    let text = String::from_utf8(pretty).expect("utf-8");
    let edited = text.replacen("\"attempts\": 3", "\"attempts\": 4", 1);
    assert_ne!(text, edited, "the edit applies");
    let err = ProxyConfig::load(edited.as_bytes()).expect_err("hash mismatch");
    assert!(matches!(err, LoadError::Hash { .. }), "{err}");
}

#[test]
fn a_malformed_service_is_named_by_its_place() {
    let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).expect("json");
    let last = v["services"].as_array().expect("services").len() - 1;
    v["services"][last]["ports"] = serde_json::json!("eighty");
    let err = ProxyConfig::load(&serde_json::to_vec(&v).expect("json")).expect_err("malformed");
    assert!(
        matches!(err, LoadError::Service { index, .. } if index == last),
        "{err}"
    );
    assert!(
        err.to_string().contains(&format!("services[{last}]")),
        "{err}"
    );
}

#[test]
fn unknown_fields_are_refused() {
    let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).expect("json");
    v["surprise"] = serde_json::json!(1);
    let err = ProxyConfig::load(&serde_json::to_vec(&v).expect("json")).expect_err("unknown");
    assert!(err.to_string().contains("surprise"), "{err}");
}

/// Applies `edit` to a valid sample, reseals it, and returns the messages.
fn errors_after(edit: impl FnOnce(&mut ProxyConfig)) -> Vec<String> {
    let mut cfg = sample();
    edit(&mut cfg);
    cfg.seal();
    let via_load = ProxyConfig::load(&cfg.to_json());
    match cfg.validate() {
        Ok(()) => panic!("edit was accepted"),
        Err(errs) => {
            assert!(
                matches!(via_load, Err(LoadError::Invalid(_))),
                "load agrees"
            );
            errs.0.iter().map(ToString::to_string).collect()
        }
    }
}

fn assert_error(edit: impl FnOnce(&mut ProxyConfig), want: &str) {
    let errs = errors_after(edit);
    assert!(
        errs.iter().any(|e| e.contains(want)),
        "expected an error containing {want:?}, got {errs:#?}"
    );
}

fn backend_svc(cfg: &mut ProxyConfig) -> &mut Service {
    Arc::make_mut(&mut cfg.services[0])
}

#[test]
fn an_http_backend_of_another_namespace_may_be_absent() {
    // A Gateway API route's granted backend outside this document's scope:
    // valid; the proxy answers that share 500. In the routed Service's own
    // namespace, or on a TCP route, it stays an error.
    let mut cfg = sample();
    let svc = backend_svc(&mut cfg);
    svc.http_routes[0].backends[0].service = "elsewhere/api".into();
    svc.http_routes[1]
        .mirror
        .as_mut()
        .expect("mirror")
        .backend
        .service = "elsewhere/api".into();
    cfg.seal();
    cfg.validate().expect("a foreign backend is valid");
}

#[test]
fn every_rule_rejects_what_it_guards() {
    assert_error(|c| c.namespace.clear(), "namespace: must not be empty");
    assert_error(
        |c| c.mesh.trust_domain = "a/b".into(),
        "is not a trust domain",
    );
    assert_error(
        |c| c.mesh.tracing.as_mut().expect("tracing").sampling_percent = 101.0,
        "outside 0–100",
    );
    assert_error(
        |c| c.mesh.tracing.as_mut().expect("tracing").otlp_endpoint = "collector:4318".into(),
        "is not an http(s) URL",
    );
    assert_error(
        |c| {
            let dup = c.services[1].clone();
            c.services.push(dup);
        },
        "duplicate service",
    );
    assert_error(
        |c| {
            let p = backend_svc(c).ports[0].clone();
            backend_svc(c).ports.push(p);
        },
        "duplicate port",
    );
    assert_error(|c| backend_svc(c).ports[0].port = 0, "port 0 is not a port");
    assert_error(
        |c| backend_svc(c).subsets.push("v1".into()),
        "duplicate subset name",
    );
    assert_error(
        |c| backend_svc(c).endpoints[1].address = backend_svc(c).endpoints[0].address,
        "duplicate endpoint address",
    );
    assert_error(
        |c| backend_svc(c).endpoints[0].identity = None,
        "meshed endpoint without identity",
    );
    assert_error(
        |c| backend_svc(c).endpoints[0].identity = Some("spiffe://other.domain/ns/x/sa/y".into()),
        "is not in trust domain",
    );
    assert_error(
        |c| backend_svc(c).endpoints[0].identity = Some("spiffe://cluster.local/".into()),
        "has no path",
    );
    assert_error(
        |c| backend_svc(c).endpoints[0].meshed = false,
        "identity on a non-meshed endpoint",
    );
    assert_error(
        |c| backend_svc(c).endpoints[0].subsets = vec!["v9".into()],
        "unknown subset \"v9\"",
    );
    assert_error(
        |c| {
            backend_svc(c).endpoints[0]
                .ports
                .insert("grpc".into(), 9000);
        },
        "port override for unknown port name",
    );
    assert_error(
        |c| backend_svc(c).http_routes[0].backends[0].service = "demo/nope".into(),
        "unknown service \"demo/nope\"",
    );
    assert_error(
        |c| backend_svc(c).http_routes[0].backends[0].subset = Some("v3".into()),
        "has no subset \"v3\"",
    );
    assert_error(
        |c| backend_svc(c).http_routes[0].backends[0].port = Some(1),
        "has no port 1",
    );
    assert_error(
        |c| backend_svc(c).http_routes[1].port = Some(9999),
        "service has no port 9999",
    );
    assert_error(
        |c| {
            for b in &mut backend_svc(c).http_routes[1].backends {
                b.weight = 0;
            }
        },
        "every backend has weight 0",
    );
    assert_error(
        |c| backend_svc(c).http_routes[1].matches[0].path = Some(PathMatch::Regex("(".into())),
        "does not compile",
    );
    assert_error(
        |c| {
            backend_svc(c).http_routes[0].matches[0].headers[0].value =
                ValueMatch::Regex("[a-".into());
        },
        "does not compile",
    );
    assert_error(
        |c| backend_svc(c).http_routes[2].matches[0].path = Some(PathMatch::Exact("api".into())),
        "does not start with /",
    );
    assert_error(
        |c| backend_svc(c).http_routes[1].matches[0].method = Some("get".into()),
        "is not an upper-case method",
    );
    assert_error(
        |c| {
            let b = backend_svc(c).http_routes[0].backends[0].clone();
            backend_svc(c).http_routes[2].backends.push(b);
        },
        "a redirect route has no backends",
    );
    assert_error(
        |c| {
            backend_svc(c).http_routes[2]
                .redirect
                .as_mut()
                .expect("redirect")
                .status = 200
        },
        "is not a redirect status",
    );
    assert_error(
        |c| {
            backend_svc(c).http_routes[2]
                .redirect
                .as_mut()
                .expect("redirect")
                .scheme = Some("ftp".into())
        },
        "is not http or https",
    );
    assert_error(
        |c| backend_svc(c).http_routes[2].rewrite = Some(Rewrite::default()),
        "redirect and rewrite are mutually exclusive",
    );
    assert_error(
        |c| {
            backend_svc(c).http_routes[1]
                .retry
                .as_mut()
                .expect("retry")
                .attempts = 11
        },
        "is more than 10",
    );
    assert_error(
        |c| {
            backend_svc(c).http_routes[1]
                .retry
                .as_mut()
                .expect("retry")
                .backoff_max_ms = 1
        },
        "backoff max is below backoff base",
    );
    assert_error(
        |c| {
            backend_svc(c).http_routes[1]
                .retry
                .as_mut()
                .expect("retry")
                .retriable_status_codes = vec![42]
        },
        "42 is not a status code",
    );
    assert_error(
        |c| {
            let f = backend_svc(c).http_routes[1].fault.as_mut().expect("fault");
            f.delay.as_mut().expect("delay").percent = 100.5;
        },
        "percentage 100.5 is outside 0–100",
    );
    assert_error(
        |c| {
            let f = backend_svc(c).http_routes[1].fault.as_mut().expect("fault");
            f.abort.as_mut().expect("abort").percent = -1.0;
        },
        "percentage -1 is outside 0–100",
    );
    assert_error(
        |c| {
            let f = backend_svc(c).http_routes[1].fault.as_mut().expect("fault");
            f.abort.as_mut().expect("abort").status = 100;
        },
        "is not an error status",
    );
    assert_error(
        |c| {
            let f = backend_svc(c).http_routes[1].fault.as_mut().expect("fault");
            f.abort = None;
            f.delay = None;
        },
        "a fault needs a delay or an abort",
    );
    assert_error(
        |c| {
            backend_svc(c).http_routes[1]
                .mirror
                .as_mut()
                .expect("mirror")
                .percent = 200.0
        },
        "outside 0–100",
    );
    assert_error(
        |c| {
            backend_svc(c).http_routes[1]
                .mirror
                .as_mut()
                .expect("mirror")
                .backend
                .service = "demo/y".into()
        },
        "unknown service \"demo/y\"",
    );
    assert_error(
        |c| {
            backend_svc(c).http_routes[1]
                .rewrite
                .as_mut()
                .expect("rewrite")
                .path = Some("/x".into())
        },
        "path and pathPrefix are mutually exclusive",
    );
    assert_error(
        |c| backend_svc(c).http_routes[0].name.clear(),
        "route name must not be empty",
    );
    assert_error(
        |c| {
            let r = c.services[1].tcp_routes[0].clone();
            Arc::make_mut(&mut c.services[1]).tcp_routes.push(r);
        },
        "more than one TCP route for the same port",
    );
    assert_error(
        |c| {
            Arc::make_mut(&mut c.services[1]).tcp_routes[0]
                .backends
                .clear()
        },
        "a TCP route needs backends",
    );
    assert_error(
        |c| {
            backend_svc(c).policy.load_balancer =
                LoadBalancer::ConsistentHash(HashKey::Cookie(String::new()));
        },
        "empty hash key name",
    );
    assert_error(
        |c| {
            backend_svc(c)
                .policy
                .outlier_detection
                .as_mut()
                .expect("od")
                .max_ejection_percent = 101
        },
        "percentage 101 is outside 0–100",
    );
    assert_error(
        |c| {
            backend_svc(c)
                .policy
                .outlier_detection
                .as_mut()
                .expect("od")
                .interval_ms = 0
        },
        "intervalMs: must be above 0",
    );
    assert_error(
        |c| {
            backend_svc(c)
                .policy
                .retry_budget
                .as_mut()
                .expect("rb")
                .retry_percent = 120.0
        },
        "outside 0–100",
    );
    assert_error(
        |c| {
            backend_svc(c)
                .policy
                .retry_budget
                .as_mut()
                .expect("rb")
                .ttl_ms = 0
        },
        "ttlMs: must be above 0",
    );
    assert_error(
        |c| {
            backend_svc(c)
                .policy
                .connection_pool
                .as_mut()
                .expect("cp")
                .connect_timeout_ms = 0
        },
        "connectTimeoutMs: must be above 0",
    );
    assert_error(
        |c| {
            backend_svc(c)
                .policy
                .connection_pool
                .as_mut()
                .expect("cp")
                .max_connections = Some(0)
        },
        "maxConnections: must be above 0 when set",
    );
    assert_error(
        |c| {
            backend_svc(c)
                .policy
                .connection_pool
                .as_mut()
                .expect("cp")
                .max_requests = Some(0)
        },
        "maxRequests: must be above 0 when set",
    );
    assert_error(
        |c| {
            let p = c.inbound.policies[0].clone();
            c.inbound.policies.push(p);
        },
        "duplicate policy name",
    );
    assert_error(
        |c| c.inbound.policies[0].rules[0].to[0].paths = vec!["api".into()],
        "path \"api\" does not start with /",
    );
    assert_error(
        |c| {
            let r = c.inbound.rate_limits[0].clone();
            c.inbound.rate_limits.push(r);
        },
        "duplicate rate limit name",
    );
    assert_error(
        |c| c.inbound.rate_limits[0].interval_ms = 0,
        "requests and interval must be above 0",
    );
}

#[test]
fn all_problems_are_reported_at_once_with_paths() {
    let errs = errors_after(|c| {
        c.namespace.clear();
        backend_svc(c).http_routes[0].backends[0].subset = Some("v3".into());
    });
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[1].starts_with("services[demo/backend].httpRoutes[0].backends[0]"),
        "{}",
        errs[1]
    );
}

#[test]
fn selectors_match_by_subset_of_labels() {
    let sel = std::collections::BTreeMap::from([("app".to_owned(), "backend".to_owned())]);
    let mut labels = sel.clone();
    labels.insert("version".into(), "v1".into());
    assert!(selector_matches(&sel, &labels));
    assert!(selector_matches(&Selector::new(), &labels));
    labels.insert("app".into(), "frontend".into());
    assert!(!selector_matches(&sel, &labels));
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = ProxyConfig::load(&bytes);
        let _ = gunzip(&bytes);
    }

    #[test]
    fn mutated_valid_config_never_panics(cut in 0usize..4000, byte in any::<u8>()) {
        let mut bytes = sample().to_json();
        let i = cut % bytes.len();
        bytes[i] = byte;
        let _ = ProxyConfig::load(&bytes);
    }
}

/// The documented hash, computed from its definition by hand: SHA-256 of the
/// document with `hash` and `services` empty, followed by SHA-256 over the
/// SHA-256 of each Service's JSON.
#[test]
fn hash_follows_its_documented_definition() {
    use sha2::{Digest, Sha256};
    let cfg = sample();
    let mut skeleton = cfg.clone();
    skeleton.hash.clear();
    skeleton.services.clear();
    let mut leaves = Sha256::new();
    for s in &cfg.services {
        leaves.update(Sha256::digest(serde_json::to_vec(s).expect("json")));
    }
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(&skeleton).expect("json"));
    h.update(leaves.finalize());
    assert_eq!(cfg.hash, format!("sha256:{}", hex::encode(h.finalize())));
    assert_eq!(cfg.compute_hash(), cfg.hash);
}

#[test]
fn hash_covers_every_service_and_their_order() {
    let cfg = sample();
    assert!(cfg.services.len() >= 2, "the sample has services to swap");
    let mut swapped = cfg.clone();
    swapped.services.swap(0, 1);
    assert_ne!(swapped.compute_hash(), cfg.hash);
    let mut edited = cfg.clone();
    Arc::make_mut(&mut edited.services[1]).cluster_ips.clear();
    assert_ne!(edited.compute_hash(), cfg.hash);
    let mut moved = cfg.clone();
    let last = moved.services.pop().expect("a service");
    moved.services.insert(0, last);
    assert_ne!(moved.compute_hash(), cfg.hash);
}

#[test]
fn hash_from_a_services_root_matches_the_whole_document() {
    let cfg = sample();
    let digests: Vec<[u8; 32]> = cfg
        .services
        .iter()
        .map(|s| service_digest(&serde_json::to_vec(s).expect("json")))
        .collect();
    let mut without = cfg.clone();
    without.services.clear();
    without.hash = "ignored".into();
    assert_eq!(
        without.hash_with_services_root(&services_root(&digests)),
        cfg.hash
    );
}

#[test]
fn json_parts_reassemble_the_document() {
    let cfg = sample();
    let mut without = cfg.clone();
    without.services.clear();
    let (head, tail) = without.json_parts();
    let mut bytes = head;
    for (i, s) in cfg.services.iter().enumerate() {
        if i > 0 {
            bytes.push(b',');
        }
        bytes.extend(serde_json::to_vec(s).expect("json"));
    }
    bytes.extend(tail);
    assert_eq!(bytes, cfg.to_json());

    // No Services at all, and a namespace whose name could confuse a search.
    without.namespace = "\"services\":[]".into();
    let (head, tail) = without.json_parts();
    assert_eq!([head, tail].concat(), without.to_json());
}

fn assembled(parts: &[Deflated]) -> Vec<u8> {
    let mut crc = Crc::new();
    let mut out = GZIP_HEADER.to_vec();
    for p in parts {
        out.extend_from_slice(p.bytes());
        crc.combine(p.crc());
    }
    out.extend(gzip_trailer(&crc));
    out
}

#[test]
fn deflated_parts_form_one_gzip_member() {
    let json = sample().to_json();
    let (a, b) = json.split_at(json.len() / 3);
    let parts = [
        Deflated::compress([a]),
        Deflated::compress([]),
        Deflated::compress([&b[..10], &b[10..]]),
    ];
    let gz = assembled(&parts);
    // `gunzip` reads one member only: the whole document comes back, so the
    // parts are one member.
    assert_eq!(gunzip(&gz).expect("decompresses"), json);
    let mut single = flate2::read::GzDecoder::new(&gz[..]);
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut single, &mut out).expect("one member");
    assert_eq!(out, json);
    // A wrong trailer is detected.
    let mut bad = gz.clone();
    let n = bad.len();
    bad[n - 5] ^= 1;
    assert!(matches!(gunzip(&bad), Err(LoadError::Gzip(_))));
}

#[test]
fn a_group_of_services_validates_on_its_own() {
    let cfg = sample();
    validate_services(&cfg.services, &cfg.mesh.trust_domain).expect("the sample's services");
    // A route's backend outside the group is unknown to the group.
    let mut db: Service = (**cfg
        .services
        .iter()
        .find(|s| s.name == "db")
        .expect("the sample's db"))
    .clone();
    db.tcp_routes[0].backends[0].service = "demo/backend".into();
    let err = validate_services([&db], &cfg.mesh.trust_domain).expect_err("dangling backend");
    assert!(err.to_string().contains("unknown service"), "{err}");
    let backend = cfg
        .services
        .iter()
        .find(|s| s.name == "backend")
        .expect("the sample's backend");
    validate_services([&**backend, &db], &cfg.mesh.trust_domain).expect("resolved in the group");
    let twice = [cfg.services[0].clone(), cfg.services[0].clone()];
    let err = validate_services(&twice, &cfg.mesh.trust_domain).expect_err("duplicate");
    assert!(err.to_string().contains("duplicate service"), "{err}");
}

proptest! {
    // Each case builds several compressors; a few dozen cases cover the
    // boundaries (empty parts, one-byte parts, parts inside a match run).
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn any_split_into_deflated_parts_round_trips(
        bytes in proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'{'), any::<u8>()], 0..5_000),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        at.sort_unstable();
        let mut parts = Vec::new();
        let mut from = 0;
        for to in at.into_iter().chain([bytes.len()]) {
            parts.push(Deflated::compress([&bytes[from..to]]));
            from = to;
        }
        prop_assert_eq!(gunzip(&assembled(&parts)).expect("decompresses"), bytes);
    }
}

#[test]
fn the_most_specific_mtls_override_wins() {
    let mut cfg = sample();
    cfg.mesh.mtls_mode = MtlsMode::Strict;
    let sel = |app: &str| Selector::from([("app".to_owned(), app.to_owned())]);
    cfg.inbound.mtls = vec![
        MtlsOverride {
            name: "legacy".into(),
            selector: sel("legacy"),
            mode: Some(MtlsMode::Permissive),
            ports: vec![PortMtls {
                port: 9090,
                mode: MtlsMode::Strict,
            }],
        },
        MtlsOverride {
            name: "namespace".into(),
            selector: Selector::new(),
            mode: None,
            ports: vec![PortMtls {
                port: 8080,
                mode: MtlsMode::Permissive,
            }],
        },
    ];
    cfg.validate().expect("valid");
    let legacy = sel("legacy");
    let web = sel("web");
    assert_eq!(
        mtls_mode(&cfg, &legacy, 9090),
        MtlsMode::Strict,
        "workload port"
    );
    assert_eq!(
        mtls_mode(&cfg, &legacy, 8080),
        MtlsMode::Permissive,
        "workload mode"
    );
    assert_eq!(
        mtls_mode(&cfg, &web, 8080),
        MtlsMode::Permissive,
        "namespace port"
    );
    assert_eq!(mtls_mode(&cfg, &web, 80), MtlsMode::Strict, "the mesh's");
    cfg.mesh.mtls_mode = MtlsMode::Permissive;
    assert_eq!(
        mtls_mode(&cfg, &web, 80),
        MtlsMode::Permissive,
        "the mesh's"
    );

    let mut dup = cfg.clone();
    dup.inbound.mtls.push(MtlsOverride {
        name: "second".into(),
        selector: Selector::new(),
        mode: Some(MtlsMode::Strict),
        ports: vec![],
    });
    let err = dup.validate().expect_err("two namespace-wide overrides");
    assert!(err.to_string().contains("namespace-wide"), "{err}");
}

/// The gateway section's rules: what each listener protocol may carry, and
/// what a TLS passthrough host's Service may route with.
#[test]
fn gateway_listener_rules() {
    fn listener(protocol: ListenerProtocol, certs: &[&str], service: &str) -> Listener {
        Listener {
            name: format!("{protocol:?}"),
            port: 8443,
            protocol,
            hostname: None,
            certificates: certs.iter().map(|c| (*c).to_owned()).collect(),
            hosts: vec![VirtualHost {
                hostname: Some("a.example.com".into()),
                service: service.into(),
            }],
        }
    }
    let with = |l: Listener| {
        move |c: &mut ProxyConfig| {
            c.gateway = Some(Gateway {
                name: "demo/public".into(),
                listeners: vec![l],
            })
        }
    };
    // A passthrough host's Service routes by TCP routes (db has them).
    let mut ok = sample();
    with(listener(ListenerProtocol::Tls, &[], "demo/db"))(&mut ok);
    ok.seal();
    ok.validate()
        .expect("a tls listener onto a Service with tcpRoutes is valid");
    assert_error(
        with(listener(ListenerProtocol::Tls, &["cert"], "demo/db")),
        "a tls (passthrough) listener has no certificates",
    );
    assert_error(
        with(listener(ListenerProtocol::Tls, &[], "demo/backend")),
        "of a tls (passthrough) listener has httpRoutes",
    );
    assert_error(
        with(listener(ListenerProtocol::Https, &[], "demo/backend")),
        "an https listener needs a certificate",
    );
    assert_error(
        with(listener(ListenerProtocol::Http, &["cert"], "demo/backend")),
        "an http listener has no certificates",
    );
    assert_error(
        with(listener(ListenerProtocol::Http, &[], "demo/nope")),
        "unknown service",
    );
}

/// A document loaded after another, as a reload does.
fn load_pair(first: &ProxyConfig, second: &ProxyConfig) -> (Loaded, Result<Loaded, LoadError>) {
    let before = ProxyConfig::load_after(&first.to_json(), None).expect("the first loads");
    let after = ProxyConfig::load_after(
        &second.to_json(),
        Some(Previous {
            config: &before.config,
            known: &before.known,
        }),
    );
    (before, after)
}

#[test]
fn a_load_after_shares_unchanged_services_and_parses_changed_ones() {
    let first = sample();
    let mut second = sample();
    second.generation += 1;
    Arc::make_mut(&mut second.services[1]).endpoints[0].address = "10.244.9.9".parse().expect("ip");
    second.seal();
    let (before, after) = load_pair(&first, &second);
    let after = after.expect("the second loads");
    assert_eq!(
        after.config,
        ProxyConfig::load(&second.to_json()).expect("cold")
    );
    assert_eq!(after.reused, vec![Some(0), None, Some(2)]);
    for i in [0, 2] {
        assert!(Arc::ptr_eq(
            &after.config.services[i],
            &before.config.services[i]
        ));
    }
    assert!(!Arc::ptr_eq(
        &after.config.services[1],
        &before.config.services[1]
    ));
    assert_eq!(
        after.config.services[1].endpoints[0].address.to_string(),
        "10.244.9.9"
    );
}

#[test]
fn a_service_edited_under_the_old_hash_is_refused_after_a_load() {
    let first = sample();
    let mut edited = sample();
    Arc::make_mut(&mut edited.services[1]).cluster_ips.clear();
    // Not sealed again: the hash is the first document's.
    let (_, after) = load_pair(&first, &edited);
    let err = after.expect_err("an edited Service does not pass under the old hash");
    assert!(matches!(err, LoadError::Hash { .. }), "{err}");
}

/// What a collision of fingerprints would do: each one points at another
/// Service of the previous document. The document still loads as it is.
#[test]
fn fingerprints_that_point_at_other_services_fall_back_to_a_whole_load() {
    let cfg = sample();
    let json = cfg.to_json();
    let before = ProxyConfig::load_after(&json, None).expect("loads");
    let mut known = before.known.clone();
    let n = before.config.services.len();
    for i in known.prints.values_mut() {
        *i = (*i + 1) % n;
    }
    let after = ProxyConfig::load_after(
        &json,
        Some(Previous {
            config: &before.config,
            known: &known,
        }),
    )
    .expect("loads from nothing");
    assert_eq!(after.config, cfg);
    assert!(
        after.reused.iter().all(Option::is_none),
        "{:?}",
        after.reused
    );
}

#[test]
fn kept_services_are_checked_again_when_the_trust_domain_changes() {
    let first = sample();
    let mut second = sample();
    second.mesh.trust_domain = "other.example".into();
    second.seal();
    let (_, after) = load_pair(&first, &second);
    let err = after.expect_err("identities of another trust domain");
    assert!(err.to_string().contains("is not in trust domain"), "{err}");
}

#[test]
fn a_kept_service_s_routes_are_checked_against_the_new_document() {
    let mut first = sample();
    Arc::make_mut(&mut first.services[1]).tcp_routes[0].backends[0].service =
        "demo/frontend".into();
    first.seal();
    let mut second = first.clone();
    second.services.retain(|s| s.name != "frontend");
    second.seal();
    let (_, after) = load_pair(&first, &second);
    let err = after.expect_err("the db's route names a Service that is gone");
    assert!(
        err.to_string()
            .contains("unknown service \"demo/frontend\""),
        "{err}"
    );
}

/// A previous load whose parts do not belong together (what it kept names
/// Services its document does not have) takes nothing it cannot find, and
/// does not panic.
#[test]
fn a_previous_load_that_does_not_add_up_is_not_trusted() {
    let cfg = sample();
    let json = cfg.to_json();
    let full = ProxyConfig::load_after(&json, None).expect("loads");
    let mut short = cfg.clone();
    short.services.truncate(1);
    let after = ProxyConfig::load_after(
        &json,
        Some(Previous {
            config: &short,
            known: &full.known,
        }),
    )
    .expect("loads");
    assert_eq!(after.config, cfg);
    assert_eq!(after.reused, vec![Some(0), None, None]);
}

/// Services are told apart by namespace and name: a namespace with a `/`
/// would let two of them share one `namespace/name` key.
#[test]
fn a_namespace_with_a_slash_is_refused() {
    let mut cfg = sample();
    Arc::make_mut(&mut cfg.services[2]).namespace = "demo/x".into();
    let err = cfg.validate().expect_err("a / in a namespace");
    assert!(err.to_string().contains("a namespace has no /"), "{err}");
}

/// The sample with `n` more Services like its `backend`, each new to a
/// load: enough of them and a load parses and checks them on more than
/// one thread.
fn with_many_services(n: usize) -> ProxyConfig {
    let mut cfg = sample();
    let backend = (*cfg.services[0]).clone();
    for i in 0..n {
        let mut s = backend.clone();
        s.name = format!("many-{i}");
        s.cluster_ips = vec![std::net::IpAddr::V4(std::net::Ipv4Addr::new(
            10,
            97,
            (i / 250) as u8,
            (i % 250) as u8 + 1,
        ))];
        cfg.services.push(Arc::new(s));
    }
    cfg.seal();
    cfg
}

#[test]
fn many_new_services_load_as_one_by_one() {
    let n = 4 * par::MIN_PER_THREAD;
    if std::thread::available_parallelism().map_or(1, |c| c.get()) > 1 {
        assert!(
            par::threads_for(n) > 1,
            "the load below runs on more than one thread"
        );
    }
    let good = with_many_services(n);
    let started = || par::tests::STARTED.with(std::cell::Cell::get);
    let before = started();
    assert_eq!(ProxyConfig::load(&good.to_json()).expect("loads"), good);
    if std::thread::available_parallelism().map_or(1, |c| c.get()) > 1 {
        assert!(started() > before, "the load started worker threads");
    }

    // What the checks of Services' own fields find on other threads is
    // reported as one thread's validation reports it: paths and order.
    let mut bad = with_many_services(n);
    let (early, late) = (3 + n / 3, 3 + n - 2);
    Arc::make_mut(&mut bad.services[late]).endpoints[0].identity =
        Some("spiffe://elsewhere/ns/demo/sa/backend".into());
    Arc::make_mut(&mut bad.services[early])
        .subsets
        .push("v1".into());
    bad.seal();
    let want = bad.validate().expect_err("two Services are broken");
    assert_eq!(want.0.len(), 2, "{want}");
    assert!(want.0[0].path.contains("many-"), "{want}");
    match ProxyConfig::load(&bad.to_json()) {
        Err(LoadError::Invalid(got)) => assert_eq!(got, want),
        other => panic!("expected the validation errors, got {other:?}"),
    }

    // A Service that does not parse is named by its place in the document.
    let (head, tail) = good.json_parts();
    let mut doc = head;
    for (i, s) in good.services.iter().enumerate() {
        if i > 0 {
            doc.push(b',');
        }
        if i == late {
            doc.extend_from_slice(br#"{"name":1}"#);
        } else {
            doc.extend(serde_json::to_vec(&**s).expect("serializes"));
        }
    }
    doc.extend(tail);
    match ProxyConfig::load(&doc) {
        Err(LoadError::Service { index, .. }) => assert_eq!(index, late),
        other => panic!("expected services[{late}] not to parse, got {other:?}"),
    }
}
