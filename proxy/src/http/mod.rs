//! HTTP plumbing shared by both directions: body type, RFC 9110 hop-by-hop
//! header handling, error responses that name the failed step, connection
//! pools per endpoint ([`pool`]), request forwarding with upgrades
//! ([`forward`]), the server side of client connections with their
//! limits on request heads ([`server`]: weft's own HTTP/1 server, [`h1`],
//! and hyper's HTTP/2 server), both sides of the multiplexed hop between
//! two weft proxies on h2 directly ([`mux`], [`stream`]), and the
//! normal form of request paths that inbound authorization decides on
//! ([`path`]).

pub mod form;
pub mod forward;
pub mod h1;
pub mod mux;
pub mod path;
pub mod pool;
pub mod server;
pub mod stream;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};

/// Boxed error of bodies crossing the proxy.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type the proxy sends in both directions.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A send failed; `request` is handed back when it was not sent at all, so
/// it may be retried on a fresh connection.
#[derive(Debug)]
pub struct SendFailed {
    /// The failure.
    pub error: BoxError,
    /// The untouched request, when it never left.
    pub request: Option<http::Request<Body>>,
}

/// A request body as a server connection received it: from hyper (HTTP/2),
/// from weft's HTTP/1 server ([`h1`]) or from a peer proxy's multiplexed
/// connection ([`mux`], [`stream`]).
#[derive(Debug)]
pub enum ReqBody {
    Hyper(hyper::body::Incoming),
    H1(h1::body::RecvBody),
    /// A stream of a multiplexed connection from a peer proxy ([`mux`]).
    Mux(stream::RecvBody),
}

impl http_body::Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Hyper(b) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            ReqBody::H1(b) => std::pin::Pin::new(b).poll_frame(cx),
            ReqBody::Mux(b) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Hyper(b) => b.is_end_stream(),
            ReqBody::H1(b) => b.is_end_stream(),
            ReqBody::Mux(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            ReqBody::Hyper(b) => b.size_hint(),
            ReqBody::H1(b) => b.size_hint(),
            ReqBody::Mux(b) => b.size_hint(),
        }
    }
}

/// Response header naming the step that failed.
pub const ERROR_HEADER: &str = "x-weft-error";
/// Request header carrying the verified peer identity to the app.
pub const PEER_IDENTITY_HEADER: &str = "x-weft-peer-identity";
/// How a request ended, for the traffic metrics: status, gRPC status of
/// the head, the failed step a proxy named.
pub fn outcome<B>(resp: &http::Response<B>, grpc: bool) -> crate::metrics::traffic::Outcome {
    use crate::metrics::traffic::{Outcome, failed_step, grpc_status};
    Outcome {
        code: resp.status().as_u16(),
        grpc,
        grpc_status: grpc_status(resp.headers()),
        failed_step: resp
            .headers()
            .get(ERROR_NAME)
            .map(|v| failed_step(v.as_bytes())),
    }
}

/// The declared length of a message's body (0 when not declared).
pub fn content_length(h: &http::HeaderMap) -> u64 {
    h.get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Request header a client proxy sends a peer proxy over mTLS naming the
/// calling workload (`workload=…;app=…;version=…`), for the server side's
/// traffic metrics. A server proxy reads it only from a verified peer and
/// removes it before the app; a client proxy removes an app's own.
pub const SOURCE_HEADER: &str = "x-weft-source";

/// The request id header: added by the client proxy when a request has
/// none, kept when it has one, logged by both proxies.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

// The names above as `HeaderName`s: a map looks a `&str` up by parsing and
// checking it first, a `HeaderName` only by its hash.
/// [`ERROR_HEADER`].
pub const ERROR_NAME: HeaderName = HeaderName::from_static(ERROR_HEADER);
/// [`SOURCE_HEADER`].
pub const SOURCE_NAME: HeaderName = HeaderName::from_static(SOURCE_HEADER);
/// [`REQUEST_ID_HEADER`].
pub const REQUEST_ID_NAME: HeaderName = HeaderName::from_static(REQUEST_ID_HEADER);

/// Marks the fields whose values are new on every request (the request
/// id, the W3C trace context) to go to an HTTP/2 peer as never-indexed
/// literals. Indexed, each would be a new entry in both ends' HPACK tables
/// on every request: looked for among the earlier ones' values and
/// inserted by the sender, inserted by the receiver, and evicting entries
/// that do repeat.
pub fn never_indexed(headers: &mut HeaderMap) {
    for name in [REQUEST_ID_NAME, crate::trace::context::TRACEPARENT] {
        if let Some(v) = headers.get_mut(&name) {
            v.set_sensitive(true);
        }
    }
}

/// The client's request body failed while the proxy read it (a malformed
/// chunk, a body cut short): the client's fault, not the upstream's.
#[derive(Debug, thiserror::Error)]
#[error("reading the client's request body: {}", chain(.0.as_ref()))]
pub struct ClientBodyError(#[source] BoxError);

/// `error` and its sources, `: ` between them.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        text.push_str(": ");
        text.push_str(&e.to_string());
        next = e.source();
    }
    text
}

/// What failed in the client's request body, when that is why `error`
/// ended a request: the [`ClientBodyError`] among `error` and its sources,
/// or, on an HTTP/2 upstream connection, the stream this side reset with
/// `INTERNAL_ERROR`, which hyper does when the body it sends fails (the
/// body's own error is then logged, not returned).
pub fn client_body_error(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<ClientBodyError>() {
            return Some(found.to_string());
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>()
            && h2.is_reset()
            && !h2.is_remote()
            && !h2.is_library()
            && h2.reason() == Some(h2::Reason::INTERNAL_ERROR)
        {
            return Some("the request body failed while it was sent upstream".to_owned());
        }
        next = e.source();
    }
    None
}

/// 400 `bad-request`, closing the connection: what the proxy answers a
/// request it will not forward because of its framing.
pub fn bad_request(message: &str) -> Response<Body> {
    let mut resp = error_response(StatusCode::BAD_REQUEST, "bad-request", message);
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Wraps a hyper body.
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A full body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    boxed(Full::new(bytes.into()))
}

/// A failure response: `status`, header `x-weft-error: <step>`, and the
/// operator-facing message as the body.
pub fn error_response(status: StatusCode, step: &str, message: &str) -> Response<Body> {
    let mut resp = Response::new(full(format!("weft-proxy: {step}: {message}\n")));
    *resp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(step) {
        resp.headers_mut().insert(ERROR_HEADER, v);
    }
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Whether `headers` ask for a protocol upgrade (`Connection: upgrade` + `Upgrade`).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Removes hop-by-hop fields (RFC 9110 §7.6.1): `Connection` and every field
/// it names, plus the fixed list. With `keep_upgrade`, `Connection: upgrade`
/// and `Upgrade` survive, because an upgrade is forwarded end to end. `TE:
/// trailers` survives (gRPC needs it), and so does `Trailer`: it is an
/// end-to-end field naming the trailer fields to come, without which an
/// HTTP/1.1 hop drops them.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    // The common case: none of them is present; one pass over the names
    // instead of a lookup (and removal) per field.
    let any = headers.keys().any(|k| {
        k == header::CONNECTION
            || k == header::TE
            || k == header::UPGRADE
            || k == header::TRANSFER_ENCODING
            || k == KEEP_ALIVE
            || k == PROXY_CONNECTION
    });
    if !any {
        if keep_upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if keep_upgrade && name == header::UPGRADE {
            continue;
        }
        headers.remove(&name);
    }
    for name in [KEEP_ALIVE, PROXY_CONNECTION, header::TRANSFER_ENCODING] {
        headers.remove(name);
    }
    let te_trailers = headers.get(header::TE).is_some_and(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    headers.remove(header::CONNECTION);
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_fields_and_the_ones_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("gzip, trailers"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("host", HeaderValue::from_static("svc"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-private").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("connection").is_none());
        assert!(h.get("upgrade").is_none());
        assert_eq!(h.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
        assert_eq!(h.get("host").map(|v| v.as_bytes()), Some(&b"svc"[..]));
    }

    #[test]
    fn end_to_end_fields_pass_untouched() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("svc"));
        h.insert("x-request-id", HeaderValue::from_static("7"));
        h.insert("trailer", HeaderValue::from_static("x-checksum"));
        h.append("accept", HeaderValue::from_static("a"));
        h.append("accept", HeaderValue::from_static("b"));
        let before = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(
            h.get("connection").map(|v| v.as_bytes()),
            Some(&b"upgrade"[..])
        );
        assert_eq!(h.len(), before.len() + 1);
    }

    #[test]
    fn upgrade_survives_when_kept() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(
            h.get("upgrade").map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        assert!(wants_upgrade(&h));
    }
}
