#!/usr/bin/env bash
# Builds what the Gateway API conformance run needs, from the release pinned
# in go.mod, into <repo>/target/gateway-api/:
#   conformance.test  the upstream suite (conformance/ calls its
#                     RunConformance unchanged), run by
#                     e2e/tests/gateway_conformance.rs in the harness's node
#                     network namespace;
#   echo-basic        the suite's echo backend (conformance/echo-basic),
#                     which the kubelet simulator runs for its image.
# Go's module and build caches make a rebuild after the first one cheap.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$root/target/gateway-api"
mkdir -p "$out"
cd "$here"
# shellcheck source=../go-build-fresh.sh
. "$here/../go-build-fresh.sh"
if fresh "$out/conformance.test" "$out/echo-basic"; then
  echo "up to date: $out/conformance.test $out/echo-basic"
  exit 0
fi
export GOFLAGS="${GOFLAGS:--buildvcs=false}"
export CGO_ENABLED=0
go test -c -trimpath -ldflags "-s -w" -o "$out/conformance.test" ./conformance
go build -trimpath -ldflags "-s -w" -o "$out/echo-basic" sigs.k8s.io/gateway-api/conformance/echo-basic
echo "built $out/conformance.test $out/echo-basic"
