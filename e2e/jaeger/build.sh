#!/usr/bin/env bash
# Builds Jaeger's all-in-one binary (cmd/jaeger of
# github.com/jaegertracing/jaeger, pinned as a tool in go.mod) into
# <repo>/target/jaeger/jaeger, for the e2e tracing scenario. Go's module and
# build caches make a rebuild after the first one cheap.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$root/target/jaeger/jaeger"
mkdir -p "$(dirname "$out")"
cd "$here"
# shellcheck source=../go-build-fresh.sh
. "$here/../go-build-fresh.sh"
if fresh "$out"; then
  echo "up to date: $out"
  exit 0
fi
export GOFLAGS="${GOFLAGS:--buildvcs=false}"
export CGO_ENABLED=0
go build -trimpath -ldflags "-s -w" -o "$out" github.com/jaegertracing/jaeger/cmd/jaeger
echo "built $out"
