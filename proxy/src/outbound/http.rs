//! Outbound HTTP: each request of a client connection is balanced over the
//! Service's endpoints independently and sent over a pooled connection
//! (mTLS + ALPN to meshed endpoints). A connect failure moves to another
//! endpoint before the request is sent, so no body is ever replayed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::io::{AsyncRead, AsyncWrite};
use weft_proxy_config::{HashKey, LoadBalancer};

use crate::connect::{ConnectError, acquire, send_request};
use crate::http::forward::{finish, prepare};
use crate::http::pool::{PoolKey, Version};
use crate::http::{Body, error_response, serve_connection};
use crate::metrics::Direction;
use crate::proxy::State;
use crate::snapshot::{ServiceRef, Snapshot, endpoint_port};
use crate::tls::SpiffeId;

struct Ctx {
    state: Arc<State>,
    snap: Arc<Snapshot>,
    target: ServiceRef,
    dst: SocketAddr,
    client: SocketAddr,
    version: Version,
}

/// Serves HTTP on a captured client connection.
pub async fn serve<I>(
    state: Arc<State>,
    snap: Arc<Snapshot>,
    target: ServiceRef,
    dst: SocketAddr,
    client: SocketAddr,
    version: Version,
    io: I,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ctx = Arc::new(Ctx {
        state: state.clone(),
        snap,
        target,
        dst,
        client,
        version,
    });
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move {
            let resp = proxy(&ctx, req).await;
            ctx.state
                .metrics
                .request(Direction::Outbound, resp.status().as_u16());
            Ok::<_, Infallible>(resp)
        }
    });
    serve_connection(&state, io, version, svc).await;
}

fn hash_key(lb: &LoadBalancer, headers: &HeaderMap, client: SocketAddr) -> Option<String> {
    match lb {
        LoadBalancer::ConsistentHash(HashKey::Header(h)) => headers
            .get(h.as_str())
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        LoadBalancer::ConsistentHash(HashKey::Cookie(c)) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| k == c)
            .map(|(_, v)| v.to_owned()),
        LoadBalancer::ConsistentHash(HashKey::SourceIp) => Some(client.ip().to_string()),
        _ => None,
    }
}

fn fail(state: &State, e: &ConnectError) -> Response<Body> {
    state.metrics.error(Direction::Outbound, e.step());
    tracing::warn!(error = %e, step = e.step(), "outbound request failed");
    error_response(e.status(), e.step(), &e.to_string())
}

async fn proxy(ctx: &Ctx, req: Request<Incoming>) -> Response<Body> {
    let state = &ctx.state;
    let snap = &ctx.snap;
    let (svc, port) = snap.service(ctx.target);
    let key = hash_key(&svc.policy.load_balancer, req.headers(), ctx.client);
    let eps = super::live_endpoints(snap, ctx.target);
    let prepared = prepare(req, ctx.version);

    // Candidates: balanced endpoints, or the original destination when the
    // config knows none (kubelet may not have delivered them yet).
    let mut candidates: Vec<(SocketAddr, Option<SpiffeId>)> = Vec::new();
    if eps.is_empty() {
        candidates.push((ctx.dst, None));
    } else {
        for i in super::attempt_order(state, snap, ctx.target, &eps, key.as_deref())
            .into_iter()
            .take(super::MAX_ATTEMPTS)
        {
            let ep = eps[i];
            let addr = SocketAddr::new(ep.address, endpoint_port(ep, port));
            match ep
                .identity
                .as_deref()
                .filter(|_| ep.meshed)
                .map(SpiffeId::parse)
                .transpose()
            {
                Ok(id) => candidates.push((addr, id)),
                Err(e) => {
                    tracing::error!(%addr, error = %e, "endpoint identity in config is not a SPIFFE ID; skipping it")
                }
            }
        }
    }
    if candidates.is_empty() {
        state.metrics.error(Direction::Outbound, "no-endpoint");
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "no-endpoint",
            &format!(
                "service {} has no usable endpoint; check the endpoint identities in proxy.json",
                svc.key()
            ),
        );
    }

    let mut last = None;
    for (addr, identity) in candidates {
        let key = PoolKey {
            addr,
            identity,
            version: ctx.version,
        };
        let pool = state.outbound_pools.get(&key);
        let _in_flight = pool.track();
        match acquire(state, snap, &pool, &key, false).await {
            Ok((sender, fresh)) => {
                return match send_request(state, snap, &pool, &key, sender, fresh, prepared.request)
                    .await
                {
                    Ok(resp) => finish(resp, prepared.client_upgrade),
                    Err(crate::connect::SendError::Connect(e)) => fail(state, &e),
                    Err(e) => {
                        state.metrics.error(Direction::Outbound, "upstream");
                        tracing::warn!(error = %e, "outbound request failed upstream");
                        error_response(StatusCode::BAD_GATEWAY, "upstream", &e.to_string())
                    }
                };
            }
            Err(e) => {
                state.metrics.error(Direction::Outbound, e.step());
                tracing::warn!(error = %e, "endpoint attempt failed; trying another");
                last = Some(e);
            }
        }
    }
    match last {
        Some(e) => {
            tracing::warn!(service = %svc.key(), "every endpoint attempt failed");
            error_response(e.status(), e.step(), &e.to_string())
        }
        None => error_response(StatusCode::BAD_GATEWAY, "connect", "no attempt was made"),
    }
}
