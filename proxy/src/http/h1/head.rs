//! Request heads in, response heads out: parsing with `httparse` into an
//! `http::Request` whose URI and header values share the bytes read, the
//! framing of its body, and the encoding of the response's head with the
//! framing of its body.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, StatusCode, Version};

use super::body::Framing;

/// Most header fields in a request head (as hyper).
const MAX_HEADERS: usize = 100;
// `parse` keeps the fields' offsets in room for 128 without allocating.
const _: () = assert!(MAX_HEADERS <= 128);
/// Longest request target.
const MAX_URI_LEN: usize = (u16::MAX - 1) as usize;

/// Why a request head was refused.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refused {
    /// Over the head size limit or the field count: 431.
    TooLarge,
    /// A request target over [`MAX_URI_LEN`]: 414.
    UriTooLong,
    /// Not a valid HTTP/1 request head: 400.
    Malformed(&'static str),
}

/// A parsed request head and what the connection needs to know of it.
#[derive(Debug)]
pub(super) struct Head {
    pub request: Request<()>,
    pub framing: Framing,
    /// Both `Content-Length` and `Transfer-Encoding` (refused, RFC 9112
    /// §6.1: they are how two parsers are made to disagree on where a
    /// request ends).
    pub ambiguous: bool,
    pub keep_alive: bool,
    pub expect_continue: bool,
    /// `CONNECT`, or `Upgrade` on HTTP/1.1.
    pub upgrade: bool,
    /// `TE: trailers`: the client takes trailer fields.
    pub te_trailers: bool,
}

/// Where one field of the head lies in the buffer.
#[derive(Clone, Copy)]
struct Field {
    name: (usize, usize),
    value: (usize, usize),
}

/// Offset of `part` within `whole` (a sub-slice of it).
fn offset(whole: &[u8], part: &[u8]) -> (usize, usize) {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    (start, start + part.len())
}

/// Parses the request head at the start of `buf`. `Ok(None)`: incomplete.
/// On success the head's bytes are taken out of `buf`.
pub(super) fn parse(buf: &mut BytesMut, max_head: usize) -> Result<Option<Head>, Refused> {
    // Neither array is zeroed first: at 100 fields of 32 bytes each, that
    // was 6 KB of stores for every request head, most heads having a
    // handful of fields. The offsets' room holds the most fields a head
    // may have (past `MAX_HEADERS` httparse refuses it), so it never
    // spills to the heap.
    let mut fields = smallvec::SmallVec::<[Field; 128]>::new();
    let (len, method, path, minor) = {
        let mut headers =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let len = match req.parse_with_uninit_headers(buf, &mut headers) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                return if buf.len() > max_head {
                    Err(Refused::TooLarge)
                } else {
                    Ok(None)
                };
            }
            Err(httparse::Error::TooManyHeaders) => return Err(Refused::TooLarge),
            Err(e) => return Err(Refused::Malformed(parse_error(e))),
        };
        if len > max_head {
            return Err(Refused::TooLarge);
        }
        let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
            return Err(Refused::Malformed("incomplete request line"));
        };
        if path.len() > MAX_URI_LEN {
            return Err(Refused::UriTooLong);
        }
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| Refused::Malformed("invalid method"))?;
        fields.extend(req.headers.iter().map(|h| Field {
            name: offset(buf, h.name.as_bytes()),
            value: offset(buf, h.value),
        }));
        (len, method, offset(buf, path.as_bytes()), minor)
    };
    let count = fields.len();
    let head = buf.split_to(len).freeze();
    let uri = http::Uri::from_maybe_shared(head.slice(path.0..path.1))
        .map_err(|_| Refused::Malformed("invalid request target"))?;
    let http11 = minor == 1;

    // Room for the fields the proxy adds on the way (request id, source,
    // trace context) without growing the map.
    let mut headers = HeaderMap::with_capacity(count + 4);
    let mut framing = Framing::Empty;
    let mut keep_alive = http11;
    let mut close = false;
    let mut expect_continue = false;
    let mut te_trailers = false;
    let mut upgrade = method == Method::CONNECT;
    let (mut te, mut te_chunked, mut cl) = (false, false, None::<u64>);
    for f in &fields {
        let name = HeaderName::from_bytes(&head[f.name.0..f.name.1])
            .map_err(|_| Refused::Malformed("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(f.value.0..f.value.1))
            .map_err(|_| Refused::Malformed("invalid header value"))?;
        match name {
            header::TRANSFER_ENCODING => {
                if !http11 {
                    return Err(Refused::Malformed(
                        "Transfer-Encoding in an HTTP/1.0 request",
                    ));
                }
                te = true;
                te_chunked = last_token_is(&value, "chunked");
            }
            header::CONTENT_LENGTH => {
                let n =
                    content_length(&value).ok_or(Refused::Malformed("invalid Content-Length"))?;
                if cl.is_some_and(|m| m != n) {
                    return Err(Refused::Malformed("differing Content-Length values"));
                }
                cl = Some(n);
            }
            header::CONNECTION => {
                if close || has_token(&value, "close") {
                    close = true;
                    keep_alive = false;
                } else if !http11 && has_token(&value, "keep-alive") {
                    keep_alive = true;
                }
            }
            header::EXPECT => {
                expect_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
            }
            header::UPGRADE => upgrade = http11,
            header::TE => te_trailers |= has_token(&value, "trailers"),
            _ => {}
        }
        headers.append(name, value);
    }
    if te && !te_chunked {
        return Err(Refused::Malformed(
            "Transfer-Encoding whose last coding is not chunked",
        ));
    }
    let ambiguous = te && cl.is_some();
    if te {
        framing = Framing::Chunked;
    } else if let Some(n) = cl {
        framing = Framing::Length(n);
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = if http11 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    *request.headers_mut() = headers;
    // An expectation is for a body: none, or an HTTP/1.0 client, and it is
    // ignored (RFC 9110 §10.1.1).
    let has_body = !matches!(framing, Framing::Empty | Framing::Length(0));
    Ok(Some(Head {
        request,
        framing,
        ambiguous,
        keep_alive: keep_alive && !ambiguous,
        expect_continue: expect_continue && has_body && http11,
        upgrade,
        te_trailers,
    }))
}

/// A parsed response head and what the client connection needs to know of
/// it.
#[derive(Debug)]
pub(super) struct ResponseHead {
    pub response: http::Response<()>,
    pub framing: Framing,
    /// The connection may carry another request after this response.
    pub keep_alive: bool,
}

/// Parses the response head at the start of `buf` to a request whose
/// method was `HEAD` (`head`) or `CONNECT` (`connect`). `Ok(None)`:
/// incomplete. On success the head's bytes are taken out of `buf`.
pub(super) fn parse_response(
    buf: &mut BytesMut,
    max_head: usize,
    head: bool,
    connect: bool,
) -> Result<Option<ResponseHead>, &'static str> {
    // As `parse`: neither array is zeroed first.
    let mut fields = smallvec::SmallVec::<[Field; 128]>::new();
    let (len, code, minor) = {
        let mut headers =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            buf,
            &mut headers,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() > max_head => {
                return Err("response head too large");
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(parse_error(e)),
        };
        if len > max_head {
            return Err("response head too large");
        }
        let (Some(code), Some(minor)) = (resp.code, resp.version) else {
            return Err("incomplete status line");
        };
        fields.extend(resp.headers.iter().map(|h| Field {
            name: offset(buf, h.name.as_bytes()),
            value: offset(buf, h.value),
        }));
        (len, code, minor)
    };
    let bytes = buf.split_to(len).freeze();
    let status = StatusCode::from_u16(code).map_err(|_| "invalid status code")?;
    let http11 = minor == 1;
    let mut headers = HeaderMap::with_capacity(fields.len() + 2);
    let mut keep_alive = http11;
    let (mut te, mut te_chunked, mut cl) = (false, false, None::<u64>);
    for f in &fields {
        let name = HeaderName::from_bytes(&bytes[f.name.0..f.name.1])
            .map_err(|_| "invalid header name")?;
        let value = HeaderValue::from_maybe_shared(bytes.slice(f.value.0..f.value.1))
            .map_err(|_| "invalid header value")?;
        match name {
            header::TRANSFER_ENCODING => {
                te = true;
                te_chunked = last_token_is(&value, "chunked");
            }
            header::CONTENT_LENGTH => {
                let n = content_length(&value).ok_or("invalid Content-Length")?;
                if cl.is_some_and(|m| m != n) {
                    return Err("differing Content-Length values");
                }
                cl = Some(n);
            }
            header::CONNECTION => {
                if has_token(&value, "close") {
                    keep_alive = false;
                } else if !http11 && has_token(&value, "keep-alive") {
                    keep_alive = true;
                }
            }
            _ => {}
        }
        headers.append(name, value);
    }
    // RFC 9112 §6.3, in its order.
    let framing = if head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || (connect && status.is_success())
    {
        Framing::Empty
    } else if te {
        // Transfer-Encoding wins over a length, and such a response
        // leaves the connection unusable (it may have been made to
        // disagree with some other parser on where it ends).
        if cl.is_some() {
            keep_alive = false;
        }
        if te_chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else if let Some(n) = cl {
        Framing::Length(n)
    } else {
        Framing::Close
    };
    if framing == Framing::Close {
        keep_alive = false;
    }
    let mut response = http::Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = if http11 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    *response.headers_mut() = headers;
    Ok(Some(ResponseHead {
        response,
        framing,
        keep_alive,
    }))
}

/// About the bytes [`encode_request`] writes for `parts`.
pub(super) fn request_size(parts: &http::request::Parts) -> usize {
    // The authority goes in the request line (CONNECT) or in `Host`.
    let authority = parts.uri.authority().map_or(0, |a| a.as_str().len());
    let target = parts.uri.path_and_query().map_or(1, |p| p.as_str().len());
    size(&parts.headers) + authority + target
}

/// Writes the head of a request (`parts`, in HTTP/1.1 or HTTP/2 form: a
/// URI with an authority and no `Host` gets a `Host` from it), its body's
/// length being `length` when known; returns how its body is framed.
/// Framing fields are the client's to set: a `Content-Length` the request
/// carries is kept when the body's length is not known otherwise,
/// `Transfer-Encoding` is chosen here.
pub(super) fn encode_request(
    parts: &http::request::Parts,
    length: Option<u64>,
    dst: &mut BytesMut,
) -> Out {
    let connect = parts.method == Method::CONNECT;
    let authority = parts.uri.authority();
    dst.put_slice(parts.method.as_str().as_bytes());
    dst.put_u8(b' ');
    match (connect, authority, parts.uri.path_and_query()) {
        (true, Some(a), _) => dst.put_slice(a.as_str().as_bytes()),
        (_, _, Some(pq)) => dst.put_slice(pq.as_str().as_bytes()),
        _ => dst.put_u8(b'/'),
    }
    dst.put_slice(b" HTTP/1.1\r\n");
    if let Some(a) = authority
        && !parts.headers.contains_key(header::HOST)
    {
        dst.put_slice(b"host: ");
        dst.put_slice(a.as_str().as_bytes());
        dst.put_slice(b"\r\n");
    }
    let mut declared = None::<u64>;
    for (name, value) in &parts.headers {
        match *name {
            header::CONTENT_LENGTH => {
                if declared.is_none() {
                    declared = content_length(value);
                }
                continue;
            }
            header::TRANSFER_ENCODING => continue,
            _ => {}
        }
        dst.put_slice(name.as_str().as_bytes());
        dst.put_slice(b": ");
        dst.put_slice(value.as_bytes());
        dst.put_slice(b"\r\n");
    }
    let out = if connect {
        Out::Length(0)
    } else {
        match (length, declared) {
            // An empty body says so only where a body means something.
            (Some(0), None) if !has_payload(&parts.method) => Out::Length(0),
            (Some(n), _) | (None, Some(n)) => {
                put_length(dst, n);
                Out::Length(n)
            }
            (None, None) => {
                dst.put_slice(b"transfer-encoding: chunked\r\n");
                Out::Chunked
            }
        }
    };
    dst.put_slice(b"\r\n");
    out
}

/// Whether a request with this method means something by a body, so an
/// empty one is worth a `content-length: 0`.
pub fn has_payload(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
    )
}

fn parse_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token in the request line",
        httparse::Error::Version => "invalid HTTP version",
        httparse::Error::TooManyHeaders => "too many header fields",
    }
}

fn content_length(v: &HeaderValue) -> Option<u64> {
    // Digits only (no sign, no blanks inside): what a length is.
    let b = v.as_bytes();
    if b.is_empty() || b.len() > 19 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

fn tokens(v: &HeaderValue) -> impl DoubleEndedIterator<Item = &[u8]> {
    v.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

fn has_token(v: &HeaderValue, token: &str) -> bool {
    tokens(v).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

fn last_token_is(v: &HeaderValue, token: &str) -> bool {
    tokens(v)
        .next_back()
        .is_some_and(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// The framing of a response body on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Out {
    /// Exactly this many bytes (0: none, also when the message cannot
    /// have a body: HEAD, 1xx, 204, 304, a tunnel's 2xx).
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, length unknown).
    Close,
}

/// What the request said that shapes the response's head.
#[derive(Clone, Copy, Debug)]
pub(super) struct Asked {
    pub head: bool,
    pub connect: bool,
    pub http10: bool,
    pub keep_alive: bool,
    /// The client takes trailer fields (`TE: trailers`).
    pub trailers: bool,
}

/// The encoded response head's consequences.
#[derive(Debug)]
pub(super) struct Encoded {
    pub out: Out,
    pub keep_alive: bool,
    /// Trailer fields the response declared (`Trailer`): only those are
    /// sent, and only with chunked framing.
    pub trailers: Option<Vec<HeaderName>>,
}

/// Writes the head of a response with `status` and `headers` to a request
/// as `asked`, its body's length being `length` when known. Framing fields
/// are the proxy's to set: `Content-Length` is kept when the body may have
/// one, `Transfer-Encoding` is chosen here.
/// About the bytes [`encode`] writes for a head with `headers`: the
/// fields as they are, and room for the status line and what the server
/// adds (`date`, `content-length`, `connection`).
pub(super) fn size(headers: &HeaderMap) -> usize {
    let fields: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    fields + 128
}

pub(super) fn encode(
    status: StatusCode,
    headers: &HeaderMap,
    length: Option<u64>,
    asked: Asked,
    dst: &mut BytesMut,
) -> Encoded {
    let informational = status.is_informational();
    let tunnel = asked.connect && status.is_success();
    let no_body = asked.head
        || informational
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || tunnel;
    let may_have_length = !(informational || status == StatusCode::NO_CONTENT || tunnel);

    dst.reserve(size(headers));
    dst.put_slice(if asked.http10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    dst.put_slice(status.as_str().as_bytes());
    dst.put_u8(b' ');
    dst.put_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    dst.put_slice(b"\r\n");

    let mut keep_alive = asked.keep_alive;
    let mut declared = None::<u64>;
    let (mut date, mut connection_close, mut connection_keep_alive) = (false, false, false);
    let mut trailers: Option<Vec<HeaderName>> = None;
    for (name, value) in headers {
        match *name {
            header::CONTENT_LENGTH => {
                if !may_have_length {
                    continue;
                }
                let n = content_length(value);
                if declared.is_some() || n.is_none() {
                    // One valid length or none: a second or a broken one
                    // would make the client frame it otherwise.
                    continue;
                }
                declared = n;
            }
            header::TRANSFER_ENCODING => continue,
            header::CONNECTION => {
                connection_close |= has_token(value, "close");
                connection_keep_alive |= has_token(value, "keep-alive");
            }
            header::DATE => date = true,
            header::TRAILER => {
                let names = tokens(value).filter_map(|t| HeaderName::from_bytes(t).ok());
                trailers.get_or_insert_default().extend(names);
            }
            _ => {}
        }
        dst.put_slice(name.as_str().as_bytes());
        dst.put_slice(b": ");
        dst.put_slice(value.as_bytes());
        dst.put_slice(b"\r\n");
    }
    if connection_close {
        keep_alive = false;
    }

    let out = if no_body {
        if declared.is_none()
            && length.is_some()
            && may_have_length
            && !asked.head
            && !informational
            && status != StatusCode::NOT_MODIFIED
        {
            put_length(dst, 0);
        }
        Out::Length(0)
    } else if let Some(n) = declared {
        Out::Length(n)
    } else if let Some(n) = length {
        put_length(dst, n);
        Out::Length(n)
    } else if asked.http10 {
        keep_alive = false;
        Out::Close
    } else {
        dst.put_slice(b"transfer-encoding: chunked\r\n");
        Out::Chunked
    };

    if !keep_alive && !asked.http10 && !connection_close && !tunnel && !informational {
        dst.put_slice(b"connection: close\r\n");
    } else if keep_alive && asked.http10 && !connection_keep_alive {
        dst.put_slice(b"connection: keep-alive\r\n");
    }
    if !date {
        dst.put_slice(b"date: ");
        put_date(dst);
        dst.put_slice(b"\r\n");
    }
    dst.put_slice(b"\r\n");
    Encoded {
        out,
        keep_alive,
        trailers: trailers.filter(|_| out == Out::Chunked && asked.trailers),
    }
}

fn put_length(dst: &mut BytesMut, n: u64) {
    let _ = std::fmt::Write::write_fmt(dst, format_args!("content-length: {n}\r\n"));
}

/// Writes the trailer section ending a chunked body: the fields of
/// `trailers` that may be trailers and, when `allowed` says, that the
/// message declared (a response's `Trailer`; a request's are all sent).
pub(super) fn encode_trailers(
    trailers: &HeaderMap,
    allowed: Option<&[HeaderName]>,
    dst: &mut BytesMut,
) {
    dst.put_slice(b"0\r\n");
    for (name, value) in trailers {
        if allowed.is_none_or(|a| a.contains(name)) && may_trail(name) {
            dst.put_slice(name.as_str().as_bytes());
            dst.put_slice(b": ");
            dst.put_slice(value.as_bytes());
            dst.put_slice(b"\r\n");
        }
    }
    dst.put_slice(b"\r\n");
}

/// Fields that framing, routing or authentication depend on never come as
/// trailers (RFC 9110 §6.5.1).
fn may_trail(name: &HeaderName) -> bool {
    !matches!(
        *name,
        header::AUTHORIZATION
            | header::CACHE_CONTROL
            | header::CONTENT_ENCODING
            | header::CONTENT_LENGTH
            | header::CONTENT_RANGE
            | header::CONTENT_TYPE
            | header::HOST
            | header::MAX_FORWARDS
            | header::SET_COOKIE
            | header::TRAILER
            | header::TRANSFER_ENCODING
            | header::TE
    )
}

thread_local! {
    /// The Date value of the current second, formatted once per second.
    static DATE: RefCell<(u64, Bytes)> = const { RefCell::new((u64::MAX, Bytes::new())) };
}

fn put_date(dst: &mut BytesMut) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            *d = (secs, Bytes::from(httpdate::fmt_http_date(now)));
        }
        dst.put_slice(&d.1);
    });
}

/// A whole response for a refused head, after which the connection closes.
pub(super) fn refusal(status: StatusCode, dst: &mut BytesMut) {
    let asked = Asked {
        head: false,
        connect: false,
        http10: false,
        keep_alive: false,
        trailers: false,
    };
    encode(status, &HeaderMap::new(), Some(0), asked, dst);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Option<Head>, Refused> {
        parse(&mut BytesMut::from(s), 60 * 1024)
    }

    #[test]
    fn a_head_parses_into_a_request_sharing_its_bytes() {
        let mut buf = BytesMut::from(
            "POST /a?b=c HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello",
        );
        let head = parse(&mut buf, 1024).expect("valid").expect("complete");
        assert_eq!(&buf[..], b"hello", "the body stays in the buffer");
        assert_eq!(head.request.method(), Method::POST);
        assert_eq!(head.request.uri(), "/a?b=c");
        assert_eq!(head.request.version(), Version::HTTP_11);
        let all: Vec<_> = head.request.headers().get_all("x-a").iter().collect();
        assert_eq!(all, ["1", "2"]);
        assert_eq!(head.framing, Framing::Length(5));
        assert!(head.keep_alive && !head.upgrade && !head.ambiguous);
    }

    #[test]
    fn a_request_target_over_the_limit_is_refused_as_too_long() {
        let wire = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_URI_LEN));
        let mut buf = BytesMut::from(wire.as_str());
        assert_eq!(parse(&mut buf, 1 << 20).err(), Some(Refused::UriTooLong));
    }

    #[test]
    fn an_incomplete_head_waits_and_an_oversized_one_is_refused() {
        assert!(matches!(
            parse_str("GET / HTTP/1.1\r\nHost: x\r\n"),
            Ok(None)
        ));
        let mut big = BytesMut::from(format!("GET / HTTP/1.1\r\nx: {}", "a".repeat(2000)).as_str());
        assert_eq!(parse(&mut big, 1024).err(), Some(Refused::TooLarge));
        let mut fields = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_HEADERS {
            fields.push_str(&format!("x-{i}: 1\r\n"));
        }
        fields.push_str("\r\n");
        assert_eq!(parse_str(&fields).err(), Some(Refused::TooLarge));
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let chunked = parse_str("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert_eq!(chunked.framing, Framing::Chunked);
        let both =
            parse_str("POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
                .expect("valid")
                .expect("complete");
        assert!(both.ambiguous && !both.keep_alive);
        for bad in [
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            "GET / HTTP/1.1\r\nbad header\r\n\r\n",
        ] {
            assert!(
                matches!(parse_str(bad), Err(Refused::Malformed(_))),
                "{bad}"
            );
        }
        let get = parse_str("GET / HTTP/1.1\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert_eq!(get.framing, Framing::Empty);
    }

    #[test]
    fn keep_alive_upgrade_and_expect_are_read_from_the_head() {
        let h10 = parse_str("GET / HTTP/1.0\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert!(!h10.keep_alive);
        let h10ka = parse_str("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert!(h10ka.keep_alive);
        let close = parse_str("GET / HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert!(!close.keep_alive);
        let ws = parse_str("GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert!(ws.upgrade);
        let connect = parse_str("CONNECT a:443 HTTP/1.1\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert!(connect.upgrade);
        let expect =
            parse_str("PUT / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n")
                .expect("valid")
                .expect("complete");
        assert!(expect.expect_continue);
    }

    fn asked() -> Asked {
        Asked {
            head: false,
            connect: false,
            http10: false,
            keep_alive: true,
            trailers: true,
        }
    }

    fn encode_str(
        status: u16,
        headers: &[(&str, &str)],
        length: Option<u64>,
        asked: Asked,
    ) -> (String, Encoded) {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        let mut dst = BytesMut::new();
        let e = encode(
            StatusCode::from_u16(status).expect("status"),
            &map,
            length,
            asked,
            &mut dst,
        );
        (String::from_utf8(dst.to_vec()).expect("utf-8"), e)
    }

    /// `size` leaves room for the whole head, however long its fields, so
    /// the head and a small body are written without the buffer growing.
    #[test]
    fn a_head_fits_the_room_its_size_reserves() {
        let mut map = HeaderMap::new();
        map.insert(
            "x-long",
            HeaderValue::from_str(&"v".repeat(2000)).expect("value"),
        );
        for i in 0..20 {
            map.append(
                HeaderName::from_bytes(format!("x-field-{i}").as_bytes()).expect("name"),
                HeaderValue::from_static("a value of some length"),
            );
        }
        for (asked, length) in [(asked(), Some(1000)), (asked(), None)] {
            let mut dst = BytesMut::new();
            encode(StatusCode::OK, &map, length, asked, &mut dst);
            assert!(dst.len() <= size(&map), "{} > {}", dst.len(), size(&map));
        }
        let mut h10 = asked();
        h10.http10 = true;
        let mut dst = BytesMut::new();
        encode(StatusCode::OK, &HeaderMap::new(), None, h10, &mut dst);
        assert!(dst.len() <= size(&HeaderMap::new()), "{}", dst.len());
    }

    #[test]
    fn a_response_is_framed_by_its_length_or_chunked() {
        let (s, e) = encode_str(200, &[("x-a", "1")], Some(5), asked());
        assert!(
            s.starts_with("HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 5\r\ndate: "),
            "{s}"
        );
        assert!(s.ends_with("\r\n\r\n"));
        assert_eq!(e.out, Out::Length(5));
        let (s, e) = encode_str(200, &[("transfer-encoding", "gzip")], None, asked());
        assert!(
            s.contains("transfer-encoding: chunked\r\n") && !s.contains("gzip"),
            "{s}"
        );
        assert_eq!(e.out, Out::Chunked);
        let (s, e) = encode_str(
            200,
            &[("content-length", "9")],
            None,
            Asked {
                head: true,
                ..asked()
            },
        );
        assert!(s.contains("content-length: 9\r\n"), "{s}");
        assert_eq!(e.out, Out::Length(0), "HEAD: no body");
        let (s, e) = encode_str(204, &[("content-length", "9")], Some(0), asked());
        assert!(!s.contains("content-length"), "{s}");
        assert_eq!(e.out, Out::Length(0));
    }

    #[test]
    fn connection_management_follows_the_client_s_version() {
        let h10 = Asked {
            http10: true,
            keep_alive: false,
            ..asked()
        };
        let (s, e) = encode_str(200, &[], None, h10);
        assert!(s.starts_with("HTTP/1.0 200 OK\r\n"), "{s}");
        assert_eq!(e.out, Out::Close);
        let (s, e) = encode_str(
            200,
            &[],
            Some(2),
            Asked {
                keep_alive: true,
                ..h10
            },
        );
        assert!(
            s.contains("connection: keep-alive\r\n") && e.keep_alive,
            "{s}"
        );
        let (s, e) = encode_str(200, &[("connection", "close")], Some(2), asked());
        assert!(!e.keep_alive && s.matches("connection").count() == 1, "{s}");
        let (s, _) = encode_str(
            200,
            &[],
            Some(2),
            Asked {
                keep_alive: false,
                ..asked()
            },
        );
        assert!(s.contains("connection: close\r\n"), "{s}");
    }

    #[test]
    fn expect_counts_only_for_an_http11_body_and_304_gets_no_implicit_length() {
        for (wire, expect) in [
            ("GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n", false),
            (
                "PUT / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
                false,
            ),
            (
                "PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
                true,
            ),
        ] {
            let h = parse_str(wire).expect("valid").expect("complete");
            assert_eq!(h.expect_continue, expect, "{wire}");
        }
        let (s, _) = encode_str(304, &[], Some(0), asked());
        assert!(!s.contains("content-length"), "{s}");
    }

    #[test]
    fn trailers_go_only_to_a_client_that_takes_them() {
        let h = parse_str("GET / HTTP/1.1\r\nTE: trailers\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert!(h.te_trailers);
        let (_, e) = encode_str(
            200,
            &[("trailer", "x-sum")],
            None,
            Asked {
                trailers: false,
                ..asked()
            },
        );
        assert!(e.trailers.is_none());
    }

    #[test]
    fn only_declared_trailers_that_may_trail_are_sent() {
        let (_, e) = encode_str(200, &[("trailer", "x-sum, content-type")], None, asked());
        let allowed = e.trailers.expect("declared");
        let mut t = HeaderMap::new();
        t.insert("x-sum", HeaderValue::from_static("1"));
        t.insert("x-other", HeaderValue::from_static("2"));
        t.insert(header::CONTENT_TYPE, HeaderValue::from_static("a/b"));
        let mut dst = BytesMut::new();
        encode_trailers(&t, Some(&allowed), &mut dst);
        assert_eq!(&dst[..], b"0\r\nx-sum: 1\r\n\r\n");
    }
}
