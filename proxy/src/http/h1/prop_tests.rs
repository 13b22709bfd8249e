//! Properties of the HTTP/1 parser and body decoder over whatever a client
//! sends: never a panic, never a byte more than was sent, and requests
//! written back to back come out whole and in order however the bytes are
//! cut into reads.

use bytes::BytesMut;
use proptest::prelude::*;

use super::body::{Decoded, Decoder, Framing};
use super::head::parse;

/// The pieces `wire` arrives in: cut at `cuts` (fractions of its length).
fn pieces(wire: &[u8], cuts: &[prop::sample::Index]) -> Vec<Vec<u8>> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
    at.push(0);
    at.push(wire.len());
    at.sort_unstable();
    at.windows(2).map(|w| wire[w[0]..w[1]].to_vec()).collect()
}

/// One request to write: method, path, body, chunked or not.
#[derive(Clone, Debug)]
struct Req {
    post: bool,
    path: String,
    body: Vec<Vec<u8>>,
    chunked: bool,
}

fn request() -> impl Strategy<Value = Req> {
    (
        any::<bool>(),
        "/[a-z0-9]{0,12}",
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 0..4),
        any::<bool>(),
    )
        .prop_map(|(post, path, body, chunked)| Req {
            post,
            path,
            body: if post { body } else { Vec::new() },
            chunked,
        })
}

fn wire(reqs: &[Req]) -> Vec<u8> {
    let mut w = Vec::new();
    for r in reqs {
        let method = if r.post { "POST" } else { "GET" };
        w.extend_from_slice(format!("{method} {} HTTP/1.1\r\nhost: a\r\n", r.path).as_bytes());
        if r.post && r.chunked {
            w.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
            for c in &r.body {
                w.extend_from_slice(format!("{:x};e=1\r\n", c.len()).as_bytes());
                w.extend_from_slice(c);
                w.extend_from_slice(b"\r\n");
            }
            w.extend_from_slice(b"0\r\nx-t: 1\r\n\r\n");
        } else if r.post {
            let body: Vec<u8> = r.body.concat();
            w.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
            w.extend_from_slice(&body);
        } else {
            w.extend_from_slice(b"\r\n");
        }
    }
    w
}

/// Reads requests off `pieces` as the connection does: heads, then each
/// body through its decoder. (method, path, body) for each, in order.
fn read_all(pieces: &[Vec<u8>]) -> Result<Vec<(String, String, Vec<u8>)>, String> {
    let mut buf = BytesMut::new();
    let mut feed = pieces.iter();
    let mut out = Vec::new();
    let mut current: Option<(String, String, Vec<u8>, Decoder)> = None;
    loop {
        loop {
            match current.as_mut() {
                None => match parse(&mut buf, 8192).map_err(|e| format!("{e:?}"))? {
                    Some(h) => {
                        let m = h.request.method().to_string();
                        let p = h.request.uri().to_string();
                        current = Some((m, p, Vec::new(), Decoder::new(h.framing)));
                    }
                    None => break,
                },
                Some((_, _, body, d)) => {
                    match d.decode(&mut buf, 8192).map_err(|e| e.to_string())? {
                        Decoded::Data(b) => body.extend_from_slice(&b),
                        Decoded::Trailers(_) => {}
                        Decoded::End => {
                            let (m, p, b, _) = current.take().expect("a request");
                            out.push((m, p, b));
                        }
                        Decoded::More if d.is_done() => {
                            let (m, p, b, _) = current.take().expect("a request");
                            out.push((m, p, b));
                        }
                        Decoded::More => break,
                    }
                }
            }
            if let Some((_, _, _, d)) = &current
                && d.is_done()
            {
                let (m, p, b, _) = current.take().expect("a request");
                out.push((m, p, b));
            }
        }
        match feed.next() {
            Some(p) => buf.extend_from_slice(p),
            None => break,
        }
    }
    if current.is_some() || !buf.is_empty() {
        return Err(format!(
            "left over: {} bytes, a request open: {}",
            buf.len(),
            current.is_some()
        ));
    }
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn pipelined_requests_come_out_whole_and_in_order_at_any_cut(
        reqs in proptest::collection::vec(request(), 1..5),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let wire = wire(&reqs);
        let got = read_all(&pieces(&wire, &cuts)).map_err(TestCaseError::fail)?;
        prop_assert_eq!(got.len(), reqs.len());
        for (g, r) in got.iter().zip(&reqs) {
            prop_assert_eq!(&g.0, if r.post { "POST" } else { "GET" });
            prop_assert_eq!(&g.1, &r.path);
            prop_assert_eq!(&g.2, &r.body.concat());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_parser_or_the_decoders(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        framing in prop_oneof![Just(Framing::Chunked), (0u64..1000).prop_map(Framing::Length)],
    ) {
        let mut buf = BytesMut::from(&bytes[..]);
        let before = buf.len();
        if let Ok(Some(_)) = parse(&mut buf, 256) {
            prop_assert!(buf.len() < before, "a head took bytes");
        }
        let mut buf = BytesMut::from(&bytes[..]);
        let mut d = Decoder::new(framing);
        let mut data = 0usize;
        for _ in 0..1000 {
            match d.decode(&mut buf, 256) {
                Ok(Decoded::Data(b)) => data += b.len(),
                Ok(Decoded::Trailers(_)) => {}
                Ok(Decoded::End | Decoded::More) | Err(_) => break,
            }
        }
        prop_assert!(data <= bytes.len(), "{data} data bytes out of {} read", bytes.len());
    }
}
