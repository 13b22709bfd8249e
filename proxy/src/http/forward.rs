//! Turning a request received from a client into one sent upstream, and the
//! response back: hop-by-hop fields, URI form per HTTP version, streamed
//! bodies, and `Upgrade`/`CONNECT` tunnels spliced end to end.

use http::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use bytes::Bytes;

use super::form::set_form;
use super::pool::{UpstreamBody, Version};
use super::{Body, BoxError, boxed, strip_hop_by_hop, wants_upgrade};

/// A request ready for upstream, plus the client side of a pending upgrade.
#[derive(Debug)]
pub struct Prepared {
    /// The upstream request.
    pub request: Request<Body>,
    /// Resolves to the client's connection once we answer 101 / 2xx CONNECT.
    pub client_upgrade: Option<ClientUpgrade>,
}

/// One side of a pending upgrade: the client's, from whichever server read
/// the request, or the upstream's, from whichever client sent it.
#[derive(Debug)]
pub enum ClientUpgrade {
    Hyper(hyper::upgrade::OnUpgrade),
    H1(super::h1::OnUpgrade),
}

impl ClientUpgrade {
    /// Takes the pending upgrade out of `req`.
    fn of<B>(req: &mut Request<B>) -> Self {
        match req.extensions_mut().remove::<super::h1::OnUpgrade>() {
            Some(u) => ClientUpgrade::H1(u),
            None => ClientUpgrade::Hyper(hyper::upgrade::on(req)),
        }
    }

    /// Takes the upstream's pending upgrade out of its response.
    fn of_response(resp: &mut Response<UpstreamBody>) -> Self {
        match resp.extensions_mut().remove::<super::h1::OnUpgrade>() {
            Some(u) => ClientUpgrade::H1(u),
            None => ClientUpgrade::Hyper(hyper::upgrade::on(resp)),
        }
    }

    /// The connection, once the upgrade is answered.
    async fn connection(self) -> Result<super::h1::Upgraded, BoxError> {
        match self {
            ClientUpgrade::Hyper(u) => Ok(Box::new(TokioIo::new(u.await?))),
            ClientUpgrade::H1(u) => u.await,
        }
    }
}

/// Prepares `req`, received from a client, for an upstream speaking `version`.
pub fn prepare<B>(mut req: Request<B>, version: Version) -> Prepared
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let is_connect = req.method() == Method::CONNECT;
    let upgrade = is_connect || wants_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| ClientUpgrade::of(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade && !is_connect);
    // weft's HTTP/1 client writes either form as HTTP/1.1 (an authority in
    // the URI becomes `Host`), and the multiplexed hop puts a request in
    // HTTP/2 form as it sends it: only hyper's HTTP/2 needs it here.
    if version == Version::Http2 {
        set_form(&mut parts, http::Version::HTTP_2);
    }
    // A body failure is the client's: marked, so that it is answered 400
    // rather than blamed on the upstream (`super::client_body_error`).
    let body = http_body_util::BodyExt::map_err(body, |e| super::ClientBodyError(e.into()));
    Prepared {
        request: Request::from_parts(parts, boxed(body)),
        client_upgrade,
    }
}

/// Turns the upstream response into the client response; when it accepts
/// an upgrade, splices the two upgraded connections together.
pub fn finish(
    mut resp: Response<UpstreamBody>,
    client_upgrade: Option<ClientUpgrade>,
) -> Response<Body> {
    let upgraded = resp.status() == StatusCode::SWITCHING_PROTOCOLS
        || (client_upgrade.is_some() && resp.status().is_success());
    if upgraded && let Some(client) = client_upgrade {
        let upstream = ClientUpgrade::of_response(&mut resp);
        tokio::spawn(async move {
            match tokio::try_join!(client.connection(), upstream.connection()) {
                Ok((mut c, mut u)) => {
                    if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                        tracing::debug!(error = %e, "upgraded tunnel closed with error");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "upgrade did not complete"),
            }
        });
    }
    let keep_upgrade = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(resp.headers_mut(), keep_upgrade);
    resp.map(boxed)
}
