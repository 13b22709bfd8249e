# weft-e2e-app: the demo's echo server and the scenarios' in-pod client
# (`get`, `send`, `stream`, `load`), for running the scenarios against a real
# cluster (WEFT_E2E_KUBECONFIG; see e2e/README.md).
#   docker build -f docker/e2e-app.Dockerfile -t weft-e2e-app:dev .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p weft-e2e --bin weft-e2e-app \
 && cp target/release/weft-e2e-app /usr/local/bin/

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/weft-e2e-app /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/weft-e2e-app"]
