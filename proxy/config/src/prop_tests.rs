//! Property tests of the reader's input: whatever bytes are mounted as
//! `proxy.json` or `proxy.json.gz`, [`ProxyConfig::load`] and [`gunzip`]
//! return a clear error or a document that validates, and never panic.
//!
//! Inputs are the sample document (see [`crate::testing`]) cut short or
//! with bytes flipped, plain and gzipped; arbitrary bytes gzipped; and the
//! sample changed node by node (odd values, copies, removals) and resealed,
//! which is what reaches `validate()`.
//!
//! Each property runs 256 cases (proptest's default, written out): a case
//! parses a document of a few KB a few times, so the module takes under a
//! second in a debug build.

use proptest::prelude::*;
use serde_json::{Value, json};

use crate::testing::sample;
use crate::*;

/// Up to four byte flips, each at an index into the document and with a
/// non-zero XOR mask, so every flip changes its byte.
fn flips() -> impl Strategy<Value = Vec<(prop::sample::Index, u8)>> {
    proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..=4)
}

fn flipped(mut bytes: Vec<u8>, flips: &[(prop::sample::Index, u8)]) -> Vec<u8> {
    let len = bytes.len();
    for (at, mask) in flips {
        bytes[at.index(len)] ^= mask;
    }
    bytes
}

/// Values that fit nowhere or almost anywhere: wrong types, numbers at and
/// past the edges of every integer type, empty and odd strings, a long one.
fn odd_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        odd_number(),
        odd_string().prop_map(Value::String),
        Just(json!([])),
        Just(json!({})),
    ]
}

fn odd_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(1)),
        Just(json!(-1)),
        Just(json!(65535)),
        Just(json!(65536)),
        Just(json!(u32::MAX)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(100.5)),
        Just(json!(1e300)),
        any::<u16>().prop_map(Value::from),
    ]
}

/// Strings a field might hold by mistake: empty, a long one, bad or
/// explosive regexes, names with separators, unknown references, any text.
fn odd_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("x".repeat(70_000)),
        Just("(((a*)*)*)*$".to_owned()),
        Just("[".to_owned()),
        Just("a{99999}{99999}".to_owned()),
        Just("demo/nope".to_owned()),
        Just("/".to_owned()),
        Just("spiffe://".to_owned()),
        Just("::".to_owned()),
        "[ -~]{0,12}",
        any::<String>(),
    ]
}

/// One change to a node of a parsed document, addressed by its index in
/// [`nodes`] order.
#[derive(Clone, Debug)]
enum Mutation {
    /// Keep the node's type, change its value: a string becomes the given
    /// string, a number the given number, a boolean its negation; an array
    /// gets its first element again at its end, or is emptied.
    Tweak(prop::sample::Index, String, Value, bool),
    /// Replace the node with an odd value.
    Replace(prop::sample::Index, Value),
    /// Replace the node with a copy of another node.
    Copy(prop::sample::Index, prop::sample::Index),
    /// Remove the node from its object or array.
    Remove(prop::sample::Index),
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let index = any::<prop::sample::Index>;
    let one = prop_oneof![
        // Mostly changes that keep the document's shape, so that most cases
        // parse and reach `validate()`.
        4 => (index(), odd_string(), odd_number(), any::<bool>())
            .prop_map(|(a, s, n, grow)| Mutation::Tweak(a, s, n, grow)),
        1 => (index(), odd_value()).prop_map(|(a, v)| Mutation::Replace(a, v)),
        1 => (index(), index()).prop_map(|(a, b)| Mutation::Copy(a, b)),
        1 => index().prop_map(Mutation::Remove),
    ];
    proptest::collection::vec(one, 1..=3)
}

/// JSON Pointers of every node of `v`, the root first.
fn nodes(v: &Value) -> Vec<String> {
    fn walk(v: &Value, at: &str, out: &mut Vec<String>) {
        out.push(at.to_owned());
        match v {
            Value::Object(m) => {
                for (k, c) in m {
                    let k = k.replace('~', "~0").replace('/', "~1");
                    walk(c, &format!("{at}/{k}"), out);
                }
            }
            Value::Array(a) => {
                for (i, c) in a.iter().enumerate() {
                    walk(c, &format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, "", &mut out);
    out
}

fn mutate(doc: &mut Value, m: &Mutation) {
    let all = nodes(doc);
    match m {
        Mutation::Tweak(at, text, number, grow) => {
            match doc.pointer_mut(&all[at.index(all.len())]) {
                Some(Value::String(s)) => *s = text.clone(),
                Some(n @ Value::Number(_)) => *n = number.clone(),
                Some(Value::Bool(b)) => *b = !*b,
                Some(Value::Array(a)) if *grow => {
                    if let Some(first) = a.first().cloned() {
                        a.push(first);
                    }
                }
                Some(Value::Array(a)) => a.clear(),
                _ => {}
            }
        }
        Mutation::Replace(at, with) => {
            if let Some(n) = doc.pointer_mut(&all[at.index(all.len())]) {
                *n = with.clone();
            }
        }
        Mutation::Copy(at, from) => {
            let from = doc.pointer(&all[from.index(all.len())]).cloned();
            if let (Some(n), Some(from)) = (doc.pointer_mut(&all[at.index(all.len())]), from) {
                *n = from;
            }
        }
        Mutation::Remove(at) => {
            let path = &all[at.index(all.len())];
            let Some((parent, last)) = path.rsplit_once('/') else {
                return;
            };
            let last = last.replace("~1", "/").replace("~0", "~");
            match doc.pointer_mut(parent) {
                Some(Value::Object(m)) => {
                    m.remove(&last);
                }
                Some(Value::Array(a)) => {
                    if let Ok(i) = last.parse::<usize>() {
                        a.remove(i);
                    }
                }
                _ => {}
            }
        }
    }
}

/// The property every load result must have: an error that says something,
/// or a document that validates and reads back as itself.
fn check_loaded(result: Result<ProxyConfig, LoadError>) -> Result<(), TestCaseError> {
    match result {
        Ok(cfg) => {
            prop_assert!(cfg.validate().is_ok(), "loaded but invalid: {cfg:?}");
            let again = ProxyConfig::load(&cfg.to_json());
            prop_assert!(again.is_ok(), "does not read back: {again:?}");
        }
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    Ok(())
}

proptest! {
    // 256 cases per property (see the module documentation).
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn gzipped_arbitrary_bytes_come_back_and_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..4096),
    ) {
        let back = gunzip(&gzip(&bytes)).expect("a gzip member we wrote");
        prop_assert_eq!(&back, &bytes);
        check_loaded(ProxyConfig::load(&back))?;
    }

    #[test]
    fn truncated_document_is_a_parse_error(cut in any::<prop::sample::Index>()) {
        let json = sample().to_json();
        let cut = cut.index(json.len());
        let err = ProxyConfig::load(&json[..cut]).expect_err("a cut document");
        prop_assert!(matches!(err, LoadError::Parse(_)), "cut at {}: {}", cut, err);
    }

    #[test]
    fn truncated_gzip_never_loads(cut in any::<prop::sample::Index>()) {
        let json = sample().to_json();
        let gz = gzip(&json);
        let cut = cut.index(gz.len());
        match gunzip(&gz[..cut]) {
            Err(e) => prop_assert!(matches!(e, LoadError::Gzip(_)), "cut at {}: {}", cut, e),
            // A reader may hand out what it decoded before the end; it is
            // never the whole document, so it never loads.
            Ok(partial) => {
                prop_assert!(partial.len() < json.len() && json.starts_with(&partial));
                prop_assert!(ProxyConfig::load(&partial).is_err());
            }
        }
    }

    #[test]
    fn flipped_bytes_never_panic(flips in flips()) {
        let json = sample().to_json();
        check_loaded(ProxyConfig::load(&flipped(json, &flips)))?;
    }

    #[test]
    fn flipped_gzip_bytes_load_the_document_or_fail(flips in flips()) {
        let json = sample().to_json();
        let gz = flipped(gzip(&json), &flips);
        match gunzip(&gz) {
            // Header bytes without meaning (time, OS) may change freely; the
            // CRC-32 and length in the trailer catch changed content.
            Ok(bytes) => match ProxyConfig::load(&bytes) {
                Ok(cfg) => prop_assert_eq!(cfg, sample()),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            },
            Err(e) => prop_assert!(matches!(e, LoadError::Gzip(_)), "{}", e),
        }
    }

    // The hash check refuses nearly every mutated document before
    // `validate()` sees it. A writer seals whatever it wrote, so here the
    // document is changed node by node, as a faulty writer might, and
    // resealed: then it must load, or fail validation (or the version
    // check, when the change hit the version), never panic.
    #[test]
    fn resealed_mutations_load_or_fail_validation(mutations in mutations()) {
        let mut doc: Value = serde_json::from_slice(&sample().to_json()).expect("the sample");
        for m in &mutations {
            mutate(&mut doc, m);
        }
        let Ok(mut cfg) = serde_json::from_value::<ProxyConfig>(doc.clone()) else {
            check_loaded(ProxyConfig::load(doc.to_string().as_bytes()))?;
            return Ok(());
        };
        cfg.seal();
        match ProxyConfig::load(&cfg.to_json()) {
            Ok(back) => {
                prop_assert!(back.validate().is_ok());
                prop_assert_eq!(back, cfg);
            }
            Err(LoadError::Invalid(e)) => prop_assert!(!e.to_string().is_empty()),
            Err(LoadError::Version { found }) => prop_assert_ne!(found, FORMAT_VERSION),
            Err(e) => {
                return Err(TestCaseError::fail(format!("a sealed document failed to load: {e}")));
            }
        }
    }
}
