# weft-injector. Build from the repository root:
#   docker build -f docker/injector.Dockerfile -t ghcr.io/weft-mesh/weft-injector:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p weft-injector \
 && cp target/release/weft-injector /usr/local/bin/

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/weft-injector /usr/local/bin/
USER 65532:65532
EXPOSE 8443
ENTRYPOINT ["/usr/local/bin/weft-injector"]
