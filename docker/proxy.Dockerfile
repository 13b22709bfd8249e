# weft-proxy: the sidecar (`weft-proxy run`, uid 1337) and the capture init
# container (`weft-proxy init`, which needs iptables: both the nft and the
# legacy variants are installed, and init picks the one the node uses).
#   docker build -f docker/proxy.Dockerfile -t ghcr.io/weft-mesh/weft-proxy:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile sidecar --locked -p weft-proxy \
 && cp target/sidecar/weft-proxy /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1337 weft-proxy \
 && useradd --uid 1337 --gid 1337 --no-create-home --shell /usr/sbin/nologin weft-proxy
COPY --from=build /usr/local/bin/weft-proxy /usr/local/bin/
# The sidecar runs as 1337 (the uid the capture rules exempt); the init
# container overrides this with runAsUser: 0 and NET_ADMIN/NET_RAW only.
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/weft-proxy"]
CMD ["run"]
