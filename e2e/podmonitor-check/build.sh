#!/usr/bin/env bash
# Builds weft-podmonitor-check (strict decoding of PodMonitors into
# prometheus-operator's Go types, see main.go) into
# <repo>/target/podmonitor-check/weft-podmonitor-check.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$root/target/podmonitor-check/weft-podmonitor-check"
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
go build -trimpath -ldflags "-s -w" -o "$out" .
echo "built $out"
