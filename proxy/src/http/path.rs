//! Request paths in one normal form, so that `AccessPolicy` path rules judge
//! the path the app will serve.
//!
//! One resource has many spellings: `/api//admin`, `/api/./admin`,
//! `/api/x/../admin` and `/api/%61dmin` all reach `/api/admin` in most apps.
//! A rule compared with the raw path sees another string, and a Deny is
//! bypassed. So the inbound proxy normalises each request path before it
//! authorizes the request, and forwards the normal form (query unchanged),
//! so app and policy see the same thing:
//!
//! ```text
//! /api/x/..//%61dmin;v=1?q=%2f  ─► decode unreserved, upper-case the other escapes
//!                               ─► merge repeated slashes, remove dot segments
//!   forwarded:   /api/admin;v=1?q=%2f
//!   policy path: /api/admin
//! ```
//!
//! 1. Percent-encodings of unreserved characters (`A-Z a-z 0-9 - . _ ~`)
//!    are decoded; every other one is kept, written with upper-case hex
//!    (RFC 3986 §6.2.2.1–2). Decoding comes first, so `%2E%2E` is `..`.
//! 2. Repeated slashes are merged: `//` is `/`.
//! 3. Dot segments are removed (RFC 3986 §5.2.4); `..` above the root stays
//!    at the root. A path ending in a dot segment keeps its trailing slash
//!    (`/a/b/..` is `/a/`).
//!
//! Refused, because servers disagree on what they mean (the inbound proxy
//! answers 400 `ambiguous-path`, the app never sees the request):
//! - `%2F`, `%5C` and a raw `\`: some apps split segments on them, others
//!   take them as data. With [`EscapedSlashes::Keep`] (the Mesh's
//!   `spec.access.escapedSlashes`) they pass as data of their segment:
//!   `%2F` and `%5C` stay encoded, a raw `\` is written `%5C`, and path
//!   rules match them as data too.
//! - a `%` not followed by two hex digits.
//! - a `.` or `..` segment with `;` parameters (`/api/..;x/admin`), which
//!   climbs in servers that strip parameters first and is a plain name in
//!   the others.
//!
//! Path parameters (`/admin;jsessionid=1`): many servers cut a segment at
//! its first `;` and serve `/admin`; others take `admin;jsessionid=1` as
//! the name. Refusing `;` would break apps that use it, so the proxy
//! forwards parameters unchanged and authorizes on the [policy
//! path](NormalPath::policy): every segment cut at its first `;` (or
//! `%3B`, for apps that decode before they cut), then slashes merged again.
//! A Deny on `/admin` thus refuses `/admin;x` whichever way the app reads
//! it; at worst it also refuses a resource literally named `admin;x`.
//! Rule paths are compared as written, so they should be in normal form
//! and without parameters.
//!
//! `*` (`OPTIONS *`) and the empty path of CONNECT's authority form pass
//! unchanged. Pure: nothing here does I/O or panics, whatever the input.

use http::Uri;
use http::uri::PathAndQuery;
use weft_proxy_config::EscapedSlashes;

/// Why a path is refused; every variant means "ambiguous".
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// `%2F` or `%5C` under [`EscapedSlashes::Reject`].
    #[error(
        "the path holds an encoded {what} ({escape}) at byte {at}, which apps disagree on \
         (a separator or data); send it unencoded, or set the Mesh's \
         spec.access.escapedSlashes to Keep if every app takes it as data"
    )]
    EncodedSlash {
        /// `slash` or `backslash`.
        what: &'static str,
        /// The escape as written in the path.
        escape: String,
        /// Its byte offset in the path.
        at: usize,
    },
    /// A raw `\` under [`EscapedSlashes::Reject`].
    #[error(
        "the path holds a backslash at byte {at}, which some apps read as /; send / or %5C \
         (with the Mesh's spec.access.escapedSlashes set to Keep)"
    )]
    Backslash {
        /// Its byte offset in the path.
        at: usize,
    },
    /// A `%` without two hex digits after it.
    #[error("the path holds a % at byte {at} not followed by two hex digits; encode it as %25")]
    BadEscape {
        /// Its byte offset in the path.
        at: usize,
    },
    /// `.` or `..` with `;` parameters.
    #[error(
        "the path segment {segment:?} is a dot segment with parameters, which climbs in some \
         apps and is a name in others"
    )]
    DotWithParameters {
        /// The segment, parameters included.
        segment: String,
    },
    /// Neither `/…`, `*` nor empty: not a path of a request target.
    #[error("the path starts with neither / nor *")]
    NotAbsolute,
    /// The normal path did not make a URI again (not expected: it holds
    /// only characters of the original path and escapes).
    #[error("the normalised path does not form a URI: {0}")]
    Uri(#[source] http::Error),
}

/// A request path in normal form, with the form path rules are matched on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalPath {
    path: String,
    /// The path without `;` parameters, when it has any.
    policy: Option<String>,
}

impl NormalPath {
    /// The path to forward.
    pub fn as_str(&self) -> &str {
        &self.path
    }

    /// The path authorization decides on: [`Self::as_str`] with each
    /// segment's parameters cut off (see the module doc).
    pub fn policy(&self) -> &str {
        self.policy.as_deref().unwrap_or(&self.path)
    }
}

/// Normalises `path` (the path of a request target, without its query).
pub fn normalize(path: &str, escaped: EscapedSlashes) -> Result<NormalPath, PathError> {
    if path.is_empty() || path == "*" {
        return Ok(NormalPath {
            path: path.to_owned(),
            policy: None,
        });
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let path = merge_and_remove_dots(decode(path, escaped)?);
    let policy = without_parameters(&path)?;
    Ok(NormalPath { path, policy })
}

/// Normalises the path of `uri` and, when that changes it, replaces it in
/// `uri`, keeping scheme, authority and query as they are.
pub fn normalize_uri(uri: &mut Uri, escaped: EscapedSlashes) -> Result<NormalPath, PathError> {
    let normal = normalize(uri.path(), escaped)?;
    if normal.path != uri.path() {
        let path_and_query = match uri.query() {
            Some(q) => format!("{}?{q}", normal.path),
            None => normal.path.clone(),
        };
        let mut parts = uri.clone().into_parts();
        parts.path_and_query =
            Some(PathAndQuery::try_from(path_and_query).map_err(|e| PathError::Uri(e.into()))?);
        *uri = Uri::from_parts(parts).map_err(|e| PathError::Uri(e.into()))?;
    }
    Ok(normal)
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn hex_value(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).map(|d| d as u8)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Step 1: unreserved characters decoded, other escapes upper-cased,
/// slashes and backslashes judged.
fn decode(path: &str, escaped: EscapedSlashes) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    // Bytes between `copied` and `i` are copied as they are. Both only
    // ever stop at ASCII bytes, so the slices fall on char boundaries.
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                out.push_str(&path[copied..i]);
                let digits = bytes
                    .get(i + 1)
                    .copied()
                    .and_then(hex_value)
                    .zip(bytes.get(i + 2).copied().and_then(hex_value));
                let Some((hi, lo)) = digits else {
                    return Err(PathError::BadEscape { at: i });
                };
                let byte = (hi << 4) | lo;
                if is_unreserved(byte) {
                    out.push(char::from(byte));
                } else {
                    if matches!(byte, b'/' | b'\\') && escaped == EscapedSlashes::Reject {
                        return Err(PathError::EncodedSlash {
                            what: if byte == b'/' { "slash" } else { "backslash" },
                            escape: path[i..i + 3].to_owned(),
                            at: i,
                        });
                    }
                    out.push('%');
                    out.push(char::from(HEX[usize::from(hi)]));
                    out.push(char::from(HEX[usize::from(lo)]));
                }
                i += 3;
                copied = i;
            }
            b'\\' => {
                if escaped == EscapedSlashes::Reject {
                    return Err(PathError::Backslash { at: i });
                }
                out.push_str(&path[copied..i]);
                out.push_str("%5C");
                i += 1;
                copied = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&path[copied..]);
    Ok(out)
}

/// Steps 2 and 3 on a path starting with `/`: repeated slashes merged, dot
/// segments removed. The result has no empty, `.` or `..` segment. A path
/// that has none already (most requests) is returned as it is, without
/// copying it.
fn merge_and_remove_dots(path: String) -> String {
    if is_merged_and_dotless(&path) {
        return path;
    }
    let path = path.as_str();
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    let mut segments = path.strip_prefix('/').unwrap_or(path).split('/').peekable();
    while let Some(segment) = segments.next() {
        let dot_or_empty = match segment {
            "" | "." => true,
            ".." => {
                kept.pop();
                true
            }
            name => {
                kept.push(name);
                false
            }
        };
        trailing_slash = dot_or_empty && segments.peek().is_none();
    }
    let mut out = String::with_capacity(path.len());
    for segment in &kept {
        out.push('/');
        out.push_str(segment);
    }
    if kept.is_empty() || trailing_slash {
        out.push('/');
    }
    out
}

/// Whether [`merge_and_remove_dots`] would return `path` unchanged: it
/// starts with `/`, and has no `.` or `..` segment and no empty one but
/// the last (a trailing slash).
fn is_merged_and_dotless(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        match segment {
            "." | ".." => return false,
            "" if segments.peek().is_some() => return false,
            _ => {}
        }
    }
    true
}

/// Where `segment`'s parameters start: its first `;` or `%3B`.
fn parameters_start(segment: &str) -> Option<usize> {
    match (segment.find(';'), segment.find("%3B")) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The policy path of a normal `path`, when it has parameters.
fn without_parameters(path: &str) -> Result<Option<String>, PathError> {
    if !path.contains(';') && !path.contains("%3B") {
        return Ok(None);
    }
    let mut names = String::with_capacity(path.len());
    for segment in path.strip_prefix('/').unwrap_or(path).split('/') {
        let name = parameters_start(segment).map_or(segment, |at| &segment[..at]);
        if name.len() < segment.len() && matches!(name, "." | "..") {
            return Err(PathError::DotWithParameters {
                segment: segment.to_owned(),
            });
        }
        names.push('/');
        names.push_str(name);
    }
    // Only empty segments (`/;x/`) are left to merge: dot segments are
    // gone from `path`, and dots with parameters are refused above.
    Ok(Some(merge_and_remove_dots(names)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn normal(path: &str) -> Result<NormalPath, PathError> {
        normalize(path, EscapedSlashes::Reject)
    }

    /// The forwarded path, or the error's variant name.
    fn forwarded(path: &str) -> String {
        match normal(path) {
            Ok(n) => n.as_str().to_owned(),
            Err(e) => format!("{e:?}")
                .split([' ', '{', '('])
                .next()
                .unwrap_or_default()
                .to_owned(),
        }
    }

    #[test]
    fn a_path_already_normal_is_not_copied() {
        for p in ["/", "/a", "/api/admin", "/api/admin/", "/a/.../b/..c/.d"] {
            let path = p.to_owned();
            let at = path.as_ptr();
            let out = merge_and_remove_dots(path);
            assert_eq!(out, p);
            assert_eq!(out.as_ptr(), at, "{p} was copied");
        }
        for p in ["/a//b", "//", "/a/./b", "/a/..", "/."] {
            assert!(!is_merged_and_dotless(p), "{p}");
        }
    }

    #[test]
    fn repeated_slashes_are_merged() {
        assert_eq!(forwarded("/api//admin"), "/api/admin");
        assert_eq!(forwarded("//admin"), "/admin");
        assert_eq!(forwarded("///"), "/");
        assert_eq!(forwarded("/api/admin//"), "/api/admin/");
    }

    #[test]
    fn dot_segments_are_removed() {
        assert_eq!(forwarded("/api/./admin"), "/api/admin");
        assert_eq!(forwarded("/api/x/../admin"), "/api/admin");
        assert_eq!(forwarded("/api/../admin"), "/admin");
        assert_eq!(forwarded("/../../admin"), "/admin");
        assert_eq!(forwarded("/a/b/.."), "/a/");
        assert_eq!(forwarded("/a/b/."), "/a/b/");
        assert_eq!(forwarded("/.."), "/");
        // Names that merely contain dots stay.
        assert_eq!(forwarded("/a/.../b/..c/.d"), "/a/.../b/..c/.d");
    }

    #[test]
    fn unreserved_escapes_are_decoded_before_dot_segments_are_removed() {
        assert_eq!(forwarded("/%61dmin"), "/admin");
        assert_eq!(forwarded("/api/%41%7a%30%2d%2E%5f%7E"), "/api/Az0-._~");
        assert_eq!(forwarded("/api/x/%2e%2E/admin"), "/api/admin");
        assert_eq!(forwarded("/api/%2e/admin"), "/api/admin");
    }

    #[test]
    fn other_escapes_stay_with_upper_case_hex() {
        assert_eq!(forwarded("/caf%c3%a9"), "/caf%C3%A9");
        assert_eq!(forwarded("/a%20b%3a%40%25"), "/a%20b%3A%40%25");
        // `%25` is `%` as data: never decoded twice.
        assert_eq!(forwarded("/%2561dmin"), "/%2561dmin");
        // Raw characters other than `\` are left as they are.
        assert_eq!(forwarded("/café/{x}"), "/café/{x}");
    }

    #[test]
    fn encoded_slashes_and_backslashes_are_refused_by_default() {
        for path in [
            "/api/admin%2F",
            "/api%2Fadmin",
            "/api%2fadmin",
            "/api%5Cadmin",
            "/api%5cadmin",
        ] {
            assert_eq!(forwarded(path), "EncodedSlash", "{path}");
        }
        assert_eq!(forwarded("/api\\admin"), "Backslash");
        assert_eq!(forwarded("\\"), "NotAbsolute");
        let e = normal("/api%2Fadmin").expect_err("refused");
        assert!(e.to_string().contains("escapedSlashes"), "{e}");
    }

    #[test]
    fn keep_passes_slashes_as_data_of_their_segment() {
        let keep = |p| normalize(p, EscapedSlashes::Keep).map(|n| n.as_str().to_owned());
        assert_eq!(keep("/api%2fadmin").ok().as_deref(), Some("/api%2Fadmin"));
        assert_eq!(keep("/api/admin%2F").ok().as_deref(), Some("/api/admin%2F"));
        assert_eq!(keep("/api%5cadmin").ok().as_deref(), Some("/api%5Cadmin"));
        assert_eq!(keep("/api\\admin").ok().as_deref(), Some("/api%5Cadmin"));
        // `..` next to an encoded slash is still a dot segment of its own.
        assert_eq!(keep("/a/..%2F/b").ok().as_deref(), Some("/a/..%2F/b"));
        assert_eq!(keep("/a/x/../%2F").ok().as_deref(), Some("/a/%2F"));
    }

    #[test]
    fn malformed_escapes_are_refused() {
        for path in ["/a%", "/a%2", "/a%zz", "/a%2g", "/a%é", "/%%41"] {
            assert_eq!(forwarded(path), "BadEscape", "{path}");
        }
    }

    #[test]
    fn parameters_are_forwarded_and_cut_for_the_policy() {
        let n = normal("/api/admin;x").expect("normal");
        assert_eq!((n.as_str(), n.policy()), ("/api/admin;x", "/api/admin"));
        let n = normal("/api;v=1/admin;jsessionid=2/").expect("normal");
        assert_eq!(n.policy(), "/api/admin/");
        // Encoded `;` cuts too, for apps that decode before they cut.
        let n = normal("/api/admin%3bx").expect("normal");
        assert_eq!((n.as_str(), n.policy()), ("/api/admin%3Bx", "/api/admin"));
        // A segment that is only parameters leaves no empty segment behind.
        let n = normal("/api/;x/admin").expect("normal");
        assert_eq!(n.policy(), "/api/admin");
        assert_eq!(normal("/;x").expect("normal").policy(), "/");
        // No parameters: one path for both.
        let n = normal("/api/admin").expect("normal");
        assert_eq!(n.policy(), n.as_str());
    }

    #[test]
    fn dot_segments_with_parameters_are_refused() {
        for path in [
            "/api/..;x/admin",
            "/api/.;x/admin",
            "/..;/a",
            "/a/%2e%2e%3b/b",
        ] {
            assert_eq!(forwarded(path), "DotWithParameters", "{path}");
        }
        // Dot segments without parameters were removed before the cut.
        let n = normal("/api/public;x/../../admin").expect("normal");
        assert_eq!(n.policy(), "/admin");
    }

    #[test]
    fn asterisk_and_authority_forms_pass_unchanged() {
        assert_eq!(forwarded("*"), "*");
        assert_eq!(forwarded(""), "");
        assert_eq!(forwarded("a/b"), "NotAbsolute");
    }

    #[test]
    fn uri_keeps_scheme_authority_and_query() {
        let mut uri: Uri = "http://echo:80/api/./x/../%61dmin?q=%2F/../a&b"
            .parse()
            .expect("uri");
        let n = normalize_uri(&mut uri, EscapedSlashes::Reject).expect("normal");
        assert_eq!(n.as_str(), "/api/admin");
        assert_eq!(uri.to_string(), "http://echo:80/api/admin?q=%2F/../a&b");
        let mut uri: Uri = "/a//b?".parse().expect("uri");
        normalize_uri(&mut uri, EscapedSlashes::Reject).expect("normal");
        assert_eq!(uri.to_string(), "/a/b?");
        let mut uri: Uri = "/already/normal".parse().expect("uri");
        normalize_uri(&mut uri, EscapedSlashes::Reject).expect("normal");
        assert_eq!(uri.to_string(), "/already/normal");
    }

    /// Paths built from the pieces that matter to the normaliser.
    fn tricky_path() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/"),
            Just("."),
            Just(".."),
            Just(";"),
            Just("%"),
            Just("%2e"),
            Just("%2F"),
            Just("%5c"),
            Just("%3B"),
            Just("%41"),
            Just("%c3%a9"),
            Just("\\"),
            Just("a"),
            Just("é"),
            Just("~"),
        ];
        prop::collection::vec(piece, 0..24).prop_map(|p| p.concat())
    }

    fn any_path() -> impl Strategy<Value = String> {
        prop_oneof![
            tricky_path(),
            tricky_path().prop_map(|p| format!("/{p}")),
            any::<String>(),
            any::<String>().prop_map(|p| format!("/{p}")),
        ]
    }

    fn escaped() -> impl Strategy<Value = EscapedSlashes> {
        prop_oneof![Just(EscapedSlashes::Reject), Just(EscapedSlashes::Keep)]
    }

    fn has_no_merge_or_dot_segment(p: &str) -> bool {
        p == "*"
            || p.is_empty()
            || (p.starts_with('/')
                && !p.contains("//")
                && !p.contains("/./")
                && !p.contains("/../")
                && !p.ends_with("/.")
                && !p.ends_with("/.."))
    }

    proptest! {
        #[test]
        fn normalizing_never_panics_is_idempotent_and_leaves_no_dot_segment(
            path in any_path(),
            escaped in escaped(),
        ) {
            let Ok(n) = normalize(&path, escaped) else {
                return Ok(());
            };
            prop_assert!(has_no_merge_or_dot_segment(n.as_str()), "{:?} -> {:?}", path, n);
            prop_assert!(has_no_merge_or_dot_segment(n.policy()), "{:?} -> {:?}", path, n);
            let again = normalize(n.as_str(), escaped);
            prop_assert_eq!(again.as_ref().ok(), Some(&n), "{:?}", again);
            let policy = normalize(n.policy(), escaped);
            prop_assert_eq!(
                policy.as_ref().ok().map(|p| (p.as_str(), p.policy())),
                Some((n.policy(), n.policy()))
            );
        }

        #[test]
        fn normalizing_a_uri_never_panics(path in any_path(), escaped in escaped()) {
            if let Ok(mut uri) = path.parse::<Uri>() {
                let _ = normalize_uri(&mut uri, escaped);
            }
        }
    }
}
