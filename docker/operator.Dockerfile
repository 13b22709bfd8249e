# weft-operator (and weftctl). Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t ghcr.io/weft-mesh/weft-operator:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p weft-operator \
 && cp target/release/weft-operator target/release/weftctl /usr/local/bin/

# distroless: no shell, no package manager; runs as the nonroot user (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/weft-operator /usr/local/bin/weftctl /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/weft-operator"]
