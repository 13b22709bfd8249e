//! The form of a request head per HTTP version: HTTP/1.1 in origin form
//! with a `Host` field, HTTP/2 in absolute form with the authority in the
//! URI and no `Host`. Used when a request is prepared for its upstream and
//! when HTTP/1.1 crosses a proxy-to-proxy HTTP/2 connection and back. The
//! bottom of `http`: imports nothing of weft.

use http::header::{self, HeaderValue};
use http::uri::{Authority, Scheme, Uri};
use http::{Method, Request};

/// Puts a request head in the form `version` (HTTP/1.1 or HTTP/2) sends.
/// A head already in that form keeps its fields; its URI is rebuilt only
/// when it is in the other form.
pub fn set_form(parts: &mut http::request::Parts, version: http::Version) {
    let is_connect = parts.method == Method::CONNECT;
    // Parsing `Host` copies it: done only where the authority is needed.
    let authority = |parts: &http::request::Parts| -> Option<Authority> {
        parts.uri.authority().cloned().or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.parse().ok())
        })
    };
    if version == http::Version::HTTP_2 {
        if !is_connect && let Some(a) = authority(parts) {
            let mut b = Uri::builder()
                .scheme(parts.uri.scheme().cloned().unwrap_or(Scheme::HTTP))
                .authority(a);
            if let Some(pq) = parts.uri.path_and_query() {
                b = b.path_and_query(pq.clone());
            }
            if let Ok(uri) = b.build() {
                parts.uri = uri;
                parts.headers.remove(header::HOST);
            }
        }
        parts.version = http::Version::HTTP_2;
    } else {
        if parts.headers.get(header::HOST).is_none()
            && let Some(a) = parts.uri.authority()
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            parts.headers.insert(header::HOST, v);
        }
        // Origin form (`/path?query`, what clients send to a server) is
        // kept as is; only absolute form is cut down to it.
        if !is_connect && (parts.uri.scheme().is_some() || parts.uri.authority().is_some()) {
            // The path and query are shared, not copied.
            let mut origin = http::uri::Parts::default();
            origin.path_and_query = Some(
                parts
                    .uri
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
            );
            if let Ok(uri) = Uri::from_parts(origin) {
                parts.uri = uri;
            }
        }
        parts.version = http::Version::HTTP_11;
    }
}

/// [`set_form`] on a whole request.
pub fn into_form<B>(req: Request<B>, version: http::Version) -> Request<B> {
    let (mut parts, body) = req.into_parts();
    set_form(&mut parts, version);
    Request::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http1_crosses_http2_and_comes_back_as_it_was() {
        let req = Request::post("/a/b?c=d")
            .header("host", "echo.shop:8080")
            .header("x-id", "7")
            .body(())
            .expect("request");
        let h2 = into_form(req, http::Version::HTTP_2);
        assert_eq!(h2.uri().to_string(), "http://echo.shop:8080/a/b?c=d");
        assert!(h2.headers().get("host").is_none());
        assert_eq!(h2.version(), http::Version::HTTP_2);
        let back = into_form(h2, http::Version::HTTP_11);
        assert_eq!(back.uri().to_string(), "/a/b?c=d");
        assert_eq!(back.headers()["host"], "echo.shop:8080");
        assert_eq!(back.headers()["x-id"], "7");
        assert_eq!(back.version(), http::Version::HTTP_11);
        assert_eq!(back.method(), Method::POST);
    }

    #[test]
    fn connect_keeps_its_authority_form() {
        let req = Request::connect("db.shop:5432").body(()).expect("request");
        let h1 = into_form(req, http::Version::HTTP_11);
        assert_eq!(h1.uri().to_string(), "db.shop:5432");
        assert_eq!(h1.headers()["host"], "db.shop:5432");
    }
}
